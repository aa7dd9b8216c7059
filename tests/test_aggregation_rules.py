"""The aggregation rules as objects (fedslm.aggregation_rules): declarations, registry, the
site-side steps and the coordinator-side screening and combining, each against the pure
function it calls; and config validation asking the rule rather than comparing names."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch

from fedslm.aggregation import exact, fedavg, ffa
from fedslm.aggregation_rules import (
    AGGREGATION_RULES,
    FFA,
    AggregationRule,
    Exact,
    FedAvgFactors,
    quoted,
    rule_for,
    rules_where,
)
from fedslm.config import FederationConfig, ServerOptimizerConfig, validate_config
from fedslm.errors import ConfigError, FederationError
from fedslm.lora_math import to_site_rank
from fedslm.server_opt import SERVER_OPTIMIZERS

LAYERS = ["enc.layer.0.query", "enc.layer.0.value"]
HEAD = "classifier.weight"
OUT, IN = 6, 5
State = dict[str, torch.Tensor]


def site_state(seed: int, rank: int = 2, a: State | None = None) -> State:
    """Random LoRA factors of ``rank`` and a head; ``a`` fixes the A factors (ffa)."""
    g = torch.Generator().manual_seed(seed)
    state: State = {}
    for layer in LAYERS:
        state[f"{layer}.lora_A.weight"] = torch.randn(rank, IN, generator=g) / math.sqrt(IN)
        state[f"{layer}.lora_B.weight"] = torch.randn(OUT, rank, generator=g) * 0.1
    if a is not None:
        state.update({k: v.clone() for k, v in a.items() if ".lora_A." in k})
    state[HEAD] = torch.randn(3, IN, generator=g)
    return state


def assert_same(x: State, y: State) -> None:
    """Bitwise equal, same names in the same order."""
    assert list(x) == list(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


# --- registry ---


def test_the_registry_holds_exactly_the_names_the_config_accepts() -> None:
    literal = get_args(FederationConfig.model_fields["aggregation"].annotation)
    assert tuple(AGGREGATION_RULES) == literal
    assert FederationConfig().aggregation in AGGREGATION_RULES
    for name in literal:
        rule = rule_for(name)
        assert isinstance(rule, AggregationRule) and rule.name == name and rule.summary
        assert rule_for(name) is rule  # stateless: one instance per name
    assert FederationConfig(aggregation="exact").rule is rule_for("exact")


def test_an_unknown_rule_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown aggregation rule 'fedprox'") as err:
        rule_for("fedprox")
    assert "federation.aggregation must be one of fedavg-factors, ffa, exact" in str(err.value)


# --- declarations ---


@pytest.mark.parametrize(
    ("cls", "linear", "per_site_ranks", "robust", "refactors", "freezes_a"),
    [
        (FedAvgFactors, True, False, True, False, False),
        (FFA, True, False, True, False, True),
        (Exact, False, True, False, True, False),
    ],
)
def test_each_rule_declares_what_it_allows(
    cls: type[AggregationRule],
    linear: bool,
    per_site_ranks: bool,
    robust: bool,
    refactors: bool,
    freezes_a: bool,
) -> None:
    rule = rule_for(cls.name)
    assert type(rule) is cls
    assert rule.linear is linear
    assert rule.per_site_ranks is per_site_ranks
    assert rule.coordinatewise_robust is robust
    assert rule.refactors is refactors
    assert rule.freezes_lora_a is freezes_a


def test_server_optimizers_with_state_are_refused_exactly_where_factors_are_rebased() -> None:
    names = get_args(ServerOptimizerConfig.model_fields["name"].annotation)
    assert set(names) == set(SERVER_OPTIMIZERS)  # every config name is a server optimizer
    stateful = {n for n in names if SERVER_OPTIMIZERS[n].buffer_names}
    assert stateful == {"sgdm", "adam", "yogi"}
    assert Exact.server_optimizers is not None and Exact.server_optimizers <= set(names)
    for name in names:
        assert rule_for("fedavg-factors").allows_server_optimizer(name)
        assert rule_for("ffa").allows_server_optimizer(name)
        assert rule_for("exact").allows_server_optimizer(name) is (name not in stateful)


def test_rules_where_and_quoted_name_the_rules_for_messages() -> None:
    assert rules_where("linear") == ["fedavg-factors", "ffa"]
    assert rules_where("refactors", False) == ["fedavg-factors", "ffa"]
    assert rules_where("per_site_ranks") == ["exact"]
    assert quoted(["exact"]) == "'exact'"
    assert quoted(["a", "b", "c"]) == "'a', 'b' or 'c'"


# --- site side ---


def test_site_rank_follows_the_policy_cap_only_with_per_site_ranks() -> None:
    assert rule_for("exact").site_rank(8, 4) == 4
    assert rule_for("exact").site_rank(2, 4) == 2
    assert rule_for("exact").site_rank(8, None) == 8
    for name in ("ffa", "fedavg-factors"):
        # the job's rank stays: a policy that caps it below refuses the job instead
        assert rule_for(name).site_rank(8, 4) == 8


def test_to_site_cuts_to_the_site_rank_only_under_exact() -> None:
    state = site_state(0, rank=4)
    assert rule_for("ffa").to_site(state, 8.0, 2) is state
    assert rule_for("fedavg-factors").to_site(state, 8.0, 2) is state
    cut = rule_for("exact").to_site(state, 8.0, 2)
    assert_same(cut, to_site_rank(state, 8.0, 2).state)
    assert cut[f"{LAYERS[0]}.lora_A.weight"].shape == (2, IN)


class _Lora(torch.nn.Module):
    """A module with PEFT-style parameter names (``<layer>.lora_A.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lora_A = torch.nn.Linear(IN, 2, bias=False)
        self.lora_B = torch.nn.Linear(2, OUT, bias=False)


def test_only_ffa_freezes_lora_a_at_the_site() -> None:
    for name in AGGREGATION_RULES:
        model = torch.nn.ModuleDict({"query": _Lora(), "value": _Lora()})
        rule_for(name).prepare_model(model)
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        expected = {"query.lora_A.weight", "value.lora_A.weight"} if name == "ffa" else set()
        assert frozen == expected, name
    with pytest.raises(FederationError, match="aggregation 'ffa' needs LoRA A factors"):
        rule_for("ffa").prepare_model(torch.nn.Linear(2, 2))


# --- coordinator side ---


def test_screening_rejects_a_moved_a_only_under_ffa() -> None:
    reference = site_state(0)
    moved = {k: v + 0.001 for k, v in reference.items()}
    for name in AGGREGATION_RULES:
        screening = rule_for(name).screen(reference, [("site-1", moved)], factor=math.inf)
        rejected = dict(screening.rejected)
        if name == "ffa":
            assert "frozen tensors changed" in rejected["site-1"]
        else:
            assert not rejected, name


def test_screening_accepts_another_rank_only_under_exact() -> None:
    reference, other_rank = site_state(0, rank=4), site_state(1, rank=2)
    for name in AGGREGATION_RULES:
        screening = rule_for(name).screen(reference, [("site-1", other_rank)], factor=math.inf)
        assert bool(screening.accepted) is (name == "exact"), name


def test_fedavg_factors_combines_with_fedavg() -> None:
    states, weights = [site_state(i) for i in range(3)], [10.0, 30.0, 60.0]
    combined = rule_for("fedavg-factors").combine(states, weights, rank=2, alpha=4.0)
    assert_same(combined.state, fedavg(zip(states, weights, strict=True)))
    assert combined.record == {}


def test_ffa_combines_with_ffa() -> None:
    shared = site_state(99)
    states, weights = [site_state(i, a=shared) for i in range(3)], [10.0, 30.0, 60.0]
    combined = rule_for("ffa").combine(states, weights, rank=2, alpha=4.0)
    assert_same(combined.state, ffa(zip(states, weights, strict=True)))
    assert combined.record == {}
    with pytest.raises(ValueError, match="A differs between updates"):
        rule_for("ffa").combine([site_state(0), site_state(1)], [1.0, 1.0], rank=2, alpha=4.0)


def test_exact_combines_with_exact_and_records_the_energy_lost() -> None:
    # sites at ranks 3, 2, 1 summed to rank 2: the SVD drops some energy
    states = [site_state(i, rank=r) for i, r in enumerate((3, 2, 1))]
    weights = [10.0, 30.0, 60.0]
    combined = rule_for("exact").combine(states, weights, rank=2, alpha=4.0)
    reference = exact(
        ((s, w, 4.0) for s, w in zip(states, weights, strict=True)), rank=2, alpha=4.0
    )
    assert_same(combined.state, reference.state)
    lost = max(reference.energy_lost.values())
    assert lost > 0 and combined.record == {"exact_energy_lost": lost}


# --- config validation asks the rule ---


def _refusal(config: dict) -> str:
    with pytest.raises(ConfigError, match=r"job\.yaml") as err:
        validate_config(config, source="job.yaml")
    return str(err.value)


def test_refusals_name_the_key_the_rule_and_the_fix() -> None:
    text = _refusal({"federation": {"aggregation": "exact", "secure_aggregation": True}})
    assert "federation.secure_aggregation needs a linear aggregation" in text
    assert "'exact' multiplies each site's factors" in text
    assert "use federation.aggregation 'fedavg-factors' or 'ffa'" in text
    central = {"enabled": True, "clip_norm": 1.0, "noise_multiplier": 1.0}
    text = _refusal({"privacy": {"central": central}, "federation": {"aggregation": "exact"}})
    assert "privacy.central needs a linear aggregation" in text
    assert "use federation.aggregation 'fedavg-factors' or 'ffa'" in text
    text = _refusal({"federation": {"aggregation": "ffa", "site_ranks": {"site-1": 2}}})
    assert "federation.site_ranks needs aggregation 'exact': aggregation 'ffa'" in text
    assert "set federation.aggregation to 'exact'" in text
    text = _refusal({"federation": {"aggregation": "exact", "server_optimizer": {"name": "yogi"}}})
    assert "federation.server_optimizer 'yogi'" in text
    assert "use sgd with exact, or aggregation 'fedavg-factors' or 'ffa'" in text
    text = _refusal({"federation": {"aggregation": "exact", "robust": {"max_update_norm": 1.0}}})
    assert "they work with aggregation 'fedavg-factors' or 'ffa', not with exact" in text
    text = _refusal({"train": {"mode": "lp-lora"}, "federation": {"aggregation": "exact"}})
    assert "train.mode 'lp-lora' with aggregation 'exact'" in text
    assert "use aggregation 'fedavg-factors' or 'ffa'" in text


def test_validation_follows_the_declarations_not_the_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the same combination is accepted or refused as the rule's declaration says
    secure = {"federation": {"aggregation": "ffa", "secure_aggregation": True}}
    validate_config(secure, source="job.yaml")
    monkeypatch.setattr(FFA, "linear", False)
    assert "and 'ffa' averages the B factors" in _refusal(secure)

    ranks = {"federation": {"aggregation": "ffa", "site_ranks": {"site-1": 2}}}
    assert "needs aggregation 'exact'" in _refusal(ranks)
    monkeypatch.setattr(FFA, "per_site_ranks", True)
    validate_config(ranks, source="job.yaml")

    adam = {"federation": {"aggregation": "ffa", "server_optimizer": {"name": "adam"}}}
    validate_config(adam, source="job.yaml")
    monkeypatch.setattr(FFA, "server_optimizers", frozenset({"sgd"}))
    assert "use sgd with ffa, or aggregation 'fedavg-factors'" in _refusal(adam)
