"""dicoogled migrate --to URL: an SQLite archive, built by a real daemon, copied into a real
PostgreSQL server (tests/pgserver.py) with the daemon stopped; the daemon then started on the
PostgreSQL index with the same data dir answers every C-FIND, QIDO and search as before, its
users log in, their sessions hold, and labels, protection, the worklist, the audit log and the
settings are there. A migration that cannot be made changes nothing."""

import hashlib
import json
import subprocess
import sys

import apsw
import psycopg
import pydicom
import pytest
from pydicom.data import get_testdata_file

from conftest import ROOT, free_port, make_identifier
from restclient import ADMIN_ENV, Client, admin_client, base_url

sys.path.insert(0, str(ROOT))
import dicoogled  # noqa: E402

#: migrate copies an archive's SQLite files into PostgreSQL: each test builds that archive on
#: SQLite (the suite's PostgreSQL run has nothing to add to it).
pytestmark = pytest.mark.sqlite_only("migrates an archive's SQLite files into PostgreSQL")

#: C-FIND identifiers (level, model, keys) of every level: universal, wildcard, range, any tag.
FINDS = [
    ("PATIENT", "patient", {"PatientID": "", "PatientName": "", "NumberOfPatientRelatedInstances": ""}),
    ("PATIENT", "patient", {"PatientName": "DOE*", "PatientID": "", "PatientBirthDate": ""}),
    ("STUDY", "study", {"StudyInstanceUID": "", "StudyDate": "", "ModalitiesInStudy": "", "StudyDescription": ""}),
    ("STUDY", "study", {"StudyDate": "20160101-20201231", "StudyInstanceUID": "", "PatientName": ""}),
    ("STUDY", "study", {"ModalitiesInStudy": "MR", "StudyInstanceUID": "", "NumberOfStudyRelatedInstances": ""}),
    ("SERIES", "study", {"SeriesInstanceUID": "", "Modality": "CT", "SeriesNumber": "", "StudyInstanceUID": ""}),
    ("IMAGE", "study", {"SOPInstanceUID": "", "InstanceNumber": "", "SliceLocation": "-95", "StationName": "*"}),
    ("IMAGE", "study", {"SOPInstanceUID": "", "SOPClassUID": "", "Manufacturer": "DICOO*"}),
]
#: Searches of the query language: free text, prefixes, fields, ranges, pages, counts.
SEARCHES = [
    {"query": "*:*", "psize": "5", "offset": "3"},
    {"query": "ct"},
    {"query": "doe*"},
    {"query": "Modality:MR"},
    {"query": "PatientName:doe AND Modality:CT"},
    {"query": "StudyDate:[20160101 TO 20201231]"},
    {"query": "ProcedureCodeSequence"},
    {"query": "head OR chest OR abdomen", "psize": "3", "offset": "1"},
    {"query": "NOT Modality:CT"},
]
QIDO = ["/dicom-web/studies", "/dicom-web/studies?PatientName=doe*&includefield=all",
        "/dicom-web/series?Modality=MR", "/dicom-web/instances?limit=4&offset=2",
        "/dicom-web/studies?StudyDate=20150101-20191231"]


def answers(daemon, client: Client) -> dict:
    """What the tests compare between the two daemons, by name."""
    found = {}
    for number, (level, model, keys) in enumerate(FINDS):
        results, status = daemon.find(make_identifier(level, **keys), model=model)
        assert status == 0x0000
        found[f"c-find {number}"] = sorted(json.dumps(result.to_json_dict(), sort_keys=True) for result in results)
    for params in SEARCHES:
        body = client.get("/search", **params).json()
        found[f"search {params}"] = (body["numResults"], body["results"])
        dim = client.get("/searchDIM", **params).json()
        found[f"searchDIM {params}"] = dim["results"]
    for path in QIDO:
        response = client.request("GET", path.split("?")[0], raw_query=path.partition("?")[2])
        assert response.status == 200, (path, response)
        found[f"qido {path}"] = response.text.replace(base_url(daemon), "BASE")
    found["labels"] = client.get("/labels").json()
    found["worklist"] = client.get("/worklist").json()
    found["users"] = client.get("/user").json()
    found["index settings"] = client.get("/management/settings/index").json()
    return found


def file_digests(data_dir) -> dict:
    """SHA-256 of every file of the data dir but the lock a command takes (the SQLite files too)."""
    return {str(path.relative_to(data_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(data_dir.rglob("*")) if path.is_file() and path.name != "serve.lock"}


def migrate(data_dir, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "migrate", "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def sqlite_archive(start_daemon, studies):
    """A stopped SQLite archive, built by a real daemon: generated studies and pydicom's files
    stored over DICOM, two labels, a protected study, a worklist entry, a user with a session,
    a changed setting, and the audit entries all that made. .before holds answers() of it."""
    daemon = start_daemon(env=ADMIN_ENV)
    paths = studies(patients=3, studies=2, series=2, instances=2, modality="mixed")
    paths += [get_testdata_file(name) for name in ("CT_small.dcm", "MR_small.dcm")]
    assert set(daemon.store(*paths)) == {0}
    admin = admin_client(daemon)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert admin.request("PUT", f"/studies/{first.StudyInstanceUID}/labels/teaching").status == 200
    assert admin.request("PUT", f"/series/{first.SeriesInstanceUID}/labels/neuro").status == 200
    assert admin.request("PUT", f"/studies/{first.StudyInstanceUID}/protected").json()["protected"] is True
    entry = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "ROE^RICHARD"}]}, "00100020": {"vr": "LO", "Value": ["P9"]},
             "00080050": {"vr": "SH", "Value": ["ACC9"]},
             "00400100": {"vr": "SQ", "Value": [{"00400001": {"vr": "AE", "Value": ["CT01"]},
                                                  "00080060": {"vr": "CS", "Value": ["CT"]},
                                                  "00400002": {"vr": "DA", "Value": ["20261206"]}}]}}
    assert admin.request("POST", "/worklist", data=json.dumps(entry).encode(),
                         headers={"Content-Type": "application/json"}).status == 201
    assert admin.post("/user", {"username": "alice", "password": "alice-pw", "admin": "false"}).json() == {"success": True}
    alice = Client(base_url(daemon))
    alice.login("alice", "alice-pw")
    assert admin.post("/management/settings/index", {"thumbnailSize": "96"}).status == 200
    daemon.alice_token, daemon.protected = alice.token, first.StudyInstanceUID
    daemon.before = answers(daemon, admin)
    audit = admin.get("/audit", psize="10000").json()
    daemon.audit = {entry["id"]: entry for entry in audit["results"]}
    assert daemon.stop() == 0
    return daemon


def test_a_migrated_archive_answers_as_before_on_postgresql(sqlite_archive, start_daemon, postgres_url):
    data_dir = sqlite_archive.data_dir
    # A pseudonym map, as research exports leave one: a patient, a UID replaced under its secret.
    made = dicoogled.PseudonymMap(data_dir / "pseudonyms.sqlite")
    patient = made.patient(pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True))
    replaced = {"1.2.826.0.1.3680043.2.1125.1": made.replacement_uid("1.2.826.0.1.3680043.2.1125.1")}
    made.record_uids(replaced)
    made.close()
    before = file_digests(data_dir)
    done = migrate(data_dir, "--to", postgres_url)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["instances"] == 26 and summary["study_labels"] == summary["series_labels"] == 1
    assert summary["protected_studies"] == summary["worklist_entries"] == 1
    assert summary["users"] == 2 and summary["sessions"] >= 2 and summary["audit"] >= len(sqlite_archive.audit)
    assert summary["settings"] == 1
    assert summary["pseudonyms.patients"] == summary["pseudonyms.uids"] == summary["pseudonyms.map_secret"] == 1
    assert "index [" in done.stderr and "Traceback" not in done.stderr  # the progress bar
    assert file_digests(data_dir) == before  # the SQLite files are only read

    # Every row of every table, as it was (the full text apart: FTS5 gives it back to nobody).
    sqlite = apsw.Connection(str(data_dir / "index.sqlite"), flags=apsw.SQLITE_OPEN_READONLY)
    with psycopg.connect(postgres_url) as postgresql:
        for table in dicoogled.COPIED_TABLES:
            assert sorted(postgresql.execute(f"SELECT * FROM {table}").fetchall(), key=repr) == \
                sorted(sqlite.execute(f"SELECT * FROM {table}").fetchall(), key=repr), table
        assert postgresql.execute("SELECT count(*) FROM metadata").fetchone()[0] == 26
    sqlite.close()

    served = start_daemon(args=["--index", postgres_url], env=ADMIN_ENV)
    admin = admin_client(served)
    after = answers(served, admin)
    for name, expected in sqlite_archive.before.items():
        assert after[name] == expected, name
    # ... and they are answers, not empty ones alike.
    assert len(after["c-find 2"]) == 8 and after["search {'query': 'ct'}"][0] > 0
    assert after["labels"] == {"labels": [{"label": "neuro", "studies": 1}, {"label": "teaching", "studies": 1}]}
    assert len(after["worklist"]) == 1 and after["index settings"]["thumbnailSize"] == "96"
    # Alice's session holds, and she logs in again.
    assert Client(base_url(served), sqlite_archive.alice_token).get("/labels").status == 200
    Client(base_url(served)).login("alice", "alice-pw")
    # The audit log goes on: every entry of the SQLite archive, then this daemon's own, numbered after them.
    audit = {entry["id"]: entry for entry in admin.get("/audit", psize="10000").json()["results"]}
    assert all(audit[number] == entry for number, entry in sqlite_archive.audit.items())
    assert max(audit) > max(sqlite_archive.audit) and len(audit) > len(sqlite_archive.audit)
    assert admin.get(f"/studies/{sqlite_archive.protected}/protected").json()["protected"] is True
    # New instances get new ids after the copied ones.
    assert served.store(get_testdata_file("JPEG2000.dcm")) == [0]
    assert served.counts()["instances"] == 27
    # The same pseudonym for the patient, and the same replacement for a UID: the secret came along.
    pseudonyms = admin.get("/research/pseudonyms").json()["pseudonyms"]
    assert [row["pseudonym"] for row in pseudonyms] == [patient.pseudonym]
    assert admin.get("/research/uids").json()["uids"][0]["replacement"] == replaced["1.2.826.0.1.3680043.2.1125.1"]
    assert served.stop() == 0
    moved = dicoogled.PseudonymMap(postgres_url)
    try:
        assert moved.replacement_uid("1.2.3.4") == dicoogled.PseudonymMap(data_dir / "pseudonyms.sqlite").replacement_uid("1.2.3.4")
    finally:
        moved.close()


def test_a_migration_that_cannot_be_made_changes_nothing(sqlite_archive, start_daemon, postgres_url):
    data_dir = sqlite_archive.data_dir
    before = file_digests(data_dir)
    unreachable = migrate(data_dir, "--to", f"postgresql://127.0.0.1:{free_port()}/archive")
    assert unreachable.returncode == 1
    assert "cannot open the index" in unreachable.stderr and "Traceback" not in unreachable.stderr
    not_a_url = migrate(data_dir, "--to", str(data_dir / "elsewhere.sqlite"))
    assert not_a_url.returncode == 1 and "postgresql://" in not_a_url.stderr
    assert file_digests(data_dir) == before
    # A serve holding the data dir: migrate is refused, the serve unharmed.
    daemon = start_daemon()
    refused = migrate(data_dir, "--to", postgres_url)
    assert refused.returncode == 1 and f"in use by a dicoogled serve (PID {daemon.process.pid})" in refused.stderr
    assert daemon.health()["status"] == "ok"
    assert daemon.stop() == 0
    before = file_digests(data_dir)
    with psycopg.connect(postgres_url) as postgresql:
        assert postgresql.execute("SELECT to_regclass('instances')").fetchone()[0] is None  # nothing written there
    # Once copied, a second copy into the same database is refused; --force replaces it.
    assert migrate(data_dir, "--to", postgres_url).returncode == 0
    again = migrate(data_dir, "--to", postgres_url)
    assert again.returncode == 1 and "holds an archive already" in again.stderr and "--force" in again.stderr
    forced = migrate(data_dir, "--to", postgres_url, "--force")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout.strip().splitlines()[-1])["instances"] == 26
    with psycopg.connect(postgres_url) as postgresql:
        assert postgresql.execute("SELECT count(*) FROM instances").fetchone()[0] == 26
        assert postgresql.execute("SELECT count(*) FROM dicoogled_users.users").fetchone()[0] == 2
    assert file_digests(data_dir) == before


#: Each instance's full text in a PostgreSQL index, by SOP Instance UID.
FULL_TEXTS = "SELECT i.sop_instance_uid, CAST(m.body AS TEXT) FROM metadata m JOIN instances i ON i.id = m.rowid"


def test_reindex_rebuilds_a_postgresql_index_from_the_files(sqlite_archive, postgres_url):
    """reindex --index URL empties the PostgreSQL index's instances and indexes the files again;
    labels, protection and the worklist stay; the SQLite files are left alone. The full text
    indexed from the files is the very text the migration made from the metadata."""
    data_dir = sqlite_archive.data_dir
    assert migrate(data_dir, "--to", postgres_url).returncode == 0
    before = file_digests(data_dir)
    with psycopg.connect(postgres_url, autocommit=True) as postgresql:
        migrated_texts = dict(postgresql.execute(FULL_TEXTS).fetchall())
        postgresql.execute("DELETE FROM instances WHERE id IN (SELECT id FROM instances ORDER BY id LIMIT 5)")
        assert postgresql.execute("SELECT count(*) FROM instances").fetchone()[0] == 21
    done = subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "reindex", "--data-dir", str(data_dir),
                           "--index", postgres_url], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["instances"] == 26
    assert file_digests(data_dir) == before
    with psycopg.connect(postgres_url) as postgresql:
        assert dict(postgresql.execute(FULL_TEXTS).fetchall()) == migrated_texts
    assert len(migrated_texts) == 26
    index = dicoogled.Index(postgres_url)
    try:
        assert index.counts()["instances"] == 26
        assert [label.label for label in index.labels()] == ["neuro", "teaching"]
        assert len(index.protected_studies()) == 1 and len(index.worklist()) == 1
        assert index.search(dicoogled.SearchQuery("ct", set()))[1] > 0
    finally:
        index.close()
