#!/usr/bin/env python3
"""dicoogled — a lean, pluggable PACS archive.

One process runs a DICOM service (C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET), an HTTP server and
watched folders, on an SQLite FTS5 index that holds *every* element of every instance, so any tag
is searchable. Files are the truth: the index can always be rebuilt from them (``reindex``).

Run ``python dicoogled.py --help``. The table of contents of this file is ``grep '^# ===' dicoogled.py``.
"""

__version__ = "0.1.0"

# ============================================================================================
# Imports
# ============================================================================================

import argparse
import collections
import concurrent.futures
import configparser
import contextlib
import dataclasses
import functools
import io
import json
import logging
import os
import pathlib
import re
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import unicodedata

import apsw
import bottle
import pydicom
import pydicom.config
import pydicom.uid
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pynetdicom import AE, _config as pynetdicom_config, build_context, evt
from watchdog.events import (
    DirDeletedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent, FileDeletedEvent,
    FileModifiedEvent, FileMovedEvent, FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

log = logging.getLogger("dicoogled")

# ============================================================================================
# Constants: DICOM status codes, transfer syntaxes, defaults
# ============================================================================================

SUCCESS = 0x0000
PENDING = 0xFF00
PENDING_OPTIONAL_KEYS_UNSUPPORTED = 0xFF01
CANCELLED = 0xFE00
OUT_OF_RESOURCES = 0xA700
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000  # C-STORE: data set cannot be parsed or lacks its UIDs
UNABLE_TO_PROCESS = 0xC001  # C-FIND/MOVE/GET: the identifier cannot be processed
STORE_REFUSED_INVALID_UID = 0xC002
SUBOPERATIONS_FAILED = 0xB000

#: Transfer syntaxes accepted for storage; objects are stored exactly as received.
ACCEPTED_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
UNCOMPRESSED_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2")

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: Written in the file meta of every stored object: pydicom's generate_uid(entropy_srcs=['dicoogled implementation']).
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.25379647146804113726755947804195104528"
IMPLEMENTATION_VERSION_NAME = "DICOOGLED_" + __version__.replace(".", "")
BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "US or OW"})
DATE_TIME_VRS = frozenset({"DA", "TM", "DT"})
NUMBER_VRS = {"US": int, "UL": int, "SS": int, "SL": int, "UV": int, "SV": int, "FL": float, "FD": float}

DEFAULT_CONFIG = """\
# dicoogled configuration. Every setting is shown with its default.
# Command-line flags override this file; a file given with --config may hold only some sections.

[dicom]
# Application Entity title of this archive, and the DICOM listener.
aet = DICOOGLED
host = 0.0.0.0
port = 11112
# A called AE title other than ours is accepted with a warning naming the right one,
# unless strict_called_aet is true (then the association is rejected).
strict_called_aet = false
# Calling AE titles allowed to associate, separated by spaces; empty allows any.
allowed_calling_aets =
# Limits: simultaneous associations, maximum PDU we receive (0 = unlimited), timeouts in seconds.
max_associations = 16
max_pdu = 262144
acse_timeout = 30
dimse_timeout = 60
network_timeout = 120
# Most C-FIND matches returned for one request (0 = all).
max_find_results = 0

[http]
host = 0.0.0.0
port = 8080
threads = 8

[storage]
# Where received objects, the index and temporary files live (local disk: SQLite WAL needs it).
data_dir = ./data
# A received instance whose SOPInstanceUID is already stored with different bytes:
# keep (the first one stays, the default) or overwrite (the new one replaces it).
duplicates = keep
# fsync every received file before acknowledging it (safe against power loss).
fsync = true

[watch]
# Folders indexed in place, one per line; files are never copied or changed.
folders =
# Use polling instead of inotify (for network shares), and its interval in seconds.
poll = false
poll_interval = 5
# A file is indexed once its size has not changed for this many seconds (or at once when
# inotify reports it closed after writing).
quiet_period = 2

[log]
# DEBUG, INFO, WARNING or ERROR.
level = INFO

[modalities]
# Known remote AEs, the C-MOVE destinations: AET = host:port
# WORKSTATION = 192.168.1.20:11112
"""

# ============================================================================================
# Small helpers: validation, threads, text
# ============================================================================================

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
AE_TITLE_PATTERN = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII, no backslash


def is_valid_uid(uid: str) -> bool:
    """True for a UID that is safe to use as a file name: digits and dots, at most 64 chars."""
    return bool(uid) and len(uid) <= 64 and bool(UID_PATTERN.match(uid))


def is_valid_ae_title(aet: str) -> bool:
    return bool(AE_TITLE_PATTERN.match(aet)) and bool(aet.strip())


def _snake_case(keyword: str) -> str:
    """SQL column name for a DICOM keyword: PatientBirthDate -> patient_birth_date."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", keyword).lower()


def _fold(text: str) -> str:
    """Case- and accent-insensitive form of a name, as FTS5's unicode61 tokenizer sees it."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _fts_tokens(text: str) -> list[str]:
    """The tokens FTS5's unicode61 tokenizer makes of text (letters and digits; '_' separates)."""
    return re.findall(r"[^\W_]+", _fold(text))


def _fts_phrase(tokens: list[str], prefix: bool = False) -> str:
    """A safe FTS5 phrase: every token quoted, so no user text is ever FTS5 syntax."""
    quoted = '"' + " ".join(tokens).replace('"', '""') + '"'
    return quoted + ("*" if prefix else "")


def start_thread(name: str, target, *args) -> threading.Thread:
    """Run target in a daemon thread that logs, instead of silently losing, its exception."""

    def run():
        try:
            target(*args)
        except Exception:
            log.exception("thread %s failed", name)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_aet: str = "") -> bytes:
    """Preamble and file meta group (PS3.10 7.1) to put before a data set received as bytes.

    Built by hand: pydicom's general writer cost more than the rest of a C-STORE's handling.
    """
    def element(number: int, vr: str, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\x00" if vr == "UI" else b" "
        if vr == "OB":
            return struct.pack("<HH2sHI", 0x0002, number, b"OB", 0, len(value)) + value
        return struct.pack("<HH2sH", 0x0002, number, vr.encode(), len(value)) + value

    body = b"".join((
        element(0x0001, "OB", b"\x00\x01"),
        element(0x0002, "UI", str(sop_class_uid).encode()),
        element(0x0003, "UI", str(sop_instance_uid).encode()),
        element(0x0010, "UI", str(transfer_syntax).encode()),
        element(0x0012, "UI", IMPLEMENTATION_CLASS_UID.encode()),
        element(0x0013, "SH", IMPLEMENTATION_VERSION_NAME.encode()),
        element(0x0016, "AE", source_aet.strip().encode("ascii", "replace")) if source_aet.strip() else b"",
    ))
    return b"\x00" * 128 + b"DICM" + element(0x0000, "UL", struct.pack("<I", len(body))) + body


def _dataset_offset(data: bytes) -> int:
    """Offset of the data set in a Part 10 file's bytes: after preamble and file meta group."""
    if data[128:132] != b"DICM":
        return 0
    # (0002,0000) UL group length comes first, in explicit VR little endian: tag, 'UL', len, value.
    if data[132:136] == b"\x02\x00\x00\x00" and data[136:138] == b"UL":
        return 144 + struct.unpack("<I", data[140:144])[0]
    return 132


# ============================================================================================
# Configuration
# ============================================================================================


@dataclasses.dataclass
class Config:
    """Every setting of the daemon. Built from the embedded defaults, a file, then flags."""

    aet: str = "DICOOGLED"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = 11112
    strict_called_aet: bool = False
    allowed_calling_aets: list[str] = dataclasses.field(default_factory=list)
    max_associations: int = 16
    max_pdu: int = 262144
    acse_timeout: float = 30
    dimse_timeout: float = 60
    network_timeout: float = 120
    max_find_results: int = 0
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    http_threads: int = 8
    data_dir: pathlib.Path = pathlib.Path("./data")
    duplicates: str = "keep"
    fsync: bool = True
    watch_folders: list[pathlib.Path] = dataclasses.field(default_factory=list)
    watch_poll: bool = False
    watch_poll_interval: float = 5
    watch_quiet_period: float = 2
    log_level: str = "INFO"
    #: C-MOVE destinations: AE title -> (host, port).
    modalities: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    #: The file settings were read from, if any.
    config_file: pathlib.Path | None = None

    @classmethod
    def load(cls, path=None, **overrides) -> "Config":
        """Read the embedded defaults, then the INI file at path, then non-None overrides."""
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str  # AE titles in [modalities] are case-sensitive
        parser.read_string(DEFAULT_CONFIG)
        if path:
            path = pathlib.Path(path)
            if not path.is_file():
                raise ValueError(f"config file {path} does not exist")
            parser.read(path, encoding="utf-8")
        get, section = parser.get, "dicom"
        try:
            config = cls(
                aet=get(section, "aet").strip(),
                dicom_host=get(section, "host"),
                dicom_port=parser.getint(section, "port"),
                strict_called_aet=parser.getboolean(section, "strict_called_aet"),
                allowed_calling_aets=get(section, "allowed_calling_aets").split(),
                max_associations=parser.getint(section, "max_associations"),
                max_pdu=parser.getint(section, "max_pdu"),
                acse_timeout=parser.getfloat(section, "acse_timeout"),
                dimse_timeout=parser.getfloat(section, "dimse_timeout"),
                network_timeout=parser.getfloat(section, "network_timeout"),
                max_find_results=parser.getint(section, "max_find_results"),
                http_host=get("http", "host"),
                http_port=parser.getint("http", "port"),
                http_threads=parser.getint("http", "threads"),
                data_dir=pathlib.Path(get("storage", "data_dir")),
                duplicates=get("storage", "duplicates").strip(),
                fsync=parser.getboolean("storage", "fsync"),
                watch_folders=[pathlib.Path(p) for p in get("watch", "folders").splitlines() if p.strip()],
                watch_poll=parser.getboolean("watch", "poll"),
                watch_poll_interval=parser.getfloat("watch", "poll_interval"),
                watch_quiet_period=parser.getfloat("watch", "quiet_period"),
                log_level=get("log", "level").strip().upper(),
                modalities={aet: _parse_host_port(aet, value) for aet, value in parser.items("modalities")},
                config_file=path,
            )
        except (ValueError, configparser.Error) as error:
            raise ValueError(f"invalid configuration: {error}") from None
        for name, value in overrides.items():
            if value is not None:
                setattr(config, name, value)
        config.validate()
        return config

    def validate(self):
        """Raise ValueError naming the first setting that cannot work."""
        if not is_valid_ae_title(self.aet):
            raise ValueError(f"invalid AE title {self.aet!r}: 1 to 16 printable ASCII characters, no backslash")
        for name in ("dicom_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"invalid {name} {getattr(self, name)}: must be 0..65535")
        if self.duplicates not in ("keep", "overwrite"):
            raise ValueError(f"invalid duplicates policy {self.duplicates!r}: keep or overwrite")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"invalid log level {self.log_level!r}")
        self.data_dir = pathlib.Path(self.data_dir)
        self.watch_folders = [pathlib.Path(p) for p in self.watch_folders]


def _parse_host_port(aet: str, value: str) -> tuple[str, int]:
    host, _, port = value.strip().rpartition(":")
    if not is_valid_ae_title(aet) or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"[modalities] {aet} = {value}: expected AET = host:port")
    return host.strip("[]"), int(port)


# ============================================================================================
# Index: schema, metadata extraction, the writer and readers
# ============================================================================================

#: Attributes kept in typed, indexed columns at each level; everything else is matched from
#: the per-instance metadata (JSON) after an FTS5 prefilter.
LEVEL_ATTRIBUTES = {
    "PATIENT": ("PatientID", "PatientName", "IssuerOfPatientID", "PatientBirthDate", "PatientSex"),
    "STUDY": (
        "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
        "StudyDescription", "ReferringPhysicianName", "InstitutionName",
    ),
    "SERIES": (
        "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate",
        "SeriesTime", "BodyPartExamined", "ProtocolName",
    ),
    "IMAGE": ("SOPInstanceUID", "SOPClassUID", "InstanceNumber"),
}
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
LEVEL_TABLES = {"PATIENT": "patients", "STUDY": "studies", "SERIES": "series", "IMAGE": "instances"}
LEVEL_ALIASES = {"PATIENT": "p", "STUDY": "st", "SERIES": "se", "IMAGE": "i"}
UNIQUE_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
#: Person names also get a folded copy, matched case- and accent-insensitively.
FOLDED_ATTRIBUTES = ("PatientName", "ReferringPhysicianName")

SCHEMA_VERSION = 1


def _level_columns(level: str) -> str:
    columns = [f"{_snake_case(k)} TEXT NOT NULL DEFAULT ''" for k in LEVEL_ATTRIBUTES[level]]
    columns += [f"{_snake_case(k)}_folded TEXT NOT NULL DEFAULT ''" for k in FOLDED_ATTRIBUTES if k in LEVEL_ATTRIBUTES[level]]
    return ",\n    ".join(columns)


SCHEMA = f"""
CREATE TABLE patients (
    id INTEGER PRIMARY KEY,
    patient_key TEXT NOT NULL UNIQUE,
    first_instance INTEGER,
    {_level_columns("PATIENT")}
);
CREATE TABLE studies (
    id INTEGER PRIMARY KEY,
    patient_ref INTEGER NOT NULL REFERENCES patients(id),
    first_instance INTEGER,
    {_level_columns("STUDY")},
    UNIQUE (study_instance_uid)
);
CREATE TABLE series (
    id INTEGER PRIMARY KEY,
    study_ref INTEGER NOT NULL REFERENCES studies(id),
    first_instance INTEGER,
    {_level_columns("SERIES")},
    UNIQUE (series_instance_uid)
);
CREATE TABLE instances (
    id INTEGER PRIMARY KEY,
    series_ref INTEGER NOT NULL REFERENCES series(id),
    {_level_columns("IMAGE")},
    transfer_syntax TEXT NOT NULL DEFAULT '',
    path TEXT NOT NULL UNIQUE,
    origin TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    meta TEXT NOT NULL,
    UNIQUE (sop_instance_uid)
);
CREATE INDEX patients_id ON patients(patient_id);
CREATE INDEX patients_name ON patients(patient_name_folded);
CREATE INDEX patients_birth_date ON patients(patient_birth_date);
CREATE INDEX studies_patient ON studies(patient_ref);
CREATE INDEX studies_date ON studies(study_date);
CREATE INDEX studies_accession ON studies(accession_number);
CREATE INDEX series_study ON series(study_ref);
CREATE INDEX series_modality ON series(modality);
CREATE INDEX instances_series ON instances(series_ref);
-- All metadata of each instance as text "Keyword value ...", rowid = instances.id.
CREATE VIRTUAL TABLE metadata USING fts5(
    body, content='', contentless_delete=1, tokenize='unicode61 remove_diacritics 2'
);
-- Folders indexed in place (index PATH, tasks), so that reindex can find them again.
CREATE TABLE indexed_roots (path TEXT PRIMARY KEY, added TEXT NOT NULL);
"""


@dataclasses.dataclass
class InstanceRecord:
    """What the index keeps of one instance, extracted from its header."""

    path: str
    origin: str  # 'store' (received), 'watch' (watched folder) or 'index' (indexed in place)
    size: int
    mtime_ns: int
    transfer_syntax: str
    columns: dict  # keyword -> text, the LEVEL_ATTRIBUTES
    meta: dict  # every element: keyword (or 8-hex tag) -> str | list[str] | list[dict]
    text: str  # the FTS5 document

    @property
    def sop_instance_uid(self) -> str:
        return self.columns["SOPInstanceUID"]


def _element_key(element) -> str:
    return element.keyword or f"{element.tag:08X}"


@functools.lru_cache(maxsize=4096)
def _tag_info(tag: int) -> tuple[str, str]:
    """(keyword or 8-hex tag, dictionary VR or 'UN') of a tag, cached: it is asked per element."""
    keyword = keyword_for_tag(tag) or f"{tag:08X}"
    try:
        return keyword, dictionary_VR(tag)
    except KeyError:
        return keyword, "UN"


_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"})
_CHARSET_VRS = frozenset({"PN", "SH", "LO", "ST", "LT", "UT", "UC"})
_SINGLE_VALUE_TEXT_VRS = frozenset({"ST", "LT", "UT", "UR"})  # backslash is text, not a separator
_STRUCT_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}
_SLOW = object()  # marks a raw value the fast decoder leaves to pydicom


def _fast_raw_value(raw, vr: str, encodings) -> object:
    """Decode a raw element's bytes straight to index text, or _SLOW to let pydicom do it.

    pydicom's general element conversion dominated ingest time; the index needs only text,
    which for the common VRs is a decode, a strip and a split.
    """
    value = raw.value
    if not value:
        return ""
    if vr in _ASCII_VRS or vr in _CHARSET_VRS:
        if vr in _CHARSET_VRS and encodings is not None:
            text = decode_bytes(value, encodings, {0x5C, 0x3D, 0x5E} if vr == "PN" else {0x5C})
        else:
            text = value.decode("latin-1")
        if vr in _SINGLE_VALUE_TEXT_VRS:
            return text.rstrip(" \x00")
        if vr == "PN":
            text = text.rstrip(" =")  # empty trailing component groups carry no name
        parts = [part.strip(" \x00") for part in text.split("\\")]
        return parts if len(parts) > 1 else parts[0]
    if vr in _STRUCT_FORMATS:
        size = struct.calcsize("<" + _STRUCT_FORMATS[vr])
        if len(value) % size:
            return _SLOW
        endian = "<" if raw.is_little_endian else ">"
        numbers = [str(n) for n in struct.unpack(f"{endian}{len(value) // size}{_STRUCT_FORMATS[vr]}", value)]
        return numbers if len(numbers) > 1 else numbers[0]
    if vr in BINARY_VRS:
        # Private text sent as UN (implicit VR) is still worth searching.
        if vr == "UN" and len(value) <= 256:
            text = value.rstrip(b"\x00 ").decode("utf-8", "replace")
            return text if text.isprintable() else None
        return None
    return _SLOW


def _text_value(element) -> str | list | None:
    """A converted element's value as the index keeps it: text, a list of texts, or None for binary."""
    vr, value = element.VR, element.value
    if value is None or value == "":
        return ""
    if vr in BINARY_VRS or isinstance(value, bytes):
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        return [str(v) for v in value]
    return str(value)


def _dataset_encodings(dataset: Dataset, inherited):
    """Python codecs for a data set's text: None means the default repertoire."""
    raw = dataset.get_item(0x00080005) if 0x00080005 in dataset else None
    if raw is None:
        return inherited
    terms = dataset.SpecificCharacterSet
    terms = [terms] if isinstance(terms, str) else list(terms)
    if not any(t.strip() for t in terms) or [t.strip() for t in terms] == ["ISO_IR 6"]:
        return None
    return convert_encodings(terms)


def extract_metadata(dataset: Dataset) -> tuple[dict, list[str]]:
    """Flatten a data set (pixel data excluded) into the index's metadata and FTS5 words.

    Sequences keep their items as lists of dicts; every element, private ones and those inside
    sequences included, contributes 'Keyword value' to the searchable text.
    """
    words: list[str] = []

    def walk(ds: Dataset, encodings) -> dict:
        meta = {}
        encodings = _dataset_encodings(ds, encodings)
        for tag in ds.keys():
            if tag >> 16 == 0x0002 or tag == 0x7FE00010:
                continue
            element = ds.get_item(tag)
            key, vr = _tag_info(tag)
            try:
                # Explicit UN of a known tag, and sequences, are left to pydicom to decode.
                if getattr(element, "is_raw", False) and vr != "SQ" and not (element.VR == "UN" and vr != "UN"):
                    value = _fast_raw_value(element, element.VR or vr, encodings)
                    if value is _SLOW:
                        value = _text_value(ds[tag])
                else:
                    element = ds[tag]
                    if element.VR == "SQ":
                        words.append(key)
                        meta[key] = [walk(item, encodings) for item in element.value]
                        continue
                    value = _text_value(element)
            except Exception as error:  # one malformed element must not hide the rest
                log.debug("element %s unreadable: %s", key, error)
                continue
            if value is None:
                continue
            meta[key] = value
            for item in value if isinstance(value, list) else (value,):
                words.append(key)
                words.append(item)
        return meta

    return walk(dataset, None), words


def make_record(dataset: Dataset, path: str, origin: str, size: int, mtime_ns: int) -> InstanceRecord:
    """Build the index record of a data set read with stop_before_pixels."""
    meta, words = extract_metadata(dataset)
    columns = {}
    for level in LEVELS:
        for keyword in LEVEL_ATTRIBUTES[level]:
            value = meta.get(keyword, "")
            columns[keyword] = "\\".join(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else (value if isinstance(value, str) else "")
    transfer_syntax = ""
    if getattr(dataset, "file_meta", None) is not None:
        transfer_syntax = str(dataset.file_meta.get("TransferSyntaxUID", ""))
    return InstanceRecord(path, origin, size, mtime_ns, transfer_syntax, columns, meta, " ".join(words))


class _WriteOp:
    __slots__ = ("function", "args", "future")

    def __init__(self, function, args):
        self.function, self.args, self.future = function, args, concurrent.futures.Future()


class Index:
    """The SQLite index: one writer thread that batches transactions, one reader per thread.

    Writes are queued and committed in groups (group commit), so several associations storing
    at once share transactions; each caller waits for its own commit before acknowledging.
    """

    BATCH = 256

    def __init__(self, path: pathlib.Path, on_connect=()):
        self.path = pathlib.Path(path)
        self.on_connect = list(on_connect)  #: callables(connection), e.g. to add SQL functions
        self._local = threading.local()
        self._queue: "collections.deque[_WriteOp]" = collections.deque()
        self._wakeup = threading.Condition()
        self._closed = False
        self._writer_connection = self._connect()
        self._migrate(self._writer_connection)
        self._writer = start_thread("index-writer", self._write_loop)

    def _connect(self) -> apsw.Connection:
        connection = apsw.Connection(str(self.path))
        connection.setbusytimeout(10_000)
        connection.execute("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON")
        for hook in getattr(self, "on_connect", ()):
            hook(connection)
        return connection

    def _migrate(self, connection):
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version != 0:
            raise RuntimeError(
                f"index {self.path} has schema version {version}, this dicoogled knows {SCHEMA_VERSION}: "
                "run 'dicoogled reindex' to rebuild it"
            )
        with connection:
            connection.execute(SCHEMA)
            connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # ---- readers -----------------------------------------------------------------------------

    @property
    def reader(self) -> apsw.Connection:
        """This thread's read connection (apsw connections serve one thread at a time)."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connect()
        return connection

    def query(self, sql: str, args=()) -> list:
        return self.reader.execute(sql, args).fetchall()

    def counts(self) -> dict:
        row = self.query(
            "SELECT (SELECT count(*) FROM patients), (SELECT count(*) FROM studies),"
            " (SELECT count(*) FROM series), (SELECT count(*) FROM instances)"
        )[0]
        return dict(zip(("patients", "studies", "series", "instances"), row))

    def instance_by_uid(self, sop_instance_uid: str):
        """(id, path, size, origin) of an indexed instance, or None."""
        rows = self.query("SELECT id, path, size, origin FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return rows[0] if rows else None

    def instance_by_path(self, path: str):
        rows = self.query("SELECT id, sop_instance_uid, size, mtime_ns FROM instances WHERE path = ?", (path,))
        return rows[0] if rows else None

    def paths_under(self, root: str) -> dict:
        """path -> (size, mtime_ns) of every instance indexed below a folder."""
        prefix = root.rstrip(os.sep) + os.sep
        rows = self.query(
            "SELECT path, size, mtime_ns FROM instances WHERE path >= ? AND path < ?",
            (prefix, prefix[:-1] + chr(ord(os.sep) + 1)),
        )
        return {path: (size, mtime) for path, size, mtime in rows}

    def metadata(self, instance_id: int) -> dict:
        rows = self.query("SELECT meta FROM instances WHERE id = ?", (instance_id,))
        return json.loads(rows[0][0]) if rows else {}

    # ---- the writer --------------------------------------------------------------------------

    def submit(self, function, *args) -> concurrent.futures.Future:
        """Queue function(connection, *args) to run inside a write transaction."""
        op = _WriteOp(function, args)
        with self._wakeup:
            if self._closed:
                raise RuntimeError("index is closed")
            self._queue.append(op)
            self._wakeup.notify()
        return op.future

    def write(self, function, *args):
        """Run function(connection, *args) in a write transaction and wait for its commit."""
        return self.submit(function, *args).result()

    def _write_loop(self):
        connection = self._writer_connection
        while True:
            with self._wakeup:
                while not self._queue and not self._closed:
                    self._wakeup.wait()
                if not self._queue and self._closed:
                    return
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.BATCH))]
            self._run_batch(connection, batch)

    def _run_batch(self, connection, batch):
        results = []
        try:
            with connection:  # one transaction for the whole batch
                for op in batch:
                    results.append(op.function(connection, *op.args))
        except Exception:
            if len(batch) == 1:
                batch[0].future.set_exception(sys.exc_info()[1])
                return
            # One op spoiled the batch: run each alone so only that op fails.
            for op in batch:
                self._run_batch(connection, [op])
            return
        for op, result in zip(batch, results):
            op.future.set_result(result)

    def close(self):
        """Finish every queued write, then close."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify_all()
        self._writer.join()
        self._writer_connection.close()

    # ---- write operations (run on the writer thread, inside a transaction) --------------------

    @staticmethod
    def _upsert_parent(connection, level, key_column, key, parent_column, parent_id, columns, instance_id, refresh=False):
        table = LEVEL_TABLES[level]
        row = connection.execute(f"SELECT id FROM {table} WHERE {key_column} = ?", (key,)).fetchone()
        if row and not refresh:
            connection.execute(f"UPDATE {table} SET first_instance = ? WHERE id = ? AND first_instance IS NULL", (instance_id, row[0]))
            return row[0]
        names = [key_column, "first_instance"] + [_snake_case(k) for k in LEVEL_ATTRIBUTES[level] if _snake_case(k) != key_column]
        values = [key, instance_id] + [columns[k] for k in LEVEL_ATTRIBUTES[level] if _snake_case(k) != key_column]
        for keyword in FOLDED_ATTRIBUTES:
            if keyword in LEVEL_ATTRIBUTES[level]:
                names.append(_snake_case(keyword) + "_folded")
                values.append(_fold(columns[keyword]))
        if row:  # a changed file: its parents now show what it says (and it represents them)
            assignments = ", ".join(f"{name} = ?" for name in names[1:])
            connection.execute(f"UPDATE {table} SET {assignments} WHERE id = ?", values[1:] + [row[0]])
            return row[0]
        if parent_column:
            names.append(parent_column)
            values.append(parent_id)
        placeholders = ",".join("?" * len(names))
        return connection.execute(f"INSERT INTO {table} ({','.join(names)}) VALUES ({placeholders}) RETURNING id", values).fetchone()[0]

    @classmethod
    def add_instance(cls, connection, record: InstanceRecord) -> int:
        """Insert (or replace) one instance and its patient, study and series rows."""
        existing = connection.execute("SELECT id FROM instances WHERE sop_instance_uid = ? OR path = ?", (record.sop_instance_uid, record.path)).fetchall()
        for (instance_id,) in existing:
            cls.remove_instance(connection, instance_id)
        columns = record.columns
        patient_key = columns["PatientID"] or columns["PatientName"]
        # The instance row needs its series id and the parents need the instance id: insert the
        # instance against a placeholder series first, then link both ways.
        instance_id = connection.execute(
            "INSERT INTO instances (series_ref, sop_instance_uid, sop_class_uid, instance_number, transfer_syntax,"
            " path, origin, size, mtime_ns, meta) VALUES (0, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (record.sop_instance_uid, columns["SOPClassUID"], columns["InstanceNumber"], record.transfer_syntax,
             record.path, record.origin, record.size, record.mtime_ns, json.dumps(record.meta, ensure_ascii=False)),
        ).fetchone()[0]
        refresh = bool(existing)
        patient = cls._upsert_parent(connection, "PATIENT", "patient_key", patient_key, None, None, columns, instance_id, refresh)
        study = cls._upsert_parent(connection, "STUDY", "study_instance_uid", columns["StudyInstanceUID"], "patient_ref", patient, columns, instance_id, refresh)
        series = cls._upsert_parent(connection, "SERIES", "series_instance_uid", columns["SeriesInstanceUID"], "study_ref", study, columns, instance_id, refresh)
        connection.execute("UPDATE instances SET series_ref = ? WHERE id = ?", (series, instance_id))
        connection.execute("INSERT INTO metadata (rowid, body) VALUES (?, ?)", (instance_id, record.text))
        return instance_id

    @staticmethod
    def remove_instance(connection, instance_id: int) -> str | None:
        """Unindex one instance; parents left without instances go too. Returns its path."""
        row = connection.execute(
            "SELECT i.path, i.series_ref, se.study_ref, st.patient_ref FROM instances i"
            " LEFT JOIN series se ON se.id = i.series_ref LEFT JOIN studies st ON st.id = se.study_ref"
            " WHERE i.id = ?", (instance_id,),
        ).fetchone()
        if not row:
            return None
        path, series_id, study_id, patient_id = row
        connection.execute("DELETE FROM instances WHERE id = ?", (instance_id,))
        connection.execute("DELETE FROM metadata WHERE rowid = ?", (instance_id,))
        # Re-point or drop each parent whose representative (or last) instance this was.
        for table, parent_id, child_sql in (
            ("series", series_id, "SELECT min(id) FROM instances WHERE series_ref = ?"),
            ("studies", study_id, "SELECT min(i.id) FROM instances i JOIN series se ON se.id = i.series_ref WHERE se.study_ref = ?"),
            ("patients", patient_id, "SELECT min(i.id) FROM instances i JOIN series se ON se.id = i.series_ref"
                                     " JOIN studies st ON st.id = se.study_ref WHERE st.patient_ref = ?"),
        ):
            if parent_id is None:
                continue
            successor = connection.execute(child_sql, (parent_id,)).fetchone()[0]
            if successor is None:
                connection.execute(f"DELETE FROM {table} WHERE id = ?", (parent_id,))
            else:
                connection.execute(f"UPDATE {table} SET first_instance = ? WHERE id = ? AND first_instance = ?", (successor, parent_id, instance_id))
        return path

    @classmethod
    def remove_paths(cls, connection, paths) -> int:
        removed = 0
        for path in paths:
            row = connection.execute("SELECT id FROM instances WHERE path = ?", (path,)).fetchone()
            if row:
                cls.remove_instance(connection, row[0])
                removed += 1
        return removed

    @staticmethod
    def add_root(connection, path: str):
        connection.execute("INSERT OR IGNORE INTO indexed_roots VALUES (?, datetime('now'))", (path,))

    @staticmethod
    def clear(connection):
        """Empty every table of instances (reindex starts from here)."""
        connection.execute("DELETE FROM instances; DELETE FROM series; DELETE FROM studies; DELETE FROM patients; DELETE FROM metadata")


# ============================================================================================
# Storage and ingest: the one path every object enters through
# ============================================================================================


class IngestError(Exception):
    """An object that cannot be stored or indexed; status is the DICOM status to answer."""

    def __init__(self, message: str, status: int = CANNOT_UNDERSTAND):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class IngestStats:
    stored: int = 0
    indexed: int = 0
    duplicates: int = 0
    skipped: int = 0  # not DICOM, DICOMDIR, or broken
    failed: int = 0


def read_header(source) -> Dataset:
    """Read a data set's header, pixel data excluded. Raises IngestError if it is not DICOM."""
    try:
        dataset = pydicom.dcmread(source, stop_before_pixels=True)
    except InvalidDicomError:
        try:
            if hasattr(source, "seek"):
                source.seek(0)
            dataset = pydicom.dcmread(source, stop_before_pixels=True, force=True)
        except Exception as error:
            raise IngestError(f"not DICOM: {error}") from None
        if "SOPInstanceUID" not in dataset:
            raise IngestError("not DICOM: no DICM prefix and no SOPInstanceUID")
    except Exception as error:
        raise IngestError(f"unreadable DICOM: {error}") from None
    return dataset


def _meta_transfer_syntax(meta: bytes) -> str | None:
    """The Transfer Syntax UID in a file meta group (explicit VR little endian), or None."""
    position = 0
    while position + 8 <= len(meta):
        group, number, vr = struct.unpack_from("<HH2s", meta, position)
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
            length, header = struct.unpack_from("<I", meta, position + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", meta, position + 6)[0], 8
        if (group, number) == (0x0002, 0x0010):
            return meta[position + header: position + header + length].rstrip(b"\x00 ").decode("ascii", "replace")
        position += header + length
    return None


def read_received_header(data: bytes) -> Dataset:
    """read_header for the Part 10 bytes of an object received whole (C-STORE, STOW-RS).

    Parses the data set directly with the transfer syntax from its meta group: three times
    faster than a general dcmread, which matters on the C-STORE path.
    """
    offset = _dataset_offset(data)
    syntax = _meta_transfer_syntax(data[144:offset]) if offset > 144 else None
    try:
        uid = pydicom.uid.UID(syntax or "")
        implicit, little = uid.is_implicit_VR, uid.is_little_endian
    except ValueError:
        return read_header(io.BytesIO(data))
    if uid.is_deflated:
        return read_header(io.BytesIO(data))
    try:
        dataset = read_dataset(io.BytesIO(data[offset:]), implicit, little, stop_when=lambda tag, vr, length: tag >> 16 == 0x7FE0)
    except Exception as error:
        raise IngestError(f"unreadable DICOM: {error}") from None
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = uid
    return dataset


class Storage:
    """Files under data_dir/storage/<study>/<series>/<sop>.dcm, written atomically.

    Received bytes are stored exactly as received, after a file meta header; every name is a
    validated UID, so no file can be written outside the storage folder.
    """

    def __init__(self, data_dir: pathlib.Path, fsync: bool = True):
        self.root = (data_dir / "storage").resolve()
        self.tmp = (data_dir / "tmp").resolve()
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp.glob("store-*"):  # left by a crash mid-write; never acknowledged
            stale.unlink(missing_ok=True)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> pathlib.Path:
        for uid in (study_uid, series_uid, sop_uid):
            if not is_valid_uid(uid):
                raise IngestError(f"invalid UID {uid[:80]!r}", STORE_REFUSED_INVALID_UID)
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def write(self, path: pathlib.Path, data: bytes):
        """Write data to path atomically: a temp file in the data dir, fsync, rename."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix="store-", dir=self.tmp)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                if self.fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise

    def contains(self, path: pathlib.Path) -> bool:
        return path.resolve().is_relative_to(self.root)


class Ingest:
    """The one way in: received objects, watched files and indexed folders all pass here."""

    def __init__(self, index: Index, storage: Storage, duplicates: str = "keep"):
        self.index, self.storage, self.duplicates = index, storage, duplicates
        self.stats = IngestStats()
        self.listeners = []  #: callables(record), told of every indexed instance
        self._uid_locks = collections.defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        self.log = logging.getLogger("dicoogled.index")

    @contextlib.contextmanager
    def _lock_uid(self, uid: str):
        """Serialise work on one SOPInstanceUID (two associations may send the same one)."""
        with self._locks_guard:
            lock = self._uid_locks[uid]
        with lock:
            yield
        with self._locks_guard:
            if not lock.locked():
                self._uid_locks.pop(uid, None)

    def store_received(self, data: bytes, calling_aet: str = "") -> int:
        """Store and index a received Part 10 byte string; returns the DICOM status.

        The status is success only once the file is on disk (fsynced) and its index row is
        committed, so an acknowledged instance survives a crash or kill -9.
        """
        try:
            dataset = read_received_header(data)
            uids = [str(dataset.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
            if not all(uids):
                raise IngestError("missing StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID")
            path = self.storage.path_for(*uids)
            with self._lock_uid(uids[2]):
                if not self._accept_duplicate(uids[2], data, path, calling_aet):
                    return SUCCESS
                self.storage.write(path, data)
                self.stats.stored += 1
                stat = path.stat()
                record = make_record(dataset, str(path), "store", stat.st_size, stat.st_mtime_ns)
                self._index(record)
            self.log.info("stored %s from %s", uids[2], calling_aet or "?")
            return SUCCESS
        except IngestError as error:
            self.stats.failed += 1
            self.log.warning("refused an object from %s: %s", calling_aet or "?", error)
            return error.status
        except OSError as error:
            self.stats.failed += 1
            self.log.error("cannot store an object from %s: %s", calling_aet or "?", error)
            return OUT_OF_RESOURCES

    def _accept_duplicate(self, sop_uid: str, data: bytes, path: pathlib.Path, calling_aet: str) -> bool:
        """Apply the duplicate policy; True when the new object should be written."""
        existing = self.index.instance_by_uid(sop_uid)
        if existing is None:
            return True
        self.stats.duplicates += 1
        old_path = pathlib.Path(existing[1])
        try:
            old = old_path.read_bytes()
        except OSError:
            self.log.warning("duplicate %s: indexed file %s is gone, storing the new one", sop_uid, old_path)
            return True
        if old[_dataset_offset(old):] == data[_dataset_offset(data):]:
            self.log.info("duplicate %s from %s: identical, nothing to do", sop_uid, calling_aet or "?")
            return False
        if self.duplicates == "overwrite" and self.storage.contains(old_path):
            self.log.warning("duplicate %s from %s differs: overwriting (policy overwrite)", sop_uid, calling_aet or "?")
            return True
        self.log.warning("duplicate %s from %s differs: kept the first one (policy %s)", sop_uid, calling_aet or "?", self.duplicates)
        return False

    def index_file(self, path: pathlib.Path, origin: str) -> bool:
        """Index a file in place (watched folder, index PATH); False if it was skipped."""
        path = pathlib.Path(path)
        try:
            stat = path.stat()
            with open(path, "rb") as handle:
                dataset = read_header(handle)
                _require_complete(handle, dataset, stat.st_size)
            if str(dataset.get("SOPClassUID", "")) == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in dataset:
                raise IngestError("a DICOMDIR, not an instance")
            sop_uid = str(dataset.get("SOPInstanceUID", ""))
            if not sop_uid or not dataset.get("StudyInstanceUID") or not dataset.get("SeriesInstanceUID"):
                raise IngestError("missing StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID")
            with self._lock_uid(sop_uid):
                existing = self.index.instance_by_uid(sop_uid)
                if existing and existing[1] != str(path) and os.path.exists(existing[1]):
                    self.stats.duplicates += 1
                    self.log.warning("%s: SOPInstanceUID %s is already indexed from %s; skipped", path, sop_uid, existing[1])
                    return False
                self._index(make_record(dataset, str(path), origin, stat.st_size, stat.st_mtime_ns))
            return True
        except IngestError as error:
            self.stats.skipped += 1
            self.log.warning("skipped %s: %s", path, error)
        except OSError as error:
            self.stats.skipped += 1
            self.log.warning("skipped %s: %s", path, error.strerror or error)
        return False

    def _index(self, record: InstanceRecord):
        self.index.write(Index.add_instance, record)
        self.stats.indexed += 1
        for listener in self.listeners:
            try:
                listener(record)
            except Exception:
                self.log.exception("listener failed for %s", record.sop_instance_uid)

    def unindex_paths(self, paths) -> int:
        paths = [str(p) for p in paths]
        return self.index.write(Index.remove_paths, paths) if paths else 0


def _require_complete(handle, dataset: Dataset, file_size: int):
    """Refuse a file cut short: pydicom reads a truncated pixel element without complaint.

    After a stop_before_pixels read the handle sits at the pixel data element (if any); its
    declared length must fit in the file. Encapsulated (undefined length) pixel data must end
    with a sequence delimiter. Without pixel data the last element must end where the file does.
    """
    position = handle.tell()
    if position >= file_size:
        deflated = getattr(dataset, "file_meta", None) is not None and dataset.file_meta.get("TransferSyntaxUID") == "1.2.840.10008.1.2.1.99"
        last = dataset.get_item(max(dataset.keys())) if len(dataset) and not deflated else None
        # pydicom returns a value cut short without complaint; value_tell is its file offset.
        if isinstance(last, RawDataElement) and last.length != 0xFFFFFFFF and last.value_tell + last.length != file_size:
            raise IngestError(f"truncated file: element {last.tag} needs {last.value_tell + last.length} bytes, file has {file_size}")
        return
    header = handle.read(12)
    if len(header) < 8:
        raise IngestError("truncated file")
    little = dataset.original_encoding[1] if dataset.original_encoding[1] is not None else True
    implicit = dataset.original_encoding[0] if dataset.original_encoding[0] is not None else False
    endian = "<" if little else ">"
    group, element = struct.unpack(endian + "HH", header[:4])
    if (group, element) != (0x7FE0, 0x0010):
        return
    if implicit:
        length, start = struct.unpack(endian + "I", header[4:8])[0], position + 8
    elif header[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"UT", b"SQ"):
        length, start = struct.unpack(endian + "I", header[8:12])[0], position + 12
    else:
        length, start = struct.unpack(endian + "H", header[6:8])[0], position + 8
    if length == 0xFFFFFFFF:
        # Walk the fragments to the sequence delimiter: elements such as (FFFC,FFFC) padding may follow it.
        handle.seek(start)
        while True:
            item = handle.read(8)
            if len(item) < 8:
                raise IngestError("truncated file: encapsulated pixel data has no end")
            item_group, item_element, item_length = struct.unpack(endian + "HHI", item)
            if (item_group, item_element) == (0xFFFE, 0xE0DD):
                break
            if (item_group, item_element) != (0xFFFE, 0xE000) or handle.tell() + item_length > file_size:
                raise IngestError("truncated file: encapsulated pixel data has no end")
            handle.seek(item_length, os.SEEK_CUR)
    elif start + length > file_size:
        raise IngestError(f"truncated file: pixel data needs {start + length} bytes, file has {file_size}")


# ============================================================================================
# Query: DICOM matching (PS3.4 C.2.2.2) over the index
# ============================================================================================


class QueryError(Exception):
    """An identifier that cannot be answered; status is the DICOM status."""

    def __init__(self, message: str, status: int = UNABLE_TO_PROCESS):
        super().__init__(message)
        self.status = status


def _wildcard_regex(pattern: str, fold: bool) -> re.Pattern:
    """DICOM wildcard matching: '*' any run, '?' one character; everything else literal."""
    if fold:
        pattern = _fold(pattern)
    parts = ("." if c == "?" else ".*" if c == "*" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.DOTALL)


def _glob_escape(text: str) -> str:
    """SQLite GLOB pattern for a DICOM pattern: keep * and ?, make [ literal."""
    return text.replace("[", "[[]")


def _range_bounds(value: str) -> tuple[str, str] | None:
    if "-" not in value:
        return None
    low, _, high = value.partition("-")
    return low.strip(), high.strip()


def _in_range(stored: str, low: str, high: str) -> bool:
    """Range matching on DA/TM/DT text; an empty value never matches, bounds are inclusive."""
    if not stored:
        return False
    if low and stored < low:
        return False
    return not high or stored[: len(high)] <= high


def _is_universal(pattern) -> bool:
    """An empty key, '*', or a sequence whose item has only such keys: it matches everything,
    entities without the attribute included (PS3.4 C.2.2.2.3 and C.2.2.2.6)."""
    if isinstance(pattern, list):
        return not pattern or all(_is_universal(value) for _, value in pattern[0].values())
    return pattern in ("", "*")


def match_value(vr: str, pattern, stored) -> bool:
    """Does a stored value (text, list of texts, list of items) match a C-FIND key?

    Implements single value, wildcard, range, list-of-UID and universal matching; PN matches
    case- and accent-insensitively; a multi-valued attribute matches if any value does.
    """
    if _is_universal(pattern):
        return True
    if isinstance(pattern, list):  # sequence matching: every key of the query item must match one stored item
        items = stored if isinstance(stored, list) else []
        return any(all(match_value(k_vr, k_value, item.get(k)) for k, (k_vr, k_value) in pattern[0].items())
                   for item in items if isinstance(item, dict))
    if stored is None or isinstance(stored, list) and stored and isinstance(stored[0], dict):
        return False
    values = stored if isinstance(stored, list) else [stored]
    if vr in DATE_TIME_VRS and "-" in pattern:
        low, high = _range_bounds(pattern)
        return any(_in_range(v, low, high) for v in values)
    candidates = pattern.split("\\") if "\\" in pattern else [pattern]
    fold = vr == "PN"
    joined = "\\".join(values)
    for candidate in candidates:
        if vr == "UI" or ("*" not in candidate and "?" not in candidate):
            target = _fold(candidate) if fold else candidate
            if any((_fold(v) if fold else v) == target for v in values + [joined]):
                return True
        else:
            regex = _wildcard_regex(candidate, fold)
            if any(regex.fullmatch(_fold(v) if fold else v) for v in values + [joined]):
                return True
    return False


#: Attributes computed from the hierarchy rather than stored.
COMPUTED_ATTRIBUTES = {
    "NumberOfPatientRelatedStudies": ("PATIENT", "SELECT count(*) FROM studies WHERE patient_ref = p.id"),
    "NumberOfPatientRelatedSeries": ("PATIENT", "SELECT count(*) FROM series se2 JOIN studies st2 ON st2.id = se2.study_ref WHERE st2.patient_ref = p.id"),
    "NumberOfPatientRelatedInstances": ("PATIENT", "SELECT count(*) FROM instances i2 JOIN series se2 ON se2.id = i2.series_ref JOIN studies st2 ON st2.id = se2.study_ref WHERE st2.patient_ref = p.id"),
    "NumberOfStudyRelatedSeries": ("STUDY", "SELECT count(*) FROM series WHERE study_ref = st.id"),
    "NumberOfStudyRelatedInstances": ("STUDY", "SELECT count(*) FROM instances i2 JOIN series se2 ON se2.id = i2.series_ref WHERE se2.study_ref = st.id"),
    # group_concat(DISTINCT) only joins with ','; CS and UI values never hold one, so make it DICOM's '\'.
    "ModalitiesInStudy": ("STUDY", "SELECT replace(group_concat(DISTINCT modality), ',', '\\') FROM series WHERE study_ref = st.id AND modality != ''"),
    "SOPClassesInStudy": ("STUDY", "SELECT replace(group_concat(DISTINCT i2.sop_class_uid), ',', '\\') FROM instances i2 JOIN series se2 ON se2.id = i2.series_ref WHERE se2.study_ref = st.id"),
    "NumberOfSeriesRelatedInstances": ("SERIES", "SELECT count(*) FROM instances WHERE series_ref = se.id"),
}


@dataclasses.dataclass
class Key:
    """One element of a C-FIND identifier: what to match, and what to return."""

    keyword: str  # keyword, or 8-hex tag for private and unknown elements
    tag: int
    vr: str
    value: object  # text, or for sequences a list holding one dict of sub-keys {keyword: (vr, value)}


def parse_identifier(identifier: Dataset) -> tuple[str, list[Key]]:
    """Split a C-FIND identifier into its level and keys; raise QueryError if it is unusable."""
    try:
        level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    except Exception as error:
        raise QueryError(f"unreadable QueryRetrieveLevel: {error}", IDENTIFIER_DOES_NOT_MATCH) from None
    if level not in LEVELS:
        raise QueryError(f"QueryRetrieveLevel {level!r} is not PATIENT, STUDY, SERIES or IMAGE", IDENTIFIER_DOES_NOT_MATCH)

    def keys_of(ds: Dataset) -> list[Key]:
        keys = []
        for element in ds:
            if element.tag in (0x00080052, 0x00080005) or element.tag.element == 0x0000:
                continue
            try:
                if element.VR == "SQ":
                    items = [{k.keyword: (k.vr, k.value) for k in keys_of(item)} for item in element.value[:1]]
                    keys.append(Key(_element_key(element), int(element.tag), "SQ", items))
                    continue
                value = element.value
                if isinstance(value, (MultiValue, list, tuple)):
                    value = "\\".join(str(v) for v in value)
                value = "" if value is None else value
                if isinstance(value, bytes):
                    value = value.rstrip(b"\x00 ").decode("ascii", "replace")
                keys.append(Key(_element_key(element), int(element.tag), element.VR, str(value).strip()))
            except Exception as error:
                raise QueryError(f"malformed key {element.tag}: {error}") from None
        return keys

    return level, keys_of(identifier)


class Finder:
    """Answers C-FIND (and the matching of C-MOVE, C-GET) from the index, never from files."""

    def __init__(self, index: Index):
        self.index = index

    def _from_clause(self, level: str) -> str:
        joins = ["patients p"]
        if LEVELS.index(level) >= 1:
            joins.append("JOIN studies st ON st.patient_ref = p.id")
        if LEVELS.index(level) >= 2:
            joins.append("JOIN series se ON se.study_ref = st.id")
        if LEVELS.index(level) >= 3:
            joins.append("JOIN instances i ON i.series_ref = se.id")
        return " ".join(joins)

    @staticmethod
    def _column(keyword: str, level_limit: str):
        """(SQL expression, level) of a main attribute at or above level_limit, else None."""
        for level in LEVELS[: LEVELS.index(level_limit) + 1]:
            if keyword in LEVEL_ATTRIBUTES[level]:
                column = _snake_case(keyword) + ("_folded" if keyword in FOLDED_ATTRIBUTES else "")
                return f"{LEVEL_ALIASES[level]}.{column}", level
        return None

    def _condition(self, expression: str, key: Key, args: list) -> str:
        """SQL for matching a main-attribute column, with the same rules as match_value."""
        value, vr = key.value, key.vr
        if vr in DATE_TIME_VRS and "-" in value:
            low, high = _range_bounds(value)
            parts = [f"{expression} != ''"]
            if low:
                parts.append(f"{expression} >= ?")
                args.append(low)
            if high:
                parts.append(f"substr({expression}, 1, {len(high)}) <= ?")
                args.append(high)
            return "(" + " AND ".join(parts) + ")"
        alternatives = []
        for candidate in value.split("\\"):
            if vr == "PN":
                candidate = _fold(candidate)
            if vr != "UI" and ("*" in candidate or "?" in candidate):
                alternatives.append(f"{expression} GLOB ?")
                args.append(_glob_escape(candidate))
            else:
                alternatives.append(f"{expression} = ?")
                args.append(candidate)
        return "(" + " OR ".join(alternatives) + ")"

    def _fts_prefilter(self, key: Key) -> str | None:
        """An FTS5 query that every instance matching key satisfies (a superset), or None."""
        if key.vr == "SQ" or not key.value or "\\" in key.value or (key.vr in DATE_TIME_VRS and "-" in key.value):
            return _fts_phrase(_fts_tokens(key.keyword))
        literal = re.split(r"[*?]", key.value, maxsplit=1)[0]
        tokens = _fts_tokens(key.keyword) + _fts_tokens(literal)
        # A wildcard (or any text) right after the literal part makes its last token a prefix.
        open_ended = literal != key.value and literal and not re.search(r"[\W_]$", literal)
        return _fts_phrase(tokens, prefix=bool(open_ended))

    def _matches(self, identifier: Dataset, cancelled):
        """Yield (level, returned keys, row, metadata) for every entity the identifier matches.

        Main attributes are matched in SQL; any other attribute is prefiltered with FTS5 and
        then matched exactly against the representative instance's metadata.
        """
        level, keys = parse_identifier(identifier)
        where, args, python_keys, returned = [], [], [], []
        alias = LEVEL_ALIASES[level]
        for key in keys:
            column = self._column(key.keyword, level)
            if column:
                # Return the stored text, also for universal matching; match the folded one.
                returned.append((key, ("column", column[0].removesuffix("_folded"))))
                if key.value not in ("", "*"):
                    where.append(self._condition(column[0], key, args))
            elif key.keyword in COMPUTED_ATTRIBUTES and LEVELS.index(COMPUTED_ATTRIBUTES[key.keyword][0]) <= LEVELS.index(level):
                attribute_level, sql = COMPUTED_ATTRIBUTES[key.keyword]
                expression = f"({sql})"
                returned.append((key, ("column", expression)))
                if key.value and key.keyword == "ModalitiesInStudy":
                    modalities = key.value.split("\\")
                    where.append(f"EXISTS (SELECT 1 FROM series x WHERE x.study_ref = st.id AND x.modality IN ({','.join('?' * len(modalities))}))")
                    args.extend(modalities)
                elif key.value and key.keyword == "SOPClassesInStudy":
                    classes = key.value.split("\\")
                    where.append(f"EXISTS (SELECT 1 FROM instances y JOIN series x ON x.id = y.series_ref WHERE x.study_ref = st.id AND y.sop_class_uid IN ({','.join('?' * len(classes))}))")
                    args.extend(classes)
            else:
                returned.append((key, ("meta", None)))
                if not _is_universal(key.value):
                    python_keys.append(key)
                    representative = "i.id" if level == "IMAGE" else f"{alias}.first_instance"
                    where.append(f"{representative} IN (SELECT rowid FROM metadata WHERE metadata MATCH ?)")
                    args.append(self._fts_prefilter(key))
        columns = [expression for _, (kind, expression) in returned if kind == "column"]
        representative = "i.id" if level == "IMAGE" else f"{alias}.first_instance"
        sql = f"SELECT {representative}, {alias}.id{''.join(', ' + c for c in columns)} FROM {self._from_clause(level)}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {alias}.id"
        needs_meta = any(kind == "meta" for _, (kind, _) in returned)
        for row in self.index.reader.execute(sql, args):
            if cancelled():
                return
            meta = self.index.metadata(row[0]) if needs_meta else {}
            if all(match_value(k.vr, k.value, meta.get(k.keyword)) for k in python_keys):
                yield level, returned, row, meta

    def search(self, identifier: Dataset, cancelled=lambda: False):
        """Yield the C-FIND response data sets for an identifier; stops when cancelled()."""
        for level, returned, row, meta in self._matches(identifier, cancelled):
            yield self._response(level, returned, row[2:], meta, identifier)

    @staticmethod
    def _response(level, returned, column_values, meta, identifier) -> Dataset:
        response = Dataset()
        values = iter(column_values)
        non_ascii = False
        for key, (kind, _) in returned:
            value = next(values) if kind == "column" else meta.get(key.keyword)
            if value is None:
                value = ""
            element_value = _dicom_value(key.vr, value)
            if isinstance(value, str) and not value.isascii():
                non_ascii = True
            response.add_new(key.tag, key.vr, element_value)
        response.QueryRetrieveLevel = level
        charset = identifier.get("SpecificCharacterSet")
        if non_ascii:
            response.SpecificCharacterSet = "ISO_IR 192"
        elif charset:
            response.SpecificCharacterSet = charset
        return response

    def instances(self, identifier: Dataset, cancelled=lambda: False) -> list[tuple]:
        """(sop_instance_uid, sop_class_uid, transfer_syntax, path) of every instance matched."""
        level, _ = parse_identifier(identifier)
        below = {
            "PATIENT": "se.study_ref IN (SELECT id FROM studies WHERE patient_ref = ?)",
            "STUDY": "se.study_ref = ?", "SERIES": "se.id = ?", "IMAGE": "i.id = ?",
        }[level]
        sql = ("SELECT i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax, i.path FROM instances i"
               f" JOIN series se ON se.id = i.series_ref WHERE {below} ORDER BY i.id")
        rows = []
        for _, _, row, _ in self._matches(identifier, cancelled):
            rows.extend(self.index.query(sql, (row[1],)))
        return rows


def _dicom_value(vr: str, value):
    """Convert indexed text back to a value pydicom can encode for this VR."""
    if vr == "SQ":
        items = []
        for item in value if isinstance(value, list) else []:
            if isinstance(item, dict):
                ds = Dataset()
                for keyword, item_value in item.items():
                    tag = tag_for_keyword(keyword) if not re.fullmatch(r"[0-9A-F]{8}", keyword) else int(keyword, 16)
                    if tag is None:
                        continue
                    try:
                        item_vr = dictionary_VR(tag)
                    except KeyError:
                        item_vr = "LO" if isinstance(item_value, str) else "SQ"
                    ds.add_new(tag, item_vr, _dicom_value(item_vr, item_value))
                items.append(ds)
        return Sequence(items)
    if isinstance(value, list):
        value = [_dicom_value(vr, v) for v in value if not isinstance(v, dict)]
        return value
    if vr in NUMBER_VRS:
        if value in ("", None):
            return None
        try:
            return NUMBER_VRS[vr](value)
        except (TypeError, ValueError):
            return None
    if vr in BINARY_VRS or vr == "AT":
        return None
    return str(value) if value is not None else ""


# ============================================================================================
# Search language: Dicoogle's Lucene-style queries, parsed and compiled to safe SQL
# ============================================================================================


class SearchSyntaxError(ValueError):
    """A query that cannot be parsed; position is the offset of the offending text."""

    def __init__(self, message: str, position: int):
        super().__init__(f"{message} at position {position}")
        self.position = position


_SEARCH_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<open>\() | (?P<close>\))
  | (?P<phrase>"(?:[^"\\]|\\.)*")
  | (?P<range>[\[{]\s*(?P<low>(?:[^\s\]}\\]|\\.)+)\s+TO\s+(?P<high>(?:[^\s\]}\\]|\\.)+)\s*[\]}])
  | (?P<word>(?:[^\s()"\\:]|\\.)+)
  | (?P<colon>:)
""", re.VERBOSE)
_NUMERIC_TYPES = ("Float", "Int", "Numeric", "Double", "Long")


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _tokenize_search(text: str) -> list[tuple[str, str, int, re.Match]]:
    tokens, position = [], 0
    while position < len(text):
        match = _SEARCH_TOKEN.match(text, position)
        if not match:
            snippet = text[position:position + 10]
            raise SearchSyntaxError("unterminated quote" if snippet.startswith('"') else f"unexpected {snippet!r}", position)
        kind = match.lastgroup if match.lastgroup not in ("low", "high") else "range"
        if kind != "space":
            tokens.append((kind, match.group(), position, match))
        position = match.end()
    return tokens


class SearchQuery:
    """A parsed query. Grammar (Lucene's, as Dicoogle uses it):

        query  := or
        or     := and (("OR" | "||") and)*
        and    := unary (("AND" | "&&")? unary)*       adjacent clauses must all match
        unary  := ("NOT" | "!" | "-" | "+")? atom
        atom   := "(" query ")" | "*:*" | FIELD ":" [TYPE ":"] value | FIELD ":(" values ")" | value
        value  := word (with * and ?) | "phrase" | [a TO b] | {a TO b}

    The tree is made of tuples: ("and", [..]), ("or", [..]), ("not", q), ("all",),
    ("text", word or phrase, is_phrase), ("field", keyword, ("match", text) | ("range", ...)).
    """

    def __init__(self, text: str):
        self.text = text
        if not text.strip():
            raise SearchSyntaxError("empty query", 0)
        if len(text) > 10_000:
            raise SearchSyntaxError("query longer than 10000 characters", 10_000)
        self.tokens = _tokenize_search(text)
        self.index = 0
        self.tree = self._or()
        if self.index < len(self.tokens):
            kind, value, position, _ = self.tokens[self.index]
            raise SearchSyntaxError(f"unexpected {value!r}", position)

    # ---- recursive descent ----------------------------------------------------------------------

    def _peek(self):
        return self.tokens[self.index] if self.index < len(self.tokens) else (None, None, len(self.text), None)

    def _is_operator(self, *names) -> bool:
        kind, value, _, _ = self._peek()
        return kind == "word" and value in names

    def _or(self):
        clauses = [self._and()]
        while self._is_operator("OR", "||"):
            self.index += 1
            clauses.append(self._and())
        return clauses[0] if len(clauses) == 1 else ("or", clauses)

    def _and(self):
        clauses = [self._unary()]
        while True:
            kind, value, _, _ = self._peek()
            if kind is None or kind == "close" or self._is_operator("OR", "||"):
                break
            if self._is_operator("AND", "&&"):
                self.index += 1
            clauses.append(self._unary())
        return clauses[0] if len(clauses) == 1 else ("and", clauses)

    def _unary(self):
        kind, value, position, _ = self._peek()
        if kind == "word" and value in ("NOT", "!"):
            self.index += 1
            return ("not", self._unary())
        if kind == "word" and value[0] in "+-" and len(value) > 1:
            # Lucene's required (+) and prohibited (-) prefixes.
            self.tokens[self.index] = ("word", value[1:], position + 1, None)
            atom = self._unary()
            return ("not", atom) if value[0] == "-" else atom
        return self._atom()

    def _atom(self):
        kind, value, position, match = self._peek()
        if kind is None:
            raise SearchSyntaxError("query ends where a term was expected", position)
        self.index += 1
        if kind == "open":
            inner = self._or()
            if self._peek()[0] != "close":
                raise SearchSyntaxError("missing ')'", self._peek()[2])
            self.index += 1
            return inner
        if kind == "phrase":
            return ("text", _unescape(value[1:-1]), True)
        if kind == "word" and self._peek()[0] == "colon":
            self.index += 1
            return self._field(_unescape(value), position)
        if kind == "word":
            if value in ("AND", "OR", "&&", "||"):
                raise SearchSyntaxError(f"{value} needs a term on each side", position)
            return ("text", _unescape(value), False)
        raise SearchSyntaxError(f"unexpected {value!r}", position)

    def _field(self, name: str, position: int):
        kind, value, value_position, match = self._peek()
        if name == "*":
            if kind == "word" and value == "*":
                self.index += 1
                return ("all",)
            raise SearchSyntaxError("'*:' must be followed by '*'", value_position)
        keyword = _search_field(name, position)
        numeric = False
        if kind == "word" and value in _NUMERIC_TYPES and self.tokens[self.index + 1:self.index + 2] and self.tokens[self.index + 1][0] == "colon":
            self.index += 2
            numeric = True
            kind, value, value_position, match = self._peek()
        if kind is None:
            raise SearchSyntaxError(f"{name}: needs a value", value_position)
        self.index += 1
        if kind == "range":
            low, high = _unescape(match.group("low")), _unescape(match.group("high"))
            numeric = numeric or all(_as_number(b) is not None for b in (low, high) if b != "*")
            return ("field", keyword, ("range", low, high, value[0] == "[", value[-1] == "]", numeric))
        if numeric:
            raise SearchSyntaxError(f"{name}: a numeric type needs a [a TO b] range", value_position)
        if kind == "phrase":
            return ("field", keyword, ("match", _unescape(value[1:-1])))
        if kind == "word":
            return ("field", keyword, ("match", _unescape(value)))
        if kind == "open":
            # Field:(a OR b c) applies the field to every term inside.
            self.index -= 1
            group = self._atom()
            return _apply_field(keyword, group, value_position)
        raise SearchSyntaxError(f"{name}: unexpected {value!r}", value_position)


def _search_field(name: str, position: int) -> str:
    """A field name as the index knows it: a DICOM keyword, an 8-hex tag, Seq_Child, or uri."""
    if name in ("uri", "others"):
        return name
    for part in name.split("_"):
        if not (tag_for_keyword(part) is not None or re.fullmatch(r"[0-9A-Fa-f]{8}", part)):
            raise SearchSyntaxError(f"unknown field {name!r} (fields are DICOM keywords such as PatientName)", position)
    return "_".join(p.upper() if re.fullmatch(r"[0-9A-Fa-f]{8}", p) else p for p in name.split("_"))


def _apply_field(keyword: str, node, position: int):
    if node[0] == "text":
        return ("field", keyword, ("match", node[1]))
    if node[0] in ("and", "or"):
        return (node[0], [_apply_field(keyword, child, position) for child in node[1]])
    if node[0] == "not":
        return ("not", _apply_field(keyword, node[1], position))
    raise SearchSyntaxError(f"{keyword}:( ) may hold only plain terms", position)


def _as_number(text: str):
    try:
        return float(text)
    except ValueError:
        return None


@functools.lru_cache(maxsize=1024)
def _value_matcher(spec: str):
    """A predicate on one folded text value, for a field clause's serialised value spec."""
    node = json.loads(spec)
    if node[0] == "range":
        _, low, high, include_low, include_high, numeric = node
        convert = _as_number if numeric else _fold
        low_value = None if low == "*" else convert(low)
        high_value = None if high == "*" else convert(high)

        def in_range(value):
            value = convert(value)
            if value is None or value == "":
                return False
            if low_value is not None and (value < low_value or (value == low_value and not include_low)):
                return False
            if high_value is not None and (value > high_value or (value == high_value and not include_high)):
                return False
            return True
        return in_range
    pattern = _fold(node[1]).strip()
    words = _fts_tokens(pattern)
    if "*" in pattern or "?" in pattern:
        whole = _wildcard_regex(pattern, fold=False)
        return lambda value: bool(whole.fullmatch(_fold(value)) or any(whole.fullmatch(w) for w in _fts_tokens(value)))
    if not words:
        return lambda value: _fold(value) == pattern

    def equal_or_contains(value):
        if _fold(value) == pattern:
            return True
        tokens = _fts_tokens(value)
        n = len(words)
        return any(tokens[i:i + n] == words for i in range(len(tokens) - n + 1))
    return equal_or_contains


def field_value_matches(spec: str, values: list[str]) -> bool:
    """Does any value of an attribute satisfy a field clause?

    Text compares case- and accent-insensitively: the clause matches a value equal to it, or
    (for words and phrases) a run of whole words inside it; '*' and '?' are wildcards over the
    whole value or one word; ranges compare numbers when both bounds are numbers, else text.
    """
    predicate = _value_matcher(spec)
    return any(predicate(value) for value in values)


def _meta_values(meta: dict, path: list[str]) -> list[str]:
    """Text values of a field in an instance's metadata. Seq_Child names a child inside a
    sequence's items; a plain keyword absent at the top level is looked for in every item."""
    value = meta.get(path[0])
    if len(path) > 1:
        items = value if isinstance(value, list) else []
        return [v for item in items if isinstance(item, dict) for v in _meta_values(item, path[1:])]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and isinstance(value[0], str):
        return value
    nested = []
    for item_list in meta.values():
        if isinstance(item_list, list):
            nested.extend(v for item in item_list if isinstance(item, dict) for v in _meta_values(item, path))
    return nested


#: Main attributes and where they live, for search clauses answered by a column.
SEARCH_COLUMNS = {k: f"{LEVEL_ALIASES[level]}.{_snake_case(k)}" for level in LEVELS for k in LEVEL_ATTRIBUTES[level]}
SEARCH_COLUMNS["uri"] = "i.path"


def compile_search(query: SearchQuery) -> tuple[str, list, str | None]:
    """SQL condition over instances (aliases p, st, se, i), its arguments, and the FTS5 query
    used to rank results (None when the query has no free text). User text only ever
    travels as bound parameters and as quoted FTS5 strings."""
    args: list = []
    ranked: list[str] = []

    def text_fts(term: str, is_phrase: bool) -> str | None:
        if is_phrase:
            tokens = _fts_tokens(term)
            return _fts_phrase(tokens) if tokens else None
        if "?" in term or "*" in term[:-1]:
            return None  # a wildcard inside a word: no FTS form, matched by scanning
        tokens = _fts_tokens(term.rstrip("*"))
        if not tokens:
            return None
        return " AND ".join(_fts_phrase([t], prefix=term.endswith("*") and t == tokens[-1]) for t in tokens)

    def walk(node, positive=True) -> str:
        kind = node[0]
        if kind == "all":
            return "1"
        if kind in ("and", "or"):
            return "(" + f" {kind.upper()} ".join(walk(child, positive) for child in node[1]) + ")"
        if kind == "not":
            return f"NOT {walk(node[1], not positive)}"
        if kind == "text":
            if not _fts_tokens(node[1]):
                return "0"  # punctuation alone is no word: it matches nothing
            fts = text_fts(node[1], node[2])
            if fts is None:
                args.append(json.dumps(["match", node[1]]))
                return "search_text_matches(i.meta, ?)"
            if positive:
                ranked.append(f"({fts})")
            args.append(fts)
            return "i.id IN (SELECT rowid FROM metadata WHERE metadata MATCH ?)"
        # ("field", keyword, value)
        keyword, value = node[1], node[2]
        spec = json.dumps(list(value))
        if keyword in SEARCH_COLUMNS:
            args.append(spec)
            return f"search_value_matches(?, {SEARCH_COLUMNS[keyword]})"
        path = keyword.split("_")
        # FTS5 narrows the candidates to instances holding the keyword and the value's words
        # (a superset); the exact rule is then checked on the metadata.
        words = [] if value[0] == "range" else _fts_tokens(value[1].split("*")[0].split("?")[0])
        prefilter = " AND ".join(_fts_phrase([w]) for w in _fts_tokens(path[-1]) + words)
        top_level = f'$."{path[0]}"' if len(path) == 1 else "$.__none__"
        args.extend([prefilter, top_level, spec, json.dumps(path)])
        return ("(i.id IN (SELECT rowid FROM metadata WHERE metadata MATCH ?)"
                " AND search_meta_matches(json_extract(i.meta, ?), i.meta, ?, ?))")

    where = walk(query.tree)
    return where, args, " OR ".join(ranked) if ranked else None


def register_search_functions(connection: apsw.Connection):
    """The SQL functions compile_search's conditions call (per connection, as apsw requires)."""

    def value_matches(spec, value):
        return field_value_matches(spec, value.split("\\") if value else [])

    def meta_matches(top_level_value, meta_text, spec, path_text):
        # A top-level attribute comes pre-extracted by SQLite: no need to parse all metadata.
        if isinstance(top_level_value, str):
            values = json.loads(top_level_value) if top_level_value.startswith("[") else [top_level_value]
            if all(isinstance(v, str) for v in values):
                return field_value_matches(spec, values)
        return field_value_matches(spec, _meta_values(json.loads(meta_text), json.loads(path_text)))

    def text_matches(meta_text, spec):
        pattern = json.loads(spec)[1]
        regex = _wildcard_regex(_fold(pattern), fold=False)
        return any(regex.fullmatch(word) for word in _fts_tokens(meta_text))

    connection.create_scalar_function("search_value_matches", value_matches, 2, deterministic=True)
    connection.create_scalar_function("search_meta_matches", meta_matches, 4, deterministic=True)
    connection.create_scalar_function("search_text_matches", text_matches, 2, deterministic=True)


# ============================================================================================
# DICOM services: C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET
# ============================================================================================

QUERY_RETRIEVE_SOP_CLASSES = (
    PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet,
)


def _set_tcp_nodelay(event):
    """Disable Nagle's algorithm: without it every small DIMSE message waits for an ACK."""
    with contextlib.suppress(OSError, AttributeError):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class DicomServices:
    """The DICOM listener (pynetdicom): verification, storage and query/retrieve."""

    def __init__(self, config: Config, ingest: Ingest, finder: Finder):
        self.config, self.ingest, self.finder = config, ingest, finder
        self.log = logging.getLogger("dicoogled.dicom")
        self.server = None
        self.port = None
        self._in_flight = 0
        self._in_flight_done = threading.Condition()
        # Accept every storage SOP class, private and unknown ones included, as proposed.
        pynetdicom_config.UNRESTRICTED_STORAGE_SERVICE = True
        self.ae = AE(ae_title=config.aet)
        self.ae.maximum_associations = config.max_associations
        self.ae.maximum_pdu_size = config.max_pdu
        self.ae.acse_timeout = config.acse_timeout
        self.ae.dimse_timeout = config.dimse_timeout
        self.ae.network_timeout = config.network_timeout
        self.ae.require_called_aet = config.strict_called_aet
        self.ae.require_calling_aet = config.allowed_calling_aets
        self.ae.add_supported_context(Verification, UNCOMPRESSED_TRANSFER_SYNTAXES)
        for sop_class in QUERY_RETRIEVE_SOP_CLASSES:
            self.ae.add_supported_context(sop_class, UNCOMPRESSED_TRANSFER_SYNTAXES)

    def start(self):
        handlers = [
            (evt.EVT_CONN_OPEN, _set_tcp_nodelay),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_GET, self._on_get),
        ]
        self.server = self.ae.start_server((self.config.dicom_host, self.config.dicom_port), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]
        self.log.info("DICOM listening on %s:%d as %s", self.config.dicom_host, self.port, self.config.aet)

    def stop(self, grace: float = 10):
        """Stop accepting, let stores under way finish (up to grace seconds), then abort the rest."""
        if not self.server:
            return
        self.server.shutdown()
        with self._in_flight_done:
            self._in_flight_done.wait_for(lambda: self._in_flight == 0, timeout=grace)
        for association in list(self.server.active_associations):
            association.abort()
        self.server = None

    @contextlib.contextmanager
    def _tracked(self):
        with self._in_flight_done:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._in_flight_done:
                self._in_flight -= 1
                self._in_flight_done.notify_all()

    def _on_requested(self, event):
        request = event.assoc.requestor.primitive
        called = str(getattr(request, "called_ae_title", "")).strip()
        if called and called != self.config.aet and not self.config.strict_called_aet:
            self.log.warning(
                "%s called us as %r, but our AE title is %r: accepted anyway (set strict_called_aet to refuse)",
                str(getattr(request, "calling_ae_title", "")).strip(), called, self.config.aet,
            )

    def _on_store(self, event):
        with self._tracked():
            try:
                request = event.request
                header = part10_header(request.AffectedSOPClassUID, request.AffectedSOPInstanceUID,
                                       event.context.transfer_syntax, event.assoc.requestor.ae_title)
                data = header + request.DataSet.getvalue()
            except Exception as error:
                self.log.warning("C-STORE from %s: cannot read the request: %s", event.assoc.requestor.ae_title, error)
                return CANNOT_UNDERSTAND
            return self.ingest.store_received(data, event.assoc.requestor.ae_title)

    def _on_find(self, event):
        calling = event.assoc.requestor.ae_title
        cancelled = False

        def is_cancelled():
            nonlocal cancelled  # pynetdicom reports a C-CANCEL only once: remember it
            cancelled = cancelled or event.is_cancelled
            return cancelled

        try:
            identifier = event.identifier
            level, _ = parse_identifier(identifier)
            if level == "PATIENT" and event.request.AffectedSOPClassUID == StudyRootQueryRetrieveInformationModelFind:
                raise QueryError("the Study Root model has no PATIENT level (use Patient Root)", IDENTIFIER_DOES_NOT_MATCH)
            count = 0
            for response in self.finder.search(identifier, is_cancelled):
                yield PENDING, response
                count += 1
                if self.config.max_find_results and count >= self.config.max_find_results:
                    self.log.warning("C-FIND from %s stopped at max_find_results=%d", calling, count)
                    break
            if is_cancelled():
                yield CANCELLED, None
                return
            self.log.info("C-FIND from %s: %d matches", calling, count)
            yield SUCCESS, None
        except QueryError as error:
            self.log.warning("C-FIND from %s refused: %s", calling, error)
            yield error.status, None
        except Exception:
            self.log.exception("C-FIND from %s failed", calling)
            yield UNABLE_TO_PROCESS, None

    def _matched_instances(self, event, service: str):
        try:
            return self.finder.instances(event.identifier, lambda: event.is_cancelled)
        except QueryError as error:
            self.log.warning("%s from %s refused: %s", service, event.assoc.requestor.ae_title, error)
            raise
        except Exception:
            self.log.exception("%s from %s: cannot read the identifier", service, event.assoc.requestor.ae_title)
            raise

    def _sub_operations(self, event, instances):
        """Yield (status, data set) for each instance to send; a file that cannot be read is a failure."""
        for sop_uid, _, _, path in instances:
            if event.is_cancelled:
                yield CANCELLED, None
                return
            try:
                yield PENDING, pydicom.dcmread(path)
            except Exception as error:
                self.log.error("cannot read %s for %s: %s", path, sop_uid, error)
                # pynetdicom counts a non-data-set value as a failed sub-operation.
                yield PENDING, sop_uid

    def _on_move(self, event):
        with self._tracked():
            destination_aet = (event.move_destination or "").strip()
            calling = event.assoc.requestor.ae_title
            instances = self._matched_instances(event, "C-MOVE")  # raising here answers 0xC514
            destination = self.config.modalities.get(destination_aet)
            if destination is None:
                self.log.warning(
                    "C-MOVE from %s to unknown destination %r: add it under [modalities] as %s = host:port",
                    calling, destination_aet, destination_aet or "AET",
                )
                yield None, None
                return
            options = {"contexts": _contexts_for(instances), "evt_handlers": [(evt.EVT_CONN_OPEN, _set_tcp_nodelay)],
                       "max_pdu": self.config.max_pdu}
            yield destination[0], destination[1], options
            self.log.info("C-MOVE from %s: %d instances to %s", calling, len(instances), destination_aet)
            yield len(instances)
            yield from self._sub_operations(event, instances)

    def _on_get(self, event):
        with self._tracked():
            instances = self._matched_instances(event, "C-GET")
            self.log.info("C-GET from %s: %d instances", event.assoc.requestor.ae_title, len(instances))
            yield len(instances)
            yield from self._sub_operations(event, instances)


def _contexts_for(instances) -> list:
    """Presentation contexts for sending instances: each stored transfer syntax, plus the
    uncompressed ones for uncompressed objects (pynetdicom converts among those).
    At most 128 may be proposed; the rest are skipped (and would fail as sub-operations)."""
    wanted = {}
    for _, sop_class, transfer_syntax, _ in instances:
        if transfer_syntax in UNCOMPRESSED_TRANSFER_SYNTAXES or not transfer_syntax:
            wanted.setdefault((sop_class, "uncompressed"), list(UNCOMPRESSED_TRANSFER_SYNTAXES))
        else:
            wanted.setdefault((sop_class, transfer_syntax), [transfer_syntax])
    contexts = [build_context(sop_class, syntaxes) for (sop_class, _), syntaxes in wanted.items()]
    if len(contexts) > 128:
        log.warning("sending needs %d presentation contexts; only 128 can be proposed", len(contexts))
    return contexts[:128]


# ============================================================================================
# Watched folders: index files in place, as they arrive, change and go
# ============================================================================================


class FolderWatcher:
    """Keeps the index in step with folders: reconcile at start, then follow file events.

    A file is indexed when inotify reports it closed after writing, or, for every other event
    and for polling observers, once its size and mtime have been still for quiet_period.
    """

    def __init__(self, ingest: Ingest, folders, origin="watch", poll=False, poll_interval=5.0, quiet_period=2.0):
        self.ingest = ingest
        self.folders = [pathlib.Path(f).resolve() for f in folders]
        self.origin = origin
        self.quiet_period = quiet_period
        self.log = logging.getLogger("dicoogled.watch")
        self.poll, self.poll_interval = poll, poll_interval
        self._observers = []
        self._pending: dict[str, tuple] = {}  # path -> (size, mtime_ns, last change time)
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        self._workers = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="watch-index")
        self._queued = 0  # files handed to the workers and not yet indexed (or skipped)
        self.reconciling = 0

    def start(self):
        for folder in self.folders:
            folder.mkdir(parents=True, exist_ok=True)
            self._observe(folder)
            self.reconciling += 1
            start_thread(f"reconcile-{folder.name}", self._reconcile_then_done, folder)
        start_thread("watch-debounce", self._debounce_loop)

    def _observe(self, folder: pathlib.Path):
        events = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileDeletedEvent, FileMovedEvent, DirDeletedEvent, DirMovedEvent]
        handler = _WatchHandler(self)

        def polling():
            return PollingObserver(timeout=self.poll_interval)

        try:
            observer = polling() if self.poll else Observer()
            observer.schedule(handler, str(folder), recursive=True, event_filter=events)
            observer.start()
        except OSError as error:
            # inotify limits (ENOSPC, EMFILE): poll this folder instead of failing.
            self.log.warning("cannot watch %s with inotify (%s); polling it instead. Raise fs.inotify.max_user_watches "
                             "and max_user_instances with sysctl to avoid this", folder, error)
            observer = polling()
            observer.schedule(handler, str(folder), recursive=True, event_filter=events)
            observer.start()
        self._observers.append(observer)
        self.log.info("watching %s (%s)", folder, "polling" if self.poll else "events")

    def stop(self):
        self._stop.set()
        for observer in self._observers:
            observer.stop()
        for observer in self._observers:
            observer.join(timeout=5)
        self._workers.shutdown(wait=True, cancel_futures=True)

    def _reconcile_then_done(self, folder):
        try:
            reconcile(self.ingest, folder, self.origin, self._stop)
        finally:
            self.reconciling -= 1

    # ---- events ------------------------------------------------------------------------------

    def file_closed(self, path: str):
        with self._pending_lock:
            self._pending.pop(path, None)
        self._submit(path)

    def file_changed(self, path: str):
        with self._pending_lock:
            self._pending[path] = (None, None, time.monotonic())

    def path_removed(self, path: str):
        with self._pending_lock:
            for pending in [p for p in self._pending if p == path or p.startswith(path + os.sep)]:
                del self._pending[pending]
        gone = [p for p in self.ingest.index.paths_under(path)] + [path]
        removed = self.ingest.unindex_paths(gone)
        if removed:
            self.log.info("unindexed %d file(s) removed from %s", removed, path)

    def _submit(self, path: str):
        if not self._stop.is_set():
            with self._pending_lock:
                self._queued += 1
            self._workers.submit(self._index_if_changed, path).add_done_callback(self._dequeue)

    def _dequeue(self, _future):
        with self._pending_lock:
            self._queued -= 1

    def _index_if_changed(self, path: str):
        try:
            stat = os.stat(path)
        except OSError:
            return
        known = self.ingest.index.instance_by_path(path)
        if known and known[2] == stat.st_size and known[3] == stat.st_mtime_ns:
            return
        if self.ingest.index_file(pathlib.Path(path), self.origin):
            self.log.info("indexed %s", path)

    @property
    def pending(self) -> int:
        """Files waiting for their quiet period or queued for indexing: 0 means all indexed."""
        return len(self._pending) + self._queued

    def _debounce_loop(self):
        """Index files whose size and mtime have not changed for quiet_period seconds."""
        while not self._stop.wait(0.25):
            now = time.monotonic()
            ready = []
            with self._pending_lock:
                for path, (size, mtime, since) in list(self._pending.items()):
                    try:
                        stat = os.stat(path)
                    except OSError:
                        del self._pending[path]
                        continue
                    if (stat.st_size, stat.st_mtime_ns) != (size, mtime):
                        self._pending[path] = (stat.st_size, stat.st_mtime_ns, now)
                    elif now - since >= self.quiet_period:
                        del self._pending[path]
                        ready.append(path)
            for path in ready:
                self._submit(path)


class _WatchHandler(FileSystemEventHandler):
    """Translates watchdog events into FolderWatcher calls."""

    def __init__(self, watcher: FolderWatcher):
        self.watcher = watcher

    def dispatch(self, event):
        try:
            super().dispatch(event)
        except Exception:
            self.watcher.log.exception("watch event %s failed", event)

    def on_closed(self, event):
        if not event.is_directory:
            self.watcher.file_closed(os.fsdecode(event.src_path))

    def on_created(self, event):
        if not event.is_directory:
            self.watcher.file_changed(os.fsdecode(event.src_path))

    on_modified = on_created

    def on_deleted(self, event):
        self.watcher.path_removed(os.fsdecode(event.src_path))

    def on_moved(self, event):
        self.watcher.path_removed(os.fsdecode(event.src_path))
        if not event.is_directory:
            self.watcher.file_changed(os.fsdecode(event.dest_path))


def walk_files(root: pathlib.Path, stop: threading.Event | None = None):
    """Every regular file below root (following no symlinked folders), in a stable order."""
    stack = [str(root)]
    while stack:
        if stop is not None and stop.is_set():
            return
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            log.warning("cannot list %s: %s", folder, error)
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            elif entry.is_file():
                yield entry


def reconcile(ingest: Ingest, root: pathlib.Path, origin: str, stop: threading.Event | None = None, progress=None) -> dict:
    """Bring the index in line with the files below root: index new or changed files, unindex
    vanished ones. Returns counts; progress(done, total) is called along the way."""
    root = pathlib.Path(root).resolve()
    known = ingest.index.paths_under(str(root))
    entries = list(walk_files(root, stop))
    to_index = []
    for entry in entries:
        stat = entry.stat()
        if known.pop(entry.path, None) != (stat.st_size, stat.st_mtime_ns):
            to_index.append(entry.path)
    removed = ingest.unindex_paths(known) if known else 0
    indexed = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="reconcile") as pool:
        futures = [pool.submit(ingest.index_file, pathlib.Path(path), origin) for path in to_index]
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            indexed += bool(future.result())
            if progress:
                progress(done, len(futures))
            if stop is not None and stop.is_set():
                pool.shutdown(cancel_futures=True)
                break
    result = {"files": len(entries), "indexed": indexed, "skipped": len(to_index) - indexed, "unindexed": removed}
    logging.getLogger("dicoogled.watch").info("reconciled %s: %s", root, result)
    return result


# ============================================================================================
# HTTP: the Bottle application
# ============================================================================================


def make_app(daemon: "Daemon") -> bottle.Bottle:
    """The HTTP application of a daemon (REST routes are added here as they grow)."""
    app = bottle.Bottle()
    http_log = logging.getLogger("dicoogled.http")

    def json_error(error: bottle.HTTPError):
        bottle.response.content_type = "application/json"
        return json.dumps({"error": error.body if isinstance(error.body, str) else str(error.status_line)})

    for code in (400, 401, 403, 404, 405, 409, 413, 415, 500):
        app.error(code)(json_error)

    @app.hook("after_request")
    def log_request():
        http_log.debug("%s %s %s", bottle.request.method, bottle.request.path, bottle.response.status_code)

    @app.get("/health")
    def health():
        """200 with a small status once the DICOM and HTTP listeners are up."""
        return {
            "status": "ok",
            "version": __version__,
            "aet": daemon.config.aet,
            "dicom_port": daemon.dicom.port,
            "http_port": daemon.http_port,
            "counts": daemon.index.counts(),
            "ingest": dataclasses.asdict(daemon.ingest.stats),
            "watch": {
                "folders": [str(f) for f in daemon.watcher.folders] if daemon.watcher else [],
                "pending": daemon.watcher.pending if daemon.watcher else 0,
                "reconciling": bool(daemon.reconciling or (daemon.watcher and daemon.watcher.reconciling)),
            },
        }

    return app


# ============================================================================================
# Daemon life cycle
# ============================================================================================


class Daemon:
    """Everything one dicoogled process runs, built from a Config."""

    def __init__(self, config: Config):
        self.config = config
        self.log = logging.getLogger("dicoogled")
        data_dir = config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.storage = Storage(data_dir, fsync=config.fsync)
        # Temporary files (spooled uploads, pynetdicom's) stay on the data disk: /tmp may be RAM.
        tempfile.tempdir = str(self.storage.tmp)
        self.index = Index(data_dir / "index.sqlite", on_connect=[register_search_functions])
        self.ingest = Ingest(self.index, self.storage, config.duplicates)
        self.finder = Finder(self.index)
        self.dicom = DicomServices(config, self.ingest, self.finder)
        self.watcher = None
        self.http_server = None
        self.http_port = None
        self.reconciling = 0
        self.stopped = threading.Event()

    def start(self):
        from waitress.server import create_server

        self.dicom.start()
        self.watcher = FolderWatcher(
            self.ingest, self.config.watch_folders, poll=self.config.watch_poll,
            poll_interval=self.config.watch_poll_interval, quiet_period=self.config.watch_quiet_period,
        )
        self.watcher.start()
        # Files stored before a crash but never indexed (never acknowledged either) get indexed.
        self.reconciling += 1
        start_thread("reconcile-storage", self._reconcile_storage)
        bottle.BaseRequest.MEMFILE_MAX = 16 * 1024 * 1024
        self.http_server = create_server(
            make_app(self), host=self.config.http_host, port=self.config.http_port,
            threads=self.config.http_threads, ident="dicoogled", clear_untrusted_proxy_headers=True,
        )
        self.http_port = int(self.http_server.effective_port)
        start_thread("http", self.http_server.run)
        self.log.info("HTTP listening on %s:%d", self.config.http_host, self.http_port)

    def _reconcile_storage(self):
        try:
            reconcile(self.ingest, self.storage.root, "store", self.stopped)
        finally:
            self.reconciling -= 1

    def stop(self):
        """Stop listening, finish the writes under way, close the index."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        self.log.info("stopping")
        if self.http_server:
            self.http_server.close()
        self.dicom.stop()
        if self.watcher:
            self.watcher.stop()
        self.index.close()
        self.log.info("stopped")

    def serve_forever(self):
        """Run until SIGTERM or SIGINT, then stop cleanly."""
        wake = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: wake.set())
        self.start()
        wake.wait()
        self.stop()


# ============================================================================================
# Command line
# ============================================================================================


def _configure_logging(level: str):
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.captureWarnings(True)
    # pynetdicom logs every PDU at INFO; keep its messages for problems only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level != "DEBUG" else logging.DEBUG)
    # Received objects are stored as they are; odd values must not flood the log or fail a read.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE


def _progress_bar(label: str):
    """A one-line progress bar on stderr, for terminals."""
    started = time.monotonic()

    def show(done: int, total: int):
        if total and (done == total or done % 25 == 0):
            width = 30
            filled = int(width * done / total)
            rate = done / max(time.monotonic() - started, 1e-6)
            sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} ({rate:.0f}/s)")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    return show


def _offline_archive(config: Config):
    index = Index(config.data_dir / "index.sqlite")
    return index, Ingest(index, Storage(config.data_dir, fsync=config.fsync), config.duplicates)


def command_index(config: Config, paths) -> int:
    """Index files and folders in place, without copying them."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    index, ingest = _offline_archive(config)
    try:
        for path in paths:
            path = pathlib.Path(path).resolve()
            if path.is_dir():
                index.write(Index.add_root, str(path))
                reconcile(ingest, path, "index", progress=_progress_bar(str(path)))
            elif path.is_file():
                ingest.index_file(path, "index")
            else:
                log.error("%s: no such file or folder", path)
                return 2
        print(json.dumps(dataclasses.asdict(ingest.stats)))
        return 0
    finally:
        index.close()


def command_reindex(config: Config) -> int:
    """Rebuild the index from the storage folder, the watched folders and indexed folders."""
    db_path = config.data_dir / "index.sqlite"
    roots = []
    if db_path.exists():
        with contextlib.suppress(apsw.Error):
            connection = apsw.Connection(str(db_path))
            roots = [r[0] for r in connection.execute("SELECT path FROM indexed_roots")]
            connection.close()
        for suffix in ("", "-wal", "-shm"):
            pathlib.Path(str(db_path) + suffix).unlink(missing_ok=True)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    index, ingest = _offline_archive(config)
    try:
        sources = [(ingest.storage.root, "store")] + [(f, "watch") for f in config.watch_folders] + [(pathlib.Path(r), "index") for r in roots]
        for root, origin in sources:
            if origin == "index":
                index.write(Index.add_root, str(root))
            if pathlib.Path(root).is_dir():
                reconcile(ingest, root, origin, progress=_progress_bar(str(root)))
        print(json.dumps({**index.counts(), **dataclasses.asdict(ingest.stats)}))
        return 0
    finally:
        index.close()


def command_check(config: Config) -> int:
    """Compare the index with the files on disk; exit 1 if they disagree."""
    index = Index(config.data_dir / "index.sqlite")
    problems = collections.Counter()
    try:
        for sop_uid, path, size, mtime in index.query("SELECT sop_instance_uid, path, size, mtime_ns FROM instances"):
            try:
                stat = os.stat(path)
            except OSError:
                problems["missing"] += 1
                print(f"missing: {path} ({sop_uid})")
                continue
            if (stat.st_size, stat.st_mtime_ns) != (size, mtime):
                problems["changed"] += 1
                print(f"changed: {path} ({sop_uid})")
        known = set(index.paths_under(str((config.data_dir / "storage").resolve())))
        for entry in walk_files((config.data_dir / "storage").resolve()):
            if entry.path not in known:
                problems["not indexed"] += 1
                print(f"not indexed: {entry.path}")
        summary = {"instances": index.counts()["instances"], **problems}
        print(json.dumps(summary))
        return 1 if problems else 0
    finally:
        index.close()


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicoogled", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dicoogled {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="INI configuration file (see conf/dicoogled.ini)")
    common.add_argument("--data-dir", metavar="DIR", type=pathlib.Path, help="storage, index and temp files (default ./data)")
    common.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", parents=[common], help="run the archive (the default)")
    serve.add_argument("--http-host")
    serve.add_argument("--http-port", type=int)
    serve.add_argument("--dicom-host")
    serve.add_argument("--dicom-port", type=int)
    serve.add_argument("--aet", help="our AE title (default DICOOGLED)")
    serve.add_argument("--watch", metavar="DIR", action="append", type=pathlib.Path, help="a folder to index in place (repeatable)")
    index = commands.add_parser("index", parents=[common], help="index files or folders in place, offline")
    index.add_argument("paths", nargs="+", metavar="PATH")
    commands.add_parser("reindex", parents=[common], help="rebuild the index from the files")
    commands.add_parser("check", parents=[common], help="verify the index against the files on disk")
    return parser


def main(argv=None) -> int:
    """The dicoogled command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("serve", "index", "reindex", "check", "-h", "--help", "--version"):
        argv.insert(0, "serve")
    args = _argument_parser().parse_args(argv)
    overrides = {"data_dir": args.data_dir, "log_level": args.log_level}
    if args.command == "serve":
        overrides.update(http_host=args.http_host, http_port=args.http_port, dicom_host=args.dicom_host,
                         dicom_port=args.dicom_port, aet=args.aet)
    try:
        config = Config.load(args.config, **overrides)
        if args.command == "serve" and args.watch:
            config.watch_folders = config.watch_folders + args.watch
    except ValueError as error:
        print(f"dicoogled: {error}", file=sys.stderr)
        return 2
    _configure_logging(config.log_level)
    if args.command == "index":
        return command_index(config, args.paths)
    if args.command == "reindex":
        return command_reindex(config)
    if args.command == "check":
        return command_check(config)
    try:
        daemon = Daemon(config)
    except (OSError, RuntimeError, apsw.Error) as error:
        log.error("cannot start: %s", error)
        return 1
    try:
        daemon.serve_forever()
    except OSError as error:
        log.error("cannot start: %s", error)
        daemon.stop()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
