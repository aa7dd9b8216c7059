"""Classification by label words through a causal LM (``task.classifier: label-words``).

On the tiny Gemma 3 and the tiny Llama (a chat template and a plain one): a label's score is
exactly minus the training loss of its response; predictions, accuracy and macro-F1 follow from
the scores; a long text is cut so that the question and every label still fit; the
response-only logits give the same losses and DP-exact per-sample gradients as full logits; a
federated DP round runs through ``Site`` and ``Coordinator`` and the exported adapter reloads in
plain PEFT with the same scores; and the config refuses what cannot work, naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import reference_update as _reference

from fedslm.batching import collate
from fedslm.config import LABEL_PROMPT, JobConfig, LoraConfig
from fedslm.errors import ConfigError, ModelError
from fedslm.labelwords import LabelWords, check_decoder, evaluate_label_words, score_rows
from fedslm.losses import lm_loss_at_labels, per_example_loss
from fedslm.metrics import macro_f1
from fedslm.models import load_model
from fedslm.models.tiny import ensure_tiny_model
from fedslm.privacy.dp_sgd import dp_optimizer, per_sample_module

pytestmark = pytest.mark.integration

CPU = torch.device("cpu")
LABELS = ["card_lost", "pin", "transfer"]
TEXTS = [
    "my card was lost yesterday on the train",
    "reset my pin please",
    "why was my transfer declined?",
    "hi",
    "I cannot remember the pin of my new card at all",
    "money sent to my sister has not arrived",
]
GOLD = ["card_lost", "pin", "transfer", "pin", "pin", "transfer"]
FAMILIES = ["gemma3_text", "llama"]


@pytest.fixture(scope="module")
def models(fedslm_home: Path) -> dict[str, Path]:
    return {
        "gemma3_text": ensure_tiny_model("tiny-gemma3_text", fedslm_home / "models"),
        "llama": ensure_tiny_model("tiny-llama", fedslm_home / "models"),
    }


def _loaded(path: Path, max_length: int = 96):
    loaded = load_model(path, "causal-lm", LoraConfig(r=4, alpha=8), LABELS, CPU, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at init: move LoRA off its no-op start so it matters
        for p in loaded.model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    words = LabelWords(loaded.tokenizer, LABELS, loaded.prompt_template, LABEL_PROMPT, max_length)
    return loaded, words


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_are_minus_the_training_loss_of_each_label(
    family: str, models: dict[str, Path]
) -> None:
    loaded, words = _loaded(models[family])
    data = words.encode(TEXTS, GOLD)
    scores = score_rows(loaded.model, data.prompts, words.responses, CPU)
    assert scores.shape == (len(TEXTS), len(LABELS))
    # the same rows with every label as the response, scored by the training loss
    loaded.model.eval()
    for k, label in enumerate(LABELS):
        as_k = words.encode(TEXTS, [label] * len(TEXTS)).encoded
        batch = collate(as_k, list(range(len(TEXTS))), CPU)
        labels = batch.pop("labels")
        with torch.no_grad():
            loss = per_example_loss(loaded.model(**batch).logits, labels)
        torch.testing.assert_close(scores[:, k], -loss, rtol=1e-4, atol=1e-5)

    result = evaluate_label_words(loaded.model, words, data, CPU)
    gold = [LABELS.index(g) for g in GOLD]
    pred = scores.argmax(dim=1).tolist()
    assert result.predictions == pred
    assert result.accuracy == pytest.approx(
        sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)
    )
    assert result.macro_f1 == pytest.approx(macro_f1(gold, pred))
    assert result.loss == pytest.approx(-float(scores[range(len(gold)), gold].mean()), rel=1e-5)


def test_macro_f1_is_the_mean_f1_over_present_labels() -> None:
    # label 0: tp 1, fp 0, fn 1 -> 2/3; label 1: tp 2, fp 1, fn 0 -> 4/5; label 2 never gold
    assert macro_f1([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert macro_f1([0, 0, 1], [0, 2, 1]) == pytest.approx((2 / 3 + 1) / 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_long_text_is_cut_and_the_question_and_labels_still_fit(
    family: str, models: dict[str, Path]
) -> None:
    loaded, words = _loaded(models[family], max_length=80)
    long = " ".join(["my card was lost and then the transfer failed"] * 40)
    data = words.encode([long, "hi"], ["transfer", "pin"])
    tok = loaded.tokenizer
    question = tok(words.render("").split("{text}")[-1].strip(), add_special_tokens=False)
    for ids, prompt in zip(data.encoded.input_ids, data.prompts, strict=True):
        assert len(prompt) + words.longest <= 80
        assert len(ids) <= 80
    # the question, at the end of the prompt, survived the cut; the text's end did not
    decoded = tok.decode(data.prompts[0])
    assert "Answer with the label only." in decoded
    assert "card lost, pin, transfer" in decoded
    assert decoded.count("transfer failed") < 40
    assert question["input_ids"]  # the rendered question is not empty
    with pytest.raises(ModelError, match=r"train\.max_length=12 leaves no room"):
        LabelWords(tok, LABELS, loaded.prompt_template, LABEL_PROMPT, 12)


def test_labels_that_read_alike_are_refused(models: dict[str, Path]) -> None:
    loaded, _ = _loaded(models["llama"])
    with pytest.raises(ModelError, match="read as the same words"):
        LabelWords(loaded.tokenizer, ["card_lost", "card-lost"], loaded.prompt_template)


@pytest.mark.parametrize("family", FAMILIES)
def test_response_only_logits_give_the_loss_and_dp_exact_per_sample_gradients(
    family: str, models: dict[str, Path]
) -> None:
    loaded, words = _loaded(models[family])
    model = loaded.model
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    data = words.encode(TEXTS, GOLD).encoded
    batch = collate(data, list(range(len(data))), CPU)
    labels = batch.pop("labels")
    model.train()
    with torch.no_grad():
        full = per_example_loss(model(**batch).logits, labels)
        torch.testing.assert_close(lm_loss_at_labels(model, batch, labels), full)

    # per-sample gradients through the response-only path equal one-at-a-time clipping
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for i in range(len(data)):
        one = collate(data, [i], CPU)
        lab = one.pop("labels")
        grads = torch.autograd.grad(per_example_loss(model(**one).logits, lab).sum(), params)
        norms.append(float(torch.sqrt(sum(g.pow(2).sum() for g in grads))))
    norms.sort()
    clip = (norms[2] + norms[3]) / 2  # clips half of the rows
    reference = _reference(model, data, clip, len(data))
    before = [p.detach().clone() for p in params]
    gsm = per_sample_module(model)
    optimizer = dp_optimizer(torch.optim.SGD(params, lr=1.0), 0.0, clip, len(data), None)
    gsm.train()
    optimizer.zero_grad()
    lm_loss_at_labels(gsm, batch, labels).mean().backward()
    optimizer.step()
    gsm._close()
    scale = max(float(r.abs().max()) for r in reference)
    for p, old, ref in zip(params, before, reference, strict=True):
        torch.testing.assert_close(old - p.detach(), ref, rtol=1e-4, atol=1e-5 * scale)


def _job(base: Path, **task) -> dict:
    return {
        "model": {"path": str(base)},
        "task": {"type": "classification", "classifier": "label-words", **task},
        "lora": {"r": 2, "alpha": 4},
        "train": {"local_steps": 2, "batch_size": 6, "max_length": 96, "learning_rate": 0.05},
        "privacy": {"noise_multiplier": 1.0, "max_grad_norm": 1.0},
        "federation": {"sites": 2, "rounds": 1},
        "data": {"synthetic": {"rows_per_site": 16}},
        "policy": {
            "default": {
                "privacy": {"lifetime_epsilon": 1e4, "max_epsilon_per_job": 1e4},
                "min_train_records": 1,
            }
        },
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_a_federated_dp_round_by_label_words_and_the_adapter_reloads_in_plain_peft(
    family: str, models: dict[str, Path], tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedslm.inprocess import build_site, to_report
    from fedslm.job import make_coordinator, prepare_job
    from fedslm.models.adapter import load_exported

    base = models[family]
    job = JobConfig.model_validate(_job(base))
    assert job.train_mode == "lora"  # never the probe: there is no head
    # a saved config (defaults written out) validates again to the same job
    assert JobConfig.model_validate(job.model_dump(mode="json")) == job
    prepared = prepare_job(job, "test", tmp_path / "run")
    sites = [build_site(prepared, s) for s in prepared.sites]
    assert sites[0].words is not None and sites[0].eval_words is not None
    coordinator = make_coordinator(prepared)
    assert not any("score" in k or "classifier" in k for k in coordinator.state)  # no head
    initial = {k: v.clone() for k, v in coordinator.state.items()}
    coordinator.start_round(1)
    updates = [site.train_round(1, coordinator.state) for site in sites]
    assert all(u.segment is not None and u.epsilon is not None for u in updates)
    new = coordinator.aggregate(
        1, [to_report(s, u) for s, u in zip(sites, updates, strict=True)], []
    )
    assert new is not None
    assert any(not torch.equal(initial[k], new[k]) for k in initial)
    ev = sites[0].evaluate(new)
    direct = evaluate_label_words(sites[0].loaded.model, sites[0].words, sites[0].eval_words, CPU)
    assert (ev.accuracy, ev.examples) == (direct.accuracy, len(sites[0].eval_words))
    assert 0.0 <= ev.accuracy <= 1.0
    coordinator.finish()

    adapter = tmp_path / "run" / "adapter"
    meta = json.loads((adapter / "fedslm_adapter.json").read_text())
    assert meta["classifier"] == "label-words" and meta["label_prompt"] == LABEL_PROMPT
    assert meta["pooling"] is None
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    ours = load_exported(adapter, base)
    words, data = sites[0].words, sites[0].eval_words
    theirs = score_rows(plain, data.prompts, words.responses, CPU)
    torch.testing.assert_close(theirs, score_rows(ours, data.prompts, words.responses, CPU))
    torch.testing.assert_close(
        theirs, score_rows(coordinator.outputs.model, data.prompts, words.responses, CPU)
    )


def test_encoders_cannot_write_a_label(tiny_bert: Path) -> None:
    with pytest.raises(ModelError, match=r"needs a generative .* is an encoder"):
        check_decoder(tiny_bert)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": {"type": "causal-lm", "classifier": "label-words"}}, "set task.type to"),
        ({"task": {"label_prompt": "Classify: {text}"}}, "task.classifier: label-words"),
        (
            {"task": {"classifier": "label-words", "label_prompt": "no placeholder"}},
            "'{text}' exactly once",
        ),
        ({"task": {"classifier": "label-words"}, "train": {"mode": "head"}}, "train.mode 'head'"),
        ({"task": {"classifier": "label-words"}, "model": {"pooling": "model"}}, "model.pooling"),
        (
            {"task": {"classifier": "label-words"}, "model": {"head_modules": ["score"]}},
            "model.head_modules",
        ),
    ],
)
def test_the_config_refuses_what_label_words_cannot_do(change: dict, message: str) -> None:
    from fedslm.config import validate_config

    with pytest.raises(ConfigError, match=message):
        validate_config(change, source="job.yaml")


def test_jobs_without_label_words_keep_their_fingerprint() -> None:
    """The new task keys enter the fingerprint only when used: a job that does not use them
    keeps its job id, its sites' noise seeds and its stored releases across the upgrade."""
    import hashlib

    job = JobConfig.model_validate({"model": {"name": "tiny-llama"}})
    before = job.model_dump(mode="json")
    del before["task"]["classifier"], before["task"]["label_prompt"]  # as fedslm wrote it
    # ... when it also spelled the server optimizer the old way (tests/test_config_legacy.py)
    before["federation"]["server_optimizer"] |= {"name": "fedavg", "proximal_mu": None}
    del before["train"]["proximal_mu"]
    old = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    assert job.fingerprint() == old
    words = JobConfig.model_validate(
        {"model": {"name": "tiny-llama"}, "task": {"classifier": "label-words"}}
    )
    asked = JobConfig.model_validate(
        {
            "model": {"name": "tiny-llama"},
            "task": {"classifier": "label-words", "label_prompt": "Topic of {text}?"},
        }
    )
    assert len({job.fingerprint(), words.fingerprint(), asked.fingerprint()}) == 3
    # the report's job-identity check hashes job.json's copy of the config the same way
    from fedslm.report.checks.files import job_config_sha256

    for j in (job, words, asked):
        assert job_config_sha256(j.model_dump(mode="json")) == j.fingerprint()


def test_the_plan_counts_no_head_for_label_words(models: dict[str, Path]) -> None:
    from fedslm.plan import describe_plan, trainable_parameters
    from fedslm.privacy.private_training import plan_privacy

    job = JobConfig.model_validate(_job(models["gemma3_text"]))
    trainable = trainable_parameters(job, models["gemma3_text"], len(LABELS))
    assert trainable["head"] == 0 and trainable["lora"] > 0
    lines, _ = describe_plan("clinic", plan_privacy(job, 32, "test"), trainable)
    assert ", LoRA: q = " in lines[1]  # not "LoRA + head": there is no head to train
