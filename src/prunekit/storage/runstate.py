"""Resumable runs: one checkpoint format for fine-tuning, iterative pruning, scans and recipes.

A run's state is a nested dict of plain values and tensors (model and optimizer state dicts,
the schedule step, RNG states, the data loader's position). It is written as one safetensors
file: the tensors as tensors, everything else as JSON in the header, so loading it runs no
code (no pickle, unlike `torch.save`). Tuples, non-string dict keys (an optimizer's state is
keyed by parameter index) and numpy arrays are tagged in the JSON so they come back as they
were. The file is replaced atomically (`prunekit.storage.files`): a run killed while saving leaves the
previous checkpoint intact.

Bit-identical resumption also needs the RNG streams back where they were: `rng_state()`
captures torch's (CPU and, once initialised, CUDA), Python's and numpy's global generators
and any `torch.Generator` a data loader shuffles with.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prunekit.errors import CheckpointError, ConfigError
from prunekit.storage.files import atomic_path
from prunekit.storage.safetensors import check_safetensors_layout

log = logging.getLogger(__name__)

FORMAT = "prunekit.runstate"
FORMAT_VERSION = 1
_META_KEY = "prunekit.runstate"
_TAGS = ("__tensor__", "__tuple__", "__dict__", "__ndarray__")


# --------------------------------------------------------------------------------------------
# Nested state <-> (JSON, tensors).


def _pack(obj: Any, tensors: dict[str, Tensor], storages: set[int] | None = None) -> Any:
    if storages is None:
        storages = set()
    if isinstance(obj, Tensor):
        key = f"t{len(tensors)}"
        t = obj.detach()
        # No copy unless needed: a large run's state is gigabytes. safetensors refuses two tensors
        # on one storage, so the second (a view, a tied weight) is copied; so is a non-CPU tensor.
        if t.device.type != "cpu" or not t.is_contiguous() or t.untyped_storage().data_ptr() in storages:
            t = t.to("cpu", copy=True).contiguous()
        storages.add(t.untyped_storage().data_ptr())
        tensors[key] = t
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": {"dtype": str(obj.dtype), "shape": list(obj.shape), "data": obj.ravel().tolist()}}
    if isinstance(obj, tuple):
        return {"__tuple__": [_pack(v, tensors, storages) for v in obj]}
    if isinstance(obj, list):
        return [_pack(v, tensors, storages) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _pack(v, tensors, storages) for k, v in obj.items()}
        return {"__dict__": [[_pack(k, tensors, storages), _pack(v, tensors, storages)] for k, v in obj.items()]}
    raise CheckpointError(f"run state: cannot checkpoint a {type(obj).__name__} value ({obj!r:.60}); "
                          "use tensors, numbers, strings, lists, tuples and dicts")


def _unpack(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, value), = obj.items()
        if tag == "__tensor__":
            if value not in tensors:
                raise CheckpointError(f"run state names tensor {value!r}, which the file does not hold")
            return tensors[value]
        if tag == "__tuple__":
            return tuple(_unpack(v, tensors) for v in value)
        if tag == "__dict__":
            return {_hashable(_unpack(k, tensors)): _unpack(v, tensors) for k, v in value}
        if tag == "__ndarray__":
            return np.asarray(value["data"], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
    return {k: _unpack(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def save_state(path: str | Path, kind: str, state: dict[str, Any]) -> Path:
    """Write a run's nested `state` to `path` atomically (tensors + JSON header, no pickle).

    Args:
        path: the checkpoint file (conventionally `<name>.ckpt.safetensors`).
        kind: what wrote it ("finetune", "iterative", ...); `load_state` checks it.
        state: nested dicts, lists and tuples of tensors, numbers, strings, None, numpy arrays.

    Returns:
        The path written.

    Example:
        >>> p = save_state("/tmp/run.ckpt.safetensors", "demo", {"step": 3, "w": torch.ones(2)})
        >>> load_state(p, "demo")["step"]
        3
    """
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    document = {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind, "state": _pack(state, tensors)}
    with atomic_path(path) as tmp:  # save_file streams each tensor to disk: no copy of the state in memory
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(document)})
    return Path(path)


def load_state(path: str | Path, kind: str) -> dict[str, Any]:
    """Read a state written by `save_state`; tensors come back on the CPU.

    Raises:
        CheckpointError: the file is missing, truncated, not safetensors (a pickle is refused
            unread), another format or version, or was written by another kind of run.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    check_safetensors_layout(path, "run checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            document = json.loads((f.metadata() or {}).get(_META_KEY, "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, json.JSONDecodeError, RecursionError) as err:  # Recursion: absurd nesting
        raise CheckpointError(f"run checkpoint {str(path)!r} cannot be read: {err}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a prunekit run checkpoint (no {FORMAT!r} header)")
    if document.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r}: run checkpoint version {document.get('version')!r} is not "
                              f"{FORMAT_VERSION}")
    if document.get("kind") != kind:
        raise CheckpointError(f"{str(path)!r} is a {document.get('kind')!r} checkpoint, not {kind!r}")
    try:
        state = _unpack(document["state"], tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"run checkpoint {str(path)!r} has a malformed state: {err!r}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"run checkpoint {str(path)!r}: the state is not a mapping")
    return state


# --------------------------------------------------------------------------------------------
# RNG streams.


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The `torch.Generator`s a DataLoader shuffles or samples with (its own and its samplers')."""
    found: dict[int, torch.Generator] = {}
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator):
            found.setdefault(id(gen), gen)
    return list(found.values())


def rng_state(generators: Iterable[torch.Generator] = ()) -> dict[str, Any]:
    """The global RNG states (torch CPU/CUDA, Python, numpy) and those of `generators`."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: Iterable[torch.Generator] = ()) -> None:
    """Restore what `rng_state(generators)` captured (mutates the global RNGs and `generators`)."""
    generators = list(generators)
    if len(state["generators"]) != len(generators):
        raise CheckpointError(f"the checkpoint holds {len(state['generators'])} data loader generator states, "
                              f"this loader has {len(generators)}: resume with the same loader")
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    for gen, saved in zip(generators, state["generators"], strict=True):
        gen.set_state(saved)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Policy: where, how often, and whether an existing checkpoint may be continued.


@dataclass(frozen=True)
class Checkpointer:
    """Where a run keeps its checkpoint, how often it saves, and whether it may resume.

    Args:
        directory: the folder of the checkpoint file; None turns checkpointing off.
        name: the run kind, also the file's stem (`<directory>/<name>.ckpt.safetensors`).
        every: save every this many units of work (optimizer steps, scan cells).
        resume: continue from an existing checkpoint. Without it an existing checkpoint is an
            error rather than silently overwritten: it may hold hours of work.
    """

    directory: str | Path | None
    name: str
    every: int = 100
    resume: bool = False

    def __post_init__(self) -> None:
        if self.directory is not None:
            object.__setattr__(self, "directory", Path(self.directory))
        if self.every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {self.every}")
        if self.resume and self.directory is None:
            raise ConfigError("resume=True needs checkpoint_dir: the folder the interrupted run checkpointed to")

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    @property
    def path(self) -> Path:
        return Path(self.directory or ".") / f"{self.name}.ckpt.safetensors"

    def due(self, count: int) -> bool:
        """True when `count` units of work are done and a save is due."""
        return self.enabled and count % self.every == 0

    def load(self) -> dict[str, Any] | None:
        """The state to resume from, or None to start fresh (no directory, or no file yet)."""
        if not self.enabled or not self.path.exists():
            if self.resume:
                log.info("no checkpoint at %s: starting from the beginning", self.path)
            return None
        if not self.resume:
            raise CheckpointError(f"{str(self.path)!r} holds the checkpoint of an earlier run: pass resume=True "
                                  "(--resume) to continue it, or remove the file to start over")
        log.info("resuming from %s", self.path)
        return load_state(self.path, self.name)

    def save(self, state: dict[str, Any]) -> None:
        """Write `state` atomically (does nothing when checkpointing is off)."""
        if self.enabled:
            save_state(self.path, self.name, state)


def check_same_run(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Refuse to resume when the run's settings differ from the checkpoint's (names the keys)."""
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        shown = ", ".join(f"{k}: checkpoint {saved.get(k)!r:.60} vs now {current.get(k)!r:.60}" for k in diff)
        raise CheckpointError(f"{where}: the checkpoint is of another run ({shown}); use the same settings "
                              "or another checkpoint_dir")
