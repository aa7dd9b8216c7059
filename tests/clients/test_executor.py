"""The site's Flower plumbing that makes a deployed round fast: the ClientApp executor (which
app it agrees to run), the SuperNode launcher (which Flower sleeps it shortens), and the one
array an adapter travels as.

The executor, the launcher and the codec run for real, against a real SuperLink and
SuperNodes, in tests/test_deployment_e2e.py; bench/deployment_overhead.py measures them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fedslm.clients import supernode
from fedslm.clients.executor import CLIENTAPP, AppRefused, Superseded, check_app, pull_input
from fedslm.wire.codec import ADAPTER, ORDER, arrays_to_state, state_to_arrays
from flwr.app import Array, ArrayRecord
from flwr.cli.build import build_fab_from_disk

from fedslm.deployment.config import CoordinatorSettings
from fedslm.deployment.coordinator import write_app


def _fab(tmp_path: Path, clientapp: str = CLIENTAPP, extra: dict[str, str] | None = None) -> bytes:
    """The FAB `fedslm coordinator run` submits, with its clientapp line changed and extra
    files added."""
    settings = CoordinatorSettings(
        state_dir=str(tmp_path / "state"),
        tls={"ca_cert": "ca.crt", "cert": "server.pem", "key": "server.key"},
    )
    app = write_app(settings)
    toml = app / "pyproject.toml"
    toml.write_text(
        toml.read_text().replace(f'clientapp = "{CLIENTAPP}"', f'clientapp = "{clientapp}"')
    )
    for name, text in (extra or {}).items():
        (app / name).write_text(text)
    return build_fab_from_disk(app)


def test_the_executor_runs_the_app_the_coordinator_submits(tmp_path: Path) -> None:
    check_app(_fab(tmp_path))


def test_a_fab_naming_another_clientapp_is_refused(tmp_path: Path) -> None:
    fab = _fab(tmp_path, "evil.app:app", {"evil.py": "import os; os.system('id')\n"})
    with pytest.raises(AppRefused, match="runs only fedslm's installed ClientApp") as err:
        check_app(fab)
    assert "'evil.app:app'" in str(err.value)


def test_bytes_that_are_not_a_fab_are_refused() -> None:
    with pytest.raises(AppRefused, match="not a FAB naming a ClientApp"):
        check_app(b"not a zip file")


class DroppedMessageRuntime:
    """The SuperNode's runtime API as the executor sees it for a task whose message Flower's
    SuperNode dropped (its run stopped): the task and its context exist, its message's content
    never becomes available."""

    def __init__(self, fab: bytes) -> None:
        self.fab, self.pulls = fab, 0

    def PullTaskInput(self, _request: object) -> object:
        from flwr.app import Context, RecordDict
        from flwr.common.serde import context_to_proto, fab_to_proto
        from flwr.proto.runtime_pb2 import PullTaskInputResponse
        from flwr.supercore.fab import Fab

        context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
        return PullTaskInputResponse(
            context=context_to_proto(context), fab=fab_to_proto(Fab("h", self.fab, {})), task_id=9
        )

    def PullMessages(self, _request: object) -> object:
        from flwr.proto.message_pb2 import Message as ProtoMessage
        from flwr.proto.message_pb2 import ObjectTree
        from flwr.proto.runtime_pb2 import PullAppMessagesResponse

        return PullAppMessagesResponse(
            messages_list=[ProtoMessage()], message_object_trees=[ObjectTree(object_id="m")]
        )

    def PullObject(self, _request: object) -> object:
        from flwr.proto.message_pb2 import PullObjectResponse

        self.pulls += 1
        return PullObjectResponse(object_found=True, object_available=False)

    def ConfirmMessageReceived(self, _request: object) -> object:
        raise AssertionError("a message that never arrived cannot be confirmed")


def test_a_task_whose_message_never_comes_gives_way_to_the_next(tmp_path: Path) -> None:
    """Waiting for a dropped message's content, the executor asks for a newer task between
    tries; once there is one, it gives the waiting task up and hands that task on."""
    runtime = DroppedMessageRuntime(_fab(tmp_path))
    offers = iter([None, None, "token-2"])
    with pytest.raises(Superseded) as err:
        pull_input(runtime, lambda: next(offers))  # type: ignore[arg-type]
    assert err.value.token == "token-2"
    assert runtime.pulls >= 3  # it kept trying until the newer task appeared


# -- the SuperNode launcher ------------------------------------------------------------------


def test_the_pinned_flower_still_polls_where_the_launcher_expects() -> None:
    """If this fails after a Flower upgrade, the SuperNode's loop changed: re-read
    flwr/supernode/start_client_internal.py before adapting fedslm.clients.supernode."""
    supernode.check_flower()


class FakeClock:
    """``time`` with a hand-moved clock that records the sleeps asked of it."""

    def __init__(self) -> None:
        self.now, self.slept = 1000.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def test_the_poll_clock_is_quick_during_a_job_and_flowers_own_when_idle() -> None:
    fake = FakeClock()
    clock = supernode.PollClock(active_s=0.2, idle_s=3.0, window_s=60, clock=fake)
    clock.sleep(3)  # nothing handled yet: Flower's idle wait
    clock.handled()
    fake.now += 59
    clock.sleep(3)  # a message a minute ago: the job's poll
    clock.sleep(0.5)  # waiting for a reply
    clock.sleep(0.01)  # a shorter wait is never lengthened
    fake.now += 2
    clock.sleep(3)  # over a minute since the last message: idle again
    assert fake.slept == [3.0, 0.2, 0.2, 0.01, 3.0]
    assert clock.monotonic() == fake.now  # the rest of `time`, passed through


def test_shorten_waits_binds_the_supernode_loop_and_marks_each_message() -> None:
    from flwr.supernode import start_client_internal as loop

    saved = loop.time, loop._push_messages, loop._pull_and_store_message, loop.pull_objects
    pushed: list[str] = []
    try:
        loop._push_messages = lambda **kw: pushed.append("sent")
        supernode.shorten_waits(0.5)
        clock = supernode.shorten_waits(0.3, 2.0)  # twice: wraps Flower's, not its own
        assert loop.time is clock and clock._clock is time
        assert (clock.active_s, clock.idle_s) == (0.3, 2.0)
        assert clock.last_message == -float("inf")
        loop._push_messages(state=None, send=None)  # what the loop calls after a message
        assert pushed == ["sent"] and clock.last_message > 0
        assert loop.pull_objects.keywords == {
            "initial_backoff": supernode.PULL_BACKOFF_S,
            "backoff_cap": supernode.PULL_BACKOFF_CAP_S,
        }
    finally:
        loop.time, loop._push_messages, loop._pull_and_store_message, loop.pull_objects = saved


class _Msg:
    """What the loop's steps read of a message: its id, and the id it replies to."""

    def __init__(self, message_id: str, reply_to: str = "") -> None:
        self.metadata = type("M", (), {"message_id": message_id, "reply_to_message_id": reply_to})


def test_the_loop_waits_for_the_reply_to_the_message_it_took() -> None:
    """After a coordinator restart, a reply to a message of the stopped run may be all there
    is when the loop looks: Flower sends (drops) it and would take the next message; the
    wrapped loop looks again until the reply to the message it took has gone."""
    exchange = supernode.Exchange()
    clock = supernode.PollClock(0.2, 3.0)
    pending = [[_Msg("r-old", reply_to="old")], [_Msg("r-new", reply_to="new")]]
    sent: list[str] = []

    def flower_pull(**kw: object) -> int:
        kw["receive"]()  # type: ignore[operator]
        return 7  # the run id: the message was taken

    def flower_push(**kw: object) -> None:
        for reply in pending.pop(0):  # what Flower finds: one batch of replies per call
            kw["send"](reply, None, 0.0)  # type: ignore[operator]

    pull = supernode._receiving(flower_pull, exchange)
    push = supernode._answering(flower_push, clock, exchange)
    pull(receive=lambda: (_Msg("new"), None))
    push(send=lambda m, *a: sent.append(m.metadata.message_id))
    assert sent == ["r-old", "r-new"] and not pending
    # a message Flower dropped (run stopped) is not waited for
    pending = [[_Msg("r-x", reply_to="x")]]
    pull_dropped = supernode._receiving(lambda **kw: kw["receive"]() and None, exchange)
    pull_dropped(receive=lambda: (_Msg("dropped"), None))
    push(send=lambda m, *a: sent.append(m.metadata.message_id))
    assert sent[-1] == "r-x" and not pending


def test_the_launcher_refuses_a_poll_interval_out_of_range(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        supernode.main(["--poll-interval", "100", "--superlink", "x:1"])
    assert "--poll-interval must be between 0.01 and 60 seconds" in capsys.readouterr().err


# -- the adapter on the wire -----------------------------------------------------------------


def test_an_adapter_travels_as_one_array_and_comes_back_bit_for_bit() -> None:
    state = {
        "base_model.layer.0.lora_A.weight": torch.randn(4, 32),
        "base_model.layer.0.lora_B.weight": torch.randn(32, 4),
        "classifier.bias": torch.tensor([1e-38, -0.0, float("inf")]),
    }
    record = state_to_arrays(state)
    assert list(record) == [ADAPTER]
    back = arrays_to_state(record)
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == torch.float32
        assert torch.equal(back[name].view(torch.int32), tensor.view(torch.int32)), name


def test_a_half_precision_adapter_is_sent_as_float32() -> None:
    back = arrays_to_state(state_to_arrays({"w": torch.ones(3, dtype=torch.bfloat16)}))
    assert back["w"].dtype == torch.float32


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (ArrayRecord({"w": Array(np.zeros(3, np.float32))}), "expected one array 'adapter'"),
        (ArrayRecord({ADAPTER: Array(np.zeros(3, np.float32))}), "must be 1-D uint8"),
        (ArrayRecord({ADAPTER: Array(np.frombuffer(b"garbage!", np.uint8))}), "not an adapter"),
    ],
)
def test_a_malformed_adapter_record_is_a_value_error_naming_the_problem(
    record: ArrayRecord, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        arrays_to_state(record)


def test_an_adapter_without_its_order_is_refused() -> None:
    from safetensors.torch import save

    record = ArrayRecord({ADAPTER: Array(np.frombuffer(save({"w": torch.zeros(2)}), np.uint8))})
    with pytest.raises(ValueError, match="not an adapter in safetensors"):
        arrays_to_state(record)


def test_an_adapter_of_float64_tensors_is_refused() -> None:
    from safetensors.torch import save

    blob = save({"w": torch.zeros(2, dtype=torch.float64)}, metadata={ORDER: '["w"]'})
    record = ArrayRecord({ADAPTER: Array(np.frombuffer(blob, np.uint8))})
    with pytest.raises(ValueError, match="must be float32; not: w"):
        arrays_to_state(record)
