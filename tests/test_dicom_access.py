"""The DICOM service under unlucky and hostile conditions, and who may use it.

- Connections that send no whole A-ASSOCIATE-RQ (port scans, TCP health checks, a stalled
  peer) take no association slot and are dropped: at once when closed, after
  association_request_timeout when silent.
- Every refused association is logged with the calling AE title, its address and the reason.
- [modalities] allow= limits what a calling AE may ask for; refuse_unknown_calling_aets closes
  the service to AEs not listed; allowed_calling_aets, the older list, wins when set.

Real daemon, real sockets, pynetdicom and DCMTK clients.
"""

import contextlib
import os
import re
import socket
import struct
import subprocess
import time

import pydicom
import pytest
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

import studygen
from conftest import AET, NODELAY, StoreSCP, free_port, make_identifier, rejection_of, wait_until
from restclient import ADMIN_ENV, admin_client

SUCCESS = 0x0000
PENDING = 0xFF00
NOT_AUTHORIZED = 0x0124
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)  # transient, service provider (presentation), local limit exceeded
CALLING_AET_NOT_RECOGNIZED = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognized
ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03  # presentation context result
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
QUERY_RETRIEVE = {"find": StudyRootQueryRetrieveInformationModelFind, "move": StudyRootQueryRetrieveInformationModelMove,
                  "get": StudyRootQueryRetrieveInformationModelGet}


# ---- helpers ------------------------------------------------------------------------------------


def associate(daemon, calling="TESTSCU", contexts=(Verification,), roles=(), bind_port=0):
    """An association from a pynetdicom SCU: established, rejected or aborted, as it comes."""
    ae = AE(ae_title=calling)
    for context in contexts:
        ae.add_requested_context(context, EXPLICIT_VR_LITTLE_ENDIAN)
    return ae.associate("127.0.0.1", daemon.dicom_port, ae_title=AET, evt_handlers=NODELAY, ext_neg=list(roles),
                        bind_address=("127.0.0.1", bind_port))


def rejection(assoc) -> tuple:
    rejected = rejection_of(assoc)
    assert rejected, "the association was not rejected"
    return rejected


def echo(daemon, calling="TESTSCU"):
    """C-ECHO as calling: 'success', or the rejection (result, source, reason)."""
    assoc = associate(daemon, calling)
    if not assoc.is_established:
        return rejection(assoc)
    try:
        assert assoc.send_c_echo().Status == SUCCESS
    finally:
        assoc.release()
    return "success"


def find(daemon, calling, **keys) -> list:
    """Study-level C-FIND as calling: the matches (the final status must be success)."""
    assoc = associate(daemon, calling, [StudyRootQueryRetrieveInformationModelFind])
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_find(make_identifier("STUDY", StudyInstanceUID="", **keys),
                                           StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    assert responses[-1][0].Status == SUCCESS
    return [identifier for status, identifier in responses if status.Status == PENDING]


def store(daemon, calling, ds) -> int:
    assoc = associate(daemon, calling, [CTImageStorage])
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds).Status
    finally:
        assoc.release()


def get(daemon, calling, study_uid) -> tuple[int, int]:
    """C-GET of a study as calling, taking the SCP role for CT: (final status, instances received)."""
    received = []

    def on_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        return SUCCESS

    ae = AE(ae_title=calling)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, EXPLICIT_VR_LITTLE_ENDIAN)
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title=AET, ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_get(make_identifier("STUDY", StudyInstanceUID=study_uid),
                                          StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    return responses[-1][0].Status, len(received)


def move(daemon, calling, study_uid, destination) -> int:
    assoc = associate(daemon, calling, [StudyRootQueryRetrieveInformationModelMove])
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_move(make_identifier("STUDY", StudyInstanceUID=study_uid), destination,
                                           StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
    return responses[-1][0].Status


def refused_services(daemon, calling) -> set:
    """The query/retrieve services whose presentation contexts the daemon refuses to calling."""
    assoc = associate(daemon, calling, [Verification, *QUERY_RETRIEVE.values()])
    assert assoc.is_established  # C-ECHO is always allowed, so something is accepted
    try:
        refused = {str(context.abstract_syntax): context.result for context in assoc.rejected_contexts}
    finally:
        assoc.release()
    assert set(refused.values()) <= {ABSTRACT_SYNTAX_NOT_SUPPORTED}
    return {service for service, sop_class in QUERY_RETRIEVE.items() if sop_class in refused}


def dcmtk_as(daemon, tool, calling, *args):
    """A DCMTK client with calling AE title calling (the last -aet given is the one it uses)."""
    return daemon.dcmtk(tool, "-aet", calling, *args, check=False)


def accepted_connections(daemon) -> int:
    """How many connections to its DICOM port the daemon has accepted and holds open."""
    pid, held = daemon.process.pid, set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            held.add(os.readlink(f"/proc/{pid}/fd/{name}"))
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in list(table)[1:]]
    listening = "0A"
    return sum(1 for row in rows if int(row[1].split(":")[1], 16) == daemon.dicom_port and row[3] != listening
               and f"socket:[{row[9]}]" in held)


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def long_association_request(daemon, transfer_syntaxes: int):
    """C-ECHO over an association proposing 128 presentation contexts with transfer_syntaxes
    made-up 64-character UIDs each: an A-ASSOCIATE-RQ of 128 * (76 + 68 * transfer_syntaxes)
    bytes, in several TCP segments."""
    ae = AE(ae_title="MANYCONTEXTS")
    def long_uid(prefix):
        return prefix + "1" * (64 - len(prefix))

    syntaxes = [long_uid(f"1.2.826.0.1.3680043.8.498.2.{n}.") for n in range(transfer_syntaxes)]
    ae.add_requested_context(Verification, [EXPLICIT_VR_LITTLE_ENDIAN, *syntaxes[1:]])
    for n in range(127):
        ae.add_requested_context(long_uid(f"1.2.826.0.1.3680043.8.498.1.{n}."), syntaxes)
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title=AET)
    assert assoc.is_established
    try:
        return assoc.send_c_echo().Status
    finally:
        assoc.release()


def connect(daemon) -> socket.socket:
    return socket.create_connection(("127.0.0.1", daemon.dicom_port), timeout=30)


def partial_associate_request(daemon) -> socket.socket:
    """A connection that sends the start of an A-ASSOCIATE-RQ, then nothing: a stalled peer."""
    sock = connect(daemon)
    sock.sendall(struct.pack(">BBL", 0x01, 0, 205) + struct.pack(">HH", 1, 0) + b"DICOOGLED" + b" " * 7)
    return sock


def reset_on_close(sock: socket.socket) -> socket.socket:
    """Close with an RST rather than a FIN, as many scanners do."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return sock


def closed_by_daemon(sock: socket.socket, timeout: float) -> bool:
    """Wait (up to timeout) until the daemon closes sock: True if it read as end of file."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# ---- connections without an association request ---------------------------------------------------


def test_silent_and_closed_connections_take_no_association_slot(start_daemon):
    daemon = start_daemon(config_text="[dicom]\nmax_associations = 4\nassociation_request_timeout = 120\n")
    silent = [connect(daemon) for _ in range(16)] + [partial_associate_request(daemon) for _ in range(4)]
    # The daemon has accepted them all, each waiting for an association request.
    wait_until(lambda: accepted_connections(daemon) == len(silent), message="the daemon to accept the connections")
    for index in range(16):  # a health check or a scan: connect, then close (half with an RST)
        sock = connect(daemon)
        (reset_on_close(sock) if index % 2 else sock).close()

    # Real associations go through, from every client, as often as asked.
    assert echo(daemon) == "success"
    daemon.dcmtk("echoscu")
    daemon.store(studygen.make_instance(0, 0, 0, 0))
    result = daemon.dcmtk("findscu", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID")
    assert "Find Response: 1 (Pending)" in result.stdout + result.stderr
    # Long association requests too: the gate waits for all of one, or its first 64 KiB.
    assert long_association_request(daemon, 4) == SUCCESS  # 44 KiB
    assert long_association_request(daemon, 16) == SUCCESS  # 149 KiB

    # max_associations still holds, for real associations only: four may be open, not a fifth.
    held = [associate(daemon, f"HOLDER{n}") for n in range(4)]
    assert all(assoc.is_established for assoc in held)
    assert rejection(associate(daemon, "FIFTH")) == LOCAL_LIMIT_EXCEEDED
    for assoc in held:
        assoc.release()
    wait_until(lambda: echo(daemon) == "success", message="a slot to free once the holders released")
    # The silent ones are still waiting (their timeout is 120 s): not dropped, just not counted.
    assert not any(closed_by_daemon(sock, 0.01) for sock in silent)
    assert daemon.stop() == 0  # and stopping does not wait for them
    for sock in silent:
        sock.close()


def test_silent_connections_are_dropped_after_association_request_timeout(start_daemon):
    timeout = 2
    daemon = start_daemon(config_text=f"[dicom]\nassociation_request_timeout = {timeout}\n")
    pid = daemon.process.pid
    threads_before = thread_count(pid)
    opened = time.monotonic()
    silent = [connect(daemon) for _ in range(24)] + [partial_associate_request(daemon) for _ in range(8)]
    for sock in silent:
        assert closed_by_daemon(sock, timeout=20), "a silent connection was not dropped"
        assert time.monotonic() - opened >= timeout  # not before its time
        sock.close()
    # Each waited in a thread of its own: they are gone too.
    wait_until(lambda: thread_count(pid) <= threads_before, message="the daemon's threads to end")
    assert daemon.log.count(f"no A-ASSOCIATE-RQ within {timeout} s") == len(silent)
    assert echo(daemon) == "success"


def test_a_connection_that_closes_frees_everything_at_once(start_daemon):
    daemon = start_daemon(config_text="[dicom]\nmax_associations = 1\nacse_timeout = 60\n")
    for index in range(16):
        sock = connect(daemon)
        (reset_on_close(sock) if index % 2 else sock).close()
        sock = partial_associate_request(daemon)
        sock.close()
    # Without waiting: the one slot is free.
    assert echo(daemon) == "success"
    daemon.dcmtk("echoscu")


# ---- refusals are logged --------------------------------------------------------------------------


def test_refused_associations_are_logged_with_calling_ae_address_and_reason(start_daemon):
    daemon = start_daemon(config_text="[dicom]\nmax_associations = 1\n")
    holder = associate(daemon, "HOLDER")
    assert holder.is_established
    port = free_port()
    assert rejection(associate(daemon, "LATECOMER", bind_port=port)) == LOCAL_LIMIT_EXCEEDED
    line = f"refused an association from LATECOMER at 127.0.0.1:{port}: local limit exceeded: max_associations = 1"
    wait_until(lambda: line in daemon.log, message="a log line about the refusal")
    result = dcmtk_as(daemon, "echoscu", "DCMTKLATE")
    assert result.returncode != 0
    assert re.search(r"refused an association from DCMTKLATE at 127\.0\.0\.1:\d+: local limit exceeded", daemon.log)
    holder.release()


# ---- who may do what -----------------------------------------------------------------------------


@pytest.fixture
def destination(tmp_path):
    dest = StoreSCP(tmp_path / "received", "DEST")
    yield dest
    dest.stop()


def test_modalities_allow_limits_what_each_ae_may_do(start_daemon, destination, tmp_path):
    daemon = start_daemon(config_text=(
        "[modalities]\n"
        f"CT01 = 127.0.0.1:{free_port()} allow=store Scanner in room 2\n"
        f"VIEWER = 127.0.0.1:{free_port()} public allow=find,get Reading room\n"
        f"NOTHING = 127.0.0.1:{free_port()} allow=none\n"
        f"DEST = 127.0.0.1:{destination.port}\n"
    ))
    ds = studygen.make_instance(0, 0, 0, 0)
    study = ds.StudyInstanceUID

    # An AE allowed only store stores, and cannot find, move or get.
    assert store(daemon, "CT01", ds) == SUCCESS
    assert refused_services(daemon, "CT01") == {"find", "move", "get"}
    for tool, args in (("findscu", ["-S"]), ("movescu", ["-S", "-aem", "DEST"]), ("getscu", ["-S"])):
        result = dcmtk_as(daemon, tool, "CT01", *args, "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}")
        assert result.returncode != 0, f"{tool} as CT01 succeeded"
        assert re.search("No (Acceptable|adequate) Presentation Contexts", result.stdout + result.stderr)
    assert destination.received() == set()
    assert re.search(r"refused C-FIND/C-GET/C-MOVE to CT01 at 127\.0\.0\.1:\d+: \[modalities\] CT01 allows only store",
                     daemon.log)

    # An AE allowed find and get may not store (Refused: Not Authorized) nor move.
    assert refused_services(daemon, "VIEWER") == {"move"}
    assert [m.StudyInstanceUID for m in find(daemon, "VIEWER")] == [study]
    assert get(daemon, "VIEWER", study) == (SUCCESS, 1)
    other = studygen.make_instance(1, 0, 0, 0)
    assert store(daemon, "VIEWER", other) == NOT_AUTHORIZED
    sent = tmp_path / "other.dcm"
    pydicom.dcmwrite(sent, other, enforce_file_format=True)
    result = subprocess.run(["storescu", "-v", "-aet", "VIEWER", "-aec", AET, "127.0.0.1", str(daemon.dicom_port), str(sent)],
                            capture_output=True, text=True, timeout=60)
    # DCMTK names no C-STORE status 0x0124 (it prints "Unknown Status: 0x124") but takes it as a failure.
    assert result.returncode != 0 and re.search(r"Status: 0x0?124", result.stdout + result.stderr), result
    assert daemon.counts()["instances"] == 1
    assert "refused C-STORE to VIEWER: [modalities] VIEWER does not allow store" in daemon.log

    # allow=none: C-ECHO only.
    assert echo(daemon, "NOTHING") == "success"
    assert refused_services(daemon, "NOTHING") == {"find", "move", "get"}
    assert store(daemon, "NOTHING", other) == NOT_AUTHORIZED

    # An entry without allow= may do everything, and so may an AE not listed (the default).
    for calling in ("DEST", "STRANGER"):
        assert refused_services(daemon, calling) == set()
        assert [m.StudyInstanceUID for m in find(daemon, calling)] == [study]
        assert move(daemon, calling, study, "DEST") == SUCCESS
        assert get(daemon, calling, study) == (SUCCESS, 1)
    assert store(daemon, "STRANGER", other) == SUCCESS
    assert destination.received() == {ds.SOPInstanceUID}
    dcmtk_as(daemon, "findscu", "DCMTK", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID").check_returncode()


def test_refuse_unknown_calling_aets_closes_the_service_to_everyone_not_listed(start_daemon):
    daemon = start_daemon(config_text=(
        "[dicom]\nrefuse_unknown_calling_aets = true\n"
        f"[modalities]\nCT01 = 127.0.0.1:{free_port()} allow=store\nWORKSTATION = 127.0.0.1:{free_port()}\n"
    ), env=ADMIN_ENV)
    port = free_port()
    assoc = associate(daemon, "INTRUDER", bind_port=port)
    assert rejection(assoc) == CALLING_AET_NOT_RECOGNIZED
    line = (f"refused an association from INTRUDER at 127.0.0.1:{port}: calling AE title not recognized:"
            " not under [modalities] (refuse_unknown_calling_aets)")
    wait_until(lambda: line in daemon.log, message="a log line about the refusal")
    result = dcmtk_as(daemon, "echoscu", "DCMTK")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    assert echo(daemon, "CT01") == "success"
    assert store(daemon, "CT01", studygen.make_instance(0, 0, 0, 0)) == SUCCESS
    assert len(find(daemon, "WORKSTATION")) == 1

    # An AE added at run time (REST, as Dicoogle's web app does) may associate at once.
    admin = admin_client(daemon)
    response = admin.post("/management/settings/storage/dicom", type="add", aetitle="DCMTK", ip="127.0.0.1", port="104")
    assert response.status == 200, response
    daemon.dcmtk("echoscu")


def test_allowed_calling_aets_wins_over_modalities(start_daemon):
    """The older allowed_calling_aets, when set, alone decides who may associate; allow= still
    limits what those may do."""
    daemon = start_daemon(config_text=(
        "[dicom]\nallowed_calling_aets = CT01 OLDVIEWER\nrefuse_unknown_calling_aets = true\n"
        f"[modalities]\nCT01 = 127.0.0.1:{free_port()} allow=store\nWORKSTATION = 127.0.0.1:{free_port()}\n"
    ))
    assert echo(daemon, "OLDVIEWER") == "success"  # listed there only: may do everything
    assert refused_services(daemon, "OLDVIEWER") == set()
    assert refused_services(daemon, "CT01") == {"find", "move", "get"}
    assert echo(daemon, "WORKSTATION") == CALLING_AET_NOT_RECOGNIZED
    assert re.search(r"refused an association from WORKSTATION at 127\.0\.0\.1:\d+: calling AE title not recognized:"
                     r" not in allowed_calling_aets", daemon.log)
