"""Reading a device's timings of a bench bundle back: checked against the bundle, then a `LatencyTable`.

`bundle_runner.py` writes `device_table.json` on the device; `load_device_table` refuses, by file
and field, results of another bundle, another model or another prunekit version and corrupt
files, and turns the rest into the `LatencyTable` that `allocate(..., LatencyTarget(...))` reads.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from torch import nn

from prunekit.allocation.bundle import (
    FORMAT,
    FORMAT_VERSION,
    RESULTS_FORMAT,
    bundle_id,
    model_fingerprint,
    prunekit_version,
)
from prunekit.allocation.latency import LatencyTable
from prunekit.errors import CheckpointError
from prunekit.storage.files import read_json_document, validate_document

log = logging.getLogger(__name__)




class _Stat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_ms: float | None = None
    median_ms: float | None = None
    repeats: int = 0
    error: str | None = None


class _UnitResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: _Stat
    dense: _Stat
    levels: list[_Stat]


class _BundleRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str
    version: int
    prunekit_version: str
    model_fingerprint: str
    bundle_id: str


class _ResultsDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["prunekit.device_results"]
    version: Literal[1]
    bundle: _BundleRef
    device: dict[str, Any]
    settings: dict[str, Any]
    model: _Stat
    units: dict[str, _UnitResult]
    extra: dict[str, dict[str, Any]] = {}
    failures: list[str] = []


def read_manifest(bundle: str | Path) -> dict[str, Any]:
    """The checked `manifest.json` of a bundle folder or .zip."""
    bundle = Path(bundle)
    where = f"{str(bundle)!r}/manifest.json"
    if bundle.suffix == ".zip":
        try:
            with zipfile.ZipFile(bundle) as archive:
                data = json.loads(archive.read("manifest.json"))
        except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"bench bundle {where} cannot be read: {err}") from None
    else:
        data = read_json_document(bundle / "manifest.json", "bench bundle manifest", CheckpointError)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{where}: field 'format' is not {FORMAT!r}: not a prunekit bench bundle")
    if data.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: field 'version' is {data.get('version')!r}; this prunekit reads "
                              f"bundle version {FORMAT_VERSION}: rebuild it with make_bundle")
    for key in ("prunekit_version", "model_fingerprint", "bundle_id", "levels", "kind", "units", "variants"):
        if key not in data:
            raise CheckpointError(f"{where}: field {key!r} is missing; rebuild the bundle with make_bundle")
    if bundle_id(data) != data["bundle_id"]:
        raise CheckpointError(f"{where}: field 'bundle_id' does not match the manifest's content (edited?)")
    return data


def _check_belongs(manifest: dict[str, Any], doc: _ResultsDocument, where: str, model: nn.Module | None) -> None:
    """Refuse results (or a model) that are not this bundle's, naming the field that differs."""
    mine = prunekit_version()
    if manifest["prunekit_version"] != mine:
        raise CheckpointError(f"bench bundle: field 'prunekit_version' is {manifest['prunekit_version']!r} but "
                              f"this is prunekit {mine}: rebuild the bundle and rerun it on the device")
    for field in ("format", "version", "prunekit_version", "model_fingerprint", "bundle_id"):
        theirs, expected = getattr(doc.bundle, field), manifest[field]
        if theirs != expected:
            raise CheckpointError(f"{where}: field 'bundle.{field}' is {theirs!r} but the bundle's is {expected!r}: "
                                  "these results were measured for another bundle (another model, prunekit "
                                  "version or config); run this bundle's runner on the device")
    if model is not None and model_fingerprint(model) != manifest["model_fingerprint"]:
        raise CheckpointError(f"bench bundle: field 'model_fingerprint' is {manifest['model_fingerprint']!r} but "
                              f"the model given hashes to {model_fingerprint(model)!r}: a bundle of another model")
    missing = [u["name"] for u in manifest["units"] if u["name"] not in doc.units]
    if missing:
        raise CheckpointError(f"{where}: field 'units' has no results for {missing[:4]}: rerun the runner "
                              "without --skip-units")


def load_device_table(
    bundle: str | Path,
    results: str | Path,
    *,
    model: nn.Module | None = None,
    statistic: Literal["min", "median"] = "min",
) -> LatencyTable:
    """The `LatencyTable` measured on a device by `bundle_runner.py`; reads files, mutates nothing.

    Args:
        bundle: the bundle folder or .zip `make_bundle` wrote.
        results: the `device_table.json` the runner wrote on the device.
        model: if given, also check that the bundle was made from this model's architecture.
        statistic: "min" (the fastest interleaved call, as `measure_latency_table` uses, robust
            to other load) or "median".

    Returns:
        A `LatencyTable` (kind "layer" or "group", `threads` as the device ran) whose savings
        are the device's. A variant the device could not load or run counts as saving nothing
        (a warning names it), so allocation never relies on an unmeasured saving.

    Raises:
        CheckpointError: a corrupt file, results from another bundle (model fingerprint,
            prunekit version, bundle id), or a failed dense model; the message names the file and field.
    """
    manifest = read_manifest(bundle)
    where = f"device results {str(results)!r}"
    data = read_json_document(results, "device results", CheckpointError)
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise CheckpointError(f"{where}: field 'format' is not {RESULTS_FORMAT!r}: not a bundle runner's output")
    doc = validate_document(data, _ResultsDocument, where, CheckpointError)
    _check_belongs(manifest, doc, where, model)
    model_ms = _value(doc.model, statistic)
    if model_ms is None:
        raise CheckpointError(f"{where}: field 'model' has no timing ({doc.model.error}): the dense model failed "
                              "on the device, so no saving can be scaled")
    dense_ms: dict[str, float] = {}
    latency_ms: dict[str, list[float]] = {}
    reference_ms: dict[str, float] = {}
    for entry in manifest["units"]:
        unit = entry["name"]
        dense_ms[unit], latency_ms[unit], reference_ms[unit] = _unit_row(
            unit, doc.units[unit], manifest["levels"], model_ms, statistic)
    threads = int(doc.settings.get("threads", 1))
    return LatencyTable([u["name"] for u in manifest["units"]], list(manifest["levels"]), dense_ms, latency_ms,
                        model_ms, manifest["kind"], threads, reference_ms)


def _value(stat: _Stat, statistic: str) -> float | None:
    return stat.min_ms if statistic == "min" else stat.median_ms


def _unit_row(unit: str, result: _UnitResult, levels: list[float], model_ms: float,
              statistic: str) -> tuple[float, list[float], float]:
    """(dense, per-level, reference) ms of one unit; failed variants save nothing."""
    reference, dense = _value(result.model, statistic), _value(result.dense, statistic)
    if reference is None or dense is None:
        log.warning("device table: unit %r has no dense timing (%s); it is taken to save nothing",
                    unit, result.dense.error or result.model.error)
        return 0.0, [0.0] * len(levels), model_ms
    row = []
    for level, stat in zip(levels, result.levels, strict=False):
        value = _value(stat, statistic)
        if value is None:
            log.warning("device table: unit %r at level %s failed on the device (%s); taken to save nothing",
                        unit, level, stat.error)
        row.append(dense if value is None else value)
    row += [dense] * (len(levels) - len(row))
    return dense, row, reference
