"""Runs a staged MESS model (made by export.export_staged_model) with the LiteRT interpreter.

The model really skips work: each stage is its own signature, so an image that exits early never
runs the later stages, and an early exit's class map is its own signature too, run only when an
image leaves there (or when anytime mode shows it). Modes:
  * "budgeted": run the stages up to one exit (a budgeted export has exactly one stage);
  * "dynamic":  run stage after stage; stop at the first early exit whose image confidence
    (computed inside the model) reaches its th_img; otherwise the final exit;
  * "anytime":  every exit's class map as it is produced (`anytime`); with a deadline, `run`
    returns the latest map finished within it.

    model = StagedModel.load("model.tflite")
    result = model.run(image)               # the mode the model was exported for
    result.class_map, result.exit_index, result.stage_ms, result.total_ms
"""
import dataclasses
import math
import os
import time

import numpy as np
from PIL import Image

from mess_tf import export, io_utils
from mess_tf.data import dataset, files, pipeline
from mess_tf.deployment import MODES


@dataclasses.dataclass
class ExitResult:
    """What one image got.

    Attributes:
      class_map: uint8 [H, W] class indices of the exit taken.
      exit_index: 0-based index of that exit into `StagedModel.exit_ids`.
      exit_id: its id (`position:head_id`, or "final").
      confidences: image confidence of each early exit run, in order (fractions in [0, 1]).
      stage_ms: wall time of each stage run (ms), including quantise/dequantise at the boundaries.
      total_ms: wall time from the call to the result (ms).
      deadline_met: anytime with a deadline: whether the map was finished within it.
    """

    class_map: np.ndarray
    exit_index: int
    exit_id: str
    confidences: list
    stage_ms: list
    total_ms: float
    deadline_met: bool = True


class StagedModel:
    """A staged .tflite and its metadata, ready to run.

    Args:
      model_path: the .tflite file.
      metadata: its metadata dict (export.staged_metadata).
      num_threads: interpreter threads (None: LiteRT's default).
      full_resolution: a model exported with class_map_stride > 1 outputs class maps at
        1 / class_map_stride of the input size; True upsamples them to the input size (nearest
        neighbour, export.upsample_class_map), False returns them as the model gives them, for
        an app that upsamples on its GPU.
    """

    def __init__(self, model_path, metadata, num_threads=None, full_resolution=True):
        from ai_edge_litert.interpreter import Interpreter

        self.metadata = metadata
        stride = metadata.get("class_map", {}).get("stride", 1)
        self._upsampling = stride if full_resolution else 1
        self.stages = [export.Stage(**{**s, "inputs": tuple(s["inputs"]), "features": tuple(s["features"])})
                       for s in metadata["stages"]]
        self.interpreter = Interpreter(model_path=str(model_path), num_threads=num_threads)
        self._runners = [self.interpreter.get_signature_runner(s.signature) for s in self.stages]
        self._class_map_runners = [
            s.class_map_signature and self.interpreter.get_signature_runner(s.class_map_signature)
            for s in self.stages]
        self._image_detail = self._runners[0].get_input_details()["image"]
        self._confidence_details = [runner.get_output_details()[export.CONFIDENCE] if stage.is_early_exit else None
                                    for stage, runner in zip(self.stages, self._runners)]

    @classmethod
    def load(cls, path, num_threads=None, full_resolution=True):
        """Loads MODEL.tflite and MODEL.tflite.json beside it."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"staged model not found: {path}")
        return cls(path, io_utils.read_json(export.metadata_path(path), "staged-model metadata"), num_threads,
                   full_resolution)

    @property
    def mode(self):
        return self.metadata["mode"]

    @property
    def exit_ids(self):
        return [s.exit_id for s in self.stages]

    @property
    def input_size(self):
        return tuple(self.metadata["input"]["size"])

    @property
    def thresholds(self):
        """th_img of each early exit, in order."""
        return [s.th_img for s in self.stages if s.is_early_exit]

    def _image(self, image):
        image = np.asarray(image)
        if image.ndim == 3:
            image = image[None]
        if image.shape != (1, *self.input_size, 3):
            raise ValueError(f"image has shape {image.shape}; this model takes one RGB 0..255 image "
                             f"[{self.input_size[0]}, {self.input_size[1]}, 3]")
        return quantise(image.astype(np.float32), self._image_detail)

    def anytime(self, image, th_img=None, stop_early=False):
        """Runs the stages in order, yielding an ExitResult after each exit.

        Args:
          image: RGB 0..255 [H, W, 3] (uint8 or float) at the model's input size.
          th_img: image thresholds of the early exits (default the exported ones).
          stop_early: stop after the first early exit whose confidence reaches its threshold
            (dynamic mode), computing the class map of that exit only; otherwise run every
            stage and every exit's class map.

        Yields:
          ExitResult for each exit as it is produced (stop_early: only the exit taken);
          total_ms counts from the call; stage_ms includes a class map's signature when run.
        """
        thresholds = self._thresholds(th_img)
        start = time.perf_counter()
        available, confidences, stage_ms = {"image": self._image(image)}, [], []
        for k, stage in enumerate(self.stages):
            stage_start = time.perf_counter()
            outputs = self._runners[k](**{name: available[name] for name in stage.inputs})
            if stage.is_early_exit:
                confidence = dequantise(outputs[export.CONFIDENCE], self._confidence_details[k])
                confidences.append(float(confidence.reshape(-1)[0]))
            leaves = stop_early and stage.is_early_exit and confidences[-1] >= thresholds[k]
            if stop_early and not leaves and k + 1 < len(self.stages):
                class_map = None  # passing on: this exit's class map is never shown
            elif stage.class_map_signature:
                class_map = self._class_map_runners[k](**{export.COARSE_LOGITS: outputs[export.COARSE_LOGITS]})
                class_map = class_map[export.CLASS_MAP][0]
            else:
                class_map = outputs[export.CLASS_MAP][0]
            if class_map is not None:
                class_map = export.upsample_class_map(class_map, self._upsampling)
            available.update({name: outputs[name] for name in stage.features})  # kept for any later stage
            now = time.perf_counter()
            stage_ms.append((now - stage_start) * 1e3)
            if class_map is not None:
                yield ExitResult(class_map, k, stage.exit_id, list(confidences), list(stage_ms), (now - start) * 1e3)
            if leaves:
                return

    def run(self, image, mode=None, th_img=None, exit_index=None, deadline_ms=None):
        """Segments one image.

        Args:
          image: RGB 0..255 [H, W, 3] at the model's input size.
          mode: one of MODES (default the exported mode).
          th_img: dynamic: image thresholds of the early exits (default the exported ones).
          exit_index: budgeted: the exit to stop at (default the last stage's).
          deadline_ms: anytime: return the latest map finished within this many ms (a stage is
            never interrupted; if even the first misses it, the first map, with
            deadline_met=False). None: run to the final exit.

        Returns:
          ExitResult.
        """
        mode = mode or self.mode
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        if mode == "budgeted":
            last = len(self.stages) - 1 if exit_index is None else exit_index
            if not 0 <= last < len(self.stages):
                raise ValueError(f"exit_index={exit_index} is out of range: the model has exits {self.exit_ids}")
            # Exit `last` as a dynamic run whose earlier exits never pass and whose exit `last`
            # always does: only that exit's class map is computed.
            th_img = [-np.inf if k == last else np.inf for k in range(len(self.thresholds))]
            *_, result = self.anytime(image, th_img, stop_early=True)
            return result
        if mode == "dynamic":
            *_, result = self.anytime(image, th_img, stop_early=True)
            return result
        latest = None
        for result in self.anytime(image):
            if deadline_ms is not None and result.total_ms > deadline_ms:
                if latest is None:
                    result.deadline_met = False
                    return result
                return latest
            latest = result
        return latest

    def segment(self, image, **run_args):
        """Segments an image of any size: letterboxed into the input size (aspect ratio kept,
        padded), run as `run(image, **run_args)`, and its class map returned at the image's size.

        Args:
          image: uint8 [h, w, 3] RGB.

        Returns:
          ExitResult whose class_map is uint8 [h, w].
        """
        boxed, inner = letterbox(image, self.input_size)
        result = self.run(boxed, **run_args)
        result.class_map = unletterbox(result.class_map, inner, self.input_size, image.shape[:2])
        return result

    def _thresholds(self, th_img):
        """th_img per stage (None for the final stage), from the argument or the metadata."""
        exported = [s.th_img for s in self.stages]
        if th_img is None:
            return exported
        th_img = list(th_img)
        if len(th_img) != len(self.thresholds):
            raise ValueError(f"{len(th_img)} image thresholds given; the model has "
                             f"{len(self.thresholds)} early exits")
        return th_img + [None] * (len(exported) - len(th_img))


def in_turns(models, images):
    """Runs every model on every image, the models taking turns image by image in a rotating
    order, so that drift in the host's speed hits them alike and latency ratios are side by side.

    Args:
      models: {key: StagedModel}.
      images: iterable of RGB 0..255 images [H, W, 3].

    Yields:
      (image index, key, ExitResult of model `key` in its exported mode).
    """
    keys = list(models)
    for i, image in enumerate(images):
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:
            yield i, key, models[key].run(image)


def quantise(x, detail):
    """float -> a tensor's dtype (detail: a LiteRT tensor detail), with its quantisation parameters
    if it is integer."""
    scale, zero_point = detail["quantization"]
    if detail["dtype"] == np.float32 or scale == 0:
        return x.astype(detail["dtype"])
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(detail["dtype"])


def dequantise(x, detail):
    """The tensor's values as float32 (integer tensors dequantised with their scale and zero point)."""
    scale, zero_point = detail["quantization"]
    if detail["dtype"] == np.float32 or scale == 0:
        return np.asarray(x, np.float32)
    return (np.asarray(x, np.float32) - zero_point) * scale


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def image_files(folder):
    """The image files under `folder`, recursively, sorted by name.

    Returns:
      list of (name, path); the name is the path relative to `folder` without its extension
      ("frankfurt/frankfurt_000000_000294_leftImg8bit").
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    found = dataset.files_by_stem(folder, IMAGE_EXTENSIONS)
    if not found:
        raise ValueError(f"image folder {folder} holds no {'/'.join(IMAGE_EXTENSIONS)} files")
    return sorted(found.items())


def read_images(folder, input_size):
    """Reads the images under a folder (see image_files), RGB, resized to `input_size` (H, W)
    without keeping their aspect ratio (calibration data; use letterbox to segment).

    Returns:
      list of (name, float32 [H, W, 3] array, RGB 0..255).
    """
    height, width = input_size
    return [(name, np.asarray(Image.fromarray(files.load_image(path)).resize((width, height), Image.BILINEAR),
                              np.float32)) for name, path in image_files(folder)]


def letterbox(image, size):
    """Fits an image of any size into `size` with its aspect ratio kept.

    The image is scaled by min(H / h, W / w) (bilinear), placed at the top left, and the rest is
    padded with the training pipeline's mid-grey (whose pixels training labels as ignored).

    Args:
      image: uint8 [h, w, 3] RGB.
      size: (H, W) in pixels, the model's input size.

    Returns:
      (float32 [H, W, 3] RGB 0..255, (h', w'): the scaled image's size inside it, in pixels).
    """
    (h, w), (height, width) = image.shape[:2], size
    scale = min(height / h, width / w)
    inner = (min(height, max(1, round(h * scale))), min(width, max(1, round(w * scale))))
    boxed = np.full((height, width, 3), pipeline.IMAGE_PAD_VALUE, np.float32)
    boxed[:inner[0], :inner[1]] = np.asarray(Image.fromarray(image).resize((inner[1], inner[0]), Image.BILINEAR))
    return boxed, inner


def unletterbox(class_map, inner, size, original_size):
    """The class map of a letterboxed image, cropped to the image and resized to its original size.

    Args:
      class_map: uint8 [H / s, W / s]: the model's class map, at its input size or at
        1 / class_map_stride of it.
      inner: (h', w') from letterbox.
      size: (H, W), the model's input size.
      original_size: (h, w) of the image, in pixels.

    Returns:
      uint8 [h, w] class indices (nearest neighbour: no class is invented at a boundary).
    """
    rows, cols = (math.ceil(n * m / s) for n, m, s in zip(inner, class_map.shape, size))
    crop = np.ascontiguousarray(class_map[:rows, :cols])
    return np.asarray(Image.fromarray(crop).resize((original_size[1], original_size[0]), Image.NEAREST))
