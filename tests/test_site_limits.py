"""What may leave a site, and on how many records (issue 15, items 4 and 5).

Each test reproduces a job or a data set that got past the site before these limits: a head
that sends every dense and LayerNorm weight, a LoRA rank that ships an adapter the size of the
base model, a rank ``policy check --job`` accepted and the site refused, a site that trained on
one record and sent the loss of its single evaluation record, an evaluation set made of copies
of training rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoModel

from fedslm.artifacts import read_jsonl
from fedslm.cli import main
from fedslm.config import validate_config
from fedslm.data import INTENTS, generate_bank_messages, write_rows
from fedslm.data.sites import split_site
from fedslm.egress import Payload, check, describe
from fedslm.errors import FederationError
from fedslm.inprocess import run_job_in_process
from fedslm.job import plan_job, prepare_job
from fedslm.models.registry import base_parameters, resolve_model
from fedslm.policy import SitePolicy, load_policy
from fedslm.privacy.egress_log import egress_entries
from fedslm.privacy.ledger import DatasetFingerprint, PrivacyLedger
from fedslm.site import Site, SiteInputs

LABELS = sorted(INTENTS)
# the head of issue 15: every dense and LayerNorm weight of every BERT layer
HEAD_ATTACK = ["classifier", "pooler", "intermediate", "output"]


def _job(tiny_bert: Path, **more: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "model": {"path": str(tiny_bert)},
        "lora": {"r": 2, "alpha": 4},
        "train": {"mode": "lora", "local_steps": 1, "batch_size": 16, "max_length": 16},
        "privacy": {"noise_multiplier": 1.0},
        "federation": {"sites": 2, "rounds": 1},
        "data": {"synthetic": {"rows_per_site": 100}},
    }
    raw.update(more)
    return raw


def _preflight_refusals(raw: dict[str, Any], ledgers: Path) -> str:
    from fedslm.job import preflight

    job = validate_config(raw)
    with pytest.raises(FederationError) as err:
        preflight(plan_job(job, "job.yaml"), ledgers)
    return str(err.value)


# -- 4. what may leave a site ----------------------------------------------------------------


def test_a_job_sending_dense_and_layernorm_weights_as_its_head_is_refused(
    tiny_bert: Path, ledgers: Path
) -> None:
    """model.head_modules [classifier, pooler, intermediate, output] trains and sends every
    dense and LayerNorm weight of every layer (a third of the base model): the default policy
    refuses it before anything is written, naming the modules beyond the family's head."""
    attack = {"pooling": "model", "head_modules": HEAD_ATTACK}
    text = _preflight_refusals(_job(tiny_bert, model={"path": str(tiny_bert), **attack}), ledgers)
    assert "head modules ['pooler', 'intermediate', 'output'] beyond the model family's" in text
    assert "max_trainable_fraction 0.1" in text  # and its size alone would be refused too
    # the family's own head is accepted
    ok = _job(tiny_bert, model={"path": str(tiny_bert), "pooling": "model"})
    from fedslm.job import preflight

    assert preflight(plan_job(validate_config(ok), "job.yaml"), ledgers) == []


def test_allowing_the_modules_still_bounds_the_size(tiny_bert: Path, ledgers: Path) -> None:
    """A site that allows the extra head modules still refuses an adapter above its share of
    the base model: the size is measured on the adapter the site builds."""
    attack = {"pooling": "model", "head_modules": HEAD_ATTACK}
    allow = {"allowed_head_modules": ["pooler", "intermediate", "output"]}
    raw = _job(tiny_bert, model={"path": str(tiny_bert), **attack}, policy={"default": allow})
    text = _preflight_refusals(raw, ledgers)
    assert "head modules" not in text
    # counted, not written down: the tiny tokenizer's vocabulary (so the embedding) can differ
    # by a token between builds
    base = base_parameters(tiny_bert)
    assert base == AutoModel.from_pretrained(tiny_bert).num_parameters()  # 162,240 or so
    assert f"of the base model's {base:,} parameters" in text and "max_trainable_fraction" in text


def test_a_rank_256_adapter_on_a_64_wide_model_is_refused(tiny_bert: Path, ledgers: Path) -> None:
    """lora.r=256 on a model of hidden size 64 ships an adapter close to the base model's size:
    refused by the default rank cap and by the default size bound."""
    text = _preflight_refusals(_job(tiny_bert, lora={"r": 256, "alpha": 512}), ledgers)
    assert "LoRA rank 256; the site allows at most 64" in text
    assert "max_trainable_fraction 0.1" in text
    from fedslm.acceptance import measure_adapter

    job = validate_config(_job(tiny_bert, lora={"r": 256, "alpha": 512}))
    size = measure_adapter(job, resolve_model(job.model), LABELS, "site-1", SitePolicy())
    assert size.fraction > 0.5  # what it would have sent


def test_the_egress_guard_bounds_what_leaves_whatever_the_job_agreed() -> None:
    """Defence in depth: the guard counts the values a reply carries from its shapes and
    blocks more than the policy's share of the base model, even when every tensor is one the
    job agreed (the job's own description of its adapter is not trusted)."""
    big = {"base_model.classifier.weight": torch.zeros(300, 64)}
    agreed = {k: tuple(v.shape) for k, v in big.items()}
    record = describe(Payload("train", big, {"num-examples": 60}, {"site": "a"}))
    assert check(record, agreed, None) == []
    problems = check(record, agreed, None, max_params=16_224)
    assert problems == [
        "19,200 values; the site policy's max_trainable_fraction allows 16,224 (that share of "
        "the base model's parameters)"
    ]


def test_the_site_checks_its_own_adapter_and_guards_every_reply(
    tmp_path: Path, tiny_bert: Path
) -> None:
    prepared = prepare_job(validate_config(_job(tiny_bert)), "test", tmp_path / "run")
    setup = prepared.sites[0]
    inputs = SiteInputs(
        setup.name, setup.files.train, setup.files.eval, setup.ledger, policy=setup.policy
    )
    site = Site(prepared.job, prepared.model, prepared.labels, inputs, job_id=prepared.job_id)
    assert site.adapter.params * 4 == site.adapter_bytes
    assert site.max_reply_params == int(0.1 * base_parameters(tiny_bert))
    assert site.refusal(1) == []
    # a policy tighter than the adapter the site built: refused before training, nothing spent
    tight = site.policy.model_copy(update={"max_trainable_fraction": 0.001})
    site.policy, site._job_refusal = tight, None
    (reason,) = site.refusal(1)
    assert "max_trainable_fraction 0.001" in reason


def _site_folder(tmp_path: Path, policy: dict[str, Any], rows: list[dict[str, str]]) -> Path:
    folder = tmp_path / "hospital"
    folder.mkdir()
    write_rows(rows, folder / "data.jsonl")
    (folder / "site.yaml").write_text(yaml.safe_dump({"data": "data.jsonl", **policy}))
    return folder


def _deployed_job(tmp_path: Path, tiny_bert: Path, **more: Any) -> Path:
    job = {
        "model": {"path": str(tiny_bert)},
        "federation": {"sites": ["site"], "rounds": 2},
        "privacy": {"target_epsilon": 3.0},
        "train": {"mode": "lora", "batch_size": 30},
        "data": {"at_sites": True, "labels": LABELS},
        **more,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.integration
def test_policy_check_and_the_site_give_the_same_answer_on_a_rank(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``policy check --job`` answered ACCEPTED for a rank the site then refused: both now call
    the site's one decision (``job_refusal``) with the rank the site would train at."""
    rows = generate_bank_messages(["a"], 300, seed=1, skew=1.0)
    folder = _site_folder(tmp_path, {"max_lora_rank": 4}, rows)
    job_path = _deployed_job(tmp_path, tiny_bert, lora={"r": 8, "alpha": 16})
    code = main(["policy", "check", str(folder / "site.yaml"), "--job", str(job_path)])
    out = capsys.readouterr().out
    assert code == 1, out
    refused = out.split("REFUSED: ", 1)[1].strip()
    assert "the job asks for LoRA rank 8; the site allows at most 4" in refused
    # the site, built as the deployed worker builds it on the same file, refuses the same way
    from fedslm.config import load_config

    job, policy = load_config(job_path), load_policy(folder / "site.yaml")
    data = [{"text": r["text"], "label": r["label"]} for r in rows]
    train, held = split_site(len(data), [r["label"] for r in data], job.data, job.seed, "site")
    write_rows([data[i] for i in train], tmp_path / "train.jsonl")
    write_rows([data[i] for i in held], tmp_path / "eval.jsonl")
    inputs = SiteInputs(
        "site", tmp_path / "train.jsonl", tmp_path / "eval.jsonl", tmp_path / "ledger.db",
        policy=policy, dataset=DatasetFingerprint.of_file(folder / "data.jsonl"),
    )  # fmt: skip
    site = Site(job, resolve_model(job.model), LABELS, inputs, job_id="j")
    assert "; ".join(site.refusal(1)) == refused
    # with exact aggregation the site trains at its cap instead, and both accept
    fed = {"sites": ["site"], "rounds": 2, "aggregation": "exact"}
    exact = _deployed_job(tmp_path, tiny_bert, lora={"r": 8, "alpha": 16}, federation=fed)
    assert main(["policy", "check", str(folder / "site.yaml"), "--job", str(exact)]) == 0
    assert "LoRA rank 4 at this site" in capsys.readouterr().out


# -- 5. small evaluation sets ----------------------------------------------------------------


def test_a_site_with_one_training_record_refuses_the_job(tiny_bert: Path, ledgers: Path) -> None:
    """A Dirichlet split with alpha 0.01 left a site with one training record and one
    evaluation record; it trained and sent that record's evaluation loss. Now its policy
    refuses the job before round 1, and says why."""
    from fedslm.job import preflight

    raw = _job(tiny_bert, federation={"sites": 2, "rounds": 1, "min_sites": 1})
    job = validate_config(raw)
    plan = plan_job(job, "job.yaml")
    tiny = plan.sites[1]
    plan.sites[1] = type(tiny)(tiny.name, tiny.train[:1], tiny.eval[:1], tiny.train_labels[:1])
    (line,) = preflight(plan, ledgers)
    assert line.startswith("site site-2") and "would train on 1 record(s)" in line
    assert "min_train_records 20" in line


@pytest.mark.integration
def test_a_small_evaluation_set_sends_no_figures(tmp_path: Path, tiny_bert: Path) -> None:
    """A site with enough training records but fewer evaluation records than min_eval_records
    trains, and withholds its evaluation: no loss, accuracy or count leaves it, the coordinator
    records why and averages the others only."""
    raw = _job(tiny_bert, policy={"sites": {"site-2": {"min_eval_records": 25}}})
    prepared = prepare_job(validate_config(raw), "test", tmp_path / "run")
    run_job_in_process(prepared)
    (rnd,) = read_jsonl(prepared.out / "metrics.jsonl")
    assert rnd["aggregated"] is True
    small, other = rnd["sites"]["site-2"], rnd["sites"]["site-1"]
    assert "eval_loss" not in small and "min_eval_records (25)" in small["eval_withheld"]
    assert rnd["eval_loss"] == pytest.approx(other["eval_loss"])
    with PrivacyLedger(prepared.sites[1].ledger, create=False) as ledger:
        (ev,) = [e for e in egress_entries(ledger) if e.kind == "evaluate"]
    assert ev.status == "sent" and ev.record["metrics"] == {}
    assert set(ev.record["fields"]) == {"site", "withheld"}


def test_the_guard_blocks_figures_of_too_few_evaluation_records() -> None:
    few = describe(Payload("evaluate", {}, {"num-examples": 1, "eval-loss": 0.3}, {"site": "a"}))
    assert check(few, {}, None, min_eval_records=20) == [
        "evaluation metrics over 1 record(s); the site policy's min_eval_records is 20"
    ]
    fields = {"site": "a", "withheld": "too few"}
    smuggled = describe(Payload("evaluate", {}, {"eval-loss": 0.3}, fields))
    assert check(smuggled, {}, None) == ["a withheld evaluation carries no metrics"]
    assert check(describe(Payload("evaluate", {}, {}, fields)), {}, None) == []


def test_the_trust_model_states_the_minimums() -> None:
    from fedslm.report.sections.summary import _minimums_trust

    def ctx(*policies: dict[str, Any] | None) -> Any:
        sites = {f"s{i}": SimpleNamespace(policy=p) for i, p in enumerate(policies)}
        return SimpleNamespace(run=SimpleNamespace(sites=sites))

    stated = _minimums_trust(ctx(SitePolicy().model_dump(mode="json")))
    assert "at least min_train_records" in stated and "(s0: 20 and 11)" in stated
    assert "predate" in _minimums_trust(ctx({"max_rounds": 3}))


@pytest.mark.integration
def test_evaluation_rows_that_repeat_training_rows_are_warned_about(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file with every row three times: most evaluation rows are copies of training rows."""
    rows = generate_bank_messages(["a"], 100, seed=2, skew=1.0)
    tripled = [dict(r, text=f"  {r['text']} ") if i else r for r in rows for i in range(3)]
    folder = _site_folder(tmp_path, {}, tripled)
    job_path = _deployed_job(tmp_path, tiny_bert)
    main(["policy", "check", str(folder / "site.yaml"), "--job", str(job_path)])
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if "repeat a training row" in x]
    found = re.search(r"(\d+) of (\d+) evaluation rows", line)
    assert found and int(found[1]) >= 0.8 * int(found[2]) == 0.8 * 60, line
    assert str(folder / "data.jsonl") in line
    # the unit: counts, file, and silence for a file without copies
    from fedslm.data import duplicate_warning

    job = validate_config(json.loads(json.dumps({"data": {"at_sites": True, "labels": LABELS}})))
    train, held = split_site(len(rows), None, job.data, 0, "site")
    clean = duplicate_warning("a", "f.csv", [rows[i] for i in train], [rows[i] for i in held],
                              job.data, "classification")  # fmt: skip
    assert clean is None


def test_the_plan_before_a_simulation_warns_of_repeated_rows(
    tmp_path: Path, tiny_bert: Path
) -> None:
    from fedslm.cli import _duplicate_warnings

    rows = generate_bank_messages(["a"], 200, seed=3, skew=1.0)
    write_rows([r for r in rows for _ in range(3)], tmp_path / "tripled.jsonl")
    write_rows(rows, tmp_path / "once.jsonl")
    split = {"method": "iid"}
    for name, expect in (("tripled", 2), ("once", 0)):
        data = {"path": str(tmp_path / f"{name}.jsonl"), "split": split}
        prepared = prepare_job(validate_config(_job(tiny_bert, data=data)), "t", tmp_path / name)
        warnings = _duplicate_warnings(prepared)
        assert len(warnings) == expect, warnings
        assert all("repeat a training row" in w and "site-" in w for w in warnings)


def test_a_masked_vector_is_bounded_by_the_update_it_carries() -> None:
    """Under secure aggregation the adapter leaves as one ring vector: the update and the
    site's weight. The guard bounds the update's values, as for a plain reply."""
    import numpy as np

    from fedslm.egress import MASKED_VECTOR, RingSpec

    masked = Payload("secagg-masked", fields={"site_id": 1},
                     vectors={MASKED_VECTOR: np.zeros(1001, dtype="<u4")})  # fmt: skip
    ring = RingSpec(1001, "<u4")
    assert check(describe(masked), {}, None, ring, max_params=1000) == []
    (problem,) = check(describe(masked), {}, None, ring, max_params=999)
    assert problem.startswith("1,000 values; the site policy's max_trainable_fraction allows 999")
