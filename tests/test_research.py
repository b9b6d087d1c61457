"""Research exports: a labelled collection de-identified (PS3.15 Annex E's Basic Profile and its
options) into a new collection, with a pseudonym map an administrator can re-identify with.

Every exported file is fetched back over REST and walked element by element, sequences
included: nothing of the originals' names, IDs, dates or UIDs may be left, unless an option
keeps it."""

import copy as copying
import csv
import io
import json
import os
import stat
import subprocess
import sys

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

import dicoogled
import studygen
from conftest import ROOT, wait_until
from restclient import ADMIN_ENV, Client, admin_client, base_url

SOURCE_LABEL, COPY_LABEL = "cohort", "cohort-deid"
OTHER_USER, OTHER_PASSWORD = "student", "student-pw-1"


def identifying(ds: Dataset, number: int) -> Dataset:
    """A generated instance made harder: identifiers in sequences, at two depths, and attributes
    each option keeps."""
    ds.IssuerOfPatientID = "HOSPITAL-A"
    ds.PatientAge, ds.PatientWeight = "056Y", 71.5
    ds.DeviceSerialNumber = f"SN-{number:05d}"
    ds.OperatorsName = "RATCHED^MILDRED"
    ds.InstitutionAddress = "1 Hospital Road"
    ds.AcquisitionDate = ds.StudyDate
    ds.StudyDescription = f"CT pelvis {ds.PatientName.family_name} {ds.PatientID} {ds.StudyDate}"
    other_id = Dataset()
    other_id.PatientID, other_id.IssuerOfPatientID = ds.PatientID + "-OLD", "HOSPITAL-B"
    ds.OtherPatientIDsSequence = Sequence([other_id])
    referenced_study = Dataset()
    referenced_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    referenced_study.ReferencedSOPInstanceUID = ds.StudyInstanceUID
    ds.ReferencedStudySequence = Sequence([referenced_study])
    source = Dataset()
    source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.SourceImageSequence = Sequence([source])
    # Content two levels down: a name, a date and a UID in an item of an item.
    observer, inner = Dataset(), Dataset()
    inner.PersonName, inner.Date, inner.UID = str(ds.PatientName), ds.StudyDate, ds.FrameOfReferenceUID
    inner.TextValue = f"Seen with {ds.PatientName.family_name}'s wife, Mrs RATCHED^MILDRED"
    observer.ValueType, observer.ContentSequence = "CONTAINER", Sequence([inner])
    ds.ContentSequence = Sequence([observer])
    return ds


@pytest.fixture
def archive(start_daemon, tmp_path):
    """A daemon with 2 patients x 2 studies x 1 series x 2 instances; patient 0's studies and
    patient 1's first study carry the label cohort."""
    daemon = start_daemon(env=ADMIN_ENV)
    paths = studygen.generate(tmp_path / "gen", patients=2, studies=2, series=1, instances=2)
    daemon.datasets = [identifying(pydicom.dcmread(path), number) for number, path in enumerate(paths)]
    assert set(daemon.store(*daemon.datasets)) == {0}
    daemon.client = admin_client(daemon)
    daemon.cohort = [ds for ds in daemon.datasets if ds.PatientID == daemon.datasets[0].PatientID]
    daemon.cohort += [ds for ds in daemon.datasets if ds.PatientID != daemon.datasets[0].PatientID][:2]
    cohort_sops = {ds.SOPInstanceUID for ds in daemon.cohort}
    #: The second study of the second patient: the one not in the cohort.
    daemon.others = [ds for ds in daemon.datasets if ds.SOPInstanceUID not in cohort_sops]
    for study_uid in sorted({ds.StudyInstanceUID for ds in daemon.cohort}):
        assert daemon.client.request("PUT", f"/studies/{study_uid}/labels/{SOURCE_LABEL}").status == 200
    return daemon


def export(daemon, into=COPY_LABEL, label=SOURCE_LABEL, **options) -> dict:
    """POST /research/export as JSON, then wait for its task to finish; the task's status."""
    response = daemon.client.request("POST", "/research/export", data=json.dumps({"label": label, "into": into, **options}).encode(),
                                     headers={"Content-Type": "application/json"})
    assert response.status == 202, response
    task_uid = response.json()["taskUid"]

    def finished():
        tasks = {t["taskUid"]: t for t in daemon.client.get("/index/task").json()["results"]}
        return tasks[task_uid] if tasks[task_uid].get("complete") else None

    return wait_until(finished, timeout=60, message="the research export to finish")


def exported(daemon, label=COPY_LABEL) -> list[Dataset]:
    """Every instance labelled label, fetched as its stored file."""
    response = daemon.client.get("/search", query=f"label:{label}", field="SOPInstanceUID")
    assert response.status == 200, response
    copies = []
    for result in response.json()["results"]:
        file = daemon.client.get("/legacy/file", uid=result["fields"]["SOPInstanceUID"])
        assert file.status == 200, file
        copies.append(pydicom.dcmread(io.BytesIO(file.body)))
    return copies


def every_element(ds: Dataset):
    """Every element of a data set, its file meta group and every item of every sequence."""
    for element in [*getattr(ds, "file_meta", []), *ds]:
        yield element
        if element.VR == "SQ":
            for item in element.value:
                yield from every_element(item)


def values_of(element) -> list[str]:
    if element.VR == "SQ" or element.value is None:
        return []
    values = element.value if isinstance(element.value, (list, pydicom.multival.MultiValue)) else [element.value]
    return [str(value) for value in values if not isinstance(value, bytes)]


def originals(datasets, keywords) -> set[str]:
    return {str(ds.get(keyword)) for ds in datasets for keyword in keywords if ds.get(keyword) not in (None, "")}


def leaks(copies, secrets) -> list[str]:
    """"tag: value" of every element of copies that holds one of secrets, or contains one."""
    found = []
    for copy in copies:
        for element in every_element(copy):
            for value in values_of(element):
                if any(secret and (value == secret or len(secret) > 5 and secret in value) for secret in secrets):
                    found.append(f"{element.tag} {element.keyword}: {value}")
    return found


def test_export_leaves_nothing_identifying(archive):
    daemon = archive
    task = export(daemon)
    assert (task["nIndexed"], task["nErrors"]) == (len(daemon.cohort), 0)
    copies = exported(daemon)
    assert len(copies) == len(daemon.cohort)
    assert not {c.SOPInstanceUID for c in copies} & {ds.SOPInstanceUID for ds in daemon.datasets}
    names = {str(ds.PatientName) for ds in daemon.cohort} | {ds.PatientName.family_name for ds in daemon.cohort}
    ids = originals(daemon.cohort, ["PatientID", "AccessionNumber", "IssuerOfPatientID", "DeviceSerialNumber"])
    ids |= {ds.PatientID + "-OLD" for ds in daemon.cohort} | {"RATCHED^MILDRED", "1 Hospital Road", "HOSPITAL-B"}
    dates = originals(daemon.cohort, ["StudyDate", "PatientBirthDate", "AcquisitionDate"])
    uids = originals(daemon.cohort, ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"])
    assert leaks(copies, names | ids | dates | uids) == []
    for copy in copies:
        assert not any(element.tag.is_private for element in every_element(copy))
        assert copy.PatientIdentityRemoved == "YES" and copy.LongitudinalTemporalInformationModified == "REMOVED"
        assert [code.CodeValue for code in copy.DeidentificationMethodCodeSequence] == ["113100"]
        assert "Basic Profile" in copy.DeidentificationMethod
        assert copy.PatientName == copy.PatientID and str(copy.PatientID).startswith("ANON-")
        assert "PatientAge" not in copy and "StudyDescription" not in copy and not copy.get("StationName")
        # A reference to an instance of the same export points at that instance's copy.
        assert copy.SourceImageSequence[0].ReferencedSOPInstanceUID == copy.SOPInstanceUID
        assert copy.ContentSequence[0].ContentSequence[0].UID == copy.FrameOfReferenceUID
        assert copy.file_meta.MediaStorageSOPInstanceUID == copy.SOPInstanceUID
    # The copies are a collection of their own, and the originals are untouched.
    assert {label["label"]: label["studies"] for label in daemon.client.get("/labels").json()["labels"]} == {
        SOURCE_LABEL: 3, COPY_LABEL: 3}
    assert len(daemon.client.get("/search", query=f"label:{SOURCE_LABEL}", field="SOPInstanceUID").json()["results"]) == 6
    patients = {c.PatientID for c in copies}
    assert len(patients) == 2  # one pseudonym per patient, whichever study


def test_pseudonyms_stable_and_reversible(archive):
    daemon = archive
    export(daemon)
    first = {(c.get("PatientID"), c.StudyInstanceUID, c.SOPInstanceUID) for c in exported(daemon)}
    export(daemon, into="second-look")
    second = {(c.get("PatientID"), c.StudyInstanceUID, c.SOPInstanceUID) for c in exported(daemon, "second-look")}
    assert first == second  # same patient, same pseudonym; same original UID, same new UID
    # The same patient in another collection gets the same pseudonym too.
    listed = daemon.client.get("/research/pseudonyms").json()["pseudonyms"]
    other = daemon.others[0]
    assert daemon.client.request("PUT", f"/studies/{other.StudyInstanceUID}/labels/later").status == 200
    export(daemon, into="later-deid", label="later")
    pseudonym_of = {row["PatientID"]: row["pseudonym"] for row in listed}
    assert {c.PatientID for c in exported(daemon, "later-deid")} == {pseudonym_of[other.PatientID]}
    assert daemon.client.get("/research/pseudonyms").json()["pseudonyms"] == listed  # no one new

    # Re-identification through the map: every pseudonym names its patient, every UID its original.
    by_pseudonym = {row["pseudonym"]: row for row in listed}
    for copy in exported(daemon):
        original = next(ds for ds in daemon.cohort if dicoogled_uid(daemon, ds.SOPInstanceUID) == copy.SOPInstanceUID)
        row = by_pseudonym[copy.PatientID]
        assert (row["PatientID"], row["IssuerOfPatientID"], row["PatientName"], row["PatientBirthDate"]) == (
            original.PatientID, "HOSPITAL-A", str(original.PatientName), original.PatientBirthDate)
        assert dicoogled_original(daemon, copy.StudyInstanceUID) == original.StudyInstanceUID
    table = list(csv.DictReader(io.StringIO(daemon.client.get("/research/pseudonyms", format="csv").text)))
    assert {(row["pseudonym"], row["PatientID"]) for row in table} == {(row["pseudonym"], row["PatientID"]) for row in listed}
    # The map lives apart from the index (a file for the owner alone, or a schema of its own in
    # PostgreSQL, where every node reads it), and survives a restart.
    assert daemon.state_sql("pseudonyms", "SELECT count(*) FROM patients") == [(2,)]
    if not daemon.index_url:
        assert stat.S_IMODE(os.stat(daemon.data_dir / "pseudonyms.sqlite").st_mode) == 0o600
    daemon.restart()
    daemon.client = admin_client(daemon)
    assert daemon.client.get("/research/pseudonyms").json()["pseudonyms"] == listed
    export(daemon, into="after-restart")
    assert {(c.get("PatientID"), c.SOPInstanceUID) for c in exported(daemon, "after-restart")} == {
        (p, sop) for p, _, sop in first}


def dicoogled_uid(daemon, original: str) -> str:
    """The replacement of an original UID, as the map records it (asked by original=, and found
    the same in the whole list)."""
    rows = daemon.client.get("/research/uids", original=original).json()["uids"]
    assert len(rows) == 1 and rows[0]["original"] == original, rows
    assert rows == [row for row in daemon.client.get("/research/uids", psize=100000).json()["uids"] if row["original"] == original]
    return rows[0]["replacement"]


def dicoogled_original(daemon, replacement: str) -> str:
    rows = daemon.client.get("/research/uids", uid=replacement).json()["uids"]
    assert len(rows) == 1, rows
    return rows[0]["original"]


def test_options_are_honoured(archive):
    daemon = archive
    task = export(daemon, retain_dates="offset", retain_device_identity=True, retain_patient_characteristics=True,
                  clean_descriptors=True)
    assert task["nErrors"] == 0
    copies = exported(daemon)
    offsets = {row["pseudonym"]: row["dateOffsetDays"] for row in daemon.client.get("/research/pseudonyms").json()["pseudonyms"]}
    for copy in copies:
        original = next(ds for ds in daemon.cohort if dicoogled_uid(daemon, ds.SOPInstanceUID) == copy.SOPInstanceUID)
        offset = offsets[copy.PatientID]
        assert offset < 0
        moved = dicoogled._shift_date(original.StudyDate, offset)
        assert copy.StudyDate == moved != original.StudyDate and copy.AcquisitionDate == moved
        assert copy.ContentSequence[0].ContentSequence[0].Date != original.StudyDate  # D: a dummy date
        assert not copy.get("PatientBirthDate")  # never kept: with the dates it gives the age
        assert copy.LongitudinalTemporalInformationModified == "MODIFIED"
        assert (copy.StationName, copy.DeviceSerialNumber) == (original.StationName, original.DeviceSerialNumber)
        assert (copy.PatientAge, copy.PatientSex, copy.PatientWeight) == (original.PatientAge, original.PatientSex, original.PatientWeight)
        # Descriptions kept, without the name, the ID or the date written into them.
        assert copy.StudyDescription == "CT pelvis"
        assert sorted(code.CodeValue for code in copy.DeidentificationMethodCodeSequence) == [
            "113100", "113105", "113107", "113108", "113109"]
    # Full dates, on a study not exported yet (an instance exported again keeps its first copy).
    other = daemon.others[0]
    daemon.client.request("PUT", f"/studies/{other.StudyInstanceUID}/labels/dated")
    export(daemon, into="dated-deid", label="dated", retain_dates="full")
    for copy in exported(daemon, "dated-deid"):
        assert copy.StudyDate == other.StudyDate and copy.LongitudinalTemporalInformationModified == "UNMODIFIED"


def test_refusals(archive):
    daemon = archive
    client = daemon.client
    assert client.post("/user", data={"username": OTHER_USER, "password": OTHER_PASSWORD, "admin": "false"}).json() == {"success": True}
    student = Client(base_url(daemon))
    student.login(OTHER_USER, OTHER_PASSWORD)
    for method, path in (("POST", "/research/export"), ("GET", "/research/pseudonyms"), ("GET", "/research/uids")):
        assert student.request(method, path, data={"label": SOURCE_LABEL, "into": "x"} if method == "POST" else None).status == 403
        assert Client(base_url(daemon)).request(method, path).status == 401
    assert client.post("/research/export", data={"label": "nothing-here", "into": "x"}).status == 404
    assert client.post("/research/export", data={"label": SOURCE_LABEL, "into": SOURCE_LABEL}).status == 400
    assert client.post("/research/export", data={"label": SOURCE_LABEL, "into": "x", "retain_uids": "true"}).status == 400
    assert client.post("/research/export", data={"label": SOURCE_LABEL, "into": "x", "retain_dates": "some"}).status == 400
    assert client.post("/research/export", data={"label": SOURCE_LABEL, "into": "Not A Label!"}).status == 400
    assert client.post("/research/export", data={"label": SOURCE_LABEL}).status == 400
    assert client.get("/research/uids", uid="not-a-uid").status == 400
    assert client.get("/research/uids", original="not-a-uid").status == 400
    assert client.get("/research/uids", original=daemon.cohort[0].SOPInstanceUID).json() == {"uids": []}  # not exported
    assert client.get("/labels").json()["labels"] == [{"label": SOURCE_LABEL, "studies": 3}]  # nothing exported
    assert client.get("/research/pseudonyms").json() == {"pseudonyms": []}


def test_csv_cells_cannot_be_formulas(archive):
    daemon = archive
    ds = copying.deepcopy(daemon.datasets[-1])
    ds.PatientID, ds.PatientName = "=HYPERLINK(1)", "@SUM^A"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (pydicom.uid.generate_uid() for _ in range(3))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    assert daemon.store(ds) == [0]
    daemon.client.request("PUT", f"/studies/{ds.StudyInstanceUID}/labels/formula")
    export(daemon, into="formula-deid", label="formula")
    rows = list(csv.reader(io.StringIO(daemon.client.get("/research/pseudonyms", format="csv").text)))
    assert ["'=HYPERLINK(1)", "'@SUM^A"] in [row[1:4:2] for row in rows]


def test_burned_in_annotation_is_refused(archive):
    daemon = archive
    ds = daemon.datasets[-1]
    burned = copying.deepcopy(ds)
    burned.BurnedInAnnotation = "YES"
    burned.StudyInstanceUID, burned.SeriesInstanceUID, burned.SOPInstanceUID = (pydicom.uid.generate_uid() for _ in range(3))
    burned.file_meta.MediaStorageSOPInstanceUID = burned.SOPInstanceUID
    assert daemon.store(burned) == [0]
    daemon.client.request("PUT", f"/studies/{burned.StudyInstanceUID}/labels/burned")
    task = export(daemon, into="burned-deid", label="burned")
    assert (task["nIndexed"], task["nErrors"]) == (0, 1)
    assert exported(daemon, "burned-deid") == []


def test_command_line_export(archive):
    daemon = archive
    daemon.stop()
    run = subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "research-export", "--data-dir", str(daemon.data_dir), *daemon.index_args,
                          SOURCE_LABEL, COPY_LABEL, "--retain-dates", "offset"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert (report["stored"], report["failed"], len(report["studies"])) == (len(daemon.cohort), 0, 3)
    daemon.start()
    daemon.client = admin_client(daemon)
    copies = exported(daemon)
    assert len(copies) == len(daemon.cohort) and all(c.LongitudinalTemporalInformationModified == "MODIFIED" for c in copies)
    assert len(daemon.client.get("/research/pseudonyms").json()["pseudonyms"]) == 2


def test_table_is_the_standards():
    """The Basic Profile's table here is the one dicom-anonymizer generates from the standard."""
    selector = pytest.importorskip("dicomanonymizer.dicomfields_selector")
    theirs = selector.dicom_anonymization_database_selector("dicomfields_2026c")
    names = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z",
             "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*"}
    expected = {(tag[0] << 16) | tag[1]: action for category, action in names.items() for tag in theirs[category] if len(tag) == 2}
    ours = dicoogled.basic_profile_table()
    assert {tag: action for tag, action in ours.items() if dicoogled.keyword_for_tag(tag) not in dicoogled.BEYOND_THE_TABLE} == expected
    masked = {tuple(tag) for tag in theirs["X_TAGS"] if len(tag) == 4}
    assert masked == {(group, element or 0, mask, 0 if element is None else 0xFFFF)
                      for mask, group, element in dicoogled.BASIC_PROFILE_REPEATING_GROUPS}
    for keywords in (dicoogled.DEVICE_IDENTITY_ATTRIBUTES, dicoogled.PATIENT_CHARACTERISTICS_ATTRIBUTES,
                     dicoogled.DESCRIPTOR_ATTRIBUTES):
        assert all(pydicom.datadict.tag_for_keyword(keyword) for keyword in keywords)
