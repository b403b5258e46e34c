"""The trained DeepLab shipped in trained/: it loads without running code and scores what its record says."""
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from mess_tf import experiment, shipped, training
from mess_tf.data import demo

PRESETS = ("default", "things")  # the scenes' network and the digit scenes' one


@pytest.fixture(scope="module", params=PRESETS)
def shipped_net(request):
    preset = experiment.PRESETS[request.param]
    net, record = shipped.load_network(shipped.folder(preset.shipped_baseline))
    return net, record, preset


def test_loading_reproduces_the_recorded_validation_miou(shipped_net):
    net, record, preset = shipped_net
    count = record["val_subset"]["images"]
    pairs = [demo.render_sample("val", i, preset.data, record["data"]["seed"])[:2] for i in range(count)]
    images = np.stack([image for image, _ in pairs]).astype(np.float32)
    labels = np.stack([label for _, label in pairs])
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(preset.batch_size)  # as recorded
    miou = training.evaluate(net.single_exit_model(), data, demo.info(preset.data).num_classes)["final"]
    assert miou == pytest.approx(record["val_subset"]["miou"], abs=1e-4)  # 0.01 pp: float rounding only


def test_the_record_says_how_it_was_made(shipped_net):
    _, record, preset = shipped_net
    assert record["data"] == experiment.Experiment("unused", preset.data).data_stamp()  # make demo's check
    assert record["train"]["steps"] == preset.baseline_steps
    assert record["network"]["backbone"]["name"] == preset.backbone.name
    curve = record["metrics"]["miou_curve"]
    assert curve[-1]["step"] == preset.baseline_steps
    assert record["command"].startswith("python -m tools.train_demo_baseline")


def test_a_file_that_does_not_fit_is_named(tmp_path, shipped_net):
    net, _, preset = shipped_net
    arrays = shipped._arrays(net.model)
    arrays.pop(sorted(arrays)[0])
    with pytest.raises(ValueError, match=r"bad\.npz has no weight"):
        shipped.set_weights(net.model, arrays, "bad.npz")
    (tmp_path / shipped.WEIGHTS).write_bytes(b"not an npz")
    shutil.copy(os.path.join(shipped.folder(preset.shipped_baseline), shipped.RECORD), tmp_path)
    with pytest.raises(ValueError, match=r"weights\.npz is not a readable \.npz"):
        shipped.load_network(str(tmp_path))
