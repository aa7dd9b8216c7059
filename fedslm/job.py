"""Preparing a job on this machine: site data, site policies, the base model, the coordinator.

Shared by ``fedslm simulate`` and ``fedslm centralized``. ``plan_job`` validates everything
(policies, model, every data row) without writing; ``JobPlan.write`` then puts the sites' files
on disk. A bad config, policy or data file therefore leaves the output folder untouched, and an
old run is only replaced once the new job is known to be valid.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedslm import __version__
from fedslm.artifacts import write_json
from fedslm.config import JobConfig
from fedslm.coordinator import Coordinator
from fedslm.data import SiteFiles, SitePlan, plan_sites, planned_labels, write_rows, write_sites
from fedslm.errors import ConfigError, FederationError
from fedslm.keys import generate_key
from fedslm.labelwords import check_decoder
from fedslm.models import get_adapter_state, load_model, resolve_model, select_device
from fedslm.models.registry import ResolvedModel
from fedslm.policy import AdapterSize, SitePolicy, merge_mappings, policy_from_mapping
from fedslm.privacy.accounting import Segment
from fedslm.privacy.ledger import DatasetFingerprint, LedgerError, simulated_ledger_path

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
    # the folder of simulated ledgers (one per data set) this job's sites use; None: each
    # site's ledger is in its folder of the run (library callers' throwaway jobs)
    ledgers: Path | None = None

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


@dataclass(frozen=True)
class JobPlan:
    """A job validated in full and not yet written: policies, model, every site's rows."""

    job: JobConfig
    source: str
    policies: dict[str, SitePolicy]
    model: ResolvedModel
    sites: list[SitePlan]
    labels: list[str]

    def inputs(self) -> list[Path]:
        """Files and folders the job reads and must not be deleted by replacing a run: the
        data files, the model folder and any ledger a site policy names."""
        data = self.job.data
        found = [Path(data.path)] if data.path else []
        found += [Path(p) for p in (data.sites or {}).values()]
        found += [Path(self.job.model.path)] if self.job.model.path else []
        found += [Path(p.ledger) for p in self.policies.values() if p.ledger]
        return found

    def write(self, out: Path, ledgers: Path | None = None) -> PreparedJob:
        """Write each site's data, policy and key pair under ``out/sites/SITE``.

        ``ledgers`` is the folder of simulated ledgers: a site whose policy names no ledger
        keeps it there, named by its training data's fingerprint, so that runs on the same
        records compose wherever their run folders are. None keeps it in the site's folder of
        the run (``out/sites/SITE/ledger.db``).
        """
        files = write_sites(self.sites, out / "sites")
        if ledgers is not None:
            ledgers.mkdir(parents=True, exist_ok=True)
        sites = []
        for f in files:
            policy = self.policies[f.name]
            folder = out / "sites" / f.name
            (folder / "policy.yaml").write_text(yaml.safe_dump(policy.model_dump(mode="json")))
            ledger = site_ledger(policy, f.train, folder, ledgers)
            # a simulated site makes its own key pair, as a real one does with `fedslm site keygen`
            public = generate_key(
                folder / SITE_KEY, folder / SITE_PUBLIC_KEY, f"fedslm-site:{f.name}"
            )
            sites.append(SiteSetup(f, policy, ledger, public))
        job_id = f"{self.job.fingerprint()[:12]}-{uuid.uuid4().hex[:8]}"
        return PreparedJob(
            self.job, self.source, out, job_id, sites, self.labels, self.model, ledgers
        )


def site_ledger(policy: SitePolicy, train: Path, folder: Path, ledgers: Path | None) -> Path:
    """Where a simulated site's ledger is: the one its policy names, else the ledger of its
    training data in ``ledgers``, else ``folder/ledger.db``."""
    if policy.ledger:
        return Path(policy.ledger)
    if ledgers is None:
        return folder / "ledger.db"
    return simulated_ledger_path(ledgers, DatasetFingerprint.of_file(train)).resolve()


def preflight(plan: JobPlan, ledgers: Path) -> list[str]:
    """Ask every simulated site's policy about the whole job before anything is written, as
    the site will in round 1: the job's rules, and its spend composed with what the site's
    ledger already holds for the data set. Reads only.

    Returns one line per refusing site, naming its ledger (a site may decline; the others
    train without it). Raises ``FederationError`` with one line per site naming its ledger
    when a site's ledger cannot be used (corrupt, locked, read-only, another data set's, in a
    missing folder): the site would fail in round 1, and on this machine the operator can fix
    it. Raises it too when too few sites would be left for ``federation.min_sites``: such a
    run could not train at all.
    """
    from fedslm.acceptance import job_refusal, measure_adapter, site_lora
    from fedslm.privacy.anchors import anchor_refusal
    from fedslm.privacy.private_training import plan_privacy

    job, refusals, faults = plan.job, [], []
    owners: dict[Path, tuple[str, str]] = {}  # ledger file -> (site, data set) using it
    adapters: dict[int, AdapterSize] = {}  # by the rank a site trains at: one build per rank
    with tempfile.TemporaryDirectory(prefix="fedslm-preflight-") as tmp:
        for site in plan.sites:
            policy = plan.policies[site.name]
            # the ledger is named by the fingerprint of the file the site will train on: the
            # same rows, written the same way, give the same bytes
            train = Path(tmp) / site.name / "train.jsonl"
            write_rows(site.train, train)
            fp = DatasetFingerprint.of_file(train)
            ledger = site_ledger(policy, train, Path(tmp), ledgers)
            other, other_data = owners.setdefault(ledger.resolve(), (site.name, fp.key))
            if other_data != fp.key:
                # e.g. one policy.default.ledger for every site: the second site's first
                # record would find the ledger bound to the first site's data set
                faults.append(
                    f"site {site.name}: ledger {ledger}: is also the ledger of site {other}, "
                    "whose data set differs; a ledger holds one data set: give each site its own"
                )
                continue
            try:
                spent = _usable_ledger(ledger, fp, created_by_run=not policy.ledger)
            except LedgerError as exc:
                reason = str(exc).removeprefix(f"{ledger}: ")
                faults.append(f"site {site.name}: ledger {ledger}: {reason}")
                continue
            broken = anchor_refusal(ledger)  # the heads in the ledger's journal
            if broken:
                refusals.append(f"site {site.name}: {broken}")
                continue
            privacy = plan_privacy(job, len(site.train), f"{plan.source} (site {site.name})")
            rank = site_lora(job, site.name, policy).r
            if rank not in adapters:
                adapters[rank] = measure_adapter(job, plan.model, plan.labels, site.name, policy)
            reasons = job_refusal(
                policy, job, privacy, plan.model, spent, site=site.name, adapter=adapters[rank]
            )
            if reasons:
                refusals.append(f"site {site.name} (ledger {ledger}): {'; '.join(reasons)}")
    if faults:
        raise FederationError(
            f"{plan.source}: {len(faults)} site(s) cannot use their privacy ledger; nothing "
            "was written:\n  " + "\n  ".join(faults + refusals)
        )
    accepting = len(plan.sites) - len(refusals)
    if refusals and accepting < job.federation.required_sites:
        raise FederationError(
            f"{plan.source}: {len(refusals)} of {len(plan.sites)} sites refuse this job, leaving "
            f"{accepting} (federation.min_sites needs {job.federation.required_sites}); "
            "nothing was written:\n  " + "\n  ".join(refusals)
        )
    return refusals


def _usable_ledger(path: Path, fp: DatasetFingerprint, created_by_run: bool) -> list[Segment]:
    """What the ledger at ``path`` holds for data set ``fp``, after checking that the site can
    record its spend there in round 1: readable, an intact chain of this data set, writable
    and not locked by another process. A ledger that does not exist yet must be creatable
    (its folder exists and is writable; ``created_by_run``: the run makes the folder). Writes
    nothing to the ledger. Raises ``LedgerError`` naming the file."""
    from fedslm.privacy.ledger import PrivacyLedger

    if not path.exists():
        folder = path.parent
        if not folder.is_dir() and not created_by_run:
            raise LedgerError(f"{path}: its folder {folder} does not exist; create it")
        if folder.is_dir() and not os.access(folder, os.W_OK):
            raise LedgerError(f"{path}: cannot create the ledger: folder {folder} is read-only")
        return []
    # (os.access sees an immutable file as unwritable, even for root)
    if path.is_file() and not os.access(path, os.W_OK):
        raise LedgerError(
            f"{path}: the ledger file is read-only (or immutable), so the site could not "
            "record its spend; make it writable"
        )
    with PrivacyLedger(path, create=False) as opened:
        opened.check_dataset(fp)
        spent = opened.segments(fp)  # LedgerError on a broken chain: never under-count
        # take the write lock and let it go: another process holding the ledger would make
        # the site's first record wait and fail (an empty transaction writes nothing)
        with opened.transaction("checking that the ledger can be written"):
            pass
    return spent


def plan_job(job: JobConfig, source: str) -> JobPlan:
    """Validate policies, resolve the model and read every site's data; write nothing."""
    policies = site_policies(job, source)
    model = resolve_model(job.model)
    if job.task.label_words:
        check_decoder(model.path)
    plans = plan_sites(job.data, job.federation.site_names, job.task.type, job.seed)
    labels: list[str] = []
    if job.task.type == "classification":
        labels = job.data.labels or planned_labels(plans)
        if len(labels) < 2:
            raise ConfigError(f"{source}: classification needs at least 2 labels, found {labels}")
    return JobPlan(job, source, policies, model, plans, labels)


def prepare_job(job: JobConfig, source: str, out: Path, ledgers: Path | None = None) -> PreparedJob:
    """Validate policies, resolve the model, and write each site's data, policy and ledger
    location under ``out/sites/SITE`` (``ledgers``: see ``JobPlan.write``)."""
    return plan_job(job, source).write(out, ledgers)


def adapter_metadata(p: PreparedJob) -> dict[str, Any]:
    """What PEFT's adapter_config.json does not record, for ``fedslm_adapter.json``."""
    return {
        "fedslm_version": __version__,
        "task": p.job.task.type,
        # label words: a causal LM that writes the label (load_exported builds it as one)
        "classifier": p.job.task.classifier if p.job.task.type == "classification" else None,
        "label_prompt": p.job.task.label_prompt if p.job.task.label_words else None,
        "num_labels": len(p.labels) if p.labels else None,
        "id2label": {str(i): label for i, label in enumerate(p.labels)} if p.labels else None,
        "base_model": {"name": p.model.name, "sha256": p.model.sha256},
        "lora": p.job.lora.model_dump(mode="json"),
        "max_length": p.job.train.max_length,
        # how the classifier reads the base model (docs/models.md: reloading a mean-pool head)
        "pooling": p.job.model.pooling
        if p.job.task.type == "classification" and not p.job.task.label_words
        else None,
        "logit_scale": p.job.model.logit_scale,
        "job_fingerprint": p.job.fingerprint(),
        "job_id": p.job_id,
    }


def make_coordinator(p: PreparedJob, anchors_file: Path | None = None) -> Coordinator:
    """A coordinator holding the job's initial adapter (same seed as every site);
    ``anchors_file`` keeps every site's last ledger head across runs (deployed only: simulated
    site names are not identities from one simulation to the next)."""
    loaded = load_model(
        p.model.path,
        p.job.task.model_task,
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
    state = get_adapter_state(loaded.model)
    return Coordinator(p.job, p.out, loaded.model, state, meta, anchors_file)
