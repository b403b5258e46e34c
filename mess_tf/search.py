"""Exhaustive deployment search over a calibration cache (DESIGN.md §1.5).

The declared space:
  * "budgeted": the final exit alone (the baseline) or one early exit with the network truncated
    after it; every image leaves there;
  * "dynamic": 0..max_exits early exits at strictly increasing positions, each with its head and
    its (th_pix, th_img) pair from the grids; an image leaves at the first exit whose image
    confidence passes, else at the final exit.

A configuration's mIoU comes from the per-class TP/FP counts summed over images (each image taking
the counts of the exit it leaves at; TP + FN per class is fixed by the labels), and its expected
and worst-case cost from a CostTable (ms or MACs). Objectives: the best mIoU within a budget on
expected cost, the cheapest expected cost within an mIoU drop from the final exit, the Pareto front.

The search is exact ("exhaustive": it returns the best configuration of the declared space) while
evaluating far fewer configurations than the space holds:
  * per exit, a (th_pix, th_img) pair matters only through the set of images it lets out (its
    mask); pairs with equal masks are one candidate, and at deeper exits masks are compared on the
    images still running, so equal restricted masks collapse too;
  * an exit that lets no remaining image out changes nothing but adds its head cost, so the same
    configuration without it is at least as good: it is skipped;
  * depth-first branch and bound over exits in depth order, siblings best-first: every prefix
    (exits chosen so far) is itself a complete configuration (the rest go to the final exit),
    and before going deeper its completions are bounded (see _BranchAndBound): expected cost
    from below (each running image pays at least the cheapest deeper exit that can let it out),
    mIoU from above through a linear envelope of the per-class ratios, and the two coupled by a
    Lagrange multiplier on the budget (or on the mIoU floor). A prefix whose bound cannot beat
    the incumbent (or, for the Pareto front, is dominated by it) is not expanded, and a
    configuration whose linear mIoU bound or exact cost already loses is not even scored;
  * every exit's masks are evaluated at once as matrix products over images; the root's children
    are shared between processes (`workers`), which share their incumbent's mIoU or cost.
`brute_force` enumerates the declared space plainly (and `select` picks from it);
tests/test_search.py proves both agree.

Large spaces (3 exits over dozens of positions and heads) can outlast a user's patience: with
`time_limit_s` the search deepens one early exit at a time, so when it stops it returns an answer
that is exact over the configurations with fewer exits (`SearchOutcome.exact_exits`) and the best
found beyond.
"""
import dataclasses
import itertools
import multiprocessing
import time

import numpy as np

from mess_tf.deployment import FINAL_EXIT, DeploymentConfig, ExitChoice

OBJECTIVES = ("max_miou", "min_cost", "pareto")
SEARCH_MODES = ("dynamic", "budgeted")
_TOL = 1e-12  # float slack when comparing mIoUs and costs computed in different orders


def _slack(cost):
    """Float slack for comparing costs, relative to their size (MACs run to 1e10)."""
    return _TOL * np.maximum(1.0, np.abs(cost))


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """One evaluated configuration.

    Attributes:
      mode: "dynamic" or "budgeted".
      exits: ExitChoices in depth order.
      miou: predicted mIoU in [0, 1] on the calibration split.
      expected_cost, worst_cost: per image, in `unit`.
      exit_fractions: fraction of images leaving at each of exit_ids (early exits, then final).
      unit: "ms" or "MACs".
      policy: the exit policy (PolicyConfig.to_dict()) the cache's confidences were computed with:
        the predictions hold for a model that decides with it.
    """

    mode: str
    exits: tuple
    miou: float
    expected_cost: float
    worst_cost: float
    exit_fractions: tuple
    unit: str
    policy: dict = None

    @property
    def exit_ids(self):
        return self.deployment_config().exit_ids

    @property
    def final_fraction(self):
        """Fraction of images that reach the final exit (none in a budgeted early exit, which has none)."""
        return self.exit_fractions[-1] if self.exit_ids[-1] == FINAL_EXIT else 0.0

    def deployment_config(self, network=None, metadata=None):
        """The DeploymentConfig to export, with the predicted figures and the policy they hold for
        in its metadata (export.export_staged_model bakes that policy into the model)."""
        predicted = {"predicted_miou": self.miou, "expected_cost": self.expected_cost,
                     "worst_cost": self.worst_cost, "unit": self.unit, "policy": self.policy,
                     "exit_fractions": dict(zip(DeploymentConfig(self.mode, self.exits).exit_ids,
                                                self.exit_fractions))}
        return DeploymentConfig(self.mode, self.exits, network, dict(predicted, **(metadata or {})))

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["exits"] = [dataclasses.asdict(e) for e in self.exits]
        d["exit_ids"] = list(self.exit_ids)
        return d


@dataclasses.dataclass
class SearchOutcome:
    """What a search returns.

    Attributes:
      best: the optimum for max_miou/min_cost (None for pareto).
      front: Pareto-optimal configurations (mIoU vs expected cost) for "pareto", else [].
      final: the final exit alone (the baseline), for reference.
      space_size: configurations in the declared space.
      evaluated: configurations whose mIoU was computed (distinct masks, after pruning).
      seconds: wall time.
      complete: True if the whole space was searched, so `best`/`front` are exact; False if the
        time limit stopped it first: they are then the best found, not proven best.
      exact_exits: the answer is exact over the configurations with at most this many early
        exits (max_exits when complete).
    """

    best: object
    front: list
    final: SearchResult
    space_size: int
    evaluated: int
    seconds: float
    complete: bool = True
    exact_exits: int = None


# ---- the problem, as arrays -------------------------------------------------------------------

def _miou(tp, fp, gt):
    """mIoU over classes present (tp + fp + fn > 0); tp, fp [..., C] with fn = gt - tp."""
    union = gt + fp
    present = union > 0
    iou = np.where(present, tp / np.where(present, union, 1), 0.0)
    return iou.sum(-1) / np.maximum(present.sum(-1), 1)


@dataclasses.dataclass
class _Problem:
    """The cache and the cost table, reduced to arrays indexed by allowed exit (depth order)."""

    exit_ids: list        # allowed early exit ids, by position then head
    position: np.ndarray  # [J] position index in the cost table
    reach: np.ndarray     # [J] backbone cost up to the exit's position
    head: np.ndarray      # [J] exit head cost, paid at every exit an image reaches
    class_map: np.ndarray  # [J] exit class-map cost, paid only by the images leaving there
    full: float           # backbone + final head
    counts: np.ndarray    # [J + 1, N, 2C] tp | fp, final last
    gt: np.ndarray        # [C] labelled pixels per class
    masks: list           # per exit: bool [M, N] distinct non-empty exit masks
    pairs: list           # per exit: [M] (th_pix, th_img) representing each mask
    grid_size: int        # (th_pix, th_img) pairs per exit
    unit: str
    policy: dict          # the cache's PolicyConfig.to_dict()

    @property
    def num_images(self):
        return self.counts.shape[1]

    def result(self, mode, chosen, masks_by_image=None):
        """SearchResult of exits `chosen` [(j, (th_pix, th_img))] leaving images per `masks_by_image`."""
        n = self.num_images
        exits = tuple(ExitChoice(*self.exit_ids[j].split(":", 1), *pair) for j, pair in chosen)
        leaves = np.full(n, len(chosen))
        for k, mask in reversed(list(enumerate(masks_by_image or []))):
            leaves[mask] = k
        if mode == "budgeted" and chosen:
            leaves[:] = 0
        picked = [j for j, _ in chosen]
        js = picked + ([] if mode == "budgeted" and chosen else [len(self.exit_ids)])
        costs = self.reach[picked] + np.cumsum(self.head[picked]) + self.class_map[picked]
        if not (mode == "budgeted" and chosen):
            costs = np.append(costs, self.full + self.head[picked].sum())
        summed = np.stack([self.counts[j, leaves == k].sum(0) for k, j in enumerate(js)]).sum(0)
        c = self.gt.size
        fractions = np.bincount(leaves, minlength=len(js)) / n
        return SearchResult(mode, exits, float(_miou(summed[:c], summed[c:], self.gt)),
                            float(fractions @ costs), float(costs[-1]), tuple(fractions.tolist()), self.unit,
                            self.policy)


_IDENTITY_FIELDS = {"input_size": "input size", "num_classes": "classes",
                    "parts": "parts fingerprint (backbone, width, final head)"}


def _network_differences(cache_identity, table_identity):
    """["input size: cache [64, 64], table [128, 128]", ...] for the fields of two
    cost_model.network_identity dicts that both record and that differ."""
    return [f"{label}: cache {cache_identity[k]}, table {table_identity[k]}" for k, label in _IDENTITY_FIELDS.items()
            if k in cache_identity and k in table_identity and cache_identity[k] != table_identity[k]]


def _problem(cache, costs, th_img_grid, allowed_exits):
    if costs.unit not in ("ms", "MACs"):
        raise ValueError(f"cost table unit {costs.unit!r} is not 'ms' or 'MACs'")
    if costs.policy is not None and costs.policy != cache.policy:
        # A head's latency includes its image confidence: another policy costs another time.
        raise ValueError(f"the latency table timed the exit heads' confidence with policy {costs.policy.to_dict()}, "
                         f"but the calibration cache was made with {cache.policy.to_dict()}: profile again with "
                         f"the cache's policy (tools.profile --confidence/--edge_smoothing/--confidence_stride)")
    differences = _network_differences(cache.identity(), costs.network_identity or {})
    if differences:
        raise ValueError(f"the latency table was timed on another network than the calibration cache's "
                         f"({'; '.join(differences)}): profile the network the cache was made with "
                         f"(tools.profile --checkpoint=RUN, the run tools.calibrate read)")
    allowed = list(cache.exit_ids) if allowed_exits is None else list(allowed_exits)
    unknown = [e for e in allowed if e not in cache.exit_ids]
    if unknown:
        raise ValueError(f"exits {unknown} are not in the calibration cache (it has {list(cache.exit_ids)})")
    for e in allowed:
        position = e.split(":", 1)[0]
        if position not in costs.positions:
            raise ValueError(f"exit {e}: position {position!r} is not in the cost table {list(costs.positions)}")
        costs.head_cost(e)
        costs.class_map_cost(e)
    order = {p: i for i, p in enumerate(costs.positions)}
    allowed.sort(key=lambda e: (order[e.split(":", 1)[0]], e))
    index = [cache.exit_ids.index(e) for e in allowed] + [len(cache.exit_ids)]
    counts = np.concatenate([cache.tp, cache.fp], axis=-1)[:, index].transpose(1, 0, 2).astype(np.float64)
    gt = (cache.tp + cache.fn)[:, -1].sum(0).astype(np.float64)
    th_img_grid = np.asarray(th_img_grid, np.float64)
    if th_img_grid.ndim != 1 or th_img_grid.size == 0 or th_img_grid.min() < 0 or th_img_grid.max() > 1:
        raise ValueError(f"th_img grid must be a non-empty list of values in [0, 1], got {th_img_grid.tolist()}")
    masks, pairs = [], []
    for i in index[:-1]:
        # [P, T, N] -> [P*T, N]: which images each (th_pix, th_img) pair lets out.
        every = (cache.conf_frac[:, i, :].T[:, None, :] >= th_img_grid[None, :, None]).reshape(-1, cache.num_images)
        keep = _distinct_nonempty(every)
        masks.append(every[keep])
        pairs.append([(float(cache.th_pix_grid[k // th_img_grid.size]), float(th_img_grid[k % th_img_grid.size]))
                      for k in keep])
    return _Problem(allowed, np.array([order[e.split(":", 1)[0]] for e in allowed], int),
                    np.array([costs.backbone_to(e.split(":", 1)[0]) for e in allowed]),
                    np.array([costs.head_cost(e) for e in allowed]),
                    np.array([costs.class_map_cost(e) for e in allowed]),
                    costs.backbone_to(costs.positions[-1]) + float(costs.final_head),
                    counts, gt, masks, pairs, cache.th_pix_grid.size * th_img_grid.size, costs.unit,
                    cache.policy.to_dict())


def _distinct_nonempty(masks):
    """Row indices of the first occurrence of each distinct non-empty row of bool [M, N]."""
    _, first = np.unique(np.packbits(masks, axis=1), axis=0, return_index=True)
    first = np.sort(first)
    return first[masks[first].any(axis=1)]


def space_size(problem, mode, max_exits):
    """Configurations in the declared space (thresholds counted per grid point, not per mask)."""
    if mode == "budgeted":
        return 1 + len(problem.exit_ids)
    # ways[k]: ways to place k exits at strictly increasing positions, thresholds included.
    ways = [1] + [0] * max_exits
    for pos in np.unique(problem.position):
        choices = int(np.sum(problem.position == pos)) * problem.grid_size
        for k in range(max_exits, 0, -1):
            ways[k] += ways[k - 1] * choices
    return int(sum(ways))


# ---- objectives: the incumbent and the pruning rule -------------------------------------------

class _Objective:
    """Keeps the best configuration(s) seen and decides which prefixes can still win."""

    def __init__(self, kind, budget=None, min_miou=None):
        self.kind, self.budget, self.min_miou = kind, budget, min_miou
        self.best = None  # (miou, cost, payload)
        self.front = []   # [(miou, cost, payload)]
        self.shared = None

    def _better(self, miou, cost):
        if self.best is None:
            return True
        best_miou, best_cost, _ = self.best
        if self.kind == "max_miou":
            return miou > best_miou + _TOL or (miou >= best_miou - _TOL and cost < best_cost - _TOL)
        return cost < best_cost - _TOL or (cost <= best_cost + _TOL and miou > best_miou + _TOL)

    def feasible(self, miou, cost):
        if self.kind == "max_miou":
            return cost <= self.budget + _slack(self.budget)
        if self.kind == "min_cost":
            return miou >= self.min_miou - _TOL
        return np.ones(np.shape(miou), bool)

    def offer(self, miou, cost, payload):
        """Candidates miou[M], cost[M]; payload(i) builds candidate i's description."""
        candidates = np.flatnonzero(self.feasible(miou, cost))
        if self.kind == "pareto":
            self._offer_front(miou, cost, candidates, payload)
            return
        for i in candidates:
            if self._better(miou[i], cost[i]):
                self.best = (float(miou[i]), float(cost[i]), payload(i))
                self._publish()

    def _offer_front(self, miou, cost, candidates, payload):
        if self.front:
            front_miou = np.array([f[0] for f in self.front])
            front_cost = np.array([f[1] for f in self.front])
            dominated = ((front_miou[None] >= miou[candidates, None] - _TOL)
                         & (front_cost[None] <= cost[candidates, None] + _TOL)).any(axis=1)
            candidates = candidates[~dominated]
        if candidates.size == 0:
            return
        points = self.front + [(float(miou[i]), float(cost[i]), payload(i)) for i in candidates]
        self.front = pareto_points(points)

    def share(self, value):
        """Shares the incumbent's mIoU (max_miou) or cost (min_cost) with forked workers through
        `value` (a multiprocessing RawValue): any worker's incumbent is a valid bar for all."""
        self.shared = value

    def _bar(self):
        """The incumbent's mIoU (max_miou) or cost (min_cost), best over the workers; None if none."""
        own = None if self.best is None else self.best[0 if self.kind == "max_miou" else 1]
        if self.shared is None or np.isnan(self.shared.value):
            return own
        if own is None:
            return self.shared.value
        return max(own, self.shared.value) if self.kind == "max_miou" else min(own, self.shared.value)

    def _publish(self):
        if self.shared is not None:
            self.shared.value = self._bar()

    def prunes(self, ub_miou, lb_cost):
        """bool [M]: prefixes none of whose completions can improve the incumbent, given upper
        bounds on their mIoU and lower bounds on their expected cost."""
        ub_miou, lb_cost = np.asarray(ub_miou, np.float64), np.asarray(lb_cost, np.float64)
        bar = self._bar()
        if self.kind == "max_miou":
            hopeless = lb_cost > self.budget + _slack(self.budget)
            if bar is not None:
                hopeless |= ub_miou < bar - _TOL
            return hopeless
        if self.kind == "min_cost":
            hopeless = ub_miou < self.min_miou - _TOL
            if bar is not None:
                hopeless |= lb_cost > bar + _slack(bar)
            return hopeless
        if not self.front:
            return np.zeros(np.shape(ub_miou), bool)
        front_miou = np.array([f[0] for f in self.front])
        front_cost = np.array([f[1] for f in self.front])
        return ((front_miou > ub_miou[..., None] + _TOL)
                & (front_cost < lb_cost[..., None] - _slack(front_cost))).any(-1)

    def merge(self, other):
        if other.best is not None:
            self.offer(np.array([other.best[0]]), np.array([other.best[1]]), lambda i: other.best[2])
        if other.front:
            self.front = pareto_points(self.front + other.front)


def pareto_points(points):
    """The non-dominated (miou, cost, payload) points, by increasing cost (higher mIoU wins ties)."""
    front = []
    for miou, cost, payload in sorted(points, key=lambda p: (p[1], -p[0])):
        if not front or miou > front[-1][0] + _TOL:
            if front and cost <= front[-1][1] + _TOL:
                front.pop()
            front.append((miou, cost, payload))
    return front


# ---- depth-first branch and bound -------------------------------------------------------------

_LAMBDA_STEPS = 2.0 ** np.arange(-14, 15)  # multipliers tried, in units of a node's value-per-cost scale
_LAMBDA_REFINE = 12                        # extra multipliers between the best one's neighbours


def _suffix(values, op, final):
    """[J + 1, ...]: out[s] = op over values[s:] and `final` (the final exit's value); out[J] = final."""
    out = np.full((len(values) + 1,) + values.shape[1:], final, np.float64)
    if len(values):
        out[:-1] = op(op.accumulate(values[::-1], axis=0)[::-1], final)
    return out


@dataclasses.dataclass
class _Node:
    """A prefix: the exits chosen so far, every image not let out yet taking the final exit."""

    chosen: list            # [(j, (th_pix, th_img), mask bool [N])]
    remaining: np.ndarray   # bool [N] images still running
    counts: np.ndarray      # [2C] summed tp | fp of the prefix as a configuration
    exited: float           # summed cost of the images already let out
    heads: float            # summed head cost of the chosen exits, paid by every running image
    first: int              # index of the first exit deeper than the last chosen one


class _BranchAndBound:
    """Explores dynamic configurations depth-first, prefix by prefix, best-first among siblings.

    Bounds on the completions of a prefix (every way to add deeper exits), all exact relaxations:
      * cost from below: every running image pays at least its cheapest deeper exit that can let
        it out at all (it is in some mask of that exit), or the final exit;
      * mIoU from above, linearised: over the completions, each class's TP and FP sums lie in
        ranges (each running image taking its per-class extremes over the exits that can let it
        out); on those ranges TP / (GT + FP) is at most a linear function of (TP, FP) (the
        McCormick envelope of TP * u with u = 1 / (GT + FP) under its chord), so mIoU <= base +
        sum over running images of a per-(image, exit) value;
      * coupled (Lagrangian): for any multiplier lambda >= 0, max mIoU within a cost budget is at
        most base + lambda * (budget left) + sum over images of max over exits of
        (value - lambda * cost), and min cost above an mIoU floor is bounded alike. The best
        multiplier on a grid is kept per prefix and reused for its children's bounds.
    """

    def __init__(self, problem, objective, max_exits, deadline=None):
        p = self.p = problem
        self.objective, self.max_exits = objective, max_exits
        self.deadline, self.stopped = deadline, False  # time.monotonic() after which to stop
        c, n_exits, n = problem.gt.size, len(problem.exit_ids), problem.num_images
        self.delta = p.counts[:-1] - p.counts[-1]            # [J, N, 2C] vs leaving at the final exit
        self.exit_cost = p.reach + p.head + p.class_map       # [J] paid when leaving there (+ earlier heads)
        # later[j]: the first exit deeper than exit j (exits are in depth order).
        self.later = np.searchsorted(p.position, p.position, side="right")
        self.masks = np.zeros((n_exits, max((len(m) for m in p.masks), default=0), n))  # 0/1, empty-padded
        for j, m in enumerate(p.masks):
            self.masks[j, :len(m)] = m
        self.reachable = self.masks.any(1)                    # [J, N]: some threshold pair lets the image out
        r = self.reachable[..., None]
        tp, fp = self.delta[..., :c], self.delta[..., c:]
        # Per image, over the exits from index s on that can let it out, and the final exit (delta 0):
        # best (max TP, min FP) and worst (min TP, max FP) change, and the cheapest exit cost.
        self.best_delta = np.concatenate([_suffix(np.where(r, tp, -np.inf), np.maximum, 0.0),
                                          _suffix(np.where(r, fp, np.inf), np.minimum, 0.0)], -1)
        self.worst_delta = np.concatenate([_suffix(np.where(r, tp, np.inf), np.minimum, 0.0),
                                           _suffix(np.where(r, fp, -np.inf), np.maximum, 0.0)], -1)
        self.cheapest = _suffix(np.where(self.reachable, self.exit_cost[:, None], np.inf), np.minimum, p.full)
        self.evaluated = 0

    # -- bounds --

    def _linearise(self, node):
        """(base, value [J', N]): mIoU <= base + sum over running images of value[exit it leaves at]
        for every completion (0 for the final exit; -inf where that exit cannot let it out)."""
        c, gt, s = self.p.gt.size, self.p.gt, node.first
        running = node.remaining.astype(np.float64)
        t_hi_f_lo = node.counts + running @ self.best_delta[s]
        t_lo_f_hi = node.counts + running @ self.worst_delta[s]
        t_lo, f_lo, f_hi = t_lo_f_hi[:c], t_hi_f_lo[c:], t_lo_f_hi[c:]
        present = gt + f_lo > 0  # surely present in every completion; IoU is 0 where gt = 0
        u_hi = np.where(gt > 0, 1 / np.where(present, gt + f_lo, 1), 0)
        u_lo = np.where(gt > 0, 1 / np.where(present, gt + f_hi, 1), 0)
        span = f_hi - f_lo
        slope = np.where(span > 0, (u_lo - u_hi) / np.where(span > 0, span, 1), 0)
        # TP * u <= TP * u_hi + TP_lo * (u - u_hi) and u <= u_hi + slope * (FP - FP_lo) (chord).
        weight = np.concatenate([u_hi, t_lo * slope]) / max(int(present.sum()), 1)
        base = weight[:c] @ node.counts[:c] + weight[c:] @ (node.counts[c:] - f_lo)
        value = np.where(self.reachable[s:], self.delta[s:] @ weight, -np.inf)
        return base, value

    def _dual(self, node, value, lambdas):
        """[L]: sum over running images of max over deeper exits and the final exit of
        (value - lambda * cost), per lambda (costs without the heads already paid)."""
        costs = self.exit_cost[node.first:]
        per_exit = (value[None] - lambdas[:, None, None] * costs[None, :, None]).max(1, initial=-np.inf)
        best = np.maximum(per_exit, -lambdas[:, None] * self.p.full)
        return best @ node.remaining.astype(np.float64)

    def _node_bound(self, node, base, value):
        """(lambda, ub, lb): bounds on the completions of `node`: mIoU from above and expected cost
        from below, coupled through the best multiplier lambda on a grid (kept for the children)."""
        kind, n = self.objective.kind, self.p.num_images
        running = node.remaining.astype(np.float64)
        paid = node.exited + running.sum() * node.heads
        ub = base + self._dual(node, value, np.zeros(1))[0]
        lb = (paid + running @ self.cheapest[node.first]) / n
        if kind == "pareto" or len(node.chosen) + 1 == self.max_exits:
            # With one exit left to add, _children scores every child with its own (mask-exact)
            # linear bound: a multiplier search here cost as much and pruned nothing more
            # (bench/search_speed.py, 2 exits: same configurations evaluated, 35-40% slower).
            return 0.0, ub, lb
        finite = np.abs(value[np.isfinite(value)])
        scale = (finite.max() if finite.size else 0.0) / self.p.full or 1.0 / self.p.full
        if kind == "max_miou":
            def bound(lambdas):
                return base + lambdas * (n * self.objective.budget - paid) + self._dual(node, value, lambdas)
            pick = np.argmin
        else:
            def bound(lambdas):
                return paid + (self.objective.min_miou - base - self._dual(node, value, lambdas)) / lambdas
            pick = np.argmax
        grid = scale * _LAMBDA_STEPS
        values = bound(grid)
        k = int(pick(values))
        # The bound is convex (max_miou) or concave (min_cost) in lambda: refine around the best.
        fine = np.linspace(grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)], _LAMBDA_REFINE)
        grid, values = np.append(grid, fine), np.append(values, bound(fine))
        k = int(pick(values))
        if kind == "max_miou":
            return (float(grid[k]), float(values[k]), lb) if values[k] < ub else (0.0, ub, lb)
        return float(grid[k]), ub, max(lb, float(values[k]) / n)

    # -- search --

    def run(self, share=(0, 1), progress=None):
        """Searches every configuration (every one-exit configuration is offered at the root);
        with `share` (w, W) only the root's children w, w + W, ... (best first) are expanded.
        `progress(done, total)` follows the expanded children. `root_evaluated`: configurations
        evaluated at the root."""
        p = self.p
        root = _Node([], np.ones(p.num_images, bool), p.counts[-1].sum(0), 0.0, 0.0, 0)
        children = self._children(root, *self._bounds(root)[:3])[share[0]::share[1]]
        self.root_evaluated = self.evaluated
        for done, child in enumerate(children):
            if progress:
                progress(done, len(children))
            self._expand(child)
        if progress:
            progress(len(children), len(children))

    def _bounds(self, node):
        """(base, value, lambda, ub, lb): the node's linearisation and bounds."""
        base, value = self._linearise(node)
        return (base, value) + self._node_bound(node, base, value)

    def _expand(self, node):
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.stopped = True
        if node.first == len(self.p.exit_ids) or self.stopped:
            return
        base, value, lam, ub, lb = self._bounds(node)
        if self.objective.prunes(ub, lb):
            return
        for child in self._children(node, base, value, lam):
            self._expand(child)

    def _children(self, node, base, value, lam):
        """Offers every one-exit extension of `node`; returns those worth expanding, best first."""
        p, objective = self.p, self.objective
        s, n, n_exits = node.first, p.num_images, len(p.exit_ids)
        running = node.remaining.astype(np.float64)
        n_running = running.sum()
        expandable = len(node.chosen) + 1 < self.max_exits
        later = self.later[s:] - s                         # [J'] local index of the next deeper exit
        costs, heads = self.exit_cost[s:], p.head[s:]
        known = np.where(np.isfinite(value), value, 0.0)  # unreachable images are in no mask
        after0 = _suffix(value, np.maximum, 0.0)[later]                        # best value deeper, lambda 0
        lagrange = np.where(np.isfinite(value), value - lam * costs[:, None], 0.0)
        after = _suffix(value - lam * costs[:, None], np.maximum, -lam * p.full)[later]
        cheapest = self.cheapest[self.later[s:]]
        columns = np.stack([np.ones_like(known), known, after0, lagrange, after, cheapest], -1)
        columns *= running[None, :, None]
        inside = np.matmul(self.masks[s:], columns)                           # [J', M, 6] over each mask
        total = columns.sum(1)[:, None, :]                                    # [J', 1, 6] over running images
        leaving = inside[..., 0]
        still = n_running - leaving
        child_heads = node.heads + heads[:, None]
        exited = node.exited + leaving * (node.heads + costs[:, None])
        cost = (exited + still * (p.full + child_heads)) / n
        valid = leaving > 0.5  # an exit that lets nobody out only adds its head's cost
        offer = valid & ~objective.prunes(base + inside[..., 1], cost)
        expand = np.zeros_like(valid)
        if expandable:
            deeper = valid & (later < n_exits - s)[:, None]
            ub = base + inside[..., 1] + total[..., 2] - inside[..., 2]
            lb = (exited + still * child_heads + total[..., 5] - inside[..., 5]) / n
            dual = inside[..., 3] + total[..., 4] - inside[..., 4] - lam * heads[:, None] * still
            paid = node.exited + n_running * node.heads
            if objective.kind == "max_miou":
                ub = np.minimum(ub, base + lam * (n * objective.budget - paid) + dual)
            elif objective.kind == "min_cost" and lam > 0:
                lb = np.maximum(lb, (paid + (objective.min_miou - base - dual) / lam) / n)
            expand = deeper & ~objective.prunes(ub, lb)
            order_key = lb if objective.kind == "min_cost" else -ub
        picked = np.argwhere(offer | expand)
        if picked.size == 0:
            return []
        counts = np.empty((len(picked), node.counts.size))
        for jl in np.unique(picked[:, 0]):
            rows = picked[:, 0] == jl
            counts[rows] = node.counts + self.masks[s + jl, picked[rows, 1]] @ (running[:, None] * self.delta[s + jl])
        self.evaluated += len(picked)
        c = p.gt.size
        miou = _miou(counts[:, :c], counts[:, c:], p.gt)
        picked_cost = cost[picked[:, 0], picked[:, 1]]

        def config(i):
            jl, m = picked[i]
            return self._payload(node, s + jl, m)

        offered = np.flatnonzero(offer[picked[:, 0], picked[:, 1]])
        objective.offer(miou[offered], picked_cost[offered], lambda i: config(offered[i]))
        if not expandable:
            return []
        nodes, seen = [], set()
        for i in sorted(np.flatnonzero(expand[picked[:, 0], picked[:, 1]]),
                        key=lambda i: order_key[picked[i, 0], picked[i, 1]]):
            jl, m = picked[i]
            leaves = self.masks[s + jl, m].astype(bool) & node.remaining
            key = (jl, np.packbits(leaves).tobytes())
            if key in seen:  # another threshold pair letting out the same running images
                continue
            seen.add(key)
            j = s + jl
            nodes.append(_Node(node.chosen + [(j, p.pairs[j][m], leaves)], node.remaining & ~leaves, counts[i],
                               float(exited[jl, m]), float(child_heads[jl, 0]), int(self.later[j])))
        return nodes

    def _payload(self, node, j, m):
        leaves = self.masks[j, m].astype(bool) & node.remaining
        return ([(jj, pair) for jj, pair, _ in node.chosen] + [(j, self.p.pairs[j][m])],
                [mask for _, _, mask in node.chosen] + [leaves])


_SHARED = {}


def _worker(share):
    """Runs in a forked process: one share of the root's children; reports its progress in its
    slots of the shared arrays."""
    problem, objective, max_exits = _SHARED["problem"], _SHARED["objective"], _SHARED["max_exits"]
    done, total = _SHARED["done"], _SHARED["total"]
    search = _BranchAndBound(problem, objective, max_exits, _SHARED["deadline"])

    def progress(d, t):
        done[share[0]], total[share[0]] = d, t

    search.run(share, progress)
    objective.share(None)  # the shared value stays behind; the incumbent itself goes back
    return objective, search.evaluated, search.root_evaluated, search.stopped


_POLL_S = 0.5  # how often the parent reports its workers' progress


def _run_dynamic(problem, objective, max_exits, workers, deadline, progress):
    """Branch and bound with the root's children split round-robin between `workers` processes
    that share their incumbent's mIoU or cost.

    Returns:
      (configurations evaluated, whether the deadline stopped the search).
    """
    if workers <= 1 or len(problem.exit_ids) <= 1:
        search = _BranchAndBound(problem, objective, max_exits, deadline)
        search.run(progress=progress)
        return search.evaluated, search.stopped
    context = multiprocessing.get_context("fork")
    if objective.kind != "pareto":
        bar = objective._bar()
        objective.share(context.RawValue("d", np.nan if bar is None else bar))
    done, total = context.RawArray("l", workers), context.RawArray("l", workers)
    _SHARED.update(problem=problem, objective=objective, max_exits=max_exits, deadline=deadline, done=done,
                   total=total)
    try:
        with context.Pool(workers) as pool:
            pending = pool.map_async(_worker, [(w, workers) for w in range(workers)])
            while not pending.ready():
                pending.wait(_POLL_S)
                if progress and all(total):
                    progress(sum(done), sum(total))
            results = pending.get()
    finally:
        _SHARED.clear()
        objective.share(None)
    for other, *_ in results:
        objective.merge(other)
    # Every worker evaluates the root's children: count them once.
    evaluated = sum(r[1] for r in results) - (workers - 1) * results[0][2]
    return evaluated, any(r[3] for r in results)


def search(cache, costs, th_img_grid, objective, budget=None, max_drop_pp=None, mode="dynamic",
           max_exits=3, allowed_exits=None, workers=2, time_limit_s=None, progress=None):
    """Finds the best configuration (or the Pareto front) in the declared space.

    Args:
      cache: calibration.CalibrationCache.
      costs: costs.table.CostTable (ms or MACs) covering the cache's positions and exits.
      th_img_grid: [T] image thresholds in [0, 1] (th_pix comes from the cache's grid).
      objective: "max_miou" (needs `budget`, on expected cost, in costs.unit), "min_cost"
        (needs `max_drop_pp`, mIoU percentage points below the final exit) or "pareto".
      mode: "dynamic" or "budgeted".
      max_exits: most early exits in a dynamic configuration (0: the final exit alone).
      allowed_exits: subset of the cache's exit ids to consider (default: all).
      workers: processes sharing the search.
      time_limit_s: stop after this many seconds (None: search the whole space). The search then
        deepens one early exit at a time (exact with at most 1, then 2, ... exits); the
        configurations with at most one early exit are always all evaluated. A stopped search
        returns the best found, with `complete` False and `exact_exits` the deepest level done.
      progress: optional callable(done, total) over the root's children (one per first exit
        and distinct threshold mask) as the branch and bound expands them.

    Returns:
      SearchOutcome.

    Raises:
      ValueError: bad arguments, or no configuration meets the constraint (the message gives the
        cheapest cost, or the best mIoU, that the space can reach).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {OBJECTIVES}")
    if mode not in SEARCH_MODES:
        raise ValueError(f"search mode {mode!r} is not one of {SEARCH_MODES}")
    if objective == "max_miou" and not (budget is not None and np.isfinite(budget) and budget > 0):
        raise ValueError(f"objective max_miou needs a budget above 0 (ms or MACs), got {budget}")
    if objective == "min_cost" and (max_drop_pp is None or max_drop_pp < 0):
        raise ValueError(f"objective min_cost needs max_drop_pp >= 0, got {max_drop_pp}")
    if max_exits < 0:
        raise ValueError(f"max_exits must be 0 (the final exit alone) or more, got {max_exits}")
    start = time.perf_counter()
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
    problem = _problem(cache, costs, th_img_grid, allowed_exits)
    final = problem.result(mode, [])
    min_miou = None if max_drop_pp is None else final.miou - max_drop_pp / 100.0
    goal = _Objective(objective, budget, min_miou)
    goal.offer(np.array([final.miou]), np.array([final.expected_cost]), lambda i: ([], []))
    stopped, exact_exits = False, max_exits
    if mode == "budgeted":
        evaluated = 1 + len(problem.exit_ids)
        for j in range(len(problem.exit_ids)):
            result = problem.result(mode, [(j, (0.0, 0.0))])
            goal.offer(np.array([result.miou]), np.array([result.expected_cost]), lambda i: ([(j, (0.0, 0.0))], []))
    else:
        # With a time limit, deepen one exit at a time: each level's exact optimum (or front) is
        # the incumbent of the next, so a stopped search is never worse than the deepest level it
        # finished, and every level after the first starts with a good bar to prune against.
        evaluated = 1
        for exits in range(1 if deadline is not None else max(max_exits, 1), max_exits + 1):
            more, stopped = _run_dynamic(problem, goal, exits, workers, deadline, progress)
            evaluated += more
            if stopped:
                exact_exits = exits - 1
                break

    def to_result(payload):
        chosen, masks = payload
        return problem.result(mode, chosen, masks)

    if objective != "pareto" and goal.best is None:
        raise ValueError(_infeasible_message(cache, costs, th_img_grid, objective, budget, max_drop_pp, mode,
                                             max_exits, allowed_exits, workers, final))
    return SearchOutcome(None if goal.best is None or objective == "pareto" else to_result(goal.best[2]),
                         [to_result(f[2]) for f in goal.front], final,
                         space_size(problem, mode, max_exits), evaluated, time.perf_counter() - start, not stopped,
                         exact_exits)


def _infeasible_message(cache, costs, th_img_grid, objective, budget, max_drop_pp, mode, max_exits,
                        allowed_exits, workers, final):
    if objective == "max_miou":
        cheapest = search(cache, costs, th_img_grid, "min_cost", max_drop_pp=100.0, mode=mode,
                          max_exits=max_exits, allowed_exits=allowed_exits, workers=workers).best
        return (f"no {mode} configuration fits the budget of {budget:g} {costs.unit}: the cheapest achievable "
                f"expected cost is {cheapest.expected_cost:g} {costs.unit} (the final exit costs "
                f"{final.expected_cost:g} {costs.unit})")
    return f"no {mode} configuration stays within {max_drop_pp} pp of the final exit's mIoU {100 * final.miou:.2f}"


def evaluate(cache, costs, config):
    """Predicted mIoU, costs and exit distribution of one DeploymentConfig, from the cache.

    Each exit's th_pix must be on the cache's th_pix grid (th_img may be any value).

    Returns:
      SearchResult.
    """
    if config.mode not in SEARCH_MODES:
        raise ValueError(f"cannot evaluate mode {config.mode!r} from a cache; expected one of {SEARCH_MODES}")
    ids = [e.exit_id for e in config.exits]
    problem = _problem(cache, costs, [0.0], ids)
    chosen, masks = [], []
    for choice in config.exits:
        on_grid = np.flatnonzero(np.isclose(cache.th_pix_grid, choice.th_pix, rtol=0, atol=1e-9))
        if on_grid.size == 0 and config.mode == "dynamic":
            raise ValueError(f"exit {choice.exit_id}: th_pix={choice.th_pix} is not on the cache's grid "
                             f"{cache.th_pix_grid.tolist()}")
        chosen.append((problem.exit_ids.index(choice.exit_id), (choice.th_pix, choice.th_img)))
        if config.mode == "dynamic":
            masks.append(cache.conf_frac[:, cache.exit_ids.index(choice.exit_id), on_grid[0]] >= choice.th_img)
    return problem.result(config.mode, chosen, masks)


# ---- the reference: plain enumeration ---------------------------------------------------------

def brute_force(cache, costs, th_img_grid, mode="dynamic", max_exits=3, allowed_exits=None):
    """Evaluates every configuration of the declared space one by one (the reference; slow).

    Returns:
      [SearchResult], the final exit alone first.
    """
    problem = _problem(cache, costs, th_img_grid, allowed_exits)
    th_img_grid = np.asarray(th_img_grid, np.float64)
    cache_index = [cache.exit_ids.index(e) for e in problem.exit_ids]
    if mode == "budgeted":
        return [problem.result(mode, [])] + [problem.result(mode, [(j, (0.0, 0.0))])
                                             for j in range(len(problem.exit_ids))]
    pairs = list(itertools.product(range(cache.th_pix_grid.size), range(th_img_grid.size)))
    results = []
    for k in range(max_exits + 1):
        for js in itertools.combinations(range(len(problem.exit_ids)), k):
            if np.any(np.diff(problem.position[list(js)]) <= 0):
                continue
            for ps in itertools.product(pairs, repeat=k):
                chosen = [(j, (float(cache.th_pix_grid[pi]), float(th_img_grid[ti]))) for j, (pi, ti) in zip(js, ps)]
                masks = [cache.conf_frac[:, cache_index[j], pi] >= th_img_grid[ti] for j, (pi, ti) in zip(js, ps)]
                results.append(problem.result(mode, chosen, masks))
    return results


def select(results, objective, budget=None, max_drop_pp=None):
    """The optimum (or the Pareto front) of an explicit list of SearchResults, results[0] being
    the final exit alone; the same objective semantics as `search`.

    Returns:
      (best SearchResult or None, Pareto front [SearchResult]).
    """
    min_miou = None if max_drop_pp is None else results[0].miou - max_drop_pp / 100.0
    goal = _Objective(objective, budget, min_miou)
    for r in results:
        goal.offer(np.array([r.miou]), np.array([r.expected_cost]), lambda i, r=r: r)
    front = pareto_points([(r.miou, r.expected_cost, r) for r in results])
    return (goal.best[2] if goal.best and objective != "pareto" else None), [f[2] for f in front]
