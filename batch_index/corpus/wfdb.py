"""Cut real WFDB recordings (PhysioNet) into fixed-length windows in the corpus layout.

Why here and not in the Spark job: a record is one small file pair that fits in memory, so ingestion is
plain numpy that the CLI, the Spark job and the tests can all call. Every window is resampled to one
rate so that real and synthetic windows (and queries) are comparable sample by sample.

Labels come from the reference beat annotations (``.atr``) when the record has them: ``"V"`` if the
window holds any premature ventricular beat, else its most frequent beat symbol (usually ``"N"``).
Windows with no annotated beat, and records without annotations, get ``""``.
"""

from __future__ import annotations

import logging
import math
import operator
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Final, TypeVar

import numpy as np
import numpy.typing as npt
import wfdb
from scipy.signal import resample_poly

from batch_index.errors import InvalidInputError

logger = logging.getLogger(__name__)

ANNOTATION_EXT: Final[str] = "atr"
# PhysioNet beat annotation codes (https://archive.physionet.org/physiobank/annotations.shtml);
# rhythm changes ("+"), noise ("~"), comments and the like are not beats.
BEAT_SYMBOLS: Final[frozenset[str]] = frozenset("NLRBAaJSVrFejnE/fQ?")
_RECORD_SUFFIXES: Final[frozenset[str]] = frozenset({".hea", ".dat", ".mat", f".{ANNOTATION_EXT}"})
# Physical units converted to millivolts, the scale of the synthetic corpus; others are kept as stored.
_TO_MV: Final[dict[str, float]] = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "v": 1e3}

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
T = TypeVar("T")


@dataclass(frozen=True)
class IngestConfig:
    """How records become windows.

    Parameters
    ----------
    window_s : float
        Window length in seconds; windows have ``round(window_s * target_rate)`` samples.
    stride_s : float
        Seconds between window starts; smaller than ``window_s`` gives overlapping windows.
    target_rate : float
        Sampling rate (Hz) every record is resampled to.
    lead : str or int or None
        Lead name (``"MLII"``), 0-based index, or None for the first lead.
    """

    window_s: float = 10.0
    stride_s: float = 10.0
    target_rate: float = 250.0
    lead: str | int | None = None

    def __post_init__(self) -> None:
        for name in ("window_s", "stride_s", "target_rate"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise InvalidInputError(f"{name} must be a positive number, got {v!r}")
        if self.window_len < 1 or self.stride_len < 1:
            raise InvalidInputError(
                f"window_s={self.window_s} and stride_s={self.stride_s} at {self.target_rate} Hz must each "
                "cover at least one sample")

    @property
    def window_len(self) -> int:
        """Samples per window at the target rate."""
        return round(self.window_s * self.target_rate)

    @property
    def stride_len(self) -> int:
        """Samples between window starts at the target rate."""
        return round(self.stride_s * self.target_rate)


def windows_from_record(record_path: str | Path, cfg: IngestConfig | None = None
                        ) -> tuple[list[str], list[str], F32]:
    """Read one WFDB record and cut one lead into windows.

    Parameters
    ----------
    record_path : str or Path
        Record path without extension (``data/100``); a ``.hea``/``.dat``/``.mat`` suffix is accepted.
    cfg : IngestConfig, optional
        Defaults to 10 s windows, 10 s stride, 250 Hz, first lead.

    Returns
    -------
    ids : list of str
        ``{record}-{lead}-{start}``, start being the window's first sample at the target rate.
    labels : list of str
        Beat-annotation label per window (see module docstring), ``""`` when unknown.
    signals : ndarray of shape (n_windows, cfg.window_len), float32
        ``n_windows = (n_resampled - window_len) // stride_len + 1`` minus the windows skipped for NaN.

    Raises
    ------
    InvalidInputError
        The header is missing or unreadable, or the lead does not exist (the message lists the leads).
    """
    cfg = cfg if cfg is not None else IngestConfig()
    base = _record_base(record_path)
    header = _read(wfdb.rdheader, base)
    lead = _resolve_lead(cfg.lead, list(header.sig_name or []), base)
    rec = _read(wfdb.rdrecord, base, channels=[lead])
    lead_name, fs = rec.sig_name[0], float(rec.fs)
    x = np.asarray(rec.p_signal[:, 0], dtype=np.float64) * _unit_scale(rec.units[0], base, lead_name)
    nan = np.isnan(x)
    if nan.all():
        logger.info("record %s lead %s: no finite samples, no windows", base.name, lead_name)
        return [], [], np.zeros((0, cfg.window_len), dtype=np.float32)
    if nan.any():  # bridge gaps so the resampling filter does not smear NaN into good windows
        x[nan] = np.interp(np.flatnonzero(nan), np.flatnonzero(~nan), x[~nan])
    y, ratio = _resample(x, fs, cfg.target_rate)

    w, s = cfg.window_len, cfg.stride_len
    starts = np.arange(0, y.size - w + 1, s, dtype=np.int64)
    src_lo = np.floor(starts / ratio).astype(np.int64)  # each window's span in source samples
    src_hi = np.minimum(np.ceil((starts + w) / ratio).astype(np.int64), x.size)
    nan_csum = np.concatenate(([0], np.cumsum(nan)))
    good = nan_csum[src_hi] == nan_csum[src_lo]
    if (~good).any():
        logger.info("record %s lead %s: skipped %d of %d windows containing NaN",
                    base.name, lead_name, int((~good).sum()), starts.size)
    starts, src_lo, src_hi = starts[good], src_lo[good], src_hi[good]
    signals = y[starts[:, None] + np.arange(w)].astype(np.float32)  # (n_windows, w), also when empty
    labels = _window_labels(base, src_lo, src_hi)
    ids = [f"{base.name}-{lead_name}-{int(st)}" for st in starts]
    logger.debug("record %s lead %s: %d windows of %d samples at %g Hz (source %g Hz)",
                 base.name, lead_name, len(ids), w, cfg.target_rate, fs)
    return ids, labels, signals


def ingest_records(paths: Iterable[str | Path], cfg: IngestConfig | None = None
                   ) -> tuple[list[str], list[str], F32]:
    """Windows of several records, concatenated in the order given.

    Returns
    -------
    ids, labels : list of str
    signals : ndarray of shape (n_windows_total, cfg.window_len), float32
    """
    cfg = cfg if cfg is not None else IngestConfig()
    if isinstance(paths, (str, Path)):
        paths = [paths]
    ids: list[str] = []
    labels: list[str] = []
    blocks = [np.zeros((0, cfg.window_len), dtype=np.float32)]
    for p in paths:
        i, lab, sig = windows_from_record(p, cfg)
        ids += i
        labels += lab
        blocks.append(sig)
    return ids, labels, np.concatenate(blocks)


def _record_base(record_path: str | Path) -> Path:
    """The record path without extension, after checking that its header exists."""
    base = Path(record_path)
    if base.suffix in _RECORD_SUFFIXES:
        base = base.with_suffix("")
    header = base.with_name(base.name + ".hea")
    if not header.is_file():
        raise InvalidInputError(f"WFDB record {str(record_path)!r}: header {str(header)!r} does not exist")
    return base


def _read(fn: Callable[..., T], base: Path, **kwargs: Any) -> T:
    """Call a wfdb reader, turning its assorted failures into one InvalidInputError naming the record."""
    try:
        return fn(str(base), **kwargs)
    except (OSError, ValueError, IndexError, KeyError, TypeError) as e:
        raise InvalidInputError(f"cannot read WFDB record {str(base)!r}: {e}") from e


def _resolve_lead(lead: str | int | None, names: list[str], base: Path) -> int:
    """0-based channel index of ``lead`` (name, index or None = first)."""
    available = ", ".join(repr(n) for n in names) or "none"
    if not names:
        raise InvalidInputError(f"WFDB record {str(base)!r} has no signals")
    if lead is None:
        return 0
    if isinstance(lead, str):
        if lead in names:
            return names.index(lead)
        raise InvalidInputError(f"record {base.name!r} has no lead {lead!r}; available leads: {available}")
    try:
        i = operator.index(lead)
    except TypeError as e:
        raise InvalidInputError(f"lead must be a name, an index or None, got {lead!r}") from e
    if not 0 <= i < len(names):
        raise InvalidInputError(
            f"record {base.name!r} has no lead index {i}; available leads (0-{len(names) - 1}): {available}")
    return i


def _unit_scale(units: str | None, base: Path, lead_name: str) -> float:
    scale = _TO_MV.get((units or "").strip().lower())
    if scale is None:
        logger.warning("record %s lead %s: units %r are not a voltage; values kept as stored",
                       base.name, lead_name, units)
        return 1.0
    return scale


def _resample(x: F64, fs: float, target: float) -> tuple[F64, float]:
    """Polyphase resampling by a rational approximation of target/fs; returns (y, exact up/down used)."""
    frac = Fraction(target / fs).limit_denominator(1000)
    if frac == 1:
        return x, 1.0
    ratio = frac.numerator / frac.denominator
    if abs(ratio * fs - target) > 1e-3 * target:
        raise InvalidInputError(f"cannot resample {fs} Hz to {target} Hz with a ratio of small integers")
    return resample_poly(x, frac.numerator, frac.denominator), ratio


def _window_labels(base: Path, src_lo: npt.NDArray[np.int64], src_hi: npt.NDArray[np.int64]) -> list[str]:
    """Label per window from beat annotations in [src_lo, src_hi) (source samples); "" without them."""
    if not base.with_name(f"{base.name}.{ANNOTATION_EXT}").is_file():
        return [""] * src_lo.size
    ann = _read(wfdb.rdann, base, extension=ANNOTATION_EXT)
    symbols = np.asarray(ann.symbol, dtype=object)
    samples = np.asarray(ann.sample, dtype=np.int64)
    is_beat = np.fromiter((s in BEAT_SYMBOLS for s in symbols), dtype=bool, count=symbols.size)
    symbols, samples = symbols[is_beat], samples[is_beat]
    order = np.argsort(samples, kind="stable")
    symbols, samples = symbols[order], samples[order]
    lo, hi = np.searchsorted(samples, src_lo), np.searchsorted(samples, src_hi)
    labels = []
    for a, b in zip(lo, hi):
        inside = symbols[a:b]
        if inside.size == 0:
            labels.append("")
        elif "V" in inside:
            labels.append("V")
        else:
            labels.append(Counter(inside.tolist()).most_common(1)[0][0])
    return labels
