"""Object masks of the relations annotations: ``encodedMask`` is a COCO compressed-RLE counts
string further packed with LZString's ``compressToEncodedURIComponent``."""
from __future__ import annotations

import lzstring
import numpy as np
from pycocotools import mask as coco_mask

_lz = lzstring.LZString()


_URI_SAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+-$"
_SIX_BITS = {c: format(i, "06b") for i, c in enumerate(_URI_SAFE)}


def lz_decompress(encoded: str) -> str | None:
    """LZString's ``decompressFromEncodedURIComponent``, reading many bits at a time (the
    lzstring package reads one bit per Python step; masks are decoded by the thousand)."""
    try:
        # Reversed, so that a read of n bits is one slice read as a number, high bit first:
        # each character's bits are read high to low and make up a value low bit first.
        bits = "".join(_SIX_BITS[c] for c in encoded.replace(" ", "+"))[::-1]
    except KeyError:
        return None
    end = len(bits)          # the unread bits are bits[:end]

    def read(n: int) -> int:
        nonlocal end
        end -= n
        return int(bits[end:end + n], 2) if end >= 0 else -1

    kind = read(2)
    if kind not in (0, 1):
        return "" if kind == 2 else None
    w = chr(read(8 if kind == 0 else 16))
    dictionary = ["", "", "", w]
    result, enlarge_in, num_bits = [w], 4, 3
    while True:
        end -= num_bits      # read(num_bits), inline: this loop runs once per code
        if end < 0:
            return None
        code = int(bits[end:end + num_bits], 2)
        if code in (0, 1):
            dictionary.append(chr(read(8 if code == 0 else 16)))
            code = len(dictionary) - 1
            enlarge_in -= 1
        elif code == 2:
            return "".join(result)
        if enlarge_in == 0:
            enlarge_in, num_bits = 2 ** num_bits, num_bits + 1
        if code < len(dictionary):
            entry = dictionary[code]
        elif code == len(dictionary):
            entry = w + w[0]
        else:
            return None
        result.append(entry)
        dictionary.append(w + entry[0])
        enlarge_in -= 1
        w = entry
        if enlarge_in == 0:
            enlarge_in, num_bits = 2 ** num_bits, num_bits + 1


def coco_counts(counts: str) -> np.ndarray:
    """Run lengths (uint32) of a COCO compressed-RLE counts string: column-major pixels, zeros
    first. Each run is a signed number in 5-bit groups (a 6th bit says another group follows),
    from the third run on stored as the difference to the run two before."""
    runs, value, shift, more = [], 0, 0, False
    for char in counts:
        group = ord(char) - 48
        value |= (group & 0x1F) << shift
        shift += 5
        more = bool(group & 0x20)
        if not more:
            if group & 0x10:
                value |= -1 << shift
            if len(runs) > 2:
                value += runs[-2]
            runs.append(value)
            value, shift = 0, 0
    if more or any(r < 0 for r in runs):
        raise ValueError("malformed COCO RLE counts")
    return np.asarray(runs, np.uint32)


def decode_runs(encoded: str, height: int, width: int) -> np.ndarray:
    """Run lengths of an ``encodedMask`` string (uncompressed COCO RLE, zeros first), checked
    against the mask's size."""
    counts = lz_decompress(encoded)
    if not counts:
        raise ValueError("encodedMask does not LZString-decompress")
    runs = coco_counts(counts)
    if int(runs.sum(dtype=np.int64)) != height * width:
        raise ValueError(f"encodedMask covers {int(runs.sum(dtype=np.int64))} pixels, not {height}x{width}")
    return runs


def runs_to_mask(runs: np.ndarray, height: int, width: int) -> np.ndarray:
    """Binary mask [height, width] (bool) of run lengths over the column-major pixels, zeros first."""
    values = np.arange(len(runs)) % 2 == 1
    return np.repeat(values, runs.astype(np.int64)).reshape(width, height).T


def mask_runs(mask: np.ndarray) -> np.ndarray:
    """Inverse of :func:`runs_to_mask` (uint32 runs; the first is 0 when the first pixel is set)."""
    flat = np.asarray(mask, bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]]))
    if flat.size and flat[0]:
        runs = np.concatenate([[0], runs])
    return runs.astype(np.uint32)


def decode_mask(encoded: str, height: int, width: int) -> np.ndarray:
    """Binary mask [height, width] (uint8) of an ``encodedMask`` string."""
    return runs_to_mask(decode_runs(encoded, height, width), height, width).astype(np.uint8)


def encode_mask(mask: np.ndarray) -> str:
    """Inverse of :func:`decode_mask`."""
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return _lz.compressToEncodedURIComponent(rle["counts"].decode())


def rle(mask: np.ndarray) -> dict:
    """Plain COCO RLE ({"size", "counts"}) as used in submission files."""
    out = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(out["size"]), "counts": out["counts"].decode()}
