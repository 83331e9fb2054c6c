"""Area 5: bad and unusual images, through both doors: ``python -m device classify --json`` (one real
process for every file) and the page's upload endpoint (``POST /api/classify`` on a running loop).

Every case is either a clear rejection (classify: status "error" and a reason naming the file; upload:
HTTP 422/413 with the reason, nothing recorded) or a correct result, meaning exactly the result of a
lossless reference image holding the pixels the file should decode to (EXIF rotation: the upright image;
alpha: composited on white; CMYK: converted; a long strip: its centre square). Never a crash, a
traceback or a 500. Both doors must agree on every case.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device.classifier import Classifier
from tests.reliability.conftest import SAMPLES, make_config, run_device, write_config

pytestmark = pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")

AREA = "5 bad images"
SAMPLE = sorted(SAMPLES.glob("Benign__*.jpg"))[0]


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header(w: int, h: int, depth: int = 8, colour: int = 2, body: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + (_png_chunk(b"IDAT", body) if body else b"")
            + (_png_chunk(b"IEND", b"") if body else b""))


def _png16_rgb(rgb: np.ndarray) -> bytes:
    """A 48-bit (16 bits per channel) RGB PNG, written by hand (Pillow cannot write one)."""
    h, w, _ = rgb.shape
    data = (rgb.astype(np.uint16) * 257).astype(">u2").reshape(h, w * 3)
    raw = b"".join(b"\0" + row.tobytes() for row in data)
    return _png_header(w, h, 16, 2, zlib.compress(raw, 6))


def _jpeg_with_size(jpeg: bytes, w: int, h: int) -> bytes:
    """A JPEG whose SOF marker claims w x h."""
    b = bytearray(jpeg)
    i = 2
    while i < len(b):
        marker, length = b[i + 1], struct.unpack(">H", b[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", b, i + 5, h, w)
            return bytes(b)
        i += 2 + length
    raise AssertionError("no SOF")


def _with_app1(jpeg: bytes, payload: bytes) -> bytes:
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


ORIENT_UNDO = {  # how to turn the stored pixels upright for EXIF orientation n
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1),
}
ORIENT_STORE = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 6: lambda a: np.rot90(a, 1),
                8: lambda a: np.rot90(a, -1)}


def build_cases(d: Path) -> dict[str, tuple[str, str, str]]:
    """Write every case file (and its reference) into ``d``; returns case -> (file, expect, ref-or-reason).

    ``expect`` is "reject" (ref-or-reason: words the reason must contain) or "result" (ref-or-reason: the
    reference file whose result the case must equal).
    """
    img = Image.open(SAMPLE).convert("RGB")
    rgb = np.asarray(img)
    good = SAMPLE.read_bytes()
    cases: dict[str, tuple[str, str, str]] = {}

    def put(name: str, data: bytes, expect: str, ref_or_reason: str, case: str) -> None:
        (d / name).write_bytes(data)
        cases[case] = (name, expect, ref_or_reason)

    def ref(name: str, arr: np.ndarray) -> str:
        Image.fromarray(np.ascontiguousarray(arr), "RGB").save(d / name, "PNG")
        return name

    sample_png = ref("ref-sample.png", rgb)
    # -- rejections ---------------------------------------------------------------------------------------------
    put("empty.jpg", b"", "reject", "empty", "zero bytes")
    put("truncated.jpg", good[: len(good) // 3], "reject", "not a decodable image", "truncated JPEG")
    put("header-only.jpg", good[:200], "reject", "not a decodable image", "JPEG header only")
    put("notes.jpg", b"This is a text file renamed to .jpg\n" * 40, "reject", "not a decodable image",
        "text renamed .jpg")
    put("fake.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8, "reject", "not a decodable image",
        "PNG magic + garbage")
    put("fake.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 600, "reject", "not a decodable image", "JPEG magic + zeros")
    put("grey.jpg", _save(img.convert("L"), "JPEG"), "reject", "greyscale", "greyscale JPEG")
    put("grey16.png", _save(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "PNG"), "reject",
        "greyscale", "16-bit greyscale PNG")
    put("grey-alpha.png", _save(img.convert("LA"), "PNG"), "reject", "greyscale", "greyscale + alpha PNG")
    put("float.tif", _save(img.convert("F"), "TIFF"), "reject", "greyscale", "32-bit float TIFF")
    put("one-pixel.png", _save(Image.new("RGB", (1, 1), (200, 150, 220)), "PNG"), "reject", "too small", "1x1")
    put("strip-thin.png", _save(Image.new("RGB", (5000, 10), (200, 150, 220)), "PNG"), "reject", "too small",
        "5000x10 strip")
    put("huge-header.png", _png_header(20000, 20000), "reject", "not a decodable image", "20000x20000 (header only)")
    put("64mp.png", _png_header(8000, 8000, body=zlib.compress(b"\0" * (8000 * 3 + 1) * 8, 9)), "reject",
        "over the 40 MP limit", "8000x8000 PNG (64 MP, tiny file)")
    put("bomb.png", _png_header(30000, 30000, body=zlib.compress(b"\0" * (30000 * 3 + 1) * 64, 9)), "reject",
        "decompression bomb", "decompression bomb PNG (900 MP, 6 KB)")
    put("huge-sof.jpg", _jpeg_with_size(good, 65000, 65000), "reject", "decompression bomb",
        "JPEG claiming 65000x65000")
    frames = [img, Image.fromarray(255 - rgb)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    put("anim.gif", gif.getvalue(), "reject", "format GIF", "animated GIF")
    put("still.gif", _save(img, "GIF"), "reject", "format GIF", "single-frame GIF")
    put("icon.ico", _save(img.resize((64, 64)), "ICO"), "reject", "format ICO", "ICO")
    put("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="500" height="500"><rect/></svg>',
        "reject", "not a decodable image", "SVG text")
    png = _save(img, "PNG")
    put("cut.png", png[: len(png) * 2 // 3], "reject", "not a decodable image", "truncated PNG")
    put("anim.png", _save(img, "PNG", save_all=True, append_images=[Image.fromarray(255 - rgb)]), "reject",
        "2 frames", "animated PNG (APNG)")
    # -- correct results ------------------------------------------------------------------------------------------
    put("rgba-opaque.png", _save(img.convert("RGBA"), "PNG"), "result", sample_png, "PNG with alpha (opaque)")
    rgba = np.dstack([rgb, np.where(np.arange(rgb.shape[1]) < rgb.shape[1] // 4, 0, 255)[None, :]
                      .repeat(rgb.shape[0], 0).astype(np.uint8)])
    white = rgb.copy()
    white[:, : rgb.shape[1] // 4] = 255
    put("rgba-holes.png", _save(Image.fromarray(rgba, "RGBA"), "PNG"), "result", ref("ref-on-white.png", white),
        "PNG with transparent quarter")
    put("rgb16.png", _png16_rgb(rgb), "result", sample_png, "16-bit RGB PNG")
    cmyk = _save(img.convert("CMYK"), "JPEG", quality=95)
    put("cmyk.jpg", cmyk, "result", ref("ref-cmyk.png", np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB"))),
        "CMYK JPEG")
    for n in (2, 3, 6, 8):
        stored = np.ascontiguousarray(ORIENT_STORE[n](rgb))
        exif = Image.Exif()
        exif[0x0112] = n
        data = _save(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # what the sensor "stored", lossy
        put(f"exif-{n}.jpg", data, "result", ref(f"ref-exif-{n}-upright.png", ORIENT_UNDO[n](decoded)),
            f"EXIF orientation {n} (= the upright image)")
    put("bad-exif.jpg", _with_app1(good, b"Exif\0\0MM\0*\0\0\0\x08\xff\xff" + b"\0" * 30), "result",
        sample_png, "corrupt EXIF block")
    put("sample.bmp", _save(img, "BMP"), "result", sample_png, "BMP")
    put("sample.webp", _save(img, "WEBP", lossless=True), "result", sample_png, "WebP (lossless)")
    put("sample.tif", _save(img, "TIFF", compression="tiff_lzw"), "result", sample_png, "TIFF (LZW)")
    strip = np.full((rgb.shape[0], 4000, 3), 255, np.uint8)
    left = (4000 - rgb.shape[1]) // 2
    strip[:, left:left + rgb.shape[1]] = rgb
    put("strip-wide.png", _save(Image.fromarray(strip), "PNG"), "result", sample_png,
        "huge aspect ratio 4000x224 (= its centre square)")
    prog = _save(img, "JPEG", quality=90, progressive=True)
    put("progressive.jpg", prog, "result", ref("ref-progressive.png", np.asarray(Image.open(io.BytesIO(prog)))),
        "progressive JPEG")
    pal = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    put("palette.png", _save(pal, "PNG"), "result", ref("ref-palette.png", np.asarray(pal.convert("RGB"))),
        "palette PNG")
    noisy = np.clip(np.asarray(img.resize((1014, 760)), np.int16)
                    + np.random.default_rng(1).integers(-6, 7, (760, 1014, 3)), 0, 255).astype(np.uint8)
    cam = _save(Image.fromarray(noisy), "JPEG", quality=92)
    put("camera.jpg", cam, "result", ref("ref-camera.png", np.asarray(Image.open(io.BytesIO(cam)))),
        f"camera-size JPEG 1014x760 ({len(cam) >> 10} KB)")
    big = img.resize((2000, 2000), Image.Resampling.NEAREST)
    put("big.png", _save(big, "PNG"), "result", ref("ref-big.png", np.asarray(big)), "2000x2000 PNG (4 MP)")
    return cases


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> tuple[Path, dict[str, tuple[str, str, str]]]:
    d = tmp_path_factory.mktemp("images")
    return d, build_cases(d)


@pytest.fixture(scope="module")
def cli_records(cases, tmp_path_factory) -> tuple[dict[str, dict], str, int]:
    """Every case and reference through one real ``python -m device classify --json`` process."""
    d, table = cases
    files = sorted({f for f, _, _ in table.values()} | {r for _, e, r in table.values() if e == "result"})
    tmp = tmp_path_factory.mktemp("cli")
    cfg = write_config(tmp / "c.toml", tmp / "state")
    r = run_device("classify", "--json", "--config", str(cfg), *[str(d / f) for f in files], timeout=300)
    recs = {}
    for line in r.stdout.splitlines():
        rec = json.loads(line)
        recs[Path(rec["file"]).name] = rec
    return recs, r.stderr, r.returncode


@pytest.fixture(scope="module")
def upload_service(tiny_bundle, tmp_path_factory):
    """A running loop (button mode, no camera) with the tiny bundle, as the page's uploads reach it."""
    from tests.reliability.conftest import Harness

    state = tmp_path_factory.mktemp("upload") / "state"
    clf = Classifier.open(tiny_bundle, num_threads=1, use_edgetpu=False)
    h = Harness(make_config(state, trigger={"mode": "button"}), clf, None)
    yield h
    h.close()


def _same(a: dict, b: dict) -> bool:
    keys = ("status", "label", "all", "confidence", "scores", "reason")
    return all(a.get(k) == b.get(k) for k in keys)


def _upload(h, data: bytes, name: str):
    return h.client.post("/api/classify", headers={"X-Token": "tok-reliability"},
                         data={"file": (io.BytesIO(data), name)}, content_type="multipart/form-data")


def _as_cli(body: dict) -> dict:
    """An upload's JSON in the CLI's rounding, to compare the two doors."""
    return {"status": body["status"], "label": body["label"], "all": body["all"],
            "confidence": round(body["confidence"], 4), "scores": {k: round(v, 4) for k, v in body["scores"].items()},
            "reason": body["reason"]}


def _case_names() -> list[str]:
    """The case names, for parametrize (the files are built again, per module, by the ``cases`` fixture)."""
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        return list(build_cases(Path(t)))


@pytest.mark.parametrize("case", _case_names())
def test_bad_image_is_rejected_clearly_or_classified_correctly_by_both_doors(case: str, cases, cli_records,
                                                                             upload_service, table) -> None:
    d, spec = cases
    name, expect, ref_or_reason = spec[case]
    recs, stderr, code = cli_records
    cli = recs.get(name)
    assert "Traceback" not in stderr and code in (0, 1), stderr[-2000:]
    h = upload_service
    before = h.store.count()
    up = _upload(h, (d / name).read_bytes(), name)
    body = up.get_json(silent=True) or {}
    after = h.store.count()
    if expect == "reject":
        cli_ok = (cli is not None and cli["status"] == "error" and name in cli["reason"]
                  and ref_or_reason in cli["reason"])
        up_ok = up.status_code in (413, 422) and ref_or_reason in body.get("message", "") and after == before
        reason = (cli or {}).get("reason", "no record").replace(str(d) + "/", "")
        observed = f"classify: error ({reason[:90]}); upload {up.status_code}"
        expected = f"rejected: '{ref_or_reason}'"
    else:
        ref = recs.get(ref_or_reason)
        cli_ok = cli is not None and ref is not None and cli["status"] != "error" and _same(cli, ref)
        up_ok = up.status_code == 201 and cli is not None and _same(_as_cli(body), cli) and after == before + 1
        observed = (f"classify: {(cli or {}).get('status')} {(cli or {}).get('label') or ''} = reference "
                    f"{ref_or_reason}: {cli_ok}; upload {up.status_code}, same result: {up_ok}")
        expected = f"result = {ref_or_reason}"
    alive = h.svc.running and h.client.get("/api/health").status_code == 200
    ok = cli_ok and up_ok and alive
    table(AREA, case, expected, observed, ok, f"{(d / name).stat().st_size} bytes")
    assert ok, (cli, up.status_code, body)


def test_at_least_twenty_cases(cases) -> None:
    _, spec = cases
    assert len(spec) >= 20 and sum(1 for _, e, _ in spec.values() if e == "result") >= 8

