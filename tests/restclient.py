"""A small HTTP client for the REST tests: urllib only, never raises on an HTTP status.

    client = Client(f"http://127.0.0.1:{daemon.http_port}")
    client.login("admin", "secret")            # later requests send the token, raw, as Dicoogle's client does
    response = client.get("/search", query="*:*", field=["SOPInstanceUID"])
    response.status, response.json(), response.headers["Content-Type"]
"""

import http.client
import io
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pydicom

#: The admin password every REST test starts its daemon with.
ADMIN_PASSWORD = "admin-secret-1"
ADMIN_ENV = {"DICOOGLED_ADMIN_PASSWORD": ADMIN_PASSWORD}


class Response:
    def __init__(self, status: int, headers, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.body[:300]!r}>"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class _FromAddress(urllib.request.HTTPHandler):
    """Connects from a given local address: another loopback address (127.0.0.2) is another
    client to the daemon, as a second machine would be."""

    def __init__(self, source_address: str):
        super().__init__()
        self.source_address = source_address

    def http_open(self, request):
        return self.do_open(http.client.HTTPConnection, request, source_address=(self.source_address, 0))


_opener = urllib.request.build_opener(_NoRedirect)


class Client:
    """Requests to one daemon, authenticated with a token once logged in; source_address
    (e.g. "127.0.0.2") makes the requests come from that local address."""

    def __init__(self, base: str, token: str | None = None, source_address: str | None = None):
        self.base, self.token, self.source_address = base.rstrip("/"), token, source_address
        self._opener = urllib.request.build_opener(_NoRedirect, _FromAddress(source_address)) if source_address else _opener

    def request(self, method: str, path: str, params=None, data=None, headers=None, auth="token",
                raw_query: str | None = None, timeout: float = 60) -> Response:
        """params: dict or list of pairs, lists repeat the key; data: dict (form) or bytes.
        auth: "token" (raw Authorization header), None, or a header value to send as is."""
        url = self.base + path
        query = raw_query if raw_query is not None else urllib.parse.urlencode(params or {}, doseq=True)
        if query:
            url += "?" + query
        all_headers = dict(headers or {})
        if isinstance(data, (dict, list)):
            data = urllib.parse.urlencode(data, doseq=True).encode()
            all_headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        if auth == "token" and self.token:
            all_headers.setdefault("Authorization", self.token)
        elif auth not in ("token", None):
            all_headers.setdefault("Authorization", auth)
        if method in ("POST", "PUT") and data is None:
            data = b""
        request = urllib.request.Request(url, data=data, method=method, headers=all_headers)
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return Response(response.status, response.headers, response.read())
        except urllib.error.HTTPError as error:
            return Response(error.code, error.headers, error.read())

    def get(self, path, **params):
        return self.request("GET", path, params)

    def post(self, path, data=None, **params):
        return self.request("POST", path, params, data=data)

    def delete(self, path, **params):
        return self.request("DELETE", path, params)

    def login(self, username: str, password: str) -> dict:
        response = self.request("POST", "/login", data={"username": username, "password": password}, auth=None)
        assert response.status == 200, response
        body = response.json()
        self.token = body["token"]
        return body

    def as_user(self, token: str | None) -> "Client":
        return Client(self.base, token, self.source_address)


def base_url(daemon) -> str:
    return f"http://127.0.0.1:{daemon.http_port}"


def admin_client(daemon) -> Client:
    client = Client(base_url(daemon))
    client.login("admin", ADMIN_PASSWORD)
    return client


def stow(daemon, token, *datasets) -> Response:
    """POST /dicom-web/studies (STOW-RS) with the data sets as Part 10 parts of one multipart/related body."""
    boundary = uuid.uuid4().hex
    body = b""
    for dataset in datasets:
        part = io.BytesIO()
        pydicom.dcmwrite(part, dataset, enforce_file_format=True)
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part.getvalue() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return Client(base_url(daemon), token).request("POST", "/dicom-web/studies", data=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json"})
