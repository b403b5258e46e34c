"""The headline's statistics: bootstrap intervals, paired differences, and the calibration split's size."""
import numpy as np
import pytest

from mess_tf import headline, metrics


def _counts(rng, images=200, classes=5, error=0.1):
    """int [3, N, C] per-image TP, FP, FN of a model that mislabels about `error` of the pixels."""
    pixels = rng.integers(50, 150, (images, classes))
    tp = rng.binomial(pixels, 1 - error)
    wrong = pixels - tp
    return np.stack([tp, np.roll(wrong, 1, axis=1), wrong])


def test_resampled_miou_of_the_identity_resample_is_the_miou():
    counts = _counts(np.random.default_rng(0))
    picks = np.arange(200)[None]  # one resample: every image once
    assert headline.resampled_miou(counts, picks)[0] == pytest.approx(100 * metrics.miou_from_counts(*counts.sum(1)))


def test_intervals_cover_the_estimate_and_paired_differences_are_tighter():
    rng = np.random.default_rng(1)
    a = _counts(rng, error=0.1)
    b = a.copy()
    b[0, :20], b[2, :20] = a[0, :20] - 5, a[2, :20] + 5  # b: a, 5 pixels worse on 20 of 200 images
    picks = headline.bootstrap_picks(200, draws=500, seed=0)
    ra, rb = headline.resampled_miou(a, picks), headline.resampled_miou(b, picks)
    low, high = headline.interval(ra)
    assert low < 100 * metrics.miou_from_counts(*a.sum(1)) < high
    paired = headline.interval(rb - ra)
    assert paired[1] < 0 and headline.interval(rb)[1] > low  # paired, the difference is resolved; apart, not
    assert paired[1] - paired[0] < high - low
    assert headline.interval(ra - ra) == [0.0, 0.0]


def test_calibration_sizing_follows_one_over_the_square_root_of_the_images():
    rng = np.random.default_rng(2)
    small, large = _counts(rng, images=100, error=0.3), _counts(rng, images=400, error=0.3)
    sizing = headline.calibration_sizing(small, large, draws=400)
    assert sizing["calibration_images"] == 100 and sizing["test_images"] == 400
    assert sizing["calibration_sd_pp"] > sizing["test_sd_pp"]  # four times the images, half the s.d.
    assert sizing["error_95_pp"] == pytest.approx(1.96 * np.hypot(sizing["calibration_sd_pp"], sizing["test_sd_pp"]))
    needed = sizing["calibration_images_needed"]
    room = (headline.MIOU_PREDICTION_PP / 1.96) ** 2 - sizing["test_sd_pp"] ** 2
    if room > 0:  # the size at which the calibration split's own s.d. fills the room the test split leaves
        assert needed == pytest.approx(sizing["calibration_sd_pp"] ** 2 * 100 / room, rel=0.01, abs=1)
    else:
        assert needed is None
