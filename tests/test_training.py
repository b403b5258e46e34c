"""Training loops: configs, schedules, stage 2 freezing, run directories and their errors."""
import errno
import json
import os

import _train_worker as fixtures
import numpy as np
import pytest
import tensorflow as tf

import mess_cli
from mess_tf import checkpoints, network, optimizers, training
from mess_tf.keras_lib import keras

CLASS_NAMES = tuple(f"thing {i}" for i in range(fixtures.NUM_CLASSES))
STAGE2_EXITS = ("block_2_add:fcn_w8_b0", "block_2_add:fcn_w8_b1", "block_5_add:aspp_w8")


def _config(**kwargs):
    base = dict(stage="stage1", steps=3, batch_size=4, learning_rate=0.05, exits=fixtures.EXITS,
                checkpoint_every=3, log_every=1, eval_batches=2, seed=1)
    return training.TrainConfig(**{**base, **kwargs})


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("stage1"))
    records = []
    result = training.train(fixtures.tiny_network_config(), _config(), fixtures.synthetic_dataset(4), run_dir,
                            val_data=fixtures.synthetic_dataset(4, repeat=False, seed=9), progress=records.append,
                            class_names=CLASS_NAMES)
    return result, records


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown stage 'stage3'"):
        training.TrainConfig(stage="stage3")
    with pytest.raises(ValueError, match="baseline stage trains the single-exit network"):
        training.TrainConfig(stage="baseline", exits=fixtures.EXITS)
    with pytest.raises(ValueError, match=r"bn_momentum=1.0 must be in \[0, 1\)"):
        training.TrainConfig(bn_momentum=1.0)
    with pytest.raises(ValueError, match="precise_bn_batches=-1 must be >= 0"):
        training.TrainConfig(precise_bn_batches=-1)
    assert training.TrainConfig.from_dict(json.loads(json.dumps(_config().to_dict()))) == _config()


def test_stage1_schedules_cover_every_exit_and_are_pure_functions_of_the_step():
    assert [training.stage1_exit_index("round_robin", s, 3, 0) for s in range(1, 7)] == [0, 1, 2, 0, 1, 2]
    draws = [training.stage1_exit_index("random", s, 3, 7) for s in range(1, 61)]
    assert draws == [training.stage1_exit_index("random", s, 3, 7) for s in range(1, 61)]
    assert set(draws) == {0, 1, 2}


def test_resolve_exits_is_positions_times_heads():
    config = training.TrainConfig(stage="stage2", positions=("a", "b"), heads=("fcn_w8_b0", "aspp_w8"))
    assert training.resolve_exits(config) == ["a:fcn_w8_b0", "a:aspp_w8", "b:fcn_w8_b0", "b:aspp_w8"]
    assert training.resolve_exits(training.TrainConfig(stage="stage1", positions=("a",))) == ["a:fcn_w32_b0"]


def test_warmup_then_poly_decay():
    schedule = optimizers.WarmupPolyDecay(0.1, steps=100, warmup_steps=10, power=1.0)
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 4, 10, 55, 100, 150)],
                               [0.01, 0.05, 0.09, 0.045, 0.0, 0.0], atol=1e-7)


def test_miou_from_confusion_ignores_absent_classes():
    confusion = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # rows: labels; class 2 absent
    assert training.miou_from_confusion(confusion) == pytest.approx((3 / 4 + 2 / 3) / 2)


def test_stage1_writes_a_complete_run_directory(stage1_run):
    result, records = stage1_run
    assert [r.step for r in records] == [1, 2, 3]
    assert set(records[0].losses) == {"total", "final", fixtures.EXITS[0]}  # final + ONE exit per step
    assert set(records[1].losses) == {"total", "final", fixtures.EXITS[1]}
    assert all(r.images_per_s > 0 and r.eta_s >= 0 for r in records) and records[-1].eta_s == 0
    assert set(records[-1].miou) == {"final", *fixtures.EXITS}
    metrics = json.load(open(os.path.join(result.run_dir, training.METRICS)))
    assert metrics["steps"] == 3 and set(metrics["miou"]) == {"final", *fixtures.EXITS}
    run_config = checkpoints.read_run_config(result.run_dir)
    assert run_config["exits"] == list(fixtures.EXITS) and run_config["train"]["stage"] == "stage1"
    assert run_config["class_names"] == list(CLASS_NAMES)  # what tools.export puts in the metadata
    assert checkpoints.resolve_checkpoint(result.run_dir) == os.path.join(result.run_dir, "ckpt-3")
    assert os.listdir(os.path.join(result.run_dir, "logs"))


def test_stage2_freezes_backbone_and_final_head_weights_and_batch_norm_statistics(stage1_run, tmp_path):
    stage1, _ = stage1_run
    before = {w.name: w.numpy() for w in stage1.network.model.weights}
    records = []
    result = training.train(fixtures.tiny_network_config(),
                            _config(stage="stage2", exits=STAGE2_EXITS, steps=2, precise_bn_batches=2),
                            fixtures.synthetic_dataset(4, seed=5), str(tmp_path), init_from=stage1.run_dir,
                            progress=records.append)
    assert set(records[-1].losses) == {"total", *STAGE2_EXITS}  # every candidate exit trains at once
    after = {w.name: w for w in result.network.model.weights}
    frozen = [n for n in after if not n.startswith("exit_")]
    assert any("moving_mean" in n for n in frozen) and any("moving_variance" in n for n in frozen)
    for name in frozen:
        np.testing.assert_array_equal(after[name].numpy(), before[name], err_msg=name)
    trained = [n for n in after if n.startswith("exit_block_5_add__aspp_w8") and "kernel" in n]
    assert trained and all(np.any(after[n].numpy() != before.get(n, 0)) for n in trained)
    assert checkpoints.read_run_config(str(tmp_path))["init_from"] == stage1.checkpoint


def test_training_a_finished_run_again_changes_nothing(stage1_run):
    stage1, _ = stage1_run
    metrics = os.path.join(stage1.run_dir, training.METRICS)
    before = os.path.getmtime(metrics)
    # Class names label the classes; a run given none (or others) is still the same run.
    again = training.train(fixtures.tiny_network_config(), _config(), fixtures.synthetic_dataset(4), stage1.run_dir)
    assert again.metrics == stage1.metrics and again.checkpoint == stage1.checkpoint
    assert os.path.getmtime(metrics) == before


def test_load_network_restores_a_trained_run(stage1_run):
    stage1, _ = stage1_run
    net, run_config = checkpoints.load_network(stage1.checkpoint)
    assert net.exit_ids == list(fixtures.EXITS) and run_config["train"]["stage"] == "stage1"
    images = next(iter(fixtures.synthetic_dataset(2)))[0]
    expected = stage1.network.model(images, training=False)
    for name, logits in net.model(images, training=False).items():
        np.testing.assert_allclose(logits.numpy(), expected[name].numpy(), atol=1e-5)


def test_init_from_a_network_with_other_classes_is_a_clear_error(stage1_run):
    config = network.NetworkConfig.from_dict({**fixtures.tiny_network_config().to_dict(), "num_classes": 4})
    with pytest.raises(ValueError, match=r"incompatible with this one \(num_classes: 3 -> 4\)"):
        checkpoints.init_from(network.MultiExitNetwork(config), stage1_run[0].run_dir)


def test_resuming_with_another_config_is_a_clear_error(stage1_run, tmp_path):
    run_dir = str(tmp_path)
    for name in os.listdir(stage1_run[0].run_dir):
        if name != "logs":
            tf.io.gfile.copy(os.path.join(stage1_run[0].run_dir, name), os.path.join(run_dir, name))
    with pytest.raises(ValueError, match=r"different config.*train.learning_rate: 0.05 -> 0.1"):
        training.train(fixtures.tiny_network_config(), _config(learning_rate=0.1), fixtures.synthetic_dataset(4),
                        run_dir)


def test_wrong_batches_and_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"expected batches of images \[B, 32, 32, 3\]"):
        bad = tf.data.Dataset.from_tensors((tf.zeros((2, 64, 64, 3)), tf.zeros((2, 64, 64), tf.uint8)))
        training.train(fixtures.tiny_network_config(), _config(), bad, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        checkpoints.resolve_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        checkpoints.resolve_checkpoint(str(tmp_path / "ckpt-7"))


def test_a_failed_checkpoint_write_is_one_error_and_a_rerun_removes_what_it_left(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    save = tf.train.CheckpointManager.save

    def disk_full_at_step_2(manager, checkpoint_number=None, **kwargs):
        if checkpoint_number != 2:
            return save(manager, checkpoint_number=checkpoint_number, **kwargs)
        part = os.path.join(run_dir, "ckpt-2_temp", "part-00000-of-00001.data-00000-of-00001.tempstate1")
        os.makedirs(os.path.dirname(part))  # what TensorFlow's SaveV2 leaves when the disk fills up
        open(part, "wb").close()
        raise tf.errors.ResourceExhaustedError(None, None, f"{part}; No space left on device [Op:SaveV2]")

    monkeypatch.setattr(tf.train.CheckpointManager, "save", disk_full_at_step_2)
    config = _config(stage="baseline", exits=(), steps=4, checkpoint_every=2, eval_batches=0)
    with pytest.raises(OSError) as raised:
        training.train(fixtures.tiny_network_config(), config, fixtures.synthetic_dataset(4), run_dir)
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, os.path.join(run_dir, "ckpt-2"))
    assert mess_cli.write_error(raised.value).startswith(
        f"cannot write {run_dir}/ckpt-2: checkpoint not written: No space left on device (")
    assert not os.path.exists(os.path.join(run_dir, "ckpt-2_temp"))
    monkeypatch.undo()
    # A run killed while it wrote leaves a checkpoint's temporary folder and a temporary file.
    os.makedirs(os.path.join(run_dir, "ckpt-4_temp"))
    open(os.path.join(run_dir, ".metrics.json.k2x9.tmp"), "w").close()
    result = training.train(fixtures.tiny_network_config(), config, fixtures.synthetic_dataset(4), run_dir)
    assert result.checkpoint.endswith("ckpt-4")
    assert not [name for name in os.listdir(run_dir) if name.endswith(("_temp", ".tmp"))]


def test_baseline_trains_only_the_final_exit(tmp_path):
    records = []
    result = training.train(fixtures.tiny_network_config(),
                            _config(stage="baseline", exits=(), steps=2, bn_momentum=0.9),
                            fixtures.synthetic_dataset(4), str(tmp_path), progress=records.append)
    assert result.network.exit_ids == [] and set(records[-1].losses) == {"total", "final"}
    norms = [layer for layer in result.network.model.layers if "BatchNormalization" in type(layer).__name__]
    assert norms and {layer.momentum for layer in norms} == {0.9}


def test_precise_batch_norm_statistics_are_the_average_over_the_batches(tmp_path):
    # Every batch is the same one, so each layer's averaged statistics are that batch's: the moving
    # mean must equal the mean of the layer's input on it, whatever the moving averages were.
    batch = next(iter(fixtures.synthetic_dataset(4, seed=3)))
    result = training.train(fixtures.tiny_network_config(),
                            _config(stage="baseline", exits=(), steps=2, bn_momentum=0.9, precise_bn_batches=3),
                            tf.data.Dataset.from_tensors(batch).repeat(), str(tmp_path))
    model = result.network.model
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    inputs = keras.Model(model.input, [layer.input for layer in norms])(batch[0], training=True)
    for layer, x in zip(norms, inputs):
        np.testing.assert_allclose(layer.moving_mean.numpy(), tf.reduce_mean(x, [0, 1, 2]).numpy(), atol=1e-4,
                                   err_msg=layer.name)
        assert layer.momentum == 0.9  # restored after the averaging
    restored, _ = checkpoints.load_network(str(tmp_path))  # the checkpoint holds the averaged statistics
    np.testing.assert_array_equal(restored.model.get_layer(norms[-1].name).moving_mean.numpy(),
                                  norms[-1].moving_mean.numpy())
    assert result.metrics["precise_bn_batches"] == 3


def test_every_evaluation_is_reported_even_between_log_steps(tmp_path):
    records = []
    training.train(fixtures.tiny_network_config(), _config(stage="baseline", exits=(), log_every=3, eval_every=2),
                   fixtures.synthetic_dataset(4), str(tmp_path),
                   val_data=fixtures.synthetic_dataset(4, repeat=False, seed=9), progress=records.append)
    assert [r.step for r in records] == [2, 3]
    assert records[0].miou is not None and 0 <= records[0].miou["final"] <= 1
