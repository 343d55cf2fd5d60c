"""The validation report of a causal language model: perplexity where classification has accuracy.

The same protocol as `compare`, in a language model's terms: perplexity on held-out text
overall and per document segment (an average can hide a genre that collapsed), on the
hardest decile of tokens (the baseline's highest-loss 10 %: the analogue of the inputs near
the decision boundary, which degrade first), tokens per second for prefill and decode at
batch 1 (baseline and pruned interleaved), and sizes on disk and in memory.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.core.masks import sparsity
from prunekit.errors import ConfigError
from prunekit.measure.bench import count_params, measure_latency
from prunekit.measure.noise import bootstrap_interval, speed_call, speed_words, speedup_halves, speedup_interval
from prunekit.measure.report import (
    REPORT_VERSION,
    Report,
    disk_sizes,
    environment,
    peak_activation_bytes,
    weights_bytes,
)
from prunekit.measure.report_render import figure_png
from prunekit.zoo.llm import token_losses

HARD_QUANTILE = 0.1  # the baseline's highest-loss decile of tokens
PRECISIONS = ("fp32", "bf16")


def scoring_context(precision: str) -> contextlib.AbstractContextManager[Any]:
    """The context perplexity is scored under: bf16 autocast on the CPU, or nothing for fp32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def as_segments(text: Tensor | Mapping[str, Tensor], seq_len: int) -> dict[str, Tensor]:
    """Held-out token ids as named 1-D segments, each at least one window long.

    Raises:
        ConfigError: a segment is not integer ids, or shorter than `seq_len` tokens.
    """
    segments = dict(text) if isinstance(text, Mapping) else {"all": text}
    out = {}
    for name, ids in segments.items():
        if not isinstance(ids, Tensor) or ids.is_floating_point():
            raise ConfigError(f"eval text segment {name!r}: expected a tensor of token ids, got "
                              f"{getattr(ids, 'dtype', type(ids).__name__)}")
        ids = ids.reshape(-1)
        if ids.numel() < seq_len:
            raise ConfigError(f"eval text segment {name!r} has {ids.numel()} tokens, shorter than one window of "
                              f"{seq_len}: give more held-out text or a smaller report seq_len")
        out[name] = ids
    return out


class _Decode(nn.Module):
    """Prefill a prompt, then greedily decode `steps` tokens with the KV cache (what a chat turn does)."""

    def __init__(self, model: nn.Module, steps: int) -> None:
        super().__init__()
        self.model, self.steps = model, steps

    def forward(self, input_ids: Tensor) -> Tensor:
        out = self.model(input_ids=input_ids, use_cache=True)
        for _ in range(self.steps):
            token = out.logits[:, -1:].argmax(-1)
            if "cache" in out:  # transformers >= 5.25 names the KV cache `cache`
                out = self.model(input_ids=token, cache=out["cache"], use_cache=True)
            else:
                out = self.model(input_ids=token, past_key_values=out["past_key_values"], use_cache=True)
        return out.logits


def generation_speed(baseline: nn.Module, pruned: nn.Module, prompt: Tensor, *, decode_tokens: int = 16,
                     repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Prefill and decode tokens/s at batch 1, baseline and pruned interleaved (medians).

    Decode time per token is (prefill + `decode_tokens` steps - prefill) / `decode_tokens`.
    Each phase's speed-up (pruned tokens/s over baseline tokens/s) gets a 95 % paired-bootstrap
    interval (`prunekit.measure.report.bootstrap_interval`) and a call: faster, slower, no
    measurable difference, or undetermined with fewer than 5 timed calls.
    """
    models = {"baseline": baseline, "pruned": pruned}
    prefill = measure_latency(models, {"input_ids": prompt, "use_cache": True}, repeats=repeats, warmup=warmup)
    both = measure_latency({k: _Decode(m, decode_tokens) for k, m in models.items()}, prompt,
                           repeats=repeats, warmup=warmup)
    out: dict[str, Any] = {"prompt_tokens": prompt.numel(), "decode_tokens": decode_tokens, "repeats": repeats}
    for name in models:
        pre = prefill[name].latency_ms_p50
        step = max(both[name].latency_ms_p50 - pre, 1e-6) / decode_tokens
        out[name] = {"prefill_ms": pre, "prefill_tokens_per_s": 1000 * prompt.numel() / pre,
                     "decode_ms_per_token": step, "decode_tokens_per_s": 1000 / step}
    pre_b, pre_p = prefill["baseline"].times_ms, prefill["pruned"].times_ms
    dec_b, dec_p = both["baseline"].times_ms, both["pruned"].times_ms
    intervals = {"prefill": speedup_interval(pre_b, pre_p),
                 "decode": bootstrap_interval([pre_b, pre_p, dec_b, dec_p],
                                              lambda m: (m[2] - m[0]).clamp_min(1e-6) / (m[3] - m[1]).clamp_min(1e-6))}
    halves = {"prefill": speedup_halves(pre_b, pre_p), "decode": _decode_halves(pre_b, pre_p, dec_b, dec_p)}
    out["halves_spread"] = max((abs(h[1] / h[0] - 1) for h in halves.values() if h), default=None)
    for phase, interval in intervals.items():
        out[f"{phase}_speedup_ci95"] = interval
        out[f"{phase}_speedup_halves"] = halves[phase]
        out[f"{phase}_speed_call"] = speed_call(interval, halves[phase], out["halves_spread"] or 0.0)
    return out


def _decode_halves(pre_b: Sequence[float], pre_p: Sequence[float], dec_b: Sequence[float],
                   dec_p: Sequence[float]) -> list[float]:
    """The decode speed-up in each half of the timed calls (prefill medians subtracted), as `speedup_halves`."""
    half = min(map(len, (pre_b, pre_p, dec_b, dec_p))) // 2
    if half < 3:
        return []
    cuts = (slice(0, half), slice(half, None))
    step = [[max(statistics.median(d[c]) - statistics.median(q[c]), 1e-6) for c in cuts]
            for q, d in ((pre_b, dec_b), (pre_p, dec_p))]
    return [step[0][0] / step[1][0], step[0][1] / step[1][1]]


def _perplexities(base: Tensor, pruned: Tensor) -> dict[str, float]:
    return {"baseline": math.exp(float(base.mean())), "pruned": math.exp(float(pruned.mean()))}


def compare_lm(
    baseline: nn.Module,
    pruned: nn.Module,
    text: Tensor | Mapping[str, Tensor],
    *,
    seq_len: int = 512,
    prompt_tokens: int = 128,
    decode_tokens: int = 16,
    repeats: int = 5,
    precision: str = "fp32",
    seed: int | None = None,
    title: str = "prunekit validation report (language model)",
) -> Report:
    """Measure a pruned causal LM against its baseline on held-out token ids; neither is changed.

    Args:
        baseline, pruned: Hugging Face-style causal LMs (`model(input_ids=...).logits`).
        text: 1-D token ids, or segment name -> ids (e.g. one per document genre).
        seq_len: evaluation window; every segment must hold at least one.
        prompt_tokens, decode_tokens: the prompt length and generated tokens of the speed test.
        repeats: timed calls per model (after one warm-up), interleaved.
        precision: "fp32", or "bf16" to score perplexity under bf16 autocast (about twice as fast on
            CPUs with bf16 instructions, within ~0.1 % of fp32 on SmolLM2). Speed is timed as the models are.

    Raises:
        ConfigError: a segment is shorter than one window, or is not token ids; an unknown precision.
    """
    segments = as_segments(text, seq_len)
    scoring = scoring_context(precision)
    baseline.eval(), pruned.eval()
    with scoring:
        losses = {name: (token_losses(baseline, ids, seq_len), token_losses(pruned, ids, seq_len))
                  for name, ids in segments.items()}
    base_all = torch.cat([b for b, _ in losses.values()])
    pruned_all = torch.cat([p for _, p in losses.values()])
    hard = base_all >= torch.quantile(base_all.float(), 1 - HARD_QUANTILE).double()
    prompt = next(iter(segments.values()))[: min(prompt_tokens, seq_len)].unsqueeze(0)
    with tempfile.TemporaryDirectory() as tmp:
        disk = {n: disk_sizes(m, Path(tmp), n) for n, m in (("baseline", baseline), ("pruned", pruned))}
    stats = {name: {"params": count_params(m), "nonzero_params": count_params(m, nonzero=True), **disk[name],
                    "weights_bytes": weights_bytes(m), "peak_activation_bytes_prompt": peak_activation_bytes(m, prompt)}
             for name, m in (("baseline", baseline), ("pruned", pruned))}
    data: dict[str, Any] = {
        "report_version": REPORT_VERSION, "kind": "causal-lm", "title": title, "environment": environment(seed),
        "tokens": int(base_all.numel()), "seq_len": seq_len, "precision": precision,
        "baseline": stats["baseline"], "pruned": {**stats["pruned"], "sparsity": sparsity(pruned).total},
        "perplexity": {**_perplexities(base_all, pruned_all),
                       "segments": [{"segment": n, "tokens": int(b.numel()), **_perplexities(b, p)}
                                    for n, (b, p) in losses.items()],
                       "hardest": {"quantile": HARD_QUANTILE, "tokens": int(hard.sum()),
                                   **_perplexities(base_all[hard], pruned_all[hard])}},
        "speed": generation_speed(baseline, pruned, prompt, decode_tokens=decode_tokens, repeats=repeats),
    }
    data["verdicts"] = lm_verdicts(data)
    return LMReport(data)


def lm_verdicts(d: dict[str, Any]) -> list[str]:
    """One sentence per budget, in perplexity: met or not, and by how much."""
    ppl, b, p, speed = d["perplexity"], d["baseline"], d["pruned"], d["speed"]
    rise = ppl["pruned"] / ppl["baseline"] - 1
    out = [f"perplexity within 10 %: {'yes' if rise <= 0.10 else 'no'} ({ppl['pruned']:.2f} vs "
           f"{ppl['baseline']:.2f}, {rise:+.1%})"]
    worst = max(ppl["segments"], key=lambda s: s["pruned"] / s["baseline"])
    if len(ppl["segments"]) > 1:
        out.append(f"segment that suffered most: {worst['segment']} ({worst['pruned']:.2f} vs {worst['baseline']:.2f})")
    h = ppl["hardest"]
    out.append(f"on the hardest {h['quantile']:.0%} of tokens (the baseline's highest loss): perplexity "
               f"{h['pruned']:.1f} vs {h['baseline']:.1f} ({h['pruned'] / h['baseline'] - 1:+.1%})")
    disk = b["size_bytes"] / p["size_bytes"]
    out.append(f"smaller on disk: {'yes' if disk > 1.05 else 'no'} ({disk:.2f}x, {p['size_bytes']:,} B vs "
               f"{b['size_bytes']:,} B)")
    for phase, key in (("prefill", "prefill_tokens_per_s"), ("decode", "decode_tokens_per_s")):
        s = speed["pruned"][key] / speed["baseline"][key]
        line = speed_words(f"faster {phase} at batch 1", s, speed.get(f"{phase}_speedup_ci95"),
                           speed.get(f"{phase}_speedup_halves", []), speed["repeats"],
                           speed.get("halves_spread") or 0.0)
        line += f" [{speed['pruned'][key]:.1f} vs {speed['baseline'][key]:.1f} tokens/s]"
        if speed.get(f"{phase}_speed_call") != "faster" and p["params"] == b["params"]:
            line += ": unstructured sparsity needs a sparse runtime here (the dense kernels still multiply zeros)"
        out.append(line)
    return out


class LMReport(Report):
    """A `Report` whose data came from `compare_lm`: rendered in perplexity."""

    def markdown(self) -> str:
        """The report as Markdown."""
        d = self.data
        b, p, env, ppl, speed = d["baseline"], d["pruned"], d["environment"], d["perplexity"], d["speed"]
        rows = [f"# {d['title']}", "", f"{env['cpu']}, {env['threads']} threads, torch {env['torch']}, "
                f"prunekit {env['prunekit']}, seed {env['seed']}. {d['tokens']:,} held-out tokens in windows of "
                f"{d['seq_len']}, scored in {d.get('precision', 'fp32')}.", "", "## Verdicts", "",
                *[f"- {v}" for v in d["verdicts"]], "",
                "## Summary", "", "| | baseline | pruned | ratio |", "|---|---|---|---|",
                f"| perplexity | {ppl['baseline']:.3f} | {ppl['pruned']:.3f} | {ppl['pruned'] / ppl['baseline']:.3f} |"]
        for key in ("params", "nonzero_params", "size_bytes", "size_bytes_lzma", "weights_bytes",
                    "peak_activation_bytes_prompt"):
            rows.append(f"| {key} | {b[key]:,} | {p[key]:,} | {p[key] / b[key] if b[key] else float('nan'):.3f} |")
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            bv, pv = speed["baseline"][key], speed["pruned"][key]
            rows.append(f"| {key} | {bv:.1f} | {pv:.1f} | {pv / bv:.3f} |")
        rows += ["", f"Pruned sparsity: {100 * p['sparsity']:.2f}%. Speed: a {speed['prompt_tokens']}-token prompt "
                 f"and {speed['decode_tokens']} greedy tokens, median of {speed['repeats']} interleaved runs.", "",
                 "## Perplexity by segment", "", "| segment | tokens | baseline | pruned | ratio |",
                 "|---|---|---|---|---|"]
        rows += [f"| {s['segment']} | {s['tokens']:,} | {s['baseline']:.3f} | {s['pruned']:.3f} | "
                 f"{s['pruned'] / s['baseline']:.3f} |" for s in ppl["segments"]]
        h = ppl["hardest"]
        rows += [f"| hardest {h['quantile']:.0%} of tokens | {h['tokens']:,} | {h['baseline']:.3f} | "
                 f"{h['pruned']:.3f} | {h['pruned'] / h['baseline']:.3f} |"]
        for section in d.get("sections", []):
            rows += ["", f"## {section['title']}", "", section["markdown"]]
        return "\n".join(rows) + "\n"

    def plots(self) -> dict[str, bytes]:
        """Perplexity per segment (and the hardest decile), baseline beside pruned."""
        ppl = self.data["perplexity"]
        rows = [*ppl["segments"], {**ppl["hardest"], "segment": "hardest 10 %"}]

        def draw(ax: Any) -> None:
            xs = range(len(rows))
            ax.bar([x - 0.2 for x in xs], [r["baseline"] for r in rows], 0.4, label="baseline")
            ax.bar([x + 0.2 for x in xs], [r["pruned"] for r in rows], 0.4, label="pruned")
            ax.set_xticks(list(xs), [r["segment"] for r in rows], rotation=20, fontsize=8)
            ax.set(ylabel="perplexity", yscale="log", title="Perplexity by segment")
            ax.legend()
        return {"perplexity_by_segment": figure_png(draw)}

