"""Plugins against the real daemon: every kind in Python and Lua, the events with real DICOM
traffic, the sandbox's guard rails, hot reload, the REST management, new-plugin's starting
files and the bundled plugins.

Each test writes its plugins into a folder of its own and starts `dicoogled serve
--plugins-dir FOLDER`; the bundled plugins in plugins/ load beside them (the ones that act on
data stay disabled unless a test's config enables them).
"""

import base64
import concurrent.futures
import io
import json
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request

import pydicom
import pytest

import studygen
from conftest import ROOT, StoreSCP, make_identifier, wait_until

sys.path.insert(0, str(ROOT))
import dicoogled  # noqa: E402  (HOOK_SPECS and ORTHANC_CALLBACKS, for the docs meta-tests)

ADMIN_PASSWORD = "plugins-admin-1"
ADMIN_ENV = {"DICOOGLED_ADMIN_PASSWORD": ADMIN_PASSWORD}


# ---- helpers ----------------------------------------------------------------------------------


def http(daemon, method: str, path: str, params=None, data=None, auth=True, timeout=60):
    """(status, body bytes, headers) of one request; never raises on an HTTP status."""
    url = f"http://127.0.0.1:{daemon.http_port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params, doseq=True)
    headers = {}
    if isinstance(data, dict):
        data = urllib.parse.urlencode(data, doseq=True).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    if method == "POST" and data is None:
        data = b""
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers


def get_json(daemon, route, **params):
    status, body, _ = http(daemon, "GET", route, params)
    assert status == 200, (route, status, body)
    return json.loads(body)


def post_json(daemon, route, data=None):
    status, body, _ = http(daemon, "POST", route, data=data)
    assert status == 200, (route, status, body)
    return json.loads(body)


def search(daemon, query, provider=None, fields=("SOPInstanceUID",)):
    params = {"query": query, "field": list(fields)}
    if provider:
        params["provider"] = provider
    return get_json(daemon, "/search", **params)


def uids_found(daemon, query="*:*") -> set:
    return {r["fields"]["SOPInstanceUID"] for r in search(daemon, query)["results"]}


def storescu(daemon, *files, check=True) -> subprocess.CompletedProcess:
    """DCMTK storescu: options, peer and port, then the files (which dcmtk() cannot place)."""
    command = ["storescu", "-v", "-aet", "DCMTK", "-aec", "DICOOGLED", "127.0.0.1", str(daemon.dicom_port), *map(str, files)]
    result = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=120)
    assert not check or result.returncode == 0, result.stdout + result.stderr
    return result


def instance(patient=0, study=0, series=0, number=0, **overrides):
    return studygen.make_instance(patient, study, series, number, **overrides)


def write_plugins(folder: pathlib.Path, files: dict):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")


@pytest.fixture
def archive(start_daemon, tmp_path):
    """archive(plugins={file: source}, config="", args=[]) -> a running daemon with those plugins."""

    def start(plugins=None, config="", args=(), env=None, name="data"):
        folder = tmp_path / f"plugins-{name}"
        write_plugins(folder, plugins or {})
        daemon = start_daemon(config_text=config or None, args=["--plugins-dir", str(folder), *args],
                              env={**ADMIN_ENV, **(env or {})}, name=name)
        daemon.plugin_folder = folder
        return daemon

    return start


@pytest.fixture
def destination(tmp_path):
    dest = StoreSCP(tmp_path / "received")
    yield dest
    dest.stop()


# ---- query and index plugins ------------------------------------------------------------------

PY_QUERY = '''
    """A query provider answering two made-up instances."""

    def query(text):
        return [{"uri": "py:1", "fields": {"SOPInstanceUID": "1.2.1", "Query": text, "Who": "python"}},
                {"uri": "py:2", "fields": {"SOPInstanceUID": "1.2.2", "Who": "python"}}]
'''
LUA_QUERY = '''
    DESCRIPTION = "A Lua query provider"
    function query(text)
      return { { uri = "lua:2", fields = { SOPInstanceUID = "1.2.2", Who = "lua" } },
               { uri = "lua:3", fields = { SOPInstanceUID = "1.2.3", Query = text, Who = "lua" } } }
    end
'''


def test_python_and_lua_query_providers_answer_search(archive):
    daemon = archive({"pyq.py": PY_QUERY, "luaq.lua": LUA_QUERY})
    assert {"index", "pyq", "luaq"} <= set(get_json(daemon, "/providers"))
    fields = ("SOPInstanceUID", "Query", "Who")
    python = search(daemon, "hello world", "pyq", fields)
    assert [r["uri"] for r in python["results"]] == ["py:1", "py:2"]
    assert python["results"][0]["fields"] == {"SOPInstanceUID": "1.2.1", "Query": "hello world", "Who": "python"}
    lua = search(daemon, "hello lua", "luaq", fields)
    assert [r["uri"] for r in lua["results"]] == ["lua:2", "lua:3"]
    assert lua["results"][1]["fields"]["Query"] == "hello lua"
    both = search(daemon, "q", ["pyq", "luaq"], fields)  # merged, de-duplicated by SOPInstanceUID
    assert [r["uri"] for r in both["results"]] == ["py:1", "py:2", "lua:3"]
    assert both["numResults"] == 3
    status, body, _ = http(daemon, "GET", "/search", {"query": "q", "provider": "nosuch"})
    assert status == 400 and b"not a valid query provider" in body


UIDS_ONLY = '''
    -- Answers with SOPInstanceUIDs alone, as a provider that knows nothing else would.
    function query(text)
      local results = {}
      for _, hit in ipairs(dicoogle.search(text, 100, { "SOPInstanceUID" })) do
        results[#results + 1] = { uri = hit.uri, fields = { SOPInstanceUID = hit.fields.SOPInstanceUID } }
      end
      return results
    end
'''


def test_a_providers_results_group_in_searchdim_from_the_index(archive):
    daemon = archive({"uids_only.lua": UIDS_ONLY})
    stored = [instance(0, 0, 0, 0), instance(0, 0, 1, 0), instance(0, 1, 0, 0), instance(1, 0, 0, 0, modality="MR")]
    assert daemon.store(*stored) == [0] * 4

    def tree(provider):
        answer = get_json(daemon, "/searchDIM", query="*:*", provider=provider)
        return sorted((p["id"], p["name"], s["studyInstanceUID"], se["serieInstanceUID"], se["serieModality"],
                       tuple(i["sopInstanceUID"] for i in se["images"]))
                      for p in answer["results"] for s in p["studies"] for se in s["series"])

    assert len(tree("index")) == 4
    assert tree("uids_only") == tree("index")
    # /search shows the provider's fields, completed the same way.
    found = search(daemon, "*:*", "uids_only", ("SOPInstanceUID", "PatientID", "Modality"))["results"]
    assert {(r["fields"]["PatientID"], r["fields"]["Modality"]) for r in found} == {(ds.PatientID, ds.Modality) for ds in stored}


PY_INDEX = '''
    def index(instance):
        return {"PyColour": "RED" + instance["tags"]["Modality"]}
'''
LUA_INDEX = '''
    function index(instance)
      return { LuaShape = "ROUND" .. instance.tags.Modality }
    end
'''


def test_index_plugins_add_searchable_fields(archive):
    daemon = archive({"pyindex.py": PY_INDEX, "luaindex.lua": LUA_INDEX})
    ct, mr = instance(0, 0), instance(1, 0, modality="MR")
    assert daemon.store(ct, mr) == [0, 0]
    assert uids_found(daemon, "PyColour:REDCT") == {ct.SOPInstanceUID}
    assert uids_found(daemon, "LuaShape:ROUNDMR") == {mr.SOPInstanceUID}
    assert uids_found(daemon, "LuaShape:ROUNDCT AND PyColour:REDCT") == {ct.SOPInstanceUID}
    assert uids_found(daemon, "PyColour:BLUECT") == set()
    dump = get_json(daemon, "/dump", uid=ct.SOPInstanceUID)["results"]["fields"]
    assert (dump["PyColour"], dump["LuaShape"]) == ("REDCT", "ROUNDCT")


# ---- storage plugins --------------------------------------------------------------------------

BOX_STORAGE = '''
    """Keeps received objects as files in a folder of its own (a storage plugin)."""
    import os

    SCHEME = "box"
    SETTINGS = {"enabled": True, "folder": ""}

    def _path(uri):
        return os.path.join(dicoogle.setting("folder"), uri.removeprefix("box:"))

    def store(sop_uid, data):
        if os.path.exists(_path("box:FULL")):
            raise OSError("the box is full")
        with open(_path("box:" + sop_uid), "wb") as handle:
            handle.write(data)
        return "box:" + sop_uid

    def get(uri):
        with open(_path(uri), "rb") as handle:
            return handle.read()

    def list():
        return ["box:" + name for name in os.listdir(dicoogle.setting("folder")) if name != "FULL"]

    def remove(uri):
        os.unlink(_path(uri))
'''


def test_storage_plugin_keeps_received_objects_under_its_scheme(archive, tmp_path):
    box = tmp_path / "box"
    box.mkdir()
    config = f"[storage]\nscheme = box\n[plugin.box]\nfolder = {box}\n"
    daemon = archive({"box.py": BOX_STORAGE}, config=config)
    first, second = instance(0, 0, 0, 0), instance(0, 0, 0, 1)
    assert daemon.store(first, second) == [0, 0]
    assert sorted(p.name for p in box.iterdir()) == sorted([first.SOPInstanceUID, second.SOPInstanceUID])
    assert not list((daemon.data_dir / "storage").rglob("*.dcm"))
    results = search(daemon, f"SOPInstanceUID:{first.SOPInstanceUID}")["results"]
    assert [r["uri"] for r in results] == [f"box:{first.SOPInstanceUID}"]
    storage = {p["name"]: p for p in get_json(daemon, "/plugins/storage")["plugins"]}
    assert storage["box"]["scheme"] == "box" and storage["box"]["default"] is True
    assert storage["file-storage"]["default"] is False

    # Reading goes through the plugin: /legacy/file and C-GET.
    status, body, headers = http(daemon, "GET", "/legacy/file", {"uid": first.SOPInstanceUID})
    assert status == 200 and headers["Content-Type"] == "application/dicom"
    assert body == (box / first.SOPInstanceUID).read_bytes()
    assert pydicom.dcmread(io.BytesIO(body)).PixelData == first.PixelData
    got = tmp_path / "got"
    got.mkdir()
    daemon.dcmtk("getscu", "-S", "-od", str(got), "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={first.StudyInstanceUID}")
    received = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, got.iterdir())}
    assert set(received) == {first.SOPInstanceUID, second.SOPInstanceUID}
    assert received[second.SOPInstanceUID].PixelData == second.PixelData
    # Images too: the codec worker, which reads no storage plugin, is given the object's bytes.
    status, body, headers = http(daemon, "GET", "/dic2png", {"SOPInstanceUID": first.SOPInstanceUID})
    assert status == 200 and body.startswith(b"\x89PNG")

    # A failing storage plugin never loses an instance: it goes to a file.
    (box / "FULL").write_bytes(b"")
    third = instance(0, 0, 0, 2)
    assert daemon.store(third) == [0]
    results = search(daemon, f"SOPInstanceUID:{third.SOPInstanceUID}")["results"]
    assert results[0]["uri"].startswith("file://")
    assert "the box is full" in daemon.log and "kept in a file" in daemon.log
    (box / "FULL").unlink()

    # Removing deletes the plugin's object.
    removed = post_json(daemon, "/management/tasks/remove", {"SOPInstanceUID": second.SOPInstanceUID})
    assert removed["removed"] == 1 and not (box / second.SOPInstanceUID).exists()

    # The index is rebuilt from files only; at start the daemon indexes what the plugin lists.
    daemon.stop()
    subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "reindex", "--data-dir", str(daemon.data_dir), *daemon.index_args,
                    "--config", str(daemon.config_path)], check=True, capture_output=True)
    daemon.start()
    daemon.settled()
    assert uids_found(daemon) == {first.SOPInstanceUID, third.SOPInstanceUID}
    assert search(daemon, f"SOPInstanceUID:{first.SOPInstanceUID}")["results"][0]["uri"] == f"box:{first.SOPInstanceUID}"


SHAPES = '''
    """Names one instance every way the API can: the event, search, instances, and reads by URI."""
    import pydicom

    def routes(app):
        @app.get("/shapes/<sop_uid>")
        def shapes(sop_uid):
            hit, = dicoogle.search("SOPInstanceUID:" + sop_uid)
            row, = [r for r in dicoogle.instances(hit["fields"]["StudyInstanceUID"]) if r.sop_instance_uid == sop_uid]
            return {"search": hit["uri"], "instances": row.uri, "event": _events.get(sop_uid),
                    "open": str(pydicom.dcmread(dicoogle.open(row.uri)).SOPInstanceUID),
                    "render": dicoogle.render(row.uri)[:4].hex(), "pixels": len(dicoogle.pixels(row.uri))}

    _events = {}

    def on_stored(instance):
        _events[instance["SOPInstanceUID"]] = instance["uri"]
'''
LUA_SHAPES = '''
    uris = {}
    function on_stored(instance) uris[instance.SOPInstanceUID] = instance.uri end
    routes = { ["GET /uri/<uid>"] = function(params)
      local hit = dicoogle.search("SOPInstanceUID:" .. params.uid)[1]
      local row = dicoogle.instances(hit.fields.StudyInstanceUID)[1]
      local study = dicoogle.find("STUDY", { StudyInstanceUID = hit.fields.StudyInstanceUID, PatientID = "",
                                             NumberOfStudyRelatedInstances = "" })[1]
      return { event = uris[params.uid], search = hit.uri, instances = row.uri, sop_class = row.sop_class_uid,
               study = study.StudyInstanceUID, patient = study.PatientID, count = study.NumberOfStudyRelatedInstances }
    end }
'''


def test_the_api_names_an_instance_by_one_uri_everywhere(archive):
    """Events, dicoogle.search and dicoogle.instances give the same URI, and every call that
    reads an instance takes it."""
    daemon = archive({"shapes.py": SHAPES, "luashapes.lua": LUA_SHAPES})
    stored = instance(0, 0)
    assert daemon.store(stored) == [0]
    uid = stored.SOPInstanceUID
    wait_until(lambda: get_json(daemon, f"/ext/shapes/shapes/{uid}")["event"], message="the on_stored event")
    shapes = get_json(daemon, f"/ext/shapes/shapes/{uid}")
    assert shapes["search"].startswith("file:///") and shapes["search"].endswith(".dcm")
    assert shapes["search"] == shapes["instances"] == shapes["event"]
    assert shapes["open"] == uid and shapes["render"] == "89504e47" and shapes["pixels"] > 0
    wait_until(lambda: get_json(daemon, f"/ext/luashapes/uri/{uid}").get("event"), message="the Lua on_stored event")
    # Lua gets the same calls, as tables: find's responses keyword -> text, instances' rows by name.
    assert get_json(daemon, f"/ext/luashapes/uri/{uid}") == {
        "event": shapes["search"], "search": shapes["search"], "instances": shapes["search"],
        "sop_class": stored.SOPClassUID, "study": stored.StudyInstanceUID, "patient": stored.PatientID, "count": "1"}


# ---- web services and web UI plugins -----------------------------------------------------------

PY_WEB = '''
    import bottle

    def routes(app):
        @app.get("/hello/<who>")
        def hello(who):
            return {"hello": who, "from": "python"}

        @app.post("/echo")
        def echo():
            return {"echo": bottle.request.params.get("text", "")}
'''
LUA_WEB = '''
    routes = {
      ["GET /hello/<who>"] = function(params) return { hello = params.who, from = "lua" } end,
      ["POST /echo"] = function(params) return { echo = params.text } end,
      ["GET /fail"] = function(params) error("this route always fails") end,
    }
'''


@pytest.mark.parametrize("name", ["pyweb", "luaweb"])
def test_web_service_routes_under_ext_with_the_core_login(archive, name):
    daemon = archive({"pyweb.py": PY_WEB, "luaweb.lua": LUA_WEB})
    language = "python" if name == "pyweb" else "lua"
    assert get_json(daemon, f"/ext/{name}/hello/ana") == {"hello": "ana", "from": language}
    assert post_json(daemon, f"/ext/{name}/echo", {"text": "olá"}) == {"echo": "olá"}
    assert http(daemon, "GET", f"/ext/{name}/hello/ana", auth=False)[0] == 401
    assert http(daemon, "POST", f"/ext/{name}/echo", {"text": "x"}, auth=False)[0] == 401
    assert http(daemon, "GET", f"/ext/{name}/nothing-here")[0] == 404
    listed = [p for p in get_json(daemon, "/plugins/servlet")["plugins"] if p["name"] == name]
    assert listed and listed[0]["language"] == language


def test_a_failing_lua_route_answers_500_and_is_logged(archive):
    daemon = archive({"luaweb.lua": LUA_WEB})
    status, body, _ = http(daemon, "GET", "/ext/luaweb/fail")
    assert status == 500 and b"Traceback" not in body
    assert "this route always fails" in daemon.log


PANEL_JS = "module.exports = function () { this.render = function (parent) { parent.textContent = 'panel'; }; };\n"


def test_web_ui_plugins_are_listed_and_their_modules_served(archive):
    daemon = archive({
        "panel.py": '''
            WEBUI = {"name": "panel", "version": "1.0.0",
                     "dicoogle": {"slot-id": "result-batch", "caption": "Panel", "module-file": "panel.js"}}
        ''',
        "panel.js": PANEL_JS,
        "luapanel.lua": '''
            WEBUI = { name = "luapanel", version = "1.0.0",
                      dicoogle = { ["slot-id"] = "menu", caption = "Lua panel", ["module-file"] = "luapanel.js" } }
        ''',
        "luapanel.js": PANEL_JS.replace("'panel'", "'lua panel'"),
        "nomodule.py": 'WEBUI = {"name": "nomodule", "dicoogle": {"slot-id": "menu", "module-file": "gone.js"}}\n',
    })
    listed = {p["name"]: p for p in get_json(daemon, "/webui")["plugins"]}
    assert {"panel", "luapanel", "stats"} <= set(listed)
    assert listed["luapanel"]["dicoogle"]["caption"] == "Lua panel"
    menu = {p["name"] for p in get_json(daemon, "/webui", **{"slot-id": "menu"})["plugins"]}
    assert "luapanel" in menu and "stats" in menu and "panel" not in menu
    status, body, headers = http(daemon, "GET", "/webui/module/panel")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert PANEL_JS in body.decode() and "DicoogleWebcore" in body.decode()
    assert http(daemon, "GET", "/webui/module/luapanel", {"process": "false"})[1].decode() == PANEL_JS.replace("'panel'", "'lua panel'")
    assert http(daemon, "GET", "/webui/module/nomodule")[0] == 404
    assert http(daemon, "GET", "/webui/module/nosuch")[0] == 404


# ---- events -----------------------------------------------------------------------------------

RECORDER = '''
    """Writes every event it sees to a file, one JSON line each."""
    import json
    import time

    SETTINGS = {"enabled": True, "file": ""}

    def _record(event, **fields):
        with open(dicoogle.setting("file"), "a") as handle:
            handle.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\\n")

    def on_stored(instance):
        _record("on_stored", uid=instance["SOPInstanceUID"], aet=instance["calling_aet"], origin=instance["origin"])

    def on_indexed(instance):
        _record("on_indexed", uid=instance["SOPInstanceUID"], origin=instance["origin"])

    def on_stable_study(study):
        _record("on_stable_study", study=study["StudyInstanceUID"])
'''
ORTHANC_EVENTS = '''
    function OnStoredInstance(instanceId, tags, metadata, origin)
      dicoogle.log("orthanc stored " .. instanceId .. " from " .. origin.RemoteAet .. " as " .. tags.Modality)
    end
    function OnStableStudy(studyId, tags, metadata)
      dicoogle.log("orthanc stable " .. studyId)
    end
'''


def recorded(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_events_fire_exactly_when_they_should(archive, tmp_path):
    events, watch = tmp_path / "events.jsonl", tmp_path / "watched"
    config = f"[plugins]\nstable_age = 1\n[plugin.recorder]\nfile = {events}\n"
    daemon = archive({"recorder.py": RECORDER, "orthanc.lua": ORTHANC_EVENTS}, config=config, args=["--watch", str(watch)])
    daemon.settled()
    stored = [instance(0, 0, 0, 0), instance(0, 0, 0, 1)]
    started = time.time()
    assert daemon.store(*stored) == [0, 0]  # pynetdicom
    watched = instance(1, 0, 0, 0)
    staging = tmp_path / "staging.dcm"
    pydicom.dcmwrite(staging, watched, enforce_file_format=True)
    shutil.move(staging, watch / "new.dcm")  # a watched folder: indexed, not "stored"

    def stable_studies():
        return [e["study"] for e in recorded(events) if e["event"] == "on_stable_study"]

    wait_until(lambda: {stored[0].StudyInstanceUID, watched.StudyInstanceUID} <= set(stable_studies()),
               message="on_stable_study for both studies")
    log = recorded(events)
    on_stored = [e for e in log if e["event"] == "on_stored"]
    assert sorted(e["uid"] for e in on_stored) == sorted(ds.SOPInstanceUID for ds in stored)
    assert {(e["aet"], e["origin"]) for e in on_stored} == {("TESTSCU", "store")}
    on_indexed = {e["uid"]: e["origin"] for e in log if e["event"] == "on_indexed"}
    assert on_indexed == {stored[0].SOPInstanceUID: "store", stored[1].SOPInstanceUID: "store", watched.SOPInstanceUID: "watch"}
    stable_time = next(e["time"] for e in log if e["event"] == "on_stable_study" and e["study"] == stored[0].StudyInstanceUID)
    assert stable_time - started >= 0.9  # not before stable_age

    # Exactly once: a later study's stable event comes after any second one would have.
    marker = instance(2, 0, 0, 0)
    storescu(daemon, _written(tmp_path, marker))  # DCMTK this time
    wait_until(lambda: marker.StudyInstanceUID in stable_studies(), message="the marker's stable event")
    counts = {uid: stable_studies().count(uid) for uid in (stored[0].StudyInstanceUID, watched.StudyInstanceUID, marker.StudyInstanceUID)}
    assert set(counts.values()) == {1}, counts
    assert any(e["event"] == "on_stored" and e["uid"] == marker.SOPInstanceUID and e["aet"] == "DCMTK" for e in recorded(events))

    # The Orthanc names, with Orthanc's arguments and origin table.
    assert f"orthanc stored {stored[0].SOPInstanceUID} from TESTSCU as CT" in daemon.log
    assert f"orthanc stable {stored[0].StudyInstanceUID}" in daemon.log
    assert f"orthanc stored {watched.SOPInstanceUID}" not in daemon.log


def _written(folder: pathlib.Path, dataset) -> pathlib.Path:
    path = folder / f"{dataset.SOPInstanceUID}.dcm"
    pydicom.dcmwrite(path, dataset, enforce_file_format=True)
    return path


STORE_FILTERS = {
    "a_filter.py": '''
        def incoming_store_filter(calling_aet, tags):
            return 0xC210 if tags.get("PatientID") == "BLOCKED" else None
    ''',
    "b_filter.lua": '''
        -- Orthanc's name and arguments: false refuses (0x0124).
        function ReceivedInstanceFilter(tags, origin)
          return not (tags.StudyDescription == "PRIVATE" and origin.RemoteAet == "TESTSCU")
        end
    ''',
}


def test_store_filters_chain_and_refuse_with_their_status(archive, tmp_path):
    daemon = archive(STORE_FILTERS, config="[plugin.require_patient_id]\nenabled = true\n")
    accepted = instance(0, 0, 0, 0)
    no_id = instance(0, 0, 0, 1, PatientID=None)
    blocked = instance(0, 0, 0, 2, PatientID="BLOCKED")
    private = instance(0, 0, 0, 3, StudyDescription="PRIVATE")
    assert daemon.store(accepted, no_id, blocked, private) == [0, 0xA900, 0xC210, 0x0124]
    assert uids_found(daemon) == {accepted.SOPInstanceUID}
    # DCMTK sees the same refusal.
    result = storescu(daemon, _written(tmp_path, instance(0, 0, 0, 4, PatientID=None)), check=False)
    assert "Error: DataSetDoesNotMatchSOPClass" in result.stdout + result.stderr  # 0xA900
    assert uids_found(daemon) == {accepted.SOPInstanceUID}
    assert "no PatientID" in daemon.log


FIND_FILTERS = {
    "a_find.py": '''
        ALIASES = {"ALIAS": "P0000000000", "SECRET": "FORBIDDEN"}

        def incoming_find_filter(calling_aet, query):
            if query.get("PatientID") in ALIASES:
                return {**query, "PatientID": ALIASES[query["PatientID"]]}
    ''',
    "b_find.lua": '''
        -- Sees the query as the filter before it left it.
        function IncomingFindRequestFilter(query, origin)
          if query.PatientID == "FORBIDDEN" and origin.RemoteAet == "TESTSCU" then return 0xA700 end
        end
    ''',
}


def test_find_filters_chain_rewrite_and_refuse(archive):
    daemon = archive(FIND_FILTERS)
    study = instance(0, 0)
    assert study.PatientID == "P0000000000"
    assert daemon.store(study) == [0]
    results, status = daemon.find(make_identifier("STUDY", PatientID="ALIAS", StudyInstanceUID=""))
    assert status == 0 and [r.StudyInstanceUID for r in results] == [study.StudyInstanceUID]
    results, status = daemon.find(make_identifier("STUDY", PatientID="SECRET", StudyInstanceUID=""))
    assert (results, status) == ([], 0xA700)
    results, status = daemon.find(make_identifier("STUDY", PatientID="", StudyInstanceUID=""))
    assert status == 0 and len(results) == 1


PRIVATE_FIND_FILTER = {
    "c_find.py": '''
        def incoming_find_filter(calling_aet, query):
            if query.get("PatientID") == "BYNUMBER":  # a private key, (0009,1011) UL, asked for the caller
                return {**query, "PatientID": "", "00090010": "DICOOGLED TEST", "00091011": "1000"}
            if query.get("PatientID") == "BROKEN":
                return {**query, "NoSuchKeyword": "x"}
    ''',
}


def test_a_find_filter_rewrites_with_private_keys_and_a_bad_rewrite_is_refused(archive):
    """A rewritten query becomes an identifier by the same rules as any other: a private key
    is kept (it was dropped, so every study matched), an unknown one refuses the query; a query
    no filter changed goes on as it came, multiple values and all."""
    daemon = archive(PRIVATE_FIND_FILTER)
    studies = [instance(0, 0), instance(1, 0), instance(1, 1)]  # (0009,1011) = patient * 1000 + study
    assert daemon.store(*studies) == [0, 0, 0]
    results, status = daemon.find(make_identifier("STUDY", PatientID="BYNUMBER", StudyInstanceUID=""))
    assert status == 0 and [r.StudyInstanceUID for r in results] == [studies[1].StudyInstanceUID]
    assert daemon.find(make_identifier("STUDY", PatientID="BROKEN", StudyInstanceUID="")) == ([], 0xA900)
    assert "unknown attribute 'NoSuchKeyword'" in daemon.log
    results, status = daemon.find(make_identifier("STUDY", ModalitiesInStudy="CT\\MR", StudyInstanceUID=""))
    assert status == 0 and len(results) == 3


# ---- the bundled plugins ----------------------------------------------------------------------


def test_autoroute_forwards_matching_studies_once_stable(archive, destination):
    config = (f"[plugins]\nstable_age = 1\n[modalities]\nDEST = 127.0.0.1:{destination.port}\n"
              "[plugin.autoroute]\nenabled = true\ndestination = DEST\nrule = Modality:CT\n")
    daemon = archive(config=config)
    ct = [instance(0, 0, 0, 0), instance(0, 0, 0, 1)]
    mr = instance(1, 0, modality="MR")
    assert daemon.store(mr, *ct) == [0, 0, 0]
    wait_until(lambda: destination.received() == {ds.SOPInstanceUID for ds in ct}, message="the CT study at storescp")
    wait_until(lambda: "forwarded 2 instance(s) to DEST, 0 failed" in daemon.log, message="autoroute's log line")
    assert mr.SOPInstanceUID not in destination.received()


def test_autoroute_can_forward_each_instance_as_it_is_stored(archive, destination):
    config = (f"[modalities]\nDEST = 127.0.0.1:{destination.port}\n"
              "[plugin.autoroute]\nenabled = true\ndestination = DEST\nwhen = stored\n")
    daemon = archive(config=config)
    sent = instance(0, 0)
    assert daemon.store(sent) == [0]
    wait_until(lambda: destination.received() == {sent.SOPInstanceUID}, message="the instance at storescp")


def test_stats_counts_studies_and_shows_a_menu_module(archive):
    daemon = archive()
    assert daemon.store(instance(0, 0), instance(0, 0, 0, 1), instance(1, 0, modality="MR"), instance(2, 1)) == [0] * 4
    stats = get_json(daemon, "/ext/stats/")
    assert stats["studies"] == 3
    assert stats["modalities"] == {"CT": 2, "MR": 1}
    assert sum(stats["years"].values()) == 3 and all(re.fullmatch(r"\d{4}", y) for y in stats["years"])
    assert sum(stats["institutions"].values()) == 3
    menu = {p["name"]: p for p in get_json(daemon, "/webui", **{"slot-id": "menu"})["plugins"]}
    assert menu["stats"]["dicoogle"]["caption"] == "Statistics"
    module = http(daemon, "GET", "/webui/module/stats")[1].decode()
    assert "/ext/stats/" in module and "this.render" in module


def test_anonymize_makes_a_deidentified_copy_of_a_study(archive):
    pytest.importorskip("dicomanonymizer")
    daemon = archive(config="[plugin.anonymize]\nenabled = true\n")
    originals = [instance(0, 0, 0, 0), instance(0, 0, 0, 1)]
    assert daemon.store(*originals) == [0, 0]
    answer = post_json(daemon, f"/ext/anonymize/studies/{originals[0].StudyInstanceUID}")
    assert answer["stored"] == 2 and answer["failed"] == 0
    new_study = answer["StudyInstanceUID"]
    assert new_study and new_study != originals[0].StudyInstanceUID
    fields = ("SOPInstanceUID", "PatientName", "PatientID", "PatientIdentityRemoved", "StudyInstanceUID")
    copies = search(daemon, f"StudyInstanceUID:{new_study}", fields=fields)["results"]
    assert len(copies) == 2
    for copy in copies:
        assert copy["fields"]["PatientIdentityRemoved"] == "YES"
        assert copy["fields"].get("PatientName", "") != str(originals[0].PatientName)
        assert copy["fields"].get("PatientID", "") != originals[0].PatientID
        assert copy["fields"]["SOPInstanceUID"] not in {ds.SOPInstanceUID for ds in originals}
    data = http(daemon, "GET", "/legacy/file", {"uid": copies[0]["fields"]["SOPInstanceUID"]})[1]
    copied = pydicom.dcmread(io.BytesIO(data))
    assert copied.get("PatientBirthDate", "") != originals[0].PatientBirthDate  # a dummy date, or none
    assert not any(element.tag.is_private for element in copied)
    assert uids_found(daemon, f"StudyInstanceUID:{originals[0].StudyInstanceUID}") == {ds.SOPInstanceUID for ds in originals}
    assert http(daemon, "POST", "/ext/anonymize/studies/1.2.3.4")[0] == 404


def test_anonymize_answers_501_without_its_package_and_404_while_disabled(archive, tmp_path):
    shadow = tmp_path / "shadow" / "dicomanonymizer"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed, for this test')\n")
    daemon = archive(config="[plugin.anonymize]\nenabled = true\n", env={"PYTHONPATH": str(shadow.parent)})
    assert daemon.store(instance(0, 0)) == [0]
    status, body, _ = http(daemon, "POST", f"/ext/anonymize/studies/{instance(0, 0).StudyInstanceUID}")
    assert status == 501 and b"pip install dicom-anonymizer" in body
    disabled = archive(name="disabled")
    assert http(disabled, "POST", "/ext/anonymize/studies/1.2.3")[0] == 404


# ---- life cycle: reload, enable and disable, settings, dead plugins ---------------------------

def _lua_version(version):
    return f'function query(text) return {{ {{ uri = "v:1", fields = {{ SOPInstanceUID = "9.9", Version = "{version}" }} }} }} end\n'


def test_a_changed_plugin_is_reloaded_live(archive):
    daemon = archive({"live.lua": _lua_version("1"), "liveweb.py": PY_WEB})

    def version():
        return search(daemon, "x", "live", ("Version",))["results"][0]["fields"]["Version"]

    assert version() == "1"
    (daemon.plugin_folder / "live.lua").write_text(_lua_version("2"))
    wait_until(lambda: version() == "2", message="the new Lua version to answer")
    assert "reloaded plugin live" in daemon.log
    (daemon.plugin_folder / "liveweb.py").write_text(textwrap.dedent(PY_WEB).replace('"python"', '"python, reloaded"'))
    wait_until(lambda: http(daemon, "GET", "/ext/liveweb/hello/x")[1] == b'{"hello": "x", "from": "python, reloaded"}',
               message="the new Python route")
    assert "reloaded plugin liveweb" in daemon.log
    # Broken by an edit: dead, with its error; fixed: alive again.
    (daemon.plugin_folder / "live.lua").write_text("function query(text) return {\n")
    wait_until(lambda: any(d["name"] == "live" for d in get_json(daemon, "/plugins")["dead"]), message="live to be dead")
    (daemon.plugin_folder / "live.lua").write_text(_lua_version("3"))
    wait_until(lambda: http(daemon, "GET", "/search", {"query": "x", "provider": "live", "field": "Version"})[0] == 200
               and version() == "3", message="live to come back")


EVERYTHING = '''
    """A plugin with one of each: a store filter, an index field, a provider, a route, a web UI."""
    WEBUI = {"name": "everything", "version": "1.0.0",
             "dicoogle": {"slot-id": "menu", "caption": "Everything", "module-file": "everything.js"}}

    def incoming_store_filter(calling_aet, tags):
        return 0xA900 if tags.get("StudyDescription") == "REFUSE ME" else None

    def index(instance):
        return {"Everything": "YES"}

    def on_stored(instance):
        dicoogle.log("everything saw " + instance["SOPInstanceUID"])

    def query(text):
        return [{"uri": "e:1", "fields": {"SOPInstanceUID": "5.5"}}]

    def routes(app):
        @app.get("/ping")
        def ping():
            return {"pong": True}
'''
LUA_FIND_GUARD = '''
    function incoming_find_filter(calling_aet, query) return 0xA700 end
'''


@pytest.mark.parametrize("how", ["deleted", "moved away"])
def test_removing_a_plugin_file_unloads_the_plugin(archive, tmp_path, how):
    daemon = archive({"everything.py": EVERYTHING, "everything.js": PANEL_JS, "guard.lua": LUA_FIND_GUARD})
    refused = instance(0, 0, 0, 0, StudyDescription="REFUSE ME")
    assert daemon.store(refused) == [0xA900]
    assert daemon.find(make_identifier("STUDY", StudyInstanceUID=""))[1] == 0xA700
    assert "everything" in get_json(daemon, "/providers")
    assert get_json(daemon, "/ext/everything/ping") == {"pong": True}
    assert "everything" in {p["name"] for p in get_json(daemon, "/webui")["plugins"]}

    for name in ("everything.py", "guard.lua"):
        if how == "deleted":
            (daemon.plugin_folder / name).unlink()
        else:
            shutil.move(daemon.plugin_folder / name, tmp_path / name)
    wait_until(lambda: not {"everything", "guard"} & set(get_json(daemon, "/plugins")["sets"]),
               message="both plugins to be unloaded")
    assert "unloaded plugin everything" in daemon.log and "unloaded plugin guard" in daemon.log
    assert "everything" not in get_json(daemon, "/providers")
    assert http(daemon, "GET", "/search", {"query": "x", "provider": "everything"})[0] == 400
    assert http(daemon, "GET", "/ext/everything/ping")[0] == 404
    assert "everything" not in {p["name"] for p in get_json(daemon, "/webui")["plugins"]}
    assert http(daemon, "GET", "/webui/module/everything")[0] == 404
    assert daemon.store(refused) == [0]  # no filter any more
    assert daemon.find(make_identifier("STUDY", StudyInstanceUID=""))[1] == 0
    assert get_json(daemon, "/dump", uid=refused.SOPInstanceUID)["results"]["fields"].get("Everything") is None
    assert f"everything saw {refused.SOPInstanceUID}" not in daemon.log
    assert http(daemon, "POST", "/plugins/query/everything/disable")[0] == 400

    # Put back, it loads again.
    (daemon.plugin_folder / "everything.py").write_text(textwrap.dedent(EVERYTHING).lstrip("\n"))
    wait_until(lambda: "everything" in get_json(daemon, "/providers"), message="everything to be loaded again")
    assert get_json(daemon, "/ext/everything/ping") == {"pong": True}


TOGGLE = '''
    SETTINGS = {"enabled": True, "word": "alpha", "times": 2}

    def query(text):
        return [{"uri": "t:1", "fields": {"SOPInstanceUID": "7.7", "Word": dicoogle.setting("word") * dicoogle.setting("times")}}]
'''


def test_disable_enable_and_settings_through_the_api(archive):
    daemon = archive({"toggle.py": TOGGLE})
    assert "toggle" in get_json(daemon, "/providers")
    assert post_json(daemon, "/plugins/query/toggle/disable") == {"success": True, "enabled": False}
    assert "toggle" not in get_json(daemon, "/providers")
    assert http(daemon, "GET", "/search", {"query": "x", "provider": "toggle"})[0] == 400
    assert post_json(daemon, "/plugins/query/toggle/enable")["enabled"] is True
    assert search(daemon, "x", "toggle", ("Word",))["results"][0]["fields"]["Word"] == "alphaalpha"
    assert get_json(daemon, "/plugins/toggle/settings") == {"enabled": True, "word": "alpha", "times": 2}
    assert post_json(daemon, "/plugins/toggle/settings", {"word": "beta", "times": "3"})["times"] == 3
    assert search(daemon, "x", "toggle", ("Word",))["results"][0]["fields"]["Word"] == "betabetabeta"
    assert http(daemon, "POST", "/plugins/toggle/settings", {"times": "many"})[0] == 400
    assert http(daemon, "POST", "/plugins/toggle/settings", {"colour": "red"})[0] == 400
    assert http(daemon, "POST", "/plugins/query/toggle/disable", auth=False)[0] == 401
    # Both survive a restart.
    post_json(daemon, "/plugins/query/toggle/disable")
    daemon.restart()
    assert "toggle" not in get_json(daemon, "/providers")
    assert get_json(daemon, "/plugins/toggle/settings")["word"] == "beta"


def test_dead_plugins_are_listed_with_their_error(archive):
    daemon = archive({
        "syntax.py": "def broken(:\n",
        "raises.py": "raise RuntimeError('needs a licence key')\n",
        "syntax_lua.lua": "function query(text\n",
        "raises_lua.lua": "error('cannot start here')\n",
        "storage_lua.lua": 'SCHEME = "luastore"\n',
        "fine.lua": LUA_QUERY,
    })
    listing = get_json(daemon, "/plugins")
    dead = {d["name"]: d["error"] for d in listing["dead"]}
    assert set(dead) == {"syntax", "raises", "syntax_lua", "raises_lua", "storage_lua"}
    assert dead["syntax"].startswith("SyntaxError")
    assert "needs a licence key" in dead["raises"]
    assert "cannot start here" in dead["raises_lua"]
    assert "Python only" in dead["storage_lua"]
    assert "fine" in {p["name"] for p in listing["plugins"]}
    assert {d["name"] for d in get_json(daemon, "/plugins/dead")["dead"]} == set(dead)
    assert "plugin raises is dead: RuntimeError: needs a licence key" in daemon.log
    assert http(daemon, "POST", "/plugins/query/syntax/enable")[0] == 400


# ---- the Lua sandbox --------------------------------------------------------------------------

ESCAPES = r'''
    local function try(f, ...) local ok, err = pcall(f, ...) return { ok = ok, error = tostring(err) } end
    routes = {
      ["GET /globals"] = function(params)
        return { os_execute = type(os.execute), io = type(io), require = type(require), package = type(package),
                 debug = type(debug), dofile = type(dofile), loadfile = type(loadfile), python = type(python),
                 coroutine = type(coroutine), collectgarbage = type(collectgarbage),
                 string_dump = type(string.dump), string_meta_dump = type(("").dump), os_time = type(os.time) }
      end,
      ["GET /execute"] = function(params)
        return { execute = try(function() return os.execute("touch " .. params.path) end),
                 open = try(function() return io.open(params.path, "w") end),
                 require = try(function() return require("os") end),
                 getenv = try(function() return os.getenv("HOME") end) }
      end,
      ["GET /bytecode"] = function(params)
        local chunk, message = load("\27Lua\84\0\25\147\13\10\26\10\4\8\8\120\86\0\0\0\0\0\0\0\0\0\0\0\40\119\64")
        return { chunk = type(chunk), message = tostring(message),
                 dump = try(function() return string.dump(function() end) end) }
      end,
      ["GET /python"] = function(params)
        return { globals = try(function() return dicoogle.log.__globals__ end),
                 class = try(function() return dicoogle.search.__class__ end) }
      end,
      ["GET /rep"] = function(params) return try(function() return #string.rep("x", 2^28) end) end,
      ["GET /doubling"] = function(params) return try(function() local s = "x" while true do s = s .. s end end) end,
      ["GET /tables"] = function(params)
        return try(function() local t = {} for i = 1, 1e9 do t[i] = string.rep("y", 4096) .. i end end)
      end,
      ["GET /loop"] = function(params) while true do end end,
      ["GET /pcall-loop"] = function(params)
        while true do pcall(function() while true do end end) end
      end,
      ["GET /ok"] = function(params) return { ok = true } end,
    }
'''


def test_lua_sandbox_refuses_escapes_and_stops_runaways(archive, tmp_path):
    daemon = archive({"escape.lua": ESCAPES})
    missing = get_json(daemon, "/ext/escape/globals")
    assert missing.pop("os_time") == "function"  # os keeps its clock, nothing else
    assert set(missing.values()) == {"nil"}, missing

    target = tmp_path / "escaped"
    tried = get_json(daemon, "/ext/escape/execute", path=str(target))
    assert not any(result["ok"] for result in tried.values()), tried
    assert not target.exists()

    bytecode = get_json(daemon, "/ext/escape/bytecode")
    assert bytecode["chunk"] == "nil" and "binary chunk" in bytecode["message"]
    assert bytecode["dump"]["ok"] is False

    python = get_json(daemon, "/ext/escape/python")
    assert python["globals"]["ok"] is False and python["class"]["ok"] is False

    for bomb in ("rep", "doubling", "tables"):  # the memory cap
        result = get_json(daemon, f"/ext/escape/{bomb}")
        assert result["ok"] is False and re.search(r"memory|budget", result["error"]), result

    for runaway in ("loop", "pcall-loop"):  # the instruction budget, which pcall cannot swallow
        started = time.monotonic()
        status, body, _ = http(daemon, "GET", f"/ext/escape/{runaway}")
        assert status == 500 and time.monotonic() - started < 20
    assert daemon.log.count("instruction budget exceeded") >= 2
    assert get_json(daemon, "/ext/escape/ok") == {"ok": True}  # the runtime still works
    assert daemon.health()["status"] == "ok"


# Ways a script once ran Lua code outside its budget: metamethods called by the runtime (a __gc
# finalizer runs with hooks off) or while its answer was converted to Python, and many short C
# calls, which the instruction count does not see.
UNBUDGETED = r"""
    local function spin() while true do end end
    routes = {
      ["GET /tostring-key"] = function(params) return { [setmetatable({}, { __tostring = spin })] = true } end,
      ["GET /gc"] = function(params)
        setmetatable({}, { __gc = spin })
        for i = 1, 1e6 do local garbage = { i } end  -- the collector runs the finalizer
        return { collected = true }
      end,
      ["GET /metamethods"] = function(params)
        local events = {}
        for _, event in ipairs({ "__eq", "__lt", "__le", "__len", "__index", "__newindex", "__concat",
                                 "__pairs", "__call", "__tostring", "__close", "__unm", "__add" }) do
          events[event] = spin
        end
        local value = setmetatable({}, events)
        return { value = value, list = { value, value }, [value] = value }
      end,
      ["GET /error-object"] = function(params) error(setmetatable({}, { __tostring = spin })) end,
      ["GET /string-metatable"] = function(params)
        getmetatable("").__index = spin
        return { value = ("").anything }
      end,
      ["GET /close"] = function(params) local guard <close> = setmetatable({}, { __close = spin }) return {} end,
      ["GET /coroutine"] = function(params) return coroutine.wrap(spin)() end,
      ["GET /load"] = function(params) return load("while true do end", "loop", "t", {})() end,
      ["GET /c-calls"] = function(params)
        for i = 1, 1e9 do local big = string.rep("x", 2^24) end  -- 16 MiB, a few instructions a turn
      end,
      ["GET /shared"] = function(params)  -- one table, reached 2^40 ways
        local value = { "x" }
        for i = 1, 40 do value = { value, value } end
        return value
      end,
      ["GET /ok"] = function(params) return { ok = true } end,
    }
"""
UNBUDGETED_ROUTES = ["tostring-key", "gc", "metamethods", "error-object", "string-metatable", "close", "coroutine",
                     "load", "c-calls", "shared"]
HTTP_THREADS = 8  # [http] threads: this many requests take every worker
LUA_CALL_LIMIT = 60  # seconds a request may take here: eight calls in turn, each up to the budget, on a loaded machine


@pytest.mark.parametrize("route", UNBUDGETED_ROUTES)
def test_lua_code_never_runs_outside_the_budget(archive, route):
    daemon = archive({"trap.lua": UNBUDGETED})
    requests = 2 if route == "c-calls" else HTTP_THREADS  # c-calls run to the time limit, one after another
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(requests) as pool:
        answers = [pool.submit(http, daemon, "GET", f"/ext/trap/{route}", timeout=LUA_CALL_LIMIT)
                   for _ in range(requests)]
        assert http(daemon, "GET", "/health", timeout=LUA_CALL_LIMIT)[0] == 200  # others are served meanwhile
        for answer in answers:
            status, body, _ = answer.result()
            assert status == 500 and json.loads(body)["error"], (status, body)  # a JSON reason
    assert time.monotonic() - started < LUA_CALL_LIMIT
    assert daemon.log.count(f"GET /ext/trap/{route} failed: plugin trap failed: ") == requests
    assert get_json(daemon, "/ext/trap/ok") == {"ok": True}  # the runtime still works
    assert daemon.stop(timeout=15) == 0  # and SIGTERM stops the daemon in time


def test_reading_a_lua_scripts_globals_runs_none_of_its_code(archive):
    """The daemon reads a script's globals (SETTINGS, routes, hooks) when it loads it."""
    daemon = archive({"fine.lua": LUA_QUERY})
    (daemon.plugin_folder / "trap_globals.lua").write_text(
        "setmetatable(_G, { __index = function() while true do end end })\n")
    wait_until(lambda: any(d["name"] == "trap_globals" for d in get_json(daemon, "/plugins")["dead"]),
               timeout=LUA_CALL_LIMIT, message="the script to be refused")
    assert daemon.health()["status"] == "ok"
    assert daemon.stop(timeout=15) == 0


def test_a_lua_task_runs_under_the_budget(archive):
    daemon = archive({"trap_task.lua": """
        routes = { ["POST /start"] = function(params)
          return { uid = dicoogle.run_task("spin", function(progress) while true do end end) }
        end }
    """})
    uid = post_json(daemon, "/ext/trap_task/start")["uid"]

    def finished():
        return next((t for t in get_json(daemon, "/index/task")["results"] if t["taskUid"] == uid and t.get("complete")), None)
    assert wait_until(finished, timeout=LUA_CALL_LIMIT, message="the task to be stopped")["nErrors"] == 1
    assert "instruction budget exceeded" in daemon.log
    assert daemon.stop(timeout=15) == 0


CRASHING = {
    "crash_filter.py": '''
        def incoming_store_filter(calling_aet, tags):
            raise RuntimeError("python filter crashed")
    ''',
    "crash_index.py": '''
        def index(instance):
            raise ValueError("python index crashed")

        def on_stored(instance):
            raise RuntimeError("python on_stored crashed")
    ''',
    "crash_lua.lua": '''
        function incoming_store_filter(calling_aet, tags) while true do end end
        function on_stored(instance) error("lua on_stored crashed") end
        function index(instance) local t = {} while true do t[#t + 1] = string.rep("z", 65536) end end
    ''',
    "crash_orthanc.lua": '''
        function ReceivedInstanceFilter(tags, origin) error("orthanc filter crashed") end
    ''',
}


def test_crashing_plugins_never_lose_an_instance(archive, tmp_path):
    daemon = archive(CRASHING)
    first, second = instance(0, 0, 0, 0), instance(0, 0, 0, 1)
    started = time.monotonic()
    assert daemon.store(first) == [0]
    storescu(daemon, _written(tmp_path, second))
    assert time.monotonic() - started < 30
    assert uids_found(daemon) == {first.SOPInstanceUID, second.SOPInstanceUID}
    for message in ("python filter crashed", "python index crashed", "orthanc filter crashed", "instruction budget exceeded"):
        assert message in daemon.log, message
    wait_until(lambda: "python on_stored crashed" in daemon.log and "lua on_stored crashed" in daemon.log,
               message="the notify hooks' failures in the log")
    failures = {p["name"]: p["failures"] for p in get_json(daemon, "/plugins")["plugins"] if p["name"].startswith("crash")}
    assert all(count >= 2 for count in failures.values()), failures


# ---- new-plugin -------------------------------------------------------------------------------


def new_plugin(*args):
    return subprocess.run([sys.executable, str(ROOT / "dicoogled.py"), "new-plugin", *args],
                          capture_output=True, text=True)


KINDS = ("index", "query", "web", "webui", "events", "store-filter", "find-filter")


def test_new_plugin_copies_the_examples_under_a_new_name(archive, tmp_path):
    folder = tmp_path / "plugins-data"
    for language in ("python", "lua"):
        for kind in KINDS + (("storage",) if language == "python" else ()):
            result = new_plugin(f"my_{kind.replace('-', '_')}_{language}", "--lang", language, "--kind", kind,
                                "--dir", str(folder))
            assert result.returncode == 0, result.stderr
            assert "from plugins/examples/" in result.stdout
    assert (folder / "my_webui_python.js").exists() and (folder / "my_webui_lua.js").exists()
    assert '"module-file": "my_webui_python.js"' in (folder / "my_webui_python.py").read_text()
    assert 'SCHEME = "my-storage-python"' in (folder / "my_storage_python.py").read_text()
    refused = new_plugin("my_storage_lua", "--lang", "lua", "--kind", "storage", "--dir", str(folder))
    assert refused.returncode == 2 and "Python only" in refused.stderr
    assert new_plugin("my_index_python", "--kind", "index", "--dir", str(folder)).returncode == 1  # exists
    assert new_plugin("../evil", "--kind", "index", "--dir", str(folder)).returncode == 2
    assert not list((ROOT / "plugins").glob("dicoogled_*.py")), "the templates are files, not strings"
    assert not hasattr(dicoogled, "PLUGIN_TEMPLATES")

    # The refuse-everything filters would stop the test's own instances: OT is what they refuse.
    daemon = archive(config="[storage]\nscheme = my-storage-python\n")
    listing = get_json(daemon, "/plugins")
    assert listing["dead"] == []
    names = {p["name"] for p in listing["plugins"]}
    assert {f"my_{k.replace('-', '_')}_{l}" for l in ("python", "lua") for k in KINDS} <= names

    stored = instance(0, 0, BodyPartExamined="HEAD")
    assert daemon.store(stored) == [0]
    assert search(daemon, "BodyRegion:HEAD")["results"][0]["uri"] == f"my-storage-python:{stored.SOPInstanceUID}"
    assert daemon.store(instance(0, 0, 0, 1, Modality="OT")) == [0x0124]  # the store filters' default
    for language in ("python", "lua"):
        found = search(daemon, "*:*", f"my_query_{language}")["results"]
        assert [r["fields"]["SOPInstanceUID"] for r in found] == [stored.SOPInstanceUID]
        counted = get_json(daemon, f"/ext/my_web_{language}/count", query="Modality:CT")
        assert counted == {"query": "Modality:CT", "instances": 1}
        assert "this.render" in http(daemon, "GET", f"/webui/module/my_webui_{language}")[1].decode()
        wait_until(lambda: f"dicoogled.plugin.my_events_{language}: stored {stored.SOPInstanceUID} from TESTSCU" in daemon.log,
                   message=f"the {language} events plugin's log line")
    assert daemon.find(make_identifier("STUDY", StudyInstanceUID=""))[1] == 0xA700  # the find filters
    webui = {p["name"] for p in get_json(daemon, "/webui")["plugins"]}
    assert {"my_webui_python", "my_webui_lua"} <= webui


# ---- the docs -----------------------------------------------------------------------------------


def test_every_hook_and_orthanc_name_is_documented():
    docs = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    for name in list(dicoogled.HOOKS) + list(dicoogled.ORTHANC_CALLBACKS) + list(dicoogled.STORAGE_OPERATIONS):
        assert f"`{name}" in docs, f"{name} is not in docs/plugins.md"
    for name in (n for n in vars(dicoogled.PluginApi) if not n.startswith("_")):
        assert f"dicoogle.{name}" in docs, f"dicoogle.{name} is not in docs/plugins.md"
    for path in (ROOT / "plugins").iterdir():
        if path.suffix in (".py", ".lua") and path.stem in ("autoroute", "anonymize", "stats", "require_patient_id"):
            assert path.name in docs


def test_the_hook_table_in_the_docs_is_the_one_the_loaders_read():
    """docs/plugins.md's hook table is HOOK_SPECS, row for row; every hook is a kind new-plugin
    offers (a web UI plugin is the one kind that defines no hook)."""
    docs = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    rows = [line for line in docs.splitlines() if re.match(r"\| `\w+` \| ", line)
            and line.split("`")[1] in dicoogled.HOOKS]
    assert rows == [spec.doc_row() for spec in dicoogled.HOOK_SPECS]
    assert set(dicoogled.PLUGIN_KINDS) == {spec.plugin_kind for spec in dicoogled.HOOK_SPECS} | {"webui"}


def test_the_api_table_in_the_docs_is_the_one_the_lua_bridge_reads():
    """docs/plugins.md's table of the dicoogle API is API_CALLS, row for row, and API_CALLS names
    every public method of PluginApi (what Python plugins get): a call added to one and not the
    other fails here. A call Lua lacks says why."""
    docs = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    rows = [line for line in docs.splitlines() if line.startswith("| `dicoogle.")]
    assert rows == [call.doc_row() for call in dicoogled.API_CALLS]
    methods = {name for name, value in vars(dicoogled.PluginApi).items() if callable(value) and not name.startswith("_")}
    assert methods == {call.name for call in dicoogled.API_CALLS}
    for call in dicoogled.API_CALLS:
        assert set(call.binary) <= {parameter.name for parameter in call.parameters("lua")}, call.name
        assert not call.python_only or call.lua is None, call.name


def test_shipped_python_plugins_declare_the_api_they_are_given():
    """Each shipped Python plugin that calls dicoogle declares it (dicoogle = None): linters know
    the name, and no line needs a noqa."""
    for path in [*(ROOT / "plugins").glob("*.py"), *(ROOT / "plugins" / "examples").glob("*.py")]:
        text = path.read_text(encoding="utf-8")
        if "dicoogle." in text.split('"""', 2)[-1]:  # past the docstring
            assert re.search(r"^dicoogle = None\b", text, re.M), f"{path.name} does not declare dicoogle"
        assert "F821" not in text, path.name


def test_bundled_plugins_say_what_they_do_and_how_to_enable_them():
    for name in ("autoroute.lua", "anonymize.py", "stats.py", "require_patient_id.lua"):
        text = (ROOT / "plugins" / name).read_text(encoding="utf-8")
        head = text[:2500]
        assert "enabled" in head and "Hook" in head, name
        if name != "stats.py":  # the ones that act on data are off until configured
            assert re.search(r"enabled\s*=\s*false|\"enabled\": False", text), name
