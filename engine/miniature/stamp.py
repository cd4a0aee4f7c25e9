"""A frame-index stamp drawn into every generated frame, readable after H.264 and resizing.

Two rows of twelve square cells in the top-left corner. Cell size is 1/32 of the short
side, so the geometry is relative and survives any resize that keeps the aspect ratio
(at 448 px a cell is 14 px, far above what CRF-24 H.264 blurs away). Each row starts with a
two-cell guard (white-black on the first row, black-white on the second) that tells a
stamped frame from any other image; the remaining 20 cells hold the index, least
significant bit first: up to 2**20 frames, 9.7 hours at 30 fps.
"""
from __future__ import annotations

import numpy as np

ROWS, COLS, GUARD = 2, 12, 2
BITS_PER_ROW = COLS - GUARD
MAX_INDEX = 2 ** (ROWS * BITS_PER_ROW) - 1
_GUARDS = ((1, 0), (0, 1))


def _cell(shape) -> float:
    return min(shape[0], shape[1]) / 32.0


def _cells(index: int) -> list[list[int]]:
    bits = [(index >> b) & 1 for b in range(ROWS * BITS_PER_ROW)]
    return [list(_GUARDS[r]) + bits[r * BITS_PER_ROW:(r + 1) * BITS_PER_ROW] for r in range(ROWS)]


def draw_stamp(image: np.ndarray, index: int, low: int = 0, high: int = 255) -> None:
    """Draw the stamp of ``index`` into an image, in place.

    ``low`` and ``high`` are the values of black and white cells: 0 and 255 for RGB, or the
    palette entries of black and white for a label image.
    """
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"frame index {index} outside 0..{MAX_INDEX}")
    c = _cell(image.shape)
    for r, row in enumerate(_cells(index)):
        y0, y1 = round(r * c), round((r + 1) * c)
        for k, bit in enumerate(row):
            image[y0:y1, round(k * c):round((k + 1) * c)] = high if bit else low


def read_stamp(rgb: np.ndarray) -> int:
    """Read back the frame index from a decoded RGB frame (any size, any codec loss).

    Raises ValueError when the frame carries no stamp.
    """
    c = _cell(rgb.shape)
    gray = rgb.mean(axis=2) if rgb.ndim == 3 else rgb
    value = 0
    for r in range(ROWS):
        for k in range(COLS):
            # The centre half of each cell: edges blur under compression and resizing.
            y0, y1 = int((r + 0.25) * c), int(np.ceil((r + 0.75) * c))
            x0, x1 = int((k + 0.25) * c), int(np.ceil((k + 0.75) * c))
            level = float(gray[y0:y1, x0:x1].mean())
            if 64 < level < 192:
                raise ValueError("no frame stamp: a cell is neither black nor white")
            bit = int(level >= 128)
            if k < GUARD:
                if bit != _GUARDS[r][k]:
                    raise ValueError("no frame stamp: guard cells do not match")
            else:
                value |= bit << (r * BITS_PER_ROW + k - GUARD)
    return value
