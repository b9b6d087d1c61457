"""A full data disk: every write that finds no space fails cleanly and says so, and the archive
recovers by itself once space is freed.

The data dir lives on a real, small tmpfs (8 MB, 4,000 inodes), filled with a filler file (or,
for inodes, with empty files) to make each step of a store, a login or a settings change fail
for real: no failure is simulated.
"""

import concurrent.futures
import io
import json
import os
import pathlib
import subprocess
import sys

import pydicom
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import studygen  # noqa: E402
from conftest import RunningDaemon, wait_until  # noqa: E402
from restclient import ADMIN_ENV, ADMIN_PASSWORD, Client, admin_client, base_url  # noqa: E402
from restclient import stow as stow_request  # noqa: E402

OUT_OF_RESOURCES = 0xA700
PAGE = 4096  # tmpfs counts space in whole pages
NO_RESERVE = "[storage]\nmin_free_mb = 0\n"


class SmallDisk:
    """A mounted tmpfs, and a filler to take its free space or inodes."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.filler = path / "filler"
        self.inode_filler = path / "inode-filler"

    def free(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def fill(self, leave: int = 0):
        """Grow the filler file until only `leave` bytes (rounded up to a page) are free."""
        leave = -(-leave // PAGE) * PAGE
        with open(self.filler, "ab") as handle:
            while self.free() > leave:
                handle.write(b"\0" * min(self.free() - leave, 1 << 20))
                handle.flush()
        assert self.free() == leave, (self.free(), leave)

    def fill_inodes(self):
        """Create empty files until no inode is left: a disk full of small files."""
        self.inode_filler.mkdir()
        number = 0
        while True:
            try:
                (self.inode_filler / str(number)).touch()
            except OSError:
                return
            number += 1

    def free_up(self):
        self.filler.unlink(missing_ok=True)
        if self.inode_filler.exists():
            for path in self.inode_filler.iterdir():
                path.unlink()
            self.inode_filler.rmdir()


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB tmpfs mounted for the test, unmounted afterwards whatever happened."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,nr_inodes=4000,mode=0700", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a small tmpfs for the data dir is not permitted here: {mounted.stderr.strip()}")
    try:
        yield SmallDisk(mountpoint)
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


@pytest.fixture
def start_on(small_disk, tmp_path):
    """Factory: a daemon whose data dir is on the small disk (its log is not); killed at the end,
    before the disk is unmounted."""
    started = []

    def start(config_text=NO_RESERVE) -> RunningDaemon:
        daemon = RunningDaemon(small_disk.path / "data", config_text, env=ADMIN_ENV)
        daemon.log_path = tmp_path / "daemon.log"
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        if daemon.process and daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()


def instance(number: int, series: int = 0):
    return studygen.make_instance(0, 0, series, number)


def stored_files(daemon) -> list[pathlib.Path]:
    return sorted((daemon.data_dir / "storage").rglob("*.dcm"))


def temp_files(daemon) -> list[pathlib.Path]:
    return sorted((daemon.node_dir / "tmp").iterdir())


def file_size(dataset) -> int:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return len(buffer.getvalue())


def indexed(daemon, dataset) -> bool:
    results, _ = daemon.find({"level": "IMAGE", "StudyInstanceUID": dataset.StudyInstanceUID,
                              "SeriesInstanceUID": dataset.SeriesInstanceUID, "SOPInstanceUID": dataset.SOPInstanceUID})
    return bool(results)


def stow(daemon, *datasets, token=None):
    """POST /dicom-web/studies with the data sets as parts: (status, headers, JSON body)."""
    response = stow_request(daemon, token, *datasets)
    return response.status, response.headers, json.loads(response.body) if response.body else None


@pytest.mark.sqlite_only("the index's SQLite file is on the full disk (a PostgreSQL index is on its server's)")
def test_index_commit_failure_answers_out_of_resources_and_leaves_no_file(small_disk, start_on):
    """The file fits, its index commit does not (SQLITE_FULL): 0xA700, the file removed, the
    failure counted and logged, /health degraded with the reason and the free space; once the
    filler goes, /health is ok again by itself and the same instance stores."""
    daemon = start_on()
    assert daemon.store(instance(0)) == [0x0000]  # its study and series folders exist now
    second = instance(1)
    small_disk.fill(leave=file_size(second) + 512)  # room for the file, none for the index's WAL
    assert daemon.store(second) == [OUT_OF_RESOURCES]
    assert stored_files(daemon) == sorted(daemon.data_dir.glob("storage/*/*/" + instance(0).SOPInstanceUID + ".dcm"))
    assert temp_files(daemon) == []
    assert "database or disk is full" in daemon.log
    health = daemon.health()
    assert health["status"] == "degraded"
    assert any("out of disk space" in problem for problem in health["problems"]), health["problems"]
    assert health["disk"]["free_bytes"] == small_disk.free()
    assert health["ingest"]["out_of_space"] == 1 and health["ingest"]["failed"] == 1
    assert health["counts"]["instances"] == 1

    small_disk.free_up()
    wait_until(lambda: daemon.health()["status"] == "ok", message="/health to be ok once space is freed")
    assert daemon.store(second) == [0x0000]
    assert indexed(daemon, second)
    assert len(stored_files(daemon)) == 2


def test_temp_file_creation_failure_answers_out_of_resources(small_disk, start_on):
    """No inode left for the temp file: 0xA700, nothing written; storing resumes by itself."""
    daemon = start_on()
    assert daemon.store(instance(0)) == [0x0000]
    small_disk.fill_inodes()
    assert daemon.store(instance(1)) == [OUT_OF_RESOURCES]
    assert len(stored_files(daemon)) == 1 and temp_files(daemon) == []
    assert "No space left on device" in daemon.log
    assert daemon.health()["ingest"]["out_of_space"] == 1
    small_disk.free_up()
    assert daemon.store(instance(1)) == [0x0000]
    assert indexed(daemon, instance(1))


@pytest.mark.sqlite_only("the index's SQLite file is on the full disk (a PostgreSQL index is on its server's)")
def test_failed_group_commit_fails_each_store_and_the_writer_goes_on(small_disk, start_on):
    """Stores from several associations at once on a disk with room for about one file: every
    one is answered 0xA700 (whether its temp file or its group's commit failed) and leaves no
    file; after the filler goes, the index writer stores them all."""
    daemon = start_on()
    assert daemon.store(instance(0)) == [0x0000]
    batches = [[instance(1 + 3 * association + n) for n in range(3)] for association in range(4)]
    small_disk.fill(leave=file_size(batches[0][0]) + 512)
    with concurrent.futures.ThreadPoolExecutor(len(batches)) as pool:
        statuses = [status for result in pool.map(lambda batch: daemon.store(*batch), batches) for status in result]
    assert statuses == [OUT_OF_RESOURCES] * 12
    assert len(stored_files(daemon)) == 1 and temp_files(daemon) == []
    assert daemon.health()["ingest"]["out_of_space"] == 12
    assert daemon.counts()["instances"] == 1

    small_disk.free_up()
    with concurrent.futures.ThreadPoolExecutor(len(batches)) as pool:
        statuses = [status for result in pool.map(lambda batch: daemon.store(*batch), batches) for status in result]
    assert statuses == [0x0000] * 12
    assert daemon.counts()["instances"] == 13 and len(stored_files(daemon)) == 13


def test_stow_on_a_full_disk_fails_with_out_of_resources(small_disk, start_on):
    """STOW-RS with no room: 409 (PS3.18: nothing stored) with FailureReason A700 per instance
    and a Warning saying why; nothing is left on disk."""
    daemon = start_on()
    token = admin_client(daemon).token
    first, second = instance(0), instance(1)
    status, _, _ = stow(daemon, first, token=token)
    assert status == 200
    small_disk.fill(leave=0)
    status, headers, body = stow(daemon, second, token=token)
    assert status == 409, body
    failed = body["00081198"]["Value"]
    assert [item["00081197"]["Value"] for item in failed] == [[OUT_OF_RESOURCES]]
    assert failed[0]["00081155"]["Value"] == [second.SOPInstanceUID]
    assert "out of resources" in headers["Warning"]
    assert len(stored_files(daemon)) == 1 and temp_files(daemon) == []


@pytest.mark.sqlite_only("users, sessions and settings are SQLite files on the full disk (with PostgreSQL, in its database)")
def test_login_user_and_settings_writes_answer_507_on_a_full_disk(small_disk, start_on):
    """A login (a new session), a new user and a settings change each need the disk: 507 with
    a JSON reason, not 500; the change is not made and no half-written settings file stays.
    Reading goes on with the session already open, and all three work once space is freed."""
    daemon = start_on()
    admin = admin_client(daemon)
    settings = daemon.data_dir / "settings.ini"
    assert admin.request("PUT", "/management/settings/dicom", data={"aetitle": "BEFORE"}).status == 200
    saved = settings.read_bytes()
    small_disk.fill(leave=0)

    login = Client(base_url(daemon)).request("POST", "/login", data={"username": "admin", "password": ADMIN_PASSWORD}, auth=None)
    assert login.status == 507, login
    assert "disk" in login.json()["error"] and login.json()["free_bytes"] == small_disk.free()

    user = admin.request("POST", "/user", data={"username": "someone", "password": "a-password-1"})
    assert user.status == 507, user
    assert "disk" in user.json()["error"]
    assert "someone" not in admin.get("/user").text

    aet = admin.request("PUT", "/management/settings/dicom", data={"aetitle": "AFTER"})
    assert aet.status == 507, aet
    assert admin.get("/management/settings/dicom").json() == {"aetitle": "BEFORE"}
    assert settings.read_bytes() == saved
    assert sorted(p.name for p in daemon.data_dir.glob("settings.ini*")) == ["settings.ini"]
    health = daemon.health()
    assert health["status"] == "degraded" and health["disk"]["out_of_space_failures"] >= 3
    assert daemon.log.count("out of disk space") >= 3

    small_disk.free_up()
    assert Client(base_url(daemon)).login("admin", ADMIN_PASSWORD)["user"] == "admin"
    assert admin.request("POST", "/user", data={"username": "someone", "password": "a-password-1"}).status == 200
    assert admin.request("PUT", "/management/settings/dicom", data={"aetitle": "AFTER"}).status == 200
    assert "AFTER" in settings.read_text()


def test_reserve_refuses_new_objects_before_the_disk_is_full(small_disk, start_on):
    """Below [storage] min_free_mb, C-STORE gets 0xA700 and STOW-RS A700 though the disk still
    has room, /health says why, and logins (which need that room) still work; above it again,
    storing resumes by itself."""
    daemon = start_on("[storage]\nmin_free_mb = 3\n")
    admin = admin_client(daemon)
    small_disk.fill(leave=2 * 1024 * 1024)
    assert daemon.store(instance(0)) == [OUT_OF_RESOURCES]
    status, _, body = stow(daemon, instance(1), token=admin.token)
    assert status == 409 and body["00081198"]["Value"][0]["00081197"]["Value"] == [OUT_OF_RESOURCES]
    # Nothing of the refused objects is left: not in storage, not half-written in tmp (the space
    # still free is no measure: every use of a session is written to users.sqlite).
    assert stored_files(daemon) == [] and temp_files(daemon) == []
    assert not any(p.name.startswith(".") and p.suffix == ".tmp" for p in (daemon.data_dir / "storage").rglob("*"))
    assert "min_free_mb" in daemon.log
    health = daemon.health()
    assert health["status"] == "degraded"
    assert any("below the reserve" in problem for problem in health["problems"]), health["problems"]
    assert health["disk"]["reserve_bytes"] == 3 * 1024 * 1024
    assert health["ingest"]["out_of_space"] == 2
    assert Client(base_url(daemon)).login("admin", ADMIN_PASSWORD)

    small_disk.free_up()
    assert daemon.store(instance(0)) == [0x0000]
    assert daemon.health()["status"] == "ok"


@pytest.mark.sqlite_only("the index's SQLite file is on the full disk (a PostgreSQL index is on its server's)")
def test_restart_on_a_full_disk_reconciles_every_file_and_indexes_them_once_space_is_freed(small_disk, start_on, tmp_path):
    """Files in storage that are not indexed (here put there while the daemon was stopped), and a
    disk with no room for their index rows: reconciliation logs each failure and finishes, the
    daemon serves on; once the filler goes every file is indexed without a restart."""
    daemon = start_on()
    assert daemon.store(instance(0)) == [0x0000]
    daemon.stop()
    orphans = [instance(n, series=1) for n in range(8)]
    for dataset in orphans:
        path = daemon.data_dir / "storage" / dataset.StudyInstanceUID / dataset.SeriesInstanceUID / f"{dataset.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        pydicom.dcmwrite(path, dataset, enforce_file_format=True)
    small_disk.fill(leave=96 * 1024)  # enough to open the databases, too little to index eight files
    daemon.start()
    reconciled = "reconciled " + str((daemon.data_dir / "storage").resolve())
    wait_until(lambda: daemon.log.count(reconciled) == 2, message="storage reconciliation to finish after the restart")
    assert "cannot index" in daemon.log
    assert "Traceback" not in daemon.log
    health = daemon.health()
    assert health["status"] == "degraded" and health["counts"]["instances"] < 9

    small_disk.free_up()
    wait_until(lambda: daemon.health()["counts"]["instances"] == 9, message="the files to be indexed once space is freed")
    assert all(indexed(daemon, dataset) for dataset in orphans)
    assert len(stored_files(daemon)) == 9 and temp_files(daemon) == []
    assert daemon.health()["status"] == "ok"


def test_a_postgresql_server_with_a_full_disk_counts_as_out_of_space():
    """A PostgreSQL index's disk is its server's: its disk_full error (SQLSTATE 53100) is an
    out-of-space failure like SQLite's SQLITE_FULL (0xA700, the /health reason), its other
    errors are not."""
    import psycopg
    sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
    import dicoogled
    assert dicoogled.is_out_of_space(psycopg.errors.DiskFull("could not extend file"))
    assert not dicoogled.is_out_of_space(psycopg.errors.UniqueViolation("duplicate key"))
    assert not dicoogled.is_out_of_space(psycopg.errors.OutOfMemory("out of memory"))
