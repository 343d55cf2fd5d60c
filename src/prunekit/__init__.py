"""prunekit: prune trained PyTorch models and prove the result on the hardware.

Public surface only; heavy optional back ends (onnx, matplotlib, optuna) load lazily.
"""

from __future__ import annotations

from prunekit.config import PerLayer, UnstructuredConfig, load_recipe, save_recipe
from prunekit.distill import KDLoss, accuracy, finetune
from prunekit.errors import (
    CheckpointError,
    ConfigError,
    ExportCheckError,
    PlanError,
    PrunekitError,
    TraceError,
    UnsupportedLayerError,
)
from prunekit.export import SaveReport, load, save
from prunekit.masks import SparsityReport, finalize, sparsity
from prunekit.plan import MaskPlan, plan, prune, register_method
from prunekit.schedule import Cubic, GradualPruner, Iterative, OneShot, Polynomial

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
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
