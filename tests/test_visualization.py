"""Pictures: palette, label colours, exit-stage blocks, the titled panel (pixel values)."""

import numpy as np
import pytest

from keras_dtop.visualization import (
    class_palette,
    colourise,
    exit_stage_image,
    exit_stage_overlay,
    grid,
    label_overlay,
    overlay,
    panel,
    stage_colours,
)


def test_colourise_uses_the_palette_and_white_for_ignore():
    palette = class_palette(3)
    labels = np.array([[0, 1], [2, 255]])
    out = colourise(labels, palette)
    np.testing.assert_array_equal(out[0, 1], palette[1])
    np.testing.assert_array_equal(out[1, 0], palette[2])
    np.testing.assert_array_equal(out[1, 1], [255, 255, 255])
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        colourise(np.array([[3]]), palette)


def test_exit_stage_image_colours_every_token_block():
    exit_stage = np.array([[0, 2], [1, 2]])
    out = exit_stage_image(exit_stage, (8, 8), num_stages=3)
    colours = stage_colours(3)
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[:4, :4], np.broadcast_to(colours[0], (4, 4, 3)))  # exited after stage 1
    np.testing.assert_array_equal(out[4:, :4], np.broadcast_to(colours[1], (4, 4, 3)))
    np.testing.assert_array_equal(out[:, 4:], np.broadcast_to(colours[2], (8, 4, 3)))
    assert len({tuple(c) for c in colours}) == 3


def test_panel_places_the_tiles_side_by_side():
    image = np.full((8, 8, 3), 17, np.uint8)
    prediction = np.zeros((8, 8), int)
    label = np.ones((8, 8), int)
    exit_stage = np.zeros((2, 2), int)
    out = panel(image, prediction, exit_stage, 3, label=label, class_names=["a", "b"], caption="1 GFLOPs")
    palette = class_palette(2)
    gap, title, scale = 6, 16, 4
    tile = 8 * scale
    centre = title + tile // 2
    xs = [gap + i * (tile + gap) + tile // 2 for i in range(4)]
    np.testing.assert_array_equal(out[centre, xs[0]], [17, 17, 17])
    np.testing.assert_array_equal(out[centre, xs[1]], palette[1])  # ground truth
    np.testing.assert_array_equal(out[centre, xs[2]], palette[0])  # prediction
    np.testing.assert_array_equal(out[centre, xs[3]], stage_colours(3)[0])
    assert out.dtype == np.uint8 and out.shape[1] == 4 * (tile + gap) + gap


def test_overlay_is_the_blend_formula():
    image = np.array([[[0, 100, 255], [10, 20, 30]]], np.uint8)
    colours = np.array([[[200, 0, 50], [255, 255, 255]]], np.uint8)
    out = overlay(image, colours, opacity=0.3)
    want = np.round(0.7 * image.astype(float) + 0.3 * colours.astype(float)).astype(np.uint8)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(overlay(image, colours, 0.0), image)
    np.testing.assert_array_equal(overlay(image, colours, 1.0), colours)
    with pytest.raises(ValueError, match="opacity must be in"):
        overlay(image, colours, 1.5)
    with pytest.raises(ValueError, match="one shape"):
        overlay(image, colours[:, :1], 0.5)


def test_label_and_exit_stage_overlays_colour_the_right_pixels():
    image = np.full((4, 4, 3), 100, np.uint8)
    labels = np.array([[0, 1, 1, 255]] * 4)
    palette = class_palette(2)
    out = label_overlay(image, labels, palette, opacity=0.5)
    np.testing.assert_array_equal(out[0, 1], np.round(0.5 * 100 + 0.5 * palette[1].astype(float)))
    np.testing.assert_array_equal(out[0, 3], [100, 100, 100])  # ignore: the image shows through
    exits = exit_stage_overlay(image, np.array([[0, 1], [1, 1]]), 2, opacity=1.0)
    np.testing.assert_array_equal(exits[0, 0], stage_colours(2)[0])  # the top-left token left after stage 1
    np.testing.assert_array_equal(exits[3, 3], stage_colours(2)[1])


def test_grid_stacks_panels_on_white():
    a, b = np.zeros((2, 3, 3), np.uint8), np.full((1, 2, 3), 9, np.uint8)
    out = grid([a, b], gap=1)
    assert out.shape == (4, 3, 3)
    np.testing.assert_array_equal(out[2], 255)  # the gap
    np.testing.assert_array_equal(out[3, :2], 9)
    np.testing.assert_array_equal(out[3, 2], 255)
