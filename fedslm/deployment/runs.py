"""A deployed run's folder on the coordinator: the job, its roster and its outputs.

``fedslm coordinator run`` writes ``RUN/job.json`` (the validated job, the job id, the base
model as the coordinator resolved it, and the roster: each site's name, Flower node id and
public key as registered). The ServerApp reads it, writes ``metrics.jsonl``, ``checkpoints/``,
``adapter/`` and ``privacy.json`` next to it exactly as a simulated run does, and keeps
``status.json`` current so ``fedslm coordinator status`` can say where the run is.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedslm.artifacts import write_json
from fedslm.config import JobConfig
from fedslm.errors import ConfigError
from fedslm.job import MANIFEST, PreparedJob
from fedslm.models.registry import ResolvedModel

STATUS = "status.json"


@dataclass(frozen=True)
class RosterEntry:
    """A registered site taking part in a run."""

    name: str
    node_id: int
    public_key: str


@dataclass(frozen=True)
class DeployedRun:
    """A job to run on registered sites; ``prepared`` is what the coordinator code needs
    (no site files: each site's data stays at the site)."""

    prepared: PreparedJob
    roster: list[RosterEntry]

    @property
    def out(self) -> Path:
        """The run's folder."""
        return self.prepared.out

    def save(self) -> Path:
        """Write ``job.json`` (same layout as a simulated run's, sites without file paths)."""
        p = self.prepared
        data = {
            "config": p.job.model_dump(mode="json"),
            "source": p.source,
            "job_id": p.job_id,
            "labels": p.labels,
            "model": {"path": str(p.model.path), "name": p.model.name, "sha256": p.model.sha256},
            "deployment": True,
            "sites": [
                {"name": s.name, "node_id": s.node_id, "public_key": s.public_key}
                for s in self.roster
            ],
        }
        path = p.out / MANIFEST
        write_json(path, data)
        return path

    @staticmethod
    def load(run_dir: Path) -> DeployedRun:
        """Read ``RUN/job.json`` written by ``save``."""
        path = Path(run_dir) / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{run_dir}: not a deployed run folder (no {MANIFEST})") from None
        if not data.get("deployment"):
            raise ConfigError(f"{path}: a simulated run, not a deployed one")
        m = data["model"]
        prepared = PreparedJob(
            job=JobConfig.model_validate(data["config"]),
            source=data["source"],
            out=Path(run_dir),
            job_id=data["job_id"],
            sites=[],
            labels=data["labels"],
            model=ResolvedModel(Path(m["path"]), m["name"], m["sha256"]),
        )
        roster = [RosterEntry(s["name"], int(s["node_id"]), s["public_key"]) for s in data["sites"]]
        return DeployedRun(prepared, roster)


def write_status(run_dir: Path, state: str, **fields: Any) -> None:
    """Record where the run is (``running``, ``finished``, ``failed``) for ``status``."""
    write_json(Path(run_dir) / STATUS, {"state": state, "updated": time.time(), **fields})


def read_status(run_dir: Path) -> dict[str, Any]:
    """The last status the ServerApp wrote (``{"state": "submitted"}`` before it started)."""
    path = Path(run_dir) / STATUS
    if not path.exists():
        return {"state": "submitted"}
    return json.loads(path.read_text())
