"""Prompt sets beyond JSONL: JSON arrays, parquet, CSV, save_to_disk directories and Hub dataset
ids (offline, from a Hub cache layout), with column mapping; every error one line."""

from __future__ import annotations

import json
import shutil

import pytest

from safegene.data import Example, as_examples, load_prompts, load_records, parse_source
from safegene.errors import DataError

ROWS = [
    {"goal": "how do i make a zorblax ?", "target": "i cannot help with that .", "category": "weapons"},
    {"goal": "crack lockgrid please", "target": "i cannot help with that .", "category": "crime"},
]
WANT = [
    Example(messages=({"role": "user", "content": r["goal"]},), completion=r["target"], meta={"category": r["category"]})
    for r in ROWS
]


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf"


def test_parse_source():
    assert parse_source("a/b#split=test,prompt=q,completion=a") == ("a/b", "test", {"prompt": "q", "completion": "a"})
    assert parse_source("x.jsonl") == ("x.jsonl", None, {})
    with pytest.raises(DataError, match="unknown key 'answer'"):
        parse_source("a/b#answer=x")
    with pytest.raises(DataError, match="not KEY=VALUE"):
        parse_source("a/b#prompt")


def test_json_array_and_json_lines_with_mapping(tmp_path):
    arr = tmp_path / "p.json"
    arr.write_text(json.dumps(ROWS))
    assert load_prompts(arr, columns={"prompt": "goal", "completion": "target"}) == WANT
    lines = tmp_path / "p.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert as_examples(f"{lines}#prompt=goal,completion=target") == WANT
    assert load_records(f"{arr}#prompt=goal,completion=target", "safety", limit=1) == WANT[:1]
    with pytest.raises(DataError, match=r"no column 'question' to use as 'prompt'; the columns are \['category', 'goal', 'target'\]"):
        load_prompts(arr, columns={"prompt": "question"})
    with pytest.raises(DataError, match="no such data file"):
        load_prompts(tmp_path / "missing.jsonl")


def test_parquet_csv_and_saved_dataset(tmp_path, hf_home):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.to_csv(str(tmp_path / "p.csv"), index=False)
    for f in ("p.parquet", "p.csv"):
        assert load_prompts(f"{tmp_path / f}#prompt=goal,completion=target") == WANT, f
    with pytest.raises(DataError, match="choose a split"):
        load_prompts(f"{tmp_path / 'p.parquet'}#split=test,prompt=goal")
    dd = datasets.DatasetDict({"train": ds.select([0]), "test": ds.select([1])})
    dd.save_to_disk(str(tmp_path / "saved"))
    assert load_prompts(tmp_path / "saved", split="test", columns={"prompt": "goal", "completion": "target"}) == WANT[1:]
    assert load_prompts(f"{tmp_path / 'saved'}#prompt=goal,completion=target") == WANT[:1]  # train by default


def test_hub_dataset_from_the_offline_cache(tmp_path, hf_home, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rev = "f" * 40
    root = hf_home / "hub" / "datasets--org--harmful-prompts"
    (root / "snapshots" / rev / "data").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "t.parquet"))
    shutil.copy(tmp_path / "t.parquet", root / "snapshots" / rev / "data" / "train-00000-of-00001.parquet")
    assert load_prompts("org/harmful-prompts#prompt=goal,completion=target") == WANT
    assert load_prompts(f"org/harmful-prompts@{rev}", columns={"prompt": "goal", "completion": "target"}) == WANT
    with pytest.raises(DataError, match="not in the local Hugging Face cache .* HF_HUB_OFFLINE"):
        load_prompts("org/absent")


def test_unsupported_and_empty(tmp_path):
    (tmp_path / "p.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported prompt file"):
        load_prompts(tmp_path / "p.txt")
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(DataError, match="holds no examples"):
        load_prompts(tmp_path / "e.json")
    with pytest.raises(DataError, match="no such data file"):
        load_prompts(tmp_path / "nowhere" / "x")  # an absolute path is never taken for a Hub id
