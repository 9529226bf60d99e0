"""Access control for `ligero serve`: who may call it (API keys) and how often (a token-bucket rate limit).

Keys are bearer tokens from $LIGERO_API_KEYS and/or a file; none given turns auth off. The store keeps only a
fingerprint of a key (`store.key_fingerprint`), and no message here ever contains a presented key. The rate limit
counts requests per key, or per client address when auth is off. /health is always open (load balancers probe it);
/metrics needs a key when keys are on, unless the operator makes it public.
"""

from __future__ import annotations

import hmac
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from hashlib import sha256
from pathlib import Path

from ligero.errors import LigeroError
from ligero.serve.checks import is_int, is_number, one_line
from ligero.serve.store import key_fingerprint


class RateLimiter:
    """Token bucket per key; thread-safe.

    Each key's bucket holds up to `burst` tokens and refills at `per_minute` tokens a minute; a request takes
    one. Memory stays bounded: a bucket idle long enough to be full again is the same as no bucket, so it is
    forgotten, and beyond `max_keys` live buckets the least recently used ones are dropped (those keys start
    over with a full bucket).
    """

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10_000) -> None:
        if not is_number(per_minute) or per_minute <= 0:
            raise LigeroError(f"rate limit must be a number of requests per minute > 0, got {per_minute!r}")
        if not is_int(burst) or burst < 1:
            raise LigeroError(f"rate limit burst must be a whole number >= 1, got {burst!r}")
        self.per_second = per_minute / 60
        self.burst = burst
        self.clock = clock
        self.max_keys = max_keys
        self._refill_s = burst / self.per_second  # an empty bucket is full again after this long
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, time), LRU first
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """0.0 when the request may go ahead (it takes a token), else the seconds until a token is available
        (round up for a Retry-After header)."""
        with self._lock:
            now = self.clock()
            self._forget_idle(now)
            tokens, then = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.per_second)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / self.per_second
            self._buckets[key] = (tokens, now)  # re-inserted at the most recently used end
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return wait

    def _forget_idle(self, now: float) -> None:
        # Buckets are in order of last use, so the idle ones are at the front: O(1) per request on average.
        while self._buckets:
            _, then = next(iter(self._buckets.values()))
            if now - then < self._refill_s:
                break
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


# --- API keys --------------------------------------------------------------------------------------


class AuthError(LigeroError):
    """A request without a valid API key (the server answers 401). Its message never contains the key."""


BEARER_HELP = "send the header 'Authorization: Bearer <api key>'"


class ApiKeys:
    """Bearer-token auth. Keys come from an env variable (comma- or whitespace-separated) or a file (one key per
    line, # comments, blank lines ignored)."""

    def __init__(self, keys: list[str] | tuple[str, ...]) -> None:
        keys = list(dict.fromkeys(keys))  # drop duplicates, keep order
        if not keys or any(not isinstance(k, str) or not k or any(c.isspace() for c in k) for k in keys):
            raise LigeroError("API keys must be non-empty strings without whitespace; give at least one")
        # Compare sha256 digests: equal length whatever the key, so the comparison time says nothing about it.
        self._digests = [sha256(k.encode("utf-8")).digest() for k in keys]
        self._keys = keys

    @classmethod
    def load(cls, env_var: str = "LIGERO_API_KEYS", file: str | Path | None = None) -> ApiKeys | None:
        """Keys from $env_var and from `file` together; None (auth off) when neither names a key."""
        keys = re.split(r"[\s,]+", os.environ.get(env_var, "").strip())
        keys = [k for k in keys if k]
        if file is not None:
            path = Path(file)
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise LigeroError(f"API key file {path} cannot be read ({one_line(exc)}); give a UTF-8 text "
                                  "file with one key per line") from None
            from_file = []
            for n, line in enumerate(lines, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                if any(c.isspace() for c in line):  # the message gives the line, never the key
                    raise LigeroError(f"API key file {path} line {n} holds whitespace inside a key; put one key "
                                      "per line (comments on their own lines, starting with #)")
                from_file.append(line)
            if not from_file:
                raise LigeroError(f"API key file {path} holds no keys; put one key per line")
            keys += from_file
        return cls(keys) if keys else None

    def check(self, authorization: str | None) -> str:
        """The key presented in an Authorization header value; AuthError when it is missing, malformed or
        unknown."""
        if not authorization or not authorization.strip():
            raise AuthError(f"missing API key; {BEARER_HELP}")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
            raise AuthError(f"the Authorization header is not a bearer token; {BEARER_HELP}")
        presented = sha256(token.encode("utf-8")).digest()
        match = None
        for key, digest in zip(self._keys, self._digests):  # no early exit: every key costs the same time
            if hmac.compare_digest(digest, presented):
                match = key
        if match is None:
            raise AuthError("unknown API key; check the key, or ask the server's operator for one")
        return match

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:  # never print the keys themselves
        return f"ApiKeys({len(self)} keys)"


class AccessControl:
    """The server's access rules: `authenticate` a request's Authorization header, `retry_after` for its rate limit."""

    def __init__(self, keys: ApiKeys | None, limiter: RateLimiter | None, public_metrics: bool = False) -> None:
        self.keys, self.limiter, self.public_metrics = keys, limiter, public_metrics

    def authenticate(self, authorization: str | None) -> str | None:
        """The presented key's fingerprint, None when auth is off; AuthError when the key is missing or unknown."""
        if self.keys is None:
            return None
        return key_fingerprint(self.keys.check(authorization))

    def retry_after(self, key_id: str | None, client_host: str | None) -> float:
        """0.0 when the request may go ahead, else the seconds until the caller's bucket has a token again."""
        if self.limiter is None:
            return 0.0
        return self.limiter.acquire(key_id or client_host or "unknown")
