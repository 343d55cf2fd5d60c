"""Regression tests for the crashes fuzzing found (issue 10, item 4): each input once escaped as a non-prunekit
exception (or was accepted and then broke), and must now end in a `PrunekitError` that names what is wrong.

Each comment says what the input did before and what found it: a Hypothesis property of
`test_fuzz_configs.py` / `test_fuzz_models.py`, or a probe written while building their strategies.
The atheris runs of `benchmarks/fuzz_parsers.py` found no crash of their own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.config import MAX_RECIPE_DEPTH, config_from_dict, config_to_dict


def _write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def test_recipe_prune_mapping_is_not_a_bare_base_config() -> None:
    # Was: accepted as an empty `FrozenConfig()`, which no method runs and `save_recipe` refused.
    # Found by: test_constructor_gives_config_or_config_error[Recipe] (its round trip failed).
    with pytest.raises(pk.ConfigError, match="Recipe.prune.*concrete config"):
        pk.Recipe(model="a:b", prune={})
    with pytest.raises(pk.ConfigError, match="SearchRecipe.prune"):
        pk.SearchRecipe(model="a:b", data="c:d", prune={})


def test_recipe_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    # Was: UnicodeDecodeError from reading the file as text. Found by: test_random_bytes_give_config_or_config_error.
    with pytest.raises(pk.ConfigError, match="UTF-8"):
        pk.load_recipe(_write(tmp_path, "r.yaml", b"\x80"))


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize(("head", "tail"), [("[", "]"), ('{"a": ', "}")])
def test_deeply_nested_recipe_text_is_a_config_error(tmp_path: Path, suffix: str, head: str, tail: str) -> None:
    # Was: RecursionError from the YAML/JSON parser. Found by: test_deep_nesting_gives_config_or_config_error.
    text = '{"_type": "Recipe", "model": "a:b", "prune": ' + head * 1500 + "null" + tail * 1500 + "}"
    with pytest.raises(pk.ConfigError, match="not valid YAML/JSON"):
        pk.load_recipe(_write(tmp_path, f"r{suffix}", text))


def test_deeply_nested_configs_are_a_config_error(tmp_path: Path) -> None:
    # Was: RecursionError in `config_from_dict` (400 nested PerLayer rules parse fine as JSON).
    # Found by: a probe of test_deep_nesting's shapes.
    nested = None
    for _ in range(400):
        nested = {"_type": "PerLayer", "rules": {"fc": nested}}
    with pytest.raises(pk.ConfigError, match=f"nested deeper than {MAX_RECIPE_DEPTH}"):
        config_from_dict(nested)
    text = '{"_type": "PerLayer", "rules": {"fc": ' * 400 + "null" + "}}" * 400
    with pytest.raises(pk.ConfigError, match="r.json"):  # through a file: whichever check trips first
        pk.load_recipe(_write(tmp_path, "r.json", text))
    shallow = {"_type": "Recipe", "model": "a:b", "prune": [[[[None]]]]}
    with pytest.raises(pk.ConfigError, match="Recipe.prune"):  # a few levels still reach the field check
        config_from_dict(shallow)


@pytest.mark.parametrize("key", [1, None, 0.5, True])
def test_non_string_field_names_are_a_config_error(tmp_path: Path, key: object) -> None:
    # Was: AttributeError ('int' object has no attribute 'startswith') or TypeError from `cls(**fields)`.
    # Found by: a probe (YAML keys that are not strings), before test_config_from_dict ran.
    with pytest.raises(pk.ConfigError, match="field names are strings"):
        config_from_dict({"_type": "UnstructuredConfig", "sparsity": 0.5, key: 2})
    with pytest.raises(pk.ConfigError, match="field names are strings"):
        pk.load_recipe(_write(tmp_path, "r.yaml", "_type: UnstructuredConfig\nsparsity: 0.5\n1: 2\n"))


@pytest.mark.parametrize("pattern", ["re:a{4294967296}", "re:" + "(" * 1000 + ")" * 1000])
def test_per_layer_regex_that_breaks_the_compiler_is_a_config_error(pattern: str) -> None:
    # Was: OverflowError (repeat count) and RecursionError (nesting) out of `re.compile`. Found by: a probe.
    with pytest.raises(pk.ConfigError, match="not a valid regex"):
        pk.PerLayer({pattern: None, "_default": pk.UnstructuredConfig(sparsity=0.5)})


@pytest.mark.parametrize("pattern", ["re:(", "re:a{4294967296}", "re:" + "(" * 1000 + ")" * 1000])
@pytest.mark.parametrize("config", [pk.UnstructuredConfig(sparsity=0.5), pk.NMConfig(n=2, m=4),
                                    pk.ChannelConfig(ratio=0.5)], ids=type)
def test_exclude_regex_that_does_not_compile_is_a_config_error(pattern: str, config: pk.PerLayer) -> None:
    # Was: re.error / OverflowError / RecursionError out of `prune`, from `targets.matches`. Found by: a probe.
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pk.ConfigError, match="not a valid regex"):
        pk.prune(model, config.model_copy(update={"exclude": (pattern,)}), torch.randn(2, 8))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 2**70])
def test_seed_outside_torch_range_is_refused_by_the_config(seed: int) -> None:
    # Was: accepted, then ValueError ("Overflow when unpacking long long") or RuntimeError from
    # `torch.Generator().manual_seed` in the middle of `prune`. Found by: test_channels_on_random_architectures.
    for make in (lambda: pk.UnstructuredConfig(sparsity=0.5, seed=seed), lambda: pk.ChannelConfig(ratio=0.5, seed=seed),
                 lambda: pk.Recipe(model="a:b", prune=pk.UnstructuredConfig(sparsity=0.5), seed=seed)):
        with pytest.raises(pk.ConfigError, match="seed"):
            make()
    edge = pk.UnstructuredConfig(sparsity=0.5, seed=2**64 - 1)  # the largest seed torch takes still prunes
    pk.prune(nn.Sequential(nn.Linear(8, 8)), edge)
    assert config_from_dict(config_to_dict(edge)) == edge


@pytest.mark.parametrize("meta", ["[" * 100_000 + "]" * 100_000, '{"a": ' * 5000 + "null" + "}" * 5000])
def test_checkpoint_header_nested_too_deep_is_a_checkpoint_error(tmp_path: Path, meta: str) -> None:
    # Was: RecursionError out of `json.loads` of the prunekit header inside a valid safetensors file.
    # Found by: a probe of the checkpoint parser (atheris inputs stay too short to nest this deep).
    from safetensors.torch import save_file

    path = tmp_path / "deep.safetensors"
    save_file({"0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2)}, str(path), metadata={"prunekit": meta})
    with pytest.raises(pk.CheckpointError, match="header is not valid JSON"):
        pk.load(path, nn.Sequential(nn.Linear(2, 2)))


def test_safetensors_header_nested_too_deep_is_a_checkpoint_error(tmp_path: Path) -> None:
    # Was: RecursionError out of `json.loads` of the safetensors header itself (under the size limit).
    # Found by: a probe of the checkpoint parser.
    header = b"[" * 100_000 + b"]" * 100_000
    path = _write(tmp_path, "deep.safetensors", len(header).to_bytes(8, "little") + header)
    with pytest.raises(pk.CheckpointError, match="header is not JSON"):
        pk.load(path, nn.Linear(2, 2))


@pytest.mark.parametrize("load", [pk.ChannelPlan.load, pk.SensitivityTable.load, pk.LatencyTable.load],
                         ids=["ChannelPlan", "SensitivityTable", "LatencyTable"])
def test_json_documents_nested_too_deep_are_prunekit_errors(tmp_path: Path, load: object) -> None:
    # Was: RecursionError out of `json.loads` in each document loader. Found by: a probe.
    path = _write(tmp_path, "doc.json", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(pk.PrunekitError, match="not JSON"):
        load(path)  # type: ignore[operator]


def test_run_checkpoint_header_nested_too_deep_is_a_checkpoint_error(tmp_path: Path) -> None:
    # Was: RecursionError out of `json.loads` of a resume checkpoint's header. Found by: a probe.
    from safetensors.torch import save_file

    from prunekit.storage.runstate import _META_KEY, load_state

    path = tmp_path / "run.safetensors"
    save_file({"a": torch.zeros(2)}, str(path), metadata={_META_KEY: "[" * 100_000 + "]" * 100_000})
    with pytest.raises(pk.CheckpointError, match="cannot be read"):
        load_state(path, "gradual")
