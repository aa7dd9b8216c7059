"""The Flower ClientApp: the one site-side app, in simulation and in deployment.

Deployment (``context.node_config`` has ``worker``, the path of the site worker's Unix
socket): the app is a thin forwarder. It hands the message content and ``Context.state`` to
the site's long-lived worker (``fedslm site start``) through ``fedslm.clients.bridge`` and
returns the worker's reply; the worker holds the model, data, policy and ledger, so a fresh
ClientApp process per message costs an import of Flower, not of torch and a model load.

Simulation (``node_config`` has ``partition-id``): the site is built in this process from the
job manifest the message names, once per process, and the message is answered by
``fedslm.clients.handlers`` directly.

This module imports neither torch nor the fedslm library at module level (a test checks it):
the deployment path must start fast, and never needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

if TYPE_CHECKING:
    from fedslm.site import Site

app = ClientApp()

_SITES: dict[tuple[str, str], Site] = {}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on the received global adapter, or a refusal."""
    return Message(content=_answer(MessageType.TRAIN, msg, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global adapter on this site's held-out split."""
    return Message(content=_answer(MessageType.EVALUATE, msg, context), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """One later stage of secure aggregation (share-keys, masked-input, unmask)."""
    return Message(content=_answer(MessageType.QUERY, msg, context), reply_to=msg)


def _answer(kind: str, msg: Message, context: Context) -> RecordDict:
    worker = context.node_config.get("worker")
    if worker:
        from fedslm.clients.bridge import call_worker

        content, state = call_worker(
            str(worker),
            kind,
            msg.content,
            context.state,
            node_id=context.node_id,
            run_id=context.run_id,
        )
        # the worker's state replaces this node's: it is what the next message must see
        context.state.clear()
        for key, record in state.items():
            context.state[key] = record
        return content
    from fedslm.clients.handlers import HANDLERS

    try:
        return HANDLERS[kind](_site(msg, context), msg.content, context.state, context.node_id)
    except Exception as exc:
        raise _site_failure(msg, context, exc) from exc


def _site_failure(msg: Message, context: Context, exc: Exception) -> Exception:
    """The error a simulated site's failure becomes: one line naming the site, which Flower
    turns into the error reply the round records (instead of a Ray traceback)."""
    import traceback

    from fedslm.errors import FedSLMError
    from fedslm.job import PreparedJob
    from fedslm.messages import MANIFEST

    try:
        prepared = PreparedJob.load(Path(str(msg.content["config"][MANIFEST.name])))
        name = prepared.sites[int(context.node_config["partition-id"])].name
    except Exception:  # the manifest itself may be what failed
        name = f"partition {context.node_config.get('partition-id')}"
    if isinstance(exc, FedSLMError):
        return FedSLMError(f"site {name}: {exc}")
    # not the input's fault: a bug, whose traceback belongs in the log
    traceback.print_exception(exc)
    return FedSLMError(f"site {name}: {type(exc).__name__}: {exc} (traceback in the log)")


def _site(msg: Message, context: Context) -> Site:
    """The simulated site of this node for the job whose manifest the message names."""
    from fedslm.errors import FedSLMError
    from fedslm.inprocess import build_site
    from fedslm.job import PreparedJob
    from fedslm.messages import MANIFEST

    if "partition-id" not in context.node_config:
        raise FedSLMError(
            "this node has neither a site worker (node_config 'worker', set by `fedslm site "
            "start`) nor a simulated partition (node_config 'partition-id')"
        )
    config = msg.content["config"]
    if MANIFEST.name not in config:
        raise FedSLMError(
            f"a simulated site needs the job manifest (config {MANIFEST.name!r}); this message "
            "is for a deployed site, whose SuperNode must be started by `fedslm site start`"
        )
    manifest = Path(str(config[MANIFEST.name]))
    prepared = PreparedJob.load(manifest)
    setup = prepared.sites[int(context.node_config["partition-id"])]
    key = (str(manifest), setup.name)
    if key not in _SITES:
        _SITES[key] = build_site(prepared, setup)
    return _SITES[key]
