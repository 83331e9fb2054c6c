"""Routes that read what was recorded: results (with their image and thumbnail), slides, the slide report and the
CSV export. They read the store and the loop's snapshot; none of them queues work for the loop."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

from flask import Blueprint, Response, abort, jsonify, render_template, request, send_file

from device.errors import StoreError
from device.web.context import page_state, service
from device.web.params import (
    CSV_PARAMS,
    PAGING_PARAMS,
    RESULT_PARAMS,
    check_known,
    filters,
    paging,
    result_or_404,
    slide_or_404,
)
from device.web.presenters import SlideReport, report_url, result_json, slide_json, status_json, thumbnail, verdict_json

log = logging.getLogger(__name__)

bp = Blueprint("records", __name__)

NO_IMAGE = "result {} has no stored image (not kept, or pruned to save space)"


@bp.get("/api/results")
def results():
    svc = service()
    found = filters(RESULT_PARAMS, svc.bundle.classes)
    limit, offset = paging()
    rows = svc.store.query(found, limit=limit, offset=offset)
    total = svc.store.count(found)
    nxt = offset + len(rows) if offset + len(rows) < total else None
    return jsonify(results=[result_json(r) for r in rows], total=total, limit=limit, offset=offset,
                   next_offset=nxt)


@bp.get("/api/results/<id_text>")
def result(id_text: str):
    return jsonify(result_json(result_or_404(service().store, id_text)))


@bp.get("/api/results/<id_text>/image")
def result_image(id_text: str):
    store = service().store
    r = result_or_404(store, id_text)
    path = store.image_file(r)
    if path is None:
        abort(404, description=NO_IMAGE.format(r.id))
    resp = send_file(path, mimetype="image/jpeg", max_age=3600, conditional=True,
                     download_name=f"field-{r.id}.jpg")
    resp.headers["Cache-Control"] = "private, max-age=3600"
    return resp


@bp.get("/api/results/<id_text>/thumb")
def result_thumb(id_text: str):
    st = page_state()
    store = st.service.store
    r = result_or_404(store, id_text)
    assert r.id is not None  # read back from the store

    def make() -> bytes:
        path = store.image_file(r)
        if path is None:
            abort(404, description=NO_IMAGE.format(r.id))
        return thumbnail(path)

    resp = Response(st.thumbs.get(r.id, make), mimetype="image/jpeg")
    resp.headers["Cache-Control"] = "private, max-age=3600"
    return resp


@bp.get("/api/results.csv")
def results_csv():
    svc = service()
    rows = svc.store.csv_rows(filters(CSV_PARAMS, svc.bundle.classes), tuple(svc.bundle.classes))

    def body() -> Iterator[str]:
        try:
            yield from rows
        except StoreError as exc:  # headers are gone: say so in the file rather than truncate silently
            log.error("CSV export interrupted: %s", exc)
            yield f"# EXPORT INCOMPLETE: {exc}\n"

    stamp = time.strftime("%Y%m%d-%H%M%S")
    resp = Response(body(), mimetype="text/csv")
    resp.headers["Content-Disposition"] = f'attachment; filename="leukoscreen-results-{stamp}.csv"'
    return resp


@bp.get("/api/slides")
def slides():
    check_known(PAGING_PARAMS)
    limit, offset = paging()
    svc = service()
    rows = svc.store.slides(limit=limit, offset=offset)
    current = (status_json(svc).get("slide") or {}).get("id")
    out = []
    for row in rows:
        d = slide_json(row)
        d["open"] = row.id == current
        d["report_url"] = report_url(row.id)
        out.append(d)
    return jsonify(slides=out, current=current, limit=limit, offset=offset)


@bp.get("/api/slides/<slide_id>")
def slide(slide_id: str):
    svc = service()
    row = slide_or_404(svc.store, slide_id)
    d = slide_json(row)
    d["verdict"] = verdict_json(svc.slide_verdict(row.id))
    d["report_url"] = report_url(row.id)
    d["results_url"] = f"/api/results?slide={row.id}"
    return jsonify(d)


@bp.get("/api/slides/<slide_id>/report")
def slide_report(slide_id: str):
    svc = service()
    row = slide_or_404(svc.store, slide_id)
    report = SlideReport.build(row, svc.store.slide_fields(row.id), svc.slide_verdict(row.id), svc.bundle,
                               generated=time.time(), hostname=socket.gethostname())
    resp = Response(render_template("report.html", **report.context()), mimetype="text/html")
    if request.args.get("download"):
        resp.headers["Content-Disposition"] = f'attachment; filename="leukoscreen-slide-{row.id}.html"'
    return resp
