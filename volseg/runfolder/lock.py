"""The run folder's lock: one training process writes a run folder at a time."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

from .errors import RunLockedError

log = logging.getLogger(__name__)

__all__ = ["RunLock"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive ``fcntl.flock`` on ``RUN/.lock`` holding ``{"pid", "host", "started"}``.

    The kernel drops a flock when its process dies, so a lock file left by a killed run is free
    and is taken over (with a warning naming the dead holder); a live holder is refused with
    :class:`RunLockedError`. Linux/macOS only (fcntl)."""

    def __init__(self, run: Path):
        self.path = Path(run) / ".lock"
        self._fd: Optional[int] = None

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            h = self._holder()
            raise RunLockedError(
                f"{self.path.parent} is in use by another volseg train (pid {h.get('pid', '?')} on host {h.get('host', '?')}, "
                f"started {h.get('started', '?')}); wait for it to finish or choose another --output."
            ) from None
        stale = self._holder()
        if stale.get("pid"):
            alive = stale.get("host") == socket.gethostname() and _pid_alive(int(stale["pid"]))
            log.warning("%s: taking over a stale lock left by pid %s on host %s (started %s%s)", self.path, stale.get("pid"),
                        stale.get("host"), stale.get("started"), "" if not alive else "; that pid now belongs to another process")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        os.ftruncate(self._fd, 0)  # an empty lock file is not stale
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

