"""Every figure of a report, computed from a run folder by one small function each.

Figures are read from the run's files (privacy.json, metrics.jsonl, job.json, the adapter, each
site's data files and ledger) or recomputed with ``fedslm.privacy.accounting``; each epsilon
says which (``EpsilonFigure.source``). :func:`collect` builds one report; the same run read
twice gives the same report except ``generated_at`` and ``run.run_dir``, which is what
``fedslm verify`` relies on.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fedslm import __version__
from fedslm.audit.report import empirical_check
from fedslm.data.tables import file_sha256
from fedslm.errors import DataError
from fedslm.privacy.accounting import ACCOUNTANT_NAMES, Segment, epsilon, gaussian_epsilon
from fedslm.privacy.egress_log import EgressEntry
from fedslm.privacy.ledger import format_time
from fedslm.report.checks import job_config_sha256, run_checks
from fedslm.report.model import (
    ACCOUNTANT_LABELS,
    Baseline,
    BaseModelInfo,
    Budget,
    CentralPrivacy,
    CentralRound,
    CheckResult,
    DatasetInfo,
    Egress,
    EgressMessage,
    EgressTensor,
    EpsilonFigure,
    Failure,
    Fingerprints,
    LifetimeSpend,
    PolicyInfo,
    Privacy,
    Refusal,
    Report,
    RoundBytes,
    RoundEpsilon,
    RoundUtility,
    RunInfo,
    Scope,
    SegmentRow,
    SitePrivacy,
    SiteRoundUtility,
    Summary,
    Utility,
    epsilon_text,
)
from fedslm.report.runfiles import (
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    BASELINES_DIR,
    METRICS_FILE,
    PRIVACY_FILE,
    ReportInputError,
    RunContext,
    RunFiles,
    adapter_tensors,
    load_run,
    read_json,
    read_metrics,
)

POOLED = "pooled"  # the single site of a `fedslm centralized` run
ANALYTIC_DETAIL = (
    "closed form for composed Gaussian mechanisms (Balle and Wang 2018), "
    "fedslm.privacy.accounting.gaussian_epsilon"
)
RECOMPUTED = "recomputed by fedslm report"


def figure(value: Any, delta: float, accountant: str, source: str) -> EpsilonFigure:
    """An epsilon with its delta, accountant and source; infinite (or JSON null) is None."""
    eps = None if value is None or value == float("inf") else float(value)
    detail = ANALYTIC_DETAIL if accountant == "analytic" else ACCOUNTANT_NAMES[accountant]
    return EpsilonFigure(
        epsilon=eps,
        delta=float(delta),
        accountant=accountant,  # type: ignore[arg-type]
        accountant_detail=detail,
        source=source,
    )


def now_utc() -> str:
    """The report's timestamp: ``SOURCE_DATE_EPOCH`` if set (reproducible builds), else now."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = _dt.datetime.fromtimestamp(int(epoch), _dt.UTC) if epoch else _dt.datetime.now(_dt.UTC)
    return t.isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# The whole report


def collect(
    run_dir: str | Path,
    *,
    site: str | None = None,
    baselines: Sequence[tuple[str, Path]] = (),
    ctx: RunContext | None = None,
    generated_at: str | None = None,
    check_names: Sequence[str] | None = None,
) -> Report:
    """The report of the run in ``run_dir``, for the federation or for one ``site``.

    ``baselines`` are ``(name, run folder)`` pairs to compare utility against; pass
    :func:`find_baselines` for the ones under ``RUN/baselines/``. ``ctx`` reuses ledgers
    already read; ``check_names`` limits the report's checks to those (verify rebuilds an
    older report with the checks it was made with). Raises ``ReportInputError`` for an
    unreadable run folder.
    """
    ctx = ctx or RunContext(load_run(run_dir))
    sites = ctx.site_names()
    if site is not None:
        if site not in sites:
            raise ReportInputError(f"{ctx.run.root}: no site {site!r} (sites: {sites})")
        sites = [site]
    checks = run_checks(ctx, sites, check_names)
    try:
        return _report(ctx, site, sites, baselines, checks, generated_at)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        failed = next((c for c in checks if not c.passed), None)
        raise ReportInputError(
            f"{ctx.run.root}: cannot build a report: a run file has a missing or malformed "
            f"field ({type(exc).__name__}: {exc})"
            + (f"; first failed check: {failed.name}: {failed.detail}" if failed else "")
        ) from None


def _report(
    ctx: RunContext,
    site: str | None,
    sites: list[str],
    baselines: Sequence[tuple[str, Path]],
    checks: list[CheckResult],
    generated_at: str | None,
) -> Report:
    privacy = privacy_section(ctx, sites)
    fp = fingerprints(ctx, sites)
    return Report(
        generated_by=f"fedslm {__version__}",
        generated_at=generated_at or now_utc(),
        scope=Scope(level="site", site=site) if site else Scope(level="federation"),
        run=run_info(ctx),
        summary=summary(ctx, sites, privacy, fp, checks),
        privacy=privacy,
        trust_model=trust_model(ctx, privacy),
        fingerprints=fp,
        egress=egress(ctx, sites),
        policies=policies(ctx, sites),
        refusals=refusals(ctx, sites),
        failures=failures(ctx, sites),
        utility=utility(ctx, sites, [load_baseline(n, p, ctx.run, sites) for n, p in baselines]),
        checks=checks,
        notes=notes(ctx),
        empirical_check=empirical_check(ctx.run.root, ctx.run.config),
    )


def run_kind(run: RunFiles) -> str:
    """``centralized`` for a ``fedslm centralized`` run (one pooled site), else ``federated``."""
    return "centralized" if list(run.privacy["sites"]) == [POOLED] else "federated"


def run_info(ctx: RunContext) -> RunInfo:
    """Which run this is."""
    run, config = ctx.run, ctx.run.config or {}
    return RunInfo(
        run_dir=str(run.root.resolve()),
        kind=run_kind(run),  # type: ignore[arg-type]
        job_id=run.job_id,
        config_source=(run.manifest or {}).get("source"),
        manifest_present=run.manifest is not None,
        rounds_planned=(config.get("federation") or {}).get("rounds"),
        rounds_recorded=len(run.metrics),
        sites=ctx.site_names(),
        incomplete=run.incomplete,
    )


# --------------------------------------------------------------------------------------------
# Privacy


def privacy_section(ctx: RunContext, sites: Sequence[str]) -> Privacy:
    """Unit, relation, mechanism; per-site record-level figures; the central block."""
    p = ctx.run.privacy
    # the job's delta and accountant: job.json's config, else any DP site's (no manifest)
    known = [(ctx.run.config or {}).get("privacy") or {}]
    known += [s for s in p["sites"].values() if s.get("dp_enabled")]
    reading = next((k for k in known if k.get("delta") and k.get("accountant")), None)
    target = None
    if p.get("target_epsilon") is not None and reading is not None:
        target = figure(
            p["target_epsilon"],
            reading["delta"],
            reading["accountant"],
            f"{PRIVACY_FILE} target_epsilon (noise calibrated to it with this accountant)",
        )
    return Privacy(
        privacy_unit=p.get("privacy_unit", "record"),
        neighbouring="add/remove one record of one site's training data",
        mechanism=p.get("mechanism", ""),
        calibration_target=target,
        sites=[site_privacy(ctx, s) for s in sites],
        central=central_privacy(ctx),
    )


def site_privacy(ctx: RunContext, site: str) -> SitePrivacy:
    """One site's record-level DP figures: privacy.json's, and recomputed from its ledger."""
    p = ctx.run.privacy["sites"].get(site) or {}
    src = f"{PRIVACY_FILE} sites.{site}"
    entries = ctx.accepted_entries(site)
    dp = bool(p.get("dp_enabled"))
    delta, acc = p.get("delta"), p.get("accountant")
    eps = eps_pld = eps_rdp = eps_report = None
    if dp and delta is not None and acc is not None:
        eps = figure(p.get("epsilon"), delta, acc, f"{src}.epsilon (reported by the site)")
        eps_pld = figure(
            p.get("epsilon_recomputed_pld"), delta, "pld", f"{src}.epsilon_recomputed_pld"
        )
        eps_rdp = figure(p.get("epsilon_rdp"), delta, "rdp", f"{src}.epsilon_rdp")
        segs = [Segment(g["q"], g["sigma"], g["steps"]) for g in p.get("segments") or []]
        eps_report = figure(
            epsilon(segs, delta, "pld"), delta, "pld", f"{RECOMPUTED} from {src}.segments"
        )
    return SitePrivacy(
        site=site,
        dp_enabled=dp,
        records=p.get("records"),
        rounds_trained=int(p.get("rounds", 0)),
        dp_steps=p.get("dp_steps"),
        delta=delta,
        noise_multiplier=p.get("noise_multiplier"),
        max_grad_norm=p.get("max_grad_norm"),
        sample_rate=p.get("sample_rate"),
        segments=[SegmentRow(round=e.round, q=e.q, sigma=e.sigma, steps=e.steps) for e in entries],
        epsilon=eps,
        epsilon_pld=eps_pld,
        epsilon_rdp=eps_rdp,
        epsilon_pld_report=eps_report,
        coordinator_check=p.get("epsilon_check"),
        per_round=round_epsilons(ctx, site, delta, acc) if dp else [],
        lifetime=lifetime_spend(ctx, site, p),
    )


def round_epsilons(
    ctx: RunContext, site: str, delta: float | None, accountant: str | None
) -> list[RoundEpsilon]:
    """The site's job epsilon after each round: metrics.jsonl's, and PLD from the ledger.

    metrics.jsonl does not name the accountant of its epsilons; it is the site's (privacy.json).
    """
    if delta is None or accountant is None:
        return []
    out = []
    for rec in ctx.run.metrics:
        k = rec["round"]
        logged = (rec.get("epsilon") or {}).get(site, "absent")
        segs = [e.segment for e in ctx.accepted_entries(site, k)]
        if logged == "absent" or (logged is None and not segs):
            shown = None  # not known yet, or known but nothing trained (null is not infinite here)
        else:
            shown = figure(logged, delta, accountant, f"{METRICS_FILE} round {k} epsilon.{site}")
        out.append(
            RoundEpsilon(
                round=k,
                logged=shown,
                recomputed_pld=figure(
                    epsilon(segs, delta, "pld"),
                    delta,
                    "pld",
                    f"{RECOMPUTED} from the ledger's {len(segs)} accepted segments up to round {k}",
                ),
            )
        )
    return out


def budget(ctx: RunContext, site: str) -> Budget | None:
    """The site policy's privacy limits, or None when no policy applied (pooled baseline)."""
    loc = ctx.run.sites.get(site)
    limits = ((loc.policy if loc else None) or {}).get("privacy")
    if not limits:
        return None
    where = "job.json sites[].policy.privacy" if ctx.run.manifest else f"sites/{site}/policy.yaml"
    return Budget(
        lifetime=limits["lifetime_epsilon"],
        per_job=limits["max_epsilon_per_job"],
        max_delta=limits["max_delta"],
        source=where,
    )


def lifetime_spend(ctx: RunContext, site: str, p: dict[str, Any]) -> LifetimeSpend | None:
    """Everything the site's ledger holds for the data set up to this job's last entry,
    composed, against the budget."""
    view = ctx.ledger(site)
    if view is None or view.error is not None:
        return None
    dataset = view.bound_dataset or (view.entries[-1].dataset if view.entries else None)
    # As of this job's last entry: later jobs on the same data set (simulated runs compose in
    # one ledger per data set) belong to their own reports, and must not change this one.
    last = max((e.seq for e in ctx.job_entries(site)), default=None)
    mine = [e for e in view.entries if e.dataset == dataset and (last is None or e.seq <= last)]
    # a site that trained without DP has no delta of its own; its ledger entries (noise 0)
    # still spend, and are read at the job's delta and accountant
    priv_cfg = (ctx.run.config or {}).get("privacy") or {}
    delta = p.get("delta") or priv_cfg.get("delta")
    acc = p.get("accountant") or priv_cfg.get("accountant")
    spent = spent_pld = reported = None
    lim = budget(ctx, site)
    remaining = None
    if delta is not None and acc is not None:
        segs = [e.segment for e in mine]
        how = (
            f"{RECOMPUTED} from the data set's {len(mine)} ledger entries up to this job's last, "
            "at this job's delta"
        )
        spent = figure(epsilon(segs, delta, acc), delta, acc, how)
        spent_pld = figure(epsilon(segs, delta, "pld"), delta, "pld", how)
        if "lifetime_epsilon_site_reported" in p:
            reported = figure(
                p["lifetime_epsilon_site_reported"],
                delta,
                acc,
                f"{PRIVACY_FILE} sites.{site}.lifetime_epsilon_site_reported",
            )
        if lim is not None and spent.epsilon is not None:
            remaining = lim.lifetime - spent.epsilon
    return LifetimeSpend(
        ledger=ctx.run.rel(view.path),
        dataset=dataset,
        entries=len(mine),
        jobs=sorted({e.job_id for e in mine}),
        steps=sum(e.steps for e in mine),
        first_entry=format_time(mine[0].time) if mine else None,
        last_entry=format_time(mine[-1].time) if mine else None,
        spent=spent,
        spent_pld=spent_pld,
        site_reported=reported,
        budget=lim,
        remaining=remaining,
        ledger_head_in_privacy_json=p.get("ledger_head"),
        ledger_last_hash=mine[-1].hash if mine else None,  # the last entry counted here
    )


def central_privacy(ctx: RunContext) -> CentralPrivacy | None:
    """privacy.json's site-level block, its epsilon recomputed in closed form, per round."""
    c = ctx.run.privacy.get("central")
    if not c:
        return None
    src = f"{PRIVACY_FILE} central"
    delta, acc, sigma = float(c["delta"]), c["accountant"], float(c["noise_multiplier"])
    rounds = int(c["rounds_released"])
    per_round, done = [], 0
    for rec in ctx.run.metrics:
        done += bool(rec.get("aggregated"))
        cdp = rec.get("central_dp") or {}
        k = rec["round"]
        per_round.append(
            CentralRound(
                round=k,
                aggregated=bool(rec.get("aggregated")),
                sites=cdp.get("sites"),
                clipped=cdp.get("clipped"),
                noise_std_of_mean=cdp.get("noise_std_of_mean"),
                logged=figure(
                    rec.get("central_epsilon"),
                    delta,
                    acc,
                    f"{METRICS_FILE} round {k} central_epsilon",
                )
                if "central_epsilon" in rec
                else None,
                recomputed_analytic=figure(
                    gaussian_epsilon(sigma, done, delta),
                    delta,
                    "analytic",
                    f"{RECOMPUTED}: {done} Gaussian mechanisms, noise {sigma:g}",
                ),
            )
        )
    target = c.get("target_epsilon")
    return CentralPrivacy(
        privacy_unit=c["privacy_unit"],
        mechanism=c["mechanism"],
        covers=c["covers"],
        weighting=c["weighting"],
        records_cap=c.get("records_cap"),
        denominator=int(c["denominator"]),
        clip_norm=float(c["clip_norm"]),
        noise_multiplier=sigma,
        noise_std_of_mean=float(c["noise_std_of_mean"]),
        rounds_released=rounds,
        delta=delta,
        calibration_target=None
        if target is None
        else figure(target, delta, acc, f"{src}.target_epsilon (noise calibrated to it)"),
        epsilon=figure(c.get("epsilon"), delta, acc, f"{src}.epsilon"),
        epsilon_pld=figure(
            c.get("epsilon_recomputed_pld"), delta, "pld", f"{src}.epsilon_recomputed_pld"
        ),
        epsilon_rdp=figure(c.get("epsilon_rdp"), delta, "rdp", f"{src}.epsilon_rdp"),
        epsilon_analytic=figure(
            c.get("epsilon_analytic"), delta, "analytic", f"{src}.epsilon_analytic"
        ),
        epsilon_analytic_report=figure(
            gaussian_epsilon(sigma, rounds, delta),
            delta,
            "analytic",
            f"{RECOMPUTED} from {src}.noise_multiplier and rounds_released",
        ),
        coordinator_check=c.get("epsilon_check"),
        per_round=per_round,
    )


# --------------------------------------------------------------------------------------------
# Fingerprints


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


# --------------------------------------------------------------------------------------------
# Egress, policies, refusals


def egress_messages(ctx: RunContext, sites: Sequence[str]) -> list[EgressMessage]:
    """The per-message egress log of ``sites`` for this job, from each site's ledger: every
    message sent or blocked, with its tensors (name, shape, dtype, bytes, sha256) and every
    metric and field. Sites whose ledger cannot be read contribute nothing (the ledger-chain
    check reports why)."""
    from fedslm.privacy.egress_log import egress_entries
    from fedslm.privacy.ledger import LedgerError, PrivacyLedger

    out: list[EgressMessage] = []
    for site in sites:
        loc = ctx.run.sites.get(site)
        if loc is None or not loc.ledger.is_file():
            continue
        try:
            with PrivacyLedger(loc.ledger, create=False) as ledger:
                entries = egress_entries(ledger, ctx.run.job_id)
        except LedgerError:
            continue
        out.extend(egress_message(site, e) for e in entries)
    return out


def egress_message(
    site: str, e: EgressEntry, extra_fields: dict[str, Any] | None = None
) -> EgressMessage:
    """One egress-log record as the report shows it; ``extra_fields`` go before the record's
    own fields (a site's report adds the job and the log position)."""
    rec = e.record
    return EgressMessage(
        round=e.round,
        site=site,
        kind=e.kind,
        status=e.status,
        bytes=int(rec.get("tensor_bytes", 0)),
        sha256=e.hash,
        tensors=[EgressTensor(**t) for t in rec.get("tensors", [])],
        metrics=dict(rec.get("metrics", {})),
        fields={**(extra_fields or {}), **dict(rec.get("fields", {}))},
        blocked_because=list(rec.get("blocked_because", [])),
    )


def egress(ctx: RunContext, sites: Sequence[str]) -> Egress:
    """Bytes per round per site (metrics.jsonl) and the tensors every reply carries."""
    weights = ctx.run.adapter_weights
    tensors = adapter_tensors(weights) if weights.is_file() else []
    rounds = [
        RoundBytes(
            round=rec["round"],
            sites={
                s: int(v)
                for s, v in (rec.get("bytes_sent") or {}).items()
                if s in sites and v is not None
            },
        )
        for rec in ctx.run.metrics
    ]
    totals = {s: sum(r.sites.get(s, 0) for r in rounds) for s in sites}
    log = egress_messages(ctx, sites)
    return Egress(
        what_is_sent=(
            "Each round, each site that trained sends the coordinator its adapter (every tensor "
            "below, float32, under these names), its record count, training loss, steps, "
            "timings, and its DP segment (q, sigma, steps), delta, accountant, epsilons and "
            "ledger head. Evaluation replies carry loss, accuracy and the number of "
            "evaluation records. No record leaves a site."
        ),
        tensors=tensors,
        tensor_bytes=sum(t.bytes for t in tensors),
        tensors_source=f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS} (the final adapter; every reply has "
        "the same names and shapes)",
        rounds=rounds,
        total_bytes=totals,
        per_message_log=log,
        per_message_log_note=(
            "Each site's egress guard checked every message against the agreed adapter, the "
            "metric allow-list and its byte limit, and logged it in the site's ledger before "
            "it could leave. bytes_sent (metrics.jsonl) counts each whole training reply as "
            "Flower encodes it: tensors plus metrics and DP fields."
            if log
            else "No per-message egress log in this run (made before sites logged messages). "
            "bytes_sent (metrics.jsonl) counts each whole training reply as Flower encodes "
            "it: tensors plus metrics and DP fields."
        ),
    )


def policies(ctx: RunContext, sites: Sequence[str]) -> list[PolicyInfo]:
    """Each site's policy as in force for the job (verbatim from job.json or policy.yaml)."""
    out = []
    for s in sites:
        loc = ctx.run.sites.get(s)
        source = "job.json sites[].policy" if ctx.run.manifest else f"sites/{s}/policy.yaml"
        if loc is None or loc.policy is None:
            source = "none: no site policy applied (pooled baseline data)"
        out.append(PolicyInfo(site=s, source=source, policy=loc.policy if loc else None))
    return out


def refusals(ctx: RunContext, sites: Sequence[str]) -> list[Refusal]:
    """Every refusal, from metrics.jsonl (per round) and privacy.json (per site), merged."""
    # privacy.json joins a round's reasons with "; " (which reasons may contain), so the two
    # files are matched on the joined text and metrics.jsonl's list is kept
    seen: dict[tuple[str, int | None, str], tuple[list[str], list[str]]] = {}
    for rec in ctx.run.metrics:
        for s, reasons in (rec.get("refusals") or {}).items():
            if s in sites:
                key = (s, rec["round"], "; ".join(reasons))
                seen.setdefault(key, (list(reasons), []))[1].append(
                    f"{METRICS_FILE} round {rec['round']}"
                )
    for s in sites:
        for i, text in enumerate((ctx.run.privacy["sites"].get(s) or {}).get("refusals") or []):
            rnd: int | None = None
            body = text
            head, sep, rest = text.partition(": ")
            if sep and head.startswith("round ") and head[6:].isdigit():
                rnd, body = int(head[6:]), rest
            seen.setdefault((s, rnd, body), ([body], []))[1].append(
                f"{PRIVACY_FILE} sites.{s}.refusals[{i}]"
            )
    return [
        Refusal(site=s, round=r, reasons=reasons, source="; ".join(src))
        for (s, r, _), (reasons, src) in seen.items()
    ]


def failures(ctx: RunContext, sites: Sequence[str]) -> list[Failure]:
    """Replies that failed or were rejected (metrics.jsonl), restricted to the sites named."""
    everyone = ctx.site_names()
    out = []
    for rec in ctx.run.metrics:
        for msg in rec.get("failures") or []:
            named = [s for s in everyone if s in msg]
            if not named or any(s in sites for s in named) or len(sites) == len(everyone):
                out.append(Failure(round=rec["round"], message=str(msg)))
    return out


# --------------------------------------------------------------------------------------------
# Utility


def round_utility(rec: dict[str, Any], sites: Sequence[str]) -> RoundUtility:
    """One metrics.jsonl record as loss and accuracy, per site restricted to ``sites``."""
    fields = set(SiteRoundUtility.model_fields)
    return RoundUtility(
        round=rec["round"],
        aggregated=rec.get("aggregated"),
        reason=rec.get("reason"),
        train_loss=rec.get("train_loss"),
        eval_loss=rec.get("eval_loss"),
        eval_accuracy=rec.get("eval_accuracy"),
        sites={
            s: SiteRoundUtility(**{k: v for k, v in (m or {}).items() if k in fields})
            for s, m in (rec.get("sites") or {}).items()
            if s in sites
        },
    )


def find_baselines(run_dir: str | Path) -> list[tuple[str, Path]]:
    """``RUN/baselines/NAME/`` folders that hold a metrics.jsonl, by name, as paths relative to
    the run folder (``load_baseline`` reads a relative path from there, so a run named by a
    relative path must not be joined to itself)."""
    folder = Path(run_dir) / BASELINES_DIR
    if not folder.is_dir():
        return []
    return [
        (d.name, Path(BASELINES_DIR) / d.name)
        for d in sorted(folder.iterdir())
        if (d / METRICS_FILE).is_file()
    ]


def load_baseline(name: str, path: Path, run: RunFiles, sites: Sequence[str]) -> Baseline:
    """A baseline run's loss and accuracy per round, and its privacy if it has privacy.json."""
    path = Path(path)
    where = path if path.is_absolute() else run.root / path
    metrics = read_metrics(where / METRICS_FILE)
    privacy = read_json(where / PRIVACY_FILE) if (where / PRIVACY_FILE).is_file() else None
    eps: dict[str, EpsilonFigure] = {}
    dp = None
    kind = "federated"
    if privacy is not None:
        bsites = privacy.get("sites") or {}
        kind = "centralized" if list(bsites) == [POOLED] else "federated"
        dp = any(p.get("dp_enabled") for p in bsites.values())
        for s, p in bsites.items():
            if p.get("dp_enabled"):
                eps[s] = figure(
                    p.get("epsilon"),
                    p["delta"],
                    p["accountant"],
                    f"baseline {name}: {PRIVACY_FILE} sites.{s}.epsilon",
                )
    shown = [*sites, POOLED]
    return Baseline(
        name=name,
        path=run.rel(where),
        kind=kind,  # type: ignore[arg-type]
        dp_enabled=dp,
        epsilons=eps,
        rounds=[round_utility(r, shown) for r in metrics],
    )


def utility(ctx: RunContext, sites: Sequence[str], baselines: list[Baseline]) -> Utility:
    """Loss and accuracy per round, and the baselines."""
    return Utility(
        note="Evaluation loss and accuracy of each round's global adapter on each site's "
        "held-out records (weighted by their number), as the sites reported them to the "
        "coordinator. These figures are not protected by DP.",
        rounds=[round_utility(r, sites) for r in ctx.run.metrics],
        baselines=baselines,
    )


# --------------------------------------------------------------------------------------------
# Plain language


def _eps_text(f: EpsilonFigure | None) -> str:
    if f is None or f.epsilon is None:
        return "ε = ∞ (no guarantee)"
    return f"ε = {epsilon_text(f.epsilon)} ({ACCOUNTANT_LABELS[f.accountant]}) and δ = {f.delta:g}"


def summary(
    ctx: RunContext,
    sites: Sequence[str],
    privacy: Privacy,
    fp: Fingerprints,
    checks: list[CheckResult],
) -> Summary:
    """The plain-language summary: what, on what, who saw what, the guarantee, the checks."""
    run = ctx.run
    lora = fp.lora
    fed = (run.config or {}).get("federation") or {}
    centralized = run_kind(run) == "centralized"
    how = (
        "on the pooled data of all sites in one place (the centralized baseline)"
        if centralized
        else f"by federated training over {len(ctx.site_names())} sites "
        f"({fed.get('aggregation', 'FedAvg')}), {len(run.metrics)} rounds"
    )
    model = fp.base_model
    trained = (
        f"A LoRA adapter (rank {lora.get('r')}, alpha {lora.get('alpha')}, on "
        f"{', '.join(lora.get('target_modules') or []) or 'the family default modules'}) for "
        f"{fp.task or 'an unrecorded task'} on the frozen base model {model.name} (weights "
        f"sha256 {(model.sha256 or 'not recorded')[:16]}…), trained {how}."
    )
    if run.incomplete:
        trained = f"INCOMPLETE: {run.incomplete}. {trained}"
    data = "; ".join(
        f"{d.site}: {d.train_rows if d.train_rows is not None else '?'} training and "
        f"{d.eval_rows if d.eval_rows is not None else '?'} evaluation records"
        for d in fp.datasets
    )
    if centralized:
        saw = [
            "All sites' records were pooled in one place: this run is a baseline for "
            "comparison, not a federation; no site kept its data.",
        ]
    else:
        saw = [
            "Each site kept its records: no record, text or label left a site.",
            *_coordinator_saw(run.config),
        ]
    if centralized:
        saw.append(
            "Whoever receives the final adapter or a round's checkpoint sees a model "
            "trained on the pooled records."
        )
    else:
        saw.append(
            "Whoever receives the final adapter or a round's checkpoint sees the aggregate of "
            "the sites' updates" + (", noised for site-level DP." if privacy.central else ".")
        )

    def where(site: str) -> str:
        return "of the pooled data" if site == POOLED else f"at {site}"

    guarantees = []
    for sp in privacy.sites:
        if sp.dp_enabled:
            guarantees.append(
                f"Each record {where(sp.site)} is protected by (ε, δ)-DP with "
                f"{_eps_text(sp.epsilon)}, against anyone who sees the adapters."
            )
        elif sp.rounds_trained:
            guarantees.append(f"Records {where(sp.site)} have no DP guarantee: trained without DP.")
        else:
            guarantees.append(f"{sp.site} trained nothing in this job (no update accepted).")
    if privacy.central:
        c = privacy.central
        guarantees.append(
            f"Each site as a whole is protected by (ε, δ)-DP with {_eps_text(c.epsilon)} in "
            "the adapters the coordinator releases (not against the coordinator itself)."
        )
    failed = [c for c in checks if not c.passed and not c.inconclusive]
    open_ = [c for c in checks if c.inconclusive]
    line = (
        f"All {len(checks)} checks passed."
        if not failed and not open_
        else f"{len(checks) - len(open_)} of {len(checks)} checks passed; {open_[0].detail}"
        if not failed
        else f"{len(failed)} of {len(checks)} checks FAILED; first: {failed[0].name}: "
        f"{failed[0].detail}"
    )
    return Summary(
        trained=trained,
        data=data,
        who_saw_what=saw,
        guarantees=guarantees,
        checks_passed=not failed and not open_,
        checks_line=line,
    )


def secure_aggregation_on(config: dict[str, Any] | None) -> bool:
    """Whether the job config (job.json) ran with ``federation.secure_aggregation``."""
    return bool(((config or {}).get("federation") or {}).get("secure_aggregation"))


def _coordinator_saw(config: dict[str, Any] | None) -> list[str]:
    if secure_aggregation_on(config):
        return [
            "Secure aggregation was on: every round the coordinator learned only the "
            "records-weighted sum of the updates of the sites that completed the protocol "
            "(listed per round in metrics.jsonl, secure_aggregation.survivors) and their total "
            "record count, never one site's adapter or update.",
            "With its training reply each site sent in the clear its record count, training "
            "loss, evaluation loss and accuracy and its DP parameters; these numbers are not "
            "protected by DP or by secure aggregation.",
        ]
    return [
        "The coordinator saw each site's adapter update every round, individually: "
        "protected by DP-SGD at the site, but not hidden among the others (secure "
        "aggregation was off for this job).",
        "With each update the coordinator received the site's record count, training "
        "loss, evaluation loss and accuracy and its DP parameters; these numbers are not "
        "protected by DP.",
    ]


def _coordinator_trust(config: dict[str, Any] | None) -> str:
    if secure_aggregation_on(config):
        return (
            "The coordinator is trusted to aggregate and to log honestly, not with data, and "
            "to follow the secure-aggregation protocol: it saw only the sum of the sites' "
            "masked updates, which sites took part in each round, and each site's metrics and "
            "DP fields. The protocol is the semi-honest variant: a coordinator that lies about "
            "who dropped out or forges keys is not defended against, and it cannot screen "
            "single updates for outliers."
        )
    return (
        "The coordinator is trusted to aggregate and to log honestly, not with data: it sees "
        "each site's DP-protected update in the clear (secure aggregation was off)."
    )


def _minimums_trust(ctx: RunContext) -> str:
    """The records each site's policy required before it trained and before it reported
    evaluation figures, as its policy in force for the job says."""
    keys = ("min_train_records", "min_eval_records")
    found = {}
    for site, loc in ctx.run.sites.items():
        if loc.policy is not None:
            found[site] = tuple(loc.policy.get(k) for k in keys)
    if not found:
        return "No site policy applied, so no minimum of training or evaluation records did."
    if any(None in v for v in found.values()):
        return (
            "The site policies of this run predate min_train_records and min_eval_records: "
            "no minimum of training or evaluation records was enforced, and a site may have "
            "reported the loss of a single record."
        )
    per_site = "; ".join(f"{s}: {t} and {e}" for s, (t, e) in sorted(found.items()))
    return (
        "Each site trained only with at least min_train_records training records and sent "
        "evaluation figures only over at least min_eval_records evaluation records (withheld "
        f"otherwise), as its policy set them ({per_site}). These minimums keep a figure sent in "
        "the clear from being one record's own value; they are not a privacy guarantee (one "
        "record still moves a mean of n records by up to 1/n of its range)."
    )


def trust_model(ctx: RunContext, privacy: Privacy) -> list[str]:
    """Who has to be trusted with what for the stated guarantees to hold."""
    items = [
        "Each site runs fedslm's training itself and decides by its own policy; the "
        "record-level guarantee assumes that code ran DP-SGD with the noise, clipping and "
        "sampling shown (Poisson sampling, per-example clipping, Gaussian noise).",
        _coordinator_trust(ctx.run.config),
        "Record-level DP covers everything derived from training records through the "
        "adapters, against anyone: the coordinator, other sites, whoever gets the adapter. It "
        "does not cover the metrics sent in the clear (losses, accuracy, counts), and the "
        "evaluation records are not protected by it at all.",
        "Each site's ledger is hash-chained and privacy.json records its head, so an edit, "
        "deletion or reordering of entries is detected. Each site signs its own report with "
        "its key, and `fedslm verify --keys` checks that signature against the site's public "
        "key as the auditor holds it, never one stored in the run: someone who rewrites a "
        "ledger, privacy.json and the reports together is detected by the sites' signatures "
        "only. In a simulation the operator holds every site's key, so there the signatures "
        "show only that the operator made the report.",
        "Noise comes from non-cryptographic random number generators (see the caveats).",
        _minimums_trust(ctx),
    ]
    if privacy.central:
        items.append(
            "Site-level (central) DP assumes the coordinator added its noise as stated; it "
            "protects each site from those who receive the released adapters, not from the "
            "coordinator, which sees every update before noising."
        )
    return items


def notes(ctx: RunContext) -> list[str]:
    """What the run's files do not allow this report to check."""
    run = ctx.run
    out = [
        "metrics.jsonl logs each site's epsilon per round without its accountant or delta; "
        "the report takes both from privacy.json (the site's accountant).",
        "privacy.json lists each site's segments without their round numbers; the report "
        "takes rounds from the site's ledger.",
        "The base model's weights sha256 is as job.json and fedslm_adapter.json record it; "
        "the report does not rehash the model files.",
        "The evaluation files are fingerprinted here but not in any ledger (evaluation is "
        "not DP and spends no budget).",
    ]
    no_dp = [
        s for s, p in run.privacy["sites"].items() if p.get("rounds") and not p.get("dp_enabled")
    ]
    if no_dp:
        out.append(
            f"{', '.join(no_dp)} trained without DP: privacy.json records no ledger head for "
            "them (sites send it with DP only), so their ledgers are checked by their own "
            "hash chain alone."
        )
    if run.manifest is None:
        out.append(
            "This run has no job.json (fedslm centralized does not write one): the job "
            "config hash cannot be recomputed, and policies are read from sites/*/policy.yaml."
        )
    return out
