"""A recipe's optional stages around pruning: allocate before it, export and report settings after.

Each stage is a config in the recipe (validated like the rest) and one function here that
runs it. Which metric a stage measures follows the recipe's data: (inputs, labels) loaders
give accuracy and loss, held-out token ids give a language model's token loss and perplexity.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from prunekit.allocation.allocate import LatencyTarget, Target, allocate
from prunekit.allocation.closed_loop import allocate_measured
from prunekit.allocation.latency import measure_latency_table
from prunekit.allocation.sensitivity import proxy_loss, sensitivity
from prunekit.allocation.sensitivity.groups import GroupPruner
from prunekit.config import FrozenConfig, config_to_dict, recipe_type, save_recipe
from prunekit.core.distributed import is_main_rank
from prunekit.deploy.checkpoint import save
from prunekit.deploy.coreml import export_coreml
from prunekit.deploy.onnx_export import export_onnx
from prunekit.errors import ConfigError, PrunekitError
from prunekit.measure.bench import measure_latency
from prunekit.measure.lm_report import as_segments
from prunekit.storage.files import atomic_write_bytes, atomic_write_text
from prunekit.structured import ChannelPlan
from prunekit.train.distill import accuracy
from prunekit.zoo.llm import token_losses

log = logging.getLogger(__name__)


@recipe_type
class AllocateStage(FrozenConfig):
    """Before pruning: scan each unit of `recipe.prune`'s family alone at `levels`, then choose
    per-unit levels that meet `target` with the least predicted damage. The chosen `PerLayer`
    replaces `recipe.prune` (and is written to allocation.yaml beside the report).

    `metric` "loss" is the mean loss on the first `batches` eval batches (token loss for a
    language model), "accuracy" the eval loader's accuracy. A `LatencyTarget` times every unit
    on this machine at `latency_batch` examples, then (`measure_rounds` > 0) prunes a copy, times
    it end to end and re-allocates on the table calibrated to that measurement, as
    `allocate_measured` does; 0 trusts the table's additive prediction.
    """

    target: Target
    levels: tuple[float, ...] = Field(default=(0.3, 0.5, 0.7, 0.9), min_length=1)
    metric: Literal["loss", "accuracy"] = "loss"
    batches: int = Field(default=4, ge=1)
    max_level: float | None = Field(default=None, gt=0, lt=1)
    latency_batch: int = Field(default=1, ge=1)
    measure_rounds: int = Field(default=3, ge=0)

    @field_validator("target", mode="before")
    @classmethod
    def _concrete_target(cls, value: Any) -> Any:
        if not isinstance(value, Target) or type(value) is Target:
            raise ValueError("needs a concrete target: SparsityTarget, FlopsTarget, SizeTarget or LatencyTarget "
                             "(in YAML, a mapping with its '_type')")
        return value


@recipe_type
class ExportStage(FrozenConfig):
    """After pruning (and quantizing): write model.onnx and check that its outputs and zeros
    match the PyTorch model on the first eval batches; optionally with sparse initializers, and a
    Core ML package of the float pruned model (`coreml`: "fp32" or "fp16"; needs prunekit[coreml]),
    its non-zeros optionally INT8 or palettized on top of the sparsity (`coreml_quantize`, iOS 18)."""

    onnx: bool = True
    opset: int | None = None
    dynamic_batch: bool = True
    sparse_initializers: bool = False
    check_batches: int = Field(default=3, ge=1)
    coreml: Literal["fp32", "fp16"] | None = None
    coreml_quantize: Literal["none", "int8", "lut8", "lut4"] = "none"


@recipe_type
class ReportSettings(FrozenConfig):
    """What the report measures: latency batch sizes and repeats (classification), the window,
    prompt and decode lengths (language models)."""

    batch_sizes: tuple[int, ...] = Field(default=(1, 4, 8, 32), min_length=1)
    repeats: int = Field(default=50, ge=1)
    seq_len: int = Field(default=512, ge=2)
    prompt_tokens: int = Field(default=128, ge=1)
    decode_tokens: int = Field(default=16, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"  # a language model's perplexity scoring


def is_text(evaluate: Any) -> bool:
    """Whether a recipe's eval data is held-out token ids (a language model's), not a loader."""
    return isinstance(evaluate, Tensor) or (isinstance(evaluate, Mapping) and all(
        isinstance(v, Tensor) for v in evaluate.values()))


def probe_metric(stage: AllocateStage, evaluate: Any, seq_len: int) -> tuple[Callable[[nn.Module], float], bool]:
    """(model -> metric, higher is better) for the allocation scan, from the recipe's eval data."""
    if is_text(evaluate):
        if stage.metric == "accuracy":
            raise ConfigError("recipe.allocate.metric: 'accuracy' needs labelled batches; a language model's "
                              "eval text is scored by token loss: set metric: loss")
        ids = torch.cat(list(as_segments(evaluate, seq_len).values()))[: stage.batches * seq_len]
        return (lambda m: float(token_losses(m.eval(), ids, min(seq_len, ids.numel())).mean())), False
    if stage.metric == "accuracy":
        return (lambda m: accuracy(m, evaluate)), True
    return proxy_loss(evaluate, n_batches=stage.batches), False


def allocated_config(model: nn.Module, prune: FrozenConfig, stage: AllocateStage, evaluate: Any, *,
                     example: Any, calibration: list[Any] | None, seq_len: int, out: Path,
                     progress: bool) -> FrozenConfig | ChannelPlan:
    """Run the allocate stage: sensitivity scan, optional latency table, `allocate`; the model ends
    unchanged. Returns `PerLayer` rules (layers), or the channel plan (channel groups: each group
    at its own ratio). Writes sensitivity.json (+ .png) and allocation.yaml / allocation.json
    into `out` (rank 0 under torchrun).

    Raises:
        ConfigError: the recipe has no eval data, or a latency target has no example inputs.
        AllocationError: the target cannot be met at the scanned levels (names the binding unit).
    """
    if evaluate is None:
        raise ConfigError("recipe.allocate scores each unit on held-out data: set recipe.data")
    metric, higher = probe_metric(stage, evaluate, seq_len)
    table = sensitivity(model, prune, metric, stage.levels, higher_is_better=higher, example_inputs=example,
                        data=calibration, progress=progress)
    latency = None
    if type(stage.target).__name__ == "LatencyTarget":
        if example is None:
            raise ConfigError("recipe.allocate: a LatencyTarget times the model on example inputs: "
                              "set recipe.data or recipe.example_inputs")
        served = _repeat_batch(example, stage.latency_batch)
        latency = measure_latency_table(model, prune, stage.levels, served, progress=progress)
    rounds: tuple[tuple[float, float], ...] = ()
    if isinstance(stage.target, LatencyTarget) and latency is not None and stage.measure_rounds > 0:
        measured = allocate_measured(model, table, stage.target, latency, served, rounds=stage.measure_rounds,
                                     max_level=stage.max_level, data=calibration)
        allocation, rounds = measured.allocation, measured.rounds
        log.info("measured speed-up per round (predicted, measured): %s", rounds)
    else:
        allocation = allocate(table, stage.target, latency=latency, max_level=stage.max_level)
    log.info("allocation: %s", allocation)
    if allocation.kind == "group":
        result: FrozenConfig | ChannelPlan = GroupPruner(model, prune, example, calibration).plan_many(
            {u: lv for u, lv in allocation.levels.items() if lv > 0})
    else:
        result = allocation.to_config(prune)
    if not is_main_rank():  # under torchrun every rank holds the same table; rank 0 writes it
        return result
    table.save(out / "sensitivity.json")
    try:
        table.plot(out / "sensitivity.png")
    except PrunekitError as err:  # matplotlib missing: the table is still written
        log.warning("%s", err)
    if isinstance(result, ChannelPlan):
        atomic_write_text(out / "allocation.json", json.dumps(
            {"levels": allocation.levels, "target": config_to_dict(allocation.target),
             "predicted": allocation.achieved, "predicted_degradation": allocation.predicted_degradation,
             "measured_rounds": [{"predicted": p, "measured": m} for p, m in rounds]}, indent=1))
    else:
        save_recipe(result, out / "allocation.yaml")
    return result


def _repeat_batch(example: Any, n: int) -> Any:
    if isinstance(example, Tensor):
        return example[:1].repeat(n, *[1] * (example.dim() - 1))
    return example


def export_model(model: nn.Module, float_model: nn.Module, stage: ExportStage, example: Any, batches: Any,
                 out: Path) -> dict[str, Any]:
    """Run the export stage: model.onnx (of `model`, INT8 if quantized) checked against it on
    `batches`, and model.mlpackage (of `float_model`) checked by reading it back; returns what
    was written.

    Raises:
        ExportCheckError: an exported file's outputs or zeros differ from the model's.
    """
    if example is None and (stage.onnx or stage.coreml):
        raise ConfigError("recipe.export exports from example inputs: set recipe.data or recipe.example_inputs")
    written: dict[str, Any] = {}
    if stage.onnx:
        report = export_onnx(model, out / "model.onnx", example, dynamic_batch=stage.dynamic_batch, check=True,
                             data=batches or None, max_batches=stage.check_batches, opset=stage.opset,
                             sparse_initializers=stage.sparse_initializers)
        written["onnx"] = {"file": "model.onnx", "size_bytes": report.size_bytes, "int8": report.int8,
                           "batches_checked": report.batches_checked, "max_abs_diff": report.max_abs_diff,
                           "sparse_initializers": len(report.sparse)}
    if stage.coreml:
        package = export_coreml(float_model, out / "model.mlpackage", example, precision=stage.coreml,
                                quantize=stage.coreml_quantize)
        written["coreml"] = {"file": "model.mlpackage", "size_bytes": package.size_bytes,
                             "dense_size_bytes": package.dense_size_bytes, "precision": package.precision,
                             "quantize": package.quantize,
                             "sparse_weights_checked": len(package.tensors)}
    return written


def int8_block(baseline: nn.Module, quantized: nn.Module, evaluate: Any, example: Any, out: Path, *,
               seq_len: int, repeats: int) -> dict[str, Any]:
    """What INT8 stacked on the pruned model bought: its file, its metric, its batch-1 latency
    against the dense baseline (interleaved medians). Writes pruned_int8.safetensors, or
    pruned_int8.onnx for a static-INT8 (onnxruntime) model."""
    onnx_bytes = getattr(quantized, "onnx_model_bytes", None)
    if isinstance(onnx_bytes, bytes):
        path = out / "pruned_int8.onnx"
        atomic_write_bytes(path, onnx_bytes)
        size = len(onnx_bytes)
    else:
        saved = save(quantized, out / "pruned_int8.safetensors")
        path, size = saved.path, saved.size_bytes
    block: dict[str, Any] = {"file": path.name, "size_bytes": size}
    if is_text(evaluate):
        ids = torch.cat(list(as_segments(evaluate, seq_len).values()))
        block["perplexity"] = float(torch.exp(token_losses(quantized.eval(), ids, seq_len).mean()))
    elif evaluate is not None:
        block["accuracy"] = accuracy(quantized, evaluate)
    if example is not None:
        timed = measure_latency({"baseline": baseline, "int8": quantized}, example, repeats=repeats, warmup=3)
        block["speedup_batch1"] = timed["baseline"].latency_ms_p50 / timed["int8"].latency_ms_p50
    return block


def int8_verdict(block: dict[str, Any], baseline_size: int) -> str:
    """One sentence on the INT8 model: size against the dense file, metric, speed."""
    metric = (f"perplexity {block['perplexity']:.2f}" if "perplexity" in block else
              f"accuracy {block['accuracy']:.2%}" if "accuracy" in block else "no eval data")
    speed = f", {block['speedup_batch1']:.2f}x the dense model's speed at batch 1" if "speedup_batch1" in block else ""
    return (f"pruned + INT8: file {block['size_bytes']:,} B ({block['size_bytes'] / baseline_size:.1%} of the dense "
            f"file), {metric}{speed}")
