"""The aggregation rules of ``federation.aggregation`` as objects: one class per rule.

A rule says what it allows (``linear``, ``per_site_ranks``, ``server_optimizers``,
``coordinatewise_robust``, ``refactors``), and carries its site-side steps (``site_rank``,
``prepare_model``, ``to_site``) and its coordinator-side ones (``screen``, ``combine``).
Config validation, the site, the privacy plan and the coordinator ask the rule; none of them
compares the rule's name. The math stays where it is: ``combine`` calls the pure functions of
``fedslm.aggregation`` and the site's rank cut calls ``fedslm.lora_math``.

Adding a rule: one subclass of ``AggregationRule`` here, its line in ``AGGREGATION_RULES``, and
its name in the ``Literal`` of ``FederationConfig.aggregation`` (a test keeps the two equal).

The declarations are read by config validation, which must not load torch: this module imports
nothing heavy at import time, and each step imports the module it calls when it runs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from fedslm.aggregation import AdapterState
    from fedslm.robust import Screening


@dataclass(frozen=True)
class Combined:
    """What ``AggregationRule.combine`` returns: the combined adapter, and the fields the rule
    adds to the round's record (e.g. ``exact_energy_lost``)."""

    state: AdapterState
    record: dict[str, Any] = field(default_factory=dict)


class AggregationRule:
    """Base class of a rule: the declarations default to the most permissive, the steps to
    doing nothing at the site and the example-weighted mean of every tensor at the coordinator.
    Rules are stateless; ``rule_for`` hands out one instance per name."""

    name: ClassVar[str] = ""
    # one line for messages: what the rule does with the sites' factors
    summary: ClassVar[str] = ""
    # the result is the weighted sum of the site states over the weights' total, so secure
    # aggregation (the coordinator sees only the sum) and central DP (noise on the sum of
    # clipped updates) can work with it
    linear: ClassVar[bool] = True
    # sites may train at different LoRA ranks (federation.site_ranks, a policy's max_lora_rank)
    per_site_ranks: ClassVar[bool] = False
    # server optimizers (federation.server_optimizer.name) the rule works with; None: all
    server_optimizers: ClassVar[frozenset[str] | None] = None
    # federation.robust median / trimmed-mean / max_update_norm act on tensors coordinate by
    # coordinate, which needs the sites' factors in one shared basis
    coordinatewise_robust: ClassVar[bool] = True
    # the combined product B·A is refactored (by SVD), so a zero B (the state every LoRA round
    # after lp-lora's probe rounds starts from) would zero A as well
    refactors: ClassVar[bool] = False
    # LoRA A stays at the shared initialisation: the sites freeze it and only B is trained
    freezes_lora_a: ClassVar[bool] = False

    def allows_server_optimizer(self, name: str) -> bool:
        """Whether server optimizer ``name`` works with this rule."""
        return self.server_optimizers is None or name in self.server_optimizers

    # --- at the site ---

    def site_rank(self, rank: int, cap: int | None) -> int:
        """The LoRA rank a site trains at: ``rank`` (the job's, or the site's entry of
        ``federation.site_ranks``) under its policy's ``max_lora_rank`` ``cap``. Rules without
        per-site ranks keep the job's rank; a policy that caps it below refuses the job
        instead (``fedslm.policy.check_job``)."""
        if self.per_site_ranks and cap is not None:
            return min(rank, cap)
        return rank

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Ready a site's freshly loaded LoRA model for this rule; call it before Opacus is
        attached (a frozen tensor then gets no per-sample hooks and never moves)."""

    def to_site(self, state: AdapterState, alpha: float, site_rank: int) -> AdapterState:
        """The global adapter ``state`` as a site training at ``site_rank`` loads it."""
        return state

    # --- at the coordinator ---

    def frozen_tensors(self, reference: AdapterState) -> list[str]:
        """Tensors of ``reference`` (the global adapter) no site may change."""
        return []

    def screen(
        self,
        reference: AdapterState,
        updates: Iterable[tuple[str, AdapterState]],
        *,
        factor: float,
    ) -> Screening:
        """``fedslm.robust.screen_updates`` with this rule's options: rank changes are accepted
        where sites may have their own ranks, and frozen tensors must be unchanged."""
        from fedslm.robust import screen_updates

        return screen_updates(
            reference,
            updates,
            allow_rank_change=self.per_site_ranks,
            frozen=self.frozen_tensors(reference),
            factor=factor,
        )

    def combine(
        self,
        states: Sequence[AdapterState],
        weights: Sequence[float],
        *,
        rank: int,
        alpha: float,
    ) -> Combined:
        """Combine the accepted ``states`` weighted by ``weights`` into the new global adapter
        at the job's LoRA ``rank`` and ``alpha``."""
        from fedslm.aggregation import fedavg

        return Combined(fedavg(zip(states, weights, strict=True)))


class FedAvgFactors(AggregationRule):
    """``fedavg-factors``: the weighted mean of A and B separately (the common baseline; not
    the mean of the products B·A)."""

    name = "fedavg-factors"
    summary = "averages the A and B factors separately"


class FFA(AggregationRule):
    """``ffa`` (FFA-LoRA): A frozen at the shared initialisation, B averaged; exact and
    linear, since ``mean(B_i) @ A == mean(B_i @ A)``."""

    name = "ffa"
    summary = "averages the B factors over an A frozen at the shared initialisation"
    freezes_lora_a = True

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Freeze every LoRA A factor: every site builds A from the job seed, so it stays the
        same everywhere."""
        from fedslm.models.adapter import freeze_lora_a

        freeze_lora_a(model)

    def frozen_tensors(self, reference: AdapterState) -> list[str]:
        """The LoRA A factors."""
        return [k for k in reference if ".lora_A." in k]

    def combine(
        self,
        states: Sequence[AdapterState],
        weights: Sequence[float],
        *,
        rank: int,
        alpha: float,
    ) -> Combined:
        """``fedslm.aggregation.ffa``: B and other tensors averaged, A passed through."""
        from fedslm.aggregation import ffa

        return Combined(ffa(zip(states, weights, strict=True)))


class Exact(AggregationRule):
    """``exact``: the weighted mean of the products B·A, refactored to the job's rank by SVD
    (exact up to that rank); sites may train at their own ranks."""

    name = "exact"
    summary = "multiplies each site's factors (B_i·A_i) and refactors the mean by SVD"
    linear = False
    per_site_ranks = True
    # optimizer state (momentum, Adam moments) lives on the factors, which SVD re-bases every
    # round: only the stateless server step makes sense (FedProx, at the sites, is fine)
    server_optimizers = frozenset({"sgd"})
    coordinatewise_robust = False
    refactors = True

    def to_site(self, state: AdapterState, alpha: float, site_rank: int) -> AdapterState:
        """The best approximation of the global adapter at the site's rank
        (``fedslm.lora_math.to_site_rank``; a re-basis when the ranks are equal)."""
        from fedslm.lora_math import to_site_rank

        return to_site_rank(state, alpha, site_rank).state

    def combine(
        self,
        states: Sequence[AdapterState],
        weights: Sequence[float],
        *,
        rank: int,
        alpha: float,
    ) -> Combined:
        """``fedslm.aggregation.exact`` with every site at the job's ``alpha``; the record
        gets ``exact_energy_lost``, the largest share of a layer's energy the SVD dropped."""
        from fedslm.aggregation import exact

        result = exact(
            ((s, w, alpha) for s, w in zip(states, weights, strict=True)), rank=rank, alpha=alpha
        )
        lost = max(result.energy_lost.values(), default=0.0)
        return Combined(result.state, {"exact_energy_lost": lost})


# federation.aggregation -> its rule; a new rule is one class above and one entry here
AGGREGATION_RULES: dict[str, type[AggregationRule]] = {
    c.name: c for c in (FedAvgFactors, FFA, Exact)
}
_INSTANCES: dict[str, AggregationRule] = {}


def rule_for(name: str) -> AggregationRule:
    """The rule ``federation.aggregation: name`` stands for; ValueError naming the known rules
    for any other name."""
    if name not in AGGREGATION_RULES:
        raise ValueError(
            f"unknown aggregation rule {name!r}: federation.aggregation must be one of "
            f"{', '.join(AGGREGATION_RULES)}"
        )
    if name not in _INSTANCES:
        _INSTANCES[name] = AGGREGATION_RULES[name]()
    return _INSTANCES[name]


def rules_where(declaration: str, value: bool = True) -> list[str]:
    """Names of the rules whose ``declaration`` (e.g. ``"linear"``) equals ``value``, in
    registry order: for messages that say which rules would work."""
    return [n for n, cls in AGGREGATION_RULES.items() if getattr(cls, declaration) == value]


def quoted(names: Collection[str]) -> str:
    """``'a'``, ``'a' or 'b'``, ``'a', 'b' or 'c'``: rule names for a message."""
    items = [f"'{n}'" for n in names]
    if len(items) < 2:
        return "".join(items)
    return f"{', '.join(items[:-1])} or {items[-1]}"
