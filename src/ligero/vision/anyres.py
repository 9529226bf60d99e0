"""AnyRes (LLaVA-NeXT): an image becomes a low-resolution global view plus the tiles of a grid chosen for its aspect
ratio, every view TILE x TILE pixels for the encoder.

The grid is picked as LLaVA-NeXT picks its resolution: the candidate canvas (columns x TILE, rows x TILE) on which the
image, scaled to fit without distortion, keeps the most of its own pixels (never counting upscaling as gain), ties
going to the canvas that wastes the least area. The image is scaled to fit that canvas, centred on it with a neutral
fill, and the canvas is cut into columns x rows tiles in row-major order. A 1 x 1 grid adds no tile: its only tile
would repeat the global view.

Sizes are (width, height) throughout, as Pillow gives them: a wide image has more columns than rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

TILE = 224
# (columns, rows): LLaVA-NeXT's pinpoints [[336,672],[672,336],[672,672],[1008,336],[336,1008]] in units of its
# 336-px tile, plus the single tile; at most 4 tiles (5 views with the global one).
GRIDS: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (1, 2), (2, 2), (3, 1), (1, 3))
FILL = (127, 127, 127)  # the padding colour: the encoder's input normalisation maps it to ~0


def best_grid(width: int, height: int, grids=GRIDS, tile: int = TILE) -> tuple[int, int]:
    """The (columns, rows) grid whose canvas keeps most of a width x height image's resolution, then wastes least."""
    best, best_key = grids[0], None
    for cols, rows in grids:
        cw, ch = cols * tile, rows * tile
        scale = min(cw / width, ch / height)
        kept = min(int(width * scale) * int(height * scale), width * height)  # upscaling adds no information
        key = (kept, -(cw * ch - kept))
        if best_key is None or key > best_key:
            best, best_key = (cols, rows), key
    return best


def fit(image: Image.Image, width: int, height: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The image scaled to fit a width x height canvas without distortion, centred on it: (canvas, the box
    (left, top, right, bottom) the image occupies)."""
    scale = min(width / image.width, height / image.height)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    w, h = min(w, width), min(h, height)
    canvas = Image.new("RGB", (width, height), FILL)
    left, top = (width - w) // 2, (height - h) // 2
    canvas.paste(image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC), (left, top))
    return canvas, (left, top, left + w, top + h)


def tile_boxes(cols: int, rows: int, tile: int = TILE) -> list[tuple[int, int, int, int]]:
    """The tiles' boxes on a (cols x tile, rows x tile) canvas, row-major."""
    return [(c * tile, r * tile, (c + 1) * tile, (r + 1) * tile) for r in range(rows) for c in range(cols)]


@dataclass
class Views:
    """What the encoder sees of one image: the global view, then the tiles; `positions[i]` is view i's place,
    (-1, -1) for the global view and (row, column) for a tile."""

    views: list[Image.Image]
    positions: list[tuple[int, int]]
    grid: tuple[int, int]  # (columns, rows)
    canvas: Image.Image  # the grid's canvas the tiles were cut from
    content_box: tuple[int, int, int, int]  # where the image lies on that canvas


def anyres_views(image: Image.Image, grids=GRIDS, tile: int = TILE) -> Views:
    cols, rows = best_grid(image.width, image.height, grids, tile)
    global_view, _ = fit(image, tile, tile)
    canvas, box = fit(image, cols * tile, rows * tile)
    views, positions = [global_view], [(-1, -1)]
    if (cols, rows) != (1, 1):
        for i, b in enumerate(tile_boxes(cols, rows, tile)):
            views.append(canvas.crop(b))
            positions.append(divmod(i, cols))
    return Views(views, positions, (cols, rows), canvas, box)
