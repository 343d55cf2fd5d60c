"""SmolLM2-135M: OWL vs uniform per-block sparsity for Wanda and SparseGPT (issue 17).

OWL (Yin et al. 2024, `prunekit.allocation.owl`) gives each decoder block a sparsity from its
share of outlier weights (Wanda scores above M x the block's mean, measured once on the dense
model), spread over 2 lambda around the target and averaging to it; uniform gives every block
the target. Both prune the same Linear layers (the 30 decoder blocks; embeddings and `lm_head`
stay dense) from the same dense weights with the same calibration data, by `pk.prune`.

Calibration: random 512-token windows of the Friends transcripts; evaluation: perplexity on
the first `--eval-tokens` of the Grimm tales (a disjoint corpus; the whole of it tokenises to
~96.8k tokens), in non-overlapping 512-token windows, as `llm_oneshot.py` does. Each row
reports perplexity, the measured block sparsity, the pruning and evaluation wall times, and
the process's peak RSS (must stay <= 6 GiB). Rows are written to `--out` as they finish; a
row already there is skipped unless `--redo`, so a long table can be filled in several runs.

    python benchmarks/llm_owl.py --bf16 --criteria Wanda --sparsity 0.6 0.7     # Wanda rows
    python benchmarks/llm_owl.py --bf16 --criteria SparseGPT --sparsity 0.7     # ~2 x 6 min more
    python benchmarks/llm_owl.py --bf16 --criteria Wanda --sparsity 0.7 --variants owl \\
        --sweep-lam 0.04 0.12 --sweep-m 3 7                                     # a small sweep
    python benchmarks/llm_owl.py --bf16 --criteria Wanda --allocated-table \\
        out/llm_allocated_wanda/sensitivity.json                                 # + scan-allocated
    python benchmarks/llm_owl.py --bf16 --criteria Wanda --sparsity 0.6 --variants uniform \\
        --select-lam 0.02 0.04 0.08 --select-m 5 20                             # OWL chosen on held-out text

`--select-lam/--select-m` is model selection without the test set: every (lambda, M) in the grid
prunes the model and is scored on `--select-tokens` of Andersen's tales (a third corpus, disjoint
from both the calibration and the Grimm evaluation); only the winner is then evaluated on Grimm,
as the row "owl selected".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

import prunekit as pk
from prunekit.allocation.owl import OutlierDistribution, outlier_distribution
from prunekit.storage.files import atomic_write_text
from prunekit.zoo.llm import corpus_texts, load_smollm2, perplexity, token_windows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_allocated_wanda import block_rules  # noqa: E402
from llm_oneshot import _block_sparsity, _peak_rss_gib, calibration_batches  # noqa: E402

CRITERIA = {"magnitude": "l1", "Wanda": "wanda", "SparseGPT": "sparsegpt"}
RSS_LIMIT_GIB = 6.0



def _variants(args: argparse.Namespace) -> list[tuple[str, float, float, bool]]:
    """(name, lam, m, clip) of every OWL variant asked for: the defaults, then the sweep."""
    out = []
    if "owl" in args.variants:
        out.append(("owl", args.lam, args.m, False))
    if "owl-clip" in args.variants:
        out.append(("owl-clip", args.lam, args.m, True))
    out += [(f"owl lam={lam:g}", lam, args.m, False) for lam in args.sweep_lam]
    out += [(f"owl M={m:g}", args.lam, m, False) for m in args.sweep_m]
    return out


def _configs(args: argparse.Namespace, sparsity: float, criterion: str,
             lods: dict[float, OutlierDistribution], table: Any) -> dict[str, tuple[Any, dict | None]]:
    """Row name -> (config to prune with, the OWL allocation as plain data or None)."""
    uniform = pk.UnstructuredConfig(sparsity=sparsity, criterion=CRITERIA[criterion], scope="layer")
    configs: dict[str, tuple[Any, dict | None]] = {}
    if "uniform" in args.variants:
        configs["uniform"] = (uniform, None)
    for name, lam, m, clip in _variants(args):
        allocation = lods[m].allocate(uniform, lam, clip=clip)
        print(allocation.summary(), flush=True)
        configs[name] = (allocation.rules(), allocation.as_dict())
    if table is not None and criterion == "Wanda":
        for spread in args.spread:
            allocation = pk.allocate(table, pk.SparsityTarget(sparsity=sparsity), min_level=sparsity - spread - 1e-9,
                                     max_level=sparsity + spread + 1e-9)
            configs[f"allocated+-{spread:g}"] = (block_rules(allocation), {"levels": allocation.levels})
    return configs


def _run_row(config: Any, calib: list[dict], eval_ids: torch.Tensor, seq_len: int, autocast: Any) -> dict:
    model, _ = load_smollm2()
    t0 = time.perf_counter()
    with autocast():
        pk.prune(model, config, data=calib)
    prune_s = time.perf_counter() - t0
    pk.finalize(model)
    t0 = time.perf_counter()
    with autocast():
        ppl = perplexity(model, eval_ids, seq_len)
    return {"perplexity": ppl, "block_sparsity": _block_sparsity(model), "prune_s": prune_s,
            "eval_s": time.perf_counter() - t0, "peak_rss_gib": _peak_rss_gib()}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    parser.add_argument("--criteria", nargs="+", default=["Wanda", "SparseGPT"], choices=list(CRITERIA))
    parser.add_argument("--variants", nargs="+", default=["uniform", "owl"], choices=["uniform", "owl", "owl-clip"],
                        help="owl-clip: OWL clipped to sparsity +- lam (the paper's text) instead of the code's range")
    parser.add_argument("--lam", type=float, default=0.08, help="OWL lambda (paper: 0.08)")
    parser.add_argument("--m", type=float, default=5.0, help="OWL outlier threshold M (paper: 5)")
    parser.add_argument("--sweep-lam", type=float, nargs="*", default=[], help="extra OWL rows at these lambdas")
    parser.add_argument("--sweep-m", type=float, nargs="*", default=[], help="extra OWL rows at these M")
    parser.add_argument("--allocated-table", type=Path,
                        help="sensitivity.json from llm_allocated_wanda.py: adds its allocated Wanda rows")
    parser.add_argument("--spread", type=float, nargs="+", default=[0.1], help="allocated rows' band (+- spread)")
    parser.add_argument("--calib", type=int, default=32, help="calibration windows (OWL statistics and pruning)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=51200, help="held-out Grimm tokens (>= 50k in the issue)")
    parser.add_argument("--bf16", action="store_true", help="forwards under CPU bf16 autocast (stats/solvers fp32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-dense", action="store_true", help="skip the dense evaluation (time)")
    parser.add_argument("--select-lam", type=float, nargs="*", default=[], help="OWL lambdas to choose from")
    parser.add_argument("--select-m", type=float, nargs="*", default=[], help="OWL M values to choose from")
    parser.add_argument("--select-tokens", type=int, default=8192, help="held-out Andersen tokens for the choice")
    parser.add_argument("--out", type=Path, default=Path("out/llm_owl/results.json"))
    parser.add_argument("--redo", action="store_true", help="re-run rows already in --out")
    return parser


def _setup(args: argparse.Namespace) -> tuple[Any, list[dict], torch.Tensor, dict]:
    """Tokenizer-side data and the results file (rows from earlier runs kept)."""
    _, tokenizer = load_smollm2()
    ids = torch.tensor(tokenizer("\n\n".join(corpus_texts("grimm-tales")))["input_ids"])
    if ids.numel() < args.eval_tokens:
        raise SystemExit(f"the Grimm tales give {ids.numel()} tokens, fewer than --eval-tokens {args.eval_tokens}")
    eval_ids = ids[: args.eval_tokens]
    calib = calibration_batches(tokenizer, args.calib, args.seq_len)
    setting = {"calib": args.calib, "seq_len": args.seq_len, "bf16": args.bf16, "threads": args.threads,
               "eval_tokens": len(token_windows(eval_ids, args.seq_len)) * args.seq_len,
               "grimm_tokens": ids.numel()}
    results: dict = {"setting": setting, "rows": {}, "owl": {}}
    if args.out.exists():
        old = json.loads(args.out.read_text())
        if old.get("setting") == setting:
            results = old
        else:
            print(f"{args.out} was measured with {old.get('setting')}; starting a new table", flush=True)
    return tokenizer, calib, eval_ids, results


def main() -> None:
    args = _parser().parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    _, calib, eval_ids, results = _setup(args)
    setting = results["setting"]
    print(f"calibration: {args.calib} x {args.seq_len} tokens (Friends); eval: {setting['eval_tokens']} of "
          f"{setting['grimm_tokens']} Grimm tokens; bf16 autocast: {args.bf16}; threads: {args.threads}", flush=True)

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(results, indent=1))

    if not args.no_dense and ("dense" not in results or args.redo):
        model, _ = load_smollm2()
        t0 = time.perf_counter()
        with autocast():
            results["dense"] = {"perplexity": perplexity(model, eval_ids, args.seq_len),
                                "eval_s": time.perf_counter() - t0}
        print(f"dense perplexity {results['dense']['perplexity']:.2f} ({results['dense']['eval_s']:.0f} s)", flush=True)
        save()

    lods: dict[float, OutlierDistribution] = {}
    for m in sorted({m for _, _, m, _ in _variants(args)} | set(args.select_m)):
        model, _ = load_smollm2()
        t0 = time.perf_counter()
        with autocast():  # the same forward precision as the pruning passes
            lods[m] = outlier_distribution(model, pk.UnstructuredConfig(sparsity=0.5), calib, m=m)
        seconds = time.perf_counter() - t0
        results["owl"][f"M={m:g}"] = {"ratios": lods[m].ratios, "seconds": seconds}
        print(f"OWL outlier ratios (M={m:g}, {seconds:.0f} s): " +
              " ".join(f"{100 * r:.2f}" for r in lods[m].ratios.values()) + " %", flush=True)
    table = pk.SensitivityTable.load(args.allocated_table) if args.allocated_table else None

    for sparsity in args.sparsity:
        for criterion in args.criteria:
            for name, (config, allocation) in _configs(args, sparsity, criterion, lods, table).items():
                key = f"{criterion} | {name} | {sparsity:g}"
                if key in results["rows"] and not args.redo:
                    print(f"{key}: already measured, skipped (--redo to re-run)", flush=True)
                    continue
                row = _run_row(config, calib, eval_ids, args.seq_len, autocast)
                row["allocation"] = allocation
                results["rows"][key] = row
                save()
                _print_row(key, row)
            if args.select_lam and args.select_m:
                _select_owl(args, sparsity, criterion, lods, calib, eval_ids, autocast, results)
                save()
    _print_table(results)


def _print_row(key: str, row: dict) -> None:
    flag = "" if row["peak_rss_gib"] <= RSS_LIMIT_GIB else f"  OVER {RSS_LIMIT_GIB} GiB"
    print(f"{key}: perplexity {row['perplexity']:8.2f}  block sparsity {row['block_sparsity']:.4f}  "
          f"prune {row['prune_s']:5.0f} s  eval {row['eval_s']:5.0f} s  "
          f"peak RSS {row['peak_rss_gib']:.2f} GiB{flag}", flush=True)


def _select_owl(args: argparse.Namespace, sparsity: float, criterion: str, lods: dict[float, OutlierDistribution],
                calib: list[dict], eval_ids: torch.Tensor, autocast: Any, results: dict) -> None:
    """Choose (lambda, M) on held-out Andersen text, then evaluate only the choice on Grimm."""
    _, tokenizer = load_smollm2()
    val_ids = torch.tensor(tokenizer("\n\n".join(corpus_texts("andersen")))["input_ids"])[: args.select_tokens]
    uniform = pk.UnstructuredConfig(sparsity=sparsity, criterion=CRITERIA[criterion], scope="layer")
    scores = results.setdefault("selection", {})
    for lam in args.select_lam:
        for m in args.select_m:
            key = f"{criterion} | lam={lam:g} M={m:g} | {sparsity:g} | andersen:{args.select_tokens}"
            if key not in scores or args.redo:
                scores[key] = _run_row(lods[m].allocate(uniform, lam).rules(), calib, val_ids, args.seq_len, autocast)
                _print_row(key, scores[key])
    mine = {k: v for k, v in scores.items() if k.startswith(f"{criterion} | ") and f"| {sparsity:g} |" in k}
    best = min(mine, key=lambda k: mine[k]["perplexity"])
    lam, m = (float(x.split("=")[1]) for x in best.split(" | ")[1].split())
    allocation = lods[m].allocate(uniform, lam)
    row = _run_row(allocation.rules(), calib, eval_ids, args.seq_len, autocast)
    row["allocation"], row["chosen_on"] = allocation.as_dict(), best
    key = f"{criterion} | owl selected | {sparsity:g}"
    results["rows"][key] = row
    _print_row(f"{key} (lambda {lam:g}, M {m:g})", row)


def _print_table(results: dict) -> None:
    """Markdown: one line per (criterion, sparsity), one column per variant, nats/token vs uniform."""
    rows = results["rows"]
    cells: dict[tuple[str, str], dict[str, float]] = {}
    for key, row in rows.items():
        criterion, name, sparsity = key.split(" | ")
        cells.setdefault((criterion, sparsity), {})[name] = row["perplexity"]
    names = list(dict.fromkeys(name for c in cells.values() for name in c))
    dense = results.get("dense", {}).get("perplexity", math.nan)
    print(f"\n(dense perplexity {dense:.2f})\n| criterion | sparsity | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for (criterion, sparsity), c in sorted(cells.items()):
        u = c.get("uniform")
        shown = [("" if n not in c else f"{c[n]:.2f}" + (f" ({math.log(c[n] / u):+.3f})" if u and n != "uniform"
                                                         else "")) for n in names]
        print(f"| {criterion} | {float(sparsity):.0%} | " + " | ".join(shown) + " |")


if __name__ == "__main__":
    main()
