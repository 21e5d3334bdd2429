"""pipeline.text and pipeline.docstrings: deterministic documents from real files and sources."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DatasetConfig
from pipeline.generate.docstrings import MIN_CHARS, _units, iter_docstrings
from pipeline.generate.text import DatasetError, dataset_fingerprint, describe_dataset, iter_documents

REPO = Path(__file__).resolve().parents[2]
DOCS = [
    "The first document talks about sparse autoencoders.",
    "Second: activations are stored in chunks.",
    "Third one mentions the shuffle buffer.",
    "Fourth and last document.",
]

# Prints the first docstrings as (part, module, length, sha1): compared across processes.
FIRST_DOCSTRINGS = """
import hashlib, json, sys
from itertools import islice
from pipeline.generate.docstrings import iter_docstrings
rows = [[d.part, d.module, len(d.text), hashlib.sha1(d.text.encode()).hexdigest()]
        for d in islice(iter_docstrings(), int(sys.argv[1]))]
print(json.dumps(rows))
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path / "saeflow-cache"))


def write_jsonl(path: Path, texts: list, field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: text, "id": i}) + "\n" for i, text in enumerate(texts)))
    return path


def test_docstrings_are_deterministic_across_processes(tmp_path, monkeypatch):
    count = 150
    runs = []
    for name in ("a", "b"):  # separate caches: both processes parse the sources themselves
        env = {**os.environ, "SAEFLOW_CACHE": str(tmp_path / name)}
        runs.append(
            subprocess.Popen(
                [sys.executable, "-c", FIRST_DOCSTRINGS, str(count)],
                cwd=REPO, env=env, stdout=subprocess.PIPE, text=True,
            )
        )
    first, second = (json.loads(run.communicate(timeout=120)[0]) for run in runs)
    assert first == second and len(first) == count
    assert all(part == "stdlib" for part, *_ in first)
    assert first[0][1].split(".")[0] in sys.stdlib_module_names
    assert all(length >= MIN_CHARS for _, _, length, _ in first)
    assert len({digest for *_, digest in first}) == count  # each docstring once
    # Read back from process a's cache in this process: the same sequence.
    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path / "a"))
    cached = [[d.part, d.module, len(d.text), hashlib.sha1(d.text.encode()).hexdigest()] for d in islice(iter_docstrings(), count)]
    assert cached == first


def test_docstring_order_is_stdlib_then_site_packages():
    parts = [unit.part for unit in _units()]
    assert parts[0] == "stdlib" and "site-packages" in parts
    assert parts == sorted(parts, key=lambda part: part != "stdlib")  # no stdlib after site-packages
    stdlib_names = [unit.name for unit in _units() if unit.part == "stdlib"]
    assert stdlib_names == sorted(stdlib_names) and "json" in stdlib_names


def test_docstring_source_start_and_max_docs():
    cfg = DatasetConfig(source="python-docstrings")
    head = list(islice(iter_documents(cfg), 12))
    assert list(islice(iter_documents(cfg, start=5), 7)) == head[5:]
    assert list(iter_documents(DatasetConfig(max_docs=4), start=1)) == head[1:4]
    assert all(text == text.strip() and len(text) >= MIN_CHARS for text in head)
    assert describe_dataset(cfg)["fingerprint"] == dataset_fingerprint(cfg)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "text", "directory", "glob"])
def test_local_sources(tmp_path, kind):
    texts = [DOCS[0], "", DOCS[1], "   \n", DOCS[2], DOCS[3]]  # blank documents are skipped
    folder = tmp_path / "data"
    folder.mkdir()
    if kind == "jsonl":
        source = write_jsonl(folder / "docs.jsonl", texts)
    elif kind == "json":
        source = folder / "docs.json"
        source.write_text(json.dumps([{"text": text} for text in texts]))
    elif kind == "parquet":
        source = folder / "docs.parquet"
        pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), source)
    elif kind == "text":  # HF's text builder: one line = one document
        source = folder / "docs.txt"
        source.write_text("\n".join(texts[:3] + texts[4:]) + "\n")
    else:  # two files, read in sorted name order
        write_jsonl(folder / "part-0.jsonl", texts[:3])
        write_jsonl(folder / "part-1.jsonl", texts[3:])
        source = folder if kind == "directory" else folder / "part-*.jsonl"
    cfg = DatasetConfig(source=str(source))
    assert list(iter_documents(cfg)) == DOCS
    assert list(iter_documents(cfg, start=2)) == DOCS[2:]
    assert list(iter_documents(cfg, start=10)) == []  # resuming past the end is not an error
    assert list(iter_documents(DatasetConfig(source=str(source), max_docs=3), start=1)) == DOCS[1:3]
    assert list(iter_documents(DatasetConfig(source=str(source), streaming=True), start=1)) == DOCS[1:]
    info = describe_dataset(cfg)
    assert info["kind"] == "local" and info["n_docs"] == len(DOCS)
    json.dumps(info)  # manifest-ready


def test_missing_text_field_names_the_columns(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS, field="body")
    for streaming in (False, True):
        cfg = DatasetConfig(source=str(source), streaming=streaming)
        with pytest.raises(DatasetError, match=r"no field 'text' \(columns: body, id\)"):
            list(iter_documents(cfg))
    assert list(iter_documents(DatasetConfig(source=str(source), text_field="body"))) == DOCS


def test_non_text_field_is_refused(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    with pytest.raises(DatasetError, match="holds int values, not text"):
        list(iter_documents(DatasetConfig(source=str(source), text_field="id")))


def test_empty_dataset(tmp_path):
    source = write_jsonl(tmp_path / "empty.jsonl", ["", "  ", "\n"])
    with pytest.raises(DatasetError, match="has no text in field 'text'"):
        list(iter_documents(DatasetConfig(source=str(source))))


def test_bad_paths_and_offline_hub(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        list(iter_documents(DatasetConfig(source=str(tmp_path / "missing.jsonl"))))
    (tmp_path / "table.xlsx").write_text("x")
    with pytest.raises(DatasetError, match="unsupported file type"):
        list(iter_documents(DatasetConfig(source=str(tmp_path / "table.xlsx"))))
    with pytest.raises(DatasetError, match="no .json/.jsonl/.parquet/.arrow/.csv/.txt files match"):
        list(iter_documents(DatasetConfig(source=str(tmp_path / "*.parquet"))))
    with pytest.raises(DatasetError, match="dataset nonexistent-org/no-such-data is not available offline"):
        list(iter_documents(DatasetConfig(source="nonexistent-org/no-such-data")))


def test_fingerprint_follows_the_text(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    cfg = DatasetConfig(source=str(source))
    before = dataset_fingerprint(cfg)
    assert dataset_fingerprint(cfg) == before
    write_jsonl(source, DOCS[:-1] + ["Fourth and LAST document."])  # same size, new text
    after = dataset_fingerprint(cfg)
    assert after != before
    assert dataset_fingerprint(DatasetConfig(source=str(source), text_field="id")) != after
    assert describe_dataset(cfg)["fingerprint"] == after
