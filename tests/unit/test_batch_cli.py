"""``python -m batch_index``: the contract commands, their file layouts and their error messages."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch_index.build.shards import BuildConfig
from batch_index.cli import build_config, build_parser, main
from batch_index.corpus.files import write_corpus
from batch_index.corpus.synthetic import SynthConfig, generate
from batch_index.engine.metrics import scores

SMALL_FLAGS = ["--n-references", "128", "--basis-rank", "64", "--leaf-size", "16", "--branching", "8",
               "--reference-sample", "400"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    assert main(["generate", "--output", str(d / "corpus.parquet"), "--n", "400", "--sampling-rate", "25",
                 "--seed", "2"]) == 0
    assert main(["generate", "--output", str(d / "queries.parquet"), "--n", "6", "--start", "9000",
                 "--sampling-rate", "25", "--seed", "2"]) == 0
    assert main(["build", "--input", str(d / "corpus.parquet"), "--output", str(d / "index"), "--engine", "local",
                 "--metrics", "cosine,euclidean", *SMALL_FLAGS]) == 0
    return {"dir": d, "corpus": d / "corpus.parquet", "queries": d / "queries.parquet", "index": d / "index"}


def test_search_writes_the_contract_layout(files, capsys) -> None:
    out = files["dir"] / "res.parquet"
    rc = main(["search", "--index", str(files["index"]), "--queries", str(files["queries"]), "--metric", "cosine",
               "--mode", "exact", "--k", "3", "--output", str(out)])
    assert rc == 0
    table = pq.read_table(out)
    assert table.schema.names == ["query_id", "rank", "id", "score"]
    assert table.schema.field("rank").type == pa.int32() and table.schema.field("score").type == pa.float64()
    assert table.num_rows == 18
    ids, _, x = generate(0, 400, SynthConfig(sampling_rate=25, seed=2))
    qids, _, q = generate(9000, 6, SynthConfig(sampling_rate=25, seed=2))
    first = table.filter(pa.compute.equal(table.column("query_id"), qids[0])).to_pylist()
    truth = scores(q[0], x, "cosine")
    assert [r["id"] for r in first] == [ids[i] for i in np.argsort(-truth, kind="stable")[:3]]
    assert [r["rank"] for r in first] == [1, 2, 3]


def test_search_reports_recall(files, capsys) -> None:
    rc = main(["search", "--index", str(files["index"]), "--queries", str(files["queries"]), "--metric", "euclidean",
               "--mode", "hkmeans", "--k", "5", "--output", str(files["dir"] / "r2.parquet"), "--recall"])
    assert rc == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("recall@5"))
    assert 0.0 <= float(line.split(":")[1]) <= 1.0


def test_inspect_verifies(files, capsys) -> None:
    assert main(["inspect", "--index", str(files["index"])]) == 0
    assert "checksums verified" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["search", "--index", "{dir}/missing", "--queries", "{queries}", "--metric", "cosine", "--output", "{dir}/o"],
         "does not exist"),
        (["search", "--index", "{index}", "--queries", "{queries}", "--metric", "dot", "--output", "{dir}/o"],
         "metric 'dot' is not in this index (built for cosine, euclidean)"),
        (["search", "--index", "{index}", "--queries", "{dir}/short.parquet", "--metric", "cosine", "--output",
          "{dir}/o"], "has 10 samples; expected 250"),
        (["build", "--input", "{dir}/nan.parquet", "--output", "{dir}/i2", "--engine", "local"],
         "signal in row 1 contains NaN or infinite values"),
        (["build", "--input", "{dir}/none.parquet", "--output", "{dir}/i3", "--engine", "local"], "does not exist"),
        (["build", "--input", "{dir}/empty.parquet", "--output", "{dir}/i4", "--engine", "local"], "holds no rows"),
        (["build", "--input", "{dir}/dup.parquet", "--output", "{dir}/i5", "--engine", "local"], "duplicate id 'a'"),
    ],
)
def test_bad_input_gets_one_clear_line(files, capsys, argv, message) -> None:
    d = files["dir"]
    write_corpus(d / "short.parquet", ["s"], np.zeros((1, 10)))
    write_corpus(d / "nan.parquet", ["a", "b"], np.array([[1.0, 2.0], [np.nan, 1.0]]))
    write_corpus(d / "dup.parquet", ["a", "a"], np.ones((2, 3)))
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "signal": pa.array([], pa.list_(pa.float32()))}),
                   d / "empty.parquet")
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_parser_rejects_bad_flags() -> None:
    parser = build_parser()
    for argv in (["search", "--index", "i", "--queries", "q", "--metric", "hamming", "--output", "o"],
                 ["search", "--index", "i", "--queries", "q", "--metric", "cosine", "--k", "0", "--output", "o"],
                 ["build", "--input", "i", "--output", "o", "--branching", "-3"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_build_flags_mirror_build_config() -> None:
    """Every BuildConfig field has a ``build`` flag with the same default, and the flag reaches the config."""
    base = ["build", "--input", "i", "--output", "o"]
    assert build_config(build_parser().parse_args(base)) == BuildConfig()
    for f in fields(BuildConfig):
        flag = "--" + f.name.replace("_", "-")
        value = "cosine,dot" if f.name == "metrics" else "lloyd" if f.name == "kmeans" else (
            "kmeans" if f.name == "reference_method" else "rows" if f.name == "partitioning" else "7")
        got = getattr(build_config(build_parser().parse_args([*base, flag, value])), f.name)
        assert got != getattr(BuildConfig(), f.name), f"{flag} {value} did not reach BuildConfig.{f.name}"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--l1-blocks", "-1"])


def test_module_entry_point_help(capsys: pytest.CaptureFixture[str]) -> None:
    res = subprocess.run([sys.executable, "-m", "batch_index", "build", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "usage: python -m batch_index build" in res.stdout
    assert "ECG_SPARK_MASTER" in res.stdout
    for sub in ("generate", "ingest", "build", "search", "inspect"):  # the same parser, in this process
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([sub, "--help"])
        assert done.value.code == 0 and "usage: python -m batch_index" in capsys.readouterr().out


def test_ingest_real_record(wfdb_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "real.parquet"
    assert main(["ingest", "--records", str(wfdb_dir / "100"), "--output", str(out), "--window", "10",
                 "--stride", "10"]) == 0
    table = pq.read_table(out)
    assert table.num_rows == 180 and len(table.column("signal")[0]) == 2500
