"""De-identification: allowlisted metadata, keyed pseudonyms, burned-in-text quarantine.

The approach follows DICOM PS3.15 Annex E (Basic Application Level Confidentiality Profile) by
construction rather than by deletion: a shard never carries a copy of the DICOM header, only the
handful of technical attributes that `safe_metadata` allowlists, coded ones only as a defined term
of the standard. Names, dates, free text, institutions, physicians, device serials, private tags,
overlays, curves and nested sequences are therefore absent without having to be found and removed
one by one. Identifiers that link images
(patient, study, series, instance) are replaced by keyed pseudonyms (HMAC-SHA256 under a secret
key), so they stay consistent across a corpus and across runs with the same key, but cannot be
reversed or re-derived by anyone without the key, even for small identifier spaces such as
medical record numbers. Pixels can still carry burned-in text: `burned_in_text_reason` says
which images to quarantine. Patient-level splits are not de-identification: `medscale.prep.splits`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import stat
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydicom
from pydicom.multival import MultiValue
from pydicom.uid import UID_dictionary

from medscale.errors import ConfigError
from medscale.prep.errors import RejectedInput

__all__ = [
    "KEY_ENV",
    "BURNED_IN_MODALITIES",
    "BURNED_IN_SOP_CLASSES",
    "BODY_PART_TERMS",
    "VIEW_POSITION_TERMS",
    "MODALITY_TERMS",
    "load_pseudonym_key",
    "Pseudonymizer",
    "safe_metadata",
    "burned_in_text_reason",
    "pseudonymize_fields",
]

log = logging.getLogger(__name__)

KEY_ENV = "MEDSCALE_PSEUDONYM_KEY"
"""Environment variable holding the pseudonym key as a hex string."""

MIN_KEY_BYTES = 16
"""Shortest accepted key: 128 bits, the HMAC-SHA256 security level we rely on."""

RANDOM_KEY_BYTES = 32
"""Length of a one-off random key: the 256 bits the recommended ``secrets.token_hex(32)`` makes."""

# Modalities whose pixels are screen grabs, video frames or camera pictures rather than detector
# data. Vendors routinely burn the patient name, ID, birth date and institution into these
# (ultrasound and angiography screens, endoscopy video overlays, fundus-camera exports, secondary
# captures of a viewer, slide labels in whole-slide imaging). When such an image does not declare
# BurnedInAnnotation, we assume it may carry text.
BURNED_IN_MODALITIES = frozenset(
    {
        "US",  # ultrasound: the scanner screen, with name/ID/date banner
        "IVUS",  # intravascular ultrasound
        "SC",  # secondary capture: screenshots, scanned films and documents
        "OT",  # other: in practice mostly screenshots and exports
        "XA",  # x-ray angiography: frames with burned-in acquisition text
        "RF",  # radio fluoroscopy: same
        "ES",  # endoscopy: video overlays with patient data
        "XC",  # external-camera photography: faces, wristbands, labels
        "GM",  # general microscopy
        "OP",  # ophthalmic photography: fundus-camera exports print names
        "SM",  # slide microscopy: label and overview images show the slide label
    }
)

# SOP classes that mean "captured, not acquired" whatever the Modality says: a screenshot of a CT
# viewer is often stored as Secondary Capture with Modality CT, name and all.
BURNED_IN_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture
        "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
        "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image
        "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL Endoscopic Image
        "1.2.840.10008.5.1.4.1.1.77.1.1.1",  # Video Endoscopic Image
        "1.2.840.10008.5.1.4.1.1.77.1.2",  # VL Microscopic Image
        "1.2.840.10008.5.1.4.1.1.77.1.2.1",  # Video Microscopic Image
        "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic Image
        "1.2.840.10008.5.1.4.1.1.77.1.4.1",  # Video Photographic Image
        "1.2.840.10008.5.1.4.1.1.77.1.5.1",  # Ophthalmic Photography 8 Bit
        "1.2.840.10008.5.1.4.1.1.77.1.5.2",  # Ophthalmic Photography 16 Bit
    }
)

# AS (Age String) is nnnD/W/M/Y; some writers drop leading zeros, which is unambiguous.
_AGE = re.compile(r"(\d{1,3})([DWMY])")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")
_HEX_DIGITS = re.compile(r"[0-9a-fA-F]+")

# Coded-string (CS) attributes are copied only when the value is one of the standard's defined terms
# for that attribute. The CS repertoire alone (upper case, digits, space, underscore, 16 characters)
# admits "SMITH" or "DOE JANE" typed into BodyPartExamined; a closed list does not. Where a corpus
# uses a variant, `safe_metadata` normalises it onto a term (surrounding spaces, case, and for body
# parts inner spaces, underscores and hyphens: "whole body" -> WHOLEBODY), so the output is always a
# listed term and never the stored text.

# BodyPartExamined: PS3.16 Annex L, "Correspondence of Anatomic Region Codes and Body Part Examined
# Defined Terms" (the human table, L-1, and the veterinary one, L-2). LEG, ARM and JAW stay although
# the human table now says LOWERLEG, UPPERARM and MANDIBLE: older files and the veterinary table use them.
# Spellings are the standard's, typos included (OCCPITALA, OCCIPTALV, ENDONASOPHARYNYX).
BODY_PART_TERMS = frozenset(
    """
    3RDVENTRICLE 4THVENTRICLE ABDOMEN ABDOMENPELVIS ABDOMINALAORTA ACA ACJOINT ADRENAL AMNIOTICFLUID
    ANKLE ANTCARDIACV ANTCOMMA ANTECUBITALV ANTSPINALA ANTTIBIALA ANUSRECTUMSIGMD AORTA AORTICARCH
    APPENDIX ARM ARTERY ASCAORTA ASCENDINGCOLON AXILLA AXILLARYA AXILLARYV AZYGOSVEIN BACK BASILARA
    BILEDUCT BILIARYTRACT BLADDER BLADDERURETHRA BRACHIALA BRACHIALV BRAIN BREAST BRONCHUS BULB BUTTOCK
    CALCANEUS CALF CAROTID CCA CELIACA CEPHALICV CEREBELLUM CEREBHEMISPHERE CEREBRALA CERVIX CFA CFV
    CHEEK CHEST CHESTABDOMEN CHESTABDPELVIS CHOROIDPLEXUS CIRCLEOFWILLIS CLAVICLE COCCYX COLON
    COMILIACA COMILIACV COMMONBILEDUCT CORNEA CORONARYARTERY CORONARYSINUS CSPINE CTSPINE CULDESAC
    DESCAORTA DESCENDINGCOLON DUODENUM EAC EAR ECA ELBOW ENDOARTERIAL ENDOCARDIAC ENDOESOPHAGEAL
    ENDOMETRIUM ENDONASAL ENDONASOPHARYNYX ENDORECTAL ENDORENAL ENDOURETERIC ENDOURETHRAL ENDOVAGINAL
    ENDOVASCULAR ENDOVENOUS ENDOVESICAL EPIDIDYMIS EPIGASTRIC ESOPHAGUS EXTILIACA EXTILIACV EXTJUGV
    EXTREMITY EYE EYELID FACE FACIALA FEMORALA FEMORALV FEMUR FETALARM FETALDIGIT FETALHEART FETALLEG
    FETALPOLE FIBULA FINGER FLANK FONTANEL FOOT FOREARM GALLBLADDER GASTRICV GENICULARA GESTSAC GLUTEAL
    GSV HAND HEAD HEADNECK HEART HEPATICA HEPATICV HIP HUMERUS HYPOGASTRIC HYPOPHARYNX IAC ICA ILEUM
    ILIACA ILIACV ILIUM INFMESA INFVENACAVA INGUINAL INNOMINATEA INNOMINATEV INTILIACA INTJUGULARV
    INTMAMMARYA INTRACRANIAL JAW JEJUNUM JOINT KIDNEY KNEE LACRIMALA LARGEINTESTINE LARYNX LATRIUM
    LATVENTRICLE LEG LFEMORALA LHEPATICV LHYPOCHONDRIAC LINGUALA LINGUINAL LIVER LLQ LLUMBAR LOWERLEG
    LOWERLIMB LPORTALV LPULMONARYA LSPINE LSSPINE LSUPPULMONARYV LUMBAR LUMBARA LUMEN LUNG LUQ
    LVENTRICLE MANDIBLE MASTOID MAXILLA MCA MEDIASTINUM MESENTRICA MESENTRICV MIDHEPATICV MORISONSPOUCH
    MOUTH NASOPHARYNX NECK NECKCHEST NECKCHESTABDOMEN NECKCHESTABDPELV NOSE OCCIPTALV OCCPITALA
    OPHTHALMICA OPTICCANAL ORBIT OVARY PANCBILEDUCT PANCREAS PANCREATICDUCT PARASTERNAL PARATHYROID
    PAROTID PATELLA PCA PELVIS PELVISLOWEXTREMT PENILEA PENIS PERINEUM PERONEALA PHANTOM PHARYNX
    PHARYNXLARYNX PLACENTA POPLITEALA POPLITEALFOSSA POPLITEALV PORTALV POSCOMMA POSTIBIALA PROFFEMA
    PROFFEMV PROSTATE PULMONARYA PULMONARYV RADIALA RADIUS RADIUSULNA RATRIUM RECTUM RENALA RENALV
    RETROPERITONEUM RFEMORALA RHEPATICV RHYPOCHONDRIAC RIB RINGUINAL RLQ RLUMBAR RPORTALV RPULMONARYA
    RSUPPULMONARYV RUQ RVENTRICLE SAPHENOUSV SCALP SCAPULA SCJOINT SCLERA SCROTUM SELLA SEMVESICLE
    SESAMOID SFA SFJ SFV SHOULDER SIGMOID SIJOINT SKULL SMA SMALLINTESTINE SPINALCORD SPINE SPLEEN
    SPLENICA SPLENICV SSPINE STERNUM STOMACH SUBCLAVIANA SUBCLAVIANV SUBCOSTAL SUBMANDIBULAR
    SUPRACLAVICULAR SUPRAPUBIC SUPTHYROIDA SVC TESTIS THALAMUS THIGH THORACICAORTA THORAX THUMB THYMUS
    THYROID TIBIA TIBIAFIBULA TLSPINE TMJ TOE TONGUE TRACHEA TRACHEABRONCHUS TRANSVERSECOLON TSPINE
    ULNA ULNARA UMBILICAL UMBILICALA UMBILICALV UPPERARM UPPERLIMB UPRURINARYTRACT URETER URETHRA UTERUS
    VAGINA VEIN VERTEBRALA VULVA WHOLEBODY WRIST ZYGOMA
    ATLANTOAXIAL ATLANTOOCCIPITAL CARPUS DIGIT DISTALPHALANX FOREFETLOCK FOREFOOT FORENAVICULAR
    FOREPASTERN FRONTALSINUS HINDFETLOCK HINDFOOT HINDNAVICULAR HINDPASTERN LEGS METACARPUS METATARSUS
    STIFLE TAIL TARSUS UGITRACT URINARYTRACT WING
    """.split()
)

# ViewPosition: the DX Positioning Module's defined terms (PS3.3 C.8.11.5.1.1), the ACR MQCM
# mammography view abbreviations that mammography systems store there (the views of CID 4014), and
# a few projection abbreviations that are not defined terms but are how large public chest X-ray
# corpora record the view (LAT and LATERAL in MIMIC-CXR, the oblique projections of CID 4010).
VIEW_POSITION_TERMS = frozenset(
    """
    AP PA LL RL RLD LLD RLO LLO
    CC MLO ML LM LMO XCC XCCL XCCM FB SIO ISO AT CV
    LAT LATERAL LAO RAO LPO RPO
    """.split()
)

# Modality: PS3.3 C.7.3.1.1.1 defined terms, the retired ones included since old archives hold them.
# SC is not among them (Secondary Capture is a SOP class; its Modality is OT or that of the source).
MODALITY_TERMS = frozenset(
    """
    ANN AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DG DMS DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD
    IO IOL IVOCT IVUS KER KO LEN LS M3D MG MR NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PA PLAN
    POS PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG
    SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XAPROTOCOL XC
    AS CD CF CP CS DD DF DM DS EC FA FS LP MA MS OPR ST VF
    """.split()
)

# Small enumerated attributes. PatientSex: M, F, O; the spelled-out forms some writers use are
# unambiguous, so they map onto the terms.
_SEX = frozenset({"M", "F", "O"})
_SEX_ALIASES = {"MALE": "M", "FEMALE": "F", "OTHER": "O"}
# ImageLaterality: R, L, U (unpaired), B (both); Laterality: R, L.
_LATERALITY = frozenset({"R", "L", "B", "U"})
# PhotometricInterpretation, PS3.3 C.7.6.3.1.2, retired terms (HSV, ARGB, CMYK) included.
_PHOTOMETRIC = frozenset(
    {
        "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL",
        "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB",
    }
)
# Inner separators that body-part variants carry ("WHOLE BODY", "L_SPINE", "C-SPINE"); no defined
# body part has one.
_SEPARATORS = re.compile(r"[\s_\-]+")

# HIPAA Safe Harbor aggregates ages over 89 into one category.
_AGE_TOP = 90

# 20 hex characters = 80 bits. By the birthday bound, the chance that any two of n distinct values
# share a pseudonym is about n^2 / 2^81: ~4e-11 for 10 million patients and ~4e-7 even for a
# billion instances, while keeping WebDataset keys short. Truncating an HMAC does not weaken it
# beyond its length; 80 bits is far beyond brute-forcing a pseudonym back to an identifier.
PSEUDONYM_HEX_CHARS = 20

_KEY_HELP = (
    "no pseudonym key given. Make one once, keep it secret and reuse it so pseudonyms stay the same "
    "across runs:\n"
    "    python -c \"import secrets; print(secrets.token_hex(32))\" > pseudonym.key && chmod 600 pseudonym.key\n"
    f"then pass --key-file pseudonym.key or set {KEY_ENV} to the hex string. For a one-off run whose "
    "pseudonyms need not match any other run, pass --random-key."
)


# ---------------------------------------------------------------------------------------------
# Keys and pseudonyms
# ---------------------------------------------------------------------------------------------


def load_pseudonym_key(key_file: str | os.PathLike | None = None, *, allow_random: bool = False) -> bytes:
    """Load the secret key that pseudonyms are derived from.

    Sources, first match wins: ``key_file`` (a hex string, or raw bytes), the environment variable
    ``MEDSCALE_PSEUDONYM_KEY`` (hex), a fresh random key if ``allow_random``.

    Args:
        key_file: Path of a key file; it must hold at least 16 bytes of key material.
        allow_random: Without a key file or environment variable, make a random 32-byte key
            (pseudonyms then match no other run) instead of failing.

    Returns:
        The key bytes.

    Raises:
        ConfigError: No key and ``allow_random`` is false (the message says how to make one), or
            the key file or environment variable is empty, malformed or too short. Messages never
            contain key material.
    """
    if key_file is not None:
        path = Path(key_file)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read pseudonym key file {path}: {e.strerror or e}") from e
        text = raw.strip().decode("latin-1")
        # A file of hex digits is read as hex (what the recommended command writes); anything else
        # is taken as raw key bytes, e.g. from `head -c 32 /dev/urandom`.
        if _HEX_DIGITS.fullmatch(text):
            if len(text) % 2:
                # Most likely a truncated copy-paste; reading it as raw bytes would hide that.
                raise ConfigError(f"pseudonym key file {path} holds an odd number of hex digits")
            key = bytes.fromhex(text)
        else:
            key = raw
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(
                f"pseudonym key file {path} holds {len(key)} bytes of key material; at least "
                f"{MIN_KEY_BYTES} are needed (32 recommended)"
            )
        _warn_if_readable_by_others(path)
        return key

    env = os.environ.get(KEY_ENV)
    if env is not None:
        text = env.strip()
        if not text:
            raise ConfigError(f"{KEY_ENV} is set but empty; unset it or give it a hex key")
        if not _HEX.fullmatch(text):
            raise ConfigError(f"{KEY_ENV} must be a hex string (an even number of 0-9a-f characters)")
        key = bytes.fromhex(text)
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(
                f"{KEY_ENV} holds {len(key)} bytes of key material; at least {MIN_KEY_BYTES} are needed "
                "(64 hex characters recommended)"
            )
        return key

    if allow_random:
        log.warning(
            "using a random pseudonym key for this run only: pseudonyms (and patient splits) will not "
            "match those of any other run; use --key-file for corpora that grow or are re-prepared"
        )
        return secrets.token_bytes(RANDOM_KEY_BYTES)
    raise ConfigError(_KEY_HELP)


def _warn_if_readable_by_others(path: Path) -> None:
    # Anyone who can read the key can re-identify by recomputing pseudonyms of known IDs.
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if os.name == "posix" and mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("pseudonym key file %s is readable by other users; consider chmod 600", path)


class Pseudonymizer:
    """Keyed, deterministic pseudonyms.

    Args:
        key: Secret key, at least 16 bytes (see `load_pseudonym_key`).

    Raises:
        ValueError: The key is not bytes; ConfigError: it is too short.
    """

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, (bytes, bytearray)):
            raise ValueError(f"pseudonym key must be bytes, got {type(key).__name__}")
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(f"pseudonym key must be at least {MIN_KEY_BYTES} bytes, got {len(key)}")
        self._key = bytes(key)

    def __repr__(self) -> str:
        # Never show the key, e.g. in a traceback's locals or a logged config.
        return "Pseudonymizer(key=<hidden>)"

    def _digest(self, kind: str, value: str) -> bytes:
        if not isinstance(kind, str) or not kind or "\x00" in kind:
            raise ValueError(f"pseudonym kind must be a non-empty string without NUL, got {kind!r}")
        if not isinstance(value, str):
            raise ValueError(f"pseudonym value must be a string, got {type(value).__name__}")
        # The NUL separator keeps (kind, value) pairs unambiguous: ("patient", "x") and
        # ("patien", "tx") hash different messages, so kinds are separate domains.
        msg = kind.encode("utf-8") + b"\x00" + value.encode("utf-8")
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def __call__(self, kind: str, value: str) -> str:
        """The pseudonym of ``value`` in the domain ``kind``.

        Args:
            kind: Domain, e.g. ``"patient"``, ``"study"``, ``"series"``, ``"instance"`` (and
                ``"split"``, the patient's place in `medscale.prep.splits`); the same value gets
                unrelated pseudonyms in different domains.
            value: The identifier to replace, hashed exactly as given.

        Returns:
            20 lowercase hex characters (no dots, so usable in WebDataset keys).
        """
        return self._digest(kind, value).hex()[:PSEUDONYM_HEX_CHARS]


def pseudonymize_fields(fields: Mapping[str, str], pseudo: Pseudonymizer) -> dict[str, str]:
    """Pseudonymize identifier columns of a photo corpus's CSV row.

    Args:
        fields: Pseudonym kind to raw identifier, e.g. ``{"patient": "MRN 0042"}``.
        pseudo: The pseudonymizer.

    Returns:
        Kind to pseudonym. Surrounding whitespace is ignored; empty values are left out, so a
        blank cell never becomes one shared "patient".
    """
    out = {}
    for kind, value in fields.items():
        value = "" if value is None else str(value).strip()
        if value:
            out[kind] = pseudo(kind, value)
    return out


# ---------------------------------------------------------------------------------------------
# Metadata allowlist
# ---------------------------------------------------------------------------------------------


def safe_metadata(
    ds: pydicom.Dataset, pseudo: Pseudonymizer, dropped: Counter | None = None
) -> dict[str, Any]:
    """The only DICOM metadata that may enter a shard: an allowlist plus pseudonyms.

    Nothing is copied from the header unless listed here, so names, dates, free text, UIDs,
    institutions, physicians, device details, private tags, overlays and sequences cannot leak.
    Values are plain JSON types; an attribute that is absent, malformed or non-finite is left out
    rather than guessed. Coded strings (``modality``, ``photometric``, ``sex``, ``body_part``,
    ``view_position``, ``laterality``) are kept only as one of the DICOM defined terms for their
    attribute (`MODALITY_TERMS`, `BODY_PART_TERMS`, `VIEW_POSITION_TERMS`, and short closed lists
    for the rest), after normalising harmless variants (surrounding spaces, lower case, ``MALE``;
    for body parts also inner spaces, underscores and hyphens, so ``"Whole body"`` is
    ``WHOLEBODY``). Anything else, such as a surname typed into BodyPartExamined, is dropped: the
    output is always a listed term, never the stored text.

    Keys, each only when present: ``modality``, ``photometric``, ``rows``,
    ``columns``, ``bits_stored``, ``number_of_frames``, ``pixel_spacing`` (list of 2 floats, mm),
    ``slice_thickness``, ``window_center`` and ``window_width`` (lists of floats), ``rescale``
    (``{"slope", "intercept"}``), ``sex`` (``M``/``F``/``O``), ``age_band`` (``"40-49"``...,
    ``"90+"``; only from PatientAge, never computed from a birth date), ``body_part``,
    ``view_position``, ``laterality``, ``transfer_syntax`` (only if a standard transfer syntax),
    and the pseudonyms ``patient``, ``study``, ``series``, ``instance`` with ``patient_from``
    (``"patient_id"``, or ``"study"`` when PatientID is empty and the study stands in for the
    patient).

    Args:
        ds: The DICOM dataset (pixel data need not be loaded).
        pseudo: The pseudonymizer.
        dropped: If given, ``dropped[key] += 1`` (``key`` the output name, e.g. ``"body_part"``)
            for each coded value that is present in the header but not a defined term, so dropped
            values can be counted and reported (a bad ImageLaterality counts even when the
            series' Laterality stands in). Absent or empty attributes do not count, nor does
            anything when the file is rejected.

    Returns:
        The metadata dict.

    Raises:
        RejectedInput: ``no_patient``: neither PatientID nor StudyInstanceUID is present, so no
            patient-level split is possible.
    """
    meta: dict[str, Any] = {}
    lost: Counter = Counter()  # added to `dropped` only if the file is not rejected

    def put(name: str, value: Any) -> None:
        if value is not None:
            meta[name] = value

    def coded(name: str, terms: frozenset[str], *keywords: str, squeeze: bool = False,
              aliases: Mapping[str, str] | None = None) -> None:
        # The first keyword whose value is a defined term wins (ImageLaterality before the series'
        # Laterality); each value on the way that is there but no term counts as dropped.
        for keyword in keywords:
            value = _code(ds, keyword, squeeze)
            if value is None:
                continue
            value = aliases.get(value, value) if aliases else value
            if value in terms:
                meta[name] = value
                return
            lost[name] += 1

    coded("modality", MODALITY_TERMS, "Modality")
    coded("photometric", _PHOTOMETRIC, "PhotometricInterpretation")
    for name, keyword in (
        ("rows", "Rows"),
        ("columns", "Columns"),
        ("bits_stored", "BitsStored"),
        ("number_of_frames", "NumberOfFrames"),
    ):
        put(name, _positive_int(ds, keyword))
    spacing = _floats(ds, "PixelSpacing")
    put("pixel_spacing", spacing if spacing is not None and len(spacing) == 2 else None)
    thickness = _floats(ds, "SliceThickness")
    put("slice_thickness", thickness[0] if thickness is not None and len(thickness) == 1 else None)
    put("window_center", _floats(ds, "WindowCenter"))
    put("window_width", _floats(ds, "WindowWidth"))
    slope, intercept = _floats(ds, "RescaleSlope"), _floats(ds, "RescaleIntercept")
    if slope is not None or intercept is not None:
        # An absent slope or intercept means identity (PS3.3 C.11.1), so fill the default.
        meta["rescale"] = {
            "slope": slope[0] if slope else 1.0,
            "intercept": intercept[0] if intercept else 0.0,
        }
    coded("sex", _SEX, "PatientSex", aliases=_SEX_ALIASES)
    put("age_band", _age_band(_text(ds, "PatientAge")))
    coded("body_part", BODY_PART_TERMS, "BodyPartExamined", squeeze=True)
    coded("view_position", VIEW_POSITION_TERMS, "ViewPosition")
    # Image laterality is per image; Laterality is the series-level fallback.
    coded("laterality", _LATERALITY, "ImageLaterality", "Laterality")
    put("transfer_syntax", _standard_transfer_syntax(ds))

    patient_id = _text(ds, "PatientID")
    study_uid = _text(ds, "StudyInstanceUID")
    if patient_id:
        meta["patient"] = pseudo("patient", patient_id)
        meta["patient_from"] = "patient_id"
    elif study_uid:
        # Prefixed so a study UID can never land on the pseudonym of an equal PatientID.
        meta["patient"] = pseudo("patient", "study:" + study_uid)
        meta["patient_from"] = "study"
    else:
        # Falling back to the series or instance would make each image its own "patient" and
        # silently break the patient-level split, so refuse instead.
        raise RejectedInput("no_patient", "neither PatientID nor StudyInstanceUID is present")
    for kind, keyword in (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID"), ("instance", "SOPInstanceUID")):
        value = _text(ds, keyword)
        if value:
            meta[kind] = pseudo(kind, value)
    if dropped is not None:
        dropped.update(+lost)
    return meta


def _get(ds: pydicom.Dataset, keyword: str) -> Any:
    # Values are converted lazily on access; a malformed one (DS "abc") raises then. Such a value
    # is left out, which is always safe for an allowlist.
    try:
        return ds.get(keyword)
    except (ValueError, TypeError, OverflowError, KeyError):
        return None


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    """A single-valued string attribute, stripped; a backslash-split value is joined back."""
    value = _get(ds, keyword)
    if isinstance(value, MultiValue):
        # pydicom splits on backslash even for VM-1 VRs; the original string is what identifies.
        value = "\\".join(str(v) for v in value)
    if value is None or isinstance(value, (bytes, bytearray)):
        return None
    value = str(value).strip().strip("\x00").strip()
    return value or None


def _code(ds: pydicom.Dataset, keyword: str, squeeze: bool) -> str | None:
    """A coded value in the form the term lists use (upper case, trimmed; ``squeeze`` also drops
    inner separators), or None when the attribute is absent or empty.

    Multiple values come back joined by backslashes (no term has one) and bytes decoded, so a
    value that is there always comes back and the caller can count it when it is no term.
    """
    raw = _get(ds, keyword)
    if isinstance(raw, (bytes, bytearray)):
        raw = raw.decode("latin-1")
    elif isinstance(raw, MultiValue):
        raw = "\\".join(str(v) for v in raw)
    if raw is None:
        return None
    value = str(raw).strip().strip("\x00").strip().upper()
    if squeeze:
        value = _SEPARATORS.sub("", value)
    return value or None


def _floats(ds: pydicom.Dataset, keyword: str) -> list[float] | None:
    value = _get(ds, keyword)
    if value is None or isinstance(value, (str, bytes, bytearray)) and not str(value).strip():
        return None
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    try:
        out = [float(v) for v in items]
    except (ValueError, TypeError, OverflowError):
        return None
    # NaN and infinity are not JSON; a header that holds them is corrupt anyway.
    return out if out and all(math.isfinite(v) for v in out) else None


def _positive_int(ds: pydicom.Dataset, keyword: str) -> int | None:
    value = _get(ds, keyword)
    if value is None or isinstance(value, (bool, MultiValue, bytes, bytearray)):
        return None
    try:
        number = int(value)
    except (ValueError, TypeError, OverflowError):
        return None
    return number if number > 0 else None


def _age_band(age: str | None) -> str | None:
    """PatientAge (AS, e.g. ``"045Y"``) to a decade band; ``"90+"`` above 89 (HIPAA Safe Harbor)."""
    if not age:
        return None
    match = _AGE.fullmatch(age.upper())
    if not match:
        return None
    number, unit = int(match.group(1)), match.group(2)
    years = {"Y": number, "M": number // 12, "W": number // 52, "D": number // 365}[unit]
    if years >= _AGE_TOP:
        return f"{_AGE_TOP}+"
    low = years // 10 * 10
    return f"{low}-{low + 9}"


def _standard_transfer_syntax(ds: pydicom.Dataset) -> str | None:
    file_meta = getattr(ds, "file_meta", None)
    uid = _text(file_meta, "TransferSyntaxUID") if file_meta is not None else None
    # A private transfer syntax UID starts with its organisation's root, which can point at a
    # vendor or site; only the standard ones (fixed, public strings) are passed on.
    entry = UID_dictionary.get(uid) if uid else None
    return uid if entry is not None and entry[1] == "Transfer Syntax" else None


# ---------------------------------------------------------------------------------------------
# Burned-in text
# ---------------------------------------------------------------------------------------------


def burned_in_text_reason(ds: pydicom.Dataset) -> str | None:
    """Why an image's pixels may show identifying text or features, or None if there is no sign.

    Header metadata is all we check; text detection in pixels (OCR) is out of scope, so a device
    that declares ``BurnedInAnnotation = NO`` is trusted.

    Returns:
        ``"burned_in_annotation"``: BurnedInAnnotation is ``YES``.
        ``"recognizable_visual_features"``: RecognizableVisualFeatures is ``YES`` (faces,
        surface renderings; Annex E's Clean Recognizable Visual Features option).
        ``"burned_in_unknown"``: BurnedInAnnotation is absent (or not YES/NO) and the Modality is
        in `BURNED_IN_MODALITIES`, the SOP class in `BURNED_IN_SOP_CLASSES` (captured rather than
        acquired images), or the Modality itself is missing.
        None otherwise.
    """
    burned_in = (_text(ds, "BurnedInAnnotation") or "").upper()
    if burned_in == "YES":
        return "burned_in_annotation"
    if (_text(ds, "RecognizableVisualFeatures") or "").upper() == "YES":
        return "recognizable_visual_features"
    if burned_in == "NO":
        return None
    modality = (_text(ds, "Modality") or "").upper()
    sop_class = _text(ds, "SOPClassUID") or ""
    if not modality or modality in BURNED_IN_MODALITIES or sop_class in BURNED_IN_SOP_CLASSES:
        return "burned_in_unknown"
    return None
