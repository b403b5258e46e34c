"""Times a network's part models on connected Android phones and writes latency tables.

  python -m android_bench --list_devices
  python -m android_bench --benchmark_binary=~/bin/benchmark_model --models=PARTS_DIR \
      --devices=SERIAL1,SERIAL2 --num_threads=1,4 --output=tables/{serial}_t{threads}.json

PARTS_DIR holds the part .tflite files and their parts.json (mess_tf.latency.table.PartManifest),
as `python -m tools.profile --device=none --parts_dir=PARTS_DIR` writes them. Phones run in
parallel; an interrupted run resumes where it stopped when started again with the same --output.
"""
import sys

from absl import flags

import mess_cli
from android_bench import adb as adb_lib
from android_bench import benchmark, farm
from mess_tf.latency import table as table_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("adb", "adb", "adb executable (path or name on PATH).")
flags.DEFINE_bool("list_devices", False, "List connected devices (serial, model, SoC, Android) and exit.")
flags.DEFINE_string("benchmark_binary", None, "Local path of the TFLite benchmark_model built for the phones.")
flags.DEFINE_string("models", None, "Folder with the part models and parts.json (or the parts.json path).")
flags.DEFINE_list("devices", [], "Serials of the phones to use (default: every ready phone).")
flags.DEFINE_string("output", None, "Output table JSON; may use {serial} and {threads}, required when "
                    "several phones or thread counts are timed.")
flags.DEFINE_list("num_threads", ["4"], "CPU threads; several values give one table each.")
flags.DEFINE_integer("num_runs", 50, "Timed runs per model.")
flags.DEFINE_integer("warmup_runs", 5, "Warm-up runs per model.")
flags.DEFINE_bool("use_xnnpack", True, "Use the XNNPACK delegate.")
flags.DEFINE_bool("use_gpu", False, "Use the GPU delegate.")
flags.DEFINE_bool("use_nnapi", False, "Use the NNAPI delegate.")
flags.DEFINE_bool("enable_op_profiling", False, "Ask benchmark_model for per-op timings (in the logs).")
flags.DEFINE_bool("pin_big_cores", True, "Run under taskset on the big cores.")
flags.DEFINE_float("cooldown_s", 5.0, "Pause before each model, seconds.")
flags.DEFINE_float("max_temp_c", None, "Also wait until every thermal zone is at most this many deg C.")
flags.DEFINE_string("notes", "", "Free text stored in the tables.")


def _print_devices(devices):
    print(f"{'serial':<20} {'state':<13} {'model':<20} {'soc':<12} android")
    for d in devices:
        print(f"{d.serial:<20} {d.state:<13} {d.model:<20} {d.soc:<12} {d.android}")


def _thread_counts():
    try:
        return [int(v) for v in FLAGS.num_threads]
    except ValueError:
        raise ValueError(f"--num_threads must be integers, got {FLAGS.num_threads}") from None


def _jobs(manifest, serial, thread_counts):
    jobs = []
    for threads in thread_counts:
        options = benchmark.BenchmarkOptions(
            num_threads=threads, num_runs=FLAGS.num_runs, warmup_runs=FLAGS.warmup_runs,
            use_xnnpack=FLAGS.use_xnnpack, use_gpu=FLAGS.use_gpu, use_nnapi=FLAGS.use_nnapi,
            enable_op_profiling=FLAGS.enable_op_profiling, pin_big_cores=FLAGS.pin_big_cores)
        path = FLAGS.output.format(serial=serial, threads=threads)
        jobs.append(benchmark.TableJob(path, manifest.positions, manifest.parts, manifest.precision,
                                       manifest.input_size, options, manifest.policy, manifest.network_identity))
    return jobs


def main(argv):
    del argv
    adb = adb_lib.Adb(FLAGS.adb)
    try:
        devices = adb_lib.list_devices(adb)
    except adb_lib.AdbError as e:
        sys.exit(f"error: listing devices failed: {e}")
    if FLAGS.list_devices:
        _print_devices(devices)
        return
    for name in ("benchmark_binary", "models", "output"):
        if not getattr(FLAGS, name):
            raise ValueError(f"--{name} is required (or pass --list_devices)")
    chosen = adb_lib.select_devices(devices, FLAGS.devices)
    thread_counts = _thread_counts()
    several_phones = len(chosen) > 1 and "{serial}" not in FLAGS.output
    several_counts = len(thread_counts) > 1 and "{threads}" not in FLAGS.output
    if several_phones or several_counts:
        raise ValueError(f"--output={FLAGS.output} must contain {{serial}} (several phones) and {{threads}} "
                         "(several --num_threads) so that each table gets its own file")
    manifest = table_lib.PartManifest.load(FLAGS.models)
    cooldown = benchmark.Cooldown(seconds=FLAGS.cooldown_s, max_temp_c=FLAGS.max_temp_c)
    work = [(benchmark.Phone(adb, d, FLAGS.benchmark_binary, cooldown), _jobs(manifest, d.serial, thread_counts))
            for d in chosen]
    results = farm.benchmark_phones(work, FLAGS.notes)
    for serial, result in results.items():
        for path, table in result.tables.items():
            print(f"{serial}: {len(table.part_keys())} parts -> {path}")
        if result.error is not None:
            print(f"{serial}: FAILED: {result.error}\n  parts measured so far are kept in {result.failed_job.path}; "
                  "rerun the same command to resume", file=sys.stderr)
    if any(r.error is not None for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    mess_cli.run(main)
