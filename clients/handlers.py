"""What a site does with each Flower message: train, evaluate, or a secure-aggregation stage.

The same functions answer in simulation (the ClientApp calls them in its own process) and in
deployment (the site worker calls them, ``fedslm.clients.worker``). Each takes the site, the
message content, the node's state (Flower's ``Context.state``, a ``RecordDict`` that outlives
one message) and the node id, and returns the reply content. Whatever the reply is, the site's
egress guard checks it and logs it in the site's ledger before it leaves (``Site.release``); a
refusal is answered with its reasons and no weights.

A deployed site also passes a ``ReleaseStore``: a training reply is kept on disk before it
leaves, so a retried round gets the same update back (nothing trained, nothing spent) and a
round is never released twice with different contents.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fedslm.wire.codec import (
    EVAL_PREFIX,
    arrays_of,
    arrays_to_state,
    config_of,
    config_to_message,
    encode_payload,
    from_wire,
    join_replies,
    to_wire,
)
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, RecordDict

from fedslm.artifacts import write_torch
from fedslm.egress import Payload, RingSpec
from fedslm.errors import FedSLMError
from fedslm.messages import EvalInstruction, StageInstruction, TrainInstruction
from fedslm.privacy.anchors import Anchor
from fedslm.progress import Reporter
from fedslm.secagg import KeyRoster, SecAggParams, SecAggSite, ShareInbox, UnmaskRequest
from fedslm.secagg.adapter import job_params, session_id, update_vector
from fedslm.secagg.driver import site_stage
from fedslm.secagg.messages import EncryptedShares, MaskedInput, UnmaskShares
from fedslm.site import Site, SiteRefusal, SiteUpdate, adapter_sha256

# State keys: the secure-aggregation state and the pending update of this node. They hold
# private keys and the unmasked update: they never leave the site.
STATE_KEY, DELTA_KEY = "secagg-state", "secagg-update"
SECRET_STATE_KEYS = (STATE_KEY, DELTA_KEY)
_REQUESTS = {"share-keys": KeyRoster, "masked-input": ShareInbox, "unmask": UnmaskRequest}

Handler = Callable[[Site, RecordDict, RecordDict, int], RecordDict]


def handle_train(
    site: Site,
    content: RecordDict,
    state: RecordDict,
    node_id: int,
    *,
    releases: ReleaseStore | None = None,
) -> RecordDict:
    """One round of local training on the received global adapter, or a refusal.

    With config ``evaluate-round`` (every round of a run but its first), the received adapter
    is that round's global adapter, and the site evaluates it before training on it: the reply
    carries the evaluation too (``EVAL_PREFIX``), so a round takes one message, not two. The
    evaluation is released on its own and sent even when training is refused.

    Under secure aggregation the reply carries metrics and a key advert, and the update stays
    in ``state`` for the masked-input stage. With ``releases``, a round already released is
    answered from the store (same input) or refused (different input), without training.

    With config ``ledger-anchor-seq`` and ``ledger-anchor-hash`` (the head the coordinator
    anchored for this site), a ledger that no longer extends that head is refused before
    anything is spent; a malformed anchor raises ``ValueError`` naming the key.
    """
    order = TrainInstruction.from_config(config_of(content, "config"))
    round_num, anchor = order.round, order.anchor
    reporter = Reporter(quiet=order.quiet)
    global_state = arrays_to_state(arrays_of(content, "arrays"))
    if order.evaluate_round is None:
        return _train(site, round_num, global_state, state, node_id, reporter, releases, anchor)
    evaluated = order.evaluate_round
    try:
        payload = site.release(evaluated, site.eval_payload(site.evaluate(global_state)))
    except SiteRefusal as refusal:  # the egress guard blocked it: training goes on
        payload = site.release(evaluated, site.refusal_payload(refusal.reasons))
    evaluation = encode_payload(payload, EVAL_PREFIX)
    reply = _train(site, round_num, global_state, state, node_id, reporter, releases, anchor)
    return join_replies(evaluation, reply)


def _train(
    site: Site,
    round_num: int,
    global_state: dict[str, torch.Tensor],
    state: RecordDict,
    node_id: int,
    reporter: Reporter,
    releases: ReleaseStore | None,
    anchor: Anchor | None = None,
) -> RecordDict:
    def on_step(step: int, steps: int, loss: float) -> None:
        reporter.step(site.name, round_num, step, steps, loss)

    if releases is not None:
        try:
            stored = releases.prior(site, round_num, global_state)
        except SiteRefusal as refusal:  # this round was released for another input
            reporter.warn(f"[{site.name}] refused round {round_num}: {refusal}")
            return encode_payload(site.release(round_num, site.refusal_payload(refusal.reasons)))
        if stored is not None:
            reporter.info(f"[{site.name}] round {round_num}: sending the stored release again")
            return encode_payload(site.release(round_num, stored, replay=True))

    def secure(update: SiteUpdate) -> Payload:
        return _start_secure(site, state, node_id, round_num, update, global_state)

    send = secure if site.job.federation.secure_aggregation else None
    answer = site.answer_train(round_num, global_state, on_step, anchor, send=send)
    if answer.update is None:
        reporter.warn(f"[{site.name}] refused round {round_num}: {'; '.join(answer.reasons)}")
    elif releases is not None:
        # kept before the reply leaves: a retry of this round gets exactly this back
        releases.store(site, round_num, global_state, answer.payload)
    return encode_payload(answer.payload)


def handle_evaluate(site: Site, content: RecordDict, state: RecordDict, node_id: int) -> RecordDict:
    """Evaluate the received global adapter on this site's held-out split (the last round's;
    the others are evaluated with the next round's training, ``handle_train``)."""
    round_num = EvalInstruction.from_config(config_of(content, "config")).round
    result = site.evaluate(arrays_to_state(arrays_of(content, "arrays")))
    return encode_payload(site.release(round_num, site.eval_payload(result)))


def _params(site: Site, round_num: int) -> SecAggParams:
    n = len(site.job.federation.site_names)
    return job_params(site.job, session_id(site.job_id, round_num), n)


def _start_secure(
    site: Site,
    state: RecordDict,
    node_id: int,
    round_num: int,
    update: SiteUpdate,
    global_state: dict[str, torch.Tensor],
) -> Payload:
    """Round 0 of secure aggregation: keep the update for the masked-input stage (in ``state``,
    which outlives this message) and reply with metrics and the key advert."""
    secagg = SecAggSite(_params(site, round_num), node_id)
    advert = secagg.advertise()
    delta = update_vector(update.state, global_state)
    payload = site.release(round_num, site.secure_train_payload(update, advert))
    wire = {k: to_wire(v) for k, v in secagg.to_state().items()}
    state[STATE_KEY] = ConfigRecord(
        {**wire, "round": round_num, "weight": int(update.num_examples)}
    )
    state[DELTA_KEY] = ArrayRecord(OrderedDict(update=Array(delta)))
    return payload


def _state_int(record: ConfigRecord, key: str) -> int:
    # written by this site's own train handler; anything else is a damaged session
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise FedSLMError(f"secure aggregation session state: {key} is {value!r}, not an integer")
    return value


def _stage_payload(reply: object) -> Payload:
    """What a secure-aggregation stage's reply sends (``site_stage`` answers each stage with
    its own message type)."""
    if isinstance(reply, EncryptedShares):
        return Site.shares_payload(reply)
    if isinstance(reply, MaskedInput):
        return Site.masked_payload(reply)
    if isinstance(reply, UnmaskShares):
        return Site.unmask_payload(reply)
    raise FedSLMError(f"secure aggregation answered with an unknown {type(reply).__name__}")


def handle_query(site: Site, content: RecordDict, state: RecordDict, node_id: int) -> RecordDict:
    """One later stage of secure aggregation (share-keys, masked-input, unmask).

    The protocol state comes from ``state`` (a fresh process may answer each message); the
    reply passes the egress guard like every other message, and one the guard blocks (for
    instance a masked vector larger than the policy's ``max_bytes_per_round``) is answered
    with a refusal, as in training. Any other error is raised, which becomes an error reply.
    The coordinator counts either as this site dropping out.
    """
    order = StageInstruction.from_config(config_of(content, "config"))
    stage, round_num = order.stage, order.round
    if stage not in _REQUESTS:
        raise FedSLMError(f"[{site.name}] unknown secure aggregation stage {stage!r}")
    if STATE_KEY not in state:
        raise FedSLMError(f"[{site.name}] secure aggregation {stage}: no session in progress")
    record = config_of(state, STATE_KEY)
    session_round, weight = _state_int(record, "round"), _state_int(record, "weight")
    if session_round != round_num:
        raise FedSLMError(
            f"[{site.name}] secure aggregation {stage} for round {round_num}, but the session "
            f"in progress is for round {session_round}"
        )
    params = _params(site, round_num)
    saved = {k: from_wire(v) for k, v in record.items() if k not in ("round", "weight")}
    request = config_to_message(_REQUESTS[stage], config_of(content, "secagg"))
    update, ring = None, None
    if stage == "masked-input":
        if DELTA_KEY not in state:
            raise FedSLMError(f"[{site.name}] secure aggregation {stage}: no update is pending")
        update = np.asarray(arrays_of(state, DELTA_KEY)["update"].numpy(), dtype=np.float32)
        ring = RingSpec(update.size + 1, params.dtype.str)
    reply, saved = site_stage(params, saved, stage, request, update, weight)
    if stage == "masked-input":
        del state[DELTA_KEY]  # the update has left, masked: keep no copy
        if int(saved["clipped"]):
            # the secure mean then differs from the plain one by more than the quantisation
            Reporter(quiet=order.quiet).warn(
                f"[{site.name}] secure aggregation clipped {int(saved['clipped'])} coordinates "
                "of the update to federation.secagg.clip_range"
            )
    state[STATE_KEY] = ConfigRecord(
        {**{k: to_wire(v) for k, v in saved.items()}, "round": round_num, "weight": weight}
    )
    try:
        payload = site.release(round_num, _stage_payload(reply), ring)
    except SiteRefusal as refusal:
        Reporter(quiet=order.quiet).warn(
            f"[{site.name}] refused secure aggregation {stage} in round {round_num}: {refusal}"
        )
        payload = site.release(round_num, site.refusal_payload(refusal.reasons))
    return encode_payload(payload)


# by the Flower message type the site received (``fedslm.clients.bridge.KINDS``)
HANDLERS: dict[str, Handler] = {
    MessageType.TRAIN: handle_train,
    MessageType.EVALUATE: handle_evaluate,
    MessageType.QUERY: handle_query,
}


# -- the store of released updates ---------------------------------------------------------------

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_ROUND_FILE = re.compile(r"round-(\d+)\.pt")


class ReleaseStore:
    """The training replies a deployed site has released, one file per job (its latest round):
    ``folder/<job-id>/round-<r>.pt``.

    A coordinator that lost a round (a crash, a retry) may ask for it again. Training it again
    would draw the same noise for a different global adapter, or fresh noise for the same one:
    either way a second release of one round, which the ledger (one entry per job and round)
    would not charge. So the site answers a repeated round from here: the same global adapter
    gets the stored reply again, a different one is refused, and so is a round older than the
    latest released. Under secure aggregation a round is never answered twice: a second
    protocol run over the same update with another set of survivors could reveal it.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.replays = 0  # how many replies were sent again from the store

    def _job_dir(self, job_id: str) -> Path:
        if not _JOB_ID.fullmatch(job_id):
            raise FedSLMError(f"job id {job_id!r} is not usable as a folder name")
        return self.folder / job_id

    def latest(self, job_id: str) -> dict[str, Any] | None:
        """The stored record of ``job_id``'s latest released round, or None."""
        rounds = []
        folder = self._job_dir(job_id)
        if folder.is_dir():
            for f in folder.iterdir():
                m = _ROUND_FILE.fullmatch(f.name)
                if m:
                    rounds.append((int(m.group(1)), f))
        if not rounds:
            return None
        _, path = max(rounds)
        # weights_only: tensors, numbers, strings, lists and dicts, never arbitrary objects
        record: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        return record

    def prior(
        self, site: Site, round_num: int, global_state: dict[str, torch.Tensor]
    ) -> Payload | None:
        """The stored reply to send again for ``round_num``, None to train it, or
        ``SiteRefusal`` when releasing this round would be a second, different release."""
        job = site.job_id
        rec = self.latest(job)
        if rec is None:
            return None
        if rec["job_fingerprint"] != site.job.fingerprint():
            raise SiteRefusal(
                [
                    f"job id {job} was already used for a different job (fingerprint "
                    f"{rec['job_fingerprint'][:12]}…, this one {site.job.fingerprint()[:12]}…); "
                    "a new job needs a new job id"
                ]
            )
        stored = int(rec["round"])
        if stored < round_num:
            return None
        if stored > round_num:
            raise SiteRefusal(
                [
                    f"round {round_num} of job {job} was asked after round {stored} was "
                    "released; a job's rounds only move forward (training an earlier round "
                    "again would release a second update for it)"
                ]
            )
        if rec["secure"]:
            raise SiteRefusal(
                [
                    f"round {round_num} of job {job} was already answered under secure "
                    "aggregation; a second protocol run over the same update could reveal it"
                ]
            )
        if rec["input_sha256"] != adapter_sha256(global_state):
            raise SiteRefusal(
                [
                    f"round {round_num} of job {job} was already released for a different "
                    "global adapter; releasing again would spend privacy twice"
                ]
            )
        self.replays += 1
        return Payload(
            str(rec["kind"]), dict(rec["tensors"]), dict(rec["metrics"]), dict(rec["fields"])
        )

    def store(
        self,
        site: Site,
        round_num: int,
        global_state: dict[str, torch.Tensor],
        payload: Payload,
    ) -> None:
        """Keep ``payload`` (released for ``round_num``) atomically, and drop older rounds."""
        folder = self._job_dir(site.job_id)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        secure = site.job.federation.secure_aggregation
        record = {
            "format": 1,
            "job_id": site.job_id,
            "job_fingerprint": site.job.fingerprint(),
            "round": int(round_num),
            "input_sha256": adapter_sha256(global_state),
            "secure": bool(secure),
            "kind": payload.kind,
            # under secure aggregation only the fact of the round is kept: its reply holds key
            # material, and it is never sent again anyway
            "tensors": {} if secure else {k: v.detach().cpu() for k, v in payload.tensors.items()},
            "metrics": {} if secure else dict(payload.metrics),
            "fields": {} if secure else dict(payload.fields),
        }
        path = folder / f"round-{round_num}.pt"
        write_torch(path, record)
        for f in folder.iterdir():
            m = _ROUND_FILE.fullmatch(f.name)
            if m and int(m.group(1)) != round_num:
                f.unlink(missing_ok=True)
