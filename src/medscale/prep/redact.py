"""Burned-in text: blank where it is known to be, then check what is left with OCR.

`burned_in: redact` (`PrepConfig`) sends the images `deid.burned_in_text_reason` flags here
instead of to quarantine. For each one, in this order:

1. Known text areas are blanked (set to the image's darkest value) on every frame:
   everything outside the data regions of an ultrasound image's ``SequenceOfUltrasoundRegions``
   (the scanner's own statement of where the image is; the name/ID/date banner sits outside
   it), and the boxes of the first rule in the ``redact_rules`` file whose signature matches
   the header.
2. Tesseract OCR reads the result (two passes, one per text polarity; `_PASSES`). A word of at
   least `MIN_ALNUM` letters or digits read with at least ``ocr_min_confidence`` is a finding,
   and the file is rejected as ``quarantined`` with the reason, the box and the frame (never
   the text read: it may be the very name we are hiding, and ``rejects.jsonl`` is a log, not a
   vault).

Multi-frame cine is blanked on every frame but read on at most ``ocr_max_frames`` of them,
evenly spaced and including the first and last (`ocr_frame_sample`): the overlays that carry
identity (name, ID, date, institution) are drawn by the scanner's UI on every frame in the same
place, so any frame shows them; reading all of a 100-frame clip would cost over a minute. Text
that appears on only some frames is what a sample can miss; ``ocr_max_frames: 0`` reads all.

What OCR cannot promise (measured in tests/unit/test_redact.py and bench/redact.py, on
synthetic frames): names of 9-20 px inside the data region were read on a black ground 19 times
in 20, over tissue about 6 in 7; 9-px type, faint grey type, a 320x240 cine's blurred 6-px tool
bar, and text of the other polarity in a small box surrounded by texture (a black label on skin)
are often missed. OCR is the check behind the blanking, not a replacement for it, nor
for an operator looking at a sample of the output.

Rules file: the RSNA CTP DicomPixelAnonymizer script format, so a site's existing script (or
CTP's contributed "Burned-in Annotation Library") is used as it is, wherever it names elements
by tag or by a keyword pydicom spells the same (Modality, Rows, Manufacturer...; a dcm4che-only
name such as SeqOfUltrasoundRegions is an error naming the line). A section is a signature in
braces followed by one or more regions ``(x,y,w,h)`` (left, top, width, height in pixels)::

    GE LOGIQ banner
    { Modality.equals("US") * Manufacturer.containsIgnoreCase("GE") *
      Rows.equals("600") * Columns.equals("800") }
    (0,0,800,60)

Text outside braces and parentheses is a comment (it may not contain either). Signatures use
``+`` (or), ``*`` (and), ``!`` (not), parentheses, ``true.``/``false.`` and terms
``identifier.method("string")``; an identifier is a DICOM keyword (pydicom's spelling) or a tag
``[gggg,eeee]``, and ``A::B`` reads B in the first item of sequence A. Methods: `_METHODS`.
A value is the element's string form (multiple values joined by ``\\``; absent: ``""``). The
first matching section wins, as in CTP. Anything the parser does not understand is a
`ConfigError` naming the file and line, never a rule silently skipped.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag

from medscale.errors import ConfigError
from medscale.prep.config import PrepConfig
from medscale.prep.dicom import DicomImage
from medscale.prep.errors import RejectedInput

__all__ = [
    "Box",
    "Rule",
    "Finding",
    "Redactor",
    "MIN_ALNUM",
    "MIN_HEIGHT",
    "REDACTABLE_REASONS",
    "check_ocr_available",
    "require_ocr",
    "load_rules",
    "parse_rules",
    "ultrasound_regions",
    "outside",
    "blank",
    "ocr_findings",
    "ocr_frame_sample",
]

MIN_ALNUM = 3
"""A word needs this many letters or digits to count as text: two-character reads ("ae", "=l")
are what Tesseract makes of speckle, and every identifier (name, date, ID) is longer."""

MIN_HEIGHT = 6
"""A word needs a box at least this many pixels tall (in the image's own pixels) to count: the
confident misreads of speckle measured 3-5 px, 9-px type reads 7 px or more, and smaller type
is past what OCR (or a reader) makes out anyway."""

REDACTABLE_REASONS = frozenset({"burned_in_unknown", "burned_in_annotation"})
"""`burned_in_text_reason` results that `redact` handles; the rest (recognizable visual
features: faces cannot be boxed away) stay quarantined."""

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


# ---------------------------------------------------------------------------------------------
# Is OCR here?
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Boxes and the rules file
# ---------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Rule:
    """One section of a rules file: where its signature starts, the test, the boxes it blanks."""

    source: str
    line: int
    matches: Callable[[Dataset], bool]
    boxes: tuple[Box, ...]


_METHODS: dict[str, Callable[[str, str], bool]] = {
    "equals": lambda v, a: v == a,
    "equalsIgnoreCase": lambda v, a: v.lower() == a.lower(),
    "matches": lambda v, a: re.fullmatch(a, v) is not None,  # Java's String.matches is a full match
    "contains": lambda v, a: a in v,
    "containsIgnoreCase": lambda v, a: a.lower() in v.lower(),
    "startsWith": lambda v, a: v.startswith(a),
    "startsWithIgnoreCase": lambda v, a: v.lower().startswith(a.lower()),
    "endsWith": lambda v, a: v.endswith(a),
    "endsWithIgnoreCase": lambda v, a: v.lower().endswith(a.lower()),
}
_IDENT = r"(?:\[[0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\]|[A-Za-z][A-Za-z0-9]*)"
_CALL = re.compile(rf'({_IDENT}(?:::{_IDENT})*)\.([A-Za-z]+)\(\s*"((?:[^"\\]|\\.)*)"\s*\)')
_REGION = re.compile(r"\(\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\)")


def load_rules(path: str | os.PathLike) -> list[Rule]:
    """Parse a rules file (CTP DicomPixelAnonymizer script; module docstring).

    Raises:
        ConfigError: unreadable file, or a syntax error, unknown keyword or method, bad regular
            expression or malformed region, naming the file and line.
    """
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError as e:
        raise ConfigError(f"cannot read redact_rules file {p}: {e.strerror or e}") from e
    return list(_load_rules_cached(str(p), st.st_mtime_ns, st.st_size))


@lru_cache(maxsize=8)
def _load_rules_cached(path: str, mtime_ns: int, size: int) -> tuple[Rule, ...]:
    # Cached (keyed on the file's version): require_ocr parses it in the driver, then every
    # worker's context needs it again.
    try:
        text = Path(path).read_text(encoding="utf-8", errors="strict")
    except OSError as e:
        raise ConfigError(f"cannot read redact_rules file {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"redact_rules file {path} is not UTF-8 text ({e})") from e
    return tuple(parse_rules(text, path))


def parse_rules(text: str, source: str = "<rules>") -> list[Rule]:
    """Parse rules from a string; `source` names it in error messages."""
    rules: list[Rule] = []
    sig: tuple[int, Callable[[Dataset], bool]] | None = None
    boxes: list[Box] = []
    i = 0

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def close_section() -> None:
        if sig is not None:
            if not boxes:
                raise ConfigError(f"{source}, line {sig[0]}: the signature has no region (x,y,w,h) after it")
            rules.append(Rule(source, sig[0], sig[1], tuple(boxes)))

    while i < len(text):
        ch = text[i]
        if ch == "{":
            end = text.find("}", i)
            if end < 0:
                raise ConfigError(f"{source}, line {line_of(i)}: '{{' is never closed by '}}'")
            close_section()
            sig, boxes = (line_of(i), _parse_signature(text[i + 1:end], source, line_of(i))), []
            i = end + 1
        elif ch == "(":
            end = text.find(")", i)
            m = _REGION.fullmatch(text, i, end + 1) if end >= 0 else None
            if m is None:
                raise ConfigError(f"{source}, line {line_of(i)}: a region must be (x,y,w,h) with integers, got "
                                  f"{text[i:end + 1 if end >= 0 else i + 40]!r} (comments may not contain parentheses)")
            if sig is None:
                raise ConfigError(f"{source}, line {line_of(i)}: region {m.group(0)} comes before any {{signature}}")
            x, y, w, h = (int(g) for g in m.groups())
            if w <= 0 or h <= 0:
                raise ConfigError(f"{source}, line {line_of(i)}: region {m.group(0)} has no area (width, height > 0)")
            boxes.append(Box(x, y, w, h))
            i = end + 1
        elif ch in "})":
            raise ConfigError(f"{source}, line {line_of(i)}: unmatched {ch!r} (comments may not contain braces "
                              "or parentheses)")
        else:
            i += 1
    close_section()
    return rules


def _parse_signature(expr: str, source: str, line: int) -> Callable[[Dataset], bool]:
    """Compile a CTP signature: ``+`` (or) binds loosest, then ``*`` (and), then ``!`` (not)."""
    tokens: list[Any] = []
    pos = 0
    while pos < len(expr):
        if expr[pos].isspace():
            pos += 1
            continue
        where = f"{source}, line {line + expr.count(chr(10), 0, pos)}"
        if expr[pos] in "+*!()":
            tokens.append(expr[pos])
            pos += 1
        elif expr.startswith(("true.", "false."), pos):
            value = expr.startswith("true.", pos)
            tokens.append(("const", value))
            pos += 5 if value else 6
        elif m := _CALL.match(expr, pos):
            tokens.append(("call", _compile_call(m, where)))
            pos = m.end()
        else:
            raise ConfigError(f"{where}: cannot read the signature at {expr[pos:pos + 40].strip()!r}; expected "
                              'identifier.method("string"), true., false., +, *, ! or parentheses')
    parser = _Parser(tokens, f"{source}, line {line}")
    test = parser.expr()
    if parser.i != len(tokens):
        raise ConfigError(f"{source}, line {line}: unexpected {tokens[parser.i]!r} in the signature")
    return test


def _compile_call(m: re.Match, where: str) -> Callable[[Dataset], bool]:
    path, method, arg = m.group(1), m.group(2), re.sub(r"\\(.)", r"\1", m.group(3))
    fn = _METHODS.get(method)
    if fn is None:
        raise ConfigError(f"{where}: unknown method {method!r}; known: {', '.join(_METHODS)}")
    if method == "matches":
        try:
            re.compile(arg)
        except re.error as e:
            raise ConfigError(f"{where}: bad regular expression {arg!r} in matches(): {e}") from None
    tags = []
    for ident in path.split("::"):
        if ident.startswith("["):
            tags.append(Tag(int(ident[1:5], 16), int(ident[6:10], 16)))
        else:
            tag = tag_for_keyword(ident)
            if tag is None:
                raise ConfigError(f"{where}: {ident!r} is not a DICOM keyword (pydicom's spelling, e.g. "
                                  "SequenceOfUltrasoundRegions); write its tag as [gggg,eeee]")
            tags.append(Tag(tag))
    return lambda ds: fn(_value(ds, tags), arg)


class _Parser:
    def __init__(self, tokens: list[Any], where: str) -> None:
        self.tokens, self.i, self.where = tokens, 0, where

    def _peek(self) -> Any:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def expr(self) -> Callable[[Dataset], bool]:
        terms = [self.term()]
        while self._peek() == "+":
            self.i += 1
            terms.append(self.term())
        return terms[0] if len(terms) == 1 else (lambda ds: any(t(ds) for t in terms))

    def term(self) -> Callable[[Dataset], bool]:
        factors = [self.factor()]
        while self._peek() == "*":
            self.i += 1
            factors.append(self.factor())
        return factors[0] if len(factors) == 1 else (lambda ds: all(f(ds) for f in factors))

    def factor(self) -> Callable[[Dataset], bool]:
        tok = self._peek()
        self.i += 1
        if tok == "!":
            inner = self.factor()
            return lambda ds: not inner(ds)
        if tok == "(":
            inner = self.expr()
            if self._peek() != ")":
                raise ConfigError(f"{self.where}: '(' is never closed in the signature")
            self.i += 1
            return inner
        if isinstance(tok, tuple):
            if tok[0] == "const":
                value = tok[1]
                return lambda ds: value
            return tok[1]
        raise ConfigError(f"{self.where}: expected a term, got {tok if tok is not None else 'the end'!r}")


def _value(ds: Dataset, tags: Sequence[Tag]) -> str:
    """An element's value as CTP compares it: its string form, values joined by backslash, "" if absent."""
    node: Any = ds
    for n, tag in enumerate(tags):
        if not isinstance(node, Dataset) or tag not in node:
            return ""
        value = node[tag].value
        if n < len(tags) - 1:
            if not isinstance(value, DicomSequence) or not value:
                return ""
            node = value[0]
            continue
        if value is None:
            return ""
        if isinstance(value, (bytes, bytearray)):
            return value.decode("latin-1").strip(" \x00")
        if isinstance(value, DicomSequence):
            return ""
        if isinstance(value, MultiValue):
            return "\\".join(str(v) for v in value)
        return str(value).strip()
    return ""


# ---------------------------------------------------------------------------------------------
# What to blank
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# OCR
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


class Redactor:
    """`burned_in: redact` and `photos_ocr` for one worker: rules parsed once, OCR checked present.

    Args:
        cfg: The prep config (``redact_rules``, ``ocr_min_confidence``, ``ocr_max_frames``).

    Raises:
        ConfigError: as `require_ocr`.
    """

    def __init__(self, cfg: PrepConfig) -> None:
        require_ocr(cfg)
        self.rules = load_rules(cfg.redact_rules) if cfg.redact_rules else []
        self.min_confidence = cfg.ocr_min_confidence
        self.max_frames = cfg.ocr_max_frames

    def boxes_for(self, ds: Dataset, rows: int, cols: int) -> tuple[list[Box], str]:
        """What to blank in a rows x cols image of `ds`, and where that came from ("" if nowhere)."""
        boxes: list[Box] = []
        sources = []
        regions = ultrasound_regions(ds, rows, cols)
        if regions:
            boxes += outside(regions, rows, cols)
            sources.append(f"{len(regions)} ultrasound region(s)")
        for rule in self.rules:
            if rule.matches(ds):
                boxes += [c for b in rule.boxes if (c := b.clip(rows, cols)) is not None]
                sources.append(f"rule at {Path(rule.source).name}:{rule.line}")
                break  # the first matching signature wins, as in CTP
        return boxes, " and ".join(sources)

    def redact_dicom(self, ds: Dataset, images: list[DicomImage], why: str) -> int:
        """Blank the known text areas of a flagged image in place, then OCR-check it.

        Args:
            ds: The header (regions, rule signatures).
            images: What `decode_dicom` returned: frames as samples, or one volume.
            why: `burned_in_text_reason`'s verdict for `ds`.

        Returns:
            The number of rectangles blanked (per frame).

        Raises:
            RejectedInput: ``quarantined``: `why` is not in `REDACTABLE_REASONS`; BurnedInAnnotation
                is YES but no region or rule says where the text is; or OCR still reads text.
        """
        if why not in REDACTABLE_REASONS:
            raise RejectedInput("quarantined", f"{why}: not removable by blanking boxes")
        first = images[0]
        colour = first.photometric == "RGB"
        rows, cols = first.pixels.shape[-3:-1] if colour else first.pixels.shape[-2:]
        boxes, source = self.boxes_for(ds, rows, cols)
        if why == "burned_in_annotation" and not source:
            # The device says text is there; OCR alone misses text over tissue, so without a region
            # or rule that locates it, the image is not passed on OCR's word.
            raise RejectedInput("quarantined", "burned_in_annotation: BurnedInAnnotation is YES and no ultrasound "
                                               "region or redact_rules rule says where the text is")
        frames: list[tuple[int | None, np.ndarray]] = []
        for img in images:
            img.pixels = blank(img.pixels, boxes, channels_last=colour)
            volume = img.pixels.ndim == (4 if colour else 3)
            if volume:
                frames += [(f, img.pixels[f]) for f in range(img.pixels.shape[0])]
            else:
                frames.append((img.frame, img.pixels))
        for i in ocr_frame_sample(len(frames), self.max_frames):
            index, pixels = frames[i]
            found = ocr_findings(pixels, self.min_confidence, index if len(frames) > 1 else None)
            if found:
                blanked = f"after blanking {len(boxes)} box(es) from {source}" if boxes else "with nothing blanked"
                raise RejectedInput("quarantined", f"{why}: OCR still reads text {blanked}: {len(found)} word(s), "
                                                   f"first at {found[0].describe()}")
        return len(boxes)

    def check_photo(self, pixels: np.ndarray) -> None:
        """Reject a photo in which OCR reads text (``photos_ocr``).

        Raises:
            RejectedInput: ``quarantined`` with the first word's box.
        """
        found = ocr_findings(pixels, self.min_confidence)
        if found:
            raise RejectedInput("quarantined", f"photos_ocr: OCR reads text: {len(found)} word(s), first at "
                                               f"{found[0].describe()}")
