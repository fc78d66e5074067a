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

The pieces: the rules file (`medscale.prep.redact_rules`), the regions and the blanking
(`medscale.prep.regions`), the OCR check (`medscale.prep.ocr`); `Redactor` puts them together.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from medscale.prep.config import PrepConfig
from medscale.prep.dicom import DicomImage
from medscale.prep.errors import RejectedInput
from medscale.prep.ocr import ocr_findings, ocr_frame_sample, require_ocr
from medscale.prep.redact_rules import load_rules
from medscale.prep.regions import Box, blank, outside, ultrasound_regions

__all__ = ["Redactor", "REDACTABLE_REASONS"]

REDACTABLE_REASONS = frozenset({"burned_in_unknown", "burned_in_annotation"})
"""`burned_in_text_reason` results that `redact` handles; the rest (recognizable visual
features: faces cannot be boxed away) stay quarantined."""


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
