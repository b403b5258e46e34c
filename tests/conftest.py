"""Shared test setup: quiet TensorFlow, deterministic seeds, and a disk that fills up."""
import errno
import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture
def json_writes_fill_the_disk(monkeypatch):
    """io_utils.write_json fails half-way through its file, as on a full disk: OSError ENOSPC
    without a file name, as f.write raises it."""
    from mess_tf import io_utils  # noqa: PLC0415  (after the environment above)

    def write_json(path, obj):
        with io_utils.atomic_open(path) as f:
            f.write(str(obj)[:1])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io_utils, "write_json", write_json)
