"""End to end: ``fedslm simulate`` on Flower's simulation engine with tiny models and DP on.

The run's outputs are checked the way a stranger would check them: epsilon with dp-accounting
directly, the adapter with plain transformers + PEFT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedslm.artifacts import read_jsonl
from fedslm.privacy.accounting import gaussian_epsilon

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "fedslm.cli", *args],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def ledger_of(run: Path, site: str) -> Path:
    """The site's ledger, where job.json says (simulated ledgers live outside the run)."""
    sites = json.loads((run / "job.json").read_text())["sites"]
    return Path(next(s["ledger"] for s in sites if s["name"] == site))


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    out = tmp_path_factory.mktemp("sim") / "run"
    run_cli("simulate", str(SMOKE), "--out", str(out), "-q")
    return out


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    out = tmp_path_factory.mktemp("sim-llama") / "run"
    run_cli(
        "simulate",
        str(SMOKE),
        "--out",
        str(out),
        "-q",
        "--set",
        "model.name=tiny-llama",
        "--set",
        "task.type=causal-lm",
        "--set",
        "federation.sites=2",
        "--set",
        "data.synthetic.rows_per_site=120",
    )
    return out


def pld_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    acc = PLDAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def test_outputs_are_complete(bert_run: Path) -> None:
    assert (bert_run / "adapter" / "adapter_model.safetensors").is_file()
    for k in (1, 2):
        assert (bert_run / "checkpoints" / f"round-{k}" / "adapter_model.safetensors").is_file()
    for site in ("site-1", "site-2", "site-3"):
        assert (bert_run / "sites" / site / "data" / "train.jsonl").is_file()
    rounds = read_jsonl(bert_run / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["aggregated"] is True
        assert r["wall_seconds"] > 0
        for key in ("train_loss", "eval_loss", "eval_accuracy"):
            assert isinstance(r[key], float)
        assert set(r["sites"]) == {"site-1", "site-2", "site-3"}
        for s in r["sites"].values():
            assert {"train_loss", "eval_loss", "eval_accuracy", "bytes_sent", "epsilon"} <= set(s)
            assert s["bytes_sent"] > 0
        assert set(r["bytes_sent"]) == {"site-1", "site-2", "site-3"}


def test_loss_goes_down_and_adapter_changes(bert_run: Path, tiny_bert: Path) -> None:
    first, last = read_jsonl(bert_run / "metrics.jsonl")
    assert last["train_loss"] < first["train_loss"]
    assert last["eval_loss"] < first["eval_loss"]

    from safetensors.torch import load_file

    r1 = load_file(bert_run / "checkpoints" / "round-1" / "adapter_model.safetensors")
    final = load_file(bert_run / "adapter" / "adapter_model.safetensors")
    assert all(not torch.equal(r1[k], final[k]) for k in final)


def test_privacy_json_matches_dp_accounting(bert_run: Path) -> None:
    privacy = json.loads((bert_run / "privacy.json").read_text())
    assert privacy["versions"]["opacus"] == "1.6.0"
    for site in ("site-1", "site-2", "site-3"):
        p = privacy["sites"][site]
        assert p["accountant"] == "prv"
        for key in (
            "epsilon",
            "delta",
            "noise_multiplier",
            "max_grad_norm",
            "sample_rate",
            "dp_steps",
            "records",
        ):
            assert p[key] is not None, key
        independent = pld_epsilon(
            p["sample_rate"], p["noise_multiplier"], p["dp_steps"], p["delta"]
        )
        assert p["epsilon"] == pytest.approx(independent, rel=0.01)
        assert p["epsilon"] <= 8.0 + 1e-6  # the job's target, over all its local steps
        assert p["epsilon_check"] == "ok"


class _AsClassifierOutput(torch.nn.Module):
    """The stranger's model returns bare logits; fedslm's ``evaluate`` reads ``.logits``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: torch.Tensor) -> object:
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=self.model(**batch))


def _plain_peft_eval(run: Path, base: Path, loader=None) -> dict[str, float]:
    """Per-site eval loss using only transformers + PEFT to load the model (and, for a
    mean-pooling classifier, ``loader``: the code docs/models.md gives a stranger)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from fedslm.batching import PromptTemplate, encode_classification, encode_instructions
    from fedslm.data import read_examples, read_instructions
    from fedslm.training import evaluate

    meta = json.loads((run / "adapter" / "fedslm_adapter.json").read_text())
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert not Path(config["base_model_name_or_path"]).is_absolute()
    assert len(meta["base_model"]["sha256"]) == 64
    tok = AutoTokenizer.from_pretrained(base)
    id2label = {int(k): v for k, v in (meta["id2label"] or {}).items()}
    if meta["task"] == "classification" and meta["pooling"] == "mean":
        model = _AsClassifierOutput(loader(base, run / "adapter"))
    else:
        if meta["task"] == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=meta["num_labels"], id2label=id2label
            )
            model.config.pad_token_id = tok.pad_token_id
        else:
            model = AutoModelForCausalLM.from_pretrained(base)
        model = PeftModel.from_pretrained(model, run / "adapter")
    losses = {}
    for site_dir in sorted((run / "sites").iterdir()):
        path = site_dir / "data" / "eval.jsonl"
        if meta["task"] == "classification":
            ex = read_examples(path, "text", "label")
            label2id = {v: k for k, v in id2label.items()}
            data = encode_classification(tok, ex.texts, ex.labels, label2id, meta["max_length"])
        else:
            ins = read_instructions(path, "prompt", "response")
            # the prompt layout the run used, from the adapter's own metadata
            t = meta["family_defaults"]["prompt_template"]
            template = PromptTemplate(t["kind"], t["text"])
            data = encode_instructions(
                tok, ins.prompts, ins.responses, meta["max_length"], template
            )
        losses[site_dir.name] = evaluate(model, data, 64, torch.device("cpu")).loss
    return losses


@pytest.mark.parametrize(
    ("run_fixture", "base_fixture"), [("bert_run", "tiny_bert"), ("llama_run", "tiny_llama")]
)
def test_exported_adapter_reloads_in_plain_peft_with_the_evaluated_logits(
    run_fixture: str, base_fixture: str, request: pytest.FixtureRequest, documented_loader
) -> None:
    run, base = request.getfixturevalue(run_fixture), request.getfixturevalue(base_fixture)
    evaluated = read_jsonl(run / "metrics.jsonl")[-1]["sites"]
    reloaded = _plain_peft_eval(run, base, documented_loader)
    assert set(reloaded) == set(evaluated)
    for site, loss in reloaded.items():
        assert loss == pytest.approx(evaluated[site]["eval_loss"], rel=1e-5, abs=1e-6)


def test_ledgers_hold_every_round_and_verify(bert_run: Path) -> None:
    from fedslm.privacy.ledger import PrivacyLedger

    privacy = json.loads((bert_run / "privacy.json").read_text())
    for site in ("site-1", "site-2", "site-3"):
        path = ledger_of(bert_run, site)
        assert not path.is_relative_to(bert_run)  # the data set's, not the run's
        with PrivacyLedger(path, create=False) as ledger:
            assert ledger.verify() == []
            entries = ledger.entries()
        assert [e.round for e in entries] == [1, 2]
        assert entries[-1].hash == privacy["sites"][site]["ledger_head"]
        assert entries[-1].epsilon == pytest.approx(privacy["sites"][site]["epsilon"], rel=1e-9)
        assert run_cli("ledger", "verify", str(path)).returncode == 0


def test_a_site_policy_refusal_trains_nothing_and_central_dp_survives_it(
    tmp_path: Path, tiny_bert: Path
) -> None:
    out = tmp_path / "run"
    run_cli(
        "simulate", str(SMOKE), "--out", str(out), "-q",
        "--set", "federation.rounds=1",
        "--set", "data.synthetic.rows_per_site=200",
        "--set", "policy.sites.site-3.privacy.max_epsilon_per_job=1",
        "--set", "privacy.central={enabled: true, clip_norm: 1.0, noise_multiplier: 2.0}",
    )  # fmt: skip
    (rnd,) = read_jsonl(out / "metrics.jsonl")
    assert rnd["aggregated"] is True
    assert "site allows 1 per job" in rnd["refusals"]["site-3"][0]
    assert "site-3" not in rnd["bytes_sent"]
    from fedslm.privacy.ledger import PrivacyLedger

    with PrivacyLedger(ledger_of(out, "site-3"), create=False) as ledger:
        assert ledger.entries() == []  # nothing trained, nothing spent
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["sites"]["site-3"]["refusals"]
    assert privacy["sites"]["site-3"]["dp_enabled"] is False
    # site-level DP: the round went out with 2 of 3 sites, divided by the roster of 3
    assert rnd["central_dp"]["sites"] == 2
    central = privacy["central"]
    assert central["rounds_released"] == 1 and central["denominator"] == 3
    assert central["epsilon_check"] == "ok"
    assert central["epsilon_analytic"] == pytest.approx(gaussian_epsilon(2.0, 1, 1e-5))
    assert rnd["central_epsilon"] == pytest.approx(central["epsilon"])


def test_causal_lm_path_end_to_end(llama_run: Path) -> None:
    rounds = read_jsonl(llama_run / "metrics.jsonl")
    assert len(rounds) == 2 and all(r["aggregated"] for r in rounds)
    privacy = json.loads((llama_run / "privacy.json").read_text())
    assert set(privacy["sites"]) == {"site-1", "site-2"}
    assert all(p["epsilon_check"] == "ok" for p in privacy["sites"].values())
    meta = json.loads((llama_run / "adapter" / "fedslm_adapter.json").read_text())
    assert meta["task"] == "causal-lm" and meta["num_labels"] is None
