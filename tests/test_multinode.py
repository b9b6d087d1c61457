"""Several nodes: dicoogled processes sharing one PostgreSQL index and one data dir, as a site
that outgrows one machine runs them (README, "Several nodes").

Each node is a real `dicoogled serve` on loopback ports of its own, started with `--index URL`
(conftest's real PostgreSQL), the same `--data-dir` and a `[node] name` of its own; clients are
real (pynetdicom, DCMTK's storescu and storescp, HTTP). A node that crashes is killed with
SIGKILL, by the PID of the process this test started.
"""

import email.parser
import email.policy
import hashlib
import hmac
import http.server
import io
import json
import subprocess
import textwrap
import threading

import pydicom
import pytest
import requests
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelMove

import dicoogled
import studygen
from conftest import NODELAY, RunningDaemon, StoreSCP, make_identifier, wait_until
from restclient import ADMIN_ENV, ADMIN_PASSWORD, Client, admin_client, base_url, stow
from test_tasks import HOLD, completed, listed, start_index_task

#: How long another node may take to take a dead node's work over: it asks for the lease every
#: LEASE_POLL_SECONDS; the server ends a killed node's session as soon as its socket closes.
TAKEOVER_DEADLINE = dicoogled.LEASE_POLL_SECONDS * 3 + 10
SECRET = "several-nodes-one-secret"
#: Seconds without a new instance before a study is stable (the work leased as "stable studies").
STABLE_AGE = 1


class Receiver:
    """A webhook endpoint on a free loopback port, keeping the JSON body of every delivery."""

    def __init__(self):
        self.bodies = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
                if self.headers["X-Dicoogled-Signature"] == expected:
                    with receiver.lock:
                        receiver.bodies.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stable_studies(self) -> list[str]:
        """The StudyInstanceUID of each stable_study event delivered, in order."""
        with self.lock:
            return [body["data"]["StudyInstanceUID"] for body in self.bodies if body["event"] == "stable_study"]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Site:
    """One PostgreSQL database, one data dir, one webhook receiver, and the nodes started on
    them: node(name) starts one more; every node knows the C-MOVE destinations of every other."""

    def __init__(self, tmp_path, postgres_url):
        self.tmp_path, self.url = tmp_path, postgres_url
        self.data_dir = tmp_path / "shared"
        self.receiver = Receiver()
        self.destinations = {f"DEST{i}": StoreSCP(tmp_path / f"dest{i}", aet=f"DEST{i}") for i in range(1, 5)}
        self.nodes: list[RunningDaemon] = []

    def config(self, name: str) -> str:
        modalities = "".join(f"{aet} = 127.0.0.1:{scp.port}\n" for aet, scp in self.destinations.items())
        return (f"[node]\nname = {name}\n"
                f"[plugins]\nstable_age = {STABLE_AGE}\n"
                f"[webhooks]\nreceiver = url={self.receiver.url} events=stable_study secret={SECRET} retry=0.2..0.5\n"
                f"[modalities]\n{modalities}")

    def node(self, name: str, wait=True, env=ADMIN_ENV, args=()) -> RunningDaemon:
        config = self.tmp_path / f"{name}.ini"
        config.write_text(self.config(name))
        daemon = RunningDaemon(self.data_dir, args=["--index", self.url, "--config", str(config), *args], env=env)
        daemon.log_path = self.tmp_path / f"{name}.log"
        daemon.name = name
        self.nodes.append(daemon)
        return daemon.start(wait=wait)

    def close(self):
        for daemon in self.nodes:
            if daemon.process and daemon.process.poll() is None:
                daemon.process.kill()  # by the PID this test started
                daemon.process.wait()
        for scp in self.destinations.values():
            scp.stop()
        self.receiver.close()


@pytest.fixture
def site(tmp_path, postgres_url):
    site = Site(tmp_path, postgres_url)
    yield site
    site.close()


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory, postgres_server):
    """Three running nodes, shared by the tests that neither stop one nor count what another stored."""
    site = Site(tmp_path_factory.mktemp("three-nodes"), postgres_server.database())
    site.running = start_nodes(site, "node1", "node2", "node3")
    yield site
    site.close()


def start_nodes(site, *names, env=ADMIN_ENV, args=()) -> list[RunningDaemon]:
    """Nodes started at once, as after a power cut: each may be the first to the shared database."""
    nodes = [site.node(name, wait=False, env=env, args=args) for name in names]
    for daemon in nodes:
        wait_until(daemon._ready, timeout=60, message=f"{daemon.name} to start (log: {daemon.log_path})")
    return nodes


def owner_of(nodes, lease: str) -> RunningDaemon:
    """The node that says it owns lease, once one does; no other says so."""
    def owners():
        return [daemon for daemon in nodes if f"this node ({daemon.name}) now owns {lease}" in daemon.log]
    found = wait_until(owners, message=f"a node to own {lease}")
    assert len(found) == 1, [daemon.name for daemon in found]
    return found[0]


# ---- what every node finds and retrieves -------------------------------------------------------


def image_uids(daemon, **keys) -> set[str]:
    """SOPInstanceUIDs a C-FIND at IMAGE level finds on daemon (study root, so per study)."""
    found = set()
    for study in study_uids(daemon, **keys):
        results, status = daemon.find(make_identifier("IMAGE", StudyInstanceUID=study, SeriesInstanceUID="", SOPInstanceUID=""))
        assert status == 0
        found |= {str(ds.SOPInstanceUID) for ds in results}
    return found


def study_uids(daemon, **keys) -> set[str]:
    results, status = daemon.find(make_identifier("STUDY", StudyInstanceUID="", **keys))
    assert status == 0
    return {str(ds.StudyInstanceUID) for ds in results}


def qido_instances(daemon, study: str, auth=("admin", ADMIN_PASSWORD)) -> set[str]:
    response = requests.get(f"{base_url(daemon)}/dicom-web/studies/{study}/instances", auth=auth, timeout=30)
    assert response.status_code == 200, response.text
    return {item["00080018"]["Value"][0] for item in response.json()}


def wado_instances(daemon, study: str, auth=("admin", ADMIN_PASSWORD)) -> set[str]:
    """The SOPInstanceUIDs of the parts of WADO-RS's multipart answer for the study."""
    response = requests.get(f"{base_url(daemon)}/dicom-web/studies/{study}", auth=auth, timeout=60,
                            headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert response.status_code == 200, response.text[:300]
    head = f"Content-Type: {response.headers['Content-Type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + response.content)
    parts = [part.get_payload(decode=True) for part in message.iter_parts()]
    return {str(pydicom.dcmread(io.BytesIO(part)).SOPInstanceUID) for part in parts}


def move_study(daemon, study: str, destination: str) -> tuple[int, int]:
    """C-MOVE of a study to destination; returns (final status, completed sub-operations)."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title="DICOOGLED", evt_handlers=NODELAY)
    assert assoc.is_established
    try:
        final = None
        for status, _ in assoc.send_c_move(make_identifier("STUDY", StudyInstanceUID=study), destination,
                                            StudyRootQueryRetrieveInformationModelMove):
            final = status
    finally:
        assoc.release()
    return final.Status, final.get("NumberOfCompletedSuboperations", 0)


def test_stores_spread_over_three_nodes_are_found_and_retrieved_from_every_node(three_nodes):
    site, nodes = three_nodes, three_nodes.running
    # One study per node over DICOM (pynetdicom to node 1 and node 3, DCMTK's storescu to node 2),
    # and one over STOW-RS to node 2: 4 studies of 3 instances.
    studies = {}
    for number, daemon in enumerate(nodes, start=1):
        datasets = [studygen.make_instance(number, 0, 0, i) for i in range(3)]
        studies[str(datasets[0].StudyInstanceUID)] = {str(ds.SOPInstanceUID) for ds in datasets}
        if number == 2:
            files = [site.tmp_path / f"storescu-{i}.dcm" for i in range(len(datasets))]
            for path, ds in zip(files, datasets):
                pydicom.dcmwrite(path, ds, enforce_file_format=True)
            subprocess.run(["storescu", "-aet", "DCMTK", "-aec", "DICOOGLED", "127.0.0.1", str(daemon.dicom_port), *map(str, files)],
                           check=True, capture_output=True, timeout=60)
        else:
            assert daemon.store(*datasets) == [0, 0, 0]
    stowed = [studygen.make_instance(4, 0, 0, i) for i in range(3)]
    studies[str(stowed[0].StudyInstanceUID)] = {str(ds.SOPInstanceUID) for ds in stowed}
    assert stow(nodes[1], admin_client(nodes[1]).token, *stowed).status == 200
    every_instance = set().union(*studies.values())
    assert len(studies) == 4 and len(every_instance) == 12

    for number, daemon in enumerate(nodes, start=1):
        assert daemon.counts()["instances"] == 12 and daemon.counts()["studies"] == 4
        assert study_uids(daemon) == set(studies)
        assert image_uids(daemon) == every_instance
        for study, instances in studies.items():
            assert qido_instances(daemon, study) == instances
            assert wado_instances(daemon, study) == instances
            status, completed = move_study(daemon, study, f"DEST{number}")
            assert (status, completed) == (0, 3)
        assert site.destinations[f"DEST{number}"].received() == every_instance


# ---- a node killed while a client stores to it -------------------------------------------------


class StoringClient:
    """A modality storing one instance after another to a node over one association, in a
    thread, keeping the SOPInstanceUIDs it got Success for; it stops at the first failure."""

    def __init__(self, daemon, patient: int):
        self.daemon, self.patient = daemon, patient
        self.succeeded: list[str] = []
        self.study = str(studygen.make_instance(patient, 0, 0, 0).StudyInstanceUID)
        self.thread = threading.Thread(target=self._store, daemon=True)
        self.thread.start()

    def _store(self):
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", self.daemon.dicom_port, ae_title="DICOOGLED", evt_handlers=NODELAY)
        try:
            for number in range(10_000):
                ds = studygen.make_instance(self.patient, 0, 0, number)
                status = assoc.send_c_store(ds)
                if status.get("Status") != 0:
                    return
                self.succeeded.append(str(ds.SOPInstanceUID))
        finally:
            assoc.release()


def test_a_node_killed_while_storing_loses_no_acknowledged_instance_and_its_work_is_taken_over(site):
    started = start_nodes(site, "node1", "node2", "node3")
    # The node that owns the finding of stable studies is the one killed; nodes[1:] survive.
    owner = owner_of(started, "stable studies")
    nodes = [owner, *(daemon for daemon in started if daemon is not owner)]
    client = StoringClient(nodes[0], patient=7)
    wait_until(lambda: len(client.succeeded) >= 20, message="the client to store 20 instances")
    nodes[0].kill()  # SIGKILL, by the PID of the process this test started
    client.thread.join(timeout=60)
    assert not client.thread.is_alive()
    acknowledged = set(client.succeeded)
    assert len(acknowledged) >= 20
    for survivor in nodes[1:]:
        found = image_uids(survivor, PatientID=str(studygen.make_instance(7, 0, 0, 0).PatientID))
        assert acknowledged <= found  # what may be more: an instance indexed whose Success the client never got
        assert len(found) - len(acknowledged) <= 1
    # The killed node's stable-study detection is another node's now: the study it was
    # receiving, and a study stored afterwards, are announced (and delivered) within the deadline.
    later = [studygen.make_instance(8, 0, 0, i) for i in range(2)]
    assert nodes[2].store(*later) == [0, 0]
    expected = {client.study, str(later[0].StudyInstanceUID)}
    wait_until(lambda: expected <= set(site.receiver.stable_studies()), timeout=TAKEOVER_DEADLINE + STABLE_AGE,
               message="another node to find the stable studies")
    assert owner_of(nodes[1:], "stable studies") is not None


# ---- tasks are the site's: listed, stopped and taken over anywhere ------------------------------


@pytest.fixture
def held_nodes(site):
    """Three nodes with test_tasks' HOLD plugin, which holds index tasks at a gate (site.gate_folder)."""
    plugins = site.tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "hold.py").write_text(textwrap.dedent(HOLD.format(folder=str(plugins))))
    site.gate_folder = plugins
    return start_nodes(site, "node1", "node2", "node3", args=["--plugins-dir", str(plugins)])


def test_an_index_task_of_a_killed_node_is_listed_everywhere_and_completed_by_another(site, held_nodes, studies):
    node1, node2, node3 = held_nodes
    folder = studies(patients=1, studies=1, series=1, instances=4)[0].parent
    uid = start_index_task(admin_client(node1), folder)
    wait_until(lambda: (site.gate_folder / "reached-index").exists(), message="the task to reach the gate")
    for daemon in (node2, node3):
        report = listed(admin_client(daemon))[uid]
        assert not report.get("complete") and report["taskName"].endswith(folder.as_uri())
    node1.kill()  # SIGKILL, by the PID this test started
    (site.gate_folder / "gate").touch()
    report = wait_until(completed(admin_client(node2), uid), timeout=TAKEOVER_DEADLINE + 30,
                        message="another node to run the task again and complete it")
    assert report["nIndexed"] == 4 and report["nErrors"] == 0
    takers = [daemon for daemon in (node2, node3) if f"index task {uid}, left unfinished by node node1" in daemon.log]
    assert len(takers) == 1, "one node, and only one, runs it again"
    assert listed(admin_client(node3))[uid] == report
    assert node3.counts()["instances"] == 4


def test_a_task_stopped_on_another_node_stops_where_it_runs(site, held_nodes, studies):
    node1, node2, node3 = held_nodes
    folder = studies(patients=1, studies=1, series=1, instances=3)[0].parent
    uid = start_index_task(admin_client(node1), folder)
    wait_until(lambda: (site.gate_folder / "reached-index").exists(), message="the task to reach the gate")
    assert admin_client(node2).post("/index/task", data={"type": "stop", "uid": uid}).json() == {"stopped": True}
    wait_until(lambda: f"task {uid}: asked to stop on another node" in node1.log, message="node 1 to read the request")
    (site.gate_folder / "gate").touch()
    report = wait_until(completed(admin_client(node3), uid), message="the task to end, stopped")
    assert report["canceled"] and report["nIndexed"] == 1  # the file at the gate, then it stopped
    assert admin_client(node3).post("/index/task", data={"type": "close", "uid": uid}).json() == {"removed": True}
    assert uid not in listed(admin_client(node1))


# ---- sessions are the site's, not a node's -----------------------------------------------------


def test_a_session_opened_on_one_node_works_on_another_and_ends_when_another_deletes_its_user(three_nodes):
    node1, node2, node3 = three_nodes.running
    assert admin_client(node1).post("/user", {"username": "alice", "password": "alice-pw-1", "admin": "false"}).json() == {"success": True}
    alice = Client(base_url(node1))
    alice.login("alice", "alice-pw-1")
    on_node3 = alice.as_user(alice.token)
    on_node3.base = base_url(node3)
    assert on_node3.get("/login").json()["user"] == "alice"
    assert on_node3.get("/search", query="*:*").status == 200
    assert admin_client(node2).delete("/user/alice").json() == {"success": True}
    assert on_node3.get("/login").status == 401
    assert on_node3.get("/search", query="*:*").status == 401
    assert alice.get("/login").status == 401  # on node 1, where it was opened, too


def test_failed_logins_on_every_node_count_together(three_nodes):
    """A client spreading its guesses over the nodes behind one address has five in all, not
    five per node; a correct login on any node clears its count on all."""
    node1, node2, node3 = three_nodes.running
    assert admin_client(node1).post("/user", {"username": "carol", "password": "carol-pw-1", "admin": "false"}).json() == {"success": True}

    def login(node, password):
        return Client(base_url(node)).request("POST", "/login", data={"username": "carol", "password": password},
                                              auth=None).status

    assert [login(node, "wrong") for node in (node1, node2, node1)] == [401, 401, 401]
    assert login(node3, "carol-pw-1") == 200, "a success clears the count"
    assert [login(node, f"wrong{i}") for i, node in enumerate((node1, node2, node3, node1, node2))] == [401] * 5
    assert login(node3, "carol-pw-1") == 429, "the sixth try, on a node that saw none of the five"
    assert login(node1, "carol-pw-1") == 429


# ---- a node added while the others run ---------------------------------------------------------


def test_a_node_added_while_the_others_run_sees_everything(site):
    """Started at once with no DICOOGLED_ADMIN_PASSWORD, the nodes make one administrator, whose
    password is in data_dir/admin-password.txt, the shared data dir."""
    no_password = {"DICOOGLED_ADMIN_PASSWORD": ""}
    running = start_nodes(site, "node1", "node2", env=no_password)
    password = (site.data_dir / "admin-password.txt").read_text().strip()
    auth = ("admin", password)
    for daemon in running:
        Client(base_url(daemon)).login(*auth)
    datasets = [studygen.make_instance(9, 0, 0, i) for i in range(4)]
    assert running[0].store(*datasets[:2]) == [0, 0]
    assert running[1].store(*datasets[2:]) == [0, 0]
    study = str(datasets[0].StudyInstanceUID)
    every_instance = {str(ds.SOPInstanceUID) for ds in datasets}
    added = site.node("node3", wait=False, env=no_password)
    # While the new node starts, the running ones go on answering: no downtime.
    while not added._ready():
        for daemon in running:
            assert daemon.health()["status"] == "ok"
            assert image_uids(daemon) == every_instance
    assert added.counts()["instances"] == 4
    assert image_uids(added) == every_instance
    assert qido_instances(added, study, auth) == wado_instances(added, study, auth) == every_instance
    assert move_study(added, study, "DEST3") == (0, 4)
    assert site.destinations["DEST3"].received() == every_instance
    # What it stores, the others find.
    more = studygen.make_instance(9, 0, 0, 4)
    assert added.store(more) == [0]
    for daemon in running:
        assert image_uids(daemon) == every_instance | {str(more.SOPInstanceUID)}


# ---- settings changed at run time --------------------------------------------------------------


def add_destination(daemon, aet: str, port: int):
    answer = admin_client(daemon).post("/management/settings/storage/dicom", {"type": "add", "aetitle": aet, "ip": "127.0.0.1", "port": str(port)})
    assert answer.json() == {"added": True}


def destinations(daemon) -> set[str]:
    return {item["AETitle"] for item in admin_client(daemon).get("/management/settings/storage/dicom").json()}


def test_a_move_destination_added_on_one_node_is_every_nodes(three_nodes, tmp_path):
    """Saved in the shared database, the destination is followed by the running nodes; one
    added on another node afterwards keeps it (a node saves [modalities] whole: from what it
    last read, it would drop a destination it had not seen)."""
    node1, node2, node3 = three_nodes.running
    late = StoreSCP(tmp_path / "late", aet="LATE")
    try:
        ds = studygen.make_instance(11, 0, 0, 0)
        assert node1.store(ds) == [0]
        add_destination(node1, "LATE", late.port)
        wait_until(lambda: "LATE" in destinations(node3), timeout=10, message="node 3 to follow the new destination")
        assert move_study(node3, str(ds.StudyInstanceUID), "LATE") == (0, 1)
        assert late.received() == {str(ds.SOPInstanceUID)}
        add_destination(node2, "LATER", late.port)
        for daemon in (node1, node2, node3):
            wait_until(lambda: {"LATE", "LATER"} <= destinations(daemon), timeout=10, message="every node to know both")
    finally:
        late.stop()
