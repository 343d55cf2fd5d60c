"""prunekit: prune trained PyTorch models and prove the result on the hardware.

Public surface only, grouped by pipeline stage (the folders of the package, in the order each
builds on the ones before). Heavy optional back ends (onnx, matplotlib, optuna, numba) load lazily.
"""

from __future__ import annotations

from prunekit import _moved
from prunekit.allocation.allocate import (
    Allocation,
    FlopsTarget,
    LatencyTarget,
    SizeTarget,
    SparsityTarget,
    Target,
    allocate,
)
from prunekit.allocation.bundle import make_bundle
from prunekit.allocation.closed_loop import MeasuredAllocation, allocate_measured
from prunekit.allocation.device_table import load_device_table
from prunekit.allocation.latency import LatencyTable, measure_latency_table
from prunekit.allocation.owl import owl
from prunekit.allocation.pipeline import (
    PipelineAllocation,
    PipelineStage,
    allocate_pipeline,
    even_split,
)
from prunekit.allocation.search import SearchConfig, SearchRecipe, SearchResult, search
from prunekit.allocation.sensitivity import proxy_loss, sensitivity
from prunekit.allocation.sensitivity.table import SensitivityTable
from prunekit.config import PerLayer, load_recipe, save_recipe
from prunekit.core.masks import SparsityReport, finalize, sparsity
from prunekit.core.plan import MaskPlan, plan, prune, register_method
from prunekit.core.tracking import MLflowTracker, TensorBoardTracker, Tracker, log_report_headline, tracker_from_spec
from prunekit.deploy.checkpoint import SaveReport, load, save
from prunekit.deploy.coreml import CoreMLReport, check_coreml, export_coreml
from prunekit.deploy.executorch import ExecuTorchReport, export_executorch, load_pte, time_pte
from prunekit.deploy.onnx_export import ExportReport, export_onnx
from prunekit.deploy.quantize import DynamicInt8Config, OrtModule, StaticInt8Config, quantize
from prunekit.errors import (
    AllocationError,
    CalibrationError,
    CheckpointError,
    ConfigError,
    ExportCheckError,
    MemoryBudgetError,
    PlanError,
    PrunekitError,
    SearchError,
    SensitivityError,
    TraceError,
    UnsupportedLayerError,
)
from prunekit.measure.bench import compare_speed, count_flops, count_params, measure_latency
from prunekit.measure.cost import CostQuery
from prunekit.measure.gate import Budget, GateResult, check_report, load_budget
from prunekit.measure.lm_report import compare_lm
from prunekit.measure.pipelines import measure_pipeline
from prunekit.measure.report import Report, compare, with_cost, write_report
from prunekit.methods.block import BlockConfig, BlockReport, check_blocks
from prunekit.methods.nm import NMConfig, NMReport, check_nm
from prunekit.methods.unstructured import UnstructuredConfig
from prunekit.recipes.run import FinetuneConfig, Recipe
from prunekit.recipes.stages import AllocateStage, ExportStage, ReportSettings
from prunekit.runtime import accelerate
from prunekit.structured import (
    ChannelConfig,
    ChannelPlan,
    DepthConfig,
    ExpertConfig,
    LowRankConfig,
    StateSpaceConfig,
    WidthConfig,
    bn_scale_penalty,
)
from prunekit.train.distill import KDLoss, accuracy, finetune
from prunekit.train.iterative import prune_iteratively
from prunekit.train.recovery import RecoveryConfig, recover
from prunekit.train.schedule import Cubic, GradualPruner, Iterative, OneShot, Polynomial

_moved.install()


def __getattr__(name: str) -> object:  # pk.masks, pk.bench, ...: 0.1 module paths, warn once each
    return _moved.moved_module(__name__, name)


__version__ = "0.1.0"

__all__ = [
    "__version__",
    # errors
    "PrunekitError",
    "ConfigError",
    "UnsupportedLayerError",
    "TraceError",
    "PlanError",
    "CalibrationError",
    "CheckpointError",
    "MemoryBudgetError",
    "ExportCheckError",
    "SensitivityError",
    "AllocationError",
    "SearchError",
    # config: per-layer rules and recipe files
    "PerLayer",
    "load_recipe",
    "save_recipe",
    # core: the verbs, masks and sparsity
    "plan",
    "prune",
    "register_method",
    "MaskPlan",
    "finalize",
    "sparsity",
    "SparsityReport",
    "Tracker",
    "TensorBoardTracker",
    "MLflowTracker",
    "tracker_from_spec",
    "log_report_headline",
    # methods: mask configs and their checks
    "UnstructuredConfig",
    "NMConfig",
    "NMReport",
    "check_nm",
    "BlockConfig",
    "BlockReport",
    "check_blocks",
    # structured: channel, neuron and head removal
    "ChannelConfig",
    "ChannelPlan",
    "bn_scale_penalty",
    "DepthConfig",
    "WidthConfig",
    "StateSpaceConfig",
    "ExpertConfig",
    "LowRankConfig",
    # train: schedules, distillation, iterative structured pruning
    "GradualPruner",
    "OneShot",
    "Iterative",
    "Cubic",
    "Polynomial",
    "KDLoss",
    "finetune",
    "accuracy",
    "prune_iteratively",
    "recover",
    "RecoveryConfig",
    # deploy: checkpoints, INT8, ONNX
    "save",
    "load",
    "SaveReport",
    "quantize",
    "DynamicInt8Config",
    "StaticInt8Config",
    "OrtModule",
    "export_onnx",
    "ExportReport",
    "export_coreml",
    "check_coreml",
    "CoreMLReport",
    "export_executorch",
    "ExecuTorchReport",
    "load_pte",
    "time_pte",
    # measure: counts, latency, the validation report
    "count_params",
    "count_flops",
    "measure_latency",
    "compare_speed",
    "compare",
    "compare_lm",
    "Budget",
    "GateResult",
    "check_report",
    "load_budget",
    "make_bundle",
    "load_device_table",
    "write_report",
    "Report",
    "CostQuery",
    "with_cost",
    # allocation: sensitivity, per-layer levels for a target, search
    "sensitivity",
    "proxy_loss",
    "SensitivityTable",
    "measure_latency_table",
    "LatencyTable",
    "allocate",
    "Allocation",
    "allocate_measured",
    "MeasuredAllocation",
    "allocate_pipeline",
    "even_split",
    "measure_pipeline",
    "PipelineStage",
    "PipelineAllocation",
    "Target",
    "SparsityTarget",
    "SizeTarget",
    "FlopsTarget",
    "LatencyTarget",
    "owl",
    "search",
    "SearchConfig",
    "SearchRecipe",
    "SearchResult",
    # runtime: real CPU speed from sparsity
    "accelerate",
    # recipes
    "Recipe",
    "FinetuneConfig",
    "AllocateStage",
    "ExportStage",
    "ReportSettings",
]
