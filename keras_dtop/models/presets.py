"""Named DToP architectures (random initialisation: no released weights exist).

Defaults follow the design doc: ViT-B/16 at 512 with p0 = 0.9 and a 384-wide
6-head grading head (ADE20K config), ViT-L/16 at 640 with p0 = 0.95 and a
512-wide 8-head head. Tiny and Small are our additions at the ViT-B recipe.
"""

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
HALF_RANGE = (127.5, 127.5, 127.5)


def _preset(description, width, depth, heads, drop_path, image, head_dim, head_heads, p0, mean, std):
    return {
        "description": description,
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
