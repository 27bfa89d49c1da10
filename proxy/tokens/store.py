"""Where fetched tokens are kept so that every holder of the same credentials
uses one token. The memory store shares within one process; a store shared
across replicas implements the same two calls."""
from __future__ import annotations

from typing import Protocol

from .policy import Token


class TokenStore(Protocol):
    async def load(self, key: str) -> Token | None: ...

    async def save(self, key: str, token: Token) -> None: ...

    async def close(self) -> None: ...


class MemoryStore:
    def __init__(self) -> None:
        self._tokens: dict[str, Token] = {}

    async def load(self, key: str) -> Token | None:
        return self._tokens.get(key)

    async def save(self, key: str, token: Token) -> None:
        self._tokens[key] = token

    async def close(self) -> None:
        self._tokens.clear()
