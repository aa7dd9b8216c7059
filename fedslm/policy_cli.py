"""``fedslm policy check POLICY [--job JOB]``: what a site operator runs before saying yes.

It validates the site's own policy file, fingerprints the data set it names, reads what the
site's ledger says that data set has spent (once the ledger is shown to extend every head the
site released and journaled: ``--anchor``), and, given a job config, costs every step the job
would take on this data and prints whether the site would accept it and why not. Nothing is
written: the ledger is only read.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedslm.errors import ConfigError
from fedslm.privacy.accounting import ACCOUNTANT_NAMES, Segment, epsilon


def check_text(
    policy_path: Path,
    job_path: Path | None = None,
    anchors: Sequence[Path] = (),
    site: str | None = None,
) -> tuple[str, bool]:
    """The report ``policy check`` prints and whether the job (if any) would be accepted.

    ``anchors`` are run folders, privacy.json, report.json or journal files holding ledger
    heads the site released (``site``, default the policy's ``daemon.name``, picks its heads
    in a run of several sites); with the ledger's own journal, a ledger that no longer extends
    one of them is refused whatever it says was spent. Raises ``FedSLMError`` subclasses for a
    bad policy, data, ledger, job or model.
    """
    from fedslm.policy import load_policy
    from fedslm.privacy.anchors import anchor_refusal, read_anchors, read_journal
    from fedslm.privacy.ledger import DatasetFingerprint, PrivacyLedger, journal_path

    policy = load_policy(policy_path)
    limits = policy.privacy
    lines = [
        f"site policy {policy_path}: valid",
        f"  lifetime epsilon {limits.lifetime_epsilon:g}, at most {limits.max_epsilon_per_job:g}"
        f" per job, delta <= {limits.max_delta:g}, noise multiplier >= "
        f"{limits.min_noise_multiplier:g}, DP {'may' if limits.allow_no_dp else 'may never'} be "
        "off",
        f"  tasks {', '.join(policy.allowed_tasks)}; at most {policy.max_rounds} rounds and "
        f"{policy.max_bytes_per_round:,} bytes per round; base models: "
        + (
            "any local model"
            if policy.allowed_base_models is None
            else f"{len(policy.allowed_base_models)} allowed by sha256"
        ),
        f"  adapters of at most {policy.max_trainable_fraction:g} of the base model's "
        f"parameters, LoRA rank <= {policy.max_lora_rank or 'any'}, head modules beyond the "
        f"family default: {', '.join(policy.allowed_head_modules) or 'none'}; at least "
        f"{policy.min_train_records} training and {policy.min_eval_records} evaluation records",
    ]
    if policy.data is None:
        raise ConfigError(f"{policy_path}: data: the policy must name the site's data file")
    data = Path(policy.data)
    fp = DatasetFingerprint.of_file(data)
    lines.append(f"data set {data}: {fp.rows} rows, sha256 {fp.sha256}")
    ledger_path = policy.ledger_file() or data.parent / "ledger.db"
    name = site or (policy.daemon.name if policy.daemon is not None else None)
    released = [a for path in anchors for a in read_anchors(path, name)]
    broken = anchor_refusal(ledger_path, released)
    if broken:
        return "\n".join([*lines, f"REFUSED: {broken}"]), False
    journal = journal_path(ledger_path)
    journaled = len(read_journal(journal))
    lines.append(
        f"ledger heads: the ledger extends all {len(released)} given with --anchor and "
        f"{journaled} in its journal {journal}"
        + ("" if released else " (no --anchor: only the journal beside the ledger was checked)")
    )
    spent: list[Segment] = []
    if ledger_path.exists():
        # opened without binding it: a check must not write to the site's ledger
        with PrivacyLedger(ledger_path, create=False) as ledger:
            ledger.check_dataset(fp)
            spent = ledger.segments(fp)  # LedgerError on a broken chain: never under-count
        already = epsilon(spent, limits.max_delta, "prv")
        lines.append(
            f"ledger {ledger_path}: {len(spent)} segment(s) on this data set, spent epsilon "
            f"{already:.4f} (prv) at delta {limits.max_delta:g}; lifetime budget "
            f"{limits.lifetime_epsilon:g}"
        )
    else:
        lines.append(f"ledger {ledger_path}: not created yet (nothing spent)")
    if job_path is None:
        return "\n".join(lines), True
    reasons, job_lines = _cost_job(policy, job_path, data, fp.rows, spent)
    lines.extend(job_lines)
    if reasons:
        lines.append("REFUSED: " + "; ".join(reasons))
    else:
        lines.append("ACCEPTED: the job fits this policy")
    return "\n".join(lines), not reasons


def _cost_job(
    policy: Any, job_path: Path, data: Path, records: int, spent: list[Segment]
) -> tuple[list[str], list[str]]:
    from fedslm.acceptance import check_secagg_weight, job_refusal, measure_adapter, site_lora
    from fedslm.config import load_config
    from fedslm.data import duplicate_warning, read_site_file, split_site
    from fedslm.errors import DataError
    from fedslm.models.registry import resolve_model
    from fedslm.plan import describe_plan, trainable_parameters
    from fedslm.privacy.private_training import check_delta, plan_privacy

    job = load_config(job_path)
    name = policy.daemon.name if policy.daemon is not None else "site"
    misfit, held_out, warnings, seen = [], "", [], []
    if job.data.at_sites:
        # as the site's worker will when the job arrives: read the file with the job's columns
        # and labels, hold out the job's evaluation rows, and train (and spend) on the rest
        try:
            rows, labels = read_site_file(data, job.data, job.task.type)
            train, held = split_site(len(rows), labels, job.data, job.seed, name)
            records, seen = len(train), sorted(set(labels or []))
            held_out = f" ({len(held)} of {len(rows)} rows held out for evaluation)"
            if len(held) < policy.min_eval_records:
                warnings.append(
                    f"{len(held)} evaluation rows, fewer than min_eval_records "
                    f"{policy.min_eval_records}: the site will withhold its evaluation figures"
                )
            repeated = duplicate_warning(
                name, str(data), [rows[i] for i in train], [rows[i] for i in held],
                job.data, job.task.type,
            )  # fmt: skip
            warnings += [repeated] if repeated is not None else []
        except DataError as exc:
            misfit = [f"the site's data does not fit this job: {exc}"]
    check_delta(job, records, str(job_path))
    check_secagg_weight(job, records, str(job_path))
    plan = plan_privacy(job, records, str(job_path))
    model = resolve_model(job.model)
    lines = [
        f"job {job_path}: {job.federation.rounds} rounds, model {model.name}, "
        f"train.mode {job.train.mode} -> {job.train_mode}"
    ]
    # the job's label set; else the labels of the site's rows, else two (only a size matters)
    labels = [] if job.task.type != "classification" else job.data.labels or seen or ["0", "1"]
    plan_lines, noise_warnings = describe_plan(
        "this site", plan, trainable_parameters(job, model.path, len(labels))
    )
    warnings = noise_warnings + warnings
    if plan.enabled:
        planned = plan.segments()
        job_eps = epsilon(planned, plan.delta, plan.accountant)
        after = epsilon([*spent, *planned], plan.delta, plan.accountant)
        lines += [
            f"  DP-SGD on {records} records{held_out}, clipping {plan.max_grad_norm:g}:",
            *plan_lines[1:],
            f"  this job: epsilon {job_eps:.4f} at delta {plan.delta:g} "
            f"({ACCOUNTANT_NAMES[plan.accountant]})",
            f"  data set after the job: epsilon {after:.4f}",
        ]
    else:
        lines += ["  DP is OFF in this job", *plan_lines[1:]]
    # built as the site builds it, so the size is what the site would send
    adapter = measure_adapter(job, model, labels, name, policy)
    lines.append(
        f"  each training reply: {adapter.params:,} values ({adapter.bytes:,} bytes), "
        f"{adapter.fraction:.2%} of the base model's {adapter.base_params:,} parameters; "
        f"LoRA rank {site_lora(job, name, policy).r} at this site"
    )
    lines += [f"  warning: {w}" for w in warnings]
    refusal = job_refusal(policy, job, plan, model, spent, site=name, adapter=adapter)
    return misfit + refusal, lines


def _check_cmd(args: argparse.Namespace) -> int:
    text, accepted = check_text(args.policy, args.job, args.anchor, args.site)
    print(text)
    return 0 if accepted else 1


def add_cli(subparsers: Any) -> None:
    """Register ``policy check``: exit 0 valid (and the job accepted), 1 refused, 2 bad input."""
    policy = subparsers.add_parser("policy", help="check a site policy (and a job against it)")
    sub = policy.add_subparsers(dest="policy_command", required=True)
    check = sub.add_parser(
        "check", help="validate the policy; with --job, cost the job and say if it is accepted"
    )
    check.add_argument("policy", type=Path, help="the site's policy YAML")
    check.add_argument("--job", type=Path, help="a job config to cost against the policy")
    check.add_argument(
        "--anchor",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="a run folder, privacy.json, report.json or journal holding ledger heads this site "
        "released; the ledger must still extend them (repeatable)",
    )
    check.add_argument(
        "--site", help="this site's name in the --anchor runs (default: the policy's daemon.name)"
    )
    check.set_defaults(handler=_check_cmd)
