"""Run an export under the TensorFlow backend, whatever backend the caller uses.

SavedModel and TFLite come from TensorFlow graphs: a model trained under JAX or
PyTorch is saved as a `.keras` file and rebuilt by `keras-dtop export` in a
fresh Python process with `KERAS_BACKEND=tensorflow` (design doc §7.3: JAX ->
TFLite and PyTorch -> SavedModel conversions fail on this model).
"""

import os
import subprocess
import sys
import tempfile

import keras

from keras_dtop.export.serving import resolve_spec


def running_tensorflow():
    return keras.backend.backend() == "tensorflow"


def load_segmenter(source):
    """A `DToPSegmenter` from an instance or a `.keras` path (loaded without compiling)."""
    from keras_dtop.models.saving import load_segmenter as load_file

    check_source(source)
    if isinstance(source, (str, os.PathLike)):
        source = load_file(source, compile=False)
    return source


def check_source(source):
    """What export accepts: a `DToPSegmenter` or the path of an existing `.keras` file."""
    from keras_dtop.models.segmenter import DToPSegmenter

    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not path.endswith(".keras") or not os.path.isfile(path):
            raise FileNotFoundError(f"Expected a .keras file saved by model.save(), got {path!r}.")
    elif not isinstance(source, DToPSegmenter):
        raise TypeError(f"Export takes a DToPSegmenter or its .keras file, got {type(source).__name__}.")


def cli_arguments(options):
    """`keras-dtop export` flags for the keyword options of the export functions."""
    args = []
    for key, value in options.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (tuple, list)):
            args += [flag, *(str(v) for v in value)]
        else:
            args += [flag, str(value)]
    return args


def run_export(export_format, model, path, options, input_signature, write, extra_options=None, prepare=None):
    """Check the options, then export here (TensorFlow) or in a TensorFlow subprocess.

    write(model, spec): writes the artefact to `path` under TensorFlow;
    extra_options: format-only options passed on to the subprocess (quantization);
    prepare(spec): checks format-only inputs against the resolved `ServingSpec`
    (None when `model` is a `.keras` path exported in a subprocess) before
    anything is traced, and returns more options for the subprocess.
    """
    static_batch = export_format == "tflite"
    check_source(model)
    prepare = prepare or (lambda spec: {})
    if not running_tensorflow():
        options = dict(options)
        spec = None
        if not isinstance(model, (str, os.PathLike)):
            spec = resolve_spec(model, options, input_signature, static_batch)  # errors before the subprocess
            options.update(
                image_size=spec.image_size,
                batch_size=spec.batch_size,
                input_dtype=spec.input_dtype,
                include_preprocessing=spec.include_preprocessing,
            )
        options.update(extra_options or {})
        options.update(prepare(spec))
        return export_in_tensorflow_process(export_format, model, path, options)
    model = load_segmenter(model)
    spec = resolve_spec(model, options, input_signature, static_batch)
    prepare(spec)
    write(model, spec)
    return os.fspath(path)


def export_in_tensorflow_process(export_format, model, path, options):
    """Save `model` (unless it is a path) and export it with `keras-dtop export` under TF.

    `model` was checked by `run_export` (`check_source`).
    """
    with tempfile.TemporaryDirectory(prefix="keras_dtop_export_") as tmp:
        source = model
        if not isinstance(model, (str, os.PathLike)):
            source = os.path.join(tmp, "model.keras")
            model.save(source)
        command = [
            sys.executable, "-m", "keras_dtop.cli", "export", os.fspath(source),
            "--format", export_format, "--out", os.fspath(path), "--quiet",
            *cli_arguments(options),
        ]  # fmt: skip
        env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
        result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        message = lines[-1] if lines else f"exit code {result.returncode}"
        raise RuntimeError(
            f"Exporting under the TensorFlow backend failed: {message}\n"
            f"(command: {' '.join(command)})\n--- stderr tail ---\n" + "\n".join(lines[-20:])
        )
    return os.fspath(path)
