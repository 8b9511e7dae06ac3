"""Pre-norm ViT encoder block that honours a keep mask."""

import keras
from keras import ops

from keras_dtop.layers.attention import attend, attention_logits, key_bias
from keras_dtop.layers.token_layout import gather_rows


@keras.saving.register_keras_serializable(package="keras_dtop")
class DToPEncoderBlock(keras.layers.Layer):
    """ViT encoder block: `x + attn(LN(x))`, then `x + MLP(LN(x))`, with a keep mask.

    Tokens whose keep mask is False are neither queries nor keys: they are
    excluded from every softmax by an additive bias and their outputs are set
    to zero, exactly as the authors' code drops them.

    Weights are created in the same order and shapes as keras-hub's
    `ViTEncoderBlock` (`ln_1`, query/key/value/output `EinsumDense`, `ln_2`,
    MLP `dense_1`, `dense_2`), so `block.set_weights(hub_block.get_weights())`
    copies a keras-hub block one to one. Unlike keras-hub's block it adds
    stochastic depth (`drop_path_rate`) and optional LayerScale (DINOv2: each
    residual branch times a learned per-channel `layer_scale_1` /
    `layer_scale_2`, created after the other weights).

    Args:
        hidden_dim: token width `D`.
        num_heads: attention heads; `D` must be divisible by it.
        mlp_dim: hidden width of the MLP (4·D in ViT).
        dropout_rate: dropout after attention and in the MLP.
        attention_dropout: dropout on attention weights.
        drop_path_rate: probability of skipping a residual branch per sample.
        layer_norm_epsilon: LayerNorm epsilon (1e-6 in ViT).
        layer_scale_init: None (no LayerScale) or the initial LayerScale value.

    Call arguments:
        x: `(batch, tokens, hidden_dim)`.
        keep_mask: optional bool `(batch, tokens)`; None keeps every token.
        training: enables dropout and stochastic depth.

    Returns `(batch, tokens, hidden_dim)`, zero at pruned tokens.
    """

    def __init__(
        self,
        hidden_dim,
        num_heads,
        mlp_dim,
        dropout_rate=0.0,
        attention_dropout=0.0,
        drop_path_rate=0.0,
        layer_norm_epsilon=1e-6,
        layer_scale_init=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if hidden_dim % num_heads:
            raise ValueError(
                f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})."
            )
        self.hidden_dim = int(hidden_dim)
        self.num_heads = int(num_heads)
        self.mlp_dim = int(mlp_dim)
        self.dropout_rate = float(dropout_rate)
        self.attention_dropout = float(attention_dropout)
        self.drop_path_rate = float(drop_path_rate)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.layer_scale_init = None if layer_scale_init is None else float(layer_scale_init)
        self.head_dim = self.hidden_dim // self.num_heads
        policy = self.dtype_policy
        self.layer_norm_1 = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=policy, name="ln_1"
        )
        projection = dict(
            equation="abc,cde->abde",
            output_shape=(None, self.num_heads, self.head_dim),
            bias_axes="de",
            dtype=policy,
        )
        self.query_dense = keras.layers.EinsumDense(**projection, name="query")
        self.key_dense = keras.layers.EinsumDense(**projection, name="key")
        self.value_dense = keras.layers.EinsumDense(**projection, name="value")
        self.output_dense = keras.layers.EinsumDense(
            "abcd,cde->abe",
            output_shape=(None, self.hidden_dim),
            bias_axes="e",
            dtype=policy,
            name="attention_output",
        )
        self.layer_norm_2 = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=policy, name="ln_2"
        )
        self.mlp_dense_1 = keras.layers.Dense(
            self.mlp_dim, activation="gelu", dtype=policy, name="dense_1"
        )
        self.mlp_dense_2 = keras.layers.Dense(
            self.hidden_dim, dtype=policy, name="dense_2"
        )
        self.attention_dropout_layer = keras.layers.Dropout(
            self.attention_dropout, dtype=policy, name="attention_dropout"
        )
        self.dropout = keras.layers.Dropout(
            self.dropout_rate, dtype=policy, name="dropout"
        )
        # Stochastic depth: one Bernoulli draw per sample, broadcast over tokens.
        self.drop_path = keras.layers.Dropout(
            self.drop_path_rate, noise_shape=(None, 1, 1), dtype=policy, name="drop_path"
        )

    def build(self, input_shape):
        token_shape = (None, None, self.hidden_dim)
        self.layer_norm_1.build(token_shape)
        self.query_dense.build(token_shape)
        self.key_dense.build(token_shape)
        self.value_dense.build(token_shape)
        self.output_dense.build((None, None, self.num_heads, self.head_dim))
        self.layer_norm_2.build(token_shape)
        self.mlp_dense_1.build(token_shape)
        self.mlp_dense_2.build((None, None, self.mlp_dim))
        if self.layer_scale_init is not None:
            init = keras.initializers.Constant(self.layer_scale_init)
            self.layer_scale_1 = self.add_weight(
                shape=(self.hidden_dim,), initializer=init, name="layer_scale_1"
            )
            self.layer_scale_2 = self.add_weight(
                shape=(self.hidden_dim,), initializer=init, name="layer_scale_2"
            )
        self.built = True

    def _scale(self, h, which):
        if self.layer_scale_init is None:
            return h
        gamma = self.layer_scale_1 if which == 1 else self.layer_scale_2
        return h * ops.cast(gamma, h.dtype)

    def call(self, x, keep_mask=None, training=None):
        h = self.layer_norm_1(x)
        query = self.query_dense(h)
        key = self.key_dense(h)
        value = self.value_dense(h)
        bias = None if keep_mask is None else key_bias(keep_mask, query.dtype)
        logits = attention_logits(query, key, self.head_dim**-0.5)
        h = attend(logits, value, bias, self.attention_dropout_layer, training)
        h = self.dropout(self.output_dense(h), training=training)
        x = x + self.drop_path(self._scale(h, 1), training=training)
        x = self._mlp_residual(x, training)
        if keep_mask is not None:
            x = ops.where(keep_mask[:, :, None], x, ops.zeros_like(x))
        return x

    def call_packed(self, x, slot_row, row_slot, bias):
        """Inference on packed rows: per-token layers on all rows, attention per image.

        x: `(1, rows, hidden_dim)`, the alive tokens of a batch back to back
        (see `keras_dtop.layers.token_layout.packed_layout`); slot_row
        `(batch, slots)` and row_slot `(rows,)` move rows to padded slots and
        back; bias `(batch, 1, 1, slots)` masks padding slots out as keys.
        Returns `(1, rows, hidden_dim)`; padding rows hold unused values.
        """
        h = self.layer_norm_1(x)

        def to_slots(projected):  # (1, rows, heads, head_dim) -> (batch, slots, heads, head_dim)
            return gather_rows(projected[0], slot_row)

        query = to_slots(self.query_dense(h))
        key = to_slots(self.key_dense(h))
        value = to_slots(self.value_dense(h))
        h = attend(attention_logits(query, key, self.head_dim**-0.5), value, bias)
        h = ops.reshape(h, (-1, self.num_heads, self.head_dim))
        x = x + self._scale(self.output_dense(gather_rows(h, row_slot)[None]), 1)
        return self._mlp_residual(x, training=False)

    def call_ragged(self, x, counts):
        """Inference on packed rows with exact per-image attention (no padding).

        x: `(1, rows, hidden_dim)`, image b's alive tokens in the contiguous
        rows `[c_0 + ... + c_(b-1), ... + c_b)`; counts: `(c_0, ..., c_(B-1))`,
        ints or scalar tensors summing to `rows`. Per-token layers run on all
        rows at once; attention runs image by image on its own rows, so an
        image costs what its alive tokens cost. Needs dynamic shapes
        (TensorFlow graphs, PyTorch); returns `(1, rows, hidden_dim)`.
        """
        h = self.layer_norm_1(x)
        query, key, value = self.query_dense(h), self.key_dense(h), self.value_dense(h)
        scale = self.head_dim**-0.5
        outputs, start = [], 0
        for count in counts:
            shape = (1, count, self.num_heads, self.head_dim)
            begin = (0, start, 0, 0)
            q, k, v = (ops.slice(t, begin, shape) for t in (query, key, value))
            outputs.append(attend(attention_logits(q, k, scale), v))
            start = start + count
        h = outputs[0] if len(outputs) == 1 else ops.concatenate(outputs, axis=1)
        x = x + self._scale(self.output_dense(h), 1)
        return self._mlp_residual(x, training=False)

    def _mlp_residual(self, x, training):
        h = self.mlp_dense_2(self.dropout(self.mlp_dense_1(self.layer_norm_2(x)), training=training))
        h = self._scale(self.dropout(h, training=training), 2)
        return x + self.drop_path(h, training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dropout_rate=self.dropout_rate,
            attention_dropout=self.attention_dropout,
            drop_path_rate=self.drop_path_rate,
            layer_norm_epsilon=self.layer_norm_epsilon,
            layer_scale_init=self.layer_scale_init,
        )
        return config
