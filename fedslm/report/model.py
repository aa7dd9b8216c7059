"""The report as a typed, versioned object: what ``report.json`` holds.

Every figure is a field here; ``fedslm.report.build`` fills them from a run folder and
``fedslm.report.render`` turns them into HTML. Rules the schema enforces for a reader:

- every epsilon is an :class:`EpsilonFigure`, which carries its delta, the accountant that
  computed it and the file and field it came from (or says that the report recomputed it);
- budgets and policy limits are never called ``epsilon``: they are limits, not measurements;
- an epsilon of ``null`` is infinite: no privacy guarantee (a step without noise).

``SCHEMA_VERSION`` changes whenever a field is removed or changes meaning.
"""

from __future__ import annotations

import math
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedslm.audit.report import EmpiricalCheck

SCHEMA_VERSION: Final = 1

AccountantName = Literal["prv", "pld", "rdp", "analytic"]

ACCOUNTANT_LABELS: dict[str, str] = {
    "prv": "PRV accountant",
    "pld": "PLD accountant",
    "rdp": "RDP accountant",
    "analytic": "exact closed form",
}


def epsilon_text(value: float | None, digits: int = 4) -> str:
    """An epsilon for people: ``digits`` significant digits, rounded *up* so that a shown
    guarantee is never stronger than the computed one; None is infinite."""
    if value is None or math.isinf(value):
        return "∞ (no guarantee)"
    if value <= 0:
        return "0"
    scale = 10 ** (digits - 1 - math.floor(math.log10(value)))
    # ceil of the scaled value; the small slack keeps an exact 8.0 from becoming 8.001
    up = math.ceil(value * scale - 1e-9) / scale
    return f"{up:#.{digits}g}".rstrip(".")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EpsilonFigure(_Model):
    """One epsilon, with what is needed to read and to check it."""

    epsilon: float | None = Field(description="null means infinite: no guarantee")
    delta: float
    accountant: AccountantName
    accountant_detail: str = Field(description="library and class that computed it")
    source: str = Field(description="file and field it was read from, or how it was recomputed")


class Scope(_Model):
    """Whom the report is for: the whole federation or one site (restricted to that site)."""

    level: Literal["federation", "site"]
    site: str | None = None


class RunInfo(_Model):
    """Which run the report describes."""

    run_dir: str = Field(description="where the run was read from (not checked by verify)")
    kind: Literal["federated", "centralized"]
    job_id: str | None
    config_source: str | None
    manifest_present: bool
    rounds_planned: int | None
    rounds_recorded: int
    sites: list[str]
    incomplete: str | None = Field(
        default=None, description="why the run is not complete (interrupted, stopped early)"
    )


class Summary(_Model):
    """The plain-language summary at the top of the report."""

    trained: str
    data: str
    who_saw_what: list[str]
    guarantees: list[str]
    checks_passed: bool
    checks_line: str


class SegmentRow(_Model):
    """One round of DP-SGD as the site's ledger recorded it for this job."""

    round: int
    q: float
    sigma: float
    steps: int


class RoundEpsilon(_Model):
    """A site's epsilon for this job after a round: as logged, and recomputed here."""

    round: int
    logged: EpsilonFigure | None
    recomputed_pld: EpsilonFigure | None


class Budget(_Model):
    """The site policy's privacy limits (from job.json or the site's policy.yaml)."""

    lifetime: float
    per_job: float
    max_delta: float
    source: str


class LifetimeSpend(_Model):
    """What the data set has spent over every job in the site's ledger, against its budget."""

    ledger: str
    dataset: str | None
    entries: int
    jobs: list[str]
    steps: int
    first_entry: str | None
    last_entry: str | None
    spent: EpsilonFigure | None
    spent_pld: EpsilonFigure | None
    site_reported: EpsilonFigure | None
    budget: Budget | None
    remaining: float | None = Field(description="budget.lifetime minus spent, same accountant")
    ledger_head_in_privacy_json: str | None
    ledger_last_hash: str | None


class SitePrivacy(_Model):
    """Record-level DP-SGD at one site."""

    site: str
    dp_enabled: bool
    records: int | None
    rounds_trained: int
    dp_steps: int | None
    delta: float | None
    noise_multiplier: float | None
    max_grad_norm: float | None
    sample_rate: float | None
    segments: list[SegmentRow]
    epsilon: EpsilonFigure | None
    epsilon_pld: EpsilonFigure | None
    epsilon_rdp: EpsilonFigure | None
    epsilon_pld_report: EpsilonFigure | None
    coordinator_check: str | None
    per_round: list[RoundEpsilon]
    lifetime: LifetimeSpend | None


class CentralRound(_Model):
    """One round of site-level DP at the coordinator."""

    round: int
    aggregated: bool
    sites: int | None
    clipped: int | None
    noise_std_of_mean: float | None
    logged: EpsilonFigure | None
    recomputed_analytic: EpsilonFigure | None


class CentralPrivacy(_Model):
    """Site-level (central) DP figures from privacy.json's ``central`` block."""

    privacy_unit: str
    mechanism: str
    covers: str
    weighting: str
    records_cap: int | None
    denominator: int
    clip_norm: float
    noise_multiplier: float
    noise_std_of_mean: float
    rounds_released: int
    delta: float
    calibration_target: EpsilonFigure | None
    epsilon: EpsilonFigure
    epsilon_pld: EpsilonFigure
    epsilon_rdp: EpsilonFigure
    epsilon_analytic: EpsilonFigure
    epsilon_analytic_report: EpsilonFigure
    coordinator_check: str | None
    per_round: list[CentralRound]


class Privacy(_Model):
    """The guarantee: unit, neighbouring relation, mechanism, figures per site and central."""

    privacy_unit: str
    neighbouring: str
    mechanism: str
    calibration_target: EpsilonFigure | None
    sites: list[SitePrivacy]
    central: CentralPrivacy | None


class DatasetInfo(_Model):
    """A site's data set, identified without showing any of its content."""

    site: str
    train_file: str
    train_sha256: str | None
    train_rows: int | None
    eval_file: str
    eval_sha256: str | None
    eval_rows: int | None
    columns: list[str]
    ledger_dataset: str | None
    matches_ledger: bool | None


class BaseModelInfo(_Model):
    """The frozen base model the adapter applies to."""

    name: str | None
    sha256: str | None
    source: str


class Fingerprints(_Model):
    """Everything that identifies what was run, on what, with which software."""

    datasets: list[DatasetInfo]
    base_model: BaseModelInfo
    task: str | None
    lora: dict[str, Any]
    job_config_sha256: str | None = Field(description="privacy.json job_fingerprint")
    job_config_sha256_recomputed: str | None = Field(description="sha256 of job.json's config")
    adapter_sha256: str | None = Field(description="sha256 of adapter/adapter_model.safetensors")
    versions: dict[str, str]
    report_software: dict[str, str]
    caveats: list[str]
    site_keys: dict[str, str] = Field(
        default_factory=dict,
        description="fingerprint of each site's registered ECDSA key (job.json), which signs "
        "the site's report (sites/SITE/report.sig)",
    )


class TensorInfo(_Model):
    """One tensor of the adapter: what every training reply carries, under the same name."""

    name: str
    shape: list[int]
    dtype: str
    bytes: int


class EgressTensor(TensorInfo):
    """A tensor as one message carried it."""

    sha256: str


class EgressMessage(_Model):
    """One message a site sent or blocked, as its ledger's egress log recorded it before the
    message could leave (``fedslm.privacy.egress_log``)."""

    round: int
    site: str
    kind: str = Field(description="train, evaluate or refusal")
    status: str = Field(description="sent, or blocked by the site's egress guard")
    bytes: int = Field(description="bytes of tensor values")
    sha256: str | None = Field(default=None, description="hash of the egress log record")
    tensors: list[EgressTensor]
    metrics: dict[str, float | int | str | bool]
    fields: dict[str, Any] = Field(default_factory=dict)
    blocked_because: list[str] = Field(default_factory=list)


class RoundBytes(_Model):
    """Bytes each site sent in one round (metrics.jsonl ``bytes_sent``)."""

    round: int
    sites: dict[str, int]


class Egress(_Model):
    """What left each site."""

    what_is_sent: str
    tensors: list[TensorInfo]
    tensor_bytes: int
    tensors_source: str
    rounds: list[RoundBytes]
    total_bytes: dict[str, int]
    per_message_log: list[EgressMessage] = Field(
        default_factory=list,
        description="one entry per message a site sent or blocked, from its egress log",
    )
    per_message_log_note: str


class PolicyInfo(_Model):
    """A site's policy as it was in force for this job (verbatim)."""

    site: str
    source: str
    policy: dict[str, Any] | None


class Refusal(_Model):
    """A round (or a whole job) a site's policy refused: nothing was trained or sent."""

    site: str
    round: int | None
    reasons: list[str]
    source: str


class Failure(_Model):
    """A reply that did not arrive or was rejected."""

    round: int
    message: str


class SiteRoundUtility(_Model):
    """One site's figures in one round (metrics.jsonl ``sites``)."""

    train_loss: float | None = None
    steps: int | None = None
    num_examples: int | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    eval_examples: int | None = None
    eval_withheld: str | None = Field(
        default=None, description="why the site sent no evaluation figures (min_eval_records)"
    )


class RoundUtility(_Model):
    """One round's loss and accuracy (metrics.jsonl)."""

    round: int
    aggregated: bool | None
    reason: str | None
    train_loss: float | None
    eval_loss: float | None
    eval_accuracy: float | None
    sites: dict[str, SiteRoundUtility]


class Baseline(_Model):
    """Another run of the same task to compare against (centralized or without DP)."""

    name: str
    path: str
    kind: Literal["federated", "centralized"]
    dp_enabled: bool | None
    epsilons: dict[str, EpsilonFigure] = Field(description="per site of the baseline run")
    rounds: list[RoundUtility]


class Utility(_Model):
    """How good the model is, per round, and against baselines."""

    note: str
    rounds: list[RoundUtility]
    baselines: list[Baseline]


class CheckResult(_Model):
    """One of the checks ``fedslm verify`` runs, as it came out when the report was made."""

    name: str
    description: str
    passed: bool
    detail: str
    inconclusive: bool = Field(
        default=False, description="not passed, but no wrong figure: the check could not conclude"
    )


class Report(_Model):
    """The whole report (``report.json``)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    format: Literal["fedslm-report"] = "fedslm-report"
    generated_by: str
    generated_at: str = Field(description="UTC; not checked by verify")
    scope: Scope
    run: RunInfo
    summary: Summary
    privacy: Privacy
    trust_model: list[str]
    fingerprints: Fingerprints
    egress: Egress
    policies: list[PolicyInfo]
    refusals: list[Refusal]
    failures: list[Failure]
    utility: Utility
    checks: list[CheckResult]
    notes: list[str] = Field(description="figures the run's files do not allow to check")
    empirical_check: EmpiricalCheck | None = Field(
        default=None, description="fedslm audit's lower bound (audit.json in the run folder)"
    )


# Fields that legitimately differ between two builds of the same run's report.
VOLATILE_FIELDS: frozenset[str] = frozenset({"generated_at", "run_dir"})


def json_schema() -> dict[str, Any]:
    """The JSON schema of ``report.json``."""
    return Report.model_json_schema()
