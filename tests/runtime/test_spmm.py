"""The many-row CSR kernel (`kernels.spmm`, rows of x as vector lanes) against dense F.linear."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import prunekit as pk
from prunekit.runtime import autotune as acc
from prunekit.runtime import candidates as cand
from prunekit.runtime import formats, kernels
from prunekit.runtime.kernels import spmm

pytest.importorskip("numba")


def _weight(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) > 0.8)
    w[1] = 0  # an empty output row
    w[:, 2] = 0  # an input no row reads
    return w


def _dequantized(packed: formats.PackedWeight, w: torch.Tensor) -> torch.Tensor:
    s = torch.from_numpy(packed.scales)[:, None]
    return (w / s).round().clamp(-127, 127) * s


@pytest.mark.parametrize("rows", [1, 3, 8, 17, 64, 129])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("small_batch", [0, spmm.SMALL_BATCH])  # 0: the lane kernel even for 1 row
def test_matches_dense(rows: int, int8: bool, small_batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spmm, "SMALL_BATCH", small_batch)
    w, bias = _weight(45, 37, seed=rows), torch.randn(45)  # odd in and out features
    x = torch.randn(rows, 37)
    packed = formats.pack_csr(w, int8=int8)
    y = torch.from_numpy(kernels.sparse_linear(packed, x.numpy(), bias.numpy(), many_rows=True))
    ref_w = _dequantized(packed, w) if int8 else w
    torch.testing.assert_close(y, F.linear(x, ref_w, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 8, 17, 64, 129])
def test_fused_siblings_each_get_their_own_contiguous_outputs(rows: int) -> None:
    w, bias = _weight(3 * 48, 37, seed=rows), torch.randn(3 * 48)  # q/k/v of 48 outputs each, stacked
    x = torch.randn(rows, 37)
    run = kernels.bind(formats.pack_csr(w), bias.numpy(), many_rows=True, siblings=3)
    y = torch.from_numpy(np.asarray(run(x.numpy())))
    assert y.shape == (3, rows, 48)
    full = F.linear(x, w, bias)
    for i in range(3):
        torch.testing.assert_close(y[i], full[:, 48 * i: 48 * (i + 1)], rtol=1e-5, atol=1e-5)
    if rows > spmm.SMALL_BATCH:
        assert all(y[i].is_contiguous() for i in range(3))  # no copy to hand each sibling its rows


def test_siblings_must_split_into_whole_vectors() -> None:
    with pytest.raises(ValueError, match="do not split into 3 siblings of a multiple of 16"):
        spmm.SparseMatmul(formats.pack_csr(_weight(3 * 40, 37, seed=0)), np.zeros(120, np.float32), siblings=3)
    with pytest.raises(ValueError, match="only the many-row csr kernel splits its outputs"):
        kernels.bind(formats.pack_csr(_weight(96, 37, seed=0)), np.zeros(96, np.float32), siblings=2)


@pytest.mark.parametrize("rows", [17, 40, 64, 100, 129])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("cached_bytes", [0, 1 << 40])  # the threads split blocks of the weight / tiles of x
def test_many_blocks_panels_and_tiles(rows: int, int8: bool, cached_bytes: int,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Several blocks of output rows (the last partial), panels of inputs (the last partial), tiles of x."""
    monkeypatch.setattr(spmm, "CACHED_WEIGHT_BYTES", cached_bytes)
    w, bias = _weight(spmm.BLOCK * 3 + 5, spmm.PANEL * 2 + 45, seed=rows), torch.randn(spmm.BLOCK * 3 + 5)
    x = torch.randn(rows, w.shape[1])
    packed = formats.pack_csr(w, int8=int8)
    y = kernels.sparse_linear(packed, x.numpy(), bias.numpy(), many_rows=True)
    ref_w = _dequantized(packed, w) if int8 else w
    torch.testing.assert_close(torch.from_numpy(y), F.linear(x, ref_w, bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("int8", [False, True])
def test_all_zero_weight_gives_bias(int8: bool) -> None:
    bias = torch.randn(19)
    packed = formats.pack_csr(torch.zeros(19, 23), int8=int8)
    assert packed.values.size == 0
    y = kernels.sparse_linear(packed, np.random.rand(33, 23).astype(np.float32), bias.numpy(), many_rows=True)
    torch.testing.assert_close(torch.from_numpy(y), bias.expand(33, 19))


def _unpack(matmul: spmm.SparseMatmul) -> np.ndarray:
    """The dense weight back from the grouped layout: every stored entry put where it belongs."""
    out_f, in_f = matmul.shape
    w = np.zeros((out_f + 1, in_f + spmm.PANEL))  # row out_f: padding; wide enough for padded columns
    blocks, panels, groups = matmul.meta.shape[:3]
    for b in range(blocks):
        for p in range(panels):
            for g in range(groups):
                start, steps = matmul.meta[b, p, g]
                for i, member in enumerate(matmul.members[b, p, g]):
                    row = out_f if member == spmm.BLOCK else b * spmm.BLOCK + member
                    for s in range(steps):
                        at = start + s * spmm.GROUP + i
                        w[row, p * spmm.PANEL + matmul.cols[at]] += matmul.vals[at]
    assert not w[out_f].any(), "padding entries must hold zero weights"
    return w[:out_f, :in_f]


def test_layout_holds_every_nonzero_once_and_pads_little() -> None:
    w = _weight(spmm.BLOCK * 2 + 7, spmm.PANEL + 50, seed=3)
    matmul = spmm.SparseMatmul(formats.pack_csr(w), np.zeros(w.shape[0], np.float32))
    np.testing.assert_array_equal(_unpack(matmul), w.numpy())
    assert matmul.nonzeros == int((w != 0).sum())
    # rows sorted by length before grouping: ~20 non-zeros a row and panel, padded by far less than a row
    assert 0 <= matmul.padding < 0.15


def test_threads_get_equal_shares_of_work_not_of_blocks() -> None:
    """Rows of very unequal length (as magnitude pruning leaves them): the split follows the stored entries."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(spmm.BLOCK * 8, 96, generator=g)
    w[spmm.BLOCK * 2:] *= torch.rand(spmm.BLOCK * 6, 96, generator=g) > 0.95  # blocks 0-1 dense, 2-7 at 95 %
    matmul = spmm.SparseMatmul(formats.pack_csr(w), np.zeros(w.shape[0], np.float32))
    work = matmul.meta[..., 1].sum(axis=(1, 2)) * spmm.GROUP + spmm.BLOCK_COST
    for tiles, runs in [(0, 2), (0, 3), (3, 2), (5, 4)]:
        split = matmul.split(tiles, runs)
        units = np.tile(work, max(tiles, 1))
        assert split[0] == 0 and split[-1] == len(units) and (np.diff(split) >= 0).all()
        shares = [units[a:b].sum() for a, b in zip(split[:-1], split[1:], strict=True)]
        assert max(shares) - min(shares) <= units.max(), (tiles, runs, shares)  # within one unit of equal
    assert list(matmul.split(0, 2)) == [0, 2, 8]  # the dense blocks apart; 4 blocks each: 2.6x the work of the other


def test_module_takes_3d_inputs_and_copies() -> None:
    w, bias = _weight(48, 40, seed=0), torch.randn(48)
    info = cand.LayerInfo("enc.0.ffn", w, bias, None, False, False)
    module = cand.get_candidate("numba_spmm_csr")(info)
    assert module is not None and module.many_rows and "many-row" in repr(module)
    x = torch.randn(3, 11, 40)  # (batch, sequence, features): 33 rows
    with torch.no_grad():
        torch.testing.assert_close(module(x), F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
        clone = copy.deepcopy(module)  # the bound closure is rebuilt, not copied
        torch.testing.assert_close(clone(x), F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
    assert clone.many_rows


def test_int8_candidate_only_when_allowed() -> None:
    w = _weight(16, 32, seed=1)
    assert cand.get_candidate("numba_spmm_csr_int8")(cand.LayerInfo("fc", w, None, None, False, False)) is None
    module = cand.get_candidate("numba_spmm_csr_int8")(cand.LayerInfo("fc", w, None, None, False, True))
    assert module is not None and module.packed.int8
    assert cand.is_int8_candidate("numba_spmm_csr_int8") and not cand.is_int8_candidate("numba_spmm_csr")


def test_refuses_other_formats() -> None:
    packed = formats.pack_bsr(torch.ones(8, 8), (4, 4))
    with pytest.raises(ValueError, match="'csr' format, got 'bsr'"):
        spmm.bind(packed, np.zeros(8, np.float32))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    return pk.prune(model, pk.UnstructuredConfig(sparsity=0.9, scope="layer"))


def test_accelerate_measures_and_installs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate times the many-row candidate beside the others and installs it where it wins."""
    model, x = _model(), torch.randn(4, 20, 64)
    with torch.no_grad():
        ref = model(x)
    real = acc._measure
    seen: set[str] = set()

    def measure(model, built, inputs, repeats, warmup, fallback="dense"):
        times = real(model, built, inputs, repeats, warmup, fallback)  # really run every candidate
        for per in times.values():
            seen.update(per)
            for name, t in per.items():  # then let the many-row kernel win, whatever the clock said
                fast = 0.1 if name in ("numba_spmm_csr", "chosen") else 2.0
                per[name] = [1.0 if name == "dense" else fast] * len(t)
        return times

    monkeypatch.setattr(acc, "_measure", measure)
    names = ["dense", "torch_csr", "numba_csr", "numba_spmm_csr"]
    pk.accelerate(model, x, batch_sizes=(1, 2), candidates=names, repeats=1, warmup=0, fuse=False, verbose=False)
    assert seen >= set(names)
    assert [type(model[i]).__name__ for i in (0, 2)] == ["NumbaSparseLinear"] * 2
    assert model[0].many_rows and {d.choice for d in model.prunekit_acceleration.layers} == {"numba_spmm_csr"}
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_decision_table_says_which_decision_an_untuned_batch_runs() -> None:
    from prunekit.runtime.decisions import AccelerationReport, LayerDecision

    row = LayerDecision("fc", (8, 8), 0.9, None, {"dense": {1: 1.0, 8: 2.0}, "numba_spmm_csr": {1: 0.5, 8: 0.6}},
                        choice="numba_spmm_csr")
    report = AccelerationReport((1, 8), 2, 1e-4, 0.0, [row])
    assert report.untuned(8) is None and report.untuned(1) is None
    assert "batch 64 was not tuned: it runs the choices tuned at batch 8" in str(report.untuned(64))
    assert "tuned at batch 1 (the nearest)" in str(report.untuned(2))
    assert "a larger batch runs the choices tuned at batch 8, untimed" in report.summary()


def test_openmp_is_the_default_layer_and_the_spin_bound_does_not_leak() -> None:
    """Fresh processes: prunekit picks numba's OpenMP layer with GOMP_SPINCOUNT set only while it loads."""
    import os
    import subprocess
    import sys

    code = ("import os, numba; from prunekit.runtime.kernels import spmm; spmm.kernels(); "
            "print(numba.threading_layer(), 'GOMP_SPINCOUNT' in os.environ)")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_THREADING_LAYER", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["omp", "False"]
    chosen = {**env, "NUMBA_THREADING_LAYER": "workqueue"}  # the user's choice wins
    out = subprocess.run([sys.executable, "-c", code], env=chosen, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["workqueue", "False"]


def test_outputs_sit_on_64_byte_boundaries() -> None:
    """numpy aligns to 16 bytes; a 512-bit access 16 bytes past a line splits in two (1.3-1.6x slower kernel)."""
    from prunekit.runtime.kernels.buffers import aligned_empty

    for shape in [(1,), (3, 5), (4, 37, 32)]:
        a = aligned_empty(shape)
        assert a.shape == shape and a.dtype == np.float32 and a.flags.c_contiguous and a.ctypes.data % 64 == 0
    matmul = spmm.SparseMatmul(formats.pack_csr(_weight(45, 37, seed=0)), np.zeros(45, np.float32))
    y = matmul(np.random.default_rng(0).standard_normal((20, 37)).astype(np.float32))
    assert y.ctypes.data % 64 == 0
