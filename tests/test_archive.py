"""ZIP and DICOM media downloads, and imports: a study, a selection and a label out as ZIP files
(compared byte for byte with what is stored), ZIP64 past 2 GiB, a DICOMDIR read back by pydicom
and DCMTK's dcmdump, and both imported into a fresh archive that then answers C-FIND alike."""

import io
import json
import pathlib
import re
import struct
import subprocess
import urllib.request
import zipfile

import pydicom
import pytest
from pydicom.fileset import FileSet

import dicoogled
import studygen
from conftest import make_identifier, wait_until
from restclient import ADMIN_ENV, Client, admin_client, base_url


@pytest.fixture
def archive(start_daemon, tmp_path):
    """A daemon holding 2 patients x 2 studies x 2 series x 2 instances, received by C-STORE."""
    daemon = start_daemon(env=ADMIN_ENV)
    daemon.paths = studygen.generate(tmp_path / "gen", patients=2, studies=2, series=2, instances=2, modality="mixed")
    assert set(daemon.store(*daemon.paths)) == {0}
    daemon.datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in daemon.paths]
    daemon.client = admin_client(daemon)
    return daemon


def stored_bytes(daemon, dataset) -> bytes:
    """What the archive holds of an instance: its file in the storage folder."""
    return (daemon.data_dir / "storage" / dataset.StudyInstanceUID / dataset.SeriesInstanceUID
            / f"{dataset.SOPInstanceUID}.dcm").read_bytes()


def opened_zip(response) -> zipfile.ZipFile:
    assert response.status == 200, response
    assert response.headers["Content-Type"] == "application/zip"
    return zipfile.ZipFile(io.BytesIO(response.body))


def wait_for_import(client, answer) -> dict:
    assert answer.status == 202, answer
    uid = answer.json()["taskUid"]

    def finished():
        status = client.get(f"/import/{uid}").json()
        return status if status.get("complete") else None
    return wait_until(finished, timeout=120, message="the import to finish")


def find_answers(daemon) -> dict:
    """Every C-FIND answer at the study, series and image levels, as comparable text."""
    keys = {"STUDY": dict(PatientID="", PatientName="", StudyInstanceUID="", StudyDate="", StudyID="",
                          ModalitiesInStudy="", NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances=""),
            "SERIES": dict(StudyInstanceUID="", SeriesInstanceUID="", Modality="", SeriesNumber="",
                           NumberOfSeriesRelatedInstances=""),
            "IMAGE": dict(StudyInstanceUID="", SeriesInstanceUID="", SOPInstanceUID="", SOPClassUID="", InstanceNumber="")}
    answers = {}
    for level, wanted in keys.items():
        results, status = daemon.find(make_identifier(level, **wanted), model="study")
        assert status == 0
        answers[level] = sorted(json.dumps({k: str(r.get(k, "")) for k in wanted}, sort_keys=True) for r in results)
    return answers


# ---- downloads -------------------------------------------------------------------------------


def test_study_zip_holds_every_stored_file_byte_for_byte(archive):
    study = archive.datasets[0].StudyInstanceUID
    response = archive.client.get(f"/studies/{study}/archive")
    with opened_zip(response) as zipped:
        assert zipped.testzip() is None
        in_study = [d for d in archive.datasets if d.StudyInstanceUID == study]
        expected = {f"{d.PatientID}/{d.StudyInstanceUID}/{d.SeriesInstanceUID}/{d.SOPInstanceUID}.dcm": d
                    for d in in_study}
        assert sorted(zipped.namelist()) == sorted(expected)
        for name, dataset in expected.items():
            assert zipped.read(name) == stored_bytes(archive, dataset)
    assert f'filename="{study}.zip"' in response.headers["Content-Disposition"]


def test_a_selection_and_a_label_download_exactly_what_they_name(archive):
    studies = sorted({d.StudyInstanceUID for d in archive.datasets})[:2]
    series = next(d.SeriesInstanceUID for d in archive.datasets if d.StudyInstanceUID not in studies)
    wanted = {d.SOPInstanceUID for d in archive.datasets if d.StudyInstanceUID in studies or d.SeriesInstanceUID == series}
    by_get = archive.client.request("GET", "/archive", [("study", studies[0]), ("study", studies[1]), ("series", series)])
    by_post = archive.client.request("POST", "/archive", data=json.dumps({"studies": studies, "series": [series]}).encode(),
                                     headers={"Content-Type": "application/json"})
    for response in (by_get, by_post):
        with opened_zip(response) as zipped:
            assert {pathlib.PurePosixPath(n).stem for n in zipped.namelist()} == wanted
    assert archive.client.request("PUT", f"/series/{series}/labels/course-a").status == 200
    with opened_zip(archive.client.get("/archive", label="course-a")) as zipped:
        labelled = {d.SOPInstanceUID: d for d in archive.datasets if d.SeriesInstanceUID == series}
        assert {pathlib.PurePosixPath(n).stem for n in zipped.namelist()} == set(labelled)
        for name in zipped.namelist():
            assert zipped.read(name) == stored_bytes(archive, labelled[pathlib.PurePosixPath(name).stem])
    assert archive.client.get("/archive", label="no-such-label").status == 404
    assert archive.client.get("/archive").status == 400
    assert archive.client.get("/archive", study="../../etc").status == 400
    assert archive.client.get(f"/studies/{studies[0]}/archive", deidentify="true", retain_dates="someday").status == 400


def test_entry_names_made_from_tags_cannot_lead_out_of_the_folder(start_daemon, tmp_path):
    daemon = start_daemon(env=ADMIN_ENV)
    hostile = studygen.make_instance(0, 0, 0, 0, PatientID="../../etc/passwd")
    assert daemon.store(hostile) == [0]
    with opened_zip(admin_client(daemon).get(f"/studies/{hostile.StudyInstanceUID}/archive")) as zipped:
        (name,) = zipped.namelist()
        assert name.split("/")[0] == "_.._etc_passwd"
        assert ".." not in name.split("/")


def test_media_download_has_a_dicomdir_that_pydicom_and_dcmtk_read(archive, tmp_path):
    study = archive.datasets[0].StudyInstanceUID
    in_study = {d.SOPInstanceUID: d for d in archive.datasets if d.StudyInstanceUID == study}
    with opened_zip(archive.client.get(f"/studies/{study}/media")) as zipped:
        assert zipped.namelist()[0] == "DICOMDIR"
        zipped.extractall(tmp_path / "media")
    dicomdir = pydicom.dcmread(tmp_path / "media" / "DICOMDIR")
    assert dicomdir.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.1.3.10"
    file_set = FileSet(dicomdir)
    assert {instance.SOPInstanceUID for instance in file_set} == set(in_study)
    for instance in file_set:  # each record names a file that is the stored one, byte for byte
        assert pathlib.Path(instance.path).read_bytes() == stored_bytes(archive, in_study[instance.SOPInstanceUID])
    dumped = subprocess.run(["dcmdump", str(tmp_path / "media" / "DICOMDIR")], capture_output=True, text=True, timeout=60)
    assert dumped.returncode == 0, dumped.stderr
    assert "DirectoryRecordSequence" in dumped.stdout
    assert dumped.stdout.count("(0004,1430) CS [IMAGE") == len(in_study)


def test_deidentified_downloads_carry_pseudonyms_not_originals(archive, tmp_path):
    """deidentify=true sends each object through the research export's de-identifier: names,
    IDs and UIDs of the originals appear nowhere (not in entry names, not in a DICOMDIR), and the
    pseudonym map gives each copy back its original, the same in a ZIP and on media."""
    study = archive.datasets[0].StudyInstanceUID
    originals = {d.SOPInstanceUID: d for d in archive.datasets if d.StudyInstanceUID == study}
    with opened_zip(archive.client.get(f"/studies/{study}/archive", deidentify="true")) as zipped:
        names = zipped.namelist()
        copies = [pydicom.dcmread(io.BytesIO(zipped.read(name))) for name in names]
    with opened_zip(archive.client.get(f"/studies/{study}/media", deidentify="true")) as zipped:
        dicomdir = zipped.read("DICOMDIR")
        media_copies = [pydicom.dcmread(io.BytesIO(zipped.read(n))) for n in zipped.namelist() if n != "DICOMDIR"]
    assert len(copies) == len(originals)
    secrets = {study, archive.datasets[0].PatientID, str(archive.datasets[0].PatientName)} | set(originals)
    for secret in secrets:
        assert not any(secret in name for name in names), secret
        assert secret.encode() not in dicomdir, secret
    back = {}
    for copy in copies:
        assert copy.PatientIdentityRemoved == "YES" and copy.PatientID not in secrets
        [pair] = archive.client.get("/research/uids", uid=copy.SOPInstanceUID).json()["uids"]
        back[pair["original"]] = copy.SOPInstanceUID
    assert set(back) == set(originals)  # every copy reversible with the map
    assert {c.SOPInstanceUID for c in media_copies} == set(back.values())  # and the same copies on media


def test_downloads_and_imports_need_a_login(archive):
    study = archive.datasets[0].StudyInstanceUID
    anonymous = Client(base_url(archive))
    for path in (f"/studies/{study}/archive", f"/studies/{study}/media", "/archive?study=" + study):
        assert anonymous.get(path).status == 401
    assert anonymous.request("POST", "/import", data=b"PK\x05\x06" + bytes(18),
                             headers={"Content-Type": "application/zip"}).status == 401
    archive.client.post("/user", data={"username": "teacher", "password": "teacher-pass-1", "admin": "false"})
    teacher = Client(base_url(archive))
    teacher.login("teacher", "teacher-pass-1")
    assert teacher.request("POST", "/import", params={"path": str(archive.data_dir)}).status == 403


# ---- imports -----------------------------------------------------------------------------------


def test_zip_and_media_imported_into_a_fresh_archive_answer_c_find_alike(archive, start_daemon, tmp_path):
    studies = sorted({d.StudyInstanceUID for d in archive.datasets})
    plain = archive.client.request("GET", "/archive", [("study", s) for s in studies]).body
    media = archive.client.request("GET", "/archive", [("study", s) for s in studies] + [("media", "true")]).body
    expected = find_answers(archive)
    for name, body in (("from-zip", plain), ("from-media", media)):
        fresh = start_daemon(env=ADMIN_ENV, name=name)
        client = admin_client(fresh)
        report = wait_for_import(client, client.request("POST", "/import", data=body,
                                                        headers={"Content-Type": "application/zip"}))
        assert report["nIndexed"] == len(archive.datasets) and report["failures"] == [], report
        assert report["nSkipped"] == (1 if name == "from-media" else 0)  # the DICOMDIR
        assert find_answers(fresh) == expected
        if name == "from-zip":  # received through the one ingest path: stored byte for byte, origin import
            for dataset in archive.datasets:
                assert stored_bytes(fresh, dataset) == stored_bytes(archive, dataset)


def test_import_reports_what_is_not_dicom_and_imports_the_rest(archive, start_daemon):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr("notes/README.txt", "not an image")
        zipped.writestr("broken.dcm", b"\x00" * 128 + b"DICM" + b"\x02\x00garbage")
        zipped.writestr("good.dcm", stored_bytes(archive, archive.datasets[0]))
    fresh = start_daemon(env=ADMIN_ENV, name="fresh")
    client = admin_client(fresh)
    # as the web app sends it too: a multipart form with the field "file"
    boundary = "archiveboundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.zip\"\r\n"
            "Content-Type: application/zip\r\n\r\n").encode() + buffer.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    report = wait_for_import(client, client.request("POST", "/import", data=form, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"}))
    assert report["nIndexed"] == 1 and report["nErrors"] == 2
    reasons = {failure["file"]: failure["reason"] for failure in report["failures"]}
    assert set(reasons) == {"notes/README.txt", "broken.dcm"}
    assert "not a DICOM file" in reasons["notes/README.txt"]
    results, _ = fresh.find(make_identifier("IMAGE", StudyInstanceUID=archive.datasets[0].StudyInstanceUID,
                                            SOPInstanceUID=""))
    assert [r.SOPInstanceUID for r in results] == [archive.datasets[0].SOPInstanceUID]
    # someone else's import is not theirs to see
    client.post("/user", data={"username": "other", "password": "other-pass-1", "admin": "false"})
    other = Client(base_url(fresh))
    other.login("other", "other-pass-1")
    assert other.get(f"/import/{report['taskUid']}").status == 404


def zip_of(entries: dict, compression=zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zipped:
        for name, data in entries.items():
            zipped.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["../escape.dcm", "/etc/cron.d/evil", "a/../../b.dcm", "C:/windows/evil.dcm"])
def test_zip_slip_names_are_refused_whole(daemon_with_admin, name):
    answer = daemon_with_admin.client.request("POST", "/import", data=zip_of({"ok.dcm": b"x", name: b"x"}),
                                              headers={"Content-Type": "application/zip"})
    assert answer.status == 400, answer
    assert "unsafe entry name" in answer.json()["error"]
    assert daemon_with_admin.client.get("/index/task").json()["results"] == []  # nothing started


def test_a_zip_bomb_is_refused_whole(daemon_with_admin):
    bomb = zip_of({"zeros.dcm": bytes(64 * 1024 * 1024)}, zipfile.ZIP_DEFLATED)
    answer = daemon_with_admin.client.request("POST", "/import", data=bomb, headers={"Content-Type": "application/zip"})
    assert answer.status == 413, answer
    assert "import_max_ratio" in answer.json()["error"]
    answer = daemon_with_admin.client.request("POST", "/import", data=b"not a zip at all",
                                              headers={"Content-Type": "application/zip"})
    assert answer.status == 400 and "not a ZIP file" in answer.json()["error"]


def test_the_import_and_media_limits_are_config_keys(start_daemon):
    daemon = start_daemon(config_text="[archives]\nimport_max_unpacked_mb = 1\nmedia_max_instances = 1\n", env=ADMIN_ENV)
    answer = admin_client(daemon).request("POST", "/import", data=zip_of({"big.dcm": bytes(2 * 1024 * 1024)}),
                                          headers={"Content-Type": "application/zip"})
    assert answer.status == 413 and "import_max_unpacked_mb" in answer.json()["error"]
    two = [studygen.make_instance(0, 0, 0, n) for n in range(2)]
    assert daemon.store(*two) == [0, 0]
    client = admin_client(daemon)
    refused = client.get(f"/studies/{two[0].StudyInstanceUID}/media")
    assert refused.status == 413 and "media_max_instances" in refused.json()["error"]
    assert client.get(f"/studies/{two[0].StudyInstanceUID}/archive").status == 200


def test_an_administrator_imports_a_server_folder(daemon_with_admin, tmp_path):
    paths = studygen.generate(tmp_path / "cd", patients=1, studies=1, series=1, instances=3)
    report = wait_for_import(daemon_with_admin.client,
                             daemon_with_admin.client.request("POST", "/import", params={"path": str(tmp_path / "cd")}))
    assert report["nIndexed"] == 3 and report["nFiles"] == 3
    assert all(p.exists() for p in paths)  # copied in, never moved


@pytest.fixture
def daemon_with_admin(start_daemon):
    daemon = start_daemon(env=ADMIN_ENV)
    daemon.client = admin_client(daemon)
    return daemon


# ---- ZIP64 -----------------------------------------------------------------------------------


def test_forced_zip64_writes_its_extensions_and_reads_back():
    entries = [(f"e{n}.dcm", 1000, [bytes([n]) * 1000]) for n in range(3)]
    data = b"".join(dicoogled.stream_zip(entries, force_zip64=True))
    assert data.count(b"PK\x03\x04") == 3
    header_extra = struct.unpack_from("<HH", data, 30 + len("e0.dcm"))  # the first local header's extra field
    assert header_extra[0] == 0x0001  # the ZIP64 extended information
    assert data.count(b"PK\x07\x08") == 3  # a data descriptor after each entry: it was streamed
    with zipfile.ZipFile(io.BytesIO(data)) as zipped:
        assert zipped.testzip() is None
        assert zipped.read("e2.dcm") == bytes([2]) * 1000


def sparse_instance(path: pathlib.Path, pixel_bytes: int):
    """A valid instance whose pixel data (zeros) takes pixel_bytes on disk only as a sparse file."""
    dataset = studygen.make_instance(5, 0, 0, 0, Rows=32768, Columns=32768, PixelData=None)
    pydicom.dcmwrite(path, dataset, enforce_file_format=True, little_endian=True, implicit_vr=False)
    with open(path, "r+b") as handle:
        handle.seek(0, 2)
        handle.write(b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", pixel_bytes))
        handle.truncate(handle.tell() + pixel_bytes)
    return dataset


def test_a_study_past_2_gib_downloads_as_zip64(daemon_with_admin, tmp_path):
    """One instance of 2.1 GiB of zeros, indexed in place from a sparse file, then a small one:
    its entry needs ZIP64 sizes, the next one a ZIP64 offset, the ZIP the ZIP64 end records.
    The download is kept as a sparse file too (runs of zeros skipped), then read by zipfile."""
    folder = tmp_path / "large"
    folder.mkdir()
    pixel_bytes = 32768 * 32768 * 2 + 64 * 1024 * 1024
    big = sparse_instance(folder / "big.dcm", pixel_bytes)
    small = studygen.make_instance(5, 0, 0, 1)
    pydicom.dcmwrite(folder / "small.dcm", small, enforce_file_format=True)
    client = daemon_with_admin.client
    assert client.post("/management/tasks/index", uri=str(folder)).status == 200
    wait_until(lambda: daemon_with_admin.counts()["instances"] == 2, timeout=120, message="both indexed")
    kept = tmp_path / "download.zip"
    stream = urllib.request.urlopen(urllib.request.Request(  # read as it comes: over 2 GiB
        f"{base_url(daemon_with_admin)}/studies/{big.StudyInstanceUID}/archive", headers={"Authorization": client.token}),
        timeout=300)
    with stream, open(kept, "wb") as handle:
        while chunk := stream.read(1024 * 1024):
            if chunk.count(0) == len(chunk):
                handle.seek(len(chunk), 1)
            else:
                handle.write(chunk)
        handle.truncate()
    # Streamed: the daemon never held the ZIP, nor the big file, whole (its peak resident memory).
    peak_kb = int(re.search(r"VmHWM:\s+(\d+) kB", pathlib.Path(f"/proc/{daemon_with_admin.process.pid}/status").read_text())[1])
    assert peak_kb < 512 * 1024, f"the daemon's peak memory was {peak_kb // 1024} MB"
    with open(kept, "rb") as handle:
        handle.seek(-4096, 2)
        tail = handle.read()
    assert b"PK\x06\x06" in tail and b"PK\x06\x07" in tail  # the ZIP64 end record and its locator
    with zipfile.ZipFile(kept) as zipped:
        sizes = {pathlib.PurePosixPath(info.filename).stem: info.file_size for info in zipped.infolist()}
        assert sizes[big.SOPInstanceUID] == (folder / "big.dcm").stat().st_size > 2**31
        assert zipped.read(next(n for n in zipped.namelist() if small.SOPInstanceUID in n)) == (folder / "small.dcm").read_bytes()
        with zipped.open(next(n for n in zipped.namelist() if big.SOPInstanceUID in n)) as entry:
            head = entry.read(4096)
            assert head == (folder / "big.dcm").read_bytes()[:4096]


def test_imports_pass_the_quota_as_received_objects_do(archive, start_daemon):
    """The one ingest path: [storage] max_instances counts imported objects and refuses the rest,
    each listed with the reason a C-STORE would hear."""
    body = archive.client.request("GET", "/archive", [("study", archive.datasets[0].StudyInstanceUID)]).body
    fresh = start_daemon(config_text="[storage]\nmax_instances = 3\n", env=ADMIN_ENV, name="quota")
    client = admin_client(fresh)
    report = wait_for_import(client, client.request("POST", "/import", data=body, headers={"Content-Type": "application/zip"}))
    in_study = sum(d.StudyInstanceUID == archive.datasets[0].StudyInstanceUID for d in archive.datasets)
    assert report["nIndexed"] == 3 and report["nErrors"] == in_study - 3
    assert all("max_instances" in failure["reason"] for failure in report["failures"])
    assert fresh.counts()["instances"] == 3
