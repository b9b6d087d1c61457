"""Transcoding on retrieve: a peer that accepts only uncompressed transfer syntaxes still gets every
compressed instance of a C-MOVE or C-GET, decompressed in the codec worker, its pixels the same as
pydicom decodes them from the stored file; what cannot be decompressed is named in the final
response (Failed SOP Instance UID List, Error Comment) and in the log, never silently skipped.

The receivers are DCMTK's storescp as the move destination (accepting the uncompressed syntaxes
only, its default) and getscu (proposing the uncompressed ones only, its default), and pynetdicom
proposing Implicit VR Little Endian alone.
"""

import io

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid
from pynetdicom import build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove

from conftest import StoreSCP, make_identifier, wait_until
from test_codec_worker import ENV, PASSWORD, codec_libraries
from test_retrieve import associate, responses

SUCCESS = 0x0000
SUBOPERATIONS_FAILED = 0xB000  # a warning: complete, with one or more failures (PS3.4 C.4.2.1.5)
EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
#: pydicom's bundled files, one per codec: name -> its transfer syntax.
COMPRESSED = {
    "SC_rgb_rle.dcm": "1.2.840.10008.1.2.5",  # RLE Lossless, colour
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",  # RLE Lossless, 16 bits signed
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",  # JPEG Baseline (lossy: decoded as pydicom decodes it)
}


def store_as_one_study(daemon, testdata, tmp_path, names) -> dict:
    """Store the bundled files as they are compressed, each as a new instance of one new study (the
    MR_small ones share their UIDs): SOPInstanceUID -> the stored data set."""
    study_uid, stored = generate_uid(), {}
    for name in names:
        dataset = pydicom.dcmread(testdata(name))
        assert dataset.file_meta.TransferSyntaxUID == COMPRESSED[name]
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study_uid, generate_uid()
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        assoc = associate(daemon, (dataset.SOPClassUID, [dataset.file_meta.TransferSyntaxUID]))
        assert assoc.send_c_store(dataset).Status == SUCCESS
        assoc.release()
        stored[dataset.SOPInstanceUID] = dataset
    return stored


def assert_decompressed(received: dict, stored: dict, transfer_syntax: str):
    """Every stored instance arrived in transfer_syntax, its decoded pixels those of the original
    (lossless: the stored image, decoded, exactly)."""
    assert set(received) == set(stored)
    for uid, original in stored.items():
        copy = received[uid]
        name = f"{uid} (was {original.file_meta.TransferSyntaxUID.name})"
        assert copy.file_meta.TransferSyntaxUID == transfer_syntax, name
        assert (copy.pixel_array == original.pixel_array).all(), f"{name}: pixels differ"
        assert copy.PatientID == original.PatientID and copy.SOPClassUID == original.SOPClassUID


def test_move_to_a_destination_accepting_only_uncompressed_gets_every_instance_decompressed(start_daemon, testdata, tmp_path):
    plain = StoreSCP(tmp_path / "plain", "PLAIN", compressed=False)
    try:
        daemon = start_daemon(env=ENV, config_text=f"[modalities]\nPLAIN = 127.0.0.1:{plain.port}\n")
        stored = store_as_one_study(daemon, testdata, tmp_path, COMPRESSED)
        study_uid = next(iter(stored.values())).StudyInstanceUID
        result = daemon.dcmtk("movescu", "-v", "-S", "-aem", "PLAIN", "-k", "QueryRetrieveLevel=STUDY",
                              "-k", f"StudyInstanceUID={study_uid}", check=False)
        output = result.stdout + result.stderr
        assert "Received Final Move Response (Success)" in output, daemon.log
        assert_decompressed(plain.datasets(), stored, EXPLICIT_VR_LITTLE_ENDIAN)
        # Decompressed by the codec worker: nothing of numpy or a codec in the daemon.
        assert codec_libraries(daemon.process.pid) == set()
    finally:
        plain.stop()


def test_getscu_proposing_only_uncompressed_gets_every_instance_decompressed(start_daemon, testdata, tmp_path):
    daemon = start_daemon(env=ENV)
    stored = store_as_one_study(daemon, testdata, tmp_path, COMPRESSED)
    study_uid = next(iter(stored.values())).StudyInstanceUID
    folder = tmp_path / "getscu"
    folder.mkdir()
    result = daemon.dcmtk("getscu", "-d", "-S", "-od", str(folder),
                          "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}")
    output = result.stdout + result.stderr
    assert "DIMSE status is: Success" in output, output
    assert "Number of Failed Suboperations    : 0" in output
    assert_decompressed({ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, folder.iterdir())}, stored, EXPLICIT_VR_LITTLE_ENDIAN)
    assert codec_libraries(daemon.process.pid) == set()


def get_in(daemon, stored: dict, transfer_syntax: str):
    """C-GET the stored study with pynetdicom, its storage contexts (SCP role) offering
    transfer_syntax alone: (final status, counts, received data sets by SOPInstanceUID)."""
    study_uid = next(iter(stored.values())).StudyInstanceUID
    received = {}

    def on_store(event):
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        received[dataset.SOPInstanceUID] = dataset
        return SUCCESS

    sop_classes = sorted({ds.SOPClassUID for ds in stored.values()})
    assoc = associate(daemon, StudyRootQueryRetrieveInformationModelGet,
                      *[(sop_class, [transfer_syntax]) for sop_class in sop_classes], calling="GETSCU",
                      ext_neg=[build_role(sop_class, scp_role=True) for sop_class in sop_classes],
                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        replies = responses(assoc.send_c_get(make_identifier("STUDY", StudyInstanceUID=study_uid),
                                             StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    status, counts, _ = replies[-1]
    return status, counts[1:], received


def test_get_proposing_implicit_vr_only_gets_every_instance_decompressed_to_it(start_daemon, testdata, tmp_path):
    """The requestor offers Implicit VR Little Endian alone: the decompressed data set is re-encoded to it."""
    daemon = start_daemon()
    stored = store_as_one_study(daemon, testdata, tmp_path, COMPRESSED)
    status, counts, received = get_in(daemon, stored, IMPLICIT_VR_LITTLE_ENDIAN)
    assert (status, counts) == (SUCCESS, (len(stored), 0, 0))
    assert_decompressed(received, stored, IMPLICIT_VR_LITTLE_ENDIAN)


@pytest.mark.parametrize("transfer_syntax", ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"],
                         ids=["RLE", "JPEG-LS", "JPEG-2000"])
def test_get_proposing_one_lossless_syntax_gets_every_instance_encoded_in_it(start_daemon, testdata, tmp_path,
                                                                            transfer_syntax):
    """The requestor offers one lossless compressed syntax alone: each instance is decoded and
    encoded in it by the codec worker (one already stored so goes as stored), pixels unchanged."""
    daemon = start_daemon(env=ENV)
    stored = store_as_one_study(daemon, testdata, tmp_path, COMPRESSED)
    status, counts, received = get_in(daemon, stored, transfer_syntax)
    assert (status, counts) == (SUCCESS, (len(stored), 0, 0))
    assert_decompressed(received, stored, transfer_syntax)
    for uid, original in stored.items():
        if original.file_meta.TransferSyntaxUID == transfer_syntax:
            assert received[uid].PixelData == original.PixelData  # as stored, byte for byte
    assert codec_libraries(daemon.process.pid) == set()


def test_move_keeps_the_stored_syntax_for_a_destination_that_accepts_it(start_daemon, testdata, tmp_path):
    """Offered the stored syntax and the uncompressed ones, a destination accepting all gets the
    instance as stored: decompression is the fallback, not the rule."""
    everything = StoreSCP(tmp_path / "all", "ALL", compressed=True)
    try:
        daemon = start_daemon(config_text=f"[modalities]\nALL = 127.0.0.1:{everything.port}\n")
        stored = store_as_one_study(daemon, testdata, tmp_path, ["MR_small_jpeg_ls_lossless.dcm"])
        (original,) = stored.values()
        daemon.dcmtk("movescu", "-S", "-aem", "ALL", "-k", "QueryRetrieveLevel=STUDY",
                     "-k", f"StudyInstanceUID={original.StudyInstanceUID}")
        (copy,) = everything.datasets().values()
        assert copy.file_meta.TransferSyntaxUID == COMPRESSED["MR_small_jpeg_ls_lossless.dcm"]
        assert copy.PixelData == original.PixelData
    finally:
        everything.stop()


def test_an_instance_that_cannot_be_decompressed_is_named_in_the_answer_and_the_log(start_daemon, testdata, tmp_path):
    """An RLE instance whose pixel data is broken cannot be decompressed for a destination that
    accepts only uncompressed data: the final response fails it by SOPInstanceUID, with the reason
    as Error Comment, the other instance still arrives, and the log says why."""
    plain = StoreSCP(tmp_path / "plain", "PLAIN", compressed=False)
    try:
        daemon = start_daemon(config_text=f"[modalities]\nPLAIN = 127.0.0.1:{plain.port}\n")
        good, broken = store_as_one_study(daemon, testdata, tmp_path, ["SC_rgb_rle.dcm"]), pydicom.dcmread(testdata("MR_small_RLE.dcm"))
        broken.StudyInstanceUID = next(iter(good.values())).StudyInstanceUID
        broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        # One fragment whose RLE header claims 15 segments: no decoder can make an image of it.
        broken.PixelData = pydicom.encaps.encapsulate([bytes([15, 0, 0, 0]) + bytes(60) + b"\x00\x01"])
        assoc = associate(daemon, (broken.SOPClassUID, [broken.file_meta.TransferSyntaxUID]))
        assert assoc.send_c_store(broken).Status == SUCCESS
        assoc.release()

        assoc = associate(daemon, StudyRootQueryRetrieveInformationModelMove)
        try:
            replies = list(assoc.send_c_move(make_identifier("STUDY", StudyInstanceUID=broken.StudyInstanceUID),
                                             "PLAIN", StudyRootQueryRetrieveInformationModelMove))
        finally:
            assoc.release()
        final, identifier = replies[-1]
        assert final.Status == SUBOPERATIONS_FAILED
        assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (1, 1)
        assert final.ErrorComment.startswith("cannot decompress from 1.2.840.10008.1.2.5")
        assert identifier.FailedSOPInstanceUIDList == broken.SOPInstanceUID
        assert set(plain.datasets()) == set(good)
        line = wait_until(lambda: next((l for l in daemon.log.splitlines() if "instances not sent" in l), None),
                          message="the log line")
        assert "WARNING" in line and "C-MOVE from TESTSCU: 1 of 2 instances not sent" in line
        assert "cannot decompress from 1.2.840.10008.1.2.5" in line and broken.SOPInstanceUID in line
    finally:
        plain.stop()


def test_wado_rs_converts_a_study_on_request_keeping_each_instance(start_daemon, testdata, tmp_path):
    """WADO-RS with transfer-syntax=1.2.840.10008.1.2.1 in Accept: every instance of the study,
    decompressed, under its own SOP Instance UID (the same instance, in another syntax); as
    stored with transfer-syntax=*; encoded in RLE, JPEG-LS or JPEG 2000 lossless on request;
    406 for a lossy syntax, which the archive does not make."""
    daemon = start_daemon(env=ENV)
    stored = store_as_one_study(daemon, testdata, tmp_path, COMPRESSED)
    study_url = f"http://127.0.0.1:{daemon.http_port}/dicom-web/studies/{next(iter(stored.values())).StudyInstanceUID}"
    session = requests.Session()
    session.auth = ("admin", PASSWORD)

    def retrieve(transfer_syntax):
        return session.get(study_url, timeout=120, headers={
            "Accept": f'multipart/related; type="application/dicom"; transfer-syntax={transfer_syntax}'})

    answer = retrieve(EXPLICIT_VR_LITTLE_ENDIAN)
    assert answer.status_code == 200, answer.text
    parts = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, dicom_parts(answer))}
    assert_decompressed(parts, stored, EXPLICIT_VR_LITTLE_ENDIAN)
    as_stored = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, dicom_parts(retrieve("*")))}
    assert {uid: ds.file_meta.TransferSyntaxUID for uid, ds in as_stored.items()} == {
        uid: ds.file_meta.TransferSyntaxUID for uid, ds in stored.items()}
    for lossless in ("1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"):
        answer = retrieve(lossless)
        assert answer.status_code == 200, answer.text
        assert_decompressed({ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, dicom_parts(answer))}, stored, lossless)
    assert retrieve("1.2.840.10008.1.2.4.50").status_code == 406  # lossy: never made
    assert codec_libraries(daemon.process.pid) == set()


def dicom_parts(response) -> list:
    """The application/dicom parts of a multipart/related answer, as binary files."""
    boundary = response.headers["Content-Type"].split("boundary=")[1].strip('"').encode()
    parts = []
    for chunk in response.content.split(b"--" + boundary)[1:-1]:
        headers, _, body = chunk.partition(b"\r\n\r\n")
        parts.append(io.BytesIO(body.removesuffix(b"\r\n")))
    return parts
