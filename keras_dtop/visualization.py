"""Pictures of a segmentation and of where tokens exited (NumPy in, NumPy/PIL out).

- `class_palette(num_classes)`: one readable RGB colour per class.
- `colourise(labels, palette)`: label map `(H, W)` -> RGB `(H, W, 3)`; 255 (ignore) is white.
- `exit_stage_image(exit_stage, image_size, num_stages)`: token grid `(h, w)` of
  0-based exit stages -> RGB `(H, W, 3)`, every token a block of its stage's colour.
- `overlay(image, colours, opacity)`: a colour picture blended over the image.
- `label_overlay(...)`, `exit_stage_overlay(...)`: the prediction / the exit
  stages drawn over the image.
- `panel(...)`: image | ground truth | prediction | exit stage, titled, with the
  class and stage legends and an optional caption (e.g. GFLOPs), as a uint8 array.
- `grid(panels)`: several panels stacked, for many images.
"""

import numpy as np

# Tokens that exited after stage 1, 2, ...: green, yellow, orange, ...; the last stage is red.
_STAGE_COLOURS = np.array(
    [[46, 204, 113], [241, 196, 15], [230, 126, 34], [155, 89, 182], [52, 152, 219]], np.uint8
)
_LAST_STAGE_COLOUR = np.array([231, 76, 60], np.uint8)
IGNORE_COLOUR = np.array([255, 255, 255], np.uint8)


def class_palette(num_classes, seed=0):
    """`(num_classes, 3)` uint8 colours: a fixed readable set, then seeded random ones."""
    base = np.array(
        [[70, 130, 180], [220, 40, 40], [30, 50, 200], [40, 170, 60], [240, 220, 40],
         [150, 150, 150], [255, 127, 14], [148, 103, 189], [140, 86, 75], [227, 119, 194],
         [23, 190, 207], [188, 189, 34]],
        np.uint8,
    )  # fmt: skip
    if num_classes <= len(base):
        return base[:num_classes]
    extra = np.random.default_rng(seed).integers(0, 256, (num_classes - len(base), 3), dtype=np.uint8)
    return np.concatenate([base, extra])


def stage_colours(num_stages):
    """`(num_stages, 3)` uint8: a colour per exit stage, red for the last (never exited)."""
    if num_stages - 1 > len(_STAGE_COLOURS):
        raise ValueError(f"stage_colours supports up to {len(_STAGE_COLOURS) + 1} stages, got {num_stages}.")
    return np.concatenate([_STAGE_COLOURS[: num_stages - 1], _LAST_STAGE_COLOUR[None]])


def colourise(labels, palette):
    """Label map `(H, W)` -> RGB `(H, W, 3)` uint8; 255 (ignore) is white, other out-of-range ids raise."""
    labels = np.asarray(labels)
    palette = np.asarray(palette, np.uint8)
    ignore = labels == 255
    if (labels[~ignore] < 0).any() or (labels[~ignore] >= len(palette)).any():
        raise ValueError(f"labels hold ids outside [0, {len(palette)}) that are not 255.")
    out = palette[np.where(ignore, 0, labels)]
    out[ignore] = IGNORE_COLOUR
    return out


def exit_stage_image(exit_stage, image_size, num_stages):
    """Token grid `(h, w)` of exit stages -> RGB `(H, W, 3)`: each token a block of its stage colour."""
    exit_stage = np.asarray(exit_stage)
    height, width = image_size
    rows = np.arange(height) * exit_stage.shape[0] // height
    cols = np.arange(width) * exit_stage.shape[1] // width
    return stage_colours(num_stages)[exit_stage[rows][:, cols]]


def overlay(image, colours, opacity=0.5):
    """`round((1 - opacity) * image + opacity * colours)` as uint8 `(H, W, 3)`.

    image: RGB `(H, W, 3)`, uint8 or [0, 255] floats; colours: RGB of the
    same size (e.g. `colourise(...)`); opacity in [0, 1] (0: the image only).
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}.")
    image = np.clip(np.asarray(image, np.float32), 0, 255)
    colours = np.asarray(colours, np.float32)
    if image.shape != colours.shape or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"overlay needs an RGB image and colours of one shape (H, W, 3), got {image.shape} "
                         f"and {colours.shape}.")  # fmt: skip
    return np.round((1.0 - opacity) * image + opacity * colours).astype(np.uint8)


def label_overlay(image, labels, palette=None, opacity=0.5):
    """The class map `(H, W)` in its palette colours over the image `(H, W, 3)`; ignore (255) stays clear."""
    labels = np.asarray(labels)
    if palette is None:
        palette = class_palette(int(labels[labels != 255].max(initial=0)) + 1)
    blended = overlay(image, colourise(labels, palette), opacity)
    ignore = labels == 255
    blended[ignore] = np.clip(np.asarray(image), 0, 255).astype(np.uint8)[ignore]
    return blended


def exit_stage_overlay(image, exit_stage, num_stages, opacity=0.5):
    """Each token's exit-stage colour over its patch of the image `(H, W, 3)`; exit_stage `(h, w)`."""
    image = np.asarray(image)
    return overlay(image, exit_stage_image(exit_stage, image.shape[:2], num_stages), opacity)


def grid(panels, gap=6):
    """Panels (uint8 `(h_i, w_i, 3)`) stacked top to bottom on white, left-aligned."""
    if not len(panels):
        raise ValueError("grid needs at least one panel.")
    width = max(p.shape[1] for p in panels)
    rows = []
    for p in panels:
        row = np.full((p.shape[0] + gap, width, 3), 255, np.uint8)
        row[: p.shape[0], : p.shape[1]] = p
        rows.append(row)
    return np.concatenate(rows)[:-gap]


def _text_width(draw, text, font):
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def panel(image, prediction, exit_stage, num_stages, label=None, palette=None, class_names=None,
          caption=None, scale=4):  # fmt: skip
    """One image's panels side by side, titled, with legends: uint8 `(height, width, 3)`.

    image: RGB `(H, W, 3)` (uint8 or [0, 255] floats); prediction, label: `(H, W)`
    class ids (label optional, 255 = ignore); exit_stage: `(h, w)` token grid;
    palette: `(classes, 3)` (default `class_palette`); class_names: the
    legend's names (it lists the classes shown); scale: nearest-neighbour
    magnification of small images.
    """
    from PIL import Image, ImageDraw, ImageFont

    image = np.clip(np.asarray(image), 0, 255).astype(np.uint8)
    height, width = image.shape[:2]
    shown = [np.asarray(prediction)] + ([] if label is None else [np.asarray(label)])
    present = np.unique(np.concatenate([ids[ids != 255].ravel() for ids in shown]))
    if palette is None:
        palette = class_palette(int(present.max(initial=0)) + 1)
    palette = np.asarray(palette, np.uint8)
    tiles = [("image", image)]
    if label is not None:
        tiles.append(("ground truth", colourise(label, palette)))
    tiles += [("prediction", colourise(prediction, palette)),
              ("exit stage", exit_stage_image(exit_stage, (height, width), num_stages))]  # fmt: skip

    font = ImageFont.load_default()
    gap, title_h, line_h = 6, 16, 14
    tile_w, tile_h = width * scale, height * scale
    names = [class_names[c] if class_names else f"class {c}" for c in present]  # legend: classes shown
    stage_names = [f"exited after stage {j + 1}" for j in range(num_stages - 1)] + ["reached the end"]
    legend_rows = len(names) + len(stage_names) + (1 if caption else 0)
    canvas_w = len(tiles) * (tile_w + gap) + gap
    canvas = Image.new("RGB", (canvas_w, title_h + tile_h + gap + legend_rows * line_h + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, tile) in enumerate(tiles):
        x = gap + i * (tile_w + gap)
        draw.text((x + (tile_w - _text_width(draw, title, font)) // 2, 2), title, fill="black", font=font)
        big = np.repeat(np.repeat(tile, scale, 0), scale, 1)
        canvas.paste(Image.fromarray(big), (x, title_h))
    y = title_h + tile_h + gap
    entries = [(tuple(int(v) for v in palette[c]), n) for c, n in zip(present, names)]
    entries += [(tuple(int(v) for v in c), n) for c, n in zip(stage_colours(num_stages), stage_names)]
    for colour, name in entries:
        draw.rectangle([gap, y + 2, gap + 10, y + 11], fill=colour, outline="black")
        draw.text((gap + 16, y), name, fill="black", font=font)
        y += line_h
    if caption:
        draw.text((gap, y), caption, fill="black", font=font)
    return np.asarray(canvas)
