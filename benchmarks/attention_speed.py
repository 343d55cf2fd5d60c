"""prunekit's CPU attention kernel against torch's, at encoder shapes (MiniLM: 12 heads of 32; BERT-base: 12 of 64).

Engines, timed in alternating blocks (`_timing.timed_blocks`), median ms per call:

* torch SDPA (`F.scaled_dot_product_attention`: the flash kernel for CPU);
* torch math (``softmax(q k^T * scale) v`` in three torch ops: batched GEMMs and a softmax);
* prunekit (`prunekit.runtime.attention.attend`).

q, k, v are laid out as a model makes them (views of (B, S, H * D)) and every engine gets the same
padding mask (the last 5 % of each sequence but the first masked out, as (B, 1, 1, S) booleans).
Outputs are checked against SDPA first.

    python benchmarks/attention_speed.py --threads 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _timing import timed_blocks  # benchmarks/ is on the path of a script run from it
from torch.nn import functional as F

from prunekit.runtime import attention

SHAPES = [(1, 12, 128, 32), (8, 12, 128, 32), (1, 12, 384, 32), (8, 12, 384, 32), (1, 12, 128, 64), (1, 12, 384, 64)]


def heads(batch: int, count: int, rows: int, dims: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, rows, count * dims, generator=g).view(batch, rows, count, dims).transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15, help="blocks per engine")
    parser.add_argument("--block", type=int, default=20, help="calls per block")
    parser.add_argument("--out", default="out/attention_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for batch, count, seq, dims in SHAPES:
        q, k, v = (heads(batch, count, seq, dims, s) for s in range(3))
        keep = torch.ones(batch, 1, 1, seq, dtype=torch.bool)
        keep[1:, ..., seq - max(1, seq // 20):] = False
        scale = dims ** -0.5

        def math(q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v, keep: torch.Tensor = keep,
                 scale: float = scale) -> torch.Tensor:
            scores = (q @ k.transpose(-1, -2)) * scale
            return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v

        engines = {"torch sdpa": lambda q=q, k=k, v=v, keep=keep: F.scaled_dot_product_attention(q, k, v, keep),
                   "torch math": math,
                   "prunekit": lambda q=q, k=k, v=v, keep=keep: attention.attend(q, k, v, keep)}
        with torch.inference_mode():
            reference = engines["torch sdpa"]()
            error = max(float((engines[n]() - reference).abs().max()) for n in ("torch math", "prunekit"))
            ms = timed_blocks(engines, args.rounds, args.block)
        best_torch = min(ms["torch sdpa"], ms["torch math"])
        row = {"batch": batch, "heads": count, "seq": seq, "dims": dims, "ms": ms,
               "speedup_vs_best_torch": best_torch / ms["prunekit"], "max_abs_error": error}
        rows.append(row)
        print(f"b{batch} h{count} s{seq} d{dims}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in ms.items())
              + f" -> prunekit {row['speedup_vs_best_torch']:.2f}x the faster torch path; max |error| {error:.1e}",
              flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
