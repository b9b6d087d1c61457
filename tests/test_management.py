"""The management REST API: Dicoogle's /management/settings and /management/dicom routes,
/logger and /openapi.json, against the real daemon over HTTP.

Every change is checked for its shape (Dicoogle 3.5's, oddities included), for its effect at once
(a new move destination receives a C-MOVE, a new AE title answers a strict C-ECHO, ...), for its
validation (400 with a JSON reason) and for surviving a restart (data_dir/settings.ini).
"""

import json
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
import wsgiref.util

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage, MRImageStorage, StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove, Verification,
)

import dicoogled
import studygen
from conftest import StoreSCP, free_port, make_identifier, rejection_of, wait_until

ADMIN_PASSWORD = "management-secret-1"
ADMIN_ENV = {"DICOOGLED_ADMIN_PASSWORD": ADMIN_PASSWORD}
USER, USER_PASSWORD = "reader", "reader-secret-1"
MOVE_DESTINATION_UNKNOWN = 0xA801


# ---- a small HTTP client ------------------------------------------------------------------------


class Response:
    def __init__(self, status, headers, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.body[:300]!r}>"


class Client:
    """HTTP requests to one daemon, sending a login token raw in Authorization (as dicoogle-client does)."""

    def __init__(self, daemon, token=None):
        self.base, self.token = f"http://127.0.0.1:{daemon.http_port}", token

    def request(self, method, path, /, **params) -> Response:
        query = urllib.parse.urlencode(params, doseq=True)
        request = urllib.request.Request(self.base + path + ("?" + query if query else ""), method=method)
        if self.token:
            request.add_header("Authorization", self.token)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return Response(response.status, response.headers, response.read())
        except urllib.error.HTTPError as error:
            return Response(error.code, error.headers, error.read())

    def get(self, path, /, **params):
        return self.request("GET", path, **params)

    def post(self, path, /, **params):
        return self.request("POST", path, **params)

    def put(self, path, /, **params):
        return self.request("PUT", path, **params)

    def login(self, username, password):
        response = self.post("/login", username=username, password=password)
        assert response.status == 200, response
        self.token = response.json()["token"]
        return self


def admin_of(daemon) -> Client:
    return Client(daemon).login("admin", ADMIN_PASSWORD)


def assert_bad_request(response, *words):
    """400, a JSON {"error": reason}, and the reason names what was wrong."""
    assert response.status == 400, response
    assert response.content_type.startswith("application/json"), response.content_type
    error = response.json()["error"]
    for word in words:
        assert word in error, (word, error)


@pytest.fixture
def archive(start_daemon):
    return start_daemon(env=ADMIN_ENV)


@pytest.fixture
def admin(archive):
    return admin_of(archive)


def settings_file(daemon) -> dict:
    """The settings saved at run time as {section: {key: value}}: data_dir/settings.ini, or with
    a PostgreSQL index the rows of its schema dicoogled_settings, which stand in for the file."""
    if daemon.index_url:
        saved = {}
        for section, key, value in daemon.state_sql("settings", "SELECT section, key, value FROM settings"):
            entries = saved.setdefault(section, {})
            if key:  # the key "" only says that the section is set, perhaps empty
                entries[key] = value
        return saved
    parser = dicoogled.configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read(daemon.data_dir / "settings.ini")
    return {section: dict(parser[section]) for section in parser.sections()}


# ---- DICOM helpers ------------------------------------------------------------------------------


def associate(daemon, contexts, aet="DICOOGLED", port=None, **kwargs):
    ae = AE(ae_title="TESTSCU")
    return ae.associate("127.0.0.1", port or daemon.dicom_port, contexts=contexts, ae_title=aet, **kwargs)


def echo(daemon, aet="DICOOGLED", port=None):
    """The C-ECHO status, or None when the association is refused or cannot be made."""
    assoc = associate(daemon, [build_context(Verification)], aet=aet, port=port)
    if not assoc.is_established:
        return None
    try:
        return assoc.send_c_echo().Status
    finally:
        assoc.release()


def listening(port) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture
def storescp(tmp_path):
    if shutil.which("storescp") is None:
        pytest.skip("DCMTK's storescp is not installed")
    scp = StoreSCP(tmp_path / "received", "STORESCP")
    yield scp
    scp.stop()


def move(daemon, study_uid, destination) -> int:
    """C-MOVE a study; returns the final status."""
    assoc = associate(daemon, [build_context(StudyRootQueryRetrieveInformationModelMove)])
    assert assoc.is_established
    try:
        identifier = make_identifier("STUDY", StudyInstanceUID=study_uid)
        statuses = [s.Status for s, _ in assoc.send_c_move(identifier, destination, StudyRootQueryRetrieveInformationModelMove)]
    finally:
        assoc.release()
    return statuses[-1]


# ---- index settings -----------------------------------------------------------------------------


def test_index_settings_shape_change_live_and_persist(archive, admin, tmp_path, studies):
    assert admin.get("/management/settings/index").json() == {
        "path": "", "zip": False, "effort": "100", "thumbnail": False, "thumbnailSize": "64", "watcher": True}
    inbox, second = tmp_path / "inbox", tmp_path / "second"
    inbox.mkdir()
    second.mkdir()
    response = admin.post("/management/settings/index", path=f"{inbox}:{second}", watcher="true",
                          saveThumbnail="true", effort="50", thumbnailSize="128")
    assert (response.status, response.body) == (200, b"")
    expected = {"path": f"{inbox}:{second}", "zip": False, "effort": "50", "thumbnail": True,
                "thumbnailSize": "128", "watcher": True}
    assert admin.get("/management/settings/index").json() == expected
    # One setting at a time: bare text, labelled JSON (Dicoogle's way).
    for field, text in [("path", f"{inbox}:{second}"), ("zip", "false"), ("effort", "50"), ("thumbnail", "true"),
                        ("watcher", "true"), ("thumbnail/size", "128")]:
        response = admin.get(f"/management/settings/index/{field}")
        assert (response.status, response.text, response.content_type) == (200, text, "application/json"), field
    # Live: the new folders are watched at once.
    assert archive.health()["watch"]["folders"] == [str(inbox), str(second)]
    shutil.copy(studies(patients=1, studies=1, series=1, instances=1)[0], inbox / "one.dcm")
    wait_until(lambda: archive.counts()["instances"] == 1, message="the file in the new watched folder to be indexed")
    # Persisted: a restart keeps every value.
    archive.restart()
    admin = admin_of(archive)
    assert admin.get("/management/settings/index").json() == expected
    assert archive.health()["watch"]["folders"] == [str(inbox), str(second)]
    assert settings_file(archive)["index"] == {"thumbnails": "true", "thumbnail_size": "128", "effort": "50"}


def test_index_settings_one_field_at_a_time(archive, admin, tmp_path):
    assert admin.post("/management/settings/index/effort", effort="7").status == 200
    assert admin.post("/management/settings/index/thumbnail", thumbnail="true").status == 200
    assert admin.post("/management/settings/index/thumbnail/size", thumbnailSize="32").status == 200
    assert admin.post("/management/settings/index/path", path=str(tmp_path)).status == 200
    assert admin.post("/management/settings/index/watcher", watcher="false").status == 200
    assert admin.post("/management/settings/index/zip", zip="true").text == "indexZipFiles is no longer supported"
    assert admin.get("/management/settings/index").json() == {
        "path": str(tmp_path), "zip": False, "effort": "7", "thumbnail": True, "thumbnailSize": "32", "watcher": False}
    # The watcher switched off stops watching, and keeps the folder for when it is switched on.
    assert archive.health()["watch"]["folders"] == []
    assert admin.post("/management/settings/index", watcher="true").status == 200
    assert archive.health()["watch"]["folders"] == [str(tmp_path)]
    assert admin.post("/management/settings/index/path", path="").status == 400


@pytest.mark.parametrize("params, words", [
    ({"effort": "101"}, ["effort", "101"]),
    ({"effort": "-1"}, ["effort"]),
    ({"thumbnailSize": "0"}, ["thumbnailSize"]),
    ({"thumbnailSize": "big"}, ["thumbnailSize", "big"]),
    ({"watcher": "maybe"}, ["watcher", "maybe"]),
    ({"saveThumbnail": "yes"}, ["saveThumbnail"]),
    ({"path": "/no/such/folder"}, ["/no/such/folder", "folder"]),
    ({"path": "relative/folder"}, ["relative/folder"]),
])
def test_index_settings_validation(archive, admin, params, words):
    before = admin.get("/management/settings/index").json()
    assert_bad_request(admin.post("/management/settings/index", **params), *words)
    assert admin.get("/management/settings/index").json() == before
    assert settings_file(archive) == {} and not (archive.data_dir / "settings.ini").exists()


# ---- transfer syntaxes per SOP class ------------------------------------------------------------


def test_transfer_settings_shape(admin):
    classes = admin.get("/management/settings/transfer").json()
    ct = next(c for c in classes if c["uid"] == CTImageStorage)
    assert ct["sop_name"] == "CT Image Storage"
    assert [o["name"] for o in ct["options"]] == list(dicoogled.TRANSFER_SYNTAX_NAMES.values())
    assert ct["options"][0] == {"uid": "1.2.840.10008.1.2", "name": "ImplicitVRLittleEndian", "value": True}
    assert all(option["value"] for c in classes for option in c["options"])  # nothing limited yet
    assert len(classes) == len({c["uid"] for c in classes}) >= 100


def store_with(daemon, sop_class, syntaxes, dataset):
    """Propose sop_class in syntaxes; returns (accepted transfer syntax, C-STORE status), or
    (None, None) when the only context is refused at negotiation."""
    assoc = associate(daemon, [build_context(sop_class, syntaxes)])
    if not assoc.is_established:
        return None, None
    try:
        accepted = assoc.accepted_contexts[0].transfer_syntax[0]
        return accepted, assoc.send_c_store(dataset).Status
    finally:
        assoc.release()


def test_transfer_syntax_limits_take_effect_and_persist(archive, admin):
    ct = studygen.make_instance(0, 0, 0, 0, size=16)
    ct2 = studygen.make_instance(0, 0, 0, 1, size=16)
    mr = studygen.make_instance(1, 0, 0, 0, size=16, modality="MR")
    response = admin.post("/management/settings/transfer", uid=CTImageStorage, option="ImplicitVRLittleEndian", value="false")
    assert (response.status, response.json()) == (200, {"success": True})
    ct_options = next(c for c in admin.get("/management/settings/transfer").json() if c["uid"] == CTImageStorage)["options"]
    assert [o["name"] for o in ct_options if not o["value"]] == ["ImplicitVRLittleEndian"]
    # Negotiation leaves the refused syntax out: CT proposed in both is accepted in explicit VR.
    assert store_with(archive, CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian], ct) == (ExplicitVRLittleEndian, 0)
    # Proposed in implicit VR only, the context is refused at negotiation.
    assert store_with(archive, CTImageStorage, [ImplicitVRLittleEndian], ct2) == (None, None)
    # Other SOP classes are untouched.
    assert store_with(archive, MRImageStorage, [ImplicitVRLittleEndian], mr) == (ImplicitVRLittleEndian, 0)
    assert archive.counts()["instances"] == 2
    # A UID names an option too; the limit survives a restart.
    assert admin.put("/management/settings/transfer", uid=CTImageStorage, option="1.2.840.10008.1.2.4.50", value="false").status == 200
    archive.restart()
    admin = admin_of(archive)
    ct_options = next(c for c in admin.get("/management/settings/transfer").json() if c["uid"] == CTImageStorage)["options"]
    assert [o["name"] for o in ct_options if not o["value"]] == ["ImplicitVRLittleEndian", "JPEGBaseline1"]
    assert store_with(archive, CTImageStorage, [ImplicitVRLittleEndian], ct2) == (None, None)
    # Every option back on: no limit at all.
    for option in ("ImplicitVRLittleEndian", "JPEGBaseline1"):
        assert admin.post("/management/settings/transfer", uid=CTImageStorage, option=option, value="true").status == 200
    assert settings_file(archive)["transfer_syntaxes"] == {}
    assert store_with(archive, CTImageStorage, [ImplicitVRLittleEndian], ct2) == (ImplicitVRLittleEndian, 0)


def test_transfer_syntax_of_a_private_sop_class(archive, admin):
    private_class = "1.3.6.1.4.1.9590.100.1.2.999"
    assert admin.post("/management/settings/transfer", uid=private_class, option="RLELossless", value="false").status == 200
    listed = next(c for c in admin.get("/management/settings/transfer").json() if c["uid"] == private_class)
    assert [o["name"] for o in listed["options"] if not o["value"]] == ["RLELossless"]
    assert settings_file(archive)["transfer_syntaxes"] == {
        private_class: " ".join(uid for uid in dicoogled.TRANSFER_SYNTAX_NAMES if uid != "1.2.840.10008.1.2.5")}


@pytest.mark.parametrize("params, words", [
    ({"uid": "1.2.840.10008.5.1.4.1.1.2x", "option": "JPEGLossless", "value": "false"}, ["uid", "1.2.840.10008.5.1.4.1.1.2x"]),
    ({"uid": "", "option": "JPEGLossless", "value": "false"}, ["uid"]),
    ({"uid": CTImageStorage, "option": "JPEGMagic", "value": "false"}, ["JPEGMagic", "ExplicitVRLittleEndian"]),
    ({"uid": CTImageStorage, "option": "JPEGLossless", "value": "perhaps"}, ["value", "perhaps"]),
    ({"uid": CTImageStorage, "option": "JPEGLossless"}, ["value"]),
    ({"option": "JPEGLossless", "value": "true"}, ["uid"]),
])
def test_transfer_settings_validation(archive, admin, params, words):
    assert_bad_request(admin.post("/management/settings/transfer", **params), *words)
    assert all(o["value"] for c in admin.get("/management/settings/transfer").json() for o in c["options"])


# ---- Q/R limits ---------------------------------------------------------------------------------


DEFAULT_QUERY_SETTINGS = {"acceptTimeout": 30, "connectionTimeout": 30, "idleTimeout": 120, "maxAssociations": 16,
                          "maxPduReceive": 262144, "maxPduSend": 0, "responseTimeout": 60}


def test_query_settings_shape_change_live_and_persist(archive, admin):
    assert admin.get("/management/settings/dicom/query").json() == DEFAULT_QUERY_SETTINGS
    response = admin.post("/management/settings/dicom/query", maxAssociations="1", acceptTimeout="10", idleTimeout="90")
    assert (response.status, response.body) == (200, b"")
    changed = {**DEFAULT_QUERY_SETTINGS, "maxAssociations": 1, "acceptTimeout": 10, "idleTimeout": 90}
    assert admin.get("/management/settings/dicom/query").json() == changed
    # Live: with one association open, a second one is rejected.
    first = associate(archive, [build_context(Verification)])
    assert first.is_established
    try:
        second = associate(archive, [build_context(Verification)])
        assert rejection_of(second)
    finally:
        first.release()
    archive.restart()
    assert admin_of(archive).get("/management/settings/dicom/query").json() == changed
    assert settings_file(archive)["dicom"] == {"max_associations": "1", "acse_timeout": "10", "network_timeout": "90"}


def test_max_pdu_send_limits_what_the_archive_sends(archive, admin):
    dataset = studygen.make_instance(0, 0, 0, 0, size=128)  # 32 KiB of pixels
    assert archive.store(dataset) == [0]

    def largest_pdu_received() -> int:
        sizes = []
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(dataset.SOPClassUID, ExplicitVRLittleEndian)
        handlers = [(evt.EVT_C_STORE, lambda event: 0x0000),
                    (evt.EVT_PDU_RECV, lambda event: sizes.append(len(event.pdu.encode())))]
        assoc = ae.associate("127.0.0.1", archive.dicom_port, ae_title="DICOOGLED", max_pdu=0,  # unlimited
                             ext_neg=[build_role(dataset.SOPClassUID, scp_role=True)], evt_handlers=handlers)
        assert assoc.is_established
        try:
            identifier = make_identifier("STUDY", StudyInstanceUID=dataset.StudyInstanceUID)
            statuses = [s.Status for s, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)]
            assert statuses[-1] == 0
        finally:
            assoc.release()
        return max(sizes)

    assert largest_pdu_received() > 32768  # as we accept any length: the whole object in one PDU
    assert admin.post("/management/settings/dicom/query", maxPduSend="4096").status == 200
    assert largest_pdu_received() <= 4096 + 6  # a P-DATA-TF: 6 header bytes, then at most maxPduSend


@pytest.mark.parametrize("params, words", [
    ({"maxAssociations": "0"}, ["max_associations", "0"]),
    ({"maxPduReceive": "100"}, ["max_pdu", "100"]),
    ({"maxPduSend": "1000"}, ["max_pdu_send", "1000"]),
    ({"acceptTimeout": "0"}, ["acse_timeout"]),
    ({"idleTimeout": "soon"}, ["idleTimeout", "soon"]),
    ({"responseTimeout": "-5"}, ["responseTimeout"]),
])
def test_query_settings_validation(archive, admin, params, words):
    assert_bad_request(admin.post("/management/settings/dicom/query", **params), *words)
    assert admin.get("/management/settings/dicom/query").json() == DEFAULT_QUERY_SETTINGS


# ---- AE title -----------------------------------------------------------------------------------


def test_ae_title_change_live_and_persist(start_daemon):
    archive = start_daemon(config_text="[dicom]\nstrict_called_aet = true\n", env=ADMIN_ENV)
    admin = admin_of(archive)
    assert admin.get("/management/settings/dicom").json() == {"aetitle": "DICOOGLED"}
    assert echo(archive, aet="NEWAET") is None  # strict: the wrong called AE title is rejected
    response = admin.put("/management/settings/dicom", aetitle="NEWAET")
    assert (response.status, response.json()) == (200, {"success": True})
    assert admin.get("/management/settings/dicom").json() == {"aetitle": "NEWAET"}
    assert archive.health()["aet"] == "NEWAET"
    assert echo(archive, aet="NEWAET") == 0
    assert echo(archive, aet="DICOOGLED") is None
    archive.restart()
    assert admin_of(archive).get("/management/settings/dicom").json() == {"aetitle": "NEWAET"}
    assert echo(archive, aet="NEWAET") == 0
    assert echo(archive, aet="DICOOGLED") is None


@pytest.mark.parametrize("aetitle", ["", "   ", "A_TITLE_TOO_LONG_X", "BACK\\SLASH", "CAFÉ"])
def test_ae_title_validation(archive, admin, aetitle):
    assert_bad_request(admin.put("/management/settings/dicom", aetitle=aetitle), "AE title")
    assert admin.get("/management/settings/dicom").json() == {"aetitle": "DICOOGLED"}
    assert echo(archive) == 0


def test_dicom_tags(archive, admin):
    assert archive.store(studygen.make_instance(0, 0, 0, 0, size=8)) == [0]
    dim = admin.get("/management/settings/dicom/tags", type="dim").json()
    assert {"id": "00100010", "alias": "PatientName", "vr": "PN"} in dim["tags"]
    assert len(dim["tags"]) == sum(len(keys) for keys in dicoogled.LEVEL_ATTRIBUTES.values())
    assert dim["modalities"] == ["CT"]
    everything = admin.get("/management/settings/dicom/tags").json()["tags"]
    other = admin.get("/management/settings/dicom/tags", type="other").json()["tags"]
    assert {"id": "00180050", "alias": "SliceThickness", "vr": "DS"} in other
    assert {"id": "00100010", "alias": "PatientName", "vr": "PN"} not in other
    assert len(everything) == len(other) + len(dim["tags"])
    assert admin.get("/management/settings/dicom/tags", type="private").json() == {"tags": [], "modalities": ["CT"]}
    assert_bad_request(admin.get("/management/settings/dicom/tags", type="some"), "Invalid tag value type")


# ---- move destinations --------------------------------------------------------------------------


def test_move_destinations_add_use_remove_and_persist(archive, admin, storescp):
    assert admin.get("/management/settings/storage/dicom").json() == []
    instances = [studygen.make_instance(0, 0, 0, i, size=8) for i in range(2)]
    assert archive.store(*instances) == [0, 0]
    study_uid = str(instances[0].StudyInstanceUID)
    assert move(archive, study_uid, "STORESCP") == MOVE_DESTINATION_UNKNOWN
    response = admin.post("/management/settings/storage/dicom", type="add", aetitle="STORESCP", ip="127.0.0.1",
                          port=str(storescp.port), description="test receiver", public="true")
    assert (response.status, response.json()) == (200, {"added": True})
    listed = [{"AETitle": "STORESCP", "ipAddrs": "127.0.0.1", "port": storescp.port, "description": "test receiver",
               "isPublic": True, "public": True, "tls": False}]
    assert admin.get("/management/settings/storage/dicom").json() == listed
    # Live: C-MOVE reaches it at once.
    assert move(archive, study_uid, "STORESCP") == 0
    assert storescp.received() == {str(ds.SOPInstanceUID) for ds in instances}
    # Persisted, with Dicoogle's extras.
    archive.restart()
    admin = admin_of(archive)
    assert admin.get("/management/settings/storage/dicom").json() == listed
    assert settings_file(archive)["modalities"] == {"STORESCP": f"127.0.0.1:{storescp.port} public test receiver"}
    # Removal: dicoogle-client's removeRemoteServer("STORESCP") sends no port.
    assert admin.post("/management/settings/storage/dicom", type="remove", aetitle="STORESCP").json() == {"removed": True}
    assert admin.post("/management/settings/storage/dicom", type="remove", aetitle="STORESCP").json() == {"removed": False}
    assert admin.get("/management/settings/storage/dicom").json() == []
    assert move(archive, study_uid, "STORESCP") == MOVE_DESTINATION_UNKNOWN
    archive.restart()
    assert admin_of(archive).get("/management/settings/storage/dicom").json() == []


def test_move_destination_replaces_one_from_the_config_file(start_daemon):
    archive = start_daemon(config_text="[modalities]\nOLD = 10.0.0.1:104\nKEPT = 10.0.0.2:104\n", env=ADMIN_ENV)
    admin = admin_of(archive)
    assert admin.post("/management/settings/storage/dicom", type="remove", aetitle="OLD", port="104").json() == {"removed": True}
    assert admin.post("/management/settings/storage/dicom", type="add", aetitle="NEW", ip="::1", port="11112").json() == {"added": True}
    archive.restart()
    # settings.ini's [modalities] replaces the file's whole: OLD stays removed.
    assert admin_of(archive).get("/management/settings/storage/dicom").json() == [
        {"AETitle": "KEPT", "ipAddrs": "10.0.0.2", "port": 104, "description": "", "isPublic": False, "public": False, "tls": False},
        {"AETitle": "NEW", "ipAddrs": "::1", "port": 11112, "description": "", "isPublic": False, "public": False, "tls": False},
    ]


def test_every_move_destination_of_the_config_file_removed_stays_removed(start_daemon):
    """An emptied [modalities] still replaces the config file's whole after a restart (settings.ini
    keeps the empty section; PostgreSQL's settings a row saying the section is set)."""
    archive = start_daemon(config_text="[modalities]\nOLD = 10.0.0.1:104\n", env=ADMIN_ENV)
    admin = admin_of(archive)
    assert admin.post("/management/settings/storage/dicom", type="remove", aetitle="OLD", port="104").json() == {"removed": True}
    assert settings_file(archive)["modalities"] == {}
    archive.restart()
    assert admin_of(archive).get("/management/settings/storage/dicom").json() == []


@pytest.mark.parametrize("params, words", [
    ({"type": "add", "aetitle": "X", "ip": "127.0.0.1", "port": "70000"}, ["Illegal port parameter"]),
    ({"type": "add", "aetitle": "X", "ip": "127.0.0.1", "port": "0"}, ["Illegal port parameter"]),
    ({"type": "add", "aetitle": "X", "ip": "127.0.0.1", "port": "http"}, ["Illegal port parameter"]),
    ({"type": "add", "aetitle": "X", "ip": "127.0.0.1"}, ["Illegal port parameter"]),
    ({"type": "add", "aetitle": "A_TITLE_TOO_LONG_X", "ip": "127.0.0.1", "port": "104"}, ["AE title", "A_TITLE_TOO_LONG_X"]),
    ({"type": "add", "aetitle": "", "ip": "127.0.0.1", "port": "104"}, ["AE title"]),
    ({"type": "add", "aetitle": "X", "ip": "no such host", "port": "104"}, ["ip", "no such host"]),
    ({"type": "add", "aetitle": "X", "ip": "", "port": "104"}, ["ip"]),
    ({"type": "add", "aetitle": "X", "ip": "127.0.0.1", "port": "104", "public": "sure"}, ["public", "sure"]),
    ({"type": "rename", "aetitle": "X", "ip": "127.0.0.1", "port": "104"}, ["Illegal type parameter"]),
    ({"aetitle": "X", "ip": "127.0.0.1", "port": "104"}, ["Illegal type parameter"]),
])
def test_move_destination_validation(archive, admin, params, words):
    assert_bad_request(admin.post("/management/settings/storage/dicom", **params), *words)
    assert admin.get("/management/settings/storage/dicom").json() == []


def test_echo_a_move_destination(archive, admin, storescp):
    """POST /management/dicom/echo: a C-ECHO to a [modalities] AE, answered quickly either way."""
    assert_bad_request(admin.post("/management/dicom/echo", aetitle="STORESCP"), "unknown move destination")
    admin.post("/management/settings/storage/dicom", type="add", aetitle="STORESCP", ip="127.0.0.1", port=str(storescp.port))
    assert admin.post("/management/dicom/echo", aetitle="STORESCP").json() == {"success": True}
    admin.post("/management/settings/storage/dicom", type="add", aetitle="NOBODY", ip="127.0.0.1", port=str(free_port()))
    answer = admin.post("/management/dicom/echo", aetitle="NOBODY").json()
    assert answer["success"] is False and "did not answer" in answer["error"], answer


# ---- the DICOM listener: start, stop, move ------------------------------------------------------


def test_services_shape(archive, admin):
    expected = {"isRunning": True, "port": archive.dicom_port, "autostart": True, "hostname": "127.0.0.1"}
    assert admin.get("/management/dicom/storage").json() == expected
    assert admin.get("/management/dicom/query").json() == expected  # one listener serves both


def test_stop_and_start_the_listener_repeatedly(archive, admin):
    for path in ("/management/dicom/storage", "/management/dicom/query", "/management/dicom/storage"):
        response = admin.post(path, running="false")
        assert (response.status, response.json()) == (200, {"success": True, "running": False})
        assert not listening(archive.dicom_port)
        assert admin.get(path).json()["isRunning"] is False
        assert archive.health()["status"] == "ok"  # HTTP goes on
        response = admin.post(path, running="true")
        assert (response.status, response.json()) == (200, {"success": True, "running": True})
        assert admin.get(path).json()["isRunning"] is True
        assert echo(archive) == 0
    response = admin.post("/management/dicom/storage", running="true")
    assert response.json() == {"success": True, "running": True, "warning": "Service was already running"}
    assert archive.store(studygen.make_instance(0, 0, 0, 0, size=8)) == [0]


def test_move_the_listener_to_another_port(archive, admin):
    new_port = free_port()
    response = admin.post("/management/dicom/storage", port=str(new_port))
    assert (response.status, response.json()) == (200, {"success": True, "port": new_port})
    assert echo(archive, port=new_port) == 0
    assert not listening(archive.dicom_port)
    assert admin.get("/management/dicom/query").json()["port"] == new_port
    assert settings_file(archive)["dicom"] == {"port": str(new_port)}
    # A port in use: 500 with the reason, and the listener stays where it was.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        response = admin.post("/management/dicom/storage", port=str(taken))
        assert response.status == 500
        assert response.json()["success"] is False and "in use" in response.json()["error"]
    assert echo(archive, port=new_port) == 0
    assert admin.get("/management/dicom/storage").json()["port"] == new_port
    # The command line beats settings.ini: after a restart the --dicom-port flag wins.
    archive.restart()
    assert admin_of(archive).get("/management/dicom/storage").json()["port"] == archive.dicom_port
    assert echo(archive) == 0


def test_autostart_off_keeps_the_listener_closed_after_a_restart(archive, admin):
    response = admin.post("/management/dicom/query", autostart="false")
    assert response.json() == {"success": True, "autostart": False}
    assert echo(archive) == 0  # still running now
    archive.restart()
    admin = admin_of(archive)
    assert admin.get("/management/dicom/storage").json() == {
        "isRunning": False, "port": archive.dicom_port, "autostart": False, "hostname": "127.0.0.1"}
    assert not listening(archive.dicom_port)
    assert admin.post("/management/dicom/storage", running="true").json() == {"success": True, "running": True}
    assert echo(archive) == 0


@pytest.mark.parametrize("params, words", [
    ({"port": "0"}, ["Bad service port"]),
    ({"port": "65536"}, ["Bad service port"]),
    ({"port": "eleven"}, ["Bad service port"]),
    ({"running": "maybe"}, ["running", "maybe"]),
    ({"autostart": "1"}, ["autostart"]),
    ({"hostname": "no such host.invalid"}, ["hostname", "no such host.invalid"]),
])
def test_services_validation(archive, admin, params, words):
    assert_bad_request(admin.post("/management/dicom/storage", **params), *words)
    assert admin.get("/management/dicom/storage").json()["isRunning"] is True
    assert echo(archive) == 0


# ---- log, plugins --------------------------------------------------------------------------------


def test_logger_returns_the_tail_of_the_log(start_daemon):
    archive = start_daemon(config_text="[log]\nlevel = DEBUG\n", env=ADMIN_ENV)
    admin = admin_of(archive)
    response = admin.get("/logger")
    assert response.status == 200 and response.content_type.startswith("text/plain")
    assert "HTTP listening on 127.0.0.1" in response.text
    for _ in range(2100):  # each request logs a DEBUG line
        urllib.request.urlopen(f"http://127.0.0.1:{archive.http_port}/health").read()
    lines = admin.get("/logger").text.splitlines()
    assert len(lines) == 2000
    assert "HTTP listening on 127.0.0.1" not in "\n".join(lines)  # long gone from the tail
    assert "HTTP listening on 127.0.0.1" in archive.log  # but in the whole log


def test_plugins_list_the_builtin_providers(admin):
    listing = admin.get("/plugins").json()
    assert {"plugins", "sets", "dead"} <= set(listing)
    query = [p for p in listing["plugins"] if p["name"] == "index" and p["type"] == "query"]
    storage = [p for p in listing["plugins"] if p["type"] == "storage"]
    assert query and {"name": "index", "type": "query", "enabled": True, "dim": True}.items() <= query[0].items()
    assert storage and {"enabled": True, "scheme": "file", "default": True}.items() <= storage[0].items()
    assert {p["type"] for p in admin.get("/plugins/query").json()["plugins"]} == {"query"}


# ---- access control and the API description -----------------------------------------------------


def management_routes(admin) -> list[tuple[str, str]]:
    paths = admin.get("/openapi.json").json()["paths"]
    return [(method.upper(), path) for path, operations in paths.items() for method in operations
            if path.startswith(("/management/settings", "/management/dicom")) or path == "/logger"]


def test_management_routes_need_an_administrator(archive, admin):
    assert admin.post("/user", username=USER, password=USER_PASSWORD, admin="false").json() == {"success": True}
    user, anonymous = Client(archive).login(USER, USER_PASSWORD), Client(archive)
    routes = management_routes(admin)
    assert len(routes) == 30
    for method, path in routes:
        for client, status in ((anonymous, 401), (user, 403)):
            response = client.request(method, path, aetitle="HACKED", running="false", type="add", ip="1.2.3.4",
                                      port="104", uid=CTImageStorage, option="JPEGLossless", value="false")
            assert response.status == status, (method, path, response)
            assert "error" in response.json()
    # Nothing changed.
    assert admin.get("/management/settings/dicom").json() == {"aetitle": "DICOOGLED"}
    assert echo(archive) == 0
    assert settings_file(archive) == {} and not (archive.data_dir / "settings.ini").exists()


def served_json(app, path: str):
    """A GET through the WSGI app itself, without a server."""
    environ, status = {}, []
    wsgiref.util.setup_testing_defaults(environ)
    environ["PATH_INFO"] = path
    body = b"".join(app(environ, lambda line, headers, exc_info=None: status.append(line)))
    assert status[0].startswith("200"), (status, body[:300])
    return json.loads(body)


def test_openapi_lists_every_registered_route(archive, tmp_path):
    """The document and the routes Bottle serves are the same set, each with a summary and who
    may call it; parameter lines of the docstrings become parameters."""
    daemon = dicoogled.Daemon(dicoogled.Config.load(data_dir=tmp_path / "in-process"))
    try:
        app = dicoogled.make_app(daemon)
        document = served_json(app, "/openapi.json")
    finally:
        daemon.stop()
    served = {(route.method, dicoogled.re.sub(r"<(\w+)(?::[^>]*)?>", r"{\1}", route.rule)) for route in app.routes}
    documented = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}
    assert documented == served
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation["summary"], (method, path)
            assert operation["x-access"] in ("public", "read", "user", "admin"), (method, path)
            if path.startswith("/management/") or path == "/logger":
                assert operation["x-access"] == "admin", (method, path)
    destinations = document["paths"]["/management/settings/storage/dicom"]["post"]
    assert [p["name"] for p in destinations["parameters"]] == ["type", "aetitle", "ip", "port", "description", "public", "tls"]
    assert document["paths"]["/user/{username}"]["delete"]["parameters"][0] == {
        "name": "username", "in": "path", "required": True, "schema": {"type": "string"}, "description": ""}
    # The running daemon serves it to anyone, and lists the same management routes.
    response = Client(archive).get("/openapi.json")
    assert response.status == 200
    over_http = response.json()["paths"]
    assert {p for p in over_http if p.startswith("/management/")} == {p for p in document["paths"] if p.startswith("/management/")}


# ---- settings.ini: where it sits among the configuration sources ------------------------------


def test_settings_file_sits_between_the_config_file_and_the_flags(start_daemon):
    archive = start_daemon(config_text="[dicom]\naet = FROMFILE\n", env=ADMIN_ENV)
    admin = admin_of(archive)
    assert admin.get("/management/settings/dicom").json() == {"aetitle": "FROMFILE"}
    assert admin.put("/management/settings/dicom", aetitle="FROMAPI").status == 200
    archive.restart()
    assert archive.health()["aet"] == "FROMAPI"  # settings.ini beats the --config file
    archive.args = ["--aet", "FROMFLAG"]
    archive.restart()
    assert archive.health()["aet"] == "FROMFLAG"  # the command line beats settings.ini
    assert settings_file(archive) == {"dicom": {"aet": "FROMAPI"}}


def test_config_load_reads_settings_ini(tmp_path):
    (tmp_path / "settings.ini").write_text(
        "[dicom]\nacse_timeout = 5\n[modalities]\nB = 10.0.0.2:104 public Second one\n"
        "[transfer_syntaxes]\n1.2.840.10008.5.1.4.1.1.2 = 1.2.840.10008.1.2.1\n")
    config_file = tmp_path / "file.ini"
    config_file.write_text("[dicom]\nacse_timeout = 9\ndimse_timeout = 7\n[modalities]\nA = 10.0.0.1:104\n")
    config = dicoogled.Config.load(config_file, data_dir=tmp_path)
    assert (config.acse_timeout, config.dimse_timeout) == (5, 7)
    assert config.modalities == {"B": ("10.0.0.2", 104)}  # the whole section is replaced
    assert config.modality_details == {"B": (True, "Second one")}
    assert config.transfer_syntaxes == {"1.2.840.10008.5.1.4.1.1.2": ["1.2.840.10008.1.2.1"]}
    (tmp_path / "settings.ini").write_text("acse_timeout = 5\n")
    with pytest.raises(ValueError, match="settings.ini"):
        dicoogled.Config.load(config_file, data_dir=tmp_path)
