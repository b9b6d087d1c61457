"""`dicoogled sample-data DIR`: the course's teaching set, written on the machine, the same bytes
every time, and every file of it readable, storable over C-STORE and found again with C-FIND."""

import hashlib
import pathlib
import subprocess
import sys

import pydicom
from pynetdicom import AE

from conftest import AET, NODELAY, ROOT, make_identifier

#: What the course (docs/learn/03-sample-data.md) promises the set holds.
PATIENTS = {
    "SAMPLE01": "DOE^JOHN",
    "SAMPLE02": "MÜLLER^JÜRGEN",
    "SAMPLE03": "Yamada^Tarou=山田^太郎=やまだ^たろう",
    "SAMPLE04": "ΠΑΠΑΔΟΠΟΥΛΟΥ^ΕΛΕΝΗ",
}
SOP_CLASSES = {"CT Image Storage", "MR Image Storage", "Ultrasound Image Storage",
               "Ultrasound Multi-frame Image Storage", "Basic Text SR Storage"}
TRANSFER_SYNTAXES = {"Explicit VR Little Endian", "Implicit VR Little Endian", "RLE Lossless",
                     "JPEG-LS Lossless Image Compression", "JPEG 2000 Image Compression (Lossless Only)"}


def sample_data(folder: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "sample-data", str(folder)],
                          capture_output=True, text=True, timeout=120, check=True, cwd=ROOT)


def digests(folder: pathlib.Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_the_set_is_what_the_course_says(tmp_path):
    result = sample_data(tmp_path / "sample")
    assert result.stdout.startswith(f"wrote 27 files to {tmp_path / 'sample'}: 4 patients, 5 studies\n")
    assert result.stderr == ""
    datasets = [pydicom.dcmread(p) for p in sorted((tmp_path / "sample").rglob("*.dcm"))]
    assert len(datasets) == 27
    assert {ds.PatientID: str(ds.PatientName) for ds in datasets} == PATIENTS
    assert {ds.SOPClassUID.name for ds in datasets} == SOP_CLASSES
    assert {ds.file_meta.TransferSyntaxUID.name for ds in datasets} == TRANSFER_SYNTAXES
    assert {ds.get("SpecificCharacterSet") for ds in datasets} == {None, "ISO_IR 100", "ISO_IR 192"}
    for ds in datasets:
        # In Implicit VR the reader knows no VR for a private tag: UN, its value bytes.
        assert ds.private_block(0x0009, "DICOOGLED SAMPLE")[0x10].value in ("dicoogled teaching set", b"dicoogled teaching set")
        assert len(ds.SOPInstanceUID) <= 64 and pydicom.uid.UID(ds.SOPInstanceUID).is_valid
        if ds.SOPClassUID.name == "Basic Text SR Storage":
            assert "nodule" in ds.ContentSequence[0].TextValue
        else:
            ds.pixel_array  # every codec decodes what was encoded
    cine = next(ds for ds in datasets if ds.SOPClassUID.name == "Ultrasound Multi-frame Image Storage")
    assert cine.pixel_array.shape == (8, 64, 64)


def test_the_same_bytes_every_time(tmp_path):
    sample_data(tmp_path / "one")
    sample_data(tmp_path / "two")
    assert digests(tmp_path / "one") == digests(tmp_path / "two")


def test_the_daemon_stores_and_finds_the_whole_set(tmp_path, daemon):
    sample_data(tmp_path / "sample")
    datasets = [pydicom.dcmread(p) for p in sorted((tmp_path / "sample").rglob("*.dcm"))]
    ae = AE(ae_title="LEARNER")
    for context in sorted({(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}):
        ae.add_requested_context(*context)
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title=AET, evt_handlers=NODELAY)
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()
    assert statuses == [0x0000] * 27
    assert daemon.counts()["instances"] == 27

    patients, status = daemon.find(make_identifier("PATIENT", PatientID="", PatientName=""), model="patient")
    assert status == 0x0000
    assert {ds.PatientID: str(ds.PatientName) for ds in patients} == PATIENTS
    studies, _ = daemon.find(make_identifier("STUDY", PatientID="SAMPLE01", StudyInstanceUID="", ModalitiesInStudy=""))
    modalities = sorted(sorted(ds["ModalitiesInStudy"].value if ds["ModalitiesInStudy"].VM > 1
                               else [ds.ModalitiesInStudy]) for ds in studies)
    assert modalities == [["CT"], ["CT", "SR"]]
    greek, _ = daemon.find(make_identifier("STUDY", SpecificCharacterSet="ISO_IR 192",
                                                 PatientName="ΠΑΠΑΔΟΠΟΥΛΟΥ*", StudyDescription=""))
    assert [ds.StudyDescription for ds in greek] == ["CT head"]
