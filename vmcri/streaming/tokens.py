"""Single-use tokens that map a streaming URL to the CRI request that created it."""
from __future__ import annotations

import secrets
import threading
import time

DEFAULT_TTL_S = 60.0
DEFAULT_MAX_OUTSTANDING = 1000


class TokenCacheFull(Exception):
    pass


class TokenCache:
    def __init__(self, ttl: float = DEFAULT_TTL_S, max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
                 clock=time.monotonic):
        self.ttl = ttl
        self.max_outstanding = max_outstanding
        self._clock = clock
        self._lock = threading.Lock()
        self._items: dict[str, tuple[float, str, object]] = {}   # token -> (expiry, kind, request)

    def _expire_locked(self) -> None:
        now = self._clock()
        for tok in [t for t, (exp, _, _) in self._items.items() if exp <= now]:
            del self._items[tok]

    def insert(self, kind: str, request) -> str:
        """A fresh URL-safe token for `request`; TokenCacheFull when too many are outstanding."""
        with self._lock:
            self._expire_locked()
            if len(self._items) >= self.max_outstanding:
                raise TokenCacheFull(f"{len(self._items)} streaming requests are already outstanding")
            tok = secrets.token_urlsafe(24)
            self._items[tok] = (self._clock() + self.ttl, kind, request)
            return tok

    def consume(self, token: str, kind: str):
        """The request for `token` (removing it), or None if unknown, used, expired or of
        another kind."""
        with self._lock:
            item = self._items.pop(token, None)
        if item is None:
            return None
        expiry, k, request = item
        if expiry <= self._clock() or k != kind:
            return None
        return request

    def __len__(self) -> int:
        with self._lock:
            self._expire_locked()
            return len(self._items)
