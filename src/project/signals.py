"""SIGINT (Ctrl+C) and SIGTERM for the whole of a command: noted, and acted on where what a run has done can be kept."""

import os
import signal

from project.errors import ProjectError


class Interrupted(ProjectError):
    """Stopped by SIGINT or SIGTERM at a point where what the run has done is kept."""

    label = ""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """SIGINT (Ctrl+C) and SIGTERM for the whole of a command: the first is noted, and the run stops at the next point
    where what it has done can be kept (:class:`SafeModelCheckpoint` decides where); a second quits at once."""

    signum: int | None = None
    pid: int | None = None

    def __enter__(self):
        StopSignals.signum, StopSignals.pid = None, os.getpid()
        self.previous = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    @staticmethod
    def _note(signum: int, frame) -> None:
        # DataLoader workers inherit this handler, and a terminal's Ctrl+C reaches them too: they keep serving
        # batches, silently, until the run that owns them stops
        if os.getpid() != StopSignals.pid:
            return
        name = signal.Signals(signum).name
        if StopSignals.signum is not None:
            os.write(2, f"\n{name} again: quitting now, without saving.\n".encode())
            os._exit(128 + signum)
        StopSignals.signum = signum
        # os.write, not print: a handler that prints can interrupt a print in progress
        os.write(2, f"\n{name}: stopping at the next point the run can be kept ({name} again quits now).\n".encode())
