"""The calibration cache: per-image statistics, a resumable pass, save/load, fingerprints."""
import numpy as np
import pytest

from mess_tf import calibration, policy

CLASSES, IMAGES, EXITS = 3, 7, ("a:fcn_w0_b0", "b:fcn_w0_b0")
TH_PIX = (0.5, 0.7, 0.9)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, (IMAGES, 6, 6))
    labels[:, 0] = 255
    logits = {k: rng.normal(size=(IMAGES, 6, 6, CLASSES)).astype(np.float32) for k in (*EXITS, "final")}
    # The policy reads each exit's own low-resolution logits, distinct from the scored ones.
    logits.update({f"{k}/coarse": rng.normal(size=(IMAGES, 3, 3, CLASSES)).astype(np.float32) for k in EXITS})
    images = np.arange(IMAGES, dtype=np.float32)[:, None, None, None] * np.ones((1, 6, 6, 3), np.float32)
    return images, labels, logits


def _predictions(logits, index):
    return calibration.from_logits(({k: logits[k][index] for k in (*EXITS, "final")},
                                    {k: logits[f"{k}/coarse"][index] for k in EXITS}), EXITS, (8, 16), TH_PIX,
                                   policy.PolicyConfig())


def _build(images, labels, logits, calls, **kwargs):
    def predict(batch):
        calls.extend(batch[:, 0, 0, 0].astype(int).tolist())
        index = batch[:, 0, 0, 0].astype(int)
        return _predictions(logits, index)

    batches = [(images[i:i + 3], labels[i:i + 3]) for i in range(0, IMAGES, 3)]
    return calibration.build_cache(predict, batches, EXITS, (8, 16), CLASSES, TH_PIX, policy.PolicyConfig(),
                                   {"name": "toy"}, "abc", [f"im{i}" for i in range(IMAGES)], **kwargs)


def test_cache_holds_the_policy_fractions_and_the_confusion_counts():
    images, labels, logits = _data()
    cache = _build(images, labels, logits, [])
    assert cache.conf_frac.shape == (IMAGES, 2, 3) and cache.tp.shape == (IMAGES, 3, CLASSES)
    n = 4
    np.testing.assert_array_equal(cache.conf_frac[n, 1],
                                  policy.confidence_fractions(logits[f"{EXITS[1]}/coarse"][n], 16, TH_PIX))
    pred, label = logits["final"][n].argmax(-1), labels[n]
    valid = label != 255
    for c in range(CLASSES):
        assert cache.tp[n, 2, c] == np.sum((pred == c) & (label == c) & valid)
        assert cache.fp[n, 2, c] == np.sum((pred == c) & (label != c) & valid)
        assert cache.fn[n, 2, c] == np.sum((pred != c) & (label == c))
    assert (cache.tp + cache.fn)[:, :, :].sum(-1).max() == 30  # the 255 row is ignored


def test_interrupted_pass_resumes_where_it_stopped(tmp_path):
    images, labels, logits = _data()
    partial = str(tmp_path / "partial.npz")
    calls = []

    def failing(batch):
        if len(calls) >= 3:
            raise KeyboardInterrupt
        calls.extend(batch[:, 0, 0, 0].astype(int).tolist())
        index = batch[:, 0, 0, 0].astype(int)
        return _predictions(logits, index)

    batches = [(images[i:i + 3], labels[i:i + 3]) for i in range(0, IMAGES, 3)]
    with pytest.raises(KeyboardInterrupt):
        calibration.build_cache(failing, batches, EXITS, (8, 16), CLASSES, TH_PIX, policy.PolicyConfig(),
                                {"name": "toy"}, "abc", [f"im{i}" for i in range(IMAGES)],
                                checkpoint_every=1, partial_path=partial)
    resumed_calls = []
    resumed = _build(images, labels, logits, resumed_calls, checkpoint_every=1, partial_path=partial)
    assert resumed_calls == [3, 4, 5, 6]  # the first batch was saved and is not run again
    fresh = _build(images, labels, logits, [])
    for name in ("conf_frac", "tp", "fp", "fn"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(fresh, name))
    assert not (tmp_path / "partial.npz").exists()


def test_partial_pass_of_other_settings_is_refused(tmp_path):
    images, labels, logits = _data()
    partial = str(tmp_path / "partial.npz")
    cache = _build(images, labels, logits, [])
    calibration._save_partial(cache, 3, partial)
    with pytest.raises(ValueError, match="other settings"):
        calibration.build_cache(lambda x: None, [], EXITS, (8, 16), CLASSES, TH_PIX, policy.PolicyConfig("entropy"),
                                {"name": "toy"}, "abc", [f"im{i}" for i in range(IMAGES)], partial_path=partial)


def test_save_load_round_trip(tmp_path):
    images, labels, logits = _data()
    cache = _build(images, labels, logits, [])
    path = str(tmp_path / "cache.npz")
    cache.save(path)
    loaded = calibration.CalibrationCache.load(path, expected_fingerprint="abc")
    np.testing.assert_array_equal(loaded.tp, cache.tp)
    assert loaded.metadata() == cache.metadata()
    with pytest.raises(FileNotFoundError, match="not found"):
        calibration.CalibrationCache.load(str(tmp_path / "none.npz"))
    (tmp_path / "junk.npz").write_text("junk")
    data = open(path, "rb").read()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])  # an interrupted copy
    for name in ("junk.npz", "cut.npz"):
        with pytest.raises(ValueError, match=f"{name} is not a readable .npz") as error:
            calibration.CalibrationCache.load(str(tmp_path / name))
        assert "pickle" not in str(error.value)


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(ValueError, match=r"labels \[7\] are outside \[0, 3\)"):
        calibration.confusion_counts(np.zeros((2, 2), int), np.array([[0, 7], [255, 1]]), 3)


def test_checkpoint_fingerprint_follows_the_weights(tmp_path):
    for name, data in (("ckpt-1.index", b"i"), ("ckpt-1.data-00000-of-00001", b"w1"), ("other.index", b"x")):
        (tmp_path / name).write_bytes(data)
    prefix = str(tmp_path / "ckpt-1")
    first = calibration.checkpoint_fingerprint(prefix)
    assert len(first) == 16
    (tmp_path / "other.index").write_bytes(b"y")
    assert calibration.checkpoint_fingerprint(prefix) == first
    (tmp_path / "ckpt-1.data-00000-of-00001").write_bytes(b"w2")
    assert calibration.checkpoint_fingerprint(prefix) != first
    with pytest.raises(FileNotFoundError, match="no checkpoint files"):
        calibration.checkpoint_fingerprint(str(tmp_path / "ckpt-9"))
