"""Patient-level splits: every image of a patient goes to the same split, never per image.

A patient's place in [0, 1) is a second keyed hash of its pseudonym (the ``"split"`` domain of
the `Pseudonymizer`), so splits are deterministic for a key, cannot be steered by whoever lacks
the key, and need no table shared between workers or Slurm array tasks. Two ways to use it:

- `patient_split`: cut [0, 1) by the cumulative fractions; a patient's split depends on nothing
  but its own pseudonym.
- `stratified_splits`: deal the patients of each stratum (e.g. their rarest class) to the splits
  by rank, so each split gets its share of a rare class to within one patient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from medscale.errors import ConfigError
from medscale.prep.deid import Pseudonymizer

__all__ = ["SPLIT_ORDER", "patient_split", "stratified_splits", "split_point"]

SPLIT_ORDER = ("train", "val", "test")
"""Order in which split fractions are stacked on [0, 1); other split names follow, sorted.

The order is fixed rather than taken from the dict, so reordering a YAML file never moves a
patient from one split to another.
"""

# A split point uses the first 64 bits of the keyed hash: a uniform number in [0, 1) with no
# visible granularity. They are the first 16 hex characters of the "split" pseudonym.
_POINT_HEX = 16
_POINT_SCALE = 2.0**64
# Fractions must sum to 1 within this tolerance (YAML decimals such as 0.1 are not exact).
_SUM_TOLERANCE = 1e-6


def split_point(pseudo: Pseudonymizer, patient_pseudonym: str) -> float:
    """The patient's keyed position in [0, 1)."""
    return int(pseudo("split", patient_pseudonym)[:_POINT_HEX], 16) / _POINT_SCALE


def patient_split(pseudo: Pseudonymizer, patient_pseudonym: str, fractions: Mapping[str, float]) -> str:
    """The split a patient belongs to; every image of the patient goes to the same one.

    The patient's `split_point` is cut by the cumulative fractions, stacked in `SPLIT_ORDER`
    (train, val, test), then any other names sorted. Changing one fraction therefore moves only
    the patients near the affected cut.

    Args:
        pseudo: the pseudonymizer of the prep run (its key).
        patient_pseudonym: the patient's pseudonym (from ``pseudo("patient", ...)``).
        fractions: split name to fraction; non-negative, summing to 1.

    Raises:
        ConfigError: empty fractions, a negative or non-finite fraction, or a sum other than 1.
    """
    return _cut(split_point(pseudo, patient_pseudonym), _ordered_fractions(fractions))


def stratified_splits(pseudo: Pseudonymizer, strata: Mapping[str, str],
                      fractions: Mapping[str, float]) -> dict[str, str]:
    """Splits for patients grouped into strata (e.g. by their rarest class).

    Within each stratum the patients, ordered by `split_point`, are dealt to the splits by rank:
    rank ``r`` of ``n`` goes where ``(r + 0.5) / n`` falls among the cumulative fractions. Each
    split so gets its fraction of every stratum to within one patient, where a plain hash split
    can leave a rare class out of a small test split. Deterministic for a given key and strata;
    unlike `patient_split`, a patient's split depends on the other patients of its stratum.

    Args:
        pseudo: the pseudonymizer of the prep run.
        strata: patient pseudonym to stratum name.
        fractions: as for `patient_split`.

    Returns:
        Patient pseudonym to split name.
    """
    order = _ordered_fractions(fractions)
    groups: dict[str, list[str]] = {}
    for patient, stratum in strata.items():
        groups.setdefault(stratum, []).append(patient)
    out: dict[str, str] = {}
    for patients in groups.values():
        patients.sort(key=lambda p: split_point(pseudo, p))
        for rank, patient in enumerate(patients):
            out[patient] = _cut((rank + 0.5) / len(patients), order)
    return out


def _cut(u: float, order: list[tuple[str, float]]) -> str:
    """The split whose share of [0, 1), stacked in `order`, holds ``u``."""
    cumulative = 0.0
    for name, fraction in order:
        cumulative += fraction
        if u < cumulative:
            return name
    # Rounding can leave the last cut a hair below 1: the rest goes to the last non-empty split.
    return next(name for name, fraction in reversed(order) if fraction > 0)


def _ordered_fractions(fractions: Mapping[str, float]) -> list[tuple[str, float]]:
    if not fractions:
        raise ConfigError("split fractions are empty; give e.g. {'train': 0.8, 'val': 0.1, 'test': 0.1}")
    for name, f in fractions.items():
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f):
            raise ConfigError(f"split fraction {name!r} must be a finite number, got {f!r}")
        if f < 0:
            raise ConfigError(f"split fraction {name!r} must be non-negative, got {f!r}")
    total = sum(fractions.values())
    if abs(total - 1.0) > _SUM_TOLERANCE:
        raise ConfigError(f"split fractions must sum to 1, got {total!r} from {dict(fractions)!r}")
    names = [n for n in SPLIT_ORDER if n in fractions] + sorted(n for n in fractions if n not in SPLIT_ORDER)
    return [(n, float(fractions[n])) for n in names]
