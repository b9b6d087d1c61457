"""Collections (labels with members) and who sees what: an access matrix over the REST API,
DICOMweb and DICOM (calling AEs mapped to a user or group), grants to users and groups, and a
property test that a restricted user's search never answers outside its collections."""

import datetime
import io
import pathlib
import re
import zipfile

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import studygen
from conftest import RunningDaemon, StoreSCP, make_identifier, wait_until
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind, PatientRootQueryRetrieveInformationModelFind
from restclient import ADMIN_ENV, ADMIN_PASSWORD, Client, admin_client, base_url
from test_dicom_access import find, get, move

PASSWORD = "a-long-enough-password"
COURSE = "course"


def make_users(admin: Client):
    """student (read on the course), teacher (write on it through its group), other (no collection)."""
    for name in ("student", "teacher", "other"):
        assert admin.post("/user", {"username": name, "password": PASSWORD}).json() == {"success": True}
    assert admin.post("/user/teacher", {"roles": "teachers"}).status == 200
    assert admin.request("PUT", f"/labels/{COURSE}/access/student", {"access": "read"}).status == 200
    assert admin.request("PUT", f"/labels/{COURSE}/access/group/teachers", {"access": "write"}).status == 200


def logged_in(daemon, name: str) -> Client:
    client = Client(base_url(daemon))
    client.login(name, PASSWORD)
    return client


def start_course(start_daemon, tmp_path, config: str = ""):
    """A daemon with 4 studies (2 patients x 2): the first patient's first study labelled course
    on the study, its second through one of its series; the other patient's two outside. DEST is a C-MOVE destination."""
    daemon = start_daemon(config_text=config, env=ADMIN_ENV)
    daemon.paths = studygen.generate(tmp_path / "gen", patients=2, studies=2, series=2, instances=2)
    assert set(daemon.store(*daemon.paths)) == {0}
    daemon.datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in daemon.paths]
    daemon.admin = admin_client(daemon)
    studies = sorted({d.StudyInstanceUID for d in daemon.datasets})
    # The course is the first patient's two studies: the second patient's are outside.
    first, second = sorted({d.StudyInstanceUID for d in daemon.datasets if d.PatientID == min(x.PatientID for x in daemon.datasets)})
    second_series = sorted({d.SeriesInstanceUID for d in daemon.datasets if d.StudyInstanceUID == second})[0]
    assert daemon.admin.request("PUT", f"/studies/{first}/labels/{COURSE}").status == 200
    assert daemon.admin.request("PUT", f"/series/{second_series}/labels/{COURSE}").status == 200
    daemon.inside = {first, second}  # a series' label puts its whole study in the collection
    daemon.outside = set(studies) - daemon.inside
    make_users(daemon.admin)
    return daemon


@pytest.fixture
def destination(tmp_path):
    dest = StoreSCP(tmp_path / "received", "DEST")
    yield dest
    dest.stop()


@pytest.fixture
def course(start_daemon, tmp_path, destination):
    return start_course(start_daemon, tmp_path, (
        "[dicom]\ncalling_ae_access = STUDENT_WS=user:student TEACH_WS=group:teachers GHOST_WS=user:ghost\n"
        f"[modalities]\nDEST = 127.0.0.1:{destination.port}\n"))


def instances_of(daemon, studies) -> set[str]:
    return {d.SOPInstanceUID for d in daemon.datasets if d.StudyInstanceUID in studies}


def one_instance(daemon, studies):
    return next(d for d in daemon.datasets if d.StudyInstanceUID in studies)


def searched(client: Client, query="*:*", **params) -> tuple[set[str], int]:
    response = client.get("/search", query=query, field="SOPInstanceUID", **params)
    assert response.status == 200, response
    body = response.json()
    return {r["fields"]["SOPInstanceUID"] for r in body["results"]}, body["numResults"]


def test_rest_access_matrix(course):
    """Every REST route that hands out patient data, for an administrator, a collection reader
    and a user with no collection (who sees everything: restrict_to_collections is false)."""
    daemon = course
    everything = instances_of(daemon, daemon.inside | daemon.outside)
    callers = {"admin": (daemon.admin, everything), "other": (logged_in(daemon, "other"), everything),
               "student": (logged_in(daemon, "student"), instances_of(daemon, daemon.inside))}
    inside, outside = one_instance(daemon, daemon.inside), one_instance(daemon, daemon.outside)
    for name, (client, visible) in callers.items():
        assert searched(client) == (visible, len(visible)), name
        # Paging stays right: pages of 3 make up exactly the visible set, numResults its size.
        pages = [searched(client, psize=3, offset=offset) for offset in range(0, len(visible) + 3, 3)]
        assert set().union(*(page for page, _ in pages)) == visible and {n for _, n in pages} == {len(visible)}
        dim = client.get("/searchDIM", query="*:*", depth="study").json()
        assert {s["studyInstanceUID"] for p in dim["results"] for s in p["studies"]} == \
            {d.StudyInstanceUID for d in daemon.datasets if d.SOPInstanceUID in visible}, name
        csv = client.get("/export", query="*:*", fields="SOPInstanceUID").text
        assert {line.strip('";') for line in csv.splitlines()[1:]} == visible, name
        for instance, shown in ((inside, True), (outside, inside.SOPInstanceUID in visible and outside.SOPInstanceUID in visible)):
            uid = instance.SOPInstanceUID
            expected = 200 if shown else 404
            assert client.get("/dump", uid=uid).status == expected, (name, uid)
            assert client.get("/legacy/file", uid=uid).status == expected, (name, uid)
            assert client.get("/dictags", SOPInstanceUID=uid).status == expected, (name, uid)
            assert client.post("/dic2png", {"SOPInstanceUID": uid}).status == expected, (name, uid)
            assert client.get(f"/studies/{instance.StudyInstanceUID}/labels").status == expected, (name, uid)
            assert client.get(f"/series/{instance.SeriesInstanceUID}/labels").status == expected, (name, uid)
            assert client.get(f"/studies/{instance.StudyInstanceUID}/archive").status == expected, (name, uid)
            assert client.get(f"/studies/{instance.StudyInstanceUID}/media").status == expected, (name, uid)
    # A download names what it asks for; it holds only what the caller sees.
    everyone = {"study": sorted(daemon.inside | daemon.outside)}
    for name, (client, visible) in callers.items():
        with zipfile.ZipFile(io.BytesIO(client.get("/archive", **everyone).body)) as zipped:
            assert {pathlib.PurePosixPath(n).stem for n in zipped.namelist()} == visible, name
    # The student's labels are those of what it sees; its file is the administrator's, byte for byte.
    student = callers["student"][0]
    assert student.get("/labels").json() == {"labels": [{"label": COURSE, "studies": 2}]}
    assert student.get("/legacy/file", uid=inside.SOPInstanceUID).body == \
        daemon.admin.get("/legacy/file", uid=inside.SOPInstanceUID).body
    # A search naming the other studies' patients or UIDs finds nothing of them.
    assert searched(student, f"StudyInstanceUID:{outside.StudyInstanceUID}") == (set(), 0)
    assert student.get("/collections").json() == {"restricted": True, "collections": [{"label": COURSE, "access": "read", "studies": 2}]}
    assert callers["other"][0].get("/collections").json() == {"restricted": False, "collections": []}


def test_restrict_to_collections_leaves_a_user_without_one_nothing(start_daemon, tmp_path):
    daemon = start_course(start_daemon, tmp_path, "[http]\nrestrict_to_collections = true\nallow_unauthorized = true\n")
    other = logged_in(daemon, "other")
    assert searched(other) == (set(), 0)
    assert other.get("/dump", uid=daemon.datasets[0].SOPInstanceUID).status == 404
    assert searched(Client(base_url(daemon))) == (set(), 0)  # an anonymous reader has no collection either
    everything = instances_of(daemon, daemon.inside | daemon.outside)
    assert searched(daemon.admin) == (everything, len(everything))


def test_grants_groups_and_write_access(course):
    daemon = course
    admin = daemon.admin
    assert admin.get(f"/labels/{COURSE}/access").json() == {
        "label": COURSE, "members": [{"user": "student", "access": "read"}, {"group": "teachers", "access": "write"}]}
    student, teacher, other = (logged_in(daemon, name) for name in ("student", "teacher", "other"))
    inside, outside = sorted(daemon.inside)[0], sorted(daemon.outside)[0]
    # Read access does not label; write access labels and unlabels within the collection only.
    assert student.request("PUT", f"/studies/{inside}/labels/{COURSE}").status == 403
    assert teacher.request("PUT", f"/studies/{inside}/labels/{COURSE}").json() == {"label": COURSE, "added": False}
    assert teacher.request("PUT", f"/studies/{inside}/labels/elsewhere").status == 403
    assert teacher.request("PUT", f"/studies/{outside}/labels/{COURSE}").status == 404  # not seen, so not there
    assert admin.request("PUT", f"/studies/{outside}/labels/{COURSE}").status == 200
    assert searched(student)[1] == len(instances_of(daemon, daemon.inside | {outside}))
    assert teacher.request("DELETE", f"/studies/{outside}/labels/{COURSE}").json() == {"label": COURSE, "removed": True}
    assert searched(student)[1] == len(instances_of(daemon, daemon.inside))
    # Only administrators grant; a grant to a user that does not exist is 404; bad access is 400.
    assert student.request("PUT", f"/labels/{COURSE}/access/other").status == 403
    assert admin.request("PUT", f"/labels/{COURSE}/access/nobody").status == 404
    assert admin.request("PUT", f"/labels/{COURSE}/access/other", {"access": "owner"}).status == 400
    # A grant takes effect at the next request; its revocation too (back to seeing everything).
    assert admin.request("PUT", f"/labels/{COURSE}/access/other").status == 200
    assert searched(other)[1] == len(instances_of(daemon, daemon.inside))
    assert admin.request("DELETE", f"/labels/{COURSE}/access/other").json() == {"label": COURSE, "user": "other", "revoked": True}
    assert searched(other)[1] == len(daemon.datasets)
    # Leaving the group ends the teacher's access; a deleted user's grants go with it.
    assert admin.post("/user/teacher", {"roles": ""}).status == 200
    assert searched(logged_in(daemon, "teacher"))[1] == len(daemon.datasets)
    assert admin.delete("/user/student").json() == {"success": True}
    assert {"user": "student", "access": "read"} not in admin.get(f"/labels/{COURSE}/access").json()["members"]


def dicomweb(daemon, name: str) -> DICOMwebClient:
    session = requests.Session()
    session.auth = (name, PASSWORD if name != "admin" else ADMIN_PASSWORD)
    return DICOMwebClient(url=f"{base_url(daemon)}/dicom-web", session=session)


def test_dicomweb_answers_only_what_the_caller_may_see(course):
    daemon = course
    student, admin = dicomweb(daemon, "student"), dicomweb(daemon, "admin")
    studies = lambda client, **kw: {s["0020000D"]["Value"][0] for s in client.search_for_studies(**kw)}  # noqa: E731
    assert studies(admin) == daemon.inside | daemon.outside
    assert studies(student) == daemon.inside
    assert {i["00080018"]["Value"][0] for i in student.search_for_instances()} == instances_of(daemon, daemon.inside)
    outside = one_instance(daemon, daemon.outside)
    assert student.search_for_series(search_filters={"StudyInstanceUID": outside.StudyInstanceUID}) == []
    inside = one_instance(daemon, daemon.inside)
    assert student.retrieve_instance(inside.StudyInstanceUID, inside.SeriesInstanceUID, inside.SOPInstanceUID).SOPInstanceUID \
        == inside.SOPInstanceUID
    http = requests.Session()
    http.auth = ("student", PASSWORD)
    root = f"{base_url(daemon)}/dicom-web"
    for path in (f"/studies/{outside.StudyInstanceUID}/metadata",
                 f"/studies/{outside.StudyInstanceUID}/series/{outside.SeriesInstanceUID}/instances/{outside.SOPInstanceUID}",
                 f"/studies/{outside.StudyInstanceUID}/rendered"):
        assert http.get(root + path).status_code == 404, path
    wado = {"requestType": "WADO", "studyUID": outside.StudyInstanceUID, "seriesUID": outside.SeriesInstanceUID,
            "objectUID": outside.SOPInstanceUID, "contentType": "application/dicom"}
    assert http.get(root + "/wado", params=wado).status_code == 404
    assert http.get(root + "/wado", params={**wado, "studyUID": inside.StudyInstanceUID, "seriesUID": inside.SeriesInstanceUID,
                                            "objectUID": inside.SOPInstanceUID}).status_code == 200


def test_a_mapped_calling_ae_finds_and_retrieves_only_its_collections(course, destination):
    daemon = course
    everything = daemon.inside | daemon.outside
    assert {m.StudyInstanceUID for m in find(daemon, "UNMAPPED")} == everything  # as before collections
    assert {m.StudyInstanceUID for m in find(daemon, "STUDENT_WS")} == daemon.inside
    assert {m.StudyInstanceUID for m in find(daemon, "TEACH_WS")} == daemon.inside  # its group's collections
    assert find(daemon, "GHOST_WS") == []  # mapped to a user that does not exist: nothing
    # At the patient level (Patient Root), only the patients with a study in the collection.
    for calling, expected in (("STUDENT_WS", daemon.inside), ("UNMAPPED", everything)):
        assert sorted(patient_level_find(daemon, calling)) == \
            sorted({d.PatientID for d in daemon.datasets if d.StudyInstanceUID in expected}), calling
    inside, outside = sorted(daemon.inside)[0], sorted(daemon.outside)[0]
    assert get(daemon, "STUDENT_WS", outside) == (0, 0)
    assert get(daemon, "STUDENT_WS", inside) == (0, len(instances_of(daemon, {inside})))
    assert move(daemon, "STUDENT_WS", outside, "DEST") == 0
    assert destination.received() == set()
    assert move(daemon, "STUDENT_WS", inside, "DEST") == 0
    assert destination.received() == instances_of(daemon, {inside})
    # One of the other patient's studies joins the course: that patient shows with one study.
    joining = sorted(daemon.outside)[1]
    assert daemon.admin.request("PUT", f"/studies/{joining}/labels/{COURSE}").status == 200
    other_patient = next(d.PatientID for d in daemon.datasets if d.StudyInstanceUID == joining)
    assert patient_level_find(daemon, "STUDENT_WS")[other_patient] == "1"
    assert patient_level_find(daemon, "UNMAPPED")[other_patient] == "2"


def patient_level_find(daemon, calling) -> dict[str, str]:
    """Patient Root C-FIND at the PATIENT level as calling: PatientID -> NumberOfPatientRelatedStudies."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title="DICOOGLED")
    assert assoc.is_established
    try:
        return {str(ds.PatientID): str(ds.NumberOfPatientRelatedStudies) for status, ds in assoc.send_c_find(
            make_identifier("PATIENT", PatientID="", NumberOfPatientRelatedStudies=""),
            PatientRootQueryRetrieveInformationModelFind) if status.Status == 0xFF00}
    finally:
        assoc.release()


def worklist_find_status(daemon, calling) -> int:
    """The final status of a Modality Worklist C-FIND (every scheduled step) from calling."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title="DICOOGLED")
    assert assoc.is_established
    try:
        identifier = pydicom.Dataset()
        identifier.PatientName, identifier.ScheduledProcedureStepSequence = "", [pydicom.Dataset()]
        return [status.Status for status, _ in assoc.send_c_find(identifier, ModalityWorklistInformationFind)][-1]
    finally:
        assoc.release()


def test_the_worklist_is_refused_to_a_calling_ae_limited_to_collections(course):
    """Scheduled patients belong to no collection: a mapped AE's worklist C-FIND is refused
    (Unable to process), as GET /worklist refuses a user limited to collections; others query it."""
    assert worklist_find_status(course, "UNMAPPED") == 0x0000
    assert worklist_find_status(course, "STUDENT_WS") == 0xC001
    assert "worklist C-FIND from STUDENT_WS refused" in course.log


@pytest.fixture(scope="module")
def course_once(tmp_path_factory):
    """One daemon for the property test's examples."""
    root = tmp_path_factory.mktemp("collections")
    daemon = RunningDaemon(root / "data", env=ADMIN_ENV).start()
    daemon.paths = studygen.generate(root / "gen", patients=2, studies=2, series=2, instances=1, modality="mixed")
    assert set(daemon.store(*daemon.paths)) == {0}
    daemon.datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in daemon.paths]
    daemon.admin = admin_client(daemon)
    assert daemon.admin.post("/user", {"username": "student", "password": PASSWORD}).status == 200
    daemon.student = logged_in(daemon, "student")
    yield daemon
    daemon.stop()


COLLECTIONS = ("course-a", "course-b", "other")
QUERIES = ("*:*", "Modality:MR", "Modality:CT", "label:course*", "label:other", "NOT Modality:MR", "PatientID:*",
           "*:* NOT label:course-a", "label:*")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_a_restricted_search_never_answers_outside_its_collections(course_once, data):
    """Random labels on studies and series, random collections granted, a random query and page:
    every instance answered is in a study carrying a granted label (on itself or a series), and
    numResults is exactly how many of the administrator's answers are."""
    daemon = course_once
    admin = daemon.admin
    for entry in admin.get("/labels").json()["labels"]:
        for d in daemon.datasets:
            admin.request("DELETE", f"/studies/{d.StudyInstanceUID}/labels/{entry['label']}")
            admin.request("DELETE", f"/series/{d.SeriesInstanceUID}/labels/{entry['label']}")
    for label in COLLECTIONS:
        admin.request("DELETE", f"/labels/{label}/access/student")
    studies = sorted({d.StudyInstanceUID for d in daemon.datasets})
    series = sorted({d.SeriesInstanceUID for d in daemon.datasets})
    on_study = data.draw(st.dictionaries(st.sampled_from(studies), st.sets(st.sampled_from(COLLECTIONS), max_size=2), max_size=3))
    on_series = data.draw(st.dictionaries(st.sampled_from(series), st.sets(st.sampled_from(COLLECTIONS), max_size=2), max_size=3))
    for prefix, labelled in (("studies", on_study), ("series", on_series)):
        for uid, labels in labelled.items():
            for label in labels:
                assert admin.request("PUT", f"/{prefix}/{uid}/labels/{label}").status == 200
    granted = data.draw(st.sets(st.sampled_from(COLLECTIONS), min_size=1))
    for label in granted:
        assert admin.request("PUT", f"/labels/{label}/access/student").status == 200
    in_collection = {s for s in studies if on_study.get(s, set()) & granted} | \
        {d.StudyInstanceUID for d in daemon.datasets if on_series.get(d.SeriesInstanceUID, set()) & granted}
    visible = instances_of(daemon, in_collection)
    query = data.draw(st.sampled_from(QUERIES))
    psize, offset = data.draw(st.integers(1, 10)), data.draw(st.integers(0, 8))
    found, total = searched(daemon.student, query, psize=psize, offset=offset)
    assert found <= visible
    everything, _ = searched(admin, query)
    assert total == len(everything & visible)
    assert len(found) == max(0, min(psize, total - offset))


# ---- share links -----------------------------------------------------------------------------------


def share(client: Client, **params):
    return client.request("POST", "/share", data=params)


def opened(url: str) -> requests.Session:
    """A browser-like visitor without an account that opened a share link."""
    visitor = requests.Session()
    response = visitor.get(url, allow_redirects=False)
    assert response.status_code == 303, response.text
    assert response.headers["Location"].endswith("/#/search?q=%2A%3A%2A")
    return visitor


def test_share_links_show_exactly_their_studies_until_used_up_or_revoked(course):
    daemon = course
    base = base_url(daemon)
    inside, outside = sorted(daemon.inside)[0], sorted(daemon.outside)[0]
    student, teacher, other = (logged_in(daemon, name) for name in ("student", "teacher", "other"))
    # Who may share: an administrator anything, a collection writer what is in its collections.
    assert share(student, label=COURSE, uses="1").status == 403
    assert share(other, study=inside, uses="1").status == 403
    assert share(teacher, study=outside, uses="1").status == 403
    assert share(teacher, label=COURSE).status == 400  # no end: neither expires nor uses
    assert share(teacher, label=COURSE, expires="2001-01-01").status == 400
    assert share(daemon.admin, study="1.2.3.999", uses="1").status == 404
    made = share(daemon.admin, study=outside, uses="2")
    assert made.status == 201, made
    link = made.json()
    assert link["url"] == f"{base}/shared/{link['token']}" and link["usesAllowed"] == 2

    visitor = opened(link["url"])
    visible = instances_of(daemon, {outside})
    shown = visitor.get(f"{base}/search", params={"query": "*:*", "field": "SOPInstanceUID"}).json()
    assert {r["fields"]["SOPInstanceUID"] for r in shown["results"]} == visible and shown["numResults"] == len(visible)
    assert visitor.get(f"{base}/shared").json() == {"shared": True, "id": link["id"], "label": "", "studies": [outside], "expires": None}
    assert requests.get(f"{base}/shared").json() == {"shared": False}
    outside_one, inside_one = one_instance(daemon, {outside}), one_instance(daemon, {inside})
    assert visitor.get(f"{base}/dump", params={"uid": outside_one.SOPInstanceUID}).status_code == 200
    assert visitor.get(f"{base}/dump", params={"uid": inside_one.SOPInstanceUID}).status_code == 404
    assert visitor.get(f"{base}/legacy/file", params={"uid": inside_one.SOPInstanceUID}).status_code == 404
    qido = visitor.get(f"{base}/dicom-web/studies").json()
    assert [s["0020000D"]["Value"][0] for s in qido] == [outside]
    assert visitor.get(f"{base}/dicom-web/studies/{inside}/metadata").status_code == 404
    assert visitor.get(f"{base}/dicom-web/studies/{outside}/metadata").status_code == 200
    assert visitor.get(f"{base}/studies/{outside}/archive").status_code == 200
    assert visitor.get(f"{base}/studies/{inside}/archive").status_code == 404
    # Read-only: no label, no worklist, no account routes.
    assert visitor.put(f"{base}/studies/{outside}/labels/x", headers={"Sec-Fetch-Site": "same-origin"}).status_code == 401
    assert visitor.get(f"{base}/worklist").status_code == 403
    assert visitor.get(f"{base}/user").status_code == 401
    assert visitor.get(f"{base}/share").status_code == 401

    # Two uses allowed: a second visitor opens it, a third is refused; sessions go on.
    opened(link["url"])
    assert requests.get(link["url"], allow_redirects=False).status_code == 410
    assert visitor.get(f"{base}/dump", params={"uid": outside_one.SOPInstanceUID}).status_code == 200
    assert requests.get(f"{base}/shared/not-a-token", allow_redirects=False).status_code == 404

    # A collection writer shares its collection; lists its own links; an administrator lists all.
    collection = share(teacher, label=COURSE, expires="2999-01-01T00:00:00Z").json()
    course_visitor = opened(collection["url"])
    assert {s["0020000D"]["Value"][0] for s in course_visitor.get(f"{base}/dicom-web/studies").json()} == daemon.inside
    assert [s["id"] for s in teacher.get("/share").json()["shares"]] == [collection["id"]]
    states = {s["id"]: s["state"] for s in daemon.admin.get("/share").json()["shares"]}
    assert states == {link["id"]: "used", collection["id"]: "active"}
    # Revoking: only its maker or an administrator; those who opened it see nothing more.
    assert student.delete(f"/share/{collection['id']}").status == 404
    assert teacher.delete(f"/share/{collection['id']}").json() == {"id": collection["id"], "revoked": True}
    assert course_visitor.get(f"{base}/dicom-web/studies").status_code == 401
    assert requests.get(collection["url"], allow_redirects=False).status_code == 410
    assert {s["id"]: s["state"] for s in daemon.admin.get("/share").json()["shares"]}[collection["id"]] == "revoked"
    # Only hashes of the tokens are kept.
    stored = b"".join(path.read_bytes() for path in daemon.data_dir.glob("users.sqlite*"))
    assert link["token"].encode() not in stored and collection["token"].encode() not in stored


def test_a_deidentified_share_link_shows_copies_and_nothing_of_the_originals(course):
    """deidentify=true: a collection writer shares de-identified copies of a study (a research
    export makes them); the visitor's searches and QIDO answer the copies only, with pseudonyms
    and new UIDs, and nothing of any original; the pseudonym map re-identifies them."""
    daemon = course
    base = base_url(daemon)
    study = sorted(daemon.inside)[0]
    originals = [d for d in daemon.datasets if d.StudyInstanceUID == study]
    teacher = logged_in(daemon, "teacher")
    assert share(teacher, study=study, uses="1", deidentify="true", retain_uids="true").status == 400
    made = share(teacher, study=study, uses="1", deidentify="true")
    assert made.status == 201, made
    link = made.json()
    assert link["deidentified"] is True and link["label"].startswith("shared-")
    wait_until(lambda: daemon.admin.get("/research/uids", original=study).json()["uids"] and
               daemon.admin.get("/search", query=f"label:{link['label']}", field="SOPInstanceUID").json()["numResults"]
               == len(originals), timeout=60, message="the de-identified copies")
    visitor = opened(link["url"])
    shown = visitor.get(f"{base}/search", params={"query": "*:*", "field": ["SOPInstanceUID", "PatientName", "PatientID",
                                                                          "StudyInstanceUID"]}).json()["results"]
    assert len(shown) == len(originals)
    identifying = {str(originals[0].PatientName), originals[0].PatientID, study} | {d.SOPInstanceUID for d in originals}
    assert not identifying & {str(value) for result in shown for value in result["fields"].values()}
    [copy_study] = {s["0020000D"]["Value"][0] for s in visitor.get(f"{base}/dicom-web/studies").json()}
    assert copy_study != study
    [pair] = daemon.admin.get("/research/uids", uid=copy_study).json()["uids"]
    assert pair["original"] == study
    assert visitor.get(f"{base}/studies/{study}/archive").status_code == 404


def test_an_expired_share_link_shows_nothing(course):
    daemon = course
    base = base_url(daemon)
    study = sorted(daemon.inside)[0]
    expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=3)
    link = share(daemon.admin, study=study, expires=expires.isoformat()).json()
    visitor = opened(link["url"])
    assert visitor.get(f"{base}/dicom-web/studies").status_code == 200
    wait_until(lambda: visitor.get(f"{base}/dicom-web/studies").status_code == 401, timeout=30, message="the link to expire")
    assert visitor.get(f"{base}/search", params={"query": "*:*"}).status_code == 401
    assert requests.get(link["url"], allow_redirects=False).status_code == 410
    assert daemon.admin.get("/share").json()["shares"][0]["state"] == "expired"


# ---- the web app, in chromium ----------------------------------------------------------------------


def patients_of(daemon, studies) -> int:
    return len({d.PatientID for d in daemon.datasets if d.StudyInstanceUID in studies})


def test_web_app_shows_a_reader_its_collection_and_a_link_visitor_its_study(course):
    """In chromium: a student logged in sees the course's patients only; a share link's visitor,
    without an account, sees the shared study's patient, no label or share buttons, and only
    Search in the menu; after revocation the visitor is sent to the login."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    import shutil
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not pathlib.Path(chromium).exists():
        pytest.skip("needs Debian's chromium")
    from test_webapp import BROWSER_ARGS
    expect = playwright_api.expect
    daemon = course
    outside = sorted(daemon.outside)[0]
    link = share(daemon.admin, study=outside, uses="1").json()
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        try:
            errors = []
            student = browser.new_context().new_page()
            student.set_default_timeout(20_000)
            student.on("pageerror", lambda error: errors.append(str(error)))
            student.goto(f"{base_url(daemon)}/#/search?q=%2A%3A%2A")
            student.get_by_label("Username").fill("student")
            student.get_by_label("Password").fill(PASSWORD)
            student.get_by_role("button", name="Log in").click()
            expect(student.locator("table.results tbody tr")).to_have_count(patients_of(daemon, daemon.inside))

            visitor = browser.new_context().new_page()
            visitor.set_default_timeout(20_000)
            visitor.on("pageerror", lambda error: errors.append(str(error)))
            visitor.goto(link["url"])
            expect(visitor.locator("table.results tbody tr")).to_have_count(patients_of(daemon, {outside}))
            expect(visitor.locator("#user-name")).to_have_text("Shared link")
            sidebar = visitor.get_by_role("navigation", name="Main")
            expect(sidebar.get_by_role("link", name="Search")).to_be_visible()
            expect(sidebar.get_by_role("link", name="Worklist")).to_have_count(0)
            visitor.locator("table.results tbody tr").first.locator("a").first.click()  # the patient's studies
            expect(visitor.locator("table.results tbody tr")).to_have_count(1)
            expect(visitor.get_by_role("button", name="Share…")).to_have_count(0)
            expect(visitor.get_by_role("button", name="Label…")).to_have_count(0)
            assert daemon.admin.delete(f"/share/{link['id']}").json()["revoked"] is True
            visitor.reload()
            expect(visitor.get_by_role("button", name="Log in")).to_be_visible()

            # An administrator shares the student's collection, de-identified, from the Share… dialog.
            admin = browser.new_context().new_page()
            admin.set_default_timeout(20_000)
            admin.on("pageerror", lambda error: errors.append(str(error)))
            patient = next(d.PatientID for d in daemon.datasets if d.StudyInstanceUID in daemon.inside)
            admin.goto(f"{base_url(daemon)}/#/search?q=*:*&patient={patient}")
            admin.get_by_label("Username").fill("admin")
            admin.get_by_label("Password").fill(ADMIN_PASSWORD)
            admin.get_by_role("button", name="Log in").click()
            expect(admin.locator("table.results tbody tr")).to_have_count(2)
            admin.get_by_role("checkbox", name="Select every study on this page").check()
            admin.get_by_role("button", name="Share…").click()
            dialog = admin.get_by_role("dialog")
            dialog.get_by_label("De-identified copies").check()
            dialog.get_by_role("button", name="Make the link").click()
            expect(dialog.get_by_label("Share link")).to_have_value(re.compile(r"/shared/"))
            expect(dialog).to_contain_text("de-identified copies of these studies")
            [made] = [s for s in daemon.admin.get("/share").json()["shares"] if s["label"].startswith("shared-")]
            assert made["studies"] == []
            assert not errors, errors
        finally:
            browser.close()


def test_web_app_users_screen_manages_groups_and_collection_access(course):
    """In chromium, an administrator sets a user's groups, gives a group read on a collection,
    revokes a user's access, and sees the collection's members listed."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    import shutil
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not pathlib.Path(chromium).exists():
        pytest.skip("needs Debian's chromium")
    from test_webapp import BROWSER_ARGS
    expect = playwright_api.expect
    daemon = course
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        try:
            errors = []
            page = browser.new_context().new_page()
            page.set_default_timeout(20_000)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{base_url(daemon)}/#/management?tab=users")
            page.get_by_label("Username").fill("admin")
            page.get_by_label("Password").fill(ADMIN_PASSWORD)
            page.get_by_role("button", name="Log in").click()
            panel = page.get_by_role("tabpanel")
            panel.get_by_role("button", name="Groups of other").click()
            dialog = page.get_by_role("dialog", name="Groups of other")
            dialog.get_by_label("Groups, separated by commas").fill("residents")
            dialog.get_by_role("button", name="Save groups").click()
            expect(page.locator(".notice", has_text="The groups of other are changed.")).to_be_visible()
            expect(panel.get_by_role("row", name="other user residents")).to_be_visible()  # the screen is redrawn
            panel.get_by_label("Collection (label)").fill(COURSE)
            panel.get_by_label("Member is a").select_option("group")
            panel.get_by_label("User or group").fill("residents")
            panel.get_by_role("button", name="Give access").click()
            expect(panel.get_by_role("row", name=f"{COURSE} group residents read")).to_be_visible()
            panel.get_by_role("button", name=f"Revoke student's access to {COURSE}").click()
            expect(panel.get_by_role("button", name=f"Revoke student's access to {COURSE}")).to_have_count(0)
            assert not errors, errors
        finally:
            browser.close()
    assert daemon.admin.get("/user").json()["users"][-1] == {"username": "teacher", "admin": False, "roles": ["teachers"]}
    members = daemon.admin.get(f"/labels/{COURSE}/access").json()["members"]
    assert members == [{"group": "residents", "access": "read"}, {"group": "teachers", "access": "write"}]
    # other, now a resident, sees the course only.
    assert searched(logged_in(daemon, "other"))[1] == len(instances_of(daemon, daemon.inside))
