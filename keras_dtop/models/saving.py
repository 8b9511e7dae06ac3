"""Load a saved `DToPSegmenter` with errors that say what is wrong with the file."""

import os
import zipfile

import keras


def load_segmenter(path, compile=True):
    """The `DToPSegmenter` in a `.keras` file written by `model.save()`.

    Unlike a bare `keras.saving.load_model`, a missing file raises
    `FileNotFoundError`, a truncated or foreign file a `ValueError` naming it
    ("not a readable .keras file"), and a valid file that holds another kind
    of model a `TypeError`.
    """
    from keras_dtop.models.segmenter import DToPSegmenter

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No .keras file at {path!r}.")
    if not path.endswith(".keras") or not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a readable .keras file: model.save('name.keras') writes a zip "
            "archive; this file is not one, or it is cut short."
        )
    try:
        model = keras.saving.load_model(path, compile=compile)
    except (OSError, KeyError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable .keras file: {error}") from None
    if not isinstance(model, DToPSegmenter):
        raise TypeError(f"{path} holds a {type(model).__name__}, not a DToPSegmenter.")
    return model
