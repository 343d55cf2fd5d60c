"""Honest CPU speed of sparse Linear layers at batch 1 and 8: prunekit's kernels vs the BEST dense one.

Run (final figures): flock /tmp/pk-timing.lock python benchmarks/cpu_sparse_layers.py [--repeats 60]

For each layer (in x out = 768x3072 and 3072x768) and batch (1, 8), every implementation is
timed call by call in turn (interleaved), medians after warm-up, in two regimes:

* DRAM: each implementation rotates through copies of its weights totalling > 256 MB, so every
  call streams its weights from memory, as a real model does (BERT-base's 340 MB of weights do
  not fit the 32 MB L3; a model is in this regime unless all its weights fit in L3).
* cache: one copy, called again and again, so the weights stay in L2/L3 (a micro-benchmark).

Every sparse ratio is against the best dense fp32 implementation in the same regime and batch:
torch `F.linear`, oneDNN (`to_mkldnn`) and onnxruntime's MatMul (a one-node ONNX graph with the
weight as an initializer). INT8 kernels (50 % unstructured, 2:4) are also compared with torch's
dense dynamic INT8 (`torch.ao` quantize_dynamic's Linear, fbgemm). Threads: 2 everywhere.

Many rows (issue 20): `--ffn-stack` times a stack of 16 FFN pairs 768->3072->768 (302 MB of
dense weights: the DRAM regime by itself) at 90 % and 95 % unstructured, batches 1-128, whole
stack per call: best dense (torch F.linear, oneDNN, onnxruntime), torch CSR, and prunekit's
candidates (small-batch CSR, the many-row `numba_spmm_csr`, its weight-only INT8 twin, and the
INT8 x INT8 VNNI kernel `numba_spmm_vnni_int8`, against fbgemm's dense INT8); `--stack-pattern
block1x4` prunes whole 1x4 blocks instead (what the VNNI kernel packs four to an instruction). Each
implementation runs in blocks of `--stack-block` stack passes, implementations alternating block by
block with 50 ms of idling before each (torch's OpenMP workers spin ~8 ms after a call and would
slow whatever ran next), medians over `--repeats` rounds; ratios against the best dense fp32
engine of the same batch.

    python benchmarks/cpu_sparse_layers.py --ffn-stack --skip-layers --repeats 7

The peer: with `--deepsparse-python PYTHON` (a venv with deepsparse==1.8.0, made as
`deepsparse_runner.py` says; never a prunekit dependency) the stack is also saved as ONNX and run
by Neural Magic DeepSparse in that venv's process, alternating with this one `--peer-runs` times;
each run is printed and the ratios use the medians over runs.

    python benchmarks/cpu_sparse_layers.py --ffn-stack --skip-layers --repeats 7 \
        --deepsparse-python ~/.venvs/deepsparse/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _timing import timed_blocks  # benchmarks/ is on sys.path when a script runs
from torch import Tensor

from prunekit.runtime import candidates as cand
from prunekit.runtime import formats

L3_BYTES = 32 << 20
DRAM_BYTES = 256 << 20


def _mask_unstructured(out_f: int, in_f: int, sparsity: float, g: torch.Generator) -> Tensor:
    return torch.rand(out_f, in_f, generator=g) >= sparsity


def _mask_block(out_f: int, in_f: int, sparsity: float, block: tuple[int, int], g: torch.Generator) -> Tensor:
    br, bc = block
    keep = torch.rand(out_f // br, in_f // bc, generator=g) >= sparsity
    return keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)


def _mask_2_4(out_f: int, in_f: int, g: torch.Generator) -> Tensor:
    idx = torch.rand(out_f, in_f // 4, 4, generator=g).argsort(-1)[..., :2]
    return torch.zeros(out_f, in_f // 4, 4, dtype=torch.bool).scatter_(-1, idx, True).reshape(out_f, in_f)


def _ort_linear(weight: Tensor, threads: int, spin: bool) -> Callable[[np.ndarray], object]:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w_t = numpy_helper.from_array(weight.t().contiguous().numpy(), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", weight.shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", weight.shape[0]])],
        [w_t],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if not spin:
        # Each weight copy has its own session and thread pool; idle spinning workers of dozens of
        # pools starve the candidates timed after them (torch F.linear 14.8 ms instead of ~1 ms).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})


def _implementations(
    weight: Tensor, block: tuple[int, int] | None, int8: bool, threads: int, ort_spin: bool = False
) -> dict[str, Callable]:
    """name -> fn(x_tensor) for one weight copy (each builds its own packed weights)."""
    info = cand.LayerInfo("bench", weight, None, block, formats.is_2_4(weight), True)
    names = ["dense", "onednn"]
    if int8:
        names += ["dense_int8", "numba_csr_int8", "numba_csr_int8_1t", "numba_nm24_int8", "numba_nm24_int8_1t",
                  "numba_nm24r_int8_1t"]  # the last only on AVX-512 CPUs
    else:
        names += ["torch_csr", "numba_csr", "numba_csr_1t"]
    if block and not int8:
        names += ["torch_bsr", "numba_bsr", "numba_bsr_1t"]
    fns: dict[str, Callable] = {}
    for name in names:
        module = cand.get_candidate(name)(info)
        if module is not None:
            fns[name] = module
    ort_fn = _ort_linear(weight, threads, ort_spin)
    fns["onnxruntime"] = lambda x, f=ort_fn: f(x.numpy())
    return fns


def _timed(copies: list[dict[str, Callable]], x: Tensor, repeats: int, warmup: int) -> dict[str, float]:
    """Median ms per call of each implementation, interleaved, each rotating through its copies."""
    names = list(copies[0])
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for rep in range(warmup + repeats):
            fns = copies[rep % len(copies)]
            for n in names:
                start = time.perf_counter()
                fns[n](x)
                if rep >= warmup:
                    times[n].append((time.perf_counter() - start) * 1e3)
    return {n: statistics.median(t) for n, t in times.items()}


def _load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run_case(
    case: str, in_f: int, out_f: int, mask: Tensor, block: tuple[int, int] | None, int8: bool, args: argparse.Namespace
) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    dense_bytes = in_f * out_f * 4
    n_copies = -(-DRAM_BYTES // dense_bytes)
    weights = [torch.randn(out_f, in_f, generator=g) * mask for _ in range(n_copies)]
    copies = [_implementations(w, block, int8, args.threads, args.ort_spin) for w in weights]
    rows = []
    for batch in (1, 8):
        x = torch.randn(batch, in_f, generator=g)
        for regime, use in (("dram", copies), ("cache", copies[:1])):
            ms = _timed(use, x, args.repeats, args.warmup)
            best_name = min(("dense", "onednn", "onnxruntime"), key=lambda n: ms[n])
            row = {
                "case": case,
                "in": in_f,
                "out": out_f,
                "batch": batch,
                "regime": regime,
                "copies": len(use),
                "ms": ms,
                "best_dense_fp32": best_name,
                "speedup_vs_best_dense_fp32": {n: ms[best_name] / v for n, v in ms.items()},
            }
            if "dense_int8" in ms:
                row["speedup_vs_dense_int8"] = {n: ms["dense_int8"] / v for n, v in ms.items()}
            rows.append(row)
            _print_row(row)
    return rows


def _print_row(row: dict) -> None:
    sp = row["speedup_vs_best_dense_fp32"]
    best = row["best_dense_fp32"]
    parts = "  ".join(f"{n} {row['ms'][n]:.3f}ms ({sp[n]:.2f}x)" for n in row["ms"])
    extra = ""
    if "speedup_vs_dense_int8" in row:
        s8 = row["speedup_vs_dense_int8"]
        extra = "  | vs dense int8: " + "  ".join(f"{n} {s8[n]:.2f}x" for n in s8 if "int8" in n and n != "dense_int8")
    print(
        f"{row['case']:<22} {row['in']}x{row['out']} b{row['batch']} {row['regime']:<5} best={best}: {parts}{extra}",
        flush=True,
    )


FFN_PAIRS = 16
INT8_NAMES = ("dense_int8", "numba_spmm_csr_int8", "numba_spmm_vnni_int8")  # fbgemm's dense INT8, prunekit's
STACK_NAMES = ("dense", "onednn", "torch_csr", "numba_csr", "numba_csr_1t", "numba_spmm_csr", *INT8_NAMES)
PEER_NAMES = ("dense", "onednn", "torch_csr", "numba_csr", "numba_spmm_csr", *INT8_NAMES)
DENSE_NAMES = ("dense", "onednn", "onnxruntime")


def _ort_stack(weights: list[Tensor], threads: int) -> Callable[[np.ndarray], object]:
    """One onnxruntime session running the whole chain of MatMuls (weights as initializers)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = _stack_onnx(weights)
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})


def _stack_weights(sparsity: float, pattern: str = "unstructured") -> list[Tensor]:
    """The 32 (out, in) weights of the FFN stack at this sparsity, unstructured or in 1x4 blocks (seeded by it)."""
    g = torch.Generator().manual_seed(int(sparsity * 100))
    weights = []
    for _ in range(FFN_PAIRS):
        for out_f, in_f in ((3072, 768), (768, 3072)):
            if pattern == "block1x4":
                mask = _mask_block(out_f, in_f, sparsity, (1, 4), g)
            else:
                mask = _mask_unstructured(out_f, in_f, sparsity, g)
            weights.append(torch.randn(out_f, in_f, generator=g) * mask / (in_f * (1 - sparsity)) ** 0.5)
    return weights


def _stack_onnx(weights: list[Tensor]) -> Any:
    """The stack as one ONNX graph of MatMuls, the weights (zeros included) as initializers; batch dim 'n'."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(w.t().contiguous().numpy(), f"w{i}") for i, w in enumerate(weights)]
    names = ["x"] + [f"h{i}" for i in range(len(weights) - 1)] + ["y"]
    nodes = [helper.make_node("MatMul", [names[i], f"w{i}"], [names[i + 1]]) for i in range(len(weights))]
    graph = helper.make_graph(
        nodes, "stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", weights[0].shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", weights[-1].shape[0]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by the older onnx that DeepSparse 1.8 pins
    return model


def _stack(weights: list[Tensor], threads: int, names: tuple[str, ...] = ()) -> dict[str, Callable[[Tensor], object]]:
    """name -> fn(x) running the 16 FFN pairs (32 Linears) with that implementation."""
    fns: dict[str, Callable[[Tensor], object]] = {}
    for name in names or STACK_NAMES:
        layers = []
        for i, w in enumerate(weights):
            info = cand.LayerInfo(f"ffn.{i}", w, None, None, False, True)
            layers.append(cand.get_candidate(name)(info))

        def chain(x: Tensor, layers: list = layers) -> Tensor:
            for layer in layers:
                x = layer(x)
            return x

        fns[name] = chain
    ort_fn = _ort_stack(weights, threads)
    fns["onnxruntime"] = lambda x: ort_fn(x.numpy())
    return fns


def deepsparse_times(python: str, onnx_path: Path, cases: dict[Any, list[np.ndarray]], threads: int, repeats: int,
                     block: int) -> dict[Any, list[float]]:
    """case -> DeepSparse's ms per call of each timed block, from `deepsparse_runner.py` run by a venv's `python`."""
    folder = onnx_path.parent
    files = {}
    for i, (case, arrays) in enumerate(cases.items()):
        files[case] = folder / f"{onnx_path.stem}_inputs{i}.npz"
        np.savez(files[case], *arrays)
    runner = Path(__file__).with_name("deepsparse_runner.py")
    cmd = [python, str(runner), str(onnx_path), "--inputs", *map(str, files.values()), "--threads", str(threads),
           "--repeats", str(repeats), "--block", str(block)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"DeepSparse runner failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    ms = json.loads(done.stdout.strip().splitlines()[-1])["ms"]
    return {case: ms[str(path)] for case, path in files.items()}


def run_ffn_stack(args: argparse.Namespace) -> list[dict]:
    """The FFN stack at each sparsity and batch: ms per stack pass and ratios against the best dense fp32.

    With `--deepsparse-python`, this process and DeepSparse's alternate `--peer-runs` times (all
    batches each), every run is printed, and the ratios use the medians over runs.
    """
    rows = []
    peer = args.deepsparse_python
    names = PEER_NAMES if peer else STACK_NAMES
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        weights = _stack_weights(sparsity, args.stack_pattern)
        fns = _stack(weights, args.threads, names)
        case = f"ffn stack {sparsity:.0%}" + (" 1x4 blocks" if args.stack_pattern == "block1x4" else "")
        batches = [int(b) for b in args.batches.split(",")]
        runs: dict[int, list[dict[str, float]]] = {b: [] for b in batches}
        onnx_path = Path(args.out).with_name(f"ffn_stack_{sparsity:.2f}_{args.stack_pattern}.onnx")
        if peer:
            import onnx

            onnx.save(_stack_onnx(weights), str(onnx_path))
        cases = {b: [np.random.default_rng(b).standard_normal((b, 768)).astype(np.float32)] for b in batches}
        for run in range(args.peer_runs if peer else 1):
            for batch in batches:
                x = torch.randn(batch, 768)
                with torch.no_grad():
                    calls = {n: (lambda f=f, x=x: f(x)) for n, f in fns.items()}
                    runs[batch].append(timed_blocks(calls, args.repeats, args.stack_block))
            if peer:
                for batch, times in deepsparse_times(peer, onnx_path, cases, args.threads, args.repeats,
                                                     args.stack_block).items():
                    runs[batch][-1]["deepsparse"] = statistics.median(times)
            for batch in batches:
                got = runs[batch][-1]
                print(f"  run {run + 1}, {case} b{batch}: "
                      + "  ".join(f"{n} {v:.2f}ms" for n, v in got.items()), flush=True)
        for batch in batches:
            ms = {n: statistics.median(r[n] for r in runs[batch]) for n in runs[batch][0]}
            best = min(DENSE_NAMES, key=lambda n: ms[n])
            ours = min((n for n in ms if n.startswith("numba") and "int8" not in n), key=lambda n: ms[n])
            sp = {n: ms[best] / v for n, v in ms.items()}
            ours8 = min((n for n in ms if n.startswith("numba") and "int8" in n), key=lambda n: ms[n])
            rows.append({"case": case, "batch": batch, "ms": ms, "best_dense_fp32": best, "prunekit_best_fp32": ours,
                         "speedup_vs_best_dense_fp32": sp, "prunekit_best_int8": ours8,
                         "int8_speedup_vs_fbgemm": ms["dense_int8"] / ms[ours8], "runs": runs[batch]})
            parts = "  ".join(f"{n} {ms[n]:.2f}ms ({sp[n]:.2f}x)" for n in ms)
            print(f"{case} b{batch} best dense={best} ({ms[best]:.2f} ms), prunekit fp32 best={ours} "
                  f"({sp[ours]:.2f}x), prunekit INT8 best={ours8} ({ms['dense_int8'] / ms[ours8]:.2f}x fbgemm's dense "
                  f"INT8): {parts}", flush=True)
    return rows


def run_accelerate(args: argparse.Namespace) -> dict:
    """End to end: a 90 %-pruned stack of BERT-base-sized FFN layers (113 MB fp32, > L3), accelerate()d."""
    import copy

    import prunekit as pk

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(6):
        layers += [torch.nn.Linear(768, 3072), torch.nn.GELU(), torch.nn.Linear(3072, 768), torch.nn.LayerNorm(768)]
    model = pk.finalize(pk.prune(torch.nn.Sequential(*layers), pk.UnstructuredConfig(sparsity=0.9, scope="layer")))
    dense = copy.deepcopy(model).eval()
    accelerated = pk.accelerate(
        model,
        torch.randn(1, 768),
        batch_sizes=(1, 8),
        repeats=args.repeats // 2,
        table_path=Path(args.out).with_name("accelerate_table.json"),
    )
    result = {}
    for batch in (1, 8):
        lat = pk.measure_latency(
            {"dense": dense, "accelerated": accelerated},
            torch.randn(batch, 768),
            repeats=args.repeats,
            warmup=args.warmup,
        )
        result[batch] = {k: v.latency_ms_p50 for k, v in lat.items()}
        speedup = lat["dense"].latency_ms_p50 / lat["accelerated"].latency_ms_p50
        print(
            f"accelerate end to end, batch {batch}: dense torch {lat['dense'].latency_ms_p50:.3f} ms, "
            f"accelerated {lat['accelerated'].latency_ms_p50:.3f} ms ({speedup:.2f}x)",
            flush=True,
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", default="1x16", help="block of the block-sparse case, ROWSxCOLS")
    parser.add_argument("--shapes", default="768x3072,3072x768", help="IN x OUT, comma separated")
    parser.add_argument("--out", default="out/bench/cpu_sparse_layers.json")
    parser.add_argument("--accelerate", action="store_true", help="also accelerate() a 113 MB model end to end")
    parser.add_argument("--skip-layers", action="store_true", help="only the --accelerate part")
    parser.add_argument("--ort-spin", action="store_true",
                        help="let onnxruntime's idle workers spin (its default; starves the other candidates)")
    parser.add_argument("--ffn-stack", action="store_true", help="the 16-FFN-pair stack at many batch sizes")
    parser.add_argument("--sparsities", default="0.9,0.95", help="of the FFN stack, comma separated")
    parser.add_argument("--batches", default="1,8,16,64,128", help="of the FFN stack, comma separated")
    parser.add_argument("--stack-pattern", choices=("unstructured", "block1x4"), default="unstructured",
                        help="the FFN stack's zeros: unstructured, or whole 1x4 blocks (what VNNI INT8 wants)")
    parser.add_argument("--stack-block", type=int, default=3, help="FFN stack passes per timed block")
    parser.add_argument("--deepsparse-python", default=None,
                        help="python of a venv with deepsparse==1.8.0 (see deepsparse_runner.py): time it side by side")
    parser.add_argument("--peer-runs", type=int, default=3, help="alternations of this process and DeepSparse's")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(args.threads))
    block = tuple(int(v) for v in args.block.split("x"))
    print(
        f"threads: torch {torch.get_num_threads()}, numba {args.threads}, onnxruntime {args.threads}; "
        f"DRAM regime rotates > {DRAM_BYTES >> 20} MB of copies per implementation (L3 {L3_BYTES >> 20} MB)"
    )
    print("load before:", _load(), flush=True)
    g = torch.Generator().manual_seed(1)
    rows = []
    for shape in [] if args.skip_layers else args.shapes.split(","):
        in_f, out_f = (int(v) for v in shape.split("x"))
        rows += run_case(
            "90% unstructured fp32", in_f, out_f, _mask_unstructured(out_f, in_f, 0.9, g), None, False, args
        )
        rows += run_case(
            f"90% block {args.block} fp32", in_f, out_f, _mask_block(out_f, in_f, 0.9, block, g), block, False, args
        )
        rows += run_case(
            "50% unstructured int8", in_f, out_f, _mask_unstructured(out_f, in_f, 0.5, g), None, True, args
        )
        rows += run_case("2:4 int8", in_f, out_f, _mask_2_4(out_f, in_f, g), None, True, args)
    if args.ffn_stack:
        rows += run_ffn_stack(args)
    end_to_end = run_accelerate(args) if args.accelerate else None
    load_after = _load()
    print("load after:", load_after)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"threads": args.threads, "load_after": load_after, "rows": rows, "accelerate": end_to_end}
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
