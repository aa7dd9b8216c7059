"""The egress guard: every message is logged before it leaves; anything the job did not agree
to is blocked, logged and answered with a refusal."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from fedslm.artifacts import read_jsonl
from fedslm.cli import main
from fedslm.config import validate_config
from fedslm.egress import Payload, check, describe, tensor_record
from fedslm.inprocess import build_site, run_job_in_process
from fedslm.job import prepare_job
from fedslm.privacy.egress_log import egress_entries, verify_egress
from fedslm.privacy.ledger import PrivacyLedger
from fedslm.site import EgressBlocked, Site


def _job(tiny_bert: Path, **more: Any) -> dict[str, Any]:
    return {
        "model": {"path": str(tiny_bert)},
        "lora": {"r": 2, "alpha": 4},
        "train": {"mode": "lora", "local_steps": 2, "batch_size": 16, "max_length": 16},
        "privacy": {"noise_multiplier": 1.0},
        "federation": {"sites": 2, "rounds": 1},
        "data": {"synthetic": {"rows_per_site": 100}},
        **more,
    }


@pytest.fixture
def site(tmp_path: Path, tiny_bert: Path) -> Site:
    prepared = prepare_job(validate_config(_job(tiny_bert)), "test", tmp_path / "run")
    return build_site(prepared, prepared.sites[0])


@pytest.mark.integration
def test_a_training_reply_is_logged_with_what_it_holds(site: Site) -> None:
    update = site.train_round(1, site.initial_state())
    payload = site.release(1, site.train_payload(update))
    with PrivacyLedger(site.ledger_path, create=False) as ledger:
        (entry,) = egress_entries(ledger)
        assert verify_egress(ledger) == []
    assert entry.status == "sent" and entry.kind == "train" and entry.round == 1
    names = [t["name"] for t in entry.record["tensors"]]
    assert names == sorted(payload.tensors)
    first = entry.record["tensors"][0]
    assert first == tensor_record(first["name"], payload.tensors[first["name"]]).__dict__ | {
        "shape": list(first["shape"])
    }
    assert entry.record["metrics"]["num-examples"] == update.num_examples
    assert entry.record["fields"]["epsilon"] == update.epsilon
    assert entry.record["tensor_bytes"] == site.adapter_bytes


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (
            lambda p: replace(p, tensors=p.tensors | {"embeddings": torch.zeros(10, 4)}),
            "'embeddings' is not part of the agreed adapter",
        ),
        (
            lambda p: replace(
                p,
                tensors={
                    k: torch.zeros(3, 3) if i == 0 else v
                    for i, (k, v) in enumerate(p.tensors.items())
                },
            ),
            "has shape (3, 3)",
        ),
        (
            lambda p: replace(p, tensors={k: v.double() for k, v in p.tensors.items()}),
            "is float64, not float32",
        ),
        (lambda p: replace(p, metrics=p.metrics | {"label-counts": 3}), "not on the allow-list"),
        (lambda p: replace(p, metrics=p.metrics | {"train-loss": "low"}), "not a number"),
        (lambda p: replace(p, fields=p.fields | {"sample": "a customer's text"}), "'sample'"),
        (lambda p: replace(p, fields=p.fields | {"site": 3}), "field 'site' has type int"),
    ],
)
@pytest.mark.integration
def test_anything_beyond_the_agreed_reply_is_blocked_and_logged(
    site: Site, tamper: Any, reason: str
) -> None:
    """What a hostile ClientApp (code the coordinator ships) might try to send."""
    payload = site.train_payload(site.train_round(1, site.initial_state()))
    with pytest.raises(EgressBlocked, match="egress guard blocked the train reply") as err:
        site.release(1, tamper(payload))
    assert any(reason in r for r in err.value.reasons), err.value.reasons
    with PrivacyLedger(site.ledger_path, create=False) as ledger:
        (entry,) = egress_entries(ledger)
    assert entry.status == "blocked"
    assert any(reason in r for r in entry.record["blocked_because"])


def test_refusals_and_evaluations_carry_no_tensors(site: Site) -> None:
    assert check(describe(site.refusal_payload(["no"])), site.agreed_tensors, None) == []
    ev = Payload("evaluate", {"x": torch.zeros(1)}, {"eval-loss": 1.0}, {"site": site.name})
    assert "is not part of the agreed adapter" in check(describe(ev), site.agreed_tensors, None)[0]


@pytest.mark.integration
def test_a_hostile_job_asking_for_a_huge_adapter_is_refused(
    tmp_path: Path, tiny_bert: Path
) -> None:
    """A job whose LoRA rank makes the reply larger than the site lets out: refused before
    training, nothing sent, the refusal itself logged."""
    raw = _job(
        tiny_bert,
        lora={"r": 64, "alpha": 128},
        policy={"default": {"max_bytes_per_round": 50_000}},
    )
    prepared = prepare_job(validate_config(raw), "test", tmp_path / "run")
    run_job_in_process(prepared)
    (rnd,) = read_jsonl(prepared.out / "metrics.jsonl")
    assert rnd["aggregated"] is False
    reasons = rnd["refusals"]["site-1"]
    assert any("the site allows 50,000 per round" in r for r in reasons)
    assert any("max_trainable_fraction 0.1" in r for r in reasons)  # 20% of the base model
    with PrivacyLedger(prepared.sites[0].ledger, create=False) as ledger:
        kinds = [(e.kind, e.status) for e in egress_entries(ledger)]
        assert ledger.entries() == []  # nothing trained, nothing spent
    assert ("refusal", "sent") in kinds and ("train", "sent") not in kinds


@pytest.mark.integration
def test_ledger_verify_catches_an_edited_egress_record(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    site.release(1, site.train_payload(site.train_round(1, site.initial_state())))
    site.release(1, site.eval_payload(site.evaluate(site.initial_state())))
    assert main(["ledger", "verify", str(site.ledger_path)]) == 0
    assert "2 egress records" in capsys.readouterr().out
    conn = sqlite3.connect(site.ledger_path)
    conn.execute("UPDATE egress SET record = replace(record, '\"steps\": 2', '\"steps\": 1')")
    conn.commit()
    conn.close()
    assert main(["ledger", "verify", str(site.ledger_path)]) == 1
    assert "egress log: entry seq 1: stored hash" in capsys.readouterr().err


def test_the_allow_lists_are_the_messages_declarations() -> None:
    """What the guard lets out is what the typed messages declare, no more: one list of the
    keys a site sends, and the same list as in earlier releases (the wire format)."""
    from fedslm import egress
    from fedslm.messages import ADVERT, PROTOCOL_REPLIES, REPLIES, Refusal, SiteEval, SiteReport

    declared_metrics = {**SiteReport.METRICS, **SiteEval.METRICS}
    declared_fields = {**SiteReport.FIELDS, **Refusal.FIELDS, **SiteEval.FIELDS}
    allowed_metrics, allowed_fields = egress.ALLOWED_METRICS, egress.ALLOWED_FIELDS
    assert set(REPLIES) == {SiteReport, SiteEval, Refusal}
    assert allowed_metrics == {k: key.meaning for k, key in declared_metrics.items()}
    assert allowed_fields == {k: key.types for k, key in declared_fields.items()}
    assert list(allowed_metrics) == [
        "num-examples", "train-loss", "steps", "seconds", "privacy-seconds", "eval-loss",
        "eval-accuracy",
    ]  # fmt: skip
    assert allowed_fields == {
        "site": (str,), "dp": (bool,), "q": (float,), "sigma": (float,), "dp_steps": (int,),
        "epsilon": (float,), "delta": (float,), "accountant": (str,),
        "max_grad_norm": (float,), "lifetime_epsilon": (float,), "ledger_head": (str,),
        "ledger_seq": (int,), "refused": (bool,), "reasons": (list,), "withheld": (str,),
    }  # fmt: skip
    # the protocol messages of secure aggregation, likewise
    protocol_fields = egress.PROTOCOL_FIELDS
    assert protocol_fields == {r.kind: r.types() for r in PROTOCOL_REPLIES.values()}
    assert protocol_fields == {
        "secagg-shares": {
            "site_id": "int", "recipients": "list[int]", "ciphertexts": "list[bytes]"
        },
        "secagg-masked": {"site_id": "int"},
        "secagg-unmask": {
            "site_id": "int", "self_mask_owners": "list[int]", "self_mask_shares": "list[bytes]",
            "key_owners": "list[int]", "key_shares": "list[bytes]",
        },
    }  # fmt: skip
    assert ADVERT.types() == {"secagg_site_id": "int", "cipher_pk": "bytes", "mask_pk": "bytes"}


def test_what_a_site_builds_is_what_its_messages_declare(site: Site) -> None:
    """Each payload the site builds carries only declared keys, and the guard passes it."""
    from fedslm.messages import Refusal, SiteEval, SiteReport

    update = site.train_round(1, site.initial_state())
    replies = [
        (site.train_payload(update), SiteReport),
        (site.eval_payload(site.evaluate(site.initial_state())), SiteEval),
        (site.refusal_payload(["no"]), Refusal),
    ]
    for payload, message in replies:
        assert set(payload.metrics) <= set(getattr(message, "METRICS", {})), payload.kind
        assert set(payload.fields) <= set(message.FIELDS), payload.kind
        required = {k for k, key in message.FIELDS.items() if key.required}
        assert required <= set(payload.fields), payload.kind
        assert check(describe(payload), site.agreed_tensors, None) == []
