"""Trains a MESS network: the baseline, stage 1, stage 2 (from a stage-1 run) or naive joint training.

  python -m tools.train --stage=stage1 --dataset=demo --data_dir=/tmp/demo --output_dir=/tmp/runs/s1
  python -m tools.train --stage=stage2 --dataset=demo --data_dir=/tmp/demo --output_dir=/tmp/runs/s2 \\
      --init_from=/tmp/runs/s1

Stage 2 runs the frozen network once over --stored_views augmented views of every training image
and trains the exits on the stored outputs (<output_dir>/stored_views/, at most --max_store_gb);
--stored_views=0 runs the frozen network at every step instead (the path for multi-worker runs).

Running the same command again resumes from the run directory's last checkpoint. With --init_from
the network (architecture, input size) is taken from that run; a network flag given that differs
from it, or a dataset of another class count, is an error naming each field.
Multi-worker training: set TF_CONFIG on every worker (see tf.distribute.MultiWorkerMirroredStrategy).
"""
import dataclasses
import datetime
import os

import tensorflow as tf
from absl import flags

import mess_cli
from mess_tf import backbones, checkpoints, heads, network, training
from mess_tf.data import demo, pipeline, registry

FLAGS = flags.FLAGS
flags.DEFINE_enum("stage", "baseline", training.STAGES, "What to train.")
flags.DEFINE_enum("dataset", "demo", registry.DATASETS, "Dataset reader.")
flags.DEFINE_string("data_dir", None, "Dataset folder (for demo: written there if missing).", required=True)
flags.DEFINE_string("output_dir", None, "Run directory (checkpoints, run_config.json, metrics.json, logs/).",
                    required=True)
flags.DEFINE_string("init_from", None, "Run directory or checkpoint to start from (stage 2: a stage-1 run).")
flags.DEFINE_bool("skip_bad", False, "Leave out (and name) unreadable or unpaired samples instead of stopping at the "
                  "first.")
flags.DEFINE_enum("demo_preset", "quick", list(demo.PRESETS), "Demo dataset size, when it must be generated.")
flags.DEFINE_enum("backbone", "mobilenet_v2", backbones.BACKBONES, "Backbone.")
flags.DEFINE_float("alpha", 1.0, "MobileNet width multiplier.")
flags.DEFINE_integer("output_stride", None, "8, 16 or 32 (default: per dataset).")
flags.DEFINE_string("backbone_weights", None, "Backbone weights: 'imagenet' (EfficientNet-Lite0/1/2, from the "
                    "pretrained extra) or a local .h5 weights file of the classifier.")
flags.DEFINE_enum("final_head", "deeplabv3", heads.FINAL_KINDS, "Final head.")
flags.DEFINE_integer("final_filters", 256, "ASPP/decoder channels of the final head.")
flags.DEFINE_bool("separable", False, "Depthwise-separable convs in the final head (mobile DeepLab).")
flags.DEFINE_integer("crop_size", None, "Square training crop = network input size (default: per dataset).")
flags.DEFINE_integer("steps", None, "Training steps (default: per dataset).")
flags.DEFINE_integer("batch_size", None, "Global batch size (default: per dataset).")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adamw"], "SGD with momentum, or AdamW; both with poly decay.")
flags.DEFINE_float("learning_rate", None, "Peak learning rate (default: per dataset and optimizer).")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("weight_decay", 4e-5, "Decoupled weight decay.")
flags.DEFINE_integer("warmup_steps", 0, "Linear learning-rate warm-up steps.")
flags.DEFINE_float("clip_norm", 0.0, "Gradient global-norm clipping (0 = off).")
flags.DEFINE_float("bn_momentum", None, "Batch-norm moving-average momentum (default: the backbone's own, "
                   "0.999 for MobileNets; use 0.99 or less for short runs from scratch).")
flags.DEFINE_integer("precise_bn_batches", 0, "After the last step, set batch-norm statistics to their average "
                     "over this many training batches (moving averages lag in short runs; one replica only).")
flags.DEFINE_bool("mixed_precision", False, "float16 compute (GPU only).")
flags.DEFINE_integer("seed", 0, "Seed (weights, data order, augmentation, stage-1 schedule).")
flags.DEFINE_list("exits", [], "Exit ids position:head_id (default: positions x heads).")
flags.DEFINE_list("positions", [], "Exit positions (default: every candidate position).")
flags.DEFINE_list("heads", [], "Exit-head ids (default: a light head for stage1, the whole head space otherwise).")
flags.DEFINE_enum("schedule", "round_robin", training.SCHEDULES, "Stage 1: which early exit trains each step.")
flags.DEFINE_float("final_weight", 1.0, "Loss weight of the final exit.")
flags.DEFINE_float("exit_weight", 1.0, "Loss weight of each early exit (stage 1, joint).")
flags.DEFINE_bool("distillation", True, "Stage 2: positive-filtering distillation from the final exit.")
flags.DEFINE_float("temperature", 1.0, "Distillation temperature.")
flags.DEFINE_float("distillation_weight", 1.0, "Distillation loss weight.")
flags.DEFINE_integer("checkpoint_every", 500, "Steps between checkpoints.")
flags.DEFINE_integer("log_every", 50, "Steps between progress lines.")
flags.DEFINE_integer("eval_every", 0, "Steps between validation mIoU evaluations (0 = at checkpoints).")
flags.DEFINE_integer("eval_batches", 8, "Validation batches per evaluation (0 = none).")
flags.DEFINE_integer("stored_views", None, "Stage 2: views of each training image to run the frozen network on once "
                     "and train the exits on (default 8 under the default strategy; 0 = run it every step).",
                     lower_bound=0)
flags.DEFINE_integer("loss_stride", 1, "Stage 2: compute the exits' losses at 1/loss_stride of the crop size "
                     "(1: full resolution).", lower_bound=1)
flags.DEFINE_float("max_store_gb", training.TrainConfig.max_store_bytes / 1e9, "Stage 2: the most GB the stored "
                   "views may take on disk (fewer views are stored to fit).", lower_bound=0)


@dataclasses.dataclass(frozen=True)
class DatasetDefaults:
    crop_size: int
    output_stride: int
    learning_rate: float  # SGD; AdamW uses a tenth
    batch_size: int
    steps: int


DEFAULTS = {
    "demo": DatasetDefaults(96, 16, 0.05, 8, 2000),
    "cityscapes": DatasetDefaults(768, 16, 0.01, 8, 90000),
    "voc": DatasetDefaults(512, 16, 0.007, 16, 30000),
    "ade20k": DatasetDefaults(512, 16, 0.01, 16, 150000),
    "folder": DatasetDefaults(512, 16, 0.01, 8, 30000),
}


DEFAULT_STORED_VIEWS = 8


def _or(value, default):
    return default if value is None else value


# Flags that set the network, and the NetworkConfig field each sets (checked against --init_from's run).
NETWORK_FLAGS = {"backbone": "backbone.name", "alpha": "backbone.alpha", "output_stride": "backbone.output_stride",
                 "crop_size": "input_size", "final_head": "final_head.kind", "final_filters": "final_head.filters",
                 "separable": "final_head.separable"}


def network_config(defaults, num_classes):
    """The NetworkConfig from the flags, or --init_from's run's (checked against the flags given)."""
    crop = _or(FLAGS.crop_size, defaults.crop_size)
    if FLAGS.init_from:
        given = {field: (crop, crop) if name == "crop_size" else FLAGS[name].value
                 for name, field in NETWORK_FLAGS.items() if FLAGS[name].present}
        config, inherited = checkpoints.inherit_network(FLAGS.init_from, given, num_classes)
        if inherited:
            print(f"from --init_from {FLAGS.init_from}: " + ", ".join(f"{k}={v}" for k, v in inherited.items()),
                  flush=True)
        return config
    return network.NetworkConfig(
        backbone=backbones.BackboneConfig(FLAGS.backbone, _or(FLAGS.output_stride, defaults.output_stride),
                                          FLAGS.alpha, FLAGS.backbone_weights),
        num_classes=num_classes, input_size=(crop, crop),
        final_head=heads.FinalHeadConfig(FLAGS.final_head, FLAGS.final_filters, separable=FLAGS.separable))


def train_config(defaults):
    learning_rate = _or(FLAGS.learning_rate, defaults.learning_rate * (0.1 if FLAGS.optimizer == "adamw" else 1.0))
    return training.TrainConfig(
        stage=FLAGS.stage, steps=_or(FLAGS.steps, defaults.steps),
        batch_size=_or(FLAGS.batch_size, defaults.batch_size),
        optimizer=FLAGS.optimizer, learning_rate=learning_rate, momentum=FLAGS.momentum,
        weight_decay=FLAGS.weight_decay, warmup_steps=FLAGS.warmup_steps, clip_norm=FLAGS.clip_norm,
        bn_momentum=FLAGS.bn_momentum, precise_bn_batches=FLAGS.precise_bn_batches,
        mixed_precision=FLAGS.mixed_precision, seed=FLAGS.seed, exits=FLAGS.exits, positions=FLAGS.positions,
        heads=FLAGS.heads, schedule=FLAGS.schedule, final_weight=FLAGS.final_weight, exit_weight=FLAGS.exit_weight,
        distillation=FLAGS.distillation, temperature=FLAGS.temperature,
        distillation_weight=FLAGS.distillation_weight, checkpoint_every=FLAGS.checkpoint_every,
        log_every=FLAGS.log_every, eval_every=FLAGS.eval_every, eval_batches=FLAGS.eval_batches,
        stored_views=stored_views(), max_store_bytes=int(FLAGS.max_store_gb * 1e9), loss_stride=FLAGS.loss_stride)


def stored_views():
    """--stored_views, or its default: 8 for stage 2 under the default strategy, else 0."""
    if FLAGS.stored_views is not None:
        return FLAGS.stored_views
    single = "TF_CONFIG" not in os.environ and len(tf.config.list_physical_devices("GPU")) <= 1
    return DEFAULT_STORED_VIEWS if FLAGS.stage == "stage2" and single else 0


def strategy():
    """MultiWorkerMirrored with TF_CONFIG, Mirrored on several GPUs, else the default strategy."""
    if "TF_CONFIG" in os.environ:
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def format_progress(record):
    """One progress line: step, losses (each exit, or a summary when there are many), rate, ETA; or
    the frozen pass's progress into stage 2's stored views."""
    if isinstance(record, training.StoreProgress):
        return (f"stored views: {record.batches_done}/{record.batches} batches ({record.views} views per image, "
                f"{record.bytes / 1e9:.2f} GB)  {record.images_per_s:.1f} img/s  "
                f"ETA {datetime.timedelta(seconds=round(record.eta_s))}")
    exits = {k: v for k, v in record.losses.items() if k not in ("total", "final")}
    if len(exits) <= 3:
        exit_text = " ".join(f"{k}={v:.3f}" for k, v in exits.items())
    else:
        exit_text = f"{len(exits)} exits mean={sum(exits.values()) / len(exits):.3f} max={max(exits.values()):.3f}"
    line = (f"step {record.step}/{record.steps}  loss {record.losses['total']:.3f}"
            f"{'  final=%.3f' % record.losses['final'] if 'final' in record.losses else ''}  {exit_text}  "
            f"lr {record.learning_rate:.2e}  {record.images_per_s:.1f} img/s  "
            f"ETA {datetime.timedelta(seconds=round(record.eta_s))}")
    if record.miou:
        line += "  mIoU " + " ".join(f"{k}={v:.3f}" for k, v in record.miou.items()
                                     if len(record.miou) <= 4 or k == "final")
    return line


def main(argv):
    del argv
    defaults = DEFAULTS[FLAGS.dataset]
    if FLAGS.dataset == "demo" and not os.path.isdir(FLAGS.data_dir):
        demo.generate(FLAGS.data_dir, FLAGS.demo_preset, seed=FLAGS.seed)
    dataset = registry.get_dataset(FLAGS.dataset, FLAGS.data_dir, skip_bad=FLAGS.skip_bad)
    net_config = network_config(defaults, dataset.info.num_classes)
    config = train_config(defaults)
    crop = net_config.input_size
    # A wrapped Keras model's input size is fixed; a built-in network's must divide by its stride.
    stride = 1 if isinstance(net_config, network.WrappedConfig) else net_config.backbone.output_stride
    samples, _ = pipeline.check_samples(dataset.samples("train"), dataset.info, skip_bad=FLAGS.skip_bad)

    def train_data(first_batch):  # a resumed run starts the stream at its step, reading nothing it skips
        return pipeline.train_dataset(samples, dataset.info, crop, config.batch_size, seed=config.seed,
                                      multiple_of=stride, check=False, first_batch=first_batch)

    val_data = None
    if config.eval_batches and "val" in dataset.splits:
        val_data = pipeline.eval_dataset(dataset.samples("val"), dataset.info, crop, config.batch_size,
                                         multiple_of=stride, skip_bad=FLAGS.skip_bad)
    result = training.train(net_config, config, train_data, FLAGS.output_dir, val_data=val_data,
                            init_from=FLAGS.init_from, strategy=strategy(),
                            progress=lambda record: print(format_progress(record), flush=True),
                            class_names=dataset.info.class_names, train_images=len(samples))
    miou = result.metrics["miou"] or {}
    print(f"done: {result.checkpoint}  ({len(result.network.exit_ids)} early exits, "
          f"{result.metrics['images_per_s']:.1f} img/s)")
    for name, value in sorted(miou.items(), key=lambda kv: -kv[1]):
        print(f"  mIoU {name}: {value:.4f}")


if __name__ == "__main__":
    mess_cli.run(main)
