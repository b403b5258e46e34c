"""Dataset readers by name: get_dataset("cityscapes", "/data/cityscapes")."""
from mess_tf.data import ade20k, cityscapes, folder, voc

DATASETS = ("demo", "folder", "cityscapes", "voc", "ade20k")


def get_dataset(name, data_dir, **kwargs):
    """The reader `name` (one of DATASETS) over `data_dir`. Returns a dataset.Dataset.

    "demo" is the generic folder layout written by mess_tf.data.demo.generate. kwargs go to the
    reader (skip_bad, calibration_source, calibration_fraction).
    """
    if name in ("demo", "folder"):
        return folder.FolderDataset(data_dir, name=name, **kwargs)
    readers = {"cityscapes": cityscapes.CityscapesDataset, "voc": voc.VOCDataset, "ade20k": ade20k.ADE20KDataset}
    if name not in readers:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return readers[name](data_dir, **kwargs)
