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
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fedslm.acceptance import adapter_size, check_secagg_weight, job_refusal, site_lora
from fedslm.batching import Encoded, encode_classification, encode_instructions
from fedslm.config import JobConfig
from fedslm.data import read_examples, read_instructions
from fedslm.egress import Payload, RingSpec, check, describe
from fedslm.errors import FedSLMError
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
from fedslm.models.families import MEAN_POOL_HEAD
from fedslm.models.loading import classification_head
from fedslm.models.registry import ResolvedModel, base_parameters
from fedslm.policy import (
    SitePolicy,
    check_round,
    max_adapter_params,
)
from fedslm.privacy.accounting import Segment
from fedslm.privacy.anchors import Anchor, anchor_refusal
from fedslm.privacy.egress_log import record_egress
from fedslm.privacy.ledger import DatasetFingerprint, PrivacyLedger
from fedslm.privacy.private_training import Phase, make_private
from fedslm.schedule import Schedule
from fedslm.secagg.messages import EncryptedShares, KeyAdvert, MaskedInput, UnmaskShares
from fedslm.training import (
    EvalResult,
    Proximal,
    StepCallback,
    TrainResult,
    encode_features,
    evaluate,
    evaluate_head,
    inner_model,
    make_optimizer,
    train_steps,
)


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


@dataclass(frozen=True)
class SiteInputs:
    """What a site brings to a job, besides the job itself: its name, its data, its privacy
    ledger and policy, and the secrets and anchors that stay on its side.

    ``policy=None`` (the pooled baseline) checks nothing, but the spend is still recorded in
    the ledger. ``dataset`` is the identity the ledger charges (default: the fingerprint of
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

    name: str
    train_file: Path
    eval_file: Path
    ledger: Path
    policy: SitePolicy | None = None
    dataset: DatasetFingerprint | None = None
    noise_secret: bytes | None = None
    anchors: tuple[Anchor, ...] = ()


class Site:
    """A site's model, data, policy and ledger for one job, built once per process and reused
    for every round.

    Built in this order: the model with the site's LoRA shape (``site_lora``), its data
    encoded, then the DP setup (``fedslm.privacy.private_training.make_private``: the job's
    privacy plan, and Opacus' hooks attached once). ``job_id`` names the job in the ledger;
    ``source`` names the job's config in errors.
    """

    def __init__(
        self,
        job: JobConfig,
        model: ResolvedModel,
        labels: list[str],
        inputs: SiteInputs,
        *,
        job_id: str,
        source: str = "<job config>",
    ) -> None:
        self.job = job
        self.name = inputs.name
        self.labels = labels
        self.model = model
        self.model_sha256 = model.sha256
        self.policy = policy = inputs.policy
        self.job_id = job_id
        self.ledger_path = inputs.ledger
        self.anchors = inputs.anchors  # heads released earlier, besides the ledger's journal
        self.dataset = inputs.dataset or DatasetFingerprint.of_file(inputs.train_file)
        secret = inputs.noise_secret
        if secret is not None and len(secret) < 16:
            raise ValueError("noise_secret must be at least 16 bytes")
        self._noise_secret = secret if secret is not None else os.urandom(32)
        self._noise_fingerprint = noise_fingerprint(job)
        self._job_refusal: list[str] | None = None
        device = _device(job)
        self.lora = site_lora(job, self.name, policy)
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
        self.train_data = self._encode(inputs.train_file)
        # label words score the held-out rows by the label the model writes
        self.eval_words = self._encode_words(inputs.eval_file) if self.words is not None else None
        self.eval_data = (
            self.eval_words.encoded if self.eval_words else self._encode(inputs.eval_file)
        )
        self.private = make_private(self.loaded.model, job, len(self.train_data), source)
        self.plan = self.private.plan
        check_secagg_weight(job, len(self.train_data), source)
        self._features: torch.Tensor | None = None  # the frozen model's, for probe rounds
        # the held-out features and the encoder tensors they were computed under
        self._eval_cache: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None

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
            seg = plan.round_segment(round_num)
            job_eps = plan.epsilon([*mine, seg])
            lifetime_eps = plan.epsilon([*others, *mine, seg]) if others else job_eps
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
                plan.round_segment(round_num),
                plan.delta,
                plan.accountant,
            )
            recorded = ledger.entries(self.dataset)
        if plan.enabled:
            entry = recorded_entry
            job_segments = [e.segment for e in recorded if e.job_id == self.job_id]
            alone = len(job_segments) == len(recorded)
            job_eps = entry.epsilon if alone else plan.epsilon(job_segments)
        privacy_seconds = time.perf_counter() - checked
        set_adapter_state(self.loaded.model, self._at_own_rank(global_state))
        phase = plan.phase(round_num)
        dp = self.private.dp_settings(phase)
        # dropout draws from the global generator; seeding it makes a round reproducible
        seed = self._seed(round_num, adapter_sha256(global_state))
        torch.manual_seed(seed)
        # the schedule spans the phase's rounds: this round starts where the last one stopped
        first_step = (round_num - phase.first_round) * phase.steps_per_round
        start = time.perf_counter()
        if phase.trains == "head":
            result = self._train_probe(phase, seed, first_step, on_step)
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
                self.private.module,
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
        seed: int,
        first_step: int,
        on_step: StepCallback | None,
    ) -> TrainResult:
        """One round of the linear probe: the head alone, on the frozen model's features.

        The features are computed once per site (LoRA is still at its no-op initialisation in
        every probe round), so a step costs a matrix product instead of a pass through the
        model. A copy of the head trains (``PrivateTraining.probe_module``) and is written back.
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
        module, dp = self.private.probe_module(head, self.job.model.logit_scale, phase)
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
        inner = inner_model(self.loaded.model)
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
