"""Frozen config objects, per-layer rules, and YAML/JSON recipes.

Configs are values: immutable, comparable, hashable, and serialisable through an allow-list
of classes (never `yaml.load` of arbitrary tags, never `exec`). Each method's config lives
beside its method (`UnstructuredConfig` in `methods/unstructured.py`, `ChannelConfig` in
`structured/config.py`) and joins the allow-list with `@recipe_type`.

Glossary (one word per idea, at every boundary):
    sparsity: the fraction of zeros in a tensor, in [0, 1) (mask configs: unstructured, N:M, block).
    ratio: the fraction of a coupled channel group's units removed, in [0, 1) (`ChannelConfig`).
    level: whichever of the two a config varies; sensitivity scans, allocation and search talk
        in levels and set them through `FrozenConfig.with_level`, never by field name.
    FQN: a module's fully qualified name in `model.named_modules()` ("layer2.0.conv1"); rules,
        errors, reports and files name layers by FQN ("fc1.weight" for one of its tensors).
    rule: one `PerLayer` entry, an FQN or "re:<regex>" mapped to a config or None (dense).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prunekit._moved import moved_name
from prunekit.errors import ConfigError
from prunekit.storage.files import atomic_write_text, check_expanded_size, read_document

RECIPE_VERSION = 1
MAX_RECIPE_DEPTH = 64  # nesting levels `config_from_dict` follows; real recipes use fewer than 6
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]  # what torch.Generator.manual_seed accepts
_RECIPE_TYPES: dict[str, type[BaseModel]] = {}


def recipe_type(cls: type[BaseModel]) -> type[BaseModel]:
    """Class decorator: allow `cls` in recipes under its class name (the allow-list)."""
    if cls.__name__ in _RECIPE_TYPES and _RECIPE_TYPES[cls.__name__] is not cls:
        raise ConfigError(f"recipe type {cls.__name__!r} is registered twice")
    _RECIPE_TYPES[cls.__name__] = cls
    return cls


def _format_validation_error(owner: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        lines.append(f"{owner}.{field}: {e['msg']} (got {value!r})")
    return "; ".join(lines)


class FrozenConfig(BaseModel):
    """Base of all configs: frozen, unknown keys rejected, errors raised as `ConfigError`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ConfigError(_format_validation_error(type(self).__name__, err)) from None

    @model_validator(mode="before")
    @classmethod
    def _concrete(cls, data: Any) -> Any:
        # A field typed with the base (Recipe.prune) would turn a plain mapping into an empty
        # FrozenConfig that no method, schedule or recipe file understands.
        if cls is FrozenConfig:
            raise ValueError(f"needs a concrete config such as UnstructuredConfig(...) or a '_type' key, got {data!r}")
        return data

    def with_level(self, level: float) -> FrozenConfig:
        """A copy at another level (see the glossary); configs without a level raise `ConfigError`."""
        raise ConfigError(f"{type(self).__name__} has no sparsity or ratio a scan, allocation or search can vary")

    def as_layer_rule(self) -> FrozenConfig:
        """This config as the rule for one named layer or group: the rule's key already names what
        it prunes, so `exclude` is dropped, and nothing is ranked together with other rules."""
        return self


class MaskConfig(FrozenConfig):
    """Base of configs whose result is a mask on each weight (unstructured, N:M, block)."""

    # A language model's output head and any layer tied to an embedding are already left dense
    # (core/targets.protected_layers); a PerLayer rule naming one exactly prunes it.
    exclude: tuple[str, ...] = Field(default=(), description="FQNs or 're:<regex>' left dense")

    def with_sparsity(self, sparsity: float) -> MaskConfig:
        """Return a copy pruned to `sparsity` instead (what a schedule asks for at a step)."""
        raise ConfigError(f"{type(self).__name__} has no sparsity a schedule can ramp")

    @property
    def target_sparsity(self) -> float:
        """The final fraction of zeros this config asks for."""
        raise NotImplementedError

    def with_level(self, level: float) -> MaskConfig:
        """A mask config's level is its sparsity."""
        return self.with_sparsity(level)

    def as_layer_rule(self) -> MaskConfig:
        return self.model_copy(update={"exclude": ()})


@recipe_type
class PerLayer(FrozenConfig):
    """Different configs for different layers: the first matching rule wins.

    Keys are exact layer FQNs, "re:<regex>" patterns (full match on the FQN), or "_default"
    for layers no other key matches. A value of None leaves the matched layers dense. Every
    key except "_default" must match at least one prunable layer, so a typo fails loudly.

    Example:
        >>> PerLayer({"re:.*head.*": None, "_default": UnstructuredConfig(sparsity=0.5)})
        ... # doctest: +ELLIPSIS
        PerLayer(rules={...})
    """

    kind: ClassVar[str] = "per_layer"
    rules: dict[str, Any]

    def __init__(self, rules: dict[str, Any] | None = None, **data: Any) -> None:
        if rules is not None:
            data["rules"] = rules
        super().__init__(**data)

    @field_validator("rules")
    @classmethod
    def _valid_rules(cls, rules: dict[str, Any]) -> dict[str, Any]:
        for key, value in rules.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"rule key {key!r} must be a non-empty string")
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except (re.error, OverflowError, RecursionError) as err:  # huge repeats, deep nesting
                    raise ValueError(f"rule {key!r} is not a valid regex: {err}") from None
            if value is not None and not isinstance(value, FrozenConfig):
                raise ValueError(f"rule {key!r} must map to a config or None, not {value!r}")
            if isinstance(value, PerLayer):
                raise ValueError(f"rule {key!r}: PerLayer rules cannot nest")
        return rules

    def __hash__(self) -> int:
        return hash(tuple(self.rules.items()))


# ---------------------------------------------------------------------------------------------
# Recipes: configs as YAML/JSON documents tagged with `_type` and `_version`.


def config_to_dict(value: Any) -> Any:
    """Turn a config (possibly nested) into plain data tagged with `_type` and `_version`."""
    if isinstance(value, BaseModel):
        name = type(value).__name__
        if name not in _RECIPE_TYPES:
            raise ConfigError(f"{name} is not a recipe type; register it with @recipe_type")
        out: dict[str, Any] = {"_type": name, "_version": RECIPE_VERSION}
        for field in type(value).model_fields:
            out[field] = config_to_dict(getattr(value, field))
        return out
    if isinstance(value, dict):
        return {k: config_to_dict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [config_to_dict(v) for v in value]
    return value


def config_from_dict(data: Any, where: str = "recipe", _depth: int = 0) -> Any:
    """Rebuild configs from `config_to_dict` output; only allow-listed `_type`s are built."""
    if _depth > MAX_RECIPE_DEPTH:  # a hostile file must not reach Python's recursion limit
        raise ConfigError(f"{where}: nested deeper than {MAX_RECIPE_DEPTH} levels")
    if isinstance(data, dict) and "_type" in data:
        name = data["_type"]
        cls = _RECIPE_TYPES.get(name) if isinstance(name, str) else None
        if cls is None:
            known = ", ".join(sorted(_RECIPE_TYPES))
            raise ConfigError(f"{where}._type: unknown type {name!r}; allowed: {known}")
        version = data.get("_version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise ConfigError(f"{where}._version: {version!r} is not supported ({RECIPE_VERSION})")
        bad = [k for k in data if not isinstance(k, str)]
        if bad:  # YAML allows `1: x` or `null: x`; a field name is always a string
            raise ConfigError(f"{where}: field names are strings, got {bad[0]!r}")
        fields = {
            k: config_from_dict(v, f"{where}.{k}", _depth + 1) for k, v in data.items() if not k.startswith("_")
        }
        return cls(**fields)
    if isinstance(data, dict):
        return {k: config_from_dict(v, f"{where}.{k}", _depth + 1) for k, v in data.items()}
    if isinstance(data, list):
        return [config_from_dict(v, f"{where}[{i}]", _depth + 1) for i, v in enumerate(data)]
    return data


def save_recipe(config: FrozenConfig, path: str | Path) -> Path:
    """Write `config` as a YAML (.yaml/.yml) or JSON recipe, atomically."""
    import yaml

    path = Path(path)
    data = config_to_dict(config)
    if path.suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2)
    return atomic_write_text(path, text)


def read_config_file(path: str | Path, what: str) -> Any:
    """The plain data of a YAML (.yaml/.yml) or JSON config file, parsed safely and size-checked.

    Raises:
        ConfigError: the file is unreadable, not valid YAML/JSON, or expands beyond the limits
            (the message names `what` and the file).
    """
    import yaml

    path = Path(path)
    text = read_document(path, what, ConfigError)
    try:
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        check_expanded_size(data, f"{what} {str(path)!r}", ConfigError)
    except (yaml.YAMLError, json.JSONDecodeError, RecursionError) as err:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML/JSON: {err}") from None
    return data


def load_recipe(path: str | Path) -> Any:
    """Read a recipe written by `save_recipe` (safe YAML / JSON; allow-listed types only)."""
    path = Path(path)
    data = read_config_file(path, "recipe")
    if not isinstance(data, dict) or "_type" not in data:
        raise ConfigError(f"recipe {str(path)!r} has no top-level '_type' mapping")
    return config_from_dict(data, where=path.name)


def __getattr__(name: str) -> Any:  # UnstructuredConfig moved to prunekit.methods.unstructured (0.1 path, warns)
    return moved_name(__name__, name)
