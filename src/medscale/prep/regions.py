"""Where an image's pixels hold no picture, and blanking them: ultrasound data regions and boxes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

__all__ = ["Box", "ultrasound_regions", "outside", "blank"]


@dataclass(frozen=True)
class Box:
    """A pixel rectangle: left, top, width, height (CTP's order)."""

    x: int
    y: int
    w: int
    h: int

    def clip(self, rows: int, cols: int) -> Box | None:
        """The part inside a rows x cols image, or None if nothing is."""
        x0, y0 = max(self.x, 0), max(self.y, 0)
        x1, y1 = min(self.x + self.w, cols), min(self.y + self.h, rows)
        return Box(x0, y0, x1 - x0, y1 - y0) if x1 > x0 and y1 > y0 else None

    def __str__(self) -> str:
        return f"(x={self.x}, y={self.y}, w={self.w}, h={self.h})"


def ultrasound_regions(ds: Dataset, rows: int, cols: int) -> list[Box]:
    """The data regions of ``SequenceOfUltrasoundRegions``, clipped to a rows x cols image.

    RegionLocationMaxX1/MaxY1 are inclusive (PS3.3 C.8.5.5.1.1). Regions that reach past the
    image (resampled or cropped exports) are clipped: blanking outside the clipped box blanks
    at least what the header says is not image, and OCR checks the rest. Items with a missing or
    malformed location are skipped.
    """
    out = []
    for item in ds.get("SequenceOfUltrasoundRegions") or []:
        try:
            x0, y0 = int(item.RegionLocationMinX0), int(item.RegionLocationMinY0)
            x1, y1 = int(item.RegionLocationMaxX1), int(item.RegionLocationMaxY1)
        except (AttributeError, TypeError, ValueError):
            continue
        if x1 < x0 or y1 < y0:
            continue
        box = Box(x0, y0, x1 - x0 + 1, y1 - y0 + 1).clip(rows, cols)
        if box is not None:
            out.append(box)
    return out


def outside(regions: Sequence[Box], rows: int, cols: int) -> list[Box]:
    """Rectangles covering everything in a rows x cols image that no region covers.

    Cut along every region edge into a grid, then merged: runs of uncovered cells in a band of
    rows become one box, and equal runs in consecutive bands one taller box.
    """
    xs = sorted({0, cols, *(b.x for b in regions), *(b.x + b.w for b in regions)})
    ys = sorted({0, rows, *(b.y for b in regions), *(b.y + b.h for b in regions)})
    boxes: list[Box] = []
    open_runs: dict[tuple[int, int], Box] = {}  # (x0, x1) -> box still growing downwards
    for y0, y1 in zip(ys, ys[1:]):
        runs = []
        start = None
        for x0, x1 in zip(xs, xs[1:]):
            covered = any(b.x <= x0 and x1 <= b.x + b.w and b.y <= y0 and y1 <= b.y + b.h for b in regions)
            if not covered and start is None:
                start = x0
            if covered and start is not None:
                runs.append((start, x0))
                start = None
        if start is not None:
            runs.append((start, cols))
        grown = {}
        for run in runs:
            prev = open_runs.pop(run, None)
            top = prev.y if prev else y0
            grown[run] = Box(run[0], top, run[1] - run[0], y1 - top)
        boxes.extend(open_runs.values())
        open_runs = grown
    boxes.extend(open_runs.values())
    return sorted(boxes, key=lambda b: (b.y, b.x))


def blank(pixels: np.ndarray, boxes: Sequence[Box], *, channels_last: bool) -> np.ndarray:
    """Set the boxes to the array's darkest value, on every frame; returns the (writable) array.

    Args:
        pixels: (H, W), (H, W, C), (F, H, W) or (F, H, W, C).
        boxes: In (H, W) pixel coordinates, already clipped.
        channels_last: The last axis holds colour channels (RGB), not columns.
    """
    if not boxes:
        return pixels
    if not pixels.flags.writeable:
        pixels = pixels.copy()  # a decoder may hand out a read-only view of the file's bytes
    # The darkest value, not 0: for modality values (CT in HU) 0 is mid-grey.
    fill = pixels.min()
    for b in boxes:
        if channels_last:
            pixels[..., b.y:b.y + b.h, b.x:b.x + b.w, :] = fill
        else:
            pixels[..., b.y:b.y + b.h, b.x:b.x + b.w] = fill
    return pixels
