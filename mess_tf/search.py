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
  * depth-first branch and bound over exits in depth order: every prefix (exits chosen so far) is
    itself a complete configuration (the rest go to the final exit) and, before going deeper, its
    completions are bounded: mIoU from above (every remaining image takes, per class, the best TP
    and the lowest FP of any exit it could still reach) and expected cost from below (every
    remaining image pays at least the cheapest next exit). A prefix whose bound cannot beat the
    incumbent (or, for the Pareto front, is dominated by it) is not expanded;
  * every exit's masks are evaluated at once as one matrix product over images; the first exits
    are shared between processes (`workers`).
`brute_force` enumerates the declared space plainly (and `select` picks from it); tests/test_search.py proves both agree.
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
    """

    mode: str
    exits: tuple
    miou: float
    expected_cost: float
    worst_cost: float
    exit_fractions: tuple
    unit: str

    @property
    def exit_ids(self):
        return self.deployment_config().exit_ids

    def deployment_config(self, network=None, metadata=None):
        """The DeploymentConfig to export, with the predicted figures in its metadata."""
        predicted = {"predicted_miou": self.miou, "expected_cost": self.expected_cost,
                     "worst_cost": self.worst_cost, "unit": self.unit,
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
    """

    best: object
    front: list
    final: SearchResult
    space_size: int
    evaluated: int
    seconds: float


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
    head: np.ndarray      # [J] exit head cost
    full: float           # backbone + final head
    counts: np.ndarray    # [J + 1, N, 2C] tp | fp, final last
    gt: np.ndarray        # [C] labelled pixels per class
    masks: list           # per exit: bool [M, N] distinct non-empty exit masks
    pairs: list           # per exit: [M] (th_pix, th_img) representing each mask
    grid_size: int        # (th_pix, th_img) pairs per exit
    unit: str

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
        js = [j for j, _ in chosen] + ([] if mode == "budgeted" and chosen else [len(self.exit_ids)])
        costs = self.reach[[j for j, _ in chosen]] + np.cumsum(self.head[[j for j, _ in chosen]])
        if not (mode == "budgeted" and chosen):
            costs = np.append(costs, self.full + self.head[[j for j, _ in chosen]].sum())
        summed = np.stack([self.counts[j, leaves == k].sum(0) for k, j in enumerate(js)]).sum(0)
        c = self.gt.size
        fractions = np.bincount(leaves, minlength=len(js)) / n
        return SearchResult(mode, exits, float(_miou(summed[:c], summed[c:], self.gt)),
                            float(fractions @ costs), float(costs[-1]), tuple(fractions.tolist()), self.unit)


def _problem(cache, costs, th_img_grid, allowed_exits):
    if costs.unit not in ("ms", "MACs"):
        raise ValueError(f"cost table unit {costs.unit!r} is not 'ms' or 'MACs'")
    allowed = list(cache.exit_ids) if allowed_exits is None else list(allowed_exits)
    unknown = [e for e in allowed if e not in cache.exit_ids]
    if unknown:
        raise ValueError(f"exits {unknown} are not in the calibration cache (it has {list(cache.exit_ids)})")
    for e in allowed:
        position = e.split(":", 1)[0]
        if position not in costs.positions:
            raise ValueError(f"exit {e}: position {position!r} is not in the cost table {list(costs.positions)}")
        costs.head_cost(e)
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
                    costs.backbone_to(costs.positions[-1]) + float(costs.final_head),
                    counts, gt, masks, pairs, cache.th_pix_grid.size * th_img_grid.size, costs.unit)


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

    def _better(self, miou, cost):
        if self.best is None:
            return True
        best_miou, best_cost, _ = self.best
        if self.kind == "max_miou":
            return miou > best_miou + _TOL or (miou >= best_miou - _TOL and cost < best_cost - _TOL)
        return cost < best_cost - _TOL or (cost <= best_cost + _TOL and miou > best_miou + _TOL)

    def feasible(self, miou, cost):
        if self.kind == "max_miou":
            return cost <= self.budget + _TOL * max(1.0, abs(self.budget))
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

    def prunes(self, ub_miou, lb_cost):
        """bool [M]: prefixes none of whose completions can improve the incumbent."""
        if self.kind == "max_miou":
            hopeless = lb_cost > self.budget + _TOL * max(1.0, abs(self.budget))
            if self.best is not None:
                hopeless |= ub_miou < self.best[0] - _TOL
            return hopeless
        if self.kind == "min_cost":
            hopeless = ub_miou < self.min_miou - _TOL
            if self.best is not None:
                hopeless |= lb_cost > self.best[1] + _TOL
            return hopeless
        if not self.front:
            return np.zeros(np.shape(ub_miou), bool)
        front_miou = np.array([f[0] for f in self.front])
        front_cost = np.array([f[1] for f in self.front])
        return ((front_miou[None] > ub_miou[:, None] + _TOL) & (front_cost[None] < lb_cost[:, None] - _TOL)).any(1)

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

class _BranchAndBound:
    """Explores dynamic configurations from the prefixes that start with given first exits."""

    def __init__(self, problem, objective, max_exits):
        self.p, self.objective, self.max_exits = problem, objective, max_exits
        n_classes = problem.gt.size
        self.delta = problem.counts[:-1] - problem.counts[-1]  # [J, N, 2C] vs leaving at the final exit
        # Optimistic change per image when it may still leave at any exit beyond position q:
        # best TP gain and lowest FP change, per class, over the exits it could reach (or 0 = final).
        positions = np.unique(problem.position)
        self.optimistic, self.cheapest_next = {}, {}
        for q in np.concatenate([[-1], positions]):
            later = problem.position > q
            if not later.any():
                continue
            gain = np.concatenate([np.maximum(self.delta[later, :, :n_classes].max(0), 0),
                                   np.minimum(self.delta[later, :, n_classes:].min(0), 0)], axis=1)
            self.optimistic[int(q)] = gain
            self.cheapest_next[int(q)] = float((problem.reach + problem.head)[later].min())
        self.evaluated = 0

    def run(self, first_exits):
        p = self.p
        root_counts = p.counts[-1].sum(0)
        remaining = np.ones(p.num_images, bool)
        self._expand(first_exits, [], remaining, root_counts, 0.0, 0.0, -1)

    def _expand(self, candidates, chosen, remaining, counts, exited_cost, heads, last_position):
        """Evaluates every child prefix (chosen + one exit j in candidates, each of its masks)."""
        p, n, n_classes = self.p, self.p.num_images, self.p.gt.size
        running = remaining.sum()
        for j in candidates:
            masks = p.masks[j] & remaining
            keep = _distinct_nonempty(masks)
            if keep.size == 0:
                continue
            masks = masks[keep]
            child_counts = counts + masks.astype(np.float64) @ self.delta[j]
            leaving = masks.sum(1)
            child_heads = heads + p.head[j]
            child_exited = exited_cost + leaving * (p.reach[j] + child_heads)
            cost = (child_exited + (running - leaving) * (p.full + child_heads)) / n
            miou = _miou(child_counts[:, :n_classes], child_counts[:, n_classes:], p.gt)
            self.evaluated += len(keep)
            pair = [p.pairs[j][k] for k in keep]
            masks_so_far = [m for _, _, m in chosen]
            self.objective.offer(miou, cost, lambda i: (
                [(jj, pp) for jj, pp, _ in chosen] + [(j, pair[i])], masks_so_far + [masks[i]]))
            position = p.position[j]
            if len(chosen) + 1 >= self.max_exits or int(position) not in self.optimistic:
                continue
            gain = self.optimistic[int(position)]
            still = remaining[None] & ~masks
            bound = child_counts + still.astype(np.float64) @ gain
            ub = _miou(bound[:, :n_classes], bound[:, n_classes:], p.gt)
            lb = (child_exited + still.sum(1) * (child_heads + self.cheapest_next[int(position)])) / n
            later = np.flatnonzero(p.position > position)
            for i in np.flatnonzero(~self.objective.prunes(ub, lb)):
                self._expand(later, chosen + [(j, pair[i], masks[i])], still[i], child_counts[i],
                             child_exited[i], child_heads, position)


_SHARED = {}


def _worker(first_exits):
    """Runs in a forked process: one share of the first exits."""
    problem, objective, max_exits = _SHARED["problem"], _SHARED["objective"], _SHARED["max_exits"]
    search = _BranchAndBound(problem, objective, max_exits)
    search.run(first_exits)
    return objective, search.evaluated


def _run_dynamic(problem, objective, max_exits, workers):
    """Branch and bound over all first exits, split round-robin between `workers` processes."""
    shares = [list(range(len(problem.exit_ids)))[w::workers] for w in range(workers)]
    shares = [s for s in shares if s]
    if workers <= 1 or len(shares) <= 1:
        search = _BranchAndBound(problem, objective, max_exits)
        search.run(list(range(len(problem.exit_ids))))
        return search.evaluated
    _SHARED.update(problem=problem, objective=objective, max_exits=max_exits)
    try:
        with multiprocessing.get_context("fork").Pool(len(shares)) as pool:
            results = pool.map(_worker, shares)
    finally:
        _SHARED.clear()
    for other, _ in results:
        objective.merge(other)
    return sum(evaluated for _, evaluated in results)


def search(cache, costs, th_img_grid, objective, budget=None, max_drop_pp=None, mode="dynamic",
           max_exits=3, allowed_exits=None, workers=2):
    """Finds the best configuration (or the Pareto front) in the declared space.

    Args:
      cache: calibration.CalibrationCache.
      costs: latency.costs.CostTable (ms or MACs) covering the cache's positions and exits.
      th_img_grid: [T] image thresholds in [0, 1] (th_pix comes from the cache's grid).
      objective: "max_miou" (needs `budget`, on expected cost, in costs.unit), "min_cost"
        (needs `max_drop_pp`, mIoU percentage points below the final exit) or "pareto".
      mode: "dynamic" or "budgeted".
      max_exits: most early exits in a dynamic configuration.
      allowed_exits: subset of the cache's exit ids to consider (default: all).
      workers: processes sharing the search.

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
    if objective == "max_miou" and budget is None:
        raise ValueError("objective max_miou needs a budget (ms or MACs)")
    if objective == "min_cost" and (max_drop_pp is None or max_drop_pp < 0):
        raise ValueError(f"objective min_cost needs max_drop_pp >= 0, got {max_drop_pp}")
    start = time.perf_counter()
    problem = _problem(cache, costs, th_img_grid, allowed_exits)
    final = problem.result(mode, [])
    min_miou = None if max_drop_pp is None else final.miou - max_drop_pp / 100.0
    goal = _Objective(objective, budget, min_miou)
    goal.offer(np.array([final.miou]), np.array([final.expected_cost]), lambda i: ([], []))
    if mode == "budgeted":
        evaluated = 1 + len(problem.exit_ids)
        for j in range(len(problem.exit_ids)):
            result = problem.result(mode, [(j, (0.0, 0.0))])
            goal.offer(np.array([result.miou]), np.array([result.expected_cost]), lambda i: ([(j, (0.0, 0.0))], []))
    else:
        evaluated = 1 + _run_dynamic(problem, goal, max_exits, workers)

    def to_result(payload):
        chosen, masks = payload
        return problem.result(mode, chosen, masks)

    if objective != "pareto" and goal.best is None:
        raise ValueError(_infeasible_message(cache, costs, th_img_grid, objective, budget, max_drop_pp, mode,
                                             max_exits, allowed_exits, workers, final))
    return SearchOutcome(None if goal.best is None or objective == "pareto" else to_result(goal.best[2]),
                         [to_result(f[2]) for f in goal.front], final,
                         space_size(problem, mode, max_exits), evaluated, time.perf_counter() - start)


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
