"""The codec worker: pixels are decoded in a child process of the daemon, never in the daemon.

numpy, Pillow and the pixel codecs stay out of the daemon's memory (no shared object of theirs in
its /proc/PID/maps) while every image it serves, rendered or decoded, matches pydicom's own
decoding done here. A worker killed in the middle of a request, or too slow, fails that request
with a JSON reason, and the next request gets a fresh worker; an idle worker ends, and starts
again when needed. Workers are frozen with SIGSTOP to catch them mid-request: no timing guesses.
"""

import concurrent.futures
import contextlib
import io
import os
import pathlib
import re
import signal
import sys

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from conftest import ROOT, wait_until

sys.path.insert(0, str(ROOT))
import dicoogled  # noqa: E402  (its Config, for the settings)

PASSWORD = "codec-secret"
ENV = {"DICOOGLED_ADMIN_PASSWORD": PASSWORD}
#: The packages the daemon leaves to its worker, and the folders of the libraries their wheels bundle.
CODEC_PACKAGES = {"numpy", "numpy.libs", "PIL", "pillow.libs", "openjpeg", "libjpeg", "rle", "jpeg_ls", "pylibjpeg"}
#: Codec extensions installed beside their packages rather than in them: module -> package.
CODEC_EXTENSIONS = {"_openjpeg": "openjpeg", "_libjpeg": "libjpeg", "_CharLS": "jpeg_ls"}
#: One file per codec: label -> pydicom's bundled file.
FILES = {
    "ct": "CT_small.dcm",  # uncompressed, grey, with a rescale
    "j2k": "JPEG2000.dcm",  # openjpeg
    "jpeg": "SC_rgb_jpeg_dcmtk.dcm",  # libjpeg, colour
    "jpeg_ls": "MR_small_jpeg_ls_lossless.dcm",  # jpeg_ls
    "rle": "MR_small_RLE.dcm",  # rle
}


def codec_libraries(pid: int) -> set[str]:
    """Which of CODEC_PACKAGES have a shared object mapped in process pid."""
    found = set()
    for line in pathlib.Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = pathlib.PurePath(line.split(maxsplit=5)[-1])
        module = path.name.split(".")[0]
        if ".so" in path.name:
            found |= CODEC_PACKAGES & set(path.parts[:-1])
            if module in CODEC_EXTENSIONS:
                found.add(CODEC_EXTENSIONS[module])
    return found


def stored(daemon, *labels) -> dict[str, pydicom.Dataset]:
    """pydicom's files under fresh UIDs, stored in the daemon: label -> data set."""
    datasets = {}
    for label in labels:
        ds = pydicom.dcmread(get_testdata_file(FILES[label]))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        datasets[label] = ds
    assert daemon.store(*datasets.values()) == [0] * len(datasets)
    return datasets


def session_for(daemon) -> requests.Session:
    session = requests.Session()
    session.auth = ("admin", PASSWORD)
    session.base = f"http://127.0.0.1:{daemon.http_port}"
    return session


def dic2png(session, ds, **params) -> requests.Response:
    return session.get(f"{session.base}/dic2png", params={"SOPInstanceUID": ds.SOPInstanceUID, **params}, timeout=120)


def instance_url(session, ds) -> str:
    return f"{session.base}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def pixels_of(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


def full_range(ds) -> np.ndarray:
    """What a viewer first shows of a grey image without a window: its full range in 0..255."""
    values = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    return (values - values.min()) / (values.max() - values.min()) * 255


def workers(daemon) -> dict:
    return daemon.health()["codec_workers"]


def started_pids(daemon) -> list[int]:
    """The pids of the workers the daemon has started, from its log, oldest first."""
    return [int(pid) for pid in re.findall(r"codec worker (\d+) started", daemon.log)]


@contextlib.contextmanager
def frozen(pid: int):
    """A worker stopped with SIGSTOP: it takes requests and answers none. Killed on the way out."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---- nothing of it in the daemon ------------------------------------------------------------------

def test_the_daemon_never_loads_numpy_pillow_or_a_codec(start_daemon):
    daemon = start_daemon(env=ENV)
    datasets = stored(daemon, *FILES)
    session = session_for(daemon)
    assert codec_libraries(daemon.process.pid) == set()
    assert workers(daemon)["running"] == [], "a worker started before anything asked for pixels"

    # /dic2png, full size and as a thumbnail: grey levels as pydicom decodes them.
    ct = pixels_of(dic2png(session, datasets["ct"]))
    assert ct.shape == (128, 128) and np.abs(ct - full_range(datasets["ct"])).max() <= 1
    thumbnail = pixels_of(dic2png(session, datasets["ct"], thumbnail="true"))
    assert np.abs(thumbnail - ct.reshape(64, 2, 64, 2).mean(axis=(1, 3))).max() <= 1
    for label in ("jpeg_ls", "rle"):  # lossless: the same grey levels as the uncompressed MR
        window = datasets[label]
        expected = np.clip(((window.pixel_array - (window.WindowCenter - 0.5)) / (window.WindowWidth - 1) + 0.5) * 255, 0, 255)
        assert np.abs(pixels_of(dic2png(session, window)) - expected).max() <= 1, label

    # DICOMweb: rendered as PNG and as JPEG (Pillow), frames decoded, a file decompressed.
    rendered = pixels_of(session.get(instance_url(session, datasets["j2k"]) + "/rendered", headers={"Accept": "image/png"}))
    assert np.abs(rendered - full_range(datasets["j2k"])).max() <= 1
    colour = pixels_of(session.get(instance_url(session, datasets["jpeg"]) + "/rendered", headers={"Accept": "image/jpeg"}))
    assert colour.shape == (100, 100, 3) and np.abs(colour.astype(int) - datasets["jpeg"].pixel_array).mean() < 4
    frame = session.get(instance_url(session, datasets["jpeg_ls"]) + "/frames/1",
                        headers={"Accept": "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"})
    assert frame.status_code == 200, frame.text
    assert datasets["jpeg_ls"].pixel_array.astype("<i2").tobytes() in frame.content
    decompressed = session.get(instance_url(session, datasets["j2k"]),
                               headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'})
    assert decompressed.status_code == 200, decompressed.text
    start = decompressed.content.index(b"DICM") - 128
    copy = pydicom.dcmread(io.BytesIO(decompressed.content[start:]))
    assert copy.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert (copy.pixel_array == datasets["j2k"].pixel_array).all()

    # All of it was decoded by the worker, where the libraries are; none reached the daemon.
    (worker,) = workers(daemon)["running"]
    assert {"numpy", "PIL", "openjpeg", "libjpeg", "jpeg_ls", "rle"} <= codec_libraries(worker["pid"])
    assert codec_libraries(daemon.process.pid) == set()
    assert workers(daemon)["started"] == 1


# ---- a crash fails one request ---------------------------------------------------------------------

def test_a_worker_killed_mid_request_fails_that_request_and_the_next_gets_a_new_one(start_daemon):
    daemon = start_daemon(env=ENV)
    ct = stored(daemon, "ct")["ct"]
    session = session_for(daemon)
    first = pixels_of(dic2png(session, ct))
    (pid,) = started_pids(daemon)
    with frozen(pid), concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(dic2png, session, ct)
        wait_until(lambda: workers(daemon)["running"] == [{"pid": pid, "busy": True}], message="the request in the worker")
        os.kill(pid, signal.SIGKILL)  # a codec crashing on a hostile file looks the same from outside
        response = answer.result(timeout=60)
    assert response.status_code == 502
    assert response.headers["Content-Type"].startswith("application/json")
    assert "killed by signal 9" in response.json()["error"]
    assert f"codec worker {pid} ended during a render request: killed by signal 9 (SIGKILL)" in daemon.log

    again = dic2png(session, ct)
    assert (pixels_of(again) == first).all()
    new_pid = started_pids(daemon)[-1]
    assert new_pid != pid and workers(daemon)["running"] == [{"pid": new_pid, "busy": False}]
    assert {key: workers(daemon)[key] for key in ("started", "crashed")} == {"started": 2, "crashed": 1}
    assert daemon.health()["status"] == "ok"


def test_a_worker_over_its_time_is_ended_and_its_request_answered_504(start_daemon):
    daemon = start_daemon(config_text="[codecs]\ntimeout = 1\n", env=ENV)
    ct = stored(daemon, "ct")["ct"]
    session = session_for(daemon)
    rendered = instance_url(session, ct) + "/rendered"
    first = pixels_of(session.get(rendered, headers={"Accept": "image/png"}))
    (pid,) = started_pids(daemon)
    with frozen(pid):  # a codec looping forever on a hostile file
        response = session.get(rendered, headers={"Accept": "image/png"}, timeout=60)
        assert response.status_code == 504
        assert "more than 1 s" in response.json()["error"]
        assert not pathlib.Path(f"/proc/{pid}").exists(), "the slow worker still runs"
    assert (pixels_of(session.get(rendered, headers={"Accept": "image/png"})) == first).all()
    assert workers(daemon)["timed_out"] == 1 and started_pids(daemon)[-1] != pid
    plugins = session.get(f"{session.base}/plugins").json()["plugins"]
    assert next(p for p in plugins if p["name"] == "dicomweb")["failures"] == 0, "the worker's failure is not the plugin's"


def test_a_worker_slow_to_start_still_has_its_whole_time_to_decode(start_daemon, tmp_path):
    # Python starting on a busy machine is not the file's fault: the time limit counts from the
    # worker saying it is ready. Here every worker takes 2 s to start, and the limit is 1 s.
    slow = tmp_path / "slow-start"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text('import sys, time\nif "-c" in sys.orig_argv:\n    time.sleep(2)\n')
    daemon = start_daemon(config_text="[codecs]\ntimeout = 1\n", env={**ENV, "PYTHONPATH": str(slow)})
    ct = stored(daemon, "ct")["ct"]
    session = session_for(daemon)
    assert (pixels_of(dic2png(session, ct)) == pixels_of(dic2png(session, ct))).all()
    assert workers(daemon)["timed_out"] == 0 and len(started_pids(daemon)) == 1


def test_a_worker_that_cannot_start_fails_its_request_502_and_the_archive_goes_on(start_daemon, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "numpy.py").write_text("raise SystemExit(3)\n")  # the daemon never imports numpy; its worker does
    daemon = start_daemon(env={**ENV, "PYTHONPATH": str(broken)})
    ct = stored(daemon, "ct")["ct"]
    session = session_for(daemon)
    response = dic2png(session, ct)
    assert response.status_code == 502
    assert "a codec worker could not start (exit code 3)" in response.json()["error"]
    assert workers(daemon)["crashed"] == 1 and workers(daemon)["running"] == []
    assert "could not start: exit code 3" in daemon.log
    found = session.get(f"{session.base}/dicom-web/studies", params={"StudyInstanceUID": ct.StudyInstanceUID})
    assert found.status_code == 200 and len(found.json()) == 1, "the archive answers what needs no pixels"


# ---- idle workers end --------------------------------------------------------------------------------

def test_an_idle_worker_ends_and_the_next_request_starts_one(start_daemon):
    daemon = start_daemon(config_text="[codecs]\nidle_seconds = 0.5\n", env=ENV)
    ct = stored(daemon, "ct")["ct"]
    session = session_for(daemon)
    first = pixels_of(dic2png(session, ct))
    (pid,) = started_pids(daemon)
    wait_until(lambda: workers(daemon)["ended_idle"] == 1, message="the idle worker to end")
    assert workers(daemon)["running"] == [] and not pathlib.Path(f"/proc/{pid}").exists()
    assert f"codec worker {pid} ended after 0.5 s idle" in daemon.log
    assert (pixels_of(dic2png(session, ct)) == first).all()
    assert len(started_pids(daemon)) == 2 and started_pids(daemon)[-1] != pid


@pytest.mark.parametrize("setting", ["workers = 0", "idle_seconds = 0", "timeout = -1"])
def test_codec_settings_that_cannot_work_are_refused(tmp_path, setting):
    path = tmp_path / "codecs.ini"
    path.write_text(f"[codecs]\n{setting}\n")
    with pytest.raises(ValueError, match=r"\[codecs\]"):
        dicoogled.Config.load(path, data_dir=tmp_path / "data")
