"""The official dicoogle-client npm package drives dicoogled: tests/js/client.mjs runs login,
search, searchDIM at every depth, dump, export, an index task, unindex, move destinations,
users and logout, and checks every answer. `make test` installs the package (npm ci)."""

import shutil
import subprocess

import pytest

import studygen
from conftest import TESTS
from restclient import ADMIN_ENV, ADMIN_PASSWORD, base_url

CLIENT = TESTS / "js" / "client.mjs"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (make test installs it)")
def test_dicoogle_client_drives_the_archive(start_daemon, tmp_path):
    if not (TESTS / "js" / "node_modules" / "dicoogle-client").is_dir():
        pytest.fail("dicoogle-client is not installed: run 'npm ci --prefix tests/js' (make test does)")
    daemon = start_daemon(env=ADMIN_ENV)
    paths = studygen.generate(tmp_path / "archive", patients=3, studies=2, series=2, instances=2, size=8, modality="mixed")
    assert daemon.store(*paths) == [0] * len(paths)
    to_index = tmp_path / "to index"
    studygen.generate(to_index, patients=2, studies=1, series=1, instances=3, size=8, seed=5)
    result = subprocess.run(["node", str(CLIENT), base_url(daemon), "admin", ADMIN_PASSWORD, to_index.as_uri()],
                            capture_output=True, text=True, timeout=300)
    print(result.stdout)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "not ok" not in result.stdout
    assert "xfail" not in result.stdout, "a step expected to fail passed or failed differently: update client.mjs"
