"""Ports for servers a test or benchmark starts later (often in a subprocess).

Taken from below the kernel's ephemeral range, so no outgoing connection or
port-0 bind can take one between now and the bind, and never the same one
twice in a run. Shared by tests/ and bench/ (imports nothing from pytest)."""
from __future__ import annotations

import random
import socket
from pathlib import Path

_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(also: int = 0) -> int:
    """A free port; with `also`, one whose port + `also` is free too (a
    Redis Cluster node listens on its port + 10000 for the cluster bus)."""
    high = min(_ephemeral_low(), 65536) - 1 - also
    low = max(10000, min(high - 5000, _ephemeral_low() - 1 - 15000))
    for _ in range(1000):
        port = random.randint(low, high)
        pair = (port, port + also) if also else (port,)
        if any(p in _HANDED_OUT for p in pair) or not all(_bindable(p) for p in pair):
            continue
        _HANDED_OUT.update(pair)
        return port
    raise RuntimeError("no free port below the ephemeral range")
