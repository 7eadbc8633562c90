"""A server that refuses a channel (sshd past its MaxSessions) is asked again, on another connection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import paramiko
import pytest

from drtool.domain import Host
from drtool.errors import HostUnreachable
from drtool.transport.ssh import CHANNEL_ATTEMPTS, Endpoint, SshConnection


class FakeChannel:
    closed = False


class FakeTransport:
    def __init__(self, allowed: int) -> None:
        self.allowed = allowed  # sessions this connection's server grants before it refuses
        self.opened: list[FakeChannel] = []

    def is_active(self) -> bool:
        return True

    def open_session(self, timeout: float | None = None) -> FakeChannel:
        if len(self.opened) >= self.allowed:
            raise paramiko.ChannelException(2, "Connect failed")
        self.opened.append(FakeChannel())
        return self.opened[-1]


class FakeClient:
    def __init__(self, allowed: int) -> None:
        self.transport = FakeTransport(allowed)

    def get_transport(self) -> FakeTransport:
        return self.transport

    def close(self) -> None:
        pass


class StingyServer(SshConnection):
    """Each new connection allows `allowed` sessions (sshd's MaxSessions lowered to it)."""

    def __init__(self, allowed: int) -> None:
        super().__init__(Host("dr", "192.0.2.1"), Endpoint("192.0.2.1", 22, "root", (), (Path("/dev/null"),)))
        self.allowed = allowed
        self.clients: list[FakeClient] = []

    def _open(self) -> Any:
        self.clients.append(FakeClient(self.allowed))
        return self.clients[-1]


def test_a_refused_channel_is_asked_for_again_on_another_connection() -> None:
    conn = StingyServer(allowed=3)
    channels = [conn._session() for _ in range(7)]  # 8 per connection assumed, 3 granted
    assert len(channels) == 7 and len(conn.clients) == 3  # 3 + 3 + 1: refusals cost nothing but a retry
    assert [len(c.transport.opened) for c in conn.clients] == [3, 3, 1]


def test_a_server_that_refuses_every_channel_is_said_so() -> None:
    conn = StingyServer(allowed=0)
    with pytest.raises(HostUnreachable, match=f"dr refused {CHANNEL_ATTEMPTS} SSH channels in a row") as err:
        conn._session()
    assert "MaxSessions" in (err.value.hint or "")
