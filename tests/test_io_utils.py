"""Atomic artifact writes: all or nothing, with the permissions any other file would get."""
import os
import stat

import pytest

from mess_tf import io_utils


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_usual_permissions_not_mkstemps(tmp_path, monkeypatch, umask, mode):
    monkeypatch.setattr(io_utils, "_UMASK", umask)  # the process's umask, read once at import
    path = tmp_path / "a.json"
    io_utils.write_json(path, {"a": 1})
    assert stat.S_IMODE(os.stat(path).st_mode) == mode


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    io_utils.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with io_utils.atomic_open(path) as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert io_utils.read_json(path) == {"a": 1} and os.listdir(tmp_path) == ["a.json"]
