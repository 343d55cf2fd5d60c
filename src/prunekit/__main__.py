"""`python -m prunekit ...`, and `torchrun --nproc_per_node N -m prunekit prune ...`: the command line."""

from __future__ import annotations

from prunekit.cli import app

if __name__ == "__main__":  # pragma: no cover - run as a module
    app(prog_name="prunekit")
