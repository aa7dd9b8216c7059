"""The Flower ClientApp: a thin adapter from Flower messages to ``fedslm.site.Site``.

Each message carries the round's global adapter and, in simulation, the path of the job
manifest. The site's model is loaded once per process and reused across rounds. The site's
privacy spend lives in its ledger file, so it survives a fresh process per message; a policy
refusal is answered with its reasons and no weights.
"""

from __future__ import annotations

from pathlib import Path

from fedslm.clients.codec import arrays_to_state, encode_payload
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedslm.errors import FedSLMError
from fedslm.inprocess import build_site
from fedslm.job import PreparedJob
from fedslm.progress import Reporter
from fedslm.site import Site, SiteRefusal

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
        update = site.train_round(round_num, arrays_to_state(msg.content["arrays"]), on_step)
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
