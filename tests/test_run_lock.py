"""One writer per run folder: a second training into a folder is refused naming the first, and a
lock left by a process killed with SIGKILL is taken over."""
import json
import os
import signal
import socket
import subprocess
import sys

import _train_worker as fixtures
import pytest

from mess_tf import run_lock, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Holds the lock of the folder given, says so, and waits to be killed.
HOLDER = "import sys, time\nfrom mess_tf import run_lock\nwith run_lock.hold(sys.argv[1]):\n" \
         "    print('HELD', flush=True)\n    time.sleep(600)\n"


@pytest.fixture
def holder(tmp_path):
    """(run folder, a process holding its lock)."""
    run_dir = str(tmp_path / "run")
    process = subprocess.Popen([sys.executable, "-c", HOLDER, run_dir], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "HELD"
        yield run_dir, process
    finally:
        process.kill()
        process.wait()


def test_a_second_training_into_a_locked_folder_is_refused_naming_the_holder(holder):
    run_dir, process = holder
    expected = rf"run folder {run_dir} is being written by process {process.pid} on {socket.gethostname()} " \
               rf"\(started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC\); wait for it to finish"
    with pytest.raises(ValueError, match=expected):
        training.train(fixtures.tiny_network_config(), fixtures.TRAIN_CONFIG,
                       fixtures.synthetic_dataset(fixtures.TRAIN_CONFIG.batch_size), run_dir)
    assert os.listdir(run_dir) == [run_lock.LOCK_FILE]  # nothing written by the refused run


def test_a_lock_left_by_a_killed_process_is_taken_over_and_removed_when_done(holder):
    run_dir, process = holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    lock_path = os.path.join(run_dir, run_lock.LOCK_FILE)
    with open(lock_path) as f:
        assert json.load(f)["pid"] == process.pid  # the dead process's lock is still there
    with run_lock.hold(run_dir):
        with open(lock_path) as f:
            assert json.load(f)["pid"] == os.getpid()
    assert os.listdir(run_dir) == []


def test_a_folder_made_for_a_run_that_wrote_nothing_is_removed(tmp_path):
    with pytest.raises(RuntimeError):
        with run_lock.hold(tmp_path / "new"):
            raise RuntimeError("refused before writing")
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    with run_lock.hold(tmp_path / "kept"):
        pass
    assert (tmp_path / "kept").is_dir()  # a folder the user made stays
