"""Fashion-MNIST product photographs from local IDX files (no download).

Debian's `dataset-fashion-mnist` package (MIT licence) installs them in
`/usr/share/datasets/fashion-mnist`: `apt-get install dataset-fashion-mnist`.
The original `*-idx?-ubyte.gz` files from Zalando's release work the same.
"""

import gzip
import os

import numpy as np

DEFAULT_DIRECTORY = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path):
    """A NumPy array from an IDX file (optionally gzipped): uint8 data only."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4]!r}).")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * rank)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {body.size} bytes.")
    return body.reshape(shape)


def load_fashion_mnist(split="train", directory=None):
    """Items `(N, 28, 28)` uint8 and classes `(N,)` uint8 of `split` ("train" or "test")."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}.")
    directory = directory or os.environ.get("FASHION_MNIST_DIR", DEFAULT_DIRECTORY)
    paths = [os.path.join(directory, name) for name in _FILES[split]]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {missing}. Install Debian's package "
            "(`apt-get install dataset-fashion-mnist`) or point FASHION_MNIST_DIR / "
            "`directory` at a folder holding the original IDX files."
        )
    images, labels = (read_idx(p) for p in paths)
    if len(images) != len(labels):
        raise ValueError(f"{paths[0]} holds {len(images)} images but {paths[1]} {len(labels)} labels.")
    return images, labels
