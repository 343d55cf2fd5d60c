"""Where a traced op came from in the user's source, and whether it spells a size as a number.

`torch.export` specialises shapes: `torch.split(x, 32, 1)` and `torch.split(x, x.shape[1] // 2, 1)`
both become `aten.split.Tensor(x, 32, 1)`. Only the second still runs once `x` lost channels.
The node's `stack_trace` names the line of the module's `forward` that made it; parsing that
line tells a number written in the source (a literal: the pruned model would fail) from an
expression (a shape, an attribute a layer handler updates, like GPT-2's `split_size`).
When the line cannot be read or holds no such call (a helper function), the answer is
"unknown", and the self-check after planning (see `plan.py`) is what catches a bad guess.
"""

from __future__ import annotations

import ast
import linecache
import os
import re
from pathlib import Path

import torch
from torch.fx import Node

_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)')
_TORCH = os.path.join(str(Path(torch.__file__).parent), "")  # with the separator: not torchvision/


def _last_frame(node: Node) -> tuple[str, int, str] | None:
    """(file, line number, stripped source line) of the innermost traced frame outside torch.

    `nn.Conv2d.forward` calling `F.conv2d` is torch's line; the caller's `self.conv(x)` is the
    one to name.
    """
    trace = node.meta.get("stack_trace") or ""
    frames = list(_FRAME.finditer(trace))
    if not frames:
        return None
    frame = next((f for f in reversed(frames) if not f["file"].startswith(_TORCH)), frames[-1])
    file, line = frame["file"], int(frame["line"])
    text = linecache.getline(file, line).strip()
    if not text:  # the stack trace itself quotes the line under its frame
        rest = trace[frame.end() :].splitlines()
        text = rest[1].strip() if len(rest) > 1 else ""
    return file, line, text


def location(node: Node) -> str:
    """'file.py:15 `code`' for `node` (file name only), or '' when the trace has no frame."""
    frame = _last_frame(node)
    if frame is None:
        return ""
    file, line, text = frame
    code = f" `{text[:80]}`" if text else ""
    return f"{Path(file).name}:{line}{code}"


def _is_literal(expr: ast.expr) -> bool:
    if isinstance(expr, ast.Constant):
        return isinstance(expr.value, int) and not isinstance(expr.value, bool)
    if isinstance(expr, ast.UnaryOp) and isinstance(expr.op, ast.USub):
        return _is_literal(expr.operand)
    if isinstance(expr, (ast.List, ast.Tuple)):
        return bool(expr.elts) and all(_is_literal(e) for e in expr.elts)
    return False


def _size_argument(call: ast.Call, keywords: tuple[str, ...]) -> ast.expr | None:
    """The size argument of `torch.split(x, size, ...)` or `x.split(size, ...)`."""
    for kw in call.keywords:
        if kw.arg in keywords:
            return kw.value
    func = call.func
    as_function = isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "torch"
    position = 1 if as_function or isinstance(func, ast.Name) else 0
    return call.args[position] if len(call.args) > position else None


def literal_split_size(node: Node) -> bool | None:
    """Whether the `split` call behind `node` spells its sizes as numbers (None: cannot tell)."""
    frame = _last_frame(node)
    if frame is None or not frame[2]:
        return None
    try:
        tree = ast.parse(frame[2])
    except SyntaxError:  # one line of a statement spanning several
        return None
    answers = set()
    for call in ast.walk(tree):
        if not isinstance(call, ast.Call):
            continue
        name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
        if name in ("split", "split_with_sizes"):
            size = _size_argument(call, ("split_size_or_sections", "split_size", "split_sizes"))
            if size is not None:
                answers.add(_is_literal(size))
    return answers.pop() if len(answers) == 1 else None
