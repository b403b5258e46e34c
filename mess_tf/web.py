"""The staged model in a web page (web/, LiteRT.js): serving it, and driving it in headless Chromium.

The page runs a staged model as runtime.StagedModel does, with LiteRT.js's WebAssembly build, so
it is a second, independent runtime of the same file and metadata. Here:
  * `serve`: the page (web/) and a folder of models on 127.0.0.1, the models at /models/;
  * `Page`: the page in the system's Chromium, driven by web/drive.mjs (puppeteer-core), with the
    page's own actions (load a model, segment an image, time the signatures, screenshot).

    with web.serve(models_dir) as url, web.Page(url) as page:
        page.load_model("models/model.tflite")
        result = page.segment("models/images/a.png", mode="dynamic")
"""
import base64
import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
import urllib.parse

import numpy as np

from mess_tf import export, io_utils, visualize

WEB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "web")
MODELS_PREFIX = "/models/"
INSTALL = "apt-get install -y chromium nodejs npm && (cd web && npm ci)"
INDEX = "index.json"  # {"models": [file names], "images": [file names in images/]}: what the page offers
# Precisions a run's models are exported in for the page, with the boundary type LiteRT.js reads.
PAGE_EXPORTS = (("int8", "uint8"), ("float32", "int8"))


def missing():
    """What the page's tests need and this machine lacks, as one sentence naming the command that
    installs it; None when Chromium, node and web/node_modules are all there."""
    lacking = [name for name, present in (("chromium", shutil.which("chromium")), ("node", shutil.which("node")),
                                          ("web/node_modules", os.path.isdir(os.path.join(WEB_DIR, "node_modules"))))
               if not present]
    return f"{', '.join(lacking)} not found; install with: {INSTALL}" if lacking else None


class _Handler(http.server.SimpleHTTPRequestHandler):
    """web/ at /, `models_dir` at /models/; quiet (a library prints nothing)."""

    def __init__(self, *args, models_dir, **kwargs):
        self.models_dir = models_dir
        super().__init__(*args, directory=WEB_DIR, **kwargs)

    def translate_path(self, path):
        path = urllib.parse.unquote(path.split("?", 1)[0].split("#", 1)[0])
        if path.startswith(MODELS_PREFIX):
            relative = os.path.normpath(path[len(MODELS_PREFIX):]).lstrip("/")
            if relative.startswith(".."):
                return os.path.join(self.models_dir, "\0")  # outside the folder: not found
            return os.path.join(self.models_dir, relative)
        return super().translate_path(path)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(models_dir, port=0, host="127.0.0.1"):
    """Serves the page and `models_dir` in a background thread.

    Args:
      models_dir: folder served at /models/ (staged models with their .json, images/, index.json).
      port: TCP port (0: any free one).

    Yields:
      the page's URL, e.g. http://127.0.0.1:8000/.
    """
    server = http.server.ThreadingHTTPServer(
        (host, port), functools.partial(_Handler, models_dir=os.path.abspath(models_dir)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class PageError(RuntimeError):
    """The browser or the page failed (not bad input: that comes back as the page's status)."""


class Page:
    """The page at `url` in headless Chromium; a context manager that closes the browser.

    Args:
      url: the page (from `serve`).
      log_path: where the page's console and the driver's messages go (default: discarded).
    """

    def __init__(self, url, log_path=None):
        reason = missing()
        if reason:
            raise PageError(reason)
        self._log = open(log_path or os.devnull, "w")
        self._process = subprocess.Popen(["node", os.path.join(WEB_DIR, "drive.mjs"), url], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._log, text=True)
        self._answer()  # "ready": LiteRT.js is loaded

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._process.stdin.close()
        self._process.wait(timeout=30)
        self._log.close()

    def _answer(self):
        line = self._process.stdout.readline()
        if not line:
            raise PageError(f"the browser driver exited (status {self._process.wait()}); see its log")
        answer = json.loads(line)
        if "error" in answer:
            raise PageError(answer["error"])
        return answer["result"]

    def call(self, method, *args):
        """window.mess[method](*args) in the page (or "screenshot"), its JSON-able result."""
        self._process.stdin.write(json.dumps({"method": method, "args": list(args)}) + "\n")
        self._process.stdin.flush()
        return self._answer()

    def status(self):
        """The page's status line: {"text": ..., "kind": "" | "note" | "error"}."""
        return self.call("status")

    def load_model(self, url):
        """Loads the model at `url` (relative to the page) and its metadata (`url`.json).

        Returns:
          {precision, mode, exits, thresholds, inputSize, signatures}, or None for bad input
          (then status() says why).
        """
        return self.call("loadModel", url)

    def segment(self, image_url, mode=None, exit_index=None, deadline_ms=None):
        """Segments the image at `image_url` as a person would on the page.

        Returns:
          None for bad input (status() says why), else a dict like runtime.ExitResult:
          class_map (uint8 [H, W]), exit_index, exit_id, confidences (float32 values),
          stage_ms, total_ms, deadline_met.
        """
        result = self.call("segment", image_url, {"mode": mode, "exitIndex": exit_index, "deadlineMs": deadline_ms})
        if result is None:
            return None
        class_map = np.frombuffer(base64.b64decode(result["classMap"]), np.uint8).reshape(result["shape"])
        return {"class_map": class_map, "exit_index": result["exitIndex"], "exit_id": result["exitId"],
                "confidences": result["confidences"], "stage_ms": result["stageMs"], "total_ms": result["totalMs"],
                "deadline_met": result["deadlineMet"]}

    def time_signatures(self, image_url, runs):
        """{signature: median ms} over `runs` runs (after one warm-up), each signature fed its real
        inputs on the image (stages chained), in the page's LiteRT.js (WebAssembly, 1 thread)."""
        return self.call("timeSignatures", image_url, runs)

    def screenshot(self, path):
        """Writes a PNG of the whole page to `path` (atomically: the browser writes a temporary
        file beside it, renamed over `path`)."""
        path = os.path.abspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp.png"
        try:
            self.call("screenshot", temporary)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)


def export_run(exp, out_dir, num_images=8):
    """Exports every distinct model of a finished experiment for the page, once: int8 with uint8
    boundaries (LiteRT.js has no int8 tensors) and float32, and copies some test images.

    Args:
      exp: experiment.Experiment of the run (its configs, checkpoints and data).
      out_dir: folder to fill: <model>_<precision>.tflite (+ .json), images/, index.json.
      num_images: test images to copy.

    Returns:
      the index written: {"models": [...], "images": [...]}.
    """
    names, images, _ = exp.split_arrays("test")
    for name, image in zip(names[:num_images], images[:num_images]):
        path = os.path.join(out_dir, "images", f"{name}.png")
        if not os.path.exists(path):
            visualize.save_png(path, image.astype(np.uint8))
    calibration = None
    models = []
    for key, stage, config, same in exp.models():
        if same != key:
            continue  # the same model as an earlier one
        for precision, integer_io in PAGE_EXPORTS:
            path = os.path.join(out_dir, f"{key}_{precision}.tflite")
            models.append(os.path.basename(path))
            if os.path.exists(export.metadata_path(path)):
                continue
            if calibration is None:
                calibration = list(exp.split_arrays("calibration")[1][:exp.preset.quantization_images])
            export.export_staged_model(path, exp.load(stage), config, precision, calibration,
                                       policy_config=exp.policy(), class_names=exp.dataset().info.class_names,
                                       integer_io=integer_io)
            exp.progress(f"exported {path}")
    index = {"models": models, "images": [f"{n}.png" for n in names[:num_images]]}
    io_utils.write_json(os.path.join(out_dir, INDEX), index)
    return index
