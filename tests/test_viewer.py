"""The OHIF viewer, installed by `dicoogled install-viewer`, lists studies and displays an image.

End to end in Debian's chromium (headless), driven by Playwright with the system browser.
The viewer comes from the npm registry; the test is skipped when chromium or npm is missing.
"""

import re
import shutil
import subprocess
import sys

import pytest

import studygen
from conftest import ROOT, RunningDaemon

pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM or not shutil.which("npm"), reason="needs Debian's chromium and npm")
PASSWORD = "viewer-secret"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def archive_with_viewer(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer")
    install = subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "install-viewer", "--data-dir", str(root / "data")],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    daemon = RunningDaemon(root / "data", env={"DICOOGLED_ADMIN_PASSWORD": PASSWORD}).start()
    paths = studygen.generate(root / "gen", patients=1, studies=1, series=1, instances=4, size=128)
    assert set(daemon.store(*paths)) == {0}
    yield daemon
    daemon.stop()


def test_viewer_lists_studies_and_displays_an_image(archive_with_viewer, tmp_path):
    from playwright.sync_api import sync_playwright

    daemon = archive_with_viewer
    base = f"http://127.0.0.1:{daemon.http_port}"
    study = studygen.make_instance(0, 0, 0, 0).StudyInstanceUID
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        failures = []
        page.on("response", lambda r: failures.append(f"{r.status} {r.url}") if r.status >= 400 and "/dicom-web/" in r.url else None)
        page.goto(f"{base}/health")
        assert page.request.post(f"{base}/login", form={"username": "admin", "password": PASSWORD}).ok  # sets the cookie
        # Its own policy: same origin only, its inline scripts allowed by their hashes alone.
        page.on("console", lambda m: failures.append(m.text) if "Content Security Policy" in m.text else None)
        policy = page.goto(f"{base}/viewer/").headers["content-security-policy"]
        script_src = re.search(r"script-src ([^;]*)", policy)[1]
        assert "'sha256-" in script_src and "unsafe-inline" not in script_src and "frame-ancestors 'none'" in policy
        page.get_by_text("DOE, JOHN").wait_for(timeout=60_000)
        page.screenshot(path=str(tmp_path / "study-list.png"))
        page.goto(f"{base}/viewer/viewer?StudyInstanceUIDs={study}")
        canvas = page.locator("canvas").first
        canvas.wait_for(timeout=60_000)
        # Wait until the canvas shows something other than one flat colour.
        page.wait_for_function(
            """() => { const c = document.querySelector('canvas'); if (!c || !c.width) return false;
                       const d = c.getContext('2d') ? c.getContext('2d').getImageData(0, 0, c.width, c.height).data : null;
                       if (!d) return true;
                       for (let i = 4; i < d.length; i += 4 * 97) if (d[i] !== d[0]) return true; return false; }""",
            timeout=60_000)
        image = canvas.screenshot(path=str(tmp_path / "viewer.png"))
        browser.close()
    assert len(set(image[1000:])) > 10  # a PNG of a non-blank canvas
    assert not failures, failures
