"""Print how many generated fuzz cases ran, by outcome, at the end of a run that included them."""

from __future__ import annotations

import sys
from typing import Any

_FUZZ_MODULES = ("tests.reliability.test_fuzz_configs", "tests.reliability.test_fuzz_models")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for name in _FUZZ_MODULES:
        cases = getattr(sys.modules.get(name), "CASES", None)
        if not cases:
            continue
        terminalreporter.write_sep("-", f"{name.rsplit('.', 1)[-1]}: {sum(cases.values())} generated cases run")
        for label, count in sorted(cases.items()):
            terminalreporter.write_line(f"{count:>8}  {label}")
