"""What one embedding forward pass costs: a fixed part plus a part per padded token.

    python bench/bench_embedding_passes.py

Times the packaged all-MiniLM-L6-v2 on batches of n texts padded to L tokens (the fastest of
several interleaved runs each, since the CPU may be shared) and fits
``ms = fixed + per_token * n * L``. The engine's ``FORWARD_OVERHEAD_TOKENS`` (where it cuts a
gathered batch into passes) is ``fixed / per_token``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import machine_line, print_table  # noqa: E402


def main() -> int:
    import argparse

    import numpy as np
    import torch

    from glm_api.families.embedding import load_embedding_model, packaged_embedding_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="passes over all shapes; the fastest time of each is kept")
    args = p.parse_args()
    model = load_embedding_model(packaged_embedding_path(), torch.device("cpu"), torch.float32).model
    print(f"all-MiniLM-L6-v2, float32; {machine_line()}", flush=True)
    shapes = [(n, length) for n in (1, 4, 8, 16, 32, 64) for length in (12, 20, 32)]
    best = {shape: float("inf") for shape in shapes}
    with torch.inference_mode():
        for _ in range(args.rounds):  # rounds interleave the shapes; the fastest of each is kept
            for n, length in shapes:
                features = {
                    "input_ids": torch.randint(1000, 20000, (n, length)),
                    "attention_mask": torch.ones(n, length, dtype=torch.long),
                    "token_type_ids": torch.zeros(n, length, dtype=torch.long),
                }
                model(features)  # warm up
                for _ in range(3):
                    started = time.perf_counter()
                    model(features)
                    best[(n, length)] = min(best[(n, length)], (time.perf_counter() - started) * 1000)
    rows = [[n, length, best[(n, length)]] for n, length in shapes]
    fixed, per_token = np.linalg.lstsq(
        np.array([[1.0, n * length] for n, length, _ in rows]), np.array([ms for *_, ms in rows]), rcond=None
    )[0]
    print_table(["texts", "tokens each", "ms per pass"], rows)
    print(f"\nfit: {fixed:.2f} ms per pass + {per_token * 1000:.1f} us per padded token "
          f"-> overhead of a pass = {fixed / per_token:.0f} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
