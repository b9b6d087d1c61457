"""The Dicoogle-compatible REST API over HTTP, against the real daemon.

Shapes follow shared/reference/dicoogle-api.md (sections 1, 4 and 8). Search tests run on a
hand-made archive of ten instances whose values are chosen for the query-language cases, and
assert exact sets of instances by label.
"""

import base64
import io
import json
import pathlib
import re
import urllib.parse

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

import studygen
from conftest import RunningDaemon, wait_until
from restclient import ADMIN_ENV, ADMIN_PASSWORD, Client, admin_client, base_url

USER, USER_PASSWORD = "alice", "alice-pw-1"

# ---- the archive ------------------------------------------------------------------------------

#: (patient, study) -> (Modality, StudyDate, StudyDescription, InstitutionName, procedure code).
#: studygen names the patients: 0 DOE^JOHN, 1 MÜLLER^JÜRGEN, 3 GARCÍA^JOSÉ, 4 ИВАНОВ^ИВАН,
#: 5 DOE^JANE, 8 JOHNSON^ROBERT, 14 O'BRIEN^PATRICK.
STUDIES = {
    (0, 0): ("CT", "20150120", "CT HEAD routine", "General Hospital", "HEAD1"),
    (0, 1): ("MR", "20180305", "MR knee left", "General Hospital", "KNEE1"),
    (1, 0): ("CT", "20150121", "CT chest; contrast", "University Clinic", "CHEST1"),
    (3, 0): ("MR", "20200101", "MR brain", "Riverside Imaging", "BRAIN1"),
    (4, 0): ("CT", "20120202", "CT spine", "University Clinic", "SPINE1"),
    (5, 0): ("CT", "20180305", "CT abdomen", "General Hospital", "ABD1"),
    (8, 0): ("PT", "20230615", "PET whole body", "Riverside Imaging", "PET1"),
    (14, 0): ("CT", "20100101", "CT head", "St. Mary Medical Center", "HEAD1"),
}
#: label -> (patient, study, series, instance, SliceLocation, extra overrides)
INSTANCES = {
    "J1": (0, 0, 0, 0, "-10.5", {}),
    "J2": (0, 0, 0, 1, "2.5", {}),
    "J3": (0, 0, 1, 0, "7", {}),
    "J4": (0, 1, 0, 0, "0", {}),
    "M1": (1, 0, 0, 0, "-50", {"StudyComments": "line one\nline two"}),
    "G1": (3, 0, 0, 0, "15.25", {}),
    "I1": (4, 0, 0, 0, "33", {}),
    "D1": (5, 0, 0, 0, "-100", {}),
    "R1": (8, 0, 0, 0, "100", {}),
    "O1": (14, 0, 0, 0, "-0.5", {}),
}
ALL = set(INSTANCES)
PRIVATE_VALUE_TAG = 0x00091010  # (0009,xx10) LO in studygen's "DICOOGLED TEST" block


def make_dataset(label: str) -> Dataset:
    patient, study, series, instance, location, extra = INSTANCES[label]
    modality, date, description, institution, code = STUDIES[(patient, study)]
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "99TEST", description
    ds = studygen.make_instance(
        patient, study, series, instance, size=8, modality="MR" if modality == "MR" else "CT",
        StudyDate=date, StudyDescription=description, InstitutionName=institution, SliceLocation=location,
        ProcedureCodeSequence=Sequence([item]), **({"Modality": modality} if modality == "PT" else {}), **extra,
    )
    ds[PRIVATE_VALUE_TAG].value = "special marker value" if label == "J1" else "studygen seed 0"
    return ds


DATASETS = {label: make_dataset(label) for label in INSTANCES}
UIDS = {label: str(ds.SOPInstanceUID) for label, ds in DATASETS.items()}
LABELS = {uid: label for label, uid in UIDS.items()}


def labels(response) -> set:
    assert response.status == 200, response
    return {LABELS[r["fields"]["SOPInstanceUID"]] for r in response.json()["results"]}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A daemon holding the ten instances, an admin client and a non-admin user's client."""
    daemon = RunningDaemon(tmp_path_factory.mktemp("rest") / "data", env=ADMIN_ENV).start()
    try:
        assert daemon.store(*DATASETS.values()) == [0] * len(DATASETS)
        admin = admin_client(daemon)
        assert admin.post("/user", data={"username": USER, "password": USER_PASSWORD, "admin": "false"}).json() == {"success": True}
        user = Client(base_url(daemon))
        user.login(USER, USER_PASSWORD)
        daemon.admin, daemon.user, daemon.anonymous = admin, user, Client(base_url(daemon))
        yield daemon
    finally:
        if daemon.process.poll() is None:
            daemon.stop()


def search(archive, query, client=None, **params):
    return (client or archive.admin).request("GET", "/search", {"query": query, "field": "SOPInstanceUID", **params})


# ---- login, logout, tokens, users -------------------------------------------------------------


def test_login_answers_user_admin_roles_token_and_sets_a_cookie(archive):
    response = archive.anonymous.request("POST", "/login", data={"username": USER, "password": USER_PASSWORD})
    assert response.status == 200
    body = response.json()
    assert set(body) == {"user", "admin", "roles", "token"}
    assert body["user"] == USER and body["admin"] is False and body["roles"] == []
    assert len(body["token"]) >= 32
    assert f"dicoogled_session={body['token']}" in response.headers["Set-Cookie"]
    assert "HttpOnly" in response.headers["Set-Cookie"]


@pytest.mark.parametrize("scheme", ["raw", "bearer", "basic", "cookie"])
def test_get_login_identifies_the_caller_by_every_means(archive, scheme):
    token = archive.user.token
    headers = {
        "raw": {"Authorization": token},
        "bearer": {"Authorization": f"Bearer {token}"},
        "basic": {"Authorization": "Basic " + base64.b64encode(f"{USER}:{USER_PASSWORD}".encode()).decode()},
        "cookie": {"Cookie": f"dicoogled_session={token}"},
    }[scheme]
    response = archive.anonymous.request("GET", "/login", headers=headers, auth=None)
    assert response.status == 200, response
    assert response.json() == {"user": USER, "admin": False, "roles": []}
    # The same means open a route that needs a login.
    assert archive.anonymous.request("GET", "/search", {"query": "*:*"}, headers=headers, auth=None).status == 200


@pytest.mark.parametrize("header", ["not-a-token", "Bearer not-a-token", "Basic " + base64.b64encode(b"alice:wrong").decode(), "Basic %%%"])
def test_get_login_with_bad_credentials_is_401_json(archive, header):
    response = archive.anonymous.request("GET", "/login", headers={"Authorization": header}, auth=None)
    assert response.status == 401
    assert response.headers["Content-Type"].startswith("application/json")
    assert "error" in response.json()


def test_logout_ends_the_token_by_header_and_by_cookie(archive):
    client = Client(base_url(archive))
    token = client.login(USER, USER_PASSWORD)["token"]
    assert client.get("/login").status == 200
    assert client.post("/logout").json() == {"success": True}
    assert client.get("/login").status == 401
    assert client.get("/search", query="*:*").status == 401
    assert client.post("/logout").json() == {"success": False}
    # By cookie, from the web app's own page (a browser sends Origin with every POST).
    token = client.login(USER, USER_PASSWORD)["token"]
    cookie = {"Cookie": f"dicoogled_session={token}"}
    response = client.request("POST", "/logout", headers={**cookie, "Origin": base_url(archive)}, auth=None)
    assert response.json() == {"success": True}
    assert client.request("GET", "/login", headers=cookie, auth=None).status == 401
    # GET /logout is the deprecated form dicoogle-client falls back to.
    client.login(USER, USER_PASSWORD)
    assert client.get("/logout").json() == {"success": True}


def test_tokens_survive_a_restart(start_daemon):
    daemon = start_daemon(env=ADMIN_ENV)
    client = admin_client(daemon)
    daemon.restart()
    response = client.get("/login")
    assert response.status == 200 and response.json()["user"] == "admin"


def test_failed_logins_are_rate_limited(start_daemon):
    daemon = start_daemon(env=ADMIN_ENV)
    client = Client(base_url(daemon))
    statuses = [client.request("POST", "/login", data={"username": "admin", "password": f"wrong{i}"}, auth=None).status
                for i in range(5)]
    assert statuses == [401] * 5
    # Now even the right password is refused for a while, by form and by HTTP Basic.
    response = client.request("POST", "/login", data={"username": "admin", "password": ADMIN_PASSWORD}, auth=None)
    assert response.status == 429 and "error" in response.json()
    basic = "Basic " + base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
    assert client.request("GET", "/search", {"query": "*:*"}, auth=basic).status == 429


def test_failed_basic_logins_count_too(start_daemon):
    daemon = start_daemon(env=ADMIN_ENV)
    client = Client(base_url(daemon))
    for i in range(5):
        wrong = "Basic " + base64.b64encode(f"admin:wrong{i}".encode()).decode()
        assert client.request("GET", "/login", auth=wrong).status == 401
    response = client.request("POST", "/login", data={"username": "admin", "password": ADMIN_PASSWORD}, auth=None)
    assert response.status == 429


def test_users_create_list_delete_and_never_the_last_admin(start_daemon):
    daemon = start_daemon(env=ADMIN_ENV)
    admin = admin_client(daemon)
    assert admin.post("/user", data={"username": "bob", "password": "pw-bob", "admin": "false"}).json() == {"success": True}
    assert admin.post("/user", data={"username": "bob", "password": "other", "admin": "false"}).json() == {"success": False}
    # PUT with query parameters, as dicoogle-client's users.add sends it.
    assert admin.request("PUT", "/user", {"username": "carol", "password": "pw-carol", "admin": "true"}).json() == {"success": True}
    listed = admin.get("/user").json()
    assert sorted(u["username"] for u in listed["users"]) == ["admin", "bob", "carol"]
    assert all(set(u) >= {"username"} for u in listed["users"])
    bob = Client(base_url(daemon))
    assert bob.login("bob", "pw-bob")["admin"] is False
    assert Client(base_url(daemon)).login("carol", "pw-carol")["admin"] is True
    assert bob.get("/user").status == 403
    assert bob.post("/user", data={"username": "eve", "password": "x"}).status == 403
    assert bob.delete("/user/admin").status == 403
    # Invalid names and empty passwords are refused with a reason.
    for data in ({"username": "", "password": "x"}, {"username": "a b/../c", "password": "x"}, {"username": "dave", "password": ""}):
        response = admin.post("/user", data=data)
        assert response.status == 400 and "error" in response.json()
    assert admin.delete("/user/nobody").json() == {"success": False}
    # dicoogle-client 5 names the user in a parameter.
    assert admin.post("/user", data={"username": "dave", "password": "pw-dave"}).json() == {"success": True}
    assert admin.delete("/user", username="dave").json() == {"success": True}
    assert admin.delete("/user", username="dave").json() == {"success": False}
    assert admin.delete("/user").status == 400
    assert admin.delete("/user/bob").json() == {"success": True}
    assert bob.get("/search", query="*:*").status == 401  # a deleted user's sessions go with it
    assert admin.delete("/user/carol").json() == {"success": True}
    assert admin.delete("/user/admin").json() == {"success": False}  # the last administrator stays
    assert [u["username"] for u in admin.get("/user").json()["users"]] == ["admin"]


def test_change_password(start_daemon):
    daemon = start_daemon(env=ADMIN_ENV)
    admin = admin_client(daemon)
    admin.post("/user", data={"username": "bob", "password": "pw-bob"})
    bob = Client(base_url(daemon))
    bob.login("bob", "pw-bob")
    assert bob.post("/user/admin/password", data={"password": "x"}).status == 403
    assert bob.post("/user/bob/password", data={"password": "new-pw"}).json() == {"success": True}
    assert Client(base_url(daemon)).request("POST", "/login", data={"username": "bob", "password": "pw-bob"}, auth=None).status == 401
    Client(base_url(daemon)).login("bob", "new-pw")
    assert admin.post("/user/nobody/password", data={"password": "x"}).status == 404


# ---- /search ----------------------------------------------------------------------------------

SEARCH_CASES = [
    # free text
    ("*:*", ALL),
    ("doe", {"J1", "J2", "J3", "J4", "D1"}),
    ("DOE", {"J1", "J2", "J3", "J4", "D1"}),
    ("john", {"J1", "J2", "J3", "J4"}),
    ("john*", {"J1", "J2", "J3", "J4", "R1"}),
    ("marker", {"J1"}),
    ("knee left", {"J4"}),
    # Field:value
    ("Modality:MR", {"J4", "G1"}),
    ("Modality:mr", {"J4", "G1"}),
    ("PatientID:P0000000005", {"D1"}),
    ("InstanceNumber:2", {"J2"}),
    ("StudyDescription:head", {"J1", "J2", "J3", "O1"}),
    ("InstitutionName:\"General Hospital\"", {"J1", "J2", "J3", "J4", "D1"}),
    ("SOPInstanceUID:" + UIDS["G1"], {"G1"}),
    # a UID is one token: the whole of it, or a prefix with a trailing *, never its parts
    ("SeriesInstanceUID:1.2.826.0.1", set()),
    ("SeriesInstanceUID:1.2.826.0.1*", ALL),
    ("SOPInstanceUID:3680043.8.498", set()),
    ("SOPInstanceUID:" + UIDS["G1"].rsplit(".", 1)[0], set()),
    (f'SOPInstanceUID:"{UIDS["G1"]}"', {"G1"}),
    ("StudyInstanceUID:" + DATASETS["J1"].StudyInstanceUID[:-4] + "*", {"J1", "J2", "J3"}),
    ("FrameOfReferenceUID:" + DATASETS["J1"].FrameOfReferenceUID, {"J1", "J2", "J3"}),
    ("FrameOfReferenceUID:1.2.826.0.1", set()),
    ("FrameOfReferenceUID:1.2.826.0.1.3680043.8.498.*", ALL),
    ("SOPClassUID:1.2.840.10008.5.1.4.1.1", set()),
    # boolean operators
    ("doe AND Modality:MR", {"J4"}),
    ("doe && Modality:MR", {"J4"}),
    ("Modality:MR OR Modality:PT", {"J4", "G1", "R1"}),
    ("doe || garcia", {"J1", "J2", "J3", "J4", "D1", "G1"}),
    ("doe NOT Modality:CT", {"J4"}),
    ("doe AND NOT Modality:CT", {"J4"}),
    ("NOT Modality:CT", {"J4", "G1", "R1"}),
    ("! Modality:CT", {"J4", "G1", "R1"}),
    ("+doe -jane", {"J1", "J2", "J3", "J4"}),
    ("doe -PatientName:jane", {"J1", "J2", "J3", "J4"}),
    ("Modality:CT -StudyDate:[20150101 TO 20151231]", {"I1", "D1", "O1"}),
    ("doe -(Modality:CT)", {"J4"}),
    ("doe +(Modality:MR OR Modality:PT)", {"J4"}),
    ('doe -"DOE^JANE"', {"J1", "J2", "J3", "J4"}),
    # parentheses and precedence (AND binds tighter than OR)
    ("(PatientName:doe OR PatientName:garcia) AND Modality:MR", {"J4", "G1"}),
    ("PatientName:doe OR PatientName:garcia AND Modality:MR", {"J1", "J2", "J3", "J4", "D1", "G1"}),
    ("((Modality:PT))", {"R1"}),
    ("Modality:(MR OR PT)", {"J4", "G1", "R1"}),
    ("PatientName:(doe -jane)", {"J1", "J2", "J3", "J4"}),
    # quoted phrases
    ('"knee left"', {"J4"}),
    ('"left knee"', set()),
    ('StudyDescription:"CT head"', {"J1", "J2", "J3", "O1"}),
    ('StudyDescription:"head CT"', set()),
    ('"DOE^JOHN"', {"J1", "J2", "J3", "J4"}),
    # wildcards
    ("PatientName:jo*", {"J1", "J2", "J3", "J4", "R1", "G1"}),
    ("PatientName:D?E", {"J1", "J2", "J3", "J4", "D1"}),
    ("PatientName:DOE^J*", {"J1", "J2", "J3", "J4", "D1"}),
    ("StudyDescription:*contrast*", {"M1"}),
    ("StudyDescription:*contrast", {"M1"}),
    ("Modality:?T", {"R1"} | {"J1", "J2", "J3", "M1", "I1", "D1", "O1"}),
    ("jo?n", {"J1", "J2", "J3", "J4"}),
    ("mül*", {"M1"}),
    # ranges
    ("StudyDate:[20150120 TO 20180305]", {"J1", "J2", "J3", "J4", "M1", "D1"}),
    ("StudyDate:{20150120 TO 20180305}", {"M1"}),
    ("StudyDate:[20150120 TO 20180305}", {"J1", "J2", "J3", "M1"}),
    ("StudyDate:[20200101 TO *]", {"G1", "R1"}),
    ("StudyDate:[* TO 20120202]", {"I1", "O1"}),
    ("SliceLocation:Float:[-20 TO 0]", {"J1", "J4", "O1"}),
    ("SliceLocation:Float:{-10.5 TO 2.5}", {"J4", "O1"}),
    ("SliceLocation:Float:[-10.5 TO 2.5]", {"J1", "J2", "J4", "O1"}),
    ("SliceLocation:[-20 TO 0]", {"J1", "J4", "O1"}),
    ("SliceLocation:Float:[100 TO *]", {"R1"}),
    ("SeriesNumber:[2 TO 2]", {"J3"}),
    ("SeriesNumber:Int:[2 TO 9]", {"J3"}),
    ("PatientName:[a TO e]", {"J1", "J2", "J3", "J4", "D1"}),
    # names with carets, quotes and accents
    ("DOE^JOHN", {"J1", "J2", "J3", "J4"}),
    ("PatientName:DOE^JOHN", {"J1", "J2", "J3", "J4"}),
    ("PatientName:DOE^JANE", {"D1"}),
    ("O'BRIEN", {"O1"}),
    ("PatientName:O'BRIEN^PATRICK", {"O1"}),
    ("müller", {"M1"}),
    ("MULLER", {"M1"}),
    ("PatientName:muller", {"M1"}),
    ("PatientName:MÜLLER^JÜRGEN", {"M1"}),
    ("garcía", {"G1"}),
    ("PatientName:GARCIA^JOSE", {"G1"}),
    ("иванов", {"I1"}),
    ("PatientName:ИВАНОВ^ИВАН", {"I1"}),
    # attributes inside sequences, private attributes
    ("ProcedureCodeSequence_CodeValue:KNEE1", {"J4"}),
    ("CodeValue:HEAD1", {"J1", "J2", "J3", "O1"}),
    ("00091010:marker", {"J1"}),
    ("00091010:\"special marker\"", {"J1"}),
    ("00091010:studygen", ALL - {"J1"}),
    ("00091010:mark*", {"J1"}),
    ("00091010:spec?al", {"J1"}),
    ("CodeValue:KNE?1", {"J4"}),
    # things that match nothing
    ("nosuchword", set()),
    ("Modality:XA", set()),
    ("StudyDate:[20300101 TO 20310101]", set()),
]


@pytest.mark.parametrize("query, expected", SEARCH_CASES, ids=[q for q, _ in SEARCH_CASES])
def test_search_language(archive, query, expected):
    response = search(archive, query)
    assert labels(response) == expected
    assert response.json()["numResults"] == len(expected)


@pytest.mark.parametrize("query, expected", [(q, e) for q, e in SEARCH_CASES if any(ord(c) > 127 for c in q)])
def test_non_ascii_query_in_a_form_body(archive, query, expected):
    """Non-ASCII queries arrive as UTF-8 in a POSTed form too (here an export of the UIDs)."""
    response = archive.admin.post("/export", data={"query": query, "fields": "SOPInstanceUID"})
    assert response.status == 200, response
    lines = response.text.split("\n")
    assert lines[0] == '"SOPInstanceUID";' and lines[-1] == ""
    assert {LABELS[line.strip('";')] for line in lines[1:-1]} == expected


MALFORMED = [
    ("(doe", 4),
    ("doe)", 3),
    ("Foo:bar", 0),
    ("PatientName:", 12),
    ('"unterminated', 0),
    ("AND doe", 0),
    ("doe AND", 7),
    ("*:doe", 2),
    ("SliceLocation:Float:5", 20),
    ("PatientName:[a TO", 12),
    ("Modality:CT OR", 14),
    ("doe (", 5),
]


@pytest.mark.parametrize("query, position", MALFORMED, ids=[q for q, _ in MALFORMED])
def test_malformed_query_is_400_naming_the_position(archive, query, position):
    for path in ("/search", "/searchDIM"):
        response = archive.admin.get(path, query=query)
        assert response.status == 400, response
        body = response.json()
        assert body["results"] == []
        assert f"position {position}" in body["error"]


def test_empty_query_is_400(archive):
    for path in ("/search", "/searchDIM", "/export"):
        for params in ({}, {"query": ""}, {"query": "   "}):
            response = archive.admin.request("GET", path, {**params, "fields": "PatientName"})
            assert response.status == 400, (path, params, response)
            assert response.json()["error"] == "No query supplied!"


def test_search_result_shape_and_default_fields(archive):
    response = archive.admin.get("/search", query="SOPInstanceUID:" + UIDS["J2"])
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"results", "elapsedTime", "numResults"}
    assert isinstance(body["elapsedTime"], int) and body["numResults"] == 1
    [result] = body["results"]
    assert set(result) == {"uri", "fields"}
    ds = DATASETS["J2"]
    assert result["fields"] == {
        "SOPInstanceUID": UIDS["J2"], "StudyInstanceUID": ds.StudyInstanceUID, "SeriesInstanceUID": ds.SeriesInstanceUID,
        "PatientID": "P0000000000", "PatientName": "DOE^JOHN", "PatientSex": "M", "Modality": "CT",
        "StudyDate": "20150120", "StudyID": "1", "StudyDescription": "CT HEAD routine", "SeriesNumber": "1",
        "SeriesDescription": ds.SeriesDescription, "InstitutionName": "General Hospital", "InstanceNumber": "2",
    }
    path = pathlib.Path(urllib.parse.unquote(urllib.parse.urlparse(result["uri"]).path))
    assert result["uri"].startswith("file:")
    assert path == (archive.data_dir / "storage" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{UIDS['J2']}.dcm").resolve()


def test_search_field_selection(archive):
    response = archive.admin.get("/search", query="PatientName:muller", field=["PatientName", "StudyComments", "SliceLocation", "PatientWeight"])
    [result] = response.json()["results"]
    # Missing attributes are omitted; values are strings.
    assert result["fields"] == {"PatientName": "MÜLLER^JÜRGEN", "StudyComments": "line one\nline two", "SliceLocation": "-50"}


def test_search_paging(archive):
    everything = archive.admin.get("/search", query="*:*", field="SOPInstanceUID").json()
    assert everything["numResults"] == 10 and len(everything["results"]) == 10
    order = [r["fields"]["SOPInstanceUID"] for r in everything["results"]]
    pages = []
    for offset in (0, 3, 6, 9):
        page = archive.admin.get("/search", query="*:*", field="SOPInstanceUID", psize=3, offset=offset).json()
        assert page["numResults"] == 10  # the total, not the page size
        pages += [r["fields"]["SOPInstanceUID"] for r in page["results"]]
    assert pages == order
    empty = archive.admin.get("/search", query="*:*", psize=0).json()
    assert empty["results"] == [] and empty["numResults"] == 10
    beyond = archive.admin.get("/search", query="*:*", offset=50).json()
    assert beyond["results"] == [] and beyond["numResults"] == 10
    ranked = archive.admin.get("/search", query="doe", field="SOPInstanceUID", psize=2, offset=4).json()
    assert ranked["numResults"] == 5 and len(ranked["results"]) == 1


@pytest.mark.parametrize("params", [{"psize": "-1"}, {"offset": "-1"}, {"psize": "ten"}, {"offset": "1.5"}, {"depth": "image"}])
def test_search_bad_parameters_are_400(archive, params):
    response = archive.admin.request("GET", "/search", {"query": "*:*", **params})
    assert response.status == 400 and "error" in response.json()


def test_unknown_provider_is_400_and_known_aliases_work(archive):
    for path in ("/search", "/searchDIM"):
        response = archive.admin.get(path, query="*:*", provider="nosuch")
        assert response.status == 400
        assert response.json()["error"] == "nosuch is not a valid query provider"
    assert labels(search(archive, "Modality:PT", provider="lucene")) == {"R1"}
    assert labels(search(archive, "Modality:PT", provider=["index", "lucene"])) == {"R1"}
    providers = archive.admin.get("/providers")
    assert providers.status == 200 and "index" in providers.json()


# ---- /searchDIM -------------------------------------------------------------------------------


def expected_image(root: pathlib.Path, label: str) -> dict:
    ds = DATASETS[label]
    path = root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    return {"sopInstanceUID": UIDS[label], "rawPath": str(path), "uri": path.as_uri(), "filename": path.name,
            "number": int(ds.InstanceNumber)}


def expected_patient(root: pathlib.Path, labels_in_order: list, birthdate=False) -> dict:
    """The DIM tree of one patient's instances, built from the data sets sent."""
    first = DATASETS[labels_in_order[0]]
    patient = {"id": first.PatientID, "name": str(first.PatientName), "gender": first.PatientSex, "nStudies": 0,
               "birthdate": first.PatientBirthDate if birthdate else "", "studies": []}
    for label in labels_in_order:
        ds = DATASETS[label]
        study = next((s for s in patient["studies"] if s["studyInstanceUID"] == ds.StudyInstanceUID), None)
        if study is None:
            study = {"studyInstanceUID": ds.StudyInstanceUID, "studyDate": ds.StudyDate, "studyDescription": ds.StudyDescription,
                     "institutionName": ds.InstitutionName, "modalities": ds.Modality, "series": []}
            patient["studies"].append(study)
            patient["nStudies"] += 1
        series = next((s for s in study["series"] if s["serieInstanceUID"] == ds.SeriesInstanceUID), None)
        if series is None:
            series = {"serieNumber": int(ds.SeriesNumber), "serieInstanceUID": ds.SeriesInstanceUID,
                      "serieDescription": ds.SeriesDescription, "serieModality": ds.Modality, "images": []}
            study["series"].append(series)
        series["images"].append(expected_image(root, label))
    return patient


def test_search_dim_image_depth_is_the_whole_tree(archive):
    root = (archive.data_dir / "storage").resolve()
    body = archive.admin.get("/searchDIM", query="PatientName:doe").json()
    assert set(body) == {"numResults", "elapsedTime", "results"}
    assert body["numResults"] == 2
    by_id = {p["id"]: p for p in body["results"]}
    assert by_id == {
        "P0000000000": expected_patient(root, ["J1", "J2", "J3", "J4"]),
        "P0000000005": expected_patient(root, ["D1"]),
    }
    # depth=image is the default and may be named.
    assert archive.admin.get("/searchDIM", query="PatientName:doe", depth="image").json()["results"] == body["results"]


def test_search_dim_modalities_of_a_study_join_its_series(start_daemon):
    daemon = start_daemon(env=ADMIN_ENV)
    ct = studygen.make_instance(0, 0, 0, 0, size=8)
    sr = studygen.make_instance(0, 0, 1, 0, size=8, Modality="SR")
    assert daemon.store(ct, sr) == [0, 0]
    [patient] = admin_client(daemon).get("/searchDIM", query="*:*").json()["results"]
    assert patient["studies"][0]["modalities"] in ("CT,SR", "SR,CT")


@pytest.mark.parametrize("depth", ["none", "patient", "study", "series", "image"])
def test_search_dim_depths(archive, depth):
    body = archive.admin.get("/searchDIM", query="PatientName:john", depth=depth).json()
    if depth == "none":
        assert body.keys() == {"numResults", "elapsedTime"} and body["numResults"] == 1
        return
    [patient] = body["results"]
    assert set(patient) == {"id", "name", "gender", "nStudies", "birthdate"} | ({"studies"} if depth != "patient" else set())
    if depth == "patient":
        return
    assert len(patient["studies"]) == 2
    for study in patient["studies"]:
        assert set(study) == {"studyInstanceUID", "studyDate", "studyDescription", "institutionName", "modalities"} | ({"series"} if depth != "study" else set())
        for series in study.get("series", []):
            assert set(series) == {"serieNumber", "serieInstanceUID", "serieDescription", "serieModality"} | ({"images"} if depth == "image" else set())


def test_search_dim_birthdate_only_when_asked(archive):
    [patient] = archive.admin.get("/searchDIM", query="PatientName:jane").json()["results"]
    assert patient["birthdate"] == ""
    [patient] = archive.admin.get("/searchDIM", query="PatientName:jane", field="PatientBirthDate").json()["results"]
    assert patient["birthdate"] == DATASETS["D1"].PatientBirthDate != ""


def test_search_dim_pages_over_patients(archive):
    everything = archive.admin.get("/searchDIM", query="*:*", depth="patient").json()
    assert everything["numResults"] == 7
    ids = [p["id"] for p in everything["results"]]
    assert sorted(ids) == sorted({DATASETS[label].PatientID for label in INSTANCES})
    pages = []
    for offset in (0, 3, 6):
        page = archive.admin.get("/searchDIM", query="*:*", depth="patient", psize=3, offset=offset).json()
        assert page["numResults"] == 7
        pages += [p["id"] for p in page["results"]]
    assert pages == ids
    assert len(archive.admin.get("/searchDIM", query="*:*", depth="patient", psize=0).json()["results"]) == 7
    for params in ({"depth": "deep"}, {"psize": "-2"}, {"offset": "x"}):
        response = archive.admin.request("GET", "/searchDIM", {"query": "*:*", **params})
        assert response.status == 400 and "error" in response.json()


# ---- dump, file, export, presets --------------------------------------------------------------


def test_dump_has_every_element_with_sequences_and_private_tags(archive):
    response = archive.admin.get("/dump", uid=UIDS["J1"])
    assert response.status == 200
    body = response.json()
    assert set(body) == {"results", "elapsedTime"}
    assert set(body["results"]) == {"uri", "fields"}  # an object, not a list
    fields = body["results"]["fields"]
    ds = DATASETS["J1"]
    expected_keywords = {e.keyword or f"{e.tag:08X}" for e in ds if e.tag != 0x7FE00010}
    assert expected_keywords <= set(fields)
    assert "PixelData" not in fields
    assert fields["PatientName"] == "DOE^JOHN"
    assert fields["ImageOrientationPatient"] == ["1", "0", "0", "0", "1", "0"]
    assert fields["ProcedureCodeSequence"] == [{"CodeValue": "HEAD1", "CodingSchemeDesignator": "99TEST", "CodeMeaning": "CT HEAD routine"}]
    assert fields["00090010"] == "DICOOGLED TEST"
    assert fields["00091010"] == "special marker value"
    assert fields["00091011"] == str(ds[0x00091011].value)
    assert body["results"]["uri"] == search(archive, "SOPInstanceUID:" + UIDS["J1"]).json()["results"][0]["uri"]


def test_dump_errors(archive):
    assert archive.admin.get("/dump", uid="1.2.3.4.5.6").status == 404
    for uid in ("", "../../etc/passwd", "1.2.x", "1" * 80):
        response = archive.admin.get("/dump", uid=uid)
        assert response.status == 400 and "error" in response.json()


def test_legacy_file_returns_the_stored_bytes(archive):
    ds = DATASETS["G1"]
    response = archive.user.get("/legacy/file", uid=UIDS["G1"])
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/dicom"
    assert response.headers["Content-Disposition"] == f'attachment; filename="{UIDS["G1"]}.dcm"'
    stored = archive.data_dir / "storage" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{UIDS['G1']}.dcm"
    assert response.body == stored.read_bytes()
    received = pydicom.dcmread(io.BytesIO(response.body))
    assert received.SOPInstanceUID == UIDS["G1"] and received.PixelData == ds.PixelData
    assert archive.user.get("/legacy/file", uid="1.2.3.4.5.6").status == 404
    for uid in ("../../etc/passwd", "", "/etc/passwd"):
        response = archive.user.get("/legacy/file", uid=uid)
        assert response.status == 400 and "error" in response.json()


def parse_dicoogle_csv(text):
    """Each line ends with ';'; values are "quoted" and empty ones are bare."""
    lines = text.split("\n")
    assert lines[-1] == ""
    return [line for line in lines[:-1]]


EXPECTED_CSV_LINES = {
    "M1": '"MÜLLER^JÜRGEN";"CT";"CT chest, contrast";"line oneline two";;',
    "J4": '"DOE^JOHN";"MR";"MR knee left";;;',
}


def test_export_csv_get(archive):
    response = archive.user.get("/export", query="PatientName:muller OR Modality:MR", fields=["PatientName", "Modality", "StudyDescription", "StudyComments", "PatientWeight"])
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/csv")
    assert "QueryResultsExport.csv" in response.headers["Content-Disposition"]
    lines = parse_dicoogle_csv(response.text)
    assert lines[0] == '"PatientName";"Modality";"StudyDescription";"StudyComments";"PatientWeight";'
    assert sorted(lines[1:]) == sorted([EXPECTED_CSV_LINES["M1"], EXPECTED_CSV_LINES["J4"], '"GARCÍA^JOSÉ";"MR";"MR brain";;;'])


def test_export_csv_post_json_data(archive):
    data = {"JSON-DATA": json.dumps({"queryString": "PatientName:muller", "extraFields": ["PatientName", "Modality"], "providers": ["lucene"]})}
    response = archive.user.post("/export", data=data)
    assert response.status == 200, response
    assert response.text == '"PatientName";"Modality";\n"MÜLLER^JÜRGEN";"CT";\n'


def test_export_file_two_steps(archive):
    # The web app's flow: fields as a JSON array string, the query in the URL.
    step1 = archive.user.request("POST", "/exportFile", {"query": "PatientName:muller OR Modality:MR", "fields": json.dumps(["PatientName", "Modality", "StudyDescription", "StudyComments", "PatientWeight"]), "providers": "lucene", "keyword": "true"})
    assert step1.status == 200, step1
    uid = step1.json()["uid"]
    step2 = archive.user.get("/exportFile", UID=uid)
    assert step2.status == 200
    assert step2.headers["Content-Type"].startswith("application/csv")
    assert 'filename="QueryResultsExport.csv"' in step2.headers["Content-Disposition"]
    lines = parse_dicoogle_csv(step2.text)
    assert lines[0] == '"PatientName";"Modality";"StudyDescription";"StudyComments";"PatientWeight";'
    assert sorted(lines[1:]) == sorted([EXPECTED_CSV_LINES["M1"], EXPECTED_CSV_LINES["J4"], '"GARCÍA^JOSÉ";"MR";"MR brain";;;'])
    assert archive.user.get("/exportFile", UID="not-a-uuid").status == 400
    assert archive.user.get("/exportFile", UID="00000000-0000-0000-0000-000000000000").status == 404
    assert archive.user.get("/exportFile", UID="../../etc/passwd").status == 400


def test_export_errors(archive):
    assert archive.user.get("/export", query="*:*").status == 400  # no fields
    assert archive.user.get("/export", query="(", fields="PatientName").status == 400
    assert archive.user.get("/export", query="*:*", fields="PatientName", providers="nosuch").status == 400
    response = archive.user.post("/export", data={"JSON-DATA": "{not json"})
    assert response.status == 400 and "error" in response.json()


def test_export_list(archive):
    keywords = archive.user.get("/export/list").json()
    assert "PatientName" in keywords and "StudyInstanceUID" in keywords and keywords == sorted(keywords)


def test_presets(archive):
    user, admin = archive.user, archive.admin
    assert user.get(f"/presets/{USER}").json() == []
    response = user.request("POST", f"/presets/{USER}/mine", data=[("field", "PatientName"), ("field", "Modality")])
    assert response.status == 200
    user.request("POST", f"/presets/{USER}/other", data=[("field", "StudyDate")])
    assert user.get(f"/presets/{USER}").json() == [
        {"name": "mine", "fields": ["PatientName", "Modality"]}, {"name": "other", "fields": ["StudyDate"]}]
    # Saving again replaces.
    user.request("POST", f"/presets/{USER}/other", data=[("field", "StudyTime")])
    assert user.get(f"/presets/{USER}").json()[1] == {"name": "other", "fields": ["StudyTime"]}
    # Another user's presets need an administrator.
    assert user.get("/presets/admin").status == 403
    assert user.request("POST", "/presets/admin/x", data=[("field", "PatientName")]).status == 403
    assert admin.get(f"/presets/{USER}").json()[0]["name"] == "mine"
    assert user.request("POST", f"/presets/{USER}/empty").status == 400
    assert archive.anonymous.get(f"/presets/{USER}").status == 401


# ---- index tasks, unindex, remove -------------------------------------------------------------


def tasks(client):
    response = client.get("/index/task")
    assert response.status == 200
    return response.json()


def wait_for_task(client, uid, timeout=120):
    def finished():
        task = next(t for t in tasks(client)["results"] if t["taskUid"] == uid)
        return task if task.get("complete") else None
    return wait_until(finished, timeout=timeout, interval=0.02, message=f"task {uid}")


def test_index_task_progress_and_counts(start_daemon, tmp_path):
    daemon = start_daemon(env=ADMIN_ENV)
    admin = admin_client(daemon)
    folder = tmp_path / "to index"  # a space, sent as %20
    paths = studygen.generate(folder, patients=4, studies=3, series=4, instances=5, size=8, seed=7)
    (folder / "notes.txt").write_text("not DICOM")
    (folder / "P0000" / "broken.dcm").write_bytes(paths[0].read_bytes()[:600])
    response = admin.post("/management/tasks/index", uri=folder.as_uri())
    assert response.status == 200, response
    [task] = response.json()["tasks"]
    assert set(task) >= {"uid", "name", "progress", "done", "cancelled", "timeCreated"}
    uid = task["uid"]
    seen = []
    while True:
        listed = tasks(admin)
        status = next(t for t in listed["results"] if t["taskUid"] == uid)
        seen.append(status["taskProgress"])
        if status.get("complete"):
            break
        assert listed["count"] >= 1  # tasks still running
        assert set(status) >= {"taskUid", "taskName", "taskProgress", "taskTimeCreated"}
    assert status["taskName"] == f"[index]index {folder.as_uri()}"
    assert status["taskProgress"] == 1.0
    assert status["nIndexed"] == len(paths) == 240 and status["nErrors"] == 2
    assert isinstance(status["elapsedTime"], int) and "canceled" not in status
    assert all(0.0 <= p <= 1.0 for p in seen) and seen == sorted(seen)
    assert any(0.0 < p < 1.0 for p in seen), f"never saw a fraction: {seen[:5]}...{seen[-5:]}"
    assert tasks(admin)["count"] == 0
    found = admin.get("/search", query="PatientID:P007*", psize=0).json()
    assert found["numResults"] == 240
    # The files were indexed in place, not copied.
    uri = admin.get("/search", query="PatientID:P007*", psize=1).json()["results"][0]["uri"]
    assert urllib.parse.unquote(urllib.parse.urlparse(uri).path).startswith(str(folder))
    # Closing removes it from the list; closing again is an error.
    assert admin.post("/index/task", uid=uid, type="close", action="delete").json() == {"removed": True}
    assert all(t["taskUid"] != uid for t in tasks(admin)["results"])
    assert admin.post("/index/task", uid=uid, type="close").json() == {"error": True}
    assert admin.post("/index/task", uid=uid, type="explode").status == 400


def test_index_task_stop(start_daemon, tmp_path):
    daemon = start_daemon(env=ADMIN_ENV)
    admin = admin_client(daemon)
    big = tmp_path / "big"
    studygen.generate(big, patients=5, studies=4, series=5, instances=6, size=8, seed=8)  # 600 files
    small = tmp_path / "small"
    studygen.generate(small, patients=1, studies=1, series=1, instances=3, size=8, seed=9)
    running = admin.post("/management/tasks/index", uri=big.as_uri()).json()["tasks"][0]["uid"]
    # file:/path, with one slash, is how Dicoogle's web app writes a folder.
    queued = admin.post("/management/tasks/index", uri="file:" + str(small)).json()["tasks"][0]["uid"]
    # Stop the queued one before it starts, and the running one half way.
    assert admin.post("/index/task", uid=queued, type="stop", action="delete").json() == {"stopped": True}
    wait_until(lambda: next(t for t in tasks(admin)["results"] if t["taskUid"] == running)["taskProgress"] > 0.05,
               interval=0.01, message="the big task to start")
    assert admin.post("/index/task", uid=running, type="stop", action="delete").json() == {"stopped": True}
    stopped = wait_for_task(admin, running)
    assert stopped["canceled"] is True
    assert 0 < stopped["nIndexed"] < 600
    never_ran = wait_for_task(admin, queued)
    assert never_ran["canceled"] is True and never_ran["nIndexed"] == 0
    assert admin.get("/search", query="PatientID:P009*", psize=0).json()["numResults"] == 0
    assert admin.post("/index/task", uid=running, type="stop").json() == {"stopped": True}  # it was cancelled
    assert admin.post("/index/task", uid="no-such-task", type="stop").json() == {"error": True}


def test_index_task_errors(start_daemon, tmp_path):
    daemon = start_daemon(env=ADMIN_ENV)
    admin = admin_client(daemon)
    for params in ({}, {"uri": "file:/no/such/folder"}, {"uri": "relative/path"}, {"uri": "http://example.org/x"},
                   {"uri": "file://otherhost/data"}, {"uri": "file:/../../no/such"}, {"uri": "file:/tmp/a\x00b"}):
        response = admin.request("POST", "/management/tasks/index", params)
        assert response.status == 400 and "error" in response.json(), (params, response)
    assert tasks(admin) == {"results": [], "count": 0}


@pytest.fixture
def small_archive(start_daemon, tmp_path):
    """A daemon with 2 patients x 2 studies x 2 series x 2 instances stored, and its admin client."""
    daemon = start_daemon(env=ADMIN_ENV)
    paths = studygen.generate(tmp_path / "gen", patients=2, studies=2, series=2, instances=2, size=8)
    datasets = [pydicom.dcmread(p) for p in paths]
    assert daemon.store(*datasets) == [0] * 16
    daemon.datasets = datasets
    return daemon, admin_client(daemon)


def stored_path(daemon, ds) -> pathlib.Path:
    return (daemon.data_dir / "storage" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm").resolve()


def uids_found(admin, query="*:*"):
    return {r["fields"]["SOPInstanceUID"] for r in admin.get("/search", query=query, field="SOPInstanceUID").json()["results"]}


def test_unindex_by_uri_and_uids(small_archive):
    daemon, admin = small_archive
    datasets = daemon.datasets
    everything = {ds.SOPInstanceUID for ds in datasets}
    one = datasets[0]
    assert admin.post("/management/tasks/unindex", uri=stored_path(daemon, one).as_uri()).json() == {"indexed": 1, "failed": 0, "notFound": 0}
    gone = {one.SOPInstanceUID}
    assert uids_found(admin) == everything - gone
    assert stored_path(daemon, one).exists()  # unindex leaves the file
    two = datasets[1]
    assert admin.post("/management/tasks/unindex", SOPInstanceUID=[two.SOPInstanceUID, "1.2.3.4"]).json() == {"indexed": 1, "failed": 0, "notFound": 1}
    gone.add(two.SOPInstanceUID)
    series_uid = datasets[2].SeriesInstanceUID
    in_series = {ds.SOPInstanceUID for ds in datasets if ds.SeriesInstanceUID == series_uid}
    assert admin.post("/management/tasks/unindex", SeriesInstanceUID=series_uid).json() == {"indexed": len(in_series), "failed": 0, "notFound": 0}
    gone |= in_series
    study_uid = datasets[-1].StudyInstanceUID
    in_study = {ds.SOPInstanceUID for ds in datasets if ds.StudyInstanceUID == study_uid}
    assert admin.post("/management/tasks/unindex", StudyInstanceUID=study_uid).json() == {"indexed": len(in_study), "failed": 0, "notFound": 0}
    gone |= in_study
    assert uids_found(admin) == everything - gone
    assert daemon.counts()["instances"] == 16 - len(gone)
    assert all(stored_path(daemon, ds).exists() for ds in datasets)
    # dicoogle-client sends several URIs as a form body.
    rest = [ds for ds in datasets if ds.SOPInstanceUID not in gone]
    body = [("uri", stored_path(daemon, ds).as_uri()) for ds in rest[:2]]
    assert admin.request("POST", "/management/tasks/unindex", data=body).json() == {"indexed": 2, "failed": 0, "notFound": 0}
    # A folder URI unindexes everything below it.
    assert admin.post("/management/tasks/unindex", uri=(daemon.data_dir / "storage").resolve().as_uri()).json()["indexed"] == len(rest) - 2
    assert uids_found(admin) == set()


def test_unindex_errors(small_archive):
    daemon, admin = small_archive
    for params in ({}, {"SOPInstanceUID": "1.2", "StudyInstanceUID": "1.2"}, {"SOPInstanceUID": "../../etc/passwd"},
                   {"SeriesInstanceUID": "1.2.x"}, {"uri": "http://x/y"}):
        response = admin.request("POST", "/management/tasks/unindex", params)
        assert response.status == 400 and "error" in response.json(), (params, response)
    assert admin.post("/management/tasks/unindex", uri="file:/../../etc").json() == {"indexed": 0, "failed": 0, "notFound": 1}
    assert daemon.counts()["instances"] == 16


def test_remove_deletes_files_and_unindexes(small_archive, tmp_path):
    daemon, admin = small_archive
    datasets = daemon.datasets
    one = datasets[0]
    response = admin.post("/management/tasks/remove", uri=stored_path(daemon, one).as_uri())
    assert response.status == 200 and response.json() == {"removed": 1, "failed": 0, "notFound": 0}
    assert not stored_path(daemon, one).exists()
    assert one.SOPInstanceUID not in uids_found(admin)
    study_uid = datasets[-1].StudyInstanceUID
    in_study = [ds for ds in datasets if ds.StudyInstanceUID == study_uid]
    assert admin.post("/management/tasks/remove", StudyInstanceUID=study_uid).json() == {"removed": len(in_study), "failed": 0, "notFound": 0}
    assert not any(stored_path(daemon, ds).exists() for ds in in_study)
    assert daemon.counts()["instances"] == 16 - 1 - len(in_study)
    # Remove is not recursive (dicoogle-client: "unlike index()"): a folder removes nothing.
    storage_uri = (daemon.data_dir / "storage").resolve().as_uri()
    assert admin.post("/management/tasks/remove", uri=storage_uri).json() == {"removed": 0, "failed": 0, "notFound": 1}
    assert admin.post("/management/tasks/remove", uri="file:/").json() == {"removed": 0, "failed": 0, "notFound": 1}
    assert daemon.counts()["instances"] == 16 - 1 - len(in_study)
    # Only indexed instances can be removed: traversal to another file removes nothing.
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    traversal = "file:" + str(daemon.data_dir / "storage") + "/../../" + victim.name
    assert admin.post("/management/tasks/remove", uri=traversal).json() == {"removed": 0, "failed": 0, "notFound": 1}
    assert admin.post("/management/tasks/remove", uri=victim.as_uri()).json()["removed"] == 0
    assert victim.read_text() == "keep me"


# ---- access control ---------------------------------------------------------------------------

#: What the reference (PR dicoogle/dicoogle#740) and dicoogled's design say each route needs.
PUBLIC_ROUTES = {"/health", "/login", "/logout", "/openapi.json", "/welcome", "/"}
PUBLIC_PREFIXES = ("/ext/version", "/viewer", "/static/", "/learn", "/shared")  # /shared: opening a share link; the viewer's, web app's and course files hold no patient data
#: Routes for administrators alone (/research/: de-identified exports and the pseudonym map behind
#: them; granting access to collections; /collections is the caller's own; /audit: the audit log).
ADMIN_PREFIXES = ("/user", "/management/", "/plugins", "/index/task", "/logger", "/research/", "/labels/<label>/access",
                  "/collections/members", "/audit")
#: Imports write (any logged-in user, as STOW-RS: allow_unauthorized opens reads only), and each
#: import's report is its starter's.
USER_ROUTES = {"/user/<username>/password", "/presets/<username>", "/presets/<username>/<name>", "/import", "/import/<uid>",
               "/collections", "/share", "/share/<share_id>"}
#: Routes read by any reader and written by any logged-in user: labels are the users' own sorting.
USER_WRITE_PATHS = {"/studies/<uid>/labels/<label>", "/series/<uid>/labels/<label>"}
#: Routes read by any reader but written only by an administrator: scheduling is the RIS's job.
ADMIN_WRITE_PREFIXES = ("/worklist",)


def expected_access(method: str, path: str) -> str:
    if path.startswith(("/dicom-web", "/ext/<name>")):
        # Plugin web services: the route asks for a login (read), the dispatcher a user for writes.
        return "read" if method in ("GET", "HEAD", "OPTIONS") else "user"
    if path in PUBLIC_ROUTES or path.startswith(PUBLIC_PREFIXES):
        return "public"
    if path in USER_ROUTES:
        return "user"
    if path == "/user" or path.startswith(ADMIN_PREFIXES):
        return "admin"
    if path in USER_WRITE_PATHS and method not in ("GET", "HEAD", "OPTIONS"):
        return "user"
    if path.startswith(ADMIN_WRITE_PREFIXES) and method not in ("GET", "HEAD", "OPTIONS"):
        return "admin"
    if path == "/studies/<study>/protected" and method != "GET":  # protecting a study: an archive setting
        return "admin"
    return "read"


def app_routes(daemon) -> list[tuple[str, str]]:
    """(method, path) of every route: from /openapi.json, else from the app built in process."""
    response = Client(base_url(daemon)).get("/openapi.json")
    if response.status == 200:
        spec = response.json()
        routes = []
        for path, operations in spec["paths"].items():
            bottle_path = path.replace("{", "<").replace("}", ">")
            routes += [(method.upper(), bottle_path) for method in operations if method in ("get", "post", "put", "delete", "patch")]
        return routes
    import dicoogled
    config = dicoogled.Config.load(data_dir=daemon.data_dir.parent / "routes-data")
    routes_daemon = dicoogled.Daemon(config)
    try:
        app = dicoogled.make_app(routes_daemon)
        return [(route.method, route.rule) for route in app.routes]
    finally:
        routes_daemon.stop()


def concrete(path: str, username: str) -> str:
    return (path.replace("<username>", username).replace("<name>", "preset1")
            .replace("<path:path>", "x").replace("<uid>", "1.2.3").replace("<study>", "1.2.3"))


def test_route_list_is_complete(start_daemon):
    daemon = start_daemon(env=ADMIN_ENV)
    routes = set(app_routes(daemon))
    for route in [("GET", "/search"), ("GET", "/searchDIM"), ("GET", "/dump"), ("POST", "/login"), ("GET", "/login"),
                  ("POST", "/logout"), ("GET", "/user"), ("POST", "/user"), ("DELETE", "/user/<username>"),
                  ("GET", "/legacy/file"), ("GET", "/export"), ("POST", "/exportFile"), ("GET", "/exportFile"),
                  ("GET", "/presets/<username>"), ("POST", "/management/tasks/index"), ("GET", "/index/task"),
                  ("POST", "/index/task"), ("POST", "/management/tasks/unindex"), ("POST", "/management/tasks/remove"),
                  ("GET", "/providers"), ("GET", "/ext/version")]:
        assert route in routes


def test_openapi_access_levels_match_the_reference(start_daemon):
    """Each route's declared x-access is what the reference and this file's rules expect."""
    daemon = start_daemon(env=ADMIN_ENV)
    response = Client(base_url(daemon)).get("/openapi.json")
    if response.status == 404:
        pytest.skip("no /openapi.json")
    mismatches = []
    for path, operations in response.json()["paths"].items():
        bottle_path = re.sub(r"{(\w+)}", r"<\1>", path)
        for method, operation in operations.items():
            declared, expected = operation["x-access"], expected_access(method.upper(), bottle_path)
            # The DICOMweb plugin's mount checks access itself (test_access_control_matrix checks it).
            plugin_write = bottle_path.startswith(("/dicom-web", "/ext/<name>")) and (declared, expected) == ("read", "user")
            if declared != expected and bottle_path not in ("/login", "/logout") and not plugin_write:
                mismatches.append(f"{method.upper()} {path}: declared {declared}, expected {expected}")
    assert not mismatches, "\n".join(mismatches)


def test_access_control_matrix(start_daemon):
    """Every route: anonymous callers get 401 unless it is public, users 403 on admin routes,
    administrators never 401/403; nobody gets a 5xx."""
    daemon = start_daemon(env=ADMIN_ENV)
    admin = admin_client(daemon)
    admin.post("/user", data={"username": USER, "password": USER_PASSWORD})
    user = Client(base_url(daemon))
    user.login(USER, USER_PASSWORD)
    anonymous = Client(base_url(daemon))
    problems = []
    for method, path in sorted(set(app_routes(daemon))):
        access = expected_access(method, path)
        if path in ("/login", "/logout"):
            continue  # failed logins and logouts would end the test's sessions; covered above
        for who, client in (("anonymous", anonymous), ("user", user), ("admin", admin)):
            response = client.request(method, concrete(path, "nobody-else" if who != "user" else USER))
            status = response.status
            if who == "anonymous":
                ok = status != 401 if access == "public" else status == 401
            elif who == "user":
                ok = status == 403 if access == "admin" else status not in (401, 403)
            else:
                ok = status not in (401, 403)
            if status >= 500 or not ok:
                problems.append(f"{method} {path} ({access}) as {who}: {status} {response.body[:120]!r}")
            if status in (401, 403) and not response.headers.get("Content-Type", "").startswith("application/json"):
                problems.append(f"{method} {path} as {who}: {status} is not JSON")
    assert not problems, "\n".join(problems)
    assert user.get("/login").status == 200 and admin.get("/login").status == 200


def test_allow_unauthorized_opens_read_only_routes_only(start_daemon):
    daemon = start_daemon(config_text="[http]\nallow_unauthorized = true\n", env=ADMIN_ENV)
    admin = admin_client(daemon)
    assert daemon.store(studygen.make_instance(0, 0, 0, 0, size=8)) == [0]
    anonymous = Client(base_url(daemon))
    problems = []
    for method, path in sorted(set(app_routes(daemon))):
        access = expected_access(method, path)
        if path in ("/login", "/logout"):
            continue
        status = anonymous.request(method, concrete(path, "admin")).status
        if access in ("user", "admin") and status != 401:
            problems.append(f"{method} {path} ({access}) answered anonymous with {status}")
        if access in ("read", "public") and status in (401, 403):
            problems.append(f"{method} {path} ({access}) refused anonymous with {status}")
        if status >= 500:
            problems.append(f"{method} {path}: {status}")
    assert not problems, "\n".join(problems)
    assert anonymous.get("/search", query="*:*").json()["numResults"] == 1
    assert anonymous.post("/management/tasks/unindex", SOPInstanceUID="1.2.3").status == 401
    assert anonymous.post("/user", data={"username": "eve", "password": "x", "admin": "true"}).status == 401
    assert admin.get("/search", query="*:*").json()["numResults"] == 1


# ---- hostile input ----------------------------------------------------------------------------

HOSTILE = [
    '"', "*", "NEAR(", "NEAR(a b)", "^", ":", "-", "AND", "OR", "NOT", "a OR", "(", ")", "[", "{", "}", "\\", "?", "~",
    "'; DROP TABLE instances; --", "\" OR 1=1 --", "x') OR ('1'='1", "a*b?c", "PatientName:*", "*:*:*",
    "\x00", "doe\x00", "\x00:\x00", "%00", "\u202e", "𝕏", "\ufeff", "\r\n", "\t",
    "", " ", "x" * 100_000, "doe " * 25_000, "(" * 5000 + "a", "NOT " * 2400 + "a", "-" * 9000 + "a",
    "+" * 9000 + "a", "a " + "OR a " * 1900, "a " + "AND a " * 1600, "Modality:(" + "CT " * 3000 + ")",
    "../../etc/passwd", "file:/../../etc/passwd", "/etc/passwd", "file:///etc/passwd", "..\\..\\windows",
    "PatientName:[a TO", "StudyDate:[1 TO 2 TO 3]", "SliceLocation:Float:[x TO y]", "SliceLocation:Float:[1e308 TO 1e309]",
    "SliceLocation:[NaN TO inf]", "uri:*", "00091010:\x00", "ZZZZZZZZ:a", "Patient_Name:x", "_:_",
    '{"queryString": 5}', '{"queryString": "*:*", "extraFields": "PatientName"}', '[1, 2]', '{"queryString": "*:*", "providers": [null]}',
    "[1]", '["index", {"a": 1}]', "null", "true",
]

#: (method, path, parameter names) of routes taking user input, with the other parameters they need.
HOSTILE_TARGETS = [
    ("GET", "/search", ["query", "field", "provider", "psize", "offset"], {"query": "*:*"}),
    ("GET", "/searchDIM", ["query", "provider", "psize", "offset", "depth", "field"], {"query": "*:*"}),
    ("GET", "/dump", ["uid", "provider"], {"uid": "1.2.3"}),
    ("GET", "/legacy/file", ["uid"], {}),
    ("GET", "/export", ["query", "fields", "providers"], {"query": "*:*", "fields": "PatientName"}),
    ("POST", "/export", ["JSON-DATA"], {}),
    ("POST", "/exportFile", ["query", "fields", "providers"], {"query": "*:*", "fields": "PatientName"}),
    ("GET", "/exportFile", ["UID"], {}),
    ("POST", "/management/tasks/unindex", ["uri", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"], {}),
    ("POST", "/management/tasks/remove", ["uri", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"], {}),
    ("POST", "/index/task", ["uid", "type"], {"type": "close"}),
    ("GET", "/providers", ["type"], {}),
    ("GET", "/export/list", [], {}),
]


def check_hostile_response(response, where):
    assert response.status < 500, f"{where}: {response}"
    if response.status >= 400:
        assert response.headers["Content-Type"].startswith("application/json"), where
        assert "error" in response.json(), where


def assert_archive_intact(archive):
    assert archive.health()["status"] == "ok"
    assert archive.counts()["instances"] == len(INSTANCES)
    assert labels(search(archive, "*:*")) == ALL
    assert labels(search(archive, "doe")) == {"J1", "J2", "J3", "J4", "D1"}


@pytest.mark.parametrize("method, path, names, base", HOSTILE_TARGETS, ids=[f"{m} {p}" for m, p, _, _ in HOSTILE_TARGETS])
def test_hostile_parameters(archive, method, path, names, base):
    for name in names:
        for value in HOSTILE:
            params = {**base, name: value}
            in_body = method == "POST" and len(value) > 1000
            response = archive.admin.request(method, path, None if in_body else params, data=params if in_body else None)
            check_hostile_response(response, f"{method} {path} {name}={value[:40]!r}")
            if path == "/search" and name != "field" and response.status == 200:
                found = {r["fields"].get("SOPInstanceUID") for r in response.json()["results"]}
                assert found <= set(LABELS), (name, value[:40])
    assert_archive_intact(archive)


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_queries_answer_400_or_a_correct_result(archive, value):
    response = search(archive, value)
    check_hostile_response(response, repr(value[:40]))
    if response.status == 200:
        body = response.json()
        assert body["numResults"] == len(body["results"])
        assert {LABELS[r["fields"]["SOPInstanceUID"]] for r in body["results"]} <= ALL
    if value.startswith("'; DROP"):
        assert response.status == 200 and response.json()["results"] == []
    if value in ("", " "):
        assert response.status == 400


def test_hostile_raw_query_strings(archive):
    token = archive.admin.token
    for raw in ("query=%FF%FE", "query=%ZZ", "query=doe&query=", "query=%E0%80%80", "query", "=&&&=", "query=" + "%28" * 3000,
                "query=*:*&psize=99999999999999999999999", "query=*:*&offset=1e3", "query=*:*&field=%00"):
        for path in ("/search", "/searchDIM", "/dump", "/export"):
            response = Client(base_url(archive), token).request("GET", path, raw_query=raw)
            check_hostile_response(response, f"{path}?{raw[:40]}")
    assert_archive_intact(archive)


def test_hostile_path_segments(archive):
    for path in ("/presets/..%2F..%2Fetc%2Fpasswd", "/presets/%00", "/user/%00", "/dump/../../etc/passwd",
                 "/legacy/file/..%2F..", "/%2e%2e/%2e%2e/etc/passwd", "/search/../health", "/ext/" + "a" * 5000):
        for method in ("GET", "POST", "DELETE"):
            response = archive.user.request(method, path)
            check_hostile_response(response, f"{method} {path[:60]}")
    assert_archive_intact(archive)


def test_hostile_logins(start_daemon):
    daemon = start_daemon(env=ADMIN_ENV)
    client = Client(base_url(daemon))
    for value in ("'; DROP TABLE users; --", "\x00", "x" * 100_000, "admin\x00", "", "é" * 100):
        response = client.request("POST", "/login", data={"username": value, "password": value}, auth=None)
        check_hostile_response(response, repr(value[:20]))
    for header in ("Basic " + "A" * 10_000, "Basic " + base64.b64encode(b"\xff\xfe:\x00").decode(), "Bearer ", "Bearer  x", "x" * 8000):
        response = client.request("GET", "/search", {"query": "*:*"}, auth=header)
        check_hostile_response(response, header[:20])
        assert response.status in (401, 429)


# ---- what /health counts ----------------------------------------------------------------------


def health_totals(daemon) -> tuple[int, dict]:
    health = daemon.health()
    assert health["storage"]["bytes"] == sum(health["storage"]["by_origin"].values())
    return health["counts"]["instances"], health["storage"]["by_origin"]


def test_health_counts_and_bytes_follow_every_change(small_archive, tmp_path):
    """The instance count and the bytes by origin are kept as the index changes (not summed
    over the whole table on each /health), and stay right across a restart."""
    daemon, admin = small_archive
    stored = {ds.SOPInstanceUID: stored_path(daemon, ds).stat().st_size for ds in daemon.datasets}
    assert health_totals(daemon) == (16, {"store": sum(stored.values())})
    assert daemon.store(daemon.datasets[0]) == [0]  # an identical duplicate changes nothing
    assert health_totals(daemon) == (16, {"store": sum(stored.values())})

    folder = tmp_path / "in place"
    in_place = studygen.generate(folder, patients=1, studies=1, series=1, instances=3, size=8, seed=31)
    wait_for_task(admin, admin.post("/management/tasks/index", uri=folder.as_uri()).json()["tasks"][0]["uid"])
    indexed_bytes = sum(p.stat().st_size for p in in_place)
    assert health_totals(daemon) == (19, {"store": sum(stored.values()), "index": indexed_bytes})

    gone = daemon.datasets[:3]
    assert admin.post("/management/tasks/unindex", SOPInstanceUID=[ds.SOPInstanceUID for ds in gone]).json()["indexed"] == 3
    expected = (16, {"store": sum(stored.values()) - sum(stored[ds.SOPInstanceUID] for ds in gone), "index": indexed_bytes})
    assert health_totals(daemon) == expected
    admin.post("/management/tasks/unindex", uri=folder.resolve().as_uri())
    expected = (13, {"store": expected[1]["store"]})
    assert health_totals(daemon) == expected
    daemon.restart()  # unindexed files in storage are indexed again at start
    daemon.settled()
    assert health_totals(daemon) == (16, {"store": sum(stored.values())})


@pytest.mark.sqlite_only("rewrites index.sqlite as an older version made it (PRAGMA user_version)")
def test_an_index_of_the_previous_schema_is_upgraded_in_place(small_archive):
    """An index written by the version before the kept totals gets them, from its rows, the
    table of protected studies and the study events' columns and delivery queue (its studies
    counted as announced stable), at start; one from a newer version is refused with what to do."""
    import apsw

    daemon, admin = small_archive
    before = health_totals(daemon)
    daemon.stop()
    index = apsw.Connection(str(daemon.data_dir / "index.sqlite"))
    index.execute("DROP TABLE origin_totals; DROP TRIGGER instance_counted; DROP TRIGGER instance_uncounted;"
                  " DROP TRIGGER instance_recounted; DROP TABLE performed_procedure_steps; DROP TABLE worklist_entries;"
                  " DROP TABLE protected_studies; DROP TABLE study_labels; DROP TABLE series_labels;"
                  " DROP TABLE webhook_deliveries; DROP INDEX studies_unannounced;"
                  " ALTER TABLE studies DROP COLUMN last_arrival; ALTER TABLE studies DROP COLUMN stable_announced;"
                  " PRAGMA user_version=1")
    index.close()
    daemon.start()
    assert health_totals(daemon) == before
    assert "upgrading the index" in daemon.log
    assert admin.get("/management/webhooks").json()["deliveries"] == []
    index = apsw.Connection(str(daemon.data_dir / "index.sqlite"))
    assert index.execute("SELECT DISTINCT stable_announced FROM studies").fetchall() == [(1,)]
    index.close()
    assert admin.post("/management/tasks/unindex", SOPInstanceUID=daemon.datasets[0].SOPInstanceUID).json()["indexed"] == 1
    assert health_totals(daemon)[0] == before[0] - 1
    study_uid = daemon.datasets[0].StudyInstanceUID  # protected studies came with version 3
    assert admin.request("PUT", f"/studies/{study_uid}/protected").json()["changed"] is True

    daemon.stop()
    index = apsw.Connection(str(daemon.data_dir / "index.sqlite"))
    index.execute("PRAGMA user_version=99")
    index.close()
    daemon.start(wait=False)
    assert daemon.process.wait(timeout=60) != 0
    daemon.log_file.close()
    assert "has schema version 99, this dicoogled knows 6: run 'dicoogled reindex' to rebuild it" in daemon.log
