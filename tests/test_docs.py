"""The figures in README.md and docs/ are the ones the benchmarks wrote (tools/make_docs.py)."""
import json
import os

import pytest

from mess_tf import results_docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")


def test_committed_docs_equal_what_the_committed_results_render():
    stale = [name for name, (old, new) in results_docs.render_docs(ROOT).items() if old != new]
    assert stale == [], f"{stale} differ from bench/results/*.json: run python -m tools.make_docs"


def test_every_table_is_in_a_document():
    used = set()
    for name in results_docs.documents(ROOT):
        with open(os.path.join(ROOT, name)) as f:
            used.update(m.group("name") for m in results_docs.MARKER.finditer(f.read()))
    assert set(results_docs.TABLES) - used == set()


def test_fill_replaces_only_what_lies_between_markers():
    text = ("intro `<!-- generated:x -->` in prose\n"
            "<!-- generated:integer-io -->\nold\n<!-- /generated:integer-io -->\nend\n")
    filled = results_docs.fill(text, RESULTS)
    assert filled.startswith("intro `<!-- generated:x -->` in prose\n<!-- generated:integer-io -->\n| model |")
    assert filled.endswith("_\n<!-- /generated:integer-io -->\nend\n") and "old" not in filled
    assert "from `bench/results/integer_io.json`" in filled
    assert results_docs.fill(filled, RESULTS) == filled


@pytest.mark.parametrize("text, message", [
    ("<!-- generated:integer-io -->\nno end\n", "no matching"),
    ("<!-- generated:nothing -->\n<!-- /generated:nothing -->\n", "unknown generated table"),
])
def test_fill_refuses_a_broken_or_unknown_block(text, message):
    with pytest.raises(ValueError, match=message):
        results_docs.fill(text, RESULTS)


def test_headline_renders_fields_a_newer_file_adds_and_says_when_it_lacks_provenance(tmp_path):
    with open(os.path.join(RESULTS, "headline.json")) as f:
        data = json.load(f)
    del data["measured"]
    rows = data["headline"]["rows"]
    rows.append(dict(rows[-1], name="mess_final", miou_ci95=[70.1, 73.9], vs_bar_pp=-2.2, new_field="x"))
    (tmp_path / "headline.json").write_text(json.dumps(data))
    readme = results_docs.render("headline", str(tmp_path))
    assert "| 95% interval |" in readme and "| 70.10 to 73.90 |" in readme and "new_field" not in readme
    full = results_docs.render("headline-rows", str(tmp_path))
    assert full.splitlines()[0].endswith("| new_field |")
    assert "not recorded" in full.splitlines()[-1]


def test_provenance_line_names_date_machine_and_command():
    line = results_docs.provenance_line({"date": "2026-12-04T10:00:00Z", "cpu": "AMD EPYC", "cpus": 2,
                                         "command": "python bench/x.py"}, "bench/results/x.json")
    assert line == "_Measured 2026-12-04 on AMD EPYC, 2 CPUs by `python bench/x.py`; from `bench/results/x.json`._"
