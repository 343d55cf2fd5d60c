"""ExecuTorch `.pte` (XNNPACK) for EfficientNet-Lite0, dense vs channel-pruned: sizes, check, latency.

Nothing is trained. The pretrained EfficientNet-Lite0 of `examples/efficientnet_report.py` is
channel-pruned (35 % of every coupled group, L2, multiples of 8, classifier `_fc` kept): a
smaller dense model, the kind of model ExecuTorch ships (it stores weights dense). Each model is
written by `prunekit.deploy.executorch.export_executorch`, whose check runs the file through
ExecuTorch's Python runtime and requires max |pte - torch| <= 1e-4 * max |torch|; here the
outputs are also compared on photo crops. Then batch-1 latency, one thread each, medians of
interleaved calls: PyTorch eager vs onnxruntime (`prunekit.export_onnx`) vs the `.pte`.

Run:  nice -n 10 python benchmarks/export_executorch.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from _timing import timed  # benchmarks/ is on sys.path when a script runs

import prunekit as pk
from prunekit.deploy.executorch import export_executorch, load_pte, set_pte_threads

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from efficientnet_report import build_model, photo_crops  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.35)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    import onnxruntime as ort

    torch.manual_seed(0)
    torch.set_num_threads(1)
    set_pte_threads(1)
    dense = build_model()
    example = torch.randn(1, 3, 224, 224)
    pruned = copy.deepcopy(dense)
    config = pk.ChannelConfig(ratio=args.ratio, criterion="l2", round_to=8, exclude=["_fc"])
    pruned = pk.plan(pruned, config, example_inputs=example).apply(pruned).eval()
    crops = photo_crops(8)
    folder = Path(tempfile.mkdtemp(prefix="prunekit_executorch_"))
    fns = {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        params = sum(p.numel() for p in model.parameters())
        t = time.perf_counter()
        report = export_executorch(model, folder / f"{name}.pte", example)
        run = load_pte(report.path)
        with torch.no_grad():
            worst = max(float((run(c[None])[0] - model(c[None])).abs().max() / model(c[None]).abs().max())
                        for c in crops)
        print(f"{name}: {params:,} params; .pte {report.size_bytes / 1e6:.2f} MB, "
              f"{report.delegated_fraction:.0%} of {report.delegated_nodes + report.portable_nodes} op nodes "
              f"in XNNPACK; check passed (max rel diff {report.max_rel_diff:.2e} random input, "
              f"{worst:.2e} over {len(crops)} photo crops); {time.perf_counter() - t:.0f} s")
        onnx = pk.export_onnx(model, folder / f"{name}.onnx", example, dynamic_batch=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(onnx.path), options, providers=["CPUExecutionProvider"])
        x, feed = crops[:1], {session.get_inputs()[0].name: crops[:1].numpy()}
        fns[f"{name} torch"] = lambda m=model, x=x: m(x)
        fns[f"{name} onnxruntime"] = lambda s=session, f=feed: s.run(None, f)
        fns[f"{name} pte"] = lambda r=run, x=x: r(x)
    with torch.no_grad():
        ms = timed(fns, args.repeats)
    print(f"batch 1, 1 thread, median ms over {args.repeats} interleaved calls:")
    for runtime in ("torch", "onnxruntime", "pte"):
        d, p = ms[f"dense {runtime}"], ms[f"pruned {runtime}"]
        print(f"  {runtime:12s} dense {d:7.2f}  pruned {p:7.2f}  speed-up {d / p:.2f}x")


if __name__ == "__main__":
    main()
