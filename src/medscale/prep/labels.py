"""Labels CSV: maps a file or a DICOM identifier to a class or a set of findings."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medscale.errors import ConfigError, InputError, InputNotFound
from medscale.prep.config import PrepConfig

__all__ = ["LabelTable", "load_labels"]


@dataclass
class LabelTable:
    """Labels keyed by the identifier named in ``PrepConfig.label_key``.

    ``task`` is ``multiclass`` (``targets`` maps a key to a class index) or ``multilabel``
    (``targets`` maps a key to a 0/1 list over ``classes``).
    """

    task: str
    classes: list[str]
    key_kind: str
    targets: dict[str, Any] = field(default_factory=dict)
    patients: dict[str, str] = field(default_factory=dict)

    def lookup(self, keys: dict[str, str]) -> Any | None:
        """The target for an input, given its candidate identifiers (path, stem, UIDs...)."""
        k = keys.get(self.key_kind)
        return None if k is None else self.targets.get(k)

    def patient(self, keys: dict[str, str]) -> str | None:
        k = keys.get(self.key_kind)
        return None if k is None else self.patients.get(k)

    def patient_strata(self) -> dict[str, str]:
        """Raw patient id to stratum: the rarest class (fewest patients) the patient has.

        A multi-label patient without any finding is stratum ``"none"``. Patients come from the
        patient column, or are the keys themselves when the CSV is keyed by PatientID.

        Raises:
            ConfigError: the CSV names no patients.
        """
        if self.key_kind == "PatientID":
            owner = {k: k for k in self.targets}
        elif self.patients:
            owner = self.patients
        else:
            raise ConfigError("stratify=true needs patients in the labels CSV: set patient_column, "
                             "or label_key: PatientID")
        classes: dict[str, set[int]] = {}
        for key, target in self.targets.items():
            have = {target} if self.task == "multiclass" else {i for i, v in enumerate(target) if v}
            classes.setdefault(owner[key], set()).update(have)
        patients_per_class = [0] * len(self.classes)
        for have in classes.values():
            for i in have:
                patients_per_class[i] += 1
        return {p: self.classes[min(have, key=lambda i: (patients_per_class[i], i))] if have else "none"
                for p, have in classes.items()}

    def counts(self, target: Any) -> dict[str, int]:
        """Per-class counts contributed by one target (for manifests)."""
        if self.task == "multiclass":
            return {self.classes[target]: 1}
        return {c: 1 for c, v in zip(self.classes, target) if v}


def _norm_key(kind: str, value: str) -> str:
    value = value.strip()
    if kind == "path":
        return Path(value).as_posix().lstrip("./") if not value.startswith("/") else Path(value).as_posix()
    return value


def load_labels(cfg: PrepConfig, csv_path: str | Path) -> LabelTable:
    """Read a labels CSV as the config describes.

    Raises:
        InputNotFound: the CSV does not exist.
        InputError: unreadable file, missing columns, duplicate keys with different labels, or
            class names not in ``cfg.classes``; the message names the file, row and column.
    """
    path = Path(csv_path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, restval="")  # a short row reads as empty cells, not None
            header = reader.fieldnames or []
            rows = list(reader)
    except FileNotFoundError as e:
        raise InputNotFound(f"labels CSV {path} does not exist") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"cannot read labels CSV {path}: {getattr(e, 'strerror', None) or e}") from e
    need = [cfg.key_column] + (cfg.label_columns or [cfg.label_column])
    if cfg.patient_column:
        need.append(cfg.patient_column)
    missing = [c for c in need if c not in header]
    if missing:
        raise InputError(f"labels CSV {path} lacks column(s) {missing}; it has {header}")

    multilabel = bool(cfg.label_columns) or bool(cfg.label_separator)
    if cfg.label_columns:
        classes = list(cfg.label_columns)
    elif cfg.classes:
        classes = list(cfg.classes)
    else:
        values: set[str] = set()
        for r in rows:
            v = r[cfg.label_column].strip()
            values.update(x.strip() for x in v.split(cfg.label_separator)) if cfg.label_separator else values.add(v)
        values.discard("")
        values.difference_update(cfg.no_finding)
        classes = sorted(values)
    index = {c: i for i, c in enumerate(classes)}

    table = LabelTable("multilabel" if multilabel else "multiclass", classes, cfg.label_key)
    for n, r in enumerate(rows, start=2):  # row 1 is the header
        key = _norm_key(cfg.label_key, r[cfg.key_column])
        where = f"{path} row {n}"
        if cfg.label_columns:
            target: Any = []
            for c in cfg.label_columns:
                v = r[c].strip()
                if v not in ("0", "1", "0.0", "1.0"):
                    raise InputError(f"{where}, column {c!r}: expected 0 or 1, got {v!r}")
                target.append(int(float(v)))
        elif cfg.label_separator:
            names = [x.strip() for x in r[cfg.label_column].split(cfg.label_separator)
                     if x.strip() and x.strip() not in cfg.no_finding]
            unknown = [x for x in names if x not in index]
            if unknown:
                raise InputError(f"{where}, column {cfg.label_column!r}: unknown class(es) {unknown}")
            target = [int(c in names) for c in classes]
        else:
            v = r[cfg.label_column].strip()
            if v not in index:
                raise InputError(f"{where}, column {cfg.label_column!r}: class {v!r} not in {classes}")
            target = index[v]
        if key in table.targets and table.targets[key] != target:
            raise InputError(f"{where}: key {key!r} appears earlier with a different label")
        table.targets[key] = target
        if cfg.patient_column:
            table.patients[key] = r[cfg.patient_column].strip()
    return table
