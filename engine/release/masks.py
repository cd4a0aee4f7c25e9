"""Object masks of the relations annotations: ``encodedMask`` is a COCO compressed-RLE counts
string further packed with LZString's ``compressToEncodedURIComponent``."""
from __future__ import annotations

import lzstring
import numpy as np
from pycocotools import mask as coco_mask

_lz = lzstring.LZString()


def decode_mask(encoded: str, height: int, width: int) -> np.ndarray:
    """Binary mask [height, width] (uint8) of an ``encodedMask`` string."""
    counts = _lz.decompressFromEncodedURIComponent(encoded)
    if not counts:
        raise ValueError("encodedMask does not LZString-decompress")
    return coco_mask.decode({"size": [height, width], "counts": counts.encode()})


def encode_mask(mask: np.ndarray) -> str:
    """Inverse of :func:`decode_mask`."""
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return _lz.compressToEncodedURIComponent(rle["counts"].decode())


def rle(mask: np.ndarray) -> dict:
    """Plain COCO RLE ({"size", "counts"}) as used in submission files."""
    out = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(out["size"]), "counts": out["counts"].decode()}
