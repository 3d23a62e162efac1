"""Avro schemas of the streaming service and its wire format; the ``*.avsc`` files here are the only copy.

Wire format: Avro *single-object encoding* (Avro specification, "Single object encoding")::

    C3 01 | 8-byte CRC-64-AVRO fingerprint of the writer schema (little-endian) | Avro binary body

The fingerprint is taken over the schema's Parsing Canonical Form, so docs and defaults do not change
it. A reader looks the fingerprint up in the registry of writer schemas it knows (every ``*.avsc`` file
shipped in this package, plus any registered with :func:`register_writer_schema`) and resolves that
writer schema against its own reader schema, so a sender one schema version ahead (a new field with a
default) or behind is still read. No schema registry service is needed; deployments that use a
Confluent registry can swap the 10-byte header for its 5-byte one in :func:`encode`/:func:`decode`.

Files: ``query.avsc``, ``result.avsc``, ``dead_letter.avsc`` are the current (reader and writer)
schemas; an older or newer writer version of a family may be shipped as ``<family>.<tag>.avsc``
(e.g. ``query.v2.avsc``) and is then accepted on the wire.
"""

from __future__ import annotations

import copy
import io
import json
import threading
from functools import cache
from pathlib import Path
from typing import Any, Final

import fastavro
from fastavro.schema import fingerprint as _fastavro_fingerprint
from fastavro.schema import parse_schema, to_parsing_canonical_form

from batch_index.errors import EcgSearchError

MAGIC: Final[bytes] = b"\xc3\x01"
HEADER_LEN: Final[int] = len(MAGIC) + 8
FAMILIES: Final[tuple[str, ...]] = ("query", "result", "dead_letter")
SCHEMA_DIR: Final[Path] = Path(__file__).resolve().parent


class WireFormatError(EcgSearchError):
    """Bytes that are not a message of the expected family (bad header, unknown schema, bad body)."""


class UnknownSchemaError(WireFormatError):
    """The header names a writer schema this reader does not know (or one of another family)."""


class UndecodableError(WireFormatError):
    """No single-object header, or an Avro body that does not decode against its writer schema."""


@cache
def load_schema(family: str) -> dict[str, Any]:
    """The current parsed schema of ``family`` (``query``, ``result`` or ``dead_letter``), loaded once."""
    if family not in FAMILIES:
        raise ValueError(f"unknown schema family {family!r}; expected one of {', '.join(FAMILIES)}")
    return _parse_file(SCHEMA_DIR / f"{family}.avsc")


def schema_fingerprint(schema: dict[str, Any]) -> bytes:
    """The 8-byte CRC-64-AVRO fingerprint (little-endian, as on the wire) of a parsed or raw schema."""
    return bytes.fromhex(_fastavro_fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


@cache
def fingerprint(family: str) -> bytes:
    """Fingerprint of the current schema of ``family``."""
    return schema_fingerprint(load_schema(family))


def register_writer_schema(family: str, schema: dict[str, Any] | str) -> bytes:
    """Accept messages written with ``schema`` (a dict or JSON text) as ``family``; returns its fingerprint.

    The schema must resolve against the current one (Avro resolution rules: added fields need a
    default on the reader side, removed fields need a default here); otherwise ``WireFormatError``.
    """
    parsed = parse_schema(json.loads(schema) if isinstance(schema, str) else copy.deepcopy(schema))
    _check_resolves(family, parsed)
    fp = schema_fingerprint(parsed)
    with _LOCK:
        _registry()[fp] = (family, parsed)
    return fp


def encode(family: str, record: dict[str, Any]) -> bytes:
    """Header + Avro binary of ``record`` under the current ``family`` schema."""
    buf = io.BytesIO()
    buf.write(MAGIC)
    buf.write(fingerprint(family))
    fastavro.schemaless_writer(buf, load_schema(family), record, strict_allow_default=True)
    return buf.getvalue()


def writer_family(raw: bytes) -> str | None:
    """The family of the writer schema named in ``raw``'s header, or None if unknown or no header."""
    if len(raw) < HEADER_LEN or raw[:2] != MAGIC:
        return None
    entry = _registry().get(bytes(raw[2:HEADER_LEN]))
    return entry[0] if entry else None


def decode(family: str, raw: bytes) -> dict[str, Any]:
    """Decode one message of ``family``, resolving its writer schema to the current reader schema.

    Raises
    ------
    UndecodableError
        No header, or a body that is not valid Avro for the writer schema (truncated, trailing bytes).
    UnknownSchemaError
        A well-formed header whose fingerprint is unknown or belongs to another family.
    """
    if len(raw) < HEADER_LEN or raw[:2] != MAGIC:
        raise UndecodableError(
            f"not a single-object Avro message: expected header {MAGIC.hex()} + 8-byte fingerprint, "
            f"got {bytes(raw[:HEADER_LEN]).hex() or 'empty message'}")
    fp = bytes(raw[2:HEADER_LEN])
    entry = _registry().get(fp)
    if entry is None or entry[0] != family:
        what = "unknown" if entry is None else f"a {entry[0]!r} schema, not {family!r}"
        raise UnknownSchemaError(f"writer schema fingerprint {fp.hex()} is {what}")
    writer = entry[1]
    reader = load_schema(family)
    body = io.BytesIO(raw[HEADER_LEN:])
    try:
        record = fastavro.schemaless_reader(body, writer, None if writer is reader else reader)
    except Exception as e:  # hostile bytes raise anything from EOFError to MemoryError-ish ValueErrors
        raise UndecodableError(f"Avro body does not decode as {family}: {type(e).__name__}: {e}") from e
    if body.tell() != len(raw) - HEADER_LEN:
        raise UndecodableError(
            f"{len(raw) - HEADER_LEN - body.tell()} trailing byte(s) after the {family} record")
    return record


_LOCK = threading.Lock()


@cache
def _registry() -> dict[bytes, tuple[str, dict[str, Any]]]:
    """Fingerprint -> (family, parsed writer schema) for every ``*.avsc`` shipped in this package."""
    reg: dict[bytes, tuple[str, dict[str, Any]]] = {}
    for family in FAMILIES:
        current = load_schema(family)
        reg[fingerprint(family)] = (family, current)
        for path in sorted(SCHEMA_DIR.glob(f"{family}.*.avsc")):
            parsed = _parse_file(path)
            _check_resolves(family, parsed)
            reg[schema_fingerprint(parsed)] = (family, parsed)
    return reg


def _parse_file(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        return parse_schema(json.load(f))


def _check_resolves(family: str, writer: dict[str, Any]) -> None:
    """Fail early (not on the first message) if ``writer`` cannot be read with the current schema."""
    reader = load_schema(family)
    if writer.get("name") != reader.get("name"):
        raise WireFormatError(
            f"writer schema {writer.get('name')!r} cannot be a {family!r} schema ({reader.get('name')!r})")
    # a writer missing a reader field without default fails here; extra writer fields are skipped
    writer_fields = {f["name"] for f in writer["fields"]}
    for f in reader["fields"]:
        if f["name"] not in writer_fields and "default" not in f:
            raise WireFormatError(
                f"writer schema for {family!r} lacks field {f['name']!r}, which has no default to fill in")
