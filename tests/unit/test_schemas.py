"""The wire format: single-object Avro with a schema fingerprint header, and schema evolution."""

from __future__ import annotations

import copy
import io
import json
from datetime import datetime, timezone

import fastavro
import pytest
from fastavro.schema import parse_schema

import schemas

T0 = datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)


def _raw_query_schema() -> dict:
    return json.loads((schemas.SCHEMA_DIR / "query.avsc").read_text())


def _query(**kw: object) -> dict:
    return {"correlation_id": "q-1", "sample": [0.5, -1.0], "metric": "cosine", "k": 3, "sent_at": T0, **kw}


def test_schema_files_parse_and_fingerprints_are_stable() -> None:
    # Pinned: changing a schema's canonical form changes its fingerprint; old readers then reject it.
    assert schemas.fingerprint("query").hex() == "8245a9b2399a41a4"
    assert schemas.fingerprint("result").hex() == "5471e0570dd75752"
    assert schemas.fingerprint("dead_letter").hex() == "7c440cec3a0da34d"
    assert schemas.load_schema("query") is schemas.load_schema("query")  # loaded once


def test_header_is_magic_plus_fingerprint() -> None:
    raw = schemas.encode("query", _query())
    assert raw[:2] == b"\xc3\x01" and raw[2:10] == schemas.fingerprint("query")
    assert schemas.writer_family(raw) == "query"


def test_round_trip_fills_defaults() -> None:
    rec = schemas.decode("query", schemas.encode("query", _query()))
    assert rec == {**_query(), "mode": "hkmeans", "threshold": None, "reply_topic": None}


def test_unknown_field_is_refused_by_the_writer() -> None:
    with pytest.raises(ValueError):
        schemas.encode("query", _query(priority=1))


@pytest.mark.parametrize("raw, error", [
    (b"", schemas.UndecodableError),
    (b"\x00\x00\x00\x00\x01" + b"x" * 20, schemas.UndecodableError),        # Confluent framing, not ours
    (b"\xc3\x01" + b"\x00" * 8 + b"\x02a", schemas.UnknownSchemaError),      # unknown fingerprint
])
def test_bad_headers_rejected(raw: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        schemas.decode("query", raw)


def test_other_family_is_unknown_schema() -> None:
    raw = schemas.encode("dead_letter", {"value": b"x", "topic": "t", "partition": 0, "offset": 1,
                                         "error_code": "X", "reason": "r", "failed_at": T0})
    with pytest.raises(schemas.UnknownSchemaError, match="dead_letter"):
        schemas.decode("query", raw)


@pytest.mark.parametrize("cut", [1, 5, 12])
def test_truncated_and_padded_bodies_rejected(cut: int) -> None:
    raw = schemas.encode("query", _query())
    with pytest.raises(schemas.UndecodableError):
        schemas.decode("query", raw[:-cut])
    with pytest.raises(schemas.UndecodableError, match="trailing"):
        schemas.decode("query", raw + b"\x00" * cut)


def test_evolved_writer_with_added_optional_field_is_read() -> None:
    newer = _raw_query_schema()
    newer["fields"].append({"name": "priority", "type": ["null", "int"], "default": None})
    fp = schemas.register_writer_schema("query", newer)
    assert fp != schemas.fingerprint("query")
    parsed = parse_schema(copy.deepcopy(newer))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, {**_query(), "mode": "exact", "threshold": None,
                                             "reply_topic": None, "priority": 7})
    raw = b"\xc3\x01" + fp + buf.getvalue()
    rec = schemas.decode("query", raw)
    assert rec["correlation_id"] == "q-1" and rec["mode"] == "exact" and "priority" not in rec


def test_older_writer_missing_a_defaulted_field_is_read() -> None:
    older = _raw_query_schema()
    older["fields"] = [f for f in older["fields"] if f["name"] != "mode"]
    fp = schemas.register_writer_schema("query", older)
    buf = io.BytesIO()
    rec = _query() | {"threshold": None, "reply_topic": None}
    fastavro.schemaless_writer(buf, parse_schema(older), rec)
    assert schemas.decode("query", b"\xc3\x01" + fp + buf.getvalue())["mode"] == "hkmeans"


def test_incompatible_writer_refused_at_registration() -> None:
    broken = _raw_query_schema()
    broken["fields"] = [f for f in broken["fields"] if f["name"] != "metric"]  # no default to fill in
    with pytest.raises(schemas.WireFormatError, match="metric"):
        schemas.register_writer_schema("query", broken)
