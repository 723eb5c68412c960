"""Ingest stage: folder -> validated manifest Parquet, with a summary artifact in Prefect."""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from cvlib.data.ingest import refresh_manifest
from cvlib.data.manifest import read_manifest
from cvlib.data.options import DataConfig
from cvlib.data.summary import check_trainable
from cvlib.files.atomic import copy_file_atomic
from tasks.environment import visionflow_home
from tasks.log import run_logger
from tasks.records import IngestResult


@task(name="ingest", retries=2, retry_delay_seconds=[5, 30], timeout_seconds=6 * 3600, persist_result=True)
def ingest(data_dir: str, manifest_path: str, config: DataConfig) -> IngestResult:
    logger = run_logger()
    # The last manifest of this folder: unchanged files (same size and mtime) are not read again,
    # and an unchanged folder is not even rewritten (its summary comes from the manifest's metadata).
    cache = manifest_cache(data_dir)
    refreshed = refresh_manifest(data_dir, cache, config)
    if Path(manifest_path).resolve() != cache.resolve():
        copy_file_atomic(cache, manifest_path)
    summary = refreshed.summary | {"skipped": refreshed.skipped}
    digest, names = refreshed.dataset_hash, refreshed.class_names
    # What the checks and the artifact read: a few columns, not the whole manifest.
    manifest = read_manifest(cache, columns=["path", "label", "status", "split", "reason"])
    logger.info("%d files read (%s)", refreshed.read, "manifest rewritten" if refreshed.changed else "nothing changed")
    create_markdown_artifact(key="ingestion-summary", markdown=_markdown(data_dir, summary, manifest), description="Ingestion summary")
    logger.info(
        "ingested %s: %d files, %d usable, %d duplicates, %d quarantined, %d classes",
        data_dir, summary["files"], summary["ok"], summary["duplicates"], summary["quarantined"], summary["classes"],
    )
    logger.info("%s", summary["layout"]["note"])
    if summary["leakage"]["exact"] or summary["leakage"]["near_groups"]:
        logger.warning("leakage across splits: %s", summary["leakage"])
    # Fail after the manifest and the artifact exist, so a person can see why.
    check_trainable(manifest, config)
    return IngestResult(
        data_dir=str(Path(data_dir).resolve()), manifest_path=str(manifest_path), dataset_hash=digest, class_names=names, summary=summary
    )


def manifest_cache(data_dir: str) -> Path:
    key = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return visionflow_home() / "manifests" / f"{Path(data_dir).name}-{key}.parquet"


def _markdown(data_dir: str, summary: dict, manifest) -> str:
    lines = [
        f"# Ingestion of `{data_dir}`",
        "",
        summary["layout"]["note"],
        "",
        "| files | usable | duplicates | quarantined | classes | imbalance |",
        "|---|---|---|---|---|---|",
        f"| {summary['files']} | {summary['ok']} | {summary['duplicates']} | {summary['quarantined']} | {summary['classes']} | {summary['imbalance_ratio']:.2f} |",
        "",
        "## Per class and split",
        "",
        "| class | train | val | test |",
        "|---|---|---|---|",
    ]
    for label, splits in summary["per_class"].items():
        lines.append(f"| {label} | {splits.get('train', 0)} | {splits.get('val', 0)} | {splits.get('test', 0)} |")
    leak = summary["leakage"]
    if leak["exact"] or leak["near_groups"]:
        lines += ["", f"**Leakage across splits**: {leak['exact']} exact copies, {leak['near_groups']} near-duplicate groups", ""]
        lines += [f"- `{e}`" for e in leak["examples"]]
    bad = manifest[manifest["status"] == "quarantined"]
    if len(bad):
        lines += ["", "## Quarantined", "", "| path | reason |", "|---|---|"]
        lines += [f"| `{p}` | {r} |" for p, r in zip(bad["path"].head(200), bad["reason"].head(200), strict=True)]
    return "\n".join(lines)
