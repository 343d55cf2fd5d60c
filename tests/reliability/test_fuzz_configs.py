"""Fuzzing configs and recipe text: every outcome is a valid config or a prunekit error (issue 10, item 4).

Hypothesis draws values of every type, misspelt and unknown keys, nested configs and nested
plain data for every allow-listed recipe type, and recipe text (random documents dumped as YAML
or JSON, valid recipes with characters mutated, raw bytes, deep nesting). The only acceptable
failure is a `PrunekitError` that carries a message: any other exception (a leaking pydantic
`ValidationError`, `TypeError`, `KeyError`, a yaml error, `RecursionError`, ...) propagates
and fails the test with the falsifying input. A config that is accepted must survive a recipe
round trip (the pinned invariant 5), so "accepted" cannot hide a config that is broken, and an
accepted schedule must answer every step with a sparsity in [0, 1). Recipe loading runs under a
hard time limit, so an input that hangs the parser fails its case.

Each property runs a modest number of examples in the default suite and many more under
`-m slow`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prunekit as pk
from prunekit.config import _RECIPE_TYPES, FrozenConfig, config_from_dict, config_to_dict, load_recipe
from prunekit.train.schedule import Schedule
from tests.reliability.test_fuzz_models import CASE_LIMIT_S, time_limit

try:  # block sparsity, where it exists, registers its config type on import
    import prunekit.methods.block  # noqa: F401
except ImportError:
    pass

TYPES: dict[str, type[FrozenConfig]] = dict(sorted(_RECIPE_TYPES.items()))  # type: ignore[arg-type]
FAST, SLOW = 25, int(os.environ.get("PRUNEKIT_FUZZ_EXAMPLES", "1000"))  # examples per property: default / `-m slow`
BUDGETS = [pytest.param(FAST, id="fast"), pytest.param(SLOW, id="slow", marks=pytest.mark.slow)]
CASES: Counter[str] = Counter()  # "property: outcome" -> generated cases run (printed by conftest.py)


def _settings(n: int) -> settings:
    # The deadline is loose (a shared 2-core machine runs these); `time_limit` is the hard bound on a hang.
    return settings(max_examples=n, deadline=timedelta(seconds=10), database=None, derandomize=n == FAST,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# A valid instance of each type: the fuzzer mutates these, so many cases get past the first field.
_LEAF = pk.UnstructuredConfig(sparsity=0.5)
EXAMPLES: dict[str, dict[str, Any]] = {
    "BlockConfig": {"sparsity": 0.5, "block": [4, 4], "scope": "global"},
    "ChannelConfig": {"ratio": 0.3, "round_to": 8, "exclude": ["fc"]},
    "DepthConfig": {"n_blocks": 2},
    "LowRankConfig": {"energy": 0.9, "round_to": 8, "exclude": ["fc"]},
    "WidthConfig": {"heads_ratio": 0.25, "ffn_ratio": 0.3, "round_to": 8},
    "ExpertConfig": {"n_experts": 2, "neurons_ratio": 0.3, "round_to": 8},
    "StateSpaceConfig": {"ratio": 0.3},
    "AllocateStage": {"target": pk.SparsityTarget(sparsity=0.5), "levels": [0.3, 0.6]},
    "ExportStage": {"opset": 20},
    "ReportSettings": {"batch_sizes": [1, 8], "seq_len": 64},
    "Cubic": {"end_step": 100, "every": 10},
    "DynamicInt8Config": {"exclude": ["re:.*head"]},
    "FinetuneConfig": {"epochs": 2, "lr": 0.01},
    "FlopsTarget": {"reduction": 0.5},
    "Iterative": {"steps": [1, 5, 9]},
    "LatencyTarget": {"speedup": 2.0},
    "NMConfig": {"n": 2, "m": 4},
    "OneShot": {"step": 3},
    "PerLayer": {"rules": {"fc": None, "re:conv.*": pk.NMConfig(n=2, m=4), "_default": _LEAF}},
    "Polynomial": {"end_step": 10, "power": 2.0},
    "Recipe": {"model": "pkg.models:build", "data": "pkg.data:loaders", "prune": _LEAF,
               "schedule": pk.Cubic(end_step=10), "finetune": pk.FinetuneConfig()},
    "SearchConfig": {"trials": 3, "levels": [0.0, 0.5], "objectives": ["accuracy", "sparsity"]},
    "SearchRecipe": {"model": "a.b:c", "data": "a.b:d", "prune": _LEAF, "input_shape": [1, 4]},
    "SizeTarget": {"size_bytes": 1000},
    "SparsityTarget": {"sparsity": 0.9},
    "StaticInt8Config": {"calibration_batches": 2},
    "UnstructuredConfig": {"sparsity": 0.5, "scope": "layer", "exclude": ["re:.*head"]},
}

# Strings a user (or an attacker) plausibly writes: option names, patterns, entry points, tags.
_WORDS = ["", "l1", "l2", "random", "wanda", "sparsegpt", "bn_scale", "taylor", "global", "layer", "skip",
          "error", "accuracy", "latency_ms", "sparsity", "fc", "_default", "_type", "_version", "re:.*",
          "re:(", "re:a{4294967296}", "re:" + "(" * 200 + ")" * 200, "re:(?P<a>x)(?P=b)", "a:b", "pkg.mod:fn",
          ":", "a:b:c", "0.5", "inf", "nan", "1e400", "!!python/object:os.system", "\x00", "é", "os.system"]
_FIELDS = sorted({f for cls in TYPES.values() for f in cls.model_fields})
keys = st.one_of(st.sampled_from(_FIELDS + _WORDS), st.text(max_size=8))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**80, max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, 2, 0.0, 0.5, 0.999, 1.0, -1]),
    st.sampled_from(_WORDS), st.text(max_size=12),
)
plain = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                     max_leaves=12)


@st.composite
def mutated(draw: st.DrawFn, name: str, depth: int = 0) -> dict[str, Any]:
    """Keyword arguments for `TYPES[name]`: its valid example with a few random edits."""
    kwargs = dict(EXAMPLES.get(name, {}))
    fields = sorted(TYPES[name].model_fields)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["set", "set", "drop", "extra", "rename"]))
        if op == "set" and fields:
            kwargs[draw(st.sampled_from(fields))] = draw(values(depth))
        elif op == "drop" and kwargs:
            kwargs.pop(draw(st.sampled_from(sorted(kwargs))))
        elif op == "extra":
            kwargs[draw(st.text(max_size=8) | st.sampled_from(_FIELDS))] = draw(values(depth))
        elif op == "rename" and kwargs:
            key = draw(st.sampled_from(sorted(kwargs)))
            kwargs[key + draw(st.text(min_size=1, max_size=2))] = kwargs.pop(key)
    return kwargs


def values(depth: int) -> st.SearchStrategy[Any]:
    """A field value: plain data, a valid config, a tagged dict, or rule mappings of those."""
    options = [plain, st.sampled_from([_LEAF, pk.NMConfig(n=1, m=4), pk.Cubic(end_step=5), pk.DynamicInt8Config()])]
    if depth < 2:
        options.append(st.sampled_from(sorted(TYPES)).flatmap(lambda n: tagged(n, depth + 1)))
        options.append(st.dictionaries(keys, st.none() | tagged_any(depth + 1), max_size=3))
    return st.one_of(options)


def tagged(name: str, depth: int) -> st.SearchStrategy[dict[str, Any]]:
    version = st.sampled_from([1, 1, 1, 2, "1", None, 1.0])
    return st.builds(lambda kw, v: {"_type": name, "_version": v, **kw}, mutated(name, depth), version)


def tagged_any(depth: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.sampled_from(sorted(TYPES) + ["os.system", "FrozenConfig", "MaskConfig"]).flatmap(
        lambda n: tagged(n, depth) if n in TYPES else st.just({"_type": n}))


# --------------------------------------------------------------------------------------------
# The property every case checks.


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(...)`, or None when it raised a `PrunekitError` with a message; anything else propagates."""
    what = getattr(fn, "__name__", "?")
    try:
        out = fn(*args, **kwargs)
    except pk.PrunekitError as err:
        assert str(err).strip(), f"{type(err).__name__} raised without a message"
        CASES[f"{what}: refused, {type(err).__name__}"] += 1
        return None
    CASES[f"{what}: accepted"] += 1
    return out


def assert_round_trips(config: FrozenConfig) -> None:
    """An accepted config survives the recipe round trip through data, YAML and JSON text."""
    data = config_to_dict(config)
    assert config_from_dict(data) == config
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(data))) == config
    assert config_from_dict(json.loads(json.dumps(data))) == config


def _load_text(text: str | bytes, suffix: str) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"recipe{suffix}"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        with time_limit(CASE_LIMIT_S):  # YAML aliases can expand exponentially: a hang must fail the case
            return outcome(load_recipe, path)


# --------------------------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize("name", sorted(n for n in EXAMPLES if n in TYPES))
def test_examples_are_valid(name: str) -> None:
    """The fuzzer's seeds are valid configs (so the mutations start from the accepted region)."""
    config = TYPES[name](**EXAMPLES[name])
    assert_round_trips(config)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", sorted(TYPES))
def test_constructor_gives_config_or_config_error(name: str, budget: int) -> None:
    cls = TYPES[name]

    @_settings(budget)
    @given(mutated(name))
    def check(kwargs: dict[str, Any]) -> None:
        config = outcome(cls, **kwargs)
        if config is not None:
            assert isinstance(config, cls)
            hash(config)  # configs are values: usable as dict keys (PerLayer groups by them)
            assert_round_trips(config)

    check()


@pytest.mark.parametrize("budget", BUDGETS)
def test_config_from_dict_gives_config_or_config_error(budget: int) -> None:
    @_settings(budget)
    @given(st.one_of(tagged_any(0), plain, st.dictionaries(keys | st.integers() | st.none(), values(1), max_size=4)))
    def check(data: Any) -> None:
        out = outcome(config_from_dict, config_to_dict(data))
        if isinstance(out, FrozenConfig):
            assert_round_trips(out)

    check()


def _mutate_text(text: str, edits: list[tuple[int, str, int]]) -> str:
    for pos, chars, cut in edits:
        pos %= max(len(text), 1)
        text = text[:pos] + chars + text[pos + cut:]
    return text


@pytest.mark.parametrize("budget", BUDGETS)
def test_recipe_text_gives_config_or_config_error(budget: int) -> None:
    edits = st.lists(st.tuples(st.integers(0, 10_000), st.text(max_size=3) | st.sampled_from(
        ["{", "}", "[", "]", ":", "\n", "- ", "&a ", "*a", "!!python/name:os.system ", '"', "'", ",", "#", "\t"]),
        st.integers(0, 3)), max_size=4)

    @_settings(budget)
    @given(tagged_any(0), st.sampled_from([".yaml", ".yml", ".json"]), edits)
    def check(doc: dict[str, Any], suffix: str, changes: list[tuple[int, str, int]]) -> None:
        data = config_to_dict(doc)
        text = json.dumps(data) if suffix == ".json" else yaml.safe_dump(data)
        out = _load_text(_mutate_text(text, changes), suffix)
        if out is not None:
            assert isinstance(out, FrozenConfig)
            assert_round_trips(out)

    check()


@pytest.mark.parametrize("budget", BUDGETS)
def test_random_bytes_give_config_or_config_error(budget: int) -> None:
    @_settings(budget)
    @given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode), st.sampled_from([".yaml", ".json"]))
    def check(raw: bytes, suffix: str) -> None:
        out = _load_text(raw, suffix)
        assert out is None or isinstance(out, FrozenConfig)

    check()


@pytest.mark.parametrize("budget", BUDGETS)
def test_deep_nesting_gives_config_or_config_error(budget: int) -> None:
    """Nesting deeper than Python's recursion limit is a ConfigError, not a RecursionError."""
    shapes = {
        "list": ("[" * 1, "]" * 1),
        "map": ('{"a": ', "}"),
        "rules": ('{"_type": "PerLayer", "rules": {"fc": ', "}}"),
    }

    # Parsing ~1000 levels costs about a CPU second, which a loaded machine stretches past any fixed
    # deadline; `time_limit` in `_load_text` still fails a case that hangs.
    @settings(_settings(max(budget // 5, 5)), deadline=None)
    @given(st.sampled_from(sorted(shapes)), st.integers(1, 20_000), st.sampled_from([".yaml", ".json"]))
    def check(shape: str, depth: int, suffix: str) -> None:
        head, tail = shapes[shape]
        text = '{"_type": "Recipe", "model": "a:b", "prune": ' + head * depth + "null" + tail * depth + "}"
        out = _load_text(text, suffix)
        assert out is None or isinstance(out, FrozenConfig)

    check()


SCHEDULES = sorted(n for n, cls in TYPES.items() if issubclass(cls, Schedule))


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", SCHEDULES)
def test_accepted_schedules_give_a_sparsity_in_range(name: str, budget: int) -> None:
    """A schedule that was accepted answers every step with a sparsity in [0, 1) (never raises)."""
    cls = TYPES[name]

    @_settings(budget)
    @given(mutated(name), st.integers(0, 2**70), st.floats(0.0, 0.999))
    def check(kwargs: dict[str, Any], step: int, final: float) -> None:
        schedule = outcome(cls, **kwargs)
        if schedule is None:
            return
        s = schedule.sparsity_at(step, final)
        assert isinstance(s, float) and 0.0 <= s < 1.0, (schedule, step, final, s)
        assert schedule.sparsity_at(2**80, final) == pytest.approx(final)  # every schedule ends at the target

    check()
