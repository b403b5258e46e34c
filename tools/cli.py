"""What every mess-tf CLI shares: run an absl main, turning expected errors into one clear line.

Bad input (a wrong path, a corrupt file, an impossible value) raises ValueError or
FileNotFoundError in the library with a message naming the file or flag; the CLI prints that
message alone, without a traceback, and exits with status 2.
"""
import sys

from absl import app


def run(main):
    """app.run(main), with ValueError/FileNotFoundError printed as `error: ...` (exit 2)."""
    def guarded(argv):
        try:
            return main(argv)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(guarded)
