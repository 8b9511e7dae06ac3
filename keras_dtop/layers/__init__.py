"""DToP layers: encoder block with a keep mask, grading head, grading rule and canvas."""

from keras_dtop.layers.grading_head import (
    ClassTokenCrossAttention,
    GradingDecoderLayer,
    GradingHead,
)
from keras_dtop.layers.patch_embedding import PatchEmbedding
from keras_dtop.layers.pruning import (
    TokenPruner,
    select_exits,
    token_scores,
    update_canvas,
)
from keras_dtop.layers.vit_block import DToPEncoderBlock
