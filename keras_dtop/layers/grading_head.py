"""ATM-style grading head: one learnable query per class attends to the tokens.

For every class it predicts presence logits `(batch, classes, 2)` ([present,
no-object]) and per-token mask logits `(batch, classes, tokens)`: the last
decoder layer's cross-attention scaled dot products (before the softmax),
averaged over heads. Keras' `MultiHeadAttention` only exposes post-softmax
weights, so the cross-attention is written out here.
"""

import keras
from keras import ops

from keras_dtop.layers.attention import attend, attention_logits, key_bias

_TRUNC_NORMAL = keras.initializers.TruncatedNormal(stddev=0.02)


def _dense(units, name, policy, activation=None):
    return keras.layers.Dense(
        units,
        activation=activation,
        kernel_initializer=_TRUNC_NORMAL,
        bias_initializer="zeros",
        dtype=policy,
        name=name,
    )


@keras.saving.register_keras_serializable(package="keras_dtop")
class ClassTokenCrossAttention(keras.layers.Layer):
    """Cross-attention from class queries to tokens that also returns its logits.

    Call: `queries (batch, classes, dim)`, `tokens (batch, tokens, dim)`,
    optional key bias `(batch, 1, 1, tokens)`. Returns the attended queries
    `(batch, classes, dim)` and the head-averaged pre-softmax logits
    `(batch, classes, tokens)`.
    """

    def __init__(self, hidden_dim, num_heads, attention_dropout=0.1, **kwargs):
        super().__init__(**kwargs)
        if hidden_dim % num_heads:
            raise ValueError(
                f"head hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})."
            )
        self.hidden_dim = int(hidden_dim)
        self.num_heads = int(num_heads)
        self.attention_dropout = float(attention_dropout)
        self.head_dim = self.hidden_dim // self.num_heads
        policy = self.dtype_policy
        self.query_dense = _dense(self.hidden_dim, "q", policy)
        self.key_dense = _dense(self.hidden_dim, "k", policy)
        self.value_dense = _dense(self.hidden_dim, "v", policy)
        self.output_dense = _dense(self.hidden_dim, "proj", policy)
        self.dropout = keras.layers.Dropout(self.attention_dropout, dtype=policy)

    def build(self, queries_shape, tokens_shape=None):
        shape = (None, None, self.hidden_dim)
        for layer in (self.query_dense, self.key_dense, self.value_dense, self.output_dense):
            layer.build(shape)
        self.built = True

    def _split_heads(self, x):
        shape = ops.shape(x)
        return ops.reshape(x, (shape[0], shape[1], self.num_heads, self.head_dim))

    def call(self, queries, tokens, bias=None, training=None):
        q = self._split_heads(self.query_dense(queries))
        k = self._split_heads(self.key_dense(tokens))
        v = self._split_heads(self.value_dense(tokens))
        logits = attention_logits(q, k, self.head_dim**-0.5)
        out = attend(logits, v, bias, self.dropout, training)
        shape = ops.shape(out)
        out = self.output_dense(ops.reshape(out, (shape[0], shape[1], self.hidden_dim)))
        return out, ops.mean(logits, axis=1)

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            num_heads=self.num_heads,
            attention_dropout=self.attention_dropout,
        )
        return config


@keras.saving.register_keras_serializable(package="keras_dtop")
class GradingDecoderLayer(keras.layers.Layer):
    """Post-norm decoder layer over class queries.

    Query self-attention -> add & LN; cross-attention to the alive tokens ->
    add & LN; FFN (ReLU) -> add & LN. Returns the new queries
    `(batch, classes, dim)` and the cross-attention logits `(batch, classes, tokens)`.
    """

    def __init__(
        self, hidden_dim, num_heads, mlp_ratio=4, dropout=0.1, layer_norm_epsilon=1e-5, **kwargs
    ):
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.num_heads = int(num_heads)
        self.mlp_ratio = mlp_ratio
        self.dropout_rate = float(dropout)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        policy = self.dtype_policy
        eps = self.layer_norm_epsilon
        self.self_attention = keras.layers.MultiHeadAttention(
            num_heads=self.num_heads,
            key_dim=self.hidden_dim // self.num_heads,
            dropout=self.dropout_rate,
            kernel_initializer=_TRUNC_NORMAL,
            dtype=policy,
            name="self_attn",
        )
        self.norm_1 = keras.layers.LayerNormalization(epsilon=eps, dtype=policy, name="norm1")
        self.cross_attention = ClassTokenCrossAttention(
            self.hidden_dim, self.num_heads, self.dropout_rate, dtype=policy, name="multihead_attn"
        )
        self.norm_2 = keras.layers.LayerNormalization(epsilon=eps, dtype=policy, name="norm2")
        self.ffn_1 = _dense(int(self.hidden_dim * mlp_ratio), "linear1", policy, "relu")
        self.ffn_2 = _dense(self.hidden_dim, "linear2", policy)
        self.norm_3 = keras.layers.LayerNormalization(epsilon=eps, dtype=policy, name="norm3")
        self.dropout = keras.layers.Dropout(self.dropout_rate, dtype=policy)

    def build(self, queries_shape, tokens_shape=None):
        shape = (None, None, self.hidden_dim)
        self.self_attention.build(shape, shape)
        self.cross_attention.build(shape, shape)
        for norm in (self.norm_1, self.norm_2, self.norm_3):
            norm.build(shape)
        self.ffn_1.build(shape)
        self.ffn_2.build((None, None, int(self.hidden_dim * self.mlp_ratio)))
        self.built = True

    def call(self, queries, tokens, bias=None, training=None):
        h = self.self_attention(queries, queries, training=training)
        queries = self.norm_1(queries + self.dropout(h, training=training))
        h, logits = self.cross_attention(queries, tokens, bias, training=training)
        queries = self.norm_2(queries + self.dropout(h, training=training))
        h = self.ffn_2(self.dropout(self.ffn_1(queries), training=training))
        queries = self.norm_3(queries + self.dropout(h, training=training))
        return queries, logits

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            dropout=self.dropout_rate,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        return config


@keras.saving.register_keras_serializable(package="keras_dtop")
class GradingHead(keras.layers.Layer):
    """Grades every alive token of one stage (design doc §2.2).

    tokens `(batch, tokens, input_dim)` -> Dense to `hidden_dim` -> LayerNorm ->
    `num_layers` decoder layers over `num_classes` learnable queries ->
    presence logits `(batch, classes, 2)` and mask logits `(batch, classes, tokens)`.
    Tokens outside `keep_mask` are not attended to and get mask logits 0.

    Args:
        num_classes: number of classes `C` (one query each).
        hidden_dim: head width `d`.
        num_heads: attention heads of the decoder.
        num_layers: decoder layers `J`.
        mlp_ratio: FFN width as a multiple of `d`.
        dropout: dropout in the decoder (attention weights, residual branches, FFN).
        layer_norm_epsilon: LayerNorm epsilon (1e-5 in the authors' code).
    """

    def __init__(
        self,
        num_classes,
        hidden_dim,
        num_heads,
        num_layers=3,
        mlp_ratio=4,
        dropout=0.1,
        layer_norm_epsilon=1e-5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.hidden_dim = int(hidden_dim)
        self.num_heads = int(num_heads)
        self.num_layers = int(num_layers)
        self.mlp_ratio = mlp_ratio
        self.dropout = float(dropout)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        policy = self.dtype_policy
        self.input_projection = _dense(self.hidden_dim, "input_proj", policy)
        self.projection_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=policy, name="proj_norm"
        )
        self.decoder_layers = [
            GradingDecoderLayer(
                self.hidden_dim,
                self.num_heads,
                mlp_ratio,
                self.dropout,
                self.layer_norm_epsilon,
                dtype=policy,
                name=f"decoder_layer_{i}",
            )
            for i in range(self.num_layers)
        ]
        self.presence = _dense(2, "class_embed", policy)

    def build(self, tokens_shape):
        self.input_projection.build(tuple(tokens_shape))
        shape = (None, None, self.hidden_dim)
        self.projection_norm.build(shape)
        self.class_queries = self.add_weight(
            shape=(self.num_classes, self.hidden_dim),
            initializer=_TRUNC_NORMAL,
            name="class_queries",
        )
        for layer in self.decoder_layers:
            layer.build(shape, shape)
        self.presence.build(shape)
        self.built = True

    def call(self, tokens, keep_mask=None, training=None, return_intermediates=False):
        memory = self.projection_norm(self.input_projection(tokens))
        bias = None if keep_mask is None else key_bias(keep_mask, memory.dtype)
        batch = ops.shape(tokens)[0]
        queries = ops.broadcast_to(
            ops.cast(self.class_queries, memory.dtype)[None],
            (batch, self.num_classes, self.hidden_dim),
        )
        states, layer_logits = [], []
        for layer in self.decoder_layers:
            queries, logits = layer(queries, memory, bias, training=training)
            states.append(queries)
            layer_logits.append(logits)
        presence_logits = self.presence(queries)
        mask_logits = layer_logits[-1]
        if keep_mask is not None:
            mask_logits = ops.where(keep_mask[:, None, :], mask_logits, 0.0)
        if return_intermediates:
            return presence_logits, mask_logits, {
                "memory": memory,
                "queries": states,
                "attention_logits": layer_logits,
            }
        return presence_logits, mask_logits

    def compute_output_shape(self, tokens_shape):
        batch, tokens = tokens_shape[0], tokens_shape[1]
        return (batch, self.num_classes, 2), (batch, self.num_classes, tokens)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            hidden_dim=self.hidden_dim,
            num_heads=self.num_heads,
            num_layers=self.num_layers,
            mlp_ratio=self.mlp_ratio,
            dropout=self.dropout,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        return config
