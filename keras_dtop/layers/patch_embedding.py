"""Patch embedding with learned position embeddings resized to the input grid."""

import keras
from keras import ops


POSITION_RESIZE_MODES = ("bicubic", "bicubic_antialias")


def _cubic(x, a):
    """Keys' cubic convolution kernel with coefficient `a`, zero for |x| >= 2."""
    x = ops.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return ops.where(x < 1.0, near, ops.where(x < 2.0, far, 0.0))


def bicubic_resize_matrix(out_size, in_size, dtype="float32", antialias=False):
    """`(out_size, in_size)` matrix applying 1-D bicubic resizing along an axis.

    antialias False matches PyTorch's `interpolate(mode="bicubic",
    align_corners=False)` (cubic coefficient -0.75, half-pixel centres, edge
    taps clamped): how the authors, Hugging Face ViT and DINOv2 resize
    position embeddings. antialias True matches `antialias=True` (coefficient
    -0.5, the kernel widened by the scale when shrinking, taps past the edge
    dropped and the rest renormalised): timm and DINOv2 with registers.
    `out_size` may be a tensor, so the same code works for dynamic shapes in
    TF graphs.
    """
    out_f = ops.cast(out_size, "float32")
    scale = float(in_size) / out_f
    if antialias:
        centre = (ops.arange(out_size, dtype="float32") + 0.5) * scale
        stretch = ops.maximum(scale, 1.0)
        taps = ops.arange(in_size, dtype="float32") + 0.5
        weights = _cubic((taps[None, :] - centre[:, None]) / stretch, -0.5)
        matrix = weights / ops.sum(weights, axis=1, keepdims=True)
        return ops.cast(matrix, dtype)
    src = (ops.arange(out_size, dtype="float32") + 0.5) * scale - 0.5
    base = ops.floor(src)
    t = src - base
    matrix = 0.0
    for offset in (-1, 0, 1, 2):
        tap = ops.clip(ops.cast(base, "int32") + offset, 0, in_size - 1)
        matrix = matrix + ops.one_hot(tap, in_size, dtype="float32") * _cubic(t - offset, -0.75)[:, None]
    return ops.cast(matrix, dtype)


def check_image_shape(shape, patch_size, num_channels):
    """Raise a ValueError naming the problem if `shape` is not a valid image batch."""
    if len(shape) != 4:
        raise ValueError(
            "Expected images of shape (batch, height, width, channels), got rank "
            f"{len(shape)} with shape {tuple(shape)}."
        )
    if shape[-1] is not None and shape[-1] != num_channels:
        raise ValueError(
            f"Expected {num_channels} image channels (channels last), got shape {tuple(shape)}."
        )
    for axis, size in (("height", shape[1]), ("width", shape[2])):
        if size is not None and (size < patch_size or size % patch_size):
            raise ValueError(
                f"Image {axis} must be a positive multiple of the patch size "
                f"{patch_size}, got {size} (image shape {tuple(shape)})."
            )


@keras.saving.register_keras_serializable(package="keras_dtop")
class PatchEmbedding(keras.layers.Layer):
    """Images `(batch, H, W, channels)` -> tokens `(batch, P + H/p · W/p, hidden_dim)`.

    A strided convolution embeds each p×p patch; a learned position embedding
    for a `grid_size` grid is added, resized bicubically when the input grid
    differs (any h×w, non-square included; `position_resize` picks PyTorch's
    plain or antialiased bicubic). Tokens are in row-major order.

    Prefix tokens (a class token, DINOv2's registers) are optional: the
    `(num_prefix_tokens, hidden_dim)` weight `prefix_tokens` holds each one
    with its position embedding already added (checkpoints store the two
    apart; prefix positions are never resized, so the sum is the same model).
    They lead the output sequence. The authors' DToP drops the class token
    (`num_prefix_tokens=0`).
    """

    def __init__(
        self,
        patch_size,
        hidden_dim,
        grid_size,
        num_channels=3,
        num_prefix_tokens=0,
        position_resize="bicubic",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if position_resize not in POSITION_RESIZE_MODES:
            raise ValueError(
                f"position_resize must be one of {POSITION_RESIZE_MODES}, got {position_resize!r}."
            )
        if int(num_prefix_tokens) < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}.")
        self.patch_size = int(patch_size)
        self.hidden_dim = int(hidden_dim)
        self.grid_size = tuple(int(g) for g in grid_size)
        self.num_channels = int(num_channels)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.position_resize = position_resize
        self.projection = keras.layers.Conv2D(
            self.hidden_dim,
            kernel_size=self.patch_size,
            strides=self.patch_size,
            padding="valid",
            data_format="channels_last",
            dtype=self.dtype_policy,
            name="patch_embedding",
        )

    def build(self, input_shape):
        self.projection.build((None, None, None, self.num_channels))
        self.position_embedding = self.add_weight(
            shape=(self.grid_size[0], self.grid_size[1], self.hidden_dim),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            name="position_embedding",
        )
        if self.num_prefix_tokens:
            self.prefix_tokens = self.add_weight(
                shape=(self.num_prefix_tokens, self.hidden_dim),
                initializer=keras.initializers.TruncatedNormal(stddev=0.02),
                name="prefix_tokens",
            )
        self.built = True

    def _with_prefix(self, tokens):
        # Broadcast by addition: works for symbolic (None) batch sizes too.
        prefix = ops.zeros_like(tokens[:, :1, :1]) + ops.cast(self.prefix_tokens, tokens.dtype)[None]
        return ops.concatenate([prefix, tokens], axis=1)

    def position_embedding_for(self, grid_h, grid_w):
        """Position embeddings `(grid_h, grid_w, hidden_dim)`, resized if needed."""
        table = ops.cast(self.position_embedding, self.compute_dtype)
        static = isinstance(grid_h, int) and isinstance(grid_w, int)
        if static and (grid_h, grid_w) == self.grid_size:
            return table
        antialias = self.position_resize == "bicubic_antialias"
        rows = bicubic_resize_matrix(grid_h, self.grid_size[0], self.compute_dtype, antialias)
        cols = bicubic_resize_matrix(grid_w, self.grid_size[1], self.compute_dtype, antialias)
        return ops.einsum("ih,jw,hwd->ijd", rows, cols, table)

    def call(self, images):
        check_image_shape(tuple(images.shape), self.patch_size, self.num_channels)
        x = self.projection(ops.cast(images, self.compute_dtype))
        shape = ops.shape(x)
        x = x + self.position_embedding_for(shape[1], shape[2])[None]
        x = ops.reshape(x, (shape[0], shape[1] * shape[2], self.hidden_dim))
        return self._with_prefix(x) if self.num_prefix_tokens else x

    def compute_output_shape(self, input_shape):
        check_image_shape(tuple(input_shape), self.patch_size, self.num_channels)
        _, height, width, _ = input_shape
        tokens = None
        if height is not None and width is not None:
            tokens = self.num_prefix_tokens + (height // self.patch_size) * (width // self.patch_size)
        return (input_shape[0], tokens, self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            patch_size=self.patch_size,
            hidden_dim=self.hidden_dim,
            grid_size=self.grid_size,
            num_channels=self.num_channels,
            num_prefix_tokens=self.num_prefix_tokens,
            position_resize=self.position_resize,
        )
        return config
