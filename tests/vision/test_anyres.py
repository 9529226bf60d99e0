"""AnyRes: the grid follows the image's aspect ratio, (width, height) the right way round, and the tiles cut the
canvas exactly: pasted back, they are the canvas pixel for pixel."""

import pytest
from PIL import Image, ImageDraw

from ligero.vision.anyres import GRIDS, TILE, anyres_views, best_grid, tile_boxes


@pytest.mark.parametrize("size, grid", [((224, 224), (1, 1)), ((448, 224), (2, 1)), ((224, 448), (1, 2)),
                                        ((1000, 320), (3, 1)), ((300, 1000), (1, 3)), ((800, 790), (2, 2)),
                                        ((64, 40), (1, 1)), ((2000, 1000), (2, 1))])
def test_grid_follows_the_aspect_ratio(size, grid):
    assert best_grid(*size) == grid


def _picture(width: int, height: int) -> Image.Image:
    """A picture with distinct content everywhere (a gradient and a diagonal), so misplaced tiles would show."""
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 255 // width, y * 255 // height, (x + y) % 256) for y in range(height) for x in range(width)])
    ImageDraw.Draw(image).line((0, 0, width, height), fill=(255, 255, 255), width=3)
    return image


@pytest.mark.parametrize("size", [(448, 224), (224, 448), (700, 300), (300, 900), (600, 580), (100, 100)])
def test_tiles_cover_the_canvas_exactly(size):
    image = _picture(*size)
    v = anyres_views(image)
    cols, rows = v.grid
    assert v.canvas.size == (cols * TILE, rows * TILE)
    assert all(view.size == (TILE, TILE) for view in v.views)
    assert v.positions[0] == (-1, -1)  # the global view first
    if (cols, rows) == (1, 1):
        assert len(v.views) == 1  # a single tile would repeat the global view
        return
    tiles = v.views[1:]
    assert len(tiles) == cols * rows and v.positions[1:] == [(r, c) for r in range(rows) for c in range(cols)]
    boxes = tile_boxes(cols, rows)
    covered = sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes)
    assert covered == v.canvas.width * v.canvas.height  # no overlap, no gap
    rebuilt = Image.new("RGB", v.canvas.size)
    for tile, box in zip(tiles, boxes):
        rebuilt.paste(tile, box[:2])
    assert rebuilt.tobytes() == v.canvas.tobytes()
    # The image fills the canvas along one side and keeps its aspect ratio (to the pixel).
    left, top, right, bottom = v.content_box
    assert (right - left == v.canvas.width) or (bottom - top == v.canvas.height)
    assert abs((right - left) / (bottom - top) - size[0] / size[1]) < 2 / min(right - left, bottom - top) + 0.01


def test_a_wide_image_is_cut_left_to_right():
    """Left half red, right half blue: a 2 x 1 grid's first tile is red, its second blue (not rows for columns)."""
    image = Image.new("RGB", (448, 224), (255, 0, 0))
    image.paste((0, 0, 255), (224, 0, 448, 224))
    v = anyres_views(image)
    assert v.grid == (2, 1)
    assert v.views[1].getpixel((112, 112)) == (255, 0, 0) and v.views[2].getpixel((112, 112)) == (0, 0, 255)


def test_every_grid_has_at_most_four_tiles():
    assert all(c * r <= 4 for c, r in GRIDS)
