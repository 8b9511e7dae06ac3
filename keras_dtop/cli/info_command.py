"""`keras-dtop info MODEL [--image-size H W]`: what a model is and what it costs.

A `.keras` file or preset directory: architecture, parameters, stages, p0/k,
pruning mode, preprocessing, classes and dense GFLOPs at the image size. A
`.tflite` or `.onnx` file: its input, outputs, operators and size on disk.
"""

import os

from keras_dtop.cli.model_source import open_model


def add_parser(commands, name):
    parser = commands.add_parser(name, help="describe a model: architecture, settings, GFLOPs")
    parser.add_argument("model", help="a .keras file, a preset directory, a .tflite or an .onnx file")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="size for the GFLOPs (default: the backbone's image_size)")  # fmt: skip


def keras_lines(model, image_size):
    from keras_dtop.flops import dense_segmenter_flops, segmenter_tokens

    b = model.backbone
    size = tuple(image_size or b.image_size or (224, 224))
    if size[0] % b.patch_size or size[1] % b.patch_size:
        raise ValueError(f"--image-size {size[0]} {size[1]} is not a multiple of the patch size {b.patch_size}.")
    lines = [
        f"model          {type(model).__name__} ({model.count_params():,} parameters, "
        f"backbone {b.count_params():,})",
        f"backbone       ViT patch {b.patch_size}, width {b.hidden_dim}, depth {b.num_layers}, "
        f"heads {b.num_heads}, MLP {b.mlp_dim}, prefix tokens {b.num_prefix_tokens}, "
        f"image size {b.image_size}",
        f"stages         ends at layers {list(model.stage_ends)} (0-based), "
        f"grading heads {model.head_num_layers} layers x {model.head_hidden_dim} wide",
        f"pruning        p0 {model.prune_threshold}, k {model.keep_top_k}, "
        f"enabled {model.pruning_enabled}, mode {model.pruning_mode}",
        f"classes        {model.num_classes}"
        + (f": {', '.join(model.class_names)}" if model.class_names else ""),
    ]
    converter = getattr(model.preprocessor, "image_converter", None)
    if converter is None or converter.scale is None:
        lines.append("preprocessing  none: model(images) and predict take normalised images")
    else:
        scale = [float(s) for s in converter.scale]
        offset = [float(o) for o in (converter.offset or [0.0] * len(scale))]
        mean = [round(-o / s, 3) for o, s in zip(offset, scale)]
        std = [round(1.0 / s, 3) for s in scale]
        lines.append(f"preprocessing  (pixels - {mean}) / {std} on [0, 255] RGB")
    tokens = segmenter_tokens(model, size)
    gflops = dense_segmenter_flops(model, size) / 1e9
    lines.append(f"dense cost     {gflops:.2f} GFLOPs at {size[0]}x{size[1]} ({tokens} tokens)")
    return lines


def exported_lines(source):
    """An exported file: format, size, signature, stages and classes, operators (int8 ones marked)."""
    runner = source.runner
    if source.kind == "tflite":
        from keras_dtop.export import int8_operators, tflite_operators

        title, operators, int8 = "LiteRT flatbuffer", tflite_operators(source.path), int8_operators(source.path)
    else:
        from keras_dtop.export.onnx import onnx_operators

        title, operators, int8 = "ONNX graph", onnx_operators(source.path), []
    shape = ", ".join("batch" if s is None else str(s) for s in runner.input_shape)
    lines = [
        f"model          {title}, {os.path.getsize(source.path) / 2**20:.1f} MiB",
        f"input          images ({shape}) {runner.input_dtype.name}",
        "outputs        " + ", ".join(
            f"{k} ({', '.join('batch' if s is None else str(s) for s in v)})"
            for k, v in sorted(runner.output_shapes.items())
        ),
        f"stages         {source.num_stages}, classes {source.num_classes}",
        f"operators      {', '.join(operators)}",
    ]
    if int8:
        lines.append(f"int8           {', '.join(int8)} (full-integer quantization)")
    return lines


def run(args):
    source = open_model(args.model)
    lines = keras_lines(source.model, args.image_size) if source.kind == "keras" else exported_lines(source)
    print(f"{source.path}")
    for line in lines:
        print(f"  {line}")
    return 0
