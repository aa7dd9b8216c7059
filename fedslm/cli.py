"""The ``fedslm`` command line.

Errors caused by input (config, data, model folder) print one clear message and exit 2; a
traceback means a bug in fedslm.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from fedslm.errors import FedSLMError

if TYPE_CHECKING:
    from fedslm.job import PreparedJob
    from fedslm.progress import Reporter

# Flower must not phone home, check for updates or build environments at run time (offline).
for _key, _value in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)


def add_overrides(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE``, repeatable: overrides of the job config (``load_config``)."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.batch_size=16 (repeatable)",
    )


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="YAML job config")
    p.add_argument("--out", type=Path, help="output folder (default: runs/<config name>)")
    add_overrides(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing run in --out instead of refusing",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, exposed for the docs and tests."""
    parser = argparse.ArgumentParser(prog="fedslm", description=__doc__.splitlines()[0])
    from fedslm import __version__

    parser.add_argument("--version", action="version", version=f"fedslm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_args(sub.add_parser("simulate", help="run a federated job with simulated sites"))
    _run_args(sub.add_parser("centralized", help="the same job on the pooled data (baseline)"))
    synth = sub.add_parser("synth", help="write the synthetic bank-messages data set")
    synth.add_argument("out", type=Path, help="output file (.csv, .jsonl or .parquet)")
    synth.add_argument("--sites", type=int, default=3)
    synth.add_argument("--rows-per-site", type=int, default=400)
    synth.add_argument("--skew", type=float, default=1.0)
    synth.add_argument("--seed", type=int, default=0)
    from fedslm.privacy.ledger_cli import add_cli as add_ledger_cli

    add_ledger_cli(sub)
    from fedslm.policy_cli import add_cli as add_policy_cli

    add_policy_cli(sub)
    from fedslm.report_cli import add_cli as add_report_cli

    add_report_cli(sub)
    from fedslm.audit.cli import add_cli as add_audit_cli

    add_audit_cli(sub)
    from fedslm.deployment.cli import add_cli as add_coordinator_cli

    add_coordinator_cli(sub)
    site = sub.add_parser("site", help="a real site's own tools")
    site_sub = site.add_subparsers(dest="site_command", required=True)
    keygen = site_sub.add_parser(
        "keygen", help="make the site's ECDSA P-384 key pair (OpenSSH format), kept at the site"
    )
    keygen.add_argument("folder", type=Path, help="where to write site.key and site.pub")
    keygen.add_argument("--name", default="", help="a comment naming the site in site.pub")
    keygen.set_defaults(handler=_site_keygen)
    site_start = site_sub.add_parser(
        "start", help="run this site's daemon: its worker and Flower's SuperNode (deployment)"
    )
    site_start.add_argument(
        "--policy", type=Path, required=True, help="the site's policy file, with a daemon section"
    )
    site_start.set_defaults(handler=_site_start)
    from fedslm.report.deployed_cli import add_site_report_cli

    add_site_report_cli(site_sub)
    certs = sub.add_parser(
        "certs", help="make the consortium's CA and the coordinator's TLS server certificate"
    )
    certs.add_argument("out", type=Path, help="folder for ca.crt, ca.key, server.pem, server.key")
    certs.add_argument(
        "--host",
        dest="hosts",
        action="append",
        required=True,
        help="an address sites dial (DNS name or IP); repeat; include 127.0.0.1 for loopback",
    )
    certs.add_argument("--days", type=int, default=365, help="validity (default 365)")
    certs.set_defaults(handler=_certs)
    model = sub.add_parser("model", help="facts about a local model folder")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    sha = model_sub.add_parser(
        "sha256", help="the weights hash a site policy's allowed_base_models lists"
    )
    sha.add_argument("folder", type=Path, help="a Hugging Face model folder")
    sha.set_defaults(handler=_model_sha256)
    return parser


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    # fedslm's own warnings (an old config spelling) read like the CLI's other warnings; the
    # file and line of the library code that raised them tell an operator nothing
    if filename.startswith(_PACKAGE_DIR):
        print(f"warning: {message}", file=file or sys.stderr)
    else:
        _default_show_warning(message, category, filename, lineno, file, line)


_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_default_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedslm`` command."""
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return _main(argv)
    finally:
        warnings.showwarning = shown


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("simulate", "centralized"):
            return _run(args)
        if args.command == "synth":
            return _synth(args)
        if hasattr(args, "handler"):
            return args.handler(args)
    except FedSLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> int:
    from fedslm.acceptance import check_secagg_weight
    from fedslm.config import is_empty_config, load_config
    from fedslm.job import plan_job, preflight
    from fedslm.privacy.ledger import simulated_ledger_dir
    from fedslm.privacy.private_training import check_delta
    from fedslm.progress import Reporter
    from fedslm.runfolder import check_output_folder, clear_run, write_marker

    job = load_config(args.config, args.overrides)
    reporter = Reporter(quiet=args.quiet)
    if is_empty_config(args.config):
        # an empty file is valid (every key has a default), but rarely what was meant
        extra = " with your --set overrides" if args.overrides else ""
        reporter.warn(
            f"{args.config} sets nothing: running the default job{extra} (docs/config.md "
            "lists the defaults: a synthetic data set, the default model and federation)"
        )
    if job.data.at_sites:
        raise FedSLMError(
            f"{args.config}: data.at_sites is for deployed jobs, where each site reads its own "
            "file (`fedslm coordinator run`); to simulate, set data.path, data.sites or "
            "data.synthetic"
        )
    out: Path = args.out or Path("runs") / args.config.stem
    # Everything is validated before anything is deleted or written: a bad config, data file
    # or policy must leave an existing run (and its outputs) exactly as it was.
    plan = plan_job(job, str(args.config))
    for site in plan.sites:
        rows, where = len(site.train), f"{args.config} (site {site.name})"
        check_delta(job, rows, where)
        check_secagg_weight(job, rows, where)
    ledger_dir = simulated_ledger_dir()
    # the ledger folder counts as an input: a run folder is replaced whole, ledgers never are
    replace = check_output_folder(out, [args.config, *plan.inputs(), ledger_dir], args.overwrite)
    declined: list[str] = []
    if args.command == "simulate":
        # a job every site would refuse (e.g. its data set's budget is spent) must not replace
        # the run it would overwrite; the pooled baseline of `centralized` has no policy
        declined = preflight(plan, ledger_dir)
    try:
        ledger_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FedSLMError(
            f"{ledger_dir}: cannot create the folder of simulated sites' privacy ledgers "
            f"({exc.strerror}); set FEDSLM_LEDGERS (or FEDSLM_HOME) to a writable folder"
        ) from None
    if replace:
        clear_run(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, args.command, str(args.config))  # first: a crashed run is a run
        prepared = plan.write(out, ledger_dir)
        ledgers = {s.name: s.ledger for s in prepared.sites}
        write_marker(out, args.command, str(args.config), ledgers)
    except FedSLMError:
        if created:
            shutil.rmtree(out, ignore_errors=True)  # nothing half-written is left behind
        raise
    reporter.info(
        f"{args.command}: {len(prepared.sites)} sites, {job.federation.rounds} rounds, "
        f"model {prepared.model.name}, DP {'on' if job.privacy.enabled else 'OFF'} -> {out}"
    )
    _print_plan(prepared, args.command, reporter)
    if args.command == "simulate":
        _print_ledgers(reporter, ledgers)
        for line in declined:
            reporter.warn(f"will refuse round 1: {line}")
        from fedslm.server.simulation import simulate

        simulate(prepared, reporter)
    else:
        from fedslm.centralized import run_centralized

        run_centralized(prepared, reporter)
    roster = [s.name for s in prepared.sites] if args.command == "simulate" else []
    return _print_summary(out, reporter, roster)


def _print_plan(prepared: PreparedJob, command: str, reporter: Reporter) -> None:
    """Each site's plan (phases, q, steps, sigma, noise on the averaged gradient) and a warning
    for every site where noise will swamp the signal, before round 1."""
    from fedslm.plan import describe_plan, trainable_parameters, unused_lora_keys
    from fedslm.privacy.private_training import plan_privacy

    job = prepared.job
    trainable = trainable_parameters(job, prepared.model.path, len(prepared.labels or []))
    mode = job.train_mode
    reporter.info(f"plan ({job.train.mode} -> {mode}):")
    unused = unused_lora_keys(job)
    if unused:
        reporter.warn(
            f"train.mode {job.train.mode} trains a linear probe (train.probe.*) in every round; "
            f"{', '.join(unused)} apply to LoRA rounds only and are not used. "
            "Set train.mode: lora (or lp-lora) to train LoRA with them."
        )
    if command == "centralized":
        records = {"pooled": sum(_count_rows(s.files.train) for s in prepared.sites)}
    else:
        records = {s.name: _count_rows(s.files.train) for s in prepared.sites}
    for name, rows in records.items():
        lines, warnings = describe_plan(name, plan_privacy(job, rows, prepared.source), trainable)
        for line in lines:
            reporter.info(line)
        for warning in warnings:
            reporter.warn(warning)
    for warning in _duplicate_warnings(prepared):
        reporter.warn(warning)


def _duplicate_warnings(prepared: PreparedJob) -> list[str]:
    """A warning for every site whose evaluation rows repeat its training rows."""
    from fedslm.data import duplicate_warning, read_rows
    from fedslm.data.sites import text_columns

    job = prepared.job
    columns = text_columns(job.data, job.task.type)
    found = []
    for s in prepared.sites:
        train, held = (read_rows(f, columns) for f in (s.files.train, s.files.eval))
        source = f"{s.files.train.parent} (train.jsonl, eval.jsonl)"
        found.append(duplicate_warning(s.name, source, train, held, job.data, job.task.type))
    return [w for w in found if w is not None]


def _count_rows(path: Path) -> int:
    with path.open(encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def _print_summary(out: Path, reporter: Reporter, roster: list[str]) -> int:
    """The run's summary; returns the exit code: 0, or 1 when a site of ``roster`` failed
    (error, timeout, rejected update) in some round, which makes the run incomplete even
    though ``federation.min_sites`` held. A refusal is the site's choice: listed, exit 0."""
    import json

    from fedslm.artifacts import read_jsonl
    from fedslm.progress import absences

    records = read_jsonl(out / "metrics.jsonl")
    last = records[-1]
    privacy = json.loads((out / "privacy.json").read_text())
    reporter.info(
        f"final eval loss {last.get('eval_loss')}, eval accuracy {last.get('eval_accuracy')}"
    )
    for site, p in privacy["sites"].items():
        if p.get("dp_enabled"):
            reporter.info(
                f"  {site}: epsilon {p['epsilon']:.3f} ({p['accountant']}), "
                f"recomputed {p['epsilon_recomputed_pld']:.3f} (pld) "
                f"[{p['epsilon_check']}], delta {p['delta']:g}"
            )
        elif p.get("refusals"):
            reporter.info(f"  {site}: refused ({p['refusals'][-1]})")
        else:
            reporter.info(f"  {site}: no DP")
    central = privacy.get("central")
    if central:
        reporter.info(
            f"  site-level (central DP): epsilon {central['epsilon']:.3f} "
            f"({central['accountant']}), exact {central['epsilon_analytic']:.3f} "
            f"[{central['epsilon_check']}], delta {central['delta']:g}, "
            f"{central['rounds_released']} rounds released"
        )
    from fedslm.runfolder import read_marker

    ledgers = (read_marker(out) or {}).get("ledgers") or {}
    _print_ledgers(reporter, {name: Path(p) for name, p in ledgers.items()})
    reporter.info(f"outputs: {out}/adapter, metrics.jsonl, privacy.json, checkpoints/")
    absent = absences(records, roster)
    for a in absent:
        reporter.warn(f"did not take part: {a.describe()}")
    failed = sorted({a.site for a in absent if a.failed})
    if failed:
        reporter.warn(
            f"INCOMPLETE: {len(failed)} of {len(roster)} sites failed in some round "
            f"({', '.join(failed)}); the adapter was trained without them there (exit code 1)"
        )
        return 1
    return 0


def _print_ledgers(reporter: Reporter, ledgers: dict[str, Path]) -> None:
    # the spend is the data set's, across runs: say where it is kept (and that it stays)
    reporter.info("privacy ledgers (kept across runs; --overwrite never deletes them):")
    for name, path in ledgers.items():
        reporter.info(f"  {name}: {path}")


def _site_keygen(args: argparse.Namespace) -> int:
    from fedslm.keys import fingerprint, generate_key, load_public_key

    private, public = args.folder / "site.key", args.folder / "site.pub"
    line = generate_key(private, public, f"fedslm-site:{args.name}" if args.name else "")
    print(f"wrote {private} (private: keep it at the site, mode 0600) and {public}")
    print(f"fingerprint {fingerprint(load_public_key(line))}; give {public} to the coordinator")
    return 0


def _site_start(args: argparse.Namespace) -> int:
    from fedslm.clients.daemon import start

    return start(args.policy)


def _certs(args: argparse.Namespace) -> int:
    from fedslm.certs import describe, make_certificates, read_certificate

    issued = make_certificates(args.out, args.hosts, days=args.days)
    for label, path in (("CA", issued.ca_cert), ("server", issued.server_cert)):
        print(f"{label}: {path}: {describe(read_certificate(path))}")
    print(
        f"keys (mode 0600): {issued.ca_key} (keep offline), {issued.server_key}; give "
        f"{issued.ca_cert} to every site"
    )
    return 0


def _model_sha256(args: argparse.Namespace) -> int:
    from fedslm.models.registry import weights_sha256

    if not (args.folder / "config.json").is_file():
        raise FedSLMError(f"{args.folder}: not a Hugging Face model folder (no config.json)")
    print(f"{weights_sha256(args.folder)}  {args.folder}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from fedslm.data import generate_bank_messages, write_rows

    names = [f"site-{i + 1}" for i in range(args.sites)]
    rows = generate_bank_messages(names, args.rows_per_site, args.seed, args.skew)
    write_rows(rows, args.out)
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
