"""Commands (each needs the device token): classify an uploaded image, start or end a slide, acknowledge the ALL
alarm. Uploads are queued to the loop's own thread (``classify_upload``); nothing here touches the camera or the
classifier."""

from __future__ import annotations

import logging

from flask import Blueprint, jsonify, request

from device.errors import ImageError, ScreenError, StoreError
from device.web.context import bad_request, error_response, page_state, service
from device.web.params import safe_name
from device.web.presenters import report_url, result_json, status_json, verdict_json
from device.web.security import require_token

log = logging.getLogger(__name__)

bp = Blueprint("control", __name__)


@bp.post("/api/classify")
@require_token
def classify():
    """Classify one uploaded image (multipart field ``file``, or the raw body with ``?name=``)."""
    if request.files:
        f = request.files.get("file") or request.files.get("image") or next(iter(request.files.values()))
        data, name = f.read(), safe_name(f.filename)
    elif request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        bad_request("no image in the form; send the file in a field named 'file'")
    else:
        data, name = request.get_data(cache=False), safe_name(request.args.get("name"))
    st = page_state()
    if not st.uploads.acquire(blocking=False):
        return error_response(429, "another upload is being classified; try again in a moment",
                              headers={"Retry-After": "1"})
    try:
        r = st.service.classify_upload(data, name)
    except ImageError as exc:
        log.info("upload %s refused: %s", name, exc)
        return error_response(422, str(exc))
    except StoreError:
        raise
    except ScreenError as exc:
        return error_response(503, str(exc))
    finally:
        st.uploads.release()
    body = result_json(r)
    resp = jsonify(body)
    if r.id is not None:
        resp.status_code = 201
        resp.headers["Location"] = body["url"]
    return resp


@bp.post("/api/slides/start")
@require_token
def slide_start():
    sid = service().start_slide()
    resp = jsonify(slide_id=sid, report_url=report_url(sid))
    resp.status_code = 201
    return resp


@bp.post("/api/slides/end")
@require_token
def slide_end():
    svc = service()
    sid = svc.end_slide()
    return jsonify(slide_id=sid, verdict=verdict_json(svc.slide_verdict(sid)) if sid else None,
                   report_url=report_url(sid) if sid else None)


@bp.post("/api/alert/acknowledge")
@require_token
def acknowledge():
    svc = service()
    svc.acknowledge()
    return jsonify(acknowledged=True, alarm=bool(status_json(svc).get("alarm")))
