"""Each aggregation mode, server optimizer and robust rule through real sites and a coordinator
(in one process: the same code Flower connects)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedslm.artifacts import read_jsonl
from fedslm.config import validate_config
from fedslm.inprocess import run_job_in_process
from fedslm.job import PreparedJob, make_coordinator, prepare_job
from fedslm.lora_math import lora_pairs

pytestmark = pytest.mark.integration


def _run(
    out: Path,
    tiny_bert: Path,
    federation: dict[str, Any],
    train: dict[str, Any] | None = None,
    **more: Any,
) -> PreparedJob:
    raw = {
        "seed": 3,
        "model": {"path": str(tiny_bert)},
        "lora": {"r": 4, "alpha": 8},
        "train": {
            "mode": "lora",
            "local_steps": 3,
            "batch_size": 16,
            "max_length": 16,
            "learning_rate": 0.05,
            **(train or {}),
        },
        "privacy": {"noise_multiplier": 1.0},
        "federation": {"sites": 3, "rounds": 2, **federation},
        "data": {"synthetic": {"rows_per_site": 150}},
        **more,
    }
    prepared = prepare_job(validate_config(raw), "test", out)
    run_job_in_process(prepared)
    return prepared


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def _initial(prepared: PreparedJob) -> dict[str, torch.Tensor]:
    return make_coordinator(prepared).state


def test_ffa_keeps_a_frozen_and_adam_checkpoints_its_state(tmp_path: Path, tiny_bert: Path) -> None:
    prepared = _run(
        tmp_path / "ffa",
        tiny_bert,
        {"aggregation": "ffa", "server_optimizer": {"name": "adam", "learning_rate": 0.05}},
    )
    run = prepared.out
    rounds = read_jsonl(run / "metrics.jsonl")
    assert all(r["aggregated"] for r in rounds) and not rounds[-1]["failures"]
    final, initial = _adapter(run), _initial(prepared)
    for key in final:
        if ".lora_A." in key:
            assert torch.equal(final[key], initial[key]), key  # A never moves under ffa
    assert any(not torch.equal(final[k], initial[k]) for k in final if ".lora_B." in k)
    saved = torch.load(run / "checkpoints" / "round-2" / "server_optimizer.pt", weights_only=True)
    assert saved["kind"] == "adam" and saved["steps"] == 2


def test_exact_with_a_rank_per_site_and_a_policy_cap(tmp_path: Path, tiny_bert: Path) -> None:
    run = _run(
        tmp_path / "exact",
        tiny_bert,
        {"aggregation": "exact", "site_ranks": {"site-1": 2}},
        policy={"sites": {"site-3": {"max_lora_rank": 3}}},
    ).out
    rounds = read_jsonl(run / "metrics.jsonl")
    assert all(r["aggregated"] and len(r["sites"]) == 3 for r in rounds)
    assert 0.0 <= rounds[-1]["exact_energy_lost"] < 1.0
    final = _adapter(run)
    # the global adapter keeps the job's rank whatever the sites trained
    assert {p.rank for p in lora_pairs(final).values()} == {4}


def test_a_policy_rank_cap_refuses_a_factor_averaging_job(tmp_path: Path, tiny_bert: Path) -> None:
    run = _run(
        tmp_path / "capped",
        tiny_bert,
        {"min_sites": 2},
        policy={"sites": {"site-3": {"max_lora_rank": 2}}},
    ).out
    (first, _) = read_jsonl(run / "metrics.jsonl")
    assert "allows at most 2" in first["refusals"]["site-3"][0]
    assert first["aggregated"] is True


def test_median_with_fedprox_runs_and_moves_the_adapter(tmp_path: Path, tiny_bert: Path) -> None:
    prepared = _run(
        tmp_path / "median", tiny_bert, {"robust": {"rule": "median"}}, {"proximal_mu": 1.0}
    )
    run = prepared.out
    assert all(r["aggregated"] for r in read_jsonl(run / "metrics.jsonl"))
    final, initial = _adapter(run), _initial(prepared)
    assert any(not torch.equal(final[k], initial[k]) for k in final)


def test_fedprox_in_its_old_spelling_trains_what_train_proximal_mu_trains(
    tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.proximal_mu reaches the sites' LoRA steps, and a job in the old spelling
    (server_optimizer fedprox) trains the same adapter, bit for bit, under the same job id."""
    import fedslm.site
    from fedslm.training import Proximal

    built: list[float] = []

    def recording(mu: float, lr: float, params: list) -> Proximal:
        built.append(mu)
        return Proximal(mu, lr, params)

    monkeypatch.setattr(fedslm.site, "Proximal", recording)
    with pytest.warns(
        FutureWarning, match="'fedprox' with federation.server_optimizer.proximal_mu"
    ):
        old = _run(
            tmp_path / "old", tiny_bert, {"server_optimizer": {"name": "fedprox", "proximal_mu": 5}}
        )
    assert built and set(built) == {5.0}
    built.clear()
    new = _run(tmp_path / "new", tiny_bert, {}, {"proximal_mu": 5})
    assert built and set(built) == {5.0}
    assert old.job == new.job and old.job_id[:12] == new.job_id[:12]
    a, b = _adapter(old.out), _adapter(new.out)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("federation", "message"),
    [
        (
            {"aggregation": "exact", "server_optimizer": {"name": "adam"}},
            "use sgd with exact",
        ),
        ({"site_ranks": {"site-1": 2}}, "needs aggregation 'exact'"),
        ({"aggregation": "exact", "robust": {"rule": "median"}}, "not with exact"),
        ({"server_optimizer": {"name": "sgd", "beta1": 0.5}}, "applies to adam and yogi"),
        ({"site_ranks": {"site-9": 2}, "aggregation": "exact"}, "unknown sites"),
    ],
)
def test_combinations_that_cannot_work_are_refused(federation: dict, message: str) -> None:
    from fedslm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"job\.yaml") as err:
        validate_config({"federation": federation}, source="job.yaml")
    assert message in str(err.value)
