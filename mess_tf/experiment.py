"""The end-to-end MESS experiment behind `make demo`: train once, deploy many times, measure.

Steps, each leaving an artifact under the run folder so a rerun skips what is done:

  data                  the built-in demo dataset                          data/
  baseline              the user's trained DeepLab (shipped, or trained)   baseline/ (checkpoints)
  baseline_same_budget  the baseline trained on for MESS's extra steps     baseline_same_budget/
  stage1                exit-aware backbone training                       stage1/
  stage2                frozen backbone, every candidate exit              stage2/
  calibrate             per-image, per-exit caches (int8 as shipped, float) calibration/*.npz
  profile               host LiteRT latency of every part (int8)           latency_int8.json
  search                one configuration per requirement (int8 cache)     configs/<name>.json
  export                staged int8 .tflite per configuration + baselines  models/<name>_int8.tflite
  evaluate              every model run on the test split, side by side    evaluation.json
  report                summary.md, headline.json, plots                   report/

`progress` receives one line per event so a CLI can print it; the library itself prints nothing.
"""
import dataclasses
import os
import time

import numpy as np

from mess_tf import (
    backbones,
    calibration,
    checkpoints,
    export,
    headline,
    heads,
    io_utils,
    metrics,
    network,
    policy,
    report,
    runtime,
    search,
    shipped,
    training,
)
from mess_tf.costs import model as cost_model
from mess_tf.data import demo, pipeline, registry
from mess_tf.deployment import FINAL_EXIT, DeploymentConfig
from mess_tf.latency import host
from mess_tf.latency import table as table_lib


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one demo run. Steps are optimiser steps of batch `batch_size`.

    Stage 1 starts from the trained baseline (as MESS starts from a trained segmentation network), so
    the MESS network has seen baseline_steps + stage1_steps + stage2_steps updates and the baseline
    baseline_steps; the report says so.

    Attributes:
      data: demo data preset (mess_tf.data.demo.PRESETS); its image size is the network's input.
      backbone: BackboneConfig (weights="imagenet" for a pretrained one).
      final_head: FinalHeadConfig.
      crop_size: square training crops (pixels); None = the whole image.
      scale_range: random rescaling of training images before cropping.
      learning_rate: AdamW peak rate; bn_momentum: batch-norm moving-average momentum.
      precise_bn_batches: batch-norm statistics averaged over this many batches after each stage.
      eval_every: baseline steps between validation evaluations (the learning curve); 0 = none.
      shipped_baseline: folder under the repository's `trained/` holding this preset's trained
        baseline (see mess_tf/shipped.py); None = `make demo` trains the baseline itself.
      class_map_stride: policy.PolicyConfig.class_map_stride of every model (1: full resolution).
      max_exits: most early exits the search puts in a configuration.
      stage1_exit_weight: loss weight of the early exit trained with the final one in stage 1.
      stage2_learning_rate: peak rate of stage 2, whose heads start from scratch on frozen
        features (default: learning_rate).
      stored_views: stage 2 trains on this many stored views of every training image
        (mess_tf/stored_views.py; 0: the direct path).
      stage2_eval_every: stage-2 steps between validation evaluations of every exit (the curves).
      stage2_loss_stride: stage 2 computes the exits' losses at 1/this of the crop size.
    """

    data: str
    backbone: backbones.BackboneConfig
    final_head: heads.FinalHeadConfig
    baseline_steps: int
    stage1_steps: int
    stage2_steps: int
    batch_size: int
    exit_fractions: tuple
    exit_heads: tuple
    timing_runs: int
    quantization_images: int  # representative images for int8 conversion (calibration split)
    learning_rate: float = 5e-3
    bn_momentum: float = 0.99
    precise_bn_batches: int = 16
    crop_size: int = None
    scale_range: tuple = (0.75, 1.25)
    eval_every: int = 0
    shipped_baseline: str = None
    class_map_stride: int = 1
    max_exits: int = 2
    stage1_exit_weight: float = 1.0
    stage2_learning_rate: float = None
    stored_views: int = 4
    stage2_eval_every: int = 0
    stage2_loss_stride: int = 1


# From-scratch MobileNets learn slowly: AdamW at a high rate and a short batch-norm horizon are what
# made them learn within minutes on a CPU. The pretrained EfficientNet-Lite0 is fine-tuned gently.
# Its stage-1 exits weigh 0.2: at 1.0 their gradients cost the final exit 1 pp of validation mIoU
# over 180 steps (67.4 vs 68.3%; 69.2% with no exits). Stage 2's heads start from scratch on
# frozen features and need a higher rate: 120 steps at 1e-3 left them near chance (stage-2 loss
# about 2 per exit); at 1e-2 they reach 13-31% validation mIoU in 120 steps, 24-44% in 240. On
# the things network, 2000 steps on 4 stored views of each image reach 29-62%, and the losses at
# 1/4 of the crop end where full-resolution ones do (mean +0.004 pp over the 12 exits, -1.08 to
# +0.73 pp) at 3.2x the throughput (runs/things, 2026-12-04).
PRESETS = {
    "quick": Preset("quick", backbones.BackboneConfig("mobilenet_v2", 16, 0.35),
                    heads.FinalHeadConfig("deeplabv3plus", 32, separable=True), 60, 30, 30, 8, (0.3, 0.6),
                    ("fcn_w0_b0", "fcn_w32_b1"), 5, 4, precise_bn_batches=4, stage2_eval_every=10,
                    stage2_loss_stride=2),
    "scratch": Preset("scratch", backbones.BackboneConfig("mobilenet_v2", 16, 0.5),
                      heads.FinalHeadConfig("deeplabv3plus", 64, separable=True), 900, 400, 250, 16,
                      (0.15, 0.3, 0.5, 0.75), ("fcn_w0_b0", "fcn_w32_b1", "fcn_w64_b2_rd"), 30, 16),
    "default": Preset("default", backbones.BackboneConfig("efficientnet_lite0", 16, weights=backbones.IMAGENET),
                      heads.FinalHeadConfig("deeplabv3plus", 128, separable=True), 8000, 180, 2000, 16,
                      (0.14, 0.17, 0.26, 0.36), ("fcn_w32_b1", "fcn_w64_b2_rd", "aspp_w64_rd"), 30, 16,
                      learning_rate=1e-3, crop_size=192, scale_range=(0.5, 1.5), eval_every=500,
                      shipped_baseline="scenes_efficientnet_lite0", stage1_exit_weight=0.2,
                      stage2_learning_rate=1e-2, stage2_eval_every=200, stage2_loss_stride=4),
    "things": Preset("things", backbones.BackboneConfig("efficientnet_lite0", 16, weights=backbones.IMAGENET),
                     heads.FinalHeadConfig("deeplabv3plus", 128, separable=True), 1800, 180, 2000, 16,
                     (0.14, 0.17, 0.26, 0.36), ("fcn_w32_b1", "fcn_w64_b2_rd", "aspp_w64_rd"), 30, 16,
                     learning_rate=1e-3, crop_size=192, scale_range=(0.5, 1.5), eval_every=200,
                     shipped_baseline="things_efficientnet_lite0", stage1_exit_weight=0.2,
                     stage2_learning_rate=1e-2, stage2_eval_every=200, stage2_loss_stride=4),
}
# Requirements the search serves: (name, objective, mIoU drop allowed below the MESS network's own
# final exit, in pp); "baseline_cost" maximises mIoU at the same-budget baseline's latency instead.
NO_LOSS_PP = headline.NO_LOSS_PP  # the no-loss requirement the search serves is the goal the headline checks
REQUIREMENTS = (("no_loss", "min_cost", NO_LOSS_PP),
                ("drop_1pp", "min_cost", 1.0),
                ("baseline_cost", "max_miou", None))
DEPLOYED = "int8"  # the precision that ships: the search reads its cache and its latency table
BASELINES = ("baseline", "baseline_same_budget")
MESS_FINAL = "mess_final"  # the MESS network's final exit alone: what "no loss" is measured against
EVALUATION_COUNTS = "evaluation_counts.npz"  # per test image and model: TP, FP, FN per class (the intervals)
# (training stage, precision, split) of each calibration cache: the MESS network as it ships and in
# float (to show what calibrating the float network would predict), on the test split too (the
# oracle and per-image predictions), and the same-budget baseline (the bar).
CACHES = (("stage2", DEPLOYED, "calibration"), ("stage2", "float32", "calibration"), ("stage2", DEPLOYED, "test"),
          ("baseline_same_budget", DEPLOYED, "calibration"), ("baseline", DEPLOYED, "calibration"))
SAME_BUDGET_SUFFIX = "_same_budget"
SHIPPED_CHECK_IMAGES = 32  # validation images tests score a shipped network on
STEPS = ("data", "baseline", "stage1", "stage2", "baseline_same_budget", "calibrate", "profile", "search", "export",
         "evaluate", "report")
TH_PIX_GRID = np.linspace(0.5, 0.95, 10)
TH_IMG_GRID = np.linspace(0.5, 0.95, 10)


def default_run_dir(preset):
    """Where `make demo` and the benches keep a preset's run: runs/demo for the default preset,
    runs/<preset> for the others (each preset has its own data and networks)."""
    return "runs/demo" if preset == "default" else f"runs/{preset}"


class Experiment:
    """One run folder and the steps that fill it."""

    def __init__(self, out_dir, preset="default", seed=0, progress=None):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
        self.out, self.preset, self.seed = out_dir, PRESETS[preset], seed
        self.progress = progress or (lambda line: None)
        self.data_dir = os.path.join(out_dir, "data")
        self._networks, self._parts = {}, {}

    def load(self, stage):
        """The trained MultiExitNetwork of <run>/<stage>, loaded once per Experiment."""
        if stage not in self._networks:
            self._networks[stage] = checkpoints.load_network(self.path(stage))[0]
        return self._networks[stage]

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    # -- orchestration ---------------------------------------------------------------------------

    def run(self, until="report"):
        """Runs every step not done yet, up to and including `until`; returns the headline rows
        (None when stopping before the report)."""
        if until not in STEPS:
            raise ValueError(f"unknown step {until!r}; expected one of {', '.join(STEPS)}")
        for name in STEPS[:STEPS.index(until) + 1]:
            marker = self.path("steps", name + ".done")
            if os.path.exists(marker):
                self.progress(f"[{name}] done earlier, skipped")
                continue
            start = time.time()
            self.progress(f"[{name}] ...")
            getattr(self, "step_" + name)()
            io_utils.write_json(marker, {"seconds": time.time() - start})
            self.progress(f"[{name}] finished in {time.time() - start:.0f} s")
        return io_utils.read_json(self.path("report", "headline.json"), "headline") if until == "report" else None

    # -- data and training -----------------------------------------------------------------------

    def dataset(self):
        return registry.get_dataset("demo", self.data_dir)

    def network_config(self):
        size = demo.PRESETS[self.preset.data].image_size
        return network.NetworkConfig(self.preset.backbone, demo.info(self.preset.data).num_classes, (size, size),
                                     self.preset.final_head)

    def step_data(self):
        demo.generate(self.data_dir, preset=self.preset.data, seed=self.seed)

    def train(self, name, stage, steps, init_from=None, eval_every=0, learning_rate=None, observe=None, **options):
        """Trains one stage with the demo's recipe into <run>/<name>, reporting progress; resumes
        an interrupted run.

        Args:
          name: run folder under the experiment folder (e.g. "stage1", "ablation/joint").
          stage: training.STAGES member. steps: optimiser steps of batch preset.batch_size.
          init_from: optional run folder to start from.
          eval_every: steps between validation evaluations (metrics.json's miou_curve); 0 = none.
          learning_rate: peak AdamW rate (default: the preset's).
          observe: optional callable also given every training.Progress and StoreProgress record.
          **options: further TrainConfig fields (exits, positions, heads, distillation).

        Returns:
          training.TrainResult.
        """
        dataset, config, p = self.dataset(), self.network_config(), self.preset
        crop = self.crop_size()
        data = self.train_batches  # a function of the first batch: a resumed run reads no skipped batch
        val, eval_batches = None, 0
        if eval_every:
            samples = dataset.samples("val")
            val = pipeline.eval_dataset(samples, dataset.info, config.input_size, p.batch_size)
            eval_batches = -(-len(samples) // p.batch_size)
        train_config = training.TrainConfig(stage=stage, steps=steps, batch_size=p.batch_size, optimizer="adamw",
                                            learning_rate=learning_rate or p.learning_rate, bn_momentum=p.bn_momentum,
                                            warmup_steps=steps // 20, seed=self.seed,
                                            checkpoint_every=max(min(steps // 4, 250), 1),
                                            log_every=max(min(steps // 10, 50), 1), eval_every=eval_every,
                                            eval_batches=eval_batches, precise_bn_batches=p.precise_bn_batches,
                                            crop_size=None if crop == config.input_size else crop, **options)

        def report_progress(record):
            if observe:
                observe(record)
            if isinstance(record, training.StoreProgress):
                self.progress(f"  {name} frozen pass {record.batches_done}/{record.batches} batches ({record.views} "
                              f"views per image, {record.bytes / 1e9:.2f} GB) {record.images_per_s:.0f} img/s "
                              f"ETA {record.eta_s:.0f} s")
                return
            exits = sorted(100 * v for k, v in (record.miou or {}).items() if k != FINAL_EXIT)
            miou = (f" val mIoU {100 * record.miou[FINAL_EXIT]:.2f}" if record.miou else "") + (
                f" (exits {exits[0]:.1f}-{exits[-1]:.1f})" if exits else "")
            self.progress(f"  {name} step {record.step}/{record.steps} loss {record.losses['total']:.3f}{miou} "
                          f"{record.images_per_s:.0f} img/s ETA {record.eta_s:.0f} s")

        return training.train(config, train_config, data, self.path(name), val_data=val, init_from=init_from,
                              class_names=dataset.info.class_names, train_images=len(dataset.samples("train")),
                              progress=report_progress)

    def crop_size(self):
        """(H, W) of the training crops."""
        return (self.preset.crop_size,) * 2 if self.preset.crop_size else self.network_config().input_size

    def train_batches(self, first_batch=0):
        """The demo's endless, augmented training batches (tf.data) at the crop size, from batch
        `first_batch` on."""
        dataset = self.dataset()
        # No flips: a mirrored digit is a different shape.
        return pipeline.train_dataset(dataset.samples("train"), dataset.info, self.crop_size(), self.preset.batch_size,
                                      seed=self.seed, scale_range=self.preset.scale_range, flip=False,
                                      first_batch=first_batch)

    def exit_positions(self):
        config = self.network_config()
        return training.positions_at_fractions(backbones.Backbone(config.backbone, config.input_size),
                                               self.preset.exit_fractions)

    def same_budget_steps(self):
        """The steps the same-budget baseline trains on from the baseline: as many as the MESS
        network's stage 1 and stage 2 add, so both have seen the same number of optimiser steps."""
        return self.preset.stage1_steps + self.preset.stage2_steps

    def step_baseline(self):
        if self.preset.shipped_baseline:
            self._import_shipped(self.preset.shipped_baseline, "baseline", self.preset.baseline_steps)
        else:
            self.train("baseline", "baseline", self.preset.baseline_steps, eval_every=self.preset.eval_every)

    def step_baseline_same_budget(self):
        if self.preset.shipped_baseline:
            self._import_shipped(self.preset.shipped_baseline + SAME_BUDGET_SUFFIX, "baseline_same_budget",
                                 self.same_budget_steps())
        else:
            self.train("baseline_same_budget", "baseline", self.same_budget_steps(), init_from=self.path("baseline"))

    def _shipped_mismatch(self, name, steps):
        """Why trained/<name> is not this preset's network trained for `steps` ("" if it is)."""
        path = shipped.folder(name)
        if not os.path.isfile(os.path.join(path, shipped.RECORD)):
            return f"{path} does not exist"
        record = shipped.read_record(path)
        stored, expected = (checkpoints.network_config({"network": n}).to_dict()  # weight files aside
                            for n in (record["network"], self.network_config().to_dict()))
        diffs = checkpoints.config_differences(stored, expected)
        if record["train"]["steps"] != steps:
            diffs.append(f"steps: shipped {record['train']['steps']}, preset {steps}")
        if record.get("data") != self.data_stamp():
            diffs.append(f"data: shipped {record.get('data')}, preset {self.data_stamp()}")
        return "; ".join(diffs)

    def _import_shipped(self, name, run, steps):
        """trained/<name> as the run folder <run>, after checking it is this preset's network."""
        path = shipped.folder(name)
        mismatch = self._shipped_mismatch(name, steps)
        if mismatch:
            raise ValueError(f"{path} is not this preset's trained network ({mismatch}); "
                             f"retrain it with: python -m tools.train_demo_baseline --preset={self.preset.data}")
        record = shipped.read_record(path)
        shipped.import_run(path, self.path(run))
        self.progress(f"  {run}: the shipped network {path} (val mIoU {100 * record['val_miou']:.2f}, "
                      f"test mIoU {100 * record['test_miou']:.2f}, {record['train']['steps']} steps)")

    def data_stamp(self):
        """What identifies the demo data a network was trained and validated on: its kind,
        generator version, seed, image size and the sizes of the train and val splits."""
        data = demo.PRESETS[self.preset.data]
        return {"kind": data.kind, "version": demo.KINDS[data.kind].VERSION, "seed": self.seed,
                "image_size": data.image_size, "train": data.train, "val": data.val}

    def train_shipped(self):
        """Trains this preset's baseline and same-budget baseline (what tools.train_demo_baseline
        runs, hours on a CPU) and writes them to trained/, scored as stored. Resumable. A shipped
        baseline that is already this preset's is kept as it is, and only the same-budget baseline
        is trained from it (after a change of the stage-2 steps, say).

        Returns:
          {name: record} of the networks written.
        """
        p = self.preset
        if not p.shipped_baseline:
            raise ValueError(f"preset {p.data!r} trains its baseline in `make demo`; nothing to ship")
        self.run(until="data")
        runs = {}
        if self._shipped_mismatch(p.shipped_baseline, p.baseline_steps):
            runs[p.shipped_baseline] = self.train("baseline", "baseline", p.baseline_steps, eval_every=p.eval_every)
        elif not os.path.isdir(self.path("baseline")):
            self._import_shipped(p.shipped_baseline, "baseline", p.baseline_steps)
        runs[p.shipped_baseline + SAME_BUDGET_SUFFIX] = self.train(
            "baseline_same_budget", "baseline", self.same_budget_steps(), init_from=self.path("baseline"))
        return {name: self.ship(name, result.run_dir) for name, result in runs.items()}

    def ship(self, name, run):
        """Writes the trained network of run folder <run> to trained/<name> (weights rounded as
        stored, scored as stored, with its training record). Returns the record."""
        net, run_config = checkpoints.load_network(run)
        shipped.round_weights(net.model)
        record = {"command": f"python -m tools.train_demo_baseline --preset={self.preset.data}",
                  "network": run_config["network"], "train": run_config["train"], "exits": [],
                  "init_from": None if name == self.preset.shipped_baseline else self.preset.shipped_baseline,
                  "data": self.data_stamp(), "metrics": io_utils.read_json(os.path.join(run, training.METRICS)),
                  "val_miou": self.split_miou(net, "val"), "test_miou": self.split_miou(net, "test"),
                  "val_subset": {"images": SHIPPED_CHECK_IMAGES,
                                 "miou": self.split_miou(net, "val", SHIPPED_CHECK_IMAGES)}}
        shipped.save(shipped.folder(name), net.model, record)
        self.progress(f"  wrote {shipped.folder(name)}: val mIoU {100 * record['val_miou']:.2f}, "
                      f"test mIoU {100 * record['test_miou']:.2f}")
        return record

    def split_miou(self, net, split, count=None):
        """Final-exit mIoU (fraction) of `net` on the first `count` images (default all) of a split."""
        dataset = self.dataset()
        samples = dataset.samples(split)[:count]
        data = pipeline.eval_dataset(samples, dataset.info, net.config.input_size, self.preset.batch_size)
        return training.evaluate(net.single_exit_model(), data, dataset.info.num_classes)["final"]

    def step_stage1(self):
        self.train("stage1", "stage1", self.preset.stage1_steps, init_from=self.path("baseline"),
                   positions=self.exit_positions(), exit_weight=self.preset.stage1_exit_weight)

    def step_stage2(self):
        self.train("stage2", "stage2", self.preset.stage2_steps, init_from=self.path("stage1"),
                   eval_every=self.preset.stage2_eval_every, learning_rate=self.preset.stage2_learning_rate,
                   positions=self.exit_positions(), heads=self.preset.exit_heads, stored_views=self.preset.stored_views,
                   loss_stride=self.preset.stage2_loss_stride)

    # -- calibration, latency, search ------------------------------------------------------------

    def split_arrays(self, split):
        """(names, images float32 [N, H, W, 3] RGB 0..255, labels uint8 [N, H, W]) of a split."""
        dataset = self.dataset()
        samples = dataset.samples(split)
        images = np.stack([pipeline.load_image(s.image_path) for s in samples]).astype(np.float32)
        labels = np.stack([pipeline.load_label(s.label_path, dataset.info) for s in samples])
        return [s.name for s in samples], images, labels

    def policy(self):
        """The exit policy of every cache, table and model of the run."""
        return policy.PolicyConfig(class_map_stride=self.preset.class_map_stride)

    def cache_path(self, stage, precision=DEPLOYED, split="calibration"):
        return self.path("calibration", f"{stage}_{split}_{precision}.npz")

    def cache(self, stage="stage2", precision=DEPLOYED, split="calibration"):
        return calibration.CalibrationCache.load(self.cache_path(stage, precision, split))

    def step_calibrate(self):
        """The caches the search and the report read (CACHES); each is kept once written, so an
        interrupted step redoes only the caches not finished."""
        for stage, precision, split in CACHES:
            path = self.cache_path(stage, precision, split)
            if os.path.exists(path):
                continue
            start = time.time()
            self._calibrate(stage, precision, split).save(path)
            self.progress(f"  {stage} on the {split} split in {precision}: {time.time() - start:.0f} s")

    def _calibrate(self, stage, precision, split):
        net, policy_config = self.load(stage), self.policy()
        names, images, labels = self.split_arrays(split)
        batches = ((images[i:i + 8], labels[i:i + 8]) for i in range(0, len(images), 8))
        checkpoint = checkpoints.resolve_checkpoint(self.path(stage))
        partial = self.cache_path(stage, precision, split) + ".partial.npz"
        if precision == "float32":
            return calibration.calibrate_network(net, checkpoint, batches, names, TH_PIX_GRID, policy_config, "demo",
                                                 split, partial_path=partial)
        return calibration.calibrate_parts(net, self._calibration_parts(stage, precision), checkpoint, batches, names,
                                           TH_PIX_GRID, policy_config, export.segment_positions(net, net.exit_ids),
                                           "demo", split, partial_path=partial, num_threads=1)

    def _calibration_parts(self, stage, precision):
        """The converted parts of a network whose heads give every pixel threshold's confidence."""
        key = (stage, precision)
        if key not in self._parts:
            net = self.load(stage)
            _, images, _ = self.split_arrays("calibration")
            self._parts[key] = export.convert_parts(net, precision, list(images[:self.preset.quantization_images]),
                                                    policy_config=self.policy(),
                                                    positions=export.segment_positions(net, net.exit_ids),
                                                    th_pix_grid=TH_PIX_GRID)
        return self._parts[key]

    def step_profile(self):
        """The deployed precision's latency table of the MESS network's parts on this host. The
        segments, class maps and final head are the calibration's parts; the heads are converted
        again with the one confidence a deployed model computes."""
        net = self.load("stage2")
        _, images, _ = self.split_arrays("calibration")
        timing = host.HostTimingConfig(num_threads=1, warmup_runs=3, num_runs=self.preset.timing_runs)
        positions = export.segment_positions(net, net.exit_ids)
        heads = [table_lib.part_key(table_lib.HEAD, e) for e in net.exit_ids]
        models = {**self._calibration_parts("stage2", DEPLOYED),
                  **export.convert_parts(net, DEPLOYED, list(images[:self.preset.quantization_images]),
                                         policy_config=self.policy(), positions=positions, keys=heads)}
        key = table_lib.TableKey(host.host_device(), DEPLOYED, 1, net.backbone.input_size)
        host.measure_parts({k: table_lib.PartModel(v) for k, v in models.items()},
                           self.path(f"latency_{DEPLOYED}.json"),
                           key, [p.name for p in positions], timing, policy_config=self.policy(),
                           network_identity=cost_model.network_identity(net))
        self.progress(f"  profiled {len(models)} parts in {DEPLOYED}")

    def cost_table(self, precision=DEPLOYED):
        return table_lib.LatencyTable.load(self.path(f"latency_{precision}.json")).cost_table()

    def bar(self):
        """(mIoU, expected ms) on the calibration split of the network MESS must match: the
        baseline trained for as many steps as the MESS network, in the deployed precision."""
        costs = self.cost_table()
        baseline = search.evaluate(self.cache("baseline_same_budget"), costs, DeploymentConfig("dynamic"))
        return baseline.miou, baseline.expected_cost

    def requirement(self, name):
        """(search objective, its keyword arguments) of a requirement of REQUIREMENTS: a bound on
        the drop below the MESS network's own final exit, or the bar's latency as the budget."""
        objective, drop_pp = {n: (o, d) for n, o, d in REQUIREMENTS}[name]
        if objective == "max_miou":
            return objective, {"budget": self.bar()[1]}
        return objective, {"max_drop_pp": drop_pp}

    def step_search(self):
        """One configuration per requirement, searched on the cache of the precision that ships."""
        cache, costs = self.cache(), self.cost_table()
        bar_miou, bar_cost = self.bar()
        front = search.search(cache, costs, TH_IMG_GRID, "pareto", mode="dynamic", max_exits=self.preset.max_exits)
        io_utils.write_json(self.path("search", "pareto.json"), {
            "front": [r.to_dict() for r in front.front], "final": front.final.to_dict(), "bar_miou": bar_miou,
            "space_size": front.space_size, "evaluated": front.evaluated, "seconds": front.seconds})
        for name, _, _ in REQUIREMENTS:
            objective, kwargs = self.requirement(name)
            outcome = search.search(cache, costs, TH_IMG_GRID, objective, mode="dynamic",
                                    max_exits=self.preset.max_exits, **kwargs)
            config = outcome.best.deployment_config(cache.network_config, {"requirement": name})
            config.save(self.path("configs", f"{name}.json"))
            self.progress(f"  {name}: predicted mIoU {100 * outcome.best.miou:.2f} (its final exit "
                          f"{100 * front.final.miou:.2f}, the bar {100 * bar_miou:.2f}), expected "
                          f"{outcome.best.expected_cost:.2f} ms (the bar {bar_cost:.2f} ms)")

    # -- deployment and measurement --------------------------------------------------------------

    def deployments(self):
        """Name -> (training stage, DeploymentConfig) of every model the report compares."""
        out = {name: (name, DeploymentConfig("budgeted")) for name in BASELINES}
        out[MESS_FINAL] = ("stage2", DeploymentConfig("budgeted"))
        for name, _, _ in REQUIREMENTS:
            out[name] = ("stage2", DeploymentConfig.load(self.path("configs", f"{name}.json")))
        return out

    def models(self):
        """[(model key, training stage, DeploymentConfig, key of the first model that is the same)]:
        deployments that agree on the training stage and on everything but provenance
        (requirements often pick the same exits and thresholds) are one model."""
        first, out = {}, []
        for name, (stage, config) in self.deployments().items():
            same = first.setdefault((stage, config.fingerprint()), name)
            out.append((name, stage, config, same))
        return out

    def model_path(self, name):
        return self.path("models", f"{name}_{DEPLOYED}.tflite")

    def step_export(self):
        """Exports every distinct model; a model equal to an earlier one is copied, not converted again."""
        _, images, _ = self.split_arrays("calibration")
        for key, stage, config, same in self.models():
            path = self.model_path(key)
            if same != key:
                export.copy_staged_model(self.model_path(same), path, config)
                self.progress(f"  {path}: same model as {same}, copied")
                continue
            export.export_staged_model(path, self.load(stage), config, DEPLOYED,
                                       list(images[:self.preset.quantization_images]), policy_config=self.policy(),
                                       class_names=self.dataset().info.class_names)
            self.progress(f"  exported {path}")

    def step_evaluate(self):
        """Runs every distinct exported model on every test image. The models take turns image by
        image (in a rotating order), so drift in the host's speed hits them all alike and the
        latency ratios are side by side, not minutes apart."""
        names, images, labels = self.split_arrays("test")
        num_classes = self.dataset().info.num_classes
        measured_as = {key: same for key, *_, same in self.models()}
        keys = [key for key, same in measured_as.items() if same == key]
        models = {k: runtime.StagedModel.load(self.model_path(k), num_threads=1) for k in keys}
        counts = {k: np.zeros((3, len(images), num_classes), np.int64) for k in keys}  # [TP/FP/FN, N, C]
        exits, times = {k: [] for k in keys}, {k: [] for k in keys}
        for i, k, result in runtime.in_turns(models, images):
            counts[k][:, i] = metrics.ConfusionMatrix(num_classes).update(result.class_map, labels[i]).counts()
            exits[k].append(result.exit_id)
            times[k].append(result.total_ms)
        io_utils.save_npz(self.path(EVALUATION_COUNTS), **{k: counts[v] for k, v in measured_as.items()})
        results = {}
        for k, source in measured_as.items():
            ids, exit_counts = np.unique(exits[source], return_counts=True)
            results[k] = {"miou": metrics.miou_from_counts(*counts[source].sum(1)),
                          "latency_ms": float(np.mean(times[source])),
                          "latency_ms_median": float(np.median(times[source])),
                          "exit_fractions": {i: float(c) / len(exits[source]) for i, c in zip(ids, exit_counts)},
                          "exits": exits[source], "measured_as": source}
            self.progress(f"  {k}: test mIoU {100 * results[k]['miou']:.2f}, {results[k]['latency_ms']:.2f} ms/image"
                          + ("" if source == k else f" (the model of {source})"))
        io_utils.write_json(self.path("evaluation.json"), results)

    # -- report ------------------------------------------------------------------------------------

    def steps_of(self, stage):
        """Optimiser steps the network of a training stage has seen, from ImageNet (or scratch)."""
        p = self.preset
        return p.baseline_steps + (0 if stage == "baseline" else self.same_budget_steps())

    def baseline_curve(self):
        """[(step, validation mIoU of the final exit in %)] of the baseline's training; [] if not recorded."""
        metrics = io_utils.read_json(self.path("baseline", training.METRICS), "training metrics")
        return [(c["step"], 100 * c["miou"]["final"]) for c in metrics.get("miou_curve", [])]

    def stage2_curves(self):
        """{exit id: [(step, validation mIoU in %)]} of stage 2's training; {} if not recorded."""
        metrics = io_utils.read_json(self.path("stage2", training.METRICS), "training metrics")
        curves = {}
        for point in metrics.get("miou_curve", []):
            for eid, miou in point["miou"].items():
                if eid != FINAL_EXIT:
                    curves.setdefault(eid, []).append((point["step"], 100 * miou))
        return curves

    def data_statistics(self):
        """How the demo data's labelled pixels fall into stuff and things, and its difficulty mix
        (mess_tf.data.demo.class_shares and summarize over every split)."""
        records = demo.load_records(self.data_dir)
        kind = demo.kind_module(self.preset.data)
        return {"kind": demo.PRESETS[self.preset.data].kind, "images": len(records),
                **demo.class_shares(records, kind.CLASS_NAMES, kind.THING_CLASSES), **demo.summarize(records)}

    def step_report(self):
        evaluation = io_utils.read_json(self.path("evaluation.json"), "evaluation")
        counts = io_utils.read_npz(self.path(EVALUATION_COUNTS), "evaluation counts")
        costs, test_cache = self.cost_table(), self.cache(split="test")
        rows = headline.rows(self, evaluation, counts)
        oracle = headline.oracle(test_cache, costs)
        curves = self.stage2_curves()
        goals = headline.goals(rows, oracle, self.baseline_curve(), curves)
        ceilings = headline.ceilings(test_cache, costs)
        calibration = self.cache()
        sizing = headline.calibration_sizing(np.stack([a[:, -1] for a in (calibration.tp, calibration.fp,
                                                                             calibration.fn)]), counts[MESS_FINAL])
        data = self.data_statistics()
        io_utils.write_json(self.path("report", "headline.json"),
                            {"rows": rows, "goals": goals, "ceilings": ceilings, "oracle": oracle,
                             "calibration_sizing": sizing, "stage2_curves": curves, "data": data})
        self._plots(evaluation, costs, curves)
        shared = [f"{k} is the model of {v['measured_as']}" for k, v in evaluation.items() if v["measured_as"] != k]
        p = self.preset
        with io_utils.atomic_open(self.path("report", "summary.md")) as f:
            f.write(f"# MESS demo ({p.data} preset: {p.backbone.name}"
                    f"{' ImageNet-pretrained' if p.backbone.weights else ' from scratch'}, "
                    f"{p.final_head.kind}, {self.network_config().input_size[0]}x{self.network_config().input_size[1]})"
                    f"\n\n{headline.summary_markdown(rows, goals, ceilings, oracle, DEPLOYED, sizing)}\n\n"
                    + (f"Identical deployments are one model, measured once: {'; '.join(shared)}.\n\n"
                       if shared else "")
                    + f"Training: baseline {p.baseline_steps} steps; the same-budget baseline and the MESS network "
                    f"start from it, the MESS network with stage 1 ({p.stage1_steps} steps) and stage 2 "
                    f"({p.stage2_steps} steps on {p.stored_views} stored views of each training image), batch "
                    f"{p.batch_size}{f', {p.crop_size}x{p.crop_size} crops' if p.crop_size else ''}.\n\n"
                    f"{headline.data_markdown(data)}\n")

    def _plots(self, evaluation, costs, stage2_curves):
        pareto = io_utils.read_json(self.path("search", "pareto.json"), "pareto front")
        front = [(r["expected_cost"], 100 * r["miou"]) for r in pareto["front"]]
        markers = [("MESS final exit (calibration)", pareto["final"]["expected_cost"], 100 * pareto["final"]["miou"]),
                   ("same-budget baseline (calibration)", self.bar()[1], 100 * pareto["bar_miou"])]
        report.pareto_plot(self.path("report", "pareto.png"), [], front, markers, unit=f"ms ({DEPLOYED}, host)",
                           title=f"Calibration split: {pareto['space_size']:.3g} configurations searched")
        report.exit_distribution_plot(self.path("report", "exit_distribution.png"), {
            name: evaluation[name]["exit_fractions"] for name, (stage, _) in self.deployments().items()
            if stage == "stage2"})
        total = costs.backbone_to(costs.positions[-1]) + costs.final_head
        report.latency_breakdown_plot(self.path("report", "latency_breakdown.png"), headline.latency_parts(costs),
                                      total, title=f"Where the time goes ({DEPLOYED}, host, 1 thread)")
        curve = self.baseline_curve()
        if curve:
            report.learning_curve_plot(self.path("report", "learning_curve.png"), {"baseline (validation)": curve})
        if stage2_curves:
            report.learning_curve_plot(self.path("report", "stage2_curves.png"), stage2_curves,
                                       title="Stage 2: validation mIoU of every exit")
        self._examples()

    def _examples(self, count=4):
        net = self.load("stage2")
        _, images, labels = self.split_arrays("test")
        logits = net.model(images[:count], training=False)
        columns = list(net.exit_ids) + [FINAL_EXIT]
        predictions = [[np.argmax(logits[c][i].numpy(), -1) for c in columns] for i in range(min(count, len(images)))]
        titles = [c if c == FINAL_EXIT else c.replace(":", "\n") for c in columns]
        report.examples_plot(self.path("report", "examples.png"), list(images[:count]), list(labels[:count]),
                             predictions, self.dataset().info.palette, titles)

