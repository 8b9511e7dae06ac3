"""Named DToP architectures (random initialisation: no released weights exist).

Defaults follow the design doc: ViT-B/16 at 512 with p0 = 0.9 and a 384-wide
6-head grading head (ADE20K config), ViT-L/16 at 640 with p0 = 0.95 and a
512-wide 8-head head. Tiny and Small are our additions at the ViT-B recipe.
The builders below assemble a segmenter from a preset or a pretrained backbone.
"""

import inspect
import warnings

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
HALF_RANGE = (127.5, 127.5, 127.5)


def _preset(description, width, depth, heads, drop_path, image, head_dim, head_heads, p0, mean, std):
    return {
        "description": f"{description}; architecture only: random weights",
        "backbone": {
            "patch_size": 16,
            "hidden_dim": width,
            "num_layers": depth,
            "num_heads": heads,
            "mlp_dim": 4 * width,
            "image_size": (image, image),
            "drop_path_rate": drop_path,
        },
        "segmenter": {
            "num_classes": 150,
            "prune_threshold": p0,
            "keep_top_k": 5,
            "head_hidden_dim": head_dim,
            "head_num_heads": head_heads,
            "head_num_layers": 3,
        },
        "preprocessor": {"mean": mean, "std": std},
    }


PRESETS = {
    "dtop_vit_tiny": _preset(
        "DToP on ViT-Ti/16 (12 layers, 192 wide), 512 crops, p0 0.9",
        192, 12, 3, 0.1, 512, 96, 3, 0.9, IMAGENET_MEAN, IMAGENET_STD,
    ),
    "dtop_vit_small": _preset(
        "DToP on ViT-S/16 (12 layers, 384 wide), 512 crops, p0 0.9",
        384, 12, 6, 0.1, 512, 192, 3, 0.9, IMAGENET_MEAN, IMAGENET_STD,
    ),
    "dtop_vit_base": _preset(
        "DToP on ViT-B/16 (12 layers, 768 wide), 512 crops, p0 0.9 (ADE20K config)",
        768, 12, 12, 0.1, 512, 384, 6, 0.9, IMAGENET_MEAN, IMAGENET_STD,
    ),
    "dtop_vit_large": _preset(
        "DToP on ViT-L/16 (24 layers, 1024 wide), 640 crops, p0 0.95 (ADE20K config)",
        1024, 24, 16, 0.3, 640, 512, 8, 0.95, HALF_RANGE, HALF_RANGE,
    ),
}


def pop_backbone_kwargs(kwargs, extra=()):
    """Remove and return the entries of `kwargs` that are `DToPBackbone` arguments (or in `extra`)."""
    from keras_dtop.models.backbone import DToPBackbone

    names = set(inspect.signature(DToPBackbone.__init__).parameters) - {"self", "kwargs"}
    names |= set(extra)
    return {key: kwargs.pop(key) for key in list(kwargs) if key in names}


def mean_std_preprocessor(mean, std):
    """A `DToPImageSegmenterPreprocessor` computing `(x - mean) / std` (0-255 scale)."""
    from keras_dtop.models.preprocessor import (
        DToPImageConverter,
        DToPImageSegmenterPreprocessor,
    )

    converter = DToPImageConverter.from_mean_std(mean, std)
    return DToPImageSegmenterPreprocessor(image_converter=converter)


def segmenter_from_preset(cls, preset, load_weights=True, **kwargs):
    """`cls.from_preset(preset)` for a name in `PRESETS`: random weights, kwargs override.

    These presets are architectures: no trained weights exist for them. With
    `load_weights=True` (keras-hub's default) a warning says so, so that a
    random model is never taken for a trained one; `load_weights=False`
    builds it quietly.
    """
    from keras_dtop.models.backbone import DToPBackbone

    if load_weights:
        warnings.warn(
            f"Preset {preset!r} is an architecture only: keras-dtop ships no trained weights "
            "for it, so the model is randomly initialised. Train it, start from a pretrained "
            "backbone (DToPSegmenter.from_pretrained_backbone) or load the authors' weights "
            "(keras_dtop.convert); pass load_weights=False to build it without this warning.",
            UserWarning,
            stacklevel=3,
        )

    spec = PRESETS[preset]
    backbone_config = dict(spec["backbone"])
    backbone_config.update(pop_backbone_kwargs(kwargs))
    segmenter_config = dict(spec["segmenter"])
    segmenter_config.update(kwargs)
    return cls(
        backbone=DToPBackbone(**backbone_config),
        preprocessor=mean_std_preprocessor(**spec["preprocessor"]),
        **segmenter_config,
    )


def segmenter_from_pretrained_backbone(
    cls, source, num_classes, image_size=None, stage_ends=None, mean=None, std=None, **kwargs
):
    """`cls.from_pretrained_backbone(source, ...)`: pretrained backbone, fresh heads."""
    from keras_dtop.convert.pretrained import pretrained_mean_std
    from keras_dtop.models.backbone import DToPBackbone

    backbone_kwargs = pop_backbone_kwargs(kwargs, extra=("keep_prefix_tokens", "trusted"))
    backbone = DToPBackbone.from_pretrained(
        source, image_size=image_size, stage_ends=stage_ends, **backbone_kwargs
    )
    default_mean, default_std = pretrained_mean_std(source)
    preprocessor = mean_std_preprocessor(
        default_mean if mean is None else mean, default_std if std is None else std
    )
    return cls(backbone=backbone, num_classes=num_classes, preprocessor=preprocessor, **kwargs)
