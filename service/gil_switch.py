"""The GIL's switch interval while an engine serves (`batching.gil_switch_interval_ms`).

PyTorch lets go of the GIL in every op a forward calls from Python and takes it back
after; while the event loop holds it, each return may wait up to the switch interval.
Process-wide, so the interval the process had is kept and given back exactly once.
"""

from __future__ import annotations

import sys


class SwitchInterval:
    """Set an interval and restore the one found before it, however often either is called."""

    def __init__(self) -> None:
        self._before: float | None = None

    def apply(self, milliseconds: float | None) -> None:
        """None leaves the interval alone."""
        if milliseconds is None:
            return
        if self._before is None:  # applied twice: keep the interval found the first time
            self._before = sys.getswitchinterval()
        sys.setswitchinterval(milliseconds / 1000)

    def restore(self) -> None:
        if self._before is not None:
            sys.setswitchinterval(self._before)
            self._before = None
