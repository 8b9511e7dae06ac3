"""`keras_dtop.convert.onnx_graph`: a ViT / DINOv2 read back out of a `torch.onnx.export` file.

The reference is built in the test, as a package would ship one: a random
Hugging Face model (every parameter perturbed, so the exporter cannot merge
equal constants) inside a wrapper with a small decoder, exported to ONNX by
PyTorch's TorchScript exporter. The converted backbone must equal both the
torch model's last block and the ONNX file's own tensor in ONNX Runtime.
"""

import json

import keras
import numpy as np
import pytest
from conftest import random_images, to_numpy

import keras_dtop
from keras_dtop.convert.huggingface import checkpoint_names
from keras_dtop.convert.onnx_graph import (
    huggingface_folder_from_onnx,
    onnx_last_hidden_state,
    state_dict_from_onnx,
)

# Reading the file is NumPy and ONNX work, the same under every backend, and loading
# the folder it writes is tested on every backend in test_pretrained.py: these run
# once, in the TensorFlow session (the CI lane with time to spare).
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="backend-independent conversion: checked in the TensorFlow session"
)
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("safetensors")


class _Saliency(torch.nn.Module):
    """A backbone plus a decoder, like the packages that ship ONNX files."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.decoder = torch.nn.Linear(backbone.config.hidden_size, 1)

    def forward(self, pixels):
        return torch.sigmoid(self.decoder(self.backbone(pixels).last_hidden_state))


def _model(kind):
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    if kind == "dinov2":
        config = transformers.Dinov2Config(**small, mlp_ratio=2, image_size=56, patch_size=14, layerscale_value=0.5)
        backbone = transformers.Dinov2Model(config)
    else:
        config = transformers.ViTConfig(**small, intermediate_size=64, image_size=32, patch_size=8)
        backbone = transformers.ViTModel(config, add_pooling_layer=False)
    model = _Saliency(backbone)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _export(model, size, path, opset):
    pixels = torch.zeros(1, 3, size, size)
    torch.onnx.export(model, (pixels,), str(path), input_names=["input_image"], output_names=["saliency"],
                      dynamic_axes={"input_image": {0: "batch"}}, opset_version=opset, dynamo=False)  # fmt: skip
    return path


@pytest.mark.parametrize("kind, size, opset", [("dinov2", 42, 14), ("vit", 32, 17)])
def test_backbone_read_from_onnx_equals_the_original(kind, size, opset, tmp_path):
    model = _model(kind)
    path = _export(model, size, tmp_path / "model.onnx", opset)
    folder = huggingface_folder_from_onnx(path, tmp_path / "folder", num_heads=2, layer_norm_eps=model.backbone.config.layer_norm_eps)
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert config["model_type"] == kind and config["num_hidden_layers"] == 2 and config["hidden_size"] == 32

    # Every tensor equals the torch module's, names put back from the graph.
    state = state_dict_from_onnx(path)
    original = checkpoint_names({k: v.detach().numpy() for k, v in model.backbone.state_dict().items()}, kind)
    for name, value in state.items():
        np.testing.assert_allclose(value, original[name], atol=1e-6, err_msg=name)
    used = {k for k in original if not k.startswith(("pooler.", "embeddings.mask_token"))}
    assert used <= set(state), f"not recovered: {sorted(used - set(state))}"

    backbone = keras_dtop.DToPBackbone.from_pretrained(folder, image_size=(size, size))
    images = random_images(2, size, size, seed=3)
    got = to_numpy(backbone(images))
    with torch.no_grad():
        hidden = model.backbone(torch.tensor(images).permute(0, 3, 1, 2), output_hidden_states=True)
    np.testing.assert_allclose(got, hidden.hidden_states[-1].numpy(), atol=1e-4)
    np.testing.assert_allclose(got, onnx_last_hidden_state(path, images.transpose(0, 3, 1, 2)), atol=1e-4)


def test_segmenter_reads_the_normalisation_written_beside_the_weights(tmp_path):
    path = _export(_model("dinov2"), 42, tmp_path / "model.onnx", 14)
    folder = huggingface_folder_from_onnx(path, tmp_path / "folder", num_heads=2, mean=(0.5, 0.5, 0.5), std=(0.25,) * 3)
    model = keras_dtop.DToPSegmenter.from_pretrained_backbone(folder, num_classes=3, image_size=(42, 42),
                                                              head_hidden_dim=16, head_num_heads=2)  # fmt: skip
    pixels = np.array([[[[0.0, 127.5, 255.0]]]], "float32")  # (x - 127.5) / 63.75
    np.testing.assert_allclose(to_numpy(model.preprocessor.image_converter(pixels)), [[[[-2.0, 0.0, 2.0]]]], atol=1e-6)
    assert model.predict_on_batch(np.zeros((1, 42, 42, 3), "uint8")).shape == (1, 42, 42, 3)


def test_files_that_are_not_vit_exports_are_refused(tmp_path):
    linear = torch.nn.Linear(4, 2)
    path = tmp_path / "linear.onnx"
    torch.onnx.export(linear, (torch.zeros(1, 4),), str(path), dynamo=False)
    with pytest.raises(ValueError, match="not an ONNX export of a Hugging Face ViT"):
        state_dict_from_onnx(path)
    with pytest.raises(FileNotFoundError, match="ONNX file not found"):
        state_dict_from_onnx(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        state_dict_from_onnx(tmp_path / "junk.onnx")
    with pytest.raises(ValueError, match="num_heads 5 does not divide"):
        huggingface_folder_from_onnx(_export(_model("vit"), 32, tmp_path / "v.onnx", 17), tmp_path / "f", num_heads=5)
