"""De-identification, pseudonyms, burned-in-text quarantine and photo loading (splits: test_splits.py)."""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, PngImagePlugin
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from medscale.synthetic import synthetic_dicom
from medscale.prep.deid import (
    BODY_PART_TERMS,
    KEY_ENV,
    MODALITY_TERMS,
    VIEW_POSITION_TERMS,
    Pseudonymizer,
    burned_in_text_reason,
    load_pseudonym_key,
    pseudonymize_fields,
    safe_metadata,
)
from medscale.prep.errors import RejectedInput
from medscale.prep.photos import load_photo

# The tests plant invalid values on purpose; pydicom warns about each one.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Invalid value for VR:UserWarning", "ignore:The value length:UserWarning"
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))

# Every identifying value planted in the test DICOM. Text canaries share a marker; dates and UIDs
# cannot hold letters, so they are listed one by one.
MARK = "7f3a"
PATIENT_ID = "CANARY_PID_7f3a"
STUDY_UID = "1.2.826.0.1.3680043.8.498.77701"
SERIES_UID = "1.2.826.0.1.3680043.8.498.77702"
SOP_UID = "1.2.826.0.1.3680043.8.498.77703"
REF_UID = "1.2.826.0.1.3680043.8.498.77704"
NUMERIC_CANARIES = ["19450307", "20240229", "101530", STUDY_UID, SERIES_UID, SOP_UID, REF_UID, "77701", "77703"]

ALLOWED_KEYS = {
    "modality", "photometric", "rows", "columns", "bits_stored", "number_of_frames", "pixel_spacing",
    "slice_thickness", "window_center", "window_width", "rescale", "sex", "age_band", "body_part",
    "view_position", "laterality", "transfer_syntax", "patient", "patient_from", "study", "series",
    "instance",
}


def make_dicom(**attrs: object) -> FileDataset:
    """A small CT-like DICOM full of canaries; keyword arguments override or (with None) delete."""
    request = Dataset()
    request.RequestedProcedureDescription = "CANARY_REQUEST_7f3a"
    request.RequestedProcedureID = "CANARY_RPID_7f3a"
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref.ReferencedSOPInstanceUID = REF_UID
    canaries = dict(
        StudyInstanceUID=STUDY_UID, SeriesInstanceUID=SERIES_UID, PatientName="CANARY_NAME_7f3a^Jane",
        PatientID=PATIENT_ID, PatientBirthDate="19450307", PatientSex="F", PatientAge="079Y",
        OtherPatientIDs="CANARY_OTHERID_7f3a", StudyDate="20240229", StudyTime="101530",
        InstitutionName="CANARY_INSTITUTION_7f3a", InstitutionAddress="1 CANARY_STREET_7f3a, Springfield",
        ReferringPhysicianName="CANARY_REFDOC_7f3a", PerformingPhysicianName="CANARY_PERFDOC_7f3a",
        OperatorsName="CANARY_OPERATOR_7f3a", StudyDescription="CANARY_STUDYDESC_7f3a",
        SeriesDescription="CANARY_SERIESDESC_7f3a", ImageComments="patient CANARY_COMMENT_7f3a said hello",
        AccessionNumber="CANARY_ACC_7f3a", Manufacturer="CANARY_MAKER_7f3a", DeviceSerialNumber="CANARY_SERIAL_7f3a",
        BodyPartExamined="CHEST", ViewPosition="PA", ImageLaterality="L", PixelSpacing=[0.5, 0.25],
        SliceThickness=1.25, WindowCenter=[40, -600], WindowWidth=[400, 1500], RescaleSlope=1, RescaleIntercept=-1024,
        RequestAttributesSequence=Sequence([request]), ReferencedStudySequence=Sequence([ref]))
    ds = synthetic_dicom((np.arange(256, dtype=np.uint16) * 16).reshape(16, 16), path="canary.dcm", sop_uid=SOP_UID,
                         bits_stored=12, **{**canaries, **attrs})
    block = ds.private_block(0x0011, "CANARY_CREATOR_7f3a", create=True)
    block.add_new(0x01, "LO", "CANARY_PRIVATE_7f3a")
    ds.add_new(0x60000022, "LO", "CANARY_OVERLAY_7f3a")  # OverlayDescription
    return ds


def roundtrip(ds: FileDataset) -> Dataset:
    """Write and read back, so values come from the file (lazily converted) as in the pipeline."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def assert_no_canary(meta: dict) -> None:
    text = json.dumps(meta)
    assert MARK not in text.lower()
    assert "canary" not in text.lower()
    for canary in NUMERIC_CANARIES:
        assert canary not in text


# ---------------------------------------------------------------------------------------------
# safe_metadata
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("from_file", [False, True])
def test_safe_metadata_leaks_no_canary_and_keeps_the_allowlist(from_file: bool) -> None:
    ds = make_dicom()
    if from_file:
        ds = roundtrip(ds)
    pseudo = Pseudonymizer(KEY)
    meta = safe_metadata(ds, pseudo)
    assert_no_canary(meta)
    assert set(meta) <= ALLOWED_KEYS
    assert json.loads(json.dumps(meta)) == meta  # plain JSON types only
    assert meta["modality"] == "CT"
    assert meta["photometric"] == "MONOCHROME2"
    assert (meta["rows"], meta["columns"], meta["bits_stored"]) == (16, 16, 12)
    assert meta["pixel_spacing"] == [0.5, 0.25]
    assert meta["slice_thickness"] == 1.25
    assert meta["window_center"] == [40.0, -600.0] and meta["window_width"] == [400.0, 1500.0]
    assert meta["rescale"] == {"slope": 1.0, "intercept": -1024.0}
    assert (meta["sex"], meta["age_band"]) == ("F", "70-79")
    assert (meta["body_part"], meta["view_position"], meta["laterality"]) == ("CHEST", "PA", "L")
    assert meta["transfer_syntax"] == ExplicitVRLittleEndian
    assert meta["patient"] == pseudo("patient", PATIENT_ID)
    assert meta["patient_from"] == "patient_id"
    assert meta["study"] == pseudo("study", STUDY_UID)
    assert meta["series"] == pseudo("series", SERIES_UID)
    assert meta["instance"] == pseudo("instance", SOP_UID)


def test_pseudonyms_are_stable_keyed_and_domain_separated() -> None:
    a, b = Pseudonymizer(KEY), Pseudonymizer(OTHER_KEY)
    meta1, meta2 = safe_metadata(make_dicom(), a), safe_metadata(make_dicom(), Pseudonymizer(KEY))
    assert meta1["patient"] == meta2["patient"]
    assert safe_metadata(make_dicom(), b)["patient"] != meta1["patient"]
    kinds = {a(kind, "12345") for kind in ("patient", "study", "series", "instance")}
    assert len(kinds) == 4
    p = a("patient", "12345")
    assert len(p) == 20 and p == p.lower() and "." not in p and int(p, 16) >= 0
    assert "key=<hidden>" in repr(a) and KEY.hex() not in repr(a)


def test_patient_falls_back_to_study_and_rejects_when_neither_exists() -> None:
    pseudo = Pseudonymizer(KEY)
    meta = safe_metadata(make_dicom(PatientID=""), pseudo)
    assert meta["patient_from"] == "study"
    assert meta["patient"] not in (pseudo("patient", ""), pseudo("patient", STUDY_UID))
    with pytest.raises(RejectedInput) as e:
        safe_metadata(make_dicom(PatientID=None, StudyInstanceUID=None), pseudo)
    assert e.value.reason == "no_patient"


def test_patient_id_with_backslash_and_padding_is_one_identifier() -> None:
    pseudo = Pseudonymizer(KEY)
    meta = safe_metadata(roundtrip(make_dicom(PatientID="AB\\12 ")), pseudo)
    assert meta["patient"] == pseudo("patient", "AB\\12")


@pytest.mark.parametrize(
    ("age", "band"),
    [
        ("045Y", "40-49"), ("000Y", "0-9"), ("009Y", "0-9"), ("010Y", "10-19"), ("089Y", "80-89"),
        ("090Y", "90+"), ("104Y", "90+"), ("45Y", "40-49"), ("018M", "0-9"), ("999M", "80-89"),
        ("003W", "0-9"), ("010D", "0-9"), ("abc", None), ("45", None), ("-45Y", None),
    ],
)
def test_age_bands(age: str, band: str | None) -> None:
    meta = safe_metadata(make_dicom(PatientAge=age), Pseudonymizer(KEY))
    assert meta.get("age_band") == band


def test_age_band_is_never_computed_from_birth_date() -> None:
    meta = safe_metadata(make_dicom(PatientAge=None), Pseudonymizer(KEY))
    assert "age_band" not in meta


@pytest.mark.parametrize(
    ("sex", "out"), [("M", "M"), ("F", "F"), ("O", "O"), ("m", "M"), ("FEMALE", "F"), ("U", None), ("JOHN", None)]
)
def test_sex_normalisation(sex: str, out: str | None) -> None:
    assert safe_metadata(make_dicom(PatientSex=sex), Pseudonymizer(KEY)).get("sex") == out


@pytest.mark.parametrize(
    ("value", "body_part", "view_position"),
    [
        ("CHEST", "CHEST", None), ("PA", None, "PA"), (" CHEST ", "CHEST", None), ("chest", "CHEST", None),
        ("mlo", None, "MLO"), ("WHOLE BODY", "WHOLEBODY", None), ("L_SPINE", "LSPINE", None),
        ("C-SPINE", "CSPINE", None),
        # Inside the CS repertoire, but no defined term: a surname, a name, free text.
        ("SMITH", None, None), ("DOE JANE", None, None), ("CHEST WALL", None, None), ("AP AXIAL", None, None),
        # Outside the repertoire as well.
        ("Patient: J. Doe", None, None), ("ABCDEFGHIJKLMNOPQ", None, None), ("DOE, JANE", None, None),
    ],
)
def test_coded_strings_keep_only_defined_terms(value: str, body_part: str | None, view_position: str | None) -> None:
    dropped: Counter = Counter()
    meta = safe_metadata(make_dicom(BodyPartExamined=value, ViewPosition=value), Pseudonymizer(KEY), dropped)
    assert meta.get("body_part") == body_part and meta.get("view_position") == view_position
    assert dropped == +Counter({"body_part": body_part is None, "view_position": view_position is None})
    if body_part is None and view_position is None:
        assert value not in json.dumps(meta)


def test_a_surname_in_any_coded_attribute_is_dropped_and_counted() -> None:
    ds = make_dicom(Modality="SMITH", PhotometricInterpretation="SMITH", PatientSex="SMITH",
                    BodyPartExamined="SMITH", ViewPosition="SMITH", ImageLaterality="SMITH")
    dropped: Counter = Counter()
    meta = safe_metadata(ds, Pseudonymizer(KEY), dropped)
    names = ["modality", "photometric", "sex", "body_part", "view_position", "laterality"]
    assert not set(names) & set(meta) and "SMITH" not in json.dumps(meta)
    assert dropped == Counter(names)
    safe_metadata(ds, Pseudonymizer(KEY), dropped)  # counts add up over files
    assert dropped == Counter({name: 2 for name in names})


def test_real_terms_are_kept_and_nothing_is_counted() -> None:
    ds = make_dicom(Modality="mg", PatientSex="female", BodyPartExamined="breast", ViewPosition="XCCL",
                    ImageLaterality=None, Laterality="R")
    dropped: Counter = Counter()
    meta = safe_metadata(ds, Pseudonymizer(KEY), dropped)
    assert (meta["modality"], meta["sex"], meta["body_part"], meta["view_position"], meta["laterality"]) == (
        "MG", "F", "BREAST", "XCCL", "R")
    assert meta["photometric"] == "MONOCHROME2" and not dropped


@pytest.mark.parametrize("empty", [None, "", "  "])
def test_absent_or_empty_codes_are_not_counted(empty: str | None) -> None:
    attrs = dict.fromkeys(["Modality", "PatientSex", "BodyPartExamined", "ViewPosition", "ImageLaterality"], empty)
    dropped: Counter = Counter()
    meta = safe_metadata(roundtrip(make_dicom(**attrs)), Pseudonymizer(KEY), dropped)
    assert not {"modality", "sex", "body_part", "view_position", "laterality"} & set(meta)
    assert not dropped


def test_multiple_values_laterality_fallback_and_rejected_files() -> None:
    dropped: Counter = Counter()
    ds = roundtrip(make_dicom(BodyPartExamined="CHEST\\ABDOMEN", ImageLaterality="JDOE", Laterality="R"))
    meta = safe_metadata(ds, Pseudonymizer(KEY), dropped)
    assert "body_part" not in meta and meta["laterality"] == "R"  # the series' laterality stands in
    assert dropped == Counter({"body_part": 1, "laterality": 1})
    with pytest.raises(RejectedInput):
        safe_metadata(make_dicom(PatientID=None, StudyInstanceUID=None, BodyPartExamined="SMITH"), Pseudonymizer(KEY), dropped)
    assert dropped == Counter({"body_part": 1, "laterality": 1})  # a rejected file adds nothing


def test_term_lists_cover_the_standard() -> None:
    # pydicom ships CID 33 (Modality) from the standard; every code value there is a Modality term.
    from pydicom.sr import codes

    cid33 = {getattr(codes.cid33, name).value for name in codes.cid33.dir()}
    assert cid33 <= MODALITY_TERMS
    assert "SC" not in MODALITY_TERMS  # a SOP class, not a modality
    for terms in (BODY_PART_TERMS, VIEW_POSITION_TERMS, MODALITY_TERMS):
        assert all(re.fullmatch(r"[A-Z0-9]{1,16}", t) for t in terms)
    assert {"SKULL", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "COCCYX", "CHEST", "CLAVICLE", "BREAST", "ABDOMEN",
            "PELVIS", "HIP", "SHOULDER", "ELBOW", "KNEE", "ANKLE", "HAND", "FOOT", "EXTREMITY", "HEAD", "HEART",
            "NECK", "LEG", "ARM", "JAW", "WHOLEBODY", "CHESTABDOMEN", "CHESTABDPELVIS", "ABDOMENPELVIS",
            "HEADNECK", "BRAIN", "LIVER", "KIDNEY", "COLON", "STOMACH", "ESOPHAGUS", "EYE"} <= BODY_PART_TERMS
    assert {"AP", "PA", "LL", "RL", "RLD", "LLD", "RLO", "LLO", "CC", "MLO", "ML", "LM"} <= VIEW_POSITION_TERMS


# The coded values of pydicom's bundled test files that are still dropped, as (output name, value).
# None is: "WHOLE BODY" (4 files) would be without the inner-space normalisation.
PYDICOM_DROPPED: set[tuple[str, str]] = set()


@pytest.mark.filterwarnings("ignore::UserWarning")  # some bundled files are malformed on purpose
def test_pydicom_test_files_keep_their_real_codes() -> None:
    root = Path(get_testdata_file("CT_small.dcm", download=False)).parent
    keywords = {"modality": ["Modality"], "photometric": ["PhotometricInterpretation"], "sex": ["PatientSex"],
                "body_part": ["BodyPartExamined"], "view_position": ["ViewPosition"],
                "laterality": ["ImageLaterality", "Laterality"]}
    lost: list[tuple[str, str]] = []
    kept, dropped, parsed = Counter(), Counter(), 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not every bundled file is DICOM (JSON, dumps, broken on purpose)
            continue
        parsed += 1
        if not ds.get("PatientID") and not ds.get("StudyInstanceUID"):
            ds.PatientID = "X"  # so files without a patient are checked too rather than rejected
        meta = safe_metadata(ds, Pseudonymizer(KEY), dropped)
        for name, kws in keywords.items():
            kept[name] += name in meta
            if name not in meta:
                lost += [(name, str(ds.get(kw)).strip()) for kw in kws if str(ds.get(kw) or "").strip()]
    assert parsed > 100 and kept["modality"] > 100 and kept["body_part"] >= 10
    assert set(lost) == PYDICOM_DROPPED
    assert dropped == Counter(name for name, _ in lost)


def test_malformed_numbers_are_dropped_not_guessed() -> None:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, make_dicom(SliceThickness="1e999", RescaleSlope=None), enforce_file_format=True)
    # Corrupt the stored PixelSpacing the way a broken writer would (same length, so the file
    # stays parseable); pydicom only converts, and fails, when the value is read.
    data = buf.getvalue()
    assert data.count(b"0.5\\0.25") == 1
    ds = pydicom.dcmread(io.BytesIO(data.replace(b"0.5\\0.25", b"abc\\0.25")))
    meta = safe_metadata(ds, Pseudonymizer(KEY))
    assert "pixel_spacing" not in meta and "slice_thickness" not in meta
    assert meta["rescale"] == {"slope": 1.0, "intercept": -1024.0}


# ---------------------------------------------------------------------------------------------
# Burned-in text
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({}, None),
        ({"BurnedInAnnotation": "YES"}, "burned_in_annotation"),
        ({"BurnedInAnnotation": "NO", "Modality": "US"}, None),
        ({"Modality": "US"}, "burned_in_unknown"),
        ({"Modality": "SC"}, "burned_in_unknown"),
        ({"Modality": "ES"}, "burned_in_unknown"),
        ({"Modality": "XA", "BurnedInAnnotation": "MAYBE"}, "burned_in_unknown"),
        ({"Modality": None}, "burned_in_unknown"),
        ({"SOPClassUID": SecondaryCaptureImageStorage}, "burned_in_unknown"),  # a CT screenshot
        ({"RecognizableVisualFeatures": "YES", "BurnedInAnnotation": "NO"}, "recognizable_visual_features"),
        ({"Modality": "MR", "BurnedInAnnotation": "NO"}, None),
    ],
)
def test_burned_in_text_reason(attrs: dict, reason: str | None) -> None:
    assert burned_in_text_reason(make_dicom(**attrs)) == reason


def test_pseudonymizer_rejects_short_keys_and_bad_kinds() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        Pseudonymizer(b"short")
    with pytest.raises(ValueError, match="kind"):
        Pseudonymizer(KEY)("", "x")


def test_pseudonymize_fields() -> None:
    pseudo = Pseudonymizer(KEY)
    out = pseudonymize_fields({"patient": " MRN 0042 ", "study": "", "series": "  "}, pseudo)
    assert out == {"patient": pseudo("patient", "MRN 0042")}


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------


def test_key_from_hex_file_raw_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, OTHER_KEY.hex())
    hex_file = tmp_path / "hex.key"
    hex_file.write_text(KEY.hex() + "\n")
    assert load_pseudonym_key(hex_file) == KEY  # the file wins over the environment
    raw_file = tmp_path / "raw.key"
    raw_file.write_bytes(b"\xff" * 16 + KEY)
    assert load_pseudonym_key(str(raw_file)) == b"\xff" * 16 + KEY
    assert load_pseudonym_key() == OTHER_KEY


@pytest.mark.parametrize(("content", "needle"), [(b"abcd" * 3, "at least 16"), (b"a" * 63, "odd"), (b"", "0 bytes")])
def test_bad_key_files(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=needle):
        load_pseudonym_key(path)


@pytest.mark.parametrize(("value", "needle"), [("zz" * 16, "hex"), ("ab" * 8 + "a", "hex"), ("ab" * 4, "at least 16"), ("  ", "empty")])
def test_bad_key_env(monkeypatch: pytest.MonkeyPatch, value: str, needle: str) -> None:
    monkeypatch.setenv(KEY_ENV, value)
    with pytest.raises(ValueError, match=needle) as e:
        load_pseudonym_key()
    assert value.strip() == "" or value not in str(e.value)  # key material never echoed


def test_random_key_and_missing_key_message(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="medscale.prep.deid"):
        k1, k2 = load_pseudonym_key(allow_random=True), load_pseudonym_key(allow_random=True)
    assert len(k1) == 32 and k1 != k2
    assert "will not match" in caplog.text
    with pytest.raises(ValueError) as e:
        load_pseudonym_key()
    message = str(e.value)
    assert "secrets.token_hex" in message and "--key-file" in message
    assert KEY_ENV in message and "--random-key" in message and "chmod 600" in message


# ---------------------------------------------------------------------------------------------
# Photos
# ---------------------------------------------------------------------------------------------


def _meta_ok(meta: dict) -> None:
    assert set(meta) == {"width", "height", "channels", "bit_depth", "format"}
    assert "canary" not in json.dumps(meta).lower()


def test_jpeg_exif_is_applied_and_stripped(tmp_path: Path) -> None:
    # Stored 20 rows x 40 columns, bright top-left block; orientation 6 means "rotate 90 degrees
    # clockwise to display", which moves that block to the top-right of a 40 x 20 image.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:10, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    exif[0x013B] = "CANARY_ARTIST_7f3a"  # Artist
    exif[0x010E] = "CANARY_DESCRIPTION_7f3a"  # ImageDescription
    path = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(path, "JPEG", quality=95, exif=exif, comment=b"CANARY_COMMENT_7f3a")
    assert b"CANARY_ARTIST_7f3a" in path.read_bytes()

    pixels, meta = load_photo(path)
    _meta_ok(meta)
    assert pixels.dtype == np.uint8 and pixels.shape == (40, 20, 3)
    assert meta == {"width": 20, "height": 40, "channels": 3, "bit_depth": 8, "format": "JPEG"}
    expected = np.rot90(stored, k=-1)
    assert np.abs(pixels.astype(int) - expected.astype(int)).mean() < 8
    assert pixels[5, 15].min() > 200 and pixels[5, 5].max() < 50


def test_png_16bit_grayscale_roundtrips_exactly(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 65536, (17, 23), dtype=np.uint16)
    data[0, 0], data[0, 1] = 0, 65535
    path = tmp_path / "gray16.png"
    Image.fromarray(data).save(path)
    pixels, meta = load_photo(path)
    assert pixels.dtype == np.uint16 and np.array_equal(pixels, data)
    assert meta == {"width": 23, "height": 17, "channels": 1, "bit_depth": 16, "format": "PNG"}
    assert pixels.flags.c_contiguous and pixels.flags.writeable


def test_png_text_chunks_never_returned(tmp_path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "CANARY_TEXT_7f3a")
    info.add_text("Comment", "CANARY_ZTXT_7f3a", zip=True)
    info.add_itxt("Description", "CANARY_ITXT_7f3a")
    rgba = np.zeros((8, 9, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 128
    path = tmp_path / "text.png"
    Image.fromarray(rgba).save(path, pnginfo=info)
    assert b"CANARY_TEXT_7f3a" in path.read_bytes()
    pixels, meta = load_photo(path)
    _meta_ok(meta)
    assert pixels.shape == (8, 9, 3) and (pixels[..., 0] == 200).all()  # alpha dropped


def test_png_8bit_grayscale(tmp_path: Path) -> None:
    data = np.arange(64, dtype=np.uint8).reshape(8, 8)
    path = tmp_path / "gray8.png"
    Image.fromarray(data).save(path)
    pixels, meta = load_photo(path)
    assert pixels.dtype == np.uint8 and np.array_equal(pixels, data) and meta["channels"] == 1


def _jpeg(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, "JPEG")
    return path


def test_photo_rejections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = _jpeg(tmp_path / "full.jpg").read_bytes()
    cases = {
        "truncated": full[: len(full) // 2],
        "empty": b"",
        "unsupported": b"GIF89a" + b"\0" * 64,
        "unreadable": b"\xff\xd8\xff" + b"\0" * 64,
    }
    for reason, data in cases.items():
        path = tmp_path / f"{reason}.jpg"
        path.write_bytes(data)
        with pytest.raises(RejectedInput) as e:
            load_photo(path)
        assert e.value.reason == reason, (reason, str(e.value))

    with pytest.raises(RejectedInput) as e:
        load_photo(tmp_path / "full.jpg", max_pixels=64 * 64 * 3 - 1)
    assert e.value.reason == "too_large"
    assert load_photo(tmp_path / "full.jpg", max_pixels=64 * 64 * 3)[0].shape == (64, 64, 3)

    # Pillow's decompression-bomb guard (raised while reading the header) also reads too_large.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(RejectedInput) as e:
        load_photo(tmp_path / "full.jpg")
    assert e.value.reason == "too_large"

    with pytest.raises(ValueError):
        load_photo(tmp_path / "full.jpg", max_pixels=0)


def test_rejected_input_str_and_pickle() -> None:
    err = RejectedInput("truncated", "3 bytes missing")
    assert str(err) == "truncated: 3 bytes missing"
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.detail) == ("truncated", "3 bytes missing")


def test_multi_picture_jpeg_gives_its_first_frame(tmp_path: Path) -> None:
    first = Image.fromarray(np.full((10, 12, 3), 100, np.uint8))
    second = Image.fromarray(np.full((10, 12, 3), 200, np.uint8))
    path = tmp_path / "phone.jpg"
    first.save(path, "MPO", save_all=True, append_images=[second])
    pixels, meta = load_photo(path)
    assert meta["format"] == "JPEG" and pixels.shape == (10, 12, 3)
    assert abs(float(pixels.mean()) - 100) < 3
