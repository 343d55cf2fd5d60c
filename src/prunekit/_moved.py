"""Deep import paths from before the stage subpackages (prunekit 0.1), kept for one release.

`prunekit.masks`, `prunekit.bench`, ... still import, as thin aliases that warn with the new
path and forward every attribute to it; names that moved between modules (`UnstructuredConfig`
out of `prunekit.config`) forward the same way. Delete this file and its one line in
`__init__.py` in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

# old module path -> new module path
MODULES: dict[str, str] = {
    "prunekit.files": "prunekit.storage.files",
    "prunekit.resume": "prunekit.storage.runstate",
    "prunekit.targets": "prunekit.core.targets",
    "prunekit.masks": "prunekit.core.masks",
    "prunekit.criteria": "prunekit.core.criteria",
    "prunekit.plan": "prunekit.core.plan",
    "prunekit.memory": "prunekit.core.memory",
    "prunekit.data": "prunekit.zoo.data",
    "prunekit.llm": "prunekit.zoo.llm",
    "prunekit.calibration": "prunekit.methods.calibration",
    "prunekit.wanda": "prunekit.methods.wanda",
    "prunekit.sparsegpt": "prunekit.methods.sparsegpt",
    "prunekit.nm": "prunekit.methods.nm",
    "prunekit.block": "prunekit.methods.block",
    "prunekit.structured.iterative": "prunekit.train.iterative",
    "prunekit.schedule": "prunekit.train.schedule",
    "prunekit.distill": "prunekit.train.distill",
    "prunekit.integrations": "prunekit.train.integrations",
    "prunekit.export": "prunekit.deploy.checkpoint",
    "prunekit.quantize": "prunekit.deploy.quantize",
    "prunekit.onnx_export": "prunekit.deploy.onnx_export",
    "prunekit.onnx_check": "prunekit.deploy.onnx_check",
    "prunekit.semistructured": "prunekit.deploy.semistructured",
    "prunekit.bench": "prunekit.measure.bench",
    "prunekit.allocator": "prunekit.measure.heap",
    "prunekit.report": "prunekit.measure.report",
    "prunekit.sensitivity": "prunekit.allocation.sensitivity",
    "prunekit.sensitivity_groups": "prunekit.allocation.sensitivity.groups",
    "prunekit.sensitivity_table": "prunekit.allocation.sensitivity.table",
    "prunekit.latency_table": "prunekit.allocation.latency",
    "prunekit.allocate": "prunekit.allocation.allocate",
    "prunekit.search": "prunekit.allocation.search",
    "prunekit.recipe": "prunekit.recipes.run",
    "prunekit.structured.ops_matmul": "prunekit.structured.ops.matmul",
    "prunekit.structured.ops_shape": "prunekit.structured.ops.shape",
    "prunekit.runtime.kernels_numba": "prunekit.runtime.kernels.numba",
    "prunekit.runtime.kernels_avx512": "prunekit.runtime.kernels.avx512",
    "prunekit.demo": "prunekit.recipes.demo",
}

# (module, name) -> the module the name lives in now, for names that left a module that stayed
NAMES: dict[tuple[str, str], str] = {
    ("prunekit.structured", "prune_iteratively"): "prunekit.train.iterative",
    ("prunekit.config", "UnstructuredConfig"): "prunekit.methods.unstructured",
    ("prunekit.runtime.kernels_numba", "sparse_linear"): "prunekit.runtime.kernels",
    ("prunekit.allocation.allocate", "run_sensitivity_recipe"): "prunekit.recipes.sensitivity",
    ("prunekit.allocation.search", "run_search_recipe"): "prunekit.recipes.search",
    ("prunekit.deploy.quantize", "is_quantized_linear"): "prunekit.deploy.int8",
    ("prunekit.deploy.quantize", "int8_state"): "prunekit.deploy.int8",
    ("prunekit.deploy.quantize", "load_int8_state"): "prunekit.deploy.int8",
    ("prunekit.deploy.quantize", "int8_sparsity"): "prunekit.deploy.int8",
    ("prunekit.deploy.onnx_export", "export_command"): "prunekit.cli",
    ("prunekit.deploy.checkpoint", "MAX_HEADER_BYTES"): "prunekit.storage.safetensors",
}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; the old path goes away in prunekit 0.3", DeprecationWarning, stacklevel=3)


def moved_name(module: str, name: str) -> Any:
    """The object `module.name` now found elsewhere (see `NAMES`), with a deprecation warning.

    Raises:
        AttributeError: `name` never lived in `module`, as Python's own lookup would.
    """
    new = NAMES.get((module, name))
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    _warn(f"{module}.{name}", f"{new}.{name}")
    return getattr(importlib.import_module(new), name)


class _Alias(types.ModuleType):
    """An old module path: every attribute is read from the new module. Calling it calls the
    function of the same name, so `import prunekit.plan` cannot shadow `prunekit.plan()`."""

    _target: types.ModuleType

    def __getattr__(self, name: str) -> Any:
        target = self.__dict__.get("_target")
        if target is None:  # asked before exec_module ran (import machinery probing attributes)
            raise AttributeError(name)
        if not hasattr(target, name) and (self.__name__, name) in NAMES:
            return moved_name(self.__name__, name)
        return getattr(target, name)

    def __dir__(self) -> list[str]:
        return dir(self._target)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._target, self.__name__.rpartition(".")[2])(*args, **kwargs)


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _Alias(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        new = MODULES[module.__name__]
        _warn(module.__name__, new)
        target = importlib.import_module(new)
        module._target = target  # type: ignore[attr-defined]
        names = getattr(target, "__all__", [n for n in vars(target) if not n.startswith("_")])
        setattr(module, "__all__", list(names))  # noqa: B010  (ModuleType declares no __all__)


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader())


def moved_module(package: str, name: str) -> Any:
    """`prunekit.<name>` as an attribute, for an old module path (`pk.masks`): its alias, which warns.

    Raises:
        AttributeError: `name` was never a module of `package`.
    """
    if f"{package}.{name}" not in MODULES:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return importlib.import_module(f"{package}.{name}")


def install() -> None:
    """Put the alias finder last on `sys.meta_path` (once), after every real module."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
