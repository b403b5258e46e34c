"""Losses: cross-entropy ignores label 255; distillation counts only pixels the teacher gets right."""
import numpy as np
import tensorflow as tf

from mess_tf import losses


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_cross_entropy_is_the_mean_over_labelled_pixels_only():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 2, 2, 3)).astype(np.float32)
    labels = np.array([[[0, 255], [2, 255]]], np.uint8)
    log_p = _np_log_softmax(logits)
    expected = -(log_p[0, 0, 0, 0] + log_p[0, 1, 0, 2]) / 2
    np.testing.assert_allclose(losses.cross_entropy(labels, logits).numpy(), expected, rtol=1e-5)


def test_cross_entropy_of_an_all_ignored_batch_is_zero_not_nan():
    logits = tf.random.normal((2, 4, 4, 3), seed=1)
    assert losses.cross_entropy(tf.fill((2, 4, 4), 255), logits).numpy() == 0.0


def test_cross_entropy_accepts_float16_logits():
    logits = tf.random.normal((1, 4, 4, 3), seed=2)
    labels = tf.zeros((1, 4, 4), tf.uint8)
    np.testing.assert_allclose(losses.cross_entropy(labels, tf.cast(logits, tf.float16)).numpy(),
                               losses.cross_entropy(labels, logits).numpy(), rtol=1e-2)


def test_distillation_counts_only_pixels_where_the_teacher_is_correct():
    # Pixel 0: teacher right (class 0); pixel 1: teacher wrong (predicts 0, label 1); pixel 2: ignored.
    teacher = np.array([[[[3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [3.0, 0.0, 0.0]]]], np.float32)
    student = np.array([[[[0.0, 1.0, 0.0], [0.0, 5.0, 0.0], [0.0, 5.0, 0.0]]]], np.float32)
    labels = np.array([[[0, 1, 255]]], np.uint8)
    temperature = 2.0
    t, s = _np_log_softmax(teacher[0, 0, 0] / temperature), _np_log_softmax(student[0, 0, 0] / temperature)
    expected = np.sum(np.exp(t) * (t - s)) * temperature ** 2
    got = losses.positive_filtering_distillation(labels, student, teacher, temperature)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_distillation_is_zero_when_the_student_matches_and_gives_the_teacher_no_gradient():
    logits = tf.Variable(tf.random.normal((1, 4, 4, 3), seed=3))
    labels = tf.argmax(logits, -1)
    with tf.GradientTape() as tape:
        kd = losses.positive_filtering_distillation(labels, tf.identity(logits) * 1.0, logits)
    assert abs(kd.numpy()) < 1e-6
    teacher = tf.Variable(tf.random.normal((1, 4, 4, 3), seed=4))
    with tf.GradientTape() as tape:
        kd = losses.positive_filtering_distillation(tf.argmax(teacher, -1), logits, teacher)
    assert tape.gradient(kd, teacher) is None


def test_exit_loss_without_distillation_is_cross_entropy():
    rng = np.random.default_rng(5)
    student, teacher = rng.normal(size=(2, 1, 4, 4, 3)).astype(np.float32)
    labels = np.argmax(teacher, -1)
    total, ce, kd = losses.exit_loss(labels, student, None)
    assert total.numpy() == ce.numpy() and kd.numpy() == 0.0
    np.testing.assert_allclose(ce.numpy(), losses.cross_entropy(labels, student).numpy(), rtol=1e-6)
    for temperature in (1.0, 2.0):  # one target, computed once, serves every exit
        target = losses.distillation_target(labels, teacher, temperature)
        total, ce, kd = losses.exit_loss(labels, student, target, distillation_weight=0.5)
        np.testing.assert_allclose(kd.numpy(), losses.positive_filtering_distillation(labels, student, teacher,
                                                                                      temperature).numpy(), rtol=1e-6)
        assert kd.numpy() > 0
        np.testing.assert_allclose(total.numpy(), ce.numpy() + 0.5 * kd.numpy(), rtol=1e-6)
