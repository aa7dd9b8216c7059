"""The site worker and its bridge: the deployed site's message handling over a Unix socket.

A real worker (``fedslm.clients.worker.Worker``) listens on a real socket in a temporary
state_dir; requests go through ``fedslm.clients.bridge.call_worker``, as the ClientApp sends
them. The job is the deployed kind (``data.at_sites``) on a tiny BERT and synthetic data.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import torch
from fedslm.clients.bridge import (
    KINDS,
    MAGIC,
    ErrorCode,
    WorkerError,
    call_worker,
    request_header,
    validate_request_header,
)
from fedslm.clients.handlers import (
    HANDLERS,
    SECRET_STATE_KEYS,
    STATE_KEY,
    handle_evaluate,
    handle_train,
)
from fedslm.clients.worker import Worker, accepts_version, load_or_create_secret
from fedslm.wire.codec import (
    EVAL_PREFIX,
    arrays_to_state,
    decode_eval,
    decode_refusal,
    decode_update,
    state_to_arrays,
)
from flwr.app import ConfigRecord, MessageType, RecordDict

from fedslm import __version__
from fedslm.config import JobConfig, validate_config
from fedslm.data import INTENTS, generate_bank_messages, write_rows
from fedslm.models.registry import resolve_model
from fedslm.policy import SitePolicy, merge_mappings, policy_from_mapping
from fedslm.privacy.egress_log import egress_entries
from fedslm.privacy.ledger import DatasetFingerprint, PrivacyLedger
from fedslm.site import Site

SITE = "site-1"
FLWR = version("flwr")


def make_job(**over: Any) -> JobConfig:
    """A small deployed job: tiny BERT, DP on, each site reads its own file."""
    raw = {
        "seed": 3,
        "model": {"name": "tiny-bert"},
        "lora": {"r": 2, "alpha": 4},
        "train": {"local_steps": 2, "batch_size": 16, "max_length": 16},
        "privacy": {"noise_multiplier": 1.0},
        "federation": {"sites": [SITE, "site-2"], "rounds": 3, "min_sites": 1},
        "data": {"at_sites": True, "labels": list(INTENTS)},
    }
    return validate_config(merge_mappings(raw, over))


def make_policy(folder: Path, data: Path, **daemon: Any) -> SitePolicy:
    """A site policy with a daemon section whose state_dir is ``folder/state``."""
    raw = {
        "data": str(data),
        "ledger": str(folder / "ledger.db"),
        "privacy": {"lifetime_epsilon": 1000, "max_epsilon_per_job": 500},
        "daemon": {
            "name": SITE,
            "coordinator": "127.0.0.1:9",
            "ca_cert": str(folder / "ca.crt"),
            "key": str(folder / "site.key"),
            "state_dir": str(folder / "state"),
            **daemon,
        },
    }
    return policy_from_mapping(raw, "test policy")


def message_config(
    cfg: JobConfig, round_num: int, job_id: str = "job-a", **over: Any
) -> ConfigRecord:
    """The config a deployed coordinator sends (the contract with the ServerApp)."""
    values: dict[str, Any] = {
        "round": round_num,
        "quiet": True,
        "job": json.dumps(cfg.model_dump(mode="json")),
        "job-id": job_id,
        "model-sha256": resolve_model(cfg.model).sha256,
        "fedslm-version": __version__,
        "flwr-version": FLWR,
    }
    values.update(over)
    return ConfigRecord(values)


def content(config: ConfigRecord, adapter: dict[str, torch.Tensor]) -> RecordDict:
    return RecordDict({"arrays": state_to_arrays(adapter), "config": config})


@dataclass
class Deployment:
    root: Path
    data: Path
    job: JobConfig
    adapter: dict[str, torch.Tensor]  # the initial global adapter (as the coordinator has it)
    worker: Worker
    log: list[str]  # the worker's log lines

    def call(self, kind: str, msg: RecordDict, state: RecordDict | None = None, **kw: Any) -> Any:
        return call_worker(
            str(self.worker.socket_path), kind, msg, state or RecordDict(), node_id=7, run_id=1,
            **kw,
        )  # fmt: skip


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("w")  # short: a Unix socket path is at most 107 bytes
    rows = generate_bank_messages([SITE], 60, 0, 1.0)
    data = root / "data.csv"
    write_rows([{"text": r["text"], "label": r["label"]} for r in rows], data)
    lines: list[str] = []
    worker = Worker(make_policy(root / "live", data), log=lines.append, wait_s=0.3)
    worker.start()
    job = make_job()
    site = _in_process_site(root / "probe", data, job, "job-probe")
    try:
        yield Deployment(root, data, job, site.initial_state(), worker, lines)
    finally:
        worker.stop()


def _in_process_site(
    folder: Path, data: Path, job: JobConfig, job_id: str, secret_from: Path | None = None
) -> Site:
    """The site as the worker builds it, in this process, with the secret of ``secret_from``
    (a state_dir) copied in, and its own ledger."""
    policy = make_policy(folder, data)
    state = Path(policy.daemon.state_dir)  # type: ignore[union-attr]
    state.mkdir(parents=True, exist_ok=True)
    if secret_from is not None:
        shutil.copy(secret_from / "site.secret", state / "site.secret")
    builder = Worker(policy)
    builder._secret = load_or_create_secret(state / "site.secret")
    return builder._build_site(job, job_id, resolve_model(job.model).sha256)


@pytest.mark.integration
def test_the_clientapp_module_imports_neither_torch_nor_the_site() -> None:
    code = (
        "import sys, fedslm.clients.app\n"
        "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith('fedslm.site')\n"
        "               or m == 'fedslm.clients.handlers')\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.integration
def test_worker_replies_equal_the_in_process_handlers(deployment: Deployment) -> None:
    d = deployment
    job_id = "job-same"
    msg = content(message_config(d.job, 1, job_id), d.adapter)
    remote, remote_state = d.call("train", msg)
    local_site = _in_process_site(
        d.root / "local", d.data, d.job, job_id, secret_from=d.worker.state_dir
    )
    local = handle_train(local_site, msg, RecordDict(), 7)
    a, b = arrays_to_state(remote["arrays"]), arrays_to_state(local["arrays"])  # type: ignore[arg-type]
    assert set(a) == set(b) and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], d.adapter[k]) for k in a)  # it did train
    skip = {"seconds", "privacy-seconds"}
    ma, mb = dict(remote["metrics"]), dict(local["metrics"])  # type: ignore[call-overload]
    assert {k: v for k, v in ma.items() if k not in skip} == {
        k: v for k, v in mb.items() if k not in skip
    }
    # the same fields but the ledger head: each side has its own ledger, written at its time
    fa, fb = dict(remote["site"]), dict(local["site"])  # type: ignore[call-overload]
    assert fa.pop("ledger_head") != fb.pop("ledger_head") and fa == fb
    assert len(remote_state) == 0
    ev = content(message_config(d.job, 1, job_id), a)
    remote_eval, _ = d.call("evaluate", ev)
    local_eval = handle_evaluate(local_site, ev, RecordDict(), 7)
    assert dict(remote_eval["metrics"]) == dict(local_eval["metrics"])  # type: ignore[call-overload]
    # the ledger is keyed by the whole data file, not by the job's train split
    assert local_site.dataset == DatasetFingerprint.of_file(d.data)
    assert any(f"job {job_id} round 1 train" in line and line.endswith(": sent") for line in d.log)


@pytest.mark.integration
def test_a_retried_round_is_replayed_and_spends_once(deployment: Deployment) -> None:
    d = deployment
    job_id = "job-replay"
    msg = content(message_config(d.job, 1, job_id), d.adapter)
    first, _ = d.call("train", msg)
    again, _ = d.call("train", msg)
    a, b = arrays_to_state(first["arrays"]), arrays_to_state(again["arrays"])  # type: ignore[arg-type]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert dict(first["site"]) == dict(again["site"])  # type: ignore[call-overload]
    with PrivacyLedger(d.worker.ledger_path, create=False) as ledger:
        spent = [e for e in ledger.entries() if e.job_id == job_id]
        sent = [e for e in egress_entries(ledger, job_id) if e.kind == "train"]
    assert [e.round for e in spent] == [1]  # charged once
    assert [e.record.get("replay", False) for e in sent] == [False, True]
    assert sent[0].record["tensors"] == sent[1].record["tensors"]
    # the same round for another global adapter: refused, nothing trained
    other = {k: v + 0.01 for k, v in d.adapter.items()}
    refused, _ = d.call("train", content(message_config(d.job, 1, job_id), other))
    refusal = decode_refusal(refused)
    assert refusal is not None and refusal.site == SITE
    reasons = refusal.reasons
    assert "already released for a different global adapter" in reasons[0]
    assert "spend privacy twice" in reasons[0]
    # the next round trains, and then the earlier one cannot come back
    d.call("train", content(message_config(d.job, 2, job_id), a))
    back, _ = d.call("train", msg)
    assert "only move forward" in decode_refusal(back).reasons[0]  # type: ignore[union-attr]
    files = sorted(p.name for p in (d.worker.state_dir / "releases" / job_id).iterdir())
    assert files == ["round-2.pt"]  # only the latest round is kept
    with PrivacyLedger(d.worker.ledger_path, create=False) as ledger:
        assert [e.round for e in ledger.entries() if e.job_id == job_id] == [1, 2]


@pytest.mark.integration
def test_a_train_message_carries_the_evaluation_of_the_adapter_it_brings(
    deployment: Deployment,
) -> None:
    """Round r's training message brings round r-1's global adapter: the site evaluates it,
    then trains on it, and answers both in one reply, each part released and logged apart."""
    d = deployment
    job_id = "job-joined"
    first, _ = d.call("train", content(message_config(d.job, 1, job_id), d.adapter))
    global_1 = arrays_to_state(first["arrays"])  # type: ignore[arg-type]
    joined, _ = d.call(
        "train", content(message_config(d.job, 2, job_id, **{"evaluate-round": 1}), global_1)
    )
    alone, _ = d.call("evaluate", content(message_config(d.job, 1, job_id), global_1))
    assert dict(joined["eval-metrics"]) == dict(alone["metrics"])  # type: ignore[call-overload]
    assert decode_eval(joined, EVAL_PREFIX) == decode_eval(alone)
    assert decode_update(joined).site == SITE and decode_update(joined).steps > 0
    with PrivacyLedger(d.worker.ledger_path, create=False) as ledger:
        sent = [(e.round, e.kind) for e in egress_entries(ledger, job_id)]
    assert sent == [(1, "train"), (1, "evaluate"), (2, "train"), (1, "evaluate")]
    # round 2 again with another adapter: training is refused, the evaluation still goes
    other = {k: v + 0.01 for k, v in global_1.items()}
    refused, _ = d.call(
        "train", content(message_config(d.job, 2, job_id, **{"evaluate-round": 1}), other)
    )
    assert "already released" in decode_refusal(refused).reasons[0]  # type: ignore[union-attr]
    assert decode_refusal(refused, EVAL_PREFIX) is None
    assert decode_eval(refused, EVAL_PREFIX).site == SITE
    for bad in (2, 0, True, "1"):
        cfg = message_config(d.job, 2, job_id, **{"evaluate-round": bad})
        with pytest.raises(WorkerError, match="'evaluate-round'"):
            d.call("train", content(cfg, global_1))
    with pytest.raises(WorkerError, match="belongs in a train message only"):
        d.call(
            "evaluate", content(message_config(d.job, 2, job_id, **{"evaluate-round": 1}), other)
        )


def _raw_request(path: Path, data: bytes) -> dict[str, Any]:
    """Send raw bytes, read the worker's reply header."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        assert s.recv(4) == MAGIC
        (n,) = struct.unpack(">Q", s.recv(8))
        buf = b""
        while len(buf) < n:
            buf += s.recv(n - len(buf))
        return json.loads(buf)


def _frame(b: bytes) -> bytes:
    return struct.pack(">Q", len(b)) + b


def test_malformed_requests_get_clear_errors_and_the_worker_keeps_serving(
    deployment: Deployment,
) -> None:
    d = deployment
    path = d.worker.socket_path
    r = _raw_request(path, b"GET / HTTP/1.1\r\n\r\n")
    assert (
        not r["ok"] and r["code"] == "bad-request" and "not a fedslm worker message" in r["error"]
    )
    r = _raw_request(path, MAGIC + struct.pack(">Q", 2**40))
    assert "header frame is 1,099,511,627,776 bytes, more than the limit" in r["error"]
    header = {"protocol": 1, "kind": "train", "node_id": 1, "run_id": 1}
    r = _raw_request(path, MAGIC + _frame(json.dumps(header).encode()) + struct.pack(">Q", 2**33))
    assert "content frame is 8,589,934,592 bytes" in r["error"]
    bad = MAGIC + _frame(b"[1, 2]") + _frame(b"") + _frame(b"")
    assert "not an object" in _raw_request(path, bad)["error"]
    for wrong, says in (
        ({**header, "kind": "dance"}, "kind 'dance' is not one of"),
        ({**header, "protocol": 2}, "protocol version 2 is not 1"),
        ({**header, "node_id": -1}, "node_id must be an integer"),
        ({**header, "extra": 1}, "unknown header keys ['extra']"),
    ):
        req = MAGIC + _frame(json.dumps(wrong).encode()) + _frame(b"") + _frame(b"")
        assert says in _raw_request(path, req)["error"]
    garbage = MAGIC + _frame(json.dumps(header).encode()) + _frame(b"\xff\xff\xff") + _frame(b"")
    assert "content is not a Flower RecordDict" in _raw_request(path, garbage)["error"]
    cfg = message_config(d.job, 1, **{"job": "{not json"})
    with pytest.raises(WorkerError, match="config 'job' is not JSON"):
        d.call("train", content(cfg, d.adapter))
    cfg = message_config(d.job, 1, **{"job": json.dumps({"lora": {"r": "many"}})})
    with pytest.raises(WorkerError, match=r"not a valid job: lora\.r"):
        d.call("train", content(cfg, d.adapter))
    cfg = message_config(d.job, 1)
    del cfg["model-sha256"]
    with pytest.raises(WorkerError, match=r"lacks \['model-sha256'\]"):
        d.call("train", content(cfg, d.adapter))
    with pytest.raises(WorkerError, match="must be 1-128 letters"):
        d.call("train", content(message_config(d.job, 1, "../../etc"), d.adapter))
    # the coordinator's anchor of the site's ledger head: checked before anything is built
    cfg = message_config(d.job, 2, **{"ledger-anchor-seq": "5", "ledger-anchor-hash": "a" * 64})
    with pytest.raises(WorkerError, match=r"config 'ledger-anchor-seq' must be the seq of a"):
        d.call("train", content(cfg, d.adapter))
    cfg = message_config(d.job, 2, **{"ledger-anchor-seq": 5, "ledger-anchor-hash": "nope"})
    with pytest.raises(WorkerError, match=r"'ledger-anchor-hash' must be the hash of ledger entry"):
        d.call("train", content(cfg, d.adapter))
    simulated = ConfigRecord({"round": 1, "manifest": "/x/job.json"})
    with pytest.raises(WorkerError, match="simulation message"):
        d.call("evaluate", content(simulated, d.adapter))
    # still serving
    reply, _ = d.call("evaluate", content(message_config(d.job, 1, "job-ok"), d.adapter))
    assert float(reply["metrics"]["eval-loss"]) > 0  # type: ignore[arg-type]


def test_wrong_model_or_versions_are_refused_with_both_named(deployment: Deployment) -> None:
    d = deployment
    theirs = "ab" * 32
    ours = resolve_model(d.job.model).sha256
    reply, _ = d.call(
        "train", content(message_config(d.job, 1, "job-m", **{"model-sha256": theirs}), d.adapter)
    )
    (reason,) = decode_refusal(reply).reasons  # type: ignore[union-attr]
    assert theirs in reason and ours in reason
    reply, _ = d.call(
        "train",
        content(message_config(d.job, 1, "job-v", **{"fedslm-version": "9.9.0"}), d.adapter),
    )
    (reason,) = decode_refusal(reply).reasons  # type: ignore[union-attr]
    assert "fedslm 9.9.0" in reason and f"fedslm {__version__}" in reason and "upgrade" in reason
    older = ".".join([FLWR.split(".")[0], str(int(FLWR.split(".")[1]) - 1), "0"])
    reply, _ = d.call(
        "evaluate", content(message_config(d.job, 1, "job-f", **{"flwr-version": older}), d.adapter)
    )
    (reason,) = decode_refusal(reply).reasons  # type: ignore[union-attr]
    assert f"Flower {older}" in reason and f"Flower {FLWR}" in reason and "upgrade" in reason
    not_at_sites = make_job(data={"at_sites": False, "synthetic": {"rows_per_site": 10}})
    reply, _ = d.call("train", content(message_config(not_at_sites, 1, "job-s"), d.adapter))
    assert "data.at_sites" in decode_refusal(reply).reasons[0]  # type: ignore[union-attr]
    # each refusal was logged in the egress log before it left
    with PrivacyLedger(d.worker.ledger_path, create=False) as ledger:
        kinds = {e.job_id: e.kind for e in egress_entries(ledger)}
    assert {kinds[j] for j in ("job-m", "job-v", "job-f", "job-s")} == {"refusal"}


def test_the_protocol_names_its_kinds_and_error_codes_once() -> None:
    """A request's kind is the Flower message type the coordinator sent (each has its
    handler), and travels as its plain name; an error reply's code is an ``ErrorCode``."""
    assert KINDS == (MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY)
    assert set(HANDLERS) == set(KINDS)
    header = json.loads(json.dumps(request_header(MessageType.QUERY, 3, 4)))
    assert header["kind"] == "query" and validate_request_header(header) == ("query", 3, 4)
    assert [str(c) for c in ErrorCode] == ["bad-request", "busy", "failed"]
    assert WorkerError("x").code == ErrorCode.FAILED == "failed"


def test_accepted_versions() -> None:
    assert accepts_version(__version__, [])
    assert not accepts_version("0.0.1", [])
    assert accepts_version("0.4.2", ["0.4.*"]) and not accepts_version("0.5.0", ["0.4.*"])
    assert accepts_version("1.2.3", ["1.2.3"]) and not accepts_version("1.2.30", ["1.2.3"])


def test_a_busy_worker_says_so(deployment: Deployment) -> None:
    d = deployment
    assert d.worker._work.acquire(timeout=5)  # as if a long round were in progress
    try:
        with pytest.raises(WorkerError, match="busy") as err:
            d.call("evaluate", content(message_config(d.job, 1, "job-ok"), d.adapter))
        assert err.value.code == "busy"
    finally:
        d.worker._work.release()
    d.call("evaluate", content(message_config(d.job, 1, "job-ok"), d.adapter))


def test_secure_aggregation_secrets_stay_in_the_worker(deployment: Deployment) -> None:
    d = deployment
    job = make_job(federation={"secure_aggregation": True, "aggregation": "ffa"})
    msg = content(message_config(job, 1, "job-sa"), d.adapter)
    reply, state = d.call("train", msg)
    assert "arrays" not in reply and "cipher_pk" in reply["site"]
    assert not set(state) & set(SECRET_STATE_KEYS)  # private keys and the update stayed here
    assert set(d.worker._secret_states[(1, 7)]) == set(SECRET_STATE_KEYS)
    again, _ = d.call("train", msg)
    assert "under secure aggregation" in decode_refusal(again).reasons[0]  # type: ignore[union-attr]
    # a state the ClientApp makes up is ignored: another node has no session here
    fake = RecordDict({STATE_KEY: ConfigRecord({"round": 1, "weight": 1})})
    query = RecordDict(
        {"config": message_config(job, 1, "job-sa", stage="share-keys"), "secagg": ConfigRecord({})}
    )
    with pytest.raises(WorkerError, match="no session in progress"):
        call_worker(str(d.worker.socket_path), "query", query, fake, node_id=8, run_id=1)


@pytest.mark.integration
def test_noise_depends_on_the_site_secret(tmp_path: Path, deployment: Deployment) -> None:
    d = deployment
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "site.secret").write_bytes(b"\x01" * 32)
    (tmp_path / "s2").mkdir()
    (tmp_path / "s2" / "site.secret").write_bytes(b"\x02" * 32)
    updates = []
    for i, secret in enumerate(("s1", "s1", "s2")):
        site = _in_process_site(tmp_path / f"site{i}", d.data, d.job, "job-n", tmp_path / secret)
        updates.append(site.train_round(1, d.adapter).state)
    same, other = updates[1], updates[2]
    assert all(torch.equal(updates[0][k], same[k]) for k in same)
    assert any(not torch.equal(updates[0][k], other[k]) for k in other)
    # another global adapter in the same round gets other noise: a difference of two
    # releases never cancels it
    assert site._seed(1, "a" * 64) != site._seed(1, "b" * 64)
    assert site._seed(1, "a" * 64) == site._seed(1, "a" * 64)
