"""The exit policy: pixel confidence, edge-aware smoothing, image confidence, exit decision.

DESIGN.md §1.3. For one exit's logits [h, w, C] at the exit's OWN output resolution (one pixel per
`stride` input pixels, before the bilinear upsampling to the input size; a phone then spends
stride^2 times fewer pixels on the decision than at input resolution):

  1. pixel confidence: top-1 softmax probability, or 1 - H(p) / log(C) ("entropy"), both in [0, 1];
  2. edge-aware smoothing: pixels near a semantic edge of the exit's OWN prediction (argmax map)
     take the median confidence of their k x k neighbourhood, so that object boundaries, where
     every network is unsure, do not veto an otherwise confident exit. A pixel is an edge pixel
     where its predicted class differs from a 4-neighbour's (the exact edges of a label map);
     edges are dilated by `radius` pixels and the median window is k = 2 * radius + 1;
  3. image confidence: the fraction of pixels whose smoothed confidence is >= th_pix;
  4. exit if image confidence >= th_img.

Upsampled logits blur boundaries over a band of about edge_radius_per_stride * stride input
pixels; on the exit's own grid that band is ceil(edge_radius_per_stride) feature pixels (1 with
the default 1/8, whatever the stride), which is the radius used here.

With `confidence_stride` above an exit's stride, the exit decides on its logits average-pooled to
that stride first (e.g. 2x2 blocks for a stride-4 exit with confidence_stride=8): the decision
then costs (confidence_stride / stride)^2 times fewer pixels, which matters at high-resolution
exits of small networks, where the in-graph confidence is most of the dynamic-control overhead
(bench/control_breakdown.py). The class map itself is unchanged.

There is one numpy implementation (used by calibration) and one TensorFlow implementation (`*_tf`,
batched [B, H, W, C], pure TF ops that TFLite converts: slicing, min/max, max_pool2d, avg_pool2d,
MIRROR_PAD) used inside Keras models and exported graphs; tests/test_policy.py proves they agree.
Decisions never see labels.
"""
import dataclasses
import math

import numpy as np
import tensorflow as tf

CONFIDENCES = ("top1", "entropy")


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """How confidence is measured.

    Attributes:
      confidence: "top1" (max softmax probability) or "entropy" (1 - H / log C).
      edge_smoothing: replace the confidence of pixels near predicted edges by the median of
        their neighbourhood.
      edge_radius_per_stride: edge band half-width in input pixels per unit of the exit's
        output stride (i.e. in feature pixels, rounded up).
      confidence_stride: the finest stride (input pixels per pixel, a power of two) a decision is
        made at; exits finer than it decide on average-pooled logits. 1: every exit decides at
        its own resolution.
      class_map_stride: input pixels per pixel of the class map an exported model outputs (a
        power of two): its logits are resized to input / class_map_stride and their argmax taken
        there; the app upsamples the class indices by nearest neighbour (export.upsample_class_map),
        as it would on its GPU. 1: the argmax at the input size. Not part of the decision, but it
        changes what the class maps score and cost, so it travels with the policy (calibration
        caches, latency tables, deployments).
    """

    confidence: str = "top1"
    edge_smoothing: bool = True
    edge_radius_per_stride: float = 0.125
    confidence_stride: int = 1
    class_map_stride: int = 1

    def __post_init__(self):
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"policy confidence {self.confidence!r} is not one of {CONFIDENCES}")
        if self.edge_radius_per_stride <= 0:
            raise ValueError(f"edge_radius_per_stride must be > 0, got {self.edge_radius_per_stride}")
        for name in ("confidence_stride", "class_map_stride"):
            stride = getattr(self, name)
            if not isinstance(stride, int) or stride < 1 or stride & (stride - 1):
                raise ValueError(f"{name} must be a power of two >= 1 (input pixels per pixel), got {stride!r}")

    def pooling(self, stride, size):
        """Logit pixels averaged per decision pixel along each axis for an exit at `stride`
        whose logits are `size` (H, W) pixels.

        Returns:
          int >= 1: max(1, confidence_stride // stride).
        Raises:
          ValueError: H or W is not a multiple of the pooling factor.
        """
        factor = max(1, self.confidence_stride // stride)
        if size[0] % factor or size[1] % factor:
            raise ValueError(f"confidence_stride={self.confidence_stride} pools the stride-{stride} logits "
                             f"{size[0]}x{size[1]} by {factor}, which does not divide them")
        return factor

    def radius(self, stride):
        """Edge band half-width and median window radius in FEATURE pixels for an exit at `stride`.

        The band of edge_radius_per_stride * stride input pixels spans edge_radius_per_stride
        feature pixels at any stride (rounded up, at least 1)."""
        del stride  # cancels out: the band is a fixed number of the exit's own pixels
        return max(1, math.ceil(self.edge_radius_per_stride))

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


# ---- numpy (calibration) ----------------------------------------------------------------------

def _softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def pixel_confidence(logits, cfg=PolicyConfig()):
    """Per-pixel confidence in [0, 1].

    Args:
      logits: float [H, W, C] (or any leading dims) class logits.
      cfg: PolicyConfig.
    Returns:
      float32 [H, W].
    """
    probs = _softmax(np.asarray(logits, np.float32))
    if cfg.confidence == "top1":
        return probs.max(axis=-1)
    entropy = -np.sum(probs * np.log(np.maximum(probs, np.float32(1e-12))), axis=-1)
    return (1.0 - entropy / np.float32(np.log(probs.shape[-1]))).astype(np.float32)


def edge_mask(pred, radius):
    """Pixels within `radius` (Chebyshev distance) of a predicted class boundary.

    Args:
      pred: int [H, W] predicted label map.
    Returns:
      bool [H, W].
    """
    horizontal = pred[:, 1:] != pred[:, :-1]
    vertical = pred[1:, :] != pred[:-1, :]
    edges = np.zeros(pred.shape, bool)
    edges[:, 1:] |= horizontal
    edges[:, :-1] |= horizontal
    edges[1:, :] |= vertical
    edges[:-1, :] |= vertical
    k = 2 * radius + 1
    padded = np.pad(edges, radius)
    return np.lib.stride_tricks.sliding_window_view(padded, (k, k)).any(axis=(-2, -1))


def smooth_confidence(conf, pred, stride, cfg=PolicyConfig()):
    """Edge-aware median smoothing of a confidence map.

    Args:
      conf: float [H, W] pixel confidence.
      pred: int [H, W] the exit's own argmax prediction.
      stride: the exit's output stride (input pixels per pixel of conf).
    Returns:
      float32 [H, W]: conf, with pixels near predicted edges replaced by the median of their
      (2r+1) x (2r+1) neighbourhood (reflect padding at the image border).
    """
    conf = np.asarray(conf, np.float32)
    if not cfg.edge_smoothing:
        return conf
    radius = cfg.radius(stride)
    near_edge = edge_mask(pred, radius)
    k = 2 * radius + 1
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(conf, radius, mode="reflect"), (k, k))
    out = conf.copy()
    # Median of an odd count is the middle order statistic; computed only where it is used.
    out[near_edge] = np.median(windows[near_edge].reshape(-1, k * k), axis=-1)
    return out


def smoothed_confidence(logits, stride, cfg=PolicyConfig()):
    """pixel_confidence then smooth_confidence with the logits' own argmax, on the logits pooled
    to cfg.confidence_stride. [H, W, C] -> [H / f, W / f] with f = cfg.pooling(stride, (H, W))."""
    logits = np.asarray(logits, np.float32)
    factor = cfg.pooling(stride, logits.shape[:2])
    if factor > 1:
        h, w, c = logits.shape
        logits = logits.reshape(h // factor, factor, w // factor, factor, c).mean(axis=(1, 3), dtype=np.float32)
    return smooth_confidence(pixel_confidence(logits, cfg), logits.argmax(axis=-1), stride * factor, cfg)


def image_confidence(logits, th_pix, stride, cfg=PolicyConfig()):
    """Fraction of pixels whose smoothed confidence is >= th_pix. [H, W, C] logits -> float."""
    return float(np.mean(smoothed_confidence(logits, stride, cfg) >= np.float32(th_pix)))


def confidence_fractions(logits, stride, th_pix_grid, cfg=PolicyConfig()):
    """image_confidence for every th_pix of a grid in one pass (one sort).

    Args:
      logits: float [H, W, C].
      th_pix_grid: float [P] pixel thresholds.
    Returns:
      float64 [P]: fraction of pixels with smoothed confidence >= th_pix_grid[p].
    """
    conf = np.sort(smoothed_confidence(logits, stride, cfg).ravel())
    below = np.searchsorted(conf, np.asarray(th_pix_grid, np.float32), side="left")
    return (conf.size - below) / conf.size


def should_exit(image_conf, th_img):
    """The exit decision: image confidence >= th_img."""
    return image_conf >= th_img


# ---- TensorFlow (in-graph, batched, TFLite-convertible) -----------------------------------------

def pixel_confidence_tf(logits, cfg=PolicyConfig()):
    """[B, H, W, C] logits -> [B, H, W] float32 confidence (see pixel_confidence)."""
    logits = tf.cast(logits, tf.float32)
    probs = tf.nn.softmax(logits, axis=-1)
    if cfg.confidence == "top1":
        return tf.reduce_max(probs, axis=-1)
    entropy = -tf.reduce_sum(probs * tf.math.log(tf.maximum(probs, 1e-12)), axis=-1)
    return 1.0 - entropy / float(np.log(float(logits.shape[-1])))


def edge_mask_tf(pred, radius):
    """[B, H, W] int label maps -> [B, H, W] float32, 1 within `radius` of a class boundary."""
    horizontal = tf.cast(tf.not_equal(pred[:, :, 1:], pred[:, :, :-1]), tf.float32)
    vertical = tf.cast(tf.not_equal(pred[:, 1:, :], pred[:, :-1, :]), tf.float32)
    edges = tf.maximum(
        tf.maximum(tf.pad(horizontal, [[0, 0], [0, 0], [1, 0]]), tf.pad(horizontal, [[0, 0], [0, 0], [0, 1]])),
        tf.maximum(tf.pad(vertical, [[0, 0], [1, 0], [0, 0]]), tf.pad(vertical, [[0, 0], [0, 1], [0, 0]])))
    k = 2 * radius + 1
    return tf.nn.max_pool2d(edges[..., None], ksize=k, strides=1, padding="SAME")[..., 0]


def _sorting_network(n):
    """Compare-exchange pairs (i, j), i < j, that sort n values ascending: Batcher's odd-even
    merge sort on the next power of two, without the pairs that touch the padding (padding
    values sort last as +inf, so those pairs never swap)."""
    size = 1 << max(n - 1, 0).bit_length()
    pairs, p = [], 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


def _median_filter_tf(conf, radius):
    """[B, H, W] -> [B, H, W] median of each (2r+1)^2 window (reflect padding).

    The k*k shifted slices go through a sorting network of elementwise minimum/maximum ops,
    which XNNPACK runs fast; the converter drops the ops the median does not need. (top_k over
    stacked windows gives the same values at about twice the cost in TFLite.)
    """
    k = 2 * radius + 1
    height, width = conf.shape[1], conf.shape[2]
    padded = tf.pad(conf, [[0, 0], [radius, radius], [radius, radius]], mode="REFLECT")
    values = [padded[:, i:i + height, j:j + width] for i in range(k) for j in range(k)]
    for i, j in _sorting_network(len(values)):
        values[i], values[j] = tf.minimum(values[i], values[j]), tf.maximum(values[i], values[j])
    return values[len(values) // 2]


def smooth_confidence_tf(conf, pred, stride, cfg=PolicyConfig()):
    """Batched smooth_confidence: conf [B, H, W], pred [B, H, W] int -> [B, H, W]."""
    if not cfg.edge_smoothing:
        return conf
    radius = cfg.radius(stride)
    near_edge = edge_mask_tf(pred, radius) > 0.5
    return tf.where(near_edge, _median_filter_tf(conf, radius), conf)


def smoothed_confidence_tf(logits, stride, cfg=PolicyConfig()):
    """[B, H, W, C] logits -> [B, H / f, W / f] smoothed confidence (see smoothed_confidence)."""
    factor = cfg.pooling(stride, logits.shape[1:3])
    if factor > 1:
        logits = tf.nn.avg_pool2d(logits, factor, factor, "VALID")
    pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return smooth_confidence_tf(pixel_confidence_tf(logits, cfg), pred, stride * factor, cfg)


def image_confidence_tf(logits, th_pix, stride, cfg=PolicyConfig()):
    """[B, H, W, C] logits -> [B] float32 fraction of pixels with smoothed confidence >= th_pix.

    A sequence of P thresholds gives [B, P], one smoothing shared by all (the calibration models
    compute each threshold's fraction with the ops a deployed model runs for one)."""
    smoothed = smoothed_confidence_tf(logits, stride, cfg)

    def fraction(th):
        return tf.reduce_mean(tf.cast(smoothed >= th, tf.float32), axis=[1, 2])

    if np.ndim(th_pix) == 0:
        return fraction(th_pix)
    return tf.stack([fraction(float(th)) for th in th_pix], axis=-1)


def should_exit_tf(image_conf, th_img):
    """[B] image confidence -> [B] bool exit decisions (>= th_img)."""
    return image_conf >= th_img
