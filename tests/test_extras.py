"""A missing optional dependency fails with one kind of error: what needed it and the pip extra to install."""

from __future__ import annotations

import sys

import pytest

from prunekit.core.extras import require
from prunekit.deploy.onnx_check import require_onnx
from prunekit.errors import PrunekitError
from prunekit.measure.report_render import figure_png


def test_require_returns_the_module_or_names_the_extra() -> None:
    assert require("json", extra="none", what="a test").dumps([1]) == "[1]"
    with pytest.raises(PrunekitError, match=r"a test needs no_such_module_x \(.*\); install with: "
                                            r"pip install 'prunekit\[none\]'"):
        require("no_such_module_x", extra="none", what="a test")


@pytest.mark.parametrize(
    ("hidden", "call", "extra"),
    [("onnxruntime", require_onnx, "onnx"), ("matplotlib", lambda: figure_png(lambda ax: None), "plot")],
)
def test_guards_name_their_extra(hidden: str, call, extra: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == hidden or m.startswith(hidden + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, hidden, None)  # `import hidden` now raises ImportError
    with pytest.raises(PrunekitError, match=rf"needs {hidden} .*pip install 'prunekit\[{extra}\]'"):
        call()
