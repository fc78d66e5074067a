"""The prep config: how `medscale prep` turns a raw corpus into shards (recipes in data_prep/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["PrepConfig"]


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
    quarantine_burned_in: bool = True
    """Quarantine images that carry or may carry burned-in text."""
