"""End-to-end decode speed of SmolLM2-135M: dense fp32, dense INT8, Wanda-pruned + `accelerate`.

Greedy decoding at batch 1 (the issue 9 target: pruned with INT8 weights >= 1.3x dense INT8),
with perplexity beside each variant:

* `dense-fp32`   the model as loaded, plain torch.
* `dense-int8`   `pk.quantize(model, DynamicInt8Config())`: torch.ao dynamic INT8 on every Linear
                 (lm_head included), the INT8 baseline to beat.
* `wanda50` / `wanda24`          Wanda 50 % unstructured (per output row) / 2:4, decoder Linears
                 only (embeddings and lm_head dense, as in the paper), finalized, plain torch:
                 the pruned model's perplexity and what sparsity buys without a kernel.
* `wanda50+acc` / `wanda24+acc`  the same weights through `pk.accelerate(..., allow_int8=True)`,
                 which measures per layer the dense, INT8 and sparse kernels and installs the
                 fastest, then fuses sibling Linears (q/k/v, gate/up) into one call where faster.
* `dense-int8+acc`  the dense model through `accelerate` with dense candidates only (torch,
                 oneDNN, dynamic INT8): what fusion and the runtime buy without sparsity, so the
                 pruned variants' gain over it is sparsity's own.

Timing: one process, all variants in memory, timed interleaved (variant order rotated every
repeat) after warm-up; tokens/s = new tokens / median wall time of `generate` (prefill of the
short fixed prompt included), `use_cache=True`, batch 1, `--threads` torch threads. Only the
timing (and `accelerate`, which times candidates) runs under `--lock`, so concurrent timing
runs never overlap; pruning and perplexity run before/after it with `--work-threads`.

Calibration: `--calib` random `--seq-len`-token windows of the Friends transcripts (as
`llm_oneshot.py`); perplexity: the first `--eval-tokens` tokens of the Grimm tales, 512-token
windows. Pruned weights are cached under `out/llm_decode_speed/` (keyed by method and
calibration), so a re-run only times.

    OMP_NUM_THREADS=1 python benchmarks/llm_decode_speed.py --calib 32 --eval-tokens 8192
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import prunekit as pk
from prunekit.measure.heap import retained_memory
from prunekit.zoo.llm import corpus_texts, load_smollm2, perplexity, token_windows

PROMPT = "Once upon a time there lived a king and a queen who had no children, and they"
METHODS = {
    "wanda50": lambda: pk.UnstructuredConfig(sparsity=0.5, criterion="wanda", scope="layer", exclude=["lm_head"]),
    "wanda24": lambda: pk.NMConfig(n=2, m=4, criterion="wanda", exclude=["lm_head"]),
    # opt-in: whole 1x16 blocks (per layer), the granularity the block kernels skip
    "wblock50": lambda: pk.BlockConfig(sparsity=0.5, block=(1, 16), criterion="wanda", exclude=["lm_head"]),
}
VARIANTS = ["dense-fp32", "dense-int8", "dense-int8+acc", "wanda50", "wanda50+acc", "wanda24", "wanda24+acc"]
DENSE_CANDIDATES = ["dense", "onednn", "dense_int8"]
OPTIONAL = ["wblock50", "wblock50+acc"]
CACHE = Path(__file__).resolve().parents[1] / "out" / "llm_decode_speed"


def _set_threads(n: int) -> None:
    torch.set_num_threads(n)
    if "numba" in sys.modules:  # the runtime's kernels, once imported
        numba = sys.modules["numba"]
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def _locked(path: str | None) -> Iterator[None]:
    """Hold an exclusive flock(2) on `path` (the same lock `flock(1)` takes) while timing."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        t0 = time.perf_counter()
        fcntl.flock(f, fcntl.LOCK_EX)
        print(f"timing lock {path} acquired after {time.perf_counter() - t0:.0f} s", flush=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pruned(method: str, tokenizer, args: argparse.Namespace) -> nn.Module:
    """SmolLM2 pruned by `method` (finalized), from the weight cache or pruned now and cached."""
    from llm_oneshot import calibration_batches  # benchmarks/ is on sys.path when a script runs
    from safetensors.torch import load_file, save_file

    model, _ = load_smollm2()
    path = CACHE / f"{method}-calib{args.calib}x{args.seq_len}.safetensors"
    if path.exists():
        state = load_file(path)
        model.load_state_dict(state, strict=False)
        print(f"{method}: pruned weights from {path.relative_to(CACHE.parents[1])}", flush=True)
        return model
    t0 = time.perf_counter()
    pk.prune(model, METHODS[method](), data=calibration_batches(tokenizer, args.calib, args.seq_len))
    pk.finalize(model)
    print(f"{method}: pruned in {time.perf_counter() - t0:.0f} s", flush=True)
    pruned = {k: v.contiguous() for k, v in model.state_dict().items() if ".layers." in k and k.endswith("proj.weight")}
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file(pruned, str(path))
    return model


def _cached_perplexity(name: str, model: nn.Module, eval_ids: torch.Tensor, args: argparse.Namespace) -> float:
    """Perplexity of a float variant, cached in out/ by variant, weights and evaluation setting.

    The float variants' weights are fixed by the cache key (dense, or the cached pruned weights
    of one calibration setting), so their perplexity is measured once; `+acc` variants are
    always measured, as `accelerate`'s choices can differ run to run.
    """
    import json

    weights = "" if name.startswith("dense") else f"-calib{args.calib}x{args.seq_len}"
    key = f"{name}{weights}|grimm:{eval_ids.numel()}|seq{args.seq_len}"
    path = CACHE / "perplexity.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    if key not in cache:
        cache[key] = perplexity(model, eval_ids, args.seq_len)
        fresh = json.loads(path.read_text()) if path.exists() else {}  # another run may have written
        CACHE.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**fresh, key: cache[key]}, indent=1))
    return float(cache[key])


def _decoder_sparsity(model: nn.Module) -> float:
    report = pk.sparsity(model)
    names = [n for n in report.layers if ".layers." in n]
    return sum(report.layers[n] * report.numel[n] for n in names) / max(sum(report.numel[n] for n in names), 1)


def _rel_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """accelerate's output check: max |out - ref| / max |ref|."""
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _accelerate(name: str, model: nn.Module, example: dict, tolerance: float, repeats: int) -> tuple[nn.Module, str]:
    """`accelerate` tuned on one decode step (1 token, batch 1: what every Linear sees while decoding).

    `min_sparsity=0` makes the dense lm_head (a fifth of the Linear weights) a candidate too, so it
    can go to dense INT8 like the baseline's; the decision table is saved beside the weight cache.
    """
    from collections import Counter

    from prunekit.runtime import accelerate

    table = CACHE / f"{name}-accelerate.json"
    CACHE.mkdir(parents=True, exist_ok=True)
    kwargs = {"allow_int8": True, "min_sparsity": 0.0, "table_path": table, "verbose": False,
              "repeats": repeats, "warmup": 1, "tolerance": tolerance}
    if name.startswith("dense"):
        kwargs["candidates"] = DENSE_CANDIDATES
    model = accelerate(model, example, batch_sizes=(1,), **kwargs)
    report = model.prunekit_acceleration
    choices = Counter(d.choice for d in report.layers)
    head = next((d.choice for d in report.layers if d.fqn == "lm_head"), "-")
    fused = sum(bool(d.fused_with) for d in report.layers)
    return model, (f"{dict(choices.most_common())}, lm_head {head}, {fused} layers fused, "
                   f"logits rel. error {report.max_rel_error:.1e} (tol. {report.tolerance:.1e}); "
                   f"table {table.relative_to(CACHE.parents[1])}")


def _generate_fn(model: nn.Module, prompt: torch.Tensor, new_tokens: int, eos: int) -> Callable[[], torch.Tensor]:
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           use_cache=True, pad_token_id=eos, eos_token_id=eos)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gen)

    return run


def _linear_share(model: nn.Module, run: Callable[[], torch.Tensor]) -> float:
    """Share of one `run()`'s wall time spent inside the model's Linear layers (forward hooks).

    Amdahl's bound for any Linear kernel: with share s, layers k times faster give at most
    1 / ((1 - s) + s / k) end to end. "Linear layers" are the outermost modules whose class name
    has "Linear": nn.Linear, torch.ao's dynamic INT8 Linear, and `accelerate`'s replacements (a
    fused group's whole call falls inside its first member's `FusedLinear`).
    """
    layers: list[nn.Module] = []
    names: list[str] = []
    for name, module in model.named_modules():
        if "Linear" in type(module).__name__ and not any(name.startswith(n + ".") for n in names):
            layers.append(module)
            names.append(name)
    spent, starts = [0.0], {}

    def before(module: nn.Module, _args: Any) -> None:
        starts[id(module)] = time.perf_counter()

    def after(module: nn.Module, _args: Any, _out: Any) -> None:
        spent[0] += time.perf_counter() - starts.pop(id(module))

    handles = [h for m in layers for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        t0 = time.perf_counter()
        run()
        total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    return spent[0] / total


def _time(fns: dict[str, Callable[[], torch.Tensor]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Wall seconds per call of each fn: interleaved, order rotated each repeat, after warm-up."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names, times = list(fns), {k: [] for k in fns}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS + OPTIONAL)
    parser.add_argument("--calib", type=int, default=32, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out Grimm tokens for perplexity (0: skip)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads while timing")
    parser.add_argument("--work-threads", type=int, default=1, help="threads for pruning and perplexity")
    parser.add_argument("--lock", default="/tmp/pk-timing.lock", help="flock file held while timing ('' for none)")
    parser.add_argument("--acc-repeats", type=int, default=7, help="accelerate's timed forwards per candidate")
    parser.add_argument("--int8-tolerance", type=float, default=None,
                        help="accelerate's output tolerance (default: 1.5x dense INT8's own logits error)")
    parser.add_argument("--prepare", action="store_true", help="only prune and cache the weights, then exit")
    parser.add_argument("--ppl-only", action="store_true", help="only measure (and cache) float variants' perplexity")
    parser.add_argument("--numba-layer", choices=["workqueue", "omp"], default=None,
                        help="numba's threading layer for the parallel kernels (prunekit's default: omp with a "
                             "bounded spin, a launch ~2 us; workqueue's sleeping workers ~80 us)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also print each variant's share of decode time in Linear layers (Amdahl's bound)")
    args = parser.parse_args()
    if args.numba_layer:  # read when numba first launches a parallel kernel
        os.environ["NUMBA_THREADING_LAYER"] = args.numba_layer
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.work_threads)

    model, tokenizer = load_smollm2()
    prompt = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    models: dict[str, nn.Module] = {}
    for name in args.variants:
        base = name.removesuffix("+acc")
        if base == "dense-fp32":
            models[name] = model
        elif name == "dense-int8":
            models[name] = pk.quantize(model, pk.DynamicInt8Config())
        elif base == "dense-int8":  # accelerated from the float model, like the pruned ones
            models.setdefault("dense-fp32", model)
        elif base not in models:
            models[base] = _pruned(base, tokenizer, args)
            print(f"{base}: decoder sparsity {_decoder_sparsity(models[base]):.3f}", flush=True)
    if args.prepare:
        return

    eval_ids = torch.tensor(tokenizer("\n\n".join(corpus_texts("grimm-tales"))[: 8 * args.eval_tokens + 4096])
                            ["input_ids"])[: args.eval_tokens]
    n_eval = len(token_windows(eval_ids, args.seq_len)) * args.seq_len
    ppl: dict[str, float] = {}
    for name in args.variants:
        if args.eval_tokens and not name.endswith("+acc"):
            ppl[name] = _cached_perplexity(name, models[name], eval_ids, args)
            print(f"{name}: perplexity {ppl[name]:.2f} on {n_eval} tokens", flush=True)
    if args.ppl_only:
        return

    # accelerate checks its logits against the float model's; a whole INT8 LLM drifts more than its
    # default INT8 tolerance, so allow what the dense INT8 baseline itself drifts (x1.5) and let
    # the perplexity column judge quality.
    example = {"input_ids": prompt[:, -1:], "use_cache": False}
    tolerance = args.int8_tolerance
    if tolerance is None:
        with torch.inference_mode():
            ref = model(**example).logits
            int8 = models["dense-int8"] if "dense-int8" in models else pk.quantize(model, pk.DynamicInt8Config())
            tolerance = 1.5 * _rel_error(ref, int8(**example).logits)
    print(f"accelerate INT8 output tolerance: {tolerance:.2e} relative", flush=True)
    notes: dict[str, str] = {}
    with _locked(args.lock):
        _set_threads(args.threads)
        print(f"load before timing: {_uptime()}", flush=True)
        for name in [v for v in args.variants if v.endswith("+acc")]:
            t0 = time.perf_counter()
            try:
                base = name.removesuffix("+acc").replace("dense-int8", "dense-fp32")
                source = copy.deepcopy(models[base])  # keep the float model for comparison
                models[name], notes[name] = _accelerate(name, source, example, tolerance, args.acc_repeats)
                notes[name] += f"; accelerate took {time.perf_counter() - t0:.0f} s"
            except Exception as err:  # a benchmark reports what it could not run, then goes on
                notes[name] = f"not run: {type(err).__name__}: {err}"
                print(f"{name}: {notes[name]}", flush=True)
        _set_threads(args.threads)  # numba is imported by now if accelerate ran
        numba = sys.modules.get("numba")
        try:
            layer = numba.threading_layer() if numba else "-"
        except ValueError:  # no parallel kernel has run yet
            layer = "no pool started"
        print(f"timing threads: torch {torch.get_num_threads()}, numba {numba.get_num_threads() if numba else '-'} "
              f"({layer})", flush=True)
        eos = tokenizer.eos_token_id
        fns = {k: _generate_fn(models[k], prompt, args.new_tokens, eos) for k in args.variants if k in models}
        outputs = {k: fn() for k, fn in fns.items()}
        with retained_memory():  # as prunekit's own measurements: no re-faulting of freed memory
            times = _time(fns, args.repeats, args.warmup)
        shares = {k: statistics.median(_linear_share(models[k], fn) for _ in range(3)) for k, fn in fns.items()
                  } if args.breakdown else {}
        print(f"load after timing:  {_uptime()}", flush=True)
    _set_threads(args.work_threads)

    for name in args.variants:
        if name.endswith("+acc") and name in models and args.eval_tokens:
            ppl[name] = perplexity(models[name], eval_ids, args.seq_len)
            base = name.removesuffix("+acc")
            if base in outputs:  # the INT8 path may change a greedy choice, and every token after it
                same = outputs[name].eq(outputs[base]).float().mean()
                notes[name] += f"; greedy tokens equal to {base}'s: {same:.0%}"

    tps = {k: args.new_tokens / statistics.median(v) for k, v in times.items()}
    spread = {k: (max(v) - min(v)) / statistics.median(v) for k, v in times.items()}
    best = {k: args.new_tokens / min(v) for k, v in times.items()}
    print(f"\nSmolLM2-135M greedy decode, batch 1, prompt {prompt.shape[1]} tokens + {args.new_tokens} new, "
          f"{args.threads} threads, median of {args.repeats} (interleaved, {args.warmup} warm-up); "
          f"calibration {args.calib} x {args.seq_len} Friends tokens; perplexity on {n_eval} Grimm tokens")
    print("| variant | tokens/s | vs dense fp32 | vs dense INT8 | best run | spread | perplexity | note |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.variants:
        if name not in tps:
            print(f"| {name} | - | - | - | - | - | - | {notes.get(name, '')} |")
            continue
        vs = [f"{tps[name] / tps[b]:.2f}x" if b in tps else "-" for b in ("dense-fp32", "dense-int8")]
        p = f"{ppl[name]:.2f}" if name in ppl else "-"
        print(f"| {name} | {tps[name]:.1f} | {vs[0]} | {vs[1]} | {best[name]:.1f} | {spread[name]:.0%} | {p} "
              f"| {notes.get(name, '')} |")
    for name, share in shares.items():
        print(f"{name}: {share:.0%} of decode time inside Linear layers (hooks, median of 3 runs): Linear "
              f"kernels k times faster give at most {1 / (1 - share):.2f}x end to end (k -> inf), "
              f"{1 / ((1 - share) + share / 1.6):.2f}x at k = 1.6 (2:4 INT8's bytes vs dense INT8)")


if __name__ == "__main__":
    main()
