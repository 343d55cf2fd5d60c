"""The validation report rendered: Markdown, plots (PNG) and one self-contained HTML page.

Pure functions of the report's data dict (`report.compare` builds it), so a saved report.json
renders again without the models; `lm_report` shares the page and plot helpers.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from prunekit.core.extras import require
from prunekit.measure.cost import cost_markdown


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
             "| batch | baseline p50 | baseline p99 | pruned p50 | pruned p99 | speedup | speedup 95 % CI | call |",
             "|---|---|---|---|---|---|---|---|"]
    rows += [f"| {r['batch_size']} | {r['baseline_ms_p50']:.3f} | {r['baseline_ms_p99']:.3f} "
             f"| {r['pruned_ms_p50']:.3f} | {r['pruned_ms_p99']:.3f} | {r['speedup']:.2f}x | "
             f"{_interval_text(r.get('speedup_ci95'), '{:.2f}')} | {r.get('speed_call', '-')} |"
             for r in d["latency"]["by_batch"]]
    a = d["accuracy"]
    ci = a.get("top1_ci95")
    noise = "" if ci is None else (
        f" Top-1 95 % CI (Wilson, {d['examples']:,} examples): baseline {_interval_text(ci['baseline'], '{:.2%}')}, "
        f"pruned {_interval_text(ci['pruned'], '{:.2%}')}; paired change "
        f"{_interval_text(a['top1_change']['ci95_points'], '{:+.2f}')} points.")
    rows += ["", "## Accuracy", "", f"Top-{a['top5_k']}: baseline {100 * a['top5']['baseline']:.2f}%, pruned "
             f"{100 * a['top5']['pruned']:.2f}%. Prediction agreement {100 * a['agreement']:.2f}%.{noise}", "",
             "| class | count | baseline | pruned | delta |", "|---|---|---|---|---|"]
    rows += [f"| {r['class']} | {r['count']} | {100 * r['baseline']:.2f}% | {100 * r['pruned']:.2f}% | "
             f"{100 * r['delta']:+.2f} |" for r in a["per_class"]]
    if a.get("segments"):
        rows += ["", "## Accuracy by segment", "", "| segment | count | baseline | pruned | delta | change 95 % CI "
                 "| agreement |", "|---|---|---|---|---|---|---|"]
        rows += [f"| {r['segment']} | {r['count']} | {100 * r['baseline']:.2f}% | {100 * r['pruned']:.2f}% | "
                 f"{100 * r['delta']:+.2f} | {_interval_text(r['change_ci95_points'], '{:+.2f}')} | "
                 f"{100 * r['agreement']:.2f}% |" for r in a["segments"]["rows"]]
    if d.get("cost"):
        rows += ["", "## Serving cost", "", *cost_markdown(d["cost"], env.get("cpu", ""))]
    rows += ["", "## Per-layer sparsity", "", "| layer | sparsity |", "|---|---|"]
    rows += [f"| `{n}` | {100 * s:.2f}% |" for n, s in p["layers"].items()]
    for section in d.get("sections", []):  # extra Markdown a caller (e.g. the demo) attaches
        rows += ["", f"## {section['title']}", "", section["markdown"]]
    return "\n".join(rows) + "\n"


def _interval_text(interval: Sequence[float] | None, fmt: str) -> str:
    return "-" if interval is None else f"{fmt.format(interval[0])} to {fmt.format(interval[1])}"


def figure_png(draw: Any, size: tuple[float, float] = (6.0, 3.4)) -> bytes:
    require("matplotlib", extra="plot", what="report plots").use("Agg")
    plt = require("matplotlib.pyplot", extra="plot", what="report plots")
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
