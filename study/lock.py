"""One `s4l study` at a time per work folder.

The ledger lives in the report JSON, which a running study rewrites after every run from what it
read at start-up plus its own runs; a second process on the same study would train the runs the
first is training (two writers of one checkpoint) and its report would drop the first one's
finished records. An advisory lock (flock) on `<workdir>/.study.lock` refuses the second process
with one clear line. The kernel releases the lock with its holder, however it ends (SIGKILL, OOM,
a lost session), so a stale lock cannot outlive a killed study.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
from collections.abc import Iterator
from pathlib import Path

from s4l.errors import UserError

LOCK_NAME = ".study.lock"


@contextlib.contextmanager
def study_lock(workdir: Path) -> Iterator[None]:
    """Hold the work folder's study lock for the `with` block, or raise UserError at once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks, run unguarded
        yield
        return
    Path(workdir).mkdir(parents=True, exist_ok=True)
    path = Path(workdir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "a process"
            raise UserError(
                f"another `s4l study` is running in {workdir} ({holder}); two at once would "
                "train the same runs and overwrite each other's report. Wait for it, or stop it "
                "(its runs resume from their checkpoints); --dry-run and --report-only do not "
                "need the lock") from None
        since = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}, since {since}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def holder(workdir: Path) -> tuple[int, str] | None:
    """(pid, host) of the `s4l study` holding the work folder's lock, or None when none does."""
    try:
        import fcntl
    except ImportError:
        return None
    path = Path(workdir) / LOCK_NAME
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            words = os.pread(fd, 512, 0).decode("utf-8", "replace").split()
            if len(words) >= 4 and words[0] == "pid" and words[1].isdigit():
                return int(words[1]), words[3].rstrip(",")
            return None
        return None  # we could take it: nobody holds it
    finally:
        os.close(fd)
