"""Stage 2 on stored views: the same heads as the direct path, frozen parts untouched, exact
resume, and stores that belong to another run refused or rebuilt."""
import json
import logging
import os

import _train_worker as fixtures
import numpy as np
import pytest
import tensorflow as tf

from mess_tf import stored_views, training
from mess_tf.deployment import FINAL_EXIT

EXITS = ("block_2_add:fcn_w8_b0", "block_5_add:aspp_w8")
IMAGES = 16  # synthetic_dataset's epoch
BATCH = 4


def _config(**kwargs):
    base = dict(stage="stage2", steps=4, batch_size=BATCH, learning_rate=0.05, exits=EXITS, checkpoint_every=2,
                log_every=1, eval_batches=0, seed=1)
    return training.TrainConfig(**{**base, **kwargs})


def _train(run_dir, config, init_from, progress=None, val=False, network_config=None):
    return training.train(network_config or fixtures.tiny_network_config(), config,
                          fixtures.synthetic_dataset(BATCH, seed=5), str(run_dir), init_from=init_from,
                          progress=progress, train_images=IMAGES,
                          val_data=fixtures.synthetic_dataset(BATCH, repeat=False, seed=9) if val else None)


def _sources(tmp_path_factory):
    """Two one-step baseline runs of different seeds: two 'stage-1 networks' to start stage 2 from."""
    runs = []
    for seed in (1, 2):
        run_dir = str(tmp_path_factory.mktemp(f"source{seed}"))
        training.train(fixtures.tiny_network_config(),
                       training.TrainConfig(stage="baseline", steps=1, batch_size=BATCH, seed=seed),
                       fixtures.synthetic_dataset(BATCH), run_dir)
        runs.append(run_dir)
    return runs


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return _sources(tmp_path_factory)


def _weights(net, trained):
    return {w.name: w.numpy() for w in net.model.weights if w.name.startswith("exit_") == trained}


class Interrupt(Exception):
    pass


def test_stored_views_train_the_heads_the_direct_path_trains(sources, tmp_path):
    direct_records, stored_records = [], []
    direct = _train(tmp_path / "direct", _config(), sources[0], direct_records.append, val=True)
    # 4 steps lie in the first pass over the stored views (16 images x 2 views / batch 4 = 8 batches),
    # which reads them in the stream's order: the same batches as the direct path.
    stored = _train(tmp_path / "stored", _config(stored_views=2, store_dtype="float32"), sources[0],
                    stored_records.append, val=True)
    steps = [r for r in stored_records if isinstance(r, training.Progress)]
    assert [r.step for r in steps] == [r.step for r in direct_records] == [1, 2, 3, 4]
    for a, b in zip(direct_records, steps):
        assert b.losses == pytest.approx(a.losses, rel=1e-4)
    for name, value in _weights(direct.network, trained=True).items():
        np.testing.assert_allclose(_weights(stored.network, trained=True)[name], value, rtol=1e-3, atol=1e-5,
                                   err_msg=name)
    # Evaluated on stored frozen outputs, the exits score what the whole network scores.
    assert stored.metrics["miou"] == pytest.approx(direct.metrics["miou"], abs=1e-6)
    fills = [r for r in stored_records if isinstance(r, training.StoreProgress)]
    assert fills[-1].batches_done == fills[-1].batches == 8 and fills[-1].views == 2


def test_the_frozen_network_is_bit_identical_after_stored_stage2(sources, tmp_path):
    source = training.checkpoints.load_network(sources[0])[0]
    before = {w.name: w.numpy() for w in source.model.weights}
    result = _train(tmp_path, _config(stored_views=2, precise_bn_batches=2), sources[0])
    frozen = _weights(result.network, trained=False)
    assert any("moving_mean" in n for n in frozen) and set(frozen) == set(before)
    for name, value in frozen.items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_a_resumed_run_equals_an_uninterrupted_one(sources, tmp_path, monkeypatch):
    config = _config(steps=12, stored_views=2)  # 12 steps: the ordered pass, then half a shuffled one
    whole = _train(tmp_path / "whole", config, sources[0])
    monkeypatch.setattr(training, "STORE_FLUSH_BATCHES", 2)

    def stop_fill(record):
        if isinstance(record, training.StoreProgress) and record.batches_done == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        _train(tmp_path / "parts", config, sources[0], stop_fill)
    header = json.load(open(tmp_path / "parts" / stored_views.FOLDER / stored_views.HEADER))
    assert header["filled"] == 4
    records = []

    def stop_training(record):
        records.append(record)
        if isinstance(record, training.Progress) and record.step == 9:
            raise Interrupt

    with pytest.raises(Interrupt):
        _train(tmp_path / "parts", config, sources[0], stop_training)
    assert [r.batches_done for r in records if isinstance(r, training.StoreProgress)] == [6, 8]  # the fill went on
    resumed = _train(tmp_path / "parts", config, sources[0])
    assert resumed.metrics["resumed_from_step"] == 8
    for name, value in _weights(whole.network, trained=True).items():
        np.testing.assert_allclose(_weights(resumed.network, trained=True)[name], value, rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_a_store_of_another_network_crop_or_positions_is_refused(sources, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "STORE_FLUSH_BATCHES", 2)

    def stop_fill(record):
        if isinstance(record, training.StoreProgress):
            raise Interrupt

    with pytest.raises(Interrupt):  # a fill stopped before any checkpoint: the run can still change
        _train(tmp_path, _config(stored_views=2), sources[0], stop_fill)
    with pytest.raises(ValueError, match=r"holds views of another stage-2 setup \(frozen_weights: store '[0-9a-f]+'"):
        _train(tmp_path, _config(stored_views=2), sources[1])
    with pytest.raises(ValueError, match=r"positions: store \['block_2_add', 'block_5_add'\], run \['block_2_add', "
                                         r"'block_4_add'\]"):
        _train(tmp_path, _config(stored_views=2, exits=("block_2_add:fcn_w8_b0", "block_4_add:fcn_w8_b0")),
               sources[0])
    with pytest.raises(ValueError, match=r"crop_size: store \[32, 32\], run \[64, 64\]"):
        training.train(fixtures.tiny_network_config(), _config(stored_views=2, crop_size=(64, 64)),
                       fixtures.synthetic_dataset(BATCH, seed=5).map(_upscale), str(tmp_path), init_from=sources[0],
                       train_images=IMAGES)


def _upscale(images, labels):
    """A 64x64 stream of the same images (the stage-2 views of another crop size)."""
    return (tf.image.resize(images, (64, 64)),
            tf.cast(tf.image.resize(labels[..., None], (64, 64), method="nearest")[..., 0], tf.uint8))


def test_a_truncated_or_foreign_store_is_rebuilt_with_a_warning(tmp_path, caplog):
    spec = stored_views.StoreSpec(2, 4, 2, {"p": (2, 2, 3), FINAL_EXIT: (2, 2, 5), stored_views.LABELS: (4, 4)},
                                  "float16", {"frozen_weights": "abc"})
    store = stored_views.ViewStore.open(str(tmp_path), spec)
    rng = np.random.default_rng(0)
    batches = iter([(None, rng.integers(0, 5, (2, 4, 4)).astype(np.uint8)) for _ in range(4)])
    store.fill(batches, lambda _: {"p": rng.normal(size=(2, 2, 2, 3)),
                                   FINAL_EXIT: rng.normal(size=(2, 2, 2, 5))})
    assert store.complete and stored_views.ViewStore.open(str(tmp_path), spec).complete  # reopened as it is
    inputs, labels = store.batch(1, seed=0)
    assert inputs["p"].dtype == np.float32 and inputs["p"].shape == (2, 2, 2, 3) and labels.shape == (2, 4, 4)
    path = os.path.join(tmp_path, stored_views.FOLDER, "labels.npy")
    with open(path, "r+b") as f:
        f.truncate(100)
    with caplog.at_level(logging.WARNING):
        rebuilt = stored_views.ViewStore.open(str(tmp_path), spec, warn=logging.warning)
    assert rebuilt.filled == 0 and "truncated, foreign or of other sizes; rebuilding" in caplog.text
    with open(path, "wb") as f:
        f.write(b"\x80\x04not a numpy file")  # a pickle's first bytes: never unpickled
    assert stored_views.ViewStore.open(str(tmp_path), spec).filled == 0


def test_a_store_that_does_not_fit_is_one_line(sources, tmp_path):
    with pytest.raises(ValueError, match=r"one view of each of the 16 training images needs 0\.00 GB, more than the "
                                         r"bound of 0\.00 GB \(--max_store_gb\).*--stored_views=0"):
        _train(tmp_path, _config(stored_views=2, max_store_bytes=1000), sources[0])
    shapes = {"p": (10, 10, 8), stored_views.LABELS: (40, 40)}
    per_view = stored_views.bytes_per_view(shapes, "float16")
    assert per_view == 10 * 10 * 8 * 2 + 40 * 40
    assert stored_views.views_that_fit(8, 100, shapes, "float16", 3 * 100 * per_view + 5, str(tmp_path)) == 3


def test_losses_at_a_coarser_stride_train_the_same_heads_on_either_path(sources, tmp_path):
    # The exits' losses at 1/4 of the crop: both paths share them, so they still agree.
    direct = _train(tmp_path / "direct", _config(steps=2, loss_stride=4), sources[0])
    stored = _train(tmp_path / "stored", _config(steps=2, loss_stride=4, stored_views=2, store_dtype="float32"),
                    sources[0])
    full = _train(tmp_path / "full", _config(steps=2), sources[0])
    for name, value in _weights(direct.network, trained=True).items():
        np.testing.assert_allclose(_weights(stored.network, trained=True)[name], value, rtol=1e-3, atol=1e-5)
    assert direct.metrics["final_losses"] != full.metrics["final_losses"]  # another loss, not the full-size one
    with pytest.raises(ValueError, match=r"loss_stride=3 must divide the crop size \(32, 32\)"):
        _train(tmp_path / "bad", _config(loss_stride=3), sources[0])


def test_stored_views_refuse_other_strategies_and_stages():
    class TwoReplicas:
        num_replicas_in_sync = 2

    with pytest.raises(ValueError, match=r"stored views run under the default strategy only.*--stored_views=0"):
        training.train(fixtures.tiny_network_config(), _config(stored_views=2), fixtures.synthetic_dataset(BATCH),
                       "unused", strategy=TwoReplicas(), train_images=IMAGES)
    with pytest.raises(ValueError, match="stored views are for stage2 only"):
        training.TrainConfig(stage="stage1", stored_views=2)


def test_batch_rows_read_the_stream_first_then_every_view_once_per_pass():
    assert stored_views.batch_rows(3, 5, 4, seed=0) == slice(8, 12)
    second_pass = np.concatenate([stored_views.batch_rows(s, 5, 4, seed=0) for s in range(6, 11)])
    assert sorted(second_pass) == list(range(20)) and list(second_pass) != list(range(20))
    third_pass = np.concatenate([stored_views.batch_rows(s, 5, 4, seed=0) for s in range(11, 16)])
    assert list(third_pass) != list(second_pass)
    assert list(stored_views.batch_rows(7, 5, 4, seed=0)) == list(stored_views.batch_rows(7, 5, 4, seed=0))
