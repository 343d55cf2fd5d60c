"""The end-to-end demo: compress LeNet-300-100 on real MNIST for a 1 MB microcontroller budget.

Train the dense baseline, prune it globally with the cubic schedule while fine-tuning with
distillation from the baseline, stack dynamic INT8 on top, then measure and write what it bought: accuracy, sparsity and
the size of the saved files on disk, in the full validation report of `prunekit.measure.report`
(`report.json`, `report.md`, `report.html`, plots, and the two model files).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from prunekit.core.masks import finalize, sparsity
from prunekit.core.plan import prune
from prunekit.deploy.checkpoint import save
from prunekit.deploy.quantize import DynamicInt8Config, quantize
from prunekit.measure.report import compare, write_report
from prunekit.methods.unstructured import UnstructuredConfig
from prunekit.train.distill import KDLoss, accuracy, finetune
from prunekit.train.schedule import Cubic, GradualPruner
from prunekit.zoo.data import load_mnist
from prunekit.zoo.models import lenet_300_100

log = logging.getLogger(__name__)

BUDGET_BYTES = 1_000_000  # the microcontroller's flash budget the exercise aims at
ONE_SHOT_LEVELS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


@dataclass(frozen=True)
class DemoSettings:
    """Knobs of the demo; the defaults meet the targets in a few minutes on 2 cores."""

    sparsity: float = 0.9
    epochs: int = 8  # dense baseline
    finetune_epochs: int = 12  # gradual pruning + distillation
    prune_fraction: float = 0.6  # share of the fine-tuning over which the cubic ramp runs
    batch_size: int = 128
    lr: float = 2e-3
    temperature: float = 4.0
    alpha: float = 0.7
    seed: int = 0
    quick: bool = False  # a small slice of the data and few epochs, for tests
    latency_repeats: int = 50


def _loaders(settings: DemoSettings) -> tuple[DataLoader, DataLoader]:
    train: Dataset = load_mnist("train")
    test: Dataset = load_mnist("test")
    if settings.quick:
        train, test = Subset(train, range(6000)), Subset(test, range(2000))
    generator = torch.Generator().manual_seed(settings.seed)
    return (
        DataLoader(train, batch_size=settings.batch_size, shuffle=True, generator=generator),
        DataLoader(test, batch_size=1000),
    )


def _train(model: nn.Module, loader: DataLoader, epochs: int, lr: float, progress: bool, **kw: Any) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, epochs * len(loader)))
    finetune(model, loader, epochs=epochs, optimizer=optimizer, scheduler=schedule, progress=progress, **kw)


def _one_shot_curve(baseline: nn.Module, test: DataLoader) -> list[dict[str, float]]:
    """Accuracy of the baseline pruned one-shot (global magnitude) with no fine-tuning."""
    curve = []
    for level in ONE_SHOT_LEVELS:
        model = prune(copy.deepcopy(baseline), UnstructuredConfig(sparsity=level))
        curve.append({"sparsity": float(sparsity(model)), "accuracy": accuracy(model, test)})
    return curve


def run_demo(out: str | Path, settings: DemoSettings | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Run the demo and write its outputs to `out`; returns the report as a dict."""
    settings = settings or DemoSettings()
    out = Path(out)
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    train, test = _loaders(settings)

    log.info("training the dense 784-300-100-10 baseline for %d epochs", settings.epochs)
    baseline = lenet_300_100()
    _train(baseline, train, settings.epochs, settings.lr, progress)
    baseline_acc = accuracy(baseline, test)
    dense_file = save(baseline, out / "dense.safetensors")
    trained_s = time.perf_counter() - started

    log.info("pruning to %.0f%% with the cubic schedule + distillation", 100 * settings.sparsity)
    student = copy.deepcopy(baseline)
    total_steps = settings.finetune_epochs * len(train)
    ramp_end = max(1, int(settings.prune_fraction * total_steps))
    pruner = GradualPruner(
        student,
        UnstructuredConfig(sparsity=settings.sparsity, scope="global"),
        Cubic(start_step=0, end_step=ramp_end, every=max(1, len(train) // 4)),
        seed=settings.seed,
    )
    trajectory: list[dict[str, float]] = []

    def record(epoch: int, step: int, loss: float) -> None:
        trajectory.append({"epoch": epoch + 1, "step": step, "loss": loss,
                           "sparsity": float(sparsity(student)), "accuracy": accuracy(student, test)})

    _train(student, train, settings.finetune_epochs, settings.lr, progress, teacher=baseline,
           kd=KDLoss(settings.temperature, settings.alpha), pruner=pruner, callback=record)
    finalize(student)
    pruned_acc = accuracy(student, test)
    pruned_file = save(student, out / "pruned.safetensors")
    measured = sparsity(student)

    log.info("stacking dynamic INT8 on the pruned model")
    int8 = quantize(student, DynamicInt8Config())
    int8_file = save(int8, out / "pruned_int8.safetensors")
    int8_block = {"accuracy": accuracy(int8, test), "size_bytes": int8_file.size_bytes, "file": int8_file.path.name,
                  "compression_vs_dense": dense_file.size_bytes / int8_file.size_bytes}

    log.info("measuring the validation report (accuracy, latency, memory, size)")
    curve = [{"series": "gradual (cubic) + distillation, per epoch", **t} for t in trajectory]
    curve += [{"series": "one-shot magnitude, no fine-tuning", **c} for c in _one_shot_curve(baseline, test)]
    report = compare(baseline, student, test, curve=curve, seed=settings.seed, repeats=settings.latency_repeats,
                     title="prunekit demo: LeNet-300-100 on MNIST")
    d = report.data
    # The files the demo leaves on disk are the sizes that count.
    d["baseline"].update(size_bytes=dense_file.size_bytes, file=dense_file.path.name)
    d["pruned"].update(size_bytes=pruned_file.size_bytes, file=pruned_file.path.name,
                       size_ratio=pruned_file.size_bytes / dense_file.size_bytes, sparsity=measured.total)
    d.update(
        task="MNIST, LeNet-300-100 (784-300-100-10), global magnitude pruning, cubic schedule + KD",
        settings=asdict(settings),
        data={"train_examples": len(train.dataset), "test_examples": len(test.dataset)},  # type: ignore[arg-type]
        budget={"size_bytes": BUDGET_BYTES, "fits": pruned_file.size_bytes <= BUDGET_BYTES},
        accuracy_drop_points=100 * (baseline_acc - pruned_acc),
        pruned_int8=int8_block,
        trajectory=trajectory,
        timings_s={"baseline_training": trained_s, "total": time.perf_counter() - started},
    )
    d["verdicts"].insert(0, f"fits the 1 MB budget: {'yes' if d['budget']['fits'] else 'no'} "
                            f"({pruned_file.size_bytes:,} B, {d['pruned']['size_ratio']:.1%} of the dense file)")
    d["verdicts"].insert(1, f"pruned + INT8: {int8_block['compression_vs_dense']:.1f}x smaller than the dense file "
                            f"({int8_file.size_bytes:,} B), accuracy {int8_block['accuracy']:.2%}")
    d["sections"] = [{"title": "Gradual pruning trajectory (end of each fine-tuning epoch)", "markdown": "\n".join(
        ["| epoch | sparsity | accuracy |", "|---|---|---|",
         *[f"| {t['epoch']} | {t['sparsity']:.2%} | {t['accuracy']:.2%} |" for t in trajectory]])}]
    write_report(report, out)
    return d
