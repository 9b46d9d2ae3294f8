"""Struct sizes and field offsets of the DVK boundary, as cffi lays them out.

An operator runs `python -m dvk_cffi layout` on a DVS node to compare this build with the kernel;
`--i386` shows the wire/emulator layout.
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Iterable, Iterator
from typing import Any

import cffi

from .cdefs import I386_KERNEL_STRUCTS, STRUCT_NAMES, ffi_i386, ffi_native


@dataclasses.dataclass(frozen=True)
class Field:
    """One (possibly nested) field: dotted path from the struct, byte offset, size, C type."""

    name: str
    offset: int
    size: int
    ctype: str


@dataclasses.dataclass(frozen=True)
class StructLayout:
    """Size, alignment and fields of one struct in one layout."""

    name: str
    size: int
    align: int
    fields: tuple[Field, ...]

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)


def iter_fields(ffi: cffi.FFI, ctype: Any, prefix: str = "", base: int = 0,
                nested: bool = True) -> Iterator[Field]:
    """The fields of a struct/union ctype, depth first; nested structs and unions are listed
    and then expanded (arrays are not) when `nested`."""
    for name, f in ctype.fields:
        path = prefix + name
        off = base + f.offset
        cname = f.type.cname
        if "$" in cname:                       # cffi's name for an anonymous struct/union
            cname = f"{f.type.kind} (anonymous)"
        yield Field(path, off, ffi.sizeof(f.type), cname)
        if nested and f.type.kind in ("struct", "union"):
            yield from iter_fields(ffi, f.type, path + ".", off, nested)


def struct_layout(ffi: cffi.FFI, name: str, nested: bool = True) -> StructLayout:
    ctype = ffi.typeof(name)
    return StructLayout(name, ffi.sizeof(ctype), ffi.alignof(ctype),
                        tuple(iter_fields(ffi, ctype, nested=nested)))


def struct_names(i386: bool) -> tuple[str, ...]:
    """The structs shown for a layout (i386 adds the kernel-size dc/proc variants)."""
    return STRUCT_NAMES + (I386_KERNEL_STRUCTS if i386 else ())


def layouts(i386: bool = False, names: Iterable[str] | None = None,
            nested: bool = True) -> list[StructLayout]:
    """Layouts of the requested structs (all by default) for native or i386."""
    ffi = ffi_i386 if i386 else ffi_native
    wanted = struct_names(i386) if names is None else tuple(names)
    return [struct_layout(ffi, n, nested) for n in wanted]


def describe_host(i386: bool) -> str:
    if i386:
        return "i386 (wire / emulator layout; long and pointers = 4 bytes)"
    return (f"native ({platform.machine() or 'unknown machine'}; long = "
            f"{ffi_native.sizeof('long')} bytes, pointer = {ffi_native.sizeof('void *')} bytes)")


def format_layouts(items: Iterable[StructLayout], header: str) -> str:
    """Text report: `NAME size=N align=A` then one indented line per field."""
    lines = [f"# DVK struct layout: {header}"]
    for lay in items:
        lines.append(f"{lay.name} size={lay.size} align={lay.align}")
        for f in lay.fields:
            lines.append(f"  {f.name:<40} offset={f.offset:<6} size={f.size:<6} {f.ctype}")
    return "\n".join(lines) + "\n"
