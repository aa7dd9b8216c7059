"""A ledger rewritten from an entry on, every later hash recomputed, against the heads anchored
outside it: the journal, the run's privacy.json and metrics.jsonl, the coordinator's record.

The attack (issue 15, item 3): a site's ledger holds job A (epsilon 8) and job B (~1). Deleting
A's entries and recomputing every later hash and epsilon leaves a chain that `ledger verify`
accepts on its own, on which `policy check` shows only B's spend and accepts a new epsilon-8
job although the data set's true lifetime spend would be far above the budget of 10.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from fedslm.cli import main
from fedslm.config import JobConfig
from fedslm.coordinator import Coordinator, SiteReport, head_conflict
from fedslm.data import generate_bank_messages, write_rows
from fedslm.egress import Payload, check, describe
from fedslm.privacy import accounting
from fedslm.privacy.accounting import Segment, calibrate_noise
from fedslm.privacy.anchors import Anchor, divergence, read_anchors
from fedslm.privacy.ledger import (
    GENESIS_HASH,
    DatasetFingerprint,
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
    entry_hash,
    journal_path,
)

DELTA = 1e-5
Q, STEPS = 0.1, 10


# --------------------------------------------------------------------------------------------
# The attack


def spend(ledger: Path, fp: DatasetFingerprint, job_id: str, rounds: int, target: float) -> list:
    """Record ``rounds`` rounds of a job calibrated to ``target`` epsilon, as a site does."""
    sigma = calibrate_noise(target, DELTA, Q, STEPS * rounds)
    with PrivacyLedger(ledger, fp) as led:
        seg = Segment(Q, sigma, STEPS)
        return [led.record(fp, job_id, r, seg, DELTA) for r in range(1, rounds + 1)]


def delete_job_and_rehash(path: Path, job_id: str) -> None:
    """Delete every entry of ``job_id`` and rewrite the rest as a consistent ledger: seqs
    renumbered, epsilons recomputed from the remaining segments, every hash recomputed, the
    head in the metadata moved. What a tamperer who knows the format does."""
    conn = sqlite3.connect(path)
    cols = [r[1] for r in conn.execute("PRAGMA table_info(entries)")]
    rows = conn.execute(f"SELECT {', '.join(cols)} FROM entries ORDER BY seq").fetchall()
    kept = [dict(zip(cols, r, strict=True)) for r in rows]
    kept = [e for e in kept if e["job_id"] != job_id]
    prev, segs = GENESIS_HASH, []
    for seq, e in enumerate(kept, start=1):
        segs.append(Segment(e["q"], e["sigma"], e["steps"]))
        e["epsilon"] = accounting.epsilon(segs, e["delta"], e["accountant"])
        e["epsilon_pld"] = accounting.epsilon(segs, e["delta"], "pld")
        e["seq"], e["prev_hash"] = seq, prev
        e["hash"] = entry_hash(e)
        prev = e["hash"]
    conn.execute("DELETE FROM entries")
    conn.executemany(
        f"INSERT INTO entries ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
        [tuple(e[c] for c in cols) for e in kept],
    )
    conn.executemany(
        "UPDATE meta SET value = ? WHERE key = ?",
        [(str(len(kept)), "head_seq"), (prev, "head_hash")],
    )
    conn.commit()
    conn.close()


def released_run(run: Path, site: str, entries: list[LedgerEntry]) -> Path:
    """A run folder in which the coordinator recorded the heads ``site`` released: one round
    per entry (metrics.jsonl) and the last in privacy.json, written by the real Coordinator."""
    c = _coordinator(run)
    lines = []
    for r, e in enumerate(entries, start=1):
        c.start_round(r)
        assert c.aggregate(r, [_report(site, e.seq, e.hash, e.segment)], []) is not None
        lines.append(json.dumps(c.record.to_dict()))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "privacy.json").write_text(json.dumps(c.privacy_summary()))
    return run


def _coordinator(run: Path, anchors_file: Path | None = None) -> Coordinator:
    job = JobConfig.model_validate({"federation": {"sites": 1, "min_sites": 1}})
    return Coordinator(job, run, torch.nn.Module(), {"w": torch.zeros(2)}, {}, anchors_file)


def _report(site: str, seq: int | None, head: str | None, seg: Segment | None = None) -> SiteReport:
    seg = seg or Segment(Q, 1.0, STEPS)
    return SiteReport(
        site, {"w": torch.ones(2)}, 100, 1.0, STEPS, 0.1, 8, seg, 1.0, DELTA, "prv", 1.0,
        lifetime_epsilon=1.0, ledger_head=head, ledger_seq=seq,
    )  # fmt: skip


@pytest.fixture
def site(tmp_path: Path, tiny_bert: Path) -> Path:
    """A site folder whose ledger holds job A (8) then job B (~1), and a run that released B's
    heads; an epsilon-8 job config beside it."""
    folder = tmp_path / "hospital"
    (folder / "privacy").mkdir(parents=True)
    write_rows(generate_bank_messages(["a"], 300, seed=1, skew=1.0), folder / "train.jsonl")
    policy = {"data": "train.jsonl", "ledger": "privacy/ledger.db"}
    (folder / "site.yaml").write_text(yaml.safe_dump(policy))
    job = {
        "model": {"path": str(tiny_bert)},
        "federation": {"rounds": 3},
        "privacy": {"target_epsilon": 8.0},
        "train": {"mode": "lora", "batch_size": 30},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    fp = DatasetFingerprint.of_file(folder / "train.jsonl")
    ledger = folder / "privacy" / "ledger.db"
    spend(ledger, fp, "job-a", 3, 8.0)
    b = spend(ledger, fp, "job-b", 2, 1.0)
    (tmp_path / "run-b").mkdir()
    released_run(tmp_path / "run-b", "hospital", b)
    return folder


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.integration
def test_the_rewrite_passes_the_chain_check_and_hides_job_a(site: Path) -> None:
    """The premise: on its own, the rewritten ledger is a valid ledger with only B's spend."""
    ledger = site / "privacy" / "ledger.db"
    fp = DatasetFingerprint.of_file(site / "train.jsonl")
    with PrivacyLedger(ledger, create=False) as led:
        before = led.spent(fp, DELTA)
    delete_job_and_rehash(ledger, "job-a")
    with PrivacyLedger(ledger, create=False) as led:
        assert led.verify() == []
        after = led.spent(fp, DELTA)
        assert [e.job_id for e in led.entries()] == ["job-b", "job-b"]
    assert before == pytest.approx(8.1, abs=0.05) and after == pytest.approx(1.0, abs=0.05)


@pytest.mark.integration
def test_policy_check_refuses_a_ledger_that_dropped_released_heads(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy, job = site / "site.yaml", site.parent / "job.yaml"
    ledger = site / "privacy" / "ledger.db"
    code, out = _cli(["policy", "check", policy, "--job", job], capsys)
    assert code == 1 and "lifetime budget is 10" in out  # the intact ledger: refused on budget

    delete_job_and_rehash(ledger, "job-a")
    # the journal beside the ledger names the first rewritten entry exactly
    code, out = _cli(["policy", "check", policy, "--job", job], capsys)
    assert code == 1, out
    assert "REFUSED" in out and "rewritten from entry seq 1 on" in out
    assert str(journal_path(ledger)) in out and "ACCEPTED" not in out

    # a tamperer who also deletes the journal: the heads the run released still refuse it
    journal_path(ledger).unlink()
    code, out = _cli(["policy", "check", policy, "--job", job], capsys)
    assert code == 0 and "ACCEPTED" in out  # the journal was the only anchor here
    run = site.parent / "run-b"
    for anchor in (run, run / "privacy.json", run / "metrics.jsonl"):
        code, out = _cli(["policy", "check", policy, "--job", job, "--anchor", anchor], capsys)
        assert code == 1, out
        assert "does not extend the head anchored in" in out and "ledger has only 2 entries" in out
    code, out = _cli(["policy", "check", policy, "--anchor", run / "privacy.json"], capsys)
    assert code == 1 and "entry seq 5" in out and "between seq 1 and 5" in out


@pytest.mark.integration
def test_ledger_verify_checks_the_journal_and_anchors(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = site / "privacy" / "ledger.db"
    run = site.parent / "run-b"
    code, out = _cli(["ledger", "verify", ledger, "--anchor", run], capsys)
    assert code == 0 and "extends 8 anchored heads" in out  # journal 5, privacy.json 1, metrics 2
    delete_job_and_rehash(ledger, "job-a")
    code, out = _cli(["ledger", "verify", ledger], capsys)
    assert code == 1 and "entry seq 1" in out and "rewritten from entry seq 1 on" in out
    journal_path(ledger).unlink()
    code, out = _cli(["ledger", "verify", ledger, "--anchor", run / "privacy.json"], capsys)
    assert code == 1 and "verification FAILED" in out and "entry seq 5" in out


@pytest.mark.integration
def test_the_site_refuses_the_job_before_round_one(site: Path, tiny_bert: Path) -> None:
    from fedslm.config import load_config
    from fedslm.models.registry import resolve_model
    from fedslm.policy import load_policy
    from fedslm.site import Site, SiteInputs

    policy = load_policy(site / "site.yaml")
    job = load_config(site.parent / "job.yaml")
    ledger = site / "privacy" / "ledger.db"
    train = site / "train.jsonl"
    eval_file = site / "eval.jsonl"
    write_rows(generate_bank_messages(["a"], 40, seed=2, skew=1.0), eval_file)
    labels = sorted({json.loads(x)["label"] for x in train.read_text().splitlines()})

    def new_site(anchors: tuple[Anchor, ...] = ()) -> Site:
        inputs = SiteInputs("hospital", train, eval_file, ledger, policy=policy, anchors=anchors)
        return Site(job, resolve_model(job.model), labels, inputs, job_id="job-c")

    assert any("lifetime budget" in r for r in new_site().refusal(1))  # intact: over budget
    delete_job_and_rehash(ledger, "job-a")
    reasons = new_site().refusal(1)
    assert len(reasons) == 1 and "rewritten from entry seq 1 on" in reasons[0], reasons
    journal_path(ledger).unlink()
    assert new_site().refusal(1) == []  # nothing left to anchor it: the limit of a journal
    anchors = read_anchors(site.parent / "run-b")
    reasons = new_site(anchors=tuple(anchors)).refusal(1)
    assert len(reasons) == 1 and "ledger has only 2 entries" in reasons[0], reasons


# --------------------------------------------------------------------------------------------
# The coordinator's record


def test_coordinator_refuses_a_head_behind_the_one_it_anchored(tmp_path: Path) -> None:
    store = tmp_path / "runs" / "ledger_anchors.json"
    first = _coordinator(tmp_path / "runs" / "one", store)
    first.start_round(1)
    assert first.aggregate(1, [_report("bank", 5, "e" * 64)], []) is not None
    assert first.privacy_summary()["sites"]["bank"]["ledger_head_seq"] == 5
    assert first.record.sites["bank"].ledger_seq == 5
    # within the run: round 2 comes back with a shorter ledger
    first.start_round(2)
    assert first.aggregate(2, [_report("bank", 3, "f" * 64)], []) is None
    assert any("entry seq 3 at the latest" in f for f in first.record.failures)
    first.keep_anchors()
    assert json.loads(store.read_text())["bank"]["seq"] == 5
    # another run that anchored a later head meanwhile keeps it
    third = _coordinator(tmp_path / "runs" / "three", store)
    third.anchors["bank"] = Anchor(7, "7" * 64, "run three round 1")
    third.keep_anchors()
    first.keep_anchors()
    assert json.loads(store.read_text())["bank"]["seq"] == 7

    # the next run of the same coordinator remembers the head
    second = _coordinator(tmp_path / "runs" / "two", store)
    second.start_round(1)
    assert second.aggregate(1, [_report("bank", 3, "a" * 64)], []) is None
    failure = second.record.failures[0]
    assert "bank" in failure and "run three round 1 anchored its entry seq 7" in failure
    assert "round 1:" in second.privacy_summary()["sites"]["bank"]["refusals"][0]
    assert second.aggregate(1, [_report("bank", 8, "b" * 64)], []) is not None

    # under secure aggregation the input is in the sum already: counted, but not anchored
    second.start_round(2)
    second.aggregate_secure(2, [_report("bank", 4, "c" * 64)], [], None, None, [], "failed")
    assert any("in the sum all the same" in f for f in second.record.failures)
    summary = second.privacy_summary()["sites"]["bank"]
    assert summary["dp_steps"] == 2 * STEPS
    assert (summary["ledger_head_seq"], summary["ledger_head"]) == (8, "b" * 64)


def test_head_conflict_rules() -> None:
    anchored = Anchor(5, "h5", "run x round 2")
    assert head_conflict(anchored, 6, "h6") is None  # appended after it
    assert head_conflict(anchored, 5, "h5") is None  # the same round replayed
    assert head_conflict(None, 1, "h1") is None
    assert head_conflict(anchored, None, "old site") is None  # a site that sends no seq
    assert "entry seq 5 at the latest" in (head_conflict(anchored, 5, "other") or "")
    assert "entry seq 2 at the latest" in (head_conflict(anchored, 2, "h2") or "")


def test_the_reply_carries_the_heads_seq() -> None:
    from fedslm.wire.codec import decode_update, encode_payload

    fields = {
        "site": "bank", "dp": True, "q": Q, "sigma": 1.0, "dp_steps": STEPS, "epsilon": 1.0,
        "delta": DELTA, "accountant": "prv", "max_grad_norm": 1.0, "lifetime_epsilon": 1.0,
        "ledger_head": "c" * 64, "ledger_seq": 12,
    }  # fmt: skip
    metrics = {"num-examples": 10, "train-loss": 1.0, "steps": STEPS, "seconds": 0.1}
    payload = Payload("train", {"w": torch.ones(2)}, metrics, fields)
    assert check(describe(payload), {"w": (2,)}, 10**6) == []
    r = decode_update(encode_payload(payload))
    assert (r.ledger_seq, r.ledger_head) == (12, "c" * 64)


# --------------------------------------------------------------------------------------------
# The pure check


def _chain(*hashes: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(seq=i, hash=h) for i, h in enumerate(hashes, start=1)]


def test_divergence_names_the_first_entry_that_differs() -> None:
    chain = _chain("a", "b", "x", "y")
    assert divergence(chain, [Anchor(2, "b", "j"), Anchor(None, "a", "p")]) is None
    every = [Anchor(i, h, "journal") for i, h in enumerate("abcde", start=1)]
    found = divergence(chain, every)
    assert found is not None and (found.first.seq, found.found, found.from_seq) == (3, "x", 3)
    assert "rewritten from entry seq 3 on" in found.describe()
    sparse = divergence(chain, [Anchor(1, "a", "r1"), Anchor(4, "d", "r2")])
    assert sparse is not None and (sparse.from_seq, sparse.first.seq) == (2, 4)
    assert "between seq 2 and 4" in sparse.describe()
    short = divergence(chain[:2], [Anchor(4, "d", "run")])
    assert short is not None and "the ledger has only 2 entries" in short.describe()
    lost = divergence(chain, [Anchor(None, "gone", "old privacy.json")])
    assert lost is not None and "no entry of the ledger has hash gone" in lost.describe()
    assert divergence([], [Anchor(1, "a", "journal")]) is not None  # a deleted ledger


def test_anchors_are_read_per_site(tmp_path: Path) -> None:
    """A run's files hold every site's heads: only this site's anchor its ledger."""
    run = tmp_path / "run"
    run.mkdir()
    privacy = {
        "sites": {
            "bank": {"ledger_head": "b" * 64, "ledger_head_seq": 4},
            "clinic": {"ledger_head": "c" * 64, "ledger_head_seq": 9},
            "no-dp": {"dp_enabled": False},
        }
    }
    (run / "privacy.json").write_text(json.dumps(privacy))
    # a report's privacy part: one entry per site, its lifetime spend naming the heads
    report = {
        "privacy": {
            "sites": [
                {"site": s, "lifetime": {"ledger_head_in_privacy_json": h, "ledger_last_hash": h}}
                for s, h in (("bank", "b" * 64), ("clinic", "c" * 64))
            ]
        }
    }
    (run / "report.json").write_text(json.dumps(report))
    bank = read_anchors(run, "bank")
    assert {(a.seq, a.hash) for a in bank} == {(4, "b" * 64), (None, "b" * 64)}
    assert all("bank" in a.source for a in bank)
    with pytest.raises(LedgerError, match="sites bank, clinic; say which"):
        read_anchors(run / "privacy.json")
    assert read_anchors(run, "elsewhere") == []
    with pytest.raises(LedgerError, match="no such file"):
        read_anchors(tmp_path / "missing.json")


@pytest.mark.integration
def test_simulate_preflight_refuses_the_rewritten_ledger(tmp_path: Path, tiny_bert: Path) -> None:
    """`fedslm simulate` asks each site before writing anything: the journal refuses it."""
    from fedslm.config import validate_config
    from fedslm.errors import FederationError
    from fedslm.job import plan_job, preflight, site_ledger

    raw = {
        "model": {"path": str(tiny_bert)},
        "train": {"mode": "lora", "batch_size": 16, "max_length": 16},
        "federation": {"sites": 1, "rounds": 2},
        "data": {"synthetic": {"rows_per_site": 160}},
        "privacy": {"target_epsilon": 8.0},
    }
    plan = plan_job(validate_config(raw), "job.yaml")
    ledgers = tmp_path / "ledgers"
    ledgers.mkdir()
    train = tmp_path / "train.jsonl"
    write_rows(plan.sites[0].train, train)  # the bytes preflight fingerprints
    fp = DatasetFingerprint.of_file(train)
    ledger = site_ledger(plan.policies[plan.sites[0].name], train, tmp_path, ledgers)
    spend(ledger, fp, "job-a", 3, 8.0)
    spend(ledger, fp, "job-b", 2, 1.0)
    with pytest.raises(FederationError, match="lifetime budget is 10"):
        preflight(plan, ledgers)
    delete_job_and_rehash(ledger, "job-a")
    with pytest.raises(FederationError, match="rewritten from entry seq 1 on"):
        preflight(plan, ledgers)


# --------------------------------------------------------------------------------------------
# The coordinator's anchor, sent with each train message (the site checks the chain)

NODE = 7


class _Grid:
    """The one node the strategy asks: the deployed site's, registered on its roster."""

    def get_node_ids(self) -> list[int]:
        return [NODE]


def _anchored_round(site: Path, tiny_bert: Path, pad: bool) -> tuple[object, object, Path]:
    """The deployed message path of round 1 for ``site``, whose coordinator anchored the head
    of job B (seq 5) in an earlier run (``runs/ledger_anchors.json``): the real strategy
    builds the train message, the real site handler answers it, the strategy records the
    reply. With ``pad`` the site's ledger is first rewritten without job A, padded with
    dummy entries past seq 5, and its journal deleted: a head the coordinator cannot fault.
    Returns (the coordinator, the site's reply content, the ledger)."""
    from fedslm.clients.handlers import handle_train
    from fedslm.server.strategy import FedSLMStrategy
    from fedslm.wire.codec import state_to_arrays
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedslm.config import validate_config
    from fedslm.messages import ANCHOR_HASH, ANCHOR_SEQ
    from fedslm.models.registry import resolve_model
    from fedslm.policy import load_policy
    from fedslm.progress import Reporter
    from fedslm.site import Site, SiteInputs

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    ledger, train = site / "privacy" / "ledger.db", site / "train.jsonl"
    with PrivacyLedger(ledger, create=False) as led:
        head = led.entries()[-1]
    assert head.seq == 5 and head.job_id == "job-b"
    runs = site.parent / "runs"
    (runs / "now").mkdir(parents=True)
    store = runs / "ledger_anchors.json"
    where = "run b round 2"
    store.write_text(json.dumps({"hospital": {"seq": 5, "hash": head.hash, "where": where}}))
    if pad:
        delete_job_and_rehash(ledger, "job-a")
        fp = DatasetFingerprint.of_file(train)
        with PrivacyLedger(ledger, fp) as led:  # seqs 3-6, each spending next to nothing
            for r in range(1, 5):
                led.record(fp, "job-pad", r, Segment(Q, 50.0, STEPS), DELTA)
        journal_path(ledger).unlink()

    job = validate_config(
        {
            "model": {"path": str(tiny_bert)},
            "federation": {"sites": ["hospital"], "rounds": 2, "min_sites": 1},
            "privacy": {"target_epsilon": 1.0},
            "train": {"mode": "lora", "batch_size": 30, "local_steps": 2, "max_length": 16},
        }
    )
    eval_file = site / "eval.jsonl"
    write_rows(generate_bank_messages(["a"], 40, seed=2, skew=1.0), eval_file)
    labels = sorted({json.loads(x)["label"] for x in train.read_text().splitlines()})
    policy = {"data": "train.jsonl", "ledger": "privacy/ledger.db"}
    policy["privacy"] = {"lifetime_epsilon": 100, "max_epsilon_per_job": 50}  # type: ignore[assignment]
    (site / "site.yaml").write_text(yaml.safe_dump(policy))
    inputs = SiteInputs(
        "hospital", train, eval_file, ledger, policy=load_policy(site / "site.yaml")
    )
    the_site = Site(job, resolve_model(job.model), labels, inputs, job_id="job-c")
    state = the_site.initial_state()
    coordinator = Coordinator(job, runs / "now", torch.nn.Module(), state, {}, store)
    strategy = FedSLMStrategy(coordinator, 1, Reporter(quiet=True), 0, roster={NODE: "hospital"})

    (message,) = strategy.configure_train(
        1, state_to_arrays(state), ConfigRecord({"round": 1}), _Grid()
    )
    config = message.content["config"]
    assert (config[ANCHOR_SEQ], config[ANCHOR_HASH]) == (5, head.hash)
    reply = handle_train(the_site, message.content, RecordDict(), NODE)
    coordinator.start_round(1)
    strategy.aggregate_train(1, [Message(content=reply, reply_to=message)])
    return coordinator, reply, ledger


@pytest.mark.integration
def test_the_site_refuses_a_rewrite_padded_past_the_coordinators_anchor(
    site: Path, tiny_bert: Path
) -> None:
    from fedslm.wire.codec import decode_refusal

    coordinator, reply, ledger = _anchored_round(site, tiny_bert, pad=True)
    with PrivacyLedger(ledger, create=False) as led:
        padded = led.entries()
        assert led.verify() == [] and [e.seq for e in padded][-1] == 6
    # the premise: the padded head is past the anchored one, so the head alone passes
    assert head_conflict(Anchor(5, "x", "w"), 6, padded[-1].hash) is None
    refused = decode_refusal(reply)  # type: ignore[arg-type]
    assert refused is not None and refused.site == "hospital", reply
    (reason,) = refused.reasons
    assert "the coordinator's train message for round 1 (entry seq 5" in reason, reason
    assert "the ledger's entry seq 5 has hash" in reason and "between seq 1 and 5" in reason
    with PrivacyLedger(ledger, create=False) as led:
        assert led.entries() == padded  # refused before anything was spent
    assert coordinator.record.refusals == {"hospital": [reason]}  # type: ignore[attr-defined]
    privacy = coordinator.privacy_summary()["sites"]["hospital"]  # type: ignore[attr-defined]
    assert privacy["refusals"] == [f"round 1: {reason}"]


@pytest.mark.integration
def test_an_honest_site_extends_the_coordinators_anchor_and_trains(
    site: Path, tiny_bert: Path
) -> None:
    from fedslm.wire.codec import decode_refusal

    coordinator, reply, ledger = _anchored_round(site, tiny_bert, pad=False)
    assert decode_refusal(reply) is None  # type: ignore[arg-type]
    with PrivacyLedger(ledger, create=False) as led:
        last = led.entries()[-1]
    assert (last.seq, last.job_id) == (6, "job-c")
    sites = coordinator.record.sites  # type: ignore[attr-defined]
    assert sites["hospital"].ledger_seq == 6 and not coordinator.record.failures  # type: ignore[attr-defined]
    # the next round's message carries the head this round released
    anchor = coordinator.site_anchor("hospital")  # type: ignore[attr-defined]
    assert anchor is not None and (anchor.seq, anchor.hash) == (6, last.hash)


def test_a_malformed_anchor_in_a_train_message_is_a_clear_error() -> None:
    from flwr.app import ConfigRecord

    from fedslm.messages import ANCHOR_HASH, ANCHOR_SEQ, anchor_config, config_anchor

    good = anchor_config(Anchor(5, "a" * 64, "coordinator"))
    assert config_anchor(ConfigRecord({"round": 2, **good}), 2) == Anchor(
        5, "a" * 64, "the coordinator's train message for round 2"
    )
    assert config_anchor(ConfigRecord({"round": 2}), 2) is None
    assert anchor_config(None) == {} and anchor_config(Anchor(None, "a" * 64, "x")) == {}
    for wrong, says in (
        ({ANCHOR_SEQ: "5"}, f"config '{ANCHOR_SEQ}' must be the seq of a ledger entry"),
        ({ANCHOR_SEQ: 0}, "an integer >= 1"),
        ({ANCHOR_SEQ: True}, "got True"),
        ({ANCHOR_HASH: "A" * 64}, f"config '{ANCHOR_HASH}' must be the hash of ledger entry"),
        ({ANCHOR_HASH: "ab"}, "64 lowercase hex digits"),
    ):
        with pytest.raises(ValueError, match=says):
            config_anchor(ConfigRecord({"round": 2, **{**good, **wrong}}), 2)
    for half in good:  # one of the pair alone
        with pytest.raises(ValueError, match="sent together with"):
            config_anchor(ConfigRecord({"round": 2, half: good[half]}), 2)
