"""The INT8 x INT8 many-row kernel (`kernels.spmm_vnni`): exact against its own quantization, close to fp32."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import prunekit as pk
from prunekit.errors import PrunekitError
from prunekit.runtime import autotune as acc
from prunekit.runtime import candidates as cand
from prunekit.runtime import formats, kernels
from prunekit.runtime.kernels import spmm, spmm_vnni

pytest.importorskip("numba")
needs_vnni = pytest.mark.skipif(not spmm_vnni.available(), reason="needs AVX-512 VNNI")


def _weight(out_f: int, in_f: int, seed: int, density: float = 0.2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) < density)
    w[1] = 0  # an empty output row
    w[:, 4:8] = 0  # a quad of inputs no row reads
    return w


def _quantized(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x as the kernel quantizes it (its own quantizer): int8 values (as float64) and per-row scales."""
    q, scales = np.empty(tuple(x.shape), np.uint8), np.zeros(x.shape[0], np.float32)
    spmm_vnni.quantizer()(x.numpy(), x.numpy().view(np.uint32), q, scales)
    return torch.from_numpy(q.astype(np.float64) - 128), torch.from_numpy(scales).double()[:, None]


def _quantized_reference(packed: formats.PackedWeight, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in float64: the int8 x times the int8 weight, then both scales and the bias."""
    w = torch.zeros(packed.shape, dtype=torch.float64)
    rows = np.repeat(np.arange(packed.shape[0]), np.diff(packed.rowptr))
    for r, quad, values in zip(rows, packed.cols, packed.values.reshape(-1, 4), strict=True):
        w[r, 4 * int(quad): 4 * int(quad) + 4] = torch.from_numpy(values.astype(np.float64))
    xq, scale = _quantized(x)
    return ((xq @ w.T) * scale * torch.from_numpy(packed.scales).double() + bias.double()).float()


def test_x_is_rounded_to_the_nearest_step_of_its_row_scale() -> None:
    x = torch.randn(37, 300, generator=torch.Generator().manual_seed(0))
    x[3] = 0
    xq, scale = _quantized(x)
    expected = x.double().abs().amax(dim=1, keepdim=True) / 127
    expected[3] = 1
    torch.testing.assert_close(scale, expected, rtol=1e-6, atol=0)
    assert xq.abs().max() == 127 and (xq[3] == 0).all()
    assert ((xq - x.double() / scale).abs() <= 0.5 + 1e-4).all()  # round to nearest (ties may go either way)


@needs_vnni
@pytest.mark.parametrize("rows", [9, 16, 17, 64, 129])
def test_matches_its_quantized_reference_and_fp32(rows: int) -> None:
    # several blocks of output rows, panels of quads (512 inputs) and tiles of x, each with a partial last one
    out_f, in_f = spmm.BLOCK * 2 + 5, spmm.PANEL * 4 + 36
    g = torch.Generator().manual_seed(rows)
    w, bias, x = _weight(out_f, in_f, seed=rows), torch.randn(out_f, generator=g), torch.randn(rows, in_f, generator=g)
    x[2] = 0  # a zero row of x: scale 1, output = bias
    packed = formats.pack_bsr(w, spmm_vnni.QUAD, int8=True)
    y = torch.from_numpy(kernels.sparse_linear(packed, x.numpy(), bias.numpy(), many_rows=True))
    torch.testing.assert_close(y, _quantized_reference(packed, x, bias), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y[2], bias)
    exact = F.linear(x, w, bias)
    assert (y - exact).norm() / exact.norm() < 0.02  # two int8 roundings: ~1 %


@needs_vnni
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_small_batches_run_the_weight_only_kernel(rows: int) -> None:
    w, bias, x = _weight(45, 36, seed=rows), torch.randn(45), torch.randn(rows, 36)
    packed = formats.pack_bsr(w, spmm_vnni.QUAD, int8=True)
    y = torch.from_numpy(kernels.sparse_linear(packed, x.numpy(), bias.numpy(), many_rows=True))
    s = torch.from_numpy(packed.scales)[:, None]
    dequantized = (w / s).round().clamp(-127, 127) * s  # x stays fp32 up to 8 rows
    torch.testing.assert_close(y, F.linear(x, dequantized, bias), rtol=1e-5, atol=1e-5)


@needs_vnni
def test_extreme_rows_and_weights_do_not_overflow() -> None:
    """x at +-max and weights at +-127 in every quad of 3072 inputs: int32 sums stay exact."""
    w = torch.ones(32, 3072)
    w[::2] = -1
    x = torch.full((20, 3072), 5.0)
    x[::3] = -5.0
    packed = formats.pack_bsr(w, spmm_vnni.QUAD, int8=True)
    y = kernels.sparse_linear(packed, x.numpy(), np.zeros(32, np.float32), many_rows=True)
    torch.testing.assert_close(torch.from_numpy(y), F.linear(x, w), rtol=1e-6, atol=1e-2)


@needs_vnni
def test_an_all_zero_weight_gives_the_bias() -> None:
    packed = formats.pack_bsr(torch.zeros(40, 64), spmm_vnni.QUAD, int8=True)
    bias = np.arange(40, dtype=np.float32)
    y = kernels.sparse_linear(packed, np.random.randn(33, 64).astype(np.float32), bias, many_rows=True)
    np.testing.assert_array_equal(y, np.broadcast_to(bias, (33, 40)))


def test_refuses_other_formats() -> None:
    w = _weight(16, 32, seed=0)
    if spmm_vnni.available():
        for packed in (formats.pack_bsr(w, (1, 4)), formats.pack_bsr(w, (2, 2), int8=True), formats.pack_csr(w)):
            with pytest.raises(ValueError, match="int8 'bsr' 1x4 blocks"):
                spmm_vnni.QuantizedSparseMatmul(packed, np.zeros(16, np.float32))


def test_a_cpu_without_vnni_never_sees_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spmm_vnni, "available", lambda: False)
    w = _weight(16, 32, seed=1)
    packed = formats.pack_bsr(w, spmm_vnni.QUAD, int8=True)
    with pytest.raises(PrunekitError, match="needs a CPU with AVX-512 VNNI"):
        kernels.sparse_linear(packed, np.zeros((20, 32), np.float32), np.zeros(16, np.float32), many_rows=True)
    info = cand.LayerInfo("fc", w, None, None, False, True)
    assert cand.get_candidate("numba_spmm_vnni_int8")(info) is None


def test_the_candidate_needs_int8_allowed_and_inputs_in_fours() -> None:
    build = cand.get_candidate("numba_spmm_vnni_int8")
    assert cand.is_int8_candidate("numba_spmm_vnni_int8")
    assert build(cand.LayerInfo("fc", _weight(16, 32, seed=2), None, None, False, False)) is None
    assert build(cand.LayerInfo("fc", torch.randn(16, 30), None, None, False, True)) is None


@needs_vnni
def test_accelerate_measures_and_installs_it_with_int8_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    for layer in (model[0], model[2]):
        with torch.no_grad():
            layer.weight[torch.rand_like(layer.weight) < 0.9] = 0
    x = torch.randn(64, 256)
    real, seen = acc._measure, set()

    def measure(model, built, inputs, repeats, warmup, fallback="dense"):  # type: ignore[no-untyped-def]
        times = real(model, built, inputs, repeats, warmup, fallback)  # really run every candidate
        for per in times.values():
            seen.update(per)
            for name, t in per.items():  # then let the VNNI kernel win, whatever the clock said
                per[name] = [0.1 if name in ("numba_spmm_vnni_int8", "chosen") else 1.0] * len(t)
        return times

    monkeypatch.setattr(acc, "_measure", measure)
    names = ["dense", "dense_int8", "numba_spmm_csr", "numba_spmm_vnni_int8"]
    fast = pk.accelerate(copy.deepcopy(model), x, batch_sizes=(64,), allow_int8=True, candidates=names, repeats=1,
                         warmup=0, fuse=False, verbose=False)
    assert seen >= set(names)
    assert {d.choice for d in fast.prunekit_acceleration.layers} == {"numba_spmm_vnni_int8"}
    assert "x quantized, VNNI" in repr(fast)
    with torch.no_grad():
        ref, y = model(x), fast(x)
    assert (y - ref).norm() / ref.norm() < 0.03


def test_row_blocks_as_csr_are_the_int8_csr_of_the_same_weight() -> None:
    w = _weight(45, 36, seed=3)
    from_blocks = formats.csr_of_row_blocks(formats.pack_bsr(w, spmm_vnni.QUAD, int8=True))
    direct = formats.pack_csr(w, int8=True)
    assert from_blocks.kind == "csr" and from_blocks.cols.dtype == direct.cols.dtype
    for name in ("rowptr", "cols", "values", "scales"):
        np.testing.assert_array_equal(getattr(from_blocks, name), getattr(direct, name))
    with pytest.raises(ValueError, match="1-row blocks, got bsr 2x2"):
        formats.csr_of_row_blocks(formats.pack_bsr(torch.randn(4, 4), (2, 2)))
