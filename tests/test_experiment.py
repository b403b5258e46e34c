"""The `make demo` pipeline end to end on the quick preset: every artifact, the headline, the rerun."""
import json
import os

import pytest

from mess_tf import experiment
from mess_tf.deployment import DeploymentConfig

ROW_NAMES = ["baseline", "no_loss", "drop_1pp", "baseline_cost", "oracle"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    lines = []
    rows = experiment.Experiment(out, "quick", seed=0, progress=lines.append).run()
    return out, rows, lines


def test_headline_has_one_row_per_model_with_consistent_ratios(quick_run):
    out, rows, _ = quick_run
    assert [r["name"] for r in rows] == ROW_NAMES
    assert set(rows[0]) == {"name", "miou_test", "macs", "latency_ms_int8", "latency_ms_float",
                            "ratio_vs_baseline_int8", "ratio_vs_baseline_float"}
    base = rows[0]
    assert base["ratio_vs_baseline_int8"] == base["ratio_vs_baseline_float"] == 1.0
    for row in rows[1:4]:
        assert row["ratio_vs_baseline_int8"] == pytest.approx(base["latency_ms_int8"] / row["latency_ms_int8"], rel=0.02)
        assert 0 < row["macs"] <= base["macs"]  # exits only ever skip work
        assert 0 <= row["miou_test"] <= 100
    with open(os.path.join(out, "report", "headline.json")) as f:
        assert json.load(f) == rows


def test_every_artifact_of_the_report_is_written(quick_run):
    out, _, _ = quick_run
    for name in ("summary.md", "pareto.png", "exit_distribution.png", "examples.png"):
        assert os.path.getsize(os.path.join(out, "report", name)) > 0
    for name in ROW_NAMES[:4]:
        for precision in experiment.PRECISIONS:
            assert os.path.isfile(os.path.join(out, "models", f"{name}_{precision}.tflite"))
    with open(os.path.join(out, "report", "summary.md")) as f:
        summary = f.read()
    assert "| baseline |" in summary and "the MESS network starts from it" in summary


def test_deployments_that_agree_share_one_model_and_keep_their_own_metadata(quick_run):
    out, _, _ = quick_run
    configs = {name: DeploymentConfig.load(os.path.join(out, "configs", f"{name}.json")) for name in ROW_NAMES[1:4]}
    with open(os.path.join(out, "evaluation.json")) as f:
        evaluation = json.load(f)
    for precision in experiment.PRECISIONS:
        for a in configs:
            with open(os.path.join(out, "models", f"{a}_{precision}.tflite.json")) as f:
                assert DeploymentConfig.from_dict(json.load(f)["deployment"]) == configs[a]  # its own provenance
            for b in configs:
                path_a, path_b = (os.path.join(out, "models", f"{n}_{precision}.tflite") for n in (a, b))
                same = configs[a].fingerprint() == configs[b].fingerprint()
                with open(path_a, "rb") as fa, open(path_b, "rb") as fb:
                    assert (fa.read() == fb.read()) == same, (a, b, precision)
                ka, kb = f"{a}_{precision}", f"{b}_{precision}"
                assert (evaluation[ka]["measured_as"] == evaluation[kb]["measured_as"]) == same  # measured once


def test_a_rerun_skips_every_finished_step(quick_run):
    out, rows, _ = quick_run
    lines = []
    again = experiment.Experiment(out, "quick", seed=0, progress=lines.append).run()
    assert again == rows
    assert lines == [f"[{name}] done earlier, skipped" for name in experiment.STEPS]


def test_unknown_preset_and_step_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        experiment.Experiment(str(tmp_path), "huge")
    with pytest.raises(ValueError, match="unknown step 'stage3'"):
        experiment.Experiment(str(tmp_path), "quick").run(until="stage3")
