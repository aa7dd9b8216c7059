"""The ``fedslm coordinator`` commands (the coordinator operator's side of a deployment)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _settings(args: argparse.Namespace) -> Any:
    from fedslm.deployment.config import load_coordinator_settings

    return load_coordinator_settings(args.config)


def _start(args: argparse.Namespace) -> int:
    from fedslm.deployment.coordinator import start

    return start(_settings(args))


def _add_site(args: argparse.Namespace) -> int:
    from fedslm.deployment.coordinator import add_site

    entry = add_site(_settings(args), args.name, args.public_key)
    print(
        f"registered site {args.name}: key {entry['fingerprint']}, Flower node id "
        f"{entry['node_id']}"
    )
    return 0


def _remove_site(args: argparse.Namespace) -> int:
    from fedslm.deployment.coordinator import remove_site

    remove_site(_settings(args), args.name)
    print(f"removed site {args.name}: its key is refused from now on")
    return 0


def _sites(args: argparse.Namespace) -> int:
    from fedslm.deployment.coordinator import site_status

    rows = site_status(_settings(args))
    if not rows:
        print("no site is registered (`fedslm coordinator add-site NAME site.pub`)")
    for r in rows:
        print(f"{r['name']:<24} {r['status']:<12} node {r['node_id']}  {r['fingerprint']}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from fedslm.deployment.coordinator import flower_run_id, submit

    folder = submit(_settings(args), args.job, args.name)
    print(f"submitted run {folder.name} (Flower run {flower_run_id(folder)}); outputs in {folder}")
    print(f"follow it: fedslm coordinator status {folder.name} --config {args.config}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from fedslm.deployment.coordinator import run_status

    rows = run_status(_settings(args), args.run)
    if not rows:
        print("no runs yet (`fedslm coordinator run JOB.yaml`)")
    for r in rows:
        line = (
            f"{r['run']:<32} {r['state']:<10} rounds {r['rounds']:<7} "
            f"flower run {r['flower_run_id']} ({r['flower_status']})"
        )
        print(line + (f"\n    {r['reason']}" if r["reason"] else ""))
    return 0


def _logs(args: argparse.Namespace) -> int:
    from fedslm.deployment.coordinator import run_logs

    print(run_logs(_settings(args), args.run))
    return 0


def _stop(args: argparse.Namespace) -> int:
    from fedslm.deployment.coordinator import stop_run

    rid = stop_run(_settings(args), args.run)
    print(f"stopped run {args.run} (Flower run {rid}); `fedslm coordinator resume` continues it")
    return 0


def _resume(args: argparse.Namespace) -> int:
    from fedslm.deployment.coordinator import resume

    rid = resume(_settings(args), args.run)
    print(f"resumed run {args.run} as Flower run {rid}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedslm.report.deployed_cli import coordinator_report

    return coordinator_report(_settings(args), args.run)


def _add_report(args: argparse.Namespace) -> int:
    from fedslm.report.deployed_cli import coordinator_add_report

    return coordinator_add_report(_settings(args), args.run, args.folder)


def add_cli(subparsers: Any) -> None:
    """Register ``fedslm coordinator ...``."""
    coord = subparsers.add_parser("coordinator", help="the coordinator service (deployment)")
    sub = coord.add_subparsers(dest="coordinator_command", required=True)

    def command(name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument(
            "--config", type=Path, required=True, help="the coordinator's service file (YAML)"
        )
        p.set_defaults(handler=handler)
        return p

    command("start", _start, "run the SuperLink and the site-facing proxy (foreground)")
    p = command("add-site", _add_site, "register a site's public key under a name")
    p.add_argument("name", help="the site's name (as jobs and reports will call it)")
    p.add_argument("public_key", type=Path, help="the site's site.pub from `fedslm site keygen`")
    p = command("remove-site", _remove_site, "unregister a site: its key is refused")
    p.add_argument("name")
    command("sites", _sites, "list registered sites and whether they are connected")
    p = command("run", _run, "start a federated job on the registered sites")
    p.add_argument("job", type=Path, help="the job config (YAML) with data.at_sites: true")
    p.add_argument("--name", help="the run's name (default: job file name and time)")
    p = command("status", _status, "where each run (or RUN) is")
    p.add_argument("run", nargs="?", help="a run's name (default: every run)")
    p = command("logs", _logs, "the coordinator-side log of a run")
    p.add_argument("run")
    p = command("stop", _stop, "stop a run (it can be resumed)")
    p.add_argument("run")
    p = command("resume", _resume, "continue a stopped or interrupted run")
    p.add_argument("run")
    p = command(
        "add-report",
        _add_report,
        "accept a site's signed report of a run (checked against its registered key)",
    )
    p.add_argument("run")
    p.add_argument(
        "folder",
        type=Path,
        help="the folder `fedslm site report` wrote (or its "
        "report.json), as the site's operator handed it over",
    )
    p = command(
        "report", _report, "write a run's federation report and its governance summary (pseudonyms)"
    )
    p.add_argument("run")
