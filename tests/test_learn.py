"""The course runs: every runnable block of docs/learn/*.md, in order, against a real daemon.

The convention (docs/learn/README.md, "How the course is tested"): a fenced block whose info
string is `sh learn` runs in bash, `python learn` in the virtualenv's Python, from a copy of a
fresh clone (symbolic links to this one, .venv included) whose daemon keeps its data in data/;
`sh learn exit=N` expects exit status N. A `text learn-output` block right after one is what it
prints (stdout and stderr together), with placeholders: <UID>, <N>, <TEXT> (the rest of a line)
and a line `...` (any lines, none included). $DICOM_PORT and $HTTP_PORT are the daemon's ports.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, RunningDaemon

LEARN = ROOT / "docs" / "learn"
CHAPTERS = sorted(LEARN.glob("[0-9][0-9]-*.md"))
#: What the clone holds that the course uses; the copy links to them.
CLONE_ENTRIES = ("dicoogled.py", "www", "plugins", "conf", "docs", "README.md", "Makefile", "setup.cfg")
PLACEHOLDERS = {"<UID>": r"[0-9]+(?:\.[0-9]+)*", "<N>": r"-?[0-9]+(?:\.[0-9]+)?", "<TEXT>": r"[^\n]*"}
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)


def runnable_blocks(text: str):
    """(language, code, expected exit status, expected output or None) for each runnable block."""
    blocks = []
    for match in FENCE.finditer(text):
        info, body = match.group(1).split(), match.group(2)
        if info[:2] == ["text", "learn-output"]:
            if not blocks or blocks[-1][3] is not None:
                raise AssertionError(f"a learn-output block follows no runnable block:\n{body}")
            blocks[-1] = (*blocks[-1][:3], body)
        elif len(info) >= 2 and info[0] in ("sh", "python") and info[1] == "learn":
            options = dict(option.split("=", 1) for option in info[2:])
            blocks.append((info[0], body, int(options.get("exit", 0)), None))
    return blocks


def output_pattern(expected: str) -> re.Pattern:
    parts = []
    for line in expected.rstrip("\n").split("\n"):
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
            continue
        pattern = re.escape(line.rstrip())
        for placeholder, regex in PLACEHOLDERS.items():
            pattern = pattern.replace(re.escape(placeholder), regex)
        parts.append(pattern + r"\n")
    return re.compile("".join(parts))


def test_placeholders_match_what_they_say():
    pattern = output_pattern("stored <UID> at <N>\n...\n<TEXT>\n")
    assert pattern.fullmatch("stored 1.2.840.10008.1 at 12\nx\ny\nlast line\n")
    assert pattern.fullmatch("stored 1.2.3 at 4\nlast\n")
    assert not pattern.fullmatch("stored DOE at 4\nlast\n")
    assert runnable_blocks("```sh learn exit=1\nfalse\n```\n```text learn-output\nx\n```\n```sh\nnot run\n```\n") == [
        ("sh", "false\n", 1, "x\n")]


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A copy of a fresh clone and its running daemon, shared by the chapters in order."""
    clone = tmp_path_factory.mktemp("clone")
    for name in CLONE_ENTRIES:
        if name == "plugins":  # chapters 9 and 10 copy plugins in and out: the clone's own folder
            shutil.copytree(ROOT / name, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (clone / name).symlink_to(ROOT / name)
    (clone / ".venv").symlink_to(pathlib.Path(sys.prefix))
    # The daemon runs ROOT's dicoogled.py, whose plugins/ is ROOT's: point it at the clone's.
    daemon = RunningDaemon(clone / "data", config_text=f"[plugins]\nfolders = {clone / 'plugins'}\n").start()
    # The virtualenv is not activated: the course says .venv/bin/... wherever it needs it.
    env = dict(os.environ, DICOM_PORT=str(daemon.dicom_port), HTTP_PORT=str(daemon.http_port))
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    yield clone, env, daemon
    daemon.stop()


@pytest.mark.sqlite_only("the course teaches the embedded defaults: its commands read data/*.sqlite and"
                         " data/settings.ini, and run the offline commands without --index")
@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter(chapter, course):
    clone, env, daemon = course
    for number, (language, code, exit_status, expected) in enumerate(runnable_blocks(chapter.read_text(encoding="utf-8")), 1):
        command = ["bash", "-e", "-o", "pipefail", "-c", code] if language == "sh" else [".venv/bin/python", "-c", code]
        result = subprocess.run(command, cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", timeout=60)
        where = f"{chapter.name}, runnable block {number}:\n{code}\n--- printed:\n{result.stdout}"
        assert result.returncode == exit_status, f"exit {result.returncode}, not {exit_status}: {where}"
        printed = "".join(line.rstrip() + "\n" for line in result.stdout.rstrip().splitlines())
        if expected is not None:
            assert output_pattern(expected).fullmatch(printed), \
                f"not the output the chapter shows:\n{expected}\n--- {where}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_has_the_parts_every_chapter_has(chapter):
    """Goals, steps, what just happened (tied to the standard), exercises, folded solutions."""
    text = chapter.read_text(encoding="utf-8")
    assert text.startswith(f"# {int(chapter.name[:2])}. "), "the title is the chapter's number and name"
    assert "**Goals**" in text and "minutes)" in text
    for heading in ("## What just happened", "## Exercises"):
        assert f"\n{heading}\n" in text, heading
    assert "<details><summary>Solutions</summary>" in text and "</details>" in text
    assert re.search(r"PS3\.\d+", text), "no reference to the standard"
    assert chapter.name in (LEARN / "README.md").read_text(encoding="utf-8"), "not listed in the course index"
