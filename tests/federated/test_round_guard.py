"""Failed rounds, unchanged models, the ServerApp's error and the SuperNode count (fast).

The end-to-end versions, with real SuperLink/SuperNode processes, are in
``test_deploy_local.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from veilface.errors import InvalidArgument, TrainingFailed
from veilface.federated.deploy import (
    RunOutcome,
    check_supernodes,
    default_supernodes,
    project_run_config,
    server_error,
)
from veilface.federated.round_guard import (
    RoundGuardGrid,
    client_failure_reasons,
    require_model_changed,
)

CAMERA_REASON = (
    "<class 'veilface.errors.InvalidArgument'>:<'camera isolation needs one client per "
    "camera: 4 cameras [1, 2, 3, 4] but 2 clients'>"
)


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower stamps messages with the running task's ids; set them outside a runtime."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None  # type: ignore[assignment]


class _FakeGrid(Grid):
    """Answers every ``send_and_receive`` with ``make_replies(messages)``."""

    def __init__(self, make_replies: Any) -> None:
        self.make_replies = make_replies
        self.sent: list[Message] = []

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        return None

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:  # fmt: skip
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return [1, 2, 3]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return []

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        batch = list(messages)
        self.sent += batch
        return list(self.make_replies(batch))


def _train_messages(n: int, server_round: int = 3) -> list[Message]:
    config = ConfigRecord({"server-round": server_round})
    return [
        Message(content=RecordDict({"config": config}), dst_node_id=i + 1, message_type="train")
        for i in range(n)
    ]


def _ok(msg: Message) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.ones(2, np.float32))}),
            "metrics": MetricRecord({"num-examples": 1.0}),
        }
    )
    return Message(content=content, reply_to=msg)


def _failed(msg: Message, reason: str) -> Message:
    return Message(Error(code=0, reason=reason), reply_to=msg)


def test_a_round_where_every_client_fails_raises_with_their_deduplicated_reasons(
    task_identity: None,
) -> None:
    reasons = [CAMERA_REASON, CAMERA_REASON, "site 3 lost power"]
    grid = RoundGuardGrid(
        _FakeGrid(lambda batch: [_failed(m, r) for m, r in zip(batch, reasons, strict=True)])
    )
    with pytest.raises(TrainingFailed) as info:
        grid.send_and_receive(_train_messages(3), timeout=5.0)
    text = info.value.message
    assert text.startswith("round 3: no client succeeded in 'train' (3 sent: 3 failed)")
    assert text.count("InvalidArgument: camera isolation needs one client per camera") == 1
    assert "<class" not in text and "site 3 lost power" in text
    assert info.value.status == "FAILED_PRECONDITION"


def test_a_round_with_one_success_goes_on(task_identity: None) -> None:
    grid = RoundGuardGrid(
        _FakeGrid(
            lambda batch: [_ok(m) if i == 0 else _failed(m, "boom") for i, m in enumerate(batch)]
        )
    )
    replies = list(grid.send_and_receive(_train_messages(3), timeout=5.0))
    assert len(replies) == 3 and not replies[0].has_error()
    assert list(grid.send_and_receive([], timeout=5.0)) == []  # nothing sent: nothing to check


def test_a_round_nobody_answered_raises(task_identity: None) -> None:
    grid = RoundGuardGrid(_FakeGrid(lambda batch: []))
    with pytest.raises(TrainingFailed, match=r"2 did not reply within 5.0 s.*no reason given"):
        grid.send_and_receive(_train_messages(2, server_round=1), timeout=5.0)


def test_reasons_are_cleaned_and_deduplicated(task_identity: None) -> None:
    msgs = _train_messages(3)
    replies = [_failed(msgs[0], CAMERA_REASON), _ok(msgs[1]), _failed(msgs[2], CAMERA_REASON)]
    expected = (
        "InvalidArgument: camera isolation needs one client per camera: 4 cameras "
        "[1, 2, 3, 4] but 2 clients"
    )
    assert client_failure_reasons(replies) == [expected]


def test_an_empty_or_unchanged_model_is_refused() -> None:
    initial: dict[str, np.ndarray] = {
        "w": np.zeros((2, 2), np.float32),
        "n": np.array(3, np.int64),
    }
    with pytest.raises(TrainingFailed, match="empty global model"):
        require_model_changed(initial, {})
    same = {"w": initial["w"].copy(), "n": np.array([3], np.int64)}  # 0-d -> (1,) in transit
    with pytest.raises(TrainingFailed, match="unchanged"):
        require_model_changed(initial, same, what="the test run")
    require_model_changed(initial, {**same, "w": np.ones((2, 2), np.float32)})


SERVER_LOG = """\
\x1b[92mINFO \x1b[0m:      Start `flwr-serverapp` process
\x1b[91mERROR \x1b[0m:     ServerApp raised an exception
Traceback (most recent call last):
  File "/x/flwr/server/run_serverapp.py", line 60, in run
    server_app(grid=grid, context=context)
  File "/x/veilface/federated/vireid/flower.py", line 235, in _ensure_proxy
    raise InvalidArgument(
veilface.errors.InvalidArgument: no proxy at /p and no LFW folder to build it from: set run-config lfw-dir (or VEILFACE_DATA), or data-dir to a built proxy
\x1b[91mERROR \x1b[0m:     Exit Code: 201
"""


def test_the_server_error_comes_from_the_status_details_or_the_log() -> None:
    details = "ServerApp failed with exception: round 1: no client succeeded in 'train'"
    assert server_error(details, SERVER_LOG) == "round 1: no client succeeded in 'train'"
    from_log = server_error("", SERVER_LOG)
    assert from_log is not None and from_log.startswith("InvalidArgument: no proxy at /p")
    assert "set run-config lfw-dir" in from_log
    assert server_error("Task failed with unknown error.", "no traceback here") is None
    failed = RunOutcome(7, "finished:failed", 5.7, SERVER_LOG)
    assert not failed.ok and failed.error is not None and "no proxy at /p" in failed.error
    assert RunOutcome(7, "finished:failed", 5.7, "").error == "the run ended 'finished:failed'"
    assert RunOutcome(7, "finished:completed", 9.0, SERVER_LOG).error is None


def test_the_supernode_count_follows_the_task_and_protocol(tmp_path: Path) -> None:
    base = project_run_config()
    assert base["task"] == "vireid" and base["protocol"] == "camera-isolation"
    assert default_supernodes(base) == 4  # the proxy's four cameras
    assert default_supernodes({**base, "protocol": "entity-isolation"}) == 2
    assert default_supernodes({**base, "task": "pad"}) == 2
    built = tmp_path / "proxy"
    built.mkdir()
    (built / "manifest.json").write_text(json.dumps({"config": {"cameras": [{}, {}]}}))
    assert default_supernodes({**base, "data-dir": str(built)}) == 2
    check_supernodes(base, 4)
    with pytest.raises(InvalidArgument, match="camera isolation over 4 cameras needs 4 SuperNodes"):
        check_supernodes(base, 2)
    check_supernodes({**base, "protocol": "entity-sharing"}, 3)
    with pytest.raises(InvalidArgument, match="waits for 2 SuperNodes"):
        check_supernodes({**base, "protocol": "entity-sharing"}, 1)


def test_cli_refuses_a_supernode_count_the_protocol_cannot_use_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from veilface.cli.main import main

    work = tmp_path / "deploy"
    rc = main(["fed", "deploy-local", "--work-dir", str(work), "--run", "--supernodes", "2"])
    assert rc == 2
    assert "needs 4 SuperNodes" in capsys.readouterr().err
    assert not work.exists()  # nothing was started
