"""tools.profile: flag errors before any conversion; one run writing the part models for android_bench
with the exit policy their heads compute and timing them on the host in turns."""
import json
import os
import subprocess
import sys

from mess_tf.latency.table import LatencyTable, PartManifest
from mess_tf.policy import PolicyConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _profile(*flags):
    return subprocess.run([sys.executable, "-m", "tools.profile", *flags], cwd=ROOT, capture_output=True, text=True)


def test_bad_flags_are_refused_before_converting(tmp_path):
    nowhere = _profile("--backbone=mobilenet_v3_small", "--device=none")
    assert nowhere.returncode == 2 and "--device=none times nothing: give --parts_dir" in nowhere.stderr
    phone = _profile("--backbone=mobilenet_v3_small", "--device=adb:SERIAL", f"--output={tmp_path / 't.json'}")
    assert phone.returncode == 2 and "needs --benchmark_binary" in phone.stderr
    odd = _profile("--backbone=mobilenet_v3_small", "--device=phone", f"--output={tmp_path / 't.json'}")
    assert odd.returncode == 2 and "expected `host`, `adb:SERIAL` or `none`" in odd.stderr
    stride = _profile("--backbone=mobilenet_v3_small", "--input_size=64", "--confidence_stride=3",
                      f"--output={tmp_path / 't.json'}")
    assert stride.returncode == 2 and "confidence_stride must be a power of two" in stride.stderr
    turns = _profile("--backbone=mobilenet_v3_small", "--block_runs=0", f"--output={tmp_path / 't.json'}")
    assert turns.returncode != 0 and "flag --block_runs=0: 0 is not a positive integer" in turns.stderr
    assert not os.listdir(tmp_path)


def test_one_conversion_writes_the_parts_for_android_bench_and_a_host_table_timed_in_turns(tmp_path):
    table_path = tmp_path / "t.json"
    done = _profile("--backbone=mobilenet_v3_small", "--input_size=64", "--heads=fcn_w0_b0", "--precision=float32",
                    "--confidence_stride=8", "--device=host", f"--parts_dir={tmp_path / 'parts'}",
                    "--num_runs=3", "--block_runs=2", f"--output={table_path}")
    assert done.returncode == 0, done.stderr
    manifest = PartManifest.load(tmp_path / "parts")
    assert manifest.policy == PolicyConfig(confidence_stride=8) and manifest.precision == "float32"
    kinds = sorted({key.split(":")[0] for key in manifest.parts})
    assert kinds == ["class_map", "final_head", "head", "segment"]
    positions = json.loads((tmp_path / "parts" / "parts.json").read_text())["positions"]
    assert len([k for k in manifest.parts if k.startswith("segment:")]) == len(positions)
    assert all(os.path.dirname(part.model) == str(tmp_path / "parts") for part in manifest.parts.values())

    table = LatencyTable.load(table_path)
    assert sorted(table.part_keys()) == sorted(manifest.parts) and table.policy == manifest.policy
    assert table.metadata["block_runs"] == 2 and {table.get(k).runs for k in table.part_keys()} == {3}
    # The network timed, which the search checks against the calibration cache's.
    assert table.network_identity == manifest.network_identity
    assert {k: table.network_identity[k] for k in ("input_size", "num_classes")} == {"input_size": [64, 64],
                                                                                       "num_classes": 21}
    assert f"timed 2/2 turns of {len(manifest.parts)} parts" in done.stdout
    assert not os.path.exists(f"{table_path}.runs.json")
