"""Watched folders: files are indexed in place as they arrive, change and go.

Each test starts the real daemon on a watched folder (``--watch``, ``[watch] folders`` or a
polling observer), changes files the way people and programs do (cp, shutil.copy, a slow
writer, mv, rm -r) and checks the index with C-FIND, by exact SOPInstanceUID.
"""

import io
import os
import pathlib
import re
import shutil
import subprocess
import time

import pydicom
import pytest
from pydicom.data import get_testdata_file

import studygen
from conftest import make_identifier, wait_until

QUIET_PERIOD = 1  # seconds; the [watch] quiet_period of these tests (the default is 2)
MR_SMALL_UID = "1.3.6.1.4.1.5962.1.1.4.1.1.20040826185059.5457"  # MR_small.dcm and MR_truncated.dcm
TINY_ALPHA = pathlib.Path(get_testdata_file("DICOMDIR")).parent / "TINY_ALPHA"  # a CD: DICOMDIR + 50 images


# ---- helpers ---------------------------------------------------------------------------------


def watch_config(*folders, poll=False) -> str:
    lines = ["[watch]", f"quiet_period = {QUIET_PERIOD}"]
    if folders:
        lines.append("folders =")
        lines += [f"    {folder}" for folder in folders]
    if poll:
        lines += ["poll = true", "poll_interval = 0.3"]
    return "\n".join(lines) + "\n"


@pytest.fixture(params=["args", "config", "poll"])
def watched(request, start_daemon, tmp_path):
    """(daemon, folder): a daemon watching an empty folder given by --watch, by the config
    file (inotify) or by the config file with poll = true."""
    folder = tmp_path / "watch"
    folder.mkdir()
    if request.param == "args":
        daemon = start_daemon(config_text=watch_config(), args=["--watch", str(folder)])
    else:
        daemon = start_daemon(config_text=watch_config(folder, poll=request.param == "poll"))
    daemon.settled()
    return daemon, folder


def instance_bytes(patient=0, study=0, series=0, instance=0, **overrides) -> tuple[bytes, str]:
    """(Part 10 bytes, SOPInstanceUID) of a generated CT instance."""
    ds = studygen.make_instance(patient, study, series, instance, **overrides)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue(), str(ds.SOPInstanceUID)


def write_instance(path: pathlib.Path, *numbers, **overrides) -> str:
    """Write a generated instance to path (parents created); return its SOPInstanceUID."""
    data, uid = instance_bytes(*numbers, **overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return uid


def uid_of(path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def found_uids(daemon, **keys) -> list[str]:
    """SOPInstanceUIDs of every instance C-FIND matches, sorted."""
    results, status = daemon.find(make_identifier("IMAGE", **{"SOPInstanceUID": "", **keys}))
    assert status == 0
    return sorted(str(ds.SOPInstanceUID) for ds in results)


def wait_for_uids(daemon, expected, timeout=30, **keys):
    expected = sorted(expected)
    try:
        wait_until(lambda: found_uids(daemon, **keys) == expected, timeout=timeout, interval=0.2,
                   message=f"C-FIND to return {len(expected)} instance(s)")
    except AssertionError:
        assert found_uids(daemon, **keys) == expected  # shows the difference
        raise


def index_rows(daemon) -> dict:
    """SOPInstanceUID -> (path, origin, size, mtime_ns), read from the index database itself."""
    rows = daemon.index_sql("SELECT sop_instance_uid, path, origin, size, mtime_ns FROM instances")
    return {uid: (path, origin, size, mtime) for uid, path, origin, size, mtime in rows}


def stored_files(daemon) -> list[pathlib.Path]:
    return sorted(p for p in (daemon.data_dir / "storage").rglob("*") if p.is_file())


def skipped(daemon) -> int:
    return daemon.health()["ingest"]["skipped"]


def skipped_paths(daemon) -> set[str]:
    """Paths named by the daemon's 'skipped PATH: reason' log lines."""
    return set(re.findall(r" skipped (/.*?): ", daemon.log))


# ---- files arriving ------------------------------------------------------------------------


@pytest.mark.parametrize("copy", ["cp", "shutil.copy"])
def test_copied_files_are_indexed_in_place(watched, studies, copy):
    daemon, folder = watched
    sources = studies(patients=1, studies=1, series=2, instances=2)
    targets = []
    for source in sources:
        target = folder / f"{source.parent.name}-{source.name}"
        if copy == "cp":
            subprocess.run(["cp", str(source), str(target)], check=True)
        else:
            shutil.copy(source, target)
        targets.append(target)
    expected = {uid_of(t): t for t in targets}
    wait_for_uids(daemon, expected)
    # Indexed in place: the index points at the watched files, nothing went to storage.
    rows = index_rows(daemon)
    assert {uid: row[0] for uid, row in rows.items()} == {uid: str(t) for uid, t in expected.items()}
    assert {row[1] for row in rows.values()} == {"watch"}
    assert stored_files(daemon) == []
    assert daemon.counts() == {"patients": 1, "studies": 1, "series": 2, "instances": 4}


def test_settled_waits_for_files_being_indexed(start_daemon, studies, tmp_path):
    """/health's watch.pending counts files queued for indexing, so settled() means indexed."""
    folder = tmp_path / "watch"
    folder.mkdir()
    daemon = start_daemon(config_text=watch_config(folder))
    daemon.settled()
    sources = studies(patients=2, studies=2, series=2, instances=25)  # 200 files
    subprocess.run(["cp", "-r", str(tmp_path / "generated"), str(folder / "batch")], check=True)
    wait_until(lambda: daemon.health()["ingest"]["indexed"] > 0, message="indexing to begin")
    daemon.settled()
    assert daemon.counts()["instances"] == len(sources)


def test_watched_files_are_not_changed(watched, studies):
    daemon, folder = watched
    source = studies(patients=1, studies=1, series=1, instances=1)[0]
    target = folder / "one.dcm"
    shutil.copyfile(source, target)
    before = (target.read_bytes(), target.stat().st_mtime_ns)
    wait_for_uids(daemon, [uid_of(source)])
    daemon.stop()
    assert (target.read_bytes(), target.stat().st_mtime_ns) == before
    assert sorted(p.name for p in folder.iterdir()) == ["one.dcm"]


def test_slow_writer_is_indexed_once_complete(watched):
    """A file written in chunks for longer than the quiet period is indexed once, complete."""
    daemon, folder = watched
    data, uid = instance_bytes(0, 0, 0, 7)
    target = folder / "slow.dcm"
    chunks = 20
    step = -(-len(data) // chunks)
    started = time.monotonic()
    with open(target, "wb") as handle:
        for offset in range(0, len(data), step):
            handle.write(data[offset:offset + step])
            handle.flush()
            time.sleep(0.15)  # a slow writer (well within the quiet period), not a wait for the daemon
            health = daemon.health()
            assert health["counts"]["instances"] == 0, f"indexed after {offset + step} of {len(data)} bytes"
            assert health["ingest"]["indexed"] == 0 and health["ingest"]["skipped"] == 0
    assert time.monotonic() - started > 2 * QUIET_PERIOD
    wait_for_uids(daemon, [uid])
    daemon.settled()
    health = daemon.health()
    assert health["ingest"]["indexed"] == 1  # once, not once per chunk
    assert health["ingest"]["skipped"] == 0  # never tried on a partial file
    stat = target.stat()
    assert index_rows(daemon)[uid] == (str(target), "watch", len(data), stat.st_mtime_ns)
    results, _ = daemon.find(make_identifier("IMAGE", SOPInstanceUID=uid, SliceLocation="", InstanceNumber=""))
    assert [(r.SliceLocation, r.InstanceNumber) for r in results] == [(-100 + 7 * 5, 8)]


def test_file_moved_in_from_outside(watched, tmp_path):
    daemon, folder = watched
    outside = tmp_path / "outside"
    uids = [write_instance(outside / f"{i}.dcm", 0, 0, 0, i) for i in range(3)]
    for i in range(3):
        os.rename(outside / f"{i}.dcm", folder / f"moved-{i}.dcm")
    wait_for_uids(daemon, uids)
    assert sorted(row[0] for row in index_rows(daemon).values()) == [str(folder / f"moved-{i}.dcm") for i in range(3)]


def test_nested_folders(watched):
    daemon, folder = watched
    deep = folder / "a" / "b" / "c"
    uids = [write_instance(deep / "d" / f"{i}.dcm", 0, 0, 0, i) for i in range(2)]
    uids.append(write_instance(folder / "a" / "top.dcm", 0, 0, 1, 0))
    wait_for_uids(daemon, uids)
    assert index_rows(daemon)[uids[2]][0] == str(folder / "a" / "top.dcm")


def test_folder_moved_in(watched, studies, tmp_path):
    daemon, folder = watched
    sources = studies(out="incoming", patients=2, studies=1, series=1, instances=2)
    uids = [uid_of(p) for p in sources]
    os.rename(tmp_path / "incoming", folder / "incoming")
    wait_for_uids(daemon, uids)
    paths = sorted(row[0] for row in index_rows(daemon).values())
    assert paths == sorted(str(folder / p.relative_to(tmp_path)) for p in sources)


def test_folder_renamed_inside_the_watched_folder(watched, studies, tmp_path):
    daemon, folder = watched
    sources = studies(out="watch/before", patients=1, studies=1, series=1, instances=3)
    uids = [uid_of(p) for p in sources]
    wait_for_uids(daemon, uids)
    os.rename(folder / "before", folder / "after")
    renamed = sorted(str(folder / "after" / p.relative_to(folder / "before")) for p in sources)
    wait_until(lambda: sorted(row[0] for row in index_rows(daemon).values()) == renamed,
               message="the index to follow the renamed folder")
    assert found_uids(daemon) == sorted(uids)


def test_cd_copied_in_dicomdir_skipped(watched):
    """A DICOMDIR is a directory, not an instance: skipped, while the images beside it are indexed."""
    daemon, folder = watched
    shutil.copytree(TINY_ALPHA, folder / "cd")
    images = [p for p in (folder / "cd").rglob("IM*")]
    assert len(images) == 50
    wait_for_uids(daemon, [uid_of(p) for p in images])
    wait_until(lambda: skipped(daemon) >= 2, message="the DICOMDIR and README to be skipped")
    daemon.settled()
    # copytree sets each file's mtime after writing it, so a file may be tried twice; but only
    # the DICOMDIR and the CD's README are skipped, each for its reason.
    assert skipped_paths(daemon) == {str(folder / "cd" / "DICOMDIR"), str(folder / "cd" / "README")}
    assert f"skipped {folder / 'cd' / 'DICOMDIR'}: a DICOMDIR" in daemon.log
    assert f"skipped {folder / 'cd' / 'README'}: not DICOM" in daemon.log
    assert str(folder / "cd" / "DICOMDIR") not in [row[0] for row in index_rows(daemon).values()]


# ---- files going and changing --------------------------------------------------------------


def test_file_removed_is_unindexed(watched):
    daemon, folder = watched
    keep = write_instance(folder / "keep.dcm", 0, 0, 0, 0)
    gone = write_instance(folder / "gone.dcm", 0, 0, 0, 1)
    wait_for_uids(daemon, [keep, gone])
    (folder / "gone.dcm").unlink()
    wait_for_uids(daemon, [keep])
    assert list(index_rows(daemon)) == [keep]


def test_file_moved_out_is_unindexed(watched, tmp_path):
    daemon, folder = watched
    keep = write_instance(folder / "keep.dcm", 0, 0, 0, 0)
    moved = write_instance(folder / "moved.dcm", 1, 0, 0, 0)
    wait_for_uids(daemon, [keep, moved])
    os.rename(folder / "moved.dcm", tmp_path / "moved.dcm")
    wait_for_uids(daemon, [keep])
    assert daemon.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 1}


@pytest.mark.parametrize("how", ["overwrite", "rename over", "rename over from inside"])
def test_file_replaced_with_another_instance(watched, tmp_path, how):
    daemon, folder = watched
    target = folder / "image.dcm"
    old = write_instance(target, 0, 0, 0, 0)
    wait_for_uids(daemon, [old])
    if how == "overwrite":
        new = write_instance(target, 1, 0, 0, 0)
    else:  # the way editors and rsync replace a file: write aside, then rename over it
        aside = (folder if how.endswith("inside") else tmp_path) / ".image.dcm.tmp"
        new = write_instance(aside, 1, 0, 0, 0)
        os.replace(aside, target)
    assert new != old
    wait_for_uids(daemon, [new])
    assert found_uids(daemon, SOPInstanceUID=old) == []
    assert index_rows(daemon)[new][0] == str(target)
    # The old patient, study and series went with their only instance.
    assert daemon.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 1}


def test_file_renamed(watched):
    daemon, folder = watched
    uid = write_instance(folder / "before.dcm", 0, 0, 0, 0)
    wait_for_uids(daemon, [uid])
    os.rename(folder / "before.dcm", folder / "after.dcm")
    wait_until(lambda: index_rows(daemon).get(uid, ("",))[0] == str(folder / "after.dcm"),
               message="the index to follow the renamed file")
    assert found_uids(daemon) == [uid]


def test_second_copy_takes_over_when_the_first_goes(watched, studies, tmp_path):
    """The same instances copied twice: one copy is indexed; delete it and the other one is."""
    daemon, folder = watched
    sources = studies(out="source", patients=1, studies=1, series=1, instances=2)
    uids = [uid_of(p) for p in sources]
    shutil.copytree(tmp_path / "source", folder / "first")
    wait_for_uids(daemon, uids)
    shutil.copytree(tmp_path / "source", folder / "backup")
    wait_until(lambda: daemon.health()["ingest"]["duplicates"] >= 2, message="the backup copy to be seen")
    shutil.rmtree(folder / "first")
    wait_until(lambda: sorted(row[0] for row in index_rows(daemon).values())
               == sorted(str(folder / "backup" / p.relative_to(tmp_path / "source")) for p in sources),
               message="the backup copy to be indexed")
    assert found_uids(daemon) == sorted(uids)


def test_watched_folder_deleted_and_recreated(watched):
    daemon, folder = watched
    first = write_instance(folder / "a.dcm", 0, 0, 0, 0)
    wait_for_uids(daemon, [first])
    shutil.rmtree(folder)
    wait_for_uids(daemon, [])
    folder.mkdir()
    second = write_instance(folder / "b.dcm", 1, 0, 0, 0)
    wait_for_uids(daemon, [second])


def test_file_changed_in_place_is_reindexed(watched):
    daemon, folder = watched
    target = folder / "image.dcm"
    uid = write_instance(target, 0, 0, 0, 0, StudyDescription="BEFORE")
    wait_for_uids(daemon, [uid], StudyDescription="BEFORE")
    assert write_instance(target, 0, 0, 0, 0, StudyDescription="AFTER CHANGE") == uid
    wait_for_uids(daemon, [uid], StudyDescription="AFTER CHANGE")
    assert found_uids(daemon, StudyDescription="BEFORE") == []


def test_corrected_study_attributes_are_seen(start_daemon, tmp_path):
    """Every file of a study rewritten with corrected patient, study and series attributes:
    C-FIND at each level answers with the corrected values, not those first indexed."""
    folder = tmp_path / "watch"
    folder.mkdir()
    daemon = start_daemon(config_text=watch_config(folder))
    paths = [folder / f"{i}.dcm" for i in range(3)]
    old = dict(PatientName="WRONG^NAME", StudyDescription="WRONG STUDY", SeriesDescription="WRONG SERIES")
    uids = [write_instance(path, 0, 0, 0, i, **old) for i, path in enumerate(paths)]
    wait_for_uids(daemon, uids, StudyDescription="WRONG STUDY")
    new = dict(PatientName="RIGHT^NAME", StudyDescription="RIGHT STUDY", SeriesDescription="RIGHT SERIES")
    for i, path in enumerate(paths):
        assert write_instance(path, 0, 0, 0, i, **new) == uids[i]
    wait_until(lambda: all(len(index_rows(daemon).get(uid, ())) and index_rows(daemon)[uid][3] == p.stat().st_mtime_ns
                           for uid, p in zip(uids, paths)), message="every rewritten file to be indexed again")
    assert found_uids(daemon, StudyDescription="RIGHT STUDY") == sorted(uids)
    for level, key, value in (("PATIENT", "PatientName", "RIGHT^NAME"), ("STUDY", "StudyDescription", "RIGHT STUDY"),
                              ("SERIES", "SeriesDescription", "RIGHT SERIES")):
        results, status = daemon.find(make_identifier(level, **{key: ""}), model="patient" if level == "PATIENT" else "study")
        assert status == 0
        assert [str(r[key].value) for r in results] == [value], level
    assert daemon.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 3}


def test_study_moved_to_another_patient(start_daemon, tmp_path):
    """Every file of a study rewritten with a corrected PatientID: the study is the new patient's."""
    folder = tmp_path / "watch"
    folder.mkdir()
    daemon = start_daemon(config_text=watch_config(folder))
    paths = [folder / f"{i}.dcm" for i in range(2)]
    uids = [write_instance(path, 0, 0, 0, i, PatientID="WRONG-ID") for i, path in enumerate(paths)]
    wait_for_uids(daemon, uids, PatientID="WRONG-ID")
    for i, path in enumerate(paths):
        write_instance(path, 0, 0, 0, i, PatientID="RIGHT-ID")
    wait_until(lambda: all(index_rows(daemon).get(uid, (None,) * 4)[3] == p.stat().st_mtime_ns
                           for uid, p in zip(uids, paths)), message="every rewritten file to be indexed again")
    results, status = daemon.find(make_identifier("PATIENT", PatientID="", NumberOfPatientRelatedStudies=""), model="patient")
    assert status == 0
    assert [(str(r.PatientID), int(r.NumberOfPatientRelatedStudies)) for r in results] == [("RIGHT-ID", 1)]


def test_series_moved_to_another_study(start_daemon, tmp_path):
    """Every file of a series rewritten with a corrected StudyInstanceUID: the series is the other
    study's, and the study it left, now empty, is gone."""
    folder = tmp_path / "watch"
    folder.mkdir()
    daemon = start_daemon(config_text=watch_config(folder))
    paths = [folder / f"{i}.dcm" for i in range(2)]
    uids = [write_instance(path, 0, 0, 0, i, StudyInstanceUID="1.2.826.0.1.3680043.2.1143.901") for i, path in enumerate(paths)]
    wait_for_uids(daemon, uids)
    for i, path in enumerate(paths):
        write_instance(path, 0, 0, 0, i, StudyInstanceUID="1.2.826.0.1.3680043.2.1143.902")
    wait_until(lambda: all(index_rows(daemon).get(uid, (None,) * 4)[3] == p.stat().st_mtime_ns
                           for uid, p in zip(uids, paths)), message="every rewritten file to be indexed again")
    results, status = daemon.find(make_identifier("STUDY", StudyInstanceUID="", NumberOfStudyRelatedSeries="",
                                                  NumberOfStudyRelatedInstances=""))
    assert status == 0
    assert [(str(r.StudyInstanceUID), int(r.NumberOfStudyRelatedSeries), int(r.NumberOfStudyRelatedInstances))
            for r in results] == [("1.2.826.0.1.3680043.2.1143.902", 1, 2)]
    assert daemon.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 2}


@pytest.mark.parametrize("how", ["rm -r", "shutil.rmtree", "moved out"])
def test_folder_deleted_unindexes_its_instances(watched, studies, tmp_path, how):
    daemon, folder = watched
    doomed = studies(out="watch/doomed", patients=2, studies=1, series=2, instances=2)
    keep = write_instance(folder / "keep" / "keep.dcm", 5, 0, 0, 0)
    wait_for_uids(daemon, [uid_of(p) for p in doomed] + [keep])
    if how == "rm -r":
        subprocess.run(["rm", "-r", str(folder / "doomed")], check=True)
    elif how == "shutil.rmtree":
        shutil.rmtree(folder / "doomed")
    else:
        os.rename(folder / "doomed", tmp_path / "elsewhere")
    wait_for_uids(daemon, [keep])
    assert daemon.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 1}


# ---- files that are not instances ------------------------------------------------------------


def test_bad_files_are_skipped_with_a_log_line(watched, testdata):
    """Not DICOM, empty, or cut short: skipped, logged by name, counted; nothing crashes."""
    daemon, folder = watched
    whole, whole_uid = instance_bytes(0, 0, 0, 1)
    header_cut = whole.rindex(whole_uid.encode()) + 10  # inside the data set's SOPInstanceUID value
    bad = {
        "notes.txt": (b"not a DICOM file\n" * 20, "not DICOM"),
        "random.dcm": (bytes(range(256)) * 8, "not DICOM"),
        "empty.dcm": (b"", ""),
        "MR_truncated.dcm": (testdata("MR_truncated.dcm").read_bytes(), "truncated"),
        "rtplan_truncated.dcm": (testdata("rtplan_truncated.dcm").read_bytes(), "truncated"),
        "half.dcm": (whole[: len(whole) // 2], "truncated"),
        "header-cut.dcm": (whole[:header_cut], "truncated"),
    }
    for name, (data, _) in bad.items():
        (folder / name).write_bytes(data)
    good = write_instance(folder / "good.dcm", 0, 0, 0, 0)
    wait_for_uids(daemon, [good])
    wait_until(lambda: skipped(daemon) >= len(bad), message="every bad file to be skipped")
    daemon.settled()
    assert skipped(daemon) == len(bad)
    log = daemon.log
    for name, (_, reason) in bad.items():
        assert f"skipped {folder / name}: {reason}" in log
    assert "Traceback" not in log
    assert list(index_rows(daemon)) == [good]
    # Still serving.
    assert daemon.health()["status"] == "ok"
    daemon.dcmtk("echoscu")
    after = write_instance(folder / "after.dcm", 0, 0, 0, 2)
    wait_for_uids(daemon, [good, after])


def test_truncated_file_completed_later_is_indexed(watched, testdata):
    daemon, folder = watched
    data, uid = instance_bytes(0, 0, 0, 3)
    half = folder / "half.dcm"
    half.write_bytes(data[: len(data) // 2])
    (folder / "mr.dcm").write_bytes(testdata("MR_truncated.dcm").read_bytes())
    wait_until(lambda: skipped(daemon) == 2, message="both truncated files to be skipped")
    assert found_uids(daemon) == []
    with open(half, "ab") as handle:  # the copy finishes
        handle.write(data[len(data) // 2:])
    (folder / "mr.dcm").write_bytes(testdata("MR_small.dcm").read_bytes())
    wait_for_uids(daemon, [uid, MR_SMALL_UID])
    assert index_rows(daemon)[uid][2] == len(data)


def test_compressed_file_with_trailing_padding_is_indexed(watched, testdata):
    """Encapsulated pixel data followed by (FFFC,FFFC) padding is complete, not truncated."""
    daemon, folder = watched
    for name in ("MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm"):
        (folder / name).write_bytes(testdata(name).read_bytes())
    expected = [uid_of(testdata(name)) for name in ("MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm")]
    wait_for_uids(daemon, expected)
    assert skipped(daemon) == 0


def test_compressed_file_cut_short_is_skipped(watched, testdata):
    daemon, folder = watched
    data = testdata("SC_rgb_rle.dcm").read_bytes()
    pixel_start = data.rindex(b"\xe0\x7f\x10\x00")
    cut = pixel_start + (len(data) - pixel_start) // 2  # inside the fragments
    (folder / "cut.dcm").write_bytes(data[:cut])
    wait_until(lambda: f"skipped {folder / 'cut.dcm'}: truncated" in daemon.log, message="the cut file to be skipped")
    assert skipped(daemon) == 1
    assert found_uids(daemon) == []


# ---- startup reconciliation ------------------------------------------------------------------


def test_startup_reconciliation(start_daemon, tmp_path):
    """Changes made while the daemon is stopped are found at the next start."""
    folder = tmp_path / "watch"
    a = write_instance(folder / "a.dcm", 0, 0, 0, 0)  # there before the first start
    b = write_instance(folder / "sub" / "b.dcm", 0, 0, 0, 1)
    c = write_instance(folder / "c.dcm", 0, 0, 0, 2, ImageComments="FIRST")
    daemon = start_daemon(config_text=watch_config(folder))
    daemon.settled()
    assert found_uids(daemon) == sorted([a, b, c])
    assert daemon.stop() == 0

    (folder / "a.dcm").unlink()  # removed
    d = write_instance(folder / "new" / "d.dcm", 1, 0, 0, 0)  # added
    e = write_instance(folder / "sub" / "b.dcm", 2, 0, 0, 0)  # replaced by another instance
    assert write_instance(folder / "c.dcm", 0, 0, 0, 2, ImageComments="SECOND") == c  # changed
    daemon.start()
    daemon.settled()
    assert found_uids(daemon) == sorted([c, d, e])
    assert found_uids(daemon, ImageComments="SECOND") == [c]
    assert found_uids(daemon, ImageComments="FIRST") == []
    assert {uid: row[0] for uid, row in index_rows(daemon).items()} == {
        c: str(folder / "c.dcm"), d: str(folder / "new" / "d.dcm"), e: str(folder / "sub" / "b.dcm"),
    }
    assert daemon.counts()["patients"] == 3
    # Nothing changed since: a second restart indexes nothing again.
    daemon.restart()
    health = daemon.settled()
    assert health["ingest"]["indexed"] == 0
    assert found_uids(daemon) == sorted([c, d, e])


def test_startup_reconciliation_of_a_removed_folder(start_daemon, tmp_path, studies):
    folder = tmp_path / "watch"
    sources = studies(out="watch/gone", patients=1, studies=1, series=1, instances=3)
    keep = write_instance(folder / "keep.dcm", 3, 0, 0, 0)
    daemon = start_daemon(config_text=watch_config(folder))
    daemon.settled()
    assert found_uids(daemon) == sorted([uid_of(p) for p in sources] + [keep])
    daemon.stop()
    shutil.rmtree(folder / "gone")
    daemon.start()
    daemon.settled()
    assert found_uids(daemon) == [keep]


def test_several_folders_in_the_config(start_daemon, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    a = write_instance(first / "a.dcm", 0, 0, 0, 0)
    daemon = start_daemon(config_text=watch_config(first, second))
    daemon.settled()
    assert daemon.health()["watch"]["folders"] == [str(first), str(second)]
    b = write_instance(second / "b.dcm", 1, 0, 0, 0)
    wait_for_uids(daemon, [a, b])
