"""Configs reject bad values with the field's name, and recipes survive a round trip."""

from __future__ import annotations

import pytest

import prunekit as pk
from prunekit.config import config_from_dict, config_to_dict


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sparsity": 0.5, "criterion": "l7"}, "criterion"),
        ({"sparsity": 0.5, "scope": "everywhere"}, "scope"),
        ({"sparsity": 0.5, "sparsty": 0.2}, "sparsty"),
        ({}, "sparsity"),
    ],
)
def test_unstructured_config_rejects_bad_fields(kwargs: dict, needle: str) -> None:
    with pytest.raises(pk.ConfigError, match=needle) as info:
        pk.UnstructuredConfig(**kwargs)
    assert "UnstructuredConfig" in str(info.value)


def test_configs_are_frozen_values() -> None:
    a, b = pk.UnstructuredConfig(sparsity=0.5), pk.UnstructuredConfig(sparsity=0.5)
    assert a == b and hash(a) == hash(b)
    with pytest.raises(ValueError, match="frozen"):
        a.sparsity = 0.7  # type: ignore[misc]


def test_per_layer_rejects_bad_rules() -> None:
    with pytest.raises(pk.ConfigError, match="re:\\("):
        pk.PerLayer({"re:(": None})
    with pytest.raises(pk.ConfigError, match="'fc'"):
        pk.PerLayer({"fc": 0.5})


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_recipe_round_trip(tmp_path, suffix: str) -> None:
    cfg = pk.PerLayer(
        {"re:.*head.*": None, "fc1": pk.UnstructuredConfig(sparsity=0.3, scope="layer"),
         "_default": pk.UnstructuredConfig(sparsity=0.8, exclude=("re:x.*",))}
    )
    path = pk.save_recipe(cfg, tmp_path / f"recipe{suffix}")
    assert pk.load_recipe(path) == cfg


def test_schedules_round_trip_in_recipes() -> None:
    for schedule in (pk.Cubic(end_step=100, every=10), pk.Polynomial(end_step=5, power=2), pk.Iterative(steps=(1, 5))):
        assert config_from_dict(config_to_dict(schedule)) == schedule


def test_recipe_refuses_unknown_type(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("_type: os.system\n_version: 1\n")
    with pytest.raises(pk.ConfigError, match="unknown type 'os.system'"):
        pk.load_recipe(path)


def test_recipe_yaml_tags_are_not_executed(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "r.yaml"
    path.write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(pk.ConfigError, match="not valid YAML"):
        pk.load_recipe(path)
    assert not marker.exists()


def test_recipe_misspelt_key_names_field(tmp_path) -> None:
    path = tmp_path / "r.json"
    path.write_text('{"_type": "UnstructuredConfig", "_version": 1, "sparsity": 0.5, "scoep": "layer"}')
    with pytest.raises(pk.ConfigError, match="scoep"):
        pk.load_recipe(path)
