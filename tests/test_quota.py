"""Storage quotas ([storage] max_instances, max_size_mb, when_full): reached under load by
parallel associations, nothing acknowledged is lost, nothing refused is left half-stored, and
recycling deletes the oldest unprotected studies only."""

import concurrent.futures
import json
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import studygen  # noqa: E402
from conftest import AET, NODELAY, ROOT, wait_until  # noqa: E402
from pynetdicom import AE  # noqa: E402
from restclient import ADMIN_ENV, Client, admin_client, base_url, stow  # noqa: E402

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
NO_RESERVE = "[storage]\nmin_free_mb = 0\n"


def study(number: int, instances: int, series: int = 0, modality: str = "CT") -> list:
    """The instances of one generated study (patient `number`, so studies never share a patient)."""
    return [studygen.make_instance(number, 0, series, n, modality=modality) for n in range(instances)]


def store_on_one_association(daemon, datasets) -> dict:
    """C-STORE the data sets on one association: SOPInstanceUID -> status."""
    ae = AE(ae_title="QUOTASCU")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title=AET, evt_handlers=NODELAY)
    assert assoc.is_established
    try:
        return {ds.SOPInstanceUID: assoc.send_c_store(ds).Status for ds in datasets}
    finally:
        assoc.release()


def stored_uids(daemon) -> set:
    """SOPInstanceUIDs of the files in storage (their names)."""
    return {path.stem for path in (daemon.data_dir / "storage").rglob("*.dcm")}


def indexed_uids(daemon, *batches) -> set:
    """SOPInstanceUIDs that C-FIND finds in the series of the given data sets."""
    found = set()
    for study_uid, series_uid in {(ds.StudyInstanceUID, ds.SeriesInstanceUID) for batch in batches for ds in batch}:
        results, _ = daemon.find({"level": "IMAGE", "StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid,
                                  "SOPInstanceUID": ""})
        found |= {str(ds.SOPInstanceUID) for ds in results}
    return found


def dicoogled(daemon, *args) -> subprocess.CompletedProcess:
    """A command of dicoogled on a (stopped) daemon's data dir and configuration."""
    return subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), *args, "--data-dir", str(daemon.data_dir), *daemon.index_args,
                           "--config", str(daemon.config_path)], capture_output=True, text=True)


def consistent(daemon) -> subprocess.CompletedProcess:
    """'dicoogled check' of a stopped daemon's data dir: files and index agree (exit 0)."""
    return dicoogled(daemon, "check")


def test_max_instances_holds_under_four_parallel_associations(start_daemon):
    """Four associations push 32 instances at a quota of 10: none overshoots it, every
    acknowledged instance is stored and indexed, every refused one (0xA700) left nothing; at
    rest the quota is exact: it fills to 10 and the 11th is refused."""
    daemon = start_daemon(NO_RESERVE + "max_instances = 10\nwhen_full = refuse\n")
    batches = [study(number, 8) for number in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = {}
        for answer in pool.map(lambda batch: store_on_one_association(daemon, batch), batches):
            statuses.update(answer)
    acknowledged = {uid for uid, status in statuses.items() if status == SUCCESS}
    refused = {uid for uid, status in statuses.items() if status == OUT_OF_RESOURCES}
    assert acknowledged | refused == set(statuses), statuses  # no other answer
    assert 1 <= len(acknowledged) <= 10 and refused
    assert stored_uids(daemon) == acknowledged == indexed_uids(daemon, *batches)
    assert not list((daemon.node_dir / "tmp").iterdir())
    assert "max_instances" in daemon.log

    # At rest nothing is in flight: the quota fills exactly.
    extra = study(9, 11 - len(acknowledged))
    answers = store_on_one_association(daemon, extra)
    assert [answers[ds.SOPInstanceUID] for ds in extra] == [SUCCESS] * (10 - len(acknowledged)) + [OUT_OF_RESOURCES]
    assert daemon.counts()["instances"] == 10
    quota = daemon.health()["quota"]
    assert (quota["max_instances"], quota["instances"], quota["when_full"]) == (10, 10, "refuse")
    daemon.stop()
    check = consistent(daemon)
    assert check.returncode == 0, check.stdout + check.stderr


def test_recycling_under_four_parallel_associations_never_overshoots_nor_half_deletes(start_daemon):
    """when_full = recycle with four associations storing four studies at once into room for 6:
    the archive ends within the quota, files and index agree, nothing is left in tmp."""
    daemon = start_daemon(NO_RESERVE + "max_instances = 6\nwhen_full = recycle\n")
    batches = [study(number, 5) for number in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = {}
        for answer in pool.map(lambda batch: store_on_one_association(daemon, batch), batches):
            statuses.update(answer)
    assert set(statuses.values()) <= {SUCCESS, OUT_OF_RESOURCES}, statuses
    held = stored_uids(daemon)
    assert held == indexed_uids(daemon, *batches)
    assert 1 <= len(held) <= 6 and held <= {uid for uid, status in statuses.items() if status == SUCCESS}
    assert daemon.health()["quota"]["recycled_studies"] >= 1
    assert not list((daemon.node_dir / "tmp").iterdir())
    daemon.stop()
    check = consistent(daemon)
    assert check.returncode == 0, check.stdout + check.stderr


def test_max_size_refuses_stow_with_a700_and_keeps_the_rest(start_daemon):
    """A size quota: STOW-RS stores what fits and answers the rest with Failure Reason A700
    (409 when nothing fits, PS3.18 10.5.3)."""
    one = len(studygen.part10_bytes(study(0, 1)[0]))
    daemon = start_daemon(NO_RESERVE + f"max_size_mb = {(2.5 * one) / (1024 * 1024)!r}\n", env=ADMIN_ENV)
    token = admin_client(daemon).token
    response = stow(daemon, token, *study(0, 4))
    assert response.status == 202, response
    body = response.json()
    assert len(body["00081199"]["Value"]) == 2
    assert [item["00081197"]["Value"] for item in body["00081198"]["Value"]] == [[OUT_OF_RESOURCES]] * 2
    refused = stow(daemon, token, *study(1, 1))
    assert refused.status == 409 and "storage quota" in refused.headers["Warning"]
    assert len(stored_uids(daemon)) == 2 == daemon.counts()["instances"]
    assert "max_size_mb" in daemon.log


def test_recycle_deletes_the_oldest_unprotected_study_and_keeps_protected_ones(start_daemon):
    """when_full = recycle: a new study pushes out the study that arrived longest ago, unless it
    is protected (PUT /studies/{uid}/protected); with every study protected, stores are refused."""
    daemon = start_daemon(NO_RESERVE + "max_instances = 6\nwhen_full = recycle\n", env=ADMIN_ENV)
    admin = admin_client(daemon)
    first, second, third, fourth = study(0, 3), study(1, 3), study(2, 2), study(3, 2)
    assert set(store_on_one_association(daemon, first).values()) == {SUCCESS}
    assert set(store_on_one_association(daemon, second).values()) == {SUCCESS}
    first_uid = first[0].StudyInstanceUID
    assert admin.request("PUT", f"/studies/{first_uid}/protected").json()["protected"] is True
    assert admin.get(f"/studies/{first_uid}/protected").json()["protected"] is True
    # Only an administrator may protect.
    assert Client(base_url(daemon)).request("PUT", f"/studies/{second[0].StudyInstanceUID}/protected").status in (401, 403)
    assert admin.request("PUT", "/studies/not..a..uid/protected").status == 400

    # The first study is older but protected: the second goes, all of it, files and rows.
    assert set(store_on_one_association(daemon, third).values()) == {SUCCESS}
    assert stored_uids(daemon) == indexed_uids(daemon, first, second, third) == {ds.SOPInstanceUID for ds in first + third}
    assert "recycling study " + second[0].StudyInstanceUID in daemon.log
    assert daemon.health()["quota"]["recycled_studies"] == 1

    # Everything protected: nothing may go, so the new study is refused and left no trace.
    assert admin.request("PUT", f"/studies/{third[0].StudyInstanceUID}/protected").status == 200
    answers = store_on_one_association(daemon, fourth)
    assert list(answers.values()) == [SUCCESS, OUT_OF_RESOURCES]  # 3 + 2 + 1 fit, the next does not
    assert "no unprotected study is left" in daemon.log

    # Unprotected again, the third study is the one recycled next (the fourth arrived later).
    assert admin.request("DELETE", f"/studies/{third[0].StudyInstanceUID}/protected").json()["changed"] is True
    assert store_on_one_association(daemon, fourth[1:]) == {fourth[1].SOPInstanceUID: SUCCESS}
    assert stored_uids(daemon) == indexed_uids(daemon, first, second, third, fourth) == {ds.SOPInstanceUID for ds in first + fourth}
    daemon.stop()
    check = consistent(daemon)
    assert check.returncode == 0, check.stdout + check.stderr


def test_reindex_keeps_protection(start_daemon):
    """Protection is set by hand, not in the files: 'dicoogled reindex' carries it over."""
    daemon = start_daemon(NO_RESERVE, env=ADMIN_ENV)
    kept = study(0, 1)
    assert set(store_on_one_association(daemon, kept).values()) == {SUCCESS}
    study_uid = kept[0].StudyInstanceUID
    assert admin_client(daemon).request("PUT", f"/studies/{study_uid}/protected").status == 200
    daemon.stop()
    rebuilt = dicoogled(daemon, "reindex")
    assert rebuilt.returncode == 0, rebuilt.stderr
    daemon.start()
    assert admin_client(daemon).get(f"/studies/{study_uid}/protected").json()["protected"] is True


#: A rule that names MR studies whose newest instance arrived more than 2.6 seconds ago.
SECONDS_OLD_MR = "[retention]\nold-mr = older_than_days=0.00003 modality=MR\n"


def test_retention_rule_deletes_only_what_it_names_and_dry_runs_delete_nothing(start_daemon):
    """A rule for old MR studies: the dry run (REST, then the command line) lists exactly the
    old, unprotected MR study and deletes nothing; applied, it deletes that study only, leaving
    the CT study, the protected MR study and the MR study too recent to go."""
    daemon = start_daemon(NO_RESERVE + SECONDS_OLD_MR, env=ADMIN_ENV)
    admin = admin_client(daemon)
    old_mr, ct, protected_mr = study(0, 2, modality="MR"), study(1, 2), study(2, 1, modality="MR")
    for batch in (old_mr, ct, protected_mr):
        assert set(store_on_one_association(daemon, batch).values()) == {SUCCESS}
    assert admin.request("PUT", f"/studies/{protected_mr[0].StudyInstanceUID}/protected").status == 200

    def listed():
        return {item["StudyInstanceUID"] for item in admin.get("/management/retention", dry_run="1").json()["studies"]}
    assert wait_until(listed, message="the old MR study to be listed") == {old_mr[0].StudyInstanceUID}
    everything = {ds.SOPInstanceUID for ds in old_mr + ct + protected_mr}
    assert stored_uids(daemon) == everything  # a dry run deletes nothing
    assert admin.get("/management/retention", dry_run="0").status == 400
    assert Client(base_url(daemon)).get("/management/retention").status in (401, 403)

    recent_mr = study(3, 1, modality="MR")
    assert set(store_on_one_association(daemon, recent_mr).values()) == {SUCCESS}
    applied = admin.post("/management/retention").json()["studies"]
    assert [(item["rule"], item["StudyInstanceUID"], item["deleted"]) for item in applied] == \
        [("old-mr", old_mr[0].StudyInstanceUID, 2)]
    kept = {ds.SOPInstanceUID for ds in ct + protected_mr + recent_mr}
    assert stored_uids(daemon) == indexed_uids(daemon, old_mr, ct, protected_mr, recent_mr) == kept
    assert "retention rule old-mr: deleting study " + old_mr[0].StudyInstanceUID in daemon.log

    # The command line: once the recent MR study is old too, the dry run lists it alone and
    # leaves it; the real run deletes it; files and index agree afterwards.
    assert wait_until(lambda: listed() == {recent_mr[0].StudyInstanceUID} or None, message="the recent MR study to age")
    daemon.stop()
    dry = dicoogled(daemon, "retention", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert [json.loads(line)["StudyInstanceUID"] for line in dry.stdout.splitlines()] == [recent_mr[0].StudyInstanceUID]
    assert stored_uids(daemon) == kept
    real = dicoogled(daemon, "retention")
    assert real.returncode == 0, real.stderr
    assert stored_uids(daemon) == kept - {recent_mr[0].SOPInstanceUID}
    check = consistent(daemon)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_label_rule_deletes_its_studies_but_not_those_a_protected_label_keeps(start_daemon):
    """label=NAME names studies carrying the label on themselves or on a series; a study that
    also carries a [storage] protected_labels label (here on one of its series) stays."""
    daemon = start_daemon(NO_RESERVE + "protected_labels = keep\n"
                          "[retention]\nlast-term = older_than_days=0.00003 label=course\n", env=ADMIN_ENV)
    admin = admin_client(daemon)
    course, kept_course, other = study(0, 2), study(1, 2), study(2, 1)
    for batch in (course, kept_course, other):
        assert set(store_on_one_association(daemon, batch).values()) == {SUCCESS}
    assert admin.request("PUT", f"/studies/{course[0].StudyInstanceUID}/labels/course").status == 200
    assert admin.request("PUT", f"/series/{kept_course[0].SeriesInstanceUID}/labels/course").status == 200
    assert admin.request("PUT", f"/series/{kept_course[0].SeriesInstanceUID}/labels/keep").status == 200

    def listed():
        return {item["StudyInstanceUID"] for item in admin.get("/management/retention", dry_run="1").json()["studies"]}
    assert wait_until(listed, message="the labelled study to age") == {course[0].StudyInstanceUID}
    applied = admin.post("/management/retention").json()["studies"]
    assert [(item["rule"], item["StudyInstanceUID"]) for item in applied] == [("last-term", course[0].StudyInstanceUID)]
    assert stored_uids(daemon) == {ds.SOPInstanceUID for ds in kept_course + other}


@pytest.mark.parametrize("config, problem", [
    ("max_instances = -1\n", "max_instances"),
    ("when_full = delete\n", "when_full"),
    ("[retention]\nold = modality=MR\n", "older_than_days=N is required"),
    ("[retention]\nold = older_than_days=30 size=big\n", "'size=big' is not a criterion"),
    ("[retention]\nold = older_than_days=30 label=Bad!\n", "is not a label"),
    ("protected_labels = keep no/way\n", "is not a label"),
])
def test_invalid_quota_settings_are_refused_at_start(start_daemon, config, problem):
    daemon = start_daemon(NO_RESERVE + config, wait=False)
    assert daemon.process.wait(60) != 0
    assert problem in daemon.log
