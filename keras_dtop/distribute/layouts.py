"""`keras.distribution` set-ups for DToP models (JAX backend).

`data_parallel` replicates the weights and splits the global batch over the
devices. `model_parallel` adds a "model" mesh axis and shards the large
kernels Megatron-style: attention by heads (query/key/value on their head
axis, the output projection on its input), MLPs by hidden units (first layer
on its outputs, second on its inputs), in the encoder blocks and in every
grading head's decoder. Everything else (norms, embeddings, class queries,
presence layer) is replicated. Set either before building the model:

    keras.distribution.set_distribution(keras_dtop.distribute.model_parallel(model_size=2))
    model = keras_dtop.DToPSegmenter.from_preset("dtop_vit_large", num_classes=150, load_weights=False)
"""

import keras

# (variable path pattern, layout) for paths such as "encoder_block_3/query/kernel"
# or "grading_head_1/decoder_layer_0/linear1/kernel"; Keras matches the whole path.
_SHARDED = (
    # Encoder blocks and the heads' self-attention: (dim, heads, head_dim) kernels.
    (r"(.*/)?(encoder_block_\d+|self_attn)/(query|key|value)/kernel$", (None, "model", None)),
    (r"(.*/)?(encoder_block_\d+|self_attn)/(query|key|value)/bias$", ("model", None)),
    (r"(.*/)?(encoder_block_\d+|self_attn)/attention_output/kernel$", ("model", None, None)),
    (r"(.*/)?encoder_block_\d+/dense_1/kernel$", (None, "model")),
    (r"(.*/)?encoder_block_\d+/dense_1/bias$", ("model",)),
    (r"(.*/)?encoder_block_\d+/dense_2/kernel$", ("model", None)),
    # The heads' cross-attention (dim, dim) and MLP.
    (r"(.*/)?multihead_attn/(q|k|v)/kernel$", (None, "model")),
    (r"(.*/)?multihead_attn/(q|k|v)/bias$", ("model",)),
    (r"(.*/)?multihead_attn/proj/kernel$", ("model", None)),
    (r"(.*/)?decoder_layer_\d+/linear1/kernel$", (None, "model")),
    (r"(.*/)?decoder_layer_\d+/linear1/bias$", ("model",)),
    (r"(.*/)?decoder_layer_\d+/linear2/kernel$", ("model", None)),
)


def layout_map(device_mesh, model_axis="model"):
    """A `keras.distribution.LayoutMap` sharding DToP's big kernels over `model_axis`.

    The sharded sizes (heads, MLP widths, head hidden dims) must be multiples
    of the mesh's `model_axis` size.
    """
    layouts = keras.distribution.LayoutMap(device_mesh)
    for pattern, axes in _SHARDED:
        layouts[pattern] = tuple(model_axis if a == "model" else a for a in axes)
    return layouts


def _devices(devices):
    devices = list(devices) if devices is not None else keras.distribution.list_devices()
    if not devices:
        raise ValueError("No devices to distribute over.")
    return devices


def data_parallel(devices=None):
    """`keras.distribution.DataParallel` over `devices` (default: all of them)."""
    return keras.distribution.DataParallel(devices=_devices(devices))


def model_parallel(model_size=None, devices=None):
    """`keras.distribution.ModelParallel` on a `(batch, model)` mesh with `layout_map`.

    model_size: devices per model replica (default: all, so no data
    parallelism); the rest of the devices split the batch.
    """
    devices = _devices(devices)
    model_size = len(devices) if model_size is None else int(model_size)
    if model_size < 1 or len(devices) % model_size:
        raise ValueError(f"model_size must divide the device count {len(devices)}, got {model_size}.")
    mesh = keras.distribution.DeviceMesh(
        (len(devices) // model_size, model_size), ("batch", "model"), devices
    )
    return keras.distribution.ModelParallel(layout_map=layout_map(mesh), batch_dim_name="batch")
