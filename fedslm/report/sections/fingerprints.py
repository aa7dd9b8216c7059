"""The report's Fingerprints section: each site's data set (sha256, rows, columns), the base
model, the adapter, the job config, package versions and the sites' signing keys."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fedslm.data.tables import file_sha256
from fedslm.errors import DataError
from fedslm.report.checks.files import job_config_sha256
from fedslm.report.model import BaseModelInfo, DatasetInfo, Fingerprints
from fedslm.report.runfiles import ADAPTER_DIR, RunContext, RunFiles, read_json


def data_columns(path: Path) -> list[str]:
    """Column names of a data file (its schema), without reading any value."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        return sorted(json.loads(line))
        elif suffix == ".csv":
            with path.open(encoding="utf-8-sig", newline="") as fh:
                return next(csv.reader(fh), [])
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    return []


def _file_fingerprint(ctx: RunContext, path: Path) -> tuple[str | None, int | None]:
    try:
        fp = ctx.fingerprint(path)
    except DataError:
        return None, None
    return fp.sha256, fp.rows


def dataset_info(ctx: RunContext, site: str) -> DatasetInfo:
    """sha256, rows and column names of a site's data files, and its ledger's data set key."""
    loc = ctx.run.sites.get(site)
    folder = ctx.run.root / "sites" / site / "data"
    train = loc.train if loc else folder / "train.jsonl"
    evalf = loc.eval if loc else folder / "eval.jsonl"
    t_sha, t_rows = _file_fingerprint(ctx, train)
    e_sha, e_rows = _file_fingerprint(ctx, evalf)
    view = ctx.ledger(site)
    ledger_key = view.bound_dataset if view and view.error is None else None
    matches = None if ledger_key is None or t_sha is None else ledger_key == f"{t_sha}:{t_rows}"
    return DatasetInfo(
        site=site,
        train_file=ctx.run.rel(train),
        train_sha256=t_sha,
        train_rows=t_rows,
        eval_file=ctx.run.rel(evalf),
        eval_sha256=e_sha,
        eval_rows=e_rows,
        columns=data_columns(train),
        ledger_dataset=ledger_key,
        matches_ledger=matches,
    )


def lora_settings(run: RunFiles) -> dict[str, Any]:
    """The LoRA configuration the adapter was saved with (PEFT's adapter_config.json)."""
    path = run.root / ADAPTER_DIR / "adapter_config.json"
    if not path.is_file():
        return dict((run.config or {}).get("lora") or {})
    cfg = read_json(path)
    return {
        "r": cfg.get("r"),
        "alpha": cfg.get("lora_alpha"),
        "dropout": cfg.get("lora_dropout"),
        "target_modules": sorted(cfg.get("target_modules") or []),
        "modules_to_save": sorted(set(cfg.get("modules_to_save") or [])),
        "peft_type": cfg.get("peft_type"),
        "task_type": cfg.get("task_type"),
        "source": f"{ADAPTER_DIR}/adapter_config.json",
    }


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def fingerprints(ctx: RunContext, sites: Sequence[str]) -> Fingerprints:
    """Data sets, base model, LoRA, job config hash, adapter hash, versions and caveats."""
    run = ctx.run
    model = (run.manifest or {}).get("model") or {}
    meta = run.adapter_meta or {}
    if model:
        base = BaseModelInfo(name=model.get("name"), sha256=model.get("sha256"), source="job.json")
    else:
        bm = meta.get("base_model") or {}
        base = BaseModelInfo(
            name=bm.get("name"), sha256=bm.get("sha256"), source="adapter/fedslm_adapter.json"
        )
    weights = run.adapter_weights
    return Fingerprints(
        datasets=[dataset_info(ctx, s) for s in sites],
        base_model=base,
        task=((run.config or {}).get("task") or {}).get("type") or meta.get("task"),
        lora=lora_settings(run),
        job_config_sha256=run.privacy.get("job_fingerprint"),
        job_config_sha256_recomputed=job_config_sha256(run.config) if run.config else None,
        adapter_sha256=file_sha256(weights) if weights.is_file() else None,
        versions=dict(run.privacy.get("versions") or {}),
        report_software={
            p: _package_version(p) for p in ("fedslm", "matplotlib", "jinja2", "pydantic")
        },
        caveats=list(run.privacy.get("caveats") or []),
        site_keys=site_key_fingerprints(run.manifest, sites),
    )


def site_key_fingerprints(manifest: dict | None, sites: Sequence[str]) -> dict[str, str]:
    """``SHA256:…`` of each site's registered public key (job.json), for the sites shown."""
    from fedslm.keys import SiteKeyError, fingerprint, load_public_key

    out = {}
    for s in (manifest or {}).get("sites", []):
        if s.get("name") in sites and s.get("public_key"):
            try:
                out[s["name"]] = fingerprint(load_public_key(s["public_key"], "job.json"))
            except SiteKeyError as exc:
                out[s["name"]] = f"unreadable: {exc}"
    return out
