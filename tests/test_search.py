"""Deployment search: cache arithmetic equals running the policy, fast search equals brute force."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from mess_tf import backbones, calibration, heads, network, policy, search
from mess_tf.costs import model as cost_model
from mess_tf.costs.table import CostTable
from mess_tf.deployment import FINAL_EXIT, DeploymentConfig, ExitChoice

CLASSES, IMAGES, SIZE, STRIDE = 4, 12, (8, 8), 8
POSITIONS = ("b1", "b2", "b3", "out")
HEADS = ("fcn_w0_b0", "fcn_w32_b0")
EXITS = tuple(f"{p}:{h}" for p in POSITIONS[:3] for h in HEADS)
TH_PIX = (0.4, 0.6, 0.8)
TH_IMG = (0.3, 0.6, 0.9)
COSTS = CostTable(POSITIONS, {"b1": 2.0, "b2": 3.0, "b3": 4.0, "out": 5.0},
                  {e: (0.5 if e.endswith("w0_b0") else 1.0) * (1 + POSITIONS.index(e.split(":")[0]) / 4)
                   for e in EXITS}, final_head=3.0, unit="ms",
                  class_map={"b1": 0.7, "b2": 0.6, "b3": 0.5})  # paid only by the images leaving there


def _synthetic(seed=0):
    """Labels with 255 holes, and logits per exit that get less noisy with depth."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, (IMAGES, *SIZE))
    labels[:, :2, :2] = 255
    difficulty = rng.uniform(0.3, 2.5, IMAGES)[:, None, None, None]
    logits = {}
    for depth, exit_name in enumerate((*EXITS, FINAL_EXIT)):
        noise = difficulty * (2.0 - 0.25 * (depth // 2)) * rng.normal(size=(IMAGES, *SIZE, CLASSES))
        logits[exit_name] = (2.5 * np.eye(CLASSES)[np.minimum(labels, CLASSES - 1)] + noise).astype(np.float32)
    return labels, logits


@pytest.fixture(scope="module")
def synthetic():
    labels, logits = _synthetic()
    images = np.arange(IMAGES, dtype=np.float32)[:, None, None, None] * np.ones((1, *SIZE, 3), np.float32)

    def predict(batch):
        index = batch[:, 0, 0, 0].astype(int)
        return calibration.from_logits({k: v[index] for k, v in logits.items()}, EXITS, [STRIDE] * len(EXITS),
                                       TH_PIX, policy.PolicyConfig())

    batches = [(images[i:i + 5], labels[i:i + 5]) for i in range(0, IMAGES, 5)]
    cache = calibration.build_cache(predict, batches, EXITS, [STRIDE] * len(EXITS), CLASSES, TH_PIX,
                                    policy.PolicyConfig(), {"name": "toy"}, "f00d", [f"im{i}" for i in range(IMAGES)])
    return cache, labels, logits


def _direct_miou(config, labels, logits):
    """Runs the policy image by image and scores the maps it keeps with one confusion matrix."""
    confusion = np.zeros((CLASSES, CLASSES), np.int64)
    for n in range(IMAGES):
        chosen = FINAL_EXIT
        for e in config.exits:
            if config.mode == "budgeted" or policy.should_exit(
                    policy.image_confidence(logits[e.exit_id][n], e.th_pix, STRIDE), e.th_img):
                chosen = e.exit_id
                break
        valid = labels[n] != 255
        pred = logits[chosen][n].argmax(-1)
        confusion += np.bincount(labels[n][valid] * CLASSES + pred[valid], minlength=CLASSES ** 2).reshape(CLASSES, -1)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    return np.mean(np.diag(confusion)[union > 0] / union[union > 0])


def _random_config(rng):
    if rng.random() < 0.2:
        return DeploymentConfig("budgeted", [ExitChoice(*EXITS[rng.integers(len(EXITS))].split(":"), 0.0, 0.0)])
    positions = sorted(rng.choice(3, size=rng.integers(0, 4), replace=False))
    return DeploymentConfig("dynamic", [ExitChoice(POSITIONS[p], HEADS[rng.integers(2)], float(rng.choice(TH_PIX)),
                                                   float(rng.choice(TH_IMG))) for p in positions])


def test_cached_miou_equals_running_the_policy(synthetic):
    cache, labels, logits = synthetic
    rng = np.random.default_rng(1)
    for _ in range(25):
        config = _random_config(rng)
        predicted = search.evaluate(cache, COSTS, config)
        assert predicted.miou == pytest.approx(_direct_miou(config, labels, logits), abs=1e-12)
        assert sum(predicted.exit_fractions) == pytest.approx(1.0)
        assert predicted.expected_cost == pytest.approx(COSTS.expected(config, predicted.exit_fractions))
        assert predicted.worst_cost == pytest.approx(COSTS.worst(config))


def _same(a, b):
    assert a.miou == pytest.approx(b.miou, abs=1e-12)
    assert a.expected_cost == pytest.approx(b.expected_cost, rel=1e-12)


@pytest.mark.parametrize("mode", ["dynamic", "budgeted"])
def test_fast_search_equals_brute_force(synthetic, mode):
    cache = synthetic[0]
    everything = search.brute_force(cache, COSTS, TH_IMG, mode=mode)
    assert len(everything) == (1 + 6 * 9 + 12 * 81 + 8 * 729 if mode == "dynamic" else 7)
    for budget in np.linspace(0.45, 1.1, 6) * everything[0].expected_cost:
        fast = search.search(cache, COSTS, TH_IMG, "max_miou", budget=budget, mode=mode, workers=1).best
        _same(fast, search.select(everything, "max_miou", budget=budget)[0])
    for drop in (0.0, 1.0, 3.0, 10.0):
        fast = search.search(cache, COSTS, TH_IMG, "min_cost", max_drop_pp=drop, mode=mode, workers=1).best
        _same(fast, search.select(everything, "min_cost", max_drop_pp=drop)[0])
    # Two workers sharing their incumbent find the same optima.
    budget = 0.7 * everything[0].expected_cost
    _same(search.search(cache, COSTS, TH_IMG, "max_miou", budget=budget, mode=mode, workers=2).best,
          search.select(everything, "max_miou", budget=budget)[0])
    _same(search.search(cache, COSTS, TH_IMG, "min_cost", max_drop_pp=2.0, mode=mode, workers=2).best,
          search.select(everything, "min_cost", max_drop_pp=2.0)[0])
    fast = search.search(cache, COSTS, TH_IMG, "pareto", mode=mode, workers=2)
    reference = search.select(everything, "pareto")[1]
    assert len(fast.front) == len(reference) > 1
    for a, b in zip(fast.front, reference):
        _same(a, b)
    if mode == "dynamic":
        assert fast.space_size == 1 + 6 * 9 + 12 * 81 + 8 * 729
        assert fast.evaluated < fast.space_size


def test_search_is_monotone_and_meets_its_constraints(synthetic):
    cache = synthetic[0]
    final = search.evaluate(cache, COSTS, DeploymentConfig("dynamic"))
    mious = []
    for budget in np.linspace(0.4, 1.2, 9) * final.expected_cost:
        best = search.search(cache, COSTS, TH_IMG, "max_miou", budget=budget, workers=1).best
        assert best.expected_cost <= budget + 1e-9
        mious.append(best.miou)
    assert np.all(np.diff(mious) >= -1e-12) and mious[-1] >= final.miou
    costs = []
    for drop in (0.0, 0.5, 2.0, 5.0, 20.0):
        best = search.search(cache, COSTS, TH_IMG, "min_cost", max_drop_pp=drop, workers=1).best
        assert best.miou >= final.miou - drop / 100 - 1e-12
        costs.append(best.expected_cost)
    assert np.all(np.diff(costs) <= 1e-12) and costs[0] <= final.expected_cost
    # The chosen configuration, rescored from the cache, is what the search predicted.
    config = search.search(cache, COSTS, TH_IMG, "min_cost", max_drop_pp=2.0, workers=1).best.deployment_config()
    assert search.evaluate(cache, COSTS, config).miou == pytest.approx(config.metadata["predicted_miou"], abs=1e-12)
    assert config.metadata["policy"] == cache.policy.to_dict()  # what export.policy_of bakes in


def test_impossible_constraints_are_explained(synthetic):
    cache = synthetic[0]
    with pytest.raises(ValueError, match=r"cheapest achievable expected cost is \d"):
        search.search(cache, COSTS, TH_IMG, "max_miou", budget=0.1, workers=1)
    with pytest.raises(ValueError, match="not in the calibration cache"):
        search.search(cache, COSTS, TH_IMG, "pareto", allowed_exits=["b9:fcn_w0_b0"])
    for budget in (None, float("nan"), -1.0, 0.0):
        with pytest.raises(ValueError, match=f"needs a budget above 0 .*got {budget}"):
            search.search(cache, COSTS, TH_IMG, "max_miou", budget=budget)
    with pytest.raises(ValueError, match="max_exits must be 0 .*got -1"):
        search.search(cache, COSTS, TH_IMG, "pareto", max_exits=-1)


def test_max_exits_zero_is_the_final_exit_alone(synthetic):
    cache = synthetic[0]
    for limit in (None, 60):
        outcome = search.search(cache, COSTS, TH_IMG, "min_cost", max_drop_pp=100.0, max_exits=0, workers=1,
                                time_limit_s=limit)
        assert not outcome.best.exits and outcome.best == outcome.final and outcome.space_size == 1


def test_a_latency_table_timed_under_another_policy_is_refused(synthetic):
    cache = synthetic[0]
    timed_alike = dataclasses.replace(COSTS, policy=policy.PolicyConfig())
    assert search.evaluate(cache, timed_alike, DeploymentConfig("dynamic")) == search.evaluate(
        cache, COSTS, DeploymentConfig("dynamic"))
    timed_at_stride8 = dataclasses.replace(COSTS, policy=policy.PolicyConfig(confidence_stride=8))
    with pytest.raises(ValueError, match="latency table timed the exit heads' confidence with policy .*"
                                         "'confidence_stride': 8.*profile again"):
        search.search(cache, timed_at_stride8, TH_IMG, "pareto", workers=1)


def _identity(input_size, num_classes, alpha=0.35):
    """cost_model.network_identity of a tiny MobileNetV2 DeepLab."""
    config = network.NetworkConfig(backbones.BackboneConfig("mobilenet_v2", 16, alpha), num_classes,
                                   (input_size, input_size), heads.FinalHeadConfig(filters=16))
    return cost_model.network_identity(network.MultiExitNetwork(config))


def test_a_latency_table_of_another_network_is_refused_naming_what_differs(synthetic):
    cache = dataclasses.replace(synthetic[0], network_identity=_identity(64, CLASSES))
    same = dataclasses.replace(COSTS, network_identity=_identity(64, CLASSES))
    assert search.evaluate(cache, same, DeploymentConfig("dynamic")) == search.evaluate(
        cache, COSTS, DeploymentConfig("dynamic"))
    for table, differences in [
            (_identity(128, CLASSES, alpha=0.5), "(input size: cache [64, 64], table [128, 128]; parts fingerprint"),
            (_identity(64, 11), "(classes: cache 4, table 11; parts fingerprint"),
            (_identity(64, CLASSES, alpha=0.5), "(parts fingerprint (backbone, width, final head): cache ")]:
        with pytest.raises(ValueError, match=re.escape(differences)):
            search.search(cache, dataclasses.replace(COSTS, network_identity=table), TH_IMG, "pareto", workers=1)
    # A table written before tables recorded their network is still checked on its input size.
    with pytest.raises(ValueError, match=re.escape("(input size: cache [64, 64], table [32, 32]): profile")):
        search.search(cache, dataclasses.replace(COSTS, network_identity={"input_size": [32, 32]}), TH_IMG, "pareto")


def test_a_budgeted_early_exit_sends_no_image_to_the_final_exit(synthetic):
    budgeted = search.evaluate(synthetic[0], COSTS, DeploymentConfig("budgeted", [ExitChoice("b1", "fcn_w0_b0")]))
    final = search.evaluate(synthetic[0], COSTS, DeploymentConfig("budgeted"))
    assert budgeted.exit_fractions == (1.0,) and budgeted.final_fraction == 0.0 and final.final_fraction == 1.0


def test_allowed_exits_restrict_the_space(synthetic):
    cache = synthetic[0]
    allowed = [e for e in EXITS if e.endswith("w0_b0")]
    outcome = search.search(cache, COSTS, TH_IMG, "pareto", allowed_exits=allowed, workers=1)
    assert all(e.exit_id in allowed for r in outcome.front for e in r.exits)
    assert outcome.space_size == 1 + 3 * 9 + 3 * 81 + 729


def test_stale_cache_is_refused(synthetic, tmp_path):
    cache = synthetic[0]
    path = str(tmp_path / "cache.npz")
    cache.save(path)
    calibration.CalibrationCache.load(path, expected_fingerprint="f00d", expected_config={"name": "toy"})
    with pytest.raises(ValueError, match="fingerprint 'f00d' != expected 'beef'"):
        calibration.CalibrationCache.load(path, expected_fingerprint="beef")
    with pytest.raises(ValueError, match="network config name: cached 'toy' != expected 'other'"):
        calibration.CalibrationCache.load(path, expected_config={"name": "other"})


@pytest.mark.parametrize("workers", [1, 2])
def test_a_time_limit_keeps_the_best_found_flagged_as_not_proven(synthetic, workers):
    cache = synthetic[0]
    seen = []
    exact = search.search(cache, COSTS, TH_IMG, "min_cost", max_drop_pp=2.0, workers=1,
                          progress=lambda done, total: seen.append((done, total)))
    assert exact.complete and seen[-1][0] == seen[-1][1] > 0
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    # Stopped at once, the search has still evaluated every configuration with one early exit.
    one_exit = search.search(cache, COSTS, TH_IMG, "min_cost", max_drop_pp=2.0, max_exits=1, workers=1).best
    stopped = search.search(cache, COSTS, TH_IMG, "min_cost", max_drop_pp=2.0, workers=workers, time_limit_s=0)
    assert not stopped.complete and stopped.exact_exits == 1
    assert stopped.best.expected_cost == pytest.approx(one_exit.expected_cost, abs=1e-12)
    assert stopped.best.expected_cost >= exact.best.expected_cost - 1e-12
    # Deepening under a generous limit ends at the exact answer.
    deepened = search.search(cache, COSTS, TH_IMG, "min_cost", max_drop_pp=2.0, workers=workers, time_limit_s=600)
    assert deepened.complete and deepened.exact_exits == 3
    assert deepened.best.expected_cost == pytest.approx(exact.best.expected_cost, abs=1e-12)


def _search_command(cache, tmp_path):
    """The tools.search command line searching `cache` with the costs of COSTS in MACs, into tmp_path/out."""
    cache.save(str(tmp_path / "cache.npz"))
    costs = {"unit": "MACs", "positions": list(POSITIONS), "segment": COSTS.segment, "head": COSTS.head,
             "final_head": COSTS.final_head}
    (tmp_path / "macs.json").write_text(json.dumps(costs))
    return [sys.executable, "-m", "tools.search", f"--cache={tmp_path / 'cache.npz'}",
            f"--macs={tmp_path / 'macs.json'}", f"--th_img={','.join(map(str, TH_IMG))}", "--workers=1",
            f"--output_dir={tmp_path / 'out'}"]


def test_cli_writes_its_outputs_together_or_none_and_names_a_bad_threshold_flag(synthetic, tmp_path):
    base = _search_command(synthetic[0], tmp_path)
    (tmp_path / "out" / "pareto.png").mkdir(parents=True)  # a folder where the plot must go
    failed = subprocess.run(base + ["--objective=min_latency", "--max_drop_pp=1"], capture_output=True, text=True)
    assert failed.returncode == 2 and failed.stderr.strip().splitlines()[-1] == (
        f"error: cannot write {tmp_path / 'out' / 'pareto.png'}: a folder stands where this file must go")
    assert os.listdir(tmp_path / "out") == ["pareto.png"]  # no CONFIG.json or report.json without their plot
    bad = subprocess.run(base + ["--th_img=0.5,abc"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "error: --th_img=0.5,abc: expected comma-separated numbers, e.g. --th_img=0.6,0.8")


def test_cli_writes_config_report_and_plot(synthetic, tmp_path):
    # A policy other than the default: the chosen configuration must carry it to tools.export.
    cache = dataclasses.replace(synthetic[0], policy=policy.PolicyConfig("entropy", confidence_stride=8))
    base = _search_command(cache, tmp_path)
    done = subprocess.run(base + ["--objective=min_latency", "--max_drop_pp=1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| chosen |" in done.stdout
    config = DeploymentConfig.load(str(tmp_path / "out" / "CONFIG.json"))
    assert search.evaluate(cache, COSTS, config).miou == pytest.approx(config.metadata["predicted_miou"], abs=1e-12)
    assert policy.PolicyConfig.from_dict(config.metadata["policy"]) == cache.policy
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["space_size"] == 1 + 6 * 9 + 12 * 81 + 8 * 729 and len(saved["pareto_front"]) > 1
    assert saved["complete"] is True
    hurried = subprocess.run(base + ["--objective=min_latency", "--max_drop_pp=1", "--time_limit_s=0"],
                             capture_output=True, text=True)
    assert hurried.returncode == 0 and "time limit of 0 s reached" in hurried.stdout
    assert json.loads((tmp_path / "out" / "report.json").read_text())["complete"] is False
    assert (tmp_path / "out" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    refused = subprocess.run(base + ["--objective=max_miou", "--budget_macs=0.5"], capture_output=True, text=True)
    assert refused.returncode == 2 and "cheapest achievable expected cost" in refused.stderr
    # Bad input is one line that names the flag or the path, never a traceback.
    nan = subprocess.run(base + ["--objective=max_miou", "--budget_macs=nan"], capture_output=True, text=True)
    assert (nan.returncode == 2
            and nan.stderr.strip().splitlines()[-1] == "error: --budget_macs must be a number above 0, got nan")
    (tmp_path / "a_file").write_text("")
    in_the_way = subprocess.run(base + ["--objective=min_latency", "--max_drop_pp=1",
                                        f"--output_dir={tmp_path / 'a_file'}"],
                                capture_output=True, text=True)
    assert in_the_way.returncode == 2 and "Traceback" not in in_the_way.stderr
    assert f"error: cannot write {tmp_path / 'a_file'}" in in_the_way.stderr
