"""Tests for fedslm.data: file reading/validation, splitting, synthetic data, site files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedslm.config import DataConfig, SplitConfig, SyntheticConfig
from fedslm.data import (
    INTENTS,
    Examples,
    Instructions,
    SiteFiles,
    corpus_for_tokenizer,
    file_sha256,
    generate_bank_messages,
    infer_labels,
    materialize_sites,
    read_examples,
    read_instructions,
    read_rows,
    split_by_column,
    split_dirichlet,
    split_iid,
    train_eval_split,
    write_rows,
)
from fedslm.errors import DataError

COLS = ["text", "label"]


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def _error(path: Path, columns: list[str] = COLS) -> str:
    with pytest.raises(DataError) as info:
        read_rows(path, columns)
    message = str(info.value)
    assert str(path) in message
    return message


# --------------------------------------------------------------------------------------------
# read_rows: errors


def test_missing_file(tmp_path: Path) -> None:
    message = _error(tmp_path / "nope.csv")
    assert "not found" in message


def test_unsupported_extension_lists_supported(tmp_path: Path) -> None:
    message = _error(_write(tmp_path / "data.xlsx", "x"))
    assert "'.xlsx'" in message
    for ext in (".csv", ".jsonl", ".parquet"):
        assert ext in message


@pytest.mark.parametrize("name", ["bad.csv", "bad.jsonl"])
def test_not_utf8_gives_offset_and_line(tmp_path: Path, name: str) -> None:
    head = "text,label\n" if name.endswith(".csv") else '{"text": "a", "label": "x"}\n'
    path = _write(tmp_path / name, head.encode() + b"caf\xe9 au lait,x\n")
    message = _error(path)
    assert "UTF-8" in message
    assert f"offset {len(head) + 3}" in message
    assert "line 2" in message


def test_utf16_hint(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label\nhi,x\n".encode("utf-16"))
    assert "UTF-16" in _error(path)


@pytest.mark.parametrize("name", ["e.csv", "e.jsonl", "e.json"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    assert "empty" in _error(_write(tmp_path / name, "\n  \n"))


def test_csv_header_only(tmp_path: Path) -> None:
    assert "no data rows" in _error(_write(tmp_path / "h.csv", "text,label\n\n"))


def test_parquet_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    empty = pa.array([], pa.string())
    pq.write_table(pa.table({"text": empty, "label": empty}), path)
    assert "no data rows" in _error(path)


@pytest.mark.parametrize("name", ["m.csv", "m.jsonl", "m.parquet"])
def test_missing_column_lists_existing(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    write_rows([{"text": "hello", "intent": "x"}], path)
    message = _error(path)
    assert "missing column 'label'" in message
    assert "'text'" in message and "'intent'" in message


def test_csv_empty_value_names_row_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "v.csv", 'text,label\na,x\n\n"multi\nline",y\nc,\n')
    message = _error(path)
    # data row 3 starts on line 6: header, a row, blank line, a two-line quoted row
    assert "row 3 (line 6)" in message
    assert "'label'" in message and "empty" in message


def test_csv_short_row_is_missing_value(tmp_path: Path) -> None:
    message = _error(_write(tmp_path / "s.csv", "text,label\na,x\nb\n"))
    assert "row 2 (line 3)" in message and "'label'" in message


def test_csv_too_many_fields(tmp_path: Path) -> None:
    message = _error(_write(tmp_path / "t.csv", "text,label\nhello, world,x\n"))
    assert "row 1 (line 2)" in message and "quotes" in message


def test_csv_bom_and_quoted_commas(tmp_path: Path) -> None:
    path = _write(tmp_path / "b.csv", b'\xef\xbb\xbftext,label\n"hi, there",greet\n')
    assert read_rows(path, COLS) == [{"text": "hi, there", "label": "greet"}]


@pytest.mark.parametrize("value", ["null", '""', '"   "'])
def test_jsonl_null_or_blank_value(tmp_path: Path, value: str) -> None:
    body = '{"text": "a", "label": "x"}\n{"text": "b", "label": ' + value + "}\n"
    path = _write(tmp_path / "n.jsonl", body)
    message = _error(path)
    assert "row 2 (line 2)" in message and "'label'" in message


def test_jsonl_key_absent_in_one_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "k.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b"}\n')
    assert "row 2 (line 3)" in _error(path)


def test_jsonl_invalid_json_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "j.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    message = _error(path)
    assert "line 2" in message and "invalid JSON" in message


def test_jsonl_not_an_object(tmp_path: Path) -> None:
    path = _write(tmp_path / "o.jsonl", '{"text": "a", "label": "x"}\n"just a string"\n')
    assert "line 2" in _error(path)


def test_json_array_gets_a_hint(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.json", '[{"text": "a", "label": "x"}]')
    assert "JSON Lines" in _error(path)


@pytest.mark.parametrize("value", ['{"a": 1}', "[1, 2]"])
def test_jsonl_nested_value(tmp_path: Path, value: str) -> None:
    body = '{"text": "a", "label": "x"}\n{"text": ' + value + ', "label": "y"}\n'
    path = _write(tmp_path / "x.jsonl", body)
    message = _error(path)
    assert "row 2 (line 2)" in message and "'text'" in message and "not text" in message


def test_jsonl_scalars_become_strings(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.jsonl", '{"text": 12, "label": true}\n{"text": 1.5, "label": "x"}')
    assert read_rows(path, COLS) == [
        {"text": "12", "label": "true"},
        {"text": "1.5", "label": "x"},
    ]


def test_parquet_null_value_names_row(tmp_path: Path) -> None:
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": ["a", None], "label": ["x", "y"]}), path)
    message = _error(path)
    assert "row 2" in message and "'text'" in message


def test_parquet_nested_value_names_row(tmp_path: Path) -> None:
    path = tmp_path / "l.parquet"
    pq.write_table(pa.table({"text": [["a"], ["b"]], "label": ["x", "y"]}), path)
    assert "row 1" in _error(path)


def test_parquet_corrupt(tmp_path: Path) -> None:
    assert "Parquet" in _error(_write(tmp_path / "c.parquet", "not parquet at all"))


def test_folder_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "d.csv").mkdir()
    assert "folder" in _error(tmp_path / "d.csv")


# --------------------------------------------------------------------------------------------
# read_rows / write_rows round trip, typed readers, sha256


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".json", ".parquet"])
def test_round_trip(tmp_path: Path, ext: str) -> None:
    rows = [
        {"text": 'He said "hi", then left\nnew line', "label": "a", "extra": "1"},
        {"text": "café ünïcode \u2028 separator", "label": "b", "extra": "2"},
    ]
    path = tmp_path / "deep" / "folder" / f"rows{ext}"
    write_rows(rows, path)
    assert read_rows(path, ["text", "label", "extra"]) == rows
    assert read_rows(path, ["label"]) == [{"label": "a"}, {"label": "b"}]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left


def test_write_rows_replaces_existing(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    write_rows([{"text": "old", "label": "x"}], path)
    write_rows([{"text": "new", "label": "y"}], path)
    assert read_rows(path, COLS) == [{"text": "new", "label": "y"}]


def test_read_examples_and_labels(tmp_path: Path) -> None:
    path = _write(tmp_path / "e.csv", "text,label\nhello,greet \nbye,leave\n")
    examples = read_examples(path, "text", "label")
    assert isinstance(examples, Examples) and len(examples) == 2
    assert examples.labels == ["greet", "leave"]  # surrounding spaces dropped
    assert read_examples(path, "text", "label", labels=["greet", "leave"]).texts == ["hello", "bye"]
    with pytest.raises(DataError) as info:
        read_examples(path, "text", "label", labels=["greet"])
    message = str(info.value)
    assert str(path) in message and "row 2 (line 3)" in message
    assert "'leave'" in message and "['greet']" in message


def test_read_instructions_keeps_spaces(tmp_path: Path) -> None:
    path = tmp_path / "i.jsonl"
    write_rows([{"prompt": "Q: 1+1?\nA:", "response": " 2"}], path)
    ins = read_instructions(path, "prompt", "response")
    assert isinstance(ins, Instructions) and len(ins) == 1
    assert ins.prompts == ["Q: 1+1?\nA:"] and ins.responses == [" 2"]


def test_file_sha256(tmp_path: Path) -> None:
    import hashlib

    path = _write(tmp_path / "f.csv", b"x" * 3_000_000)
    assert file_sha256(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    with pytest.raises(DataError, match="not found"):
        file_sha256(tmp_path / "missing.csv")


# --------------------------------------------------------------------------------------------
# Splitting


def _covers(parts: list[list[int]], n: int) -> None:
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n))
    assert all(part == sorted(part) for part in parts)


def test_split_iid() -> None:
    parts = split_iid(103, 4, seed=7)
    _covers(parts, 103)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert parts == split_iid(103, 4, seed=7)
    assert parts != split_iid(103, 4, seed=8)
    assert parts[0] != list(range(len(parts[0])))  # shuffled, not contiguous
    with pytest.raises(DataError):
        split_iid(2, 3, seed=0)
    _covers(split_iid(10, 2, seed=-5), 10)  # negative seeds are fine


def _label_mix(labels: list[str], part: list[int], names: list[str]) -> np.ndarray:
    counts = Counter(labels[i] for i in part)
    vec = np.array([counts[n] for n in names], dtype=float)
    return vec / vec.sum()


def test_split_dirichlet_skew_and_determinism() -> None:
    names = [f"l{i}" for i in range(5)]
    labels = [names[i % 5] for i in range(1000)]
    skewed = split_dirichlet(labels, 4, alpha=0.1, seed=3)
    _covers(skewed, 1000)
    assert skewed == split_dirichlet(labels, 4, alpha=0.1, seed=3)
    mixes = [_label_mix(labels, p, names) for p in skewed]
    # total variation distance between sites' label mixes: large under skew
    tv = max(0.5 * np.abs(a - b).sum() for a in mixes for b in mixes)
    assert tv > 0.5
    flat = [_label_mix(labels, p, names) for p in split_dirichlet(labels, 4, alpha=1000.0, seed=3)]
    assert max(0.5 * np.abs(a - b).sum() for a in flat for b in flat) < 0.15


def test_split_dirichlet_min_size() -> None:
    labels = ["a"] * 40 + ["b"] * 40 + ["c"] * 40
    for seed in range(10):
        parts = split_dirichlet(labels, 5, alpha=0.1, seed=seed, min_size=4)
        _covers(parts, 120)
        assert min(len(p) for p in parts) >= 4
    with pytest.raises(DataError, match=r"larger data\.split\.alpha"):
        split_dirichlet(["a"] * 5, 3, alpha=0.5, seed=0)
    # one label, tiny alpha, many sites: almost never balanced enough
    with pytest.raises(DataError, match="fewer sites"):
        split_dirichlet(["a"] * 40, 8, alpha=0.001, seed=0, min_size=4)


def test_split_by_column() -> None:
    values = ["b", "a", "c", "a", "b"]
    assert split_by_column(values, ["a", "b"]) == [[1, 3], [0, 4]]
    with pytest.raises(DataError) as info:
        split_by_column(values, ["a", "z"])
    assert "'z'" in str(info.value) and "'c'" in str(info.value)


def test_train_eval_split_plain() -> None:
    train, held = train_eval_split(50, 0.2, seed=1)
    _covers([train, held], 50)
    assert len(held) == 10
    assert (train, held) == train_eval_split(50, 0.2, seed=1)
    assert train_eval_split(2, 0.01, seed=0)[1] and train_eval_split(2, 0.99, seed=0)[0]
    with pytest.raises(DataError, match="at least 2"):
        train_eval_split(1, 0.5, seed=0)


def test_train_eval_split_stratified() -> None:
    labels = ["a"] * 50 + ["b"] * 20 + ["c"] * 2 + ["d"]
    train, held = train_eval_split(len(labels), 0.2, seed=4, labels=labels)
    _covers([train, held], len(labels))
    assert (train, held) == train_eval_split(len(labels), 0.2, seed=4, labels=labels)
    held_counts = Counter(labels[i] for i in held)
    assert held_counts["a"] == 10 and held_counts["b"] == 4
    train_labels = {labels[i] for i in train}
    assert train_labels == {"a", "b", "c", "d"}  # every label keeps a training row
    # all singletons: eval still gets one row
    train, held = train_eval_split(3, 0.2, seed=0, labels=["x", "y", "z"])
    assert len(held) == 1 and len(train) == 2


# --------------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_deterministic_and_shaped() -> None:
    rows = generate_bank_messages(["north", "south"], 50, seed=11, skew=0.5)
    assert rows == generate_bank_messages(["north", "south"], 50, seed=11, skew=0.5)
    assert rows != generate_bank_messages(["north", "south"], 50, seed=12, skew=0.5)
    assert len(rows) == 100
    for row in rows:
        assert set(row) == {"site", "text", "label", "prompt", "response"}
        assert row["label"] in INTENTS
        assert row["response"] == " " + row["label"]
        assert row["prompt"].endswith("\nIntent:") and row["text"] in row["prompt"]
        assert row["text"].strip()


def test_synthetic_site_skew_and_coverage() -> None:
    sites = ["a", "b", "c", "d"]
    rows = generate_bank_messages(sites, 300, seed=0, skew=0.3)
    assert {r["label"] for r in rows} == set(INTENTS)
    mixes = [
        _label_mix(
            [r["label"] for r in rows],
            [i for i, r in enumerate(rows) if r["site"] == s],
            list(INTENTS),
        )
        for s in sites
    ]
    assert min(0.5 * np.abs(a - b).sum() for i, a in enumerate(mixes) for b in mixes[i + 1 :]) > 0.2
    # phrasing differs too: each site names cities the others do not
    words = [{w for r in rows if r["site"] == s for w in r["text"].split()} for s in sites]
    assert words[0] - words[1] and words[1] - words[0]


@pytest.mark.integration
def test_synthetic_same_across_processes() -> None:
    import subprocess
    import sys

    code = (
        "import json; from fedslm.data import generate_bank_messages as g; "
        "print(json.dumps(g(['x', 'y'], 5, 3)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == generate_bank_messages(["x", "y"], 5, 3)


def test_corpus_for_tokenizer() -> None:
    corpus = corpus_for_tokenizer(seed=0, n=500)
    assert len(corpus) == 500 and corpus == corpus_for_tokenizer(seed=0, n=500)
    joined = " ".join(corpus)
    assert all(intent in joined for intent in INTENTS)
    assert "Classify the customer message" in joined


# --------------------------------------------------------------------------------------------
# materialize_sites


def _site_rows(files: list[SiteFiles], column: str) -> list[list[dict[str, str]]]:
    return [read_rows(f.train, [column]) + read_rows(f.eval, [column]) for f in files]


def test_materialize_synthetic(tmp_path: Path) -> None:
    data = DataConfig(synthetic=SyntheticConfig(rows_per_site=40, skew=0.5))
    files = materialize_sites(data, ["s1", "s2"], "classification", seed=0, out_dir=tmp_path)
    assert [f.name for f in files] == ["s1", "s2"]
    for f in files:
        assert f.train == tmp_path / f.name / "data" / "train.jsonl"
        assert f.eval == tmp_path / f.name / "data" / "eval.jsonl"
        train, held = read_rows(f.train, COLS), read_rows(f.eval, COLS)
        assert len(train) + len(held) == 40 and len(held) >= 6
        assert set(json.loads(f.train.read_text().splitlines()[0])) == {"text", "label"}
    assert set(infer_labels(files, "label")) <= set(INTENTS)
    again = materialize_sites(data, ["s1", "s2"], "classification", 0, tmp_path / "again")
    assert _site_rows(again, "text") == _site_rows(files, "text")

    lm = materialize_sites(data, ["s1", "s2"], "causal-lm", seed=0, out_dir=tmp_path / "lm")
    row = read_rows(lm[0].train, ["prompt", "response"])[0]
    assert set(json.loads(lm[0].train.read_text().splitlines()[0])) == {"prompt", "response"}
    assert row["response"].startswith(" ")


def _labelled_file(path: Path, n: int = 60) -> Path:
    rows = [
        {
            "text": f"message number {i}",
            "label": ["a", "b", "c"][i % 3],
            "region": ["east", "west"][i % 2],
        }
        for i in range(n)
    ]
    write_rows(rows, path)
    return path


@pytest.mark.parametrize("method", ["iid", "dirichlet", "column"])
def test_materialize_one_file(tmp_path: Path, method: str) -> None:
    path = _labelled_file(tmp_path / "all.csv")
    data = DataConfig(path=str(path), split=SplitConfig(method=method, alpha=1.0, column="region"))
    names = ["east", "west"]
    files = materialize_sites(data, names, "classification", seed=2, out_dir=tmp_path / "out")
    texts = [r["text"] for rows in _site_rows(files, "text") for r in rows]
    assert sorted(texts) == sorted(f"message number {i}" for i in range(60))
    assert infer_labels(files, "label") == ["a", "b", "c"]
    if method == "column":
        east = {r["text"] for r in _site_rows(files, "text")[0]}
        assert east == {f"message number {i}" for i in range(0, 60, 2)}


def test_materialize_one_file_errors(tmp_path: Path) -> None:
    path = _labelled_file(tmp_path / "all.jsonl")
    out = tmp_path / "out"
    bad_column = DataConfig(path=str(path), split=SplitConfig(method="column", column="region"))
    with pytest.raises(DataError) as info:
        materialize_sites(bad_column, ["east", "north"], "classification", 0, out)
    assert str(path) in str(info.value) and "'north'" in str(info.value)

    with pytest.raises(DataError) as info:
        materialize_sites(
            DataConfig(path=str(path), labels=["a", "b"]), ["x", "y"], "classification", 0, out
        )
    assert str(path) in str(info.value) and "row 3 (line 3)" in str(info.value)

    instr = tmp_path / "instr.jsonl"
    write_rows([{"prompt": f"p{i}", "response": f" r{i}"} for i in range(10)], instr)
    with pytest.raises(DataError, match="iid"):
        materialize_sites(DataConfig(path=str(instr)), ["x", "y"], "causal-lm", 0, out)
    assert not out.exists()
    iid = DataConfig(path=str(instr), split=SplitConfig(method="iid"))
    files = materialize_sites(iid, ["x", "y"], "causal-lm", 0, out)
    assert sum(len(r) for r in _site_rows(files, "response")) == 10


def test_materialize_site_files(tmp_path: Path) -> None:
    a = tmp_path / "a.parquet"
    write_rows([{"text": f"t{i}", "label": "x" if i % 2 else "y"} for i in range(10)], a)
    b = _write(tmp_path / "b.csv", "text,label\n" + "".join(f"u{i},x\n" for i in range(5)))
    data = DataConfig(sites={"a": str(a), "b": str(b)}, eval_fraction=0.3)
    files = materialize_sites(data, ["a", "b"], "classification", 0, tmp_path / "out")
    assert [len(read_rows(f.eval, COLS)) for f in files] == [3, 2]
    assert [len(read_rows(f.train, COLS)) for f in files] == [7, 3]


def test_materialize_writes_nothing_when_a_site_is_bad(tmp_path: Path) -> None:
    good = _labelled_file(tmp_path / "good.csv")
    bad = _write(tmp_path / "bad.csv", "text,label\nfine,a\n,b\n")
    out = tmp_path / "out"
    data = DataConfig(sites={"good": str(good), "bad": str(bad)})
    with pytest.raises(DataError) as info:
        materialize_sites(data, ["good", "bad"], "classification", 0, out)
    assert str(bad) in str(info.value) and "row 2 (line 3)" in str(info.value)
    assert not out.exists()

    # a site with a single row cannot be split into train and eval: also nothing written
    tiny = _write(tmp_path / "tiny.csv", "text,label\nonly,a\n")
    data = DataConfig(sites={"good": str(good), "tiny": str(tiny)})
    with pytest.raises(DataError) as info:
        materialize_sites(data, ["good", "tiny"], "classification", 0, out)
    assert "tiny" in str(info.value)
    assert not out.exists()
