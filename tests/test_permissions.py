"""The data dir is its owner's alone: password hashes, live tokens, the index and the stored
objects. Checked by file mode, and by a second OS user (`nobody`) trying to read them.

The data dirs live in a folder anyone may pass through (0711), not in pytest's own tmp folder,
which only its owner may enter and would hide the data dir from `nobody` whatever its modes.
"""

import contextlib
import os
import pathlib
import shutil
import stat
import subprocess
import tempfile

import pydicom
import pytest

from conftest import RunningDaemon, wait_until
from restclient import ADMIN_ENV, admin_client

SECOND_USER = "nobody"


@pytest.fixture
def passable_folder():
    # Under /tmp itself: the default temporary folder may be one only its owner can pass through
    # (an in-process daemon points tempfile at its own data dir).
    folder = pathlib.Path(tempfile.mkdtemp(prefix="dicoogled-modes-", dir="/tmp"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def umask(mask: int):
    """The daemon is started with this umask, as a shell with a permissive one would start it."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def loose_entries(data_dir: pathlib.Path) -> list[str]:
    """Everything in data_dir (itself too) that a user other than its owner may read, write or enter."""
    loose = []
    for folder, folders, files in os.walk(data_dir):
        for path in [pathlib.Path(folder)] + [pathlib.Path(folder) / name for name in files]:
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode) and mode & 0o077:
                loose.append(f"{path.relative_to(data_dir.parent)} {stat.filemode(mode)}")
    return loose


def second_user_can_read(path: pathlib.Path) -> bool:
    """Whether another OS user can read a file or list a folder (needs root to become it)."""
    if os.geteuid() != 0:
        pytest.skip("becoming a second OS user to try reading needs root")
    if not shutil.which("runuser"):
        pytest.skip("runuser (util-linux) is needed to act as a second OS user")
    command = ["ls", str(path)] if path.is_dir() else ["cat", str(path)]
    return subprocess.run(["runuser", "-u", SECOND_USER, "--", *command],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def secrets_of(daemon: RunningDaemon) -> list[pathlib.Path]:
    data_dir = daemon.data_dir
    stored = next(path for path in (data_dir / "storage").rglob("*") if path.is_file())
    sqlite_files = [] if daemon.index_url else [
        data_dir / "users.sqlite", data_dir / "users.sqlite-wal", data_dir / "users.sqlite-shm",
        data_dir / "index.sqlite", data_dir / "index.sqlite-wal"]  # on PostgreSQL these live in the database
    return [*sqlite_files, data_dir / "storage", stored]


def assert_readable_only_by_owner(daemon: RunningDaemon, passable_folder: pathlib.Path):
    assert loose_entries(daemon.data_dir) == []
    # The check can see a failure: the second user reads what is open to it in the same place.
    control = passable_folder / "control.txt"
    control.write_text("open to all")
    control.chmod(0o644)
    assert second_user_can_read(control)
    for path in secrets_of(daemon):
        assert path.exists(), path
        assert not second_user_can_read(path), f"{SECOND_USER} can read {path}"


def use_every_writer(daemon: RunningDaemon, testdata):
    """Store an object, log in (a session in users.sqlite's WAL), change a setting (settings.ini)
    and make a thumbnail (the cache)."""
    ct = testdata("CT_small.dcm")
    assert daemon.store(ct) == [0]
    admin = admin_client(daemon)
    assert admin.post("/management/settings/index/watcher", data={"watcher": "false"}).status == 200
    assert daemon.index_url or (daemon.data_dir / "settings.ini").is_file()  # on PostgreSQL: in the database
    sop_uid = str(pydicom.dcmread(ct, stop_before_pixels=True).SOPInstanceUID)
    assert admin.get("/dic2png", SOPInstanceUID=sop_uid, thumbnail="true").status == 200
    assert list((daemon.node_dir / "cache").rglob("*.png"))


def test_a_new_data_dir_and_everything_in_it_is_owner_only(passable_folder, testdata):
    daemon = RunningDaemon(passable_folder / "data", env=ADMIN_ENV)
    with umask(0o022):
        daemon.start()
    try:
        use_every_writer(daemon, testdata)
        assert_readable_only_by_owner(daemon, passable_folder)
    finally:
        daemon.stop()


def test_an_existing_world_readable_data_dir_is_tightened_at_start(passable_folder, testdata):
    daemon = RunningDaemon(passable_folder / "data", env=ADMIN_ENV)
    with umask(0o022):
        daemon.start()
        use_every_writer(daemon, testdata)
        daemon.stop()
        # As an older version, a copy or a careless chmod -R would have left it: open to everyone.
        for folder, _, files in os.walk(daemon.data_dir):
            os.chmod(folder, 0o755)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o644)
        assert loose_entries(daemon.data_dir)
        assert second_user_can_read(next(path for path in daemon.data_dir.rglob("*") if path.is_file()))
        daemon.start()
    try:
        wait_until(lambda: "tightened the permissions of" in daemon.log, message="the tightening in the log")
        assert admin_client(daemon).get("/search", query="*:*").status == 200
        assert_readable_only_by_owner(daemon, passable_folder)
    finally:
        daemon.stop()
