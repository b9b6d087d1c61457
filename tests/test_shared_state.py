"""The state every node of a site shares when the index is in PostgreSQL: users, sessions,
presets, collections and share links, the audit log, the settings changed at run time.

Two objects on one real PostgreSQL database stand for two nodes: each has its own connections,
as two processes on two machines would, and nothing passes between them but the database.
"""

import threading

import psycopg
import pytest

import dicoogled


@pytest.fixture
def two_nodes_users(postgres_url):
    """The Users of two nodes sharing one PostgreSQL database."""
    first, second = dicoogled.Users(postgres_url), dicoogled.Users(postgres_url)
    yield first, second
    first.close()
    second.close()


# ---- users and sessions ------------------------------------------------------------------------


def test_a_user_created_on_one_node_logs_in_on_another(two_nodes_users):
    node1, node3 = two_nodes_users
    assert node1.create("alice", "alice-pw", roles=["radiology"])
    assert not node3.create("alice", "another-pw")  # one name, one user, whichever node asks
    assert node3.authenticate("alice", "alice-pw") == dicoogled.User("alice", False, ("radiology",))
    assert node3.authenticate("alice", "wrong") is None
    assert [user.username for user in node3.all()] == ["alice"]


def test_a_session_opened_on_one_node_works_on_another(two_nodes_users):
    node1, node3 = two_nodes_users
    node1.create("alice", "alice-pw")
    token = node1.start_session(node1.authenticate("alice", "alice-pw"))
    assert node3.session_user(token) == dicoogled.User("alice", False, ())
    assert node1.session_user(token) == dicoogled.User("alice", False, ())
    assert node3.end_session(token)
    assert node1.session_user(token) is None  # a logout on one node is a logout on all


def test_a_password_changed_on_one_node_ends_the_sessions_on_another(two_nodes_users):
    node1, node3 = two_nodes_users
    node1.create("alice", "alice-pw")
    token = node3.start_session(node3.authenticate("alice", "alice-pw"))
    assert node3.authenticate_basic("alice", "alice-pw")  # node 3 now remembers these credentials
    assert node1.set_password("alice", "new-pw")
    assert node3.session_user(token) is None
    assert node3.authenticate_basic("alice", "alice-pw") is None  # its memory of them is void too
    assert node3.authenticate("alice", "new-pw")


def test_rights_changed_or_a_user_deleted_on_one_node_end_its_sessions_on_another(two_nodes_users):
    node1, node3 = two_nodes_users
    node1.create("admin", "admin-pw", admin=True)
    node1.create("alice", "alice-pw")
    token = node3.start_session(node3.authenticate("alice", "alice-pw"))
    assert node1.set_rights("alice", roles=["teaching"])
    assert node3.session_user(token) is None
    token = node3.start_session(node3.authenticate("alice", "alice-pw"))
    assert node3.session_user(token) == dicoogled.User("alice", False, ("teaching",))
    assert node1.delete("alice")
    assert node3.session_user(token) is None
    assert node3.get("alice") is None


def test_the_last_administrator_stays_whichever_nodes_demote_at_once(two_nodes_users):
    node1, node3 = two_nodes_users
    node1.create("ann", "pw", admin=True)
    node1.create("bob", "pw", admin=True)
    outcomes = []

    def demote(users, name):
        try:
            outcomes.append(users.set_rights(name, admin=False))
        except ValueError as error:
            outcomes.append(str(error))

    threads = [threading.Thread(target=demote, args=(node1, "ann")), threading.Thread(target=demote, args=(node3, "bob"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes, key=str) == [True, "the last administrator keeps its rights"]
    assert sum(user.admin for user in node1.all()) == 1


def test_presets_collections_and_share_links_are_shared(two_nodes_users):
    node1, node3 = two_nodes_users
    node1.create("alice", "alice-pw")
    node1.save_preset("alice", "mine", ["PatientName", "Modality"])
    node3.save_preset("alice", "mine", ["Modality"])  # saved again, elsewhere: replaced
    assert node1.presets("alice") == [{"name": "mine", "fields": ["Modality"]}]
    assert node3.grant("teaching", "user", "alice", "read")
    assert node1.grant("teaching", "user", "alice", "write")
    assert node3.collections_of(node3.get("alice")) == {"teaching": "write"}
    link, token = node1.create_share("alice", label="teaching", uses_allowed=1)
    opened, session = node3.open_share(token)
    assert opened.id == link.id and session
    assert node1.share_of_session(session).id == link.id
    assert node1.open_share(token) == (opened, None)  # its one use was spent on node 3
    assert node1.revoke_share(link.id)
    assert node3.share_of_session(session) is None


def test_users_live_in_their_own_schema_of_a_versioned_database(postgres_url):
    dicoogled.Users(postgres_url).close()
    with psycopg.connect(postgres_url) as db:
        tables = {row[0] for row in db.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'dicoogled_users'")}
        assert {"users", "sessions", "presets", "collection_access", "share_links", "share_sessions",
                "schema_version"} <= tables
        assert db.execute("SELECT version FROM dicoogled_users.schema_version").fetchall() == [
            (dicoogled.USERS_SCHEMA_VERSION,)]
        db.execute("UPDATE dicoogled_users.schema_version SET version = 99")
    with pytest.raises(RuntimeError, match="newer dicoogled"):
        dicoogled.Users(postgres_url)


def test_nodes_starting_at_once_make_the_schema_once(postgres_url):
    made, failures = [], []

    def start():
        try:
            made.append(dicoogled.Users(postgres_url))
        except Exception as error:  # noqa: BLE001 - any failure fails the test below
            failures.append(error)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for users in made:
        users.close()
    assert failures == [] and len(made) == 4
