"""The association engine's life cycle against hostile and careless peers: raw sockets that stay
silent, trickle, abort, drop or overflow; a peer that never reads; many DCMTK peers at once.

The daemon must free an association's slot the moment its socket is gone, refuse what breaks the
protocol with an A-ABORT and a log line, and keep serving everyone else.
"""

import json
import pathlib
import socket
import struct
import subprocess
import textwrap
import threading
import time

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    CTImageStorage, ModalityPerformedProcedureStep as MPPS, StudyRootQueryRetrieveInformationModelFind, Verification,
)

import studygen
from conftest import AET, NODELAY, make_identifier, rejection_of, wait_until

SUCCESS = 0x0000
PENDING = 0xFF00
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
A_ASSOCIATE_AC, P_DATA_TF, A_RELEASE_RP, A_ABORT = 0x02, 0x04, 0x06, 0x07
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)  # transient, presentation provider, local limit exceeded
#: Short timeouts, so that a test of a timeout takes seconds; one association at a time, so that
#: an echo succeeding proves the slot of whatever came before is free.
ONE_SLOT = "[dicom]\nmax_associations = 1\nassociation_request_timeout = 2\nnetwork_timeout = 3\nmax_pdu = 16384\n"


# ---- a peer that builds its PDUs by hand (PS3.8 9.3) ---------------------------------------


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def _uid(uid: str) -> bytes:
    return uid.encode() + (b"\0" if len(uid) % 2 else b"")


def associate_rq(sop_class=CTImageStorage, transfer_syntax=EXPLICIT_VR_LITTLE_ENDIAN, calling="RAWSCU", max_pdu=16384) -> bytes:
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, _uid(sop_class)) + _item(0x40, _uid(transfer_syntax)))
    user_information = _item(0x50, _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, _uid("1.2.826.0.1.3680043.9.7433.1")))
    body = struct.pack(">HH", 1, 0) + AET.ljust(16).encode() + calling.ljust(16).encode() + bytes(32)
    body += _item(0x10, _uid("1.2.840.10008.3.1.1.1")) + context + user_information
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def p_data(data: bytes, command: bool, last: bool, context_id=1) -> bytes:
    pdv = struct.pack(">IBB", len(data) + 2, context_id, (1 if command else 0) | (2 if last else 0)) + data
    return struct.pack(">BBI", P_DATA_TF, 0, len(pdv)) + pdv


def abort_pdu() -> bytes:
    return struct.pack(">BBIBBBB", A_ABORT, 0, 4, 0, 0, 0, 0)


def release_rq() -> bytes:
    return struct.pack(">BBII", 0x05, 0, 4, 0)


def encode(ds: Dataset, implicit=False) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def command_set(**elements) -> bytes:
    command = Dataset()
    for keyword, value in elements.items():
        setattr(command, keyword, value)
    body = encode(command, implicit=True)
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body  # (0000,0000) group length first


def find_request(identifier: Dataset, message_id=1) -> bytes:
    """A whole C-FIND-RQ (Study Root), command and identifier, as P-DATA-TF PDUs."""
    command = command_set(AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelFind, CommandField=0x0020,
                          MessageID=message_id, Priority=0, CommandDataSetType=0x0000)
    return p_data(command, command=True, last=True) + p_data(encode(identifier), command=False, last=True)


def store_command(ds: Dataset, message_id=1) -> bytes:
    return command_set(AffectedSOPClassUID=ds.SOPClassUID, CommandField=0x0001, MessageID=message_id, Priority=0,
                       CommandDataSetType=0x0000, AffectedSOPInstanceUID=ds.SOPInstanceUID)


class RawPeer:
    """A TCP connection to the daemon that speaks PDUs only when told to."""

    def __init__(self, port: int, receive_buffer: int | None = None):
        self.sock = socket.socket()
        if receive_buffer:  # before connect(), so the window the daemon sees is small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(30)
        self.sock.connect(("127.0.0.1", port))

    def send(self, data: bytes, chunk: int | None = None):
        if not chunk:
            return self.sock.sendall(data)
        for start in range(0, len(data), chunk):  # each piece its own TCP segment (TCP_NODELAY)
            self.sock.sendall(data[start:start + chunk])

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            piece = self.sock.recv(size - len(data))
            if not piece:
                raise ConnectionError("the daemon closed the connection")
            data += piece
        return data

    def read_pdu(self) -> tuple[int, bytes]:
        kind, _, length = struct.unpack(">BBI", self._read(6))
        return kind, self._read(length)

    def associate(self, chunk=None, **kwargs):
        self.send(associate_rq(**kwargs), chunk)
        kind, _ = self.read_pdu()
        assert kind == A_ASSOCIATE_AC, f"association not accepted (PDU type {kind:#x})"
        return self

    def closed_by_daemon(self) -> bool:
        """True once the daemon has closed its end (reads until end of file, skipping PDUs)."""
        try:
            while self.sock.recv(65536):
                pass
            return True
        except TimeoutError:
            return False
        except OSError:  # reset
            return True

    def drop(self):
        """Vanish without a FIN: a reset, as a crashed peer or a cut cable (SO_LINGER 0)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self):
        self.sock.close()


def echo(daemon, calling="TESTSCU"):
    """C-ECHO with pynetdicom: the status, or the (result, source, reason) of a rejection."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title=AET, evt_handlers=NODELAY)
    if not assoc.is_established:
        rejected = rejection_of(assoc)
        assert rejected, "neither accepted nor rejected (aborted or reset)"
        return rejected
    try:
        return assoc.send_c_echo().Status
    finally:
        assoc.release()


def slot_free(daemon) -> bool:
    """With max_associations = 1: True once a new association is accepted."""
    return echo(daemon) == SUCCESS


@pytest.fixture
def one_slot(start_daemon):
    return start_daemon(config_text=ONE_SLOT)


# ---- before the association: silent, closing and trickling peers ---------------------------


def test_silent_connections_hold_no_slot_and_are_closed(one_slot):
    silent = [RawPeer(one_slot.dicom_port) for _ in range(3)]
    # Three silent sockets, one slot: it is still free for a peer that speaks.
    assert echo(one_slot) == SUCCESS
    started = time.monotonic()
    for peer in silent:
        assert peer.closed_by_daemon()  # at association_request_timeout (2 s), not when the peer gives up
        peer.close()
    assert time.monotonic() - started < 15
    wait_until(lambda: "no A-ASSOCIATE-RQ within 2 s" in one_slot.log, message="a log line about the silent socket")


def proc_status(pid: int, field: str) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def test_silent_connections_cost_no_thread(start_daemon):
    """A flood of connections that say nothing waits in the listener's waiting room: each
    costs a socket there, no thread, and a peer that speaks is served meanwhile."""
    daemon = start_daemon(config_text="[dicom]\nassociation_request_timeout = 60\n")
    pid = daemon.process.pid
    assert echo(daemon) == SUCCESS  # the threads an association needs have been made once
    threads = proc_status(pid, "Threads")
    silent = [RawPeer(daemon.dicom_port) for _ in range(200)]
    try:
        wait_until(lambda: daemon.health()["dicom"]["waiting"] == 200, message="the daemon to accept them all")
        assert proc_status(pid, "Threads") < threads + 5
        assert echo(daemon) == SUCCESS
    finally:
        for peer in silent:
            peer.close()
    wait_until(lambda: daemon.health()["dicom"] == {"associations": 0, "waiting": 0}, message="the waiting room to empty")


def test_a_request_trickled_past_the_timeout_is_dropped(one_slot):
    peer = RawPeer(one_slot.dicom_port)
    request = associate_rq()
    started = time.monotonic()
    try:
        for byte in request[:-1]:  # a byte every 0.1 s: the whole request would take many seconds
            peer.send(bytes([byte]))
            time.sleep(0.1)  # the trickle itself is the hostile behaviour under test
    except OSError:
        pass  # the daemon closed the connection while we trickled: what we want
    assert peer.closed_by_daemon()
    assert time.monotonic() - started < 15
    peer.close()
    assert echo(one_slot) == SUCCESS


def test_connections_closed_before_the_request_free_everything(one_slot):
    for _ in range(20):
        RawPeer(one_slot.dicom_port).close()
    for _ in range(5):
        RawPeer(one_slot.dicom_port).drop()
    assert echo(one_slot) == SUCCESS
    assert one_slot.health()["status"] == "ok"


# ---- A-ABORT and dropped connections, in every phase -----------------------------------------


def test_abort_right_after_the_request(one_slot):
    peer = RawPeer(one_slot.dicom_port)
    peer.send(associate_rq() + abort_pdu())
    assert peer.closed_by_daemon()
    peer.close()
    assert wait_until(lambda: slot_free(one_slot), message="the slot to be free")


def test_abort_on_an_idle_association(one_slot):
    peer = RawPeer(one_slot.dicom_port).associate()
    assert echo(one_slot) == LOCAL_LIMIT_EXCEEDED  # the slot is taken while it lives
    peer.send(abort_pdu())
    assert peer.closed_by_daemon()
    peer.close()
    assert wait_until(lambda: slot_free(one_slot), message="the slot to be free")


@pytest.mark.parametrize("ending", ["abort", "drop"])
def test_abort_or_drop_in_the_middle_of_a_store_stores_nothing(one_slot, ending):
    ds = studygen.make_instance(0, 0, 0, 0)
    data = encode(ds)
    peer = RawPeer(one_slot.dicom_port).associate()
    peer.send(p_data(store_command(ds), command=True, last=True))
    peer.send(p_data(data[:4000], command=False, last=False))
    pdu = p_data(data[4000:], command=False, last=True)
    peer.send(pdu[:len(pdu) // 2])  # half a PDU: the rest never comes
    if ending == "abort":
        peer.send(abort_pdu())  # an A-ABORT cannot interrupt a PDU: to the daemon it is more garbage
        peer.close()
    else:
        peer.drop()
    assert wait_until(lambda: slot_free(one_slot), message="the slot to be free")
    assert one_slot.counts()["instances"] == 0


def test_abort_between_find_responses(start_daemon, studies):
    daemon = start_daemon(config_text=ONE_SLOT)
    paths = studies(patients=1, studies=1, series=1, instances=40)
    assert daemon.store(*paths) == [SUCCESS] * 40
    study_uid = pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    peer = RawPeer(daemon.dicom_port).associate(sop_class=StudyRootQueryRetrieveInformationModelFind)
    identifier = make_identifier("IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID="", SOPInstanceUID="")
    peer.send(find_request(identifier))
    assert read_response(peer).Status == PENDING  # the first of 40
    peer.send(abort_pdu())
    assert peer.closed_by_daemon()
    peer.close()
    assert wait_until(lambda: slot_free(daemon), message="the slot to be free")


def test_release_is_answered_and_frees_the_slot(one_slot):
    peer = RawPeer(one_slot.dicom_port).associate()
    peer.send(release_rq())
    assert peer.read_pdu()[0] == A_RELEASE_RP
    assert peer.closed_by_daemon()
    peer.close()
    assert echo(one_slot) == SUCCESS


# ---- PDUs too big, in pieces, or out of order --------------------------------------------------


def test_a_pdu_larger_than_max_pdu_is_aborted_and_logged(one_slot):
    peer = RawPeer(one_slot.dicom_port).associate()
    peer.send(struct.pack(">BBI", P_DATA_TF, 0, 1_000_000) + bytes(1000))  # announces 1 MB; max_pdu is 16 KiB
    assert peer.read_pdu()[0] == A_ABORT
    assert peer.closed_by_daemon()
    peer.close()
    wait_until(lambda: "a PDU of 1000000 bytes, more than our maximum of 16384" in one_slot.log,
               message="a log line about the oversized PDU")
    assert echo(one_slot) == SUCCESS


def test_data_before_a_command_is_aborted(one_slot):
    peer = RawPeer(one_slot.dicom_port).associate()
    peer.send(p_data(b"\x08\x00\x16\x00\x02\x00\x00\x00AB", command=False, last=True))
    assert peer.read_pdu()[0] == A_ABORT
    peer.close()
    assert echo(one_slot) == SUCCESS


def test_pdus_sent_a_few_bytes_at_a_time_are_reassembled(one_slot):
    ds = studygen.make_instance(0, 0, 0, 0)
    data = encode(ds)
    peer = RawPeer(one_slot.dicom_port).associate(chunk=7)
    # The data set in three P-DATA-TF PDUs, each written a few bytes at a time.
    pieces = [data[:3000], data[3000:6000], data[6000:]]
    message = p_data(store_command(ds), command=True, last=True)
    message += b"".join(p_data(piece, command=False, last=n == len(pieces) - 1) for n, piece in enumerate(pieces))
    peer.send(message[:600], chunk=5)
    peer.send(message[600:], chunk=997)
    assert read_response(peer).Status == SUCCESS
    peer.send(release_rq())
    assert peer.read_pdu()[0] == A_RELEASE_RP
    peer.close()
    assert one_slot.counts()["instances"] == 1


def read_response(peer: RawPeer, max_pdu: int | None = None) -> Dataset:
    """The command set of the next DIMSE message, reassembled from its PDUs (each checked
    against max_pdu); its data set fragments are skipped."""
    command = b""
    while True:
        kind, pdu = peer.read_pdu()
        assert kind == P_DATA_TF, f"PDU type {kind:#x} instead of P-DATA-TF"
        assert max_pdu is None or len(pdu) <= max_pdu, f"a PDU of {len(pdu)} bytes; the peer accepts {max_pdu}"
        control = pdu[5]
        if control & 1:
            command += pdu[6:]
            if control & 2:
                return read_dataset(DicomBytesIO(command), True, True)


def test_our_sends_respect_the_peers_max_pdu(start_daemon, studies):
    daemon = start_daemon(config_text=ONE_SLOT)
    paths = studies(patients=1, studies=1, series=1, instances=3)
    assert daemon.store(*paths) == [SUCCESS] * 3
    study_uid = pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    peer = RawPeer(daemon.dicom_port).associate(sop_class=StudyRootQueryRetrieveInformationModelFind, max_pdu=64)
    identifier = make_identifier("IMAGE", StudyInstanceUID=study_uid, SOPInstanceUID="", SOPClassUID="", InstanceNumber="")
    peer.send(find_request(identifier))
    statuses = []
    while not statuses or statuses[-1] == PENDING:
        statuses.append(read_response(peer, max_pdu=64).Status)
    assert statuses == [PENDING] * 3 + [SUCCESS]
    peer.close()


# ---- a peer that never reads ----------------------------------------------------------------


def test_a_peer_that_never_reads_does_not_pin_the_association(start_daemon, studies):
    daemon = start_daemon(config_text=ONE_SLOT)
    paths = studies(patients=1, studies=1, series=1, instances=2)
    assert daemon.store(*paths) == [SUCCESS] * 2
    study_uid = pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    # C-FIND after C-FIND, never reading a response: they fill the socket buffers both ways.
    peer = RawPeer(daemon.dicom_port, receive_buffer=4096).associate(sop_class=StudyRootQueryRetrieveInformationModelFind)
    request = find_request(make_identifier("IMAGE", StudyInstanceUID=study_uid, SOPInstanceUID="",
                                           StudyDescription="", SeriesDescription=""))
    # Until the daemon resets the connection: it reads requests while it can answer them, then
    # blocks writing to us, gives up after network_timeout (3 s) and aborts. A daemon that stays
    # blocked stops reading too: our send then times out instead.
    peer.sock.settimeout(15)
    started = time.monotonic()
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        while time.monotonic() - started < 120:
            peer.sock.sendall(request * 50)
    assert wait_until(lambda: slot_free(daemon), message="the slot to be free")
    wait_until(lambda: "read nothing for 3 s" in daemon.log, message="a log line about the peer that never reads")
    peer.drop()
    results, status = daemon.find(make_identifier("STUDY", StudyInstanceUID=study_uid))
    assert status == SUCCESS and len(results) == 1


# ---- limits and refusals ------------------------------------------------------------------------


def test_max_associations_refuses_with_local_limit_exceeded_and_logs_it(one_slot):
    peer = RawPeer(one_slot.dicom_port).associate(calling="HOLDER")
    try:
        assert echo(one_slot, calling="LATECOMER") == LOCAL_LIMIT_EXCEEDED
        wait_until(lambda: "refused an association from LATECOMER at 127.0.0.1:" in one_slot.log
                   and "local limit exceeded: max_associations = 1" in one_slot.log, message="the refusal in the log")
    finally:
        peer.close()
    assert wait_until(lambda: slot_free(one_slot), message="the slot to be free")


# ---- many peers at once -----------------------------------------------------------------------

RECORDER = '''
    """Writes each stored instance's UID to a file, one JSON line each."""
    import json

    SETTINGS = {"enabled": True, "file": ""}

    def on_stored(instance):
        with open(dicoogle.setting("file"), "a") as handle:
            handle.write(json.dumps({"uid": instance["SOPInstanceUID"], "aet": instance["calling_aet"]}) + "\\n")
'''


def test_many_storescu_at_once_store_everything_once(start_daemon, studies, tmp_path):
    plugins, events = tmp_path / "plugins", tmp_path / "events.jsonl"
    plugins.mkdir()
    (plugins / "recorder.py").write_text(textwrap.dedent(RECORDER))
    daemon = start_daemon(config_text=f"[plugin.recorder]\nfile = {events}\n", args=["--plugins-dir", str(plugins)])
    peers = 8
    batches = [studies(out=f"peer{n}", patients=1, studies=1, series=1, instances=12, seed=n + 1) for n in range(peers)]
    processes = [subprocess.Popen(["storescu", "-aet", f"SCU{n}", "-aec", AET, "127.0.0.1", str(daemon.dicom_port),
                                   *map(str, paths)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for n, paths in enumerate(batches)]
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output
    expected = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID): f"SCU{n}"
                for n, paths in enumerate(batches) for path in paths}
    assert daemon.counts()["instances"] == len(expected)
    assert daemon.counts()["studies"] == peers  # a seed of its own for each peer: its own UIDs
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert sorted(line["uid"] for line in lines) == sorted(expected), "each instance stored once, each event once"
    assert {line["uid"]: line["aet"] for line in lines} == expected
    assert echo(daemon) == SUCCESS


def test_concurrent_finds_and_stores_do_not_block_each_other(start_daemon, studies):
    daemon = start_daemon()
    paths = studies(patients=2, studies=1, series=1, instances=5)
    assert daemon.store(*paths) == [SUCCESS] * 10
    errors = []

    def find_many():
        try:
            for _ in range(10):
                results, status = daemon.find(make_identifier("STUDY", StudyInstanceUID=""))
                assert status == SUCCESS and len(results) == 2
        except Exception as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=find_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors


# ---- the supported pynetdicom releases ----------------------------------------------------------


def test_another_pynetdicom_release_is_refused_at_start():
    import dicoogled
    dicoogled.check_pynetdicom_version("3.0.4")
    for version in ("2.1.1", "3.0.0", "3.1.0", "4.0.0"):
        with pytest.raises(RuntimeError, match="association engine supports 3.0.1 up to"):
            dicoogled.check_pynetdicom_version(version)


# ---- the command sets the engine writes are pynetdicom's ------------------------------------

def _pynetdicom_bytes(message_class, primitive, context_id: int, max_pdu: int) -> bytes:
    """The P-DATA-TF PDUs pynetdicom's own encoder makes of a primitive, as on the wire."""
    from pynetdicom.pdu import P_DATA_TF

    message = message_class()
    message.primitive_to_message(primitive)
    wire = b""
    for pdata in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(pdata)
        wire += pdu.encode()
    return wire


def _engine_bytes(message_class, primitive, context_id: int, max_pdu: int) -> bytes:
    """What the engine's Association writes to its socket for the same primitive."""
    import logging

    import dicoogled

    ours, theirs = socket.socketpair()
    with ours, theirs:
        association = dicoogled.Association(ours, ("127.0.0.1", 0), max_receive=0, max_send_limit=max_pdu,
                                            timeout=5, log=logging.getLogger("test"))
        association.send_message(message_class, primitive, context_id)
        ours.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := theirs.recv(1 << 20):
            received += chunk
        return received


def _primitives():
    """One primitive of every message the engine sends, with optional fields present and absent,
    odd and even value lengths."""
    from pynetdicom.dimse_messages import (
        C_ECHO_RQ, C_ECHO_RSP, C_FIND_RSP, C_GET_RSP, C_MOVE_RSP, C_STORE_RQ, C_STORE_RSP, N_ACTION_RSP, N_CREATE_RSP,
        N_EVENT_REPORT_RQ, N_SET_RSP,
    )
    from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE, N_ACTION, N_CREATE, N_EVENT_REPORT, N_SET
    import io

    def make(kind, **fields):
        return kind, fields

    identifier = Dataset()
    identifier.PatientName, identifier.StudyInstanceUID = "DOE^J", "1.2.3.4"
    encoded = io.BytesIO(encode(identifier, implicit=True))
    odd_uid, even_uid = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.22"
    return [
        (C_ECHO_RQ, make(C_ECHO, MessageID=1, AffectedSOPClassUID=Verification)),
        (C_ECHO_RSP, make(C_ECHO, MessageIDBeingRespondedTo=7, AffectedSOPClassUID=Verification, Status=0)),
        (C_STORE_RQ, make(C_STORE, MessageID=65535, AffectedSOPClassUID=odd_uid, AffectedSOPInstanceUID="1.2.3",
                          Priority=0, DataSet=io.BytesIO(b"\x08\x00\x18\x00\x06\x00" + b"1.2.3\0" + bytes(3000)))),
        (C_STORE_RQ, make(C_STORE, MessageID=2, AffectedSOPClassUID=even_uid, AffectedSOPInstanceUID="1.2.34",
                          Priority=2, MoveOriginatorApplicationEntityTitle="MOVESCU",
                          MoveOriginatorMessageID=9, DataSet=io.BytesIO(bytes(10)))),
        (C_STORE_RSP, make(C_STORE, MessageIDBeingRespondedTo=3, AffectedSOPClassUID=odd_uid,
                           AffectedSOPInstanceUID="1.2.3", Status=0)),
        (C_STORE_RSP, make(C_STORE, MessageIDBeingRespondedTo=3, AffectedSOPClassUID=even_uid,
                           AffectedSOPInstanceUID="1.2.34", Status=0xA700, ErrorComment="out of resources")),
        (C_STORE_RSP, make(C_STORE, MessageIDBeingRespondedTo=3, AffectedSOPClassUID=even_uid,
                           AffectedSOPInstanceUID="1.2.34", Status=0xC000, ErrorComment="odd")),
        (C_FIND_RSP, make(C_FIND, MessageIDBeingRespondedTo=4, AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelFind,
                          Status=0xFF00, Identifier=encoded)),
        (C_FIND_RSP, make(C_FIND, MessageIDBeingRespondedTo=4, AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelFind,
                          Status=0)),
        (C_MOVE_RSP, make(C_MOVE, MessageIDBeingRespondedTo=5, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.2.2.2",
                          Status=0xFF00, NumberOfRemainingSuboperations=49, NumberOfCompletedSuboperations=1,
                          NumberOfFailedSuboperations=0, NumberOfWarningSuboperations=0)),
        (C_GET_RSP, make(C_GET, MessageIDBeingRespondedTo=6, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.2.2.3",
                         Status=0xB000, NumberOfCompletedSuboperations=40, NumberOfFailedSuboperations=10,
                         NumberOfWarningSuboperations=0, Identifier=encoded)),
        (N_ACTION_RSP, make(N_ACTION, MessageIDBeingRespondedTo=8, AffectedSOPClassUID="1.2.840.10008.1.20.1",
                            AffectedSOPInstanceUID="1.2.840.10008.1.20.1.1", ActionTypeID=1, Status=0)),
        (N_ACTION_RSP, make(N_ACTION, MessageIDBeingRespondedTo=8, AffectedSOPClassUID="1.2.840.10008.1.20.1",
                            AffectedSOPInstanceUID="1.2.840.10008.1.20.1.1", Status=0x0123, ErrorComment="odd")),
        (N_EVENT_REPORT_RQ, make(N_EVENT_REPORT, MessageID=9, AffectedSOPClassUID="1.2.840.10008.1.20.1",
                                 AffectedSOPInstanceUID="1.2.840.10008.1.20.1.1", EventTypeID=2,
                                 EventInformation=encoded)),
        (N_CREATE_RSP, make(N_CREATE, MessageIDBeingRespondedTo=8, AffectedSOPClassUID=MPPS,
                            AffectedSOPInstanceUID="1.2.3.4", Status=0)),
        (N_CREATE_RSP, make(N_CREATE, MessageIDBeingRespondedTo=8, AffectedSOPClassUID=MPPS,
                            AffectedSOPInstanceUID="1.2.3", Status=0x0111, ErrorComment="exists")),
        (N_SET_RSP, make(N_SET, MessageIDBeingRespondedTo=9, AffectedSOPClassUID=MPPS,
                         AffectedSOPInstanceUID="1.2.3.4", Status=0x0112, ErrorComment="no such step")),
    ]


@pytest.mark.parametrize("max_pdu", [0, 16384, 64])
def test_messages_are_written_as_pynetdicom_encodes_them(max_pdu):
    """The engine writes command sets itself (pynetdicom's way costs most of a small message); on
    the wire each message, command and data set, fragmented to the peer's maximum PDU, is PDV
    for PDV what pynetdicom's encoder makes of the same primitive. The engine packs them into as
    few PDUs as the maximum allows (pynetdicom gives each fragment its own): a small message is
    one PDU."""
    import dicoogled

    for message_class, (kind, fields) in _primitives():
        primitive = kind()
        for name, value in fields.items():
            setattr(primitive, name, value)
        expected = [_pdv_items(pdu) for pdu in _pdus(_pynetdicom_bytes(message_class, primitive, 3, max_pdu))]
        for stream in ("DataSet", "Identifier", "AttributeList"):  # pynetdicom's encoder read them
            if stream in fields:
                fields[stream].seek(0)
        # What the engine sends is built as DimseFields; a pynetdicom primitive must give the same.
        for sent in (_engine_bytes(message_class, dicoogled.DimseFields(**fields), 3, max_pdu),
                     _engine_bytes(message_class, primitive, 3, max_pdu)):
            pdus = [_pdv_items(pdu) for pdu in _pdus(sent)]
            assert [item for pdu in pdus for item in pdu] == [item for pdu in expected for item in pdu], message_class.__name__
            sizes = [sum(5 + len(fragment) for _, fragment in pdu) for pdu in pdus]
            if max_pdu:
                assert max(sizes) <= max_pdu
                # Packed: no two neighbouring PDUs could have been one.
                assert all(a + b > max_pdu for a, b in zip(sizes, sizes[1:])), (message_class.__name__, sizes)
            else:
                assert len(pdus) == 1
            # And pynetdicom, as a peer, reads the packed PDUs back as the message.
            from pynetdicom.dimse_messages import DIMSEMessage
            from pynetdicom.pdu_primitives import P_DATA

            decoded, done = DIMSEMessage(), False
            for pdu in _pdus(sent):
                pdata = P_DATA()
                pdata.presentation_data_value_list = _pdv_items(pdu)
                done = decoded.decode_msg(pdata)
            assert done and type(decoded) is message_class, message_class.__name__


def _requests():
    """The requests a peer sends the engine, with optional fields present and absent."""
    import io

    from pynetdicom.dimse_messages import (C_CANCEL_RQ, C_FIND_RQ, C_GET_RQ, C_MOVE_RQ, C_STORE_RQ, N_ACTION_RQ,
                                           N_CREATE_RQ, N_EVENT_REPORT_RSP, N_SET_RQ)
    from pynetdicom.dimse_primitives import C_CANCEL, C_FIND, C_GET, C_MOVE, C_STORE, N_ACTION, N_CREATE, N_EVENT_REPORT, N_SET

    identifier = io.BytesIO(encode(make_identifier("STUDY", PatientName="DOE*"), implicit=True))
    move = "1.2.840.10008.5.1.4.1.2.2.2"
    return [
        (C_FIND_RQ, (C_FIND, dict(MessageID=11, AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelFind,
                                  Priority=1, Identifier=identifier))),
        (C_MOVE_RQ, (C_MOVE, dict(MessageID=12, AffectedSOPClassUID=move, Priority=0, MoveDestination=" DEST",
                                  Identifier=io.BytesIO(identifier.getvalue())))),
        (C_GET_RQ, (C_GET, dict(MessageID=13, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.2.2.3", Priority=2,
                                Identifier=io.BytesIO(identifier.getvalue())))),
        (C_CANCEL_RQ, (C_CANCEL, dict(MessageIDBeingRespondedTo=12))),
        (C_STORE_RQ, (C_STORE, dict(MessageID=14, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.2",
                                    AffectedSOPInstanceUID="1.2.3.45", Priority=0,
                                    MoveOriginatorApplicationEntityTitle="MOVER", MoveOriginatorMessageID=12,
                                    DataSet=io.BytesIO(bytes(40000))))),
        (N_ACTION_RQ, (N_ACTION, dict(MessageID=15, RequestedSOPClassUID="1.2.840.10008.1.20.1",
                                      RequestedSOPInstanceUID="1.2.840.10008.1.20.1.1", ActionTypeID=1,
                                      ActionInformation=io.BytesIO(identifier.getvalue())))),
        (N_EVENT_REPORT_RSP, (N_EVENT_REPORT, dict(MessageIDBeingRespondedTo=16, AffectedSOPClassUID="1.2.840.10008.1.20.1",
                                                   AffectedSOPInstanceUID="1.2.840.10008.1.20.1.1", EventTypeID=1,
                                                   Status=0))),
        (N_CREATE_RQ, (N_CREATE, dict(MessageID=15, AffectedSOPClassUID=MPPS, AffectedSOPInstanceUID="1.2.3.46",
                                      AttributeList=io.BytesIO(identifier.getvalue())))),
        (N_CREATE_RQ, (N_CREATE, dict(MessageID=16, AffectedSOPClassUID=MPPS,  # the SCP is to choose the UID
                                      AttributeList=io.BytesIO(identifier.getvalue())))),
        (N_SET_RQ, (N_SET, dict(MessageID=17, RequestedSOPClassUID=MPPS, RequestedSOPInstanceUID="1.2.3.46",
                                ModificationList=io.BytesIO(identifier.getvalue())))),
    ]


@pytest.mark.parametrize("max_pdu", [0, 16384, 64])
def test_messages_are_read_as_pynetdicom_decodes_them(max_pdu):
    """The engine reads command sets itself: every field of every message, requests and
    responses, fragmented or not, reads as pynetdicom's decoder reads it, and so does its data set."""
    import logging

    import dicoogled
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.pdu_primitives import P_DATA

    for message_class, (kind, fields) in _primitives() + _requests():
        primitive = kind()
        for name, value in fields.items():
            setattr(primitive, name, value)
        wire = _pynetdicom_bytes(message_class, primitive, 5, max_pdu)
        theirs = DIMSEMessage()
        for pdu in _pdus(wire):
            pdata = P_DATA()
            pdata.presentation_data_value_list = _pdv_items(pdu)
            done = theirs.decode_msg(pdata)
        assert done and type(theirs) is message_class
        ours_end, peer_end = socket.socketpair()
        with ours_end, peer_end:
            association = dicoogled.Association(ours_end, ("127.0.0.1", 0), max_receive=0, max_send_limit=0,
                                                timeout=5, log=logging.getLogger("test"))
            association.contexts = {5: None}
            peer_end.sendall(wire)
            ours = association.receive_message()
        assert ours.kind is message_class and ours.context_id == 5
        expected = {element.keyword: element.value for element in theirs.command_set}
        assert {keyword: ours.command_set.get(keyword) for keyword in expected} == expected, message_class.__name__
        assert set(vars(ours.command_set)) == set(expected)
        assert ours.data_set == (theirs.data_set.getvalue() if theirs.data_set else b"")


def _pdus(wire: bytes):
    while wire:
        length = struct.unpack(">I", wire[2:6])[0]
        yield wire[:6 + length]
        wire = wire[6 + length:]


def _pdv_items(pdu: bytes) -> list:
    items, offset = [], 6
    while offset < len(pdu):
        length = struct.unpack(">I", pdu[offset:offset + 4])[0]
        items.append([pdu[offset + 4], pdu[offset + 5:offset + 4 + length]])
        offset += 4 + length
    return items


# ---- the acceptor's state machine, row by row (PS3.8 9.2.3, Tables 9-7 to 9-10) ----------------


def _pdu(kind: int, body: bytes = bytes(4)) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body)) + body


#: Sta2, a connection awaiting its A-ASSOCIATE-RQ: any other PDU, or one of no known type, is
#: answered with an A-ABORT (AA-1, Evt3/4/10/12/13/19); an A-ABORT is not answered (AA-2, Evt16).
STA2_ROWS = [
    ("A-ASSOCIATE-AC (Evt3)", _pdu(0x02, associate_rq()[6:]), "abort"),
    ("A-ASSOCIATE-RJ (Evt4)", _pdu(0x03, bytes([0, 1, 1, 1])), "abort"),
    ("P-DATA-TF (Evt10)", p_data(b"\0" * 8, command=True, last=True), "abort"),
    ("A-RELEASE-RQ (Evt12)", release_rq(), "abort"),
    ("A-RELEASE-RP (Evt13)", _pdu(0x06), "abort"),
    ("a PDU of no known type (Evt19)", _pdu(0x09), "abort"),
    ("A-ABORT (Evt16)", abort_pdu(), "closed"),
]
#: Sta6, an established association: an association PDU or an A-RELEASE-RP is aborted with an
#: A-P-ABORT, "unexpected PDU", and a PDU of no known type "unrecognized PDU" (AA-8, Evt3/4/6/13/19);
#: an A-ABORT closes it (AA-3, Evt16); an A-RELEASE-RQ is answered with an A-RELEASE-RP (AR-2, AR-4).
STA6_ROWS = [
    ("A-ASSOCIATE-RQ (Evt6)", associate_rq(), (2, 2)),
    ("A-ASSOCIATE-AC (Evt3)", _pdu(0x02, associate_rq()[6:]), (2, 2)),
    ("A-ASSOCIATE-RJ (Evt4)", _pdu(0x03, bytes([0, 1, 1, 1])), (2, 2)),
    ("A-RELEASE-RP (Evt13)", _pdu(0x06), (2, 2)),
    ("a PDU of no known type (Evt19)", _pdu(0x09), (2, 1)),
    ("A-ABORT (Evt16)", abort_pdu(), "closed"),
    ("A-RELEASE-RQ (Evt12)", release_rq(), "released"),
]


def _answer(peer: RawPeer):
    """What the daemon does next: ("abort", source, reason), ("released",) or ("closed",)."""
    try:
        kind, body = peer.read_pdu()
    except ConnectionError:
        return ("closed",)
    if kind == A_ABORT:
        return ("abort", body[2], body[3])
    if kind == A_RELEASE_RP:
        return ("released",)
    return ("pdu", kind)


def test_the_acceptor_follows_the_state_table(one_slot):
    """Each row of the upper layer's state table an acceptor can meet, on a connection of its
    own: the daemon does what the table says, ends the connection, and frees the slot."""
    for state, rows, establish in (("Sta2", STA2_ROWS, False), ("Sta6", STA6_ROWS, True)):
        for event, pdu, expected in rows:
            peer = RawPeer(one_slot.dicom_port)
            if establish:
                peer.associate()
            peer.send(pdu)
            answer = _answer(peer)
            if expected == "abort":
                assert answer[0] == "abort", (state, event, answer)
            elif isinstance(expected, tuple):
                assert answer == ("abort", *expected), (state, event, answer)
            else:
                assert answer == (expected,), (state, event, answer)
            peer.close()  # as a peer does once it has the answer (the daemon waits for it, ARTIM)
            assert wait_until(lambda: slot_free(one_slot), message=f"the slot to be free after {state} {event}")
