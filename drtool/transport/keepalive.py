"""ServerAliveInterval and ServerAliveCountMax for a paramiko connection, as OpenSSH's client has them.

paramiko's own keepalive (Transport.set_keepalive) sends requests that want
no reply: it keeps NAT state fresh but never notices a dead peer. drtool's
watch asks `keepalive@openssh.com` with want-reply set (sshd answers any
request it does not know with a failure, which is an answer) every
`interval` seconds, one request at a time. A request unanswered for
`interval * count_max` seconds stands for `count_max` unanswered keepalives:
the peer is declared dead and the connection closed, so every command and
stream on it fails at once instead of hanging. As with OpenSSH, that is at
most interval * (count_max + 1) seconds after the last answer.
"""

from __future__ import annotations

import threading
import time
import weakref

import paramiko

KEEPALIVE_REQUEST = "keepalive@openssh.com"

_watches: weakref.WeakKeyDictionary[paramiko.Transport, KeepaliveWatch] = weakref.WeakKeyDictionary()


class KeepaliveWatch:
    """Closes `transport` when its peer stops answering keepalives."""

    def __init__(self, transport: paramiko.Transport, interval: float, count_max: int, name: str) -> None:
        self.transport = transport
        self.interval = interval
        self.count_max = count_max
        self.dead_reason: str | None = None
        self._thread = threading.Thread(target=self._watch, name=f"keepalive-{name}", daemon=True)

    def start(self) -> KeepaliveWatch:
        _watches[self.transport] = self
        self._thread.start()
        return self

    def _watch(self) -> None:
        while True:
            time.sleep(self.interval)
            if not self.transport.is_active():
                return
            answered, finished = threading.Event(), threading.Event()
            threading.Thread(target=self._ask, args=(answered, finished), daemon=True,
                             name=f"{self._thread.name}-ask").start()
            finished.wait(self.interval * self.count_max)
            if not self.transport.is_active():
                return
            if not answered.is_set():
                self.dead_reason = (f"no answer to {self.count_max} keepalives in {self.interval * self.count_max:g} s "
                                    f"(ServerAliveInterval {self.interval:g}, ServerAliveCountMax {self.count_max})")
                self.transport.close()
                return

    def _ask(self, answered: threading.Event, finished: threading.Event) -> None:
        try:
            self.transport.global_request(KEEPALIVE_REQUEST, wait=True)
            if self.transport.is_active():  # global_request also returns when the connection ended
                answered.set()
        except (paramiko.SSHException, OSError, EOFError):
            pass
        finally:
            finished.set()


def lost_reason(transport: paramiko.Transport | None) -> str | None:
    """Why a connection that drtool did not close ended, when its keepalive watch closed it."""
    watch = _watches.get(transport) if transport is not None else None
    return watch.dead_reason if watch is not None else None
