"""Exact top-k selection (`keep_top`), single process: the tie rule that the sharded path matches."""

from __future__ import annotations

import pytest
import torch

from prunekit.core.distributed import keep_top, ordered_keys
from prunekit.core.masks import global_topk_masks, topk_mask


def test_ties_keep_the_lower_position_across_tensors() -> None:
    a, b = torch.tensor([1.0, 2.0, 2.0, 0.5]), torch.tensor([[2.0, 3.0], [2.0, -1.0]])
    got = keep_top([a, b], 4)
    # 3.0 first, then the four 2.0s in position order: a[1], a[2], b[0, 0]; b[1, 0] is dropped
    assert got[0].tolist() == [False, True, True, False]
    assert got[1].tolist() == [[True, True], [False, False]]


@pytest.mark.parametrize("keep", [0, 1, 7, 12, 13, 20])
def test_all_equal_scores_keep_the_first_positions(keep: int) -> None:
    got = keep_top([torch.zeros(20)], keep)[0]
    assert got.tolist() == [i < keep for i in range(20)]


def test_keys_order_like_floats_with_signed_zero_and_infinities() -> None:
    x = torch.tensor([float("-inf"), -3.0, -1e-30, -0.0, 0.0, 1e-30, 2.0, float("inf")])
    k = ordered_keys(x)
    assert (k[1:] > k[:-1]).sum() == 6 and k[3] == k[4]  # strictly increasing but for -0.0 == 0.0


def test_exact_count_and_agreement_with_a_sort_on_duplicates() -> None:
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.randint(0, 5, (7, 9), generator=g).float(),
              "b": torch.randint(0, 5, (13,), generator=g).float()}
    masks = global_topk_masks(scores, 0.6)
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    kept = torch.cat([m.reshape(-1) for m in masks.values()])
    assert int(kept.sum()) == flat.numel() - round(0.6 * flat.numel())
    # a stable sort by descending score keeps the lower position among equals: the same set
    order = torch.sort(-flat, stable=True).indices[: int(kept.sum())]
    assert set(order.tolist()) == set(kept.nonzero().reshape(-1).tolist())
    assert torch.equal(topk_mask(scores["a"], 0.5), keep_top([scores["a"]], 63 - round(0.5 * 63))[0])
