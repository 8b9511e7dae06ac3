"""`keras-dtop info MODEL [--image-size H W]`: what a model is and what it costs.

A `.keras` file or preset directory: architecture, parameters, stages, p0/k,
pruning mode, preprocessing, classes and dense GFLOPs at the image size. A
`.tflite` file: its input, outputs, operators and size on disk.
"""

import os

from keras_dtop.cli.model_source import open_model


def add_parser(commands, name):
    parser = commands.add_parser(name, help="describe a model: architecture, settings, GFLOPs")
    parser.add_argument("model", help="a .keras file, a preset directory or a .tflite file")
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


def tflite_lines(source):
    from keras_dtop.export import tflite_operators

    spec = source.runner.runner.get_input_details()["images"]
    outputs = source.runner.runner.get_output_details()
    return [
        f"model          LiteRT flatbuffer, {os.path.getsize(source.path) / 2**20:.1f} MiB",
        f"input          images {tuple(int(s) for s in spec['shape'])} {spec['dtype'].__name__}",
        "outputs        " + ", ".join(f"{k} {tuple(int(s) for s in v['shape'])}" for k, v in sorted(outputs.items())),
        f"stages         {source.num_stages}, classes {source.num_classes}",
        f"operators      {', '.join(tflite_operators(source.path))}",
    ]


def run(args):
    source = open_model(args.model)
    lines = tflite_lines(source) if source.kind == "tflite" else keras_lines(source.model, args.image_size)
    print(f"{source.path}")
    for line in lines:
        print(f"  {line}")
    return 0
