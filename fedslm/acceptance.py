"""What a site checks before it accepts a job: the LoRA shape it would train, the adapter it
would send, and its policy's verdict on the whole job.

The site itself (``Site.refusal``), the simulation's preflight (``fedslm.job.preflight``) and
``fedslm policy check --job`` all decide with these functions, so the three cannot disagree.
"""

from __future__ import annotations

import json

import torch

from fedslm.config import JobConfig, LoraConfig
from fedslm.errors import ConfigError
from fedslm.models import get_adapter_state, load_model
from fedslm.models.families import default_head
from fedslm.models.registry import ResolvedModel, base_parameters
from fedslm.policy import AdapterHead, AdapterSize, SitePolicy, check_job
from fedslm.privacy.accounting import Segment
from fedslm.privacy.private_training import PrivacyPlan


def site_lora(job: JobConfig, site: str, policy: SitePolicy | None) -> LoraConfig:
    """The LoRA shape ``site`` trains: the job's, at the site's rank.

    Under a rule with per-site ranks (``exact``) each site may have its own rank
    (``federation.site_ranks``) and its policy's ``max_lora_rank`` lowers it; the other rules
    need the job's rank everywhere, and a policy that caps it below refuses the job instead
    (``job_refusal``). The rule decides (``AggregationRule.site_rank``).
    """
    rank = job.federation.site_ranks.get(site, job.lora.r)
    cap = policy.max_lora_rank if policy is not None else None
    return job.lora.model_copy(update={"r": job.federation.rule.site_rank(rank, cap)})


def job_refusal(
    policy: SitePolicy,
    job: JobConfig,
    plan: PrivacyPlan,
    model: ResolvedModel,
    spent: list[Segment],
    *,
    site: str,
    adapter: AdapterSize,
) -> list[str]:
    """Reasons ``policy`` refuses the whole job before round 1 (empty: accepted).

    The one decision the site makes (``Site.refusal``), the simulation's preflight makes and
    ``fedslm policy check --job`` prints: every rule of ``check_job``, with the rank ``site``
    trains at (``site_lora``), the head the job trains against the family's default, the
    adapter the site would send (``adapter``: from ``measure_adapter``, or the site's own
    loaded model), the records it trains on, and every step the job plans costed on top of
    ``spent``, what the data set has already spent in other jobs (from the ledger).
    """
    return check_job(
        policy,
        task=job.task.type,
        rounds=job.federation.rounds,
        model_sha256=model.sha256,
        dp_enabled=plan.enabled,
        delta=plan.delta,
        noise_multiplier=plan.min_noise_multiplier,
        planned=plan.segments(),
        spent=spent,
        accountant=plan.accountant,
        lora_rank=site_lora(job, site, policy).r,
        head=job_head(job, model),
        adapter=adapter,
        train_records=plan.records,
    )


def job_head(job: JobConfig, model: ResolvedModel) -> AdapterHead | None:
    """The classification head ``job`` trains on ``model`` and the family's default (None for
    a causal LM, which trains no head)."""
    if job.task.type != "classification" or job.task.label_words:
        return None
    config = json.loads((model.path / "config.json").read_text(encoding="utf-8"))
    default = default_head(str(config.get("model_type", "")), job.model.pooling)
    return AdapterHead(tuple(job.model.head_modules or default), default)


def adapter_size(state: dict[str, torch.Tensor], base_params: int) -> AdapterSize:
    """The size of a training reply carrying adapter ``state`` (``get_adapter_state``: what
    ``train_payload`` sends), against the base model's parameters."""
    return AdapterSize(sum(t.numel() for t in state.values()), base_params)


def measure_adapter(
    job: JobConfig, model: ResolvedModel, labels: list[str], site: str, policy: SitePolicy
) -> AdapterSize:
    """The adapter ``site`` would send for ``job``: the model is built on the CPU as the site
    builds it (its rank, the job's targets and head) and its adapter counted, so a check
    before the job (preflight, ``policy check --job``) sees what the site will send."""
    loaded = load_model(
        model.path,
        job.task.model_task,
        site_lora(job, site, policy),
        labels,
        torch.device("cpu"),
        seed=job.seed,
        options=job.model,
    )
    return adapter_size(get_adapter_state(loaded.model), base_parameters(model.path))


def check_secagg_weight(job: JobConfig, records: int, source: str) -> None:
    """Under secure aggregation a site's weight in the sum is its training records, which
    must not exceed ``federation.secagg.max_weight`` (the bound that sizes the ring)."""
    if not job.federation.secure_aggregation:
        return
    bound = job.federation.secagg.max_weight
    if records > bound:
        raise ConfigError(
            f"{source}: federation.secagg.max_weight={bound} is below this site's {records} "
            "training records (its weight in the secure sum); raise "
            f"federation.secagg.max_weight to at least {records}"
        )
