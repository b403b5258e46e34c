"""One writer per run folder: a lock held while a process writes the folder.

The lock is an flock on RUN/.lock. The kernel releases it when its holder exits, however it exits
(kill -9 included), so a lock left by a dead process is simply taken by the next writer: there is
no process id to check and no stale lock to break. The file holds the holder's process id, host
and start time, which the message refusing a second writer names. The holder removes the file
when it is done, so a finished run folder holds only what the run wrote.
"""
import contextlib
import datetime
import fcntl
import json
import os
import socket

LOCK_FILE = ".lock"


@contextlib.contextmanager
def hold(run_dir):
    """Holds the lock of `run_dir` (created if missing) for the duration of the block.

    A folder this call created and that is still empty when the block ends is removed again, so a
    run refused before it wrote anything leaves nothing behind.

    Raises:
      ValueError naming the folder and the process that holds its lock.
    """
    run_dir = os.fspath(run_dir)
    created = not os.path.isdir(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_FILE)
    fd = _acquire(path, run_dir)
    try:
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode())
        yield
    finally:
        os.remove(path)  # before unlocking: whoever opened this file meanwhile sees it gone (_acquire)
        os.close(fd)
        if created and not os.listdir(run_dir):
            os.rmdir(run_dir)


def _acquire(path, run_dir):
    """An open descriptor of `path`, exclusively flocked."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ValueError(f"run folder {run_dir} is being written by {holder}; wait for it to finish, or "
                             f"write to another folder") from None
        if _is_current(fd, path):
            return fd
        os.close(fd)  # its holder removed it as we locked it: lock the file that now stands there


def _is_current(fd, path):
    """True if `fd` is the file at `path` now, not one removed since it was opened."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def _holder(fd):
    """'process <pid> on <host> (started <time>)' from a held lock file."""
    try:
        d = json.loads(os.pread(fd, 4096, 0).decode())
        return f"process {d['pid']} on {d['host']} (started {d['started']})"
    except (ValueError, KeyError, TypeError):  # it has locked the file and not yet written to it
        return "another process (which has not yet recorded its id)"
