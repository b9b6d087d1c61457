"""Shared fixtures: the real daemon on loopback ports, real DICOM clients, generated studies.

Nothing here mocks dicoogled: each test talks to a `python dicoogled.py serve` process over
TCP, the way a modality, a viewer or a script would.

DICOOGLED_TEST_INDEX=postgresql runs the suite on the second index engine: every daemon the
fixtures start gets `--index` and a fresh database of the tests' own PostgreSQL server
(tests/pgserver.py). Tests that look at the SQLite files themselves are marked
`@pytest.mark.sqlite_only(reason)` and skipped then.
"""

import fcntl
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
import pynetdicom.association
from pynetdicom import AE, debug_logger, evt  # noqa: F401  (debug_logger: handy when a test fails)
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

TESTS = pathlib.Path(__file__).parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

import studygen  # noqa: E402
from playwright.sync_api import expect as browser_expect  # noqa: E402

# The browser tests wait for what a page shows with playwright's expect(), 5 s at most by default,
# and for their actions 20 s (page.set_default_timeout): with both suites running at once (make
# test) a login and a search can take longer than 5 s, so expectations wait as long as actions do.
# A passing test waits only until the page shows it.
browser_expect.set_options(timeout=20_000)

AET = "DICOOGLED"

#: The index engine the daemons of the tests run on: sqlite (the default) or postgresql.
TEST_INDEX = os.environ.get("DICOOGLED_TEST_INDEX", "sqlite").strip().lower() or "sqlite"
if TEST_INDEX not in ("sqlite", "postgresql"):
    raise RuntimeError(f"DICOOGLED_TEST_INDEX={TEST_INDEX!r}: sqlite or postgresql")
ON_POSTGRESQL = TEST_INDEX == "postgresql"


def pytest_configure(config):
    config.addinivalue_line("markers", "sqlite_only(reason): the test looks at the SQLite files themselves"
                                       " (index.sqlite, its PRAGMAs, its WAL); skipped when DICOOGLED_TEST_INDEX=postgresql")
    config.addinivalue_line("markers", "each_engine: the test puts its daemons on each engine itself (parametrized),"
                                       " in every run; skipped when DICOOGLED_TEST_INDEX=postgresql, which would repeat it")


def pytest_report_header(config):
    return f"dicoogled index engine: {TEST_INDEX}"


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("sqlite_only")
    if marker and ON_POSTGRESQL:
        reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "looks at the SQLite files")
        pytest.skip(f"SQLite only: {reason}")
    if item.get_closest_marker("each_engine") and ON_POSTGRESQL:
        pytest.skip("runs on each engine in the suite's SQLite run already")


FIND_MODELS = {"patient": PatientRootQueryRetrieveInformationModelFind, "study": StudyRootQueryRetrieveInformationModelFind}


def _give_responses_back(serve_request):
    """pynetdicom's requestor runs a reactor thread beside the call that sent a request, and the
    reactor can take the response off the queue in the instant before that call sees it paused
    (pydicom/pynetdicom#875): it logs "Received unexpected C-STORE service message" and the call
    waits out its DIMSE timeout. A fast server makes that instant likely, so the tests' client
    hands such a response back to the queue the waiting call reads."""
    def serve_or_give_back(association, message, context_id):
        if association.is_requestor and not message.is_valid_request:
            association.dimse.msg_queue.put((context_id, message))
            return
        serve_request(association, message, context_id)
    return serve_or_give_back


pynetdicom.association.Association._serve_request = _give_responses_back(pynetdicom.association.Association._serve_request)


#: Every loopback port a test run has given out, and when, shared by the runs of this machine
#: (two suites at once, one per index engine, or in two working copies): a port is bound by
#: its daemon a moment after it is given, and in that moment the kernel may offer it again.
PORTS_GIVEN = pathlib.Path(f"/tmp/dicoogled-test-ports-{os.getuid()}")
PORT_MEMORY_SECONDS = 4 * 3600  # longer than a whole run


def free_port() -> int:
    """A loopback port free now and not given out before by this or another test run of the
    last hours: the kernel may hand the same free port to two binds in a row (a daemon's HTTP
    and DICOM ports, or two suites' daemons), so each is given once."""
    with open(PORTS_GIVEN, "a+") as registry:
        fcntl.flock(registry, fcntl.LOCK_EX)  # released when the file closes
        registry.seek(0)
        now = time.time()
        given = {}
        for line in registry:
            port, when = line.split()
            if now - float(when) < PORT_MEMORY_SECONDS:
                given[int(port)] = when
        while True:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            if port not in given:
                break
        given[port] = f"{now:.0f}"
        registry.seek(0)
        registry.truncate()
        registry.write("".join(f"{p} {when}\n" for p, when in given.items()))
        return port


def wait_until(predicate, timeout=30.0, interval=0.05, message="condition"):
    """Poll predicate until it returns a truthy value; fail the test after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(interval)


_SUITE_POSTGRES = []  # the server started for the suite on PostgreSQL, once, when first needed
_SUITE_DATABASES: dict[pathlib.Path, str] = {}


def suite_postgres_server():
    """The tests' PostgreSQL server (tests/pgserver.py), started on first use, stopped at the end."""
    if not _SUITE_POSTGRES:
        import pgserver
        _SUITE_POSTGRES.append(pgserver.PostgresServer(free_port()).start())
    return _SUITE_POSTGRES[0]


def pytest_sessionfinish(session):
    while _SUITE_POSTGRES:
        _SUITE_POSTGRES.pop().stop()


def suite_index_url(data_dir: pathlib.Path, config_text: str | None, args) -> str:
    """The database of a daemon's index when the suite runs on PostgreSQL: one per data dir, so
    a daemon started again on its data dir finds its index. "" on SQLite, and when the test
    chose the index itself (--index, or an [index] section in its config)."""
    if not ON_POSTGRESQL or "--index" in args or "[index]" in (config_text or ""):
        return ""
    if data_dir not in _SUITE_DATABASES:
        _SUITE_DATABASES[data_dir] = suite_postgres_server().database()
    return _SUITE_DATABASES[data_dir]


def index_flags(data_dir: pathlib.Path) -> list[str]:
    """The flag that puts an offline command (index, check...) on the index the daemons of data_dir
    run on: none for its SQLite file, --index and its database when the suite runs on PostgreSQL."""
    url = suite_index_url(data_dir, None, [])
    return ["--index", url] if url else []


def _rows_of(database, statement: str, parameters=(), schema: str = "") -> list[tuple]:
    """The rows of one statement (with ? placeholders), committed, on a PostgreSQL URL (in its
    schema, if given) or an SQLite file."""
    if isinstance(database, str) and database.startswith("postgresql://"):
        import psycopg
        with psycopg.connect(database, autocommit=True) as db:
            if schema:
                db.execute(f"SET search_path TO {schema}")
            cursor = db.execute(statement.replace("?", "%s"), parameters) if parameters else db.execute(statement)
            return cursor.fetchall() if cursor.description else []
    import apsw
    connection = apsw.Connection(str(database))
    try:
        return connection.execute(statement, parameters).fetchall()
    finally:
        connection.close()


class RunningDaemon:
    """A dicoogled process started by a test, on free loopback ports and its own data dir."""

    def __init__(self, data_dir: pathlib.Path, config_text: str | None = None, args=(), env=None):
        self.data_dir = data_dir
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.args = list(args)
        #: The PostgreSQL database of its index when the suite runs on PostgreSQL, else "".
        self.index_url = suite_index_url(data_dir, config_text, self.args)
        self.env = env
        self.config_path = None
        if config_text is not None:
            self.config_path = data_dir.parent / f"{data_dir.name}.ini"
            self.config_path.write_text(config_text)
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.process = None

    @property
    def command(self):
        command = [sys.executable, str(ROOT / "dicoogled.py"), "serve", "--data-dir", str(self.data_dir),
                   "--http-host", "127.0.0.1", "--http-port", str(self.http_port),
                   "--dicom-host", "127.0.0.1", "--dicom-port", str(self.dicom_port)]
        if self.config_path:
            command += ["--config", str(self.config_path)]
        return command + self.index_args + self.args

    @property
    def index_args(self) -> list[str]:
        """The flag that puts a command on this daemon's index (none for the SQLite file in its
        data dir): `dicoogled.py index --data-dir D *daemon.index_args`."""
        return ["--index", self.index_url] if self.index_url else []

    @property
    def index_location(self):
        """What dicoogled.Index opens for this daemon's index: its database URL or SQLite file."""
        return self.index_url or self.data_dir / "index.sqlite"

    @property
    def node_dir(self) -> pathlib.Path:
        """Where the daemon keeps its node's own files (tmp, cache): its data dir on SQLite, its
        one folder under data_dir/nodes when its index is in PostgreSQL (Config.node_dir)."""
        nodes = self.data_dir / "nodes"
        if not nodes.is_dir():
            return self.data_dir
        folder, = nodes.iterdir()
        return folder

    def index_sql(self, statement: str, parameters=()) -> list[tuple]:
        """The rows of a statement (with ? placeholders) on this daemon's index, behind its back,
        on either engine (a test reading it, or breaking it). Committed at once."""
        return _rows_of(self.index_url or self.index_location, statement, parameters)

    def state_sql(self, name: str, statement: str, parameters=()) -> list[tuple]:
        """The rows of a statement (with ? placeholders) on the daemon's own state, behind its
        back: name is users, audit or settings, the SQLite file data_dir/NAME.sqlite or, on
        PostgreSQL, the schema dicoogled_NAME of its index's database. Committed at once."""
        if self.index_url:
            return _rows_of(self.index_url, statement, parameters, schema=f"dicoogled_{name}")
        return _rows_of(self.data_dir / f"{name}.sqlite", statement, parameters)

    def start(self, wait=True):
        self.log_file = open(self.log_path, "ab")
        env = dict(os.environ, **(self.env or {}))
        self.process = subprocess.Popen(self.command, stdout=self.log_file, stderr=subprocess.STDOUT, env=env)
        if wait:
            wait_until(self._ready, timeout=60, message=f"dicoogled to start (log: {self.log_path})")
        return self

    def _ready(self):
        if self.process.poll() is not None:
            raise AssertionError(f"dicoogled exited with {self.process.returncode}:\n{self.log}")
        try:
            return self.health()
        except OSError:
            return None

    def health(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/health", timeout=5) as response:
            return json.load(response)

    def counts(self) -> dict:
        return self.health()["counts"]

    def settled(self) -> dict:
        """Wait until startup reconciliation and watched-folder work are done; return health."""
        def idle():
            health = self.health()
            return health if not health["watch"]["reconciling"] and not health["watch"]["pending"] else None
        return wait_until(idle, message="the daemon to settle")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout=30):
        """SIGTERM, as a service manager would; returns the exit code."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError("dicoogled did not stop on SIGTERM")
        self.log_file.close()
        return self.process.returncode

    def kill(self):
        """SIGKILL: a crash, with no chance to clean up."""
        self.process.kill()
        self.process.wait()
        self.log_file.close()

    def restart(self):
        self.stop()
        return self.start()

    # ---- DICOM clients -----------------------------------------------------------------------

    def find(self, identifier: Dataset | dict, model="study", aet=AET):
        """C-FIND with a pynetdicom SCU; returns (list of result data sets, final status)."""
        if isinstance(identifier, dict):
            identifier = make_identifier(**identifier)
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(FIND_MODELS[model])
        assoc = ae.associate("127.0.0.1", self.dicom_port, ae_title=aet, evt_handlers=NODELAY)
        assert assoc.is_established, "association rejected"
        results, final = [], None
        try:
            for status, ds in assoc.send_c_find(identifier, FIND_MODELS[model]):
                if status is None or "Status" not in status:
                    raise AssertionError("no C-FIND response (timeout or abort)")
                if status.Status in (0xFF00, 0xFF01):
                    results.append(ds)
                else:
                    final = status.Status
        finally:
            assoc.release()
        return results, final

    def store(self, *datasets_or_paths, aet=AET):
        """C-STORE with a pynetdicom SCU; returns the list of statuses."""
        items = [pydicom.dcmread(d) if isinstance(d, (str, pathlib.Path)) else d for d in datasets_or_paths]
        ae = AE(ae_title="TESTSCU")
        for ds in items:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", self.dicom_port, ae_title=aet, evt_handlers=NODELAY)
        assert assoc.is_established, "association rejected"
        try:
            return [assoc.send_c_store(ds).Status for ds in items]
        finally:
            assoc.release()

    def dcmtk(self, tool: str, *args, check=True, timeout=120) -> subprocess.CompletedProcess:
        """Run a DCMTK client (storescu, findscu, ...) against this daemon."""
        command = [tool, "-aet", "DCMTK", "-aec", AET, *args, "127.0.0.1", str(self.dicom_port)]
        result = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result


class StoreSCP:
    """A DCMTK storescp on a free loopback port: a C-MOVE or auto-routing destination that also
    answers C-ECHO, accepting every transfer syntax it knows (or, with compressed=False, the
    uncompressed ones only, as many viewers do)."""

    def __init__(self, folder: pathlib.Path, aet="DEST", compressed=True):
        self.folder, self.aet, self.port = folder, aet, free_port()
        folder.mkdir()
        self.process = subprocess.Popen(["storescp", *(["+xa"] if compressed else []), "-aet", aet, "-od", str(folder), str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._listening, message="storescp to listen")

    def _listening(self):
        if self.process.poll() is not None:
            raise AssertionError(f"storescp exited with {self.process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def datasets(self) -> dict:
        """SOPInstanceUID -> data set of every complete file storescp wrote."""
        found = {}
        for path in sorted(self.folder.iterdir()):
            try:
                ds = pydicom.dcmread(path)
            except Exception:  # still being written
                continue
            found[str(ds.SOPInstanceUID)] = ds
        return found

    def received(self) -> set:
        """SOPInstanceUIDs of the complete files storescp wrote."""
        return set(self.datasets())

    def stop(self):
        self.process.terminate()
        self.process.wait(10)


def _set_nodelay(event):
    # Without TCP_NODELAY every small DIMSE message of the client waits for a delayed ACK.
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


NODELAY = [(evt.EVT_CONN_OPEN, _set_nodelay)]


def rejection_of(assoc) -> tuple | None:
    """(result, source, reason) of the A-ASSOCIATE-RJ a pynetdicom association got, else None.

    pynetdicom 3.0 as a requestor can miss an A-ASSOCIATE-RJ that comes quickly: its DUL thread
    reads it and closes the socket before its ACSE thread has checked that the socket connected,
    so the association reads as aborted, the rejection left unread in the DUL's queue. It is
    looked for there too: it is what the daemon sent."""
    reply = assoc.acceptor.primitive if assoc.is_rejected else next(
        (item for item in list(assoc.dul.to_user_queue.queue)
         if isinstance(item, A_ASSOCIATE) and item.result in (0x01, 0x02)), None)
    return None if reply is None else (reply.result, reply.result_source, reply.diagnostic)


def make_identifier(level="STUDY", **keys) -> Dataset:
    """A C-FIND identifier: make_identifier('STUDY', PatientName='DOE*', StudyInstanceUID='')."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


@pytest.fixture
def start_daemon(tmp_path):
    """Factory: start_daemon(config_text=None, args=(), name='data') -> RunningDaemon."""
    started = []

    def start(config_text=None, args=(), name="data", env=None, wait=True):
        daemon = RunningDaemon(tmp_path / name, config_text, args, env)
        started.append(daemon)
        return daemon.start(wait=wait)

    yield start
    for daemon in started:
        if daemon.process and daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()


@pytest.fixture
def daemon(start_daemon):
    return start_daemon()


@pytest.fixture
def testdata():
    """Path of a file shipped with pydicom's wheel: testdata('CT_small.dcm')."""
    return lambda name: pathlib.Path(get_testdata_file(name))


@pytest.fixture
def studies(tmp_path):
    """Generated studies on disk: studies(patients=2, studies=2, series=2, instances=3) -> paths."""
    def make(out="generated", **kwargs):
        return studygen.generate(tmp_path / out, **kwargs)
    return make


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the whole run (tests/pgserver.py), stopped at the end."""
    return suite_postgres_server()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The URL of a new, empty PostgreSQL database on the tests' server."""
    return postgres_server.database()
