"""The example plugins of plugins/examples/, each loaded into a real daemon and exercised with
real clients; and the meta-test that keeps the examples and the course complete.

Each test copies one example (with its module, for a web UI plugin) into a plugins folder of its
own, as the course tells a student to, and starts `dicoogled serve --plugins-dir FOLDER`.
"""

import re
import shutil

import pytest

from conftest import ROOT, make_identifier, wait_until
from test_plugins import ADMIN_ENV, dicoogled, get_json, http, instance, post_json, search, uids_found

EXAMPLES = ROOT / "plugins" / "examples"
LEARN = ROOT / "docs" / "learn"
CHAPTER_9 = LEARN / "09-python-and-lua-plugins.md"
CHAPTER_10 = LEARN / "10-web-ui-plugins.md"
WEBUI_SLOTS = ("menu", "result-option", "result-batch", "settings")


@pytest.fixture
def example(start_daemon, tmp_path):
    """example("body_region.py", config="") -> a daemon running that example (and nothing else
    from plugins/examples/)."""

    def start(name, config="", args=()):
        folder = tmp_path / "plugins"
        folder.mkdir(exist_ok=True)
        shutil.copy(EXAMPLES / name, folder / name)
        module = EXAMPLES / (name.rsplit(".", 1)[0] + ".js")
        if module.exists():
            shutil.copy(module, folder / module.name)
        daemon = start_daemon(config_text=config or None, args=["--plugins-dir", str(folder), *args], env=ADMIN_ENV)
        listing = get_json(daemon, "/plugins")
        assert listing["dead"] == [], listing["dead"]
        return daemon

    return start


def both(stem):
    return pytest.mark.parametrize("name", [f"{stem}.py", f"{stem}.lua"])


def test_the_examples_folder_is_never_loaded(start_daemon):
    daemon = start_daemon(env=ADMIN_ENV)  # the default plugins/ folder, examples below it
    names = set(get_json(daemon, "/plugins")["sets"])
    examples = {path.stem for path in EXAMPLES.iterdir() if path.suffix in (".py", ".lua")}
    assert names and not names & examples


@both("body_region")
def test_body_region(example, name):
    daemon = example(name)
    chest, bare = instance(0, 0, 0, 0, BodyPartExamined="CHEST"), instance(0, 0, 0, 1)
    del bare.BodyPartExamined
    assert daemon.store(chest, bare) == [0, 0]
    assert uids_found(daemon, "BodyRegion:CHEST") == {chest.SOPInstanceUID}
    assert uids_found(daemon, "BodyRegion:UNKNOWN") == {bare.SOPInstanceUID}


@both("ct_only")
def test_ct_only(example, name):
    daemon = example(name)
    ct, mr = instance(0, 0, 0, 0), instance(1, 0, 0, 0, modality="MR")
    assert daemon.store(ct, mr) == [0, 0]
    assert "ct_only" in get_json(daemon, "/providers")
    found = search(daemon, "*:*", "ct_only", ("SOPInstanceUID", "PatientID"))["results"]
    assert [(r["fields"]["SOPInstanceUID"], r["fields"]["PatientID"]) for r in found] == [(ct.SOPInstanceUID, ct.PatientID)]
    tree = get_json(daemon, "/searchDIM", query="*:*", provider="ct_only")["results"]
    assert [(p["id"], p["studies"][0]["series"][0]["serieModality"]) for p in tree] == [(ct.PatientID, "CT")]


def test_memory_store(example):
    daemon = example("memory_store.py", config="[storage]\nscheme = memory-store\n")
    stored = instance(0, 0)
    assert daemon.store(stored) == [0]
    assert search(daemon, "*:*")["results"][0]["uri"] == f"memory-store:{stored.SOPInstanceUID}"
    assert not list((daemon.data_dir / "storage").rglob("*.dcm"))
    status, body, _ = http(daemon, "GET", "/legacy/file", {"uid": stored.SOPInstanceUID})
    assert status == 200 and body[128:132] == b"DICM"
    assert post_json(daemon, "/management/tasks/remove", {"SOPInstanceUID": stored.SOPInstanceUID})["removed"] == 1
    assert uids_found(daemon) == set()


@both("counter")
def test_counter(example, name):
    daemon = example(name)
    assert daemon.store(instance(0, 0, 0, 0), instance(0, 0, 0, 1), instance(1, 0, modality="MR")) == [0, 0, 0]
    assert get_json(daemon, "/ext/counter/count", query="Modality:CT") == {"query": "Modality:CT", "instances": 2}
    assert get_json(daemon, "/ext/counter/count") == {"query": "*:*", "instances": 3}
    assert http(daemon, "GET", "/ext/counter/count", auth=False)[0] == 401


@both("arrivals")
def test_arrivals(example, name, tmp_path):
    watched = tmp_path / "watched"
    daemon = example(name, config="[plugins]\nstable_age = 1\n", args=["--watch", str(watched)])
    stored = instance(0, 0)
    assert daemon.store(stored) == [0]
    wait_until(lambda: f"study {stored.StudyInstanceUID} is stable" in daemon.log, message="on_stable_study")
    assert f"dicoogled.plugin.arrivals: stored {stored.SOPInstanceUID} from TESTSCU" in daemon.log
    assert f"indexed {stored.SOPInstanceUID} (store)" in daemon.log


@both("refuse_modality")
def test_refuse_modality(example, name):
    daemon = example(name, config="[plugin.refuse_modality]\nmodality = MR\n")
    ct, mr, none, empty = (instance(0, 0, 0, 0), instance(1, 0, 0, 0, modality="MR"),
                           instance(2, 0, 0, 0), instance(3, 0, 0, 0, Modality=""))
    del none.Modality
    assert daemon.store(ct, mr, none, empty) == [0, 0x0124, 0xA900, 0xA900]
    assert uids_found(daemon) == {ct.SOPInstanceUID}
    assert "no Modality" in daemon.log


@both("find_guard")
def test_find_guard(example, name):
    daemon = example(name)
    stored = instance(0, 0, PatientID="lower1")
    assert daemon.store(stored) == [0]
    assert daemon.find(make_identifier("STUDY", StudyInstanceUID="", PatientID="*")) == ([], 0xA700)
    results, status = daemon.find(make_identifier("STUDY", StudyInstanceUID="", PatientID="LOWER1"))
    assert status == 0 and results == []  # turned to capitals: "lower1" is not "LOWER1"
    results, status = daemon.find(make_identifier("STUDY", StudyInstanceUID=stored.StudyInstanceUID))
    assert status == 0 and [r.StudyInstanceUID for r in results] == [stored.StudyInstanceUID]
    assert "it names no patient, date or study" in daemon.log


@pytest.mark.parametrize("name, slot", [("menu_search.py", "menu"), ("menu_search.lua", "menu"),
                                        ("download_link.py", "result-option"), ("batch_summary.py", "result-batch"),
                                        ("settings_panel.py", "settings")])
def test_web_ui_examples(example, name, slot):
    daemon = example(name)
    stem = name.rsplit(".", 1)[0]
    listed = get_json(daemon, "/webui", **{"slot-id": slot})["plugins"]
    assert stem in [p["name"] for p in listed]  # beside the bundled stats (menu)
    status, body, headers = http(daemon, "GET", f"/webui/module/{stem}")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript") and "this.render" in body.decode()
    assert body.decode().count((EXAMPLES / f"{stem}.js").read_text()) == 1
    if slot == "settings":  # what the panel posts
        assert post_json(daemon, f"/plugins/{stem}/settings", {"greeting": "olá"})["greeting"] == "olá"


def test_web_ui_modules_call_only_the_archive():
    """Modules fetch same-origin paths of the API the docs list, and write text, never HTML."""
    routes = (ROOT / "docs" / "rest-api.md").read_text(encoding="utf-8")
    for module in EXAMPLES.glob("*.js"):
        text = module.read_text(encoding="utf-8")
        assert "innerHTML" not in text and "eval(" not in text, module.name
        for path in re.findall(r'(?:fetch\(|href = )"(/[a-z/]+)', text):
            assert f"`{path}" in routes, (module.name, path)


# ---- the meta-test: every kind has an example and a section of the course ------------------------


def hooks_defined(path) -> set:
    text = path.read_text(encoding="utf-8")
    found = set(re.findall(r"^(?:def|function) (\w+)\(", text, re.M))
    if re.search(r"^routes = \{", text, re.M):
        found.add("routes")
    if re.search(r"^SCHEME = ", text, re.M):
        found.add("storage")
    return found


def test_every_hook_has_an_example_in_each_language_and_a_section_in_chapter_9():
    chapter = CHAPTER_9.read_text(encoding="utf-8")
    sections = re.findall(r"^## (.+)$", chapter, re.M) + re.findall(r"^### (.+)$", chapter, re.M)
    for hook in dicoogled.HOOKS:
        for suffix in (".py",) + ((".lua",) if hook != "storage" else ()):
            assert any(hook in hooks_defined(p) for p in EXAMPLES.glob(f"*{suffix}")), f"no {suffix} example of {hook}"
        assert any(f"`{hook}`" in s for s in sections), f"no section of chapter 9 names `{hook}`"
    for kind, (_, stem) in dicoogled.PLUGIN_KINDS.items():  # what new-plugin copies
        assert (EXAMPLES / f"{stem}.py").exists(), kind


def test_every_example_is_a_solution_in_the_course():
    course = CHAPTER_9.read_text(encoding="utf-8") + CHAPTER_10.read_text(encoding="utf-8")
    for path in EXAMPLES.iterdir():
        if path.suffix in (".py", ".lua", ".js"):
            head = path.read_text(encoding="utf-8")[:1500]
            assert re.search(r"Course: chapter (9|10), exercise \d", head), f"{path.name} names no exercise"
            assert "Enable" in head or path.suffix == ".js", path.name
            assert f"plugins/examples/{path.name}" in course, f"{path.name} is no solution in chapters 9 and 10"


def test_every_web_ui_slot_has_an_example_and_a_section_in_chapter_10():
    chapter = CHAPTER_10.read_text(encoding="utf-8")
    sections = re.findall(r"^##+ (.+)$", chapter, re.M)
    slots = {}
    for path in EXAMPLES.glob("*.py"):
        match = re.search(r'"slot-id": "([a-z-]+)"', path.read_text(encoding="utf-8"))
        if match:
            slots[match.group(1)] = path.name
    assert set(WEBUI_SLOTS) <= set(slots), slots
    for slot in WEBUI_SLOTS:
        assert any(f"`{slot}`" in s for s in sections), f"no section of chapter 10 names `{slot}`"


def reference_text() -> str:
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(LEARN.glob("*.md"))]
    return "\n".join(path.read_text(encoding="utf-8") for path in texts)


def test_every_subcommand_and_config_key_is_in_the_course_or_the_reference():
    text = reference_text()
    commands = next(a for a in dicoogled._argument_parser()._actions if a.dest == "command").choices
    missing = [f"dicoogled {name}" for name in commands if not re.search(rf"(dicoogled(\.py)? |make ){name}\b", text)]
    for section, key in config_keys():
        if not re.search(rf"\[{re.escape(section)}\][^\n]*`?{re.escape(key)}\b", text) \
                and not re.search(rf"^{re.escape(key)} = ", section_blocks(text, section), re.M) \
                and f"`{key}`" not in text:
            missing.append(f"[{section}] {key}")
    assert not missing, "not in README.md, docs/ or docs/learn/:\n" + "\n".join(missing)


def config_keys():
    import configparser
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read_string(dicoogled.DEFAULT_CONFIG)
    return [(section, key) for section in parser.sections() for key in parser[section]]


def section_blocks(text: str, section: str) -> str:
    """The lines under [section] in the ini examples of the docs."""
    return "\n".join(m.group(1) for m in re.finditer(rf"^\[{re.escape(section)}\]\n((?:[^\n\[`]+\n)*)", text, re.M))
