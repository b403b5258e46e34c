"""The exit policy: numpy and in-graph versions agree, smoothing touches only edges, TFLite converts it."""
import numpy as np
import pytest
import tensorflow as tf

from mess_tf import policy

CLASSES = 5


def _structured_logits(seed, batch=2, size=(24, 20)):
    """Logits with blob-shaped regions (real edges) plus noise, so smoothing has work to do."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    logits = rng.normal(0, 0.7, (batch, h, w, CLASSES))
    for b in range(batch):
        for c in range(CLASSES):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            logits[b, :, :, c] += 3.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (w / 4) ** 2))
    return logits.astype(np.float32)


@pytest.mark.parametrize("cfg", [policy.PolicyConfig(), policy.PolicyConfig("entropy"),
                                 policy.PolicyConfig(edge_smoothing=False),
                                 policy.PolicyConfig(edge_radius_per_stride=1.5),  # a 5x5 median window
                                 policy.PolicyConfig(confidence_stride=8)])  # stride 4: logits pooled 2x2
@pytest.mark.parametrize("stride", [4, 8, 16, 32])
def test_numpy_and_tf_agree(cfg, stride):
    logits = _structured_logits(stride)
    conf_tf = policy.smoothed_confidence_tf(tf.constant(logits), stride, cfg).numpy()
    thresholds = [0.3, 0.5, 0.7]
    for b in range(logits.shape[0]):
        conf_np = policy.smoothed_confidence(logits[b], stride, cfg)
        np.testing.assert_allclose(conf_np, conf_tf[b], atol=1e-6)
        fractions = policy.confidence_fractions(logits[b], stride, thresholds, cfg)
        for th, fraction in zip(thresholds, fractions):
            assert fraction == policy.image_confidence(logits[b], th, stride, cfg)
            got = policy.image_confidence_tf(tf.constant(logits[b:b + 1]), th, stride, cfg).numpy()[0]
            assert abs(got - fraction) < 1e-6


@pytest.mark.parametrize("n", [1, 2, 3, 5, 9, 12])
def test_the_median_filters_sorting_network_sorts_every_input(n):
    # 0-1 principle: a comparator network that sorts every 0/1 sequence sorts every sequence.
    pairs = policy._sorting_network(n)
    assert all(i < j < n for i, j in pairs)
    for bits in range(2 ** n):
        values = [(bits >> k) & 1 for k in range(n)]
        for i, j in pairs:
            values[i], values[j] = min(values[i], values[j]), max(values[i], values[j])
        assert values == sorted(values), (n, bits)


def test_smoothing_changes_edge_pixels_only():
    logits = _structured_logits(1, batch=1)[0]
    cfg = policy.PolicyConfig()
    raw = policy.pixel_confidence(logits, cfg)
    smoothed = policy.smoothed_confidence(logits, 16, cfg)
    near_edge = policy.edge_mask(logits.argmax(-1), cfg.radius(16))
    assert 0 < near_edge.mean() < 1
    np.testing.assert_array_equal(smoothed[~near_edge], raw[~near_edge])
    assert np.mean(smoothed[near_edge] != raw[near_edge]) > 0.5


def test_smoothing_lifts_a_boundary_dip():
    """Two confident regions meeting along a column of unsure feature pixels (at an exit's own
    resolution a blurred boundary is about one pixel wide): the median restores them."""
    logits = np.zeros((12, 12, 2), np.float32)
    logits[:, :6, 0] = logits[:, 6:, 1] = 4.0
    logits[:, 6, :] = [0.1, 0.0]  # the boundary column is barely decided
    smoothed = policy.smoothed_confidence(logits, 16, policy.PolicyConfig())
    raw = policy.pixel_confidence(logits)
    assert raw[:, 6].max() < 0.53 and smoothed[:, 6].min() > 0.98
    assert policy.image_confidence(logits, 0.9, 16) == 1.0 > policy.image_confidence(
        logits, 0.9, 16, policy.PolicyConfig(edge_smoothing=False))


def test_edge_mask_of_a_two_region_map():
    pred = np.zeros((6, 8), int)
    pred[:, 4:] = 1
    np.testing.assert_array_equal(policy.edge_mask(pred, 1).any(axis=0), [0, 0, 1, 1, 1, 1, 0, 0])
    assert not policy.edge_mask(np.zeros((5, 5), int), 2).any()


def test_entropy_confidence_range():
    uniform = np.zeros((2, 2, CLASSES), np.float32)
    certain = np.full((2, 2, CLASSES), -50.0, np.float32)
    certain[..., 0] = 50.0
    cfg = policy.PolicyConfig("entropy")
    np.testing.assert_allclose(policy.pixel_confidence(uniform, cfg), 0.0, atol=1e-6)
    np.testing.assert_allclose(policy.pixel_confidence(certain, cfg), 1.0, atol=1e-6)
    np.testing.assert_allclose(policy.pixel_confidence(uniform), 1.0 / CLASSES, atol=1e-6)


def test_fractions_are_monotone_in_thresholds():
    logits = _structured_logits(3, batch=1)[0]
    grid = np.linspace(0.0, 1.0, 21)
    fractions = policy.confidence_fractions(logits, 8, grid)
    assert fractions[0] == 1.0
    assert np.all(np.diff(fractions) <= 0)
    assert [bool(policy.should_exit(fractions[5], t)) for t in (0.0, fractions[5], 1.01)] == [True, True, False]


def test_bad_policy_config_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        policy.PolicyConfig("margin")
    with pytest.raises(ValueError, match="power of two"):
        policy.PolicyConfig(confidence_stride=6)


def test_a_finer_exit_decides_on_logits_pooled_to_the_confidence_stride():
    logits = _structured_logits(3, batch=1)[0]  # 24 x 20 at stride 4
    cfg = policy.PolicyConfig(confidence_stride=16)
    pooled = logits.reshape(6, 4, 5, 4, CLASSES).mean(axis=(1, 3))
    conf = policy.smoothed_confidence(logits, 4, cfg)
    assert conf.shape == (6, 5)
    np.testing.assert_allclose(conf, policy.smoothed_confidence(pooled, 16, policy.PolicyConfig()), atol=1e-6)
    # Exits at or above the confidence stride decide at their own resolution, as before.
    np.testing.assert_array_equal(policy.smoothed_confidence(logits, 16, cfg),
                                  policy.smoothed_confidence(logits, 16, policy.PolicyConfig()))
    with pytest.raises(ValueError, match="pools the stride-4 logits 24x20 by 8"):
        policy.smoothed_confidence(logits, 4, policy.PolicyConfig(confidence_stride=32))


@pytest.mark.parametrize("cfg, stride", [(policy.PolicyConfig(), 16), (policy.PolicyConfig(confidence_stride=8), 4)])
def test_tf_image_confidence_converts_to_tflite(cfg, stride):
    from ai_edge_litert.interpreter import Interpreter

    th_pix = 0.6
    logits = _structured_logits(7, batch=1)

    @tf.function(input_signature=[tf.TensorSpec(logits.shape, tf.float32)])
    def confidence(x):
        return policy.image_confidence_tf(x, th_pix, stride, cfg)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([confidence.get_concrete_function()], confidence)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    interpreter = Interpreter(model_content=converter.convert())
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], logits)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert abs(float(got[0]) - policy.image_confidence(logits[0], th_pix, stride, cfg)) < 1e-6
