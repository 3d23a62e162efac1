"""The embedded broker with the faults the reliability tests inject (never used by the service)."""

from __future__ import annotations

import signal
import time

from streaming.broker import EmbeddedBroker


class ControllableBroker(EmbeddedBroker):
    """An :class:`EmbeddedBroker` that can be restarted (memory wiped), frozen and resumed."""

    def restart(self, down_s: float = 0.0) -> ControllableBroker:
        """Stop, stay down ``down_s`` seconds, start again on the same port (topics come back empty)."""
        self.stop()
        time.sleep(down_s)
        self.start()
        return self

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): an outage that keeps its topics, like a network partition."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)
