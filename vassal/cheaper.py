"""Cheaper: how many workers a vassal runs, between ``cheaper`` (minimum)
and ``processes`` (maximum).

Every second the app master samples each worker's RSS (on a timer, so idle
workers' figures stay current, unlike uWSGI's sample at request end) and how
many are busy, and decides:

- total RSS above ``cheaper-rss-limit-hard``: remove a worker, even if busy
  ones would ask for more (never below the minimum);
- all workers busy (or connections waiting in the listen queue): add
  ``cheaper-step`` workers, unless the total RSS is at or above
  ``cheaper-rss-limit-soft``;
- workers idle for IDLE_CYCLES samples in a row: remove one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

IDLE_CYCLES = 3


@dataclass
class Decision:
    action: str  # "spawn", "remove", "hold"
    count: int
    reason: str
    at: float = field(default_factory=time.time)


class Cheaper:
    def __init__(self, minimum: int, maximum: int, initial: int | None, step: int,
                 soft: int | None, hard: int | None):
        self.minimum = max(1, minimum)
        self.maximum = max(self.minimum, maximum)
        self.initial = min(self.maximum, max(self.minimum, initial or self.minimum))
        self.step = max(1, step)
        self.soft = soft
        self.hard = hard
        self.idle_cycles = 0
        self.last: Decision | None = None

    def decide(self, alive: int, busy: int, backlog: int, total_rss: int) -> Decision:
        if self.hard and total_rss > self.hard and alive > self.minimum:
            decision = Decision("remove", 1, f"total RSS {total_rss} > cheaper-rss-limit-hard {self.hard}")
            self.idle_cycles = 0
        elif alive < self.minimum:
            decision = Decision("spawn", self.minimum - alive, "below the minimum")
        elif (busy >= alive or backlog > 0) and alive < self.maximum:
            if self.soft and total_rss >= self.soft:
                decision = Decision("hold", 0, f"busy, but total RSS {total_rss} >= cheaper-rss-limit-soft {self.soft}")
            else:
                decision = Decision("spawn", min(self.step, self.maximum - alive),
                                    f"{busy}/{alive} busy, backlog {backlog}")
            self.idle_cycles = 0
        elif busy < alive and alive > self.minimum:
            self.idle_cycles += 1
            if self.idle_cycles >= IDLE_CYCLES:
                self.idle_cycles = 0
                decision = Decision("remove", 1, f"{alive - busy} idle for {IDLE_CYCLES}s")
            else:
                decision = Decision("hold", 0, "idle workers, waiting")
        else:
            self.idle_cycles = 0
            decision = Decision("hold", 0, "steady")
        if decision.action != "hold" or self.last is None or self.last.reason != decision.reason:
            self.last = decision
        return decision
