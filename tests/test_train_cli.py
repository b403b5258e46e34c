"""tools.train before it trains: --init_from checked against the flags and the dataset, --skip_bad."""
import os
import subprocess
import sys

import pytest
import tensorflow as tf
from test_datasets import _folder_tree
from test_export import tiny_config

from mess_tf import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source_run(run_dir, num_classes=11):
    """A run folder as tools.train leaves it, as far as --init_from reads it before training."""
    checkpoints.write_run_config(run_dir, {"network": tiny_config(num_classes).to_dict(), "train": None, "exits": [],
                                           "init_from": None})
    tf.train.CheckpointManager(tf.train.Checkpoint(step=tf.Variable(0)), run_dir, max_to_keep=1).save(0)
    return run_dir


def test_fields_not_given_come_from_the_source_and_each_difference_is_named(tmp_path):
    source = _source_run(str(tmp_path / "source"))
    config, inherited = checkpoints.inherit_network(source, {"backbone.name": "mobilenet_v2"}, 11)
    assert config == tiny_config(11)
    assert inherited == {"backbone.alpha": 0.35, "backbone.output_stride": 16, "input_size": [64, 64],
                         "final_head.kind": "deeplabv3", "final_head.filters": 16, "final_head.separable": True}
    with pytest.raises(ValueError) as error:
        checkpoints.inherit_network(source, {"backbone.alpha": 0.5, "backbone.output_stride": 8,
                                             "input_size": (96, 96)}, 12)
    assert str(error.value) == (
        f"--init_from {source}: the source network differs from this run's (num_classes: source 11, dataset 12; "
        "backbone.alpha: source 0.35, flag 0.5; backbone.output_stride: source 16, flag 8; "
        "input_size: source [64, 64], flag [96, 96])")


def _train_cli(*flags):
    result = subprocess.run([sys.executable, "-m", "tools.train", "--stage=stage2", *flags], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    return result.returncode, result.stderr


def test_the_cli_refuses_a_source_of_another_class_count_before_training(tmp_path):
    source = _source_run(str(tmp_path / "source"))
    os.makedirs(tmp_path / "data")
    data = _folder_tree(str(tmp_path / "data"), splits=("train", "val"), num_classes=12)
    code, stderr = _train_cli("--dataset=folder", f"--data_dir={data}", f"--init_from={source}", "--alpha=1.0",
                              f"--output_dir={tmp_path / 'run'}")
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"error: --init_from {source}: the source network differs from this run's (num_classes: source 11, "
        f"dataset 12; backbone.alpha: source 0.35, flag 1.0)")
    assert not os.path.exists(tmp_path / "run")


def test_train_skips_a_corrupt_sample_with_skip_bad_and_names_it_without(tmp_path):
    os.makedirs(tmp_path / "data")
    data = _folder_tree(str(tmp_path / "data"), splits=("train", "val"), per_split=4, num_classes=3)
    broken = tmp_path / "data" / "images" / "train" / "train1.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    common = ["--stage=baseline", "--dataset=folder", f"--data_dir={data}", "--alpha=0.35", "--crop_size=32",
              "--final_filters=8", "--steps=1", "--batch_size=2", "--eval_batches=0"]
    result = subprocess.run([sys.executable, "-m", "tools.train", *common, f"--output_dir={tmp_path / 'a'}"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
        f"error: image {broken} is corrupt or truncated")
    result = subprocess.run([sys.executable, "-m", "tools.train", *common, "--skip_bad",
                             f"--output_dir={tmp_path / 'b'}"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "skipping sample train1" in result.stderr and "done: " in result.stdout
