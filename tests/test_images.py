"""/dic2png and /dictags against the real daemon: frames rendered to PNG, and tags as XML.

Objects are pydicom's bundled files, stored over DICOM with fresh UIDs (several of them are one
image in different transfer syntaxes, under one SOPInstanceUID). PNGs are decoded here with zlib
and numpy, and grey levels are checked against the window arithmetic of PS3.3 C.11.2.1.2,
computed independently of the daemon's code.
"""

import struct
import time
import zlib
from xml.etree import ElementTree

import numpy as np
import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

import studygen
from conftest import RunningDaemon, wait_until

PASSWORD = "pw"
ADMIN_ENV = {"DICOOGLED_ADMIN_PASSWORD": PASSWORD}
#: The colour bars of pydicom's 100x100 SC_rgb_* files: a row in each bar, and its RGB.
COLOUR_BARS = {5: (255, 0, 0), 25: (0, 255, 0), 45: (0, 0, 255), 65: (0, 0, 0), 95: (255, 255, 255)}


# ---- a PNG reader: zlib, struct and numpy --------------------------------------------------------

def read_png(data: bytes) -> np.ndarray:
    """Pixels of an 8-bit greyscale or RGB PNG: (rows, columns) or (rows, columns, 3); checks every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, chunks = 8, []
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length:position + 12 + length])
        assert crc == zlib.crc32(kind + body), f"bad CRC in {kind}"
        chunks.append((kind, body))
        position += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert depth == 8 and colour_type in (0, 2) and interlace == 0, "only 8-bit grey or RGB is expected"
    channels = 3 if colour_type == 2 else 1
    raw = np.frombuffer(zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT")), np.uint8)
    raw = raw.reshape(height, 1 + width * channels)
    rows = np.zeros((height, width * channels), np.int64)
    for y in range(height):  # undo each scanline's filter (PNG spec, section 9)
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int64)
        above = rows[y - 1] if y else np.zeros_like(line)
        if kind == 0:
            rows[y] = line
        elif kind == 2:
            rows[y] = (line + above) % 256
        else:
            out = np.zeros_like(line)
            for x in range(len(line)):
                left = out[x - channels] if x >= channels else 0
                up_left = above[x - channels] if x >= channels else 0
                if kind == 1:
                    predictor = left
                elif kind == 3:
                    predictor = (left + above[x]) // 2
                else:
                    p = left + above[x] - up_left
                    pa, pb, pc = abs(p - left), abs(p - above[x]), abs(p - up_left)
                    predictor = left if pa <= pb and pa <= pc else above[x] if pb <= pc else up_left
                out[x] = (line[x] + predictor) % 256
            rows[y] = out
    pixels = rows.astype(np.uint8)
    return pixels.reshape(height, width, 3) if channels == 3 else pixels


def test_png_reader_reads_filtered_scanlines():
    """The reader above is itself checked on a PNG with Sub, Up, Average and Paeth lines (made by Pillow)."""
    from PIL import Image
    import io
    image = np.random.default_rng(1).integers(0, 256, (12, 9, 3), dtype=np.uint8)
    output = io.BytesIO()
    Image.fromarray(image).save(output, "PNG", optimize=True)
    assert (read_png(output.getvalue()) == image).all()


# ---- the archive --------------------------------------------------------------------------------

def variant(name: str, label: str = "", **changes) -> pydicom.Dataset:
    """pydicom's bundled file `name` under new, deterministic UIDs, with attributes changed."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["dicoogled test_images", name, label])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["dicoogled test_images study", name, label])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["dicoogled test_images series", name, label])
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


#: label -> (bundled file, attribute changes)
OBJECTS = {
    "ct": ("CT_small.dcm", {}),  # RescaleSlope/Intercept, no window: the full range
    "ct_windowed": ("CT_small.dcm", {"WindowCenter": [40, 400], "WindowWidth": [400, 2000]}),
    "ct_mono1": ("CT_small.dcm", {"PhotometricInterpretation": "MONOCHROME1"}),
    "ct_hsv": ("CT_small.dcm", {"PhotometricInterpretation": "HSV"}),
    "mr": ("MR_small.dcm", {}),  # window 600/1600 in the file
    "mr_rle": ("MR_small_RLE.dcm", {}),
    "mr_jpeg_ls": ("MR_small_jpeg_ls_lossless.dcm", {}),
    "mr_j2k_lossless": ("MR_small_jp2klossless.dcm", {}),
    "mr_big_endian": ("MR_small_bigendian.dcm", {}),
    "mr_implicit": ("MR_small_implicit.dcm", {}),
    "j2k": ("JPEG2000.dcm", {}),
    "jpeg_extended": ("JPGExtended.dcm", {}),
    "deflated": ("image_dfl.dcm", {}),
    "rgb_rle": ("SC_rgb_rle.dcm", {}),
    "rgb_rle_16bit": ("SC_rgb_rle_16bit.dcm", {}),
    "rgb_jpeg_ybr_full": ("SC_rgb_jpeg_dcmtk.dcm", {}),
    "rgb_jpeg_ybr_full_422": ("SC_rgb_dcmtk_+eb+cy+np.dcm", {}),
    "ybr_full_422": ("SC_ybr_full_422_uncompressed.dcm", {}),
    "palette": ("examples_palette.dcm", {}),
    "us_multiframe": ("examples_ybr_color.dcm", {}),  # 30 JPEG frames, FrameTime 33.333 ms
    "dose_multiframe": ("rtdose.dcm", {}),  # 15 uncompressed frames
    "rtplan": ("rtplan.dcm", {}),  # no pixel data
}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    daemon = RunningDaemon(root / "data", env=ADMIN_ENV).start()
    datasets = {label: variant(name, label, **changes) for label, (name, changes) in OBJECTS.items()}
    assert daemon.store(*datasets.values()) == [0] * len(datasets)
    daemon.uids = {label: ds.SOPInstanceUID for label, ds in datasets.items()}
    daemon.session = login(daemon)
    yield daemon
    daemon.stop()


def login(daemon: RunningDaemon) -> requests.Session:
    session = requests.Session()
    response = session.post(f"http://127.0.0.1:{daemon.http_port}/login", data={"username": "admin", "password": PASSWORD})
    assert response.status_code == 200, response.text
    session.cookies.clear()  # the token in the Authorization header is what must work
    session.headers["Authorization"] = response.json()["token"]
    return session


def get(daemon, path: str, session=None, **params) -> requests.Response:
    return (session or daemon.session).get(f"http://127.0.0.1:{daemon.http_port}{path}", params=params, timeout=60)


def png_of(daemon, label: str, **params) -> np.ndarray:
    response = get(daemon, "/dic2png", SOPInstanceUID=daemon.uids[label], **params)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "image/png"
    return read_png(response.content)


def modality_values(label: str) -> np.ndarray:
    name, changes = OBJECTS[label]
    ds = pydicom.dcmread(get_testdata_file(name))
    return ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


# ---- grey levels ----------------------------------------------------------------------------------

def test_ct_without_a_window_spans_the_full_range_after_the_rescale(archive):
    image = png_of(archive, "ct")
    assert image.shape == (128, 128) and image.dtype == np.uint8
    hu = modality_values("ct")
    expected = (hu - hu.min()) / (hu.max() - hu.min()) * 255
    assert np.abs(image - expected).max() <= 1
    assert image.min() == 0 and image.max() == 255


def test_ct_window_follows_the_first_window_center_and_width(archive):
    image = png_of(archive, "ct_windowed")
    hu = modality_values("ct_windowed")
    center, width = 40, 400  # the first of WindowCenter [40, 400] / WindowWidth [400, 2000]
    expected = np.clip(((hu - (center - 0.5)) / (width - 1) + 0.5) * 255, 0, 255)  # PS3.3 C.11.2.1.2.1
    assert np.abs(image.astype(int) - expected).max() <= 1
    # The window really clips: air is black and bone white, and mid-grey lies inside the window.
    assert (image[hu <= center - width / 2] == 0).all() and (image[hu > center + width / 2] == 255).all()
    assert ((image > 0) & (image < 255)).sum() > 1000


def test_mr_window_from_the_file(archive):
    image = png_of(archive, "mr")
    values = modality_values("mr")
    expected = np.clip(((values - (600 - 0.5)) / (1600 - 1) + 0.5) * 255, 0, 255)
    assert np.abs(image.astype(int) - expected).max() <= 1


def test_a_window_of_ones_own_replaces_the_files(archive):
    """windowCenter/windowWidth (the web app's presets) override the window stored in the file."""
    image = png_of(archive, "ct_windowed", windowCenter="-600", windowWidth="1500")
    hu = modality_values("ct_windowed")
    expected = np.clip(((hu - (-600 - 0.5)) / (1500 - 1) + 0.5) * 255, 0, 255)
    assert np.abs(image.astype(int) - expected).max() <= 1
    assert not (image == png_of(archive, "ct_windowed")).all()


@pytest.mark.parametrize("params", [{"windowCenter": "40"}, {"windowWidth": "400"},
                                    {"windowCenter": "x", "windowWidth": "400"}, {"windowCenter": "40", "windowWidth": "0"},
                                    {"windowCenter": "nan", "windowWidth": "400"}])
def test_a_bad_window_is_400(archive, params):
    response = get(archive, "/dic2png", SOPInstanceUID=archive.uids["ct"], **params)
    assert response.status_code == 400 and "window" in response.json()["error"]


def test_monochrome1_is_the_inverse_of_monochrome2(archive):
    assert (png_of(archive, "ct_mono1") == 255 - png_of(archive, "ct")).all()


@pytest.mark.parametrize("label", ["mr_rle", "mr_jpeg_ls", "mr_j2k_lossless", "mr_big_endian", "mr_implicit"])
def test_lossless_transfer_syntaxes_render_like_the_uncompressed_file(archive, label):
    assert (png_of(archive, label) == png_of(archive, "mr")).all()


@pytest.mark.parametrize("label, shape", [("j2k", (1024, 256)), ("jpeg_extended", (1024, 256)), ("deflated", (512, 512))])
def test_compressed_and_deflated_images_decode(archive, label, shape):
    image = png_of(archive, label)
    assert image.shape == shape
    assert image.std() > 10, "a blank image"


def test_lossy_jpeg_extended_is_close_to_the_full_range_of_its_pixels(archive):
    """JPEG Extended (12-bit) decoded by pylibjpeg-libjpeg: grey levels track pydicom's own decoding."""
    values = modality_values("jpeg_extended")
    expected = (values - values.min()) / (values.max() - values.min()) * 255
    assert np.abs(png_of(archive, "jpeg_extended").astype(int) - expected).max() <= 1


# ---- colour ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("label, tolerance", [
    ("rgb_rle", 0), ("rgb_rle_16bit", 0), ("ybr_full_422", 8), ("rgb_jpeg_ybr_full", 8), ("rgb_jpeg_ybr_full_422", 8),
])
def test_colour_images_come_out_as_rgb(archive, label, tolerance):
    image = png_of(archive, label)
    assert image.shape == (100, 100, 3)
    for row, colour in COLOUR_BARS.items():
        assert np.abs(image[row, 50].astype(int) - colour).max() <= tolerance, (row, image[row, 50])


def test_palette_colour_goes_through_its_lookup_table(archive):
    ds = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    from pydicom.pixels import apply_color_lut
    expected = apply_color_lut(ds.pixel_array, ds) >> 8  # 16-bit palette entries
    image = png_of(archive, "palette")
    assert image.shape == (350, 800, 3)
    assert (image == expected).all()
    assert (image[..., 0] != image[..., 2]).any(), "a palette image rendered grey"


# ---- frames ---------------------------------------------------------------------------------------

def test_frames_of_a_multi_frame_instance(archive):
    first, middle = png_of(archive, "us_multiframe"), png_of(archive, "us_multiframe", frame=15)
    assert first.shape == middle.shape == (240, 320, 3)
    assert (first != middle).any()
    assert (png_of(archive, "us_multiframe", frame=0) == first).all()
    doses = [png_of(archive, "dose_multiframe", frame=f) for f in (0, 7, 14)]
    assert doses[0].shape == (10, 10)
    assert (doses[0] != doses[1]).any() and (doses[1] != doses[2]).any()


def test_frame_information(archive):
    url = f"http://127.0.0.1:{archive.http_port}/dic2png"
    us = archive.session.post(url, data={"SOPInstanceUID": archive.uids["us_multiframe"]}).json()
    assert us == {"SOPInstanceUID": archive.uids["us_multiframe"], "NumberOfFrames": 30, "FrameRate": 30.0}
    ct = archive.session.post(url, data={"SOPInstanceUID": archive.uids["ct"]}).json()
    assert ct["NumberOfFrames"] == 1 and ct["FrameRate"] == 0
    plan = archive.session.post(url, data={"SOPInstanceUID": archive.uids["rtplan"]}).json()
    assert plan["NumberOfFrames"] == 0
    assert archive.session.post(url, data={"SOPInstanceUID": "1.2.3.999"}).status_code == 404


@pytest.mark.parametrize("frame", ["30", "1000", "-1", "two"])
def test_a_bad_frame_number_is_400(archive, frame):
    response = get(archive, "/dic2png", SOPInstanceUID=archive.uids["us_multiframe"], frame=frame)
    assert response.status_code == 400
    assert "frame" in response.json()["error"]


def test_frame_1_of_a_single_frame_image_is_400(archive):
    assert get(archive, "/dic2png", SOPInstanceUID=archive.uids["ct"], frame="1").status_code == 400


# ---- thumbnails -----------------------------------------------------------------------------------

def test_thumbnails_fit_64_pixels_and_keep_the_aspect(archive):
    assert png_of(archive, "j2k", thumbnail="true").shape == (64, 16)
    assert png_of(archive, "palette", thumbnail="true").shape == (28, 64, 3)
    assert png_of(archive, "mr", thumbnail="true").shape == (64, 64)
    assert png_of(archive, "dose_multiframe", thumbnail="true").shape == (10, 10)  # never enlarged
    full, thumbnail = png_of(archive, "ct"), png_of(archive, "ct", thumbnail="true")
    assert thumbnail.shape == (64, 64)
    means = full.reshape(64, 2, 64, 2).mean(axis=(1, 3))  # each thumbnail pixel averages 2x2
    assert np.abs(thumbnail - means).max() <= 1
    assert png_of(archive, "ct", thumbnail="false").shape == (128, 128)


def test_thumbnails_are_cached_on_disk(archive):
    uid = archive.uids["mr"]
    first = get(archive, "/dic2png", SOPInstanceUID=uid, thumbnail="true").content
    cached = archive.node_dir / "cache" / "thumbnails" / f"{uid}.png"
    assert cached.read_bytes() == first
    inode = cached.stat().st_ino
    assert get(archive, "/dic2png", SOPInstanceUID=uid, thumbnail="true").content == first
    assert cached.stat().st_ino == inode, "a cached thumbnail was made again"


def test_a_page_of_50_thumbnails_is_quick(start_daemon, tmp_path):
    daemon = start_daemon(env=ADMIN_ENV)
    paths = studygen.generate(tmp_path / "gen", patients=1, studies=1, series=2, instances=25, size=512)
    assert set(daemon.store(*paths)) == {0}
    session = login(daemon)
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]

    def page():
        started = time.perf_counter()
        for uid in uids:
            response = get(daemon, "/dic2png", session, SOPInstanceUID=uid, thumbnail="true")
            assert response.status_code == 200 and read_png(response.content).shape == (64, 64)
        return time.perf_counter() - started

    first, again = page(), page()
    assert len(list((daemon.node_dir / "cache" / "thumbnails").glob("*.png"))) == 50
    assert first < 30, f"50 thumbnails of 512x512 CT took {first:.1f} s to make"
    assert again < 3, f"50 cached thumbnails took {again:.1f} s"


def test_a_changed_file_or_edge_makes_the_thumbnail_again(start_daemon):
    daemon = start_daemon(config_text="[storage]\nduplicates = overwrite\n[index]\nthumbnail_size = 32\n", env=ADMIN_ENV)
    original = variant("CT_small.dcm", "replaced")
    assert daemon.store(original) == [0]
    session = login(daemon)
    before = read_png(get(daemon, "/dic2png", session, SOPInstanceUID=original.SOPInstanceUID, thumbnail="true").content)
    assert before.shape == (32, 32)
    # The same instance sent again with other pixels (and an extra element) replaces the file.
    replacement = variant("CT_small.dcm", "replaced", ImageComments="inverted")
    replacement.PixelData = (replacement.pixel_array.max() - replacement.pixel_array).astype(np.int16).tobytes()
    assert daemon.store(replacement) == [0]
    after = read_png(get(daemon, "/dic2png", session, SOPInstanceUID=original.SOPInstanceUID, thumbnail="true").content)
    assert np.abs(after.astype(int) - (255 - before.astype(int))).max() <= 1
    # The configured edge changes at run time (the web app's indexer settings).
    changed = session.post(f"http://127.0.0.1:{daemon.http_port}/management/settings/index/thumbnail/size",
                           data={"thumbnailSize": "16"})
    assert changed.status_code == 200, changed.text
    resized = get(daemon, "/dic2png", session, SOPInstanceUID=original.SOPInstanceUID, thumbnail="true").content
    assert read_png(resized).shape == (16, 16)


# ---- naming an instance, and the errors -------------------------------------------------------------

def test_an_instance_named_by_its_uri(archive):
    uid = archive.uids["ct"]
    found = get(archive, "/search", query=f"SOPInstanceUID:{uid}").json()["results"]
    assert len(found) == 1 and found[0]["uri"].startswith("file:")
    by_uri = get(archive, "/dic2png", uri=found[0]["uri"])
    assert by_uri.status_code == 200 and by_uri.content == get(archive, "/dic2png", SOPInstanceUID=uid).content
    assert get(archive, "/dic2png", uri="file:///no/such/file.dcm").status_code == 404


def test_no_pixel_data_is_415_with_a_reason(archive):
    response = get(archive, "/dic2png", SOPInstanceUID=archive.uids["rtplan"])
    assert response.status_code == 415
    assert response.headers["Content-Type"].startswith("application/json")
    assert "no pixel data" in response.json()["error"]
    assert get(archive, "/dic2png", SOPInstanceUID=archive.uids["rtplan"], thumbnail="true").status_code == 415


def test_an_unsupported_photometric_interpretation_is_415(archive):
    response = get(archive, "/dic2png", SOPInstanceUID=archive.uids["ct_hsv"])
    assert response.status_code == 415 and "HSV" in response.json()["error"]


def test_an_unsupported_transfer_syntax_is_415(archive, tmp_path):
    """An MPEG-2 video object, indexed in place: there is no decoder for it, and the client is told so."""
    ds = variant("CT_small.dcm", "mpeg2")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile / Main Level
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds["PixelData"].VR = "OB"
    folder = tmp_path / "video"
    folder.mkdir()
    ds.save_as(folder / "video.dcm", enforce_file_format=True)
    task = archive.session.post(f"http://127.0.0.1:{archive.http_port}/management/tasks/index", data={"uri": folder.as_uri()})
    assert task.status_code == 200, task.text
    wait_until(lambda: get(archive, "/dic2png", SOPInstanceUID=ds.SOPInstanceUID).status_code != 404, message="indexing")
    response = get(archive, "/dic2png", SOPInstanceUID=ds.SOPInstanceUID)
    assert response.status_code == 415 and "MPEG2" in response.json()["error"]


def test_a_missing_codec_is_415_naming_it(start_daemon, tmp_path):
    """With the JPEG-LS codecs hidden from the daemon, a JPEG-LS image is 415, the others still render."""
    hider = tmp_path / "hide"
    hider.mkdir()
    (hider / "sitecustomize.py").write_text(
        "import sys\n"
        "class HideCodecs:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in ('jpeg_ls', 'libjpeg', 'pylibjpeg', 'gdcm'):\n"
        "            raise ImportError(name + ' is hidden by test_images.py')\n"
        "sys.meta_path.insert(0, HideCodecs())\n")
    daemon = start_daemon(env=dict(ADMIN_ENV, PYTHONPATH=str(hider)))
    jpeg_ls, plain = variant("MR_small_jpeg_ls_lossless.dcm", "hidden"), variant("MR_small.dcm", "hidden")
    assert daemon.store(jpeg_ls, plain) == [0, 0]
    session = login(daemon)
    response = get(daemon, "/dic2png", session, SOPInstanceUID=jpeg_ls.SOPInstanceUID)
    assert response.status_code == 415
    assert "JPEG-LS" in response.json()["error"] and "pyjpegls" in response.json()["error"]
    assert get(daemon, "/dic2png", session, SOPInstanceUID=plain.SOPInstanceUID).status_code == 200


def test_unknown_uid_is_404_and_bad_requests_400(archive):
    assert get(archive, "/dic2png", SOPInstanceUID="1.2.3.4.5.6.7.8.9").status_code == 404
    assert get(archive, "/dictags", SOPInstanceUID="1.2.3.4.5.6.7.8.9").status_code == 404
    assert get(archive, "/dic2png").status_code == 400
    assert get(archive, "/dic2png", SOPInstanceUID="not a uid").status_code == 400
    assert get(archive, "/dic2png", uri="relative/x.dcm").status_code == 400
    assert get(archive, "/dic2png", uri="http://example.com/x.dcm").status_code == 404  # no instance lives there


def test_images_and_tags_need_a_login(archive):
    anonymous = requests.Session()
    for path in ("/dic2png", "/dictags"):
        response = get(archive, path, anonymous, SOPInstanceUID=archive.uids["ct"])
        assert response.status_code == 401 and "error" in response.json()
    url = f"http://127.0.0.1:{archive.http_port}/dic2png"
    assert anonymous.post(url, data={"SOPInstanceUID": archive.uids["ct"]}).status_code == 401


# ---- /dictags ---------------------------------------------------------------------------------------

def test_dictags_lists_the_tags_of_the_file(archive):
    response = get(archive, "/dictags", SOPInstanceUID=archive.uids["ct"])
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("application/xml")
    root = ElementTree.fromstring(response.content)
    assert root.tag == "tags"
    tags = {node.get("name"): node for node in root.findall("tag")}
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    patient = tags["PatientName"]
    assert (patient.get("id"), patient.get("vr"), patient.text) == ("00100010", "PN", str(ds.PatientName))
    assert tags["SOPInstanceUID"].text == archive.uids["ct"]
    assert tags["TransferSyntaxUID"].get("id") == "00020010"  # the file meta information too
    assert tags["ImagePositionPatient"].text == "\\".join(str(v) for v in ds.ImagePositionPatient)
    assert "PixelData" not in tags
    # Every element of the file is listed, in order, at the top level.
    assert [n.get("id") for n in root.findall("tag") if not n.get("id").startswith("0002")] == [f"{int(t):08X}" for t in ds.keys()]


def test_dictags_nests_sequences_and_sizes_binary_values(archive):
    root = ElementTree.fromstring(get(archive, "/dictags", SOPInstanceUID=archive.uids["rtplan"]).content)
    plan = pydicom.dcmread(get_testdata_file("rtplan.dcm"))
    beams = root.find("tag[@name='BeamSequence']")
    assert beams.get("vr") == "SQ" and len(beams.findall("item")) == len(plan.BeamSequence)
    assert beams.find("item/tag[@name='BeamName']").text == plan.BeamSequence[0].BeamName
    control_points = beams.findall("item/tag[@name='ControlPointSequence']/item")  # a sequence in a sequence
    assert len(control_points) == len(plan.BeamSequence[0].ControlPointSequence) > 1
    palette = ElementTree.fromstring(get(archive, "/dictags", SOPInstanceUID=archive.uids["palette"]).content)
    red = palette.find("tag[@name='RedPaletteColorLookupTableData']")
    assert red.get("bytes") == str(2 * 256) and not red.text
