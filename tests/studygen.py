#!/usr/bin/env python3
"""Deterministic generator of synthetic DICOM studies, for tests and benchmarks.

Every instance is a complete CT (or MR) Image Storage object in Explicit VR
Little Endian with 16-bit MONOCHROME2 pixels and realistic attributes at the
patient, study, series and instance levels: names with accents and non-Latin
scripts (with the matching SpecificCharacterSet), dates spread over ten years,
a private block (0009,"DICOOGLED TEST") and a ProcedureCodeSequence.  Only
pydicom is needed (no numpy).  The same (seed, patient, study, series,
instance) always gives the same dataset, UIDs included.

    from studygen import make_instance, generate      # with tests/ on sys.path
    ds = make_instance(0, 0, 0, 0, PatientName="DOE^JOHN")
    paths = generate("/tmp/out", patients=3, studies=2, series=2, instances=10)

    python tests/studygen.py OUT --patients 10 --studies 2 --series 2 \
        --instances 50 --size 64 --seed 0

Value plan, useful for writing queries against generated data:
  * PatientName cycles through NAMES (two "DOE^..." among them); from the
    second cycle on a middle-name initial is added ("DOE^JOHN^B",
    "Yamada^Tarou^B=山田^太郎=やまだ^たろう").
  * PatientID is "P<seed:03d><patient:07d>".
  * StudyDate lies in 2014-01-01 .. 2023-12-31.
  * generate(..., modality="mixed") makes every third study an MR study.
  * SliceLocation of instance i is -100 + i * SliceThickness (thickness 5,
    2.5 or 1.25 by series), formatted without trailing zeros ("-90", "-97.5").
"""

from __future__ import annotations

import argparse
import array
import datetime
import functools
import hashlib
import pathlib
import struct
import sys
import time

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)
from pydicom.tag import BaseTag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_16

__all__ = ["NAMES", "make_instance", "generate", "instance_path", "main"]

# (PatientName, PatientSex, SpecificCharacterSet or None for the default repertoire)
NAMES: list[tuple[str, str, str | None]] = [
    ("DOE^JOHN", "M", None),
    ("MÜLLER^JÜRGEN", "M", "ISO_IR 100"),
    ("SMITH^ANNA", "F", None),
    ("GARCÍA^JOSÉ", "M", "ISO_IR 100"),
    ("ИВАНОВ^ИВАН", "M", "ISO_IR 192"),
    ("DOE^JANE", "F", None),
    ("LEFÈVRE^CÉLINE", "F", "ISO_IR 100"),
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "M", "ISO_IR 192"),
    ("JOHNSON^ROBERT", "M", None),
    ("BJÖRK^ÅSA", "F", "ISO_IR 100"),
    ("ΠΑΠΑΔΟΠΟΥΛΟΥ^ΕΛΕΝΗ", "F", "ISO_IR 192"),
    ("WILLIAMS^MARY", "F", None),
    ("NØRGAARD^SØREN", "M", "ISO_IR 100"),
    ("王^小明", "M", "ISO_IR 192"),
    ("O'BRIEN^PATRICK", "M", None),
    ("DUBOIS^FRANÇOISE", "F", "ISO_IR 192"),  # Latin text in UTF-8
    ("NGUYEN^VAN AN", "O", None),
]

_PHYSICIANS = ["HOUSE^GREGORY^^DR", "GREY^MEREDITH^^DR", "WELBY^MARCUS^^DR", "KILDARE^JAMES^^DR"]
_INSTITUTIONS = ["General Hospital", "St. Mary Medical Center", "University Clinic", "Riverside Imaging"]
_STATIONS = ["CT01", "CT02", "MR01", "MR02"]

# Per modality: (BodyPartExamined, procedure CodeValue, StudyDescription = CodeMeaning).
_PROCEDURES = {
    "CT": [
        ("CHEST", "CTCH", "CT chest without contrast"),
        ("ABDOMEN", "CTAB", "CT abdomen with contrast"),
        ("HEAD", "CTHD", "CT head without contrast"),
        ("PELVIS", "CTPV", "CT pelvis"),
    ],
    "MR": [
        ("BRAIN", "MRBR", "MR brain with and without contrast"),
        ("KNEE", "MRKN", "MR knee"),
        ("LSPINE", "MRLS", "MR lumbar spine"),
    ],
}
_SERIES_KINDS = {  # (SeriesDescription, SliceThickness)
    "CT": [("Axial 5.0 soft tissue", 5.0), ("Axial 2.5 bone", 2.5), ("Axial 1.25 lung", 1.25)],
    "MR": [("T1 axial", 5.0), ("T2 axial", 2.5), ("FLAIR axial", 1.25)],
}
_SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}

_SHIFT_ROWS = 64  # instances differ by a vertical shift of the same ramp


def _h(*parts: object) -> int:
    """A small deterministic hash of parts (stable across runs and platforms)."""
    key = "/".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def _uid(*parts: object) -> str:
    # entropy_srcs are joined without separator, so pass one separated string.
    return generate_uid(entropy_srcs=["dicoogled-studygen/" + "/".join(map(str, parts))])


def _ds(value: float) -> str:
    """Format a decimal string without trailing zeros (max 16 chars)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


@functools.lru_cache(maxsize=8)
def _ramp(size: int) -> bytes:
    """(size + _SHIFT_ROWS) rows of a 12-bit diagonal ramp, little-endian uint16."""
    rows = size + _SHIFT_ROWS
    scale = 4095 / max(1, size + rows - 2)
    pixels = array.array("H")
    for y in range(rows):
        pixels.extend(int((x + y) * scale) for x in range(size))
    if sys.byteorder != "little":
        pixels.byteswap()
    return pixels.tobytes()


def _pixels(size: int, shift: int) -> bytes:
    row = 2 * size
    return _ramp(size)[shift * row:(shift + size) * row]


def _spacing(modality: str, size: int) -> float:
    return round((350.0 if modality == "CT" else 240.0) / size, 6)


# Speed: pydicom spends most of its time validating and encoding values, so
# everything shared by an instance's patient, study or series (and the static
# template) is encoded once into immutable RawDataElements and cached; an
# instance is a fresh dict of those plus five hand-encoded elements.  Raw
# elements are decoded by pydicom on first access like those of a read file.

def _raw(tag: int, vr: str, value: bytes) -> RawDataElement:
    return RawDataElement(BaseTag(tag), vr, len(value), value, 0, False, True)


def _raw_text(tag: int, vr: str, text: str) -> RawDataElement:
    value = text.encode("ascii")
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    return _raw(tag, vr, value)


def _encode(ds: Dataset) -> dict:
    """Encode every element of ds (Explicit VR Little Endian) as a RawDataElement."""
    encodings = ds._character_set
    out = {}
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem, encodings)
        data = fp.getvalue()
        header = 8 if elem.VR in EXPLICIT_VR_LENGTH_16 else 12
        length = int.from_bytes(data[header - (2 if header == 8 else 4):header], "little")
        out[elem.tag] = RawDataElement(elem.tag, elem.VR, length, data[header:], 0, False, True)
    return out


@functools.lru_cache(maxsize=16)
def _template(modality: str, size: int) -> dict:
    ds = Dataset()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = _SOP_CLASS[modality]
    ds.Modality = modality
    ds.Manufacturer = "DICOOGLED"
    ds.ManufacturerModelName = "StudyGen"
    ds.SoftwareVersions = "studygen 1"
    if modality == "CT":
        ds.KVP = "120"
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "15"
        ds.EchoTrainLength = "1"
        ds.MagneticFieldStrength = "1.5"
    ds.PatientPosition = "HFS"
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    spacing = _ds(_spacing(modality, size))
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if modality == "CT":
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    else:
        ds.WindowCenter, ds.WindowWidth = "2048", "4096"
    return _encode(ds)


@functools.lru_cache(maxsize=4096)
def _patient(seed: int, patient: int) -> dict:
    name, sex, charset = NAMES[(patient + seed) % len(NAMES)]
    cycle = patient // len(NAMES)
    if cycle:  # a middle-name initial, in the alphabetic component group only
        alphabetic, sep, others = name.partition("=")
        name = alphabetic + "^" + chr(ord("A") + cycle % 26) + sep + others
    birth = datetime.date(1930, 1, 1) + datetime.timedelta(days=_h(seed, patient, "birth") % (80 * 365))
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.PatientID = f"P{seed:03d}{patient:07d}"
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = sex
    return _encode(ds)


@functools.lru_cache(maxsize=4096)
def _study(seed: int, patient: int, study: int, modality: str) -> dict:
    h = _h(seed, patient, study, "study")
    date = (datetime.date(2014, 1, 1) + datetime.timedelta(days=h % 3652)).strftime("%Y%m%d")
    seconds = 7 * 3600 + (h >> 16) % (12 * 3600)
    time_ = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
    body, code, desc = _PROCEDURES[modality][(h >> 40) % len(_PROCEDURES[modality])]
    ds = Dataset()
    ds.StudyInstanceUID = _uid(seed, patient, study)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time_
    ds.AccessionNumber = f"A{seed % 100:02d}{patient:07d}{study:04d}"[-16:]
    ds.StudyID = str(study + 1)
    ds.StudyDescription = desc
    ds.ReferringPhysicianName = _PHYSICIANS[(h >> 8) % len(_PHYSICIANS)]
    ds.InstitutionName = _INSTITUTIONS[(h >> 24) % len(_INSTITUTIONS)]
    ds.StationName = _STATIONS[(h >> 32) % 2 + (2 if modality == "MR" else 0)]
    ds.BodyPartExamined = body
    item = Dataset()
    item.CodeValue = code
    item.CodingSchemeDesignator = "99DCGL"
    item.CodeMeaning = desc
    ds.ProcedureCodeSequence = Sequence([item])
    ds.FrameOfReferenceUID = _uid(seed, patient, study, "for")
    block = ds.private_block(0x0009, "DICOOGLED TEST", create=True)
    block.add_new(0x10, "LO", f"studygen seed {seed}")
    block.add_new(0x11, "UL", patient * 1000 + study)
    return _encode(ds)


@functools.lru_cache(maxsize=4096)
def _series(seed: int, patient: int, study: int, series: int, modality: str) -> tuple[dict, float]:
    descr, thickness = _SERIES_KINDS[modality][(series + seed) % len(_SERIES_KINDS[modality])]
    ds = Dataset()
    ds.SeriesInstanceUID = _uid(seed, patient, study, series)
    ds.SeriesNumber = series + 1
    ds.SeriesDescription = descr
    ds.SliceThickness = _ds(thickness)
    return _encode(ds), thickness


def make_instance(patient: int, study: int, series: int, instance: int, *,
                  size: int = 64, modality: str = "CT", seed: int = 0,
                  **overrides) -> Dataset:
    """Return one complete CT or MR Image Storage dataset with file_meta.

    `overrides` set attributes by keyword after generation (None deletes one);
    file_meta follows SOPClassUID/SOPInstanceUID overrides.
    """
    if modality not in _SOP_CLASS:
        raise ValueError(f"modality must be one of {sorted(_SOP_CLASS)}, not {modality!r}")
    series_elems, thickness = _series(seed, patient, study, series, modality)
    elems = {**_template(modality, size), **_patient(seed, patient),
             **_study(seed, patient, study, modality), **series_elems}
    location = _ds(-100.0 + instance * thickness)
    origin = _ds(-_spacing(modality, size) * size / 2)
    for tag, vr, text in (
        (0x00080018, "UI", _uid(seed, patient, study, series, instance)),  # SOPInstanceUID
        (0x00200013, "IS", str(instance + 1)),  # InstanceNumber
        (0x00200032, "DS", f"{origin}\\{origin}\\{location}"),  # ImagePositionPatient
        (0x00201041, "DS", location),  # SliceLocation
    ):
        elems[BaseTag(tag)] = _raw_text(tag, vr, text)
    elems[BaseTag(0x7FE00010)] = _raw(0x7FE00010, "OW", _pixels(size, instance % _SHIFT_ROWS))
    ds = Dataset(elems)
    # Tell pydicom the raw values are already in the target encoding.
    ds.set_original_encoding(False, True, ds._character_set)
    if "SpecificCharacterSet" in overrides:
        for _ in ds:  # decode text with the old character set before it changes
            pass

    for keyword, value in overrides.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "DICOOGLED_GEN"
    ds.file_meta = meta
    return ds


def part10_bytes(ds: Dataset) -> bytes:
    """A data set as a Part 10 file's bytes (preamble, file meta, Explicit VR Little Endian)."""
    buffer = DicomBytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def damaged(ds: Dataset) -> dict[str, bytes]:
    """Part 10 bytes of ds made unsound the ways a broken sender or disk does: cut short
    (inside Pixel Data, a sequence item or an element header), or whole but malformed (a
    length past the end of its item, a VR that does not exist). Every copy keeps its UIDs."""
    whole = part10_bytes(ds)
    pixel_value = len(whole) - len(ds.PixelData)  # Pixel Data is the last element
    pixel_header = pixel_value - 12
    sequence = whole.index(b"\x08\x00\x32\x10SQ")  # ProcedureCodeSequence (0008,1032)
    # An element of 200 bytes in an item of 16, and an element whose VR is "ZZ", each
    # inserted before Pixel Data: the data set around them is whole.
    element = b"\x40\x00\x01\x10SH" + struct.pack("<H", 200) + b"ABCDEFGH"
    item = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(element)) + element
    overlong = b"\x40\x00\x75\x02SQ\x00\x00" + struct.pack("<I", len(item)) + item  # RequestAttributesSequence
    bogus_vr = b"\x40\x00\x01\x10ZZ\x04\x00ABCD"
    return {
        "pixel data cut at 1/3": whole[:pixel_value + len(ds.PixelData) // 3],
        "pixel data cut at 2/3": whole[:pixel_value + 2 * len(ds.PixelData) // 3],
        "pixel data 10 bytes short": whole[:-10],
        "cut inside a sequence item": whole[:sequence + 12 + 8 + 10],
        "cut inside an element header": whole[:pixel_header + 6],
        "length past the end of its item": whole[:pixel_header] + overlong + whole[pixel_header:],
        "VR that does not exist": whole[:pixel_header] + bogus_vr + whole[pixel_header:],
    }


def instance_path(out_dir, patient: int, study: int, series: int, instance: int) -> pathlib.Path:
    """Where generate() puts an instance: OUT/P0000/ST000/SE000/IM00000.dcm."""
    return (pathlib.Path(out_dir) / f"P{patient:04d}" / f"ST{study:03d}"
            / f"SE{series:03d}" / f"IM{instance:05d}.dcm")


def _study_modality(modality: str, patient: int, study: int) -> str:
    if modality == "mixed":
        return "MR" if (patient + study) % 3 == 2 else "CT"
    return modality


def generate(out_dir, patients: int = 2, studies: int = 2, series: int = 2,
             instances: int = 3, *, size: int = 64, seed: int = 0,
             modality: str = "CT") -> list[pathlib.Path]:
    """Write patients*studies*series*instances files under out_dir; return their paths.

    modality is "CT", "MR" or "mixed" (every third study is MR).
    """
    paths = []
    for p in range(patients):
        for st in range(studies):
            mod = _study_modality(modality, p, st)
            for se in range(series):
                folder = instance_path(out_dir, p, st, se, 0).parent
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(instances):
                    path = instance_path(out_dir, p, st, se, i)
                    ds = make_instance(p, st, se, i, size=size, modality=mod, seed=seed)
                    pydicom.dcmwrite(path, ds, enforce_file_format=True)
                    paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write synthetic DICOM studies.")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--patients", type=int, default=2)
    parser.add_argument("--studies", type=int, default=2, help="per patient")
    parser.add_argument("--series", type=int, default=2, help="per study")
    parser.add_argument("--instances", type=int, default=3, help="per series")
    parser.add_argument("--size", type=int, default=64, help="rows and columns")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modality", choices=["CT", "MR", "mixed"], default="CT")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = generate(args.out, args.patients, args.studies, args.series, args.instances,
                     size=args.size, seed=args.seed, modality=args.modality)
    elapsed = time.perf_counter() - start
    print(f"wrote {len(paths)} instances to {args.out} in {elapsed:.1f} s "
          f"({len(paths) / max(elapsed, 1e-9):.0f}/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
