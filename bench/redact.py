"""Benchmark: the cost of `burned_in: redact` per 600x800 ultrasound frame, and how well its OCR check works.

Inputs: synthetic RGB ultrasound frames (a speckled sector with layers and dark cysts inside a
data region of ``SequenceOfUltrasoundRegions``, black around it), half with a name, a birth date
and an ID burned into the banner outside the region. Timed separately, per image:

- ``blank_ms``: finding the boxes (regions and a one-rule rules file) and blanking them;
- ``ocr_ms_clean``: the OCR check of a blanked frame with nothing left to read (both passes
  run), half of them frames whose banner held the canaries before blanking;
- ``ocr_ms_text``: the OCR check of a frame with a name inside the region (the first pass reads
  it and stops there).

Quality, with the default ``ocr_min_confidence``: ``false_positive_rate`` over the blanked
frames (nothing readable left: any finding quarantines a good image), and the recall of
canaries rendered inside the region, where blanking cannot help, on the black ground
(``recall_dark``) and over tissue (``recall_tissue``), in sizes 9-20 px and greys 140-255.
The last output line is one JSON object.

    python bench/redact.py [--images 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence


from medscale.prep.config import PrepConfig  # noqa: E402
from medscale.prep.ocr import ocr_findings  # noqa: E402
from medscale.prep.redact import Redactor  # noqa: E402
from medscale.prep.redact_rules import parse_rules  # noqa: E402
from medscale.prep.regions import blank  # noqa: E402

ROWS, COLS = 600, 800
REGION = (80, 70, 719, 579)  # RegionLocation MinX0, MinY0, MaxX1, MaxY1
NAMES = ["DOE, JANE", "SMITH JOHN", "MULLER ANNA", "1987-03-07", "07/03/1987", "ID 4471902", "MRN 88301245",
         "ST MARY HOSP", "ACC 20230415"]
RULES = '{ Modality.equals("US") * Rows.equals("600") * Columns.equals("800") } (600,580,200,20)'


def frame(seed: int) -> np.ndarray:
    """One synthetic RGB ultrasound frame, no text."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:ROWS, 0:COLS].astype(np.float64)
    x0, y0, x1, y1 = REGION
    cx, top = (x0 + x1) / 2 + rng.uniform(-40, 40), y0 - rng.uniform(40, 120)
    r, a = np.hypot(xx - cx, yy - top), np.arctan2(xx - cx, yy - top)
    fan = (r > (y0 - top) + rng.uniform(20, 60)) & (r < y1 - top) & (np.abs(a) < rng.uniform(0.4, 0.7))
    tissue = 0.35 + 0.2 * np.sin(r / rng.uniform(20, 60) + rng.uniform(0, 6))
    for _ in range(int(rng.integers(1, 5))):
        bx, by, br = rng.uniform(x0, x1), rng.uniform(y0, y1), rng.uniform(20, 90)
        tissue = tissue * np.where(np.hypot(xx - bx, yy - by) < br, rng.uniform(0.1, 0.4), 1.0)
    for _ in range(int(rng.integers(0, 3))):
        bx, by = rng.uniform(x0, x1), rng.uniform(y0, y1)
        tissue = tissue + 0.6 * np.exp(-((xx - bx) ** 2 / 800 + (yy - by) ** 2 / 100))  # a bright interface
    img = np.where(fan, tissue * rng.rayleigh(rng.uniform(0.2, 0.5), (ROWS, COLS)), 0.0)
    grey = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0))
    return np.repeat(np.asarray(grey)[..., None], 3, axis=-1)


def draw(pixels: np.ndarray, xy: tuple[float, float], text: str, size: int, fill: int) -> None:
    im = Image.fromarray(pixels)
    ImageDraw.Draw(im).text(xy, text, fill=(fill, fill, fill), font=ImageFont.load_default(size=size))
    pixels[...] = np.asarray(im)


def header() -> Dataset:
    ds = Dataset()
    ds.Modality, ds.Rows, ds.Columns = "US", ROWS, COLS
    item = Dataset()
    item.RegionLocationMinX0, item.RegionLocationMinY0, item.RegionLocationMaxX1, item.RegionLocationMaxY1 = REGION
    ds.SequenceOfUltrasoundRegions = Sequence([item])
    return ds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40, help="frames per measurement (clean, with text, canaries)")
    args = ap.parse_args()
    cfg = PrepConfig(burned_in="redact")
    redactor = Redactor(cfg)
    redactor.rules = parse_rules(RULES, "bench")
    ds = header()

    blank_ms, ocr_clean, ocr_text, false_pos = [], [], [], 0
    for i in range(args.images):
        for with_text in (False, True):
            px = frame(1000 + i)
            if with_text:  # the banner a scanner prints; blanking must remove it
                draw(px, (10, 8), NAMES[i % 3], 16, 255)
                draw(px, (560, 8), NAMES[3 + i % 2], 16, 255)
                draw(px, (10, 30), NAMES[5], 14, 230)
            t = time.perf_counter()
            boxes, _ = redactor.boxes_for(ds, ROWS, COLS)
            px = blank(px, boxes, channels_last=True)
            blank_ms.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            found = ocr_findings(px, cfg.ocr_min_confidence)
            ocr_clean.append((time.perf_counter() - t) * 1e3)
            false_pos += bool(found)  # no text left after blanking: any reading is a false positive
        # Text inside the region, where blanking cannot reach: the first pass reads it and stops.
        px = frame(5000 + i)
        draw(px, (REGION[0] + 10, REGION[1] + 10), NAMES[i % len(NAMES)], 16, 255)
        t = time.perf_counter()
        found = ocr_findings(px, cfg.ocr_min_confidence)
        ocr_text.append((time.perf_counter() - t) * 1e3)
        if not found:
            print(f"note: a 16-px white {NAMES[i % len(NAMES)]!r} on black was not read", file=sys.stderr)

    hits = {"dark": [], "tissue": []}
    for i in range(args.images):
        rng = np.random.default_rng(9000 + i)
        for where in hits:
            px = frame(7000 + 2 * i + (where == "tissue"))
            size, fill = int(rng.choice([9, 10, 11, 12, 14, 16, 20])), int(rng.choice([255, 230, 180, 140]))
            # Dark: the black corners of the region above the sector; tissue: the middle of the sector.
            xy = (rng.uniform(REGION[0] + 5, REGION[0] + 150), rng.uniform(REGION[1] + 5, REGION[1] + 25)) \
                if where == "dark" else (rng.uniform(320, 440), rng.uniform(300, 440))
            draw(px, xy, NAMES[i % len(NAMES)], size, fill)
            hits[where].append(bool(ocr_findings(px, cfg.ocr_min_confidence)))
        print(f"{i + 1}/{args.images}", end="\r", file=sys.stderr)

    import pytesseract

    figures = {
        "benchmark": "redact",
        "images": args.images,
        "size": [ROWS, COLS],
        "blank_ms": round(statistics.median(blank_ms), 2),
        "ocr_ms_clean": round(statistics.median(ocr_clean), 1),
        "ocr_ms_text": round(statistics.median(ocr_text), 1),
        "ms_per_image_clean": round(statistics.median(blank_ms) + statistics.median(ocr_clean), 1),
        "false_positive_rate": round(false_pos / (2 * args.images), 4),
        "false_positives": false_pos,
        "clean_images": 2 * args.images,
        "recall_dark": round(sum(hits["dark"]) / len(hits["dark"]), 3),
        "recall_tissue": round(sum(hits["tissue"]) / len(hits["tissue"]), 3),
        "ocr_min_confidence": cfg.ocr_min_confidence,
        "tesseract": str(pytesseract.get_tesseract_version()),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    print(f"blank {figures['blank_ms']} ms/image; OCR {figures['ocr_ms_clean']} ms/image clean, "
          f"{figures['ocr_ms_text']} ms with text; false positives {false_pos}/{2 * args.images}; "
          f"recall inside the region: dark {figures['recall_dark']:.0%}, tissue {figures['recall_tissue']:.0%}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
