#!/usr/bin/env python3
"""How dicoogled's queries hold up as the archive grows: the scale tier of the benchmark.

    .venv/bin/python bench/scale.py                      # 100,000 instances
    .venv/bin/python bench/scale.py --instances 1000000  # the 1M tier (see README for how long)
    .venv/bin/python bench/scale.py --index postgresql --nodes 3   # PostgreSQL, three nodes

dicoogled alone (the targets are absolute, not ratios). Generated data (tests/studygen.py:
patients of 2 studies x 2 series x 25 instances, 8x8 pixels, written once to bench/work/ and
reused) is indexed in place with the offline `dicoogled.py index` command, then the daemon is
started on that index and asked, each query repeated and timed to its last response (median):

  - main-tag C-FIND at STUDY level: one PatientID (2 studies), one StudyDate (a day);
  - any-tag C-FIND at IMAGE level: SliceLocation (not a column of the index) within one
    patient, and SliceLocation alone over the whole archive (its match count says what it costs);
  - QIDO-RS studies for one PatientID, and for one StudyDate;
  - the first page (20) of a free-text /search over every tag.

It also reports the offline indexing rate, the time from starting the daemon to its answering
both HTTP and DICOM, the index's bytes per instance, and the daemon's RSS after the queries.
Each answer is checked: the matches must be the ones the generated data holds.

The index is SQLite's file in the data dir (--index sqlite, the default) or PostgreSQL
(--index postgresql): the script then runs its own server (tests/pgserver.py, Debian's binaries,
on a free loopback port), keeps its cluster in bench/work/scale-N-postgresql/ beside the data dir
and reuses both on the next run of that size, as the SQLite index is reused (delete the folder to
time the indexing again). The tests' settings are kept (fsync off: the index is built once, then
only read). With --nodes N (PostgreSQL only) N daemons are started one after the other on the same
data dir and database, each with a config file naming its [node] name (node1, node2, ...) and
ports of its own; every query is asked of every node and checked there, and a row gives the
slowest node's median (each node's in the line below it), so a target met is met on every node.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench  # noqa: E402  the server harness, the data generator and the timed queries
import pgserver  # noqa: E402  (bench put tests/ on the path)
import studygen  # noqa: E402

PIXELS = 8  # the index does not look at pixels: small files keep 1M instances on a laptop's disk
TARGETS_MS = {  # the targets: below 100,000 instances and up to 1,000,000
    "main-tag C-FIND": (50, 100), "QIDO-RS": (None, 100), "any-tag C-FIND": (None, 200),
    "free-text /search first page": (None, 200),
}
STARTUP_TARGET_S = 2.0
DATABASE = "dicoogled"  # the database the PostgreSQL index is in, on the bench's own server


def generate(instances: int) -> pathlib.Path:
    patients = max(1, instances // bench.PER_PATIENT)
    bench.series_dirs(PIXELS, 0, patients)  # generates what is missing, in parallel
    return bench.data_root(PIXELS)


def index_offline(data_dir: pathlib.Path, folders: list[pathlib.Path], index_url: str = "") -> float:
    """Index folders in place into data_dir (and index_url's PostgreSQL database, if given) with
    `dicoogled.py index`; seconds taken."""
    start = time.perf_counter()
    data_dir.mkdir(parents=True, exist_ok=True)
    engine = ["--index", index_url] if index_url else []
    with open(data_dir.parent / f"{data_dir.name}-index.log", "wb") as log:  # its progress, a line per folder
        subprocess.run([sys.executable, str(bench.ROOT / "dicoogled.py"), "index", "--data-dir", str(data_dir),
                        *engine, "--log-level", "WARNING", *map(str, folders)], check=True,
                       env=bench.Dicoogled().env(), stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


class ScaledDicoogled(bench.Dicoogled):
    """dicoogled on a data folder indexed beforehand; start() measures the time to ready.

    With index_url it is started on that PostgreSQL index, and with a node name as that node
    (a config file of its own saying [node] name)."""

    def __init__(self, data_dir: pathlib.Path, index_url: str = "", node: str = ""):
        super().__init__()
        self.data_dir, self.index_url, self.node = data_dir, index_url, node

    def command(self, *extra):
        command = super().command(*extra)
        command[command.index("--data-dir") + 1] = str(self.data_dir)
        if self.index_url:
            command += ["--index", self.index_url]
        if self.node:
            config = self.dir / f"{self.node}.ini"
            config.write_text(f"[node]\nname = {self.node}\n")
            command += ["--config", str(config)]
        return command

    def start(self, *extra):
        self.dir = bench.WORK / ("scale-server" + (f"-{self.node}" if self.node else ""))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = bench.free_port(), bench.free_port()
        self.log = open(self.dir / "server.log", "wb")
        began = time.perf_counter()
        self.proc = subprocess.Popen(self.command(*extra), cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=self.env(), start_new_session=True)
        bench.STARTED.append(self.proc)
        while not (self._answers_http() and self._answers_dicom()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"dicoogled exited with {self.proc.returncode}: {self.log_tail()}")
            if time.perf_counter() - began > 120:
                raise RuntimeError("dicoogled was not ready within 120 s")
            time.sleep(0.01)
        self.ready_seconds = time.perf_counter() - began

    def _answers_http(self) -> bool:
        try:
            self.count_instances()
            return True
        except OSError:
            return False

    def _answers_dicom(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1):
                return True
        except OSError:
            return False


def free_text_search(server: bench.Server, text: str) -> tuple[float, str, str]:
    """Median ms of the first page (20) of a free-text /search, a note, and the answer."""
    url = server.url("/search?" + urllib.parse.urlencode({"query": text, "psize": 20}))

    def once():
        start = time.perf_counter()
        answer = bench.http_json(url, server.http_headers)
        uris = [result["uri"] for result in answer["results"]]
        return time.perf_counter() - start, f"{len(uris)} of {answer['numResults']} results"
    return bench.repeat(once, bench.QUERY_RUNS, bench.QUERY_BUDGET)


def expected_answers(patients: int) -> dict:
    """What the generated data holds for each query, computed from the generator itself."""
    patient = patients // 2
    first = studygen.make_instance(patient, 0, 0, 0, size=PIXELS)
    day = first.StudyDate
    studies, slices, all_slices = [], [], 0
    for p in range(patients):
        for study in range(2):
            head = studygen.make_instance(p, study, 0, 0, size=PIXELS)
            if head.StudyDate == day:
                studies.append(head.StudyInstanceUID)
    for study in range(2):
        for series in range(2):
            for i in range(25):
                ds = studygen.make_instance(patient, study, series, i, size=PIXELS)
                if ds.SliceLocation == -97.5:
                    slices.append(ds.SOPInstanceUID)
    # SliceLocation depends on the series kind only (the same in every patient): count one patient's
    for study in range(2):
        for series in range(2):
            all_slices += sum(1 for i in range(25) if studygen.make_instance(0, study, series, i, size=PIXELS).SliceLocation == -97.5)
    own_studies = [studygen.make_instance(patient, study, 0, 0, size=PIXELS).StudyInstanceUID for study in range(2)]
    return {"patient_id": first.PatientID, "day": day, "patient_studies": bench.answer(own_studies, "matches"),
            "day_studies": bench.answer(studies, "matches"), "patient_slices": bench.answer(slices, "matches"),
            "all_slices": all_slices * patients}


def stop(servers) -> None:
    """Stop the daemons this script started, by the PIDs it started them with."""
    for server in servers:
        if getattr(server, "proc", None) and server.proc.poll() is None:
            server.proc.terminate()
            try:
                server.proc.wait(30)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()


def prepare_sqlite(instances: int, patients: int, root: pathlib.Path, rows: list) -> pathlib.Path:
    """The data dir of an SQLite index of the generated data, indexed now unless kept from a run before."""
    data_dir = bench.WORK / f"scale-{instances}-data"
    if not (data_dir / "index.sqlite").exists():
        print(f"indexing {instances:,} instances offline ...", flush=True)
        seconds = index_offline(data_dir, [root / f"P{p:04d}" for p in range(patients)])  # just these patients
        rows.append(("offline index", f"{instances / seconds:,.0f} files/s", f"{seconds / 60:.1f} min", ""))
    else:
        print(f"reusing the index in {data_dir} (delete it to time indexing again)")
    return data_dir


def prepare_postgresql(instances: int, patients: int, root: pathlib.Path, rows: list):
    """(the started PostgreSQL server, the data dir, the index URL): the cluster and data dir are
    kept in bench/work/scale-N-postgresql/ and reused if a run before indexed the same data there."""
    work = bench.WORK / f"scale-{instances}-postgresql"
    data_dir, done = work / "data", work / "indexed"  # done names the data indexed, once it all is
    if work.exists() and (not done.exists() or done.read_text() != root.name):
        print(f"removing {work} (not fully indexed, or from other data)")
        shutil.rmtree(work)
    server = pgserver.PostgresServer(bench.free_port(), root=work / "postgres")
    server.start()
    url = f"postgresql://postgres@127.0.0.1:{server.port}/{DATABASE}"
    if not done.exists():
        server.sql(f"CREATE DATABASE {DATABASE}")
        print(f"indexing {instances:,} instances offline into PostgreSQL ...", flush=True)
        seconds = index_offline(data_dir, [root / f"P{p:04d}" for p in range(patients)], url)
        done.write_text(root.name)
        rows.append(("offline index", f"{instances / seconds:,.0f} files/s", f"{seconds / 60:.1f} min", ""))
    else:
        print(f"reusing the PostgreSQL index in {work} (delete it to time indexing again)")
    return server, data_dir, url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=100_000, help="archive size (a multiple of 100)")
    parser.add_argument("--index", choices=("sqlite", "postgresql"), default="sqlite",
                        help="the index engine (postgresql: a server the script starts itself)")
    parser.add_argument("--nodes", type=int, default=1, metavar="N",
                        help="daemons on the same data dir and database (PostgreSQL only)")
    args = parser.parse_args()
    if args.nodes < 1 or (args.nodes > 1 and args.index != "postgresql"):
        parser.error("--nodes N needs N >= 1, and --index postgresql for more than one")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below stops what was started
    patients = max(1, args.instances // bench.PER_PATIENT)
    instances = patients * bench.PER_PATIENT
    began = time.perf_counter()
    print(f"generating {instances:,} instances (once; reused) ...", flush=True)
    root = generate(instances)
    rows, servers, postgres = [], [], None
    try:
        if args.index == "postgresql":
            postgres, data_dir, url = prepare_postgresql(instances, patients, root, rows)
            servers = [ScaledDicoogled(data_dir, url, f"node{n + 1}" if args.nodes > 1 else "")
                       for n in range(args.nodes)]
        else:
            servers = [ScaledDicoogled(prepare_sqlite(instances, patients, root, rows))]
        expected = expected_answers(patients)
        for server in servers:  # one after the other, so each node's startup is its own
            server.start()
            count = server.count_instances()
            if count != instances:
                raise RuntimeError(f"{server.node or 'the daemon'}: the index holds {count} instances, not {instances}")
            name = f" {server.node}" if server.node else ""
            rows.append((f"startup to ready (HTTP and DICOM){name}", f"{server.ready_seconds:.2f} s",
                         "ok" if server.ready_seconds < STARTUP_TARGET_S else f"target < {STARTUP_TARGET_S} s", ""))
        big = instances > 100_000
        queries = [
            ("main-tag C-FIND", "study PatientID", lambda s: bench.cfind(s, "STUDY", {"PatientID": expected["patient_id"]}),
             expected["patient_studies"]),
            ("main-tag C-FIND", "study StudyDate (a day)", lambda s: bench.cfind(s, "STUDY", {"StudyDate": expected["day"]}),
             expected["day_studies"]),
            ("any-tag C-FIND", "image SliceLocation=-97.5 of a patient",
             lambda s: bench.cfind(s, "IMAGE", {"PatientID": expected["patient_id"], "SliceLocation": "-97.5"}),
             expected["patient_slices"]),
            ("any-tag C-FIND", "image SliceLocation=-97.5, whole archive",
             lambda s: bench.cfind(s, "IMAGE", {"SliceLocation": "-97.5"}), None),
            ("QIDO-RS", "studies PatientID", lambda s: bench.qido(s, f"/studies?PatientID={expected['patient_id']}", "0020000D"),
             expected["patient_studies"]),
            ("QIDO-RS", "studies StudyDate (a day)", lambda s: bench.qido(s, f"/studies?StudyDate={expected['day']}", "0020000D"),
             expected["day_studies"]),
            ("free-text /search first page", "'bone' anywhere", lambda s: free_text_search(s, "bone"), None),
        ]
        for kind, label, run, want in queries:
            per_node = [(server.node, *run(server)) for server in servers]  # (node, ms, note, answer)
            ms = max(m for _, m, _, _ in per_node)  # the slowest node's median
            note = per_node[0][2]
            if len(servers) > 1:
                note += "; per node: " + ", ".join(f"{node} {m:,.1f} ms" for node, m, _, _ in per_node)
            target = TARGETS_MS[kind][1 if big else 0] or TARGETS_MS[kind][1]
            if label.endswith("whole archive"):
                verdict = f"{expected['all_slices']:,} matches expected; no target (the answer is that large)"
                wrong = any(not got.startswith(f"{expected['all_slices']} matches") for _, _, _, got in per_node)
            else:
                verdict = "ok" if ms < target else f"target < {target} ms"
                wrong = want is not None and any(got != want for _, _, _, got in per_node)
            if len({got for _, _, _, got in per_node}) > 1:  # nodes of one index answer alike, ranked or not
                wrong = True
                note += "; answers: " + ", ".join(f"{node} {got}" for node, _, _, got in per_node)
            rows.append((f"{kind}: {label}", f"{ms:,.1f} ms", "WRONG ANSWER" if wrong else verdict, note))
        if postgres:
            index_bytes = int(postgres.sql(f"SELECT pg_database_size('{DATABASE}')", DATABASE))
            empty = int(postgres.sql("SELECT pg_database_size('template1')"))  # what any database starts with
            rows.append(("index size (pg_database_size)", f"{index_bytes / instances:,.0f} bytes/instance",
                         f"{index_bytes / 2**20:,.0f} MiB", f"of which {empty / 2**20:,.1f} MiB an empty database has"))
        else:
            index_bytes = sum(path.stat().st_size for path in servers[0].data_dir.glob("index.sqlite*"))
            rows.append(("index size", f"{index_bytes / instances:,.0f} bytes/instance",
                         f"{index_bytes / 2**20:,.0f} MiB", ""))
        for server in servers:
            rss = server.memory()[0] / 1024
            rows.append((f"RSS after the queries{' ' + server.node if server.node else ''}", f"{rss:.0f} MiB", "", ""))
    finally:
        stop(servers)
        if postgres:
            postgres.stop()
    engine = ("PostgreSQL index" + (f", {args.nodes} nodes" if args.nodes > 1 else ", 1 node")
              if postgres else "SQLite index")
    print(f"\ndicoogled at {instances:,} instances, {engine} — {datetime.datetime.now():%Y-%m-%d %H:%M}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"whole run {(time.perf_counter() - began) / 60:.1f} min\n")
    width = max(len(row[0]) for row in rows)
    for name, value, verdict, note in rows:
        print(f"{name:<{width}}  {value:>22}  {verdict}")
        if note:
            print(f"{'':<{width}}  {'':>22}  {note}")
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"scale-{instances}" + (f"-postgresql-{args.nodes}n" if postgres else "")
    (bench.RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return 1 if any(row[2] == "WRONG ANSWER" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
