"""A portable bench bundle: time a `LatencyTable`'s variants on the target device, not here.

`measure_latency_table` times each unit (a layer for mask configs, a coupled channel group for
`ChannelConfig`) on the machine running prunekit. The field's rule is to measure on the
deployment hardware, so `make_bundle` writes the same variants as ONNX files, with the inputs
they run on as `.npy` (or, with `inputs="random"`, only their shapes, dtypes, value statistics
and a seed: the runner draws stand-ins, and the bundle shrinks to its ONNX files), plus a
`manifest.json`. `bundle_runner.py` (standard library, numpy and
onnxruntime only: no torch, no prunekit) times them on the device and writes
`device_table.json`; `load_device_table` (`device_table.py`) checks that file belongs to the
bundle and turns it into a `LatencyTable` for `allocate(..., LatencyTarget(...), latency=table)`.

Variants (`variants="units"`, the default) are the sub-models `measure_latency_table` times:
for a channel group, every layer the group touches (each module owning a member tensor), run on
the input it receives in the dense model and in each pruned copy; for a layer, the layer with
its smallest weights zeroed, on its real input. Each unit's variants are timed interleaved with
the whole dense model, whose time scales the unit's saving (`LatencyTable.reference_ms`). They
are small, so the bundle stays near the model's size per level and a small group's saving
stays above the timer's noise. `variants="whole"` exports the whole model with one unit pruned
instead (saving = whole dense - whole pruned): it also counts what the touched layers' own times
leave out (activations, the ops between them), but costs one model-sized file per unit and level
and drowns small savings in noise.

Running on a device. Write the bundle here, copy it and the runner there, run, copy back:

    # here
    python -c "import prunekit.allocation.bundle as b; ..."     # make_bundle(model, cfg, [0.25, 0.5], x, "bundle")
    cp $(python -c "import prunekit.allocation.bundle_runner as r; print(r.__file__)") bundle/
    # over ssh (the device needs python3 with numpy and onnxruntime: pip install numpy onnxruntime)
    scp -r bundle/ device:/tmp/bundle
    ssh device "cd /tmp && python3 bundle/bundle_runner.py bundle/ --threads 4"
    scp device:/tmp/bundle/device_table.json .
    # over adb (Android with a python, e.g. Termux, numpy and onnxruntime installed)
    adb push bundle /data/local/tmp/bundle
    adb shell "cd /data/local/tmp && python bundle/bundle_runner.py bundle/ --threads 4"
    adb pull /data/local/tmp/bundle/device_table.json .
    # back here
    table = load_device_table("bundle", "device_table.json", model=model)

`make_bundle` copies the runner into the bundle, so the first line after `make_bundle` is only
needed for a runner you changed. Pass `--extra pruned=pruned.onnx` to also time a whole-model
ONNX against the bundle's dense model (the speed-up the device really sees).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from importlib.metadata import version as _installed_version
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.allocation.latency import zeroed_variant
from prunekit.allocation.sensitivity.groups import GroupPruner
from prunekit.config import FrozenConfig, MaskConfig, PerLayer, config_to_dict
from prunekit.core.inputs import run_with_hooks
from prunekit.core.progress import progress as progress_bar
from prunekit.core.targets import resolve
from prunekit.deploy.onnx_export import DEFAULT_OPSET, onnx_bytes
from prunekit.errors import ConfigError
from prunekit.storage.files import atomic_writer

log = logging.getLogger(__name__)

FORMAT = "prunekit.bench_bundle"
FORMAT_VERSION = 1
RESULTS_FORMAT = "prunekit.device_results"  # what bundle_runner.py writes
RESULTS_VERSION = 1
RUNNER = Path(__file__).with_name("bundle_runner.py")


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the names, shapes and dtypes of `model`'s parameters and buffers (not values)."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    described = [[name, list(t.shape), str(t.dtype)] for name, t in sorted(tensors.items())]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:32]


def prunekit_version() -> str:
    """The installed prunekit's version, as bundles and device results record it."""
    return _installed_version("prunekit")


class _Calls(nn.Module):
    """Some layers, each applied to its own graph input: a unit's variant as one ONNX graph."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, *xs: Tensor) -> tuple[Tensor, ...]:
        return tuple(layer(x) for layer, x in zip(self.layers, xs, strict=True))


class _Writer:
    """Writes a bundle's files into a folder; inputs are stored once per distinct content, or
    (`random`) described by shape, dtype, value range and a seed for the runner to generate."""

    def __init__(self, root: Path, opset: int, random: bool = False) -> None:
        self.root, self.opset, self.random = root, opset, random
        self.seeds = 0
        (root / "variants").mkdir()
        if not random:
            (root / "inputs").mkdir()

    def array(self, x: Tensor) -> str | dict[str, Any]:
        if self.random:
            return self.random_spec(x)
        buffer = io.BytesIO()
        np.save(buffer, x.detach().cpu().numpy(), allow_pickle=False)
        data = buffer.getvalue()
        name = f"inputs/{hashlib.sha256(data).hexdigest()[:20]}.npy"
        if not (self.root / name).exists():
            (self.root / name).write_bytes(data)
        return name

    def random_spec(self, x: Tensor) -> dict[str, Any]:
        """Shape, dtype, seed and value statistics of `x`: the runner draws a stand-in from them."""
        self.seeds += 1
        data = x.detach().cpu()
        spec: dict[str, Any] = {"random": True, "shape": list(data.shape), "seed": self.seeds,
                                "dtype": str(data.numpy().dtype) if data.dtype != torch.bfloat16 else "float32"}
        if data.is_floating_point():
            spec |= {"mean": float(data.float().mean()), "std": float(data.float().std(unbiased=False))}
        elif data.dtype != torch.bool and data.numel():
            spec |= {"low": int(data.min()), "high": int(data.max())}
        return spec

    def variant(self, name: str, module: nn.Module, inputs: tuple[Tensor, ...]) -> dict[str, Any]:
        """Export `module` on `inputs` (eval mode, static shapes) and record where they lie."""
        module = module.eval()
        path = f"variants/{name}.onnx"
        (self.root / path).write_bytes(onnx_bytes(module, inputs, dynamic_batch=False, opset=self.opset))
        return {"onnx": path, "inputs": [self.array(x) for x in inputs]}


def _inputs_of(model: nn.Module, example_inputs: Any, fqns: Sequence[str]) -> dict[str, Tensor]:
    """The first positional input each named module receives on `example_inputs`."""
    seen: dict[str, Tensor] = {}

    def hook(fqn: str) -> Any:
        def record(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            seen.setdefault(fqn, inputs[0].detach().clone())

        return record

    run_with_hooks(model, example_inputs, {f: hook(f) for f in fqns}, pre=True)
    return seen


def _layers_variant(model: nn.Module, example_inputs: Any, fqns: list[str]) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """The named layers of `model` (copied) as one module, and the inputs they receive."""
    modules = dict(model.named_modules())
    inputs = _inputs_of(model, example_inputs, fqns)
    used = [f for f in fqns if f in inputs]
    return _Calls([copy_module(modules[f]) for f in used]), tuple(inputs[f] for f in used)


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy in eval mode (the original is not touched)."""
    return copy.deepcopy(module).eval()


class _Units:
    """A config's units: layer FQNs (mask configs) or channel groups and the layers each touches."""

    def __init__(self, model: nn.Module, config: FrozenConfig, example_inputs: Any) -> None:
        self.pruner: GroupPruner | None = None
        if isinstance(config, (MaskConfig, PerLayer)):
            self.kind, self.layers = "layer", {f: [f] for f in resolve(model, config)}
            return
        self.pruner = GroupPruner(model, config, example_inputs)
        self.kind = "group"
        self.layers = {name: sorted({fqn.rpartition(".")[0] for fqn, _ in g.members})
                       for name, g in self.pruner.groups.items()}

    def pruned_group(self, unit: str, level: float) -> nn.Module:
        """A copy of the model without group `unit`'s channels at ratio `level`."""
        if self.pruner is None:
            raise ConfigError(f"make_bundle: {unit!r} is a layer of a mask config, not a channel group")
        return self.pruner.pruned(unit, level).eval()


def _pruned_model(model: nn.Module, units: _Units, unit: str, level: float) -> nn.Module:
    """The whole model with one unit pruned at `level` (a copy)."""
    if units.kind == "group":
        return units.pruned_group(unit, level)
    whole = copy_module(model)
    layer = dict(whole.named_modules())[unit]
    parent_name, _, child = unit.rpartition(".")
    parent = dict(whole.named_modules())[parent_name] if parent_name else whole
    setattr(parent, child, zeroed_variant(layer, level))
    return whole


def _unit_variants(writer: _Writer, model: nn.Module, example_inputs: tuple[Tensor, ...], units: _Units,
                   unit: str, index: int, levels: list[float], variants: str) -> dict[str, Any]:
    """Export one unit's dense and per-level variants; returns its manifest entry."""
    entry: dict[str, Any] = {"name": unit, "dense": None, "levels": []}
    if variants == "whole":
        for i, level in enumerate(levels):
            pruned = _pruned_model(model, units, unit, level)
            entry["levels"].append(writer.variant(f"u{index}_l{i}", pruned, example_inputs))
        return entry
    fqns = units.layers[unit]
    dense, inputs = _layers_variant(model, example_inputs, fqns)
    entry["dense"] = writer.variant(f"u{index}_dense", dense, inputs)
    for i, level in enumerate(levels):
        if units.kind == "group":
            sub, sub_inputs = _layers_variant(units.pruned_group(unit, level), example_inputs, fqns)
        else:
            sub, sub_inputs = _Calls([zeroed_variant(dict(model.named_modules())[unit], level)]), inputs
        entry["levels"].append(writer.variant(f"u{index}_l{i}", sub, sub_inputs))
    return entry


def _as_tuple(example_inputs: Any) -> tuple[Tensor, ...]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise ConfigError("make_bundle: example_inputs must be a tensor or a tuple of tensors (positional inputs), "
                      f"got {type(example_inputs).__name__}")


def make_bundle(
    model: nn.Module,
    config: FrozenConfig,
    levels: Sequence[float],
    example_inputs: Any,
    out: str | Path,
    *,
    variants: Literal["units", "whole"] = "units",
    inputs: Literal["stored", "random"] = "stored",
    units: Sequence[str] | None = None,
    opset: int | None = None,
    progress: bool = False,
) -> Path:
    """Write a bench bundle for `model` (a folder, or a .zip if `out` ends in .zip); does not mutate.

    Args:
        model: the dense model.
        config: the family the allocation will use: a mask config (units are layers) or a
            `ChannelConfig` (units are coupled channel groups), as for `measure_latency_table`.
        levels: the levels of the sensitivity scan.
        example_inputs: a tensor or tuple of tensors, the inputs to serve (e.g. batch 1).
        out: the folder (replaced if it holds an earlier bundle) or .zip file to write, atomically.
        variants: "units" (each unit's touched layers, as `measure_latency_table` times them) or
            "whole" (the whole model with one unit pruned).
        inputs: "stored" saves every variant's real input as `.npy` (most of a bundle's size);
            "random" stores only each input's shape, dtype, mean/std (or integer range) and a
            seed, and the runner draws a stand-in with numpy's seeded generator. Dense kernels
            take the same time on any values of the right shape, so the table barely changes.
        units: time only these units (default all); a table from a subset allocates only them.
        opset: ONNX opset (default that of `export_onnx`).
        progress: show a progress bar over units.

    Returns:
        The path written.

    Raises:
        ConfigError: an unknown unit, a bad config or `out` holds something that is not a bundle.
        TraceError: a variant cannot be exported to ONNX (the message names the model type).
    """
    if inputs not in ("stored", "random"):
        raise ConfigError(f"make_bundle.inputs: {inputs!r} is not supported; use 'stored' or 'random'")
    random_inputs = inputs == "random"
    tensors, levels = _as_tuple(example_inputs), [float(lv) for lv in levels]
    out = Path(out)
    if out.suffix != ".zip" and out.exists() and any(out.iterdir()) and not (out / "manifest.json").exists():
        raise ConfigError(f"make_bundle: {str(out)!r} exists and is not a bench bundle; choose an empty folder")
    found = _Units(model, config, tensors)
    names = list(found.layers)
    chosen = names if units is None else list(units)
    unknown = [u for u in chosen if u not in names]
    if unknown:
        raise ConfigError(f"make_bundle.units: no prunable {found.kind} named {unknown[:4]} (have {names[:6]})")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        writer = _Writer(staging, DEFAULT_OPSET if opset is None else opset, random_inputs)
        manifest = _write_bundle(writer, model, config, levels, tensors, found, chosen, variants, progress)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        shutil.copyfile(RUNNER, staging / RUNNER.name)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_bundle(writer: _Writer, model: nn.Module, config: FrozenConfig, levels: list[float],
                  inputs: tuple[Tensor, ...], found: _Units, chosen: list[str],
                  variants: str, progress: bool) -> dict[str, Any]:
    entries = [_unit_variants(writer, model, inputs, found, u, i, levels, variants)
               for i, u in progress_bar(list(enumerate(chosen)), "bench bundle", progress)]
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": FORMAT_VERSION, "prunekit_version": prunekit_version(),
        "model_fingerprint": model_fingerprint(model), "model_type": type(model).__name__,
        "config": config_to_dict(config), "levels": levels, "kind": found.kind, "variants": variants,
        "input_shapes": [list(x.shape) for x in inputs], "inputs": "random" if writer.random else "stored",
        "model": writer.variant("model", copy_module(model), inputs),
        "units": entries,
    }
    manifest["bundle_id"] = bundle_id(manifest)
    return manifest


def bundle_id(manifest: dict[str, Any]) -> str:
    """A hash of everything the manifest says except the id itself."""
    body = {k: v for k, v in manifest.items() if k != "bundle_id"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


def _publish(staging: Path, out: Path) -> None:
    """Move the finished bundle into place: a .zip through an atomic file, a folder by rename."""
    if out.suffix == ".zip":
        with atomic_writer(out) as stream, zipfile.ZipFile(stream, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(staging.rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(staging).as_posix())
        return
    old = None
    if out.exists():  # an earlier bundle: swap, so the path always holds a complete one or the old
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / "bundle")
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
