"""One site's side of a job: its data, model, policy, privacy ledger, and one round of training.

A ``Site`` is built once per process and reused for every round (loading a model is the
expensive part). Its privacy spend is not kept in memory: every round is recorded in the site's
ledger (``fedslm.privacy.ledger``) before training starts, so the spend survives a fresh process
per message, a crash, and the next job on the same data. The site's policy
(``fedslm.policy``) is checked for the whole job and again for every round; a refusal trains
nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fedslm.batching import Encoded, encode_classification, encode_instructions
from fedslm.config import JobConfig, LoraConfig
from fedslm.data import read_examples, read_instructions
from fedslm.egress import Payload, RingSpec, check, describe
from fedslm.errors import ConfigError, FedSLMError
from fedslm.labelwords import LabelWordData, LabelWords, check_decoder, evaluate_label_words
from fedslm.losses import per_example_loss
from fedslm.messages import (
    ADVERT,
    MASKED_VECTOR,
    PROTOCOL_REPLIES,
    Refusal,
    SiteEval,
    SiteReport,
)
from fedslm.models import LoadedModel, get_adapter_state, load_model, set_adapter_state
from fedslm.models.families import MEAN_POOL_HEAD, default_head
from fedslm.models.loading import classification_head
from fedslm.models.registry import ResolvedModel, base_parameters
from fedslm.policy import (
    AdapterHead,
    AdapterSize,
    SitePolicy,
    check_job,
    check_round,
    max_adapter_params,
)
from fedslm.privacy.accounting import Segment, calibrate_noise, epsilon
from fedslm.privacy.anchors import Anchor, anchor_refusal
from fedslm.privacy.dp_sgd import per_sample_module
from fedslm.privacy.egress_log import record_egress
from fedslm.privacy.ledger import DatasetFingerprint, PrivacyLedger
from fedslm.schedule import Schedule
from fedslm.secagg.messages import EncryptedShares, KeyAdvert, MaskedInput, UnmaskShares
from fedslm.training import (
    DPSettings,
    EvalResult,
    Proximal,
    ScaledHead,
    StepCallback,
    TrainResult,
    encode_features,
    evaluate,
    evaluate_head,
    make_optimizer,
    train_steps,
)


@dataclass(frozen=True)
class Phase:
    """Consecutive rounds that train the same thing with the same DP parameters.

    ``trains`` is 'head' (a linear probe on frozen features) or 'lora' (LoRA factors and head).
    """

    trains: Literal["head", "lora"]
    first_round: int
    rounds: int
    batch_size: int  # expected logical batch, q * records
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float

    @property
    def total_steps(self) -> int:
        """Every step of this phase, over all its rounds."""
        return self.steps_per_round * self.rounds

    def segment(self, steps: int | None = None) -> Segment:
        """The DP event of ``steps`` of this phase's steps (default: all of them)."""
        return Segment(self.sample_rate, self.noise_multiplier, steps or self.total_steps)


@dataclass(frozen=True)
class PrivacyPlan:
    """What a site trains and with which DP parameters, every round of the job, fixed before
    round 1. lp-lora has two phases (probe, then LoRA); the others one."""

    enabled: bool
    records: int
    phases: tuple[Phase, ...]
    max_grad_norm: float
    delta: float
    accountant: str
    target_epsilon: float | None

    def phase(self, round_num: int) -> Phase:
        """The phase ``round_num`` belongs to."""
        for ph in self.phases:
            if round_num < ph.first_round + ph.rounds:
                return ph
        return self.phases[-1]

    def segments(self) -> list[Segment]:
        """The job's DP events, one per phase (empty without DP)."""
        return [ph.segment() for ph in self.phases] if self.enabled else []

    @property
    def total_steps(self) -> int:
        """Every local step of the job."""
        return sum(ph.total_steps for ph in self.phases)

    # The last (for lora and head: the only) phase's figures, for single-phase callers.
    @property
    def sample_rate(self) -> float:
        """q of the last phase."""
        return self.phases[-1].sample_rate

    @property
    def steps_per_round(self) -> int:
        """Local steps per round of the last phase."""
        return self.phases[-1].steps_per_round

    @property
    def noise_multiplier(self) -> float:
        """Noise multiplier of the last phase."""
        return self.phases[-1].noise_multiplier

    @property
    def min_noise_multiplier(self) -> float:
        """The smallest noise multiplier of any phase (what a site policy's floor checks)."""
        return min(ph.noise_multiplier for ph in self.phases)


def plan_privacy(job: JobConfig, records: int, source: str) -> PrivacyPlan:
    """Phases, sampling rates, steps and noise for a site with ``records`` training rows.

    The noise is calibrated so that all of the job's local steps together meet
    ``privacy.target_epsilon``. With lp-lora the probe rounds alone are calibrated to
    ``train.probe.epsilon_share`` of the target and the LoRA rounds to what brings the
    composition of both to the target. ``source`` names the config file in errors.
    """
    p, t = job.privacy, job.train
    rounds = job.federation.rounds
    mode = job.train_mode
    shapes: list[tuple[Literal["head", "lora"], int, int, float | None]] = []
    probe_batch = t.probe.logical_batch(p.enabled)
    if mode == "head":
        shapes.append(("head", rounds, probe_batch, t.probe.local_epochs))
    elif mode == "lp-lora":
        shapes.append(("head", t.probe.rounds, probe_batch, t.probe.local_epochs))
        shapes.append(("lora", rounds - t.probe.rounds, t.logical_batch(p.enabled), None))
    else:
        shapes.append(("lora", rounds, t.logical_batch(p.enabled), None))
    if p.enabled:
        check_delta(job, records, source)
    phases: list[Phase] = []
    first = 1
    for i, (trains, n, batch, epochs) in enumerate(shapes):
        q = min(1.0, batch / records)
        steps = max(1, round(epochs / q)) if epochs is not None else t.steps_per_round(q)
        sigma = 0.0
        if p.enabled and p.noise_multiplier is not None:
            sigma = p.noise_multiplier
        elif p.enabled:
            assert p.target_epsilon is not None
            last = i == len(shapes) - 1
            target = p.target_epsilon if last else p.target_epsilon * t.probe.epsilon_share
            prior = [ph.segment() for ph in phases]
            sigma = calibrate_noise(target, p.delta, q, steps * n, p.accountant, prior=prior)
        phases.append(Phase(trains, first, n, max(1, round(q * records)), q, steps, sigma))
        first += n
    return PrivacyPlan(
        p.enabled,
        records,
        tuple(phases),
        p.max_grad_norm,
        p.delta,
        p.accountant,
        p.target_epsilon if p.enabled else None,
    )


def site_lora(job: JobConfig, site: str, policy: SitePolicy | None) -> LoraConfig:
    """The LoRA shape ``site`` trains: the job's, at the site's rank.

    Under a rule with per-site ranks (``exact``) each site may have its own rank
    (``federation.site_ranks``) and its policy's ``max_lora_rank`` lowers it; the other rules
    need the job's rank everywhere, and a policy that caps it below refuses the job instead
    (``job_refusal``). The rule decides (``AggregationRule.site_rank``).
    """
    rank = job.federation.site_ranks.get(site, job.lora.r)
    cap = policy.max_lora_rank if policy is not None else None
    return job.lora.model_copy(update={"r": job.federation.rule.site_rank(rank, cap)})


def job_refusal(
    policy: SitePolicy,
    job: JobConfig,
    plan: PrivacyPlan,
    model: ResolvedModel,
    spent: list[Segment],
    *,
    site: str,
    adapter: AdapterSize,
) -> list[str]:
    """Reasons ``policy`` refuses the whole job before round 1 (empty: accepted).

    The one decision the site makes (``Site.refusal``), the simulation's preflight makes and
    ``fedslm policy check --job`` prints: every rule of ``check_job``, with the rank ``site``
    trains at (``site_lora``), the head the job trains against the family's default, the
    adapter the site would send (``adapter``: from ``measure_adapter``, or the site's own
    loaded model), the records it trains on, and every step the job plans costed on top of
    ``spent``, what the data set has already spent in other jobs (from the ledger).
    """
    return check_job(
        policy,
        task=job.task.type,
        rounds=job.federation.rounds,
        model_sha256=model.sha256,
        dp_enabled=plan.enabled,
        delta=plan.delta,
        noise_multiplier=plan.min_noise_multiplier,
        planned=plan.segments(),
        spent=spent,
        accountant=plan.accountant,
        lora_rank=site_lora(job, site, policy).r,
        head=job_head(job, model),
        adapter=adapter,
        train_records=plan.records,
    )


def job_head(job: JobConfig, model: ResolvedModel) -> AdapterHead | None:
    """The classification head ``job`` trains on ``model`` and the family's default (None for
    a causal LM, which trains no head)."""
    if job.task.type != "classification" or job.task.label_words:
        return None
    config = json.loads((model.path / "config.json").read_text(encoding="utf-8"))
    default = default_head(str(config.get("model_type", "")), job.model.pooling)
    return AdapterHead(tuple(job.model.head_modules or default), default)


def label_words(job: JobConfig, loaded: LoadedModel, labels: list[str]) -> LabelWords | None:
    """The label set as responses of ``loaded`` (None unless ``task.classifier`` is
    'label-words')."""
    if not job.task.label_words:
        return None
    assert loaded.prompt_template is not None  # a causal LM always has one
    return LabelWords(
        loaded.tokenizer,
        labels,
        loaded.prompt_template,
        job.task.label_prompt,
        job.train.max_length,
    )


def adapter_size(state: dict[str, torch.Tensor], base_params: int) -> AdapterSize:
    """The size of a training reply carrying adapter ``state`` (``get_adapter_state``: what
    ``train_payload`` sends), against the base model's parameters."""
    return AdapterSize(sum(t.numel() for t in state.values()), base_params)


def measure_adapter(
    job: JobConfig, model: ResolvedModel, labels: list[str], site: str, policy: SitePolicy
) -> AdapterSize:
    """The adapter ``site`` would send for ``job``: the model is built on the CPU as the site
    builds it (its rank, the job's targets and head) and its adapter counted, so a check
    before the job (preflight, ``policy check --job``) sees what the site will send."""
    loaded = load_model(
        model.path,
        job.task.model_task,
        site_lora(job, site, policy),
        labels,
        torch.device("cpu"),
        seed=job.seed,
        options=job.model,
    )
    return adapter_size(get_adapter_state(loaded.model), base_parameters(model.path))


def check_delta(job: JobConfig, records: int, source: str) -> None:
    """Refuse a delta that is not below 1/N: it would allow leaking whole records."""
    delta = job.privacy.delta
    if job.privacy.enabled and delta >= 1.0 / records:
        raise ConfigError(
            f"{source}: privacy.delta={delta:g} must be below 1/N = {1 / records:.3g} "
            f"for a site with N={records} training records; use at most "
            f"{min(1e-5, 1 / (10 * records)):.3g}"
        )


def check_secagg_weight(job: JobConfig, records: int, source: str) -> None:
    """Under secure aggregation a site's weight in the sum is its training records, which
    must not exceed ``federation.secagg.max_weight`` (the bound that sizes the ring)."""
    if not job.federation.secure_aggregation:
        return
    bound = job.federation.secagg.max_weight
    if records > bound:
        raise ConfigError(
            f"{source}: federation.secagg.max_weight={bound} is below this site's {records} "
            "training records (its weight in the secure sum); raise "
            f"federation.secagg.max_weight to at least {records}"
        )


class SiteRefusal(FedSLMError):
    """The site's policy forbids this job or this round; nothing was trained."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


class EgressBlocked(SiteRefusal):
    """The site's egress guard stopped a message: it carried more than the job agreed."""


@dataclass(frozen=True)
class SiteUpdate:
    """What a site returns after a round: its adapter and the numbers that describe the round.

    ``epsilon`` is this job's spend so far; ``lifetime_epsilon`` is the data set's spend over
    every job recorded in the site's ledger (equal when this is the data set's first job).
    """

    state: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float
    steps: int
    empty_batches: int
    segment: Segment | None
    epsilon: float | None
    lifetime_epsilon: float | None
    ledger_head: str | None
    seconds: float  # local training
    privacy_seconds: float  # policy check, ledger read and write, every epsilon computed
    ledger_seq: int | None = None  # the seq of the entry whose hash is ledger_head


@dataclass(frozen=True)
class TrainAnswer:
    """A site's answer to a training message (``Site.answer_train``): what it released, and
    the update (None when the site refused; ``reasons`` then says why)."""

    payload: Payload
    update: SiteUpdate | None
    reasons: list[str]


def noise_fingerprint(job: JobConfig) -> str:
    """The part of a job that decides a site's DP noise and sampling: its fingerprint with the
    secure-aggregation settings left out.

    Secure aggregation changes how an update travels, not what the site trains: the same job
    with and without it must train the same update (a simulated comparison of the two relies
    on it), so the transport settings do not enter the noise seed.
    """
    fed = job.federation.model_copy(
        update={"secure_aggregation": False, "secagg": type(job.federation.secagg)()}
    )
    return job.model_copy(update={"federation": fed}).fingerprint()


def adapter_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 of an adapter as float32 tensors: names, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}\0{tuple(t.shape)}\0".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def simulated_noise_secret(job: JobConfig) -> bytes:
    """The noise secret of a simulated site, derived from the job's seed.

    A real site keeps a random secret the coordinator never sees (``state_dir/site.secret``);
    a simulated site shares the coordinator's machine, so a secret would protect nothing, and a
    simulation must be reproducible from its config.
    """
    return hashlib.sha256(f"fedslm/simulated-site-noise/{job.seed}".encode()).digest()


class Site:
    """A site's model, data, policy and ledger for one job. ``policy=None`` (the pooled
    baseline) checks nothing but still records its DP spend in the ledger.

    ``dataset`` is the identity the ledger charges (default: the fingerprint of
    ``train_file``); a deployed site passes the fingerprint of its whole data file, so that two
    jobs splitting it differently still spend from one lifetime budget.

    ``noise_secret`` seeds the DP noise and the Poisson sampling together with the job's
    noise fingerprint, the site's name, the round and the hash of the global adapter trained
    from. Whoever knows it can regenerate the noise and subtract it from a released update, so
    a real site's secret never leaves the site (the coordinator chooses ``job.seed``, so the
    seed cannot come from the job alone). Default: 32 fresh random bytes (updates are then not
    reproducible, and private).

    ``anchors`` are ledger heads the site released earlier (``fedslm.privacy.anchors``); with
    the ledger's journal of heads they are checked before the job is accepted, and a ledger
    that no longer extends one of them is refused.
    """

    def __init__(
        self,
        job: JobConfig,
        name: str,
        model: ResolvedModel,
        labels: list[str],
        train_file: Path,
        eval_file: Path,
        *,
        ledger: Path,
        job_id: str,
        policy: SitePolicy | None = None,
        source: str = "<job config>",
        dataset: DatasetFingerprint | None = None,
        noise_secret: bytes | None = None,
        anchors: Sequence[Anchor] = (),
    ) -> None:
        self.job = job
        self.name = name
        self.labels = labels
        self.model = model
        self.model_sha256 = model.sha256
        self.policy = policy
        self.job_id = job_id
        self.ledger_path = ledger
        self.anchors = tuple(anchors)  # heads released earlier, besides the ledger's journal
        self.dataset = dataset if dataset is not None else DatasetFingerprint.of_file(train_file)
        if noise_secret is not None and len(noise_secret) < 16:
            raise ValueError("noise_secret must be at least 16 bytes")
        self._noise_secret = noise_secret if noise_secret is not None else os.urandom(32)
        self._noise_fingerprint = noise_fingerprint(job)
        self._job_refusal: list[str] | None = None
        device = _device(job)
        self.lora = site_lora(job, name, policy)
        if job.task.label_words:
            check_decoder(model.path)
        self.loaded: LoadedModel = load_model(
            model.path,
            job.task.model_task,
            self.lora,
            labels,
            device,
            seed=job.seed,
            options=job.model,
        )
        self.words = label_words(job, self.loaded, labels)
        # before Opacus is attached: ffa's frozen A gets no per-sample hooks and never moves
        job.federation.rule.prepare_model(self.loaded.model)
        # a training reply carries every adapter tensor as float32, and nothing else
        initial = get_adapter_state(self.loaded.model)
        self.agreed_tensors = {k: tuple(t.shape) for k, t in initial.items()}
        self.adapter = adapter_size(initial, base_parameters(model.path))
        # the egress guard counts what each reply carries, whatever the job said it would be
        self.max_reply_params = (
            max_adapter_params(policy, self.adapter.base_params) if policy is not None else None
        )
        self.train_data = self._encode(train_file)
        # label words score the held-out rows by the label the model writes
        self.eval_words = self._encode_words(eval_file) if self.words is not None else None
        self.eval_data = self.eval_words.encoded if self.eval_words else self._encode(eval_file)
        self.plan = plan_privacy(job, len(self.train_data), source)
        check_secagg_weight(job, len(self.train_data), source)
        self._features: torch.Tensor | None = None  # the frozen model's, for probe rounds
        # the held-out features and the encoder tensors they were computed under
        self._eval_cache: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None
        self.module: torch.nn.Module = self.loaded.model
        if all(ph.trains == "head" for ph in self.plan.phases):
            # a pure probe: LoRA stays at its (no-op) initialisation and is never trained
            for name_, param in self.loaded.model.named_parameters():
                if ".lora_" in name_:
                    param.requires_grad_(False)
        elif self.plan.enabled:
            # Opacus hooks are attached once, after LoRA and before any optimizer exists
            self.module = per_sample_module(self.loaded.model)

    def _encode(self, path: Path) -> Encoded:
        d, tok, n = self.job.data, self.loaded.tokenizer, self.job.train.max_length
        if self.words is not None:
            return self._encode_words(path).encoded
        if self.job.task.type == "classification":
            ex = read_examples(path, d.text_column, d.label_column, labels=self.labels)
            return encode_classification(
                tok, ex.texts, ex.labels, {label: i for i, label in enumerate(self.labels)}, n
            )
        ins = read_instructions(path, d.prompt_column, d.response_column)
        return encode_instructions(tok, ins.prompts, ins.responses, n, self.loaded.prompt_template)

    def _encode_words(self, path: Path) -> LabelWordData:
        assert self.words is not None
        d = self.job.data
        ex = read_examples(path, d.text_column, d.label_column, labels=self.labels)
        return self.words.encode(ex.texts, ex.labels)

    @property
    def adapter_bytes(self) -> int:
        """Bytes of tensor data in a training reply (float32)."""
        return self.adapter.bytes

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The adapter as initialised from the job seed (identical at every site)."""
        return get_adapter_state(self.loaded.model)

    def refusal(self, round_num: int, anchor: Anchor | None = None) -> list[str]:
        """Reasons the site's policy gives not to train ``round_num`` (empty: go ahead).

        ``anchor`` is the head the coordinator anchored for this site (its train message
        carries it): a ledger that no longer extends it is refused, policy or none.

        The whole job is checked once per process (``job_refusal``: every planned step against
        the per-job and lifetime budgets, model, task, rounds, delta, noise, rank, head, the
        size of the adapter this site built, its training records); then this round against
        what the ledger holds, the lifetime and per-job budgets, and the bytes the reply would
        carry.
        """
        if anchor is not None:
            # checked every round: each round's message anchors the head released last
            broken = anchor_refusal(self.ledger_path, [anchor])
            if broken:
                return [broken]
        if self.policy is None:
            return []
        plan = self.plan
        if self._job_refusal is None:
            # a ledger rewritten below a head the site released or journaled understates
            # the spend: refuse before reading a figure from it
            broken = anchor_refusal(self.ledger_path, self.anchors)
            self._job_refusal = [broken] if broken else None
        with self._ledger() as ledger:
            prior = ledger.entries(self.dataset)
        others = [e.segment for e in prior if e.job_id != self.job_id]
        mine = [e.segment for e in prior if e.job_id == self.job_id and e.round != round_num]
        if self._job_refusal is None:
            self._job_refusal = job_refusal(
                self.policy, self.job, plan, self.model, others, site=self.name,
                adapter=self.adapter,
            )  # fmt: skip
        if self._job_refusal:
            return self._job_refusal
        job_eps = lifetime_eps = 0.0
        if plan.enabled:
            seg = self._segment(round_num)
            job_eps = self._epsilon([*mine, seg])
            lifetime_eps = self._epsilon([*others, *mine, seg]) if others else job_eps
        return check_round(
            self.policy,
            bytes_to_send=self.adapter_bytes,
            lifetime_epsilon_after=lifetime_eps,
            job_epsilon_after=job_eps,
        )

    def train_round(
        self,
        round_num: int,
        global_state: dict[str, torch.Tensor],
        on_step: StepCallback | None = None,
        anchor: Anchor | None = None,
    ) -> SiteUpdate:
        """Check the policy (and the coordinator's ``anchor``, see ``refusal``), record the
        round in the ledger, train, return the new adapter.

        Raises ``SiteRefusal`` (having trained nothing) when the policy forbids the round.
        The ledger entry is written before training: a crash afterwards can over-count one
        round, never under-count, and a retried round is not counted twice.
        """
        checked = time.perf_counter()
        reasons = self.refusal(round_num, anchor)
        if reasons:
            raise SiteRefusal(reasons)
        plan, t = self.plan, self.job.train
        entry = job_eps = None
        with self._ledger() as ledger:
            # A round without DP is recorded too, as noise 0 (epsilon inf): the data set was
            # exposed, and a ledger that left it out would under-state the spend forever.
            recorded_entry = ledger.record(
                self.dataset,
                self.job_id,
                round_num,
                self._segment(round_num),
                plan.delta,
                plan.accountant,  # type: ignore[arg-type]
            )
            recorded = ledger.entries(self.dataset)
        if plan.enabled:
            entry = recorded_entry
            job_segments = [e.segment for e in recorded if e.job_id == self.job_id]
            alone = len(job_segments) == len(recorded)
            job_eps = entry.epsilon if alone else self._epsilon(job_segments)
        privacy_seconds = time.perf_counter() - checked
        set_adapter_state(self.loaded.model, self._at_own_rank(global_state))
        phase = plan.phase(round_num)
        dp = None
        if plan.enabled:
            dp = DPSettings(phase.noise_multiplier, plan.max_grad_norm, phase.batch_size)
        # dropout draws from the global generator; seeding it makes a round reproducible
        seed = self._seed(round_num, adapter_sha256(global_state))
        torch.manual_seed(seed)
        # the schedule spans the phase's rounds: this round starts where the last one stopped
        first_step = (round_num - phase.first_round) * phase.steps_per_round
        start = time.perf_counter()
        if phase.trains == "head":
            result = self._train_probe(phase, dp, seed, first_step, on_step)
        else:
            params = [p for p in self.loaded.model.parameters() if p.requires_grad]
            lr = t.peak_lr(plan.enabled)
            optimizer = make_optimizer(params, t.optimizer, lr, t.weight_decay)
            mu = t.proximal_mu  # FedProx: a pull toward the round's global adapter
            proximal = None if mu is None else Proximal(mu, lr, params)
            schedule = Schedule(
                lr,
                phase.total_steps,
                round(t.warmup_fraction * phase.total_steps),
                t.schedule,
            )
            result = train_steps(
                self.module,
                self.train_data,
                steps=phase.steps_per_round,
                sample_rate=phase.sample_rate,
                optimizer=optimizer,
                device=self.loaded.device,
                dp=dp,
                seed=seed,
                on_step=on_step,
                proximal=proximal,
                physical_batch_size=t.physical_batch_size,
                schedule=schedule,
                first_step=first_step,
            )
        seconds = time.perf_counter() - start
        return SiteUpdate(
            state=get_adapter_state(self.loaded.model),
            num_examples=len(self.train_data),
            train_loss=result.mean_loss,
            steps=result.steps,
            empty_batches=result.empty_batches,
            segment=entry.segment if entry is not None else None,
            epsilon=job_eps,
            lifetime_epsilon=entry.epsilon if entry is not None else None,
            ledger_head=entry.hash if entry is not None else None,
            seconds=seconds,
            privacy_seconds=privacy_seconds,
            ledger_seq=entry.seq if entry is not None else None,
        )

    # -- what leaves the site ------------------------------------------------------------------

    def report(self, u: SiteUpdate, bytes_sent: int | None = None) -> SiteReport:
        """``u`` as the training reply the coordinator receives (``fedslm.messages``).

        ``bytes_sent`` defaults to the adapter's float32 size (what a reply carries, less
        framing): the coordinator counts what actually arrived.
        """
        p = self.plan
        return SiteReport(
            self.name,
            u.state,
            u.num_examples,
            u.train_loss,
            u.steps,
            u.seconds,
            self.adapter_bytes if bytes_sent is None else bytes_sent,
            u.segment,
            u.epsilon,
            p.delta if p.enabled else None,
            p.accountant if p.enabled else None,
            p.max_grad_norm if p.enabled else None,
            u.lifetime_epsilon,
            u.ledger_head,
            u.privacy_seconds,
            u.ledger_seq,
        )

    def train_payload(self, u: SiteUpdate) -> Payload:
        """A training reply: the adapter, numeric metrics, the site's name and DP segment."""
        metrics, fields = self.report(u).wire_values()
        return Payload("train", dict(u.state), metrics, fields)

    def secure_train_payload(self, u: SiteUpdate, advert: KeyAdvert) -> Payload:
        """A training reply under secure aggregation: the metrics and DP fields of
        ``train_payload`` and this round's key advert, but no tensors (the update only leaves
        masked, in ``masked_payload``)."""
        plain = self.train_payload(u)
        fields = {**plain.fields, **ADVERT.wire_fields(advert)}
        return Payload(ADVERT.kind, {}, dict(plain.metrics), fields)

    @staticmethod
    def shares_payload(m: EncryptedShares) -> Payload:
        """Secure aggregation round 1: ciphertexts of this site's key shares, one per peer."""
        reply = PROTOCOL_REPLIES["share-keys"]
        return Payload(reply.kind, fields=reply.wire_fields(m))

    @staticmethod
    def masked_payload(m: MaskedInput) -> Payload:
        """Secure aggregation round 2: the masked, weighted, quantised update."""
        reply = PROTOCOL_REPLIES["masked-input"]
        return Payload(reply.kind, fields=reply.wire_fields(m), vectors={MASKED_VECTOR: m.vector})

    @staticmethod
    def unmask_payload(m: UnmaskShares) -> Payload:
        """Secure aggregation round 3: the shares the coordinator needs to remove the masks."""
        reply = PROTOCOL_REPLIES["unmask"]
        return Payload(reply.kind, fields=reply.wire_fields(m))

    def eval_payload(self, r: EvalResult) -> Payload:
        """An evaluation reply: three numbers and the site's name; with fewer evaluation
        records than the policy's ``min_eval_records``, no numbers at all, only why."""
        least = self.policy.min_eval_records if self.policy is not None else None
        if least is not None and r.examples < least:
            withheld = f"fewer evaluation records than the site's min_eval_records ({least})"
            reply = SiteEval.withheld_by(self.name, withheld)
        else:
            reply = SiteEval(self.name, r.loss, r.accuracy, r.examples)
        metrics, fields = reply.wire_values()
        return Payload("evaluate", {}, metrics, fields)

    def refusal_payload(self, reasons: list[str]) -> Payload:
        """A refusal: the site's name and its own reasons; no tensors, no metrics."""
        metrics, fields = Refusal(self.name, reasons).wire_values()
        return Payload("refusal", {}, metrics, fields)

    def answer_train(
        self,
        round_num: int,
        global_state: dict[str, torch.Tensor],
        on_step: StepCallback | None = None,
        anchor: Anchor | None = None,
        *,
        send: Callable[[SiteUpdate], Payload] | None = None,
    ) -> TrainAnswer:
        """Answer a training message, as every path does (Flower's ClientApp, the site
        daemon's worker, the in-process run): train round ``round_num`` on ``global_state``
        and release the update (``send``: how, by default the plain training reply), or, when
        the site's policy, ledger or egress guard refuses, release the refusal instead. What
        leaves is checked and logged by ``release`` either way."""
        try:
            update = self.train_round(round_num, global_state, on_step, anchor)
            payload = (
                send(update)
                if send is not None
                else self.release(round_num, self.train_payload(update))
            )
        except SiteRefusal as refusal:
            refused = self.release(round_num, self.refusal_payload(refusal.reasons))
            return TrainAnswer(refused, None, refusal.reasons)
        return TrainAnswer(payload, update, [])

    def release(
        self,
        round_num: int,
        payload: Payload,
        ring: RingSpec | None = None,
        *,
        replay: bool = False,
    ) -> Payload:
        """Check ``payload`` against what the job agreed and log it before it may leave.

        Every message is recorded in the site's egress log first (sent or blocked, with what
        it holds: tensor names, shapes, dtypes, bytes and sha256, metric keys and values).
        Raises ``EgressBlocked`` (a refusal) when it carries anything the job did not agree:
        an unexpected tensor or shape, a metric off the allow-list or not a number, an
        unknown field, more bytes or more values (``max_trainable_fraction`` of the base
        model) than the policy allows, or evaluation figures over fewer records than its
        ``min_eval_records``. A secure-aggregation message must
        hold exactly its protocol fields, and a masked vector the length and dtype of ``ring``.
        ``replay`` marks a message sent again unchanged (a retried round answered from the
        site's store of released updates): it is logged again, with ``"replay": true``.
        """
        record = describe(payload)
        policy = self.policy
        max_bytes = policy.max_bytes_per_round if policy is not None else None
        problems = check(
            record,
            self.agreed_tensors,
            max_bytes,
            ring,
            max_params=self.max_reply_params,
            min_eval_records=policy.min_eval_records if policy is not None else None,
        )
        if problems:
            record["blocked_because"] = problems
        if replay:
            record["replay"] = True
        with self._ledger() as ledger:
            record_egress(ledger, self.job_id, round_num, "blocked" if problems else "sent", record)
        if problems:
            raise EgressBlocked(
                [f"egress guard blocked the {payload.kind} reply: {p}" for p in problems]
            )
        return payload

    def _train_probe(
        self,
        phase: Phase,
        dp: DPSettings | None,
        seed: int,
        first_step: int,
        on_step: StepCallback | None,
    ) -> TrainResult:
        """One round of the linear probe: the head alone, on the frozen model's features.

        The features are computed once per site (LoRA is still at its no-op initialisation in
        every probe round), so a step costs a matrix product instead of a pass through the
        model. A copy of the head trains under its own Opacus hooks and is written back: hooks
        on the model's own head would fire for the LoRA phase's per-sample module too.
        """
        probe, device = self.job.train.probe, self.loaded.device
        if self._features is None:
            self._features = encode_features(
                self.loaded.model, self.train_data, self.job.train.eval_batch_size, device
            )
        features = self._features
        labels = torch.tensor(self.train_data.targets, device=device)
        target = classification_head(self.loaded.model)
        head = torch.nn.Linear(target.in_features, target.out_features).to(device)
        head.load_state_dict(target.state_dict())
        # Per-example clipping even without DP (noise 0): the probe's learning rate is chosen
        # for clipped gradients, and unclipped ones through scaled logits are ten times larger.
        dp = dp or DPSettings(0.0, self.plan.max_grad_norm, phase.batch_size)
        module = per_sample_module(ScaledHead(head, self.job.model.logit_scale))
        optimizer = make_optimizer(
            list(head.parameters()), "sgd", probe.learning_rate, 0.0, momentum=probe.momentum
        )

        def batch_loss(index: list[int]) -> torch.Tensor:
            return per_example_loss(module(features[index]), labels[index])

        result = train_steps(
            module,
            len(features),
            steps=phase.steps_per_round,
            sample_rate=phase.sample_rate,
            optimizer=optimizer,
            device=device,
            dp=dp,
            seed=seed,
            on_step=on_step,
            schedule=Schedule(probe.learning_rate, phase.total_steps, 0, "cosine"),
            first_step=first_step,
            batch_loss=batch_loss,
        )
        with torch.no_grad():
            target.load_state_dict(head.state_dict())
        return result

    def _at_own_rank(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # exact aggregation sends factors of the global rank; each site takes the best
        # approximation at its own rank (the other rules send the state as the site trains it)
        return self.job.federation.rule.to_site(state, self.job.lora.alpha, self.lora.r)

    def _segment(self, round_num: int) -> Segment:
        phase = self.plan.phase(round_num)
        return phase.segment(phase.steps_per_round)

    def _epsilon(self, segments: list[Segment]) -> float:
        return epsilon(segments, self.plan.delta, self.plan.accountant)  # type: ignore[arg-type]

    def _ledger(self) -> PrivacyLedger:
        return PrivacyLedger(self.ledger_path, self.dataset)

    def evaluate(self, global_state: dict[str, torch.Tensor]) -> EvalResult:
        """Loss and accuracy of the global adapter on this site's held-out split (with
        ``exact`` aggregation, at this site's rank: its view of the global adapter)."""
        state = self._at_own_rank(global_state)
        set_adapter_state(self.loaded.model, state)
        if self.words is not None and self.eval_words is not None:
            r = evaluate_label_words(
                self.loaded.model, self.words, self.eval_words, self.loaded.device
            )
            return EvalResult(r.loss, r.accuracy, r.examples)
        features = self._eval_features(state)
        if features is not None:
            return evaluate_head(
                self.loaded.model, features, self.eval_data, self.job.train.eval_batch_size
            )
        return evaluate(
            self.loaded.model, self.eval_data, self.job.train.eval_batch_size, self.loaded.device
        )

    def _eval_features(self, state: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The held-out rows' features under the adapter just set, reused while its encoder
        tensors are unchanged: a probe round moves the head alone, so evaluating it is a
        matrix product instead of a pass through the model. None without a separate head."""
        inner = self.loaded.model.get_base_model()
        if not hasattr(inner, "features"):
            return None
        encoder = {k: v for k, v in state.items() if not _is_head(k)}
        cached = self._eval_cache
        if cached is None or not _same_tensors(cached[0], encoder):
            features = encode_features(
                self.loaded.model, self.eval_data, self.job.train.eval_batch_size,
                self.loaded.device,
            )  # fmt: skip
            cached = ({k: v.detach().clone() for k, v in encoder.items()}, features)
            self._eval_cache = cached
        return cached[1]

    def _seed(self, round_num: int, input_sha256: str) -> int:
        # The site's secret first: a seed the coordinator could compute (from job.seed, which
        # it chooses) would let it regenerate the noise and subtract it from the update. The
        # global adapter trained from is part of it: the same question (job, round, adapter)
        # gets the same answer, which tells nothing new, and any other adapter gets fresh
        # noise, so two releases never share noise that a difference would cancel.
        # Independent of site order and of Python's hash randomisation, so reruns match.
        h = hashlib.sha256(self._noise_secret)
        h.update(f"\0{self._noise_fingerprint}\0{self.name}\0{round_num}\0{input_sha256}".encode())
        return int.from_bytes(h.digest()[:6], "big")


def _is_head(key: str) -> bool:
    # the mean-pooling classifier's linear layer, the only tensor a probe round moves
    return any(f".{h}." in f".{key}." for h in MEAN_POOL_HEAD)


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _device(job: JobConfig) -> torch.device:
    from fedslm.models import select_device

    return select_device(job.model.device)
