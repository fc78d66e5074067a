"""The prep config: how `medscale prep` turns a raw corpus into shards (recipes in data_prep/)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from medscale.errors import ConfigError

__all__ = ["PrepConfig", "unsafe_split_name"]

# A split names shard files (``{split}-{chunk}-{part}.tar``) and wids indexes (``{split}.wids.json``).
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def unsafe_split_name(name: object) -> str | None:
    """Why `name` cannot be a split's name, or None: it becomes part of file names below ``--out``."""
    if not isinstance(name, str) or not _SPLIT_NAME.fullmatch(name):
        return "a split name is a letter or digit, then letters, digits, '_', '.' or '-'"
    return None


@dataclass
class PrepConfig:
    """How `medscale prep` turns a raw corpus into shards; recipes in data_prep/ set these."""

    include: list[str] = field(default_factory=lambda: ["**/*"])
    """Glob patterns (relative to each input directory) of files to consider."""
    labels_csv: str = ""
    """CSV of labels; relative paths resolve against the recipe's input directory."""
    label_key: Literal["path", "filename", "stem", "SOPInstanceUID", "StudyInstanceUID", "PatientID"] = "path"
    """Which identifier the CSV's key column holds."""
    key_column: str = "path"
    """CSV column matched against label_key."""
    label_columns: list[str] = field(default_factory=list)
    """Multi-label: one 0/1 column per finding. Empty for single-label (label_column)."""
    label_column: str = "label"
    """Multi-class: the column holding the class name."""
    classes: list[str] = field(default_factory=list)
    """Class names in index order (multi-class); empty: sorted distinct values of label_column."""
    label_separator: str = ""
    """Multi-label given as one column of names joined by this separator (e.g. '|' in ChestX-ray14)."""
    no_finding: list[str] = field(default_factory=list)
    """Names in a separator-joined label column that mean "no finding" (all zeros), e.g. 'No Finding'."""
    label_from_dir: bool = False
    """Take the class from the parent directory name (folder-per-class layouts)."""
    patient_column: str = ""
    """CSV column with the patient id: the patient of a photo (DICOM uses its PatientID), and the
    patients a stratified split balances."""
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    """Patient-level split fractions."""
    stratify: bool = False
    """Stratify the patient split by label: every split gets its fraction of the patients of each
    class (a patient counts under the rarest class it has). Needs the labels CSV to name patients
    (patient_column, or label_key PatientID); patients it does not name keep the plain hash split."""
    voi: Literal["metadata", "apply"] = "metadata"
    """Keep VOI windows as metadata (lossless) or apply them to pixels."""
    frames: Literal["samples", "volume"] = "samples"
    """Multi-frame DICOM: one sample per frame, or one volume sample."""
    encoding: Literal["zstd", "lz4", "png", "zlib"] = "zstd"
    """Lossless pixel encoding in shards: zstd (smallest), lz4 (fastest, larger), zlib, png (BENCHMARKS.md, prep)."""
    compression_level: int = 1
    """Level for the chosen encoding (zstd -5..22, png/zlib 0-9); 1 is fast and about as small as 3 on CT (BENCHMARKS.md)."""
    shard_bytes: int = 256_000_000
    """Target shard size in bytes."""
    max_pixels: int = 100_000_000
    """Reject images with more pixels than this (all frames and channels)."""
    burned_in: Literal["quarantine", "redact"] = "quarantine"
    """Images that carry or may carry burned-in text (`deid.burned_in_text_reason`): ``quarantine``
    rejects them all; ``redact`` blanks the known text areas (outside the ultrasound data regions,
    the boxes of ``redact_rules``), then rejects those in which OCR still reads text
    (`medscale.prep.redact`; needs Tesseract). Recognizable visual features stay quarantined."""
    redact_rules: str = ""
    """With ``burned_in: redact``: a rules file of boxes to blank per device and image size, in the
    CTP DicomPixelAnonymizer script format (`medscale.prep.redact`); a relative path resolves
    against the recipe's directory, as labels_csv does. Empty: ultrasound regions only."""
    photos_ocr: bool = False
    """Reject photos (JPEG/PNG) in which OCR reads text (needs Tesseract)."""
    ocr_min_confidence: float = 80.0
    """Tesseract word confidence (0-100) from which a word of 3+ letters or digits, 6+ px tall,
    counts as text (`medscale.prep.redact`). Lower reads more text and more speckle as text."""
    ocr_max_frames: int = 8
    """Frames of a multi-frame image that OCR reads (evenly spaced, first and last included); 0: all.
    Blanking always covers every frame."""

    def __post_init__(self) -> None:
        for name in self.splits:
            why = unsafe_split_name(name)
            if why is not None:
                raise ConfigError(f"splits: {name!r} is refused: {why}")
        if not 0 <= self.ocr_min_confidence <= 100:
            raise ConfigError(f"ocr_min_confidence must be within 0-100, got {self.ocr_min_confidence}")
        if self.ocr_max_frames < 0:
            raise ConfigError(f"ocr_max_frames must be >= 0 (0: every frame), got {self.ocr_max_frames}")
        if self.redact_rules and self.burned_in != "redact":
            # Rules given but never applied would read as protection that is not there.
            raise ConfigError(f"redact_rules={self.redact_rules!r} is only used with burned_in: redact "
                             f"(burned_in is {self.burned_in!r})")
