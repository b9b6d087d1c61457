"""Labels on studies and series: REST, the search language's label:, QIDO-RS's label=, a rule
plugin labelling what one AE sends, and labels outliving restarts, re-stores and reindex."""

import fnmatch
import pathlib
import shutil
import subprocess
import sys

import pydicom
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dicoogled
import studygen
from conftest import NODELAY, ROOT, RunningDaemon, index_flags, wait_until
from pynetdicom import AE
from restclient import ADMIN_ENV, ADMIN_PASSWORD, Client, admin_client, base_url


@pytest.fixture
def archive(start_daemon, tmp_path):
    """A daemon holding 2 patients x 2 studies x 2 series x 2 instances (every third study MR)."""
    def start(config=None, args=(), env=None):
        daemon = start_daemon(config_text=config, args=args, env={**ADMIN_ENV, **(env or {})})
        daemon.paths = studygen.generate(tmp_path / "gen", patients=2, studies=2, series=2, instances=2, modality="mixed")
        assert set(daemon.store(*daemon.paths)) == {0}
        daemon.datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in daemon.paths]
        daemon.client = admin_client(daemon)
        return daemon
    return start


def store_from(daemon, datasets, calling_aet: str) -> list[int]:
    """C-STORE with pynetdicom, as the AE calling_aet."""
    ae = AE(ae_title=calling_aet)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title="DICOOGLED", evt_handlers=NODELAY)
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


def study_uids(daemon) -> list[str]:
    return sorted({d.StudyInstanceUID for d in daemon.datasets})


def search_sops(client, query: str) -> set[str]:
    response = client.get("/search", query=query, field="SOPInstanceUID")
    assert response.status == 200, response
    return {r["fields"]["SOPInstanceUID"] for r in response.json()["results"]}


def sops(daemon, *, study=None, series=None) -> set[str]:
    return {d.SOPInstanceUID for d in daemon.datasets
            if (study is None or d.StudyInstanceUID == study) and (series is None or d.SeriesInstanceUID == series)}


def test_rest_round_trip_and_counts(archive):
    daemon = archive()
    c = daemon.client
    first, second = study_uids(daemon)[:2]
    assert c.get("/labels").json() == {"labels": []}
    put = c.request("PUT", f"/studies/{first}/labels/Neuro")
    assert put.status == 200 and put.json() == {"label": "neuro", "added": True}  # case folded
    assert c.request("PUT", f"/studies/{first}/labels/neuro").json()["added"] is False
    assert c.request("PUT", f"/studies/{second}/labels/neuro").status == 200
    series = next(d.SeriesInstanceUID for d in daemon.datasets if d.StudyInstanceUID == second)
    assert c.request("PUT", f"/series/{series}/labels/teaching.2026").status == 200
    assert c.get(f"/studies/{first}/labels").json() == {"labels": ["neuro"]}
    assert c.get(f"/series/{series}/labels").json() == {"labels": ["teaching.2026"]}
    assert c.get("/labels").json() == {"labels": [{"label": "neuro", "studies": 2}, {"label": "teaching.2026", "studies": 1}]}
    removed = c.request("DELETE", f"/studies/{first}/labels/NEURO")
    assert removed.json() == {"label": "neuro", "removed": True}
    assert c.request("DELETE", f"/studies/{first}/labels/neuro").json()["removed"] is False
    assert c.get("/labels").json()["labels"][0] == {"label": "neuro", "studies": 1}
    # A study or series the index does not hold cannot be labelled.
    assert c.request("PUT", "/studies/1.2.3.4/labels/neuro").status == 404
    assert c.request("PUT", f"/series/{first}/labels/neuro").status == 404


@pytest.mark.parametrize("label", ["-lead", "a" * 65, "with space", "star*", "colon:x", "ümlaut", "semi;colon"])
def test_bad_label_names_are_refused_with_a_reason(archive, label):
    daemon = archive()
    study = study_uids(daemon)[0]
    response = daemon.client.request("PUT", f"/studies/{study}/labels/{requests.utils.quote(label, safe='')}")
    assert response.status == 400, response
    assert "not a label" in response.json()["error"]
    assert daemon.client.get("/labels").json() == {"labels": []}


def test_label_name_rule():
    assert dicoogled.label_name(" Neuro-Course ") == "neuro-course"
    assert dicoogled.label_name("a" * 64) == "a" * 64
    for bad in ("", ".x", "a/b", "a" * 65, "x?"):
        with pytest.raises(ValueError):
            dicoogled.label_name(bad)


def test_writes_need_a_login_and_reads_need_read_access(archive):
    daemon = archive()
    study = study_uids(daemon)[0]
    anonymous = Client(base_url(daemon))
    assert anonymous.request("PUT", f"/studies/{study}/labels/neuro").status in (401, 403)
    assert anonymous.request("DELETE", f"/studies/{study}/labels/neuro").status in (401, 403)
    assert anonymous.get("/labels").status == 401
    assert anonymous.get(f"/studies/{study}/labels").status == 401
    assert daemon.client.get("/labels").json() == {"labels": []}
    # A cookie-authenticated write from another site is refused, as every write is.
    cookie = daemon.client.request("POST", "/login", data={"username": "admin", "password": ADMIN_PASSWORD}, auth=None)
    session = cookie.headers["Set-Cookie"].split(";")[0]
    cross = anonymous.request("PUT", f"/studies/{study}/labels/neuro",
                              headers={"Cookie": session, "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert cross.status == 403
    assert daemon.client.get("/labels").json() == {"labels": []}


def test_labels_in_the_search_language(archive):
    daemon = archive()
    c = daemon.client
    first, second, third = study_uids(daemon)[:3]
    series = sorted({d.SeriesInstanceUID for d in daemon.datasets if d.StudyInstanceUID == third})[0]
    c.request("PUT", f"/studies/{first}/labels/neuro-course")
    c.request("PUT", f"/studies/{second}/labels/neuro-research")
    c.request("PUT", f"/series/{series}/labels/neuro-course")
    # A series label reaches that series' instances, and only them.
    assert search_sops(c, "label:neuro-course") == sops(daemon, study=first) | sops(daemon, series=series)
    assert search_sops(c, "label:NEURO*") == sops(daemon, study=first) | sops(daemon, study=second) | sops(daemon, series=series)
    assert search_sops(c, 'label:"neuro-research"') == sops(daemon, study=second)
    assert search_sops(c, "label:(neuro-research OR neuro-course)") == search_sops(c, "label:neuro*")
    assert search_sops(c, "label:nothing-like-it") == set()
    # Combined with other fields, AND / OR / NOT.
    modality = next(d.Modality for d in daemon.datasets if d.StudyInstanceUID == first)
    assert search_sops(c, f"label:neuro* AND Modality:{modality}") == {
        d.SOPInstanceUID for d in daemon.datasets if d.Modality == modality} & search_sops(c, "label:neuro*")
    everything = {d.SOPInstanceUID for d in daemon.datasets}
    assert search_sops(c, "*:* AND NOT label:neuro*") == everything - search_sops(c, "label:neuro*")
    patient = next(d.PatientID for d in daemon.datasets if d.StudyInstanceUID == second)
    assert search_sops(c, f"label:neuro-course OR PatientID:{patient}") == (
        search_sops(c, "label:neuro-course") | {d.SOPInstanceUID for d in daemon.datasets if d.PatientID == patient})
    # The count agrees with the results.
    assert c.get("/search", query="label:neuro*").json()["numResults"] == len(search_sops(c, "label:neuro*"))
    for bad in ("label:", "label:[a TO b]", "label:a/b", "label:ü"):
        response = c.get("/search", query=bad)
        assert response.status == 400 and response.json()["error"], bad


LABELS = ("neuro", "neuro-course", "cardio", "n.1", "x_y")
PATTERNS = ("neuro", "neuro*", "n*", "*o", "?euro", "cardio", "n.?", "x_y", "*", "*-*", "absent")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_label_queries_find_what_a_plain_filter_selects(archive_once, data):
    """For random labels on studies and series and a random label: pattern (alone, negated, or
    with a field), /search answers exactly the instances a Python filter selects: those whose
    study or series carries a label the pattern matches (fnmatch: * any run, ? one character)."""
    daemon = archive_once
    c = daemon.client
    for entry in c.get("/labels").json()["labels"]:  # a clean slate for each example
        for d in daemon.datasets:
            c.request("DELETE", f"/studies/{d.StudyInstanceUID}/labels/{entry['label']}")
            c.request("DELETE", f"/series/{d.SeriesInstanceUID}/labels/{entry['label']}")
    studies = sorted({d.StudyInstanceUID for d in daemon.datasets})
    series = sorted({d.SeriesInstanceUID for d in daemon.datasets})
    on_study = data.draw(st.dictionaries(st.sampled_from(studies), st.sets(st.sampled_from(LABELS), max_size=2), max_size=3))
    on_series = data.draw(st.dictionaries(st.sampled_from(series), st.sets(st.sampled_from(LABELS), max_size=2), max_size=3))
    for prefix, labelled in (("studies", on_study), ("series", on_series)):
        for uid, labels in labelled.items():
            for label in labels:
                assert c.request("PUT", f"/{prefix}/{uid}/labels/{label}").status == 200
    pattern = data.draw(st.sampled_from(PATTERNS))
    form = data.draw(st.sampled_from(["{}", "*:* NOT {}", "{} AND Modality:MR", "{} OR Modality:MR"]))

    def carries(d) -> bool:
        labels = on_study.get(d.StudyInstanceUID, set()) | on_series.get(d.SeriesInstanceUID, set())
        return any(fnmatch.fnmatchcase(label, pattern) for label in labels)

    expected = {
        "{}": lambda d: carries(d), "*:* NOT {}": lambda d: not carries(d),
        "{} AND Modality:MR": lambda d: carries(d) and d.Modality == "MR",
        "{} OR Modality:MR": lambda d: carries(d) or d.Modality == "MR",
    }[form]
    assert search_sops(c, form.format(f"label:{pattern}")) == {d.SOPInstanceUID for d in daemon.datasets if expected(d)}


@pytest.fixture(scope="module")
def archive_once(tmp_path_factory):
    """One daemon for the property test's examples (a daemon per example would take minutes)."""
    root = tmp_path_factory.mktemp("labels")
    daemon = RunningDaemon(root / "data", env=ADMIN_ENV).start()
    daemon.paths = studygen.generate(root / "gen", patients=2, studies=2, series=2, instances=1, modality="mixed")
    assert set(daemon.store(*daemon.paths)) == {0}
    daemon.datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in daemon.paths]
    daemon.client = admin_client(daemon)
    yield daemon
    daemon.stop()


def test_qido_label_extension(archive):
    daemon = archive()
    c = daemon.client
    first, second = study_uids(daemon)[:2]
    series = sorted({d.SeriesInstanceUID for d in daemon.datasets if d.StudyInstanceUID == second})[0]
    c.request("PUT", f"/studies/{first}/labels/neuro")
    c.request("PUT", f"/series/{series}/labels/neuro")
    session = requests.Session()
    session.auth = ("admin", ADMIN_PASSWORD)
    url = f"{base_url(daemon)}/dicom-web"

    def qido(path, **params):
        response = session.get(url + path, params=params, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    studies = qido("/studies", label="neuro")
    assert {r["0020000D"]["Value"][0] for r in studies} == {first, second}
    assert len(qido("/studies")) == len(study_uids(daemon))
    found_series = {r["0020000E"]["Value"][0] for r in qido("/series", label="neuro")}
    assert found_series == {d.SeriesInstanceUID for d in daemon.datasets if d.StudyInstanceUID == first} | {series}
    instances = {r["00080018"]["Value"][0] for r in qido("/instances", label="neuro")}
    assert instances == sops(daemon, study=first) | sops(daemon, series=series)
    assert {r["00080018"]["Value"][0] for r in qido(f"/studies/{second}/instances", label="neuro")} == sops(daemon, series=series)
    assert qido("/studies", label="unused") == []
    assert qido("/studies", label="neuro", StudyInstanceUID=first)[0]["0020000D"]["Value"] == [first]
    assert session.get(url + "/studies", params={"label": "bad label"}, timeout=30).status_code == 400


@pytest.mark.parametrize("source", ["label_by_sender.py", "label_rule.lua"])
def test_rule_plugin_labels_mr_from_one_ae(start_daemon, tmp_path, source):
    folder = tmp_path / "plugins"
    folder.mkdir()
    shutil.copy(ROOT / "plugins" / source, folder)
    config = f"[plugin.{pathlib.Path(source).stem}]\nenabled = true\ncalling_aet = NEURO_MRI\nlabel = neuro-course\n"
    daemon = start_daemon(config_text=config, args=["--plugins-dir", str(folder)], env=ADMIN_ENV)
    c = admin_client(daemon)
    paths = studygen.generate(tmp_path / "gen", patients=1, studies=3, series=1, instances=2, modality="mixed")
    datasets = [pydicom.dcmread(p) for p in paths]
    mr = [d for d in datasets if d.Modality == "MR"]
    ct = [d for d in datasets if d.Modality != "MR"]
    assert mr and ct
    assert set(store_from(daemon, ct, "NEURO_MRI")) == {0}
    other_mr = studygen.generate(tmp_path / "other", patients=1, studies=1, series=1, instances=1, modality="MR", seed=5)
    assert set(store_from(daemon, [pydicom.dcmread(p) for p in other_mr], "OTHER_MRI")) == {0}
    assert set(store_from(daemon, mr, "NEURO_MRI")) == {0}
    wait_until(lambda: c.get("/labels").json()["labels"], message="the rule to label the MR study")
    # The notify hooks run in order: once the last MR instance is labelled, all the others were seen.
    wait_until(lambda: search_sops(c, "label:neuro-course") == {d.SOPInstanceUID for d in mr},
               message="every MR instance from NEURO_MRI to be labelled")
    assert c.get("/labels").json() == {"labels": [{"label": "neuro-course", "studies": len({d.StudyInstanceUID for d in mr})}]}


def test_labels_survive_restart_restore_and_reindex(archive, tmp_path):
    daemon = archive()
    c = daemon.client
    study = study_uids(daemon)[0]
    series = sorted({d.SeriesInstanceUID for d in daemon.datasets if d.StudyInstanceUID != study})[0]
    c.request("PUT", f"/studies/{study}/labels/kept")
    c.request("PUT", f"/series/{series}/labels/kept-series")
    expected = search_sops(c, "label:kept*")
    assert expected == sops(daemon, study=study) | sops(daemon, series=series)

    # Every instance of the study sent again: its rows go and come back, its labels stay.
    again = [p for p, d in zip(daemon.paths, daemon.datasets) if d.StudyInstanceUID == study or d.SeriesInstanceUID == series]
    assert set(daemon.store(*again)) == {0}
    assert search_sops(c, "label:kept*") == expected

    daemon.restart()
    c = admin_client(daemon)
    assert search_sops(c, "label:kept*") == expected

    assert daemon.stop() == 0
    rebuilt = subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "reindex", "--data-dir", str(daemon.data_dir),
                              *daemon.index_args],
                             capture_output=True, text=True, timeout=300)
    assert rebuilt.returncode == 0, rebuilt.stderr
    daemon.start()
    c = admin_client(daemon)
    assert search_sops(c, "label:kept*") == expected
    assert {entry["label"] for entry in c.get("/labels").json()["labels"]} == {"kept", "kept-series"}


def test_a_label_follows_its_study_to_another_patient(start_daemon, tmp_path):
    """Files indexed in place, corrected (a new PatientID) and indexed again: the study moves to
    the other patient, its row keeping its UID, and its label goes with it."""
    paths = studygen.generate(tmp_path / "library", patients=1, studies=2, series=1, instances=2)
    data_dir = tmp_path / "data"

    def index_in_place():
        done = subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "index", "--data-dir", str(data_dir),
                               *index_flags(data_dir), str(tmp_path / "library")], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr

    index_in_place()
    daemon = start_daemon(env=ADMIN_ENV)
    c = admin_client(daemon)
    datasets = [pydicom.dcmread(p) for p in paths]
    study = datasets[0].StudyInstanceUID
    moved = {d.SOPInstanceUID for d in datasets if d.StudyInstanceUID == study}
    assert c.request("PUT", f"/studies/{study}/labels/moved").status == 200
    assert daemon.stop() == 0
    for path, dataset in zip(paths, datasets):
        if dataset.StudyInstanceUID == study:
            dataset.PatientID = "CORRECTED-ID"
            dataset.save_as(path)
    index_in_place()
    daemon.start()
    c = admin_client(daemon)
    assert search_sops(c, "PatientID:CORRECTED-ID") == moved
    assert search_sops(c, "label:moved AND PatientID:CORRECTED-ID") == moved


def test_an_index_of_the_previous_schema_is_migrated(tmp_path):
    """An index made before labels (schema 4) gains the label tables and keeps its instances."""
    path = tmp_path / "index.sqlite"
    index = dicoogled.Index(path)
    index.close()
    import apsw
    connection = apsw.Connection(str(path))
    connection.execute("DROP TABLE study_labels; DROP TABLE series_labels;"
                       " DROP TABLE webhook_deliveries; DROP INDEX studies_unannounced;"
                       " ALTER TABLE studies DROP COLUMN last_arrival; ALTER TABLE studies DROP COLUMN stable_announced;"
                       " PRAGMA user_version=4")
    connection.close()
    index = dicoogled.Index(path)
    try:
        assert index.labels() == []
        assert index.schema_version() == dicoogled.SCHEMA_VERSION
    finally:
        index.close()


def test_labels_are_in_openapi(archive):
    daemon = archive()
    paths = daemon.client.get("/openapi.json").json()["paths"]
    assert set(paths["/labels"]) == {"get"}
    for prefix in ("studies", "series"):
        assert set(paths[f"/{prefix}/{{uid}}/labels/{{label}}"]) == {"put", "delete"}
        assert paths[f"/{prefix}/{{uid}}/labels/{{label}}"]["put"]["x-access"] == "user"
        assert paths[f"/{prefix}/{{uid}}/labels"]["get"]["x-access"] == "read"


# ---- the web app ----------------------------------------------------------------------------------


def test_web_app_labels_a_selection_filters_and_takes_a_label_off(archive):
    """Label a patient's studies in bulk, see the labels on the rows and in the filter with their
    counts, filter by one, and take it off one study with its ×."""
    webapp = pytest.importorskip("test_webapp")  # headless chromium through playwright, as the web app's tests
    if not pathlib.Path(webapp.CHROMIUM).exists():
        pytest.skip("needs Debian's chromium")
    from playwright.sync_api import expect, sync_playwright

    daemon = archive()
    patient = daemon.datasets[0].PatientID
    studies = sorted({d.StudyInstanceUID for d in daemon.datasets if d.PatientID == patient})
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=webapp.CHROMIUM, args=webapp.BROWSER_ARGS)
        app = webapp.App(browser, daemon)
        try:
            page = app.login(password=ADMIN_PASSWORD, hash_=f"#/search?q=*:*&patient={patient}")
            rows = page.locator("table.results tbody tr")
            expect(rows).to_have_count(len(studies))
            toolbar = page.get_by_role("toolbar", name="Actions on results")
            expect(toolbar.get_by_role("button", name="Label…", exact=True)).to_be_disabled()
            page.get_by_role("checkbox", name="Select every study on this page").check()
            toolbar.get_by_role("button", name="Label…", exact=True).click()
            dialog = page.get_by_role("dialog")
            dialog.get_by_label("Label", exact=True).fill("Neuro-Course")
            dialog.get_by_role("button", name="Label", exact=True).click()
            expect(dialog).to_have_count(0)
            expect(page.locator("table.results .chip.label")).to_have_count(len(studies))
            assert daemon.client.get("/labels").json() == {"labels": [{"label": "neuro-course", "studies": len(studies)}]}

            # The filter lists the label with its count, and choosing it searches label:NAME.
            app.search("*:*")
            select = page.get_by_label("Label filter")
            expect(select.locator("option", has_text="neuro-course")).to_have_text(f"neuro-course ({len(studies)} studies)")
            select.select_option("neuro-course")
            expect(page.get_by_role("combobox", name="Search")).to_have_value("label:neuro-course")
            expect(page.locator("table.results tbody tr")).to_have_count(1)  # one patient

            # One study's label off with its ×.
            page.goto(f"{app.base}/#/search?q=*:*&patient={patient}")
            expect(rows).to_have_count(len(studies))
            rows.first.get_by_role("button", name="Remove label neuro-course").click()
            expect(page.locator("table.results .chip.label")).to_have_count(len(studies) - 1)
            assert daemon.client.get("/labels").json()["labels"][0]["studies"] == len(studies) - 1
            page.wait_for_load_state("networkidle")
            assert not app.errors, app.errors
        finally:
            app.close()
            browser.close()
