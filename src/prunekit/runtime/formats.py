"""Packed sparse weight formats for prunekit's own kernels, built from a dense weight with zeros.

Three layouts, all row-major over output channels so a thread owns whole output rows:

* ``csr``: row pointers (int32), column indices (uint16 while the layer has at most 65,536
  inputs, else int32) and values; 6 bytes per fp32 non-zero, 3 per int8 non-zero.
* ``bsr``: the same over blocks of R x C weights; one uint16 block column per stored block.
* ``nm24``: exactly 2 kept values in every group of 4 inputs (2:4), with both positions packed
  into 4 bits; 1.25 bytes per int8 non-zero, 0.625 bytes per weight, no row pointers.
* ``nm24r``: the same int8 2:4 weight with 16 output rows side by side (row lanes), one byte of
  positions per row and pair of groups: what the AVX-512 kernel (`kernels.avx512`) loads as
  vectors; 0.625 bytes per weight.

Values are float32, or int8 with one fp32 scale per output row (symmetric, so a pruned weight
stays an exact int8 zero, as in `prunekit.quantize`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Kind = Literal["csr", "bsr", "nm24", "nm24r"]

# Blocks tried by `detect_block`, largest first: a mask pruned in blocks of one of these shapes
# (or of a multiple of one) is stored exactly, without padding zeros.
BLOCK_SHAPES: tuple[tuple[int, int], ...] = ((16, 16), (8, 8), (4, 4), (1, 16), (16, 1), (2, 2), (1, 8), (1, 4))


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A weight in one of the kernel formats (see the module docstring); arrays are read-only by contract."""

    kind: Kind
    shape: tuple[int, int]
    block: tuple[int, int]
    rowptr: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    scales: np.ndarray

    @property
    def nbytes(self) -> int:
        """Bytes the kernel streams per call (bias and activations not counted)."""
        return int(self.rowptr.nbytes + self.cols.nbytes + self.values.nbytes + self.scales.nbytes)

    @property
    def int8(self) -> bool:
        return self.values.dtype == np.int8

    def describe(self) -> str:
        dtype = "int8" if self.int8 else "fp32"
        block = f" {self.block[0]}x{self.block[1]}" if self.kind == "bsr" else ""
        return f"{self.kind}{block} {dtype}"


def _quantize_rows(w: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-row symmetric int8 scales of `w` viewed as (rows, -1), and the scaled integers."""
    flat = w.reshape(rows, -1)
    amax = np.abs(flat).max(axis=1) if flat.size else np.zeros(rows, np.float32)
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(flat / scales[:, None]), -127, 127).astype(np.int8)
    return q.reshape(w.shape), scales


def _index_dtype(n: int) -> type:
    return np.uint16 if n <= 65536 else np.int32


def _as_numpy(weight: Tensor) -> np.ndarray:
    return weight.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def pack_csr(weight: Tensor, *, int8: bool = False) -> PackedWeight:
    """Pack a 2-D weight (out, in) into CSR with narrow column indices; zeros are dropped."""
    w = _as_numpy(weight)
    out_f, in_f = w.shape
    scales = np.ones(out_f, np.float32)
    if int8:
        w, scales = _quantize_rows(w, out_f)
    nz = w != 0
    rowptr = np.zeros(out_f + 1, np.int32)
    np.cumsum(nz.sum(axis=1), out=rowptr[1:])
    rows, cols = np.nonzero(nz)
    return PackedWeight("csr", (out_f, in_f), (1, 1), rowptr, cols.astype(_index_dtype(in_f)), w[rows, cols], scales)


def pack_bsr(weight: Tensor, block: tuple[int, int], *, int8: bool = False) -> PackedWeight:
    """Pack a 2-D weight into BSR with blocks of `block` = (rows, cols); all-zero blocks are dropped.

    The shape must be divisible by the block (`detect_block` only proposes blocks that fit).
    """
    w = _as_numpy(weight)
    out_f, in_f = w.shape
    br, bc = block
    if out_f % br or in_f % bc:
        raise ValueError(f"weight {tuple(w.shape)} is not divisible into {br}x{bc} blocks")
    scales = np.ones(out_f, np.float32)
    if int8:
        w, scales = _quantize_rows(w, out_f)
    tiles = w.reshape(out_f // br, br, in_f // bc, bc).transpose(0, 2, 1, 3)
    nz = (tiles != 0).any(axis=(2, 3))
    rowptr = np.zeros(out_f // br + 1, np.int32)
    np.cumsum(nz.sum(axis=1), out=rowptr[1:])
    brows, bcols = np.nonzero(nz)
    values = np.ascontiguousarray(tiles[brows, bcols])
    return PackedWeight("bsr", (out_f, in_f), block, rowptr, bcols.astype(_index_dtype(in_f // bc)), values, scales)


def csr_of_row_blocks(packed: PackedWeight) -> PackedWeight:
    """A ``bsr`` weight of 1-row blocks as ``csr``: the same values and scales, the blocks' zeros dropped.

    What a kernel that reads CSR fastest needs from a weight packed in 1 x C blocks (the VNNI
    kernel's quads, run by the small-batch CSR kernels up to batch 8).
    """
    if packed.kind != "bsr" or packed.block[0] != 1:
        raise ValueError(f"expected 'bsr' 1-row blocks, got {packed.describe()}")
    out_f, width = packed.shape[0], packed.block[1]
    blocks = np.ascontiguousarray(packed.values).reshape(-1, width)
    stored, within = np.nonzero(blocks)  # row-major: a row's columns stay ascending
    rows = np.repeat(np.arange(out_f), np.diff(packed.rowptr))[stored]
    rowptr = np.zeros(out_f + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=out_f), out=rowptr[1:])
    cols: np.ndarray = (packed.cols[stored].astype(np.int64) * width + within).astype(_index_dtype(packed.shape[1]))
    return replace(packed, kind="csr", block=(1, 1), rowptr=rowptr, cols=cols, values=blocks[stored, within])


def is_2_4(weight: Tensor) -> bool:
    """True if every group of 4 consecutive inputs of every row has at most 2 non-zeros."""
    out_f, in_f = weight.shape
    if in_f % 4:
        return False
    return bool(((weight != 0).reshape(out_f, in_f // 4, 4).sum(-1) <= 2).all())


def pack_nm24(weight: Tensor, *, int8: bool = False) -> PackedWeight:
    """Pack a 2:4 weight: 2 values and two 2-bit positions per group of 4 (see `is_2_4`)."""
    w = _as_numpy(weight)
    out_f, in_f = w.shape
    if not is_2_4(weight):
        raise ValueError("weight is not 2:4 sparse (a group of 4 inputs holds more than 2 non-zeros)")
    scales = np.ones(out_f, np.float32)
    if int8:
        w, scales = _quantize_rows(w, out_f)
    groups = w.reshape(out_f, in_f // 4, 4)
    # Positions of the 2 kept entries per group: the non-zeros first (stable), padded with zeros.
    order = np.argsort(groups == 0, axis=-1, kind="stable")[..., :2]
    values = np.take_along_axis(groups, order, axis=-1).reshape(out_f, in_f // 2)
    idx = (order[..., 0] | (order[..., 1] << 2)).astype(np.uint8)
    return PackedWeight("nm24", (out_f, in_f), (1, 4), np.zeros(1, np.int32), idx, values, scales)


ROW_LANES = 16  # output rows per vector in ``nm24r`` (one AVX-512 register of fp32)


def pack_nm24_rows(weight: Tensor) -> PackedWeight:
    """Pack an int8 2:4 weight in row lanes: values (out/16, in/4, 2, 16), positions (out/16, in/8, 16).

    Group g of rows 16b..16b+15 is one 32-byte run of values (the first kept value of each row,
    then the second); each row's positions for groups 2p and 2p + 1 share one byte (2p in the low
    nibble), one 16-byte run per pair, so the kernel reads both as vectors.
    """
    out_f, in_f = weight.shape
    if out_f % ROW_LANES:
        raise ValueError(f"nm24r needs a multiple of {ROW_LANES} output rows, got {out_f}")
    p = pack_nm24(weight, int8=True)
    groups = in_f // 4
    values = p.values.reshape(out_f // ROW_LANES, ROW_LANES, groups, 2).transpose(0, 2, 3, 1)
    cols = p.cols.reshape(out_f // ROW_LANES, ROW_LANES, groups).transpose(0, 2, 1)
    if groups % 2:  # an odd last group has the byte to itself
        cols = np.concatenate([cols, np.zeros_like(cols[:, :1])], axis=1)
    cols = cols[:, 0::2] | (cols[:, 1::2] << 4)
    return PackedWeight("nm24r", p.shape, (1, 4), p.rowptr, np.ascontiguousarray(cols).reshape(-1),
                        np.ascontiguousarray(values).reshape(-1), p.scales)


def detect_block(weight: Tensor, *, max_padding: float = 0.05) -> tuple[int, int] | None:
    """The largest block in `BLOCK_SHAPES` whose non-empty blocks are nearly full, or None.

    A block fits when storing every non-empty block whole adds at most `max_padding` (5 %) of
    zero values on top of the non-zeros: a random 90 % mask leaves most 4x4 blocks non-empty, so
    it gets None, while a mask pruned in 16x16 blocks gets (16, 16).
    """
    out_f, in_f = weight.shape
    nnz = int((weight != 0).sum())
    if nnz == 0:
        return None
    nz = weight != 0
    for br, bc in BLOCK_SHAPES:
        if out_f % br or in_f % bc or br * bc == 1:
            continue
        blocks = int(nz.reshape(out_f // br, br, in_f // bc, bc).any(dim=3).any(dim=1).sum())
        if blocks * br * bc <= nnz * (1.0 + max_padding):
            return (br, bc)
    return None
