"""The validation report: a pruned model against its baseline, measured, in one file set.

It follows the field's protocol: accuracy overall, per class (an aggregate can hide a class
that collapsed) and on the low-margin inputs near the decision boundary (they degrade first);
latency measured here, dense and pruned interleaved; memory on disk and at run time; and a
verdict in words for each budget. Written as report.json (stable keys), report.md and one
self-contained report.html.
"""

from __future__ import annotations

import contextlib
import io
import json
import lzma
import os
import platform
import statistics
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
from prunekit.measure.heap import SYSTEM_ALLOCATOR, retained_memory
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
    return {
        "top1": top1,
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

    Returns:
        A `Report`; `report.save(folder)` writes report.json, report.md and report.html.
    """
    base_logits, labels = _logits(baseline, data)
    pruned_logits, _ = _logits(pruned, data)
    acc = _accuracy_block(base_logits, pruned_logits, labels, class_names)

    latency: list[dict[str, Any]] = []
    halves: list[list[float]] = []
    with retained_memory() if retain_memory else contextlib.nullcontext(SYSTEM_ALLOCATOR) as allocator:
        for n in batch_sizes:
            x = _batch_of(data, n)
            res = measure_latency({"baseline": baseline, "pruned": pruned}, x, repeats=repeats, warmup=warmup,
                                  retain_memory=retain_memory)
            b, p = res["baseline"], res["pruned"]
            halves.append(_speedup_halves(b.times_ms, p.times_ms))
            latency.append({"batch_size": n, "baseline_ms_p50": b.latency_ms_p50, "baseline_ms_p99": b.latency_ms_p99,
                            "pruned_ms_p50": p.latency_ms_p50, "pruned_ms_p99": p.latency_ms_p99,
                            "speedup": b.latency_ms_p50 / p.latency_ms_p50, "speedup_halves": halves[-1],
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
                    "halves_spread": max((abs(h[1] / h[0] - 1) for h in halves if h), default=None)},
        "curve": list(curve or []),
    }
    data_out["verdicts"] = verdicts(data_out)
    return Report(data_out)


def _speedup_halves(base: Sequence[float], pruned: Sequence[float]) -> list[float]:
    """Speed-up (median over median) in the first and in the second half of the timed calls.

    How far the two halves disagree is the run's own estimate of how reproducible its ratios
    are: load that drifts within a run drifts between runs too.
    """
    half = min(len(base), len(pruned)) // 2
    if half < 3:
        return []
    first = statistics.median(base[:half]) / statistics.median(pruned[:half])
    second = statistics.median(base[half:]) / statistics.median(pruned[half:])
    return [first, second]


def verdicts(d: dict[str, Any]) -> list[str]:
    """One sentence per budget: met or not, by how much, and why when it is not."""
    b, p = d["baseline"], d["pruned"]
    drop = 100 * (b["accuracy"] - p["accuracy"])
    out = [f"accuracy within 1 point: {'yes' if drop <= 1.0 else 'no'} ({-drop:+.2f} points, "
           f"{100 * p['accuracy']:.2f}% vs {100 * b['accuracy']:.2f}%)"]
    disk = b["size_bytes"] / p["size_bytes"]
    out.append(f"smaller on disk: {'yes' if disk > 1.05 else 'no'} ({disk:.1f}x, "
               f"{p['size_bytes']:,} B vs {b['size_bytes']:,} B)")
    flops = b["flops"] / max(p["flops"], 1)
    line = f"fewer dense FLOPs: {'yes' if flops > 1.05 else 'no'} ({flops:.2f}x)"
    if flops <= 1.05 and p["nonzero_params"] < 0.9 * b["nonzero_params"]:
        line += f"; the pruned model holds {b['nonzero_params'] / max(p['nonzero_params'], 1):.1f}x fewer non-zeros"
    out.append(line)
    for row in d["latency"]["by_batch"]:
        s = row["speedup"]
        line = f"faster at batch {row['batch_size']}: {'yes' if s > 1.05 else 'no'} ({s:.2f}x)"
        if s <= 1.05 and p["params"] == b["params"]:
            line += ": unstructured sparsity needs a sparse runtime here (the dense kernels still multiply zeros)"
        elif s <= 1.05:
            line += ": the smaller layers do not run faster at this batch size on this machine"
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
    return out


# --------------------------------------------------------------------------------------------
# Rendering.


def render_markdown(d: dict[str, Any]) -> str:
    """The report as Markdown."""
    b, p, env = d["baseline"], d["pruned"], d["environment"]
    rows = [f"# {d['title']}", "", f"{env['cpu']}, {env['threads']} threads, torch {env['torch']}, "
            f"prunekit {env['prunekit']}, seed {env['seed']}. {d['examples']} evaluation examples.", "",
            "## Verdicts", "", *[f"- {v}" for v in d["verdicts"]], "",
            "## Summary", "", "| | baseline | pruned | ratio |", "|---|---|---|---|"]
    for key in ("accuracy", "params", "nonzero_params", "flops", "size_bytes", "size_bytes_lzma", "weights_bytes",
                "peak_activation_bytes_batch1", "peak_activation_bytes_batch32"):
        bv, pv = b[key], p[key]
        fmt = (lambda v: f"{100 * v:.2f}%") if key == "accuracy" else (lambda v: f"{v:,}")
        rows.append(f"| {key} | {fmt(bv)} | {fmt(pv)} | {pv / bv if bv else float('nan'):.3f} |")
    rows += ["", f"Pruned sparsity: {100 * p['sparsity']:.2f}%.", "", "## Latency (ms, interleaved, "
             f"{d['latency']['repeats']} repeats after {d['latency']['warmup']} warm-up)", "",
             f"Allocator while timing: {d['latency'].get('allocator', 'not recorded')}.", "",
             "| batch | baseline p50 | baseline p99 | pruned p50 | pruned p99 | speedup |", "|---|---|---|---|---|---|"]
    rows += [f"| {r['batch_size']} | {r['baseline_ms_p50']:.3f} | {r['baseline_ms_p99']:.3f} "
             f"| {r['pruned_ms_p50']:.3f} | {r['pruned_ms_p99']:.3f} | {r['speedup']:.2f}x |"
             for r in d["latency"]["by_batch"]]
    a = d["accuracy"]
    rows += ["", "## Accuracy", "", f"Top-{a['top5_k']}: baseline {100 * a['top5']['baseline']:.2f}%, pruned "
             f"{100 * a['top5']['pruned']:.2f}%. Prediction agreement {100 * a['agreement']:.2f}%.", "",
             "| class | count | baseline | pruned | delta |", "|---|---|---|---|---|"]
    rows += [f"| {r['class']} | {r['count']} | {100 * r['baseline']:.2f}% | {100 * r['pruned']:.2f}% | "
             f"{100 * r['delta']:+.2f} |" for r in a["per_class"]]
    rows += ["", "## Per-layer sparsity", "", "| layer | sparsity |", "|---|---|"]
    rows += [f"| `{n}` | {100 * s:.2f}% |" for n, s in p["layers"].items()]
    for section in d.get("sections", []):  # extra Markdown a caller (e.g. the demo) attaches
        rows += ["", f"## {section['title']}", "", section["markdown"]]
    return "\n".join(rows) + "\n"


def figure_png(draw: Any, size: tuple[float, float] = (6.0, 3.4)) -> bytes:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise PrunekitError("report plots need matplotlib: pip install 'prunekit[plot]'") from err
    fig, ax = plt.subplots(figsize=size, dpi=110)
    draw(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def plots(d: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes of each plot the report has data for."""
    out: dict[str, bytes] = {}
    if len(d["curve"]) > 1:
        def draw_curve(ax: Any) -> None:
            series: dict[str, list[dict[str, float]]] = {}
            for point in d["curve"]:
                series.setdefault(str(point.get("series", "pruned")), []).append(point)
            for (name, points), style in zip(series.items(), ("o-", "s--", "^-.", "v:"), strict=False):
                ax.plot([100 * c["sparsity"] for c in points], [100 * c["accuracy"] for c in points], style, label=name)
            ax.axhline(100 * d["baseline"]["accuracy"], color="gray", ls=":", label="baseline")
            ax.set(xlabel="sparsity (%)", ylabel="accuracy (%)", title="Accuracy against sparsity")
            ax.legend(fontsize=8)
        out["accuracy_vs_sparsity"] = figure_png(draw_curve)
    layers = d["pruned"]["layers"]

    def draw_layers(ax: Any) -> None:
        ax.barh(list(layers)[::-1], [100 * s for s in list(layers.values())[::-1]], color="tab:orange")
        ax.set(xlabel="sparsity (%)", title="Per-layer sparsity", xlim=(0, 100))
    out["layer_sparsity"] = figure_png(draw_layers, (6.0, 0.6 + 0.28 * len(layers)))

    def draw_latency(ax: Any) -> None:
        rows = d["latency"]["by_batch"]
        xs = [str(r["batch_size"]) for r in rows]
        ax.plot(xs, [r["baseline_ms_p50"] for r in rows], "o-", label="baseline p50")
        ax.plot(xs, [r["pruned_ms_p50"] for r in rows], "s-", label="pruned p50")
        ax.set(xlabel="batch size", ylabel="ms per batch", title="Latency by batch size", yscale="log")
        ax.legend()
    out["latency"] = figure_png(draw_latency)

    def draw_classes(ax: Any) -> None:
        rows = d["accuracy"]["per_class"]
        deltas = [100 * r["delta"] for r in rows]
        ax.bar([r["class"] for r in rows], deltas, color=["tab:red" if v < 0 else "tab:green" for v in deltas])
        ax.axhline(0, color="black", lw=0.8)
        ax.set(ylabel="pruned - baseline (points)", title="Per-class accuracy change")
    out["per_class_delta"] = figure_png(draw_classes)
    return out


def render_html(d: dict[str, Any], pngs: dict[str, bytes] | None = None) -> str:
    """One self-contained HTML page of a classification report (`compare`): its Markdown
    tables as HTML plus the embedded PNG plots (`pngs`, rendered from `d` when not given)."""
    return markdown_html(d["title"], render_markdown(d), plots(d) if pngs is None else pngs)


def markdown_html(title: str, markdown: str, pngs: dict[str, bytes]) -> str:
    """One self-contained HTML page: the report's Markdown (headings, lists, tables, text) as
    HTML, then the PNG plots embedded."""
    import base64
    import html

    images = "".join(
        f'<figure><img id="plot-{name}" alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"></figure>'
        for name, png in pngs.items()
    )
    body: list[str] = []
    header = False
    for line in markdown.splitlines():
        if line.startswith("|---"):
            continue
        is_row = line.startswith("|")
        if is_row and (not body or not body[-1].startswith(("<table>", "<tr>"))):
            body.append("<table>")
            header = True
        elif not is_row and body and body[-1].startswith("<tr>"):
            body.append("</table>")
        if line.startswith("- ") and not (body and body[-1].startswith(("<ul>", "<li>"))):
            body.append("<ul>")
        elif not line.startswith("- ") and body and body[-1].startswith("<li>"):
            body.append("</ul>")
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif is_row:
            tag = "th" if header else "td"
            cells = "".join(f"<{tag}>{html.escape(c.strip().strip('`'))}</{tag}>" for c in line.strip("|").split("|"))
            body.append(f"<tr>{cells}</tr>")
            header = False
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if body and body[-1].startswith("<tr>"):
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}table{border-collapse:collapse}"
             "td,th{border:1px solid #ddd;padding:2px 8px;text-align:right}th{background:#f4f4f4}"
             "figure{display:inline-block;margin:4px}img{max-width:470px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}<h2>Plots</h2>{images}</body></html>")


def write_report(report: Report, out: str | Path) -> Path:
    """Write report.json, report.md, report.html and the plots as PNG into `out` (`Report.save`)."""
    return report.save(out)
