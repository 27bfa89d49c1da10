"""The credential engine: the pure policy, the fetchers, the stores and the
manager that joins them; the kinds table (kinds.py) and Open Platform
credentials (platform.py)."""
from .fetchers import Fetched, FetchError, make_fetcher
from .manager import RefreshThrottled, TokenManager, TokenUnavailable
from .policy import FailureKind, Token, TokenState
from .store import MemoryStore, TokenStore

__all__ = [
    "FailureKind", "Fetched", "FetchError", "MemoryStore", "RefreshThrottled", "Token", "TokenManager",
    "TokenState", "TokenStore", "TokenUnavailable", "make_fetcher",
]
