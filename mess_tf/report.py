"""Tables and plots people read: the headline table, the Pareto front, exit distributions, examples,
learning curves and where the latency goes.

Plots use matplotlib's Agg backend (no display) and are written atomically.
"""
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from mess_tf import io_utils  # noqa: E402

FLAT_TAIL = 0.2  # the share of a learning curve's last steps whose gain says whether it is flat


def tail_gain(curve, tail=FLAT_TAIL):
    """Validation mIoU (pp) gained over the last `tail` of a learning curve's steps: the last point
    against the latest one at or before (1 - tail) of the steps. None without such a point.

    Args:
      curve: [(step, mIoU in %)], in step order.
    """
    start = (1 - tail) * curve[-1][0] if curve else 0
    before = [miou for step, miou in curve if step <= start]
    return curve[-1][1] - before[-1] if curve and before else None


def _save(fig, path):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    io_utils.write_bytes(path, buffer.getvalue())


def markdown_table(rows, columns, formats=None):
    """A GitHub-markdown table of dict rows; `formats` maps a column to a format spec."""
    formats = formats or {}

    def cell(row, c):
        value = row.get(c)
        if value is None:
            return "-"
        return format(value, formats[c]) if c in formats else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row, c) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def markdown_section(title, header, rows):
    """A level-3 markdown title and, under it, a table of `rows` given as sequences of cells in
    `header` order (already formatted; None shows as "-")."""
    return f"\n### {title}\n\n" + markdown_table([dict(zip(header, row)) for row in rows], header)


def pareto_plot(path, points, front, markers=(), unit="ms", title="mIoU vs latency"):
    """Scatter of candidate configurations with the Pareto front drawn through.

    Args:
      points: [N, 2] array of (cost, mIoU %) for the configurations evaluated (may be subsampled).
      front: [M, 2] array of (cost, mIoU %) on the Pareto front.
      markers: (label, cost, mIoU %) triples to mark, e.g. the baseline and chosen configurations.
      unit: cost axis unit (ms or MACs).
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points, front = np.asarray(points, float).reshape(-1, 2), np.asarray(front, float).reshape(-1, 2)
    if len(points):
        ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.25, color="grey", label="configurations")
    order = np.argsort(front[:, 0])
    ax.step(front[order, 0], front[order, 1], where="post", color="C0", lw=2, label="Pareto front")
    for i, (label, cost, miou) in enumerate(markers):
        ax.scatter([cost], [miou], s=60, marker="**^Dvs"[i % 6], color=f"C{i + 1}", zorder=5, label=label)
    ax.set_xlabel(f"expected cost per image ({unit})")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def exit_distribution_plot(path, distributions):
    """Stacked bars: for each deployment, the fraction of images leaving at each of its exits.

    Args:
      distributions: {deployment name: {exit label: fraction}} (fractions of one deployment sum to 1).
    """
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.5 * len(distributions)))
    for row, (name, fractions) in enumerate(distributions.items()):
        left = 0.0
        for k, (label, fraction) in enumerate(fractions.items()):
            ax.barh(row, fraction, left=left, color=f"C{k}", edgecolor="white")
            if fraction > 0.06:
                ax.text(left + fraction / 2, row, f"{label}\n{fraction:.0%}", ha="center", va="center", fontsize=7)
            left += fraction
    ax.set_yticks(range(len(distributions)), list(distributions))
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of test images")
    ax.set_title("Where images exit")
    _save(fig, path)


def examples_plot(path, images, labels, predictions, palette, titles):
    """A grid: one row per image (input, ground truth, then each exit's prediction).

    Args:
      images: list of uint8/float [H, W, 3] RGB 0..255.
      labels: list of [H, W] class maps (255 = ignore, drawn black).
      predictions: list (per image) of lists of [H, W] class maps, one per column in `titles`.
      palette: uint8 [classes, 3].
      titles: column titles of the predictions.
    """
    palette = np.concatenate([np.asarray(palette, np.uint8), np.zeros((256 - len(palette), 3), np.uint8)])
    cols = 2 + len(titles)
    fig, axes = plt.subplots(len(images), cols, figsize=(1.6 * cols, 1.6 * len(images)), squeeze=False)
    for r, (image, label, preds) in enumerate(zip(images, labels, predictions)):
        panels = [np.asarray(image, np.uint8), palette[label]] + [palette[p] for p in preds]
        for c, panel in enumerate(panels):
            axes[r, c].imshow(panel)
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title((["image", "truth"] + list(titles))[c], fontsize=7)
    _save(fig, path)


def learning_curve_plot(path, curves, title="Validation mIoU while training"):
    """Lines of validation mIoU against training step.

    Args:
      curves: {label: [(step, mIoU %), ...]}.
    """
    fig, ax = plt.subplots(figsize=(6, 3.5))
    colours = plt.get_cmap("tab20" if len(curves) > 10 else "tab10")
    for i, (label, points) in enumerate(curves.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o", ms=3, color=colours(i % colours.N), label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=1 + len(curves) // 7)
    _save(fig, path)


def latency_breakdown_plot(path, parts, total_ms, title="Where the time goes"):
    """Horizontal bars: each part's latency as a fraction of the whole network's.

    Args:
      parts: [(label, ms)] in network order (backbone segments, then the final head), and any
        extra parts (exit heads, class maps) after them.
      total_ms: the whole network's latency (ms) the fractions are of.
    """
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.28 * len(parts)))
    labels = [label for label, _ in parts]
    fractions = [ms / total_ms for _, ms in parts]
    ax.barh(range(len(parts)), fractions, color="C0")
    for row, (fraction, (_, ms)) in enumerate(zip(fractions, parts)):
        ax.text(fraction, row, f" {fraction:.1%} ({ms:.2f} ms)", va="center", fontsize=7)
    ax.set_yticks(range(len(parts)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, max(fractions) * 1.35)
    ax.set_xlabel(f"fraction of the whole network's {total_ms:.1f} ms")
    ax.set_title(title)
    _save(fig, path)
