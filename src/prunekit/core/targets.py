"""Which layers a config prunes: prunable-layer discovery, `exclude`, and `PerLayer` rules.

Layers are named by FQN everywhere. A pattern is an exact FQN or "re:<regex>" (full match).
Every pattern a user writes must match something, so a misspelt name fails instead of
silently leaving a layer dense.

Some layers stay dense unless a rule names them by exact FQN (`protected_layers`): the output
head of a language model, and any layer whose weight is tied to an embedding table, as LLM
pruning tools (SparseGPT, Wanda) do. Through a tie, pruning the head zeroes the input
embeddings too (issue 17: it roughly doubled SmolLM2-135M's 50 % Wanda perplexity).
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
import weakref
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.config import FrozenConfig, PerLayer
from prunekit.core.masks import PRUNABLE_TYPES
from prunekit.errors import ConfigError, PlanError, UnsupportedLayerError

log = logging.getLogger(__name__)
_PACKAGE_DIR = str(Path(__file__).parents[1])  # as frames name files (no resolve)


def matches(pattern: str, fqn: str) -> bool:
    """True if `pattern` (exact FQN or "re:<regex>") names `fqn`."""
    if pattern.startswith("re:"):
        try:
            return re.fullmatch(pattern[3:], fqn) is not None
        except (re.error, OverflowError, RecursionError) as err:  # an `exclude` pattern is user input
            raise ConfigError(f"pattern {pattern!r} is not a valid regex: {err}") from None
    return pattern == fqn


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """FQN -> module for every layer whose weight prunekit can mask (Linear, Conv1d/2d/3d)."""
    layers = {fqn: m for fqn, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}
    if not layers:
        raise UnsupportedLayerError(
            f"{type(model).__name__} has no prunable layers (nn.Linear or nn.Conv1d/2d/3d)"
        )
    return layers


def _check_patterns_match(patterns: Any, names: list[str], field: str) -> None:
    for pattern in patterns:
        if not any(matches(pattern, n) for n in names):
            sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigError(f"{field}: {pattern!r} matches no prunable layer (layers: {sample})")


def _storage_key(t: Tensor) -> tuple[Any, ...] | None:
    # The same Parameter, or the same view of one storage. Not merely the same storage: a loader
    # may carve every weight out of one flat buffer. Meta and empty tensors share nothing.
    if t.device.type == "meta" or t.numel() == 0 or not t.data_ptr():
        return None
    return (str(t.device), t.data_ptr(), tuple(t.shape), t.stride())


def _tensor_name(key: str) -> str:
    return key.replace(".parametrizations.weight.original", ".weight")


def tied_tensors(model: nn.Module) -> dict[str, list[str]]:
    """Tensor name -> the other modules' tensor names sharing its storage (tied weights)."""
    by_storage: dict[tuple[Any, ...], list[str]] = {}
    for key, p in model.named_parameters(remove_duplicate=False):
        storage = _storage_key(p)
        if storage is not None:
            by_storage.setdefault(storage, []).append(_tensor_name(key))
    out: dict[str, list[str]] = {}
    for names in by_storage.values():
        for name in names:
            owner = name.rpartition(".")[0]
            others = [n for n in dict.fromkeys(names) if n.rpartition(".")[0] != owner]
            if others:
                out[name] = others
    return out


def _output_head(model: nn.Module) -> nn.Module | None:
    """A language model's output head: Hugging Face's `get_output_embeddings()`, or None.

    Transformers defines it on causal, masked and seq2seq LMs (`lm_head`, BERT's decoder) and
    returns None for backbones and classifiers, so it is the test for "a language model".
    """
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        head = getter()
    except (NotImplementedError, AttributeError):
        return None
    return head if isinstance(head, nn.Module) else None


def protected_layers(model: nn.Module) -> dict[str, str]:
    """FQN -> reason, for the prunable layers kept dense unless a rule names them exactly.

    Two kinds: the output head of a language model (what Hugging Face's
    `get_output_embeddings()` returns: `lm_head` of a causal LM, also masked and seq2seq LMs),
    and any layer whose weight shares storage with an `nn.Embedding`'s table (a tied head, as
    in GPT-2, SmolLM2 or nanoGPT): pruning it would zero the input embeddings too. Embeddings
    themselves are never pruned by mask configs (they are not Linear/Conv layers).

    Example:
        >>> protected_layers(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
        {}
    """
    layers = {fqn: m for fqn, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}
    out: dict[str, str] = {}
    head = _output_head(model)
    for fqn, module in layers.items():
        if module is head:
            out[fqn] = "output head of a language model"
    ties = tied_tensors(model)
    embeddings = {f"{fqn}.weight" for fqn, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for fqn in layers:
        tied = [n for n in ties.get(f"{fqn}.weight", []) if n in embeddings]
        if tied:
            why = f"weight tied to {', '.join(tied)}"
            out[fqn] = f"{out[fqn]}, {why}" if fqn in out else why
    return out


_KEPT_LOGGED: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def _log_kept_dense(model: nn.Module, kept: dict[str, str]) -> None:
    # INFO once per model and layer: a GradualPruner re-resolves at every mask update.
    logged = _KEPT_LOGGED.setdefault(model, set())
    for fqn, why in kept.items():
        level = logging.DEBUG if fqn in logged else logging.INFO
        logged.add(fqn)
        log.log(level, "layer %r kept dense by default (%s); name it in a PerLayer rule, "
                "e.g. PerLayer({%r: config, '_default': config}), to prune it", fqn, why, fqn)


def _user_stacklevel() -> int:
    """The `stacklevel` that points a warning at the first frame outside prunekit (the user's call)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


def _warn_tied(model: nn.Module, fqns: list[str]) -> None:
    ties = tied_tensors(model)
    for fqn in fqns:
        others = ties.get(f"{fqn}.weight")
        if others:
            warnings.warn(
                f"{fqn}.weight is tied to {', '.join(others)}; pruning one prunes both: the same mask goes on "
                "both, and prunekit.finalize bakes the zeros into the shared tensor, so both stay pruned "
                "(and still tied). To prune only this layer, untie it first: give "
                f"{fqn} its own nn.Parameter (and, for Hugging Face, set config.tie_word_embeddings=False)",
                UserWarning,
                stacklevel=_user_stacklevel(),
            )


def resolve(model: nn.Module, config: FrozenConfig) -> dict[str, FrozenConfig]:
    """Map each layer FQN to the leaf config that prunes it; layers left dense are absent.

    The layers of `protected_layers` (a language model's output head, a layer tied to an
    embedding) stay dense under a plain config, `_default` and regex rules; a `PerLayer` key
    that is their exact FQN prunes them, wherever it sits among the rules, e.g.
    `PerLayer({"lm_head": cfg, "_default": cfg})`. Which were kept is logged once at INFO.
    Pruning a layer whose weight is tied to another tensor warns, naming both.

    Raises:
        ConfigError: a rule or `exclude` pattern matches no layer, or nothing is left to prune.
        UnsupportedLayerError: the model has no prunable layers at all.
    """
    names = list(prunable_layers(model))
    protected = protected_layers(model)
    named: set[str] = set()  # protected layers an exact-FQN rule names
    if isinstance(config, PerLayer):
        keys = [k for k in config.rules if k != "_default"]
        _check_patterns_match(keys, names, "PerLayer.rules")
        chosen: dict[str, FrozenConfig] = {}
        for fqn in names:
            if fqn in protected and fqn in config.rules:
                rule = fqn
                named.add(fqn)
            else:
                rule = next((k for k in keys if matches(k, fqn)), "_default")
            leaf = config.rules.get(rule)
            if leaf is not None:
                chosen[fqn] = leaf
    else:
        chosen = {fqn: config for fqn in names}

    # `exclude` is checked against the layers the leaf would get before protection, so an
    # explicit exclude=["lm_head"] (what LLM scripts pass today) stays valid.
    for leaf in set(chosen.values()):
        exclude = getattr(leaf, "exclude", ())
        owners = [n for n, c in chosen.items() if c == leaf]
        _check_patterns_match(exclude, owners, f"{type(leaf).__name__}.exclude")
    chosen = {
        n: c for n, c in chosen.items() if not any(matches(p, n) for p in getattr(c, "exclude", ()))
    }
    kept = {n: protected[n] for n in chosen if n in protected and n not in named}
    chosen = {n: c for n, c in chosen.items() if n not in kept}
    _log_kept_dense(model, kept)
    if not chosen:
        hint = "".join(f"; {n!r} is kept dense by default ({why}): name it in a PerLayer rule to prune it"
                       for n, why in kept.items())
        raise ConfigError(f"the rules and exclude patterns leave no layer to prune{hint}")
    _warn_tied(model, list(chosen))
    return chosen


def group_by_config(chosen: dict[str, FrozenConfig]) -> dict[FrozenConfig, list[str]]:
    """Invert `resolve`: each distinct leaf config -> the layer FQNs it prunes, in model order."""
    groups: dict[FrozenConfig, list[str]] = {}
    for fqn, leaf in chosen.items():
        groups.setdefault(leaf, []).append(fqn)
    return groups


_SKIP_WARNED: weakref.WeakKeyDictionary[nn.Module, set[Hashable]] = weakref.WeakKeyDictionary()


def split_fitting(
    model: nn.Module,
    fqns: list[str],
    misfit: Callable[[tuple[int, ...]], str | None],
    *,
    indivisible: str,
    pattern: str,
    advice: str,
    key: Hashable,
    logger: logging.Logger,
) -> tuple[list[str], dict[str, str]]:
    """Split layers into those whose weight shape fits a pattern and the rest, with the reason.

    `misfit(shape)` says why a layer does not fit (None if it does). `indivisible="error"` raises
    naming the layer and `advice`; "skip" leaves it dense and logs it, at WARNING once per model,
    layer and `key` (a GradualPruner re-plans at every update), then at DEBUG.
    """
    modules = dict(model.named_modules())
    eligible, skipped = [], {}
    for fqn in fqns:
        why = misfit(tuple(modules[fqn].weight.shape))
        if why is None:
            eligible.append(fqn)
            continue
        if indivisible == "error":
            raise ConfigError(f"layer {fqn!r}: {why}; {advice}")
        warned = _SKIP_WARNED.setdefault(model, set())
        level = logging.DEBUG if (fqn, key) in warned else logging.WARNING
        warned.add((fqn, key))
        logger.log(level, "%s: layer %r skipped (left dense, not padded): %s", pattern, fqn, why)
        skipped[fqn] = why
    return eligible, skipped


def check_finite_weight(fqn: str, module: nn.Module, doing: str) -> None:
    """Refuse a layer whose weight holds NaN/Inf: NaN ranks unpredictably and Inf always survives.

    Raises:
        PlanError: naming the layer and what could not be done with it (`doing`).
    """
    if not torch.isfinite(module.weight).all():  # type: ignore[arg-type]
        raise PlanError(f"layer {fqn!r}: weight has NaN/Inf; cannot {doing} (a diverged run or a corrupt checkpoint?)")


def layers_to_check(model: nn.Module, layers: list[str] | None) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The layers a pattern check (`check_nm`, `check_blocks`) reads, and those it skips with why.

    `layers=None` means every prunable layer a default config would prune: the `protected_layers`
    are skipped, named with the reason. Listing a layer in `layers` checks it whatever it is.
    """
    if layers is not None:
        modules = dict(model.named_modules())
        return {f: modules[f] for f in layers}, {}
    protected = protected_layers(model)
    kept = {fqn: m for fqn, m in prunable_layers(model).items() if fqn not in protected}
    return kept, {fqn: f"left dense by default ({why}); pass layers= to check it" for fqn, why in protected.items()}
