"""A structural check of a ``.tflite`` file before a TFLite runtime sees it.

The runtimes' Python interpreters map the file and trust every offset in it:
a model that is truncated or damaged (but still matches its manifest, e.g.
a converter that ran out of disk before the hash was taken) crashes the
process with a segmentation fault, with no message, in a start-up loop. This
walks the FlatBuffer the way the interpreter will (model, buffers, subgraphs,
tensors, operators) and checks that every table, vector and string lies
inside the file and every index points at something that exists, so such a
file is refused with a :class:`~device.errors.BundleError` instead. The sha256
in the manifest remains the check that the file is the right one.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from device.errors import BundleError

IDENTIFIER = b"TFL3"


class _Bad(Exception):
    pass


class _Buf:
    def __init__(self, data: bytes | mmap.mmap):
        self.d, self.n = data, len(data)

    def _need(self, pos: int, size: int, what: str) -> None:
        if pos < 0 or size < 0 or pos + size > self.n:
            raise _Bad(f"{what} at byte {pos} (+{size}) lies outside the {self.n}-byte file")

    def _scalar(self, fmt: str, pos: int, what: str) -> int:
        """The little-endian number of struct format ``fmt`` at ``pos``, once it is known to lie in the file."""
        self._need(pos, struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.d, pos)[0]

    def u16(self, pos: int, what: str) -> int:
        return self._scalar("<H", pos, what)

    def u32(self, pos: int, what: str) -> int:
        return self._scalar("<I", pos, what)

    def i32(self, pos: int, what: str) -> int:
        return self._scalar("<i", pos, what)

    def u64(self, pos: int, what: str) -> int:
        return self._scalar("<Q", pos, what)

    # -- FlatBuffer structure ------------------------------------------------------------------------------

    def table(self, pos: int, what: str) -> tuple[int, int, int]:
        """(table position, vtable position, number of fields) of the table at ``pos``, checked."""
        vt = pos - self.i32(pos, what)
        size = self.u16(vt, f"{what} vtable")
        if size < 4 or size % 2:
            raise _Bad(f"{what} vtable at byte {vt} has size {size}")
        self._need(vt, size, f"{what} vtable")
        tsize = self.u16(vt + 2, f"{what} vtable")
        self._need(pos, max(4, tsize), what)
        return pos, vt, (size - 4) // 2

    def field(self, t: tuple[int, int, int], index: int, what: str) -> int | None:
        """Absolute position of field ``index`` of table ``t``, or None when absent."""
        pos, vt, n = t
        if index >= n:
            return None
        off = self.u16(vt + 4 + 2 * index, what)
        return pos + off if off else None

    def ref(self, at: int, what: str) -> int:
        return at + self.u32(at, what)

    def vector(self, t: tuple[int, int, int], index: int, elem: int, what: str) -> tuple[int, int]:
        """(first element position, length) of a vector field (0, 0 when absent), fully inside the file."""
        f = self.field(t, index, what)
        if f is None:
            return 0, 0
        v = self.ref(f, what)
        length = self.u32(v, what)
        self._need(v + 4, length * elem, what)
        return v + 4, length

    def tables(self, t: tuple[int, int, int], index: int, what: str) -> list[tuple[int, int, int]]:
        start, length = self.vector(t, index, 4, what)
        return [self.table(self.ref(start + 4 * i, f"{what}[{i}]"), f"{what}[{i}]") for i in range(length)]

    def ints(self, t: tuple[int, int, int], index: int, what: str) -> list[int]:
        start, length = self.vector(t, index, 4, what)
        return [self.i32(start + 4 * i, what) for i in range(length)]

    def scalar_u32(self, t: tuple[int, int, int], index: int, what: str, default: int = 0) -> int:
        f = self.field(t, index, what)
        return default if f is None else self.u32(f, what)


def _walk(b: _Buf) -> None:
    if b.n < 8:
        raise _Bad(f"file is {b.n} bytes, too short for a model")
    if bytes(b.d[4:8]) != IDENTIFIER:
        raise _Bad(f"file identifier is {bytes(b.d[4:8])!r}, not {IDENTIFIER!r}: not a TFLite model")
    model = b.table(b.u32(0, "root"), "model")
    codes = b.tables(model, 1, "operator_codes")
    buffers = b.tables(model, 4, "buffers")
    for i, buf in enumerate(buffers):
        b.vector(buf, 0, 1, f"buffers[{i}].data")
        off_f, size_f = b.field(buf, 1, "buffer"), b.field(buf, 2, "buffer")
        if off_f is not None and size_f is not None:  # data stored after the FlatBuffer (models > 2 GB)
            off, size = b.u64(off_f, "buffer offset"), b.u64(size_f, "buffer size")
            if off > 1 and off + size > b.n:
                raise _Bad(f"buffers[{i}] points at bytes {off}..{off + size}, past the end of the file")
    subgraphs = b.tables(model, 2, "subgraphs")
    if not subgraphs:
        raise _Bad("model has no subgraph")
    for s, sg in enumerate(subgraphs):
        where = f"subgraphs[{s}]"
        tensors = b.tables(sg, 0, f"{where}.tensors")
        for i, t in enumerate(tensors):
            b.vector(t, 0, 4, f"{where}.tensors[{i}].shape")
            buffer = b.scalar_u32(t, 2, f"{where}.tensors[{i}].buffer")
            if buffer >= max(1, len(buffers)):
                raise _Bad(f"{where}.tensors[{i}] uses buffer {buffer} of {len(buffers)}")
            name = b.field(t, 3, "tensor name")
            if name is not None:
                sp = b.ref(name, "tensor name")
                b._need(sp + 4, b.u32(sp, "tensor name"), "tensor name")
            q = b.field(t, 4, "quantization")
            if q is not None:
                qt = b.table(b.ref(q, "quantization"), f"{where}.tensors[{i}].quantization")
                b.vector(qt, 2, 4, "quantization scale")
                b.vector(qt, 3, 8, "quantization zero_point")
        for kind, index in (("inputs", 1), ("outputs", 2)):
            for x in b.ints(sg, index, f"{where}.{kind}"):
                if not 0 <= x < len(tensors):
                    raise _Bad(f"{where}.{kind} names tensor {x} of {len(tensors)}")
        for o, op in enumerate(b.tables(sg, 3, f"{where}.operators")):
            code = b.scalar_u32(op, 0, "opcode_index")
            if code >= len(codes):
                raise _Bad(f"{where}.operators[{o}] uses operator code {code} of {len(codes)}")
            for kind, index in (("inputs", 1), ("outputs", 2)):
                for x in b.ints(op, index, f"{where}.operators[{o}].{kind}"):
                    if not -1 <= x < len(tensors):
                        raise _Bad(f"{where}.operators[{o}].{kind} names tensor {x} of {len(tensors)}")
            opts = b.field(op, 4, "builtin_options")
            if opts is not None:
                b.table(b.ref(opts, "builtin_options"), f"{where}.operators[{o}].builtin_options")
            b.vector(op, 5, 1, f"{where}.operators[{o}].custom_options")


def check_tflite(path: str | Path) -> None:
    """Raise :class:`BundleError` (naming the file, the fault and the fix) unless ``path`` is a well-formed model."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                raise _Bad("file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                _walk(_Buf(m))
    except _Bad as exc:
        raise BundleError(f"{path}: damaged or truncated TFLite model ({exc}); restore the models/ folder or "
                          "rebuild it with `make convert`") from None
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the model ({exc.strerror}); check the file and its "
                          "permissions") from exc
