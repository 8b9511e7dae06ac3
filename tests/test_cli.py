"""`keras-dtop predict / evaluate / info` end to end on a tiny model and folders the tests write,
and trained models shared as keras-hub presets (local folders, hf:// and kaggle:// handles)."""

import csv
import json

import keras
import numpy as np
import pytest
from conftest import set_threshold_between_tokens, tiny_backbone, tiny_segmenter, varied_images
from PIL import Image

import keras_dtop
from keras_dtop.cli import main as cli_main
from keras_dtop.data.folder import read_mask
from keras_dtop.evaluation import evaluate_segmentation
from keras_dtop.models.presets import mean_std_preprocessor
from keras_dtop.visualization import exit_stage_overlay, label_overlay

NAMES = ["sky", "road", "tree", "car"]
PALETTE = [[10, 20, 30], [200, 0, 0], [0, 150, 0], [250, 250, 0]]


def cli_model():
    """Raw-pixel preprocessor, class names and palette; p0 prunes some tokens of the test images."""
    model = tiny_segmenter(
        tiny_backbone(),
        preprocessor=mean_std_preprocessor((127.5,) * 3, (64.0,) * 3),
        class_names=NAMES,
        palette=PALETTE,
        keep_top_k=0,
    )
    set_threshold_between_tokens(model, varied_images(6, seed=4).astype(np.uint8).astype("float32"))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The model, its .keras file and its preset directory."""
    keras.utils.set_random_seed(5)
    model = cli_model()
    root = tmp_path_factory.mktemp("models")
    model.save(root / "model.keras")
    model.save_to_preset(str(root / "preset"))
    return model, root / "model.keras", root / "preset"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Six 64x64 PNGs, two of them in a subfolder."""
    root = tmp_path_factory.mktemp("images")
    (root / "more").mkdir()
    images = varied_images(6, seed=4).astype(np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / ("more" if i >= 4 else "") / f"img{i}.png")
    return root, images


def test_predict_writes_labels_overlays_exit_maps_and_a_summary(saved, image_folder, tmp_path, capsys):
    model, keras_file, _ = saved
    folder, images = image_folder
    out = tmp_path / "out"
    code = cli_main(["predict", str(keras_file), str(folder), "--out", str(out), "--overlay", "--exit-map",
                     "--opacity", "0.4", "--batch-size", "4", "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    details = model.predict_details(images)
    labels = details["scores"].argmax(-1)
    names = ["img0", "img1", "img2", "img3", "more/img4", "more/img5"]
    for i, name in enumerate(names):
        np.testing.assert_array_equal(read_mask(out / f"{name}.png"), labels[i])
        assert Image.open(out / f"{name}.png").getpalette()[3:6] == PALETTE[1]  # the model's palette
        overlay = np.asarray(Image.open(out / f"{name}_overlay.png"))
        np.testing.assert_array_equal(overlay, label_overlay(images[i], labels[i], PALETTE, 0.4))
        exits = np.asarray(Image.open(out / f"{name}_exit.png"))
        np.testing.assert_array_equal(exits, exit_stage_overlay(images[i], details["exit_stage"][i], 3, 0.4))
    with open(out / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image"] for r in rows] == [str(folder / f"{n}.png") for n in names]
    alive = np.array([[int(r[f"alive_stage_{j}"]) for j in (1, 2, 3)] for r in rows])
    np.testing.assert_array_equal(alive, details["alive_counts"])
    assert alive[:, -1].min() < 16, "p0 should prune some tokens of some image"
    np.testing.assert_allclose([float(r["gflops"]) for r in rows], details["gflops"], rtol=1e-3)
    assert json.loads((out / "summary.json").read_text())[0]["alive_stage_1"] == 16


def test_predict_slides_windows_over_images_of_any_size(saved, tmp_path):
    model, _, preset = saved
    image = varied_images(1, size=80, seed=9)[0].astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "big.png")
    out = tmp_path / "out"
    assert cli_main(["predict", str(preset), str(tmp_path / "big.png"), "--out", str(out), "--exit-map",
                     "--sliding-window", "64", "64", "--stride", "16", "16", "--quiet"]) == 0  # fmt: skip
    want = model.predict_details(image[None], sliding_window=((64, 64), (16, 16)))["scores"].argmax(-1)[0]
    np.testing.assert_array_equal(read_mask(out / "big.png"), want)
    assert np.asarray(Image.open(out / "big_exit.png")).shape == (80, 80, 3)
    row = next(csv.DictReader(open(out / "summary.csv")))
    assert float(row["dense_gflops"]) > float(row["gflops"]) > 0  # 4 windows, some tokens pruned


def test_predict_p0_changes_what_prunes(saved, image_folder, tmp_path):
    _, keras_file, _ = saved
    folder, _ = image_folder
    for p0 in (["1.0"], ["1.0", "0.3"]):  # one p0, or one per pruning head
        assert cli_main(["predict", str(keras_file), str(folder / "img0.png"), "--out", str(tmp_path / "-".join(p0)),
                         "--p0", *p0, "--quiet"]) == 0  # fmt: skip
    dense = next(csv.DictReader(open(tmp_path / "1.0" / "summary.csv")))
    assert dense["alive_stage_3"] == "16" and float(dense["saving"]) == 0.0
    first_head_off = next(csv.DictReader(open(tmp_path / "1.0-0.3" / "summary.csv")))
    assert first_head_off["alive_stage_2"] == "16"


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda f, m, t: ["predict", str(t / "missing.keras"), str(f), "--out", str(t)], "No model at"),
        (lambda f, m, t: ["predict", str(t), str(f), "--out", str(t)], "not a preset directory"),
        (lambda f, m, t: ["predict", str(m), str(t / "nothing"), "--out", str(t)], "No image file or folder"),
        (lambda f, m, t: ["predict", str(m), str(t / "bad.png"), "--out", str(t)], "cannot read"),
        (lambda f, m, t: ["predict", str(m), str(t / "odd.png"), "--out", str(t)], "--sliding-window"),
        (lambda f, m, t: ["predict", str(m), str(f), "--out", str(t), "--opacity", "2"], "--opacity"),
        (lambda f, m, t: ["predict", str(m), str(f), "--out", str(t), "--stride", "8", "8"], "--stride needs"),
        (lambda f, m, t: ["predict", str(m), str(f), "--out", str(t), "--p0", "1.5"], "prune_threshold"),
        (lambda f, m, t: ["predict", str(m), str(f), "--out", str(t), "--p0", "0.5", "0.5", "0.5"], "pruning heads"),
        (lambda f, m, t: ["evaluate", str(m), "--data", str(t / "nothing")], "nothing"),
        (lambda f, m, t: ["info", str(m), "--image-size", "60", "60"], "patch size 16"),
    ],
    ids=["missing model", "folder no preset", "missing images", "unreadable image", "size off the patch grid",
         "opacity", "stride alone", "bad p0", "p0 per head", "missing dataset", "info size"],  # fmt: skip
)
def test_cli_errors_exit_2_with_one_line(saved, image_folder, tmp_path, capsys, make_args, message):
    _, keras_file, _ = saved
    folder, _ = image_folder
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    Image.fromarray(np.zeros((60, 60, 3), np.uint8)).save(tmp_path / "odd.png")
    assert cli_main(make_args(folder, keras_file, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert message in err


def test_evaluate_prints_the_report_and_writes_json(saved, image_folder, tmp_path, capsys):
    model, keras_file, _ = saved
    _, images = image_folder
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    labels = model.predict(images[:4], verbose=0).argmax(-1).astype(np.uint8)
    labels[:, :8] = 255  # an ignored band
    labels[0, 8:16] = (labels[0, 8:16] + 1) % len(NAMES)  # a band predicted wrong, whatever the model says
    for i, (image, label) in enumerate(zip(images[:4], labels)):
        Image.fromarray(image).save(data / "images" / f"{i}.png")
        Image.fromarray(label, mode="L").save(data / "masks" / f"{i}.png")
    code = cli_main(["evaluate", str(keras_file), "--data", str(data), "--json", str(tmp_path / "r.json"),
                     "--batch-size", "2", "--quiet"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "sky" in printed and "car" in printed  # the model's class names
    report = json.loads((tmp_path / "r.json").read_text())
    want = evaluate_segmentation(model, (images[:4].astype("float32"), labels.astype("int32")), class_names=NAMES)
    assert report["miou"] == pytest.approx(want.miou, abs=1e-6) and report["miou"] < 1.0
    assert report["alive_fraction"] == pytest.approx(want.alive_fraction, abs=1e-6)


def test_info_describes_the_model(saved, capsys):
    model, keras_file, preset = saved
    for source in (keras_file, preset):
        assert cli_main(["info", str(source), "--image-size", "128", "128"]) == 0
        out = capsys.readouterr().out
        assert f"{model.count_params():,} parameters" in out
        assert f"p0 {model.prune_threshold}, k 0" in out and "sky, road, tree, car" in out
        assert "(pixels - [127.5, 127.5, 127.5]) / [64.0, 64.0, 64.0]" in out
        assert "at 128x128 (64 tokens)" in out


def test_preset_round_trip_keeps_weights_settings_and_classes(saved, image_folder):
    model, _, preset = saved
    _, images = image_folder
    loaded = keras_dtop.DToPSegmenter.from_preset(str(preset))
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5)
    assert list(loaded.class_names) == NAMES and [list(c) for c in loaded.palette] == PALETTE
    assert (loaded.prune_threshold, loaded.keep_top_k) == (model.prune_threshold, 0)
    converter = loaded.preprocessor.image_converter
    np.testing.assert_allclose(converter.scale, [1 / 64.0] * 3)


def test_hub_handles_go_through_keras_hub_downloads(saved, image_folder, monkeypatch):
    """hf:// and kaggle:// presets load like a local folder (downloads stubbed: no network here)."""
    import huggingface_hub
    import kagglehub

    model, _, preset = saved
    _, images = image_folder
    asked = []

    def hf_download(repo_id, filename, **kwargs):
        asked.append(("hf", repo_id, filename))
        return str(preset / filename)

    def kaggle_download(handle, path=None, **kwargs):
        asked.append(("kaggle", handle, path))
        return str(preset / path) if path else str(preset)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_download)
    monkeypatch.setattr(kagglehub, "model_download", kaggle_download)
    want = model.predict(images[:2], verbose=0)
    for handle in ("hf://someone/dtop-tiny", "kaggle://someone/dtop/keras/tiny"):
        loaded = keras_dtop.DToPSegmenter.from_preset(handle)
        np.testing.assert_allclose(loaded.predict(images[:2], verbose=0), want, atol=1e-5)
        assert list(loaded.class_names) == NAMES
    assert {a[0] for a in asked} == {"hf", "kaggle"}
    assert ("hf", "someone/dtop-tiny", "task.json") in asked or ("hf", "someone/dtop-tiny", "config.json") in asked


def test_class_names_and_palette_are_checked():
    backbone = tiny_backbone()
    with pytest.raises(ValueError, match="class_names has 2 names for a model with num_classes=4"):
        tiny_segmenter(backbone, class_names=["a", "b"])
    with pytest.raises(TypeError, match="class_names must be a list"):
        tiny_segmenter(backbone, class_names="abcd")
    with pytest.raises(ValueError, match=r"palette must have shape \(num_classes, 3\) = \(4, 3\)"):
        tiny_segmenter(backbone, palette=[[0, 0, 0]])
    with pytest.raises(ValueError, match=r"integers in \[0, 255\]"):
        tiny_segmenter(backbone, palette=[[0, 0, 300]] * 4)
    config = tiny_segmenter(backbone, class_names=NAMES, palette=PALETTE).get_config()
    assert config["class_names"] == NAMES and config["palette"] == PALETTE
