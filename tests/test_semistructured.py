"""2:4 semi-structured GPU path: eligibility everywhere, conversion only with CUDA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.deploy.semistructured import ineligible_reason, to_semi_structured
from prunekit.errors import PrunekitError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_ineligible_layers_say_why() -> None:
    layer = nn.Linear(128, 64)
    assert "CUDA" in ineligible_reason("fc", layer)
    pk.prune(layer, pk.NMConfig(n=2, m=4))
    assert "finalize" in ineligible_reason("fc", layer)
    assert "not nn.Linear" in ineligible_reason("c", nn.Conv2d(4, 4, 1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_without_cuda_the_error_is_clear() -> None:
    with pytest.raises(PrunekitError, match="CUDA"):
        to_semi_structured(nn.Linear(64, 64), batch_size=8)


@pytest.mark.gpu
@needs_cuda
def test_converted_layers_match_dense_and_slow_ones_stay_dense() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 64), nn.Linear(64, 10))
    pk.finalize(pk.prune(model, pk.NMConfig(n=2, m=4)))
    model = model.half().cuda()
    x = torch.randn(256, 1024, device="cuda", dtype=torch.half)
    with torch.no_grad():
        dense = model(x)
    report = to_semi_structured(model, batch_size=256, min_speedup=0.0)  # convert all eligible
    assert set(report.converted) == {"0", "2"} and "3" in report.skipped
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense, rtol=1e-2, atol=1e-2)
