"""The validation report: a pruned model against its baseline, measured, in one file set.

It follows the field's protocol: accuracy overall, per class (an aggregate can hide a class
that collapsed) and on the low-margin inputs near the decision boundary (they degrade first);
latency measured here, dense and pruned interleaved; memory on disk and at run time; and a
verdict in words for each budget. Written as report.json (stable keys), report.md and one
self-contained report.html.
"""

from __future__ import annotations

import contextlib
import json
import lzma
import os
import platform
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version as _installed_version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.core.masks import sparsity
from prunekit.deploy.checkpoint import save
from prunekit.errors import PrunekitError
from prunekit.measure.bench import count_flops, count_params, measure_latency
from prunekit.measure.cost import CostQuery, check_batch, cost_block, cost_verdict
from prunekit.measure.heap import SYSTEM_ALLOCATOR, retained_memory
from prunekit.measure.noise import (
    BOOTSTRAP_RESAMPLES,
    MIN_TIMED_CALLS,
    paired_change,
    speed_call,
    speed_words,
    speedup_halves,
    speedup_interval,
    wilson_interval,
)
from prunekit.measure.report_render import markdown_html, plots, render_markdown
from prunekit.measure.segments import Segments, segment_block, segment_names
from prunekit.storage.files import atomic_write_bytes, atomic_write_text

REPORT_VERSION = 1
LOW_MARGIN_QUANTILE = 0.1  # the baseline's least confident decile


@dataclass
class Report:
    """Everything `compare` measured, as plain data (`data`), renderable as JSON/Markdown/HTML."""

    data: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        """The report as Markdown."""
        return render_markdown(self.data)

    def plots(self) -> dict[str, bytes]:
        """PNG bytes of each plot the report has data for."""
        return plots(self.data)

    def save(self, out: str | Path) -> Path:
        """Write report.json, report.md, report.html and each plot as PNG into `out` (atomically)."""
        out = Path(out)
        images = self.plots()  # rendered once, for the HTML and the PNG files
        markdown = self.markdown()
        atomic_write_text(out / "report.json", json.dumps(self.data, indent=2))
        atomic_write_text(out / "report.md", markdown)
        atomic_write_text(out / "report.html", markdown_html(self.data["title"], markdown, images))
        for name, png in images.items():
            atomic_write_bytes(out / f"{name}.png", png)
        return out

    def summary(self) -> str:
        """The verdicts, one per line."""
        return "\n".join(self.data.get("verdicts", []))

    def __str__(self) -> str:
        return self.summary()


# --------------------------------------------------------------------------------------------
# Measurements.


@torch.no_grad()
def _logits(model: nn.Module, data: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    model.eval()
    outs, labels = [], []
    for x, y in data:
        outs.append(model(x).float())
        labels.append(y)
    if not outs:
        raise PrunekitError("compare: the evaluation data yielded no batches")
    return torch.cat(outs), torch.cat(labels)


def _accuracy_block(base: Tensor, pruned: Tensor, labels: Tensor, class_names: Sequence[str] | None) -> dict[str, Any]:
    classes = base.shape[1]
    k = min(5, classes)
    top1 = {n: float((o.argmax(1) == labels).float().mean()) for n, o in (("baseline", base), ("pruned", pruned))}
    top5 = {n: float((o.topk(k, 1).indices == labels[:, None]).any(1).float().mean())
            for n, o in (("baseline", base), ("pruned", pruned))}
    per_class: list[dict[str, Any]] = []
    for c in range(classes):
        sel = labels == c
        if not sel.any():
            continue
        b, p = float((base[sel].argmax(1) == c).float().mean()), float((pruned[sel].argmax(1) == c).float().mean())
        name = class_names[c] if class_names else str(c)
        per_class.append({"class": name, "count": int(sel.sum()), "baseline": b, "pruned": p, "delta": p - b})
    worst = sorted((r for r in per_class if r["delta"] < 0), key=lambda r: r["delta"])[:3]

    top2 = base.topk(2, 1).values
    margin = top2[:, 0] - top2[:, 1]
    low = margin <= torch.quantile(margin, LOW_MARGIN_QUANTILE)
    agree = pruned.argmax(1) == base.argmax(1)
    correct = {"baseline": base.argmax(1) == labels, "pruned": pruned.argmax(1) == labels}
    return {
        "top1": top1,
        "top1_ci95": {name: wilson_interval(int(c.sum()), c.numel()) for name, c in correct.items()},
        "top1_change": paired_change(correct["baseline"], correct["pruned"]),
        "top5": top5,
        "top5_k": k,
        "agreement": float(agree.float().mean()),
        "per_class": per_class,
        "dropped_most": [r["class"] for r in worst],
        "low_margin": {
            "quantile": LOW_MARGIN_QUANTILE,
            "count": int(low.sum()),
            "baseline": float((base[low].argmax(1) == labels[low]).float().mean()),
            "pruned": float((pruned[low].argmax(1) == labels[low]).float().mean()),
            "agreement": float(agree[low].float().mean()),
        },
    }


def _batch_of(data: Iterable[tuple[Tensor, Tensor]], n: int) -> Tensor:
    xs, have = [], 0
    for x, _ in data:
        xs.append(x)
        have += len(x)
        if have >= n:
            break
    batch = torch.cat(xs)[:n]
    if len(batch) < n:  # small evaluation sets: repeat the examples to fill the batch
        batch = batch.repeat((n + len(batch) - 1) // len(batch), *[1] * (batch.dim() - 1))[:n]
    return batch


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Silence C++ writes to stderr (the profiler's start/stop lines); Python errors still raise."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@torch.no_grad()
def peak_activation_bytes(model: nn.Module, x: Tensor) -> int:
    """Peak bytes allocated during one forward, from the PyTorch profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    model.eval()
    with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers in memory (a tied tensor counted once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


def disk_sizes(model: nn.Module, folder: Path, name: str) -> dict[str, int]:
    """The model saved by `prunekit.save` into `folder`: its size in bytes, and xz-compressed."""
    report = save(model, folder / f"{name}.safetensors")
    compressed = len(lzma.compress(report.path.read_bytes(), preset=6))
    return {"size_bytes": report.size_bytes, "size_bytes_lzma": compressed}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(seed: int | None = None) -> dict[str, Any]:
    """Where the numbers were measured: CPU, threads, versions, seed."""
    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "prunekit": _installed_version("prunekit"),
            "platform": platform.platform(), "seed": seed}


def compare(
    baseline: nn.Module,
    pruned: nn.Module,
    data: Iterable[tuple[Tensor, Tensor]],
    *,
    batch_sizes: Sequence[int] = (1, 4, 8, 32),
    repeats: int = 50,
    warmup: int = 10,
    class_names: Sequence[str] | None = None,
    curve: Sequence[dict[str, Any]] | None = None,
    seed: int | None = None,
    title: str = "prunekit validation report",
    retain_memory: bool = True,
    segments: Segments | None = None,
    cost: CostQuery | None = None,
) -> Report:
    """Measure `pruned` against `baseline` on `(x, y)` batches; neither model is changed.

    Args:
        baseline: the dense reference model.
        pruned: the pruned (masked, finalized or structurally smaller) model.
        data: evaluation batches (a DataLoader); iterated more than once.
        batch_sizes: batch sizes at which latency is measured (inputs cut from `data`).
        repeats, warmup: timed and untimed calls per model and batch size (interleaved).
        class_names: labels for the per-class table (default: class indices).
        curve: optional accuracy-against-sparsity points ({"sparsity", "accuracy"}, optionally
            "series" to draw several lines) to plot.
        seed: recorded in the environment fingerprint.
        retain_memory: time with freed memory kept mapped (see `prunekit.measure.heap`); False
            times glibc's default allocator. The report records which.
        segments: an extra segmentation beside the per-class one: a function of one example's
            input tensor returning its segment name, or the names aligned with `data`'s examples.
            Accuracy and agreement are reported per segment, with the segments that dropped most.
        cost: optional serving-cost projection (`prunekit.measure.cost`): hosts dense vs pruned at
            a target QPS and serving batch size, and the yearly cost, from the latency measured here.

    Returns:
        A `Report`; `report.save(folder)` writes report.json, report.md and report.html. Speed
        verdicts say "faster" only when a 95 % interval of the speed-up (paired bootstrap over
        the interleaved calls, widened to both halves of the run) lies above 1 by more than the
        run's own spread (`halves_spread`).

    Raises:
        PrunekitError: `data` yields no batches.
        ConfigError: `segments` has the wrong length, or its function fails on an example
            (the message names the example's index); `cost.serving_batch` is not in `batch_sizes`
            (checked before anything is measured).
    """
    if cost is not None:
        check_batch(cost, list(batch_sizes))
    base_logits, labels = _logits(baseline, data)
    pruned_logits, _ = _logits(pruned, data)
    acc = _accuracy_block(base_logits, pruned_logits, labels, class_names)
    if segments is not None:
        names = segment_names(segments, data, int(labels.numel()))
        acc["segments"] = segment_block(names, base_logits.argmax(1), pruned_logits.argmax(1), labels)

    latency: list[dict[str, Any]] = []
    halves: list[list[float]] = []
    with retained_memory() if retain_memory else contextlib.nullcontext(SYSTEM_ALLOCATOR) as allocator:
        for n in batch_sizes:
            x = _batch_of(data, n)
            res = measure_latency({"baseline": baseline, "pruned": pruned}, x, repeats=repeats, warmup=warmup,
                                  retain_memory=retain_memory)
            b, p = res["baseline"], res["pruned"]
            halves.append(speedup_halves(b.times_ms, p.times_ms))
            interval = speedup_interval(b.times_ms, p.times_ms)
            latency.append({"batch_size": n, "baseline_ms_p50": b.latency_ms_p50, "baseline_ms_p99": b.latency_ms_p99,
                            "pruned_ms_p50": p.latency_ms_p50, "pruned_ms_p99": p.latency_ms_p99,
                            "speedup": b.latency_ms_p50 / p.latency_ms_p50, "speedup_halves": halves[-1],
                            "speedup_ci95": interval,
                            "timed_calls": min(len(b.times_ms), len(p.times_ms)),
                            "page_faults_per_call": [b.page_faults_per_call, p.page_faults_per_call]})
    example = _batch_of(data, 1)
    with tempfile.TemporaryDirectory() as tmp:
        disk = {n: disk_sizes(m, Path(tmp), n) for n, m in (("baseline", baseline), ("pruned", pruned))}
    models = {"baseline": baseline, "pruned": pruned}
    stats = {
        name: {"params": count_params(m), "nonzero_params": count_params(m, nonzero=True),
               "flops": count_flops(m, example), **disk[name],
               "weights_bytes": weights_bytes(m),
               "peak_activation_bytes_batch1": peak_activation_bytes(m, example),
               "peak_activation_bytes_batch32": peak_activation_bytes(m, _batch_of(data, 32)),
               "accuracy": acc["top1"][name]}
        for name, m in models.items()
    }
    data_out: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "title": title,
        "environment": environment(seed),
        "examples": int(labels.numel()),
        "baseline": stats["baseline"],
        "pruned": {**stats["pruned"], "sparsity": sparsity(pruned).total, "layers": sparsity(pruned).layers},
        "accuracy": acc,
        "latency": {"repeats": repeats, "warmup": warmup, "threads": torch.get_num_threads(),
                    "interleaved": True, "allocator": allocator, "by_batch": latency,
                    "halves_spread": max((abs(h[1] / h[0] - 1) for h in halves if h), default=None),
                    "noise": {"method": "paired percentile bootstrap of the ratio of medians, widened to the "
                              "halves' speed-ups, then past the run's halves_spread", "confidence": 0.95,
                              "resamples": BOOTSTRAP_RESAMPLES, "seed": 0, "min_timed_calls": MIN_TIMED_CALLS}},
        "curve": list(curve or []),
    }
    spread = data_out["latency"]["halves_spread"] or 0.0
    for row in latency:  # called once the run's own spread over all batch sizes is known
        row["speed_call"] = speed_call(row["speedup_ci95"], row["speedup_halves"], spread)
    if cost is not None:
        data_out["cost"] = cost_block(data_out, cost)
    data_out["verdicts"] = verdicts(data_out)
    return Report(data_out)


def with_cost(report: Report | dict[str, Any], query: CostQuery) -> Report:
    """A copy of `report` (a `Report` or its dict, e.g. a loaded report.json) with the cost
    projection for `query` added and the verdicts redone; the input is not changed.

    Raises:
        ConfigError: the report did not time `query.serving_batch` (the message names the ones it did).
    """
    data = dict(report.data if isinstance(report, Report) else report)
    data["cost"] = cost_block(data, query)
    data["verdicts"] = verdicts(data)
    return Report(data)


def verdicts(d: dict[str, Any]) -> list[str]:
    """One sentence per budget: met or not, by how much, and why when it is not."""
    b, p = d["baseline"], d["pruned"]
    out = [_accuracy_words(d)]
    disk = b["size_bytes"] / p["size_bytes"]
    out.append(f"smaller on disk: {'yes' if disk > 1.05 else 'no'} ({disk:.1f}x, "
               f"{p['size_bytes']:,} B vs {b['size_bytes']:,} B)")
    flops = b["flops"] / max(p["flops"], 1)
    line = f"fewer dense FLOPs: {'yes' if flops > 1.05 else 'no'} ({flops:.2f}x)"
    if flops <= 1.05 and p["nonzero_params"] < 0.9 * b["nonzero_params"]:
        line += f"; the pruned model holds {b['nonzero_params'] / max(p['nonzero_params'], 1):.1f}x fewer non-zeros"
    out.append(line)
    for row in d["latency"]["by_batch"]:
        line = speed_words(f"faster at batch {row['batch_size']}", row["speedup"], row.get("speedup_ci95"),
                           row.get("speedup_halves", []), row.get("timed_calls", d["latency"]["repeats"]),
                           d["latency"].get("halves_spread") or 0.0)
        if row.get("speed_call") != "faster" and p["params"] == b["params"]:
            line += ": unstructured sparsity needs a sparse runtime here (the dense kernels still multiply zeros)"
        elif row.get("speed_call") != "faster":
            line += ": the smaller layers do not run measurably faster at this batch size on this machine"
        out.append(line)
    spread = d["latency"].get("halves_spread")
    if spread is not None:
        out.append(f"latency ratios stable within 10 %: {'yes' if spread <= 0.10 else 'no'} (the speed-ups of "
                   f"the two halves of the run differ by up to {spread:.1%}"
                   + ("" if spread <= 0.10 else "; the machine is probably busy: re-run on a quiet one") + ")")
    low = d["accuracy"]["low_margin"]
    out.append(f"near the decision boundary (baseline's least confident {low['quantile']:.0%}): "
               f"{100 * low['pruned']:.1f}% vs {100 * low['baseline']:.1f}%, agreement {100 * low['agreement']:.1f}%")
    if d["accuracy"]["dropped_most"]:
        out.append(f"classes that dropped most: {', '.join(d['accuracy']['dropped_most'])}")
    seg = d["accuracy"].get("segments")
    if seg and seg["dropped_most"]:
        rows = {r["segment"]: r for r in seg["rows"]}
        out.append("segments that dropped most: " + ", ".join(
            f"{n} ({100 * rows[n]['delta']:+.2f} points, {'beyond' if rows[n]['beyond_noise'] else 'within'} noise)"
            for n in seg["dropped_most"]))
    if d.get("cost"):
        out.append(cost_verdict(d["cost"]))
    return out


def _accuracy_words(d: dict[str, Any]) -> str:
    b, p, n = d["baseline"]["accuracy"], d["pruned"]["accuracy"], d["examples"]
    drop = 100 * (b - p)
    line = (f"accuracy within 1 point: {'yes' if drop <= 1.0 else 'no'} ({100 * (p - b):+.2f} points, "
            f"{100 * p:.2f}% vs {100 * b:.2f}%")
    change, ci = d["accuracy"].get("top1_change"), d["accuracy"].get("top1_ci95")
    if change is None or ci is None:
        return line + ")"
    half = max(100 * (hi - lo) / 2 for lo, hi in ci.values())
    lo, hi = change["ci95_points"]
    return (line + f"; each ±{half:.2f} points at 95 % on {n:,} examples; the change is "
            f"{'beyond' if change['beyond_noise'] else 'within'} that noise: paired 95 % CI {lo:+.2f} to {hi:+.2f})")


def write_report(report: Report, out: str | Path) -> Path:
    """Write report.json, report.md, report.html and the plots as PNG into `out` (`Report.save`)."""
    return report.save(out)
