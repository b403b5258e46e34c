"""Two MultiWorkerMirroredStrategy workers on 127.0.0.1 end with identical weights and BN statistics."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(__file__), "_train_worker.py")


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_end_with_identical_weights_and_batch_norm_statistics(tmp_path):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    workers = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        workers.append(subprocess.Popen([sys.executable, WORKER, str(tmp_path / "run"),
                                         str(tmp_path / f"w{index}.npz")],
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [w.communicate(timeout=240)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    for w, out in zip(workers, outputs):
        assert w.returncode == 0, out[-3000:]
    chief, other = (np.load(tmp_path / f"w{i}.npz") for i in range(2))
    assert list(chief) == list(other)
    moving = [n for n in chief if "moving_mean" in n or "moving_variance" in n]
    assert moving and any(np.any(chief[n] != 0) for n in moving if "moving_mean" in n)  # BN ran in training mode
    for name in chief:
        np.testing.assert_allclose(chief[name], other[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert os.path.exists(tmp_path / "run" / "metrics.json")  # written by the chief only
    assert not [n for n in os.listdir(tmp_path / "run") if n.startswith(".worker_")]
