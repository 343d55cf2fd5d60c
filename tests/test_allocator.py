"""`retained_memory`: freed activations stay mapped while timing, so calls stop page-faulting."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prunekit.measure import heap as allocator

PAGES = (64 << 20) // 4096  # a 64 MiB tensor: above glibc's largest mmap threshold

# In a fresh interpreter: glibc's thresholds are process-wide, and once any test has used
# `retained_memory` this process no longer shows glibc's defaults.
SCRIPT = f"""
import json, torch
from prunekit.measure import heap as allocator
from prunekit.measure.bench import measure_latency

def faults(calls=6):
    out = []
    for _ in range(calls):
        before = allocator.minor_page_faults()
        torch.empty({PAGES} * 1024).fill_(1.0)  # allocated, touched, freed
        out.append(allocator.minor_page_faults() - before)
    return out

class Scratch(torch.nn.Module):  # a 64 MiB activation, written and freed within each call
    def forward(self, x):
        return torch.empty({PAGES} * 1024).fill_(1.0)[:1] + x

model, x = Scratch(), torch.zeros(1)
default = measure_latency({{"m": model}}, x, repeats=4, warmup=5, retain_memory=False)["m"]
kept = measure_latency({{"m": model}}, x, repeats=4, warmup=5)["m"]
out = {{"default": faults()}}
with allocator.retained_memory():
    with allocator.retained_memory():
        pass
    out["inside"] = faults()  # still inside the outer block
out.update(default_call=default.page_faults_per_call, kept_call=kept.page_faults_per_call)
print(json.dumps(out))
"""


@pytest.mark.skipif(allocator._glibc() is None, reason="mallopt is glibc's")
def test_freed_memory_is_reused_inside_and_refaulted_by_default() -> None:
    out = json.loads(subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout)
    assert min(out["default"][-3:]) > 0.5 * PAGES  # glibc maps and unmaps the block every time
    assert max(out["inside"][-3:]) < 0.01 * PAGES  # steady state: the heap keeps the pages
    assert out["default_call"] > 0.5 * PAGES > 0.01 * PAGES > out["kept_call"]


def test_description_names_what_was_done() -> None:
    with allocator.retained_memory() as description:
        assert description in (allocator.RETAINED, allocator.UNCHANGED)
