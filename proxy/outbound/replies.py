"""The credential answers the sidecar makes itself on the proxy port (tokens,
tickets, jssdk, a platform's tokens), and its own root there."""
from __future__ import annotations

from typing import Mapping, TypeVar

from ..credentials import Token, TokenManager, TokenUnavailable
from ..http.replies import sidecar_error
from ..http.server import Reply

# The sidecar's own root on the proxy port: never forwarded (DESIGN.md).
SIDECAR_ROOT = "/sidecar"

T = TypeVar("T")


def named(table: Mapping[str, T], given: str, what: str, where: str = "") -> T | Reply:
    """What a caller named (an app in X-WeChat-App, a merchant), or the 400
    that lists what is configured."""
    found = table.get(given.strip())
    if found is None:
        return sidecar_error(400, f"unknown {what} {given.strip()[:64]!r}{where} (configured: {', '.join(table)})")
    return found


async def held(manager: TokenManager) -> Token | Reply:
    """The credential a manager holds (fetched if there is none), or the
    503 that says why there is none."""
    try:
        return manager.current() or await manager.get()
    except TokenUnavailable as exc:
        return sidecar_error(503, str(exc))
