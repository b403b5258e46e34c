"""What every mess-tf CLI shares: run an absl main, turning expected errors into one clear line.

Bad input (a wrong path, a corrupt file, an impossible value) raises ValueError or
FileNotFoundError in the library with a message naming the file or flag; the CLI prints that
message alone, without a traceback, and exits with status 2. So does an output path the system
refuses (a file where a folder must go, no permission, a full disk): the message names the path,
and for a full disk the space left on it.
TensorFlow's own INFO chatter (one line per checkpoint save) is hidden unless --verbosity is given.

A package of its own beside mess_tf (which never parses flags or prints), so that tools/,
android_bench/ and bench/ share it without importing one another.
"""
import errno
import os
import shutil
import sys

from absl import app, flags, logging

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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
            print(f"error: {write_error(e)}", file=sys.stderr)
            sys.exit(2)

    app.run(guarded)


def write_error(error):
    """The line for the OSError of a failed write: the path, the system's reason, and a hint."""
    hint = ""
    if isinstance(error, (FileExistsError, NotADirectoryError)):
        hint = " (a file stands where a folder must go)"
    elif error.errno in _DISK_FULL and error.filename:
        hint = f" ({free_space(error.filename)} free on its disk; make room and run the command again)"
    return f"cannot write {error.filename or ''}: {error.strerror or error}{hint}"


def free_space(path):
    """The free space of the disk holding `path` (or its nearest existing folder), e.g. '3.2 MB'."""
    folder = os.path.abspath(os.fspath(path))
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    free = float(shutil.disk_usage(folder).free)
    for unit in ("bytes", "kB", "MB", "GB"):
        if free < 1000 or unit == "GB":
            break
        free /= 1000
    return f"{free:.0f} bytes" if unit == "bytes" else f"{free:.1f} {unit}"


def float_list(name):
    """The numbers of the list flag --`name`; a ValueError naming the flag for anything else."""
    values = flags.FLAGS[name].value
    try:
        return [float(v) for v in values]
    except ValueError:
        raise ValueError(f"--{name}={','.join(values)}: expected comma-separated numbers, e.g. "
                         f"--{name}=0.6,0.8") from None
