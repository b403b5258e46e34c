"""Host timing with the LiteRT interpreter, on tiny float32 / int8 / multi-signature models."""
import os

import numpy as np
import pytest
import tensorflow as tf

from mess_tf import io_utils
from mess_tf.deployment import DeploymentConfig, ExitChoice
from mess_tf.keras_lib import keras, layers
from mess_tf.latency import host
from mess_tf.latency import table as table_lib
from mess_tf.latency.table import LatencyTable, PartLatency, TableKey, Timing
from mess_tf.policy import PolicyConfig

FAST = host.HostTimingConfig(num_threads=1, warmup_runs=2, num_runs=7)


def _conv_model(in_channels, out_channels, seed):
    keras.utils.set_random_seed(seed)
    x = keras.Input((16, 16, in_channels))
    y = layers.Conv2D(out_channels, 3, padding="same", activation="relu")(x)
    return keras.Model(x, y)


def _float32(model):
    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def _int8(model):
    rng = np.random.default_rng(0)
    shape = (1,) + tuple(model.input.shape[1:])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([rng.random(shape, dtype=np.float32)] for _ in range(8))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    return converter.convert()


@pytest.fixture(scope="module")
def float_model():
    return _float32(_conv_model(3, 8, 0))


@pytest.fixture(scope="module")
def two_signature_model(tmp_path_factory):
    first, second = _conv_model(3, 4, 1), _conv_model(4, 4, 2)
    module = tf.Module()
    module.first, module.second = first, second
    signatures = {
        "stage_1": tf.function(lambda x: {"features": first(x)}).get_concrete_function(
            tf.TensorSpec((1, 16, 16, 3), tf.float32, name="x")),
        "stage_2": tf.function(lambda x: {"features": second(x)}).get_concrete_function(
            tf.TensorSpec((1, 16, 16, 4), tf.float32, name="x")),
    }
    folder = str(tmp_path_factory.mktemp("saved"))
    tf.saved_model.save(module, folder, signatures=signatures)
    return tf.lite.TFLiteConverter.from_saved_model(folder, signature_keys=list(signatures)).convert()


def _check_timing(t, runs):
    assert t.runs == runs and t.p90_method == "exact"
    assert 0 < t.min_ms <= t.median_ms <= t.p90_ms <= t.max_ms


def test_measure_float32_from_path(tmp_path, float_model):
    path = tmp_path / "m.tflite"
    path.write_bytes(float_model)
    _check_timing(host.measure(str(path), config=FAST), FAST.num_runs)


def test_int8_inputs_use_the_input_quantisation():
    detail = {"x": {"shape": np.array([1, 64, 64, 3]), "dtype": np.int8, "quantization": (0.05, -10)}}
    x = host.random_inputs(detail, seed=3)["x"]
    assert x.dtype == np.int8 and x.shape == (1, 64, 64, 3)
    # standard normal / 0.05 + (-10): centred on the zero point, spread 20 steps, clipped to int8.
    assert abs(x.mean() + 10) < 1.0 and 15 < x.std() < 25
    np.testing.assert_array_equal(x, host.random_inputs(detail, seed=3)["x"])


def test_measure_int8_model():
    _check_timing(host.measure(_int8(_conv_model(3, 8, 0)), config=FAST), FAST.num_runs)


def test_signatures_of_a_multi_signature_model(two_signature_model):
    _check_timing(host.measure(two_signature_model, "stage_2", FAST), FAST.num_runs)
    _check_timing(host.measure_end_to_end(two_signature_model, ["stage_1", "stage_2"], FAST), FAST.num_runs)
    with pytest.raises(ValueError, match=r"has signatures \['stage_1', 'stage_2'\]; choose one"):
        host.measure(two_signature_model, config=FAST)
    with pytest.raises(ValueError, match="no signature 'stage_3'"):
        host.measure(two_signature_model, "stage_3", FAST)


def test_bad_model_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="TFLite model not found"):
        host.measure(str(tmp_path / "missing.tflite"), config=FAST)
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(ValueError, match="garbage.tflite is not a loadable TFLite model"):
        host.measure(str(garbage), config=FAST)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU pinning on this platform")
def test_pinning_applies_and_restores_affinity():
    before = os.sched_getaffinity(0)
    cpu = min(before)
    with host.pinned([cpu]):
        assert os.sched_getaffinity(0) == {cpu}
    assert os.sched_getaffinity(0) == before
    with pytest.raises(ValueError, match="cannot pin to CPUs"):
        with host.pinned([max(before) + 1000]):
            pass


def test_alternate_times_the_calls_in_turns_and_resumes():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "ab"}
    config = host.HostTimingConfig(warmup_runs=1, num_runs=5, block_runs=2)
    turns = []
    samples = host.alternate(calls, config, after_turn=lambda turn, total, s: turns.append((turn, total)))
    assert {name: len(t) for name, t in samples.items()} == {"a": 5, "b": 5}
    # Warm-up, then per turn one untimed call and a block of up to 2 timed ones, each in turn.
    assert "".join(order) == "ab" + "aaabbb" + "aaabbb" + "aabb"
    assert turns == [(1, 3), (2, 3), (3, 3)]

    order.clear()
    samples = host.alternate(calls, config, samples={"a": [1.0] * 4, "b": [1.0]})
    assert "".join(order) == "ab" + "aabbb" + "bbb"  # a needs 1 more run, b 4 more
    assert samples["a"][:4] == [1.0] * 4 and len(samples["a"]) == len(samples["b"]) == 5

    order.clear()
    host.alternate({"a": calls["a"]}, config)  # alone: no untimed call between its blocks
    assert order == ["a"] * 6


def test_measure_parts_fills_and_resumes(tmp_path, float_model, monkeypatch):
    key = TableKey(host.host_device(), "float32", 1, (16, 16))
    path = str(tmp_path / "table.json")
    parts = {"segment:p1": float_model, "head:p1:fcn": table_lib.PartModel(float_model, macs=1234)}
    stride8 = PolicyConfig(confidence_stride=8)  # what the head models were converted with
    table = host.measure_parts(parts, path, key, ["p1", "p2"], FAST, policy_config=stride8)
    assert table.part_keys() == ["segment:p1", "head:p1:fcn"] and table.policy == stride8
    assert table.heads["p1:fcn"].macs == 1234 and table.heads["p1:fcn"].runs == FAST.num_runs
    assert table.metadata["runtime"].startswith("ai-edge-litert") and table.metadata["block_runs"] == FAST.block_runs
    assert not os.path.exists(path + ".runs.json")

    timed = []
    real_alternate = host.alternate
    monkeypatch.setattr(host, "alternate", lambda calls, *a: timed.append(sorted(calls)) or real_alternate(calls, *a))
    parts.update({"segment:p2": float_model, "final_head": float_model})
    table = host.measure_parts(parts, path, key, ["p1", "p2"], FAST, policy_config=stride8)
    assert timed == [["final_head", "segment:p2"]] and table.final_head is not None
    assert LatencyTable.load(path) == table
    with pytest.raises(ValueError, match="num_threads=1"):
        host.measure_parts(parts, path, TableKey(host.host_device(), "float32", 4, (16, 16)), ["p1"], FAST)


def test_an_interrupted_measure_parts_goes_on_from_its_saved_runs(tmp_path, float_model, monkeypatch):
    key = TableKey(host.host_device(), "float32", 1, (16, 16))
    path = str(tmp_path / "table.json")
    parts = {"segment:p1": float_model, "final_head": float_model}
    config = host.HostTimingConfig(num_threads=1, warmup_runs=1, num_runs=6, block_runs=2)
    real_alternate = host.alternate

    def interrupted_after_turn_1(calls, config, samples, after_turn):
        def save_then_die(turn, turns, s):
            after_turn(turn, turns, s)
            raise KeyboardInterrupt
        return real_alternate(calls, config, samples, save_then_die)

    monkeypatch.setattr(host, "alternate", interrupted_after_turn_1)
    monkeypatch.setattr(host, "SAVE_RUNS_S", 0.0)  # save after every turn
    with pytest.raises(KeyboardInterrupt):
        host.measure_parts(parts, path, key, ["p1"], config)
    saved = io_utils.read_json(path + ".runs.json")
    assert {k: len(v) for k, v in saved["samples"].items()} == {"segment:p1": 2, "final_head": 2}
    assert LatencyTable.load(path).part_keys() == []  # nothing half-timed in the table

    resumed_from = []
    monkeypatch.setattr(host, "alternate", lambda calls, config, samples, after_turn: resumed_from.append(
        {k: len(v) for k, v in samples.items()}) or real_alternate(calls, config, samples, after_turn))
    table = host.measure_parts(parts, path, key, ["p1"], config)
    assert resumed_from == [{"segment:p1": 2, "final_head": 2}]
    assert table.segments["p1"].runs == table.final_head.runs == 6
    assert not os.path.exists(path + ".runs.json")

    # Runs saved with other settings, or unreadable, are not reused: the table is timed afresh.
    for stale in ('{"parts": ["segment:p1"], "num_runs": 99, "samples": {}}', "{not json"):
        os.remove(path)
        with open(path + ".runs.json", "w") as f:
            f.write(stale)
        resumed_from.clear()
        table = host.measure_parts(parts, path, key, ["p1"], config)
        assert resumed_from == [{}] and table.segments["p1"].runs == 6


def test_composition_errors_arithmetic():
    entry = lambda ms: PartLatency(ms, ms, 10)  # noqa: E731
    table = LatencyTable(TableKey("host:x86_64", "float32", 1, (16, 16)), ("p1", "p2"),
                         segments={"p1": entry(2.0), "p2": entry(3.0)}, heads={"p1:fcn": entry(1.0)},
                         final_head=entry(4.0), class_maps={"p1": entry(0.5)})
    measured = lambda ms: Timing(ms, ms, ms, ms, ms, 0.0, 10)  # noqa: E731
    checks, median = host.composition_errors(table, [
        ("budgeted", DeploymentConfig("budgeted", [ExitChoice("p1", "fcn")]), measured(4.375)),  # composed 3.5
        # run to the final exit: exit p1's class map is not computed.
        ("dynamic", DeploymentConfig("dynamic", [ExitChoice("p1", "fcn")]), measured(10.0)),  # composed 10.0
        ("baseline", DeploymentConfig("budgeted"), measured(10.0)),  # composed 9.0
    ])
    assert [c.composed_ms for c in checks] == [3.5, 10.0, 9.0]
    assert [c.error for c in checks] == pytest.approx([0.2, 0.0, 0.1])
    assert median == pytest.approx(0.1)
