"""Patch embedding with learned position embeddings resized to the input grid."""

import keras
from keras import ops


def bicubic_resize_matrix(out_size, in_size, dtype="float32"):
    """`(out_size, in_size)` matrix applying 1-D bicubic resizing along an axis.

    Matches PyTorch's `interpolate(mode="bicubic", align_corners=False)`
    (cubic coefficient -0.75, half-pixel centres, edge taps clamped), which is
    how the authors resize position embeddings. `out_size` may be a tensor,
    so the same code works for dynamic shapes in TF graphs.
    """
    a = -0.75
    out_f = ops.cast(out_size, "float32")
    src = (ops.arange(out_size, dtype="float32") + 0.5) * (float(in_size) / out_f) - 0.5
    base = ops.floor(src)
    t = src - base

    def near(x):  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

    weights = (far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t))
    matrix = 0.0
    for offset, weight in zip((-1, 0, 1, 2), weights):
        tap = ops.clip(ops.cast(base, "int32") + offset, 0, in_size - 1)
        matrix = matrix + ops.one_hot(tap, in_size, dtype="float32") * weight[:, None]
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
    """Images `(batch, H, W, channels)` -> tokens `(batch, H/p · W/p, hidden_dim)`.

    A strided convolution embeds each p×p patch; a learned position embedding
    for a `grid_size` grid is added, resized bicubically when the input grid
    differs (any h×w, non-square included). Tokens are in row-major order.
    No class token (DToP drops it).
    """

    def __init__(self, patch_size, hidden_dim, grid_size, num_channels=3, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)
        self.hidden_dim = int(hidden_dim)
        self.grid_size = tuple(int(g) for g in grid_size)
        self.num_channels = int(num_channels)
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
        self.built = True

    def position_embedding_for(self, grid_h, grid_w):
        """Position embeddings `(grid_h, grid_w, hidden_dim)`, resized if needed."""
        table = ops.cast(self.position_embedding, self.compute_dtype)
        static = isinstance(grid_h, int) and isinstance(grid_w, int)
        if static and (grid_h, grid_w) == self.grid_size:
            return table
        rows = bicubic_resize_matrix(grid_h, self.grid_size[0], self.compute_dtype)
        cols = bicubic_resize_matrix(grid_w, self.grid_size[1], self.compute_dtype)
        return ops.einsum("ih,jw,hwd->ijd", rows, cols, table)

    def call(self, images):
        check_image_shape(tuple(images.shape), self.patch_size, self.num_channels)
        x = self.projection(ops.cast(images, self.compute_dtype))
        shape = ops.shape(x)
        x = x + self.position_embedding_for(shape[1], shape[2])[None]
        return ops.reshape(x, (shape[0], shape[1] * shape[2], self.hidden_dim))

    def compute_output_shape(self, input_shape):
        check_image_shape(tuple(input_shape), self.patch_size, self.num_channels)
        _, height, width, _ = input_shape
        tokens = None
        if height is not None and width is not None:
            tokens = (height // self.patch_size) * (width // self.patch_size)
        return (input_shape[0], tokens, self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            patch_size=self.patch_size,
            hidden_dim=self.hidden_dim,
            grid_size=self.grid_size,
            num_channels=self.num_channels,
        )
        return config
