"""The end-to-end MESS experiment behind `make demo`: train once, deploy many times, measure.

Steps, each leaving an artifact under the run folder so a rerun skips what is done:

  data        the built-in demo dataset                      data/
  baseline    the original single-exit network               baseline/ (checkpoints)
  stage1      exit-aware backbone training                   stage1/
  stage2      frozen backbone, every candidate exit          stage2/
  calibrate   per-image, per-exit cache for the search       calibration.npz
  profile     host LiteRT latency of every part (int8, fp32) latency_int8.json, latency_float32.json
  search      one configuration per requirement              configs/<name>.json
  export      staged .tflite per configuration + baseline    models/<name>_<precision>.tflite
  evaluate    every model run on the test split              evaluation.json
  report      summary.md, headline.json, plots               report/

`progress` receives one line per event so a CLI can print it; the library itself prints nothing.
"""
import dataclasses
import os
import time

import numpy as np

from mess_tf import (backbones, calibration, checkpoints, cost_model, export, heads, io_utils, metrics, network,
                     policy, report, runtime, search, training)
from mess_tf.data import demo, pipeline, registry
from mess_tf.deployment import DeploymentConfig, ExitChoice
from mess_tf.latency import host
from mess_tf.latency import table as table_lib


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one demo run. Steps are optimiser steps of batch `batch_size`.

    Stage 1 starts from the trained baseline (as MESS starts from a trained segmentation network), so
    the MESS network has seen baseline_steps + stage1_steps + stage2_steps updates and the baseline
    baseline_steps; the report says so. From-scratch MobileNets learn slowly: AdamW at a high rate and
    a short batch-norm horizon are what made the demo learn within minutes on a CPU.
    """

    data: str
    alpha: float
    filters: int
    baseline_steps: int
    stage1_steps: int
    stage2_steps: int
    batch_size: int
    exit_fractions: tuple
    exit_heads: tuple
    timing_runs: int
    quantization_images: int  # representative images for int8 conversion (calibration split)
    learning_rate: float = 5e-3  # AdamW peak rate
    bn_momentum: float = 0.99
    precise_bn_batches: int = 16  # batch-norm statistics averaged over this many batches after each stage


PRESETS = {
    "quick": Preset("quick", 0.35, 32, 60, 30, 30, 8, (0.3, 0.6), ("fcn_w0_b0", "fcn_w32_b1"), 5, 4,
                    precise_bn_batches=4),
    "default": Preset("default", 0.5, 64, 900, 400, 250, 16, (0.15, 0.3, 0.5, 0.75),
                      ("fcn_w0_b0", "fcn_w32_b1", "fcn_w64_b2_rd"), 30, 16),
}
# Requirements the search serves: (name, objective, kwargs). The baseline's cost is filled in at run time.
REQUIREMENTS = (("no_loss", "min_cost", {"max_drop_pp": 0.0}),
                ("drop_1pp", "min_cost", {"max_drop_pp": 1.0}),
                ("baseline_cost", "max_miou", {}))
PRECISIONS = ("int8", "float32")
STEPS = ("data", "baseline", "stage1", "stage2", "calibrate", "profile", "search", "export", "evaluate", "report")
TH_PIX_GRID = np.linspace(0.5, 0.95, 10)
TH_IMG_GRID = np.linspace(0.5, 0.95, 10)


class Experiment:
    """One run folder and the steps that fill it."""

    def __init__(self, out_dir, preset="default", seed=0, progress=None):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
        self.out, self.preset, self.seed = out_dir, PRESETS[preset], seed
        self.progress = progress or (lambda line: None)
        self.data_dir = os.path.join(out_dir, "data")
        self._networks = {}

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
        info = self.dataset().info
        size = demo.PRESETS[self.preset.data].image_size
        return network.NetworkConfig(backbones.BackboneConfig("mobilenet_v2", 16, self.preset.alpha),
                                     info.num_classes, (size, size),
                                     heads.FinalHeadConfig("deeplabv3plus", self.preset.filters, separable=True))

    def step_data(self):
        demo.generate(self.data_dir, preset=self.preset.data, seed=self.seed)

    def train(self, name, stage, steps, init_from=None, **options):
        """Trains one stage with the demo's recipe into <run>/<name>, reporting progress; resumes
        an interrupted run.

        Args:
          name: run folder under the experiment folder (e.g. "stage1", "ablation/joint").
          stage: training.STAGES member. steps: optimiser steps of batch preset.batch_size.
          init_from: optional run folder to start from.
          **options: further TrainConfig fields (exits, positions, heads, distillation).

        Returns:
          training.TrainResult.
        """
        dataset, config = self.dataset(), self.network_config()
        # No flips: a mirrored digit is a different shape. Mild scaling: digits are already of many sizes.
        data = pipeline.train_dataset(dataset.samples("train"), dataset.info, config.input_size,
                                      self.preset.batch_size, seed=self.seed, scale_range=(0.75, 1.25), flip=False)
        train_config = training.TrainConfig(stage=stage, steps=steps, batch_size=self.preset.batch_size,
                                            optimizer="adamw", learning_rate=self.preset.learning_rate,
                                            bn_momentum=self.preset.bn_momentum, warmup_steps=steps // 20, seed=self.seed,
                                            checkpoint_every=max(steps // 4, 1), log_every=max(steps // 10, 1),
                                            eval_batches=0, precise_bn_batches=self.preset.precise_bn_batches,
                                            **options)

        def report_progress(p):
            self.progress(f"  {name} step {p.step}/{p.steps} loss {p.losses['total']:.3f} "
                          f"{p.images_per_s:.0f} img/s ETA {p.eta_s:.0f} s")

        return training.train(config, train_config, data, self.path(name), init_from=init_from,
                              progress=report_progress)

    def exit_positions(self):
        config = self.network_config()
        return training.positions_at_fractions(backbones.Backbone(config.backbone, config.input_size),
                                               self.preset.exit_fractions)

    def step_baseline(self):
        self.train("baseline", "baseline", self.preset.baseline_steps)

    def step_stage1(self):
        self.train("stage1", "stage1", self.preset.stage1_steps, init_from=self.path("baseline"),
                   positions=self.exit_positions())

    def step_stage2(self):
        self.train("stage2", "stage2", self.preset.stage2_steps, init_from=self.path("stage1"),
                   positions=self.exit_positions(), heads=self.preset.exit_heads)

    # -- calibration, latency, search ------------------------------------------------------------

    def _split_arrays(self, split):
        dataset = self.dataset()
        samples = dataset.samples(split)
        images = np.stack([pipeline.load_image(s.image_path) for s in samples]).astype(np.float32)
        labels = np.stack([pipeline.load_label(s.label_path, dataset.info) for s in samples])
        return [s.name for s in samples], images, labels

    def step_calibrate(self):
        net = self.load("stage2")
        names, images, labels = self._split_arrays("calibration")
        batches = ((images[i:i + 16], labels[i:i + 16]) for i in range(0, len(images), 16))
        cache = calibration.calibrate_network(net, checkpoints.resolve_checkpoint(self.path("stage2")), batches,
                                              names, TH_PIX_GRID, policy.PolicyConfig(), "demo", "calibration",
                                              partial_path=self.path("calibration.partial.npz"))
        cache.save(self.path("calibration.npz"))

    def step_profile(self):
        net = self.load("stage2")
        _, images, _ = self._split_arrays("calibration")
        timing = host.HostTimingConfig(num_threads=1, warmup_runs=3, num_runs=self.preset.timing_runs)
        # The heads are timed with the confidence the cache was calibrated with (the search checks).
        policy_config = calibration.CalibrationCache.load(self.path("calibration.npz")).policy
        for precision in PRECISIONS:
            models = export.convert_parts(net, precision, list(images[:self.preset.quantization_images]),
                                          policy_config=policy_config)
            key = table_lib.TableKey(host.host_device(), precision, 1, net.backbone.input_size)
            host.measure_parts({k: table_lib.PartModel(v) for k, v in models.items()},
                               self.path(f"latency_{precision}.json"), key,
                               [p.name for p in net.backbone.positions], timing, policy_config=policy_config)
            self.progress(f"  profiled {len(models)} parts in {precision}")

    def cost_table(self, precision="int8"):
        return table_lib.LatencyTable.load(self.path(f"latency_{precision}.json")).cost_table()

    def step_search(self):
        cache = calibration.CalibrationCache.load(self.path("calibration.npz"))
        costs = self.cost_table()
        final = search.evaluate(cache, costs, DeploymentConfig("dynamic"))
        front = search.search(cache, costs, TH_IMG_GRID, "pareto", mode="dynamic")
        io_utils.write_json(self.path("search", "pareto.json"), {
            "front": [r.to_dict() for r in front.front], "final": front.final.to_dict(),
            "space_size": front.space_size, "evaluated": front.evaluated, "seconds": front.seconds})
        for name, objective, kwargs in REQUIREMENTS:
            if objective == "max_miou":
                kwargs = {"budget": final.expected_cost}
            outcome = search.search(cache, costs, TH_IMG_GRID, objective, mode="dynamic", **kwargs)
            config = outcome.best.deployment_config(cache.network_config, {"requirement": name})
            config.save(self.path("configs", f"{name}.json"))
            self.progress(f"  {name}: predicted mIoU {outcome.best.miou:.4f} (final {final.miou:.4f}), "
                          f"expected {outcome.best.expected_cost:.2f} ms")

    # -- deployment and measurement --------------------------------------------------------------

    def deployments(self):
        """Name -> (training stage, DeploymentConfig) of every model the report compares."""
        out = {"baseline": ("baseline", DeploymentConfig("budgeted"))}
        for name, _, _ in REQUIREMENTS:
            out[name] = ("stage2", DeploymentConfig.load(self.path("configs", f"{name}.json")))
        return out

    def models(self):
        """[(model key `<deployment>_<precision>`, training stage, DeploymentConfig, precision, key of
        the first model that is the same)]: deployments that agree on the training stage and on
        everything but provenance (requirements often pick the same exits and thresholds) are one
        model."""
        first, out = {}, []
        for name, (stage, config) in self.deployments().items():
            for precision in PRECISIONS:
                key = f"{name}_{precision}"
                same = first.setdefault((stage, config.fingerprint(), precision), key)
                out.append((key, stage, config, precision, same))
        return out

    def step_export(self):
        """Exports every distinct model in both precisions; a model equal to an earlier one is
        copied, not converted again."""
        _, images, _ = self._split_arrays("calibration")
        for key, stage, config, precision, same in self.models():
            path = self.path("models", f"{key}.tflite")
            if same != key:
                export.copy_staged_model(self.path("models", f"{same}.tflite"), path, config)
                self.progress(f"  {path}: same model as {same}, copied")
                continue
            export.export_staged_model(path, self.load(stage), config, precision,
                                       list(images[:self.preset.quantization_images]),
                                       class_names=self.dataset().info.class_names)
            self.progress(f"  exported {path}")

    def step_evaluate(self):
        """Runs every distinct exported model on every test image; a copied model (see step_export)
        gets the results of the model it copies. The models take turns image by image (in a
        rotating order), so drift in the host's speed hits them all alike and the latency ratios are
        side by side, not minutes apart."""
        names, images, labels = self._split_arrays("test")
        num_classes = self.dataset().info.num_classes
        measured_as = {key: same for key, *_, same in self.models()}
        keys = [key for key, same in measured_as.items() if same == key]
        models = {k: runtime.StagedModel.load(self.path("models", f"{k}.tflite"), num_threads=1) for k in keys}
        matrices = {k: metrics.ConfusionMatrix(num_classes) for k in keys}
        exits, times = {k: [] for k in keys}, {k: [] for k in keys}
        for i, (image, label) in enumerate(zip(images, labels)):
            for k in keys[i % len(keys):] + keys[:i % len(keys)]:
                result = models[k].run(image)
                matrices[k].update(result.class_map, label)
                exits[k].append(result.exit_id)
                times[k].append(result.total_ms)
        results = {}
        for k, source in measured_as.items():
            ids, counts = np.unique(exits[source], return_counts=True)
            results[k] = {"miou": matrices[source].miou(), "latency_ms": float(np.mean(times[source])),
                          "exit_fractions": {i: float(c) / len(exits[source]) for i, c in zip(ids, counts)},
                          "measured_as": source}
            self.progress(f"  {k}: mIoU {results[k]['miou']:.4f}, {results[k]['latency_ms']:.2f} ms/image"
                          + ("" if source == k else f" (the model of {source})"))
        results["oracle"] = self._oracle(images, labels)
        io_utils.write_json(self.path("evaluation.json"), results)

    def _oracle(self, images, labels):
        """Each test image leaves at the cheapest exit (by int8 latency of the truncated network)
        whose pixel accuracy is at least the final exit's: the bound any exit policy can reach."""
        net = self.load("stage2")
        costs = self.cost_table()
        exit_cost = {e: costs.worst(DeploymentConfig("budgeted", [ExitChoice(*e.split(":", 1))]))
                     for e in net.exit_ids}
        exit_cost["final"] = costs.worst(DeploymentConfig("budgeted"))
        order = sorted(exit_cost, key=exit_cost.get)
        matrix, spent = metrics.ConfusionMatrix(net.config.num_classes), []
        for i in range(len(images)):
            logits = net.model(images[i:i + 1], training=False)
            preds = {k: np.argmax(v[0].numpy(), -1) for k, v in logits.items()}
            valid = labels[i] != 255
            accuracy = {k: float(np.mean(p[valid] == labels[i][valid])) if valid.any() else 1.0
                        for k, p in preds.items()}
            chosen = next(k for k in order if accuracy[k] >= accuracy["final"])
            matrix.update(preds[chosen], labels[i])
            spent.append(exit_cost[chosen])
        return {"miou": matrix.miou(), "latency_ms_int8_composed": float(np.mean(spent)),
                "final_ms_int8_composed": float(exit_cost["final"])}

    # -- report ------------------------------------------------------------------------------------

    def step_report(self):
        evaluation = io_utils.read_json(self.path("evaluation.json"), "evaluation")
        cache = calibration.CalibrationCache.load(self.path("calibration.npz"))
        macs = _macs_table(self)
        rows = []
        base = evaluation["baseline_int8"], evaluation["baseline_float32"]
        for name, (_, config) in self.deployments().items():
            int8, fp32 = evaluation[f"{name}_int8"], evaluation[f"{name}_float32"]
            fractions = [int8["exit_fractions"].get(e, 0.0) for e in config.exit_ids]
            rows.append({"name": name, "miou_test": round(100 * int8["miou"], 2),
                         "macs": int(macs.expected(config, fractions)),
                         "latency_ms_int8": round(int8["latency_ms"], 3),
                         "latency_ms_float": round(fp32["latency_ms"], 3),
                         "ratio_vs_baseline_int8": round(base[0]["latency_ms"] / int8["latency_ms"], 2),
                         "ratio_vs_baseline_float": round(base[1]["latency_ms"] / fp32["latency_ms"], 2)})
        oracle = evaluation["oracle"]
        rows.append({"name": "oracle", "miou_test": round(100 * oracle["miou"], 2), "macs": None,
                     "latency_ms_int8": round(oracle["latency_ms_int8_composed"], 3), "latency_ms_float": None,
                     # both sides composed from the same latency table: the final exit costs what the baseline does
                     "ratio_vs_baseline_int8": round(oracle["final_ms_int8_composed"] / oracle["latency_ms_int8_composed"], 2),
                     "ratio_vs_baseline_float": None})
        io_utils.write_json(self.path("report", "headline.json"), rows)
        pareto = io_utils.read_json(self.path("search", "pareto.json"), "pareto front")
        front = [(r["expected_cost"], 100 * r["miou"]) for r in pareto["front"]]
        markers = [("final exit (calibration)", pareto["final"]["expected_cost"], 100 * pareto["final"]["miou"])]
        report.pareto_plot(self.path("report", "pareto.png"), [], front, markers, unit="ms (int8, host)",
                           title=f"Calibration split: {pareto['space_size']:.3g} configurations searched")
        report.exit_distribution_plot(self.path("report", "exit_distribution.png"), {
            name: evaluation[f"{name}_int8"]["exit_fractions"] for name in self.deployments() if name != "baseline"})
        self._examples()
        table = report.markdown_table(rows, report.HEADLINE_KEYS)
        shared = [f"{k} is the model of {v['measured_as']}" for k, v in evaluation.items()
                  if k != "oracle" and k.endswith("_int8") and v["measured_as"] != k]
        summary = (f"# MESS demo ({self.preset.data} preset)\n\nTest split, host LiteRT, 1 thread. mIoU in %, "
                   f"MACs expected per image, latency mean ms per image. The oracle's latency is composed from "
                   f"the int8 latency table, and so is the final-exit cost its ratio is taken against.\n\n{table}\n\n"
                   + (f"Identical deployments are one model, measured once: {'; '.join(shared)}.\n\n" if shared else "")
                   + f"Calibration images: {cache.num_images}. Exits: {', '.join(cache.exit_ids)}.\n\n"
                   f"Training: baseline {self.preset.baseline_steps} steps; the MESS network starts from it, then "
                   f"stage 1 {self.preset.stage1_steps} and stage 2 {self.preset.stage2_steps} steps "
                   f"(batch {self.preset.batch_size}, from scratch, no pretrained weights).\n")
        with io_utils.atomic_open(self.path("report", "summary.md")) as f:
            f.write(summary)

    def _examples(self, count=4):
        net = self.load("stage2")
        names, images, labels = self._split_arrays("test")
        logits = net.model(images[:count], training=False)
        columns = list(net.exit_ids) + ["final"]
        predictions = [[np.argmax(logits[c][i].numpy(), -1) for c in columns] for i in range(min(count, len(images)))]
        report.examples_plot(self.path("report", "examples.png"), list(images[:count]), list(labels[:count]),
                             predictions, self.dataset().info.palette, [c.split(":")[-1] for c in columns])


def _macs_table(experiment):
    """The MACs CostTable of the stage-2 network's parts."""
    return cost_model.costs_of(experiment.load("stage2")).cost_table()

