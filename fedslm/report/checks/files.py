"""Checks of the run's files and fingerprints: training data, job identity and metrics.jsonl."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedslm.config import config_fingerprint
from fedslm.errors import DataError
from fedslm.report.checks.base import Discrepancy, dp_sites
from fedslm.report.runfiles import (
    ADAPTER_DIR,
    ADAPTER_META,
    MANIFEST_FILE,
    METRICS_FILE,
    PRIVACY_FILE,
    RunContext,
)


def check_dataset(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """Each site's training file has the sha256 and row count its ledger is keyed by."""
    for s in sites:
        loc, view = ctx.run.sites.get(s), ctx.ledger(s)
        if loc is None or view is None or view.error is not None:
            continue
        try:
            key = ctx.fingerprint(loc.train).key
        except DataError as exc:
            return Discrepancy(ctx.run.rel(loc.train), s, "data file", note=str(exc))
        for stored in [view.bound_dataset, *(e.dataset for e in ctx.job_entries(s))]:
            if stored is not None and stored != key:
                return Discrepancy(
                    ctx.run.rel(view.path),
                    s,
                    "data set (sha256:rows)",
                    stored,
                    key,
                    note=f"fingerprint of {ctx.run.rel(loc.train)}",
                )
    return None


def job_config_sha256(config: dict[str, Any]) -> str:
    """sha256 of a job config as ``JobConfig.fingerprint`` computes it, from job.json's copy."""
    return config_fingerprint(config)


def check_job_identity(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """The job config hash, job id, base model sha256 and LoRA settings agree across
    privacy.json, job.json, the adapter's fedslm_adapter.json and the ledgers."""
    run = ctx.run
    meta = run.adapter_meta or {}
    meta_file = f"{ADAPTER_DIR}/{ADAPTER_META}"
    stored_fp = run.privacy.get("job_fingerprint")
    if run.config is not None:
        recomputed = job_config_sha256(run.config)
        if stored_fp != recomputed:
            return Discrepancy(
                PRIVACY_FILE,
                None,
                "job_fingerprint",
                stored_fp,
                recomputed,
                note=f"sha256 of {MANIFEST_FILE} config",
            )
    if meta and meta.get("job_fingerprint") != stored_fp:
        return Discrepancy(
            meta_file,
            None,
            "job_fingerprint",
            meta.get("job_fingerprint"),
            stored_fp,
            expected_label="privacy.json has",
        )
    manifest = run.manifest or {}
    pairs = [
        ("job_id", meta.get("job_id"), manifest.get("job_id")),
        (
            "base_model.sha256",
            (meta.get("base_model") or {}).get("sha256"),
            (manifest.get("model") or {}).get("sha256"),
        ),
        ("lora", meta.get("lora"), (run.config or {}).get("lora")),
    ]
    for field, in_meta, in_manifest in pairs:
        if meta and manifest and in_meta != in_manifest:
            return Discrepancy(
                meta_file, None, field, in_meta, in_manifest, expected_label="job.json has"
            )
    for s, _ in dp_sites(ctx, sites):
        if not ctx.job_entries(s) and ctx.trained_rounds(s):
            view = ctx.ledger(s)
            return Discrepancy(
                ctx.run.rel(view.path) if view else "ledger",
                s,
                "job_id",
                None,
                run.job_id,
                note="the ledger has no entry of this job",
                expected_label="job",
            )
    return None


def check_metrics(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """metrics.jsonl is one record per round in order, its per-site and per-round byte counts
    agree, and each site's record count is its training file's row count."""
    rounds = [r["round"] for r in ctx.run.metrics]
    if rounds != list(range(1, len(rounds) + 1)):
        return Discrepancy(METRICS_FILE, None, "round", rounds, list(range(1, len(rounds) + 1)))
    for rec in ctx.run.metrics:
        for s in sites:
            top = (rec.get("bytes_sent") or {}).get(s)
            per_site = (rec.get("sites", {}).get(s) or {}).get("bytes_sent")
            if top != per_site:
                return Discrepancy(
                    METRICS_FILE,
                    s,
                    f"round {rec['round']} bytes_sent.{s}",
                    top,
                    per_site,
                    expected_label=f"sites.{s}.bytes_sent is",
                )
    for s, p in dp_sites(ctx, sites):
        loc = ctx.run.sites.get(s)
        if loc is None or not loc.train.is_file():
            continue
        rows = ctx.fingerprint(loc.train).rows
        if p.get("records") != rows:
            return Discrepancy(
                PRIVACY_FILE,
                s,
                f"sites.{s}.records",
                p.get("records"),
                rows,
                expected_label=f"rows in {ctx.run.rel(loc.train)}",
            )
    return None
