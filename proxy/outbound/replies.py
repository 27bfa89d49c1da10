"""The credential answers the sidecar makes itself on the proxy port (tokens,
tickets, jssdk, a platform's tokens), and its own root there."""
from __future__ import annotations

from ..credentials import Token, TokenManager, TokenUnavailable
from ..http.replies import sidecar_error
from ..http.server import Reply

# The sidecar's own root on the proxy port: never forwarded (DESIGN.md).
SIDECAR_ROOT = "/sidecar"


async def held(manager: TokenManager) -> Token | Reply:
    """The credential a manager holds (fetched if there is none), or the
    503 that says why there is none."""
    try:
        return manager.current() or await manager.get()
    except TokenUnavailable as exc:
        return sidecar_error(503, str(exc))
