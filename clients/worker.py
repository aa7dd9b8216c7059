"""The site worker: a long-lived process part that holds a deployed site's model, data, policy
and ledger, and answers the ClientApp over a Unix socket (``fedslm.clients.bridge``).

Flower starts a fresh ClientApp process for every message; building a ``Site`` there (torch
import, model load) costs 16-26 s per round. The worker builds one ``Site`` per job, the first
time the job's message arrives, keeps the last ``MAX_JOBS`` of them, and answers each request
with ``fedslm.clients.handlers``. Requests are served one at a time (a site trains one thing at
a time); a second connection waits up to ``WAIT_S`` for its turn and then gets a clear "busy"
error. A malformed request gets an error reply that says what is wrong, and the worker keeps
serving.

What a deployed job message must carry (``config``): ``round``, ``job`` (the JobConfig as
JSON), ``job-id``, ``model-sha256`` (the coordinator's base weights), ``fedslm-version``,
``flwr-version``; the site refuses versions it does not accept (``daemon.accept_versions``, and
Flower's major.minor), a base model whose weights differ from its own, and a job that is not
``data.at_sites``. The site reads its own data file (``policy.data``), splits it with the job's
``eval_fraction`` and seed under ``state_dir/jobs/<job-id>/``, and charges its ledger under the
fingerprint of the whole file.

Secrets stay in the worker: its noise secret (``state_dir/site.secret``), and the secure
aggregation state (private keys, the unmasked update), which is kept here per (run, node) and
never handed to the ClientApp process, whose code the coordinator ships.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedslm.clients.bridge import (
    MAX_FRAME_BYTES,
    PROTOCOL,
    ErrorCode,
    FrameError,
    decode_records,
    encode_records,
    recv_message,
    send_message,
    validate_request_header,
)
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict

from fedslm import __version__ as FEDSLM_VERSION
from fedslm.errors import ConfigError, DataError, FedSLMError, ModelError
from fedslm.policy import SitePolicy

if TYPE_CHECKING:
    from fedslm.config import JobConfig
    from fedslm.privacy.ledger import DatasetFingerprint
    from fedslm.site import Site

SOCKET_NAME = "worker.sock"
SECRET_NAME = "site.secret"
SECRET_BYTES = 32
MAX_JOBS = 2  # Sites kept loaded (LRU): one model each
WAIT_S = 900.0  # how long a request waits for the one in progress before "busy"
READ_TIMEOUT_S = 60.0  # to receive a whole request once connected
MAX_CONNECTIONS = 8  # requests reading or waiting at once; more are turned away
_MAX_SECRET_STATES = 16
_SOCKET_PATH_MAX = 107  # sockaddr_un.sun_path, less the terminating NUL
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

Log = Callable[[str], None]


class RequestError(FedSLMError):
    """A request the worker cannot answer as asked (bad content, a bad job); its message goes
    back to the ClientApp, and from there to the coordinator, as an error reply."""


class Refused(FedSLMError):
    """The site will not run this job: answered with a refusal the coordinator logs."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


@dataclass(frozen=True)
class _Failure:
    code: ErrorCode  # BAD_REQUEST or FAILED
    error: str


@dataclass
class _Job:
    site: Site
    job_sha256: str  # of the job JSON as sent
    model_sha256: str


def accepts_version(version: str, accepted: list[str]) -> bool:
    """Whether ``version`` is in ``accepted`` (exact entries, or prefixes ending in '*'); an
    empty list accepts exactly this site's own fedslm version."""
    for entry in accepted or [FEDSLM_VERSION]:
        if entry.endswith("*") and version.startswith(entry[:-1]):
            return True
        if version == entry:
            return True
    return False


def version_refusal(fedslm_version: str, flwr_version: str, accepted: list[str]) -> list[str]:
    """Reasons to refuse a coordinator running ``fedslm_version`` and ``flwr_version``."""
    reasons = []
    if not accepts_version(fedslm_version, accepted):
        allowed = ", ".join(accepted) if accepted else f"{FEDSLM_VERSION} (its own version)"
        reasons.append(
            f"the coordinator runs fedslm {fedslm_version}; this site runs fedslm "
            f"{FEDSLM_VERSION} and accepts jobs from {allowed} (daemon.accept_versions): "
            f"upgrade the site to fedslm {fedslm_version} (and list it in "
            f"daemon.accept_versions if that is set), or run the coordinator on an accepted "
            "version"
        )
    ours = installed_version("flwr")
    if _minor(flwr_version) != _minor(ours):
        reasons.append(
            f"the coordinator runs Flower {flwr_version}; this site runs Flower {ours}; Flower "
            f"peers must share major.minor: upgrade the older side to flwr=={flwr_version} or "
            f"{ours} so both run {max(_minor(flwr_version), _minor(ours))}.x"
        )
    return reasons


def _minor(v: str) -> str:
    return ".".join(v.strip().split(".")[:2])


def load_or_create_secret(path: Path) -> bytes:
    """The site's noise secret: 32 random bytes made once (mode 0600), never overwritten,
    never sent anywhere."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        data = path.read_bytes()
        if len(data) != SECRET_BYTES:
            raise ConfigError(
                f"{path}: the site's noise secret must be {SECRET_BYTES} bytes, found "
                f"{len(data)}; restore it from a backup (a new one is made only when the file "
                "does not exist)"
            ) from None
        return data
    secret = os.urandom(SECRET_BYTES)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
        fh.flush()
        os.fsync(fh.fileno())
    return secret


class Worker:
    """One site's worker: ``start`` binds the socket (``state_dir/worker.sock``, mode 0660) and
    serves in a background thread until ``stop``; ``handle`` answers one request directly."""

    def __init__(
        self,
        policy: SitePolicy,
        *,
        log: Log | None = None,
        max_frame: int = MAX_FRAME_BYTES,
        wait_s: float = WAIT_S,
        max_jobs: int = MAX_JOBS,
    ) -> None:
        if policy.daemon is None:
            raise ConfigError("the site policy has no daemon section; `fedslm site start` needs it")
        if policy.data is None:
            raise ConfigError("the site policy names no data file (data:); a site trains on it")
        self.policy = policy
        self.settings = policy.daemon
        self.name = policy.daemon.name
        self.state_dir = Path(policy.daemon.state_dir)
        self.socket_path = self.state_dir / SOCKET_NAME
        ledger = policy.ledger_file()
        assert ledger is not None  # data is set
        self.ledger_path = ledger
        self.log: Log = log or (lambda line: None)
        self.max_frame = max_frame
        self.wait_s = wait_s
        self.max_jobs = max_jobs
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._secret_states: OrderedDict[tuple[int, int], dict[str, Any]] = OrderedDict()
        self._work = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._current = ""
        self._started_at = 0.0
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._secret: bytes | None = None
        self._releases: Any = None  # handlers.ReleaseStore, made with the first job
        self._last_replay = False  # whether the last train request was answered from it

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Create ``state_dir``, the noise secret and the socket; serve in a thread."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        # the worker's own folders: the SuperNode's user (group of state_dir) reads none of them
        for private in ("jobs", "releases"):
            (self.state_dir / private).mkdir(exist_ok=True, mode=0o700)
        self._secret = load_or_create_secret(self.state_dir / SECRET_NAME)
        self._server = self._bind()
        self._thread = threading.Thread(target=self._accept_loop, name="fedslm-worker", daemon=True)
        self._thread.start()
        # torch and the site code load in the background: the first job then pays only for
        # its model, and a daemon with a bad setting still fails fast
        threading.Thread(target=_warm_up, name="fedslm-warm-up", daemon=True).start()

    def stop(self) -> None:
        """Stop accepting, close the socket and remove its file (a request in progress is
        abandoned when the process exits)."""
        self._stop.set()
        if self._server is not None:
            self._server.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.socket_path.unlink(missing_ok=True)

    def _bind(self) -> socket.socket:
        path = self.socket_path
        if len(os.fsencode(path)) > _SOCKET_PATH_MAX:
            raise ConfigError(
                f"daemon.state_dir: the worker socket {path} would be "
                f"{len(os.fsencode(path))} bytes long; Unix sockets allow "
                f"{_SOCKET_PATH_MAX}: choose a shorter state_dir"
            )
        if path.exists() or path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # left by a worker that died: nobody listens
            else:
                raise FedSLMError(
                    f"another site worker is already listening at {path}; stop it first"
                )
            finally:
                probe.close()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        # group may connect (the SuperNode's user), nobody else; until this chmod the umask's
        # mode applies, which gives no one else write (connect) permission either
        os.chmod(path, 0o660)
        server.listen(MAX_CONNECTIONS)
        server.settimeout(0.5)  # to notice stop()
        return server

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                self.log(f"accepting a connection failed: {exc}")  # e.g. out of file handles
                time.sleep(0.5)
                continue
            if not self._slots.acquire(blocking=False):
                self._reply_error(
                    conn, ErrorCode.BUSY, "the site worker has too many requests open"
                )
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    # -- one connection ----------------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(READ_TIMEOUT_S)
            try:
                header, body, raw_state = recv_message(conn, self.max_frame)
                kind, node_id, run_id = validate_request_header(header)
                content = decode_records(body, "content")
                state = decode_records(raw_state, "state")
            except FrameError as exc:
                self.log(f"bad request refused: {exc}")
                self._reply_error(conn, ErrorCode.BAD_REQUEST, str(exc))
                return
            except (ConnectionError, OSError) as exc:
                self.log(f"a connection ended before its request was read: {exc}")
                return
            if not self._work.acquire(timeout=self.wait_s):
                busy = time.monotonic() - self._started_at
                self._reply_error(
                    conn,
                    ErrorCode.BUSY,
                    f"the site is busy with {self._current or 'another request'} (for "
                    f"{busy:.0f} s); waited {self.wait_s:.0f} s for it",
                )
                return
            try:
                self._current = _describe_request(kind, content)
                self._started_at = time.monotonic()
                answer = self._answer(kind, node_id, run_id, content, state)
            finally:
                self._current = ""
                self._work.release()
            if isinstance(answer, _Failure):
                self._reply_error(conn, answer.code, answer.error)
                return
            reply, new_state = answer
            conn.settimeout(READ_TIMEOUT_S)
            send_message(
                conn, {"protocol": PROTOCOL, "ok": True}, encode_records(reply),
                encode_records(new_state),
            )  # fmt: skip
        except OSError as exc:
            self.log(f"could not send a reply (the ClientApp went away?): {exc}")
        finally:
            conn.close()
            self._slots.release()

    def _answer(
        self, kind: str, node_id: int, run_id: int, content: RecordDict, state: RecordDict
    ) -> tuple[RecordDict, RecordDict] | _Failure:
        """``handle`` with its timing logged; an exception becomes a ``_Failure``."""
        start = time.perf_counter()
        what = _describe_request(kind, content)
        if kind == MessageType.TRAIN:
            self.log(f"{what}: started")  # a round can take long: say so before it ends
        try:
            reply, new_state = self.handle(kind, node_id, run_id, content, state)
        except RequestError as exc:
            self.log(f"{what} {time.perf_counter() - start:.2f} s: bad request: {exc}")
            return _Failure(ErrorCode.BAD_REQUEST, str(exc))
        except Exception as exc:  # a bug, or a failure the ClientApp must report as an error
            self.log(f"{what} {time.perf_counter() - start:.2f} s: failed: {exc!r}")
            self.log(traceback.format_exc().rstrip())
            return _Failure(ErrorCode.FAILED, f"{type(exc).__name__}: {exc}")
        self.log(f"{what} {time.perf_counter() - start:.2f} s: {self._outcome(reply)}")
        return reply, new_state

    def _outcome(self, reply: RecordDict) -> str:
        from fedslm.wire.codec import decode_refusal

        refusal = decode_refusal(reply)
        if refusal is not None:
            return "refused: " + "; ".join(refusal.reasons)
        if self._last_replay:
            return "sent again (replay of the stored release)"
        return "sent"

    @staticmethod
    def _reply_error(conn: socket.socket, code: ErrorCode, error: str) -> None:
        header = {"protocol": PROTOCOL, "ok": False, "code": code, "error": error}
        try:
            conn.settimeout(5)
            send_message(conn, header, b"", b"")
        except OSError:
            pass  # the peer is gone; nothing to tell

    # -- one request -------------------------------------------------------------------------

    def handle(
        self, kind: str, node_id: int, run_id: int, content: RecordDict, state: RecordDict
    ) -> tuple[RecordDict, RecordDict]:
        """Answer one request: (reply content, the node's new state).

        Raises ``RequestError`` for a request that cannot be answered (it names what is
        wrong); a job the site will not run is answered with a refusal, logged in the egress
        log like every message the site sends.
        """
        from fedslm.clients.handlers import HANDLERS, SECRET_STATE_KEYS, handle_train

        from fedslm.messages import (
            ROUND,
            DeployedJob,
            StageInstruction,
            TrainInstruction,
            config_anchor,
        )

        self._last_replay = False
        config = content.get("config")
        if not isinstance(config, ConfigRecord):
            raise RequestError("the message has no 'config' ConfigRecord")
        round_num = config.get(ROUND.name)
        if isinstance(round_num, bool) or not isinstance(round_num, int) or round_num < 0:
            raise RequestError(f"config {ROUND.name!r} must be an integer >= 0, got {round_num!r}")
        evaluate = TrainInstruction.EVALUATE_ROUND.name
        evaluated = config.get(evaluate)
        if evaluated is not None and (
            kind != MessageType.TRAIN
            or isinstance(evaluated, bool)
            or not isinstance(evaluated, int)
            or not 0 < evaluated < round_num
        ):
            raise RequestError(
                f"config {evaluate!r} ({evaluated!r}) belongs in a train message only, as "
                f"an earlier round than {ROUND.name!r} ({round_num})"
            )
        if kind == MessageType.TRAIN:
            try:
                config_anchor(config, round_num)
            except ValueError as exc:
                raise RequestError(str(exc)) from None
        stage = StageInstruction.STAGE.name
        if kind == MessageType.QUERY and not isinstance(config.get(stage), str):
            raise RequestError(f"a query message needs config {stage!r} (secure aggregation)")
        needs_adapter = kind in (MessageType.TRAIN, MessageType.EVALUATE)
        if needs_adapter and not isinstance(content.get("arrays"), ArrayRecord):
            raise RequestError(f"a {kind} message needs the global adapter ('arrays')")
        try:
            job = self._job(config)
        except Refused as refusal:
            job_id = str(config.get(DeployedJob.JOB_ID.name, ""))
            return self._refusal(job_id, round_num, refusal.reasons), _public(state)
        # the secure-aggregation state lives here: never taken from, nor given to, the
        # ClientApp process (a state it sent could carry keys the coordinator knows)
        key = (run_id, node_id)
        merged = RecordDict({k: v for k, v in state.items() if k not in SECRET_STATE_KEYS})
        for k, v in self._secret_states.get(key, {}).items():
            merged[k] = v
        if kind == MessageType.TRAIN:
            if self._releases is None:
                from fedslm.clients.handlers import ReleaseStore

                self._releases = ReleaseStore(self.state_dir / "releases")
            before = self._releases.replays
            reply = handle_train(job.site, content, merged, node_id, releases=self._releases)
            self._last_replay = self._releases.replays > before
        else:
            reply = HANDLERS[kind](job.site, content, merged, node_id)
        kept = {k: merged[k] for k in SECRET_STATE_KEYS if k in merged}
        self._secret_states.pop(key, None)
        if kept:
            self._secret_states[key] = kept
            while len(self._secret_states) > _MAX_SECRET_STATES:
                self._secret_states.popitem(last=False)
        return reply, _public(merged)

    def _refusal(self, job_id: str, round_num: int, reasons: list[str]) -> RecordDict:
        """A refusal from before any Site exists, checked and logged like ``Site.release``."""
        from fedslm.wire.codec import encode_payload

        from fedslm.egress import Payload, check, describe
        from fedslm.messages import Refusal
        from fedslm.privacy.egress_log import record_egress
        from fedslm.privacy.ledger import PrivacyLedger

        metrics, fields = Refusal(self.name, reasons).wire_values()
        payload = Payload("refusal", {}, metrics, fields)
        record = describe(payload)
        problems = check(record, {}, self.policy.max_bytes_per_round)
        if problems:
            record["blocked_because"] = problems
        logged_id = job_id if _JOB_ID.fullmatch(job_id) else "(invalid job id)"
        with PrivacyLedger(self.ledger_path) as ledger:
            status = "blocked" if problems else "sent"
            record_egress(ledger, logged_id, round_num, status, record)
        if problems:
            raise RequestError(f"the refusal itself was blocked by the egress guard: {problems}")
        return encode_payload(payload)

    # -- jobs --------------------------------------------------------------------------------

    def _job(self, config: ConfigRecord) -> _Job:
        """The loaded site for the job in ``config`` (built on its first message)."""
        from fedslm.messages import MANIFEST, DeployedJob

        job_key, id_key = DeployedJob.JOB.name, DeployedJob.JOB_ID.name
        if MANIFEST.name in config and job_key not in config:
            raise RequestError(
                f"this is a simulation message (config {MANIFEST.name!r}); a deployed site "
                f"needs the job itself (config {job_key!r}, {id_key!r}, ...) from a deployed "
                "coordinator"
            )
        try:
            deployed = DeployedJob.from_config(config)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        # versions first: another version's job may not even parse here
        reasons = version_refusal(
            deployed.fedslm_version, deployed.flwr_version, self.settings.accept_versions
        )
        if reasons:
            raise Refused(reasons)
        job_id, text = deployed.job_id, deployed.job
        if not _JOB_ID.fullmatch(job_id):
            raise RequestError(
                f"job id {job_id!r} must be 1-128 letters, digits, '.', '_' or '-' (it names "
                "folders at the site)"
            )
        model_sha = deployed.model_sha256
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        cached = self._jobs.get(job_id)
        if cached is not None:
            if cached.job_sha256 != digest or cached.model_sha256 != model_sha:
                raise Refused(
                    [f"job id {job_id} is in use at this site for a different job; a new job "
                     "needs a new job id"]
                )  # fmt: skip
            self._jobs.move_to_end(job_id)
            return cached
        job = self._parse_job(text)
        site = self._build_site(job, job_id, model_sha)
        entry = _Job(site, digest, model_sha)
        self._jobs[job_id] = entry
        while len(self._jobs) > self.max_jobs:
            _, old = self._jobs.popitem(last=False)
            self.log(f"job {old.site.job_id}: unloaded (keeping the last {self.max_jobs} jobs)")
        return entry

    @staticmethod
    def _parse_job(text: str) -> JobConfig:
        from pydantic import ValidationError

        from fedslm.config import JobConfig

        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RequestError(f"config 'job' is not JSON: {exc}") from None
        try:
            return JobConfig.model_validate(raw)
        except ValidationError as exc:
            problems = [
                f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
                for e in exc.errors()[:5]
            ]
            raise RequestError(f"config 'job' is not a valid job: {'; '.join(problems)}") from None

    def _build_site(self, job: JobConfig, job_id: str, model_sha: str) -> Site:
        from fedslm.site import Site, SiteInputs

        reasons = self._job_refusal(job)
        if reasons:
            raise Refused(reasons)
        model = self._model(job, model_sha)
        labels = list(job.data.labels or [])
        started = time.perf_counter()
        try:
            train, held, dataset = self._split_data(job, job_id)
            assert self._secret is not None, "start() makes the secret"
            inputs = SiteInputs(
                self.name,
                train,
                held,
                self.ledger_path,
                policy=self.policy,
                dataset=dataset,
                noise_secret=self._secret,
            )
            site = Site(job, model, labels, inputs, job_id=job_id, source=f"job {job_id}")
        except ConfigError as exc:
            raise Refused([f"the site cannot run this job: {exc}"]) from None
        except (DataError, ModelError) as exc:
            # the details name the site's files and rows: they stay in the site's log
            self.log(f"job {job_id}: cannot prepare the site: {exc}")
            what = "data" if isinstance(exc, DataError) else "base model"
            raise Refused(
                [f"the site's {what} does not fit this job (the site's daemon log says why)"]
            ) from None
        self.log(
            f"job {job_id}: loaded {job.task.type} model {model.name} "
            f"({len(site.train_data)} training records) in {time.perf_counter() - started:.1f} s"
        )
        return site

    def _job_refusal(self, job: JobConfig) -> list[str]:
        reasons = []
        if not job.data.at_sites:
            reasons.append(
                "the job does not say data.at_sites: true; a deployed site trains only on its "
                "own data file"
            )
        if job.task.type == "classification" and not job.data.labels:
            reasons.append("a deployed classification job must list its labels (data.labels)")
        if self.name not in job.federation.site_names:
            reasons.append(
                f"this site ({self.name}) is not among the job's sites {job.federation.site_names}"
            )
        if job.model.path is not None:
            reasons.append(
                "the job names a model folder on the coordinator (model.path); a site finds "
                "base models by name (model.name: a packaged model or one in daemon.models)"
            )
        return reasons

    def _model(self, job: JobConfig, model_sha: str) -> Any:
        from fedslm.models.registry import resolve_model

        try:
            model = resolve_model(job.model, self.settings.models)
        except ModelError as exc:
            self.log(f"cannot resolve base model {job.model.name!r}: {exc}")
            raise Refused(
                [
                    f"base model {job.model.name!r} is not available at this site (neither "
                    "packaged nor in the site's daemon.models)"
                ]
            ) from None
        if model.sha256 != model_sha:
            raise Refused(
                [
                    f"base model {job.model.name!r}: the coordinator's weights have sha256 "
                    f"{model_sha}, this site's have {model.sha256}; both must use the same "
                    "checkpoint (compare with `fedslm model sha256 FOLDER`)"
                ]
            )
        return model

    def _split_data(self, job: JobConfig, job_id: str) -> tuple[Path, Path, DatasetFingerprint]:
        """The site's data file split into train/eval for this job, under
        ``state_dir/jobs/<job-id>/``, and the fingerprint of the whole file."""
        from fedslm.artifacts import write_json
        from fedslm.data import duplicate_warning, read_site_file, split_site, write_rows
        from fedslm.privacy.ledger import DatasetFingerprint

        assert self.policy.data is not None
        source = Path(self.policy.data)
        # the whole file, not a split: every job on it spends from the same lifetime budget
        dataset = DatasetFingerprint.of_file(source)
        d = job.data
        rows, labels = read_site_file(source, d, job.task.type)
        train, held = split_site(len(rows), labels, d, job.seed, self.name)
        repeated = duplicate_warning(
            self.name, str(source), [rows[i] for i in train], [rows[i] for i in held], d,
            job.task.type,
        )  # fmt: skip
        if repeated is not None:
            self.log(f"job {job_id}: warning: {repeated}")
        folder = self.state_dir / "jobs" / job_id
        folder.parent.mkdir(exist_ok=True, mode=0o700)
        folder.mkdir(exist_ok=True, mode=0o700)
        paths = folder / "train.jsonl", folder / "eval.jsonl"
        for part, path in zip((train, held), paths, strict=True):
            write_rows([rows[i] for i in part], path)
        write_json(
            folder / "split.json",
            {"data": str(source), "dataset": dataset.key, "train": len(train), "eval": len(held)},
        )
        return paths[0], paths[1], dataset


def _public(state: RecordDict) -> RecordDict:
    from fedslm.clients.handlers import SECRET_STATE_KEYS

    return RecordDict({k: v for k, v in state.items() if k not in SECRET_STATE_KEYS})


def _describe_request(kind: str, content: RecordDict) -> str:
    from fedslm.messages import ROUND, DeployedJob, StageInstruction

    config = content.get("config")
    if not isinstance(config, ConfigRecord):
        return kind
    stage = f" {config.get(StageInstruction.STAGE.name)!s}" if kind == MessageType.QUERY else ""
    job_id = str(config.get(DeployedJob.JOB_ID.name, "?"))
    round_num = str(config.get(ROUND.name, "?"))
    return f"job {job_id} round {round_num} {kind}{stage}"


def _warm_up() -> None:
    import fedslm.clients.handlers  # noqa: F401  (torch and the site code)
