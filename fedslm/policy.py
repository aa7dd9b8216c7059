"""Site policy: what a site allows, decided by the site and never by the coordinator.

A policy is a YAML file the site owns. Before the first round the site checks the whole job
against it (``check_job``), and before every round it checks that round (``check_round``). A
refusal trains nothing and sends no weights; its reasons go back to the coordinator, which can
log them but never override them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedslm.deployment.config import DaemonSettings, read_yaml_mapping
from fedslm.errors import invalid
from fedslm.privacy.accounting import Segment, epsilon

PositiveFloat = Annotated[float, Field(gt=0)]


class PrivacyLimits(BaseModel):
    """The site's privacy limits, per data set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lifetime_epsilon: PositiveFloat = Field(
        default=10.0, description="Total epsilon this data set may ever spend, over all jobs."
    )
    max_epsilon_per_job: PositiveFloat = Field(
        default=8.0, description="Largest epsilon one job may spend on this data set."
    )
    max_delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    allow_no_dp: bool = Field(default=False, description="Whether a job may train without DP.")
    min_noise_multiplier: Annotated[float, Field(ge=0)] = 0.3

    @model_validator(mode="after")
    def _consistent(self) -> PrivacyLimits:
        if self.max_epsilon_per_job > self.lifetime_epsilon:
            raise ValueError(
                f"privacy.max_epsilon_per_job ({self.max_epsilon_per_job}) is larger than "
                f"privacy.lifetime_epsilon ({self.lifetime_epsilon}); a job could never use it"
            )
        return self


class SitePolicy(BaseModel):
    """Everything a site allows. Paths are the site's own; they never leave it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    privacy: PrivacyLimits = PrivacyLimits()
    allowed_base_models: list[str] | None = Field(
        default=None,
        description="sha256 of the weights of every base model the site accepts "
        "(None: any model the site has locally).",
    )
    allowed_tasks: list[str] = ["classification", "causal-lm"]
    max_rounds: Annotated[int, Field(ge=1)] = 100
    max_lora_rank: Annotated[int, Field(ge=1)] | None = Field(
        default=64,
        description="Largest LoRA rank the site trains (bounds what its updates can carry). "
        "With aggregation 'exact' the site trains at this rank instead; otherwise a job asking "
        "for more is refused. None: no cap (max_trainable_fraction still bounds the adapter).",
    )
    max_trainable_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.1,
        description="Largest adapter a reply may carry, as a share of the base model's "
        "parameters: every value sent (LoRA factors and head) counted against every weight "
        "of the base model. Checked before round 1 on the adapter the site built and again "
        "on every reply.",
    )
    allowed_head_modules: list[str] = Field(
        default_factory=list,
        description="Classification: modules a job may train and send as its head beyond the "
        "model family's default head (docs/models.md). Empty: the default head only.",
    )
    min_train_records: Annotated[int, Field(ge=1)] = Field(
        default=20,
        description="Fewest training records the site trains a job on; with fewer it refuses "
        "the job (a training loss of a handful of records is theirs alone).",
    )
    min_eval_records: Annotated[int, Field(ge=1)] = Field(
        default=11,
        description="Fewest evaluation records the site reports metrics on; with fewer it "
        "sends 'withheld' and no numbers (evaluation metrics are not DP-protected).",
    )
    max_bytes_per_round: Annotated[int, Field(ge=1)] = 200_000_000
    data: str | None = Field(default=None, description="The site's data file.")
    ledger: str | None = Field(
        default=None,
        description="The site's privacy ledger file (default: ledger.db next to the data file; "
        "in simulation $FEDSLM_LEDGERS/<sha256 of the site's training file>.db).",
    )
    daemon: DaemonSettings | None = Field(
        default=None,
        description="Deployment only: how `fedslm site start` connects to the coordinator.",
    )

    def ledger_file(self) -> Path | None:
        """Where this site's ledger lives: ``ledger``, else ``ledger.db`` beside ``data``."""
        if self.ledger is not None:
            return Path(self.ledger)
        return Path(self.data).parent / "ledger.db" if self.data is not None else None

    @model_validator(mode="after")
    def _consistent(self) -> SitePolicy:
        for sha in self.allowed_base_models or []:
            if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
                raise ValueError(f"allowed_base_models: {sha!r} is not a lowercase sha256")
        unknown = set(self.allowed_tasks) - {"classification", "causal-lm"}
        if unknown:
            raise ValueError(f"allowed_tasks: unknown task(s) {sorted(unknown)}")
        return self


def load_policy(path: str | Path, overrides: dict[str, Any] | None = None) -> SitePolicy:
    """Read and validate a site policy file; errors name the file and the key."""
    path = Path(path)
    raw = merge_mappings(read_yaml_mapping(path, "site policy"), overrides or {})
    # relative to the policy file, so the site daemon can run from any folder
    _resolve(raw, ("data", "ledger"), path.parent)
    if isinstance(raw.get("daemon"), dict):
        daemon = raw["daemon"] = dict(raw["daemon"])
        _resolve(daemon, ("ca_cert", "key", "state_dir"), path.parent)
        if isinstance(daemon.get("models"), dict):
            daemon["models"] = dict(daemon["models"])
            _resolve(daemon["models"], tuple(daemon["models"]), path.parent)
    return policy_from_mapping(raw, str(path))


def _resolve(raw: dict[str, Any], keys: tuple[str, ...], base: Path) -> None:
    for key in keys:
        if isinstance(raw.get(key), str) and not Path(raw[key]).is_absolute():
            raw[key] = str((base / raw[key]).resolve())


def policy_from_mapping(raw: dict[str, Any], source: str) -> SitePolicy:
    """Validate an already-parsed policy; ``source`` names it in errors."""
    try:
        return SitePolicy.model_validate(raw)
    except ValidationError as exc:
        raise invalid(source, "site policy", exc) from None


def merge_mappings(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``, section by section (for per-site policy overrides)."""
    out = dict(base)
    for k, v in over.items():
        both = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = merge_mappings(out[k], v) if both else v
    return out


def check_job(
    policy: SitePolicy,
    *,
    task: str,
    rounds: int,
    model_sha256: str,
    dp_enabled: bool,
    delta: float,
    noise_multiplier: float,
    planned: Sequence[Segment],
    spent: Sequence[Segment],
    accountant: str,
    lora_rank: int | None = None,
    head: AdapterHead | None = None,
    adapter: AdapterSize | None = None,
    train_records: int | None = None,
) -> list[str]:
    """Reasons to refuse the whole job before round 1 (empty: the job is allowed).

    ``planned`` is every segment the job would spend on this site's data; ``spent`` is what the
    data set has already spent in earlier jobs (from the ledger). ``lora_rank`` is the rank the
    site would train at, ``head`` the classification head the job trains, ``adapter`` the size
    of the adapter the site would send and ``train_records`` the rows it would train on (each
    None: not checked).
    """
    reasons: list[str] = []
    limits = policy.privacy
    if task not in policy.allowed_tasks:
        reasons.append(f"task {task!r} is not in the site's allowed_tasks {policy.allowed_tasks}")
    if rounds > policy.max_rounds:
        reasons.append(f"the job asks for {rounds} rounds; the site allows {policy.max_rounds}")
    if train_records is not None and train_records < policy.min_train_records:
        reasons.append(
            f"the site would train on {train_records} record(s); its policy needs at least "
            f"min_train_records {policy.min_train_records} (a loss or update of so few "
            "records is theirs alone)"
        )
    if (
        lora_rank is not None
        and policy.max_lora_rank is not None
        and lora_rank > policy.max_lora_rank
    ):
        reasons.append(
            f"the job asks for LoRA rank {lora_rank}; the site allows at most "
            f"{policy.max_lora_rank}"
        )
    reasons += head_refusal(policy, head) if head is not None else []
    reasons += adapter_refusal(policy, adapter) if adapter is not None else []
    if policy.allowed_base_models is not None and model_sha256 not in policy.allowed_base_models:
        reasons.append(f"base model sha256 {model_sha256[:12]}… is not in allowed_base_models")
    if not dp_enabled:
        if not limits.allow_no_dp:
            reasons.append("the job turns DP off; the site's policy requires DP")
        return reasons
    if delta > limits.max_delta:
        reasons.append(f"delta {delta:g} is above the site's max_delta {limits.max_delta:g}")
    if noise_multiplier < limits.min_noise_multiplier:
        reasons.append(
            f"noise multiplier {noise_multiplier:.3g} is below the site's minimum "
            f"{limits.min_noise_multiplier:.3g}"
        )
    job_eps = epsilon(list(planned), delta, accountant)
    if job_eps > limits.max_epsilon_per_job * (1 + 1e-9):
        reasons.append(
            f"the job would spend epsilon {job_eps:.3f} ({accountant}); the site allows "
            f"{limits.max_epsilon_per_job:g} per job"
        )
    total = epsilon([*spent, *planned], delta, accountant)
    if total > limits.lifetime_epsilon * (1 + 1e-9):
        already = epsilon(list(spent), delta, accountant)
        reasons.append(
            f"the data set has spent epsilon {already:.3f} and this job would bring it to "
            f"{total:.3f} ({accountant}); the site's lifetime budget is {limits.lifetime_epsilon:g}"
        )
    return reasons


@dataclass(frozen=True)
class AdapterHead:
    """The classification head a job trains (and sends) and the model family's default."""

    modules: tuple[str, ...]
    default: tuple[str, ...]


@dataclass(frozen=True)
class AdapterSize:
    """What one training reply carries: ``params`` float32 values (LoRA factors and head), for
    a base model of ``base_params`` parameters."""

    params: int
    base_params: int

    @property
    def bytes(self) -> int:
        """Bytes of tensor data in a reply (float32)."""
        return 4 * self.params

    @property
    def fraction(self) -> float:
        """The adapter's values as a share of the base model's parameters."""
        return self.params / self.base_params


def max_adapter_params(policy: SitePolicy, base_params: int) -> int:
    """The most values one reply may carry for a base model of ``base_params`` parameters
    (``max_trainable_fraction``); what the egress guard enforces on every reply."""
    return math.floor(policy.max_trainable_fraction * base_params)


def head_refusal(policy: SitePolicy, head: AdapterHead) -> list[str]:
    """Head modules a job trains beyond the family default and the policy's
    ``allowed_head_modules``: each is sent in full (every weight of every layer it names)."""
    allowed = set(head.default) | set(policy.allowed_head_modules)
    beyond = [m for m in head.modules if m not in allowed]
    if not beyond:
        return []
    return [
        f"the job trains and sends head modules {beyond} beyond the model family's default "
        f"head {list(head.default)}; the site allows {sorted(policy.allowed_head_modules)} "
        "beyond it (allowed_head_modules)"
    ]


def adapter_refusal(policy: SitePolicy, adapter: AdapterSize) -> list[str]:
    """Reasons the adapter a job would send is too large: its share of the base model's
    parameters (``max_trainable_fraction``) and its bytes per reply (``max_bytes_per_round``)."""
    reasons = []
    if adapter.params > max_adapter_params(policy, adapter.base_params):
        reasons.append(
            f"the adapter would carry {adapter.params:,} values, {adapter.fraction:.1%} of the "
            f"base model's {adapter.base_params:,} parameters; the site allows "
            f"max_trainable_fraction {policy.max_trainable_fraction:g}"
        )
    return reasons + _bytes_refusal(policy, adapter.bytes)


def _bytes_refusal(policy: SitePolicy, bytes_to_send: int) -> list[str]:
    if bytes_to_send <= policy.max_bytes_per_round:
        return []
    return [
        f"the reply would send {bytes_to_send:,} bytes; the site allows "
        f"{policy.max_bytes_per_round:,} per round"
    ]


def check_round(
    policy: SitePolicy,
    *,
    bytes_to_send: int,
    lifetime_epsilon_after: float,
    job_epsilon_after: float,
) -> list[str]:
    """Reasons to refuse this round (empty: allowed).

    Epsilons are those the data set and the job would have spent once this round is counted.
    """
    reasons = _bytes_refusal(policy, bytes_to_send)
    limits = policy.privacy
    if lifetime_epsilon_after > limits.lifetime_epsilon * (1 + 1e-9):
        reasons.append(
            f"this round would bring the data set's spend to epsilon "
            f"{lifetime_epsilon_after:.3f}; the lifetime budget is {limits.lifetime_epsilon:g}"
        )
    if job_epsilon_after > limits.max_epsilon_per_job * (1 + 1e-9):
        reasons.append(
            f"this round would bring the job's spend to epsilon {job_epsilon_after:.3f}; "
            f"the site allows {limits.max_epsilon_per_job:g} per job"
        )
    return reasons
