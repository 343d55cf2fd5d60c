"""SmolLM2-135M: sensitivity-allocated vs uniform Wanda at the same average sparsity.

1. Scan (the cheap proxy of issue 7): each decoder block alone has its 7 Linear layers pruned
   with Wanda at each level, and the proxy loss on a few calibration windows is recorded: the
   KL divergence of the next-token distribution from the dense model's, per token. (The label
   loss moves by less than its noise when one block of 30 is pruned: in a trial it often fell.)
   A block pruned alone sees dense inputs, so its Wanda statistics come from one dense pass,
   and each probe runs only from that block's cached input onward.
2. `prunekit.allocate(table, SparsityTarget(s), min_level=s - spread, max_level=s + spread)`
   picks one sparsity per block (greedy over the convex hulls of the curves, interpolated to
   meet `s` exactly); all blocks hold the same number of weights, so the blocks' average
   sparsity is `s`, as for uniform Wanda. The band keeps each block near where the additive
   prediction was measured (OWL, Yin et al. 2024, bounds its layer ratios the same way).
3. Both are pruned from the same dense weights with the same calibration data, by `pk.prune`:
   uniform `UnstructuredConfig(s, criterion="wanda", scope="layer")`, allocated as `PerLayer`
   rules (one per block), which prunekit solves in the same single sequential pass.
4. Perplexity on held-out text (Grimm tales, a different corpus than the Friends calibration
   and probe windows), non-overlapping 512-token windows. Embeddings and `lm_head` stay dense.

    OMP_NUM_THREADS=1 python benchmarks/llm_allocated_wanda.py --bf16          # 50 % and 60 %
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

import torch
from torch import nn

import prunekit as pk
from prunekit.config import config_to_dict
from prunekit.methods.blockwise import hidden_of, with_hidden, without_cache
from prunekit.methods.calibration import Pattern, collect_stats
from prunekit.methods.wanda import wanda_scores
from prunekit.zoo.llm import corpus_texts, load_smollm2, perplexity, token_windows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_oneshot import _block_sparsity, calibration_batches  # noqa: E402

LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


class _Tail:
    """The model from block `i` onward, on block inputs cached from one dense pass."""

    def __init__(self, model: nn.Module, batches: list[dict]) -> None:
        self.model, self.blocks = model, list(model.model.layers)
        self.teacher: list[torch.Tensor] = []  # the dense model's next-token log-probabilities
        self.inputs: list[list[tuple[tuple, dict]]] = [[] for _ in self.blocks]
        hooks = [blk.register_forward_pre_hook(self._record(i), with_kwargs=True) for i, blk in enumerate(self.blocks)]
        try:
            with torch.no_grad():
                for batch in batches:
                    self.teacher.append(model(**batch).logits[0].float().log_softmax(-1))
        finally:
            for h in hooks:
                h.remove()

    def _record(self, i: int):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            self.inputs[i].append((tuple(a.clone() if torch.is_tensor(a) else a for a in args), without_cache(kwargs)))

        return hook

    @torch.no_grad()
    def kl(self, start: int) -> float:
        """KL(dense || model) per token, blocks `start`.. run on block `start`'s cached inputs."""
        total, count = 0.0, 0
        for (args, kwargs), teacher in zip(self.inputs[start], self.teacher, strict=True):
            hidden = args[0] if args else kwargs["hidden_states"]
            for block in self.blocks[start:]:
                a, k = with_hidden(args, kwargs, hidden)
                hidden = hidden_of(block(*a, **k))
            logits = self.model.lm_head(self.model.model.norm(hidden))[0].float()
            total += float(nn.functional.kl_div(logits.log_softmax(-1), teacher, log_target=True, reduction="sum"))
            count += teacher.shape[0]
        return total / count


def scan_blocks(model: nn.Module, calib: list[dict], probe: list[dict], autocast,
                levels: tuple[float, ...] = LEVELS) -> pk.SensitivityTable:
    """KL from dense on the probe windows with one block's Linear layers Wanda-pruned at each level."""
    modules = dict(model.named_modules())
    linears = [f for f, m in modules.items() if isinstance(m, nn.Linear) and ".layers." in f]
    with torch.no_grad(), autocast():
        stats = collect_stats({f: modules[f] for f in linears}, lambda: [model(**b) for b in calib], hessian=False)
        tail = _Tail(model, probe)
        baseline = tail.kl(0)  # 0 up to rounding: the same computation as the teacher's
    units = [f"model.layers.{i}" for i in range(len(tail.blocks))]
    values: dict[str, list[float]] = {}
    for i, unit in enumerate(units):
        names = [f for f in linears if f.startswith(unit + ".")]
        saved = {f: modules[f].weight.detach().clone() for f in names}
        values[unit] = []
        for level in levels:
            with torch.no_grad():
                for f in names:
                    keep = Pattern("unstructured", level).select(wanda_scores(saved[f], stats[f].sq_norm))
                    modules[f].weight.copy_(saved[f] * keep)
                with autocast():
                    values[unit].append(tail.kl(i))
        with torch.no_grad():
            for f in names:
                modules[f].weight.copy_(saved[f])
        print(f"  {unit}: " + " ".join(f"{v - baseline:.5f}" for v in values[unit]), flush=True)
    params = {u: sum(modules[f].weight.numel() for f in linears if f.startswith(u + ".")) for u in units}
    family = pk.UnstructuredConfig(sparsity=0.5, criterion="wanda", scope="layer")
    return pk.SensitivityTable(units, list(levels), values, baseline, False, config_to_dict(family), params,
                               total_params=sum(p.numel() for p in model.parameters()))


def _merged(table: pk.SensitivityTable, more: pk.SensitivityTable) -> pk.SensitivityTable:
    """One table over both tables' levels (same units, same probe data), levels in order."""
    levels = sorted(table.levels + more.levels)
    values = {u: [dict(zip(table.levels + more.levels, table.values[u] + more.values[u], strict=True))[lv]
                  for lv in levels] for u in table.units}
    return pk.SensitivityTable(table.units, levels, values, table.baseline, False, table.family, table.params,
                               total_params=table.total_params)


def block_rules(allocation: pk.Allocation) -> pk.PerLayer:
    """`PerLayer` rules giving each block's Linear layers its allocated Wanda sparsity."""
    rules: dict = {}
    for unit, level in allocation.levels.items():
        leaf = pk.UnstructuredConfig(sparsity=level, criterion="wanda", scope="layer") if level > 0 else None
        rules["re:" + unit.replace(".", r"\.") + r"\..*"] = leaf
    rules["_default"] = None  # lm_head (and anything outside the blocks) stays dense
    return pk.PerLayer(rules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.6])
    parser.add_argument("--levels", type=float, nargs="+", default=list(LEVELS), help="Wanda sparsities scanned")
    parser.add_argument("--spread", type=float, nargs="+", default=[0.1, 0.2],
                        help="allocated levels stay within average +- spread (one run per spread)")
    parser.add_argument("--calib", type=int, default=32, help="calibration windows for Wanda (and the scan)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--probe", type=int, default=4, help="windows the scan's loss is measured on")
    parser.add_argument("--probe-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--bf16", action="store_true", help="forwards under CPU bf16 autocast")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-dense", action="store_true", help="skip the dense evaluation (time)")
    parser.add_argument("--out", type=Path, default=Path("out/llm_allocated_wanda"))
    parser.add_argument("--table", type=Path, help="reuse a sensitivity.json from an earlier run (no scan)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext

    model, tokenizer = load_smollm2()
    eval_ids = torch.tensor(tokenizer("\n\n".join(corpus_texts("grimm-tales")))["input_ids"])[: args.eval_tokens]
    calib = calibration_batches(tokenizer, args.calib, args.seq_len)
    probe = calibration_batches(tokenizer, args.probe, args.probe_len, seed=1)
    n_eval = len(token_windows(eval_ids, args.seq_len)) * args.seq_len
    print(f"calibration: {args.calib} x {args.seq_len} tokens (Friends); scan probe: {args.probe} x "
          f"{args.probe_len} tokens (Friends, seed 1); eval: {n_eval} tokens (Grimm); bf16: {args.bf16}", flush=True)

    t0 = time.perf_counter()
    if args.table:  # reuse a scan; levels it lacks are scanned now and merged in
        table = pk.SensitivityTable.load(args.table)
        extra = tuple(lv for lv in args.levels if lv not in table.levels)
        if extra:
            table = _merged(table, scan_blocks(model, calib, probe, autocast, extra))
    else:
        table = scan_blocks(model, calib, probe, autocast, tuple(args.levels))
    args.out.mkdir(parents=True, exist_ok=True)
    table.save(args.out / "sensitivity.json")
    with contextlib.suppress(pk.PrunekitError):
        table.plot(args.out / "sensitivity.png")
    print(f"scan: {len(table.units)} blocks x {len(table.levels)} levels in {time.perf_counter() - t0:.0f} s "
          f"(baseline KL {table.baseline:.2g})", flush=True)

    dense = math.nan
    if not args.no_dense:
        with autocast():
            dense = perplexity(model, eval_ids, args.seq_len)
        print(f"dense perplexity {dense:.3f}", flush=True)
    results = {"dense": dense, "calib": args.calib, "eval_tokens": n_eval}
    for s in args.sparsity:
        variants = {"uniform": pk.UnstructuredConfig(sparsity=s, criterion="wanda", scope="layer", exclude=["lm_head"])}
        for spread in args.spread:
            allocation = pk.allocate(table, pk.SparsityTarget(sparsity=s), min_level=s - spread - 1e-9,
                                     max_level=s + spread + 1e-9)
            print(f"{s:.0%} +-{spread:g}: per-block sparsity " + " ".join(f"{lv:.2f}" for lv in
                  allocation.levels.values()) + f"; predicted KL {allocation.predicted_degradation:.4f}", flush=True)
            variants[f"allocated+-{spread:g}"] = block_rules(allocation)
        for name, config in variants.items():
            model, _ = load_smollm2()
            t0 = time.perf_counter()
            with autocast():
                pk.prune(model, config, data=calib)
            pk.finalize(model)
            with autocast():
                ppl = perplexity(model, eval_ids, args.seq_len)
            results[f"{name}_{s}"] = ppl
            print(f"{s:.0%} {name:>14}: perplexity {ppl:8.3f}  block sparsity {_block_sparsity(model):.4f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    names = [f"allocated+-{spread:g}" for spread in args.spread]
    print(f"\n(dense perplexity {dense:.2f})\n| average block sparsity | uniform Wanda | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for s in args.sparsity:
        u = results[f"uniform_{s}"]
        cells = [f"{results[f'{n}_{s}']:.2f} ({math.log(results[f'{n}_{s}'] / u):+.3f} nats/token)" for n in names]
        print(f"| {s:.0%} | {u:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
