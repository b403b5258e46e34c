"""Throttling for callbacks of long work: progress lines, and saving partial results."""
import time

PROGRESS_S = 5.0  # seconds between progress lines of long library calls


def throttled(report, seconds=PROGRESS_S):
    """A callback(done, total, *more) that calls report(done, total, *more) at most every
    `seconds`, and whenever done reaches total."""
    last = [time.monotonic()]

    def callback(done, total, *more):
        if done == total or time.monotonic() - last[0] >= seconds:
            last[0] = time.monotonic()
            report(done, total, *more)
    return callback
