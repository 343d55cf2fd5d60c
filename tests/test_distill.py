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
