"""Several nodes: once-only work owned through leases, node-local folders, one serve per data dir.

Leases are tested against a real PostgreSQL server (conftest's postgres_url): two Leases objects
stand for two nodes; a node that dies is a child process killed with SIGKILL, by its PID.
"""

import os
import signal
import subprocess
import sys
import threading

import psycopg
import pytest

import dicoogled
from conftest import ROOT, wait_until

#: How long a takeover may take in these tests: the survivor tries every LEASE_POLL_SECONDS.
TAKEOVER_DEADLINE = dicoogled.LEASE_POLL_SECONDS * 3 + 10

#: A node that takes a lease, says so in a file, and runs until it is killed.
LEASE_HOLDER = """
import pathlib, sys, time
sys.path.insert(0, {root!r})
import dicoogled
leases = dicoogled.Leases({url!r}, "holder")
assert leases.owns({name!r})
pathlib.Path({said!r}).write_text("owns")
time.sleep(600)
"""


@pytest.fixture
def nodes(postgres_url):
    """Factory: nodes(name) -> a Leases of the tests' database, closed at the end."""
    made = []

    def node(name):
        made.append(dicoogled.Leases(postgres_url, name))
        return made[-1]

    yield node
    for leases in made:
        leases.close()


def test_one_node_owns_a_lease_and_another_takes_it_when_it_is_closed(nodes):
    first, second = nodes("first"), nodes("second")
    assert first.owns("stable studies")
    assert not second.owns("stable studies")
    assert first.owns("stable studies")  # asked again, still the owner
    assert second.owns("webhook deliveries")  # another name is another lease
    assert not first.owns("webhook deliveries")
    first.close()
    assert not first.owns("stable studies")
    wait_until(lambda: second.owns("stable studies"), timeout=TAKEOVER_DEADLINE, message="the second node to take over")


def test_a_released_lease_is_free_for_another_node(nodes):
    first, second = nodes("first"), nodes("second")
    assert first.owns("watch /srv/incoming")
    assert not second.owns("watch /srv/incoming")
    first.release("watch /srv/incoming")
    assert second.owns("watch /srv/incoming")
    assert not first.owns("watch /srv/incoming")


def test_a_killed_owner_is_taken_over(nodes, postgres_url, tmp_path):
    """SIGKILL leaves no chance to release anything: the server ends the dead node's session,
    and with it its advisory lock; the survivor, trying again, takes the work over."""
    said = tmp_path / "holder-owns"
    code = LEASE_HOLDER.format(root=str(ROOT), url=postgres_url, name="retention", said=str(said))
    holder = subprocess.Popen([sys.executable, "-c", code])
    try:
        wait_until(lambda: said.exists() or holder.poll() is not None, message="the child node to take the lease")
        assert said.exists(), f"the child node exited with {holder.returncode}"
        survivor = nodes("survivor")
        assert not survivor.owns("retention")  # the same name is the same lock in another process
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        stop = threading.Event()
        timer = threading.Timer(TAKEOVER_DEADLINE, stop.set)
        timer.start()
        try:
            assert survivor.wait_to_own("retention", stop), "not taken over within the deadline"
        finally:
            timer.cancel()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_node_that_lost_its_connection_stops_claiming(nodes, postgres_url):
    """The owner's session is ended by the server (as when its network fails): asked again, it
    says it owns nothing, and the other node takes the lease."""
    owner, other = nodes("owner"), nodes("other")
    assert owner.owns("reconcile storage")
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        ended = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                              ("dicoogled owner",)).fetchall()
    assert ended == [(True,)]
    assert not owner.owns("reconcile storage")
    wait_until(lambda: other.owns("reconcile storage"), timeout=TAKEOVER_DEADLINE, message="the other node to take over")
    assert not owner.owns("reconcile storage")  # connected again, it finds the lease taken


def test_lease_keys_are_stable_and_namespaced():
    """The key is a function of the name alone (the child process above relies on it too)."""
    assert dicoogled.lease_key("retention") == dicoogled.lease_key("retention")
    assert dicoogled.lease_key("retention") != dicoogled.lease_key("stable studies")
    assert -2**31 <= dicoogled.lease_key("watch /srv/incoming") < 2**31


def test_with_the_sqlite_index_the_one_node_owns_everything():
    one, another = dicoogled.Leases(), dicoogled.Leases("")
    assert one.owns("stable studies") and another.owns("stable studies")
    assert one.wait_to_own("retention", threading.Event())
    one.release("retention")
    one.close()
    assert another.owns("retention")
