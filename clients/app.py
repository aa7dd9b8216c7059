"""The Flower ClientApp: a thin adapter from Flower messages to ``fedslm.site.Site``.

Each message carries the round's global adapter and, in simulation, the path of the job
manifest. The site's model is loaded once per process and reused across rounds. The site's
privacy spend lives in its ledger file, so it survives a fresh process per message; a policy
refusal is answered with its reasons and no weights.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from fedslm.clients.codec import (
    arrays_to_state,
    config_to_message,
    encode_payload,
    from_wire,
    to_wire,
)
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedslm.egress import Payload, RingSpec
from fedslm.errors import FedSLMError
from fedslm.inprocess import build_site
from fedslm.job import PreparedJob
from fedslm.progress import Reporter
from fedslm.secagg import KeyRoster, SecAggParams, SecAggSite, ShareInbox, UnmaskRequest
from fedslm.secagg.adapter import job_params, session_id, update_vector
from fedslm.secagg.driver import site_stage
from fedslm.site import Site, SiteRefusal, SiteUpdate

# Context.state keys: the secure-aggregation state and the pending update of this node. They
# hold private keys and the unmasked update: they never leave the site.
_STATE, _DELTA = "secagg-state", "secagg-update"
_REQUESTS = {"share-keys": KeyRoster, "masked-input": ShareInbox, "unmask": UnmaskRequest}

app = ClientApp()

_SITES: dict[tuple[str, str], Site] = {}


def _site(msg: Message, context: Context) -> Site:
    manifest = Path(str(msg.content["config"]["manifest"]))
    prepared = PreparedJob.load(manifest)
    if "partition-id" not in context.node_config:
        raise FedSLMError(
            "this ClientApp runs simulated sites only (node_config has no partition-id)"
        )
    setup = prepared.sites[int(context.node_config["partition-id"])]
    key = (str(manifest), setup.name)
    if key not in _SITES:
        _SITES[key] = build_site(prepared, setup)
    return _SITES[key]


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on the received global adapter, or a refusal.

    Whatever the reply is, the site's egress guard checks it and logs it in the site's ledger
    before it leaves (``Site.release``); a reply that carries more than the job agreed is
    replaced by a refusal.
    """
    site = _site(msg, context)
    round_num = int(msg.content["config"]["round"])
    reporter = Reporter(quiet=bool(msg.content["config"].get("quiet", False)))

    def on_step(step: int, steps: int, loss: float) -> None:
        reporter.step(site.name, round_num, step, steps, loss)

    try:
        global_state = arrays_to_state(msg.content["arrays"])
        update = site.train_round(round_num, global_state, on_step)
        if site.job.federation.secure_aggregation:
            payload = _start_secure(site, context, round_num, update, global_state)
        else:
            payload = site.release(round_num, site.train_payload(update))
    except SiteRefusal as refusal:
        reporter.warn(f"[{site.name}] refused round {round_num}: {refusal}")
        payload = site.release(round_num, site.refusal_payload(refusal.reasons))
    return Message(content=encode_payload(payload), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global adapter on this site's held-out split."""
    site = _site(msg, context)
    round_num = int(msg.content["config"].get("round", 0))
    result = site.evaluate(arrays_to_state(msg.content["arrays"]))
    payload = site.release(round_num, site.eval_payload(result))
    return Message(content=encode_payload(payload), reply_to=msg)


def _params(site: Site, round_num: int) -> SecAggParams:
    n = len(site.job.federation.site_names)
    return job_params(site.job, session_id(site.job_id, round_num), n)


def _start_secure(
    site: Site,
    context: Context,
    round_num: int,
    update: SiteUpdate,
    global_state: dict[str, torch.Tensor],
) -> Payload:
    """Round 0 of secure aggregation: keep the update for the masked-input stage (in
    ``Context.state``, which outlives this process) and reply with metrics and the key advert."""
    secagg = SecAggSite(_params(site, round_num), context.node_id)
    advert = secagg.advertise()
    delta = update_vector(update.state, global_state)
    payload = site.release(round_num, site.secure_train_payload(update, advert))
    state = {k: to_wire(v) for k, v in secagg.to_state().items()}
    context.state[_STATE] = ConfigRecord(
        {**state, "round": round_num, "weight": int(update.num_examples)}
    )
    context.state[_DELTA] = ArrayRecord(OrderedDict(update=Array(delta)))
    return payload


@app.query()
def query(msg: Message, context: Context) -> Message:
    """One later stage of secure aggregation (share-keys, masked-input, unmask).

    The protocol state comes from ``Context.state`` (a fresh process may answer each message);
    the reply passes the egress guard like every other message. Any error becomes an error
    reply, which the coordinator counts as this site dropping out.
    """
    site = _site(msg, context)
    config = msg.content["config"]
    stage, round_num = str(config["stage"]), int(config["round"])
    if _STATE not in context.state:
        raise FedSLMError(f"[{site.name}] secure aggregation {stage}: no session in progress")
    record = context.state[_STATE]
    if int(record["round"]) != round_num:
        raise FedSLMError(
            f"[{site.name}] secure aggregation {stage} for round {round_num}, but the session "
            f"in progress is for round {int(record['round'])}"
        )
    params = _params(site, round_num)
    state = {k: from_wire(v) for k, v in record.items() if k not in ("round", "weight")}
    request = config_to_message(_REQUESTS[stage], msg.content["secagg"])
    update, ring = None, None
    if stage == "masked-input":
        update = np.asarray(context.state[_DELTA]["update"].numpy(), dtype=np.float32)
        ring = RingSpec(update.size + 1, params.dtype.str)
    reply, state = site_stage(params, state, stage, request, update, int(record["weight"]))
    if stage == "masked-input":
        del context.state[_DELTA]  # the update has left, masked: keep no copy
        if int(state["clipped"]):
            # the secure mean then differs from the plain one by more than the quantisation
            Reporter(quiet=bool(config.get("quiet", False))).warn(
                f"[{site.name}] secure aggregation clipped {int(state['clipped'])} coordinates "
                "of the update to federation.secagg.clip_range"
            )
    context.state[_STATE] = ConfigRecord(
        {**{k: to_wire(v) for k, v in state.items()}, "round": round_num,
         "weight": int(record["weight"])}
    )  # fmt: skip
    make = {
        "share-keys": site.shares_payload,
        "masked-input": site.masked_payload,
        "unmask": site.unmask_payload,
    }[stage]
    payload = site.release(round_num, make(reply), ring)  # type: ignore[arg-type]
    return Message(content=encode_payload(payload), reply_to=msg)
