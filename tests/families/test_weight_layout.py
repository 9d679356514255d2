"""Linear weights stored input-major on CPU: same module, same values, same greedy text."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from glm_api.families.detect import load_chat_model
from glm_api.families.weight_layout import store_linear_weights_input_major

CPU = torch.device("cpu")


def _input_major(weight: torch.Tensor) -> bool:
    out_features, in_features = weight.shape
    return weight.stride() == (1, out_features) and not weight.is_contiguous()


def _untied_linears(model: nn.Module) -> list[nn.Linear]:
    embedding = model.get_input_embeddings().weight
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight is not embedding]


@torch.inference_mode()
def test_relaid_model_gives_the_same_logits_and_greedy_tokens(tiny_llama_dir):
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    relaid = copy.deepcopy(plain)
    count = store_linear_weights_input_major(relaid)

    linears = _untied_linears(relaid)
    assert count == len(linears) > 0
    assert all(_input_major(m.weight) for m in linears)
    assert relaid.lm_head.weight is relaid.model.embed_tokens.weight  # tied: left alone
    assert store_linear_weights_input_major(relaid) == 0  # twice changes nothing
    for (name, before), (_, after) in zip(plain.named_parameters(), relaid.named_parameters()):
        assert before.shape == after.shape and torch.equal(before, after), name

    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 64, 21]] * 3)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row too
    torch.testing.assert_close(relaid(input_ids=ids, attention_mask=mask).logits,
                               plain(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    kwargs = {"attention_mask": mask, "max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(relaid.generate(ids, **kwargs), plain.generate(ids, **kwargs))


def test_the_served_default_is_relaid_but_its_tied_head_kept(smollm2):
    # SmolLM2 ties lm_head to embed_tokens: re-laying the head would untie it (and copy 113 MB).
    model = smollm2.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.is_contiguous()
    assert _input_major(model.model.layers[0].mlp.down_proj.weight)  # the server's load re-laid the rest
    assert all(_input_major(m.weight) for m in _untied_linears(model))


def test_float32_cpu_loads_are_relaid_bfloat16_ones_kept(tiny_llama_dir, tmp_path):
    loaded = load_chat_model(tiny_llama_dir, CPU, torch.float32, tmp_path)
    assert all(_input_major(m.weight) for m in _untied_linears(loaded.model))
    bf16 = load_chat_model(tiny_llama_dir, CPU, torch.bfloat16, tmp_path)
    assert all(m.weight.is_contiguous() for m in bf16.model.modules() if isinstance(m, nn.Linear))
