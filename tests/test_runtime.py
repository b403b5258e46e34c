"""The staged-model runtime: equivalence with the Keras network, and the three modes."""
import numpy as np
import pytest
import tensorflow as tf
from test_export import EXITS, calibrate_batch_norm, dynamic_config, images, tiny_config

from mess_tf import deployment, export, network, policy, runtime
from mess_tf.keras_lib import keras

TIE_EPSILON = 1e-3  # logits this close are a tie: float rounding may pick either class


@pytest.fixture(scope="module")
def tiny_net():
    keras.utils.set_random_seed(3)
    net = network.MultiExitNetwork(tiny_config(), EXITS)
    calibrate_batch_norm(net, images(8, seed=1))
    return net


@pytest.fixture(scope="module")
def float_model(tiny_net, tmp_path_factory):
    path = tmp_path_factory.mktemp("float") / "model.tflite"
    export.export_staged_model(path, tiny_net, dynamic_config(tiny_net, th_pix=0.4, th_img=0.5), "float32")
    return runtime.StagedModel.load(path)


def top2_gap(logits):
    top = np.sort(logits, axis=-1)
    return top[..., -1] - top[..., -2]


def test_float_class_maps_equal_keras_except_at_ties(tiny_net, float_model):
    batch = images(3, seed=4)
    expected = tiny_net.subset_model(list(EXITS))(batch)
    for i, image in enumerate(batch):
        results = list(float_model.anytime(image))
        assert [r.exit_id for r in results] == list(EXITS) + ["final"]
        for result in results:
            logits = expected[result.exit_id].numpy()[i]
            differ = result.class_map != np.argmax(logits, axis=-1)
            assert result.class_map.shape == (64, 64) and result.class_map.dtype == np.uint8
            assert np.all(top2_gap(logits)[differ] < TIE_EPSILON)


def test_dynamic_stops_at_the_first_confident_exit(float_model):
    image = images(1, seed=5)[0]
    everything = list(float_model.anytime(image))
    confidences = everything[-1].confidences
    assert len(confidences) == 2 and all(0.0 <= c <= 1.0 for c in confidences)
    # A threshold equal to an exit's confidence takes it; one just above it passes on.
    above = [np.nextafter(c, 2.0) for c in confidences]
    first = float_model.run(image, "dynamic", th_img=[confidences[0], 1.0])
    assert first.exit_index == 0 and len(first.stage_ms) == 1
    second = float_model.run(image, "dynamic", th_img=[above[0], confidences[1]])
    assert second.exit_index == 1 and second.confidences == confidences
    never = float_model.run(image, "dynamic", th_img=above)
    assert never.exit_index == 2 and len(never.stage_ms) == 3
    np.testing.assert_array_equal(never.class_map, everything[-1].class_map)
    assert never.total_ms >= sum(never.stage_ms)
    with pytest.raises(ValueError, match="1 image thresholds given; the model has 2 early exits"):
        float_model.run(image, "dynamic", th_img=[0.5])


def test_only_the_exit_taken_computes_its_class_map(float_model, monkeypatch):
    image = images(1, seed=5)[0]
    runs = []

    def counting(k, runner):
        def run(**inputs):
            runs.append(k)
            return runner(**inputs)
        return run

    monkeypatch.setattr(float_model, "_class_map_runners",
                        [runner and counting(k, runner) for k, runner in enumerate(float_model._class_map_runners)])
    assert float_model.run(image, "dynamic", th_img=[1.1, 1.1]).exit_index == 2 and runs == []  # final stage's own map
    assert float_model.run(image, "dynamic", th_img=[1.1, 0.0]).exit_index == 1 and runs == [1]
    assert float_model.run(image, "budgeted", exit_index=0).exit_index == 0 and runs == [1, 0]
    assert len(list(float_model.anytime(image))) == 3 and runs == [1, 0, 0, 1]


def test_anytime_deadline_returns_the_latest_map_in_time(float_model):
    image = images(1, seed=6)[0]
    full = float_model.run(image, "anytime")
    assert full.exit_index == 2 and full.deadline_met
    impossible = float_model.run(image, "anytime", deadline_ms=0.0)
    assert impossible.exit_index == 0 and not impossible.deadline_met
    generous = float_model.run(image, "anytime", deadline_ms=60_000)
    assert generous.exit_index == 2 and generous.deadline_met


def test_budgeted_runs_one_truncated_exit(tiny_net, tmp_path):
    config = deployment.DeploymentConfig("budgeted", [deployment.ExitChoice(*EXITS[1].split(":"))])
    path = tmp_path / "budgeted.tflite"
    export.export_staged_model(path, tiny_net, config, "float32")
    model = runtime.StagedModel.load(path)
    image = images(1, seed=7)[0]
    result = model.run(image)
    assert model.exit_ids == [EXITS[1]] and result.exit_id == EXITS[1] and len(result.stage_ms) == 1
    logits = tiny_net.model(image[None])[EXITS[1]].numpy()[0]
    differ = result.class_map != np.argmax(logits, -1)
    assert np.all(top2_gap(logits)[differ] < TIE_EPSILON)


def test_bad_input_is_a_clear_error(float_model, tmp_path):
    with pytest.raises(ValueError, match=r"image has shape \(1, 32, 32, 3\).*\[64, 64, 3\]"):
        float_model.run(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="mode 'fast'"):
        float_model.run(np.zeros((64, 64, 3), np.uint8), "fast")
    with pytest.raises(FileNotFoundError, match="staged model not found"):
        runtime.StagedModel.load(tmp_path / "missing.tflite")


def miou(a, b, num_classes):
    ious = []
    for c in range(num_classes):
        union = np.sum((a == c) | (b == c))
        if union:
            ious.append(np.sum((a == c) & (b == c)) / union)
    return float(np.mean(ious))


def test_int8_model_agrees_with_keras(tiny_net, tmp_path):
    path = tmp_path / "int8.tflite"
    export.export_staged_model(path, tiny_net, dynamic_config(tiny_net), "int8", calibration_images=images(8, seed=1))
    model = runtime.StagedModel.load(path)
    batch = images(3, seed=8)
    expected = tiny_net.model(batch)
    agreement = []
    for i, image in enumerate(batch):
        results = list(model.anytime(image))
        assert [r.exit_id for r in results] == list(EXITS) + ["final"]
        for result in results:
            reference = np.argmax(expected[result.exit_id].numpy()[i], -1)
            agreement.append(np.mean(result.class_map == reference))
    # Pixel agreement of every exit (0.83 measured): a random-weight network has small logit
    # margins, so int8 rounding flips some argmaxes; a broken int8 hand-off between stages
    # collapses the later maps and falls far below this.
    assert np.mean(agreement) > 0.7


def test_exported_confidence_is_the_calibration_policy_on_coarse_logits(tiny_net, float_model):
    """The in-graph confidence is policy.image_confidence on the exit's own-resolution logits,
    exactly what the calibration cache records (up to float rounding at th_pix: one pixel)."""
    batch = images(2, seed=6)
    coarse = keras.Model(tiny_net.image, {e: tiny_net.coarse_logits(e) for e in EXITS})(batch)
    for i, image in enumerate(batch):
        got = list(float_model.anytime(image))[-1].confidences
        for eid, confidence in zip(EXITS, got):
            logits = coarse[eid].numpy()[i]
            stride = tiny_net.position_of(eid).stride
            assert logits.shape[:2] == (64 // stride, 64 // stride)
            expected = policy.image_confidence(logits, 0.4, stride)
            assert abs(confidence - expected) <= 1.0 / logits[..., 0].size + 1e-6


@pytest.mark.parametrize("precision, class_map_stride", [("int8", 1), ("float32", 2)])
def test_calibration_of_the_converted_parts_predicts_the_exported_model(tiny_net, tmp_path, precision,
                                                                         class_map_stride):
    """The cache made from converted parts holds exactly the confidences and class maps the staged
    model of that precision computes: the search predicts the model that ships."""
    from mess_tf import calibration

    grid, config = (0.3, 0.5, 0.7), policy.PolicyConfig(class_map_stride=class_map_stride)
    quantisation_images, batch = images(8, seed=1), images(5, seed=7)
    labels = np.random.default_rng(0).integers(0, 5, (5, 64, 64))
    positions = export.segment_positions(tiny_net, tiny_net.exit_ids)
    parts = export.convert_parts(tiny_net, precision, quantisation_images, policy_config=config, positions=positions,
                                 th_pix_grid=grid)
    checkpoint = tmp_path / "ckpt"
    tf.train.Checkpoint(model=tiny_net.model).write(str(checkpoint))
    cache = calibration.calibrate_parts(tiny_net, parts, str(checkpoint), [(batch, labels)],
                                        [f"im{i}" for i in range(5)], grid, config, positions=positions)
    path = tmp_path / "model.tflite"
    export.export_staged_model(path, tiny_net, dynamic_config(tiny_net, th_pix=grid[1]), precision,
                               calibration_images=quantisation_images, policy_config=config)
    model = runtime.StagedModel.load(path)
    for n, image in enumerate(batch):
        results = list(model.anytime(image))  # every exit, every class map
        assert results[-1].confidences == pytest.approx(list(cache.conf_frac[n, :, 1]), abs=1e-6)
        for e, result in enumerate(results):
            counts = calibration.confusion_counts(result.class_map, labels[n], 5)
            np.testing.assert_array_equal(counts, np.stack([cache.tp[n, e], cache.fp[n, e], cache.fn[n, e]]))


def test_calibrate_cli_in_int8_writes_the_cache_of_the_converted_parts(tmp_path):
    """`tools.calibrate --precision=int8` is the in-process calibration of the int8 parts."""
    import os
    import subprocess
    import sys

    from mess_tf import calibration, checkpoints
    from mess_tf.data import demo, pipeline, registry

    data_dir = demo.generate(str(tmp_path / "data"), "tiny", seed=0)
    keras.utils.set_random_seed(5)
    net = network.MultiExitNetwork(tiny_config(num_classes=demo.info("tiny").num_classes), EXITS)
    calibrate_batch_norm(net, images(8, seed=1))
    run = tmp_path / "run"
    checkpoints.write_run_config(str(run), {"network": net.config.to_dict(), "train": {}, "exits": list(EXITS),
                                            "init_from": None})
    tf.train.CheckpointManager(tf.train.Checkpoint(model=net.model), str(run), max_to_keep=1).save()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "tools.calibrate", f"--checkpoint={run}", "--dataset=demo",
                           f"--data_dir={data_dir}", "--precision=int8", "--quantization_images=4",
                           "--th_pix_steps=3", f"--output={tmp_path / 'cache.npz'}"],
                          cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    cached = calibration.CalibrationCache.load(str(tmp_path / "cache.npz"))

    samples = registry.get_dataset("demo", data_dir).samples("calibration")
    grid, config = np.linspace(0.5, 0.95, 3), policy.PolicyConfig()
    positions = export.segment_positions(net, net.exit_ids)
    parts = export.convert_parts(net, "int8",
                                 [pipeline.load_image(s.image_path).astype(np.float32) for s in samples[:4]],
                                 policy_config=config, positions=positions, th_pix_grid=grid)
    expected = calibration.calibrate_parts(
        net, parts, checkpoints.resolve_checkpoint(str(run)),
        pipeline.eval_batches(samples, demo.info("tiny"), net.backbone.input_size, 8), [s.name for s in samples], grid,
        config, positions=positions)
    for name in ("tp", "fp", "fn", "conf_frac"):
        np.testing.assert_array_equal(getattr(cached, name), getattr(expected, name))
