"""CPU seconds of the server's own threads, by what they do: the split a throughput figure hides.

A forward beside HTTP, JSON and tokenising shares the same cores: on a CPU the host's work
takes cycles from the forwards; on a GPU one busy event loop starves the device. The
process's total cannot say which, so each group of threads (the event loop, the tokenizer
threads, each device's workers) is read from its threads' own CPU clocks at scrape time:
nothing is timed on the scoring path.

A thread's clock id is taken by the thread itself, while it surely runs, and read only
while the thread is known to be alive (`WorkerThreads` banks a thread's seconds as it ends,
so a group's count never goes down). Where threads have no CPU clocks (not POSIX) a group
reads 0. Threads that a library starts itself (OpenMP's team when a forward runs on several
threads) are in no group.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


def own_cpu_clock() -> int | None:
    """The calling thread's CPU-time clock id, or None where the platform has none."""
    getter = getattr(time, "pthread_getcpuclockid", None)
    if getter is None:
        return None
    try:
        return int(getter(threading.get_ident()))
    except OSError:
        return None


def clock_seconds(clock: int | None) -> float:
    """CPU seconds on a thread's clock (0 without one). Read only while the thread lives."""
    if clock is None:
        return 0.0
    try:
        return time.clock_gettime(clock)
    except OSError:  # the thread has ended after all: its seconds are unknown here
        return 0.0


class ThreadCpu(Collector):
    """One counter family, one sample per watched group of threads."""

    def __init__(self, name: str, documentation: str) -> None:
        self._name = name
        self._documentation = documentation
        self._groups: dict[str, Callable[[], float]] = {}

    def watch(self, group: str, seconds: Callable[[], float]) -> None:
        """Report `group` as `seconds()`, called at each scrape."""
        self._groups[group] = seconds

    def seconds(self, group: str) -> float:
        """A group's CPU seconds now (what a scrape reports)."""
        return self._groups[group]()

    def describe(self) -> Iterator[CounterMetricFamily]:
        """The family without samples: the registry reserves its name from it."""
        yield self._family()

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = self._family()
        for group, seconds in list(self._groups.items()):
            family.add_metric([group], seconds())
        yield family

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._documentation, labels=["threads"])
