"""--quantize reaches the routed experts of GLM MoE models (fused 3-D parameters in transformers 5),
streamed from fused or per-expert checkpoints, with logits close to the dense model's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from glm_api.families import quantize as q
from glm_api.families.detect import load_chat_model
from glm_api.families.quantized_load import stream_quantized
from tests.fixtures.tiny_glm_moe import build_tiny_latent_glm

CPU = torch.device("cpu")
KINDS = ["glm4_moe", "glm4_moe_lite", "glm_moe_dsa"]
#: As tests/families/test_quantize.py bounds dense models, but int4 at 0.93: a token's top-2 of 8
#: experts is a hard choice that 4-bit rounding flips now and then in these random models.
COSINE_BOUND = {"int8": 0.99, "int4": 0.93}


@pytest.fixture(scope="module", params=KINDS)
def moe_dir(request, tmp_path_factory) -> Path:
    return build_tiny_latent_glm(tmp_path_factory.mktemp(request.param) / "model", request.param)


def _prompts(vocab: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab, (4, length), generator=torch.Generator().manual_seed(0))


def _last_logits(model) -> torch.Tensor:
    """Last-position logits of 4 random prompts of 24 tokens; for GLM-5, of as many tokens as its
    indexer keeps (8): past that its hard top-k choice of keys turns rounding noise into a
    different set of keys (the tiny random model's int8 cosine drops to ~0.94 at 24 tokens, and
    is 0.9999 when the indexer keeps every key), which measures the indexer, not the rounding."""
    with torch.inference_mode():
        ids = _prompts(model.config.vocab_size, getattr(model.config, "index_topk", 24))
        return torch.stack([model(input_ids=row[None]).logits[0, -1].float() for row in ids])


def _fused_experts_left(model) -> list[str]:
    return [name for name, m in model.named_modules() if q.fused_experts(m)]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_routed_and_shared_experts_are_quantised_and_logits_stay_close(moe_dir, mode, tmp_path):
    dense = load_chat_model(moe_dir, CPU, torch.float32, tmp_path / "cache")
    experts = _fused_experts_left(dense.model)
    assert experts  # the MoE layers' routed experts, as transformers 5 stores them
    loaded = load_chat_model(moe_dir, CPU, torch.float32, tmp_path / "cache", quantize=mode)
    model = loaded.model
    assert _fused_experts_left(model) == []
    assert all(isinstance(model.get_submodule(name), q.QuantizedExperts) for name in experts)
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear and ".layers." in n]
    assert linears == [n for n in linears if "indexer.weights_proj" in n]  # only what the model keeps in float32
    shared = model.get_submodule(experts[0].replace("experts", "shared_experts"))
    assert isinstance(shared.gate_proj, q.Int4Linear if mode == "int4" else q.Int8Linear)
    router = model.get_submodule(experts[0].replace("experts", "gate"))
    assert router.weight.dtype == torch.float32  # routers stay as they are
    cosine = nn.functional.cosine_similarity(_last_logits(model), _last_logits(dense.model), dim=-1)
    assert cosine.min() >= COSINE_BOUND[mode], cosine
    report = q.report(model, mode, torch.bfloat16)
    assert report.quantized_bytes < report.dense_bytes * (0.35 if mode == "int4" else 0.6)


def _per_expert_checkpoint(folder: Path, out: Path) -> Path:
    """The same weights named as the published GLM-4.5/4.7/5 checkpoints name them: one gate, up
    and down projection per expert; plus a multi-token-prediction layer the model ignores."""
    out.mkdir()
    for f in folder.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    state = load_file(folder / "model.safetensors")
    split = {}
    for key, tensor in state.items():
        if key.endswith("experts.gate_up_proj"):
            half = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                split[key.replace("gate_up_proj", f"{e}.gate_proj.weight")] = tensor[e, :half].clone()
                split[key.replace("gate_up_proj", f"{e}.up_proj.weight")] = tensor[e, half:].clone()
        elif key.endswith("experts.down_proj"):
            for e in range(tensor.shape[0]):
                split[key.replace("down_proj", f"{e}.down_proj.weight")] = tensor[e].clone()
        else:
            split[key] = tensor
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    mtp = {"glm4_moe": 46, "glm4_moe_lite": 47, "glm_moe_dsa": 78}[json.loads((folder / "config.json").read_text())["model_type"]]
    assert mtp >= layers
    split[f"model.layers.{mtp}.eh_proj.weight"] = torch.zeros(4, 4)  # ignored, as transformers ignores it
    save_file(split, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_fused_and_per_expert_checkpoints_stream_into_the_same_quantised_model(moe_dir, tmp_path):
    """Streamed (never dense in memory), whichever way the checkpoint names its experts."""
    fused = stream_quantized(moe_dir, CPU, torch.float32, "int4")
    per_expert = stream_quantized(_per_expert_checkpoint(moe_dir, tmp_path / "published"), CPU, torch.float32, "int4")
    assert fused is not None and per_expert is not None
    assert _fused_experts_left(fused) == _fused_experts_left(per_expert) == []
    torch.testing.assert_close(_last_logits(per_expert), _last_logits(fused), rtol=0, atol=0)
    # Loaded whole and quantised after (the fallback for checkpoints named otherwise): the same.
    from transformers import AutoModelForCausalLM

    after = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    q.quantize_model(after, "int4")
    assert _fused_experts_left(after) == []
    torch.testing.assert_close(_last_logits(after), _last_logits(fused), rtol=0, atol=0)
    routers = [m.weight for n, m in fused.named_modules() if n.endswith("mlp.gate")]
    assert routers and all(w.dtype == torch.float32 for w in routers)


def test_a_glm45_air_sized_model_fits_one_80gb_gpu_in_int4():
    """Counted on the meta device from GLM-4.5-Air's published shape (bench/kv_budget.py)."""
    from bench.kv_budget import ARCHITECTURES, weight_bytes

    air = ARCHITECTURES["glm4_moe"]
    total = sum(p.numel() for p in air.meta_model().parameters())
    assert 105e9 < total < 112e9  # 106B (without the multi-token-prediction layer)
    assert weight_bytes(air, "int4") < 64e9 < 80e9 < weight_bytes(air, "bf16")


def test_a_quantised_moe_model_batches_through_the_paged_engine(tmp_path):
    """int4 experts and latent attention together: each row's logits through the engine's
    scheduler, pool and runner equal the same quantised model run on that row alone."""
    import random

    from tests.engines.test_paged_kv import _assert_alone, _Harness, _random_rows

    folder = build_tiny_latent_glm(tmp_path / "model", "glm4_moe_lite")
    model = load_chat_model(folder, CPU, torch.float32, tmp_path / "cache", quantize="int4").model
    rows, lens = _random_rows(random.Random(4), 6)
    harness = _Harness(model, blocks=60, block_size=4, chunk=16)  # the ModelRunner installs paging
    harness.run(rows)
    _assert_alone(model, rows, lens)  # outside engine steps the installed model runs stock SDPA
