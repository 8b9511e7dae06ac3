"""DToPBackbone: a plain ViT (no class token, no final norm) split into stages."""

import keras
from keras_hub.models import Backbone

from keras_dtop.layers.patch_embedding import PatchEmbedding
from keras_dtop.layers.vit_block import DToPEncoderBlock


def default_stage_ends(num_layers):
    """0-based last layer of each of the 3 stages: the authors' boundaries.

    ViT-B (12 layers): (5, 7, 11); ViT-L (24 layers): (7, 15, 23). Other depths
    use the ViT-L proportions (thirds), which is what the 24-layer configs do.
    """
    if num_layers == 12:
        return (5, 7, 11)
    if num_layers < 3:
        return tuple(range(num_layers))
    third = num_layers // 3
    return (third - 1, 2 * third - 1, num_layers - 1)


def check_stage_ends(stage_ends, num_layers):
    """Validate stage boundaries: increasing 0-based layer indices ending at the last layer."""
    try:
        ends = tuple(int(e) for e in stage_ends)
    except TypeError:
        raise TypeError(f"stage_ends must be a sequence of ints, got {stage_ends!r}.") from None
    if not ends:
        raise ValueError("stage_ends must name at least one layer.")
    if any(e < 0 or e >= num_layers for e in ends):
        raise ValueError(
            f"stage_ends {ends} out of range: layers are 0-based, 0..{num_layers - 1}."
        )
    if any(b <= a for a, b in zip(ends, ends[1:])):
        raise ValueError(f"stage_ends must be strictly increasing, got {ends}.")
    if ends[-1] != num_layers - 1:
        raise ValueError(
            f"The last stage must end at the last layer ({num_layers - 1}), got stage_ends {ends}."
        )
    return ends


@keras.saving.register_keras_serializable(package="keras_dtop")
class DToPBackbone(Backbone):
    """Plain ViT backbone for DToP (design doc §2.1).

    Conv patch embedding, learned position embeddings resized bicubically to
    the input grid (any h×w), pre-norm encoder blocks with exact GELU, no class
    token and no final LayerNorm: the last head reads the last block's raw
    output. Called as a model it runs densely: images `(batch, H, W, 3)` ->
    tokens `(batch, H/p · W/p, hidden_dim)`. `DToPSegmenter` runs the same
    layers stage by stage with pruning in between.

    Args:
        patch_size: patch side p (16 for ViT-*/16).
        hidden_dim: token width D.
        num_layers: number of encoder blocks L.
        num_heads: attention heads.
        mlp_dim: MLP hidden width (4·D).
        image_size: (H, W) the position embeddings are laid out for; the grid
            is (H/p, W/p). Other input sizes are resized to.
        stage_ends: 0-based last layer of each stage; the last must be L-1.
            Defaults to the authors' boundaries (`default_stage_ends`).
        drop_path_rate: stochastic depth, rising linearly to this over layers.
        dropout_rate, attention_dropout: dropout in the blocks.
        layer_norm_epsilon: 1e-6 in ViT.
        num_channels: image channels.
        image_shape: model input shape; `(None, None, 3)` accepts any size.
    """

    def __init__(
        self,
        patch_size,
        hidden_dim,
        num_layers,
        num_heads,
        mlp_dim,
        image_size=(512, 512),
        stage_ends=None,
        drop_path_rate=0.0,
        dropout_rate=0.0,
        attention_dropout=0.0,
        layer_norm_epsilon=1e-6,
        num_channels=3,
        image_shape=(None, None, 3),
        dtype=None,
        **kwargs,
    ):
        for name, value in (
            ("patch_size", patch_size),
            ("hidden_dim", hidden_dim),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("mlp_dim", mlp_dim),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        image_size = tuple(int(s) for s in image_size)
        if len(image_size) != 2 or any(s % patch_size or s < patch_size for s in image_size):
            raise ValueError(
                f"image_size must be (H, W), multiples of patch_size {patch_size}, got {image_size}."
            )
        stage_ends = check_stage_ends(
            default_stage_ends(num_layers) if stage_ends is None else stage_ends, num_layers
        )
        grid_size = (image_size[0] // patch_size, image_size[1] // patch_size)

        # === Layers ===
        self.patch_embedding = PatchEmbedding(
            patch_size, hidden_dim, grid_size, num_channels, dtype=dtype, name="patch_embedding"
        )
        self.encoder_blocks = [
            DToPEncoderBlock(
                hidden_dim,
                num_heads,
                mlp_dim,
                dropout_rate=dropout_rate,
                attention_dropout=attention_dropout,
                drop_path_rate=drop_path_rate * i / max(num_layers - 1, 1),
                layer_norm_epsilon=layer_norm_epsilon,
                dtype=dtype,
                name=f"encoder_block_{i}",
            )
            for i in range(num_layers)
        ]

        # === Functional model (dense pass) ===
        images = keras.Input(shape=image_shape, name="images")
        x = self.patch_embedding(images)
        for block in self.encoder_blocks:
            x = block(x)
        super().__init__(inputs=images, outputs=x, dtype=dtype, **kwargs)

        # === Config ===
        self.patch_size = int(patch_size)
        self.hidden_dim = int(hidden_dim)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.mlp_dim = int(mlp_dim)
        self.image_size = image_size
        self.stage_ends = stage_ends
        self.drop_path_rate = float(drop_path_rate)
        self.dropout_rate = float(dropout_rate)
        self.attention_dropout = float(attention_dropout)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.num_channels = int(num_channels)
        self.image_shape = tuple(image_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            patch_size=self.patch_size,
            hidden_dim=self.hidden_dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            image_size=self.image_size,
            stage_ends=self.stage_ends,
            drop_path_rate=self.drop_path_rate,
            dropout_rate=self.dropout_rate,
            attention_dropout=self.attention_dropout,
            layer_norm_epsilon=self.layer_norm_epsilon,
            num_channels=self.num_channels,
            image_shape=self.image_shape,
        )
        return config

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Build from a keras-dtop architecture preset name, else defer to keras-hub.

        keras-dtop presets (`keras_dtop.presets`) are architectures with random
        weights; keras-hub's own preset loader handles directories and handles.
        """
        from keras_dtop.models import presets

        if preset in presets.PRESETS:
            config = dict(presets.PRESETS[preset]["backbone"])
            config.update(kwargs)
            return cls(**config)
        return super().from_preset(preset, load_weights=load_weights, **kwargs)
