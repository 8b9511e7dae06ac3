"""Weight converters into keras-dtop models."""

from keras_dtop.convert.authors import (
    load_authors_state_dict,
    segmenter_from_authors_state_dict,
)
from keras_dtop.convert.checkpoints import read_state_dict, segmenter_from_authors_checkpoint
from keras_dtop.convert.pretrained import backbone_from_pretrained, pretrained_mean_std
from keras_dtop.convert.onnx_graph import huggingface_folder_from_onnx, onnx_last_hidden_state
