"""The built-in demo dataset (determinism, layout, difficulty mix) and the tf.data pipelines on it."""
import filecmp
import os

import numpy as np
import pytest

from mess_tf.data import demo, files, pipeline, registry
from mess_tf.data.demo import scenes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return demo.generate(str(tmp_path_factory.mktemp("demo") / "data"), "tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_things(tmp_path_factory):
    return demo.generate(str(tmp_path_factory.mktemp("demo") / "things"), "tiny_things", seed=0)


def _all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_same_seed_same_bytes_other_seed_other_images(tiny, tmp_path):
    again = demo.generate(str(tmp_path / "again"), "tiny", seed=0)
    names = _all_files(tiny)
    assert names == _all_files(again) and len(names) == 2 * 96 + 3
    match, mismatch, errors = filecmp.cmpfiles(tiny, again, names, shallow=False)
    assert not mismatch and not errors
    other = demo.generate(str(tmp_path / "other"), "tiny", seed=1)
    assert not filecmp.cmp(os.path.join(tiny, "images/train/train_00000.png"),
                           os.path.join(other, "images/train/train_00000.png"), shallow=False)


def test_layout_classes_and_splits(tiny):
    dataset = registry.get_dataset("demo", tiny)
    assert dataset.info.class_names == scenes.CLASS_NAMES and dataset.info.num_classes == 17
    assert dataset.info.class_names[:7] == ("sky", "vegetation", "wall", "road", "terrain", "signage", "carpet")
    assert dataset.splits == ("calibration", "test", "train", "val")
    for split in demo.SPLITS:
        samples = dataset.samples(split)
        assert len(samples) == demo.PRESETS["tiny"].count(split)
    good, problems = files.check_samples(dataset.samples("train"), dataset.info, image_size=(64, 64))
    assert len(good) == 48 and not problems
    labels = np.stack([files.load_label(s.label_path, dataset.info) for s in dataset.samples("train")])
    assert set(np.unique(labels)) <= set(range(17)) and len(np.unique(labels)) == 17
    assert all(p.image_size % 32 == 0 for p in demo.PRESETS.values())
    assert registry.get_dataset("demo", tiny).info.num_classes == demo.info("tiny").num_classes


def test_scenes_are_mostly_stuff_with_every_class_present():
    # What the scenes imitate (issue #22): stuff >= 60% of the pixels, things 10-35%, every class
    # >= 0.5%, some images without things, difficulty spread. 300 images of the quick preset's size.
    records = {f"train_{i}": {"split": "train", **demo.render_sample("train", i, "quick")[2]} for i in range(300)}
    shares = demo.class_shares(records, scenes.CLASS_NAMES, scenes.THING_CLASSES)
    assert shares["stuff_percent"] >= 60 and 10 <= shares["things_percent"] <= 35
    assert shares["smallest_class"][1] >= 0.5 and set(shares["class_percent"]) == set(scenes.CLASS_NAMES)
    summary = demo.summarize(records)
    assert 0 < summary["images_without_things"] < 100 and max(summary["objects_per_image"]) >= 6
    assert all(summary["difficulty"][k] >= 60 for k in ("easy", "medium", "hard"))
    # Long-tailed thing sizes: many small digits, few large (median well below the mean).
    heights = np.array([o["height_px"] for r in records.values() for o in r["object_list"]])
    assert np.median(heights) < 0.85 * heights.mean()
    hard = [r for r in records.values() if r["difficulty"] >= 2 / 3]
    easy = [r for r in records.values() if r["difficulty"] < 1 / 3]
    assert np.mean([r["objects"] for r in hard]) > np.mean([r["objects"] for r in easy]) + 2
    assert np.mean([r["regions"] for r in hard]) > np.mean([r["regions"] for r in easy])


def test_difficulty_mix_is_recorded_and_spread(tiny_things):
    records = demo.load_records(tiny_things)
    assert len(records) == 96
    summary = demo.summarize(records)
    assert summary["images"] == 96 and sum(summary["objects_per_image"].values()) == 96
    assert min(summary["objects_per_image"]) == 1 and max(summary["objects_per_image"]) >= 4
    assert all(summary["difficulty"][k] >= 15 for k in ("easy", "medium", "hard"))
    assert summary["contrast"]["p10"] < 0.15 < 0.25 < summary["contrast"]["p90"]
    assert summary["noise_sigma"]["p10"] < 4 < 12 < summary["noise_sigma"]["p90"]
    assert summary["occluded_images"] > 0 and summary["visible_fraction"]["p50"] == 1.0
    # Hard images really hold more, smaller, lower-contrast digits.
    easy = [r for r in records.values() if r["difficulty"] < 1 / 3]
    hard = [r for r in records.values() if r["difficulty"] >= 2 / 3]
    mean = lambda rs, f: np.mean([f(r) for r in rs])  # noqa: E731
    # Counts are 1 .. 1 + round(3d): about 1.2 digits on easy images and 2.2 on hard ones.
    assert mean(hard, lambda r: r["objects"]) > mean(easy, lambda r: r["objects"]) + 0.75
    assert mean(hard, lambda r: r["object_list"][0]["contrast"]) < mean(easy, lambda r: r["object_list"][0]["contrast"])
    assert demo.summarize(records, "test")["images"] == 16


def test_generate_reuses_same_data_and_refuses_other(tiny, tmp_path):
    stamp = os.path.join(tiny, demo.STAMP_FILE)
    before = os.path.getmtime(stamp)
    assert demo.generate(tiny, "tiny", seed=0) == tiny and os.path.getmtime(stamp) == before
    with pytest.raises(ValueError, match=r"holds scenes data of generator version 1, preset 'tiny', seed 0; preset "
                                         r"'tiny' with seed 5 is scenes data of version 1\. Regenerate it: rm -r .* && "
                                         r"python -m tools\.make_demo_data --preset=tiny --seed=5 --out="):
        demo.generate(tiny, "tiny", seed=5)
    # A folder written by the generator before the scenes existed (no kind, version 3 digits).
    old = tmp_path / "old"
    old.mkdir()
    (old / demo.STAMP_FILE).write_text('{"preset": "default", "seed": 0, "version": 3, "image_size": 384}')
    with pytest.raises(ValueError, match=r"holds things data of generator version 3, preset 'default'.*"
                                         r"python -m tools\.make_demo_data --preset=default --seed=0"):
        demo.generate(str(old), "default", seed=0)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    with pytest.raises(ValueError, match="is not a demo dataset folder"):
        demo.generate(str(tmp_path / "mine"), "tiny")
    with pytest.raises(ValueError, match="unknown demo preset 'huge'; expected one of tiny, tiny_things, quick"):
        demo.generate(str(tmp_path / "x"), "huge")
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_train_pipeline_is_deterministic_resumable_and_augmented(tiny):
    dataset = registry.get_dataset("demo", tiny)
    samples = dataset.samples("train")

    def take(seed, skip=0, count=4, first_batch=0):
        data = pipeline.train_dataset(samples, dataset.info, (32, 64), 4, seed=seed, multiple_of=32,
                                      first_batch=first_batch)
        return [(x.numpy(), y.numpy()) for x, y in data.skip(skip).take(count)]

    first = take(seed=3, count=14)  # 14 batches of 4 > 48 samples: crosses an epoch boundary
    assert first[0][0].shape == (4, 32, 64, 3) and first[0][0].dtype == np.float32
    assert first[0][1].shape == (4, 32, 64) and first[0][1].dtype == np.uint8
    assert 0 <= min(x.min() for x, _ in first) and max(x.max() for x, _ in first) <= 255
    labels = np.concatenate([y for _, y in first])
    assert 255 in labels and set(np.unique(labels)) <= set(range(17)) | {255}  # zoomed-out crops pad with ignore
    # A resumed run starts the stream at its batch: the same batches as skipping there.
    for resumed in (take(seed=3, skip=12, count=2), take(seed=3, first_batch=12, count=2)):
        for (x, y), (rx, ry) in zip(first[12:], resumed, strict=True):
            np.testing.assert_array_equal(x, rx)
            np.testing.assert_array_equal(y, ry)
    assert not np.array_equal(take(seed=4, count=1)[0][0], first[0][0])
    # Autotuning stays off: dropping an autotuned iterator stalled for up to 17 s (bench/iterator_teardown.py).
    assert pipeline.train_dataset(samples, dataset.info, (32, 64), 4).options().autotune.enabled is False
    with pytest.raises(ValueError, match="crop_size 33x64 must be positive multiples of 32"):
        pipeline.train_dataset(samples, dataset.info, (33, 64), 4, multiple_of=32)


def test_eval_pipeline_keeps_order_names_and_pixels(tiny):
    dataset = registry.get_dataset("demo", tiny)
    samples = dataset.samples("val")
    batches = list(pipeline.eval_dataset(samples, dataset.info, (64, 64), 5, multiple_of=32, with_names=True))
    assert [len(b[0]) for b in batches] == [5, 5, 5, 1]
    names = [n.decode() for b in batches for n in b[2].numpy()]
    assert names == [s.name for s in samples]
    assert pipeline.eval_dataset(samples, dataset.info, (64, 64), 5).options().autotune.enabled is False
    np.testing.assert_array_equal(batches[0][0][1].numpy(), files.load_image(samples[1].image_path))
    numpy_batches = list(pipeline.eval_batches(samples, dataset.info, (64, 64), 5))
    np.testing.assert_array_equal(numpy_batches[3][1], batches[3][1].numpy())
    padded = next(pipeline.eval_batches(samples, dataset.info, (96, 128), 2, mode="pad"))
    assert padded[0].shape == (2, 96, 128, 3)
    assert (padded[1][:, 64:] == 255).all() and (padded[1][:, :, 64:] == 255).all()
    resized = next(pipeline.eval_batches(samples, dataset.info, (32, 32), 1))
    assert resized[1].shape == (1, 32, 32) and set(np.unique(resized[1])) <= set(range(17))
    with pytest.raises(ValueError, match="does not fit the evaluation size 32x32 with mode='pad'"):
        next(pipeline.eval_batches(samples, dataset.info, (32, 32), 1, mode="pad"))
    with pytest.raises(ValueError, match="evaluation size 48x64 must be positive multiples of 32"):
        pipeline.eval_dataset(samples, dataset.info, (48, 64), 1, multiple_of=32)


def test_make_demo_data_cli_prints_the_mix(tiny):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "tools.make_demo_data", "--preset=tiny", f"--out={tiny}", "--seed=0"],
                         cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    histogram = demo.summarize(demo.load_records(tiny))["objects_per_image"]
    lines = run.stdout.split("objects per image:\n")[1].splitlines()[:len(histogram)]
    assert [tuple(map(int, line.split()[:2])) for line in lines] == list(histogram.items())
    assert "difficulty mix over 96 images" in run.stdout
