"""The plugin API from Lua: each call Python has, made by a Lua plugin in a real daemon, and what it
does seen from outside (the index, the audit log, the bytes it answers, parsed with pydicom).

One daemon serves the module: its plugins folder holds `lua_api.lua`, a web service with a route
per call, and `py_api.py`, the same calls from Python, so that each answer can be compared with
what the Python API gives. Bytes leave the Lua plugin as hex (a route answers JSON); they reach
it as Lua strings.
"""

import concurrent.futures
import io
import json
import time

import pydicom
import pytest
from pydicom.data import get_testdata_file

from conftest import RunningDaemon
from test_plugins import ADMIN_ENV, dicoogled, get_json, http, instance, post_json, uids_found, write_plugins

EXPLICIT_VR_LITTLE_ENDIAN, RLE_LOSSLESS = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5"
LUA_CALL_LIMIT = 30  # seconds a request may take: the budget's time limit, a loaded machine, a margin

LUA_API = r"""
DESCRIPTION = "Each call of the API behind a route: bytes answered as hex"

local HEX, BYTE = {}, {}
for byte = 0, 255 do
  HEX[string.char(byte)] = string.format("%02x", byte)
  BYTE[string.format("%02x", byte)] = string.char(byte)
end
local function hex(data) return data and (data:gsub(".", HEX)) end
local function unhex(text) return (text:gsub("%x%x", BYTE)) end
local function uri(uid) return dicoogle.search("SOPInstanceUID:" .. uid, 1, { "SOPInstanceUID" })[1].uri end
-- About 2 instructions a turn: burn(6e6) spends more than half of the 20 million of a call.
local function burn(turns) local sum = 0 for i = 1, turns do sum = sum + i end return sum end

made = 0  -- how often cached had to make its bytes

-- Hooks that dicoogle.store runs while the route that called it waits: this script's own, again.
function incoming_store_filter(calling_aet, tags)
  if tags.PatientID == "REFUSED-BY-LUA" then return 0xA900 end
end
function index(instance) return { LuaApiOrigin = instance.origin } end

routes = {
  ["GET /calls"] = function(params)
    local names = {}
    for name in pairs(dicoogle) do names[#names + 1] = name end
    table.sort(names)
    return { calls = names }
  end,
  ["POST /store"] = function(params)
    local status, reason = dicoogle.store(unhex(params.data), params.source)
    return { status = status, reason = reason or "" }
  end,
  ["GET /render/<uid>"] = function(params)
    local png = dicoogle.render(uri(params.uid), 0, tonumber(params.size))
    if not png then return { rendered = false } end
    local width, height = string.unpack(">I4I4", png, 17)  -- the PNG's IHDR chunk
    return { rendered = true, signature = hex(png:sub(1, 8)), width = width, height = height }
  end,
  ["GET /pixels/<uid>"] = function(params) return { pixels = hex(dicoogle.pixels(uri(params.uid))) } end,
  ["GET /uncompressed/<uid>"] = function(params) return { file = hex(dicoogle.uncompressed(uri(params.uid))) } end,
  ["GET /transcoded/<uid>"] = function(params)
    return { file = hex(dicoogle.transcoded(uri(params.uid), params.syntax)) }
  end,
  ["GET /cached/<uid>"] = function(params)
    local data = dicoogle.cached(params.uid, function()
      made = made + 1
      return "\0\255 made " .. made  -- bytes, not text
    end)
    return { data = hex(data) or false, made = made }
  end,
  ["GET /audited/<study>/<uid>"] = function(params)
    dicoogle.audited("wado", { params.study }, nil, { params.uid }, nil, "read by lua_api")
    return { audited = true }
  end,
  ["GET /bad-bytes"] = function(params)
    local stored, store_error = pcall(dicoogle.store, 42)
    local cached, cached_error = pcall(dicoogle.cached, params.uid, function() return { "not", "bytes" } end)
    -- an error that came through the daemon is its error object: tostring gives the message
    return { stored = stored, store_error = store_error, cached = cached, cached_error = tostring(cached_error) }
  end,
  ["GET /cached-forever/<uid>"] = function(params)
    return { data = dicoogle.cached(params.uid, function() while true do end end) }
  end,
  ["GET /cached-burn/<uid>"] = function(params)  -- the outer call's instructions, then make's
    burn(tonumber(params.outer))
    local data = dicoogle.cached(params.uid, function() burn(tonumber(params.make)) return "burnt" end)
    return { data = data }
  end,
  ["GET /by-uri"] = function(params)  -- any URI, as a script could make one up
    local decoded, pixels_or_problem = pcall(dicoogle.pixels, params.uri)
    return { rendered = dicoogle.render(params.uri) ~= nil, decoded = decoded,
             problem = not decoded and tostring(pixels_or_problem) or nil }
  end,
  ["GET /ok"] = function(params) return { ok = true } end,
}
"""

PY_API = '''
    """The same calls from Python: bytes answered as hex."""
    dicoogle = None


    def routes(app):
        def uri(uid):
            return dicoogle.search("SOPInstanceUID:" + uid, 1, ["SOPInstanceUID"])[0]["uri"]

        @app.get("/pixels/<uid>")
        def pixels(uid):
            return {"pixels": dicoogle.pixels(uri(uid)).hex()}

        @app.get("/uncompressed/<uid>")
        def uncompressed(uid):
            return {"file": dicoogle.uncompressed(uri(uid)).hex()}
'''


class Archive:
    """The module's daemon, with the two plugins, and the instances the tests read."""

    def __init__(self, root):
        write_plugins(root / "plugins", {"lua_api.lua": LUA_API, "py_api.py": PY_API})
        self.daemon = RunningDaemon(root / "data", args=["--plugins-dir", str(root / "plugins")], env=ADMIN_ENV).start()
        self.ct = [instance(0, 0, 0, number) for number in range(4)]
        self.rle = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
        assert self.rle.file_meta.TransferSyntaxUID == RLE_LOSSLESS
        self.no_pixels = instance(1, 0, 0, 0)
        del self.no_pixels.PixelData
        assert self.daemon.store(*self.ct, self.rle, self.no_pixels) == [0] * 6


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    archive = Archive(tmp_path_factory.mktemp("lua-api"))
    yield archive
    archive.daemon.stop()


def from_hex(text: str) -> bytes:
    return bytes.fromhex(text)


def test_lua_has_every_call_python_has_but_the_file_handles(archive):
    """The calls a Lua script finds in dicoogle are API_CALLS', those it lacks each say why."""
    calls = get_json(archive.daemon, "/ext/lua_api/calls")["calls"]
    assert calls == sorted(call.name for call in dicoogled.API_CALLS if not call.python_only)
    assert set(calls) | {call.name for call in dicoogled.API_CALLS if call.python_only} == {
        name for name in vars(dicoogled.PluginApi) if not name.startswith("_")}
    assert {"store", "render", "pixels", "uncompressed", "transcoded", "cached", "audited"} <= set(calls)
    assert "open" not in calls


def test_store_from_lua_keeps_its_bytes_and_says_why_a_failure_failed(archive, tmp_path):
    daemon = archive.daemon
    new = instance(2, 0, 0, 0)
    path = tmp_path / "new.dcm"
    pydicom.dcmwrite(path, new, enforce_file_format=True)
    data = path.read_bytes()
    assert b"\0" in data and any(byte > 0x7F for byte in data)  # bytes that are not text
    assert post_json(daemon, "/ext/lua_api/store", {"data": data.hex(), "source": "LUA"}) == {"status": 0, "reason": ""}
    assert new.SOPInstanceUID in uids_found(daemon, f"PatientID:{new.PatientID}")
    status, stored, _ = http(daemon, "GET", "/legacy/file", {"uid": new.SOPInstanceUID})
    assert status == 200 and stored == data  # byte for byte what the script held

    assert new.SOPInstanceUID in uids_found(daemon, "LuaApiOrigin:stow")  # the script's own index hook ran

    refused = post_json(daemon, "/ext/lua_api/store", {"data": b"\xff\x00 not DICOM".hex()})
    assert refused["status"] != 0 and refused["reason"]
    pydicom.dcmwrite(path, instance(2, 0, 0, 1, PatientID="REFUSED-BY-LUA"), enforce_file_format=True)
    filtered = post_json(daemon, "/ext/lua_api/store", {"data": path.read_bytes().hex()})
    assert filtered == {"status": 0xA900, "reason": "refused by a store filter"}  # its own store filter too


def test_render_from_lua_gives_png_bytes_or_nil(archive):
    uid = archive.ct[0].SOPInstanceUID
    rendered = get_json(archive.daemon, f"/ext/lua_api/render/{uid}", size="32")
    assert rendered["signature"] == b"\x89PNG\r\n\x1a\n".hex()
    assert max(rendered["width"], rendered["height"]) == 32
    assert get_json(archive.daemon, f"/ext/lua_api/render/{archive.no_pixels.SOPInstanceUID}") == {"rendered": False}


def test_pixels_from_lua_are_the_decoded_frame(archive):
    uid = archive.rle.SOPInstanceUID
    pixels = from_hex(get_json(archive.daemon, f"/ext/lua_api/pixels/{uid}")["pixels"])
    assert pixels == from_hex(get_json(archive.daemon, f"/ext/py_api/pixels/{uid}")["pixels"])
    rows, columns, bits = archive.rle.Rows, archive.rle.Columns, archive.rle.BitsAllocated
    assert len(pixels) == rows * columns * bits // 8
    assert pixels == pydicom.dcmread(get_testdata_file("MR_small.dcm")).PixelData  # the same image, uncompressed


def test_uncompressed_from_lua_is_a_part10_file_in_explicit_little_endian(archive):
    uid = archive.rle.SOPInstanceUID
    data = from_hex(get_json(archive.daemon, f"/ext/lua_api/uncompressed/{uid}")["file"])
    assert data == from_hex(get_json(archive.daemon, f"/ext/py_api/uncompressed/{uid}")["file"])
    dataset = pydicom.dcmread(io.BytesIO(data))
    assert dataset.file_meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN and dataset.SOPInstanceUID == uid
    assert dataset.PixelData == pydicom.dcmread(get_testdata_file("MR_small.dcm")).PixelData


def test_transcoded_from_lua_is_in_the_syntax_asked_for(archive):
    original = archive.ct[1]
    answer = get_json(archive.daemon, f"/ext/lua_api/transcoded/{original.SOPInstanceUID}", syntax=RLE_LOSSLESS)
    dataset = pydicom.dcmread(io.BytesIO(from_hex(answer["file"])))
    assert dataset.file_meta.TransferSyntaxUID == RLE_LOSSLESS
    assert dataset.SOPInstanceUID == original.SOPInstanceUID and dataset.PixelData != original.PixelData
    status, body, _ = http(archive.daemon, "GET", f"/ext/lua_api/transcoded/{original.SOPInstanceUID}", {"syntax": "1.2.3"})
    assert status == 500 and json.loads(body)["error"]  # a syntax it cannot make: an error in Lua, with its reason


def test_cached_from_lua_makes_its_bytes_once(archive):
    daemon, uid = archive.daemon, archive.ct[2].SOPInstanceUID
    first = get_json(daemon, f"/ext/lua_api/cached/{uid}")
    assert from_hex(first["data"]) == b"\0\xff made 1" and first["made"] == 1
    assert get_json(daemon, f"/ext/lua_api/cached/{uid}") == first  # kept: make did not run again
    kept = list((daemon.node_dir / "cache" / "plugin-lua_api").rglob("*"))
    assert any(path.is_file() and path.read_bytes().endswith(b"\0\xff made 1") for path in kept), kept
    assert get_json(daemon, "/ext/lua_api/cached/1.2.3.404") == {"data": False, "made": 1}  # no such instance


def test_audited_from_lua_names_what_a_request_touched(archive):
    daemon, read = archive.daemon, archive.ct[3]
    assert get_json(daemon, f"/ext/lua_api/audited/{read.StudyInstanceUID}/{read.SOPInstanceUID}") == {"audited": True}
    entries = get_json(daemon, "/audit", action="wado")["results"]
    entry = next(e for e in entries if e["request"].startswith("GET /ext/lua_api/audited/"))
    assert entry["studies"] == [read.StudyInstanceUID] and entry["instances"] == [read.SOPInstanceUID]
    assert entry["detail"] == "read by lua_api"


def test_calls_by_uri_read_the_archive_only(archive, tmp_path):
    """A file the daemon could read but does not hold is out of a script's reach (Lua has no io)."""
    outside = tmp_path / "outside.dcm"
    pydicom.dcmwrite(outside, instance(3, 0, 0, 0), enforce_file_format=True)
    answer = get_json(archive.daemon, "/ext/lua_api/by-uri", uri=outside.as_uri())
    assert answer["rendered"] is False and answer["decoded"] is False and "no stored instance" in answer["problem"]
    stored = get_json(archive.daemon, "/ext/lua_api/by-uri", uri=_uri_of(archive, archive.ct[0].SOPInstanceUID))
    assert stored["rendered"] is True and stored["decoded"] is True


def _uri_of(archive, uid: str) -> str:
    found = get_json(archive.daemon, "/search", query=f"SOPInstanceUID:{uid}", field=["SOPInstanceUID"])["results"]
    return found[0]["uri"]


def test_bytes_from_lua_must_be_strings(archive):
    answer = get_json(archive.daemon, "/ext/lua_api/bad-bytes", uid=archive.ct[0].SOPInstanceUID)
    assert answer["stored"] is False and "data must be a string of bytes, not number" in answer["store_error"]
    assert answer["cached"] is False and "must be a string of bytes, not table" in answer["cached_error"]


def _stopped_by_the_budget(daemon, path: str, **params):
    started = time.monotonic()
    status, body, _ = http(daemon, "GET", path, params, timeout=LUA_CALL_LIMIT)
    assert time.monotonic() - started < LUA_CALL_LIMIT
    assert status == 500 and json.loads(body)["error"], (status, body)  # a 500 tells its reason to the log only
    failures = [line for line in daemon.log.splitlines() if f"GET {path} failed: plugin lua_api failed: " in line]
    assert failures and "instruction budget exceeded" in failures[-1], failures


def test_a_cached_make_function_that_loops_forever_is_stopped_by_the_budget(archive):
    daemon, uid = archive.daemon, archive.ct[3].SOPInstanceUID
    _stopped_by_the_budget(daemon, f"/ext/lua_api/cached-forever/{uid}")
    assert daemon.health()["status"] == "ok"  # the daemon keeps answering
    assert get_json(daemon, "/ext/lua_api/ok") == {"ok": True}  # and the plugin too
    # Nothing was kept for the instance: the next make runs.
    assert from_hex(get_json(daemon, f"/ext/lua_api/cached/{uid}")["data"]).startswith(b"\0\xff made ")


def test_a_cached_make_function_spends_the_budget_of_the_call_that_asked(archive):
    """Each half fits in one call's budget; both in one call do not."""
    daemon = archive.daemon
    first, second = archive.ct[0].SOPInstanceUID, archive.ct[1].SOPInstanceUID
    assert get_json(daemon, f"/ext/lua_api/cached-burn/{first}", outer="6e6", make="0") == {"data": "burnt"}
    assert get_json(daemon, f"/ext/lua_api/cached-burn/{second}", outer="0", make="6e6") == {"data": "burnt"}
    third = archive.rle.SOPInstanceUID
    _stopped_by_the_budget(daemon, f"/ext/lua_api/cached-burn/{third}", outer="6e6", make="6e6")
    assert get_json(daemon, "/ext/lua_api/ok") == {"ok": True}


# Two scripts that store at once, each through the other's store filter and index hook: each
# waits for the other, which is busy in its own route.
PAIR = r"""
local BYTE = {}
for byte = 0, 255 do BYTE[string.format("%02x", byte)] = string.char(byte) end

function incoming_store_filter(calling_aet, tags) return true end
function index(instance) return { Seen = "yes" } end

routes = { ["POST /store"] = function(params)
  dicoogle.label_study(params.study, "ME-ready")
  for turn = 1, 100000 do  -- until the other script is in its route too
    if #dicoogle.labelled("STUDY", "OTHER-ready") > 0 then break end
  end
  local status = dicoogle.store((params.data:gsub("%x%x", BYTE)))
  return { status = status }
end }
"""


def test_two_scripts_storing_through_each_other_never_wait_forever(start_daemon, tmp_path):
    plugins = {f"pair_{me}.lua": PAIR.replace("ME", me).replace("OTHER", other) for me, other in (("a", "b"), ("b", "a"))}
    write_plugins(tmp_path / "plugins", plugins)
    daemon = start_daemon(args=["--plugins-dir", str(tmp_path / "plugins")], env=ADMIN_ENV)
    first = instance(0, 0, 0, 0)
    assert daemon.store(first) == [0]
    files = {}
    for me, number in (("a", 1), ("b", 2)):
        files[me] = tmp_path / f"{me}.dcm"
        pydicom.dcmwrite(files[me], instance(0, 0, 0, number), enforce_file_format=True)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(post_json, daemon, f"/ext/pair_{me}/store",
                               {"study": first.StudyInstanceUID, "data": files[me].read_bytes().hex()}) for me in files]
        assert [answer.result(timeout=4 * dicoogled.LUA_NESTED_WAIT + 30) for answer in answers] == [{"status": 0}] * 2
    assert time.monotonic() - started < 4 * dicoogled.LUA_NESTED_WAIT + 30
    assert "busy in another thread" in daemon.log  # a hook that waited too long failed, and was counted
    assert len(uids_found(daemon)) == 3 and daemon.health()["status"] == "ok"
