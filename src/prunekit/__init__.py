"""prunekit: prune trained PyTorch models and prove the result on the hardware.

Public surface only; heavy optional back ends (onnx, matplotlib, optuna) load lazily.
"""

from __future__ import annotations

from prunekit import sparsegpt as _sparsegpt  # noqa: F401  (registers the criterion)
from prunekit import wanda as _wanda  # noqa: F401  (registers the criterion)
from prunekit.allocate import (
    Allocation,
    AllocationError,
    FlopsTarget,
    LatencyTarget,
    SizeTarget,
    SparsityTarget,
    Target,
    allocate,
)
from prunekit.bench import compare_speed, count_flops, count_params, measure_latency
from prunekit.block import BlockConfig, BlockReport, check_blocks
from prunekit.calibration import CalibrationError
from prunekit.config import PerLayer, UnstructuredConfig, load_recipe, save_recipe
from prunekit.distill import KDLoss, accuracy, finetune
from prunekit.errors import (
    CheckpointError,
    ConfigError,
    ExportCheckError,
    MemoryBudgetError,
    PlanError,
    PrunekitError,
    TraceError,
    UnsupportedLayerError,
)
from prunekit.export import SaveReport, load, save
from prunekit.latency_table import LatencyTable, measure_latency_table
from prunekit.masks import SparsityReport, finalize, sparsity
from prunekit.nm import NMConfig, NMReport, check_nm
from prunekit.onnx_export import ExportReport, export_onnx
from prunekit.plan import MaskPlan, plan, prune, register_method
from prunekit.quantize import DynamicInt8Config, OrtModule, StaticInt8Config, quantize
from prunekit.recipe import FinetuneConfig, Recipe
from prunekit.report import Report, compare, write_report
from prunekit.runtime import accelerate
from prunekit.schedule import Cubic, GradualPruner, Iterative, OneShot, Polynomial
from prunekit.search import SearchConfig, SearchError, SearchRecipe, SearchResult, search
from prunekit.sensitivity import SensitivityError, proxy_loss, sensitivity
from prunekit.sensitivity_table import SensitivityTable
from prunekit.structured import ChannelConfig, ChannelPlan, bn_scale_penalty, prune_iteratively

__version__ = "0.1.0"

__all__ = [
    "accelerate",
    "ChannelConfig",
    "ChannelPlan",
    "bn_scale_penalty",
    "prune_iteratively",
    "compare",
    "compare_speed",
    "FinetuneConfig",
    "Recipe",
    "Report",
    "write_report",
    "count_flops",
    "count_params",
    "measure_latency",
    "DynamicInt8Config",
    "ExportReport",
    "OrtModule",
    "StaticInt8Config",
    "export_onnx",
    "quantize",
    "CalibrationError",
    "BlockConfig",
    "BlockReport",
    "check_blocks",
    "NMConfig",
    "NMReport",
    "check_nm",
    "CheckpointError",
    "MemoryBudgetError",
    "ConfigError",
    "Cubic",
    "ExportCheckError",
    "GradualPruner",
    "Iterative",
    "KDLoss",
    "MaskPlan",
    "OneShot",
    "PerLayer",
    "PlanError",
    "Polynomial",
    "PrunekitError",
    "SaveReport",
    "SparsityReport",
    "TraceError",
    "UnstructuredConfig",
    "UnsupportedLayerError",
    "Allocation",
    "AllocationError",
    "FlopsTarget",
    "LatencyTarget",
    "LatencyTable",
    "SearchConfig",
    "SearchError",
    "SearchRecipe",
    "SearchResult",
    "SensitivityError",
    "SensitivityTable",
    "SizeTarget",
    "SparsityTarget",
    "Target",
    "allocate",
    "measure_latency_table",
    "search",
    "proxy_loss",
    "sensitivity",
    "__version__",
    "accuracy",
    "finalize",
    "finetune",
    "load",
    "load_recipe",
    "plan",
    "prune",
    "register_method",
    "save",
    "save_recipe",
    "sparsity",
]
