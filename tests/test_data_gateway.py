"""One way to the data: only the Index speaks SQL to the index database.

dicoogled.py is read as text and walked banner section by banner section: a call of execute or
executemany, or a string holding SQL, may appear only in the sections allowed to speak SQL. The
Index is the index database's one gateway (so a second engine answers every query alike); the
Users and sessions, Audit log and De-identification sections keep owner-only SQLite files of
their own and speak to them themselves; the Databases section is where connections are made."""

import ast
import re

from conftest import ROOT

ALLOWED = ("Databases", "Index", "Users and sessions", "Audit log", "De-identification")

#: SQL as the file writes it: upper-case keywords in the order a statement has them.
SQL = re.compile(r"\bSELECT\b[\s\S]*\bFROM\b|\bINSERT\s+(?:OR\s+\w+\s+)?INTO\b|\bUPDATE\s+\w+\s+SET\b|\bDELETE\s+FROM\b"
                 r"|\b(?:CREATE|ALTER|DROP)\s+(?:VIRTUAL\s+)?(?:TABLE|INDEX|TRIGGER)\b|\bPRAGMA\s+\w+|\bWITH\s+\w+\s+AS\b")
#: Calls named execute that are not SQL: lupa's LuaRuntime.execute runs Lua.
NOT_SQL_RECEIVERS = {"self.runtime"}


def sections(source: str) -> list[tuple[str, int]]:
    """(title, first line) of every banner section, in order."""
    lines = source.splitlines()
    found = []
    for number, line in enumerate(lines[:-1], start=1):
        if line.startswith("# ===") and re.match(r"# [A-Z]", lines[number]):
            found.append((lines[number][2:], number))
    return found


def section_of(line: int, banners: list[tuple[str, int]]) -> str:
    title = "(before any section)"
    for name, first in banners:
        if first > line:
            break
        title = name
    return title


def string_text(node) -> str | None:
    """The text of a string literal; an f-string's literal parts with a placeholder between."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(part.value if isinstance(part, ast.Constant) else "{}" for part in node.values)
    return None


def sql_outside_gateways(source: str) -> list[str]:
    """'section, line: what' for every SQL statement or execute call outside ALLOWED."""
    banners = sections(source)
    tree = ast.parse(source)
    formatted = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    found = []
    for node in ast.walk(tree):
        what = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("execute", "executemany"):
            if ast.unparse(node.func.value) not in NOT_SQL_RECEIVERS:
                what = f"{ast.unparse(node.func)}()"
        elif id(node) not in formatted:
            text = string_text(node)
            if text is not None and SQL.search(text):
                what = repr(text[:60])
        if what:
            section = section_of(node.lineno, banners)
            if not section.startswith(ALLOWED):
                found.append(f"{section}, line {node.lineno}: {what}")
    return found


def test_only_the_gateways_speak_sql():
    source = (ROOT / "dicoogled.py").read_text(encoding="utf-8")
    assert len(sections(source)) > 20
    assert sql_outside_gateways(source) == []


def test_the_check_finds_sql_where_it_does_not_belong():
    """The check fails on an execute call, an SQL string and an f-string of SQL in another
    section, and lets Lua's runtime.execute and SQL in an allowed section be."""
    banner = "# " + "=" * 90
    source = "\n".join([
        banner, "# Index: the gateway", banner,
        "def counted(connection):",
        "    return connection.execute('SELECT count(*) FROM instances')",
        banner, "# Query: not a gateway", banner,
        "def found(index, table):",
        "    index.reader.execute(sql)",
        "    text = 'UPDATE studies SET stable_announced = 1'",
        "    return f'SELECT id FROM {table} WHERE x = ?'",
        banner, "# Plugins: Lua", banner,
        "def run(self):",
        "    self.runtime.execute('return 1')",
        "    log.info('selected from the list')",
    ])
    found = sql_outside_gateways(source)
    assert [where.split(": ")[1] for where in found] == [
        "not a gateway, line 10", "not a gateway, line 11", "not a gateway, line 12"], found
