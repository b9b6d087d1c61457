"""schemathesis fuzzes every operation of /openapi.json, logged in as an administrator, and
finds no server error (5xx). The daemon must still answer, with its data, afterwards."""

import itertools
import secrets
import subprocess
import sys

import pytest

import studygen
from restclient import ADMIN_ENV, Client, admin_client, base_url

#: Operations left out, each because fuzzing it would act outside the test's own daemon or end
#: the run's session: (method, path regex, why).
EXCLUDED = [
    ("POST", "^/management/tasks/index$", "indexes whatever folder it names, / included"),
    ("POST", "^/management/settings/index", "makes any folder (/ included) a watched folder"),
    ("POST", "^/management/dicom/echo$", "sends a C-ECHO to any host it names"),
    ("POST", "^/logout$", "ends the run's own session"),
    ("DELETE", "^/user", "deletes the run's own user, once it has made another administrator"),
    ("GET", "^/logout$", "ends the run's own session"),
    ("POST", "^/user/[^/]+$", "changes the rights of the run's own user, which ends its session"),
]


def test_schemathesis_finds_no_server_error(start_daemon, tmp_path):
    daemon = start_daemon(env=ADMIN_ENV)
    if Client(base_url(daemon)).get("/openapi.json").status == 404:
        pytest.skip("the daemon has no /openapi.json yet")
    paths = studygen.generate(tmp_path / "gen", patients=2, studies=1, series=1, instances=2, size=8)
    assert daemon.store(*paths) == [0] * len(paths)
    # It runs as an administrator of its own, so what it does to "admin" leaves its session alone.
    fuzzer_name = f"fuzzer-{secrets.token_hex(8)}"
    assert admin_client(daemon).post("/user", username=fuzzer_name, password="fuzz-secret-1", admin="true").status == 200
    admin = Client(base_url(daemon))
    admin.login(fuzzer_name, "fuzz-secret-1")
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{base_url(daemon)}/openapi.json",
               "--header", f"Authorization: {admin.token}", "--checks", "not_a_server_error",
               "--phases", "examples,coverage,fuzzing", "--max-examples", "40", "--seed", "1",
               "--workers", "2", "--request-timeout", "30", "--no-color", "--suppress-health-check", "all",
               "--generation-with-security-parameters", "false"]  # or it sends made-up tokens
    # schemathesis names an operation "METHOD /path"; it keeps only one regex, hence one alternation.
    command += ["--exclude-name-regex", "^(" + "|".join(f"{method} {path.lstrip('^')}" for method, path, _ in EXCLUDED) + ")"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20000:]
    # The token held throughout: only a failed login may answer nothing but 401.
    if "401 Unauthorized (" in output:
        listed = output.split("401 Unauthorized (", 1)[1].splitlines()[1:]
        refused = [line.strip()[2:] for line in itertools.takewhile(lambda line: line.strip().startswith("- "), listed)]
        assert refused == ["POST /login"], output[-20000:]
    # Still up, logged in, with every instance (schemathesis cannot guess a UID or a path).
    assert daemon.health()["status"] == "ok"
    response = admin.get("/search", query="*:*")
    assert response.status == 200, (response, output[-20000:])
    assert response.json()["numResults"] == len(paths)

