"""Stop signals: SIGTERM and SIGINT ask the loop to stop after its step, never in the middle of one."""
from __future__ import annotations

import signal


class StopSignals:
    """SIGTERM / SIGINT set loop.stop_signal; the loop finishes its step and checkpoints. `loop`: anything
    with a stop_signal attribute (harness.loop.Loop)."""

    def __init__(self, loop):
        self.loop = loop

    def __enter__(self):
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.loop.stop_signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
