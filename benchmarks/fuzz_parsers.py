"""Coverage-guided fuzzing (atheris / libFuzzer) of the recipe and checkpoint parsers, for a bounded time.

Targets:
  recipe      bytes -> a .yaml/.json file (the first byte picks) -> `prunekit.load_recipe`. Half the
              mutations edit the parsed document (replace, drop or add a value) and dump it
              again, so inputs reach the config validators; libFuzzer's byte mutations splice
              in a dictionary of type names, field names and YAML syntax.
  checkpoint  mutated bytes of real small checkpoints (a masked MLP stored bitmask-encoded, a
              structurally pruned MLP with its channel plan, an INT8 one) -> `read_checkpoint`
              and `prunekit.load` into a freshly built model. A custom mutator keeps the
              safetensors framing (8-byte length, JSON header, data) and mutates either the
              header, the prunekit metadata inside it, or the tensor bytes, so most inputs get
              past the framing and into prunekit's own decoding.

A crash is any exception that is not a `PrunekitError` (those are the parsers' documented
refusals). Crashes do not stop the run: each is recorded by signature (type, innermost
prunekit frame) with its first input saved under `--out/crashes/`, and the run ends after
`--seconds` with executions, refusals and crashes printed and written to `--out/<target>.json`.
Coverage covers prunekit and PyYAML (instrumented on import); torch, json and safetensors
are native code.

Run:  python benchmarks/fuzz_parsers.py --target recipe --seconds 180
      python benchmarks/fuzz_parsers.py --target checkpoint --seconds 180
(pip extra `fuzz`: atheris). A crash input replays with `--replay FILE`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["prunekit", "yaml"]):
    import yaml

    import prunekit as pk
    from prunekit.config import config_to_dict
    from prunekit.deploy.checkpoint import read_checkpoint

import torch  # noqa: E402  (after the instrumented imports: torch itself is not instrumented)
from torch import nn  # noqa: E402

_QUOTED = r"'[^']*'|\d+"  # refusal messages grouped without their paths and numbers
SCRATCH = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


class Run:
    """Counters and crash records of one fuzzing run; reports when the time is up."""

    def __init__(self, target: str, seconds: float, out: Path) -> None:
        self.target, self.seconds, self.out = target, seconds, out
        self.start = time.monotonic()
        self.executions = 0
        self.refusals: Counter[str] = Counter()
        self.crashes: dict[str, dict[str, Any]] = {}
        self.accepted = 0

    def record(self, data: bytes, err: BaseException) -> None:
        frames = [f for f in traceback.extract_tb(err.__traceback__) if "prunekit" in f.filename]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "outside prunekit"
        signature = f"{type(err).__name__} at {where}"
        entry = self.crashes.setdefault(signature, {"count": 0, "message": str(err)[:300]})
        entry["count"] += 1
        if entry["count"] == 1:
            crash_dir = self.out / "crashes"
            crash_dir.mkdir(parents=True, exist_ok=True)
            name = f"{self.target}-{hashlib.sha1(data).hexdigest()[:12]}.bin"
            (crash_dir / name).write_bytes(data)
            entry["input"] = str(crash_dir / name)
            print(f"CRASH {signature}: {entry['message'][:200]} -> {entry['input']}", flush=True)

    def tick(self) -> None:
        self.executions += 1
        if time.monotonic() - self.start >= self.seconds:
            self.finish()

    def finish(self) -> None:
        elapsed = time.monotonic() - self.start
        report = {"target": self.target, "seconds": round(elapsed, 1), "executions": self.executions,
                  "executions_per_s": round(self.executions / max(elapsed, 1e-9), 1), "accepted": self.accepted,
                  "refusals": dict(self.refusals.most_common(25)), "crashes": self.crashes}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{self.target}.json").write_text(json.dumps(report, indent=2))
        print(json.dumps({k: v for k, v in report.items() if k != "refusals"}, indent=2))
        print(f"{self.target}: {self.executions} executions in {elapsed:.0f} s, {len(self.crashes)} crash signatures")
        sys.stdout.flush()
        os._exit(0)  # libFuzzer's loop never returns; leave without its exit path


RUN: Run | None = None


def _guarded(data: bytes, fn: Any) -> None:
    assert RUN is not None
    try:
        fn(data)
        RUN.accepted += 1
    except pk.PrunekitError as err:
        RUN.refusals[f"{type(err).__name__}: {re.sub(_QUOTED, '_', str(err))[:60]}"] += 1
        if not str(err).strip():
            RUN.record(data, AssertionError(f"{type(err).__name__} without a message"))
    except Exception as err:  # everything else is a finding
        RUN.record(data, err)
    RUN.tick()


# --------------------------------------------------------------------------------------------
# Recipe parser.


def recipe_seeds() -> list[bytes]:
    configs = [
        pk.UnstructuredConfig(sparsity=0.9, exclude=("re:.*head",)),
        pk.PerLayer({"fc": None, "re:conv.*": pk.NMConfig(n=2, m=4), "_default": pk.UnstructuredConfig(sparsity=0.5)}),
        pk.Recipe(model="pkg.models:build", data="pkg.data:loaders", prune=pk.UnstructuredConfig(sparsity=0.9),
                  schedule=pk.Cubic(end_step=2000, every=100), finetune=pk.FinetuneConfig(epochs=3)),
        pk.SearchRecipe(model="a.b:c", data="a.b:d", prune=pk.UnstructuredConfig(sparsity=0.9)),
        pk.ChannelConfig(ratio=0.3, round_to=8, exclude=("fc",)),
        pk.Iterative(steps=(1, 5, 9)),
        pk.DynamicInt8Config(exclude=("head",)),
    ]
    out = []
    for c in configs:
        data = config_to_dict(c)
        out.append(b"y" + yaml.safe_dump(data, sort_keys=False).encode())
        out.append(b"j" + json.dumps(data).encode())
    return out


def recipe_dictionary() -> list[str]:
    """Tokens libFuzzer splices into inputs: type and field names, YAML syntax, edge values."""
    from prunekit.config import _RECIPE_TYPES

    words = set(_RECIPE_TYPES) | {f for cls in _RECIPE_TYPES.values() for f in cls.model_fields}
    words |= {"_type", "_version", "_default", "re:", "null", "true", ".inf", ".nan", "1e400", "-1", "0.5",
              "!!python/object:", "&a", "*a", "<<:", "---", "? ", "- ", ": ", "{", "}", "[", "]", "'", '"'}
    return sorted(words)


def recipe_target(data: bytes) -> None:
    suffix = ".json" if data[:1] == b"j" else ".yaml"
    path = SCRATCH / f"prunekit-fuzz-{os.getpid()}{suffix}"
    path.write_bytes(data[1:])
    pk.load_recipe(path)


_EDGE_VALUES: list[Any] = [None, True, 0, -1, 1, 2**64, 0.5, 1.0, -0.0, float("inf"), "", "re:(", "l1", [], {}]


def _edit_tree(node: Any, rng: random.Random, depth: int = 0) -> Any:
    """One structural edit somewhere in parsed recipe data: replace, drop or add a value."""
    if isinstance(node, dict) and node and (depth == 0 or rng.random() < 0.7):  # keep a top-level mapping
        key = rng.choice(list(node))
        choice = rng.random()
        if choice < 0.5:
            node[key] = _edit_tree(node[key], rng, depth + 1)
        elif choice < 0.7:
            del node[key]
        else:
            node[f"{key}{rng.choice(['', '_', 'x'])}"] = rng.choice(_EDGE_VALUES)
        return node
    if isinstance(node, list) and node and rng.random() < 0.7:
        i = rng.randrange(len(node))
        node[i] = _edit_tree(node[i], rng, depth + 1)
        return node
    return rng.choice(_EDGE_VALUES + [node, [node], {"_type": node}])


def recipe_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    """Half the time a structural edit of a parsable recipe, re-dumped; otherwise libFuzzer's bytes."""
    rng = random.Random(seed)
    if rng.random() < 0.5 and data[:1] in (b"y", b"j"):
        try:
            tree = yaml.safe_load(data[1:].decode()) if data[:1] == b"y" else json.loads(data[1:])
            tree = _edit_tree(tree, rng)
            text = yaml.safe_dump(tree, sort_keys=False) if data[:1] == b"y" else json.dumps(tree)
            return (data[:1] + text.encode())[:max_size]
        except (ValueError, yaml.YAMLError, RecursionError):  # not parsable (yet): mutate the bytes
            pass
    return atheris.Mutate(data, max_size)


# --------------------------------------------------------------------------------------------
# Checkpoint parser.


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


_BUILDERS = {"masked": _mlp, "plan": _mlp, "int8": _mlp, "dense": _mlp}


def checkpoint_seeds() -> list[bytes]:
    tmp = Path(tempfile.mkdtemp())
    out = []
    masked = pk.prune(_mlp(), pk.UnstructuredConfig(sparsity=0.7))
    pk.save(masked, tmp / "masked.safetensors")
    dense = _mlp()
    plan = pk.plan(dense, pk.ChannelConfig(ratio=0.5, exclude=["4"]), torch.randn(2, 8))
    pk.save(plan.apply(_mlp()), tmp / "plan.safetensors", plan=plan)
    pk.save(pk.quantize(pk.finalize(masked), pk.DynamicInt8Config()), tmp / "int8.safetensors")
    pk.save(_mlp(), tmp / "dense.safetensors")
    for name in ("masked", "plan", "int8", "dense"):
        out.append(bytes([list(_BUILDERS).index(name)]) + (tmp / f"{name}.safetensors").read_bytes())
    return out


def checkpoint_target(data: bytes) -> None:
    path = SCRATCH / f"prunekit-fuzz-{os.getpid()}.safetensors"
    path.write_bytes(data[1:])
    read_checkpoint(path)
    kind = list(_BUILDERS)[data[0] % len(_BUILDERS)] if data else "dense"
    if kind == "int8":  # the quantized layout needs an INT8 model to load into
        pk.load(path, pk.quantize(pk.finalize(pk.prune(_mlp(), pk.UnstructuredConfig(sparsity=0.7))),
                                  pk.DynamicInt8Config()))
    elif kind == "masked":
        pk.load(path, pk.prune(_mlp(), pk.UnstructuredConfig(sparsity=0.7)))
    else:
        pk.load(path, _BUILDERS[kind])


def checkpoint_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    """Mutate inside the safetensors framing most of the time (see the module docstring)."""
    rng = random.Random(seed)
    tag, body = data[:1] or b"\x00", data[1:]
    if len(body) < 8 or rng.random() < 0.1:
        return atheris.Mutate(data, max_size)
    n = int.from_bytes(body[:8], "little")
    if n > len(body) - 8:
        return atheris.Mutate(data, max_size)
    header, tensors = body[8:8 + n], body[8 + n:]
    choice = rng.random()
    if choice < 0.4:
        try:  # the prunekit metadata (a JSON string inside the JSON header)
            doc = json.loads(header)
            meta = doc.get("__metadata__", {}).get("prunekit", "")
            mutated = atheris.Mutate(meta.encode(), len(meta) * 2 + 64).decode("utf-8", "replace")
            doc.setdefault("__metadata__", {})["prunekit"] = mutated
            header = json.dumps(doc).encode()
        except (ValueError, AttributeError):
            header = atheris.Mutate(header, len(header) * 2 + 64)
    elif choice < 0.7:
        header = atheris.Mutate(header, len(header) * 2 + 64)
    else:
        tensors = atheris.Mutate(tensors, len(tensors) * 2 + 64)
    if rng.random() < 0.05:
        tag = bytes([rng.randrange(256)])
    return (tag + len(header).to_bytes(8, "little") + header + tensors)[:max(max_size, 1)]


# --------------------------------------------------------------------------------------------


TARGETS = {"recipe": (recipe_seeds, recipe_target, recipe_mutator),
           "checkpoint": (checkpoint_seeds, checkpoint_target, checkpoint_mutator)}


def main() -> None:
    global RUN
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=sorted(TARGETS), required=True)
    parser.add_argument("--seconds", type=float, default=60.0, help="stop after this long (the run is bounded)")
    parser.add_argument("--out", type=Path, default=Path("out/fuzz"), help="report JSON and crash inputs")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer seed (0 picks one at random)")
    parser.add_argument("--replay", type=Path, help="run one saved input and show its traceback")
    args, libfuzzer_args = parser.parse_known_args()
    if args.target == "recipe" and not any(a.startswith("-dict=") for a in libfuzzer_args):
        words = Path(tempfile.mkdtemp()) / "recipe.dict"
        words.write_text("".join(f"{json.dumps(w)}\n" for w in recipe_dictionary()))
        libfuzzer_args.append(f"-dict={words}")
    seeds_fn, target, mutator = TARGETS[args.target]
    if args.replay:
        target(args.replay.read_bytes())
        print("no crash")
        return
    torch.set_num_threads(1)
    corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{args.target}-"))
    for i, seed in enumerate(seeds_fn()):
        (corpus / f"seed{i}").write_bytes(seed)
    RUN = Run(args.target, args.seconds, args.out)
    argv = [sys.argv[0], str(corpus), f"-seed={args.seed}", f"-max_total_time={int(args.seconds) + 30}",
            "-timeout=20", "-rss_limit_mb=4096", "-max_len=65536", *libfuzzer_args]
    extra = {"custom_mutator": mutator} if mutator else {}
    atheris.Setup(argv, lambda data: _guarded(data, target), **extra)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
