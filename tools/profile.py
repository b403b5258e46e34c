"""Profiles every part of a network (segments, exit heads, final head) into a LatencyTable.

  python -m tools.profile --checkpoint=runs/demo/stage2 --device=host --precision=int8 \
      --calibration_data=DATA/images/calibration --output=latency_int8.json
  python -m tools.profile --backbone=mobilenet_v2 --input_size=512 --device=adb:SERIAL \
      --benchmark_binary=./benchmark_model --precision=float32 --output=pixel7_fp32.json
  python -m tools.profile --checkpoint=runs/demo/stage2 --precision=int8 --device=none --parts_dir=parts_int8
      (then: python -m android_bench --models=parts_int8 ... to time several phones at once)

Each part is converted to TFLite on its own and timed after warm-up (median and p90 of repeated runs):
on the host with the LiteRT interpreter (XNNPACK), the parts taking turns (--block_runs runs each per
turn) and the runs saved every few seconds; on a phone with the user's benchmark_model over adb, the
table saved after each part. Either way an interrupted run resumes where it stopped.

A head's time includes its in-graph image confidence, so profile with the exit policy the
calibration cache was made with (the same --confidence, --edge_smoothing, --confidence_stride as
tools.calibrate); the table records it and the search refuses a table timed under another policy.
"""
import os

import numpy as np
from absl import flags

import mess_cli
from mess_tf import backbones, checkpoints, export, heads, network, progress, runtime
from mess_tf.costs import model as cost_model
from mess_tf.latency import host
from mess_tf.latency import table as table_lib
from tools import policy_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Training run directory or checkpoint: profile its architecture and exits.")
flags.DEFINE_enum("backbone", None, backbones.BACKBONES, "Without --checkpoint: the backbone to profile.")
flags.DEFINE_integer("input_size", 512, "Without --checkpoint: square input size in pixels.")
flags.DEFINE_integer("output_stride", 16, "Without --checkpoint: backbone output stride.")
flags.DEFINE_float("alpha", 1.0, "Without --checkpoint: MobileNet width multiplier.")
flags.DEFINE_integer("num_classes", 21, "Without --checkpoint: classes.")
flags.DEFINE_list("heads", None, "Without --checkpoint: exit-head ids (default: the default head space).")
flags.DEFINE_string("device", "host", "`host`, `adb:SERIAL` for a phone, or `none` to time nothing (with "
                    "--parts_dir: only write the part models).")
flags.DEFINE_enum("precision", "float32", export.PRECISIONS, "TFLite precision.")
flags.DEFINE_string("calibration_data", None, "int8: folder of calibration images (default: random images, "
                    "which is fine for latency but not for accuracy).")
flags.DEFINE_integer("threads", 1, "Interpreter / benchmark_model threads.")
flags.DEFINE_integer("num_runs", 50, "Timed runs per part.", lower_bound=1)
flags.DEFINE_integer("warmup_runs", 5, "Untimed runs per part first.", lower_bound=0)
flags.DEFINE_integer("block_runs", 5, "Host: timed runs in a row per part before the next part's turn (the parts "
                     "take turns, so that the machine's drift hits them alike); --num_runs or more times each "
                     "part in one go.", lower_bound=1)
flags.DEFINE_string("benchmark_binary", None, "adb: the benchmark_model binary for the phone's ABI.")
flags.DEFINE_string("parts_dir", None, "Also write the part models and their parts.json here (what "
                    "`python -m android_bench --models` reads). --device=adb: default OUTPUT_parts.")
flags.DEFINE_string("output", None, "Output LatencyTable JSON (not with --device=none).")


def _network():
    if FLAGS.checkpoint:
        return checkpoints.load_network(FLAGS.checkpoint)[0]
    if not FLAGS.backbone:
        raise ValueError("give --checkpoint=RUN_DIR or --backbone=NAME to say what to profile")
    head_space = ([heads.ExitHeadConfig.from_id(h) for h in FLAGS.heads] if FLAGS.heads
                  else heads.default_head_space())
    config = network.NetworkConfig(backbones.BackboneConfig(FLAGS.backbone, FLAGS.output_stride, FLAGS.alpha),
                                   FLAGS.num_classes, (FLAGS.input_size,) * 2)
    positions = backbones.Backbone(config.backbone, config.input_size).positions
    return network.MultiExitNetwork(config, [(p.name, h) for p in positions for h in head_space])


def _calibration_images(net):
    if FLAGS.precision != "int8":
        return None
    if FLAGS.calibration_data:
        return [image for _, image in runtime.read_images(FLAGS.calibration_data, net.backbone.input_size)[:100]]
    rng = np.random.default_rng(0)
    return [rng.uniform(0, 255, (*net.backbone.input_size, 3)).astype(np.float32) for _ in range(8)]


def _part_macs(net, class_map_positions):
    """Part key -> MACs per image, from the analytic cost model."""
    costs = cost_model.costs_of(net)
    macs = {table_lib.part_key(table_lib.SEGMENT, k): v.macs for k, v in costs.segments.items()}
    macs.update({table_lib.part_key(table_lib.HEAD, e): costs.heads[e].macs for e in net.exit_ids})
    # Upsampling and argmax are free in the MAC count (costs/macs.py).
    macs.update({table_lib.part_key(table_lib.CLASS_MAP, p): 0 for p in class_map_positions})
    macs[table_lib.FINAL_HEAD] = costs.final_head.macs
    return macs


def _check_flags():
    """Raises ValueError for flags that cannot work, before the (slow) conversion."""
    if FLAGS.device not in ("host", "none") and not FLAGS.device.startswith("adb:"):
        raise ValueError(f"--device={FLAGS.device!r}: expected `host`, `adb:SERIAL` or `none`")
    if FLAGS.device == "none" and not FLAGS.parts_dir:
        raise ValueError("--device=none times nothing: give --parts_dir to write the part models")
    if FLAGS.device != "none" and not FLAGS.output:
        raise ValueError("give --output=TABLE.json for the latency table")
    if FLAGS.device.startswith("adb:") and not FLAGS.benchmark_binary:
        raise ValueError("--device=adb:... needs --benchmark_binary (the TFLite benchmark_model for the phone)")


def _print_turns(turn, turns, parts):
    print(f"  timed {turn}/{turns} turns of {parts} parts", flush=True)


def main(argv):
    del argv
    _check_flags()
    policy_config = policy_flags.policy_config()
    net = _network()
    class_map_positions = export.class_map_exits(net, net.exit_ids)  # one class-map part each
    count = len(net.backbone.positions) + len(net.exit_ids) + len(class_map_positions) + 1
    print(f"converting {count} parts to {FLAGS.precision} TFLite...")
    models = export.convert_parts(net, FLAGS.precision, _calibration_images(net), policy_config=policy_config)
    macs = _part_macs(net, class_map_positions)
    positions = [p.name for p in net.backbone.positions]
    parts = {k: table_lib.PartModel(v, macs=macs.get(k)) for k, v in models.items()}
    identity = cost_model.network_identity(net)  # the search checks it against the calibration cache's
    parts_dir = FLAGS.parts_dir
    if FLAGS.device.startswith("adb:"):
        parts_dir = parts_dir or os.path.splitext(FLAGS.output)[0] + "_parts"
    if parts_dir:
        parts = table_lib.PartManifest.write(parts_dir, parts, positions, FLAGS.precision, net.backbone.input_size,
                                             policy_config, identity).parts
        print(f"wrote {len(parts)} part models and {table_lib.MANIFEST_NAME} to {parts_dir}")
    if FLAGS.device == "none":
        return
    if FLAGS.device == "host":
        key = table_lib.TableKey(host.host_device(), FLAGS.precision, FLAGS.threads, net.backbone.input_size)
        timing = host.HostTimingConfig(num_threads=FLAGS.threads, warmup_runs=FLAGS.warmup_runs,
                                       num_runs=FLAGS.num_runs, block_runs=FLAGS.block_runs)
        table = host.measure_parts(parts, FLAGS.output, key, positions, timing, policy_config=policy_config,
                                   progress=progress.throttled(_print_turns), network_identity=identity)
    else:
        table = _profile_phone(FLAGS.device.partition(":")[2], parts, positions, net.backbone.input_size,
                               policy_config, identity)
    print(f"wrote {FLAGS.output}: {len(table.part_keys())} parts on {table.key.device}")
    for k in table.part_keys():
        entry = table.get(k)
        print(f"  {k:<60} median {entry.median_ms:8.3f} ms  p90 {entry.p90_ms:8.3f} ms")


def _profile_phone(serial, parts, positions, input_size, policy_config, network_identity):
    from android_bench import adb as adb_lib
    from android_bench import benchmark

    adb = adb_lib.Adb()
    device = adb_lib.select_devices(adb_lib.list_devices(adb), [serial])[0]
    phone = benchmark.Phone(adb, device, FLAGS.benchmark_binary)
    options = benchmark.BenchmarkOptions(num_threads=FLAGS.threads, num_runs=FLAGS.num_runs,
                                         warmup_runs=FLAGS.warmup_runs)
    job = benchmark.TableJob(FLAGS.output, tuple(positions), parts, FLAGS.precision, tuple(input_size), options,
                             policy_config, network_identity)
    return benchmark.run_job(phone, job)


if __name__ == "__main__":
    mess_cli.run(main)
