"""The OCR check of images that should show no text (Tesseract through pytesseract).

What it can and cannot promise is in `medscale.prep.redact`'s docstring; the passes and their
thresholds were measured in bench/redact.py.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import numpy as np

from medscale.errors import ConfigError
from medscale.prep.config import PrepConfig
from medscale.prep.errors import RejectedInput
from medscale.prep.redact_rules import load_rules
from medscale.prep.regions import Box

__all__ = ["Finding", "MIN_ALNUM", "MIN_HEIGHT", "check_ocr_available", "require_ocr", "ocr_findings",
           "ocr_frame_sample"]

MIN_ALNUM = 3
"""A word needs this many letters or digits to count as text: two-character reads ("ae", "=l")
are what Tesseract makes of speckle, and every identifier (name, date, ID) is longer."""

MIN_HEIGHT = 6
"""A word needs a box at least this many pixels tall (in the image's own pixels) to count: the
confident misreads of speckle measured 3-5 px, 9-px type reads 7 px or more, and smaller type
is past what OCR (or a reader) makes out anyway."""

_INSTALL = ("install the engine and its binding: apt-get install tesseract-ocr (Debian/Ubuntu; English data "
            "included) and pip install 'medscale[ocr]'")
# Two Tesseract passes, measured on synthetic 600x800 frames and photos (bench/redact.py) and on
# pydicom's ultrasound files. Both use psm 11 (sparse text: screens carry scattered labels, not
# paragraphs; the default page mode 3 dropped whole banners next to the image area) and neither
# uses Tesseract's inverted-line retry (25-40% more time; on speckle it read words that were not
# there, at confidence 93).
# 1. The image with its ground made light (dark text, Tesseract's trained polarity), with
#    Sauvola's local threshold (thresholding_method=2): the global default turned a grey banner
#    (Philips) black with its text and read speckle as words; Sauvola read 19 of 24 names over
#    tissue instead of 7, and no word in 150 clean images. Its k of 0.2 instead of 0.34 read a
#    caliper label (Philips, "Cist Mag 1.06 cm") the default left at confidence 0-79; 0.1 read
#    speckle as words.
# 2. Only if pass 1 reads nothing: the opposite polarity with the global threshold. Sauvola
#    leaves text of the other polarity on a bar or strip (a light title bar on a dark screen, a
#    black caption strip on a photo) as one solid blob, unread; this pass reads those, at
#    confidence 95-96. On speckle it misread words at up to 80, so it counts a word only from
#    confidence 90 (or ocr_min_confidence if higher). It doubles the cost of a clean image.
# (invert the pass-1 image, Tesseract config, lowest confidence that counts in this pass)
_PASSES = (
    (False, "--psm 11 -c tessedit_do_invert=0 -c thresholding_method=2 -c thresholding_kfactor=0.2", 0.0),
    (True, "--psm 11 -c tessedit_do_invert=0 -c thresholding_method=0", 90.0),
)
# Scanner text is 8-14 px tall; Tesseract reads it far better at twice that (measured: 10-px
# names read with confidence 30-60 at 1x, 75-96 at 2x). Large images are read at their own size.
_UPSCALE_MAX_SIDE = 1024
# Longer sides above this are read downscaled: a 24-megapixel photo would take many seconds and
# its text (a date stamp, a label) is large.
_OCR_MAX_SIDE = 3000
_PAD = 16
_OCR_TIMEOUT_S = 120


def check_ocr_available(purpose: str = "OCR") -> None:
    """Raise ConfigError, saying how to install it, unless pytesseract and Tesseract (with English) work.

    Args:
        purpose: What needs OCR, for the message (``"burned_in: redact"``).
    """
    try:
        import pytesseract
    except ImportError:
        raise ConfigError(f"{purpose} needs pytesseract, which is not installed; {_INSTALL}") from None
    try:
        langs = pytesseract.get_languages(config="")
    except pytesseract.TesseractNotFoundError:
        where = pytesseract.pytesseract.tesseract_cmd
        raise ConfigError(f"{purpose} needs the tesseract program, not found as {where!r} (on PATH: "
                          f"{shutil.which('tesseract') or 'none'}); {_INSTALL}") from None
    except (OSError, pytesseract.TesseractError) as e:
        raise ConfigError(f"{purpose} needs the tesseract program, which does not run ({e}); {_INSTALL}") from None
    if "eng" not in langs:
        raise ConfigError(f"{purpose} needs Tesseract's English data, not installed (languages: {langs}); "
                          "apt-get install tesseract-ocr-eng")


def require_ocr(cfg: PrepConfig) -> None:
    """Refuse, before any worker starts, a config whose burned-in handling cannot run here.

    Checks Tesseract when ``burned_in: redact`` or ``photos_ocr`` asks for OCR (never degrading
    to no check), and parses ``redact_rules`` so that a mistake in the rules file fails now,
    once, not in every worker.

    Raises:
        ConfigError: Tesseract or pytesseract is missing (the message says how to install
            them), or the rules file cannot be read or parsed (naming file and line).
    """
    if cfg.burned_in == "redact" or cfg.photos_ocr:
        check_ocr_available("burned_in: redact" if cfg.burned_in == "redact" else "photos_ocr: true")
    if cfg.redact_rules:
        load_rules(cfg.redact_rules)


@dataclass(frozen=True)
class Finding:
    """A word OCR read with enough confidence: where (original pixels), how sure, how long."""

    box: Box
    confidence: float
    chars: int
    frame: int | None = None

    def describe(self) -> str:
        where = f" in frame {self.frame}" if self.frame is not None else ""
        return f"{self.box}{where}, confidence {self.confidence:.0f}, {self.chars} characters"


def _ocr_image(frame: np.ndarray) -> tuple[np.ndarray, float]:
    """The frame as 8-bit grey with a light ground, sized and smoothed for Tesseract; and its scale factor."""
    from PIL import Image, ImageFilter

    x = frame
    if x.ndim == 3:  # RGB: luma, so coloured text keeps its contrast against grey tissue
        x = x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
    if x.dtype != np.uint8:
        lo, hi = float(np.min(x)), float(np.max(x))
        x = ((x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x, dtype=np.float64)).astype(np.uint8)
    # Screens and endoscopy are light-on-dark; Tesseract reads dark-on-light.
    if x.mean() < 128:
        x = 255 - x
    im = Image.fromarray(np.ascontiguousarray(x))
    side = max(im.size)
    scale = 2.0 if side <= _UPSCALE_MAX_SIDE else min(1.0, _OCR_MAX_SIDE / side)
    if scale != 1.0:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
    if scale <= 1.0:
        # Pixel noise read at its own size: on a noisy 3-megapixel photo Sauvola's threshold made
        # 800 specks Tesseract tried to read (25 s; 0.5 s after a 3x3 median, which keeps strokes
        # of 2 px and more). Not after upscaling, which already smooths: there the median made
        # speckle look like letters (4 of 80 clean frames quarantined instead of 0).
        im = im.filter(ImageFilter.MedianFilter(3))
    return np.asarray(im), scale


def ocr_findings(frame: np.ndarray, min_confidence: float, frame_index: int | None = None) -> list[Finding]:
    """The words Tesseract reads in one frame with ``min_confidence``, `MIN_ALNUM` and `MIN_HEIGHT`.

    Two passes, the second only when the first reads nothing (see `_PASSES`).

    Args:
        frame: (H, W) grey of any dtype, or (H, W, 3) RGB.
        min_confidence: Tesseract's word confidence, 0-100.
        frame_index: Recorded in the findings.

    Raises:
        RejectedInput: ``quarantined`` when Tesseract fails or times out on the image: an image
            that could not be checked is not passed.
    """
    import pytesseract
    from PIL import Image, ImageOps

    # prep runs one worker process per core; Tesseract's OpenMP threads on top of that
    # oversubscribe the cores (Tesseract's docs advise OMP_THREAD_LIMIT=1 for parallel runs).
    os.environ.setdefault("OMP_THREAD_LIMIT", "1")
    grey, scale = _ocr_image(frame)
    for flip, config, floor in _PASSES:
        # A light border: Tesseract misses text that touches the image edge (a banner in row 0).
        im = ImageOps.expand(Image.fromarray(255 - grey if flip else grey), _PAD, fill=255)
        try:
            data = pytesseract.image_to_data(im, lang="eng", config=config, timeout=_OCR_TIMEOUT_S,
                                             output_type=pytesseract.Output.DICT)
        except (RuntimeError, pytesseract.TesseractError) as e:  # RuntimeError: pytesseract's timeout
            raise RejectedInput("quarantined", f"OCR could not check the image: {e}"[:300]) from e
        found = []
        for i, word in enumerate(data["text"]):
            conf = float(data["conf"][i])
            chars = sum(c.isalnum() for c in word)
            height = data["height"][i] / scale
            if conf >= max(min_confidence, floor) and chars >= MIN_ALNUM and height >= MIN_HEIGHT:
                x0 = max(0, int((data["left"][i] - _PAD) / scale))
                y0 = max(0, int((data["top"][i] - _PAD) / scale))
                box = Box(x0, y0, max(1, round(data["width"][i] / scale)), max(1, round(height)))
                found.append(Finding(box, conf, chars, frame_index))
        if found:
            return found
    return []


def ocr_frame_sample(n_frames: int, max_frames: int) -> list[int]:
    """Which of n frames OCR reads: all if ``max_frames`` is 0 or >= n, else evenly spaced with first and last."""
    if max_frames <= 0 or n_frames <= max_frames:
        return list(range(n_frames))
    if max_frames == 1:
        return [0]
    return sorted({round(i * (n_frames - 1) / (max_frames - 1)) for i in range(max_frames)})
