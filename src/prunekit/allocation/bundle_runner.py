"""Time a prunekit bench bundle on this device: standard library, numpy and onnxruntime only.

This file runs on the target device, where neither torch nor prunekit is installed; it must
never import them (a test checks its imports). It reads the bundle's `manifest.json`, times
each unit's variants with onnxruntime, interleaved with the whole dense model (warm-up, then
`--repeats` rounds in rotating order, so drift hits every variant alike), and writes
`device_table.json`: min and median per variant, the device's fingerprint and the settings.
A variant that fails to load or run is recorded with its error, and the runner goes on.

    python bundle_runner.py BUNDLE [--threads 4] [--repeats 30] [--warmup 5] [--out device_table.json]
    python bundle_runner.py BUNDLE --skip-units --extra pruned=pruned.onnx   # whole models only

BUNDLE is the folder (or .zip) `prunekit.allocation.bundle.make_bundle` wrote. Read the result
back with `prunekit.allocation.bundle.load_device_table(BUNDLE, "device_table.json")`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

RESULTS_FORMAT = "prunekit.device_results"
RESULTS_VERSION = 1


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux, Android), else what platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("model name", "hardware", "processor name", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_fingerprint(threads: int, providers: list[str]) -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "platform": platform.platform(), "machine": platform.machine(), "cpu": cpu_name(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "onnxruntime": ort.__version__, "numpy": np.__version__, "threads": threads, "providers": providers,
    }


def load_input(root: Path, spec: Any) -> np.ndarray:
    """A stored input (a `.npy` path in the bundle), or a seeded random stand-in from its recorded
    shape, dtype and value statistics (a bundle made with `inputs="random"`)."""
    if isinstance(spec, str):
        return np.load(root / spec, allow_pickle=False)
    rng = np.random.default_rng(int(spec["seed"]))
    shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        return rng.integers(spec.get("low", 0), spec.get("high", 0) + 1, size=shape).astype(dtype)
    return (rng.standard_normal(shape) * spec.get("std", 1.0) + spec.get("mean", 0.0)).astype(dtype)


class Variant:
    """One ONNX file with its inputs, loaded into an onnxruntime session (or the error it gave)."""

    def __init__(self, path: Path, inputs: list[Any], options: Any, providers: list[str], root: Path) -> None:
        self.error: str | None = None
        self.run: Callable[[], Any] | None = None
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
            arrays = [load_input(root, p) for p in inputs]
            names = [i.name for i in session.get_inputs()]
            if len(names) != len(arrays):
                raise ValueError(f"{path.name} takes {len(names)} inputs, the manifest lists {len(arrays)}")
            feed = {name: arrays[i] for i, name in enumerate(names)}  # zip(strict=) needs 3.10
            session.run(None, feed)  # fail here, at load, rather than in the timed loop
            self.run = lambda: session.run(None, feed)
        except Exception as err:  # onnxruntime raises many types; all mean "cannot run here"
            self.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


def time_interleaved(variants: dict[str, Variant], warmup: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Min and median ms per variant, calls interleaved in rotating order; failures carry their error."""
    ready = {k: v.run for k, v in variants.items() if v.run is not None}
    for _ in range(warmup):
        for run in ready.values():
            run()
    times: dict[str, list[float]] = {k: [] for k in ready}
    names = list(ready)
    for r in range(repeats):
        shift = r % max(len(names), 1)
        for k in names[shift:] + names[:shift]:
            start = time.perf_counter()
            ready[k]()
            times[k].append((time.perf_counter() - start) * 1e3)
    out: dict[str, dict[str, Any]] = {}
    for k, v in variants.items():
        if v.run is None:
            out[k] = {"error": v.error, "repeats": 0}
        else:
            out[k] = {"min_ms": min(times[k]), "median_ms": statistics.median(times[k]), "repeats": repeats}
    return out


def _options(threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: a failed variant is recorded, not logged twice
    return options


def run_bundle(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Time every variant of the bundle in `root`; returns the results document."""
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    options, providers = _options(args.threads), list(args.providers)

    def load(spec: dict[str, Any]) -> Variant:
        return Variant(root / spec["onnx"], spec["inputs"], options, providers, root)

    model = load(manifest["model"])
    if model.run is None:
        print(f"dense model failed to load: {model.error}", file=sys.stderr)
    alone = time_interleaved({"model": model}, args.warmup, args.repeats)["model"]
    units: dict[str, Any] = {}
    failures = [] if model.error is None else [f"model: {model.error}"]
    for n, entry in enumerate([] if args.skip_units else manifest["units"]):
        variants = {"model": model}
        if entry["dense"] is not None:
            variants["dense"] = load(entry["dense"])
        for i, spec in enumerate(entry["levels"]):
            variants[str(i)] = load(spec)
        timed = time_interleaved(variants, args.warmup, args.repeats)
        units[entry["name"]] = {"model": timed["model"], "dense": timed.get("dense", timed["model"]),
                                "levels": [timed[str(i)] for i in range(len(entry["levels"]))]}
        failures += [f"{entry['name']}@{k}: {v.error}" for k, v in variants.items() if v.error and k != "model"]
        if not args.quiet:
            print(f"[{n + 1}/{len(manifest['units'])}] {entry['name']}", file=sys.stderr)
    return {
        "format": RESULTS_FORMAT, "version": RESULTS_VERSION,
        "bundle": {k: manifest[k] for k in ("format", "version", "prunekit_version", "model_fingerprint",
                                            "bundle_id")},
        "device": device_fingerprint(args.threads, providers),
        "settings": {"threads": args.threads, "warmup": args.warmup, "repeats": args.repeats,
                     "providers": providers},
        "model": alone, "units": units, "extra": _extras(root, manifest, model, args, options, failures),
        "failures": failures,
    }


def _extras(root: Path, manifest: dict[str, Any], model: Variant, args: argparse.Namespace, options: Any,
            failures: list[str]) -> dict[str, Any]:
    """Whole-model ONNX files timed interleaved with the bundle's dense model, on its inputs."""
    out: dict[str, Any] = {}
    for spec in args.extra:
        name, _, path = spec.partition("=")
        extra = Variant(Path(path), manifest["model"]["inputs"], options, list(args.providers), root)
        timed = time_interleaved({"model": model, name: extra}, args.warmup, args.repeats)
        row = dict(timed[name], model=timed["model"])
        if extra.error is None and model.error is None:
            row["speedup_min"] = timed["model"]["min_ms"] / timed[name]["min_ms"]
            row["speedup_median"] = timed["model"]["median_ms"] / timed[name]["median_ms"]
        else:
            failures.append(f"extra {name}: {extra.error or model.error}")
        out[name] = row
    return out


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time a prunekit bench bundle with onnxruntime.")
    parser.add_argument("bundle", type=Path, help="the bundle folder or .zip")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per unit (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per variant first (default 5)")
    parser.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"],
                        help="onnxruntime execution providers (default CPUExecutionProvider)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default BUNDLE/device_table.json, or beside a .zip)")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=PATH.onnx",
                        help="also time a whole-model ONNX against the dense model on the bundle's inputs")
    parser.add_argument("--skip-units", action="store_true", help="time only the dense model and --extra files")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--threads and --repeats must be >= 1, --warmup >= 0")
    if any("=" not in e for e in args.extra):
        parser.error("--extra takes NAME=PATH.onnx")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    bundle = args.bundle
    if bundle.suffix == ".zip":
        out = args.out or bundle.with_name("device_table.json")
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(bundle) as archive:
            archive.extractall(tmp)
            results = run_bundle(Path(tmp), args)
    else:
        out = args.out or bundle / "device_table.json"
        results = run_bundle(bundle, args)
    _write_atomic(Path(out), json.dumps(results, indent=2))
    if not args.quiet:
        print(f"wrote {out} ({len(results['failures'])} failures)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
