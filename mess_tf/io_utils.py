"""Atomic file writes: an interrupted run never leaves a half-written artifact behind.

Every artifact (JSON reports, .npz caches, .tflite models, PNGs) is written to a temporary file in
the destination folder and renamed over the target, which POSIX makes atomic. Artifacts that only
make sense together (a model and its metadata, a search's outputs) are written inside
`together()`: all of them appear, or none does. A failed write (a full disk) raises an OSError
whose filename is the artifact's path, never the temporary file's.
"""
import contextlib
import contextvars
import errno
import json
import os
import tempfile
import zipfile

import numpy as np

_TEMPORARY_SUFFIX = ".tmp"
# The renames that together() holds back until its block ends: [(temporary file, path)].
_held_back = contextvars.ContextVar("held_back", default=None)


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """Opens a temporary file beside `path`; on clean exit renames it to `path` (inside
    `together()`: when that block ends).

    On an exception the temporary file is removed and `path` is left as it was. The file gets the
    usual permissions (0666 less the umask), not mkstemp's private 0600.

    Raises:
      OSError of a failed write, with `path` as its filename.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=_TEMPORARY_SUFFIX)
    except OSError as e:  # its filename is the folder or the temporary file: name the artifact
        raise _naming(e, path) from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        held_back = _held_back.get()
        if held_back is None:
            os.replace(tmp, path)
        else:
            held_back.append((tmp, path))
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename in (None, tmp):  # not an error about some other file
            raise _naming(e, path) from None
        raise


@contextlib.contextmanager
def together():
    """Files written atomically inside the block appear together when it ends, or none does.

    Each write goes to its temporary file as usual; the renames wait for the end of the block. On
    an exception every temporary file is removed and the targets are left as they were.
    """
    held_back = []
    token = _held_back.set(held_back)
    try:
        yield
        for _, path in held_back:  # what would make a rename fail, found before anything is renamed
            if os.path.isdir(path):
                raise IsADirectoryError(errno.EISDIR, "a folder stands where this file must go", path)
    except BaseException:
        _remove_temporaries(held_back)
        raise
    finally:
        _held_back.reset(token)
    for k, (tmp, path) in enumerate(held_back):
        try:
            os.replace(tmp, path)
        except OSError as e:
            _remove_temporaries(held_back[k:])
            raise _naming(e, path) from None


def _remove_temporaries(held_back):
    for tmp, _ in held_back:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _naming(error, path):
    """`error` with `path` as its filename (the temporary file's name means nothing to a user)."""
    return type(error)(error.errno, error.strerror or str(error), path) if error.errno else error


def is_temporary(name):
    """True for the name of an atomic write's temporary file (left behind only by a killed process)."""
    return name.startswith(".") and name.endswith(_TEMPORARY_SUFFIX)


def _read_umask():
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: os.umask is process-wide, so never toggle it while threads write


def write_json(path, obj):
    """Writes `obj` as indented JSON, atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_npz(path, what="arrays file"):
    """Every array of an .npz, read without unpickling anything.

    Returns:
      {name: np.ndarray}.

    Raises:
      ValueError: a truncated file or one that is not an .npz, named, in one line.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        # np.load's own message for a file that is not a zip speaks of pickles, which confuses.
        raise ValueError(f"{what} {path} is not a readable .npz (truncated, or another kind of file)") from None


def read_json(path, what="JSON file"):
    """Reads JSON, turning a missing or malformed file into a ValueError that names it."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None


def write_bytes(path, data):
    """Writes raw bytes (a .tflite flatbuffer, a PNG), atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def save_npz(path, **arrays):
    """Saves arrays as a compressed .npz, atomically. `path` should end in .npz."""
    with atomic_open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
