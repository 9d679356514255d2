"""Quantised mixture-of-experts layers (``--quantize`` on a MoE model).

Transformers 5 keeps each layer's routed experts fused, as 3-D
parameters (``gate_up_proj`` ``[experts, 2 x moe_intermediate, hidden]`` and ``down_proj``
``[experts, hidden, moe_intermediate]``), not ``nn.Linear``; :class:`QuantizedExperts` replaces
such a module with one quantised gate, up and down projection per expert, under the names
published checkpoints give them (``experts.E.gate_proj``...), and routes tokens to them as the
model's own eager loop does. Shared experts are plain ``nn.Linear`` MLPs and are quantised as
any projection; routers (``gate.weight``, a bare parameter kept in float32) stay as they are,
and so does any module the model keeps in float32 (GLM-5's ``indexer.weights_proj``).
"""

from __future__ import annotations

import torch
from torch import nn

from glm_api.families.quantized_modules import Int4Linear, Int8Linear, Release, int4_packable


def fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' fused experts layout that :class:`QuantizedExperts`
    runs: gate and up concatenated, not transposed, no biases (what ``use_experts_implementation``
    records on the module), and an activation."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, nn.Parameter) and gate_up.dim() == 3
        and isinstance(down, nn.Parameter) and down.dim() == 3
        and getattr(module, "has_gate", True) and getattr(module, "is_concatenated", True)
        and not getattr(module, "is_transposed", False) and not getattr(module, "has_bias", False)
        and not getattr(module, "has_post_expert_norm", False) and callable(getattr(module, "act_fn", None))
    )


class QuantizedExpert(nn.Module):
    """One routed expert: ``down(act(gate(x)) * up(x))`` with quantised projections."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj


class QuantizedExperts(nn.Module):
    """A fused experts module's weights as one :class:`QuantizedExpert` per expert, children
    ``"0"``, ``"1"``... (so ``experts.3.gate_proj.weight``, a published checkpoint's name, is a
    quantised module's weight). Called as the fused module is: ``(hidden [tokens, hidden],
    top_k_index [tokens, k], top_k_weights [tokens, k])``. int4 projections whose shape tinygemm
    cannot pack are int8."""

    def __init__(
        self, num_experts: int, hidden: int, intermediate: int, act_fn: nn.Module, mode: str,
        device: torch.device, dtype: torch.dtype,
    ):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden, intermediate
        self.act_fn = act_fn

        def linear(n_in: int, n_out: int) -> nn.Module:
            if mode == "int4" and int4_packable(n_in, n_out):
                return Int4Linear(n_in, n_out, False, device, dtype)
            return Int8Linear(n_in, n_out, False, device, dtype, int8_activations=mode == "w8a8")

        for e in range(num_experts):
            self.add_module(
                str(e),
                QuantizedExpert(linear(hidden, intermediate), linear(hidden, intermediate), linear(intermediate, hidden)),
            )

    def expert(self, index: int) -> QuantizedExpert:
        return self._modules[str(index)]  # type: ignore[return-value]

    @torch.no_grad()
    def load_fused(
        self, name: str, weight: torch.Tensor, device: torch.device | None = None, release: Release | None = None
    ) -> None:
        """Quantise a fused ``gate_up_proj`` ``[E, 2I, H]`` or ``down_proj`` ``[E, H, I]`` expert by expert."""
        expected = {
            "gate_up_proj": (self.num_experts, 2 * self.intermediate_dim, self.hidden_dim),
            "down_proj": (self.num_experts, self.hidden_dim, self.intermediate_dim),
        }
        if name not in expected:
            raise ValueError(f"{name}: not a fused experts weight")
        if tuple(weight.shape) != expected[name]:
            raise ValueError(f"{name}: shape {tuple(weight.shape)} does not match {expected[name]} from config.json")
        half = self.intermediate_dim
        for e in range(self.num_experts):
            expert = self.expert(e)
            if name == "down_proj":
                expert.down_proj.load_weight(weight[e], device, release)
            else:
                expert.gate_proj.load_weight(weight[e, :half], device, release)
                expert.up_proj.load_weight(weight[e, half:], device, release)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():  # the experts some token chose, each once
            if not 0 <= e < self.num_experts:
                continue
            token_idx, top_k_pos = torch.where(top_k_index == e)
            expert = self.expert(e)
            x = hidden_states[token_idx]
            y = expert.down_proj(self.act_fn(expert.gate_proj(x)) * expert.up_proj(x))
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, hidden {self.hidden_dim}, intermediate {self.intermediate_dim}"
