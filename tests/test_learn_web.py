"""The course served by the daemon at /learn/: public HTML rendered from docs/learn/*.md on the
server, its pictures, under the web app's security headers, and nothing outside docs/learn/."""

import http.client
import pathlib
import re

import pytest

from conftest import ROOT

LEARN = ROOT / "docs" / "learn"


def get(daemon, path):
    """GET path without following redirects or normalising it: (status, headers, body text)."""
    connection = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.headers, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def test_pages_are_public_html_with_their_title(daemon):
    status, headers, body = get(daemon, "/learn/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "<title>Learning PACS and DICOM with dicoogled · dicoogled course</title>" in body
    assert '<a href="03-sample-data.md">Sample data</a>' in body
    status, headers, body = get(daemon, "/learn/03-sample-data.md")
    assert status == 200 and "<h1>3. Sample data</h1>" in body
    assert "<details><summary>Solutions</summary>" in body and "<table>" in body
    assert "Content-Security-Policy" in headers and "script-src 'self'" in headers["Content-Security-Policy"]
    assert "<script" not in body and "style=" not in body  # nothing inline: the policy allows none
    assert get(daemon, "/learn")[0] in (301, 302, 303, 307)


def test_every_chapter_renders_and_its_links_resolve(daemon):
    for chapter in sorted(LEARN.glob("*.md")):
        status, _, body = get(daemon, f"/learn/{chapter.name}")
        assert status == 200, chapter.name
        for link in re.findall(r'(?:href|src)="([^":#]+)"', body):
            if link.startswith("/"):
                continue
            assert (LEARN / link).is_file(), f"{chapter.name} links to {link}, which is not in docs/learn/"


def test_the_architecture_picture_is_served(daemon):
    status, headers, body = get(daemon, "/learn/architecture.svg")
    assert status == 200 and headers["Content-Type"].startswith("image/svg+xml")
    assert body.lstrip().startswith("<svg") and "<script" not in body


def test_raw_html_in_a_page_is_shown_as_text():
    import dicoogled
    page = dicoogled.render_learn_page("# T\n\n<script>alert(1)</script>\n\n<img src=x onerror=alert(1)>\n\n"
                                       "[x](javascript:alert(1))\n")
    assert "<script>alert" not in page and "<img src=x" not in page and 'href="javascript:' not in page


@pytest.mark.parametrize("path", [
    "/learn/../dicoogled.py", "/learn/..%2fdicoogled.py", "/learn/%2e%2e/%2e%2e/setup.cfg",
    "/learn/../../README.md", "/learn/.hidden.md", "/learn/nothing.md", "/learn/README.txt",
    "/learn/sub/README.md", "/learn//etc/passwd", "/learn/..%5cdicoogled.py",
])
def test_nothing_outside_the_course_is_served(daemon, path):
    status, _, body = get(daemon, path)
    assert status in (400, 404), (path, status)
    assert "__version__" not in body and "[metadata]" not in body and "root:" not in body


def test_pages_in_a_browser_load_nothing_from_elsewhere_and_log_no_error(daemon):
    """Every page in headless chromium: no console error, no request off the daemon, the picture
    drawn, the folded solutions unfold; the web app's Course link leads to the course."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    import shutil
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not pathlib.Path(chromium).exists():
        pytest.skip("needs Debian's chromium")
    base = f"http://127.0.0.1:{daemon.http_port}"
    errors, elsewhere = [], []
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.on("console", lambda message: message.type == "error" and errors.append(message.text))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("request", lambda request: request.url.startswith((base, "data:")) or elsewhere.append(request.url))
            for chapter in sorted(LEARN.glob("*.md")):
                page.goto(f"{base}/learn/{chapter.name}")
                page.wait_for_load_state("networkidle")
                assert page.title().endswith("· dicoogled course")
                if page.locator("details").count():
                    page.locator("summary").first.click()
                    assert page.locator("details").first.get_attribute("open") is not None
            page.goto(f"{base}/learn/01-what-is-a-pacs.md")
            page.wait_for_load_state("networkidle")
            assert page.eval_on_selector("img[src='architecture.svg']", "image => image.naturalWidth") > 0
            page.goto(f"{base}/")
            page.get_by_role("link", name="Course").first.click()
            page.wait_for_url(f"{base}/learn/")
        finally:
            browser.close()
    assert not errors, errors
    assert not elsewhere, elsewhere
