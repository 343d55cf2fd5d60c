"""Safe defaults for LLMs: the output head and a layer tied to the embeddings stay dense unless named."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.core.masks import get_mask
from prunekit.core.targets import protected_layers, resolve
from prunekit.errors import ConfigError
from prunekit.methods.block import BlockConfig
from prunekit.methods.nm import NMConfig
from prunekit.structured.plan import excluded_layers
from tests.models import mlp

VOCAB = 96


def _tiny_llama(tie: bool) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    return model


def _batches(n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=g)} for _ in range(n)]


class _TiedGPT(nn.Module):
    """nanoGPT's shape, without Hugging Face: the head's weight *is* the token embedding table."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, 32)
        self.fc = nn.Linear(32, 32)
        self.lm_head = nn.Linear(32, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.fc(self.wte(idx))))


CONFIGS = {
    "l1": lambda: pk.UnstructuredConfig(sparsity=0.5),
    "wanda": lambda: pk.UnstructuredConfig(sparsity=0.5, criterion="wanda", scope="layer"),
    "wanda_global": lambda: pk.UnstructuredConfig(sparsity=0.5, criterion="wanda"),
    "sparsegpt": lambda: pk.UnstructuredConfig(sparsity=0.5, criterion="sparsegpt", scope="layer"),
    "nm": lambda: NMConfig(n=2, m=4),
    "nm_wanda": lambda: NMConfig(n=2, m=4, criterion="wanda"),
    "block": lambda: BlockConfig(sparsity=0.5, block=(1, 16)),
}


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_default_configs_leave_head_and_embeddings_dense(name: str, tie: bool) -> None:
    model = _tiny_llama(tie)
    embed = model.model.embed_tokens.weight.detach().clone()
    head = model.lm_head.weight.detach().clone()
    pk.prune(model, CONFIGS[name](), data=_batches())
    assert get_mask(model.lm_head) is None
    assert torch.equal(model.lm_head.weight, head) and torch.equal(model.model.embed_tokens.weight, embed)
    assert get_mask(model.model.layers[0].mlp.up_proj) is not None  # the blocks are pruned
    pk.finalize(model)
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie  # finalize keeps (or not) the tie


def test_protected_layers_name_the_head_and_the_tie() -> None:
    assert protected_layers(_tiny_llama(tie=False)) == {"lm_head": "output head of a language model"}
    tied = protected_layers(_tiny_llama(tie=True))
    assert tied == {"lm_head": "output head of a language model, weight tied to model.embed_tokens.weight"}
    assert protected_layers(_TiedGPT()) == {"lm_head": "weight tied to wte.weight"}  # no HF: the tie alone
    assert protected_layers(mlp()) == {}


def test_non_llm_model_still_prunes_its_last_layer() -> None:
    model = mlp()
    pk.prune(model, pk.UnstructuredConfig(sparsity=0.5, scope="layer"))
    assert pk.sparsity(model).layers["5"] == pytest.approx(0.5)


def test_kept_layers_are_logged_once_at_info(caplog: pytest.LogCaptureFixture) -> None:
    model = _tiny_llama(tie=True)
    with caplog.at_level(logging.INFO, logger="prunekit.core.targets"):
        resolve(model, pk.UnstructuredConfig(sparsity=0.5))
        resolve(model, pk.UnstructuredConfig(sparsity=0.6))  # a GradualPruner re-resolves every update
    info = [r for r in caplog.records if r.levelno == logging.INFO and "'lm_head' kept dense" in r.getMessage()]
    assert len(info) == 1 and "model.embed_tokens.weight" in info[0].getMessage()


def test_regex_rules_and_exclude_do_not_name_the_head() -> None:
    model = _tiny_llama(tie=True)
    cfg = pk.UnstructuredConfig(sparsity=0.5)
    assert "lm_head" not in resolve(model, pk.PerLayer({"re:.*": cfg}))
    assert "lm_head" not in resolve(model, pk.PerLayer({"re:.*proj": cfg, "_default": cfg}))
    # What LLM scripts pass today stays valid (the pattern still has a layer to match).
    assert "lm_head" not in resolve(model, pk.UnstructuredConfig(sparsity=0.5, exclude=["lm_head"]))


def test_nothing_but_protected_layers_left_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="'lm_head' is kept dense by default.*PerLayer rule"):
        resolve(_TiedGPT(), pk.PerLayer({"fc": None, "_default": pk.UnstructuredConfig(sparsity=0.5)}))


def test_naming_the_untied_head_prunes_it_without_a_tie_warning() -> None:
    model = _tiny_llama(tie=False)
    cfg = pk.UnstructuredConfig(sparsity=0.5, scope="layer")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning (a tie warning included) fails the test
        pk.prune(model, pk.PerLayer({"lm_head": cfg, "_default": cfg}))
    assert pk.sparsity(model).layers["lm_head"] == pytest.approx(0.5)
    assert float((model.model.embed_tokens.weight == 0).float().mean()) == 0.0


@pytest.mark.parametrize("first", [True, False])
def test_an_exact_rule_names_the_head_wherever_it_sits(first: bool) -> None:
    model = _tiny_llama(tie=False)
    cfg = pk.UnstructuredConfig(sparsity=0.5, scope="layer")
    rules = {"lm_head": NMConfig(n=2, m=4), "re:.*": cfg}
    if not first:  # after a regex that matches it too: the exact name still wins for a protected layer
        rules = {"re:.*": cfg, "lm_head": NMConfig(n=2, m=4)}
    assert resolve(model, pk.PerLayer(rules))["lm_head"] == NMConfig(n=2, m=4)


@pytest.mark.parametrize("criterion", ["l1", "wanda"])
def test_naming_the_tied_head_warns_naming_both_and_finalize_prunes_both(criterion: str) -> None:
    model = _tiny_llama(tie=True)
    cfg = pk.UnstructuredConfig(sparsity=0.5, criterion=criterion, scope="layer")
    both = r"lm_head\.weight is tied to model\.embed_tokens\.weight; pruning one prunes both"
    with pytest.warns(UserWarning, match=both) as rec:
        pk.prune(model, pk.PerLayer({"lm_head": cfg, "_default": cfg}), data=_batches())
    tie_warnings = [w for w in rec if "is tied to" in str(w.message)]
    assert tie_warnings and all(w.filename == __file__ for w in tie_warnings)  # points at the user's call
    mask = get_mask(model.lm_head).mask.clone()
    assert 1 - float(mask.float().mean()) == pytest.approx(0.5)
    stored = model.lm_head.parametrizations.weight.original
    assert stored is model.model.embed_tokens.parametrizations.weight.original  # one shared tensor
    assert torch.equal(model.model.embed_tokens.weight, model.lm_head.weight)  # both read it masked
    expected = (stored * mask).detach().clone()
    ids = _batches()[0]["input_ids"]
    with torch.no_grad():
        masked_logits = model(input_ids=ids).logits

    pk.finalize(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, masked_logits)  # finalize changes nothing
    # Consistent: still one tensor, both modules read it, and it carries the head's zeros.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.lm_head.weight, nn.Parameter)
    assert torch.equal(model.model.embed_tokens.weight, expected)
    assert torch.equal(model.model.embed_tokens.weight == 0, ~mask)


def test_nanogpt_style_tie_warns_and_finalize_keeps_it() -> None:
    model = _TiedGPT()
    cfg = pk.UnstructuredConfig(sparsity=0.5, scope="layer")
    with pytest.warns(UserWarning, match=r"lm_head\.weight is tied to wte\.weight"):
        pk.prune(model, pk.PerLayer({"lm_head": cfg, "_default": cfg}))
    pk.finalize(model)
    assert model.lm_head.weight is model.wte.weight
    assert float((model.wte.weight == 0).float().mean()) == pytest.approx(0.5)


@pytest.mark.parametrize("tie", [True, False])
def test_channel_config_keeps_the_head(tie: bool) -> None:
    model = _tiny_llama(tie)
    assert "lm_head" in excluded_layers(model, ())
    assert excluded_layers(model, ("lm_head",)) == ["lm_head"]  # named once, not twice
    x = _batches(1)[0]
    plan = pk.plan(model, pk.ChannelConfig(ratio=0.5), x)
    assert any(g["removed"] for g in plan.groups)
    pruned = plan.apply(copy.deepcopy(model))
    assert pruned.lm_head.weight.shape[0] == VOCAB
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) == tie


def test_pattern_checks_skip_the_head_a_default_config_left_dense() -> None:
    model = _tiny_llama(tie=False)
    pk.prune(model, pk.NMConfig(n=2, m=4))
    report = pk.check_nm(model, 2, 4)
    assert report.ok and "lm_head" in report.skipped and "left dense by default" in report.skipped["lm_head"]
    assert not pk.check_nm(model, 2, 4, layers=["lm_head"]).ok  # named, it is checked (and dense)
    pk.prune(model, pk.BlockConfig(sparsity=0.5, block=(4, 4)))
    assert "lm_head" in pk.check_blocks(model, (4, 4)).skipped
