"""LatencyTable: JSON round trip, validation errors, composition, merge and resumable filling."""
import dataclasses
import json

import numpy as np
import pytest

from mess_tf.deployment import DeploymentConfig, ExitChoice
from mess_tf.latency import table as table_lib
from mess_tf.latency.table import LatencyTable, PartLatency, TableKey, Timing
from mess_tf.policy import PolicyConfig

POSITIONS = ("p1", "p2", "p3")
KEY = TableKey("host:x86_64", "int8", 2, (64, 96))


def _entry(ms, macs=None):
    return PartLatency(median_ms=ms, p90_ms=ms * 1.5, runs=20, macs=macs)


def _full_table():
    return LatencyTable(
        KEY, POSITIONS,
        segments={"p1": _entry(2.0, 1000), "p2": _entry(3.0, 2000), "p3": _entry(5.0, 4000)},
        heads={"p1:fcn": _entry(0.5, 100), "p2:fcn": _entry(1.0, 200)},
        final_head=_entry(4.0, 3000), metadata={"tool": "test"},
        class_maps={"p1": _entry(0.25), "p2": _entry(0.4)})


def test_timing_from_samples_statistics():
    t = Timing.from_samples(np.arange(1, 11, dtype=float))  # 1..10 ms
    assert (t.median_ms, t.min_ms, t.max_ms, t.mean_ms, t.runs) == (5.5, 1.0, 10.0, 5.5, 10)
    assert t.p90_ms == pytest.approx(9.1)
    assert t.p90_method == "exact"
    with pytest.raises(ValueError, match="non-empty"):
        Timing.from_samples([])


def test_part_keys_round_trip_and_reject_garbage():
    for kind, name in (("segment", "block_3_add"), ("head", "block_3_add:fcn_w64_b1"), ("class_map", "block_3_add"),
                       ("final_head", None)):
        assert table_lib.parse_part_key(table_lib.part_key(kind, name)) == (kind, name)
    with pytest.raises(ValueError, match="part key"):
        table_lib.parse_part_key("backbone:p1")


def test_save_load_round_trip(tmp_path):
    table = _full_table()
    path = tmp_path / "t.json"
    table.save(path)
    loaded = LatencyTable.load(path)
    assert loaded == table
    assert json.loads(path.read_text())["key"]["input_size"] == [64, 96]


def test_the_policy_the_heads_were_timed_with_travels_with_the_table(tmp_path):
    stride8 = PolicyConfig(confidence_stride=8)
    table = _full_table()
    table.policy = stride8
    table.save(tmp_path / "t.json")
    loaded = LatencyTable.load(tmp_path / "t.json")
    assert loaded.policy == stride8 and loaded.cost_table().policy == stride8
    # Tables saved before the policy was recorded were timed with the default one.
    d = table.to_dict()
    del d["policy"]
    (tmp_path / "old.json").write_text(json.dumps(d))
    assert LatencyTable.load(tmp_path / "old.json").policy == PolicyConfig()
    with pytest.raises(ValueError, match="heads were timed with different exit policies"):
        _full_table().merge(table)


def test_the_network_timed_travels_with_the_table_and_an_old_table_gives_its_input_size(tmp_path):
    table = _full_table()
    table.network_identity = {"input_size": [64, 96], "num_classes": 21, "parts": "0123456789abcdef"}
    table.save(tmp_path / "t.json")
    loaded = LatencyTable.load(tmp_path / "t.json")
    assert loaded.network_identity == table.network_identity == loaded.cost_table().network_identity
    d = table.to_dict()
    del d["network_identity"]  # written before tables recorded their network
    (tmp_path / "old.json").write_text(json.dumps(d))
    assert LatencyTable.load(tmp_path / "old.json").cost_table().network_identity == {"input_size": [64, 96]}
    with pytest.raises(ValueError, match="latency tables of different networks"):
        table.merge(dataclasses.replace(table, network_identity={**table.network_identity, "num_classes": 11}))


def test_composition_matches_hand_arithmetic():
    table = _full_table()
    dynamic = DeploymentConfig("dynamic", [ExitChoice("p1", "fcn"), ExitChoice("p2", "fcn")])
    # exit p1: 2 + 0.5 + its class map 0.25; exit p2: 2 + 3 + 0.5 + 1 + its class map 0.4;
    # final: 2 + 3 + 5 + 0.5 + 1 + 4 (the early exits passed compute no class map).
    costs = [2.75, 6.9, 15.5]
    fractions = [0.5, 0.3, 0.2]
    assert table.expected_latency(dynamic, fractions) == pytest.approx(np.dot(fractions, costs))
    assert table.worst_latency(dynamic) == pytest.approx(15.5)
    assert table.worst_latency(dynamic, stat="p90") == pytest.approx(15.5 * 1.5)
    budgeted = DeploymentConfig("budgeted", [ExitChoice("p2", "fcn")])
    assert table.worst_latency(budgeted) == pytest.approx(6.4)
    assert table.cost_table().unit == "ms"
    with pytest.raises(ValueError, match="stat must be"):
        table.cost_table("mean")


def test_incomplete_table_cannot_compose():
    table = LatencyTable(KEY, POSITIONS, segments={"p1": _entry(1.0)})
    with pytest.raises(ValueError, match=r"incomplete: segments \['p2', 'p3'\] and the final head"):
        table.cost_table()
    without_class_map = _full_table()
    del without_class_map.class_maps["p2"]
    assert without_class_map.worst_latency(DeploymentConfig("budgeted")) == pytest.approx(14.0)
    with pytest.raises(ValueError, match="no class-map cost at position 'p2' \\(exit 'p2:fcn'\\)"):
        without_class_map.worst_latency(DeploymentConfig("budgeted", [ExitChoice("p2", "fcn")]))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("segments"), "missing key 'segments'"),
    (lambda d: d.update(version=99), "version 99 is not supported"),
    (lambda d: d["key"].update(precision="int4"), "precision 'int4'"),
    (lambda d: d["key"].update(threads="2"), "threads must be a positive integer"),
    (lambda d: d["segments"]["p1"].update(median_ms="fast"), "segment:p1.*median_ms must be a non-negative number"),
    (lambda d: d["segments"]["p1"].update(runs=0), "runs must be a positive integer"),
    (lambda d: d["segments"].update(p9=d["segments"]["p1"]), r"segment entries \['p9'\] are not among the positions"),
    (lambda d: d["class_maps"].update(p9=d["segments"]["p1"]), r"class_map entries \['p9'\] are not among"),
    (lambda d: d.update(version=1), "a version 1 table timed heads with their full-resolution logits"),
    (lambda d: d.update(heads=[]), "heads must be an object"),
    (lambda d: d.update(policy="top1"), "policy must be an object"),
    (lambda d: d.update(policy={"confidence_stride": 3}), "confidence_stride must be a power of two"),
])
def test_load_rejects_bad_files_naming_them(tmp_path, mutate, message):
    d = _full_table().to_dict()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message) as info:
        LatencyTable.load(path)
    assert str(path) in str(info.value)


def test_load_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="latency table not found"):
        LatencyTable.load(tmp_path / "none.json")


def test_merge_keeps_old_entries_and_takes_new_ones():
    old = LatencyTable(KEY, POSITIONS, segments={"p1": _entry(1.0), "p2": _entry(2.0)})
    new = LatencyTable(KEY, POSITIONS, segments={"p2": _entry(2.5)}, final_head=_entry(4.0))
    merged = old.merge(new)
    assert merged.segments == {"p1": _entry(1.0), "p2": _entry(2.5)}
    assert merged.final_head == _entry(4.0)
    other_device = LatencyTable(TableKey("adb:X:Pixel 7", "int8", 2, (64, 96)), POSITIONS)
    with pytest.raises(ValueError, match="different keys"):
        old.merge(other_device)


def test_fill_table_keeps_finished_parts_and_resumes(tmp_path):
    path = tmp_path / "t.json"
    parts = ["final_head", "head:p1:fcn", "segment:p3", "segment:p2", "segment:p1"]  # measured in depth order
    measured = []

    def dies_on_third(key):
        if len(measured) == 2:
            raise RuntimeError("device lost")
        measured.append(key)
        return Timing.from_samples([1.0, 2.0, 3.0])

    empty = LatencyTable(KEY, POSITIONS, metadata={"tool": "test"})
    with pytest.raises(RuntimeError, match="device lost"):
        table_lib.fill_table(path, empty, parts, dies_on_third)
    assert LatencyTable.load(path).part_keys() == ["segment:p1", "segment:p2"]

    resumed = []

    def works(key):
        resumed.append(key)
        return Timing.from_samples([float(len(resumed))])

    table = table_lib.fill_table(path, empty, parts, works, macs={"final_head": 77})
    assert resumed == ["segment:p3", "head:p1:fcn", "final_head"]
    assert table.final_head.macs == 77 and table.segments["p1"].median_ms == 2.0
    assert LatencyTable.load(path) == table
    elsewhere = LatencyTable(TableKey("host:x86_64", "float32", 2, (64, 96)), POSITIONS)
    with pytest.raises(ValueError, match="cannot resume from .*different keys.*move it away"):
        table_lib.fill_table(path, elsewhere, parts, works)
    other_policy = LatencyTable(KEY, POSITIONS, policy=PolicyConfig(edge_smoothing=False))
    with pytest.raises(ValueError, match="cannot resume from .*different exit policies.*move it away"):
        table_lib.fill_table(path, other_policy, parts, works)
    old = table.to_dict()
    old["version"] = 1
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="cannot resume from .*version 1 table timed heads.*move it away"):
        table_lib.fill_table(path, empty, parts, works)


def test_part_manifest_round_trip_and_missing_model(tmp_path):
    (tmp_path / "a.tflite").write_bytes(b"x")
    parts = {"segment:p1": table_lib.PartModel(str(tmp_path / "a.tflite"), "stage_1", 123)}
    table_lib.PartManifest(POSITIONS, parts, "int8", (64, 96)).save(tmp_path)
    manifest = table_lib.PartManifest.load(tmp_path)
    assert manifest.parts == parts and manifest.positions == POSITIONS and manifest.input_size == (64, 96)
    (tmp_path / "a.tflite").unlink()
    with pytest.raises(FileNotFoundError, match="segment:p1 not found"):
        table_lib.PartManifest.load(tmp_path / "parts.json")
    (tmp_path / "parts.json").write_text(json.dumps({"positions": ["p1"], "parts": {}}))
    with pytest.raises(ValueError, match="part manifest .* is malformed"):
        table_lib.PartManifest.load(tmp_path)


def test_part_manifest_write_saves_models_and_policy(tmp_path):
    models = {"segment:p1": table_lib.PartModel(b"seg", macs=7), "head:p1/add:fcn_w32_b1": table_lib.PartModel(b"head")}
    written = table_lib.PartManifest.write(tmp_path / "parts", models, POSITIONS, "int8", (64, 96),
                                           PolicyConfig(confidence_stride=8))
    assert (tmp_path / "parts" / "head__p1_add__fcn_w32_b1.tflite").read_bytes() == b"head"  # no subfolder
    loaded = table_lib.PartManifest.load(tmp_path / "parts")
    assert loaded == written and loaded.policy == PolicyConfig(confidence_stride=8)
    assert loaded.parts["segment:p1"].macs == 7 and open(loaded.parts["segment:p1"].model, "rb").read() == b"seg"
