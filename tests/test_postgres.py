"""The PostgreSQL engine against a real server the tests start themselves (tests/pgserver.py)."""

import dicoogled


def test_a_postgresql_connection_is_spoken_to_as_an_sqlite_one(postgres_url):
    """? placeholders, a literal % or ? in SQL text, `with connection:` as a transaction that a
    raised error rolls back, and changes()."""
    connection = dicoogled.PostgresConnection.connect(postgres_url)
    connection.execute("CREATE TABLE t (id SERIAL PRIMARY KEY, name TEXT); CREATE INDEX t_name ON t(name)")
    with connection:
        connection.execute("INSERT INTO t (name) VALUES (?), (?)", ("a%b", "it's ?"))
    assert connection.changes() == 2
    assert connection.execute("SELECT name FROM t WHERE name LIKE 'a%' AND id > ?", (0,)).fetchall() == [("a%b",)]
    assert connection.execute("SELECT count(*) FROM t WHERE name = '?' OR name = ?", ("it's ?",)).fetchone()[0] == 1
    try:
        with connection:
            connection.execute("INSERT INTO t (name) VALUES (?)", ("rolled back",))
            raise KeyError
    except KeyError:
        pass
    assert connection.execute("SELECT count(*) FROM t").fetchone()[0] == 2
    connection.close()
