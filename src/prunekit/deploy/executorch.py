"""`export_executorch`: write a structurally pruned (dense) model to an ExecuTorch `.pte`, checked.

ExecuTorch stores every weight dense, so it is the target for channel-pruned models (a smaller
dense network), not for unstructured sparsity. The model is traced with `torch.export`,
lowered with the XNNPACK partitioner (`to_edge_transform_and_lower`), serialised with
`.to_executorch()`, and written through `prunekit.storage.files.atomic_path`. Before the file
is renamed into place it is loaded by ExecuTorch's Python runtime (`executorch.runtime.Runtime`)
and run on the example inputs; its outputs must match PyTorch's, so a failed export or check
never leaves a file at the target path.

An op left outside XNNPACK runs on ExecuTorch's portable kernels. Ops with no portable kernel
are found before running (the program's operator list against the runtime's registry) and
named with the layer that emitted them; the runtime itself only reports "error 0x14".
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from prunekit.core.extras import require
from prunekit.core.masks import finalize, masked_modules
from prunekit.deploy.onnx_check import is_int8
from prunekit.errors import ConfigError, ExportCheckError, PrunekitError, TraceError
from prunekit.storage.files import atomic_path

log = logging.getLogger(__name__)

DEFAULT_RTOL = 1e-4  # XNNPACK's float kernels differ from ATen's only in summation order
_OP_IN_MESSAGE = re.compile(r"\baten[.:]+([A-Za-z0-9_]+)(?:\.([A-Za-z0-9_]+))?")


def require_executorch() -> Any:
    """Import ExecuTorch's exporter, partitioner and runtime, or raise an error naming the pip extra.

    Returns:
        A namespace-like dict with `to_edge_transform_and_lower`, `XnnpackPartitioner` and `Runtime`.
    """
    with _quiet():
        xnnpack, exir, runtime = (
            require(m, extra="executorch", what="ExecuTorch export")
            for m in ("executorch.backends.xnnpack.partition.xnnpack_partitioner", "executorch.exir",
                      "executorch.runtime")
        )
    return {"lower": exir.to_edge_transform_and_lower, "partitioner": xnnpack.XnnpackPartitioner,
            "Runtime": runtime.Runtime}


@dataclass(frozen=True)
class ExecuTorchReport:
    """What `export_executorch` wrote and what its check found.

    `delegated_nodes`/`portable_nodes` count the edge graph's operator nodes run by XNNPACK and
    left to ExecuTorch's portable kernels. `max_rel_diff` is max |pte - torch| divided by
    max |torch|, per output, the largest over outputs; None when `check=False`.
    """

    path: Path
    size_bytes: int
    delegated_nodes: int
    portable_nodes: int
    checked: bool
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    rtol: float = DEFAULT_RTOL
    max_batch: int | None = None

    @property
    def delegated_fraction(self) -> float:
        """Fraction of operator nodes lowered to XNNPACK (1.0 for a fully delegated model)."""
        total = self.delegated_nodes + self.portable_nodes
        return self.delegated_nodes / total if total else 0.0

    def summary(self) -> str:
        """One line: size, delegation and the check."""
        line = (f"{self.path}: {self.size_bytes:,} bytes, {self.delegated_fraction:.0%} of "
                f"{self.delegated_nodes + self.portable_nodes} op nodes delegated to XNNPACK")
        if self.max_batch is not None:
            line += f", batch 1..{self.max_batch}"
        if self.checked:
            line += (f"; check passed: outputs within rtol={self.rtol:g} of PyTorch "
                     f"(max |diff| {self.max_abs_diff:.3g}, relative {self.max_rel_diff:.3g})")
        return line

    def __str__(self) -> str:
        return self.summary()


def export_executorch(
    model: nn.Module,
    path: str | Path,
    example_inputs: Any,
    *,
    check: bool = True,
    rtol: float = DEFAULT_RTOL,
    reference: nn.Module | None = None,
    max_batch: int | None = None,
) -> ExecuTorchReport:
    """Export `model` to an ExecuTorch `.pte` (XNNPACK delegate), checked, written atomically (does not mutate).

    Shapes are static (the file runs on inputs shaped like `example_inputs`, batch included)
    unless `max_batch` is given: then dim 0 of every input is a `torch.export.Dim` from 1 to
    `max_batch` (ExecuTorch sizes its buffers for `max_batch`). Masked models are exported as
    a finalized copy (plain weights with zeros, stored dense).

    Args:
        model: a float model; switched to eval mode for the export and restored afterwards.
        path: the `.pte` file to write; its folder is created.
        example_inputs: a tensor or a tuple of tensors (positional arguments of `forward`).
        check: load the written file with ExecuTorch's runtime, run it on `example_inputs` and
            compare every output with PyTorch's before the file is moved into place.
        rtol: the check passes when, per output, max |pte - torch| <= rtol * max |torch|.
        reference: the module whose outputs the file must reproduce; default `model`.
        max_batch: make the batch dimension dynamic up to this size; the check then also runs
            a batch of `max_batch` (the example rows repeated). None: static shapes.

    Returns:
        An `ExecuTorchReport` with the file size, the XNNPACK delegation and the check.

    Raises:
        PrunekitError: executorch is not installed (the message names the extra), or `path`
            cannot be written.
        ConfigError: `rtol` is not positive, `max_batch` is below the example batch, or the
            model is INT8 (export the float model).
        TraceError: torch.export or the lowering fails; an unsupported op is named, with its
            layer where the graph records it.
        ExportCheckError: the file needs a kernel the runtime lacks, cannot be run, or its
            outputs differ from PyTorch's (the message gives the max difference). Nothing is
            written then.

    Example:
        >>> report = export_executorch(pruned, "out/model.pte", torch.randn(1, 3, 224, 224))  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
    """
    et = require_executorch()
    if not (isinstance(rtol, (int, float)) and rtol > 0):
        raise ConfigError(f"export_executorch.rtol: {rtol!r} must be a positive number")
    if is_int8(model):
        raise ConfigError(f"export_executorch: {type(model).__name__} is INT8-quantized by prunekit; export "
                          "the float model (XNNPACK quantization is a separate ExecuTorch step)")
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    _check_max_batch(max_batch, inputs)
    reference = model if reference is None else reference
    was_training, ref_training = model.training, reference.training
    model.eval()
    reference.eval()
    try:
        net = finalize(copy.deepcopy(model)) if masked_modules(model) else model
        edge = _lower(et, net, inputs, max_batch)
        delegated, portable = _delegation(edge)
        blob, operators = _serialise(edge)
        abs_diff = rel_diff = None
        with atomic_path(path) as tmp:
            tmp.write_bytes(blob)
            if check:
                _check_kernels(et, operators, edge)
                run = load_pte(tmp)
                for batch in [inputs] + ([] if max_batch is None else [_rows(inputs, max_batch)]):
                    with torch.no_grad():
                        expected = _flat(reference(*batch))
                    diffs = _compare(run(*batch), expected, rtol)
                    abs_diff, rel_diff = max(abs_diff or 0.0, diffs[0]), max(rel_diff or 0.0, diffs[1])
    finally:
        model.train(was_training)
        reference.train(ref_training)
    report = ExecuTorchReport(Path(path), len(blob), delegated, portable, check, abs_diff, rel_diff, float(rtol),
                              max_batch)
    log.info("%s", report.summary())
    return report


# --------------------------------------------------------------------------------------------
# Lowering.


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence ExecuTorch's and torchao's import-time and per-pass warnings (logged at WARNING)."""
    was = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(was)


def _check_max_batch(max_batch: int | None, inputs: tuple[Tensor, ...]) -> None:
    if max_batch is None:
        return
    batches = {int(x.shape[0]) for x in inputs if isinstance(x, Tensor) and x.dim() > 0}
    if not isinstance(max_batch, int) or max_batch < max(batches | {1}) or len(batches) != 1:
        raise ConfigError(f"export_executorch.max_batch: {max_batch!r} must be an int >= the example batch "
                          f"{sorted(batches)}, and every input must be a tensor with the same batch size")


def _rows(inputs: tuple[Tensor, ...], batch: int) -> tuple[Tensor, ...]:
    """`inputs` with their rows repeated (cycled) to `batch` rows."""
    return tuple(x.repeat(-(-batch // x.shape[0]), *([1] * (x.dim() - 1)))[:batch] for x in inputs)


def _lower(et: dict[str, Any], net: nn.Module, inputs: tuple[Tensor, ...], max_batch: int | None = None) -> Any:
    """`net` traced by torch.export and lowered to the edge dialect with XNNPACK partitions.

    With `max_batch`, dim 0 is dynamic; it is traced on two rows at least, since torch.export
    specialises a dimension it sees as 1.
    """
    dynamic = None
    if max_batch is not None:
        batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
        dynamic = tuple({0: batch} for _ in inputs)
        inputs = _rows(inputs, max(2, int(inputs[0].shape[0])))
    try:
        with _quiet():
            program = torch.export.export(net, inputs, dynamic_shapes=dynamic)
    except Exception as err:  # torch.export raises many types; all mean "does not trace"
        raise TraceError(f"{type(net).__name__} could not be traced by torch.export for ExecuTorch: "
                         f"{_first_line(err)}. Make forward traceable: no data-dependent Python "
                         "control flow, tensor inputs only") from err
    try:
        with _quiet():
            return et["lower"](program, partitioner=[et["partitioner"]()])
    except Exception as err:  # the verifier and the passes raise many types
        op = _op_in_message(str(err))
        where = _layer_of(program.graph_module, op) if op else None
        named = f"op {op}" + (f" in layer {where!r}" if where else "") if op else "an op"
        raise TraceError(f"ExecuTorch cannot lower {type(net).__name__}: {named} is not supported "
                         f"({_first_line(err)}). Exclude or rewrite that layer") from err


def _serialise(edge: Any) -> tuple[bytes, list[str]]:
    """The `.pte` bytes and the kernel names (`aten::op.overload`) its non-delegated part calls."""
    try:
        with _quiet():
            manager = edge.to_executorch()
            blob = bytes(manager.buffer)
    except Exception as err:
        raise TraceError(f"ExecuTorch cannot serialise the lowered program: {_first_line(err)}") from err
    operators = [f"{op.name}.{op.overload}" if op.overload else op.name
                 for plan in manager.executorch_program.execution_plan for op in plan.operators]
    return blob, operators


def _delegation(edge: Any) -> tuple[int, int]:
    """(delegated, portable) operator node counts of the lowered edge program."""
    try:
        from executorch.devtools.backend_debug import get_delegation_info

        info = get_delegation_info(edge.exported_program().graph_module)
        return int(info.num_delegated_nodes), int(info.num_non_delegated_nodes)
    except Exception:  # devtools is optional inside executorch; the counts are only informative
        return 0, 0


def _op_in_message(text: str) -> str | None:
    """The first ATen op an error message names, as `aten.name.overload` (None if it names none)."""
    found = _OP_IN_MESSAGE.search(text.replace("torch._ops.", ""))
    if not found:
        return None
    return f"aten.{found.group(1)}" + (f".{found.group(2)}" if found.group(2) else "")


def _layer_of(graph_module: torch.fx.GraphModule, op: str) -> str | None:
    """The FQN of the module whose forward emitted the first node calling `op` ("" for the root)."""
    base = op.split(".")[1] if "." in op else op
    for node in graph_module.graph.nodes:
        name = str(getattr(node.target, "_name", None) or node.target)  # EdgeOpOverload: "aten::sort"
        if node.op == "call_function" and re.search(rf"aten(::|\.){re.escape(base)}\b", name):
            stack = node.meta.get("nn_module_stack") or {}
            return list(stack.values())[-1][0] if stack else None
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


# --------------------------------------------------------------------------------------------
# Checking and running a written file.


def _check_kernels(et: dict[str, Any], operators: list[str], edge: Any) -> None:
    """Raise ExportCheckError naming each op of the program the runtime has no kernel for."""
    with _quiet():
        registered = set(et["Runtime"].get().operator_registry.operator_names)
    missing = []
    for name in dict.fromkeys(operators):
        if name not in registered:
            layer = _layer_of(edge.exported_program().graph_module, name.split(".")[0].replace("::", "."))
            missing.append(name + (f" (layer {layer!r})" if layer else ""))
    if missing:
        raise ExportCheckError(f"the .pte needs ops ExecuTorch's runtime has no kernel for: {', '.join(missing)}. "
                               "XNNPACK did not take them and no portable kernel exists; rewrite or exclude "
                               "those layers")


def _flat(outputs: Any) -> list[Tensor]:
    leaves, _ = pytree.tree_flatten(outputs)
    return [t.detach() for t in leaves if isinstance(t, Tensor)]


def _compare(got: list[Tensor], expected: list[Tensor], rtol: float) -> tuple[float, float]:
    """(max abs diff, max relative diff) over outputs; raises ExportCheckError past `rtol`."""
    if len(got) != len(expected):
        raise ExportCheckError(f"the .pte returned {len(got)} outputs, PyTorch {len(expected)}")
    worst_abs = worst_rel = 0.0
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if g.shape != e.shape:
            raise ExportCheckError(f"output {i}: the .pte gives shape {tuple(g.shape)}, PyTorch {tuple(e.shape)}")
        diff = float((g.double() - e.double()).abs().max()) if e.numel() else 0.0
        scale = float(e.double().abs().max()) if e.numel() else 0.0
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
        if not rel <= rtol:  # also catches NaN
            raise ExportCheckError(f"output {i} of the .pte differs from PyTorch: max |diff| {diff:.3g}, "
                                   f"{rel:.3g} of max |output| {scale:.3g} (rtol {rtol:g})")
        worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, rel)
    return worst_abs, worst_rel


def load_pte(path: str | Path) -> Callable[..., list[Tensor]]:
    """Load a `.pte` with ExecuTorch's Python runtime; returns `run(*inputs) -> list of output tensors`.

    Raises:
        PrunekitError: executorch is not installed.
        ExportCheckError: the file cannot be loaded (corrupt, or an op without a kernel).
    """
    et = require_executorch()
    try:
        with _quiet():
            method = et["Runtime"].get().load_program(Path(path)).load_method("forward")
    except Exception as err:  # the runtime raises RuntimeError with only an error code
        raise ExportCheckError(f"ExecuTorch cannot load {str(path)!r}: {_first_line(err)}") from err

    def run(*inputs: Tensor) -> list[Tensor]:
        return list(method.execute(list(inputs)))

    return run


def set_pte_threads(threads: int) -> None:
    """Resize ExecuTorch's (XNNPACK's) process-wide thread pool to `threads` (mutates global state)."""
    require_executorch()
    from executorch.extension.pybindings import portable_lib

    reset = getattr(portable_lib, "_unsafe_reset_threadpool", None)
    if reset is None:
        raise PrunekitError("this executorch build cannot resize its thread pool; set threads at build time")
    reset(int(threads))


def time_pte(path: str | Path, inputs: Sequence[Tensor], repeats: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of one run of the `.pte` on `inputs`, after `warmup` runs (does not mutate).

    For timings interleaved with other runtimes, call `load_pte` and time the callable instead.
    """
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"time_pte: repeats={repeats!r} must be >= 1 and warmup={warmup!r} >= 0")
    run = load_pte(path)
    for _ in range(warmup):
        run(*inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(*inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
