"""Pretrained ViT / DINOv2 backbones: parity with the original implementations.

References are built randomly initialised inside the tests, saved to disk
and loaded back (no downloads): Hugging Face `ViTModel`, `Dinov2Model` and
`Dinov2WithRegistersModel` through `transformers` on the CPU torch wheel;
keras-hub's `ViTBackbone`. timm cannot be imported here (it needs
torchvision, whose wheel for this torch is a CUDA build), so the timm loader
is tested on state dicts with timm's names and shapes, made by renaming the
Hugging Face models' tensors (q, k, v packed into `qkv`), against the same
Hugging Face outputs.
"""

import os

import keras
import numpy as np
import pytest
from conftest import random_images, tiny_segmenter, to_numpy

import keras_dtop
from keras_dtop.convert.checkpoints import read_state_dict

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOLERANCE = 1e-4


def _noisy(model):
    # Random init leaves some tensors constant (zeros, ones): perturb them all.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _hf_model(kind):
    small = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2)
    if kind == "vit":
        config = transformers.ViTConfig(**small, intermediate_size=64, image_size=32, patch_size=8)
        return _noisy(transformers.ViTModel(config))
    dinov2 = dict(small, mlp_ratio=2, image_size=56, patch_size=14, layerscale_value=0.5)
    if kind == "dinov2":
        return _noisy(transformers.Dinov2Model(transformers.Dinov2Config(**dinov2)))
    config = transformers.Dinov2WithRegistersConfig(**dinov2, num_register_tokens=2)
    return _noisy(transformers.Dinov2WithRegistersModel(config))


def _hf_features(model, images):
    """The original's last block output (before the final norm), prefix tokens included."""
    pixels = torch.tensor(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True, interpolate_pos_encoding=True)
    return out.hidden_states[-1].numpy()


def _sizes(patch):
    # native square grid 4x4, a larger non-square grid, a smaller one (shrinking)
    return [(4 * patch, 4 * patch), (5 * patch, 7 * patch), (2 * patch, 3 * patch)]


def _assert_parity(backbone, reference, patch):
    for height, width in _sizes(patch):
        images = random_images(2, height, width, seed=height + width)
        got, want = to_numpy(backbone(images)), reference(images)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)


_SAVED = {}


def _saved(kind, tmp_path_factory):
    """(kind, model, folder): a random Hugging Face model saved once per session."""
    if kind not in _SAVED:
        model = _hf_model(kind)
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        _SAVED[kind] = (kind, model, folder)
    return _SAVED[kind]


@pytest.fixture(params=["vit", "dinov2", "dinov2_with_registers"])
def hf_folder(request, tmp_path_factory):
    return _saved(request.param, tmp_path_factory)


def test_huggingface_folder_matches_the_original(hf_folder):
    kind, model, folder = hf_folder
    backbone = keras_dtop.DToPBackbone.from_pretrained(folder)
    expected_prefix = 3 if kind == "dinov2_with_registers" else 1
    assert backbone.num_prefix_tokens == expected_prefix
    assert (backbone.layer_scale_init is None) == (kind == "vit")
    assert backbone.position_resize == (
        "bicubic_antialias" if kind == "dinov2_with_registers" else "bicubic"
    )
    _assert_parity(backbone, lambda x: _hf_features(model, x), backbone.patch_size)


def _timm_state_dict(model, folder, kind, embed_class=True):
    """The Hugging Face checkpoint's tensors under timm's names (q, k, v packed into qkv)."""
    hf = read_state_dict(folder / "model.safetensors")
    state = {
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
        "cls_token": hf["embeddings.cls_token"],
        "pos_embed": hf["embeddings.position_embeddings"],
        "norm.weight": hf["layernorm.weight"],
        "norm.bias": hf["layernorm.bias"],
    }
    if not embed_class:  # timm's no_embed_class layout: the class position folded in
        state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        state["pos_embed"] = state["pos_embed"][:, 1:]
    if "embeddings.register_tokens" in hf:
        state["reg_token"] = hf["embeddings.register_tokens"]
    for i in range(model.config.num_hidden_layers):
        hf_layer, layer = f"encoder.layer.{i}.", f"blocks.{i}."
        attention = hf_layer + "attention.attention."
        for part in ("weight", "bias"):
            state[layer + "attn.qkv." + part] = np.concatenate(
                [hf[attention + name + "." + part] for name in ("query", "key", "value")]
            )
            state[layer + "attn.proj." + part] = hf[hf_layer + "attention.output.dense." + part]
            if kind == "vit":
                names = ("layernorm_before", "layernorm_after", "intermediate.dense", "output.dense")
            else:
                names = ("norm1", "norm2", "mlp.fc1", "mlp.fc2")
            for timm_name, hf_name in zip(("norm1", "norm2", "mlp.fc1", "mlp.fc2"), names):
                state[layer + timm_name + "." + part] = hf[hf_layer + hf_name + "." + part]
        if kind != "vit":
            state[layer + "ls1.gamma"] = hf[hf_layer + "layer_scale1.lambda1"]
            state[layer + "ls2.gamma"] = hf[hf_layer + "layer_scale2.lambda1"]
    return state


def test_timm_state_dict_files_match_the_original(hf_folder, tmp_path):
    kind, model, folder = hf_folder
    state = _timm_state_dict(model, folder, kind)
    path = tmp_path / "timm.safetensors"
    safetensors_torch.save_file({k: torch.tensor(v) for k, v in state.items()}, str(path))
    # timm resizes positions with antialiased bicubic: so does DINOv2 with
    # registers, the reference with resizing. The other two are compared with
    # plain bicubic, which is theirs.
    resize = {} if kind == "dinov2_with_registers" else {"position_resize": "bicubic"}
    backbone = keras_dtop.DToPBackbone.from_pretrained(path, num_heads=2, **resize)
    assert backbone.position_resize == ("bicubic_antialias" if not resize else "bicubic")
    _assert_parity(backbone, lambda x: _hf_features(model, x), backbone.patch_size)
    if kind == "vit":  # no_embed_class layout, as a .pth file
        path = tmp_path / "timm.pth"
        torch.save({k: torch.tensor(v) for k, v in _timm_state_dict(model, folder, kind, False).items()}, path)
        other = keras_dtop.DToPBackbone.from_pretrained(path, num_heads=2, **resize)
        images = random_images(2, 40, 56)
        np.testing.assert_allclose(to_numpy(other(images)), _hf_features(model, images), atol=TOLERANCE)


def test_live_transformers_state_dict_names_are_understood(tmp_path):
    # transformers 5 names modules differently in memory than in its files.
    model = _hf_model("vit")
    model.config.save_pretrained(tmp_path)
    live = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.startswith("layers.0.attention.q_proj") for k in live)
    safetensors_torch.save_file(live, str(tmp_path / "model.safetensors"))
    backbone = keras_dtop.DToPBackbone.from_pretrained(tmp_path)
    images = random_images(2, 40, 56)
    np.testing.assert_allclose(to_numpy(backbone(images)), _hf_features(model, images), atol=TOLERANCE)


def _keras_hub_reference(hub, images):
    """keras-hub's ViT up to its last encoder block (DToP drops the final norm)."""
    x = hub.get_layer("vit_patching_and_embedding")(images)
    for layer in hub.get_layer("vit_encoder").encoder_layers:
        x = layer(x)
    return to_numpy(x)


def test_keras_hub_vit_backbone_matches(tmp_path):
    from keras_hub.models import ViTBackbone

    hub = ViTBackbone(
        image_shape=(32, 48, 3), patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    for variable in hub.weights:  # random, not the constant initial values
        variable.assign(np.random.default_rng(1).normal(0, 0.2, tuple(variable.shape)))
    backbone = keras_dtop.DToPBackbone.from_pretrained(hub)
    assert backbone.num_prefix_tokens == 1 and backbone.patch_embedding.grid_size == (4, 6)
    images = random_images(2, 32, 48)
    np.testing.assert_allclose(to_numpy(backbone(images)), _keras_hub_reference(hub, images), atol=1e-5, rtol=0)
    # Through a keras-hub preset directory too.
    preset = tmp_path / "hub_preset"
    hub.save_to_preset(str(preset))
    from_preset = keras_dtop.DToPBackbone.from_pretrained(preset)
    np.testing.assert_allclose(to_numpy(from_preset(images)), to_numpy(backbone(images)), atol=1e-6)
    # Resized once at loading = resized at call time.
    resized = keras_dtop.DToPBackbone.from_pretrained(hub, image_size=(40, 24))
    images = random_images(1, 40, 24)
    np.testing.assert_allclose(to_numpy(resized(images)), to_numpy(backbone(images)), atol=1e-5)


def test_mismatched_checkpoints_name_the_keys(tmp_path_factory, tmp_path):
    kind, model, folder = _saved("dinov2", tmp_path_factory)
    state = _timm_state_dict(model, folder, kind)
    del state["blocks.1.ls2.gamma"]
    state["blocks.0.attn.q_norm.weight"] = np.ones(16, "float32")
    state["blocks.2.mlp.fc2.bias"] = np.zeros(31, "float32")
    path = tmp_path / "broken.npz"
    np.savez(path, **state)
    with pytest.raises(ValueError) as error:
        keras_dtop.DToPBackbone.from_pretrained(path, num_heads=2)
    message = str(error.value)
    assert "missing keys: blocks.1.ls2.gamma" in message
    assert "unexpected keys: blocks.0.attn.q_norm.weight" in message
    assert "blocks.2.mlp.fc2.bias: checkpoint (31,) does not fit" in message
    # Hugging Face folder with a config that does not fit its weights.
    broken = tmp_path / "hf"
    model.config.num_hidden_layers = 2
    model.config.save_pretrained(broken)
    os.symlink(folder / "model.safetensors", broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys: encoder\.layer\.2\."):
        keras_dtop.DToPBackbone.from_pretrained(broken)
    model.config.num_hidden_layers = 3
    with pytest.raises(FileNotFoundError, match="Checkpoint not found"):
        keras_dtop.DToPBackbone.from_pretrained("checkpoints/missing.pth")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        keras_dtop.DToPBackbone.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="authors' mmsegmentation"):
        np.savez(tmp_path / "authors.npz", **{"backbone.patch_embed.projection.weight": np.zeros((4, 3, 2, 2))})
        keras_dtop.DToPBackbone.from_pretrained(tmp_path / "authors.npz")


def test_segmenter_on_a_loaded_backbone_trains_and_round_trips(tmp_path_factory, tmp_path):
    # DINOv2 with registers: prefix tokens, LayerScale, antialiased resizing.
    kind, model, folder = _saved("dinov2_with_registers", tmp_path_factory)
    backbone = keras_dtop.DToPBackbone.from_pretrained(folder, image_size=(56, 56))
    loaded = to_numpy(backbone.encoder_blocks[0].weights)
    segmenter = tiny_segmenter(backbone, num_classes=3)
    assert segmenter.stage_ends == (0, 1, 2)  # the default rule for 3 layers
    segmenter.compile(optimizer=keras.optimizers.Adam(1e-3))
    images = random_images(4, 56, 56)
    labels = np.random.default_rng(0).integers(0, 3, size=(4, 56, 56)).astype("int32")
    history = segmenter.fit(images, labels, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    after = to_numpy(backbone.encoder_blocks[0].weights)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(after, loaded)), "fit did not train the backbone"
    path = tmp_path / "segmenter.keras"
    segmenter.save(path)
    restored = keras.saving.load_model(path)
    assert restored.backbone.num_register_tokens == 2
    assert restored.backbone.layer_scale_init == 0.5
    np.testing.assert_allclose(
        restored.predict(images, verbose=0), segmenter.predict(images, verbose=0), atol=1e-5
    )


def test_segmenter_from_pretrained_backbone_reads_the_normalisation(tmp_path_factory):
    _, model, folder = _saved("vit", tmp_path_factory)
    segmenter = keras_dtop.DToPSegmenter.from_pretrained_backbone(
        folder, num_classes=5, drop_path_rate=0.1, prune_threshold=0.8, head_hidden_dim=16, head_num_heads=2
    )
    assert segmenter.backbone.drop_path_rate == 0.1 and segmenter.prune_threshold == 0.8
    assert segmenter.stage_ends == (0, 1, 2)
    converter = segmenter.preprocessor.image_converter
    # Hugging Face ViT normalises with mean = std = 0.5: 255 -> 1, 0 -> -1.
    pixels = np.array([[[[0.0, 127.5, 255.0]]]], "float32")
    np.testing.assert_allclose(to_numpy(converter(pixels)), [[[[-1.0, 0.0, 1.0]]]], atol=1e-6)
    images = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    assert segmenter.predict(images, verbose=0).shape == (1, 32, 32, 5)


def test_hub_names_download_a_folder_and_prefix_tokens_can_be_dropped(tmp_path_factory, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    _, model, folder = _saved("vit", tmp_path_factory)
    asked = []

    def fake_download(name, allow_patterns):  # no network here: serve the saved folder
        asked.append(name)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    for name in ("hf://org/tiny-vit", "org/tiny-vit"):
        backbone = keras_dtop.DToPBackbone.from_pretrained(name, keep_prefix_tokens=False)
        assert backbone.num_prefix_tokens == 0
    assert asked == ["org/tiny-vit", "org/tiny-vit"]
    images = random_images(1, 32, 32)
    # Without the class token only the patch tokens run: same weights, other features.
    features = to_numpy(backbone(images))
    assert features.shape == (1, 16, 32)
    assert np.abs(features - _hf_features(model, images)[:, 1:]).max() > 1e-3


def test_checkpoints_without_qkv_biases_load_as_zero_biases(tmp_path):
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, qkv_bias=False,
    )  # fmt: skip
    model = _noisy(transformers.ViTModel(config))
    model.save_pretrained(tmp_path)
    assert "encoder.layer.0.attention.attention.query.bias" not in read_state_dict(tmp_path / "model.safetensors")
    backbone = keras_dtop.DToPBackbone.from_pretrained(tmp_path)
    assert not to_numpy(backbone.encoder_blocks[0].query_dense.bias).any()
    images = random_images(2, 40, 56)
    np.testing.assert_allclose(to_numpy(backbone(images)), _hf_features(model, images), atol=TOLERANCE)
