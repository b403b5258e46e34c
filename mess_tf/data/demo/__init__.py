"""The built-in demo datasets, generated from pictures and digits that ship inside pip packages.

Two kinds (one module each):
  scenes  stuff regions of real textures and photographs, with handwritten digits as the things:
          the structure of real scene datasets, where early exits pay (the default);
  things  handwritten digits on photographs: every class a whole shape, MESS's hard case.

Splits train / calibration / val / test use disjoint sets of digit scans. Each image draws from
its own seed (seed, split, index), so it is the same whatever else is generated, in whatever order.
The dataset is written once, atomically, in the generic folder layout (see folder.py), with
difficulty.json (every image's difficulty factors and class pixel counts) and demo.json (what
made it: preset, kind, generator version, seed, sizes).
"""
import concurrent.futures
import dataclasses
import hashlib
import multiprocessing
import os
import shutil
import tempfile

import numpy as np

from mess_tf import io_utils, visualize
from mess_tf.data import folder
from mess_tf.data.demo import scenes, sources, things

KINDS = {"scenes": scenes, "things": things}
SPLITS = sources.SPLITS
STAMP_FILE = "demo.json"
DIFFICULTY_FILE = "difficulty.json"
# Published shares of the labelled pixels (Cityscapes: evaluated pixels), printed beside the scenes' own.
PUBLISHED_STUFF_SHARES = (("Cityscapes", "11 of 19 classes", 90.0, 8.4), ("ADE20K", "35 of 150 classes", 60.9, 31.8),
                          ("COCO-Stuff", "91 of 182 classes", 66.0, None))


@dataclasses.dataclass(frozen=True)
class DemoPreset:
    """A dataset kind (KINDS), image side (pixels, a multiple of 32) and images per split."""

    kind: str
    image_size: int
    train: int
    calibration: int
    val: int
    test: int

    def count(self, split):
        return getattr(self, split)


PRESETS = {
    "tiny": DemoPreset("scenes", 64, 48, 16, 16, 16),          # tests: a second or two
    "tiny_things": DemoPreset("things", 64, 48, 16, 16, 16),
    "quick": DemoPreset("scenes", 96, 200, 64, 64, 64),        # a minutes-long end-to-end demo
    "scratch": DemoPreset("things", 128, 1000, 200, 200, 200),  # the from-scratch MobileNetV2 demo
    "default": DemoPreset("scenes", 384, 1000, 500, 200, 1000),  # `make demo`: a deployment-scale input
    "things": DemoPreset("things", 384, 1000, 500, 200, 1000),   # the hard case, beside it
}


def kind_module(preset):
    """The generator module (scenes or things) of a data preset."""
    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; expected one of {', '.join(PRESETS)}")
    return KINDS[PRESETS[preset].kind]


def info(preset):
    """The DatasetInfo (classes, palette) of a data preset."""
    return kind_module(preset).INFO


def render_sample(split, index, preset="default", seed=0):
    """One demo image, as `generate` writes it: (image uint8 [S, S, 3], label uint8 [S, S], record)."""
    scans, digit_labels = sources.digit_pool(seed, split)
    rng = np.random.default_rng([seed, int(hashlib.sha1(split.encode()).hexdigest()[:8], 16), index])
    return kind_module(preset).render(rng, PRESETS[preset].image_size, scans, digit_labels)


def stamp(preset, seed):
    """What identifies the data a preset and seed generate (demo.json)."""
    p = PRESETS[preset]
    return {"preset": preset, "seed": seed, "version": KINDS[p.kind].VERSION, **dataclasses.asdict(p)}


def _write_samples(root, split, preset, seed, indices):
    """Renders and writes images `indices` of a split; returns their difficulty records."""
    records, palette = {}, info(preset).palette
    for i in indices:
        image, label, record = render_sample(split, i, preset, seed)
        name = f"{split}_{i:05d}"
        _write_png(os.path.join(root, "images", split, name + ".png"), image)
        _write_png(os.path.join(root, "labels", split, name + ".png"), label, palette)
        records[name] = {"split": split, **record}
    return records


def _write_all(root, preset, seed, workers):
    """Every split, rendered by `workers` processes (spawned: they import numpy and PIL only)."""
    jobs = [(split, list(range(start, min(start + 50, PRESETS[preset].count(split)))))
            for split in SPLITS for start in range(0, PRESETS[preset].count(split), 50)]
    if workers <= 1:
        return [_write_samples(root, split, preset, seed, indices) for split, indices in jobs]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(_write_samples, *zip(*[(root, split, preset, seed, indices) for split, indices in jobs])))


def _write_png(path, array, palette=None):
    # Plain writes: the whole dataset folder is renamed into place at the end, which is what makes it atomic.
    # zlib level 1: 40% less time than the default 6 for 10% more bytes, and the same pixels.
    with open(path, "wb") as f:
        f.write(visualize.encode_png(array, palette, compress_level=1))


def generate(out_dir, preset="default", seed=0, workers=None):
    """Writes the demo dataset to `out_dir` once (generic folder layout + difficulty.json). Returns out_dir.

    `workers` processes render the images (default: one per CPU core, one per 100 images at most:
    starting a process costs about as much as rendering a hundred small images).

    If `out_dir` already holds the same preset and seed it is left as it is. The data is written to a
    temporary folder beside `out_dir` and renamed into place, so an interrupted run leaves nothing.
    Raises ValueError if `out_dir` holds other data, naming the command that regenerates it.
    """
    kind_module(preset)  # an unknown preset is refused before anything is written
    wanted = stamp(preset, seed)
    if _holds(out_dir, wanted):
        return out_dir
    if workers is None:
        total = sum(PRESETS[preset].count(split) for split in SPLITS)
        workers = max(1, min(os.cpu_count() or 1, total // 100))
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(os.path.abspath(out_dir)) + ".tmp-")
    try:
        for kind in ("images", "labels"):
            for split in SPLITS:
                os.makedirs(os.path.join(tmp, kind, split))
        folder.write_classes(os.path.join(tmp, folder.CLASSES_FILE), info(preset))
        records = {}
        for part in _write_all(tmp, preset, seed, workers):
            records.update(part)
        io_utils.write_json(os.path.join(tmp, DIFFICULTY_FILE), records)
        io_utils.write_json(os.path.join(tmp, STAMP_FILE), wanted)
        if os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not _holds(out_dir, wanted):  # else another process finished the same data first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _holds(out_dir, wanted):
    """True if out_dir holds the demo data of stamp `wanted`; ValueError if it holds anything else."""
    if not os.path.exists(out_dir) or (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        return False
    stamp_path = os.path.join(out_dir, STAMP_FILE)
    if not os.path.isfile(stamp_path):
        raise ValueError(f"{out_dir} exists and is not a demo dataset folder (no {STAMP_FILE}); "
                         f"choose another output folder")
    found = io_utils.read_json(stamp_path, "demo dataset stamp")
    if found != wanted:
        made = (f"{found.get('kind', 'things')} data of generator version {found.get('version')}, preset "
                f"{found.get('preset')!r}, seed {found.get('seed')}")
        raise ValueError(f"{out_dir} holds {made}; preset {wanted['preset']!r} with seed {wanted['seed']} is "
                         f"{wanted['kind']} data of version {wanted['version']}. Regenerate it: rm -r {out_dir} && "
                         f"python -m tools.make_demo_data --preset={wanted['preset']} --seed={wanted['seed']} "
                         f"--out={out_dir} (in a `make demo` run folder, remove the whole run folder: its networks "
                         f"were trained on the old data)")
    return True


def load_records(data_dir):
    """The per-image difficulty records of a generated demo folder: {name: record}."""
    return io_utils.read_json(os.path.join(data_dir, DIFFICULTY_FILE), "demo difficulty records")


def summarize(records, split=None):
    """The difficulty mix of `records` (optionally one split).

    Returns a dict: images; objects_per_image, distractors_per_image histograms ({count: images});
    difficulty {easy (d < 1/3), medium, hard (d >= 2/3): images}; quantiles (p10, p50, p90) of digit
    height (pixels), contrast (0..1), noise sigma (0..255) and visible fraction per digit;
    occluded_images (any digit < 90% visible); images_without_things.
    """
    chosen = [r for r in records.values() if split is None or r["split"] == split]
    if not chosen:
        raise ValueError(f"no difficulty records{' for split ' + split if split else ''}")
    objects = [o for r in chosen for o in r["object_list"]]

    def histogram(values):
        keys, counts = np.unique(values, return_counts=True)
        return {int(k): int(c) for k, c in zip(keys, counts)}

    def quantiles(values):
        return dict(zip(("p10", "p50", "p90"), np.round(np.percentile(values, [10, 50, 90]), 3).tolist()))

    d = np.array([r["difficulty"] for r in chosen])
    return {
        "images": len(chosen),
        "objects_per_image": histogram([r["objects"] for r in chosen]),
        "distractors_per_image": histogram([r["distractors"] for r in chosen]),
        "difficulty": {"easy": int((d < 1 / 3).sum()), "medium": int(((d >= 1 / 3) & (d < 2 / 3)).sum()),
                       "hard": int((d >= 2 / 3).sum())},
        "digit_height_px": quantiles([o["height_px"] for o in objects]),
        "contrast": quantiles([o["contrast"] for o in objects]),
        "noise_sigma": quantiles([r["noise_sigma"] for r in chosen]),
        "visible_fraction": quantiles([o["visible_fraction"] for o in objects]),
        "occluded_images": sum(any(o["visible_fraction"] < 0.9 for o in r["object_list"]) for r in chosen),
        "images_without_things": sum(not r["object_list"] for r in chosen),
    }


def class_shares(records, class_names, thing_classes, split=None):
    """How the labelled pixels of `records` (optionally one split) fall into classes.

    Returns:
      {"class_percent": {name: % of labelled pixels}, "stuff_percent", "things_percent",
       "smallest_class": (name, %), "per_image_things_percent": {p10, p50, p90}}.
    """
    chosen = [r for r in records.values() if split is None or r["split"] == split]
    counts = np.zeros(len(class_names), np.int64)
    per_image = []
    for r in chosen:
        image = np.zeros(len(class_names), np.int64)
        for cls, pixels in r["class_pixels"].items():
            image[int(cls)] += pixels
        counts += image
        per_image.append(100 * image[list(thing_classes)].sum() / max(image.sum(), 1))
    percent = 100 * counts / max(counts.sum(), 1)
    things_percent = float(percent[list(thing_classes)].sum())
    smallest = int(np.argmin(percent))
    return {"class_percent": {n: round(float(p), 3) for n, p in zip(class_names, percent)},
            "stuff_percent": round(100 - things_percent, 2), "things_percent": round(things_percent, 2),
            "smallest_class": (class_names[smallest], round(float(percent[smallest]), 3)),
            "per_image_things_percent": dict(zip(("p10", "p50", "p90"),
                                                 np.round(np.percentile(per_image, [10, 50, 90]), 2).tolist()))}
