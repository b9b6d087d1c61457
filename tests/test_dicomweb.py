"""DICOMweb (plugins/dicomweb.py) with dicomweb-client as the client: QIDO-RS, WADO-RS, STOW-RS, WADO-URI."""

import email.parser
import email.policy
import io
import pathlib
import random
import re
import unicodedata

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

import studygen
from conftest import RunningDaemon, make_identifier
from restclient import ADMIN_ENV, ADMIN_PASSWORD, admin_client

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
    daemon.datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in daemon.paths]
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


#: Attributes a QIDO-RS search may filter or return at each level (its own and those above).
QUERY_ATTRIBUTES = {
    "studies": ("PatientID", "PatientName", "PatientSex", "StudyDate", "AccessionNumber", "StudyDescription",
                "ReferringPhysicianName", "InstitutionName", "ModalitiesInStudy", "StudyInstanceUID"),
    "series": ("PatientID", "PatientName", "StudyDate", "StudyDescription", "StudyInstanceUID", "Modality",
               "SeriesDescription", "SeriesNumber", "BodyPartExamined", "SeriesInstanceUID"),
    "instances": ("PatientID", "PatientName", "StudyInstanceUID", "Modality", "SeriesDescription",
                  "SeriesInstanceUID", "InstanceNumber", "SliceLocation", "SOPInstanceUID"),
}
QIDO_LEVELS = {"studies": ("STUDY", "StudyInstanceUID"), "series": ("SERIES", "SeriesInstanceUID"),
               "instances": ("IMAGE", "SOPInstanceUID")}


def hex_tag(keyword: str) -> str:
    return f"{pydicom.datadict.tag_for_keyword(keyword):08X}"


def filter_values(datasets, keyword: str) -> list[str]:
    """Values worth filtering on: the stored ones (UIDs also as lists), wildcards, date ranges."""
    if keyword == "ModalitiesInStudy":
        return ["CT", "MR", "NM", "CT\\MR", "PT"]
    stored = sorted({str(d.get(keyword)) for d in datasets if d.get(keyword) not in (None, "")})
    if keyword.endswith("UID"):
        return stored[:4] + ["\\".join(stored[:3]), "\\".join(stored[-2:])]
    if pydicom.datadict.dictionary_VR(keyword) in ("IS", "DS"):  # numbers take no wildcards
        return stored[:6]
    if keyword == "StudyDate":
        return stored[:3] + ["20140101-20181231", "-20170101", "20190101-"]
    return stored[:5] + sorted({v[:2] + "*" for v in stored})[:3] + ["*" + stored[0][-2:]]


def c_find_uids(daemon, level: str, uid_key: str, filters: dict) -> set[str]:
    identifier = make_identifier(level, **{uid_key: "", **filters})
    if not all(str(v).isascii() for v in filters.values()):
        identifier.SpecificCharacterSet = "ISO_IR 192"
    found, status = daemon.find(identifier)
    assert status == 0, filters
    return {d.get(uid_key) for d in found}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_qido_filters_with_random_includefields_are_c_find_matching(archive, data):
    """Random filters with random includefields (the filtered attributes among them, as keywords
    or tags, before or after the filters): QIDO-RS matches exactly what C-FIND matches, and
    returns every included attribute."""
    datasets = archive.datasets
    resource = data.draw(st.sampled_from(sorted(QUERY_ATTRIBUTES)), label="resource")
    level, uid_key = QIDO_LEVELS[resource]
    attributes = QUERY_ATTRIBUTES[resource]
    filtered = data.draw(st.lists(st.sampled_from(attributes), max_size=3, unique=True), label="filtered")
    filters = {k: data.draw(st.sampled_from(filter_values(datasets, k)), label=k) for k in filtered}
    included = data.draw(st.lists(st.sampled_from(filtered + list(attributes) + ["all"]), min_size=1, max_size=4, unique=True),
                         label="includefield")
    as_tag = data.draw(st.fixed_dictionaries({k: st.booleans() for k in filtered + included if k != "all"}), label="as tag")
    named = {k: hex_tag(k) if as_tag.get(k) else k for k in filtered + included}
    params = [(named[k], v.replace("\\", ",") if k.endswith("UID") else v) for k, v in filters.items()]
    if data.draw(st.booleans(), label="one includefield"):
        params.append(("includefield", ",".join(named[k] for k in included)))
    else:
        params.extend(("includefield", named[k]) for k in included)
    params = data.draw(st.permutations(params), label="order")
    response = requests.get(url(archive, f"/{resource}"), params=params, auth=AUTH)
    assert response.status_code == 200, response.text
    results = response.json()
    uid_tag = hex_tag(uid_key)
    assert {r[uid_tag]["Value"][0] for r in results} == c_find_uids(archive, level, uid_key, filters)
    for keyword in included:
        if keyword != "all":
            assert all(hex_tag(keyword) in r for r in results), keyword


@pytest.mark.parametrize("resource, keyword, value", [
    ("studies", "PatientID", "P0000000000"), ("studies", "ModalitiesInStudy", "MR"), ("instances", "SliceLocation", "-95"),
])
@pytest.mark.parametrize("include_as_tag", [True, False])
def test_qido_filter_also_named_in_includefield_still_filters(archive, resource, keyword, value, include_as_tag):
    """Viewers name the attributes they filter on in includefield: the filter must still hold."""
    alone = requests.get(url(archive, f"/{resource}"), params={keyword: value}, auth=AUTH).json()
    everything = requests.get(url(archive, f"/{resource}"), auth=AUTH).json()
    included = requests.get(url(archive, f"/{resource}"), auth=AUTH,
                            params=[(keyword, value), ("includefield", hex_tag(keyword) if include_as_tag else keyword)]).json()
    assert 0 < len(alone) < len(everything)
    assert included == alone


def find_with_comment(daemon, identifier) -> tuple[list, int, str]:
    """C-FIND with pynetdicom: (matches, final status, its Error Comment or '')."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title="DICOOGLED")
    assert assoc.is_established
    matches = []
    try:
        for status, dataset in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            assert status is not None and "Status" in status, "no C-FIND response"
            if status.Status in (0xFF00, 0xFF01):
                matches.append(dataset)
            else:
                return matches, status.Status, str(status.get("ErrorComment", ""))
    finally:
        assoc.release()
    raise AssertionError("C-FIND ended without a final status")


def fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def name_matches(pattern: str, name: str) -> bool:
    """The reference PN filter: case- and accent-insensitive, '*' and '?' wildcards, whole value."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in fold(pattern))
    return re.fullmatch(regex, fold(name), re.DOTALL) is not None


@pytest.mark.parametrize("resource", ["studies", "instances"])
def test_uid_list_of_2000_values_answers_like_a_reference_filter(archive, resource):
    """2,000 UIDs in one list (SQLite allows 1,000-deep expressions): C-FIND and QIDO-RS answer it."""
    level, uid_key = QIDO_LEVELS[resource]
    stored = sorted({str(d.get(uid_key)) for d in archive.datasets})
    wanted = stored[::3]
    candidates = [f"1.2.826.0.1.3680043.9.{n}" for n in range(2000 - len(wanted))]
    for position, uid in enumerate(wanted):
        candidates.insert(position * 97, uid)
    assert len(candidates) == 2000
    expected = set(wanted)
    found, status, comment = find_with_comment(archive, make_identifier(level, **{uid_key: "\\".join(candidates)}))
    assert (status, comment) == (0, "")
    assert {d.get(uid_key) for d in found} == expected
    response = requests.get(url(archive, f"/{resource}"), params={uid_key: ",".join(candidates)}, auth=AUTH)
    assert response.status_code == 200, response.text
    assert uids(response.json(), hex_tag(uid_key)) == expected


def test_patient_name_with_1000_backslashes_answers_like_a_reference_filter(archive):
    """1,001 names and patterns in one PN key (1,000 backslashes): C-FIND and QIDO-RS answer it."""
    patterns = [f"NOBODY^N{n:04d}" for n in range(500)] + [f"NOBODY*{n:04d}" for n in range(498)]
    patterns[100:100] = ["doe^john", "müller*", "*^mr?"]
    assert len(patterns) == 1001
    expected = {str(d.StudyInstanceUID) for d in archive.datasets if any(name_matches(p, str(d.PatientName)) for p in patterns)}
    assert 2 <= len(expected) < len({d.StudyInstanceUID for d in archive.datasets})
    identifier = make_identifier("STUDY", StudyInstanceUID="", SpecificCharacterSet="ISO_IR 192", PatientName="\\".join(patterns))
    found, status, comment = find_with_comment(archive, identifier)
    assert (status, comment) == (0, "")
    assert {d.StudyInstanceUID for d in found} == expected
    response = requests.get(url(archive, "/studies"), params={"PatientName": "\\".join(patterns)}, auth=AUTH)
    assert response.status_code == 200, response.text
    assert uids(response.json(), "0020000D") == expected


def test_an_identifier_too_large_to_match_is_refused_with_our_reason(archive):
    """More than 128 keys to match are refused on either engine, 0xC001 with our reason (a
    hostile 33,000 exceeded what one SQLite statement takes, and kept PostgreSQL planning);
    128 are answered."""
    def identifier_of(keys: int):
        identifier = make_identifier("STUDY", StudyInstanceUID="")
        for n in range(keys):
            identifier.add_new((0x0011 + 2 * (n // 256)) << 16 | (0x1000 + n % 256), "LO", "x")
        return identifier
    for keys in (129, 33_000):
        found, status, comment = find_with_comment(archive, identifier_of(keys))
        assert (found, status) == ([], 0xC001)
        assert comment.startswith(f"the identifier has too many keys to match ({keys}; at most 128)"), comment
        assert "SQL" not in comment and "variables" not in comment
    assert find_with_comment(archive, identifier_of(128))[:2] == ([], 0x0000)


def test_a_database_failure_reaches_no_client_as_database_text(start_daemon, testdata):
    """The database's own words stay in the log: QIDO-RS, C-FIND and /search answer a failure
    of the index (here its full-text table gone) with the standard status and a reason of ours."""
    daemon = start_daemon(env=ADMIN_ENV)
    assert daemon.store(testdata("CT_small.dcm")) == [0]
    daemon.index_sql("DROP TABLE metadata")
    database_words = re.compile(r"no such table|does not exist|metadata|sqlite|postgres|psycopg|SQL", re.IGNORECASE)
    response = requests.get(url(daemon, "/studies"), params={"StationName": "CT*"}, auth=("admin", ADMIN_PASSWORD))
    assert response.status_code == 500
    assert not database_words.search(response.text), response.text
    found, status, comment = find_with_comment(daemon, make_identifier("STUDY", StudyInstanceUID="", StationName="CT*"))
    assert (found, status) == ([], 0xC001) and not database_words.search(comment), comment
    search = admin_client(daemon).get("/search", query="StationName:CT*")
    assert search.status == 500 and not database_words.search(search.text), search.text
    # each failure logged, with the database's words
    assert len(re.findall(r'no such table: metadata|relation "metadata" does not exist', daemon.log)) >= 3, daemon.log


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


@pytest.mark.parametrize("level, filters", [
    ("studies", {}),                                   # every study: SQL pages it
    ("instances", {"Modality": "CT"}),                 # a main attribute: SQL pages it
    ("instances", {"StationName": "*1"}),             # any other attribute: matched after SQL
])
def test_qido_pages_are_slices_of_the_whole_answer(archive, level, filters):
    """limit and offset give exactly the slice [offset, offset + limit) of the whole ordered
    answer, whether the database or the exact matching after it decides the matches."""
    key = {"studies": "0020000D", "instances": "00080018"}[level]

    def answer(**page):
        response = requests.get(url(archive, f"/{level}"), params={**filters, **page}, auth=AUTH)
        assert response.status_code == 200, response.text
        return [item[key]["Value"][0] for item in response.json()]
    whole = answer(limit=10_000)
    assert len(whole) >= 5, whole
    for offset, limit in ((0, 1), (1, 2), (2, 3), (len(whole) - 1, 5), (len(whole), 5), (3, 0)):
        assert answer(offset=offset, limit=limit) == whole[offset:offset + limit], (offset, limit)


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
    lossy = requests.get(url(archive, base), auth=AUTH,  # JPEG Baseline: no lossy copies are made
                         headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'})
    assert lossy.status_code == 406
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


def test_wado_metadata_is_made_once_and_follows_the_instance(start_daemon, tmp_path):
    """Each instance's metadata is parsed once and kept in data/cache/plugin-dicomweb; a
    changed instance is parsed again, the addresses are the request's own, and a removed
    instance's metadata leaves the cache at the next start."""
    daemon = start_daemon("[storage]\nduplicates = overwrite\n", env=ADMIN_ENV)
    first = studygen.make_instance(0, 0, 0, 0)
    second = studygen.make_instance(0, 0, 0, 1)
    assert daemon.store(first, second) == [0, 0]
    study = first.StudyInstanceUID
    auth = ("admin", ADMIN_PASSWORD)

    def metadata(host="127.0.0.1"):
        response = requests.get(f"http://{host}:{daemon.http_port}/dicom-web/studies/{study}/metadata", auth=auth)
        assert response.status_code == 200, response.text
        return {item["00080018"]["Value"][0]: item for item in response.json()}
    cache = daemon.node_dir / "cache" / "plugin-dicomweb"
    answer = metadata()
    assert answer[first.SOPInstanceUID]["00100010"]["Value"][0]["Alphabetic"] == str(first.PatientName)
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{ds.SOPInstanceUID}.cache" for ds in (first, second))
    assert answer[first.SOPInstanceUID]["7FE00010"]["BulkDataURI"].startswith(f"http://127.0.0.1:{daemon.http_port}/dicom-web/studies/")
    assert metadata("localhost")[first.SOPInstanceUID]["7FE00010"]["BulkDataURI"].startswith(f"http://localhost:{daemon.http_port}/")
    # The second answer is the cache's: what it holds is what is served.
    kept = cache / f"{first.SOPInstanceUID}.cache"
    name = str(first.PatientName).encode()
    assert name in kept.read_bytes()
    kept.write_bytes(kept.read_bytes().replace(name, b"FROM^THE^CACHE"))
    assert metadata()[first.SOPInstanceUID]["00100010"]["Value"][0]["Alphabetic"] == "FROM^THE^CACHE"
    # A new version of the instance is parsed again.
    changed = studygen.make_instance(0, 0, 0, 0, StudyDescription="Changed description")
    assert daemon.store(changed) == [0]
    assert metadata()[first.SOPInstanceUID]["00081030"]["Value"] == ["Changed description"]
    # Removed, then a restart: its metadata is no longer kept.
    admin = admin_client(daemon)
    assert admin.post("/management/tasks/remove", data={"SOPInstanceUID": second.SOPInstanceUID}).status == 200
    daemon.restart()
    daemon.settled()
    assert not (cache / f"{second.SOPInstanceUID}.cache").exists()
    assert (cache / f"{first.SOPInstanceUID}.cache").exists()


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
