"""Resumable runs under torchrun: model and optimizer through torch.distributed.checkpoint, the rest per rank.

A distributed run's state has two parts:

- the model and optimizer state dicts, in the form `torch.distributed.checkpoint.state_dict.
  get_state_dict` gives (keys are FQNs, without DDP's `module.`; under FSDP2 the tensors are
  DTensor shards). Their tensors go through `torch.distributed.checkpoint` (DCP): each rank writes
  its own shards and a replicated tensor is written once. Their non-tensor leaves (param_groups:
  learning rates, betas) go with the second part.
- everything else (loader position, each rank's RNG streams, scheduler, pruner step): one
  `prunekit.storage.runstate` file per rank.

No pickle anywhere: DCP writes through its safetensors storage (`HuggingFaceStorageWriter` with
`save_distributed`, the shard offsets in each file's JSON header; no pickled `.metadata`), and
only tensors are handed to DCP (it would pickle other values).

Layout, with `<name>` the run kind ("finetune"):

    <dir>/<name>.dcp/latest                      the name of the newest complete checkpoint
    <dir>/<name>.dcp/<name>-000007/checkpoint.json   format, kind and world size
    <dir>/<name>.dcp/<name>-000007/rank<r>.ckpt.safetensors
    <dir>/<name>.dcp/<name>-000007/tensors/*.safetensors   DCP shards

Saving is atomic: every rank writes into `.<name>-000007.tmp`, then (after a barrier) rank 0
renames it to `<name>-000007`, replaces `latest` atomically and removes older checkpoints. A run
killed at any moment leaves `latest` naming a complete checkpoint. `checkpoint_dir` must be one
folder that every rank sees (a shared filesystem across nodes).

World size: a checkpoint is resumed only with the world size that wrote it; anything else is a
`CheckpointError` naming both. DCP itself could reshard the model and optimizer tensors, but each
rank's RNG streams and its place in its share of the data cannot be split or merged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from prunekit.errors import CheckpointError, ConfigError, PrunekitError
from prunekit.storage.files import atomic_write_text, read_json_document
from prunekit.storage.runstate import load_state, save_state
from prunekit.storage.safetensors import check_safetensors_layout

log = logging.getLogger(__name__)

FORMAT = "prunekit.dcp"
FORMAT_VERSION = 1
SHARDED = ("model", "optimizer")  # the subtrees whose tensors go through DCP
_REF = "__dcp__"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+-\d{6}$")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_dtensor(t: object) -> bool:
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


# --------------------------------------------------------------------------------------------
# Model + optimizer state in DCP's form.


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model": ..., "optimizer": ...} as `get_state_dict` gives them: FQN keys, DTensors kept sharded.

    A collective under FSDP2 (call on every rank). An optimizer that has not stepped yet gets its
    state created by a zero-learning-rate step (DCP's own way), so there is something to load into.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optimizer": osd}


def set_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load `sharded_state`'s form into `model` and `optimizer` (mutates both; a collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    try:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"the distributed checkpoint does not fit this model or optimizer: {err}") from None


def _split(obj: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    """`obj` with each tensor replaced by {"__dcp__": path}; the tensors collected by path."""
    if isinstance(obj, Tensor):
        tensors[path] = obj
        return {_REF: path}
    if isinstance(obj, dict):
        return {k: _split(v, f"{path}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    return obj


def _join(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if len(obj) == 1 and _REF in obj:
            return tensors[obj[_REF]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_join(v, tensors) for v in obj]
        return tuple(items) if isinstance(obj, tuple) else items
    return obj


def _check_plain(obj: Any, path: str) -> None:
    if _is_dtensor(obj):
        raise CheckpointError(f"run state {path!r} is a sharded tensor (DTensor): only the model and optimizer "
                              "state may hold shards; keep others' state (e.g. a pruner's masks) in the model")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{path}/{i}")


# --------------------------------------------------------------------------------------------
# Where checkpoints live, and refusing the ones this run cannot continue.


def distributed_checkpoint_world(directory: str | Path | None, name: str) -> int | None:
    """The world size of the distributed checkpoint `name` in `directory`, or None if there is none."""
    if directory is None:
        return None
    latest = Path(directory) / f"{name}.dcp" / "latest"
    if not latest.exists():
        return None
    return int(_read_manifest(_latest_dir(Path(directory) / f"{name}.dcp"), name)["world_size"])


def _latest_dir(root: Path) -> Path:
    try:
        label = (root / "latest").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {str(root / 'latest')!r}: {err}") from None
    if not _NAME.match(label) or not (root / label).is_dir():
        raise CheckpointError(f"{str(root / 'latest')!r} names {label[:60]!r}, which is not a checkpoint in "
                              f"{str(root)!r}: the folder was edited or copied in part")
    return root / label


def _read_manifest(folder: Path, name: str) -> dict[str, Any]:
    doc = read_json_document(folder / "checkpoint.json", "distributed checkpoint manifest", CheckpointError)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{str(folder)!r} is not a {FORMAT!r} version {FORMAT_VERSION} checkpoint")
    if doc.get("kind") != name:
        raise CheckpointError(f"{str(folder)!r} is a {doc.get('kind')!r} checkpoint, not {name!r}")
    if not isinstance(doc.get("world_size"), int) or doc["world_size"] < 1:
        raise CheckpointError(f"{str(folder)!r}: malformed world_size {doc.get('world_size')!r}")
    return doc


def world_size_error(saved: int, now: int, directory: str | Path) -> CheckpointError:
    """The error for resuming a checkpoint of `saved` ranks with `now` (1 = one process)."""
    def ranks(n: int) -> str:
        return "one process" if n == 1 else f"{n} ranks"

    return CheckpointError(
        f"{str(directory)!r} holds a checkpoint written by {ranks(saved)} (world size {saved}); this run has "
        f"{ranks(now)} (world size {now}). Resume with the world size that wrote it"
        f"{' (torchrun --nproc_per_node ' + str(saved) + ')' if saved > 1 else ' (without torchrun)'}: "
        "each rank's RNG streams and data position cannot be resharded")


class DistributedCheckpointer:
    """`prunekit.storage.runstate.Checkpointer` for a run under torchrun: DCP plus one file per rank.

    Args:
        directory: the folder every rank sees; None turns checkpointing off.
        name: the run kind ("finetune"); also names the files.
        every: save every this many units of work.
        resume: continue from an existing checkpoint; without it one is an error, not overwritten.
    """

    def __init__(self, directory: str | Path | None, name: str, every: int = 100, resume: bool = False) -> None:
        if every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {every}")
        if resume and directory is None:
            raise ConfigError("resume=True needs checkpoint_dir: the folder the interrupted run checkpointed to")
        self.directory = None if directory is None else Path(directory)
        self.name, self.every, self.resume = name, every, resume
        self._count = 0
        self._loaded: Path | None = None  # the checkpoint folder `load` read
        if self.enabled:
            _storage()  # fail before any work on a torch without DCP's safetensors storage

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    @property
    def root(self) -> Path:
        return Path(self.directory or ".") / f"{self.name}.dcp"

    def due(self, count: int) -> bool:
        """True when `count` units of work are done and a save is due."""
        return self.enabled and count % self.every == 0

    def load(self) -> dict[str, Any] | None:
        """This rank's run state (model/optimizer tensors still in DCP: `load_tensors`), or None to start fresh.

        Raises:
            CheckpointError: a checkpoint is there but `resume` is False; it was written by another
                world size (or by one process); it is malformed.
        """
        if not self.enabled:
            return None
        rank, world = _world()
        single = Path(self.directory or ".") / f"{self.name}.ckpt.safetensors"
        if not (self.root / "latest").exists():
            if single.exists() and self.resume:
                raise world_size_error(1, world, self.directory or ".")
            if single.exists():
                raise CheckpointError(f"{str(single)!r} holds the checkpoint of an earlier run: pass resume=True "
                                      "to continue it, or remove it to start over")
            if self.resume:
                log.info("no checkpoint at %s: starting from the beginning", self.root)
            return None
        if not self.resume:
            raise CheckpointError(f"{str(self.root)!r} holds the checkpoint of an earlier run: pass resume=True "
                                  "(--resume) to continue it, or remove the folder to start over")
        folder = _latest_dir(self.root)
        saved_world = int(_read_manifest(folder, self.name)["world_size"])
        if saved_world != world:
            raise world_size_error(saved_world, world, self.directory or ".")
        self._count, self._loaded = int(folder.name.rsplit("-", 1)[1]), folder
        log.info("resuming from %s", folder)
        state, error = None, None
        try:
            state = load_state(folder / f"rank{rank}.ckpt.safetensors", self.name)
        except CheckpointError as err:  # this rank's own file: the others must hear of it, not wait
            error = err
        _raise_on_all_ranks(error, f"reading {str(folder)!r}")
        return state

    def load_tensors(self, state: dict[str, Any], into: dict[str, Any]) -> dict[str, Any]:
        """Fill `state`'s model/optimizer subtrees with DCP's tensors, read into `into`'s (mutates `into`).

        Args:
            state: what `load()` returned.
            into: `sharded_state(model, optimizer)` of the run being resumed: tensors placed as they
                must be now (DCP reads each rank's part of them in place).

        Returns:
            `state` with its model and optimizer subtrees complete, for `set_sharded_state`.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        if self._loaded is None:
            raise CheckpointError("load_tensors: call load() first, and resume only when it returned a state")
        folder, (_, reader) = self._loaded, _storage()
        want: dict[str, Tensor] = {}
        for key in SHARDED:
            _split(into[key], f"/{key}", want)
        saved = {f"/{key}{rel}" for key in SHARDED for rel in _refs(state[key])}
        if saved != set(want):
            missing, extra = sorted(saved - set(want))[:5], sorted(set(want) - saved)[:5]
            raise CheckpointError(f"the distributed checkpoint in {str(folder)!r} does not fit this model or "
                                  f"optimizer: only in the checkpoint {missing}, only here {extra}")
        for file in sorted((folder / "tensors").glob("*.safetensors")):
            check_safetensors_layout(file, "distributed checkpoint shard")
        try:
            dcp.load(want, storage_reader=reader(str(folder / "tensors")))
        except (CheckpointException, RuntimeError, ValueError, OSError) as err:  # DCP gathers every rank's failure
            raise CheckpointError(f"the distributed checkpoint in {str(folder)!r} cannot be loaded into this "
                                  f"model or optimizer: {str(err)[:2000]}") from None
        for key in SHARDED:
            state[key] = _join(state[key], {p[len(key) + 1:]: t for p, t in want.items() if p.startswith(f"/{key}/")})
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Write `state` atomically (a collective: every rank calls it with its own state).

        `state["model"]` and `state["optimizer"]` are `sharded_state`'s; their tensors go to DCP.
        The rest, with plain tensors only, goes to this rank's runstate file.
        """
        if not self.enabled:
            return
        import torch.distributed.checkpoint as dcp

        rank, world = _world()
        plain = {k: v for k, v in state.items() if k not in SHARDED}
        _check_plain(plain, "")
        tensors: dict[str, Tensor] = {}
        for key in SHARDED:
            plain[key] = _split(state[key], "", {})  # the skeleton; paths below are relative to the subtree
            _split(state[key], f"/{key}", tensors)
        self._count += 1
        label = f"{self.name}-{self._count:06d}"
        tmp = self.root / f".{label}.tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier
            (tmp / "tensors").mkdir(parents=True)
        dist.barrier()
        dcp.save(tensors, storage_writer=_storage()[0](str(tmp / "tensors"), save_distributed=True))
        error = None
        try:
            save_state(tmp / f"rank{rank}.ckpt.safetensors", self.name, plain)
            if rank == 0:
                atomic_write_text(tmp / "checkpoint.json", json.dumps(
                    {"format": FORMAT, "version": FORMAT_VERSION, "kind": self.name, "world_size": world}))
        except (PrunekitError, OSError) as err:  # a full disk on one rank: all raise, none waits forever
            error = err
        _raise_on_all_ranks(error, f"writing {str(tmp)!r}")  # also: every rank's files are complete
        if rank == 0:
            self._publish(tmp, label)
        dist.barrier()  # no rank starts the next save (or exits) while rank 0 renames

    def _publish(self, tmp: Path, label: str) -> None:
        final = self.root / label
        shutil.rmtree(final, ignore_errors=True)  # left by a run killed between rename and `latest`
        os.replace(tmp, final)
        _fsync_dir(self.root)
        atomic_write_text(self.root / "latest", label)
        for old in self.root.iterdir():
            if old.is_dir() and old.name != label and _NAME.match(old.name.lstrip(".").removesuffix(".tmp")):
                shutil.rmtree(old, ignore_errors=True)


def _raise_on_all_ranks(error: Exception | None, what: str) -> None:
    """Raise on every rank if `error` happened on any (a collective); re-raise it where it happened."""
    backend = str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    failed = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device)
    failed[dist.get_rank()] = int(error is not None)
    dist.all_reduce(failed)  # one slot per rank: names the ranks that failed
    if error is not None:
        raise error
    ranks = failed.nonzero().reshape(-1).tolist()
    if ranks:
        raise CheckpointError(f"{what} failed on rank(s) {ranks}: see their error")


def _storage() -> tuple[Any, Any]:
    """DCP's safetensors writer and reader classes (torch >= 2.8): no pickled metadata."""
    try:
        from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
    except ImportError:
        raise ConfigError(f"checkpoints under torchrun need torch >= 2.8 (safetensors storage for "
                          f"torch.distributed.checkpoint); this is torch {torch.__version__}") from None
    return HuggingFaceStorageWriter, HuggingFaceStorageReader


def _refs(obj: Any) -> list[str]:
    """The paths of the {"__dcp__": path} placeholders in a skeleton."""
    if isinstance(obj, dict):
        if len(obj) == 1 and _REF in obj:
            return [str(obj[_REF])]
        return [p for v in obj.values() for p in _refs(v)]
    if isinstance(obj, (list, tuple)):
        return [p for v in obj for p in _refs(v)]
    return []


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
