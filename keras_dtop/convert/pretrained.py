"""One entry point for pretrained ViT / DINOv2 backbones: `backbone_from_pretrained`.

Sources, tried in this order:
- a keras-hub `ViTBackbone` instance;
- a folder with `config.json`: a Hugging Face model folder (`model_type` vit,
  dinov2, dinov2_with_registers) or a keras-hub preset directory;
- a file (`.safetensors`, `.pth` / `.pt` / `.bin`, `.npz`): a timm state dict;
- otherwise a hub name, where a network exists: `"hf://org/name"` or
  `"org/name"` downloads a Hugging Face folder (needs `huggingface_hub`),
  anything else is handed to keras-hub's `Backbone.from_preset`.
"""

import json
import os

from keras_dtop.convert.checkpoints import TORCH_SUFFIXES, read_state_dict


def _hub_vit(backbone, source):
    from keras_hub.models import ViTBackbone

    if not isinstance(backbone, ViTBackbone):
        raise TypeError(
            f"{source!r} is a keras-hub {type(backbone).__name__}; keras-dtop loads ViTBackbone only."
        )
    return backbone


def _download_huggingface(name):
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(
            f"Downloading {name!r} needs huggingface_hub (pip install huggingface_hub); "
            "or pass a local folder with config.json and model.safetensors."
        ) from None
    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors"])
    except Exception as error:  # no network, unknown repo, ...
        raise OSError(
            f"Could not download the Hugging Face model {name!r} ({type(error).__name__}: "
            f"{error}). Without a network, pass a local model folder."
        ) from None


def backbone_from_pretrained(source, image_size=None, stage_ends=None, trusted=False, **kwargs):
    """A `DToPBackbone` with pretrained weights from `source` (see module docstring).

    image_size: None keeps the checkpoint's position grid (any input size is
        resized to at call time); (H, W) resizes the table once now, as
        fine-tuning at a fixed crop does.
    stage_ends: stage boundaries; default `default_stage_ends(depth)`.
    trusted: let torch unpickle non-tensor objects in `.pth` files.
    kwargs: `keep_prefix_tokens=False` drops the class token and registers;
        timm sources take `num_heads` (not stored in a state dict); anything
        else overrides the backbone config (e.g. `drop_path_rate=0.1`).
    """
    from keras_hub.models import Backbone

    options = dict(image_size=image_size, stage_ends=stage_ends, **kwargs)
    if isinstance(source, Backbone):
        from keras_dtop.convert.keras_hub_vit import backbone_from_keras_hub

        return backbone_from_keras_hub(_hub_vit(source, type(source).__name__), **options)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path, a hub name or a keras-hub ViTBackbone, got {source!r}.")
    path = os.fspath(source)
    if os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(
                f"{path} has no config.json: expected a Hugging Face model folder or a keras-hub preset."
            )
        with open(config_path) as f:
            config = json.load(f)
        if "model_type" in config:
            from keras_dtop.convert.huggingface import backbone_from_huggingface

            return backbone_from_huggingface(path, trusted=trusted, **options)
        return _from_keras_hub_preset(path, options)
    if os.path.isfile(path):
        from keras_dtop.convert.timm import backbone_from_timm

        return backbone_from_timm(read_state_dict(path, trusted), **options)
    if path.lower().endswith((".safetensors", ".npz", *TORCH_SUFFIXES)):
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    if path.startswith("hf://") or (path.count("/") == 1 and not path.startswith((".", "/"))):
        from keras_dtop.convert.huggingface import backbone_from_huggingface

        folder = _download_huggingface(path.removeprefix("hf://"))
        return backbone_from_huggingface(folder, trusted=trusted, **options)
    return _from_keras_hub_preset(path, options)


def _from_keras_hub_preset(preset, options):
    from keras_hub.models import Backbone

    from keras_dtop.convert.keras_hub_vit import backbone_from_keras_hub

    try:
        hub = Backbone.from_preset(preset)
    except Exception as error:
        raise ValueError(
            f"{preset!r} is neither a local checkpoint nor a loadable keras-hub preset "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})."
        ) from None
    return backbone_from_keras_hub(_hub_vit(hub, preset), **options)


def pretrained_mean_std(source):
    """Per-channel `(mean, std)` on the 0-255 scale that `source` was trained with.

    A Hugging Face folder's `preprocessor_config.json` (`image_mean`,
    `image_std`) where present; Hugging Face ViT without one: 0.5 / 0.5 (its
    image processor's default); everything else: ImageNet's. timm state dicts
    do not record it: pass mean/std for models trained otherwise (e.g. timm's
    augreg ViTs use 0.5 / 0.5).
    """
    from keras_dtop.models.presets import IMAGENET_MEAN, IMAGENET_STD

    folder = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    if folder and os.path.isdir(folder):
        path = os.path.join(folder, "preprocessor_config.json")
        if os.path.exists(path):
            with open(path) as f:
                config = json.load(f)
            if "image_mean" in config and "image_std" in config:
                return (
                    tuple(255.0 * m for m in config["image_mean"]),
                    tuple(255.0 * s for s in config["image_std"]),
                )
        config_path = os.path.join(folder, "config.json")
        if os.path.exists(config_path):
            with open(config_path) as f:
                if json.load(f).get("model_type") == "vit":
                    return (127.5,) * 3, (127.5,) * 3
    return IMAGENET_MEAN, IMAGENET_STD
