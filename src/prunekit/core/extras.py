"""Optional dependencies: import one, or fail with an error that names the pip extra to install.

prunekit keeps heavy libraries (coremltools, ExecuTorch, onnx, matplotlib, transformers, the
trackers) as extras; every stage that needs one asks here, so a missing one always reads the
same way: what needed it, the import error, and the ``pip install 'prunekit[extra]'`` line.
"""

from __future__ import annotations

from types import ModuleType

from prunekit.errors import PrunekitError


def require(module: str, *, extra: str, what: str) -> ModuleType:
    """The module named `module` (dotted), or a `PrunekitError` naming ``pip install 'prunekit[extra]'``.

    Imported through ``__import__``, as an ``import`` statement is (a non-empty `fromlist` makes it
    return the leaf module, not the top package).
    """
    try:
        return __import__(module, fromlist=["__name__"])
    except ImportError as err:
        raise PrunekitError(f"{what} needs {module} ({err}); install with: pip install 'prunekit[{extra}]'") from None
