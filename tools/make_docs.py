"""Renders the generated tables of README.md and docs/*.md from the committed benchmark results.

  python -m tools.make_docs            # rewrites the blocks between <!-- generated:NAME --> markers
  python -m tools.make_docs --check    # writes nothing; exits 1 naming the documents that differ

Reads bench/results/*.json (each bench writes its own; the demo's headline is bench/results/
headline.json, from bench/headline.py); see mess_tf/results_docs.py for the tables and markers.
"""
import os
import sys

from absl import flags

import mess_cli
from mess_tf import io_utils, results_docs

FLAGS = flags.FLAGS
flags.DEFINE_string("root", os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "The repository: README.md and docs/ are read and written there.")
flags.DEFINE_string("results_dir", None, "Folder of the results JSON (default ROOT/bench/results).")
flags.DEFINE_bool("check", False, "Write nothing; exit 1 if a document differs from what the results render.")


def main(argv):
    del argv
    rendered = results_docs.render_docs(FLAGS.root, FLAGS.results_dir)
    stale = [name for name, (old, new) in rendered.items() if old != new]
    if FLAGS.check:
        for name in stale:
            print(f"{name}: differs from what the results render; run python -m tools.make_docs", file=sys.stderr)
        sys.exit(1 if stale else 0)
    for name in stale:
        with io_utils.atomic_open(os.path.join(FLAGS.root, name)) as f:
            f.write(rendered[name][1])
        print(f"wrote {name}")
    print(f"{len(rendered) - len(stale)} of {len(rendered)} documents were up to date")


if __name__ == "__main__":
    mess_cli.run(main)
