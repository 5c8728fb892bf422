"""PeerWatchdog in one process: real TCPStore, real threads, a peer that goes silent."""

from __future__ import annotations

import socket
import time

import torch.distributed as dist

from pipefit.run.watchdog import PeerWatchdog


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pair(port: int, verdicts: dict[int, str], timeout_s: float = 1.0) -> list[PeerWatchdog]:
    return [
        PeerWatchdog(
            r,
            2,
            "127.0.0.1",
            port,
            interval_s=0.1,
            timeout_s=timeout_s,
            on_lost=lambda m, r=r: verdicts.setdefault(r, m),
        ).start()
        for r in range(2)
    ]


def test_silent_peer_is_named_within_the_timeout():
    port = _free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    verdicts: dict[int, str] = {}
    a, b = _pair(port, verdicts)
    time.sleep(0.5)
    assert verdicts == {}  # both beating: nobody is lost
    b._stop.set()  # rank 1 dies: stops beating without saying it is done
    b._thread.join()
    started = time.monotonic()
    assert a.wait_for_verdict(5.0) is not None
    assert time.monotonic() - started < 2.5
    assert "rank 1 stopped responding (no heartbeat for 1 s)" in verdicts[0]
    assert verdicts[0].startswith("rank 0: ")
    a.stop()
    del master


def test_finished_peer_is_not_declared_lost():
    port = _free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    verdicts: dict[int, str] = {}
    a, b = _pair(port, verdicts)
    b.stop()  # rank 1 finished normally and said so
    time.sleep(1.8)
    assert verdicts == {}
    a.stop()
    del master


def test_lost_store_is_reported():
    port = _free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    verdicts: dict[int, str] = {}
    (a,) = [PeerWatchdog(0, 1, "127.0.0.1", port, 0.1, 1.0, on_lost=lambda m: verdicts.setdefault(0, m)).start()]
    del master  # the node hosting the store is gone
    assert a.wait_for_verdict(8.0) is not None
    assert "lost contact with the rendezvous store at 127.0.0.1" in verdicts[0]
    a.stop()
