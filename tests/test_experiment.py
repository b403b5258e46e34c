"""The `make demo` pipeline end to end on the quick preset: every artifact, the headline, the rerun."""
import json
import os

import pytest

from mess_tf import experiment

ROW_NAMES = ["baseline", "no_loss", "drop_1pp", "baseline_cost", "oracle"]
STEPS = ("data", "baseline", "stage1", "stage2", "calibrate", "profile", "search", "export", "evaluate", "report")


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


def test_a_rerun_skips_every_finished_step(quick_run):
    out, rows, _ = quick_run
    lines = []
    again = experiment.Experiment(out, "quick", seed=0, progress=lines.append).run()
    assert again == rows
    assert lines == [f"[{name}] done earlier, skipped" for name in STEPS]


def test_unknown_preset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        experiment.Experiment(str(tmp_path), "huge")
