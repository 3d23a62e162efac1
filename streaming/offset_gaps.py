"""Offsets a micro-batch skipped: queries that were in the log and will never be answered.

A Kafka log can lose records the service has not read yet: retention or compaction deletes them, or a
position falls out of range and the consumer resets to the log's start (the ``ckafka`` source, like
Spark's own with ``failOnDataLoss=false``, reads on from what is there). Transaction markers also take
offsets. None of this fails the stream, but an operator must see it: :class:`OffsetGaps` compares each
batch's records with where the previous batch ended and counts every offset not read.

Where the previous batch ended comes from this process's last batch, or after a restart from the
checkpoint's offset log (``offsets/<batch_id - 1>``, one JSON line per source, ``{topic: {partition:
next_offset}}`` for both sources; keys starting with ``@`` are the ckafka source's own). A log that
moved backwards (topic recreated) is not a gap: the source reports that itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)

TP = tuple[str, int]


class _Located(Protocol):
    topic: str
    partition: int
    offset: int


class OffsetGaps:
    """Counts offsets skipped between and within micro-batches (see the module docstring)."""

    def __init__(self, checkpoint: str | None) -> None:
        self.checkpoint = checkpoint
        self.next: dict[TP, int] = {}  # per partition: the offset after the last record seen
        self.total = 0

    def observe(self, batch_id: int, records: Iterable[_Located]) -> int:
        """Take a batch's records; returns how many offsets it skipped (and logs where)."""
        by_tp: dict[TP, list[int]] = {}
        for r in records:
            by_tp.setdefault((r.topic, int(r.partition)), []).append(int(r.offset))
        if not by_tp:
            return 0
        start = self._checkpointed(batch_id - 1) if any(tp not in self.next for tp in by_tp) else {}
        skipped = 0
        for tp, offsets in sorted(by_tp.items()):
            offsets.sort()
            expected = self.next.get(tp, start.get(tp))
            holes: list[tuple[int, int]] = []
            for off in offsets:
                if expected is not None and off > expected:
                    holes.append((expected, off - 1))
                expected = off + 1  # a record behind the expectation (log recreated) is no gap
            self.next[tp] = offsets[-1] + 1
            n = sum(b - a + 1 for a, b in holes)
            if n:
                shown = ", ".join(f"{a}..{b}" if a != b else str(a) for a, b in holes[:5])
                logger.warning("batch %d: %s[%d] offsets %s%s (%d) were never read: deleted by retention or "
                               "compaction before the service reached them, or transaction markers", batch_id,
                               tp[0], tp[1], shown, " ..." if len(holes) > 5 else "", n)
            skipped += n
        self.total += skipped
        return skipped

    def _checkpointed(self, batch_id: int) -> dict[TP, int]:
        """Where batch ``batch_id`` ended, from a local checkpoint's offset log; {} if not readable."""
        if batch_id < 0 or not self.checkpoint or "://" in self.checkpoint:
            return {}
        try:
            lines = (Path(self.checkpoint) / "offsets" / str(batch_id)).read_text(encoding="utf-8").splitlines()
        except OSError:
            return {}
        out: dict[TP, int] = {}
        for line in lines[2:]:  # "v1", the batch metadata, then one line per source
            try:
                parsed = json.loads(line)
            except ValueError:
                continue
            if isinstance(parsed, Mapping):
                out.update(_positions(parsed))
        return out


def _positions(offsets: Mapping[str, object]) -> dict[TP, int]:
    out: dict[TP, int] = {}
    for topic, parts in offsets.items():
        if not isinstance(parts, Mapping):
            continue
        for p, o in parts.items():
            if not str(p).startswith("@") and str(p).lstrip("-").isdigit() and isinstance(o, int) and o >= 0:
                out[(str(topic), int(p))] = o
    return out
