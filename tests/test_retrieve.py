"""C-MOVE and C-GET: everything asked for arrives, unchanged, and the counts say so.

The move destination is a real DCMTK storescp started by the test on a loopback port; C-GET
is done with DCMTK's getscu and with pynetdicom. Received instances are compared with the
generated originals element by element, pixel data included.
"""

import socket
import time

import pydicom
import pytest
from pynetdicom import AE, _config as pynetdicom_config, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

import studygen
from conftest import AET, StoreSCP, free_port, make_identifier

SUCCESS = 0x0000
PENDING = 0xFF00
CANCELLED = 0xFE00
OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702  # every sub-operation failed
MOVE_DESTINATION_UNKNOWN = 0xA801

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEST = "DEST"
SHAPE = dict(patients=2, studies=2, series=2, instances=2)  # 16 instances
COUNTS = ("NumberOfRemainingSuboperations", "NumberOfCompletedSuboperations",
          "NumberOfFailedSuboperations", "NumberOfWarningSuboperations")


@pytest.fixture
def destination(tmp_path):
    dest = StoreSCP(tmp_path / "received", DEST)
    yield dest
    dest.stop()


def generated(shape=SHAPE) -> dict:
    """(patient, study, series, instance) -> the generated data set, as studygen makes it."""
    return {(p, st, se, i): studygen.make_instance(p, st, se, i)
            for p in range(shape["patients"]) for st in range(shape["studies"])
            for se in range(shape["series"]) for i in range(shape["instances"])}


@pytest.fixture
def archive(start_daemon, destination, studies):
    """A daemon that knows DEST and holds the generated studies; returns (daemon, instances)."""
    daemon = start_daemon(config_text=f"[modalities]\n{DEST} = 127.0.0.1:{destination.port}\n")
    paths = studies(**SHAPE)
    assoc = associate(daemon, (CTImageStorage, [EXPLICIT_VR_LITTLE_ENDIAN]))  # as generated: no VR lost
    assert [assoc.send_c_store(path).Status for path in paths] == [SUCCESS] * len(paths)
    assoc.release()
    instances = generated()
    assert {ds.SOPInstanceUID for ds in instances.values()} == {pydicom.dcmread(p).SOPInstanceUID for p in paths}
    return daemon, instances


def select(instances, patient=None, study=None, series=None, instance=None) -> dict:
    """SOPInstanceUID -> data set of the generated instances under one entity."""
    wanted = (patient, study, series, instance)
    return {ds.SOPInstanceUID: ds for key, ds in instances.items()
            if all(w is None or w == k for w, k in zip(wanted, key))}


DATA_SET_TRAILING_PADDING = 0xFFFCFFFC  # any application may drop it (PS3.10 7.2)


def assert_same_instances(received: dict, expected: dict):
    """Same SOPInstanceUIDs, and each data set equal element by element, pixels included."""
    assert set(received) == set(expected)
    for uid, original in expected.items():
        copy = received[uid]
        assert copy.PixelData == original.PixelData, f"{uid}: pixel data differs"
        assert copy.SOPClassUID == original.SOPClassUID
        differing = [elem.tag for elem in original if elem.tag != DATA_SET_TRAILING_PADDING
                     and elem.tag.element != 0  # group lengths are retired; a receiver may drop them
                     and (elem.tag not in copy or copy[elem.tag].value != elem.value)]
        extra = [elem.tag for elem in copy if elem.tag.element != 0 and elem.tag not in original]
        assert not differing and not extra, f"{uid}: elements differ {differing}, added {extra}"


def move_keys(level, ds) -> list:
    """movescu -k options selecting ds's entity at level (unique keys above it included)."""
    keys = {"PATIENT": ["PatientID"], "STUDY": ["StudyInstanceUID"],
            "SERIES": ["StudyInstanceUID", "SeriesInstanceUID"],
            "IMAGE": ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]}[level]
    return [f"QueryRetrieveLevel={level}"] + [f"{k}={ds.data_element(k).value}" for k in keys]


def _nodelay(event):
    # Our side of the association: without it every request waits for a delayed ACK.
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def associate(daemon, *contexts, calling="TESTSCU", evt_handlers=(), **kwargs):
    ae = AE(ae_title=calling)
    ae.dimse_timeout = 30  # a hang becomes a failed test, not a stuck run
    for context in contexts:  # an abstract syntax, or (abstract syntax, transfer syntaxes)
        ae.add_requested_context(*context) if isinstance(context, tuple) else ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title=AET,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay), *evt_handlers], **kwargs)
    assert assoc.is_established
    return assoc


def responses(generator) -> list:
    """(status, (remaining, completed, failed, warning), identifier) of each response."""
    out = []
    for status, identifier in generator:
        assert status is not None and "Status" in status, "no response (timeout or abort)"
        out.append((status.Status, tuple(status.get(k) for k in COUNTS), identifier))
    return out


# ---- C-MOVE --------------------------------------------------------------------------------

MOVES = [  # (information model flag, level, the entity's indexes, patient-root keys above study)
    ("-S", "STUDY", dict(patient=0, study=1)),
    ("-S", "SERIES", dict(patient=1, study=0, series=1)),
    ("-S", "IMAGE", dict(patient=1, study=1, series=0, instance=1)),
    ("-P", "PATIENT", dict(patient=1)),
    ("-P", "STUDY", dict(patient=0, study=0)),
    ("-P", "SERIES", dict(patient=0, study=1, series=0)),
    ("-P", "IMAGE", dict(patient=1, study=0, series=0, instance=0)),
]


@pytest.mark.parametrize("model, level, entity", MOVES, ids=[f"{m[0]}-{m[1]}" for m in MOVES])
def test_movescu_moves_every_instance_of_the_entity(archive, destination, model, level, entity):
    daemon, instances = archive
    expected = select(instances, **entity)
    ds = next(iter(expected.values()))
    keys = move_keys(level, ds)
    if model == "-P" and level != "PATIENT":
        keys.append(f"PatientID={ds.PatientID}")  # patient root: the keys of every level above
    result = daemon.dcmtk("movescu", "-v", model, "-aem", DEST, *[a for k in keys for a in ("-k", k)])
    output = result.stdout + result.stderr
    assert "Received Final Move Response (Success)" in output
    assert output.count("(Pending)") == len(expected)
    assert_same_instances(destination.datasets(), expected)
    assert f"C-MOVE from DCMTK: {len(expected)} instances to {DEST}" in daemon.log


def test_move_responses_count_sub_operations(archive, destination):
    daemon, instances = archive
    expected = select(instances, patient=0, study=0)
    study_uid = next(iter(expected.values())).StudyInstanceUID
    assoc = associate(daemon, StudyRootQueryRetrieveInformationModelMove)
    try:
        replies = responses(assoc.send_c_move(make_identifier("STUDY", StudyInstanceUID=study_uid), DEST,
                                              StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
    total = len(expected)
    pending = [(status, counts) for status, counts, _ in replies[:-1]]
    assert pending == [(PENDING, (total - done, done, 0, 0)) for done in range(1, total + 1)]
    final_status, (_, completed, failed, warning), _ = replies[-1]
    assert (final_status, completed, failed, warning) == (SUCCESS, total, 0, 0)
    assert_same_instances(destination.datasets(), expected)


def test_move_to_unknown_destination(archive, destination):
    daemon, instances = archive
    study_uid = next(iter(select(instances, patient=0, study=0).values())).StudyInstanceUID
    assoc = associate(daemon, StudyRootQueryRetrieveInformationModelMove, calling="VIEWER")
    try:
        replies = responses(assoc.send_c_move(make_identifier("STUDY", StudyInstanceUID=study_uid), "NOWHERE",
                                              StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
    assert [status for status, _, _ in replies] == [MOVE_DESTINATION_UNKNOWN]
    assert "C-MOVE from VIEWER to unknown destination 'NOWHERE': add it under [modalities] as NOWHERE = host:port" in daemon.log
    assert destination.datasets() == {}


MOVED_SYNTAXES = {  # pydicom's bundled file -> its transfer syntax, which must survive the move
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "SC_rgb_rle.dcm": "1.2.840.10008.1.2.5",  # RLE Lossless
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "image_dfl.dcm": "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "ExplVR_BigEnd.dcm": "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
}


@pytest.mark.parametrize("name", sorted(MOVED_SYNTAXES))
def test_move_keeps_the_stored_transfer_syntax(start_daemon, destination, testdata, monkeypatch, name):
    daemon = start_daemon(config_text=f"[modalities]\n{DEST} = 127.0.0.1:{destination.port}\n")
    path = testdata(name)
    original = pydicom.dcmread(path)
    # Send the file's data set bytes untouched, in its own transfer syntax.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(original.SOPClassUID, original.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title=AET)
    assert assoc.send_c_store(path).Status == SUCCESS
    assoc.release()

    result = daemon.dcmtk("movescu", "-v", "-S", "-aem", DEST, "-k", "QueryRetrieveLevel=STUDY",
                          "-k", f"StudyInstanceUID={original.StudyInstanceUID}")
    assert "Received Final Move Response (Success)" in result.stdout + result.stderr
    received = destination.datasets()
    assert list(received) == [original.SOPInstanceUID]
    copy = received[original.SOPInstanceUID]
    assert copy.file_meta.TransferSyntaxUID == MOVED_SYNTAXES[name]
    assert copy.PixelData == original.PixelData
    assert_same_instances(received, {original.SOPInstanceUID: original})


def test_cancel_stops_a_move(start_daemon, destination, studies):
    daemon = start_daemon(config_text=f"[modalities]\n{DEST} = 127.0.0.1:{destination.port}\n")
    paths = studies(patients=1, studies=1, series=1, instances=300)
    assoc = associate(daemon, CTImageStorage)
    assert all(assoc.send_c_store(path).Status == SUCCESS for path in paths)
    assoc.release()
    study_uid = pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID

    assoc = associate(daemon, StudyRootQueryRetrieveInformationModelMove)
    context_id = assoc.accepted_contexts[0].context_id
    replies = []
    try:
        for status, _ in assoc.send_c_move(make_identifier("STUDY", StudyInstanceUID=study_uid), DEST,
                                           StudyRootQueryRetrieveInformationModelMove, msg_id=7):
            assert status is not None and "Status" in status
            replies.append((status.Status, tuple(status.get(k) for k in COUNTS)))
            if len(replies) == 3:
                assoc.send_c_cancel(7, context_id)
    finally:
        assoc.release()
    final_status, (remaining, completed, failed, warning) = replies[-1]
    assert final_status == CANCELLED
    assert all(status == PENDING for status, _ in replies[:-1])
    assert 3 <= completed < len(paths) // 2, "the move went on long after the cancel"
    assert remaining == len(paths) - completed - failed - warning
    assert len(destination.datasets()) == completed


# ---- C-GET ---------------------------------------------------------------------------------


def test_getscu_retrieves_a_study(archive, tmp_path):
    daemon, instances = archive
    expected = select(instances, patient=1, study=1)
    study_uid = next(iter(expected.values())).StudyInstanceUID
    folder = tmp_path / "getscu"
    folder.mkdir()
    result = daemon.dcmtk("getscu", "-v", "-S", "-od", str(folder),
                          "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}")
    output = result.stdout + result.stderr
    assert output.count("Sending C-STORE Response (Success)") == len(expected)
    assert output.count("Received C-GET Response (Pending)") == len(expected)
    assert "Received C-GET Response (Success)" in output
    assert f"Number of Completed Suboperations : {len(expected)}" in output
    assert "Number of Failed Suboperations    : 0" in output
    received = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, folder.iterdir())}
    assert_same_instances(received, expected)


def _get(daemon, identifier, with_scp_role: bool):
    """C-GET with pynetdicom; returns (responses, received data sets by SOPInstanceUID)."""
    received = {}

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        received[ds.SOPInstanceUID] = ds
        return SUCCESS

    roles = [build_role(CTImageStorage, scp_role=True)] if with_scp_role else []
    # Explicit VR only: in implicit VR the private elements would come back as bytes (no VR).
    storage = (CTImageStorage, [EXPLICIT_VR_LITTLE_ENDIAN])
    assoc = associate(daemon, StudyRootQueryRetrieveInformationModelGet, storage, calling="GETSCU",
                      ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        return responses(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)), received
    finally:
        assoc.release()


def test_get_with_scp_role_retrieves_everything(archive):
    daemon, instances = archive
    expected = select(instances, patient=0)
    patient_id = next(iter(expected.values())).PatientID
    # Study root has no PATIENT level: get each of the patient's studies.
    study_uids = sorted({ds.StudyInstanceUID for ds in expected.values()})
    identifier = make_identifier("STUDY", StudyInstanceUID="\\".join(study_uids))
    replies, received = _get(daemon, identifier, with_scp_role=True)
    total = len(expected)
    assert [(s, c) for s, c, _ in replies[:-1]] == [(PENDING, (total - n, n, 0, 0)) for n in range(1, total + 1)]
    final_status, (_, completed, failed, warning), _ = replies[-1]
    assert (final_status, completed, failed, warning) == (SUCCESS, total, 0, 0)
    assert_same_instances(received, expected)
    assert all(ds.PatientID == patient_id for ds in received.values())


def test_get_with_a_list_of_2000_study_uids(archive):
    """C-GET matches as C-FIND does: a list longer than SQLite's 1,000-deep expressions works."""
    daemon, instances = archive
    expected = select(instances, patient=1)
    study_uids = sorted({ds.StudyInstanceUID for ds in expected.values()})
    candidates = [f"1.2.826.0.1.3680043.9.{n}" for n in range(2000 - len(study_uids))] + study_uids
    replies, received = _get(daemon, make_identifier("STUDY", StudyInstanceUID="\\".join(candidates)), with_scp_role=True)
    final_status, (_, completed, failed, warning), _ = replies[-1]
    assert (final_status, completed, failed, warning) == (SUCCESS, len(expected), 0, 0)
    assert set(received) == set(expected)


def test_get_without_scp_role_fails_its_sub_operations(archive):
    daemon, instances = archive
    expected = select(instances, patient=1, study=0)
    study_uid = next(iter(expected.values())).StudyInstanceUID
    started = time.monotonic()
    replies, received = _get(daemon, make_identifier("STUDY", StudyInstanceUID=study_uid), with_scp_role=False)
    assert time.monotonic() - started < 20, "the C-GET hung instead of failing"
    assert received == {}
    final_status, (_, completed, failed, warning), identifier = replies[-1]
    assert (final_status, completed, failed, warning) == (OUT_OF_RESOURCES_SUBOPERATIONS, 0, len(expected), 0)
    assert set(identifier.FailedSOPInstanceUIDList) == set(expected)
    # The log says why: it is the usual reason C-GET fails from a viewer.
    assert "C-GET from GETSCU: it proposed no SCP role for 1.2.840.10008.5.1.4.1.1.2" in daemon.log


# ---- C-MOVE: when things go wrong ----------------------------------------------------------


def test_move_matching_nothing_succeeds_with_no_sub_operations(archive, destination):
    daemon, _ = archive
    assoc = associate(daemon, StudyRootQueryRetrieveInformationModelMove)
    try:
        replies = responses(assoc.send_c_move(make_identifier("STUDY", StudyInstanceUID="1.2.826.0.1.3680043.9.7433.404"),
                                              DEST, StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
    assert [(status, counts[1:]) for status, counts, _ in replies] == [(SUCCESS, (0, 0, 0))]
    assert destination.datasets() == {}


def test_move_to_a_destination_that_is_down_fails_at_once(start_daemon, studies):
    port = free_port()  # configured, but nothing listens there
    daemon = start_daemon(config_text=f"[modalities]\nDOWN = 127.0.0.1:{port}\n")
    paths = studies(patients=1, studies=1, series=1, instances=3)
    assert daemon.store(*paths) == [SUCCESS] * 3
    study_uid = pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    assoc = associate(daemon, StudyRootQueryRetrieveInformationModelMove)
    started = time.monotonic()
    try:
        replies = responses(assoc.send_c_move(make_identifier("STUDY", StudyInstanceUID=study_uid), "DOWN",
                                              StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
    assert time.monotonic() - started < 15
    # pynetdicom answers "move destination unknown" when it cannot associate with it.
    assert [status for status, _, _ in replies] == [MOVE_DESTINATION_UNKNOWN]


def test_move_reports_a_missing_file_as_one_failed_sub_operation(archive, destination):
    daemon, instances = archive
    expected = select(instances, patient=0, study=0)
    lost, *kept = sorted(expected)
    lost_path = next((daemon.data_dir / "storage").rglob(f"{lost}.dcm"))
    lost_path.unlink()  # gone from disk behind the archive's back
    assoc = associate(daemon, StudyRootQueryRetrieveInformationModelMove)
    try:
        replies = responses(assoc.send_c_move(make_identifier("STUDY", StudyInstanceUID=expected[lost].StudyInstanceUID),
                                              DEST, StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
    assert set(destination.datasets()) == set(kept)
    final_status, (remaining, completed, failed, warning), identifier = replies[-1]
    assert (final_status, completed, failed, warning) == (0xB000, len(kept), 1, 0)
    assert remaining in (None, 0)
    assert identifier.FailedSOPInstanceUIDList == lost  # one value: a plain UID
    # Every pending response counts down what is left.
    assert [counts[0] for _, counts, _ in replies[:-1]] == list(range(len(expected) - 1, -1, -1))
