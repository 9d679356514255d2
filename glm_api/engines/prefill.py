"""One prefill forward over a group of prompts, each of which may begin with a stored prefix.

Layout of the group's cache, one row per prompt (``P`` = longest prefix, ``W`` = longest rest):

    [ padding, then the row's prefix: P columns, copied | padding, then the rest: W columns ]

Prefixes are right-aligned in their ``P`` columns and rests in their ``W`` columns, so the
group's last column is every row's last prompt token (its logits give the first output token)
and :class:`BatchState` can take the rows as they are. Rows with different prefixes (or none)
share one pass: the mask hides each row's padding and its position ids skip it, so every row
sees what it would see run alone. The causal mask comes from the columns (transformers builds
it from the cache length), the rotary positions from the position ids, so padding in the middle
is as harmless as padding on the left.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from glm_api.engines.prefix_cache import Prefix


def prefill(
    model, prompts: list[list[int]], prefixes: list[Prefix | None], device: torch.device
) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
    """Prefill ``prompts``, each after its prefix (a beginning of it, shorter than it).

    Returns the last position's logits ``[g, V]``, the group's cache and its mask ``[g, P + W]``
    (1 = a real token).
    """
    starts = [len(p) if p is not None else 0 for p in prefixes]
    rests = [prompt[start:] for prompt, start in zip(prompts, starts)]
    group, before, width = len(rests), max(starts), max(map(len, rests))
    ids = torch.zeros((group, width), dtype=torch.long)
    mask = torch.zeros((group, before + width), dtype=torch.long)
    for row, (start, rest) in enumerate(zip(starts, rests)):
        ids[row, width - len(rest) :] = torch.tensor(rest)
        mask[row, before - start : before] = 1
        mask[row, before + width - len(rest) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, before:]
    cache = DynamicCache(_seed(prefixes, before) if before else None, config=model.config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :], cache, mask


def _seed(prefixes: list[Prefix | None], before: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the group's first ``before`` columns: each row's prefix right-aligned, zeros before."""
    if all(p is prefixes[0] for p in prefixes):  # one shared prefix: views, copied by the cache
        return [(k.expand(len(prefixes), -1, -1, -1), v.expand(len(prefixes), -1, -1, -1)) for k, v in prefixes[0].layers]
    some = next(p for p in prefixes if p is not None)
    seed = []
    for layer, (k0, v0) in enumerate(some.layers):
        keys = k0.new_zeros((len(prefixes), k0.shape[1], before, k0.shape[3]))
        values = v0.new_zeros((len(prefixes), v0.shape[1], before, v0.shape[3]))
        for row, prefix in enumerate(prefixes):
            if prefix is not None:
                k, v = prefix.layers[layer]
                keys[row, :, before - len(prefix) :] = k[0]
                values[row, :, before - len(prefix) :] = v[0]
        seed.append((keys, values))
    return seed


def compute_prefix(model, tokens: tuple[int, ...], base: Prefix | None, device: torch.device) -> Prefix:
    """Keys and values of ``tokens`` run alone, continuing from ``base`` (a shorter beginning) if given."""
    _, cache, _ = prefill(model, [list(tokens)], [base], device)
    return Prefix(tokens, [(layer.keys, layer.values) for layer in cache.layers])


def prefix_of_row(cache: DynamicCache, mask: torch.Tensor, row: int, tokens: tuple[int, ...]) -> Prefix:
    """The first ``len(tokens)`` real positions of one row of a prefilled group, copied out."""
    columns = mask[row].nonzero().squeeze(-1)[: len(tokens)]
    return Prefix(
        tokens,
        [(layer.keys[row : row + 1].index_select(2, columns), layer.values[row : row + 1].index_select(2, columns)) for layer in cache.layers],
    )
