"""CPU seconds of the server's own threads, by what they do: the split a throughput figure hides.

A forward beside HTTP, JSON and tokenising shares the same cores: on a CPU the host's work
takes cycles from the forwards; on a GPU one busy event loop starves the device. The
process's total (`process_cpu_seconds_total`) cannot say which, so each group of threads
(the event loop, the tokenizer threads, each device's workers) is read from its threads'
own CPU clocks at scrape time: nothing is timed on the scoring path.

A thread's clock is taken by the thread itself (`own_cpu_clock`), while it surely runs; on
Linux the clock names the kernel thread, so reading it after the thread ended fails
cleanly (the thread's seconds then drop out of its group). Where threads have no CPU clocks
(not POSIX) the metric has no samples. Helper threads that a library starts itself
(OpenMP's team when a forward runs on several threads) are not in any group.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

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


def clock_seconds(clock: int) -> float:
    """CPU seconds on a thread's clock; 0 once the thread has ended."""
    try:
        return time.clock_gettime(clock)
    except OSError:
        return 0.0


class ThreadCpu(Collector):
    """`alarm_thread_cpu_seconds_total{threads=...}`: each watched group's CPU seconds."""

    def __init__(self) -> None:
        self._groups: dict[str, Callable[[], Sequence[int]]] = {}

    def watch(self, group: str, clocks: Callable[[], Sequence[int]]) -> None:
        """Report `group` as the sum of `clocks()` (thread clock ids, read at each scrape)."""
        self._groups[group] = clocks

    def seconds(self, group: str) -> float:
        return sum(clock_seconds(clock) for clock in self._groups[group]())

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "alarm_thread_cpu_seconds",
            "CPU seconds of the server's threads, by group: event_loop (HTTP, JSON, "
            "batching), tokenize, device:<device> (forwards)",
            labels=["threads"],
        )
        for group in list(self._groups):
            family.add_metric([group], self.seconds(group))
        yield family
