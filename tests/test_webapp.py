"""The web app in www/, end to end: Debian's chromium (headless), driven by Playwright, against
the real daemon with generated studies.

Every screen is visited as a user would: log in, search by free text and by fields, drill down
Patient → Study → Series → Image, preview frames, dump, export a CSV and read it, unindex and
remove, index a folder and watch its task reach 100%, add a move destination and C-ECHO it, create
a user and log in as them, and use web UI plugins (menu, result-options, result-batch, settings).
No test may leave an error in the browser console (failed requests included) unless it expects
that very failure. Screenshots go to tests/artifacts/webapp/; with UPDATE_SCREENSHOTS=1 the ones
the README shows are also written, shrunk, to docs/screenshots/.
"""

import csv
import http.server
import io
import os
import pathlib
import re
import shutil
import textwrap
import threading
import zipfile

import pydicom
import pytest
from pydicom.data import get_testdata_file

import studygen
from conftest import ROOT, RunningDaemon, StoreSCP, free_port
from restclient import Client, base_url

pytest.importorskip("playwright.sync_api")
from playwright.sync_api import expect, sync_playwright  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"]
ADMIN_PASSWORD = "webapp-admin-1"
ARTIFACTS = ROOT / "tests" / "artifacts" / "webapp"
DOCS_SCREENSHOTS = ROOT / "docs" / "screenshots"
MULTIFRAME = "examples_ybr_color.dcm"  # 30 frames, in pydicom's wheel

# ---- test plugins: one per web UI slot, and one that fails to load ------------------------------

PLUGINS = {
    "hello.py": '''
        """hello: a menu page (web app test plugin)."""
        SETTINGS = {"enabled": False}  # enabled by the plugin test, so other screens stay plain
        WEBUI = {"name": "hello", "version": "1.0.0",
                 "dicoogle": {"slot-id": "menu", "caption": "Hello page", "module-file": "hello.js"}}
    ''',
    "hello.js": '''
        module.exports = function () {
          this.render = function (parent, slot) {
            var p = document.createElement("p");
            p.className = "hello-text";
            p.textContent = "Hello from the " + slot.slotId + " slot of " + slot.pluginName;
            parent.appendChild(p);
          };
        };
    ''',
    "counter.py": '''
        """counter: a result-batch button that counts the selection (web app test plugin)."""
        SETTINGS = {"enabled": False}  # enabled by the plugin test, so other screens stay plain
        WEBUI = {"name": "counter", "version": "1.0.0",
                 "dicoogle": {"slot-id": "result-batch", "caption": "Count selection", "module-file": "counter.js"}}
    ''',
    "counter.js": '''
        module.exports = function () {
          this.render = function (parent, slot) {
            var out = document.createElement("p");
            out.className = "counter-out";
            out.textContent = "waiting";
            parent.appendChild(out);
            slot.addEventListener("result-selection-ready", function (event) {
              var selected = event.detail.selected;
              out.textContent = selected.contents.length + " " + selected.level + " selected of " +
                event.detail.search.data.numResults + " for " + slot.data.query;
            });
            var done = document.createElement("button");
            done.textContent = "Done counting";
            done.onclick = function () { slot.dispatchEvent(new CustomEvent("hide")); };
            parent.appendChild(done);
          };
        };
    ''',
    "tagger.py": '''
        """tagger: a result-options cell per row (web app test plugin)."""
        SETTINGS = {"enabled": False}  # enabled by the plugin test, so other screens stay plain
        WEBUI = {"name": "tagger", "version": "1.0.0",
                 "dicoogle": {"slot-id": "result-options", "caption": "Tag", "module-file": "tagger.js"}}
    ''',
    "tagger.js": '''
        module.exports = function () {
          this.render = function (parent, slot) {
            var tag = document.createElement("span");
            tag.className = "tag-cell";
            tag.textContent = slot.data.type + ":" + (slot.data.uid || slot.data.patientId);
            parent.appendChild(tag);
          };
        };
    ''',
    "prefs.py": '''
        """prefs: a settings panel (web app test plugin)."""
        SETTINGS = {"enabled": True, "greeting": "hi"}
        WEBUI = {"name": "prefs", "version": "1.0.0",
                 "dicoogle": {"slot-id": "settings", "caption": "Preferences", "module-file": "prefs.js"}}
    ''',
    "prefs.js": '''
        module.exports = function () {
          this.render = function (parent, slot) {
            parent.textContent = "greeting is " + slot.data.settings.greeting;
          };
        };
    ''',
    "broken.py": '''
        """broken: fails to load, on purpose."""
        raise RuntimeError("broken on purpose")
    ''',
}


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A daemon holding 3 patients x 2 studies x 2 series x 3 images (CT and MR) and a 30-frame object."""
    root = tmp_path_factory.mktemp("webapp")
    plugins = root / "plugins"
    plugins.mkdir()
    for name, text in PLUGINS.items():
        (plugins / name).write_text(textwrap.dedent(text).lstrip())
    daemon = RunningDaemon(root / "data", args=["--plugins-dir", str(plugins)], env={"DICOOGLED_ADMIN_PASSWORD": ADMIN_PASSWORD}).start()
    paths = studygen.generate(root / "generated", patients=3, studies=2, series=2, instances=3, modality="mixed")
    paths.append(pathlib.Path(get_testdata_file(MULTIFRAME)))
    assert set(daemon.store(*paths)) == {0}
    daemon.root = root
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield browser
        browser.close()


class App:
    """One browser tab on the web app; collects console errors, failed requests and page errors."""

    def __init__(self, browser, daemon, viewport=None):
        self.daemon, self.base = daemon, base_url(daemon)
        self.context = browser.new_context(viewport=viewport or {"width": 1280, "height": 860}, accept_downloads=True)
        self.page = self.context.new_page()
        self.page.set_default_timeout(20_000)
        self.errors, self.allowed = [], []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))

    def _console(self, message):
        if message.type != "error":
            return
        url = message.location.get("url", "")
        if any(re.search(pattern, f"{message.text} {url}") for pattern in self.allowed):
            return
        self.errors.append(f"console: {message.text} ({url})")

    def allow(self, pattern: str):
        """Expect a failure (its console line matches pattern), e.g. a 400 the test provokes."""
        self.allowed.append(pattern)

    def open(self, hash_=""):
        self.page.goto(f"{self.base}/{hash_}")
        return self.page

    def login(self, username="admin", password=ADMIN_PASSWORD, hash_=""):
        page = self.open(hash_)
        page.get_by_label("Username").fill(username)
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("navigation", name="Main")).to_be_visible()
        return page

    def search(self, text):
        page = self.page
        box = page.get_by_role("combobox", name="Search")
        box.fill(text)
        box.press("Enter")
        return page

    def shot(self, name, docs=False):
        """A screenshot in tests/artifacts/webapp/; with UPDATE_SCREENSHOTS=1 also docs/screenshots/."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        if docs and os.environ.get("UPDATE_SCREENSHOTS"):
            DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            try:  # small PNGs for the repository: 256 colours are plenty for a quiet UI
                from PIL import Image
                Image.open(path).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(DOCS_SCREENSHOTS / f"{name}.png", optimize=True)
            except ImportError:
                shutil.copy(path, DOCS_SCREENSHOTS / f"{name}.png")

    def close(self):
        self.context.close()


@pytest.fixture
def app(browser, archive):
    tab = App(browser, archive)
    yield tab
    # Let requests under way finish, so their failures are seen here.
    tab.page.wait_for_load_state("networkidle")
    tab.close()
    assert not tab.errors, "errors in the browser:\n" + "\n".join(tab.errors)


def admin(daemon) -> Client:
    client = Client(base_url(daemon))
    client.login("admin", ADMIN_PASSWORD)
    return client


def instance(patient, study, series, number):
    return studygen.make_instance(patient, study, series, number)


# ---- login -----------------------------------------------------------------------------------------


def test_login_refuses_bad_credentials_then_logs_in_and_out(app):
    page = app.open()
    expect(page.get_by_role("heading", name="Log in to dicoogled")).to_be_visible()
    app.shot("login")
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill("not the password")
    app.allow(r"status of 401 .*/login")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_have_text("Wrong username or password.")
    page.get_by_label("Password").fill(ADMIN_PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("link", name="Management")).to_be_visible()
    # The token survives a reload (sessionStorage), not a logout.
    page.reload()
    expect(page.get_by_role("heading", name="Search")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('dicoogled.token')")
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_text("You are logged out.")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('dicoogled.token')") is None
    page.reload()
    expect(page.get_by_role("heading", name="Log in to dicoogled")).to_be_visible()


def test_a_page_of_another_site_cannot_act_with_the_session(app, archive):
    """A page on another port of the same host (the same site, so even a SameSite=Strict cookie
    goes along) posts a form creating an administrator, and loads /logout as an image, while
    the browser is logged in to the web app: neither acts; the app's own writes still do."""
    page = app.login()
    token = page.evaluate("sessionStorage.getItem('dicoogled.token')")
    target = f"{app.base}/user?username=mallory&password=mallory-pw-1&admin=true"
    evil = (f'<!doctype html><title>Win a prize</title><img alt="" src="{app.base}/logout">'
            f'<form method="post" enctype="text/plain" action="{target}"><input name="x" value="1">'
            f'<button>Claim</button></form>').encode()

    class EvilPage(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(evil)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), EvilPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        app.allow(r"status of 403")
        # The image is answered (and then blocked by the browser, as JSON is no image): the
        # server has seen the request.
        with page.expect_event("requestfailed", lambda request: request.url.endswith("/logout")):
            page.goto(f"http://127.0.0.1:{server.server_port}/")
        with page.expect_response(lambda response: "/user?" in response.url) as created:
            page.get_by_role("button", name="Claim").click()
        assert created.value.status == 403
    finally:
        server.shutdown()
        server.server_close()
    client = admin(archive)
    assert "mallory" not in {u["username"] for u in client.get("/user").json()["users"]}
    assert Client(base_url(archive), token).get("/login").status == 200  # still logged in
    # Pages of the web app itself still write, with the token or with the cookie alone.
    page = app.open("#/search")
    expect(page.get_by_role("heading", name="Search")).to_be_visible()
    statuses = page.evaluate("""async () => {
        const post = (headers) => fetch('/exportFile', {method: 'POST', headers,
            body: new URLSearchParams({query: '*:*', fields: '["PatientID"]'})}).then((r) => r.text().then(() => r.status));
        return [await post({Authorization: sessionStorage.getItem('dicoogled.token')}), await post({})];
    }""")
    assert statuses == [200, 200]


# ---- search and results ---------------------------------------------------------------------------


def test_free_text_search_drills_down_to_an_image_preview_and_dump(app, archive):
    page = app.login()
    app.search("doe")
    results = page.locator("table.results")
    expect(page.locator(".meta")).to_contain_text("1 patient")  # of 3 patients, one is DOE^JOHN
    expect(results.locator("tbody tr")).to_have_count(1)
    expect(results).to_contain_text("DOE, JOHN")
    # The query stays in the hash, which never reaches the server.
    assert "q=doe" in page.url and "#/search" in page.url
    app.shot("search-patients", docs=True)

    page.get_by_role("link", name="DOE, JOHN").click()
    expect(page.locator(".meta")).to_contain_text("2 studies · 4 series")
    expect(page.get_by_role("navigation", name="Breadcrumbs").get_by_role("listitem")).to_have_text(["Patients", "DOE, JOHN"])
    first = instance(0, 0, 0, 0)
    page.get_by_role("link", name=str(first.StudyDescription)).click()
    expect(page.locator(".meta")).to_contain_text("2 series · 6 images")
    app.shot("search-series")
    page.get_by_role("link", name=str(first.SeriesDescription)).click()
    expect(page.locator(".meta")).to_contain_text("3 images")
    rows = page.locator("table.results tbody tr")
    expect(rows).to_have_count(3)
    # Thumbnails are rendered images, not broken ones.
    page.wait_for_function("() => [...document.querySelectorAll('img.thumb')].every((i) => i.complete && i.naturalWidth > 0)")
    expect(rows.first).to_contain_text(str(first.SOPInstanceUID))
    app.shot("search-images", docs=True)

    # Preview: the image, then the next one with Page Down.
    rows.first.get_by_role("button", name="Preview", exact=True).click()
    dialog = page.get_by_role("dialog", name="Preview")
    expect(dialog).to_be_visible()
    expect(dialog.locator(".preview-status")).to_have_text("Image 1 (1 of 3)")
    page.wait_for_function("() => { const i = document.querySelector('img.preview'); return i && i.complete && i.naturalWidth > 0; }")
    page.keyboard.press("PageDown")
    expect(dialog.locator(".preview-status")).to_have_text("Image 2 (2 of 3)")
    expect(dialog.locator(".frame-controls")).to_be_hidden()  # one frame
    # A window preset re-renders the image with its own window.
    with page.expect_response(lambda r: "/dic2png" in r.url and "windowCenter=-600" in r.url and r.status == 200):
        dialog.get_by_label("Window preset").select_option(label="Lung")
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()

    # Dump: every element, sequences collapsible, a filter.
    rows.first.get_by_role("link", name="Dump").click()
    expect(page.get_by_role("heading", name="All elements")).to_be_visible()
    dump = page.locator("table.dump").first
    expect(dump).to_contain_text("PatientName")
    sequence = dump.locator("tr.sequence", has_text="ProcedureCodeSequence")
    expect(sequence.locator("details").first).to_have_attribute("open", "")
    app.shot("dump")
    sequence.locator("summary").first.click()
    expect(sequence.locator("details").first).not_to_have_attribute("open", "")
    page.get_by_label("Filter").fill("CodeMeaning")
    expect(page.get_by_role("status").filter(has_text="match")).to_contain_text("1 element of")
    expect(dump.locator("> tbody > tr")).to_have_count(1)  # only the sequence holding it
    expect(dump).to_contain_text(str(first.ProcedureCodeSequence[0].CodeMeaning))
    page.get_by_label("Filter").fill("no such element anywhere")
    expect(dump).to_contain_text("No element matches.")


def test_field_queries_sorting_and_selection(app):
    page = app.login()
    app.search("Modality:MR")
    expect(page.locator(".meta")).to_contain_text("patients")
    mr_patients = {p for p in range(3) for s in range(2) if studygen._study_modality("mixed", p, s) == "MR"}
    expect(page.locator("table.results tbody tr")).to_have_count(len(mr_patients))
    app.search("*:*")
    rows = page.locator("table.results tbody tr")
    patients = admin(app.daemon).get("/searchDIM", query="*:*", depth="none").json()["numResults"]
    assert 4 <= patients <= 25  # 3 generated patients, the multi-frame object's, maybe other tests'
    expect(rows).to_have_count(patients)
    names = lambda: [rows.nth(i).locator("td").nth(2).inner_text() for i in range(rows.count())]  # noqa: E731
    header = page.locator("th", has=page.get_by_role("button", name="Name"))
    header.get_by_role("button").click()
    expect(header).to_have_attribute("aria-sort", "ascending")
    ascending = names()
    assert ascending == sorted(ascending, key=str.lower)
    header.get_by_role("button").click()
    expect(header).to_have_attribute("aria-sort", "descending")
    assert names() == ascending[::-1]
    # Selection: one row, then all of them.
    toolbar = page.get_by_role("toolbar", name="Actions on results")
    expect(toolbar).to_contain_text("Nothing selected")
    expect(toolbar.get_by_role("button", name="Unindex…")).to_be_disabled()
    rows.first.get_by_role("checkbox").check()
    expect(toolbar).to_contain_text("1 patient selected")
    expect(toolbar.get_by_role("button", name="Unindex…")).to_be_enabled()
    page.get_by_role("checkbox", name="Select every patient on this page").check()
    expect(toolbar).to_contain_text(f"{patients} patients selected")
    # A patient found by a field other than its name still opens.
    app.search(f"PatientID:{instance(1, 0, 0, 0).PatientID}")
    expect(rows).to_have_count(1)


def test_patients_come_in_pages(app, archive):
    paged = [studygen.make_instance(100 + n, 0, 0, 0, size=8, PatientName=f"PAGED^P{n:02d}") for n in range(27)]
    assert archive.store(*paged) == [0] * 27
    page = app.login()
    app.search("PatientName:paged*")
    rows = page.locator("table.results tbody tr")
    pager = page.get_by_role("navigation", name="Pages of patients")
    expect(pager).to_contain_text("Patients 1–25 of 27")
    expect(rows).to_have_count(25)
    first_page = set(rows.locator("td:nth-child(2)").all_inner_texts())
    pager.get_by_role("link", name="Next ›").click()
    expect(pager).to_contain_text("Patients 26–27 of 27")
    expect(rows).to_have_count(2)
    assert not first_page & set(rows.locator("td:nth-child(2)").all_inner_texts())
    assert "offset=25" in page.url
    pager.get_by_role("link", name="‹ Previous").click()
    expect(rows).to_have_count(25)


def test_keyword_autocompletion_after_and_or(app):
    page = app.login()
    box = page.get_by_role("combobox", name="Search")
    box.fill("doe")
    box.press_sequentially(" AND Pati")
    listbox = page.get_by_role("listbox", name="Field names")
    expect(listbox).to_be_visible()
    expect(box).to_have_attribute("aria-expanded", "true")
    expect(listbox.get_by_role("option").first).to_have_text("PatientName")
    app.shot("autocomplete")
    box.press("ArrowDown")
    expect(listbox.get_by_role("option").first).to_have_attribute("aria-selected", "true")
    box.press("Enter")
    expect(box).to_have_value("doe AND PatientName:")
    expect(listbox).to_be_hidden()
    box.press_sequentially("doe OR Moda")
    expect(listbox.get_by_role("option", name="Modality", exact=True)).to_be_visible()
    box.press("Escape")
    expect(listbox).to_be_hidden()
    # Free text at the start is left alone.
    box.fill("Pati")
    expect(listbox).to_be_hidden()
    # The help popover fills the box with an example.
    page.get_by_role("button", name="Query syntax help").click()
    help_ = page.get_by_role("dialog", name="Query syntax")
    expect(help_).to_be_visible()
    help_.get_by_role("button", name="PatientName:doe*").click()
    expect(help_).to_be_hidden()
    expect(box).to_have_value("PatientName:doe*")


def test_a_bad_query_shows_the_apis_error_next_to_the_box(app):
    page = app.login()
    app.allow(r"status of 400 .*/searchDIM")
    app.search("Modality:CT AND (")
    error = page.locator(".query-error")
    expect(error).to_contain_text("query ends where a term was expected at position 17")
    expect(error.locator("mark")).to_have_class(re.compile("end"))
    box = page.get_by_role("combobox", name="Search")
    expect(box).to_have_attribute("aria-invalid", "true")
    assert box.get_attribute("aria-describedby").split()[0] == error.get_attribute("id")
    app.search('PatientName:doe ) AND Modality:CT')
    expect(error).to_contain_text("unexpected ')' at position 16")
    expect(error.locator("mark")).to_have_text(")")
    assert box.evaluate("(input) => [input.selectionStart, input.selectionEnd]") == [16, 17]
    expect(page.locator("table.results")).to_have_count(0)
    app.shot("query-error", docs=True)
    # Typing clears it.
    box.press_sequentially("x")
    expect(error).to_be_empty()
    expect(box).not_to_have_attribute("aria-invalid", "true")


def test_preview_plays_the_frames_of_a_multiframe_object(app):
    ds = pydicom.dcmread(get_testdata_file(MULTIFRAME), stop_before_pixels=True)
    page = app.login()
    app.search(f"SeriesInstanceUID:{ds.SeriesInstanceUID}")
    page.locator("table.results tbody a").first.click()
    page.locator("table.results tbody a").first.click()
    page.locator("table.results tbody a").first.click()
    page.get_by_role("button", name="Preview", exact=True).click()
    dialog = page.get_by_role("dialog", name="Preview")
    slider = dialog.get_by_role("slider", name="Frame")
    expect(slider).to_be_visible()
    expect(slider).to_have_attribute("max", "29")
    expect(dialog.locator(".preview-status")).to_contain_text("frame 1 of 30")
    slider.focus()
    dialog.get_by_role("button", name="Next frame").click()
    dialog.get_by_role("button", name="Next frame").click()
    expect(dialog.locator(".preview-status")).to_contain_text("frame 3 of 30")
    picture = dialog.locator("img.preview")
    expect(picture).to_have_attribute("src", re.compile(r"frame=2"))
    page.wait_for_function("() => { const i = document.querySelector('img.preview'); return i.complete && i.naturalWidth === 320; }")
    dialog.locator(".preview-body").focus()  # the slider takes arrow keys itself
    page.keyboard.press("ArrowRight")
    expect(dialog.locator(".preview-status")).to_contain_text("frame 4 of 30")
    app.shot("preview-frames", docs=True)


def test_open_in_viewer_where_the_viewer_is_installed(app, archive):
    study = instance(0, 0, 0, 0).StudyInstanceUID
    page = app.login()
    app.search("doe")
    page.get_by_role("link", name="DOE, JOHN").click()
    expect(page.locator(".meta")).to_contain_text("2 studies")
    expect(page.get_by_role("link", name=re.compile("in the viewer"))).to_have_count(0)  # not installed
    viewer = archive.data_dir / "viewer"
    viewer.mkdir()
    (viewer / "index.html").write_text("<!doctype html><title>viewer stand-in</title><p>viewer stand-in</p>")
    try:
        page.reload()
        expect(page.get_by_role("link", name=re.compile("in the viewer"))).to_have_count(2)
        row = page.locator("table.results tbody tr", has_text=str(instance(0, 0, 0, 0).StudyDescription))
        link = row.get_by_role("link", name=re.compile("in the viewer"))
        expect(link).to_have_attribute("href", f"/viewer/viewer?StudyInstanceUIDs={study}")
        with page.context.expect_page() as opened:
            link.click()
        expect(opened.value.get_by_text("viewer stand-in")).to_be_visible()
        opened.value.close()
        row.get_by_role("link", name=str(instance(0, 0, 0, 0).StudyDescription), exact=True).click()
        expect(page.get_by_role("link", name="Open study in viewer")).to_have_attribute("href", f"/viewer/viewer?StudyInstanceUIDs={study}")
    finally:
        shutil.rmtree(viewer)


def logged_in_and_settled(app):
    """The first screen, once it has asked all it asks (menu plugins, providers)."""
    with app.page.expect_response(lambda response: "/webui?slot-id=menu" in response.url):
        page = app.login()
    expect(page.locator("select[name=provider] option")).to_have_count(2)
    return page


def end_the_session_and_log_in_again(app, archive, page) -> str:
    """Log the page's session out behind its back, search (which finds it ended), log in again
    and see the search's results; the ended session's token."""
    token = page.evaluate("sessionStorage.getItem('dicoogled.token')")
    assert Client(base_url(archive), token).post("/logout").json() == {"success": True}
    app.allow(r"status of 401")
    app.search("doe")
    expect(page.get_by_text("Your session has ended: log in again.")).to_be_visible()
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(ADMIN_PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("table.results tbody tr")).to_have_count(1)  # back where it was
    return token


def test_an_ended_session_goes_back_to_the_login(app, archive):
    end_the_session_and_log_in_again(app, archive, logged_in_and_settled(app))


def test_a_401_to_a_request_sent_before_a_new_login_does_not_end_the_new_session(app, archive):
    """A request sent under the old token and answered (401) only after the user logged in again
    is that request's failure: the new session stays, and the screen with it."""
    held = []
    app.page.route("**/held-probe", lambda route: held.append(route))  # no such route: answered by the test, when it says
    page = logged_in_and_settled(app)
    page.evaluate("import('/static/js/api.js').then(api => { window.slow = api.get('/held-probe').catch(e => e.status); })")
    for _ in range(500):  # the browser's events are handled only while Playwright is called
        if held:
            break
        page.wait_for_timeout(20)
    assert held, "the slow request was not sent"
    token = end_the_session_and_log_in_again(app, archive, page)
    held.pop().fulfill(status=401, content_type="application/json", body='{"error": "log in first"}')
    assert page.evaluate("window.slow") == 401  # answered, and the app has heard it
    expect(page.locator("table.results tbody tr")).to_have_count(1)
    expect(page.get_by_role("button", name="Log in")).to_have_count(0)
    assert page.evaluate("sessionStorage.getItem('dicoogled.token')") not in (None, token)


# ---- export ---------------------------------------------------------------------------------------------


def test_export_csv_with_a_field_picker_and_presets(app, archive):
    page = app.login()
    app.search("doe")
    page.get_by_role("button", name="Export CSV…").click()
    dialog = page.get_by_role("dialog", name="Export to CSV")
    expect(dialog).to_contain_text('every result of "doe"')
    chips = dialog.get_by_role("list", name="Fields to export, in order")
    # Start from two fields only: PatientName and Modality, then add one.
    for chip in chips.locator("li").all_inner_texts():
        name = chip.split("\n")[0].strip()
        if name not in ("PatientName", "Modality"):
            dialog.get_by_role("button", name=f"Remove {name}").click()
    expect(chips.locator("li")).to_have_count(2)
    dialog.get_by_label("Add a field").fill("NotAKeyword")
    dialog.get_by_role("button", name="Add", exact=True).click()
    expect(dialog.get_by_role("alert")).to_contain_text("Not a DICOM keyword: NotAKeyword")
    dialog.get_by_label("Add a field").fill("InstanceNumber")
    dialog.get_by_label("Add a field").press("Enter")
    expect(chips.locator("li")).to_have_count(3)
    dialog.get_by_label("Save these fields as").fill("three fields")
    dialog.get_by_role("button", name="Save preset").click()
    expect(dialog.get_by_role("status").filter(has_text="saved")).to_contain_text('Preset "three fields" saved.')
    presets = admin(archive).get("/presets/admin").json()
    assert {"name": "three fields", "fields": ["PatientName", "Modality", "InstanceNumber"]} in presets
    dialog.get_by_role("button", name="Remove InstanceNumber").click()
    dialog.get_by_label("Load").select_option("three fields")
    expect(chips.locator("li")).to_have_count(3)
    app.shot("export", docs=True)
    with page.expect_download() as download_info:
        dialog.get_by_role("button", name="Export CSV").click()
    download = download_info.value
    assert download.suggested_filename == "QueryResultsExport.csv"
    lines = pathlib.Path(download.path()).read_text(encoding="utf-8").splitlines()
    assert lines[0] == '"PatientName";"Modality";"InstanceNumber";'
    rows = list(csv.reader(io.StringIO("\n".join(lines[1:])), delimiter=";"))
    assert len(rows) == 12  # one patient: 2 studies x 2 series x 3 images
    assert {row[0] for row in rows} == {"DOE^JOHN"}
    assert sorted({int(row[2]) for row in rows}) == [1, 2, 3]
    expect(dialog).to_be_hidden()


def test_export_of_a_selection_covers_only_it(app):
    page = app.login()
    app.search("*:*")
    page.locator("table.results tbody tr", has_text="DOE, JOHN").get_by_role("checkbox").check()
    page.get_by_role("button", name="Export CSV…").click()
    dialog = page.get_by_role("dialog", name="Export to CSV")
    expect(dialog).to_contain_text("the 1 selected patient")
    with page.expect_download() as download_info:
        dialog.get_by_role("button", name="Export CSV").click()
    text = pathlib.Path(download_info.value.path()).read_text(encoding="utf-8")
    assert text.count("\n") == 13 and "DOE^JOHN" in text and "MÜLLER" not in text


# ---- unindex and remove ----------------------------------------------------------------------------------


def test_unindex_a_series_and_remove_an_image_after_confirming(app, archive):
    client = admin(archive)
    victims = [studygen.make_instance(7, 0, s, i, PatientName="UNINDEX^ME") for s in range(2) for i in range(2)]
    assert archive.store(*victims) == [0] * 4
    page = app.login()
    app.search("PatientName:unindex*")
    page.get_by_role("link", name="UNINDEX, ME").click()
    page.locator("table.results tbody a").first.click()
    rows = page.locator("table.results tbody tr")
    expect(rows).to_have_count(2)
    rows.first.get_by_role("checkbox").check()
    page.get_by_role("button", name="Unindex…").click()
    confirm = page.get_by_role("dialog", name="Unindex 1 series?")
    expect(confirm).to_contain_text("Their files stay on disk")
    confirm.get_by_role("button", name="Cancel").click()  # nothing happens
    expect(confirm).to_be_hidden()
    assert client.get("/search", query="PatientName:unindex*").json()["numResults"] == 4
    page.get_by_role("button", name="Unindex…").click()
    app.shot("confirm-unindex")
    page.get_by_role("dialog", name="Unindex 1 series?").get_by_role("button", name="Unindex").click()
    expect(page.locator(".notice")).to_contain_text("Unindexed 2 images.")
    expect(rows).to_have_count(1)
    assert client.get("/search", query="PatientName:unindex*").json()["numResults"] == 2
    # Remove an image: its file goes.
    rows.first.get_by_role("link").click()
    image_rows = page.locator("table.results tbody tr")
    expect(image_rows).to_have_count(2)
    image_rows.first.get_by_role("checkbox").check()
    path = client.get("/search", query=f"SOPInstanceUID:{image_rows.first.locator('.uid').inner_text()}").json()["results"][0]["uri"]
    path = pathlib.Path(path.removeprefix("file://"))
    assert path.exists()
    page.get_by_role("button", name="Remove…").click()
    page.get_by_role("dialog", name="Remove 1 image?").get_by_role("button", name="Delete the files").click()
    expect(page.locator(".notice").last).to_contain_text("Removed 1 image.")
    expect(image_rows).to_have_count(1)
    assert not path.exists()


# ---- indexer ------------------------------------------------------------------------------------------------


def test_index_a_folder_and_watch_the_task_reach_100_percent(app, archive):
    folder = archive.root / "to-index"
    for patient in range(2):  # 40 files of two patients no other test searches for
        for series in range(2):
            for number in range(10):
                path = studygen.instance_path(folder, patient, 0, series, number)
                path.parent.mkdir(parents=True, exist_ok=True)
                ds = studygen.make_instance(patient, 0, series, number, seed=5, PatientName=f"INDEXED^FOLDER{patient}")
                pydicom.dcmwrite(path, ds, enforce_file_format=True)
    before = archive.counts()["instances"]
    page = app.login(hash_="#/indexer")
    expect(page.get_by_role("heading", name="Indexer")).to_be_visible()
    expect(page.get_by_text("No tasks.")).to_be_visible()
    page.get_by_label("Folder or file: URI").fill(str(folder))
    page.get_by_role("button", name="Index", exact=True).click()
    task = page.locator("article.task", has_text=folder.as_uri())
    expect(task).to_be_visible()
    expect(task.locator(".percent")).to_have_text("100%", timeout=60_000)
    expect(task.locator(".badge")).to_have_text("finished")
    expect(task).to_contain_text("40 files indexed")
    assert task.locator("progress").evaluate("(bar) => bar.value") == 1
    app.shot("indexer", docs=True)
    assert archive.counts()["instances"] == before + 40
    task.get_by_role("button", name="Close").click()
    expect(task).to_have_count(0)
    # A folder that does not exist: the API's reason, next to the form.
    app.allow(r"status of 400 .*/management/tasks/index")
    page.get_by_label("Folder or file: URI").fill(str(folder / "nowhere"))
    page.get_by_role("button", name="Index", exact=True).click()
    expect(page.get_by_role("alert")).to_contain_text("does not exist")


def test_watched_folders_show_their_state(app, archive, tmp_path):
    watched = tmp_path / "inbox"
    watched.mkdir()
    page = app.login(hash_="#/indexer")
    section = page.get_by_role("region", name="Watched folders")
    expect(section).to_contain_text("No folder is watched.")
    section.get_by_label("Add a folder").fill(str(watched))
    section.get_by_role("button", name="Watch").click()
    row = section.locator("tr", has_text=str(watched))
    expect(row).to_contain_text("watching")
    assert str(watched) in archive.health()["watch"]["folders"]
    row.get_by_role("button", name="Stop watching").click()
    expect(section).to_contain_text("No folder is watched.")
    assert archive.health()["watch"]["folders"] == []


# ---- management -------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("storescp") is None, reason="needs DCMTK's storescp")
def test_add_and_test_move_destinations(app, archive, tmp_path):
    scp = StoreSCP(tmp_path / "received", "STORESCP")
    try:
        page = app.login(hash_="#/management?tab=destinations")
        expect(page.get_by_role("tab", name="Move destinations")).to_have_attribute("aria-selected", "true")
        expect(page.get_by_text("No destination yet.")).to_be_visible()
        form = page.locator("form", has=page.get_by_role("heading", name="Add a destination"))
        for aet, port in (("STORESCP", scp.port), ("NOBODY", free_port())):
            form.get_by_label("AE title").fill(aet)
            form.get_by_label("Host").fill("127.0.0.1")
            form.get_by_label("Port").fill(str(port))
            form.get_by_label("Description").fill(f"{aet.lower()} test")
            form.get_by_role("button", name="Add destination").click()
            expect(page.locator("table.plain tbody tr", has_text=aet)).to_be_visible()
        page.get_by_role("button", name="Test STORESCP with a C-ECHO").click()
        row = page.locator("table.plain tbody tr", has_text="STORESCP")
        expect(row.locator(".echo-result")).to_contain_text("answers C-ECHO")
        page.get_by_role("button", name="Test NOBODY with a C-ECHO").click()
        expect(page.locator("table.plain tbody tr", has_text="NOBODY").locator(".echo-result")).to_contain_text("did not answer", timeout=30_000)
        app.shot("management-destinations", docs=True)
        page.get_by_role("button", name="Remove NOBODY").click()
        page.get_by_role("dialog", name="Remove NOBODY?").get_by_role("button", name="Remove").click()
        expect(page.locator("table.plain tbody tr", has_text="NOBODY")).to_have_count(0)
        assert [d["AETitle"] for d in admin(archive).get("/management/settings/storage/dicom").json()] == ["STORESCP"]
        # A bad port is refused with the API's reason.
        app.allow(r"status of 400 .*/management/settings/storage/dicom")
        form.get_by_label("AE title").fill("BAD")
        form.get_by_label("Port").fill("70000")
        form.evaluate("(form) => form.noValidate = true")
        form.get_by_role("button", name="Add destination").click()
        expect(form.get_by_role("alert")).to_contain_text("Illegal port parameter")
    finally:
        scp.stop()
        admin(archive).post("/management/settings/storage/dicom", data={"type": "remove", "aetitle": "STORESCP"})


def test_management_tabs_services_syntaxes_limits_plugins_and_log(app, archive):
    page = app.login(hash_="#/management")
    expect(page.get_by_role("tab", name="DICOM service")).to_have_attribute("aria-selected", "true")
    panel = page.get_by_role("tabpanel")
    expect(panel).to_contain_text("running")
    expect(panel.get_by_label("Port")).to_have_value(str(archive.dicom_port))
    expect(panel.get_by_label("This archive's AE title")).to_have_value("DICOOGLED")
    app.shot("management-service")
    panel.get_by_role("button", name="Stop the listener").click()
    page.get_by_role("dialog", name="Stop the DICOM listener?").get_by_role("button", name="Stop").click()
    expect(panel.locator(".badge")).to_have_text("stopped")
    assert admin(archive).get("/management/dicom/storage").json()["isRunning"] is False
    panel.get_by_role("button", name="Start the listener").click()
    expect(panel.locator(".badge")).to_have_text("running")
    assert archive.find({"PatientName": "DOE*", "StudyInstanceUID": ""})[1] == 0  # serving again
    # Arrow keys move between tabs.
    page.get_by_role("tab", name="DICOM service").focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="Move destinations")).to_have_attribute("aria-selected", "true")
    expect(page.get_by_role("tab", name="Move destinations")).to_be_focused()

    page.get_by_role("tab", name="Transfer syntaxes").click()
    panel.get_by_label("Find a SOP class").fill("CT Image Storage")
    syntax = panel.get_by_label(re.compile(r"^JPEGLossless "))  # JPEG Lossless, first-order prediction
    expect(syntax.first).to_be_checked()
    syntax.first.uncheck()
    expect(panel.get_by_role("status")).to_contain_text("refused")
    ct = next(c for c in admin(archive).get("/management/settings/transfer").json() if c["sop_name"] == "CT Image Storage")
    assert [o["value"] for o in ct["options"] if o["name"] == "JPEGLossless"] == [False]
    syntax.first.check()
    expect(panel.get_by_role("status")).to_contain_text("accepted")

    page.get_by_role("tab", name="Q/R limits").click()
    panel.get_by_label("Simultaneous associations").fill("12")
    panel.get_by_role("button", name="Save limits").click()
    expect(panel.get_by_role("status")).to_contain_text("Saved")
    assert admin(archive).get("/management/settings/dicom/query").json()["maxAssociations"] == 12

    page.get_by_role("tab", name="Plugins").click()
    table = panel.locator("table.plain")
    expect(table).to_contain_text("prefs")
    expect(table.locator("tr", has_text="index")).to_contain_text("built in")
    dead = panel.locator("section.dead")
    expect(dead).to_contain_text("broken")
    expect(dead).to_contain_text("broken on purpose")
    expect(panel.locator("dicoogle-slot[data-slot-id=settings]")).to_have_text("greeting is hi")
    app.shot("management-plugins")
    panel.get_by_role("button", name="Settings of prefs").click()
    settings = page.get_by_role("dialog", name="Settings of prefs")
    settings.get_by_label("greeting").fill("hello")
    settings.get_by_role("button", name="Save settings").click()
    expect(settings).to_be_hidden()
    assert admin(archive).get("/plugins/prefs/settings").json()["greeting"] == "hello"
    panel.get_by_role("button", name="Enable tagger").click()
    expect(panel.get_by_role("button", name="Disable tagger")).to_be_visible()
    assert [p["name"] for p in admin(archive).get("/webui", **{"slot-id": "result-options"}).json()["plugins"]] == ["tagger"]
    panel.get_by_role("button", name="Disable tagger").click()
    expect(panel.get_by_role("button", name="Enable tagger")).to_be_visible()
    assert admin(archive).get("/webui", **{"slot-id": "result-options"}).json()["plugins"] == []

    page.get_by_role("tab", name="Log").click()
    log = panel.locator("pre.log")
    expect(log).to_contain_text("INFO")
    panel.get_by_label("Level").select_option("ERROR")
    expect(log).to_contain_text("broken on purpose")  # the dead plugin's line
    panel.get_by_label("Filter").fill("no line says this")
    expect(log).to_have_text("")


def test_users_create_and_log_in_as_them_without_management(app, archive, browser):
    page = app.login(hash_="#/management?tab=users")
    panel = page.get_by_role("tabpanel")
    panel.get_by_label("Username").fill("reader")
    panel.get_by_label("Password", exact=True).fill("reader-secret-1")
    panel.get_by_role("button", name="Create user").click()
    expect(panel.locator("table.plain")).to_contain_text("reader")
    app.shot("management-users")
    panel.get_by_role("button", name="Change the password of reader").click()
    dialog = page.get_by_role("dialog", name="Password of reader")
    dialog.get_by_label("New password").fill("reader-secret-2")
    dialog.get_by_role("button", name="Change password").click()
    expect(page.locator(".notice", has_text="The password of reader is changed.")).to_be_visible()

    reader = App(browser, archive)
    try:
        page = reader.login("reader", "reader-secret-2")
        sidebar = page.get_by_role("navigation", name="Main")
        expect(sidebar.get_by_role("link", name="Search")).to_be_visible()
        expect(sidebar.get_by_role("link", name="Management")).to_have_count(0)
        expect(sidebar.get_by_role("link", name="Indexer")).to_have_count(0)
        reader.search("doe")
        expect(page.locator("table.results tbody tr")).to_have_count(1)
        expect(page.get_by_role("button", name="Unindex…")).to_have_count(0)
        reader.open("#/management")
        expect(page.get_by_role("alert")).to_have_text("This page needs an administrator.")
        reader.shot("refused-management")
        # One's own password, from the account button.
        page.get_by_role("button", name="reader", exact=True).click()
        account = page.get_by_role("dialog", name="Account")
        account.get_by_label("New password", exact=True).fill("reader-secret-3")
        account.get_by_label("New password again").fill("reader-secret-3")
        account.get_by_role("button", name="Change password").click()
        expect(page.locator(".notice", has_text="Password changed.")).to_be_visible()
        Client(base_url(archive)).login("reader", "reader-secret-3")
    finally:
        reader.close()
    assert not reader.errors, reader.errors

    # Deleting them, after a confirmation.
    app.page.get_by_role("button", name="Delete reader").click()
    app.page.get_by_role("dialog", name="Delete reader?").get_by_role("button", name="Delete").click()
    expect(panel.locator("table.plain")).not_to_contain_text("reader")


# ---- plugins in the web app's slots ---------------------------------------------------------------------


@pytest.fixture
def slot_plugins(archive):
    """The menu, result-options and result-batch test plugins, enabled for one test."""
    client = admin(archive)
    for name in ("hello", "counter", "tagger"):
        assert client.post(f"/plugins/webui/{name}/enable").status == 200
    yield
    for name in ("hello", "counter", "tagger"):
        client.post(f"/plugins/webui/{name}/disable")


def test_menu_result_options_and_result_batch_plugins(app, slot_plugins):
    page = app.login()
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Hello page").click()
    expect(page.locator("dicoogle-slot[data-slot-id=menu] .hello-text")).to_have_text("Hello from the menu slot of hello")
    expect(page.get_by_role("link", name="Hello page")).to_have_attribute("aria-current", "page")
    app.shot("plugin-menu")

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Search", exact=True).click()
    query = "PatientName:doe OR PatientName:smith OR PatientName:müller"
    app.search(query)
    rows = page.locator("table.results tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.locator(".tag-cell").first).to_have_text(re.compile(r"^patient:P"))
    rows.nth(0).get_by_role("checkbox").check()
    rows.nth(2).get_by_role("checkbox").check()
    page.get_by_role("button", name="Count selection").click()
    dialog = page.get_by_role("dialog", name="Count selection")
    expect(dialog.locator(".counter-out")).to_have_text(f"2 patient selected of 3 for {query}")
    app.shot("plugin-result-batch")
    dialog.get_by_role("button", name="Done counting").click()
    expect(dialog).to_be_hidden()
    # At the study level the cells carry the study UID.
    rows.first.locator("a").first.click()
    expect(page.locator("table.results tbody .tag-cell").first).to_have_text(re.compile(r"^study:[0-9.]+$"))


# ---- dashboard ----------------------------------------------------------------------------------------------


def test_dashboard_counts_storage_and_plots(app, archive):
    health = archive.health()
    page = app.login(hash_="#/dashboard")
    stats = page.get_by_role("region", name="What the archive holds")
    expect(stats.locator(".stat", has_text="Studies")).to_contain_text(str(health["counts"]["studies"]))
    expect(stats.locator(".stat", has_text="Images")).to_contain_text(str(health["counts"]["instances"]))
    assert health["storage"]["bytes"] > 0
    expect(stats.locator(".stat", has_text="Storage used")).to_contain_text(re.compile(r"\d+(\.\d)? (KB|MB)"))
    # Nothing in the last 12 months, so all time is shown: every study, per year and per modality.
    expect(page.get_by_label("Range")).to_have_value("all")
    time_plot = page.locator("figure.plot", has_text="Studies per year")
    expect(time_plot.locator("svg rect.bar").first).to_be_visible()
    modality_plot = page.locator("figure.plot", has_text="Studies per modality")
    expect(modality_plot.locator("svg rect.bar")).to_have_count(3)  # CT, MR and the multi-frame's US
    counted = sum(int(n) for n in time_plot.locator("tbody td.number").all_text_contents())
    assert counted == health["counts"]["studies"]
    app.shot("dashboard", docs=True)
    page.get_by_label("Range").select_option("custom")
    page.get_by_label("From", exact=True).fill("2016-01-01")
    page.get_by_label("To", exact=True).fill("2016-02-15")
    page.get_by_role("button", name="Show").click()
    expect(page.locator("figure.plot", has_text="Studies per day")).to_be_visible()


# ---- layout and keyboard ------------------------------------------------------------------------------------


def test_tablet_layout_and_keyboard_only_use(browser, archive):
    tab = App(browser, archive, viewport={"width": 768, "height": 1024})
    try:
        page = tab.login()
        # The sidebar becomes a bar above the page; nothing overflows sideways.
        sidebar = page.get_by_role("navigation", name="Main").bounding_box()
        assert sidebar["width"] > 700 and sidebar["height"] < 120
        box = page.get_by_role("combobox", name="Search")
        expect(box).to_be_focused()
        page.keyboard.type("doe")
        page.keyboard.press("Enter")
        expect(page.locator("table.results tbody tr")).to_have_count(1)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        tab.shot("tablet-search")
        # Tab to the patient's link and open it with Enter; focus is visible on the way.
        for _ in range(30):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.textContent") == "DOE, JOHN":
                break
        assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
        page.keyboard.press("Enter")
        expect(page.locator(".meta")).to_contain_text("2 studies")
        # Focus moved to the new results, so the next Tab lands among them, not at the top.
        expect(page.get_by_role("region", name="Results")).to_be_focused()
        page.keyboard.press("Tab")
        assert page.evaluate("!!document.activeElement.closest('.results-area')")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        # A dialog keeps focus inside it and gives it back when closed.
        page.get_by_role("button", name="Export CSV…").focus()
        page.keyboard.press("Enter")
        dialog = page.get_by_role("dialog", name="Export to CSV")
        expect(dialog).to_be_visible()
        for _ in range(25):
            page.keyboard.press("Tab")
            assert page.evaluate("!!document.activeElement.closest('[role=dialog]')")
        page.keyboard.press("Escape")
        expect(dialog).to_be_hidden()
        expect(page.get_by_role("button", name="Export CSV…")).to_be_focused()
        # Every other screen fits the tablet too (wide tables scroll inside their own box).
        for hash_, ready in (("#/dashboard", "figure.plot"), ("#/indexer", "article.task, .tasks p"),
                             *((f"#/management?tab={tab}", "[role=tabpanel] .card")
                               for tab in ("services", "destinations", "transfer", "limits", "plugins", "users", "log"))):
            tab.open(hash_)
            expect(page.locator(ready).first).to_be_visible()
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), hash_
        tab.shot("tablet-management")
    finally:
        tab.close()
    assert not tab.errors, tab.errors


# ---- worklist -----------------------------------------------------------------------------------------------


def test_worklist_form_schedules_mpps_moves_it_and_delete_removes_it(app, archive):
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid
    from pynetdicom import AE
    from pynetdicom.sop_class import ModalityPerformedProcedureStep

    page = app.login(hash_="#/worklist")
    form = page.get_by_role("form", name="Schedule a procedure step")
    form.get_by_role("button", name="Schedule").click()  # empty: the browser asks for the name first
    expect(page.locator("tbody tr")).to_have_count(0)
    form.get_by_label("Patient name").fill("WEB^PATIENT")
    form.get_by_label("Patient ID").fill("W1")
    form.get_by_label("Accession number").fill("WEB1")
    form.get_by_label("Station AE title").fill("CT01")
    form.get_by_label("Modality").fill("CT")
    form.get_by_label("Date").fill("2026-12-06")
    form.get_by_role("button", name="Schedule").click()
    row = page.locator("tbody tr", has_text="WEB1")
    expect(row).to_contain_text("WEB^PATIENT")
    expect(row).to_contain_text("20261206")
    expect(row.locator(".badge")).to_have_text("SCHEDULED")
    [entry] = admin(archive).get("/worklist").json()
    assert Dataset.from_json(entry["dataset"]).ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "CT01"

    # The modality begins the step (MPPS N-CREATE): the screen shows it in progress.
    scheduled = Dataset()
    scheduled.StudyInstanceUID, scheduled.AccessionNumber = entry["StudyInstanceUID"], "WEB1"
    performed = Dataset()
    performed.ScheduledStepAttributesSequence = [scheduled]
    performed.PerformedProcedureStepStatus = "IN PROGRESS"
    ae = AE(ae_title="CT01")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    association = ae.associate("127.0.0.1", archive.dicom_port, ae_title="DICOOGLED")
    try:
        status, _ = association.send_n_create(performed, ModalityPerformedProcedureStep, generate_uid())
        assert status.Status == 0
    finally:
        association.release()
    page.reload()
    expect(page.locator("tbody tr", has_text="WEB1").locator(".badge")).to_have_text("IN PROGRESS")
    app.shot("worklist", docs=True)

    page.get_by_role("button", name="Delete WEB1").click()
    page.get_by_role("dialog", name="Delete WEB1?").get_by_role("button", name="Delete").click()
    expect(page.get_by_text("The worklist is empty.")).to_be_visible()
    assert admin(archive).get("/worklist").json() == []


# ---- research exports -----------------------------------------------------------------------------------------


def test_research_screen_deidentifies_a_collection_and_shows_the_map(browser, start_daemon, tmp_path):
    """An administrator de-identifies a labelled collection from the Research screen, in an archive
    of its own (the copies are new patients other tests would count): the export's task finishes,
    the new label is listed with its count, the map names the patient (on screen and in the CSV),
    and a UID is looked up both ways. A user who is no administrator has no Research screen."""
    import dicoogled

    daemon = start_daemon(env={"DICOOGLED_ADMIN_PASSWORD": ADMIN_PASSWORD})
    originals = [pydicom.dcmread(path) for path in studygen.generate(tmp_path / "gen", patients=2, studies=1, series=1, instances=2)]
    assert set(daemon.store(*originals)) == {0}
    client = admin(daemon)
    cohort = [ds for ds in originals if ds.PatientID == originals[0].PatientID]
    study = cohort[0]
    assert client.request("PUT", f"/studies/{study.StudyInstanceUID}/labels/web-cohort").status == 200

    tab = App(browser, daemon)
    try:
        page = tab.login(hash_="#/research")
        expect(page.get_by_role("heading", name="Research", exact=True)).to_be_visible()
        expect(page.get_by_text("The map is empty")).to_be_visible()
        form = page.get_by_role("form", name="De-identify a collection")
        source = form.get_by_label("Collection to de-identify")
        expect(source).to_have_value("web-cohort")
        expect(source.locator("option")).to_have_text(["web-cohort (1 study)"])
        # The API's reason for a refusal, next to the form.
        tab.allow(r"status of 400 .*/research/export")
        form.get_by_label("Label of the copies").fill("web-cohort")
        form.get_by_role("button", name="De-identify").click()
        expect(form.get_by_role("alert")).to_contain_text("into must be another label")

        form.get_by_label("Label of the copies").fill("web-research")
        form.get_by_label("Dates", exact=True).select_option("offset")
        form.get_by_label("Device identity").check()
        form.get_by_role("button", name="De-identify").click()
        task = page.get_by_role("region", name="Exports").locator("article.task", has_text="into web-research")
        expect(task.locator(".badge")).to_have_text("finished", timeout=60_000)
        expect(task).to_contain_text(f"{len(cohort)} instances de-identified")
        expect(form.get_by_role("status")).to_have_text(f"Done: {len(cohort)} instances de-identified into web-research (1 study).")
        collections = page.get_by_role("region", name="Collections")
        expect(collections.locator("tr[data-label='web-research'] td").nth(1)).to_have_text("1")
        expect(source.locator("option")).to_have_text(["web-cohort (1 study)", "web-research (1 study)"])

        # The form's options reached the export: dates moved by the patient's offset, the station kept.
        [patient] = client.get("/research/pseudonyms").json()["pseudonyms"]
        [copy_uid] = client.get("/research/uids", original=study.StudyInstanceUID).json()["uids"]
        found = client.get("/search", query="label:web-research", field=["StudyDate", "StationName", "StudyInstanceUID"]).json()["results"]
        assert {(r["fields"]["StudyInstanceUID"], r["fields"]["StudyDate"], r["fields"]["StationName"]) for r in found} == {
            (copy_uid["replacement"], dicoogled._shift_date(study.StudyDate, patient["dateOffsetDays"]), study.StationName)}

        # The map: the patient on screen, then in the CSV download.
        map_section = page.get_by_role("region", name="Pseudonym map")
        row = map_section.locator("tbody tr", has_text=patient["pseudonym"])
        expect(row).to_contain_text(study.PatientID)
        expect(row).to_contain_text(str(study.PatientName))
        expect(map_section.get_by_role("navigation", name="Pages of the pseudonym map")).to_contain_text("1–1 of 1 patient")
        map_section.get_by_label("Find a patient or a pseudonym").fill("nobody-by-this-name")
        expect(map_section.locator("tbody tr")).to_have_count(0)
        expect(map_section).to_contain_text("No patient matches.")
        map_section.get_by_label("Find a patient or a pseudonym").fill(study.PatientID)
        expect(map_section.locator("tbody tr")).to_have_count(1)
        tab.shot("research")
        with page.expect_download() as download:
            map_section.get_by_role("link", name="Download as CSV").click()
        table = list(csv.DictReader(io.StringIO(pathlib.Path(download.value.path()).read_text())))
        assert [(r["pseudonym"], r["PatientID"], r["PatientName"]) for r in table] == [
            (patient["pseudonym"], study.PatientID, str(study.PatientName))]

        # UID look-up, both ways.
        lookup = page.get_by_role("region", name="UID look-up")
        for uid in (study.StudyInstanceUID, copy_uid["replacement"]):
            lookup.get_by_label("Original or replacement UID").fill(uid)
            lookup.get_by_role("button", name="Look up").click()
            expect(lookup.locator("tbody tr")).to_have_count(1)
            expect(lookup.locator("tbody tr td").nth(0)).to_have_text(study.StudyInstanceUID)
            expect(lookup.locator("tbody tr td").nth(1)).to_have_text(copy_uid["replacement"])
        lookup.get_by_label("Original or replacement UID").fill(originals[-1].StudyInstanceUID)  # not exported
        lookup.get_by_role("button", name="Look up").click()
        expect(lookup.get_by_role("status")).to_contain_text("is neither an original nor a replacement UID")
    finally:
        tab.page.wait_for_load_state("networkidle")
        tab.close()
    assert not tab.errors, "errors in the browser:\n" + "\n".join(tab.errors)

    # Someone who is no administrator: no Research in the sidebar, and the page refuses.
    assert client.post("/user", data={"username": "researcher", "password": "researcher-pw-1", "admin": "false"}).json() == {"success": True}
    reader = App(browser, daemon)
    try:
        page = reader.login("researcher", "researcher-pw-1")
        sidebar = page.get_by_role("navigation", name="Main")
        expect(sidebar.get_by_role("link", name="Search")).to_be_visible()
        expect(sidebar.get_by_role("link", name="Research")).to_have_count(0)
        reader.open("#/research")
        expect(page.get_by_role("alert")).to_have_text("This page needs an administrator.")
        expect(page.get_by_role("form", name="De-identify a collection")).to_have_count(0)
    finally:
        reader.close()
    assert not reader.errors, reader.errors


def test_download_a_study_as_zip_then_import_it_with_progress(app, archive, tmp_path):
    """The study's Download ZIP gives its files; the Import screen sends that ZIP back and shows
    the task to its report. Every file is already stored, byte for byte: nothing is added."""
    study = instance(0, 0, 0, 0)
    page = app.login(hash_=f"#/search?q=*:*&patient={study.PatientID}&study={study.StudyInstanceUID}")
    with page.expect_download() as media:
        page.get_by_role("link", name="Download as media").click()
    with zipfile.ZipFile(media.value.path()) as zipped:
        assert zipped.namelist()[0] == "DICOMDIR"
    with page.expect_download() as download:
        page.get_by_role("link", name="Download ZIP").click()
    saved = tmp_path / "study.zip"
    download.value.save_as(saved)
    with zipfile.ZipFile(saved) as zipped:
        names = zipped.namelist()
    assert len(names) == 6 and all(name.startswith(f"{study.PatientID}/{study.StudyInstanceUID}/") for name in names)
    # A selection: one of the patient's two studies, alone in the ZIP
    page.goto(page.url.split("#")[0] + f"#/search?q=*:*&patient={study.PatientID}")
    other = instance(0, 1, 0, 0)
    page.locator("table.results tbody tr", has=page.locator(f'a[href*="{other.StudyInstanceUID}"]')).get_by_role("checkbox").check()
    with page.expect_download() as selected:
        page.get_by_role("link", name="Download ZIP").click()
    with zipfile.ZipFile(selected.value.path()) as zipped:
        assert {name.split("/")[1] for name in zipped.namelist()} == {other.StudyInstanceUID}
    before = archive.counts()["instances"]
    page.get_by_role("link", name="Import").click()
    expect(page.get_by_role("heading", name="Import", exact=True)).to_be_visible()
    page.get_by_label("ZIP file").set_input_files(str(saved))
    page.get_by_role("button", name="Import", exact=True).click()
    expect(page.get_by_text("Import finished.")).to_be_visible(timeout=60_000)
    expect(page.get_by_text("6 of 6 files: 6 imported, 0 failed")).to_be_visible()
    app.shot("import")
    assert archive.counts()["instances"] == before
