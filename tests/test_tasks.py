"""Background tasks live in the task list (data_dir/tasks.sqlite, or the PostgreSQL index's
database), not in the memory of the process that runs them.

A task the daemon was running when it was killed is found unfinished when it starts again: an
index task runs again from the start and completes, a plugin's function (code only the dead
process had) is ended with the reason. Finished tasks stay listed across a restart until closed.
Tasks are caught mid-way by a plugin that holds them until a gate file exists: it says it has
been reached by writing a file, so nothing here waits on timing. (Several nodes: test_multinode.)
"""

import textwrap

import pytest

from conftest import wait_until
from restclient import ADMIN_ENV, admin_client

#: A plugin that holds every instance an index task indexes, and runs a task of its own that
#: waits, until the gate file exists; each writes a file when it is first reached.
HOLD = '''
    """Holds index tasks and its own task at a gate (a test's plugin)."""
    import os
    import pathlib
    import time

    dicoogle = None
    FOLDER = pathlib.Path({folder!r})


    def wait_at_the_gate(who):
        (FOLDER / f"reached-{{who}}").touch()
        while not (FOLDER / "gate").exists():
            time.sleep(0.02)


    def index(instance):
        wait_at_the_gate("index")


    def routes(app):
        @app.post("/start")
        def start():
            return {{"uid": dicoogle.run_task("held", lambda progress: wait_at_the_gate("function"))}}
'''


@pytest.fixture
def held(start_daemon, tmp_path):
    """A daemon with the HOLD plugin; its folder is daemon.gate_folder."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "hold.py").write_text(textwrap.dedent(HOLD.format(folder=str(plugins))))
    daemon = start_daemon(args=["--plugins-dir", str(plugins)], env=ADMIN_ENV)
    daemon.gate_folder = plugins
    return daemon


def listed(client) -> dict[str, dict]:
    """taskUid -> report of every task /index/task lists."""
    response = client.get("/index/task")
    assert response.status == 200, response
    return {report["taskUid"]: report for report in response.json()["results"]}


def completed(client, uid: str):
    return lambda: listed(client).get(uid, {}).get("complete") and listed(client)[uid]


def start_index_task(client, folder) -> str:
    response = client.post("/management/tasks/index", uri=folder.as_uri())
    assert response.status == 200, response
    return response.json()["tasks"][0]["uid"]


def test_tasks_cut_short_by_a_crash_are_run_again_or_ended_with_the_reason(held, studies):
    paths = studies(patients=1, studies=1, series=1, instances=4)
    folder = paths[0].parent
    client = admin_client(held)
    index_uid = start_index_task(client, folder)
    function_uid = client.post("/ext/hold/start").json()["uid"]
    wait_until(lambda: all((held.gate_folder / f"reached-{who}").exists() for who in ("index", "function")),
               message="both tasks to reach the gate")
    assert set(listed(client)) == {index_uid, function_uid}
    assert held.state_sql("tasks", "SELECT count(*) FROM tasks WHERE finished = 0") == [(2,)]

    held.kill()  # SIGKILL, by the PID this test started: no chance to write anything more
    (held.gate_folder / "gate").touch()
    held.start()
    client = admin_client(held)

    index_report = wait_until(completed(client, index_uid), message="the index task to run again and complete")
    assert index_report["nIndexed"] == 4 and index_report["nErrors"] == 0 and "canceled" not in index_report
    assert f"index task {index_uid}, left unfinished by node" in held.log
    function_report = wait_until(completed(client, function_uid), message="the function task to be ended")
    assert function_report["nErrors"] == 1
    assert "stopped before the task ended" in function_report["interrupted"]
    assert held.counts()["instances"] == 4


def test_finished_tasks_stay_listed_across_a_restart_until_closed(held, studies):
    (held.gate_folder / "gate").touch()
    folder = studies(patients=1, studies=1, series=1, instances=2)[0].parent
    client = admin_client(held)
    first, second = start_index_task(client, folder), start_index_task(client, folder)
    wait_until(completed(client, second), message="both index tasks to complete")
    held.restart()
    client = admin_client(held)
    assert set(listed(client)) == {first, second}
    assert listed(client)[first]["nIndexed"] == 2 and listed(client)[first]["complete"]
    assert client.post("/index/task", data={"type": "close", "uid": first}).json() == {"removed": True}
    assert client.post("/index/task", data={"type": "close", "uid": first}).json() == {"error": True}
    held.restart()
    assert set(listed(admin_client(held))) == {second}


def test_a_task_stopped_at_the_gate_ends_cancelled_and_is_not_run_again(held, studies):
    folder = studies(patients=1, studies=1, series=1, instances=3)[0].parent
    client = admin_client(held)
    uid = start_index_task(client, folder)
    wait_until(lambda: (held.gate_folder / "reached-index").exists(), message="the index task to reach the gate")
    assert client.post("/index/task", data={"type": "stop", "uid": uid}).json() == {"stopped": True}
    (held.gate_folder / "gate").touch()
    report = wait_until(completed(client, uid), message="the stopped task to end")
    assert report["canceled"] and report["nIndexed"] == 1  # the file at the gate, then it stopped
    held.restart()
    assert listed(admin_client(held))[uid] == report
    assert "left unfinished" not in held.log
