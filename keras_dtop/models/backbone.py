"""DToPBackbone: a plain ViT (no final norm, optional prefix tokens) split into stages."""

import numbers

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
    if isinstance(stage_ends, (str, bytes)) or not all(
        isinstance(e, numbers.Integral) and not isinstance(e, bool)
        for e in (stage_ends if hasattr(stage_ends, "__iter__") else [None])
    ):
        raise TypeError(f"stage_ends must be a sequence of ints, got {stage_ends!r}.")
    ends = tuple(int(e) for e in stage_ends)
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
    the input grid (any h×w), pre-norm encoder blocks with exact GELU and no
    final LayerNorm: the last head reads the last block's raw output. The
    authors' ViT has no prefix tokens; pretrained backbones may keep a class
    token and DINOv2 registers in the sequence (`class_token`,
    `num_register_tokens`): they run through every layer, every token attends
    to them, and they are never graded or pruned.

    Called as a model it runs densely: images `(batch, H, W, 3)` -> tokens
    `(batch, P + H/p · W/p, hidden_dim)`, the P prefix tokens first.
    `DToPSegmenter` runs the same layers stage by stage with pruning in
    between. `from_pretrained` loads keras-hub, Hugging Face and timm ViT /
    DINOv2 weights (`keras_dtop.convert.pretrained`).

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
        layer_norm_epsilon: 1e-6 in ViT (1e-12 in Hugging Face's ViT).
        class_token: keep a class token in front of the patch tokens.
        num_register_tokens: DINOv2 register tokens after the class token.
        layer_scale_init: None, or LayerScale's initial value (DINOv2: 1e-5).
        position_resize: "bicubic" (PyTorch's plain bicubic, the authors' and
            Hugging Face's) or "bicubic_antialias" (timm, DINOv2 with registers).
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
        class_token=False,
        num_register_tokens=0,
        layer_scale_init=None,
        position_resize="bicubic",
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
        if int(num_register_tokens) < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}.")
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
            patch_size,
            hidden_dim,
            grid_size,
            num_channels,
            num_prefix_tokens=int(bool(class_token)) + int(num_register_tokens),
            position_resize=position_resize,
            dtype=dtype,
            name="patch_embedding",
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
                layer_scale_init=layer_scale_init,
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
        self.class_token = bool(class_token)
        self.num_register_tokens = int(num_register_tokens)
        self.layer_scale_init = None if layer_scale_init is None else float(layer_scale_init)
        self.position_resize = position_resize
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
            class_token=self.class_token,
            num_register_tokens=self.num_register_tokens,
            layer_scale_init=self.layer_scale_init,
            position_resize=self.position_resize,
            num_channels=self.num_channels,
            image_shape=self.image_shape,
        )
        return config

    @property
    def num_prefix_tokens(self):
        """P: tokens in front of the patch tokens (class token + registers)."""
        return self.patch_embedding.num_prefix_tokens

    @classmethod
    def from_pretrained(cls, source, image_size=None, stage_ends=None, **kwargs):
        """A backbone with pretrained ViT / DINOv2 weights.

        source: a keras-hub `ViTBackbone` (or its preset directory or name), a
        Hugging Face `ViTModel` / `Dinov2Model` / `Dinov2WithRegistersModel`
        folder (`config.json` + weights) or hub id, or a timm state-dict file
        (`.safetensors`, `.pth`, `.npz`). See `keras_dtop.convert.pretrained`.
        """
        from keras_dtop.convert.pretrained import backbone_from_pretrained

        return backbone_from_pretrained(source, image_size=image_size, stage_ends=stage_ends, **kwargs)

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
