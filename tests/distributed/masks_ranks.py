"""Masks on sharded and replicated models, run by `torchrun --nproc_per_node 2` (gloo on CPU).

Every rank also builds the single-process reference on the same full weights (same seed) and
checks against it; a failed check raises, so the launcher exits non-zero with this rank's stderr.
Rank 0 writes the measured figures to <out_dir>/figures.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.testing import assert_close

import prunekit as pk
from prunekit.core.distributed import mask_checksum, to_local
from prunekit.core.masks import get_mask, mask_state_dict, masked_modules
from prunekit.core.plan import MaskPlan
from prunekit.errors import PlanError

CONFIG = pk.UnstructuredConfig(sparsity=0.5, scope="global")
SCHEDULE = pk.Polynomial(start_step=1, end_step=4, every=1)
GRADUAL = pk.UnstructuredConfig(sparsity=0.75)


def mlp() -> nn.Sequential:
    """33 and 21 output rows: uneven shards on 2 ranks; weights on a 1/16 grid: many tied scores."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.Linear(33, 21), nn.ReLU(), nn.Linear(21, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(((p * 16).floor() + 0.5) / 16)  # never 0: zeros come from masks only
    return model


def shard(model: nn.Module) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


def full_masks(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for fqn, m in masked_modules(model).items():
        mask = get_mask(m).mask  # type: ignore[union-attr]
        out[fqn.removeprefix(prefix)] = mask.full_tensor() if isinstance(mask, DTensor) else mask
    return out


def same_on_ranks(values: object, what: str) -> None:
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    if any(g != gathered[0] for g in gathered):
        raise AssertionError(f"{what} differs between ranks: {gathered}")


def check_equal_masks(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), (what, got.keys(), want.keys())
    for k in want:
        assert torch.equal(got[k], want[k]), f"{what}: mask {k} differs from one process"


def check_sparsity(model: nn.Module, ref: nn.Module, what: str) -> pk.SparsityReport:
    got, want = pk.sparsity(model), pk.sparsity(ref)
    assert got.zeros == want.zeros and got.total_numel == want.total_numel, (what, str(got), str(want))
    assert list(got.layers.values()) == list(want.layers.values()), (what, str(got), str(want))
    same_on_ranks((got.zeros, list(got.layers.values())), f"{what}: sparsity")
    return got


def one_shot_fsdp(figures: dict) -> None:
    ref = pk.prune(mlp(), CONFIG)
    model = pk.prune(shard(mlp()), CONFIG)  # masks attached after fully_shard
    x, _ = batch()
    assert_close(model(x), ref(x))  # the forward works, and gives the masked outputs
    for layer in masked_modules(model).values():
        mask, weight = get_mask(layer).mask, layer.parametrizations.weight.original  # type: ignore[union-attr]
        assert isinstance(mask, DTensor) and mask.placements == weight.placements, "mask not placed like weight"
        assert to_local(mask).shape == to_local(weight).shape, "mask shard is not the weight's shard"
    check_equal_masks(full_masks(model), full_masks(ref), "fsdp prune")
    assert mask_state_dict(model).keys() == mask_state_dict(ref).keys()
    check_sparsity(model, ref, "fsdp prune")
    figures["mask_bytes_rank"] = sum(to_local(get_mask(m).mask).nbytes for m in masked_modules(model).values())  # type: ignore[union-attr]
    figures["mask_bytes_one_process"] = sum(get_mask(m).mask.nbytes for m in masked_modules(ref).values())  # type: ignore[union-attr]
    # masks attached before fully_shard: the first verb keeps only this rank's shard
    early = shard(pk.prune(mlp(), CONFIG))
    check_sparsity(early, ref, "fsdp prune before fully_shard")
    assert all(isinstance(get_mask(m).mask, DTensor) for m in masked_modules(early).values())  # type: ignore[union-attr]
    assert_close(early(x), ref(x))
    # finalize: no parametrization left, sharded weights with the zeros, the same outputs
    before = model(x)
    pk.finalize(model)
    assert not masked_modules(model) and isinstance(model[0].weight, DTensor)
    assert_close(model(x), before)
    check_sparsity(model, pk.finalize(ref), "fsdp finalize")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # FSDP2 still trains the finalized weights
    model(x).sum().backward()
    opt.step()


def train(model: nn.Module, ref: nn.Module, what: str, prefix: str = "", straight_through: bool = False,
          config: pk.UnstructuredConfig = GRADUAL) -> None:
    """GradualPruner on `model` and on the single-process `ref`, same batch on every rank."""
    pruners = [pk.GradualPruner(m, config, SCHEDULE, straight_through=straight_through) for m in (model, ref)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, ref)]
    x, y = batch()
    for step in range(6):
        for m, opt, pruner in zip((model, ref), opts, pruners, strict=True):
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
            opt.zero_grad()
            pruner.step(step)
        report = check_sparsity(model, ref, f"{what} step {step}")
        want = round(pruners[1].current_sparsity * report.total_numel)
        assert report.zeros == want, f"{what} step {step}: {report.zeros} zeros, want {want}"
        sums = {k: mask_checksum(v) for k, v in full_masks(model, prefix).items()}
        same_on_ranks(sums, f"{what} step {step}: mask checksums")
        check_equal_masks(full_masks(model, prefix), full_masks(ref), f"{what} step {step}")
    # a rank at another step raises on every rank instead of updating alone
    try:
        pruners[0].step(6 + dist.get_rank())
    except PlanError as err:
        assert "disagree on the pruning step" in str(err)
    else:
        raise AssertionError(f"{what}: ranks at different steps were not refused")


class TiedLM(nn.Module):
    """An embedding whose table is also the output head's weight, as in most small LLMs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(24, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 24, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.embed(ids))))


def tied_fsdp_checks() -> None:
    """A mask update on a sharded model with a tied embedding leaves FSDP2 swapping both places."""
    rule = pk.UnstructuredConfig(sparsity=0.5, exclude=["head"])
    model, ref = TiedLM(), TiedLM()
    pruners = [pk.GradualPruner(m, rule, SCHEDULE) for m in (model, ref)]
    fully_shard(model.body)
    fully_shard(model)
    ids = torch.arange(24).reshape(4, 6)
    for step in range(3):
        for pruner in pruners:
            pruner.step(step)
        assert_close(model(ids), ref(ids), msg=f"tied fsdp step {step}")
    assert model.head.weight is model.embed.weight


def no_masked_copies_saved() -> None:
    """FSDP2's masked forward saves FSDP2's own (freed after forward) weights, not masked copies."""
    model = pk.prune(shard(mlp()), CONFIG)
    pk.sparsity(model)  # places the masks
    weight_shapes = {tuple(sorted(m.weight.shape)) for m in model if isinstance(m, nn.Linear)}  # saved as w.t()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(batch()[0]).sum()
    weights = [t for t in saved if tuple(sorted(t.shape)) in weight_shapes]
    assert weights, "no weight was saved for backward"
    held = [tuple(t.shape) for t in weights if t.untyped_storage().size() > 0]
    assert not held, f"full-size weights {held} stay allocated between forward and backward"
    out.backward()


def ddp_checks() -> None:
    ref = pk.prune(mlp(), CONFIG)
    model = DistributedDataParallel(mlp())
    pk.prune(model, CONFIG)
    x, _ = batch()
    with torch.no_grad():  # DDP expects a backward after a forward that records gradients
        assert_close(model(x), ref(x))
    check_equal_masks(full_masks(model, "module."), full_masks(ref), "ddp prune")
    check_sparsity(model, ref, "ddp prune")
    # masks that differ between ranks are refused on every rank, and nothing is applied
    mine = torch.ones(33, 16, dtype=torch.bool)
    mine[dist.get_rank(), 0] = False
    before = full_masks(model, "module.")
    try:
        MaskPlan({"module.0.weight": mine}).apply(model)
    except PlanError as err:
        assert "differ between ranks" in str(err)
    else:
        raise AssertionError("rank-specific masks on a DDP model were not refused")
    check_equal_masks(full_masks(model, "module."), before, "ddp refused plan")
    train(DistributedDataParallel(mlp()), mlp(), "ddp gradual", "module.")


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    figures: dict = {"world": dist.get_world_size()}
    one_shot_fsdp(figures)
    train(shard(mlp()), mlp(), "fsdp gradual")
    train(shard(mlp()), mlp(), "fsdp gradual straight-through", straight_through=True)
    # layer by layer: every layer's exact top-k, all layers ranked in the same collectives
    train(shard(mlp()), mlp(), "fsdp gradual layer-wise", config=pk.UnstructuredConfig(sparsity=0.75, scope="layer"))
    tied_fsdp_checks()
    no_masked_copies_saved()
    ddp_checks()
    if dist.get_rank() == 0:
        (out_dir / "figures.json").write_text(json.dumps(figures))
    dist.barrier()  # rank 0 hosts the store: no rank tears down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
