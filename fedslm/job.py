"""Preparing a job on this machine: site data, site policies, the base model, the coordinator.

Shared by ``fedslm simulate`` and ``fedslm centralized``. Everything is validated before the
first file is written, so a bad config, policy or data file leaves the output folder untouched.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedslm import __version__
from fedslm.artifacts import write_json
from fedslm.config import JobConfig
from fedslm.coordinator import Coordinator
from fedslm.data import SiteFiles, infer_labels, materialize_sites
from fedslm.errors import ConfigError
from fedslm.keys import generate_key
from fedslm.models import get_adapter_state, load_model, resolve_model, select_device
from fedslm.models.registry import ResolvedModel
from fedslm.policy import SitePolicy, merge_mappings, policy_from_mapping

MANIFEST = "job.json"
SITE_KEY, SITE_PUBLIC_KEY = "site.key", "site.pub"


@dataclass(frozen=True)
class SiteSetup:
    """One simulated site: its data files, its own policy, and where its ledger lives."""

    files: SiteFiles
    policy: SitePolicy
    ledger: Path
    # the site's ECDSA public key (OpenSSH line), as the coordinator registers it; the private
    # key stays in the site's folder (site.key) and signs the site's part of the report
    public_key: str = ""

    @property
    def name(self) -> str:
        """The site's name."""
        return self.files.name


@dataclass(frozen=True)
class PreparedJob:
    """A validated job with its sites set up on disk and its base model resolved."""

    job: JobConfig
    source: str
    out: Path
    job_id: str
    sites: list[SiteSetup]
    labels: list[str]
    model: ResolvedModel

    def site_dir(self, name: str) -> Path:
        """Where a simulated site keeps what is its own: data, policy, ledger."""
        return self.out / "sites" / name

    def save(self) -> Path:
        """Write the manifest that simulated sites read to find their files."""
        path = self.out / MANIFEST
        data = {
            "config": self.job.model_dump(mode="json"),
            "source": self.source,
            "job_id": self.job_id,
            "labels": self.labels,
            "model": {
                "path": str(self.model.path),
                "name": self.model.name,
                "sha256": self.model.sha256,
            },
            "sites": [
                {
                    "name": s.name,
                    "train": str(s.files.train),
                    "eval": str(s.files.eval),
                    "policy": s.policy.model_dump(mode="json"),
                    "ledger": str(s.ledger),
                    "public_key": s.public_key,
                }
                for s in self.sites
            ],
        }
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
            job_id=data["job_id"],
            sites=[
                SiteSetup(
                    SiteFiles(s["name"], Path(s["train"]), Path(s["eval"])),
                    SitePolicy.model_validate(s["policy"]),
                    Path(s["ledger"]),
                    s.get("public_key", ""),
                )
                for s in data["sites"]
            ],
            labels=data["labels"],
            model=ResolvedModel(
                Path(data["model"]["path"]), data["model"]["name"], data["model"]["sha256"]
            ),
        )


def site_policies(job: JobConfig, source: str) -> dict[str, SitePolicy]:
    """Each simulated site's policy: ``policy.default`` with ``policy.sites.NAME`` over it."""
    out = {}
    for name in job.federation.site_names:
        raw = merge_mappings(job.policy.default, job.policy.sites.get(name, {}))
        where = f"policy.sites.{name}" if name in job.policy.sites else "policy.default"
        out[name] = policy_from_mapping(raw, f"{source} ({where})")
    return out


def prepare_job(job: JobConfig, source: str, out: Path) -> PreparedJob:
    """Validate policies, resolve the model, and write each site's data, policy and ledger
    location under ``out/sites/SITE``."""
    policies = site_policies(job, source)  # before anything is written
    model = resolve_model(job.model)
    files = materialize_sites(
        job.data, job.federation.site_names, job.task.type, job.seed, out / "sites"
    )
    labels: list[str] = []
    if job.task.type == "classification":
        labels = job.data.labels or infer_labels(files, job.data.label_column)
        if len(labels) < 2:
            raise ConfigError(f"{source}: classification needs at least 2 labels, found {labels}")
    sites = []
    for f in files:
        policy = policies[f.name]
        folder = out / "sites" / f.name
        (folder / "policy.yaml").write_text(yaml.safe_dump(policy.model_dump(mode="json")))
        ledger = Path(policy.ledger) if policy.ledger else folder / "ledger.db"
        # a simulated site makes its own key pair, as a real one does with `fedslm site keygen`
        public = generate_key(folder / SITE_KEY, folder / SITE_PUBLIC_KEY, f"fedslm-site:{f.name}")
        sites.append(SiteSetup(f, policy, ledger, public))
    job_id = f"{job.fingerprint()[:12]}-{uuid.uuid4().hex[:8]}"
    return PreparedJob(job, source, out, job_id, sites, labels, model)


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
        # how the classifier reads the base model (docs/models.md: reloading a mean-pool head)
        "pooling": p.job.model.pooling if p.job.task.type == "classification" else None,
        "logit_scale": p.job.model.logit_scale,
        "job_fingerprint": p.job.fingerprint(),
        "job_id": p.job_id,
    }


def make_coordinator(p: PreparedJob) -> Coordinator:
    """A coordinator holding the job's initial adapter (same seed as every site)."""
    loaded = load_model(
        p.model.path,
        p.job.task.type,
        p.job.lora,
        p.labels,
        select_device("cpu"),
        seed=p.job.seed,
        options=p.job.model,
    )
    meta = adapter_metadata(p) | {"pad_token_id": loaded.tokenizer.pad_token_id}
    if loaded.defaults is not None:
        # what was trained and how: targets, head, pad token, prompt template
        meta["family_defaults"] = loaded.defaults.describe()
    return Coordinator(p.job, p.out, loaded.model, get_adapter_state(loaded.model), meta)
