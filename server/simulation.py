"""``fedslm simulate``: the whole federation on one machine with Flower's simulation engine.

Each simulated site is a Flower SuperNode running the same ClientApp a real site runs; the
ServerApp is the same one the coordinator runs. Sites run in parallel, one core each.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fedslm.job import PreparedJob
from fedslm.progress import Reporter
from fedslm.reaper import start_reaper, stop_reaper


def simulate(prepared: PreparedJob, reporter: Reporter) -> None:
    """Run ``prepared`` with one virtual SuperNode per site."""
    import torch
    from fedslm.clients.app import app as client_app
    from fedslm.server.app import make_server_app
    from flwr.simulation import run_simulation

    # one line per step report, not Ray's "repeated Nx across cluster" summaries
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    manifest = prepared.save()
    sites = len(prepared.sites)
    cores = os.cpu_count() or 1
    gpus = torch.cuda.device_count()
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": 1, "num_gpus": min(1.0, gpus / sites) if gpus else 0.0},
        "init_args": {
            "num_cpus": max(1, min(cores, sites)),
            "num_gpus": gpus,
            "logging_level": "ERROR",
            "log_to_driver": True,
        },
    }
    _quiet_flower()
    # Ray's agents would outlive a run killed with SIGKILL: a watchdog ends them
    reaper = start_reaper()
    try:
        run_simulation(
            server_app=make_server_app(Path(manifest), reporter),
            client_app=client_app,
            num_supernodes=sites,
            backend_config=backend_config,
        )
    finally:
        stop_reaper(reaper)


def _quiet_flower() -> None:
    # Flower logs each strategy step, its deprecation notice for run_simulation (we pin 1.41,
    # where it is the in-process simulation entry point), actor shutdowns, and every error a
    # site's ClientApp raised with its Ray traceback. The reporter says what matters: each
    # site's failure is one line of its round (a bug's traceback is printed by the ClientApp),
    # and a ServerApp error reaches the caller as an exception.
    logging.getLogger("flwr").setLevel(logging.CRITICAL)
