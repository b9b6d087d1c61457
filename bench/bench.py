#!/usr/bin/env python3
"""Benchmark dicoogled against Orthanc, side by side, in one run.

    python bench/bench.py            # full run (about 100,000 instances per server)
    python bench/bench.py --quick    # smaller data, a few minutes

Both servers get the same synthetic data (tests/studygen.py, written once to
bench/work/ and reused) and the same clients, on 127.0.0.1:

  a) C-STORE ingest, instances/s: DCMTK storescu, one association and four
     parallel storescu processes (data split in four), 64x64 and 512x512
     CT instances, each time into a freshly started, empty server.  The clock
     runs from launching storescu until the server's instance count shows
     every instance (so asynchronous indexing is included).
  b) Watched-folder indexing, files/s (dicoogled only; Orthanc has no such
     feature): copy files into the folder given to --watch, wait for the count.
     Also the offline `dicoogled.py index` command on the same files.
  c) Queries and retrievals at two archive sizes, median ms.  The archive is
     loaded with four parallel storescu, then:
     - C-FIND: study level PatientName=DOE*, a StudyDate range,
       ModalitiesInStudy=CT and all studies (StudyInstanceUID universal), and
       image level SliceLocation=-97.5 (not a "main" tag for Orthanc); from
       one in-process pynetdicom association per server, timed from request
       to last response.
     - QIDO-RS: studies with PatientName=DOE*, and series with
       SeriesDescription=*bone in 2018 studies (both well under dicoogled's
       DICOMweb default of 1000 results).
     - One generated study of 50 instances (patient 0's first: 2 series of 25)
       retrieved whole: C-MOVE with DCMTK movescu to a DCMTK storescp the
       bench starts (AE DEST, which both servers are configured to know),
       C-GET with DCMTK getscu into a folder, and WADO-RS study metadata.
       movescu and getscu are timed from launch to exit (process start
       included, for both servers alike).
     HTTP requests are timed from request to the last byte of the answer;
     dicoogled gets HTTP Basic credentials (the bench sets its admin password),
     Orthanc runs without authentication.
  d) Memory: RSS of each server idle after start, its peak (VmHWM) over the
     ingest runs, and RSS once the largest archive is loaded.

Answers are checked, not only timed: each query's and retrieval's answer (its
number of matches or instances and a digest of their UIDs) must be the same
from both servers, and a retrieval must bring exactly the study's 50
instances.  A row whose answers differ shows "DIFFER" instead of a ratio, with
both answers below it.

Servers run with their default settings (both fsync stored files; --dicom-workers N gives dicoogled
[dicom] workers = N), except
ports and, for Orthanc, "StorageCompression": false, "DicomCheckCalledAet":
false and "DicomAlwaysAllowFind" (and in c, "DicomAlwaysAllowMove" and
"DicomAlwaysAllowGet"): true.  In c both know the C-MOVE destination (dicoogled
from a --config file's [modalities], Orthanc from "DicomModalities"), and
Orthanc loads its DICOMweb plugin (Debian package orthanc-dicomweb;
dicoogled's is on by default); the DICOMweb rows say so if it is missing.
DCMTK tools and Orthanc run with TCP_NODELAY=1 (DCMTK's switch for disabling
Nagle's algorithm).  Results print as a table, dicoogled beside Orthanc with
the ratio dicoogled/Orthanc, and are written to bench/results/latest.json.

Needs: DCMTK's storescu, storescp, movescu and getscu, /usr/sbin/Orthanc, and
pydicom + pynetdicom in the Python that runs this script (dicoogled runs under
the same interpreter).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import datetime
import hashlib
import json
import os
import pathlib
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT_FIND

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
RESULTS = ROOT / "bench" / "results"
ORTHANC = "/usr/sbin/Orthanc"
ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian's orthanc-dicomweb
DCMTK_TOOLS = ("storescu", "storescp", "movescu", "getscu")
sys.path.insert(0, str(ROOT / "tests"))
import studygen  # noqa: E402

# Every patient has 2 studies x 2 series x 25 instances = 100 instances, so
# sizes are counted in patients and the series folders split evenly in four.
PER_PATIENT = 100
SIZES = {  # patients per data set
    "full": {"ingest64": 20, "ingest512": 5, "watch": 20, "archive": (100, 1000)},
    "quick": {"ingest64": 5, "ingest512": 1, "watch": 5, "archive": (20, 200)},
}
QUERIES = [  # (label, level, matching keys)
    ("study PatientName=DOE*", "STUDY", {"PatientName": "DOE*"}),
    ("study StudyDate=2018", "STUDY", {"StudyDate": "20180101-20181231"}),
    ("study ModalitiesInStudy=CT", "STUDY", {"ModalitiesInStudy": "CT"}),  # every generated study
    ("study all studies", "STUDY", {}),  # StudyInstanceUID universal, as a return key
    ("image SliceLocation=-97.5", "IMAGE", {"SliceLocation": "-97.5"}),
]
RETURN_KEYS = {
    "STUDY": ["StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "AccessionNumber", "StudyDescription"],
    "IMAGE": ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "InstanceNumber"],
}
#: The UID that names a match at each level: answers are compared by these.
MATCH_UID = {"STUDY": "StudyInstanceUID", "IMAGE": "SOPInstanceUID"}
QIDO_QUERIES = [  # (label, path under /dicom-web, DICOM JSON tag of the UID naming a match)
    ("studies PatientName=DOE*", "/studies?PatientName=DOE*", "0020000D"),
    ("series *bone, StudyDate=2018", "/series?SeriesDescription=*bone&StudyDate=20180101-20181231", "0020000E"),
]
QUERY_RUNS, QUERY_BUDGET = 20, 30.0  # runs per query, but stop after 30 s (at least 3 runs)
# A retrieval moves 50 files, so fewer runs; the median of 5 is steady enough.
RETRIEVE_RUNS, RETRIEVE_BUDGET = 5, 30.0
# The retrieved study: patient 0's first, 2 series x 25 instances (see _write_patient).
RETRIEVE_PATIENT, RETRIEVE_STUDY, STUDY_INSTANCES = 0, 0, 50
DESTINATION = "DEST"  # AE title of the C-MOVE destination, a storescp the bench starts
BENCH_PASSWORD = "bench-admin"  # dicoogled's admin password, for DICOMweb over HTTP Basic

# Debian's DCMTK leaves Nagle's algorithm on unless told otherwise, which costs
# storescu ~40 ms per instance against any server (delayed ACKs).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
STARTED: list[subprocess.Popen] = []  # every process we start, stopped on exit


# ---------------------------------------------------------------- data

def _write_patient(root: pathlib.Path, size: int, patient: int) -> None:
    for study in range(2):
        for series in range(2):
            studygen.instance_path(root, patient, study, series, 0).parent.mkdir(parents=True, exist_ok=True)
            for i in range(25):
                ds = studygen.make_instance(patient, study, series, i, size=size)
                pydicom.dcmwrite(studygen.instance_path(root, patient, study, series, i), ds,
                                 enforce_file_format=True)
    (root / f"P{patient:04d}.done").touch()


def data_root(size: int) -> pathlib.Path:
    """bench/work/ct<size>-<hash of studygen.py>: data from an older generator is not reused."""
    digest = hashlib.sha1(pathlib.Path(studygen.__file__).read_bytes()).hexdigest()[:8]
    root = WORK / f"ct{size}-{digest}"
    for stale in WORK.glob(f"ct{size}-*"):
        if stale != root:
            print(f"removing {stale} (made by another version of studygen.py)")
            shutil.rmtree(stale)
    return root


def series_dirs(size: int, first: int, last: int) -> list[pathlib.Path]:
    """Series folders of patients first..last-1 of data_root(size), generated if missing."""
    root = data_root(size)
    missing = [p for p in range(first, last) if not (root / f"P{p:04d}.done").exists()]
    if missing:
        print(f"generating {len(missing) * PER_PATIENT} {size}x{size} instances in {root} ...", flush=True)
        with concurrent.futures.ProcessPoolExecutor() as pool:
            list(pool.map(_write_patient, [root] * len(missing), [size] * len(missing), missing, chunksize=4))
    return [studygen.instance_path(root, p, study, series, 0).parent
            for p in range(first, last) for study in range(2) for series in range(2)]


def retrieved_study() -> tuple[str, str]:
    """StudyInstanceUID of the study every retrieval fetches, and the answer a retrieval of it
    must give, both read from its generated 64x64 files (series_dirs made them)."""
    root = data_root(64)
    paths = [studygen.instance_path(root, RETRIEVE_PATIENT, RETRIEVE_STUDY, series, i)
             for series in range(2) for i in range(25)]
    datasets = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    if len(datasets) != STUDY_INSTANCES or len({ds.StudyInstanceUID for ds in datasets}) != 1:
        raise RuntimeError(f"the generated study is not {STUDY_INSTANCES} instances of one study")
    return datasets[0].StudyInstanceUID, answer([ds.SOPInstanceUID for ds in datasets], "instances")


def answer(uids, noun: str) -> str:
    """What a server answered, in a form to compare with the other's: how many matches or
    instances, and a digest of their UIDs (so the same count of other objects differs too)."""
    uids = sorted(map(str, uids))
    return f"{len(uids)} {noun} #{hashlib.sha1(chr(10).join(uids).encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, headers: dict | None = None):
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def process_tree(pid: int) -> set[int]:
    """The process and its living descendants."""
    parents = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    tree = {pid}
    while children := {c for c, parent in parents.items() if parent in tree} - tree:
        tree |= children
    return tree


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB, summed over the process and its descendants."""
    rss = hwm = 0
    for p in process_tree(pid):
        try:
            status = pathlib.Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm += int(line.split()[1])
    return rss, hwm


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used, with its children that ended (a process
    counts those it waited for: a PostgreSQL server's finished backends) and its living
    descendants. The difference of two readings is what the tree used in between."""
    ticks = 0
    for p in process_tree(pid):
        try:
            fields = pathlib.Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime, cutime, cstime: fields 14-17 of stat, from index 11 after the name. A
        # child's own times move into its parent's cutime and cstime when it is waited for.
        ticks += sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


class Server:
    """A server under test in its own temporary folder; subclasses say how to run and count.

    Given a destination (a StoreSCP), it is set up to serve retrievals: it knows that C-MOVE
    destination, and serves DICOMweb at /dicom-web."""
    name = aet = ""
    failed = False
    dicomweb_missing = ""  # why this server cannot serve DICOMweb, if it cannot
    http_headers: dict = {}  # sent with every DICOMweb request (credentials)

    def __init__(self, destination: StoreSCP | None = None):
        self.destination = destination

    def start(self, *extra: str) -> None:
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=WORK))
        self.http_port, self.dicom_port = free_port(), free_port()
        self.log = open(self.dir / "server.log", "wb")
        self.proc = subprocess.Popen(self.command(*extra), cwd=self.dir, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)
        STARTED.append(self.proc)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                self.count_instances()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not answer on HTTP within 60 s")
                time.sleep(0.1)
        time.sleep(1)  # settle before the idle RSS reading
        self.idle_rss = self.memory()[0]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def memory(self) -> tuple[int, int]:
        return memory_kib(self.pid)

    def stop(self) -> None:
        """Stop the server and delete its folder, keeping its log in bench/results if something failed."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} still running 30 s after SIGTERM: killed")
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if self.failed:
            RESULTS.mkdir(parents=True, exist_ok=True)
            kept = RESULTS / f"{self.dir.name}.log"
            shutil.copy(self.dir / "server.log", kept)
            print(f"  {self.name} log kept in {kept.relative_to(ROOT)}")
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self) -> str:
        self.log.flush()
        return (self.dir / "server.log").read_text(errors="replace")[-2000:]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def env(self) -> dict:
        return dict(os.environ)

    def wait_for_count(self, expected: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (count := self.count_instances()) < expected and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} died: {self.log_tail()}")
            time.sleep(0.05)
        return count


class Dicoogled(Server):
    name, aet = "dicoogled", "DICOOGLED"
    # DICOMweb needs a login; Basic credentials are checked with scrypt once, then remembered.
    http_headers = {"Authorization": "Basic " + base64.b64encode(f"admin:{BENCH_PASSWORD}".encode()).decode()}

    #: [dicom] workers for dicoogled (--dicom-workers; 0: its default, none)
    workers = 0

    def command(self, *extra):
        config, text = [], ""
        if self.workers:
            text += f"[dicom]\nworkers = {self.workers}\n"
        if self.destination:
            text += f"[modalities]\n{DESTINATION} = 127.0.0.1:{self.destination.port}\n"
        if text:
            (self.dir / "bench.ini").write_text(text)
            config = ["--config", str(self.dir / "bench.ini")]
        return [sys.executable, str(ROOT / "dicoogled.py"), "serve", "--data-dir", str(self.dir / "data"),
                "--http-host", "127.0.0.1", "--http-port", str(self.http_port),
                "--dicom-host", "127.0.0.1", "--dicom-port", str(self.dicom_port), "--aet", self.aet,
                *config, *extra]

    def env(self):
        return {**os.environ, "DICOOGLED_ADMIN_PASSWORD": BENCH_PASSWORD}  # the admin made on first start

    def count_instances(self) -> int:
        return http_json(self.url("/health"))["counts"]["instances"]

    def version(self) -> str:
        return http_json(self.url("/health")).get("version", "?")


class Orthanc(Server):
    name, aet = "orthanc", "ORTHANC"

    def command(self, *extra):
        config = {
            "Name": "bench", "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "index"), "DicomAet": self.aet,
            "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowFind": True, "StorageCompression": False,
            "ConcurrentJobs": 2, "DicomModalities": {}, "Plugins": [],
        }
        if self.destination:
            # The bench's AE is no modality Orthanc knows, so it is let in as for C-FIND.
            config.update({"DicomAlwaysAllowMove": True, "DicomAlwaysAllowGet": True,
                           "DicomModalities": {DESTINATION: [DESTINATION, "127.0.0.1", self.destination.port]}})
            if os.path.exists(ORTHANC_DICOMWEB):
                config.update({"Plugins": [ORTHANC_DICOMWEB], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}})
            else:
                self.dicomweb_missing = f"no DICOMweb plugin ({ORTHANC_DICOMWEB}: apt-get install orthanc-dicomweb)"
        (self.dir / "orthanc.json").write_text(json.dumps(config, indent=2))
        return [ORTHANC, str(self.dir / "orthanc.json"), *extra]

    def env(self):
        return DCMTK_ENV  # Orthanc's DICOM side is DCMTK too

    def count_instances(self) -> int:
        return http_json(self.url("/statistics"))["CountInstances"]

    def idle_jobs(self) -> bool:
        return all(http_json(self.url(f"/jobs/{job}"))["State"] in ("Success", "Failure")
                   for job in http_json(self.url("/jobs")))

    def version(self) -> str:
        return http_json(self.url("/system"))["Version"]


class StoreSCP:
    """DCMTK storescp on a free loopback port: the C-MOVE destination, writing what it receives
    into a folder the bench empties before each retrieval and reads after it."""

    def __init__(self):
        self.folder = pathlib.Path(tempfile.mkdtemp(prefix="storescp-", dir=WORK))
        self.port = free_port()
        self.log = open(WORK / f"{self.folder.name}.log", "wb")
        self.proc = subprocess.Popen(["storescp", "+xa", "-aet", DESTINATION, "-od", str(self.folder), str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=DCMTK_ENV)
        STARTED.append(self.proc)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"storescp exited with {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("storescp did not listen within 30 s")
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()
        (WORK / f"{self.folder.name}.log").unlink()
        shutil.rmtree(self.folder, ignore_errors=True)


# ---------------------------------------------------------------- measurements

def storescu(server: Server, dirs: list[pathlib.Path], parallel: int, expected: int) -> float:
    """Send every file under dirs with `parallel` storescu processes; seconds until all are counted."""
    logs, procs = [], []
    start = time.perf_counter()
    for n in range(parallel):
        log = open(server.dir / f"storescu-{n}.log", "wb")
        cmd = ["storescu", "-aet", "BENCH", "-aec", server.aet, "+sd",
               "127.0.0.1", str(server.dicom_port), *map(str, dirs[n::parallel])]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV))
        STARTED.append(procs[-1])
        logs.append(log)
    for proc in procs:
        proc.wait()
    count = server.wait_for_count(expected, timeout=120 + expected / 20)
    elapsed = time.perf_counter() - start
    for log in logs:
        log.close()
    if any(p.returncode for p in procs) or count != expected:
        tail = (server.dir / "storescu-0.log").read_text(errors="replace")[-800:]
        raise RuntimeError(f"storescu exit codes {[p.returncode for p in procs]}, "
                           f"{count} of {expected} instances counted; {tail}")
    if isinstance(server, Orthanc):
        while not server.idle_jobs():
            time.sleep(0.1)
    return elapsed


def repeat(once, runs: int, budget: float) -> tuple[float, str, str]:
    """Run once() -> (seconds, answer) `runs` times, but stop after `budget` seconds (at least
    3 runs): (median ms, a note, the answer).  Answers that vary between runs are all given,
    so they cannot equal the other server's."""
    times, answers, begin = [], set(), time.perf_counter()
    while len(times) < runs and (len(times) < 3 or time.perf_counter() - begin < budget):
        seconds, result = once()
        times.append(seconds)
        answers.add(result)
    found = " / ".join(sorted(answers)) + (" (varied between runs!)" if len(answers) > 1 else "")
    note = f"{found.split(' #')[0] if len(answers) == 1 else found}, median of {len(times)} runs"
    return round(statistics.median(times) * 1000, 1), note, found


def cfind(server: Server, level: str, keys: dict) -> tuple[float, str, str]:
    """Median ms of one C-FIND repeated over one association, a note, and the answer."""
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword in RETURN_KEYS[level]:
        setattr(query, keyword, "")
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(STUDY_ROOT_FIND)
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 30, 600, 600
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.aet)
    if not assoc.is_established:
        raise RuntimeError(f"association to {server.name} refused")
    # As with DCMTK above: without this each request waits ~40 ms for a delayed ACK.
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # pynetdicom 3's association thread polls for incoming requests with non-blocking
    # get_msg() and can race send_c_find() for a response, dropping it ("Received unexpected
    # C-FIND service message") about once in 300 queries once responses come fast.  This
    # association only sends requests, so keep that poll away from the responses.
    blocking_get = assoc.dimse.get_msg
    assoc.dimse.get_msg = lambda block=False: blocking_get(True) if block else (None, None)

    def once():
        start, uids = time.perf_counter(), []
        for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):
            if not status:
                raise RuntimeError(f"C-FIND to {server.name}: no response (aborted or timed out)")
            if status.Status in (0xFF00, 0xFF01):
                uids.append(identifier.get(MATCH_UID[level], "") if identifier is not None else "")
            elif status.Status != 0x0000:
                raise RuntimeError(f"C-FIND to {server.name} failed: 0x{status.Status:04X}")
        return time.perf_counter() - start, answer(uids, "matches")
    try:
        return repeat(once, QUERY_RUNS, QUERY_BUDGET)
    finally:
        assoc.release()


def qido(server: Server, path: str, uid_tag: str) -> tuple[float, str, str]:
    """Median ms of one QIDO-RS search (a fresh connection each time, as urllib makes), a note,
    and the answer: the matches, named by the UID in uid_tag."""
    if server.dicomweb_missing:
        raise RuntimeError(server.dicomweb_missing)

    def once():
        start = time.perf_counter()
        matches = http_json(server.url("/dicom-web" + path), server.http_headers)
        return time.perf_counter() - start, answer([m.get(uid_tag, {}).get("Value", [""])[0] for m in matches],
                                                   "matches")
    return repeat(once, QUERY_RUNS, QUERY_BUDGET)


def wado_metadata(server: Server, study_uid: str) -> tuple[float, str, str]:
    """Median ms of WADO-RS study metadata, a note, and the answer: the instances it lists."""
    if server.dicomweb_missing:
        raise RuntimeError(server.dicomweb_missing)

    def once():
        start = time.perf_counter()
        instances = http_json(server.url(f"/dicom-web/studies/{study_uid}/metadata"), server.http_headers)
        return time.perf_counter() - start, answer([i.get("00080018", {}).get("Value", [""])[0] for i in instances],
                                                   "instances")
    return repeat(once, RETRIEVE_RUNS, RETRIEVE_BUDGET)


def received(folder: pathlib.Path) -> list[str]:
    """SOPInstanceUIDs of the files a DCMTK tool wrote into folder."""
    return [pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in folder.iterdir()]


def dcmtk_retrieve(server: Server, tool: str, options: list[str], study_uid: str,
                   folder: pathlib.Path) -> tuple[float, str, str]:
    """Median ms of a DCMTK movescu or getscu retrieving the study, from launch to exit, a note,
    and the answer: the instances that arrived in folder (emptied before each run)."""
    command = [tool, "-aet", "BENCH", "-aec", server.aet, "-S", *options, "-k", "QueryRetrieveLevel=STUDY",
               "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(server.dicom_port)]

    def once():
        for path in folder.iterdir():
            path.unlink()
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, errors="replace", env=DCMTK_ENV)
        elapsed = time.perf_counter() - start
        if done.returncode:
            raise RuntimeError(f"{tool} exited with {done.returncode}: {(done.stdout + done.stderr)[-300:]}")
        return elapsed, answer(received(folder), "instances")
    return repeat(once, RETRIEVE_RUNS, RETRIEVE_BUDGET)


def cmove(server: Server, study_uid: str) -> tuple[float, str, str]:
    """C-MOVE of the study to the storescp that is server.destination."""
    return dcmtk_retrieve(server, "movescu", ["-aem", DESTINATION], study_uid, server.destination.folder)


def cget(server: Server, study_uid: str) -> tuple[float, str, str]:
    """C-GET of the study by getscu, which stores what it gets in a folder of the server's."""
    folder = server.dir / "getscu"
    folder.mkdir(exist_ok=True)
    return dcmtk_retrieve(server, "getscu", ["-od", str(folder)], study_uid, folder)


class Results:
    """Rows of (label, unit, better, {server: value}); printed and saved as JSON.

    A row may also hold each server's answer (what a query or retrieval returned) and the
    answer expected: a ratio is given only if the answers agree, since timing two servers
    that did different work compares nothing."""

    def __init__(self):
        self.rows, self.versions = [], {}

    def add(self, label: str, unit: str, better: str, server: str, value, note: str = "",
            answer: str | None = None, expected: str | None = None) -> None:
        row = next((r for r in self.rows if r["label"] == label), None)
        if row is None:
            row = {"label": label, "unit": unit, "better": better, "dicoogled": None, "orthanc": None,
                   "answers": {}, "expected": expected, "notes": []}
            self.rows.append(row)
        row[server] = value
        if answer is not None:
            row["answers"][server] = answer
        if note:
            row["notes"].append(f"{server}: {note}")

    @staticmethod
    def answer_problems(row: dict) -> list[str]:
        """Why the row's answers cannot be compared: they differ, or one is not the one expected."""
        answers, problems = row["answers"], []
        if len(set(answers.values())) > 1:
            problems.append("answers differ: " + "; ".join(f"{s} {a}" for s, a in answers.items()))
        if row["expected"]:
            problems += [f"{s} answered {a}, expected {row['expected']}"
                         for s, a in answers.items() if a != row["expected"]]
        return problems

    def table(self) -> str:
        def fmt(v):
            return "—" if v is None else f"{v:,.1f}" if isinstance(v, float) else str(v)
        lines = [f"{'measurement':<46} {'unit':<9} {'dicoogled':>11} {'Orthanc':>11} {'ratio':>7}", "-" * 88]
        for r in self.rows:
            d, o = r["dicoogled"], r["orthanc"]
            problems = self.answer_problems(r)
            r["answers_agree"] = not problems if r["answers"] else None
            r["ratio"] = (round(d / o, 3) if isinstance(d, (int, float)) and isinstance(o, (int, float)) and o
                          and not problems else None)
            ratio = "DIFFER" if problems else "—" if r["ratio"] is None else f"{r['ratio']:.2f}"
            lines.append(f"{r['label']:<46} {r['unit']:<9} {fmt(d):>11} {fmt(o):>11} {ratio:>7}")
            lines += [f"    {n}" for n in r["notes"]]
            lines += [f"    !! {p}" for p in problems]
        return "\n".join(lines)


def measure(results: Results, server: Server, label, unit, better, fn, expected: str | None = None):
    """Record fn()'s value, or its (value, note) or (value, note, answer); on error a '—' and
    the error; and go on."""
    try:
        out = fn()
        out = out if isinstance(out, tuple) else (out,)
        value, note, answer = (*out, *("", None)[len(out) - 1:])  # missing note, answer: "", None
        results.add(label, unit, better, server.name, value, note, answer, expected)
        return value
    except Exception as error:  # noqa: BLE001 - report and go on to the next measurement
        print(f"  {server.name}: {label}: FAILED: {error}", flush=True)
        server.failed = True
        results.add(label, unit, better, server.name, None, f"failed: {str(error)[:200]}", expected=expected)


def run(args) -> Results:
    sizes = SIZES["quick" if args.quick else "full"]
    results, servers = Results(), [cls for cls in (Dicoogled, Orthanc) if cls.name in args.servers]
    peak = {}

    def fresh(cls, *extra, destination=None):
        server = cls(destination)
        server.start(*extra)
        if server.name not in results.versions:
            results.versions[server.name] = server.version()
            results.add("RSS idle after start", "MiB", "lower", server.name, round(server.idle_rss / 1024, 1))
        return server

    def finish(server):
        peak[server.name] = max(peak.get(server.name, 0), server.memory()[1])
        server.stop()

    # a) C-STORE ingest into empty servers
    for size, patients in ((64, sizes["ingest64"]), (512, sizes["ingest512"])):
        dirs = series_dirs(size, 0, patients)
        n = patients * PER_PATIENT
        for parallel in (1, 4):
            label = f"C-STORE {n} x {size}x{size}, {parallel} storescu"
            for cls in servers:
                print(f"{label}: {cls.name} ...", flush=True)
                server = fresh(cls)
                try:
                    measure(results, server, label, "inst/s", "higher",
                            lambda: round(n / storescu(server, dirs, parallel, n), 1))
                finally:
                    finish(server)

    # b) watched folder, dicoogled only
    if Dicoogled in servers:
        patients = sizes["watch"]
        dirs, n = series_dirs(64, 0, patients), patients * PER_PATIENT
        label = f"watched folder, {n} x 64x64 copied in"
        print(f"{label}: dicoogled ...", flush=True)
        watched = pathlib.Path(tempfile.mkdtemp(prefix="watched-", dir=WORK))
        server = fresh(Dicoogled, "--watch", str(watched))

        def watch():
            start = time.perf_counter()
            for d in dirs:
                shutil.copytree(d, watched / d.relative_to(d.parents[2]))
            count = server.wait_for_count(n, timeout=120 + n / 20)
            if count != n:
                raise RuntimeError(f"{count} of {n} files indexed")
            return round(n / (time.perf_counter() - start), 1), "includes the watcher's quiet period"
        try:
            measure(results, server, label, "files/s", "higher", watch)
        finally:
            finish(server)
            shutil.rmtree(watched, ignore_errors=True)
        results.add(label, "files/s", "higher", "orthanc", None, "no comparable feature")

        label = f"offline `dicoogled.py index`, {n} x 64x64"
        print(f"{label} ...", flush=True)
        patient_dirs = sorted({d.parents[1] for d in dirs})
        data = pathlib.Path(tempfile.mkdtemp(prefix="dicoogled-", dir=WORK))
        try:
            start = time.perf_counter()
            done = subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "index", "--data-dir", str(data),
                                   *map(str, patient_dirs)], capture_output=True, text=True)
            elapsed = time.perf_counter() - start
            summary = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
            if summary.get("indexed") == n:
                results.add(label, "files/s", "higher", "dicoogled", round(n / elapsed, 1), "in place, no server")
            else:
                results.add(label, "files/s", "higher", "dicoogled", None,
                            f"failed (exit {done.returncode}): {summary or done.stderr[-300:]}")
        finally:
            shutil.rmtree(data, ignore_errors=True)
        results.add(label, "files/s", "higher", "orthanc", None, "no comparable feature")

    # c) queries and retrievals at two archive sizes, loaded with four parallel storescu; the
    # retrieved study is in the first patients, so it is there at both sizes.
    steps = sizes["archive"]
    series_dirs(64, 0, RETRIEVE_PATIENT + 1)
    study_uid, study_answer = retrieved_study()
    retrievals = [  # (label, function(server, study_uid))
        (f"C-MOVE study, {STUDY_INSTANCES} inst. to storescp", cmove),
        (f"C-GET study, {STUDY_INSTANCES} inst. (getscu)", cget),
        (f"WADO-RS study metadata, {STUDY_INSTANCES} inst.", wado_metadata),
    ]
    destination = StoreSCP()
    try:
        for cls in servers:
            server = fresh(cls, destination=destination)
            try:
                loaded = 0
                for patients in steps:
                    n = patients * PER_PATIENT
                    dirs = series_dirs(64, loaded // PER_PATIENT, patients)
                    print(f"loading {server.name} to {n} instances ...", flush=True)
                    measure(results, server, f"archive load {loaded // 1000}k->{n // 1000}k, 4 storescu", "inst/s",
                            "higher", lambda: round((n - loaded) / storescu(server, dirs, 4, n), 1))
                    loaded = n
                    for label, level, keys in QUERIES:
                        print(f"C-FIND {label} @{n}: {server.name} ...", flush=True)
                        measure(results, server, f"C-FIND {label} @{n // 1000}k", "ms", "lower",
                                lambda: cfind(server, level, keys))
                    for label, path, uid_tag in QIDO_QUERIES:
                        print(f"QIDO-RS {label} @{n}: {server.name} ...", flush=True)
                        measure(results, server, f"QIDO-RS {label} @{n // 1000}k", "ms", "lower",
                                lambda: qido(server, path, uid_tag))
                    for label, retrieve in retrievals:
                        print(f"{label} @{n}: {server.name} ...", flush=True)
                        measure(results, server, f"{label} @{n // 1000}k", "ms", "lower",
                                lambda: retrieve(server, study_uid), expected=study_answer)
                rss = server.memory()[0]
                results.add(f"RSS with {loaded // 1000}k instances", "MiB", "lower", server.name, round(rss / 1024, 1))
            finally:
                finish(server)
    finally:
        destination.stop()
    for name, hwm in peak.items():
        results.add("RSS peak (VmHWM), highest of all runs", "MiB", "lower", name, round(hwm / 1024, 1))
    return results


def guarded_run(run, args, leftovers: tuple[str, ...]):
    """run(args) as a benchmark runs: Ctrl-C and SIGTERM end it through the finally below, which
    stops every process it started (STARTED, by PID) and removes the servers' folders (leftovers:
    globs under WORK); a busy machine is warned about. (its results, the start time, the load
    average at start); exit status 130 if interrupted."""
    WORK.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even if started with it ignored
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = datetime.datetime.now().astimezone()
    load = os.getloadavg()[0]
    if load > 0.5 * os.cpu_count():
        print(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs; other work will skew the figures")
    try:
        return run(args), started, load
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        for proc in STARTED:  # stop anything still running, by PID
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for pattern in leftovers:
            for leftover in WORK.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller data sets (a few minutes)")
    parser.add_argument("--servers", default="dicoogled,orthanc", help="comma-separated subset to run")
    parser.add_argument("--dicom-workers", type=int, default=0, metavar="N",
                        help="run dicoogled with [dicom] workers = N (worker processes for storage associations)")
    args = parser.parse_args()
    Dicoogled.workers = args.dicom_workers
    args.servers = args.servers.split(",")
    for tool in (*DCMTK_TOOLS, ORTHANC):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} not found (install DCMTK and Orthanc)")
    results, started, load = guarded_run(run, args, ("dicoogled-*", "orthanc-*", "watched-*", "storescp-*"))
    versions = " vs ".join(f"{name} {version}" for name, version in results.versions.items())
    header = (f"{versions} — {'quick' if args.quick else 'full'} run, "
              f"{started:%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs, load average at start {load:.1f}, "
              f"Python {platform.python_version()}\n"
              "ratio = dicoogled / Orthanc (inst/s, files/s: higher is better; ms, MiB: lower is better);\n"
              "DIFFER instead of a ratio: the servers' answers differ (or are not the expected ones).\n"
              "Query and retrieval archives were loaded over C-STORE with 4 parallel storescu into both servers.")
    table = results.table()
    print("\n" + header + "\n\n" + table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "latest.json"
    out.write_text(json.dumps({"started": started.isoformat(), "mode": "quick" if args.quick else "full",
                               "cpus": os.cpu_count(), "load_average_at_start": load,
                               "python": platform.python_version(),
                               "versions": results.versions, "rows": results.rows}, indent=2, ensure_ascii=False))
    print(f"\nwritten to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
