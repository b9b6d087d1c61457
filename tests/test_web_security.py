"""The HTTP side under hostile use: cross-site requests, security headers, CSV injection, large
anonymous bodies and what anonymous callers can learn, against the real daemon over real HTTP.

Browsers add the session cookie to any request, whichever page makes it; they never add a
token to the Authorization header by themselves. So writes authenticated by the cookie must
come from the server's own pages, while scripts with a token (dicoogle-client, curl,
dicomweb-client) keep working from anywhere.
"""

import base64
import csv
import io
import json
import re
import socket
import urllib.parse

import pytest
import requests

import studygen
from conftest import ROOT, RunningDaemon
from restclient import ADMIN_ENV, ADMIN_PASSWORD, base_url

#: Values a spreadsheet would run as formulas, and a number that only looks like one (a
#: negative SliceLocation), stored in one instance and exported as CSV.
HOSTILE_VALUES = {
    "StudyDescription": "=1+2",
    "InstitutionName": "@SUM(A1:A9)",
    "StudyComments": '+cmd|" /C calc"!A0',
    "SeriesDescription": "-2+3",
    "SliceLocation": "-95.00",
    "PatientName": 'DOE^"JD"',
}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A daemon with one stored instance (of HOSTILE_VALUES), and the admin's token."""
    daemon = RunningDaemon(tmp_path_factory.mktemp("security") / "data", env=ADMIN_ENV).start()
    daemon.instance = studygen.make_instance(0, 0, 0, 0, size=16, **HOSTILE_VALUES)
    assert daemon.store(daemon.instance) == [0]
    daemon.base = base_url(daemon)
    daemon.token = login(daemon)
    yield daemon
    daemon.stop()


def login(daemon, username="admin", password=ADMIN_PASSWORD) -> str:
    response = requests.post(f"{daemon.base}/login", data={"username": username, "password": password})
    assert response.status_code == 200, response.text
    return response.json()["token"]


def user_exists(daemon, username: str) -> bool:
    users = requests.get(f"{daemon.base}/user", headers={"Authorization": daemon.token}).json()["users"]
    return username in {u["username"] for u in users}


def delete_user(daemon, username: str):
    requests.delete(f"{daemon.base}/user/{username}", headers={"Authorization": daemon.token})


# ---- cross-site requests ----------------------------------------------------------------------


#: Writes a page on another origin can make a browser send with the victim's cookie: a form
#: posting to a URL that carries the parameters, of any enctype, or a fetch() in no-cors mode.
CROSS_SITE_WRITES = {
    "form from another origin": ({"Origin": "http://evil.example"}, "form"),
    "another port of the same host": ({"Origin": "http://{host}:1"}, "form"),
    "sec-fetch-site cross-site": ({"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"}, "form"),
    "sec-fetch-site same-site": ({"Sec-Fetch-Site": "same-site"}, "form"),
    "sandboxed page (Origin null)": ({"Origin": "null"}, "form"),
    "text/plain form, no Origin (an old browser)": ({"Content-Type": "text/plain"}, "query"),
    "query-string write, no Origin": ({}, "query"),
    "text/plain form from another origin": ({"Content-Type": "text/plain", "Origin": "http://evil.example"}, "query"),
}


@pytest.mark.parametrize("case", sorted(CROSS_SITE_WRITES))
def test_cross_site_cookie_writes_are_refused_same_origin_and_token_writes_work(site, case):
    headers, where = CROSS_SITE_WRITES[case]
    host = f"127.0.0.1:{site.http_port}"
    headers = {name: value.format(host="127.0.0.1") for name, value in headers.items()}
    cookie = {"Cookie": f"dicoogled_session={site.token}"}
    fields = {"username": "eve", "password": "eve-pw-1", "admin": "true"}
    if where == "form":
        response = requests.post(f"{site.base}/user", data=fields, headers={**cookie, **headers})
    else:
        response = requests.post(f"{site.base}/user?" + urllib.parse.urlencode(fields), data=b"x=1",
                                 headers={**cookie, **headers})
    assert response.status_code == 403, response.text
    assert "cross-site" in response.json()["error"]
    assert not user_exists(site, "eve")
    # The web app's own pages (same origin, by Origin or by Sec-Fetch-Site) may write with the cookie.
    for same_origin in ({"Origin": f"http://{host}"}, {"Sec-Fetch-Site": "same-origin", "Origin": f"http://{host}"},
                        {"Sec-Fetch-Site": "same-origin"}):
        response = requests.post(f"{site.base}/user", data=fields, headers={**cookie, **same_origin})
        assert response.json() == {"success": True}, (same_origin, response.text)
        delete_user(site, "eve")
    # Scripts with a token or Basic credentials work unchanged, from anywhere: no browser sends
    # those headers by itself.
    basic = "Basic " + base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
    for authorization, extra in ((site.token, {}), (f"Bearer {site.token}", headers), (basic, {})):
        response = requests.post(f"{site.base}/user", data=fields, headers={"Authorization": authorization, **extra})
        assert response.json() == {"success": True}, (authorization[:6], response.text)
        delete_user(site, "eve")


def test_cross_site_logins_and_logouts_are_refused(site):
    # Login CSRF: a page of another origin logging the browser in as the attacker.
    response = requests.post(f"{site.base}/login", data={"username": "admin", "password": ADMIN_PASSWORD},
                             headers={"Origin": "http://evil.example"})
    assert response.status_code == 403 and "Set-Cookie" not in response.headers
    token = login(site)
    cookie = {"Cookie": f"dicoogled_session={token}"}
    assert requests.post(f"{site.base}/logout", headers={**cookie, "Origin": "http://evil.example"}).status_code == 403
    assert requests.get(f"{site.base}/login", headers=cookie).status_code == 200


def test_get_logout_no_longer_logs_out_a_cookie_session(site):
    token = login(site)
    cookie = {"Cookie": f"dicoogled_session={token}"}
    response = requests.get(f"{site.base}/logout", headers=cookie)  # an <img src=/logout> on any page
    assert response.status_code == 405 and response.headers["Allow"] == "POST"
    assert "error" in response.json()
    assert requests.get(f"{site.base}/login", headers=cookie).status_code == 200
    # POST from the web app's page ends it.
    response = requests.post(f"{site.base}/logout", headers={**cookie, "Origin": f"http://127.0.0.1:{site.http_port}"})
    assert response.json() == {"success": True}
    assert requests.get(f"{site.base}/login", headers=cookie).status_code == 401
    # A token in the header may still log out by GET: dicoogle-client falls back to it (Dicoogle 2).
    token = login(site)
    assert requests.get(f"{site.base}/logout", headers={"Authorization": token}).json() == {"success": True}
    assert requests.get(f"{site.base}/login", headers={"Authorization": token}).status_code == 401


# ---- headers ---------------------------------------------------------------------------------


def check_headers(response, policy: str, cache: str = "no-store"):
    headers = response.headers
    assert headers["X-Content-Type-Options"] == "nosniff", response.url
    assert headers["X-Frame-Options"] == "DENY", response.url
    assert headers["Referrer-Policy"] == "no-referrer", response.url
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], response.url
    assert headers["Content-Security-Policy"].startswith(policy), (response.url, headers["Content-Security-Policy"])
    assert headers["Cache-Control"] == cache, response.url


def test_security_headers_on_every_kind_of_answer(site):
    auth = {"Authorization": site.token}
    ds = site.instance
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    page = requests.get(f"{site.base}/")
    check_headers(page, "default-src 'self'; script-src 'self';", cache="no-cache")
    assert "unsafe-inline" not in page.headers["Content-Security-Policy"]
    check_headers(requests.get(f"{site.base}/static/js/app.js"), "default-src 'self'", cache="no-cache")
    api = "default-src 'none'"
    answers = {
        "API JSON": requests.get(f"{site.base}/search", params={"query": "*:*"}, headers=auth),
        "CSV export": requests.get(f"{site.base}/export", params={"query": "*:*", "fields": "PatientID"}, headers=auth),
        "DICOM file": requests.get(f"{site.base}/legacy/file", params={"uid": sop}, headers=auth),
        "PNG": requests.get(f"{site.base}/dic2png", params={"SOPInstanceUID": sop}, headers=auth),
        "DICOMweb multipart": requests.get(f"{site.base}/dicom-web/studies/{study}/series/{series}/instances/{sop}",
                                           headers={**auth, "Accept": 'multipart/related; type="application/dicom"'}),
        "DICOMweb JSON": requests.get(f"{site.base}/dicom-web/studies", headers=auth),
        "error": requests.get(f"{site.base}/search", params={"query": "*:*"}),
    }
    kinds = {"API JSON": "application/json", "CSV export": "text/csv", "DICOM file": "application/dicom",
             "PNG": "image/png", "DICOMweb multipart": "multipart/related", "DICOMweb JSON": "application/dicom+json",
             "error": "application/json"}
    for kind, response in answers.items():
        assert response.headers["Content-Type"].startswith(kinds[kind]), (kind, response.status_code, response.text[:200])
        check_headers(response, api)
    # The web app's policy allows no inline script: its page must need none.
    for page in (ROOT / "www").rglob("*.html"):
        text = page.read_text()
        assert not re.search(r"<script\b(?![^>]*\bsrc=)", text, re.I), f"inline <script> in {page}"
        assert not re.search(r"\son[a-z]+\s*=", text, re.I), f"inline event handler in {page}"
        assert "javascript:" not in text.lower(), page


# ---- CSV export ------------------------------------------------------------------------------


def test_csv_export_escapes_formulas_and_keeps_quotes(site):
    fields = list(HOSTILE_VALUES) + ["PatientID", "PatientWeight"]
    response = requests.get(f"{site.base}/export", params={"query": "*:*", "fields": fields},
                            headers={"Authorization": site.token})
    assert response.status_code == 200, response.text
    lines = response.text.split("\n")
    assert lines[0] == "".join(f'"{f}";' for f in fields)
    ds = site.instance
    assert lines[1] == ('"\'=1+2";"\'@SUM(A1:A9)";"\'+cmd|"" /C calc""!A0";"\'-2+3";"-95.00";"DOE^""JD""";'
                        f'"{ds.PatientID}";;')
    # A CSV reader (as a spreadsheet's import) reads the quotes back, and the number as it was.
    row = next(csv.reader(io.StringIO(lines[1]), delimiter=";"))
    assert row == ["'=1+2", "'@SUM(A1:A9)", "'+cmd|\" /C calc\"!A0", "'-2+3", "-95.00", 'DOE^"JD"', ds.PatientID, "", ""]


# ---- large bodies, and what anonymous callers can learn ---------------------------------------


def raw_request(site, head: str, body: bytes = b"", timeout=10.0) -> bytes:
    """Send a request's head and the start of its body, then read what the server answers before
    the rest of the body (which is never sent); b"" if it closes without an answer."""
    with socket.create_connection(("127.0.0.1", site.http_port), timeout=timeout) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        answer = b""

        def complete() -> bool:
            head, separator, body = answer.partition(b"\r\n\r\n")
            length = re.search(rb"\r\nContent-Length: (\d+)", head)
            return bool(separator) and len(body) >= (int(length[1]) if length else 0)

        while not complete():
            chunk = sock.recv(65536)  # a timeout here: the server waits for the body
            if not chunk:
                break
            answer += chunk
        return answer


STOW_HEAD = """POST /dicom-web/studies HTTP/1.1
Host: 127.0.0.1
Content-Type: multipart/related; type="application/dicom"; boundary=B
Content-Length: 900000000
"""


def test_a_large_stow_is_read_only_with_good_credentials(site):
    """900 MB announced, a few bytes sent: without good credentials the 401 comes at once."""
    before = site.health()["ingest"]
    bad = ["", "Authorization: not-a-token\n", "Authorization: Basic " + base64.b64encode(b"admin:wrong").decode() + "\n",
           "Cookie: dicoogled_session=forged\n"]
    for credentials in bad:
        answer = raw_request(site, STOW_HEAD + credentials, b"--B\r\nContent-Type: application/dicom\r\n\r\nDICM")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), (credentials, answer[:300])
        assert b"Content-Type: application/json" in head and b"X-Content-Type-Options: nosniff" in head
        assert b"Connection: close" in head
        assert "error" in json.loads(body)
        # A client that waits for "100 Continue" gets the 401 instead, and never sends the body.
        answer = raw_request(site, STOW_HEAD + credentials + "Expect: 100-continue\n")
        assert answer.startswith(b"HTTP/1.1 401 "), (credentials, answer[:300])
    assert site.health()["ingest"] == before
    basic = base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
    for credentials in (f"Authorization: {site.token}\n", f"Authorization: Basic {basic}\n",
                        f"Cookie: dicoogled_session={site.token}\n"):
        answer = raw_request(site, STOW_HEAD + credentials + "Expect: 100-continue\n")
        assert answer.startswith(b"HTTP/1.1 100 Continue"), (credentials, answer[:300])


def test_options_on_ext_tells_anonymous_callers_nothing(site):
    """An anonymous OPTIONS answers the same for a plugin that exists and one that does not."""
    answers = {}
    for path in ("/ext/stats/", "/ext/no-such-plugin/", "/ext/dicomweb/studies", "/ext/no-such-plugin/studies"):
        response = requests.options(f"{site.base}{path}", headers={"Origin": "http://evil.example",
                                                                  "Access-Control-Request-Method": "GET"})
        answers[path] = (response.status_code, response.text, response.headers.get("Allow"))
    assert len(set(answers.values())) == 1, answers
    assert answers["/ext/stats/"][0] == 401
    # Logged in, OPTIONS reaches the plugin; DICOMweb's own path answers CORS preflights anonymously.
    assert requests.options(f"{site.base}/ext/no-such-plugin/", headers={"Authorization": site.token}).status_code == 404
    assert requests.options(f"{site.base}/dicom-web/studies", headers={"Origin": "http://evil.example"}).status_code == 204
