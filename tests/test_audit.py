"""The audit log: every access to patient data and every change, recorded with who, what, how,
when and the result; read by administrators (GET /audit, GET /audit.csv); kept in its own
owner-only database, through restarts, for [audit] retention_days.

Each kind of access is made with a real client (urllib, dicomweb's routes, pynetdicom, DCMTK's
movescu and getscu) against a real daemon, then its entry is looked for.
"""

import csv
import datetime
import io
import json
import os
import pathlib
import shutil
import sqlite3
import stat
import time

import pydicom
import pytest
import requests

import studygen
from conftest import NODELAY, RunningDaemon, StoreSCP, wait_until
from pynetdicom import AE
from restclient import ADMIN_ENV, ADMIN_PASSWORD, Client, admin_client, base_url, stow

DEST = "DEST"
SHAPE = dict(patients=2, studies=2, series=1, instances=2)  # 8 instances in 4 studies


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """One daemon for the module, holding SHAPE's studies, with DEST (a DCMTK storescp) as a
    C-MOVE destination; daemon.client is an admin's."""
    root = tmp_path_factory.mktemp("audit")
    destination = StoreSCP(root / "received", DEST)
    daemon = RunningDaemon(root / "data", f"[modalities]\n{DEST} = 127.0.0.1:{destination.port}\n", env=ADMIN_ENV)
    daemon.start()
    daemon.paths = studygen.generate(root / "gen", **SHAPE)
    assert set(daemon.store(*daemon.paths)) == {0}
    daemon.datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in daemon.paths]
    daemon.client = admin_client(daemon)
    yield daemon
    daemon.stop()
    destination.stop()


def last_id(client) -> int:
    results = client.get("/audit", psize=1).json()["results"]
    return results[0]["id"] if results else 0


def entries_since(client, since_id: int, **filters) -> list[dict]:
    """The entries after since_id (matching filters), oldest first. GET /audit waits for what
    was recorded before it, so no polling is needed."""
    response = client.get("/audit", psize=10000, **filters)
    assert response.status == 200, response
    return [entry for entry in reversed(response.json()["results"]) if entry["id"] > since_id]


def only_entry(client, since_id: int, action: str) -> dict:
    found = entries_since(client, since_id, action=action)
    assert len(found) == 1, found
    return found[0]


# ---- REST ---------------------------------------------------------------------------------------


def test_rest_search_dump_file_image_and_export_are_recorded(archive):
    client, first = archive.client, archive.datasets[0]
    before = last_id(client)
    response = client.get("/search", query=f"StudyInstanceUID:{first.StudyInstanceUID}", field="SOPInstanceUID")
    assert response.status == 200 and response.json()["numResults"] == 2
    search = only_entry(client, before, "search")
    assert search["studies"] == [first.StudyInstanceUID] and search["count"] == 2
    assert (search["user"], search["result"], search["status"]) == ("admin", "ok", "200")
    assert search["address"] == "127.0.0.1" and search["request"] == "GET /search"

    before = last_id(client)
    assert client.get("/dump", uid=first.SOPInstanceUID).status == 200
    view = only_entry(client, before, "view")
    assert view["instances"] == [first.SOPInstanceUID] and view["request"] == "GET /dump"

    before = last_id(client)
    assert client.get("/legacy/file", uid=first.SOPInstanceUID).status == 200
    assert client.get("/dic2png", SOPInstanceUID=first.SOPInstanceUID).status == 200
    downloads = entries_since(client, before, action="download")
    assert [(d["request"], d["instances"]) for d in downloads] == [
        ("GET /legacy/file", [first.SOPInstanceUID]), ("GET /dic2png", [first.SOPInstanceUID])]

    before = last_id(client)
    assert client.get("/export", query="*:*", fields='["SOPInstanceUID"]').status == 200
    export = only_entry(client, before, "export")
    assert export["count"] == len(archive.datasets)

    # A request that fails is recorded as failed, with its status.
    before = last_id(client)
    assert client.get("/dump", uid="1.2.3.4.404").status == 404
    missing = only_entry(client, before, "view")
    assert (missing["result"], missing["status"], missing["instances"]) == ("failed", "404", ["1.2.3.4.404"])


def test_zip_downloads_and_imports_are_recorded(archive):
    client = archive.client
    study = archive.datasets[2].StudyInstanceUID
    sops = {d.SOPInstanceUID for d in archive.datasets if d.StudyInstanceUID == study}
    before = last_id(client)
    response = client.get(f"/studies/{study}/archive")
    assert response.status == 200 and response.headers["Content-Type"] == "application/zip"
    entry = only_entry(client, before, "download")
    assert (entry["request"], entry["studies"], entry["count"], entry["detail"]) == (
        f"GET /studies/{study}/archive", [study], len(sops), "ZIP")
    assert set(entry["instances"]) == sops

    before = last_id(client)
    started = client.request("POST", "/import", data=response.body, headers={"Content-Type": "application/zip"})
    assert started.status == 202, started
    entry = only_entry(client, before, "import")
    assert entry["detail"] == f"import task {started.json()['taskUid']}, an upload" and entry["user"] == "admin"


def test_dicomweb_qido_wado_and_stow_are_recorded(archive):
    client, first = archive.client, archive.datasets[0]
    before = last_id(client)
    qido = client.request("GET", "/dicom-web/studies", {"StudyInstanceUID": first.StudyInstanceUID},
                          headers={"Accept": "application/dicom+json"})
    assert qido.status == 200 and len(qido.json()) == 1
    entry = only_entry(client, before, "qido")
    assert entry["studies"] == [first.StudyInstanceUID] and entry["count"] == 1 and entry["detail"] == "STUDY"
    assert entry["request"] == "GET /dicom-web/studies"

    before = last_id(client)
    metadata = client.request("GET", f"/dicom-web/studies/{first.StudyInstanceUID}/metadata")
    assert metadata.status == 200
    wado_uri = client.get("/dicom-web/wado", requestType="WADO", studyUID=first.StudyInstanceUID,
                          seriesUID=first.SeriesInstanceUID, objectUID=first.SOPInstanceUID, contentType="application/dicom")
    assert wado_uri.status == 200
    metadata_entry, file_entry = entries_since(client, before, action="wado")
    assert metadata_entry["studies"] == [first.StudyInstanceUID] and metadata_entry["count"] == 2
    assert file_entry["instances"] == [first.SOPInstanceUID] and file_entry["request"] == "GET /dicom-web/wado"

    new = studygen.make_instance(7, 0, 0, 0)
    before = last_id(client)
    assert stow(archive, client.token, new).status == 200
    entry = only_entry(client, before, "stow")
    assert entry["instances"] == [new.SOPInstanceUID] and entry["count"] == 1 and entry["user"] == "admin"
    assert entry["studies"] == [new.StudyInstanceUID]


# ---- DICOM --------------------------------------------------------------------------------------


def test_c_find_c_store_c_move_and_c_get_are_recorded(archive, tmp_path):
    client, first = archive.client, archive.datasets[0]
    before = last_id(client)
    results, status = archive.find({"PatientName": "*", "StudyInstanceUID": ""})
    assert status == 0 and len(results) >= 4
    entry = only_entry(client, before, "c-find")
    assert (entry["calling_aet"], entry["address"], entry["detail"]) == ("TESTSCU", "127.0.0.1", "STUDY")
    assert entry["count"] == len(results) and entry["result"] == "ok" and entry["status"] == "0x0000"
    assert entry["user"] == ""

    new = studygen.make_instance(8, 0, 0, 0)
    before = last_id(client)
    assert archive.store(new) == [0]
    entry = only_entry(client, before, "c-store")
    assert entry["instances"] == [new.SOPInstanceUID] and entry["calling_aet"] == "TESTSCU"
    assert entry["studies"] == [new.StudyInstanceUID] and entry["status"] == "0x0000"

    before = last_id(client)
    archive.dcmtk("movescu", "-S", "-aem", DEST, "-k", "QueryRetrieveLevel=STUDY",
                  "-k", f"StudyInstanceUID={first.StudyInstanceUID}")
    entry = only_entry(client, before, "c-move")
    study_sops = {d.SOPInstanceUID for d in archive.datasets if d.StudyInstanceUID == first.StudyInstanceUID}
    assert set(entry["instances"]) == study_sops and entry["count"] == 2
    assert entry["calling_aet"] == "DCMTK" and entry["detail"] == f"to {DEST}, 2 sent"

    before = last_id(client)
    archive.dcmtk("getscu", "-S", "-od", str(tmp_path), "-k", "QueryRetrieveLevel=STUDY",
                  "-k", f"StudyInstanceUID={first.StudyInstanceUID}")
    entry = only_entry(client, before, "c-get")
    assert set(entry["instances"]) == study_sops and entry["detail"] == "2 sent" and entry["status"] == "0x0000"

    # A C-MOVE to an AE nobody knows is refused by the archive and recorded as failed.
    before = last_id(client)
    archive.dcmtk("movescu", "-S", "-aem", "NOWHERE", "-k", "QueryRetrieveLevel=STUDY",
                  "-k", f"StudyInstanceUID={first.StudyInstanceUID}", check=False)
    entry = only_entry(client, before, "c-move")
    assert (entry["result"], entry["status"]) == ("failed", "0xA801")


def test_a_c_store_an_ae_may_not_make_is_recorded_as_refused(start_daemon):
    daemon = start_daemon(config_text="[dicom]\ncalling_ae_access = VIEWER=user:admin\n"
                                      "[modalities]\nVIEWER = 127.0.0.1:11999 allow=find\n", env=ADMIN_ENV)
    dataset = studygen.make_instance(0, 0, 0, 0)
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title="DICOOGLED", evt_handlers=NODELAY)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(dataset).Status == 0x0124  # Refused: Not Authorized
    finally:
        assoc.release()
    entry, = admin_client(daemon).get("/audit", action="c-store").json()["results"]
    assert (entry["calling_aet"], entry["result"], entry["status"]) == ("VIEWER", "refused", "0x0124")
    assert entry["user"] == "admin"  # the user [dicom] calling_ae_access maps the AE to
    assert entry["instances"] == [dataset.SOPInstanceUID]


def test_c_stores_served_by_worker_processes_are_recorded(start_daemon):
    daemon = start_daemon(config_text="[dicom]\nworkers = 1\n", env=ADMIN_ENV)
    datasets = [studygen.make_instance(0, 0, 0, number) for number in range(3)]
    assert daemon.store(*datasets) == [0, 0, 0]
    entries = admin_client(daemon).get("/audit", action="c-store").json()["results"]
    assert sorted(e["instances"][0] for e in entries) == sorted(d.SOPInstanceUID for d in datasets)
    assert {(e["calling_aet"], e["result"], e["status"], e["studies"][0]) for e in entries} == {
        ("TESTSCU", "ok", "0x0000", datasets[0].StudyInstanceUID)}


# ---- changes ------------------------------------------------------------------------------------


def test_label_protect_delete_and_settings_are_recorded(archive):
    client = archive.client
    study = archive.datasets[-1].StudyInstanceUID
    before = last_id(client)
    assert client.request("PUT", f"/studies/{study}/labels/course-a").status == 200
    assert client.request("DELETE", f"/studies/{study}/labels/course-a").status == 200
    label, = entries_since(client, before, action="label")
    unlabel, = entries_since(client, before, action="unlabel")
    assert label["studies"] == unlabel["studies"] == [study] and label["detail"] == "course-a"

    before = last_id(client)
    assert client.request("PUT", f"/studies/{study}/protected").status == 200
    assert only_entry(client, before, "protect")["studies"] == [study]

    before = last_id(client)
    assert client.post("/management/settings/dicom/query", maxAssociations="20").status == 200
    entry = only_entry(client, before, "settings")
    assert entry["request"] == "POST /management/settings/dicom/query" and entry["detail"] == "maxAssociations"

    victim = archive.datasets[-1]
    before = last_id(client)
    assert client.post("/management/tasks/remove", SOPInstanceUID=victim.SOPInstanceUID).json()["removed"] == 1
    entry = only_entry(client, before, "delete")
    assert entry["instances"] == [victim.SOPInstanceUID] and entry["count"] == 1


def test_research_export_and_reidentification_are_recorded(archive):
    client = archive.client
    study = archive.datasets[0].StudyInstanceUID
    assert client.request("PUT", f"/studies/{study}/labels/cohort-a").status == 200
    before = last_id(client)
    assert client.post("/research/export", label="cohort-a", into="cohort-a-deid").status == 202
    assert client.post("/research/export", label="no-such-label", into="x").status == 404
    done, missing = entries_since(client, before, action="export")
    assert done["studies"] == [study] and done["detail"] == "research export of label cohort-a into cohort-a-deid"
    assert (missing["result"], missing["status"]) == ("failed", "404")

    before = last_id(client)
    assert client.get("/research/pseudonyms", format="csv").status == 200
    assert client.get("/research/uids", uid="1.2.3").status == 200
    pseudonyms, uids = entries_since(client, before, action="reidentify")
    assert (pseudonyms["detail"], pseudonyms["request"]) == ("the pseudonym map", "GET /research/pseudonyms")
    assert uids["detail"] == "the original of 1.2.3"


def test_share_links_and_what_their_visitors_read_are_recorded(archive):
    client, base = archive.client, base_url(archive)
    study = archive.datasets[3].StudyInstanceUID
    before = last_id(client)
    made = client.post("/share", study=study, uses="1")
    assert made.status == 201, made
    link = made.json()
    visitor = requests.Session()
    assert visitor.get(link["url"], allow_redirects=False).status_code == 303
    assert visitor.get(f"{base}/search", params={"query": "*:*"}).status_code == 200
    assert requests.get(link["url"], allow_redirects=False).status_code == 410  # used up
    created, opened, used_up = entries_since(client, before, action="share")
    assert (created["user"], created["share_link"], created["studies"]) == ("admin", link["id"], [study])
    assert (opened["user"], opened["share_link"], opened["detail"], opened["result"]) == ("", link["id"], "opened", "ok")
    assert opened["request"] == "GET /shared/<token>"
    assert (used_up["share_link"], used_up["result"], used_up["status"]) == (link["id"], "failed", "410")
    assert link["token"] not in json.dumps(client.get("/audit", psize=10000).json())  # the id, never the token
    search = only_entry(client, before, "search")
    assert (search["user"], search["share_link"], search["studies"]) == ("", link["id"], [study])

    before = last_id(client)
    assert client.request("PUT", "/labels/course-b/access/admin", params={"access": "read"}).status == 200
    granted = only_entry(client, before, "access")
    assert granted["detail"] == "grant read on course-b to user admin"
    assert client.request("DELETE", "/labels/course-b/access/admin").status == 200


def test_logins_logouts_and_user_changes_are_recorded(archive):
    admin, base = archive.client, base_url(archive)
    before = last_id(admin)
    assert admin.post("/user", username="student", password="student-pass-1").json()["success"]
    assert admin.post("/user/student/password", password="student-pass-2").status == 200
    assert admin.post("/user/student", roles="course").status == 200
    student = Client(base)
    assert student.request("POST", "/login", data={"username": "student", "password": "wrong"}, auth=None).status == 401
    student.login("student", "student-pass-2")
    assert student.post("/logout").status == 200
    assert admin.delete("/user/student").json()["success"]

    users = entries_since(admin, before, action="user")
    assert [u["detail"] for u in users] == ["create student admin=false", "password of student",
                                             "rights of student: admin= roles=course", "delete student"]
    assert {u["user"] for u in users} == {"admin"}
    failed, succeeded = entries_since(admin, before, action="login")
    assert (failed["user"], failed["result"], failed["status"]) == ("student", "refused", "401")
    assert (succeeded["user"], succeeded["result"]) == ("student", "ok")
    assert only_entry(admin, before, "logout")["user"] == "student"


def test_only_administrators_read_the_log(archive):
    admin, base = archive.client, base_url(archive)
    admin.post("/user", username="reader", password="reader-pass-1")
    reader = Client(base)
    reader.login("reader", "reader-pass-1")
    before = last_id(admin)
    for path in ("/audit", "/audit.csv"):
        assert reader.get(path).status == 403
        assert Client(base).get(path).status == 401
    # What a user was refused elsewhere is recorded, as refused.
    assert reader.post("/user", username="x", password="y").status == 403
    entry = only_entry(admin, before, "user")
    assert (entry["user"], entry["result"], entry["status"]) == ("reader", "refused", "403")


# ---- reading the log ----------------------------------------------------------------------------


def test_filters_and_paging(archive):
    admin, base = archive.client, base_url(archive)
    admin.post("/user", username="pager", password="pager-pass-1")
    started = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    pager = Client(base)
    pager.login("pager", "pager-pass-1")
    for _ in range(5):
        assert pager.get("/search", query="*:*", psize="1").status == 200
    assert pager.get("/dump", uid=archive.datasets[1].SOPInstanceUID).status == 200

    page = admin.get("/audit", user="pager", action="search", psize=2, offset=0).json()
    assert page["numResults"] == 5 and len(page["results"]) == 2
    rest = admin.get("/audit", user="pager", action="search", psize=2, offset=4).json()["results"]
    assert len(rest) == 1 and rest[0]["id"] < page["results"][-1]["id"]  # newest first
    both = admin.get("/audit", user="pager", action="search,view").json()
    assert both["numResults"] == 6 and {e["action"] for e in both["results"]} == {"search", "view"}
    assert admin.get("/audit", user="pager", since=started.isoformat()).json()["numResults"] == 7  # and the login
    assert admin.get("/audit", user="pager", until=started.isoformat()).json()["numResults"] == 0
    assert admin.get("/audit", user="pager", since="2000-01-01", until="2000-01-02").json()["numResults"] == 0
    assert admin.get("/audit", user="nobody").json() == {"results": [], "numResults": 0,
                                                          "actions": admin.get("/audit").json()["actions"]}
    # Reading the log is recorded too, with the filters.
    before = last_id(admin)
    admin.get("/audit.csv", user="pager", action="view")
    read = [e for e in entries_since(admin, before, action="audit") if e["request"] == "GET /audit.csv"]
    assert [(e["user"], e["detail"]) for e in read] == [("admin", "user=pager action=view")]
    assert admin.get("/audit", action="peek").status == 400
    assert admin.get("/audit", since="yesterday").status == 400
    assert admin.get("/audit", psize="0").status == 400


def test_csv_export(archive):
    admin = archive.client
    # A tried username a spreadsheet would run as a formula comes out inert.
    Client(base_url(archive)).request("POST", "/login", data={"username": "=cmd|x", "password": "p"}, auth=None)
    response = admin.get("/audit.csv", action="login,search")
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in response.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    listed = admin.get("/audit", action="login,search", psize=10000).json()
    assert len(rows) == listed["numResults"] > 0
    assert [int(row["id"]) for row in rows] == [entry["id"] for entry in listed["results"]]
    first = listed["results"][0]
    assert rows[0]["action"] == first["action"] and rows[0]["time"] == first["time"]
    assert rows[0]["studies"] == " ".join(first["studies"])
    assert rows[0]["user"] == "'=cmd|x"
    assert all(row["action"] in ("login", "search") for row in rows)


def test_no_patient_name_or_id_is_kept(archive):
    """Searches by a patient's name leave its name and ID out of the audit log and of the log at INFO."""
    admin, first = archive.client, archive.datasets[0]
    name, patient_id = str(first.PatientName), str(first.PatientID)
    family = name.split("^")[0]
    assert admin.get("/search", query=f"PatientName:{family}*").json()["numResults"] > 0
    assert archive.find({"PatientName": f"{family}*", "PatientID": patient_id, "StudyInstanceUID": ""})[1] == 0
    admin.get("/audit")  # everything so far is written
    dump = admin.get("/audit.csv").text + json.dumps(admin.get("/audit", psize=10000).json())
    assert family not in dump and patient_id not in dump
    if archive.index_url:  # every column of every entry, as PostgreSQL writes the row out
        stored = "\n".join(row for (row,) in archive.state_sql("audit", "SELECT audit::text FROM audit"))
        assert family not in stored and patient_id not in stored
    else:  # the whole file, free pages and all
        with open(archive.data_dir / "audit.sqlite", "rb") as handle:
            assert family.encode() not in handle.read()
    assert family not in archive.log  # the daemon's own log, at INFO


# ---- the database: owner-only, append-only, through restarts, pruned --------------------------


def test_entries_survive_a_restart_in_an_owner_only_database(start_daemon):
    daemon = start_daemon(env=ADMIN_ENV)
    paths = studygen.generate(daemon.data_dir.parent / "gen", patients=1, studies=1, series=1, instances=6)
    assert daemon.store(*paths) == [0] * 6
    daemon.stop()  # at once: whatever was still queued is written at a clean stop
    assert daemon.state_sql("audit", "SELECT count(*) FROM audit WHERE action = 'c-store'") == [(6,)]
    if daemon.index_url:
        import psycopg
        assert daemon.state_sql("audit", "SELECT max(version) FROM schema_version") == [(1,)]
        with pytest.raises(psycopg.Error, match="append-only"):
            daemon.state_sql("audit", "UPDATE audit SET username = 'someone else'")
    else:
        database = daemon.data_dir / "audit.sqlite"
        assert stat.S_IMODE(database.stat().st_mode) == 0o600
        with sqlite3.connect(database) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert db.execute("PRAGMA user_version").fetchone()[0] == 1  # the audit schema's version
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute("UPDATE audit SET username = 'someone else'")
    daemon.start()
    client = admin_client(daemon)
    stored = client.get("/audit", action="c-store").json()
    assert stored["numResults"] == 6
    assert {e["instances"][0] for e in stored["results"]} == {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}


def test_committed_entries_survive_kill_9(start_daemon):
    daemon = start_daemon(env=ADMIN_ENV)
    client = admin_client(daemon)
    assert client.get("/search", query="*:*").status == 200
    assert client.get("/audit", action="search").json()["numResults"] == 1  # answered once written
    daemon.kill()
    daemon.start()
    assert admin_client(daemon).get("/audit", action="search").json()["numResults"] == 1


def test_retention_prunes_old_entries(start_daemon):
    daemon = start_daemon(config_text="[audit]\nretention_days = 30\n", env=ADMIN_ENV)
    daemon.stop()
    now = time.time()
    for days, marker in ((40, "old"), (10, "recent")):
        daemon.state_sql("audit", "INSERT INTO audit (time, action, result, status, username, calling_aet, share_link, address,"
                         " request, studies, series, instances, count, detail) VALUES"
                         " (?, 'search', 'ok', '200', ?, '', '', '127.0.0.1', 'GET /search', '[]', '[]', '[]', 1, '')",
                         (now - days * 86400, marker))
    daemon.start()
    client = admin_client(daemon)
    wait_until(lambda: client.get("/audit", user="old").json()["numResults"] == 0, message="the old entry to be pruned")
    assert client.get("/audit", user="recent").json()["numResults"] == 1
    assert "pruned 1 audit entries older than 30 days" in daemon.log


def test_studies_the_archive_deletes_by_itself_are_recorded(start_daemon):
    """when_full = recycle: the study pushed out is recorded as deleted, by no user."""
    daemon = start_daemon(config_text="[storage]\nmin_free_mb = 0\nmax_instances = 2\nwhen_full = recycle\n", env=ADMIN_ENV)
    old = [studygen.make_instance(0, 0, 0, number) for number in range(2)]
    new = studygen.make_instance(1, 0, 0, 0)
    assert daemon.store(*old) == [0, 0]
    assert daemon.store(new) == [0]
    entry, = admin_client(daemon).get("/audit", action="delete").json()["results"]
    assert entry["studies"] == [old[0].StudyInstanceUID] and entry["count"] == 2
    assert set(entry["instances"]) == {ds.SOPInstanceUID for ds in old}
    assert (entry["user"], entry["result"], entry["detail"]) == ("", "ok", "recycled: a quota is reached")


def test_a_file_in_a_watched_folder_is_recorded(start_daemon, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    daemon = start_daemon(args=["--watch", str(folder)], env=ADMIN_ENV)
    dataset = studygen.make_instance(3, 0, 0, 0)
    pydicom.dcmwrite(folder / "one.dcm", dataset, enforce_file_format=True)
    client = admin_client(daemon)
    entries = wait_until(lambda: client.get("/audit", action="watch").json()["results"], message="the watch entry")
    assert [(e["instances"], e["studies"], e["count"]) for e in entries] == [
        ([dataset.SOPInstanceUID], [dataset.StudyInstanceUID], 1)]
    assert "one.dcm" not in json.dumps(entries)  # no paths: folder names may name patients


def test_a_disabled_log_records_nothing(start_daemon):
    daemon = start_daemon(config_text="[audit]\nenabled = false\n", env=ADMIN_ENV)
    client = admin_client(daemon)
    assert client.get("/search", query="*:*").status == 200
    assert client.get("/audit").json()["numResults"] == 0


def test_audit_routes_are_described(archive):
    paths = Client(base_url(archive)).get("/openapi.json").json()["paths"]
    assert paths["/audit"]["get"]["x-access"] == "admin" and paths["/audit.csv"]["get"]["x-access"] == "admin"
    assert {p["name"] for p in paths["/audit"]["get"]["parameters"]} == {"user", "action", "since", "until", "offset", "psize"}


# ---- the web app --------------------------------------------------------------------------------


def test_web_app_audit_screen_for_administrators_only(archive):
    """In chromium: an administrator opens Audit, sees the entries, filters them by action and
    downloads them as CSV; a user without admin rights has no Audit screen."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.skip("needs Debian's chromium")
    admin = archive.client
    admin.post("/user", username="viewer", password="viewer-pass-1")
    assert admin.get("/search", query="*:*").status == 200
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context(accept_downloads=True)
            page = context.new_page()
            page.set_default_timeout(20_000)
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(base_url(archive) + "/")
            page.get_by_label("Username").fill("admin")
            page.get_by_label("Password").fill(ADMIN_PASSWORD)
            page.get_by_role("button", name="Log in").click()
            page.get_by_role("link", name="Audit").click()
            sync_api.expect(page.get_by_role("heading", name="Audit")).to_be_visible()
            table = page.locator("table.audit tbody")
            sync_api.expect(table.locator("tr").first).to_contain_text("login")  # this very login, newest first
            page.get_by_label("Action").select_option("search")
            page.get_by_role("button", name="Show").click()
            sync_api.expect(table.locator("tr").first).to_contain_text("GET /search")
            rows = table.locator("tr")
            assert all("search" in text for text in rows.all_inner_texts())
            with page.expect_download() as download_info:
                page.get_by_role("button", name="Download CSV").click()
            lines = pathlib.Path(download_info.value.path()).read_text(encoding="utf-8").splitlines()
            assert lines[0].startswith("id,time,action,result") and len(lines) > 1
            assert all(",search," in line for line in lines[1:])
            page.get_by_role("button", name="Log out").click()

            page.get_by_label("Username").fill("viewer")
            page.get_by_label("Password").fill("viewer-pass-1")
            page.get_by_role("button", name="Log in").click()
            sync_api.expect(page.get_by_role("link", name="Search")).to_be_visible()
            sync_api.expect(page.get_by_role("link", name="Audit")).to_have_count(0)
            page.goto(base_url(archive) + "/#/audit")
            sync_api.expect(page.get_by_text("This page needs an administrator.")).to_be_visible()
            assert not errors, errors
        finally:
            browser.close()
