"""The `make demo` pipeline end to end on the quick preset: every artifact, the headline, the rerun.

The run searches a fixed latency table instead of one timed on this host, and the assertions hold
for any trained weights: what the search picks then depends on neither the machine's load nor its
floating-point kernels' last bits, and no assertion depends on which configuration it picks.
"""
import json
import os

import pytest

from mess_tf import experiment
from mess_tf.deployment import DeploymentConfig
from mess_tf.latency import host
from mess_tf.latency import table as table_lib
from mess_tf.report import tail_gain

ROW_NAMES = ["baseline", "baseline_same_budget", "mess_final", "no_loss", "drop_1pp", "baseline_cost"]
MESS_ROWS = ROW_NAMES[2:]  # the MESS network's final exit alone, and one deployment per requirement
SEARCHED = ROW_NAMES[3:]
FIXED_MS = {table_lib.SEGMENT: 1.0, table_lib.HEAD: 0.1, table_lib.CLASS_MAP: 0.2, table_lib.FINAL_HEAD: 2.0}


def fixed_latency_table(parts, path, key, positions, config, **recorded):
    """host.measure_parts without timing anything: every part of a kind costs FIXED_MS of it."""
    table = table_lib.LatencyTable(key, positions, policy=recorded["policy_config"],
                                   network_identity=recorded.get("network_identity"))
    for part in parts:
        ms = FIXED_MS[table_lib.parse_part_key(part)[0]]
        table.set(part, table_lib.PartLatency(ms, ms, config.num_runs))
    table.save(path)
    return table


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    lines = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(host, "measure_parts", fixed_latency_table)
        headline = experiment.Experiment(out, "quick", seed=0, progress=lines.append).run()
    return out, headline, lines


def test_headline_rows_measure_and_predict_every_deployment(quick_run):
    out, headline, _ = quick_run
    rows = {r["name"]: r for r in headline["rows"]}
    assert list(rows) == ROW_NAMES
    bar = rows["baseline_same_budget"]
    assert bar["speedup"] == 1.0 and bar["mac_reduction"] == 1.0 and bar["steps"] == 120
    assert rows["baseline"]["steps"] == 60 and rows["baseline"]["miou_float_cache"] is None
    for name in MESS_ROWS:
        row = rows[name]
        assert row["speedup"] == pytest.approx(bar["latency_ms"] / row["latency_ms"])
        # Not below the bar's MACs: an image that passes an exit pays for its head too.
        assert row["macs"] > 0 and row["mac_reduction"] == pytest.approx(bar["macs"] / row["macs"])
        # The int8 cache of the test split holds what the int8 model computes: it predicts the
        # measured mIoU (exactly where the parts and the stages are cut at the same positions, see
        # test_runtime; here the parts are also cut at exits the model does not deploy, which
        # moves a few pixels of rounding).
        assert row["miou_test_cache"] == pytest.approx(row["miou_test"], abs=0.05)
    for name, row in rows.items():  # intervals from one set of resamples: paired, row against row
        low, high = row["miou_ci95"]
        assert 0 <= low <= high <= 100
        if name != "baseline_same_budget":
            assert row["vs_bar_pp"] == pytest.approx(row["miou_test"] - bar["miou_test"])
            assert row["vs_bar_ci95"][0] <= row["vs_bar_ci95"][1]
        has_final = name in MESS_ROWS and name != "mess_final"
        assert (row["vs_mess_final_pp"] is not None) == has_final
        if has_final:
            assert row["vs_mess_final_pp"] == pytest.approx(row["miou_test"] - rows["mess_final"]["miou_test"])
    assert bar["vs_bar_pp"] is None and bar["vs_bar_ci95"] is None
    with open(os.path.join(out, "report", "headline.json")) as f:
        assert json.load(f) == headline


def test_goals_ceilings_and_oracle_are_reported(quick_run):
    _, headline, _ = quick_run
    assert len(headline["goals"]) == 12 and all(isinstance(g["met"], bool) for g in headline["goals"])
    ceilings, oracle = headline["ceilings"], headline["oracle"]
    assert [c["position"] for c in ceilings] == experiment.Experiment("unused", "quick").exit_positions()
    assert all(c["speedup"] > 1 for c in ceilings)  # leaving early always skips work in the fixed table
    assert 1 <= oracle["speedup"] <= max(c["speedup"] for c in ceilings) + 1e-9
    assert sum(oracle["exit_fractions"].values()) == pytest.approx(1.0)
    assert all(0 <= c["miou"] <= c["best_head_miou"] <= 100 for c in ceilings)
    sizing = headline["calibration_sizing"]
    assert sizing["calibration_images"] == sizing["test_images"] == 64
    assert sizing["calibration_sd_pp"] >= 0 and sizing["test_sd_pp"] >= 0 and sizing["error_95_pp"] >= 0
    curves = headline["stage2_curves"]  # every exit, at every evaluation of stage 2
    assert len(curves) == 4 and all([s for s, _ in c] == [10, 20, 30] for c in curves.values())
    data = headline["data"]
    assert data["kind"] == "scenes" and data["images"] == 392
    assert data["stuff_percent"] + data["things_percent"] == pytest.approx(100, abs=0.02)


def test_every_artifact_of_the_report_is_written(quick_run):
    out, _, _ = quick_run
    for name in ("summary.md", "pareto.png", "exit_distribution.png", "examples.png", "latency_breakdown.png",
                 "stage2_curves.png"):
        assert os.path.getsize(os.path.join(out, "report", name)) > 0
    for name in ROW_NAMES:
        assert os.path.isfile(os.path.join(out, "models", f"{name}_int8.tflite"))
    for stage, precision, split in experiment.CACHES:
        assert os.path.isfile(os.path.join(out, "calibration", f"{stage}_{split}_{precision}.npz"))
    with open(os.path.join(out, "report", "summary.md")) as f:
        summary = f.read()
    assert "| baseline_same_budget |" in summary and "## Goals" in summary and "## The ceiling" in summary
    assert "## The data" in summary and "## The calibration split's size" in summary


def _in_the_model_file(config):
    """What of a configuration the .tflite holds: the exits and their pixel thresholds (th_img is
    the metadata's, read by the runtime)."""
    return [(e.exit_id, e.th_pix) for e in config.exits]


def test_deployments_that_agree_share_one_model_and_keep_their_own_metadata(quick_run):
    out, _, _ = quick_run
    configs = {name: DeploymentConfig.load(os.path.join(out, "configs", f"{name}.json")) for name in SEARCHED}
    with open(os.path.join(out, "evaluation.json")) as f:
        evaluation = json.load(f)
    for a in configs:
        with open(os.path.join(out, "models", f"{a}_int8.tflite.json")) as f:
            metadata = json.load(f)
        assert DeploymentConfig.from_dict(metadata["deployment"]) == configs[a]  # its own provenance
        assert [s["th_img"] for s in metadata["stages"][:-1]] == [e.th_img for e in configs[a].exits]
        for b in configs:
            path_a, path_b = (os.path.join(out, "models", f"{n}_int8.tflite") for n in (a, b))
            with open(path_a, "rb") as fa, open(path_b, "rb") as fb:
                assert (fa.read() == fb.read()) == (_in_the_model_file(configs[a]) == _in_the_model_file(configs[b]))
            same = configs[a].fingerprint() == configs[b].fingerprint()
            assert (evaluation[a]["measured_as"] == evaluation[b]["measured_as"]) == same  # measured once


def test_a_rerun_skips_every_finished_step(quick_run):
    out, headline, _ = quick_run
    lines = []
    again = experiment.Experiment(out, "quick", seed=0, progress=lines.append).run()
    assert again == headline
    assert lines == [f"[{name}] done earlier, skipped" for name in experiment.STEPS]


def test_unknown_preset_and_step_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        experiment.Experiment(str(tmp_path), "huge")
    with pytest.raises(ValueError, match="unknown step 'stage3'"):
        experiment.Experiment(str(tmp_path), "quick").run(until="stage3")


def test_the_flatness_goal_reads_the_last_fifth_of_the_curve():
    curve = [(200, 50.0), (400, 60.0), (800, 70.0), (900, 69.0), (1000, 70.5)]
    assert tail_gain(curve) == pytest.approx(0.5)  # against step 800, the latest at <= 80%
    assert tail_gain(curve[2:]) == pytest.approx(0.5)
    assert tail_gain([(1000, 70.0)]) is None and tail_gain([]) is None
