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
import threading

import pydicom
import pytest
import requests
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelMove

import dicoogled
import studygen
from conftest import NODELAY, RunningDaemon, StoreSCP, make_identifier, wait_until
from restclient import ADMIN_ENV, ADMIN_PASSWORD, Client, admin_client, base_url

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

    def node(self, name: str, wait=True) -> RunningDaemon:
        config = self.tmp_path / f"{name}.ini"
        config.write_text(self.config(name))
        daemon = RunningDaemon(self.data_dir, args=["--index", self.url, "--config", str(config)], env=ADMIN_ENV)
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


def start_nodes(site, *names) -> list[RunningDaemon]:
    """The first node alone (it creates the administrator in the shared database), then the others at once."""
    first = site.node(names[0])
    others = [site.node(name, wait=False) for name in names[1:]]
    for daemon in others:
        wait_until(daemon._ready, timeout=60, message=f"{daemon.name} to start (log: {daemon.log_path})")
    return [first, *others]


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


def qido_instances(daemon, study: str) -> set[str]:
    response = requests.get(f"{base_url(daemon)}/dicom-web/studies/{study}/instances", auth=("admin", ADMIN_PASSWORD), timeout=30)
    assert response.status_code == 200, response.text
    return {item["00080018"]["Value"][0] for item in response.json()}


def wado_instances(daemon, study: str) -> set[str]:
    """The SOPInstanceUIDs of the parts of WADO-RS's multipart answer for the study."""
    response = requests.get(f"{base_url(daemon)}/dicom-web/studies/{study}", auth=("admin", ADMIN_PASSWORD), timeout=60,
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


def stow(daemon, datasets) -> int:
    boundary = "nodes-boundary"
    body = b""
    for ds in datasets:
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + buffer.getvalue() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    response = requests.post(f"{base_url(daemon)}/dicom-web/studies", data=body, auth=("admin", ADMIN_PASSWORD), timeout=60,
                             headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    return response.status_code


def test_stores_spread_over_three_nodes_are_found_and_retrieved_from_every_node(site):
    nodes = start_nodes(site, "node1", "node2", "node3")
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
    assert stow(nodes[1], stowed) == 200
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
