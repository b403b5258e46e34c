"""Atomic file writes: an interrupted run never leaves a half-written artifact behind.

Every artifact (JSON reports, .npz caches, .tflite models, PNGs) is written to a temporary file in
the destination folder and renamed over the target, which POSIX makes atomic.
"""
import contextlib
import json
import os
import tempfile
import zipfile

import numpy as np


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """Opens a temporary file beside `path`; on clean exit renames it to `path`.

    On an exception the temporary file is removed and `path` is left as it was. The file gets the
    usual permissions (0666 less the umask), not mkstemp's private 0600.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


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
