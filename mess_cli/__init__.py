"""What every mess-tf CLI shares: run an absl main, turning expected errors into one clear line.

Bad input (a wrong path, a corrupt file, an impossible value) raises ValueError or
FileNotFoundError in the library with a message naming the file or flag; the CLI prints that
message alone, without a traceback, and exits with status 2. So does an output path the system
refuses (a file where a folder must go, no permission, a full disk): the message names the path.
TensorFlow's own INFO chatter (one line per checkpoint save) is hidden unless --verbosity is given.

A package of its own beside mess_tf (which never parses flags or prints), so that tools/,
android_bench/ and bench/ share it without importing one another.
"""
import sys

from absl import app, flags, logging


def run(main):
    """app.run(main), with ValueError/FileNotFoundError/OSError printed as `error: ...` (exit 2)."""
    def guarded(argv):
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        try:
            return main(argv)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except OSError as e:
            hint = " (a file stands where a folder must go)" if isinstance(e, (FileExistsError, NotADirectoryError)) else ""
            print(f"error: cannot write {e.filename or ''}: {e.strerror or e}{hint}", file=sys.stderr)
            sys.exit(2)

    app.run(guarded)
