"""Per-principal token buckets: burst, refill, isolation between callers, off switch."""

from __future__ import annotations

import pytest

from kmsd.api.status import to_rpc_status
from kmsd.auth.throttle import RateLimiter
from kmsd.errors import RESOURCE_EXHAUSTED, ThrottlingError


class _Time:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refused_with_the_wait_until_the_next_token() -> None:
    clock = _Time()
    limiter = RateLimiter(10, 3, monotonic=clock)
    for _ in range(3):
        limiter.take("alice")
    with pytest.raises(ThrottlingError) as refused:
        limiter.take("alice")
    assert refused.value.code == RESOURCE_EXHAUSTED
    assert refused.value.aws_exception == "ThrottlingException"
    assert refused.value.retry_after_seconds == pytest.approx(0.1)
    clock.now += 0.1
    limiter.take("alice")


def test_one_callers_burst_does_not_throttle_another() -> None:
    clock = _Time()
    limiter = RateLimiter(1, 2, monotonic=clock)
    limiter.take("alice")
    limiter.take("alice")
    with pytest.raises(ThrottlingError):
        limiter.take("alice")
    limiter.take("bob")


def test_refill_never_exceeds_the_burst() -> None:
    clock = _Time()
    limiter = RateLimiter(100, 2, monotonic=clock)
    limiter.take("alice")
    clock.now += 3600
    limiter.take("alice")
    limiter.take("alice")
    with pytest.raises(ThrottlingError):
        limiter.take("alice")


def test_zero_rate_turns_limiting_off() -> None:
    limiter = RateLimiter(0, 1, monotonic=_Time())
    assert not limiter.enabled
    for _ in range(1000):
        limiter.take("alice")
    assert limiter.tracked() == 0


def test_quiet_callers_are_forgotten() -> None:
    clock = _Time()
    limiter = RateLimiter(1000, 10, monotonic=clock)
    for n in range(5000):
        limiter.take(f"caller-{n}")
        clock.now += 0.001
    # Only callers seen within the last burst/rate = 10 ms can still be partly drained.
    assert limiter.tracked() < 5000


def test_throttling_maps_to_resource_exhausted_with_retry_info() -> None:
    status = to_rpc_status(ThrottlingError("slow down", retry_after_seconds=0.25))
    assert status.code == RESOURCE_EXHAUSTED
    kinds = [d.type_url.rpartition("/")[2] for d in status.details]
    assert "google.rpc.RetryInfo" in kinds and "google.rpc.ErrorInfo" in kinds
