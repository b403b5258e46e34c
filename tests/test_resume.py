"""A run killed with SIGKILL after a checkpoint resumes to the weights of an uninterrupted run."""
import os
import signal
import subprocess
import sys

import _train_worker as fixtures
import numpy as np
import tensorflow as tf

from mess_tf import training

WORKER = os.path.join(os.path.dirname(__file__), "_train_worker.py")


def _wait_for_hang(worker):
    """True once the worker prints HANG (its step-4 checkpoint is written); False if it exits first."""
    return any(line.strip() == "HANG" for line in worker.stdout)


def test_run_killed_with_sigkill_resumes_to_the_uninterrupted_weights(tmp_path):
    killed_dir = str(tmp_path / "killed")
    worker = subprocess.Popen([sys.executable, WORKER, killed_dir, str(tmp_path / "unused.npz"), "--hang_after=4"],
                              stdout=subprocess.PIPE, text=True)
    try:
        uninterrupted = training.train(fixtures.tiny_network_config(), fixtures.TRAIN_CONFIG,
                                       fixtures.synthetic_dataset(fixtures.TRAIN_CONFIG.batch_size),
                                       str(tmp_path / "uninterrupted"))
        assert _wait_for_hang(worker), "the worker died before its step-4 checkpoint"
        worker.send_signal(signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait()
    assert tf.train.latest_checkpoint(killed_dir).endswith("ckpt-4")

    records = []
    resumed = training.train(fixtures.tiny_network_config(), fixtures.TRAIN_CONFIG,
                             fixtures.synthetic_dataset(fixtures.TRAIN_CONFIG.batch_size), killed_dir,
                             progress=records.append)
    assert resumed.metrics["resumed_from_step"] == 4 and [r.step for r in records] == [5, 6]
    # Step 5 trains exit 0 and step 6 exit 1 in both runs: the schedule follows the step.
    assert fixtures.EXITS[0] in records[0].losses and fixtures.EXITS[1] in records[1].losses
    expected = fixtures.network_weights(uninterrupted.network)
    got = fixtures.network_weights(resumed.network)
    assert list(got) == list(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
