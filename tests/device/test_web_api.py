"""The status page's JSON API, through Flask's test client, against a real screening loop on replay.

The loop runs the tiny fixture bundle (with its refusal thresholds off, so the samples get real benign and
ALL verdicts) over the committed samples once; every test then checks what the API says against what the
classifier and the store say. Bad requests (token, size, corrupt images, ids, paging) must get a 4xx with
a message, and the loop must still be running afterwards.
"""

from __future__ import annotations

import csv
import io
import json
import socket
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device import config as config_mod
from device.app import build
from device.bundle import Bundle
from device.classifier import Classifier
from device.errors import StoreError
from device.service import Service
from device.sources import ReplaySource
from device.web import create_app, serve
from device.web.presenters import THUMB_SIZE, thumbnail
from device.web.protocol import ServiceAPI
from device.web.security import SECURITY_HEADERS
from tests.device.conftest import SAMPLES, wait_until

TOKEN = "test-token-0123456789"
UPLOAD_LIMIT = 1 << 20


@pytest.fixture(scope="module")
def service(tmp_path_factory, decisive_classifier: Classifier, sample_paths, sample_verdicts):
    """A running loop that has replayed every sample once (then waits for uploads).

    ``sample_verdicts`` is computed first: the loop's thread owns the (not thread-safe) interpreter after.
    """
    state = tmp_path_factory.mktemp("web-state")
    cfg = config_mod.parse({
        "model": {"threads": 1, "use_edgetpu": False},
        "camera": {"source": "replay", "replay_dir": str(SAMPLES), "interval_ms": 0, "loop": False,
                   "read_timeout_s": 5.0},
        "trigger": {"mode": "continuous", "interval_ms": 0},
        "gpio": {"mock": "yes"},
        "store": {"state_dir": str(state), "reserve_mb": 0},
        "web": {"port": 0, "max_upload_mb": 1, "token": TOKEN},
    }, "<test>")
    app = build(cfg, classifier=decisive_classifier, source=(lambda: ReplaySource(SAMPLES, loop=False), "replay"),
                web=None)
    svc = app.service
    try:
        assert wait_until(lambda: svc.status().counts["fields"] >= len(sample_paths), timeout=120), svc.status()
        yield svc
    finally:
        app.close()


@pytest.fixture(scope="module")
def app(service: Service):
    return create_app(service, max_upload_bytes=UPLOAD_LIMIT)


@pytest.fixture
def client(app):
    return app.test_client()


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def jpeg_bytes(path: Path) -> bytes:
    return path.read_bytes()


def assert_json_error(resp, code: int, *needles: str) -> dict:
    assert resp.status_code == code, (resp.status_code, resp.get_data(as_text=True)[:300])
    assert resp.mimetype == "application/json"
    body = resp.get_json()
    assert body["status"] == code and body["message"], body
    for n in needles:
        assert n.lower() in body["message"].lower(), (n, body["message"])
    return body


def assert_still_running(service: Service) -> None:
    st = service.status()
    assert st.ready and service.running, st


# -- page and assets ---------------------------------------------------------------------------------------------


def test_page_and_assets_are_served_by_the_device(client, service: Service) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert service.bundle.name in html and "haematologist" in html
    assert 'name="viewport"' in html  # phone screens
    assets = ["/static/style.css", "/static/app.js", "/static/favicon.svg"]
    for a in assets:
        assert a in html, a
    texts = [html]
    for a in assets:
        r = client.get(a)
        assert r.status_code == 200, a
        texts.append(r.get_data(as_text=True))
    for t in texts:  # no CDN, no external fonts, no inline script (the CSP forbids it)
        t = t.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a namespace name, not a fetch
        assert "http://" not in t and "https://" not in t and "//cdn" not in t
    assert "<script>" not in html and " onclick=" not in html
    assert client.get("/favicon.ico").status_code == 200


def test_security_headers_on_pages_api_and_errors(client) -> None:
    for path in ("/", "/api/status", "/api/results/999999", "/static/app.js", "/api/nothing-here"):
        r = client.get(path)
        for k, v in SECURITY_HEADERS.items():
            assert r.headers.get(k) == v, (path, k)
    csp = SECURITY_HEADERS["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert SECURITY_HEADERS["X-Frame-Options"] == "DENY" and SECURITY_HEADERS["Referrer-Policy"] == "no-referrer"
    assert client.get("/api/status").headers["Cache-Control"] == "no-store"


def test_foreign_host_header_is_refused(client) -> None:
    """DNS rebinding: a page on another site must not read results through a name that resolves here."""
    assert_json_error(client.get("/api/results", headers={"Host": "evil.example.com"}), 400, "not this device")
    assert client.get("/api/status", headers={"Host": "127.0.0.1:8080"}).status_code == 200
    assert client.get("/api/status", headers={"Host": "localhost"}).status_code == 200
    assert client.get("/api/status", headers={"Host": "[::1]:8080"}).status_code == 200
    assert client.get("/api/status", headers={"Host": socket.gethostname() + ".local"}).status_code == 200


def test_unknown_api_path_and_wrong_method_are_json(client) -> None:
    assert_json_error(client.get("/api/nothing-here"), 404)
    r = client.get("/api/slides/start")  # a POST endpoint; GET is read as a slide id and is unknown
    assert_json_error(r, 404)
    r = client.get("/api/alert/acknowledge")
    assert_json_error(r, 405)
    assert "POST" in r.headers["Allow"]
    assert_json_error(client.delete("/api/results/1"), 405)


# -- status -----------------------------------------------------------------------------------------------------


def test_status_reports_the_running_loop(client, service: Service, decisive_bundle: Bundle, sample_paths) -> None:
    st = client.get("/api/status").get_json()
    assert st["ready"] is True and st["faults"] == []
    assert st["model"]["name"] == decisive_bundle.name and st["model"]["sha256"] == decisive_bundle.model_sha256
    assert st["model"]["bundle"] == decisive_bundle.id == f"{decisive_bundle.name}-{decisive_bundle.digest[:8]}"
    assert st["bundles"]["active"] == decisive_bundle.id and st["bundles"]["previous"] is None  # the operator panel
    assert st["runtime"] and st["delegate"]
    assert st["inference_ms"]["p50"] > 0 and st["inference_ms"]["p95"] >= st["inference_ms"]["p50"]
    assert st["fields"] >= len(sample_paths) and st["db_bytes"] > 0 and st["disk_free_bytes"] > 0
    assert isinstance(st["seq"], int) and st["uptime_s"] >= 0
    last = st["last"]
    assert "image" not in last, "state-dir paths must not leak; the API gives URLs"
    assert last["image_url"] == f"/api/results/{last['id']}/image"
    assert st["slide"]["id"] and st["slide"]["report_url"].endswith("/report")


def test_live_snapshot_has_status_and_recent_results(client) -> None:
    snap = client.get("/api/live").get_json()
    assert snap["status"]["ready"] is True
    ids = [r["id"] for r in snap["recent"]]
    assert ids and ids == sorted(ids, reverse=True) and len(ids) <= 12
    assert all(r["thumb_url"] for r in snap["recent"])


def test_health(client) -> None:
    r = client.get("/api/health")
    assert r.status_code == 200 and r.get_json()["ready"] is True


# -- results ----------------------------------------------------------------------------------------------------


def camera_results(client) -> list[dict]:
    body = client.get("/api/results?source=replay&limit=500").get_json()
    return body["results"]


def test_results_are_the_replayed_samples_with_the_classifiers_verdicts(client, sample_verdicts) -> None:
    rows = camera_results(client)
    by_name = {p.name: v for p, v in sample_verdicts.items()}
    assert sorted(r["name"] for r in rows) == sorted(by_name)
    assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)  # newest first
    for r in rows:
        v = by_name[r["name"]]
        assert (r["status"], r["label"], r["all"]) == (v.status, v.label, v.all), r["name"]
        assert r["confidence"] == pytest.approx(v.confidence, abs=1e-6)
        assert r["scores"] == pytest.approx(v.scores, abs=1e-6)
        assert r["source"] == "replay" and r["slide_id"] and r["time_iso"].endswith("Z")
        assert set(r["quality"]) >= {"sharpness", "brightness", "clipped", "stained"}
        assert r["timings"]["invoke"] > 0


def test_paging_walks_every_result_once(client) -> None:
    total = client.get("/api/results?source=replay").get_json()["total"]
    seen, offset, pages = [], 0, 0
    while offset is not None:
        body = client.get(f"/api/results?source=replay&limit=5&offset={offset}").get_json()
        assert len(body["results"]) <= 5 and body["limit"] == 5 and body["offset"] == offset
        seen += [r["id"] for r in body["results"]]
        offset = body["next_offset"]
        pages += 1
    assert len(seen) == len(set(seen)) == total and pages == -(-total // 5)
    past = client.get(f"/api/results?limit=5&offset={total + 100}").get_json()
    assert past["results"] == [] and past["next_offset"] is None


def test_filters(client, sample_verdicts, decisive_bundle: Bundle) -> None:
    rows = camera_results(client)
    for label in decisive_bundle.classes:
        expected = sorted(p.name for p, v in sample_verdicts.items() if v.label == label)
        got = client.get("/api/results", query_string={"label": label, "source": "replay", "limit": 500}).get_json()
        assert sorted(r["name"] for r in got["results"]) == expected, label
        assert got["total"] == len(expected)
    ok = client.get("/api/results?status=ok&source=replay&limit=500").get_json()["results"]
    assert ok and all(r["status"] == "ok" for r in ok)
    alls = client.get("/api/results?all=true&source=replay&limit=500").get_json()["results"]
    assert sorted(r["name"] for r in alls) == sorted(p.name for p, v in sample_verdicts.items() if v.all)
    slide = rows[0]["slide_id"]
    in_slide = client.get(f"/api/results?slide={slide}&limit=500").get_json()["results"]
    assert in_slide and all(r["slide_id"] == slide for r in in_slide)
    assert client.get("/api/results?slide=S19990101-000000").get_json()["total"] == 0
    # since: epoch seconds and ISO 8601 agree; the cut is inclusive
    ordered = sorted(rows, key=lambda r: r["time"])
    cut = ordered[len(ordered) // 2]
    want = sorted(r["id"] for r in ordered if r["time"] >= cut["time"])
    for since in (repr(cut["time"]), cut["time_iso"]):
        got = client.get("/api/results", query_string={"since": since, "source": "replay", "limit": 500}).get_json()
        ids = sorted(r["id"] for r in got["results"])
        # the ISO form is rounded to milliseconds: it may include the cut's neighbour within 1 ms, never lose one
        assert set(want) <= set(ids) and len(ids) - len(want) <= 1, since


@pytest.mark.parametrize("query, needle", [
    ("limit=0", "limit"), ("limit=501", "limit"), ("limit=abc", "limit"), ("limit=1.5", "limit"),
    ("offset=-1", "offset"), ("offset=x", "offset"), ("since=yesterday", "since"), ("until=1e999", "until"),
    ("since=nan", "since"), ("label=Leukaemia", "label"), ("status=maybe", "status"), ("all=perhaps", "all"),
    ("slide=../../etc", "slide"), ("lable=Benign", "unknown parameter"), ("source=../x", "source"),
    ("since=2000&until=1000", "until"),
])
def test_bad_paging_and_filters_are_400_with_a_message(client, service: Service, query: str, needle: str) -> None:
    assert_json_error(client.get(f"/api/results?{query}"), 400, needle)
    assert_still_running(service)


def test_one_result_and_its_image(client, service: Service) -> None:
    rid = camera_results(client)[0]["id"]
    r = client.get(f"/api/results/{rid}")
    assert r.status_code == 200
    body = r.get_json()
    rec = service.store.get(rid)
    assert body["id"] == rid and body["label"] == rec.label and body["name"] == rec.name
    img = client.get(body["image_url"])
    assert img.status_code == 200 and img.mimetype == "image/jpeg"
    with Image.open(io.BytesIO(img.data)) as im:
        assert im.format == "JPEG" and im.size[0] >= 64
    thumb = client.get(body["thumb_url"])
    assert thumb.status_code == 200 and thumb.mimetype == "image/jpeg"
    with Image.open(io.BytesIO(thumb.data)) as im:
        assert im.size == (192, 192)
    assert client.get(body["thumb_url"]).data == thumb.data  # cached


@pytest.mark.parametrize("path", [
    "/api/results/99999999", "/api/results/abc", "/api/results/-1", "/api/results/1.0",
    "/api/results/99999999/image", "/api/results/99999999/thumb", "/api/results/abc/image",
    "/api/results/..%2F..%2Fetc%2Fpasswd", "/api/results/..%2F..%2Fetc%2Fpasswd/image",
    "/api/results/1%2F..%2F..%2Fresults.sqlite3/image", "/api/results/../../results.sqlite3",
    "/api/results/%2e%2e/image", "/api/results/1/image/../../../results.sqlite3",
    "/api/results/12345678901234567890123", "/api/slides/nope", "/api/slides/..%2F..%2Fetc%2Fpasswd/report",
    "/api/slides/%2e%2e/report", "/api/slides/.hidden", "/api/slides/S1..S2/report",
])
def test_unknown_ids_and_traversal_are_404(client, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404, (path, r.status_code)
    assert r.mimetype == "application/json" and r.get_json()["message"]
    assert b"SQLite" not in r.data and b"root:" not in r.data


# -- slides, report, CSV ------------------------------------------------------------------------------------


def test_slides_and_slide_detail(client, service: Service, sample_paths) -> None:
    body = client.get("/api/slides").get_json()
    slide_id = camera_results(client)[0]["slide_id"]
    row = next(s for s in body["slides"] if s["id"] == slide_id)
    assert row["fields"] == len(sample_paths) and row["started_iso"].endswith("Z")
    detail = client.get(f"/api/slides/{slide_id}").get_json()
    v = service.slide_verdict(slide_id)
    assert detail["verdict"]["verdict"] == v.verdict and detail["verdict"]["counts"] == v.counts
    assert detail["verdict"]["fields"] == len(sample_paths)
    assert_json_error(client.get("/api/slides?limit=0"), 400, "limit")
    assert_json_error(client.get("/api/slides?bogus=1"), 400, "unknown parameter")


def test_slide_report_is_printable_html(client, service: Service, decisive_bundle: Bundle) -> None:
    slide_id = camera_results(client)[0]["slide_id"]
    r = client.get(f"/api/slides/{slide_id}/report")
    assert r.status_code == 200 and r.mimetype == "text/html"
    html = r.get_data(as_text=True)
    fields = service.store.slide_fields(slide_id)
    assert slide_id in html and decisive_bundle.model_sha256 in html and decisive_bundle.name in html
    assert f"{decisive_bundle.id} ({len(fields)} fields)" in html  # the bundle that produced the fields
    assert "confirmed by" in html and "haematologist" in html
    assert html.count('class="field-row') == len(fields) > 0  # one row per field
    for f in fields:
        assert f'data-id="{f.id}"' in html
    v = service.slide_verdict(slide_id)
    assert v.reason in html
    assert "@media print" in client.get("/static/style.css").get_data(as_text=True)
    dl = client.get(f"/api/slides/{slide_id}/report?download=1")
    assert "attachment" in dl.headers["Content-Disposition"]


def test_csv_export(client, sample_verdicts, decisive_bundle: Bundle) -> None:
    r = client.get("/api/results.csv?source=replay")
    assert r.status_code == 200 and r.mimetype == "text/csv"
    assert r.headers["Content-Disposition"].startswith("attachment;") and ".csv" in r.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(r.get_data(as_text=True))))
    assert len(rows) == len(sample_verdicts)
    by_name = {p.name: v for p, v in sample_verdicts.items()}
    for row in rows:
        v = by_name[row["name"]]
        assert row["status"] == v.status and (row["label"] or None) == v.label
        assert row["bundle"] == decisive_bundle.id
        for c in decisive_bundle.classes:
            assert float(row[f"p_{c}"]) == pytest.approx(v.scores[c], abs=1e-4)
    one = decisive_bundle.classes[0]
    sub = list(csv.DictReader(io.StringIO(client.get(f"/api/results.csv?label={one}").get_data(as_text=True))))
    assert all(row["label"] == one for row in sub)
    assert_json_error(client.get("/api/results.csv?status=nope"), 400, "status")


# -- commands and the token ------------------------------------------------------------------------------------


POSTS = ["/api/slides/start", "/api/slides/end", "/api/alert/acknowledge", "/api/classify"]


@pytest.mark.parametrize("path", POSTS)
def test_post_without_token_is_401(client, path: str) -> None:
    r = client.post(path)
    assert_json_error(r, 401, "token")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert_json_error(client.post(path, headers={"Authorization": "Basic dXNlcjpwYXNz"}), 401)
    assert_json_error(client.post(path, headers={"Authorization": "Bearer "}), 401)


@pytest.mark.parametrize("path", POSTS)
@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer wrong"}, {"X-Token": "wrong"}, {"Authorization": f"Bearer {TOKEN}x"},
    {"X-Token": TOKEN[:-1]}, {"X-Token": "é" * 8},
])
def test_post_with_wrong_token_is_403(client, service: Service, path: str, headers: dict) -> None:
    seq = service.status().slide
    assert_json_error(client.post(path, headers=headers), 403, "wrong")
    assert service.status().slide == seq  # nothing happened


def test_slide_commands_and_acknowledge(client, service: Service) -> None:
    r = client.post("/api/slides/start", headers=auth())
    assert r.status_code == 201
    sid = r.get_json()["slide_id"]
    assert service.status().slide.id == sid
    assert client.get(f"/api/slides/{sid}").status_code == 200
    r = client.post("/api/slides/end", headers={"X-Token": TOKEN})
    assert r.status_code == 200 and r.get_json()["slide_id"] == sid
    assert service.status().slide is None
    ended = client.get(f"/api/slides/{sid}").get_json()
    assert ended["ended"] is not None
    r = client.post("/api/slides/end", headers=auth())  # nothing open: not an error
    assert r.status_code == 200 and r.get_json()["slide_id"] is None
    r = client.post("/api/alert/acknowledge", headers=auth())
    assert r.status_code == 200 and r.get_json() == {"acknowledged": True, "alarm": False}
    assert service.status().alarm is False


# -- uploads ------------------------------------------------------------------------------------------------------


def test_upload_multipart_and_raw_body(client, service: Service, sample_verdicts) -> None:
    path, v = next(iter(sample_verdicts.items()))
    r = client.post("/api/classify", headers=auth(),
                    data={"file": (io.BytesIO(jpeg_bytes(path)), "bench/" + path.name)},
                    content_type="multipart/form-data")
    assert r.status_code == 201, r.get_json()
    body = r.get_json()
    assert (body["status"], body["label"], body["all"]) == (v.status, v.label, v.all)
    assert body["source"] == "upload" and body["name"] == path.name and body["slide_id"] is None
    assert r.headers["Location"] == f"/api/results/{body['id']}"
    assert client.get(r.headers["Location"]).get_json()["id"] == body["id"]
    raw = client.post("/api/classify?name=raw.jpg", headers={**auth(), "Content-Type": "image/jpeg"},
                      data=jpeg_bytes(path))
    assert raw.status_code == 201 and raw.get_json()["name"] == "raw.jpg"
    uploads = client.get("/api/results?source=upload").get_json()
    assert {body["id"], raw.get_json()["id"]} <= {u["id"] for u in uploads["results"]}


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), 128 if mode in ("L", "I;16") else (200, 150, 220)).save(buf, "PNG")
    return buf.getvalue()


def _bomb_png(side: int = 30000) -> bytes:
    """A PNG header claiming side x side pixels (900 MP) with a tiny compressed body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\0" * (side * 3 + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _gif_animated() -> bytes:
    frames = [Image.new("RGB", (100, 100), c) for c in ((200, 100, 200), (100, 200, 100))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _bad_uploads(sample: Path) -> dict[str, bytes]:
    good = sample.read_bytes()
    return {
        "empty.jpg": b"",
        "truncated.jpg": good[: len(good) // 3],
        "header-only.jpg": good[:200],
        "notes.jpg": b"This is a text file that was renamed to .jpg\n" * 20,
        "script.png": b"<script>alert(1)</script>",
        "grey.png": _png(200, 200, "L"),
        "tiny.png": _png(1, 1),
        "bomb.png": _bomb_png(),
        "anim.gif": _gif_animated(),
        "random.jpg": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "fake-jpeg.jpg": b"\xff\xd8\xff\xe0" + b"\0" * 500,
    }


@pytest.mark.parametrize("name", list(_bad_uploads(sorted(SAMPLES.glob("*.jpg"))[0]).keys()))
def test_bad_uploads_are_4xx_with_a_reason(client, service: Service, name: str) -> None:
    data = _bad_uploads(sorted(SAMPLES.glob("*.jpg"))[0])[name]
    before = service.store.count()
    r = client.post("/api/classify", headers=auth(), data={"file": (io.BytesIO(data), name)},
                    content_type="multipart/form-data")
    body = assert_json_error(r, 422)
    assert name in body["message"] and len(body["message"]) > len(name) + 10
    assert service.store.count() == before  # nothing recorded
    assert_still_running(service)


def test_oversized_upload_is_413(client, service: Service) -> None:
    big = b"\xff\xd8" + b"\0" * (UPLOAD_LIMIT + 1)
    r = client.post("/api/classify", headers=auth(), data={"file": (io.BytesIO(big), "big.jpg")},
                    content_type="multipart/form-data")
    assert_json_error(r, 413, "limit")
    r = client.post("/api/classify?name=big.jpg", headers={**auth(), "Content-Type": "image/jpeg"}, data=big)
    assert_json_error(r, 413, "limit")
    assert_still_running(service)


def test_upload_form_without_a_file_is_400(client) -> None:
    r = client.post("/api/classify", headers=auth(), data={"other": "x"}, content_type="multipart/form-data")
    assert_json_error(r, 400, "file")


def test_loop_still_classifies_after_the_bad_requests(client, service: Service, sample_paths) -> None:
    r = client.post("/api/classify", headers=auth(), data={"file": (io.BytesIO(sample_paths[-1].read_bytes()),
                                                                     "after.jpg")},
                    content_type="multipart/form-data")
    assert r.status_code == 201
    assert_still_running(service)
    assert service.status().faults == ()


# -- live events -----------------------------------------------------------------------------------------------------


def read_event(resp, event: str = "snapshot") -> dict:
    buf = b""
    for chunk in resp.response:
        buf += chunk
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            lines = block.decode().split("\n")
            if f"event: {event}" in lines:
                return json.loads(next(line[6:] for line in lines if line.startswith("data: ")))
    raise AssertionError("stream ended without an event")


def test_event_stream_sends_snapshots_and_picks_up_changes(client, service: Service) -> None:
    resp = client.get("/api/events", buffered=False)
    try:
        assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
        first = read_event(resp)
        assert first["status"]["ready"] and first["recent"]
        sid = client.post("/api/slides/start", headers=auth()).get_json()["slide_id"]
        for _ in range(50):
            snap = read_event(resp)
            if (snap["status"]["slide"] or {}).get("id") == sid:
                break
        else:
            raise AssertionError("the stream never showed the new slide")
        assert snap["status"]["seq"] > first["status"]["seq"]
    finally:
        resp.close()
        client.post("/api/slides/end", headers=auth())


def test_event_streams_are_limited_and_slots_come_back(service: Service) -> None:
    app = create_app(service, stream_slots=1)
    c = app.test_client()
    first = c.get("/api/events", buffered=False)
    read_event(first)
    busy = c.get("/api/events")
    assert_json_error(busy, 503, "polls")
    first.close()
    again = c.get("/api/events", buffered=False)
    assert again.status_code == 200
    again.close()


# -- failures inside the service ----------------------------------------------------------------------------------


def test_internal_errors_are_json_and_leak_nothing(service: Service, monkeypatch) -> None:
    app = create_app(service)
    c = app.test_client()

    def boom() -> dict:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(service, "status", boom)
    r = c.get("/api/status")
    body = assert_json_error(r, 500, "internal error")
    assert "secret" not in r.get_data(as_text=True) and "Traceback" not in r.get_data(as_text=True)
    monkeypatch.undo()

    def store_down(*a, **k):
        raise StoreError("results.sqlite3: cannot read (disk I/O error); check the SD card")

    monkeypatch.setattr(service.store, "query", store_down)
    body = assert_json_error(c.get("/api/results"), 503, "store")
    assert "SD card" in body["message"]


# -- the real server ------------------------------------------------------------------------------------------------


def test_serve_with_waitress_on_localhost(service: Service) -> None:
    server = serve(service, "127.0.0.1", 0, max_upload_bytes=UPLOAD_LIMIT)
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        with urllib.request.urlopen(server.url + "api/status", timeout=10) as resp:
            assert resp.status == 200 and resp.headers["X-Frame-Options"] == "DENY"
            assert json.load(resp)["ready"] is True
        req = urllib.request.Request(server.url + "api/slides/start", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 401 and json.load(e.value)["message"]
        req = urllib.request.Request(server.url + "api/classify?name=big.jpg", method="POST",
                                     data=b"\0" * (UPLOAD_LIMIT + 10), headers={**auth(), "Content-Type": "image/jpeg"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 413
        # an open event stream does not stop close()
        stream = urllib.request.urlopen(server.url + "api/events", timeout=10)
        assert stream.readline().startswith(b"retry:")
    finally:
        server.close()
    stream.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    server.close()  # idempotent
    assert_still_running(service)


def test_serve_binds_localhost_by_default(service: Service) -> None:
    import inspect

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert config_mod.Config().web.host == "127.0.0.1"


def test_the_service_is_what_the_page_types_it_by(service: Service) -> None:
    assert isinstance(service, ServiceAPI)


def test_a_thumbnail_is_the_frames_centre_square_when_there_is_no_eyepiece_disc(tmp_path: Path) -> None:
    frame = np.full((200, 300, 3), 200, np.uint8)
    frame[:, :50] = frame[:, 250:] = (255, 255, 0)  # bright yellow bands either side, outside the centre square
    path = tmp_path / "frame.jpg"
    Image.fromarray(frame).save(path, quality=95)
    with Image.open(io.BytesIO(thumbnail(path))) as im:
        thumb = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert thumb.shape == (THUMB_SIZE, THUMB_SIZE, 3)
    assert abs(float(thumb[..., 2].mean()) - 200) < 8  # no yellow (blue 0) came in from the sides
