"""Read checkpoint files into `{name: NumPy array}` state dicts.

Formats: PyTorch `.pth` / `.pt` / `.bin` (needs torch; mmsegmentation wraps
the weights in `{"state_dict": ..., "meta": ...}`), NumPy `.npz` and
`.safetensors` (needs the `safetensors` package). Wrappers (`state_dict`,
`model`) and the `module.` prefix of data-parallel training are removed.
"""

import os

import numpy as np

from keras_dtop.convert.weight_map import to_numpy

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
WRAPPER_KEYS = ("state_dict", "model", "module")


def _unwrap(checkpoint):
    while isinstance(checkpoint, dict):
        inner = next((checkpoint[k] for k in WRAPPER_KEYS if isinstance(checkpoint.get(k), dict)), None)
        if inner is None:
            return checkpoint
        checkpoint = inner
    return checkpoint


def _read_torch(path, trusted):
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"Reading {path} needs PyTorch: pip install torch==2.13.0 (the CPU build), "
            "or convert the checkpoint to .npz / .safetensors."
        ) from None
    if not _looks_like_torch_file(path):
        raise ValueError(
            f"{path} is not a PyTorch checkpoint: torch.save writes a zip archive (or, before "
            "torch 1.6, a pickle); this file is neither, or it is cut short."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as error:  # torch raises UnpicklingError and others for non-weight objects
        if trusted or "weights_only" not in str(error).replace("Weights only", "weights_only"):
            raise ValueError(
                f"{path} is not a readable PyTorch checkpoint: {str(error).splitlines()[0]}"
            ) from None
        raise ValueError(
            f"{path} holds Python objects besides tensors, which torch.load only reads with "
            "weights_only=False. If you trust the file, pass trusted=True (it runs pickled "
            f"code). torch said: {str(error).splitlines()[0]}"
        ) from None


def _looks_like_torch_file(path):
    # A complete zip archive (torch >= 1.6) or a pickle (protocol 2+ starts with 0x80).
    import zipfile

    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _read_npz(path):
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise ValueError(f"{path} is not a readable .npz file: {error}") from None


def _read_safetensors(path):
    try:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
    except ImportError:
        raise ImportError(f"Reading {path} needs the safetensors package: pip install safetensors") from None
    try:
        return load_file(path)
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable .safetensors file: {error}") from None
    except (TypeError, ValueError):  # bfloat16 has no NumPy dtype: read through torch
        from safetensors.torch import load_file as load_torch_file

        return load_torch_file(path)


def read_state_dict(path, trusted=False):
    """`{name: np.ndarray}` from a checkpoint file (see the module docstring).

    trusted: let torch unpickle arbitrary objects (only for files you trust).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        checkpoint = _read_npz(path)
    elif suffix == ".safetensors":
        checkpoint = _read_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        checkpoint = _unwrap(_read_torch(path, trusted))
    else:
        raise ValueError(
            f"Unknown checkpoint format {suffix!r} for {path}: use .pth/.pt/.bin, .npz or .safetensors."
        )
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(checkpoint).__name__}).")
    state = {}
    for name, value in checkpoint.items():
        if hasattr(value, "detach"):
            value = to_numpy(value)
        if isinstance(value, np.ndarray):
            state[name[len("module.") :] if name.startswith("module.") else name] = value
    if not state:
        raise ValueError(f"{path} holds no arrays.")
    return state


def segmenter_from_authors_checkpoint(path, num_heads, head_num_heads, trusted=False, **segmenter_kwargs):
    """`DToPSegmenter` from a checkpoint of the authors' mmsegmentation code (backbone + heads).

    A `.pth` file as their training writes it (or its weights as .npz /
    .safetensors). Sizes are read from the tensors; `num_heads` (backbone) and
    `head_num_heads` (grading heads) are not stored and must be given.
    Mismatched checkpoints raise a ValueError listing missing, unexpected and
    mis-shaped keys. The model normalises raw RGB pixels as the authors do
    (ImageNet mean/std); `mean`, `std` or `preprocessor` in `segmenter_kwargs`
    override it (`segmenter_from_authors_state_dict`).
    """
    from keras_dtop.convert.authors import segmenter_from_authors_state_dict

    state = read_state_dict(path, trusted)
    return segmenter_from_authors_state_dict(state, num_heads, head_num_heads, **segmenter_kwargs)
