"""tools.segment -> tools.evaluate on every dataset layout we read, with images of other shapes than
the model's input (letterboxed in, class maps written back at each image's own size)."""
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image
from test_export import EXITS, calibrate_batch_norm, dynamic_config, images, tiny_config

from mess_tf import export, metrics, network, runtime, visualize
from mess_tf.data import ade20k, cityscapes, files, registry, voc
from mess_tf.keras_lib import keras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = ((40, 72), (96, 50), (64, 64))  # (h, w): wider, taller than and equal to the 64x64 input


def _cli(tool, *flags):
    result = subprocess.run([sys.executable, "-m", f"tools.{tool}", *flags], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    return result.returncode, result.stdout, result.stderr


def _write_image(path, rng, shape):
    image = (rng.uniform(0, 255, (shape[0] // 8 + 1, shape[1] // 8 + 1, 3))).astype(np.uint8)
    image = np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.BILINEAR))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path, quality=95)  # JPEG for VOC and ADE20K, as they ship


def _raw_label(rng, shape, raw_values):
    return (rng.choice(raw_values, (shape[0] // 8 + 1, shape[1] // 8 + 1))
            .repeat(8, 0).repeat(8, 1)[:shape[0], :shape[1]])


def _cityscapes(root, rng):
    valid = [raw for raw in range(cityscapes.NUM_LABEL_IDS)
             if cityscapes.INFO.label_map(cityscapes.LABEL_IDS)[raw] < 255]
    for k, shape in enumerate(SHAPES):
        city = ("aachen", "bremen")[k % 2]
        stem = f"{city}_{k:06d}_000019"
        _write_image(os.path.join(root, "leftImg8bit", "val", city, stem + "_leftImg8bit.png"), rng, shape)
        visualize.save_png(os.path.join(root, "gtFine", "val", city, stem + cityscapes.LABEL_IDS),
                           _raw_label(rng, shape, valid).astype(np.uint8))


def _voc(root, rng):
    ids = [f"2007_{k:06d}" for k in range(len(SHAPES))]
    for image_id, shape in zip(ids, SHAPES):
        _write_image(os.path.join(root, "VOC2012", "JPEGImages", image_id + ".jpg"), rng, shape)
        visualize.save_png(os.path.join(root, "VOC2012", "SegmentationClass", image_id + ".png"),
                           _raw_label(rng, shape, [0, 1, 15, 255]).astype(np.uint8))
    os.makedirs(os.path.join(root, "VOC2012", "ImageSets", "Segmentation"))
    with open(os.path.join(root, "VOC2012", "ImageSets", "Segmentation", "val.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")


def _ade20k(root, rng):
    for k, shape in enumerate(SHAPES):
        stem = f"ADE_val_{k:08d}"
        _write_image(os.path.join(root, "images", "validation", stem + ".jpg"), rng, shape)
        visualize.save_png(os.path.join(root, "annotations", "validation", stem + ".png"),
                           _raw_label(rng, shape, [0, 1, 3, 13]).astype(np.uint8))


def _folder(root, rng):
    os.makedirs(root)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("".join(f"class{i}\n" for i in range(5)))
    for k, shape in enumerate(SHAPES):
        name = f"scene{k % 2}/img{k}"  # nested folders keep their names
        _write_image(os.path.join(root, "images", "val", name + ".png"), rng, shape)
        visualize.save_png(os.path.join(root, "labels", "val", name + ".png"),
                           _raw_label(rng, shape, [0, 2, 4, 255]).astype(np.uint8))


LAYOUTS = {"cityscapes": (_cityscapes, cityscapes.INFO.num_classes), "voc": (_voc, voc.INFO.num_classes),
           "ade20k": (_ade20k, ade20k.INFO.num_classes), "folder": (_folder, 5)}


def _staged_model(path, num_classes):
    keras.utils.set_random_seed(0)
    net = network.MultiExitNetwork(tiny_config(num_classes), EXITS)
    calibrate_batch_norm(net, images(8, seed=1))
    export.export_staged_model(path, net, dynamic_config(net, th_pix=0.4, th_img=0.5), "float32")
    return path


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_segment_then_evaluate_scores_what_the_library_scores(tmp_path, layout):
    write_tree, num_classes = LAYOUTS[layout]
    data_dir = str(tmp_path / "data")
    write_tree(data_dir, np.random.default_rng(1))
    model_path = _staged_model(str(tmp_path / "model.tflite"), num_classes)
    out = str(tmp_path / "pred")
    code, stdout, stderr = _cli("segment", f"--model={model_path}", f"--dataset={layout}", f"--data_dir={data_dir}",
                                "--split=val", f"--output={out}")
    assert code == 0, stderr
    assert f"{len(SHAPES)} images segmented at 64x64 (letterboxed)" in stdout
    code, stdout, stderr = _cli("evaluate", f"--dataset={layout}", f"--data_dir={data_dir}", "--split=val",
                                f"--predictions={out}")
    assert code == 0, stderr
    scored = json.loads(stdout)

    dataset = registry.get_dataset(layout, data_dir)
    model = runtime.StagedModel.load(model_path)
    matrix = metrics.ConfusionMatrix(num_classes, dataset.info.ignore_label)
    for sample in dataset.samples("val"):
        image, label = files.load_image(sample.image_path), files.load_label(sample.label_path, dataset.info)
        class_map = model.segment(image).class_map
        assert class_map.shape == label.shape == image.shape[:2]
        np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(out, sample.name + ".png"))), class_map)
        matrix.update(class_map, label)
    assert scored["images"] == len(SHAPES) and scored["miou"] == pytest.approx(matrix.miou(), abs=1e-12)


def test_letterbox_keeps_the_aspect_ratio_and_maps_back_exactly():
    image = np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8)
    boxed, inner = runtime.letterbox(image, (64, 64))
    assert inner == (32, 64) and boxed.shape == (64, 64, 3)
    assert np.all(boxed[32:] == 127.5)  # padded below with the training pipeline's mid-grey
    class_map = np.zeros((64, 64), np.uint8)
    class_map[:32, 32:] = 1  # the right half of the image; the padding says 2
    class_map[32:] = 2
    back = runtime.unletterbox(class_map, inner, (64, 64), (40, 80))
    assert back.shape == (40, 80) and set(np.unique(back)) == {0, 1}
    assert np.all(back[:, :40] == 0) and np.all(back[:, 40:] == 1)
    coarse = class_map[::4, ::4]  # a class map at 1/4 of the input size maps back the same
    np.testing.assert_array_equal(runtime.unletterbox(coarse, inner, (64, 64), (40, 80)), back)


def test_images_are_read_recursively_and_a_corrupt_one_is_named_or_skipped(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "images"
    _write_image(str(folder / "a.png"), rng, (48, 64))
    _write_image(str(folder / "nested" / "b.jpg"), rng, (64, 32))
    (folder / "nested" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    model_path = _staged_model(str(tmp_path / "model.tflite"), 5)
    out = tmp_path / "pred"
    code, _, stderr = _cli("segment", f"--model={model_path}", f"--images={folder}", f"--output={out}")
    assert code == 2 and stderr.strip().splitlines()[-1].startswith(
        f"error: image {folder}/nested/broken.png is corrupt")
    assert "--skip_bad" in stderr and "Traceback" not in stderr
    code, stdout, stderr = _cli("segment", f"--model={model_path}", f"--images={folder}", f"--output={out}",
                                "--skip_bad")
    assert code == 0, stderr
    assert f"skipped: image {folder}/nested/broken.png is corrupt" in stderr and "1 unreadable skipped" in stdout
    assert np.asarray(Image.open(out / "a.png")).shape == (48, 64)
    assert np.asarray(Image.open(out / "nested" / "b.png")).shape == (64, 32)


def test_a_dataset_of_another_class_count_is_refused_before_any_image(tmp_path):
    data_dir = str(tmp_path / "data")
    _folder(data_dir, np.random.default_rng(3))
    model_path = _staged_model(str(tmp_path / "model.tflite"), 7)
    code, _, stderr = _cli("segment", f"--model={model_path}", "--dataset=folder", f"--data_dir={data_dir}",
                           f"--output={tmp_path / 'pred'}")
    assert code == 2 and f"predicts 7 classes; dataset folder at {data_dir} has 5" in stderr
    assert not (tmp_path / "pred").exists()
    code, _, stderr = _cli("segment", "--model=absent.tflite", f"--output={tmp_path / 'pred'}")
    assert code == 2 and "give either --images=DIR or --data_dir" in stderr  # before the model is read


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return _staged_model(str(tmp_path_factory.mktemp("model") / "model.tflite"), 5)


def test_an_output_folder_that_is_or_lies_inside_the_input_is_refused(tmp_path, model_path):
    folder = tmp_path / "images"
    _write_image(str(folder / "a.jpg"), np.random.default_rng(4), (48, 64))
    _write_image(str(folder / "b.png"), np.random.default_rng(5), (48, 64))
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    for output, where in [(folder, "is"), (folder / "maps", "lies inside")]:
        code, _, stderr = _cli("segment", f"--model={model_path}", f"--images={folder}", f"--output={output}")
        assert code == 2 and stderr.strip().splitlines()[-1] == (
            f"error: --output={output} {where} the input folder --images={folder}: the class maps would overwrite or "
            f"mix with the images; give an output folder outside it")
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before


def test_two_images_of_one_name_are_an_error_naming_both(tmp_path, model_path):
    folder = tmp_path / "images"
    for name in ("x.png", "x.jpg"):
        _write_image(str(folder / name), np.random.default_rng(6), (48, 64))
    code, _, stderr = _cli("segment", f"--model={model_path}", f"--images={folder}", f"--output={tmp_path / 'pred'}")
    assert code == 2 and stderr.strip().splitlines()[-1] == (
        f"error: {folder / 'x.jpg'} and {folder / 'x.png'} have the same name without their extension; rename one "
        f"of them (files are paired and written by that name)")
    assert not (tmp_path / "pred").exists()


def _png_declaring(path, width, height):
    """A PNG whose header declares width x height pixels (and holds none): what PIL checks before decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_named_and_skipped_with_skip_bad_and_a_bad_threshold_names_its_flag(
        tmp_path, model_path):
    folder = tmp_path / "images"
    _write_image(str(folder / "a.png"), np.random.default_rng(7), (48, 64))
    _png_declaring(folder / "huge.png", 15000, 12000)  # 180 megapixels
    flags = [f"--model={model_path}", f"--images={folder}", f"--output={tmp_path / 'pred'}"]
    code, _, stderr = _cli("segment", *flags)
    assert code == 2 and stderr.strip().splitlines()[-1] == (
        f"error: image {folder / 'huge.png'} is too large to decode safely (Image size (180000000 pixels) exceeds "
        f"limit of {2 * Image.MAX_IMAGE_PIXELS} pixels); shrink it first (pass --skip_bad to skip it)")
    code, stdout, stderr = _cli("segment", *flags, "--skip_bad")
    assert code == 0 and f"skipped: image {folder / 'huge.png'} is too large" in stderr
    assert "1 images segmented" in stdout
    code, _, stderr = _cli("segment", *flags, "--th_img=abc")
    assert code == 2 and stderr.strip().splitlines()[-1] == (
        "error: --th_img=abc: expected comma-separated numbers, e.g. --th_img=0.6,0.8")
