"""The Flower ClientApp: a thin adapter from Flower messages to ``fedslm.site.Site``.

Each message carries the round's global adapter and, in simulation, the path of the job
manifest. The site's model is loaded once per process and reused across rounds; its privacy
spend lives in ``Context.state``, which Flower keeps per node across messages and processes.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedslm.clients.codec import arrays_to_state, encode_eval, encode_update
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedslm.errors import FedSLMError
from fedslm.job import PreparedJob
from fedslm.privacy.accounting import Segment
from fedslm.progress import Reporter
from fedslm.site import Site

app = ClientApp()

_SITES: dict[tuple[str, str], Site] = {}
_SPENT_KEY = "fedslm-privacy-spend"


def _site(msg: Message, context: Context) -> Site:
    manifest = Path(str(msg.content["config"]["manifest"]))
    prepared = PreparedJob.load(manifest)
    if "partition-id" not in context.node_config:
        raise FedSLMError(
            "this ClientApp runs simulated sites only (node_config has no partition-id)"
        )
    files = prepared.sites[int(context.node_config["partition-id"])]
    key = (str(manifest), files.name)
    if key not in _SITES:
        _SITES[key] = Site(
            prepared.job,
            files.name,
            prepared.model,
            prepared.labels,
            files.train,
            files.eval,
            source=prepared.source,
        )
    return _SITES[key]


def _spent(context: Context) -> list[Segment]:
    record = context.state.get(_SPENT_KEY)
    if record is None:
        return []
    return [Segment(**s) for s in json.loads(str(record["segments"]))]


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on the received global adapter."""
    site = _site(msg, context)
    round_num = int(msg.content["config"]["round"])
    reporter = Reporter(quiet=bool(msg.content["config"].get("quiet", False)))
    spent = _spent(context)
    update = site.train_round(
        round_num,
        arrays_to_state(msg.content["arrays"]),
        spent,
        on_step=lambda step, steps, loss: reporter.step(site.name, round_num, step, steps, loss),
    )
    if update.segment is not None:
        segments = [s.to_dict() for s in [*spent, update.segment]]
        context.state[_SPENT_KEY] = ConfigRecord({"segments": json.dumps(segments)})
    p = site.plan
    return Message(
        content=encode_update(site.name, update, p.delta, p.accountant, p.max_grad_norm),
        reply_to=msg,
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global adapter on this site's held-out split."""
    site = _site(msg, context)
    result = site.evaluate(arrays_to_state(msg.content["arrays"]))
    return Message(content=encode_eval(site.name, result), reply_to=msg)
