"""QmpSession.execute_many: several commands in one round trip, answered in order."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from drtool.errors import QmpError
from drtool.transport.qmp import QmpSession


def serve(sock: socket.socket, batch: int, seen: list[str]) -> None:
    """A QMP monitor that answers nothing until `batch` commands have arrived (after capabilities)."""
    decoder, buffer = json.JSONDecoder(), ""

    def say(msg: dict) -> None:
        sock.sendall(json.dumps(msg).encode() + b"\r\n")

    def hear() -> dict | None:  # QMP's JSON stream: no line breaks needed between messages
        nonlocal buffer
        while True:
            try:
                msg, end = decoder.raw_decode(buffer.lstrip())
            except ValueError:
                data = sock.recv(4096)
                if not data:
                    return None
                buffer += data.decode()
                continue
            buffer = buffer.lstrip()[end:]
            return msg

    say({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}})
    first = hear()
    assert first is not None
    say({"return": {}, **({"id": first["id"]} if "id" in first else {})})
    while True:
        waiting = []
        for _ in range(batch):
            msg = hear()
            if msg is None:
                return
            waiting.append(msg)
        for msg in waiting:
            seen.append(msg["execute"])
            if msg["execute"] == "bad":
                say({"error": {"class": "GenericError", "desc": "no such thing"}, "id": msg["id"]})
            else:
                say({"return": msg["execute"].upper(), "id": msg["id"]})


@pytest.fixture
def session_and_seen() -> tuple[QmpSession, list[str]]:
    ours, theirs = socket.socketpair()
    seen: list[str] = []
    threading.Thread(target=serve, args=(theirs, 2, seen), daemon=True).start()
    return QmpSession("test", lambda: ours, timeout=5).connect(), seen


def test_commands_go_out_together_and_come_back_in_order(session_and_seen: tuple[QmpSession, list[str]]) -> None:
    qmp, seen = session_and_seen
    # the monitor answers only once both arrived: one after the other would time out
    assert qmp.execute_many([("query-a", None), ("query-b", {"flat": True})]) == ["QUERY-A", "QUERY-B"]
    assert seen == ["query-a", "query-b"]
    qmp.close()


def test_a_refused_command_raises_as_execute_would(session_and_seen: tuple[QmpSession, list[str]]) -> None:
    qmp, seen = session_and_seen
    with pytest.raises(QmpError, match="no such thing"):
        qmp.execute_many([("bad", None), ("query-b", None)])
    assert seen == ["bad", "query-b"]  # the later one ran all the same
    qmp.close()
