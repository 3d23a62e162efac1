"""The corpus: its Parquet file format and the sources that make one (synthetic ECG, WFDB records)."""
