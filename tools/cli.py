"""What every mess-tf CLI shares: run an absl main, turning expected errors into one clear line.

Bad input (a wrong path, a corrupt file, an impossible value) raises ValueError or
FileNotFoundError in the library with a message naming the file or flag; the CLI prints that
message alone, without a traceback, and exits with status 2.
TensorFlow's own INFO chatter (one line per checkpoint save) is hidden unless --verbosity is given.
"""
import sys
import time

from absl import app, flags, logging

PROGRESS_S = 5.0  # seconds between progress lines of long library calls


def run(main):
    """app.run(main), with ValueError/FileNotFoundError printed as `error: ...` (exit 2)."""
    def guarded(argv):
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        try:
            return main(argv)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(guarded)


def throttled(report, seconds=PROGRESS_S):
    """A progress callback(done, total, *more) for a long library call that calls report(done,
    total, *more) at most every `seconds`, and when done reaches total."""
    last = [time.monotonic()]

    def callback(done, total, *more):
        if done == total or time.monotonic() - last[0] >= seconds:
            last[0] = time.monotonic()
            report(done, total, *more)
    return callback
