"""OWL: per-block sparsity from each block's share of outlier weights (Yin et al. 2024).

"Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High
Sparsity" (ICML 2024) observes that uniform sparsity is what breaks LLM pruning at 60-70 %: the
blocks differ in how many *outlier* weights they hold, and those weights carry the features the
model cannot lose. Its rule, for a target average sparsity S over L decoder blocks:

1. Score every weight of the dense model as Wanda does, A_ij = |W_ij| * ||X_j||_2, with X_j
   input feature j of its layer over all calibration tokens (Sun et al. 2023).
2. The layerwise outlier distribution (LOD): for block l, pooling the scores of all its pruned
   Linear layers, D_l = #{A_ij > M * mean(A)} / #{A_ij}, the fraction of scores above M times
   the block's mean score (M = 5 by default).
3. Min-max normalise to [0, 2 lambda]: n_l = 2 lambda (D_l - min D) / (max D - min D).
4. S_l = S - (n_l - mean(n)): more outliers, lower sparsity, average S (lambda = 0.08).
   (The reference code sets the density 1 - S_l = n_l - mean(n) + 1 - S.)

The statistics come from the *dense* model (the reference code computes every block's LOD
before pruning any), and always from Wanda's score, also when the blocks are then pruned by
magnitude or SparseGPT (as the paper's "magnitude w. OWL" and "SparseGPT w. OWL" do), so OWL
needs calibration data whatever the criterion.

The width of the range is 2 lambda (max S_l - min S_l = 2 lambda unless all D_l are equal), but
it is not centred on S: S_l lies in [S + mean(n) - 2 lambda, S + mean(n)]. The paper's text says
"S_l in [S - lambda, S + lambda]", which holds only when mean(n) = lambda; with a skewed LOD
(a few blocks full of outliers) those blocks get close to S - 2 lambda.
The reference code (and llm-compressor's `owl_lmbda`) apply the rule above unclipped, and the
paper's results and its defaults (M = 5, lambda = 0.08) come from it, so it is the default here.
Two options on top, each equal to the reference rule where it applies:

- The mean is weighted by each block's prunable weight count p_l (S_l = S - (n_l - sum p n /
  sum p)), so the pruned layers as a whole hold exactly S zeros even when blocks differ in size
  (LLaMA's blocks are all equal, so the weighted mean is the plain one).
- `clip=True` keeps the band the paper's text states: S_l = clip(S + t - n_l, S - lambda,
  S + lambda), with the shift t chosen so that sum_l p_l S_l = S sum_l p_l. The weighted mean is
  nondecreasing and piecewise linear in t, so t is found exactly between two breakpoints; when
  mean(n) = lambda nothing is clipped and t = mean(n), the reference rule.

Under torchrun each rank feeds its own batches and the input norms are summed over ranks
(`collect_stats`), so every rank computes the same LOD and the same rules.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, cast

import torch
from torch import Tensor, nn

from prunekit.config import PerLayer
from prunekit.core.inputs import call_model, to_model_device
from prunekit.core.progress import progress as progress_bar
from prunekit.core.targets import check_finite_weight, resolve
from prunekit.errors import ConfigError
from prunekit.methods.batches import Batch, rank_batches
from prunekit.methods.blockwise import find_blocks
from prunekit.methods.calibration import collect_stats
from prunekit.methods.unstructured import UnstructuredConfig
from prunekit.methods.wanda import wanda_scores

log = logging.getLogger(__name__)


def _check_m(m: float) -> None:
    if not (isinstance(m, (int, float)) and math.isfinite(m) and m > 0):
        raise ConfigError(f"OWL m: {m!r} is not a positive finite number; it is the outlier threshold as a "
                          "multiple of the block's mean Wanda score (the paper uses 5)")


def _check_lam(lam: float, sparsity: float) -> None:
    # lam <= S and S + lam < 1 keep the clipped band [S - lam, S + lam] inside [0, 1); the
    # unclipped rule's range is checked again once the ratios are known.
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and 0 <= lam <= sparsity and sparsity + lam < 1):
        raise ConfigError(f"OWL lam: {lam!r} is out of range for sparsity {sparsity:g}; the blocks' sparsities "
                          f"spread 2 lam around it, so use 0 <= lam <= {sparsity:g} and lam < {1 - sparsity:g} "
                          "(the paper uses 0.08)")


def _check_config(config: Any) -> UnstructuredConfig:
    if not isinstance(config, UnstructuredConfig):
        raise ConfigError(f"OWL allocates the sparsity of an UnstructuredConfig (magnitude, Wanda or SparseGPT), "
                          f"got {type(config).__name__}; N:M and block patterns fix their sparsity per group")
    return config


# --------------------------------------------------------------------------------------------
# The allocation rule: outlier ratios -> per-block sparsities (pure, no model).


def owl_sparsities(
    outlier_ratios: Mapping[str, float],
    params: Mapping[str, int],
    sparsity: float,
    lam: float = 0.08,
    *,
    clip: bool = False,
) -> dict[str, float]:
    """Per-block sparsities from OWL's outlier ratios; does not mutate anything.

    More outliers give a lower sparsity; the average weighted by `params` is `sparsity` (up to
    float rounding); the sparsities span 2 `lam` (the reference rule, within sparsity +- 2 lam),
    or with `clip` lie within sparsity +- lam. Equal ratios, or lam = 0, give every block
    `sparsity`. See the module docstring for the rule.

    Args:
        outlier_ratios: block -> D_l, its fraction of outlier scores.
        params: block -> the number of weights it prunes (the weights of the average).
        sparsity: the target average S, in [0, 1).
        lam: lambda, half the spread of the sparsities; 0 <= lam <= S and S + lam < 1.
        clip: keep every block within [S - lam, S + lam] (the paper's text) instead of the
            reference code's [S + mean(n) - 2 lam, S + mean(n)].

    Returns:
        block -> sparsity, in the order of `outlier_ratios`.

    Raises:
        ConfigError: lam out of range, or (unclipped) so large that a block's sparsity leaves
            [0, 1); the two mappings name different blocks; a ratio is not finite or a weight
            count not positive.

    Example:
        >>> s = owl_sparsities({"a": 0.01, "b": 0.03}, {"a": 10, "b": 10}, 0.5, lam=0.05)
        >>> {block: round(v, 6) for block, v in s.items()}  # "b" holds more outliers
        {'a': 0.55, 'b': 0.45}
    """
    _check_lam(lam, sparsity)
    if set(outlier_ratios) != set(params) or not outlier_ratios:
        raise ConfigError(f"OWL: outlier ratios {sorted(outlier_ratios)} and weight counts {sorted(params)} "
                          "must name the same, non-empty set of blocks")
    bad = {b: d for b, d in outlier_ratios.items() if not math.isfinite(d)}
    bad.update({b: p for b, p in params.items() if p <= 0})
    if bad:
        raise ConfigError(f"OWL: blocks {bad} have a non-finite outlier ratio or no weights to prune")
    blocks = list(outlier_ratios)
    lo, hi = min(outlier_ratios.values()), max(outlier_ratios.values())
    if lam == 0 or hi == lo:
        return dict.fromkeys(blocks, sparsity)
    n = {b: 2 * lam * (outlier_ratios[b] - lo) / (hi - lo) for b in blocks}
    total = math.fsum(params.values())
    if not clip:
        shift = math.fsum(params[b] * n[b] for b in blocks) / total
        out = {b: sparsity + shift - n[b] for b in blocks}
        outside = {b: round(v, 4) for b, v in out.items() if not 0 <= v < 1}
        if outside:
            raise ConfigError(f"OWL lam: {lam!r} gives blocks {outside} a sparsity outside [0, 1) at sparsity "
                              f"{sparsity:g}; use a smaller lam, or clip=True")
        return out
    return _clipped(n, params, sparsity, lam)


def _clipped(n: Mapping[str, float], params: Mapping[str, int], sparsity: float, lam: float) -> dict[str, float]:
    """S_l = clip(S + t - n_l, S - lam, S + lam) with t solving the weighted mean = S."""
    total = math.fsum(params.values())

    def at(t: float) -> dict[str, float]:
        return {b: min(max(sparsity + t - v, sparsity - lam), sparsity + lam) for b, v in n.items()}

    def mean(t: float) -> float:
        return math.fsum(params[b] * s for b, s in at(t).items()) / total

    # Breakpoints of the piecewise linear mean(t): where a block meets either edge of the band.
    # At the first all blocks sit at S - lam (mean < S), at the last at S + lam (mean > S).
    points = sorted({v - lam for v in n.values()} | {v + lam for v in n.values()})
    t = points[-1]
    for a, b in pairwise(points):
        fa, fb = mean(a), mean(b)
        if fa <= sparsity <= fb:
            t = a if fb == fa else a + (sparsity - fa) * (b - a) / (fb - fa)
            break
    return at(t)


# --------------------------------------------------------------------------------------------
# The layerwise outlier distribution of a model.


@dataclass(frozen=True)
class OutlierDistribution:
    """OWL's layerwise outlier distribution (LOD) of a dense model, per repeated block.

    Attributes:
        ratios: block FQN -> the fraction of its pruned weights whose Wanda score exceeds `m`
            times the block's mean score.
        params: block FQN -> how many weights of the block the config prunes.
        m: the outlier threshold, a multiple of the block's mean score.
    """

    ratios: dict[str, float]
    params: dict[str, int]
    m: float

    def allocate(self, config: UnstructuredConfig, lam: float = 0.08, *, clip: bool = False) -> OwlAllocation:
        """Per-block sparsities averaging `config.sparsity` (see `owl_sparsities`); mutates nothing.

        `config` should prune the same layers as the config the distribution was measured for
        (only its sparsity, criterion and other fields may differ).
        """
        config = _check_config(config)
        sparsities = owl_sparsities(self.ratios, self.params, config.sparsity, lam, clip=clip)
        return OwlAllocation(config, self, lam, clip, sparsities)


def _block_ratio(layers: Iterable[tuple[Tensor, Tensor]], m: float) -> float:
    """The fraction of the pooled Wanda scores of (weight, sum of squared inputs) pairs above m x their mean."""
    scores = [wanda_scores(w, sq).flatten() for w, sq in layers]
    count = sum(s.numel() for s in scores)
    mean = math.fsum(float(s.sum(dtype=torch.float64)) for s in scores) / count
    return sum(int((s > m * mean).sum()) for s in scores) / count


class _Done(Exception):
    """Raised by a hook on the last block: the forward pass has fed every scored layer."""


def _weight(module: nn.Module) -> Tensor:
    return cast(Tensor, module.weight)


def _input_norms(
    model: nn.Module, layers: dict[str, nn.Module], last: nn.Module, batches: list[Batch], show: bool
) -> dict[str, Tensor]:
    """Each layer's per-input-feature sum of squares over `batches` (summed over ranks), in eval
    mode; each forward pass stops after block `last`, as nothing after it is scored."""

    def stop(*_: Any) -> None:
        raise _Done

    def run() -> None:
        for batch in progress_bar(batches, "OWL outlier statistics", show):
            with contextlib.suppress(_Done):
                call_model(model, to_model_device(model, batch))

    training = model.training
    handle = last.register_forward_hook(stop)
    try:
        model.eval()
        with torch.no_grad():
            stats = collect_stats(layers, run, hessian=False)
    finally:
        handle.remove()
        model.train(training)
    return {fqn: st.sq_norm for fqn, st in stats.items()}


def _blocks_of(model: nn.Module, config: UnstructuredConfig) -> tuple[dict[str, list[str]], dict[str, nn.Module]]:
    """Block FQN -> the target layers in it, for the layers `config` prunes."""
    targets = list(resolve(model, config))
    blocks = find_blocks(model, targets)
    if blocks is None:
        raise ConfigError(
            f"OWL sets one sparsity per repeated block (an LLM's decoder layers), but {type(model).__name__} has no "
            "nn.ModuleList with two or more blocks holding the layers the config prunes; use a uniform "
            "UnstructuredConfig, or allocate per layer from a sensitivity scan (prunekit.allocate)"
        )
    modules = dict(model.named_modules())
    owned = {b: [f for f in targets if f.startswith(b + ".")] for b, _ in blocks}
    return {b: fqns for b, fqns in owned.items() if fqns}, modules


def outlier_distribution(
    model: nn.Module,
    config: UnstructuredConfig,
    data: Iterable[Batch] | Tensor | None,
    *,
    m: float = 5.0,
    progress: bool = False,
) -> OutlierDistribution:
    """Measure OWL's outlier ratio of each repeated block on the dense model; does not mutate it.

    One forward pass per batch of `data` collects each target Linear layer's input norms;
    the blocks are the `nn.ModuleList` children `find_blocks` finds (an LLM's decoder layers),
    and the targets are the layers `config` prunes (its `exclude`, with the output head and
    embedding-tied layers left out as by default). Under torchrun the norms are summed over
    ranks, so every rank gets the same distribution.

    Args:
        config: the uniform config to allocate; says which layers are scored and counted.
        data: calibration batches (tensors, tuples of args or dicts of kwargs).
        m: the outlier threshold as a multiple of each block's mean Wanda score.
        progress: show a progress bar over the batches.

    Raises:
        ConfigError: `config` is not an `UnstructuredConfig`, `m` is not positive, or the model
            has no repeated blocks holding target layers.
        CalibrationError: no data, an empty batch, a layer that saw no inputs, NaN/Inf inputs.
        UnsupportedLayerError: no prunable layer in the model.
        PlanError: a target weight holds NaN/Inf.
    """
    config = _check_config(config)
    _check_m(m)
    owned, modules = _blocks_of(model, config)
    linears = {b: [f for f in fqns if isinstance(modules[f], nn.Linear)] for b, fqns in owned.items()}
    empty = [b for b, fqns in linears.items() if not fqns]
    if empty:
        raise ConfigError(f"OWL: blocks {empty} prune no nn.Linear layer, so they have no Wanda scores to "
                          "count outliers in; exclude their layers or use a uniform config")
    scored = {f: modules[f] for fqns in linears.values() for f in fqns}
    for fqn, module in scored.items():
        check_finite_weight(fqn, module, "measure its outlier ratio")
    batches = rank_batches(data)
    norms = _input_norms(model, scored, modules[list(owned)[-1]], batches, progress)
    ratios = {block: _block_ratio(((_weight(modules[f]).detach().float().cpu(), norms[f]) for f in fqns), m)
              for block, fqns in linears.items()}
    params = {b: sum(_weight(modules[f]).numel() for f in fqns) for b, fqns in owned.items()}
    return OutlierDistribution(ratios, params, float(m))


# --------------------------------------------------------------------------------------------
# The result: per-block sparsities and the rules that prune them.


@dataclass(frozen=True)
class OwlAllocation:
    """What OWL chose: one sparsity per block, and the `PerLayer` rules that prune them.

    Attributes:
        config: the uniform config whose `sparsity` is the target average.
        distribution: the outlier ratios and weight counts the allocation came from.
        lam: lambda, half the spread of the sparsities.
        clip: whether the sparsities were clipped to config.sparsity +- lam.
        sparsities: block FQN -> its sparsity.
    """

    config: UnstructuredConfig
    distribution: OutlierDistribution
    lam: float
    clip: bool
    sparsities: dict[str, float]

    @property
    def mean_sparsity(self) -> float:
        """The blocks' sparsities averaged by their weight counts (the target, up to rounding)."""
        params = self.distribution.params
        return math.fsum(params[b] * s for b, s in self.sparsities.items()) / math.fsum(params.values())

    def rules(self) -> PerLayer:
        """`PerLayer` rules: each block's layers at its sparsity (scope "layer"), the rest as `config`.

        The config's `exclude` patterns become rules that leave those layers dense; layers
        outside the blocks get the target sparsity; the output head and embedding-tied layers
        stay dense as with the plain config. Every leaf keeps the config's other fields.
        """
        base = self.config.model_copy(update={"exclude": (), "scope": "layer"})
        rules: dict[str, Any] = dict.fromkeys(self.config.exclude)
        for block, sparsity in self.sparsities.items():
            rules["re:" + re.escape(block) + r"\..*"] = base.with_sparsity(sparsity)
        rules["_default"] = base
        return PerLayer(rules)

    def summary(self) -> str:
        """A table: block, outlier ratio (%), sparsity; then the weighted mean."""
        ratios = self.distribution.ratios
        clip = ", clipped" if self.clip else ""
        lines = [f"OWL (M={self.distribution.m:g}, lambda={self.lam:g}{clip}) for {self.config.criterion} at "
                 f"{self.config.sparsity:.1%}:", f"{'block':<24} {'outliers':>9} {'sparsity':>9}"]
        lines += [f"{b:<24} {ratios[b]:>9.3%} {s:>9.2%}" for b, s in self.sparsities.items()]
        lines.append(f"{'weighted mean':<24} {'':>9} {self.mean_sparsity:>9.2%}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for a JSON report: target, lambda, M, and per block its ratio and sparsity."""
        return {
            "sparsity": self.config.sparsity, "criterion": self.config.criterion, "lam": self.lam,
            "clip": self.clip, "m": self.distribution.m, "mean_sparsity": self.mean_sparsity,
            "blocks": {b: {"outlier_ratio": self.distribution.ratios[b], "sparsity": s,
                           "params": self.distribution.params[b]} for b, s in self.sparsities.items()},
        }


def owl_allocation(
    model: nn.Module,
    config: UnstructuredConfig,
    data: Iterable[Batch] | Tensor | None,
    *,
    lam: float = 0.08,
    m: float = 5.0,
    clip: bool = False,
    progress: bool = False,
) -> OwlAllocation:
    """OWL's per-block sparsities for `config` on `model` (Yin et al. 2024); does not mutate it.

    `outlier_distribution` followed by `OutlierDistribution.allocate`, with `lam` and `m`
    checked before any forward pass; the arguments are `owl`'s. The result holds the outlier
    ratios, the sparsities and `rules()`; its `summary()` is logged at INFO. To try several
    targets or lambdas, measure `outlier_distribution` once and `allocate` from it.

    Raises:
        As `owl`.

    Example:
        >>> alloc = owl_allocation(model, UnstructuredConfig(sparsity=0.7, criterion="wanda"), data)  # doctest: +SKIP
        >>> print(alloc.summary())  # doctest: +SKIP
        >>> prunekit.prune(model, alloc.rules(), data=data)  # doctest: +SKIP
    """
    _check_lam(lam, _check_config(config).sparsity)
    allocation = outlier_distribution(model, config, data, m=m, progress=progress).allocate(config, lam, clip=clip)
    log.info("%s", allocation.summary())
    return allocation


def owl(
    model: nn.Module,
    config: UnstructuredConfig,
    data: Iterable[Batch] | Tensor | None,
    *,
    lam: float = 0.08,
    m: float = 5.0,
    clip: bool = False,
    progress: bool = False,
) -> PerLayer:
    """`PerLayer` rules giving each decoder block OWL's sparsity (Yin et al. 2024); mutates nothing.

    Blocks with more outlier weights (Wanda scores above `m` x the block mean, on the dense
    model) get a lower sparsity; the sparsities spread over 2 `lam` and average (weighted by
    each block's weight count) to `config.sparsity`. Each rule is `config` with the block's
    sparsity and `scope="layer"`; prune with the same data.

    Args:
        config: an `UnstructuredConfig` (criterion "l1", "wanda" or "sparsegpt"); its
            sparsity is the target average and its other fields carry into every rule.
        data: calibration batches.
        lam: half the spread of the blocks' sparsities (the paper's 0.08).
        m: outlier threshold, a multiple of the block's mean score (the paper's 5).
        clip: keep each block within config.sparsity +- lam (the paper's text) instead of the
            reference code's range [S + mean(n) - 2 lam, S + mean(n)] (module docstring).
        progress: show a progress bar over the batches.

    Raises:
        ConfigError: not an `UnstructuredConfig`, `lam` or `m` out of range, or no repeated blocks.
        CalibrationError: missing or empty data, a layer without inputs, NaN/Inf inputs.

    Example:
        >>> rules = owl(model, UnstructuredConfig(sparsity=0.7, criterion="wanda"), batches)  # doctest: +SKIP
        >>> prunekit.prune(model, rules, data=batches)  # doctest: +SKIP
    """
    return owl_allocation(model, config, data, lam=lam, m=m, clip=clip, progress=progress).rules()
