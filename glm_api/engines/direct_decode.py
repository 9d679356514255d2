"""A decode step's forward computed straight from the model's modules, without transformers'
per-module dispatch (issue 24 item 2).

In a decode step every op works on a handful of rows, so what a step costs beyond reading the
weights is the number of Python-level calls: transformers' forward passes each layer through
``nn.Module.__call__``, output-capturing and deprecation wrappers and config lookups, and its
rotary embedding and RMSNorm are a dozen small ops each. On the 2-core dev CPU that was most of
a random 2-layer model's step (``bench/profile_engine.py``). For the decoder layouts named in
:data:`LAYOUTS` the step is computed here instead, from the same modules and weights:

- projections through each module's own ``forward`` (``F.linear``, the packed oneDNN path of
  :mod:`glm_api.families.dense_kernels`, a quantised kernel: whatever the module is), skipping
  ``__call__``: a step with LoRA rows takes the model's forward, where the adapters' hooks run;
- RMSNorm op for op as transformers computes it, without the module call;
- the rotary embedding from the model's own ``rotary_emb`` module (its scaling and rope type
  included), applied once per layer to the query and key heads together, in the layout's
  pairing (halves for Llama, interleaved pairs over the rotary part for GLM), as the same
  products and sums transformers computes;
- attention through the decode batch's paged op (:mod:`decode_step`).

Any other model (or a layer that does not have exactly the expected parts) keeps
transformers' forward. The answers agree with it within float rounding (fused or packed
projections sum in another order).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glm_api.families.timing_store import Figures, TimingStore, timed
from glm_api.units import byte_size

log = logging.getLogger(__name__)

Proj = Callable[[torch.Tensor], torch.Tensor]

#: Decoder-layer class -> how its rotary embedding pairs dimensions ("half": Llama's
#: rotate_half; "interleaved": GLM's pairs over the rotary part of each head). Each listed layout
#: is checked against transformers' forward in tests/engines/test_direct_decode.py.
LAYOUTS = {"LlamaDecoderLayer": "half", "GlmDecoderLayer": "interleaved"}
#: Rope types whose angles depend on the position alone (not on the sequence's length): their
#: cos/sin are computed once for every position and looked up per step.
STATIC_ROPE = frozenset({"default", "linear", "llama3", "yarn"})
#: The looked-up table (cos and sin, every position) may take at most this many bytes.
ROPE_TABLE_BYTES = 64 * 2**20
#: Seconds spent timing each way of running the projections (the fastest pass counts).
FUSION_TIMING_SECONDS = 0.3


@dataclass
class _Layer:
    index: int
    norm_in: torch.Tensor
    norm_post: torch.Tensor
    q: Proj
    k: Proj
    v: Proj
    o: Proj
    gate_up: Proj | None  # GLM: one fused projection, gate first
    gate: Proj | None
    up: Proj | None
    down: Proj
    act: Proj
    qkv: Proj | None = None  # q, k and v as one packed projection (fuse_projections)
    fused_gate_up: Proj | None = None  # Llama's gate and up as one (fuse_projections)


class DirectDecoder:
    """Logits ``[B, V]`` of one decode token of each row of a
    :class:`~glm_api.engines.decode_step.DecodeBatch`, computed layer by layer from ``model``'s
    modules (see the module docstring). Build with :meth:`for_model`."""

    def __init__(self, model: nn.Module, rotary: str, layers: list[_Layer]) -> None:
        inner = model.model
        config = model.config.get_text_config()
        self.embed = inner.embed_tokens.weight
        self.rotary_emb = inner.rotary_emb
        self.norm = inner.norm.weight
        self.head: Proj = _forward(model.lm_head)
        self.eps = float(config.rms_norm_eps)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        attn = inner.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scale = float(attn.scaling)
        self.rotary = rotary
        self.layers = layers
        self._table = self._rope_table(config, model.dtype)
        self.fused_rows = 0  # steps of up to this many rows take the fused projections

    def fuse_projections(self, model: nn.Module, hint_rows: int = 1, *, widths: tuple[int, ...] = (1,),
                         force: bool = False, timings: TimingStore | None = None) -> bool:
        """Give each layer one packed projection for q, k, v (and Llama's gate and up:
        :func:`~glm_api.families.dense_kernels.fused_projection`), taken by steps of up to the
        widest of ``widths`` (from the narrowest) at which it timed faster than the modules' own
        projections (``force``: all of them, whatever the figures); wider steps keep the modules.
        Costs a copy of those weights (skipped, with a log line, past the memory share packing may
        take). ``timings``: figures kept from an earlier start on this machine are reused (and
        new ones kept). Returns whether it fused."""
        from glm_api.families import dense_kernels

        groups = []  # per layer: the q/k/v modules and (Llama) the gate/up modules to fuse, or None
        for layer, module in zip(self.layers, model.model.layers):
            attn, mlp = module.self_attn, module.mlp
            qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
            gate_up = [getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)]
            groups.append((
                qkv if dense_kernels.can_fuse(qkv) else None,
                gate_up if layer.gate_up is None and dense_kernels.can_fuse(gate_up) else None,
            ))
        extra = sum(m.weight.nbytes for pair in groups for part in pair if part for m in part)
        if not extra:
            return False
        refused = "decode projections kept apart (fused copies would take %s of the %s available)"
        if not force and not dense_kernels.copies_fit(extra, refused, log):
            return False
        candidates = [
            tuple(dense_kernels.fused_projection(part, hint_rows) if part else None for part in pair)
            for pair in groups
        ]
        rows = max(widths)
        if not force:
            def measure() -> Figures:
                ms = {w: self._time_fusion(candidates, w) for w in sorted(widths)}
                return {"apart": {w: a for w, (a, _) in ms.items()}, "fused": {w: f for w, (_, f) in ms.items()}}

            figures, reused = timed(timings, "fused projections", self._fusion_key(groups, widths), measure)
            rows = 0  # the widest step up to which fused won at every measured width
            for w in sorted(widths):
                if figures["fused"][w] * dense_kernels.MIN_GAIN > figures["apart"][w]:
                    break
                rows = w
            text = ", ".join(f"{w} rows {figures['apart'][w]:.1f} apart / {figures['fused'][w]:.1f} fused ms"
                             for w in sorted(widths)) + (" (stored timings)" if reused else "")
            if not rows:
                log.info("decode projections kept apart: %s", text)
                return False
            log.info("decode projections fused (q/k/v, gate/up) for steps of up to %d rows (copies take %s): %s",
                     rows, byte_size(extra), text)
        for layer, (qkv, gate_up) in zip(self.layers, candidates):
            layer.qkv, layer.fused_gate_up = qkv, gate_up
        self.fused_rows = rows
        return True

    def _fusion_key(self, groups: list, widths: tuple[int, ...]) -> str:
        """What the fusion timing depends on besides the machine: the layers' shapes and dtype,
        which parts fuse, and the paths the modules themselves take (packed where chosen)."""
        parts = {
            tuple((tuple(m.weight.shape), getattr(m, "packed_use", None)) for m in part or ())
            for pair in groups for part in pair
        }
        shapes = sorted(parts, key=repr)
        return f"{len(self.layers)} layers {self.embed.dtype} widths={tuple(sorted(widths))} parts={shapes}"

    def _time_fusion(self, candidates: list, rows: int) -> tuple[float, float]:
        """ms of one pass over every layer's q/k/v and gate/up projections at ``rows`` rows:
        (as the modules run them, fused)."""
        from glm_api.families.kernel_timing import fastest_ms

        x = torch.randn(rows, self.embed.shape[1], dtype=self.embed.dtype, device=self.embed.device)

        def apart():
            for layer, (qkv, gate_up) in zip(self.layers, candidates):
                if qkv is not None:
                    layer.q(x), layer.k(x), layer.v(x)
                if gate_up is not None:
                    layer.gate(x), layer.up(x)

        def fused():
            for qkv, gate_up in candidates:
                if qkv is not None:
                    qkv(x)
                if gate_up is not None:
                    gate_up(x)

        with torch.inference_mode():
            return fastest_ms(apart, FUSION_TIMING_SECONDS), fastest_ms(fused, FUSION_TIMING_SECONDS)

    def _rope_table(self, config, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos and signed sin for every position, where the rope type allows and it is small."""
        positions = int(getattr(config, "max_position_embeddings", 0) or 0)
        dims = self.head_dim
        if getattr(self.rotary_emb, "rope_type", None) not in STATIC_ROPE or not positions:
            return None
        if positions * dims * 2 * torch.finfo(dtype).bits // 8 > ROPE_TABLE_BYTES:
            return None
        device = self.embed.device
        with torch.inference_mode():
            probe = torch.zeros((1, positions, 1), dtype=dtype, device=device)
            return self._angles(probe, torch.arange(positions, device=device)[None])

    @classmethod
    def for_model(cls, model: nn.Module) -> DirectDecoder | None:
        """The direct forward for ``model``, or None where it has another layout (transformers'
        forward serves it)."""
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None or not isinstance(getattr(model, "lm_head", None), nn.Module):
            return None
        kinds = {type(layer).__name__ for layer in layers}
        if len(kinds) != 1 or (kind := kinds.pop()) not in LAYOUTS:
            return None
        if not all(hasattr(inner, name) for name in ("embed_tokens", "rotary_emb", "norm")):
            return None
        config = model.config.get_text_config()
        if type(inner.embed_tokens) is not nn.Embedding or not _is_rms_norm(inner.norm):
            return None
        if getattr(config, "num_hidden_layers", len(layers)) != len(layers):
            return None
        built = [_layer(i, layer) for i, layer in enumerate(layers)]
        if any(layer is None for layer in built):
            return None
        return cls(model, LAYOUTS[kind], built)

    def __call__(self, batch) -> torch.Tensor:
        ids, positions = batch.input_ids, batch.positions  # [1, B]
        rows = ids.shape[1]
        h = F.embedding(ids[0], self.embed)  # [B, hidden]
        cos, sin = self._rotation(h, positions)
        heads, kv_heads, d, eps = self.heads, self.kv_heads, self.head_dim, self.eps
        hidden_shape = (1, rows, -1)
        qk_width = (heads + kv_heads) * d
        fused = rows <= self.fused_rows
        for layer in self.layers:
            x = _rms_norm(h, layer.norm_in, eps)
            if fused and layer.qkv is not None:  # query and key heads side by side: rotated together
                qkv = layer.qkv(x)
                qk = self._rotate(qkv[:, :qk_width].view(rows, heads + kv_heads, d), cos, sin)
                q, k = qk[:, :heads], qk[:, heads:]
                v = qkv[:, qk_width:].view(rows, kv_heads, d)
            else:
                q = layer.q(x).view(rows, heads, d)
                k = layer.k(x).view(rows, kv_heads, d)
                v = layer.v(x).view(rows, kv_heads, d)
                q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            out = batch.attend(
                layer.index,
                q.transpose(0, 1).unsqueeze(0),
                k.transpose(0, 1).unsqueeze(0),
                v.transpose(0, 1).unsqueeze(0),
                self.scale,
            )  # [1, B, heads, d]
            h = h + layer.o(out.reshape(hidden_shape)[0])
            x = _rms_norm(h, layer.norm_post, eps)
            if layer.gate_up is not None:
                gate, up = layer.gate_up(x).chunk(2, dim=-1)
            elif fused and layer.fused_gate_up is not None:
                gate, up = layer.fused_gate_up(x).chunk(2, dim=-1)
            else:
                gate, up = layer.gate(x), layer.up(x)
            h = h + layer.down(up * layer.act(gate))
        return self.head(_rms_norm(h, self.norm, eps))

    def _rotation(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin ``[B, 1, rotary dims]`` such that rotating x is
        ``x * cos + swap(x) * sin``, where swap exchanges each pair's two members."""
        if self._table is not None:
            cos, sin = self._table
            return cos.index_select(0, positions[0])[:, None], sin.index_select(0, positions[0])[:, None]
        cos, sin = self._angles(h[None], positions)
        return cos[:, None], sin[:, None]

    def _angles(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin ``[P, rotary dims]`` at ``positions`` ``[1, P]``."""
        cos, sin = self.rotary_emb(h, positions)  # [1, P, dims], the model's own (scaling included)
        cos, sin = cos[0], sin[0]
        if self.rotary == "interleaved":  # GLM: pair (2i, 2i+1) turns by angle i of the first half
            half = cos.shape[-1] // 2
            cos = cos[:, :half].repeat_interleave(2, dim=-1)
            sin = sin[:, :half].repeat_interleave(2, dim=-1)
            sin = sin.view(sin.shape[0], half, 2) * sin.new_tensor([-1.0, 1.0])
        else:  # Llama: pair (i, i + d/2) turns by angle i; rotate_half = (-x2, x1)
            half = cos.shape[-1] // 2
            sin = sin.view(sin.shape[0], 2, half) * sin.new_tensor([-1.0, 1.0])[:, None]
        return cos, sin.reshape(cos.shape)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, heads, d]`` with its first ``cos``-width dims rotated (the rest as they are)."""
        dims = cos.shape[-1]
        part = x[..., :dims] if dims < x.shape[-1] else x
        if self.rotary == "interleaved":
            swapped = part.unflatten(-1, (dims // 2, 2)).flip(-1).flatten(-2)
        else:
            swapped = part.unflatten(-1, (2, dims // 2)).flip(-2).flatten(-2)
        turned = part * cos + swapped * sin
        if dims < x.shape[-1]:
            return torch.cat((turned, x[..., dims:]), dim=-1)
        return turned


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm, op for op (in float32, then the weight in the input's dtype): the
    same bits as the general step's norm (``F.rms_norm`` sums in another order and measured no
    faster inside a decode step)."""
    y = x if x.dtype == torch.float32 else x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (y if x.dtype == torch.float32 else y.to(x.dtype))


def _is_rms_norm(module: nn.Module) -> bool:
    """transformers' RMSNorm: ``weight * x / rms(x)``, computed in float32, no offset."""
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and not hasattr(
        module, "bias"
    )


def _forward(module: nn.Module) -> Proj | None:
    """The module's forward without ``__call__`` (no hooks: LoRA steps take the model's forward);
    for a plain ``nn.Linear`` (not packed: no forward of its own) ``F.linear`` over its weight
    straight away (``nn.Linear.forward`` and its two attribute lookups cost ~3 us a call on the
    dev CPU, 15 calls a token for the 2-layer model)."""
    if not isinstance(module, nn.Module):
        return None
    if type(module) is nn.Linear and "forward" not in module.__dict__:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module.forward


def _layer(index: int, layer: nn.Module) -> _Layer | None:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    norms = getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)
    if attn is None or mlp is None or not all(n is not None and _is_rms_norm(n) for n in norms):
        return None
    if any(hasattr(attn, name) for name in ("q_norm", "k_norm", "sinks")):  # not these layouts' attention
        return None
    projections = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if any(p is None for p in projections):
        return None
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
    gate_up = getattr(mlp, "gate_up_proj", None)
    gate, up, down = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None), getattr(mlp, "down_proj", None)
    if act is None or down is None or (gate_up is None and (gate is None or up is None)):
        return None
    q, k, v, o = (_forward(p) for p in projections)
    return _Layer(
        index, norms[0].weight, norms[1].weight, q, k, v, o,
        _forward(gate_up) if gate_up is not None else None,
        _forward(gate) if gate_up is None else None,
        _forward(up) if gate_up is None else None,
        _forward(down), act.forward,
    )
