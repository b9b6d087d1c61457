#!/usr/bin/env python3
"""Ingest on one node and on several: dicoogled and Orthanc, SQLite and PostgreSQL, side by side.

    .venv/bin/python bench/nodes.py            # 2,000 instances, each setup 3 times
    .venv/bin/python bench/nodes.py --quick    # 500 instances, each setup once

Each setup is started fresh and empty, then loaded with the same generated 64x64 CT instances
(bench.series_dirs: patients of 2 studies x 2 series x 25, written once to bench/work/) by P
parallel DCMTK storescu processes (TCP_NODELAY=1, as in bench.py; --parallel, 6 by default),
each sending a share of the series folders to one node, the nodes taken in turn. The clock runs
from launching them until the first node's instance count shows every instance. The setups:

  - SQLite, 1 node: dicoogled with its default index; Orthanc with its default (SQLite) index.
  - PostgreSQL, 1 node: dicoogled with --index URL; Orthanc with Debian's orthanc-postgresql
    index plugin (its storage stays in files, as dicoogled's).
  - PostgreSQL, 3 nodes (--nodes): that many servers of each kind on one database and one storage
    folder, each with ports of its own. dicoogled's nodes each have a config file naming their
    [node] name (README, "Several nodes"); Orthanc's share one configuration but for their
    ports, with the plugin's "Lock": false, which lets several Orthanc servers write to one
    database since Orthanc 1.9.2 with PostgreSQL plugin 4.0 (Orthanc Book, "Scalability of
    Orthanc", multiple writers); older versions allow one writer only, and the row says so.

Every setup gets a new database on one PostgreSQL server the script starts (tests/pgserver.py,
on a free loopback port) with fsync and full-page writes on, as a production server runs.
Servers otherwise keep their defaults, as in bench.py (Orthanc: "StorageCompression": false,
"DicomCheckCalledAet": false).

A rate is quoted only if the setup stored every instance exactly once: every storescu exited 0
(each C-STORE acknowledged), every node counts N instances, the storage folder holds N files
(none written twice by two nodes), and the SOPInstanceUIDs a node lists (dicoogled: QIDO-RS
/instances, page by page; Orthanc: /instances?expand) are those of the files sent, each once.
Otherwise the row says what was wrong. Under each row, the CPU time (user and system) per
instance used meanwhile by the nodes together (with any worker processes) and by the PostgreSQL
server (with its backends): what a machine with a core per node would have to give. Setups are run in turn (all once, then all again, ...),
the rate is the median of the runs, and the table gives dicoogled beside Orthanc with the ratio
dicoogled / Orthanc, and each server's gain from 1 node to N on PostgreSQL. Written to
bench/results/nodes-latest.json.

Needs what bench.py needs, PostgreSQL (Debian's postgresql) and orthanc-postgresql.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

import pydicom

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench  # noqa: E402  the server harness, the data generator, storescu's environment
import pgserver  # noqa: E402  (bench put tests/ on the path)

ORTHANC_POSTGRESQL = "/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so"  # Debian's orthanc-postgresql
#: Several Orthanc servers may write to one PostgreSQL database from these versions on.
ORTHANC_MULTIPLE_WRITERS = ((1, 9, 2), (4, 0))
SIZES = {"full": (20, 3), "quick": (5, 1)}  # (patients of 100 instances, runs of each setup)


def version_tuple(text: str) -> tuple:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


# ---------------------------------------------------------------- servers as nodes

class DicoogledNode(bench.Dicoogled):
    """A dicoogled serve on a shared data dir and PostgreSQL index, as node `node`."""

    def __init__(self, data_dir: pathlib.Path, index_url: str, node: str):
        super().__init__()
        self.data_dir, self.index_url, self.node = data_dir, index_url, node

    def command(self, *extra):
        command = super().command(*extra)
        command[command.index("--data-dir") + 1] = str(self.data_dir)
        config = self.dir / f"{self.node}.ini"
        config.write_text(f"[node]\nname = {self.node}\n")
        return [*command, "--index", self.index_url, "--config", str(config)]


class OrthancNode(bench.Orthanc):
    """An Orthanc on a shared storage folder and the PostgreSQL index plugin's database."""

    def __init__(self, storage: pathlib.Path, postgres: pgserver.PostgresServer, database: str, lock: bool):
        super().__init__()
        self.storage, self.postgres, self.database, self.lock = storage, postgres, database, lock

    def command(self, *extra):
        command = super().command(*extra)
        path = self.dir / "orthanc.json"
        config = json.loads(path.read_text())
        config.update({
            "StorageDirectory": str(self.storage), "Plugins": [ORTHANC_POSTGRESQL],
            "PostgreSQL": {"EnableIndex": True, "EnableStorage": False, "Host": "127.0.0.1",
                           "Port": self.postgres.port, "Database": self.database, "Username": "postgres",
                           "Password": "", "Lock": self.lock},
        })
        path.write_text(json.dumps(config, indent=2))
        return command

    def start(self, *extra):
        super().start(*extra)
        if not bench.http_json(self.url("/system")).get("DatabaseBackendPlugin"):  # it would be its SQLite
            raise RuntimeError("Orthanc did not load its PostgreSQL index plugin")


class Setup:
    """One server kind on one engine with its nodes: started fresh by start(), gone after stop()."""

    def __init__(self, kind: str, engine: str, nodes: int, postgres: pgserver.PostgresServer | None):
        self.kind, self.engine, self.count, self.postgres = kind, engine, nodes, postgres
        self.nodes: list[bench.Server] = []
        self.shared = self.database = None

    def start(self) -> None:
        if self.engine == "sqlite":
            node = bench.Dicoogled() if self.kind == "dicoogled" else bench.Orthanc()
            self.nodes.append(node)
            node.start()
            self.storage = node.dir / ("data/storage" if self.kind == "dicoogled" else "storage")
            return
        self.shared = pathlib.Path(tempfile.mkdtemp(prefix=f"{self.kind}-shared-", dir=bench.WORK))
        url = self.postgres.database()
        self.database = url.rsplit("/", 1)[1]
        for n in range(self.count):  # one after the other: the first makes the schema, the others find it
            if self.kind == "dicoogled":
                node = DicoogledNode(self.shared, url, f"node{n + 1}")
            else:
                node = OrthancNode(self.shared / "storage", self.postgres, self.database, lock=self.count == 1)
            self.nodes.append(node)
            node.start()
        self.storage = self.shared / "storage"

    def cpu_seconds(self) -> tuple[float, float]:
        """(CPU seconds its nodes have used, with their workers; the PostgreSQL server's, or 0)."""
        return (sum(bench.cpu_seconds(node.proc.pid) for node in self.nodes),
                bench.cpu_seconds(self.postgres.pid()) if self.engine == "postgresql" else 0.0)

    def stop(self) -> None:
        for node in self.nodes:
            if getattr(node, "proc", None):
                node.stop()
        if self.shared:
            shutil.rmtree(self.shared, ignore_errors=True)
        if self.database:
            self.postgres.sql(f"DROP DATABASE {self.database} WITH (FORCE)")

    def sop_instance_uids(self) -> list[str]:
        """Every SOPInstanceUID the last node lists, as often as it lists it."""
        node = self.nodes[-1]
        if self.kind == "orthanc":
            return [i["MainDicomTags"]["SOPInstanceUID"] for i in bench.http_json(node.url("/instances?expand"))]
        uids, page = [], 1000
        while True:
            query = urllib.parse.urlencode({"limit": page, "offset": len(uids)})
            found = bench.http_json(node.url(f"/dicom-web/instances?{query}"), node.http_headers)
            uids += [match["00080018"]["Value"][0] for match in found]
            if len(found) < page:
                return uids


# ---------------------------------------------------------------- the measurement

def ingest(nodes: list[bench.Server], dirs: list[pathlib.Path], parallel: int, expected: int) -> float:
    """Send every file under dirs with `parallel` storescu, spread over the nodes in turn; seconds
    from launch until the first node counts them all."""
    logs, procs = [], []
    start = time.perf_counter()
    for n in range(parallel):
        node = nodes[n % len(nodes)]
        log = open(node.dir / f"storescu-{n}.log", "wb")
        procs.append(subprocess.Popen(["storescu", "-aet", "BENCH", "-aec", node.aet, "+sd", "127.0.0.1",
                                       str(node.dicom_port), *map(str, dirs[n::parallel])],
                                      stdout=log, stderr=subprocess.STDOUT, env=bench.DCMTK_ENV))
        bench.STARTED.append(procs[-1])
        logs.append(log)
    for proc in procs:
        proc.wait()
    nodes[0].wait_for_count(expected, timeout=120 + expected / 20)
    elapsed = time.perf_counter() - start
    for log in logs:
        log.close()
    failed = [n for n, proc in enumerate(procs) if proc.returncode]
    if failed:
        node = nodes[failed[0] % len(nodes)]
        tail = (node.dir / f"storescu-{failed[0]}.log").read_text(errors="replace")[-600:]
        raise RuntimeError(f"storescu exit codes {[p.returncode for p in procs]}; {tail}")
    return elapsed


def stored_once(setup: Setup, expected: str, n: int) -> None:
    """Raise unless the setup holds the n instances sent, each once (see the module's doc)."""
    counts = [node.count_instances() for node in setup.nodes]
    if any(count != n for count in counts):
        raise RuntimeError(f"instance counts {counts} on the nodes, not {n}")
    files = sum(len(names) for _, _, names in os.walk(setup.storage))
    if files != n:
        raise RuntimeError(f"{files} files in the storage folder, not {n}")
    listed = bench.answer(setup.sop_instance_uids(), "instances")
    if listed != expected:
        raise RuntimeError(f"the node lists {listed}, not the {expected} sent")


def installed_orthanc() -> tuple[str, str]:
    """The versions of Orthanc and of its PostgreSQL plugin's Debian package ('' if unknown)."""
    orthanc = subprocess.run([bench.ORTHANC, "--version"], capture_output=True, text=True).stdout.split()
    plugin = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "orthanc-postgresql"],
                            capture_output=True, text=True).stdout
    return (orthanc[1] if len(orthanc) > 1 else ""), plugin


def orthanc_multiple_writers() -> str:
    """Why Orthanc cannot run several writers on one PostgreSQL database here ('' if it can)."""
    if not os.path.exists(ORTHANC_POSTGRESQL):
        return f"no PostgreSQL plugin ({ORTHANC_POSTGRESQL}: apt-get install orthanc-postgresql)"
    orthanc, plugin = installed_orthanc()
    have = (version_tuple(orthanc or "0"), version_tuple(plugin.split("-")[0] or "0"))
    if have[0] < ORTHANC_MULTIPLE_WRITERS[0] or have[1] < ORTHANC_MULTIPLE_WRITERS[1]:
        return (f"Orthanc {'.'.join(map(str, have[0]))} with PostgreSQL plugin {'.'.join(map(str, have[1]))}: "
                "one writer per database (several need Orthanc >= 1.9.2 and plugin >= 4.0)")
    return ""


def run(args) -> dict:
    patients, runs = SIZES["quick" if args.quick else "full"]
    patients, runs = max(1, args.instances // bench.PER_PATIENT) if args.instances else patients, args.runs or runs
    n = patients * bench.PER_PATIENT
    dirs = bench.series_dirs(64, 0, patients)
    expected = bench.answer([pydicom.dcmread(path, specific_tags=["SOPInstanceUID"]).SOPInstanceUID
                             for d in dirs for path in d.iterdir()], "instances")
    setups = [("SQLite, 1 node", "sqlite", 1), ("PostgreSQL, 1 node", "postgresql", 1),
              (f"PostgreSQL, {args.nodes} nodes", "postgresql", args.nodes)]
    cannot = {("orthanc", "postgresql", 1): "" if os.path.exists(ORTHANC_POSTGRESQL) else
              f"no PostgreSQL plugin ({ORTHANC_POSTGRESQL}: apt-get install orthanc-postgresql)",
              ("orthanc", "postgresql", args.nodes): orthanc_multiple_writers()}
    rates = {(label, kind): [] for label, _, _ in setups for kind in ("dicoogled", "orthanc")}
    notes = {key: [] for key in rates}
    #: Per run, the CPU milliseconds per instance of the nodes (all together) and of PostgreSQL.
    cpu = {key: [] for key in rates}
    postgres = pgserver.PostgresServer(bench.free_port(), durable=True)
    postgres.start()
    try:
        for turn in range(runs):
            for label, engine, count in setups:
                for kind in ("dicoogled", "orthanc"):
                    if cannot.get((kind, engine, count)):
                        continue
                    print(f"run {turn + 1}/{runs}: {label}, {kind}: {n} instances, {args.parallel} storescu ...",
                          flush=True)
                    setup = Setup(kind, engine, count, postgres)
                    try:
                        setup.start()
                        before = setup.cpu_seconds()
                        seconds = ingest(setup.nodes, dirs, args.parallel, n)
                        used = [after - start for after, start in zip(setup.cpu_seconds(), before)]
                        stored_once(setup, expected, n)
                        rates[label, kind].append(round(n / seconds, 1))
                        cpu[label, kind].append([round(1000 * seconds_used / n, 2) for seconds_used in used])
                    except Exception as error:  # noqa: BLE001 - report it in the row and go on
                        print(f"  FAILED: {error}", flush=True)
                        for node in setup.nodes:
                            node.failed = True  # keep its log in bench/results
                        notes[label, kind].append(f"run {turn + 1} failed: {str(error)[:300]}")
                    finally:
                        setup.stop()
    finally:
        postgres.stop()
    rows = []
    for label, engine, count in setups:
        row = {"setup": label, "nodes": count, "engine": engine}
        for kind in ("dicoogled", "orthanc"):
            runs_done = rates[label, kind]
            row[kind] = statistics.median(runs_done) if runs_done and not notes[label, kind] else None
            row[f"{kind}_runs"] = runs_done
            row[f"{kind}_cpu_ms"] = ({"nodes": statistics.median(c[0] for c in cpu[label, kind]),
                                      "postgresql": statistics.median(c[1] for c in cpu[label, kind])}
                                     if cpu[label, kind] else None)
            row[f"{kind}_failed"] = bool(notes[label, kind])
            row[f"{kind}_notes"] = ([cannot[kind, engine, count]] if cannot.get((kind, engine, count))
                                    else notes[label, kind])
        row["ratio"] = round(row["dicoogled"] / row["orthanc"], 2) if row["dicoogled"] and row["orthanc"] else None
        rows.append(row)
    gains = {kind: (round(rows[2][kind] / rows[1][kind], 2) if rows[2][kind] and rows[1][kind] else None)
             for kind in ("dicoogled", "orthanc")}
    return {"instances": n, "parallel": args.parallel, "runs": runs, "rows": rows, "gains": gains}


def table(results: dict, nodes: int) -> str:
    def rate(value):
        return "—" if value is None else f"{value:,.1f}"

    def gain(value):
        return "—" if value is None else f"{value:.2f} x"
    lines = [f"{'setup':<32} {'dicoogled inst/s':>17} {'Orthanc inst/s':>15} {'ratio':>7}", "-" * 74]
    for row in results["rows"]:
        ratio = "—" if row["ratio"] is None else f"{row['ratio']:.2f}"
        lines.append(f"{row['setup']:<32} {rate(row['dicoogled']):>17} {rate(row['orthanc']):>15} {ratio:>7}")
        for kind in ("dicoogled", "orthanc"):
            if len(row[f"{kind}_runs"]) > 1:
                lines.append(f"    {kind} runs: " + ", ".join(f"{r:,.1f}" for r in row[f"{kind}_runs"]))
            if row[f"{kind}_cpu_ms"]:
                used = row[f"{kind}_cpu_ms"]
                lines.append(f"    {kind} CPU per instance: {used['nodes']:.2f} ms in the node(s)"
                             + (f", {used['postgresql']:.2f} ms in PostgreSQL" if row["engine"] == "postgresql" else ""))
            lines += [f"    {kind}: {note}" for note in row[f"{kind}_notes"]]
    gains = results["gains"]
    lines.append(f"{f'{nodes} nodes / 1 node, PostgreSQL':<32} {gain(gains['dicoogled']):>17} "
                 f"{gain(gains['orthanc']):>15} {'':>7}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 instances, each setup once")
    parser.add_argument("--parallel", type=int, default=6, metavar="P", help="storescu processes (default 6)")
    parser.add_argument("--nodes", type=int, default=3, metavar="N", help="nodes of the multi-node setup (default 3)")
    parser.add_argument("--runs", type=int, default=0, metavar="R",
                        help="runs of each setup (default 3; 1 with --quick)")
    parser.add_argument("--instances", type=int, default=0, metavar="N",
                        help="instances sent (a multiple of 100; default 2,000, 500 with --quick)")
    args = parser.parse_args()
    if args.nodes < 2 or args.parallel < 1:
        parser.error("--nodes needs 2 or more, --parallel 1 or more")
    for tool in ("storescu", bench.ORTHANC):
        if not shutil.which(tool):
            sys.exit(f"nodes: {tool} not found (install DCMTK and Orthanc)")
    if pgserver.binaries() is None:
        sys.exit("nodes: PostgreSQL not found (apt-get install postgresql)")
    results, started, load = bench.guarded_run(run, args, ("dicoogled-*", "orthanc-*"))
    orthanc, plugin = installed_orthanc()
    header = (f"Ingest, {results['instances']:,} x 64x64 CT, {args.parallel} storescu spread over the nodes, "
              f"median of {results['runs']} run(s)\n{started:%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs, "
              f"load average at start {load:.1f}, Python {platform.python_version()}, "
              f"Orthanc {orthanc or '?'} (PostgreSQL plugin {plugin or 'not installed'}), "
              f"PostgreSQL {pgserver.binaries().parts[-2]}\n"
              "ratio = dicoogled / Orthanc (higher is better for dicoogled); a rate is given only if every "
              "instance was stored once.")
    print("\n" + header + "\n\n" + table(results, args.nodes))
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    out = bench.RESULTS / "nodes-latest.json"
    out.write_text(json.dumps({"started": started.isoformat(), "cpus": os.cpu_count(), "load_average_at_start": load,
                               "python": platform.python_version(), **results}, indent=2, ensure_ascii=False))
    print(f"\nwritten to {out.relative_to(bench.ROOT)}")
    return 1 if any(row[f"{kind}_failed"] for row in results["rows"] for kind in ("dicoogled", "orthanc")) else 0


if __name__ == "__main__":
    sys.exit(main())
