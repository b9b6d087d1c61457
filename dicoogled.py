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
import base64
import collections
import concurrent.futures
import configparser
import contextlib
import contextvars
import copy
import csv
import ctypes
import dataclasses
import datetime
import errno
import fcntl
import functools
import hashlib
import hmac
import html
import http.client
import http.cookies
import importlib.metadata
import importlib.util
import inspect
import io
import ipaddress
import itertools
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import pathlib
import queue
import re
import secrets
import select
import selectors
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import types
import typing
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
import zlib
from xml.etree import ElementTree

# Run as a script, a file's whole syntax tree stays in memory (some 20 MB for this one) for as
# long as the script runs. So `python dicoogled.py` starts over, in the same process, as a program
# that imports dicoogled (from its cached bytecode) and runs main(), as the installed command does.
_COMMAND_PROGRAM = ("import os, sys; sys.path.insert(0, os.path.dirname(sys.argv[1])); sys.argv[:2] = ['dicoogled'];"
                    " import dicoogled; sys.exit(dicoogled.main())")
if __name__ == "__main__" and __spec__ is None and os.name == "posix":
    _interpreter_options = sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv)]  # -X dev, -u, ...
    os.execv(sys.executable, [sys.executable, *_interpreter_options, "-c", _COMMAND_PROGRAM, os.path.abspath(__file__),
                              *sys.argv[1:]])

# The dicoogled command keeps numpy, Pillow and the pixel codecs out of its own process: pydicom
# would import them along with itself (and, to download its test files, requests and tqdm).
# Pixels are decoded in a worker process instead (see "Codec worker"), which imports dicoogled
# as a module and gets them as usual, as does any program that imports dicoogled (the tests).
# Blocked only while the libraries below are imported: pydicom then works without them here,
# and a plugin that imports one of them still can (its memory is then the daemon's).
_KEPT_OUT_OF_THE_DAEMON = ("numpy", "PIL", "pylibjpeg", "openjpeg", "libjpeg", "rle", "jpeg_ls", "gdcm",
                           "requests", "tqdm")
_RUN_AS_COMMAND = __name__ == "__main__" or os.path.basename(sys.argv[0]) == "dicoogled"
if sys.argv[1:2] == ["sample-data"]:  # it compresses pixels itself, in its own short-lived process
    _RUN_AS_COMMAND = False
_blocked = [name for name in _KEPT_OUT_OF_THE_DAEMON if name not in sys.modules] if _RUN_AS_COMMAND else []
sys.modules.update(dict.fromkeys(_blocked))  # None there: `import numpy` raises ImportError

import apsw
import bottle
import pydicom
import pydicom.config
import pydicom.uid
from lupa import lua54 as lupa_lua54
from markdown_it import MarkdownIt
from pydicom.charset import convert_encodings, decode_bytes, default_encoding
from pydicom.datadict import DicomDictionary, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pynetdicom import StoragePresentationContexts, _config as pynetdicom_config, build_context
from pynetdicom.dimse_messages import (
    C_CANCEL_RQ, C_ECHO_RQ, C_ECHO_RSP, C_FIND_RQ, C_FIND_RSP, C_GET_RQ, C_GET_RSP, C_MOVE_RQ, C_MOVE_RSP,
    C_STORE_RQ, C_STORE_RSP, N_ACTION_RQ, N_ACTION_RSP, N_CREATE_RQ, N_CREATE_RSP, N_EVENT_REPORT_RQ,
    N_EVENT_REPORT_RSP, N_SET_RQ, N_SET_RSP, _COMMAND_SET_KEYWORDS, _DATASET_KEYWORDS, _MESSAGE_TYPES,
)
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE, N_ACTION, N_CREATE, N_SET
from pynetdicom.dsutils import decode as pynetdicom_decode, encode as pynetdicom_encode
from pynetdicom.pdu import (
    A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ, A_RELEASE_RP, A_RELEASE_RQ,
)
from pynetdicom.pdu_primitives import (
    A_ABORT, A_ASSOCIATE, A_P_ABORT, AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification, ImplementationVersionNameNotification, MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import negotiate_as_acceptor, negotiate_as_requestor
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from watchdog.events import (
    DirDeletedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent, FileDeletedEvent,
    FileModifiedEvent, FileMovedEvent, FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver
from pynetdicom.sop_class import (
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    StorageCommitmentPushModel,
    Verification,
)

for _name in _blocked:
    del sys.modules[_name]

log = logging.getLogger("dicoogled")

# ============================================================================================
# Constants: DICOM status codes, transfer syntaxes, defaults
# ============================================================================================

SUCCESS = 0x0000
PENDING = 0xFF00
PENDING_OPTIONAL_KEYS_UNSUPPORTED = 0xFF01
CANCELLED = 0xFE00
OUT_OF_RESOURCES = 0xA700
#: What a store does when a [storage] quota is reached: answer OUT_OF_RESOURCES, or delete the
#: unprotected studies that arrived longest ago until the new object fits.
WHEN_FULL_POLICIES = ("refuse", "recycle")
#: Origins of objects the archive keeps in its own storage (C-STORE, STOW-RS, POST /import); the
#: others are indexed in place, and neither counted in a quota nor ever deleted by recycling or retention.
RECEIVED_ORIGINS = ("store", "stow", "import")
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH = 0xA900
# C-STORE failures, from PS3.4 B.2.3: a data set that is not the one its command announces (another
# SOP Class or SOP Instance UID) is "Data Set does not match SOP Class" (A9xx, the error for a data
# set that is not an instance of the class named); one that cannot be parsed at all (truncated,
# malformed, without its UIDs) is "Cannot understand" (Cxxx). Both say why in an Error Comment.
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
UNABLE_TO_PROCESS = 0xC001  # C-FIND/MOVE/GET: the identifier cannot be processed
STORE_REFUSED_INVALID_UID = 0xC002
SUBOPERATIONS_FAILED = 0xB000

#: The results an audit log entry records (section "Audit log"): done, refused (not allowed), failed.
AUDIT_OK, AUDIT_REFUSED, AUDIT_FAILED = "ok", "refused", "failed"

# N-CREATE/N-SET failures (PS3.7 C.4.2.1 and 10.1.5: the DIMSE-N statuses), as MPPS answers them.
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_OBJECT_INSTANCE = 0x0112
MISSING_ATTRIBUTE = 0x0120
#: What a calling AE may be allowed to ask for ([modalities] allow=); C-ECHO is always allowed.
#: commitment is Storage Commitment (N-ACTION), worklist the Modality Worklist C-FIND, mpps the
#: Modality Performed Procedure Step N-CREATE/N-SET.
DICOM_SERVICES = ("store", "find", "move", "get", "commitment", "worklist", "mpps")
#: TLS versions tls_minimum_version may name (BCP 195, which PS3.15 B.9 follows, wants 1.2 at least).
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

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
#: Transfer syntaxes a data set is re-encoded between when the peer accepts the other one.
CONVERTIBLE_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
#: Lossless compressed syntaxes an instance is encoded to (in a codec worker) for a peer that
#: accepts neither its stored syntax nor an uncompressed one: RLE, JPEG-LS, JPEG 2000 lossless.
LOSSLESS_ENCODINGS = ("1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90")
#: The transfer syntaxes a SOP class may be limited to, by UID, with Dicoogle's names for them
#: (its web app and clients send the name), in Dicoogle's order; HTJ2K is ours.
TRANSFER_SYNTAX_NAMES = {
    "1.2.840.10008.1.2": "ImplicitVRLittleEndian",
    "1.2.840.10008.1.2.1": "ExplicitVRLittleEndian",
    "1.2.840.10008.1.2.1.99": "DeflatedExplicitVRLittleEndian",
    "1.2.840.10008.1.2.2": "ExplicitVRBigEndian",
    "1.2.840.10008.1.2.4.70": "JPEGLossless",
    "1.2.840.10008.1.2.4.80": "JPEGLSLossless",
    "1.2.840.10008.1.2.4.57": "JPEGLosslessNonHierarchical14",
    "1.2.840.10008.1.2.4.90": "JPEG2000LosslessOnly",
    "1.2.840.10008.1.2.4.50": "JPEGBaseline1",
    "1.2.840.10008.1.2.4.51": "JPEGExtended24",
    "1.2.840.10008.1.2.4.81": "JPEGLSLossyNearLossless",
    "1.2.840.10008.1.2.4.91": "JPEG2000",
    "1.2.840.10008.1.2.5": "RLELossless",
    "1.2.840.10008.1.2.4.100": "MPEG2",
    "1.2.840.10008.1.2.4.201": "HTJ2KLossless",
    "1.2.840.10008.1.2.4.203": "HTJ2K",
}

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: Written in the file meta of every stored object: pydicom's generate_uid(entropy_srcs=['dicoogled implementation']).
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.25379647146804113726755947804195104528"
IMPLEMENTATION_VERSION_NAME = "DICOOGLED_" + __version__.replace(".", "")
#: Explicit VRs with two reserved bytes and a 4-byte length (PS3.5 7.1.2); all others are SHORT_LENGTH_VRS.
LONG_LENGTH_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
SHORT_LENGTH_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
                              b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_DATA_TAG = 0x7FE00010
ITEM_TAG, ITEM_DELIMITATION_TAG, SEQUENCE_DELIMITATION_TAG = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "US or OW"})
DATE_TIME_VRS = frozenset({"DA", "TM", "DT"})
NUMBER_VRS = {"US": int, "UL": int, "SS": int, "SL": int, "UV": int, "SV": int, "FL": float, "FD": float}

DEFAULT_CONFIG = """\
# dicoogled configuration. Every setting is shown with its default.
# A file given with --config may hold only some sections. Settings changed from the web app or
# the REST API are saved in data_dir/settings.ini, in this format, which is read after this file;
# command-line flags override both. Delete settings.ini to return to this file's settings. (With
# the index in PostgreSQL they are saved in its database instead, where every node reads them.)

[dicom]
# Application Entity title of this archive, and the DICOM listener.
aet = DICOOGLED
host = 0.0.0.0
port = 11112
# Open the listener at startup (false: closed until started from the web app).
autostart = true
# A called AE title other than ours is accepted with a warning naming the right one,
# unless strict_called_aet is true (then the association is rejected).
strict_called_aet = false
# Who may use the DICOM service: any calling AE (the default, as at every PACS), or with
# refuse_unknown_calling_aets = true only the AEs listed under [modalities], each limited to what
# its allow= says. allowed_calling_aets, the older way (AE titles separated by spaces; empty
# allows any), wins when set: only the AEs it lists may associate, whatever else says.
refuse_unknown_calling_aets = false
allowed_calling_aets =
# Calling AEs that query and retrieve as a user or a group: AET=user:NAME or AET=group:NAME,
# separated by spaces. Such an AE's C-FIND, C-MOVE and C-GET see only that user's (or group's)
# collections, as the web app would show them; an AE not named here sees the whole archive.
calling_ae_access =
# Limits: simultaneous associations, maximum PDU we receive and send (0 = unlimited, or as the
# peer accepts), timeouts in seconds: association negotiation, DIMSE response, idle association,
# and TCP connect for associations we open (C-MOVE, sending).
max_associations = 16
max_pdu = 262144
max_pdu_send = 0
acse_timeout = 30
dimse_timeout = 60
network_timeout = 120
connection_timeout = 30
# Seconds a new connection has to send its whole A-ASSOCIATE-RQ; until it has, it is no
# association and does not count against max_associations (port scans, TCP health checks).
association_request_timeout = 5
# Most C-FIND matches returned for one request (0 = all).
max_find_results = 0
# Worker processes that serve storage associations, so that several use every core (0: none,
# all in the daemon's process). Each takes about 60 MB. See "Ingest on every core" in README.md.
workers = 0
# DICOM over TLS (PS3.15 B.1) on a second port; the plain port stays. 0 leaves it closed. The
# certificate and its private key are PEM files (dicoogled make-cert DIR makes a lab's). With a CA
# certificate set, a client must present a certificate it signed (mutual TLS), and destinations
# marked tls under [modalities] must present one too; we present ours to them. The lowest TLS
# version accepted, both ways: 1.2 or 1.3.
tls_port = 0
tls_certificate =
tls_private_key =
tls_ca_certificate =
tls_minimum_version = 1.2
# Per-AE certificates: true refuses a TLS client whose certificate's common name is not its
# calling AE title (make-cert --ae AET makes such certificates), so one modality's certificate
# cannot speak for another AE. Needs tls_ca_certificate.
tls_certificate_names_ae = false

[http]
# The HTTP listener (REST API, DICOMweb, web app) and how many requests it serves at once.
host = 0.0.0.0
port = 8080
threads = 8
# Patient data and every write need a login. On a closed lab network, true opens the
# read-only endpoints (search, dump, images, files) to anyone who can reach the port.
allow_unauthorized = false
# Collections (labels with members): a user given read or write on one sees only the studies of
# its collections. A user (or anonymous reader) with no collection sees every study when this is
# false, none when it is true. Administrators always see everything.
restrict_to_collections = false
# A login token expires this many minutes after its last use (fractions too: 0.5 is 30 s).
session_idle_minutes = 720
# The address users reach this server by, when it is not the one it listens on: behind a reverse
# proxy that serves HTTPS, e.g. https://pacs.example.org/dicoogled (no trailing slash). Links and
# DICOMweb's RetrieveURL are built from it instead of the request's Host header.
public_url =
# The address of the reverse proxy or load balancer in front (one IP address; * for any peer,
# only if nothing else can reach the port): the client address it appends to X-Forwarded-For is
# then the one failed logins are counted by and the audit log names. Empty: the peer's own
# address, and X-Forwarded-For is ignored.
trusted_proxy =

[storage]
# Where received objects, the index and temporary files live (local disk: SQLite WAL needs it).
data_dir = ./data
# A received instance whose SOPInstanceUID is already stored with different bytes:
# keep (the first one stays, the default) or overwrite (the new one replaces it).
duplicates = keep
# fsync every received file before acknowledging it (safe against power loss).
fsync = true
# Where received objects go: file (the storage folder in data_dir), or the URI scheme of an
# enabled storage plugin (docs/plugins.md). If that plugin is missing or fails, a file it is.
scheme = file
# Free space, in MB, kept on the data disk: below it new objects are refused (DICOM status
# 0xA700, out of resources) before the disk is really full, so the index, settings and logins
# still have room. Storing resumes by itself once space is freed. 0 turns the reserve off.
min_free_mb = 100
# Quotas on what the archive holds of received objects (C-STORE, STOW-RS, import; files indexed in
# place are not counted): megabytes and instances, 0 for no limit.
max_size_mb = 0
max_instances = 0
# When a quota is reached: refuse new objects (C-STORE 0xA700, STOW-RS 409 with reason A700),
# or recycle: delete the studies that arrived longest ago, unprotected ones only, until the new
# object fits (PUT /studies/{uid}/protected protects one).
when_full = refuse
# Labels that protect what carries them from recycling and [retention] rules, separated by
# spaces: a study carrying one, on itself or on one of its series, is never deleted by either.
protected_labels =
# Hours between two runs of the [retention] rules (the first run comes at start).
retention_interval_hours = 24

[watch]
# Folders indexed in place, one per line; files are never copied or changed.
folders =
# Watch them (false keeps the list but stops watching: Dicoogle's watcher switch).
enabled = true
# Use polling instead of inotify (for network shares), and its interval in seconds.
poll = false
poll_interval = 5
# A file is indexed once its size has not changed for this many seconds (or at once when
# inotify reports it closed after writing).
quiet_period = 2

[archives]
# ZIP files imported by POST /import (or the web app's Import): refused whole (413) when they
# would unpack to more than import_max_unpacked_mb, or, beyond 16 MB, to more than
# import_max_ratio times their own size (a "zip bomb"; DICOM rarely packs better than 10 to 1).
import_max_unpacked_mb = 20480
import_max_ratio = 100
# Most instances in one download as DICOM media (a DICOMDIR): pydicom's FileSet, which builds
# it, takes time that grows with the square of their number (about 40 s for 2000) before the
# first byte is sent. Larger sets download as plain ZIP files.
media_max_instances = 2000

[index]
# Dicoogle's indexer options, as its web app shows them. dicoogled always indexes every element
# and renders no thumbnails when indexing: these are kept for Dicoogle's clients. thumbnail_size
# is the longest edge, in pixels, of /dic2png?thumbnail=true (made on first request, then cached).
thumbnails = false
thumbnail_size = 64
effort = 100
# Where the index lives. Empty: the SQLite file data_dir/index.sqlite, right for one machine. A
# postgresql://user@host/db URL (the postgresql extra: .venv/bin/pip install -e '.[postgresql]') is
# for a site that outgrows one machine, where several dicoogled nodes share one database and data_dir.
# The users, their sessions, the audit log and the settings changed at run time live there too.
url =

[node]
# This process's name among the nodes sharing a PostgreSQL index and data_dir: its temporary files,
# caches and lock live in data_dir/nodes/NAME. Letters, digits, '.', '_', '-'; empty means
# HOSTNAME-HTTPPORT. Unused with the SQLite index (one node: data_dir/tmp and data_dir/cache).
name =

[codecs]
# Pixel data is decoded (thumbnails, /dic2png, DICOMweb's rendered images, frames and transcoding)
# in worker processes, not in the daemon: numpy, Pillow and the codecs stay out of its memory, and
# a codec that crashes or hangs on a hostile file fails one request, not the archive. How many
# workers may run at once; each starts on first use and ends after idle_seconds without a
# request; one whose request takes more than timeout seconds is ended, and the request fails.
workers = 1
idle_seconds = 60
timeout = 60

[plugins]
# Folders of plugin scripts (*.py, *.lua), one per line; empty means the plugins/ folder
# beside dicoogled.py. Python plugins are trusted code; Lua plugins run sandboxed.
folders =
# A study is stable once it has received no new instance for this many seconds: on_stable_study
# and the stable_study webhook event fire then, and again after a later instance.
stable_age = 60
# A plugin's settings go in a section of its own, [plugin.NAME], e.g.
# [plugin.autoroute]
# enabled = true
# destination = WORKSTATION

[webhooks]
# HTTP(S) URLs told of events, one per line: NAME = url=URL events=stable_study,stored
# secret_file=PATH (or secret=TEXT), optionally timeout=SECONDS (per attempt, 10),
# retry=FIRST..MAX (seconds before retrying, doubled after each failure: 5..600) and attempts=N
# (then given up: 50). The body is JSON {event, id, time, data}, signed in the header
# X-Dicoogled-Signature: sha256=HMAC-SHA256(secret, body). Deliveries wait in the index, so a
# restart loses none; GET /management/webhooks is their log. stable_study fires [plugins]
# stable_age seconds after a study's last instance; stored for each instance received.
# ris = url=https://ris.example.org/dicoogled events=stable_study secret_file=/etc/dicoogled/ris.secret

[log]
# DEBUG, INFO, WARNING or ERROR.
level = INFO

[audit]
# The audit log (data_dir/audit.sqlite, GET /audit): who searched, viewed, downloaded, exported,
# sent, stored, deleted, labelled or changed what, and when. UIDs only, never patient names.
enabled = true
# Entries older than this many days are deleted (checked every hour); 0 keeps them all.
retention_days = 2190

[transfer_syntaxes]
# Storage SOP classes limited to some transfer syntaxes: SOP Class UID = transfer syntax UIDs,
# separated by spaces. A class not listed is accepted in any transfer syntax, as sent.
# 1.2.840.10008.5.1.4.1.1.2 = 1.2.840.10008.1.2.1 1.2.840.10008.1.2.4.70

[modalities]
# Known remote AEs, the C-MOVE destinations: AET = host:port, optionally followed by public
# or private (Dicoogle's flag), allow= and a description. allow= lists what the AE may ask
# for as a calling AE: some of store,find,move,get,commitment,worklist,mpps separated by commas,
# or none (C-ECHO is always allowed); without it, everything. commitment is Storage Commitment,
# whose report goes to this host:port when the AE has released its association by then. tls
# sends to it over DICOM TLS (see tls_port).
# WORKSTATION = 192.168.1.20:11112
# VIEWER = 192.168.1.22:2762 tls Viewer that only speaks TLS
# WEASIS = 192.168.1.21:104 public Reading room viewer
# CT01 = 192.168.1.30:104 allow=store Scanner in room 2

[retention]
# Rules that delete received studies, one per line: NAME = criteria separated by spaces, all of
# which a study must meet. older_than_days=N (required): its newest instance arrived more than
# N days ago; modality=MR: it has a series of that modality; origin=store, stow or import: all
# of it came by C-STORE, by STOW-RS, or by POST /import; label=NAME: it carries that label (on
# itself or a series).
# Protected studies, and those carrying a protected_labels label, are never deleted. Run every
# retention_interval_hours; 'dicoogled retention --dry-run' lists what they would delete.
# old-mr = older_than_days=365 modality=MR
# last-term = older_than_days=180 label=course-2026
"""

# ============================================================================================
# Small helpers: validation, threads, text
# ============================================================================================

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
AE_TITLE_PATTERN = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII, no backslash
URI_SCHEME_PATTERN = re.compile(r"[a-z][a-z0-9+.-]*")  # RFC 3986, lower case
HOST_PATTERN = re.compile(r"^[A-Za-z0-9._:%\[\]-]{1,253}$")  # a host name, IPv4 or IPv6 address
#: [node] name: it names a folder (data_dir/nodes/NAME), so one path component, never . or ..
NODE_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
#: A label on studies and series: lower-case letters, digits, '.', '_' and '-', 1 to 64 characters,
#: starting with a letter or digit. Labels are case-insensitive: what is given is stored lower-cased.
#: The set leaves out '*', '?' and '[' (the search language's and SQLite GLOB's wildcards), ':'
#: (label:NAME) and '/' (a REST path segment).
LABEL_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def is_valid_uid(uid: str) -> bool:
    """True for a UID that is safe to use as a file name: digits and dots, at most 64 chars."""
    return bool(uid) and len(uid) <= 64 and bool(UID_PATTERN.match(uid))


def is_valid_ae_title(aet: str) -> bool:
    return bool(AE_TITLE_PATTERN.match(aet)) and bool(aet.strip())


#: A user name, and a group name: what a collection is granted to.
USERNAME_PATTERN = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")


def label_name(text: str) -> str:
    """A label as it is stored (lower-cased); ValueError, with a reason fit for the caller, if it
    is not a valid label."""
    label = str(text).strip().lower()
    if not LABEL_PATTERN.fullmatch(label):
        raise ValueError(f"{str(text)[:80]!r} is not a label: 1 to 64 of a-z, 0-9, '.', '_', '-', "
                         "starting with a letter or digit (case does not matter)")
    return label


def location_scheme(location: str) -> str:
    """Where an indexed instance lives: "file" for a path, else its URI's scheme ("s3:...")."""
    scheme = URI_SCHEME_PATTERN.match(location)
    return scheme.group() if scheme and location[scheme.end():scheme.end() + 1] == ":" else "file"


def _file_uri(path: str) -> str:
    """The URI of an indexed location: file:///... for a path; a storage plugin's URI as it is."""
    if location_scheme(path) != "file":
        return path
    return pathlib.Path(path).as_uri() if os.path.isabs(path) else "file:" + path


def _location_from_uri(uri: str) -> str:
    """The indexed location a URI names: the path of a file: URI; a storage plugin's URI (or a
    plain path, as plugins written before URIs pass) as it is."""
    if uri.startswith("file:"):
        parsed = urllib.parse.urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"only local file: URIs name a stored instance, not {uri[:80]!r}")
        return urllib.parse.unquote(parsed.path)
    return uri


def _snake_case(keyword: str) -> str:
    """SQL column name for a DICOM keyword: PatientBirthDate -> patient_birth_date."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", keyword).lower()


def _fold(text: str) -> str:
    """Case- and accent-insensitive form of a name, as FTS5's unicode61 tokenizer sees it."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


_tokenizers = threading.local()


def _fts_tokens(text: str) -> list[str]:
    """The tokens FTS5's unicode61 tokenizer makes of text: its own tokenizer splits query
    words, so they are exactly the words the index holds (ß and ё stay as they are there)."""
    tokenizer = getattr(_tokenizers, "unicode61", None)
    if tokenizer is None:  # an apsw connection serves one thread at a time: one per thread
        connection = apsw.Connection(":memory:")
        tokenizer = _tokenizers.unicode61 = connection.fts5_tokenizer("unicode61", ["remove_diacritics", "2"])
        _tokenizers.connection = connection
    return [token for *_, token in tokenizer(text.encode("utf-8", "surrogatepass"), apsw.FTS5_TOKENIZE_QUERY, None)]


def _fts_phrase(tokens: list[str], prefix: bool = False) -> str:
    """A safe FTS5 phrase: every token quoted, so no user text is ever FTS5 syntax."""
    quoted = '"' + " ".join(tokens).replace('"', '""') + '"'
    return quoted + ("*" if prefix else "")


def fsync_folder(folder: pathlib.Path):
    """Flush a folder's entries to disk: a file renamed or created into it is durable only once
    its folder is (POSIX; some file systems do it with the next fsync anyway, others never)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folders(folder: pathlib.Path) -> list[pathlib.Path]:
    """mkdir -p: the folders it made, outermost first (their parents' entries are new)."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir(exist_ok=True)
    return list(reversed(missing))


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


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogTail(logging.Handler):
    """The last `lines` lines logged, kept in memory for GET /logger."""

    def __init__(self, lines: int = 2000):
        super().__init__()
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self._lines = collections.deque(maxlen=lines)

    def emit(self, record):
        try:
            self._lines.extend(self.format(record).splitlines())  # deque appends are thread-safe
        except Exception:
            self.handleError(record)

    def text(self) -> str:
        return "".join(line + "\n" for line in list(self._lines))


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
    if data[132:136] == b"\x02\x00\x00\x00" and data[136:138] == b"UL" and len(data) >= 144:
        return 144 + struct.unpack("<I", data[140:144])[0]
    return 132


# ============================================================================================
# Configuration
# ============================================================================================


class _ConfigParser(configparser.ConfigParser):
    """A ConfigParser whose conversion errors name the setting: "[dicom] port = 'eleven': ..."."""

    def _named(self, convert, section, option, **kwargs):
        try:
            return convert(section, option, **kwargs)
        except ValueError as error:
            raise ValueError(f"[{section}] {option} = {self.get(section, option)!r}: {error}") from None

    def getint(self, section, option, **kwargs):
        return self._named(super().getint, section, option, **kwargs)

    def getfloat(self, section, option, **kwargs):
        return self._named(super().getfloat, section, option, **kwargs)

    def getboolean(self, section, option, **kwargs):
        return self._named(super().getboolean, section, option, **kwargs)


def _parse_ae_principals(text: str) -> dict[str, tuple[str, str]]:
    """[dicom] calling_ae_access: AET=user:NAME or AET=group:NAME, separated by spaces."""
    principals = {}
    for word in text.split():
        aet, _, principal = word.partition("=")
        kind, _, name = principal.partition(":")
        if not aet or len(aet) > 16 or kind not in ("user", "group") or not USERNAME_PATTERN.fullmatch(name):
            raise ValueError(f"{word[:80]!r} is not AET=user:NAME or AET=group:NAME")
        principals[aet] = (kind, name)
    return principals


#: How a setting's text becomes its value: reader(parser, section, key).
_CONFIG_READERS = {
    "text": lambda parser, section, key: parser.get(section, key),
    "word": lambda parser, section, key: parser.get(section, key).strip(),
    "lower": lambda parser, section, key: parser.get(section, key).strip().lower(),
    "upper": lambda parser, section, key: parser.get(section, key).strip().upper(),
    "words": lambda parser, section, key: parser.get(section, key).split(),
    "labels": lambda parser, section, key: tuple(label_name(word) for word in parser.get(section, key).split()),
    "ae_principals": lambda parser, section, key: _parse_ae_principals(parser.get(section, key)),
    "int": lambda parser, section, key: parser.getint(section, key),
    "float": lambda parser, section, key: parser.getfloat(section, key),
    "bool": lambda parser, section, key: parser.getboolean(section, key),
    "path": lambda parser, section, key: pathlib.Path(parser.get(section, key)),
    "paths": lambda parser, section, key: [pathlib.Path(p) for p in parser.get(section, key).splitlines() if p.strip()],
}

#: Where each plain setting lives in the INI files, and how it is read: Config attribute ->
#: (section, key, reader). Config.load reads them from here, and settings changed at run time
#: are written back to the same keys. (The [modalities], [transfer_syntaxes] and [plugin.NAME]
#: sections, and [plugins] folders with its default, are read by Config.load itself.)
CONFIG_KEYS = {
    "aet": ("dicom", "aet", "word"),
    "dicom_host": ("dicom", "host", "text"),
    "dicom_port": ("dicom", "port", "int"),
    "strict_called_aet": ("dicom", "strict_called_aet", "bool"),
    "refuse_unknown_calling_aets": ("dicom", "refuse_unknown_calling_aets", "bool"),
    "allowed_calling_aets": ("dicom", "allowed_calling_aets", "words"),
    "calling_ae_access": ("dicom", "calling_ae_access", "ae_principals"),
    "max_associations": ("dicom", "max_associations", "int"),
    "dicom_workers": ("dicom", "workers", "int"),
    "max_pdu": ("dicom", "max_pdu", "int"),
    "acse_timeout": ("dicom", "acse_timeout", "float"),
    "dimse_timeout": ("dicom", "dimse_timeout", "float"),
    "network_timeout": ("dicom", "network_timeout", "float"),
    "connection_timeout": ("dicom", "connection_timeout", "float"),
    "association_request_timeout": ("dicom", "association_request_timeout", "float"),
    "max_pdu_send": ("dicom", "max_pdu_send", "int"),
    "dicom_autostart": ("dicom", "autostart", "bool"),
    "max_find_results": ("dicom", "max_find_results", "int"),
    "tls_port": ("dicom", "tls_port", "int"),
    "tls_certificate": ("dicom", "tls_certificate", "word"),
    "tls_private_key": ("dicom", "tls_private_key", "word"),
    "tls_ca_certificate": ("dicom", "tls_ca_certificate", "word"),
    "tls_minimum_version": ("dicom", "tls_minimum_version", "word"),
    "tls_certificate_names_ae": ("dicom", "tls_certificate_names_ae", "bool"),
    "http_host": ("http", "host", "text"),
    "http_port": ("http", "port", "int"),
    "http_threads": ("http", "threads", "int"),
    "allow_unauthorized": ("http", "allow_unauthorized", "bool"),
    "restrict_to_collections": ("http", "restrict_to_collections", "bool"),
    "session_idle_minutes": ("http", "session_idle_minutes", "float"),
    "public_url": ("http", "public_url", "word"),
    "trusted_proxy": ("http", "trusted_proxy", "word"),
    "data_dir": ("storage", "data_dir", "path"),
    "duplicates": ("storage", "duplicates", "word"),
    "fsync": ("storage", "fsync", "bool"),
    "storage_scheme": ("storage", "scheme", "lower"),
    "min_free_mb": ("storage", "min_free_mb", "float"),
    "max_size_mb": ("storage", "max_size_mb", "float"),
    "max_instances": ("storage", "max_instances", "int"),
    "protected_labels": ("storage", "protected_labels", "labels"),
    "when_full": ("storage", "when_full", "lower"),
    "retention_interval_hours": ("storage", "retention_interval_hours", "float"),
    "import_max_unpacked_mb": ("archives", "import_max_unpacked_mb", "float"),
    "import_max_ratio": ("archives", "import_max_ratio", "float"),
    "media_max_instances": ("archives", "media_max_instances", "int"),
    "watch_folders": ("watch", "folders", "paths"),
    "watch_poll": ("watch", "poll", "bool"),
    "watch_poll_interval": ("watch", "poll_interval", "float"),
    "watch_quiet_period": ("watch", "quiet_period", "float"),
    "watch_enabled": ("watch", "enabled", "bool"),
    "thumbnails": ("index", "thumbnails", "bool"),
    "thumbnail_size": ("index", "thumbnail_size", "int"),
    "index_effort": ("index", "effort", "int"),
    "index_url": ("index", "url", "word"),
    "node_name": ("node", "name", "word"),
    "codec_workers": ("codecs", "workers", "int"),
    "codec_idle_seconds": ("codecs", "idle_seconds", "float"),
    "codec_timeout": ("codecs", "timeout", "float"),
    "log_level": ("log", "level", "upper"),
    "audit_enabled": ("audit", "enabled", "bool"),
    "audit_retention_days": ("audit", "retention_days", "float"),
    "stable_age": ("plugins", "stable_age", "float"),
}


@dataclasses.dataclass
class Config:
    """Every setting of the daemon. Built from the embedded defaults, a file, then flags."""

    aet: str = "DICOOGLED"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = 11112
    strict_called_aet: bool = False
    refuse_unknown_calling_aets: bool = False
    allowed_calling_aets: list[str] = dataclasses.field(default_factory=list)
    #: Calling AE title -> ("user" or "group", name): whose collections its queries and retrieves see.
    calling_ae_access: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    max_associations: int = 16
    dicom_workers: int = 0  #: worker processes for storage associations (0: none)
    max_pdu: int = 262144
    acse_timeout: float = 30
    dimse_timeout: float = 60
    network_timeout: float = 120
    connection_timeout: float = 30
    association_request_timeout: float = 5
    max_pdu_send: int = 0
    dicom_autostart: bool = True
    max_find_results: int = 0
    tls_port: int = 0
    tls_certificate: str = ""
    tls_private_key: str = ""
    tls_ca_certificate: str = ""
    tls_minimum_version: str = "1.2"
    #: A TLS client's certificate must name its calling AE title (common name).
    tls_certificate_names_ae: bool = False
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    http_threads: int = 8
    allow_unauthorized: bool = False
    #: A user with no collection (and an anonymous reader) sees nothing, instead of everything.
    restrict_to_collections: bool = False
    session_idle_minutes: float = 720
    public_url: str = ""
    #: The proxy whose X-Forwarded-For names the client (an IP address, or *), or "".
    trusted_proxy: str = ""
    data_dir: pathlib.Path = pathlib.Path("./data")
    duplicates: str = "keep"
    fsync: bool = True
    storage_scheme: str = "file"
    min_free_mb: float = 100
    max_size_mb: float = 0
    max_instances: int = 0
    #: Labels whose studies recycling and retention rules never delete.
    protected_labels: tuple[str, ...] = ()
    when_full: str = "refuse"
    retention_interval_hours: float = 24
    #: [retention] rules by name
    retention_rules: dict[str, "RetentionRule"] = dataclasses.field(default_factory=dict)
    #: [archives] limits on a ZIP file imported: unpacked megabytes, and unpacked size / packed size.
    import_max_unpacked_mb: float = 20480
    import_max_ratio: float = 100
    #: [archives] the most instances in one download as DICOM media.
    media_max_instances: int = 2000
    watch_folders: list[pathlib.Path] = dataclasses.field(default_factory=list)
    watch_poll: bool = False
    watch_poll_interval: float = 5
    watch_quiet_period: float = 2
    watch_enabled: bool = True
    thumbnails: bool = False
    thumbnail_size: int = 64
    index_effort: int = 100
    #: The index's PostgreSQL URL; empty for the SQLite file in data_dir.
    index_url: str = ""
    #: [node] name: this process among the nodes sharing a PostgreSQL index; empty: HOSTNAME-HTTPPORT.
    node_name: str = ""
    codec_workers: int = 1
    codec_idle_seconds: float = 60
    codec_timeout: float = 60
    log_level: str = "INFO"
    audit_enabled: bool = True
    #: Days an audit entry is kept; 0: for ever. Six years by default (HIPAA keeps records that long).
    audit_retention_days: float = 2190
    plugin_folders: list[pathlib.Path] = dataclasses.field(default_factory=list)
    stable_age: float = 60
    #: [plugin.NAME] sections: plugin name -> {setting: text}
    plugin_settings: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    #: C-MOVE destinations: AE title -> (host, port).
    modalities: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    #: Dicoogle's extras of the destinations that have them: AE title -> (public, description).
    modality_details: dict[str, tuple[bool, str]] = dataclasses.field(default_factory=dict)
    #: What the [modalities] AEs whose entry says allow= may ask for: AE title -> some of DICOM_SERVICES.
    modality_services: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    #: The [modalities] AEs whose entry says tls: associations with them are DICOM TLS.
    tls_modalities: frozenset[str] = frozenset()
    #: Storage SOP classes limited to some transfer syntaxes: SOP Class UID -> transfer syntax UIDs.
    transfer_syntaxes: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: [webhooks]: hook name -> where and what it is sent.
    webhooks: dict[str, "Webhook"] = dataclasses.field(default_factory=dict)
    #: The file settings were read from, if any.
    config_file: pathlib.Path | None = None
    #: The overrides load() was given (the command-line flags), so they win again when the
    #: settings are read afresh (another node changed the shared ones).
    command_line: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, path=None, add_watch_folders=(), add_plugin_folders=(), **overrides) -> "Config":
        """Read the embedded defaults, then the INI file at path, then the settings changed at
        run time (data_dir/settings.ini, or the PostgreSQL index's table of them), then non-None
        overrides (the command-line flags); folders to add (--watch, --plugins-dir) come last."""
        # A ';' after a value starts a comment (configparser would otherwise keep it in the value).
        parser = _ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
        parser.optionxform = str  # AE titles in [modalities] are case-sensitive
        parser.read_string(DEFAULT_CONFIG)
        if path:
            path = pathlib.Path(path)
            if not path.is_file():
                raise ValueError(f"config file {path} does not exist")
            try:
                parser.read(path, encoding="utf-8")
            except (configparser.Error, UnicodeDecodeError) as error:
                raise ValueError(f"invalid configuration in {path}: {error}") from None
        data_dir = overrides.get("data_dir") or parser.get("storage", "data_dir")
        index_url = overrides.get("index_url") or parser.get("index", "url").strip()
        _lay_settings(parser, _saved_settings(index_url or pathlib.Path(data_dir)))
        try:
            config = cls(
                **{name: _CONFIG_READERS[kind](parser, section, key) for name, (section, key, kind) in CONFIG_KEYS.items()},
                plugin_folders=_CONFIG_READERS["paths"](parser, "plugins", "folders")
                or [pathlib.Path(__file__).resolve().parent / "plugins"],
                plugin_settings={section[len("plugin."):]: dict(parser.items(section)) for section in parser.sections()
                                 if section.startswith("plugin.")},
                **_whole_section_settings({section: dict(parser.items(section)) for section in WHOLE_SECTIONS}),
                retention_rules={name: RetentionRule.parse(name, value) for name, value in parser.items("retention")},
                webhooks={name: _parse_webhook(name, value) for name, value in parser.items("webhooks")},
                config_file=path,
            )
        except (ValueError, configparser.Error) as error:
            raise ValueError(f"invalid configuration: {error}") from None
        config.command_line = {name: value for name, value in overrides.items() if value is not None}
        for name, value in config.command_line.items():
            setattr(config, name, value)
        config.watch_folders = config.watch_folders + list(add_watch_folders)
        config.plugin_folders = config.plugin_folders + list(add_plugin_folders)
        for name, folders in (("add_watch_folders", add_watch_folders), ("add_plugin_folders", add_plugin_folders)):
            if folders:
                config.command_line[name] = tuple(folders)
        config.validate()
        return config

    def reread(self) -> "Config":
        """This configuration read afresh: the same file and command line, and the settings
        changed at run time as they are now (another node may have changed shared ones)."""
        return Config.load(self.config_file, **self.command_line)

    def changed(self, **values) -> "Config":
        """A copy with these settings changed, validated: ValueError says why one cannot work."""
        config = dataclasses.replace(self, **values)
        config.validate()
        return config

    def validate(self):
        """Raise ValueError naming the first setting that cannot work."""
        if not is_valid_ae_title(self.aet):
            raise ValueError(f"invalid AE title {self.aet!r}: 1 to 16 printable ASCII characters, no backslash")
        for name in ("dicom_port", "http_port", "tls_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"invalid {name} {getattr(self, name)}: must be 0..65535")
        if self.index_url and not is_postgresql_url(self.index_url):
            raise ValueError("invalid [index] url: empty (SQLite in data_dir) or postgresql://user@host/database")
        if self.node_name and not NODE_NAME_PATTERN.fullmatch(self.node_name):
            raise ValueError(f"invalid [node] name {self.node_name[:80]!r}: it names a folder, so letters, digits,"
                             " '.', '_' or '-' (not first), at most 64")
        if self.duplicates not in ("keep", "overwrite"):
            raise ValueError(f"invalid duplicates policy {self.duplicates!r}: keep or overwrite")
        if not URI_SCHEME_PATTERN.fullmatch(self.storage_scheme):
            raise ValueError(f"invalid storage scheme {self.storage_scheme!r}: file, or a storage plugin's scheme such as s3")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"invalid log level {self.log_level!r}")
        if not self.dicom_host.strip():
            raise ValueError("invalid DICOM host '': an address or host name to listen on, 0.0.0.0 for all")
        if self.max_associations < 1:
            raise ValueError(f"invalid max_associations {self.max_associations}: at least 1")
        if not 0 <= self.dicom_workers <= 64:
            raise ValueError(f"invalid [dicom] workers {self.dicom_workers}: 0 (none) to 64")
        for name in ("max_pdu", "max_pdu_send"):
            if getattr(self, name) != 0 and not 1024 <= getattr(self, name) < 2**32:
                raise ValueError(f"invalid {name} {getattr(self, name)}: 0 (unlimited) or 1024..4294967295 bytes")
        for name in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout", "association_request_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"invalid {name} {getattr(self, name)}: must be more than 0 seconds")
        if not self.session_idle_minutes > 0:
            raise ValueError(f"invalid session_idle_minutes {self.session_idle_minutes}: must be more than 0 (0.5 is 30 s)")
        if not self.stable_age > 0:
            raise ValueError(f"invalid [plugins] stable_age {self.stable_age}: must be more than 0 seconds")
        if not self.min_free_mb >= 0:
            raise ValueError(f"invalid min_free_mb {self.min_free_mb}: 0 (no reserve) or more MB")
        if not self.max_size_mb >= 0 or self.max_instances < 0:
            raise ValueError(f"invalid quota max_size_mb {self.max_size_mb}, max_instances {self.max_instances}: 0 (no limit) or more")
        if self.when_full not in WHEN_FULL_POLICIES:
            raise ValueError(f"invalid when_full {self.when_full!r}: refuse or recycle")
        if not self.audit_retention_days >= 0:
            raise ValueError(f"invalid [audit] retention_days {self.audit_retention_days}: 0 (keep all) or more days")
        if not self.retention_interval_hours > 0:
            raise ValueError(f"invalid retention_interval_hours {self.retention_interval_hours}: more than 0")
        if not (self.import_max_unpacked_mb > 0 and self.import_max_ratio >= 1):
            raise ValueError(f"invalid [archives] import_max_unpacked_mb {self.import_max_unpacked_mb} or import_max_ratio "
                             f"{self.import_max_ratio}: more than 0 MB, a ratio of at least 1")
        if self.media_max_instances < 1:
            raise ValueError(f"invalid [archives] media_max_instances {self.media_max_instances}: at least 1")
        if not 0 < self.thumbnail_size <= 4096:
            raise ValueError(f"invalid thumbnail_size {self.thumbnail_size}: 1..4096 pixels")
        if not 0 <= self.index_effort <= 100:
            raise ValueError(f"invalid index effort {self.index_effort}: 0..100")
        if not 1 <= self.codec_workers <= 64:
            raise ValueError(f"invalid [codecs] workers {self.codec_workers}: 1..64")
        for name in ("codec_idle_seconds", "codec_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"invalid [codecs] {name.removeprefix('codec_')} {getattr(self, name)}: must be more than 0 seconds")
        if self.tls_certificate_names_ae and not self.tls_ca_certificate:
            raise ValueError("tls_certificate_names_ae needs tls_ca_certificate: without it clients present no certificate")
        if self.tls_minimum_version not in TLS_VERSIONS:
            raise ValueError(f"invalid tls_minimum_version {self.tls_minimum_version!r}: {' or '.join(TLS_VERSIONS)}")
        if self.tls_port and not (self.tls_certificate and self.tls_private_key):
            raise ValueError(f"tls_port = {self.tls_port} needs tls_certificate and tls_private_key (PEM files)")
        if self.public_url and not re.fullmatch(r"https?://[^/?#\s]+(/[^?#\s]*)?", self.public_url):
            raise ValueError(f"invalid public_url {self.public_url!r}: http(s)://host[:port][/path]")
        self.public_url = self.public_url.rstrip("/")
        if self.trusted_proxy not in ("", "*"):
            try:
                ipaddress.ip_address(self.trusted_proxy)
            except ValueError:
                raise ValueError(f"invalid [http] trusted_proxy {self.trusted_proxy!r}: one IP address, or *") from None
        for aet, (host, port) in self.modalities.items():
            if not is_valid_ae_title(aet) or not HOST_PATTERN.match(host) or not 0 < port < 65536:
                raise ValueError(f"invalid C-MOVE destination {aet} = {host}:{port}: expected AET = host:port")
        for sop_class, syntaxes in self.transfer_syntaxes.items():
            for uid in [sop_class, *syntaxes]:
                if not is_valid_uid(uid):
                    raise ValueError(f"[transfer_syntaxes] {sop_class}: {uid!r} is not a UID")
        self.data_dir = pathlib.Path(self.data_dir)
        self.watch_folders = [pathlib.Path(p) for p in self.watch_folders]

    @property
    def node(self) -> str:
        """This node's name: [node] name, else HOSTNAME-HTTPPORT (any other character of the host
        name as '-'), which tells apart the nodes of one machine and those of several."""
        return self.node_name or re.sub(r"[^A-Za-z0-9_.-]", "-", f"{socket.gethostname()}-{self.http_port}").lstrip(".")

    @property
    def node_dir(self) -> pathlib.Path:
        """Where this node's own state lives (temp files, caches, the lock of its serve): the data
        dir itself with the SQLite index (one node), data_dir/nodes/NAME when several nodes share
        the data dir and a PostgreSQL index, so that none sweeps or locks another's files."""
        return self.data_dir / "nodes" / self.node if self.index_url else self.data_dir

    def save_settings(self, *names: str):
        """Write the named settings, changed at run time, to settings_location: attributes
        named in LIVE_SETTINGS, "modalities" (with their details) or "transfer_syntaxes"."""
        values = collections.defaultdict(dict)
        for name in names:
            if name == "modalities":
                values["modalities"] = {aet: _modality_text(host, port, *self.modality_details.get(aet, (False, "")),
                                                            self.modality_services.get(aet), aet in self.tls_modalities)
                                        for aet, (host, port) in self.modalities.items()}
            elif name == "transfer_syntaxes":
                values["transfer_syntaxes"] = {uid: " ".join(syntaxes) for uid, syntaxes in self.transfer_syntaxes.items()}
            else:
                section, key, _ = CONFIG_KEYS[name]
                values[section][key] = _ini_text(getattr(self, name))
        save_settings(self.settings_location, values)

    @property
    def settings_location(self) -> pathlib.Path | str:
        """Where the settings changed at run time are kept: the index's PostgreSQL database, whose
        every node sees them, or data_dir (settings.ini)."""
        return self.index_url if is_postgresql_url(self.index_url) else self.data_dir


#: What a webhook may be told of: a study found stable, an instance stored (C-STORE or STOW-RS).
WEBHOOK_EVENTS = ("stable_study", "stored")
WEBHOOK_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclasses.dataclass(frozen=True)
class Webhook:
    """One [webhooks] line: a URL told of some events, with a body signed by a shared secret."""
    name: str
    url: str
    events: frozenset[str]
    secret: bytes = dataclasses.field(repr=False)  # never logged, never shown by the REST API
    timeout: float = 10  # seconds per attempt
    retry: tuple[float, float] = (5, 600)  # the first wait after a failure, and the longest
    attempts: int = 50  # then the delivery is given up ("failed" in the delivery log)
    secret_file: pathlib.Path | None = None  # read for each delivery instead, so a new key needs no restart

    def signing_key(self) -> bytes:
        """The HMAC key: secret=, or the first line of secret_file= as it is now (OSError if
        it cannot be read, ValueError if it is empty)."""
        if self.secret_file is None:
            return self.secret
        key = self.secret_file.read_text(encoding="utf-8").strip()
        if not key:
            raise ValueError(f"secret_file={self.secret_file} is empty")
        return key.encode("utf-8")

    def retry_delay(self, attempts: int) -> float:
        """Seconds before the next attempt, after this many have failed: doubled each time, capped."""
        first, longest = self.retry
        return min(longest, first * 2 ** min(attempts - 1, 60))


def _parse_webhook(name: str, value: str) -> Webhook:
    """NAME = url=URL events=E1,E2 (secret=TEXT | secret_file=PATH) [timeout=S] [retry=FIRST..MAX]
    [attempts=N]: the syntax of a [webhooks] line (docs/configuration.md)."""
    def fail(why):
        raise ValueError(f"[webhooks] {name}: {why}")

    options = {}
    for word in value.split():
        key, sep, text = word.partition("=")
        if not sep or key not in ("url", "events", "secret", "secret_file", "timeout", "retry", "attempts"):
            fail(f"{key!r} is not an option: url=, events=, secret= or secret_file=, timeout=, retry=, attempts=")
        options[key] = text
    if not WEBHOOK_NAME.fullmatch(name):
        fail("a name is letters, digits, '.', '_' or '-'")
    url = urllib.parse.urlsplit(options.get("url", ""))
    if url.scheme not in ("http", "https") or not url.hostname:
        fail("url= must be an http:// or https:// URL")
    events = frozenset(options.get("events", "").split(",")) - {""}
    if not events or not events <= set(WEBHOOK_EVENTS):
        fail(f"events= lists some of {','.join(WEBHOOK_EVENTS)} separated by commas")
    if ("secret" in options) == ("secret_file" in options) or not (options.get("secret") or options.get("secret_file")):
        fail("give the signing secret as secret= or secret_file= (one of them)")
    secret_file = pathlib.Path(options["secret_file"]) if "secret_file" in options else None
    if secret_file is not None and not secret_file.is_absolute():
        fail("secret_file= must be an absolute path")
    try:
        timeout = float(options.get("timeout", 10))
        first, _, longest = options.get("retry", "5..600").partition("..")
        retry = (float(first), float(longest or first))
        attempts = int(options.get("attempts", 50))
    except ValueError:
        fail("timeout= is seconds, retry= is FIRST..MAX seconds, attempts= a whole number")
    if not (timeout > 0 and 0 < retry[0] <= retry[1] and attempts >= 1):
        fail("timeout= and retry= must be more than 0 seconds (FIRST at most MAX), attempts= at least 1")
    return Webhook(name, url.geturl(), events, options.get("secret", "").encode("utf-8"), timeout, retry, attempts,
                   secret_file)


def _parse_host_port(aet: str, value: str) -> tuple[str, int]:
    host, _, port = value.strip().rpartition(":")
    if not is_valid_ae_title(aet) or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"[modalities] {aet} = {value}: expected AET = host:port")
    return host.strip("[]"), int(port)


@dataclasses.dataclass(frozen=True)
class RetentionRule:
    """A [retention] rule: the received, unprotected studies it deletes meet all its criteria.

    Written NAME = criterion=value ...: each criterion is one attribute here and one condition
    in Index.studies_to_retire.
    """

    name: str
    older_than_days: float  #: its newest instance arrived longer ago than this
    modality: str = ""  #: it has a series of this modality ("" for any)
    origin: str = ""  #: all of it came this way: store (C-STORE), stow (STOW-RS) or import; "" for any
    label: str = ""  #: it carries this label, on itself or on one of its series ("" for any)

    CRITERIA = ("older_than_days", "modality", "origin", "label")

    @classmethod
    def parse(cls, name: str, text: str) -> "RetentionRule":
        criteria = {}
        for word in text.split():
            key, _, value = word.partition("=")
            if key not in cls.CRITERIA or not value:
                raise ValueError(f"[retention] {name}: {word!r} is not a criterion"
                                 " (older_than_days=N, modality=MR, origin=store|stow|import, label=NAME)")
            criteria[key] = value
        if "older_than_days" not in criteria:
            raise ValueError(f"[retention] {name}: older_than_days=N is required")
        try:
            days = float(criteria["older_than_days"])
        except ValueError:
            days = -1
        if not days > 0:
            raise ValueError(f"[retention] {name}: older_than_days must be a number of days above 0")
        origin = criteria.get("origin", "").lower()
        if origin not in ("",) + RECEIVED_ORIGINS:
            raise ValueError(f"[retention] {name}: origin must be one of {', '.join(RECEIVED_ORIGINS)}")
        try:
            label = label_name(criteria["label"]) if "label" in criteria else ""
        except ValueError as error:
            raise ValueError(f"[retention] {name}: {error}") from None
        return cls(name, days, criteria.get("modality", "").upper(), origin, label)


def _parse_modality(aet: str, value: str) -> tuple[tuple[str, int], bool, str, frozenset[str] | None]:
    """AET = host:port [public|private] [tls] [allow=...] [description]:
    ((host, port), public, description, the services allowed or None when allow= is not said)."""
    address, *words = value.split() or [""]
    flag, services = "private", None
    while words and (words[0] in ("public", "private", "tls") or words[0].startswith("allow=")):
        word = words.pop(0)
        if word == "tls":
            continue  # _modality_says_tls reads it
        if word.startswith("allow="):
            services = _parse_services(aet, word[len("allow="):])
        else:
            flag = word
    return _parse_host_port(aet, address or value), flag == "public", " ".join(words), services


def _modality_says_tls(value: str) -> bool:
    """True if a [modalities] value has the word tls among its flags (before the description)."""
    for word in value.split()[1:]:
        if word == "tls":
            return True
        if word not in ("public", "private") and not word.startswith("allow="):
            return False
    return False


def _parse_services(aet: str, text: str) -> frozenset[str]:
    """allow=store,find,... (or none) of a [modalities] entry."""
    services = frozenset() if text == "none" else frozenset(text.split(","))
    if not services <= set(DICOM_SERVICES) or text == "":
        raise ValueError(f"[modalities] {aet}: allow={text}: expected some of {','.join(DICOM_SERVICES)}"
                         " separated by commas, or none")
    return services


def _modality_text(host: str, port: int, public: bool, description: str, services: frozenset[str] | None = None,
                   tls: bool = False) -> str:
    """A [modalities] value, as _parse_modality reads it."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    flag = "public" if public else "private" if description else ""
    allow = "" if services is None else "allow=" + (",".join(s for s in DICOM_SERVICES if s in services) or "none")
    return " ".join(part for part in (address, flag, "tls" if tls else "", allow, description) if part)


# ---- settings changed at run time: data_dir/settings.ini -----------------------------------

SETTINGS_FILE = "settings.ini"
#: Sections settings.ini replaces whole, rather than key by key, so that entries can be removed.
WHOLE_SECTIONS = ("modalities", "transfer_syntaxes")
#: Settings the REST API changes at run time (Config attributes; CONFIG_KEYS says where each is written).
LIVE_SETTINGS = frozenset({
    "aet", "dicom_host", "dicom_port", "dicom_autostart", "max_associations", "max_pdu", "max_pdu_send",
    "acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout",
    "watch_folders", "watch_enabled", "thumbnails", "thumbnail_size", "index_effort",
})


#: What a node takes at run time from the settings another node changed (shared settings): the
#: live settings, and the Config attributes that WHOLE_SECTIONS are read into.
FOLLOWED_SETTINGS = LIVE_SETTINGS | {"modalities", "modality_details", "modality_services", "tls_modalities",
                                     "transfer_syntaxes"}
#: How often a node whose settings are shared asks whether another node changed them.
SETTINGS_FOLLOW_SECONDS = 2


def _ini_text(value) -> str:
    """A setting's value as the INI files write it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "\n".join(str(item) for item in value)  # folders: one per line
    return str(value)


def _saved_settings(location: pathlib.Path | str) -> dict[str, dict[str, str]]:
    """The settings changed at run time, {section: {key: text}}: those of the PostgreSQL index's
    database (a URL), or data_dir/settings.ini (a folder)."""
    if is_postgresql_url(location):
        with contextlib.closing(SharedSettings(location)) as shared:
            return shared.read()[1]
    path = pathlib.Path(location) / SETTINGS_FILE
    if not path.is_file():
        return {}
    overlay = configparser.ConfigParser(interpolation=None)
    overlay.optionxform = str
    try:
        overlay.read(path, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError) as error:
        raise ValueError(f"invalid settings in {path}: {error}") from None
    return {section: dict(overlay.items(section, raw=True)) for section in overlay.sections()}


def _whole_section_settings(sections: dict[str, dict[str, str]]) -> dict:
    """The Config attributes that the WHOLE_SECTIONS among sections ({section: {key: text}})
    set: the C-MOVE destinations, from what [modalities] says of each AE, and the transfer
    syntax limits. ValueError says what a line gets wrong."""
    attributes = {}
    if "modalities" in sections:
        lines = sections["modalities"]
        parsed = {aet: _parse_modality(aet, value) for aet, value in lines.items()}
        attributes.update(
            modalities={aet: address for aet, (address, _, _, _) in parsed.items()},
            modality_details={aet: (public, description) for aet, (_, public, description, _) in parsed.items()
                              if public or description},
            modality_services={aet: services for aet, (_, _, _, services) in parsed.items() if services is not None},
            tls_modalities=frozenset(aet for aet, value in lines.items() if _modality_says_tls(value)))
    if "transfer_syntaxes" in sections:
        attributes["transfer_syntaxes"] = {uid: value.split() for uid, value in sections["transfer_syntaxes"].items()}
    return attributes


def _lay_settings(parser: configparser.ConfigParser, values: dict[str, dict[str, str]]):
    """Lay the settings changed at run time over those parser holds: key by key, WHOLE_SECTIONS whole."""
    for section, entries in values.items():
        if section in WHOLE_SECTIONS and parser.has_section(section):
            parser.remove_section(section)
        if not parser.has_section(section):
            parser.add_section(section)
        for key, value in entries.items():
            parser.set(section, key, value)


def save_settings(location: pathlib.Path | str, values: dict[str, dict[str, str]]):
    """Write {section: {key: text}} where the settings changed at run time are kept (a config's
    settings_location), keeping the rest of what is there: into the PostgreSQL index's database
    (a URL), or data_dir/settings.ini (a folder).

    The file is replaced atomically; a running daemon's callers hold daemon.settings_lock."""
    if is_postgresql_url(location):
        with contextlib.closing(SharedSettings(location)) as shared:
            shared.save(values)
        return
    path = pathlib.Path(location) / SETTINGS_FILE
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read(path, encoding="utf-8")
    for section, entries in values.items():
        if section in WHOLE_SECTIONS:
            parser.remove_section(section)
        if not parser.has_section(section):
            parser.add_section(section)
        for key, text in entries.items():
            parser.set(section, key, text)
    tmp = path.with_name(SETTINGS_FILE + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write("# Settings changed from the web app or the REST API, written by dicoogled. Read after the\n"
                         "# --config file and before command-line flags; delete this file to undo every change.\n\n")
            parser.write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException:  # a full disk: the old settings.ini stays whole, no half-written copy beside it
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ============================================================================================
# Databases: SQLite files and PostgreSQL servers, spoken to the same way
# ============================================================================================

# The index keeps its data in an SQLite file (apsw) by default, or in a PostgreSQL server when a
# site outgrows one machine. A PostgreSQL connection here is dressed as an apsw one: execute(sql,
# args) with ? placeholders returns a cursor to fetch rows from, `with connection:` is one
# transaction, changes() counts the rows the last statement touched. So the SQL that both engines
# understand is written once; where they differ (the full text, a few spellings, the schema) is
# said in one place per engine (the Index's _SqliteEngine and _PostgresEngine).
#
# The index is spoken to only by the Index (next section): everything else asks it by name and
# gets named rows back, so both engines answer alike. The owner-only SQLite files of the Users
# and sessions, Audit log and De-identification sections (open_private_database) are those
# sections' own, and they speak SQL to them themselves (tests/test_data_gateway.py checks both).

POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")


def is_postgresql_url(location) -> bool:
    return isinstance(location, str) and location.startswith(POSTGRESQL_SCHEMES)


def import_psycopg():
    """psycopg 3 and its pool, or a clear error: they are an extra, not every install has them."""
    try:
        import psycopg
        import psycopg_pool
    except ImportError:
        raise RuntimeError("a PostgreSQL index needs psycopg 3: pip install 'dicoogled[postgresql]'") from None
    return psycopg, psycopg_pool


@functools.lru_cache(maxsize=4096)
def _postgresql_placeholders(sql: str) -> str:
    """sql with apsw's ? placeholders, outside string literals and quoted names, written as
    psycopg's %s, and every literal % doubled (psycopg reads one as a placeholder even in a string)."""
    parts = re.split(r"('(?:[^']|'')*'|\"(?:[^\"]|\"\")*\")", sql.replace("%", "%%"))
    for n in range(0, len(parts), 2):
        parts[n] = parts[n].replace("?", "%s")
    return "".join(parts)


def _postgresql_arguments(args) -> tuple:
    """args with each NUL character as U+FFFD: PostgreSQL text cannot hold NUL (SQLite's can), and a
    hostile login name or search would fail the statement. Written and looked up alike, so a value
    with NUL is still found by the same value."""
    return tuple(arg.replace("\x00", "\ufffd") if isinstance(arg, str) and "\x00" in arg else arg for arg in args)


class PostgresConnection:
    """A psycopg connection spoken to as an apsw one (see above). It runs in autocommit mode, so a
    read never holds a transaction open; `with connection:` opens one, nested ones are savepoints."""

    def __init__(self, connection, translate=None):
        self.raw = connection
        #: sql -> the statement sent, for SQL written in another dialect (the index's: SQLite's)
        self.translate = translate or (lambda sql: sql)
        self._transactions: list = []
        self._last = None

    @classmethod
    def connect(cls, url: str, translate=None, **parameters) -> "PostgresConnection":
        """A new connection; parameters are libpq's (application_name=..., connect_timeout=...)."""
        psycopg, _ = import_psycopg()
        return cls(psycopg.connect(url, autocommit=True, **parameters), translate)

    def execute(self, sql: str, args=()):
        sql = self.translate(sql)
        # Without arguments psycopg sends the text as it is: several statements may go at once.
        self._last = self.raw.execute(_postgresql_placeholders(sql), _postgresql_arguments(args)) if args else self.raw.execute(sql)
        return self._last

    def executemany(self, sql: str, rows):
        rows = [_postgresql_arguments(row) for row in rows]
        if rows:
            self._last = self.raw.cursor()
            self._last.executemany(_postgresql_placeholders(self.translate(sql)), rows)
        return self._last

    def changes(self) -> int:
        return self._last.rowcount if self._last is not None else 0

    def __enter__(self):
        transaction = self.raw.transaction()
        transaction.__enter__()
        self._transactions.append(transaction)
        return self

    def __exit__(self, *exception):
        return self._transactions.pop().__exit__(*exception)

    def close(self):
        self.raw.close()


def open_private_database(path: pathlib.Path, synchronous: str = "FULL") -> apsw.Connection:
    """An SQLite database of the data dir that only its owner reads (users, audit log, pseudonym
    map): mode 0600, WAL, a busy timeout, synchronous as asked (FULL: on disk before answered)."""
    connection = apsw.Connection(str(path))
    # Before WAL mode makes the -wal and -shm files: SQLite gives them the database's mode.
    os.chmod(path, 0o600)
    connection.setbusytimeout(10_000)
    # One statement per execute: apsw runs a multi-statement string lazily, row by row.
    connection.execute("PRAGMA journal_mode=WAL").fetchall()
    connection.execute(f"PRAGMA synchronous={synchronous}")
    return connection


# ---- copies from SQLite files into PostgreSQL (dicoogled migrate) -----------------------------

#: Rows a copy reads and writes at a time: few round trips, little memory.
COPY_BATCH = 1000


def counting_progress(progress, total: int):
    """A function copied(rows) that adds rows to a running count and shows it as
    progress(done, total) (a progress bar's), or does nothing without progress."""
    done = 0

    def copied(rows: int):
        nonlocal done
        done += rows
        if progress is not None:
            progress(done, total)

    return copied


def sqlite_tables(connection: apsw.Connection) -> list[str]:
    """The tables of an SQLite database, in the order they were made (those a table references
    come before it), without SQLite's own."""
    return [name for (name,) in connection.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY rowid")]


def copy_table(source: apsw.Connection, target: PostgresConnection, table: str, copied=lambda rows: None,
               columns=None, rows=None) -> int:
    """Copy every row of table from an SQLite database into the table of the same name and
    columns in PostgreSQL, ids and all, COPY_BATCH rows at a time (copied(n) after each batch);
    columns and rows, if given, are what to write instead (rows made from the source's).
    Identity columns then go on numbering after the highest id copied. Returns the rows copied."""
    columns = columns or [row[1] for row in source.execute(f"PRAGMA table_info({table})")]
    rows = source.execute(f"SELECT {', '.join(columns)} FROM {table}") if rows is None else rows
    insert = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    written, rows = 0, iter(rows)
    while batch := list(itertools.islice(rows, COPY_BATCH)):
        target.executemany(insert, batch)
        written += len(batch)
        copied(len(batch))
    identities = target.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
                                " AND table_name = ? AND is_identity = 'YES'", (table,)).fetchall()
    for (column,) in identities:
        target.execute(f"SELECT setval(pg_get_serial_sequence(?, ?), max({column})) FROM {table}", (table, column))
    return written


# ---- leases: work that must happen once, whatever the number of nodes ---------------------

#: Seconds between a node's tries to take a lease that another node holds: at most this long
#: (plus the server noticing a dead node, below) before the work is taken over.
LEASE_POLL_SECONDS = 5.0
#: The first key of every lease's advisory lock ("DCMD" in ASCII): dicoogled's, apart from the
#: advisory locks other programs may take in the same database.
LEASE_NAMESPACE = 0x44434D44
#: How the leases' connection notices a dead peer. This side: a connection attempt gives up after
#: 10 s, data the server does not acknowledge after 30 s, and the node then stops claiming.
LEASE_CONNECTION = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                    "keepalives_count": 3, "tcp_user_timeout": 30000}
#: The server's side: it probes an idle node after 10 s and ends the session (releasing its
#: locks) after 3 probes unanswered, rather than after its default of hours.
LEASE_SERVER_KEEPALIVES = "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3"


#: The advisory lock every serving node holds shared on its leases' connection, and that an
#: offline command rewriting the whole index (reindex, migrate) takes alone: neither runs while
#: the other does, as the serve.lock file does for one machine.
SERVING_LOCK = "serving"


class DatabaseInUse(RuntimeError):
    """A PostgreSQL index that nodes serve, or that an offline command has to itself."""


def lease_key(name: str) -> int:
    """The second key of a lease's advisory lock: the same for a name on every node and in every
    run (Python's hash() changes from one process to the next). Two names with one key (a chance
    in four billion for a pair) are only ever owned together."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "big", signed=True)


class Leases:
    """Who does the work that must happen once (finding stable studies, delivering webhooks,
    retention, reconciling the storage folder, watching a folder): the node that owns its lease,
    asked by name with owns(). A node that does not own one tries again every LEASE_POLL_SECONDS,
    so that when the owner dies another takes the work over.

    With the SQLite index there is one node, which owns everything. With PostgreSQL a lease is a
    session-level advisory lock (pg_try_advisory_lock), held on a connection of this object's
    own; the server releases it the moment that session ends, whether the node stopped, crashed
    or went silent. Advisory locks rather than rows with an expiry time: the database already
    knows when a session dies, so there is no expiry to tune between a slow takeover and a live
    but busy owner losing its work, and no clocks of several machines to agree.
    """

    def __init__(self, index_url: str = "", node_name: str = ""):
        self.url = index_url
        self.node_name = node_name
        self.log = logging.getLogger("dicoogled.nodes")
        # Said at start, not at the first owns(): a PostgreSQL index without psycopg cannot run.
        self._psycopg = import_psycopg()[0] if index_url else None
        self._connection: PostgresConnection | None = None
        self._held: set[str] = set()
        self._lock = threading.Lock()  # one connection, asked from several threads
        self._closed = False
        self._unreachable = False  # said once, not at every try

    def owns(self, name: str) -> bool:
        """True if this node owns the lease name now, taking it if no node holds it. A node whose
        connection to the database is gone owns nothing: the server releases its locks."""
        if not self.url:
            return True
        with self._lock:
            if self._closed:
                return False
            try:
                connection = self._connect()
                self._unreachable = False
                if name in self._held:
                    connection.execute("SELECT 1")  # the lock lives as long as this session: is it alive?
                elif connection.execute("SELECT pg_try_advisory_lock(?, ?)", (LEASE_NAMESPACE, lease_key(name))).fetchone()[0]:
                    self._held.add(name)
                    self.log.info("this node (%s) now owns %s", self.node_name, name)
                return name in self._held
            except (self._psycopg.Error, DatabaseInUse) as error:
                self._lost(error)
                return False

    def serve(self):
        """Say that this node serves the database, before it serves anything: raises
        DatabaseInUse while an offline command (reindex, migrate) has it to itself."""
        if self.url:
            with self._lock:
                try:
                    self._connect()
                except self._psycopg.Error as error:  # the index opened: a blip; taken at the next owns()
                    self._lost(error)

    def wait_to_own(self, name: str, stop: threading.Event) -> bool:
        """Wait until this node owns the lease name (True), trying every LEASE_POLL_SECONDS, or
        until stop is set (False). At once when it owns it already, or with the SQLite index."""
        while not stop.is_set():
            if self.owns(name):
                return True
            stop.wait(LEASE_POLL_SECONDS)
        return False

    def release(self, name: str):
        """Give a lease up (this node stops that work), so that another node may take it."""
        with self._lock:
            if name not in self._held:
                return
            self._held.discard(name)
            try:
                self._connection.execute("SELECT pg_advisory_unlock(?, ?)", (LEASE_NAMESPACE, lease_key(name)))
            except self._psycopg.Error as error:
                self._lost(error)

    def close(self):
        """Give every lease up: closing the connection ends its session, and so its locks."""
        with self._lock:
            self._closed = True
            self._drop_connection()

    def _connect(self) -> PostgresConnection:
        if self._connection is None:
            connection = PostgresConnection.connect(
                self.url, application_name=f"dicoogled {self.node_name}".strip()[:63], **LEASE_CONNECTION)
            connection.execute(LEASE_SERVER_KEEPALIVES)
            if not connection.execute("SELECT pg_try_advisory_lock_shared(?, ?)",
                                      (LEASE_NAMESPACE, lease_key(SERVING_LOCK))).fetchone()[0]:
                connection.close()
                raise DatabaseInUse("a dicoogled reindex or migrate has the PostgreSQL index to itself: serve once it ends")
            self._connection = connection
        return self._connection

    def _lost(self, error):
        """The connection failed: whatever it held, the server has released or soon will."""
        if self._held:
            self.log.error("lost the database connection holding the leases of %s (%s): other nodes take them over",
                           ", ".join(sorted(self._held)), error)
        elif not self._unreachable:
            self.log.warning("cannot take leases now, tried again every %g s: %s", LEASE_POLL_SECONDS, error)
        self._unreachable = True
        self._drop_connection()

    def _drop_connection(self):
        """Forget every lease and close their connection: its session's end releases the locks."""
        self._held.clear()
        if self._connection is not None:
            with contextlib.suppress(self._psycopg.Error):
                self._connection.close()
            self._connection = None


def hold_database_alone(url: str, command: str) -> PostgresConnection:
    """A connection holding the serving lock alone, for an offline command that rewrites the
    whole index: close it when done. Raises DatabaseInUse naming the nodes that serve it."""
    psycopg, _ = import_psycopg()
    try:
        connection = PostgresConnection.connect(url, application_name=f"dicoogled {command}", connect_timeout=10)
    except psycopg.Error as error:
        raise RuntimeError(f"cannot connect to the PostgreSQL database: {error}") from None
    key = (LEASE_NAMESPACE, lease_key(SERVING_LOCK))
    if connection.execute("SELECT pg_try_advisory_lock(?, ?)", key).fetchone()[0]:
        return connection
    # pg_locks shows the two keys as unsigned oids.
    holders = connection.execute(
        "SELECT DISTINCT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.classid::text = ? AND l.objid::text = ? AND l.objsubid = 2"
        " ORDER BY 1", tuple(str(part & 0xFFFFFFFF) for part in key)).fetchall()
    connection.close()
    names = ", ".join(name.removeprefix("dicoogled ") or "?" for (name,) in holders) or "one just ending"
    raise DatabaseInUse(f"dicoogled nodes serve this PostgreSQL index ({names}): {command} works on a stopped"
                        " archive, stop every node first")


# ---- the daemon's own state: users and sessions, the audit log, settings ----------------------
#
# Each lives in a SQLite file of the data dir, or, when the index is in PostgreSQL, in a schema of
# that database of its own (dicoogled_users, dicoogled_audit, dicoogled_settings), so that every
# node of a site shares it: a session opened on one node works on all of them.

#: What the two engines spell differently in the schemas of that state, written once with these
#: as {words}. Every other difference is avoided: booleans are integers compared with != 0,
#: "INSERT OR REPLACE" is INSERT ... ON CONFLICT, times are DOUBLE PRECISION (PostgreSQL's
#: REAL has 24 bits, seconds since 1970 need more), and LIMIT SQL_NO_LIMIT means all rows.
SQL_WORDS = {
    "sqlite": {"blob": "BLOB", "row_id": "INTEGER PRIMARY KEY"},  # the rowid: numbered as inserted
    "postgresql": {"blob": "BYTEA", "row_id": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"},
}
#: LIMIT for no limit: SQLite reads -1 so, PostgreSQL refuses it; both take the largest integer.
SQL_NO_LIMIT = 2**63 - 1


class StateDatabase:
    """A database of the daemon's own state, one of two kinds spoken to the same way:

    - an owner-only SQLite file of the data dir (open_private_database), one connection used by
      one thread at a time;
    - a schema of the index's PostgreSQL database, through a pool of connections whose search
      path is that schema (so the SQL names its tables plainly), one per thread at a time: a
      psycopg connection must not be used by two threads at once.

    connection() lends a connection for reads, transaction() one inside a transaction."""

    def __init__(self, location: "pathlib.Path | str", schema: str, synchronous: str = "FULL", pool_size: int = 4):
        self.postgresql = is_postgresql_url(location)
        self.engine = "postgresql" if self.postgresql else "sqlite"
        self.schema = schema
        #: Where it is, for messages: the file, or the schema (never the URL: it may hold a password).
        self.name = f"PostgreSQL schema {schema}" if self.postgresql else str(location)
        self._synchronous = synchronous
        #: Ends a SELECT of rows its transaction goes on to change: PostgreSQL locks them until it
        #: ends, so nodes doing the same at once take turns; SQLite's one writer holds the file anyway.
        self.for_update = " FOR UPDATE" if self.postgresql else ""
        if self.postgresql:
            self._pool = self._open_pool(location, schema, pool_size)
        else:
            self._lock = threading.Lock()
            self._sqlite = open_private_database(location, synchronous)
            self._sqlite.execute("PRAGMA foreign_keys=ON")

    @staticmethod
    def _open_pool(url: str, schema: str, size: int):
        _, psycopg_pool = import_psycopg()

        def configure(connection):
            connection.execute(f"SET search_path TO {schema}")

        pool = psycopg_pool.ConnectionPool(url, min_size=1, max_size=size, kwargs={"autocommit": True},
                                           configure=configure, check=psycopg_pool.ConnectionPool.check_connection,
                                           name=schema, open=True)
        try:
            pool.wait(timeout=30)
        except psycopg_pool.PoolTimeout:
            pool.close()
            raise RuntimeError(f"cannot connect to the PostgreSQL database of [index] url (for {schema})") from None
        return pool

    def words(self, sql: str) -> str:
        """sql with its {words} (SQL_WORDS) as this engine says them."""
        return sql.format(**SQL_WORDS[self.engine])

    @contextlib.contextmanager
    def connection(self):
        if self.postgresql:
            with self._pool.connection() as raw:
                yield PostgresConnection(raw)
        else:
            with self._lock:
                yield self._sqlite

    @contextlib.contextmanager
    def transaction(self, durable: bool = True):
        """A connection inside a transaction, committed at the end of the with block (rolled back
        on an exception). durable False: a power cut may lose it, which spares a flush to disk."""
        with self.connection() as db:
            if not durable and not self.postgresql:
                db.execute("PRAGMA synchronous=NORMAL")
            try:
                with db:
                    if not durable and self.postgresql:
                        db.execute("SET LOCAL synchronous_commit TO OFF")
                    yield db
            finally:
                if not durable and not self.postgresql:
                    db.execute(f"PRAGMA synchronous={self._synchronous}")

    def tables(self) -> list[str]:
        """The names of its tables (in an SQLite file, in the order they were made)."""
        with self.connection() as db:
            if not self.postgresql:
                return sqlite_tables(db)
            return [name for (name,) in db.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
                " AND table_name != 'schema_version' ORDER BY table_name")]

    def rows_held(self) -> dict[str, int]:
        """{table: rows} of its tables that hold any."""
        with self.connection() as db:
            counts = {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in self.tables()}
        return {table: rows for table, rows in counts.items() if rows}

    def copy_into(self, target: "StateDatabase", replace: bool = False, progress=None) -> dict[str, int]:
        """Copy every table of this SQLite database into target, a PostgreSQL schema of the same
        tables, in one transaction of target's: all of it or, on any failure, nothing. replace
        empties target's tables first; progress(done, total) counts the rows. {table: rows copied}."""
        with self.connection() as source:
            tables = sqlite_tables(source)
            counts = {table: source.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in tables}
        copied = counting_progress(progress, sum(counts.values()))
        with self.connection() as source, target.transaction() as db:
            if replace:
                for table in reversed(tables):  # those that reference others first
                    db.execute(f"DELETE FROM {table}")
            written = {table: copy_table(source, db, table, copied) for table in tables}
            if written != counts:
                raise RuntimeError(f"copied {written} rows of {self.name}, which holds {counts}")
        return written

    def migrate(self, version: int, schema: str, before=None):
        """Bring the schema (CREATE ... IF NOT EXISTS statements, with {words}) to version: a
        newer one is refused; an older one gets before(connection) (the SQLite file's own
        migrations), the schema, and the version noted (SQLite's user_version, or a table
        schema_version). A current one is left unwritten: a start on a full disk writes nothing."""
        with self.transaction() as db:
            if self.postgresql:
                # Nodes starting at once take turns: CREATE ... IF NOT EXISTS is not safe against
                # a concurrent CREATE of the same name.
                db.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (self.schema,))
                db.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
                db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                found = db.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
            else:
                found = db.execute("PRAGMA user_version").fetchone()[0]
            if found > version:
                raise RuntimeError(f"{self.name} was written by a newer dicoogled (schema {found}); upgrade")
            if found == version:
                return
            if before is not None:
                before(db)
            db.execute(self.words(schema))
            if self.postgresql:
                db.execute("DELETE FROM schema_version")
                db.execute("INSERT INTO schema_version VALUES (?)", (version,))
            else:
                db.execute(f"PRAGMA user_version = {int(version)}")

    def close(self):
        if self.postgresql:
            self._pool.close()
        else:
            with self._lock:
                self._sqlite.close()


class StateOnFirstUse:
    """A StateDatabase opened (its file made, its schema brought up to date) only when first
    asked for: an archive that never needs it has none, and a start on a full disk writes nothing."""

    def __init__(self, location: "pathlib.Path | str", schema: str, version: int, schema_sql: str):
        self.location, self._arguments = location, (schema, version, schema_sql)
        self._lock = threading.Lock()
        self._database: StateDatabase | None = None

    def get(self) -> StateDatabase:
        with self._lock:
            if self._database is None:
                schema, version, schema_sql = self._arguments
                database = StateDatabase(self.location, schema, pool_size=2)
                database.migrate(version, schema_sql)
                self._database = database
            return self._database

    def made(self) -> bool:
        """Whether it may hold anything: opened, a PostgreSQL schema, or a file that exists."""
        return self._database is not None or is_postgresql_url(self.location) or os.path.exists(self.location)

    def close(self):
        with self._lock:
            if self._database is not None:
                self._database.close()


#: The version of the shared settings' schema (dicoogled_settings.schema_version).
SETTINGS_SCHEMA_VERSION = 1
SETTINGS_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (
    section TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (section, key)
);
-- One row counting the changes saved: one cheap read tells a node whether there is anything new.
CREATE TABLE IF NOT EXISTS changes (count BIGINT NOT NULL);
INSERT INTO changes SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM changes);
"""


#: The key of SharedSettings' row that says a whole section is set, even with no key in it.
SECTION_IS_SET = ""


class SharedSettings:
    """The settings changed at run time when the index is in PostgreSQL: kept in its database
    (schema dicoogled_settings) instead of data_dir/settings.ini, so that every node reads the
    same, as {section: {key: text}} laid over the config file as settings.ini would be."""

    def __init__(self, url: str):
        self._db = StateDatabase(url, "dicoogled_settings", pool_size=1)
        self._db.migrate(SETTINGS_SCHEMA_VERSION, SETTINGS_SCHEMA)

    def changes(self) -> int:
        """How many changes were ever saved: a node compares it with the count it last read."""
        with self._db.connection() as db:
            return db.execute("SELECT count FROM changes").fetchone()[0]

    def read(self) -> tuple[int, dict[str, dict[str, str]]]:
        """(the count of changes, the settings): the count is read first, so a change saved in
        between is seen again at the next comparison, never missed."""
        values = collections.defaultdict(dict)
        with self._db.connection() as db:
            count = db.execute("SELECT count FROM changes").fetchone()[0]
            for section, key, value in db.execute("SELECT section, key, value FROM settings ORDER BY section, key"):
                entries = values[section]  # a section is set even with no key (see save)
                if key != SECTION_IS_SET:
                    entries[key] = value
        return count, dict(values)

    def save(self, values: dict[str, dict[str, str]], replace_all: bool = False):
        """Write {section: {key: text}}, keeping the rest (replace_all: none of it); WHOLE_SECTIONS
        are replaced whole."""
        with self._db.transaction() as db:
            # Counted first: the row stays locked until the commit, so nodes saving at once take turns.
            db.execute("UPDATE changes SET count = count + 1")
            if replace_all:
                db.execute("DELETE FROM settings")
            for section, entries in values.items():
                if section in WHOLE_SECTIONS:
                    db.execute("DELETE FROM settings WHERE section = ?", (section,))
                    # An emptied section must still replace the config file's, as an empty
                    # [section] of settings.ini does: a row says the section is set.
                    db.execute("INSERT INTO settings VALUES (?, ?, '')", (section, SECTION_IS_SET))
                for key, text in entries.items():
                    db.execute("INSERT INTO settings VALUES (?, ?, ?)"
                               " ON CONFLICT (section, key) DO UPDATE SET value = excluded.value", (section, key, text))

    def close(self):
        self._db.close()


#: The version of the task list's schema (tasks.sqlite's user_version, dicoogled_tasks.schema_version).
TASKS_SCHEMA_VERSION = 1
TASKS_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    uid TEXT PRIMARY KEY,
    kind TEXT NOT NULL,                          -- index, import or function
    node TEXT NOT NULL,                          -- the node running it, or that last ran it
    paths TEXT NOT NULL,                         -- JSON: the files and folders an index task indexes
    owner TEXT NOT NULL,                         -- the user who started an import ('' otherwise)
    created DOUBLE PRECISION NOT NULL,
    report TEXT NOT NULL,                        -- JSON: what /index/task shows, as last written
    finished INTEGER NOT NULL DEFAULT 0,
    stop_requested INTEGER NOT NULL DEFAULT 0    -- asked on another node: its runner stops
);
"""


class TaskRecord(typing.NamedTuple):
    """A task as the task list keeps it (paths and report decoded)."""
    uid: str
    kind: str
    node: str
    paths: list
    owner: str
    created: float
    report: dict
    finished: bool
    stop_requested: bool


class TaskRecords:
    """The task list every node sees: data_dir/tasks.sqlite (owner-only: a task's name may name
    a patient's folder), or schema dicoogled_tasks of the PostgreSQL index's database. The node
    that runs a task writes its report here as it goes; any node lists it, asks it to stop or
    drops it; a task left unfinished by a node that died is found here and taken over (Tasks)."""

    _COLUMNS = "uid, kind, node, paths, owner, created, report, finished, stop_requested"

    def __init__(self, location: "pathlib.Path | str"):
        # Opened by the first task: a start, or a look at the list, on a full disk writes nothing.
        self._state = StateOnFirstUse(location, "dicoogled_tasks", TASKS_SCHEMA_VERSION, TASKS_SCHEMA)

    @property
    def _db(self) -> StateDatabase:
        return self._state.get()

    def _empty(self) -> bool:
        """No task was ever listed: an SQLite list that has no file yet."""
        return not self._state.made()

    @staticmethod
    def _record(row) -> TaskRecord:
        uid, kind, node, paths, owner, created, report, finished, stop_requested = row
        return TaskRecord(uid, kind, node, json.loads(paths), owner, created, json.loads(report), finished != 0, stop_requested != 0)

    def add(self, uid: str, kind: str, node: str, paths: list, owner: str, created: float, report: dict):
        with self._db.transaction() as db:  # durable: a task the node dies running is still found
            db.execute(f"INSERT INTO tasks ({self._COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, 0, 0)",
                       (uid, kind, node, json.dumps(paths), owner, created, json.dumps(report)))

    def write(self, uid: str, node: str, report: dict, finished: bool) -> bool | None:
        """Write a task's report as the node running it: whether it was asked to stop since,
        or None if it is gone from the list (dropped) or another node has taken it over.
        Progress is not made durable (it is written again a second later); the end is."""
        with self._db.transaction(durable=finished) as db:
            found = db.execute("UPDATE tasks SET report = ?, finished = ? WHERE uid = ? AND node = ? RETURNING stop_requested",
                               (json.dumps(report), int(finished), uid, node)).fetchall()
        return found[0][0] != 0 if found else None

    def take(self, uid: str, node: str, report: dict | None = None, finished: bool = False):
        """Make node the task's runner (report, if given, replacing the last one written)."""
        with self._db.transaction() as db:
            if report is None:
                db.execute("UPDATE tasks SET node = ?, finished = ? WHERE uid = ?", (node, int(finished), uid))
            else:
                db.execute("UPDATE tasks SET node = ?, report = ?, finished = ? WHERE uid = ?",
                           (node, json.dumps(report), int(finished), uid))

    def unfinished(self) -> list[TaskRecord]:
        if self._empty():
            return []
        with self._db.connection() as db:
            rows = db.execute(f"SELECT {self._COLUMNS} FROM tasks WHERE finished = 0 ORDER BY created").fetchall()
        return [self._record(row) for row in rows]

    def all(self) -> list[TaskRecord]:
        """Every task listed, oldest first."""
        if self._empty():
            return []
        with self._db.connection() as db:
            rows = db.execute(f"SELECT {self._COLUMNS} FROM tasks ORDER BY created, uid").fetchall()
        return [self._record(row) for row in rows]

    def find(self, uid: str) -> TaskRecord | None:
        if self._empty():
            return None
        with self._db.connection() as db:
            rows = db.execute(f"SELECT {self._COLUMNS} FROM tasks WHERE uid = ?", (uid,)).fetchall()
        return self._record(rows[0]) if rows else None

    def request_stop(self, uid: str):
        """Ask the node running the task to stop it: it reads this when it next writes its report."""
        if self._empty():
            return
        with self._db.transaction() as db:
            db.execute("UPDATE tasks SET stop_requested = 1 WHERE uid = ? AND finished = 0", (uid,))

    def remove(self, uid: str) -> bool:
        if self._empty():
            return False
        with self._db.transaction() as db:
            db.execute("DELETE FROM tasks WHERE uid = ?", (uid,))
            return db.changes() > 0

    def prune(self, finished_before: float) -> int:
        """Drop the finished tasks created before a time (seconds since 1970); how many."""
        if self._empty():
            return 0
        with self._db.transaction() as db:
            db.execute("DELETE FROM tasks WHERE finished != 0 AND created < ?", (finished_before,))
            return db.changes()

    def close(self):
        self._state.close()


# ============================================================================================
# Index: schema, metadata extraction, the writer and readers, C-FIND and searches in SQL
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

SCHEMA_VERSION = 6


def _level_columns(level: str, text: str = "TEXT") -> str:
    columns = [f"{_snake_case(k)} {text} NOT NULL DEFAULT ''" for k in LEVEL_ATTRIBUTES[level]]
    columns += [f"{_snake_case(k)}_folded {text} NOT NULL DEFAULT ''" for k in FOLDED_ATTRIBUTES if k in LEVEL_ATTRIBUTES[level]]
    return ",\n    ".join(columns)


#: How many instances, and how many bytes, each origin holds, kept by triggers so /health
#: answers at once at any size: summing the instances table took 9 s at 1,000,000 instances.
ORIGIN_TOTALS = """
CREATE TABLE origin_totals (origin TEXT PRIMARY KEY, instances INTEGER NOT NULL, bytes INTEGER NOT NULL);
CREATE TRIGGER instance_counted AFTER INSERT ON instances BEGIN
    INSERT INTO origin_totals VALUES (new.origin, 1, new.size)
    ON CONFLICT (origin) DO UPDATE SET instances = instances + 1, bytes = bytes + new.size;
END;
CREATE TRIGGER instance_uncounted AFTER DELETE ON instances BEGIN
    UPDATE origin_totals SET instances = instances - 1, bytes = bytes - old.size WHERE origin = old.origin;
END;
CREATE TRIGGER instance_recounted AFTER UPDATE OF origin, size ON instances BEGIN
    UPDATE origin_totals SET instances = instances - 1, bytes = bytes - old.size WHERE origin = old.origin;
    INSERT INTO origin_totals VALUES (new.origin, 1, new.size)
    ON CONFLICT (origin) DO UPDATE SET instances = instances + 1, bytes = bytes + new.size;
END;
"""

#: The Modality Worklist (scheduled procedure steps, each as its DICOM JSON) and the performed
#: procedure steps modalities report on them by MPPS. Matching reads the DICOM JSON (a worklist
#: holds a day's work, not an archive); the columns are what GET /worklist lists and MPPS links by.
WORKLIST_SCHEMA = """
CREATE TABLE worklist_entries (
    id INTEGER PRIMARY KEY,
    state TEXT NOT NULL DEFAULT 'SCHEDULED',
    study_instance_uid TEXT NOT NULL,
    accession_number TEXT NOT NULL DEFAULT '',
    scheduled_procedure_step_id TEXT NOT NULL DEFAULT '',
    dataset TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE INDEX worklist_study ON worklist_entries(study_instance_uid);
CREATE TABLE performed_procedure_steps (
    sop_instance_uid TEXT PRIMARY KEY,
    worklist_ref INTEGER REFERENCES worklist_entries(id) ON DELETE SET NULL,
    status TEXT NOT NULL,
    dataset TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE INDEX performed_steps_entry ON performed_procedure_steps(worklist_ref);
"""

#: Studies that recycling ([storage] when_full = recycle) and retention rules never delete. By
#: UID, not by row: protection holds while a study is absent and comes back with it.
PROTECTED_STUDIES = """
CREATE TABLE protected_studies (study_instance_uid TEXT PRIMARY KEY, since TEXT NOT NULL);
"""

#: Labels on studies and on series (an instance carries those of its study and series). They are
#: keyed by UID, not by the rows' ids: a study's or series' row goes when its last instance is
#: unindexed (a file re-indexed, 'dicoogled reindex' empties the tables) and comes back with a new
#: id, and a study moved to another patient keeps its UID. A label set by hand is a decision about
#: the study, not about one indexing of its files, so it outlives them. A collection can be built
#: on the same tables: a label whose members are these rows.
LABEL_TABLES = """
CREATE TABLE study_labels (
    study_instance_uid TEXT NOT NULL, label TEXT NOT NULL, added TEXT NOT NULL,
    PRIMARY KEY (study_instance_uid, label)
) WITHOUT ROWID;
CREATE INDEX study_labels_label ON study_labels(label);
CREATE TABLE series_labels (
    series_instance_uid TEXT NOT NULL, label TEXT NOT NULL, added TEXT NOT NULL,
    PRIMARY KEY (series_instance_uid, label)
) WITHOUT ROWID;
CREATE INDEX series_labels_label ON series_labels(label);
"""

#: When each study last received an instance, whether it has been announced stable since, and
#: the webhook deliveries not yet made: kept in the index so that a restart loses none of them.
STUDY_EVENTS = """
CREATE INDEX studies_unannounced ON studies(last_arrival) WHERE NOT stable_announced;
CREATE TABLE webhook_deliveries (
    id INTEGER PRIMARY KEY,
    delivery_id TEXT NOT NULL UNIQUE,  -- sent with every attempt: the receiver dedupes on it
    hook TEXT NOT NULL,                -- its name in [webhooks]
    event TEXT NOT NULL,
    body TEXT NOT NULL,                -- the JSON sent, the same bytes on every attempt
    created REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',  -- pending, delivered or failed (gave up)
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    finished REAL
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries(next_attempt) WHERE status = 'pending';
"""

#: version -> the SQL that brings an index of that version to the next one.
MIGRATIONS = {
    1: ORIGIN_TOTALS + "INSERT INTO origin_totals SELECT origin, count(*), sum(size) FROM instances GROUP BY origin;",
    2: WORKLIST_SCHEMA,
    3: PROTECTED_STUDIES,
    4: LABEL_TABLES,
    # Studies already in the index count as announced: an upgrade does not fire for all of them.
    5: "ALTER TABLE studies ADD COLUMN last_arrival REAL NOT NULL DEFAULT 0;"
       " ALTER TABLE studies ADD COLUMN stable_announced INTEGER NOT NULL DEFAULT 0;"
       " UPDATE studies SET stable_announced = 1;" + STUDY_EVENTS,
}

#: The indexes of the level tables, in both engines' schemas.
LEVEL_INDEXES = """CREATE INDEX patients_id ON patients(patient_id);
CREATE INDEX patients_name ON patients(patient_name_folded);
CREATE INDEX patients_birth_date ON patients(patient_birth_date);
CREATE INDEX studies_patient ON studies(patient_ref);
CREATE INDEX studies_date ON studies(study_date);
CREATE INDEX studies_accession ON studies(accession_number);
CREATE INDEX series_study ON series(study_ref);
CREATE INDEX series_modality ON series(modality);
CREATE INDEX instances_series ON instances(series_ref);"""

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
    last_arrival REAL NOT NULL DEFAULT 0,  -- time.time() of its newest instance
    stable_announced INTEGER NOT NULL DEFAULT 0,  -- 1 once found stable, 0 again when one arrives
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
{LEVEL_INDEXES}
-- All metadata of each instance as text "Keyword value ...", rowid = instances.id.
CREATE VIRTUAL TABLE metadata USING fts5(
    body, content='', contentless_delete=1, tokenize='unicode61 remove_diacritics 2'
);
-- Folders indexed in place (index PATH, tasks), so that reindex can find them again.
CREATE TABLE indexed_roots (path TEXT PRIMARY KEY, added TEXT NOT NULL);
{ORIGIN_TOTALS}{WORKLIST_SCHEMA}{PROTECTED_STUDIES}{LABEL_TABLES}{STUDY_EVENTS}"""

#: The index's tables that a copy into another database (dicoogled migrate) copies row by row:
#: all but the full text, made again there from each instance's metadata (metadata_words) as
#: that engine writes it, and origin_totals, which that database's triggers count again.
COPIED_TABLES = tuple(table for table in re.findall(r"CREATE TABLE (\w+)", SCHEMA) if table != "origin_totals")

#: The same index in PostgreSQL. What differs from SQLite: identity columns for INTEGER PRIMARY
#: KEY; text compared byte by byte (COLLATE "C"), as SQLite compares it, so ranges, ORDER BY and
#: path prefixes agree; the full text as a tsvector of the tokens SQLite's FTS5 makes (made in
#: Python, _fts_tokens, so both engines match the same words), in a table named as SQLite's;
#: triggers as functions; the schema's version in a table; no foreign keys, as in the SQLite index
#: (whose connections never turned them on): the writer keeps the references itself. And three
#: of SQLite's functions that the index's SQL calls: glob, group_concat and datetime('now').
POSTGRESQL_SCHEMA = f"""
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE FUNCTION glob(pattern TEXT, value TEXT) RETURNS BOOLEAN LANGUAGE sql IMMUTABLE AS $$
    SELECT value LIKE replace(replace(replace(replace(replace(replace(
        pattern, '\\', '\\\\'), '%', '\\%'), '_', '\\_'), '[[]', '['), '*', '%'), '?', '_') $$;
CREATE FUNCTION comma_join(TEXT, TEXT) RETURNS TEXT LANGUAGE sql IMMUTABLE STRICT AS $$ SELECT $1 || ',' || $2 $$;
CREATE AGGREGATE group_concat(TEXT) (SFUNC = comma_join, STYPE = TEXT);
CREATE FUNCTION datetime(moment TEXT) RETURNS TEXT LANGUAGE sql STABLE AS $$
    SELECT to_char(CASE WHEN moment = 'now' THEN now() ELSE moment::timestamptz END AT TIME ZONE 'UTC',
                   'YYYY-MM-DD HH24:MI:SS') $$;
CREATE TABLE patients (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    patient_key TEXT COLLATE "C" NOT NULL UNIQUE,
    first_instance BIGINT,
    {_level_columns("PATIENT", 'TEXT COLLATE "C"')}
);
CREATE TABLE studies (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    patient_ref BIGINT NOT NULL,
    first_instance BIGINT,
    {_level_columns("STUDY", 'TEXT COLLATE "C"')},
    last_arrival DOUBLE PRECISION NOT NULL DEFAULT 0,
    stable_announced INTEGER NOT NULL DEFAULT 0,
    UNIQUE (study_instance_uid)
);
CREATE TABLE series (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    study_ref BIGINT NOT NULL,
    first_instance BIGINT,
    {_level_columns("SERIES", 'TEXT COLLATE "C"')},
    UNIQUE (series_instance_uid)
);
CREATE TABLE instances (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    series_ref BIGINT NOT NULL,
    {_level_columns("IMAGE", 'TEXT COLLATE "C"')},
    transfer_syntax TEXT COLLATE "C" NOT NULL DEFAULT '',
    path TEXT COLLATE "C" NOT NULL UNIQUE,
    origin TEXT COLLATE "C" NOT NULL,
    size BIGINT NOT NULL,
    mtime_ns BIGINT NOT NULL,
    meta TEXT NOT NULL,
    UNIQUE (sop_instance_uid)
);
{LEVEL_INDEXES}
CREATE FUNCTION token_count(body TSVECTOR) RETURNS INTEGER LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(max(place), 0) FROM unnest(body) AS lexemes, unnest(lexemes.positions) AS place $$;
CREATE TABLE metadata (rowid BIGINT PRIMARY KEY, body TSVECTOR NOT NULL,
                       tokens INTEGER GENERATED ALWAYS AS (token_count(body)) STORED);
CREATE INDEX metadata_body ON metadata USING gin (body);
CREATE TABLE indexed_roots (path TEXT COLLATE "C" PRIMARY KEY, added TEXT NOT NULL);
CREATE TABLE origin_totals (origin TEXT COLLATE "C" PRIMARY KEY, instances BIGINT NOT NULL, bytes BIGINT NOT NULL);
CREATE FUNCTION count_origin() RETURNS TRIGGER LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE origin_totals SET instances = instances - 1, bytes = bytes - OLD.size WHERE origin = OLD.origin;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO origin_totals VALUES (NEW.origin, 1, NEW.size) ON CONFLICT (origin)
        DO UPDATE SET instances = origin_totals.instances + 1, bytes = origin_totals.bytes + NEW.size;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER instance_counted AFTER INSERT OR DELETE ON instances FOR EACH ROW EXECUTE FUNCTION count_origin();
CREATE TRIGGER instance_recounted AFTER UPDATE OF origin, size ON instances FOR EACH ROW EXECUTE FUNCTION count_origin();
CREATE TABLE worklist_entries (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    state TEXT COLLATE "C" NOT NULL DEFAULT 'SCHEDULED',
    study_instance_uid TEXT COLLATE "C" NOT NULL,
    accession_number TEXT COLLATE "C" NOT NULL DEFAULT '',
    scheduled_procedure_step_id TEXT COLLATE "C" NOT NULL DEFAULT '',
    dataset TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE INDEX worklist_study ON worklist_entries(study_instance_uid);
CREATE TABLE performed_procedure_steps (
    sop_instance_uid TEXT COLLATE "C" PRIMARY KEY,
    worklist_ref BIGINT,
    status TEXT NOT NULL,
    dataset TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE INDEX performed_steps_entry ON performed_procedure_steps(worklist_ref);
CREATE TABLE protected_studies (study_instance_uid TEXT COLLATE "C" PRIMARY KEY, since TEXT NOT NULL);
CREATE TABLE study_labels (
    study_instance_uid TEXT COLLATE "C" NOT NULL, label TEXT COLLATE "C" NOT NULL, added TEXT NOT NULL,
    PRIMARY KEY (study_instance_uid, label)
);
CREATE INDEX study_labels_label ON study_labels(label);
CREATE TABLE series_labels (
    series_instance_uid TEXT COLLATE "C" NOT NULL, label TEXT COLLATE "C" NOT NULL, added TEXT NOT NULL,
    PRIMARY KEY (series_instance_uid, label)
);
CREATE INDEX series_labels_label ON series_labels(label);
CREATE INDEX studies_unannounced ON studies(last_arrival) WHERE stable_announced = 0;
CREATE TABLE webhook_deliveries (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    delivery_id TEXT COLLATE "C" NOT NULL UNIQUE,
    hook TEXT COLLATE "C" NOT NULL,
    event TEXT COLLATE "C" NOT NULL,
    body TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    status TEXT COLLATE "C" NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt DOUBLE PRECISION NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    finished DOUBLE PRECISION
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries(next_attempt) WHERE status = 'pending';
INSERT INTO schema_version VALUES ({SCHEMA_VERSION});
"""

#: version -> the SQL that brings a PostgreSQL index of that version to the next one (its schema
#: began at version 6: a change to SCHEMA is made here too).
POSTGRESQL_MIGRATIONS: dict[int, str] = {}



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


def metadata_words(meta: dict) -> list[str]:
    """The words of an instance's searchable text, made from its metadata: 'Keyword value' for
    every value (each of a multi-valued one), a sequence's keyword and then its items' words.
    The text is a function of the metadata alone, so a copy of the index into another engine
    (dicoogled migrate) makes the same text again from the metadata it keeps."""
    words = []
    for key, value in meta.items():
        if isinstance(value, list) and all(isinstance(item, dict) for item in value):  # a sequence
            words.append(key)
            for item in value:
                words += metadata_words(item)
        else:
            for item in value if isinstance(value, list) else (value,):
                words += (key, item if isinstance(item, str) else str(item))  # a plugin's field may be a number
    return words


def extract_metadata(dataset: Dataset) -> tuple[dict, list[str]]:
    """Flatten a data set (pixel data excluded) into the index's metadata and FTS5 words.

    Sequences keep their items as lists of dicts; every element, private ones and those inside
    sequences included, contributes 'Keyword value' to the searchable text (metadata_words).
    """

    def walk(ds: Dataset, encodings) -> dict:
        meta = {}
        encodings = _dataset_encodings(ds, encodings)
        # The elements as read, raw ones undecoded; tags as plain ints, which compare and hash
        # in C (pydicom's BaseTag compares in Python, and this loop is per element).
        for tag, element in ds.items():
            tag = int(tag)
            if tag >> 16 == 0x0002 or tag == 0x7FE00010:
                continue
            key, vr = _tag_info(tag)
            try:
                # Explicit UN of a known tag, and sequences, are left to pydicom to decode. So is
                # a raw element without value (a deferred read, or an empty one of some VRs).
                if (getattr(element, "is_raw", False) and element.value is not None and vr != "SQ"
                        and not (element.VR == "UN" and vr != "UN")):
                    value = _fast_raw_value(element, element.VR or vr, encodings)
                    if value is _SLOW:
                        value = _text_value(ds[tag])
                else:
                    element = ds[tag]
                    if element.VR == "SQ":
                        meta[key] = [walk(item, encodings) for item in element.value]
                        continue
                    value = _text_value(element)
            except Exception as error:  # one malformed element must not hide the rest
                log.debug("element %s unreadable: %s", key, error)
                continue
            if value is None:
                continue
            meta[key] = value
        return meta

    meta = walk(dataset, None)
    return meta, metadata_words(meta)


def make_record(dataset: Dataset, path: str, origin: str, size: int, mtime_ns: int, extracted=None) -> InstanceRecord:
    """Build the index record of a data set read with stop_before_pixels; extracted is what
    extract_metadata(dataset) gave, when the caller has it already."""
    meta, words = extracted or extract_metadata(dataset)
    columns = {}
    for level in LEVELS:
        for keyword in LEVEL_ATTRIBUTES[level]:
            value = meta.get(keyword, "")
            columns[keyword] = "\\".join(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else (value if isinstance(value, str) else "")
    transfer_syntax = ""
    if getattr(dataset, "file_meta", None) is not None:
        transfer_syntax = str(dataset.file_meta.get("TransferSyntaxUID", ""))
    return InstanceRecord(path, origin, size, mtime_ns, transfer_syntax, columns, meta, " ".join(words))


#: The states of a worklist entry: scheduled, then as its modality reports by MPPS (PS3.3 C.4.14,
#: Performed Procedure Step Status: IN PROGRESS, COMPLETED, DISCONTINUED).
WORKLIST_STATES = ("SCHEDULED", "IN PROGRESS", "COMPLETED", "DISCONTINUED")


class WorklistEntry(typing.NamedTuple):
    """One scheduled procedure step of the Modality Worklist, as the index answers it."""
    id: int
    state: str  # one of WORKLIST_STATES
    study_instance_uid: str
    accession_number: str
    scheduled_procedure_step_id: str
    dataset: dict  # its attributes as DICOM JSON (PS3.18 F.2)
    created: str
    updated: str

    def as_json(self) -> dict:
        """The entry as GET /worklist and dicoogle.worklist() answer it."""
        return {"id": self.id, "state": self.state, "StudyInstanceUID": self.study_instance_uid,
                "AccessionNumber": self.accession_number, "ScheduledProcedureStepID": self.scheduled_procedure_step_id,
                "created": self.created, "updated": self.updated, "dataset": self.dataset}


class PerformedProcedureStep(typing.NamedTuple):
    """One Modality Performed Procedure Step (an MPPS SOP instance) a modality created."""
    sop_instance_uid: str
    worklist_ref: int | None  # the worklist entry it performs, if one was found
    status: str  # PerformedProcedureStepStatus
    dataset: dict  # its attributes as DICOM JSON
    created: str
    updated: str


_WORKLIST_COLUMNS = "id, state, study_instance_uid, accession_number, scheduled_procedure_step_id, dataset, created, updated"
_PERFORMED_STEP_COLUMNS = "sop_instance_uid, worklist_ref, status, dataset, created, updated"


def _worklist_entry(row) -> WorklistEntry:
    return WorklistEntry(*row[:5], json.loads(row[5]), *row[6:])


def _performed_step(row) -> PerformedProcedureStep:
    return PerformedProcedureStep(*row[:3], json.loads(row[3]), *row[4:])


class IndexedInstance(typing.NamedTuple):
    """One indexed instance, as every look-up in the index answers it."""
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str  # where it is kept: a file's path, or the URI a storage plugin gave it
    size: int
    mtime_ns: int
    origin: str  # 'store', 'stow', 'import', 'watch' or 'index'


class ArchiveMember(typing.NamedTuple):
    """One instance of a download (ZIP or DICOM media), with what names its entry."""
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    path: str  # where it is kept: a file's path, or the URI a storage plugin gave it
    size: int


class LabelCount(typing.NamedTuple):
    """A label and how many indexed studies carry it, themselves or on one of their series."""
    label: str
    studies: int


class KeptState(typing.NamedTuple):
    """What an index keeps through a rebuild from the files (Index.kept_through_rebuild)."""
    roots: list  #: folders and files indexed in place
    protected: list  #: StudyInstanceUIDs kept from recycling and retention
    labels: list  #: LabelRecord rows


class LabelRecord(typing.NamedTuple):
    """One label on one study or series, as a rebuilt index gets it back."""
    level: str  # STUDY or SERIES
    uid: str
    label: str
    added: str  # when it was set, UTC 'YYYY-MM-DD HH:MM:SS'


#: The label tables by the level they label, and the UID column that names what they label.
LABEL_LEVELS = {"STUDY": ("study_labels", "study_instance_uid"), "SERIES": ("series_labels", "series_instance_uid")}


#: A study st carries one of some labels ({marks}: one ? per label, bound twice), on itself or
#: on one of its series.
_STUDY_CARRIES_LABELS = (
    "(st.study_instance_uid IN (SELECT study_instance_uid FROM study_labels WHERE label IN ({marks}))"
    " OR EXISTS (SELECT 1 FROM series ls JOIN series_labels sl ON sl.series_instance_uid = ls.series_instance_uid"
    " WHERE ls.study_ref = st.id AND sl.label IN ({marks})))")


def _unprotected_study_test(protected_labels) -> tuple[str, tuple]:
    """(SQL condition, its arguments) that a study st is neither protected itself nor carries
    one of protected_labels: what recycling and retention may delete."""
    condition = "st.study_instance_uid NOT IN (SELECT study_instance_uid FROM protected_studies)"
    if not protected_labels:
        return condition, ()
    marks = ", ".join("?" * len(protected_labels))
    return f"{condition} AND NOT {_STUDY_CARRIES_LABELS.format(marks=marks)}", (*protected_labels, *protected_labels)


@dataclasses.dataclass(frozen=True)
class Visibility:
    """What one caller (an HTTP request, a DICOM association) may see of the archive: everything,
    or only the studies in some collections (a study is in collection L when it, or one of its
    series, carries label L) and the studies named by UID (a share link). Computed once per
    request or association; every reader of patient data takes it and the Index makes it part
    of its SQL (visible_study_condition), so paging and counts stay right."""
    restricted: bool = False
    labels: frozenset = frozenset()  #: collections whose studies are visible
    study_uids: frozenset = frozenset()  #: studies visible by name

    @classmethod
    def of(cls, labels=(), study_uids=()) -> "Visibility":
        """A restricted visibility: the studies in these collections and these studies, nothing else."""
        return cls(True, frozenset(labels), frozenset(study_uids))

    @property
    def everything(self) -> bool:
        return not self.restricted


#: An unrestricted caller: an administrator, and everyone when no collection limits them.
EVERYTHING = Visibility()
#: A caller limited to no collection at all.
NOTHING = Visibility.of()
#: The visibility of the HTTP request being answered (EVERYTHING outside any): the plugin API's
#: readers of patient data (dicoogle.find, .instances, .search, .tags, .file) answer within it, so a
#: plugin's web service (DICOMweb, the viewer's data) never shows more than the REST API would.
CALLER_VISIBILITY: contextvars.ContextVar = contextvars.ContextVar("caller_visibility", default=EVERYTHING)


def visible_study_condition(visibility: Visibility) -> tuple[str, tuple]:
    """(SQL condition, its arguments) that the study aliased st is visible; "1" for everything.
    Lists travel as JSON arrays (json_each), however many studies a share names."""
    if visibility.everything:
        return "TRUE", ()
    labels, uids = json.dumps(sorted(visibility.labels)), json.dumps(sorted(visibility.study_uids))
    return ("(st.study_instance_uid IN (SELECT value FROM json_each(?))"
            " OR st.study_instance_uid IN (SELECT study_instance_uid FROM study_labels"
            "  WHERE label IN (SELECT value FROM json_each(?)))"
            " OR EXISTS (SELECT 1 FROM series vs JOIN series_labels vl ON vl.series_instance_uid = vs.series_instance_uid"
            "  WHERE vs.study_ref = st.id AND vl.label IN (SELECT value FROM json_each(?))))"), (uids, labels, labels)


#: The columns of an IndexedInstance, from instances aliased i.
_INSTANCE_COLUMNS = "i.id, i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax, i.path, i.size, i.mtime_ns, i.origin"
#: instances i joined to their series se and studies st, for look-ups by a parent's UID.
_INSTANCE_PARENTS = "instances i JOIN series se ON se.id = i.series_ref JOIN studies st ON st.id = se.study_ref"
#: The columns of the study, series and instance UIDs there.
_UID_COLUMNS = ("st.study_instance_uid", "se.series_instance_uid", "i.sop_instance_uid")


#: The first (lowest id) instance below a series, study or patient, by its id.
_FIRST_INSTANCE_OF = {
    "series": "SELECT min(id) FROM instances WHERE series_ref = ?",
    "studies": "SELECT min(i.id) FROM instances i JOIN series se ON se.id = i.series_ref WHERE se.study_ref = ?",
    "patients": "SELECT min(i.id) FROM instances i JOIN series se ON se.id = i.series_ref"
                " JOIN studies st ON st.id = se.study_ref WHERE st.patient_ref = ?",
}


class StoredStudy(typing.NamedTuple):
    """A study the archive holds received objects of: what recycling weighs."""

    study_instance_uid: str
    instances: int
    bytes: int
    last_arrival_ns: int  #: when its newest instance was written (its file's mtime)


class QuietStudy(typing.NamedTuple):
    """A study not announced stable since its newest instance arrived."""
    study_instance_uid: str
    last_arrival: float  # time.time() of that instance


class Delivery(typing.NamedTuple):
    """One webhook delivery: an event for one hook, queued in the index until it is made."""
    delivery_id: str
    hook: str
    event: str
    body: str
    created: float = 0.0
    status: str = "pending"  # pending, delivered or failed (gave up)
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    finished: float | None = None


_DELIVERY_COLUMNS = "delivery_id, hook, event, body, created, status, attempts, next_attempt, last_error, finished"


class QueryError(ValueError):
    """An identifier that cannot be answered; status is the DICOM status. Its text is ours and
    fit for the client (never the database's)."""

    def __init__(self, message: str, status: int = UNABLE_TO_PROCESS):
        super().__init__(message)
        self.status = status


# ---- C-FIND in SQL: PS3.4 C.2.2.2's matching on the columns -------------------------------

def _balanced_sql(conditions: list[str], operator: str) -> str:
    """Conditions joined by AND or OR as a balanced tree: SQLite allows expressions 1000 deep."""
    if len(conditions) == 1:
        return conditions[0]
    middle = len(conditions) // 2
    return f"({_balanced_sql(conditions[:middle], operator)} {operator} {_balanced_sql(conditions[middle:], operator)})"


def _any_of(expression: str, operator: str, values: list[str], args: list) -> str:
    """SQL true when `expression = value`, or with operator "glob" `glob(value, expression)`
    (SQLite's GLOB, which the PostgreSQL schema defines too), holds for one of values.
    A list travels as one JSON array (json_each), never as an OR of terms or a list of
    parameters: SQLite allows expressions only 1000 deep and 32766 parameters, and C-FIND
    lists of UIDs or names can be longer."""
    if len(values) == 1:
        args.append(values[0])
        return f"{expression} = ?" if operator == "=" else f"glob(?, {expression})"
    args.append(json.dumps(values))
    if operator == "=":
        return f"{expression} IN (SELECT value FROM json_each(?))"
    return f"EXISTS (SELECT 1 FROM json_each(?) WHERE glob(value, {expression}))"


def _glob_escape(text: str) -> str:
    """SQLite GLOB pattern for a DICOM pattern: keep * and ?, make [ literal."""
    return text.replace("[", "[[]")


def _range_bounds(value: str) -> tuple[str, str] | None:
    if "-" not in value:
        return None
    low, _, high = value.partition("-")
    return low.strip(), high.strip()


def _is_universal(pattern) -> bool:
    """An empty key, '*', or a sequence whose item has only such keys: it matches everything,
    entities without the attribute included (PS3.4 C.2.2.2.3 and C.2.2.2.6)."""
    if isinstance(pattern, list):
        return not pattern or all(_is_universal(value) for _, value in pattern[0].values())
    return pattern in ("", "*")


#: Attributes computed from the hierarchy rather than stored: (the level they belong to, SQL).
COMPUTED_ATTRIBUTES = {
    "NumberOfPatientRelatedStudies": ("PATIENT", "SELECT count(*) FROM studies WHERE patient_ref = p.id"),
    "NumberOfPatientRelatedSeries": ("PATIENT", "SELECT count(*) FROM series se2 JOIN studies st2 ON st2.id = se2.study_ref WHERE st2.patient_ref = p.id"),
    "NumberOfPatientRelatedInstances": ("PATIENT", "SELECT count(*) FROM instances i2 JOIN series se2 ON se2.id = i2.series_ref JOIN studies st2 ON st2.id = se2.study_ref WHERE st2.patient_ref = p.id"),
    "NumberOfStudyRelatedSeries": ("STUDY", "SELECT count(*) FROM series WHERE study_ref = st.id"),
    "NumberOfStudyRelatedInstances": ("STUDY", "SELECT count(*) FROM instances i2 JOIN series se2 ON se2.id = i2.series_ref WHERE se2.study_ref = st.id"),
    # group_concat joins with ','; CS and UI values never hold one, so make it DICOM's '\'. Sorted,
    # so that both engines list them alike.
    "ModalitiesInStudy": ("STUDY", "SELECT replace(group_concat(v), ',', '\\') FROM (SELECT DISTINCT modality AS v FROM series"
                                   " WHERE study_ref = st.id AND modality != '' ORDER BY v) AS listed"),
    "SOPClassesInStudy": ("STUDY", "SELECT replace(group_concat(v), ',', '\\') FROM (SELECT DISTINCT i2.sop_class_uid AS v FROM instances i2"
                                   " JOIN series se2 ON se2.id = i2.series_ref WHERE se2.study_ref = st.id ORDER BY v) AS listed"),
    "NumberOfSeriesRelatedInstances": ("SERIES", "SELECT count(*) FROM instances WHERE series_ref = se.id"),
}


#: The patient-level counts for a caller who sees only some studies: {visible} is the condition
#: (visible_study_condition) on the studies st counted.
VISIBLE_PATIENT_COUNTS = {
    "NumberOfPatientRelatedStudies": "SELECT count(*) FROM studies st WHERE st.patient_ref = p.id AND {visible}",
    "NumberOfPatientRelatedSeries": "SELECT count(*) FROM series se2 JOIN studies st ON st.id = se2.study_ref"
                                    " WHERE st.patient_ref = p.id AND {visible}",
    "NumberOfPatientRelatedInstances": "SELECT count(*) FROM instances i2 JOIN series se2 ON se2.id = i2.series_ref"
                                       " JOIN studies st ON st.id = se2.study_ref WHERE st.patient_ref = p.id AND {visible}",
}


def _level_joins(level: str) -> str:
    """patients p joined down to the level's table (studies st, series se, instances i)."""
    joins = ["patients p", "JOIN studies st ON st.patient_ref = p.id", "JOIN series se ON se.study_ref = st.id",
             "JOIN instances i ON i.series_ref = se.id"]
    return " ".join(joins[:LEVELS.index(level) + 1])


def _level_column(keyword: str, level_limit: str) -> str | None:
    """The SQL column (its folded copy for a person name) of a main attribute at or above
    level_limit, else None."""
    for level in LEVELS[: LEVELS.index(level_limit) + 1]:
        if keyword in LEVEL_ATTRIBUTES[level]:
            return f"{LEVEL_ALIASES[level]}.{_snake_case(keyword)}" + ("_folded" if keyword in FOLDED_ATTRIBUTES else "")
    return None


def _is_computed(keyword: str, level: str) -> bool:
    return keyword in COMPUTED_ATTRIBUTES and LEVELS.index(COMPUTED_ATTRIBUTES[keyword][0]) <= LEVELS.index(level)


def _column_condition(expression: str, key, args: list) -> str:
    """SQL matching a main attribute's column to a C-FIND key, by the rules of match_value."""
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
    candidates = [_fold(c) if vr == "PN" else c for c in value.split("\\")]
    is_pattern = [vr != "UI" and ("*" in c or "?" in c) for c in candidates]
    exact = [c for c, pattern in zip(candidates, is_pattern) if not pattern]
    patterns = [_glob_escape(c) for c, pattern in zip(candidates, is_pattern) if pattern]
    alternatives = ([_any_of(expression, "=", exact, args)] if exact else []) + \
                   ([_any_of(expression, "glob", patterns, args)] if patterns else [])
    return "(" + " OR ".join(alternatives) + ")"


def _fts_prefilter(key) -> str:
    """An FTS5 query that every instance matching a C-FIND key satisfies (a superset)."""
    if key.vr == "SQ" or not key.value or "\\" in key.value or (key.vr in DATE_TIME_VRS and "-" in key.value):
        return _fts_phrase(_fts_tokens(key.keyword))
    literal = re.split(r"[*?]", key.value, maxsplit=1)[0]
    if key.vr == "PN" or not literal.isascii():
        # FTS5 keeps letters that _fold changes (ß, Ё, ligatures), and names match folded:
        # the words could miss a match, so only the keyword is a safe prefilter.
        return _fts_phrase(_fts_tokens(key.keyword))
    tokens = _fts_tokens(key.keyword) + _fts_tokens(literal)
    # A wildcard (or any text) right after the literal part makes its last token a prefix.
    open_ended = literal != key.value and literal and not re.search(r"[\W_]$", literal)
    return _fts_phrase(tokens, prefix=bool(open_ended))


#: LIMIT for no limit: both engines take the largest integer (PostgreSQL refuses SQLite's -1).
NO_LIMIT = 2 ** 63 - 1
#: The most keys one C-FIND or QIDO identifier may match (return keys are not counted): far above
#: what a viewer sends, and a bound on a hostile identifier's cost that is the same on both
#: engines (PostgreSQL plans a condition per key; tens of thousands took it longer than any
#: client waits, where SQLite refused the statement's 32,766 parameters).
MAX_MATCHING_KEYS = 128


class FoundEntity(typing.NamedTuple):
    """A patient, study, series or instance that Index.find matched."""
    id: int  #: its row at its level
    representative: int  #: the instance whose metadata stands for it (the first indexed; itself at IMAGE)
    values: dict  #: keyword -> stored value of each key the index answers (Index.answers)


# ---- the search language in SQL -------------------------------------------------------------

#: Main attributes and where they live, for search clauses answered by a column.
SEARCH_COLUMNS = {k: f"{LEVEL_ALIASES[level]}.{_snake_case(k)}" for level in LEVELS for k in LEVEL_ATTRIBUTES[level]}
SEARCH_COLUMNS["uri"] = "i.path"


#: The condition of label:PATTERN: the instance's study or series carries a label matching the
#: pattern (GLOB: a pattern holds no '[', so only * and ? are wildcards).
LABEL_CONDITION = ("(st.study_instance_uid IN (SELECT study_instance_uid FROM study_labels WHERE glob(?, label))"
                   " OR se.series_instance_uid IN (SELECT series_instance_uid FROM series_labels WHERE glob(?, label)))")

#: The condition compile_search makes of free text, the whole of it for a query of free text alone.
FREE_TEXT_CONDITION = "i.id IN (SELECT rowid FROM metadata WHERE metadata MATCH ?)"


#: The condition that an instance is one of a JSON list of ids (rules resolved in Python).
_LISTED_INSTANCE = "i.id IN (SELECT CAST(value AS BIGINT) FROM json_each(?))"


def compile_search(query, text_query=lambda fts5: fts5, resolver=None) -> tuple[str, list, str | None]:
    """SQL condition over instances (aliases p, st, se, i) of a parsed query (a SearchQuery), its
    arguments, and the FTS5 query used to rank results (None when the query has no free text).
    User text only ever travels as bound parameters and as quoted FTS5 strings (text_query puts
    them in the engine's form). With a resolver (an Index whose engine cannot call the search
    rules from SQL), the rules are applied first, in Python, and the condition names what matched."""
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
            return "TRUE"
        if kind in ("and", "or"):
            return _balanced_sql([walk(child, positive) for child in node[1]], kind.upper())
        if kind == "not":
            return f"NOT {walk(node[1], not positive)}"
        if kind == "label":
            args.extend([node[1], node[1]])
            return LABEL_CONDITION
        if kind == "text":
            if not _fts_tokens(node[1]):
                return "FALSE"  # punctuation alone is no word: it matches nothing
            fts = text_fts(node[1], node[2])
            if fts is None:
                if resolver is not None:
                    args.append(json.dumps(resolver._instances_with_word(json.dumps(["match", node[1]]))))
                    return _LISTED_INSTANCE
                args.append(json.dumps(["match", node[1]]))
                return "search_text_matches(i.meta, ?)"
            if positive:
                ranked.append(f"({fts})")
            args.append(text_query(fts))
            return FREE_TEXT_CONDITION
        # ("field", keyword, value)
        keyword, value = node[1], node[2]
        spec = json.dumps(list(value))
        if keyword in SEARCH_COLUMNS and value[0] == "uid":
            # A UID column: equality, or GLOB for a prefix, both served by the column's index.
            wildcard = "*" in value[1] or "?" in value[1]
            args.append(_glob_escape(value[1]) if wildcard else value[1])
            return f"glob(?, {SEARCH_COLUMNS[keyword]})" if wildcard else f"{SEARCH_COLUMNS[keyword]} = ?"
        if keyword in SEARCH_COLUMNS and resolver is not None:
            args.append(json.dumps(resolver._values_matching(SEARCH_COLUMNS[keyword], spec)))
            return f"{SEARCH_COLUMNS[keyword]} IN (SELECT value FROM json_each(?))"
        if keyword in SEARCH_COLUMNS:
            args.append(spec)
            return f"search_value_matches(?, {SEARCH_COLUMNS[keyword]})"
        path = keyword.split("_")
        # FTS5 narrows the candidates to instances holding the keyword and the value's words
        # (a superset); the exact rule is then checked on the metadata.
        head = "" if value[0] == "range" else re.split(r"[*?]", value[1])[0]
        words, wildcard = _fts_tokens(head), value[0] != "range" and head != value[1]
        # Before a wildcard the last word is only a prefix: al* must find alpha.
        prefilter = " AND ".join([_fts_phrase([w]) for w in _fts_tokens(path[-1])]
                                 + [_fts_phrase([w], prefix=wildcard and n == len(words) - 1) for n, w in enumerate(words)])
        if resolver is not None:
            args.append(json.dumps(resolver._instances_matching_meta(text_query(prefilter), spec, path)))
            return _LISTED_INSTANCE
        top_level = f'$."{path[0]}"' if len(path) == 1 else "$.__none__"
        args.extend([text_query(prefilter), top_level, spec, json.dumps(path)])
        return ("(i.id IN (SELECT rowid FROM metadata WHERE metadata MATCH ?)"
                " AND search_meta_matches(json_extract(i.meta, ?), i.meta, ?, ?))")

    where = walk(query.tree)
    return where, args, " OR ".join(ranked) if ranked else None


def register_search_functions(connection: apsw.Connection):
    """The SQL functions compile_search's conditions call (per connection, as apsw requires):
    the search language's own rules (field_value_matches, below in its section), run in SQL."""

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


#: A query's free-text matches come best first (FTS5's BM25) when there are at most this many;
#: beyond, in the order they were indexed. Scoring every match is most of the answer's time (15 ms
#: per 50,000 matches), and ranking half a million instances that all name a common word is not
#: worth the wait for the first page.
RANK_AT_MOST = 50_000


class SearchHit(typing.NamedTuple):
    """One instance a search-language query matched."""
    id: int
    path: str  #: where it is kept: a file's path, or the URI a storage plugin gave it
    meta: dict  #: every indexed element


# ---- the two engines: where their SQL differs, and nowhere else ----------------------------

class _SqliteConnection(apsw.Connection):
    """An apsw connection to an SQLite index, which knows its engine (see Index.engine)."""
    engine: "_SqliteEngine"


class _SqliteEngine:
    """The index in an SQLite file (apsw), the default: the dialect the index's SQL is written in."""

    name = "sqlite"
    errors = (apsw.Error,)
    #: What to do about an index that cannot be opened: a damaged file is rebuilt from the files.
    when_unopened = ": 'dicoogled reindex' rebuilds it from the files"

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.location = str(self.path)

    def connect(self) -> _SqliteConnection:
        connection = _SqliteConnection(str(self.path))
        connection.engine = self
        connection.setbusytimeout(10_000)
        # One PRAGMA per call: apsw runs a string of statements lazily and stops at the first that
        # returns a row, as journal_mode does, so whatever came after it in one string never ran.
        connection.pragma("journal_mode", "wal")
        # Commits are on disk when they return; commit_to_disk relaxes this for recoverable writes.
        connection.pragma("synchronous", "full")
        # Foreign keys stay unenforced (SQLite's default), as they always were: add_instance writes
        # an instance before its series exists and links the two after; Index keeps references right.
        register_search_functions(connection)
        return connection

    @staticmethod
    def commit_to_disk(connection, on_disk: bool):
        """Whether the next commits sync the WAL (see Index.write: recoverable writes need not)."""
        connection.pragma("synchronous", "full" if on_disk else "normal")

    def schema_version(self, connection) -> int:
        """0 for an empty database."""
        return connection.execute("PRAGMA user_version").fetchone()[0]

    @staticmethod
    def lock_schema(connection):
        """Nothing: one serve per SQLite data dir (its serve.lock), whose writer writes the schema."""

    schema, migrations = SCHEMA, MIGRATIONS

    def set_schema_version(self, connection, version: int):
        connection.execute(f"PRAGMA user_version={int(version)}")

    #: Readers are the threads' own connections (an SQLite connection is cheap and serves one
    #: thread at a time), closed when their thread ends.
    shared_reader = None
    #: A cursor yields its rows as they are found: Index.find reads its matches in one statement.
    rows_per_read = None

    def close(self):
        pass

    def max_parameters(self, connection) -> int:
        return connection.limit(apsw.SQLITE_LIMIT_VARIABLE_NUMBER, -1)

    def roll_back_failed(self, connection):
        """End the transaction a failed batch left open (SQLite may leave a failed commit's)."""
        if not connection.getautocommit():
            with contextlib.suppress(apsw.Error):
                connection.execute("ROLLBACK")

    @staticmethod
    def full_text_document(text: str):
        """What the metadata table keeps of an instance's text: FTS5 tokenizes it itself."""
        return text

    @staticmethod
    def text_query(fts5: str) -> str:
        """An FTS5 query (the form the index's code writes them in) as this engine takes it."""
        return fts5

    def ranked_matches(self, reader, fts5: str, scored: bool) -> tuple[str, list]:
        """(SQL, its arguments) of (rank_id, score) of the instances an FTS5 query matches: the
        lower the score, the better the match (FTS5's BM25), or 0 for all when not scored."""
        return f"SELECT rowid AS rank_id, {'bm25(metadata)' if scored else '0'} AS score FROM metadata WHERE metadata MATCH ?", [fts5]

    #: The search language's rules run inside SQL, as functions (register_search_functions).
    resolves_search_rules = False


#: SQLite's spellings in the index's SQL -> PostgreSQL's (glob, group_concat and datetime are
#: functions of the PostgreSQL schema instead).
_POSTGRESQL_SPELLINGS = (("metadata MATCH ?", "body @@ CAST(? AS tsquery)"),
                         ("json_each(?)", "json_array_elements_text(CAST(? AS json))"))

#: A part of an FTS5 query as the index writes them: a quoted phrase (its last token a prefix
#: with *), AND, OR, a parenthesis.
_FTS5_PART = re.compile(r'"((?:[^"]|"")*)"(\*?)|\b(AND|OR)\b|([()])|\s+')


#: A free-text condition as PostgreSQL reads it, and how many one statement may hold as joins.
#: PostgreSQL turns each `x IN (SELECT ...)` under AND into a join, and the time it takes to plan
#: joins grows steeply with their number: 40 free-text terms took 0.7 s to plan, and 1,600 (a
#: hostile query) ran the server out of memory. Beyond the few a real query has, each is written
#: `(x IN (SELECT ...)) IS TRUE`, which PostgreSQL leaves a subplan: one hashed look-up per row,
#: 40 of them planned in under a millisecond.
_FREE_TEXT_IN_POSTGRESQL = re.compile(r"([\w.]+ IN \(SELECT rowid FROM metadata WHERE body @@ CAST\(\? AS tsquery\)\))")
_FREE_TEXT_JOINS_AT_MOST = 8


@functools.lru_cache(maxsize=4096)
def _postgresql_spelling(sql: str) -> str:
    for sqlite, postgresql in _POSTGRESQL_SPELLINGS:
        sql = sql.replace(sqlite, postgresql)
    if len(_FREE_TEXT_IN_POSTGRESQL.findall(sql)) > _FREE_TEXT_JOINS_AT_MOST:
        sql = _FREE_TEXT_IN_POSTGRESQL.sub(r"(\1) IS TRUE", sql)
    return sql


#: Each match of a tsquery as (rowid, tokens, how often each phrase of the query occurs in it),
#: counted in the server: a row's tsvector is kilobytes, its counts a few integers. The phrases'
#: words come as five arrays (phrase number, place in it, word, prefix: the last word of a prefix
#: phrase, the phrase's length in words), then the number of phrases and the tsquery. A phrase
#: occurs at each start where every place of it has a position (positions are sets: a start
#: counts once); a prefix word stands for every lexeme that begins with it. Only the words'
#: lexemes are unnested, as a whole tsvector unnested costs more than all the rest: setweight
#: marks them A, ts_filter keeps those (full_text_document weighs no position). A row's lexemes
#: are listed, to find a prefix's, only if there is a prefix.
_PHRASE_FREQUENCIES = """
WITH word(phrase, place, word, prefix, length) AS (
    SELECT * FROM unnest(CAST(? AS integer[]), CAST(? AS integer[]), CAST(? AS text[]), CAST(? AS boolean[]),
                         CAST(? AS integer[])))
SELECT rowid, tokens, ARRAY(
    SELECT count(occurrence.start) FROM generate_series(1, ?) AS phrase(number)
    LEFT JOIN (SELECT word.phrase, position - word.place AS start
               FROM unnest(ts_filter(setweight(body, 'A', ARRAY(SELECT word FROM word WHERE NOT prefix) || ARRAY(
                        SELECT lexeme FROM unnest(tsvector_to_array(body)) AS lexeme
                        WHERE EXISTS (SELECT FROM word WHERE prefix)
                          AND lexeme ^@ ANY(ARRAY(SELECT word FROM word WHERE prefix)))), '{a}')) AS entry
               JOIN word ON entry.lexeme = word.word OR word.prefix AND starts_with(entry.lexeme, word.word)
               CROSS JOIN unnest(entry.positions) AS position
               GROUP BY word.phrase, word.length, start
               HAVING count(DISTINCT word.place) = word.length) AS occurrence ON occurrence.phrase = phrase.number
    GROUP BY phrase.number ORDER BY phrase.number)
FROM metadata WHERE metadata MATCH ?"""


def _tsquery_lexeme(token: str) -> str:
    return "'" + token.replace("\\", "\\\\").replace("'", "''") + "'"


class _PostgresEngine:
    """The index in a PostgreSQL database (a postgresql:// URL): the same tables, the same SQL
    but for _POSTGRESQL_SPELLINGS, the full text as tsvectors of FTS5's own tokens, and the search
    language's rules run in Python on what they apply to (Index._resolve_search_rules), since
    PostgreSQL cannot call into this process."""

    name = "postgresql"
    #: An index that cannot be opened is most often a server out of reach, not a damaged index
    #: (psycopg's error says what to check).
    when_unopened = ""

    def __init__(self, url: str):
        psycopg, _ = import_psycopg()
        self.errors = (psycopg.Error,)
        self.path = None  # no file: indexed folders are remembered in the database alone
        self.url = url
        self.location = re.sub(r"//[^@/]*@", "//", url)  # what logs and errors name: without a password

    #: The shared reader fetches a statement's rows whole before its connection goes back to the
    #: pool, so Index.find reads its matches this many at a time.
    rows_per_read = 5_000

    def connect(self) -> PostgresConnection:
        connection = PostgresConnection.connect(self.url, translate=_postgresql_spelling)
        connection.engine = self
        return connection

    @functools.cached_property
    def shared_reader(self) -> "_PooledReader":
        """The readers of every thread: a PostgreSQL connection costs a server process and
        milliseconds to open, and associations and requests come and go on threads of their own."""
        _, psycopg_pool = import_psycopg()
        pool = psycopg_pool.ConnectionPool(self.url, min_size=1, max_size=POSTGRESQL_READERS,
                                           kwargs={"autocommit": True}, open=True)
        return _PooledReader(pool, _postgresql_spelling)

    def close(self):
        if "shared_reader" in self.__dict__:
            self.shared_reader.pool.close()

    def schema_version(self, connection) -> int:
        if connection.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
            return 0
        return connection.execute("SELECT version FROM schema_version").fetchone()[0]

    schema, migrations = POSTGRESQL_SCHEMA, POSTGRESQL_MIGRATIONS

    @staticmethod
    def lock_schema(connection):
        """Until the transaction ends, wait for any other node writing the schema: of nodes
        starting at once on an empty database, one creates it and the others then find it (a
        concurrent CREATE TABLE IF NOT EXISTS of one name is an error in PostgreSQL)."""
        connection.execute("SELECT pg_advisory_xact_lock(hashtext('dicoogled index schema'))")

    def set_schema_version(self, connection, version: int):
        connection.execute("UPDATE schema_version SET version = ?", (version,))

    def max_parameters(self, connection) -> int:
        return 65_535  # the protocol's limit

    @staticmethod
    def commit_to_disk(connection, on_disk: bool):
        """Every commit is on disk (the server's default): a PostgreSQL server syncs its log for
        many nodes at once, and its crash is no node's start, whose reconciliation would redo them."""

    def roll_back_failed(self, connection):
        """Nothing to do: a failed transaction was rolled back when its block was left."""

    @staticmethod
    def full_text_document(text: str) -> str:
        """The tsvector (as text) of the tokens FTS5 makes of text, each with its positions, so a
        phrase matches as in FTS5 (PostgreSQL keeps positions up to 16,383)."""
        positions: dict[str, list[str]] = {}
        for position, token in enumerate(_fts_tokens(text), start=1):
            positions.setdefault(token, []).append(str(min(position, 16_383)))
        return " ".join(f"{_tsquery_lexeme(token)}:{','.join(places)}" for token, places in positions.items())

    @staticmethod
    def text_query(fts5: str) -> str:
        """An FTS5 query (phrases, prefixes, AND, OR, parentheses) as a tsquery: a phrase's tokens
        follow each other (<->), a prefix ends in :*."""
        parts = []
        for match in _FTS5_PART.finditer(fts5):
            phrase, prefix, operator, parenthesis = match.groups()
            if phrase is not None:
                tokens = [_tsquery_lexeme(token) for token in phrase.replace('""', '"').split()] or ["''"]
                parts.append("(" + " <-> ".join(tokens) + (":*" if prefix else "") + ")")
            elif operator:
                parts.append("&" if operator == "AND" else "|")
            elif parenthesis:
                parts.append(parenthesis)
        return " ".join(parts)

    def ranked_matches(self, reader, fts5: str, scored: bool) -> tuple[str, list]:
        """As _SqliteEngine.ranked_matches, the scores FTS5's BM25 gives (bm25_scores): the
        same order on both engines, so that a page of free-text matches is the same page."""
        if not scored:
            return "SELECT rowid AS rank_id, 0 AS score FROM metadata WHERE metadata MATCH ?", [self.text_query(fts5)]
        return ("SELECT CAST(value->>0 AS BIGINT) AS rank_id, CAST(value->>1 AS DOUBLE PRECISION) AS score"
                " FROM json_array_elements(CAST(? AS json))", [json.dumps(self.bm25_scores(reader, fts5))])

    def bm25_scores(self, reader, fts5: str) -> list[tuple[int, float]]:
        """(rowid, score) of every match of an FTS5 query, scored as FTS5's bm25() scores them
        (fts5_aux.c: k1 1.2, b 0.75, each phrase's IDF over the rows holding it, its frequency in
        the row, the row's length in tokens against the average), in the same floating point
        operations, so the scores are the same numbers."""
        k1, b = 1.2, 0.75
        parts = _FTS5_PART.findall(fts5)
        phrases = [(phrase.replace('""', '"').split(), bool(prefix)) for phrase, prefix, _, _ in parts if phrase or prefix]
        # A query of one phrase (no AND, no OR) matches the rows that hold it: they need no count.
        alone = len(phrases) == 1 and not any(operator for _, _, operator, _ in parts)
        rows, tokens = reader.execute("SELECT count(*), CAST(coalesce(sum(tokens), 0) AS BIGINT) FROM metadata").fetchone()
        average_length = float(tokens) / float(rows) if rows else 1.0
        places = [(number, place, word, prefix and place == len(words), len(words))
                  for number, (words, prefix) in enumerate(phrases, start=1) for place, word in enumerate(words, start=1)]
        columns = [[place[n] for place in places] for n in range(5)]
        matches = reader.execute(_PHRASE_FREQUENCIES, [*columns, len(phrases), self.text_query(fts5)]).fetchall()
        idf = []
        for words, prefix in phrases:
            phrase = self.text_query(_fts_phrase(words, prefix))
            hits = len(matches) if alone else reader.execute("SELECT count(*) FROM metadata WHERE metadata MATCH ?",
                                                             [phrase]).fetchone()[0]
            value = math.log((rows - hits + 0.5) / (hits + 0.5))
            idf.append(value if value > 0.0 else 1e-6)
        scores = []
        for rowid, length, frequencies in matches:
            score = 0.0
            for frequency, weight in zip(frequencies, idf):
                frequency = float(frequency)
                score += weight * ((frequency * (k1 + 1.0)) / (frequency + k1 * (1 - b + b * float(length) / average_length)))
            scores.append((rowid, -1.0 * score))
        return scores

    resolves_search_rules = True


#: At most this many connections read a PostgreSQL index at once.
POSTGRESQL_READERS = 8


class _FetchedRows(list):
    """A statement's rows, fetched: read as a cursor is (fetchone, fetchall, iteration)."""

    def fetchone(self):
        return self[0] if self else None

    def fetchall(self):
        return list(self)


class _PooledReader:
    """A reader that any thread may use at once: each statement runs on a connection borrowed
    from a pool for just that statement, its rows fetched before the connection goes back."""

    def __init__(self, pool, translate):
        self.pool, self.translate = pool, translate

    def execute(self, sql: str, args=()) -> _FetchedRows:
        with self.pool.connection() as raw:
            cursor = PostgresConnection(raw, self.translate).execute(sql, args)
            return _FetchedRows(cursor.fetchall() if cursor.description is not None else ())


def _index_engine(location):
    """The engine of an index at a location: a postgresql:// URL, or an SQLite file's path."""
    return _PostgresEngine(location) if is_postgresql_url(location) else _SqliteEngine(location)


class _WriteOp:
    __slots__ = ("function", "args", "recoverable", "future")

    def __init__(self, function, args, recoverable):
        self.function, self.args, self.recoverable = function, args, recoverable
        self.future = concurrent.futures.Future()


class Index:
    """The index, in an SQLite file or a PostgreSQL database: one writer connection that batches
    transactions, one reader per thread. Nothing else speaks SQL to it.

    Writes are queued and committed in groups (group commit), so several associations storing
    at once share transactions; each caller waits for its own commit before acknowledging. The
    writer thread runs the queue, unless a caller finds the writer idle: it then runs the queue
    itself, its own write and any queued meanwhile, and spares the two thread switches a hand-over
    costs (an association storing alone pays them on every instance).
    """

    BATCH = 256

    def __init__(self, location):
        """Open (creating or upgrading) the index at location: an SQLite file's path, or a
        postgresql:// URL."""
        #: Where the index is and how it is spoken to (_SqliteEngine, _PostgresEngine).
        self.engine = _index_engine(location)
        self.path = self.engine.path  #: the SQLite file, None in PostgreSQL
        self._local = threading.local()
        self._queue: "collections.deque[_WriteOp]" = collections.deque()
        self._wakeup = threading.Condition()
        self._writing = threading.Lock()  # held by whoever runs batches on the writer connection
        self._closed = False
        try:
            self._writer_connection = self.engine.connect()
            self._migrate(self._writer_connection)
        except self.engine.errors as error:
            raise RuntimeError(f"cannot open the index {self.engine.location} ({error}){self.engine.when_unopened}") from None
        self._writer = start_thread("index-writer", self._write_loop)

    def _migrate(self, connection):
        engine = self.engine
        with connection:  # all steps or none, and the version read and written by one node at a time
            engine.lock_schema(connection)
            version = engine.schema_version(connection)
            if version == SCHEMA_VERSION:
                return
            if version == 0:
                connection.execute(engine.schema)
                engine.set_schema_version(connection, SCHEMA_VERSION)
                return
            if version > SCHEMA_VERSION or any(v not in engine.migrations for v in range(version, SCHEMA_VERSION)):
                raise RuntimeError(
                    f"index {engine.location} has schema version {version}, this dicoogled knows {SCHEMA_VERSION}: "
                    "run 'dicoogled reindex' to rebuild it"
                )
            logging.getLogger("dicoogled.index").info("upgrading the index %s from schema version %d to %d",
                                                      engine.location, version, SCHEMA_VERSION)
            for step in range(version, SCHEMA_VERSION):
                connection.execute(engine.migrations[step])
            engine.set_schema_version(connection, SCHEMA_VERSION)

    # ---- readers -----------------------------------------------------------------------------

    @property
    def reader(self):
        """What this thread reads the index through: its own connection, or the engine's shared
        reader (one that any thread may use at once)."""
        if self.engine.shared_reader is not None:
            return self.engine.shared_reader
        connection = getattr(self._local, "connection", None)
        if connection is None:  # a connection serves one thread at a time: one per thread
            connection = self._local.connection = self.engine.connect()
        return connection

    def _query(self, sql: str, args=()) -> list:
        return self.reader.execute(sql, args).fetchall()

    def schema_version(self) -> int:
        """The version of the index's schema (SCHEMA_VERSION once opened: opening migrates it)."""
        return self.engine.schema_version(self.reader)

    def counts(self) -> dict:
        row = self._query(
            "SELECT (SELECT count(*) FROM patients), (SELECT count(*) FROM studies),"
            " (SELECT count(*) FROM series), (SELECT CAST(coalesce(sum(instances), 0) AS BIGINT) FROM origin_totals)"
        )[0]
        return dict(zip(("patients", "studies", "series", "instances"), row))

    def table_counts(self) -> dict[str, int]:
        """How many rows each of COPIED_TABLES holds."""
        return {table: self._query(f"SELECT count(*) FROM {table}")[0][0] for table in COPIED_TABLES}

    def bytes_by_origin(self) -> dict[str, int]:
        """Bytes of the indexed instances by origin (store, watch, index)."""
        return dict(self._query("SELECT origin, bytes FROM origin_totals WHERE instances > 0"))

    def received_totals(self) -> tuple[int, int]:
        """(instances, bytes) of the received objects the archive holds: what quotas limit."""
        marks = ", ".join("?" * len(RECEIVED_ORIGINS))
        return tuple(self._query(f"SELECT CAST(coalesce(sum(instances), 0) AS BIGINT), CAST(coalesce(sum(bytes), 0) AS BIGINT) FROM origin_totals"
                                f" WHERE origin IN ({marks})", RECEIVED_ORIGINS)[0])

    def recyclable_studies(self, limit: int = 20, sparing: str = "", protected_labels=()) -> list[StoredStudy]:
        """The studies recycling may delete, the one whose newest instance arrived first first:
        unprotected (by the study or by one of protected_labels), made only of received objects
        (a study with files indexed in place is not the archive's to delete), and not the study
        sparing (the one being received). A scan of every instance: it runs only when a quota is hit."""
        marks = ", ".join("?" * len(RECEIVED_ORIGINS))
        unprotected, protected_args = _unprotected_study_test(protected_labels)
        rows = self._query(
            "SELECT st.study_instance_uid, count(*), CAST(sum(i.size) AS BIGINT), max(i.mtime_ns) FROM instances i"
            " JOIN series se ON se.id = i.series_ref JOIN studies st ON st.id = se.study_ref"
            f" WHERE {unprotected} AND st.study_instance_uid != ?"
            f" GROUP BY st.id HAVING count(CASE WHEN i.origin NOT IN ({marks}) THEN 1 END) = 0 ORDER BY max(i.mtime_ns), st.id LIMIT ?",
            (*protected_args, sparing, *RECEIVED_ORIGINS, limit))
        return [StoredStudy(*row) for row in rows]

    def studies_to_retire(self, arrived_before_ns: int, modality: str = "", origin: str = "", label: str = "",
                          protected_labels=()) -> list[StoredStudy]:
        """The studies a retention rule deletes, longest arrived first: unprotected (as for
        recyclable_studies), made only of received objects (of origin, if given), the newest
        arrived before arrived_before_ns, with a series of modality and carrying label (on the
        study or one of its series) if given."""
        origins = (origin,) if origin else RECEIVED_ORIGINS
        marks = ", ".join("?" * len(origins))
        unprotected, args = _unprotected_study_test(protected_labels)
        conditions = [unprotected]
        if modality:
            conditions.append("EXISTS (SELECT 1 FROM series m WHERE m.study_ref = st.id AND m.modality = ?)")
            args += (modality,)
        if label:
            conditions.append(_STUDY_CARRIES_LABELS.format(marks="?"))
            args += (label, label)
        rows = self._query(
            "SELECT st.study_instance_uid, count(*), CAST(sum(i.size) AS BIGINT), max(i.mtime_ns) FROM instances i"
            " JOIN series se ON se.id = i.series_ref JOIN studies st ON st.id = se.study_ref"
            f" WHERE {' AND '.join(conditions)}"
            f" GROUP BY st.id HAVING count(CASE WHEN i.origin NOT IN ({marks}) THEN 1 END) = 0 AND max(i.mtime_ns) < ?"
            " ORDER BY max(i.mtime_ns), st.id",
            args + origins + (arrived_before_ns,))
        return [StoredStudy(*row) for row in rows]

    def protected_studies(self) -> list[str]:
        """The StudyInstanceUIDs that recycling and retention never delete."""
        return [row[0] for row in self._query("SELECT study_instance_uid FROM protected_studies ORDER BY study_instance_uid")]

    def is_protected(self, study_uid: str) -> bool:
        return bool(self._query("SELECT 1 FROM protected_studies WHERE study_instance_uid = ?", (study_uid,)))

    def instance(self, uid: str | None = None, *, path: str | None = None,
                 visibility: Visibility = EVERYTHING) -> IndexedInstance | None:
        """The instance with this SOPInstanceUID, or kept at this path (or URI); None if none is
        (or none the visibility shows)."""
        column, value = ("sop_instance_uid", uid) if path is None else ("path", path)
        if visibility.everything:
            rows = self._query(f"SELECT {_INSTANCE_COLUMNS} FROM instances i WHERE i.{column} = ?", (str(value),))
        else:
            visible, args = visible_study_condition(visibility)
            rows = self._query(f"SELECT {_INSTANCE_COLUMNS} FROM {_INSTANCE_PARENTS} WHERE i.{column} = ? AND {visible}",
                              (str(value), *args))
        return IndexedInstance(*rows[0]) if rows else None

    def instances_of(self, study_uid: str = "", series_uid: str = "", sop_uid: str = "",
                     visibility: Visibility = EVERYTHING) -> list[IndexedInstance]:
        """The instances of a study, a series or one instance, each UID given narrowing the
        answer (at least one), in the order they were indexed; only those the visibility shows."""
        given = [(column, uid) for column, uid in zip(_UID_COLUMNS, (study_uid, series_uid, sop_uid)) if uid]
        if not given:
            raise ValueError("instances_of needs a StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID")
        visible, visible_args = visible_study_condition(visibility)
        where = " AND ".join([f"{column} = ?" for column, _ in given] + [visible])
        rows = self._query(f"SELECT {_INSTANCE_COLUMNS} FROM {_INSTANCE_PARENTS} WHERE {where} ORDER BY i.id",
                          [uid for _, uid in given] + list(visible_args))
        return [IndexedInstance(*row) for row in rows]

    def archive_members(self, study_uids=(), series_uids=(), visibility: Visibility = EVERYTHING) -> list[ArchiveMember]:
        """The instances of these studies and series (each once) that visibility shows, patient,
        study and series together, in the order they were indexed: what a ZIP or media download holds."""
        visible, visible_args = visible_study_condition(visibility)
        found = {}  # instance id -> row: an instance named by its study and its series comes once
        for column, uids in (("st.study_instance_uid", list(dict.fromkeys(study_uids))),
                             ("se.series_instance_uid", list(dict.fromkeys(series_uids)))):
            for start in range(0, len(uids), 500):  # below SQLite's limit of bound parameters
                chunk = uids[start:start + 500]
                for row in self._query(
                        "SELECT i.id, p.patient_id, st.study_instance_uid, se.series_instance_uid, i.sop_instance_uid,"
                        f" i.path, i.size, p.id, st.id, se.id FROM {_INSTANCE_PARENTS}"
                        f" JOIN patients p ON p.id = st.patient_ref WHERE {column} IN ({','.join('?' * len(chunk))})"
                        f" AND {visible}", (*chunk, *visible_args)):
                    found[row[0]] = row
        ordered = sorted(found.values(), key=lambda row: (row[7], row[8], row[9], row[0]))
        return [ArchiveMember(*row[1:7]) for row in ordered]

    def instances_below(self, folder: str) -> list[IndexedInstance]:
        """The instances whose files are below a folder."""
        prefix = folder.rstrip(os.sep) + os.sep
        rows = self._query(f"SELECT {_INSTANCE_COLUMNS} FROM instances i WHERE i.path >= ? AND i.path < ?",
                          (prefix, prefix[:-1] + chr(ord(os.sep) + 1)))
        return [IndexedInstance(*row) for row in rows]

    def locations_in(self, scheme: str) -> set[str]:
        """Where the instances a storage plugin keeps are: the URIs of its scheme."""
        rows = self._query("SELECT path FROM instances WHERE substr(path, 1, ?) = ?", (len(scheme) + 1, scheme + ":"))
        return {row[0] for row in rows}

    def every_instance(self):
        """Every indexed instance, one at a time (for a check of the whole archive)."""
        for row in self.reader.execute(f"SELECT {_INSTANCE_COLUMNS} FROM instances i"):
            yield IndexedInstance(*row)

    def modalities(self) -> list[str]:
        """The modalities of the indexed series."""
        return [row[0] for row in self._query("SELECT DISTINCT modality FROM series WHERE modality != '' ORDER BY modality")]

    def paths_under(self, root: str) -> dict:
        """path -> (size, mtime_ns) of every instance indexed below a folder."""
        return {found.path: (found.size, found.mtime_ns) for found in self.instances_below(root)}

    def worklist(self) -> list[WorklistEntry]:
        """Every worklist entry, oldest first."""
        return [_worklist_entry(row) for row in self._query(f"SELECT {_WORKLIST_COLUMNS} FROM worklist_entries ORDER BY id")]

    def worklist_entry(self, entry_id: int) -> WorklistEntry | None:
        rows = self._query(f"SELECT {_WORKLIST_COLUMNS} FROM worklist_entries WHERE id = ?", (entry_id,))
        return _worklist_entry(rows[0]) if rows else None

    def worklist_entries_of(self, study_uid: str) -> list[WorklistEntry]:
        """The worklist entries of a study (the steps an MPPS may perform)."""
        rows = self._query(f"SELECT {_WORKLIST_COLUMNS} FROM worklist_entries WHERE study_instance_uid = ? ORDER BY id",
                          (study_uid,))
        return [_worklist_entry(row) for row in rows]

    def performed_step(self, sop_instance_uid: str) -> PerformedProcedureStep | None:
        rows = self._query(f"SELECT {_PERFORMED_STEP_COLUMNS} FROM performed_procedure_steps WHERE sop_instance_uid = ?",
                          (sop_instance_uid,))
        return _performed_step(rows[0]) if rows else None

    def performed_steps_of(self, entry_id: int) -> list[PerformedProcedureStep]:
        rows = self._query(f"SELECT {_PERFORMED_STEP_COLUMNS} FROM performed_procedure_steps WHERE worklist_ref = ?"
                          " ORDER BY created", (entry_id,))
        return [_performed_step(row) for row in rows]

    def metadata(self, instance_id: int) -> dict:
        rows = self._query("SELECT meta FROM instances WHERE id = ?", (instance_id,))
        return json.loads(rows[0][0]) if rows else {}

    def metadata_by_uid(self, sop_instance_uids) -> dict[str, dict]:
        """SOPInstanceUID -> every indexed element, for those of the UIDs the index holds."""
        found, uids = {}, list(dict.fromkeys(sop_instance_uids))
        for start in range(0, len(uids), 500):  # below SQLite's limit of bound parameters
            chunk = uids[start:start + 500]
            sql = f"SELECT sop_instance_uid, meta FROM instances WHERE sop_instance_uid IN ({','.join('?' * len(chunk))})"
            found.update((uid, json.loads(meta)) for uid, meta in self._query(sql, chunk))
        return found

    # ---- C-FIND and the search language --------------------------------------------------------

    @staticmethod
    def answers(level: str, keyword: str) -> bool:
        """Does find() match a key of this keyword at this level itself (a column, or an
        attribute computed from the hierarchy), and return its value in FoundEntity.values?"""
        return _level_column(keyword, level) is not None or _is_computed(keyword, level)

    def find(self, level: str, keys, offset: int = 0, limit: int | None = None,
             visibility: Visibility = EVERYTHING) -> typing.Iterator[FoundEntity]:
        """The entities at a level that a C-FIND's keys may match, one at a time, as indexed.

        Level is PATIENT, STUDY, SERIES or IMAGE, keys are Key (keyword, vr, value); only the
        entities the visibility shows are found (a patient: through one of its visible studies).

        A key the index answers (answers()) is matched here, by PS3.4 C.2.2.2's rules; any
        other key only narrows the entities to those whose representative instance holds its
        keyword and words (a superset), and the caller matches it on that instance's metadata.
        So offset and limit skip and limit the entities found here: a caller with keys of its
        own to match pages the entities it keeps itself. Raises QueryError for an identifier
        too large to match."""
        where, args, answered = [], [], []
        column_args: list = []  # the arguments of returned columns, which come before the conditions'
        alias = LEVEL_ALIASES[level]
        representative = "i.id" if level == "IMAGE" else f"{alias}.first_instance"
        for key in keys:
            column = _level_column(key.keyword, level)
            if column:
                # Return the stored text, also for universal matching; match the folded one.
                answered.append((key.keyword, column.removesuffix("_folded")))
                if key.value not in ("", "*"):
                    where.append(_column_condition(column, key, args))
            elif _is_computed(key.keyword, level):
                sql = COMPUTED_ATTRIBUTES[key.keyword][1]
                if visibility.restricted and key.keyword in VISIBLE_PATIENT_COUNTS:
                    # A patient's counts are of what the caller sees of it, not of the studies it may not.
                    visible, visible_args = visible_study_condition(visibility)
                    sql = VISIBLE_PATIENT_COUNTS[key.keyword].format(visible=visible)
                    column_args.extend(visible_args)
                answered.append((key.keyword, f"({sql})"))
                if key.value and key.keyword == "ModalitiesInStudy":
                    modalities = _any_of("x.modality", "=", key.value.split("\\"), args)
                    where.append(f"EXISTS (SELECT 1 FROM series x WHERE x.study_ref = st.id AND {modalities})")
                elif key.value and key.keyword == "SOPClassesInStudy":
                    classes = _any_of("y.sop_class_uid", "=", key.value.split("\\"), args)
                    where.append(f"EXISTS (SELECT 1 FROM instances y JOIN series x ON x.id = y.series_ref WHERE x.study_ref = st.id AND {classes})")
            elif not _is_universal(key.value):
                where.append(f"{representative} IN (SELECT rowid FROM metadata WHERE metadata MATCH ?)")
                args.append(self.engine.text_query(_fts_prefilter(key)))
        if len(where) > MAX_MATCHING_KEYS:
            raise QueryError(f"the identifier has too many keys to match ({len(where)}; at most {MAX_MATCHING_KEYS})")
        if visibility.restricted:
            visible, visible_args = visible_study_condition(visibility)
            where.append(visible if level != "PATIENT"
                         else f"EXISTS (SELECT 1 FROM studies st WHERE st.patient_ref = p.id AND {visible})")
            args.extend(visible_args)
        select = f"SELECT {alias}.id, {representative}{''.join(', ' + c for _, c in answered)} FROM {_level_joins(level)}"
        reader = self.reader
        if len(column_args) + len(args) + 3 > self.engine.max_parameters(reader):
            # One value per key (lists travel as one JSON array), so only a huge identifier gets here.
            raise QueryError(f"the identifier has too many keys to match ({len(column_args) + len(args)})")

        def rows_after(last_id: int | None, offset: int, limit: int | None):
            """The rows after entity last_id (None: from the first), skipping offset, at most limit."""
            conditions, condition_args = where, args
            if last_id is not None:
                conditions, condition_args = [*where, f"{alias}.id > ?"], [*args, last_id]
            sql = select + (" WHERE " + _balanced_sql(conditions, "AND") if conditions else "") + f" ORDER BY {alias}.id"
            statement_args = [*column_args, *condition_args]
            if offset or limit is not None:
                sql += " LIMIT ? OFFSET ?"
                statement_args += [NO_LIMIT if limit is None else limit, offset]
            return reader.execute(sql, statement_args)

        def rows():
            page = self.engine.rows_per_read
            if page is None:  # the cursor streams the rows: one statement reads them all
                yield from rows_after(None, offset, limit)
                return
            # Read page by page after the last id read, so that a C-FIND of a million matches
            # never holds them all in memory at once.
            last_id, skip, left = None, offset, limit
            while left is None or left > 0:
                wanted = page if left is None else min(page, left)
                batch = rows_after(last_id, skip, wanted).fetchall()
                yield from batch
                if len(batch) < wanted:
                    return
                last_id, skip = batch[-1][0], 0
                if left is not None:
                    left -= len(batch)

        keywords = [keyword for keyword, _ in answered]
        return (FoundEntity(row[0], row[1], dict(zip(keywords, row[2:]))) for row in rows())

    def _values_matching(self, column: str, spec: str) -> list[str]:
        """The distinct values of a main attribute's column (alias.name, as SEARCH_COLUMNS) that
        satisfy a field clause (field_value_matches), for compile_search's resolver."""
        alias, name = column.split(".")
        table = LEVEL_TABLES[next(level for level, a in LEVEL_ALIASES.items() if a == alias)]
        values = [row[0] for row in self._query(f"SELECT DISTINCT {name} FROM {table}")]
        return [value for value in values if field_value_matches(spec, value.split("\\") if value else [])]

    def _instances_matching_meta(self, prefilter: str, spec: str, path: list[str]) -> list[int]:
        """The ids of the instances the text query prefilter finds whose metadata satisfies a
        field clause at path (Seq_Child as a list), for compile_search's resolver."""
        rows = self._query("SELECT i.id, i.meta FROM instances i WHERE i.id IN"
                           " (SELECT rowid FROM metadata WHERE metadata MATCH ?) ORDER BY i.id", [prefilter])
        return [row[0] for row in rows if field_value_matches(spec, _meta_values(json.loads(row[1]), path))]

    def _instances_with_word(self, spec: str) -> list[int]:
        """The ids of the instances with a word that a wildcard term matches (a wildcard inside a
        word has no full-text form): every instance is read, as SQLite's scan reads them."""
        pattern = _wildcard_regex(_fold(json.loads(spec)[1]), fold=False)
        return [row[0] for row in self._query("SELECT id, meta FROM instances ORDER BY id")
                if any(pattern.fullmatch(word) for word in _fts_tokens(row[1]))]

    def instances_of_entity(self, level: str, entity_id: int, visibility: Visibility = EVERYTHING) -> list[IndexedInstance]:
        """The instances of an entity find() found (FoundEntity.id at its level), in the order they
        were indexed; of a patient, only those of the studies the visibility shows."""
        below = {"PATIENT": "st.patient_ref = ?", "STUDY": "se.study_ref = ?", "SERIES": "se.id = ?", "IMAGE": "i.id = ?"}[level]
        visible, visible_args = visible_study_condition(visibility)
        rows = self._query(f"SELECT {_INSTANCE_COLUMNS} FROM {_INSTANCE_PARENTS} WHERE {below} AND {visible} ORDER BY i.id",
                           (entity_id, *visible_args))
        return [IndexedInstance(*row) for row in rows]

    def search(self, query, limit: int | None = None, offset: int = 0, visibility: Visibility = EVERYTHING,
               rank_at_most: int = RANK_AT_MOST) -> tuple[list[SearchHit], int]:
        """A parsed search-language query (SearchQuery) on the index: (hits, total), a page of the
        instances it matches among those the visibility shows, and how many there are in all.
        Free-text matches come best first when there are at most rank_at_most of them."""
        engine = self.engine
        where, args, rank = compile_search(query, engine.text_query, self if engine.resolves_search_rules else None)
        if visibility.restricted:  # part of the condition, so the count and the page are the visible ones'
            visible, visible_args = visible_study_condition(visibility)
            where, args = f"({where}) AND {visible}", [*args, *visible_args]
        matches = self._query("SELECT count(*) FROM metadata WHERE metadata MATCH ?", [engine.text_query(rank)])[0][0] if rank else 0
        columns = "i.id, i.path, i.meta"
        joins = ("FROM instances i JOIN series se ON se.id = i.series_ref JOIN studies st ON st.id = se.study_ref"
                 " JOIN patients p ON p.id = st.patient_ref")
        page = (f" LIMIT {int(limit)} OFFSET {int(offset)}" if limit is not None
                else f" LIMIT {NO_LIMIT} OFFSET {int(offset)}" if offset else "")
        if where == FREE_TEXT_CONDITION and rank:
            # Free text alone (what a user types first): FTS5 counts and ranks its matches itself,
            # and only the page is joined to the instances: milliseconds at a million instances.
            total = matches
            ranked, args = engine.ranked_matches(self.reader, rank, matches <= rank_at_most)
            ranked = f"{ranked} ORDER BY score, rank_id{page}"
            sql = f"SELECT {columns} FROM ({ranked}) r JOIN instances i ON i.id = r.rank_id{joins.removeprefix('FROM instances i')} ORDER BY r.score, i.id"
        else:
            # Only the tables the condition names are joined to count (the count reads every match).
            counted = joins if re.search(r"\b(?:se|st|p)\.", where) else "FROM instances i"
            total = self._query(f"SELECT count(*) {counted} WHERE {where}", args)[0][0]
            order = "i.id"
            ranking = ""
            if rank and matches <= rank_at_most:
                # The scores of the free text's matches, computed once (as a join of the full-text
                # table, SQLite would run its MATCH again for every instance).
                ranked, ranked_args = engine.ranked_matches(self.reader, rank, True)
                ranking = f"WITH r AS MATERIALIZED ({ranked}) "
                joins += " LEFT JOIN r ON r.rank_id = i.id"
                args = ranked_args + args
                order = "r.score NULLS FIRST, i.id"  # SQLite's order of NULLs, said for PostgreSQL's sake
            sql = f"{ranking}SELECT {columns} {joins} WHERE {where} ORDER BY {order}{page}"
        return [SearchHit(row[0], row[1], json.loads(row[2])) for row in self._query(sql, args)], total

    # ---- labels ------------------------------------------------------------------------------

    def labels(self, visibility: Visibility = EVERYTHING) -> list[LabelCount]:
        """Every label in use, by name, with the number of indexed studies carrying it (on the
        study or on one of its series); a label on studies no longer indexed counts 0. For a
        restricted visibility, only the visible studies count and labels on none are left out."""
        if visibility.everything:
            rows = self._query(
                "SELECT label, count(DISTINCT study) FROM ("
                " SELECT l.label, st.id AS study FROM study_labels l"
                "  LEFT JOIN studies st ON st.study_instance_uid = l.study_instance_uid"
                " UNION ALL"
                " SELECT l.label, se.study_ref FROM series_labels l"
                "  LEFT JOIN series se ON se.series_instance_uid = l.series_instance_uid"
                ") AS carried GROUP BY label ORDER BY label")
            return [LabelCount(*row) for row in rows]
        visible, args = visible_study_condition(visibility)
        rows = self._query(
            "SELECT label, count(DISTINCT study) FROM ("
            " SELECT l.label, st.id AS study FROM study_labels l"
            "  JOIN studies st ON st.study_instance_uid = l.study_instance_uid"
            f" WHERE {visible}"
            " UNION ALL"
            " SELECT l.label, st.id FROM series_labels l"
            "  JOIN series se ON se.series_instance_uid = l.series_instance_uid JOIN studies st ON st.id = se.study_ref"
            f" WHERE {visible}"
            ") AS carried GROUP BY label ORDER BY label", args + args)
        return [LabelCount(*row) for row in rows]

    def labels_of(self, level: str, uids) -> dict[str, list[str]]:
        """UID -> its labels (sorted), for the studies or series (level STUDY or SERIES) of
        these UIDs that carry any."""
        table, column = LABEL_LEVELS[level]
        found: dict[str, list[str]] = {}
        uids = list(dict.fromkeys(uids))
        for start in range(0, len(uids), 500):  # below SQLite's limit of bound parameters
            chunk = uids[start:start + 500]
            for uid, label in self._query(f"SELECT {column}, label FROM {table} WHERE {column} IN"
                                         f" ({','.join('?' * len(chunk))}) ORDER BY {column}, label", chunk):
                found.setdefault(uid, []).append(label)
        return found

    def labelled(self, level: str, label: str) -> list[str]:
        """The UIDs at a level (STUDY, SERIES) of what carries a label, itself or through its
        parent or children as the search language's label: matches instances: a study whose
        series carries it, a series whose study does."""
        sql = {
            "STUDY": "SELECT study_instance_uid FROM study_labels WHERE label = ? UNION"
                     " SELECT st.study_instance_uid FROM series_labels l"
                     "  JOIN series se ON se.series_instance_uid = l.series_instance_uid"
                     "  JOIN studies st ON st.id = se.study_ref WHERE l.label = ?",
            "SERIES": "SELECT series_instance_uid FROM series_labels WHERE label = ? UNION"
                      " SELECT se.series_instance_uid FROM study_labels l"
                      "  JOIN studies st ON st.study_instance_uid = l.study_instance_uid"
                      "  JOIN series se ON se.study_ref = st.id WHERE l.label = ?",
        }[level]
        return sorted(row[0] for row in self._query(sql, (label, label)))

    def holds(self, level: str, uid: str, visibility: Visibility = EVERYTHING) -> bool:
        """Is a study or series (level STUDY or SERIES) of this UID indexed (and visible)?"""
        visible, args = visible_study_condition(visibility)
        sql = {"STUDY": "SELECT 1 FROM studies st WHERE st.study_instance_uid = ?",
               "SERIES": "SELECT 1 FROM series se JOIN studies st ON st.id = se.study_ref WHERE se.series_instance_uid = ?"}[level]
        return bool(self._query(f"{sql} AND {visible}", (uid, *args)))

    # ---- study events and webhook deliveries ---------------------------------------------

    def quiet_studies(self, arrived_before: float) -> list[QuietStudy]:
        """The studies not announced stable whose newest instance arrived before this time."""
        rows = self._query("SELECT study_instance_uid, last_arrival FROM studies"
                          " WHERE stable_announced = 0 AND last_arrival < ? ORDER BY last_arrival", (arrived_before,))
        return [QuietStudy(*row) for row in rows]

    def study_attributes(self, study_uid: str) -> dict | None:
        """A study's patient and study level attributes by keyword, with ModalitiesInStudy and
        the numbers of its series and instances (PS3.4 C.3.3); None if it is not indexed."""
        keywords = LEVEL_ATTRIBUTES["PATIENT"] + LEVEL_ATTRIBUTES["STUDY"]
        columns = ", ".join(f"{LEVEL_ALIASES['PATIENT' if k in LEVEL_ATTRIBUTES['PATIENT'] else 'STUDY']}.{_snake_case(k)}"
                            for k in keywords)
        rows = self._query(
            f"SELECT {columns}, (SELECT group_concat(DISTINCT modality) FROM series WHERE study_ref = st.id),"
            " (SELECT count(*) FROM series WHERE study_ref = st.id),"
            " (SELECT count(*) FROM instances i JOIN series se ON se.id = i.series_ref WHERE se.study_ref = st.id)"
            " FROM studies st JOIN patients p ON p.id = st.patient_ref WHERE st.study_instance_uid = ?", (study_uid,))
        if not rows:
            return None
        *values, modalities, series, instances = rows[0]
        attributes = dict(zip(keywords, values))
        attributes["ModalitiesInStudy"] = "\\".join(sorted(m for m in (modalities or "").split(",") if m))
        attributes["NumberOfStudyRelatedSeries"] = str(series)
        attributes["NumberOfStudyRelatedInstances"] = str(instances)
        return attributes

    def due_deliveries(self, now: float, limit: int = 50) -> list[Delivery]:
        """Pending webhook deliveries whose next attempt is due, oldest first."""
        rows = self._query(f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries WHERE status = 'pending'"
                          " AND next_attempt <= ? ORDER BY next_attempt, id LIMIT ?", (now, limit))
        return [Delivery(*row) for row in rows]

    def next_delivery_time(self) -> float | None:
        """When the next pending webhook delivery is due, or None if none is pending."""
        return self._query("SELECT min(next_attempt) FROM webhook_deliveries WHERE status = 'pending'")[0][0]

    def deliveries(self, limit: int = 100, status: str = "") -> list[Delivery]:
        """The delivery log: the newest webhook deliveries first, of one status if given."""
        where = "WHERE status = ?" if status else ""
        rows = self._query(f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries {where} ORDER BY id DESC LIMIT ?",
                          (status, limit) if status else (limit,))
        return [Delivery(*row) for row in rows]

    # ---- the writer --------------------------------------------------------------------------

    def submit(self, function, *args, wake_writer: bool = True, recoverable: bool = False) -> concurrent.futures.Future:
        """Queue function(connection, *args) to run inside a write transaction."""
        op = _WriteOp(function, args, recoverable)
        with self._wakeup:
            if self._closed:
                raise RuntimeError("index is closed")
            self._queue.append(op)
            if wake_writer:
                self._wakeup.notify()
        return op.future

    def write(self, function, *args, recoverable: bool = False):
        """Run function(connection, *args) in a write transaction and wait for its commit, which
        is on disk when this returns. A recoverable write, one the start's reconciliation redoes
        from a stored file (fsynced with its folder before), is committed to the operating system
        only: safe against a crash or kill -9, and after a power loss the file brings it back.
        Syncing the WAL for each instance as well would cost ingest a quarter of its time."""
        if not self._writing.acquire(blocking=False):
            return self.submit(function, *args, recoverable=recoverable).result()
        try:
            future = self.submit(function, *args, wake_writer=False, recoverable=recoverable)
            self._run_queue()
        finally:
            self._writing.release()
        with self._wakeup:
            if self._queue:  # queued after our last look: the writer takes them
                self._wakeup.notify()
        return future.result()

    def _run_queue(self):
        """Commit what is queued, in batches, until the queue is empty (with _writing held)."""
        while True:
            with self._wakeup:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.BATCH))]
            if not batch:
                return
            self._run_batch(self._writer_connection, batch)

    def remember_root(self, path: str):
        """Record a folder or file indexed in place, in the index and in indexed-roots.txt beside
        it, where reindex finds it even when the index itself was lost."""
        self.write(Index.add_root, path)
        if self.path is not None and path not in self.remembered_roots():
            with open(self.path.parent / "indexed-roots.txt", "a", encoding="utf-8") as handle:
                handle.write(path + "\n")

    def copy_into(self, target: "Index", replace: bool = False, progress=None) -> dict[str, int]:
        """Copy everything this SQLite index holds into target, a PostgreSQL index, in one
        transaction of target's writer: all of it or, on any failure, nothing. Rows keep their
        ids (so every reference holds); each instance's full text is made again from its metadata
        as target's engine writes it; target's triggers count origin_totals again. replace empties
        target first. progress(done, total) counts the rows. Returns {table: rows copied}, which
        is checked, before the commit, against what this index holds."""
        counts = self.table_counts()
        copied = counting_progress(progress, sum(counts.values()) + counts["instances"])
        source = self.reader

        def copy(connection) -> dict[str, int]:
            if replace:
                for table in (*COPIED_TABLES, "metadata", "origin_totals"):
                    connection.execute(f"DELETE FROM {table}")
            written = {table: copy_table(source, connection, table, copied) for table in COPIED_TABLES}
            document = connection.engine.full_text_document
            texts = ((instance_id, document(" ".join(metadata_words(json.loads(meta)))))
                     for instance_id, meta in source.execute("SELECT id, meta FROM instances"))
            texts_written = copy_table(source, connection, "metadata", copied, ("rowid", "body"), texts)
            totals = "SELECT origin, instances, bytes FROM origin_totals WHERE instances > 0 ORDER BY origin"
            if (written, texts_written) != (counts, counts["instances"]) or \
                    connection.execute(totals).fetchall() != source.execute(totals).fetchall():
                raise RuntimeError(f"the copy of the index does not hold what the index does: {written} rows copied of {counts}")
            return written

        return target.write(copy)

    @staticmethod
    def kept_through_rebuild(path: pathlib.Path) -> "KeptState":
        """What an index file holds that its instances' files do not (indexed folders, protected
        studies, labels: set by people or rules), read before it is rebuilt; nothing of what an
        unreadable or older index lacks."""
        roots, protected, labels = [], [], []
        with contextlib.suppress(apsw.Error):
            connection = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
            try:
                roots = [row[0] for row in connection.execute("SELECT path FROM indexed_roots")]
                with contextlib.suppress(apsw.Error):  # an index from before protection has none
                    protected = [row[0] for row in connection.execute("SELECT study_instance_uid FROM protected_studies")]
                with contextlib.suppress(apsw.Error):  # an index from before labels has none
                    labels = [LabelRecord(level, *row) for level, (table, column) in LABEL_LEVELS.items()
                              for row in connection.execute(f"SELECT {column}, label, added FROM {table}")]
            finally:
                connection.close()
        return KeptState(roots, protected, labels)

    def indexed_roots(self) -> list[str]:
        """The folders and files indexed in place, as the index remembers them."""
        return [path for (path,) in self._query("SELECT path FROM indexed_roots ORDER BY path")]

    def remembered_roots(self) -> list[str]:
        if self.path is None:
            return []
        with contextlib.suppress(FileNotFoundError):
            return [line for line in (self.path.parent / "indexed-roots.txt").read_text(encoding="utf-8").splitlines() if line]
        return []

    def _write_loop(self):
        while True:
            with self._wakeup:
                while not self._queue and not self._closed:
                    self._wakeup.wait()
                if not self._queue and self._closed:
                    return
            with self._writing:
                self._run_queue()

    def _run_batch(self, connection, batch):
        results = []
        try:
            self.engine.commit_to_disk(connection, not all(op.recoverable for op in batch))
            with connection:  # one transaction for the whole batch
                for op in batch:
                    results.append(op.function(connection, *op.args))
        except Exception as error:
            self.engine.roll_back_failed(connection)
            if len(batch) == 1 or is_out_of_space(error):
                # A full disk fails the whole group: each caller answers "out of resources" and
                # removes its file, and the next group is tried afresh.
                for op in batch:
                    op.future.set_exception(error)
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
        with self._writing:  # a caller may still be committing what it queued
            self._writer_connection.close()
        self.engine.close()

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
            if parent_column:  # it may name another parent now (a corrected PatientID): moved there
                Index._move_to_parent(connection, table, row[0], parent_column, parent_id)
            return row[0]
        if parent_column:
            names.append(parent_column)
            values.append(parent_id)
        placeholders = ",".join("?" * len(names))
        return connection.execute(f"INSERT INTO {table} ({','.join(names)}) VALUES ({placeholders}) RETURNING id", values).fetchone()[0]

    @classmethod
    def add_instance(cls, connection, record: InstanceRecord, deliveries=()) -> int:
        """Insert (or replace) one instance and its patient, study and series rows.

        The study's last arrival is now (it is stable again only stable_age later), and the webhook
        deliveries the arrival makes are queued in the same transaction."""
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
        connection.execute("INSERT INTO metadata (rowid, body) VALUES (?, ?)",
                           (instance_id, connection.engine.full_text_document(record.text)))
        # The study is quiet again only stable_age after this: announced anew then (on_stable_study).
        connection.execute("UPDATE studies SET last_arrival = ?, stable_announced = 0 WHERE id = ?", (time.time(), study))
        cls.queue_deliveries(connection, deliveries)
        return instance_id

    @staticmethod
    def queue_deliveries(connection, deliveries):
        """Queue webhook deliveries (Delivery rows), due at once."""
        now = time.time()
        connection.executemany(
            "INSERT INTO webhook_deliveries (delivery_id, hook, event, body, created, next_attempt) VALUES (?, ?, ?, ?, ?, ?)",
            [(d.delivery_id, d.hook, d.event, d.body, now, now) for d in deliveries])

    @classmethod
    def announce_stable(cls, connection, study_uid: str, last_arrival: float, deliveries=()) -> bool:
        """Mark a study announced stable, if no instance arrived since last_arrival, and queue the
        deliveries that announce it; False if it is no longer quiet (or no longer indexed)."""
        connection.execute("UPDATE studies SET stable_announced = 1 WHERE study_instance_uid = ?"
                           " AND last_arrival = ? AND stable_announced = 0", (study_uid, last_arrival))
        if connection.changes() != 1:
            return False
        cls.queue_deliveries(connection, deliveries)
        return True

    @staticmethod
    def announce_all_stable(connection):
        """Count every study as announced stable (an index rebuilt from files announces nothing)."""
        connection.execute("UPDATE studies SET stable_announced = 1 WHERE stable_announced = 0")

    @staticmethod
    def delivery_attempted(connection, delivery_id: str, status: str, error: str = "", next_attempt: float = 0.0):
        """Record an attempt at a webhook delivery: now delivered, failed for good, or pending
        until next_attempt. A delivered one keeps the error of its last failed attempt, if any."""
        connection.execute(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, status = ?,"
            " last_error = coalesce(nullif(?, ''), last_error), next_attempt = ?,"
            " finished = CASE WHEN ? = 'pending' THEN NULL ELSE ? END WHERE delivery_id = ?",
            (status, error, next_attempt, status, time.time(), delivery_id))

    @staticmethod
    def _move_to_parent(connection, table: str, row_id: int, parent_column: str, parent_id: int):
        """Put a study under another patient, or a series under another study; the parent it
        leaves goes if it has nothing left, or is represented by one of the instances it keeps."""
        (old_parent,) = connection.execute(f"SELECT {parent_column} FROM {table} WHERE id = ?", (row_id,)).fetchone()
        if old_parent == parent_id:
            return
        connection.execute(f"UPDATE {table} SET {parent_column} = ? WHERE id = ?", (parent_id, row_id))
        parent_table = "patients" if table == "studies" else "studies"
        Index._represent_or_drop(connection, parent_table, old_parent)

    @staticmethod
    def _represent_or_drop(connection, table: str, parent_id: int, former: int | None = None):
        """Drop a patient, study or series left without instances; else let its first remaining
        instance represent it (if former, only where former did)."""
        successor = connection.execute(_FIRST_INSTANCE_OF[table], (parent_id,)).fetchone()[0]
        if successor is None:
            connection.execute(f"DELETE FROM {table} WHERE id = ?", (parent_id,))
        elif former is None:
            connection.execute(f"UPDATE {table} SET first_instance = ? WHERE id = ?", (successor, parent_id))
        else:
            connection.execute(f"UPDATE {table} SET first_instance = ? WHERE id = ? AND first_instance = ?",
                               (successor, parent_id, former))

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
        for table, parent_id in (("series", series_id), ("studies", study_id), ("patients", patient_id)):
            if parent_id is not None:
                Index._represent_or_drop(connection, table, parent_id, former=instance_id)
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
    def protect_study(connection, study_uid: str) -> bool:
        """Keep a study from recycling and retention; False if it already was."""
        return connection.execute("INSERT INTO protected_studies VALUES (?, datetime('now')) ON CONFLICT DO NOTHING RETURNING 1",
                                  (study_uid,)).fetchone() is not None

    @staticmethod
    def unprotect_study(connection, study_uid: str) -> bool:
        """Let recycling and retention delete a study again; False if it was not protected."""
        return connection.execute("DELETE FROM protected_studies WHERE study_instance_uid = ? RETURNING 1",
                                  (study_uid,)).fetchone() is not None

    @staticmethod
    def add_label(connection, level: str, uid: str, label: str) -> bool:
        """Put a label on a study or series (level STUDY or SERIES); False if it had it already."""
        table, column = LABEL_LEVELS[level]
        return connection.execute(f"INSERT INTO {table} ({column}, label, added)"
                                  " VALUES (?, ?, datetime('now')) ON CONFLICT DO NOTHING RETURNING 1", (uid, label)).fetchone() is not None

    @staticmethod
    def remove_label(connection, level: str, uid: str, label: str) -> bool:
        """Take a label off a study or series; False if it did not have it."""
        table, column = LABEL_LEVELS[level]
        return connection.execute(f"DELETE FROM {table} WHERE {column} = ? AND label = ? RETURNING 1",
                                  (uid, label)).fetchone() is not None

    @staticmethod
    def restore_labels(connection, labels) -> int:
        """Put back labels (LabelRecord rows, from kept_through_rebuild) kept through a rebuild."""
        for level, uid, label, added in labels:
            table, column = LABEL_LEVELS[level]
            connection.execute(f"INSERT INTO {table} ({column}, label, added) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", (uid, label, added))
        return len(labels)

    @staticmethod
    def add_root(connection, path: str):
        connection.execute("INSERT INTO indexed_roots VALUES (?, datetime('now')) ON CONFLICT DO NOTHING", (path,))

    @staticmethod
    def add_worklist_entry(connection, study_uid: str, accession_number: str, step_id: str, dataset: dict) -> int:
        """A new worklist entry, SCHEDULED; its id."""
        return connection.execute(
            "INSERT INTO worklist_entries (study_instance_uid, accession_number, scheduled_procedure_step_id, dataset,"
            " created, updated) VALUES (?, ?, ?, ?, datetime('now'), datetime('now')) RETURNING id",
            (study_uid, accession_number, step_id, json.dumps(dataset))).fetchone()[0]

    @staticmethod
    def delete_worklist_entry(connection, entry_id: int) -> bool:
        """Remove a worklist entry (its performed steps stay, unlinked); False if there was none."""
        connection.execute("DELETE FROM worklist_entries WHERE id = ?", (entry_id,))
        return connection.changes() > 0

    @staticmethod
    def create_performed_step(connection, sop_instance_uid: str, entry_id: int | None, status: str, dataset: dict) -> bool:
        """Record a performed procedure step and set its worklist entry's state; False if one
        with this SOP Instance UID exists already."""
        connection.execute(
            "INSERT INTO performed_procedure_steps VALUES (?, ?, ?, ?, datetime('now'), datetime('now')) ON CONFLICT DO NOTHING",
            (sop_instance_uid, entry_id, status, json.dumps(dataset)))
        if not connection.changes():
            return False
        if entry_id is not None:
            connection.execute("UPDATE worklist_entries SET state = ?, updated = datetime('now') WHERE id = ?", (status, entry_id))
        return True

    @staticmethod
    def update_performed_step(connection, sop_instance_uid: str, status: str, dataset: dict):
        """Store a performed step's new attributes and status, and its worklist entry's state."""
        connection.execute("UPDATE performed_procedure_steps SET status = ?, dataset = ?, updated = datetime('now')"
                           " WHERE sop_instance_uid = ?", (status, json.dumps(dataset), sop_instance_uid))
        connection.execute("UPDATE worklist_entries SET state = ?, updated = datetime('now') WHERE id ="
                           " (SELECT worklist_ref FROM performed_procedure_steps WHERE sop_instance_uid = ?)",
                           (status, sop_instance_uid))

    @staticmethod
    def clear(connection):
        """Empty every table of instances (reindex starts from here)."""
        connection.execute("DELETE FROM instances; DELETE FROM series; DELETE FROM studies; DELETE FROM patients; DELETE FROM metadata")


def open_index(config: Config) -> Index:
    """The archive's index, wherever config says it lives ([index] url, else the SQLite file in
    the data dir): the one way the daemon and the commands open it."""
    return Index(config.index_url or config.data_dir / "index.sqlite")


# ============================================================================================
# Storage and ingest: the one path every object enters through
# ============================================================================================


def _utc_text(time_ns: int) -> str:
    """A time in nanoseconds since the epoch as ISO 8601 UTC text, to the second."""
    return datetime.datetime.fromtimestamp(time_ns / 1e9, datetime.timezone.utc).isoformat(timespec="seconds")


class IngestError(Exception):
    """An object that cannot be stored or indexed; status is the DICOM status to answer."""

    def __init__(self, message: str, status: int = CANNOT_UNDERSTAND):
        super().__init__(message)
        self.status = status


class DicomStatus(int):
    """A DICOM status with the reason of a failure (a response's Error Comment, STOW-RS's
    failure reason) and, for a store, the study of the object when it was read (for the audit
    log); it compares as the plain status."""

    def __new__(cls, status: int, reason: str = "", study_uid: str = ""):
        self = super().__new__(cls, status)
        self.reason, self.study_uid = reason, study_uid
        return self


@dataclasses.dataclass
class IngestStats:
    stored: int = 0
    indexed: int = 0
    duplicates: int = 0
    skipped: int = 0  # not DICOM, DICOMDIR, or broken
    failed: int = 0
    out_of_space: int = 0  # of the failed: refused below the free-space reserve, or the disk was full
    #: received objects refused as truncated, malformed or not the instance their command names
    malformed: int = 0


def is_out_of_space(error: BaseException | None) -> bool:
    """True for an error that means the disk (or the user's quota) is full: a file write's
    ENOSPC or EDQUOT, SQLite's SQLITE_FULL, or PostgreSQL's disk_full (SQLSTATE 53100: its
    server's disk, which is not the data dir's)."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, apsw.FullError) or getattr(error, "sqlstate", None) == "53100"


class DiskSpace:
    """Free space on the data disk, the reserve kept free for the index, settings and logins,
    and the last write that found the disk full: what /health reports.

    Nothing here blocks a write: each store checks the free space afresh, so ingest resumes by
    itself as soon as space is freed.
    """

    #: Free space above the reserve at which a past "disk full" is taken as over (so that the
    #: few bytes freed by removing a failed write do not end it).
    RECOVERY_HEADROOM = 1024 * 1024

    def __init__(self, folder: pathlib.Path, reserve_mb: float = 0):
        self.folder = pathlib.Path(folder)
        self.reserve_bytes = int(reserve_mb * 1024 * 1024)
        self.failures = 0  #: writes of any kind that failed for lack of space
        self._last_failure: str | None = None  # what failed, until a write succeeds or space is freed
        self._lock = threading.Lock()
        self.log = logging.getLogger("dicoogled.storage")

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer can still use (root's reserved blocks left out)."""
        try:
            stat = os.statvfs(self.folder)
        except OSError:
            return 0
        return stat.f_bavail * stat.f_frsize

    def room_for(self, size: int) -> str | None:
        """None if an object of size bytes may be stored, else why not."""
        free = self.free_bytes()
        if free - size >= self.reserve_bytes:
            return None
        return (f"{free // 1024} KB free on the data disk, {size // 1024} KB needed above the reserve "
                f"of {self.reserve_bytes // (1024 * 1024)} MB ([storage] min_free_mb)")

    def ran_out(self, what: str, error: BaseException):
        """Record a write that failed for lack of space; logged once per episode, then at DEBUG."""
        with self._lock:
            self.failures += 1
            first = self._last_failure is None
            self._last_failure = f"{what}: {getattr(error, 'strerror', None) or error}"
        (self.log.error if first else self.log.debug)("out of disk space %s (%d KB free)", self._last_failure, self.free_bytes() // 1024)

    def wrote(self):
        """A write succeeded: the disk is not full (any more)."""
        if self._last_failure is not None:
            self._recovered()

    def recheck(self) -> bool:
        """End a "disk full" episode once space above the reserve is back; True if it ended now."""
        if self._last_failure is not None and self.free_bytes() >= self.reserve_bytes + self.RECOVERY_HEADROOM:
            return self._recovered()
        return False

    def _recovered(self) -> bool:
        with self._lock:
            was, self._last_failure = self._last_failure, None
        if was is not None:
            self.log.warning("disk space available again: %d KB free", self.free_bytes() // 1024)
        return was is not None

    def problems(self) -> list[str]:
        """Why the archive is degraded for lack of space, or nothing."""
        found = []
        free = self.free_bytes()
        if free < self.reserve_bytes:
            found.append(f"free space below the reserve: {free // 1024} KB free, "
                         f"{self.reserve_bytes // (1024 * 1024)} MB reserved; new objects are refused")
        if self._last_failure is not None:
            found.append(f"out of disk space {self._last_failure}")
        return found

    def status(self) -> dict:
        return {"free_bytes": self.free_bytes(), "reserve_bytes": self.reserve_bytes, "out_of_space_failures": self.failures}


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


def _meta_uids(data: bytes) -> dict[int, str]:
    """The UI values of a Part 10 object's file meta group (explicit VR little endian), by element
    number: 0x0002 Media Storage SOP Class UID, 0x0003 its SOP Instance UID, 0x0010 transfer syntax."""
    meta, position, uids = data[144:_dataset_offset(data)], 0, {}
    while position + 8 <= len(meta):
        group, number, vr = struct.unpack_from("<HH2s", meta, position)
        if vr in LONG_LENGTH_VRS:
            if position + 12 > len(meta):
                break
            length, header = struct.unpack_from("<I", meta, position + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", meta, position + 6)[0], 8
        if vr == b"UI":
            uids[number] = meta[position + header: position + header + length].rstrip(b"\x00 ").decode("ascii", "replace")
        position += header + length
    return uids


_IMPLICIT_HEADER = struct.Struct("<HHI")  # group, element, length
_EXPLICIT_HEADER = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length
_LONG_LENGTH = struct.Struct("<I")


def _raw_top_level(data: bytes, start: int, implicit: bool) -> dict | None:
    """The top-level elements before the pixel data of the little endian data set at
    data[start:], exactly as pydicom's read_dataset reads them (RawDataElements, their values
    undecoded), or None when pydicom must read it: an element of undefined length, a VR it does
    not name, a first element in the other VR encoding, an element cut short.

    pydicom's reader costs more than all the rest of a small object's checks and indexing: it
    reads each element through a file object and general code; here a well-formed data set, the
    usual one, is sliced in one loop.
    """
    end, position, elements = len(data), start, {}
    if position + 6 <= end:  # pydicom trusts the first element's VR over the transfer syntax
        vr = data[position + 4:position + 6]
        if (not (0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B)) != implicit:
            return None
    while position + 8 <= end:
        if implicit:
            group, number, length = _IMPLICIT_HEADER.unpack_from(data, position)
            vr, value_at = None, position + 8
        else:
            group, number, vr, length = _EXPLICIT_HEADER.unpack_from(data, position)
            value_at = position + 8
            if vr in LONG_LENGTH_VRS:
                if value_at + 4 > end:
                    return None
                length, value_at = _LONG_LENGTH.unpack_from(data, value_at)[0], value_at + 4
            elif vr not in SHORT_LENGTH_VRS:
                return None
            vr = vr.decode("ascii")
        if group == 0x7FE0:  # the pixel data and what follows are not read (stop_before_pixels)
            break
        if group == 0xFFFE or length == UNDEFINED_LENGTH or value_at + length > end:
            return None
        tag = BaseTag(group << 16 | number)
        value = data[value_at:value_at + length] if length else empty_value_for_VR(vr, raw=True)
        elements[tag] = RawDataElement(tag, vr, length, value, value_at - start, implicit, True)
        position = value_at + length
    return elements


def read_received_header(data: bytes) -> Dataset:
    """read_header for the Part 10 bytes of an object received whole (C-STORE, STOW-RS).

    Parses the data set directly with the transfer syntax from its meta group: three times
    faster than a general dcmread, which matters on the C-STORE path (and a little endian one,
    the usual, faster still: _raw_top_level). The file meta it gives holds the transfer syntax
    and the SOP Class and Instance UIDs the meta group announces.
    """
    offset = _dataset_offset(data)
    meta_uids = _meta_uids(data)
    try:
        uid = pydicom.uid.UID(meta_uids.get(0x0010, ""))
        implicit, little = uid.is_implicit_VR, uid.is_little_endian
    except ValueError:
        return read_header(io.BytesIO(data))
    if uid.is_deflated:
        return read_header(io.BytesIO(data))
    elements = _raw_top_level(data, offset, implicit) if little and isinstance(data, bytes) else None
    try:
        if elements is None:
            dataset = read_dataset(io.BytesIO(data[offset:]), implicit, little,
                                   stop_when=lambda tag, vr, length: tag >> 16 == 0x7FE0)
        else:  # as read_dataset ends
            dataset = Dataset(elements)
            encoding = default_encoding
            if 0x00080005 in elements:
                encoding = convert_encodings(convert_raw_data_element(elements[BaseTag(0x00080005)]).value)
            dataset.set_original_encoding(implicit, little, encoding)
    except Exception as error:
        raise IngestError(f"unreadable DICOM: {error}") from None
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = uid
    for number, keyword in ((0x0002, "MediaStorageSOPClassUID"), (0x0003, "MediaStorageSOPInstanceUID")):
        if meta_uids.get(number):
            setattr(dataset.file_meta, keyword, meta_uids[number])
    return dataset


def check_structure(source, dataset: Dataset):
    """Raise IngestError unless source, a Part 10 object's bytes or an open binary file, holds
    one whole, well-formed data set; dataset is its header as read_header gave it.

    pydicom reads a data set cut short without complaint (the last value is just shorter), so
    every element is walked, in sequences and items too: each declared length must fit in what
    is there, every undefined-length sequence, item and encapsulated pixel data must end with
    its delimiter, every explicit VR must exist, and the last element must end where the data
    does. Values are skipped, never read: the cost is per element, whatever the size of the
    pixel data.
    """
    if isinstance(source, (bytes, bytearray)):
        size = len(source)
        read = lambda position, count: source[position:position + count]  # noqa: E731
    else:
        size = source.seek(0, os.SEEK_END)

        def read(position, count):
            source.seek(position)
            return source.read(count)
    start = _dataset_offset(read(0, 144))
    if start > size:
        raise IngestError("truncated: the file meta group is cut short")
    meta = getattr(dataset, "file_meta", None)
    implicit, little = dataset.original_encoding
    if meta is not None and meta.get("TransferSyntaxUID") == "1.2.840.10008.1.2.1.99":
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflated = inflater.decompress(read(start, size - start))
        if not inflater.eof:
            raise IngestError("truncated: the deflated data set ends early")
        source, size, start, implicit, little = inflated, len(inflated), 0, False, True
        read = lambda position, count: inflated[position:position + count]  # noqa: E731
    try:
        # A file meta group without its group length is read in its own encoding.
        while read(start, 2) == b"\x02\x00":
            start = _StructureWalk(read, False, True).element(start, size)
        top_level = {}
        _StructureWalk(read, bool(implicit), little is not False).elements(start, size, top=top_level)
    except RecursionError:
        raise IngestError("malformed: sequences nested too deeply") from None
    if PIXEL_DATA_TAG in top_level:
        _check_native_pixel_data(dataset, top_level[PIXEL_DATA_TAG])


def _check_native_pixel_data(dataset: Dataset, length: int):
    """Refuse native (not encapsulated) pixel data shorter than its image: a sender that read a
    truncated file with pydicom sends a well-formed data set whose pixel data just ends early."""
    try:
        rows, columns, bits = int(dataset.Rows), int(dataset.Columns), int(dataset.BitsAllocated)
        samples = int(dataset.get("SamplesPerPixel", 1) or 1)
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return  # no image attributes to measure it by: the walk was all that can be checked
    if str(dataset.get("PhotometricInterpretation", "")).endswith("_422"):
        samples = 2  # two chroma samples for every two pixels: two values per pixel (PS3.3 C.7.6.3.1.2)
    needed = (rows * columns * samples * frames * bits + 7) // 8
    if length < needed:
        raise IngestError(f"truncated: pixel data holds {length} bytes, {frames} frame(s) of "
                          f"{rows}x{columns}x{samples} at {bits} bits need {needed}")


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _StructureWalk:
    """check_structure's walk over a data set in one encoding: read(position, count) -> bytes."""

    def __init__(self, read, implicit: bool, little: bool):
        self.read, self.implicit, self.endian = read, implicit, "<" if little else ">"

    def elements(self, position: int, end: int, until_delimiter: bool = False, top: dict | None = None) -> int:
        """Walk the elements from position to end, or, in an item of undefined length, up to
        and past its delimiter; return where they end. top: the data set's own level, whose
        pixel data length (if defined) it records, by tag."""
        # As pydicom does, trust the first element over the transfer syntax: a data set (or an
        # item in an explicit one) whose first VR is no two capitals is implicit VR, and a top
        # level one that has them is explicit. Real files get this wrong and read well.
        if position + 6 <= end and (top is not None or not self.implicit):
            vr = self.read(position + 4, 2)
            found_implicit = not (0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B)
            if found_implicit != self.implicit and self.read(position, 2) != b"\xfe\xff":
                return _StructureWalk(self.read, found_implicit, self.endian == "<").elements(position, end, until_delimiter, top)
        while position < end:
            tag, vr, length, position = self.header(position, end)
            if tag == ITEM_DELIMITATION_TAG and until_delimiter:
                return position
            if top is not None and tag == PIXEL_DATA_TAG and length != UNDEFINED_LENGTH:
                top[tag] = length
            position = self.value(tag, vr, length, position, end)
        if until_delimiter:
            raise IngestError("truncated: an item of undefined length has no end")
        return position

    def element(self, position: int, end: int) -> int:
        return self.value(*self.header(position, end), end)

    def header(self, position: int, end: int) -> tuple:
        """(tag, VR or None, length, value position) of the element or item at position."""
        head = self.read(position, 12)
        if position + 8 > end or len(head) < 8:
            raise IngestError(f"truncated: cut inside an element header at byte {position}")
        group, number, length = struct.unpack(self.endian + "HHI", head[:8])
        if self.implicit or group == 0xFFFE:  # items and delimiters have no VR
            return group << 16 | number, None, length, position + 8
        vr = head[4:6]
        if vr in LONG_LENGTH_VRS:
            if position + 12 > end or len(head) < 12:
                raise IngestError(f"truncated: cut inside an element header at byte {position}")
            return group << 16 | number, vr, struct.unpack(self.endian + "I", head[8:12])[0], position + 12
        if vr in SHORT_LENGTH_VRS:
            return group << 16 | number, vr, struct.unpack(self.endian + "H", head[6:8])[0], position + 8
        raise IngestError(f"malformed: {_tag_text(group << 16 | number)} has no valid VR ({vr.decode('latin-1')!r})")

    def value(self, tag: int, vr: bytes | None, length: int, position: int, end: int) -> int:
        """Walk an element's value from position; return where it ends."""
        if tag >> 16 == 0xFFFE:
            raise IngestError(f"malformed: {_tag_text(tag)} where an element should be")
        if length == UNDEFINED_LENGTH:
            if vr == b"UN":  # a sequence, in implicit VR little endian whatever the data set's (PS3.5 6.2.2)
                return _StructureWalk(self.read, True, True).items(tag, position, None, end)
            if tag == PIXEL_DATA_TAG and vr in (None, b"OB", b"OW"):
                return self.items(tag, position, None, end, fragments=True)
            if vr in (None, b"SQ"):
                return self.items(tag, position, None, end)
            raise IngestError(f"malformed: {_tag_text(tag)} has an undefined length but is no sequence")
        if position + length > end:
            raise IngestError(f"truncated: {_tag_text(tag)} declares {length} bytes, {end - position} left")
        if vr == b"SQ" or (vr is None and DicomDictionary.get(tag, ("",))[0] == "SQ"):
            self.items(tag, position, position + length, end)
        return position + length

    def items(self, tag: int, position: int, end: int | None, limit: int, fragments: bool = False) -> int:
        """Walk the items of sequence tag (the fragments of encapsulated pixel data) from
        position to end, or, if its length is undefined, to its delimiter before limit."""
        bound = limit if end is None else end
        while end is None or position < end:
            if position >= bound:
                raise IngestError(f"truncated: {_tag_text(tag)} has no end")
            item, _, length, position = self.header(position, bound)
            if item == SEQUENCE_DELIMITATION_TAG and end is None:
                return position
            if item != ITEM_TAG:
                raise IngestError(f"malformed: {_tag_text(item)} inside {_tag_text(tag)}, where an item should be")
            if length == UNDEFINED_LENGTH and not fragments:
                position = self.elements(position, bound, until_delimiter=True)
                continue
            if position + length > bound:
                raise IngestError(f"truncated: an item of {_tag_text(tag)} declares {length} bytes, {bound - position} left")
            if not fragments:
                self.elements(position, position + length)
            position += length
        return position


def _require_announced(meta: Dataset, sop_class: str, sop_uid: str):
    """Refuse a data set that is not the instance its meta group announces: a C-STORE's meta
    group is made from its command, whose UIDs the sender acts on when it hears success."""
    for keyword, actual in (("MediaStorageSOPClassUID", sop_class), ("MediaStorageSOPInstanceUID", sop_uid)):
        announced = str(meta.get(keyword, ""))
        if announced and actual and announced != actual:
            name = keyword.removeprefix("MediaStorage")
            raise IngestError(f"{name} is not the announced one: {actual} in the data set, {announced} announced",
                              DATA_SET_DOES_NOT_MATCH_SOP_CLASS)


class Storage:
    """Files under data_dir/storage/<study>/<series>/<sop>.dcm, written atomically.

    Received bytes are stored exactly as received, after a file meta header; every name is a
    validated UID, so no file can be written outside the storage folder.

    Storage plugins add other places, each a URI scheme: an instance kept by one is indexed
    under the URI its plugin gave it, and read back through that plugin.
    """

    def __init__(self, data_dir: pathlib.Path, fsync: bool = True, scheme: str = "file", sweep: bool = True,
                 node_dir: pathlib.Path | None = None):
        self.root = (data_dir / "storage").resolve()
        # This node's own (Config.node_dir; the data dir on one machine), on the storage
        # folder's file system all the same: a temp file is renamed into place, not copied.
        self.tmp = ((node_dir or data_dir) / "tmp").resolve()
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        # The daemon sweeps at start; a DICOM worker process (sweep False) must not, since the
        # temp files of the daemon and of the other workers are being written.
        for stale in self.tmp.glob("store-*") if sweep else ():  # left by a crash mid-write; never acknowledged
            stale.unlink(missing_ok=True)
        #: Where received objects go: "file" (this folder) or a storage plugin's URI scheme.
        self.scheme = scheme
        #: Storage by URI scheme: callables (operation, *args) for the operations store, get,
        #: list and remove of HOOKS["storage"]. Storage plugins add theirs.
        self.schemes = {"file": self._files}
        self._temp_names = itertools.count()

    def _files(self, operation: str, *args):
        """The built-in "file" scheme, whose locations are plain paths. It stores with write(),
        since a file's path needs the study and series UIDs too."""
        if operation == "get":
            return pathlib.Path(args[0]).read_bytes()
        if operation == "remove":
            return os.unlink(args[0])
        if operation == "list":
            return [str(path) for path in self.root.rglob("*.dcm")]
        raise ValueError(f"file storage has no operation {operation!r} here")

    def store(self, path: pathlib.Path, sop_uid: str, data: bytes) -> tuple[str, int, int]:
        """Keep a received object where [storage] scheme says: (location, size, mtime_ns).

        A storage plugin that is missing or fails never loses the object: it goes to path.
        """
        if self.scheme != "file":
            plugin = self.schemes.get(self.scheme)
            uri = plugin("store", sop_uid, data) if plugin else None
            if isinstance(uri, str) and location_scheme(uri) == self.scheme:
                return uri, len(data), time.time_ns()
            log.error("storage %s: %s %s, so it is kept in a file", self.scheme,
                      "no enabled plugin has this scheme for" if plugin is None else "the plugin did not store", sop_uid)
        stat = self.write(path, data)
        return str(path), stat.st_size, stat.st_mtime_ns

    def read(self, location: str) -> bytes:
        """The bytes of a stored instance: a file, or what a storage plugin keeps at a URI."""
        data = self._scheme_of(location)("get", location)
        if not isinstance(data, (bytes, bytearray)):
            raise OSError(f"storage plugin {location_scheme(location)} has nothing at {location}")
        return bytes(data)

    def open(self, location: str):
        """What pydicom.dcmread reads an instance from: its path, or its bytes in memory."""
        return location if location_scheme(location) == "file" else io.BytesIO(self.read(location))

    def remove(self, location: str):
        """Delete a stored instance, file or plugin object (a missing file raises FileNotFoundError)."""
        self._scheme_of(location)("remove", location)

    def _scheme_of(self, location: str):
        scheme = location_scheme(location)
        if scheme not in self.schemes:
            raise OSError(f"no enabled storage plugin has the scheme of {location}")
        return self.schemes[scheme]

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> pathlib.Path:
        for uid in (study_uid, series_uid, sop_uid):
            if not is_valid_uid(uid):
                raise IngestError(f"invalid UID {uid[:80]!r}", STORE_REFUSED_INVALID_UID)
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def write(self, path: pathlib.Path, data: bytes) -> os.stat_result:
        """Write data to path atomically: a temp file in the data dir, fsync, rename, and (with
        fsync) the rename itself and any folder made for it flushed too. Returns the file's
        stat (a rename keeps its size and modification time)."""
        tmp_name, stat = self.write_temp(data)
        self.place(tmp_name, path)
        return stat

    def write_temp(self, data: bytes) -> tuple[str, os.stat_result]:
        """Write data to a new temp file, fsynced (with fsync): its name and stat. place() puts
        it where it belongs. A DICOM worker process writes here, the daemon places."""
        fd, tmp_name = self._temp_file()
        try:
            try:
                unwritten = memoryview(data)
                while unwritten:
                    unwritten = unwritten[os.write(fd, unwritten):]
                if self.fsync:
                    os.fsync(fd)
                stat = os.fstat(fd)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        return tmp_name, stat

    def place(self, tmp_name: str, path: pathlib.Path):
        """Rename a temp file of write_temp() to path, and (with fsync) flush the rename and
        any folder made for it; the temp file is gone either way."""
        try:
            made = []
            try:  # the folders are there already for all but a series' first instance
                os.replace(tmp_name, path)
            except FileNotFoundError:
                made = make_folders(path.parent)
                os.replace(tmp_name, path)
            if self.fsync:
                for folder in dict.fromkeys([path.parent, *(folder.parent for folder in made)]):
                    fsync_folder(folder)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise

    def _temp_file(self) -> tuple[int, str]:
        """A new file in the tmp folder, for its owner alone: (descriptor, name). Named by a
        counter, not at random as tempfile does: that costs a tenth of a small object's store."""
        while True:
            name = f"{self.tmp}/store-{os.getpid()}-{next(self._temp_names)}"
            try:
                return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600), name
            except FileExistsError:  # another process with our PID's leftovers: take the next
                continue

    def set_aside(self, path: pathlib.Path) -> pathlib.Path | None:
        """Keep a file that a store is about to replace, as a hard link in the tmp folder (no
        bytes copied), so that the store can put it back if it fails; None if there is none."""
        kept = self.tmp / f"store-kept-{uuid.uuid4().hex}"
        try:
            os.link(path, kept)
        except FileNotFoundError:
            return None
        return kept

    def discard(self, location: str, kept: pathlib.Path | None = None):
        """Undo a store that cannot be acknowledged: remove what it wrote and put back the file
        it replaced, so nothing unindexed stays behind."""
        try:
            if kept is not None:
                os.replace(kept, location)
            else:
                self.remove(location)
        except OSError as error:
            log.error("cannot remove %s after a failed store: %s", location, error)

    def contains(self, path: pathlib.Path) -> bool:
        return path.resolve().is_relative_to(self.root)


def read_received(storage: Storage, data: bytes) -> tuple[Dataset, list[str], pathlib.Path, tuple]:
    """Read a received Part 10 byte string: (its header, [study, series, SOP instance UID], the
    path it is stored at, extract_metadata() of it). IngestError if it is cut short, malformed,
    or not the instance its meta group names. Pure work: a DICOM worker process does it too."""
    dataset = read_received_header(data)
    check_structure(data, dataset)
    try:
        uids = [str(dataset.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        sop_class = str(dataset.get("SOPClassUID", ""))
    except Exception as error:  # values are decoded lazily: a malformed UID element fails here
        raise IngestError(f"unreadable UID: {error}") from None
    if not all(uids):
        raise IngestError("missing StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID")
    _require_announced(dataset.file_meta, sop_class, uids[2])
    path = storage.path_for(*uids)
    try:
        extracted = extract_metadata(dataset)  # once: for the store filters and for the index
    except Exception as error:
        raise IngestError(f"unreadable DICOM: {error}") from None
    return dataset, uids, path, extracted


@dataclasses.dataclass
class ReceivedObject:
    """A received object that a DICOM worker process has read and written, fsynced, to a temp
    file: what the daemon needs to commit it (Ingest.commit_received). Or, with failure set, why
    it could not be read or written."""
    uids: list[str]  #: study, series and SOP instance UID (the command's SOP instance UID on failure)
    record: "InstanceRecord | None" = None  #: its index record, its path the final one
    temp_name: str = ""
    #: (status, reason, errno): an IngestError's status and reason (errno None), or an OSError's
    failure: tuple | None = None
    #: Why the C-STORE request itself could not be read (its command's UIDs), if it could not
    unreadable_command: str = ""


def prepare_received(storage: Storage, data: bytes, sop_uid: str = "") -> ReceivedObject:
    """The part of storing a received object that needs neither the index nor the plugins, done
    in a DICOM worker process: read it, write it to a temp file and fsync it, build its record.
    sop_uid: the C-STORE command's, named on failure."""
    try:
        dataset, uids, path, extracted = read_received(storage, data)
        temp_name, written = storage.write_temp(data)  # a rename keeps its modification time
        try:
            record = make_record(dataset, str(path), "store", written.st_size, written.st_mtime_ns, extracted)
        except BaseException:
            os.unlink(temp_name)
            raise
        return ReceivedObject(uids, record, temp_name)
    except IngestError as error:
        return ReceivedObject(["", "", sop_uid], failure=(int(error.status), str(error), None))
    except OSError as error:
        return ReceivedObject(["", "", sop_uid], failure=(0, error.strerror or str(error), error.errno))


class Ingest:
    """The one way in: received objects, watched files and indexed folders all pass here."""

    def __init__(self, index: Index, storage: Storage, duplicates: str = "keep", space: DiskSpace | None = None,
                 max_instances: int = 0, max_size_mb: float = 0, when_full: str = "refuse", protected_labels=()):
        self.index, self.storage, self.duplicates = index, storage, duplicates
        #: Labels whose studies recycling and retention rules never delete ([storage] protected_labels).
        self.protected_labels = tuple(protected_labels)
        #: [storage] quotas on received objects (0: no limit) and what to do when one is reached.
        self.max_instances, self.max_bytes, self.when_full = max_instances, int(max_size_mb * 1024 * 1024), when_full
        #: Received objects admitted under the quotas but not yet indexed: (instances, bytes).
        #: Counted so that parallel associations cannot all see the last free place and overshoot.
        self._in_flight = (0, 0)
        self._quota_lock = threading.Lock()
        self.recycled = 0  #: studies deleted to make room (when_full = recycle)
        #: The data disk's free space and reserve; received objects are refused below the reserve.
        self.space = space or DiskSpace(storage.root)
        self.stats = IngestStats()
        self.listeners = []  #: callables(record, calling_aet), told of every indexed instance
        #: The audit log (AuditLog) that recycling and retention record their deletions in, if any.
        self.audit = None
        #: SOPInstanceUID -> paths of further copies skipped as duplicates, to index if the first goes.
        self.shadowed: dict[str, set[str]] = {}
        #: callable(calling_aet, tags) -> None to accept, or a DICOM status to refuse with
        self.store_filter = None
        #: callable(record) that may add searchable fields before a record is written
        self.enrich = None
        #: callable(record) -> the webhook deliveries (Delivery rows) its arrival makes, queued
        #: in the transaction that indexes it
        self.deliveries_for = None
        #: callable() told once an instance's deliveries are committed, to send them now. Only
        #: then: waking the delivery thread for every instance cost each store a thread switch.
        self.deliveries_queued = None
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

    def store_received(self, data: bytes, calling_aet: str = "", origin: str = "store") -> DicomStatus:
        """Store and index a received Part 10 byte string; returns the DICOM status.

        The status is success only once the file is on disk (fsynced) and its index row is
        committed, so an acknowledged instance survives a crash or kill -9. Nothing of an object
        that is cut short, malformed, or not the instance its meta group (for C-STORE: its
        command) names is stored or indexed.
        """
        try:
            dataset, uids, path, extracted = read_received(self.storage, data)

            def keep() -> InstanceRecord:
                location, size, mtime_ns = self.storage.store(path, uids[2], data)
                try:
                    return make_record(dataset, location, origin, size, mtime_ns, extracted)
                except BaseException:
                    self.storage.discard(location)
                    raise

            return self._admit(uids, extracted[0], path, len(data), lambda: data, keep, calling_aet)
        except (IngestError, OSError, apsw.Error) as error:
            return self._refusal(error, _meta_uids(data).get(0x0003), calling_aet)

    def commit_received(self, received: "ReceivedObject", calling_aet: str = "") -> DicomStatus:
        """Store and index an object that a DICOM worker process has read and written to a temp
        file (prepare_received): the rest of store_received (store filters, the duplicate
        policy, disk space and quotas, the rename and the index commit), with the same status."""
        try:
            if received.failure is not None:
                status, reason, errno_ = received.failure
                raise IngestError(reason, status) if errno_ is None else OSError(errno_, reason)
            record = received.record
            try:
                admitted = False

                def keep() -> InstanceRecord:
                    nonlocal admitted
                    admitted = True
                    self.storage.place(received.temp_name, pathlib.Path(record.path))
                    return record

                return self._admit(received.uids, record.meta, pathlib.Path(record.path), record.size,
                                   lambda: pathlib.Path(received.temp_name).read_bytes(), keep, calling_aet)
            finally:
                if not admitted:  # refused, a duplicate, or no room: the temp file is not wanted
                    with contextlib.suppress(OSError):
                        os.unlink(received.temp_name)
        except (IngestError, OSError, apsw.Error) as error:
            return self._refusal(error, received.uids[2] if received.uids else None, calling_aet)

    def _admit(self, uids: list[str], tags: dict, path: pathlib.Path, size: int, read_data, keep,
               calling_aet: str) -> DicomStatus:
        """What follows reading an object, wherever it was read: store filters, the duplicate
        policy, disk space and quotas, then keep() (write it, returning its InstanceRecord) and
        the index commit. read_data() gives its bytes, for comparing with a duplicate."""
        refusal = self.store_filter(calling_aet, tags) if self.store_filter else None
        if refusal:
            self.stats.failed += 1
            self.log.info("a store filter refused %s from %s with 0x%04X", uids[2], calling_aet or "?", refusal)
            return DicomStatus(refusal, "refused by a store filter", uids[0])
        with self._lock_uid(uids[2]):
            if not self._accept_duplicate(uids[2], read_data, path, calling_aet):
                return DicomStatus(SUCCESS, study_uid=uids[0])
            shortage = self.space.room_for(size)
            if shortage:
                self.stats.failed += 1
                self.stats.out_of_space += 1
                self.log.error("refused %s from %s: out of resources, %s", uids[2], calling_aet or "?", shortage)
                return DicomStatus(OUT_OF_RESOURCES, "out of resources: " + shortage, uids[0])
            with self._room_in_quota(size, uids[0]) as over_quota:
                if over_quota:
                    self.stats.failed += 1
                    self.log.error("refused %s from %s: out of resources, %s", uids[2], calling_aet or "?", over_quota)
                    return DicomStatus(OUT_OF_RESOURCES, "out of resources: " + over_quota, uids[0])
                self._write_and_index(path, uids[2], keep, calling_aet)
        self.log.info("stored %s from %s", uids[2], calling_aet or "?")
        return DicomStatus(SUCCESS, study_uid=uids[0])

    def _refusal(self, error: Exception, sop_uid: str | None, calling_aet: str) -> DicomStatus:
        """The status for a received object that could not be stored, counted and logged."""
        self.stats.failed += 1
        if isinstance(error, IngestError):
            if error.status in (CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH_SOP_CLASS):
                self.stats.malformed += 1
            # sop_uid: the command's (C-STORE), when the data set has none
            self.log.warning("refused %s from %s with 0x%04X: %s", sop_uid or "?", calling_aet or "?", error.status, error)
            return DicomStatus(error.status, str(error))
        # The temp file, its fsync, the rename or the index commit failed: out of resources.
        if is_out_of_space(error):
            self.stats.out_of_space += 1
            self.space.ran_out("storing a received object", error)
        self.log.error("cannot store an object from %s: out of resources, %s", calling_aet or "?", error)
        return DicomStatus(OUT_OF_RESOURCES, "cannot store: " + (getattr(error, "strerror", None) or str(error)))

    def _write_and_index(self, path: pathlib.Path, sop_uid: str, keep, calling_aet: str):
        """Write a received object (keep() writes it and gives its record) and commit its index
        row, or leave nothing of it behind."""
        # An overwriting version may live elsewhere (its study or series changed): the file it
        # replaces must go, or it stays on disk unindexed (check reports it).
        replaced = self.index.instance(sop_uid) if self.duplicates == "overwrite" else None
        kept = self.storage.set_aside(path) if replaced and replaced.path == str(path) else None
        try:
            record = keep()
        except BaseException:
            if kept is not None:  # the file it was to replace goes back
                with contextlib.suppress(OSError):
                    os.replace(kept, path)
            raise
        location = record.path
        try:
            self._index(record, calling_aet)
        except BaseException:
            # Never acknowledged, so it must not stay: a file without its index row is an
            # orphan, and a commit that failed for lack of space fails this store.
            self.storage.discard(location, kept)
            raise
        if kept is not None:
            kept.unlink(missing_ok=True)
        self.stats.stored += 1
        self.space.wrote()
        if replaced and replaced.path != location and self.storage.contains(pathlib.Path(replaced.path)):
            pathlib.Path(replaced.path).unlink(missing_ok=True)

    # ---- quotas and deletion ---------------------------------------------------------------

    @contextlib.contextmanager
    def _room_in_quota(self, size: int, study_uid: str):
        """Hold a place for one received object of size bytes, of study study_uid, within the
        [storage] quotas while it is written and indexed; yields None, or why there is no room
        (then nothing is held).

        What is in flight counts with what is indexed, under one lock, so four associations
        storing at once cannot each take the last place. Between an object's commit and the
        end of this block it counts twice: a store may then be refused early, never let past.
        """
        if not (self.max_instances or self.max_bytes):
            yield None
            return
        with self._quota_lock:
            shortage = self._quota_shortage(size)
            if shortage and self.when_full == "recycle":
                shortage = self._recycle_for(size, study_uid)
            if not shortage:
                self._in_flight = (self._in_flight[0] + 1, self._in_flight[1] + size)
        if shortage:
            yield shortage
            return
        try:
            yield None
        finally:
            with self._quota_lock:
                self._in_flight = (self._in_flight[0] - 1, self._in_flight[1] - size)

    def quota_status(self) -> dict:
        """The [storage] quotas (0: none), what they count now, and the studies recycled."""
        instances, stored_bytes = self.index.received_totals()
        return {"max_instances": self.max_instances, "max_bytes": self.max_bytes, "when_full": self.when_full,
                "instances": instances, "bytes": stored_bytes, "recycled_studies": self.recycled}

    def _quota_shortage(self, size: int) -> str | None:
        """None if one more object of size bytes fits the quotas, else which one it passes."""
        instances, stored_bytes = self.index.received_totals()
        instances, stored_bytes = instances + self._in_flight[0], stored_bytes + self._in_flight[1]
        if self.max_instances and instances + 1 > self.max_instances:
            return f"{instances} instances held, the quota is {self.max_instances} ([storage] max_instances)"
        if self.max_bytes and stored_bytes + size > self.max_bytes:
            return (f"{stored_bytes // 1024} KB held and {size // 1024} KB more asked, the quota is "
                    f"{self.max_bytes / (1024 * 1024):g} MB ([storage] max_size_mb)")
        return None

    def _recycle_for(self, size: int, study_uid: str) -> str | None:
        """Delete the unprotected studies that arrived longest ago until an object of size bytes
        fits the quotas (when_full = recycle); None once it fits, else why it still does not.
        The object's own study is spared: a study larger than the quota must not eat itself."""
        if self.max_bytes and size > self.max_bytes:
            return f"the object alone ({size // 1024} KB) is larger than [storage] max_size_mb"
        while shortage := self._quota_shortage(size):
            candidates = self.index.recyclable_studies(limit=1, sparing=study_uid, protected_labels=self.protected_labels)
            if not candidates:
                return shortage + "; no unprotected study is left to recycle"
            study = candidates[0]
            self.log.warning("recycling study %s (%d instances, %d KB, last arrival %s) to make room: %s",
                             study.study_instance_uid, study.instances, study.bytes // 1024,
                             _utc_text(study.last_arrival_ns), shortage)
            doomed = self.index.instances_of(study_uid=study.study_instance_uid)
            deleted, failed = self.delete_instances(doomed, "recycled")
            self._audit_deletion(study.study_instance_uid, doomed, deleted, failed, "recycled: a quota is reached")
            if failed:
                return shortage + f"; recycling study {study.study_instance_uid} failed"
            self.recycled += 1
        return None

    def apply_retention(self, rules, dry_run: bool = False) -> list[dict]:
        """Delete (or with dry_run only list) the studies the [retention] rules name: one dict
        per study, with the rule that named it first. Only instances that arrived before the
        rule's cutoff go: one received since the listing keeps its study alive."""
        now_ns, named = time.time_ns(), {}
        for rule in rules:
            cutoff_ns = now_ns - int(rule.older_than_days * 86400e9)
            for study in self.index.studies_to_retire(cutoff_ns, rule.modality, rule.origin, rule.label,
                                                      self.protected_labels):
                if study.study_instance_uid in named:
                    continue
                named[study.study_instance_uid] = {
                    "rule": rule.name, "StudyInstanceUID": study.study_instance_uid, "instances": study.instances,
                    "bytes": study.bytes, "lastArrival": _utc_text(study.last_arrival_ns)}
                if dry_run:
                    continue
                self.log.warning("retention rule %s: deleting study %s (%d instances, %d KB, last arrival %s)",
                                 rule.name, study.study_instance_uid, study.instances, study.bytes // 1024,
                                 _utc_text(study.last_arrival_ns))
                old = [i for i in self.index.instances_of(study_uid=study.study_instance_uid) if i.mtime_ns < cutoff_ns]
                deleted, failed = self.delete_instances(old, f"retention rule {rule.name}")
                self._audit_deletion(study.study_instance_uid, old, deleted, failed, f"retention rule {rule.name}")
                named[study.study_instance_uid].update(deleted=deleted, failed=failed)
        if dry_run and named:
            self.log.info("retention dry run: %d stud%s would be deleted", len(named), "y" if len(named) == 1 else "ies")
        return list(named.values())

    def _audit_deletion(self, study_uid: str, instances, deleted: int, failed: int, why: str):
        """The audit entry of a study the archive deleted by itself (no user asked for it)."""
        if self.audit is not None:
            self.audit.record("delete", AUDIT_FAILED if failed else AUDIT_OK, studies=study_uid,
                              instances=[instance.sop_instance_uid for instance in instances],
                              count=deleted, detail=f"{why}; {failed} not deleted" if failed else why)

    def delete_instances(self, instances, reason: str) -> tuple[int, int]:
        """The one way stored instances are deleted (REST remove, recycling): their files or
        plugin objects, then their index rows; returns (deleted, failed).

        Files first: killed midway, what is left is index rows whose files are gone, which
        'dicoogled check' lists as missing and which deleting again finishes (a file already
        gone counts as deleted). The other order would leave unindexed files that a reindex
        brings back: a deleted study must never return. An instance whose file cannot be
        deleted stays indexed, so the index still tells the truth.
        """
        deleted, failed = [], 0
        for instance in instances:
            try:
                self.storage.remove(instance.path)
                deleted.append(instance.path)
            except FileNotFoundError:
                deleted.append(instance.path)
            except OSError as error:
                failed += 1
                self.log.warning("cannot delete %s (%s): %s", instance.path, reason, error)
        self.unindex_paths(deleted)
        if deleted:
            self.space.recheck()
            self.log.info("deleted %d instance(s) (%s)", len(deleted), reason)
        return len(deleted), failed

    def _accept_duplicate(self, sop_uid: str, read_data, path: pathlib.Path, calling_aet: str) -> bool:
        """Apply the duplicate policy; True when the new object should be written. read_data()
        gives the new object's bytes (read only when there is a duplicate to compare)."""
        existing = self.index.instance(sop_uid)
        if existing is None:
            return True
        data = read_data()
        self.stats.duplicates += 1
        old_path = pathlib.Path(existing.path)
        try:
            old = self.storage.read(existing.path)
        except OSError:
            self.log.warning("duplicate %s: indexed file %s is gone, storing the new one", sop_uid, old_path)
            return True
        if old[_dataset_offset(old):] == data[_dataset_offset(data):]:
            self.log.info("duplicate %s from %s: identical, nothing to do", sop_uid, calling_aet or "?")
            return False
        ours = self.storage.contains(old_path) or location_scheme(existing.path) != "file"  # not a watched file
        if self.duplicates == "overwrite" and ours:
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
                check_structure(handle, dataset)
            if str(dataset.get("SOPClassUID", "")) == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in dataset:
                raise IngestError("a DICOMDIR, not an instance")
            sop_uid = str(dataset.get("SOPInstanceUID", ""))
            if not sop_uid or not dataset.get("StudyInstanceUID") or not dataset.get("SeriesInstanceUID"):
                raise IngestError("missing StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID")
            with self._lock_uid(sop_uid):
                existing = self.index.instance(sop_uid)
                if existing and existing.path != str(path) and os.path.exists(existing.path):
                    self.stats.duplicates += 1
                    self.shadowed.setdefault(sop_uid, set()).add(str(path))
                    self.log.warning("%s: SOPInstanceUID %s is already indexed from %s; skipped", path, sop_uid, existing.path)
                    return False
                self._index(make_record(dataset, str(path), origin, stat.st_size, stat.st_mtime_ns))
                self.shadowed.get(sop_uid, set()).discard(str(path))
            return True
        except IngestError as error:
            self.stats.skipped += 1
            self.log.warning("skipped %s: %s", path, error)
        except OSError as error:
            self.stats.skipped += 1
            self.log.warning("skipped %s: %s", path, error.strerror or error)
        except apsw.Error as error:  # the index cannot take it now (a full disk): tried again later
            self.stats.failed += 1
            if is_out_of_space(error):
                self.stats.out_of_space += 1
                self.space.ran_out(f"indexing {path}", error)
            self.log.error("cannot index %s: %s", path, error)
        return False

    def _index(self, record: InstanceRecord, calling_aet: str = ""):
        if self.enrich:
            self.enrich(record)
        deliveries = self.deliveries_for(record) if self.deliveries_for else ()
        self.index.write(Index.add_instance, record, deliveries, recoverable=True)
        self.stats.indexed += 1
        if deliveries and self.deliveries_queued:
            self.deliveries_queued()
        for listener in self.listeners:
            try:
                listener(record, calling_aet)
            except Exception:
                self.log.exception("listener failed for %s", record.sop_instance_uid)

    def unindex_paths(self, paths) -> int:
        paths = [str(p) for p in paths]
        return self.index.write(Index.remove_paths, paths) if paths else 0

    def reconcile_scheme(self, scheme: str):
        """Bring the index in line with what a storage plugin lists, as reconcile() does for a
        folder: its objects are indexed (in place: no on_stored), vanished ones unindexed."""
        plugin = self.storage.schemes[scheme]
        listed = plugin("list")
        if not isinstance(listed, list):
            return
        known = self.index.locations_in(scheme)
        self.unindex_paths(known - set(listed))
        for uri in set(map(str, listed)) - known:
            try:
                data = self.storage.read(uri)
                dataset = read_received_header(data)
                check_structure(data, dataset)
                self._index(make_record(dataset, uri, "index", len(data), time.time_ns()))
            except (OSError, IngestError) as error:
                self.stats.skipped += 1
                self.log.warning("skipped %s: %s", uri, error)


# ============================================================================================
# Query: DICOM matching (PS3.4 C.2.2.2) over the index
# ============================================================================================


def _wildcard_regex(pattern: str, fold: bool) -> re.Pattern:
    """DICOM wildcard matching: '*' any run, '?' one character; everything else literal."""
    if fold:
        pattern = _fold(pattern)
    parts = ("." if c == "?" else ".*" if c == "*" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.DOTALL)


def _in_range(stored: str, low: str, high: str) -> bool:
    """Range matching on DA/TM/DT text; an empty value never matches, bounds are inclusive."""
    if not stored:
        return False
    if low and stored < low:
        return False
    return not high or stored[: len(high)] <= high


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


@dataclasses.dataclass
class Key:
    """One element of a C-FIND identifier: what to match, and what to return."""

    keyword: str  # keyword, or 8-hex tag for private and unknown elements
    tag: int
    vr: str
    value: object  # text, or for sequences a list holding one dict of sub-keys {keyword: (vr, value)}


def _refuse_cut_short(ds: Dataset):
    """Raise QueryError for an element whose value is shorter than its header says: pydicom
    reads it without complaint, and an answer to a guessed key would mislead."""
    for tag in ds.keys():
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement) and raw.length != 0xFFFFFFFF and raw.length != len(raw.value or b""):
            raise QueryError(f"malformed key {tag}: {raw.length} bytes announced, {len(raw.value or b'')} sent")


def identifier_from_keys(keys: dict, level: str | None = None) -> Dataset:
    """A C-FIND identifier from keywords (or 8-hex tags, private ones too) and their query values
    as text ('' asks for the key to be returned); raises QueryError for an unknown keyword or a
    value its VR cannot hold. The one way a plugin's or a web query becomes an identifier."""
    identifier = Dataset()
    if level is not None:
        identifier.QueryRetrieveLevel = level
    for key, value in keys.items():
        tag = int(key, 16) if re.fullmatch(r"[0-9A-Fa-f]{8}", key) else tag_for_keyword(key)
        if tag is None:
            raise QueryError(f"unknown attribute {key!r}", IDENTIFIER_DOES_NOT_MATCH)
        try:
            vr = dictionary_VR(tag)
        except KeyError:  # a private tag: its value is matched as text
            vr = "LO"
        try:
            identifier.add_new(tag, vr, [] if vr == "SQ" else value)
        except ValueError:  # pydicom converts IS, DS and the binary VRs at once
            raise QueryError(f"{key}: {value[:40]!r} is not a valid {vr} value", IDENTIFIER_DOES_NOT_MATCH) from None
    return identifier


def identifier_keys(identifier: Dataset) -> dict[str, str]:
    """An identifier's keys as identifier_from_keys takes them: keyword (or 8-hex tag) -> text,
    multiple values joined by backslashes, a sequence as ''."""
    keys = {}
    for element in identifier:
        value = element.value
        if element.VR == "SQ" or value is None:
            text = ""
        elif isinstance(value, bytes):  # a private key sent in implicit VR
            text = value.decode("latin-1").rstrip("\x00 ")
        elif isinstance(value, (MultiValue, list)):
            text = "\\".join(map(str, value))
        else:
            text = str(value)
        keys[element.keyword or f"{element.tag:08X}"] = text
    return keys


def identifier_key_list(ds: Dataset) -> list[Key]:
    """The keys of an identifier (or of one sequence item), Specific Character Set and the level
    left out; raise QueryError for one that cannot be read."""
    keys = []
    _refuse_cut_short(ds)
    for tag in list(ds.keys()):
        if tag in (0x00080052, 0x00080005) or tag.element == 0x0000:
            continue
        try:
            element = ds[tag]  # decoding here, so that a broken value is a QueryError too
            if element.VR == "SQ":
                items = [{k.keyword: (k.vr, k.value) for k in identifier_key_list(item)} for item in element.value[:1]]
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
            raise QueryError(f"malformed key {tag}: {error}") from None
    return keys


def parse_identifier(identifier: Dataset) -> tuple[str, list[Key]]:
    """Split a C-FIND identifier into its level and keys; raise QueryError if it is unusable."""
    _refuse_cut_short(identifier)  # before reading the level, which decodes its element
    try:
        level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    except Exception as error:
        raise QueryError(f"unreadable QueryRetrieveLevel: {error}", IDENTIFIER_DOES_NOT_MATCH) from None
    if level not in LEVELS:
        raise QueryError(f"QueryRetrieveLevel {level!r} is not PATIENT, STUDY, SERIES or IMAGE", IDENTIFIER_DOES_NOT_MATCH)
    return level, identifier_key_list(identifier)


class Finder:
    """Answers C-FIND (and the matching of C-MOVE, C-GET) from the index, never from files."""

    def __init__(self, index: Index):
        self.index = index

    def _matches(self, identifier: Dataset, cancelled, offset: int = 0, limit: int | None = None,
                 visibility: Visibility = EVERYTHING):
        """Yield (level, keys, found entity, metadata) for every entity the identifier matches
        among those the visibility shows (a patient: through one of its visible studies), but
        the first offset of them, and at most limit.

        The index matches the main attributes (Index.find); any other attribute it only narrows
        down to, and it is matched here exactly against the representative instance's metadata.
        When the index decides every match, it also skips and limits them; otherwise the skipped
        matches are only counted, never built.
        """
        level, keys = parse_identifier(identifier)
        from_metadata = [key for key in keys if not Index.answers(level, key.keyword)]
        checked = [key for key in from_metadata if not _is_universal(key.value)]
        if checked:
            entities = self.index.find(level, keys, visibility=visibility)
        else:
            entities = self.index.find(level, keys, offset, limit, visibility)
            offset, limit = 0, None
        if limit == 0:
            return
        for entity in entities:
            if cancelled():
                return
            meta = self.index.metadata(entity.representative) if from_metadata else {}
            if all(match_value(k.vr, k.value, meta.get(k.keyword)) for k in checked):
                if offset:
                    offset -= 1
                    continue
                yield level, keys, entity, meta
                if limit is not None:
                    limit -= 1
                    if not limit:
                        return

    def search(self, identifier: Dataset, cancelled=lambda: False, offset: int = 0, limit: int | None = None,
               visibility: Visibility = EVERYTHING):
        """Yield the C-FIND response data sets for an identifier, but the first offset and at
        most limit of them, of what the visibility shows; stops when cancelled()."""
        for level, keys, entity, meta in self._matches(identifier, cancelled, offset, limit, visibility):
            response = Dataset()
            for tag, (vr, value) in self._response(level, keys, entity.values, meta, identifier):
                response.add_new(tag, vr, value)
            yield response

    def search_encoded(self, identifier: Dataset, transfer_syntax: str, cancelled=lambda: False,
                       visibility: Visibility = EVERYTHING):
        """search(), each response encoded in transfer_syntax, as a C-FIND sends it: written
        directly in the little endian syntaxes (a pydicom Dataset and its encoding cost ten
        times more), through pydicom for the rest and for a response with a sequence."""
        syntax = pydicom.uid.UID(transfer_syntax)
        direct = syntax in (pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian)
        for level, keys, entity, meta in self._matches(identifier, cancelled, visibility=visibility):
            elements = self._response(level, keys, entity.values, meta, identifier)
            encoded = _encode_elements(elements, syntax.is_implicit_VR) if direct else None
            if encoded is None:
                response = Dataset()
                for tag, (vr, value) in elements:
                    response.add_new(tag, vr, value)
                encoded = pynetdicom_encode(response, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
            yield encoded

    @staticmethod
    def _response(level, keys, answered, meta, identifier) -> list[tuple[int, tuple[str, object]]]:
        """A response's elements, (tag, (VR, value as pydicom takes it)), in tag order: each
        key's value as the index answered it (answered), else from the metadata."""
        response = {}
        non_ascii = False
        for key in keys:
            value = answered[key.keyword] if key.keyword in answered else meta.get(key.keyword)
            if value is None:
                value = ""
            if key.vr == "SQ" and key.value and key.value[0] and isinstance(value, list):
                # Items come back with the keys the request's item lists (empty if not stored).
                value = [{k: item.get(k, "") for k in key.value[0]} for item in value if isinstance(item, dict)]
            element_value = _dicom_value(key.vr, value)
            if not str(value).isascii():  # multi-values and sequence items count too
                non_ascii = True
            response[key.tag] = (key.vr, element_value)
        response[0x00080052] = ("CS", level)  # QueryRetrieveLevel
        charset = identifier.get("SpecificCharacterSet")
        if non_ascii:
            response[0x00080005] = ("CS", "ISO_IR 192")
        elif charset:
            response[0x00080005] = ("CS", charset)
        return sorted(response.items())

    def instances(self, identifier: Dataset, cancelled=lambda: False,
                  visibility: Visibility = EVERYTHING) -> list[IndexedInstance]:
        """Every instance of the entities matched (for C-MOVE and C-GET) that the visibility shows."""
        level, _ = parse_identifier(identifier)
        found = []
        for _, _, entity, _ in self._matches(identifier, cancelled, visibility=visibility):
            # A patient's studies outside the visibility stay behind, as its matching left them out.
            found.extend(self.index.instances_of_entity(level, entity.id, visibility))
        return found


_NUMBER_FORMATS = {"US": "<H", "UL": "<I", "SS": "<h", "SL": "<l", "UV": "<Q", "SV": "<q", "FL": "<f", "FD": "<d"}


def _encode_elements(elements: list, implicit: bool) -> bytes | None:
    """A data set of (tag, (VR, value)) in little endian, as pydicom writes the same values
    (text in UTF-8 when the set says ISO_IR 192, else ASCII); None when it holds what is left to
    pydicom (a sequence, text of another character set, a value too long for its VR)."""
    utf8 = any(tag == 0x00080005 and value == "ISO_IR 192" for tag, (_, value) in elements)
    out = []
    for tag, (vr, value) in elements:
        if vr == "SQ":
            return None
        if value is None or value == "" or vr in BINARY_VRS or vr == "AT":
            encoded = b""
        elif vr in _NUMBER_FORMATS:
            numbers = value if isinstance(value, (list, MultiValue)) else [value]
            encoded = b"".join(struct.pack(_NUMBER_FORMATS[vr], number) for number in numbers if number is not None)
        else:
            text = "\\".join(map(str, value)) if isinstance(value, (list, MultiValue)) else str(value)
            try:
                encoded = text.encode("utf-8" if utf8 else "ascii")
            except UnicodeEncodeError:
                return None
            if len(encoded) % 2:
                encoded += b"\0" if vr == "UI" else b" "
        if implicit:
            out.append(struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(encoded)))
        elif vr.encode() in LONG_LENGTH_VRS:
            out.append(struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(encoded)))
        elif len(encoded) > 0xFFFF:
            return None
        else:
            out.append(struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(encoded)))
        out.append(encoded)
    return b"".join(out)


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
# Worklist: the Modality Worklist (PS3.4 K) and Modality Performed Procedure Steps (PS3.4 F)
# ============================================================================================

#: The Performed Procedure Step Status values an MPPS may carry (PS3.3 C.4.14): it is created
#: IN PROGRESS and set once to one of the others.
PERFORMED_STEP_STATUSES = ("IN PROGRESS", "COMPLETED", "DISCONTINUED")
_DA_VALUE = re.compile(r"^\d{8}$")
_TM_VALUE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


class WorklistError(ValueError):
    """A worklist entry or an MPPS that cannot be taken; status is the DICOM status (MPPS), the
    text a reason fit for the client."""

    def __init__(self, message: str, status: int = INVALID_ATTRIBUTE_VALUE):
        super().__init__(message)
        self.status = status


def _refuse_bulk_data(*_):
    raise WorklistError("BulkDataURI values are not accepted in a worklist entry")


def dataset_from_json(document) -> Dataset:
    """A data set from DICOM JSON (PS3.18 F.2), every value checked against its VR; raises
    WorklistError with the reason when it cannot be one."""
    if not isinstance(document, dict):
        raise WorklistError("expected a DICOM JSON object (tag -> {vr, Value})")
    try:
        dataset = Dataset.from_json(document, bulk_data_uri_handler=_refuse_bulk_data)
        _check_vrs(dataset)
        # every value is written once, as a modality will be sent it (None: one cannot be)
        encoded = pynetdicom_encode(dataset, False, True)
    except WorklistError:
        raise
    except Exception as error:
        raise WorklistError(f"not valid DICOM JSON: {str(error)[:200]}") from None
    if encoded is None:
        raise WorklistError("not valid DICOM JSON: a value cannot be encoded in its VR")
    return dataset


def _check_vrs(dataset: Dataset):
    """Raise WorklistError for an element whose VR is not its tag's (a public tag's VR is fixed)."""
    for element in dataset:
        if element.tag.is_private:
            continue
        try:
            allowed = dictionary_VR(element.tag).split(" or ")
        except KeyError:
            raise WorklistError(f"not valid DICOM JSON: unknown tag {element.tag}") from None
        if element.VR not in allowed:
            raise WorklistError(f"not valid DICOM JSON: {element.keyword or element.tag} has VR {element.VR[:4]!r},"
                                f" not {dictionary_VR(element.tag)}")
        if element.VR == "SQ":
            for item in element.value:
                _check_vrs(item)


def _worklist_response(identifier: Dataset, stored: Dataset) -> Dataset:
    """What a worklist C-FIND returns of a matching entry: each key of the identifier, with the
    entry's value or empty (PS3.4 C.2.2.1.2); in a sequence key, the stored items that match the
    query item, each with the item's keys (all of the item when the query item is empty)."""
    response = Dataset()
    for element in identifier:
        if element.tag == 0x00080005 or element.tag.element == 0x0000:
            continue
        if element.tag not in stored:
            response.add_new(element.tag, element.VR, [] if element.VR == "SQ" else None)
            continue
        value = stored[element.tag]
        if element.VR != "SQ" or value.VR != "SQ":
            response.add(copy.deepcopy(value))
            continue
        query_item = element.value[0] if element.value else Dataset()
        query_keys = identifier_key_list(query_item)
        items = []
        for item in value.value:
            meta = extract_metadata(item)[0]
            if all(match_value(key.vr, key.value, meta.get(key.keyword)) for key in query_keys):
                items.append(_worklist_response(query_item, item) if len(query_item) else copy.deepcopy(item))
        response.add_new(element.tag, "SQ", items)
    return response


class Worklist:
    """The Modality Worklist and the MPPS that report on it, over the index's worklist tables.

    An entry is one Scheduled Procedure Step (as a RIS sends it: patient, requested procedure,
    ScheduledProcedureStepSequence with station AE, date, modality); its state follows the MPPS
    its modality creates and sets."""

    def __init__(self, index: Index):
        self.index = index
        self.log = logging.getLogger("dicoogled.worklist")

    # ---- entries -----------------------------------------------------------------------------

    def add(self, document: dict) -> int:
        """Add an entry from DICOM JSON; fill what a RIS may leave out (StudyInstanceUID,
        AccessionNumber, RequestedProcedureID, the step's ID, start date and time); its id.
        Raises WorklistError with the reason for an entry that cannot be scheduled."""
        dataset = dataset_from_json(document)
        for keyword in ("PatientID", "PatientName"):
            if not str(dataset.get(keyword, "") or "").strip():
                raise WorklistError(f"{keyword} is required")
        steps = dataset.get("ScheduledProcedureStepSequence")
        if steps is None or len(steps) == 0:
            dataset.ScheduledProcedureStepSequence = [Dataset()]
            steps = dataset.ScheduledProcedureStepSequence
        if len(steps) != 1:
            raise WorklistError("ScheduledProcedureStepSequence must hold one item: one entry per scheduled step")
        step = steps[0]
        now = datetime.datetime.now()
        step.ScheduledProcedureStepStartDate = step.get("ScheduledProcedureStepStartDate") or now.strftime("%Y%m%d")
        step.ScheduledProcedureStepStartTime = step.get("ScheduledProcedureStepStartTime") or now.strftime("%H%M%S")
        if not _DA_VALUE.match(str(step.ScheduledProcedureStepStartDate)):
            raise WorklistError(f"ScheduledProcedureStepStartDate {str(step.ScheduledProcedureStepStartDate)[:20]!r} is not YYYYMMDD")
        if not _TM_VALUE.match(str(step.ScheduledProcedureStepStartTime)):
            raise WorklistError(f"ScheduledProcedureStepStartTime {str(step.ScheduledProcedureStepStartTime)[:20]!r} is not HHMMSS")
        if not dataset.get("StudyInstanceUID"):
            dataset.StudyInstanceUID = pydicom.uid.generate_uid()
        elif not is_valid_uid(str(dataset.StudyInstanceUID)):
            raise WorklistError(f"StudyInstanceUID {str(dataset.StudyInstanceUID)[:70]!r} is not a valid UID")
        serial = secrets.token_hex(4).upper()  # SH: 16 characters at most
        if not dataset.get("AccessionNumber"):
            dataset.AccessionNumber = "A" + serial
        if not dataset.get("RequestedProcedureID"):
            dataset.RequestedProcedureID = "RP" + serial
        if not step.get("ScheduledProcedureStepID"):
            step.ScheduledProcedureStepID = "SPS" + serial
        entry_id = self.index.write(Index.add_worklist_entry, str(dataset.StudyInstanceUID), str(dataset.AccessionNumber),
                                    str(step.ScheduledProcedureStepID), dataset.to_json_dict())
        self.log.info("worklist entry %d scheduled: study %s, station %s", entry_id, dataset.StudyInstanceUID,
                      step.get("ScheduledStationAETitle", "") or "any")
        return entry_id

    def entries(self) -> list[WorklistEntry]:
        return self.index.worklist()

    def delete(self, entry_id: int) -> bool:
        """Remove an entry; False if there was none."""
        deleted = self.index.write(Index.delete_worklist_entry, entry_id)
        if deleted:
            self.log.info("worklist entry %d deleted", entry_id)
        return deleted

    # ---- Modality Worklist C-FIND (PS3.4 K.4.1.3) -----------------------------------------------

    def find(self, identifier: Dataset):
        """The entries an MWL identifier matches, as response data sets with its keys: matching
        on every key, those in ScheduledProcedureStepSequence within one item (PS3.4 C.2.2.2.6),
        dates by range, names by wildcard, case- and accent-insensitively."""
        keys = identifier_key_list(identifier)
        for entry in self.index.worklist():
            if entry.state != "SCHEDULED":
                continue  # a step begun or done is no longer work to do
            stored = Dataset.from_json(entry.dataset)
            meta = extract_metadata(stored)[0]
            if all(match_value(key.vr, key.value, meta.get(key.keyword)) for key in keys):
                response = _worklist_response(identifier, stored)
                if not json.dumps(entry.dataset).isascii():
                    response.SpecificCharacterSet = "ISO_IR 192"
                yield response

    # ---- Modality Performed Procedure Step N-CREATE and N-SET (PS3.4 F.7.2) ----------------------

    def _performed_entry(self, attributes: Dataset) -> int | None:
        """The worklist entry an MPPS performs: by its Scheduled Step Attributes (study, and
        the step's ID or the accession number when several steps share the study)."""
        for scheduled in attributes.get("ScheduledStepAttributesSequence") or []:
            candidates = self.index.worklist_entries_of(str(scheduled.get("StudyInstanceUID", "") or ""))
            step_id = str(scheduled.get("ScheduledProcedureStepID", "") or "")
            accession = str(scheduled.get("AccessionNumber", "") or "")
            for entry in candidates:
                if (not step_id or entry.scheduled_procedure_step_id == step_id) and \
                        (not accession or entry.accession_number == accession):
                    return entry.id
            if len(candidates) == 1:
                return candidates[0].id
        return None

    def create_performed_step(self, sop_instance_uid: str, attributes: Dataset) -> int:
        """N-CREATE: record a performed procedure step, IN PROGRESS; the status to answer."""
        status = str(attributes.get("PerformedProcedureStepStatus", "") or "")
        if status != "IN PROGRESS":
            return DicomStatus(INVALID_ATTRIBUTE_VALUE, f"PerformedProcedureStepStatus must be IN PROGRESS, not {status[:20]!r}")
        if not is_valid_uid(sop_instance_uid):
            return DicomStatus(INVALID_ATTRIBUTE_VALUE, "the Affected SOP Instance UID is not a valid UID")
        if "ScheduledStepAttributesSequence" not in attributes:  # type 1 for N-CREATE (PS3.4 F.7.2.1)
            return DicomStatus(MISSING_ATTRIBUTE, "ScheduledStepAttributesSequence is required")
        entry_id = self._performed_entry(attributes)
        created = self.index.write(Index.create_performed_step, sop_instance_uid, entry_id, status, attributes.to_json_dict())
        if not created:
            return DicomStatus(DUPLICATE_SOP_INSTANCE, "this performed procedure step exists already")
        self.log.info("MPPS %s in progress (worklist entry %s)", sop_instance_uid, entry_id if entry_id is not None else "none")
        return SUCCESS

    def set_performed_step(self, sop_instance_uid: str, modification: Dataset) -> int:
        """N-SET: change a performed step's attributes, and maybe its status, until it is
        COMPLETED or DISCONTINUED (then it is final, PS3.4 F.7.2.2.2); the status to answer."""
        step = self.index.performed_step(sop_instance_uid)
        if step is None:
            return DicomStatus(NO_SUCH_OBJECT_INSTANCE, "no such performed procedure step")
        if step.status != "IN PROGRESS":
            return DicomStatus(PROCESSING_FAILURE, f"the performed procedure step is {step.status} already")
        status = str(modification.get("PerformedProcedureStepStatus", step.status) or step.status)
        if status not in PERFORMED_STEP_STATUSES:
            return DicomStatus(INVALID_ATTRIBUTE_VALUE, f"PerformedProcedureStepStatus {status[:20]!r} is not one of"
                                                        f" {', '.join(PERFORMED_STEP_STATUSES)}")
        stored = Dataset.from_json(step.dataset)
        for element in modification:
            stored[element.tag] = copy.deepcopy(element)
        self.index.write(Index.update_performed_step, sop_instance_uid, status, stored.to_json_dict())
        self.log.info("MPPS %s %s", sop_instance_uid, status)
        return SUCCESS


# ============================================================================================
# Search language: Dicoogle's Lucene-style queries, parsed, and the rules their fields match by
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
MAX_SEARCH_DEPTH = 100
#: The most terms (and NOT, + and - clauses) one query may hold: far above what a person writes,
#: and a bound on what a hostile query costs the index (PostgreSQL answers each term of a free-text
#: or field query with a condition of its own; thousands took it minutes).
MAX_SEARCH_TERMS = 128


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

    The field label (label:neuro, label:neuro*, label:(a OR b)) matches the instances whose
    study or series carries a label, compared case-insensitively, * and ? as wildcards.

    The tree is made of tuples: ("and", [..]), ("or", [..]), ("not", q), ("all",),
    ("text", word or phrase, is_phrase), ("field", keyword, ("match", text) | ("uid", text) | ("range", ...)),
    ("label", pattern).
    """

    def __init__(self, text: str, extra_fields=frozenset()):
        self.text = text
        self.extra_fields = extra_fields  # field names index plugins add, beside DICOM keywords
        if not text.strip():
            raise SearchSyntaxError("empty query", 0)
        if len(text) > 10_000:
            raise SearchSyntaxError("query longer than 10000 characters", 10_000)
        self.tokens = _tokenize_search(text)
        self.index = 0
        self.depth = 0
        self.terms = 0
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
        # Every nesting (parentheses, NOT, + and -) passes here: bound it before Python's stack
        # or SQLite's expression depth is.
        self.depth += 1
        self.terms += 1
        try:
            if self.depth > MAX_SEARCH_DEPTH:
                raise SearchSyntaxError(f"query nested more than {MAX_SEARCH_DEPTH} levels deep", self._peek()[2])
            if self.terms > MAX_SEARCH_TERMS:
                raise SearchSyntaxError(f"query of more than {MAX_SEARCH_TERMS} terms", self._peek()[2])
            return self._unary_clause()
        finally:
            self.depth -= 1

    def _unary_clause(self):
        kind, value, position, _ = self._peek()
        if kind == "word" and value in ("NOT", "!"):
            self.index += 1
            return ("not", self._unary())
        following = self.tokens[self.index + 1] if self.index + 1 < len(self.tokens) else None
        if kind == "word" and value in ("+", "-") and following and following[0] in ("open", "phrase") and following[2] == position + 1:
            # -(a OR b) and -"a phrase": the prefix stands alone before a group or a phrase.
            self.index += 1
            group = self._unary()
            return ("not", group) if value == "-" else group
        if kind == "word" and value[0] in "+-!" and len(value) > 1:
            # Lucene's required (+) and prohibited (- and !) prefixes.
            self.tokens[self.index] = ("word", value[1:], position + 1, None)
            atom = self._unary()
            return atom if value[0] == "+" else ("not", atom)
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
        if name == LABEL_FIELD:
            return self._label(value_position)
        keyword = _search_field(name, position, self.extra_fields)
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
            return ("field", keyword, _value_clause(keyword, _unescape(value[1:-1])))
        if kind == "word" and value[0] in "[{":
            raise SearchSyntaxError(f"{name}: a range is [a TO b] or {{a TO b}}", value_position)
        if kind == "word":
            return ("field", keyword, _value_clause(keyword, _unescape(value)))
        if kind == "open":
            # Field:(a OR b c) applies the field to every term inside.
            self.index -= 1
            group = self._atom()
            return _apply_field(keyword, group, value_position)
        raise SearchSyntaxError(f"{name}: unexpected {value!r}", value_position)


    def _label(self, position: int):
        """label:NAME, label:"NAME", label:NAME* or label:(a OR b)."""
        kind, value, _, _ = self._peek()
        if kind == "open":
            return _apply_field(LABEL_FIELD, self._atom(), position)
        if kind not in ("word", "phrase"):
            raise SearchSyntaxError("label: needs a label", position)
        self.index += 1
        return _label_clause(_unescape(value[1:-1] if kind == "phrase" else value), position)


#: The search field of labels (label:neuro); not a DICOM keyword, so it cannot shadow one.
LABEL_FIELD = "label"
_LABEL_WILDCARD_PATTERN = re.compile(r"[a-z0-9._*?-]{1,64}")


def _label_clause(text: str, position: int) -> tuple:
    """A label: clause; wildcards * and ? as in labels' GLOB, every other character a label's."""
    pattern = text.strip().lower()
    if not _LABEL_WILDCARD_PATTERN.fullmatch(pattern):
        raise SearchSyntaxError(f"label:{text[:80]!r} is not a label (a-z, 0-9, '.', '_', '-', wildcards * and ?)", position)
    return ("label", pattern)


def _search_field(name: str, position: int, extra_fields=frozenset()) -> str:
    """A field name as the index knows it: a DICOM keyword, an 8-hex tag, Seq_Child, uri, or a
    field an index plugin adds."""
    if name in ("uri", "others") or name in extra_fields:
        return name
    for part in name.split("_"):
        if not part or not (tag_for_keyword(part) is not None or re.fullmatch(r"[0-9A-Fa-f]{8}", part)):
            raise SearchSyntaxError(f"unknown field {name!r} (fields are DICOM keywords such as PatientName)", position)
    def canonical(part):  # a standard tag given by number goes by its keyword, as the index keeps it
        if re.fullmatch(r"[0-9A-Fa-f]{8}", part):
            return keyword_for_tag(int(part, 16)) or part.upper()
        return part
    return "_".join(canonical(p) for p in name.split("_"))


def _is_uid_field(keyword: str) -> bool:
    """Is the field a UID (VR UI)? Seq_Child names its child."""
    tag = tag_for_keyword(keyword.split("_")[-1])
    return tag is not None and dictionary_VR(tag) == "UI"


def _value_clause(keyword: str, text: str) -> tuple:
    """A field's value clause. A UID is one token, not words: it matches whole, or as a prefix
    with a trailing * (Dicoogle indexes UIDs untokenised), never by the numbers between its dots."""
    return ("uid", text.strip()) if _is_uid_field(keyword) else ("match", text)


def _apply_field(keyword: str, node, position: int):
    if node[0] == "text":
        if keyword == LABEL_FIELD:
            return _label_clause(node[1], position)
        return ("field", keyword, _value_clause(keyword, node[1]))
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
    if node[0] == "uid":  # the whole value, exactly, * and ? as wildcards
        whole = _wildcard_regex(node[1], fold=False)
        return lambda value: bool(whole.fullmatch(value.strip()))
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
    A UID (a "uid" clause) matches the whole value exactly, '*' and '?' as wildcards.
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


def field_text(meta: dict, keyword: str) -> str | None:
    """An indexed element's value as one text (several values joined by backslashes); None for
    a sequence or binary value."""
    value = meta.get(keyword)
    if isinstance(value, list):
        return "\\".join(v for v in value if isinstance(v, str)) if value and isinstance(value[0], str) else None
    return value


#: What /searchDIM groups by: a provider's result lacking one is completed from the index.
DIM_FIELDS = ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID")


def complete_from_index(index: Index, results: list) -> list:
    """A query provider's (uri, fields) with what it left out taken from the index, found by
    SOPInstanceUID: a provider may answer with a SOPInstanceUID alone and still group in
    /searchDIM. The provider's own fields win."""
    lacking = [fields["SOPInstanceUID"] for _, fields in results
               if fields.get("SOPInstanceUID") and not all(fields.get(name) for name in DIM_FIELDS)]
    known = index.metadata_by_uid(lacking) if lacking else {}
    def completed(fields):
        indexed = known.get(fields.get("SOPInstanceUID"))
        return {**indexed, **{k: v for k, v in fields.items() if v not in ("", None)}} if indexed else fields
    return [(uri, completed(fields)) for uri, fields in results]


def group_dim(results, with_birthdate: bool) -> list[dict]:
    """Dicoogle's DIM tree: patient (by PatientID, else name) → study → series → images."""
    patients: dict[str, dict] = {}
    studies: dict[tuple, dict] = {}
    series_map: dict[tuple, dict] = {}
    for uri, meta in results:
        text = functools.partial(field_text, meta)
        patient_key = text("PatientID") or text("PatientName") or ""
        patient = patients.get(patient_key)
        if patient is None:
            patient = patients[patient_key] = {
                "id": text("PatientID") or "", "name": text("PatientName") or "", "gender": text("PatientSex") or "",
                "nStudies": 0, "birthdate": (text("PatientBirthDate") or "") if with_birthdate else "", "studies": [],
            }
        study_key = (patient_key, text("StudyInstanceUID") or "")
        study = studies.get(study_key)
        if study is None:
            study = studies[study_key] = {
                "studyInstanceUID": study_key[1], "studyDate": text("StudyDate") or "",
                "studyDescription": text("StudyDescription") or "", "institutionName": text("InstitutionName") or "",
                "modalities": "", "series": [],
            }
            patient["studies"].append(study)
            patient["nStudies"] += 1
        series_key = study_key + (text("SeriesInstanceUID") or "",)
        series = series_map.get(series_key)
        if series is None:
            number = text("SeriesNumber") or ""
            series = series_map[series_key] = {
                "serieNumber": int(number) if number.lstrip("-").isdigit() else 0,
                "serieInstanceUID": series_key[2], "serieDescription": text("SeriesDescription") or "",
                "serieModality": text("Modality") or "", "images": [],
            }
            study["series"].append(series)
            modalities = [m for m in study["modalities"].split(",") if m]
            if series["serieModality"] and series["serieModality"] not in modalities:
                study["modalities"] = ",".join(modalities + [series["serieModality"]])
        path = urllib.parse.unquote(urllib.parse.urlparse(uri).path)
        image = {"sopInstanceUID": text("SOPInstanceUID") or "", "rawPath": path, "uri": uri, "filename": os.path.basename(path)}
        number = text("InstanceNumber") or ""
        if number.lstrip("-").isdigit():
            image["number"] = int(number)
        series["images"].append(image)
    return list(patients.values())


# ============================================================================================
# Rendering: DICOM frames to PNG
# ============================================================================================

# What decodes pixels here runs in the codec worker (next section), never in the daemon itself:
# numpy, Pillow and pydicom.pixels are imported inside these functions. Compressed transfer
# syntaxes decode through pydicom's plugins (pylibjpeg with libjpeg, openjpeg and rle; pyjpegls);
# RLE and deflate also decode natively. Reading a header (frame_count, frame_rate) needs none.

#: Photometric interpretations shown in grey, and in colour. pydicom hands YBR_FULL and
#: YBR_FULL_422 (and JPEG 2000's YBR_ICT and YBR_RCT) back as RGB; a palette goes through its LUT.
GREY_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: Values larger than this stay on disk while a header is read: the pixel data, mostly.
RENDER_DEFER_SIZE = "256 KB"
#: The transfer syntax of a file without meta information, from the encoding pydicom found.
_SYNTAX_OF_ENCODING = {
    (True, True): pydicom.uid.ImplicitVRLittleEndian,
    (False, True): pydicom.uid.ExplicitVRLittleEndian,
    (False, False): pydicom.uid.ExplicitVRBigEndian,
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class UnrenderableError(ValueError):
    """An instance with no image to show: no pixel data, a transfer syntax or photometric
    interpretation we cannot handle, a codec that is not installed, or pixels that fail to decode."""


class FrameOutOfRange(ValueError):
    """A frame number the instance does not have."""


def read_image_header(source) -> Dataset:
    """An instance (a path or a binary file) read for rendering; on disk, its pixel data stays unread."""
    on_disk = isinstance(source, (str, os.PathLike))
    try:
        header = pydicom.dcmread(source, defer_size=RENDER_DEFER_SIZE if on_disk else None, force=True)
        if on_disk and header.file_meta.get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian:
            # A deferred value is read again from the file later, which cannot work inside a
            # deflated stream: read it whole.
            header = pydicom.dcmread(source, force=True)
    except Exception as error:
        raise UnrenderableError(f"unreadable DICOM: {error}") from None
    return header


def frame_count(header: Dataset) -> int:
    """How many frames an instance has: 0 without pixel data."""
    if not any(keyword in header for keyword in PIXEL_DATA_KEYWORDS):
        return 0
    try:
        return max(int(header.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


def frame_rate(header: Dataset) -> float:
    """Frames per second to play an instance at: its recommended or cine rate, else 1000 / FrameTime; 0 if none."""
    try:
        for keyword in ("RecommendedDisplayFrameRateInFloat", "RecommendedDisplayFrameRate", "CineRate"):
            if header.get(keyword):
                return float(header.get(keyword))
        if header.get("FrameTime"):
            return round(1000 / float(header.FrameTime), 3)
    except (TypeError, ValueError, ZeroDivisionError):
        pass
    return 0.0


def render_image(source, frame: int = 0, window: tuple[float, float] | None = None):
    """One frame of an instance (a path or a binary file) as a viewer first shows it: a numpy array of
    8-bit grey (rows, columns) or RGB (rows, columns, 3) pixels.

    Grey frames go through the modality LUT (RescaleSlope/Intercept), then `window` (center, width)
    if given, else the file's first VOI LUT or window, else the frame's full range; MONOCHROME1 is
    inverted. Raises UnrenderableError, or FrameOutOfRange.
    """
    from pydicom.pixels import get_decoder, pixel_array

    header = read_image_header(source)
    frames = frame_count(header)
    if not frames:
        raise UnrenderableError("it has no pixel data")
    photometric = str(header.get("PhotometricInterpretation", "")).strip()
    if photometric not in GREY_PHOTOMETRICS + COLOUR_PHOTOMETRICS:
        raise UnrenderableError(f"photometric interpretation {photometric or '(none)'} is not supported")
    syntax = header.file_meta.get("TransferSyntaxUID")
    in_file_format = syntax is not None
    if not in_file_format:  # an old file indexed in place, without meta information
        syntax = header.file_meta.TransferSyntaxUID = _SYNTAX_OF_ENCODING.get(header.original_encoding)
        if syntax is None:
            raise UnrenderableError("its transfer syntax is unknown")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise UnrenderableError(f"there is no decoder for {syntax.name}") from None
    if not decoder.is_available:
        raise UnrenderableError(f"no codec for {syntax.name} is installed (one of: "
                                f"{'; '.join(decoder.missing_dependencies)})")
    if frame >= frames:
        raise FrameOutOfRange(f"frame {frame} does not exist: the instance has {frames} frame(s), counted from 0")
    # Given the path of a Part 10 file, pixel_array reads and decodes only the frame asked for, so a
    # large multi-frame file costs one frame of memory; otherwise it decodes from the data set.
    from_file = isinstance(source, (str, os.PathLike)) and in_file_format and not syntax.is_deflated
    try:
        pixels = pixel_array(source if from_file else header, index=frame)
        if photometric in GREY_PHOTOMETRICS:
            return _grey_to_8bit(pixels, header, window)
        return _colour_to_8bit(pixels, header)
    except Exception as error:  # a damaged or unusual file: the client is told why, not a 500
        raise UnrenderableError(f"frame {frame} cannot be decoded: {error}") from error


def _grey_to_8bit(pixels, header: Dataset, window: tuple[float, float] | None):
    import numpy as np
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    values = apply_modality_lut(pixels, header).astype(np.float64)
    black = white = None  # the values shown as 0 and as 255
    voi_lut = header.get("VOILUTSequence")
    if window is not None:
        center, width = window
        black, white = center - width / 2, center + width / 2
    elif voi_lut and "LUTData" in voi_lut[0] and "LUTDescriptor" in voi_lut[0]:
        # A VOI LUT maps values to its own entries; its lowest and highest entries are black and white.
        entries, first_mapped = voi_lut[0].LUTDescriptor[0] or 65536, voi_lut[0].LUTDescriptor[1]
        lut = apply_voi(np.arange(first_mapped, first_mapped + entries), header)
        black, white = lut.min(), lut.max()
        values = apply_voi(np.rint(values).astype(np.int64), header)
    elif "WindowCenter" in header and "WindowWidth" in header:
        # apply_windowing maps onto a range that depends on BitsStored and the rescale: its two
        # ends are where the most extreme values land. Index 0: the first of several windows.
        try:
            black, white = apply_windowing(np.array([-np.inf, np.inf]), header)
            values = apply_windowing(values, header)
        except ValueError:  # a width below 1, an unknown VOI function: show the full range instead
            black = white = None
    if black is None:
        black, white = values.min(), values.max()
    if white <= black:  # one flat value
        image = np.zeros(values.shape, np.uint8)
    else:
        image = np.clip(np.rint((values - black) * (255 / (white - black))), 0, 255).astype(np.uint8)
    return 255 - image if header.PhotometricInterpretation == "MONOCHROME1" else image


def _colour_to_8bit(pixels, header: Dataset):
    import numpy as np
    from pydicom.pixels import apply_color_lut

    if header.PhotometricInterpretation == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, header)
        depth = pixels.dtype.itemsize * 8  # the palette's entries: 8 or 16 bits
    else:
        depth = int(header.get("BitsStored") or pixels.dtype.itemsize * 8)
    return (pixels >> max(depth - 8, 0)).astype(np.uint8)


def shrink(image, edge: int):
    """An 8-bit image scaled down (never up) so that its longer side is at most edge pixels.

    Each output pixel is the mean of the source pixels it covers (a box filter), so fine detail
    averages out rather than aliasing as it would by picking every n-th pixel.
    """
    import numpy as np

    rows, columns = image.shape[:2]
    scale = edge / max(rows, columns)
    if scale >= 1:
        return image
    out_rows, out_columns = max(1, round(rows * scale)), max(1, round(columns * scale))
    row_starts = np.arange(out_rows) * rows // out_rows
    column_starts = np.arange(out_columns) * columns // out_columns
    sums = np.add.reduceat(np.add.reduceat(image.astype(np.uint32), row_starts, axis=0), column_starts, axis=1)
    counts = np.outer(np.diff(row_starts, append=rows), np.diff(column_starts, append=columns))
    if image.ndim == 3:
        counts = counts[:, :, np.newaxis]
    return ((sums + counts // 2) // counts).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image, text: str = "") -> bytes:
    """8-bit grey (rows, columns) or RGB (rows, columns, 3) pixels as a PNG file, made with zlib.

    A text, if given, is kept in a tEXt chunk right after the header (the thumbnail cache's key).
    """
    import numpy as np

    rows, columns = image.shape[:2]
    colour_type = 2 if image.ndim == 3 else 0  # truecolour, or greyscale
    # Each scanline starts with its filter type: 0, none.
    scanlines = np.zeros((rows, 1 + image[0].size), np.uint8)
    scanlines[:, 1:] = image.reshape(rows, -1)
    png = PNG_SIGNATURE + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", columns, rows, 8, colour_type, 0, 0, 0))
    if text:
        png += _png_chunk(b"tEXt", b"dicoogled\0" + text.encode("latin-1"))
    return png + _png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6)) + _png_chunk(b"IEND", b"")


def render_frame(source, frame: int = 0, size: int | None = None, window: tuple[float, float] | None = None,
                 media_type: str = "image/png", quality: int = 90, text: str = "") -> bytes:
    """One frame as a viewer first shows it (render_image), at most size pixels on its longer side,
    as PNG (text, if given, in a tEXt chunk: the thumbnail cache's key) or JPEG (made by Pillow).
    Raises UnrenderableError, or FrameOutOfRange."""
    if media_type not in ("image/png", "image/jpeg"):
        raise UnrenderableError(f"{media_type} is not an image type we make: image/png or image/jpeg")
    image = render_image(source, frame, tuple(window) if window else None)
    if size:
        image = shrink(image, size)
    if media_type == "image/png":
        return encode_png(image, text)
    try:
        from PIL import Image
    except ImportError:
        raise UnrenderableError("JPEG needs Pillow, which is not installed; ask for image/png") from None
    output = io.BytesIO()
    Image.fromarray(image).save(output, "JPEG", quality=quality)
    return output.getvalue()


def decode_frame(source, frame: int = 0) -> bytes:
    """One frame's pixels (frame from 0), decoded: the bytes Explicit VR Little Endian holds them as.
    Raises UnrenderableError."""
    from pydicom.pixels import pixel_array

    try:
        pixels = pixel_array(source, index=frame)
    except Exception as error:
        raise UnrenderableError(f"frame {frame} cannot be decoded: {error}") from error
    return pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()


def uncompressed_instance(source) -> bytes:
    """An instance as a Part 10 file in Explicit VR Little Endian, its pixel data decoded if it was
    compressed. Raises UnrenderableError."""
    return transcoded_instance(source, pydicom.uid.ExplicitVRLittleEndian)


def transcoded_instance(source, transfer_syntax: str) -> bytes:
    """An instance as a Part 10 file in transfer_syntax: Explicit VR Little Endian (its pixel data
    decoded if it was compressed) or one of LOSSLESS_ENCODINGS (decoded, then encoded by pydicom's
    RLE encoder, pyjpegls or pylibjpeg-openjpeg). The SOP Instance UID stays: the same instance in
    another transfer syntax (PS3.5 10), which pydicom would otherwise replace. Raises UnrenderableError."""
    if transfer_syntax != pydicom.uid.ExplicitVRLittleEndian and transfer_syntax not in LOSSLESS_ENCODINGS:
        raise UnrenderableError(f"{transfer_syntax} is not a transfer syntax we encode to")
    try:
        dataset = pydicom.dcmread(source, force=True)
        syntax = dataset.file_meta.get("TransferSyntaxUID") or _SYNTAX_OF_ENCODING.get(dataset.original_encoding)
        if syntax is not None and pydicom.uid.UID(syntax).is_compressed:
            dataset.decompress(generate_instance_uid=False)
        else:
            dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        if transfer_syntax in LOSSLESS_ENCODINGS:
            dataset.compress(transfer_syntax, generate_instance_uid=False)
        output = io.BytesIO()
        dataset.save_as(output, enforce_file_format=True)
    except Exception as error:
        verb = "decoded" if transfer_syntax == pydicom.uid.ExplicitVRLittleEndian else f"encoded in {transfer_syntax}"
        raise UnrenderableError(f"it cannot be {verb}: {error}") from error
    return output.getvalue()


def instance_stamp(location: str, size: int, mtime_ns: int) -> str | None:
    """What identifies the present version of an instance, for caches of what is made from it:
    the size and modification time of its file as it is now (it may have changed since it was
    indexed), or as indexed when a storage plugin keeps it. None if its file is gone."""
    if location_scheme(location) == "file":
        try:
            status = os.stat(location)
        except OSError:
            return None
        size, mtime_ns = status.st_size, status.st_mtime_ns
    return f"{size} {mtime_ns}"


class InstanceCache:
    """Files made from an instance, each with the key it was made for, kept as
    data_dir/cache/<kind>/<SOPInstanceUID><suffix>: what is slow to make (a decode, a parse) is
    made once. The key (the size and modification time of the DICOM file, and whatever else
    shapes the result) changes with the file, so a stale file is made again and replaced.

    This base keeps the key on a first line of its own; a subclass may keep it elsewhere.
    """

    def __init__(self, root: pathlib.Path, suffix: str):
        self.root, self.suffix = root, suffix

    def _path(self, sop_instance_uid: str) -> pathlib.Path:
        return self.root / f"{sop_instance_uid}{self.suffix}"

    def get(self, sop_instance_uid: str, key: str) -> bytes | None:
        try:
            kept = self._path(sop_instance_uid).read_bytes()
        except OSError:
            return None
        stamp, _, data = kept.partition(b"\n")
        return data if stamp == key.encode("utf-8") else None

    def put(self, sop_instance_uid: str, key: str, data: bytes):
        self._write(sop_instance_uid, key.encode("utf-8") + b"\n" + data)

    def _write(self, sop_instance_uid: str, data: bytes):
        """Readers see the old file or the new, never half of one."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{sop_instance_uid}-", suffix=".tmp", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp_name, self._path(sop_instance_uid))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise

    def purge(self, is_indexed) -> int:
        """Delete what was made from instances no longer indexed: patient data stays on disk no
        longer than the instances it comes from."""
        removed = 0
        for path in self.root.glob(f"*{self.suffix}") if self.root.is_dir() else ():
            if not is_indexed(path.name.removesuffix(self.suffix)):
                path.unlink(missing_ok=True)
                removed += 1
        return removed


class ThumbnailCache(InstanceCache):
    """Thumbnails, so that a results page of 50 thumbnails costs 50 small file reads rather than
    50 decodes. Each PNG carries its key (with the thumbnail edge) in a tEXt chunk right after
    its header, so the cached file is a plain PNG."""

    #: Where the key's chunk starts: after the 8-byte signature and the 25-byte IHDR chunk.
    KEY_OFFSET = len(PNG_SIGNATURE) + 25

    def __init__(self, root: pathlib.Path):
        super().__init__(root, ".png")

    def get(self, sop_instance_uid: str, key: str) -> bytes | None:
        try:
            png = self._path(sop_instance_uid).read_bytes()
        except OSError:
            return None
        expected = _png_chunk(b"tEXt", b"dicoogled\0" + key.encode("latin-1"))
        return png if png[self.KEY_OFFSET:self.KEY_OFFSET + len(expected)] == expected else None

    def put(self, sop_instance_uid: str, key: str, png: bytes):
        """Keep a thumbnail made by encode_png(image, key): its key is in it already."""
        self._write(sop_instance_uid, png)


# ============================================================================================
# Codec worker: pixel work in a child process
# ============================================================================================

# Decoding pixels takes numpy, Pillow and C codecs: tens of MB the daemon would otherwise hold for
# good, and native code reading whatever a modality or a web client sent. So it runs in worker
# processes, started on first use and ended once idle: a codec that crashes or hangs on a hostile
# file fails the one request that asked, and the next request gets a fresh worker. Across the
# pipe go a path (or the bytes of an object a storage plugin keeps), parameters as JSON, and the
# encoded result: never arrays, never pickles.

#: What a worker can be asked to do: name -> function(source, **parameters) -> bytes.
CODEC_CALLS = {"render": render_frame, "pixels": decode_frame, "uncompressed": uncompressed_instance,
               "transcoded": transcoded_instance}
#: The errors a worker answers by name, raised again in the daemon.
CODEC_ERRORS = {"unrenderable": UnrenderableError, "frame": FrameOutOfRange}
#: A worker's program: dicoogled imported as a module (so numpy and the codecs load) from the
#: folder of this file, then its loop. Its command line names this file and the log level.
#: How long a new worker may take to load Python, numpy and the codecs and say it is ready.
CODEC_WORKER_START_SECONDS = 60
_CODEC_WORKER_PROGRAM = ("import os, sys; sys.path.insert(0, os.path.dirname(sys.argv[1])); import dicoogled;"
                         " dicoogled.codec_worker_main(sys.argv[2])")


class CodecWorkerError(RuntimeError):
    """A codec worker crashed, was killed or could not start: the request it served fails, and the
    next one starts a fresh worker."""


class CodecTimeout(CodecWorkerError):
    """A codec worker took longer than [codecs] timeout: it was ended, and its request fails."""


def _write_message(stream, header: dict, data: bytes = b""):
    """One message on a worker's pipes: the lengths of a JSON header and of the data, then both."""
    text = json.dumps(header).encode()
    stream.write(struct.pack(">IQ", len(text), len(data)) + text)
    stream.write(data)
    stream.flush()


def _read_message(stream) -> tuple[dict, bytes] | None:
    """A message written by _write_message; None at the end of the stream."""
    lengths = stream.read(12)
    if not lengths:
        return None
    if len(lengths) < 12:
        raise EOFError("a message cut short")
    header_length, data_length = struct.unpack(">IQ", lengths)
    header, data = stream.read(header_length), stream.read(data_length)
    if len(header) < header_length or len(data) < data_length:
        raise EOFError("a message cut short")
    return json.loads(header), data


def codec_worker_main(log_level: str = "INFO"):
    """A codec worker: answer the requests read from stdin on stdout, until stdin closes (the
    daemon ended the worker, or is gone)."""
    _configure_logging(log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal: the daemon ends its workers
    requests, answers = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a library prints, from C too, goes to the log rather than into the answers
    sys.stdout = sys.stderr
    # What every call needs loads before the worker says it is ready, so that a request's time
    # limit counts the decoding only, never Python's start on a busy machine.
    for module in ("numpy", "pydicom.pixels", "PIL.Image"):
        with contextlib.suppress(ImportError):  # a call that needs a missing one says so itself
            importlib.import_module(module)
    _write_message(answers, {"ready": True})
    while (request := _read_message(requests)) is not None:
        header, data = request
        try:
            source = header["path"] if "path" in header else io.BytesIO(data)
            answer, result = {}, CODEC_CALLS[header["call"]](source, **header["parameters"])
        except (UnrenderableError, FrameOutOfRange) as error:
            kind = "frame" if isinstance(error, FrameOutOfRange) else "unrenderable"
            answer, result = {"error": kind, "reason": str(error)}, b""
        except Exception as error:  # a bug rather than the file: logged here, told as unrenderable
            logging.getLogger("dicoogled.codec").exception("%s failed", header.get("call"))
            answer, result = {"error": "unrenderable", "reason": f"{type(error).__name__}: {error}"}, b""
        _write_message(answers, answer, result)


def _exit_text(returncode: int | None) -> str:
    """How a worker process ended, for the log and the client."""
    if returncode is None:
        return "it stopped answering"
    if returncode < 0:
        return f"killed by signal {-returncode} ({signal.Signals(-returncode).name})"
    return f"exit code {returncode}"


class _CodecProcess:
    """One worker process: started by its first request, ended idle_seconds after its last."""

    def __init__(self, idle_seconds: float, log_level: str, counts: collections.Counter):
        self.idle_seconds, self.log_level, self.counts = idle_seconds, log_level, counts
        self.process: subprocess.Popen | None = None
        #: A request is in the worker (for /health).
        self.busy = False
        self.closed = False
        self._lock = threading.Lock()  # one request at a time; the idle timer waits for it too
        self._idle_timer = None
        self.log = logging.getLogger("dicoogled.codec")

    def call(self, header: dict, data: bytes, timeout: float) -> tuple[dict, bytes]:
        """Send one request and wait for its answer: (header, bytes)."""
        with self._lock:
            self._idle_timer = None  # a timer firing now finds itself replaced, and leaves the worker be
            if self.closed:
                raise CodecWorkerError("the archive is stopping")
            if self.process is None or self.process.poll() is not None:  # never started, or gone while idle
                self._start()
            process = self.process
            self.busy = True
            try:
                _write_message(process.stdin, header, data)
                if not select.select([process.stdout], [], [], timeout)[0]:
                    self._end(kill=True)
                    self.counts["timed_out"] += 1
                    self.log.error("codec worker %d took more than %g s over a %s request: ended", process.pid,
                                   timeout, header["call"])
                    raise CodecTimeout(f"decoding took more than {timeout:g} s; the codec worker was ended")
                answer = _read_message(process.stdout)
                if answer is None:
                    raise EOFError("no answer")
                return answer
            except (OSError, EOFError, ValueError):  # a broken pipe, an answer cut short or garbled
                self._end(kill=True)
                self.counts["crashed"] += 1
                how = _exit_text(process.returncode)
                self.log.error("codec worker %d ended during a %s request: %s", process.pid, header["call"], how)
                raise CodecWorkerError(f"the codec worker ended while decoding ({how}); the next request starts a new one") from None
            finally:
                self.busy = False
                if self.process is not None:
                    self._arm_idle_timer()

    def close(self):
        """End the worker for good; one under way is killed (its request fails)."""
        self.closed = True
        process = self.process
        if process is not None and self.busy:
            process.kill()
        with self._lock:
            self._idle_timer = None
            self._end()

    def _start(self):
        self._end()  # reap one that died while idle
        command = [sys.executable, "-c", _CODEC_WORKER_PROGRAM, os.path.abspath(__file__), self.log_level]
        try:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        except OSError as error:
            raise CodecWorkerError(f"cannot start a codec worker: {error}") from None
        self.counts["started"] += 1
        # Its first message says it is ready; the request's own time limit starts after that.
        process = self.process
        ready = select.select([process.stdout], [], [], CODEC_WORKER_START_SECONDS)[0]
        try:
            message = _read_message(process.stdout) if ready else None
        except (OSError, EOFError, ValueError):
            message = None
        if message is None or not message[0].get("ready"):
            self._end(kill=True)
            self.counts["crashed"] += 1
            how = _exit_text(process.returncode) if ready else f"not ready within {CODEC_WORKER_START_SECONDS} s"
            self.log.error("codec worker %d could not start: %s", process.pid, how)
            raise CodecWorkerError(f"a codec worker could not start ({how})")
        self.log.info("codec worker %d started", self.process.pid)

    def _end(self, kill: bool = False):
        """End the worker: closing its stdin ends its loop; killed at once if kill, or if it lingers."""
        process, self.process = self.process, None
        if process is None:
            return
        if kill:
            process.kill()
        with contextlib.suppress(OSError):
            process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()

    def _arm_idle_timer(self):
        timer = self._idle_timer = threading.Timer(self.idle_seconds, self._end_if_idle)
        timer.daemon = True
        timer.start()

    def _end_if_idle(self):
        try:
            with self._lock:  # a request under way holds it, and arms a new timer when done
                if self._idle_timer is threading.current_thread() and self.process is not None:
                    pid = self.process.pid
                    self._end()
                    self.counts["ended_idle"] += 1
                    self.log.info("codec worker %d ended after %g s idle", pid, self.idle_seconds)
        except Exception:
            self.log.exception("cannot end an idle codec worker")


class CodecWorkers:
    """Pixel work done in worker processes, at most `workers` at once: codecs.call("render", path).

    A worker starts on first use and ends after idle_seconds without a request; one that crashes,
    is killed or takes longer than timeout seconds fails its request with CodecWorkerError (or
    CodecTimeout), and the next request starts a fresh one.
    """

    def __init__(self, workers: int = 1, idle_seconds: float = 60, timeout: float = 60, log_level: str = "INFO"):
        self.timeout = timeout
        #: Workers started, ended idle, crashed and timed out (for /health).
        self.counts = collections.Counter()
        self._workers = [_CodecProcess(idle_seconds, log_level, self.counts) for _ in range(workers)]
        self._free = queue.LifoQueue()  # the last one used first: it is warm, and the others may end idle
        for worker in self._workers:
            self._free.put(worker)

    def call(self, name: str, source, **parameters) -> bytes:
        """CODEC_CALLS[name](source, **parameters), run in a worker: its bytes.

        source is a path, or a binary file or bytes (an object a storage plugin keeps). Raises what
        the function raised (UnrenderableError, FrameOutOfRange), CodecWorkerError if the worker
        crashed or was killed, CodecTimeout if it took too long.
        """
        header = {"call": name, "parameters": parameters}
        if isinstance(source, (str, os.PathLike)):
            header["path"], data = os.fspath(source), b""
        else:
            data = source if isinstance(source, bytes) else source.read()
        worker = self._free.get()
        try:
            answer, result = worker.call(header, data, self.timeout)
        finally:
            self._free.put(worker)
        if "error" in answer:
            raise CODEC_ERRORS.get(answer["error"], UnrenderableError)(answer["reason"])
        return result

    def status(self) -> dict:
        """The running workers ({pid, busy}) and the counts, for /health."""
        running = [{"pid": process.pid, "busy": worker.busy}
                   for worker in self._workers if (process := worker.process) is not None]
        return {"running": running, **{key: self.counts[key] for key in ("started", "ended_idle", "crashed", "timed_out")}}

    def close(self):
        for worker in self._workers:
            worker.close()


# ============================================================================================
# Plugins: hook table, Python loader, Lua sandbox
# ============================================================================================

#: The index's own name among the query and index providers (the ones plugins add are theirs).
BUILTIN_PROVIDER = "index"
#: Other names scripts written for Dicoogle use for its default index.
BUILTIN_PROVIDER_ALIASES = ("lucene",)


@dataclasses.dataclass(frozen=True)
class HookSpec:
    """A hook a plugin may define. The one table of them (HOOK_SPECS) is what the Python loader
    looks for, the Lua bridge maps Orthanc's names to, new-plugin offers as kinds, and the table
    in docs/plugins.md lists (a test holds the two together)."""
    name: str
    kind: str  # notify, decision, index, query provider, web service, storage
    called_with: str  # the arguments, in words
    returns: str  # what the hook answers and what each answer means, or what a notify hook is told
    plugin_kind: str  # what `dicoogled new-plugin --kind` calls a plugin defining it (PLUGIN_KINDS)
    orthanc: str = ""  # Orthanc's Lua name for the same hook, accepted so its scripts port
    lua: bool = True  # storage is Python only: Lua has no io to keep objects with

    def doc_row(self) -> str:
        """Its row of the hook table in docs/plugins.md."""
        if self.kind == "storage":  # not a function: the functions it names
            return f"| `{self.name}` | {self.kind} | {self.called_with}: {self.returns} |"
        return f"| `{self.name}` | {self.kind} | ({self.called_with}) {'—' if self.kind == 'notify' else '→'} {self.returns} |"


#: Notify hooks run for every plugin, off the DICOM association's thread, and a failure is
#: logged and counted; decision hooks run in load order, each seeing the verdict of the one before.
HOOK_SPECS = (
    HookSpec("on_stored", "notify", "instance", "an object received over DICOM (C-STORE), STOW-RS or POST /import was stored and indexed",
             orthanc="OnStoredInstance", plugin_kind="events"),
    HookSpec("on_indexed", "notify", "instance",
             "an instance entered the index, whatever its origin (C-STORE, watched folder, index task)", plugin_kind="events"),
    HookSpec("on_stable_study", "notify", "study",
             "no new instance arrived in a study for `[plugins] stable_age` seconds (and again after a later one)",
             orthanc="OnStableStudy", plugin_kind="events"),
    HookSpec("incoming_store_filter", "decision", "calling_aet, tags",
             "`true`/`nil` accepts, `false` refuses with 0x0124, a number refuses with that DICOM status",
             orthanc="ReceivedInstanceFilter", plugin_kind="store-filter"),
    HookSpec("incoming_find_filter", "decision", "calling_aet, query",
             "the whole query changed, `nil` keeps it, a number refuses the C-FIND with that status",
             orthanc="IncomingFindRequestFilter", plugin_kind="find-filter"),
    HookSpec("index", "index", "instance", "a table of extra fields, searchable like DICOM keywords in `/search`",
             plugin_kind="index"),
    HookSpec("query", "query provider", "query text",
             "a list of `{uri, fields}`; the plugin is then a provider for `/search?provider=NAME`", plugin_kind="query"),
    HookSpec("routes", "web service", "app",
             "nothing: it adds routes (Python: to a Bottle app; Lua: a global table"
             " `routes = {[\"GET /path\"] = function(params) ... end}`), served under `/ext/NAME/`", plugin_kind="web"),
    HookSpec("storage", "storage", "`SCHEME` plus `store`, `get`, `list`, `remove` (below)",
             "a place for received objects, chosen by `[storage] scheme` (Python only)", plugin_kind="storage", lua=False),
)
HOOKS = {spec.name: spec for spec in HOOK_SPECS}
#: The functions a storage plugin defines beside SCHEME.
STORAGE_OPERATIONS = ("store", "get", "list", "remove")
#: Orthanc's Lua callback names, accepted so that Orthanc scripts port.
ORTHANC_CALLBACKS = {spec.orthanc: spec.name for spec in HOOK_SPECS if spec.orthanc}
NOT_AUTHORIZED = 0x0124  # what a store filter's plain "no" answers
LUA_MEMORY_LIMIT = 64 * 1024 * 1024
LUA_INSTRUCTION_BUDGET = 20_000_000  # per call: a runaway loop stops in well under a second
LUA_TIME_LIMIT = 5  # seconds per call, for what instructions do not count: many long C calls (string.rep)
LUA_HOOK_INTERVAL = 100  # instructions between two looks at the budget
#: How long a script's call into the daemon waits for another script busy in another thread
#: (its dicoogle.store runs the other plugin's store filter) before that hook fails: two scripts
#: storing through each other's filters at once would otherwise wait for each other forever.
LUA_NESTED_WAIT = 10


def instance_event(record: InstanceRecord, calling_aet: str = "") -> dict:
    """What hooks receive for an instance: its UIDs, its URI (as every plugin call names an
    instance: file:///... or a storage plugin's), and every indexed tag."""
    return {
        "SOPInstanceUID": record.columns["SOPInstanceUID"], "SeriesInstanceUID": record.columns["SeriesInstanceUID"],
        "StudyInstanceUID": record.columns["StudyInstanceUID"], "PatientID": record.columns["PatientID"],
        "uri": _file_uri(record.path), "origin": record.origin, "calling_aet": calling_aet, "tags": record.meta,
    }


#: What dicoogle.instances() answers, one per instance: uri is file:///... or a storage plugin's.
InstanceRow = collections.namedtuple("InstanceRow", "sop_instance_uid sop_class_uid transfer_syntax uri")


class PluginError(Exception):
    pass


@dataclasses.dataclass
class Plugin:
    """One loaded plugin file."""

    name: str
    path: pathlib.Path
    language: str  # "python" or "lua"
    hooks: dict = dataclasses.field(default_factory=dict)  # hook name -> callable
    settings: dict = dataclasses.field(default_factory=dict)
    description: str = ""
    webui: dict | None = None  # the web UI descriptor, package.json style
    scheme: str | None = None  # a storage plugin's URI scheme
    enabled: bool = True
    error: str | None = None  # set when the plugin is dead
    calls: int = 0
    failures: int = 0
    mtime: float = 0
    web: object = None  # the Bottle app of its web-service routes, built on first use
    mount: str | None = None  # a path the web service is also served at, e.g. /dicom-web

    @property
    def provides(self) -> list[str]:
        kinds = {"query": "query", "index": "index", "routes": "web", "storage": "storage"}
        found = sorted({kinds.get(h, "events") for h in self.hooks})
        return found + (["webui"] if self.webui else [])

    def as_json(self) -> dict:
        return {"name": self.name, "type": self.provides, "language": self.language, "enabled": self.enabled,
                "dead": self.error is not None, "error": self.error, "calls": self.calls, "failures": self.failures,
                "settings": self.settings, "description": self.description, "file": self.path.name}


class PluginApi:
    """What a plugin may call: the `dicoogle` object in Python, the `dicoogle` table in Lua.

    Small on purpose, and the same in both languages.
    """

    def __init__(self, daemon: "Daemon", plugin: Plugin):
        self._daemon, self._plugin = daemon, plugin
        self.log_ = logging.getLogger(f"dicoogled.plugin.{plugin.name}")

    def search(self, query: str, limit: int = 100, fields=None) -> list[dict]:
        """Instances matching a search-language query: [{uri, fields}], at most limit. fields
        names the keywords to return (a Lua script's memory is small); None returns them all."""
        rows, _ = self._daemon.search(query, limit, visibility=CALLER_VISIBILITY.get())
        results = [{"uri": _file_uri(hit.path), "fields": hit.meta} for hit in rows]
        if fields is not None:
            for result in results:
                result["fields"] = {name: result["fields"][name] for name in fields if name in result["fields"]}
        return results

    def tags(self, sop_instance_uid: str) -> dict | None:
        """Every indexed element of an instance."""
        visibility = CALLER_VISIBILITY.get()
        if visibility.restricted and not self._daemon.index.instance(str(sop_instance_uid), visibility=visibility):
            return None
        return self._daemon.index.metadata_by_uid([str(sop_instance_uid)]).get(str(sop_instance_uid))

    def cached(self, sop_instance_uid: str, make) -> bytes | None:
        """make()'s bytes for an instance, made once and kept until the instance's file changes
        (in data_dir/cache/plugin-NAME/, gone at the next start once the instance is); None if
        there is no such instance. For what is slow to make: a parse, a conversion."""
        found = self._daemon.index.instance(str(sop_instance_uid))
        stamp = instance_stamp(found.path, found.size, found.mtime_ns) if found else None
        if stamp is None:
            return None
        cache = self._daemon.plugin_cache(self._plugin.name)
        data = cache.get(sop_instance_uid, stamp)
        if data is None:
            data = make()
            cache.put(sop_instance_uid, stamp, data)
        return data

    def file(self, sop_instance_uid: str) -> bytes | None:
        """The stored bytes of an instance (None for one the caller may not see)."""
        found = self._daemon.index.instance(str(sop_instance_uid), visibility=CALLER_VISIBILITY.get())
        return self._daemon.storage.read(found.path) if found else None

    def send(self, sop_instance_uids, destination_aet: str) -> dict:
        """C-STORE instances to a known AE (auto-routing): {sent, failed}."""
        return self._daemon.dicom.send(list(sop_instance_uids) if not isinstance(sop_instance_uids, str) else [sop_instance_uids], str(destination_aet))

    def log(self, message: str, level: str = "info"):
        getattr(self.log_, level if level in ("debug", "info", "warning", "error") else "info")(str(message))

    def setting(self, name: str, default=None):
        """One of this plugin's settings (from its defaults and the config file)."""
        return self._plugin.settings.get(name, default)

    def run_task(self, name: str, function) -> str:
        """Run function(progress) in the background, shown in /index/task; progress(fraction)."""
        return self._daemon.tasks.start_function(f"[{self._plugin.name}] {name}", function)

    def worklist(self) -> list[dict]:
        """The Modality Worklist's entries, as GET /worklist answers them."""
        return [entry.as_json() for entry in self._daemon.worklist.entries()]

    def worklist_add(self, entry: dict) -> int:
        """Schedule a procedure step from its DICOM JSON, as POST /worklist does; its id. Raises
        ValueError (an error in Lua) with a reason fit for the caller when it cannot be taken."""
        return self._daemon.worklist.add(entry)

    def label_study(self, study_uid: str, label: str) -> bool:
        """Put a label on a study (a rule: "every MR from AE X is 'neuro-course'"); False if it
        had it already. Raises ValueError for a label that is not valid."""
        return self._daemon.label("STUDY", str(study_uid), label)

    def label_series(self, series_uid: str, label: str) -> bool:
        """Put a label on a series, and so on its instances; as label_study."""
        return self._daemon.label("SERIES", str(series_uid), label)

    def labelled(self, level: str, label: str) -> list[str]:
        """The UIDs of the studies (level STUDY) or series (SERIES) carrying a label, as
        label:NAME finds them: a study whose series carries it, a series whose study does."""
        return self._daemon.index.labelled(str(level).upper(), label_name(label))

    # ---- for trusted Python plugins that provide whole services (DICOMweb)

    def audited(self, action: str | None = None, studies=(), series=(), instances=(), count: int | None = None,
                detail: str | None = None):
        """Say, while answering a request of the plugin's web service, what it was (an action of
        the audit log: qido, wado, stow...; else "plugin") and which studies, series and
        instances it touched, UIDs only: the request's audit entry records them."""
        if action is not None and action not in AUDIT_ACTIONS:
            raise ValueError(f"{action!r} is not an audit action ({', '.join(AUDIT_ACTIONS)})")
        audited(action=action, studies=studies, series=series, instances=instances, count=count, detail=detail)

    def find(self, level: str, keys: dict, cancelled=lambda: False, offset: int = 0, limit: int | None = None):
        """C-FIND matching on the index, the same rules as the DICOM service: yields response
        data sets, but the first offset and at most limit of them (a page, chosen in SQL).
        keys maps keywords (or 8-hex tags) to DICOM query values ('' returns a key).
        Keys that cannot be answered raise QueryError, a ValueError whose text is fit for the caller."""
        return self._daemon.finder.search(identifier_from_keys(keys, level), cancelled, offset, limit,
                                          CALLER_VISIBILITY.get())

    def instances(self, study_uid: str, series_uid: str = "", sop_uid: str = "") -> list[InstanceRow]:
        """(sop_instance_uid, sop_class_uid, transfer_syntax, uri) of a study, series or instance."""
        found = (self._daemon.index.instances_of(study_uid, series_uid, sop_uid, visibility=CALLER_VISIBILITY.get())
                 if study_uid else [])
        return [InstanceRow(i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax, _file_uri(i.path)) for i in found]

    def store(self, data: bytes, source: str = "") -> int:
        """Store and index a Part 10 object through the one ingest path; returns a DICOM status,
        an int whose .reason says why when it is a failure."""
        return self._daemon.ingest.store_received(data, source, origin="stow")

    # Pixels are decoded in the codec worker: a plugin never imports numpy or pydicom.pixels itself.
    # A worker that crashed or took too long raises CodecWorkerError, which answers the request 502/504.

    def render(self, uri: str, frame: int = 0, size: int | None = None, center: float | None = None,
               width: float | None = None, media_type: str = "image/png", quality: int = 90) -> bytes | None:
        """One frame (from 0) of a stored instance (its URI) as PNG or JPEG bytes, at most size
        pixels on its longer side, windowed at center/width if both are given; None if it cannot
        be rendered (or the URI names no instance the caller may see)."""
        window = [center, width] if center is not None and width is not None and width > 0 else None
        try:
            return self._daemon.codecs.call("render", self.open(uri), frame=frame, size=size,
                                            window=window, media_type=media_type, quality=quality)
        except (ValueError, OSError):  # UnrenderableError, FrameOutOfRange, open's refusal
            return None

    def pixels(self, uri: str, frame: int = 0) -> bytes:
        """One frame (from 0) of a stored instance (its URI), decoded: its pixels as Explicit VR
        Little Endian holds them. Raises ValueError, with a reason fit for the caller, if it
        cannot be decoded."""
        return self._daemon.codecs.call("pixels", self.open(uri), frame=frame)

    def uncompressed(self, uri: str) -> bytes:
        """A stored instance (its URI) as a Part 10 file in Explicit VR Little Endian, its pixel
        data decoded. Raises ValueError, with a reason fit for the caller, if it cannot be decoded."""
        return self._daemon.codecs.call("uncompressed", self.open(uri))

    def transcoded(self, uri: str, transfer_syntax: str) -> bytes:
        """A stored instance (its URI) as a Part 10 file in transfer_syntax: Explicit VR Little
        Endian or a lossless encoding (RLE, JPEG-LS, JPEG 2000 lossless), made in a codec worker.
        Raises ValueError, with a reason fit for the caller, if it cannot be made."""
        return self._daemon.codecs.call("transcoded", self.open(uri), transfer_syntax=transfer_syntax)

    def open(self, uri: str):
        """What pydicom.dcmread reads a stored instance from, given its URI: a file's path, or its
        bytes in memory when a storage plugin keeps it. Raises ValueError for a URI that names no
        instance of the index the caller may see: what reads by URI (render, pixels, ...) reads
        the archive only, never any file the daemon could open (a Lua script has no io)."""
        location = _location_from_uri(str(uri))
        if self._daemon.index.instance(path=location, visibility=CALLER_VISIBILITY.get()) is None:
            raise ValueError(f"no stored instance at {str(uri)[:200]}")
        return self._daemon.storage.open(location)


# ---- the API's one table: each call in Python and in Lua ----------------------------------------

# Where Lua gets a call differently from Python, it gets it through one of these: the same
# PluginApi method, its answer as Lua holds it (tables for Python's objects, several values for
# one with attributes). Each takes the API first, then the call's parameters as Lua passes them.


def _lua_find(api: PluginApi, level, keys, offset=0, limit=None):
    """C-FIND responses as tables of keyword -> text, as a find filter sees a query; no
    cancelled (a Lua function cannot be asked between two responses)."""
    return [identifier_keys(response) for response in api.find(level, keys, offset=offset, limit=limit)]


def _lua_instances(api: PluginApi, study_uid, series_uid="", sop_uid=""):
    """Instance rows as tables by field name."""
    return [row._asdict() for row in api.instances(study_uid, series_uid, sop_uid)]


def _lua_store(api: PluginApi, data, source=""):
    """The status, and why when it is a failure as a second value (Lua has no int with a reason)."""
    status = api.store(data, source)
    return int(status), getattr(status, "reason", "") or None


@dataclasses.dataclass(frozen=True)
class ApiCall:
    """A call of the plugin API: PluginApi's method of that name. The one table of them
    (API_CALLS) is what the Lua bridge offers and what docs/plugins.md's table of the API lists,
    row for row (a test holds the two together)."""
    name: str
    returns: str  # what Python gets
    does: str  # one line
    lua_returns: str = ""  # what Lua gets, when it differs: tables for Python's objects
    python_only: str = ""  # why Lua has no such call: Lua has it unless this says why not
    #: Parameters carrying bytes (for a function parameter, what the function returns): a Lua
    #: string is handed over as hex and decoded here, as Lua strings cross as text otherwise.
    binary: tuple = ()
    lua: typing.Callable | None = None  # how Lua calls it, when not as Python does

    def parameters(self, language: str) -> list[inspect.Parameter]:
        """The call's parameters in one language: the method's, or its Lua adapter's."""
        if language == "lua" and self.lua is not None:
            return list(inspect.signature(self.lua).parameters.values())[1:]  # after the API
        return list(inspect.signature(getattr(PluginApi, self.name)).parameters.values())[1:]  # after self

    def signature(self, language: str) -> str:
        """How a plugin writes the call: Python with its defaults, Lua with [optional] parameters
        (a nil, or one left out, takes the default)."""
        def written(parameter):
            if parameter.default is inspect.Parameter.empty:
                return parameter.name
            if language == "lua":
                return f"[{parameter.name}]"
            default = parameter.default
            shown = "..." if callable(default) else json.dumps(default) if isinstance(default, str) else repr(default)
            return f"{parameter.name}={shown}"
        return f"dicoogle.{self.name}({', '.join(map(written, self.parameters(language)))})"

    def doc_row(self) -> str:
        """Its row of the API table in docs/plugins.md."""
        if self.python_only:
            lua = f"— ({self.python_only})", "—"
        else:
            lua = f"`{self.signature('lua')}`", self.lua_returns or self.returns
        return f"| `{self.signature('python')}` | {self.returns} | {lua[0]} | {lua[1]} | {self.does} |"


API_CALLS = (
    ApiCall("search", "`[{uri, fields}]`", "instances matching a query in the search language of `/search`, at most"
            " `limit`; `fields` (a list) keeps only those keywords: a Lua script's memory is small"),
    ApiCall("tags", "keyword → value, or None", "every indexed element of an instance", lua_returns="a table, or nil"),
    ApiCall("file", "bytes, or None", "the instance's stored bytes (from a file or a storage plugin)",
            lua_returns="a string of those bytes, or nil"),
    ApiCall("send", "`{sent, failed}`", "C-STORE instances (one UID or a list) to an AE of `[modalities]`, over one association"),
    ApiCall("log", "None", "writes to the log as `dicoogled.plugin.NAME`; levels debug, info, warning, error",
            lua_returns="nothing"),
    ApiCall("setting", "its value", "one of the plugin's settings (its default in `SETTINGS`, or the config's)"),
    ApiCall("run_task", "the task's id", "runs `function(progress)` in the background, listed in `/index/task`;"
            " `progress(fraction)` shows how far it is (Lua: under the budget, a fresh one)"),
    ApiCall("worklist", "a list of entries", "the Modality Worklist's entries, as `GET /worklist` answers them"),
    ApiCall("worklist_add", "its id", "schedules a procedure step from its DICOM JSON, as `POST /worklist` does;"
            " `ValueError` (an error in Lua) with the reason when it cannot be taken"),
    ApiCall("label_study", "True if new, False if it had it", "puts a label on a study (and so on its instances);"
            " a label that is not valid raises `ValueError` (an error in Lua)", lua_returns="true or false"),
    ApiCall("label_series", "True if new, False if it had it", "puts a label on a series, as `label_study`",
            lua_returns="true or false"),
    ApiCall("labelled", "a list of UIDs", "the studies (`\"STUDY\"`) or series (`\"SERIES\"`) carrying a label,"
            " as `label:NAME` finds them"),
    ApiCall("audited", "None", "says what the web service request being answered was, for its audit entry: an action"
            " of the audit log, the UIDs it touched", lua_returns="nothing"),
    ApiCall("find", "pydicom data sets (a generator)", "C-FIND matching on the index, as the DICOM service answers,"
            " the page `offset`, `limit`; keys it cannot answer raise `ValueError` (an error in Lua)",
            lua_returns="a list of tables, keyword → text", lua=_lua_find),
    ApiCall("instances", "named tuples `(sop_instance_uid, sop_class_uid, transfer_syntax, uri)`",
            "the instances of a study, series or instance", lua_returns="a list of tables with those fields",
            lua=_lua_instances),
    ApiCall("store", "a DICOM status, an int whose `.reason` says why a failure failed",
            "stores Part 10 bytes through the same path as C-STORE (store filters included)",
            lua_returns="the status, and the reason as a second value", binary=("data",), lua=_lua_store),
    ApiCall("render", "PNG or JPEG bytes, or None", "one frame (from 0) as an image, at most `size` pixels on its"
            " longer side, windowed at `center`/`width` if both are given", lua_returns="a string of those bytes, or nil"),
    ApiCall("pixels", "bytes", "one frame (from 0), decoded: its pixels as Explicit VR Little Endian holds them",
            lua_returns="a string of those bytes"),
    ApiCall("uncompressed", "bytes", "the instance as a Part 10 file in Explicit VR Little Endian, its pixel data decoded",
            lua_returns="a string of those bytes"),
    ApiCall("transcoded", "bytes", "the instance as a Part 10 file in `transfer_syntax` (Explicit VR Little Endian or a"
            " lossless one), its SOP Instance UID kept", lua_returns="a string of those bytes"),
    ApiCall("cached", "bytes, or None", "`make()`'s bytes for an instance, made once and kept until the instance's file"
            " changes (Lua: `make` runs inside the calling call's budget)", lua_returns="a string of those bytes, or nil",
            binary=("make",)),
    ApiCall("open", "a path, or a file object", "what `pydicom.dcmread` reads a stored instance from",
            python_only="a path or a file object: Lua has no `io` and no pydicom; `dicoogle.file` gives the bytes"),
)


# ---- Lua: a sandbox with an instruction budget and a memory cap ----------------------------

_LUA_SANDBOX = r"""
local plugin_source, plugin_name, api, binary, budget, time_limit, hook_interval = ...
local sethook, create, resume = debug.sethook, coroutine.create, coroutine.resume
local pack, unpack, clock, gsub = table.pack, table.unpack, os.time, string.gsub

local function copy(t) local c = {} for k, v in next, t do c[k] = v end return c end

-- What crosses to Python: nil, booleans, numbers, strings and tables of them keyed by strings and
-- numbers, copied here, inside the budget (a table reached a million ways is a million copies),
-- so that reading it in Python runs nothing of the script's and ends.
local function plain(value, open)
  local kind = type(value)
  if kind == "table" then
    if open[value] then error("a table that contains itself cannot leave the plugin", 0) end
    open[value] = true
    local copied = {}
    for key, item in next, value do
      if type(key) ~= "string" and type(key) ~= "number" then
        error("a table key leaving the plugin must be a string or a number, not a " .. type(key), 0)
      end
      copied[key] = plain(item, open)
    end
    open[value] = nil
    return copied
  elseif kind == "function" or kind == "userdata" or kind == "thread" then
    error("a plugin hands over strings, numbers, booleans and tables, not a " .. kind, 0)
  end
  return value
end

-- keep_functions: an argument of the daemon's functions may be a function (run_task's), which
-- the daemon calls under the budget too.
local function plain_values(keep_functions, ...)
  local values = pack(...)
  for i = 1, values.n do
    if not (keep_functions and type(values[i]) == "function") then values[i] = plain(values[i], {}) end
  end
  return unpack(values, 1, values.n)
end

-- Bytes leave as hex: the daemon reads a Lua string as UTF-8 text, which bytes are not. The
-- table makes gsub do it in C, one instruction whatever the length (the clock and the memory
-- cap bound it).
local HEX = {}
for byte = 0, 255 do HEX[string.char(byte)] = string.format("%02x", byte) end
local function hex(data, what)
  if type(data) ~= "string" then error(what .. " must be a string of bytes, not " .. type(data), 0) end
  return (gsub(data, ".", HEX))
end

-- The arguments at the positions binary names carry bytes: a string leaves as hex, and a
-- function (cached's make) is wrapped so that what it returns does.
local function bytes_as_hex(positions, ...)
  local values = pack(...)
  for position, parameter in next, positions do
    local value = values[position]
    if type(value) == "function" then
      values[position] = function(...) return hex(value(...), "what " .. parameter .. " returns") end
    elseif value ~= nil then
      values[position] = hex(value, parameter)
    end
  end
  return unpack(values, 1, values.n)
end

-- The budget of the outermost call: a script's call into the daemon may call the script back
-- (cached's make-function) and what that runs counts against the same instructions and clock.
local instructions, depth, deadline = 0, 0, 0
-- Time spent in the daemon's functions (a C-STORE to a slow peer) is not the script's: the
-- clock stops while a dicoogle call runs, and starts again while the script runs within it.
-- paused says the clock is stopped: the hook may fire on the call's way back, between its
-- return and the line that moves the deadline on, and must not take the pause for the script's.
local paused_since, paused = 0, false

-- A call's arguments wait here, under a number, for the daemon to read them (handed_over): the
-- daemon is called with the number only. What it reads a Lua value through must be the main Lua
-- thread, which lives as long as the runtime: a value it were handed in a call from the
-- script's coroutine would keep that coroutine's address, and using it once the coroutine is
-- collected (run_task's function, later) would read freed memory.
local waiting, handed = {}, 0
local function handed_over(number) return waiting[number] end

local dicoogle = {}
for name, fn in next, api do
  local positions = binary[name] or {}
  dicoogle[name] = function(...)
    local arguments = pack(bytes_as_hex(positions, plain_values(true, ...)))
    handed = handed + 1
    local number = handed
    waiting[number] = arguments
    paused_since, paused = clock(), true
    local results = pack(pcall(fn, number))
    deadline = deadline + (clock() - paused_since)
    paused = false
    waiting[number] = nil
    if not results[1] then error(results[2], 0) end
    return unpack(results, 2, results.n)
  end
end

-- Globals a plugin may use: no os (but time), io, package, require, debug, load of bytecode,
-- dofile, loadfile, collectgarbage, coroutine (a new coroutine would escape the instruction
-- hook) or python; no setmetatable or getmetatable either: a metatable's functions run wherever
-- a value is touched, by the collector with hooks off (__gc) or by the daemon reading an answer
-- (__tostring, __index), and none of the script's code may run outside the budget.
local env = {
  assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs, pcall = pcall,
  select = select, tonumber = tonumber, tostring = tostring, type = type, xpcall = xpcall,
  rawequal = rawequal, rawget = rawget, rawlen = rawlen, rawset = rawset,
  string = copy(string), table = copy(table), math = copy(math), utf8 = copy(utf8),
  os = { time = os.time, clock = os.clock, date = os.date, difftime = os.difftime },
  dicoogle = dicoogle, _VERSION = _VERSION,
}
env.string.dump = nil
string.dump = nil  -- strings index the real string table too: ("").dump must not be there
env.print = function(...) local parts = {} for i = 1, select("#", ...) do parts[#parts + 1] = tostring((select(i, ...))) end dicoogle.log(table.concat(parts, " ")) end
env.load = function(chunk, name, mode, chunk_env)
  if type(chunk) ~= "string" then error("load takes text only here", 2) end
  return load(chunk, name, "t", chunk_env or env)
end
env._G = env

-- Run fn in a coroutine whose instruction-count hook raises an error once the budget is spent:
-- budget instructions, or time_limit seconds for what instructions do not count (many long C
-- calls such as string.rep). The hook then fires on every instruction, so a pcall cannot
-- swallow the error and loop on. Called from within a call (cached's make), fn spends what is
-- left of the outer call's budget.
local function limited(fn, ...)
  local args = pack(...)
  local co = create(function() return fn(unpack(args, 1, args.n)) end)
  if depth == 0 then
    instructions, deadline = 0, clock() + time_limit
  else
    deadline = deadline + (clock() - paused_since)  -- the script runs again: its clock with it
  end
  paused = false
  depth = depth + 1
  sethook(co, function()
    instructions = instructions + hook_interval
    local spent = instructions >= budget and "instruction budget exceeded"
                  or not paused and clock() > deadline and ("time limit of " .. time_limit .. " s exceeded")
    if spent then
      sethook(co, function() error(spent, 2) end, "", 1)
      error(spent, 2)
    end
  end, "", hook_interval)
  local result = pack(resume(co))
  depth = depth - 1
  paused_since, paused = clock(), depth > 0  -- back in the daemon's function that called the script, if any
  if not result[1] then
    -- a table as the error would be read in Python: its message says so instead
    error(type(result[2]) == "table" and "an error whose value is a table" or result[2], 0)
  end
  return unpack(result, 2, result.n)
end

-- Call fn under the budget; what it returns leaves as plain data.
local function call(fn, ...)
  local args = pack(...)
  return limited(function() return plain_values(false, fn(unpack(args, 1, args.n))) end)
end

local chunk, problem = load(plugin_source, "=" .. plugin_name, "t", env)
if not chunk then error(problem, 0) end
limited(chunk)
return env, call, handed_over
"""


def _deny_attributes(obj, name, is_setting):
    """Lua may call the API's functions but never reach into Python objects' attributes."""
    raise AttributeError(f"no access to {name!r} from Lua")


def _from_lua(value):
    """Lua's plain data (what the sandbox's plain() copied) as Python: tables become dicts, or
    lists when keyed 1..n. Raw access only (lupa's items() is lua_next; never str() of a Lua value
    or an index through a metatable), so reading it runs no Lua code."""
    if lupa_lua54.lua_type(value) == "table":
        items = list(value.items())
        keys = [k for k, _ in items]
        if keys == list(range(1, len(keys) + 1)):
            return [_from_lua(v) for _, v in items]
        # A table has no order of its own (it changes from run to run): by key, so that what a
        # plugin answers reads the same every time.
        return {str(k): _from_lua(v) for k, v in sorted(items, key=lambda item: str(item[0]))}
    return value


def _bytes_from_hex(value, name: str) -> bytes:
    """Bytes a Lua script handed over: the sandbox sends them as hex text (see bytes_as_hex)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string of bytes")
    return bytes.fromhex(value)


#: The Lua scripts the current thread is inside, innermost last (see LuaPlugin._entered).
_LUA_INSIDE: contextvars.ContextVar = contextvars.ContextVar("lua_inside", default=())


class LuaPlugin:
    """One Lua runtime per plugin file, holding the sandboxed script's environment."""

    def __init__(self, plugin: Plugin, source: str, api: PluginApi):
        self.name = plugin.name
        self.runtime = lupa_lua54.LuaRuntime(
            register_eval=False, register_builtins=False, unpack_returned_tuples=True,
            max_memory=LUA_MEMORY_LIMIT, attribute_filter=_deny_attributes,
        )
        # Re-entered by the thread holding it when a call of the script asks the daemon for
        # something that calls the script back (cached's make-function; its own store filter
        # and index hook, run by its dicoogle.store).
        self.lock = threading.RLock()
        calls = [call for call in API_CALLS if not call.python_only]
        self.api = self.runtime.table_from({call.name: self._bridge(call, api) for call in calls})
        # Where each call's bytes are, as Lua counts arguments: {store = {[1] = "data"}}
        binary = {call.name: {position: parameter.name for position, parameter in enumerate(call.parameters("lua"), 1)
                              if parameter.name in call.binary} for call in calls if call.binary}
        self.env, self.call, self._handed_over = self.runtime.execute(
            _LUA_SANDBOX, source, plugin.name, self.api, self.runtime.table_from(binary, recursive=True),
            LUA_INSTRUCTION_BUDGET, LUA_TIME_LIMIT, LUA_HOOK_INTERVAL)
        self._rawget = self.runtime.globals()["rawget"]
        self.runtime.execute("python = nil")

    def _bridge(self, call: ApiCall, api: PluginApi):
        """The Python function Lua calls for one API call: Lua's arguments, by position, become
        the method's (or its Lua adapter's) parameters by name; a nil takes the parameter's
        default, a function runs under the budget, bytes arrive as hex (see the sandbox)."""
        function = functools.partial(call.lua, api) if call.lua else getattr(api, call.name)
        parameters = [parameter.name for parameter in call.parameters("lua")]

        def from_lua(name, value):
            if lupa_lua54.lua_type(value) == "function":
                limited = self._limited(value)
                return (lambda *args: _bytes_from_hex(limited(*args), f"what {name} returns")) if name in call.binary else limited
            value = _from_lua(value)
            return _bytes_from_hex(value, name) if name in call.binary and value is not None else value

        def bridged(number):
            handed = dict(self._handed_over(number).items())  # read through the main Lua thread
            args = [handed.get(position) for position in range(1, handed["n"] + 1)]
            if len(args) > len(parameters):
                raise TypeError(f"dicoogle.{call.name} takes at most {len(parameters)} arguments, not {len(args)}")
            arguments = {name: from_lua(name, value) for name, value in zip(parameters, args)}
            answer = function(**{name: value for name, value in arguments.items() if value is not None})
            # Several values (store's status and reason) are several Lua values, not a table.
            return tuple(map(self._to_lua, answer)) if isinstance(answer, tuple) else self._to_lua(answer)
        return bridged

    def _to_lua(self, value):
        if isinstance(value, (dict, list, tuple)):
            return self.runtime.table_from(value, recursive=True)
        return value

    def global_value(self, name: str):
        """A global's value, as plain data."""
        return self._limited(self._rawget)(self.env, name)

    def function(self, name: str):
        """A Python callable running the Lua global function name under the budget."""
        function = self._rawget(self.env, name)
        return self._limited(function) if lupa_lua54.lua_type(function) == "function" else None

    def _limited(self, function):
        def call(*args):
            with self._entered():
                return _from_lua(self.call(function, *[self._to_lua(a) for a in args]))
        return call

    @contextlib.contextmanager
    def _entered(self):
        """This script's lock, held while it runs. A thread that is already inside another
        script (whose dicoogle call runs this one's hook) waits LUA_NESTED_WAIT at most: holding
        one script while waiting for another is how two threads would wait for each other forever."""
        inside = _LUA_INSIDE.get()
        nested = bool(inside) and self not in inside
        if not self.lock.acquire(timeout=LUA_NESTED_WAIT if nested else -1):
            raise PluginError(f"waited {LUA_NESTED_WAIT} s for plugin {self.name}, busy in another thread")
        entered = _LUA_INSIDE.set(inside + (self,))
        try:
            yield
        finally:
            _LUA_INSIDE.reset(entered)
            self.lock.release()

    def routes(self) -> dict:
        """The script's web service: a global table routes = {["GET /path"] = function(params) ... end}."""
        table = self._rawget(self.env, "routes")
        if lupa_lua54.lua_type(table) != "table":
            return {}
        return {key: self._limited(function) for key, function in table.items()
                if isinstance(key, str) and lupa_lua54.lua_type(function) == "function"}


# ---- loading and dispatch --------------------------------------------------------------------


class PluginManager:
    """Loads plugins from folders, keeps them current, and dispatches hooks to them."""

    def __init__(self, daemon: "Daemon", folders, plugin_settings: dict):
        self.daemon = daemon
        self.folders = [pathlib.Path(f) for f in folders]
        self.configured = plugin_settings  # name -> {setting: text} from [plugin.NAME] sections
        self.plugins: dict[str, Plugin] = {}
        self.log = logging.getLogger("dicoogled.plugin")
        self._events = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="plugin-event")
        self._lock = threading.RLock()
        self._observer = None
        #: Field names index plugins have added, searchable like DICOM keywords.
        self.extra_fields: set[str] = set()

    # ---- life cycle

    def load_all(self):
        for folder in self.folders:
            if folder.is_dir():
                for path in sorted(folder.iterdir()):
                    if path.suffix in (".py", ".lua") and not path.name.startswith("_"):
                        self.load(path)

    def load(self, path: pathlib.Path) -> Plugin:
        """(Re)load one plugin file; a plugin that fails is kept, dead, with its error."""
        name = path.stem
        with self._lock:
            old = self.plugins.get(name)
            plugin = Plugin(name, path, "lua" if path.suffix == ".lua" else "python", mtime=path.stat().st_mtime)
            try:
                if plugin.language == "python":
                    self._load_python(plugin)
                else:
                    self._load_lua(plugin)
                configured = self.configured.get(name, {})
                for key, default in list(plugin.settings.items()):
                    if key in configured:
                        plugin.settings[key] = _convert_setting(configured[key], default)
                plugin.enabled = bool(plugin.settings.get("enabled", True))
            except Exception as error:
                plugin.error = f"{type(error).__name__}: {error}"
                plugin.enabled = False
                self.log.error("plugin %s is dead: %s", name, plugin.error)
            if old is not None:
                self._unregister(old)
            self.plugins[name] = plugin
            self._register(plugin)
            self.log.info("%s plugin %s (%s)%s", "reloaded" if old else "loaded", name, ", ".join(plugin.provides) or "nothing",
                          "" if plugin.enabled else " — disabled")
            return plugin

    def _load_python(self, plugin: Plugin):
        spec = importlib.util.spec_from_file_location(f"dicoogled_plugin_{plugin.name}", plugin.path)
        module = importlib.util.module_from_spec(spec)
        # The API is there while the file runs, and given again after: a plugin declares the
        # name (dicoogle = None) so that linters know it, and that declaration must not win.
        module.dicoogle = api = PluginApi(self.daemon, plugin)
        spec.loader.exec_module(module)
        module.dicoogle = api
        plugin.description = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
        plugin.settings = dict(getattr(module, "SETTINGS", {}))
        plugin.webui = getattr(module, "WEBUI", None)
        mount = getattr(module, "MOUNT", None)
        if mount is not None and not re.fullmatch(r"(/[A-Za-z0-9._-]+)+", mount):
            raise PluginError(f"MOUNT {mount!r} must be a path such as /dicom-web")
        plugin.mount = mount
        plugin.hooks = {spec.name: getattr(module, spec.name) for spec in HOOK_SPECS
                        if spec.kind != "storage" and callable(getattr(module, spec.name, None))}
        if getattr(module, "SCHEME", None) is not None:
            plugin.scheme = str(module.SCHEME)
            taken = [p.name for p in self.plugins.values() if p.scheme == plugin.scheme and p.name != plugin.name and not p.error]
            if taken:
                raise PluginError(f"SCHEME {plugin.scheme!r} is already plugin {taken[0]}'s")
            plugin.hooks["storage"] = _storage_hook(plugin.scheme, module)

    def _load_lua(self, plugin: Plugin):
        source = plugin.path.read_text(encoding="utf-8")
        lua = LuaPlugin(plugin, source, PluginApi(self.daemon, plugin))
        plugin.settings = lua.global_value("SETTINGS") or {}
        if not isinstance(plugin.settings, dict):
            raise PluginError("SETTINGS must be a table of name = default")
        plugin.description = lua.global_value("DESCRIPTION") or ""
        plugin.webui = lua.global_value("WEBUI")
        if lua.global_value("SCHEME") is not None:
            raise PluginError("storage plugins are Python only: Lua has no io to keep objects with")
        routes = lua.routes()
        if routes:
            plugin.hooks["routes"] = functools.partial(_add_lua_routes, routes)
        for spec in HOOK_SPECS:
            if not spec.lua or spec.kind == "web service":  # Lua's routes are a table, read above
                continue
            for name in filter(None, (spec.name, spec.orthanc)):  # ours first: it wins over Orthanc's
                function = lua.function(name)
                if function is not None:
                    plugin.hooks.setdefault(spec.name, _orthanc_adapter(name, function))

    def _register(self, plugin: Plugin):
        if not plugin.enabled:
            return
        if "query" in plugin.hooks:
            self.daemon.providers[plugin.name] = lambda text, plugin=plugin: _provider_results(self._call(plugin, "query", text) or [])
        if "storage" in plugin.hooks:
            self.daemon.storage.schemes[plugin.scheme] = functools.partial(self._call, plugin, "storage")

    def _unregister(self, plugin: Plugin):
        self.daemon.providers.pop(plugin.name, None)
        if "storage" in plugin.hooks:
            self.daemon.storage.schemes.pop(plugin.scheme, None)

    def unload(self, path: pathlib.Path) -> Plugin | None:
        """Forget the plugin loaded from path (its file was deleted or moved away): its filters,
        events, index fields' hook, query provider, storage scheme, routes and web UI go with it."""
        with self._lock:
            plugin = self.plugins.get(path.stem)
            if plugin is None or plugin.path != path:  # another folder's plugin of that name stays
                return None
            self._unregister(plugin)
            del self.plugins[plugin.name]
            self.log.info("unloaded plugin %s: %s is gone", plugin.name, path)
            return plugin

    def set_enabled(self, name: str, enabled: bool) -> Plugin:
        with self._lock:
            plugin = self.plugins.get(name)
            if plugin is None:
                raise PluginError(f"no plugin {name!r}")
            if plugin.error:
                raise PluginError(f"plugin {name} is dead: {plugin.error}")
            self._unregister(plugin)
            plugin.enabled = enabled
            plugin.settings["enabled"] = enabled
            self._register(plugin)
            self.log.info("plugin %s %s", name, "enabled" if enabled else "disabled")
            return plugin

    def take_settings(self, name: str, texts: dict[str, str]):
        """Take a plugin's settings saved elsewhere (another node): {setting: text}, as its
        [plugin.NAME] section would give them at load, and enabled or disabled as they say."""
        with self._lock:
            self.configured[name] = dict(texts)
            plugin = self.plugins.get(name)
            if plugin is None or plugin.error:
                return  # a plugin loaded later reads them from configured
            for key, text in texts.items():
                if key in plugin.settings:
                    try:
                        plugin.settings[key] = _convert_setting(text, plugin.settings[key])
                    except ValueError:
                        self.log.warning("plugin %s: setting %s = %r is not a %s; kept %r", name, key, text,
                                         type(plugin.settings[key]).__name__, plugin.settings[key])
            enabled = bool(plugin.settings.get("enabled", True))
            if enabled != plugin.enabled:
                self.set_enabled(name, enabled)

    def watch(self):
        """Reload a plugin file when it changes, without restarting the daemon."""
        manager = self

        def is_plugin_file(path: pathlib.Path) -> bool:
            return path.suffix in (".py", ".lua") and not path.name.startswith("_")

        class Reloader(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.is_directory:
                    return
                # A deleted file, or one moved away (a move's source), takes its plugin with it.
                source = pathlib.Path(os.fsdecode(event.src_path))
                if isinstance(event, (FileDeletedEvent, FileMovedEvent)) and is_plugin_file(source) and not source.exists():
                    manager.unload(source)
                path = pathlib.Path(os.fsdecode(getattr(event, "dest_path", "") or event.src_path))
                if is_plugin_file(path) and path.exists():
                    known = manager.plugins.get(path.stem)
                    if known is None or known.mtime != path.stat().st_mtime:
                        manager.load(path)

        self._observer = Observer()
        # A file is (re)loaded once its writer has closed it (inotify says so): "created" and
        # "modified" events come with the open and the truncation that start a write, and an
        # empty or half-written plugin would replace the running one meanwhile. Elsewhere they
        # are all there is.
        written = [FileClosedEvent] if sys.platform.startswith("linux") else [FileCreatedEvent, FileModifiedEvent]
        for folder in self.folders:
            if folder.is_dir():
                self._observer.schedule(Reloader(), str(folder), recursive=False,
                                        event_filter=[*written, FileMovedEvent, FileDeletedEvent])
        self._observer.start()

    def close(self):
        if self._observer:
            self._observer.stop()
            self._observer.join(timeout=5)
        self._events.shutdown(wait=True, cancel_futures=False)

    # ---- dispatch

    def _active(self, hook: str):
        return [p for p in list(self.plugins.values()) if p.enabled and hook in p.hooks]

    def _call(self, plugin: Plugin, hook: str, *args):
        """Call one hook of one plugin; an exception is logged with the plugin's name and counted."""
        plugin.calls += 1
        try:
            return plugin.hooks[hook](*args)
        except Exception as error:
            plugin.failures += 1
            logging.getLogger(f"dicoogled.plugin.{plugin.name}").error("%s failed: %s", hook, error)
            return None

    def notify(self, hook: str, *args):
        """Run a notify hook of every plugin in the background: a modality never waits for it."""
        for plugin in self._active(hook):
            self._events.submit(self._call, plugin, hook, *args)

    def store_filter(self, calling_aet: str, tags: dict) -> int | None:
        """None to accept the object (its indexed tags), else the DICOM status to refuse it with."""
        for plugin in self._active("incoming_store_filter"):
            verdict = self._call(plugin, "incoming_store_filter", calling_aet, dict(tags))
            if verdict is False:
                return NOT_AUTHORIZED
            if isinstance(verdict, int) and not isinstance(verdict, bool) and verdict != SUCCESS:
                return verdict
        return None

    def find_filter(self, calling_aet: str, identifier: Dataset):
        """The identifier, possibly rewritten by plugins, or an int status to refuse the query.
        A rewritten query that names an unknown key or an invalid value raises QueryError."""
        filters = self._active("incoming_find_filter")
        if not filters:
            return identifier
        query = original = identifier_keys(identifier)
        for plugin in filters:
            verdict = self._call(plugin, "incoming_find_filter", calling_aet, dict(query))
            if isinstance(verdict, int) and not isinstance(verdict, bool):
                return verdict
            if isinstance(verdict, dict):
                query = {str(k): "" if v is None else str(v) for k, v in verdict.items()}
        # Unchanged, the identifier goes on as it came (sequence items and all).
        return identifier if query == original else identifier_from_keys(query)

    def enrich(self, record: InstanceRecord):
        """Index plugins add searchable fields to a record before it is written."""
        for plugin in self._active("index"):
            extra = self._call(plugin, "index", instance_event(record))
            if isinstance(extra, dict):
                for key, value in extra.items():
                    key = re.sub(r"[^A-Za-z0-9]", "", str(key))
                    if key:
                        self.extra_fields.add(key)
                        record.meta[key] = value if isinstance(value, (str, list)) else str(value)
                        record.text += f" {key} {value}"

    def instance_indexed(self, record: InstanceRecord, calling_aet: str = ""):
        event = instance_event(record, calling_aet)
        if record.origin in RECEIVED_ORIGINS:
            self.notify("on_stored", event)
        self.notify("on_indexed", event)


def _add_lua_routes(routes: dict, app: bottle.Bottle):
    """Bottle routes calling a Lua script's handlers with the request's parameters."""
    for key, call in routes.items():
        method, _, path = key.partition(" ")

        def handle(call=call, **arguments):
            return call({**dict(bottle.request.params), **arguments})
        app.route(path.strip() or "/", method.strip().upper() or "GET", handle)


def _convert_setting(text, default):
    """A setting from the config file (text) in the type of its default."""
    if isinstance(default, bool):
        return str(text).strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    return text


def _provider_results(results) -> list[tuple[str, dict]]:
    """A query plugin's answer as (uri, metadata) pairs, what the search routes merge."""
    pairs = []
    for item in results if isinstance(results, list) else []:
        if isinstance(item, dict):
            fields = item.get("fields") if isinstance(item.get("fields"), dict) else {}
            pairs.append((str(item.get("uri", "")), {str(k): v if isinstance(v, (str, list)) else str(v) for k, v in fields.items()}))
    return pairs


def _storage_hook(scheme: str, module):
    """A storage plugin's operations behind one hook, called as hook("get", uri)."""
    if not URI_SCHEME_PATTERN.fullmatch(scheme) or scheme == "file":
        raise PluginError(f"SCHEME {scheme!r} must be a lower-case URI scheme other than file")
    missing = [name for name in STORAGE_OPERATIONS if not callable(getattr(module, name, None))]
    if missing:
        raise PluginError(f"a storage plugin needs {', '.join(missing)} beside SCHEME")
    return lambda operation, *args: getattr(module, operation)(*args)


def _orthanc_adapter(name: str, function):
    """Call a Lua function named as in Orthanc with Orthanc's arguments; ours pass through."""
    def origin(event_or_aet):
        aet = event_or_aet.get("calling_aet", "") if isinstance(event_or_aet, dict) else event_or_aet
        return {"RequestOrigin": "DicomProtocol", "RemoteAet": aet, "CalledAet": ""}

    if name == "OnStoredInstance":
        return lambda event: function(event["SOPInstanceUID"], event["tags"], {"RemoteAET": event["calling_aet"]}, origin(event))
    if name == "ReceivedInstanceFilter":
        return lambda aet, tags: function(tags, origin(aet), {})
    if name == "IncomingFindRequestFilter":
        return lambda aet, query: function(query, origin(aet))
    if name == "OnStableStudy":
        return lambda study: function(study["StudyInstanceUID"], study, {})  # Orthanc's tags: the study's
    return function


# ============================================================================================
# DICOM association engine: PDUs in, DIMSE messages out, no polling
# ============================================================================================
#
# pynetdicom encodes and decodes PDUs (pynetdicom.pdu) and data sets, and negotiates presentation
# contexts (presentation). DIMSE command sets, a dozen small elements on every message, are
# written and read here from pynetdicom's tables: through a pydicom Dataset they cost most of a
# small message. This section moves it all. One thread
# per association blocks on its socket until a PDU is complete (with a deadline), hands each whole
# DIMSE message to its handler and writes the response as soon as it is built: no reactor threads,
# no queues, no sleeps. (pynetdicom's own Association and DUL reactors are two threads per
# association that poll each other's queues with 1 ms sleeps: several wake-ups per message.)

#: The pynetdicom releases this engine is written against, [lowest, first unsupported); setup.cfg
#: pins the same range. It uses the PDU classes' decode/encode/to_primitive/from_primitive,
#: the command set tables of pynetdicom.dimse_messages (_COMMAND_SET_KEYWORDS, _MESSAGE_TYPES,
#: _DATASET_KEYWORDS: what each message carries; command sets are written and read here with
#: them, tested byte for byte against pynetdicom's own encoder and decoder) and
#: negotiate_as_acceptor/negotiate_as_requestor, unchanged from 3.0.1 to 3.0.4.
PYNETDICOM_SUPPORTED = ((3, 0, 1), (3, 1))

A_ASSOCIATE_RQ_PDU, A_ASSOCIATE_AC_PDU, A_ASSOCIATE_RJ_PDU, P_DATA_TF_PDU = 0x01, 0x02, 0x03, 0x04
A_RELEASE_RQ_PDU, A_RELEASE_RP_PDU, A_ABORT_PDU = 0x05, 0x06, 0x07
PDU_HEADER = struct.Struct(">BxI")  # PDU type, reserved, length of the rest (PS3.8 9.3.1)
PDV_ITEM_HEADER = struct.Struct(">IBB")  # a PDV item: its length, context ID, message control header
PDV_COMMAND, PDV_DATA, PDV_LAST = 0x01, 0x00, 0x02  # a PDV's message control header (PS3.8 E.2)
#: Largest association-control PDU read (A-ASSOCIATE-RQ/AC/RJ, A-RELEASE, A-ABORT): 128 proposed
#: contexts with every transfer syntax fit in a tenth of this.
MAX_CONTROL_PDU = 1 << 20
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # the DICOM application context (PS3.7 A.2.1)
#: Seconds we wait for the peer to close the connection after our A-ASSOCIATE-RJ, A-RELEASE-RP
#: or A-ABORT, before closing it ourselves (no slot is held meanwhile): a busy peer that reads our
#: end of file before the PDU may take it for an abort.
PEER_CLOSE_WAIT = 5.0

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4: result 1 is permanent, 2 transient;
# source 1 the service user, 2 the ACSE provider, 3 the presentation provider.
REJECT_NO_REASON = (0x01, 0x01, 0x01)
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_CALLING_AET = (0x01, 0x01, 0x03)
REJECT_CALLED_AET = (0x01, 0x01, 0x07)
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
REJECT_REASONS = {
    REJECT_NO_REASON: "no reason given", REJECT_APPLICATION_CONTEXT: "application context not supported",
    REJECT_CALLING_AET: "calling AE title not recognized", REJECT_CALLED_AET: "called AE title not recognized",
    REJECT_PROTOCOL_VERSION: "protocol version not supported", REJECT_LOCAL_LIMIT: "local limit exceeded",
}
# A-ABORT source and A-P-ABORT reasons (PS3.8 9.3.8)
ABORT_SOURCE_USER, ABORT_SOURCE_PROVIDER = 0x00, 0x02
ABORT_NO_REASON, ABORT_UNRECOGNIZED_PDU, ABORT_UNEXPECTED_PDU = 0x00, 0x01, 0x02
ABORT_UNEXPECTED_PARAMETER, ABORT_INVALID_PARAMETER = 0x05, 0x06
#: C-STORE response statuses that count as a stored instance (success and the warnings).
STORE_SUCCEEDED = frozenset({SUCCESS, 0xB000, 0xB006, 0xB007})


def check_pynetdicom_version(version: str):
    """Refuse to run on a pynetdicom this engine was not written against: its PDU and DIMSE
    classes are used directly, so another release could misbehave on the wire, not just fail."""
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    lowest, beyond = PYNETDICOM_SUPPORTED
    if not lowest <= numbers < beyond:
        raise RuntimeError(f"pynetdicom {version} is installed, but dicoogled's association engine supports"
                           f" {'.'.join(map(str, lowest))} up to (not including) {'.'.join(map(str, beyond))}:"
                           f" pip install 'pynetdicom>={'.'.join(map(str, lowest))},<{'.'.join(map(str, beyond))}'")


#: How a command element's value is written (PS3.5 7.5 and 6.2: the command set is Implicit VR
#: Little Endian): text padded to even length (UIDs with NUL, others with a space), numbers
#: as unsigned little endian; each element keeps its tag and VR from pydicom's dictionary.
_COMMAND_VALUE_WRITERS = {
    "UI": lambda value: _padded(str(value).encode("ascii"), b"\0"),
    "AE": lambda value: _padded(str(value).encode("ascii"), b" "),
    "LO": lambda value: _padded(str(value).encode("ascii"), b" "),
    "SH": lambda value: _padded(str(value).encode("ascii"), b" "),
    "US": lambda value: struct.pack("<H", value),
    "UL": lambda value: struct.pack("<I", value),
    "AT": lambda value: b"".join(struct.pack("<HH", tag >> 16, tag & 0xFFFF)
                                 for tag in (value if isinstance(value, (list, tuple, MultiValue)) else [value])),
}
#: message class -> its CommandField and [(keyword, element header, value writer)] in tag order:
#: pynetdicom's tables of what each message carries (PS3.7 9.3), read once.
_COMMAND_LAYOUTS = {}


def _padded(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _command_layout(message_class):
    layout = _COMMAND_LAYOUTS.get(message_class)
    if layout is None:
        name = message_class.__name__.replace("_", "-")
        command_field = next(field for field, (known, _) in _MESSAGE_TYPES.items() if known == name)
        elements = []
        for tag, keyword in sorted((tag_for_keyword(keyword), keyword) for keyword in _COMMAND_SET_KEYWORDS[name]):
            elements.append((keyword, struct.pack("<HH", tag >> 16, tag & 0xFFFF),
                             _COMMAND_VALUE_WRITERS[dictionary_VR(tag)]))
        layout = _COMMAND_LAYOUTS[message_class] = (command_field, elements)
    return layout


class DimseFields(types.SimpleNamespace):
    """The fields of a DIMSE message we send, by keyword, as encode_command_set reads them; an
    unset one is None. (pynetdicom's primitives check every value as it is set: a cost on every
    message, for values that are ours or were checked as they arrived.)"""

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return None

    def get(self, keyword: str, default=None):
        value = self.__dict__.get(keyword)
        return default if value is None else value


def encode_command_set(message_class, primitive, with_data_set: bool) -> bytes:
    """The command set of a DIMSE message from its primitive: the bytes pynetdicom's
    primitive_to_message and encode_msg make, written directly (they build a pydicom Dataset
    and encode it twice to learn its length: most of a small message's cost)."""
    command_field, elements = _command_layout(message_class)
    derived = {"CommandField": command_field, "CommandDataSetType": 0x0001 if with_data_set else 0x0101}
    encoded = []
    for keyword, header, write in elements[1:]:  # elements[0] is CommandGroupLength: its value is the rest's length
        value = derived[keyword] if keyword in derived else getattr(primitive, keyword, None)
        if value is None:
            continue
        value = write(value)
        encoded += (header, struct.pack("<I", len(value)), value)
    body = b"".join(encoded)
    return elements[0][1] + b"\x04\x00\x00\x00" + struct.pack("<I", len(body)) + body


#: How a received command element's value is read, by VR: text without its padding (AE titles
#: without leading spaces either, PS3.5 6.2), numbers unsigned little endian, tags as a list.
_COMMAND_VALUE_READERS = {
    "UI": lambda value: value.rstrip(b"\0 ").decode("ascii", "replace"),
    "AE": lambda value: value.strip(b"\0 ").decode("ascii", "replace"),
    "LO": lambda value: value.strip(b"\0 ").decode("ascii", "replace"),
    "SH": lambda value: value.strip(b"\0 ").decode("ascii", "replace"),
    "US": lambda value: struct.unpack("<H", value)[0] if len(value) == 2 else None,
    "UL": lambda value: struct.unpack("<I", value)[0] if len(value) == 4 else None,
    "AT": lambda value: [(group << 16) | element for group, element in struct.iter_unpack("<HH", value[:len(value) // 4 * 4])],
}
#: Command element number -> (keyword, value reader): every element of group 0000 pydicom knows.
_COMMAND_ELEMENTS = {tag & 0xFFFF: (entry[4], _COMMAND_VALUE_READERS.get(entry[0], bytes))
                     for tag, entry in DicomDictionary.items() if tag >> 16 == 0x0000 and entry[4]}


def decode_command_set(encoded: bytes) -> DimseFields:
    """The fields of a received command set (Implicit VR Little Endian, PS3.7 6.3.1) by keyword,
    as pynetdicom's decoder reads them into a pydicom Dataset, without building one. Raises
    ValueError when it is cut short."""
    fields, position, end = {}, 0, len(encoded)
    while position < end:
        if position + 8 > end:
            raise ValueError("a command element cut short")
        group, number, length = struct.unpack_from("<HHI", encoded, position)
        position += 8
        if group != 0x0000 or position + length > end:
            raise ValueError(f"a command element ({group:04X},{number:04X}) of {length} bytes in {end - position + 8}")
        known = _COMMAND_ELEMENTS.get(number)
        if known:
            fields[known[0]] = known[1](encoded[position:position + length])
        position += length
    return DimseFields(**fields)


@dataclasses.dataclass(slots=True)
class DimseMessage:
    """A whole DIMSE message received: kind is the pynetdicom message class its command field
    names (C_STORE_RQ, C_FIND_RSP...), data_set its data set's bytes (b"" if it has none)."""
    kind: type
    command_set: DimseFields
    context_id: int
    data_set: bytes = b""


class AssociationEnded(Exception):
    """The association is over: aborted by the peer or by us, closed, timed out or broken."""


class PeerTimedOut(AssociationEnded):
    """The peer sent nothing, or read nothing, for longer than the association's timeout."""


class PeerReleased(Exception):
    """The peer asked to release the association (A-RELEASE-RQ)."""


class ProtocolError(AssociationEnded):
    """The peer broke the protocol; we answer with an A-P-ABORT carrying reason."""

    def __init__(self, message: str, reason: int = ABORT_INVALID_PARAMETER):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class AssociationRequest:
    """An A-ASSOCIATE-RQ as the services judge it."""
    calling_aet: str
    called_aet: str
    address: tuple
    contexts: list  # the proposed pynetdicom PresentationContexts
    roles: dict  # SOP class UID -> (SCU role, SCP role) the requestor proposed
    max_pdu: int  # the largest P-DATA-TF the requestor receives (0: any)
    implementation_class_uid: str = ""
    implementation_version_name: str = ""
    #: The common name of the client certificate it came with over DICOM TLS ("" without one).
    certificate_name: str = ""


@dataclasses.dataclass
class DimseRequest:
    """One C-STORE, C-FIND, C-MOVE, C-GET or N-ACTION request, as a service handler sees it."""
    association: "Association"
    context_id: int
    message_id: int
    sop_class_uid: str
    transfer_syntax: str  # of the presentation context it came on
    data: bytes  # the data set (C-STORE) or identifier, encoded in transfer_syntax
    sop_instance_uid: str = ""
    move_destination: str = ""
    priority: int = 0
    cancelled: bool = False
    command_set: DimseFields | None = None  #: the whole command set, for the fields of N-* requests (ActionTypeID...)

    @property
    def calling_aet(self) -> str:
        return self.association.calling_aet

    @functools.cached_property
    def identifier(self) -> Dataset:
        """The query's identifier, decoded."""
        syntax = pydicom.uid.UID(self.transfer_syntax)
        return pynetdicom_decode(io.BytesIO(self.data), syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)

    def is_cancelled(self) -> bool:
        """True once the peer has sent C-CANCEL for this request: a look at the socket, no wait."""
        if not self.cancelled:
            self.cancelled = self.association.cancel_requested(self.message_id)
        return self.cancelled


def _has_bytes(sock: socket.socket) -> bool:
    """True if sock can be read without waiting: a TLS socket may hold decrypted bytes already."""
    return bool(isinstance(sock, ssl.SSLSocket) and sock.pending()) or bool(select.select([sock], [], [], 0)[0])


def _pdu_error_text(error: Exception) -> str:
    return str(error) or type(error).__name__


class Association:
    """One DICOM association over one TCP connection, in either role, driven by the one thread
    that owns it: PDUs are read whole (however the peer fragments them), messages reassembled from
    their P-DATA fragments, and each message sent in PDUs no longer than the peer accepts."""

    def __init__(self, sock: socket.socket, address: tuple, *, max_receive: int, max_send_limit: int,
                 timeout: float, log: logging.Logger):
        self.sock, self.address, self.log = sock, address, log
        #: The largest P-DATA-TF we accept (our max PDU; 0: any size) and the largest we send.
        self.max_receive, self.max_send = max_receive, max_send_limit
        self._max_send_limit = max_send_limit
        #: How long a read or a write may wait for the peer, in seconds.
        self.timeout = timeout
        self.calling_aet = self.called_aet = ""
        self.peer_aet = ""  #: the other side's AE title: the calling one if we accepted, the called one if we asked
        self.contexts = {}  #: accepted presentation contexts by ID
        self.roles = {}  #: SOP class UID -> (SCU role, SCP role) the requestor proposed
        self.peer_implementation = ""
        self.is_established = False
        self._buffer = bytearray()
        self._held = collections.deque()  # messages read while looking for a C-CANCEL
        self._message_id = 0
        #: Held while a PDU is written: a Storage Commitment report may be sent from its checking
        #: thread while the association's own thread answers requests.
        self.send_lock = threading.RLock()
        with contextlib.suppress(OSError):
            # Without it every small DIMSE message waits for the peer's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def peer(self) -> str:
        return f"{self.peer_aet or '?'} at {self.address[0]}:{self.address[1]}"

    def next_message_id(self) -> int:
        self._message_id = self._message_id % 65535 + 1
        return self._message_id

    def set_peer_max_pdu(self, max_pdu: int):
        limit = self._max_send_limit
        self.max_send = min(max_pdu, limit) if max_pdu and limit else (max_pdu or limit)

    #: What an established association is made of besides its socket: what a worker process
    #: that takes it over needs (handed_over_state, resumed).
    _HANDED_OVER = ("address", "max_receive", "max_send", "_max_send_limit", "timeout", "calling_aet", "called_aet",
                    "peer_aet", "contexts", "roles", "peer_implementation", "_message_id")

    def handed_over_state(self) -> dict:
        """This association's state, for another process that takes its socket over (resumed);
        the bytes read but not used yet go with it."""
        state = {name: getattr(self, name) for name in self._HANDED_OVER}
        state["unread"] = bytes(self._buffer)
        return state

    @classmethod
    def resumed(cls, sock: socket.socket, state: dict, log: logging.Logger) -> "Association":
        """The established association another process handed over: its socket and its state."""
        association = cls(sock, state["address"], max_receive=state["max_receive"],
                          max_send_limit=state["_max_send_limit"], timeout=state["timeout"], log=log)
        for name in cls._HANDED_OVER:
            setattr(association, name, state[name])
        association.received(state["unread"])
        association.is_established = True
        return association

    # ---- PDUs ---------------------------------------------------------------------------------

    def _fill(self, size: int, deadline: float | None):
        """Read until the buffer holds size bytes, or raise AssociationEnded (TimeoutError past deadline)."""
        buffer, sock = self._buffer, self.sock
        while len(buffer) < size:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
            else:
                sock.settimeout(None)
            try:
                chunk = sock.recv(max(size - len(buffer), 65536))
            except TimeoutError:
                raise
            except OSError as error:
                raise AssociationEnded(f"connection lost: {error}") from None
            if not chunk:
                raise AssociationEnded("the peer closed the connection")
            buffer += chunk

    def received(self, data: bytes):
        """Bytes read from the socket before the association took it over, to be read first."""
        self._buffer += data

    def read_pdu(self, timeout: float | None) -> tuple[int, bytes]:
        """The next whole PDU (type, bytes with its header); TimeoutError if it is not complete
        within timeout seconds: a peer that trickles bytes gets no more time than a silent one."""
        deadline = time.monotonic() + timeout if timeout else None
        self._fill(PDU_HEADER.size, deadline)
        pdu_type, length = PDU_HEADER.unpack_from(self._buffer)
        if not A_ASSOCIATE_RQ_PDU <= pdu_type <= A_ABORT_PDU:
            raise ProtocolError(f"unknown PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNIZED_PDU)
        limit = (self.max_receive or 1 << 32) if pdu_type == P_DATA_TF_PDU else MAX_CONTROL_PDU
        if length > limit:
            raise ProtocolError(f"a PDU of {length} bytes, more than our maximum of {limit} (max_pdu)")
        self._fill(PDU_HEADER.size + length, deadline)
        pdu = bytes(self._buffer[:PDU_HEADER.size + length])
        del self._buffer[:PDU_HEADER.size + length]
        return pdu_type, pdu

    def send(self, data: bytes):
        """Write data, within timeout seconds in all: a peer that stops reading ends the association."""
        try:
            with self.send_lock:
                self.sock.settimeout(self.timeout or None)
                self.sock.sendall(data)
        except TimeoutError:
            raise PeerTimedOut(f"{self.peer} read nothing for {self.timeout:g} s") from None
        except OSError as error:
            raise AssociationEnded(f"connection lost: {error}") from None

    def send_pdu(self, pdu_class, primitive):
        pdu = pdu_class()
        pdu.from_primitive(primitive)
        self.send(pdu.encode())

    def abort(self, reason: int | None = None, wait_for_peer: float = PEER_CLOSE_WAIT):
        """Send an A-ABORT (reason None: by us, the service user) or A-P-ABORT, and close."""
        primitive = A_ABORT() if reason is None else A_P_ABORT()
        if reason is None:
            primitive.abort_source = ABORT_SOURCE_USER
        else:
            primitive.provider_reason = reason
        with contextlib.suppress(AssociationEnded, OSError):
            self.sock.settimeout(1)  # a courtesy: a peer that does not read gets no wait
            pdu = A_ABORT_RQ()
            pdu.from_primitive(primitive)
            self.sock.sendall(pdu.encode())
        self.close(wait_for_peer)

    def close(self, wait_for_peer: float = 0):
        """Close the connection. After an A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT the peer closes
        first (PS3.8 9.1.5, the ARTIM wait): closing with its bytes unread would reset the
        connection, and a reset can destroy the PDU we just sent before the peer reads it."""
        self.is_established = False
        if self.sock.fileno() == -1:
            return
        if wait_for_peer:
            # No half-close first: pynetdicom, seeing our end of file with the PDU, may report
            # the connection as aborted instead of the PDU.
            with contextlib.suppress(OSError):
                deadline = time.monotonic() + wait_for_peer
                while (remaining := deadline - time.monotonic()) > 0:
                    self.sock.settimeout(remaining)
                    if not self.sock.recv(65536):
                        break
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    # ---- DIMSE messages -----------------------------------------------------------------------

    def _pdvs(self, pdu: bytes) -> list:
        """[(context ID, control header + fragment)] of a P-DATA-TF PDU, checked."""
        items, offset, end, view = [], PDU_HEADER.size, len(pdu), memoryview(pdu)
        while offset < end:
            if offset + 6 > end:
                raise ProtocolError("a truncated PDV item in a P-DATA-TF")
            (length,) = struct.unpack_from(">I", pdu, offset)
            context_id = pdu[offset + 4]
            if length < 2 or offset + 4 + length > end:
                raise ProtocolError("a PDV item longer than its P-DATA-TF")
            if context_id not in self.contexts:
                raise ProtocolError(f"a PDV on presentation context {context_id}, which was not accepted")
            items.append((context_id, view[offset + 5:offset + 4 + length]))
            offset += 4 + length
        if not items:
            raise ProtocolError("a P-DATA-TF without PDV items")
        return items

    def read_message(self, timeout: float | None = None):
        """The next whole DIMSE message; PeerReleased on A-RELEASE-RQ,
        AssociationEnded on A-ABORT, a closed connection, a timeout or a protocol error."""
        if self._held:
            held = self._held.popleft()
            if isinstance(held, Exception):
                raise held
            return held
        return self.receive_message(timeout)

    def receive_message(self, timeout: float | None = None) -> DimseMessage:
        """The next DIMSE message from the peer, past any held ones: its command set, then its
        data set, each in as many fragments as the peer sent (PS3.8 E.2)."""
        command, data_set, message = bytearray(), bytearray(), None
        while True:
            try:
                pdu_type, pdu = self.read_pdu(self.timeout if timeout is None else timeout)
            except TimeoutError:
                raise PeerTimedOut(f"{self.peer} sent nothing for {self.timeout:g} s") from None
            if pdu_type == P_DATA_TF_PDU:
                for context_id, pdv in self._pdvs(pdu):
                    control = pdv[0]
                    if control & 1:  # a command fragment
                        command += pdv[1:]
                        if control & 2:
                            message = self._command_received(bytes(command), context_id)
                            if message.command_set.CommandDataSetType == 0x0101:  # no data set follows
                                return message
                    elif message is None:
                        raise ProtocolError("a data set fragment before its command set", ABORT_UNEXPECTED_PARAMETER)
                    else:
                        data_set += pdv[1:]
                        if control & 2:
                            message.data_set = bytes(data_set)
                            return message
            elif pdu_type == A_RELEASE_RQ_PDU:
                raise PeerReleased
            elif pdu_type == A_ABORT_PDU:
                source, reason = (pdu[8], pdu[9]) if len(pdu) >= 10 else (0, 0)
                raise AssociationEnded(f"{self.peer} aborted the association (source {source}, reason {reason})")
            else:
                raise ProtocolError(f"an unexpected PDU (type 0x{pdu_type:02X}) during the association", ABORT_UNEXPECTED_PDU)

    @staticmethod
    def _command_received(command: bytes, context_id: int) -> DimseMessage:
        try:
            fields = decode_command_set(command)
            kind = _MESSAGE_TYPES[fields.CommandField][1]
        except Exception as error:
            raise ProtocolError(f"an undecodable DIMSE message: {_pdu_error_text(error)}") from None
        return DimseMessage(kind, fields, context_id)

    def send_message(self, message_class, primitive, context_id: int):
        """Encode a DIMSE primitive as message_class and send it at once (all its PDUs in one
        write): the command set, then the data set, as PDV items packed into as few P-DATA-TF PDUs
        as the peer's maximum length allows. A small message, its command and data set, is one
        PDU: the peer handles one PDU per response instead of two (PS3.8 9.3.5 allows several
        PDV items in a PDU)."""
        data_set = getattr(primitive, _DATASET_KEYWORDS.get(message_class.__name__, ""), None)
        data_set = data_set.getvalue() if data_set else b""
        limit = self.max_send  # of a PDU's variable field, its PDV items (0: no limit)
        items = []  # (header with the message control byte, fragment)
        for control, payload in ((PDV_COMMAND, encode_command_set(message_class, primitive, bool(data_set))),
                                 (PDV_DATA, data_set)):
            step = limit - PDV_ITEM_HEADER.size if limit else max(len(payload), 1)
            for start in range(0, len(payload), step):
                fragment = payload[start:start + step]
                last = PDV_LAST if start + step >= len(payload) else 0
                items.append((PDV_ITEM_HEADER.pack(len(fragment) + 2, context_id, control | last), fragment))
        pdus, pdu, length = [], [], 0
        for header, fragment in items:
            size = len(header) + len(fragment)
            if pdu and limit and length + size > limit:  # this item starts the next PDU
                pdus += [PDU_HEADER.pack(P_DATA_TF_PDU, length), *pdu]
                pdu, length = [], 0
            pdu += [header, fragment]
            length += size
        pdus += [PDU_HEADER.pack(P_DATA_TF_PDU, length), *pdu]
        self.send(b"".join(pdus))

    def cancel_requested(self, message_id: int) -> bool:
        """True if the peer has sent a C-CANCEL for message_id (or ended the association). Looks
        at the socket without waiting; other messages read meanwhile are kept for read_message."""
        for held in list(self._held):
            if isinstance(held, Exception):
                return True  # the operation cannot go on: stop it as if cancelled
            if held.kind is C_CANCEL_RQ and held.command_set.MessageIDBeingRespondedTo == message_id:
                self._held.remove(held)
                return True
        while self._buffer or _has_bytes(self.sock):
            try:
                message = self.receive_message()
            except (PeerReleased, AssociationEnded) as error:
                self._held.append(error)
                return True
            if message.kind is C_CANCEL_RQ and message.command_set.MessageIDBeingRespondedTo == message_id:
                return True
            if message.kind is not C_CANCEL_RQ:  # a cancel of something else finished: nothing to do
                self._held.append(message)
                return False
        return False

    def hold(self, message):
        """Keep a message read out of turn for the next read_message."""
        self._held.append(message)

    # ---- release --------------------------------------------------------------------------------

    def release(self):
        """Release the association we requested: A-RELEASE-RQ, wait for the RP, close."""
        try:
            if self.is_established:
                self.send(A_RELEASE_RQ().encode())
                deadline_timeout = self.timeout
                while True:
                    pdu_type, _ = self.read_pdu(deadline_timeout)
                    if pdu_type in (A_RELEASE_RP_PDU, A_ABORT_PDU):
                        break
                    if pdu_type == A_RELEASE_RQ_PDU:  # release collision (PS3.8 9.2.4): the requestor answers
                        self.send(A_RELEASE_RP().encode())
        except (AssociationEnded, TimeoutError) as error:
            self.log.debug("release of the association with %s: %s", self.peer, error)
        finally:
            self.close()


def _as_uid_text(value) -> str:
    return str(value or "").strip()


def _decode_association_request(pdu: bytes, address: tuple) -> AssociationRequest:
    """The A-ASSOCIATE-RQ in pdu, from address. A peer sends the same request every time (a
    viewer's hundred storage contexts with it): the last few are decoded once and shared, read only."""
    request = copy.copy(_decoded_association_request(pdu))
    request.address = address
    return request


def _certificate_name(sock: ssl.SSLSocket) -> str:
    """The common name of the certificate a TLS peer presented ("" without one)."""
    certificate = sock.getpeercert() or {}
    return dict(item for rdn in certificate.get("subject", ()) for item in rdn).get("commonName", "")


@functools.lru_cache(maxsize=16)
def _decoded_association_request(pdu: bytes) -> AssociationRequest:
    rq = A_ASSOCIATE_RQ()
    rq.decode(pdu)
    primitive = rq.to_primitive()
    request = AssociationRequest(
        calling_aet=_as_uid_text(primitive.calling_ae_title), called_aet=_as_uid_text(primitive.called_ae_title),
        address=(), contexts=primitive.presentation_context_definition_list, roles={}, max_pdu=0)
    request.pdu = pdu
    request.application_context = _as_uid_text(primitive.application_context_name)
    request.protocol_version = rq.protocol_version
    # Read from the items: the primitive's own getters raise when an item is missing.
    for item in primitive.user_information:
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation):
            request.roles[str(item.sop_class_uid)] = (item.scu_role, item.scp_role)
        elif isinstance(item, MaximumLengthNotification):
            request.max_pdu = item.maximum_length_received or 0
        elif isinstance(item, ImplementationClassUIDNotification):
            request.implementation_class_uid = _as_uid_text(item.implementation_class_uid)
        elif isinstance(item, ImplementationVersionNameNotification):
            request.implementation_version_name = _as_uid_text(item.implementation_version_name)
        elif isinstance(item, AsynchronousOperationsWindowNegotiation):
            request.asynchronous_operations = True
    request.primitive = primitive
    return request


def _user_information(max_pdu: int) -> list:
    """The user information items every A-ASSOCIATE-RQ/AC of ours carries (PS3.7 D.3.3)."""
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return [maximum, implementation, version]


def _association_request_complete(received: bytes) -> bool:
    """Whether a new connection has sent enough to be handled: a whole A-ASSOCIATE-RQ, or what
    shows it is none (another PDU type, or a length past MAX_CONTROL_PDU), which is then
    refused as a protocol error by the association's own reading."""
    if len(received) < PDU_HEADER.size:
        return False
    pdu_type, length = PDU_HEADER.unpack_from(received)
    return pdu_type != A_ASSOCIATE_RQ_PDU or length > MAX_CONTROL_PDU or len(received) >= PDU_HEADER.size + length


def tls_server_context(config: Config) -> ssl.SSLContext:
    """The SSLContext of the DICOM TLS listener: our certificate and key; with tls_ca_certificate,
    a client certificate that CA signed is required (mutual TLS, PS3.15 B.1)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[config.tls_minimum_version]
    _load_tls_files(context, config)
    if config.tls_ca_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _load_tls_files(context: ssl.SSLContext, config: Config):
    """Load our certificate and key (and the CA's, if set) into context; OSError names the file at fault."""
    try:
        context.load_cert_chain(config.tls_certificate, config.tls_private_key)
    except (OSError, ssl.SSLError) as error:
        raise OSError(f"cannot load tls_certificate {config.tls_certificate} with tls_private_key"
                      f" {config.tls_private_key}: {getattr(error, 'strerror', None) or error}") from None
    if config.tls_ca_certificate:
        try:
            context.load_verify_locations(config.tls_ca_certificate)
        except (OSError, ssl.SSLError) as error:
            raise OSError(f"cannot load tls_ca_certificate {config.tls_ca_certificate}:"
                          f" {getattr(error, 'strerror', None) or error}") from None


def tls_client_context(config: Config) -> ssl.SSLContext:
    """The SSLContext for associations we open with a [modalities] AE marked tls: its certificate
    is checked against tls_ca_certificate (else the system's CAs) and its host name; we present
    ours, for peers that require a client certificate."""
    # With a lab CA, only it is trusted (PROTOCOL_TLS_CLIENT checks certificates and host names).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT) if config.tls_ca_certificate else ssl.create_default_context()
    context.minimum_version = TLS_VERSIONS[config.tls_minimum_version]
    if config.tls_certificate and config.tls_private_key:
        _load_tls_files(context, config)
    elif config.tls_ca_certificate:
        context.load_verify_locations(config.tls_ca_certificate)
    return context


def serve_to_end(association: Association, serve, log: logging.Logger):
    """Run serve(association) until the association ends, answering an A-RELEASE-RQ; returns
    how to end the connection (close, or abort after a protocol error or a silent peer), which
    the caller does once the association's slot is free."""
    try:
        serve(association)
    except PeerReleased:
        try:
            with association.send_lock:  # nothing of ours may follow the A-RELEASE-RP
                association.is_established = False
                association.send(A_RELEASE_RP().encode())
        except AssociationEnded as error:
            log.info("association with %s ended: %s", association.peer, error)
            return association.close
        return functools.partial(association.close, wait_for_peer=PEER_CLOSE_WAIT)
    except ProtocolError as error:
        log.warning("aborted the association with %s: %s", association.peer, error)
        return functools.partial(association.abort, error.reason)
    except PeerTimedOut as error:
        log.warning("aborted the association with %s: %s", association.peer, error)
        return association.abort
    except AssociationEnded as error:
        log.info("association with %s ended: %s", association.peer, error)
    return association.close


class AssociationAcceptor:
    """The DICOM listener: one socket and one thread, which accepts connections and keeps them
    in a waiting room until each has sent its whole A-ASSOCIATE-RQ; only then does a connection
    get a thread of its own (one per association) and, if the request is good, an association
    slot. A connection has handshake_timeout seconds to send its request; one that closes first
    is forgotten at once. So silent, half-open and trickling connections (port scans, health
    checks, a flood) cost a socket in the waiting room, never a thread or a slot.

    judge(request) -> a rejection (result, source, reason) or None; contexts(request) -> the
    supported contexts to negotiate; serve(association) runs the association to its end.
    settings() -> the live limits: max_associations, max_pdu, max_pdu_send, handshake_timeout,
    timeout (network), aet.

    With tls (an ssl.SSLContext for the server side) the listener speaks DICOM TLS: the TLS
    handshake is done in the waiting room too, without blocking, within the same handshake_timeout,
    so a silent or stalled TLS client costs no more than a silent plain one. sharing: another
    acceptor (the plain port's) whose association slots this one counts in, so that
    max_associations holds for both ports together."""

    #: Connections the waiting room holds at most: past it, the one waiting longest is closed
    #: (a real peer sends its request as soon as it connects, so it is never the oldest for long).
    MAX_WAITING = 1024
    #: Negotiations kept for peers that ask again (the newest; a hostile peer only churns them).
    NEGOTIATIONS_KEPT = 16

    def __init__(self, host: str, port: int, *, settings, judge, contexts, serve, log: logging.Logger,
                 tls: ssl.SSLContext | None = None, sharing: "AssociationAcceptor | None" = None):
        self.settings, self.judge, self.contexts, self.serve, self.log = settings, judge, contexts, serve, log
        self.tls = tls
        # A backlog of 128, not socketserver's 5: a burst of connections must not have peers wait for a SYN retry.
        self._listener = socket.create_server((host, port), backlog=128)
        self._listener.setblocking(False)
        self.address = self._listener.getsockname()[:2]
        self._wake_read, self._wake_write = socket.socketpair()
        self._lock = sharing._lock if sharing else threading.Lock()
        #: Established associations (and those being negotiated after a valid request).
        self.associations = sharing.associations if sharing else set()
        self._negotiated = {}  # (A-ASSOCIATE-RQ, max PDU, supported contexts) -> (accepted contexts, A-ASSOCIATE-AC)
        #: How many connections are in the waiting room (for /health).
        self.waiting = 0
        self._thread = start_thread(f"dicom-listener-{self.address[1]}", self._accept_loop)

    def _accept_loop(self):
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        selector.register(self._wake_read, selectors.EVENT_READ)
        #: The waiting room, oldest first: socket -> (address, deadline, what it has sent so far).
        waiting: dict[socket.socket, tuple[tuple, float, bytearray]] = {}
        #: TLS connections of the waiting room whose handshake is not done yet.
        self._handshaking = set()

        def leave(sock: socket.socket):
            selector.unregister(sock)
            del waiting[sock]
            self._handshaking.discard(sock)

        try:
            while True:
                now = time.monotonic()
                timeout = max(0.0, min(deadline for _, deadline, _ in waiting.values()) - now) if waiting else None
                for key, _ in selector.select(timeout):
                    if key.fileobj is self._wake_read:
                        return
                    if key.fileobj is self._listener:
                        self._accept_waiting(selector, waiting, leave)
                        continue
                    sock = key.fileobj
                    address, _, received = waiting[sock]
                    if sock in self._handshaking:
                        handshake = self._continue_handshake(sock, address)
                        if handshake is None:
                            continue
                        if not handshake:
                            leave(sock)
                            sock.close()
                            continue
                    try:
                        chunk = sock.recv(65536)
                        while chunk and self.tls and sock.pending():  # TLS may hold decrypted bytes select cannot see
                            chunk += sock.recv(65536)
                    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        continue
                    except OSError:
                        chunk = b""
                    if not chunk:  # a TCP health check's connect-and-close: nothing to say
                        leave(sock)
                        sock.close()
                        continue
                    received += chunk
                    if _association_request_complete(received):
                        leave(sock)
                        sock.setblocking(True)
                        start_thread(f"dicom-{address[0]}:{address[1]}", self._run, sock, address, bytes(received))
                now = time.monotonic()
                for sock in [sock for sock, (_, deadline, _) in waiting.items() if deadline <= now]:
                    self.log.info("closed a connection from %s:%d: no A-ASSOCIATE-RQ within %g s",
                                  *waiting[sock][0], self.settings()["handshake_timeout"])
                    leave(sock)
                    sock.close()
                self.waiting = len(waiting)
        finally:
            for sock in list(waiting):
                sock.close()
            selector.close()
            self._listener.close()

    def _accept_waiting(self, selector, waiting: dict, leave):
        """Take every connection the listener holds into the waiting room."""
        while True:
            try:
                sock, address = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as error:
                self.log.warning("cannot accept a DICOM connection: %s", error)
                return
            if len(waiting) >= self.MAX_WAITING:
                oldest = next(iter(waiting))
                self.log.warning("closed a connection from %s:%d: %d connections wait for their A-ASSOCIATE-RQ",
                                 *waiting[oldest][0], self.MAX_WAITING)
                leave(oldest)
                oldest.close()
            sock.setblocking(False)
            if self.tls:
                try:
                    sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except (OSError, ValueError) as error:
                    self.log.info("closed a TLS connection from %s:%d: %s", *address[:2], error)
                    sock.close()
                    continue
                self._handshaking.add(sock)
            waiting[sock] = (address[:2], time.monotonic() + self.settings()["handshake_timeout"], bytearray())
            selector.register(sock, selectors.EVENT_READ)

    def _continue_handshake(self, sock: ssl.SSLSocket, address: tuple) -> bool | None:
        """Take a TLS handshake as far as the bytes at hand allow: True once it is done, None while
        it waits for the peer, False if it failed (no client certificate when one is required, one
        no trusted CA signed, a TLS version below the minimum, not TLS at all)."""
        try:
            sock.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except (ssl.SSLError, OSError) as error:
            self.log.warning("refused a TLS connection from %s:%d: %s", *address, getattr(error, "reason", None) or error)
            return False
        self._handshaking.discard(sock)
        certificate_name = _certificate_name(sock)
        self.log.info("TLS connection from %s:%d (%s%s)", *address, sock.version(),
                      f", client certificate {certificate_name or '?'}" if sock.getpeercert() else "")
        return True

    def shutdown(self):
        """Stop listening (associations under way go on; connections still waiting are closed)."""
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")
        self._thread.join(10)
        self._wake_read.close()
        self._wake_write.close()

    def _run(self, sock: socket.socket, address: tuple, received: bytes):
        """Answer the A-ASSOCIATE-RQ in received (what the waiting room read: the whole request,
        or what shows it is none), then serve the association."""
        settings = self.settings()
        association = Association(sock, address, max_receive=settings["max_pdu"], max_send_limit=settings["max_pdu_send"],
                                  timeout=settings["timeout"], log=self.log)
        association.received(received)
        slot = False
        ending = association.close  # how the connection ends once its slot is free
        try:
            if received[0] == A_ABORT_PDU:  # nothing to answer (PS3.8 AA-2)
                raise AssociationEnded(f"{association.peer} aborted before its A-ASSOCIATE-RQ")
            if received[0] != A_ASSOCIATE_RQ_PDU:
                if not A_ASSOCIATE_RQ_PDU <= received[0] <= A_ABORT_PDU:
                    raise ProtocolError(f"unknown PDU type 0x{received[0]:02X}", ABORT_UNRECOGNIZED_PDU)
                raise ProtocolError(f"a PDU of type 0x{received[0]:02X} before A-ASSOCIATE-RQ", ABORT_UNEXPECTED_PDU)
            pdu_type, pdu = association.read_pdu(settings["handshake_timeout"])  # whole already, or too long
            try:
                request = _decode_association_request(pdu, address)
            except Exception as error:
                raise ProtocolError(f"an undecodable A-ASSOCIATE-RQ: {_pdu_error_text(error)}") from None
            association.calling_aet, association.called_aet = request.calling_aet, request.called_aet
            if isinstance(sock, ssl.SSLSocket):
                request.certificate_name = _certificate_name(sock)
            association.peer_aet = request.calling_aet
            rejection = self._protocol_rejection(request) or self.judge(request)
            if not rejection:
                with self._lock:
                    if len(self.associations) >= settings["max_associations"]:
                        rejection = REJECT_LOCAL_LIMIT
                    else:
                        self.associations.add(association)
                        slot = True
                if rejection:
                    self.log.warning("refused an association from %s at %s:%d: %s: max_associations = %d",
                                     request.calling_aet, *address, REJECT_REASONS[rejection], settings["max_associations"])
            if rejection:
                self._reject(association, request, rejection)
                return
            self._accept(association, request, settings)
            ending = serve_to_end(association, self.serve, self.log)
        except ProtocolError as error:
            self.log.warning("aborted the association with %s: %s", association.peer, error)
            ending = functools.partial(association.abort, error.reason)
        except PeerTimedOut as error:
            self.log.warning("aborted the association with %s: %s", association.peer, error)
            ending = association.abort
        except AssociationEnded as error:
            self.log.info("association with %s ended: %s", association.peer, error)
        finally:
            if slot:  # free before the wait for the peer to close: it may take seconds
                with self._lock:
                    self.associations.discard(association)
            ending()

    @staticmethod
    def _protocol_rejection(request: AssociationRequest):
        if not request.protocol_version & 1:
            return REJECT_PROTOCOL_VERSION
        if request.application_context != APPLICATION_CONTEXT:
            return REJECT_APPLICATION_CONTEXT
        return None

    def _reject(self, association: Association, request: AssociationRequest, rejection: tuple):
        primitive = A_ASSOCIATE()
        primitive.result, primitive.result_source, primitive.diagnostic = rejection
        with contextlib.suppress(AssociationEnded):
            association.send_pdu(A_ASSOCIATE_RJ, primitive)
        association.close(wait_for_peer=PEER_CLOSE_WAIT)

    def _accept(self, association: Association, request: AssociationRequest, settings: dict):
        supported = self.contexts(request)
        # The same request negotiated against the same contexts gives the same answer: kept for
        # the next association of the same peer (a viewer's hundred contexts take milliseconds).
        key = (request.pdu, settings["max_pdu"],
               tuple((c.abstract_syntax, tuple(c.transfer_syntax), c.scu_role, c.scp_role) for c in supported))
        with self._lock:
            negotiated = self._negotiated.get(key)
        if negotiated is None:
            negotiated = self._negotiate(request, supported, settings)
            with self._lock:
                if len(self._negotiated) >= self.NEGOTIATIONS_KEPT:
                    self._negotiated.pop(next(iter(self._negotiated)))
                self._negotiated[key] = negotiated
        association.contexts, accept_pdu = negotiated
        association.roles = request.roles
        association.peer_implementation = request.implementation_version_name or request.implementation_class_uid
        association.set_peer_max_pdu(request.max_pdu)
        association.send(accept_pdu)
        association.is_established = True

    @staticmethod
    def _negotiate(request: AssociationRequest, supported: list, settings: dict) -> tuple[dict, bytes]:
        """The accepted contexts by ID, and the A-ASSOCIATE-AC that says so."""
        contexts, role_items = negotiate_as_acceptor(request.contexts, supported, request.roles)
        accepted = {context.context_id: context for context in contexts if context.result == 0x00}
        primitive = A_ASSOCIATE()
        primitive.application_context_name = APPLICATION_CONTEXT
        primitive.calling_ae_title = request.primitive.calling_ae_title
        primitive.called_ae_title = request.primitive.called_ae_title
        primitive.result, primitive.result_source = 0x00, 0x01
        primitive.presentation_context_definition_results_list = contexts
        user_information = _user_information(settings["max_pdu"]) + list(role_items)
        if getattr(request, "asynchronous_operations", False):
            window = AsynchronousOperationsWindowNegotiation()  # one operation at a time, each way
            window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 1
            user_information.append(window)
        primitive.user_information = user_information
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(primitive)
        return accepted, pdu.encode()

    def abort_all(self):
        """A-ABORT every association under way (at shutdown, after their grace)."""
        with self._lock:
            associations = list(self.associations)
        for association in associations:
            association.abort(wait_for_peer=0)  # from another thread than the association's: no reads here


class AssociationRefused(Exception):
    """The peer would not associate: rejected (the reason says how) or did not answer."""

    def __init__(self, message: str, rejected: bool = False):
        super().__init__(message)
        self.rejected = rejected


def request_association(host: str, port: int, *, calling_aet: str, called_aet: str, contexts: list,
                        max_pdu: int, max_pdu_send: int, connect_timeout: float, acse_timeout: float,
                        timeout: float, log: logging.Logger, roles=(), tls: ssl.SSLContext | None = None) -> Association:
    """Open an association with host:port proposing contexts (pynetdicom PresentationContexts,
    IDs assigned here); AssociationRefused if it cannot be had: no connection within
    connect_timeout, no answer to the request within acse_timeout. timeout: the network timeout
    of the association once it is up. tls: a client-side ssl.SSLContext for DICOM TLS, whose
    handshake (the peer's certificate checked against host) is done within connect_timeout."""
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout or None)
    except OSError as error:
        raise AssociationRefused(f"cannot connect to {host}:{port}: {error.strerror or error}") from None
    if tls:
        try:
            sock = tls.wrap_socket(sock, server_hostname=host)
        except (ssl.SSLError, ssl.CertificateError, OSError) as error:
            sock.close()
            raise AssociationRefused(f"TLS handshake with {host}:{port} failed:"
                                     f" {getattr(error, 'verify_message', None) or getattr(error, 'reason', None) or error}") from None
    association = Association(sock, (host, port), max_receive=max_pdu, max_send_limit=max_pdu_send,
                              timeout=timeout, log=log)
    association.calling_aet, association.called_aet = calling_aet, called_aet
    association.peer_aet = called_aet
    proposed = []
    for number, context in enumerate(contexts[:128]):
        context.context_id = 2 * number + 1
        proposed.append(context)
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title, primitive.called_ae_title = calling_aet, called_aet
    primitive.presentation_context_definition_list = proposed
    user_information = _user_information(max_pdu)
    for sop_class, scu_role, scp_role in roles:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid, role.scu_role, role.scp_role = sop_class, scu_role, scp_role
        user_information.append(role)
    primitive.user_information = user_information
    try:
        association.send_pdu(A_ASSOCIATE_RQ, primitive)
        try:
            pdu_type, pdu = association.read_pdu(acse_timeout)
        except TimeoutError:
            raise AssociationRefused(f"{called_aet} at {host}:{port} did not answer the A-ASSOCIATE-RQ") from None
        if pdu_type == A_ASSOCIATE_RJ_PDU:
            reply = A_ASSOCIATE_RJ()
            reply.decode(pdu)
            rejection = (reply.result, reply.source, reply.reason_diagnostic)
            raise AssociationRefused(f"{called_aet} at {host}:{port} rejected the association:"
                                     f" {REJECT_REASONS.get(rejection, rejection)}", rejected=True)
        if pdu_type != A_ASSOCIATE_AC_PDU:
            raise ProtocolError(f"a PDU of type 0x{pdu_type:02X} instead of A-ASSOCIATE-AC", ABORT_UNEXPECTED_PDU)
        reply = A_ASSOCIATE_AC()
        reply.decode(pdu)
        accepted = reply.to_primitive()
        peer_roles = {str(item.sop_class_uid): (item.scu_role, item.scp_role) for item in accepted.user_information
                      if isinstance(item, SCP_SCU_RoleSelectionNegotiation)}
        negotiated = negotiate_as_requestor(proposed, accepted.presentation_context_definition_results_list, peer_roles)
        association.contexts = {context.context_id: context for context in negotiated if context.result == 0x00}
        association.set_peer_max_pdu(next((item.maximum_length_received or 0 for item in accepted.user_information
                                           if isinstance(item, MaximumLengthNotification)), 0))
        association.is_established = True
        return association
    except AssociationRefused:
        association.close()
        raise
    except ProtocolError as error:
        association.abort(error.reason)
        raise AssociationRefused(f"{called_aet} at {host}:{port}: {error}") from None
    except AssociationEnded as error:
        association.close()
        raise AssociationRefused(f"{called_aet} at {host}:{port}: {error}") from None
    except Exception as error:  # an undecodable answer
        association.abort(ABORT_INVALID_PARAMETER)
        raise AssociationRefused(f"{called_aet} at {host}:{port} sent an undecodable answer: {_pdu_error_text(error)}") from None


def _sending_context(association: Association, sop_class: str, transfer_syntax: str, as_acceptor: bool):
    """The accepted context to send an instance of sop_class stored in transfer_syntax on: one of
    its own transfer syntax, else (for an uncompressed little endian object) one the data set can be
    re-encoded to. (context, re-encode?) or (None, False)."""
    convertible = None
    for context in association.contexts.values():
        if context.abstract_syntax != sop_class or (as_acceptor and not context.as_scu):
            continue
        accepted = context.transfer_syntax[0]
        if accepted == transfer_syntax:
            return context, False
        if (convertible is None and transfer_syntax in CONVERTIBLE_TRANSFER_SYNTAXES
                and accepted in CONVERTIBLE_TRANSFER_SYNTAXES):
            convertible = context
    return convertible, convertible is not None


def conversion_target(association: Association, sop_class: str, transfer_syntax: str, as_acceptor: bool) -> str | None:
    """The transfer syntax an instance of sop_class stored in transfer_syntax must be converted to
    (in a codec worker) before it can go, or None when it goes as stored or cannot go at all.
    Decompressing comes first (Explicit VR Little Endian, re-encoded to Implicit VR if that is
    what was accepted), then a lossless encoding the peer accepted. A retrieve SCP may send in any
    transfer syntax the store association accepted (PS3.4 C.4.2.3, C.4.3.3: the SCPs' behaviour)."""
    if _sending_context(association, sop_class, transfer_syntax, as_acceptor)[0] is not None:
        return None
    if _sending_context(association, sop_class, pydicom.uid.ExplicitVRLittleEndian, as_acceptor)[0] is not None:
        return pydicom.uid.ExplicitVRLittleEndian
    return next((encoding for encoding in LOSSLESS_ENCODINGS
                 if _sending_context(association, sop_class, encoding, as_acceptor)[0] is not None), None)


def send_c_store(association: Association, sop_class: str, sop_instance: str, transfer_syntax: str, data_set: bytes,
                 *, as_acceptor=False, move_originator: tuple = ()) -> int:
    """C-STORE one data set (encoded in transfer_syntax) and wait for the response: its status.
    Raises ValueError when no accepted context can carry it, AssociationEnded when the association fails."""
    context, reencode = _sending_context(association, sop_class, transfer_syntax, as_acceptor)
    if context is None:
        raise ValueError(f"no accepted presentation context for {sop_class} in {transfer_syntax}")
    if reencode:
        accepted = pydicom.uid.UID(context.transfer_syntax[0])
        source = pydicom.uid.UID(transfer_syntax)
        dataset = pynetdicom_decode(io.BytesIO(data_set), source.is_implicit_VR, source.is_little_endian, source.is_deflated)
        data_set = pynetdicom_encode(dataset, accepted.is_implicit_VR, accepted.is_little_endian, accepted.is_deflated)
    request = DimseFields(MessageID=association.next_message_id(), AffectedSOPClassUID=sop_class,
                          AffectedSOPInstanceUID=sop_instance, Priority=0x0000, DataSet=io.BytesIO(data_set))
    message_id = request.MessageID
    if move_originator:
        request.MoveOriginatorApplicationEntityTitle, request.MoveOriginatorMessageID = move_originator
    association.send_message(C_STORE_RQ, request, context.context_id)
    while True:
        message = association.receive_message()  # a held C-CANCEL is not the response
        if message.kind is C_STORE_RSP and message.command_set.MessageIDBeingRespondedTo == message_id:
            return int(message.command_set.Status)
        if message.kind is C_CANCEL_RQ:  # a C-GET's cancel, arriving during its sub-operation
            association.hold(message)
            continue
        raise ProtocolError(f"{association.peer} answered a C-STORE with {message.kind.__name__}", ABORT_UNEXPECTED_PARAMETER)


def send_c_echo(association: Association) -> int:
    """C-ECHO on an association proposing Verification: the status answered."""
    context = next((c for c in association.contexts.values() if c.abstract_syntax == Verification), None)
    if context is None:
        raise ValueError("the peer did not accept the Verification SOP class")
    request = DimseFields(MessageID=association.next_message_id(), AffectedSOPClassUID=Verification)
    message_id = request.MessageID
    association.send_message(C_ECHO_RQ, request, context.context_id)
    message = association.read_message()
    if message.kind is not C_ECHO_RSP or message.command_set.MessageIDBeingRespondedTo != message_id:
        raise ProtocolError(f"{association.peer} answered a C-ECHO with {message.kind.__name__}", ABORT_UNEXPECTED_PARAMETER)
    return int(message.command_set.Status)


# ============================================================================================
# DICOM services: C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET, storage commitment, worklist, MPPS
# ============================================================================================

def _dicom_audit_result(status: int) -> str:
    """The audit result of a DIMSE request's final status: success, cancel and the warnings
    (0xBxxx) are ok, Not Authorized is refused, every other failure failed."""
    if status == NOT_AUTHORIZED:
        return AUDIT_REFUSED
    return AUDIT_OK if status in (SUCCESS, CANCELLED) or 0xB000 <= status <= 0xBFFF else AUDIT_FAILED


QUERY_RETRIEVE_SOP_CLASSES = (
    PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet,
)
FIND_SOP_CLASSES = frozenset(map(str, (PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind)))
MOVE_SOP_CLASSES = frozenset(map(str, (PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove)))
GET_SOP_CLASSES = frozenset(map(str, (PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet)))
WORKLIST_SOP_CLASS = str(ModalityWorklistInformationFind)
MPPS_SOP_CLASS = str(ModalityPerformedProcedureStep)
SOP_CLASS_NOT_SUPPORTED = 0x0122
SUBOPERATIONS_ALL_FAILED = 0xA702  # C-MOVE/C-GET: out of resources, unable to perform sub-operations
STORE_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})
MAX_SUBOPERATIONS = 65535  # the counts are US values


# Storage Commitment Push Model (PS3.4 Annex J): its well-known SOP instance, the one action
# (request commitment) and the two events (all committed; some failed), and why an instance failed.
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_STORAGE_COMMITMENT = 1  # Action Type ID
COMMITMENT_SUCCEEDED, COMMITMENT_FAILED = 1, 2  # Event Type IDs
PROCESSING_FAILURE = 0x0110  # Failure Reason: the instance is there but cannot be vouched for
NO_SUCH_OBJECT_INSTANCE = 0x0112  # Failure Reason: not in the archive; N-ACTION: not the well-known instance
CLASS_INSTANCE_CONFLICT = 0x0119  # Failure Reason: stored, but as another SOP class
# N-ACTION failure statuses (PS3.7 10.1.4.1.10, C.4.4)
NO_SUCH_ACTION_TYPE = 0x0123
MISSING_ATTRIBUTE = 0x0120
INVALID_ARGUMENT_VALUE = 0x0115

#: The service each query/retrieve SOP class belongs to, as [modalities] allow= names it.
QUERY_RETRIEVE_SERVICES = {
    str(sop_class): service for service, classes in (
        ("find", (PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind)),
        ("move", (PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove)),
        ("get", (PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet)),
    ) for sop_class in classes
}
#: The service of every SOP class an AE may be refused ([modalities] allow=), and how a log names it.
SERVICE_OF_SOP_CLASS = {**QUERY_RETRIEVE_SERVICES, str(StorageCommitmentPushModel): "commitment",
                        WORKLIST_SOP_CLASS: "worklist", MPPS_SOP_CLASS: "mpps"}
SERVICE_NAMES = {"find": "C-FIND", "move": "C-MOVE", "get": "C-GET", "commitment": "Storage Commitment",
                 "worklist": "worklist C-FIND", "mpps": "MPPS"}


class DicomServices:
    """The DICOM listener (the association engine above): verification, storage and query/retrieve;
    and the associations dicoogled opens (C-MOVE destinations, sending, the echo test)."""

    def __init__(self, config: Config, ingest: Ingest, finder: Finder, worklist: "Worklist",
                 codecs: "CodecWorkers | None" = None):
        check_pynetdicom_version(importlib.metadata.version("pynetdicom"))
        self.config, self.ingest, self.finder, self.worklist = config, ingest, finder, worklist
        #: Where a compressed instance is decompressed for a peer that accepts only uncompressed
        #: syntaxes: the codec workers (pixels are never decoded in the daemon's process).
        self.codecs = codecs
        self.log = logging.getLogger("dicoogled.dicom")
        #: callable(calling_aet, identifier) -> identifier, or an int status to refuse
        self.find_filter = None
        #: The audit log (AuditLog) that C-FIND, C-MOVE, C-GET and C-STORE are recorded in, if any.
        self.audit = None
        #: callable(calling_aet) -> the Visibility of its queries and retrieves ([dicom] calling_ae_access)
        self.visibility_of_ae = lambda calling_aet: EVERYTHING
        self.acceptor = None
        self.port = None
        #: The DICOM TLS listener (tls_port), beside the plain one, and the port it has.
        self.tls_acceptor = None
        self.tls_port = None
        self._in_flight = 0
        self._in_flight_done = threading.Condition()
        self._listener_lock = threading.Lock()  # held while the listener opens, moves or closes
        #: The non-storage services offered; storage contexts are added per association.
        self._service_contexts = [build_context(uid, list(UNCOMPRESSED_TRANSFER_SYNTAXES))
                                  for uid in (Verification, *QUERY_RETRIEVE_SOP_CLASSES, StorageCommitmentPushModel,
                                              WORKLIST_SOP_CLASS, MPPS_SOP_CLASS)]
        self._service_classes = {str(context.abstract_syntax) for context in self._service_contexts}
        #: The worker processes storage associations are handed to ([dicom] workers), while the listener is open.
        self.workers: "AssociationWorkers | None" = None

    def set_ae_title(self, aet: str):
        """Answer to aet from the next association on (and call others by it)."""
        with self._listener_lock:
            self.config.aet = aet

    @property
    def running(self) -> bool:
        return self.acceptor is not None

    def connections(self) -> dict:
        """Associations under way, and connections still to send their A-ASSOCIATE-RQ."""
        acceptor, tls_acceptor = self.acceptor, self.tls_acceptor
        return {"associations": len(acceptor.associations) if acceptor else 0,
                "waiting": (acceptor.waiting if acceptor else 0) + (tls_acceptor.waiting if tls_acceptor else 0)}

    def _settings(self) -> dict:
        """The limits for the next association: read live, so a change applies from the next one."""
        config = self.config
        return {"max_associations": config.max_associations, "max_pdu": config.max_pdu,
                "max_pdu_send": config.max_pdu_send, "handshake_timeout": config.association_request_timeout,
                "timeout": config.network_timeout}

    def _listen(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> AssociationAcceptor:
        try:
            return AssociationAcceptor(host, port, settings=self._settings, judge=self._judge,
                                       contexts=self._supported_contexts, serve=self._serve, log=self.log,
                                       tls=tls, sharing=self.acceptor)
        except OSError as error:
            raise OSError(error.errno, f"cannot listen for DICOM{' TLS' if tls else ''} on {host}:{port}: {error.strerror}") from None

    def start(self) -> bool:
        """Open the listener on the configured host and port (and the TLS one on tls_port, if
        set); False if it was open already."""
        with self._listener_lock:
            if self.acceptor:
                return False
            self.acceptor = self._listen(self.config.dicom_host, self.config.dicom_port)
            self.port = self.acceptor.address[1]
            if self.config.tls_port:
                try:
                    self.tls_acceptor = self._listen(self.config.dicom_host, self.config.tls_port,
                                                     tls_server_context(self.config))
                except OSError:
                    self.acceptor.shutdown()
                    self.acceptor = self.port = None
                    raise
                self.tls_port = self.tls_acceptor.address[1]
            if self.config.dicom_workers and self.ingest.storage.scheme == "file":
                self.workers = AssociationWorkers(self.config.dicom_workers, {
                    "data_dir": str(self.config.data_dir), "node_dir": str(self.config.node_dir),
                    "fsync": self.ingest.storage.fsync,
                    "log_level": self.config.log_level}, self.log)
        self.log.info("DICOM listening on %s:%d as %s", self.config.dicom_host, self.port, self.config.aet)
        if self.tls_port:
            self.log.info("DICOM TLS listening on %s:%d (TLS %s or later%s)", self.config.dicom_host, self.tls_port,
                          self.config.tls_minimum_version,
                          ", client certificates required" if self.config.tls_ca_certificate else "")
        return True

    def move(self, host: str, port: int):
        """Listen on host:port instead, if the listener is open. Associations under way go on;
        if host:port cannot be had (a port in use), the old listener reopens and OSError says why."""
        with self._listener_lock:
            if not self.acceptor:
                return
            old_address = self.acceptor.address
            self.acceptor.shutdown()
            try:
                self.acceptor = self._listen(host, port)
            except OSError:
                self.acceptor = self._listen(*old_address)
                raise
            self.port = self.acceptor.address[1]
        self.log.info("DICOM listening on %s:%d as %s", host, self.port, self.config.aet)

    def stop(self, grace: float = 10):
        """Close the listener: let stores under way finish (up to grace seconds), then abort the rest.
        start() opens it again."""
        with self._listener_lock:
            acceptor, self.acceptor, self.port = self.acceptor, None, None
            tls_acceptor, self.tls_acceptor, self.tls_port = self.tls_acceptor, None, None
        if not acceptor:
            return
        acceptor.shutdown()
        if tls_acceptor:
            tls_acceptor.shutdown()
        with self._in_flight_done:
            self._in_flight_done.wait_for(lambda: self._in_flight == 0, timeout=grace)
        acceptor.abort_all()  # both ports' associations: they share one set
        workers, self.workers = self.workers, None
        if workers:
            workers.stop()  # they abort theirs
        self.log.info("DICOM listener closed")

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

    def services_of(self, calling_aet: str) -> frozenset[str]:
        """What calling_aet may ask for (DICOM_SERVICES): its [modalities] allow=, else everything."""
        return self.config.modality_services.get(calling_aet, frozenset(DICOM_SERVICES))

    def _calling_aets_allowed(self) -> list[str]:
        """The calling AE titles that may associate; empty: any. allowed_calling_aets wins when set.
        Read for each association, so a [modalities] entry added at run time counts from the next."""
        if self.config.allowed_calling_aets:
            return self.config.allowed_calling_aets
        return sorted(self.config.modalities) if self.config.refuse_unknown_calling_aets else []

    # ---- association negotiation -------------------------------------------------------------

    def _judge(self, request: AssociationRequest):
        """A rejection for an A-ASSOCIATE-RQ (result, source, reason), or None; logged either way,
        so an administrator can tell a refusal from a network fault."""
        calling, called = request.calling_aet, request.called_aet
        rejection, why = None, ""
        allowed = self._calling_aets_allowed()
        if allowed and calling not in allowed:
            rejection = REJECT_CALLING_AET
            why = ("not in allowed_calling_aets" if self.config.allowed_calling_aets
                   else "not under [modalities] (refuse_unknown_calling_aets)")
        elif (self.config.tls_certificate_names_ae and request.certificate_name
              and request.certificate_name != calling):
            rejection = REJECT_CALLING_AET
            why = f"its TLS certificate names {request.certificate_name!r} (tls_certificate_names_ae)"
        elif self.config.strict_called_aet and called != self.config.aet:
            rejection = REJECT_CALLED_AET
            why = f"it called us {called!r}, but our AE title is {self.config.aet!r} (strict_called_aet)"
        if rejection:
            self.log.warning("refused an association from %s at %s:%d: %s: %s", calling or "?", *request.address,
                             REJECT_REASONS[rejection], why)
        elif called and called != self.config.aet:
            self.log.warning(
                "%s called us as %r, but our AE title is %r: accepted anyway (set strict_called_aet to refuse)",
                calling, called, self.config.aet,
            )
        return rejection

    def _supported_contexts(self, request: AssociationRequest) -> list:
        """The contexts to negotiate: a query/retrieve service the calling AE may not use is not
        offered to it, so its presentation contexts are refused (abstract syntax not supported)
        before any request."""
        services = self.services_of(request.calling_aet)
        refused = {uid for uid, service in SERVICE_OF_SOP_CLASS.items() if service not in services}
        asked = sorted({SERVICE_OF_SOP_CLASS[str(c.abstract_syntax)] for c in request.contexts
                        if str(c.abstract_syntax) in refused})
        if asked:
            self.log.warning("refused %s to %s at %s:%d: [modalities] %s allows only %s",
                             "/".join(SERVICE_NAMES[s] for s in asked), request.calling_aet, *request.address,
                             request.calling_aet, ",".join(s for s in DICOM_SERVICES if s in services) or "none")
        return [context for context in self._service_contexts if str(context.abstract_syntax) not in refused] \
            + self._storage_contexts(request.contexts)

    def _storage_contexts(self, proposed) -> list:
        """Contexts to accept for the storage SOP classes a requestor proposes.

        Every storage class is accepted, private and unknown ones included, in the transfer
        syntaxes the configuration allows: a context proposing none of them is refused at
        negotiation (result 4). Roles are granted as proposed, so a C-GET client that offers the
        SCP role gets it, and one that does not is not sent C-STOREs it never agreed to."""
        contexts, seen = [], set()
        for context in proposed:
            uid = str(context.abstract_syntax)
            if uid in seen or uid in self._service_classes:
                continue
            seen.add(uid)
            supported = _storage_context(uid, tuple(self.config.transfer_syntaxes.get(uid) or ACCEPTED_TRANSFER_SYNTAXES))
            if supported:
                contexts.append(supported)
        return contexts

    # ---- the acceptor's side of an association -----------------------------------------------

    def _serve(self, association: Association):
        """Answer an association's requests, one message at a time, until the peer releases it
        (PeerReleased) or it ends (AssociationEnded). A storage association goes to a worker
        process, if there are some ([dicom] workers); this thread then commits what it stores."""
        workers = self.workers
        if workers and self._may_hand_over(association):
            if workers.serve(association, self._service_classes, functools.partial(self._commit_handed_over, association)):
                return
        while True:
            self._dispatch(association, association.read_message())

    def _may_hand_over(self, association: Association) -> bool:
        """Whether a worker process can serve the association: plain TCP (a TLS session cannot
        change process), and only storage and verification contexts accepted (the other
        services need the index, the plugins and the codecs, which are here)."""
        return not isinstance(association.sock, ssl.SSLSocket) and all(
            str(context.abstract_syntax) == str(Verification) or str(context.abstract_syntax) not in self._service_classes
            for context in association.contexts.values())

    def _commit_handed_over(self, association: Association, received: "ReceivedObject") -> tuple[int, str]:
        """Commit an object a worker process received on association: (status, reason)."""
        try:
            status = self._on_store_received(association.calling_aet, received)
        except Exception:  # a bug, not the peer's fault: a failure, and the association goes on (as _dispatch)
            self.log.exception("C_STORE_RQ from %s failed", association.peer)
            status = UNABLE_TO_PROCESS
        return int(status), getattr(status, "reason", "")

    def _dispatch(self, association: Association, message: DimseMessage):
        if message.kind is C_CANCEL_RQ:
            return  # for a request already answered
        if message.kind is N_EVENT_REPORT_RSP:  # the answer to a Storage Commitment report we sent
            self._on_event_report_response(association, message.command_set)
            return
        if message.kind not in self._handlers:
            raise ProtocolError(f"{association.peer} sent {message.kind.__name__}, a service dicoogled does not offer",
                                ABORT_UNEXPECTED_PARAMETER)
        handler, response_class, sop_classes = self._handlers[message.kind]
        command, context = message.command_set, association.contexts[message.context_id]
        request = DimseRequest(
            association=association, context_id=message.context_id, message_id=command.MessageID,
            # N-SET and N-ACTION name their object by the Requested SOP Class and Instance UIDs (PS3.7 10.3)
            sop_class_uid=str(command.AffectedSOPClassUID or command.RequestedSOPClassUID or ""),
            transfer_syntax=str(context.transfer_syntax[0]), data=message.data_set,
            sop_instance_uid=str(command.get("AffectedSOPInstanceUID") or command.get("RequestedSOPInstanceUID") or ""),
            move_destination=str(command.get("MoveDestination") or ""), priority=command.get("Priority") or 0,
            command_set=command)
        abstract_syntax = str(context.abstract_syntax)
        offered = abstract_syntax in sop_classes if sop_classes else abstract_syntax not in self._service_classes
        if not offered or request.sop_class_uid != abstract_syntax:
            self.log.warning("%s sent a %s for %s on a context for %s: refused", association.peer,
                             message.kind.__name__, request.sop_class_uid, abstract_syntax)
            return self._send_response(request, self._response_primitive(request, response_class, SOP_CLASS_NOT_SUPPORTED))
        try:
            handler(request)
        except (AssociationEnded, PeerReleased):
            raise
        except Exception:  # a bug, not the peer's fault: answer a failure and keep the association
            self.log.exception("%s from %s failed", message.kind.__name__, association.peer)
            self._send_response(request, self._response_primitive(request, response_class, UNABLE_TO_PROCESS))

    @functools.cached_property
    def _handlers(self) -> dict:
        """DIMSE request message -> (its handler, its response primitive, the SOP classes it serves;
        None: the storage classes). Made once: it is asked for every message."""
        return {C_ECHO_RQ: (self._answer_echo, C_ECHO, {str(Verification)}),
                C_STORE_RQ: (self._answer_store, C_STORE, None),
                C_FIND_RQ: (self._answer_find, C_FIND, FIND_SOP_CLASSES | {WORKLIST_SOP_CLASS}),
                C_MOVE_RQ: (self._answer_move, C_MOVE, MOVE_SOP_CLASSES),
                C_GET_RQ: (self._answer_get, C_GET, GET_SOP_CLASSES),
                N_ACTION_RQ: (self._answer_action, N_ACTION, {str(StorageCommitmentPushModel)}),
                N_CREATE_RQ: (self._answer_create, N_CREATE, {MPPS_SOP_CLASS}),
                N_SET_RQ: (self._answer_set, N_SET, {MPPS_SOP_CLASS})}

    @staticmethod
    def _response_primitive(request: DimseRequest, primitive_class, status: int):
        """A response with status; a failure's reason (DicomStatus) is its Error Comment."""
        response = DimseFields(kind=primitive_class, MessageIDBeingRespondedTo=request.message_id,
                               AffectedSOPClassUID=request.sop_class_uid, Status=int(status))
        reason = getattr(status, "reason", "")
        if reason and status not in (SUCCESS, PENDING, PENDING_OPTIONAL_KEYS_UNSUPPORTED):
            # Error Comment is LO: 64 characters of the default repertoire, no backslash.
            response.ErrorComment = reason.encode("ascii", "replace").decode().replace("\\", "/")[:64]
        return response

    @staticmethod
    def _send_response(request: DimseRequest, response):
        message_class = {C_ECHO: C_ECHO_RSP, C_STORE: C_STORE_RSP, C_FIND: C_FIND_RSP,
                         C_MOVE: C_MOVE_RSP, C_GET: C_GET_RSP, N_ACTION: N_ACTION_RSP,
                         N_CREATE: N_CREATE_RSP, N_SET: N_SET_RSP}[response.kind]
        request.association.send_message(message_class, response, request.context_id)

    def _encode(self, request: DimseRequest, dataset: Dataset) -> io.BytesIO:
        syntax = pydicom.uid.UID(request.transfer_syntax)
        return io.BytesIO(pynetdicom_encode(dataset, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated))

    def _audit(self, request: DimseRequest, action: str, status: int, **what):
        """The audit entry of a DIMSE request: the calling AE and its address, its final status
        (success, cancel and the warnings 0xBxxx are ok, Not Authorized refused, every other
        failure failed), and what it touched (AuditLog.record's studies, instances, count, detail)."""
        if getattr(self, "audit", None) is None:  # a worker process's services have none
            return
        status = int(status)
        result = _dicom_audit_result(status)
        # A calling AE mapped to a user ([dicom] calling_ae_access) acts as that user; a group is no one.
        kind, name = self.config.calling_ae_access.get(request.calling_aet, ("", ""))
        self.audit.record(action, result, f"0x{status:04X}", user=name if kind == "user" else "",
                          calling_aet=request.calling_aet, address=request.association.address[0], **what)

    def _answer_echo(self, request: DimseRequest):
        self._send_response(request, self._response_primitive(request, C_ECHO, SUCCESS))

    def _answer_store(self, request: DimseRequest):
        status = self._on_store(request)
        self._audit(request, "c-store", status, studies=getattr(status, "study_uid", ""),
                    instances=request.sop_instance_uid, count=1)
        response = self._response_primitive(request, C_STORE, status)
        response.AffectedSOPInstanceUID = request.sop_instance_uid
        self._send_response(request, response)

    def _answer_find(self, request: DimseRequest):
        worklist = request.sop_class_uid == WORKLIST_SOP_CLASS
        answers = self._on_worklist_find if worklist else self._on_find
        matches = 0
        for status, identifier in answers(request):
            response = self._response_primitive(request, C_FIND, status)
            if status in (PENDING, PENDING_OPTIONAL_KEYS_UNSUPPORTED):
                response.Identifier = io.BytesIO(identifier)  # encoded by the finder
                self._send_response(request, response)  # at once: the peer sees each match as it is found
                matches += 1
                continue
            self._audit_find(request, worklist, status, matches)
            self._send_response(request, response)
            return
        self._audit_find(request, worklist, SUCCESS, matches)
        self._send_response(request, self._response_primitive(request, C_FIND, SUCCESS))

    def _audit_find(self, request: DimseRequest, worklist: bool, status: int, matches: int):
        """A C-FIND's audit entry: its level (or worklist), the study it names if it names one
        by UID, and the number of matches; never the values it matched on (a patient's name)."""
        try:
            identifier = request.identifier
            level = "worklist" if worklist else str(identifier.get("QueryRetrieveLevel", ""))
            studies = [] if worklist else [uid for uid in identifier_keys(identifier).get("StudyInstanceUID", "").split("\\") if is_valid_uid(uid)]
        except Exception:  # an identifier that cannot be read was refused, and is recorded all the same
            level, studies = "", []
        self._audit(request, "c-find", status, studies=studies, count=matches, detail=level)

    # ---- Storage Commitment Push Model (PS3.4 Annex J) ----------------------------------------

    def _answer_action(self, request: DimseRequest):
        """N-ACTION "request storage commitment": answered at once; the instances are checked
        and the N-EVENT-REPORT sent from a thread of its own, so a long request does not hold
        the association's reading."""
        status, transaction_uid, referenced = self._commitment_request(request)
        response = self._response_primitive(request, N_ACTION, status)
        response.AffectedSOPInstanceUID = request.sop_instance_uid
        if status == SUCCESS:
            response.ActionTypeID = REQUEST_STORAGE_COMMITMENT
        self._send_response(request, response)
        if status == SUCCESS:
            self.log.info("storage commitment %s from %s: %d instances to check", transaction_uid,
                          request.calling_aet, len(referenced))
            start_thread(f"commitment-{transaction_uid}", self._commit_tracked, request.association,
                         request.transfer_syntax, transaction_uid, referenced)

    def _commitment_request(self, request: DimseRequest) -> tuple[int, str, list]:
        """(status, Transaction UID, [(SOP class, SOP instance)]) of an N-ACTION: SUCCESS, or the
        failure status that refuses it, with its reason."""
        calling = request.calling_aet
        if "commitment" not in self.services_of(calling):  # its context is refused at negotiation already
            return DicomStatus(NOT_AUTHORIZED, f"{calling} may not ask for commitment ([modalities] allow=)"), "", []
        if request.sop_instance_uid != STORAGE_COMMITMENT_INSTANCE:
            return DicomStatus(NO_SUCH_OBJECT_INSTANCE, f"not the well-known {STORAGE_COMMITMENT_INSTANCE}"), "", []
        action_type = request.command_set.ActionTypeID
        if action_type != REQUEST_STORAGE_COMMITMENT:
            return DicomStatus(NO_SUCH_ACTION_TYPE, f"action type {action_type} (only 1, request commitment)"), "", []
        try:
            information = request.identifier
        except Exception as error:
            self.log.warning("storage commitment from %s: cannot read the request: %s", calling, error)
            return DicomStatus(INVALID_ARGUMENT_VALUE, "the action information cannot be read"), "", []
        transaction_uid = str(information.get("TransactionUID") or "").strip()
        if not transaction_uid:
            return DicomStatus(MISSING_ATTRIBUTE, "no Transaction UID (0008,1195)"), "", []
        if "ReferencedSOPSequence" not in information:
            return DicomStatus(MISSING_ATTRIBUTE, "no Referenced SOP Sequence (0008,1199)"), "", []
        referenced = [(str(item.get("ReferencedSOPClassUID") or ""), str(item.get("ReferencedSOPInstanceUID") or ""))
                      for item in information.ReferencedSOPSequence]
        if not referenced or not all(sop_class and sop_instance for sop_class, sop_instance in referenced):
            return DicomStatus(INVALID_ARGUMENT_VALUE, "a Referenced SOP Sequence item without its UIDs"), "", []
        return SUCCESS, transaction_uid, referenced

    def commitment_failure(self, sop_class: str, sop_instance: str) -> int | None:
        """Why this archive cannot commit to keeping an instance (a Failure Reason), or None
        when it can: it is indexed as sop_class, its file is there, unchanged since it was indexed
        (size and modification time: the index keeps no checksum), and parses as the same instance."""
        found = self.ingest.index.instance(sop_instance)
        if found is None:
            return NO_SUCH_OBJECT_INSTANCE
        if found.sop_class_uid != sop_class:
            return CLASS_INSTANCE_CONFLICT
        try:
            data = self.ingest.storage.read(found.path)
            if location_scheme(found.path) == "file":
                status = os.stat(found.path)
                unchanged = (status.st_size, status.st_mtime_ns) == (found.size, found.mtime_ns)
            else:
                unchanged = len(data) == found.size
            dataset = pydicom.dcmread(io.BytesIO(data), force=True)
            parsed = str(dataset.get("SOPInstanceUID", "")) == sop_instance
        except Exception as error:  # a missing file, a storage plugin's failure, a file that no longer parses
            self.log.warning("storage commitment: %s cannot be read: %s", sop_instance, error)
            return PROCESSING_FAILURE
        if not (unchanged and parsed):
            self.log.warning("storage commitment: %s changed since it was indexed", sop_instance)
            return PROCESSING_FAILURE
        return None

    def _commit_tracked(self, *args):
        """_commit, counted as work in flight: stopping the listener lets a report under way go out."""
        with self._tracked():
            self._commit(*args)

    def _commit(self, association: Association, transfer_syntax: str, transaction_uid: str, referenced: list):
        """Check each referenced instance and report the outcome (N-EVENT-REPORT): on the
        request's association while it is open, else on one we open to the requestor (PS3.4 J.3.3)."""
        report = Dataset()
        report.TransactionUID = transaction_uid
        report.RetrieveAETitle = self.config.aet
        committed, failed = [], []
        for sop_class, sop_instance in referenced:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
            reason = self.commitment_failure(sop_class, sop_instance)
            if reason is None:
                committed.append(item)
            else:
                item.FailureReason = reason
                failed.append(item)
        if committed:
            report.ReferencedSOPSequence = committed
        if failed:
            report.FailedSOPSequence = failed
        event_type = COMMITMENT_FAILED if failed else COMMITMENT_SUCCEEDED
        self.log.info("storage commitment %s for %s: %d committed, %d failed", transaction_uid,
                      association.peer_aet, len(committed), len(failed))
        with association.send_lock:
            if association.is_established:
                with contextlib.suppress(AssociationEnded):
                    self._send_event_report(association, transfer_syntax, event_type, report)
                    return
        self._report_on_new_association(association.peer_aet, event_type, report)

    def _send_event_report(self, association: Association, transfer_syntax: str, event_type: int, report: Dataset):
        """Send the N-EVENT-REPORT-RQ on an association with a Storage Commitment context; its
        response is read by whoever reads the association."""
        context = next((c for c in association.contexts.values() if c.abstract_syntax == StorageCommitmentPushModel), None)
        if context is None:
            raise ValueError("the peer did not accept the Storage Commitment Push Model SOP class")
        syntax = pydicom.uid.UID(context.transfer_syntax[0] or transfer_syntax)
        event = DimseFields(MessageID=association.next_message_id(), AffectedSOPClassUID=StorageCommitmentPushModel,
                            AffectedSOPInstanceUID=STORAGE_COMMITMENT_INSTANCE, EventTypeID=event_type,
                            EventInformation=io.BytesIO(pynetdicom_encode(report, syntax.is_implicit_VR,
                                                                          syntax.is_little_endian, syntax.is_deflated)))
        association.send_message(N_EVENT_REPORT_RQ, event, context.context_id)
        return event.MessageID

    def _report_on_new_association(self, aet: str, event_type: int, report: Dataset):
        """Open an association to aet ([modalities] gives its address) as the SCP of Storage
        Commitment (role selection, PS3.7 D.3.3.4) and send the report there."""
        if aet not in self.config.modalities:
            self.log.error("storage commitment %s: %s released before its report, and is not under [modalities]:"
                           " the report cannot be sent", report.TransactionUID, aet)
            return
        try:
            association = self._associate(
                aet, *self.config.modalities[aet],
                [build_context(StorageCommitmentPushModel, list(UNCOMPRESSED_TRANSFER_SYNTAXES))],
                roles=[(str(StorageCommitmentPushModel), False, True)])
        except AssociationRefused as error:
            self.log.error("storage commitment %s: cannot report to %s: %s", report.TransactionUID, aet, error)
            return
        try:
            context = next((c for c in association.contexts.values() if c.abstract_syntax == StorageCommitmentPushModel), None)
            if context is not None and not context.as_scp:
                # It should (PS3.4 J.3.3): many modalities take the report anyway, so it is sent.
                self.log.warning("storage commitment: %s did not accept our SCP role; reporting anyway", aet)
            message_id = self._send_event_report(association, "", event_type, report)
            message = association.read_message()
            if message.kind is not N_EVENT_REPORT_RSP or message.command_set.MessageIDBeingRespondedTo != message_id:
                raise ProtocolError(f"{association.peer} answered an N-EVENT-REPORT with {message.kind.__name__}",
                                    ABORT_UNEXPECTED_PARAMETER)
            self._on_event_report_response(association, message.command_set)
        except (AssociationEnded, PeerReleased, ValueError) as error:
            self.log.error("storage commitment %s: the report to %s failed: %s", report.TransactionUID, aet, error)
        finally:
            association.release()

    def _on_event_report_response(self, association: Association, command: DimseFields):
        status = int(command.Status if command.Status is not None else -1)
        if status == SUCCESS:
            self.log.info("storage commitment report taken by %s", association.peer)
        else:
            self.log.warning("%s answered a storage commitment report with status 0x%04X", association.peer, status & 0xFFFF)
    def _answer_create(self, request: DimseRequest):
        response = self._response_primitive(request, N_CREATE, self._on_create(request))
        response.AffectedSOPInstanceUID = request.sop_instance_uid
        self._send_response(request, response)

    def _answer_set(self, request: DimseRequest):
        response = self._response_primitive(request, N_SET, self._on_set(request))
        response.AffectedSOPInstanceUID = request.sop_instance_uid
        self._send_response(request, response)

    # ---- the handlers: plain requests in, statuses out ----------------------------------------

    def _store_refusal(self, calling: str) -> DicomStatus | None:
        """NOT_AUTHORIZED if calling may not store, else None."""
        if "store" in self.services_of(calling):
            return None
        self.log.warning("refused C-STORE to %s: [modalities] %s does not allow store", calling, calling)
        # Refused: Not Authorized, a C-STORE status (PS3.7 9.1.1.1.9, Annex C). The storage
        # contexts stay accepted at negotiation: a C-GET needs them to send instances back.
        return DicomStatus(NOT_AUTHORIZED, f"{calling} may not store ([modalities] allow=)")

    def _on_store_received(self, calling: str, received: "ReceivedObject") -> DicomStatus:
        """_on_store for an object a worker process has read and written to a temp file; its
        audit entry is made here, in the daemon (the worker's address is not known here)."""
        status = self._on_store_received_unaudited(calling, received)
        uids = list(received.uids or ()) + ["", "", ""]
        if self.audit is not None:
            result = _dicom_audit_result(int(status))
            kind, name = self.config.calling_ae_access.get(calling, ("", ""))
            self.audit.record("c-store", result, f"0x{int(status):04X}", user=name if kind == "user" else "",
                              calling_aet=calling, studies=uids[0], series=uids[1], instances=uids[2], count=1)
        return status

    def _on_store_received_unaudited(self, calling: str, received: "ReceivedObject") -> DicomStatus:
        with self._tracked():
            refusal = self._store_refusal(calling)
            if refusal is None and received.unreadable_command:
                self.log.warning("C-STORE from %s: cannot read the request: %s", calling, received.unreadable_command)
                refusal = CANNOT_UNDERSTAND
            if refusal is None:
                return self.ingest.commit_received(received, calling)
            if received.temp_name:
                with contextlib.suppress(OSError):
                    os.unlink(received.temp_name)
            return refusal

    def _on_store(self, request: DimseRequest) -> int:
        with self._tracked():
            calling = request.calling_aet
            refusal = self._store_refusal(calling)
            if refusal is not None:
                return refusal
            try:
                header = part10_header(request.sop_class_uid, request.sop_instance_uid,
                                       request.transfer_syntax, request.calling_aet)
                data = header + request.data
            except Exception as error:
                self.log.warning("C-STORE from %s: cannot read the request: %s", request.calling_aet, error)
                return CANNOT_UNDERSTAND
            return self.ingest.store_received(data, request.calling_aet)

    def _on_find(self, request: DimseRequest):
        """Yield (status, identifier) responses: pending ones with a match (encoded in the
        request's transfer syntax), then the final one."""
        calling = request.calling_aet
        try:
            identifier = request.identifier
            if self.find_filter:
                identifier = self.find_filter(calling, identifier)
                if isinstance(identifier, int):
                    self.log.info("C-FIND from %s refused by a plugin with 0x%04X", calling, identifier)
                    yield identifier, None
                    return
            level, _ = parse_identifier(identifier)
            if level == "PATIENT" and request.sop_class_uid == StudyRootQueryRetrieveInformationModelFind:
                raise QueryError("the Study Root model has no PATIENT level (use Patient Root)", IDENTIFIER_DOES_NOT_MATCH)
            count = 0
            visibility = self.visibility_of_ae(calling)
            for response in self.finder.search_encoded(identifier, request.transfer_syntax, request.is_cancelled,
                                                       visibility):
                yield PENDING, response
                count += 1
                if self.config.max_find_results and count >= self.config.max_find_results:
                    self.log.warning("C-FIND from %s stopped at max_find_results=%d", calling, count)
                    break
            if request.is_cancelled():
                yield CANCELLED, None
                return
            self.log.info("C-FIND from %s: %d matches", calling, count)
            yield SUCCESS, None
        except QueryError as error:
            self.log.warning("C-FIND from %s refused: %s", calling, error)
            yield DicomStatus(error.status, str(error)), None
        except Exception:
            self.log.exception("C-FIND from %s failed", calling)
            yield UNABLE_TO_PROCESS, None

    def _on_worklist_find(self, request: DimseRequest):
        """Yield (status, identifier) for a Modality Worklist C-FIND: the scheduled steps that
        match, then the final status. A calling AE limited to collections gets none: scheduled
        patients belong to no collection (as GET /worklist refuses such callers)."""
        calling = request.calling_aet
        if self.visibility_of_ae(calling).restricted:
            self.log.warning("worklist C-FIND from %s refused: its [dicom] calling_ae_access limits it to collections", calling)
            yield DicomStatus(UNABLE_TO_PROCESS, "the worklist is for callers who see the whole archive"), None
            return
        try:
            count = 0
            for response in self.worklist.find(request.identifier):
                if request.is_cancelled():
                    yield CANCELLED, None
                    return
                yield PENDING, self._encode(request, response).getvalue()
                count += 1
            self.log.info("worklist C-FIND from %s: %d matches", calling, count)
            yield SUCCESS, None
        except QueryError as error:
            self.log.warning("worklist C-FIND from %s refused: %s", calling, error)
            yield DicomStatus(error.status, str(error)), None
        except Exception:
            self.log.exception("worklist C-FIND from %s failed", calling)
            yield UNABLE_TO_PROCESS, None

    def _performed_step_attributes(self, request: DimseRequest, message: str) -> Dataset | int:
        """The data set of an N-CREATE or N-SET, or the status refusing it."""
        try:
            return request.identifier
        except Exception as error:
            self.log.warning("%s from %s: cannot read the data set: %s", message, request.calling_aet, error)
            return DicomStatus(PROCESSING_FAILURE, "the data set cannot be read")

    def _on_create(self, request: DimseRequest) -> int:
        """MPPS N-CREATE: a modality began a procedure step. The SCP gives it a UID when the
        modality leaves that to us (PS3.7 10.1.5.1.3), then answers with it."""
        attributes = self._performed_step_attributes(request, "N-CREATE")
        if isinstance(attributes, int):
            return attributes
        if not request.sop_instance_uid:
            request.sop_instance_uid = pydicom.uid.generate_uid()
        try:
            return self.worklist.create_performed_step(request.sop_instance_uid, attributes)
        except Exception:
            self.log.exception("MPPS N-CREATE from %s failed", request.calling_aet)
            return PROCESSING_FAILURE

    def _on_set(self, request: DimseRequest) -> int:
        """MPPS N-SET: the modality completed or discontinued the step, or changed its attributes."""
        attributes = self._performed_step_attributes(request, "N-SET")
        if isinstance(attributes, int):
            return attributes
        try:
            return self.worklist.set_performed_step(request.sop_instance_uid, attributes)
        except Exception:
            self.log.exception("MPPS N-SET from %s failed", request.calling_aet)
            return PROCESSING_FAILURE

    def _matched_instances(self, request: DimseRequest, service: str) -> list[IndexedInstance] | int:
        """The instances a C-MOVE or C-GET identifier matches, or the status refusing it."""
        try:
            return self.finder.instances(request.identifier, request.is_cancelled,
                                         self.visibility_of_ae(request.calling_aet))
        except QueryError as error:
            self.log.warning("%s from %s refused: %s", service, request.calling_aet, error)
            return DicomStatus(error.status, str(error))
        except Exception:
            self.log.exception("%s from %s: cannot read the identifier", service, request.calling_aet)
            return UNABLE_TO_PROCESS

    def _answer_move(self, request: DimseRequest):
        with self._tracked():
            destination_aet = request.move_destination.strip()
            calling = request.calling_aet
            instances = self._matched_instances(request, "C-MOVE")
            destination = self.config.modalities.get(destination_aet)
            if isinstance(instances, int):
                self._audit_retrieve(request, instances, [], 0)
                return self._send_response(request, self._response_primitive(request, C_MOVE, instances))
            if destination is None:
                self.log.warning(
                    "C-MOVE from %s to unknown destination %r: add it under [modalities] as %s = host:port",
                    calling, destination_aet, destination_aet or "AET",
                )
                self._audit_retrieve(request, MOVE_DESTINATION_UNKNOWN, instances, 0)
                return self._send_response(request, self._response_primitive(request, C_MOVE, MOVE_DESTINATION_UNKNOWN))
            if not instances:
                return self._retrieve(request, C_MOVE, [], None)
            try:
                store_association = self._associate(destination_aet, *destination, _contexts_for(instances))
            except AssociationRefused as error:
                self.log.warning("C-MOVE from %s: cannot associate with %s: %s", calling, destination_aet, error)
                self._audit_retrieve(request, MOVE_DESTINATION_UNKNOWN, instances, 0)
                return self._send_response(request, self._response_primitive(request, C_MOVE, MOVE_DESTINATION_UNKNOWN))
            try:
                self.log.info("C-MOVE from %s: %d instances to %s", calling, len(instances), destination_aet)
                self._retrieve(request, C_MOVE, instances, functools.partial(
                    self._store_sub_operation, store_association, as_acceptor=False,
                    move_originator=(calling, request.message_id)))
            finally:
                store_association.release()

    def _answer_get(self, request: DimseRequest):
        with self._tracked():
            instances = self._matched_instances(request, "C-GET")
            if isinstance(instances, int):
                self._audit_retrieve(request, instances, [], 0)
                return self._send_response(request, self._response_primitive(request, C_GET, instances))
            calling = request.calling_aet
            self.log.info("C-GET from %s: %d instances", calling, len(instances))
            # C-GET sends the instances back on the same association, which the SCU must accept
            # by proposing the SCP role (role selection); many viewers don't: the usual failure.
            roles = request.association.roles
            without_role = sorted({instance.sop_class_uid for instance in instances
                                   if not roles.get(instance.sop_class_uid, (None, None))[1]})
            if without_role:
                self.log.warning("C-GET from %s: it proposed no SCP role for %s, so it may refuse those instances;"
                                 " enable C-GET storage roles in the viewer or use C-MOVE", calling, ", ".join(without_role))
            self._retrieve(request, C_GET, instances, functools.partial(
                self._store_sub_operation, request.association, as_acceptor=True, move_originator=()))

    def _retrieve(self, request: DimseRequest, primitive_class, instances: list[IndexedInstance], store):
        """The C-STORE sub-operations of a C-MOVE or C-GET, a pending response after each, then
        the final one (PS3.4 C.4.2, C.4.3): store(instance, reasons=list) -> the C-STORE status, or None
        (appending why to the list)."""
        if len(instances) > MAX_SUBOPERATIONS:
            self.log.warning("%s from %s matches %d instances, more than one request can count (%d)",
                             "C-MOVE" if primitive_class is C_MOVE else "C-GET", request.calling_aet,
                             len(instances), MAX_SUBOPERATIONS)
            self._audit_retrieve(request, UNABLE_TO_PROCESS, instances, 0)
            return self._send_response(request, self._response_primitive(request, primitive_class, UNABLE_TO_PROCESS))
        remaining, completed, failed, warning = len(instances), 0, 0, 0
        failed_uids, reasons = [], []

        def response(status: int, with_remaining: bool, with_failed_list: bool):
            if status != PENDING:  # the final response: the request's audit entry, before the peer hears it
                self._audit_retrieve(request, status, instances, completed + warning)
            primitive = self._response_primitive(request, primitive_class, status)
            if with_remaining:
                primitive.NumberOfRemainingSuboperations = remaining
            primitive.NumberOfCompletedSuboperations = completed
            primitive.NumberOfFailedSuboperations = failed
            primitive.NumberOfWarningSuboperations = warning
            if with_failed_list:
                failed_list = Dataset()
                failed_list.FailedSOPInstanceUIDList = failed_uids
                primitive.Identifier = self._encode(request, failed_list)
            self._send_response(request, primitive)

        for instance in instances:
            if request.is_cancelled():
                return response(CANCELLED, True, True)
            status = store(instance, reasons=reasons)
            if status == SUCCESS:
                completed += 1
            elif status in STORE_WARNINGS:
                warning += 1
            else:
                failed += 1
                failed_uids.append(instance.sop_instance_uid)
            remaining -= 1
            response(PENDING, True, False)
        if not failed and not warning:
            return response(SUCCESS, False, False)
        status = SUBOPERATIONS_ALL_FAILED if failed == len(instances) else SUBOPERATIONS_FAILED
        if failed:
            # The requester sees the counts, the Failed SOP Instance UID List and the commonest
            # reason as Error Comment; the log says why for each distinct reason, once per request
            # (not once per instance), with how many instances it stopped and the first of them.
            service = "C-MOVE" if primitive_class is C_MOVE else "C-GET"
            by_reason = collections.Counter(reason for _, reason in reasons)
            why = "; ".join(f"{reason} [{count} instance(s), first {next(uid for uid, r in reasons if r == reason)}]"
                            for reason, count in by_reason.most_common())
            self.log.warning("%s from %s: %d of %d instances not sent%s", service, request.calling_aet, failed,
                             len(instances), f" ({why})" if why else "")
            if by_reason:
                status = DicomStatus(status, by_reason.most_common(1)[0][0])
        return response(status, False, True)

    def _audit_retrieve(self, request: DimseRequest, status: int, instances: list[IndexedInstance], sent: int):
        """A C-MOVE's or C-GET's audit entry: the instances it matched, how many were sent, and
        for a C-MOVE to which AE."""
        move = request.sop_class_uid in MOVE_SOP_CLASSES
        self._audit(request, "c-move" if move else "c-get", status,
                    instances=[instance.sop_instance_uid for instance in instances], count=len(instances),
                    detail=(f"to {request.move_destination.strip()}, " if move else "") + f"{sent} sent")

    def _store_sub_operation(self, association: Association, instance: IndexedInstance, *, as_acceptor: bool,
                             move_originator: tuple, reasons: list | None = None) -> int | None:
        """C-STORE one stored instance, converted first (in a codec worker: conversion_target) when
        the peer accepted no context for its stored transfer syntax: its status, or None when it
        could not be sent (and (SOPInstanceUID, why) appended to reasons)."""
        uid = instance.sop_instance_uid

        def not_sent(why: str):
            why = " ".join(why.split())  # a codec's message may run over lines: the log keeps one
            self.log.debug("cannot send %s to %s: %s", uid, association.peer, why)
            if reasons is not None:
                reasons.append((uid, why))

        if not association.is_established:
            return not_sent("the association with the destination ended")
        try:
            transfer_syntax, data_set = self._stored_data_set(instance)
        except Exception as error:
            self.log.error("cannot read %s for %s: %s", instance.path, uid, error)
            return not_sent("its file cannot be read")
        target = conversion_target(association, instance.sop_class_uid, transfer_syntax, as_acceptor)
        if target is not None:
            try:
                data_set = self._transcoded_data_set(instance, target)
            except (UnrenderableError, CodecWorkerError) as error:
                verb = "decompress" if target == pydicom.uid.ExplicitVRLittleEndian else f"convert to {target}"
                return not_sent(f"cannot {verb} from {transfer_syntax}: {error}")
            transfer_syntax = target
        try:
            status = send_c_store(association, instance.sop_class_uid, uid, transfer_syntax,
                                  data_set, as_acceptor=as_acceptor, move_originator=move_originator)
            if status not in STORE_SUCCEEDED:
                not_sent(f"the destination answered its C-STORE with 0x{status:04X}")
            return status
        except ValueError as error:  # no context the peer accepted can carry it
            not_sent(str(error))
        except AssociationEnded as error:
            self.log.warning("sending %s to %s failed: %s", uid, association.peer, error)
            association.close()
            not_sent(f"the association with the destination ended: {error}")
        return None

    def _transcoded_data_set(self, instance: IndexedInstance, transfer_syntax: str) -> bytes:
        """A stored instance's data set encoded in transfer_syntax, its pixels decoded (and encoded
        again, for a lossless compressed syntax) in a codec worker. Raises UnrenderableError or
        CodecWorkerError."""
        if self.codecs is None:
            raise UnrenderableError("no codec worker to convert it")
        source = instance.path if location_scheme(instance.path) == "file" else self.ingest.storage.read(instance.path)
        part10 = self.codecs.call("transcoded", source, transfer_syntax=transfer_syntax)
        return part10[_dataset_offset(part10):]

    def _stored_data_set(self, instance: IndexedInstance) -> tuple[str, bytes]:
        """(transfer syntax, encoded data set) of a stored instance: the file's own bytes after its
        file meta group, untouched; a file without a group length is parsed and re-encoded."""
        data = self.ingest.storage.read(instance.path)
        offset = _dataset_offset(data)
        if offset > 132 and instance.transfer_syntax:
            data_set = data[offset:]
            if len(data_set) % 2 and instance.transfer_syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
                data_set += b"\0"  # a deflated stream is padded to even length (PS3.5 A.5); peers insist
            return instance.transfer_syntax, data_set
        dataset = pydicom.dcmread(io.BytesIO(data), force=True)
        syntax = pydicom.uid.UID(dataset.file_meta.get("TransferSyntaxUID") or instance.transfer_syntax
                                 or pydicom.uid.ImplicitVRLittleEndian)
        return str(syntax), pynetdicom_encode(dataset, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)

    # ---- associations we open ------------------------------------------------------------------

    def _associate(self, aet: str, host: str, port: int, contexts: list, timeout: float | None = None,
                   roles=()) -> Association:
        """An association we open with a [modalities] AE: over DICOM TLS when its entry says tls."""
        config = self.config
        try:
            tls = tls_client_context(config) if aet in config.tls_modalities else None
        except (OSError, ssl.SSLError) as error:
            raise AssociationRefused(f"cannot set up DICOM TLS for {aet}: {error}") from None
        return request_association(host, port, calling_aet=config.aet, called_aet=aet, contexts=contexts,
                                   max_pdu=config.max_pdu, max_pdu_send=config.max_pdu_send,
                                   connect_timeout=timeout or config.connection_timeout,
                                   acse_timeout=timeout or config.acse_timeout,
                                   timeout=timeout or config.dimse_timeout, log=self.log, roles=roles, tls=tls)

    def echo(self, aet: str, timeout: float) -> int:
        """C-ECHO a [modalities] AE: its status; AssociationRefused (or AssociationEnded) if it cannot be had."""
        host, port = self.config.modalities[aet]
        association = self._associate(aet, host, port, [build_context(Verification)], timeout)
        try:
            return send_c_echo(association)
        finally:
            association.release()

    def send(self, sop_instance_uids: list[str], destination_aet: str) -> dict:
        """C-STORE indexed instances to a [modalities] AE, over one association: {sent, failed}."""
        destination = self.config.modalities.get(destination_aet)
        if destination is None:
            raise ValueError(f"unknown destination {destination_aet!r}: add it under [modalities]")
        instances = [found for uid in sop_instance_uids if (found := self.finder.index.instance(uid))]
        result = {"sent": 0, "failed": len(sop_instance_uids) - len(instances)}
        if not instances:
            return result
        try:
            association = self._associate(destination_aet, *destination, _contexts_for(instances))
        except AssociationRefused as error:
            result["failed"] += len(instances)
            self.log.warning("cannot associate with %s at %s:%d: %s", destination_aet, *destination, error)
            return result
        try:
            for instance in instances:
                status = self._store_sub_operation(association, instance, as_acceptor=False, move_originator=())
                result["sent" if status in STORE_SUCCEEDED else "failed"] += 1
        finally:
            association.release()
        self.log.info("sent %d instance(s) to %s, %d failed", result["sent"], destination_aet, result["failed"])
        return result


@functools.lru_cache(maxsize=512)
def _storage_context(uid: str, transfer_syntaxes: tuple):
    """The context to accept for a storage SOP class in transfer_syntaxes, both roles granted, or
    None for a service dicoogled does not offer (unknown UIDs are private storage classes).
    Built once: a viewer proposes a hundred of them on every association, and negotiation only
    reads them."""
    service = uid_to_service_class(uid)
    if service is not ServiceClass and service is not StorageServiceClass:
        return None
    supported = build_context(uid, list(transfer_syntaxes))
    supported.scu_role, supported.scp_role = True, True
    return supported


def _contexts_for(instances: list[IndexedInstance]) -> list:
    """Presentation contexts for sending instances: each stored transfer syntax on its own, plus,
    for every SOP class, the uncompressed ones (an uncompressed object is re-encoded between
    explicit and implicit VR; a compressed one is decompressed, for a peer that accepts nothing
    else). At most 128 may be proposed; the rest are skipped (and would fail as sub-operations)."""
    wanted = {}
    for instance in instances:
        sop_class, transfer_syntax = instance.sop_class_uid, instance.transfer_syntax
        wanted.setdefault((sop_class, "uncompressed"), list(UNCOMPRESSED_TRANSFER_SYNTAXES))
        if transfer_syntax and transfer_syntax not in CONVERTIBLE_TRANSFER_SYNTAXES:
            # A compressed (or big endian, never re-encoded) syntax in a context of its own: the
            # peer accepts or refuses it apart from the uncompressed list above.
            wanted.setdefault((sop_class, transfer_syntax), [transfer_syntax])
    contexts = [build_context(sop_class, syntaxes) for (sop_class, _), syntaxes in wanted.items()]
    if len(contexts) > 128:
        log.warning("sending needs %d presentation contexts; only 128 can be proposed", len(contexts))
    return contexts[:128]


# ============================================================================================
# DICOM workers: storage associations served in worker processes, on every core
# ============================================================================================
#
# One Python process runs one thread at a time (the GIL), so however many associations store
# at once, the daemon alone uses one core. With [dicom] workers = N, the daemon starts N worker
# processes and hands each accepted storage association (its socket, with SCM_RIGHTS, and its
# negotiated state) to the least busy one. The worker reads the PDUs and DIMSE messages, reads
# each object and writes it to a temp file with fsync (prepare_received): most of a C-STORE's
# time. The daemon keeps what must be one: the listener, the waiting room, the association
# judge and limits (a handed-over association keeps its slot until the worker is done with it),
# and, for each object, store filters, the duplicate policy, disk space and quotas, the rename,
# the index commit and the events (Ingest.commit_received), asked by the worker over a channel
# of the association's own. A C-STORE is answered success only once that commit is done.
#
# A worker that dies takes its associations with it (their peers see the connection drop; what
# was not answered was not acknowledged) and is started again. The other services (C-FIND,
# C-MOVE, C-GET, commitment, worklist, MPPS) and DICOM TLS stay in the daemon.

class _HandedOverServices(DicomServices):
    """The DICOM services of an association a worker process serves: verification and storage.
    Each C-STORE is read and written here, and committed by the daemon over control."""

    def __init__(self, storage: Storage, control, service_classes: set, log: logging.Logger):
        # Not DicomServices.__init__: a worker has no index, listener, plugins or codecs.
        self.storage, self.control, self.log = storage, control, log
        self._service_classes = service_classes
        self.workers = None

    def _on_store(self, request: DimseRequest) -> int:
        try:
            data = part10_header(request.sop_class_uid, request.sop_instance_uid, request.transfer_syntax,
                                 request.calling_aet) + request.data
        except Exception as error:
            received = ReceivedObject(["", "", request.sop_instance_uid], unreadable_command=str(error))
        else:
            received = prepare_received(self.storage, data, request.sop_instance_uid)
        try:
            self.control.send(received)
            status, reason = self.control.recv()
        except (EOFError, OSError):
            # The daemon is stopping, or lost this association: nothing is acknowledged.
            if received.temp_name:
                with contextlib.suppress(OSError):
                    os.unlink(received.temp_name)
            raise AssociationEnded("the daemon ended the association") from None
        return DicomStatus(status, reason)


def _serve_handed_over(sock: socket.socket, control_fd: int, storage: Storage, running: set,
                       lock: threading.Lock, log: logging.Logger):
    """In a worker process: serve one association the daemon handed over, to its end."""
    control = multiprocessing.connection.Connection(control_fd)
    try:
        state = control.recv()
    except (EOFError, OSError):
        sock.close()
        control.close()
        return
    association = Association.resumed(sock, state["association"], log)
    services = _HandedOverServices(storage, control, state["service_classes"], log)
    with lock:
        running.add(association)
    try:
        ending = serve_to_end(association, services._serve, log)
    finally:
        with lock:
            running.discard(association)
        control.close()  # the daemon frees the association's slot
    ending()


def _association_worker(channel: socket.socket, settings: dict):
    """A worker process's life: serve the associations the daemon sends over channel (a byte
    with the connection's and the control channel's descriptors) until it says stop or is
    gone; then abort those still under way."""
    # Signals are the daemon's to act on: it stops the workers itself, after its grace.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _configure_logging(settings["log_level"])
    log = logging.getLogger("dicoogled.dicom")
    storage = Storage(pathlib.Path(settings["data_dir"]), fsync=settings["fsync"], sweep=False,
                      node_dir=pathlib.Path(settings["node_dir"]))
    running, lock = set(), threading.Lock()
    channel.sendall(AssociationWorkers.READY)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(channel, 1, 2)
        except OSError:
            break
        if message != AssociationWorkers.HAND_OVER or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            break
        start_thread(f"dicom-worker-{os.getpid()}", _serve_handed_over, socket.socket(fileno=fds[0]), fds[1],
                     storage, running, lock, log)
    with lock:
        under_way = list(running)
    for association in under_way:
        association.abort(wait_for_peer=0)


@dataclasses.dataclass
class _Worker:
    process: multiprocessing.Process
    channel: socket.socket  #: the daemon's end of the hand-over channel
    send_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    associations: int = 0  #: handed over and not ended


class AssociationWorkers:
    """The worker processes storage associations are handed to, kept running: one that dies is
    started again."""

    #: What the daemon sends a worker: an association (with two descriptors), or stop.
    HAND_OVER, STOP = b"A", b"S"
    #: What a worker sends once it can serve (its imports take a second or two).
    READY = b"R"
    #: Seconds the daemon waits at start for its workers to be ready.
    START_TIMEOUT = 60

    def __init__(self, count: int, settings: dict, log: logging.Logger):
        #: What a worker needs: data_dir, node_dir, fsync, log_level.
        self.settings, self.log = settings, log
        self._lock = threading.Lock()
        self._stopping = False
        self._wake_read, self._wake_write = socket.socketpair()
        self.restarts = 0  #: workers started again after one died
        self.workers = [self._start_one() for _ in range(count)]
        # The listener is ready only when its workers are: a peer's first association is not
        # left waiting for a worker's imports.
        for worker in self.workers:
            try:
                worker.channel.settimeout(self.START_TIMEOUT)
                if worker.channel.recv(1) != self.READY:
                    raise OSError("it ended")
            except OSError as error:
                self.log.error("DICOM worker process %d did not start: %s", worker.process.pid, error)
            finally:
                worker.channel.settimeout(None)
        self._supervisor = start_thread("dicom-workers", self._supervise)

    def _start_one(self) -> _Worker:
        ours, theirs = socket.socketpair()
        # spawn, not fork: the daemon has threads (a forked child could inherit a held lock).
        process = multiprocessing.get_context("spawn").Process(
            target=_association_worker, args=(theirs, self.settings), name="dicoogled-dicom-worker", daemon=True)
        process.start()
        theirs.close()
        self.log.info("DICOM worker process %d started", process.pid)
        return _Worker(process, ours)

    def pids(self) -> list[int]:
        """The worker processes' IDs."""
        with self._lock:
            return [worker.process.pid for worker in self.workers]

    def _supervise(self):
        while True:
            with self._lock:
                by_sentinel = {worker.process.sentinel: worker for worker in self.workers}
            ended = multiprocessing.connection.wait([*by_sentinel, self._wake_read])
            with self._lock:
                if self._stopping:
                    return
                for sentinel in ended:
                    worker = by_sentinel.get(sentinel)
                    if worker is None:
                        continue
                    worker.process.join()
                    worker.channel.close()
                    self.log.error("DICOM worker process %d ended (exit code %s) with %d associations, which ended "
                                   "with it: starting another", worker.process.pid, worker.process.exitcode,
                                   worker.associations)
                    self.workers[self.workers.index(worker)] = self._start_one()
                    self.restarts += 1

    def serve(self, association: Association, service_classes: set, commit) -> bool:
        """Hand association to the least busy worker and commit, in this thread, each object it
        receives (commit(ReceivedObject) -> (status, reason)) until the worker is done with the
        association; False if no worker could take it (then it is still ours to serve)."""
        with self._lock:
            if self._stopping:
                return False
            worker = min(self.workers, key=lambda w: w.associations)
            worker.associations += 1
        try:
            ours, theirs = socket.socketpair()
            try:
                with worker.send_lock:
                    socket.send_fds(worker.channel, [self.HAND_OVER], [association.sock.fileno(), theirs.fileno()])
            except OSError as error:
                self.log.warning("cannot hand the association with %s to a worker process: %s", association.peer, error)
                ours.close()
                return False
            finally:
                theirs.close()
            state = {"association": association.handed_over_state(), "service_classes": service_classes}
            # The worker's now: a copy kept here would hold the connection open if the worker died.
            association.sock.close()
            control = multiprocessing.connection.Connection(ours.detach())
            try:
                control.send(state)
                while True:
                    control.send(commit(control.recv()))
            except (EOFError, OSError):
                pass  # the worker is done with the association, or died
            finally:
                control.close()
            return True
        finally:
            with self._lock:
                worker.associations -= 1

    def stop(self, timeout: float = 10):
        """Stop every worker: each aborts the associations it still serves, then exits."""
        with self._lock:
            self._stopping = True
            workers = list(self.workers)
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")
        for worker in workers:
            with contextlib.suppress(OSError), worker.send_lock:
                worker.channel.send(self.STOP)
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                self.log.warning("DICOM worker process %d did not stop: killed", worker.process.pid)
                worker.process.kill()
                worker.process.join()
            worker.channel.close()
        self._supervisor.join(5)
        self._wake_read.close()
        self._wake_write.close()


# ============================================================================================
# Watched folders: index files in place, as they arrive, change and go
# ============================================================================================


class FolderWatcher:
    """Keeps the index in step with folders: reconcile at start, then follow file events.

    A file is indexed when inotify reports it closed after writing, or, for every other event
    and for polling observers, once its size and mtime have been still for quiet_period.

    One node watches a given folder: the owner of its lease ("watch" and its path). The others
    ask again every LEASE_POLL_SECONDS and take the folder over, reconciling it first, when
    that node dies; on one machine every folder is this node's at once.
    """

    def __init__(self, ingest: Ingest, folders, origin="watch", poll=False, poll_interval=5.0, quiet_period=2.0,
                 leases: Leases | None = None):
        self.ingest = ingest
        self.leases = leases or Leases()
        self.folders = [pathlib.Path(f).resolve() for f in folders]
        self.origin = origin
        self.quiet_period = quiet_period
        self.log = logging.getLogger("dicoogled.watch")
        self.poll, self.poll_interval = poll, poll_interval
        self._observers = []
        self._watching: dict[pathlib.Path, tuple] = {}  # folder -> (observer, (st_dev, st_ino) watched)
        self._deleted_folders: set[pathlib.Path] = set()  # watched folders reported deleted
        self._pending: dict[str, tuple] = {}  # path -> (size, mtime_ns, last change time)
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        self._workers = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="watch-index")
        self._queued = 0  # files handed to the workers and not yet indexed (or skipped)
        self._observing_lock = threading.Lock()  # held while folders are observed or given up
        self.reconciling = 0

    def start(self):
        for folder in self.folders:
            folder.mkdir(parents=True, exist_ok=True)
        self._watch_owned_folders()
        start_thread("watch-debounce", self._debounce_loop)
        start_thread("watch-leases", self._follow_leases)

    @property
    def watched(self) -> list[pathlib.Path]:
        """The folders this node watches now (with several nodes, those whose lease it owns)."""
        return list(self._watching)

    @staticmethod
    def lease(folder: pathlib.Path) -> str:
        """The name of a folder's lease: nodes mounting the shared folder at one path agree on it."""
        return f"watch {folder}"

    def _watch_owned_folders(self):
        """Watch (and reconcile) each folder this node owns and does not watch yet; stop
        watching those it no longer owns (its connection to the database was lost)."""
        with self._observing_lock:
            for folder in self.folders:
                owned = self.leases.owns(self.lease(folder))
                if owned and folder not in self._watching and not self._stop.is_set():
                    self._observe(folder)
                    self.reconciling += 1
                    start_thread(f"reconcile-{folder.name}", self._reconcile_then_done, folder)
                elif not owned and folder in self._watching:
                    observer, _ = self._watching.pop(folder)
                    observer.stop()
                    self.log.warning("no longer watching %s: this node lost its lease", folder)

    def _follow_leases(self):
        while not self._stop.wait(LEASE_POLL_SECONDS):
            try:
                self._watch_owned_folders()
            except OSError as error:  # a folder that cannot be watched now: tried again next time
                self.log.warning("cannot watch the folders taken over: %s", error)

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
        stat = folder.stat()
        self._watching[folder] = (observer, (stat.st_dev, stat.st_ino))
        self.log.info("watching %s (%s)", folder, "polling" if self.poll else "events")

    def _rewatch_recreated_folders(self):
        """A watched folder deleted (its files unindexed with it) and created again is a new
        folder, which the observer of the old one does not see: watch it and reconcile it."""
        with self._observing_lock:
            for folder, (observer, identity) in list(self._watching.items()):
                try:
                    stat = folder.stat()
                except OSError:
                    continue
                # The new folder may get the old one's inode number, hence the deletion event too.
                if ((stat.st_dev, stat.st_ino) != identity or folder in self._deleted_folders) and not self._stop.is_set():
                    self._deleted_folders.discard(folder)
                    self.log.warning("%s was deleted and created again: watching the new folder", folder)
                    observer.stop()
                    try:
                        self._observe(folder)
                    except OSError as error:  # gone again: try on the next round
                        self.log.warning("cannot watch %s: %s", folder, error)
                        continue
                    self.reconciling += 1
                    start_thread(f"reconcile-{folder.name}", self._reconcile_then_done, folder)

    def stop(self):
        self._stop.set()
        with self._observing_lock:
            for observer in self._observers:
                observer.stop()
        for observer in self._observers:
            observer.join(timeout=5)
        self._workers.shutdown(wait=True, cancel_futures=True)
        for folder in self.folders:  # another node (or the next watcher here) may watch them
            self.leases.release(self.lease(folder))

    def reconcile_all(self):
        """Reconcile every watched folder again (after the index could not take some files)."""
        for folder in list(self._watching):
            self.reconciling += 1
            start_thread(f"reconcile-{folder.name}", self._reconcile_then_done, folder)

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
        if pathlib.Path(path) in self._watching:
            self._deleted_folders.add(pathlib.Path(path))
        with self._pending_lock:
            for pending in [p for p in self._pending if p == path or p.startswith(path + os.sep)]:
                del self._pending[pending]
        gone = [p for p in self.ingest.index.paths_under(path)] + [path]
        sop_uids = [found.sop_instance_uid for found in (self.ingest.index.instance(path=p) for p in gone) if found] \
            if self.ingest.shadowed else []
        removed = self.ingest.unindex_paths(gone)
        if removed:
            self.log.info("unindexed %d file(s) removed from %s", removed, path)
        for sop_uid in sop_uids:  # a copy skipped as a duplicate of a removed file takes its place
            for other in list(self.ingest.shadowed.pop(sop_uid, ())):
                self._submit(other)

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
        known = self.ingest.index.instance(path=path)
        if known and (known.size, known.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
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
            self._rewatch_recreated_folders()
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
    watch_log = logging.getLogger("dicoogled.watch")
    root = pathlib.Path(root).resolve()
    known = ingest.index.paths_under(str(root))
    entries = list(walk_files(root, stop))
    to_index = []
    for entry in entries:
        try:
            stat = entry.stat()
        except OSError:  # gone since the listing: left in known, so it is unindexed below
            continue
        if known.pop(entry.path, None) != (stat.st_size, stat.st_mtime_ns):
            to_index.append(entry.path)
    removed = 0
    if known:
        try:
            removed = ingest.unindex_paths(known)
        except apsw.Error as error:  # a full disk: they stay indexed until the next reconciliation
            watch_log.error("cannot unindex %d vanished files below %s: %s", len(known), root, error)
    indexed = 0
    # Each file fails alone (index_file logs why): reconciliation always gets to the end.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="reconcile") as pool:
        futures = {pool.submit(ingest.index_file, pathlib.Path(path), origin): path for path in to_index}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            try:
                indexed += bool(future.result())
            except Exception:
                watch_log.exception("cannot index %s", futures[future])
            if progress:
                progress(done, len(futures))
            if stop is not None and stop.is_set():
                pool.shutdown(cancel_futures=True)
                break
    result = {"files": len(entries), "indexed": indexed, "skipped": len(to_index) - indexed, "unindexed": removed}
    watch_log.info("reconciled %s: %s", root, result)
    return result


# ============================================================================================
# Tasks: folders indexed in place in the background, and plugins' long jobs
# ============================================================================================

@dataclasses.dataclass
class IndexTask:
    """A background indexing task, as /index/task reports it."""

    uid: str
    name: str
    paths: list
    created: float = dataclasses.field(default_factory=time.time)
    total: int = 0
    done: int = 0
    indexed: int = 0
    errors: int = 0
    finished: float | None = None
    cancelled: bool = False
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    #: Stopped because its node stopped, not by a user: left unfinished for the next node to run.
    interrupted: bool = False

    @property
    def progress(self) -> float:
        if self.finished:
            return 1.0
        return self.done / self.total if self.total else 0.0

    def as_json(self) -> dict:
        status = {
            "taskUid": self.uid, "taskName": self.name, "taskProgress": round(self.progress, 4),
            "taskTimeCreated": datetime.datetime.fromtimestamp(self.created).isoformat(timespec="milliseconds"),
            "nIndexed": self.indexed, "nErrors": self.errors,
        }
        if self.finished:
            status.update(complete=True, elapsedTime=round((self.finished - self.created) * 1000))
        if self.cancelled:
            status["canceled"] = True
        return status


#: Seconds between two writes of a running task's report to the task list (and two reads of
#: whether another node asked it to stop).
TASK_REPORT_SECONDS = 1.0
#: Finished tasks still listed (not closed) this many days after they were created are dropped at start.
TASKS_KEPT_DAYS = 30


class TaskManager:
    """Runs tasks in the background and keeps them in the task list every node sees (TaskRecords):
    index and import tasks one after another, plugins' and research exports' functions each in
    a thread of its own.

    A task is run by the node that was asked for it, which holds the lease "task UID" while it
    runs. A task whose node stopped or died before it ended is found unfinished with its lease
    free, by another node or by the same one started again: an index task is run again from the
    start there (indexing a file twice changes nothing), while an import or a function, whose
    source or code only that node had, is ended with the reason. Stopping and closing a task
    work from any node: its runner reads the request when it next writes its report."""

    def __init__(self, ingest: Ingest, location: "pathlib.Path | str", leases: Leases, node_name: str):
        self.ingest, self.leases, self.node = ingest, leases, node_name
        self.records = TaskRecords(location)
        self.records.prune(time.time() - TASKS_KEPT_DAYS * 86400)
        #: The tasks this node runs (or has queued): uid -> task.
        self._running: dict[str, IndexTask] = {}
        self._lock = threading.Lock()  # the running tasks
        self._writing = threading.Lock()  # a report being written
        self._queue = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-task")
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._follower = None
        self.log = logging.getLogger("dicoogled.index")

    def start(self):
        """Follow the task list: write this node's reports, take over what no node runs. Once
        the daemon's plugins are loaded, since an index task resumed here goes through them."""
        self._follower = start_thread("tasks", self._follow)

    @staticmethod
    def lease(uid: str) -> str:
        return f"task {uid}"

    # ---- starting tasks

    def start_index(self, paths: list[str]) -> IndexTask:
        task = IndexTask(str(uuid.uuid4()), f"[{BUILTIN_PROVIDER}]index " + " ".join(_file_uri(p) for p in paths), paths)
        self._add(task, "index")
        self._queue.submit(self._run_recorded, task, self._run_index, task)
        return task

    def start_function(self, name: str, function, stoppable: bool = False) -> str:
        """Run function(progress) as a task; progress(fraction) updates what /index/task shows.
        stoppable: call function(progress, stop) with the threading.Event that stopping the task
        sets. A function may return (succeeded, failed) counts, shown as nIndexed and nErrors."""
        task = IndexTask(str(uuid.uuid4()), name, [], total=1000)

        def run():
            try:
                progress = lambda fraction: setattr(task, "done", int(max(0.0, min(1.0, float(fraction))) * 1000))  # noqa: E731
                counts = function(progress, task.stop) if stoppable else function(progress)
                if isinstance(counts, tuple) and len(counts) == 2:
                    task.indexed, task.errors = counts
                task.cancelled = task.stop.is_set()
            except Exception:
                task.errors += 1
                self.log.exception("task %s failed", name)
            finally:
                task.finished = time.time()

        self._add(task, "function")
        start_thread(f"task-{task.uid[:8]}", self._run_recorded, task, run)
        return task.uid

    def start_import(self, task: "ImportTask", source: pathlib.Path, entries=None, remove_source: bool = False):
        """List an import task and run it after the tasks before it (see run_import)."""
        self._add(task, "import", owner=task.owner)
        self._queue.submit(self._run_recorded, task, run_import, task, self.ingest, source, entries, remove_source)
        return task

    def _add(self, task: IndexTask, kind: str, owner: str = ""):
        # The lease first, then the row: no node may find the task unfinished with no runner.
        self.leases.owns(self.lease(task.uid))
        with self._lock:
            self._running[task.uid] = task
        try:
            self.records.add(task.uid, kind, self.node, task.paths, owner, task.created, task.as_json())
        except BaseException:
            self._forget(task)
            self.leases.release(self.lease(task.uid))
            raise
        self._wake.set()

    def _run_recorded(self, task: IndexTask, run, *args):
        """run(*args), then the task's last report written: finished, or, when this node stopped
        under it (task.interrupted), left unfinished for whichever node runs it next."""
        try:
            run(*args)
        finally:
            # After the follower's last progress report, never before it; and forgotten only
            # once its row says finished, so no look for orphans finds it unfinished and not ours.
            with self._writing:
                if not task.interrupted:
                    with contextlib.suppress(Exception):  # the list unreachable: logged by the follower
                        self.records.write(task.uid, self.node, task.as_json(), finished=True)
                self._forget(task)
            self.leases.release(self.lease(task.uid))

    def _forget(self, task: IndexTask):
        with self._lock:
            self._running.pop(task.uid, None)

    def _run_index(self, task: IndexTask):
        try:
            files = []
            for path in task.paths:
                if os.path.isdir(path):
                    self.ingest.index.write(Index.add_root, path)
                    files.extend(entry.path for entry in walk_files(pathlib.Path(path), task.stop))
                elif os.path.isfile(path):
                    files.append(path)
            task.total = len(files)  # counted first, so progress is a true fraction
            for path in files:
                if task.stop.is_set():
                    task.cancelled = True
                    break
                if self.ingest.index_file(pathlib.Path(path), "index"):
                    task.indexed += 1
                else:
                    task.errors += 1
                task.done += 1
        except Exception:
            self.log.exception("index task %s failed", task.uid)
            task.errors += 1
        finally:
            task.cancelled = task.cancelled or task.stop.is_set()  # also when stopped before it ran
            task.finished = time.time()
            self.log.info("index task %s: %d indexed, %d errors%s", task.uid, task.indexed, task.errors,
                          " (stopped)" if task.cancelled else "")

    # ---- what every node sees and asks

    def reports(self) -> list[tuple[TaskRecord, dict]]:
        """Every listed task and its report, oldest first: this node's own as they are now."""
        with self._lock:
            running = dict(self._running)
        return [(record, running[record.uid].as_json() if record.uid in running else record.report)
                for record in self.records.all()]

    def report(self, uid: str) -> tuple[TaskRecord, dict] | None:
        record = self.records.find(uid)
        if record is None:
            return None
        with self._lock:
            task = self._running.get(uid)
        return record, task.as_json() if task is not None else record.report

    def stop(self, uid: str) -> bool | None:
        """Stop a task, here or on the node running it: whether it was stopped (False: it had
        already ended), None if no task has that uid."""
        with self._lock:
            task = self._running.get(uid)
        if task is not None:
            task.stop.set()
            return True
        record = self.records.find(uid)
        if record is None:
            return None
        self.records.request_stop(uid)
        return not record.finished or bool(record.report.get("canceled"))

    def remove(self, uid: str) -> bool:
        """Drop a task from the list, stopping it first if it runs (here, or where it runs)."""
        with self._lock:
            task = self._running.get(uid)
        if task is not None:
            task.stop.set()
        return self.records.remove(uid) or task is not None

    # ---- the follower: this node's reports written, other nodes' stop requests read, orphans taken

    def _follow(self):
        next_look = 0.0  # at once: what a node that died (or this one, before a restart) left
        failing = False
        while not self._closed.is_set():
            try:
                self._write_reports()
                if time.monotonic() >= next_look:
                    self._take_over_orphans()
                    next_look = time.monotonic() + LEASE_POLL_SECONDS
                failing = False
            except Exception as error:
                if not failing:
                    self.log.error("cannot read or write the task list now, tried again every %g s: %s", TASK_REPORT_SECONDS, error)
                failing = True
            # Woken early by a new task. With nothing running, it looks for orphans as often as
            # a lease is tried; with the SQLite index (one node, whose orphans it found at start)
            # it sleeps until a task starts.
            if self._running or failing:
                self._wake.wait(TASK_REPORT_SECONDS)
            else:
                self._wake.wait(LEASE_POLL_SECONDS if self.leases.url else None)
            self._wake.clear()

    def _write_reports(self):
        with self._lock:
            running = list(self._running.values())
        for task in running:
            with self._writing:
                with self._lock:
                    ended = task.uid not in self._running  # its own last report is written
                if ended or task.interrupted:
                    continue
                asked_to_stop = self.records.write(task.uid, self.node, task.as_json(), finished=False)
            if task.stop.is_set():
                continue
            if asked_to_stop is None:
                self.log.warning("task %s was closed, or taken over by another node: stopped here", task.uid)
                task.stop.set()
            elif asked_to_stop:
                self.log.info("task %s: asked to stop on another node", task.uid)
                task.stop.set()

    def _take_over_orphans(self):
        for record in self.records.unfinished():
            with self._lock:
                ours = record.uid in self._running
            if self._closed.is_set():
                return  # this node's own tasks, left unfinished as it stops, are the next node's
            if ours or not self.leases.owns(self.lease(record.uid)):
                continue
            # Unfinished, and no node holds its lease: the node that ran it is gone.
            if record.kind == "index" and not record.stop_requested:
                task = IndexTask(record.uid, record.report.get("taskName", ""), record.paths, created=record.created)
                with self._lock:
                    self._running[task.uid] = task
                self.records.take(task.uid, self.node, task.as_json())
                self.log.warning("index task %s, left unfinished by node %s, runs again here (node %s)",
                                 task.uid, record.node, self.node)
                self._queue.submit(self._run_recorded, task, self._run_index, task)
                continue
            report = dict(record.report, complete=True, nErrors=record.report.get("nErrors", 0) + 1)
            if record.stop_requested:
                report["canceled"] = True
            reason = f"node {record.node} stopped before the task ended"
            report["interrupted"] = reason
            if record.kind == "import":
                report["failures"] = [*report.get("failures", []), {"file": "", "reason": f"the import stopped: {reason}"}]
            self.records.take(record.uid, self.node, report, finished=True)
            self.leases.release(self.lease(record.uid))
            self.log.warning("%s task %s ended unfinished: %s", record.kind, record.uid, reason)

    def close(self):
        """Stop this node's tasks: they stay unfinished in the list, for the next node to run."""
        self._closed.set()
        self._wake.set()
        with self._lock:
            running = list(self._running.values())
        for task in running:
            task.interrupted = True
            task.stop.set()
        self._queue.shutdown(wait=True, cancel_futures=True)
        if self._follower is not None:
            self._follower.join(timeout=10)
        self.records.close()


# ============================================================================================
# Archives: studies out as ZIP files or DICOM media (DICOMDIR), and ZIP files or folders in
# ============================================================================================

#: Bytes of a stored file read at a time while it goes into a ZIP: what a download holds in memory.
ZIP_CHUNK_BYTES = 1024 * 1024
#: The File-set ID written in the DICOMDIR of media downloads (PS3.3 F.3.2.1, CS, 16 at most).
MEDIA_FILE_SET_ID = "DICOOGLED"
#: What a DICOMDIR record needs (pydicom's FileSet refuses an instance without them, PS3.3 F.5):
#: Type 1 keys, by keyword, with the value put in the record when the instance has none.
MEDIA_RECORD_PLACEHOLDERS = {"PatientID": "UNKNOWN", "StudyDate": "19000101", "StudyTime": "000000",
                             "StudyID": "0", "SeriesNumber": "0", "InstanceNumber": "0", "Modality": "OT"}
#: An import below this many unpacked bytes is never refused for its compression ratio: too small to hurt.
IMPORT_RATIO_FLOOR_BYTES = 16 * 1024 * 1024
#: The largest file an import takes: each is read whole into memory to be stored, as a STOW-RS
#: part is (whose request the HTTP server limits to 1 GiB).
IMPORT_MAX_FILE_BYTES = 1024 * 1024 * 1024
#: The failures an import lists by file name; the rest are only counted.
IMPORT_REPORTED_FAILURES = 1000


def _entry_component(text: str, fallback: str) -> str:
    """One folder or file name of a ZIP entry made from a tag's value: letters, digits, '.', '_'
    and '-' only, so no value (a PatientID of '../..', a slash, a NUL) can name a path elsewhere."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", str(text).strip())[:64].strip(".")
    return cleaned or fallback


class _ZipSink:
    """Where zipfile writes a ZIP being streamed: the bytes wait here until taken for the
    answer. It has no tell() or seek(), so zipfile writes each entry's sizes and CRC in a data
    descriptor after its data instead of going back to its header: the ZIP is never whole anywhere."""

    def __init__(self):
        self._parts = []

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self):
        pass

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


def stream_zip(entries, force_zip64: bool = False):
    """Yield the bytes of a ZIP as they are written, from entries (name, size, chunks): chunks
    an iterable of the entry's bytes, size their total. At most one chunk and the headers are
    in memory at a time.

    Entries are stored, not compressed: DICOM pixel data, often compressed already, gains
    little, and the CPU is better spent answering others. Knowing each size before its data,
    zipfile writes ZIP64 extensions wherever a size or an offset needs them (beyond 2 GiB, as
    it counts), and the ZIP64 end records when the whole passes that: archives over 4 GB open
    everywhere ZIP64 is read. force_zip64 writes the extensions for every entry.
    """
    sink = _ZipSink()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, size, chunks in entries:
            info = zipfile.ZipInfo(name, date_time=time.localtime()[:6])
            info.file_size = size  # decides ZIP64 for this entry before its header is written
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=force_zip64) as member:
                for chunk in chunks:
                    member.write(chunk)
                    if data := sink.take():
                        yield data
            if data := sink.take():
                yield data
    yield sink.take()  # the central directory and the end records


def stored_object(storage: Storage, member: ArchiveMember, transform=None) -> tuple[int, typing.Iterable[bytes], Dataset | None]:
    """(size, chunks, transformed data set or None) of one instance as a download holds it.
    Raises OSError if it cannot be read, ValueError if the transform refuses it.

    This is the one place a download's objects pass, so a per-data-set transform belongs here:
    transform(dataset) -> dataset (de-identification), applied to the whole object, which is
    then written out again. Without one, a file is sent as stored, read a chunk at a time.
    """
    if transform is not None:
        dataset = transform(pydicom.dcmread(storage.open(member.path)))
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        return buffer.tell(), [buffer.getvalue()], dataset
    if location_scheme(member.path) != "file":  # kept by a storage plugin, whole
        data = storage.read(member.path)
        return len(data), [data], None
    handle = open(member.path, "rb")
    size = os.fstat(handle.fileno()).st_size

    def chunks():
        with handle:
            while chunk := handle.read(ZIP_CHUNK_BYTES):
                yield chunk
    return size, chunks(), None


def _missing_entry(missing: list[str]):
    """The last entry of a download some of whose instances could not be put in: which, and why."""
    text = ("These instances are in the index but not in this archive:\n" + "\n".join(missing) + "\n").encode("utf-8")
    return "MISSING.txt", len(text), [text]


def archive_entries(storage: Storage, members: list[ArchiveMember], transform=None):
    """The entries of a ZIP of instances: PatientID/StudyInstanceUID/SeriesInstanceUID/
    SOPInstanceUID.dcm, each name made safe; an instance that cannot be read is listed in a
    last entry, MISSING.txt, so that one lost file does not cut the whole download short."""
    missing = []
    for member in members:
        try:
            size, chunks, sent = stored_object(storage, member, transform)
        except (OSError, ValueError) as error:
            missing.append(f"{member.sop_instance_uid}: {getattr(error, 'strerror', None) or error}")
            continue
        # Named after what is sent: a de-identified copy's name must not carry the original's IDs.
        identity = (sent.get("PatientID", ""), sent.get("StudyInstanceUID", ""), sent.get("SeriesInstanceUID", ""),
                    sent.get("SOPInstanceUID", "")) if sent is not None else \
            (member.patient_id, member.study_instance_uid, member.series_instance_uid, member.sop_instance_uid)
        name = "/".join((_entry_component(str(identity[0]), "NO_PATIENT_ID"), _entry_component(str(identity[1]), "NO_STUDY"),
                         _entry_component(str(identity[2]), "NO_SERIES"), _entry_component(str(identity[3]), "NO_INSTANCE") + ".dcm"))
        yield name, size, chunks
    if missing:
        yield _missing_entry(missing)


class MediaDirectory(typing.NamedTuple):
    """What a media download holds, built before its first byte is sent."""
    dicomdir: bytes  # the DICOMDIR file (PS3.10 7.2)
    files: list  # (ArchiveMember, File ID as a path: PT000000/ST000000/SE000000/IM000000)
    missing: list[str]  # instances left out, with why


def media_directory(storage: Storage, members: list[ArchiveMember], transform=None) -> MediaDirectory:
    """The DICOMDIR of DICOM media holding members (PS3.10 and PS3.11), built by pydicom's FileSet.

    FileSet copies every instance it is given into a staging folder, then again where the
    file-set is written. It is given each instance's header only (pixel data left out), so what
    goes to temporary files (data_dir/tmp) is a few kilobytes an instance, deleted before this
    returns; the stored files go into the ZIP from where they are, under the File IDs FileSet chose.
    """
    from pydicom.fileset import FileSet

    file_set, missing, chosen = FileSet(), [], {}
    file_set.ID = MEDIA_FILE_SET_ID
    for member in members:
        try:
            header = pydicom.dcmread(storage.open(member.path), stop_before_pixels=True)
            if transform is not None:  # the records must describe the files as they are sent
                header = transform(header)
            for keyword, placeholder in MEDIA_RECORD_PLACEHOLDERS.items():
                if keyword not in header or header[keyword].VM == 0:
                    setattr(header, keyword, placeholder)
            file_set.add(header)
            chosen[header.SOPInstanceUID] = member  # as the record names it: a copy's own UID
        except (OSError, ValueError, KeyError, AttributeError, InvalidDicomError) as error:
            missing.append(f"{member.sop_instance_uid}: cannot be put on media: {getattr(error, 'strerror', None) or error}")
    with tempfile.TemporaryDirectory(dir=storage.tmp, prefix="media-") as folder:
        file_set.write(folder)  # the DICOMDIR, and the headers
        dicomdir = (pathlib.Path(folder) / "DICOMDIR").read_bytes()
        files = [(chosen[instance.SOPInstanceUID], instance.FileID.replace(os.sep, "/")) for instance in file_set]
    return MediaDirectory(dicomdir, files, missing)


def media_entries(storage: Storage, media: MediaDirectory, transform=None):
    """The entries of a media ZIP: DICOMDIR first, then each instance under its File ID."""
    yield "DICOMDIR", len(media.dicomdir), [media.dicomdir]
    missing = list(media.missing)
    for member, file_id in media.files:
        try:
            size, chunks, _ = stored_object(storage, member, transform)
        except (OSError, ValueError) as error:  # after the DICOMDIR was made: it names a file that is not there
            missing.append(f"{member.sop_instance_uid}: {getattr(error, 'strerror', None) or error} (its DICOMDIR record remains)")
            continue
        yield file_id, size, chunks
    if missing:
        yield _missing_entry(missing)


# ---- imports -----------------------------------------------------------------------------------


class ImportRefused(ValueError):
    """A ZIP file refused whole before anything of it is imported; status is the HTTP answer's."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _unsafe_entry_name(name: str) -> bool:
    """A ZIP entry name that would lead out of a folder it were unpacked in ("zip slip"): absolute,
    a drive, a '..' component, or a NUL. Imports never unpack by name, but such a file is no
    honest export and is refused whole."""
    path = name.replace("\\", "/")
    return path.startswith("/") or bool(re.match(r"[A-Za-z]:", path)) or "\x00" in path or ".." in path.split("/")


def check_import_zip(path: pathlib.Path, max_unpacked_bytes: int, max_ratio: float) -> list[zipfile.ZipInfo]:
    """The file entries of a ZIP file to import, once it is found safe; raises ImportRefused:
    400 for no ZIP, unsafe names or links, 413 for a "zip bomb": more unpacked bytes than
    max_unpacked_bytes, or (beyond IMPORT_RATIO_FLOOR_BYTES) a compression ratio over max_ratio.

    The sizes are those the central directory declares; reading an entry never gives more than
    its declared size (zipfile stops there, and the CRC check fails), so they bound the work."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as error:
        raise ImportRefused(f"not a ZIP file that can be read: {error}") from None
    for info in infos:
        if _unsafe_entry_name(info.filename):
            raise ImportRefused(f"unsafe entry name {info.filename[:200]!r}: absolute, or leading out of its folder")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ImportRefused(f"entry {info.filename[:200]!r} is a symbolic link")
    files = [info for info in infos if not info.is_dir()]
    unpacked, packed = sum(info.file_size for info in files), sum(info.compress_size for info in files)
    if unpacked > max_unpacked_bytes:
        raise ImportRefused(f"the ZIP file unpacks to {unpacked // (1024 * 1024)} MB, more than "
                            f"[archives] import_max_unpacked_mb = {max_unpacked_bytes // (1024 * 1024)}", 413)
    if unpacked > IMPORT_RATIO_FLOOR_BYTES and unpacked > max_ratio * max(packed, 1):
        raise ImportRefused(f"the ZIP file unpacks to {unpacked / max(packed, 1):.0f} times its size, more than "
                            f"[archives] import_max_ratio = {max_ratio:g}: a zip bomb?", 413)
    return files


@dataclasses.dataclass
class ImportTask(IndexTask):
    """An import, as GET /import/{uid} (and /index/task, for administrators) reports it."""

    owner: str = ""  #: the user who started it: only they and administrators see it
    skipped: int = 0  #: DICOMDIR files: media's index, not instances
    #: {"file", "reason"} of each file that was not imported, the first IMPORT_REPORTED_FAILURES
    failures: list = dataclasses.field(default_factory=list)

    def failed(self, name: str, reason: str):
        self.errors += 1
        if len(self.failures) < IMPORT_REPORTED_FAILURES:
            self.failures.append({"file": name, "reason": reason})

    def as_json(self) -> dict:
        return {**super().as_json(), "owner": self.owner, "nFiles": self.total, "nDone": self.done,
                "nSkipped": self.skipped, "failures": self.failures}


def _import_files(source: pathlib.Path, entries, stop: threading.Event):
    """(name, size, read) of each file to import: read() -> its bytes. entries: a ZIP file's
    checked entries, or None for a folder, walked."""
    if entries is None:
        for found in walk_files(source, stop):
            yield os.path.relpath(found.path, source), found.stat().st_size, pathlib.Path(found.path).read_bytes
        return
    with zipfile.ZipFile(source) as archive:
        for info in entries:
            yield info.filename, info.file_size, functools.partial(archive.read, info)


def run_import(task: ImportTask, ingest: Ingest, source: pathlib.Path, entries=None, remove_source: bool = False):
    """Import every file of a ZIP file (entries, from check_import_zip) or of a folder (entries
    None) through the one ingest path, as a received object of origin "import": duplicates,
    store filters, quotas, events and webhooks alike. Files that are not DICOM, or refused,
    are listed in task.failures with the reason; DICOMDIR files are skipped."""
    log = logging.getLogger("dicoogled.index")
    try:
        task.total = len(entries) if entries is not None else sum(1 for _ in walk_files(source, task.stop))
        for name, size, read in _import_files(source, entries, task.stop):
            if task.stop.is_set():
                task.cancelled = True
                break
            if size > IMPORT_MAX_FILE_BYTES:
                task.failed(name, f"{size // (1024 * 1024)} MB: larger than an import takes "
                                  f"({IMPORT_MAX_FILE_BYTES // (1024 * 1024)} MB); send it by C-STORE, or index it in place")
                task.done += 1
                continue
            try:
                data = read()
            except (OSError, zipfile.BadZipFile, RuntimeError, ValueError, zlib.error) as error:  # damaged, encrypted
                task.failed(name, f"cannot be read: {error}")
                task.done += 1
                continue
            if data[128:132] != b"DICM":
                task.failed(name, "not a DICOM file (no DICM prefix after the 128-byte preamble, PS3.10 7.1)")
            elif _meta_uids(data).get(0x0002) == DICOMDIR_SOP_CLASS:
                task.skipped += 1  # rebuilt from the instances, as every DICOMDIR is
            else:
                status = ingest.store_received(data, "", origin="import")
                if status == SUCCESS:
                    task.indexed += 1
                else:
                    task.failed(name, getattr(status, "reason", "") or f"refused with status 0x{int(status):04X}")
            task.done += 1
    except Exception as error:
        log.exception("import task %s failed", task.uid)
        task.failed(str(source.name), f"the import stopped: {error}")
    finally:
        if remove_source:
            source.unlink(missing_ok=True)
        task.cancelled = task.cancelled or task.stop.is_set()
        task.finished = time.time()
        log.info("import task %s: %d imported, %d skipped, %d failed%s", task.uid, task.indexed, task.skipped,
                 task.errors, " (stopped)" if task.cancelled else "")


# ============================================================================================
# Study events and webhooks: stable studies, and deliveries that survive a restart
# ============================================================================================

#: 2xx: the receiver has the event; anything else (or no answer) is tried again later.
HTTP_SUCCESS_CLASS = 2
#: Seconds between looks for quiet studies, at most.
STABLE_CHECK_SECONDS = 1.0


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A webhook answering with a redirect has not taken the event: a failed attempt, and no
    signed body goes to a URL the configuration does not name."""

    def redirect_request(self, *args, **kwargs):
        return None


class StudyEvents:
    """Finds stable studies and delivers webhooks, both from what the index keeps.

    A study is stable once [plugins] stable_age seconds passed since its newest instance arrived
    (studies.last_arrival, written by Index.add_instance). When found so, it is marked announced
    and its webhook deliveries queued in one transaction; on_stable_study then runs. Deliveries are
    rows of the index: a delivery thread posts each due one, marks it delivered after a 2xx answer,
    else waits longer each time (Webhook.retry_delay). A crash between a receiver's 2xx and that
    mark sends the same delivery again, with the same X-Dicoogled-Delivery id: receivers dedupe.
    """

    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon
        self.index: Index = daemon.index
        self.log = logging.getLogger("dicoogled.events")
        self._stop = threading.Event()
        self._wake_delivery = threading.Event()
        self._threads = []
        self._opener = urllib.request.build_opener(_NoRedirects)

    #: The once-only work of this class, each owned by one node (Leases).
    STABLE_STUDIES_LEASE, DELIVERY_LEASE = "stable studies", "webhook deliveries"

    @property
    def webhooks(self) -> dict[str, Webhook]:
        return self.daemon.config.webhooks

    def start(self):
        for hook in self.webhooks.values():
            try:
                hook.signing_key()
            except (OSError, ValueError) as error:  # said now; its deliveries wait until it can be read
                self.log.error("webhook %s: cannot read its secret: %s", hook.name, getattr(error, "strerror", None) or error)
        self._threads = [start_thread("stable-studies", self._find_stable_studies),
                         start_thread("webhooks", self._deliver)]

    def close(self):
        """Stop both threads; deliveries not made stay queued for the next start."""
        self._stop.set()
        self._wake_delivery.set()
        for thread in self._threads:
            thread.join(timeout=max([hook.timeout for hook in self.webhooks.values()], default=0) + 5)

    # ---- events

    def deliveries(self, event: str, data: dict) -> list[Delivery]:
        """The deliveries (not yet queued) telling every hook that wants it of an event."""
        deliveries = []
        for hook in self.webhooks.values():
            if event in hook.events:
                delivery_id = str(uuid.uuid4())
                body = json.dumps({"event": event, "id": delivery_id, "data": data,
                                   "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
                                  ensure_ascii=False)
                deliveries.append(Delivery(delivery_id, hook.name, event, body))
        return deliveries

    def instance_deliveries(self, record: InstanceRecord) -> list[Delivery]:
        """What an instance's arrival makes: a stored event for each one received (C-STORE, STOW-RS, import)."""
        if record.origin not in RECEIVED_ORIGINS or not self.webhooks:
            return []
        columns = record.columns
        data = {keyword: columns[keyword] for keyword in ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID",
                                                          "StudyInstanceUID", "PatientID", "Modality")}
        data["origin"] = record.origin
        return self.deliveries("stored", data)

    def queued(self):
        """Deliveries were queued: look for due ones now."""
        self._wake_delivery.set()

    def _find_stable_studies(self):
        # The one place studies are found stable, by the node that owns this work (with several
        # nodes on one database); announce_stable's conditional update would anyway keep two
        # from announcing a study twice.
        stable_age = self.daemon.config.stable_age
        while not self._stop.wait(min(STABLE_CHECK_SECONDS, stable_age / 4)):
            if not self.daemon.leases.wait_to_own(self.STABLE_STUDIES_LEASE, self._stop):
                return
            try:
                self._announce_quiet_studies(stable_age)
            except (apsw.Error, OSError) as error:  # a full disk, say: the studies wait, the loop goes on
                self.log.error("cannot look for stable studies now: %s", error)

    def _announce_quiet_studies(self, stable_age: float):
        for study in self.index.quiet_studies(time.time() - stable_age):
            if self._stop.is_set():
                return
            attributes = self.index.study_attributes(study.study_instance_uid)
            if attributes is None:
                continue
            deliveries = self.deliveries("stable_study", attributes)
            if self.index.write(Index.announce_stable, study.study_instance_uid, study.last_arrival, deliveries):
                self.log.info("study %s is stable", study.study_instance_uid)
                if deliveries:
                    self.queued()
                self.daemon.plugins.notify("on_stable_study", attributes)

    # ---- delivery

    def _deliver(self):
        # Deliveries are made by one node, the owner of this work; it asks again before each
        # attempt, so a node that lost the lease stops at once.
        leases = self.daemon.leases
        while leases.wait_to_own(self.DELIVERY_LEASE, self._stop):
            try:
                for delivery in self.index.due_deliveries(time.time()):
                    if self._stop.is_set() or not leases.owns(self.DELIVERY_LEASE):
                        break
                    self._attempt(delivery)
                next_due = self.index.next_delivery_time()
            except (apsw.Error, OSError) as error:  # the queue cannot be read or written now: later
                self.log.error("cannot deliver webhooks now: %s", error)
                next_due = None
            wait = STABLE_CHECK_SECONDS if next_due is None else min(STABLE_CHECK_SECONDS, max(0.0, next_due - time.time()))
            self._wake_delivery.wait(wait)
            self._wake_delivery.clear()

    def _attempt(self, delivery: Delivery):
        """Post one delivery once and record what came of it."""
        hook = self.webhooks.get(delivery.hook)
        if hook is None:
            self.index.write(Index.delivery_attempted, delivery.delivery_id, "failed",
                             f"no webhook {delivery.hook} in [webhooks] any more")
            return
        body = delivery.body.encode("utf-8")
        try:
            key = hook.signing_key()
        except (OSError, ValueError) as error:
            self._failed(hook, delivery, f"cannot read secret_file: {getattr(error, 'strerror', None) or error}")
            return
        request = urllib.request.Request(hook.url, data=body, method="POST", headers={
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": f"dicoogled/{__version__}",
            "X-Dicoogled-Event": delivery.event,
            "X-Dicoogled-Delivery": delivery.delivery_id,
            "X-Dicoogled-Signature": "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest(),
        })
        try:
            with self._opener.open(request, timeout=hook.timeout) as answer:
                answer.read(65536)
                status, error = answer.status, ""
        except urllib.error.HTTPError as answer:
            status, error = answer.code, f"HTTP {answer.code} {answer.reason}"
        except (OSError, ValueError, http.client.HTTPException) as failure:  # refused, timed out, reset
            status, error = 0, str(getattr(failure, "reason", None) or failure) or type(failure).__name__
        if status // 100 == HTTP_SUCCESS_CLASS:
            self.index.write(Index.delivery_attempted, delivery.delivery_id, "delivered")
            self.log.info("webhook %s: %s delivery %s made", hook.name, delivery.event, delivery.delivery_id)
            return
        self._failed(hook, delivery, error)

    def _failed(self, hook: Webhook, delivery: Delivery, error: str):
        """Record a failed attempt: tried again after a longer wait, or given up after hook.attempts."""
        attempts = delivery.attempts + 1
        if attempts >= hook.attempts:
            self.index.write(Index.delivery_attempted, delivery.delivery_id, "failed", error)
            self.log.error("webhook %s: gave up delivery %s after %d attempts: %s", hook.name, delivery.delivery_id, attempts, error)
            return
        delay = hook.retry_delay(attempts)
        self.index.write(Index.delivery_attempted, delivery.delivery_id, "pending", error, time.time() + delay)
        self.log.warning("webhook %s: delivery %s failed (%s); next attempt in %g s", hook.name, delivery.delivery_id, error, delay)


# ============================================================================================
# De-identification: PS3.15 Annex E's Basic Profile, the pseudonym map, research exports
# ============================================================================================

#: PS3.15 Table E.1-1 (the 2026c edition), the Basic Application Level Confidentiality Profile's
#: column: the action on each attribute, named by keyword (or by its 8-hex tag where pydicom's
#: dictionary does not know it yet). D: replace with a dummy value, Z: empty it (or a dummy),
#: X: remove it, U: replace the UID, consistently; "X/Z" and the like leave the choice (see
#: _CHOSEN_ACTIONS); "X/Z/U*": a sequence whose UIDs are replaced. tests/test_research.py checks
#: this copy against dicom-anonymizer's (Kitware's, generated from the standard's own XML). Copied,
#: not imported: that package is alpha, imports tqdm with it and keeps the UIDs it replaced in a
#: module global (one de-identification at a time, random UIDs), and has no options' columns.
BASIC_PROFILE_ACTIONS = {
    "D": (
        "AcquisitionFieldOfViewLabel AnnotationGroupLabel AnnotationGroupUID AssertionDateTime "
        "AttributeModificationDateTime BeamHoldTransitionDateTime CertificateOfSigner "
        "ClinicalTrialProtocolEthicsCommitteeName ClinicalTrialProtocolID ClinicalTrialSponsorName "
        "ClinicalTrialSubjectID ClinicalTrialSubjectReadingID ContainerIdentifier ContentSequence "
        "ContextGroupLocalVersion ContextGroupVersion Date DateTime DecayCorrectionDateTime DestinationAE "
        "DeviceLabel DigitalSignatureDateTime EffectiveDateTime EncapsulatedDocument EntityLabel "
        "EntityLongLabel ExclusionStartDateTime FlowIdentifier FlowIdentifierSequence "
        "FrameAcquisitionDateTime FrameOriginTimestamp FrameReferenceDateTime FunctionalSyncPulse "
        "GraphicAnnotationSequence HangingProtocolCreationDateTime ImpedanceMeasurementDateTime "
        "InformationIssueDateTime InterlockDateTime InterlockDescription InterlockOriginDescription "
        "ModifyingSystem OverrideDateTime PersonIdentificationCodeSequence PersonName RTPlanLabel "
        "RTPrescriptionLabel RTToleranceSetLabel RadiationDoseIdentificationLabel "
        "RadiationDoseInVivoMeasurementLabel RadiationGenerationModeLabel ReasonForTheAttributeModification "
        "RecordedRTControlPointDateTime ReferencedDateTime SafePositionExitDate SafePositionExitTime "
        "SafePositionReturnDate SafePositionReturnTime SelectorAEValue SelectorASValue SelectorDAValue "
        "SelectorDTValue SelectorLOValue SelectorLTValue SelectorOBValue SelectorPNValue SelectorSHValue "
        "SelectorSTValue SelectorTMValue SelectorUNValue SelectorURValue SelectorUTValue SourceEndDateTime "
        "SourceIdentifier SourceStartDateTime SourceStrengthReferenceDate SourceStrengthReferenceTime "
        "SpecimenIdentifier StructureSetLabel Time TreatmentControlPointDate TreatmentControlPointTime "
        "TreatmentPositionGroupLabel TreatmentToleranceViolationDateTime "
        "TreatmentToleranceViolationDescription UnformattedTextValue UserContentLabel UserContentLongLabel "
        "VerificationDateTime VerifyingObserverName VerifyingObserverSequence VerifyingOrganization "
        "XRayDetectorID XRaySourceID"
    ),
    "Z": (
        "AccessionNumber CalibrationDateTime ClinicalTrialCoordinatingCenterName ClinicalTrialProtocolName "
        "ClinicalTrialSiteID ClinicalTrialSiteName ClinicalTrialTimePointID "
        "ConceptualVolumeCombinationDescription ConceptualVolumeDescription ConsultingPhysicianName "
        "DeviceAlternateIdentifier FillerOrderNumberImagingServiceRequest FractionationNotes "
        "IssuerOfTheContainerIdentifierSequence IssuerOfTheSpecimenIdentifierSequence "
        "ManufacturerDeviceIdentifier ParticipationDateTime PatientBirthDate PatientName PatientSex "
        "PlacerOrderNumberImagingServiceRequest PrescriptionNotes PrescriptionNotesSequence ROIInterpreter "
        "ROIName RTAccessoryDeviceSlotID RTAccessoryHolderSlotID RTPhysicianIntentNarrative "
        "RadiationGenerationModeDescription ReasonForSuperseding ReferringPhysicianName ReviewDate ReviewTime "
        "SourceOfPreviousValues SpecimenPreparationSequence StructureSetDate StructureSetTime StudyDate "
        "StudyID StudyTime TreatmentTechniqueNotes VerifyingObserverIdentificationCodeSequence"
    ),
    "X": (
        "00081301 00081302 00081303 00081304 00100011 00100012 00100013 00100014 00100015 00100016 00100041 "
        "00100042 00100043 00100044 00100045 00100046 00100047 00102162 0040A034 0040A035 0040B034 0040B036 "
        "0040B03B 0040B03F 0040E012 AcquisitionComments AcquisitionContextDescription "
        "AcquisitionProtocolDescription ActualHumanPerformersSequence AdditionalPatientHistory AddressTrial "
        "AdmissionID AdmittingDate AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription AdmittingTime "
        "AffectedSOPInstanceUID Allergies AnnotationGroupDescription ApprovalStatusDateTime Arbitrary "
        "AssertionExpirationDateTime AuthorObserverSequence BeamDescription BolusDescription BranchOfService "
        "CalibrationDate CalibrationTime CameraOwnerName CassetteID CertifiedTimestamp "
        "ChannelDerivationDescription ChannelLabel ClinicalTrialProtocolEthicsCommitteeApprovalNumber "
        "ClinicalTrialSeriesDescription ClinicalTrialSeriesID ClinicalTrialTimePointDescription "
        "CommentsOnRadiationDose CommentsOnThePerformedProcedureStep CompensatorDescription "
        "ConfidentialityConstraintOnPatientDataDescription ConsultingPhysicianIdentificationSequence "
        "ContainerComponentID ContainerDescription ContentCreatorIdentificationCodeSequence "
        "ContrastBolusStartTime ContrastBolusStopTime ContributionDateTime ContributionDescription "
        "CountryOfResidence CreationDate CreationTime CurrentObserverTrial CurrentPatientLocation CurveDate "
        "CurveTime CustodialOrganizationSequence DataSetTrailingPadding "
        "DateOfDocumentOrVerbalTransactionTrial DateOfInstallation DateOfLastCalibration DateOfManufacture "
        "DateOfSecondaryCapture DateTimeOfLastCalibration DecompositionDescription DerivationDescription "
        "DeviceDescription DeviceSettingDescription DigitalSignaturesSequence DischargeDate "
        "DischargeDiagnosisDescription DischargeTime DisplacementReferenceLabel DistributionAddress "
        "DistributionName DoseReferenceDescription EntityDescription EntityName "
        "EquipmentFrameOfReferenceDescription EthicsCommitteeApprovalEffectivenessEndDate "
        "EthicsCommitteeApprovalEffectivenessStartDate EthnicGroup EthnicGroupCodeSequence "
        "ExpectedCompletionDateTime FilterLookupTableDescription FindingsGroupRecordingDateTrial "
        "FindingsGroupRecordingTimeTrial FixationDeviceDescription FractionGroupDescription FrameComments "
        "GPSAltitude GPSAltitudeRef GPSAreaInformation GPSDOP GPSDateStamp GPSDestBearing GPSDestBearingRef "
        "GPSDestDistance GPSDestDistanceRef GPSDestLatitude GPSDestLatitudeRef GPSDestLongitude "
        "GPSDestLongitudeRef GPSDifferential GPSImgDirection GPSImgDirectionRef GPSLatitude GPSLatitudeRef "
        "GPSLongitude GPSLongitudeRef GPSMapDatum GPSMeasureMode GPSProcessingMethod GPSSatellites GPSSpeed "
        "GPSSpeedRef GPSStatus GPSTimeStamp GPSTrack GPSTrackRef GPSVersionID GantryID GeneratorID "
        "HL7DocumentEffectiveTime HardcopyCreationDeviceID HumanPerformerName HumanPerformerOrganization "
        "IconImageSequence IdentifyingComments ImageComments ImagePresentationComments "
        "ImagingServiceRequestComments Impressions InstanceCoercionDateTime InstanceOriginStatus "
        "InstitutionAddress InstitutionalDepartmentName InstitutionalDepartmentTypeCodeSequence "
        "InsurancePlanIdentification IntendedFractionStartTime "
        "IntendedRecipientsOfResultsIdentificationSequence InterpretationApprovalDate "
        "InterpretationApprovalTime InterpretationApproverSequence InterpretationAuthor "
        "InterpretationDiagnosisDescription InterpretationID InterpretationIDIssuer "
        "InterpretationRecordedDate InterpretationRecordedTime InterpretationRecorder InterpretationText "
        "InterpretationTranscriber InterpretationTranscriptionDate InterpretationTranscriptionTime "
        "InterventionDrugStartTime InterventionDrugStopTime IssueDateOfImagingServiceRequest "
        "IssueTimeOfImagingServiceRequest IssuerOfAdmissionID IssuerOfAdmissionIDSequence "
        "IssuerOfClinicalTrialProtocolID IssuerOfClinicalTrialSeriesID IssuerOfClinicalTrialSiteID "
        "IssuerOfClinicalTrialSubjectID IssuerOfClinicalTrialSubjectReadingID "
        "IssuerOfClinicalTrialTimePointID IssuerOfPatientID IssuerOfServiceEpisodeID "
        "IssuerOfServiceEpisodeIDSequence LastMenstrualDate LensMake LensModel LensSerialNumber "
        "LensSpecification LongDeviceDescription MAC MakerNote MedicalAlerts MedicalRecordLocator "
        "MilitaryRank ModifiedAttributesSequence ModifiedImageDate ModifiedImageDescription ModifiedImageTime "
        "ModifyingDeviceID MultienergyAcquisitionDescription MultiplexGroupLabel NameOfPhysiciansReadingStudy "
        "NamesOfIntendedRecipientsOfResults NetworkID NonconformingDataElementValue "
        "NonconformingModifiedAttributesSequence ObservationDateTrial ObservationStartDateTime "
        "ObservationTimeTrial Occupation OrderCallbackPhoneNumber OrderCallbackTelecomInformation "
        "OrderEnteredBy OrderEntererLocation OriginalAttributesSequence Originator "
        "OtherClinicalTrialProtocolIDsSequence OtherPatientIDs OtherPatientIDsSequence OtherPatientNames "
        "OverlayDate OverlayTime ParticipantSequence PatientAddress PatientAge PatientBirthName "
        "PatientBirthTime PatientComments PatientInstitutionResidence PatientInsurancePlanCodeSequence "
        "PatientMotherBirthName PatientPrimaryLanguageCodeSequence PatientPrimaryLanguageModifierCodeSequence "
        "PatientReligiousPreference PatientSetupPhotoDescription PatientSize PatientState "
        "PatientTelecomInformation PatientTelephoneNumbers PatientTransportArrangements "
        "PatientTreatmentPreparationMethodDescription "
        "PatientTreatmentPreparationProcedureParameterDescription PatientWeight PerformedLocation "
        "PerformedProcedureStepDescription PerformedProcedureStepEndDate PerformedProcedureStepEndDateTime "
        "PerformedProcedureStepEndTime PerformedProcedureStepID PerformedProcedureStepStartDate "
        "PerformedProcedureStepStartDateTime PerformedProcedureStepStartTime PerformedStationAETitle "
        "PerformedStationGeographicLocationCodeSequence PerformedStationName PerformedStationNameCodeSequence "
        "PerformingPhysicianIdentificationSequence PerformingPhysicianName PersonAddress "
        "PersonTelecomInformation PersonTelephoneNumbers PhysicianApprovingInterpretation PhysiciansOfRecord "
        "PhysiciansOfRecordIdentificationSequence PhysiciansReadingStudyIdentificationSequence PlateID "
        "PositionAcquisitionTemplateDescription PositionAcquisitionTemplateName PreMedication PregnancyStatus "
        "PrescriptionDescription PresentationCreationDate PresentationCreationTime "
        "PriorTreatmentDoseDescription ProcedureStepCancellationDateTime ProductExpirationDateTime "
        "PyramidDescription PyramidLabel ROICreatorSequence ROIDateTime ROIDescription "
        "ROIGenerationDescription ROIInterpreterSequence ROIObservationDateTime ROIObservationDescription "
        "ROIObservationLabel RTPlanDescription RTPlanName RadiopharmaceuticalStartDateTime "
        "RadiopharmaceuticalStartTime RadiopharmaceuticalStopDateTime RadiopharmaceuticalStopTime "
        "ReasonForOmissionDescription ReasonForRequestedProcedureCodeSequence ReasonForStudy "
        "ReasonForTheImagingServiceRequest ReasonForTheRequestedProcedure ReasonForVisit "
        "ReasonForVisitCodeSequence ReceivingAE ReferencedDigitalSignatureSequence "
        "ReferencedPatientAliasSequence ReferencedPatientPhotoSequence ReferencedPatientSequence "
        "ReferencedSOPInstanceMACSequence ReferringPhysicianAddress ReferringPhysicianIdentificationSequence "
        "ReferringPhysicianTelephoneNumbers RegionOfResidence RequestAttributesSequence "
        "RequestedContrastAgent RequestedProcedureComments RequestedProcedureID RequestedProcedureLocation "
        "RequestedSeriesDescription RequestingAE RequestingPhysician RequestingService "
        "RespiratoryMotionCompensationTechniqueDescription ResponsibleOrganization ResponsiblePerson "
        "ResultsComments ResultsDistributionListSequence ResultsID ResultsIDIssuer RetrieveAETitle "
        "SOPAuthorizationDateTime ScheduledAdmissionDate ScheduledAdmissionTime ScheduledDischargeDate "
        "ScheduledDischargeTime ScheduledHumanPerformersSequence ScheduledPatientInstitutionResidence "
        "ScheduledPerformingPhysicianIdentificationSequence ScheduledPerformingPhysicianName "
        "ScheduledProcedureStepDescription ScheduledProcedureStepEndDate ScheduledProcedureStepEndTime "
        "ScheduledProcedureStepExpirationDateTime ScheduledProcedureStepID ScheduledProcedureStepLocation "
        "ScheduledProcedureStepModificationDateTime ScheduledProcedureStepStartDate "
        "ScheduledProcedureStepStartDateTime ScheduledProcedureStepStartTime ScheduledStationAETitle "
        "ScheduledStationGeographicLocationCodeSequence ScheduledStationName ScheduledStationNameCodeSequence "
        "ScheduledStudyLocation ScheduledStudyLocationAETitle ScheduledStudyStartDate ScheduledStudyStartTime "
        "ScheduledStudyStopDate ScheduledStudyStopTime SecondaryCaptureDeviceID SeriesDescription "
        "ServiceEpisodeDescription ServiceEpisodeID SetupTechniqueDescription ShieldingDeviceDescription "
        "SlideIdentifier SmokingStatus SourceManufacturer SpecialNeeds SpecimenAccessionNumber "
        "SpecimenDetailedDescription SpecimenShortDescription StationAETitle StructureSetDescription "
        "StructureSetName StudyArrivalDate StudyArrivalTime StudyComments StudyCompletionDate "
        "StudyCompletionTime StudyDescription StudyIDIssuer StudyReadDate StudyReadTime StudyVerifiedDate "
        "StudyVerifiedTime SubstanceAdministrationDateTime TelephoneNumberTrial TemplateLocalVersion "
        "TemplateVersion TextComments TextString TimeOfDocumentCreationOrVerbalTransactionTrial "
        "TimeOfLastCalibration TimeOfSecondaryCapture TimezoneOffsetFromUTC TopicAuthor TopicKeywords "
        "TopicSubject TopicTitle TransducerIdentificationSequence TreatmentSites UDISequence "
        "UniqueDeviceIdentifier VerbalSourceIdentifierCodeSequenceTrial VerbalSourceTrial VisitComments "
        "WaveformFilterDescription XRayDetectorLabel"
    ),
    "U": (
        "AcquisitionUID ConcatenationUID ConceptualVolumeUID ConstituentConceptualVolumeUID DeviceUID "
        "DigitalSignatureUID DimensionOrganizationUID DoseReferenceUID DosimetricObjectiveUID "
        "FailedSOPInstanceUIDList FiducialUID FrameOfReferenceUID InstanceCreatorUID IrradiationEventUID "
        "LargePaletteColorLookupTableUID ManufacturerDeviceClassUID MediaStorageSOPInstanceUID "
        "MultiplexGroupUID ObservationSubjectUIDTrial ObservationUID PaletteColorLookupTableUID "
        "PatientSetupUID PresentationDisplayCollectionUID PresentationSequenceCollectionUID PyramidUID "
        "RTTreatmentPhaseUID ReferencedConceptualVolumeUID ReferencedDoseReferenceUID "
        "ReferencedDosimetricObjectiveUID ReferencedFiducialsUID ReferencedFrameOfReferenceUID "
        "ReferencedGeneralPurposeScheduledProcedureStepTransactionUID ReferencedObservationUIDTrial "
        "ReferencedSOPInstanceUID ReferencedSOPInstanceUIDInFile ReferencedTreatmentPositionGroupUID "
        "RelatedFrameOfReferenceUID RequestedSOPInstanceUID SOPInstanceUID SeriesInstanceUID "
        "SourceConceptualVolumeUID SourceFrameOfReferenceUID SpecimenUID StorageMediaFileSetUID "
        "StudyInstanceUID SynchronizationFrameOfReferenceUID TableTopPositionAlignmentUID TargetUID "
        "TemplateExtensionCreatorUID TemplateExtensionOrganizationUID TrackingUID TransactionUID "
        "TreatmentPositionGroupUID TreatmentSessionUID UID"
    ),
    "Z/D": (
        "ContentCreatorName ContentDate ContentTime ContrastBolusAgent InstructionPerformedDateTime PatientID"
    ),
    "X/Z": (
        "AcquisitionContextSequence AcquisitionDate AcquisitionTime BarcodeValue LabelText PatientSexNeutered "
        "ReferencedStudySequence RequestedProcedureDescription ReviewerName SourceSerialNumber "
        "TreatmentMachineName"
    ),
    "X/D": (
        "AcquisitionDeviceProcessingDescription DateOfLastDetectorCalibration DetectorID "
        "EndAcquisitionDateTime FirstTreatmentDate InstanceCreationDate IntendedPhaseEndDate "
        "IntendedPhaseStartDate MostRecentTreatmentDate ObservationDateTime OperatorIdentificationSequence "
        "ProtocolName RTPlanDate RTPlanTime RTTreatmentApproachLabel SeriesDate SeriesTime "
        "StartAcquisitionDateTime TimeOfLastDetectorCalibration TreatmentDate TreatmentSite TreatmentTime "
        "WaveformAnnotationSequence"
    ),
    "X/Z/D": (
        "AcquisitionDateTime DeviceSerialNumber InstanceCreationTime InstitutionCodeSequence InstitutionName "
        "OperatorsName ReferencedPerformedProcedureStepSequence StationName"
    ),
    "X/Z/U*": (
        "ReferencedImageSequence SourceImageSequence"
    ),
}
#: ... and the table's repeating groups, removed: (group mask, group, element or None for any).
#: Curve Data (50xx,xxxx), Overlay Data (60xx,3000) and Overlay Comments (60xx,4000).
BASIC_PROFILE_REPEATING_GROUPS = ((0xFF00, 0x5000, None), (0xFF00, 0x6000, 0x3000), (0xFF00, 0x6000, 0x4000))
#: Stricter than the table: the free text of structured reports' content items (the table keeps
#: them, its Clean Structured Content option cleans them) is emptied, the items kept.
BEYOND_THE_TABLE = {"TextValue": "Z"}
#: Where the table lets the de-identifier choose, the choice made: Z keeps a Type 2 attribute
#: present (empty), X drops what no IOD requires; U* keeps a sequence and replaces its UIDs.
_CHOSEN_ACTIONS = {"Z/D": "Z", "X/Z": "Z", "X/D": "X", "X/Z/D": "Z", "X/Z/U*": "U"}

#: The profile's options (PS3.15 E.3), by the attributes they keep where the Basic Profile would
#: not: the attributes of the table's option columns that matter for images, not all of them.
#: Retain Device Identity (E.3.7):
DEVICE_IDENTITY_ATTRIBUTES = frozenset({
    "StationName", "DeviceSerialNumber", "DeviceUID", "DeviceLabel", "DeviceDescription", "DetectorID",
    "GantryID", "PlateID", "CassetteID", "PerformedStationAETitle", "PerformedStationName",
    "ScheduledStationAETitle", "ScheduledStationName", "SourceSerialNumber", "TreatmentMachineName",
    "PerformedStationGeographicLocationCodeSequence", "ScheduledStationGeographicLocationCodeSequence",
})
#: Retain Patient Characteristics (E.3.6):
PATIENT_CHARACTERISTICS_ATTRIBUTES = frozenset({
    "PatientAge", "PatientSex", "PatientSize", "PatientWeight", "EthnicGroup", "SmokingStatus",
    "PregnancyStatus", "PatientSexNeutered",
})
#: Clean Descriptors (E.3.5): free text kept, but cleaned of the patient's names and identifiers
#: and of anything that looks like a date or a long number (see _clean_text).
DESCRIPTOR_ATTRIBUTES = frozenset({
    "StudyDescription", "SeriesDescription", "ProtocolName", "ImageComments", "DerivationDescription",
    "PerformedProcedureStepDescription", "RequestedProcedureDescription", "ScheduledProcedureStepDescription",
    "AdmittingDiagnosesDescription", "StudyComments", "AcquisitionDeviceProcessingDescription",
    "ContrastBolusAgent", "AdditionalPatientHistory",
})
#: Retain Longitudinal Temporal Information (E.3.6): dates removed (the Basic Profile), kept
#: (Full Dates) or moved by a per-patient number of days (Modified Dates).
RETAIN_DATES = ("remove", "full", "offset")
#: Coded options for DeidentificationMethodCodeSequence (PS3.16 CID 7050, DCM).
DEIDENTIFICATION_CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "full": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "offset": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
}
#: Dummy values (action D) by VR; other text VRs get "ANONYMIZED", numbers 0.
_DUMMY_VALUES = {"PN": "ANONYMOUS", "DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000D",
                 "IS": "0", "DS": "0", "AE": "ANONYMOUS", "CS": "ANONYMIZED"}
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"})
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
#: Pseudonymous UIDs: 2.25 and a UUID's integer (PS3.5 B.2), the UUID made from the original
#: UID by HMAC-SHA-256 under the map's secret key (RFC 9562's version 8, for custom UUIDs).
PSEUDONYM_UID_ROOT = "2.25."
#: How many recorded UIDs a PseudonymMap remembers, not to write them again.
_RECORDED_UIDS_REMEMBERED = 200_000
#: A patient's random date offset in Modified Dates mode: 1 to 10 years back, in days.
_DATE_OFFSET_DAYS = (365, 3650)


@functools.lru_cache(maxsize=1)
def basic_profile_table() -> dict[int, str]:
    """Table E.1-1 as tag -> action (D, Z, X, U, Z/D, ...)."""
    table = {}
    for action, names in [*BASIC_PROFILE_ACTIONS.items(), *((a, k) for k, a in BEYOND_THE_TABLE.items())]:
        for name in names.split():
            tag = tag_for_keyword(name) if not re.fullmatch(r"[0-9A-F]{8}", name) else int(name, 16)
            if tag is None:
                raise ValueError(f"Table E.1-1 names {name}, which is not a DICOM keyword")
            table[tag] = action
    return table


def _keyword_tags(keywords) -> frozenset[int]:
    return frozenset(tag_for_keyword(keyword) for keyword in keywords)


@dataclasses.dataclass(frozen=True)
class DeidentificationOptions:
    """The Basic Profile's options (PS3.15 E.3) a de-identification applies."""

    retain_dates: str = "remove"  #: remove, full or offset (see RETAIN_DATES)
    retain_uids: bool = False
    retain_device_identity: bool = False
    retain_patient_characteristics: bool = False
    clean_descriptors: bool = False

    @classmethod
    def from_params(cls, params: dict) -> "DeidentificationOptions":
        """Options from request parameters or a JSON object (true/false, yes/no, 1/0); ValueError
        with a reason fit for the caller."""
        def flag(name):
            value = params.get(name, False)
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in ("", "0", "1", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(f"{name} must be true or false, not {str(value)[:40]!r}")
            return text in ("1", "true", "yes", "on")

        retain_dates = str(params.get("retain_dates") or "remove").strip().lower()
        if retain_dates not in RETAIN_DATES:
            raise ValueError(f"retain_dates must be one of {', '.join(RETAIN_DATES)}, not {retain_dates[:40]!r}")
        return cls(retain_dates, flag("retain_uids"), flag("retain_device_identity"),
                   flag("retain_patient_characteristics"), flag("clean_descriptors"))

    def method_codes(self) -> list[tuple[str, str]]:
        """(code value, code meaning) of the profile and of each option applied."""
        names = ["basic", "clean_descriptors" if self.clean_descriptors else None,
                 self.retain_dates if self.retain_dates != "remove" else None,
                 "retain_patient_characteristics" if self.retain_patient_characteristics else None,
                 "retain_device_identity" if self.retain_device_identity else None,
                 "retain_uids" if self.retain_uids else None]
        return [DEIDENTIFICATION_CODES[name] for name in names if name]


class PatientPseudonym(typing.NamedTuple):
    """One patient of the pseudonym map: who it stands for, and how its dates are moved."""
    pseudonym: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    patient_birth_date: str
    date_offset_days: int  #: added to every date in Modified Dates mode (negative: earlier)
    created: str


class UidPseudonym(typing.NamedTuple):
    """One UID replaced by de-identification."""
    original: str
    replacement: str
    created: str


#: The version of the pseudonym map's schema (pseudonyms.sqlite's user_version, or
#: dicoogled_pseudonyms.schema_version). Version 1 is the schema files made before it had one.
PSEUDONYMS_SCHEMA_VERSION = 1
PSEUDONYMS_SCHEMA = """
CREATE TABLE IF NOT EXISTS map_secret (id INTEGER PRIMARY KEY CHECK (id = 1), secret {blob} NOT NULL);
CREATE TABLE IF NOT EXISTS patients (
    patient_key TEXT PRIMARY KEY, pseudonym TEXT NOT NULL UNIQUE, patient_id TEXT NOT NULL,
    issuer_of_patient_id TEXT NOT NULL, patient_name TEXT NOT NULL, patient_birth_date TEXT NOT NULL,
    date_offset_days INTEGER NOT NULL, created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS uids (original TEXT PRIMARY KEY, replacement TEXT NOT NULL, created TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS uids_by_replacement ON uids (replacement);
CREATE INDEX IF NOT EXISTS uids_by_created ON uids (created, original);
"""


class PseudonymMap:
    """Who each pseudonym stands for: data_dir/pseudonyms.sqlite (owner-only), or, with the index
    in PostgreSQL, schema dicoogled_pseudonyms of its database, so that every node gives a patient
    the same pseudonym. Kept apart from the index's tables, so the de-identified copies and the
    key to them can be held apart.

    The same patient (PatientID and IssuerOfPatientID, or PatientName and PatientBirthDate when
    there is no ID) always gets the same pseudonym: random, so nothing outside the map leads
    back from it. UIDs are replaced by a keyed hash of the original under the map's secret: the
    same original UID always gives the same new one, and each replacement is recorded, so a
    data custodian can re-identify both patients and objects."""

    def __init__(self, location: "pathlib.Path | str"):
        # Opened on first use: an archive that never de-identifies has no map file, and a full
        # disk at start does not stop the daemon.
        self._state = StateOnFirstUse(location, "dicoogled_pseudonyms", PSEUDONYMS_SCHEMA_VERSION, PSEUDONYMS_SCHEMA)
        self._lock = threading.Lock()
        self._making_secret = threading.Lock()
        self._secret_key = b""
        #: What is already stored, so that de-identifying a large set costs a write per new
        #: patient or UID only: patient key -> its row, and the originals of recorded UIDs.
        self._known_patients: dict[str, PatientPseudonym] = {}
        self._recorded_uids: set[str] = set()

    @property
    def database(self) -> StateDatabase:
        return self._state.get()

    @property
    def _secret(self) -> bytes:
        """The key new UIDs are derived under, kept in the map: made by the first node that
        needs it (not when the map is opened, so that migrate can copy an existing one in)."""
        database = self.database
        with self._making_secret:
            if not self._secret_key:
                with database.transaction() as db:
                    db.execute("INSERT INTO map_secret (id, secret) VALUES (1, ?) ON CONFLICT (id) DO NOTHING",
                               (secrets.token_bytes(32),))
                    self._secret_key = bytes(db.execute("SELECT secret FROM map_secret").fetchall()[0][0])
            return self._secret_key

    @staticmethod
    def patient_key(dataset: Dataset) -> str:
        """What identifies a patient: its ID and the ID's issuer, else its name and birth date."""
        patient_id = str(dataset.get("PatientID", "") or "").strip()
        if patient_id:
            return json.dumps(["id", patient_id, str(dataset.get("IssuerOfPatientID", "") or "").strip()])
        return json.dumps(["name", str(dataset.get("PatientName", "") or "").strip(),
                           str(dataset.get("PatientBirthDate", "") or "").strip()])

    _PATIENT = ("SELECT pseudonym, patient_id, issuer_of_patient_id, patient_name, patient_birth_date,"
                " date_offset_days, created FROM patients WHERE patient_key = ?")

    def patient(self, dataset: Dataset) -> PatientPseudonym:
        """The pseudonym of a data set's patient, made (random) the first time it is seen."""
        key = self.patient_key(dataset)
        with self._lock:
            if key in self._known_patients:
                return self._known_patients[key]
            with self.database.transaction() as db:
                found = db.execute(self._PATIENT, (key,)).fetchall()
                if not found:
                    low, high = _DATE_OFFSET_DAYS
                    made = PatientPseudonym(
                        "ANON-" + base64.b32encode(secrets.token_bytes(10)).decode("ascii"),
                        str(dataset.get("PatientID", "") or ""), str(dataset.get("IssuerOfPatientID", "") or ""),
                        str(dataset.get("PatientName", "") or ""), str(dataset.get("PatientBirthDate", "") or ""),
                        -(low + secrets.randbelow(high - low + 1)), _utc_text(time.time_ns()))
                    # Another node making the same patient's at once: its row wins, and is read back.
                    db.execute("INSERT INTO patients (patient_key, pseudonym, patient_id, issuer_of_patient_id,"
                               " patient_name, patient_birth_date, date_offset_days, created)"
                               " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (patient_key) DO NOTHING", (key, *made))
                    found = db.execute(self._PATIENT, (key,)).fetchall()
            self._known_patients[key] = PatientPseudonym(*found[0])
            return self._known_patients[key]

    def replacement_uid(self, original: str) -> str:
        """The UID that stands for original: the same every time, and unguessable without the key."""
        digest = bytearray(hmac.new(self._secret, original.encode("ascii", "replace"), hashlib.sha256).digest()[:16])
        digest[6] = (digest[6] & 0x0F) | 0x80  # version 8
        digest[8] = (digest[8] & 0x3F) | 0x80  # the RFC's variant
        return PSEUDONYM_UID_ROOT + str(int.from_bytes(digest, "big"))

    def record_uids(self, pairs: dict[str, str]):
        """Keep original -> replacement pairs, for re-identification."""
        created = _utc_text(time.time_ns())
        with self._lock:
            new = {original: replacement for original, replacement in pairs.items() if original not in self._recorded_uids}
            if not new:
                return
            with self.database.transaction() as db:
                db.executemany("INSERT INTO uids (original, replacement, created) VALUES (?, ?, ?)"
                               " ON CONFLICT (original) DO NOTHING",
                               [(original, replacement, created) for original, replacement in new.items()])
            if len(self._recorded_uids) > _RECORDED_UIDS_REMEMBERED:
                self._recorded_uids.clear()  # a few writes again, rather than memory without end
            self._recorded_uids.update(new)

    def patients(self) -> list[PatientPseudonym]:
        """Every patient of the map, by pseudonym."""
        with self.database.connection() as db:
            rows = db.execute("SELECT pseudonym, patient_id, issuer_of_patient_id, patient_name, patient_birth_date,"
                              " date_offset_days, created FROM patients ORDER BY pseudonym").fetchall()
        return [PatientPseudonym(*row) for row in rows]

    def uids(self, replacement: str = "", limit: int = 1000, offset: int = 0, original: str = "") -> list[UidPseudonym]:
        """Recorded UID replacements, oldest first (then by original UID): only the one for
        replacement, or the one of original, if given (both: the pair, if it is one)."""
        conditions = [(column, value) for column, value in (("replacement", replacement), ("original", original)) if value]
        where = ("WHERE " + " AND ".join(f"{column} = ?" for column, _ in conditions)) if conditions else ""
        args = tuple(value for _, value in conditions)
        with self.database.connection() as db:
            rows = db.execute(f"SELECT original, replacement, created FROM uids {where}"
                              " ORDER BY created, original LIMIT ? OFFSET ?", (*args, limit, offset)).fetchall()
        return [UidPseudonym(*row) for row in rows]

    def close(self):
        with self._lock:
            self._state.close()


def _shift_date(value: str, days: int) -> str:
    """A DA (YYYYMMDD) or DT (YYYYMMDD...) value moved by days; "" when it is not a full date."""
    value = value.strip()
    try:
        moved = datetime.datetime.strptime(value[:8], "%Y%m%d").date() + datetime.timedelta(days=days)
    except ValueError:
        return ""
    return f"{moved.year:04d}{moved.month:02d}{moved.day:02d}" + value[8:]


#: What Clean Descriptors removes besides the patient's own names and IDs: dates and long numbers.
_IDENTIFYING_TEXT = re.compile(r"\b\d{4}[-/.]?\d{2}[-/.]?\d{2}\b|\b\d{2}[-/.]\d{2}[-/.]\d{2,4}\b|\d{6,}")


def _clean_text(text: str, identifiers: list[str]) -> str:
    """Free text without the identifiers given (case-insensitive) nor dates and long numbers."""
    for identifier in sorted(identifiers, key=len, reverse=True):
        text = re.sub(re.escape(identifier), "", text, flags=re.IGNORECASE)
    return " ".join(_IDENTIFYING_TEXT.sub("", text).split())


class DeidentificationRefused(ValueError):
    """An object that tag-based de-identification cannot make safe."""


def part10_bytes(dataset: Dataset) -> bytes:
    """A data set with its file meta group as Part 10 bytes."""
    output = io.BytesIO()
    dataset.save_as(output, enforce_file_format=True)
    return output.getvalue()


class Deidentifier:
    """PS3.15 Annex E's Basic Application Level Confidentiality Profile, with its options, on
    one data set at a time, with the pseudonyms of a PseudonymMap. Thread-safe: research
    exports, downloads and share links may all call deidentify at once.

        copy = daemon.deidentifier.deidentify(dataset, DeidentificationOptions(retain_dates="offset"))

    Beyond the tags: text burnt into pixels is not looked at (the Clean Pixel Data option is not
    offered), so instances with BurnedInAnnotation YES are refused (DeidentificationRefused)."""

    #: DeidentificationMethod (LO, 64 characters at most): the profile and the table's edition.
    METHOD = "PS3.15 E.1 Basic Profile, Table E.1-1 2026c (dicoogled)"

    def __init__(self, pseudonyms: PseudonymMap):
        self.pseudonyms = pseudonyms
        self._table = basic_profile_table()
        self._device = _keyword_tags(DEVICE_IDENTITY_ATTRIBUTES)
        self._characteristics = _keyword_tags(PATIENT_CHARACTERISTICS_ATTRIBUTES)
        self._descriptors = _keyword_tags(DESCRIPTOR_ATTRIBUTES)

    def deidentify(self, dataset: Dataset, options: DeidentificationOptions = DeidentificationOptions()) -> Dataset:
        """A de-identified copy of dataset (the original is not changed), its file meta group
        included; raises DeidentificationRefused for what tags cannot make safe."""
        if str(dataset.get("BurnedInAnnotation", "")).upper() == "YES":
            raise DeidentificationRefused("BurnedInAnnotation is YES: identifying text may be in the pixels")
        patient = self.pseudonyms.patient(dataset)
        identifiers = [part for part in re.split(r"[\^= ,]+", str(dataset.get("PatientName", "") or "")) if len(part) > 1]
        identifiers += [str(dataset.get(keyword, "") or "") for keyword in ("PatientID", "AccessionNumber", "OtherPatientIDs")]
        copy_ = copy.deepcopy(dataset)
        uids: dict[str, str] = {}
        self._apply(copy_, options, patient, [i for i in identifiers if len(i) > 1], uids)
        # PS3.15 E.1.1: the identity removed, and how.
        copy_.PatientName = copy_.PatientID = patient.pseudonym
        copy_.PatientIdentityRemoved = "YES"
        copy_.DeidentificationMethod = self.METHOD
        codes = []
        for value, meaning in options.method_codes():
            code = Dataset()
            code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, "DCM", meaning
            codes.append(code)
        copy_.DeidentificationMethodCodeSequence = Sequence(codes)
        copy_.LongitudinalTemporalInformationModified = {"remove": "REMOVED", "full": "UNMODIFIED",
                                                         "offset": "MODIFIED"}[options.retain_dates]
        meta = getattr(dataset, "file_meta", None)
        copy_.file_meta = FileMetaDataset()
        copy_.file_meta.MediaStorageSOPClassUID = copy_.SOPClassUID
        copy_.file_meta.MediaStorageSOPInstanceUID = copy_.SOPInstanceUID
        copy_.file_meta.TransferSyntaxUID = (meta.TransferSyntaxUID if meta is not None and "TransferSyntaxUID" in meta
                                             else pydicom.uid.ExplicitVRLittleEndian)
        self.pseudonyms.record_uids(uids)
        return copy_

    def deidentify_part10(self, data: bytes, options: DeidentificationOptions = DeidentificationOptions()) -> bytes:
        """De-identify a Part 10 byte string (a stored file): the copy's Part 10 bytes."""
        return part10_bytes(self.deidentify(pydicom.dcmread(io.BytesIO(data), force=True), options))

    def _action(self, tag: int, vr: str, options: DeidentificationOptions) -> str:
        """What to do with one element: the table's action, changed by the options."""
        action = self._table.get(tag)
        if action is None:
            return "K"
        if options.retain_uids and action == "U":
            return "K"
        if (options.retain_device_identity and tag in self._device) or (
                options.retain_patient_characteristics and tag in self._characteristics):
            return "K"
        if options.clean_descriptors and tag in self._descriptors:
            return "C"
        if vr in ("DA", "DT", "TM") and tag != 0x00100030 and options.retain_dates != "remove":
            # The patient's birth date goes whatever is kept: with the study dates it gives the age.
            return "K" if options.retain_dates == "full" or vr == "TM" else "shift"
        return _CHOSEN_ACTIONS.get(action, action)

    def _apply(self, dataset: Dataset, options, patient: PatientPseudonym, identifiers: list[str], uids: dict):
        for tag in list(dataset.keys()):
            if tag.is_private or any(tag.group & mask == group and element in (None, tag.element)
                                     for mask, group, element in BASIC_PROFILE_REPEATING_GROUPS):
                del dataset[tag]
                continue
            element = dataset[tag]
            vr = element.VR
            action = self._action(int(tag), vr, options)
            if action == "X":
                del dataset[tag]
            elif vr == "SQ":
                if action == "Z":
                    element.value = Sequence()
                else:  # the table's actions apply inside items too, at any depth
                    for item in element.value:
                        self._apply(item, options, patient, identifiers, uids)
            elif action == "Z" or (element.value in (None, "", b"") and action != "K"):
                element.value = None
            elif action == "U" or (action == "D" and vr == "UI"):
                self._replace_uids(element, uids)
            elif action == "D":
                element.value = self._dummy(vr, element.VM)
            elif action == "shift":
                values = element.value if element.VM > 1 else [element.value]
                shifted = [_shift_date(str(value), patient.date_offset_days) for value in values]
                element.value = shifted if element.VM > 1 else shifted[0]
            elif action == "C" and vr in _TEXT_VRS:
                element.value = _clean_text(str(element.value), identifiers)

    def _replace_uids(self, element, uids: dict):
        values = list(element.value) if element.VM > 1 else [element.value]
        replaced = []
        for value in values:
            original = str(value).strip()
            if original:
                uids[original] = replaced_uid = uids.get(original) or self.pseudonyms.replacement_uid(original)
                replaced.append(replaced_uid)
        element.value = replaced if len(replaced) > 1 else (replaced[0] if replaced else None)

    @staticmethod
    def _dummy(vr: str, multiplicity: int):
        if vr in _DUMMY_VALUES:
            return _DUMMY_VALUES[vr]
        if vr in _BINARY_VRS:
            return b""
        if vr in _TEXT_VRS:
            return "ANONYMIZED"
        return 0  # US, SS, UL, SL, FL, FD, AT ...



class ResearchExportReport(typing.NamedTuple):
    """What one research export did."""
    studies: list  #: the StudyInstanceUIDs of the de-identified copies
    stored: int
    failed: int  #: not stored: refused by the ingest path, or not de-identifiable (BurnedInAnnotation)


def research_export(index: Index, storage: Storage, ingest: Ingest, deidentifier: Deidentifier, label: str,
                    into: str, options: DeidentificationOptions, progress=lambda fraction: None,
                    stop: threading.Event | None = None, study_uids=()) -> ResearchExportReport:
    """De-identify every instance carrying label (on its study or series), and every instance of
    study_uids, into new studies labelled into, each copy entering the archive through the one
    ingest path, as STOW-RS's.

    The copies' UIDs are derived from the originals', so a second export of the same instances
    finds them already there (duplicates as [storage] duplicates says); Retain UIDs is refused,
    as the copies would then be the originals."""
    if options.retain_uids:
        raise ValueError("retain_uids cannot be used for an export into this archive: the copies would have the"
                         " originals' UIDs")
    instances = [instance for series_uid in (index.labelled("SERIES", label) if label else [])
                 for instance in index.instances_of(series_uid=series_uid)]
    instances += [instance for study_uid in study_uids for instance in index.instances_of(study_uid=study_uid)]
    label = label or f"{len(study_uids)} studies"  # what the log lines name
    log = logging.getLogger("dicoogled.research")
    studies, stored, failed = set(), 0, 0
    for done, instance in enumerate(instances):
        if stop is not None and stop.is_set():
            break
        progress(done / len(instances))
        try:
            copy_ = deidentifier.deidentify(pydicom.dcmread(io.BytesIO(storage.read(instance.path))), options)
        except (DeidentificationRefused, OSError, InvalidDicomError) as error:
            failed += 1
            log.warning("research export %s: %s not exported: %s", label, instance.sop_instance_uid, error)
            continue
        status = ingest.store_received(part10_bytes(copy_), origin="stow")
        if status != SUCCESS:
            failed += 1
            log.warning("research export %s: %s refused by the archive: 0x%04X %s", label,
                        instance.sop_instance_uid, status, getattr(status, "reason", ""))
            continue
        stored += 1
        study_uid = copy_.StudyInstanceUID
        if study_uid not in studies:
            index.write(Index.add_label, "STUDY", study_uid, into)
            studies.add(study_uid)
    log.info("research export of label %s into %s: %d studies, %d instances stored, %d failed",
             label, into, len(studies), stored, failed)
    return ResearchExportReport(sorted(studies), stored, failed)


# ============================================================================================
# Users and sessions: password hashes, tokens, presets (data_dir/users.sqlite, or PostgreSQL)
# ============================================================================================

#: The version of the users schema (users.sqlite's user_version): a later one migrates from it.
#: 2: login_failures, so that every node counts a client's failed logins together.
USERS_SCHEMA_VERSION = 2
USERS_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    username TEXT PRIMARY KEY, password_hash {blob} NOT NULL, salt {blob} NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0, roles TEXT NOT NULL DEFAULT '[]',
    credentials_stamp TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY, username TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    credentials_stamp TEXT NOT NULL, created DOUBLE PRECISION NOT NULL, last_used DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (username);
CREATE TABLE IF NOT EXISTS presets (
    username TEXT NOT NULL, name TEXT NOT NULL, fields TEXT NOT NULL, PRIMARY KEY (username, name)
);
CREATE TABLE IF NOT EXISTS collection_access (
    label TEXT NOT NULL, member_kind TEXT NOT NULL CHECK (member_kind IN ('user', 'group')),
    member TEXT NOT NULL, access TEXT NOT NULL CHECK (access IN ('read', 'write')),
    PRIMARY KEY (label, member_kind, member)
);
CREATE INDEX IF NOT EXISTS collection_access_by_member ON collection_access (member_kind, member);
CREATE TABLE IF NOT EXISTS share_links (
    id TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE, created_by TEXT NOT NULL, created DOUBLE PRECISION NOT NULL,
    label TEXT NOT NULL DEFAULT '', study_uids TEXT NOT NULL DEFAULT '[]',
    expires DOUBLE PRECISION, uses_allowed INTEGER, uses INTEGER NOT NULL DEFAULT 0, revoked DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS share_sessions (
    token_hash TEXT PRIMARY KEY, share_id TEXT NOT NULL REFERENCES share_links(id) ON DELETE CASCADE,
    created DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS login_failures (
    address TEXT NOT NULL, username TEXT NOT NULL, time DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS login_failures_by_pair ON login_failures (address, username, time);
CREATE INDEX IF NOT EXISTS login_failures_by_time ON login_failures (time);
"""
#: How long HTTP Basic credentials, once checked, are taken without running scrypt again.
BASIC_CREDENTIALS_MEMORY = 300


@dataclasses.dataclass(frozen=True)
class User:
    username: str
    admin: bool
    roles: tuple = ()  #: the groups the user belongs to (collections are granted to groups by these names)


#: The rights on a collection (a label with members): read sees its studies, write also puts
#: its label on (and takes it off) the studies the member sees.
COLLECTION_ACCESS = ("read", "write")


class ShareLink(typing.NamedTuple):
    """A link that shows some studies, or a collection, read-only and without an account."""
    id: str  #: public: it names the link to list and revoke it; the token opens it
    created_by: str
    created: float  #: seconds since the epoch
    label: str  #: the collection shared, or ""
    study_uids: tuple  #: the studies shared (none when a collection is)
    expires: float | None  #: when it stops opening and showing, or None
    uses_allowed: int | None  #: how many times it may be opened, or None
    uses: int  #: how many times it was opened
    revoked: float | None  #: when it was revoked, or None

    def state(self, now: float) -> str:
        """active, revoked, expired or used (it was opened as often as allowed)."""
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        if self.uses_allowed is not None and self.uses >= self.uses_allowed:
            return "used"
        return "active"

    @property
    def visibility(self) -> "Visibility":
        """What the link shows: its studies, or its collection's."""
        return Visibility.of([self.label] if self.label else [], self.study_uids)


_SHARE_COLUMNS = "id, created_by, created, label, study_uids, expires, uses_allowed, uses, revoked"


def _share_link(row) -> ShareLink:
    return ShareLink(*row[:4], tuple(json.loads(row[4])), *row[5:])


class CollectionGrant(typing.NamedTuple):
    """One member's access to one collection."""
    label: str
    member_kind: str  #: "user" or "group"
    member: str
    access: str  #: "read" or "write"


def _hash_password(password: str, salt: bytes) -> bytes:
    # scrypt: slow and memory-hard on purpose, so a stolen users.sqlite resists guessing.
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=2**14, r=8, p=1, dklen=32)


def _new_credentials_stamp() -> str:
    return secrets.token_hex(16)


def _token_hash(token: str) -> str:
    # Only a hash of each token is kept: a copy of users.sqlite opens no session.
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


class Users:
    """Accounts and login sessions. Tokens survive restarts and expire after idle_minutes.

    Every user has a credentials stamp, a random value made anew when the user is created and
    whenever its password or rights change; a session holds the stamp it was opened under and is
    valid only while the two agree. So deleting a user, re-creating one under the same name,
    changing a password or rights ends the sessions at once, whatever else goes wrong.

    They live in location: data_dir/users.sqlite, or the index's PostgreSQL URL, whose database
    every node shares (schema dicoogled_users): a session opened on one node works on all, and
    a user's change ends its sessions on all. Nothing of them is cached but Basic credentials,
    whose memory holds only while the stamp in the database is the one they were checked under."""

    def __init__(self, location: pathlib.Path | str, idle_minutes: float = 720):
        self.idle_seconds = idle_minutes * 60
        self.log = logging.getLogger("dicoogled.http")
        # An account change is on disk before it is answered (synchronous FULL).
        self._db = StateDatabase(location, "dicoogled_users", pool_size=8)
        self._db.migrate(USERS_SCHEMA_VERSION, USERS_SCHEMA, before=None if self._db.postgresql else self._migrate)
        #: (username, SHA-256 of a password) -> (until when, the credentials stamp it was good for).
        self._basic_cache: dict[tuple[str, bytes], tuple[float, str]] = {}
        self._basic_cache_lock = threading.Lock()

    def _migrate(self, db):
        """Give users of an older users.sqlite a credentials stamp; end the sessions opened
        before stamps (and token hashes) existed: their users log in again."""
        columns = {row[1] for row in db.execute("PRAGMA table_info(users)")}
        if columns and "credentials_stamp" not in columns:
            db.execute("ALTER TABLE users ADD COLUMN credentials_stamp TEXT NOT NULL DEFAULT ''")
            for (username,) in db.execute("SELECT username FROM users").fetchall():
                db.execute("UPDATE users SET credentials_stamp = ? WHERE username = ?", (_new_credentials_stamp(), username))
        session_columns = {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
        if session_columns and "credentials_stamp" not in session_columns:
            db.execute("DROP TABLE sessions")
            self.log.warning("sessions from an older version ended: their users log in again")

    def _query(self, sql, args=()):
        with self._db.connection() as db:
            return db.execute(sql, args).fetchall()

    def _write(self, sql, args=()):
        with self._db.transaction() as db:
            db.execute(sql, args)
            return db.changes()

    def ensure_admin(self, data_dir: pathlib.Path, password: str | None):
        """On first start create user 'admin' with DICOOGLED_ADMIN_PASSWORD, or a random
        password written to a file only the owner can read."""
        if self._query("SELECT 1 FROM users LIMIT 1"):
            return
        generated = not password
        password = password or secrets.token_urlsafe(12)
        # Created before the file is written: of nodes starting at once on one database and data
        # dir, only the one that made the user writes the shared file, and none deletes it.
        if not self.create("admin", password, admin=True):
            self.log.info("user 'admin' was created by another node meanwhile")
            return
        if generated:
            secret_file = data_dir / "admin-password.txt"
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(password + "\n")
                handle.flush()
                os.fsync(handle.fileno())  # on disk with its name: the only copy of the password
            fsync_folder(data_dir)
            self.log.warning("created user 'admin'; its password is in %s", secret_file)
        else:
            self.log.info("created user 'admin' with the password from DICOOGLED_ADMIN_PASSWORD")

    def create(self, username: str, password: str, admin: bool = False, roles=()) -> bool:
        if not USERNAME_PATTERN.match(username or ""):
            raise ValueError("a username is 1 to 64 letters, digits or . _ @ -")
        if not password:
            raise ValueError("a password may not be empty")
        salt = secrets.token_bytes(16)
        # One statement, so that two nodes creating the same name at once make one user.
        return bool(self._write("INSERT INTO users (username, password_hash, salt, admin, roles, credentials_stamp)"
                                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (username) DO NOTHING",
                                (username, _hash_password(password, salt), salt, int(admin), json.dumps(list(roles)),
                                 _new_credentials_stamp())))

    @staticmethod
    def _restamp(db, username: str, keep_token: str | None = None) -> int:
        """A new credentials stamp for username, ending its sessions but keep_token's; call
        inside a transaction (db). The number of sessions ended."""
        stamp = _new_credentials_stamp()
        db.execute("UPDATE users SET credentials_stamp = ? WHERE username = ?", (stamp, username))
        kept = _token_hash(keep_token) if keep_token else ""
        db.execute("DELETE FROM sessions WHERE username = ? AND token_hash != ?", (username, kept))
        ended = db.changes()
        db.execute("UPDATE sessions SET credentials_stamp = ? WHERE token_hash = ?", (stamp, kept))
        return ended

    def set_password(self, username: str, password: str, keep_token: str | None = None) -> bool:
        """Change a password and end the user's sessions, but the one of keep_token (the
        session a user changed its own password in)."""
        if not password:
            raise ValueError("a password may not be empty")
        salt = secrets.token_bytes(16)
        password_hash = _hash_password(password, salt)
        with self._db.transaction() as db:
            db.execute("UPDATE users SET password_hash = ?, salt = ? WHERE username = ?", (password_hash, salt, username))
            if not db.changes():
                return False
            ended = self._restamp(db, username, keep_token)
        self.log.info("password of %s changed; %d of its sessions ended", username, ended)
        return True

    def set_rights(self, username: str, admin: bool | None = None, roles=None) -> bool:
        """Change whether a user is an administrator and its roles (None: unchanged); if either
        changes, its sessions end. False if there is no such user; ValueError for the last
        administrator."""
        with self._db.transaction() as db:
            row = db.execute("SELECT admin, roles FROM users WHERE username = ?", (username,)).fetchone()
            if not row:
                return False
            admin = bool(row[0]) if admin is None else admin
            roles = json.loads(row[1]) if roles is None else list(roles)
            if (admin, roles) == (bool(row[0]), json.loads(row[1])):
                return True  # nothing changes, so no session need end
            if row[0] and not admin and self._administrators(db) <= 1:
                raise ValueError("the last administrator keeps its rights")
            db.execute("UPDATE users SET admin = ?, roles = ? WHERE username = ?", (int(admin), json.dumps(roles), username))
            ended = self._restamp(db, username)
        self.log.info("rights of %s changed (admin %s, roles %s); %d of its sessions ended",
                      username, admin, ",".join(roles) or "none", ended)
        return True

    def delete(self, username: str) -> bool:
        """Delete a user and its sessions; the last admin is never deleted."""
        with self._db.transaction() as db:
            row = db.execute("SELECT admin FROM users WHERE username = ?", (username,)).fetchone()
            if not row:
                return False
            if row[0] and self._administrators(db) <= 1:
                return False
            db.execute("DELETE FROM sessions WHERE username = ?", (username,))
            # A user made again under the same name starts without the old one's collections.
            db.execute("DELETE FROM collection_access WHERE member_kind = 'user' AND member = ?", (username,))
            db.execute("DELETE FROM users WHERE username = ?", (username,))
        self.log.info("user %s deleted, and its sessions", username)
        return True

    def _administrators(self, db) -> int:
        """How many administrators there are, inside a transaction (db) that may take one away:
        their rows stay locked until it ends, so two nodes demoting or deleting the last two
        administrators at once cannot leave none (the second counts after the first)."""
        return len(db.execute(f"SELECT username FROM users WHERE admin != 0{self._db.for_update}").fetchall())

    def all(self) -> list[User]:
        return [User(name, bool(admin), tuple(json.loads(roles)))
                for name, admin, roles in self._query("SELECT username, admin, roles FROM users ORDER BY username")]

    def get(self, username: str) -> User | None:
        found = self._user_and_stamp(username)
        return found[0] if found else None

    def _user_and_stamp(self, username: str) -> tuple[User, str] | None:
        rows = self._query("SELECT username, admin, roles, credentials_stamp FROM users WHERE username = ?", (username,))
        if not rows:
            return None
        name, admin, roles, stamp = rows[0]
        return User(name, bool(admin), tuple(json.loads(roles))), stamp

    def authenticate(self, username: str, password: str) -> User | None:
        found = self._authenticate(username, password)
        return found[0] if found else None

    def _authenticate(self, username: str, password: str) -> tuple[User, str] | None:
        rows = self._query("SELECT password_hash, salt FROM users WHERE username = ?", (username or "",))
        if not rows:
            _hash_password(password or "", b"0" * 16)  # same cost whether or not the user exists
            return None
        stored, salt = rows[0]
        if not hmac.compare_digest(bytes(stored), _hash_password(password or "", bytes(salt))):
            return None
        return self._user_and_stamp(username)

    def authenticate_basic(self, username: str, password: str) -> User | None:
        """authenticate() with a short memory, so scripts sending Basic credentials with every
        request do not pay for scrypt each time. What it remembers holds only while the user's
        credentials stamp is the one the password was checked under."""
        key = (username, hashlib.sha256(password.encode("utf-8", "replace")).digest())
        with self._basic_cache_lock:
            until, stamp = self._basic_cache.get(key, (0.0, ""))
        if until > time.monotonic():
            found = self._user_and_stamp(username)
            if found and hmac.compare_digest(found[1], stamp):
                return found[0]
        found = self._authenticate(username, password)
        now = time.monotonic()
        with self._basic_cache_lock:
            for old in [k for k, (until, _) in self._basic_cache.items() if until <= now] + [key]:
                self._basic_cache.pop(old, None)
            if found:
                self._basic_cache[key] = (now + BASIC_CREDENTIALS_MEMORY, found[1])
        return found[0] if found else None

    def start_session(self, user: User) -> str:
        token = secrets.token_urlsafe(32)
        now = time.time()
        # The stamp is the user's now: a session opened as its rights change gets the new one.
        self._write("INSERT INTO sessions (token_hash, username, credentials_stamp, created, last_used)"
                    " SELECT ?, username, credentials_stamp, ?, ? FROM users WHERE username = ?",
                    (_token_hash(token), now, now, user.username))
        return token

    def session_user(self, token: str) -> User | None:
        """The user of a session, which counts as a use of it; None if there is no such session,
        its user's credentials changed since it began, or it was idle for idle_minutes."""
        token_hash = _token_hash(token)
        now = time.time()
        row = None
        try:
            # Every use is written, so a session expires exactly idle_minutes after its last use.
            # Not flushed to disk (an fsync per request would cost milliseconds): a power cut may
            # lose the last uses, which only makes sessions expire sooner.
            with self._db.transaction(durable=False) as db:
                row = db.execute(
                    "SELECT u.username, u.admin, u.roles, s.last_used FROM sessions s"
                    " JOIN users u ON u.username = s.username AND u.credentials_stamp = s.credentials_stamp"
                    " WHERE s.token_hash = ?", (token_hash,)).fetchone()
                if row is None or now - row[3] > self.idle_seconds:
                    row = None
                    db.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash,))
                else:
                    db.execute("UPDATE sessions SET last_used = ? WHERE token_hash = ?", (now, token_hash))
        except Exception as error:
            if not is_out_of_space(error):
                raise
            self.log.debug("session use not recorded: the disk is full")  # it must not lock users out of reading
        return None if row is None else User(row[0], bool(row[1]), tuple(json.loads(row[2])))

    def end_session(self, token: str) -> bool:
        return bool(self._write("DELETE FROM sessions WHERE token_hash = ?", (_token_hash(token),)))

    # ---- collections: labels with members, users and groups, each with read or write ----

    def grant(self, label: str, member_kind: str, member: str, access: str) -> bool:
        """Give a user or group (member_kind "user" or "group") read or write on a collection,
        replacing what it had there; False if there is no such user. Takes effect at the
        member's next request: visibility is computed per request, no session need end."""
        if member_kind not in ("user", "group") or access not in COLLECTION_ACCESS:
            raise ValueError("a grant is to a user or a group, of read or write")
        if not USERNAME_PATTERN.match(member or ""):
            raise ValueError("a user or group name is 1 to 64 letters, digits or . _ @ -")
        with self._db.transaction() as db:
            if member_kind == "user" and not db.execute("SELECT 1 FROM users WHERE username = ?", (member,)).fetchone():
                return False
            db.execute("INSERT INTO collection_access VALUES (?, ?, ?, ?)"
                       " ON CONFLICT (label, member_kind, member) DO UPDATE SET access = excluded.access",
                       (label, member_kind, member, access))
        self.log.info("%s %s given %s on collection %s", member_kind, member, access, label)
        return True

    def revoke(self, label: str, member_kind: str, member: str) -> bool:
        """Take a user's or group's access to a collection away; False if it had none."""
        removed = self._write("DELETE FROM collection_access WHERE label = ? AND member_kind = ? AND member = ?",
                              (label, member_kind, member))
        if removed:
            self.log.info("%s %s no longer has access to collection %s", member_kind, member, label)
        return bool(removed)

    def grants(self, label: str | None = None) -> list[CollectionGrant]:
        """Every grant, or those of one collection, by collection then member."""
        where, args = ("WHERE label = ?", (label,)) if label is not None else ("", ())
        return [CollectionGrant(*row) for row in self._query(
            f"SELECT label, member_kind, member, access FROM collection_access {where}"
            " ORDER BY label, member_kind DESC, member", args)]

    def collections_of(self, user: User | None = None, groups=()) -> dict[str, str]:
        """label -> "read" or "write": the collections a user has access to, itself or through
        one of its groups (roles), or (user None) those of the groups given; write wins."""
        groups = tuple(user.roles if user else groups)
        marks = ", ".join("?" * len(groups))
        sql = "SELECT label, access FROM collection_access WHERE (member_kind = 'user' AND member = ?)"
        if groups:
            sql += f" OR (member_kind = 'group' AND member IN ({marks}))"
        found: dict[str, str] = {}
        for label, access in self._query(sql, (user.username if user else "", *groups)):
            if found.get(label) != "write":
                found[label] = access
        return found

    # ---- share links: studies or a collection, read-only, without an account ----

    def create_share(self, created_by: str, label: str = "", study_uids=(), expires: float | None = None,
                     uses_allowed: int | None = None) -> tuple[ShareLink, str]:
        """A new share link and its token (random; only its hash is kept, so a copy of
        users.sqlite opens nothing)."""
        token = secrets.token_urlsafe(32)
        link = ShareLink(secrets.token_hex(8), created_by, time.time(), label, tuple(study_uids), expires, uses_allowed, 0, None)
        self._write(f"INSERT INTO share_links (token_hash, {_SHARE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (_token_hash(token), *link[:4], json.dumps(list(link.study_uids)), *link[5:]))
        self.log.info("share link %s made by %s (%s)", link.id, created_by,
                      f"collection {label}" if label else f"{len(link.study_uids)} studies")
        return link, token

    def shares(self, created_by: str | None = None) -> list[ShareLink]:
        """Every share link, or those one user made, newest first."""
        where, args = ("WHERE created_by = ?", (created_by,)) if created_by is not None else ("", ())
        return [_share_link(row) for row in self._query(f"SELECT {_SHARE_COLUMNS} FROM share_links {where}"
                                                        " ORDER BY created DESC, id", args)]

    def share(self, share_id: str) -> ShareLink | None:
        rows = self._query(f"SELECT {_SHARE_COLUMNS} FROM share_links WHERE id = ?", (share_id,))
        return _share_link(rows[0]) if rows else None

    def revoke_share(self, share_id: str) -> bool:
        """Revoke a share link: it opens no more, and those who opened it see nothing from their
        next request. False if there is no such link or it was revoked already."""
        with self._db.transaction() as db:
            db.execute("UPDATE share_links SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), share_id))
            if not db.changes():
                return False
            db.execute("DELETE FROM share_sessions WHERE share_id = ?", (share_id,))
        self.log.info("share link %s revoked", share_id)
        return True

    def open_share(self, token: str) -> tuple[ShareLink, str] | tuple[ShareLink | None, None]:
        """Open a share link: count one use and start a share session, (link, session token);
        (link or None, None) when the link is unknown, revoked, expired or used up."""
        now = time.time()
        with self._db.transaction() as db:
            # Nodes opening a link at once count its uses one after the other.
            row = db.execute(f"SELECT {_SHARE_COLUMNS} FROM share_links WHERE token_hash = ?{self._db.for_update}",
                             (_token_hash(token),)).fetchone()
            link = _share_link(row) if row else None
            if link is None or link.state(now) != "active":
                return link, None
            db.execute("UPDATE share_links SET uses = uses + 1 WHERE id = ?", (link.id,))
            session = secrets.token_urlsafe(32)
            db.execute("INSERT INTO share_sessions VALUES (?, ?, ?)", (_token_hash(session), link.id, now))
        return link._replace(uses=link.uses + 1), session

    def share_of_session(self, session: str) -> ShareLink | None:
        """The link a share session was opened from, while it is neither revoked nor expired
        (uses count openings: a session goes on after the last one allowed), and for at most
        idle_minutes after it was opened."""
        rows = self._query(f"SELECT {', '.join('l.' + c for c in _SHARE_COLUMNS.split(', '))}, s.created FROM share_sessions s"
                           " JOIN share_links l ON l.id = s.share_id WHERE s.token_hash = ?", (_token_hash(session),))
        if not rows:
            return None
        link, now = _share_link(rows[0][:-1]), time.time()
        # A session of a link without a date still ends, as a login does, idle_minutes after it began.
        if link.revoked is not None or (link.expires is not None and now >= link.expires) or now - rows[0][-1] > self.idle_seconds:
            return None
        return link

    def presets(self, username: str) -> list[dict]:
        return [{"name": name, "fields": json.loads(fields)}
                for name, fields in self._query("SELECT name, fields FROM presets WHERE username = ? ORDER BY name", (username,))]

    def save_preset(self, username: str, name: str, fields: list[str]):
        self._write("INSERT INTO presets VALUES (?, ?, ?) ON CONFLICT (username, name) DO UPDATE SET fields = excluded.fields",
                    (username, name, json.dumps(fields)))

    @property
    def database(self) -> StateDatabase:
        """Where they live (dicoogled migrate copies it whole)."""
        return self._db

    def close(self):
        self._db.close()


#: Failed logins one (client address, username) pair may have within LOGIN_FAILURE_WINDOW
#: seconds; the next attempts are refused (429) until the oldest of them is that old.
LOGIN_FAILURES_ALLOWED = 5
LOGIN_FAILURE_WINDOW = 300


class LoginThrottle:
    """Failed logins per (client address, username): after `limit` failures within `window`
    seconds that pair is refused until the oldest of them is `window` seconds old; a correct
    login clears the pair. Another user at the same address (colleagues behind one NAT) and the
    same user from another address are not held back.

    The failures are rows of the users' database, so with several nodes behind one address a
    client has `limit` tries in all, not `limit` on each node; their times are the clock's (the
    nodes' clocks are taken to agree to well under the window). Each failure deletes those older
    than the window: the table holds one window of failures, each of which cost its sender a
    scrypt check, so a spray of made-up names cannot grow it without bound. A failure need not
    survive a power cut, so counting one spares SQLite its flush to disk."""

    def __init__(self, database: StateDatabase, limit: int = LOGIN_FAILURES_ALLOWED,
                 window: float = LOGIN_FAILURE_WINDOW):
        self.limit, self.window = limit, window
        self._db = database

    @staticmethod
    def _key(address: str, username: str) -> tuple[str, str]:
        return address, username[:65]  # longer names exist nowhere; they need not fill the table

    def recent_failures(self, address: str, username: str) -> list[float]:
        """The times of this pair's failures within the window, at most `limit`, newest first."""
        with self._db.connection() as db:
            return [when for (when,) in db.execute(
                "SELECT time FROM login_failures WHERE address = ? AND username = ? AND time > ?"
                " ORDER BY time DESC LIMIT ?", (*self._key(address, username), time.time() - self.window, self.limit))]

    def retry_after(self, recent: list[float]) -> float:
        """Seconds until a pair with these recent failures may try again; 0 when it may now."""
        return recent[self.limit - 1] + self.window - time.time() if len(recent) >= self.limit else 0.0

    def failed(self, address: str, username: str):
        now = time.time()
        self._write(("DELETE FROM login_failures WHERE time <= ?", (now - self.window,)),
                    ("INSERT INTO login_failures (address, username, time) VALUES (?, ?, ?)",
                     (*self._key(address, username), now)))

    def succeeded(self, address: str, username: str):
        self._write(("DELETE FROM login_failures WHERE address = ? AND username = ?", self._key(address, username)))

    def _write(self, *statements: tuple[str, tuple]):
        """Run (sql, arguments) statements in one transaction. On a full disk the login is still
        answered (401, or the user's): the count lapses until there is room, as logging in does not."""
        try:
            with self._db.transaction(durable=False) as db:
                for sql, arguments in statements:
                    db.execute(sql, arguments)
        except Exception as error:
            if not is_out_of_space(error):
                raise
            logging.getLogger("dicoogled.http").warning("failed logins not counted: the disk is full")

    def __len__(self):
        """How many failures the table holds."""
        with self._db.connection() as db:
            return db.execute("SELECT count(*) FROM login_failures").fetchone()[0]


# ============================================================================================
# Audit log: who read, sent, received or changed what, when (data_dir/audit.sqlite, or PostgreSQL)
# ============================================================================================

#: The version of the audit schema (audit.sqlite's user_version): a later one migrates from it.
AUDIT_SCHEMA_VERSION = 1
AUDIT_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id {row_id}, time DOUBLE PRECISION NOT NULL, action TEXT NOT NULL, result TEXT NOT NULL,
    status TEXT NOT NULL, username TEXT NOT NULL, calling_aet TEXT NOT NULL, share_link TEXT NOT NULL,
    address TEXT NOT NULL, request TEXT NOT NULL, studies TEXT NOT NULL, series TEXT NOT NULL,
    instances TEXT NOT NULL, count INTEGER, detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (time);
CREATE INDEX IF NOT EXISTS audit_by_user ON audit (username, time);
CREATE INDEX IF NOT EXISTS audit_by_action ON audit (action, time);
"""
#: Append-only: an entry, once written, is never changed (pruning by age is the only delete).
#: The one part of the audit schema each engine says its own way.
AUDIT_APPEND_ONLY = {
    "sqlite": """CREATE TRIGGER IF NOT EXISTS audit_append_only BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;""",
    "postgresql": """CREATE OR REPLACE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql
AS $$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
CREATE TRIGGER audit_append_only BEFORE UPDATE ON audit FOR EACH ROW EXECUTE FUNCTION audit_append_only();""",
}
#: What an audit entry records was done: its `action`, with one line of documentation (GET /audit's
#: action filter, docs/rest-api.md and the web app's action picker read this table).
AUDIT_ACTIONS = {
    "search": "a search of the REST API (/search, /searchDIM): the studies answered and their count",
    "view": "attributes of instances read (/dump, /dictags, the worklist)",
    "download": "files or images sent (/legacy/file, /dic2png)",
    "export": "search results exported as a table (/export, /exportFile)",
    "qido": "a DICOMweb search (QIDO-RS)",
    "wado": "a DICOMweb retrieval (WADO-RS, WADO-URI: files, metadata, frames, rendered images)",
    "stow": "a DICOMweb store (STOW-RS): the instances stored",
    "c-find": "a DICOM C-FIND (query/retrieve or worklist): the level and the number of matches",
    "c-move": "a DICOM C-MOVE: the instances sent and their destination",
    "c-get": "a DICOM C-GET: the instances sent back",
    "c-store": "a DICOM C-STORE received: the instance",
    "watch": "an instance indexed from a watched folder",
    "import": "a ZIP file or folder imported (POST /import: a background task)",
    "delete": "instances deleted or unindexed",
    "label": "a label put on a study or series",
    "unlabel": "a label taken off a study or series",
    "protect": "a study protected from recycling and retention, or no longer",
    "login": "a login (refused: wrong password or throttled)",
    "logout": "a logout",
    "user": "a user created, changed (password, rights) or deleted",
    "settings": "a setting changed (index, DICOM, storage, retention, transfer syntaxes, worklist)",
    "plugin": "a plugin's action, settings or web service",
    "task": "a background task started or stopped (indexing a folder)",
    "share": "a share link created, revoked or opened",
    "access": "a user's or group's access to a collection granted or revoked",
    "reidentify": "the pseudonym map read: who de-identified patients are, which UIDs replaced which",
    "audit": "the audit log itself read or exported (GET /audit, /audit.csv)",
}
#: UIDs one entry lists at most of each level; count always says how many there were.
AUDIT_UIDS_KEPT = 1000
#: Most entries the writer puts in one transaction, and the longest an entry waits in memory.
AUDIT_BATCH = 2000
AUDIT_FLUSH_SECONDS = 0.5
#: How often old entries are pruned (the first time at start).
AUDIT_PRUNE_SECONDS = 3600
#: The columns of GET /audit.csv, in order.
AUDIT_CSV_COLUMNS = ("id", "time", "action", "result", "status", "user", "calling_aet", "share_link", "address",
                     "request", "count", "studies", "series", "instances", "detail")


class AuditEntry(typing.NamedTuple):
    """One entry of the audit log: who (user, calling AE, share link, address) did what (action,
    request) to which data (studies, series, instances: UIDs only; count) when, with what result
    (ok, refused or failed, and the HTTP or DICOM status). Never a patient's name or ID."""
    time: float
    action: str
    result: str
    status: str = ""
    user: str = ""
    calling_aet: str = ""
    share_link: str = ""
    address: str = ""
    request: str = ""
    studies: tuple = ()
    series: tuple = ()
    instances: tuple = ()
    count: int | None = None
    detail: str = ""
    id: int | None = None

    def as_json(self) -> dict:
        entry = self._asdict()
        entry["time"] = _iso_utc(self.time)
        for level in ("studies", "series", "instances"):
            entry[level] = list(entry[level])
        return entry


def _iso_utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="milliseconds")


def _uid_list(uids) -> tuple:
    """Distinct UIDs (64 characters at most, as a UID is), in the order first met, at most
    AUDIT_UIDS_KEPT of them."""
    if isinstance(uids, str):
        uids = (uids,)
    return tuple(itertools.islice(dict.fromkeys(str(uid)[:64] for uid in uids if uid), AUDIT_UIDS_KEPT))


class AuditLog:
    """The audit log, in its own database: data_dir/audit.sqlite (owner-only, WAL), or, with
    the index in PostgreSQL, schema dicoogled_audit of its database, where every node writes
    one log (each its own entries, numbered by the database in the order committed).

    record() only puts the entry on a queue, so no request, store or C-FIND waits for a disk
    write: one writer thread takes the queue in batches (up to AUDIT_BATCH entries, or whatever
    came in AUDIT_FLUSH_SECONDS) and commits each batch in one transaction. close() writes every
    entry still queued, so a clean shutdown (SIGTERM, Ctrl-C) loses none; kill -9 loses what was
    queued and not yet committed, at most about AUDIT_FLUSH_SECONDS of entries. A committed
    batch survives kill -9 (WAL); with synchronous=NORMAL a power cut may lose the last batches.

    With enabled false, record() keeps nothing (the log can still be read and pruned)."""

    def __init__(self, location: pathlib.Path | str, enabled: bool = True, retention_days: float = 0):
        self.enabled, self.retention_days = enabled, retention_days
        self.log = logging.getLogger("dicoogled.audit")
        # A batch on disk when committed, but not fsynced each time: the writer must keep up with ingest.
        self._db = StateDatabase(location, "dicoogled_audit", synchronous="NORMAL", pool_size=4)
        self._db.migrate(AUDIT_SCHEMA_VERSION, AUDIT_SCHEMA + AUDIT_APPEND_ONLY[self._db.engine])
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        #: Entries queued and entries written (or dropped for a failure), for flush().
        self._queued = self._written = 0
        self._progress = threading.Condition()
        self._writer = start_thread("audit-writer", self._write_queued)

    # ---- writing -------------------------------------------------------------------------------

    def record(self, action: str, result: str = AUDIT_OK, status: str | int = "", *, user: str = "", calling_aet: str = "",
               share_link: str = "", address: str = "", request: str = "", studies=(), series=(), instances=(),
               count: int | None = None, detail: str = ""):
        """Add an entry (action one of AUDIT_ACTIONS, result ok/refused/failed, status the HTTP or
        DICOM status); it is written soon, off the caller's thread. UIDs only: never names."""
        if not self.enabled:
            return
        entry = AuditEntry(time.time(), action, result, str(status), user or "", calling_aet or "", share_link or "",
                           address or "", request[:300], _uid_list(studies), _uid_list(series), _uid_list(instances),
                           count, detail[:300])
        with self._progress:
            self._queued += 1
        self._queue.put(entry)

    def _write_queued(self):
        """The writer thread: commit what is queued, in batches, until close() sends None."""
        while True:
            batch, done = [self._queue.get()], False
            # What arrives meanwhile joins the batch: slept through, not waited for entry by
            # entry, since waking this thread for each cost every C-STORE a thread switch.
            if self._queue.qsize() + 1 < AUDIT_BATCH:
                time.sleep(AUDIT_FLUSH_SECONDS)
            while len(batch) < AUDIT_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if None in batch:
                done = True
            entries = [entry for entry in batch if entry is not None]
            try:
                self._insert(entries)
            except (apsw.FullError, apsw.IOError, OSError) as error:  # a full disk: one line, no traceback
                self.log.error("%d audit entries not written: %s", len(entries), error)
            except Exception:  # anything else: the entries are lost, the log says why, the writer goes on
                self.log.exception("%d audit entries not written", len(entries))
            with self._progress:
                self._written += len(entries)
                self._progress.notify_all()
            if done:
                return

    def _insert(self, entries: list[AuditEntry]):
        if not entries:
            return
        with self._db.transaction() as db:
            db.executemany(
                "INSERT INTO audit (time, action, result, status, username, calling_aet, share_link, address, request,"
                " studies, series, instances, count, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(e.time, e.action, e.result, e.status, e.user, e.calling_aet, e.share_link, e.address, e.request,
                  json.dumps(e.studies), json.dumps(e.series), json.dumps(e.instances), e.count, e.detail)
                 for e in entries])

    def flush(self, timeout: float = 10) -> bool:
        """Wait until every entry recorded so far is written; False if that took over timeout."""
        with self._progress:
            wanted = self._queued
            return self._progress.wait_for(lambda: self._written >= wanted, timeout)

    def prune(self, now: float | None = None) -> int:
        """Delete the entries older than retention_days (0: keep them all); how many went."""
        if not self.retention_days > 0:
            return 0
        cutoff = (now or time.time()) - self.retention_days * 86400
        with self._db.transaction() as db:
            db.execute("DELETE FROM audit WHERE time < ?", (cutoff,))
            pruned = db.changes()
        if pruned:
            self.log.info("pruned %d audit entries older than %g days", pruned, self.retention_days)
        return pruned

    @property
    def database(self) -> StateDatabase:
        """Where the log lives (dicoogled migrate copies it whole)."""
        return self._db

    def close(self):
        """Write every queued entry, then close the database."""
        self._queue.put(None)
        self._writer.join()
        self._db.close()

    # ---- reading -------------------------------------------------------------------------------

    @staticmethod
    def _where(user: str = "", action: str = "", since: float | None = None, until: float | None = None):
        clauses, args = [], []
        if user:
            clauses.append("username = ?")
            args.append(user)
        actions = [name.strip() for name in action.split(",") if name.strip()]
        if actions:
            clauses.append(f"action IN ({', '.join('?' * len(actions))})")
            args.extend(actions)
        if since is not None:
            clauses.append("time >= ?")
            args.append(since)
        if until is not None:
            clauses.append("time < ?")
            args.append(until)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def entries(self, user: str = "", action: str = "", since: float | None = None, until: float | None = None,
                offset: int = 0, limit: int | None = 100) -> tuple[list[AuditEntry], int]:
        """The entries matching the filters (action: names separated by commas), newest first:
        (a page of them, how many match in all)."""
        where, args = self._where(user, action, since, until)
        with self._db.connection() as db:
            total = db.execute(f"SELECT count(*) FROM audit{where}", args).fetchone()[0]
            rows = db.execute(
                "SELECT time, action, result, status, username, calling_aet, share_link, address, request, studies,"
                f" series, instances, count, detail, id FROM audit{where} ORDER BY id DESC LIMIT ? OFFSET ?",
                args + [SQL_NO_LIMIT if limit is None else limit, offset]).fetchall()
        return [AuditEntry(*row[:9], tuple(json.loads(row[9])), tuple(json.loads(row[10])), tuple(json.loads(row[11])),
                           *row[12:]) for row in rows], total

    def each_entry(self, user: str = "", action: str = "", since: float | None = None, until: float | None = None,
                   page: int = 1000):
        """Every matching entry, newest first, read a page at a time (for the CSV export)."""
        before_id = None
        while True:
            where, args = self._where(user, action, since, until)
            if before_id is not None:
                where += (" AND" if where else " WHERE") + " id < ?"
                args.append(before_id)
            with self._db.connection() as db:
                rows = db.execute(
                    "SELECT time, action, result, status, username, calling_aet, share_link, address, request, studies,"
                    f" series, instances, count, detail, id FROM audit{where} ORDER BY id DESC LIMIT ?",
                    args + [page]).fetchall()
            for row in rows:
                yield AuditEntry(*row[:9], tuple(json.loads(row[9])), tuple(json.loads(row[10])),
                                 tuple(json.loads(row[11])), *row[12:])
            if len(rows) < page:
                return
            before_id = rows[-1][-1]


# ============================================================================================
# HTTP: the Dicoogle-compatible REST API (Bottle, served by waitress)
# ============================================================================================

PUBLIC, READ, USER, ADMIN = "public", "read", "user", "admin"
#: What /search returns per result when no field is asked for (Dicoogle's DEFAULT_FIELDS).
DEFAULT_SEARCH_FIELDS = (
    "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName", "PatientSex",
    "Modality", "StudyDate", "StudyID", "StudyDescription", "SeriesNumber", "SeriesDescription",
    "InstitutionName", "InstanceNumber",
)
SESSION_COOKIE = "dicoogled_session"
#: The cookie of a share session: set when a share link is opened, it shows the link's studies.
SHARE_COOKIE = "dicoogled_share"
HTTP_DRAIN_SECONDS = 5  # at shutdown, how long the requests under way may take to finish
#: Methods that change nothing: the only ones a request may use on another site's behalf.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: A request body larger than this is read only once the request's credentials are known to be
#: good (no anonymous route takes more than a login form or a query).
ANONYMOUS_BODY_LIMIT = 1024 * 1024
#: Content-Security-Policy of the web app: its own scripts and styles only (it has no inline
#: script), images from the API, data: for its empty icon and blob: for downloads.
WEB_APP_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                  "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
#: ... of the OHIF viewer: same origin only, but with what its build needs: WebAssembly codecs,
#: workers from blob: URLs, eval (webpack's runtime), inline styles and the inline scripts of its
#: index.html (allowed by their hashes, added where it is served).
VIEWER_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-eval' 'wasm-unsafe-eval' blob:; "
                 "worker-src 'self' blob:; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
                 "font-src 'self' data:; connect-src 'self' data: blob:; object-src 'none'; base-uri 'self'; "
                 "form-action 'self'; frame-ancestors 'none'")
#: ... of everything else (JSON, CSV, DICOM, images, plugins' answers): nothing runs or loads in it.
API_POLICY = "default-src 'none'; frame-ancestors 'none'"


def _fail(status: int, message: str, **headers):
    raise bottle.HTTPError(status, message, **headers)


def _codec_failure(error: CodecWorkerError, what: str):
    """Answer a request whose codec worker failed: 504 if it took too long, else 502 (as a gateway
    whose upstream failed); the worker's end is already logged."""
    logging.getLogger("dicoogled.http").error("%s: %s", what, error)
    _fail(504 if isinstance(error, CodecTimeout) else 502, str(error))


def _security_headers(path: str) -> dict[str, str]:
    """The headers every answer to path carries unless its handler set its own: a
    Content-Security-Policy for what it is, no framing, no referrer, and no caching (patient
    data: the web app's and the viewer's files set their own Cache-Control)."""
    if path in ("/", "/learn") or path.startswith(("/static/", "/learn/")):
        policy = WEB_APP_POLICY
    elif path == "/viewer" or path.startswith("/viewer/"):
        policy = VIEWER_POLICY
    else:
        policy = API_POLICY
    return {"Content-Security-Policy": policy, "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def _add_security_headers():
    response = bottle.response
    for name, value in _security_headers(bottle.request.path).items():
        if name not in response.headers or name == "X-Content-Type-Options":
            response.set_header(name, value)


def _authorization_token(header: str) -> str:
    """The token an Authorization header carries, raw (as Dicoogle's clients send it) or after
    'Bearer '; "" for none and for Basic credentials."""
    header = header.strip()
    if header[:6].lower() == "basic ":
        return ""
    return header[7:].strip() if header[:7].lower() == "bearer " else header


def _same_origin(origin: str, host: str) -> bool:
    """Whether a browser's Origin names this server, as the Host header does. Schemes are not
    compared: behind a TLS proxy the browser says https while this server hears http."""
    try:
        theirs, ours = urllib.parse.urlsplit(origin), urllib.parse.urlsplit("//" + host)
        default_port = 443 if theirs.scheme == "https" else 80
        return (theirs.scheme in ("http", "https") and theirs.hostname is not None
                and (theirs.hostname, theirs.port or default_port) == (ours.hostname, ours.port or default_port))
    except ValueError:  # a malformed port
        return False


def _as_public_url(public: urllib.parse.SplitResult):
    """Make the request look as the browser sent it to [http] public_url, behind a reverse proxy:
    its scheme, host and port, and the path the proxy serves us under (SCRIPT_NAME, WSGI's own
    place for it). Links, DICOMweb's RetrieveURL and the same-origin check then use the public
    address, not the one the proxy connected to."""
    environ = bottle.request.environ
    environ["wsgi.url_scheme"] = public.scheme
    environ["HTTP_HOST"] = public.netloc
    environ["SERVER_PORT"] = str(public.port or (443 if public.scheme == "https" else 80))
    environ["SCRIPT_NAME"] = public.path.rstrip("/")
    for forwarded in ("HTTP_X_FORWARDED_HOST", "HTTP_X_FORWARDED_PROTO"):  # bottle would prefer them
        environ.pop(forwarded, None)


def _cross_site(request: bottle.BaseRequest) -> bool | None:
    """Whether the browser says a request comes from a page of another origin: True or False,
    or None when it says nothing (a script or command-line client, or a very old browser)."""
    fetch_site = request.get_header("Sec-Fetch-Site", "").strip().lower()
    if fetch_site:
        return fetch_site != "same-origin"
    origin = request.get_header("Origin", "").strip()
    if origin:
        return not _same_origin(origin, request.get_header("Host", ""))
    return None


def _int_param(name: str, default: int | None, minimum: int = 0) -> int | None:
    raw = bottle.request.params.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        _fail(400, f"{name} must be a whole number, not {raw[:40]!r}")
    if value < minimum:
        _fail(400, f"{name} must be at least {minimum}")
    return min(value, 2**62)  # SQLite's LIMIT and OFFSET are 64-bit


def _json_response(value, status: int = 200) -> str:
    """JSON for any value: Bottle serialises only dicts by itself."""
    bottle.response.status = status
    bottle.response.content_type = "application/json"
    return json.dumps(value, ensure_ascii=False)


def _path_from_uri(uri: str) -> str:
    """A local path from a file: URI (or a plain path), normalised; 400 for anything else."""
    if uri.startswith("file:"):
        parsed = urllib.parse.urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            _fail(400, f"only local file: URIs are supported, not {uri[:80]!r}")
        uri = urllib.parse.unquote(parsed.path)
    elif re.match(r"^[a-z][a-z0-9+.-]*:", uri):
        _fail(400, f"unsupported URI scheme in {uri[:80]!r}")
    if not os.path.isabs(uri) or "\x00" in uri:
        _fail(400, f"expected an absolute path or file: URI, not {uri[:80]!r}")
    return os.path.normpath(uri)


def audited(*, studies=(), series=(), instances=(), count: int | None = None, detail: str | None = None,
            action: str | None = None, user: str | None = None, share_link: str | None = None):
    """Say, from a route's handler, what the request touched, for its audit entry (routes
    registered with audit=; plugins call dicoogle.audited): UIDs of studies, series and
    instances (added to those said before), how many in all when they are many, a detail (never
    a patient's name), or another action or user than the route's (a login names its user), or
    the share link (its id, never its token) the request was let in by."""
    touched = bottle.request.environ.setdefault("dicoogled", {}).setdefault("audit", {})
    for level, uids in (("studies", studies), ("series", series), ("instances", instances)):
        if uids:
            touched[level] = touched.get(level, ()) + ((uids,) if isinstance(uids, str) else tuple(uids))
    for name, value in (("count", count), ("detail", detail), ("action", action), ("user", user),
                        ("share_link", share_link)):
        if value is not None:
            touched[name] = value


class Api:
    """Route registration with access control, and the state the REST handlers share."""

    def __init__(self, daemon: "Daemon", app: bottle.Bottle):
        self.daemon, self.app = daemon, app
        self.users = daemon.users
        self.throttle = LoginThrottle(daemon.users.database)
        #: (method, path, access, summary) of every route, for /openapi.json and the tests.
        self.routes: list[tuple[str, str, str, str]] = []
        #: The whole docstring of each route's handler, by (method, path): its parameter lines
        #: ("name: what it is") describe the parameters in /openapi.json.
        self.docstrings: dict[tuple[str, str], str] = {}

    def route(self, path: str, method="GET", access=READ, open_preflight=False, audit=None):
        """Register a handler; access is PUBLIC, READ (patient data), USER or ADMIN.
        open_preflight: answer OPTIONS without a login, as CORS preflights carry no credentials.
        audit: the action (one of AUDIT_ACTIONS) each request records in the audit log, refused
        ones too, or a function of the request giving it (None: not recorded); the handler names
        the data it touched with audited(studies=..., instances=..., count=...)."""
        methods = [method] if isinstance(method, str) else list(method)

        def decorator(handler):
            @functools.wraps(handler)
            def guarded(*args, **kwargs):
                status = 500
                visible = None
                try:
                    if access != PUBLIC and not (open_preflight and bottle.request.method == "OPTIONS"):
                        self.require(access)
                        # Plugins' readers (DICOMweb's) answer within the caller's visibility too.
                        visible = CALLER_VISIBILITY.set(self.visibility())
                    answer = handler(*args, **kwargs)
                    status = bottle.response.status_code
                    return answer
                except bottle.HTTPResponse as answer:  # HTTPError too
                    status = answer.status_code
                    raise
                except (OSError, apsw.Error) as error:
                    if not is_out_of_space(error):
                        raise
                    status = 507
                    self.insufficient_storage(error)
                finally:
                    if visible is not None:
                        CALLER_VISIBILITY.reset(visible)
                    if audit and bottle.request.method != "OPTIONS":
                        try:
                            self.record_audit(audit if isinstance(audit, str) else audit(bottle.request), status)
                        except Exception:  # a fault of the audit must not change the answer: it is logged
                            logging.getLogger("dicoogled.audit").exception("cannot record %s %s",
                                                                          bottle.request.method, bottle.request.path)

            summary = " ".join((handler.__doc__ or "").strip().split("\n\n")[0].split())
            for m in methods:
                self.routes.append((m, path, access, summary))
                self.docstrings[(m, path)] = handler.__doc__ or ""
            self.app.route(path, methods, guarded)
            return handler

        return decorator

    def record_audit(self, action: str | None, status: int):
        """Add the audit entry of the request being answered: who sent it, what it touched (as
        its handler said with audited()), and how it ended (its HTTP status)."""
        if not action:
            return
        request = bottle.request
        state = request.environ.get("dicoogled", {})
        touched = state.get("audit", {})
        action = touched.get("action", action)
        if action in ("settings", "plugin") and "detail" not in touched:
            # What was changed, by name: values may be secrets (a plugin's token) and are not kept.
            # A form body is parsed already (decode_parameters); any other body is left alone.
            names = list(request.query.keys())
            if request.content_type.lower().startswith("application/x-www-form-urlencoded"):
                names += request.forms.keys()
            touched = dict(touched, detail=" ".join(sorted(set(names)))[:300])
        user = state.get("user")
        share_link = touched.get("share_link", "")
        if not share_link and user is None and request.get_cookie(SHARE_COOKIE):
            link = self.current_share()  # a share link's visitor: who is the link
            share_link = link.id if link else ""
        result = AUDIT_OK if status < 400 else AUDIT_REFUSED if status in (401, 403, 429) else AUDIT_FAILED
        self.daemon.audit.record(
            action, result, status,
            user=touched.get("user") or (user.username if user else ""), share_link=share_link,
            address=self.client_address(), request=f"{request.method} {self._path_without_secrets()}",
            studies=touched.get("studies", ()), series=touched.get("series", ()),
            instances=touched.get("instances", ()), count=touched.get("count"), detail=touched.get("detail", ""))

    @staticmethod
    def _path_without_secrets() -> str:
        """The request's path for the audit log: a share link's token stays out (its route's
        rule, /shared/<token>, stands for it); the link's id is in the entry."""
        route = bottle.request.environ.get("bottle.route")
        return route.rule if route is not None and "<token>" in route.rule else bottle.request.path

    def insufficient_storage(self, error: BaseException):
        """Answer 507 with the reason, for a write (a session, a user, settings) that found the
        disk full: an answer, not a fault, so the client learns why and nothing is half-done."""
        request = bottle.request
        self.daemon.disk.ran_out(f"at {request.method} {request.path}", error)
        free = self.daemon.disk.free_bytes()
        logging.getLogger("dicoogled.http").error("%s %s: out of disk space (%s), %d KB free", request.method,
                                                  request.path, getattr(error, "strerror", None) or error, free // 1024)
        raise bottle.HTTPResponse(json.dumps({"error": "insufficient storage: the data disk is full, nothing was changed",
                                              "free_bytes": free}),
                                  507, {"Content-Type": "application/json"})

    def current_user(self) -> User | None:
        """The user a request speaks for: token (raw or Bearer), HTTP Basic, or session cookie."""
        request = bottle.request
        if "user" in request.environ.setdefault("dicoogled", {}):
            return request.environ["dicoogled"]["user"]
        user = self._authenticate(request.get_header("Authorization", ""), request.get_cookie(SESSION_COOKIE) or "",
                                  self.client_address())
        request.environ["dicoogled"]["user"] = user
        return user

    def _authenticate(self, authorization: str, cookie_token: str, address: str) -> User | None:
        """The user of an Authorization header (token, Bearer or Basic), else of the session cookie."""
        header = authorization.strip()
        if header[:6].lower() != "basic ":
            token = _authorization_token(header) or cookie_token
            return self.users.session_user(token) if token else None
        try:
            username, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            _fail(401, "malformed Basic credentials")
        failed_lately = self.check_login_throttle(username, address)
        user = self.users.authenticate_basic(username, password)
        self.count_login(username, user, address, failed_lately)
        return user

    def refusal_before_body(self, method: str, path: str, headers: dict, address: str) -> tuple[int, str] | None:
        """(status, reason) to answer a request with a large body (over ANONYMOUS_BODY_LIMIT, or
        chunked) without reading that body, because its credentials are not good; None to read it.
        headers are named as WSGI does without HTTP_ (CONTENT_LENGTH, AUTHORIZATION, COOKIE)."""
        try:
            cookie = http.cookies.SimpleCookie(headers.get("COOKIE", "")).get(SESSION_COOKIE)
        except http.cookies.CookieError:
            cookie = None
        try:
            if self._authenticate(headers.get("AUTHORIZATION", ""), cookie.value if cookie else "", address):
                return None
        except bottle.HTTPError as error:
            return error.status_code, error.body
        logging.getLogger("dicoogled.http").warning(
            "refused %s %s from %s before reading its body (%s bytes): no valid credentials", method, path[:200],
            address, headers.get("CONTENT_LENGTH", "chunked"))
        return 401, "log in first: send the token from POST /login in the Authorization header"

    def refuse_cross_site_write(self):
        """403 for a state-changing request a browser may have sent on another site's behalf.

        A browser adds cookies (and cached Basic credentials) to any request, whichever page
        makes it; it never adds a token to the Authorization header by itself. So a write with
        a token header passes; any other write must not come from another origin, and one
        authenticated by the session cookie must show, by Sec-Fetch-Site or Origin, that it
        comes from this server's own pages (every current browser sends them on writes).
        """
        request = bottle.request
        authorization = request.get_header("Authorization", "")
        if request.method in SAFE_METHODS or _authorization_token(authorization):
            return
        cross_site = _cross_site(request)
        by_cookie = not authorization.strip() and bool(request.get_cookie(SESSION_COOKIE))
        if cross_site or (cross_site is None and by_cookie):
            logging.getLogger("dicoogled.http").warning(
                "refused a cross-site %s %s from %s (Origin %r, Sec-Fetch-Site %r)", request.method, request.path,
                self.client_address(), request.get_header("Origin", "")[:100], request.get_header("Sec-Fetch-Site", "")[:40])
            _fail(403, "cross-site request refused: a write authenticated by the session cookie must come from "
                       "this server's own pages; scripts send the token in the Authorization header")

    @staticmethod
    def client_address() -> str:
        """The client's address: the peer of the request's connection, or the client that
        [http] trusted_proxy names (waitress puts it in REMOTE_ADDR). Not bottle's remote_addr,
        which would believe any client's own X-Forwarded-For."""
        return bottle.request.environ.get("REMOTE_ADDR") or "?"

    def check_login_throttle(self, username: str, address: str) -> bool:
        """429, with Retry-After, if this client address has failed too often as this user;
        else whether it has failed lately (a success then clears that: only then is it written)."""
        recent = self.throttle.recent_failures(address, username)
        wait = self.throttle.retry_after(recent)
        if wait > 0:
            seconds = math.ceil(wait)
            logging.getLogger("dicoogled.http").warning(
                "login as %r from %s refused: %d failed logins within %d s; may retry in %d s",
                username[:64], address, self.throttle.limit, self.throttle.window, seconds)
            _fail(429, f"too many failed logins as {username[:64]!r} from this address; try again in {seconds} s",
                  Retry_After=str(seconds))
        return bool(recent)

    def count_login(self, username: str, user: User | None, address: str, failed_lately: bool):
        """Count a login attempt's outcome for the throttle; a failure is logged."""
        if user is None:
            self.throttle.failed(address, username)
            logging.getLogger("dicoogled.http").warning("failed login for %r from %s", username[:64], address)
        elif failed_lately:
            self.throttle.succeeded(address, username)

    def request_token(self) -> str:
        """The session token a request carries: Authorization (raw or Bearer), else the cookie."""
        request = bottle.request
        return _authorization_token(request.get_header("Authorization", "")) or request.get_cookie(SESSION_COOKIE) or ""

    def visibility(self) -> Visibility:
        """What the caller of this request may see, computed once per request: a logged-in
        user's (Daemon.visibility_of), else a share session's studies, else an anonymous reader's."""
        memo = bottle.request.environ.setdefault("dicoogled", {})
        if "visibility" not in memo:
            user = self.current_user()
            share = self.current_share() if user is None else None
            memo["visibility"] = share.visibility if share is not None else self.daemon.visibility_of(user)
        return memo["visibility"]

    def current_share(self) -> ShareLink | None:
        """The share link of the request's share session (the cookie set when it was opened),
        while that link is neither revoked nor expired."""
        memo = bottle.request.environ.setdefault("dicoogled", {})
        if "share" not in memo:
            session = bottle.request.get_cookie(SHARE_COOKIE) or ""
            memo["share"] = self.users.share_of_session(session) if session else None
        return memo["share"]

    def require_visible(self, level: str, uid: str):
        """404 for a study or series the caller may not see, as for one not in the index: the
        answer never tells a restricted caller what exists outside its collections."""
        if not self.daemon.index.holds(level, uid, self.visibility()):
            _fail(404, f"no {'study' if level == 'STUDY' else 'series'} {uid} in the index")

    def may_label(self, label: str) -> bool:
        """Whether the caller may put a label on (or take it off) what it sees: an administrator
        and an unrestricted user any label; a user restricted to collections only the labels of
        those it has write access to."""
        user = self.current_user()
        if user is None:
            return False
        if user.admin or self.visibility().everything:
            return True
        return self.users.collections_of(user).get(label) == "write"

    def require(self, access: str) -> User | None:
        user = self.current_user()
        if user is None:
            if access == READ and (self.daemon.config.allow_unauthorized or self.current_share() is not None):
                return None  # reads only: a share session's are limited to its studies (visibility)
            _fail(401, "log in first: send the token from POST /login in the Authorization header")
        if access == ADMIN and not user.admin:
            _fail(403, "this needs an administrator")
        return user

    def params(self, name: str) -> list[str]:
        return [v for v in bottle.request.params.getall(name) if v != ""]


def make_app(daemon: "Daemon") -> bottle.Bottle:
    """The HTTP application of a daemon: Dicoogle's REST API, with access control enforced."""
    app = bottle.Bottle()
    api = Api(daemon, app)
    http_log = logging.getLogger("dicoogled.http")

    def json_error(error: bottle.HTTPError):
        bottle.response.content_type = "application/json"
        _add_security_headers()  # again: an unexpected exception's 500 starts with fresh headers
        # 501 "needs package X" and 503 "not ready" are answers; a 500 is a fault, told only in the log.
        if error.status_code == 500 or error.exception is not None:
            http_log.error("%s %s failed: %s", bottle.request.method, bottle.request.path, error.exception or error.body)
            return json.dumps({"error": "internal error; see the server log"})
        return json.dumps({"error": error.body if isinstance(error.body, str) else error.status_line})

    for code in (400, 401, 403, 404, 405, 406, 409, 410, 413, 415, 429, 500, 501, 502, 503, 504):
        app.error(code)(json_error)

    @app.hook("after_request")
    def log_request():
        _add_security_headers()
        http_log.debug("%s %s %s", bottle.request.method, bottle.request.path, bottle.response.status_code)

    if daemon.config.public_url:
        app.hook("before_request")(functools.partial(_as_public_url, urllib.parse.urlsplit(daemon.config.public_url)))
    app.hook("before_request")(api.refuse_cross_site_write)

    @app.hook("before_request")
    def decode_parameters():
        # Bottle hands parameters over as latin-1 text; browsers and Dicoogle's clients send UTF-8.
        request = bottle.request
        sources = {"bottle.request.query": request.query}
        if request.content_type.lower().startswith("application/x-www-form-urlencoded"):
            sources["bottle.request.forms"] = request.forms
        for key, source in sources.items():
            decoded = bottle.FormsDict()
            for name, value in source.allitems():
                decoded[name.encode("latin-1", "replace").decode("utf-8", "replace")] = value.encode("latin-1", "replace").decode("utf-8", "replace")
            request.environ[key] = decoded

    app.config["dicoogled.api"] = api  # for _check_credentials_before_bodies
    _session_routes(api)
    _search_routes(api)
    _share_routes(api)
    _image_routes(api)
    _task_routes(api)
    _archive_routes(api)
    _webhook_routes(api)
    _index_settings_routes(api)
    _transfer_settings_routes(api)
    _dicom_settings_routes(api)
    _destination_routes(api)
    _worklist_routes(api)
    _listener_routes(api)
    _log_and_api_routes(api)
    _audit_routes(api)
    _research_routes(api)
    _plugin_routes(api)
    _viewer_routes(api)
    _web_app_routes(api)
    _learn_routes(api)
    for add_routes in daemon.route_hooks:  # management, plugins' web services
        add_routes(api)
    return app


def _check_credentials_before_bodies(channels: dict, api: Api):
    """Make the waitress servers in channels (create_server's map) answer a request whose body is
    over ANONYMOUS_BODY_LIMIT (or chunked) as soon as its headers are in, unless its credentials
    are good (Api.refusal_before_body): waitress reads a whole body before the application sees
    the request, so an anonymous client could otherwise make it spool gigabytes to the data dir.

    The refused request gets a JSON error and the connection closes; the body is never read (a
    client that sent "Expect: 100-continue" never sends it). The check runs on waitress's I/O
    thread, once per such request: a token is one lookup; HTTP Basic costs a password hash the
    first time only (authenticate_basic remembers it), and the login throttle bounds failures.
    """
    from waitress.channel import HTTPChannel
    from waitress.parser import HTTPRequestParser
    from waitress.server import BaseWSGIServer
    from waitress.utilities import Error

    class Refused(Error):
        def __init__(self, status: int, reason: str, path: str):
            super().__init__(reason)
            self.code, self.reason, self.path = status, bottle.HTTP_CODES.get(status, "Refused"), path

        def to_response(self, ident=None):
            body = json.dumps({"error": self.body}).encode("utf-8")
            headers = [("Content-Type", "application/json"), *_security_headers(self.path).items()]
            return f"{self.code} {self.reason}", headers, body

    class Parser(HTTPRequestParser):
        address = "?"

        def received(self, data):
            headers_were_in = self.headers_finished
            consumed = super().received(data)
            large_body = self.chunked or self.content_length > ANONYMOUS_BODY_LIMIT
            if headers_were_in or not self.headers_finished or self.completed or not large_body:
                return consumed
            refusal = api.refusal_before_body(self.command, self.path, self.headers, self.address)
            if refusal is None:
                return consumed
            self.error, self.completed = Refused(*refusal, self.path), True
            self.expect_continue = False  # no "100 Continue": the answer is final
            return len(data)  # what came with the headers goes; the channel reads no more before closing

    class Channel(HTTPChannel):
        def parser_class(self, adjustments):  # waitress calls self.parser_class(self.adj) per request
            parser = Parser(adjustments)
            parser.address = self.addr[0] if isinstance(self.addr, tuple) else "?"
            return parser

    for server in channels.values():
        if isinstance(server, BaseWSGIServer):
            server.channel_class = Channel


def _session_routes(api: Api):
    daemon, users = api.daemon, api.users
    http_log = logging.getLogger("dicoogled.http")

    @api.route("/health", access=PUBLIC)
    def health():
        """Status: 200 once the DICOM and HTTP listeners are up; "degraded", with the reasons,
        while the data disk is below its free-space reserve or was found full."""
        counts = daemon.index.counts()
        by_origin = daemon.index.bytes_by_origin()
        problems = daemon.disk.problems()
        return {
            "status": "degraded" if problems else "ok",
            "problems": problems,
            "disk": daemon.disk.status(),
            "version": __version__,
            "aet": daemon.config.aet,
            "dicom_port": daemon.dicom.port,
            "dicom": daemon.dicom.connections(),
            "http_port": daemon.http_port,
            "counts": counts,
            "storage": {"bytes": sum(by_origin.values()), "by_origin": by_origin},
            "ingest": dataclasses.asdict(daemon.ingest.stats),
            "quota": daemon.ingest.quota_status(),
            "watch": {
                "folders": [str(f) for f in daemon.watcher.folders] if daemon.watcher else [],
                "pending": daemon.watcher.pending if daemon.watcher else 0,
                "reconciling": bool(daemon.reconciling or (daemon.watcher and daemon.watcher.reconciling)),
            },
            # Whether `dicoogled install-viewer` has installed OHIF at /viewer/ (the web app links to it).
            "viewer": (daemon.config.data_dir / "viewer" / "index.html").is_file(),
            # The processes that decode pixels: {pid, busy} of those running, and how many were
            # started, ended idle, crashed (or were killed) and timed out.
            "codec_workers": daemon.codecs.status(),
        }

    @api.route("/login", "POST", access=PUBLIC, audit="login")
    def login():
        """Log in with username and password; returns the token to send as Authorization."""
        request = bottle.request
        username, password = request.params.get("username", ""), request.params.get("password", "")
        audited(user=username[:64])  # the name tried, whether or not the login succeeds
        failed_lately = api.check_login_throttle(username, api.client_address())
        user = users.authenticate(username, password)
        api.count_login(username, user, api.client_address(), failed_lately)
        if user is None:
            _fail(401, "Login failed: wrong username or password")
        token = users.start_session(user)
        bottle.response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", path="/")
        http_log.info("user %s logged in from %s", user.username, api.client_address())
        return {"user": user.username, "admin": user.admin, "roles": list(user.roles), "token": token}

    @api.route("/login", access=PUBLIC)
    def restore_login():
        """Who the token belongs to (restores a session in the web app)."""
        user = api.current_user()
        if user is None:
            _fail(401, "no valid session")
        return {"user": user.username, "admin": user.admin, "roles": list(user.roles)}

    @api.route("/logout", ["POST", "GET"], access=PUBLIC, audit="logout")
    def logout():
        """End the session of the token sent (GET: only of a token in the Authorization header, as
        old Dicoogle clients send it; a GET never ends a session kept in a cookie)."""
        token = _authorization_token(bottle.request.get_header("Authorization", ""))
        if bottle.request.method == "GET" and not token:
            raise bottle.HTTPError(405, "log out with POST (or send the token in the Authorization header)", Allow="POST")
        token = token or bottle.request.get_cookie(SESSION_COOKIE, "")
        api.current_user()  # who logs out, for the audit log, while the session still names it
        bottle.response.delete_cookie(SESSION_COOKIE, path="/")
        bottle.response.delete_cookie(SHARE_COOKIE, path="/")  # a share link's visitor leaves too
        return {"success": bool(token) and users.end_session(token)}

    @api.route("/user", access=ADMIN)
    def list_users():
        """Every user name."""
        return {"users": [{"username": u.username, "admin": u.admin, "roles": list(u.roles)} for u in users.all()]}

    @api.route("/user", ["POST", "PUT"], access=ADMIN, audit="user")
    def create_user():
        """Create a user: username, password, admin (true/false)."""
        params = bottle.request.params
        audited(detail=f"create {params.get('username', '')[:64]} admin={params.get('admin', 'false')[:5]}")
        try:
            created = users.create(params.get("username", ""), params.get("password", ""), params.get("admin", "false").lower() == "true")
        except ValueError as error:
            _fail(400, str(error))
        return {"success": created}

    @api.route("/user/<username>", "DELETE", access=ADMIN, audit="user")
    def delete_user(username):
        """Delete a user (never the last administrator)."""
        audited(detail=f"delete {username[:64]}")
        return {"success": users.delete(username)}

    @api.route("/user", "DELETE", access=ADMIN, audit="user")
    def delete_user_by_parameter():
        """Delete a user named by a parameter, as dicoogle-client 5 asks (never the last administrator).

        username: the user to delete
        """
        username = bottle.request.params.get("username", "")
        audited(detail=f"delete {username[:64]}")
        if not username:
            _fail(400, "username is required")
        return {"success": users.delete(username)}

    @api.route("/user/<username>/password", "POST", access=USER, audit="user")
    def change_password(username):
        """Change a password: one's own, or anyone's for an administrator."""
        audited(detail=f"password of {username[:64]}")
        user = api.current_user()
        if user.username != username and not user.admin:
            _fail(403, "only an administrator may change another user's password")
        # The user's other sessions end; the one it changed its own password in goes on.
        keep_token = api.request_token() if user.username == username else None
        try:
            changed = users.set_password(username, bottle.request.params.get("password", ""), keep_token)
        except ValueError as error:
            _fail(400, str(error))
        if not changed:
            _fail(404, f"no user {username!r}")
        return {"success": True}

    @api.route("/user/<username>", "POST", access=ADMIN, audit="user")
    def change_rights(username):
        """Change a user's rights; its sessions end, so they apply at once.

        admin: true or false (unchanged if absent)
        roles: the user's roles, separated by commas; empty for none (unchanged if absent)
        """
        params = bottle.request.params
        admin = params.get("admin")
        audited(detail=f"rights of {username[:64]}: admin={(admin or '')[:5]} roles={params.get('roles', '')[:100]}")
        if admin is not None and admin.lower() not in ("true", "false"):
            _fail(400, f"admin must be true or false, not {admin[:20]!r}")
        roles = params.get("roles")
        roles = None if roles is None else [role.strip() for role in roles.split(",") if role.strip()]
        try:
            changed = users.set_rights(username, None if admin is None else admin.lower() == "true", roles)
        except ValueError as error:
            _fail(409, str(error))
        if not changed:
            _fail(404, f"no user {username!r}")
        return {"success": True}

    @api.route("/ext/version", access=PUBLIC)
    def version():
        """The server's version."""
        return {"version": __version__, "name": "dicoogled"}


#: What makes a spreadsheet read a cell as a formula (OWASP's CSV injection list), and the
#: full-width forms some spreadsheets also take.
_FORMULA_START = tuple("=+-@\t\r") + tuple("\uff1d\uff0b\uff0d\uff20")
#: A plain decimal number (DS, IS, FL values such as a SliceLocation of -95.00): data, never a formula.
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _spreadsheet_safe(text: str) -> str:
    """text as a spreadsheet shows it and never runs it: a leading ' when it would start a
    formula (OWASP), unless it is a plain number such as -95.00, which stays a number."""
    return "'" + text if text.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(text) else text


def _csv_cell(value: str | None) -> str:
    """One cell of Dicoogle's CSV: "value"; or ; when empty. As Dicoogle, line breaks go and ;
    becomes , so the lines split on ; alone; a " is doubled (RFC 4180). A value a spreadsheet
    would run as a formula gets a leading ' (OWASP), unless it is a plain number such as -95.00,
    which stays a number."""
    if not value:
        return ";"
    value = _spreadsheet_safe(value.replace("\r", "").replace("\n", "").replace(";", ","))
    return '"' + value.replace('"', '""') + '";'


def _search_routes(api: Api):
    daemon = api.daemon

    def checked_providers(names) -> list[str]:
        """Provider names, validated (400 for an unknown one), the built-in index by default."""
        for name in names:
            if name not in daemon.providers and name not in BUILTIN_PROVIDER_ALIASES:
                _fail(400, f"{name} is not a valid query provider")
        return [BUILTIN_PROVIDER if n in BUILTIN_PROVIDER_ALIASES else n for n in names] or [BUILTIN_PROVIDER]

    def providers_of_request() -> list[str]:
        return checked_providers(api.params("provider"))

    def query_of_request() -> str:
        query = bottle.request.params.get("query", "")
        if not query.strip():
            _fail(400, "No query supplied!")
        return query

    def run(query: str, providers: list[str], limit, offset):
        """Results of every provider, de-duplicated by SOPInstanceUID: (list of (uri, meta), total)."""
        visibility = api.visibility()
        if providers == [BUILTIN_PROVIDER]:
            hits, total = daemon.search(query, limit, offset, visibility)
            return [(_file_uri(hit.path), hit.meta) for hit in hits], total
        if visibility.restricted:
            # Another provider's answers come from outside the index, where collections are not known.
            _fail(403, "a caller limited to collections searches the index only, not other providers")
        merged, seen = [], set()
        for name in providers:
            for uri, meta in daemon.providers[name](query):
                uid = meta.get("SOPInstanceUID")
                if uid and uid in seen:
                    continue
                seen.add(uid)
                merged.append((uri, meta))
        end = None if limit is None else offset + limit
        return complete_from_index(daemon.index, merged[offset:end]), len(merged)

    def search_error(error: Exception):
        bottle.response.status = 400
        return {"results": [], "error": str(error)}

    @api.route("/search", audit="search")
    def search():
        """Instances matching query: {results: [{uri, fields}], numResults, elapsedTime}."""
        started = time.perf_counter()
        query, providers = query_of_request(), providers_of_request()
        if "depth" in bottle.request.params:
            _fail(400, "depth is a parameter of /searchDIM, not /search")
        fields = api.params("field") or list(DEFAULT_SEARCH_FIELDS)
        try:
            results, total = run(query, providers, _int_param("psize", None), _int_param("offset", 0))
        except SearchSyntaxError as error:
            return search_error(error)
        # The studies answered and how many instances matched; never the query (it may name a patient).
        audited(studies=[meta.get("StudyInstanceUID") for _, meta in results], count=total)
        return {
            "results": [{"uri": uri, "fields": {f: v for f in fields if (v := field_text(meta, f)) is not None}}
                        for uri, meta in results],
            "elapsedTime": round((time.perf_counter() - started) * 1000),
            "numResults": total,
        }

    @api.route("/searchDIM", audit="search")
    def search_dim():
        """Results grouped Patient → Study → Series → Image, paged over patients."""
        started = time.perf_counter()
        query, providers = query_of_request(), providers_of_request()
        depth = bottle.request.params.get("depth", "image").lower()
        if depth not in ("none", "patient", "study", "series", "image"):
            _fail(400, f"depth must be none, patient, study, series or image, not {depth[:20]!r}")
        psize, offset = _int_param("psize", 0), _int_param("offset", 0)
        with_birthdate = "PatientBirthDate" in api.params("field")
        try:
            results, _ = run(query, providers, None, 0)
        except SearchSyntaxError as error:
            return search_error(error)
        patients = group_dim(results, with_birthdate)
        audited(studies=[meta.get("StudyInstanceUID") for _, meta in results], count=len(results))
        elapsed = round((time.perf_counter() - started) * 1000)
        if depth == "none":
            return {"numResults": len(patients), "elapsedTime": elapsed}
        page = patients[offset:offset + psize] if psize > 0 else patients[offset:]
        # dicoogled adds the labels of the studies and series shown (the web app lists them),
        # only where there are some: an archive without labels answers exactly Dicoogle's shape.
        shown_studies = [study for patient in page for study in patient["studies"]] if depth != "patient" else []
        shown_series = [series for study in shown_studies for series in study["series"]] if depth in ("series", "image") else []
        study_labels = daemon.index.labels_of("STUDY", [study["studyInstanceUID"] for study in shown_studies])
        series_labels = daemon.index.labels_of("SERIES", [series["serieInstanceUID"] for series in shown_series])
        for study in shown_studies:
            if study["studyInstanceUID"] in study_labels:
                study["labels"] = study_labels[study["studyInstanceUID"]]
        for series in shown_series:
            if series["serieInstanceUID"] in series_labels:
                series["labels"] = series_labels[series["serieInstanceUID"]]
        for patient in page:
            for study in patient["studies"]:
                for series in study["series"]:
                    if depth != "image":
                        del series["images"]
                if depth in ("study",):
                    del study["series"]
            if depth == "patient":
                del patient["studies"]
        return {"numResults": len(patients), "elapsedTime": elapsed, "results": page}

    @api.route("/providers")
    def providers():
        """Names of the query providers."""
        return _json_response(sorted(daemon.providers))

    # ---- labels: free-form tags on studies and series, set by hand or by plugins' rules ----

    @api.route("/labels")
    def labels():
        """Every label in use with how many indexed studies carry it: {labels: [{label, studies}]}."""
        return {"labels": [found._asdict() for found in daemon.index.labels(api.visibility())]}

    def labelled_level(level: str, uid: str) -> str:
        if not is_valid_uid(uid):
            _fail(400, f"{uid[:80]!r} is not a UID")
        api.require_visible(level, uid)
        return uid

    def writable_label(label: str) -> str:
        """The label, valid (400) and one the caller may set or take off (403)."""
        try:
            label = label_name(label)
        except ValueError as error:
            _fail(400, str(error))
        if not api.may_label(label):
            _fail(403, f"labelling with {label!r} needs write access to that collection")
        return label

    def label_routes(prefix: str, level: str):
        what = "study" if level == "STUDY" else "series"
        uid_level = "studies" if level == "STUDY" else "series"  # audited()'s name for it

        def labels_of(uid):
            """The labels of one indexed {what}: {{labels: [...]}}."""
            return {"labels": daemon.index.labels_of(level, [labelled_level(level, uid)]).get(uid, [])}

        def put_label(uid, label):
            """Put a label on an indexed {what} (and so on its instances): {{label, added}}.

            label: 1 to 64 of a-z, 0-9, '.', '_', '-' (case-insensitive, kept lower-cased)"""
            audited(**{uid_level: uid}, detail=label[:64])
            label = writable_label(label)
            try:
                added = daemon.label(level, labelled_level(level, uid), label)
            except ValueError as error:
                _fail(400, str(error))
            return {"label": label_name(label), "added": added}

        def delete_label(uid, label):
            """Take a label off a {what}: {{label, removed}}; removed is false if it was not there."""
            audited(**{uid_level: uid}, detail=label[:64])
            if not is_valid_uid(uid):
                _fail(400, f"{uid[:80]!r} is not a UID")
            label = writable_label(label)
            if api.visibility().restricted:
                api.require_visible(level, uid)
            try:
                removed = daemon.unlabel(level, uid, label)
            except ValueError as error:
                _fail(400, str(error))
            return {"label": label_name(label), "removed": removed}

        # The same handlers serve both levels: their docstrings (the OpenAPI summaries) name it.
        for handler, method, path, access, audit in ((labels_of, "GET", "/labels", READ, None),
                                                     (put_label, "PUT", "/labels/<label>", USER, "label"),
                                                     (delete_label, "DELETE", "/labels/<label>", USER, "unlabel")):
            handler.__doc__ = handler.__doc__.format(what=what)
            api.route(f"/{prefix}/<uid>{path}", method, access=access, audit=audit)(handler)

    label_routes("studies", "STUDY")
    label_routes("series", "SERIES")

    # ---- collections: a label with members, each user or group with read or write on it ----

    def collection_label(label: str) -> str:
        try:
            return label_name(label)
        except ValueError as error:
            _fail(400, str(error))

    @api.route("/collections", access=USER)
    def my_collections():
        """The caller's collections: {restricted, collections: [{label, access, studies}]}; restricted
        says the caller sees only these (an administrator, or a user with none, sees everything
        unless [http] restrict_to_collections)."""
        user = api.current_user()
        granted = api.users.collections_of(user)
        counts = {found.label: found.studies for found in daemon.index.labels()}
        return {"restricted": api.visibility().restricted,
                "collections": [{"label": label, "access": access, "studies": counts.get(label, 0)}
                                for label, access in sorted(granted.items())]}

    @api.route("/collections/members", access=ADMIN)
    def every_collection_member():
        """Every grant of every collection: {members: [{label, user or group, access}]}."""
        return {"members": [{"label": grant.label, grant.member_kind: grant.member, "access": grant.access}
                            for grant in api.users.grants()]}

    @api.route("/labels/<label>/access", access=ADMIN)
    def collection_members(label):
        """Who has access to a collection: {label, members: [{user or group, access}]}."""
        label = collection_label(label)
        return {"label": label, "members": [{grant.member_kind: grant.member, "access": grant.access}
                                            for grant in api.users.grants(label)]}

    def grant(label: str, kind: str, member: str):
        access = bottle.request.params.get("access", "read").strip().lower()
        audited(detail=f"grant {access[:10]} on {label[:64]} to {kind} {member[:64]}")
        if access not in COLLECTION_ACCESS:
            _fail(400, f"access must be read or write, not {access[:20]!r}")
        try:
            granted = api.users.grant(collection_label(label), kind, member, access)
        except ValueError as error:
            _fail(400, str(error))
        if not granted:
            _fail(404, f"no user {member!r}")
        return {"label": label_name(label), kind: member, "access": access}

    def revoke(label: str, kind: str, member: str):
        audited(detail=f"revoke {label[:64]} from {kind} {member[:64]}")
        return {"label": collection_label(label), kind: member,
                "revoked": api.users.revoke(label_name(label), kind, member)}

    @api.route("/labels/<label>/access/<username>", "PUT", access=ADMIN, audit="access")
    def grant_user(label, username):
        """Give a user read or write on a collection (a label): from its next request it sees
        only its collections' studies; write lets it label and unlabel within them.

        access: read (the default) or write
        """
        return grant(label, "user", username)

    @api.route("/labels/<label>/access/<username>", "DELETE", access=ADMIN, audit="access")
    def revoke_user(label, username):
        """Take a user's access to a collection away: {label, user, revoked}."""
        return revoke(label, "user", username)

    @api.route("/labels/<label>/access/group/<group>", "PUT", access=ADMIN, audit="access")
    def grant_group(label, group):
        """Give a group (users whose roles name it) read or write on a collection.

        access: read (the default) or write
        """
        return grant(label, "group", group)

    @api.route("/labels/<label>/access/group/<group>", "DELETE", access=ADMIN, audit="access")
    def revoke_group(label, group):
        """Take a group's access to a collection away: {label, group, revoked}."""
        return revoke(label, "group", group)

    @api.route("/dump", audit="view")
    def dump():
        """Every element of one instance: {results: {uri, fields}, elapsedTime}."""
        started = time.perf_counter()
        uid = bottle.request.params.get("uid", "")
        audited(instances=uid[:80], count=1)
        if not is_valid_uid(uid):
            _fail(400, "uid must be a SOPInstanceUID")
        found = daemon.index.instance(uid, visibility=api.visibility())
        if not found:
            _fail(404, f"no instance {uid}")
        return {"results": {"uri": _file_uri(found.path), "fields": daemon.index.metadata(found.id)},
                "elapsedTime": round((time.perf_counter() - started) * 1000)}

    @api.route("/legacy/file", audit="download")
    def legacy_file():
        """The stored file of an instance, as application/dicom."""
        uid = bottle.request.params.get("uid", "")
        audited(instances=uid[:80], count=1)
        if not is_valid_uid(uid):
            _fail(400, "uid must be a SOPInstanceUID")
        found = daemon.index.instance(uid, visibility=api.visibility())
        if found is None:
            _fail(404, f"no instance {uid}")
        if location_scheme(found.path) != "file":  # kept by a storage plugin
            try:
                data = daemon.storage.read(found.path)
            except OSError as error:
                _fail(404, f"the object of {uid} cannot be read: {error}")
            bottle.response.content_type = "application/dicom"
            bottle.response.set_header("Content-Disposition", f'attachment; filename="{uid}.dcm"')
            return data
        path = pathlib.Path(found.path)
        if not path.is_file():
            _fail(404, f"the file of {uid} is missing; run 'dicoogled check'")
        return bottle.static_file(path.name, root=str(path.parent), mimetype="application/dicom", download=path.name)

    @api.route("/export/list")
    def export_list():
        """Every DICOM keyword, for field pickers."""
        return _json_response(sorted(entry[4] for entry in DicomDictionary.values() if entry[4]))

    @api.route("/presets/<username>", access=USER)
    def presets(username):
        """A user's saved export field lists."""
        user = api.current_user()
        if user.username != username and not user.admin:
            _fail(403, "presets of another user need an administrator")
        return _json_response(api.users.presets(username))

    @api.route("/presets/<username>/<name>", "POST", access=USER)
    def save_preset(username, name):
        """Save an export field list: field=A&field=B."""
        user = api.current_user()
        if user.username != username and not user.admin:
            _fail(403, "presets of another user need an administrator")
        fields = api.params("field")
        if not fields or len(name) > 128:
            _fail(400, "a preset needs a name and at least one field")
        api.users.save_preset(username, name, fields)
        return {"success": True}

    def csv_export(query: str, fields: list[str], providers: list[str]):
        """Dicoogle's CSV: "F1";"F2"; then one line per instance, values quoted, ';' after each."""
        try:
            results, _ = run(query, providers, None, 0)
        except SearchSyntaxError as error:
            _fail(400, str(error))

        yield "".join(_csv_cell(f) for f in fields) + "\n"
        for _, meta in results:
            yield "".join(_csv_cell(field_text(meta, f)) for f in fields) + "\n"

    def export_parameters():
        params = bottle.request.params
        if "JSON-DATA" in params:
            try:
                data = json.loads(params["JSON-DATA"])
                lists = [data.get("extraFields", []), data.get("providers", [])]
                if not isinstance(data["queryString"], str) or not all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in lists):
                    raise TypeError("queryString must be text, extraFields and providers lists of text")
                return data["queryString"], lists[0], lists[1]
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                _fail(400, f"JSON-DATA is not valid: {error}")
        return query_of_request(), list_param("fields", "keywords"), list_param("providers", "provider names")

    def list_param(name: str, what: str) -> list[str]:
        """A repeated parameter, or one holding a JSON array (as the web app's export sends it)."""
        values = api.params(name)
        if len(values) == 1 and values[0].startswith("["):
            try:
                values = [str(v) for v in json.loads(values[0])]
            except (ValueError, TypeError):
                _fail(400, f"{name} must be a JSON array of {what}")
        return values

    @api.route("/export", ["GET", "POST"], audit="export")
    def export():
        """Search results as CSV, one line per instance."""
        query, fields, providers = export_parameters()
        if not fields:
            _fail(400, "name at least one field to export")
        lines = list(csv_export(query, fields, checked_providers(providers)))
        audited(count=max(0, len(lines) - 1))  # lines past the header: instances exported
        bottle.response.content_type = "text/csv; charset=utf-8"
        bottle.response.set_header("Content-Disposition", "attachment; filename=QueryResultsExport.csv")
        return "".join(lines)

    exports: dict[str, pathlib.Path] = {}

    @api.route("/exportFile", "POST", audit="export")
    def export_to_file():
        """Step one of the web app's export: run it to a file, answer its uid."""
        query, fields, providers = export_parameters()
        if not fields:
            _fail(400, "name at least one field to export")
        lines = csv_export(query, fields, checked_providers(providers))
        uid = str(uuid.uuid4())
        path = daemon.storage.tmp / f"export-{uid}.csv"
        with open(path, "w", encoding="utf-8") as handle:
            count = -1  # the header is no instance
            for count, line in enumerate(lines):
                handle.write(line)
        audited(count=max(0, count), detail=f"export {uid}")
        exports[uid] = path
        return {"uid": uid}

    @api.route("/exportFile", audit="export")
    def export_file():
        """Step two: download the CSV made by POST /exportFile."""
        uid = bottle.request.params.get("UID", "")
        try:
            uid = str(uuid.UUID(uid))
        except ValueError:
            _fail(400, "UID must be the uid answered by POST /exportFile")
        audited(detail=f"export {uid}")
        path = exports.get(uid)
        if path is None or not path.exists():
            _fail(404, f"no export {uid}")
        return bottle.static_file(path.name, root=str(path.parent), mimetype="application/csv",
                                  download="QueryResultsExport.csv")


def _archive_routes(api: Api):
    """Studies, selections and labels out as ZIP files or DICOM media; ZIP files and folders in."""
    daemon = api.daemon

    def checked_uids(values: list, what: str) -> list[str]:
        for value in values:
            if not isinstance(value, str) or not is_valid_uid(value):
                _fail(400, f"{what} must be a UID, not {str(value)[:80]!r}")
        return values

    def send_archive(study_uids: list[str], series_uids: list[str], label: str, media: bool, filename: str):
        """Answer a ZIP (or DICOM media) of what the request names, streamed as it is written."""
        # A per-data-set transform, transform(dataset) -> dataset, is chosen here and applied by
        # stored_object (and to the DICOMDIR's headers): de-identification on the fly, with the
        # research export's options and its pseudonym map (the same patient, the same pseudonym).
        transform = None
        if bottle.request.params.get("deidentify", "").lower() in ("1", "true", "yes"):
            try:
                options = DeidentificationOptions.from_params(dict(bottle.request.params))
            except ValueError as error:
                _fail(400, str(error))
            transform = functools.partial(daemon.deidentifier.deidentify, options=options)
        if label:
            try:
                label = label_name(label)
            except ValueError as error:
                _fail(400, str(error))
        if not (study_uids or series_uids or label):
            _fail(400, "name what to download: study, series (repeatable) or label")
        members = daemon.instances_to_download(checked_uids(study_uids, "study"), checked_uids(series_uids, "series"), label,
                                                api.visibility())
        audited(studies=[member.study_instance_uid for member in members] or study_uids, series=series_uids,
                instances=[member.sop_instance_uid for member in members], count=len(members),
                detail=("DICOM media" if media else "ZIP") + (", de-identified" if transform else "")
                + (f", label {label}" if label else ""))
        if not members:
            _fail(404, "nothing indexed matches: no such study, series or label")
        if media and len(members) > daemon.config.media_max_instances:
            _fail(413, f"{len(members)} instances: DICOM media holds at most {daemon.config.media_max_instances} "
                       "([archives] media_max_instances); download them as a ZIP file, or fewer at a time")
        if media:
            entries = media_entries(daemon.storage, media_directory(daemon.storage, members, transform), transform)
        else:
            entries = archive_entries(daemon.storage, members, transform)
        logging.getLogger("dicoogled.http").info("download of %d instance(s) as %s", len(members),
                                                  "DICOM media" if media else "a ZIP file")
        bottle.response.content_type = "application/zip"
        bottle.response.set_header("Content-Disposition", f'attachment; filename="{filename}{"-media" if media else ""}.zip"')
        return stream_zip(entries)

    def study_download(study, media: bool):
        checked_uids([study], "StudyInstanceUID")
        return send_archive([study], [], "", media, _entry_component(study, "study"))

    @api.route("/studies/<study>/archive", audit="download")
    def study_archive(study):
        """A study's stored files as a ZIP (application/zip, streamed, ZIP64 when large):
        PatientID/StudyInstanceUID/SeriesInstanceUID/SOPInstanceUID.dcm."""
        return study_download(study, False)

    @api.route("/studies/<study>/media", audit="download")
    def study_media(study):
        """A study as DICOM media in a ZIP (PS3.10, PS3.11): a DICOMDIR, and the files under their File IDs."""
        return study_download(study, True)

    def is_true(value) -> bool:
        return value is True or str(value).lower() in ("1", "true", "yes")

    @api.route("/archive", audit="download")
    def selection_archive():
        """Studies, series and a label's studies as one ZIP (application/zip), or DICOM media.

        study: a StudyInstanceUID (repeatable)
        series: a SeriesInstanceUID (repeatable)
        label: a label: every study and series carrying it
        media: true for DICOM media with a DICOMDIR"""
        params = bottle.request.params
        label = params.get("label", "")
        return send_archive(api.params("study"), api.params("series"), label, is_true(params.get("media", "")),
                            _entry_component(label, "selection") if label else "selection")

    @api.route("/archive", "POST", audit="download")
    def selection_archive_posted():
        """The same with a JSON body, for long selections: {studies: [...], series: [...], label, media}."""
        try:
            body = json.load(bottle.request.body) if bottle.request.content_length else {}
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            studies, series, label = body.get("studies", []), body.get("series", []), body.get("label", "")
            if not (isinstance(studies, list) and isinstance(series, list) and isinstance(label, str)):
                raise ValueError("studies and series are lists of UIDs, label is text")
        except (ValueError, UnicodeDecodeError) as error:
            _fail(400, f"not a valid selection: {error}")
        return send_archive(studies, series, label, is_true(body.get("media", False)),
                            _entry_component(label, "selection") if label else "selection")

    @api.route("/import", "POST", access=USER, audit="import")
    def start_import():
        """Import a ZIP file of DICOM files (DICOM media with a DICOMDIR too) in the background,
        each file through the one ingest path: {taskUid, taskName, ...}, as GET /import/{uid}.

        path: (administrators) a folder or ZIP file on the server, imported instead of a body"""
        user = api.current_user()
        limits = (int(daemon.config.import_max_unpacked_mb * 1024 * 1024), daemon.config.import_max_ratio)
        server_path = bottle.request.query.get("path", "")
        if server_path:
            if not user.admin:
                _fail(403, "importing from a path on the server needs an administrator")
            source = pathlib.Path(_path_from_uri(server_path))
            if source.is_dir():
                return start(user, source, None, f"{_file_uri(str(source))}", remove=False)
            if not source.is_file():
                _fail(400, f"{source} is no folder or file")
            return start(user, source, checked_zip(source, limits), _file_uri(str(source)), remove=False)
        spooled = spool_upload()
        try:
            entries = checked_zip(spooled, limits)
        except BaseException:
            spooled.unlink(missing_ok=True)
            raise
        return start(user, spooled, entries, "upload", remove=True)

    def checked_zip(path: pathlib.Path, limits) -> list:
        try:
            return check_import_zip(path, *limits)
        except ImportRefused as error:
            logging.getLogger("dicoogled.http").warning("import refused: %s", error)
            _fail(error.status, str(error))

    def spool_upload() -> pathlib.Path:
        """Copy the request's ZIP file (the body, or the form field file) to data_dir/tmp: the
        import runs after the request ends, when the server's own copy of the body is gone."""
        request = bottle.request
        if request.content_type.lower().startswith("multipart/form-data"):
            upload = request.files.get("file")
            if upload is None:
                _fail(400, "send the ZIP file as the request body, or as the form field 'file'")
            source, remaining = upload.file, None
        else:
            source, remaining = request.environ["wsgi.input"], request.content_length
            if remaining <= 0:
                _fail(400, "send the ZIP file as the request body (Content-Type: application/zip)")
        path = daemon.storage.tmp / f"import-{uuid.uuid4().hex}.zip"
        try:
            with open(path, "xb") as spool:
                while remaining is None or remaining > 0:
                    chunk = source.read(ZIP_CHUNK_BYTES if remaining is None else min(ZIP_CHUNK_BYTES, remaining))
                    if not chunk:
                        break
                    spool.write(chunk)
                    if remaining is not None:
                        remaining -= len(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    def start(user: User, source: pathlib.Path, entries, what: str, remove: bool):
        task = ImportTask(str(uuid.uuid4()), f"[{BUILTIN_PROVIDER}]import {what}", [str(source)], owner=user.username)
        daemon.tasks.start_import(task, source, entries, remove_source=remove)
        # Not the path: a folder's name may name a patient. The task's report says what came in.
        audited(detail=f"import task {task.uid}" + (", an upload" if remove else ", from the server"))
        logging.getLogger("dicoogled.http").info("import task %s started by %s: %s", task.uid, user.username, what)
        bottle.response.status = 202
        return task.as_json()

    @api.route("/import/<uid>", access=USER)
    def import_status(uid):
        """An import's progress and, once done, its report: {taskProgress, nFiles, nDone, nIndexed,
        nSkipped, nErrors, failures: [{file, reason}], complete}. One's own imports, or any for an administrator."""
        found = daemon.tasks.report(uid)
        user = api.current_user()
        if found is None or found[0].kind != "import" or (found[0].owner != user.username and not user.admin):
            _fail(404, f"no import task {uid[:80]}")
        return found[1]


def _plugin_routes(api: Api):
    daemon = api.daemon
    manager = daemon.plugins
    dicoogle_types = {"web": "servlet"}  # what Dicoogle calls a web-service plugin

    @api.route("/plugins", access=ADMIN)
    @api.route("/plugins/<kind>", access=ADMIN)
    def list_plugins(kind=None):
        """Plugins and what they provide; dead ones with the error that killed them."""
        entries = [
            {"name": BUILTIN_PROVIDER, "type": "query", "enabled": True, "dim": True, "builtin": True},
            {"name": BUILTIN_PROVIDER, "type": "index", "enabled": True, "builtin": True},
            {"name": "file-storage", "type": "storage", "enabled": True, "scheme": "file", "default": daemon.storage.scheme == "file", "builtin": True},
        ]
        dead = []
        for plugin in manager.plugins.values():
            if plugin.error:
                dead.append({"name": plugin.name, "cause": {"class": plugin.error.split(":")[0], "message": plugin.error},
                             **plugin.as_json()})
                continue
            for provided in plugin.provides or ["events"]:
                entries.append({**plugin.as_json(), "type": dicoogle_types.get(provided, provided)})
                if provided == "storage":
                    entries[-1].update(scheme=plugin.scheme, default=daemon.storage.scheme == plugin.scheme)
        if kind == "dead":
            return {"plugins": [], "dead": dead}
        if kind is not None:
            entries = [e for e in entries if e["type"] == kind]
        entries.sort(key=lambda e: (e["enabled"], e["name"]))
        return {"plugins": entries, "sets": sorted(manager.plugins), "dead": dead}

    @api.route("/plugins/<kind>/<name>/<action>", "POST", access=ADMIN, audit="plugin")
    def enable_plugin(kind, name, action):
        """Enable or disable a plugin, live: action is enable or disable."""
        if action not in ("enable", "disable"):
            _fail(400, "action must be enable or disable")
        if name not in manager.plugins:
            _fail(400, f"no plugin {name!r}")
        try:
            plugin = manager.set_enabled(name, action == "enable")
        except PluginError as error:
            _fail(400, str(error))
        _persist_plugin_settings(daemon, plugin)
        return {"success": True, "enabled": plugin.enabled}

    @api.route("/plugins/<name>/settings", access=ADMIN)
    def plugin_settings(name):
        """A plugin's settings."""
        if name not in manager.plugins:
            _fail(404, f"no plugin {name!r}")
        return manager.plugins[name].settings

    @api.route("/plugins/<name>/settings", "POST", access=ADMIN, audit="plugin")
    def change_plugin_settings(name):
        """Change a plugin's settings (form fields named as the settings); persisted."""
        plugin = manager.plugins.get(name)
        if plugin is None:
            _fail(404, f"no plugin {name!r}")
        changes = {}
        for key, value in bottle.request.params.items():
            if key not in plugin.settings:
                _fail(400, f"plugin {name} has no setting {key!r}")
            try:
                changes[key] = _convert_setting(value, plugin.settings[key])
            except ValueError:
                _fail(400, f"{key} must be a {type(plugin.settings[key]).__name__}")
        plugin.settings.update(changes)
        if "enabled" in changes:
            manager.set_enabled(name, changes["enabled"])
        _persist_plugin_settings(daemon, plugin)
        return plugin.settings

    def webui_plugins():
        return [p for p in manager.plugins.values() if p.webui and p.enabled]

    @api.route("/webui")
    def webui():
        """Web UI plugins' descriptors (package.json style), filtered by slot-id and role."""
        params = bottle.request.params
        if params.get("module"):
            bottle.redirect(f"/webui/module/{urllib.parse.quote(params['module'])}")
        if params.get("name"):
            plugin = manager.plugins.get(params["name"])
            if plugin is None or not plugin.webui:
                _fail(404, f"no web UI plugin {params['name']!r}")
            return plugin.webui
        slots = api.params("slot-id")
        user = api.current_user()
        found = []
        for plugin in webui_plugins():
            descriptor = plugin.webui.get("dicoogle", {})
            roles = descriptor.get("roles") or []
            if slots and descriptor.get("slot-id") not in slots:
                continue
            if roles and not (user and (user.admin or set(roles) & set(user.roles))):
                continue
            found.append({**plugin.webui, "settings": plugin.settings})
        return {"plugins": found}

    @api.route("/webui/module/<name>")
    def webui_module(name):
        """A web UI plugin's JavaScript module, wrapped for Dicoogle's web core unless process=false."""
        plugin = manager.plugins.get(name)
        if plugin is None or not plugin.webui or not plugin.enabled:
            _fail(404, f"no web UI plugin {name!r}")
        module_file = plugin.webui.get("dicoogle", {}).get("module-file", f"{name}.js")
        path = (plugin.path.parent / module_file).resolve()
        if not path.is_relative_to(plugin.path.parent.resolve()) or not path.is_file():
            _fail(404, f"the module of {name} is missing")
        source = path.read_text(encoding="utf-8")
        bottle.response.content_type = "text/javascript; charset=utf-8"
        if bottle.request.params.get("process", "true") == "false":
            return source
        quoted = json.dumps(name)
        return ("(function () {\nvar module = {exports: {}}, exports = module.exports;\n" + source +
                f"\n;var constructor = module.exports && module.exports.default || module.exports;\n"
                f"var core = window.DicoogleWebcore = window.DicoogleWebcore || {{}};\n"
                f"core.constructors = core.constructors || {{}}; core.constructors[{quoted}] = constructor;\n"
                f"if (core.onRegister) core.onRegister(new constructor(), {quoted});\n}})();\n")

    methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"]

    # OPTIONS here needs a login like any read: answered anonymously, it would tell who exists.
    @api.route("/ext/<name>/", methods, access=READ, audit="plugin")
    @api.route("/ext/<name>/<rest:path>", methods, access=READ, audit="plugin")
    def web_service(name, rest=""):
        """A plugin's web service: reads need a login, writes a user (as the core's routes)."""
        if bottle.request.method not in ("GET", "HEAD", "OPTIONS"):
            api.require(USER)  # reads were checked by the route; writes need a user even when reads are open
        plugin = manager.plugins.get(name)
        if plugin is None or not plugin.enabled or "routes" not in plugin.hooks:
            _fail(404, f"no web service plugin {name!r}")
        if plugin.web is None:
            # built whole before it is shared: a request arriving meanwhile must not see half the routes
            web = bottle.Bottle()
            plugin.hooks["routes"](web)
            plugin.web = web
        environ = dict(bottle.request.environ, PATH_INFO="/" + rest)
        route, arguments = plugin.web.router.match(environ)
        plugin.calls += 1
        try:
            result = route.call(**arguments)
        except bottle.HTTPResponse:
            raise
        except CodecWorkerError as error:  # the worker's failure, not the plugin's
            _codec_failure(error, f"{bottle.request.method} {bottle.request.path}")
        except Exception as error:
            plugin.failures += 1
            logging.getLogger(f"dicoogled.plugin.{name}").exception("web service %s failed", rest)
            _fail(500, f"plugin {name} failed: {error}")
        return _json_response(result) if isinstance(result, list) else result

    # A plugin may also ask to be served at a path of its own (DICOMweb at /dicom-web). That path
    # is public knowledge, so CORS preflights, which carry no credentials, reach the plugin.
    for plugin in manager.plugins.values():
        if plugin.mount and not plugin.error:
            for path in (plugin.mount, plugin.mount + "/<rest:path>"):
                api.route(path, methods, access=READ, open_preflight=True, audit="plugin")(_mounted_service(web_service, plugin))


def _web_app_routes(api: Api):
    """The web app in www/: static files only, it talks to the REST API like any script."""
    www = pathlib.Path(__file__).resolve().parent / "www"

    @api.route("/", access=PUBLIC)
    def web_app():
        """The web app."""
        response = bottle.static_file("index.html", root=str(www))
        response.set_header("Cache-Control", "no-cache")
        return response

    @api.route("/static/<path:path>", access=PUBLIC)
    def web_app_file(path):
        """The web app's scripts, styles and icons (no patient data)."""
        response = bottle.static_file(path, root=str(www))
        response.set_header("Cache-Control", "no-cache")  # a lab updates by git pull: always revalidate
        return response


#: The course's pages and pictures: a name in docs/learn/, never a path (no folder, no "..").
_LEARN_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\.(md|svg)")
#: The HTML tags a course page may hold (folded solutions); any other HTML in it is shown as text.
_LEARN_TAGS = re.compile(r"&lt;(/?(?:details|summary))&gt;")
_LEARN_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <meta name="referrer" content="no-referrer">
  <title>{title} · dicoogled course</title>
  <link rel="stylesheet" href="/static/learn.css">
  <link rel="icon" href="data:,">
</head>
<body>
  <nav class="learn-nav" aria-label="Course"><a href="/learn/">Course</a> <a href="/">Web app</a></nav>
  <main class="learn">
{body}
  </main>
</body>
</html>
"""


@functools.lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    """CommonMark and tables; raw HTML escaped except _LEARN_TAGS, links checked by markdown-it."""
    markdown = MarkdownIt("commonmark", {"html": True}).enable("table")

    def allowed_html(renderer, tokens, index, options, env):
        return _LEARN_TAGS.sub(r"<\1>", html.escape(tokens[index].content, quote=False))

    markdown.add_render_rule("html_block", allowed_html)
    markdown.add_render_rule("html_inline", allowed_html)
    return markdown


def render_learn_page(text: str) -> str:
    """A course chapter (Markdown) as a whole HTML page, titled by its first heading."""
    title = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), "Course")
    return _LEARN_PAGE.format(title=html.escape(title), body=_markdown().render(text))


def _learn_routes(api: Api):
    """The course in docs/learn/, rendered for the browser: public, like the docs in the clone."""
    learn = pathlib.Path(__file__).resolve().parent / "docs" / "learn"

    @api.route("/learn", access=PUBLIC)
    def learn_root():
        """The course's first page."""
        bottle.redirect("/learn/")

    @api.route("/learn/", access=PUBLIC)
    @api.route("/learn/<name:path>", access=PUBLIC)
    def learn_page(name="README.md"):
        """A chapter of the course as HTML, or one of its pictures."""
        match = _LEARN_FILE.fullmatch(name)
        if not match or not (learn / name).is_file():
            _fail(404, "no such page in the course")
        if match.group(1) == "svg":
            response = bottle.static_file(name, root=str(learn), mimetype="image/svg+xml")
            response.set_header("Cache-Control", "no-cache")
            return response
        bottle.response.content_type = "text/html; charset=utf-8"
        bottle.response.set_header("Cache-Control", "no-cache")
        return render_learn_page((learn / name).read_text(encoding="utf-8"))


def _mounted_service(web_service, plugin: Plugin):
    """web_service for one plugin, named and documented for /openapi.json."""
    def mounted(rest=""):
        return web_service(plugin.name, rest)
    mounted.__doc__ = f"{plugin.name}: {plugin.description or 'a plugin web service'}"
    return mounted


def _viewer_routes(api: Api):
    viewer = api.daemon.config.data_dir.resolve() / "viewer"

    @api.route("/viewer", access=PUBLIC)
    def viewer_root():
        """The OHIF viewer, once `dicoogled install-viewer` has installed it."""
        bottle.redirect("/viewer/")

    @api.route("/viewer/", access=PUBLIC)
    @api.route("/viewer/<path:path>", access=PUBLIC)
    def viewer_file(path="index.html"):
        """The viewer's files; any other path is one of its pages (index.html)."""
        if not (viewer / "index.html").is_file():
            _fail(404, "the viewer is not installed: run 'dicoogled install-viewer'")
        candidate = (viewer / path).resolve()
        if not candidate.is_relative_to(viewer) or not candidate.is_file():
            path = "index.html"
        response = bottle.static_file(path, root=str(viewer))
        response.set_header("Cache-Control", "no-cache")  # reinstalled in place: always revalidate
        if path == "index.html":
            response.set_header("Content-Security-Policy", _viewer_policy(viewer / "index.html"))
        return response


_INLINE_SCRIPT = re.compile(r"<script\b(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.S | re.I)


@functools.lru_cache(maxsize=4)
def _viewer_policy_for(index_html: str) -> str:
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
                      for script in _INLINE_SCRIPT.findall(index_html))
    return VIEWER_POLICY.replace("script-src 'self'", f"script-src 'self' {hashes}" if hashes else "script-src 'self'")


def _viewer_policy(index: pathlib.Path) -> str:
    """VIEWER_POLICY for the viewer's index.html, allowing its own inline scripts by their hashes
    (and no other inline script)."""
    return _viewer_policy_for(index.read_text(encoding="utf-8", errors="replace"))


def _persist_plugin_settings(daemon: "Daemon", plugin: Plugin):
    """Write a plugin's settings as [plugin.NAME] where the settings changed at run time are kept
    (data_dir/settings.ini, or the PostgreSQL index's database), so they survive a restart."""
    values = {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in plugin.settings.items()}
    with daemon.settings_lock:
        save_settings(daemon.config.settings_location, {f"plugin.{plugin.name}": values})
    daemon.config.plugin_settings[plugin.name] = values


# ---- images and tags: /dic2png, /dictags ----------------------------------------------------

#: Characters XML 1.0 cannot carry; Dicoogle also shows them as spaces.
_XML_UNSAFE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _tags_xml(dataset: Dataset) -> bytes:
    """A data set as /dictags XML: <tags><tag id="00100010" name="PatientName" vr="PN">DOE^J</tag>…

    name is the keyword (Dicoogle's attribute), or pydicom's description of a private tag; values
    are text, multiple values joined by a backslash; binary values are left out but for their
    length (bytes="…"), and sequences hold an <item> of tags per item.
    """
    def add(parent: ElementTree.Element, elements: Dataset):
        for tag in elements.keys():
            try:
                element = elements[tag]
                node = ElementTree.SubElement(parent, "tag", id=f"{int(tag):08X}",
                                              name=element.keyword or element.name, vr=str(element.VR))
                if element.VR == "SQ":
                    for item in element.value:
                        add(ElementTree.SubElement(node, "item"), item)
                    continue
                value = _text_value(element)
            except Exception as error:  # a malformed value: say so, and go on with the others
                node = ElementTree.SubElement(parent, "tag", id=f"{int(tag):08X}", error=str(error)[:200])
                continue
            if value is None:
                node.set("bytes", str(len(element.value)))
            else:
                node.text = _XML_UNSAFE.sub(" ", "\\".join(value) if isinstance(value, list) else value)

    root = ElementTree.Element("tags")
    add(root, dataset.file_meta)
    add(root, dataset)
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)


def _share_time(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


def _share_json(link: ShareLink) -> dict:
    return {"id": link.id, "createdBy": link.created_by, "created": _share_time(link.created), "label": link.label,
            "studies": list(link.study_uids), "expires": _share_time(link.expires), "usesAllowed": link.uses_allowed,
            "uses": link.uses, "state": link.state(time.time())}


def _share_routes(api: Api):
    """Share links: some studies, or a collection, shown read-only to whoever opens the link,
    without an account. Opening a link (GET /shared/{token}) counts one use and starts a share
    session (a cookie); its requests see exactly the link's studies, through the same
    visibility as collections, until the link expires or is revoked.

    A de-identified link (deidentify=true) shows de-identified copies instead: the research
    export makes them, labelled shared-..., and the link shares that label. Copies, not a
    transform where data leaves, because a share session reads the index too (searches, QIDO,
    the viewer's metadata), which holds the originals' names and UIDs."""
    daemon, users = api.daemon, api.users
    http_log = logging.getLogger("dicoogled.http")

    def expiry_of_request() -> float | None:
        text = bottle.request.params.get("expires", "").strip()
        if not text:
            return None
        try:
            when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            _fail(400, f"expires must be an ISO 8601 date or date and time, not {text[:40]!r}")
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)  # a date alone: its start, UTC
        if when.timestamp() <= time.time():
            _fail(400, "expires must be in the future")
        return when.timestamp()

    @api.route("/share", "POST", access=USER, audit="share")
    def create_share():
        """Share studies or a collection read-only with whoever opens the link, without an
        account: {id, token, url, expires, usesAllowed}. An administrator shares anything
        indexed; another user what is in a collection it has write access to.

        study: a StudyInstanceUID (repeatable), or label: a collection
        expires: when the link stops working, an ISO 8601 date or date and time (UTC unless it says)
        uses: how many times the link may be opened
        deidentify: true to share de-identified copies (made by a research export task, taskUid;
        its options: retain_dates, retain_device_identity, ...) instead of the studies
        """
        user = api.current_user()
        params = bottle.request.params
        studies = list(dict.fromkeys(api.params("study")))
        label = params.get("label", "").strip()
        if bool(studies) == bool(label):
            _fail(400, "share either studies (study=UID, repeatable) or a collection (label=NAME)")
        expires, uses = expiry_of_request(), _int_param("uses", None, minimum=1)
        if expires is None and uses is None:
            _fail(400, "a share link needs an end: expires (a date) or uses (a number), or both")
        writable = Visibility.of(label for label, access in users.collections_of(user).items() if access == "write")
        if label:
            try:
                label = label_name(label)
            except ValueError as error:
                _fail(400, str(error))
            if not user.admin and label not in writable.labels:
                _fail(403, f"sharing collection {label!r} needs write access to it")
        for uid in studies:
            if not is_valid_uid(uid):
                _fail(400, f"{uid[:80]!r} is not a StudyInstanceUID")
            if not daemon.index.holds("STUDY", uid, EVERYTHING if user.admin else writable):
                _fail(404 if user.admin else 403, f"study {uid} is not indexed" if user.admin
                      else f"study {uid} is in no collection you have write access to")
        deidentified = {}
        if params.get("deidentify", "").lower() in ("1", "true", "yes"):
            copies = f"shared-{secrets.token_hex(6)}"
            try:
                options = DeidentificationOptions.from_params(dict(params))
                task = daemon.start_research_export(label, copies, options, studies)
            except (ValueError, LookupError) as error:
                _fail(400, str(error))
            label, studies, deidentified = copies, [], {"deidentified": True, "label": copies, "taskUid": task}
        link, token = users.create_share(user.username, label, studies, expires, uses)
        audited(studies=studies, share_link=link.id, detail=f"created{f' for label {label}' if label else ''}"
                + (", de-identified" if deidentified else ""))
        http_log.info("%s shared %s until %s%s", user.username, link.id, _share_time(expires) or f"{uses} uses",
                      ", de-identified" if deidentified else "")
        return _json_response({"id": link.id, "token": token, "url": urllib.parse.urljoin(bottle.request.url, f"shared/{token}"),
                               "expires": _share_time(expires), "usesAllowed": uses, **deidentified}, 201)

    @api.route("/share", access=USER)
    def list_shares():
        """Share links: every one for an administrator, one's own for others: {shares: [{id,
        createdBy, created, label, studies, expires, usesAllowed, uses, state}]}; state is
        active, expired, used or revoked. Tokens are not kept, so never listed."""
        user = api.current_user()
        return {"shares": [_share_json(link) for link in users.shares(None if user.admin else user.username)]}

    @api.route("/share/<share_id>", "DELETE", access=USER, audit="share")
    def revoke_share(share_id):
        """Revoke a share link (its maker or an administrator): it opens no more, and those who
        opened it see nothing from their next request: {id, revoked}."""
        user = api.current_user()
        link = users.share(share_id)
        audited(share_link=share_id[:40], detail="revoked")
        if link is None or not (user.admin or link.created_by == user.username):
            _fail(404, f"no share link {share_id[:40]!r} of yours")
        return {"id": share_id, "revoked": users.revoke_share(share_id)}

    @api.route("/shared/<token>", access=PUBLIC, audit="share")
    def open_share(token):
        """Open a share link: counts one use, starts a share session (a cookie) and goes to the
        web app showing the shared studies; 404 for an unknown link, 410 for one revoked,
        expired or used as often as allowed."""
        link, session = users.open_share(token)
        if link is None:
            _fail(404, "no such share link")
        audited(share_link=link.id, studies=link.study_uids, detail="opened")
        if session is None:
            _fail(410, f"this share link is {link.state(time.time())}")
        http_log.info("share link %s opened from %s (use %d)", link.id, api.client_address(), link.uses)
        bottle.response.set_cookie(SHARE_COOKIE, session, httponly=True, samesite="strict", path="/")
        bottle.redirect(urllib.parse.urljoin(bottle.request.url, "../#/search?q=" + urllib.parse.quote("*:*")), 303)

    @api.route("/shared", access=PUBLIC)
    def shared():
        """The share session of this browser: {shared: true, id, label, studies, expires}, or
        {shared: false} (the web app asks, to show a link's visitor its studies)."""
        link = api.current_share()
        if link is None:
            return {"shared": False}
        return {"shared": True, "id": link.id, "label": link.label, "studies": list(link.study_uids),
                "expires": _share_time(link.expires)}


def _image_routes(api: Api):
    daemon = api.daemon
    thumbnails = daemon.thumbnails
    http_log = logging.getLogger("dicoogled.http")

    def instance_of_request() -> tuple[str, str, str]:
        """(SOPInstanceUID, location, cache key) of the instance a request names by SOPInstanceUID or uri."""
        params = bottle.request.params
        uid, uri = params.get("SOPInstanceUID", "").strip(), params.get("uri", "").strip()
        if uid:
            if not is_valid_uid(uid):
                _fail(400, f"SOPInstanceUID must be a UID, not {uid[:80]!r}")
            found = daemon.index.instance(uid, visibility=api.visibility())
        elif uri:
            found = daemon.index.instance(path=_path_from_uri(uri) if location_scheme(uri) == "file" else uri,
                                          visibility=api.visibility())
        else:
            _fail(400, "give SOPInstanceUID or uri")
        if not found:
            _fail(404, f"no instance {uid or uri[:200]}")
        audited(instances=found.sop_instance_uid, count=1)
        stamp = instance_stamp(found.path, found.size, found.mtime_ns)
        if stamp is None:
            _fail(404, f"the file of {found.sop_instance_uid} is missing; run 'dicoogled check'")
        return found.sop_instance_uid, found.path, stamp

    def source_of(uid: str, location: str):
        try:
            return daemon.storage.open(location)
        except OSError as error:
            _fail(404, f"the object of {uid} cannot be read: {error}")

    @api.route("/dic2png", audit="download")
    def dic2png():
        """A frame of an instance as PNG: SOPInstanceUID or uri; frame (from 0); thumbnail (a flag).

        windowCenter, windowWidth: a window of one's own (a preset such as lung or bone) instead of the file's
        """
        uid, location, key = instance_of_request()
        frame = _int_param("frame", 0)
        thumbnail = bottle.request.params.get("thumbnail", "false").strip().lower() not in ("false", "0", "no", "off")
        audited(detail=f"frame {frame}" + (", thumbnail" if thumbnail else ""))
        window = None
        if bottle.request.params.get("windowCenter") or bottle.request.params.get("windowWidth"):
            try:
                window = (float(bottle.request.params["windowCenter"]), float(bottle.request.params["windowWidth"]))
            except (KeyError, ValueError):
                _fail(400, "windowCenter and windowWidth go together, as numbers")
            if not window[1] > 0 or not all(map(math.isfinite, window)):
                _fail(400, "windowWidth must be a positive number")
        edge = daemon.config.thumbnail_size if thumbnail else None
        key = f"{key} {edge}"
        cacheable = thumbnail and frame == 0 and window is None  # what result pages show
        png = thumbnails.get(uid, key) if cacheable else None
        if png is None:
            try:
                png = daemon.codecs.call("render", source_of(uid, location), frame=frame, size=edge, window=window,
                                         text=key if cacheable else "")
            except FrameOutOfRange as error:
                _fail(400, str(error))
            except UnrenderableError as error:
                http_log.info("dic2png: %s cannot be rendered: %s", uid, error)
                _fail(415, f"{uid} cannot be shown as an image: {error}")
            except CodecWorkerError as error:
                _codec_failure(error, uid)
            if cacheable:
                try:
                    thumbnails.put(uid, key, png)
                except OSError as error:  # a full disk costs speed, not the answer
                    http_log.warning("cannot cache the thumbnail of %s: %s", uid, error)
        bottle.response.content_type = "image/png"
        return png

    @api.route("/dic2png", "POST", audit="download")
    def frame_information():
        """Frames of an instance: {SOPInstanceUID, NumberOfFrames, FrameRate}."""
        uid, location, _ = instance_of_request()
        try:
            header = read_image_header(source_of(uid, location))
        except UnrenderableError as error:
            _fail(415, f"{uid}: {error}")
        return {"SOPInstanceUID": uid, "NumberOfFrames": frame_count(header), "FrameRate": frame_rate(header)}

    @api.route("/dictags", audit="view")
    def dictags():
        """The tags of an instance, read from its file, as XML: SOPInstanceUID or uri."""
        uid, location, _ = instance_of_request()
        try:
            dataset = pydicom.dcmread(source_of(uid, location), stop_before_pixels=True, force=True)
        except Exception as error:
            _fail(415, f"{uid} cannot be read as DICOM: {error}")
        bottle.response.content_type = "application/xml; charset=utf-8"
        return _tags_xml(dataset)


def _webhook_routes(api: Api):
    daemon = api.daemon

    @api.route("/management/webhooks", access=ADMIN)
    def webhook_deliveries():
        """The webhooks ([webhooks], secrets left out) and their delivery log, newest first.

        status: only the deliveries pending, delivered or failed
        limit: how many deliveries, at most (100)
        """
        status = bottle.request.params.get("status", "")
        if status not in ("", "pending", "delivered", "failed"):
            _fail(400, "status is pending, delivered or failed")
        limit = _int_param("limit", 100, minimum=1)
        hooks = [{"name": hook.name, "url": hook.url, "events": sorted(hook.events), "timeout": hook.timeout,
                  "retry": list(hook.retry), "attempts": hook.attempts} for hook in daemon.config.webhooks.values()]
        deliveries = [{"id": d.delivery_id, "hook": d.hook, "event": d.event, "status": d.status, "attempts": d.attempts,
                       "created": d.created, "nextAttempt": d.next_attempt if d.status == "pending" else None,
                       "finished": d.finished, "lastError": d.last_error, "body": json.loads(d.body)}
                      for d in daemon.index.deliveries(min(limit, 10_000), status)]
        return {"webhooks": hooks, "deliveries": deliveries}


def _task_routes(api: Api):
    daemon = api.daemon

    @api.route("/management/tasks/index", "POST", access=ADMIN, audit="task")
    def index_task():
        """Index files or folders in place, in the background: uri (repeatable)."""
        uris = api.params("uri")
        if not uris:
            _fail(400, "uri is required")
        paths = [_path_from_uri(uri) for uri in uris]
        for path in paths:
            if not os.path.exists(path):
                _fail(400, f"{path} does not exist")
        task = daemon.tasks.start_index(paths)
        audited(detail=f"index task {task.uid} started for {len(paths)} path(s)")
        return {"tasks": [{"uid": task.uid, "name": task.name, "progress": task.progress, "done": False,
                           "cancelled": False, "timeCreated": task.as_json()["taskTimeCreated"]}]}

    @api.route("/index/task", access=ADMIN)
    def list_tasks():
        """The tasks of every node with their progress, until closed."""
        reports = [report for _, report in daemon.tasks.reports()]
        return {"results": reports, "count": sum(1 for report in reports if not report.get("complete"))}

    @api.route("/index/task", "POST", access=ADMIN, audit="task")
    def change_task():
        """Stop (type=stop) or close (type=close) a task: uid."""
        params = bottle.request.params
        uid, kind = params.get("uid", ""), params.get("type", "")
        audited(detail=f"{kind[:10]} task {uid[:40]}")
        if kind not in ("stop", "close"):
            _fail(400, "type must be stop or close")
        if kind == "stop":
            stopped = daemon.tasks.stop(uid)
            return {"error": True} if stopped is None else {"stopped": stopped}
        return {"removed": True} if daemon.tasks.remove(uid) else {"error": True}

    def instances_of_request(recursive=True) -> tuple[list[IndexedInstance], int]:
        """The instances a request names by uri (a folder too, if recursive) or UIDs, and how
        many of the names were not found."""
        found, missing = [], 0
        chosen = [k for k in ("uri", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID") if api.params(k)]
        if len(chosen) != 1:
            _fail(400, "give exactly one of uri, SOPInstanceUID, SeriesInstanceUID or StudyInstanceUID")
        for value in api.params(chosen[0]):
            if chosen[0] == "uri":
                one = daemon.index.instance(path=_path_from_uri(value))
                named = [one] if one else daemon.index.instances_below(_path_from_uri(value)) if recursive else []
            else:
                if not is_valid_uid(value):
                    _fail(400, f"{chosen[0]} must be a UID, not {value[:80]!r}")
                argument = {"StudyInstanceUID": "study_uid", "SeriesInstanceUID": "series_uid", "SOPInstanceUID": "sop_uid"}
                named = daemon.index.instances_of(**{argument[chosen[0]]: value})
            found.extend(named)
            missing += not named
        return found, missing

    @api.route("/management/tasks/unindex", "POST", access=ADMIN, audit="delete")
    def unindex():
        """Remove instances from the index, leaving their files: by uri or UID (repeatable)."""
        named, missing = instances_of_request()
        audited(instances=[instance.sop_instance_uid for instance in named], count=len(named), detail="unindex")
        removed = daemon.ingest.unindex_paths([instance.path for instance in named])
        return {"indexed": removed, "failed": len(named) - removed, "notFound": missing}

    def study_to_protect(study):
        if not is_valid_uid(study):
            _fail(400, f"StudyInstanceUID must be a UID, not {study[:80]!r}")
        return study

    @api.route("/studies/<study>/protected", access=READ)
    def study_protection(study):
        """Whether recycling ([storage] when_full = recycle) may delete a study."""
        if api.visibility().restricted:
            api.require_visible("STUDY", study_to_protect(study))
        return {"StudyInstanceUID": study, "protected": daemon.index.is_protected(study_to_protect(study))}

    @api.route("/studies/<study>/protected", "PUT", access=ADMIN, audit="protect")
    def protect_study(study):
        """Protect a study: recycling never deletes it (it may be absent yet: it stays protected)."""
        audited(studies=study[:80], detail="protect")
        changed = daemon.index.write(Index.protect_study, study_to_protect(study))
        logging.getLogger("dicoogled.storage").info("study %s protected by %s", study, api.current_user().username)
        return {"StudyInstanceUID": study, "protected": True, "changed": changed}

    @api.route("/studies/<study>/protected", "DELETE", access=ADMIN, audit="protect")
    def unprotect_study(study):
        """Unprotect a study: recycling may delete it again."""
        audited(studies=study[:80], detail="unprotect")
        changed = daemon.index.write(Index.unprotect_study, study_to_protect(study))
        logging.getLogger("dicoogled.storage").info("study %s unprotected by %s", study, api.current_user().username)
        return {"StudyInstanceUID": study, "protected": False, "changed": changed}

    @api.route("/management/retention", access=ADMIN)
    def retention_dry_run():
        """List what the [retention] rules would delete now, deleting nothing (a dry run).

        dry_run: 1 or true (the default); this route never deletes, POST does
        """
        if bottle.request.params.get("dry_run", "1").strip().lower() not in ("1", "true"):
            _fail(400, "GET only lists (dry_run=1): POST /management/retention applies the rules")
        return {"rules": [dataclasses.asdict(rule) for rule in daemon.config.retention_rules.values()],
                "studies": daemon.ingest.apply_retention(daemon.config.retention_rules.values(), dry_run=True)}

    @api.route("/management/retention", "POST", access=ADMIN, audit="delete")
    def retention_now():
        """Apply the [retention] rules now: delete the studies they name (protected ones never)."""
        logging.getLogger("dicoogled.storage").info("retention applied by %s", api.current_user().username)
        deleted = daemon.ingest.apply_retention(daemon.config.retention_rules.values())
        audited(studies=[study["StudyInstanceUID"] for study in deleted],
                count=sum(study.get("deleted", 0) for study in deleted), detail="retention rules")
        return {"studies": deleted}

    @api.route("/management/tasks/remove", "POST", access=ADMIN, audit="delete")
    def remove():
        """Delete instances' files and unindex them: by uri or UID (repeatable)."""
        # Not recursive, as in Dicoogle: a folder URI must never empty the archive.
        named, missing = instances_of_request(recursive=False)
        audited(instances=[instance.sop_instance_uid for instance in named], count=len(named), detail="remove")
        removed, failed = daemon.ingest.delete_instances(named, "removed through REST by " + getattr(api.current_user(), "username", "?"))
        return {"removed": removed, "failed": failed, "notFound": missing}


# ---- management: settings, DICOM services, log, API description ----------------------------

#: Dicoogle's Q/R settings (its web app's "Query Retrieve advanced options") and the Config
#: attributes they are. responseTimeout is the DIMSE response timeout here (Dicoogle's rsp-delay).
QUERY_RETRIEVE_SETTINGS = {
    "acceptTimeout": "acse_timeout", "connectionTimeout": "connection_timeout", "idleTimeout": "network_timeout",
    "maxAssociations": "max_associations", "maxPduReceive": "max_pdu", "maxPduSend": "max_pdu_send",
    "responseTimeout": "dimse_timeout",
}
#: Seconds a C-ECHO test of a move destination (POST /management/dicom/echo) may take per step.
ECHO_TIMEOUT = 5.0


def _bool_param(name: str) -> bool | None:
    """A true/false request parameter; None when absent (400 if it is neither)."""
    raw = bottle.request.params.get(name)
    if raw is None:
        return None
    if raw.strip().lower() not in ("true", "false"):
        _fail(400, f"{name} must be true or false, not {raw[:40]!r}")
    return raw.strip().lower() == "true"


def _bounded_int_param(name: str, minimum: int, maximum: int, error: str = "") -> int | None:
    """A whole-number request parameter from minimum to maximum; None when absent or empty."""
    raw = bottle.request.params.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not minimum <= int(raw) <= maximum:
        _fail(400, error or f"{name} must be a whole number from {minimum} to {maximum}, not {raw[:40]!r}")
    return int(raw)


def _check_settings(config: Config, **values):
    """Answer 400, with the reason, unless Config.validate accepts these settings."""
    try:
        config.changed(**values)
    except ValueError as error:
        _fail(400, str(error))


def _change_settings(daemon: "Daemon", **values):
    """Daemon.change_settings, for a request: 400 with the reason if a setting cannot work."""
    try:
        daemon.change_settings(**values)
    except ValueError as error:
        _fail(400, str(error))


# Dicoogle's /management/settings and /management/dicom routes, one function per resource. A
# change goes through Daemon.change_settings: checked by Config.validate (400 with the reason if
# it cannot work), saved in data_dir/settings.ini (so it survives a restart), then applied.


def _index_settings_routes(api: Api):
    """/management/settings/index: watched folders, watcher, thumbnails."""
    daemon, config = api.daemon, api.daemon.config

    def index_settings() -> dict:
        # Dicoogle's `path` is its storage folder, which its web app shows and sends back as the
        # watched folder; here it is the watched folders, so that round trip does what it says.
        return {"path": os.pathsep.join(str(folder) for folder in config.watch_folders), "zip": False,
                "effort": str(config.index_effort), "thumbnail": config.thumbnails,
                "thumbnailSize": str(config.thumbnail_size), "watcher": config.watch_enabled}

    def watched_folders(texts: list[str]) -> list[pathlib.Path]:
        folders = []
        for text in texts:
            for part in filter(None, text.split(os.pathsep)):
                if not os.path.isabs(part) or not os.path.isdir(part):
                    _fail(400, f"path {part[:200]!r} is not an existing folder (an absolute path)")
                folders.append(pathlib.Path(os.path.normpath(part)))
        return folders

    def change_index_settings(thumbnail_param: str):
        values = {}
        if "path" in bottle.request.params:
            values["watch_folders"] = watched_folders(bottle.request.params.getall("path"))
        for name, attribute in (("watcher", "watch_enabled"), (thumbnail_param, "thumbnails")):
            if (value := _bool_param(name)) is not None:
                values[attribute] = value
        if (effort := _bounded_int_param("effort", 0, 100)) is not None:
            values["index_effort"] = effort
        if (size := _bounded_int_param("thumbnailSize", 1, 4096)) is not None:
            values["thumbnail_size"] = size
        _change_settings(daemon, **values)
        if {"watch_folders", "watch_enabled"} & set(values):
            daemon.watch()

    @api.route("/management/settings/index", access=ADMIN)
    def get_index_settings():
        """Indexer settings: watched folders (path, separated as in PATH), watcher, thumbnails."""
        return index_settings()

    @api.route("/management/settings/index", "POST", access=ADMIN, audit="settings")
    def set_index_settings():
        """Change indexer settings: any of the parameters, applied at once.

        path: the watched folders, absolute, separated by the OS path separator (':') or repeated; empty for none
        watcher: true to watch them, false to stop
        saveThumbnail: true to render thumbnails when indexing (kept for Dicoogle clients)
        effort: indexing effort, 0..100 (kept for Dicoogle clients)
        thumbnailSize: thumbnail size in pixels, 1..4096
        """
        change_index_settings("saveThumbnail" if "saveThumbnail" in bottle.request.params else "thumbnail")

    def index_setting_routes(field: str, name: str):
        """GET and POST /management/settings/index/<field>: one setting, named `name`."""

        def get_setting():
            value = index_settings()[name]
            bottle.response.content_type = "application/json"  # though bare text: Dicoogle's way
            return value if isinstance(value, str) else json.dumps(value)

        def set_setting():
            if not bottle.request.params.get(name, "").strip():
                _fail(400, f"Invalid {name}")
            if name == "zip":
                return "indexZipFiles is no longer supported"
            change_index_settings("thumbnail")
            return ""

        get_setting.__doc__ = f"The indexer's {name} setting, as bare text."
        set_setting.__doc__ = f"Change the indexer's {name} setting.\n\n{name}: as in POST /management/settings/index\n"
        api.route(f"/management/settings/index/{field}", access=ADMIN)(get_setting)
        api.route(f"/management/settings/index/{field}", "POST", access=ADMIN, audit="settings")(set_setting)

    for field, name in {"path": "path", "zip": "zip", "effort": "effort", "thumbnail": "thumbnail",
                        "watcher": "watcher", "thumbnail/size": "thumbnailSize"}.items():
        index_setting_routes(field, name)


def _transfer_settings_routes(api: Api):
    """/management/settings/transfer: the transfer syntaxes accepted per storage SOP class."""
    daemon, config = api.daemon, api.daemon.config

    syntax_by_name = {name.lower(): uid for uid, name in TRANSFER_SYNTAX_NAMES.items()}

    def transfer_options(sop_class: str) -> list[dict]:
        allowed = config.transfer_syntaxes.get(sop_class)
        return [{"uid": uid, "name": name, "value": allowed is None or uid in allowed}
                for uid, name in TRANSFER_SYNTAX_NAMES.items()]

    @api.route("/management/settings/transfer", access=ADMIN)
    def transfer_settings():
        """Storage SOP classes, each with the transfer syntaxes it is accepted in."""
        classes = [context.abstract_syntax for context in StoragePresentationContexts]
        classes += [uid for uid in config.transfer_syntaxes if uid not in classes]
        return _json_response([{"uid": uid, "sop_name": pydicom.uid.UID(uid).name, "options": transfer_options(uid)}
                               for uid in classes])

    @api.route("/management/settings/transfer", ["POST", "PUT"], access=ADMIN, audit="settings")
    def set_transfer_option():
        """Accept, or not, a storage SOP class in one transfer syntax.

        With every option on (the default) a SOP class is accepted in every transfer syntax dicoogled
        knows, as sent. Otherwise association negotiation accepts a proposed context in one of the
        allowed syntaxes, and refuses a context proposing none of them (result 4).

        uid: the SOP Class UID
        option: a transfer syntax, by Dicoogle's name (ExplicitVRLittleEndian, JPEGLossless, ...) or UID
        value: true to accept it, false to refuse it
        """
        params = bottle.request.params
        daemon.follow_settings()  # what another node limited is kept
        for name in ("uid", "option", "value"):
            if name not in params:
                _fail(400, f'No query {name} Supplied: Please provide the field "{name}"')
        sop_class, option = params["uid"].strip(), params["option"].strip()
        if not is_valid_uid(sop_class):
            _fail(400, f"uid must be a SOP Class UID, not {sop_class[:80]!r}")
        syntax = option if option in TRANSFER_SYNTAX_NAMES else syntax_by_name.get(option.lower())
        if syntax is None:
            _fail(400, f"unknown transfer syntax {option[:80]!r}: one of {', '.join(TRANSFER_SYNTAX_NAMES.values())}")
        accept = _bool_param("value")
        allowed = [uid for uid in config.transfer_syntaxes.get(sop_class, TRANSFER_SYNTAX_NAMES) if uid != syntax]
        allowed += [syntax] if accept else []
        limits = {uid: syntaxes for uid, syntaxes in config.transfer_syntaxes.items() if uid != sop_class}
        if not set(TRANSFER_SYNTAX_NAMES) <= set(allowed):
            limits[sop_class] = allowed
        _change_settings(daemon, transfer_syntaxes=limits)
        return {"success": True}


def _dicom_settings_routes(api: Api):
    """/management/settings/dicom: query/retrieve limits, the AE title, the tags offered."""
    daemon, config = api.daemon, api.daemon.config

    @api.route("/management/settings/dicom/query", access=ADMIN)
    def query_retrieve_settings():
        """DICOM limits and timeouts (seconds), by Dicoogle's names."""
        values = {name: getattr(config, attribute) for name, attribute in sorted(QUERY_RETRIEVE_SETTINGS.items())}
        return {name: int(value) if float(value).is_integer() else value for name, value in values.items()}

    @api.route("/management/settings/dicom/query", "POST", access=ADMIN, audit="settings")
    def set_query_retrieve_settings():
        """Change DICOM limits and timeouts: any of the parameters, for associations from now on.

        acceptTimeout: seconds to wait for association negotiation
        connectionTimeout: seconds to wait for a TCP connection we open (C-MOVE, sending)
        idleTimeout: seconds an association may stay silent
        responseTimeout: seconds to wait for a DIMSE response
        maxAssociations: simultaneous associations
        maxPduReceive: largest PDU we receive, in bytes (0 = unlimited)
        maxPduSend: largest PDU we send, in bytes (0 = as large as the peer accepts)
        """
        values = {}
        for name, attribute in QUERY_RETRIEVE_SETTINGS.items():
            if (value := _bounded_int_param(name, 0, 2**32 - 1)) is not None:
                values[attribute] = float(value) if attribute.endswith("timeout") else value
        _change_settings(daemon, **values)  # the DICOM listener reads them afresh for each association
        return ""

    @api.route("/management/settings/dicom", access=ADMIN)
    def ae_title():
        """This archive's AE title."""
        return {"aetitle": config.aet}

    @api.route("/management/settings/dicom", "PUT", access=ADMIN, audit="settings")
    def set_ae_title():
        """Change this archive's AE title, from the next association on.

        aetitle: 1 to 16 printable ASCII characters, no backslash
        """
        aet = bottle.request.params.get("aetitle", "").strip()
        _change_settings(daemon, aet=aet)
        daemon.dicom.set_ae_title(aet)
        return {"success": True}

    @api.route("/management/settings/dicom/tags", access=ADMIN)
    def dicom_tags():
        """DICOM tags by kind, and the modalities in the index.

        type: all (default), dim (those in the index's columns), private (none are named) or other
        """
        kind = bottle.request.params.get("type", "all")
        if kind not in ("all", "dim", "private", "other"):
            _fail(400, "Invalid tag value type")
        dim = {tag_for_keyword(keyword) for level in LEVELS for keyword in LEVEL_ATTRIBUTES[level]}
        if kind == "dim":
            tags = sorted(dim)
        elif kind == "private":
            tags = []  # private tags are indexed by number; none has a name here
        else:
            tags = [tag for tag, entry in sorted(DicomDictionary.items()) if entry[4] and (kind == "all" or tag not in dim)]
        modalities = daemon.index.modalities()
        return {"tags": [{"id": f"{tag:08X}", "alias": keyword_for_tag(tag), "vr": dictionary_VR(tag)} for tag in tags],
                "modalities": modalities}


#: The largest worklist entry POST /worklist takes, in bytes of DICOM JSON.
WORKLIST_ENTRY_LIMIT = 256 * 1024


def _worklist_routes(api: Api):
    """/worklist: the Modality Worklist's entries, which modalities query by C-FIND."""
    worklist = api.daemon.worklist

    @api.route("/worklist", access=READ, audit="view")
    def worklist_entries():
        """The worklist: every entry with its state (SCHEDULED, IN PROGRESS, COMPLETED,
        DISCONTINUED, as its modality reports by MPPS) and its DICOM JSON. A caller limited to
        collections (or a share link) gets 403: scheduled patients are in no collection."""
        if api.visibility().restricted:
            _fail(403, "the worklist is for callers who see the whole archive, not those limited to collections")
        return _json_response([entry.as_json() for entry in worklist.entries()])

    @api.route("/worklist", "POST", access=ADMIN, audit="settings")
    def add_worklist_entry():
        """Schedule a procedure step: the body is its DICOM JSON (PatientID, PatientName and a
        ScheduledProcedureStepSequence item with ScheduledStationAETitle, Modality and
        ScheduledProcedureStepStartDate...); answers {"id"}. StudyInstanceUID, AccessionNumber,
        RequestedProcedureID and the step's ID, start date and time are filled when missing."""
        if (bottle.request.content_length or 0) > WORKLIST_ENTRY_LIMIT:
            _fail(413, f"a worklist entry is at most {WORKLIST_ENTRY_LIMIT} bytes of DICOM JSON")
        try:
            document = json.loads(bottle.request.body.read(WORKLIST_ENTRY_LIMIT + 1) or b"null")
        except ValueError:
            _fail(400, "the body is not JSON: send the entry as DICOM JSON")
        try:
            entry_id = worklist.add(document)
        except WorklistError as error:
            _fail(400, f"invalid worklist entry: {error}")
        return _json_response({"id": entry_id}, 201)

    @api.route("/worklist/<entry_id>", "DELETE", access=ADMIN, audit="settings")
    def delete_worklist_entry(entry_id):
        """Remove a worklist entry (its performed procedure steps are kept)."""
        if not entry_id.isdigit() or not worklist.delete(int(entry_id)):
            _fail(404, f"no worklist entry {entry_id[:20]!r}")
        return {"deleted": True}


def _destination_routes(api: Api):
    """/management/settings/storage/dicom and /management/dicom/echo: C-MOVE destinations."""
    daemon, config = api.daemon, api.daemon.config

    @api.route("/management/settings/storage/dicom", access=ADMIN)
    def move_destinations():
        """The C-MOVE destinations ([modalities])."""
        destinations = []
        for aet, (host, port) in config.modalities.items():
            public, description = config.modality_details.get(aet, (False, ""))
            destinations.append({"AETitle": aet, "ipAddrs": host, "port": port, "description": description,
                                 "isPublic": public, "public": public, "tls": aet in config.tls_modalities})
        return _json_response(destinations)

    @api.route("/management/settings/storage/dicom", "POST", access=ADMIN, audit="settings")
    def change_move_destinations():
        """Add or remove a C-MOVE destination, usable at once.

        type: add or remove
        aetitle: the destination's AE title
        ip: its host name or address
        port: its DICOM port, 1..65535 (needed to add)
        description: free text
        public: true or false, Dicoogle's flag
        tls: true or false, associate with it over DICOM TLS (kept as it was when not given)

        What the AE may ask for as a calling AE (allow= in [modalities]) is kept as it was.
        """
        params = bottle.request.params
        daemon.follow_settings()  # what another node added is kept
        kind, aet = params.get("type", ""), params.get("aetitle", "").strip()
        if kind not in ("add", "remove"):
            _fail(400, 'Illegal type parameter: must be either "add" or "remove"')
        port = _bounded_int_param("port", 1, 65535, "Illegal port parameter: must be a valid TCP port")
        if kind == "remove":
            removed = aet in config.modalities
            _change_settings(daemon, modalities={a: address for a, address in config.modalities.items() if a != aet},
                   modality_details={a: details for a, details in config.modality_details.items() if a != aet},
                   modality_services={a: services for a, services in config.modality_services.items() if a != aet},
                   tls_modalities=config.tls_modalities - {aet})
            return {"removed": removed}
        host = params.get("ip", "").strip()
        if not is_valid_ae_title(aet):
            _fail(400, f"invalid AE title {aet[:40]!r}: 1 to 16 printable ASCII characters, no backslash")
        if not HOST_PATTERN.match(host):
            _fail(400, f"invalid ip {host[:80]!r}: a host name or an IPv4 or IPv6 address")
        if port is None:
            _fail(400, "Illegal port parameter: must be a valid TCP port")
        public, description = bool(_bool_param("public")), " ".join(params.get("description", "").split())
        details = {a: d for a, d in config.modality_details.items() if a != aet}
        if public or description:
            details[aet] = (public, description)
        tls = _bool_param("tls")
        tls_modalities = config.tls_modalities if tls is None else (config.tls_modalities | {aet} if tls
                                                                    else config.tls_modalities - {aet})
        _change_settings(daemon, modalities={**config.modalities, aet: (host, port)}, modality_details=details,
                         tls_modalities=tls_modalities)
        return {"added": True}

    @api.route("/management/dicom/echo", "POST", access=ADMIN)
    def echo_destination():
        """C-ECHO a C-MOVE destination, to test it: {success, error?}.

        aetitle: the destination's AE title, as listed under [modalities]
        """
        aet = bottle.request.params.get("aetitle", "").strip()
        if aet not in config.modalities:
            _fail(400, f"unknown move destination {aet[:40]!r}: add it first")
        host, port = config.modalities[aet]
        # Short timeouts: a dead destination must not hold the request for long.
        try:
            status = daemon.dicom.echo(aet, ECHO_TIMEOUT)
        except AssociationRefused as error:
            reason = ("rejected the association (is its AE title right?)" if error.rejected
                      else f"did not answer at {host}:{port}")
            logging.getLogger("dicoogled.dicom").info("C-ECHO to %s failed: %s (%s)", aet, reason, error)
            return {"success": False, "error": f"{aet} {reason}"}
        except (AssociationEnded, ValueError) as error:
            return {"success": False, "error": f"{aet} sent no C-ECHO response: {error}"}
        if status != SUCCESS:
            return {"success": False, "error": f"{aet} answered C-ECHO with status 0x{status:04X}"}
        return {"success": True}


def _listener_routes(api: Api):
    """/management/dicom/storage and /query: the DICOM listener, which both services share."""
    daemon, config = api.daemon, api.daemon.config

    def service_status():
        return {"isRunning": daemon.dicom.running, "port": daemon.dicom.port or config.dicom_port,
                "autostart": config.dicom_autostart, "hostname": config.dicom_host}

    def change_service():
        params = bottle.request.params
        port = _bounded_int_param("port", 1, 65535, "Bad service port: must be a valid port number")
        hostname = (params["hostname"].strip() or "0.0.0.0") if "hostname" in params else None
        if hostname is not None:
            try:
                socket.getaddrinfo(hostname, None)
            except (OSError, UnicodeError):
                _fail(400, f"cannot resolve hostname {hostname[:80]!r}")
        autostart, running = _bool_param("autostart"), _bool_param("running")
        given = {"port": port, "hostname": hostname, "autostart": autostart}
        outcome = {name: value for name, value in given.items() if value is not None}  # echoed, as Dicoogle does
        attributes = {"port": "dicom_port", "hostname": "dicom_host", "autostart": "dicom_autostart"}
        values = {attributes[name]: value for name, value in outcome.items()}
        _check_settings(config, **values)  # before the listener moves
        try:
            if {"dicom_port", "dicom_host"} & set(values) and running is not False:
                daemon.dicom.move(values.get("dicom_host", config.dicom_host), values.get("dicom_port", config.dicom_port))
            _change_settings(daemon, **values)
            if running is not None:
                outcome["running"] = running
                if running and not daemon.dicom.start():
                    outcome["warning"] = "Service was already running"
                    bottle.response.set_header("Warning", '199 - "Service was already running"')
                elif not running:
                    daemon.dicom.stop()
        except OSError as error:
            return _json_response({"success": False, "error": str(error)}, 500)
        return {"success": True, **outcome}

    # Storage and query/retrieve share one listener: Dicoogle's two service paths both control it.
    @api.route("/management/dicom/storage", access=ADMIN)
    @api.route("/management/dicom/query", access=ADMIN)
    def listener_status():
        """The DICOM listener, which serves storage and query/retrieve alike: running, port, ..."""
        return service_status()

    @api.route("/management/dicom/storage", "POST", access=ADMIN, audit="settings")
    @api.route("/management/dicom/query", "POST", access=ADMIN, audit="settings")
    def change_listener():
        """Start or stop the DICOM listener, or change its port, hostname or autostart.

        running: true opens the listener, false closes it (associations under way end first)
        port: the DICOM port, 1..65535; an open listener moves to it at once
        hostname: the address to listen on; empty for every interface
        autostart: true to open the listener when dicoogled starts
        """
        return change_service()


def _log_and_api_routes(api: Api):
    """/logger, and /openapi.json: this API."""
    daemon = api.daemon

    @api.route("/logger", access=ADMIN)
    def logger():
        """The end of the server log: its last 2000 lines, as text/plain."""
        bottle.response.content_type = "text/plain; charset=utf-8"
        return daemon.log_tail.text()

    @api.route("/openapi.json", access=PUBLIC)
    def openapi():
        """This API in OpenAPI 3: every route, who may call it (x-access) and its parameters."""
        return _openapi_document(api)


def _audit_time(name: str) -> float | None:
    """A since/until parameter of /audit as seconds since the epoch: an ISO 8601 date or date
    and time (UTC unless it names its offset); None when absent."""
    raw = bottle.request.params.get(name, "").strip()
    if not raw:
        return None
    if "T" in raw:  # an offset's + arrives as a space when a client did not encode it
        raw = raw.replace("Z", "+00:00").replace(" ", "+", 1)
    try:
        moment = datetime.datetime.fromisoformat(raw)
    except ValueError:
        _fail(400, f"{name} must be an ISO 8601 date or date and time (2026-12-06 or 2026-12-06T08:30:00Z), not {raw[:40]!r}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def _audit_routes(api: Api):
    """The audit log, for administrators: a page as JSON, or every entry as CSV."""
    audit = api.daemon.audit

    def filters() -> dict:
        action = bottle.request.params.get("action", "")
        unknown = [name for name in action.split(",") if name.strip() and name.strip() not in AUDIT_ACTIONS]
        if unknown:
            _fail(400, f"unknown action {unknown[0][:40]!r}: one of {', '.join(AUDIT_ACTIONS)}")
        audited(detail=" ".join(f"{name}={bottle.request.params.get(name)[:64]}" for name in ("user", "action", "since", "until")
                                if bottle.request.params.get(name)))
        audit.flush(timeout=5)  # what was done before this request is in the answer
        return {"user": bottle.request.params.get("user", ""), "action": action,
                "since": _audit_time("since"), "until": _audit_time("until")}

    @api.route("/audit", access=ADMIN, audit="audit")
    def audit_entries():
        """Audit log entries, newest first: {results: [{id, time, action, result, status, user,
        calling_aet, share_link, address, request, studies, series, instances, count, detail}],
        numResults, actions}.

        user: only this user's entries (a failed login is its tried name's)
        action: only these actions, separated by commas (search, view, download, export, qido, wado, stow, c-find, c-move, c-get, c-store, watch, import, delete, label, unlabel, protect, login, logout, user, settings, plugin, task, share, access, reidentify, audit)
        since: only entries at or after this ISO 8601 date or time (UTC unless it says otherwise)
        until: only entries before this ISO 8601 date or time
        offset: entries to skip (0)
        psize: entries per page (100, at most 10000)
        """
        chosen = filters()
        entries, total = audit.entries(**chosen, offset=_int_param("offset", 0),
                                       limit=min(_int_param("psize", 100, minimum=1), 10_000))
        return {"results": [entry.as_json() for entry in entries], "numResults": total, "actions": AUDIT_ACTIONS}

    @api.route("/audit.csv", access=ADMIN, audit="audit")
    def audit_csv():
        """Every audit log entry matching the filters, newest first, as CSV (streamed).

        user: only this user's entries
        action: only these actions, separated by commas
        since: only entries at or after this ISO 8601 date or time
        until: only entries before this ISO 8601 date or time
        """
        chosen = filters()

        def cell(value) -> str:
            # A value a spreadsheet would run as a formula (a tried username) is made inert.
            return _spreadsheet_safe(" ".join(value) if isinstance(value, tuple) else "" if value is None else str(value))

        def lines():
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\r\n")
            writer.writerow(AUDIT_CSV_COLUMNS)
            for entry in audit.each_entry(**chosen):
                row = entry.as_json()
                writer.writerow([cell(getattr(entry, name) if name in ("studies", "series", "instances") else row[name])
                                 for name in AUDIT_CSV_COLUMNS])
                if out.tell() > 64 * 1024:
                    yield out.getvalue()
                    out.seek(0)
                    out.truncate()
            yield out.getvalue()

        bottle.response.content_type = "text/csv; charset=utf-8"
        bottle.response.set_header("Content-Disposition", 'attachment; filename="audit.csv"')
        return lines()
def _csv_text(rows) -> str:
    """Rows as CSV text, text cells that would start a spreadsheet formula made inert."""
    output = io.StringIO()
    writer = csv.writer(output, lineterminator="\r\n")
    for row in rows:
        writer.writerow([_spreadsheet_safe(cell) if isinstance(cell, str) else cell for cell in row])
    return output.getvalue()


def _research_routes(api: Api):
    """De-identified research copies of a collection, and the pseudonym map behind them."""
    daemon = api.daemon

    @api.route("/research/export", "POST", access=ADMIN, audit="export")
    def research_export_route():
        """De-identify the studies of a label into new studies with another label, as a background task: {taskUid, label, into}.

        label: the collection to de-identify (a label in use)
        into: the label the de-identified copies get (researchers search label:into)
        retain_dates: remove (the default), full (dates kept) or offset (moved by a per-patient number of days)
        retain_device_identity: true to keep station names, serial numbers and the like
        retain_patient_characteristics: true to keep age, sex, size, weight and the like
        clean_descriptors: true to keep study and series descriptions, cleaned of names, IDs and dates"""
        params = dict(bottle.request.params)
        if bottle.request.content_type.split(";")[0].strip() == "application/json":
            try:
                body = json.loads(bottle.request.body.read(ANONYMOUS_BODY_LIMIT) or b"{}")
            except ValueError:
                _fail(400, "the body is not JSON")
            if not isinstance(body, dict):
                _fail(400, "the body must be a JSON object")
            params.update(body)
        if not params.get("label") or not params.get("into"):
            _fail(400, "label and into are required")
        try:
            options = DeidentificationOptions.from_params(params)
            audited(detail=f"research export of label {str(params['label'])[:64]} into {str(params['into'])[:64]}")
            uid = daemon.start_research_export(str(params["label"]), str(params["into"]), options)
            audited(studies=daemon.index.labelled("STUDY", label_name(str(params["label"]))))
        except ValueError as error:
            _fail(400, str(error))
        except LookupError as error:
            _fail(404, str(error))
        bottle.response.status = 202
        return {"taskUid": uid, "label": label_name(str(params["label"])), "into": label_name(str(params["into"]))}

    @api.route("/research/pseudonyms", access=ADMIN, audit="reidentify")
    def pseudonyms():
        """The pseudonym map: who each de-identified patient is: {pseudonyms: [...]}, or CSV.

        format: json (the default) or csv"""
        rows = daemon.pseudonyms.patients()
        audited(count=len(rows), detail="the pseudonym map")
        if bottle.request.params.get("format", "json") == "csv":
            bottle.response.content_type = "text/csv; charset=utf-8"
            bottle.response.set_header("Content-Disposition", 'attachment; filename="pseudonyms.csv"')
            return _csv_text([("pseudonym", "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate",
                               "dateOffsetDays", "created"), *rows])
        return {"pseudonyms": [{"pseudonym": row.pseudonym, "PatientID": row.patient_id,
                                "IssuerOfPatientID": row.issuer_of_patient_id, "PatientName": row.patient_name,
                                "PatientBirthDate": row.patient_birth_date, "dateOffsetDays": row.date_offset_days,
                                "created": row.created} for row in rows]}

    @api.route("/research/uids", access=ADMIN, audit="reidentify")
    def pseudonym_uids():
        """UIDs replaced by de-identification, oldest first: {uids: [{original, replacement, created}]}.

        uid: only the original of this replacement UID (to re-identify a de-identified object)
        original: only the replacement of this original UID (to find an object's de-identified copy)
        offset: how many to skip (default 0)
        psize: how many at most (default 1000)"""
        uid, original = bottle.request.params.get("uid", ""), bottle.request.params.get("original", "")
        for given in (uid, original):
            if given and not is_valid_uid(given):
                _fail(400, f"{given[:80]!r} is not a UID")
        rows = daemon.pseudonyms.uids(uid, _int_param("psize", 1000, 1), _int_param("offset", 0), original=original)
        audited(count=len(rows), detail=f"the original of {uid}" if uid else f"the copy of {original}" if original else "replaced UIDs")
        return {"uids": [row._asdict() for row in rows]}


_PARAMETER_LINE = re.compile(r"^\s*([A-Za-z][\w-]*): (.+)$")


def _openapi_document(api: Api) -> dict:
    """An OpenAPI 3 document of api.routes; parameters are the "name: description" lines of
    the handlers' docstrings, and the <names> in their paths."""
    paths = {}
    for method, path, access, summary in api.routes:
        template = re.sub(r"<(\w+)(?::[^>]*)?>", r"{\1}", path)
        lines = api.docstrings.get((method, path), "").splitlines()[1:]
        described = {match[1]: match[2].strip() for line in lines if (match := _PARAMETER_LINE.match(line))}
        parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"},
                       "description": described.pop(name, "")} for name in re.findall(r"{(\w+)}", template)]
        parameters += [{"name": name, "in": "query", "schema": {"type": "string"}, "description": description}
                       for name, description in described.items()]
        responses = {"200": {"description": "success"}, "400": {"description": 'bad parameters: {"error": "..."}'}}
        if access != PUBLIC:
            responses["401"] = {"description": "not logged in"}
        if access == ADMIN:
            responses["403"] = {"description": "not an administrator"}
        operation = {"summary": summary, "x-access": access, "parameters": parameters, "responses": responses,
                     "security": [] if access == PUBLIC else [{"token": []}, {"basic": []}, {"cookie": []}]}
        paths.setdefault(template, {})[method.lower()] = operation
    return {
        "openapi": "3.0.3",
        "info": {"title": "dicoogled", "version": __version__,
                 "description": "Dicoogle 3.5's REST API and dicoogled's own routes. Parameters may come in the "
                                "query string or a form body; repeat a name for a list. x-access says who may call "
                                "a route: public, read (anyone if allow_unauthorized), user or admin."},
        "components": {"securitySchemes": {
            "token": {"type": "apiKey", "in": "header", "name": "Authorization",
                      "description": "the token from POST /login, raw or after 'Bearer '"},
            "basic": {"type": "http", "scheme": "basic"},
            "cookie": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE},
        }},
        "paths": paths,
        # Behind a reverse proxy, the address clients use ([http] public_url).
        **({"servers": [{"url": api.daemon.config.public_url}]} if api.daemon.config.public_url else {}),
    }


# ============================================================================================
# Daemon life cycle
# ============================================================================================


#: What the daemon creates, it creates for its owner alone (password hashes, tokens, patient
#: data): the umask of the dicoogled command, so every later file (SQLite's included) is 0600.
PRIVATE_UMASK = 0o077


def _make_private_data_dir(data_dir: pathlib.Path, background=False):
    """Create data_dir for its owner alone, and take every access by other users from what it
    already holds (an older version, a copy or a chmod -R may have opened it); logs what changed.
    The folder itself goes first, which closes everything below it at once; the walk through
    the rest (a second or so per 100,000 files) may then run in the background."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tightened, failed = [], []

    def tighten(path: str, mode: int):
        if stat.S_ISLNK(mode) or not mode & 0o077:
            return
        try:
            os.chmod(path, stat.S_IMODE(mode) & ~0o077)
            tightened.append(f"{path} ({stat.filemode(mode)})")
        except OSError as error:  # not ours: say so, and go on
            failed.append(f"{path}: {error.strerror}")

    def tighten_in(folder: str) -> list[str]:
        """Tighten the entries of folder; return its subfolders."""
        try:
            entries = list(os.scandir(folder))
        except OSError as error:
            failed.append(f"{folder}: {error.strerror}")
            return []
        subfolders = []
        for entry in entries:
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError:  # gone meanwhile
                continue
            tighten(entry.path, mode)
            if stat.S_ISDIR(mode):
                subfolders.append(entry.path)
        return subfolders

    def walk(folders: list[str]):
        while folders:
            folders.extend(tighten_in(folders.pop()))
        if tightened:
            log.warning("tightened the permissions of %d entries in %s, open to other users before: %s%s",
                        len(tightened), data_dir, ", ".join(tightened[:5]), ", ..." if len(tightened) > 5 else "")
        if failed:
            log.error("cannot make %d entries in %s private to their owner: %s%s", len(failed), data_dir,
                      "; ".join(failed[:5]), "; ..." if len(failed) > 5 else "")

    tighten(str(data_dir), data_dir.stat().st_mode)  # the folder named, even through a symlink
    # Its own files (the databases, settings) at once, before anything opens them: SQLite gives
    # a new -wal or -shm file the mode of its database.
    subfolders = tighten_in(str(data_dir))
    if background:
        start_thread("private-data-dir", walk, subfolders)
    else:
        walk(subfolders)


#: The file a serving daemon holds locked in its node folder (the data dir, on one machine).
SERVE_LOCK_FILE = "serve.lock"


def _lock_node_dir(config: Config, command: str = "serve"):
    """The lock that makes a daemon the only one serving its node folder (Config.node_dir: the
    data dir itself with the SQLite index), held as long as the file returned stays open. Two
    there would sweep each other's temp files and write one SQLite index from two processes.
    An flock belongs to the open file, so the OS releases it when the process ends, however it
    ends (kill -9 too): no stale lock to remove by hand. Raises RuntimeError naming the holder.
    An offline command that must have the archive to itself (migrate) takes it too."""
    config.node_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle = open(config.node_dir / SERVE_LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        if command != "serve":
            raise RuntimeError(f"{config.node_dir} is in use by a dicoogled serve (PID {holder}):"
                               f" {command} works on a stopped archive, stop that one first") from None
        other_name = ", or this node another [node] name" if config.index_url else ""
        raise RuntimeError(f"{config.node_dir} is in use by another dicoogled serve (PID {holder}): stop that one"
                           f" first, or give this one another --data-dir{other_name}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")  # for the message above, and for people
    handle.flush()
    return handle


def _release_free_memory():
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    What starting freed (some 8 MB) would otherwise stay in the heap, counted in the daemon's RSS."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


class Daemon:
    """Everything one dicoogled process runs, built from a Config."""

    def __init__(self, config: Config):
        self.config = config
        self.log = logging.getLogger("dicoogled")
        #: The end of the log, for GET /logger.
        self.log_tail = LogTail()
        logging.getLogger().addHandler(self.log_tail)
        self._watch_lock = threading.Lock()
        #: Held by whoever rewrites data_dir/settings.ini (save_settings), so no change is lost.
        self.settings_lock = threading.Lock()
        data_dir = config.data_dir
        _make_private_data_dir(data_dir, background=True)
        # Before anything is swept or opened: a second serve on this folder stops here.
        self._serve_lock = _lock_node_dir(config)
        self.storage = Storage(data_dir, fsync=config.fsync, scheme=config.storage_scheme, node_dir=config.node_dir)
        # Temporary files (spooled uploads, pynetdicom's) stay on the data disk: /tmp may be RAM.
        tempfile.tempdir = str(self.storage.tmp)
        for stale in self.storage.tmp.glob("import-*.zip"):  # uploads whose import a stop or a crash cut short
            stale.unlink(missing_ok=True)
        self.index = open_index(config)
        #: Which once-only work this node does now (all of it, on one machine).
        self.leases = Leases(config.index_url, config.node)
        self.leases.serve()  # a reindex or migrate of the PostgreSQL index under way: stop here
        #: Free space on the data disk and the reserve kept there ([storage] min_free_mb).
        self.disk = DiskSpace(data_dir, config.min_free_mb)
        self.ingest = Ingest(self.index, self.storage, config.duplicates, self.disk,
                             config.max_instances, config.max_size_mb, config.when_full, config.protected_labels)
        self.finder = Finder(self.index)
        #: Where pixels are decoded: worker processes, started on first use.
        self.codecs = CodecWorkers(config.codec_workers, config.codec_idle_seconds, config.codec_timeout, config.log_level)
        self.worklist = Worklist(self.index)
        self.dicom = DicomServices(config, self.ingest, self.finder, self.worklist, self.codecs)
        #: Accounts and sessions: data_dir/users.sqlite, or the PostgreSQL index's database (every node's).
        self.users = Users(config.index_url or data_dir / "users.sqlite", config.session_idle_minutes)
        #: Who read, sent, stored or changed what: data_dir/audit.sqlite, or the PostgreSQL index's database.
        self.audit = AuditLog(config.index_url or data_dir / "audit.sqlite", config.audit_enabled,
                              config.audit_retention_days)
        self.dicom.audit = self.ingest.audit = self.audit
        #: Who the pseudonyms of de-identified copies stand for, apart from the index.
        self.pseudonyms = PseudonymMap(config.index_url or data_dir / "pseudonyms.sqlite")
        #: The one de-identifier: research exports, and whatever else hands out de-identified copies.
        self.deidentifier = Deidentifier(self.pseudonyms)
        self._cache_root = config.node_dir / "cache"  # each node's own
        self.thumbnails = ThumbnailCache(self._cache_root / "thumbnails")
        self.users.ensure_admin(data_dir, os.environ.get("DICOOGLED_ADMIN_PASSWORD"))
        #: Background tasks, listed in data_dir/tasks.sqlite or the PostgreSQL index's database (every node's).
        self.tasks = TaskManager(self.ingest, config.index_url or data_dir / "tasks.sqlite", self.leases, config.node)
        #: Query providers by name: callables(query text) -> [(uri, metadata)]; plugins add theirs.
        self.providers = {BUILTIN_PROVIDER: self._search_builtin}
        #: Callables(api) adding HTTP routes (management, plugins' web services).
        self.route_hooks = []
        self.plugins = PluginManager(self, config.plugin_folders, config.plugin_settings)
        self.ingest.store_filter = self.plugins.store_filter
        self.ingest.enrich = self.plugins.enrich
        self.ingest.listeners.append(self.plugins.instance_indexed)
        #: Stable studies and webhook deliveries.
        self.events = StudyEvents(self)
        self.ingest.deliveries_for = self.events.instance_deliveries
        self.ingest.deliveries_queued = self.events.queued
        self.ingest.listeners.append(self._audit_watched_file)
        self.dicom.find_filter = self.plugins.find_filter
        self.dicom.visibility_of_ae = self.visibility_of_ae
        self.watcher = None
        self.http_server = None
        self._http_thread = None
        self._http_sockets = {}  # waitress's socket map: the listener, the connections, the trigger pipe
        self.http_port = None
        self.reconciling = 0
        self.stopped = threading.Event()

    def start(self):
        from waitress.server import create_server

        self.plugins.load_all()
        self.plugins.watch()
        self.events.start()
        self.tasks.start()
        if self.config.dicom_autostart:
            self.dicom.start()
        self.watch()
        # Files stored before a crash but never indexed (never acknowledged either) get indexed.
        self.reconciling += 1  # counted now, so /health says so before the thread runs
        start_thread("reconcile-storage", self._reconcile_storage_whenever_owned)
        start_thread("disk-space", self._watch_disk_space)
        if self.config.retention_rules:
            start_thread("retention", self._apply_retention_regularly)
        start_thread("audit-retention", self._prune_audit_regularly)
        if is_postgresql_url(self.config.settings_location):
            start_thread("shared-settings", self._follow_shared_settings)
        bottle.BaseRequest.MEMFILE_MAX = 16 * 1024 * 1024
        app = make_app(self)
        try:
            self.http_server = create_server(
                app, map=self._http_sockets, host=self.config.http_host, port=self.config.http_port,
                threads=self.config.http_threads, ident="dicoogled", clear_untrusted_proxy_headers=True,
                # waitress puts the client the trusted proxy names in REMOTE_ADDR: the last
                # address of X-Forwarded-For, the one the proxy added (a client's own are ignored).
                **({"trusted_proxy": self.config.trusted_proxy, "trusted_proxy_count": 1,
                    "trusted_proxy_headers": {"x-forwarded-for"}} if self.config.trusted_proxy else {}),
            )
        except OSError as error:
            raise OSError(error.errno, f"cannot listen for HTTP on {self.config.http_host}:{self.config.http_port}: {error.strerror}") from None
        _check_credentials_before_bodies(self._http_sockets, app.config["dicoogled.api"])
        self.http_port = int(self.http_server.effective_port)
        self._http_thread = start_thread("http", self.http_server.run)
        self.log.info("HTTP listening on %s:%d", self.config.http_host, self.http_port)

    def watch(self):
        """(Re)start watching the configured folders; only stop if watching is off."""
        with self._watch_lock:
            if self.watcher:
                self.watcher.stop()
                self.watcher = None
            if self.config.watch_enabled and not self.stopped.is_set():
                self.watcher = FolderWatcher(
                    self.ingest, self.config.watch_folders, poll=self.config.watch_poll,
                    poll_interval=self.config.watch_poll_interval, quiet_period=self.config.watch_quiet_period,
                    leases=self.leases,
                )
                self.watcher.start()

    def plugin_cache(self, plugin_name: str) -> InstanceCache:
        """The cache of what a plugin makes from instances (dicoogle.cached)."""
        return InstanceCache(self._cache_root / f"plugin-{plugin_name}", ".cache")

    def change_settings(self, **values):
        """Change settings at run time (Config attributes): checked by Config.validate (ValueError
        says why one cannot work), saved in data_dir/settings.ini, then set on the live config, so
        a change that cannot be saved (OSError, a full disk) is not made at all. What reads a
        setting for each association or request sees the change from the next one."""
        changed = self.config.changed(**values)
        saved = [name for name in values if name in LIVE_SETTINGS or name in WHOLE_SECTIONS]
        with self.settings_lock:
            if saved:
                changed.save_settings(*saved)
            for name, value in values.items():
                setattr(self.config, name, value)

    def _follow_shared_settings(self):
        """Take the settings other nodes change, while the daemon runs (settings shared in the
        PostgreSQL index's database).

        Polled: every SETTINGS_FOLLOW_SECONDS one read of a counter the savers bump, and the
        settings read again only when it moved. Settings change a few times a year and are read
        on every association and many requests, so reading them there would cost a round trip
        each time for nothing; a poll costs one tiny query per node every few seconds and holds
        no connection open to a server that may restart, as LISTEN/NOTIFY would. A change takes
        effect on the other nodes within SETTINGS_FOLLOW_SECONDS, much as one made here takes
        effect from the next association or request."""
        shared, seen, failing = None, None, False  # seen None: read once at start, changes before it included
        while not self.stopped.wait(0 if seen is None else SETTINGS_FOLLOW_SECONDS):
            try:
                shared = shared or SharedSettings(self.config.settings_location)
                count = shared.changes()
                if count != seen:
                    self.take_settings(self.config.reread())
                    seen = count
                failing = False
            except Exception as error:  # the database away, or settings no longer valid: said once, tried again
                if not failing:
                    self.log.warning("cannot read the shared settings (will try again): %s", error)
                failing = True
        if shared is not None:
            shared.close()

    def take_settings(self, fresh: Config) -> list[str]:
        """Take the settings another node changed, from a config read afresh, as a change made
        here is taken: the AE title, the DICOM listener's address, the watched folders and the
        plugins' settings follow. The names of the settings that changed."""
        with self.settings_lock:  # a change made here is saved and set under it: seen whole or not at all
            changed = {name: getattr(fresh, name) for name in sorted(FOLLOWED_SETTINGS)
                       if getattr(fresh, name) != getattr(self.config, name)}
            for name, value in changed.items():
                setattr(self.config, name, value)
        if "aet" in changed:
            self.dicom.set_ae_title(fresh.aet)
        if {"dicom_host", "dicom_port"} & set(changed):
            try:
                self.dicom.move(fresh.dicom_host, fresh.dicom_port)
            except OSError as error:
                self.log.error("DICOM listener not moved as another node said: %s", error)
        if {"watch_folders", "watch_enabled"} & set(changed):
            self.watch()
        for name, texts in fresh.plugin_settings.items():
            if texts != self.plugins.configured.get(name):
                self.plugins.take_settings(name, texts)
                changed[f"plugin.{name}"] = texts
        if changed:
            self.log.info("settings changed on another node taken: %s", ", ".join(changed))
        return list(changed)

    def follow_settings(self):
        """Take now what other nodes changed, before a change made here is saved over a whole
        section (WHOLE_SECTIONS), so that what another node added in the last seconds is kept."""
        if is_postgresql_url(self.config.settings_location):
            self.take_settings(self.config.reread())

    def search(self, text: str, limit: int | None = None, offset: int = 0, visibility: Visibility = EVERYTHING):
        """A query in the search language, with the fields plugins add: (SearchHit rows, total)
        of the instances the visibility shows. Raises SearchSyntaxError."""
        return self.index.search(SearchQuery(text, self.plugins.extra_fields), limit, offset, visibility)

    # ---- collections: who sees what ---------------------------------------------------------

    def visibility_of(self, user: User | None) -> Visibility:
        """What a user (None: an anonymous reader, with allow_unauthorized) may see. The rule:
        an administrator sees everything; a user with access to a collection, itself or through
        a group, sees only its collections' studies; one with none sees everything, or nothing
        when [http] restrict_to_collections is true."""
        if user is not None and user.admin:
            return EVERYTHING
        collections = self.users.collections_of(user) if user is not None else {}
        if collections:
            return Visibility.of(collections)
        return NOTHING if self.config.restrict_to_collections else EVERYTHING

    def visibility_of_ae(self, calling_aet: str) -> Visibility:
        """What a calling AE's C-FIND, C-MOVE and C-GET see: everything when [dicom]
        calling_ae_access does not name it (as before collections), else what its user sees, or
        the collections of its group (nothing for a user that does not exist)."""
        principal = self.config.calling_ae_access.get(calling_aet)
        if principal is None:
            return EVERYTHING
        kind, name = principal
        if kind == "group":
            return Visibility.of(self.users.collections_of(groups=(name,)))
        user = self.users.get(name)
        return self.visibility_of(user) if user is not None else NOTHING

    def label(self, level: str, uid: str, label: str) -> bool:
        """Put a label on a study or series (level STUDY or SERIES); False if it had it already.
        Raises ValueError for a label or UID that is not valid."""
        label = label_name(label)
        if not is_valid_uid(uid):
            raise ValueError(f"{uid[:80]!r} is not a UID")
        added = self.index.write(Index.add_label, level, uid, label)
        if added:
            self.log.info("label %s put on %s %s", label, level.lower(), uid)
        return added

    def instances_to_download(self, study_uids=(), series_uids=(), label: str = "",
                              visibility: Visibility = EVERYTHING) -> list[ArchiveMember]:
        """The instances a download (ZIP, DICOM media) of these studies and series, and of every
        study and series carrying label, holds, of what visibility shows. Every download chooses
        its instances here, and only here: what a caller may see is decided in one place."""
        series_uids = [*series_uids, *(self.index.labelled("SERIES", label) if label else [])]
        return self.index.archive_members(study_uids, series_uids, visibility)

    def unlabel(self, level: str, uid: str, label: str) -> bool:
        """Take a label off a study or series; False if it did not have it."""
        removed = self.index.write(Index.remove_label, level, uid, label_name(label))
        if removed:
            self.log.info("label %s taken off %s %s", label_name(label), level.lower(), uid)
        return removed

    def start_research_export(self, label: str, into: str, options: DeidentificationOptions, study_uids=()) -> str:
        """De-identify the studies carrying label (or those named, for a de-identified share
        link) into new studies labelled into, as a background task (its uid); ValueError with a
        reason fit for the caller, LookupError if nothing carries label."""
        label, into = label_name(label) if label else "", label_name(into)
        if label == into:
            raise ValueError("into must be another label than the one exported")
        if options.retain_uids:
            raise ValueError("retain_uids cannot be used for an export into this archive: the copies would have the"
                             " originals' UIDs")
        if label and not self.index.labelled("STUDY", label):
            raise LookupError(f"no indexed study carries the label {label}")

        def export(progress, stop):
            report = research_export(self.index, self.storage, self.ingest, self.deidentifier, label, into, options,
                                     progress, stop, study_uids)
            return report.stored, report.failed

        source = label or f"{len(study_uids)} studies"
        uid = self.tasks.start_function(f"[research]export {source} into {into}", export, stoppable=True)
        self.log.info("research export of label %s into %s started: task %s", label, into, uid)
        return uid

    def _search_builtin(self, query: str):
        hits, _ = self.search(query)
        return [(_file_uri(hit.path), hit.meta) for hit in hits]

    #: The lease of reconciling the storage folder, shared by the nodes, with the index.
    STORAGE_LEASE = "reconcile storage"

    def _reconcile_storage_whenever_owned(self):
        """Reconcile the storage folder with the index at start if this node owns that work (on
        one machine it always does), then each time it takes the work over from a node that
        died, which may have left files stored but never indexed; start() counted the first
        run in self.reconciling. This node's caches lose what is no longer indexed."""
        owned = self.leases.owns(self.STORAGE_LEASE)
        if owned:
            self._reconcile_storage()
        else:
            self.reconciling -= 1  # another node reconciles
        self._purge_caches()
        while not self.stopped.wait(LEASE_POLL_SECONDS):
            owned, was_owned = self.leases.owns(self.STORAGE_LEASE), owned
            if owned and not was_owned:
                self.reconciling += 1
                self._reconcile_storage()

    def _reconcile_storage(self):
        """Index what the storage folder and the storage plugins hold and the index lacks; the
        caller counted this in self.reconciling."""
        try:
            reconcile(self.ingest, self.storage.root, "store", self.stopped)
            for scheme in set(self.storage.schemes) - {"file"}:
                try:
                    self.ingest.reconcile_scheme(scheme)
                except Exception:  # one storage plugin's failure must not stop the others
                    self.log.exception("cannot reconcile the index with storage %s", scheme)
        finally:
            self.reconciling -= 1

    def _purge_caches(self):
        """Delete what this node's caches hold for instances no longer indexed."""
        is_indexed = lambda uid: self.index.instance(uid) is not None  # noqa: E731
        self.thumbnails.purge(is_indexed)
        for folder in self._cache_root.glob("plugin-*"):
            InstanceCache(folder, ".cache").purge(is_indexed)

    #: Seconds between looks at the data disk's free space.
    DISK_CHECK_SECONDS = 2.0

    def _watch_disk_space(self):
        """Once space is freed after the disk was full, index what could not be indexed then:
        files left by a store or a reconciliation that failed, and files in watched folders."""
        while not self.stopped.wait(self.DISK_CHECK_SECONDS):
            if self.disk.recheck() and not self.stopped.is_set():
                if self.leases.owns(self.STORAGE_LEASE):
                    self.reconciling += 1
                    start_thread("reconcile-storage", self._reconcile_storage)
                with self._watch_lock:
                    if self.watcher:
                        self.watcher.reconcile_all()

    def _prune_audit_regularly(self):
        """Delete audit entries older than [audit] retention_days, at start and every hour (by
        one node: the owner of the lease)."""
        while self.leases.wait_to_own("audit retention", self.stopped):
            try:
                self.audit.prune()
            except apsw.Error as error:  # a busy or full disk: tried again next time
                self.log.error("cannot prune the audit log: %s", error)
            if self.stopped.wait(AUDIT_PRUNE_SECONDS):
                return

    def _audit_watched_file(self, record: "InstanceRecord", calling_aet: str):
        """An audit entry for each instance a watched folder brings in (C-STORE and STOW-RS
        have theirs where they are answered; an index task has one when it starts)."""
        if record.origin == "watch":
            self.audit.record("watch", studies=record.meta.get("StudyInstanceUID", ""),
                              series=record.meta.get("SeriesInstanceUID", ""),
                              instances=record.meta.get("SOPInstanceUID", ""), count=1)

    def _apply_retention_regularly(self):
        """Apply the [retention] rules at start, then every retention_interval_hours (by one
        node: the owner of the lease, or the node that takes it over)."""
        rules = list(self.config.retention_rules.values())
        while self.leases.wait_to_own("retention", self.stopped):
            self.ingest.apply_retention(rules)
            if self.stopped.wait(self.config.retention_interval_hours * 3600):
                return

    def stop(self):
        """Stop listening, finish the writes under way, close the index."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        self.log.info("stopping")
        if self.http_server:
            self._stop_http()
        self.dicom.stop()
        self.watch()  # stopped is set: this only stops the watcher
        self.tasks.close()
        self.events.close()
        self.leases.close()  # its work has stopped here: other nodes may take it
        self.plugins.close()
        self.codecs.close()
        self.index.close()
        self.users.close()
        self.pseudonyms.close()
        self.audit.close()  # last: every part that records entries has stopped
        self._serve_lock.close()  # another serve may start on this folder now
        self.log.info("stopped")
        logging.getLogger().removeHandler(self.log_tail)

    def _stop_http(self):
        """Let the requests under way finish, then close waitress's sockets from its own loop.

        Closed from this thread, they race with the loop's select() and with a worker waking the
        loop through its trigger pipe: EBADF, or a write to a descriptor number already reused."""
        from waitress import wasyncore

        server = self.http_server
        server.task_dispatcher.shutdown(timeout=HTTP_DRAIN_SECONDS)  # the loop still carries their answers
        # in the loop's thread; an empty map then ends the loop
        server.trigger.pull_trigger(lambda: wasyncore.close_all(self._http_sockets))
        self._http_thread.join(timeout=HTTP_DRAIN_SECONDS)

    def serve_forever(self):
        """Run until SIGTERM or SIGINT, then stop cleanly."""
        wake = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: wake.set())
        self.start()
        _release_free_memory()
        wake.wait()
        self.stop()


# ============================================================================================
# Sample data: a deterministic teaching set (dicoogled sample-data DIR)
# ============================================================================================

#: Every UID of the teaching set is this root (2.25 and a UUID's integer, PS3.5 B.2, made from
#: the name "dicoogled sample-data") followed by counters: the same UIDs on every machine.
SAMPLE_UID_ROOT = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'dicoogled sample-data').int}"
SAMPLE_PRIVATE_CREATOR = "DICOOGLED SAMPLE"  # the private block (0009,xx) of every file
SAMPLE_SIZE = 64  # rows and columns: small enough to read, big enough to see

#: The set, patient by patient: (PatientID, PatientName, SpecificCharacterSet, sex, birth date,
#: studies). A study: (date, time, description, body part, series). A series: (modality,
#: description, kind, instances, transfer syntax). Each study teaches something; see
#: docs/learn/03-sample-data.md.
SAMPLE_PATIENTS = [
    ("SAMPLE01", "DOE^JOHN", None, "M", "19580312", [
        ("20190611", "091500", "CT chest", "CHEST", [
            ("CT", "Axial 5 mm", "ct", 4, pydicom.uid.ExplicitVRLittleEndian),
        ]),
        ("20240207", "143000", "CT chest follow-up", "CHEST", [
            ("CT", "Axial 5 mm", "ct", 5, pydicom.uid.ExplicitVRLittleEndian),
            ("CT", "Axial 5 mm RLE", "ct", 3, pydicom.uid.RLELossless),
            ("SR", "Radiology report", "sr", 1, pydicom.uid.ExplicitVRLittleEndian),
        ]),
    ]),
    ("SAMPLE02", "MÜLLER^JÜRGEN", "ISO_IR 100", "M", "19710925", [
        ("20230314", "101200", "MR brain", "BRAIN", [
            ("MR", "T1 axial JPEG-LS", "mr", 4, pydicom.uid.JPEGLSLossless),
            ("MR", "T2 axial JPEG 2000", "mr", 4, pydicom.uid.JPEG2000Lossless),
        ]),
    ]),
    ("SAMPLE03", "Yamada^Tarou=山田^太郎=やまだ^たろう", "ISO_IR 192", "M", "19850101", [
        ("20240520", "083000", "US abdomen", "ABDOMEN", [
            ("US", "Liver", "us", 1, pydicom.uid.ExplicitVRLittleEndian),
            ("US", "Liver cine", "us-cine", 1, pydicom.uid.ExplicitVRLittleEndian),
        ]),
    ]),
    ("SAMPLE04", "ΠΑΠΑΔΟΠΟΥΛΟΥ^ΕΛΕΝΗ", "ISO_IR 192", "F", "19630704", [
        ("20221130", "164500", "CT head", "HEAD", [
            ("CT", "Axial 5 mm", "ct", 4, pydicom.uid.ImplicitVRLittleEndian),
        ]),
    ]),
]
_SAMPLE_SOP_CLASSES = {
    "ct": pydicom.uid.CTImageStorage, "mr": pydicom.uid.MRImageStorage,
    "us": pydicom.uid.UltrasoundImageStorage, "us-cine": pydicom.uid.UltrasoundMultiFrameImageStorage,
    "sr": pydicom.uid.BasicTextSRStorage,
}
_SAMPLE_FRAMES = 8  # of the multi-frame (cine) ultrasound object


def _sample_phantom(size: int, z: int):
    """A head-or-body phantom (uint16, 12 bits): an ellipse whose inner disc changes with z."""
    import numpy as np
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    image = np.where(x * x / 0.8 + y * y / 0.6 < 1, 1100, 24)
    radius = 0.15 + 0.05 * z
    image = np.where((x - 0.2) ** 2 + y * y < radius * radius, 1800, image)
    image = np.where((x + 0.35) ** 2 + (y + 0.1) ** 2 < 0.02, 400, image)
    return image.astype(np.uint16)


def _sample_us(size: int, frame: int):
    """An 8-bit fan-shaped ultrasound sector whose bright spot moves with frame."""
    import numpy as np
    y, x = np.mgrid[0:1:size * 1j, -1:1:size * 1j]
    fan = (np.abs(x) < y * 0.9) & (x * x + y * y < 0.95)
    speckle = (np.arange(size * size).reshape(size, size) * 2654435761 % 97).astype(np.uint8)
    image = np.where(fan, 40 + speckle, 0)
    spot = (x - 0.1 * (frame % 4)) ** 2 + (y - 0.5) ** 2 < 0.01
    return np.where(spot, 230, image).astype(np.uint8)


def _sample_image(ds: Dataset, kind: str, number: int):
    """Fill the image module of ds; return the pixels as a numpy array."""
    import numpy as np
    ds.Rows = ds.Columns = SAMPLE_SIZE
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if kind in ("ct", "mr"):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelSpacing = ["5", "5"] if kind == "ct" else ["3.75", "3.75"]
        ds.SliceThickness = "5"
        location = str(-20 + 5 * number)
        ds.ImagePositionPatient = ["-160", "-160", location]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = location
        if kind == "ct":
            ds.KVP = "120"
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
            ds.WindowCenter, ds.WindowWidth = "40", "400"
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "SE", "NONE", "2D"
            ds.ScanOptions = ""
            ds.RepetitionTime, ds.EchoTime, ds.MagneticFieldStrength = "500", "15", "1.5"
            ds.WindowCenter, ds.WindowWidth = "1000", "2000"
        return _sample_phantom(SAMPLE_SIZE, number)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL"]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if kind == "us":  # a colour image: RGB, the pixels of each sample side by side
        gray = _sample_us(SAMPLE_SIZE, 0)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        return np.stack([gray, gray, np.where(gray > 200, 40, gray).astype(np.uint8)], axis=-1)
    ds.NumberOfFrames = _SAMPLE_FRAMES  # a cine loop: one object, many frames
    ds.FrameTime = "40"
    ds.FrameIncrementPointer = 0x00181063  # (0018,1063) Frame Time
    return np.stack([_sample_us(SAMPLE_SIZE, frame) for frame in range(_SAMPLE_FRAMES)])


def _sample_report(ds: Dataset, study_description: str):
    """Fill ds as a Basic Text SR (PS3.3 A.35.1): a report of two findings and an impression."""
    def code(value, scheme, meaning):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
        return Sequence([item])

    def text(concept, value):
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
        item.ConceptNameCodeSequence = concept
        item.TextValue = value
        return item

    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = code("18748-4", "LN", "Diagnostic imaging report")
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.ContentSequence = Sequence([
        text(code("121071", "DCM", "Finding"), f"{study_description}: a 12 mm nodule in the right upper lobe."),
        text(code("121071", "DCM", "Finding"), "No pleural effusion."),
        text(code("121073", "DCM", "Impression"), "Nodule unchanged since 2019: benign."),
    ])


def _sample_instance(counters: tuple[int, int, int, int], patient: tuple, study: tuple, series: tuple) -> Dataset:
    """One instance of the teaching set: the number-th of series se of study st of patient p."""
    p, st, se, number = counters
    patient_id, name, charset, sex, birth, _ = patient
    date, time_, description, body_part, _ = study
    modality, series_description, kind, _, syntax = series
    study_uid = f"{SAMPLE_UID_ROOT}.{p}.{st}"
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = _SAMPLE_SOP_CLASSES[kind]
    ds.SOPInstanceUID = f"{study_uid}.{se}.{number}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time_
    ds.AccessionNumber = f"ACC{p:02d}{st:02d}"
    ds.Modality = modality
    ds.Manufacturer = "dicoogled"
    ds.InstitutionName = "Teaching Hospital"
    ds.ReferringPhysicianName = "HOUSE^GREGORY^^DR"
    ds.StudyDescription = description
    ds.SeriesDescription = series_description
    ds.PatientName = name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth
    ds.PatientSex = sex
    ds.BodyPartExamined = body_part
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = f"{study_uid}.{se}"
    ds.StudyID = str(st)
    ds.SeriesNumber = se
    ds.InstanceNumber = number
    block = ds.private_block(0x0009, SAMPLE_PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", "dicoogled teaching set")
    block.add_new(0x11, "US", p)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = f"{SAMPLE_UID_ROOT}.0"
    ds.file_meta.ImplementationVersionName = "DICOOGLED_SAMPLE"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian if syntax.is_compressed else syntax
    if kind == "sr":
        _sample_report(ds, description)
        return ds
    ds.FrameOfReferenceUID = f"{study_uid}.0"
    ds.PositionReferenceIndicator = ""
    pixels = _sample_image(ds, kind, number)
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW" if ds.BitsAllocated == 16 else "OB"
    if syntax.is_compressed:  # RLE by pydicom itself; JPEG-LS and JPEG 2000 by the installed codecs
        plugin = "pydicom" if syntax == pydicom.uid.RLELossless else ""
        ds.compress(syntax, pixels, encoding_plugin=plugin, generate_instance_uid=False)
    return ds


def sample_datasets():
    """The teaching set, as (relative path, data set with file_meta), always the same."""
    for p, patient in enumerate(SAMPLE_PATIENTS, 1):
        for st, study in enumerate(patient[5], 1):
            for se, series in enumerate(study[4], 1):
                for number in range(1, series[3] + 1):
                    path = f"{patient[0]}/study{st}/series{se}-{series[0]}/{number:03d}.dcm"
                    yield path, _sample_instance((p, st, se, number), patient, study, series)


def write_sample_data(folder: pathlib.Path) -> dict:
    """Write the teaching set under folder; return what was written (files, patients, studies, ...)."""
    written, patients, studies, syntaxes = 0, set(), set(), collections.Counter()
    for relative, ds in sample_datasets():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        written += 1
        patients.add(ds.PatientID)
        studies.add(ds.StudyInstanceUID)
        syntaxes[ds.file_meta.TransferSyntaxUID.name] += 1
    return {"files": written, "patients": len(patients), "studies": len(studies), "transfer_syntaxes": syntaxes}



# ============================================================================================
# Command line
# ============================================================================================


def _configure_logging(level: str):
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format=LOG_FORMAT,
        stream=sys.stderr,
    )
    logging.captureWarnings(True)
    # pynetdicom logs every PDU at INFO; keep its messages for problems only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level != "DEBUG" else logging.DEBUG)
    logging.getLogger("openjpeg").setLevel(logging.WARNING)  # a line per JPEG 2000 tile otherwise
    # ... and it formats every identifier for those INFO lines even when they are not logged.
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = level == "DEBUG"
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


def _has_an_index(config: Config) -> bool:
    """Whether an offline command has an index to work on (False says why in the log): the
    SQLite file must be there; a PostgreSQL database says so itself when it is opened."""
    if config.index_url or (config.data_dir / "index.sqlite").is_file():
        return True
    log.error("no index in %s: is it the right --data-dir?", config.data_dir)
    return False


def _offline_archive(config: Config):
    index = open_index(config)
    # No sweep of the temp folder: a daemon running on this data dir may be writing there.
    storage = Storage(config.data_dir, fsync=config.fsync, sweep=False, node_dir=config.node_dir)
    return index, Ingest(index, storage, config.duplicates, protected_labels=config.protected_labels)


def command_index(config: Config, paths) -> int:
    """Index files and folders in place, without copying them."""
    _make_private_data_dir(config.data_dir)
    index, ingest = _offline_archive(config)
    try:
        for path in paths:
            path = pathlib.Path(path).resolve()
            if path.is_dir():
                index.remember_root(str(path))
                reconcile(ingest, path, "index", progress=_progress_bar(str(path)))
            elif path.is_file():
                index.remember_root(str(path))
                known, stat = index.instance(path=str(path)), path.stat()
                if not known or (known.size, known.mtime_ns) != (stat.st_size, stat.st_mtime_ns):  # else indexed as it is
                    ingest.index_file(path, "index")
            else:
                log.error("%s: no such file or folder", path)
                return 2
        print(json.dumps(dataclasses.asdict(ingest.stats)))
        return 0
    finally:
        index.close()


def command_reindex(config: Config) -> int:
    """Rebuild the index from the storage folder, the watched folders and indexed folders. The
    SQLite index is made anew (a damaged file is why one rebuilds), keeping what the files do
    not say: indexed folders, protection, labels. A PostgreSQL index keeps its database: only its
    instances are emptied and indexed again, and everything else it holds stays."""
    db_path = config.data_dir / "index.sqlite"
    roots, protected, labels = [], [], []  # what the index knows that the files do not: kept across the rebuild
    if not config.index_url and db_path.exists():
        roots, protected, labels = Index.kept_through_rebuild(db_path)
        for suffix in ("", "-wal", "-shm"):
            pathlib.Path(str(db_path) + suffix).unlink(missing_ok=True)
    _make_private_data_dir(config.data_dir)
    index, ingest = _offline_archive(config)
    alone = None
    try:
        if config.index_url:  # reachable, since it opened: is it served?
            alone = hold_database_alone(config.index_url, "reindex")
            roots = index.indexed_roots()
            index.write(Index.clear)
        roots = list(dict.fromkeys(roots + index.remembered_roots()))
        for study_uid in protected:
            index.write(Index.protect_study, study_uid)
        index.write(Index.restore_labels, labels)
        sources = [(ingest.storage.root, "store")] + [(f, "watch") for f in config.watch_folders] + [(pathlib.Path(r), "index") for r in roots]
        for root, origin in sources:
            if origin == "index":
                index.remember_root(str(root))
            if pathlib.Path(root).is_dir():
                reconcile(ingest, root, origin, progress=_progress_bar(str(root)))
            elif origin == "index" and root.is_file():
                ingest.index_file(root, origin)
        # A rebuilt index tells nobody its studies are stable again: they arrived long ago.
        index.write(Index.announce_all_stable)
        print(json.dumps({**index.counts(), **dataclasses.asdict(ingest.stats)}))
        return 0
    finally:
        index.close()
        if alone is not None:
            alone.close()


def command_migrate(config: Config, url: str, force: bool) -> int:
    """Copy the SQLite archive of the data dir into the PostgreSQL database at url, offline:
    the index (every table of it), users and sessions, the audit log, the pseudonym map and the
    settings changed at run time (settings.ini), each part in one transaction. Prints {table:
    rows copied}; exits 1 on any failure. The SQLite files are only read, whatever happens (but
    for the schema of one written by an older dicoogled, brought up to date first as a serve
    would)."""
    if config.index_url:
        log.error("the index is in PostgreSQL already ([index] url or --index): migrate copies a data dir's SQLite index")
        return 1
    if not is_postgresql_url(url):
        log.error("--to takes a postgresql:// URL, not %s", url.split("://")[0] + "://..." if "://" in url else url)
        return 1
    if not _has_an_index(config):
        return 1
    data_dir = config.data_dir
    with contextlib.ExitStack() as opened:
        # A serve writing meanwhile would be missed; one starting meanwhile is refused.
        opened.callback(_lock_node_dir(config, "migrate").close)
        # The database first: one that cannot be reached, or that nodes serve, stops the command
        # before a file is opened.
        target = Index(url)
        opened.callback(target.close)
        opened.callback(hold_database_alone(url, "migrate").close)
        source = Index(data_dir / "index.sqlite")
        opened.callback(source.close)
        # Each part the data dir has: (its name, where it is now, where it goes).
        states = []
        # (The pseudonym map's tables are reported as pseudonyms.TABLE: it has a patients table too.)
        for name, file, kind, prefix in (("users", "users.sqlite", Users, ""), ("audit log", "audit.sqlite", AuditLog, ""),
                                         ("pseudonym map", "pseudonyms.sqlite", PseudonymMap, "pseudonyms.")):
            if (data_dir / file).is_file():
                here = kind(data_dir / file)
                opened.callback(here.close)
                there = kind(url)
                opened.callback(there.close)
                states.append((name, here, there, prefix))
        settings = _saved_settings(data_dir)
        shared_settings = SharedSettings(url)
        opened.callback(shared_settings.close)
        held = {table: rows for table, rows in target.table_counts().items() if rows}
        for _, _, there, prefix in states:
            held.update({prefix + table: rows for table, rows in there.database.rows_held().items()})
        held_settings = shared_settings.read()[1] if settings else {}
        if held_settings:
            held["settings"] = sum(map(len, held_settings.values()))
        if held and not force:
            log.error("the PostgreSQL database holds an archive already (%s): migrate --force replaces it",
                      ", ".join(f"{table} {rows}" for table, rows in held.items()))
            return 1
        try:
            copied = source.copy_into(target, replace=force, progress=_progress_bar("index"))
            for name, here, there, prefix in states:
                rows = here.database.copy_into(there.database, replace=force, progress=_progress_bar(name))
                copied.update({prefix + table: count for table, count in rows.items()})
            if settings or force:
                shared_settings.save(settings, replace_all=force)
        except target.engine.errors as error:
            log.error("migrate failed: %s", error)
            return 1
        copied["settings"] = sum(map(len, settings.values()))
        print(json.dumps(copied))
        log.info("copied to PostgreSQL; the SQLite files stay as they were. Serve it with --index URL or [index] url")
        return 0


def command_retention(config: Config, dry_run: bool) -> int:
    """Apply the [retention] rules (or list what they would delete): one JSON line per study."""
    if not _has_an_index(config):
        return 1
    if not config.retention_rules:
        log.warning("no [retention] rules in the configuration: nothing to do")
    index, ingest = _offline_archive(config)
    try:
        for study in ingest.apply_retention(config.retention_rules.values(), dry_run=dry_run):
            print(json.dumps(study))
        return 0
    finally:
        index.close()


def command_research_export(config: Config, label: str, into: str, options: DeidentificationOptions) -> int:
    """De-identify a label's studies into another label, offline (the daemon stopped); prints
    {studies, stored, failed}, exits 1 if anything failed."""
    if not _has_an_index(config):
        return 1
    index, ingest = _offline_archive(config)
    pseudonyms = PseudonymMap(config.index_url or config.data_dir / "pseudonyms.sqlite")
    try:
        label, into = label_name(label), label_name(into)
        if not index.labelled("STUDY", label):
            log.error("no indexed study carries the label %s", label)
            return 1
        report = research_export(index, ingest.storage, ingest, Deidentifier(pseudonyms), label, into, options)
        print(json.dumps(report._asdict()))
        return 1 if report.failed else 0
    except ValueError as error:
        log.error("%s", error)
        return 2
    finally:
        pseudonyms.close()
        index.close()


def command_check(config: Config) -> int:
    """Compare the index with the files on disk; exit 1 if they disagree."""
    if not _has_an_index(config):
        return 1
    index = open_index(config)
    problems = collections.Counter()
    in_plugins = 0  # kept by storage plugins, which run only in the daemon
    try:
        for indexed in index.every_instance():
            if location_scheme(indexed.path) != "file":
                in_plugins += 1
                continue
            try:
                stat = os.stat(indexed.path)
            except OSError:
                problems["missing"] += 1
                print(f"missing: {indexed.path} ({indexed.sop_instance_uid})")
                continue
            if (stat.st_size, stat.st_mtime_ns) != (indexed.size, indexed.mtime_ns):
                problems["changed"] += 1
                print(f"changed: {indexed.path} ({indexed.sop_instance_uid})")
        known = set(index.paths_under(str((config.data_dir / "storage").resolve())))
        for entry in walk_files((config.data_dir / "storage").resolve()):
            if entry.path not in known:
                problems["not indexed"] += 1
                print(f"not indexed: {entry.path}")
        summary = {"instances": index.counts()["instances"], **problems}
        if in_plugins:
            summary["not checked (plugin storage)"] = in_plugins
        print(json.dumps(summary))
        return 1 if problems else 0
    finally:
        index.close()


OHIF_VERSION = "3.13.2"
#: The viewer's configuration: dicoogled's DICOMweb on the same origin, so the login cookie applies.
OHIF_APP_CONFIG = """window.config = {
  routerBasename: '/viewer',
  showStudyList: true,
  extensions: [],
  modes: [],
  defaultDataSourceName: 'dicoogled',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'dicoogled',
    configuration: {
      friendlyName: 'dicoogled',
      name: 'dicoogled',
      wadoUriRoot: window.location.origin + '/dicom-web/wado',
      qidoRoot: window.location.origin + '/dicom-web',
      wadoRoot: window.location.origin + '/dicom-web',
      qidoSupportsIncludeField: true,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      omitQuotationForMultipartRequest: true,
      bulkDataURI: { enabled: true },
    },
  }],
};
"""


def command_install_viewer(config: Config, version: str) -> int:
    """Install the prebuilt OHIF viewer from the npm registry into data_dir/viewer, served at /viewer/."""
    _make_private_data_dir(config.data_dir)
    target = config.data_dir.resolve() / "viewer"
    work = pathlib.Path(tempfile.mkdtemp(prefix="viewer-", dir=config.data_dir.resolve()))
    try:
        subprocess.run(["npm", "pack", f"@ohif/app@{version}", "--pack-destination", str(work)],
                       check=True, stdout=subprocess.DEVNULL, cwd=work)
        archive = next(work.glob("*.tgz"))
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
            tar.extractall(work, members=members, filter="data")
        dist = work / "package" / "dist"
        # The published build expects to live at /: point its absolute paths at /viewer/.
        index = (dist / "index.html").read_text(encoding="utf-8")
        index = re.sub(r'(href|src)="/(?!/)', r'\1="/viewer/', index).replace('PUBLIC_URL="/"', 'PUBLIC_URL="/viewer/"')
        (dist / "index.html").write_text(index, encoding="utf-8")
        # ... and so do webpack's public path (where chunks load from) and the style sheets' url()s.
        for bundle in [*dist.glob("*.js"), *dist.glob("*.css")]:
            code = bundle.read_text(encoding="utf-8", errors="surrogateescape")
            patched = code.replace('__webpack_require__.p = "/"', '__webpack_require__.p = "/viewer/"')
            patched = re.sub(r"url\((['\"]?)/(?!/)", r"url(\1/viewer/", patched) if bundle.suffix == ".css" else patched
            if patched != code:
                bundle.write_text(patched, encoding="utf-8", errors="surrogateescape")
        (dist / "app-config.js").write_text(OHIF_APP_CONFIG, encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(dist), str(target))
        print(f"OHIF viewer {version} installed in {target}; open http://HOST:PORT/viewer/")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


#: new-plugin: what each kind of plugin does, and the example in plugins/examples/ it starts
#: from (NAME.py and NAME.lua, and NAME.js for a web UI plugin). The examples are the course's
#: solutions (docs/learn, chapters 9 and 10); docs/plugins.md explains every hook.
PLUGIN_KINDS = {
    "index": ("adds searchable fields to every instance", "body_region"),
    "query": ("a query provider, chosen with /search?provider=", "ct_only"),
    "storage": ("keeps received objects under a URI scheme of its own", "memory_store"),
    "web": ("a web service under /ext/", "counter"),
    "webui": ("a web UI plugin: a descriptor and a JavaScript module", "menu_search"),
    "events": ("reacts to arrivals and stable studies", "arrivals"),
    "store-filter": ("accepts or refuses received objects", "refuse_modality"),
    "find-filter": ("rewrites or refuses C-FIND queries", "find_guard"),
}
EXAMPLES_FOLDER = pathlib.Path(__file__).resolve().parent / "plugins" / "examples"


def command_new_plugin(folder: pathlib.Path, name: str, language: str, kind: str) -> int:
    """Copy the example of a kind of plugin (and a webui plugin's module) under a new name."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,63}", name):
        print(f"dicoogled: a plugin name is a letter, then letters, digits, _ or -: not {name!r}", file=sys.stderr)
        return 2
    example = PLUGIN_KINDS[kind][1]
    source = EXAMPLES_FOLDER / f"{example}.{'py' if language == 'python' else 'lua'}"
    if not source.is_file():
        reason = "Lua has no io to keep objects with" if kind == "storage" else f"there is no {source.name}"
        print(f"dicoogled: {kind} plugins are Python only: {reason}", file=sys.stderr)
        return 2
    files = {folder / f"{name}{source.suffix}": source}
    if kind == "webui":
        files[folder / f"{name}.js"] = EXAMPLES_FOLDER / f"{example}.js"
    for path in files:
        if path.exists():
            print(f"dicoogled: {path} exists; choose another name", file=sys.stderr)
            return 1
    folder.mkdir(parents=True, exist_ok=True)
    for path, source in files.items():
        # The example's name, wherever it names the plugin ([plugin.X], /ext/X/, X.js), becomes
        # the new one; a storage plugin's scheme is made from it.
        scheme = re.sub(r"[^a-z0-9+.-]", "-", name.lower())
        text = re.sub(rf"\b{example.replace('_', '-')}\b", scheme, source.read_text(encoding="utf-8"))
        text = re.sub(rf"\b{example}\b", name, text)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path} (from {source.relative_to(EXAMPLES_FOLDER.parent.parent)})")
    return 0


def command_sample_data(folder: pathlib.Path) -> int:
    """Write the teaching set (the same bytes every time) and say what it holds."""
    summary = write_sample_data(folder)
    print(f"wrote {summary['files']} files to {folder}: {summary['patients']} patients, {summary['studies']} studies")
    for name, count in sorted(summary["transfer_syntaxes"].items()):
        print(f"  {count:3d}  {name}")
    return 0


def command_make_cert(folder: pathlib.Path, hosts: list[str], aes: list[str], days: int) -> int:
    """Make a lab's certificates in folder with the openssl command: a CA (ca.pem, ca-key.pem;
    kept if it is there already, so a second run adds certificates it signs), the archive's
    certificate (server.pem, server-key.pem: for localhost, this machine's name, 127.0.0.1 and
    each of hosts) and one certificate per other AE in aes, "AET" or "AET=host,host" (AET.pem,
    AET-key.pem, the AE title as common name, valid for those hosts): a modality presents it as
    a client; a workstation we send to over TLS, as a server. Keys are written owner-only."""
    openssl = shutil.which("openssl")
    if not openssl:
        raise RuntimeError("make-cert needs the openssl command (Debian: apt-get install openssl)")
    ae_hosts = {}
    for text in aes:
        aet, _, names = text.partition("=")
        if not is_valid_ae_title(aet) or not re.fullmatch(r"[A-Za-z0-9_.-]+", aet):
            raise RuntimeError(f"invalid AE title {aet!r}: letters, digits, _ . - (it names the files)")
        ae_hosts[aet] = [name for name in names.split(",") if name]
    folder.mkdir(parents=True, exist_ok=True)

    def run(*arguments: str):
        subprocess.run([openssl, *arguments], check=True, capture_output=True)

    def new_key(path: pathlib.Path):
        run("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(path))
        path.chmod(0o600)

    def signed(name: str, common_name: str, extensions: str):
        key, certificate = folder / f"{name}-key.pem", folder / f"{name}.pem"
        new_key(key)
        with tempfile.TemporaryDirectory() as scratch:
            request, extension_file = pathlib.Path(scratch, "request.csr"), pathlib.Path(scratch, "extensions.cnf")
            extension_file.write_text(extensions)
            run("req", "-new", "-key", str(key), "-subj", f"/O=dicoogled lab/CN={common_name}", "-out", str(request))
            run("x509", "-req", "-in", str(request), "-CA", str(folder / "ca.pem"), "-CAkey", str(folder / "ca-key.pem"),
                "-set_serial", str(secrets.randbits(63)), "-days", str(days), "-sha256",
                "-extfile", str(extension_file), "-out", str(certificate))
        certificate.chmod(0o644)
        print(f"wrote {certificate} and {key} ({common_name})")

    if not (folder / "ca.pem").is_file() or not (folder / "ca-key.pem").is_file():
        new_key(folder / "ca-key.pem")
        run("req", "-x509", "-new", "-key", str(folder / "ca-key.pem"), "-subj", "/O=dicoogled lab/CN=dicoogled lab CA",
            "-days", str(days), "-sha256", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", str(folder / "ca.pem"))
        (folder / "ca.pem").chmod(0o644)
        print(f"wrote {folder / 'ca.pem'} and {folder / 'ca-key.pem'} (the lab CA: keep its key safe)")
    def extensions(names: list[str]) -> str:
        # serverAuth and clientAuth: a DICOM AE is often both (the archive presents the same
        # certificate to the destinations it sends to); the names are what a client checks.
        alternative_names = ",".join(f"IP:{name}" if re.fullmatch(r"[\d.]+|[0-9A-Fa-f:]*:[0-9A-Fa-f:]*", name)
                                     else f"DNS:{name}" for name in names)
        return ("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth,clientAuth\n" + (f"subjectAltName={alternative_names}\n" if names else ""))

    names = list(dict.fromkeys(["localhost", socket.gethostname(), "127.0.0.1", "::1", *hosts]))
    signed("server", names[1] or "localhost", extensions(names))
    for aet, ae_names in ae_hosts.items():
        signed(aet, aet, extensions(ae_names))
    return 0


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicoogled", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dicoogled {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="INI configuration file (see conf/dicoogled.ini)")
    common.add_argument("--data-dir", metavar="DIR", type=pathlib.Path, help="storage, index and temp files (default ./data)")
    common.add_argument("--index", metavar="URL", help="a postgresql:// index instead of the SQLite file in the data dir")
    common.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", parents=[common], help="run the archive (the default)")
    serve.add_argument("--http-host")
    serve.add_argument("--http-port", type=int)
    serve.add_argument("--dicom-host")
    serve.add_argument("--dicom-port", type=int)
    serve.add_argument("--aet", help="our AE title (default DICOOGLED)")
    serve.add_argument("--watch", metavar="DIR", action="append", type=pathlib.Path, help="a folder to index in place (repeatable)")
    serve.add_argument("--plugins-dir", metavar="DIR", action="append", type=pathlib.Path, help="a folder of plugins (repeatable)")
    index = commands.add_parser("index", parents=[common], help="index files or folders in place, offline")
    index.add_argument("paths", nargs="+", metavar="PATH")
    commands.add_parser("reindex", parents=[common], help="rebuild the index from the files")
    commands.add_parser("check", parents=[common], help="verify the index against the files on disk")
    migrate = commands.add_parser(
        "migrate", parents=[common], help="copy the SQLite index, users, audit log and settings into PostgreSQL, offline",
        description="Copy the data dir's SQLite archive (the index and every table of it, users and sessions, the"
                    " audit log, the settings changed at run time) into a PostgreSQL database, with the daemon"
                    " stopped. The SQLite files are only read. Then serve with --index URL.")
    migrate.add_argument("--to", metavar="URL", required=True, help="the postgresql:// database to copy into")
    migrate.add_argument("--force", action="store_true",
                         help="empty what the database holds first (index, users, audit log, settings). Without it a"
                              " database that holds any of them is refused: a copy never mixes two archives (the ids"
                              " of one would collide with the other's) nor replaces one by mistake")
    retention = commands.add_parser("retention", parents=[common], help="apply the [retention] rules now")
    retention.add_argument("--dry-run", action="store_true", help="list the studies they would delete, delete nothing")
    new_plugin = commands.add_parser("new-plugin", parents=[common], help="write a commented starting file for a plugin")
    new_plugin.add_argument("name")
    new_plugin.add_argument("--lang", choices=("python", "lua"), default="python")
    new_plugin.add_argument("--kind", choices=tuple(PLUGIN_KINDS), required=True)
    new_plugin.add_argument("--dir", metavar="DIR", type=pathlib.Path, help="where to write it (default: the first plugins folder)")
    sample = commands.add_parser("sample-data", parents=[common], help="write a small teaching set of DICOM files")
    sample.add_argument("folder", metavar="DIR", type=pathlib.Path)
    make_cert = commands.add_parser("make-cert", parents=[common], help="make a lab CA and TLS certificates (needs openssl)")
    make_cert.add_argument("folder", metavar="DIR", type=pathlib.Path)
    make_cert.add_argument("--host", action="append", default=[], help="another name or address of this machine (repeatable)")
    make_cert.add_argument("--ae", metavar="AET[=HOST,...]", action="append", default=[],
                           help="also a certificate for another AE (a modality, a destination) on these hosts (repeatable)")
    make_cert.add_argument("--days", type=int, default=825, help="validity of the certificates (default 825)")
    research = commands.add_parser("research-export", parents=[common],
                                   help="de-identify a label's studies into another label, offline (PS3.15 Basic Profile)")
    research.add_argument("label", help="the label of the studies to de-identify")
    research.add_argument("into", help="the label of the de-identified copies")
    research.add_argument("--retain-dates", choices=RETAIN_DATES, default="remove",
                          help="remove dates (default), keep them (full) or move them per patient (offset)")
    research.add_argument("--retain-device-identity", action="store_true")
    research.add_argument("--retain-patient-characteristics", action="store_true")
    research.add_argument("--clean-descriptors", action="store_true", help="keep descriptions, cleaned")
    viewer = commands.add_parser("install-viewer", parents=[common], help="install the OHIF web viewer (needs npm)")
    viewer.add_argument("--version", dest="viewer_version", default=OHIF_VERSION, help=f"@ohif/app version (default {OHIF_VERSION})")
    return parser


def main(argv=None) -> int:
    """The dicoogled command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("serve", "index", "reindex", "check", "migrate", "retention", "install-viewer", "new-plugin", "sample-data", "make-cert", "research-export", "-h", "--help", "--version"):
        argv.insert(0, "serve")
    args = _argument_parser().parse_args(argv)
    overrides = {"data_dir": args.data_dir, "index_url": args.index, "log_level": args.log_level}
    if args.command == "serve":
        overrides.update(http_host=args.http_host, http_port=args.http_port, dicom_host=args.dicom_host,
                         dicom_port=args.dicom_port, aet=args.aet)
    if args.command == "serve":
        overrides.update(add_watch_folders=args.watch or (), add_plugin_folders=args.plugins_dir or ())
    try:
        config = Config.load(args.config, **overrides)
    except ValueError as error:
        print(f"dicoogled: {error}", file=sys.stderr)
        return 2
    _configure_logging(config.log_level)
    if args.command not in ("new-plugin", "sample-data"):  # plugin sources, teaching files: not the archive's data
        os.umask(PRIVATE_UMASK)
    try:
        if args.command == "index":
            return command_index(config, args.paths)
        if args.command == "reindex":
            return command_reindex(config)
        if args.command == "check":
            return command_check(config)
        if args.command == "migrate":
            return command_migrate(config, args.to, args.force)
        if args.command == "retention":
            return command_retention(config, args.dry_run)
        if args.command == "new-plugin":
            return command_new_plugin(args.dir or config.plugin_folders[0], args.name, args.lang, args.kind)
        if args.command == "install-viewer":
            return command_install_viewer(config, args.viewer_version)
        if args.command == "sample-data":
            return command_sample_data(args.folder)
        if args.command == "make-cert":
            return command_make_cert(args.folder, args.host, args.ae, args.days)
        if args.command == "research-export":
            options = DeidentificationOptions(args.retain_dates, False, args.retain_device_identity,
                                              args.retain_patient_characteristics, args.clean_descriptors)
            return command_research_export(config, args.label, args.into, options)
    except (OSError, RuntimeError, ValueError, apsw.Error, subprocess.CalledProcessError) as error:
        log.error("%s failed: %s", args.command, error)
        return 1
    try:
        daemon = Daemon(config)
    except (OSError, RuntimeError, ValueError, apsw.Error) as error:
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
