"""The checks a report states and ``fedslm verify`` re-runs, each against the run's own files.

A check is a name, a sentence saying what it checks, and a function of the run that returns
the first :class:`Discrepancy` it finds (or None). They run in the order of ``CHECKS``; a new
check (e.g. each site's ECDSA signature over its messages) is one more :class:`Check` passed
to :func:`register_check`, and then appears in every report and every verification.

Epsilons are recomputed from the logged (q, sigma, steps) segments with an accountant other
than the one that reported them: PLD for record-level DP, the exact closed form for central DP.
They must agree within ``EPSILON_TOLERANCE`` (the accountants' discretisation, as the
coordinator allows); every other figure must agree exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fedslm.audit import AUDIT_JSON, CANARIES_JSON, MIN_CONTROL_EPSILON
from fedslm.audit.bound import LEVEL, Bound, best_bound, count_correct
from fedslm.config import config_fingerprint
from fedslm.errors import DataError
from fedslm.privacy.accounting import EPSILON_TOLERANCE, Segment, epsilon, gaussian_epsilon
from fedslm.report.model import CheckResult
from fedslm.report.runfiles import (
    ADAPTER_DIR,
    ADAPTER_META,
    MANIFEST_FILE,
    METRICS_FILE,
    PRIVACY_FILE,
    RunContext,
    adapter_tensors,
    read_json,
)

_EXACT = 1e-9  # floats that are the same number written twice (products, sums)


@dataclass(frozen=True)
class Discrepancy:
    """The first thing that does not add up: where, which field, stored vs expected."""

    file: str
    site: str | None
    field: str
    stored: Any = None
    expected: Any = None
    note: str = ""
    expected_label: str = "recomputed"
    # not a wrong figure but a check that cannot conclude (an audit without power): the
    # report shows it as not passed, verify does not fail the run for it
    inconclusive: bool = False

    def __str__(self) -> str:
        where = self.file + (f", site {self.site}" if self.site else "")
        text = f"{where}: field {self.field}"
        if self.stored is not None or self.expected is not None:
            text += f": stored {_fmt(self.stored)}, {self.expected_label} {_fmt(self.expected)}"
        return text + (f" ({self.note})" if self.note else "")


CheckFn = Callable[[RunContext, Sequence[str]], Discrepancy | None]


@dataclass(frozen=True)
class Check:
    """One check over the run's files for the given sites."""

    name: str
    description: str
    fn: CheckFn
    # whether the run has what the check is about (None: every run); a check that does not
    # apply is left out of the report and of verify
    applies: Callable[[RunContext], bool] | None = None

    def applicable(self, ctx: RunContext) -> bool:
        """Whether this check runs on ``ctx``'s run."""
        return self.applies is None or self.applies(ctx)

    def find(self, ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
        """The first discrepancy, or None. A field a check cannot read is a discrepancy too:
        the files were edited (or written by an incompatible fedslm)."""
        try:
            return self.fn(ctx, sites)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return Discrepancy(
                "run files", None, "a field this check reads", note=f"{type(exc).__name__}: {exc}"
            )

    def run(self, ctx: RunContext, sites: Sequence[str]) -> CheckResult:
        """Run it; the result names the first discrepancy, or what was checked."""
        found = self.find(ctx, sites)
        detail = str(found) if found else f"ok ({', '.join(sites) or 'no sites'})"
        inconclusive = found is not None and found.inconclusive
        return CheckResult(
            name=self.name,
            description=self.description,
            passed=found is None,
            detail=f"inconclusive: {detail}" if inconclusive else detail,
            inconclusive=inconclusive,
        )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    return "missing" if v is None else repr(v) if isinstance(v, str) else str(v)


def _eps(v: Any) -> float:
    """An epsilon as JSON holds it: null is infinite (write_json turns inf into null)."""
    return math.inf if v is None else float(v)


def eps_close(stored: Any, recomputed: float, rel: float = EPSILON_TOLERANCE) -> bool:
    """Whether a stored epsilon agrees with a recomputation (infinite only with infinite)."""
    try:
        a = _eps(stored)
    except (TypeError, ValueError):
        return False
    if math.isinf(a) or math.isinf(recomputed):
        return a == recomputed
    return math.isclose(a, recomputed, rel_tol=rel, abs_tol=1e-9)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=_EXACT, abs_tol=0.0)
    return a == b


def _dp_sites(ctx: RunContext, sites: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for s in sites:
        p = ctx.run.privacy["sites"].get(s)
        if isinstance(p, dict) and p.get("dp_enabled"):
            out.append((s, p))
    return out


def _segments(entry: dict[str, Any]) -> list[Segment]:
    return [Segment(float(g["q"]), float(g["sigma"]), int(g["steps"])) for g in entry["segments"]]


# --------------------------------------------------------------------------------------------
# The checks


def check_ledger_chain(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """Each site's ledger opens, its hash chain is intact and every stored epsilon recomputes."""
    for s in sites:
        view = ctx.ledger(s)
        if view is None:
            continue
        if view.error is not None:
            if not view.path.exists() and not ctx.trained_rounds(s):
                continue  # a site that never trained may never have opened a ledger
            return Discrepancy(ctx.run.rel(view.path), s, "ledger file", note=view.error)
        if view.problems:
            return Discrepancy(ctx.run.rel(view.path), s, "ledger entries", note=view.problems[0])
    return None


def check_egress_log(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """Each site's egress log has an intact chain, and every training update the coordinator
    accepted was logged as sent, carrying exactly the adapter's tensor names and shapes."""
    from fedslm.privacy.egress_log import egress_entries, verify_egress
    from fedslm.privacy.ledger import LedgerError, PrivacyLedger

    weights = ctx.run.adapter_weights
    agreed = {t.name: list(t.shape) for t in adapter_tensors(weights)} if weights.is_file() else {}
    for s in sites:
        loc = ctx.run.sites.get(s)
        trained = ctx.trained_rounds(s)
        if loc is None or not trained:
            continue
        where = ctx.run.rel(loc.ledger)
        try:
            with PrivacyLedger(loc.ledger, create=False) as ledger:
                problems = verify_egress(ledger)
                sent = {
                    e.round: e
                    for e in egress_entries(ledger, ctx.run.job_id)
                    if e.kind == "train" and e.status == "sent"
                }
        except LedgerError as exc:
            return Discrepancy(where, s, "egress log", note=str(exc))
        if problems:
            return Discrepancy(where, s, "egress log", note=problems[0])
        if not sent:
            continue  # a run made before sites logged their messages: nothing to compare
        for r in trained:
            if r not in sent:
                return Discrepancy(
                    where, s, f"egress log, round {r}", note="an update the coordinator "
                    "accepted has no 'sent' record in the site's egress log"
                )  # fmt: skip
            shapes = {t["name"]: list(t["shape"]) for t in sent[r].record.get("tensors", [])}
            if agreed and shapes != agreed:
                return Discrepancy(
                    where, s, f"egress log, round {r}: tensors", sorted(shapes), sorted(agreed),
                    expected_label="the adapter has",
                )  # fmt: skip
    return None


def check_ledger_head(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """privacy.json's ledger head is the hash of the ledger entry of the site's last accepted
    round. Later entries may exist: other jobs on the same data set, or a round the site ran
    but the coordinator did not accept; the chain check covers them."""
    for s, p in _dp_sites(ctx, sites):
        view = ctx.ledger(s)
        accepted = ctx.accepted_entries(s)
        expected = accepted[-1].hash if accepted else None
        field = f"sites.{s}.ledger_head"
        if p.get("ledger_head") != expected:
            last = view.entries[-1].hash if view and view.entries else None
            return Discrepancy(
                PRIVACY_FILE,
                s,
                field,
                p.get("ledger_head"),
                expected,
                note=f"ledger {ctx.run.rel(view.path) if view else '?'} last entry is {last}",
                expected_label="ledger has",
            )
    return None


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


def check_segments(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """privacy.json's segments, steps, noise, sampling rate, delta and accountant per site are
    the ledger's entries for the rounds the coordinator accepted (metrics.jsonl)."""
    for s, p in _dp_sites(ctx, sites):
        entries = ctx.accepted_entries(s)
        stored = p.get("segments") or []
        base = f"sites.{s}"
        if len(stored) != len(entries):
            return Discrepancy(
                PRIVACY_FILE,
                s,
                f"{base}.segments (count)",
                len(stored),
                len(entries),
                expected_label="ledger has",
            )
        for i, (g, e) in enumerate(zip(stored, entries, strict=True)):
            for key in ("q", "sigma", "steps"):
                if not _same(g.get(key), getattr(e, key)):
                    return Discrepancy(
                        PRIVACY_FILE,
                        s,
                        f"{base}.segments[{i}].{key}",
                        g.get(key),
                        getattr(e, key),
                        note=f"ledger seq {e.seq}, round {e.round}",
                        expected_label="ledger has",
                    )
        if not entries:
            continue
        figures = {
            "dp_steps": sum(e.steps for e in entries),
            "noise_multiplier": entries[0].sigma,
            "sample_rate": entries[0].q,
            "delta": entries[-1].delta,
            "accountant": entries[-1].accountant,
            "rounds": len(entries),
        }
        for key, value in figures.items():
            if not _same(p.get(key), value):
                return Discrepancy(
                    PRIVACY_FILE,
                    s,
                    f"{base}.{key}",
                    p.get(key),
                    value,
                    expected_label="ledger has",
                )
    return None


def check_site_epsilons(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """Every record-level epsilon in privacy.json and metrics.jsonl, recomputed from the
    ledger's segments with PLD (RDP for the RDP figure); lifetime from all the ledger's
    entries up to the head."""
    for s, p in _dp_sites(ctx, sites):
        delta, acc = float(p["delta"]), str(p.get("accountant"))
        entries = ctx.accepted_entries(s)
        segs = [e.segment for e in entries]
        pld = epsilon(segs, delta, "pld")
        for key, value in (
            ("epsilon", pld),
            ("epsilon_recomputed_pld", pld),
            ("epsilon_rdp", epsilon(segs, delta, "rdp")),
        ):
            if not eps_close(p.get(key), value):
                label = "rdp" if key == "epsilon_rdp" else "pld"
                return Discrepancy(
                    PRIVACY_FILE,
                    s,
                    f"sites.{s}.{key}",
                    p.get(key),
                    value,
                    note=f"{acc if key == 'epsilon' else label} stored, {label} recomputed "
                    f"from {len(segs)} ledger segments at delta {delta:g}",
                )
        view = ctx.ledger(s)
        if entries and view is not None and p.get("lifetime_epsilon_site_reported") is not None:
            head = entries[-1]
            upto = [
                e.segment for e in view.entries if e.dataset == head.dataset and e.seq <= head.seq
            ]
            life = epsilon(upto, delta, "pld")
            if not eps_close(p["lifetime_epsilon_site_reported"], life):
                return Discrepancy(
                    PRIVACY_FILE,
                    s,
                    f"sites.{s}.lifetime_epsilon_site_reported",
                    p["lifetime_epsilon_site_reported"],
                    life,
                    note=f"{acc} stored, pld recomputed from {len(upto)} ledger entries",
                )
        for rec in ctx.run.metrics:
            logged = (rec.get("epsilon") or {}).get(s, "absent")
            if logged == "absent":
                continue
            k = rec["round"]
            upto_k = [e.segment for e in ctx.accepted_entries(s, k)]
            if not upto_k and logged is None:
                continue  # known to the coordinator (e.g. refused) but nothing trained yet
            value = epsilon(upto_k, delta, "pld")
            if not eps_close(logged, value):
                return Discrepancy(
                    METRICS_FILE,
                    s,
                    f"round {k} epsilon.{s}",
                    logged,
                    value,
                    note=f"{acc} stored, pld recomputed from {len(upto_k)} ledger segments",
                )
    return None


def check_central(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """Central (site-level) DP: every epsilon recomputed from (noise, rounds released, delta)
    with the exact closed form (and PLD, RDP for theirs); rounds released, roster and noise
    scale against metrics.jsonl and job.json."""
    c = ctx.run.privacy.get("central")
    if not c:
        return None
    try:
        sigma, delta, clip = float(c["noise_multiplier"]), float(c["delta"]), float(c["clip_norm"])
        rounds, denominator = int(c["rounds_released"]), int(c["denominator"])
    except (KeyError, TypeError, ValueError) as exc:
        return Discrepancy(PRIVACY_FILE, None, f"central.{exc}", note="missing or not a number")
    aggregated = [r["round"] for r in ctx.run.metrics if r.get("aggregated")]
    if rounds != len(aggregated):
        return Discrepancy(
            PRIVACY_FILE,
            None,
            "central.rounds_released",
            rounds,
            len(aggregated),
            note="rounds aggregated in metrics.jsonl",
            expected_label="metrics.jsonl has",
        )
    roster = len(ctx.run.sites) if ctx.run.manifest else None
    if roster is not None and denominator != roster:
        return Discrepancy(
            PRIVACY_FILE,
            None,
            "central.denominator",
            denominator,
            roster,
            expected_label="job.json sites",
            note="the mean divides by the roster size",
        )
    exact = gaussian_epsilon(sigma, rounds, delta)
    seg = [Segment(1.0, sigma, rounds)]
    for key, value, tol, how in (
        ("epsilon", exact, EPSILON_TOLERANCE, "exact closed form"),
        ("epsilon_analytic", exact, 1e-6, "exact closed form"),
        ("epsilon_recomputed_pld", epsilon(seg, delta, "pld"), EPSILON_TOLERANCE, "pld"),
        ("epsilon_rdp", epsilon(seg, delta, "rdp"), EPSILON_TOLERANCE, "rdp"),
    ):
        # the coordinator accepts an infinite reported epsilon (beyond the accountant's range)
        if key == "epsilon" and c.get(key) is None:
            continue
        if not eps_close(c.get(key), value, tol):
            return Discrepancy(
                PRIVACY_FILE,
                None,
                f"central.{key}",
                c.get(key),
                value,
                note=f"{how}, noise {sigma:g}, {rounds} rounds, delta {delta:g}",
            )
    std = sigma * clip / denominator
    if not _same(c.get("noise_std_of_mean"), std):
        return Discrepancy(
            PRIVACY_FILE, None, "central.noise_std_of_mean", c.get("noise_std_of_mean"), std
        )
    done = 0
    for rec in ctx.run.metrics:
        done += bool(rec.get("aggregated"))
        if "central_epsilon" in rec:
            value = gaussian_epsilon(sigma, done, delta)
            if rec["central_epsilon"] is not None and not eps_close(rec["central_epsilon"], value):
                return Discrepancy(
                    METRICS_FILE,
                    None,
                    f"round {rec['round']} central_epsilon",
                    rec["central_epsilon"],
                    value,
                    note=f"exact closed form, {done} rounds",
                )
        logged = (rec.get("central_dp") or {}).get("noise_std_of_mean")
        if logged is not None and not _same(logged, std):
            return Discrepancy(
                METRICS_FILE,
                None,
                f"round {rec['round']} central_dp.noise_std_of_mean",
                logged,
                std,
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
    for s, _ in _dp_sites(ctx, sites):
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


def check_policy(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """What each site spent and sent is within the policy in force (job.json): per-job and
    lifetime epsilon, delta, noise, bytes per round, rounds."""
    for s, p in _dp_sites(ctx, sites):
        loc = ctx.run.sites.get(s)
        policy = (loc.policy if loc else None) or {}
        limits = policy.get("privacy") or {}
        if not limits:
            continue
        delta, acc = float(p["delta"]), p["accountant"]
        view = ctx.ledger(s)
        lifetime = math.nan
        if view is not None and view.entries:
            ds = view.bound_dataset or view.entries[-1].dataset
            # up to this job's last entry: later jobs on the data set answer to their own runs
            last = max((e.seq for e in ctx.job_entries(s)), default=None)
            upto = [e for e in view.entries if e.dataset == ds and (last is None or e.seq <= last)]
            lifetime = epsilon([e.segment for e in upto], delta, acc)
        comparisons = [
            ("epsilon", _eps(p.get("epsilon")), "max_epsilon_per_job", True),
            ("lifetime epsilon (ledger, jobs up to this)", lifetime, "lifetime_epsilon", True),
            ("delta", delta, "max_delta", True),
            ("noise_multiplier", float(p["noise_multiplier"]), "min_noise_multiplier", False),
        ]
        for field, value, limit_key, is_max in comparisons:
            limit = limits.get(limit_key)
            if limit is None or math.isnan(value):
                continue
            if (value > limit) if is_max else (value < limit):
                return Discrepancy(
                    PRIVACY_FILE,
                    s,
                    field,
                    value,
                    limit,
                    expected_label=f"policy privacy.{limit_key} is",
                    note="outside the site's policy",
                )
    for s in sites:
        loc = ctx.run.sites.get(s)
        cap = ((loc.policy if loc else None) or {}).get("max_bytes_per_round")
        for rec in ctx.run.metrics:
            sent = (rec.get("bytes_sent") or {}).get(s)
            if cap is not None and sent is not None and sent > cap:
                return Discrepancy(
                    METRICS_FILE,
                    s,
                    f"round {rec['round']} bytes_sent",
                    sent,
                    cap,
                    expected_label="policy max_bytes_per_round is",
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
    for s, p in _dp_sites(ctx, sites):
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


# --------------------------------------------------------------------------------------------
# The Empirical check (``fedslm audit``): only for a run folder that holds audit.json

# the bound's bisection stops within 1e-6; a recomputation on another machine may land elsewhere
# in that interval, while any edit worth making moves a bound by far more
_BOUND_TOLERANCE = 1e-5


def has_audit(ctx: RunContext) -> bool:
    """Whether the run folder holds ``fedslm audit``'s result (the report's Empirical check)."""
    return (ctx.run.root / AUDIT_JSON).is_file()


def _audit(ctx: RunContext) -> dict[str, Any]:
    return read_json(ctx.run.root / AUDIT_JSON)


def _audit_bound(audit: dict[str, Any], arm: str) -> Bound:
    """One arm's bound recomputed from audit.json's m, (r, v) per r, delta and confidence."""
    run = audit[arm]
    counts = {int(r): int(g["correct"]) for r, g in run["per_guesses"].items()}
    level = 1.0 - float(run["confidence"])
    return best_bound(int(audit["canaries"]), counts, float(run["delta"]), level)


def _recount(ctx: RunContext, audit: dict[str, Any]) -> Discrepancy | None:
    """When the audit folder holds canaries.json (scores and inclusion bits), every v of
    audit.json recounted from it."""
    path = ctx.run.root / CANARIES_JSON
    if not path.is_file():
        return None
    rows = read_json(path)["canaries"]
    bits = [bool(c["included"]) for c in rows]
    for key, stored, value in (
        ("canaries", audit["canaries"], len(rows)),
        ("included", audit["included"], sum(bits)),
    ):
        if stored != value:
            return Discrepancy(
                AUDIT_JSON, audit["site"], key, stored, value, expected_label=f"{CANARIES_JSON} has"
            )
    for arm in ("audited", "control"):
        stored_v = {int(r): g["correct"] for r, g in audit[arm]["per_guesses"].items()}
        scores = [float(c[f"score_{arm}"]) for c in rows]
        for r, v in count_correct(scores, bits, list(stored_v)).items():
            if stored_v[r] != v:
                return Discrepancy(
                    AUDIT_JSON,
                    audit["site"],
                    f"{arm}.per_guesses.{r}.correct",
                    stored_v[r],
                    v,
                    expected_label=f"recounted from {CANARIES_JSON}'s scores and inclusion bits",
                )
    return None


def check_empirical_bounds(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """Every lower bound of audit.json recomputed with ``fedslm.audit.bound`` from the recorded
    m, (r, v) per r, delta and confidence; each v recounted from canaries.json when the folder
    holds it."""
    audit = _audit(ctx)
    site = audit["site"]
    found = _recount(ctx, audit)
    if found is not None:
        return found
    for arm in ("audited", "control"):
        run = audit[arm]
        if not math.isclose(float(run["confidence"]), 1.0 - LEVEL, abs_tol=_EXACT):
            return Discrepancy(
                AUDIT_JSON,
                site,
                f"{arm}.confidence",
                run["confidence"],
                1.0 - LEVEL,
                expected_label="fedslm audit uses",
            )
        bound = _audit_bound(audit, arm)
        for r, (v, value) in bound.per_r.items():
            stored = run["per_guesses"][str(r)]["lower_bound"]
            if not math.isclose(float(stored), value, rel_tol=0.0, abs_tol=_BOUND_TOLERANCE):
                return Discrepancy(
                    AUDIT_JSON,
                    site,
                    f"{arm}.per_guesses.{r}.lower_bound",
                    stored,
                    value,
                    note=f"m={audit['canaries']}, r={r}, v={v}, delta {run['delta']:g}, "
                    f"{len(bound.per_r)} r at level {bound.level:g} (Bonferroni)",
                )
        for key, value in (
            ("lower_bound", bound.epsilon),
            ("guesses", bound.guesses),
            ("correct", bound.correct),
        ):
            if not math.isclose(float(run[key]), value, rel_tol=0.0, abs_tol=_BOUND_TOLERANCE):
                return Discrepancy(
                    AUDIT_JSON, site, f"{arm}.{key}", run[key], value, note="the best r scanned"
                )
    return None


def check_empirical_claim(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """The audited run's empirical lower bound does not exceed the epsilon its site's ledger
    claims (privacy.json, checked against the ledger by ``site-epsilon``); audit.json records
    that epsilon and delta."""
    audit = _audit(ctx)
    site, run = audit["site"], audit["audited"]
    p = ctx.run.privacy["sites"].get(site)
    if not isinstance(p, dict) or not p.get("dp_enabled"):
        return Discrepancy(
            PRIVACY_FILE,
            site,
            f"sites.{site}.dp_enabled",
            None if not isinstance(p, dict) else p.get("dp_enabled"),
            True,
            expected_label="audit.json audited a DP run at this site:",
        )
    claimed, bound = _eps(p["epsilon"]), _audit_bound(audit, "audited")
    for key, value, close in (
        ("formal_epsilon", claimed, eps_close(run["formal_epsilon"], claimed)),
        ("delta", p["delta"], _same(run["delta"], p["delta"])),
    ):
        if not close:
            return Discrepancy(
                AUDIT_JSON,
                site,
                f"audited.{key}",
                run[key],
                value,
                expected_label=f"{PRIVACY_FILE} has",
            )
    violation = bound.epsilon > claimed
    if violation:
        return Discrepancy(
            AUDIT_JSON,
            site,
            "audited.lower_bound",
            note=f"empirical lower bound {bound.epsilon:.3f} exceeds the claimed epsilon "
            f"{claimed:.3f} ({p.get('accountant')}, {PRIVACY_FILE}) at "
            f"{1 - bound.level:.0%} confidence: the DP pipeline does not deliver the privacy "
            "its ledger records",
        )
    if audit["violation"] is not violation:
        return Discrepancy(AUDIT_JSON, site, "violation", audit["violation"], violation)
    return None


def check_empirical_power(ctx: RunContext, sites: Sequence[str]) -> Discrepancy | None:
    """The control (the same job and canaries with DP off) reached a clearly positive lower
    bound (at least ``MIN_CONTROL_EPSILON``), else the audit could not have seen a leak and
    the check is inconclusive."""
    audit = _audit(ctx)
    site, control = audit["site"], audit["control"]
    if control["dp"] is not False:
        return Discrepancy(
            AUDIT_JSON,
            site,
            "control.dp",
            control["dp"],
            False,
            expected_label="a control is trained with DP off:",
        )
    bound = _audit_bound(audit, "control")
    recorded_bar = float(audit["min_control_epsilon"])
    if audit["has_power"] is not (bound.epsilon >= recorded_bar):
        return Discrepancy(
            AUDIT_JSON,
            site,
            "has_power",
            audit["has_power"],
            bound.epsilon >= recorded_bar,
            note=f"control bound {bound.epsilon:.3f}, min_control_epsilon {recorded_bar:g}",
        )
    # the bar is never below fedslm's: a lowered min_control_epsilon does not make power
    bar = max(recorded_bar, MIN_CONTROL_EPSILON)
    if bound.epsilon < bar:
        lowered = (
            f" (the audit was run with a bar of {recorded_bar:g})" if recorded_bar < bar else ""
        )
        return Discrepancy(
            AUDIT_JSON,
            site,
            "control.lower_bound",
            note=f"the control (DP off) reached only {bound.epsilon:.3f}, below "
            f"{bar:g}{lowered}: the audit had no power to see a leak, so it says nothing about "
            "this run; audit again with more canaries or longer training",
            inconclusive=True,
        )
    return None


CHECKS: list[Check] = [
    Check(
        "ledger-chain",
        "each site's ledger: hash chain intact, every stored epsilon "
        "recomputes (PrivacyLedger.verify)",
        check_ledger_chain,
    ),
    Check(
        "ledger-head",
        "privacy.json's ledger head per site is that site's ledger entry "
        "for its last accepted round",
        check_ledger_head,
    ),
    Check(
        "data-set",
        "each site's training file has the sha256 and row count its ledger is keyed by",
        check_dataset,
    ),
    Check(
        "segments",
        "privacy.json's DP segments, steps, noise, sampling rate, delta and "
        "accountant are the ledger's",
        check_segments,
    ),
    Check(
        "site-epsilon",
        "every record-level epsilon (privacy.json, metrics.jsonl) "
        "recomputed from the ledger's segments with PLD",
        check_site_epsilons,
    ),
    Check(
        "central-epsilon",
        "every site-level epsilon recomputed with the exact closed form "
        "(and PLD, RDP); rounds released and noise scale",
        check_central,
    ),
    Check(
        "job-identity",
        "job config sha256, job id, base model sha256 and LoRA agree "
        "across privacy.json, job.json, the adapter and the ledgers",
        check_job_identity,
    ),
    Check(
        "policy",
        "spend, delta, noise and bytes per round are within each site's policy",
        check_policy,
    ),
    Check(
        "egress-log",
        "each site's egress log is intact and holds a 'sent' record with the adapter's "
        "tensors for every update the coordinator accepted",
        check_egress_log,
    ),
    Check(
        "metrics",
        "metrics.jsonl rounds in order, byte counts consistent, records equal "
        "the training files' rows",
        check_metrics,
    ),
    Check(
        "empirical-bounds",
        "fedslm audit's lower bounds (audit.json) recomputed from m, (r, v) per r, delta and "
        "confidence; v recounted from canaries.json when present",
        check_empirical_bounds,
        has_audit,
    ),
    Check(
        "empirical-claim",
        "the audited run's empirical lower bound does not exceed the epsilon its ledger claims",
        check_empirical_claim,
        has_audit,
    ),
    Check(
        "empirical-power",
        "the audit's control (DP off) reached a clearly positive lower bound "
        "(else inconclusive: the audit had no power)",
        check_empirical_power,
        has_audit,
    ),
]


def register_check(check: Check) -> None:
    """Add a check (e.g. per-site signatures); it then runs in every report and verify."""
    if any(c.name == check.name for c in CHECKS):
        raise ValueError(f"a check named {check.name!r} is already registered")
    CHECKS.append(check)


def run_checks(
    ctx: RunContext, sites: Sequence[str], names: Sequence[str] | None = None
) -> list[CheckResult]:
    """Every registered check that applies to the run, over ``sites`` in order, or only
    those ``names``."""
    return [
        c.run(ctx, sites)
        for c in CHECKS
        if (names is None or c.name in names) and c.applicable(ctx)
    ]


def first_failure(
    ctx: RunContext, sites: Sequence[str], inconclusive: list[str] | None = None
) -> tuple[str, Discrepancy] | None:
    """The first check that fails, with its discrepancy, or None (stops at the first).
    An inconclusive check does not fail; it is appended to ``inconclusive`` if given."""
    for c in CHECKS:
        if not c.applicable(ctx):
            continue
        found = c.find(ctx, sites)
        if found is not None and found.inconclusive:
            if inconclusive is not None:
                inconclusive.append(f"{c.name} inconclusive: {found}")
        elif found is not None:
            return c.name, found
    return None
