"""Untrusted files: every loader refuses to run code hidden in a file and says what it expected.

Each payload below would create a marker file if it were unpickled (or YAML-constructed); each
loader in `LOADERS` is handed each payload, and the test asserts the marker never appears and
the error is a `PrunekitError` naming the file and the format the loader wanted. A sanity test
first proves each payload really fires when loaded unsafely, so a pass means something.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.deploy.checkpoint import read_checkpoint
from prunekit.errors import PrunekitError
from prunekit.storage import runstate

HAS_ONNX = importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxruntime") is not None
HAS_OPTUNA = importlib.util.find_spec("optuna") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


class _Touch:
    """Unpickling this calls pathlib.Path.touch(marker): proof that code ran."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[override]
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _pickle5(marker: pathlib.Path, path: pathlib.Path) -> None:
    path.write_bytes(pickle.dumps(_Touch(marker), protocol=5))


def _pickle0(marker: pathlib.Path, path: pathlib.Path) -> None:
    # Protocol 0 is ASCII text: it gets past any "is this binary?" check and into the text parsers.
    path.write_bytes(pickle.dumps(_Touch(marker), protocol=0))


def _torch_zip(marker: pathlib.Path, path: pathlib.Path) -> None:
    # The shape of a malicious .pt/.bin checkpoint: torch.save's zip archive holding a pickle.
    torch.save({"state_dict": _Touch(marker)}, path)


def _yaml_tag(marker: pathlib.Path, path: pathlib.Path) -> None:
    # PyYAML's unsafe loaders build arbitrary Python objects from these tags.
    path.write_text(f"_type: Recipe\nmodel: !!python/object/apply:os.mkdir [{str(marker)!r}]\n")


PAYLOADS: dict[str, Callable[[pathlib.Path, pathlib.Path], None]] = {
    "pickle-protocol-5": _pickle5,
    "pickle-protocol-0": _pickle0,
    "torch-save-zip": _torch_zip,
    "yaml-python-tag": _yaml_tag,
}


def _fire_unsafely(kind: str, path: pathlib.Path) -> None:
    """What an unsafe loader would do with the payload (only ever run in the sanity test)."""
    if kind == "torch-save-zip":
        torch.load(path, weights_only=False)
    elif kind == "yaml-python-tag":
        import yaml

        yaml.unsafe_load(path.read_text())
    else:
        pickle.loads(path.read_bytes())  # noqa: S301 - the point of the sanity check


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_payload_really_runs_code_when_loaded_unsafely(tmp_path, kind: str) -> None:
    marker, path = tmp_path / "marker", tmp_path / "payload"
    PAYLOADS[kind](marker, path)
    _fire_unsafely(kind, path)
    assert marker.exists()


# --------------------------------------------------------------------------------------------
# The loaders: every function in prunekit that reads a file a user may have been handed.


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _cli(*args: str) -> None:
    from typer.testing import CliRunner

    from prunekit.cli import app

    result = CliRunner().invoke(app, list(args))
    if result.exit_code != 2:  # 2 = a PrunekitError reported by the CLI; anything else is a crash
        raise AssertionError(f"prunekit {' '.join(args)} exited {result.exit_code}: {result.output}\n"
                             f"{result.exception!r}")
    raise PrunekitError(result.output)


def _report_cli(path: pathlib.Path) -> None:
    from tests.recipe_entry_points import build_model

    good = path.parent / "good.safetensors"
    pk.save(build_model(), good)
    _cli("report", "--model", "tests.recipe_entry_points:build_model", "--data", "tests.recipe_entry_points:loaders",
         "--baseline", str(path), "--pruned", str(good), "--out", str(path.parent / "report"))


def _check_onnx(path: pathlib.Path) -> None:
    from prunekit.deploy.onnx_check import check_onnx

    check_onnx(_mlp(), path, torch.randn(1, 8))


def _smollm2_cache(path: pathlib.Path) -> None:
    """A model cache folder with a config and a planted pytorch_model.bin (a pickle)."""
    from prunekit.zoo.llm import load_smollm2

    cache = path.parent / "cache"
    cache.mkdir()
    (cache / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
                                                   "num_attention_heads": 2, "num_hidden_layers": 1,
                                                   "vocab_size": 32}))
    path.rename(cache / "pytorch_model.bin")
    try:
        load_smollm2(cache)
    except PrunekitError as err:
        raise PrunekitError(f"{err} [{path.name}]") from None  # the planted file's name, for the assertion


def _open_storage(path: pathlib.Path) -> None:
    from prunekit.allocation.search import open_storage

    open_storage(f"sqlite:///{path}")


@dataclass(frozen=True)
class Loader:
    fn: Callable[[pathlib.Path], object]
    suffix: str
    format: str  # a word the error must use to say what the file should have been
    needs: bool = True


LOADERS: dict[str, Loader] = {
    "prunekit.load": Loader(lambda p: pk.load(p, _mlp()), ".safetensors", "safetensors"),
    "prunekit.load(build_fn)": Loader(lambda p: pk.load(p, _mlp), ".safetensors", "safetensors"),
    "export.read_checkpoint": Loader(lambda p: read_checkpoint(p), ".pt", "safetensors"),
    "ChannelPlan.load": Loader(lambda p: pk.ChannelPlan.load(p), ".json", "JSON"),
    "load_recipe(.yaml)": Loader(lambda p: pk.load_recipe(p), ".yaml", "YAML"),
    "load_recipe(.json)": Loader(lambda p: pk.load_recipe(p), ".json", "JSON"),
    "SensitivityTable.load": Loader(lambda p: pk.SensitivityTable.load(p), ".json", "JSON"),
    "LatencyTable.load": Loader(lambda p: pk.LatencyTable.load(p), ".json", "JSON"),
    "resume.load_state": Loader(lambda p: runstate.load_state(p, "sensitivity"), ".safetensors", "safetensors", True),
    "llm.load_smollm2(cache)": Loader(_smollm2_cache, ".bin", "safetensors", HAS_TRANSFORMERS),
    "onnx_check.check_onnx": Loader(_check_onnx, ".onnx", "ONNX", HAS_ONNX),
    "search.open_storage(sqlite)": Loader(_open_storage, ".db", "storage", HAS_OPTUNA),
    "cli inspect": Loader(lambda p: _cli("inspect", str(p)), ".safetensors", "safetensors"),
    "cli report": Loader(_report_cli, ".safetensors", "safetensors"),
    "cli prune --recipe": Loader(lambda p: _cli("prune", "--recipe", str(p), "--out", str(p.parent / "o")),
                                 ".yaml", "YAML"),
    "cli sensitivity --recipe": Loader(lambda p: _cli("sensitivity", "--recipe", str(p), "--out", str(p.parent / "o")),
                                       ".yaml", "YAML"),
    "cli search --recipe": Loader(lambda p: _cli("search", "--recipe", str(p), "--out", str(p.parent / "o")),
                                  ".yaml", "YAML", HAS_OPTUNA),
    "cli export": Loader(lambda p: _cli("export", str(p), "--out", str(p.parent / "m.onnx")), ".safetensors",
                         "safetensors", HAS_ONNX),
}


@pytest.mark.parametrize("kind", list(PAYLOADS))
@pytest.mark.parametrize("name", list(LOADERS))
def test_loader_refuses_code_in_a_file(tmp_path, name: str, kind: str) -> None:
    loader = LOADERS[name]
    if not loader.needs:
        pytest.skip(f"{name} needs an optional extra that is not installed")
    marker, path = tmp_path / "marker", tmp_path / f"evil{loader.suffix}"
    PAYLOADS[kind](marker, path)
    with pytest.raises(PrunekitError) as info:
        loader.fn(path)
    assert not marker.exists(), f"{name} ran code from a {kind} file"
    message = str(info.value)
    assert path.name in message or str(path) in message, message
    assert loader.format.lower() in message.lower() or "unpickle" in message, message


# --------------------------------------------------------------------------------------------
# Safetensors whose header lies about the data.


def _forged_safetensors(path: pathlib.Path, claimed_end: int, held: int) -> None:
    """8-byte header length, a JSON header whose one tensor ends at `claimed_end`, `held` data bytes."""
    header = {"w": {"dtype": "F32", "shape": [claimed_end // 4], "data_offsets": [0, claimed_end]}}
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * held)


def test_header_claiming_more_data_than_the_file_holds_is_refused_before_reading(tmp_path, monkeypatch) -> None:
    import safetensors

    path = tmp_path / "forged.safetensors"
    _forged_safetensors(path, claimed_end=4 * 2**30, held=64)  # claims 4 GiB, holds 64 bytes

    def must_not_run(*_a, **_k):
        raise AssertionError("safe_open was reached: the tensor data would have been read")

    monkeypatch.setattr(safetensors, "safe_open", must_not_run)
    with pytest.raises(pk.CheckpointError, match=r"tensor 'w' claims bytes \[0, 4,294,967,296\).* holds 64 bytes"):
        read_checkpoint(path)


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda p: p.write_bytes(struct.pack("<Q", 2**62) + b"{}"), id="header-length-beyond-file"),
        pytest.param(lambda p: p.write_bytes(b"\x01\x00"), id="shorter-than-8-bytes"),
        pytest.param(lambda p: _forged_safetensors(p, claimed_end=128, held=64), id="tensor-past-end"),
        pytest.param(lambda p: p.write_bytes(struct.pack("<Q", 4) + b"[1]\n"), id="header-not-an-object"),
    ],
)
def test_forged_safetensors_layouts_are_refused(tmp_path, forge) -> None:
    path = tmp_path / "forged.safetensors"
    forge(path)
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pk.CheckpointError, match="forged.safetensors"):
        pk.load(path, model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_sparse_header_promising_more_than_the_file_holds_is_refused(tmp_path) -> None:
    """The prunekit header's nnz/shape is schema-checked, then the inflate is bounded by it."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = _mlp()
    pk.prune(model, pk.UnstructuredConfig(sparsity=0.9, scope="layer"))
    path = tmp_path / "m.safetensors"
    pk.save(pk.finalize(model), path)
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["prunekit"])
    key = next(iter(meta["encoded"]))
    meta["encoded"][key]["shape"] = [4096, 4096]  # 16M weights from a few hundred bytes
    save_file(load_file(path), path, metadata={"prunekit": json.dumps(meta)})
    with pytest.raises(pk.CheckpointError, match=key.replace(".", r"\.")):
        read_checkpoint(path)


# --------------------------------------------------------------------------------------------
# Shapes and dtypes are checked against the model before anything is copied.


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5)), id="shape"),
        pytest.param(lambda: _mlp().double(), id="dtype"),
        pytest.param(lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Linear(4, 2)),
                     id="missing-key"),
    ],
)
def test_mismatched_checkpoint_leaves_model_unchanged(tmp_path, other) -> None:
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    pk.save(_mlp(), path)
    torch.manual_seed(1)
    model = other()
    pk.prune(model, pk.UnstructuredConfig(sparsity=0.5))  # masks must survive a refused load, too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pk.CheckpointError, match=r"tensor '[02]\.(weight|bias)' is|missing \['3\.|does not fit"):
        pk.load(path, model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_first_tensor_fits_second_does_not_nothing_copied(tmp_path) -> None:
    """The check runs over every tensor before the first copy (not copy-as-you-go)."""
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    pk.save(_mlp(), path)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model[2].weight.data = model[2].weight.data.half()  # '0.*' fit, '2.weight' does not
    before = model[0].weight.detach().clone()
    with pytest.raises(pk.CheckpointError, match=r"'2\.weight'.*float16"):
        pk.load(path, model)
    assert torch.equal(model[0].weight, before)


# --------------------------------------------------------------------------------------------
# JSON documents are schema-checked: the error names the field.


def _plan_dict() -> dict:
    # Written by hand (no tracing: keeps the suite fast); the good document loads, see below.
    from prunekit.config import config_to_dict

    return {"format": "prunekit.channel_plan", "version": 1, "config": config_to_dict(pk.ChannelConfig(ratio=0.5)),
            "tensors": {"0.weight": {"shape": [16, 8], "keep": {"0": [0, 2, 5]}},
                        "0.bias": {"shape": [16], "keep": {"0": [0, 2, 5]}},
                        "2.weight": {"shape": [4, 16], "keep": {"1": [0, 2, 5]}}},
            "groups": [{"name": "0", "units": 16, "removed": 13, "width": 1}], "stats": {}}


def _table_dict() -> dict:
    table = pk.sensitivity(_mlp(), pk.UnstructuredConfig(sparsity=0.5), lambda m: 1.0, levels=[0.5])
    return json.loads(json.dumps(table.to_dict()))


def _latency_dict() -> dict:
    return {"format": "prunekit.latency_table", "version": 1, "units": ["0"], "levels": [0.5],
            "dense_ms": {"0": 1.0}, "latency_ms": {"0": [0.5]}, "model_ms": 2.0}


def _set(doc: dict, path: tuple, value: object) -> dict:
    target = doc
    for key in path[:-1]:
        target = target[key] if not isinstance(target, list) else target[int(key)]
    target[path[-1]] = value
    return doc


SCHEMA_CASES = {
    "plan: keep index beyond shape": (".json", lambda: pk.ChannelPlan.load, _plan_dict,
                                      lambda d: _set(d, ("tensors", next(iter(d["tensors"])), "keep", "0"), [10**6]),
                                      "tensors."),
    "plan: shape not a list": (".json", lambda: pk.ChannelPlan.load, _plan_dict,
                               lambda d: _set(d, ("tensors", next(iter(d["tensors"])), "shape"), "big"), "shape"),
    "plan: tensors missing": (".json", lambda: pk.ChannelPlan.load, _plan_dict,
                              lambda d: {k: v for k, v in d.items() if k != "tensors"}, "tensors"),
    "sensitivity: levels of strings": (".json", lambda: pk.SensitivityTable.load, _table_dict,
                                       lambda d: _set(d, ("levels",), ["half"]), "levels"),
    "sensitivity: params not ints": (".json", lambda: pk.SensitivityTable.load, _table_dict,
                                     lambda d: _set(d, ("params",), {"0": "many"}), "params"),
    "sensitivity: baseline missing": (".json", lambda: pk.SensitivityTable.load, _table_dict,
                                      lambda d: {k: v for k, v in d.items() if k != "baseline"}, "baseline"),
    "latency: unknown key": (".json", lambda: pk.LatencyTable.load, _latency_dict,
                             lambda d: _set(d, ("exec",), "rm -rf"), "exec"),
    "latency: model_ms a list": (".json", lambda: pk.LatencyTable.load, _latency_dict,
                                 lambda d: _set(d, ("model_ms",), [1, 2]), "model_ms"),
}


@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_malformed_json_documents_name_the_field(tmp_path, case: str) -> None:
    suffix, loader, good, corrupt, field = SCHEMA_CASES[case]
    path = tmp_path / f"doc{suffix}"
    path.write_text(json.dumps(good()))
    loader()(path)  # the uncorrupted document loads: the failure below is the corruption's
    path.write_text(json.dumps(corrupt(good())))
    with pytest.raises(PrunekitError, match=field.replace(".", r"\.")):
        loader()(path)


def test_checkpoint_header_schema_names_the_field(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = _mlp()
    pk.prune(model, pk.UnstructuredConfig(sparsity=0.9, scope="layer"))
    path = tmp_path / "m.safetensors"
    pk.save(pk.finalize(model), path)
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["prunekit"])
    key = next(iter(meta["encoded"]))
    meta["encoded"][key]["dtype"] = "object"
    save_file(load_file(path), path, metadata={"prunekit": json.dumps(meta)})
    with pytest.raises(pk.CheckpointError, match=rf"field 'encoded\.{key.replace('.', '[.]')}\.dtype'"):
        read_checkpoint(path)


def test_oversized_document_is_refused_without_parsing(tmp_path, monkeypatch) -> None:
    from prunekit.storage import files

    monkeypatch.setattr(files, "MAX_DOCUMENT_BYTES", 1024)
    path = tmp_path / "recipe.yaml"
    path.write_text("_type: UnstructuredConfig\n" + "#" * 2048)
    with pytest.raises(pk.ConfigError, match="recipe.yaml.*2,0"):
        pk.load_recipe(path)


def test_structured_checkpoint_that_does_not_fit_leaves_the_given_model_unchanged(tmp_path) -> None:
    """The saved plan is replayed (shapes change) only after the replayed shapes were checked."""
    import copy

    model = _mlp()
    plan = pk.plan(model, pk.ChannelConfig(ratio=0.5), example_inputs=torch.randn(2, 8))
    path = tmp_path / "small.safetensors"
    pk.save(plan.apply(copy.deepcopy(model)), path, plan=plan)
    assert pk.load(path, _mlp)[0].out_features == 8  # the checkpoint itself is fine
    target = _mlp().double()  # the right architecture in the wrong dtype
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(pk.CheckpointError, match="float64"):
        pk.load(path, target)
    assert target[0].out_features == 16 and target[2].in_features == 16
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_latency_table_schema_accepts_every_field_a_table_saves(tmp_path) -> None:
    """The schema forbids unknown keys, so it must list every dataclass field: a round trip."""
    table = pk.LatencyTable(units=["0"], levels=[0.5], dense_ms={"0": 1.0}, latency_ms={"0": [0.5]}, model_ms=2.0,
                            reference_ms={"0": 2.0})
    assert pk.LatencyTable.load(table.save(tmp_path / "lat.json")) == table


def _laughs(levels: int) -> str:
    """A 'billion laughs' YAML: each level lists the previous one 9 times (9**levels values)."""
    lines = ["_type: UnstructuredConfig", 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "match"),
    [(_laughs(9), "expands to more than"), ("_type: UnstructuredConfig\nexclude: &a [*a]\n", "refers to itself")],
    ids=["billion-laughs", "self-alias"],
)
def test_yaml_alias_bombs_are_refused_quickly(tmp_path, text: str, match: str) -> None:
    import time

    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(pk.ConfigError, match=match):
        pk.load_recipe(path)
    assert time.perf_counter() - start < 5.0  # walking the expansion would take hours


def test_yaml_aliases_within_reason_still_load(tmp_path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("_type: PerLayer\nrules:\n  a: &u {_type: UnstructuredConfig, sparsity: 0.5}\n  b: *u\n")
    rules = pk.load_recipe(path)
    assert rules.rules["a"] == rules.rules["b"] == pk.UnstructuredConfig(sparsity=0.5)
