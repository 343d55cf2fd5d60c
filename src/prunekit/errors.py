"""The exceptions prunekit raises: every one says what went wrong, where, and what to do."""

from __future__ import annotations


class PrunekitError(Exception):
    """Base class of every error prunekit raises on purpose."""


class ConfigError(PrunekitError, ValueError):
    """A config, rule or recipe is invalid (the message names the field and the value)."""


class UnsupportedLayerError(PrunekitError, TypeError):
    """A layer cannot be pruned by the requested method (the message names the layer)."""


class TraceError(PrunekitError):
    """A model could not be traced into a graph (data-dependent control flow, unsupported op)."""


class PlanError(PrunekitError):
    """A pruning plan could not be computed or applied; the model is left unchanged."""


class CheckpointError(PrunekitError, ValueError):
    """A checkpoint file is missing, corrupt, truncated, unsafe or does not fit the model."""


class ExportCheckError(PrunekitError):
    """An exported file lost what pruning bought (sparsity, shapes or outputs)."""


class MemoryBudgetError(PrunekitError):
    """A pass would need more memory than the user's `max_memory` (the message gives both)."""


class AllocationError(PrunekitError):
    """A target cannot be met; the message names the binding constraint and the closest value."""


class SearchError(PrunekitError):
    """The study cannot run: storage unreachable, Optuna missing, or a bad search space."""


class CalibrationError(PrunekitError, ValueError):
    """Calibration data is missing, empty, malformed, too short, or produces NaN/Inf."""


class SensitivityError(PrunekitError):
    """The sensitivity scan could not measure a layer (the message names layer and level)."""


class CollectiveError(PrunekitError, RuntimeError):
    """A collective under torch.distributed failed or timed out; the message names rank, step and operation."""
