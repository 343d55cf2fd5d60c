"""The end of an LLVM IR loop that carries vector accumulators in registers, shared by the IR kernels.

`avx512` (2:4 INT8 rows) and `spmm` (many-row groups) both build a loop whose accumulators are
loaded before it, carried through it as phis and stored after it; this closes such a loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def close_accumulator_loop(
    builder: Any,
    *,
    blocks: tuple[Any, Any, Any],
    counter: tuple[Any, Any, Any],
    again: Any,
    accumulators: tuple[Sequence[Any], Sequence[Any], Sequence[Any]],
    destinations: Sequence[Any],
) -> None:
    """Wire the loop's phis, branch back while `again`, then store each accumulator's total.

    blocks: (entry, loop, done); counter: (phi, its first value, its next value);
    accumulators: (the phis, their values on entry, their values after one step). Each total is
    the entry value if the loop never ran, else the last step's, stored to `destinations`.
    """
    entry, loop, done = blocks
    phi, first, following = counter
    phi.add_incoming(first, entry)
    phi.add_incoming(following, loop)
    carried, initial, updated = accumulators
    for acc, before, after in zip(carried, initial, updated, strict=True):
        acc.add_incoming(before, entry)
        acc.add_incoming(after, loop)
    builder.cbranch(again, loop, done)
    builder.position_at_end(done)
    totals = [builder.phi(v.type) for v in initial]  # phis first, as LLVM requires
    for total, before, after, destination in zip(totals, initial, updated, destinations, strict=True):
        total.add_incoming(before, entry)
        total.add_incoming(after, loop)
        builder.store(total, destination, align=4)
