"""DICOMweb (plugins/dicomweb.py) with dicomweb-client as the client: QIDO-RS, WADO-RS, STOW-RS, WADO-URI."""

import email.parser
import email.policy
import io
import pathlib
import random

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file

import studygen
from conftest import RunningDaemon, make_identifier

PASSWORD = "dicomweb-secret"
AUTH = ("admin", PASSWORD)


def split_multipart(response: requests.Response) -> list[tuple[str, bytes]]:
    """(content type, payload) of each part, parsed by the standard library's email parser."""
    head = f"Content-Type: {response.headers['Content-Type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + response.content)
    return [(part.get_content_type(), part.get_payload(decode=True)) for part in message.iter_parts()]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A daemon holding two generated patients (mixed CT/MR) and a few pydicom files."""
    root = tmp_path_factory.mktemp("dicomweb")
    daemon = RunningDaemon(root / "data", "[plugin.dicomweb]\ncors_origins = http://viewer.example\n",
                           env={"DICOOGLED_ADMIN_PASSWORD": PASSWORD}).start()
    paths = studygen.generate(root / "gen", patients=3, studies=2, series=2, instances=3, modality="mixed")
    assert set(daemon.store(*paths)) == {0}
    extra = [get_testdata_file(n) for n in ("JPEG2000.dcm", "MR_small_RLE.dcm", "CT_small.dcm")]
    assert set(daemon.store(*extra)) == {0}
    daemon.paths = paths + [pathlib.Path(p) for p in extra]
    daemon.client = client_for(daemon)
    yield daemon
    daemon.stop()


def client_for(daemon, auth=AUTH) -> DICOMwebClient:
    session = requests.Session()
    session.auth = auth
    return DICOMwebClient(url=f"http://127.0.0.1:{daemon.http_port}/dicom-web", session=session)


def url(daemon, path: str) -> str:
    return f"http://127.0.0.1:{daemon.http_port}/dicom-web{path}"


def uids(results, tag: str) -> set[str]:
    return {r[tag]["Value"][0] for r in results}


def stored_file(daemon, sop_uid: str) -> bytes:
    return next(daemon.data_dir.joinpath("storage").rglob(f"{sop_uid}.dcm")).read_bytes()


# ---- QIDO-RS ------------------------------------------------------------------------------------

def test_qido_every_level_and_path_form(archive):
    c = archive.client
    generated = [pydicom.dcmread(p, stop_before_pixels=True) for p in archive.paths]
    studies = c.search_for_studies()
    assert uids(studies, "0020000D") == {d.StudyInstanceUID for d in generated}
    study = generated[0].StudyInstanceUID
    in_study = [d for d in generated if d.StudyInstanceUID == study]
    assert uids(c.search_for_series(study), "0020000E") == {d.SeriesInstanceUID for d in in_study}
    assert uids(c.search_for_instances(study), "00080018") == {d.SOPInstanceUID for d in in_study}
    series = in_study[0].SeriesInstanceUID
    assert uids(c.search_for_instances(study, series), "00080018") == {
        d.SOPInstanceUID for d in in_study if d.SeriesInstanceUID == series}
    assert uids(c.search_for_series(), "0020000E") == {d.SeriesInstanceUID for d in generated}
    assert len(c.search_for_instances()) == len(generated)


def test_qido_required_attributes_and_retrieve_url(archive):
    study = archive.client.search_for_studies(search_filters={"PatientID": "P0000000000"})[0]
    for tag in ("00080020", "00080050", "00080061", "00100010", "00100020", "0020000D", "00201206", "00201208"):
        assert tag in study, tag
    assert study["00081190"]["Value"][0].startswith(f"http://127.0.0.1:{archive.http_port}/dicom-web/studies/")
    instance = archive.client.search_for_instances(search_filters={"PatientID": "P0000000000"})[0]
    for tag in ("00080016", "00080018", "00200013", "00280010", "00280011"):
        assert tag in instance, tag


def test_qido_matching_is_c_find_matching(archive):
    """The same random queries through QIDO-RS and C-FIND return the same UIDs."""
    rng = random.Random(7)
    values = {
        "PatientName": ["DOE*", "*JOHN*", "müller*", "SMITH^ANNA", "?OE*", ""],
        "StudyDate": ["20140101-20181231", "-20170101", "20190101-", ""],
        "ModalitiesInStudy": ["CT", "MR", ""],
        "AccessionNumber": ["A*", ""],
    }
    for _ in range(12):
        keys = {k: rng.choice(v) for k, v in values.items()}
        keys = {k: v for k, v in keys.items() if v}
        qido = uids(archive.client.search_for_studies(search_filters=keys), "0020000D")
        found, status = archive.find(make_identifier("STUDY", StudyInstanceUID="", **keys))
        assert status == 0
        assert qido == {d.StudyInstanceUID for d in found}, keys


def test_qido_tag_keys_uid_lists_includefield_limit_offset(archive):
    c = archive.client
    by_tag = c.search_for_studies(search_filters={"00100020": "P0000000001"})
    by_keyword = c.search_for_studies(search_filters={"PatientID": "P0000000001"})
    assert uids(by_tag, "0020000D") == uids(by_keyword, "0020000D") and by_tag
    all_studies = sorted(uids(c.search_for_studies(), "0020000D"))
    two = ",".join(all_studies[:2])
    response = requests.get(url(archive, "/studies"), params={"StudyInstanceUID": two}, auth=AUTH)
    assert response.status_code == 200
    assert uids(response.json(), "0020000D") == set(all_studies[:2])
    page = c.search_for_studies(limit=2, offset=1)
    assert len(page) == 2
    everything = c.search_for_studies(fields=["all"])
    assert "00081030" in everything[0] or "00080080" in everything[0]
    included = c.search_for_studies(fields=["InstitutionName"])
    assert all("00080080" in s for s in included)


def test_qido_percent_encoded_wildcards_and_warnings(archive):
    raw = requests.get(url(archive, "/studies") + "?PatientName=DOE%2A", auth=AUTH)
    plain = requests.get(url(archive, "/studies"), params={"PatientName": "DOE*"}, auth=AUTH)
    assert raw.status_code == plain.status_code == 200
    assert uids(raw.json(), "0020000D") == uids(plain.json(), "0020000D") != set()
    fuzzy = requests.get(url(archive, "/studies"), params={"fuzzymatching": "true"}, auth=AUTH)
    assert "fuzzymatching" in fuzzy.headers.get("Warning", "")
    assert raw.headers["Content-Type"].startswith("application/dicom+json")


@pytest.mark.parametrize("query", ["limit=-1", "offset=abc", "limit=1.5", "QueryRetrieveLevel=BOGUS", "NoSuchKeyword=1"])
def test_qido_bad_parameters_are_400(archive, query):
    response = requests.get(url(archive, "/studies") + "?" + query, auth=AUTH)
    assert response.status_code == 400, response.text
    assert "error" in response.json()


def test_auth_cors_and_404(archive):
    assert requests.get(url(archive, "/studies")).status_code == 401
    assert requests.get(url(archive, "/studies"), auth=("admin", "wrong")).status_code == 401
    token = requests.post(f"http://127.0.0.1:{archive.http_port}/login", data={"username": "admin", "password": PASSWORD}).json()["token"]
    assert requests.get(url(archive, "/studies"), headers={"Authorization": f"Bearer {token}"}).status_code == 200
    cors = requests.get(url(archive, "/studies"), auth=AUTH, headers={"Origin": "http://viewer.example"})
    assert cors.headers.get("Access-Control-Allow-Origin") == "http://viewer.example"
    other = requests.get(url(archive, "/studies"), auth=AUTH, headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    preflight = requests.options(url(archive, "/studies"), headers={"Origin": "http://viewer.example"})
    assert preflight.status_code == 204
    assert requests.get(url(archive, "/studies/1.2.3.4/series/5.6"), auth=AUTH).status_code == 404
    assert requests.get(url(archive, "/studies/not-a-uid"), auth=AUTH).status_code == 400


# ---- WADO-RS ------------------------------------------------------------------------------------

def test_wado_retrieve_study_series_instance_byte_exact(archive):
    d = pydicom.dcmread(archive.paths[0], stop_before_pixels=True)
    for path in (f"/studies/{d.StudyInstanceUID}", f"/studies/{d.StudyInstanceUID}/series/{d.SeriesInstanceUID}",
                 f"/studies/{d.StudyInstanceUID}/series/{d.SeriesInstanceUID}/instances/{d.SOPInstanceUID}"):
        response = requests.get(url(archive, path), auth=AUTH, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert response.status_code == 200
        parts = split_multipart(response)
        assert parts and all(kind == "application/dicom" for kind, _ in parts)
        for _, payload in parts:
            sop = pydicom.dcmread(io.BytesIO(payload), stop_before_pixels=True).SOPInstanceUID
            assert payload == stored_file(archive, sop)
    instance = archive.client.retrieve_instance(d.StudyInstanceUID, d.SeriesInstanceUID, d.SOPInstanceUID)
    assert instance.SOPInstanceUID == d.SOPInstanceUID
    assert len(archive.client.retrieve_study(d.StudyInstanceUID)) == 2 * 3


def test_wado_transfer_syntax_negotiation(archive):
    j2k = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"), stop_before_pixels=True)
    base = f"/studies/{j2k.StudyInstanceUID}/series/{j2k.SeriesInstanceUID}/instances/{j2k.SOPInstanceUID}"
    as_stored = requests.get(url(archive, base), auth=AUTH, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert split_multipart(as_stored)[0][1] == stored_file(archive, j2k.SOPInstanceUID)
    decoded = requests.get(url(archive, base), auth=AUTH,
                           headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'})
    if decoded.status_code == 200:  # with the JPEG 2000 codec installed
        ds = pydicom.dcmread(io.BytesIO(split_multipart(decoded)[0][1]))
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert len(ds.PixelData) == ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
    else:
        assert decoded.status_code == 406
    odd = requests.get(url(archive, base), auth=AUTH,
                       headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.80'})
    assert odd.status_code == 406
    assert requests.get(url(archive, base), auth=AUTH, headers={"Accept": "text/html"}).status_code == 406


def test_wado_metadata_with_working_bulkdata_uris(archive):
    d = pydicom.dcmread(archive.paths[0], stop_before_pixels=True)
    metadata = archive.client.retrieve_series_metadata(d.StudyInstanceUID, d.SeriesInstanceUID)
    assert {m["00080018"]["Value"][0] for m in metadata} == {
        p.SOPInstanceUID for p in map(lambda x: pydicom.dcmread(x, stop_before_pixels=True), archive.paths)
        if p.SeriesInstanceUID == d.SeriesInstanceUID}
    first = next(m for m in metadata if m["00080018"]["Value"][0] == d.SOPInstanceUID)
    assert first["00100010"]["Value"][0]["Alphabetic"] == str(d.PatientName)
    bulk = first["7FE00010"]["BulkDataURI"]
    response = requests.get(bulk.replace("http://127.0.0.1/", f"http://127.0.0.1:{archive.http_port}/"), auth=AUTH)
    assert response.status_code == 200
    full = pydicom.dcmread(archive.paths[0])
    assert split_multipart(response)[0][1] == full.PixelData


def test_wado_frames_raw_and_compressed(archive):
    d = pydicom.dcmread(archive.paths[0])
    frames = archive.client.retrieve_instance_frames(d.StudyInstanceUID, d.SeriesInstanceUID, d.SOPInstanceUID, [1])
    assert frames[0] == d.PixelData
    j2k = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"), stop_before_pixels=True)
    response = requests.get(url(archive, f"/studies/{j2k.StudyInstanceUID}/series/{j2k.SeriesInstanceUID}/instances/{j2k.SOPInstanceUID}/frames/1"),
                            auth=AUTH, headers={"Accept": "multipart/related; type=image/jp2"})
    assert response.status_code == 200
    kind, payload = split_multipart(response)[0]
    assert kind == "image/jp2" and payload[:4] in (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0c")
    missing = requests.get(url(archive, f"/studies/{d.StudyInstanceUID}/series/{d.SeriesInstanceUID}/instances/{d.SOPInstanceUID}/frames/2"), auth=AUTH)
    assert missing.status_code == 404
    bad = requests.get(url(archive, f"/studies/{d.StudyInstanceUID}/series/{d.SeriesInstanceUID}/instances/{d.SOPInstanceUID}/frames/x"), auth=AUTH)
    assert bad.status_code == 400


# ---- STOW-RS ------------------------------------------------------------------------------------

def test_stow_single_and_many(archive):
    one = studygen.make_instance(40, 0, 0, 0)
    result = archive.client.store_instances([one])
    assert [item.ReferencedSOPInstanceUID for item in result.ReferencedSOPSequence] == [one.SOPInstanceUID]
    many = [studygen.make_instance(41, 0, 0, i) for i in range(10)]
    result = archive.client.store_instances(many)
    assert {item.ReferencedSOPInstanceUID for item in result.ReferencedSOPSequence} == {d.SOPInstanceUID for d in many}
    found, _ = archive.find(make_identifier("IMAGE", PatientID=many[0].PatientID, SOPInstanceUID=""))
    assert {f.SOPInstanceUID for f in found} == {d.SOPInstanceUID for d in many}


def multipart_body(parts: list[bytes], boundary="XyZzY") -> tuple[bytes, str]:
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts)
    return body + b"--" + boundary.encode() + b"--\r\n", f'multipart/related; type="application/dicom"; boundary={boundary}'


def part10(ds) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def test_stow_bad_part_among_good_ones(archive):
    good = [studygen.make_instance(42, 0, 0, i) for i in range(2)]
    body, content_type = multipart_body([part10(good[0]), b"this is not DICOM at all", part10(good[1])])
    response = requests.post(url(archive, "/studies"), data=body, headers={"Content-Type": content_type}, auth=AUTH)
    assert response.status_code == 202
    result = response.json()
    stored = {item["00081155"]["Value"][0] for item in result["00081199"]["Value"]}
    assert stored == {d.SOPInstanceUID for d in good}
    assert len(result["00081198"]["Value"]) == 1
    assert result["00081198"]["Value"][0]["00081197"]["Value"][0] == 0xC000
    found, _ = archive.find(make_identifier("IMAGE", PatientID=good[0].PatientID, SOPInstanceUID=""))
    assert {f.SOPInstanceUID for f in found} == stored


def test_stow_all_bad_is_409_and_wrong_study_fails(archive):
    body, content_type = multipart_body([b"junk", b"\x00" * 300])
    response = requests.post(url(archive, "/studies"), data=body, headers={"Content-Type": content_type}, auth=AUTH)
    assert response.status_code == 409
    other = studygen.make_instance(43, 0, 0, 0)
    body, content_type = multipart_body([part10(other)])
    response = requests.post(url(archive, "/studies/1.2.3.999"), data=body, headers={"Content-Type": content_type}, auth=AUTH)
    assert response.status_code == 409
    assert response.json()["00081198"]["Value"][0]["00081197"]["Value"][0] == 0xA900


def test_stow_damaged_objects_fail_with_a_reason(archive):
    """Cut short or malformed: each in the Failed SOP Sequence with Failure Reason 0xC000 and
    why; 409 when all fail, 202 beside a good one; nothing stored, nothing indexed."""
    ds = studygen.make_instance(46, 0, 0, 0)
    damaged = studygen.damaged(ds)
    before = archive.counts()["instances"]
    body, content_type = multipart_body(list(damaged.values()))
    response = requests.post(url(archive, "/studies"), data=body, headers={"Content-Type": content_type}, auth=AUTH)
    assert response.status_code == 409, response.text
    result = response.json()
    assert "00081199" not in result
    failures = result["00081198"]["Value"]
    assert len(failures) == len(damaged)
    for what, failure in zip(damaged, failures):
        assert failure["00081155"]["Value"] == [ds.SOPInstanceUID]
        assert failure["00081197"]["Value"] == [0xC000], what
        assert failure["00000902"]["Value"][0].startswith(("truncated", "malformed")), what
    good = studygen.make_instance(46, 0, 0, 1)
    body, content_type = multipart_body([damaged["pixel data 10 bytes short"], part10(good)])
    response = requests.post(url(archive, "/studies"), data=body, headers={"Content-Type": content_type}, auth=AUTH)
    assert response.status_code == 202, response.text
    assert [item["00081155"]["Value"][0] for item in response.json()["00081199"]["Value"]] == [good.SOPInstanceUID]
    assert archive.counts()["instances"] == before + 1
    assert not list(archive.data_dir.joinpath("storage").rglob(f"{ds.SOPInstanceUID}.dcm"))
    found, _ = archive.find(make_identifier("IMAGE", PatientID=ds.PatientID, SOPInstanceUID=""))
    assert [f.SOPInstanceUID for f in found] == [good.SOPInstanceUID]
    assert f"refused {ds.SOPInstanceUID} from STOW-RS with 0xC000: truncated" in archive.log


@pytest.mark.parametrize("body, content_type, status", [
    (b"--B\r\nContent-Type: application/dicom\r\n\r\nabc", 'multipart/related; type="application/dicom"; boundary=B', 400),
    (b"no boundary here", 'multipart/related; type="application/dicom"; boundary=B', 400),
    (b"x", "application/dicom", 415),
    (b"x", 'multipart/related; type="application/dicom+json"; boundary=B', 415),
    (b"x", "multipart/related", 415),
])
def test_stow_hostile_bodies(archive, body, content_type, status):
    before = archive.counts()["instances"]
    response = requests.post(url(archive, "/studies"), data=body, headers={"Content-Type": content_type}, auth=AUTH)
    assert response.status_code in (status, 409), response.text
    assert archive.counts()["instances"] == before
    assert archive.health()["status"] == "ok"


def test_stow_needs_login(archive):
    body, content_type = multipart_body([part10(studygen.make_instance(44, 0, 0, 0))])
    assert requests.post(url(archive, "/studies"), data=body, headers={"Content-Type": content_type}).status_code == 401


# ---- WADO-URI -----------------------------------------------------------------------------------

def test_wado_uri(archive):
    d = pydicom.dcmread(archive.paths[0], stop_before_pixels=True)
    params = {"requestType": "WADO", "studyUID": d.StudyInstanceUID, "seriesUID": d.SeriesInstanceUID,
              "objectUID": d.SOPInstanceUID, "contentType": "application/dicom"}
    response = requests.get(url(archive, "/wado"), params=params, auth=AUTH)
    assert response.status_code == 200 and response.content == stored_file(archive, d.SOPInstanceUID)
    for missing in ("requestType", "studyUID", "seriesUID", "objectUID"):
        partial = {k: v for k, v in params.items() if k != missing}
        assert requests.get(url(archive, "/wado"), params=partial, auth=AUTH).status_code == 400
    unknown = dict(params, objectUID="1.2.3.4.5")
    assert requests.get(url(archive, "/wado"), params=unknown, auth=AUTH).status_code == 404
    jpeg = requests.get(url(archive, "/wado"), params=dict(params, contentType="image/jpeg"), auth=AUTH)
    assert jpeg.status_code in (200, 406)
    if jpeg.status_code == 200:
        assert jpeg.content[:2] == b"\xff\xd8"


# ---- a large study, streamed both ways ----------------------------------------------------------

def rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_300mb_study_streams_without_memory_growth(archive):
    """STOW-RS in and WADO-RS out of a ~300 MB study; the daemon's RSS must not grow with it."""
    size, count = 1024, 150  # 150 instances of 2 MiB of pixels
    pid = archive.process.pid
    baseline = rss_kb(pid)
    first = studygen.make_instance(45, 0, 0, 0, size=size)
    study = first.StudyInstanceUID
    boundary = "BigStudyBoundary"
    peak = [baseline]

    def body():
        for i in range(count):
            ds = first if i == 0 else studygen.make_instance(45, 0, 0, i, size=size)
            yield b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part10(ds) + b"\r\n"
            if i % 10 == 0:
                peak[0] = max(peak[0], rss_kb(pid))
        yield b"--" + boundary.encode() + b"--\r\n"

    response = requests.post(url(archive, f"/studies/{study}"), data=body(), auth=AUTH,
                             headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert response.status_code == 200, response.text[:300]
    assert len(response.json()["00081199"]["Value"]) == count
    with requests.get(url(archive, f"/studies/{study}"), auth=AUTH, stream=True,
                      headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}) as retrieval:
        assert retrieval.status_code == 200
        received = 0
        for chunk in retrieval.iter_content(1 << 20):
            received += len(chunk)
            peak[0] = max(peak[0], rss_kb(pid))
    assert received > count * size * size * 2
    growth_mb = (peak[0] - baseline) / 1024
    assert growth_mb < 120, f"RSS grew by {growth_mb:.0f} MB for a {received / 2**20:.0f} MB study"
