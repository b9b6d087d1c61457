"""Sessions and logins against the real daemon: a token lives only as long as the user, the
password and the rights it was issued for; idle expiry is exact; failed logins are throttled per
(client address, username), so one person's typos lock out no one else, and counted in the users'
database, so a restart (or another node) counts them too.

A second client address is a second loopback address (127.0.0.2): Linux routes all of
127.0.0.0/8 to lo, and the daemon sees the socket's peer address (X-Forwarded-For is not trusted).
"""

import base64
import secrets
import time

import apsw
import pytest

import dicoogled
from conftest import wait_until
from restclient import ADMIN_ENV, ADMIN_PASSWORD, Client, admin_client, base_url

OTHER_ADDRESS = "127.0.0.2"


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def create_user(admin: Client, username: str, password: str, is_admin=False):
    response = admin.post("/user", data={"username": username, "password": password, "admin": str(is_admin).lower()})
    assert response.json() == {"success": True}, response


def logged_in(daemon, username: str, password: str, source_address=None) -> Client:
    client = Client(base_url(daemon), source_address=source_address)
    client.login(username, password)
    return client


# ---- tokens follow the user they were issued for -----------------------------------------------


def test_deleting_a_user_ends_its_sessions_even_when_the_name_comes_back(start_daemon):
    daemon = start_daemon(env=ADMIN_ENV)
    admin = admin_client(daemon)
    create_user(admin, "bob", "bob-pw-1")
    bob = logged_in(daemon, "bob", "bob-pw-1")
    assert bob.get("/login").status == 200
    assert admin.request("DELETE", "/user/bob").json() == {"success": True}
    assert bob.get("/login").status == 401
    assert bob.get("/search", query="*:*").status == 401
    # An administrator re-creates the name, as an administrator this time: the old token is no key to it.
    create_user(admin, "bob", "bob-pw-2", is_admin=True)
    assert bob.get("/login").status == 401
    assert bob.get("/user").status == 401
    assert bob.request("GET", "/user", auth=basic("bob", "bob-pw-1")).status == 401
    assert logged_in(daemon, "bob", "bob-pw-2").get("/user").status == 200


def test_a_password_change_ends_every_other_session_of_that_user(start_daemon):
    daemon = start_daemon(env=ADMIN_ENV)
    admin = admin_client(daemon)
    create_user(admin, "bob", "bob-pw-1")
    laptop, phone = logged_in(daemon, "bob", "bob-pw-1"), logged_in(daemon, "bob", "bob-pw-1")
    script = Client(base_url(daemon))
    assert script.request("GET", "/login", auth=basic("bob", "bob-pw-1")).status == 200  # remembered a while
    # bob changes his own password on the laptop: the laptop stays logged in, nothing else does.
    assert laptop.post("/user/bob/password", data={"password": "bob-pw-2"}).json() == {"success": True}
    assert laptop.get("/login").json()["user"] == "bob"
    assert phone.get("/login").status == 401
    assert script.request("GET", "/login", auth=basic("bob", "bob-pw-1")).status == 401
    assert script.request("GET", "/login", auth=basic("bob", "bob-pw-2")).status == 200
    # An administrator resets it: every session of bob ends, the administrator's own goes on.
    assert admin.post("/user/bob/password", data={"password": "bob-pw-3"}).json() == {"success": True}
    assert laptop.get("/login").status == 401
    assert admin.get("/login").json()["user"] == "admin"
    assert logged_in(daemon, "bob", "bob-pw-3").get("/login").status == 200


def test_a_change_of_rights_ends_the_users_sessions(start_daemon):
    daemon = start_daemon(env=ADMIN_ENV)
    admin = admin_client(daemon)
    create_user(admin, "carol", "carol-pw-1", is_admin=True)
    carol = logged_in(daemon, "carol", "carol-pw-1")
    assert carol.get("/user").status == 200
    assert carol.request("GET", "/user", auth=basic("carol", "carol-pw-1")).status == 200
    response = admin.post("/user/carol", data={"admin": "false"})
    assert response.json() == {"success": True}, response
    assert carol.get("/user").status == 401
    assert carol.get("/login").status == 401
    assert carol.request("GET", "/user", auth=basic("carol", "carol-pw-1")).status == 403
    again = logged_in(daemon, "carol", "carol-pw-1")
    assert again.get("/login").json() == {"user": "carol", "admin": False, "roles": []}
    assert again.get("/user").status == 403
    listed = {u["username"]: u for u in admin.get("/user").json()["users"]}
    assert listed["carol"]["admin"] is False
    # Roles too: they decide which web UI plugins a user sees.
    assert admin.post("/user/carol", data={"roles": "radiology, teaching"}).json() == {"success": True}
    assert again.get("/login").status == 401
    latest = logged_in(daemon, "carol", "carol-pw-1")
    assert latest.get("/login").json()["roles"] == ["radiology", "teaching"]
    # Rights set to what they are change nothing, so no session ends.
    assert admin.post("/user/carol", data={"admin": "false", "roles": "radiology,teaching"}).json() == {"success": True}
    assert latest.get("/login").status == 200
    # The last administrator keeps its rights; an unknown user is a 404.
    response = admin.post("/user/admin", data={"admin": "false"})
    assert response.status == 409 and "administrator" in response.json()["error"]
    assert admin.get("/user").status == 200
    assert admin.post("/user/nobody-here", data={"admin": "true"}).status == 404
    assert admin.post("/user/carol", data={"admin": "maybe"}).status == 400
    assert again.post("/user/carol", data={"admin": "true"}).status in (401, 403)


def test_an_idle_session_expires_exactly_when_its_idle_time_is_up(start_daemon):
    idle = 4.5  # seconds: session_idle_minutes takes fractions
    daemon = start_daemon(f"[http]\nsession_idle_minutes = {idle / 60}\n", env=ADMIN_ENV)
    client = Client(base_url(daemon))
    started = time.monotonic()
    client.login("admin", ADMIN_PASSWORD)
    # Used every second for longer than the idle time: every use counts, so it stays valid.
    last_answer = time.monotonic()
    while last_answer - started < 2 * idle:
        sent = time.monotonic()
        assert client.get("/login").status == 200, f"expired {sent - last_answer:.2f} s after its last use"
        last_answer = time.monotonic()
        time.sleep(max(0.0, sent + 1.0 - time.monotonic()))
    # The last use was no later than last_answer: once idle seconds have passed since, it is gone.
    # (A request is itself a use, so the wait is for the deadline, not a poll.)
    time.sleep(max(0.0, last_answer + idle + 0.1 - time.monotonic()))
    assert client.get("/login").status == 401
    assert client.get("/search", query="*:*").status == 401


#: users.sqlite as older versions made it: no credentials stamps, tokens kept as they are.
OLD_USERS_SCHEMA = """
CREATE TABLE users (
    username TEXT PRIMARY KEY, password_hash BLOB NOT NULL, salt BLOB NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0, roles TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE sessions (
    token TEXT PRIMARY KEY, username TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    created REAL NOT NULL, last_used REAL NOT NULL
);
CREATE TABLE presets (
    username TEXT NOT NULL, name TEXT NOT NULL, fields TEXT NOT NULL, PRIMARY KEY (username, name)
);
"""


@pytest.mark.sqlite_only("writes users.sqlite as older versions made it")
def test_an_older_users_database_keeps_its_users_and_retires_its_tokens(start_daemon, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db = apsw.Connection(str(data_dir / "users.sqlite"))
    db.execute(OLD_USERS_SCHEMA)
    salt = secrets.token_bytes(16)
    db.execute("INSERT INTO users VALUES ('admin', ?, ?, 1, '[]')", (dicoogled._hash_password(ADMIN_PASSWORD, salt), salt))
    db.execute("INSERT INTO sessions VALUES ('token-kept-in-clear', 'admin', ?, ?)", (time.time(), time.time()))
    db.execute("INSERT INTO presets VALUES ('admin', 'mine', '[\"PatientName\"]')")
    db.close()
    daemon = start_daemon()
    # The token stood in the file as it is, readable by anyone who had a copy: it no longer opens anything.
    assert Client(base_url(daemon), token="token-kept-in-clear").get("/login").status == 401
    admin = admin_client(daemon)
    assert admin.get("/login").json() == {"user": "admin", "admin": True, "roles": []}
    assert admin.get("/presets/admin").json() == [{"name": "mine", "fields": ["PatientName"]}]
    assert "sessions from an older version ended" in daemon.log


# ---- failed logins -----------------------------------------------------------------------------


def test_failed_logins_lock_out_only_that_user_at_that_address(start_daemon):
    daemon = start_daemon(env=ADMIN_ENV)
    create_user(admin_client(daemon), "bob", "bob-pw-1")
    here, elsewhere = Client(base_url(daemon)), Client(base_url(daemon), source_address=OTHER_ADDRESS)
    assert elsewhere.request("GET", "/health").status == 200  # the second address reaches the daemon
    for i in range(5):
        response = here.request("POST", "/login", data={"username": "admin", "password": f"wrong{i}"}, auth=None)
        assert response.status == 401
    # A colleague behind the same address (NAT) logs in as someone else, by form and by Basic.
    assert here.request("POST", "/login", data={"username": "bob", "password": "bob-pw-1"}, auth=None).status == 200
    assert here.request("GET", "/login", auth=basic("bob", "bob-pw-1")).status == 200
    # The locked pair is refused, even with the right password, and told when to try again.
    refused = here.request("POST", "/login", data={"username": "admin", "password": ADMIN_PASSWORD}, auth=None)
    assert refused.status == 429 and "admin" in refused.json()["error"]
    assert 0 < int(refused.headers["Retry-After"]) <= 300
    assert here.request("GET", "/login", auth=basic("admin", ADMIN_PASSWORD)).status == 429
    # The admin, from another machine, with the right password.
    assert logged_in(daemon, "admin", ADMIN_PASSWORD, source_address=OTHER_ADDRESS).get("/user").status == 200
    # A forged X-Forwarded-For does not make another client of the locked one.
    forged = here.request("POST", "/login", data={"username": "admin", "password": ADMIN_PASSWORD},
                          headers={"X-Forwarded-For": "10.1.2.3"}, auth=None)
    assert forged.status == 429
    wait_until(lambda: "login as 'admin' from 127.0.0.1 refused" in daemon.log, message="the refusal in the log")


def test_behind_a_trusted_proxy_failed_logins_count_per_client_it_names(start_daemon):
    # The daemon's peer 127.0.0.1 is the proxy; the clients are the addresses it appends.
    daemon = start_daemon(config_text="[http]\ntrusted_proxy = 127.0.0.1\n", env=ADMIN_ENV)
    proxy, other_peer = Client(base_url(daemon)), Client(base_url(daemon), source_address=OTHER_ADDRESS)

    def login(client, forwarded_for, password=ADMIN_PASSWORD):
        return client.request("POST", "/login", data={"username": "admin", "password": password},
                              headers={"X-Forwarded-For": forwarded_for}, auth=None).status

    for i in range(5):
        assert login(proxy, "10.1.2.3", f"wrong{i}") == 401
    assert login(proxy, "10.1.2.3") == 429, "the client the proxy named is locked out"
    assert login(proxy, "10.9.9.9") == 200, "another client behind the same proxy is not"
    # A client's own X-Forwarded-For comes first; the proxy appends the address it saw.
    assert login(proxy, "10.9.9.9, 10.1.2.3") == 429
    assert login(proxy, "10.1.2.3, 10.9.9.9") == 200
    # A peer that is not the proxy is taken as itself, whatever it forwards.
    assert login(other_peer, "10.1.2.3") == 200
    wait_until(lambda: "login as 'admin' from 10.1.2.3 refused" in daemon.log, message="the client named in the log")


@pytest.mark.parametrize("proxy", ["proxy.example.org", "10.0.0.0/8", "127.0.0.1 127.0.0.2"])
def test_a_trusted_proxy_is_one_address(tmp_path, proxy):
    path = tmp_path / "proxy.ini"
    path.write_text(f"[http]\ntrusted_proxy = {proxy}\n")
    with pytest.raises(ValueError, match="trusted_proxy"):
        dicoogled.Config.load(path, data_dir=tmp_path / "data")


def test_the_failed_login_table_is_bounded_and_forgets(tmp_path):
    users = dicoogled.Users(tmp_path / "users.sqlite")
    throttle = dicoogled.LoginThrottle(users.database, limit=3, window=1.0)
    for _ in range(3):
        throttle.failed("192.0.2.1", "admin")
    assert throttle.retry_after(throttle.recent_failures("192.0.2.1", "admin")) > 0
    assert throttle.recent_failures("192.0.2.1", "bob") == []
    assert throttle.recent_failures("192.0.2.2", "admin") == []
    # A success clears the pair, and no other.
    throttle.failed("192.0.2.3", "dave")
    throttle.succeeded("192.0.2.3", "dave")
    assert throttle.recent_failures("192.0.2.3", "dave") == []
    assert throttle.retry_after(throttle.recent_failures("192.0.2.1", "admin")) > 0
    # The window's end clears a pair; the next failure of anyone deletes what the window left,
    # so the table holds one window of failures however many names are sprayed.
    wait_until(lambda: throttle.recent_failures("192.0.2.1", "admin") == [], timeout=5, message="the window to pass")
    assert len(throttle) == 3
    throttle.failed("198.51.100.7", "someone")
    assert len(throttle) == 1
    # Kept in users.sqlite, so another process (a restart, another node) counts them too.
    users.close()
    again = dicoogled.Users(tmp_path / "users.sqlite")
    assert dicoogled.LoginThrottle(again.database, limit=1, window=60).recent_failures("198.51.100.7", "someone")
    again.close()

