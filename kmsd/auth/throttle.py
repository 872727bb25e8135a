"""Per-principal request rate limiting: one token bucket per caller.

Each principal's bucket holds at most `burst` tokens and refills at
`requests_per_second`; a request takes one token or is refused with
`ThrottlingError`, whose retry delay is when the next token will be there (sent
to the client as `google.rpc.RetryInfo`). The limit is per node, as a caller
spreading its load over the nodes is what the cluster is for. Buckets of callers
that went quiet are dropped, so memory stays bounded by the active callers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kmsd.errors import ThrottlingError

# Buckets full again for this long are forgotten (they would be full if recreated).
_IDLE_SWEEP_EVERY = 4096


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class RateLimiter:
    """Token buckets by principal; `rate <= 0` turns limiting off."""

    def __init__(
        self,
        requests_per_second: float,
        burst: int,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = requests_per_second
        self._burst = float(burst)
        self._now = monotonic
        self._buckets: dict[str, _Bucket] = {}
        self._calls = 0

    @property
    def enabled(self) -> bool:
        return self._rate > 0

    def take(self, principal: str) -> None:
        """Takes one token from the principal's bucket or raises ThrottlingError."""
        if self._rate <= 0:
            return
        now = self._now()
        self._calls += 1
        if self._calls % _IDLE_SWEEP_EVERY == 0:
            self._sweep(now)
        bucket = self._buckets.get(principal)
        if bucket is None:
            bucket = self._buckets[principal] = _Bucket(self._burst, now)
        else:
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
            bucket.updated = now
        if bucket.tokens >= 1.0 - 1e-9:  # float refill must not miss the promised token
            bucket.tokens -= 1.0
            return
        wait = (1.0 - bucket.tokens) / self._rate
        raise ThrottlingError(
            f"rate exceeded: at most {self._rate:g} requests per second per caller "
            f"(burst {int(self._burst)}); retry after {wait:.3f} s",
            retry_after_seconds=wait,
        )

    def _sweep(self, now: float) -> None:
        full_after = self._burst / self._rate
        idle = [p for p, b in self._buckets.items() if now - b.updated >= full_after]
        for principal in idle:
            del self._buckets[principal]

    def tracked(self) -> int:
        """How many callers have a bucket now (for tests and metrics)."""
        return len(self._buckets)
