"""Patient-level splits (`medscale.prep.splits`): deterministic, keyed, per patient, exact shares."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from test_deid import KEY, OTHER_KEY, make_dicom

from medscale.errors import ConfigError
from medscale.prep.deid import Pseudonymizer, safe_metadata
from medscale.prep.splits import patient_split, split_point, stratified_splits

pytestmark = pytest.mark.filterwarnings(
    "ignore:Invalid value for VR:UserWarning", "ignore:The value length:UserWarning"
)

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def test_split_is_deterministic_keyed_and_close_to_the_fractions() -> None:
    pseudo = Pseudonymizer(KEY)
    patients = [pseudo("patient", f"MRN{i:06d}") for i in range(10_000)]
    splits = [patient_split(pseudo, p, FRACTIONS) for p in patients]
    assert splits == [patient_split(Pseudonymizer(KEY), p, FRACTIONS) for p in patients]
    for name, fraction in FRACTIONS.items():
        assert abs(splits.count(name) / len(splits) - fraction) < 0.02
    # The stacking order is fixed, so the dict's order does not move anyone.
    reordered = {"test": 0.1, "val": 0.1, "train": 0.8}
    assert [patient_split(pseudo, p, reordered) for p in patients[:500]] == splits[:500]
    other = Pseudonymizer(OTHER_KEY)
    assert [patient_split(other, p, FRACTIONS) for p in patients[:500]] != splits[:500]


def test_all_images_of_a_patient_share_a_split() -> None:
    pseudo = Pseudonymizer(KEY)
    for i in range(50):
        splits = {
            patient_split(pseudo, safe_metadata(make_dicom(PatientID=f"P{i}", SOPInstanceUID=f"1.2.3.{i}.{j}"), pseudo)["patient"], FRACTIONS)
            for j in range(4)
        }
        assert len(splits) == 1


def test_split_edge_fractions() -> None:
    pseudo = Pseudonymizer(KEY)
    patients = [pseudo("patient", str(i)) for i in range(300)]
    assert {patient_split(pseudo, p, {"train": 1.0, "val": 0.0, "test": 0.0}) for p in patients} == {"train"}
    assert {patient_split(pseudo, p, {"train": 0.5, "holdout": 0.5}) for p in patients} == {"train", "holdout"}


@pytest.mark.parametrize(
    ("fractions", "needle"),
    [
        ({"train": 0.8, "val": 0.1}, "sum to 1"),
        ({"train": 1.1, "val": -0.1}, "'val'"),
        ({"train": float("nan"), "val": 1.0}, "'train'"),
        ({"train": True}, "'train'"),
        ({}, "empty"),
    ],
)
def test_split_validation(fractions: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        patient_split(Pseudonymizer(KEY), "abc", fractions)


def test_split_points_are_the_keyed_hash_they_always_were() -> None:
    # Moving the split out of the Pseudonymizer must not move any patient: the point is still
    # the first 64 bits of HMAC-SHA256(key, "split\0" + pseudonym), big-endian, over 2**64.
    pseudo = Pseudonymizer(KEY)
    for i in range(200):
        p = pseudo("patient", f"MRN{i:06d}")
        digest = hmac.new(KEY, b"split\x00" + p.encode(), hashlib.sha256).digest()
        assert split_point(pseudo, p) == int.from_bytes(digest[:8], "big") / 2.0**64


def test_stratified_splits_deal_each_stratum_by_rank() -> None:
    pseudo = Pseudonymizer(KEY)
    strata = {pseudo("patient", f"P{i}"): ("rare" if i < 10 else "common") for i in range(200)}
    out = stratified_splits(pseudo, strata, FRACTIONS)
    rare = [out[p] for p, s in strata.items() if s == "rare"]
    common = [out[p] for p, s in strata.items() if s == "common"]
    assert (rare.count("train"), rare.count("val"), rare.count("test")) == (8, 1, 1)
    assert (common.count("train"), common.count("val"), common.count("test")) == (152, 19, 19)
    # Within a stratum, rank follows the split point: the lowest points go to train.
    ranked = sorted((p for p, s in strata.items() if s == "rare"), key=lambda p: split_point(pseudo, p))
    assert [out[p] for p in ranked] == ["train"] * 8 + ["val", "test"]


def test_bad_fractions_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="sum to 1"):
        patient_split(Pseudonymizer(KEY), "abc", {"train": 0.5})
