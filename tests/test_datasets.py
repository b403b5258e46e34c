"""Dataset readers on tiny trees in each official layout, the calibration carve-out, and bad input."""
import os

import numpy as np
import pytest
from PIL import Image

from mess_tf import visualize
from mess_tf.data import ade20k, cityscapes, files, folder, registry, voc


def _write_image(path, height=8, width=12, mode="RGB", seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels else (height, width)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _write_label(path, array, palette=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(visualize.encode_png(np.asarray(array, np.uint8), palette))


def _folder_tree(root, splits=("train", "calibration"), per_split=3, num_classes=3):
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("".join(f"class{c}\n" for c in range(num_classes)))
    for split in splits:
        for i in range(per_split):
            _write_image(os.path.join(root, "images", split, f"{split}{i}.png"), seed=i)
            _write_label(os.path.join(root, "labels", split, f"{split}{i}.png"), np.full((8, 12), i % num_classes))
    return root


def test_cityscapes_label_ids_map_to_train_ids_and_label_train_ids_are_preferred(tmp_path):
    raw = np.array([[7, 8, 11, 33], [0, 6, 14, 255]], np.uint8)  # road sidewalk building bicycle / void...
    _write_image(str(tmp_path / "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png"), 2, 4)
    _write_label(tmp_path / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png", raw)
    _write_image(str(tmp_path / "leftImg8bit/val/bonn/bonn_000001_000019_leftImg8bit.png"), 2, 4)
    _write_label(tmp_path / "gtFine/val/bonn/bonn_000001_000019_gtFine_labelIds.png", raw)
    _write_label(tmp_path / "gtFine/val/bonn/bonn_000001_000019_gtFine_labelTrainIds.png", np.full((2, 4), 5))
    dataset = registry.get_dataset("cityscapes", str(tmp_path))
    first, second = dataset.samples("val")
    assert first.name == "aachen_000000_000019" and dataset.info.num_classes == 19
    np.testing.assert_array_equal(files.load_label(first.label_path, dataset.info),
                                  [[0, 1, 2, 18], [255, 255, 255, 255]])
    assert second.label_path.endswith("_labelTrainIds.png")
    np.testing.assert_array_equal(files.load_label(second.label_path, dataset.info), np.full((2, 4), 5))


def test_cityscapes_tables_match_the_official_scripts():
    from cityscapesscripts.helpers.labels import labels
    official = sorted((l.trainId, l.name, l.id, l.color) for l in labels if 0 <= l.trainId < 255)
    ours = [(t, name, label_id, rgb) for t, (name, label_id, rgb) in enumerate(cityscapes.CLASSES)]
    assert ours == official
    lookup = cityscapes.INFO.label_map("x_gtFine_labelIds.png")
    for l in labels:
        if l.id >= 0:
            assert lookup[l.id] == (255 if l.trainId in (-1, 255) else l.trainId), l.name


def test_voc_palette_pngs_decode_to_indices_with_border_ignored(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    label = np.array([[0, 15, 15, 255], [255, 1, 20, 0]], np.uint8)  # background person person border ...
    for image_id in ("2007_000032", "2007_000033", "2008_000001"):
        _write_image(str(root / "JPEGImages" / f"{image_id}.jpg"), 2, 4)
        _write_label(root / "SegmentationClass" / f"{image_id}.png", label, voc.INFO.palette)
    _write_label(root / "SegmentationClassAug" / "2008_000001.png", np.full((2, 4), 7))
    os.makedirs(root / "ImageSets" / "Segmentation")
    for split, ids in {"train": ["2007_000032", "2008_000001"], "val": ["2007_000033"],
                       "train_aug": ["2008_000001"]}.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    assert Image.open(root / "SegmentationClass" / "2007_000032.png").mode == "P"
    dataset = registry.get_dataset("voc", str(tmp_path), calibration_fraction=0.5)
    assert dataset.splits == ("train", "train_aug", "val", "calibration")
    [val] = dataset.samples("val")
    np.testing.assert_array_equal(files.load_label(val.label_path, dataset.info), label)
    [aug] = registry.get_dataset("voc", str(tmp_path), calibration_source="val").samples("train_aug")
    np.testing.assert_array_equal(files.load_label(aug.label_path, dataset.info), np.full((2, 4), 7))
    [calibration] = dataset.samples("calibration")
    assert calibration.name == "2008_000001" and calibration.name not in {s.name for s in dataset.samples("train")}
    with pytest.raises(ValueError, match="split 'train_aug' has no samples left once the calibration split is carved"):
        dataset.samples("train_aug")  # its one sample went to calibration


def test_ade20k_zero_is_ignored_and_classes_shift_down(tmp_path):
    raw = np.array([[0, 1, 150, 13]], np.uint8)
    for split in ("training", "validation"):
        _write_image(str(tmp_path / "images" / split / f"ADE_{split}_00000001.jpg"), 1, 4)
        _write_label(tmp_path / "annotations" / split / f"ADE_{split}_00000001.png", raw)
    dataset = registry.get_dataset("ade20k", str(tmp_path))
    assert dataset.info.num_classes == 150 and dataset.info.class_names[12] == "person"
    [sample] = dataset.samples("val")
    np.testing.assert_array_equal(files.load_label(sample.label_path, dataset.info), [[255, 0, 149, 12]])
    with pytest.raises(ValueError, match=r"\[151\] outside the ade20k class set"):
        _write_label(tmp_path / "annotations" / "validation" / "ADE_validation_00000001.png", [[151]])
        files.load_label(sample.label_path, dataset.info)


def test_calibration_is_carved_deterministically_off_train_never_test(tmp_path):
    root = _folder_tree(str(tmp_path), splits=("train", "val", "test"), per_split=20)
    dataset = registry.get_dataset("folder", root, calibration_fraction=0.25)
    calibration = [s.name for s in dataset.samples("calibration")]
    assert len(calibration) == 5 and all(n.startswith("train") for n in calibration)
    assert calibration == [s.name for s in registry.get_dataset("folder", root, calibration_fraction=0.25)
                           .samples("calibration")]
    assert len(dataset.samples("train")) == 15 and not set(calibration) & {s.name for s in dataset.samples("train")}
    assert len(dataset.samples("val")) == 20 and len(dataset.samples("test")) == 20
    from_val = registry.get_dataset("folder", root, calibration_source="val")
    assert len(from_val.samples("calibration")) == 2 and len(from_val.samples("val")) == 18
    with pytest.raises(ValueError, match="never come from the test split"):
        registry.get_dataset("folder", root, calibration_source="test")
    with pytest.raises(ValueError, match="unknown split 'training'; valid splits: test, train, val, calibration"):
        dataset.samples("training")
    with pytest.raises(ValueError, match="unknown dataset 'coco'"):
        registry.get_dataset("coco", root)


def test_missing_folders_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="cityscapes dataset folder not found: .*nowhere"):
        registry.get_dataset("cityscapes", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="classes file not found"):
        registry.get_dataset("folder", str(tmp_path))
    os.makedirs(tmp_path / "leftImg8bit" / "train")
    with pytest.raises(FileNotFoundError, match=r"folder not found: .*gtFine/train"):
        registry.get_dataset("cityscapes", str(tmp_path)).samples("train")
    with pytest.raises(FileNotFoundError, match="ImageSets/Segmentation"):
        registry.get_dataset("voc", str(tmp_path))


def test_an_empty_split_names_the_split_and_its_folders(tmp_path):
    root = _folder_tree(str(tmp_path), splits=("train", "val"))
    os.makedirs(tmp_path / "images" / "test")
    os.makedirs(tmp_path / "labels" / "test")
    dataset = registry.get_dataset("folder", root)
    with pytest.raises(ValueError, match=rf"folder: split 'test' has no samples \({tmp_path}/images/test / "
                                         rf"{tmp_path}/labels/test\)"):
        dataset.samples("test")
    for name in os.listdir(tmp_path / "images" / "train"):  # the calibration split is carved off train
        os.remove(tmp_path / "images" / "train" / name)
        os.remove(tmp_path / "labels" / "train" / name)
    with pytest.raises(ValueError, match=rf"split 'calibration' has no samples \({tmp_path}/images/train "):
        registry.get_dataset("folder", root).samples("calibration")
    voc_root = tmp_path / "voc"
    os.makedirs(voc_root / "ImageSets" / "Segmentation")
    (voc_root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"voc: split 'val' has no samples \(.*val.txt \(JPEGImages / Segm"):
        registry.get_dataset("voc", str(voc_root)).samples("val")


def test_unpaired_files_raise_or_are_counted_with_skip_bad(tmp_path):
    root = _folder_tree(str(tmp_path))
    os.remove(os.path.join(root, "labels", "train", "train1.png"))
    os.remove(os.path.join(root, "images", "train", "train2.png"))
    with pytest.raises(ValueError, match=r"image .*train1.png has no matching label"):
        registry.get_dataset("folder", root).samples("train")
    dataset = registry.get_dataset("folder", root, skip_bad=True)
    assert [s.name for s in dataset.samples("train")] == ["train0"]
    assert len(dataset.problems) == 2 and "label" in dataset.problems[1] and "train2.png" in dataset.problems[1]


@pytest.mark.parametrize("damage, message", [
    ("truncate", "corrupt or truncated"),
    ("garbage", "corrupt or truncated"),
    ("rgba", r"mode RGBA \(4 channels\); expected an RGB image"),
    ("rgb_label", r"mode RGB \(3 channels\); expected a single-channel"),
    ("value", r"values \[7\] outside the folder class set"),
    ("size", r"is 8x12 pixels but its label .* is 4x4"),
])
def test_bad_files_get_clear_errors_naming_them(tmp_path, damage, message):
    root = _folder_tree(str(tmp_path))
    image, label = (os.path.join(root, kind, "train", "train1.png") for kind in ("images", "labels"))
    if damage == "truncate":
        data = open(image, "rb").read()
        open(image, "wb").write(data[:len(data) // 2])
    elif damage == "garbage":
        open(image, "wb").write(b"not an image at all")
    elif damage == "rgba":
        _write_image(image, mode="RGBA")
    elif damage == "rgb_label":
        _write_image(label)
    elif damage == "value":
        _write_label(label, np.full((8, 12), 7))
    elif damage == "size":
        _write_label(label, np.zeros((4, 4)))
    dataset = registry.get_dataset("folder", root)
    with pytest.raises(ValueError, match=message) as error:
        files.check_samples(dataset.samples("train"), dataset.info)
    assert "train1.png" in str(error.value)
    good, problems = files.check_samples(dataset.samples("train"), dataset.info, skip_bad=True)
    assert [s.name for s in good] == ["train0", "train2"] and len(problems) == 1


def test_image_of_unexpected_size_is_rejected(tmp_path):
    root = _folder_tree(str(tmp_path))
    dataset = registry.get_dataset("folder", root)
    with pytest.raises(ValueError, match=r"train0.png is 8x12 pixels; expected 16x16"):
        files.check_samples(dataset.samples("train"), dataset.info, image_size=(16, 16))


def test_classes_file_with_colours(tmp_path):
    (tmp_path / "classes.txt").write_text("# name R G B\nsky 0 0 255\nground 0 128 0\n")
    info = folder.read_classes(str(tmp_path / "classes.txt"))
    assert info.class_names == ("sky", "ground") and info.palette.tolist() == [[0, 0, 255], [0, 128, 0]]
    (tmp_path / "classes.txt").write_text("sky 0 0\n")
    with pytest.raises(ValueError, match=r"classes.txt:1: expected `name` or `name R G B`"):
        folder.read_classes(str(tmp_path / "classes.txt"))


def test_voc_and_ade_palettes():
    assert voc.INFO.palette[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert voc.INFO.palette[15].tolist() == [192, 128, 128]  # person
    assert len({tuple(c) for c in ade20k.INFO.palette}) == 150
