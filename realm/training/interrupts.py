"""Holding Ctrl-C and SIGTERM while a training step is committed.

A step is committed in several writes: the optimizer's update, the hooks that follow it (the
refresher's snapshot), the step's metrics record. An interrupt between them would checkpoint a
step whose record (or snapshot) was never written, and the resumed run would lack it. While held,
SIGINT and SIGTERM are noted, not acted on; on release the first one noted goes to the handler
that was installed before (Python's ``KeyboardInterrupt``, the command line's SIGTERM handler,
or the default action).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class InterruptHold:
    """``hold()`` ... ``release()`` around a step's commit; a no-op off the main thread."""

    def __init__(self) -> None:
        self._saved: dict[int, Any] = {}
        self._pending: list[tuple[int, Any]] = []

    def _note(self, signum, frame) -> None:
        self._pending.append((signum, frame))

    def hold(self) -> None:
        if self._saved or threading.current_thread() is not threading.main_thread():
            return
        self._saved = {sig: signal.getsignal(sig) for sig in _SIGNALS}
        for sig in _SIGNALS:
            signal.signal(sig, self._note)

    def release(self, deliver: bool = True) -> None:
        """Restore the handlers; with ``deliver``, act now on the first signal noted meanwhile
        (``deliver=False`` on the way out of an exception: the run is stopping anyway)."""
        saved, self._saved = self._saved, {}
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        pending, self._pending = self._pending, []
        if not (deliver and pending and saved):
            return
        signum, frame = pending[0]
        handler = saved[signum]
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
        # SIG_IGN (or a handler installed outside Python): nothing to do
