"""[dicom] workers: storage associations served in worker processes, on every core.

The daemon keeps one index, one set of association slots, one quota and one run of the plugins;
the workers read and write. Many peers at once must store everything exactly once, with each
event once; limits hold across workers; a worker killed in the middle of an association fails
that association only, and a new worker serves the next one; SIGTERM stops everything cleanly.
"""

import json
import os
import pathlib
import signal
import subprocess
import textwrap

import pydicom
from pynetdicom import AE

from conftest import AET, NODELAY, wait_until
from test_engine import LOCAL_LIMIT_EXCEEDED, RECORDER, SUCCESS, RawPeer, echo

WORKERS = "[dicom]\nworkers = 2\n"
OUT_OF_RESOURCES = 0xA700


def worker_pids(daemon) -> set[int]:
    """The daemon's worker processes: its children started by multiprocessing's spawn."""
    pids = set()
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if parent == daemon.process.pid and b"spawn_main" in command:
            pids.add(int(stat.parent.name))
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = pathlib.Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def storescu(daemon, batches, calling="SCU"):
    """One DCMTK storescu per batch, all at once; their outputs once all are done."""
    processes = [subprocess.Popen(["storescu", "-aet", f"{calling}{n}", "-aec", AET, "127.0.0.1", str(daemon.dicom_port),
                                   *map(str, paths)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for n, paths in enumerate(batches)]
    return [(process.communicate(timeout=300)[0], process.returncode) for process in processes]


def sop_uid(path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_many_associations_across_workers_store_everything_once(start_daemon, studies, tmp_path):
    plugins, events = tmp_path / "plugins", tmp_path / "events.jsonl"
    plugins.mkdir()
    (plugins / "recorder.py").write_text(textwrap.dedent(RECORDER))
    daemon = start_daemon(config_text=WORKERS + f"[plugin.recorder]\nfile = {events}\n",
                          args=["--plugins-dir", str(plugins)])
    assert len(wait_until(lambda: len(worker_pids(daemon)) == 2 and worker_pids(daemon),
                          message="two worker processes")) == 2
    peers = 8
    batches = [studies(out=f"peer{n}", patients=1, studies=1, series=1, instances=12, seed=n + 1) for n in range(peers)]
    # Each batch twice, by two peers at once: the duplicate policy must hold across workers.
    results = storescu(daemon, batches + batches, calling="SCU")
    assert all(code == 0 for _, code in results), results
    expected = {sop_uid(path) for paths in batches for path in paths}
    assert daemon.counts()["instances"] == len(expected)
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert sorted(line["uid"] for line in lines) == sorted(expected), "each instance stored once, each event once"
    stored = list((daemon.data_dir / "storage").rglob("*.dcm"))
    assert len(stored) == len(expected)
    assert not list((daemon.node_dir / "tmp").glob("store-*")), "no temp file left behind"
    assert wait_until(lambda: daemon.health()["dicom"]["associations"] == 0, message="every slot free")
    assert echo(daemon) == SUCCESS


def test_limits_hold_across_workers(start_daemon, studies):
    daemon = start_daemon(config_text=WORKERS + "max_associations = 2\n[storage]\nmax_instances = 10\n")
    wait_until(lambda: len(worker_pids(daemon)) == 2, message="two worker processes")
    holders = [RawPeer(daemon.dicom_port).associate(calling=f"HOLDER{n}") for n in range(2)]
    try:
        assert echo(daemon, calling="LATECOMER") == LOCAL_LIMIT_EXCEEDED
    finally:
        for holder in holders:
            holder.close()
    wait_until(lambda: daemon.health()["dicom"]["associations"] == 0, message="the slots to be free")
    # 4 peers at once offer 24 instances to a quota of 10: exactly 10 are kept.
    batches = [studies(out=f"peer{n}", patients=1, studies=1, series=1, instances=6, seed=n + 1) for n in range(4)]
    storescu(daemon, batches)
    assert daemon.counts()["instances"] == 10
    assert len(list((daemon.data_dir / "storage").rglob("*.dcm"))) == 10
    assert "out of resources" in daemon.log


def _store_association(daemon, paths):
    ae = AE(ae_title="KILLTEST")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title=AET, evt_handlers=NODELAY)
    assert assoc.is_established
    return assoc


def test_a_killed_worker_fails_its_association_and_the_next_one_works(start_daemon, studies):
    daemon = start_daemon(config_text=WORKERS)
    first = wait_until(lambda: len(worker_pids(daemon)) == 2 and worker_pids(daemon), message="two worker processes")
    paths = studies(patients=1, studies=1, series=1, instances=3)
    assoc = _store_association(daemon, paths)
    try:
        assert assoc.send_c_store(pydicom.dcmread(paths[0])).Status == SUCCESS
        for pid in first:  # whichever serves it
            os.kill(pid, signal.SIGKILL)
        status = assoc.send_c_store(pydicom.dcmread(paths[1]))
        assert "Status" not in status, "no status from a dead worker: the store is not acknowledged"
        wait_until(lambda: not assoc.is_established, message="the association to end")
    finally:
        if assoc.is_established:
            assoc.abort()
    wait_until(lambda: not any(alive(pid) for pid in first), message="the killed workers to be gone")
    second = wait_until(lambda: len(worker_pids(daemon)) == 2 and worker_pids(daemon), message="two new workers")
    assert not second & first
    wait_until(lambda: daemon.health()["dicom"]["associations"] == 0, message="the dead worker's slot to be free")
    assert daemon.counts()["instances"] == 1, "what was acknowledged, and nothing else"
    assert "DICOM worker process" in daemon.log and "starting another" in daemon.log
    assert daemon.store(paths[1], paths[2]) == [SUCCESS, SUCCESS]
    assert daemon.counts()["instances"] == 3


def test_sigterm_stops_the_workers_and_aborts_their_associations(start_daemon, studies):
    daemon = start_daemon(config_text=WORKERS)
    workers = wait_until(lambda: len(worker_pids(daemon)) == 2 and worker_pids(daemon), message="two worker processes")
    paths = studies(patients=1, studies=1, series=1, instances=1)
    assert daemon.store(*paths) == [SUCCESS]
    peer = RawPeer(daemon.dicom_port).associate()  # an idle association, in a worker
    try:
        assert daemon.stop() == 0
        assert peer.closed_by_daemon()
    finally:
        peer.close()
    assert not any(alive(pid) for pid in workers), "no worker outlives the daemon"
    assert "DICOM listener closed" in daemon.log
    assert "did not stop: killed" not in daemon.log
    daemon.start()
    assert daemon.counts()["instances"] == 1
