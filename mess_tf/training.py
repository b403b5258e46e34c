"""MESS training: the baseline, the two stages, and naive joint training, as custom loops.

  * baseline: the original single-exit network (every result is compared with it).
  * stage1 (exit-aware backbone training): backbone + final head trained end to end with light
    exits attached; each step's loss is the final exit's plus ONE early exit's, the early exit
    alternating over the chosen ones (round robin, or random but reproducible per step).
  * stage2 (frozen backbone): backbone and final head run with training=False (batch norm uses
    and keeps its moving statistics) and their variables are not given to the optimiser; every
    candidate exit is trained at once on one shared backbone pass, with cross-entropy plus
    positive-filtering distillation from the final exit (switchable).
  * joint (naive ablation): all exits and the backbone trained end to end together.

Each step is a tf.function around a GradientTape, run with `strategy.run` under any
tf.distribute strategy (default, MirroredStrategy, MultiWorkerMirroredStrategy): gradients are
summed over replicas explicitly, then clipped, then applied.

Resume: the checkpoint holds the model, the optimiser (whose `iterations` is the step) and
nothing else; the data position is the step, because the training data must be deterministic for
a given seed: a resumed run skips the batches already consumed. A run killed at any moment
therefore resumes from its last checkpoint and ends with the same weights as an uninterrupted one.
"""
import collections
import contextlib
import dataclasses
import errno
import itertools
import logging
import os
import shutil
import time

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from mess_tf import checkpoints, graph, heads, io_utils, losses, network, optimizers, run_lock
from mess_tf import stored_views as stored_views_lib
from mess_tf.deployment import FINAL_EXIT, exit_id
from mess_tf.keras_lib import keras

STAGES = ("baseline", "stage1", "stage2", "joint")
SCHEDULES = ("round_robin", "random")
LIGHT_EXIT_HEAD = "fcn_w32_b0"  # stage 1's default exits: a 1x1 reduction and a classifier
METRICS = "metrics.json"
STORE_FLUSH_BATCHES = 20  # stored-view batches between flushes to disk: at most what a killed fill redoes
# TrainConfig fields a resumed run may change: they affect reporting, not the weights.
_REPORTING_FIELDS = ("checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "eval_batches")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train (the network itself is a network.NetworkConfig).

    Attributes:
      stage: one of STAGES.
      steps: optimiser steps in total (a resumed run continues to this step).
      batch_size: global batch size in images (split over replicas).
      optimizer: "sgd" (momentum + poly decay) or "adamw" (poly decay too).
      learning_rate: peak learning rate; momentum: SGD momentum; weight_decay: decoupled, per step.
      warmup_steps: linear learning-rate warm-up.
      clip_norm: clip the replica-summed gradient to this global norm; 0 = off.
      bn_momentum: batch-norm moving-average momentum of every layer (DeepLab's batch_norm_decay);
        None keeps the backbone's own (0.999 in keras.applications MobileNets, whose moving
        statistics then lag far behind the weights in a short run from scratch).
      mixed_precision: float16 compute with loss scaling; only on a GPU (ignored with a warning elsewhere).
      seed: seeds weights initialisation and the stage-1 random schedule.
      exits: exit ids (`position:head_id`) to attach; empty = `positions` x `heads`.
      positions: candidate position names; empty = every position but the last (the backbone output).
      heads: exit-head ids; empty = LIGHT_EXIT_HEAD for stage1, heads.default_head_space() otherwise.
      schedule: stage 1's choice of the early exit per step, "round_robin" or "random".
      final_weight, exit_weight: loss weights of the final exit and of each early exit
        (stage 1, joint; stage 2 weighs every exit 1).
      distillation: stage 2 adds positive-filtering distillation from the final exit.
      temperature, distillation_weight: of that distillation term.
      checkpoint_every, keep_checkpoints: checkpoint cadence (steps) and how many to keep.
      log_every: steps per progress record.
      eval_every: steps between validation mIoU evaluations (0 = at checkpoints); eval_batches:
        validation batches per evaluation (0 = no evaluation).
      precise_bn_batches: after the last step, replace the moving mean and variance of every
        batch-norm layer the stage trains by their average over this many training batches
        (precise_batch_norm; 0 = keep the moving averages).
      crop_size: (H, W) of the training crops in pixels, when smaller than the network's input
        size: the network is fully convolutional, so it trains on crops and is evaluated, saved
        and deployed at its input size; None = the input size.
      stored_views: stage 2 only: K > 0 runs the frozen pass once over K views of every training
        image and trains the heads on the stored outputs (mess_tf/stored_views.py); 0 runs it at
        every step (the direct path, also the one for multi-worker strategies).
      max_store_bytes: the most bytes the stored views may take (K is lowered to fit).
      store_dtype: "float16" or "float32", how stored feature maps and logits are kept.
      loss_stride: stage 2 only: the exits' losses are computed at 1/loss_stride of the crop size
        (1: full resolution; the largest part of a step on stored views, see bench/stage2_speed.py).
    """

    stage: str = "baseline"
    steps: int = 1000
    batch_size: int = 8
    optimizer: str = "sgd"
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 4e-5
    warmup_steps: int = 0
    clip_norm: float = 0.0
    bn_momentum: float = None
    mixed_precision: bool = False
    seed: int = 0
    exits: tuple = ()
    positions: tuple = ()
    heads: tuple = ()
    schedule: str = "round_robin"
    final_weight: float = 1.0
    exit_weight: float = 1.0
    distillation: bool = True
    temperature: float = 1.0
    distillation_weight: float = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 50
    eval_every: int = 0
    eval_batches: int = 8
    precise_bn_batches: int = 0
    crop_size: tuple = None
    stored_views: int = 0
    max_store_bytes: int = stored_views_lib.DEFAULT_MAX_BYTES
    store_dtype: str = "float16"
    loss_stride: int = 1

    def __post_init__(self):
        for name in ("exits", "positions", "heads"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.crop_size is not None:
            object.__setattr__(self, "crop_size", tuple(int(v) for v in self.crop_size))
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; expected one of {STAGES}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown stage-1 schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if self.optimizer not in optimizers.OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {optimizers.OPTIMIZERS}")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.precise_bn_batches < 0:
            raise ValueError(f"precise_bn_batches={self.precise_bn_batches} must be >= 0")
        if self.bn_momentum is not None and not 0 <= self.bn_momentum < 1:
            raise ValueError(f"bn_momentum={self.bn_momentum} must be in [0, 1)")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.stored_views < 0 or (self.stored_views and self.stage != "stage2"):
            raise ValueError(f"stored_views={self.stored_views}: stored views are for stage2 only, and K >= 0")
        if self.loss_stride < 1 or (self.loss_stride > 1 and self.stage != "stage2"):
            raise ValueError(f"loss_stride={self.loss_stride}: a stride above 1 is for stage2 only, and >= 1")
        if self.store_dtype not in ("float16", "float32"):
            raise ValueError(f"store_dtype={self.store_dtype!r}; expected 'float16' or 'float32'")
        if self.stage == "baseline" and (self.exits or self.positions or self.heads):
            raise ValueError("the baseline stage trains the single-exit network; do not give exits, positions or heads")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Progress:
    """One progress record (every `log_every` steps, and at the last step).

    Attributes:
      step, steps: steps done and in total.
      losses: name -> mean loss over the steps since the last record ("total", "final", exit ids).
      learning_rate: at this step.
      images_per_s: training throughput since the last record.
      eta_s: estimated seconds to the end at that throughput.
      miou: exit id | "final" -> validation mIoU, when an evaluation ran at this step; else None.
    """

    step: int
    steps: int
    losses: dict
    learning_rate: float
    images_per_s: float
    eta_s: float
    miou: dict = None


@dataclasses.dataclass(frozen=True)
class StoreProgress:
    """Progress of stage 2's frozen pass into its stored views (every few batches, and at the end).

    Attributes:
      batches_done, batches: stored batches so far and in all.
      views: K, the views of each training image stored.
      bytes: the store's size on disk when full.
      images_per_s: frozen-pass throughput since the last record.
      eta_s: estimated seconds to the end of the fill.
    """

    batches_done: int
    batches: int
    views: int
    bytes: int
    images_per_s: float
    eta_s: float


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the trained network, its run directory, last checkpoint and metrics."""

    network: network.MultiExitNetwork
    run_dir: str
    checkpoint: str
    metrics: dict


# -- exits ----------------------------------------------------------------------------------------

def positions_at_fractions(backbone, fractions):
    """Names of the candidate positions whose cumulative MACs are closest to `fractions` of the
    whole backbone's (e.g. (0.25, 0.5, 0.75)); never the last position (the final head's)."""
    total = backbone.positions[-1].cumulative_macs
    candidates = backbone.positions[:-1]
    chosen = [min(candidates, key=lambda p: abs(p.cumulative_macs - f * total)).name for f in fractions]
    return list(dict.fromkeys(chosen))


def resolve_exits(train_config, backbone_positions=None):
    """The exit ids a run attaches.

    Args:
      train_config: TrainConfig.
      backbone_positions: callable returning the backbone's Position list; only called when the
        config names neither exits nor positions.
    """
    if train_config.stage == "baseline":
        return []
    if train_config.exits:
        return list(train_config.exits)
    positions = train_config.positions or [p.name for p in backbone_positions()[:-1]]
    if train_config.heads:
        head_ids = train_config.heads
    elif train_config.stage == "stage1":
        head_ids = (LIGHT_EXIT_HEAD,)
    else:
        head_ids = [h.id for h in heads.default_head_space()]
    return [exit_id(p, h) for p in positions for h in head_ids]


# -- evaluation -----------------------------------------------------------------------------------

def miou_from_confusion(confusion):
    """Mean IoU over the classes present in labels or predictions; confusion [C, C] (rows = labels)."""
    confusion = np.asarray(confusion, np.float64)
    true_positive = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    return float(np.mean(true_positive[present] / union[present])) if present.any() else 0.0


def evaluate(model, dataset, num_classes, max_batches=0, ignore_label=losses.IGNORE_LABEL):
    """Per-exit mIoU of a multi-output segmentation model.

    Args:
      model: keras Model, images [B, H, W, 3] -> {name: logits [B, H, W, num_classes]}.
      dataset: tf.data of (images float32 [B, H, W, 3], labels int [B, H, W]) batches.
      num_classes: classes (labels equal to `ignore_label` do not count).
      max_batches: evaluate at most this many batches; 0 = the whole dataset.

    Returns:
      {output name: mIoU in [0, 1]}.
    """
    @tf.function
    def confusions(images, labels):
        labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
        valid = tf.not_equal(labels, ignore_label)
        labels = tf.boolean_mask(labels, valid)
        return {name: tf.math.confusion_matrix(
                    labels, tf.boolean_mask(tf.reshape(tf.argmax(logits, -1, output_type=tf.int32), [-1]), valid),
                    num_classes, dtype=tf.int64)
                for name, logits in model(images, training=False).items()}

    totals = None
    for images, labels in (dataset.take(max_batches) if max_batches else dataset):
        batch = {k: v.numpy() for k, v in confusions(images, labels).items()}
        totals = batch if totals is None else {k: totals[k] + batch[k] for k in totals}
    if totals is None:
        raise ValueError("the evaluation dataset is empty")
    return {name: miou_from_confusion(c) for name, c in totals.items()}


# -- the per-stage losses -------------------------------------------------------------------------

@dataclasses.dataclass
class _Plan:
    """One kind of training step.

    prepare: images -> model inputs, computed outside the gradient tape (stage 2's frozen pass).
    loss: (inputs, labels) -> (total loss, {name: loss}).
    variables: the variables this step trains.
    """

    prepare: callable
    loss: callable
    variables: list


def _end_to_end_plan(model, config, exit_ids):
    """Trains `model` end to end on final_weight * CE(final) + exit_weight * sum CE(exits)."""
    def loss(images, labels):
        outputs = model(images, training=True)
        parts = {FINAL_EXIT: losses.cross_entropy(labels, outputs[FINAL_EXIT])}
        parts.update({e: losses.cross_entropy(labels, outputs[e]) for e in exit_ids})
        total = config.final_weight * parts[FINAL_EXIT] + config.exit_weight * tf.add_n(
            [parts[e] for e in exit_ids] or [tf.constant(0.0)])
        return total, parts

    return _Plan(lambda images: images, loss, model.trainable_variables)


def stage2_models(net, coarse=False):
    """Stage 2's two halves, sharing `net`'s layers.

    Returns:
      (frozen, heads): `frozen` maps images [B, H, W, 3] to {position: features [B, h, w, c]} for
      every exit's position, plus {FINAL_EXIT: the final exit's logits before their bilinear
      upsampling [B, h', w', classes]}; `heads` maps that dict to {exit id: logits [B, H, W,
      classes]} for every exit, plus {FINAL_EXIT: the final logits upsampled to [B, H, W, classes]}.
      Chained, they compute what `net.model` computes. With `coarse`, `heads` returns every exit's
      and the final exit's logits before their upsampling instead.
    """
    positions = list(dict.fromkeys(net.position_of(e).name for e in net.exit_ids))
    coarse_final = net.coarse_logits(FINAL_EXIT)
    frozen = keras.Model(net.image, {**{p: net.backbone.feature(p) for p in positions}, FINAL_EXIT: coarse_final},
                         name="frozen_backbone")
    inputs = {p: keras.Input(net.backbone.feature(p).shape[1:], name=p) for p in positions}
    inputs[FINAL_EXIT] = keras.Input(coarse_final.shape[1:], name="final_coarse_logits")
    logits = net.coarse_logits if coarse else net.logits
    outputs = graph.replay({e: logits(e) for e in net.exit_ids},
                           [(net.backbone.feature(p), inputs[p]) for p in positions])
    final = net.logits(FINAL_EXIT)
    upsampled = coarse or final is coarse_final
    outputs[FINAL_EXIT] = inputs[FINAL_EXIT] if upsampled else graph.producer(final)(inputs[FINAL_EXIT])
    return frozen, keras.Model(inputs, outputs, name="exit_heads")


def stage2_loss(exit_ids, input_size, config):
    """Stage 2's loss: loss(coarse outputs, labels) -> (total, {exit id: loss}).

    Args:
      exit_ids: the exits trained. input_size: (H, W) of the crops (pixels).
      config: TrainConfig (distillation, its weight and temperature, loss_stride).

    The loss takes {exit id or FINAL_EXIT: logits before their upsampling} and labels uint8
    [B, H, W]: every exit's logits (and the teacher's) are upsampled bilinearly, as the network
    does, but to 1/loss_stride of the crop, where the labels are sampled (nearest neighbour); then
    each exit's cross-entropy plus positive-filtering distillation from the final exit.
    """
    teacher_weight = config.distillation_weight if config.distillation else 0.0
    stride = config.loss_stride
    size = [d // stride for d in input_size]

    def loss(coarse_outputs, labels):
        outputs = {k: tf.image.resize(v, size, method="bilinear") for k, v in coarse_outputs.items()}
        labels = labels[:, stride // 2::stride, stride // 2::stride]
        target = losses.distillation_target(labels, outputs[FINAL_EXIT], config.temperature) if teacher_weight else None
        parts = {e: losses.exit_loss(labels, outputs[e], target, teacher_weight)[0] for e in exit_ids}
        return tf.add_n(list(parts.values())), parts

    return loss


def _frozen_backbone_plan(net, config, stored):
    """Stage 2: a frozen (inference-mode) pass to every position and the final logits, then all
    exit heads trained on those features. With `stored` views the frozen pass was run before
    (mess_tf/stored_views.py) and a step receives its outputs instead of images."""
    frozen, exit_heads = stage2_models(net, coarse=True)
    exit_loss = stage2_loss(net.exit_ids, net.backbone.input_size, config)

    def loss(frozen_outputs, labels):
        return exit_loss(exit_heads(frozen_outputs, training=True), labels)

    prepare = (lambda inputs: inputs) if stored else (lambda images: frozen(images, training=False))
    return _Plan(prepare, loss, exit_heads.trainable_variables)


def _plans(net, config):
    """The training steps of a stage; stage 1 has one per early exit."""
    if config.stage == "baseline":
        return [_end_to_end_plan(net.single_exit_model(), config, [])]
    if not net.exit_ids:
        raise ValueError(f"stage {config.stage} needs at least one early exit")
    if config.stage == "stage1":
        return [_end_to_end_plan(net.subset_model([e]), config, [e]) for e in net.exit_ids]
    if config.stage == "stage2":
        return [_frozen_backbone_plan(net, config, stored=config.stored_views > 0)]
    return [_end_to_end_plan(net.model, config, net.exit_ids)]


def stage1_exit_index(schedule, step, num_exits, seed):
    """Which early exit stage 1 trains at `step` (1-based); a pure function of its arguments, so
    a resumed run continues the same sequence."""
    if schedule == "round_robin":
        return (step - 1) % num_exits
    return int(np.random.default_rng([seed, step]).integers(num_exits))


def _train_step(strategy, optimizer, plan, clip_norm, loss_scaling):
    """A tf.function running one distributed step of `plan`; returns replica-mean losses."""
    def replica_step(images, labels):
        inputs = plan.prepare(images)
        with tf.GradientTape() as tape:
            total, parts = plan.loss(inputs, labels)
            scaled = total / strategy.num_replicas_in_sync
            if loss_scaling:
                scaled = optimizer.get_scaled_loss(scaled)
        grads = tape.gradient(scaled, plan.variables)
        if loss_scaling:
            grads = optimizer.get_unscaled_gradients(grads)
        grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
        if clip_norm:
            grads, _ = tf.clip_by_global_norm(grads, clip_norm)
        optimizer.apply_gradients(zip(grads, plan.variables), skip_gradients_aggregation=True)
        return dict(parts, total=total)

    @tf.function
    def step(images, labels):
        parts = strategy.run(replica_step, args=(images, labels))
        return {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in parts.items()}

    return step


# -- run directory and distribution ---------------------------------------------------------------

def _is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "chief" or (not has_chief and resolver.task_type == "worker" and resolver.task_id == 0)


def _check_resumable(run_dir, run_config):
    """Raises if `run_dir` already holds a run whose config differs from `run_config`."""
    stored = checkpoints.read_run_config(run_dir)
    # A field added to TrainConfig after the run was written has its default there.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    stored = {**stored, "train": {**{k: v for k, v in defaults.items() if k not in stored["train"]}, **stored["train"]}}
    comparable = [{**c, "train": {k: v for k, v in c["train"].items() if k not in _REPORTING_FIELDS}}
                  for c in (stored, run_config)]
    for c in comparable:
        c.pop("init_from", None)
        c.pop("class_names", None)  # names label the classes; they do not change the run
    diffs = checkpoints.config_differences(*comparable)
    if diffs:
        raise ValueError(f"output directory {run_dir} holds a run with a different config, which cannot be "
                         f"resumed with this one ({'; '.join(diffs)}); use a new output directory")


@contextlib.contextmanager
def _compute_dtype(mixed_precision):
    """Builds layers under the mixed_float16 policy when asked (and a GPU exists)."""
    previous = keras.mixed_precision.global_policy()
    if mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


# TensorBoard's scalar-plugin metadata, written with tf.summary.write so that logging needs no
# tensorboard package (viewing the logs does).
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")).SerializeToString()


def _write_scalar(tag, value):
    tf.summary.write(tag.replace(":", "/"), tf.constant(value, tf.float32), metadata=_SCALAR_METADATA)


# -- the entry point ------------------------------------------------------------------------------

def train(network_config, train_config, train_data, output_dir, val_data=None, init_from=None,
          strategy=None, progress=None, class_names=None, train_images=None):
    """Trains one stage; resumes if `output_dir` already holds a checkpoint of the same run.

    The run folder is locked while the chief writes it (run_lock): a second process training
    into it is refused, naming the first. Temporary files a killed or failed run left there are
    removed first.

    Args:
      network_config: network.NetworkConfig (its input size is the deployed one; the network
        trains at train_config.crop_size when that is given).
      train_config: TrainConfig.
      train_data: tf.data.Dataset of (images float32 [B, H, W, 3] RGB 0..255, labels uint8/int
        [B, H, W], 255 = ignore) with B = train_config.batch_size and H x W the crop size,
        infinite (or at least `steps` batches) and deterministic for a given seed (a resumed run
        skips the batches consumed); or a function first batch index -> that Dataset from there
        on (pipeline.train_dataset's `first_batch`), so that a resumed run reads no skipped batch.
      output_dir: the run directory (checkpoints, run_config.json, metrics.json, logs/).
      val_data: optional tf.data of (images, labels) batches at the network's input size, for
        per-exit validation mIoU; every evaluation is kept in metrics.json's `miou_curve`.
      init_from: optional run directory or checkpoint to initialise from by layer name (e.g. a
        stage-1 run for stage 2); ignored when resuming.
      strategy: a tf.distribute.Strategy; default: the current (default) strategy.
      progress: optional callable receiving a Progress record every `log_every` steps (and, while
        stage 2 stores its views, StoreProgress records).
      class_names: optional dataset class names, kept in run_config.json for the exported metadata.
      train_images: images in one epoch of `train_data` (needed with train_config.stored_views).

    Returns:
      TrainResult.

    Raises:
      ValueError: bad input, or another process writing `output_dir`.
      OSError: a write failed (a full disk), naming the file.
    """
    strategy = strategy or tf.distribute.get_strategy()
    is_chief = _is_chief(strategy)  # the chief alone writes the run folder (_checkpoint_writer)
    with run_lock.hold(output_dir) if is_chief else contextlib.nullcontext():
        if is_chief:
            _remove_leftovers(output_dir)
        return _train(network_config, train_config, train_data, output_dir, val_data, init_from, strategy, progress,
                      class_names, train_images)


def _train(network_config, train_config, train_data, output_dir, val_data, init_from, strategy, progress,
           class_names, train_images):
    """train(), in a run folder this process may write."""
    config = train_config
    if config.batch_size % strategy.num_replicas_in_sync:
        raise ValueError(f"batch_size={config.batch_size} is not divisible by the "
                         f"{strategy.num_replicas_in_sync} replicas")
    if config.stored_views and (strategy.num_replicas_in_sync > 1 or getattr(strategy, "cluster_resolver", None)):
        raise ValueError("stored views run under the default strategy only; train with stored_views=0 "
                         "(--stored_views=0) under a multi-worker or multi-device strategy")
    if config.stored_views and not train_images:
        raise ValueError("stored_views needs train_images, the number of images in one epoch of train_data")
    if config.precise_bn_batches and strategy.num_replicas_in_sync > 1:
        raise ValueError("precise_bn_batches needs a single replica; set it to 0 under a multi-replica strategy")
    crop_config = dataclasses.replace(network_config, input_size=config.crop_size or network_config.input_size)
    if any(d % config.loss_stride for d in crop_config.input_size):
        raise ValueError(f"loss_stride={config.loss_stride} must divide the crop size {crop_config.input_size}")
    if isinstance(network_config, network.WrappedConfig) and crop_config != network_config:
        raise ValueError(f"crop_size={config.crop_size}: a wrapped Keras model trains at its own input size "
                         f"{network_config.input_size}")
    _check_batches(_batches_from(train_data, 0), crop_config, "train_data")
    mixed = config.mixed_precision and bool(tf.config.list_physical_devices("GPU"))
    if config.mixed_precision and not mixed:
        logging.warning("mixed precision needs a GPU; training in float32")
    exits = resolve_exits(config, lambda: _backbone_positions(network_config))
    run_config = {"network": network_config.to_dict(), "train": config.to_dict(), "exits": exits,
                  "init_from": init_from and os.fspath(init_from)}
    if class_names is not None:
        run_config["class_names"] = list(class_names)
    resuming = bool(tf.train.latest_checkpoint(output_dir)) if os.path.isdir(output_dir) else False
    if resuming:
        _check_resumable(output_dir, run_config)

    keras.utils.set_random_seed(config.seed)
    with _compute_dtype(mixed), strategy.scope():
        net = network.build(crop_config, exits)
        if config.bn_momentum is not None:
            _set_bn_momentum(net.model, config.bn_momentum)
        plans = _plans(net, config)
        optimizer = optimizers.make_optimizer(config.optimizer, config.learning_rate, config.steps, config.momentum,
                                              config.weight_decay, config.warmup_steps)
        if mixed:
            optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
        optimizer.build(list({id(v): v for p in plans for v in p.variables}.values()))
    checkpoint = tf.train.Checkpoint(model=net.model, optimizer=optimizer)
    is_chief = _is_chief(strategy)
    if resuming:
        checkpoint.restore(tf.train.latest_checkpoint(output_dir)).assert_consumed()
    else:
        if init_from:
            init_checkpoint, _ = checkpoints.init_from(net, init_from)
            run_config["init_from"] = init_checkpoint
        if is_chief:
            checkpoints.write_run_config(output_dir, run_config)
    start = int(optimizer.iterations.numpy())
    metrics_path = os.path.join(output_dir, METRICS)
    if start >= config.steps and os.path.exists(metrics_path):  # finished earlier (metrics.json is written last)
        return TrainResult(net, output_dir, checkpoints.resolve_checkpoint(output_dir),
                           io_utils.read_json(metrics_path, "training metrics"))
    steps = [_train_step(strategy, optimizer, plan, config.clip_norm, mixed) for plan in plans]
    save = _checkpoint_writer(checkpoint, output_dir, config.keep_checkpoints, strategy, is_chief)
    writer = tf.summary.create_file_writer(os.path.join(output_dir, "logs")) if is_chief \
        else tf.summary.create_noop_writer()
    if config.stored_views:
        store = _stored_views(net, config, train_data, train_images, output_dir, progress)
        data = (store.batch(step, config.seed) for step in itertools.count(start + 1))
    else:
        data = iter(strategy.experimental_distribute_dataset(_batches_from(train_data, start)))
    eval_every = config.eval_every or config.checkpoint_every

    # Crops train a network built at their size; evaluation runs at the input size, on a twin
    # network built there that gets the current weights (the layers and weights are the same).
    eval_net = net if crop_config == network_config or val_data is None else network.build(network_config, exits)
    stored_val = []  # with stored views, the validation images' frozen outputs, computed once

    def run_eval(step):
        if eval_net is not net:
            eval_net.model.set_weights(net.model.get_weights())
        if config.stored_views:
            if not stored_val:
                stored_val.extend(_frozen_outputs(eval_net, val_data, config.eval_batches))
            result = evaluate(stored_val[0], stored_val[1:], network_config.num_classes)
        else:
            result = evaluate(eval_net.model, val_data, network_config.num_classes, config.eval_batches)
        curve.append({"step": step, "miou": result})
        if is_chief:  # kept beside the checkpoints, so a resumed run keeps the evaluations done
            io_utils.write_json(metrics_path + ".curve", curve)
        return result

    curve = _read_curve(metrics_path + ".curve", start)
    window, window_start, window_steps = collections.defaultdict(list), time.perf_counter(), 0
    started, last_checkpoint, miou, throughput, last_losses = time.perf_counter(), None, None, [], None
    for step in range(start + 1, config.steps + 1):
        index = stage1_exit_index(config.schedule, step, len(steps), config.seed) if config.stage == "stage1" else 0
        images, labels = next(data)
        for name, value in steps[index](images, labels).items():
            window[name].append(float(value))
        window_steps += 1
        if step % config.checkpoint_every == 0 or step == config.steps:
            last_checkpoint = save(step)
        # With precise batch norm the last evaluation waits for the statistics it sets.
        last = step == config.steps and not config.precise_bn_batches
        evaluated = val_data is not None and config.eval_batches and (step % eval_every == 0 or last)
        miou = run_eval(step) if evaluated else miou
        if evaluated or step % config.log_every == 0 or step == config.steps:  # every mIoU is reported
            elapsed = time.perf_counter() - window_start
            rate = window_steps * config.batch_size / max(elapsed, 1e-9)
            throughput.append(rate)
            record = Progress(step, config.steps, {k: float(np.mean(v)) for k, v in window.items()},
                              float(optimizer.learning_rate.numpy()), rate,
                              (config.steps - step) * config.batch_size / rate,
                              miou if evaluated else None)
            with writer.as_default(step=step):
                for name, value in record.losses.items():
                    _write_scalar(f"loss/{name}", value)
                _write_scalar("images_per_s", rate)
                for name, value in (record.miou or {}).items():
                    _write_scalar(f"miou/{name}", value)
            if progress:
                progress(record)
            last_losses = record.losses
            window, window_start, window_steps = collections.defaultdict(list), time.perf_counter(), 0
    writer.flush()
    if config.precise_bn_batches:
        precise_batch_norm(net, plans, (next(data) for _ in range(config.precise_bn_batches)))
        last_checkpoint = save(config.steps)  # a rerun recomputes the same statistics from the same batches
        if val_data is not None and config.eval_batches:
            curve[:] = [point for point in curve if point["step"] < config.steps]
            miou = run_eval(config.steps)
    last_checkpoint = last_checkpoint or checkpoints.resolve_checkpoint(output_dir)
    metrics = {"stage": config.stage, "steps": config.steps, "resumed_from_step": start, "exits": net.exit_ids,
               "train_seconds": time.perf_counter() - started, "mixed_precision": mixed,
               # the first window includes tracing; leave it out when there are others
               "images_per_s": float(np.median(throughput[1:] or throughput)) if throughput else None,
               "final_losses": last_losses, "miou": miou, "precise_bn_batches": config.precise_bn_batches,
               "checkpoint": last_checkpoint, "miou_curve": curve}
    if is_chief:
        io_utils.write_json(metrics_path, metrics)
    return TrainResult(net, output_dir, last_checkpoint, metrics)


def _stored_views(net, config, train_data, train_images, run_dir, progress):
    """Stage 2's ViewStore for this run, filled (resuming an interrupted fill)."""
    frozen, _ = stage2_models(net)
    first_images, first_labels = next(iter(_batches_from(train_data, 0)))
    shapes = {name: tuple(value.shape[1:]) for name, value in frozen(first_images[:1], training=False).items()}
    shapes[stored_views_lib.LABELS] = tuple(first_labels.shape[1:])
    identity = {"frozen_weights": stored_views_lib.fingerprint(w.numpy() for w in frozen.weights),
                "crop_size": list(first_images.shape[1:3]),
                "positions": sorted(set(shapes) - {FINAL_EXIT, stored_views_lib.LABELS}),
                "stream": stored_views_lib.fingerprint([first_images.numpy(), first_labels.numpy()])}
    folder = os.path.join(run_dir, stored_views_lib.FOLDER)
    views = stored_views_lib.views_that_fit(config.stored_views, train_images, shapes, config.store_dtype,
                                            config.max_store_bytes, folder)
    spec = stored_views_lib.StoreSpec(views, train_images, config.batch_size, shapes, config.store_dtype, identity)
    if spec.batches < 1:
        raise ValueError(f"stored views: {views} view(s) of {train_images} images make no whole batch of "
                         f"{config.batch_size}")
    store = stored_views_lib.ViewStore.open(run_dir, spec, warn=logging.warning)
    if store.complete:
        return store
    run_frozen = tf.function(lambda images: frozen(images, training=False))

    def frozen_arrays(images):
        return {k: v.numpy() for k, v in run_frozen(images).items()}

    size = spec.rows * stored_views_lib.bytes_per_view(shapes, config.store_dtype)
    clock = {"time": time.perf_counter(), "done": store.filled}

    def report(done, total):
        now = time.perf_counter()
        rate = (done - clock["done"]) * config.batch_size / max(now - clock["time"], 1e-9)
        clock.update(time=now, done=done)
        if progress:
            progress(StoreProgress(done, total, views, size, rate,
                                   (total - done) * config.batch_size / max(rate, 1e-9)))

    store.fill(iter(_batches_from(train_data, store.filled)), frozen_arrays, every=STORE_FLUSH_BATCHES, progress=report)
    return store


def _frozen_outputs(net, data, max_batches):
    """[stage-2 heads model, (its inputs, labels) of each batch of `data`]: the evaluation
    batches of `net` with its frozen pass already run."""
    frozen, exit_heads = stage2_models(net)
    run_frozen = tf.function(lambda images: frozen(images, training=False))
    batches = data.take(max_batches) if max_batches else data
    return [exit_heads] + [({k: v.numpy() for k, v in run_frozen(images).items()}, labels.numpy())
                           for images, labels in batches]


def _read_curve(path, start):
    """The validation evaluations an interrupted run made up to its checkpoint `start`."""
    if not start or not os.path.exists(path):
        return []
    return [point for point in io_utils.read_json(path, "validation curve") if point["step"] <= start]


def precise_batch_norm(net, plans, batches):
    """Sets the moving mean and variance of every batch-norm layer that `plans` train to their
    average over `batches` (Precise BN). Exponential moving averages lag behind weights that move
    fast: after the demo's 250-step stage 2 its exits, with their own moving statistics, labelled
    every pixel background (val mIoU 0.08); with statistics averaged over 128 images, 0.12 to 0.20.

    Args:
      net: the MultiExitNetwork being trained.
      plans: its training plans (stage 2: the frozen pass, then the exit heads in training mode;
        the frozen layers keep their statistics).
      batches: iterable of (images [B, H, W, 3], labels [B, H, W]) training batches.
    """
    trained = {id(v) for plan in plans for v in plan.variables}
    norms = [layer for layer in net.model.layers if isinstance(layer, keras.layers.BatchNormalization)
             and any(id(w) in trained for w in layer.trainable_weights)]
    momenta = [layer.momentum for layer in norms]
    # One training-mode pass per batch in which each of those layers sees the batch once: the plan's
    # own step, or for stage 1 (one plan per exit, all sharing the backbone) the whole network.
    if len(plans) == 1:
        def forward(images, labels):
            plans[0].loss(plans[0].prepare(images), labels)
    else:
        def forward(images, labels):
            net.model(images, training=True)
    try:
        for k, (images, labels) in enumerate(batches):
            for layer in norms:  # running mean: new = old * k / (k + 1) + batch / (k + 1)
                layer.momentum = k / (k + 1)
            forward(images, labels)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum


def _set_bn_momentum(model, momentum):
    """Sets the moving-average momentum of every batch-norm layer of `model` (read when traced)."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def _backbone_positions(network_config):
    return network.build(network_config).backbone.positions


def _batches_from(train_data, first):
    """train()'s `train_data` (a Dataset, or a function of the first batch) from batch `first` on."""
    if isinstance(train_data, tf.data.Dataset):
        return train_data.skip(first)
    return train_data(first)


def _check_batches(dataset, network_config, what):
    """Raises if `dataset`'s elements are not (images [B, H, W, 3], labels [B, H, W]) at the input size."""
    spec = dataset.element_spec
    if not (isinstance(spec, tuple) and len(spec) == 2):
        raise ValueError(f"{what} must yield (images, labels) pairs, got elements {spec}")
    image_shape, label_shape = spec[0].shape, spec[1].shape
    h, w = network_config.input_size
    if image_shape.rank != 4 or label_shape.rank != 3 or list(image_shape[1:]) not in ([h, w, 3], [None, None, 3]):
        raise ValueError(f"{what} yields images {image_shape} and labels {label_shape}; expected batches of "
                         f"images [B, {h}, {w}, 3] and labels [B, {h}, {w}] (the network's input size)")


def _checkpoint_writer(checkpoint, run_dir, keep, strategy, is_chief):
    """save(step) -> checkpoint path. Under multi-worker training every worker must write (the
    save is collective); only the chief writes into the run directory, the others into a scratch
    folder removed right away. A failed write raises OSError (see _failed_save)."""
    if is_chief:
        manager = tf.train.CheckpointManager(checkpoint, run_dir, max_to_keep=keep)

        def save(step):
            try:
                return manager.save(checkpoint_number=step)
            except tf.errors.OpError as e:
                raise _failed_save(e, os.path.join(run_dir, f"{CHECKPOINT_PREFIX}-{step}")) from None
        return save
    scratch = os.path.join(run_dir, f".worker_{strategy.cluster_resolver.task_id}")

    def save_to_scratch(step):
        try:
            return checkpoint.write(os.path.join(scratch, f"{CHECKPOINT_PREFIX}-{step}"))
        except tf.errors.OpError as e:
            raise _failed_save(e, scratch) from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    return save_to_scratch


CHECKPOINT_PREFIX = "ckpt"  # tf.train.CheckpointManager's: RUN/ckpt-<step>.index, .data-*


def _failed_save(error, prefix):
    """The OSError naming `prefix` for TensorFlow's error of a failed checkpoint write, after
    removing the half-written `<prefix>_temp` folder TensorFlow leaves behind."""
    shutil.rmtree(prefix + "_temp", ignore_errors=True)
    # TensorFlow's message ends with the system's reason: "...; No space left on device [Op:SaveV2]".
    reason = error.message.split("; ")[-1].split(" [Op:")[0].strip()
    code = errno.ENOSPC if isinstance(error, tf.errors.ResourceExhaustedError) else errno.EIO
    return OSError(code, f"checkpoint not written: {reason}", prefix)


def _remove_leftovers(run_dir):
    """Removes what a killed or failed run left in `run_dir`: half-written checkpoints
    (`ckpt-<step>_temp/`) and atomic-write temporaries (io_utils.atomic_open's `.*.tmp`)."""
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if name.startswith(CHECKPOINT_PREFIX + "-") and name.endswith("_temp") and os.path.isdir(path):
            shutil.rmtree(path)
        elif io_utils.is_temporary(name):
            os.remove(path)
