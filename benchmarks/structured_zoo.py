"""The structured-pruning family zoo beside Torch-Pruning 1.6.1: planning time and params removed.

For each family of `tests/structured/test_zoo.py` (tiny random weights) and for SmolLM2-135M:
- prunekit: `prunekit.plan(model, ChannelConfig(ratio=0.3), x)`, median of 3 after a warm-up,
  params removed, and whether the applied plan matches the zeroed dense model (or the named
  refusal it raised);
- Torch-Pruning, run as its README and examples show: `tp.pruner.MagnitudePruner` with
  `MagnitudeImportance(p=1)`, `pruning_ratio=0.3`, the output layer ignored, and for
  transformers `num_heads` per q/k/v projection with `prune_num_heads=True`,
  `prune_head_dims=False`, `head_pruning_ratio=0.3`, then the examples' attribute fix-ups.
  Timed from building the pruner to the end of `step()` (its plan and apply), median of 3 after
  a warm-up. Recorded: params removed, whether the pruned model runs, whether it matches the
  dense model with the removed slices zeroed, and any raw exception (type + first line).

Torch-Pruning is not a dependency; install it aside, without touching torch:
    pip install --no-deps --target /tmp/tp torch-pruning==1.6.1
    PYTHONPATH=/tmp/tp nice -n 10 python benchmarks/structured_zoo.py [--families a,b] [--no-smollm2]
Prints a markdown table and writes out/structured_zoo.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import signal
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import prunekit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.structured.helpers import run, zeroed_copy  # noqa: E402
from tests.structured.test_zoo import FAMILIES  # noqa: E402

RATIO = 0.3
OUT = Path("out/structured_zoo.json")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:160] if text else ''}"


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread after `seconds` (Torch-Pruning can loop for ever)."""

    def _raise(signum: int, frame: Any) -> None:
        raise TimeoutError(f"no result after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _where(err: BaseException) -> str:
    """The innermost frame of `err` as file:line in function (where a timeout struck)."""
    frame = [f for f in traceback.extract_tb(err.__traceback__) if f.name != "_raise"][-1]
    return f" (in {Path(frame.filename).name}:{frame.lineno} {frame.name})"


def _median_seconds(fn: Callable[[], Any], repeats: int = 3) -> tuple[float, Any]:
    """Median wall seconds of `fn()` over `repeats` calls after one warm-up; the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _close(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"no: output shape {tuple(a.shape)} != {tuple(b.shape)}"
    diff = float((a - b).abs().max())
    return "yes" if diff <= 1e-4 + 1e-4 * float(b.abs().max()) else f"no: max diff {diff:.2e}"


# --------------------------------------------------------------------------------------------
# prunekit.


def prunekit_row(model: nn.Module, x: Any, config: Any, check: bool = True) -> dict[str, Any]:
    """Plan timing, params removed, equivalence with the zeroed dense model (or the named error)."""
    row: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            row["plan_s"], plan = _median_seconds(lambda: prunekit.plan(model, config, x))
        except prunekit.PrunekitError as err:
            return {"outcome": f"refused: {_first_line(err)}"}
        except Exception as err:  # a raw exception is a bug: record it, keep going
            return {"outcome": f"RAW EXCEPTION {_first_line(err)}"}
    before, after = plan.stats["params_before"], plan.stats["params_after"]
    row |= {"params": before, "removed": before - after, "removed_pct": round(100 * (before - after) / before, 1)}
    if check:
        pruned = plan.apply(copy.deepcopy(model)).eval()
        v = {k for k in plan.keep if k.endswith("weight.original1") and k.removesuffix("1") + "0" in plan.keep}
        reference = copy.copy(plan)
        reference.keep = {k: d for k, d in plan.keep.items() if k not in v}  # weight_norm: zero g, not v
        row["equivalent"] = _close(run(pruned, x), run(zeroed_copy(model, reference), x))
    row["outcome"] = "pruned" if after < before else "no-op"
    return row


# --------------------------------------------------------------------------------------------
# Torch-Pruning, the way its README and examples/transformers, examples/LLMs use it.


def _attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """q/k/v Linear -> head count, for every attention module with separate projections."""
    heads: dict[nn.Module, int] = {}
    for m in model.modules():
        names = next((n for n in (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"))
                      if all(isinstance(getattr(m, a, None), nn.Linear) for a in n)), None)
        if names is None:
            continue
        q, k, v = (getattr(m, a) for a in names)
        dim = next((getattr(m, a) for a in ("head_dim", "attention_head_size", "key_value_proj_dim")
                    if isinstance(getattr(m, a, None), int)), None)
        if dim is None:
            continue
        heads[q], heads[k], heads[v] = q.out_features // dim, k.out_features // dim, v.out_features // dim
    return heads


def _fix_attention_attributes(model: nn.Module) -> None:
    """What TP's examples do after pruning: head counts and sizes from the pruned projections."""
    for m in model.modules():
        q = next((getattr(m, a) for a in ("q_proj", "query", "q") if isinstance(getattr(m, a, None), nn.Linear)), None)
        dim = next((getattr(m, a) for a in ("head_dim", "attention_head_size", "key_value_proj_dim")
                    if isinstance(getattr(m, a, None), int)), None)
        if q is None or dim is None:
            continue
        for attr in ("num_heads", "num_attention_heads", "n_heads"):
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, q.out_features // dim)
        for attr in ("all_head_size", "inner_dim"):
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, q.out_features)


def _output_layers(model: nn.Module) -> list[nn.Module]:
    """The output layer TP's README says to ignore: the LM head, BERT's pooler, else the last Linear/norm."""
    for name in ("lm_head", "pooler"):
        if isinstance(getattr(model, name, None), nn.Module):
            return [getattr(model, name)]
    if hasattr(model, "config"):  # HF base models end in a norm: keep the output width
        norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("LayerNorm")]
        return norms[-1:]
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]


Removed = list[tuple[str, str, list[int]]]


def _tp_prune(model: nn.Module, x: Any) -> tuple[nn.Module, Removed]:
    """Prune `model` in place with Torch-Pruning; the (module name, handler, indices) it removed."""
    import torch_pruning as tp

    heads = _attention_heads(model)
    extra: dict[str, Any] = {}
    if heads:
        extra = {"num_heads": heads, "prune_num_heads": True, "prune_head_dims": False, "head_pruning_ratio": RATIO}
    pruner = tp.pruner.MagnitudePruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=RATIO,
        ignored_layers=_output_layers(model), **extra,
    )
    names = {id(m): n for n, m in model.named_modules()}
    removed: Removed = []
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            target = dep.target.module
            name = "<parameter>" if isinstance(target, nn.Parameter) else names.get(id(target))
            if name is None:  # TP's pseudo-modules for parameter-free ops (ReLU, add, cat, ...)
                continue
            removed.append((name, dep.handler.__name__, [int(getattr(i, "idx", i)) for i in idxs]))
        group.prune()
    _fix_attention_attributes(model)
    return model, removed


_ZEROABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _tp_zeroed(model: nn.Module, removed: Removed) -> nn.Module | str:
    """The dense model with what TP removed zeroed, or why zeroing cannot stand in for removal."""
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    with torch.no_grad():
        for name, handler, idxs in removed:
            if name == "<parameter>":
                return "n/a: prunes a bare nn.Parameter"
            twin = modules[name]
            if not idxs or not any(True for _ in twin.parameters(recurse=False)):
                continue
            if not isinstance(twin, _ZEROABLE):
                return f"n/a: prunes {type(twin).__name__} width"
            ids = torch.tensor(idxs)
            if "out" in handler:
                twin.weight.index_fill_(0, ids, 0.0)
                if twin.bias is not None:
                    twin.bias.index_fill_(0, ids, 0.0)
            elif twin.weight.dim() > 1 and getattr(twin, "groups", 1) == 1:  # grouped: the producer's zeros do
                twin.weight.index_fill_(1, ids, 0.0)
    return out


def torch_pruning_row(model: nn.Module, x: Any, check: bool = True, limit: float = 60) -> dict[str, Any]:
    """Torch-Pruning's time, params removed, runs?, equivalent?, or its raw exception."""
    copies = [copy.deepcopy(model) for _ in range(4)]  # copying is not timed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with _time_limit(limit):
                seconds, (pruned, removed) = _median_seconds(lambda: _tp_prune(copies.pop(), x))
        except Exception as err:
            return {"runs": "no", "error": _first_line(err) + (_where(err) if isinstance(err, TimeoutError) else "")}
    before, after = prunekit.count_params(model), prunekit.count_params(pruned)
    row: dict[str, Any] = {"plan_s": seconds, "removed": before - after,
                           "removed_pct": round(100 * (before - after) / before, 1)}
    try:
        out = run(pruned.eval(), x)
    except Exception as err:
        return row | {"runs": "no", "error": _first_line(err)}
    row["runs"] = "yes"
    if check:
        reference = _tp_zeroed(model, removed)
        row["equivalent"] = reference if isinstance(reference, str) else _close(out, run(reference.eval(), x))
    return row


# --------------------------------------------------------------------------------------------
# Driver.


def _smollm2() -> tuple[nn.Module, Any]:
    from prunekit.zoo.llm import load_smollm2

    model, _ = load_smollm2()
    model.config.use_cache = False  # a DynamicCache in the output stops Torch-Pruning's tracer
    return model.eval(), {"input_ids": torch.randint(0, 40000, (1, 16))}


def _table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| family | prunekit plan ms | prunekit removed | prunekit outcome | TP ms | TP removed | TP runs "
        "| TP equivalent |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        pk, tp = r["prunekit"], r["torch_pruning"]
        pk_removed = f"{pk['removed']:,} ({pk['removed_pct']}%)" if "removed" in pk else "-"
        tp_removed = f"{tp['removed']:,} ({tp['removed_pct']}%)" if "removed" in tp else "-"
        outcome = pk["outcome"] + (f", equivalent {pk['equivalent']}" if "equivalent" in pk else "")
        tp_eq = tp.get("equivalent", tp.get("error", "-"))
        pk_ms, tp_ms = (f"{1e3 * d['plan_s']:.0f}" if "plan_s" in d else "-" for d in (pk, tp))
        lines.append(f"| {name} | {pk_ms} | {pk_removed} | {outcome} | {tp_ms} | {tp_removed} | "
                     f"{tp.get('runs', '-')} | {tp_eq} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--no-smollm2", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tp-limit", type=float, default=60, help="seconds before a Torch-Pruning run is abandoned")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    builders: dict[str, tuple[Callable[[], tuple[nn.Module, Any]], Callable[[], Any], bool]] = {
        name: (FAMILIES[name].build, FAMILIES[name].config, True) for name in args.families.split(",")
    }
    if not args.no_smollm2:
        builders["smollm2_135m"] = (_smollm2, lambda: prunekit.ChannelConfig(ratio=RATIO), False)
    rows: dict[str, dict[str, Any]] = {}
    for name, (build, config, check) in builders.items():
        torch.manual_seed(0)
        model, x = build()
        model.eval()
        rows[name] = {"prunekit": prunekit_row(model, x, config(), check),
                      "torch_pruning": torch_pruning_row(model, x, check, args.tp_limit)}
        print(name, json.dumps(rows[name]), flush=True)
    print(_table(rows))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"ratio": RATIO, "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
