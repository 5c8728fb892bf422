"""Peer heartbeats: when a rank dies or a node is lost, every other rank ends within a bound.

Each rank runs a daemon thread that bumps its own counter in the rendezvous store every
``interval_s`` and reads everyone else's. A rank whose counter has not moved for ``timeout_s``
(or a store that cannot be reached for that long, i.e. the node hosting it is gone) is declared
lost: this rank prints one line naming it and exits non-zero at once, even if its main thread is
blocked inside a collective that would otherwise wait for the process-group timeout. A rank that
finishes normally marks itself done first, so a peer that is merely slower at the end is not
mistaken for a lost one.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

EXIT_PEER_LOST = 3


class PeerWatchdog:
    def __init__(
        self,
        rank: int,
        world_size: int,
        host: str,
        port: int,
        interval_s: float,
        timeout_s: float,
        describe: Callable[[int], str] = lambda r: f"rank {r}",
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.host = host
        self.port = port
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.describe = describe
        self.on_lost = on_lost or _exit_lost
        self._stop = threading.Event()
        self._verdict = threading.Event()
        self._thread: threading.Thread | None = None
        self._store = None
        self._lock = threading.Lock()  # the thread and the main thread share one store client
        self.verdict: str | None = None

    def _key(self, kind: str, rank: int) -> str:
        return f"pipefit/{kind}/{rank}"

    def start(self) -> PeerWatchdog:
        import torch.distributed as dist

        self._store = dist.TCPStore(
            self.host,
            self.port,
            is_master=False,
            timeout=timedelta(seconds=max(self.interval_s * 2, 2.0)),
            wait_for_workers=False,
        )
        self._store.add(self._key("hb", self.rank), 1)
        self._thread = threading.Thread(target=self._run, name="pipefit-peer-watchdog", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        store = self._store
        now = time.monotonic()
        last_value = {r: -1 for r in range(self.world_size) if r != self.rank}
        last_change = {r: now for r in last_value}
        store_ok_at = now
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                with self._lock:
                    store.add(self._key("hb", self.rank), 1)
                    for r in last_value:
                        if store.add(self._key("done", r), 0) > 0:
                            last_change[r] = now
                            continue
                        value = store.add(self._key("hb", r), 0)
                        if value != last_value[r]:
                            last_value[r], last_change[r] = value, now
                store_ok_at = now
            except Exception:  # noqa: BLE001 - an unreachable store is itself the signal
                if now - store_ok_at > self.timeout_s:
                    self._declare(
                        f"lost contact with the rendezvous store at {self.host}:{self.port} for "
                        f"{now - store_ok_at:.0f} s: the node hosting it (machine rank 0) is gone"
                    )
                    return
                continue
            if self._stop.is_set():
                return
            stale = [r for r, t in last_change.items() if now - t > self.timeout_s]
            if stale:
                names = ", ".join(self.describe(r) for r in stale)
                self._declare(f"{names} stopped responding (no heartbeat for {self.timeout_s:.0f} s)")
                return

    def _declare(self, message: str) -> None:
        self.verdict = f"{self.describe(self.rank)}: {message}; ending this rank"
        self._verdict.set()
        self.on_lost(self.verdict)

    def mark_failed(self) -> None:
        """Tell the peers this rank ends on an error of its own (theirs that follow are its echo)."""
        if self._store is not None:
            try:
                with self._lock:
                    self._store.add(self._key("failed", self.rank), 1)
            except Exception:  # noqa: BLE001 - a peer then learns of it from the missing heartbeat
                pass

    def failed_peer(self) -> int | None:
        """The first other rank that marked itself failed, if any."""
        if self._store is None:
            return None
        for r in range(self.world_size):
            try:
                with self._lock:
                    if r != self.rank and self._store.add(self._key("failed", r), 0) > 0:
                        return r
            except Exception:  # noqa: BLE001 - an unreachable store says nothing about peers' errors
                return None
        return None

    def wait_for_verdict(self, timeout_s: float) -> str | None:
        """After a communication error in the main thread: give the watchdog time to name the lost rank."""
        self._verdict.wait(timeout_s)
        return self.verdict

    def stop(self) -> None:
        """Mark this rank done (peers stop watching it) and end the thread."""
        self._stop.set()
        if self._store is not None:
            try:
                self._store.add(self._key("done", self.rank), 1)
            except Exception:  # noqa: BLE001 - the store may already be gone at teardown
                pass
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s * 4)
        self._store = None


def _exit_lost(message: str) -> None:
    print(f"pipefit: error: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)
