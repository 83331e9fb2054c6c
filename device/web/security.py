"""The page's defences that do not depend on how it is deployed: strict response headers, the Host check against
DNS rebinding, and the device token on every command."""

from __future__ import annotations

import functools
import hmac
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import Any

from flask import abort, request

from device.web.context import service

log = logging.getLogger(__name__)

CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")

SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), usb=(), payment=()",
}


def host_allowed(host: str, extra: frozenset[str]) -> bool:
    """IP literals, localhost, this machine's name (plain or ``.local``) and configured names."""
    name = host.strip().lower()
    if name.startswith("["):  # [v6]:port
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    if not name:
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    if name in extra or name in ("localhost", "localhost.localdomain") or name.endswith(".localhost"):
        return True
    me = socket.gethostname().lower()
    return name in (me, me + ".local", me.split(".")[0], me.split(".")[0] + ".local")


def require_token(view: Callable[..., Any]) -> Callable[..., Any]:
    """POST endpoints: ``Authorization: Bearer <token>`` or ``X-Token``; missing 401, wrong 403."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = request.headers.get("X-Token")
        auth = request.headers.get("Authorization", "")
        if given is None and auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer":
                given = value.strip()
        if not given:
            abort(401, description="this action needs the device token: send 'Authorization: Bearer <token>' "
                  "or 'X-Token: <token>' (the token is in the config or the state folder's 'token' file)")
        expected = service().token or ""
        if not expected or not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
            log.warning("refused %s %s from %s: wrong token", request.method, request.path, request.remote_addr)
            abort(403, description="wrong device token")
        return view(*args, **kwargs)

    return wrapper
