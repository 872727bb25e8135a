"""Time as a parameter: the production clock and a fake one for tests.

Everything that stamps a command (creation dates, deletion dates, rotation
dates) or decides that time-driven work is due asks a `Clock`, so tests can
move time forward by days without waiting.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Wall-clock time in milliseconds since the Unix epoch."""

    def now_ms(self) -> int: ...


class SystemClock:
    """The real wall clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start_ms: int = 1_767_225_600_000) -> None:  # 2026-01-01T00:00:00Z
        self._now_ms = start_ms

    def now_ms(self) -> int:
        return self._now_ms

    def advance(self, *, days: float = 0, seconds: float = 0) -> None:
        self._now_ms += int(days * 86_400_000 + seconds * 1000)
