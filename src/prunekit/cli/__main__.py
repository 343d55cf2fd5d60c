"""`python -m prunekit.cli ...`: the command line (as `python -m prunekit`)."""

from __future__ import annotations

from prunekit.cli import app

if __name__ == "__main__":  # pragma: no cover - run as a module
    app(prog_name="prunekit")
