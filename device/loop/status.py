"""``Service.status()``: one snapshot of the running appliance, as a frozen dataclass.

:meth:`ServiceStatus.to_json` is what the page's ``/api/status`` and live events send (the field names and
their order are the API). The figures here are pure functions of what the loop recorded.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from device.bundle import Bundle
from device.install import Installed
from device.leds import Pattern
from device.loop.alerts import Fault
from device.loop.slide import OpenSlide
from device.store.records import FieldResult, StoreStats

CPU_TEMP = Path("/sys/class/thermal/thermal_zone0/temp")


@dataclass(frozen=True)
class Timing:
    """Percentiles (ms) of the last few hundred values."""

    p50: float | None
    p95: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Timing:
        v = sorted(values)
        return cls(_percentile_of_sorted(v, 50), _percentile_of_sorted(v, 95), len(v))

    def to_dict(self) -> dict[str, Any]:
        return {"p50": self.p50, "p95": self.p95, "n": self.n}


@dataclass(frozen=True)
class ServiceStatus:
    ready: bool
    faults: tuple[Fault, ...]
    bundle: Bundle  # "model" in the JSON
    installed: Installed  # "bundles" in the JSON: the operator panel's active and previous bundle
    runtime: str | None
    delegate: str | None
    inference_ms: Timing
    field_ms: Timing
    fps: float | None
    uptime_s: float
    started: float  # epoch s
    cpu_temp_c: float | None
    disk_free_bytes: int | None
    store: StoreStats | None  # None when the store could not say (``store_error``)
    store_error: str
    counts: MappingProxyType[str, int]  # frames, skipped, fields, uploads, camera_errors, store_errors, watchdog
    trigger: str
    source: str
    slide: OpenSlide | None
    last: FieldResult | None
    alarm: bool
    leds: Pattern
    seq: int

    def to_json(self) -> dict[str, Any]:
        b, st = self.bundle, self.store
        images = ({"bytes": st.image_bytes, "count": st.image_count, "enabled": st.images_enabled,
                   "error": st.last_image_error} if st is not None else {"error": self.store_error})
        return {
            "ready": self.ready,
            "faults": [f.to_dict() for f in self.faults],
            "model": {"name": b.name, "sha256": b.model_sha256, "classes": list(b.classes), "benign": b.benign,
                      "input_size": b.input.size, "bundle": b.id},
            "bundles": self.installed.to_dict(),
            "runtime": self.runtime,
            "delegate": self.delegate,
            "inference_ms": self.inference_ms.to_dict(),
            "field_ms": self.field_ms.to_dict(),
            "fps": self.fps,
            "uptime_s": self.uptime_s,
            "started": self.started,
            "cpu_temp_c": self.cpu_temp_c,
            "disk_free_bytes": self.disk_free_bytes,
            "db_bytes": st.db_bytes if st is not None else None,
            "fields": st.fields if st is not None else None,
            "images": images,
            "counts": dict(self.counts),
            "trigger": self.trigger,
            "source": self.source,
            "slide": self.slide.to_dict() if self.slide is not None else None,
            "last": self.last.to_dict() if self.last is not None else None,
            "alarm": self.alarm,
            "leds": self.leds.to_dict(),
            "seq": self.seq,
        }


def percentile(values: Sequence[float], q: float) -> float | None:
    """``np.percentile(values, q)`` (linear interpolation, the same arithmetic), rounded to 0.01.

    In plain Python: the page asks for these on every status request, and for a few hundred values numpy's
    call overhead (~0.1 ms) is most of the cost.
    """
    return _percentile_of_sorted(sorted(values), q)


def _percentile_of_sorted(v: Sequence[float], q: float) -> float | None:
    if not v:
        return None
    pos = (len(v) - 1) * (q / 100)
    i = min(int(pos), len(v) - 1)
    if i + 1 == len(v):
        return round(float(v[i]), 2)
    a, b, t = float(v[i]), float(v[i + 1]), pos - i
    # numpy's _lerp: from the nearer end, so the result stays within [a, b]
    return round(a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t), 2)


def rate(times: Sequence[float]) -> float | None:
    """Events per second over ``times`` (ascending)."""
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return round((len(times) - 1) / (times[-1] - times[0]), 3)


def cpu_temp(path: Path = CPU_TEMP) -> float | None:
    try:
        return round(int(path.read_text().strip()) / 1000.0, 1)
    except (OSError, ValueError):
        return None


def disk_free(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None
