"""prunekit's numba kernels and their packed formats against dense F.linear."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from prunekit.errors import PrunekitError, UnsupportedLayerError
from prunekit.runtime import candidates as cand
from prunekit.runtime import formats, kernels
from prunekit.runtime.kernels import avx512
from prunekit.runtime.kernels import numba as kn

pytest.importorskip("numba")


def _weight(kind: str, out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    if kind == "csr":
        w = w * (torch.rand(out_f, in_f, generator=g) > 0.8)
        w[1] = 0  # an empty row
    elif kind == "bsr":
        keep = torch.rand(out_f // 4, in_f // 8, generator=g) > 0.7
        keep[0] = False  # an empty block row
        w = w * keep.repeat_interleave(4, 0).repeat_interleave(8, 1)
    else:
        idx = torch.rand(out_f, in_f // 4, 4, generator=g).argsort(-1)[..., :2]
        w = w * torch.zeros(out_f, in_f // 4, 4).scatter_(-1, idx, 1.0).reshape(out_f, in_f)
        w[2, :4] = 0  # a group with fewer than 2 non-zeros
    return w


def _pack(kind: str, w: torch.Tensor, int8: bool) -> formats.PackedWeight:
    if kind == "csr":
        return formats.pack_csr(w, int8=int8)
    if kind == "bsr":
        return formats.pack_bsr(w, (4, 8), int8=int8)
    return formats.pack_nm24(w, int8=int8)


def _dequantized(packed: formats.PackedWeight, w: torch.Tensor) -> torch.Tensor:
    """The weight the int8 kernel actually multiplies by: round(w / scale) * scale per row."""
    s = torch.from_numpy(packed.scales)[:, None]
    return (w / s).round().clamp(-127, 127) * s


@pytest.mark.parametrize("kind", ["csr", "bsr", "nm24"])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize(("batch", "parallel"), [(1, True), (3, True), (8, True), (11, True), (1, False), (11, False)])
def test_kernel_matches_dense(kind: str, int8: bool, batch: int, parallel: bool) -> None:
    w = _weight(kind, 24, 32, seed=batch)
    bias = torch.randn(24)
    x = torch.randn(batch, 32)
    packed = _pack(kind, w, int8)
    y = torch.from_numpy(kernels.sparse_linear(packed, x.numpy(), bias.numpy(), parallel=parallel))
    ref_w = _dequantized(packed, w) if int8 else w
    torch.testing.assert_close(y, F.linear(x, ref_w, bias), rtol=1e-5, atol=1e-5)
    if int8:  # and close to the float layer, as INT8 goes
        dense = F.linear(x, w, bias)
        assert float((y - dense).abs().max()) <= 2e-2 * float(dense.abs().max())


@pytest.mark.parametrize("block", [(1, 16), (2, 3), (3, 1)])
@pytest.mark.parametrize("batch", [1, 8, 13])
def test_bsr_kernels_take_any_block_shape(block: tuple[int, int], batch: int) -> None:
    """Odd block widths run the batched kernel's single-column tail, width 1 only that tail."""
    br, bc = block
    g = torch.Generator().manual_seed(batch)
    keep = torch.rand(18 // br, 48 // bc, generator=g) > 0.6
    w = torch.randn(18, 48, generator=g) * keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    bias, x = torch.randn(18, generator=g), torch.randn(batch, 48, generator=g)
    y = kernels.sparse_linear(formats.pack_bsr(w, block), x.numpy(), bias.numpy())
    torch.testing.assert_close(torch.from_numpy(y), F.linear(x, w, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["csr", "bsr", "nm24"])
def test_all_zero_weight_gives_bias(kind: str) -> None:
    w = torch.zeros(16, 32)
    bias = torch.randn(16)
    packed = _pack(kind, w, int8=True)
    assert packed.values.size == 0 or not packed.values.any()
    y = kernels.sparse_linear(packed, np.random.rand(3, 32).astype(np.float32), bias.numpy())
    torch.testing.assert_close(torch.from_numpy(y), bias.expand(3, 16))


def test_module_takes_leading_dims_and_refuses_grad() -> None:
    w = _weight("csr", 24, 32)
    info = cand.LayerInfo("blocks.0.fc", w, None, None, False, False)
    module = cand.get_candidate("numba_csr")(info)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(module(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(UnsupportedLayerError, match="blocks.0.fc"):
        module(x.requires_grad_())
    with pytest.raises(UnsupportedLayerError, match="blocks.0.fc"), torch.no_grad():
        module(torch.randn(2, 31))


def test_int8_keeps_zeros_and_formats_shrink() -> None:
    w = _weight("csr", 64, 128)
    fp32, int8 = formats.pack_csr(w), formats.pack_csr(w, int8=True)
    assert fp32.values.size == int((w != 0).sum())
    # pruned weights stay zero; a tiny weight may round to an int8 zero too (and is then dropped)
    assert int8.values.size <= fp32.values.size and not (int8.values == 0).any()
    assert int8.nbytes < fp32.nbytes < w.numel() * 4 * 0.5
    assert fp32.cols.dtype == np.uint16


def test_block_detection() -> None:
    # 4x8 blocks tile exactly into 4x4 ones, the largest listed shape that fits
    assert formats.detect_block(_weight("bsr", 32, 64)) == (4, 4)
    assert formats.detect_block(_weight("csr", 32, 64)) is None
    assert formats.detect_block(torch.zeros(16, 16)) is None
    blocky = torch.randn(32, 32) * (torch.rand(2, 2) > 0.5).float().repeat_interleave(16, 0).repeat_interleave(16, 1)
    blocky[:16, :16] = 1.0
    assert formats.detect_block(blocky) == (16, 16)


def test_2_4_detection_and_rejection() -> None:
    assert formats.is_2_4(_weight("nm24", 8, 16))
    assert not formats.is_2_4(torch.ones(8, 16))
    assert not formats.is_2_4(torch.zeros(8, 6))
    with pytest.raises(ValueError, match="2:4"):
        formats.pack_nm24(torch.ones(8, 16))


def test_missing_numba_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "numba", None)
    monkeypatch.setattr(kn, "_KERNELS", None)
    with pytest.raises(PrunekitError, match=r"prunekit\[speed\]"):
        kn.kernels()


@pytest.mark.parametrize("batch", [1, 3, 6, 9])  # x rows go 4 at a time: every remainder
@pytest.mark.parametrize("in_f", [36, 64])  # 9 groups (an odd one left over) and 16
@pytest.mark.parametrize("parallel", [False, True])
def test_row_lane_2_4_int8_matches_the_scalar_kernel(batch: int, in_f: int, parallel: bool) -> None:
    if not avx512.available():
        pytest.skip("needs AVX-512F")
    w = _weight("nm24", 32, in_f, seed=batch)
    bias, x = torch.randn(32), torch.randn(batch, in_f)
    rows, scalar = formats.pack_nm24_rows(w), formats.pack_nm24(w, int8=True)
    y = torch.from_numpy(kernels.sparse_linear(rows, x.numpy(), bias.numpy(), parallel=parallel))
    torch.testing.assert_close(y, F.linear(x, _dequantized(scalar, w), bias), rtol=1e-5, atol=1e-5)
    # 0.5 B of value and 1/8 B of positions a weight (an odd last group gets a byte to itself)
    assert rows.values.nbytes + rows.cols.nbytes == 32 * in_f // 2 + 32 * -(-in_f // 8)


def test_row_lanes_need_16_output_rows() -> None:
    w = _weight("nm24", 24, 32)
    with pytest.raises(ValueError, match="multiple of 16 output rows, got 24"):
        formats.pack_nm24_rows(w)
    info = cand.LayerInfo("blocks.0.fc", w, None, None, True, True)
    assert cand.get_candidate("numba_nm24r_int8_1t")(info) is None


def test_row_lane_kernel_refuses_a_cpu_without_avx512(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(avx512, "available", lambda: False)
    packed = formats.pack_nm24_rows(_weight("nm24", 16, 32))
    with pytest.raises(PrunekitError, match="needs a CPU with AVX-512F"):
        kernels.sparse_linear(packed, np.zeros((1, 32), np.float32), np.zeros(16, np.float32))
    info = cand.LayerInfo("fc", _weight("nm24", 16, 32), None, None, True, True)
    assert cand.get_candidate("numba_nm24r_int8_1t")(info) is None
