"""Training on many devices with the ecosystem's own engines (README "Training on many devices").

- JAX: `keras.distribution` (`data_parallel`, `model_parallel` build them for a model).
- TensorFlow: `tf.distribute.MirroredStrategy`; build and compile in its scope.
- PyTorch: `torch.distributed` + DDP through `fit_ddp`, one process per device.

The loss's batch-wide normalisers are summed over replicas
(`replicas.cross_replica_sum`), so N devices at batch b make the same update as
one device at batch N·b on every backend.
"""

from keras_dtop.distribute.replicas import cross_replica_sum, replica_count
from keras_dtop.distribute.torch_ddp import fit_ddp
from keras_dtop.distribute.layouts import data_parallel, layout_map, model_parallel
