"""Nothing once acknowledged is ever lost: a battery of hostile and unlucky requests, then a check.

One daemon, with `duplicates = overwrite` (the policy where a bad re-send could replace a good
file), receives a set of instances. Then it is attacked from every side it offers: silent and
garbage DICOM connections, truncated and mismatched re-sends of the same instances over C-STORE
and STOW-RS, hostile HTTP (path traversal, huge UID lists, cross-site and anonymous writes). After
a restart, every instance acknowledged before the attack must still be found by C-FIND and its
stored data set must be byte-identical to what was sent.
"""

import socket
import struct
import sys

import pydicom
from pynetdicom import AE
from restclient import ADMIN_ENV, Client, admin_client, base_url

from conftest import AET, NODELAY, ROOT, make_identifier

sys.path.insert(0, str(ROOT))
import dicoogled  # noqa: E402  (its session cookie's name)

CONFIG = "[storage]\nduplicates = overwrite\n"


def _dataset_bytes(file_bytes: bytes) -> bytes:
    """The bytes of a DICOM file after its preamble and file meta group (as sent over DICOM)."""
    assert file_bytes[128:132] == b"DICM"
    position = 132
    while file_bytes[position:position + 2] == b"\x02\x00":  # group 0002, explicit VR little endian
        vr = file_bytes[position + 4:position + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV"):
            length = struct.unpack("<I", file_bytes[position + 8:position + 12])[0]
            position += 12 + length
        else:
            length = struct.unpack("<H", file_bytes[position + 6:position + 8])[0]
            position += 8 + length
    return file_bytes[position:]


def _send_files(daemon, paths, aet=AET):
    """C-STORE each file as its bytes stand (pynetdicom sends a path's data set undecoded)."""
    ae = AE(ae_title="TESTSCU")
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title=aet, evt_handlers=NODELAY)
    assert assoc.is_established
    try:
        statuses = []
        for path in paths:
            status = assoc.send_c_store(str(path))
            statuses.append(status.Status if "Status" in status else None)
        return statuses
    finally:
        if assoc.is_established:
            assoc.release()


def _hostile_dicom(daemon, victims, tmp_path):
    port = daemon.dicom_port
    # Port scanners and TCP health checks: connect and close, connect and stay silent.
    for _ in range(20):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(8)]
    # Garbage, an A-ASSOCIATE-RQ header that promises 2 GB, and one cut short.
    for payload in (bytes(range(256)) * 4, b"\x01\x00\x7f\xff\xff\xff" + b"\x00" * 64, b"\x01\x00\x00\x00\x00\xcd\x00"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(payload)
    # Re-sends of acknowledged instances, truncated in their pixel data and in their header.
    truncated = []
    for number, path in enumerate(victims):
        data = path.read_bytes()
        cut = len(data) - 10 if number % 2 else len(data) * 2 // 3
        bad = tmp_path / f"truncated-{number}.dcm"
        bad.write_bytes(data[:cut])
        truncated.append(bad)
    assert set(_send_files(daemon, truncated)) == {0xC000}  # refused, whatever pynetdicom made of them
    for sock in silent:
        sock.close()


def _hostile_http(daemon, victims, tmp_path):
    anonymous = Client(base_url(daemon))
    admin = admin_client(daemon)
    study_uid = str(pydicom.dcmread(victims[0], stop_before_pixels=True).StudyInstanceUID)
    for path in ("/legacy/file", "/dic2png", "/dump"):
        for uid in ("../../index.sqlite", "/etc/passwd", "1.2.3/../../../x", "%2e%2e%2f" * 5):
            assert admin.get(path, uid=uid, SOPInstanceUID=uid).status in (400, 404)
    # Anonymous and cross-site writes that would remove or replace patient data.
    assert anonymous.post("/management/tasks/remove", data={"uri": "file:/"}).status in (401, 403, 404, 405)
    assert anonymous.request("DELETE", f"/dicom-web/studies/{study_uid}").status in (401, 403, 404, 405)
    cross_site = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site",
                  "Cookie": f"{dicoogled.SESSION_COOKIE}={admin.token}"}
    assert admin.request("POST", "/management/tasks/unindex", data={"StudyInstanceUID": study_uid},
                         headers=cross_site, auth=None).status in (401, 403)
    # A truncated STOW-RS re-send of an acknowledged instance, and a malformed body.
    boundary = "hostile-boundary"
    part = victims[1].read_bytes()
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part[:len(part) // 3]
            + f"\r\n--{boundary}--\r\n".encode())
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    assert admin.request("POST", "/dicom-web/studies", data=body, headers=headers).status != 500
    assert admin.request("POST", "/dicom-web/studies", data=b"\x00" * 4096, headers=headers).status in (400, 409, 415)
    # Huge queries.
    uids = "\\".join(f"1.2.3.{n}" for n in range(3000))
    assert admin.get("/dicom-web/instances", SOPInstanceUID=uids).status in (200, 400, 413, 414)
    assert admin.get("/search", query="PatientName:" + "(" * 5000).status in (400, 413, 414)


def test_hostile_requests_lose_no_acknowledged_instance(start_daemon, studies, tmp_path):
    daemon = start_daemon(CONFIG, env=ADMIN_ENV)
    paths = studies(patients=2, studies=2, series=2, instances=3)
    statuses = _send_files(daemon, paths)
    acknowledged = {}
    for path, status in zip(paths, statuses):
        if status == 0x0000:
            data = path.read_bytes()
            acknowledged[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = _dataset_bytes(data)
    assert len(acknowledged) == len(paths)

    victims = paths[:6]
    _hostile_dicom(daemon, victims, tmp_path)
    _hostile_http(daemon, victims, tmp_path)

    assert daemon.stop() == 0
    daemon.start()
    daemon.settled()
    found, final = daemon.find(make_identifier("IMAGE", SOPInstanceUID=""), model="study")
    assert final == 0x0000
    assert {str(ds.SOPInstanceUID) for ds in found} >= set(acknowledged)
    admin = admin_client(daemon)
    for uid, sent in acknowledged.items():
        response = admin.get("/legacy/file", uid=uid)
        assert response.status == 200, (uid, response)
        assert _dataset_bytes(response.body) == sent, f"{uid}: stored bytes differ from what was acknowledged"
    assert daemon.stop() == 0
