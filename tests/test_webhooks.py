"""Stable studies and webhooks: a real HTTP receiver on loopback that fails the first deliveries,
the daemon stopped (SIGTERM) while deliveries wait and started again on the same data dir, and
every event received exactly once (by delivery id) with a valid HMAC signature; on_stable_study
gets the study's attributes in Python and in Lua, and a study is still found stable after a
restart that came before its quiet time was over."""
import hashlib
import hmac
import http.server
import json
import pathlib
import subprocess
import sys
import threading

import pytest

import studygen
from conftest import ROOT, wait_until
from restclient import ADMIN_ENV, Client, admin_client, base_url

sys.path.insert(0, str(ROOT))
import dicoogled  # noqa: E402  (its config parser, for the syntax checks)

SECRET = "correct horse battery staple"

PYTHON_RECORDER = '''
"""Writes the attributes on_stable_study receives to a file, one JSON line per study."""
import json

SETTINGS = {"enabled": True, "file": ""}


def on_stable_study(study):
    with open(dicoogle.setting("file"), "a") as handle:
        handle.write(json.dumps(study) + "\\n")
'''

LUA_LOGGER = '''
function on_stable_study(study)
  dicoogle.log("lua stable " .. study.StudyInstanceUID .. " patient " .. study.PatientID
               .. " instances " .. study.NumberOfStudyRelatedInstances .. " modalities " .. study.ModalitiesInStudy)
end
'''


class Receiver:
    """A webhook endpoint on a free loopback port: answers 500 while `failing` says so (a number
    of requests still to fail, or True for all), then 200; keeps every request it was sent."""

    def __init__(self):
        self.requests = []  # (delivery id, event header, signature header, body bytes, status answered)
        self.failing = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    status = 500 if receiver.failing else 200
                    if receiver.failing is not True and receiver.failing:
                        receiver.failing -= 1
                    receiver.requests.append((self.headers["X-Dicoogled-Delivery"], self.headers["X-Dicoogled-Event"],
                                              self.headers["X-Dicoogled-Signature"], body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def delivered(self) -> list[dict]:
        """The bodies answered 200, in order."""
        with self.lock:
            return [json.loads(body) for _, _, _, body, status in self.requests if status == 200]

    def failed_ids(self) -> set[str]:
        with self.lock:
            return {delivery for delivery, _, _, _, status in self.requests if status != 200}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.close()


def hook_config(tmp_path: pathlib.Path, url: str, stable_age: float = 1, recorder: pathlib.Path | None = None) -> str:
    secret_file = tmp_path / "hook.secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    config = (f"[plugins]\nstable_age = {stable_age}\n"
              f"[webhooks]\nreceiver = url={url} events=stable_study,stored secret_file={secret_file}"
              " retry=0.2..0.5 timeout=5\n")
    if recorder:
        config += f"[plugin.recorder]\nfile = {recorder}\n"
    return config


def start_with_plugins(start_daemon, tmp_path, config: str, name="data"):
    plugins = tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    (plugins / "recorder.py").write_text(PYTHON_RECORDER.lstrip())
    (plugins / "stable.lua").write_text(LUA_LOGGER.lstrip())
    return start_daemon(config_text=config, args=["--plugins-dir", str(plugins)], env=ADMIN_ENV, name=name)


def deliveries(daemon, **params) -> list[dict]:
    answer = admin_client(daemon).get("/management/webhooks", **params)
    assert answer.status == 200, answer.text
    return answer.json()["deliveries"]


def test_every_event_arrives_once_signed_through_failures_and_a_restart(start_daemon, receiver, tmp_path):
    recorder = tmp_path / "stable.jsonl"
    config = hook_config(tmp_path, receiver.url, recorder=recorder)
    receiver.failing = True  # until the daemon has been stopped with deliveries waiting
    daemon = start_with_plugins(start_daemon, tmp_path, config)
    first = [studygen.make_instance(0, 0, 0, n) for n in range(2)]
    assert daemon.store(*first) == [0, 0]
    study_uid = first[0].StudyInstanceUID

    def pending_events():
        return sorted(d["event"] for d in deliveries(daemon, status="pending") if d["attempts"] >= 1)

    # Both stored events failed at least once, and the study was found stable: stop now.
    wait_until(lambda: pending_events() == ["stable_study", "stored", "stored"], message="three failing deliveries")
    log = deliveries(daemon)
    assert {d["lastError"] for d in log} == {"HTTP 500 Internal Server Error"}
    assert daemon.stop() == 0

    receiver.failing = 2  # two more failures after the restart, then every delivery is taken
    daemon.start()
    wait_until(lambda: len(receiver.delivered()) == 3, message="the three events delivered after the restart")
    wait_until(lambda: {d["status"] for d in deliveries(daemon)} == {"delivered"}, message="the log to say delivered")

    # A later instance makes the study stable again: a second stable_study, with three instances;
    # a second study is the marker after which any duplicate would have come.
    later, marker = studygen.make_instance(0, 0, 0, 2), studygen.make_instance(1, 0, 0, 0)
    assert daemon.store(later) == [0]
    wait_until(lambda: sum(b["event"] == "stable_study" for b in receiver.delivered()) == 2, message="the study stable again")
    assert daemon.store(marker) == [0]
    wait_until(lambda: any(b["event"] == "stable_study" and b["data"]["StudyInstanceUID"] == marker.StudyInstanceUID
                           for b in receiver.delivered()), message="the marker study's stable event")
    wait_until(lambda: {d["status"] for d in deliveries(daemon)} == {"delivered"}, message="everything delivered")

    # Exactly once, as the receiver sees it: no delivery id answered 200 twice, and every retry
    # carried the id (and the bytes) of a delivery that was then made.
    delivered = receiver.delivered()
    ids = [body["id"] for body in delivered]
    assert len(ids) == len(set(ids)) == 7  # four stored, three stable_study
    assert receiver.failed_ids() <= set(ids)
    stored = sorted(b["data"]["SOPInstanceUID"] for b in delivered if b["event"] == "stored")
    assert stored == sorted(ds.SOPInstanceUID for ds in [*first, later, marker])
    stable = [b["data"] for b in delivered if b["event"] == "stable_study"]
    assert [(s["StudyInstanceUID"], s["NumberOfStudyRelatedInstances"]) for s in stable] == \
        [(study_uid, "2"), (study_uid, "3"), (marker.StudyInstanceUID, "1")]
    assert stable[0]["PatientID"] == first[0].PatientID and stable[0]["ModalitiesInStudy"] == "CT"
    assert stable[0]["StudyDate"] == first[0].StudyDate and stable[0]["AccessionNumber"] == first[0].AccessionNumber

    # Every request, retries included, is signed with the secret over its exact body, and says
    # its event and delivery id in headers matching the body.
    with receiver.lock:
        requests = list(receiver.requests)
    for delivery_id, event, signature, body, _ in requests:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(signature, expected)
        assert (json.loads(body)["id"], json.loads(body)["event"]) == (delivery_id, event)
    assert SECRET not in daemon.log

    # on_stable_study, in Python and in Lua, got the study's attributes (once per stable time).
    told = [json.loads(line) for line in recorder.read_text().splitlines()]
    assert [(t["StudyInstanceUID"], t["NumberOfStudyRelatedInstances"]) for t in told] == \
        [(s["StudyInstanceUID"], s["NumberOfStudyRelatedInstances"]) for s in stable]
    assert told[0]["PatientName"] == str(first[0].PatientName)
    wait_until(lambda: f"lua stable {marker.StudyInstanceUID} patient {marker.PatientID} instances 1 modalities CT"
               in daemon.log, message="the Lua plugin's on_stable_study")
    assert f"lua stable {study_uid} patient {first[0].PatientID} instances 3 modalities CT" in daemon.log
    daemon.stop()


def test_a_study_stored_before_a_restart_is_found_stable_after_it(start_daemon, receiver, tmp_path):
    """The last arrival is kept in the index: stopped long before the study's quiet time was
    over (stable_age an hour), started again with stable_age 1 s, the study is announced."""
    recorder = tmp_path / "stable.jsonl"
    daemon = start_with_plugins(start_daemon, tmp_path, hook_config(tmp_path, receiver.url, 3600, recorder))
    instance = studygen.make_instance(0, 0, 0, 0)
    assert daemon.store(instance) == [0]
    wait_until(lambda: [b["event"] for b in receiver.delivered()] == ["stored"], message="the stored event")
    assert daemon.stop() == 0
    daemon.config_path.write_text(hook_config(tmp_path, receiver.url, 1, recorder))
    daemon.start()
    wait_until(lambda: [b["event"] for b in receiver.delivered()] == ["stored", "stable_study"], message="stable after the restart")
    assert json.loads(recorder.read_text())["StudyInstanceUID"] == instance.StudyInstanceUID
    daemon.stop()


def test_a_rebuilt_index_announces_no_study_again(start_daemon, receiver, tmp_path):
    """reindex rebuilds the index from the files: its studies arrived long ago, and are not
    stable news. A study stored afterwards is the marker after which a repeat would have come."""
    daemon = start_daemon(config_text=hook_config(tmp_path, receiver.url), env=ADMIN_ENV)
    first, marker = studygen.make_instance(0, 0, 0, 0), studygen.make_instance(1, 0, 0, 0)

    def stable_studies():
        return [b["data"]["StudyInstanceUID"] for b in receiver.delivered() if b["event"] == "stable_study"]

    assert daemon.store(first) == [0]
    wait_until(lambda: stable_studies() == [first.StudyInstanceUID], message="the first study stable")
    assert daemon.stop() == 0
    rebuilt = subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "reindex", "--data-dir", str(daemon.data_dir), *daemon.index_args,
                              "--config", str(daemon.config_path)], capture_output=True, text=True, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr
    daemon.start()
    assert daemon.store(marker) == [0]
    wait_until(lambda: marker.StudyInstanceUID in stable_studies(), message="the marker study stable")
    assert stable_studies() == [first.StudyInstanceUID, marker.StudyInstanceUID]
    daemon.stop()


def test_the_delivery_log_is_for_administrators_and_shows_no_secret(start_daemon, receiver, tmp_path):
    daemon = start_daemon(config_text=hook_config(tmp_path, receiver.url), env=ADMIN_ENV)
    assert Client(base_url(daemon)).get("/management/webhooks").status == 401
    answer = admin_client(daemon).get("/management/webhooks")
    assert answer.status == 200
    assert answer.json()["webhooks"] == [{"name": "receiver", "url": receiver.url, "events": ["stable_study", "stored"],
                                          "timeout": 5.0, "retry": [0.2, 0.5], "attempts": 50}]
    assert SECRET not in answer.text
    assert admin_client(daemon).get("/management/webhooks", status="lost").status == 400


@pytest.mark.parametrize("line, why", [
    ("url=ftp://host/x events=stored secret=s", "http:// or https://"),
    ("url=http://host/x events=stored,moved secret=s", "events="),
    ("url=http://host/x events=stored", "secret"),
    ("url=http://host/x events=stored secret=s secret_file=/etc/hostname", "secret"),
    ("url=http://host/x events=stored secret=s retry=5..1", "retry="),
    ("url=http://host/x events=stored secret=s colour=red", "not an option"),
])
def test_a_webhook_line_that_cannot_work_is_refused_with_its_reason(tmp_path, line, why):
    config = tmp_path / "hooks.ini"
    config.write_text(f"[webhooks]\nris = {line}\n")
    with pytest.raises(ValueError, match=why) as refused:
        dicoogled.Config.load(config, data_dir=tmp_path / "data")
    assert "ris" in str(refused.value)
