"""Several nodes: once-only work owned through leases, node-local folders, one serve per data dir.

Leases are tested against a real PostgreSQL server (conftest's postgres_url): two Leases objects
stand for two nodes; a node that dies is a child process killed with SIGKILL, by its PID.
"""

import concurrent.futures
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import dicoogled
import studygen
from conftest import ROOT, RunningDaemon, free_port, wait_until

#: How long a takeover may take in these tests: the survivor tries every LEASE_POLL_SECONDS.
TAKEOVER_DEADLINE = dicoogled.LEASE_POLL_SECONDS * 3 + 10

#: A node that takes a lease, says so in a file, and runs until it is killed.
LEASE_HOLDER = """
import pathlib, sys, time
sys.path.insert(0, {root!r})
import dicoogled
leases = dicoogled.Leases({url!r}, "holder")
assert leases.owns({name!r})
pathlib.Path({said!r}).write_text("owns")
time.sleep(600)
"""


@pytest.fixture
def nodes(postgres_url):
    """Factory: nodes(name) -> a Leases of the tests' database, closed at the end."""
    made = []

    def node(name):
        made.append(dicoogled.Leases(postgres_url, name))
        return made[-1]

    yield node
    for leases in made:
        leases.close()


def test_one_node_owns_a_lease_and_another_takes_it_when_it_is_closed(nodes):
    first, second = nodes("first"), nodes("second")
    assert first.owns("stable studies")
    assert not second.owns("stable studies")
    assert first.owns("stable studies")  # asked again, still the owner
    assert second.owns("webhook deliveries")  # another name is another lease
    assert not first.owns("webhook deliveries")
    first.close()
    assert not first.owns("stable studies")
    wait_until(lambda: second.owns("stable studies"), timeout=TAKEOVER_DEADLINE, message="the second node to take over")


def test_a_released_lease_is_free_for_another_node(nodes):
    first, second = nodes("first"), nodes("second")
    assert first.owns("watch /srv/incoming")
    assert not second.owns("watch /srv/incoming")
    first.release("watch /srv/incoming")
    assert second.owns("watch /srv/incoming")
    assert not first.owns("watch /srv/incoming")


def test_a_killed_owner_is_taken_over(nodes, postgres_url, tmp_path):
    """SIGKILL leaves no chance to release anything: the server ends the dead node's session,
    and with it its advisory lock; the survivor, trying again, takes the work over."""
    said = tmp_path / "holder-owns"
    code = LEASE_HOLDER.format(root=str(ROOT), url=postgres_url, name="retention", said=str(said))
    holder = subprocess.Popen([sys.executable, "-c", code])
    try:
        wait_until(lambda: said.exists() or holder.poll() is not None, message="the child node to take the lease")
        assert said.exists(), f"the child node exited with {holder.returncode}"
        survivor = nodes("survivor")
        assert not survivor.owns("retention")  # the same name is the same lock in another process
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        stop = threading.Event()
        timer = threading.Timer(TAKEOVER_DEADLINE, stop.set)
        timer.start()
        try:
            assert survivor.wait_to_own("retention", stop), "not taken over within the deadline"
        finally:
            timer.cancel()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_node_that_lost_its_connection_stops_claiming(nodes, postgres_url):
    """The owner's session is ended by the server (as when its network fails): asked again, it
    says it owns nothing, and the other node takes the lease."""
    owner, other = nodes("owner"), nodes("other")
    assert owner.owns("reconcile storage")
    psycopg, _ = dicoogled.import_psycopg()
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        ended = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                              ("dicoogled owner",)).fetchall()
    assert ended == [(True,)]
    assert not owner.owns("reconcile storage")
    wait_until(lambda: other.owns("reconcile storage"), timeout=TAKEOVER_DEADLINE, message="the other node to take over")
    assert not owner.owns("reconcile storage")  # connected again, it finds the lease taken


def test_a_node_that_cannot_reach_the_database_owns_nothing_and_says_so_once(caplog):
    leases = dicoogled.Leases(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere", "cut-off")  # nothing listens
    with caplog.at_level("WARNING", logger="dicoogled.nodes"):
        assert not leases.owns("stable studies")
        assert not leases.owns("stable studies")
    assert [record.getMessage().startswith("cannot take leases now") for record in caplog.records] == [True]
    leases.close()


def test_lease_keys_are_stable_and_namespaced():
    """The key is a function of the name alone (the child process above relies on it too)."""
    assert dicoogled.lease_key("retention") == dicoogled.lease_key("retention")
    assert dicoogled.lease_key("retention") != dicoogled.lease_key("stable studies")
    assert -2**31 <= dicoogled.lease_key("watch /srv/incoming") < 2**31


def test_with_the_sqlite_index_the_one_node_owns_everything():
    one, another = dicoogled.Leases(), dicoogled.Leases("")
    assert one.owns("stable studies") and another.owns("stable studies")
    assert one.wait_to_own("retention", threading.Event())
    one.release("retention")
    one.close()
    assert another.owns("retention")


# ---- once-only work: a watched folder ----------------------------------------------------------


class Node:
    """What a node needs to watch a folder: its own index (SQLite here: what is tested is who
    watches, not where the index lives), its data dir, and its Leases of the shared database."""

    def __init__(self, root: pathlib.Path, leases: dicoogled.Leases, folder: pathlib.Path):
        root.mkdir()
        self.index = dicoogled.Index(root / "index.sqlite")
        self.ingest = dicoogled.Ingest(self.index, dicoogled.Storage(root, fsync=False))
        self.watcher = dicoogled.FolderWatcher(self.ingest, [folder], quiet_period=0.5, leases=leases)
        self.watcher.start()

    def indexed(self) -> int:
        return self.index.counts()["instances"]

    def close(self):
        self.watcher.stop()
        self.index.close()


def test_one_node_watches_a_folder_and_another_takes_it_over(nodes, tmp_path):
    """Both nodes are told to watch the folder: the first to start owns it, indexes what it
    holds and what arrives; the other indexes nothing until the first dies, then reconciles the
    folder and follows it."""
    folder = (tmp_path / "incoming").resolve()
    folder.mkdir()
    files = studygen.generate(tmp_path / "generated", patients=1, studies=1, series=1, instances=4)
    shutil.copy(files[0], folder)
    first_leases = nodes("first")
    first = Node(tmp_path / "first", first_leases, folder)
    second = Node(tmp_path / "second", nodes("second"), folder)
    try:
        wait_until(lambda: first.indexed() == 1, message="the owner to reconcile the folder")
        shutil.copy(files[1], folder)
        wait_until(lambda: first.indexed() == 2, message="the owner to index a new file")
        assert second.indexed() == 0 and not second.watcher.reconciling
        assert first.watcher.watched == [folder] and second.watcher.watched == []
        first_leases.close()  # the first node's connection ends, as when it dies
        shutil.copy(files[2], folder)
        wait_until(lambda: second.indexed() == 3, timeout=TAKEOVER_DEADLINE, message="the second node to take over")
        assert second.watcher.watched == [folder]
        wait_until(lambda: not first.watcher.watched, timeout=TAKEOVER_DEADLINE, message="the first node to stop watching")
        shutil.copy(files[3], folder)
        wait_until(lambda: second.indexed() == 4, message="the new owner to index a new file")
        assert first.indexed() <= 3  # stopped watching when it lost its lease (it may have seen the third file)
    finally:
        first.close()
        second.close()


# ---- node-local state --------------------------------------------------------------------------


def test_with_the_sqlite_index_the_layout_is_one_machines(tmp_path):
    config = dicoogled.Config.load(data_dir=tmp_path / "data")
    assert config.node_dir == tmp_path / "data"
    storage = dicoogled.Storage(config.data_dir, node_dir=config.node_dir)
    assert storage.tmp == (tmp_path / "data" / "tmp").resolve()
    assert storage.root == (tmp_path / "data" / "storage").resolve()


def test_with_a_postgresql_index_each_node_has_its_own_folder(tmp_path, postgres_url):
    """Temp files and caches go to data_dir/nodes/NAME; the storage folder stays shared. A node
    starting sweeps its own temp folder, never the files another node is writing."""
    url = postgres_url
    first = dicoogled.Config.load(data_dir=tmp_path / "data", index_url=url)
    first.node_name = "first"
    second = dicoogled.Config.load(data_dir=tmp_path / "data", index_url=url, http_port=8081)
    assert first.node_dir == tmp_path / "data" / "nodes" / "first"
    assert second.node == f"{socket.gethostname()}-8081" and second.node_dir == tmp_path / "data" / "nodes" / second.node
    second_storage = dicoogled.Storage(second.data_dir, node_dir=second.node_dir)
    being_written, _ = second_storage.write_temp(b"half a store")
    assert pathlib.Path(being_written).parent == (second.node_dir / "tmp").resolve()
    first_storage = dicoogled.Storage(first.data_dir, node_dir=first.node_dir)  # sweeps its own tmp at start
    assert first_storage.tmp == (first.node_dir / "tmp").resolve() != second_storage.tmp
    assert first_storage.root == second_storage.root == (tmp_path / "data" / "storage").resolve()
    assert pathlib.Path(being_written).read_bytes() == b"half a store"
    stored = first_storage.path_for("1.2.3", "1.2.3.4", "1.2.3.4.5")
    first_storage.write(stored, b"DICM")  # a temp file of its own, renamed into the shared folder
    assert stored.read_bytes() == b"DICM" and not list(first_storage.tmp.iterdir())


@pytest.mark.parametrize("name", ["..", ".hidden", "a/b", "x" * 65, "é"])
def test_a_node_name_is_one_safe_folder_name(tmp_path, name):
    config = tmp_path / "node.ini"
    config.write_text(f"[node]\nname = {name}\n", encoding="utf-8")
    result = subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "check", "--config", str(config),
                             "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid [node] name" in result.stderr and "Traceback" not in result.stderr
    config.write_text("[node]\nname = node-1.lab_b\n", encoding="utf-8")
    assert dicoogled.Config.load(config).node == "node-1.lab_b"


# ---- one serve per data dir (SQLite), per node (PostgreSQL) ----------------------------------


def serve_again(first) -> subprocess.CompletedProcess:
    """A second `serve` of the first's archive, on ports of its own: on its data dir and index,
    and with a PostgreSQL index as the same node (its [node] name). It must end at once."""
    config = []
    if first.index_url:
        path = first.data_dir.parent / "same-node.ini"
        path.write_text(f"[node]\nname = {first.node_dir.name}\n", encoding="utf-8")
        config = ["--config", str(path)]
    return subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "serve", "--data-dir", str(first.data_dir),
                           "--http-host", "127.0.0.1", "--http-port", str(free_port()),
                           "--dicom-host", "127.0.0.1", "--dicom-port", str(free_port()), *config, *first.index_args],
                          capture_output=True, text=True, timeout=120)


def test_a_second_serve_on_one_data_dir_is_refused_while_the_first_runs(start_daemon, studies):
    first = start_daemon()
    first.settled()
    assert first.store(*studies(patients=1, studies=1, series=1, instances=2)) == [0, 0]
    refused = serve_again(first)
    assert refused.returncode == 1
    assert f"cannot start: {first.node_dir} is in use by another dicoogled serve (PID {first.process.pid})" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert first.health()["status"] == "ok" and first.counts()["instances"] == 2  # unharmed
    # An offline command still reads the archive while it is served.
    check = subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "check", "--data-dir", str(first.data_dir),
                            *first.index_args], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert first.stop() == 0
    second = start_daemon(name="data")  # the same data dir, now free
    assert second.counts()["instances"] == 2
    # Killed, with no chance to release anything, it leaves no lock behind: the OS drops it.
    second.kill()
    third = start_daemon(name="data")
    assert third.counts()["instances"] == 2
    assert third.stop() == 0


def offline(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_reindex_and_migrate_wait_for_the_nodes_to_stop_and_the_nodes_for_them(tmp_path, postgres_url, studies):
    """Nodes hold the serving lock shared; reindex and migrate of a PostgreSQL index take it
    alone (as serve.lock does on one machine): either runs only while the other does not."""
    config = tmp_path / "alpha.ini"
    config.write_text("[node]\nname = alpha\n")
    node = RunningDaemon(tmp_path / "shared", args=["--index", postgres_url, "--config", str(config)]).start()
    try:
        assert node.store(*(studygen.make_instance(5, 0, 0, i) for i in range(2))) == [0, 0]
        refused = offline("reindex", "--data-dir", node.data_dir, "--index", postgres_url)
        assert refused.returncode == 1
        assert "dicoogled nodes serve this PostgreSQL index (alpha): reindex works on a stopped archive" in refused.stderr
        sqlite_dir = tmp_path / "one-machine"
        assert offline("index", "--data-dir", sqlite_dir, studies(patients=1, studies=1, series=1, instances=1)[0]).returncode == 0
        refused = offline("migrate", "--data-dir", sqlite_dir, "--to", postgres_url, "--force")
        assert refused.returncode == 1 and "(alpha): migrate works on a stopped archive" in refused.stderr
        assert node.health()["status"] == "ok" and node.counts()["instances"] == 2  # unharmed
    finally:
        assert node.stop() == 0
    held = dicoogled.hold_database_alone(postgres_url, "reindex")  # as a reindex under way holds it
    try:
        node.start(wait=False)
        assert node.process.wait(timeout=120) == 1
        assert "a dicoogled reindex or migrate has the PostgreSQL index to itself" in node.log
    finally:
        held.close()
    done = offline("reindex", "--data-dir", node.data_dir, "--index", postgres_url)
    assert done.returncode == 0, done.stderr
    node.start()
    assert node.counts()["instances"] == 2
    assert node.stop() == 0


def test_nodes_making_a_patients_pseudonym_at_once_make_one(postgres_url, tmp_path):
    """The pseudonym map is the site's (schema dicoogled_pseudonyms): maps of several nodes, each
    making the same new patient's pseudonym at the same moment, all get the one that was stored,
    and derive the same UIDs from the one secret."""
    maps = [dicoogled.PseudonymMap(postgres_url) for _ in range(4)]
    try:
        patient = studygen.make_instance(41, 0, 0, 0)
        start = threading.Barrier(len(maps))

        def make(pseudonyms):
            start.wait()
            return pseudonyms.patient(patient), pseudonyms.replacement_uid(str(patient.SOPInstanceUID))

        with concurrent.futures.ThreadPoolExecutor(len(maps)) as pool:
            made = list(pool.map(make, maps))
        assert len(set(made)) == 1, made
        assert [row.pseudonym for row in maps[0].patients()] == [made[0][0].pseudonym]
    finally:
        for pseudonyms in maps:
            pseudonyms.close()


# ---- once-only work in the daemon --------------------------------------------------------------


def test_the_daemon_finds_stable_studies_only_while_it_owns_that_work(nodes, tmp_path):
    """A daemon in this process (SQLite index: the PostgreSQL one is not there yet) given the
    Leases of a node: while another node owns "stable studies", its studies are not announced;
    once that node is gone, the daemon takes the work over and announces them."""
    config = dicoogled.Config.load(data_dir=tmp_path / "data", http_host="127.0.0.1", http_port=0)
    config.dicom_autostart, config.stable_age = False, 0.2
    other = nodes("other")
    assert other.owns("stable studies")
    daemon = dicoogled.Daemon(config)
    daemon.leases.close()
    daemon.leases = nodes("daemon")
    try:
        daemon.start()
        path = studygen.generate(tmp_path / "generated", patients=1, studies=1, series=1, instances=1)[0]
        assert daemon.ingest.index_file(pathlib.Path(path), "index")
        quiet = lambda: [study.study_instance_uid for study in daemon.index.quiet_studies(time.time())]  # noqa: E731
        wait_until(quiet, message="the study to be quiet for stable_age")
        # Several rounds of the search for stable studies (one every stable_age / 4) find nothing to do.
        deadline = time.monotonic() + 10 * config.stable_age
        while time.monotonic() < deadline:
            assert quiet(), "announced stable by a node that does not own that work"
            time.sleep(config.stable_age / 4)
        other.close()
        wait_until(lambda: not quiet(), timeout=TAKEOVER_DEADLINE, message="the daemon to take the work over")
    finally:
        daemon.stop()
