"""``fedslm audit CONFIG``: the one-run privacy audit of a simulated job, with its control.

Two trainings of the job, in process, with the same ``Site`` and ``Coordinator`` code as every
other run (``fedslm.inprocess.run_job_in_process``): the *audited* run (the job as configured,
canaries in one site's training data) and the *control* (the same job and canaries with DP
off). Each canary is scored by how much the final global adapter lowered its loss against the
initial one; the highest-scoring ``r`` are guessed members; the right guesses give a lower
bound on epsilon (``fedslm.audit.bound``). The control must show a clearly positive bound
(the audit could see a leak), and the audited run's bound must not exceed the epsilon its
ledger claims.

The audit folder (``--out``) is the audited run's folder with ``audit.json`` and
``audit.md`` (the result), ``canaries.json`` (canaries, inclusion bits, scores: nowhere
else), ``baselines/control/`` (the control run) and ``ledgers/`` (throwaway ledgers of the
canary data sets; real ledgers are never opened).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedslm.artifacts import write_json, write_text
from fedslm.audit import (
    AUDIT_JSON,
    AUDIT_MD,
    CANARIES_JSON,
    DEFAULT_CANARIES,
    EXIT_NO_POWER,
    EXIT_OK,
    EXIT_VIOLATION,
    MIN_CONTROL_EPSILON,
)
from fedslm.audit.bound import LEVEL, Bound, best_bound, count_correct
from fedslm.audit.canaries import Canaries, data_refusal, make_canaries, with_canaries, word_pool
from fedslm.batching import Encoded, encode_classification, encode_instructions, sequential_batches
from fedslm.config import JobConfig, load_config
from fedslm.errors import ConfigError, FederationError
from fedslm.inprocess import build_site, run_job_in_process
from fedslm.job import JobPlan, make_coordinator, plan_job, preflight
from fedslm.lora_math import to_site_rank
from fedslm.models import set_adapter_state
from fedslm.privacy.private_training import check_delta
from fedslm.progress import Reporter
from fedslm.runfolder import is_inside, read_marker, write_marker
from fedslm.site import Site

CONTROL_DIR = Path("baselines") / "control"
COMMAND = "audit"
GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.5)  # of m: the r scanned by default
CAVEAT = (
    "An audit bounds epsilon from below and cannot certify it: a lower bound under the formal "
    "epsilon is expected of a correct pipeline and proves nothing about how tight the formal "
    "figure is; a lower bound above it proves the formal epsilon wrong (at 95% confidence)."
)


@dataclass(frozen=True)
class Arm:
    """One training run of the audit and what its canary scores show."""

    name: str  # "audited" or "control"
    dp: bool
    bound: Bound
    formal_epsilon: float | None  # what the canary site's ledger claims (None: DP off)
    accountant: str | None
    delta: float
    seconds: float
    scores: list[float] = field(repr=False)


@dataclass(frozen=True)
class AuditResult:
    """The audit's outcome; ``exit_code`` is what ``fedslm audit`` returns."""

    out: Path
    site: str
    canaries: int
    included: int
    audited: Arm
    control: Arm
    min_control_epsilon: float
    job_fingerprint: str

    @property
    def violation(self) -> bool:
        """The audited run's lower bound exceeds the epsilon its ledger claims."""
        claimed = self.audited.formal_epsilon
        return claimed is not None and self.audited.bound.epsilon > claimed

    @property
    def has_power(self) -> bool:
        """The control (DP off) showed a clearly positive bound."""
        return self.control.bound.epsilon >= self.min_control_epsilon

    @property
    def exit_code(self) -> int:
        """0 passed, 1 the formal epsilon is contradicted, 3 no power (inconclusive)."""
        if self.violation:
            return EXIT_VIOLATION
        return EXIT_OK if self.has_power else EXIT_NO_POWER

    @property
    def verdict(self) -> str:
        """One line saying what the audit found."""
        a, c = self.audited, self.control
        if self.violation:
            return (
                f"FAILED: the empirical lower bound {a.bound.epsilon:.3f} exceeds the claimed "
                f"epsilon {a.formal_epsilon:.3f} ({a.accountant}): the DP pipeline does not "
                "deliver the privacy its ledger records (e.g. noise not applied)"
            )
        if not self.has_power:
            return (
                f"NO POWER: the control (DP off) reached only {c.bound.epsilon:.3f} (needs "
                f"{self.min_control_epsilon:g}); the audit could not have seen a leak, so it "
                "says nothing about this run; use more canaries (--canaries) or train longer"
            )
        return (
            f"passed: lower bound {a.bound.epsilon:.3f} <= claimed epsilon "
            f"{a.formal_epsilon:.3f} ({a.accountant}); control {c.bound.epsilon:.3f} shows "
            "the audit had power"
        )

    def to_json(self) -> dict[str, Any]:
        """``audit.json``: aggregate figures only (no canary, no inclusion bit)."""

        def arm(a: Arm) -> dict[str, Any]:
            return {
                "dp": a.dp,
                "lower_bound": a.bound.epsilon,
                "confidence": 1 - a.bound.level,
                "guesses": a.bound.guesses,
                "correct": a.bound.correct,
                "per_guesses": {
                    str(r): {"correct": v, "lower_bound": eps}
                    for r, (v, eps) in a.bound.per_r.items()
                },
                "formal_epsilon": a.formal_epsilon,
                "accountant": a.accountant,
                "delta": a.delta,
                "seconds": round(a.seconds, 2),
            }

        return {
            "format": "fedslm-audit",
            "version": 1,
            "method": "Steinke, Nasr, Jagielski 2023, one training run (member guesses only)",
            "job_fingerprint": self.job_fingerprint,
            "site": self.site,
            "canaries": self.canaries,
            "included": self.included,
            "audited": arm(self.audited),
            "control": arm(self.control),
            "min_control_epsilon": self.min_control_epsilon,
            "violation": self.violation,
            "has_power": self.has_power,
            "verdict": self.verdict,
            "caveat": CAVEAT,
        }


def run_audit(
    config: Path,
    out: Path,
    *,
    overrides: Sequence[str] = (),
    canaries: int = DEFAULT_CANARIES,
    site: str | None = None,
    guesses: Sequence[int] | None = None,
    seed: int | None = None,
    min_control_epsilon: float = MIN_CONTROL_EPSILON,
    overwrite: bool = False,
    allow_site_data: bool = False,
    reporter: Reporter | None = None,
    _remove_noise: bool = False,
) -> AuditResult:
    """Audit the job of ``config`` into the folder ``out``; see the module docstring.

    ``guesses`` are the r to scan (default: ``GUESS_FRACTIONS`` of ``canaries``); ``seed``
    draws the canaries and their inclusion (default: the job's seed). ``_remove_noise`` is a
    test hook, not reachable from a config or the command line: the audited run's DP optimizer
    adds no noise while its ledger records the calibrated noise (a broken pipeline the audit
    must catch).
    """
    reporter = reporter or Reporter(quiet=True)
    job = load_config(config, list(overrides))
    _refuse_unsafe(job, config, allow_site_data)
    plan = plan_job(job, str(config))
    names = [s.name for s in plan.sites]
    site = site or names[0]
    if site not in names:
        raise ConfigError(f"--site {site}: not a site of {config} (sites: {', '.join(names)})")
    r_values = _guesses(canaries, guesses)
    words = word_pool(_tokenizer(plan.model.path))
    drawn = make_canaries(job, words, plan.labels, canaries, job.seed if seed is None else seed)
    audited_plan = _audit_plan(plan, site, drawn)
    for s in audited_plan.sites:
        check_delta(job, len(s.train), f"{config} (site {s.name}, with canaries)")
    control_plan = _audit_plan(plan, site, drawn, dp=False)
    _prepare_out(out, [config, *plan.inputs()], overwrite)
    ledgers = out / "ledgers"
    refusals = preflight(audited_plan, ledgers / "audited")  # one line per site, named first
    refused = [r for r in refusals if r.startswith((f"site {site} ", f"site {site}:"))]
    if refused:
        raise FederationError(f"{config}: the audited site refuses the job: {refused[0]}")
    write_marker(out, COMMAND, str(config))
    reporter.info(
        f"audit: {canaries} canaries ({sum(drawn.included)} included) at site {site}; "
        f"guesses r in {r_values} -> {out}"
    )
    audited = _train_arm(
        "audited", audited_plan, out, ledgers / "audited", site, drawn, r_values, reporter,
        remove_noise=_remove_noise,
    )  # fmt: skip
    control = _train_arm(
        "control", control_plan, out / CONTROL_DIR, ledgers / "control", site, drawn, r_values,
        reporter,
    )  # fmt: skip
    result = AuditResult(
        out, site, canaries, sum(drawn.included), audited, control, min_control_epsilon,
        job.fingerprint(),
    )  # fmt: skip
    write_json(out / AUDIT_JSON, result.to_json())
    write_text(out / AUDIT_MD, audit_markdown(result))
    write_json(out / CANARIES_JSON, _canary_record(drawn, audited, control))
    return result


def _refuse_unsafe(job: JobConfig, config: Path, allow_site_data: bool) -> None:
    """Canaries never go into a deployed job or a real data set (``data_refusal``)."""
    if job.data.at_sites:
        raise ConfigError(
            f"{config}: data.at_sites is a deployed job (each site reads its own data); the "
            "audit inserts canaries and runs only on simulated data: never on a deployment"
        )
    if not job.privacy.enabled:
        raise ConfigError(f"{config}: privacy.enabled is false: the job claims no epsilon to audit")
    why = data_refusal(job, config)
    if why and not allow_site_data:
        raise ConfigError(why)


def _guesses(m: int, given: Sequence[int] | None) -> list[int]:
    values = (
        sorted(set(given)) if given else sorted({max(1, round(f * m)) for f in GUESS_FRACTIONS})
    )
    bad = [r for r in values if not 1 <= r <= m]
    if bad:
        raise ConfigError(f"--guesses {bad}: each must be between 1 and --canaries ({m})")
    return values


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _audit_plan(plan: JobPlan, site: str, canaries: Canaries, *, dp: bool = True) -> JobPlan:
    """``plan`` with the included canaries in ``site``'s training rows; ``dp=False``: the
    control, the same job with DP off. Site policies keep every rule but lose their ``ledger``
    path: the audit's spend goes to its own throwaway ledgers, never a real one."""
    job = plan.job
    if not dp:
        job = job.model_copy(update={"privacy": job.privacy.model_copy(update={"enabled": False})})
    sites = [with_canaries(s, canaries, job) if s.name == site else s for s in plan.sites]
    policies = {n: p.model_copy(update={"ledger": None}) for n, p in plan.policies.items()}
    return JobPlan(job, plan.source, policies, plan.model, sites, plan.labels)


def _prepare_out(out: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """``out`` must be new or empty, or an earlier audit folder with ``overwrite``. An audit
    folder's ledgers hold only its canary data sets' throwaway spend, so replacing it may
    delete them (a run folder's ``--overwrite`` never deletes a ledger)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder; choose another --out")
    for p in inputs:
        if is_inside(Path(p), out):
            raise ConfigError(f"--out {out}: holds this job's input {p}; choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(
            f"--out {out}: already holds files; choose another --out or pass --overwrite"
        )
    marker = read_marker(out)
    if marker is None or marker.get("command") != COMMAND:
        raise ConfigError(
            f"--out {out}: is not a fedslm audit folder, so --overwrite will not delete it; "
            "choose another --out"
        )
    shutil.rmtree(out)


def _train_arm(
    name: str,
    plan: JobPlan,
    out: Path,
    ledgers: Path,
    site: str,
    canaries: Canaries,
    r_values: list[int],
    reporter: Reporter,
    *,
    remove_noise: bool = False,
) -> Arm:
    """Write and train one arm; score the canaries; its bound."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if name != "audited":
        write_marker(out, COMMAND, plan.source)
    prepared = plan.write(out, ledgers)
    prepared.save()  # job.json, as a simulated run has it (the report reads the config there)
    write_marker(out, COMMAND, plan.source, {s.name: s.ledger for s in prepared.sites})
    dp = plan.job.privacy.enabled
    reporter.info(f"audit: {name} run (DP {'on' if dp else 'off'}) -> {out}")
    # the control is not a production job: no site policy (one may forbid DP off)
    sites = [build_site(prepared, s, with_policy=dp) for s in prepared.sites]
    target = next(s for s in sites if s.name == site)
    encoded = encode_canaries(target, canaries)
    initial = score_losses(target, target.initial_state(), encoded)
    coordinator = make_coordinator(prepared)
    with _noise_removed() if remove_noise else contextlib.nullcontext():
        summary = run_job_in_process(prepared, reporter, sites=sites, coordinator=coordinator)
    trained = score_losses(target, coordinator.state, encoded)
    scores = [a - b for a, b in zip(initial, trained, strict=True)]
    counts = count_correct(scores, canaries.included, r_values)
    p = summary["sites"][site]
    delta = plan.job.privacy.delta
    bound = best_bound(len(canaries), counts, delta, LEVEL)
    formal = p.get("epsilon") if p.get("dp_enabled") else None
    reporter.info(
        f"audit: {name}: lower bound {bound.epsilon:.3f} (r={bound.guesses}, "
        f"v={bound.correct}), formal epsilon {formal if formal is not None else 'none (DP off)'}"
    )
    accountant = p.get("accountant") if formal is not None else None
    return Arm(name, dp, bound, formal, accountant, delta, time.perf_counter() - start, scores)


def encode_canaries(site: Site, canaries: Canaries) -> Encoded:
    """The canaries tokenised as ``site`` tokenises its training rows."""
    job, tok = site.job, site.loaded.tokenizer
    d, n = job.data, job.train.max_length
    if job.task.type == "classification":
        texts = [row[d.text_column] for row in canaries.rows]
        labels = [row[d.label_column] for row in canaries.rows]
        ids = {label: i for i, label in enumerate(site.labels)}
        return encode_classification(tok, texts, labels, ids, n)
    prompts = [row[d.prompt_column] for row in canaries.rows]
    responses = [row[d.response_column] for row in canaries.rows]
    return encode_instructions(tok, prompts, responses, n, site.loaded.prompt_template)


@torch.no_grad()
def score_losses(site: Site, state: dict[str, torch.Tensor], data: Encoded) -> list[float]:
    """Each row's loss under adapter ``state`` (as ``site`` sees it, at its own rank)."""
    from fedslm.training import encoded_loss

    job = site.job
    if job.federation.aggregation == "exact":
        state = to_site_rank(state, job.lora.alpha, site.lora.r).state
    model = site.loaded.model
    set_adapter_state(model, state)
    model.eval()
    loss = encoded_loss(model, data, site.loaded.device)
    out: list[float] = []
    for index in sequential_batches(len(data), job.train.eval_batch_size):
        out.extend(float(x) for x in loss(index))
    return out


@contextlib.contextmanager
def _noise_removed() -> Iterator[None]:
    """A broken DP pipeline for the audit's own test: the optimizer is built with noise 0
    whatever the plan says, while the plan (and so the ledger) keeps the calibrated noise."""
    from fedslm import training
    from fedslm.privacy import dp_sgd

    real = training.dp_optimizer

    def silent(optimizer, noise_multiplier, max_grad_norm, expected_batch_size, generator):
        return dp_sgd.dp_optimizer(optimizer, 0.0, max_grad_norm, expected_batch_size, generator)

    training.dp_optimizer = silent
    try:
        yield
    finally:
        training.dp_optimizer = real


def _canary_record(canaries: Canaries, audited: Arm, control: Arm) -> dict[str, Any]:
    """``canaries.json``: the only place canaries and their inclusion bits are written."""
    return {
        "seed": canaries.seed,
        "canaries": [
            {"row": row, "included": bit, "score_audited": a, "score_control": c}
            for row, bit, a, c in zip(
                canaries.rows, canaries.included, audited.scores, control.scores, strict=True
            )
        ],
    }


def audit_markdown(result: AuditResult) -> str:
    """``audit.md``: the result for people."""
    a, c = result.audited, result.control

    def eps(x: float | None) -> str:
        return "none (DP off)" if x is None else ("inf" if math.isinf(x) else f"{x:.3f}")

    rows = [
        f"| {arm.name} | {'on' if arm.dp else 'off'} | {arm.bound.epsilon:.3f} | "
        f"{eps(arm.formal_epsilon)} | {arm.accountant or '-'} | {arm.bound.guesses} | "
        f"{arm.bound.correct} | {arm.seconds:.0f} s |"
        for arm in (a, c)
    ]
    scans = "; ".join(f"r={r}: v={v}, {e:.3f}" for r, (v, e) in a.bound.per_r.items())
    return "\n".join(
        [
            "# Empirical privacy audit",
            "",
            f"**{result.verdict}**",
            "",
            f"Site `{result.site}`, m = {result.canaries} canaries ({result.included} "
            f"included, each with probability 1/2), delta = {a.delta:g}; lower bounds at "
            f"{1 - a.bound.level:.0%} confidence, the level split over r in "
            f"{list(a.bound.per_r)} (Bonferroni).",
            "",
            "| run | DP | lower bound | formal epsilon | accountant | r | v | time |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Audited run, every r: {scans}.",
            "",
            CAVEAT,
            "",
        ]
    )


__all__ = [
    "AUDIT_JSON",
    "Arm",
    "AuditResult",
    "count_correct",
    "run_audit",
]
