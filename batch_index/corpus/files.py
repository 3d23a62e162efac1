"""The corpus layout on disk: Parquet with ``id`` (string), ``signal`` (list of float), optional ``label``.

Every producer (synthetic generator, WFDB ingestion) and consumer (index build, batch search) goes
through here, so the layout and its checks live in one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from batch_index.errors import InvalidInputError

ID_COL = "id"
SIGNAL_COL = "signal"
LABEL_COL = "label"
#: The largest sample magnitude accepted, in a corpus and in a query. The compiled kernels square and
#: sum float32 values with fast-math (no inf/NaN handling): 1e12 keeps a 10^5-sample squared norm
#: (1e29) far below float32's 3.4e38, while real signals (mV, uV, ADC counts up to 2^31) fit easily.
MAX_ABS_VALUE = 1e12


def corpus_schema(with_label: bool = True) -> pa.Schema:
    """Arrow schema of a corpus file; signals are float32 lists (half the bytes of doubles)."""
    fields = [pa.field(ID_COL, pa.string(), nullable=False)]
    if with_label:
        fields.append(pa.field(LABEL_COL, pa.string()))
    fields.append(pa.field(SIGNAL_COL, pa.list_(pa.float32()), nullable=False))
    return pa.schema(fields)


def to_record_batch(
    ids: Sequence[str], signals: npt.ArrayLike, labels: Sequence[str] | None = None
) -> pa.RecordBatch:
    """Pack ids, a (n, d) signal matrix and optional labels into one corpus record batch."""
    sig = np.ascontiguousarray(np.asarray(signals, dtype=np.float32))
    if sig.ndim != 2:
        raise InvalidInputError(f"signals must be a 2-D array (n_signals, n_samples), got shape {sig.shape}")
    if len(ids) != sig.shape[0]:
        raise InvalidInputError(f"{len(ids)} ids for {sig.shape[0]} signals")
    flat = pa.array(sig.reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, sig.size + 1, max(sig.shape[1], 1), dtype=np.int32)[: sig.shape[0] + 1])
    lists = pa.ListArray.from_arrays(offsets, flat)
    cols: list[pa.Array] = [pa.array(list(ids), type=pa.string())]
    if labels is not None:
        cols.append(pa.array(list(labels), type=pa.string()))
    cols.append(lists)
    return pa.RecordBatch.from_arrays(cols, schema=corpus_schema(labels is not None))


def write_corpus(
    path: str | Path,
    ids: Sequence[str],
    signals: npt.ArrayLike,
    labels: Sequence[str] | None = None,
) -> Path:
    """Write one Parquet file in the corpus layout (small corpora; Spark writes the big ones)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = to_record_batch(ids, signals, labels)
    pq.write_table(pa.Table.from_batches([batch]), path)
    return path


def signals_from_arrow(column: pa.Array | pa.ChunkedArray, *, expected_len: int | None = None,
                       what: str = "signal") -> npt.NDArray[np.float32]:
    """Turn a list<float> column into an (n, d) float32 matrix without a Python loop.

    Raises :class:`InvalidInputError` naming the first offending row when lengths differ from
    ``expected_len`` (or from each other), a signal is null, or a value is NaN/inf.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], type=pa.list_(pa.float32()))
    if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type) \
            and not pa.types.is_fixed_size_list(column.type):
        raise InvalidInputError(f"column {what!r} must be a list of floats, got Arrow type {column.type}")
    n = len(column)
    if column.null_count:
        bad = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise InvalidInputError(f"{what} in row {bad} is null")
    lengths = np.asarray(column.value_lengths() if hasattr(column, "value_lengths")
                         else pa.compute.list_value_length(column), dtype=np.int64) if n else np.zeros(0, np.int64)
    if n == 0:
        return np.zeros((0, expected_len or 0), dtype=np.float32)
    d = int(expected_len if expected_len is not None else lengths[0])
    wrong = np.flatnonzero(lengths != d)
    if wrong.size:
        i = int(wrong[0])
        raise InvalidInputError(
            f"{what} in row {i} has {int(lengths[i])} samples; expected {d} ({wrong.size} row(s) differ)")
    if d == 0:
        raise InvalidInputError(f"{what} rows are empty; expected at least one sample")
    flat = column.flatten()
    if flat.null_count:
        raise InvalidInputError(f"{what} contains null samples")
    values = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, d)
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise InvalidInputError(f"{what} in row {i} contains NaN or infinite values")
    big = np.abs(values).max(axis=1) > MAX_ABS_VALUE
    if big.any():
        i = int(np.flatnonzero(big)[0])
        raise InvalidInputError(f"{what} in row {i} has a value of magnitude {np.abs(values[i]).max():.3g}; "
                                f"samples must lie within +-{MAX_ABS_VALUE:.0e}")
    return values


def read_corpus(path: str | Path, *, expected_len: int | None = None
                ) -> tuple[list[str], npt.NDArray[np.float32], pa.Table]:
    """Read a (small) corpus or query file into ids, an (n, d) float32 matrix and the other columns.

    For corpora bigger than memory use the Spark job, which streams partitions instead.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"input {str(path)!r} does not exist")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise InvalidInputError(f"cannot read Parquet {str(path)!r}: {e}") from e
    for col in (ID_COL, SIGNAL_COL):
        if col not in table.column_names:
            raise InvalidInputError(
                f"{str(path)!r} has no column {col!r}; found {table.column_names} (expected id, signal)")
    if table.num_rows == 0:
        raise InvalidInputError(f"{str(path)!r} holds no rows")
    ids = check_ids(table.column(ID_COL).to_pylist(), where=str(path))
    signals = signals_from_arrow(table.column(SIGNAL_COL), expected_len=expected_len)
    return ids, signals, table.drop_columns([SIGNAL_COL])


def check_ids(ids: Iterable[object], *, where: str = "input", unique: bool = True) -> list[str]:
    """Ids must be non-null strings and (for a corpus) unique; name the first offender otherwise."""
    out: list[str] = []
    for i, v in enumerate(ids):
        if v is None:
            raise InvalidInputError(f"{where}: id in row {i} is null")
        out.append(str(v))
    if unique and len(set(out)) != len(out):
        seen: set[str] = set()
        for v in out:
            if v in seen:
                raise InvalidInputError(f"{where}: duplicate id {v!r}; ids must be unique")
            seen.add(v)
    return out
