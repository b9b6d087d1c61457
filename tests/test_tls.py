"""DICOM TLS and the archive behind an HTTPS reverse proxy.

Certificates are made in each test run by `dicoogled make-cert` (openssl); the peers are DCMTK's
echoscu, storescu, findscu and movescu with their +tls options, a DCMTK storescp that speaks only
TLS as the C-MOVE destination, and Python's ssl module for what DCMTK cannot be told to do (stay
silent after connecting, offer only TLS 1.2).
"""

import socket
import ssl
import stat
import subprocess
import sys

import pydicom
import pytest
import requests

from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

import studygen
from conftest import AET, ROOT, free_port, make_identifier, wait_until

SUCCESS = 0x0000


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A lab CA, the archive's certificate, and client certificates for the AEs STORESCU and DEST."""
    folder = tmp_path_factory.mktemp("certificates")
    subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "make-cert", str(folder),
                    "--ae", "STORESCU", "--ae", "DEST=127.0.0.1,localhost"], check=True, capture_output=True)
    return folder


def tls_config(lab, tls_port, *, ca=True, minimum="1.2", extra=""):
    return (f"[dicom]\ntls_port = {tls_port}\ntls_certificate = {lab / 'server.pem'}\n"
            f"tls_private_key = {lab / 'server-key.pem'}\n"
            + (f"tls_ca_certificate = {lab / 'ca.pem'}\n" if ca else "")
            + f"tls_minimum_version = {minimum}\nassociation_request_timeout = 2\n" + extra)


def dcmtk_tls(tool, lab, port, *args, client="STORESCU", check=True, files=()):
    """Run a DCMTK client over TLS against the archive's TLS port, as AE STORESCU (or anonymous
    TLS, with no certificate, when client is None), checking the archive's certificate."""
    identity = ["+tls", str(lab / f"{client}-key.pem"), str(lab / f"{client}.pem")] if client else ["+tla"]
    command = [tool, *identity, "+cf", str(lab / "ca.pem"), "-aet", client or "ANON", "-aec", AET,
               *args, "127.0.0.1", str(port), *map(str, files)]
    result = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def test_make_cert_writes_a_ca_and_certificates_with_owner_only_keys(lab):
    for name in ("ca", "server", "STORESCU", "DEST"):
        assert stat.S_IMODE((lab / f"{name}-key.pem").stat().st_mode) == 0o600
        assert (lab / f"{name}.pem").is_file()
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(lab / "ca.pem"), str(lab / "server.pem"),
                               str(lab / "STORESCU.pem")], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    names = subprocess.run(["openssl", "x509", "-in", str(lab / "server.pem"), "-noout", "-ext", "subjectAltName"],
                           capture_output=True, text=True).stdout
    assert "DNS:localhost" in names and "IP Address:127.0.0.1" in names


def test_dcmtk_echo_store_find_and_move_over_tls(start_daemon, lab, tmp_path):
    """The whole round over TLS: storescu stores, findscu finds it, and C-MOVE sends it to a
    destination that speaks only TLS and requires our certificate ([modalities] ... tls)."""
    dest_port, tls_port = free_port(), free_port()
    received = tmp_path / "received"
    received.mkdir()
    storescp = subprocess.Popen(["storescp", "+tls", str(lab / "DEST-key.pem"), str(lab / "DEST.pem"),
                                 "+cf", str(lab / "ca.pem"), "-aet", "DEST", "-od", str(received), str(dest_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        daemon = start_daemon(tls_config(lab, tls_port, extra=f"[modalities]\nDEST = 127.0.0.1:{dest_port} tls\n"))
        assert "DICOM TLS listening on 127.0.0.1:%d" % tls_port in daemon.log

        assert "Received Echo Response (Success)" in dcmtk_tls("echoscu", lab, tls_port, "-v").stderr

        [path] = studygen.generate(tmp_path / "generated", patients=1, studies=1, series=1, instances=1)
        study_uid = pydicom.dcmread(path).StudyInstanceUID
        dcmtk_tls("storescu", lab, tls_port, files=[path])
        wait_until(lambda: daemon.counts()["instances"] == 1, message="the instance to be indexed")
        assert "client certificate STORESCU" in daemon.log

        found = dcmtk_tls("findscu", lab, tls_port, "-v", "-S", "-k", "QueryRetrieveLevel=STUDY",
                          "-k", f"StudyInstanceUID={study_uid}")
        assert found.stderr.count("Find Response: ") == 1 and "(Pending)" in found.stderr  # the one match
        assert "Received Final Find Response (Success)" in found.stderr

        # The destination only speaks TLS: it answers only if the archive associates over it. DCMTK
        # 3.6.7's movescu has no TLS options: it asks on the plain port, pynetdicom on the TLS one.
        moved = daemon.dcmtk("movescu", "-v", "-S", "-aem", "DEST", "-k", "QueryRetrieveLevel=STUDY",
                             "-k", f"StudyInstanceUID={study_uid}")
        assert "Received Final Move Response (Success)" in moved.stderr
        copies = [pydicom.dcmread(p) for p in received.iterdir()]
        assert [str(ds.StudyInstanceUID) for ds in copies] == [study_uid]

        context = ssl.create_default_context(cafile=str(lab / "ca.pem"))
        context.load_cert_chain(str(lab / "STORESCU.pem"), str(lab / "STORESCU-key.pem"))
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", tls_port, ae_title=AET, tls_args=(context, "localhost"))
        assert assoc.is_established
        identifier = make_identifier(StudyInstanceUID=study_uid)
        responses = [status for status, _ in assoc.send_c_move(identifier, "DEST", StudyRootQueryRetrieveInformationModelMove)]
        assoc.release()
        assert responses[-1].Status == SUCCESS and responses[-1].NumberOfCompletedSuboperations == 1
        assert "C-MOVE from STORESCU: 1 instances to DEST" in daemon.log

        # The plain port is still there, and without tls the destination cannot be reached.
        plain = daemon.dcmtk("echoscu")
        assert plain.returncode == 0
    finally:
        storescp.terminate()
        storescp.wait(10)


def test_move_to_a_tls_destination_not_marked_tls_fails(start_daemon, lab, tmp_path):
    """Without tls in its [modalities] entry the destination gets plain DICOM, which it refuses:
    the word is what turns TLS on."""
    dest_port, tls_port = free_port(), free_port()
    received = tmp_path / "received"
    received.mkdir()
    storescp = subprocess.Popen(["storescp", "+tls", str(lab / "DEST-key.pem"), str(lab / "DEST.pem"),
                                 "+cf", str(lab / "ca.pem"), "-aet", "DEST", "-od", str(received), str(dest_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        daemon = start_daemon(tls_config(lab, tls_port, extra=f"[modalities]\nDEST = 127.0.0.1:{dest_port}\n"))
        [path] = studygen.generate(tmp_path / "generated", patients=1, studies=1, series=1, instances=1)
        study_uid = pydicom.dcmread(path).StudyInstanceUID
        daemon.store(path)
        moved = daemon.dcmtk("movescu", "-v", "-S", "-aem", "DEST", "-k", "QueryRetrieveLevel=STUDY",
                             "-k", f"StudyInstanceUID={study_uid}", check=False)
        assert "Received Final Move Response (Success)" not in moved.stderr
        assert "cannot associate with DEST" in daemon.log
        assert list(received.iterdir()) == []
    finally:
        storescp.terminate()
        storescp.wait(10)


def test_clients_without_a_lab_certificate_are_refused(start_daemon, lab, tmp_path):
    tls_port = free_port()
    daemon = start_daemon(tls_config(lab, tls_port))
    anonymous = dcmtk_tls("echoscu", lab, tls_port, client=None, check=False)
    assert anonymous.returncode != 0
    wait_until(lambda: "PEER_DID_NOT_RETURN_A_CERTIFICATE" in daemon.log, message="the refusal to be logged")

    # A certificate from another CA is refused too.
    other = tmp_path / "other-lab"
    subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "make-cert", str(other), "--ae", "STORESCU"],
                   check=True, capture_output=True)
    stranger = subprocess.run(["echoscu", "+tls", str(other / "STORESCU-key.pem"), str(other / "STORESCU.pem"),
                               "+cf", str(lab / "ca.pem"), "-aec", AET, "127.0.0.1", str(tls_port)],
                              capture_output=True, text=True, timeout=60)
    assert stranger.returncode != 0
    wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in daemon.log, message="the unknown CA to be logged")

    # Plain DICOM on the TLS port is no TLS handshake.
    plain = subprocess.run(["echoscu", "-aec", AET, "127.0.0.1", str(tls_port)], capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0
    wait_until(lambda: "WRONG_VERSION_NUMBER" in daemon.log, message="the plain connection to be refused")
    assert daemon.health()["dicom"]["associations"] == 0


def test_per_ae_certificates_refuse_a_certificate_speaking_for_another_ae(start_daemon, lab):
    """tls_certificate_names_ae: STORESCU's certificate serves the AE STORESCU, and is refused
    (calling AE not recognized) when it calls as another AE; without the setting it is not."""
    tls_port = free_port()
    daemon = start_daemon(tls_config(lab, tls_port, extra="tls_certificate_names_ae = true\n"))
    assert "Received Echo Response (Success)" in dcmtk_tls("echoscu", lab, tls_port, "-v").stderr
    command = ["echoscu", "+tls", str(lab / "STORESCU-key.pem"), str(lab / "STORESCU.pem"), "+cf", str(lab / "ca.pem"),
               "-aet", "CT01", "-aec", AET, "127.0.0.1", str(tls_port)]
    posing = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert posing.returncode != 0
    wait_until(lambda: "its TLS certificate names 'STORESCU' (tls_certificate_names_ae)" in daemon.log,
               message="the refusal to be logged")
    daemon.stop()

    other_port = free_port()
    start_daemon(tls_config(lab, other_port))
    command[-1] = str(other_port)
    assert subprocess.run(command, capture_output=True, text=True, timeout=60).returncode == 0


def test_without_a_ca_any_tls_client_is_served(start_daemon, lab):
    tls_port = free_port()
    start_daemon(tls_config(lab, tls_port, ca=False))
    assert "Received Echo Response (Success)" in dcmtk_tls("echoscu", lab, tls_port, "-v", client=None).stderr


def test_minimum_version_refuses_older_tls(start_daemon, lab):
    tls_port = free_port()
    start_daemon(tls_config(lab, tls_port, ca=False, minimum="1.3"))

    def handshake(version):
        context = ssl.create_default_context(cafile=str(lab / "ca.pem"))
        context.maximum_version = version
        with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as sock:
            with context.wrap_socket(sock, server_hostname="localhost") as tls:
                return tls.version()

    assert handshake(ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    with pytest.raises(ssl.SSLError):
        handshake(ssl.TLSVersion.TLSv1_2)


def test_a_silent_tls_client_holds_no_slot_and_blocks_no_one(start_daemon, lab):
    """A client that connects and never starts its handshake waits in the waiting room, like a
    silent plain connection: others are served meanwhile, even with max_associations = 1, and it
    is closed after association_request_timeout."""
    tls_port = free_port()
    daemon = start_daemon(tls_config(lab, tls_port, extra="max_associations = 1\n"))
    silent = [socket.create_connection(("127.0.0.1", tls_port), timeout=10) for _ in range(3)]
    try:
        wait_until(lambda: daemon.health()["dicom"]["waiting"] == 3, message="the silent clients to wait")
        assert "Received Echo Response (Success)" in dcmtk_tls("echoscu", lab, tls_port, "-v").stderr
        for sock in silent:  # closed by the archive once association_request_timeout (2 s) is past
            sock.settimeout(10)
            assert sock.recv(1) == b""
        wait_until(lambda: daemon.health()["dicom"]["waiting"] == 0, message="the waiting room to empty")
    finally:
        for sock in silent:
            sock.close()


def test_tls_port_without_a_certificate_does_not_start(tmp_path):
    config = tmp_path / "bad.ini"
    config.write_text("[dicom]\ntls_port = 2762\n")
    result = subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "serve", "--config", str(config),
                             "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "tls_port = 2762 needs tls_certificate and tls_private_key" in result.stderr


def test_a_certificate_that_cannot_be_loaded_stops_the_start(tmp_path):
    config = tmp_path / "missing.ini"
    config.write_text(f"[dicom]\ntls_port = {free_port()}\ntls_certificate = {tmp_path / 'none.pem'}\n"
                      f"tls_private_key = {tmp_path / 'none-key.pem'}\n")
    result = subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "serve", "--config", str(config),
                             "--data-dir", str(tmp_path / "data"), "--http-host", "127.0.0.1",
                             "--http-port", str(free_port()), "--dicom-host", "127.0.0.1", "--dicom-port", str(free_port())],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot load tls_certificate {tmp_path / 'none.pem'}" in result.stderr


def test_a_destination_with_a_certificate_of_another_ca_is_not_sent_to(start_daemon, lab, tmp_path):
    """The archive checks a tls destination's certificate against the lab CA only."""
    other = tmp_path / "other-lab"
    subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "make-cert", str(other), "--ae", "DEST=127.0.0.1"],
                   check=True, capture_output=True)
    dest_port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    storescp = subprocess.Popen(["storescp", "+tls", str(other / "DEST-key.pem"), str(other / "DEST.pem"),
                                 "+cf", str(lab / "ca.pem"), "-aet", "DEST", "-od", str(received), str(dest_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        daemon = start_daemon(tls_config(lab, free_port(), extra=f"[modalities]\nDEST = 127.0.0.1:{dest_port} tls\n"))
        [path] = studygen.generate(tmp_path / "generated", patients=1, studies=1, series=1, instances=1)
        daemon.store(path)
        moved = daemon.dcmtk("movescu", "-v", "-S", "-aem", "DEST", "-k", "QueryRetrieveLevel=STUDY",
                             "-k", f"StudyInstanceUID={pydicom.dcmread(path).StudyInstanceUID}", check=False)
        assert "Received Final Move Response (Success)" not in moved.stderr
        assert "TLS handshake with 127.0.0.1:%d failed: unable to get local issuer certificate" % dest_port in daemon.log
        assert list(received.iterdir()) == []
    finally:
        storescp.terminate()
        storescp.wait(10)


def test_tls_destinations_are_shown_and_kept_by_the_rest_api(start_daemon):
    from restclient import ADMIN_ENV, admin_client
    daemon = start_daemon("[modalities]\nVIEWER = 127.0.0.1:2762 tls public Reading room\nPLAIN = 127.0.0.1:104\n",
                          env=ADMIN_ENV)
    client = admin_client(daemon)
    shown = {d["AETitle"]: d for d in client.get("/management/settings/storage/dicom").json()}
    assert shown["VIEWER"]["tls"] is True and shown["VIEWER"]["description"] == "Reading room"
    assert shown["PLAIN"]["tls"] is False
    assert client.post("/management/settings/storage/dicom", type="add", aetitle="PLAIN", ip="127.0.0.1",
                       port="104", tls="true").status == 200
    assert client.post("/management/settings/storage/dicom", type="add", aetitle="VIEWER", ip="127.0.0.1",
                       port="2762", description="Reading room").status == 200
    daemon.restart()
    shown = {d["AETitle"]: d for d in client.get("/management/settings/storage/dicom").json()}
    assert shown["PLAIN"]["tls"] is True and shown["VIEWER"]["tls"] is True


def test_public_url_is_used_for_retrieve_urls_behind_a_proxy(start_daemon, tmp_path):
    """Behind a reverse proxy at https://pacs.example.org/archive the proxy connects to the
    archive's own port; QIDO-RS RetrieveURLs must name the public address, and a client's own
    X-Forwarded-Host must not change it."""
    daemon = start_daemon("[http]\nallow_unauthorized = true\npublic_url = https://pacs.example.org/archive/\n")
    [path] = studygen.generate(tmp_path / "generated", patients=1, studies=1, series=1, instances=1)
    study_uid = pydicom.dcmread(path).StudyInstanceUID
    daemon.store(path)
    wait_until(lambda: daemon.counts()["instances"] == 1, message="the instance to be indexed")
    response = requests.get(f"http://127.0.0.1:{daemon.http_port}/dicom-web/studies",
                            headers={"Host": "127.0.0.1", "X-Forwarded-Host": "evil.example.com",
                                     "X-Forwarded-Proto": "http"}, timeout=30)
    assert response.status_code == 200, response.text
    [study] = response.json()
    assert study["00081190"]["Value"] == [f"https://pacs.example.org/archive/dicom-web/studies/{study_uid}"]
    openapi = requests.get(f"http://127.0.0.1:{daemon.http_port}/openapi.json", timeout=30).json()
    assert openapi["servers"] == [{"url": "https://pacs.example.org/archive"}]
