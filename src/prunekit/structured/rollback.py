"""All-or-nothing model edits: a shallow snapshot of a model, restored if an edit fails.

Structured edits only rebind tensors, submodules and attributes (never write in place), so the
snapshot holds references, not copies of the weights.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

# RNNs run from `_flat_weights`, lists of their Parameters: restored with them.
_PRIVATE_STATE = ("_flat_weights", "_flat_weight_refs")
_TABLES = ("_parameters", "_buffers", "_modules")

Snapshot = list[tuple[Any, dict[str, Any]]]


def snapshot(model: nn.Module, attributes_of: list[nn.Module] | None = None) -> Snapshot:
    """Every module's parameters, buffers and children (tied tensors may live anywhere), the
    public attributes of `attributes_of` (default: every module), and the HF config's fields."""
    modules = list({id(m): m for m in model.modules()}.values())
    out: Snapshot = [(m, {k: dict(getattr(m, k)) for k in _TABLES}) for m in modules]
    for m in modules if attributes_of is None else attributes_of:
        attrs = {k: copy.copy(v) for k, v in vars(m).items() if not k.startswith("_") or k in _PRIVATE_STATE}
        out.append((m, attrs))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        out.append((config, {"__all__": dict(vars(config))}))
    return out


def restore(saved: Snapshot) -> None:
    """Put back what `snapshot` saved (mutates the model): a config also loses fields added since."""
    for obj, state in saved:
        if "__all__" in state:
            for key in [k for k in vars(obj) if k not in state["__all__"]]:
                delattr(obj, key)
            state = state["__all__"]
        for key, value in state.items():
            if key in _TABLES:
                getattr(obj, key).clear()
                getattr(obj, key).update(value)
            else:
                object.__setattr__(obj, key, value)
