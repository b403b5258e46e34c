"""Atomic artifact writes: all or nothing, with the permissions any other file would get."""
import os
import shutil
import stat
import types

import pytest

import mess_cli
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


def test_a_full_disk_is_one_line_naming_the_file_and_the_free_space(tmp_path, monkeypatch, json_writes_fill_the_disk):
    path = tmp_path / "report.json"
    with pytest.raises(OSError) as raised:
        io_utils.write_json(path, {"a": 1})
    assert raised.value.filename == str(path) and os.listdir(tmp_path) == []
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: types.SimpleNamespace(free=1536))
    assert mess_cli.write_error(raised.value) == (f"cannot write {path}: No space left on device (1.5 kB free on its "
                                                  f"disk; make room and run the command again)")


def test_files_written_together_all_appear_or_none(tmp_path, json_writes_fill_the_disk):
    io_utils.write_bytes(tmp_path / "a.json", b'{"old": true}')
    with pytest.raises(OSError):
        with io_utils.together():
            io_utils.write_bytes(tmp_path / "a.json", b"{}")
            io_utils.write_json(tmp_path / "b.json", {"new": True})
    assert io_utils.read_json(tmp_path / "a.json") == {"old": True} and os.listdir(tmp_path) == ["a.json"]
    (tmp_path / "c.png").mkdir()  # what would make the last rename fail stops the first
    with pytest.raises(IsADirectoryError, match="a folder stands where this file must go") as raised:
        with io_utils.together():
            io_utils.write_bytes(tmp_path / "a.json", b"{}")
            io_utils.write_bytes(tmp_path / "c.png", b"png")
    assert raised.value.filename == str(tmp_path / "c.png")
    assert io_utils.read_json(tmp_path / "a.json") == {"old": True}
    assert sorted(os.listdir(tmp_path)) == ["a.json", "c.png"]
    with io_utils.together():
        io_utils.write_bytes(tmp_path / "a.json", b"{}")
        io_utils.write_bytes(tmp_path / "d.png", b"png")
        assert not (tmp_path / "d.png").exists()  # not before the block ends
    assert io_utils.read_json(tmp_path / "a.json") == {} and (tmp_path / "d.png").read_bytes() == b"png"
