"""Recovery fine-tuning by distillation: the loss falls, the pruning holds, resume is bit-identical,
bad inputs are refused by name."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import prunekit as pk
from prunekit.config import config_from_dict, config_to_dict
from prunekit.core.masks import get_mask, masked_modules
from prunekit.errors import CheckpointError, ConfigError
from prunekit.methods.block import BlockConfig
from prunekit.train import losses
from prunekit.train.losses import kl_sum, squarehead
from prunekit.train.recovery import Recovery, RecoveryConfig, recover

transformers = pytest.importorskip("transformers")

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 64,
        "initializer_range": 0.2}  # peaked logits: pruning moves them far enough to have something to recover
NM = pk.NMConfig(n=2, m=4, exclude=["lm_head"])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def llama(seed: int = 0, **overrides: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides})).eval()


def token_batches(n: int = 4, batch: int = 2, tokens: int = 16, vocab: int = 256) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (batch, tokens), generator=g) for _ in range(n)]


def pruned(teacher: torch.nn.Module, config: pk.UnstructuredConfig | pk.NMConfig | BlockConfig = NM) -> torch.nn.Module:
    return pk.prune(copy.deepcopy(teacher), config)


def masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {fqn: get_mask(m).mask.clone() for fqn, m in masked_modules(model).items()}  # type: ignore[union-attr]


def test_kl_recovery_lowers_the_loss_and_keeps_the_2_4_pattern() -> None:
    teacher = llama()
    student = pruned(teacher)
    before, sparsity = masks(student), pk.sparsity(student).layers
    weights = {k: v.clone() for k, v in student.state_dict().items() if k.endswith("original")}
    run = Recovery(student, teacher, token_batches(), RecoveryConfig(tokens=32 * 12, lr=1e-2, warmup=2))
    assert run.run(progress=False) is student and run.steps == 12
    losses = [r.loss for r in run.history]
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0]
    assert [r.tokens for r in run.history] == [32 * (i + 1) for i in range(12)]
    assert pk.check_nm(student, 2, 4).ok and pk.sparsity(student).layers == sparsity
    assert all(torch.equal(m, before[k]) for k, m in masks(student).items())
    assert all(not torch.equal(v, weights[k]) for k, v in student.state_dict().items() if k in weights)
    assert not student.training and not teacher.training  # modes restored


@pytest.mark.parametrize("config", [pk.UnstructuredConfig(sparsity=0.6, exclude=["lm_head"]),
                                    BlockConfig(sparsity=0.5, block=(4, 4), exclude=["lm_head"])])
def test_unstructured_and_block_zeros_hold_exactly(config: pk.UnstructuredConfig | BlockConfig) -> None:
    teacher = llama()
    student = pruned(teacher, config)
    zeros = {fqn: m.weight == 0 for fqn, m in masked_modules(student).items()}
    recover(student, teacher, token_batches(), RecoveryConfig(tokens=32 * 4, lr=1e-2, weight_decay=0.1),
            progress=False)
    for fqn, m in masked_modules(student).items():
        assert torch.equal(m.weight == 0, zeros[fqn]), fqn


def test_structured_student_trains_with_its_smaller_shapes() -> None:
    teacher, student = llama(), llama(seed=3, intermediate_size=64)
    run = Recovery(student, teacher, token_batches(), RecoveryConfig(tokens=32 * 12, lr=3e-3, warmup=0))
    run.run(progress=False)
    assert student.model.layers[0].mlp.up_proj.weight.shape == (64, 64)
    assert run.history[-1].loss < run.history[0].loss


@pytest.mark.parametrize("loss", ["squarehead", "kl+squarehead"])
def test_squarehead_losses_train(loss: str) -> None:
    teacher = llama()
    student = pruned(teacher)
    run = Recovery(student, teacher, token_batches(), RecoveryConfig(tokens=32 * 12, lr=3e-3, loss=loss))
    run.run(progress=False)
    assert run.history[-1].loss < run.history[0].loss and pk.check_nm(student, 2, 4).ok


@pytest.mark.parametrize("chunk", [1 << 24, 10])  # one chunk; chunks of 2 rows of 5 logits
def test_squarehead_and_kl_match_their_definitions(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(2, 3, 8, generator=g) for _ in range(2)]
    ht = [torch.randn(2, 3, 8, generator=g) for _ in range(2)]
    valid = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    keep = valid.bool()
    want = sum(((s - t)[keep] ** 2).sum() / (t[keep] ** 2).sum() for s, t in zip(hs, ht, strict=True))
    torch.testing.assert_close(squarehead(hs, ht, valid), want)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    p_t = F.softmax(t / 2, -1)
    per_token = (p_t * (p_t.log() - F.log_softmax(s / 2, -1))).sum(-1)
    s.requires_grad_(True)
    torch.testing.assert_close(kl_sum(s, t, valid, 2.0), 4 * per_token[keep].sum())
    got = torch.autograd.grad(kl_sum(s, t, valid, 2.0) * 3, s)[0]
    p_t = F.softmax(t / 2, -1)
    want = torch.autograd.grad(3 * 4 * ((p_t * (p_t.log() - F.log_softmax(s / 2, -1))).sum(-1) * valid).sum(), s)[0]
    torch.testing.assert_close(got, want)
    assert float(squarehead(ht, ht, valid)) == 0.0


def test_accumulation_averages_over_tokens_like_one_big_batch() -> None:
    teacher = llama()
    small = [torch.cat(token_batches(2, batch=1, tokens=16)[:1]), token_batches(2, batch=3, tokens=16)[1]]
    a, b = pruned(teacher), pruned(teacher)
    cfg = {"tokens": 64, "lr": 1e-3, "warmup": 0, "max_grad_norm": None}
    run_a = Recovery(a, teacher, small, RecoveryConfig(**cfg, accumulation=2))
    run_b = Recovery(b, teacher, [torch.cat(small)], RecoveryConfig(**cfg))
    run_a.run(progress=False)
    run_b.run(progress=False)
    assert run_a.steps == run_b.steps == 1
    assert run_a.history[0].loss == pytest.approx(run_b.history[0].loss, rel=1e-5)
    for (key, wa), wb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(wa, wb, rtol=1e-4, atol=1e-6, msg=key)


def test_budget_counts_attention_mask_tokens_and_whole_steps() -> None:
    teacher = llama()
    ids = token_batches(2)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, 10:] = 0  # 26 real tokens
    seen: list[tuple[int, int, float]] = []
    run = Recovery(pruned(teacher), teacher, [{"input_ids": ids[0], "attention_mask": mask}, ids[1]],
                   RecoveryConfig(tokens=100, lr=1e-3))
    run.run(progress=False, callback=lambda s, t, loss: seen.append((s, t, loss)))
    assert run.step_tokens == [26, 32, 26]  # a 4th step (32 more) would pass the budget
    assert seen == [(r.step, r.tokens, r.loss) for r in run.history] and seen[-1][1] == 84
    with pytest.raises(ConfigError, match="already run"):  # a second run would repeat the schedule
        run.run(progress=False)


def test_bf16_autocast_keeps_fp32_master_weights() -> None:
    teacher = llama()
    student = pruned(teacher)
    run = Recovery(student, teacher, token_batches(), RecoveryConfig(tokens=32 * 6, lr=3e-3, precision="bf16"))
    run.run(progress=False)
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert torch.isfinite(torch.tensor([r.loss for r in run.history])).all() and pk.check_nm(student, 2, 4).ok


def test_gradual_pruner_in_the_loop_reaches_its_sparsity() -> None:
    teacher = llama()
    student = copy.deepcopy(teacher)
    config = pk.UnstructuredConfig(sparsity=0.5, scope="layer", exclude=["lm_head"])
    pruner = pk.GradualPruner(student, config, pk.Polynomial(end_step=6, every=2))
    recover(student, teacher, token_batches(), RecoveryConfig(tokens=32 * 8, lr=1e-3), pruner=pruner, progress=False)
    layers = {k: v for k, v in pk.sparsity(student).layers.items() if ".layers." in k}
    assert layers and all(v == pytest.approx(0.5, abs=1e-3) for v in layers.values())


class Stop(Exception):
    pass


def _interrupt_at(step: int):  # noqa: ANN202
    def callback(s: int, tokens: int, loss: float) -> None:
        if s == step:
            raise Stop

    return callback


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    teacher = llama()
    cfg = RecoveryConfig(tokens=32 * 8, lr=3e-3, warmup=0.25, accumulation=2, weight_decay=0.01, checkpoint_every=3)
    whole = Recovery(pruned(teacher), teacher, token_batches(5), cfg)
    whole.run(progress=False)
    with pytest.raises(Stop):
        recover(pruned(teacher), teacher, token_batches(5), cfg, checkpoint_dir=tmp_path, progress=False,
                callback=_interrupt_at(3))
    with pytest.raises(CheckpointError, match="resume=True"):  # an earlier run's checkpoint is never overwritten
        recover(pruned(teacher), teacher, token_batches(5), cfg, checkpoint_dir=tmp_path, progress=False)
    resumed, steps = Recovery(pruned(teacher), teacher, token_batches(5), cfg), []
    resumed.run(checkpoint_dir=tmp_path, resume=True, progress=False, callback=lambda s, t, loss: steps.append(s))
    assert steps == [4]  # it continued from the checkpoint at step 3
    assert resumed.history == whole.history and len(whole.history) == 4
    for (key, a), b in zip(whole.student.state_dict().items(), resumed.student.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_checkpoint_of_another_pruning_or_run_is_refused(tmp_path: Path) -> None:
    teacher = llama()
    cfg = RecoveryConfig(tokens=32 * 2, lr=1e-3, checkpoint_every=1)
    with pytest.raises(Stop):
        recover(pruned(teacher), teacher, token_batches(), cfg, checkpoint_dir=tmp_path, progress=False,
                callback=_interrupt_at(1))
    other_masks = pruned(teacher, pk.UnstructuredConfig(sparsity=0.5, exclude=["lm_head"]))
    with pytest.raises(CheckpointError, match=r"another mask layout: mask 'model\.layers\.0\.self_attn\.q_proj"):
        recover(other_masks, teacher, token_batches(), cfg, checkpoint_dir=tmp_path, resume=True, progress=False)
    smaller = pruned(llama(intermediate_size=96), NM)
    with pytest.raises(CheckpointError, match=r"another pruning shape: 'model\.layers\.0\.mlp\.gate_proj"):
        recover(smaller, teacher, token_batches(), cfg, checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="tensors only in the checkpoint"):
        recover(copy.deepcopy(teacher), teacher, token_batches(), cfg, checkpoint_dir=tmp_path, resume=True,
                progress=False)
    with pytest.raises(CheckpointError, match=r"config\.lr"):
        recover(pruned(teacher), teacher, token_batches(), cfg.model_copy(update={"lr": 2e-3}),
                checkpoint_dir=tmp_path, resume=True, progress=False)


def test_budget_below_one_step_names_both_numbers() -> None:
    teacher = llama()
    with pytest.raises(ConfigError, match=r"tokens=20 is less than one optimizer step's 32 tokens"):
        Recovery(pruned(teacher), teacher, token_batches(), RecoveryConfig(tokens=20))


def test_vocab_mismatch_names_both_sizes() -> None:
    with pytest.raises(ConfigError, match="student's vocabulary has 300 tokens, the teacher's 256"):
        Recovery(llama(vocab_size=300), llama(), token_batches(), RecoveryConfig(tokens=1000))


@pytest.mark.parametrize(("batches", "match"), [
    ([torch.randn(2, 4)], "batch 0: input_ids must be an integer tensor"),
    ([torch.zeros(2, 4, dtype=torch.long), torch.full((2, 4), 256)], "batch 1: token ids span 256..256"),
    ([{"ids": torch.zeros(2, 4, dtype=torch.long)}], "batch 0: a dict batch needs 'input_ids'"),
    ([{"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 3)}],
     "attention_mask shape"),
    ([], r"rank\(s\) \[0\] of 1 get no batches"),
])
def test_bad_batches_are_named(batches: list, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Recovery(pruned(llama()), llama(), batches, RecoveryConfig(tokens=1000))


def test_squarehead_needs_hidden_states() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))
    with pytest.raises(ConfigError, match="squarehead"):
        Recovery(model, copy.deepcopy(model), [torch.zeros(1, 4, dtype=torch.long)],
                 RecoveryConfig(tokens=100, loss="squarehead"))
    plain = Recovery(model, copy.deepcopy(model), [torch.zeros(1, 4, dtype=torch.long)], RecoveryConfig(tokens=8))
    plain.run(progress=False)  # loss "kl" works on a model that returns bare logits
    assert plain.steps == 2


def test_config_schedule_and_validation() -> None:
    cfg = RecoveryConfig(tokens=10, lr=1.0, warmup=4, decay="cosine")
    assert [cfg.lr_at(s, 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    rates = [cfg.lr_at(s, 12) for s in range(4, 12)]
    assert rates[0] == 1.0 and all(a > b for a, b in zip(rates, rates[1:], strict=False)) and rates[-1] > 0
    assert RecoveryConfig(tokens=10, warmup=0.25).warmup_steps(40) == 10
    linear = RecoveryConfig(tokens=10, lr=1.0, warmup=0, decay="linear")
    assert [linear.lr_at(s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert RecoveryConfig(tokens=10, lr=0.5, warmup=0, decay="constant").lr_at(7, 8) == 0.5
    for bad, field in [({"warmup": 1.5}, "warmup"), ({"tokens": 0}, "tokens"), ({"loss": "mse"}, "loss"),
                       ({"lr": -1.0}, "lr"), ({"tokenz": 5}, "tokenz")]:
        with pytest.raises(ConfigError, match=field):
            RecoveryConfig(**{"tokens": 10, **bad})
    full = RecoveryConfig(tokens=10_000, warmup=0.1, loss="kl+squarehead", precision="bf16", max_grad_norm=None)
    assert config_from_dict(config_to_dict(full)) == full
