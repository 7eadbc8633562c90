"""KeepaliveWatch: a peer that stops answering keepalives is declared dead and its connection closed."""

from __future__ import annotations

import threading
import time

from drtool.transport.keepalive import KEEPALIVE_REQUEST, KeepaliveWatch, lost_reason


class FakeTransport:
    """What the watch needs of paramiko's Transport; answers keepalives until `silent` is set."""

    def __init__(self) -> None:
        self.active = True
        self.silent = threading.Event()
        self.asked: list[tuple[str, bool]] = []
        self.closed_at: float | None = None

    def is_active(self) -> bool:
        return self.active

    def global_request(self, kind: str, data: object = None, wait: bool = True) -> object:
        self.asked.append((kind, wait))
        while self.silent.is_set() and self.active:  # as paramiko: returns only on an answer or the end
            time.sleep(0.01)
        return None  # sshd's REQUEST_FAILURE: an answer all the same

    def close(self) -> None:
        self.closed_at = time.monotonic()
        self.active = False


def test_a_peer_that_stops_answering_is_declared_dead_after_interval_times_count() -> None:
    transport = FakeTransport()
    watch = KeepaliveWatch(transport, 0.1, 3, "h").start()  # type: ignore[arg-type]  # a fake transport
    time.sleep(0.5)
    assert transport.active and len(transport.asked) >= 1  # answered keepalives keep it open
    assert transport.asked[0] == (KEEPALIVE_REQUEST, True)  # want-reply: an answer is what is counted
    transport.silent.set()
    silent_from = time.monotonic()
    deadline = silent_from + 5
    while transport.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert transport.closed_at is not None
    assert 0.3 - 0.05 <= transport.closed_at - silent_from <= 0.4 + 1.0  # interval*count .. *(count+1), slack
    assert lost_reason(transport) == watch.dead_reason  # type: ignore[arg-type]
    assert "no answer to 3 keepalives in 0.3 s" in (watch.dead_reason or "")


def test_a_connection_closed_by_drtool_is_not_reported_as_dead() -> None:
    transport = FakeTransport()
    watch = KeepaliveWatch(transport, 0.05, 2, "h").start()  # type: ignore[arg-type]  # a fake transport
    time.sleep(0.1)
    transport.close()
    time.sleep(0.3)
    assert watch.dead_reason is None and lost_reason(transport) is None  # type: ignore[arg-type]
