"""Reading a run folder: the files a report and its verification are computed from.

A run folder is what ``fedslm simulate`` or ``fedslm centralized`` wrote: ``privacy.json``,
``metrics.jsonl``, ``adapter/``, ``sites/SITE/``, the ``fedslm-run.json`` marker and, for
simulations, the ``job.json`` manifest. Simulated sites' ledgers are outside the run folder
(one per data set, see ``fedslm.privacy.ledger.simulated_ledger_dir``); job.json, or for a
centralized run the marker, says where. Nothing here interprets a figure; it only finds and
parses files, and says which file is missing or unreadable (``ReportInputError``, exit code 2
on the command line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedslm.errors import DataError, FedSLMError
from fedslm.privacy.ledger import DatasetFingerprint, LedgerEntry, LedgerError, PrivacyLedger
from fedslm.report.model import TensorInfo
from fedslm.runfolder import read_marker

PRIVACY_FILE = "privacy.json"
METRICS_FILE = "metrics.jsonl"
MANIFEST_FILE = "job.json"
ADAPTER_DIR = "adapter"
ADAPTER_META = "fedslm_adapter.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASELINES_DIR = "baselines"


class ReportInputError(FedSLMError):
    """A run folder or report file cannot be read (missing, not JSON, wrong shape)."""


@dataclass(frozen=True)
class SiteLocation:
    """Where one site's own files are. ``policy`` is None when no site policy applied."""

    name: str
    train: Path
    eval: Path
    ledger: Path
    policy: dict[str, Any] | None


@dataclass(frozen=True)
class LedgerView:
    """A site ledger as read once: its entries, the head it records, and its own check.

    ``problems`` is ``PrivacyLedger.verify()`` (empty when the chain is intact and every stored
    epsilon recomputes); ``error`` is set instead when the file cannot be opened at all.
    """

    path: Path
    entries: tuple[LedgerEntry, ...]
    head: tuple[int, str] | None
    bound_dataset: str | None
    problems: tuple[str, ...]
    error: str | None = None


@dataclass(frozen=True)
class RunFiles:
    """The parsed files of one run folder."""

    root: Path
    privacy: dict[str, Any]
    metrics: list[dict[str, Any]]
    manifest: dict[str, Any] | None
    adapter_meta: dict[str, Any] | None
    sites: dict[str, SiteLocation]

    @property
    def job_id(self) -> str | None:
        """The job's id, from job.json or else from the adapter's metadata."""
        for source in (self.manifest, self.adapter_meta):
            if source and source.get("job_id"):
                return str(source["job_id"])
        return None

    @property
    def config(self) -> dict[str, Any] | None:
        """The validated job config as job.json recorded it (None without a manifest)."""
        return self.manifest.get("config") if self.manifest else None

    @property
    def adapter_weights(self) -> Path:
        """The final adapter's tensors."""
        return self.root / ADAPTER_DIR / ADAPTER_WEIGHTS

    @property
    def incomplete(self) -> str | None:
        """Why the run is not complete, as privacy.json's ``run`` says (None: complete, or a
        run from before fedslm recorded it)."""
        run = self.privacy.get("run")
        if not isinstance(run, dict) or run.get("status") != "incomplete":
            return None
        done, planned = run.get("rounds_finished"), run.get("rounds_planned")
        adapter = "" if run.get("adapter") else "; no final adapter/"
        if not run.get("stopped"):
            return (
                f"run interrupted after round {done} of {planned} (or still running): its "
                f"files are as round {done} left them{adapter}; the checks cover what exists"
            )
        return f"run incomplete: {run.get('note')}{adapter}"

    def rel(self, path: Path) -> str:
        """``path`` relative to the run folder when inside it (what a report shows)."""
        try:
            return str(path.resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(path)


def load_run(root: str | Path) -> RunFiles:
    """Parse a run folder. Raises ``ReportInputError`` naming the file that is missing or bad."""
    root = Path(root)
    if not root.is_dir():
        raise ReportInputError(f"{root}: not a run folder (no such directory)")
    if not (root / PRIVACY_FILE).exists() and read_marker(root) is not None:
        raise ReportInputError(
            f"{root}: run interrupted before its first round finished (no {PRIVACY_FILE}, "
            "which a run writes when each round finishes); there is nothing to report yet"
        )
    privacy = read_json(root / PRIVACY_FILE)
    if not isinstance(privacy, dict) or not isinstance(privacy.get("sites"), dict):
        raise ReportInputError(f"{root / PRIVACY_FILE}: has no 'sites' mapping; not a fedslm run")
    metrics = read_metrics(root / METRICS_FILE)
    manifest_path = root / MANIFEST_FILE
    manifest = read_json(manifest_path) if manifest_path.exists() else None
    meta_path = root / ADAPTER_DIR / ADAPTER_META
    adapter_meta = read_json(meta_path) if meta_path.exists() else None
    return RunFiles(
        root=root,
        privacy=privacy,
        metrics=metrics,
        manifest=manifest,
        adapter_meta=adapter_meta,
        sites=_locate_sites(root, privacy, manifest),
    )


def read_json(path: Path) -> Any:
    """Parse one JSON file; ``ReportInputError`` names it when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportInputError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportInputError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ReportInputError(f"{path}: not valid JSON ({exc})") from None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The per-round records of ``metrics.jsonl``, each checked to be an object with a round."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ReportInputError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportInputError(f"{path}: cannot read: {exc}") from None
    out = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportInputError(f"{path}: line {i} is not valid JSON ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("round"), int):
            raise ReportInputError(f"{path}: line {i} is not a round record (no 'round')")
        out.append(record)
    return out


def read_ledger(path: Path) -> LedgerView:
    """Read a site ledger and run its own verification; never raises for a bad file."""
    try:
        with PrivacyLedger(path, create=False) as ledger:
            entries, _ = ledger._snapshot()  # entries even when the chain is broken
            return LedgerView(
                path=path,
                entries=tuple(entries),
                head=ledger.head(),
                bound_dataset=ledger.bound_dataset,
                problems=tuple(ledger.verify()),
            )
    except LedgerError as exc:
        return LedgerView(path, (), None, None, (), error=str(exc))


def _locate_sites(
    root: Path, privacy: dict[str, Any], manifest: dict[str, Any] | None
) -> dict[str, SiteLocation]:
    """Each site's files: as job.json names them, or by the run folder's layout without it."""
    if manifest is not None:
        try:
            return {
                s["name"]: SiteLocation(
                    name=s["name"],
                    train=_inside(root, s["name"], Path(s["train"])),
                    eval=_inside(root, s["name"], Path(s["eval"])),
                    ledger=_inside(root, s["name"], Path(s["ledger"])),
                    policy=s.get("policy"),
                )
                for s in manifest["sites"]
            }
        except (KeyError, TypeError) as exc:
            raise ReportInputError(
                f"{root / MANIFEST_FILE}: sites entry without {exc}; not a fedslm manifest"
            ) from None
    # `fedslm centralized` writes no manifest; its pooled site follows the simulated layout,
    # with its ledger where the run's marker says (the ledger folder), else in its folder
    ledgers = (read_marker(root) or {}).get("ledgers") or {}
    sites = {}
    for name in privacy["sites"]:
        folder = root / "sites" / name
        policy_file = folder / "policy.yaml"
        policy = _read_yaml(policy_file) if policy_file.is_file() else None
        sites[name] = SiteLocation(
            name,
            folder / "data" / "train.jsonl",
            folder / "data" / "eval.jsonl",
            Path(ledgers[name]) if isinstance(ledgers.get(name), str) else folder / "ledger.db",
            policy,
        )
    return sites


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ReportInputError(f"{path}: cannot read the site policy: {exc}") from None


def _inside(root: Path, site: str, recorded: Path) -> Path:
    """A path job.json recorded, found again in this run folder if the folder has moved.

    Paths under ``<out>/sites/SITE/`` are taken relative to this run folder; anything else
    (a ledger a site keeps elsewhere, across jobs) is used as recorded.
    """
    parts = recorded.parts
    for i in range(len(parts) - 1):
        if parts[i] == "sites" and parts[i + 1] == site:
            here = root.joinpath("sites", site, *parts[i + 2 :])
            if here.exists() or not recorded.exists():
                return here
    return recorded if recorded.is_absolute() else root / recorded


class RunContext:
    """A run folder with its ledgers read at most once each, and the views every figure and
    check shares: which sites there are, which rounds each trained, its entries for this job."""

    def __init__(self, run: RunFiles) -> None:
        self.run = run
        self._ledgers: dict[str, LedgerView] = {}
        self._fingerprints: dict[Path, DatasetFingerprint | DataError] = {}

    def fingerprint(self, path: Path) -> DatasetFingerprint:
        """sha256 and row count of a data file, hashed once (site data can be large).

        Raises ``DataError`` for a missing or unreadable file, every time it is asked.
        """
        key = path.resolve()
        if key not in self._fingerprints:
            try:
                self._fingerprints[key] = DatasetFingerprint.of_file(path)
            except DataError as exc:
                self._fingerprints[key] = exc
        found = self._fingerprints[key]
        if isinstance(found, DataError):
            raise found
        return found

    def site_names(self) -> list[str]:
        """Sites in manifest order, then any others privacy.json or metrics.jsonl name."""
        names = list(self.run.sites)
        for name in self.run.privacy["sites"]:
            if name not in names:
                names.append(name)
        return names

    def ledger(self, site: str) -> LedgerView | None:
        """The site's ledger, or None when the run does not say where it is."""
        loc = self.run.sites.get(site)
        if loc is None:
            return None
        if site not in self._ledgers:
            self._ledgers[site] = read_ledger(loc.ledger)
        return self._ledgers[site]

    def trained_rounds(self, site: str) -> list[int]:
        """Rounds in which the coordinator accepted a training update from ``site``."""
        return [
            r["round"]
            for r in self.run.metrics
            if isinstance(r.get("sites"), dict) and "steps" in (r["sites"].get(site) or {})
        ]

    def job_entries(self, site: str) -> list[LedgerEntry]:
        """The site's ledger entries for this job, in ledger order."""
        view = self.ledger(site)
        job_id = self.run.job_id
        if view is None or job_id is None:
            return []
        return [e for e in view.entries if e.job_id == job_id]

    def accepted_entries(self, site: str, up_to_round: int | None = None) -> list[LedgerEntry]:
        """This job's entries for rounds the coordinator accepted (what privacy.json counts)."""
        accepted = set(self.trained_rounds(site))
        return [
            e
            for e in self.job_entries(site)
            if e.round in accepted and (up_to_round is None or e.round <= up_to_round)
        ]


def adapter_tensors(path: Path) -> list[TensorInfo]:
    """Names, shapes, dtypes and sizes of the tensors in a safetensors file (no values)."""
    from safetensors import safe_open

    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}
    out = []
    with safe_open(str(path), framework="numpy") as fh:
        for name in sorted(fh.keys()):
            sl = fh.get_slice(name)
            shape, dtype = list(sl.get_shape()), str(sl.get_dtype())
            n = 1
            for d in shape:
                n *= d
            out.append(
                TensorInfo(name=name, shape=shape, dtype=dtype, bytes=n * sizes.get(dtype, 0))
            )
    return out
