"""keras-hub `ViTBackbone` -> `DToPBackbone`.

Our encoder block creates its weights in the order and shapes of keras-hub's
`ViTEncoderBlock`, so blocks copy one to one. keras-hub's final LayerNorm is
not used (DToP's heads read the last block's output), so the backbone equals
the keras-hub model's last encoder block, before that norm.
"""

import numpy as np
from keras import ops

from keras_dtop.convert.vit_layout import build_backbone, resize_positions, target_grid


def architecture_from_keras_hub(hub):
    if hub.data_format != "channels_last":
        raise ValueError("Only channels_last keras-hub ViTBackbones are supported.")
    if not (hub.use_mha_bias and hub.use_mlp_bias):
        raise ValueError("keras-hub ViTBackbones without attention or MLP biases are not supported.")
    patch = hub.patch_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return dict(
        patch_size=int(patch),
        hidden_dim=int(hub.hidden_dim),
        num_layers=int(hub.num_layers),
        num_heads=int(hub.num_heads),
        mlp_dim=int(hub.mlp_dim),
        layer_norm_epsilon=float(hub.layer_norm_epsilon),
        num_channels=int(hub.image_shape[-1]),
        class_token=bool(hub.use_class_token),
        dropout_rate=float(hub.dropout_rate),
        attention_dropout=float(hub.attention_dropout),
    )


def backbone_from_keras_hub(hub, image_size=None, stage_ends=None, keep_prefix_tokens=True, **overrides):
    """`DToPBackbone` with the weights of a keras-hub `ViTBackbone` instance.

    image_size: None keeps the keras-hub position grid (other input sizes are
    resized at call time); (H, W) resizes the table once now.
    keep_prefix_tokens: False drops the class token.
    """
    architecture = architecture_from_keras_hub(hub)
    has_class = architecture["class_token"]
    if not keep_prefix_tokens:
        architecture["class_token"] = False
    embedding = hub.get_layer("vit_patching_and_embedding")
    encoder = hub.get_layer("vit_encoder")
    patch = architecture["patch_size"]
    checkpoint_grid = (hub.image_shape[0] // patch, hub.image_shape[1] // patch)
    grid = target_grid(image_size, patch, checkpoint_grid)
    backbone = build_backbone(architecture, grid, stage_ends, overrides)

    positions = ops.convert_to_numpy(embedding.position_embedding.embeddings)
    patch_table = positions[int(has_class) :].reshape(*checkpoint_grid, -1)
    target = backbone.patch_embedding
    target.position_embedding.assign(resize_positions(patch_table, target))
    target.projection.kernel.assign(embedding.patch_embedding.kernel)
    if embedding.use_patch_bias:
        target.projection.bias.assign(embedding.patch_embedding.bias)
    else:
        target.projection.bias.assign(np.zeros(tuple(target.projection.bias.shape), "float32"))
    if architecture["class_token"]:
        class_token = ops.convert_to_numpy(embedding.class_token).reshape(1, -1)
        target.prefix_tokens.assign(class_token + positions[:1])
    for ours, theirs in zip(backbone.encoder_blocks, encoder.encoder_layers):
        weights = theirs.get_weights()
        shapes = [tuple(w.shape) for w in ours.weights]
        if [tuple(w.shape) for w in weights] != shapes:
            raise ValueError(
                f"keras-hub block {theirs.name} weights {[w.shape for w in weights]} do not "
                f"fit {ours.name} {shapes}."
            )
        ours.set_weights(weights)
    return backbone
