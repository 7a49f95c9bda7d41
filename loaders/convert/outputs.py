"""What a finished conversion leaves: ``skipped.jsonl`` and ``manifest.json`` from the journal, and the report."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loaders.atomic import write_json_atomic
from loaders.convert.journal import NAME_ERRORS, iter_entries
from loaders.convert.out_dir import JobNames, raise_if_different
from loaders.manifest import FORMAT_NAME, FORMAT_VERSION, read_manifest


def package_version() -> str:
    """The installed ecomaug's version, recorded in each manifest (from the package metadata, so
    the loaders import nothing from the layers above them)."""
    try:
        return importlib.metadata.version("ecomaug")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class ConvertReport:
    """What a conversion did (also what ``manifest.json`` says, in short)."""

    out_dir: Path
    manifest_path: Path
    inputs: int
    written: int
    skipped: int
    bytes: int
    shards: int
    skipped_by_reason: dict[str, int]
    changed: int = 0
    passed_through: int = 0
    resumed: bool = False
    already_complete: bool = False
    seconds: float = 0.0
    processed: int = 0  # inputs handled by this call (less than ``inputs`` when resumed)
    val: "ConvertReport | None" = None  # the validation set's conversion (``val_split``), in OUT_DIR/val

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0



def write_outputs(names: JobNames, recorded_options: dict[str, Any], fingerprint: dict[str, Any],
                   num_jobs: int, job_index: int, inputs: int, group_columns: list[str],
                   split: dict[str, Any] | None = None) -> dict[str, Any]:
    """skipped.jsonl and manifest.json from the journal, each written atomically (``split``: how a
    validation split divided the inputs, recorded as the manifest's ``split``)."""
    shards: list[dict[str, Any]] = []
    groups: dict[str, dict[str, int]] = {column: {} for column in group_columns}
    totals = {"inputs": inputs, "written": 0, "skipped": 0, "bytes": 0, "skipped_by_reason": {},
              "changed": 0, "passed_through": 0}
    temporary = names.skipped.with_name(f".{names.skipped.name}.tmp")
    with open(temporary, "w", encoding="utf-8", errors=NAME_ERRORS) as skipped_stream:
        for entry in iter_entries(names.journal):
            for record in entry["skipped"]:
                skipped_stream.write(json.dumps(record, ensure_ascii=False) + "\n")
                totals["skipped"] += 1
                reasons = totals["skipped_by_reason"]
                reasons[record["reason"]] = reasons.get(record["reason"], 0) + 1
            totals["changed"] += entry.get("changed", 0)
            totals["passed_through"] += entry.get("passed_through", 0)
            shard = entry.get("shard")
            if shard:
                shards.append(shard)
                totals["written"] += shard["count"]
                totals["bytes"] += shard["bytes"]
                for column, values in shard["groups"].items():
                    for value, count in values.items():
                        groups.setdefault(column, {})[value] = groups.get(column, {}).get(value, 0) + count
        skipped_stream.flush()
        os.fsync(skipped_stream.fileno())
    os.replace(temporary, names.skipped)
    if totals["written"] + totals["skipped"] != inputs:
        raise RuntimeError(f"internal error: {totals['written']} written + {totals['skipped']} skipped "
                           f"!= {inputs} inputs; the journal {names.journal} is kept for inspection")
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "ecomaug_version": package_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": fingerprint["input"], "options": recorded_options,
        "job": {"index": job_index, "count": num_jobs},
        "shards": shards, "groups": groups, "totals": totals,
    }
    if split is not None:
        manifest["split"] = split
    write_json_atomic(names.manifest, manifest)
    return manifest


def report(names: JobNames, manifest: dict[str, Any], *, resumed: bool = False,
            already_complete: bool = False, processed: int = 0, seconds: float = 0.0) -> ConvertReport:
    totals = manifest["totals"]
    return ConvertReport(out_dir=names.manifest.parent, manifest_path=names.manifest,
                         inputs=totals["inputs"], written=totals["written"], skipped=totals["skipped"],
                         bytes=totals["bytes"], shards=len(manifest["shards"]),
                         skipped_by_reason=dict(totals["skipped_by_reason"]),
                         changed=totals.get("changed", 0), passed_through=totals.get("passed_through", 0),
                         resumed=resumed, already_complete=already_complete, processed=processed,
                         seconds=seconds)


def finished_report(names: JobNames, fingerprint: dict[str, Any], inputs: int, started: float) -> ConvertReport:
    manifest = read_manifest(names.manifest)
    found = dict(manifest.get("options", {}))
    found.update(input=manifest.get("input"), num_jobs=manifest.get("job", {}).get("count"),
                 job_index=manifest.get("job", {}).get("index"))
    raise_if_different(fingerprint, found, names.manifest)
    if manifest["totals"]["inputs"] != inputs:
        raise ValueError(f"{names.manifest} was written for {manifest['totals']['inputs']} inputs but the "
                         f"input now has {inputs}; convert into an empty OUT_DIR")
    names.journal.unlink(missing_ok=True)  # a crash between writing the manifest and this cleanup
    return report(names, manifest, already_complete=True, seconds=time.perf_counter() - started)
