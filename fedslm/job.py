"""Preparing a job on this machine: site data files, labels, the base model, the coordinator.

Shared by ``fedslm simulate`` and ``fedslm centralized``. Everything is validated before the
first file is written, so a bad config or data file leaves the output folder untouched.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedslm import __version__
from fedslm.config import JobConfig
from fedslm.coordinator import Coordinator
from fedslm.data import SiteFiles, infer_labels, materialize_sites
from fedslm.errors import ConfigError
from fedslm.models import get_adapter_state, load_model, resolve_model, select_device
from fedslm.models.registry import ResolvedModel

MANIFEST = "job.json"


@dataclass(frozen=True)
class PreparedJob:
    """A validated job with its site files on disk and its base model resolved."""

    job: JobConfig
    source: str
    out: Path
    sites: list[SiteFiles]
    labels: list[str]
    model: ResolvedModel

    def site_dir(self, name: str) -> Path:
        """Where a simulated site keeps what is its own (data now; later ledger, egress)."""
        return self.out / "sites" / name

    def save(self) -> Path:
        """Write the manifest that simulated sites read to find their files."""
        path = self.out / MANIFEST
        data = {
            "config": self.job.model_dump(mode="json"),
            "source": self.source,
            "labels": self.labels,
            "model": {
                "path": str(self.model.path),
                "name": self.model.name,
                "sha256": self.model.sha256,
            },
            "sites": [{k: str(v) for k, v in asdict(s).items()} for s in self.sites],
        }
        from fedslm.artifacts import write_json

        write_json(path, data)
        return path

    @staticmethod
    def load(path: Path) -> PreparedJob:
        """Read a manifest written by ``save``."""
        data = json.loads(Path(path).read_text())
        return PreparedJob(
            job=JobConfig.model_validate(data["config"]),
            source=data["source"],
            out=Path(path).parent,
            sites=[SiteFiles(s["name"], Path(s["train"]), Path(s["eval"])) for s in data["sites"]],
            labels=data["labels"],
            model=ResolvedModel(
                Path(data["model"]["path"]), data["model"]["name"], data["model"]["sha256"]
            ),
        )


def prepare_job(
    job: JobConfig, source: str, out: Path, site_names: list[str] | None = None
) -> PreparedJob:
    """Resolve the model, split and validate each site's data into ``out/sites/SITE/data``."""
    model = resolve_model(job.model)
    names = site_names or job.federation.site_names
    sites = materialize_sites(job.data, names, job.task.type, job.seed, out / "sites")
    labels: list[str] = []
    if job.task.type == "classification":
        labels = job.data.labels or infer_labels(sites, job.data.label_column)
        if len(labels) < 2:
            raise ConfigError(f"{source}: classification needs at least 2 labels, found {labels}")
    return PreparedJob(job, source, out, sites, labels, model)


def adapter_metadata(p: PreparedJob) -> dict[str, Any]:
    """What PEFT's adapter_config.json does not record, for ``fedslm_adapter.json``."""
    return {
        "fedslm_version": __version__,
        "task": p.job.task.type,
        "num_labels": len(p.labels) if p.labels else None,
        "id2label": {str(i): label for i, label in enumerate(p.labels)} if p.labels else None,
        "base_model": {"name": p.model.name, "sha256": p.model.sha256},
        "lora": p.job.lora.model_dump(mode="json"),
        "max_length": p.job.train.max_length,
        "job_fingerprint": p.job.fingerprint(),
    }


def make_coordinator(p: PreparedJob) -> Coordinator:
    """A coordinator holding the job's initial adapter (same seed as every site)."""
    loaded = load_model(
        p.model.path, p.job.task.type, p.job.lora, p.labels, select_device("cpu"), seed=p.job.seed
    )
    meta = adapter_metadata(p) | {"pad_token_id": loaded.tokenizer.pad_token_id}
    return Coordinator(p.job, p.out, loaded.model, get_adapter_state(loaded.model), meta)
