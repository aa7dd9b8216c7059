"""The site's ClientApp executor: ``python -m fedslm.clients.executor``, started by
``fedslm site start`` next to the SuperNode.

With Flower's default isolation (``--isolation subprocess``) the SuperNode starts a SuperExec
that launches a fresh ``flwr-clientapp`` process for every message: an interpreter, Flower's
import and the FAB unpacked onto ``sys.path`` before the ClientApp sees the message, 2-3 s per
message here, more when sites share cores. The daemon runs the SuperNode with ``--isolation
process`` and this executor in the SuperExec's place: one long-lived process that takes the
SuperNode's ClientApp tasks from its runtime API and runs each with Flower's own task
functions (``pull_task_input``, ``push_message``, ``push_task_output``) and task heartbeats.

It runs one ClientApp, the one installed with this site's fedslm: ``fedslm.clients.app:app``,
the thin forwarder to the site worker. The FAB the coordinator sends is read for its
``clientapp`` reference and nothing else; a FAB naming another app gets an error reply, and
no code from a FAB is imported. The code that runs at a site is the code the site installed.

The runtime API is on loopback; the SuperNode hands tasks only to a holder of the secret in
``--secret-file`` (Flower's SuperExec authentication), which the daemon writes, mode 0600, at
every start. One task runs at a time, as the SuperNode handles one message at a time.

One exception to "a task has a message": Flower 1.41's SuperNode creates a task for a message
before pulling its content, and when the message's run has stopped meanwhile (a coordinator
that restarted and resumed in a new run) it drops the message but leaves the task. The task's
content then never arrives. Because the SuperNode takes its next message only once the one in
hand is answered or dropped, a new task that appears while a task waits for its content
means that content is not coming: the waiting task is given up (reported failed) and the new
one runs.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from itertools import pairwise
from types import FrameType
from typing import Any

import httpx
from fedslm.clients.supernode import PULL_BACKOFF_CAP_S, PULL_BACKOFF_S
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.config import get_fab_config
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectUnavailableError,
    pull_and_inflate_object_from_tree,
)
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

CLIENTAPP = "fedslm.clients.app:app"
TASK_POLL_S = 0.05  # a loopback request that costs the SuperNode one SQLite query
UNREACHABLE_RETRY_S = 1.0
_ACQUIRE = frozenset({"/flwr.proto.Runtime/AcquireTask"})

Log = Callable[[str], None]


class AppRefused(Exception):
    """The job's FAB names a ClientApp other than the one this site runs."""


def fab_clientapp(content: bytes) -> str:
    """The ``clientapp`` a FAB's ``pyproject.toml`` names; ``AppRefused`` when it has none."""
    try:
        config = get_fab_config(content)
        ref = config["tool"]["flwr"]["app"]["components"]["clientapp"]
    except (ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise AppRefused(f"the job's app is not a FAB naming a ClientApp ({exc!r})") from None
    return str(ref)


def check_app(content: bytes) -> None:
    """Refuse a FAB that names any ClientApp but fedslm's installed one."""
    ref = fab_clientapp(content)
    if ref != CLIENTAPP:
        raise AppRefused(
            f"this site runs only fedslm's installed ClientApp ({CLIENTAPP}); the job's app "
            f"names {ref!r}. Submit jobs with `fedslm coordinator run`"
        )


class Superseded(Exception):
    """A newer task (its token in ``token``) appeared while this one waited for its message:
    the SuperNode dropped that message."""

    def __init__(self, token: str) -> None:
        super().__init__("the SuperNode dropped this task's message and moved on to another")
        self.token = token


def run_task(
    address: str, token: str, log: Log, acquire: Callable[[], str | None] = lambda: None
) -> str | None:
    """Run the ClientApp task ``token`` grants: pull its message, answer it with fedslm's
    ClientApp (an error reply when the app raises), push the reply and the node's context.

    While the message's content is not all there yet, ``acquire`` is asked for a newer task;
    if there is one, this task is given up and the newer one's token returned, to run next.
    """
    from fedslm.clients.app import app

    client = _runtime_client(
        address,
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
        RuntimeTokenHttpInterceptor(token),
    )
    abandoned = threading.Event()
    beats = HeartbeatSender(_heartbeat(client, abandoned))
    message: Message | None = None
    context: Context | None = None
    reply: Message | None = None
    status, details = SubStatus.FAILED, "the task failed before its message was read"
    marks = [("start", time.monotonic())]
    newer: str | None = None
    beats.start()
    try:
        message, context, fab = pull_input(client, acquire)
        marks.append(("pull", time.monotonic()))
        check_app(fab.content)
        reply = app(message=message, context=context)
        marks.append(("app", time.monotonic()))
        status, details = SubStatus.COMPLETED, ""
    except Superseded as superseded:
        newer, details = superseded.token, str(superseded)
    except Exception as exc:  # every failure becomes an error reply
        details = f"{type(exc).__name__}: {exc}"
        code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        if isinstance(exc, AppRefused):
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        beats.stop()
        marks.append(("heartbeat", time.monotonic()))
        what = message.metadata.message_type if message is not None else "task"
        try:
            if abandoned.is_set():
                log(f"{what}: the SuperNode gave the task up (run stopped?); no reply sent")
            else:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(client, context, status, details)
                marks.append(("push", time.monotonic()))
                outcome = "replied" if status == SubStatus.COMPLETED else f"failed: {details}"
                steps = ", ".join(f"{k} {t - p:.2f}" for (_, p), (k, t) in pairwise(marks))
                log(f"{what} message {outcome} in {marks[-1][1] - marks[0][1]:.2f} s ({steps})")
        except httpx.HTTPError as exc:
            log(f"{what}: could not hand the reply to the SuperNode: {exc}")
        finally:
            client.close()
    return newer


def pull_input(
    client: RuntimeHttpClient, acquire: Callable[[], str | None] = lambda: None
) -> tuple[Message, Context, Fab]:
    """The task's message, the node's context and the FAB, as Flower's ``pull_task_input``
    reads them, but retrying a message array the SuperNode does not have yet after 20 ms
    (doubling to 0.5 s) instead of after 1 s (doubling to 10 s). Each retry first asks
    ``acquire`` for a newer task: ``Superseded`` when there is one (see the module's
    docstring)."""
    task = client.PullTaskInput(PullTaskInputRequest())
    context = context_from_proto(task.context)
    fab = fab_from_proto(task.fab)
    # who "this task" is, for any Message Flower builds from here on
    TaskIdentity.task_id, TaskIdentity.run_id = task.task_id, context.run_id
    TaskIdentity.node_id = context.node_id
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode's runtime API returned no message for this task")
    tree = pulled.message_object_trees[0]
    node = Node(node_id=context.node_id)
    pull = make_pull_object_fn_protobuf(client.PullObject, node, context.run_id)
    lock = threading.Lock()  # Flower pulls on two threads; one asks for a newer task

    def pull_or_give_up(object_id: str) -> bytes:
        try:
            return pull(object_id)
        except ObjectUnavailableError:
            with lock:
                newer = acquire()
            if newer is not None:
                raise Superseded(newer) from None
            raise

    message = pull_and_inflate_object_from_tree(
        tree,
        pull_or_give_up,
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        max_tries_per_object=None,  # Flower's own limit, PULL_MAX_TIME (2 h), still applies
        # the SuperNode offers a task before it has the message's arrays from the coordinator;
        # Flower's 1, 2, 4 ... s between tries cost ~3 s per message here
        initial_backoff=PULL_BACKOFF_S,
        backoff_cap=PULL_BACKOFF_CAP_S,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # not part of its content
    return message, context, fab


def _heartbeat(client: RuntimeHttpClient, abandoned: threading.Event) -> Callable[[], bool]:
    """Flower's task heartbeat, except that a task the SuperNode no longer wants is marked
    ``abandoned`` instead of interrupting this long-lived process (Flower's raises SIGINT)."""
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            response = client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code in (503, 504):
                return False
            abandoned.set()
            return True
        if not response.success:
            abandoned.set()
        return True

    return beat


def _runtime_client(address: str, *interceptors: Any) -> RuntimeHttpClient:
    """A client of the SuperNode's runtime API, which listens on loopback only (plain HTTP,
    as Flower's own SuperExec and ClientApp processes use it)."""
    return RuntimeHttpClient.from_server_address(
        address, insecure=True, root_certificates=None, interceptors=list(interceptors)
    )


def serve(address: str, secret: bytes, stop: threading.Event, log: Log) -> None:
    """Take ClientApp tasks from the SuperNode's runtime API at ``address`` and run them one
    at a time until ``stop`` is set. A SuperNode that is not (yet) listening is waited for."""
    client = _runtime_client(
        address,
        RuntimeVersionHttpInterceptor(component_name="SuperExec"),
        SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=_ACQUIRE),
    )
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])

    def acquire() -> str | None:
        response = client.AcquireTask(request)
        return response.token if response.HasField("task") and response.token else None

    reachable: bool | None = None
    try:
        while not stop.is_set():
            try:
                token = acquire()
            except httpx.HTTPError as exc:
                if reachable is not False:
                    log(f"waiting for the SuperNode's runtime API at {address} ({exc})")
                reachable = False
                stop.wait(UNREACHABLE_RETRY_S)
                continue
            if not reachable:
                log(f"connected to the SuperNode's runtime API at {address}")
                reachable = True
            if token is None:
                stop.wait(TASK_POLL_S)
            while token is not None:  # a task given up hands over the newer one
                token = run_task(address, token, log, acquire)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m fedslm.clients.executor --runtime-api HOST:PORT --secret-file FILE``."""
    parser = argparse.ArgumentParser(
        prog="python -m fedslm.clients.executor", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--runtime-api", required=True, help="the SuperNode's runtime API")
    parser.add_argument("--secret-file", required=True, help="its SuperExec secret")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    args = parser.parse_args(argv)
    try:
        secret = load_superexec_auth_secret(args.secret_file) or b""
    except ValueError as exc:
        print(f"fedslm executor: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()  # a task in progress finishes first

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)  # SIGINT when the daemon is gone

    def log(line: str) -> None:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}", flush=True)

    log(f"executor up: running {CLIENTAPP} for the SuperNode at {args.runtime_api}")
    serve(args.runtime_api, secret, stop, log)
    log("executor stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
