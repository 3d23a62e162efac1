"""WFDB ingestion on two real PhysioNet records and on small records written by the test."""

from __future__ import annotations

import logging
import math
from collections import Counter

import numpy as np
import pytest
import wfdb

from batch_index.corpus.wfdb import IngestConfig, ingest_records, windows_from_record
from batch_index.errors import InvalidInputError

REC100_SAMPLES, REC100_FS = 650_000, 360  # 30 min 3 s, MIT-BIH
A103L_SAMPLES = 82_500  # 5.5 min at 250 Hz


def n_windows(n_samples: int, window: int, stride: int) -> int:
    return (n_samples - window) // stride + 1 if n_samples >= window else 0


@pytest.fixture(scope="module")
def rec100(wfdb_dir):
    return windows_from_record(wfdb_dir / "100")


def test_record_100_defaults(rec100):
    ids, _, x = rec100
    resampled = math.ceil(REC100_SAMPLES * 250 / REC100_FS)  # resample_poly by 25/36
    assert len(ids) == n_windows(resampled, 2500, 2500) == 180
    assert x.shape == (180, 2500) and x.dtype == np.float32
    assert ids[:2] == ["100-MLII-0", "100-MLII-2500"] and ids[-1] == "100-MLII-447500"
    assert len(set(ids)) == len(ids)
    assert np.isfinite(x).all()
    assert 0.5 < float(np.median(np.ptp(x, axis=1))) < 5.0  # millivolts


def test_record_100_labels_come_from_beat_annotations(rec100, wfdb_dir):
    labels = rec100[1]
    assert all(labels)
    counts = Counter(labels)
    assert counts["N"] / len(labels) > 0.9
    ann = wfdb.rdann(str(wfdb_dir / "100"), "atr")
    v_seconds = [s / REC100_FS for s, sym in zip(ann.sample, ann.symbol) if sym == "V"]
    expected_v = {int(t // 10) for t in v_seconds}  # window index holding each PVC
    assert {i for i, lab in enumerate(labels) if lab == "V"} == expected_v


def test_window_start_is_in_target_samples(rec100, wfdb_dir):
    """Window 3 starts at 30 s: it must match the original 360 Hz signal at the same times."""
    ids, _, x = rec100
    assert ids[3] == "100-MLII-7500"
    src = wfdb.rdrecord(str(wfdb_dir / "100"), channels=[0], sampfrom=10_000, sampto=15_000).p_signal[:, 0]
    t = 30.0 + np.arange(2500) / 250.0
    expected = np.interp(t, (10_000 + np.arange(src.size)) / REC100_FS, src)
    assert np.corrcoef(x[3], expected)[0, 1] > 0.99


def test_lead_by_name_and_index(rec100, wfdb_dir):
    ids, _, v5 = windows_from_record(wfdb_dir / "100", IngestConfig(lead="V5"))
    assert ids[1] == "100-V5-2500" and v5.shape == (180, 2500)
    assert not np.allclose(v5, rec100[2])
    np.testing.assert_array_equal(windows_from_record(wfdb_dir / "100.hea", IngestConfig(lead=1))[2], v5)


@pytest.mark.parametrize("lead", ["V1", 2, -1])
def test_unknown_lead_lists_available_leads(wfdb_dir, lead):
    with pytest.raises(InvalidInputError, match=r"available leads.*'MLII', 'V5'"):
        windows_from_record(wfdb_dir / "100", IngestConfig(lead=lead))


def test_missing_record_names_the_path(tmp_path):
    with pytest.raises(InvalidInputError, match="no_such_record"):
        windows_from_record(tmp_path / "no_such_record")


def test_a103l_without_annotations(wfdb_dir):
    ids, labels, x = windows_from_record(wfdb_dir / "a103l")
    # this record has no NaN gaps (checked), so no window is skipped
    assert len(ids) == n_windows(A103L_SAMPLES, 2500, 2500) == 33
    assert ids[0] == "a103l-II-0" and labels == [""] * 33
    assert np.isfinite(x).all()


def test_overlapping_windows(wfdb_dir):
    cfg = IngestConfig(window_s=10.0, stride_s=2.5)
    ids, _, x = windows_from_record(wfdb_dir / "a103l", cfg)
    assert len(ids) == n_windows(A103L_SAMPLES, 2500, 625) == 129
    assert ids[1] == "a103l-II-625"
    np.testing.assert_array_equal(x[0][625:], x[1][:-625])


def test_other_target_rate(wfdb_dir):
    ids, _, x = windows_from_record(wfdb_dir / "100", IngestConfig(window_s=5.0, stride_s=5.0, target_rate=128.0))
    assert x.shape == (n_windows(math.ceil(REC100_SAMPLES * 128 / 360), 640, 640), 640)
    assert ids[1] == "100-MLII-640"


def test_non_voltage_lead_is_kept_with_a_warning(wfdb_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="batch_index.corpus.wfdb"):
        _, _, x = windows_from_record(wfdb_dir / "a103l", IngestConfig(lead="PLETH"))
    assert x.shape == (33, 2500)
    assert "NU" in caplog.text


def _write_record(tmp_path, name: str, seconds: float, nan_span_s: tuple[float, float] | None,
                  units: str = "mV") -> str:
    fs = 250
    t = np.arange(int(seconds * fs)) / fs
    sig = np.stack([np.sin(2 * np.pi * 1.2 * t), np.cos(2 * np.pi * 1.2 * t)], axis=1)
    if nan_span_s is not None:
        sig[int(nan_span_s[0] * fs):int(nan_span_s[1] * fs), 0] = np.nan
    wfdb.wrsamp(name, fs=fs, units=[units, units], sig_name=["I", "II"], p_signal=sig, fmt=["16", "16"],
                write_dir=str(tmp_path))
    return str(tmp_path / name)


def test_nan_windows_are_skipped_and_logged(tmp_path, caplog):
    path = _write_record(tmp_path, "gap", 60.0, (12.0, 14.0))
    with caplog.at_level(logging.INFO, logger="batch_index.corpus.wfdb"):
        ids, _, x = windows_from_record(path)
    assert ids == ["gap-I-0", "gap-I-5000", "gap-I-7500", "gap-I-10000", "gap-I-12500"]
    assert np.isfinite(x).all()
    assert "skipped 1 of 6" in caplog.text
    # the gap is in lead I only; neighbouring windows are not smeared by the resampler either
    assert len(windows_from_record(path, IngestConfig(lead="II"))[0]) == 6
    ids360, _, x360 = windows_from_record(path, IngestConfig(target_rate=360.0))
    assert [i.rsplit("-", 1)[1] for i in ids360] == ["0", "7200", "10800", "14400", "18000"]
    assert np.isfinite(x360).all()


def test_microvolts_become_millivolts(tmp_path):
    mv = windows_from_record(_write_record(tmp_path, "mv", 10.0, None))[2]
    uv = windows_from_record(_write_record(tmp_path, "uv", 10.0, None, units="uV"))[2]
    np.testing.assert_allclose(uv * 1000.0, mv, atol=1e-3)


def test_record_shorter_than_a_window(tmp_path):
    ids, labels, x = windows_from_record(_write_record(tmp_path, "short", 4.0, None))
    assert ids == [] and labels == [] and x.shape == (0, 2500)


def test_ingest_records_concatenates(wfdb_dir, rec100):
    ids, labels, x = ingest_records([wfdb_dir / "100", str(wfdb_dir / "a103l")])
    assert len(ids) == len(labels) == x.shape[0] == 180 + 33
    assert ids[:180] == rec100[0] and ids[180] == "a103l-II-0"
    np.testing.assert_array_equal(x[:180], rec100[2])
    empty = ingest_records([], IngestConfig(window_s=2.0))
    assert empty[0] == [] and empty[2].shape == (0, 500)


@pytest.mark.parametrize("kwargs", [{"window_s": 0.0}, {"stride_s": -1.0}, {"target_rate": float("inf")},
                                    {"window_s": 0.001}])
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(InvalidInputError):
        IngestConfig(**kwargs)
