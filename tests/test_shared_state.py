"""The state every node of a site shares when the index is in PostgreSQL: users, sessions,
presets, collections and share links, the audit log, the settings changed at run time.

Two objects on one real PostgreSQL database stand for two nodes: each has its own connections,
as two processes on two machines would, and nothing passes between them but the database.
"""

import threading
import time

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


# ---- the audit log -----------------------------------------------------------------------------


def test_two_nodes_write_one_audit_log(postgres_url):
    node1, node3 = dicoogled.AuditLog(postgres_url), dicoogled.AuditLog(postgres_url)
    started = time.time()
    try:
        for n in range(50):
            node1.record("search", user="alice", studies=[f"1.2.3.{n}"], count=1, address="10.0.0.1")
            node3.record("c-find", calling_aet="MODALITY", count=n, detail="STUDY")
        node3.record("view", user="bob", instances=["1.2.3.4.5", "1.2.3.4.6"])
        assert node1.flush() and node3.flush()
        entries, total = node1.entries(limit=None)
        assert total == len(entries) == 101
        assert len(node3.entries(action="search", limit=None)[0]) == 50
        assert [e.calling_aet for e in node1.entries(action="c-find", limit=None)[0]] == ["MODALITY"] * 50
        (view,), _ = node1.entries(user="bob")
        assert view.action == "view" and view.instances == ("1.2.3.4.5", "1.2.3.4.6")
        assert [e.id for e in node3.each_entry(page=7)] == [e.id for e in entries]  # newest first, paged
        assert len({e.id for e in entries}) == 101  # numbered by the database: no two nodes share a number
        page, _ = node3.entries(offset=100, limit=10)
        assert [e.id for e in page] == [entries[-1].id]
        # Times are kept to the fraction of a second (PostgreSQL's REAL would round them to minutes).
        assert started <= view.time <= time.time()
    finally:
        node1.close()
        node3.close()


def test_the_shared_audit_log_is_append_only_and_pruned_by_age(postgres_url):
    audit = dicoogled.AuditLog(postgres_url, retention_days=1)
    try:
        audit.record("login", user="alice")
        assert audit.flush()
        with psycopg.connect(postgres_url) as db:
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                db.execute("UPDATE dicoogled_audit.audit SET username = 'mallory'")
        assert audit.prune(now=time.time() + 2 * 86400) == 1
        assert audit.entries() == ([], 0)
    finally:
        audit.close()


# ---- settings changed at run time ----------------------------------------------------------------


def test_settings_saved_by_one_node_are_read_by_another(postgres_url, tmp_path):
    node1 = dicoogled.Config.load(data_dir=tmp_path / "node1", index_url=postgres_url)
    node1.changed(aet="SHARED", modalities={"WS1": ("10.0.0.9", 104)}).save_settings("aet", "modalities")
    dicoogled.save_settings(node1.settings_location, {"plugin.example": {"enabled": "false", "greeting": "hi"}})
    node3 = dicoogled.Config.load(data_dir=tmp_path / "node3", index_url=postgres_url)
    assert (node3.aet, node3.modalities) == ("SHARED", {"WS1": ("10.0.0.9", 104)})
    assert node3.plugin_settings["example"] == {"enabled": "false", "greeting": "hi"}
    assert not (tmp_path / "node1" / "settings.ini").exists()  # nothing of it stays on one node
    # [modalities] is replaced whole, as in settings.ini: a destination removed stays removed.
    node3.changed(modalities={"WS2": ("10.0.0.10", 104)}).save_settings("modalities")
    assert dicoogled.Config.load(data_dir=tmp_path / "node1", index_url=postgres_url).modalities == {
        "WS2": ("10.0.0.10", 104)}
    # The command line still wins over what the database says.
    assert dicoogled.Config.load(data_dir=tmp_path / "node1", index_url=postgres_url, aet="FLAG").aet == "FLAG"


def test_the_index_url_of_the_config_file_finds_the_shared_settings(postgres_url, tmp_path):
    config_file = tmp_path / "dicoogled.ini"
    config_file.write_text(f"[index]\nurl = {postgres_url}\n[storage]\ndata_dir = {tmp_path / 'data'}\n")
    dicoogled.Config.load(config_file).changed(thumbnail_size=128).save_settings("thumbnail_size")
    assert dicoogled.Config.load(config_file).thumbnail_size == 128
    assert dicoogled.Config.load(data_dir=tmp_path / "data").thumbnail_size == 64  # SQLite: settings.ini, untouched


def test_a_node_tells_from_one_read_that_another_saved_settings(postgres_url):
    node1, node3 = dicoogled.SharedSettings(postgres_url), dicoogled.SharedSettings(postgres_url)
    try:
        seen, values = node3.read()
        assert values == {} and node3.changes() == seen
        node1.save({"dicom": {"aet": "ONE"}})
        assert node3.changes() > seen
        assert node3.read()[1] == {"dicom": {"aet": "ONE"}}
    finally:
        node1.close()
        node3.close()
