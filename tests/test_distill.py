"""KDLoss matches its definition; finetune trains and drives a pruner."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunekit as pk


def test_kd_loss_matches_definition() -> None:
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    kd = pk.KDLoss(temperature=3.0, alpha=0.25)
    p_t = F.softmax(t / 3, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / 3, -1))).sum(-1).mean()
    expected = 0.25 * 9 * kl + 0.75 * F.cross_entropy(s, y)
    torch.testing.assert_close(kd(s, t, y), expected)


def test_kd_loss_is_zero_soft_term_when_student_equals_teacher() -> None:
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(pk.KDLoss(alpha=1.0)(logits, logits, y), torch.tensor(0.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("kwargs", "field"), [({"temperature": 0}, "temperature"), ({"alpha": 1.5}, "alpha")])
def test_kd_loss_validates(kwargs: dict, field: str) -> None:
    with pytest.raises(pk.ConfigError, match=field):
        pk.KDLoss(**kwargs)


def test_finetune_with_teacher_and_pruner_learns_and_prunes() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 10)
    y = (x[:, 0] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    teacher = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    pk.finetune(teacher, loader, epochs=3, lr=1e-2, progress=False)
    student = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    student.load_state_dict(teacher.state_dict())
    pruner = pk.GradualPruner(student, pk.UnstructuredConfig(sparsity=0.7), pk.Cubic(end_step=32, every=4))
    epochs_seen = []
    steps = pk.finetune(student, loader, epochs=3, lr=1e-2, teacher=teacher, pruner=pruner, progress=False,
                        callback=lambda epoch, step, loss: epochs_seen.append((epoch, step)))
    assert steps == 48 and epochs_seen[-1] == (2, 48)
    assert pk.sparsity(student).total == pytest.approx(0.7, abs=0.01)
    assert pk.accuracy(student, loader) > 0.9


def _halves_and_wholes() -> tuple[list, list]:
    g = torch.Generator().manual_seed(5)
    whole = [(torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    whole.append((torch.randn(4, 10, generator=g), torch.randint(0, 3, (4,), generator=g)))  # the short last step
    halves = [(x[i:i + 4], y[i:i + 4]) for x, y in whole[:3] for i in (0, 4)] + whole[3:]
    return whole, halves


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))


def test_accumulation_of_two_halves_equals_one_whole_batch_step() -> None:
    whole, halves = _halves_and_wholes()
    results = []
    for data, accumulation in ((whole, 1), (halves, 2), (halves, 1)):
        model = _net()
        steps = pk.finetune(model, data, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), progress=False,
                            accumulation=accumulation)
        results.append((steps, model.state_dict()))
    assert [r[0] for r in results] == [4, 4, 7]
    for key, value in results[0][1].items():
        torch.testing.assert_close(results[1][1][key], value, rtol=1e-5, atol=1e-6)
    assert not all(torch.allclose(results[2][1][k], v) for k, v in results[0][1].items())  # a step per half differs


def test_bf16_autocast_trains_fp32_weights_and_keeps_exact_sparsity() -> None:
    whole, _ = _halves_and_wholes()
    finals = {}
    for precision in ("fp32", "bf16"):
        model = _net()
        pruner = pk.GradualPruner(model, pk.UnstructuredConfig(sparsity=0.5), pk.OneShot(step=1))
        losses: list[float] = []
        pk.finetune(model, whole * 3, epochs=2, lr=1e-2, pruner=pruner, progress=False, precision=precision,
                    callback=lambda _e, _s, loss, seen=losses: seen.append(loss))
        assert losses[1] < losses[0] and all(p.dtype == torch.float32 for p in model.parameters())
        report = pk.sparsity(model)
        assert report.zeros == round(0.5 * report.total_numel)
        finals[precision] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert not torch.equal(finals["fp32"], finals["bf16"])  # autocast did run the matmuls in bfloat16
    torch.testing.assert_close(finals["bf16"], finals["fp32"], rtol=0.05, atol=0.02)


@pytest.mark.parametrize(("kwargs", "field"), [({"accumulation": 0}, "accumulation"),
                                               ({"accumulation": True}, "accumulation"),
                                               ({"precision": "fp16"}, "precision")])
def test_finetune_validates_accumulation_and_precision(kwargs: dict, field: str) -> None:
    model = _net()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(pk.ConfigError, match=field):
        pk.finetune(model, _halves_and_wholes()[0], progress=False, **kwargs)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_accumulation_resumes_bit_identical_and_must_match(tmp_path) -> None:
    _, halves = _halves_and_wholes()
    data = TensorDataset(torch.cat([x for x, _ in halves[:6]]), torch.cat([y for _, y in halves[:6]]))

    def run(ckpt, resume=False, stop=False, accumulation=2):
        model = _net()  # built afresh, like the loader and its generator, as a new process would
        loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))

        def cb(epoch, _step, _loss):
            if stop and epoch == 0:
                raise KeyboardInterrupt

        pk.finetune(model, loader, epochs=2, lr=1e-2, progress=False, accumulation=accumulation, callback=cb,
                    checkpoint_dir=ckpt, checkpoint_every=2, resume=resume)
        return model.state_dict()

    want = run(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", stop=True)
    with pytest.raises(pk.CheckpointError, match="accumulation"):
        run(tmp_path / "run", resume=True, accumulation=3)
    got = run(tmp_path / "run", resume=True)
    assert all(torch.equal(got[k], v) for k, v in want.items())
