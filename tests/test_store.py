"""C-ECHO and C-STORE: what a modality sends is what the archive keeps, byte for byte.

Senders are pynetdicom, DCMTK's storescu and, for what no well-behaved client would do
(garbage, hostile UIDs, an abort half-way through a data set), a hand-built association.
Every instance acknowledged with success must be on disk and found by C-FIND, whatever
happens to the daemon afterwards.
"""

import contextlib
import ctypes
import os
import pathlib
import re
import socket
import shutil
import struct
import subprocess
import sys
import threading
import time

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pynetdicom import AE, _config as pynetdicom_config, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import CTImageStorage, Verification

import studygen
from conftest import AET, ROOT, free_port, make_identifier, rejection_of, wait_until
from restclient import ADMIN_ENV, admin_client

SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STORE_REFUSED_INVALID_UID = 0xC002

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
PYDICOM_FILES = {  # pydicom's bundled file of each transfer syntax -> that syntax
    "CT_small.dcm": "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "MR_small_implicit.dcm": "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "ExplVR_BigEnd.dcm": "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "image_dfl.dcm": "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "JPGExtended.dcm": "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "SC_rgb_jpeg_gdcm.dcm": "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",  # RLE Lossless
}
#: storescu option that makes it propose each file's transfer syntax.
STORESCU_PROPOSE = {
    "CT_small.dcm": "-xe", "MR_small_implicit.dcm": "-xi", "ExplVR_BigEnd.dcm": "-xb",
    "image_dfl.dcm": "-xd", "SC_rgb_jpeg_dcmtk.dcm": "-xy", "JPGExtended.dcm": "-xx",
    "SC_rgb_jpeg_gdcm.dcm": "-xs", "MR_small_jpeg_ls_lossless.dcm": "-xt",
    "MR_small_jp2klossless.dcm": "-xv", "JPEG2000.dcm": "-xw", "MR_small_RLE.dcm": "-xr",
}


# ---- helpers -------------------------------------------------------------------------------


def stored_path(daemon, ds) -> pathlib.Path:
    return daemon.data_dir / "storage" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def split_file(path) -> tuple[Dataset, bytes]:
    """(file meta, data set bytes exactly as in the file) of a Part 10 file."""
    meta, offset = split_dataset(pathlib.Path(path))
    return meta, pathlib.Path(path).read_bytes()[offset:]


def files_under(folder: pathlib.Path) -> set:
    return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()}


def image_uids(daemon, **keys) -> set:
    """SOPInstanceUIDs that an IMAGE-level C-FIND with keys finds."""
    results, status = daemon.find(make_identifier("IMAGE", SOPInstanceUID="", **keys))
    assert status == SUCCESS
    return {ds.SOPInstanceUID for ds in results}


def header(path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _nodelay(event):
    # Our side of the test association: without it every store waits for a delayed ACK.
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def associate(daemon, contexts, aet=AET, calling="TESTSCU"):
    """A pynetdicom association proposing (sop_class, transfer_syntax) pairs."""
    ae = AE(ae_title=calling)
    for sop_class, transfer_syntax in dict.fromkeys(contexts):
        ae.add_requested_context(sop_class, transfer_syntax)
    return ae.associate("127.0.0.1", daemon.dicom_port, ae_title=aet, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])


@pytest.fixture
def send_raw_files(monkeypatch):
    """send_raw_files(daemon, *paths) -> statuses: each file's data set bytes go out untouched.

    pynetdicom then sends the bytes after the file meta as they are (no decode, no
    re-encode), so what was sent is known exactly: the file's own data set bytes.
    """
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)

    def send(daemon, *paths):
        metas = [split_dataset(pathlib.Path(p))[0] for p in paths]
        assoc = associate(daemon, [(m.MediaStorageSOPClassUID, m.TransferSyntaxUID) for m in metas])
        assert assoc.is_established
        try:
            return [assoc.send_c_store(pathlib.Path(p)).Status for p in paths]
        finally:
            assoc.release()

    return send


def storescu(port, *options, files, aet=AET, calling="DCMTK", check=True):
    """DCMTK storescu: options, then peer and port, then the files (conftest's dcmtk() puts
    arguments before peer and port, where storescu cannot take files)."""
    command = ["storescu", "-aet", calling, "-aec", aet, *options, "127.0.0.1", str(port), *map(str, files)]
    result = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def encode(ds: Dataset, transfer_syntax=EXPLICIT_VR_LITTLE_ENDIAN) -> bytes:
    """A data set's bytes as a C-STORE carries them (no preamble, no file meta)."""
    fp = DicomBytesIO()
    fp.is_little_endian = transfer_syntax != "1.2.840.10008.1.2.2"
    fp.is_implicit_VR = transfer_syntax == "1.2.840.10008.1.2"
    write_dataset(fp, ds)
    return fp.getvalue()


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def _uid_bytes(uid: str) -> bytes:
    return uid.encode() + (b"\0" if len(uid) % 2 else b"")


class RawAssociation:
    """A storage SCU that builds its PDUs by hand (PS3.8 9.3), so a test can send what no
    library would send, or stop anywhere in the middle of a data set."""

    def __init__(self, port, sop_class=CTImageStorage, transfer_syntax=EXPLICIT_VR_LITTLE_ENDIAN,
                 called=AET, calling="RAWSCU"):
        self.sop_class = sop_class
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, _uid_bytes(sop_class)) + _item(0x40, _uid_bytes(transfer_syntax)))
        user_information = _item(0x50, _item(0x51, struct.pack(">I", 16384)))  # our maximum PDU length
        body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + bytes(32)
        body += _item(0x10, _uid_bytes("1.2.840.10008.3.1.1.1")) + context + user_information
        self.sock.sendall(struct.pack(">BBI", 0x01, 0, len(body)) + body)
        kind, accept = self.read_pdu()
        assert kind == 0x02, f"association not accepted (PDU type {kind:#x})"
        #: The acceptor's answer to our one presentation context: 0 acceptance,
        #: 3 abstract syntax not supported, 4 transfer syntaxes not supported.
        self.context_result = None
        position = 68  # after the fixed fields of the A-ASSOCIATE-AC
        while position < len(accept):
            item_type, _, length = struct.unpack(">BBH", accept[position:position + 4])
            if item_type == 0x21:
                self.context_result = accept[position + 6]
            position += 4 + length

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("the daemon closed the connection")
            data += chunk
        return data

    def read_pdu(self) -> tuple[int, bytes]:
        kind, _, length = struct.unpack(">BBI", self._read(6))
        return kind, self._read(length)

    def p_data(self, data: bytes, command: bool, last: bool):
        control = (1 if command else 0) | (2 if last else 0)
        pdv = struct.pack(">IBB", len(data) + 2, 1, control) + data
        self.sock.sendall(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv)

    def _store_command(self, sop_instance_uid: str, message_id: int) -> bytes:
        command = Dataset()
        command.AffectedSOPClassUID = self.sop_class
        command.CommandField = 0x0001  # C-STORE-RQ
        command.MessageID = message_id
        command.Priority = 0
        command.CommandDataSetType = 0x0000  # a data set follows
        command.AffectedSOPInstanceUID = sop_instance_uid
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, True
        write_dataset(fp, command)
        elements = fp.getvalue()
        return struct.pack("<HHII", 0x0000, 0x0000, 4, len(elements)) + elements  # group length first

    def send_store(self, sop_instance_uid: str, data: bytes, fragment=16000, stop_before_last=False, message_id=1):
        """Send a C-STORE-RQ; return the response status (None when stopped before the end)."""
        self.p_data(self._store_command(sop_instance_uid, message_id), command=True, last=True)
        pieces = [data[i:i + fragment] for i in range(0, len(data), fragment)] or [b""]
        for number, piece in enumerate(pieces, 1):
            if number == len(pieces) and stop_before_last:
                return None
            self.p_data(piece, command=False, last=number == len(pieces))
        kind, payload = self.read_pdu()
        assert kind == 0x04, f"expected a C-STORE-RSP, got PDU type {kind:#x}"
        length = struct.unpack(">I", payload[:4])[0]
        response = read_dataset(DicomBytesIO(payload[6:4 + length]), is_implicit_VR=True, is_little_endian=True)
        assert response.MessageIDBeingRespondedTo == message_id
        self.response = response  #: the last C-STORE-RSP command, Error Comment and all
        return response.Status

    def release(self) -> int:
        self.sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + bytes(4))
        kind, _ = self.read_pdu()
        self.sock.close()
        return kind

    def abort(self):
        self.sock.sendall(struct.pack(">BBI", 0x07, 0, 4) + bytes(4))
        self.sock.close()


# ---- C-ECHO --------------------------------------------------------------------------------


def test_echo_with_pynetdicom_and_echoscu(daemon):
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title=AET)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == SUCCESS
    finally:
        assoc.release()
    result = daemon.dcmtk("echoscu", "-v")
    assert "Received Echo Response (Success)" in result.stderr + result.stdout


# ---- C-STORE: the file on disk -------------------------------------------------------------


def test_store_writes_part10_file_with_the_received_bytes(daemon, studies, send_raw_files):
    paths = studies(patients=1, studies=1, series=2, instances=3)
    assert send_raw_files(daemon, *paths) == [SUCCESS] * 6
    for path in paths:
        ds = header(path)
        target = stored_path(daemon, ds)
        data = target.read_bytes()
        assert data[:128] == bytes(128) and data[128:132] == b"DICM"
        meta, dataset_bytes = split_file(target)
        assert dataset_bytes == split_file(path)[1], "stored data set differs from the one sent"
        assert meta.FileMetaInformationGroupLength == len(data) - len(dataset_bytes) - 132 - 12
        assert meta.FileMetaInformationVersion == b"\x00\x01"
        assert meta.MediaStorageSOPClassUID == CTImageStorage
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN
        assert meta.ImplementationClassUID
    study_uid = header(paths[0]).StudyInstanceUID
    assert image_uids(daemon, StudyInstanceUID=study_uid) == {header(p).SOPInstanceUID for p in paths}
    # Nothing else lands in storage, and no temporary file is left behind.
    assert len(files_under(daemon.data_dir / "storage")) == 6
    assert files_under(daemon.node_dir / "tmp") == set()


def test_storescu_sends_many_files_in_one_association(daemon, studies):
    paths = studies(patients=1, studies=1, series=2, instances=4)
    result = storescu(daemon.dicom_port, "-v", files=paths)
    output = result.stdout + result.stderr
    assert output.count("Requesting Association") == 1
    assert output.count("Received Store Response (Success)") == 8
    for path in paths:
        ds = header(path)
        assert stored_path(daemon, ds).is_file()
        assert pydicom.dcmread(stored_path(daemon, ds)).PixelData == pydicom.dcmread(path).PixelData
    assert image_uids(daemon, StudyInstanceUID=header(paths[0]).StudyInstanceUID) == {header(p).SOPInstanceUID for p in paths}
    assert daemon.counts() == {"patients": 1, "studies": 1, "series": 2, "instances": 8}


def test_storescu_several_associations_at_once(daemon, studies):
    paths = studies(patients=2, studies=2, series=1, instances=5)
    batches = [paths[i:i + 5] for i in range(0, len(paths), 5)]
    processes = [
        subprocess.Popen(["storescu", "-aet", f"MODALITY{n}", "-aec", AET, "127.0.0.1", str(daemon.dicom_port), *map(str, batch)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for n, batch in enumerate(batches)
    ]
    for process in processes:
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output
    assert daemon.counts() == {"patients": 2, "studies": 4, "series": 4, "instances": 20}
    for path in paths:
        assert stored_path(daemon, header(path)).is_file()
    for n in range(len(batches)):
        assert f"from MODALITY{n}" in daemon.log


# ---- C-STORE: transfer syntaxes ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PYDICOM_FILES))
def test_transfer_syntax_stored_byte_exact_from_pynetdicom(start_daemon, testdata, send_raw_files, name):
    path = testdata(name)
    ds = header(path)
    assert ds.file_meta.TransferSyntaxUID == PYDICOM_FILES[name]
    daemon = start_daemon()
    assert send_raw_files(daemon, path) == [SUCCESS]
    meta, dataset_bytes = split_file(stored_path(daemon, ds))
    assert meta.TransferSyntaxUID == PYDICOM_FILES[name]
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert dataset_bytes == split_file(path)[1]
    assert image_uids(daemon, StudyInstanceUID=ds.StudyInstanceUID) == {ds.SOPInstanceUID}


@pytest.fixture
def oracle(tmp_path):
    """A DCMTK storescp in bit-preserving mode: it writes each data set exactly as it came
    off the wire, which tells what storescu really sent (storescu re-encodes files)."""
    folder = tmp_path / "oracle"
    folder.mkdir()
    port = free_port()
    process = subprocess.Popen(["storescp", "+B", "+xa", "-aet", "ORACLE", "-od", str(folder), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def listening():
        if process.poll() is not None:
            raise AssertionError(f"storescp exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_until(listening, message="storescp to listen")
    yield port, folder
    process.terminate()
    process.wait(10)


@pytest.mark.parametrize("name", sorted(PYDICOM_FILES))
def test_transfer_syntax_stored_byte_exact_from_storescu(start_daemon, testdata, oracle, name):
    path = testdata(name)
    ds = header(path)
    option = STORESCU_PROPOSE[name]
    oracle_port, oracle_folder = oracle
    storescu(oracle_port, option, files=[path], aet="ORACLE")
    (sent,) = oracle_folder.iterdir()
    sent_meta, sent_bytes = split_file(sent)
    assert sent_meta.TransferSyntaxUID == PYDICOM_FILES[name], "storescu did not send the file's own syntax"

    daemon = start_daemon()
    storescu(daemon.dicom_port, option, files=[path])
    meta, dataset_bytes = split_file(stored_path(daemon, ds))
    assert meta.TransferSyntaxUID == PYDICOM_FILES[name]
    assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert dataset_bytes == sent_bytes


def test_unknown_transfer_syntax_is_refused_at_negotiation(daemon):
    unknown_syntax = "1.2.826.0.1.3680043.9.7433.77"
    assoc = RawAssociation(daemon.dicom_port, transfer_syntax=unknown_syntax)
    try:
        assert assoc.context_result == 4  # transfer syntaxes not supported
    finally:
        assoc.abort()


def test_private_sop_class_is_accepted(daemon, tmp_path):
    private_class = "1.2.826.0.1.3680043.9.7433.99.1"  # no standard storage class knows it
    ds = studygen.make_instance(0, 0, 0, 0, SOPClassUID=private_class)
    path = tmp_path / "private.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert daemon.store(path) == [SUCCESS]
    meta, dataset_bytes = split_file(stored_path(daemon, ds))
    assert meta.MediaStorageSOPClassUID == private_class
    assert dataset_bytes == split_file(path)[1]
    results, status = daemon.find(make_identifier("IMAGE", SOPInstanceUID=ds.SOPInstanceUID, SOPClassUID=""))
    assert status == SUCCESS
    assert [r.SOPClassUID for r in results] == [private_class]


# ---- C-STORE: duplicates -------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["keep", "overwrite"])
def test_duplicates(start_daemon, tmp_path, send_raw_files, policy):
    daemon = start_daemon(config_text=f"[storage]\nduplicates = {policy}\n")
    first = tmp_path / "first.dcm"
    second = tmp_path / "second.dcm"
    studygen.make_instance(0, 0, 0, 0, ImageComments="first version").save_as(first, enforce_file_format=True)
    studygen.make_instance(0, 0, 0, 0, ImageComments="second version").save_as(second, enforce_file_format=True)
    ds = header(first)
    target = stored_path(daemon, ds)

    assert send_raw_files(daemon, first) == [SUCCESS]
    before = target.stat()
    # The same bytes again: success, and the file is not even rewritten.
    assert send_raw_files(daemon, first) == [SUCCESS]
    assert (target.stat().st_ino, target.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert f"duplicate {ds.SOPInstanceUID} from TESTSCU: identical, nothing to do" in daemon.log

    # Different bytes under the same SOPInstanceUID.
    assert send_raw_files(daemon, second) == [SUCCESS]
    winner = first if policy == "keep" else second
    assert split_file(target)[1] == split_file(winner)[1]
    if policy == "keep":
        assert f"duplicate {ds.SOPInstanceUID} from TESTSCU differs: kept the first one (policy keep)" in daemon.log
    else:
        assert f"duplicate {ds.SOPInstanceUID} from TESTSCU differs: overwriting (policy overwrite)" in daemon.log
    results, status = daemon.find(make_identifier("IMAGE", SOPInstanceUID=ds.SOPInstanceUID, ImageComments=""))
    assert status == SUCCESS
    assert [r.ImageComments for r in results] == [header(winner).ImageComments]
    assert daemon.counts()["instances"] == 1
    assert files_under(daemon.data_dir / "storage") == {target.relative_to(daemon.data_dir / "storage")}
    assert daemon.health()["ingest"]["duplicates"] == 2


def test_overwrite_by_a_version_in_another_series_leaves_no_orphan(start_daemon, tmp_path, send_raw_files):
    daemon = start_daemon(config_text="[storage]\nduplicates = overwrite\n")
    first = tmp_path / "first.dcm"
    moved = tmp_path / "moved.dcm"
    studygen.make_instance(0, 0, 0, 0).save_as(first, enforce_file_format=True)
    # The same SOPInstanceUID, re-sent after the modality corrected its series.
    studygen.make_instance(0, 0, 0, 0, SeriesInstanceUID="1.2.826.0.1.3680043.9.7433.2.1").save_as(moved, enforce_file_format=True)
    assert send_raw_files(daemon, first) == [SUCCESS]
    assert send_raw_files(daemon, moved) == [SUCCESS]
    storage = daemon.data_dir / "storage"
    assert files_under(storage) == {stored_path(daemon, header(moved)).relative_to(storage)}
    results, _ = daemon.find(make_identifier("IMAGE", SOPInstanceUID=header(first).SOPInstanceUID, SeriesInstanceUID=""))
    assert [r.SeriesInstanceUID for r in results] == ["1.2.826.0.1.3680043.9.7433.2.1"]
    assert daemon.stop() == 0
    check = _check_archive(daemon)
    assert check.returncode == 0, check.stdout + check.stderr


# ---- C-STORE: bad input --------------------------------------------------------------------

UNPARSEABLE = {
    # Bytes that are no data set at all: nothing can be read, no UIDs.
    "noise": bytes(range(256)) * 4,
    # SOPInstanceUID with a value representation that does not exist.
    "unknown VR": b"\x08\x00\x18\x00ZZ\x04\x00" + b"1.2\x00",
    # A sequence of undefined length whose item never ends.
    "unterminated sequence": (b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
                              + b"\x08\x00\x50\x00SH\x04\x00ABCD"),
}


def test_unparseable_data_sets_fail_and_the_association_goes_on(daemon):
    good = studygen.make_instance(0, 0, 0, 0)
    assoc = RawAssociation(daemon.dicom_port)
    for number, (what, data) in enumerate(UNPARSEABLE.items(), 1):
        status = assoc.send_store(f"1.2.826.0.1.3680043.9.7433.1.{number}", data, message_id=number)
        assert status == CANNOT_UNDERSTAND, f"{what}: status {status:#06x}"
    assert assoc.send_store(good.SOPInstanceUID, encode(good), message_id=9) == SUCCESS
    assert assoc.release() == 0x06  # A-RELEASE-RP: the association survived every failure
    assert files_under(daemon.data_dir / "storage") == {stored_path(daemon, good).relative_to(daemon.data_dir / "storage")}
    assert daemon.counts()["instances"] == 1
    assert daemon.health()["ingest"]["failed"] == len(UNPARSEABLE)
    assert "Exception in handler bound to 'evt.EVT_C_STORE'" not in daemon.log  # refused, not crashed


@pytest.mark.parametrize("keyword, bad_uid", [
    ("SOPInstanceUID", "1.2.3/../../../../escaped"),
    ("SOPInstanceUID", ".."),
    ("SeriesInstanceUID", "../../.."),
    ("StudyInstanceUID", "/tmp/dicoogled-escaped"),
])
def test_invalid_uid_is_refused_and_nothing_is_written(daemon, tmp_path, keyword, bad_uid):
    ds = studygen.make_instance(0, 0, 0, 0, **{keyword: bad_uid})
    everything_before = files_under(tmp_path)
    assoc = RawAssociation(daemon.dicom_port)
    # The command carries the hostile UID too, as a hostile sender would.
    sop_uid = ds.SOPInstanceUID
    assert assoc.send_store(sop_uid, encode(ds)) == STORE_REFUSED_INVALID_UID
    good = studygen.make_instance(0, 0, 0, 1)
    assert assoc.send_store(good.SOPInstanceUID, encode(good), message_id=2) == SUCCESS
    assoc.release()
    assert files_under(tmp_path) - everything_before == {stored_path(daemon, good).relative_to(tmp_path)}
    assert not pathlib.Path("/tmp/dicoogled-escaped").exists()
    assert daemon.counts()["instances"] == 1
    assert f"invalid UID {bad_uid!r}" in daemon.log


# ---- C-STORE: truncated, malformed and mismatched objects ------------------------------------

DAMAGED = studygen.damaged(studygen.make_instance(0, 0, 0, 7))
DAMAGED_UID = studygen.make_instance(0, 0, 0, 7).SOPInstanceUID


def dataset_bytes(part10: bytes) -> bytes:
    """What a C-STORE carries of a Part 10 file: the bytes after its file meta group."""
    return part10[144 + struct.unpack("<I", part10[140:144])[0]:]


def assert_nothing_kept(daemon, sop_uid: str, good: Dataset):
    """Only good is under storage/ and in the index; the refused sop_uid is found nowhere."""
    storage = daemon.data_dir / "storage"
    assert files_under(storage) == {stored_path(daemon, good).relative_to(storage)}
    results, status = daemon.find(make_identifier("IMAGE", SOPInstanceUID=sop_uid))
    assert (results, status) == ([], SUCCESS)
    assert image_uids(daemon) == {good.SOPInstanceUID}


@pytest.mark.parametrize("what", DAMAGED)
def test_damaged_object_fails_with_a_reason_and_nothing_is_kept(daemon, what):
    """Sent as it is over a hand-built association: a failure status naming the reason, a log
    line, a count in /health; nothing stored or indexed; the association goes on."""
    assoc = RawAssociation(daemon.dicom_port)
    status = assoc.send_store(DAMAGED_UID, dataset_bytes(DAMAGED[what]))
    comment = str(assoc.response.get("ErrorComment", ""))
    assert status == CANNOT_UNDERSTAND, f"{what}: status {status:#06x}"
    assert comment.startswith("truncated" if "cut" in what or "short" in what or "past" in what else "malformed"), comment
    good = studygen.make_instance(0, 0, 0, 8)
    assert assoc.send_store(good.SOPInstanceUID, encode(good), message_id=2) == SUCCESS
    assert assoc.release() == 0x06
    assert_nothing_kept(daemon, DAMAGED_UID, good)
    assert f"refused {DAMAGED_UID} from RAWSCU with 0xC000: {comment}" in daemon.log
    assert daemon.health()["ingest"]["malformed"] == 1


def test_truncated_files_sent_by_pynetdicom_fail(daemon, tmp_path, send_raw_files):
    """pynetdicom sends a file's data set bytes as they are (chunked): the cut ones fail.
    (DCMTK's storescu cannot be made to send one: it reads each file whole first and
    refuses a cut one with "premature end of stream".)"""
    cut = [name for name in DAMAGED if "cut" in name or "short" in name]
    paths = []
    for number, name in enumerate(cut):
        paths.append(tmp_path / f"cut{number}.dcm")
        paths[-1].write_bytes(DAMAGED[name])
    good = studygen.make_instance(0, 0, 0, 8)
    good.save_as(tmp_path / "good.dcm", enforce_file_format=True)
    assert send_raw_files(daemon, *paths, tmp_path / "good.dcm") == [CANNOT_UNDERSTAND] * len(cut) + [SUCCESS]
    assert_nothing_kept(daemon, DAMAGED_UID, good)
    assert daemon.health()["ingest"]["malformed"] == len(cut)


@pytest.mark.parametrize("photometric, samples, pixel_bytes, status", [
    ("MONOCHROME2", 1, 8 * 8 * 2 - 10, CANNOT_UNDERSTAND),  # a file cut in its pixels, read and re-encoded
    ("MONOCHROME2", 1, 8 * 8 * 2, SUCCESS),
    ("YBR_FULL_422", 3, 8 * 8 * 2, SUCCESS),  # 4:2:2 holds two values per pixel, not three
    ("YBR_FULL_422", 3, 8 * 8 * 2 - 2, CANNOT_UNDERSTAND),
])
def test_native_pixel_data_shorter_than_its_image_fails(daemon, photometric, samples, pixel_bytes, status):
    """A well-formed data set whose native pixel data is shorter than Rows x Columns x samples x
    bits says: what a sender makes of a cut file when it reads it with pydicom and sends it."""
    ds = studygen.make_instance(0, 0, 0, 3, size=8, PhotometricInterpretation=photometric, SamplesPerPixel=samples,
                                BitsAllocated=16 if samples == 1 else 8, BitsStored=16 if samples == 1 else 8,
                                HighBit=15 if samples == 1 else 7)
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.PixelData = bytes(pixel_bytes)
    assoc = RawAssociation(daemon.dicom_port)
    assert assoc.send_store(ds.SOPInstanceUID, encode(ds)) == status
    if status != SUCCESS:
        assert str(assoc.response.ErrorComment).startswith("truncated: pixel data holds"), assoc.response
    assoc.release()
    assert len(daemon.find(make_identifier("IMAGE", SOPInstanceUID=ds.SOPInstanceUID))[0]) == (status == SUCCESS)


@contextlib.contextmanager
def system_calls(daemon, tmp_path, calls: str):
    """strace the daemon's threads for the given calls while the body runs; yields a function
    that returns what was traced (once the body is done). Skips where ptrace is not allowed."""
    trace, said = tmp_path / "trace", tmp_path / "strace.err"
    with open(said, "w") as err:
        tracer = subprocess.Popen(["strace", "-f", "-y", "-e", f"trace={calls}", "-o", str(trace),
                                   "-p", str(daemon.process.pid)], stderr=err)
    try:
        wait_until(lambda: "attached" in said.read_text() or tracer.poll() is not None, message="strace to attach")
        if tracer.poll() is not None:  # no ptrace here (a container without the capability)
            pytest.skip(f"strace cannot attach to the daemon: {said.read_text()[-300:]}")
        yield trace.read_text
    finally:
        tracer.terminate()
        tracer.wait(10)


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace to see the daemon's system calls")
def test_a_stored_file_and_its_new_folders_are_flushed_before_success(daemon, tmp_path):
    """Durable means the rename too: after the file's own fsync, the folder it was renamed into
    and the folders made for it are fsynced before the sender hears success (POSIX: an entry is
    on disk once its folder is). Seen from outside, in the daemon's system calls."""
    with system_calls(daemon, tmp_path, "fsync,rename,renameat,renameat2") as traced:
        ds = studygen.make_instance(7, 0, 0, 0)
        assert daemon.store(ds) == [SUCCESS]
    calls = traced()
    path = stored_path(daemon, ds)
    renamed = calls.index(str(path))
    synced = set(re.findall(r"fsync\(\d+<([^>]+)>\)\s+= 0", calls[renamed:]))
    storage = daemon.data_dir / "storage"
    assert {str(path.parent), str(path.parent.parent), str(storage)} <= synced, calls[renamed:][:3000]


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace to see the daemon's system calls")
@pytest.mark.sqlite_only("counts the fsyncs of index.sqlite-wal")
def test_the_index_syncs_its_log_for_what_no_stored_file_can_redo(start_daemon, tmp_path):
    """An instance's index rows are committed without syncing the index's write-ahead log: its
    file is on disk before that commit, and the start's reconciliation indexes it again if a power
    loss took the rows. A label has no file to come back from: its commit syncs the log."""
    daemon = start_daemon(env=ADMIN_ENV)
    wal = str(daemon.data_dir / "index.sqlite-wal")
    wal_syncs = lambda calls: len(re.findall(rf"f(?:data)?sync\(\d+<{re.escape(wal)}>\)", calls))  # noqa: E731
    instances = [studygen.make_instance(8, 0, 0, i) for i in range(20)]
    with system_calls(daemon, tmp_path, "fsync,fdatasync") as traced:
        assert daemon.store(*instances) == [SUCCESS] * 20
    assert wal_syncs(traced()) < 5  # a checkpoint may sync it, not each commit
    assert len(daemon.find(make_identifier("IMAGE", PatientID=instances[0].PatientID))[0]) == 20
    with system_calls(daemon, tmp_path, "fsync,fdatasync") as traced:
        labelled = admin_client(daemon).request("PUT", f"/studies/{instances[0].StudyInstanceUID}/labels/durable")
        assert labelled.status == 200
    assert wal_syncs(traced()) >= 1


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "SOPClassUID"])
def test_command_uid_other_than_the_data_sets_fails(daemon, keyword):
    """A C-STORE whose command names another SOP Instance or Class than its data set."""
    ds = studygen.make_instance(0, 0, 0, 7)
    command_uid = ds.SOPInstanceUID
    if keyword == "SOPInstanceUID":
        command_uid = studygen.make_instance(0, 0, 0, 9).SOPInstanceUID
    else:
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage, sent in a CT Image Storage command
    assoc = RawAssociation(daemon.dicom_port)
    assert assoc.send_store(command_uid, encode(ds)) == DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    assert str(assoc.response.ErrorComment).startswith(keyword.removeprefix("SOP").join(["SOP", ""]))
    good = studygen.make_instance(0, 0, 0, 8)
    assert assoc.send_store(good.SOPInstanceUID, encode(good), message_id=2) == SUCCESS
    assoc.release()
    assert_nothing_kept(daemon, ds.SOPInstanceUID, good)
    assert_nothing_kept(daemon, command_uid, good)


# ---- C-STORE: interrupted transfers --------------------------------------------------------


@pytest.mark.parametrize("how", ["A-ABORT", "connection closed"])
def test_association_aborted_mid_transfer_stores_nothing(daemon, how):
    earlier = studygen.make_instance(0, 0, 0, 0)
    assert daemon.store(earlier) == [SUCCESS]
    big = studygen.make_instance(0, 0, 0, 1, size=512)  # 512 KiB of pixels: 33 P-DATA fragments
    data = encode(big)
    assert len(data) > 30 * 16000
    assoc = RawAssociation(daemon.dicom_port)
    our_port = assoc.sock.getsockname()[1]
    assert assoc.send_store(big.SOPInstanceUID, data, stop_before_last=True) is None
    if how == "A-ABORT":
        assoc.abort()
    else:
        assoc.sock.close()
    # Look once the daemon has dropped the connection, i.e. has handled the abort.
    wait_until(lambda: our_port not in _connections(daemon), message="the daemon to drop the connection")
    assert daemon.process.poll() is None
    assert not stored_path(daemon, big).exists()
    assert files_under(daemon.node_dir / "tmp") == set()
    assert image_uids(daemon, StudyInstanceUID=big.StudyInstanceUID) == {earlier.SOPInstanceUID}
    assert daemon.counts()["instances"] == 1
    # The same instance sent whole afterwards is stored: nothing of the broken one lingers.
    assert daemon.store(big) == [SUCCESS]
    assert split_file(stored_path(daemon, big))[1] == data
    assert image_uids(daemon, StudyInstanceUID=big.StudyInstanceUID) == {earlier.SOPInstanceUID, big.SOPInstanceUID}


def _connections(daemon) -> set:
    """Remote ports of the daemon's established connections to its DICOM port (from /proc)."""
    ports = set()
    with open(f"/proc/{daemon.process.pid}/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == daemon.dicom_port and fields[3] == "01":  # ESTABLISHED
                ports.add(int(fields[2].split(":")[1], 16))
    return ports


def _ingest_in_background(daemon, paths):
    """Store paths one by one in a thread; returns (thread, acknowledged SOPInstanceUIDs)."""
    acknowledged = []
    uids = {path: header(path).SOPInstanceUID for path in paths}

    def send():
        assoc = associate(daemon, [(CTImageStorage, EXPLICIT_VR_LITTLE_ENDIAN)])
        try:
            for path in paths:
                if not assoc.is_established:
                    return
                status = assoc.send_c_store(path)
                if "Status" not in status or status.Status != SUCCESS:
                    return
                acknowledged.append(uids[path])
        finally:
            if assoc.is_established:
                assoc.release()

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, acknowledged


def _check_archive(daemon) -> subprocess.CompletedProcess:
    """`dicoogled check`: does the index agree with the files in storage?"""
    return subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "check", "--data-dir", str(daemon.data_dir),
                           *daemon.index_args],
                          capture_output=True, text=True, timeout=120)


def test_kill_9_during_ingest_loses_no_acknowledged_instance(daemon, studies):
    paths = studies(patients=1, studies=1, series=5, instances=100)
    study_uid = header(paths[0]).StudyInstanceUID
    thread, acknowledged = _ingest_in_background(daemon, paths)
    wait_until(lambda: len(acknowledged) >= 150, timeout=120, message="150 acknowledged stores")
    daemon.kill()
    thread.join(60)
    assert not thread.is_alive()
    survivors = list(acknowledged)
    assert 150 <= len(survivors) < len(paths), "the kill did not land mid-ingest"

    daemon.start()
    # Found at once, before any startup reconciliation could have helped.
    assert set(survivors) <= image_uids(daemon, StudyInstanceUID=study_uid)
    daemon.settled()
    found = image_uids(daemon, StudyInstanceUID=study_uid)
    assert set(survivors) <= found
    assert len(found) <= len(survivors) + 1  # at most the one in flight, stored but never acknowledged
    assert daemon.stop() == 0
    check = _check_archive(daemon)
    assert check.returncode == 0, check.stdout + check.stderr


def test_sigterm_during_ingest_stops_cleanly(daemon, studies):
    paths = studies(patients=1, studies=1, series=5, instances=100)
    study_uid = header(paths[0]).StudyInstanceUID
    thread, acknowledged = _ingest_in_background(daemon, paths)
    wait_until(lambda: len(acknowledged) >= 100, timeout=120, message="100 acknowledged stores")
    assert daemon.stop() == 0
    thread.join(60)
    assert not thread.is_alive()
    survivors = list(acknowledged)
    assert len(survivors) < len(paths), "the stop did not land mid-ingest"
    assert files_under(daemon.node_dir / "tmp") == set()
    assert "INFO dicoogled: stopped" in daemon.log
    check = _check_archive(daemon)
    assert check.returncode == 0, check.stdout + check.stderr

    daemon.start()
    found = image_uids(daemon, StudyInstanceUID=study_uid)
    assert set(survivors) <= found
    assert len(found) <= len(survivors) + 1


def test_sigterm_with_a_transfer_stalled_half_way(daemon):
    earlier = studygen.make_instance(0, 0, 0, 0)
    assert daemon.store(earlier) == [SUCCESS]
    big = studygen.make_instance(0, 0, 0, 1, size=512)
    assoc = RawAssociation(daemon.dicom_port)
    assert assoc.send_store(big.SOPInstanceUID, encode(big), stop_before_last=True) is None
    # The sender went quiet mid-data-set: a service manager's SIGTERM must still stop the
    # daemon at once (not after the 120 s network timeout), with exit code 0.
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 15
    assoc.sock.close()
    assert not stored_path(daemon, big).exists()
    daemon.start()
    assert image_uids(daemon, StudyInstanceUID=earlier.StudyInstanceUID) == {earlier.SOPInstanceUID}


# ---- association negotiation ---------------------------------------------------------------


def _echo(daemon, called=AET, calling="TESTSCU"):
    """C-ECHO; returns 'success' or the A-ASSOCIATE-RJ (result, source, reason)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title=called)
    if assoc.is_established:
        status = assoc.send_c_echo().Status
        assoc.release()
        return "success" if status == SUCCESS else f"{status:#06x}"
    rejected = rejection_of(assoc)
    assert rejected, "neither accepted nor rejected"
    return rejected


REJECTED_CALLED_AET = (0x01, 0x01, 0x07)  # permanent, service user, called AE title not recognised
REJECTED_CALLING_AET = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised


def test_wrong_called_aet_is_accepted_with_a_warning(daemon):
    assert _echo(daemon, called="WORKSTATION1") == "success"
    ds = studygen.make_instance(0, 0, 0, 0)
    assert daemon.store(ds, aet="WORKSTATION1") == [SUCCESS]
    assert stored_path(daemon, ds).is_file()
    warning = "TESTSCU called us as 'WORKSTATION1', but our AE title is 'DICOOGLED'"
    assert warning in daemon.log
    subprocess.run(["echoscu", "-aet", "DCMTK", "-aec", "OTHERNAME", "127.0.0.1", str(daemon.dicom_port)], check=True, timeout=60)
    wait_until(lambda: "DCMTK called us as 'OTHERNAME', but our AE title is 'DICOOGLED'" in daemon.log)


def test_strict_called_aet_refuses_a_wrong_one(start_daemon):
    daemon = start_daemon(config_text="[dicom]\nstrict_called_aet = true\n")
    assert _echo(daemon, called="WORKSTATION1") == REJECTED_CALLED_AET
    assert _echo(daemon) == "success"
    result = daemon.dcmtk("echoscu", "-aec", "WORKSTATION1", check=False)
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr
    # The log tells the administrator what happened and what the right title is.
    refusal = re.compile(r"refused an association from TESTSCU at 127\.0\.0\.1:\d+: called AE title not recognized:"
                         r" it called us 'WORKSTATION1', but our AE title is 'DICOOGLED'")
    wait_until(lambda: refusal.search(daemon.log), message="a log line about the refusal")
    assert "accepted anyway" not in daemon.log


def test_allowed_calling_aets_refuse_everyone_else(start_daemon):
    daemon = start_daemon(config_text="[dicom]\nallowed_calling_aets = CT01 WORKSTATION\n")
    assert _echo(daemon, calling="CT01") == "success"
    assert _echo(daemon, calling="WORKSTATION") == "success"
    assert _echo(daemon, calling="INTRUDER") == REJECTED_CALLING_AET
    # A refused caller that also used a wrong called AE title is refused, not "accepted anyway".
    assert _echo(daemon, called="ELSEWHERE", calling="INTRUDER") == REJECTED_CALLING_AET
    refusal = re.compile(r"refused an association from INTRUDER at 127\.0\.0\.1:\d+: calling AE title not recognized:"
                         r" not in allowed_calling_aets")
    wait_until(lambda: len(refusal.findall(daemon.log)) == 2, message="a log line naming the refused caller")
    assert "accepted anyway" not in daemon.log
    ds = studygen.make_instance(0, 0, 0, 0)
    assoc = associate(daemon, [(CTImageStorage, EXPLICIT_VR_LITTLE_ENDIAN)], calling="INTRUDER")
    assert rejection_of(assoc) == REJECTED_CALLING_AET
    assert daemon.counts()["instances"] == 0
    assert not stored_path(daemon, ds).exists()


# ---- TCP_NODELAY ---------------------------------------------------------------------------

SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture


def _peer_socket_option(pid: int, local_port: int, peer_port: int, level: int, option: int) -> int:
    """getsockopt() on another process's TCP socket, through a pidfd_getfd() copy of it.

    Raises OSError when the kernel does not allow it (no pidfd, or not permitted).
    """
    inode = None
    with open(f"/proc/{pid}/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            local, remote = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
            if (local, remote) == (local_port, peer_port):
                inode = fields[9]
    assert inode, "the daemon has no socket for this connection"
    fds = [name for name in os.listdir(f"/proc/{pid}/fd") if os.readlink(f"/proc/{pid}/fd/{name}") == f"socket:[{inode}]"]
    assert fds, "no descriptor of the daemon holds the connection"
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(fds[0]), 0)
        if fd < 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
    finally:
        os.close(pidfd)
    copy = socket.socket(fileno=fd)
    try:
        return copy.getsockopt(level, option)
    finally:
        copy.close()  # closes our copy only; the daemon's descriptor stays open


def test_accepted_sockets_have_tcp_nodelay(daemon):
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title=AET)
    assert assoc.is_established
    try:
        our_port = assoc.dul.socket.socket.getsockname()[1]
        try:
            nodelay = _peer_socket_option(daemon.process.pid, daemon.dicom_port, our_port, socket.IPPROTO_TCP, socket.TCP_NODELAY)
        except (OSError, AttributeError) as error:  # AttributeError: os.pidfd_open needs Linux 5.3+
            pytest.skip(f"cannot observe the daemon's socket options here: {error}")
        assert nodelay, "TCP_NODELAY is not set on the accepted socket"
        assert assoc.send_c_echo().Status == SUCCESS  # our look did not disturb the association
    finally:
        assoc.release()
