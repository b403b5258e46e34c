"""What every mess-tf CLI shares: run an absl main, turning expected errors into one clear line.

Bad input (a wrong path, a corrupt file, an impossible value) raises ValueError or
FileNotFoundError in the library with a message naming the file or flag; the CLI prints that
message alone, without a traceback, and exits with status 2.
TensorFlow's own INFO chatter (one line per checkpoint save) is hidden unless --verbosity is given.
"""
import sys

from absl import app, flags, logging


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
