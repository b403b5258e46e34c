"""Serves the web page (web/) with a finished demo run's models, exported for LiteRT.js if need be.

  python -m tools.web [--run_dir=runs/demo] [--out=runs/web] [--port=8000]   (what `make web` runs)

Exports each distinct model of the run once (int8 with uint8 boundaries, and float32) into --out,
with some test images, then serves the page on 127.0.0.1 until interrupted.
"""
import os
import time

from absl import flags

import mess_cli
from mess_tf import experiment, web

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", "runs/demo", "A finished run of tools.demo (`make demo`).")
flags.DEFINE_enum("preset", "default", sorted(experiment.PRESETS), "The run's preset.")
flags.DEFINE_string("out", "runs/web", "Folder for the exported models and images, served at /models/.")
flags.DEFINE_integer("port", 8000, "Port on 127.0.0.1 (0: any free one).")


def main(argv):
    del argv
    if not os.path.isdir(os.path.join(FLAGS.run_dir, "configs")):
        raise ValueError(f"--run_dir={FLAGS.run_dir} is not a finished demo run (no configs/); run `make demo` first")
    exp = experiment.Experiment(FLAGS.run_dir, FLAGS.preset, progress=print)
    index = web.export_run(exp, FLAGS.out)
    with web.serve(FLAGS.out, FLAGS.port) as url:
        print(f"models: {', '.join(index['models'])}")
        print(f"serving the page at {url} (Ctrl-C stops)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    mess_cli.run(main)
