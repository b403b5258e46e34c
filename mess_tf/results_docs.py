"""Markdown tables of the committed benchmark results, and the generated blocks of the docs.

Each table is rendered from a JSON file that a benchmark wrote (bench/results/*.json; the demo's
headline is bench/results/headline.json, from bench/headline.py) and says under it when, on what
machine and by which command it was measured (the file's `measured`, mess_tf/provenance.py).
A doc holds a table between two marker comments, each on a line of its own,

    <!-- generated:NAME -->
    ...
    <!-- /generated:NAME -->

and `fill` replaces what lies between them with TABLES[NAME] rendered; nothing else in the doc
changes. tools/make_docs.py writes the docs; tests/test_docs.py checks that the committed docs
equal what the committed JSON renders, so a number in the docs is always the one a bench wrote.
"""
import dataclasses
import json
import os
import re
from typing import Callable

from mess_tf import report
from mess_tf.data.demo import PUBLISHED_STUFF_SHARES

# Markers stand on lines of their own, so that prose may mention them.
MARKER = re.compile(r"^<!-- generated:(?P<name>[\w.-]+) -->\n(?P<body>.*?)^<!-- /generated:(?P=name) -->$", re.S | re.M)
OPEN_MARKER = re.compile(r"^<!-- /?generated:([\w.-]+) -->$", re.M)


# -- cells ---------------------------------------------------------------------------------------


def cell(value):
    """A JSON value as a table cell: floats to 2 decimals, [lo, hi] as `lo to hi`, None as "-"."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return f"{value[0]:.2f} to {value[1]:.2f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v) for v in value)
    return str(value)


def fixed(digits, scale=1.0, suffix=""):
    """A cell format: value * scale with `digits` decimals and a suffix (None stays "-")."""
    return lambda v: "-" if v is None else f"{scale * v:.{digits}f}{suffix}"


PERCENT = fixed(1, 100.0)        # a fraction shown as a percentage
PERCENT2 = fixed(2, 100.0)
TIMES = fixed(2, suffix="x")     # a ratio shown as a speed-up
MS2, MS3 = fixed(2), fixed(3)


def giga(v):
    """MACs as G with 2 decimals."""
    return "-" if v is None else f"{v / 1e9:.2f}G"


@dataclasses.dataclass(frozen=True)
class Column:
    """One column: the row key it shows, its header, and how a value becomes a cell."""

    key: str
    header: str
    format: Callable = cell


def table(rows, columns, keep_empty=False):
    """A markdown table of dict `rows` in `columns` (Column list); columns no row has a value
    for are left out unless `keep_empty` (so one spec serves files with and without a field)."""
    if not keep_empty:
        columns = [c for c in columns if any(row.get(c.key) is not None for row in rows)]
    cells = [{c.header: c.format(row.get(c.key)) if row.get(c.key) is not None else "-" for c in columns}
             for row in rows]
    return report.markdown_table(cells, [c.header for c in columns])


def auto_columns(rows, first=(), known=()):
    """`known` Columns, then a default Column for every other key of `rows` (in first-seen order,
    `first` keys leading), so that a field a bench adds later still shows."""
    known_keys = {c.key for c in known}
    keys = list(first) + [k for row in rows for k in row if k not in first]
    others = [Column(k, k) for k in dict.fromkeys(keys) if k not in known_keys]
    return list(known) + others


# -- provenance ----------------------------------------------------------------------------------


def provenance_line(measured, source):
    """One italic line: when, on what machine and by which command `source` was measured."""
    if not measured:
        return f"_Measured: when and where not recorded in `{source}`._"
    cpus = measured.get("cpus")
    machine = measured.get("cpu") or measured.get("machine") or "an unknown machine"
    where = f"{machine}, {cpus} CPUs" if cpus else machine
    when = measured.get("date", "an unrecorded date")[:10]
    note = " (date of the commit that added the results; CPU model not recorded)" if measured.get("backfilled") else ""
    command = f" by `{measured['command']}`" if measured.get("command") else ""
    return f"_Measured {when} on {where}{note}{command}; from `{source}`._"


# -- the tables ----------------------------------------------------------------------------------

HEADLINE_COLUMNS = [
    Column("name", "name"), Column("steps", "steps"),
    Column("miou_test", "test mIoU %"), Column("miou_ci95", "95% interval"),
    Column("vs_bar_pp", "vs the bar (pp)"), Column("vs_bar_ci95", "95% interval (pp)"),
    Column("vs_mess_final_pp", "vs MESS final (pp)"), Column("vs_mess_final_ci95", "95% interval (pp)"),
    Column("miou_predicted", "predicted (calibration)"), Column("miou_test_cache", "int8 test cache"),
    Column("miou_float_cache", "float cache"), Column("macs", "MACs", giga), Column("mac_reduction", "fewer MACs"),
    Column("latency_ms", "int8 ms"), Column("latency_ms_predicted", "predicted ms"),
    Column("speedup", "speed-up", TIMES), Column("exit_fractions", "exits taken (test)"),
    Column("exit_fractions_predicted", "exits predicted (calibration)"),
]
README_HEADLINE_KEYS = ("name", "miou_test", "miou_ci95", "vs_bar_pp", "vs_bar_ci95", "macs", "mac_reduction",
                        "latency_ms", "speedup", "exit_fractions")


def _headline(data):
    return data.get("headline", data)


def headline_rows(data, keys=None):
    """The deployments of the demo's headline, every known column (or only `keys`), then any other."""
    rows = _headline(data)["rows"]
    if keys:
        return table(rows, [c for c in HEADLINE_COLUMNS if c.key in keys])
    return table(rows, auto_columns(rows, known=HEADLINE_COLUMNS))


def headline_goals(data):
    """The demo's goals: target, measured, met."""
    goals = _headline(data)["goals"]
    return table(goals, auto_columns(goals, known=[Column("goal", "goal"), Column("target", "target"),
                                                   Column("measured", "measured"), Column("met", "met")]))


def _oracle_exits(fractions, positions):
    """{exit id: share} -> "position share, ..., final share" in depth order (positions), per position."""
    per_position = {}
    for eid, share in fractions.items():
        position = eid.split(":")[0]
        per_position[position] = per_position.get(position, 0.0) + share
    order = [p for p in positions if p in per_position] + [p for p in per_position if p not in positions]
    return ", ".join(f"{p} {100 * per_position[p]:.0f}%" for p in order)


def headline_ceilings(data):
    """If every image left at one position, and the oracle (each image at its cheapest good exit)."""
    headline = _headline(data)
    rows = [dict(r) for r in headline["ceilings"]]
    oracle = headline.get("oracle")
    if oracle:
        miou = oracle["miou"]
        rows.append({"position": "oracle (each image at its cheapest exit as good as the final)",
                     "exit_id": _oracle_exits(oracle.get("exit_fractions", {}), [r["position"] for r in rows]),
                     "ms": oracle["ms"], "speedup": oracle["speedup"],
                     "miou": 100 * miou if miou <= 1 else miou})  # older files: a fraction
    return table(rows, auto_columns(rows, known=[
        Column("position", "position"), Column("exit_id", "exit (cheapest head) / oracle's exits"),
        Column("ms", "ms"), Column("speedup", "speed-up", TIMES), Column("miou", "mIoU cheapest head"),
        Column("best_head_miou", "mIoU best head")]))


def key_values(section, format=cell):
    """A two-column table of a dict's entries, each value through `format` (nested dicts as JSON)."""
    rows = [{"quantity": k, "value": format(v) if not isinstance(v, dict) else json.dumps(v)}
            for k, v in section.items()]
    return report.markdown_table(rows, ["quantity", "value"])


def headline_data(data):
    """What the demo data's labelled pixels are made of, beside published scene datasets."""
    stats = _headline(data)["data"]
    things = stats["per_image_things_percent"]
    rows = [{"dataset": f"the demo's {stats['kind']} ({stats['images']} images, synthetic)",
             "stuff % of pixels": stats["stuff_percent"], "things % of pixels": stats["things_percent"],
             "smallest class %": f"{stats['smallest_class'][0]} {stats['smallest_class'][1]:.2f}",
             "things % per image (p10 / p50 / p90)": f"{things['p10']:.1f} / {things['p50']:.1f} / {things['p90']:.1f}",
             "images without things": stats["images_without_things"]}]
    rows += [{"dataset": f"{name}, published ({classes} stuff)", "stuff % of pixels": stuff,
              "things % of pixels": things} for name, classes, stuff, things in PUBLISHED_STUFF_SHARES]
    return table(rows, auto_columns(rows, first=("dataset",)))


def headline_sizing(data):
    """How well the calibration split predicts the test split (bootstrap), and the size it would need."""
    sizing = _headline(data).get("calibration_sizing")
    return key_values(sizing) if sizing else "(no calibration sizing in this headline.json)"


def stage2_curves(data):
    """Each exit's validation mIoU at each stage-2 evaluation, and its gain over the last 20% of steps."""
    curves = _headline(data).get("stage2_curves") or {}
    rows = []
    for eid, points in curves.items():
        rows.append({"exit": eid, **{f"step {step}": miou for step, miou in points},
                     "gain over the last 20% (pp)": report.tail_gain(points)})
    return table(rows, auto_columns(rows, first=("exit",))) if rows else "(no stage-2 curves in this headline.json)"


def stage2_speed(data):
    """Stage 2 one way and another: training throughput, the store, memory, minutes to flat curves."""
    return table(data["rows"], auto_columns(data["rows"], first=("way",)))


# A stage-2 step of each way, as the sum of the parts it runs (stage2_speed.py's part names).
STAGE2_STEPS = {
    "direct": ("input pipeline (decode, scale, crop)", "frozen pass (backbone + final head)",
               "exit heads forward + backward, losses at 1/1"),
    "stored": ("read a stored batch (a later, shuffled pass)", "exit heads forward + backward, losses at 1/1"),
    "stored_loss_stride": ("read a stored batch (a later, shuffled pass)",
                           "exit heads forward + backward, losses at 1/4"),
}


def stage2_parts(data):
    """The parts of a stage-2 step, each alone (median ms per batch), then each way's step as the
    sum of the parts it runs: the parts were timed taking turns, so these ratios are side by side."""
    parts = data["parts_ms"]
    rows = [{"part": k, "ms per batch": v} for k, v in parts.items()]
    text = table(rows, [Column("part", "part"), Column("ms per batch", "ms per batch", fixed(1))])
    batch = data.get("batch_size", 16)  # files without it: the demo presets' batch
    steps = [{"way": way, "parts": " + ".join(names), "ms per step": sum(parts[n] for n in names)}
             for way, names in STAGE2_STEPS.items() if all(n in parts for n in names)]
    if not steps:
        return text
    direct = steps[0]["ms per step"]
    for row in steps:
        row["images/s"] = 1000 * batch / row["ms per step"]
        row["vs direct"] = direct / row["ms per step"]
    return text + "\n\n" + table(steps, [Column("way", "way"), Column("parts", "parts summed"),
                                          Column("ms per step", "ms per step", fixed(1)),
                                          Column("images/s", "images/s", fixed(1)),
                                          Column("vs direct", "throughput vs direct", TIMES)])


def third_exit(data):
    """The exact 2-exit optimum against the best 3-exit configuration found in time."""
    return table(data["third_exit"], [
        Column("objective", "objective"), Column("max_exits", "max exits"),
        Column("exact_up_to", "exact up to"), Column("seconds", "seconds", fixed(0)),
        Column("exits", "exits"), Column("miou_predicted", "mIoU predicted"), Column("ms_predicted", "ms predicted")])


def training_ablation(data):
    """Validation mIoU (fractions) of the final exit and of one head at each position, per variant;
    positions in depth order (the ceilings') where the headline has them."""
    rows = data["training_ablation"]
    if not rows:
        return "The training ablation was not run with these results (`bench/headline.py --noablation`)."
    depth = [r["position"] for r in _headline(data).get("ceilings", [])]
    exits = sorted((k for k in rows[0] if k.startswith("exit@")),
                   key=lambda k: depth.index(k[5:]) if k[5:] in depth else len(depth))
    return table(rows, auto_columns(rows, known=[
        Column("variant", "variant"), Column("steps", "steps"), Column("images_per_s", "images/s", fixed(1)),
        Column("final", "final", fixed(4))] + [Column(k, k[len("exit@"):], fixed(4)) for k in exits]))


def composition(data):
    """Latency table vs staged models."""
    return table(data["composition"], [
        Column("name", "measured model"), Column("composed_ms", "composed ms"),
        Column("measured_ms", "measured ms"), Column("error", "error %", PERCENT)])


CONTROL_POLICIES = ("edge_aware", "top1", "edge_aware_stride8")


def control(data, backbone):
    """Dynamic control: the runtime leaving at exit k vs a static model of the same layers."""
    columns = [Column("exit", "exit"), Column("static_ms", "static ms")]
    for policy in CONTROL_POLICIES:
        columns += [Column(f"{policy}_ms", f"{policy} ms"), Column(f"{policy}_overhead", f"{policy} +%", PERCENT)]
    return table(data["control"][backbone], columns)


def staging(data):
    """Staged vs unstaged model, every stage run."""
    return table(data["staging"], [
        Column("precision", "precision"), Column("stages", "stages"),
        Column("staged_bytes", "staged KB", fixed(0, 1 / 1024)),
        Column("unstaged_bytes", "unstaged KB", fixed(0, 1 / 1024)),
        Column("size_overhead", "size +%", PERCENT2), Column("staged_ms", "staged ms"),
        Column("unstaged_ms", "unstaged ms"), Column("latency_overhead", "latency +%", PERCENT)])


def backbone_precisions(data):
    """float32 vs int8 of each backbone's single-exit DeepLab."""
    return table(data["backbones"], [
        Column("backbone", "backbone"), Column("float32_ms", "float32 ms"), Column("int8_ms", "int8 ms"),
        Column("int8_speedup", "int8 speed-up", TIMES)])


def signatures(data):
    """Leaving at exit k: the static model, the signatures alone, in turn, and through the runtime."""
    return table(data["signatures"], [
        Column("exit", "exit"), Column("static_ms", "static", MS3), Column("stage_ms", "stage k", MS3),
        Column("class_map_ms", "class map k", MS3), Column("signatures_ms", "signatures 1..k + map", MS3),
        Column("in_turn_ms", "in turn", MS3), Column("runtime_ms", "runtime", MS3),
        Column("signatures_overhead", "signatures +%", PERCENT), Column("in_turn_overhead", "in turn +%", PERCENT),
        Column("runtime_overhead", "runtime +%", PERCENT)])


def confidence(data):
    """The in-graph confidence and its parts on the first exit's logits (median ms, one call)."""
    return table(data["confidence"], [Column("variant", "variant"), Column("float32_ms", "float32 ms", MS3),
                                      Column("int8_ms", "int8 ms", MS3)])


def repeatability(data):
    """How far one part's cost moves against the others between two tables, per timing method."""
    return table(data["rows"], [
        Column("method", "method"), Column("block_runs", "block runs"),
        Column("median_deviation", "median deviation %", PERCENT2),
        Column("max_deviation", "max deviation % (median pair)", PERCENT2),
        Column("worst_pair_max_deviation", "max % (worst pair)", PERCENT2),
        Column("seconds_per_table", "s per table", fixed(1))])


def search_speed(data):
    """Exact (or time-limited) search over the synthetic space, per objective."""
    return table(data["runs"], [
        Column("objective", "objective"), Column("configurations", "configurations", lambda v: f"{v:.2e}"),
        Column("evaluated", "evaluated"), Column("seconds", "seconds", fixed(1)),
        Column("miou", "mIoU %", PERCENT2), Column("expected_ms", "expected ms"),
        Column("exact_exits", "exact up to (exits)"), Column("complete", "complete")])


def integer_io(data):
    """int8 vs uint8 signature boundaries on the demo's test split."""
    rows = [dict(r, ratio=r["ms_uint8_io"] / r["ms_int8_io"],
                 differing=f"{r['images_other_exit']} / {r['images_other_class_map']} / "
                           f"{r['images_other_confidence']}") for r in data["rows"]]
    return table(rows, [
        Column("model", "model"), Column("miou_int8_io", "mIoU int8 I/O", PERCENT2),
        Column("miou_uint8_io", "mIoU uint8 I/O", PERCENT2), Column("ms_int8_io", "ms int8 I/O"),
        Column("ms_uint8_io", "ms uint8 I/O"), Column("ratio", "uint8 / int8", fixed(3)),
        Column("differing", "images with another exit / class map / confidence"),
        Column("size_int8_io", "bytes int8 I/O"), Column("size_uint8_io", "bytes uint8 I/O")])


def web_latency(data):
    """Each signature in the browser (WASM, 1 thread) beside ai-edge-litert (1 thread)."""
    return table(data["rows"], [
        Column("model", "model"), Column("signature", "signature"), Column("browser_ms", "browser WASM ms", MS2),
        Column("litert_ms", "ai-edge-litert ms", MS2), Column("ratio", "ratio", TIMES)])


def every_key(section, first):
    """Every key of a list of rows, `first` leading (tables whose columns a bench names itself)."""
    return lambda data: table(data[section], auto_columns(data[section], first=first))


def iterator_teardown(data):
    """Dropping a tf.data iterator with autotuning on and off."""
    rows = [dict(r, stalls=f"{r['stalls']}/{data['trials']}") for r in data["rows"]]
    return table(rows, [
        Column("setting", "setting"), Column("stalls", "stalls"), Column("median_teardown_s", "teardown median s"),
        Column("max_teardown_s", "teardown max s"), Column("max_read_overrun_s", "read overrun max s"),
        Column("stream_batches_per_s", "stream alone batches/s", fixed(0))])


@dataclasses.dataclass(frozen=True)
class Table:
    """A generated table: the results file it reads (under the results folder) and its renderer."""

    source: str
    render: Callable


TABLES = {
    "headline": Table("headline.json", lambda d: headline_rows(d, README_HEADLINE_KEYS)),
    "headline-rows": Table("headline.json", headline_rows),
    "headline-goals": Table("headline.json", headline_goals),
    "headline-ceilings": Table("headline.json", headline_ceilings),
    "headline-data": Table("headline.json", headline_data),
    "headline-sizing": Table("headline.json", headline_sizing),
    "stage2-curves": Table("headline.json", stage2_curves),
    "stage2-speed": Table("stage2_speed.json", stage2_speed),
    "stage2-parts": Table("stage2_speed.json", stage2_parts),
    "things-headline": Table("headline_things.json", lambda d: headline_rows(d, README_HEADLINE_KEYS)),
    "things-goals": Table("headline_things.json", headline_goals),
    "things-ceilings": Table("headline_things.json", headline_ceilings),
    "things-stage2-curves": Table("headline_things.json", stage2_curves),
    "third-exit": Table("headline.json", third_exit),
    "training-ablation": Table("headline.json", training_ablation),
    "latency-composition": Table("latency_model.json", composition),
    "latency-control-mobilenet_v2": Table("latency_model.json", lambda d: control(d, "mobilenet_v2")),
    "latency-control-resnet50": Table("latency_model.json", lambda d: control(d, "resnet50")),
    "latency-staging": Table("latency_model.json", staging),
    "latency-backbones": Table("latency_model.json", backbone_precisions),
    "latency-summary": Table("latency_model.json", lambda d: key_values(d["summary"], PERCENT)),
    **{f"control-{name}-{part}": Table(f"control_breakdown_{name}.json", render)
       for name in ("mobilenet_v2", "mobilenet_v2_512", "resnet50")
       for part, render in (("signatures", signatures), ("confidence", confidence))},
    "repeatability": Table("table_repeatability.json", repeatability),
    "repeatability-512": Table("table_repeatability_512.json", repeatability),
    "search-speed": Table("search_speed.json", search_speed),
    "search-speed-3exits": Table("search_speed_3exits_60s.json", search_speed),
    "integer-io": Table("integer_io.json", integer_io),
    "web-latency": Table("web_latency.json", web_latency),
    "quantisation": Table("quantisation.json", every_key("rows", ("variant",))),
    "class-map-miou": Table("class_map.json", every_key("miou", ("network", "exit", "mIoU s=1", "mIoU s=2", "mIoU s=4",
                                                                 "mIoU s=8"))),
    "class-map-latency": Table("class_map.json", every_key("latency_ms", ("part",))),
    "iterator-teardown": Table("iterator_teardown.json", iterator_teardown),
}


def render(name, results_dir, source_prefix="bench/results"):
    """TABLES[name] rendered from its file in `results_dir`, with its provenance line under it."""
    if name not in TABLES:
        raise ValueError(f"unknown generated table {name!r}; known: {', '.join(sorted(TABLES))}")
    spec = TABLES[name]
    path = os.path.join(results_dir, spec.source)
    with open(path) as f:
        data = json.load(f)
    return f"{spec.render(data)}\n\n{provenance_line(data.get('measured'), f'{source_prefix}/{spec.source}')}\n"


def fill(text, results_dir, where="doc"):
    """`text` with every generated block replaced by its table rendered from `results_dir`.

    Raises:
      ValueError naming `where` and the block when a marker is unclosed or names no table.
    """
    closed = {m.group("name") for m in MARKER.finditer(text)}
    unclosed = [name for name in OPEN_MARKER.findall(text) if name not in closed]
    if unclosed:
        raise ValueError(f"{where}: generated block {unclosed[0]!r} has no matching open/close marker")
    return MARKER.sub(lambda m: (f"<!-- generated:{m.group('name')} -->\n{render(m.group('name'), results_dir)}"
                                 f"<!-- /generated:{m.group('name')} -->"), text)


def documents(root):
    """The files that hold generated blocks: README.md and docs/*.md under `root`."""
    docs = os.path.join(root, "docs")
    if not os.path.isdir(docs):
        return ["README.md"]
    return ["README.md"] + sorted(os.path.join("docs", n) for n in os.listdir(docs) if n.endswith(".md"))


def render_docs(root, results_dir=None):
    """{relative path: (committed text, rendered text)} of every document under `root`."""
    results_dir = results_dir or os.path.join(root, "bench", "results")
    out = {}
    for name in documents(root):
        with open(os.path.join(root, name)) as f:
            text = f.read()
        out[name] = (text, fill(text, results_dir, where=name))
    return out
