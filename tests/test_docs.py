"""Meta-tests that keep the docs honest: README.md and docs/ against the real daemon.

- every route of /openapi.json is mentioned in README.md or docs/, and docs/rest-api.md lists
  each with the access level the daemon declares;
- every setting of the embedded defaults has a comment, conf/dicoogled.ini holds the same keys
  and defaults, and every ini example in the docs loads as written;
- the README's query-language examples find what they say, its syntax error is the daemon's;
- the README's curl examples (REST API, DICOMweb) run, unchanged but for the address and two
  paths, against a daemon holding generated studies;
- the README's two commands exist, and CI runs the second;
- every command in README.md, docs/ and the course names the virtualenv (`.venv/bin/...`) or is
  a make target, so it works as written after `make run`; the README points to the course first.

Every plugin hook in docs/plugins.md, and the table of the `dicoogle` API in both languages, is
checked by tests/test_plugins.py (test_every_hook_and_orthanc_name_is_documented,
test_the_api_table_in_the_docs_is_the_one_the_lua_bridge_reads), not here.
"""

import base64
import configparser
import json
import pathlib
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pydicom
import pytest

import studygen
from conftest import ROOT, RunningDaemon, index_flags

sys.path.insert(0, str(ROOT))
import dicoogled  # noqa: E402

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
#: The README's examples use these; the tests put real ones in their place.
EXAMPLE_ADDRESS = "http://localhost:8080"
EXAMPLE_FOLDER = "/srv/dicom/old-studies"


# ---- reading markdown ---------------------------------------------------------------------------


def section(text: str, title: str) -> str:
    """The text of the '## title' section, its ### subsections included."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def table_rows(text: str) -> list[list[str]]:
    """Cells of the markdown table rows in text (header and separator rows left out); an
    escaped \\| stays inside its cell, as a plain |."""
    def separator(line):
        return bool(re.fullmatch(r"\|[-| :]+\|", line.strip()))

    rows, lines = [], text.splitlines() + [""]
    for line, following in zip(lines, lines[1:]):
        if line.startswith("|") and not separator(line) and not separator(following):  # not a header
            rows.append([c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


# ---- the daemon the examples run against --------------------------------------------------------


class Archive:
    """A daemon with studygen's studies in the index (every name of studygen.NAMES, CT and MR),
    started the way the README says: no DICOOGLED_ADMIN_PASSWORD, so data/admin-password.txt."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        studygen.generate(root / "gen", patients=len(studygen.NAMES), studies=2, series=2, instances=3, modality="mixed")
        subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "index", "--data-dir", str(root / "data"),
                        *index_flags(root / "data"), str(root / "gen")],
                       check=True, capture_output=True, timeout=300)
        self.daemon = RunningDaemon(root / "data").start()
        self.url = f"http://127.0.0.1:{self.daemon.http_port}"
        self.password = (root / "data" / "admin-password.txt").read_text().strip()
        # What the shell examples use besides the archive: a file to send, a folder to index.
        pydicom.dcmwrite(root / "image.dcm", studygen.make_instance(0, 0, 0, 0, seed=7), enforce_file_format=True)
        studygen.generate(root / "old-studies", patients=1, studies=1, series=1, instances=4, seed=3)

    def get(self, path: str, **params):
        """(status, decoded JSON) of a GET as admin, with HTTP Basic."""
        request = urllib.request.Request(f"{self.url}{path}?{urllib.parse.urlencode(params, doseq=True)}")
        request.add_header("Authorization", "Basic " + base64.b64encode(f"admin:{self.password}".encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    def search(self, query: str):
        return self.get("/search", query=query, field=["PatientName"], psize="10000")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    archive = Archive(tmp_path_factory.mktemp("docs"))
    yield archive
    archive.daemon.stop()


@pytest.fixture(scope="module")
def openapi(archive) -> dict:
    with urllib.request.urlopen(f"{archive.url}/openapi.json", timeout=30) as response:
        return json.load(response)


def served_routes(openapi: dict) -> dict[tuple[str, str], str]:
    """(METHOD, path) -> x-access, for every operation of the document."""
    return {(method.upper(), path): operation["x-access"]
            for path, operations in openapi["paths"].items() for method, operation in operations.items()}


# ---- routes -------------------------------------------------------------------------------------


def loose_path(path: str) -> str:
    """A path with its parameters made alike: /user/<username>, /user/{name} and /user/NAME."""
    path = re.sub(r"\{[^}/]*\}|<[^>/]*>", "{}", path)
    return "/".join("{}" if re.fullmatch(r"[A-Z][A-Z_]*", part) else part for part in path.split("/"))


def documented_routes() -> set[tuple[str, str]]:
    """(METHOD, loose path) for every method word and path on the same line of the docs."""
    found = set()
    for document in [README, *DOCS]:
        for line in document.read_text(encoding="utf-8").splitlines():
            methods = re.findall(rf"\b({'|'.join(METHODS)})\b", line)
            paths = [p.rstrip(".,:;") for p in re.findall(r"(?<![\w.:/$}])/[\w.\-/{}<>:]*", line)]
            found |= {(method, loose_path(path)) for method in methods for path in paths}
    return found


def test_every_route_is_documented(openapi):
    documented = documented_routes()
    missing = sorted(f"{method} {path}" for method, path in served_routes(openapi)
                     if (method, loose_path(path)) not in documented)
    assert not missing, "routes in /openapi.json that README.md and docs/ never mention:\n" + "\n".join(missing)


def test_rest_api_reference_lists_every_route_with_its_access(openapi):
    """docs/rest-api.md is the whole list: the same routes as /openapi.json, the same access."""
    listed = {}
    for cells in table_rows((ROOT / "docs" / "rest-api.md").read_text(encoding="utf-8")):
        methods, path, access = cells[0], cells[1].strip("`"), cells[2]
        for method in re.split(r",\s*", methods):
            assert (method, path) not in listed, f"{method} {path} is listed twice"
            listed[method, path] = access
    served = served_routes(openapi)
    # Rows to paste, made from the daemon's own description, for whatever is missing.
    missing = [f"| {m} | `{p}` | {a} | {openapi['paths'][p][m.lower()]['summary']} |"
               for (m, p), a in served.items() if (m, p) not in listed]
    assert not missing, "docs/rest-api.md lacks these routes:\n" + "\n".join(missing)
    gone = sorted(f"{m} {p}" for m, p in listed if (m, p) not in served)
    assert not gone, "docs/rest-api.md lists routes the daemon does not serve:\n" + "\n".join(gone)
    wrong = sorted(f"{m} {p}: documented {listed[m, p]}, served {a}" for (m, p), a in served.items() if listed[m, p] != a)
    assert not wrong, "access levels in docs/rest-api.md differ from /openapi.json:\n" + "\n".join(wrong)


# ---- settings -----------------------------------------------------------------------------------


def setting_lines(text: str):
    """(section, key, documented) for every setting of an INI text: documented when a comment
    line stands above it, over the settings of its group, with no blank line between."""
    section_name, lines = None, text.splitlines()
    for number, line in enumerate(lines):
        if re.match(r"^\[[^\]]+\]", line):
            section_name = line.strip()[1:-1]
        elif line and not line[0] in "#; \t" and "=" in line:
            above = number - 1
            while above >= 0 and lines[above] and lines[above][0] not in "#;[" and "=" in lines[above]:
                above -= 1  # a setting of the same group
            documented = above >= 0 and lines[above][:1] in ("#", ";")
            yield section_name, line.split("=")[0].strip(), documented


@pytest.mark.parametrize("section_name, key, documented", [
    pytest.param(*entry, id=f"{entry[0]}.{entry[1]}") for entry in setting_lines(dicoogled.DEFAULT_CONFIG)])
def test_every_default_setting_has_a_comment(section_name, key, documented):
    assert documented, f"[{section_name}] {key} in DEFAULT_CONFIG has no comment above it"


def test_every_default_setting_is_read_by_one_entry_of_the_key_table():
    """Config.load reads the plain settings through CONFIG_KEYS: each key of the embedded
    defaults is there once (or is one of the few Config.load reads itself), and nothing else is."""
    read_by_load_itself = {("plugins", "folders")}
    plain = [(section, key) for section, key, _ in setting_lines(dicoogled.DEFAULT_CONFIG)
             if section not in dicoogled.WHOLE_SECTIONS and not section.startswith("plugin.")]
    table = [(section, key) for section, key, _ in dicoogled.CONFIG_KEYS.values()]
    assert sorted(table) == sorted(set(table)) == sorted(set(plain) - read_by_load_itself)
    assert dicoogled.LIVE_SETTINGS <= set(dicoogled.CONFIG_KEYS)


def test_conf_file_holds_the_embedded_keys_and_defaults():
    """conf/dicoogled.ini is what the README points users to (tests/test_cli.py also compares
    the Config both make)."""
    parsers = [configparser.ConfigParser(interpolation=None) for _ in range(2)]
    for parser in parsers:
        parser.optionxform = str
    parsers[0].read_string(dicoogled.DEFAULT_CONFIG)
    parsers[1].read(ROOT / "conf" / "dicoogled.ini", encoding="utf-8")
    embedded, documented = ({s: dict(p[s]) for s in p.sections()} for p in parsers)
    assert documented == embedded
    assert [entry[:2] for entry in setting_lines((ROOT / "conf" / "dicoogled.ini").read_text())] == \
        [entry[:2] for entry in setting_lines(dicoogled.DEFAULT_CONFIG)]  # in the same order too


@pytest.mark.parametrize("document", [README, *DOCS], ids=lambda p: p.name)
def test_ini_examples_load_as_written(document, tmp_path):
    """Each ```ini block of the docs is a configuration file the daemon accepts, with no
    comment after a value (configparser would keep it as part of the value)."""
    for number, block in enumerate(code_blocks(document.read_text(encoding="utf-8"), "ini")):
        for line in block.splitlines():
            if "=" in line and not line.startswith(("#", ";")):
                assert not re.search(r"\s[;#]", line.split("=", 1)[1]), f"{document.name}: a comment after a value: {line!r}"
        path = tmp_path / f"example{number}.ini"
        path.write_text(block, encoding="utf-8")
        dicoogled.Config.load(path, data_dir=tmp_path / "data")  # raises on a setting that cannot work


# ---- the two commands ---------------------------------------------------------------------------


def test_every_command_and_flag_is_in_the_readme():
    """The README's Command line section names every subcommand and option of `dicoogled`."""
    text = section(README.read_text(encoding="utf-8"), "Command line")
    commands = next(a for a in dicoogled._argument_parser()._actions if a.dest == "command").choices
    missing = [f"dicoogled {name}" for name in commands if f"dicoogled {name}" not in text and f"[{name}]" not in text]
    for name, parser in commands.items():
        missing += [f"dicoogled {name} {option}" for action in parser._actions for option in action.option_strings
                    if option.startswith("--") and option != "--help" and not re.search(rf"{option}\b", text)]
    assert not missing, "not in the README's Command line section:\n" + "\n".join(missing)


def test_readme_two_commands_exist_and_ci_runs_the_tests():
    commands = code_blocks(section(README.read_text(encoding="utf-8"), "Two commands"), "sh")
    lines = [line.split("#")[0].strip() for block in commands for line in block.splitlines()]
    assert {"make run", "make test"} <= set(lines)
    targets = re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M)
    assert {"run", "test"} <= set(targets)
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.lstrip().startswith("#")]
    assert any(line == "make test" or line.startswith("make test ") for line in ci), ".ci/run does not call make test"


# ---- the query language -------------------------------------------------------------------------


def query_language() -> str:
    return section(README.read_text(encoding="utf-8"), "Query language")


def test_query_examples_find_something(archive):
    queries = [re.fullmatch(r"`(.+)`", cells[0]).group(1) for cells in table_rows(query_language())]
    assert len(queries) > 20
    failures = []
    for query in queries:
        status, answer = archive.search(query)
        if status != 200 or not answer["numResults"]:
            failures.append(f"{query}: {status} {answer.get('error') or 'nothing found'}")
    assert not failures, "\n".join(failures)


def test_query_rules_say_what_is_found(archive):
    """The prose: "`q` finds `NAME`", "`q1` and `q2` find `NAME`", "... but `q` does not",
    "`q` finds nothing"."""
    prose = "\n".join(line for line in query_language().splitlines() if not line.startswith("|"))
    prose = re.sub(r"^```.*?^```", "", prose, flags=re.M | re.S).replace("\n  ", " ")
    checked = 0

    def names(query):
        status, answer = archive.search(query)
        assert status == 200, (query, answer)
        return {result["fields"].get("PatientName") for result in answer["results"]}

    for match in re.finditer(r"`([^`]+)`(?: and `([^`]+)`)? finds? `([^`]+)`(?: but `([^`]+)` does not)?", prose):
        found, name, not_found = [q for q in match.group(1, 2) if q], match.group(3), match.group(4)
        for query in found:
            assert name in names(query), f"{query} does not find {name}"
            checked += 1
        if not_found:
            assert name not in names(not_found), f"{not_found} finds {name}"
            checked += 1
    for query in re.findall(r"`([^`]+)` finds nothing", prose):
        assert names(query) == set(), f"{query} finds something"
        checked += 1
    assert checked >= 8


def test_syntax_error_example_is_the_daemons(archive):
    block, = code_blocks(query_language(), "console")
    query = re.search(r"--data-urlencode 'query=(.*)'", block).group(1)
    shown = json.loads(block.strip().splitlines()[-1])
    assert archive.search(query) == (400, shown)


# ---- the curl examples --------------------------------------------------------------------------


def shell_prelude() -> str:
    """Make every curl of an example fail, and the script stop, on an HTTP error (showing the
    error's body where curl can: --fail-with-body came in curl 7.76)."""
    version = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split()[1]
    fail = "--fail-with-body" if tuple(int(n) for n in re.findall(r"\d+", version)[:2]) >= (7, 76) else "--fail"
    return f'set -euo pipefail\ncurl() {{ command curl {fail} "$@"; }}\n'


@pytest.mark.skipif(not shutil.which("curl") or not shutil.which("bash"), reason="needs curl and bash")
@pytest.mark.parametrize("title", ["REST API", "DICOMweb"])
def test_shell_examples_run(archive, title):
    """The ```sh blocks of a README section, run in order as one script from the folder that
    holds data/, as a user would after `make run`."""
    blocks = code_blocks(section(README.read_text(encoding="utf-8"), title), "sh")
    assert blocks, f"no sh examples under {title}"
    script = "\n".join(blocks)
    assert EXAMPLE_ADDRESS in script
    script = script.replace(EXAMPLE_ADDRESS, archive.url).replace(EXAMPLE_FOLDER, str(archive.root / "old-studies"))
    work = archive.root / title.replace(" ", "-")
    work.mkdir()
    (work / "data").symlink_to(archive.root / "data")
    (work / ".venv").symlink_to(pathlib.Path(sys.prefix))  # the examples call .venv/bin/python, as after make run
    shutil.copy(archive.root / "image.dcm", work / "image.dcm")
    result = subprocess.run(["bash", "-c", shell_prelude() + script], cwd=work, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the {title} examples failed:\n{result.stderr[-3000:]}\n{result.stdout[-3000:]}"
    outputs = {path.name: path.read_bytes() for path in work.iterdir() if path.is_file()}
    if title == "REST API":
        assert outputs["thumbnail.png"].startswith(b"\x89PNG")
        assert any(data[128:132] == b"DICM" for name, data in outputs.items() if name.endswith(".dcm") and name != "image.dcm")
        assert "1.0 4 indexed 0 errors" in result.stdout  # the task's last progress line
    else:
        assert outputs["instance.jpg"].startswith(b"\xff\xd8") and outputs["instance.png"].startswith(b"\x89PNG")
        assert outputs["instance.dcm"][128:132] == b"DICM"
        assert b"application/dicom" in outputs["study.multipart"][:400]
        assert '"00081199"' in result.stdout and '"00081198"' not in result.stdout  # STOW-RS stored it


# ---- commands work as written from a fresh clone ------------------------------------------------

#: What only works with the virtualenv activated (or not at all on a fresh machine): a bare
#: python/pip/pytest running the project's files, or the `dicoogled` command without its path.
BARE_COMMAND = re.compile(r"(?<![\w./-])(?:python3?\s+(?:-m\s+pytest\b|dicoogled\.py|tests/|bench/)|pip3?\s+install|(?<!-m )pytest\s"
                          r"|dicoogled\s+(?:serve|index|reindex|check|retention|install-viewer|sample-data|new-plugin)\b)")


def commands_in(text: str):
    """(where, command) for every line of a shell block (```sh, ```console, ```bash) and every
    inline code span of the prose."""
    for block in re.findall(r"^```(?:sh|bash|console)[^\n]*\n(.*?)^```", text, re.M | re.S):
        for line in block.splitlines():
            yield "block", line.split("#")[0] if not line.lstrip().startswith("#") else ""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    for span in re.findall(r"`([^`\n]+)`", prose):
        yield "inline", span


@pytest.mark.parametrize("document", [README, *DOCS, *sorted((ROOT / "docs" / "learn").glob("*.md"))],
                         ids=lambda p: p.name)
def test_commands_name_the_virtualenv(document):
    """Commands say `.venv/bin/python dicoogled.py`, `.venv/bin/pip`, or a make target: after
    `make run` they work as written, with nothing activated."""
    bare = [f"{where}: {command.strip()}" for where, command in commands_in(document.read_text(encoding="utf-8"))
            if BARE_COMMAND.search(command)]
    assert not bare, f"{document.name} has commands that need an activated virtualenv:\n" + "\n".join(bare)


def test_the_readme_points_newcomers_to_the_course_first():
    text = README.read_text(encoding="utf-8")
    assert text.index("(docs/learn/README.md)") < text.index("## ")
