"""DICOMweb (PS3.18): QIDO-RS, WADO-RS, STOW-RS and WADO-URI, served at /dicom-web.

Web viewers (OHIF and other Cornerstone apps), AI pipelines and scripts speak DICOMweb. This plugin
is a whole service built only on the plugin API: searches use the same index and matching rules as
C-FIND (`dicoogle.find`), stores go through the one ingest path (`dicoogle.store`), retrievals
stream the stored files, and what needs pixels decoded (rendered images, decoded frames, files
converted to Explicit VR Little Endian or a lossless encoding) asks the daemon's codec worker (`dicoogle.render`,
`dicoogle.pixels`, `dicoogle.transcoded`), so no codec runs in the daemon itself.

Enabled by default: it serves nothing the REST API does not, and with the same logins (a token, or
HTTP Basic for DICOMweb clients). Settings ([plugin.dicomweb] in the config file):
  cors_origins   browser origins allowed to call it: "" none, "*" any, or a space-separated list
  max_results    most QIDO-RS matches answered when the request sets no limit

Routes (relative to /dicom-web):
  QIDO-RS   GET /studies  /series  /instances  /studies/{study}/series  /studies/{study}/instances
            GET /studies/{study}/series/{series}/instances
            label=NAME (an extension): only what carries the label, on its study or a series
  WADO-RS   GET /studies/{study}[/series/{series}[/instances/{instance}]]       multipart application/dicom
            GET .../metadata                                                   application/dicom+json
            GET .../instances/{instance}/frames/{1,2,...}                       raw or compressed frames
            GET .../rendered  .../thumbnail                                    image/jpeg or image/png
            GET .../instances/{instance}/bulkdata/{tag}                        bulk data of one element
  STOW-RS   POST /studies  /studies/{study}                                    multipart application/dicom
  WADO-URI  GET /wado?requestType=WADO&studyUID=&seriesUID=&objectUID=&contentType=
"""

import io
import json
import os
import re
import secrets
import tempfile

import bottle
import multipart
import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.encaps import get_frame

dicoogle = None  # the plugin API: the daemon gives it when it loads this file (docs/plugins.md)
MOUNT = "/dicom-web"
SETTINGS = {"enabled": True, "cors_origins": "", "max_results": 1000}

DICOM_JSON = "application/dicom+json"
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: The attributes PS3.18 table 10.6.3-3/4/5 asks QIDO-RS to return at each level.
REQUIRED_KEYS = {
    "STUDY": ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
              "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
              "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "SERIES": ("Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber", "StudyInstanceUID",
               "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime"),
    "IMAGE": ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
              "NumberOfFrames", "StudyInstanceUID", "SeriesInstanceUID"),
}
#: includefield=all adds these to the required ones (the main attributes of every level).
ALL_KEYS = ("StudyDate", "StudyTime", "AccessionNumber", "StudyDescription", "ReferringPhysicianName",
            "InstitutionName", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "IssuerOfPatientID",
            "Modality", "SeriesDescription", "SeriesNumber", "SeriesDate", "SeriesTime", "BodyPartExamined",
            "ProtocolName", "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
QIDO_CONTROL = {"limit", "offset", "includefield", "fuzzymatching", "label"}
UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
#: What a retrieve converts to when asked (transfer-syntax= in Accept): uncompressed, or a lossless
#: encoding (RLE, JPEG-LS, JPEG 2000 lossless). Never a lossy one: a copy would lose what the file has.
CONVERTED_TO = (EXPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90")
#: Media types of compressed frames, by transfer syntax (PS3.18 table 8.7.3-2).
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
# STOW-RS failure reasons (PS3.18 table 10.5.3-2 uses the C-STORE statuses).
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
STUDY_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
SPOOL_IN_MEMORY = 8 * 1024 * 1024  # parts larger than this go to a temp file in the data dir


# ---- small helpers ------------------------------------------------------------------------------

def _error(status: int, message: str):
    raise bottle.HTTPResponse(json.dumps({"error": message}), status, {"Content-Type": "application/json"})


def _uid(value: str, name: str) -> str:
    if not UID_PATTERN.match(value or "") or len(value) > 64:
        _error(400, f"{name} must be a UID, not {value[:80]!r}")
    return value


def _attribute(name: str) -> str:
    """One name per attribute: its keyword for a tag given as 8 hex digits (PatientID for
    00100020), so that a tag and its keyword in one request are the same key."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return keyword_for_tag(int(name, 16)) or name.upper()
    return name


def _base_url() -> str:
    parts = bottle.request.urlparts
    netloc = parts.netloc
    port = bottle.request.environ.get("SERVER_PORT", "")
    # Some clients (dicomweb-client) send a Host header without the port.
    if ":" not in netloc.rsplit("]", 1)[-1] and port not in ("", "80", "443"):
        netloc = f"{netloc}:{port}"
    # The path a reverse proxy serves the archive under ([http] public_url), if any.
    return f"{parts.scheme}://{netloc}{bottle.request.script_name.rstrip('/')}{MOUNT}"


def _allow_cors():
    origins = str(dicoogle.setting("cors_origins", "")).split()
    origin = bottle.request.get_header("Origin")
    if origin and ("*" in origins or origin in origins):
        bottle.response.set_header("Access-Control-Allow-Origin", origin)
        bottle.response.set_header("Access-Control-Allow-Credentials", "true")
        bottle.response.set_header("Access-Control-Expose-Headers", "Content-Type, Warning")


def _int_param(name: str, default: int) -> int:
    raw = bottle.request.query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit():
        _error(400, f"{name} must be a whole number ≥ 0, not {raw[:40]!r}")
    return int(raw)


def _accepts(*media_types: str) -> bool:
    """Does the Accept header allow one of media_types (missing or */* allows all)?"""
    accept = bottle.request.get_header("Accept", "*/*")
    for item in accept.split(","):
        media = item.split(";")[0].strip().lower()
        if media in ("*/*", "*") or media in media_types or (media.endswith("/*") and any(m.startswith(media[:-1]) for m in media_types)):
            return True
    return False


def _requested_transfer_syntax() -> str:
    """The transfer-syntax parameter of the Accept header: '*' (as stored) unless asked."""
    match = re.search(r'transfer-syntax\s*=\s*"?([0-9.*]+)"?', bottle.request.get_header("Accept", ""))
    return match.group(1) if match else "*"


def _multipart(parts, content_type: str):
    """Stream (headers, bytes-or-chunks) parts as multipart/related; the body is never held whole."""
    boundary = secrets.token_hex(16)
    bottle.response.content_type = f'multipart/related; type="{content_type}"; boundary={boundary}'

    def body():
        for headers, payload in parts:
            yield (f"--{boundary}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
            if isinstance(payload, bytes):
                yield payload
            else:
                yield from payload
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()
    return body()


def _open(uri: str):
    """A stored instance, named by its URI, as a binary file: a file on disk, or a storage plugin's object."""
    source = dicoogle.open(uri)
    return open(source, "rb") if isinstance(source, str) else source


def _file_chunks(uri: str, size: int = 1 << 20):
    with _open(uri) as handle:
        while chunk := handle.read(size):
            yield chunk


# ---- QIDO-RS ----------------------------------------------------------------------------------

def _qido(level: str, fixed: dict):
    """Answer a QIDO-RS search with C-FIND's matching (dicoogle.find)."""
    _allow_cors()
    dicoogle.audited("qido", detail=level)
    if not _accepts(DICOM_JSON, "application/json"):
        _error(406, "QIDO-RS answers application/dicom+json")
    limit = _int_param("limit", int(dicoogle.setting("max_results", 1000)))
    offset = _int_param("offset", 0)
    filters, included = {}, []
    for name in bottle.request.query.keys():
        values = bottle.request.query.getall(name)
        if name == "includefield":
            for value in ",".join(values).split(","):
                included.extend(ALL_KEYS if value == "all" else [_attribute(value)] if value else [])
        elif name not in QIDO_CONTROL:
            attribute = _attribute(name)
            filters[attribute] = "\\".join(values).replace(",", "\\") if attribute.endswith("UID") else values[-1]
    # Filters come last: an attribute both filtered and named in includefield is matched (and
    # returned), never turned into a return-only key, whatever the order of the parameters.
    keys = dict.fromkeys(REQUIRED_KEYS[level], "") | dict.fromkeys(included, "") | filters | fixed
    if "label" in bottle.request.query and not _narrow_to_label(level, keys, bottle.request.query.getall("label")):
        bottle.response.content_type = DICOM_JSON
        return "[]"
    if bottle.request.query.get("fuzzymatching") == "true":
        bottle.response.set_header("Warning", '299 dicoogled "fuzzymatching is not supported; names match case- and accent-insensitively"')
    try:
        datasets = list(dicoogle.find(level, keys, offset=offset, limit=limit))
    except ValueError as error:  # keys C-FIND would refuse, with dicoogle.find's reason
        _error(400, str(error))
    # The audit log keeps the studies answered and their number, never the query's values.
    dicoogle.audited(studies=[str(dataset.get("StudyInstanceUID", "")) for dataset in datasets], count=len(datasets))
    results = [_qido_json(level, dataset) for dataset in datasets]
    bottle.response.content_type = DICOM_JSON
    return json.dumps(results)


def _narrow_to_label(level: str, keys: dict, labels: list) -> bool:
    """label=NAME, dicoogled's extension to QIDO-RS: only what carries the label (on its study or
    series, as label:NAME in the search language). It becomes a list of UIDs matched as C-FIND
    matches any UID list (PS3.4 C.2.2.2.2), so paging stays the index's. Each label= narrows
    further. False when nothing can match."""
    # Studies by their own UIDs; series and instances by their series' UIDs.
    key = "StudyInstanceUID" if level == "STUDY" else "SeriesInstanceUID"
    allowed = None
    for label in labels:
        try:
            found = set(dicoogle.labelled("STUDY" if level == "STUDY" else "SERIES", label))
        except ValueError as error:
            _error(400, f"label: {error}")
        allowed = found if allowed is None else allowed & found
    if keys.get(key):
        allowed &= set(keys[key].split("\\"))
    if not allowed:
        return False
    keys[key] = "\\".join(sorted(allowed))
    return True


def _qido_json(level: str, dataset) -> dict:
    del dataset.QueryRetrieveLevel
    url = f"{_base_url()}/studies/{dataset.get('StudyInstanceUID', '')}"
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{dataset.get('SeriesInstanceUID', '')}"
    if level == "IMAGE":
        url += f"/instances/{dataset.get('SOPInstanceUID', '')}"
    result = dataset.to_json_dict(suppress_invalid_tags=True)
    result["00081190"] = {"vr": "UR", "Value": [url]}
    return result


# ---- WADO-RS ----------------------------------------------------------------------------------

def _instances(study, series="", instance=""):
    # Every WADO-RS retrieval (files, metadata, frames, bulk data, rendered) goes through here: its
    # audit entry names what was asked for, and how many instances were found.
    dicoogle.audited("wado", studies=study, series=series, instances=instance)
    found = dicoogle.instances(_uid(study, "study"), series and _uid(series, "series"), instance and _uid(instance, "instance"))
    dicoogle.audited(count=len(found))
    if not found:
        _error(404, "no such study, series or instance")
    return found


def _retrieve(study, series="", instance=""):
    """Instances as multipart/related application/dicom: as stored, or decoded on request."""
    _allow_cors()
    if not _accepts("multipart/related", "application/dicom"):
        _error(406, 'WADO-RS retrieves multipart/related; type="application/dicom"')
    wanted = _requested_transfer_syntax()
    found = _instances(study, series, instance)
    if wanted not in ("*", *CONVERTED_TO) and any(ts != wanted for _, _, ts, _ in found):
        _error(406, f"cannot convert to transfer syntax {wanted}; ask for * (as stored) or one of {', '.join(CONVERTED_TO)}")

    def parts():
        for _, _, stored_syntax, uri in found:
            if wanted == "*" or stored_syntax == wanted:
                yield {"Content-Type": f"application/dicom; transfer-syntax={stored_syntax}"}, _file_chunks(uri)
            else:
                yield {"Content-Type": f"application/dicom; transfer-syntax={wanted}"}, _converted_file(uri, wanted)
    return _multipart(parts(), "application/dicom")


def _converted_file(uri: str, transfer_syntax: str) -> bytes:
    try:  # decoded (and encoded again) in the daemon's codec worker, as every pixel is
        return dicoogle.transcoded(uri, transfer_syntax)
    except ValueError as error:
        _error(406, f"cannot convert {os.path.basename(uri)} to {transfer_syntax}: {error}")


def _metadata(study, series="", instance=""):
    """Every instance's attributes as DICOM JSON; bulk data (pixels) as BulkDataURIs."""
    _allow_cors()
    base = _base_url()
    # Each instance's JSON is made once (a parse of its file) and kept by dicoogle.cached, its
    # bulk data URIs relative: the server's address is the request's, added here.
    parts = [dicoogle.cached(sop_uid, lambda uri=uri: _instance_metadata(uri))
             for sop_uid, _, _, uri in _instances(study, series, instance)]
    bottle.response.content_type = DICOM_JSON
    text = b"[" + b",".join(part for part in parts if part) + b"]"
    return text.replace(b'"BulkDataURI": "/studies/', b'"BulkDataURI": "' + base.encode() + b"/studies/")


def _instance_metadata(uri: str) -> bytes:
    """One instance as DICOM JSON, with BulkDataURIs relative to the DICOMweb root."""
    dataset = pydicom.dcmread(dicoogle.open(uri), stop_before_pixels=True)
    instance_url = f"/studies/{dataset.StudyInstanceUID}/series/{dataset.SeriesInstanceUID}/instances/{dataset.SOPInstanceUID}"
    json_dict = dataset.to_json_dict(
        bulk_data_threshold=1024, suppress_invalid_tags=True,
        bulk_data_element_handler=lambda element: f"{instance_url}/bulkdata/{element.tag:08X}",
    )
    pixel_vr = "OB" if dataset.file_meta.TransferSyntaxUID not in UNCOMPRESSED or dataset.get("BitsAllocated", 16) <= 8 else "OW"
    json_dict["7FE00010"] = {"vr": pixel_vr, "BulkDataURI": f"{instance_url}/bulkdata/7FE00010"}
    return json.dumps(json_dict).encode("utf-8")


def _frame_layout(uri: str):
    """(header data set, transfer syntax, file offset of the pixel value, frame count, frame size)."""
    dataset = pydicom.dcmread(dicoogle.open(uri), defer_size=1024)
    if "PixelData" not in dataset:
        _error(404, "this instance has no pixel data")
    element = dataset.get_item(0x7FE00010, keep_deferred=True)
    syntax = str(dataset.file_meta.TransferSyntaxUID)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    samples = int(dataset.get("SamplesPerPixel", 1))
    frame_bits = int(dataset.Rows) * int(dataset.Columns) * samples * int(dataset.BitsAllocated)
    return dataset, syntax, element.value_tell, frames, (frame_bits + 7) // 8


def _frame_bytes(uri: str, number: int):
    """One frame (1-based) as stored: raw pixels, or the compressed bitstream."""
    dataset, syntax, offset, frames, size = _frame_layout(uri)
    if not 1 <= number <= frames:
        _error(404, f"frame {number} does not exist; the instance has {frames}")
    with _open(uri) as handle:
        handle.seek(offset)
        if syntax in UNCOMPRESSED:
            handle.seek(offset + (number - 1) * size)
            return syntax, handle.read(size)
        return syntax, get_frame(handle, number - 1, number_of_frames=frames)


def _frames(study, series, instance, frame_list):
    _allow_cors()
    try:
        numbers = [int(n) for n in frame_list.split(",")]
    except ValueError:
        _error(400, "frames are 1-based numbers separated by commas")
    if not numbers or min(numbers) < 1:
        _error(400, "frames are 1-based numbers separated by commas")
    (_, _, _, uri), = _instances(study, series, instance)
    octet = _accepts("application/octet-stream") and "application/octet-stream" in bottle.request.get_header("Accept", "") \
        and _requested_transfer_syntax() in ("*", EXPLICIT_VR_LITTLE_ENDIAN)

    first = _frame_bytes(uri, numbers[0])[0]  # 404 for a missing frame before streaming starts
    decode = first not in UNCOMPRESSED and octet and _requested_transfer_syntax() == EXPLICIT_VR_LITTLE_ENDIAN
    # Decoded frames are made before the answer starts, so that a failure is still an error status.
    decoded = {number: _decoded_frame(uri, number) for number in numbers} if decode else {}

    def parts():
        for number in numbers:
            syntax, data = _frame_bytes(uri, number)
            if syntax in UNCOMPRESSED:
                yield {"Content-Type": "application/octet-stream; transfer-syntax=" + EXPLICIT_VR_LITTLE_ENDIAN}, data
            elif decode:
                yield {"Content-Type": "application/octet-stream"}, decoded[number]
            else:
                yield {"Content-Type": f"{FRAME_MEDIA_TYPES.get(syntax, 'application/octet-stream')}; transfer-syntax={syntax}"}, data
    media = "application/octet-stream" if first in UNCOMPRESSED else FRAME_MEDIA_TYPES.get(first, "application/octet-stream")
    return _multipart(parts(), media)


def _decoded_frame(uri: str, number: int) -> bytes:
    try:  # decoded in the daemon's codec worker: this plugin never imports numpy or pydicom.pixels
        return dicoogle.pixels(uri, number - 1)
    except ValueError as error:
        _error(406, f"cannot decode frame {number}: {error}")


def _bulkdata(study, series, instance, tag):
    _allow_cors()
    if not re.fullmatch(r"[0-9A-Fa-f]{8}", tag):
        _error(400, "a bulk data tag is 8 hex digits")
    (_, _, _, uri), = _instances(study, series, instance)
    if tag.upper() == "7FE00010":
        _, syntax, _, frames, _ = _frame_layout(uri)
        parts = (({"Content-Type": "application/octet-stream"}, _frame_bytes(uri, n)[1]) for n in range(1, frames + 1))
        return _multipart(parts, "application/octet-stream")
    dataset = pydicom.dcmread(dicoogle.open(uri), stop_before_pixels=True)
    element = dataset.get(int(tag, 16))
    if element is None or not isinstance(element.value, bytes):
        _error(404, f"no bulk data element {tag}")
    return _multipart([({"Content-Type": "application/octet-stream"}, element.value)], "application/octet-stream")


def _rendered(study, series="", instance="", frame=1, thumbnail=False):
    """An instance (the first of a study or series) rendered to JPEG or PNG."""
    _allow_cors()
    (_, _, _, uri) = _instances(study, series, instance)[0]
    media = "image/png" if _accepts("image/png") and "image/png" in bottle.request.get_header("Accept", "") else "image/jpeg"
    window = bottle.request.query.get("window", "")
    viewport = bottle.request.query.get("viewport", "")
    try:
        center, width = ([float(v) for v in window.split(",")[:2]] if window else (None, None))
        size = int(viewport.split(",")[0]) if viewport else (128 if thumbnail else None)
        quality = int(bottle.request.query.get("quality", "90"))
    except ValueError:
        _error(400, "window is center,width[,function]; viewport is width,height; quality a number")
    image = dicoogle.render(uri, frame - 1, size=size, center=center, width=width, media_type=media, quality=quality)
    if image is None:
        _error(406, "this instance cannot be rendered")
    bottle.response.content_type = media
    return image


# ---- STOW-RS ------------------------------------------------------------------------------------

class _RelatedParser(multipart.PushMultipartParser):
    """The multipart package's streaming parser, for multipart/related: PS3.18's parts carry a
    Content-Type but no Content-Disposition, which its form-data parser requires."""

    def _create_segment(self, headerlist):
        return multipart.MultipartSegment(headerlist)


def iter_multipart(stream, boundary: bytes, chunk_size: int = 1 << 16):
    """Yield (headers, spooled file) for each part of a multipart/related body read from a stream:
    the body is never held whole, and large parts are spooled to temporary files in the data dir
    (PS3.18 bodies can be GBs). Raises multipart.MultipartError for a malformed body, one cut
    short included (an empty chunk, the end of the stream, makes the parser check)."""
    with _RelatedParser(boundary, max_header_count=32) as parser:
        headers, body = {}, None
        while not parser.closed:
            for event in parser.parse(stream.read(chunk_size)):
                if isinstance(event, multipart.MultipartSegment):  # a part begins: its headers
                    headers = {name.lower(): value for name, value in event.headerlist}
                    body = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
                elif event is None:  # the part ends
                    body.seek(0)
                    yield headers, body
                else:
                    body.write(event)


def _stow(study=None):
    _allow_cors()
    if study is not None:
        _uid(study, "study")
    content_type = bottle.request.get_header("Content-Type", "")
    kind = content_type.split(";")[0].strip().lower()
    parameters = dict(re.findall(r';\s*([\w-]+)\s*=\s*"?([^";]+)"?', content_type))
    if kind != "multipart/related" or "boundary" not in parameters:
        _error(415, 'STOW-RS takes multipart/related; type="application/dicom" with a boundary')
    if parameters.get("type", "application/dicom").lower() != "application/dicom":
        _error(415, "only application/dicom parts are supported")
    stored, failed = [], []
    dicoogle.audited("stow")
    try:
        for headers, body in iter_multipart(bottle.request.body, parameters["boundary"].encode("latin-1")):
            with body:
                data = body.read()
            _stow_part(data, headers, study, stored, failed)
    except multipart.MultipartError as error:
        if not stored and not failed:
            _error(400, f"malformed multipart body: {error}")
        failed.append(_failure({}, PROCESSING_FAILURE, f"malformed multipart body: {error}"))
    except OSError as error:  # a large part could not be spooled: the data disk is full
        failed.append(_failure({}, OUT_OF_RESOURCES, "cannot spool a part: " + (error.strerror or str(error))))
        dicoogle.log(f"STOW-RS: cannot spool a part: {error}", "error")
    dicoogle.audited(instances=[item["00081155"]["Value"][0] for item in stored], count=len(stored),
                     detail=f"{len(failed)} failed" if failed else None)
    response = {"00081190": {"vr": "UR", "Value": [f"{_base_url()}/studies/{study}" if study else _base_url() + "/studies"]}}
    if stored:
        response["00081199"] = {"vr": "SQ", "Value": stored}
    if failed:
        response["00081198"] = {"vr": "SQ", "Value": failed}
    # PS3.18 10.5.3: 409 when nothing was stored, 202 when some was, each failure with its
    # reason; A700 (out of resources) also gets a Warning saying so, in words.
    bottle.response.status = 200 if not failed else 202 if stored else 409
    if any(item["00081197"]["Value"] == [OUT_OF_RESOURCES] for item in failed):
        bottle.response.set_header("Warning", '299 dicoogled "out of resources: the data disk is full or below its free-space reserve, or a storage quota is reached"')
    bottle.response.content_type = DICOM_JSON
    return json.dumps(response)


def _failure(reference: dict, status: int, reason: str) -> dict:
    """A Failed SOP Sequence item: the C-STORE status as Failure Reason, and why in words, as
    the Error Comment a C-STORE response would carry (PS3.18 names no text attribute for it)."""
    return {**reference, "00081197": {"vr": "US", "Value": [status]}, "00000902": {"vr": "LO", "Value": [reason]}}


def _stow_part(data: bytes, headers: dict, study, stored: list, failed: list):
    """Store one part; add it to the referenced or the failed sequence."""
    reference = {}
    if data[128:132] != b"DICM" and data[:2] == b"\x02\x00":
        data = b"\x00" * 128 + b"DICM" + data  # a meta group without the preamble: common enough to accept
    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        reference = {"00081150": {"vr": "UI", "Value": [str(header.SOPClassUID)]},
                     "00081155": {"vr": "UI", "Value": [str(header.SOPInstanceUID)]}}
        if study is not None and header.get("StudyInstanceUID") != study:
            failed.append(_failure(reference, STUDY_MISMATCH, "StudyInstanceUID is not the study of the request"))
            return
        if data[128:132] != b"DICM":
            raise ValueError("a part must be a DICOM file with its file meta information")
    except Exception as error:
        failed.append(_failure(reference, CANNOT_UNDERSTAND, f"unreadable DICOM: {error}"))
        return
    status = dicoogle.store(data, "STOW-RS")
    if status in (0x0000, 0xB000, 0xB006, 0xB007):
        url = f"{_base_url()}/studies/{header.StudyInstanceUID}/series/{header.SeriesInstanceUID}/instances/{header.SOPInstanceUID}"
        stored.append({**reference, "00081190": {"vr": "UR", "Value": [url]}})
        dicoogle.audited(studies=str(header.StudyInstanceUID))
    else:
        failed.append(_failure(reference, status, getattr(status, "reason", "") or f"refused with status {status:#06x}"))


# ---- WADO-URI -----------------------------------------------------------------------------------

def _wado_uri():
    _allow_cors()
    query = bottle.request.query
    if query.get("requestType") != "WADO":
        _error(400, "requestType=WADO is required")
    for name in ("studyUID", "seriesUID", "objectUID"):
        if not query.get(name):
            _error(400, f"{name} is required")
    dicoogle.audited("wado", studies=query["studyUID"], series=query["seriesUID"], instances=query["objectUID"], count=1)
    found = dicoogle.instances(_uid(query["studyUID"], "studyUID"), _uid(query["seriesUID"], "seriesUID"),
                               _uid(query["objectUID"], "objectUID"))
    if not found:
        _error(404, "no such object")
    uri = found[0][3]
    content_type = query.get("contentType", "image/jpeg").split(",")[0].strip()
    if content_type == "application/dicom":
        bottle.response.content_type = "application/dicom"
        return _file_chunks(uri)
    if content_type not in ("image/jpeg", "image/png"):
        _error(406, "contentType must be image/jpeg, image/png or application/dicom")
    try:
        frame = int(query.get("frameNumber", "1"))
        center = float(query["windowCenter"]) if query.get("windowCenter") else None
        width = float(query["windowWidth"]) if query.get("windowWidth") else None
        size = max(int(query.get("rows", 0) or 0), int(query.get("columns", 0) or 0)) or None
    except ValueError:
        _error(400, "frameNumber, windowCenter, windowWidth, rows and columns are numbers")
    image = dicoogle.render(uri, frame - 1, size=size, center=center, width=width, media_type=content_type)
    if image is None:
        _error(406, "this object cannot be rendered")
    bottle.response.content_type = content_type
    return image


# ---- routes -------------------------------------------------------------------------------------

def routes(app):
    """Register every DICOMweb route on the plugin's web app (served at MOUNT)."""
    study, series, instance = "/studies/<study>", "/series/<series>", "/instances/<instance>"

    @app.route("/<path:path>", "OPTIONS")
    def preflight(path):
        _allow_cors()
        bottle.response.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        bottle.response.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type, Accept")
        bottle.response.status = 204
        return ""

    app.get("/studies")(lambda: _qido("STUDY", {}))
    app.get("/series")(lambda: _qido("SERIES", {}))
    app.get("/instances")(lambda: _qido("IMAGE", {}))
    app.get(study + "/series")(lambda study: _qido("SERIES", {"StudyInstanceUID": _uid(study, "study")}))
    app.get(study + "/instances")(lambda study: _qido("IMAGE", {"StudyInstanceUID": _uid(study, "study")}))
    app.get(study + series + "/instances")(
        lambda study, series: _qido("IMAGE", {"StudyInstanceUID": _uid(study, "study"), "SeriesInstanceUID": _uid(series, "series")}))

    app.get(study)(_retrieve)
    app.get(study + series)(_retrieve)
    app.get(study + series + instance)(_retrieve)
    app.get(study + "/metadata")(_metadata)
    app.get(study + series + "/metadata")(_metadata)
    app.get(study + series + instance + "/metadata")(_metadata)
    app.get(study + series + instance + "/frames/<frame_list>")(_frames)
    app.get(study + series + instance + "/bulkdata/<tag>")(_bulkdata)
    app.get(study + "/rendered")(lambda study: _rendered(study))
    app.get(study + series + "/rendered")(lambda study, series: _rendered(study, series))
    app.get(study + series + instance + "/rendered")(lambda study, series, instance: _rendered(study, series, instance))
    app.get(study + series + instance + "/frames/<frame:int>/rendered")(
        lambda study, series, instance, frame: _rendered(study, series, instance, frame))
    app.get(study + "/thumbnail")(lambda study: _rendered(study, thumbnail=True))
    app.get(study + series + "/thumbnail")(lambda study, series: _rendered(study, series, thumbnail=True))
    app.get(study + series + instance + "/thumbnail")(
        lambda study, series, instance: _rendered(study, series, instance, thumbnail=True))

    app.post("/studies")(lambda: _stow())
    app.post(study)(lambda study: _stow(study))
    app.get("/wado")(_wado_uri)
