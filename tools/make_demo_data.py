"""Writes a built-in demo dataset (scenes: stuff textures with digits as things; or the digit-only
`things` scenes) and prints what its pixels are made of and its difficulty mix.

  python -m tools.make_demo_data --preset=default --out=runs/demo/data --seed=0

A folder that already holds the same preset and seed is reused as it is.
"""
import time

from absl import flags

import mess_cli
from mess_tf.data import demo

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "default", list(demo.PRESETS),
                  "Dataset kind and size (default: the demo's scenes; things: the digit scenes; tiny, quick: tests).")
flags.DEFINE_string("out", "runs/demo/data", "Output folder (generic layout: images/, labels/, classes.txt).")
flags.DEFINE_integer("seed", 0, "Seed; the same seed gives the same bytes.")


def main(argv):
    del argv
    start = time.time()
    demo.generate(FLAGS.out, FLAGS.preset, FLAGS.seed)
    records = demo.load_records(FLAGS.out)
    preset = demo.PRESETS[FLAGS.preset]
    print(f"{FLAGS.out}: preset {FLAGS.preset}, {preset.kind} ({preset.image_size}x{preset.image_size} pixels, "
          f"{', '.join(f'{s} {preset.count(s)}' for s in demo.SPLITS)}), seed {FLAGS.seed}, "
          f"{time.time() - start:.1f} s")
    kind = demo.kind_module(FLAGS.preset)
    shares = demo.class_shares(records, kind.CLASS_NAMES, kind.THING_CLASSES)
    print(f"\nlabelled pixels: stuff {shares['stuff_percent']:.1f}%, things {shares['things_percent']:.1f}% "
          f"(smallest class {shares['smallest_class'][0]} {shares['smallest_class'][1]:.2f}%)")
    for name, classes, stuff, things in demo.PUBLISHED_STUFF_SHARES:
        print(f"  published, {name}: {classes} stuff, {stuff:.0f}% of the pixels"
              + (f", things {things:.1f}%" if things else ""))
    summary = demo.summarize(records)
    print(f"\ndifficulty mix over {summary['images']} images "
          f"(easy d<1/3: {summary['difficulty']['easy']}, medium: {summary['difficulty']['medium']}, "
          f"hard d>=2/3: {summary['difficulty']['hard']})")
    for key in ("objects_per_image", "distractors_per_image"):
        print(f"\n{key.replace('_', ' ')}:")
        peak = max(summary[key].values())
        for count, images in summary[key].items():
            print(f"  {count:2d} {images:5d} {'#' * max(1, round(40 * images / peak))}")
    print("\nper digit / per image (p10 / p50 / p90):")
    for key, unit in (("digit_height_px", "pixels"), ("contrast", "RMS fraction of 255"),
                      ("noise_sigma", "0..255"), ("visible_fraction", "after occlusion")):
        q = summary[key]
        print(f"  {key:18s} {q['p10']:7.3f} {q['p50']:7.3f} {q['p90']:7.3f}  ({unit})")
    print(f"  images with a digit less than 90% visible: {summary['occluded_images']}")
    print(f"  images without things: {summary['images_without_things']}")


if __name__ == "__main__":
    mess_cli.run(main)
