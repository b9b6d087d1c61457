"""The command line and the configuration: serve, index, reindex, check; flags, files, errors, signals.

Commands run as `python dicoogled.py ...` subprocesses, the way an administrator or a service
manager runs them; daemons are started with conftest's start_daemon.
"""

import base64
import concurrent.futures
import configparser
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import apsw
import pydicom
import pytest
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

import dicoogled
from conftest import ROOT, RunningDaemon, free_port, index_flags, make_identifier, rejection_of, suite_index_url, wait_until

DICOOGLED = ROOT / "dicoogled.py"


# ---- helpers ---------------------------------------------------------------------------------


def run(*args, timeout=120, env=None) -> subprocess.CompletedProcess:
    """Run `python dicoogled.py ARGS`; returns the completed process (text output)."""
    return subprocess.run([sys.executable, str(DICOOGLED), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})), cwd=ROOT)


def last_json(stdout: str) -> dict:
    """The JSON summary a command prints as its last line."""
    return json.loads(stdout.strip().splitlines()[-1])


def uids_of(paths) -> list[str]:
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths)


def found_uids(daemon, **keys) -> list[str]:
    results, status = daemon.find(make_identifier("IMAGE", **{"SOPInstanceUID": "", **keys}))
    assert status == 0
    return sorted(str(ds.SOPInstanceUID) for ds in results)


def index_rows(data_dir) -> dict:
    """SOPInstanceUID -> (path, origin), read from the index database."""
    select = "SELECT sop_instance_uid, path, origin FROM instances"
    if url := suite_index_url(data_dir, None, []):
        import psycopg
        with psycopg.connect(url) as connection:
            return {uid: (path, origin) for uid, path, origin in connection.execute(select)}
    connection = apsw.Connection(str(data_dir / "index.sqlite"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return {uid: (path, origin) for uid, path, origin in connection.execute(select)}
    finally:
        connection.close()


def settings(config: dicoogled.Config) -> dict:
    """A Config's settings, without the file they came from."""
    values = dataclasses.asdict(config)
    values.pop("config_file")
    return values


def assert_clean_failure(result, *words, code=2):
    """Exit code `code`, every word in the message, and no Python traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output
    for word in words:
        assert word in result.stderr, f"{word!r} not in: {result.stderr}"


# ---- index -----------------------------------------------------------------------------------


def test_index_offline_then_served(studies, start_daemon, tmp_path):
    library = studies(out="library", patients=2, studies=2, series=1, instances=3)
    single = studies(out="single", patients=1, studies=1, series=1, instances=1, seed=7)[0]
    data_dir = tmp_path / "data"
    result = run("index", "--data-dir", data_dir, *index_flags(data_dir), tmp_path / "library", single)
    assert result.returncode == 0, result.stderr
    # A progress bar per folder on stderr, a JSON summary on stdout.
    assert f"{tmp_path / 'library'} [" in result.stderr
    assert f"] {len(library)}/{len(library)} (" in result.stderr
    summary = last_json(result.stdout)
    assert (summary["indexed"], summary["skipped"], summary["stored"]) == (len(library) + 1, 0, 0)
    expected = uids_of(library + [single])
    # Indexed in place: the index names the files where they are, storage stays empty.
    rows = index_rows(data_dir)
    assert sorted(rows) == expected
    assert {path for path, _ in rows.values()} == {str(p) for p in library + [single]}
    assert {origin for _, origin in rows.values()} == {"index"}
    assert not any(p.is_file() for p in (data_dir / "storage").rglob("*"))

    # Twice: nothing is added twice.
    again = run("index", "--data-dir", data_dir, *index_flags(data_dir), tmp_path / "library", single)
    assert again.returncode == 0, again.stderr
    assert last_json(again.stdout)["indexed"] == 0
    assert sorted(index_rows(data_dir)) == expected

    daemon = start_daemon(name="data")
    daemon.settled()
    assert found_uids(daemon) == expected
    assert daemon.counts() == {"patients": 3, "studies": 5, "series": 5, "instances": len(expected)}


def test_index_again_follows_the_folder(studies, tmp_path):
    library = studies(out="library", patients=1, studies=1, series=1, instances=4)
    data_dir = tmp_path / "data"
    assert run("index", "--data-dir", data_dir, *index_flags(data_dir), tmp_path / "library").returncode == 0
    library[0].unlink()
    result = run("index", "--data-dir", data_dir, *index_flags(data_dir), tmp_path / "library")
    assert result.returncode == 0, result.stderr
    assert sorted(index_rows(data_dir)) == uids_of(library[1:])


def test_index_missing_path(tmp_path):
    result = run("index", "--data-dir", tmp_path / "data", tmp_path / "nowhere")
    assert_clean_failure(result, str(tmp_path / "nowhere"), "no such file or folder")


# ---- reindex ---------------------------------------------------------------------------------


@pytest.mark.sqlite_only("deletes or overwrites index.sqlite")
@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_reindex_rebuilds_everything(start_daemon, studies, tmp_path, damage):
    """Stored, watched and indexed-in-place instances are all found again after reindex."""
    stored = studies(out="to-store", patients=1, studies=1, series=1, instances=3)
    watched = studies(out="watch", patients=1, studies=1, series=1, instances=2, seed=1)
    indexed = studies(out="library", patients=1, studies=1, series=1, instances=2, seed=2)
    single = studies(out="single", patients=1, studies=1, series=1, instances=1, seed=3)[0]
    config_text = f"[watch]\nfolders = {tmp_path / 'watch'}\n"
    data_dir = tmp_path / "data"
    assert run("index", "--data-dir", data_dir, *index_flags(data_dir), tmp_path / "library", single).returncode == 0
    daemon = start_daemon(config_text=config_text)
    daemon.settled()
    assert daemon.store(*stored) == [0, 0, 0]
    expected = uids_of(stored + watched + indexed + [single])
    assert found_uids(daemon) == expected
    origins = {uid: origin for uid, (_, origin) in index_rows(data_dir).items()}
    assert daemon.stop() == 0

    index_files = sorted(data_dir.glob("index.sqlite*"))
    assert index_files
    if damage == "deleted":
        for path in index_files:
            path.unlink()
    else:
        (data_dir / "index.sqlite").write_bytes(b"this is not an SQLite database\n" * 512)
        # A damaged index stops the daemon with a message that says what to do.
        broken = run("serve", "--data-dir", data_dir, "--http-port", free_port(), "--dicom-port", free_port(),
                     "--http-host", "127.0.0.1", "--dicom-host", "127.0.0.1", timeout=60)
        assert_clean_failure(broken, "index.sqlite", "reindex", code=1)

    result = run("reindex", "--config", daemon.config_path, "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    assert last_json(result.stdout)["instances"] == len(expected)
    assert {uid: origin for uid, (_, origin) in index_rows(data_dir).items()} == origins
    daemon.start()
    daemon.settled()
    assert found_uids(daemon) == expected


# ---- check -----------------------------------------------------------------------------------


@pytest.fixture
def archive(start_daemon, studies, tmp_path):
    """A stopped daemon's data dir holding 3 stored and 1 watched instance: (daemon, stored paths)."""
    watched = studies(out="watch", patients=1, studies=1, series=1, instances=1, seed=1)
    daemon = start_daemon(config_text=f"[watch]\nfolders = {tmp_path / 'watch'}\n")
    daemon.settled()
    assert daemon.store(*studies(out="to-store", patients=1, studies=1, series=1, instances=3)) == [0, 0, 0]
    assert daemon.counts()["instances"] == 4
    assert daemon.stop() == 0
    stored = sorted(p for p in (daemon.data_dir / "storage").rglob("*.dcm"))
    assert len(stored) == 3
    return daemon, stored, watched[0]


def test_check_consistent(archive):
    daemon, _, _ = archive
    result = run("check", "--data-dir", daemon.data_dir, *daemon.index_args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert last_json(result.stdout) == {"instances": 4}


def test_check_deleted_file(archive):
    daemon, stored, watched = archive
    watched_uid = uids_of([watched])[0]
    stored[1].unlink()
    watched.unlink()
    result = run("check", "--data-dir", daemon.data_dir, *daemon.index_args)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert f"missing: {stored[1]} ({stored[1].stem})" in lines
    assert f"missing: {watched} ({watched_uid})" in lines
    assert last_json(result.stdout) == {"instances": 4, "missing": 2}


def test_check_changed_file(archive):
    daemon, stored, _ = archive
    data = bytearray(stored[0].read_bytes())
    data[-1] ^= 0xFF  # one pixel byte: same size, new content and mtime
    stored[0].write_bytes(bytes(data))
    result = run("check", "--data-dir", daemon.data_dir, *daemon.index_args)
    assert result.returncode == 1
    assert f"changed: {stored[0]} ({stored[0].stem})" in result.stdout.splitlines()
    assert last_json(result.stdout) == {"instances": 4, "changed": 1}


def test_check_file_not_indexed(archive):
    daemon, stored, _ = archive
    stray = stored[0].parent / "1.2.3.4.5.dcm"
    stray.write_bytes(stored[0].read_bytes())
    result = run("check", "--data-dir", daemon.data_dir, *daemon.index_args)
    assert result.returncode == 1
    assert f"not indexed: {stray}" in result.stdout.splitlines()
    assert last_json(result.stdout) == {"instances": 4, "not indexed": 1}


def test_check_without_an_archive(tmp_path):
    result = run("check", "--data-dir", tmp_path / "nothing-here")
    assert_clean_failure(result, str(tmp_path / "nothing-here"), code=1)


@pytest.mark.sqlite_only("overwrites index.sqlite")
def test_check_corrupted_index(archive):
    daemon, _, _ = archive
    (daemon.data_dir / "index.sqlite").write_bytes(b"garbage" * 1000)
    for suffix in ("-wal", "-shm"):
        pathlib.Path(str(daemon.data_dir / "index.sqlite") + suffix).unlink(missing_ok=True)
    result = run("check", "--data-dir", daemon.data_dir, *daemon.index_args)
    assert_clean_failure(result, "index.sqlite", "reindex", code=1)


# ---- help, defaults, flags and files ---------------------------------------------------------


def test_help_lists_the_commands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("serve", "index", "reindex", "check"):
        assert command in result.stdout
    for command in ("serve", "index", "reindex", "check"):
        sub = run(command, "--help")
        assert sub.returncode == 0 and "--data-dir" in sub.stdout and "--config" in sub.stdout, command
    assert "--aet" in run("serve", "--help").stdout
    assert run("--version").stdout.strip() == f"dicoogled {dicoogled.__version__}"


def test_defaults():
    config = dicoogled.Config.load()
    assert config.data_dir == pathlib.Path("data")
    assert (config.http_port, config.dicom_port, config.aet) == (8080, 11112, "DICOOGLED")
    assert config.watch_folders == [] and config.modalities == {}
    # The dataclass defaults and the embedded configuration text agree (an empty [plugins]
    # folders means the plugins/ folder beside dicoogled.py).
    assert config.plugin_folders == [ROOT / "plugins"]
    assert settings(config) == {**settings(dicoogled.Config()), "plugin_folders": [ROOT / "plugins"]}


def test_no_arguments_serves_with_the_defaults(monkeypatch, tmp_path):
    """`dicoogled` alone means `dicoogled serve` with every default (checked without binding ports)."""
    started = []

    class FakeDaemon:
        def __init__(self, config):
            started.append(config)

        def serve_forever(self):
            pass

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dicoogled, "Daemon", FakeDaemon)
    monkeypatch.setattr(dicoogled, "_configure_logging", lambda level: None)
    assert dicoogled.main([]) == 0
    assert [settings(c) for c in started] == [settings(dicoogled.Config.load())]
    assert started[0].data_dir == pathlib.Path("data")  # relative: ./data where it is started


def test_documented_config_file_matches_the_defaults():
    documented = ROOT / "conf" / "dicoogled.ini"
    if documented.exists():
        config = dicoogled.Config.load(documented)
        assert config.config_file == documented
        assert settings(config) == settings(dicoogled.Config.load())
        # Same sections and keys as the embedded text, so neither documents a setting the other lacks.
        parsed = [configparser.ConfigParser(interpolation=None) for _ in range(2)]
        parsed[0].read_string(dicoogled.DEFAULT_CONFIG)
        parsed[1].read(documented)
        assert {s: dict(parsed[0][s]) for s in parsed[0].sections()} == {s: dict(parsed[1][s]) for s in parsed[1].sections()}
    else:  # not written yet; test_embedded_defaults_as_a_file covers the embedded text
        pytest.skip(f"{documented} does not exist yet")


def test_embedded_defaults_as_a_file(tmp_path):
    path = tmp_path / "dicoogled.ini"
    path.write_text(dicoogled.DEFAULT_CONFIG)
    assert settings(dicoogled.Config.load(path)) == settings(dicoogled.Config.load())


def test_serve_flags_override_the_config_file(start_daemon, tmp_path):
    file_data = tmp_path / "from-file"
    config_text = (f"[dicom]\naet = FROMFILE\nport = {free_port()}\n[http]\nport = {free_port()}\n"
                   f"[storage]\ndata_dir = {file_data}\n")
    daemon = start_daemon(config_text=config_text, args=["--aet", "FROMFLAG"])
    health = daemon.health()  # answered on the --http-port of the flags
    assert (health["aet"], health["dicom_port"], health["http_port"]) == ("FROMFLAG", daemon.dicom_port, daemon.http_port)
    assert daemon.index_url or (daemon.data_dir / "index.sqlite").exists()
    assert not file_data.exists()
    results, status = daemon.find(make_identifier("STUDY", StudyInstanceUID=""), aet="FROMFLAG")
    assert (results, status) == ([], 0)


def test_config_file_settings_apply(start_daemon):
    daemon = start_daemon(config_text="[dicom]\naet = FROMFILE\nstrict_called_aet = true\n")
    assert daemon.health()["aet"] == "FROMFILE"
    results, status = daemon.find(make_identifier("STUDY", StudyInstanceUID=""), aet="FROMFILE")
    assert (results, status) == ([], 0)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title="DICOOGLED")
    assert rejection_of(assoc)  # strict_called_aet from the file


def test_config_with_only_modalities(start_daemon, studies, tmp_path):
    """A file holding only [modalities]: every other setting is the default, and C-MOVE
    reaches the modality it names."""
    received = []

    def on_store(event):
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    scp = AE(ae_title="WORKSTATION")
    scp.supported_contexts = StoragePresentationContexts
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        daemon = start_daemon(config_text=f"[modalities]\nWORKSTATION = 127.0.0.1:{port}\n")
        config = dicoogled.Config.load(daemon.config_path)
        assert config.modalities == {"WORKSTATION": ("127.0.0.1", port)}
        assert settings(config) == {**settings(dicoogled.Config.load()), "modalities": config.modalities}
        paths = studies(patients=1, studies=1, series=1, instances=2)
        assert daemon.store(*paths) == [0, 0]
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title="DICOOGLED")
        assert assoc.is_established
        try:
            identifier = make_identifier("STUDY", StudyInstanceUID=str(pydicom.dcmread(paths[0]).StudyInstanceUID))
            statuses = [s.Status for s, _ in assoc.send_c_move(identifier, "WORKSTATION", StudyRootQueryRetrieveInformationModelMove)]
        finally:
            assoc.release()
        assert statuses[-1] == 0x0000
        assert sorted(received) == uids_of(paths)
    finally:
        server.shutdown()


INVALID_CONFIGS = {
    "AE title too long": ("[dicom]\naet = THIS_AE_TITLE_IS_TOO_LONG\n", ["AE title", "THIS_AE_TITLE_IS_TOO_LONG"]),
    "AE title with backslash": ("[dicom]\naet = BAD\\AET\n", ["AE title"]),
    "DICOM port 70000": ("[dicom]\nport = 70000\n", ["port", "70000"]),
    "HTTP port 70000": ("[http]\nport = 70000\n", ["port", "70000"]),
    "port not a number": ("[dicom]\nport = eleven\n", ["port", "eleven"]),
    "duplicates = maybe": ("[storage]\nduplicates = maybe\n", ["duplicates", "maybe"]),
    "fsync = perhaps": ("[storage]\nfsync = perhaps\n", ["fsync", "perhaps"]),
    "poll = sometimes": ("[watch]\npoll = sometimes\n", ["poll", "sometimes"]),
    "quiet_period = soon": ("[watch]\nquiet_period = soon\n", ["quiet_period", "soon"]),
    "log level": ("[log]\nlevel = LOUD\n", ["level", "LOUD"]),
    "modality without port": ("[modalities]\nWORKSTATION = 192.168.1.20\n", ["[modalities]", "WORKSTATION"]),
    "modality port 99999": ("[modalities]\nWORKSTATION = 192.168.1.20:99999\n", ["[modalities]", "WORKSTATION"]),
    # configparser also splits at ':', so this reads as 'WORKSTATION 192.168.1.20' = '11112'.
    "modality line without =": ("[modalities]\nWORKSTATION 192.168.1.20:11112\n", ["[modalities]", "WORKSTATION 192.168.1.20"]),
    "modality AE title too long": ("[modalities]\nA_VERY_LONG_AE_TITLE_X = 10.0.0.1:104\n", ["[modalities]", "A_VERY_LONG_AE_TITLE_X"]),
    "setting outside a section": ("aet = DICOOGLED\n", ["aet = DICOOGLED"]),
    "index url not PostgreSQL": ("[index]\nurl = mysql://db.example.org/pacs\n", ["[index] url", "postgresql://"]),
}


@pytest.mark.parametrize("name", list(INVALID_CONFIGS))
def test_invalid_config_fails_clearly(tmp_path, name):
    text, words = INVALID_CONFIGS[name]
    config = tmp_path / "bad.ini"
    config.write_text(text)
    ports = []  # flags override the file: give only the ports the file does not set
    if not text.startswith("[http]\nport"):
        ports += ["--http-port", free_port()]
    if not text.startswith("[dicom]\nport"):
        ports += ["--dicom-port", free_port()]
    result = run("serve", "--config", config, "--data-dir", tmp_path / "data", "--http-host", "127.0.0.1",
                 "--dicom-host", "127.0.0.1", *ports, timeout=60)
    assert_clean_failure(result, "dicoogled: ", *words)
    # The offline commands read the same file and fail the same way.
    assert_clean_failure(run("check", "--config", config, "--data-dir", tmp_path / "data"), *words)


@pytest.mark.parametrize("flags, words", [
    (["--aet", "WAY_TOO_LONG_FOR_AN_AET"], ["AE title"]),
    (["--dicom-port", "70000"], ["port", "70000"]),
    (["--http-port", "70000"], ["port", "70000"]),
    (["--index", "./index.sqlite"], ["[index] url", "postgresql://"]),
])
def test_invalid_flags_fail_clearly(tmp_path, flags, words):
    result = run("serve", "--data-dir", tmp_path / "data", "--http-host", "127.0.0.1", "--dicom-host", "127.0.0.1",
                 "--http-port", free_port(), "--dicom-port", free_port(), *flags, timeout=60)
    assert_clean_failure(result, *words)


def test_missing_config_file(tmp_path):
    result = run("serve", "--config", tmp_path / "nowhere.ini", "--data-dir", tmp_path / "data", timeout=60)
    assert_clean_failure(result, str(tmp_path / "nowhere.ini"), "does not exist")


def test_admin_password_from_the_environment(start_daemon):
    if "DICOOGLED_ADMIN_PASSWORD" not in DICOOGLED.read_text():
        pytest.skip("dicoogled.py does not read DICOOGLED_ADMIN_PASSWORD yet")
    password = "correct horse battery staple"
    daemon = start_daemon(env={"DICOOGLED_ADMIN_PASSWORD": password})

    def login(secret):
        body = urllib.parse.urlencode({"username": "admin", "password": secret}).encode()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{daemon.http_port}/login", body, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, None

    status, answer = login(password)
    assert status == 200 and answer["user"] == "admin" and answer["admin"] is True
    assert login("wrong")[0] == 401
    assert not (daemon.data_dir / "admin-password.txt").exists()
    assert password not in daemon.log


# ---- a running daemon ------------------------------------------------------------------------


def test_health(daemon, studies):
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.http_port}/health", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/json")
        health = json.load(response)
    assert health["status"] == "ok"
    assert health["counts"] == {"patients": 0, "studies": 0, "series": 0, "instances": 0}
    assert daemon.store(*studies(patients=2, studies=1, series=1, instances=2)) == [0] * 4
    assert daemon.counts() == {"patients": 2, "studies": 2, "series": 2, "instances": 4}
    assert daemon.health()["ingest"]["stored"] == 4


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(start_daemon, signum):
    daemon = start_daemon()
    pid, ports = daemon.process.pid, (daemon.http_port, daemon.dicom_port)
    daemon.process.send_signal(signum)
    assert daemon.process.wait(timeout=30) == 0
    daemon.log_file.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "stopped" in daemon.log
    assert "Traceback" not in daemon.log
    # The ports are free again: a new daemon can take them at once.
    again = RunningDaemon(daemon.data_dir.parent / "again")
    again.http_port, again.dicom_port = ports
    try:
        again.start()
        assert again.health()["dicom_port"] == ports[1]
    finally:
        assert again.stop() == 0


SLOW_ROUTE = """
import pathlib
import time


def routes(app):
    @app.get("/slow")
    def slow():
        marker = pathlib.Path(app_marker)
        marker.touch()  # the test sends SIGTERM once this request is under way,
        while marker.exists():  # and removes the marker once the daemon is stopping
            time.sleep(0.01)
        return {"done": True}
"""


def test_a_request_under_way_at_sigterm_is_answered(start_daemon, tmp_path):
    """Stopping waits for the requests under way and closes waitress's sockets from its own loop
    (closed from another thread, a worker waking the loop hit EBADF)."""
    marker, plugins = tmp_path / "under-way", tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "slow.py").write_text(SLOW_ROUTE.replace("app_marker", repr(str(marker))))
    daemon = start_daemon(args=["--plugins-dir", str(plugins)], env={"DICOOGLED_ADMIN_PASSWORD": "cli-admin-1"})
    request = urllib.request.Request(f"http://127.0.0.1:{daemon.http_port}/ext/slow/slow", headers={
        "Authorization": "Basic " + base64.b64encode(b"admin:cli-admin-1").decode()})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(lambda: urllib.request.urlopen(request, timeout=30).read())
        wait_until(marker.exists, message="the slow request to start")
        daemon.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping" in daemon.log, message="the daemon to begin stopping")
        marker.unlink()
        assert json.loads(answer.result()) == {"done": True}
    assert daemon.process.wait(timeout=30) == 0
    assert "stopped" in daemon.log and "Traceback" not in daemon.log


@pytest.mark.parametrize("shared", ["dicom", "http", "both"])
def test_second_daemon_on_the_same_ports_fails(daemon, tmp_path, shared):
    second = RunningDaemon(tmp_path / "second")
    if shared in ("dicom", "both"):
        second.dicom_port = daemon.dicom_port
    if shared in ("http", "both"):
        second.http_port = daemon.http_port
    second.start(wait=False)
    try:
        code = second.process.wait(timeout=30)  # fails rather than hangs
    finally:
        if second.process.poll() is None:
            second.process.kill()
            second.process.wait()
        second.log_file.close()
    assert code == 1
    service, port = ("HTTP", daemon.http_port) if shared == "http" else ("DICOM", daemon.dicom_port)
    assert f"cannot start: [Errno 98] cannot listen for {service} on 127.0.0.1:{port}: Address already in use" in second.log
    assert "Traceback" not in second.log
    assert daemon.health()["status"] == "ok"  # the first one is unharmed
