"""Prompt files: JSONL in the TRL convention.

Every line is one JSON object in one of two shapes:

* ``{"prompt": "...", "completion": "..."}`` -- ``completion`` is the expected label (task
  files) or a reference answer (harmful / benign files); it may be omitted where no reference
  exists. ``prompt`` may also be a list of chat messages.
* ``{"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", ...}]}`` --
  a trailing assistant message is the completion, everything before it is the prompt.

Other keys (for example ``"category"``) are kept in :attr:`Example.meta`. Blank lines are
skipped. Every error names the file and the line.

Prompt sets may also be a JSON array of such records, parquet or CSV files, a directory saved
by ``datasets.Dataset.save_to_disk``, or a Hugging Face Hub dataset ``org/name[@revision]``
(through the ``datasets`` library and its cache; ``HF_HUB_OFFLINE`` honoured). Columns named
otherwise are mapped with ``columns={"prompt": "question", "completion": "answer"}``, or, where a
command takes a file name, with a suffix: ``org/name#split=test,prompt=question,completion=answer``.

>>> load_prompts("org/harmful-prompts#split=test,prompt=goal,completion=target")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import DataError

_ROLES = {"system", "user", "assistant"}
#: Suffixes read through the ``datasets`` library (its builder name for each).
_DATASETS_FORMATS = {".parquet": "parquet", ".csv": "csv"}
#: What a Hub dataset snapshot may bring: data files and the card (whose header may name splits).
DATASET_PATTERNS = ["*.parquet", "*.jsonl", "*.json", "*.csv", "README.md"]
#: The record fields a column can be mapped onto.
FIELDS = ("prompt", "completion", "messages")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One prompt with its optional reference completion.

    ``messages`` is the conversation to feed a chat template (never ends with an assistant
    turn); ``prompt`` is the text of its last user message, which is what judges see.
    """

    messages: tuple[Mapping[str, str], ...]
    completion: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        for m in reversed(self.messages):
            if m["role"] == "user":
                return m["content"]
        return self.messages[-1]["content"]

    @property
    def category(self) -> str | None:
        c = self.meta.get("category")
        return None if c is None else str(c)

    def to_record(self) -> dict[str, Any]:
        """The TRL-style record this example reads back from (``prompt``/``completion``)."""
        if len(self.messages) == 1 and self.messages[0]["role"] == "user":
            rec: dict[str, Any] = {"prompt": self.messages[0]["content"]}
        else:
            rec = {"prompt": [dict(m) for m in self.messages]}
        if self.completion is not None:
            rec["completion"] = self.completion
        rec.update(self.meta)
        return rec


def _check_messages(msgs: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in _ROLES:
            raise DataError(f"{where}: message {i} has role {m['role']!r}; use one of {sorted(_ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i} content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def parse_record(obj: Any, where: str = "<record>") -> Example:
    """Turn one decoded JSON object into an :class:`Example`.

    >>> parse_record({"prompt": "review : great . sentiment ?", "completion": "positive"}).completion
    'positive'
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        if "prompt" in obj:
            raise DataError(f"{where}: has both 'messages' and 'prompt'; use one convention per line")
        msgs = _check_messages(obj["messages"], where)
        completion = None
        if msgs[-1]["role"] == "assistant":
            completion = msgs[-1]["content"]
            msgs = msgs[:-1]
        if not any(m["role"] == "user" for m in msgs):
            raise DataError(f"{where}: 'messages' has no user turn to answer")
        meta = {k: v for k, v in obj.items() if k != "messages"}
    elif "prompt" in obj:
        p = obj["prompt"]
        if isinstance(p, str):
            if not p.strip():
                raise DataError(f"{where}: 'prompt' is empty")
            msgs = [{"role": "user", "content": p}]
        else:
            msgs = _check_messages(p, where)
            if msgs[-1]["role"] == "assistant":
                raise DataError(f"{where}: a 'prompt' message list must not end with an assistant turn")
        completion = obj.get("completion")
        if isinstance(completion, list):  # conversational TRL completion
            completion = _check_messages(completion, where)[-1]["content"]
        if completion is not None and not isinstance(completion, str):
            raise DataError(f"{where}: 'completion' must be a string, got {type(completion).__name__}")
        meta = {k: v for k, v in obj.items() if k not in ("prompt", "completion")}
    else:
        raise DataError(
            f"{where}: needs a 'prompt' (with optional 'completion') or a 'messages' key; found {sorted(obj)}"
        )
    return Example(messages=tuple(msgs), completion=completion, meta=meta)


def load_jsonl(path: str | Path) -> list[Example]:
    """Read a JSONL prompt file.

    >>> examples = load_jsonl("harmful_eval.jsonl")  # doctest: +SKIP
    >>> examples[0].prompt, examples[0].completion  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such data file")
    out: list[Example] = []
    with p.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            out.append(parse_record(obj, where))
    if not out:
        raise DataError(f"{p}: the file holds no examples")
    return out


def save_jsonl(path: str | Path, records: Iterable[Mapping[str, Any] | Example]) -> Path:
    """Write records (dicts or :class:`Example`) one JSON object per line; returns the path.

    >>> save_jsonl("out.jsonl", [{"prompt": "hi", "completion": "hello"}])  # doctest: +SKIP
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as fh:
        for r in records:
            rec = r.to_record() if isinstance(r, Example) else dict(r)
            fh.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
    return p


def parse_source(source: str | Path) -> tuple[str, str | None, dict[str, str]]:
    """``"SRC#split=S,prompt=COL,..."`` → ``(SRC, S, {"prompt": COL, ...})``; a plain source → ``(SRC, None, {})``.

    >>> parse_source("org/ds#split=test,prompt=question")
    ('org/ds', 'test', {'prompt': 'question'})
    """
    s = str(source)
    if "#" not in s or Path(s).exists():
        return s, None, {}
    src, _, spec = s.rpartition("#")
    split: str | None = None
    columns: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, val = part.partition("=")
        if not eq or not val:
            raise DataError(f"{s}: {part!r} is not KEY=VALUE; write SRC#split=S,prompt=COLUMN,completion=COLUMN")
        if key == "split":
            split = val
        elif key in FIELDS:
            columns[key] = val
        else:
            raise DataError(f"{s}: unknown key {key!r}; use split= or one of {', '.join(FIELDS)}=COLUMN")
    return src, split, columns


def _rename(row: Mapping[str, Any], columns: Mapping[str, str], where: str) -> dict[str, Any]:
    rec = dict(row)
    for target, col in columns.items():
        if col not in rec:
            raise DataError(f"{where}: no column {col!r} to use as {target!r}; the columns are {sorted(rec)}")
        rec[target] = rec.pop(col)
    return rec


def _hf_rows(src: str, split: str | None, revision: str | None) -> Iterable[Mapping[str, Any]]:
    """Rows of a parquet/CSV file, a ``save_to_disk`` directory or a Hub dataset, through ``datasets``."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{src}: reading parquet, CSV or Hub datasets needs the datasets library (pip install datasets)") from None
    p = Path(src)
    try:
        if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(p))
        elif p.is_file():
            ds = datasets.load_dataset(_DATASETS_FORMATS[p.suffix.lower()], data_files=str(p))
        else:
            from .io.hub import download_snapshot

            # our own resolution (HF_HUB_OFFLINE read now, the one Hub cache), then a local load
            snap = download_snapshot(src, revision, DATASET_PATTERNS, error=DataError, repo_type="dataset")
            ds = datasets.load_dataset(str(snap))
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        raise DataError(f"{src}: cannot load the dataset ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        pick = split or ("train" if "train" in ds else names[0] if len(names) == 1 else None)
        if pick not in ds:
            raise DataError(f"{src}: choose a split with #split=NAME; the dataset has {names}")
        ds = ds[pick]
    elif split is not None and p.is_file():
        raise DataError(f"{src}: a single file has no splits; drop #split={split}")
    log.info("read %d rows from %s", len(ds), src)
    return ds


def load_prompts(
    source: str | Path,
    *,
    columns: Mapping[str, str] | None = None,
    split: str | None = None,
    revision: str | None = None,
) -> list[Example]:
    """Read a prompt set: JSONL (TRL convention), a JSON array of records, parquet or CSV, a
    ``save_to_disk`` directory, or a Hub dataset ``org/name[@revision]``.

    ``columns`` maps record fields (``prompt``, ``completion``, ``messages``) to the source's own
    column names; ``source`` may carry them (and the split) as ``SRC#split=S,prompt=COL``.
    Columns not mapped are kept in :attr:`Example.meta`.

    >>> load_prompts("advbench.parquet", columns={"prompt": "goal", "completion": "target"})  # doctest: +SKIP
    """
    src, s_split, s_cols = parse_source(source)
    cols = {**s_cols, **dict(columns or {})}
    bad = [k for k in cols if k not in FIELDS]
    if bad:
        raise DataError(f"{src}: cannot map columns onto {bad}; the fields are {', '.join(FIELDS)}")
    split = split if split is not None else s_split
    p = Path(src)
    suffix = p.suffix.lower()
    if p.is_file() and suffix == ".jsonl" and not cols:
        return load_jsonl(p)
    rows: Iterable[Mapping[str, Any]]
    if p.is_file() and suffix in (".jsonl", ".json"):
        text = p.read_text(encoding="utf-8")
        try:
            doc = json.loads(text)
            rows = doc if isinstance(doc, list) else [doc]
        except json.JSONDecodeError:
            try:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}: neither a JSON array nor JSON Lines ({exc.msg} at line {exc.lineno})") from None
    elif (p.is_file() and suffix in _DATASETS_FORMATS) or p.is_dir():
        rows = _hf_rows(src, split, None)
    elif not p.exists() and suffix not in (".jsonl", ".json", *_DATASETS_FORMATS):
        from .io.hub import parse_hub_id

        # a missing file inside an existing local folder is a missing file, not a Hub id
        hub = parse_hub_id(src) if not p.parent.is_dir() or str(p.parent) in ("", ".") else None
        if hub is None:
            raise DataError(f"{src}: no such data file (and not a Hub dataset id org/name[@revision])")
        if revision is not None and hub[1] is not None and hub[1] != revision:
            raise DataError(f"{src}: the reference names revision {hub[1]!r} but revision={revision!r} was also given")
        rows = _hf_rows(hub[0], split, revision or hub[1])
    elif p.exists():
        raise DataError(f"{p}: unsupported prompt file; use .jsonl, .json, .parquet or .csv (or a Hub dataset id)")
    else:
        raise DataError(f"{p}: no such data file")
    out = [parse_record(_rename(row, cols, f"{src}[{i}]"), f"{src}[{i}]") for i, row in enumerate(rows)]
    if not out:
        raise DataError(f"{src}: the data holds no examples")
    return out


def as_examples(data: str | Path | Sequence[Example | Mapping[str, Any] | str]) -> list[Example]:
    """Accept a prompt source (:func:`load_prompts`: a JSONL/JSON/parquet/CSV path or a Hub dataset
    id, with an optional ``#split=…,prompt=COL`` suffix), a list of :class:`Example`, of TRL
    dicts, or of plain prompt strings."""
    if isinstance(data, (str, Path)):
        return load_prompts(data)
    out = []
    for i, d in enumerate(data):
        if isinstance(d, Example):
            out.append(d)
        elif isinstance(d, str):
            out.append(parse_record({"prompt": d}, f"<item {i}>"))
        else:
            out.append(parse_record(d, f"<item {i}>"))
    if not out:
        raise DataError("an empty list of examples was given")
    return out


def load_records(src, what: str, limit: int | None = None) -> list:
    """Load examples (:class:`safegene.data.Example`) from a prompt source (:func:`load_prompts`)
    or a list, in order.

    >>> load_records("harmful_calib.jsonl", "safety", limit=16)  # doctest: +SKIP
    """
    try:
        exs = as_examples(src)
    except DataError as exc:
        raise DataError(f"{what}: {exc}") from None
    return exs[:limit] if limit else exs


def split_record(rec) -> tuple[list[dict], str | None]:
    """Return ``(prompt messages, completion text or None)`` for an Example or TRL-style record."""
    ex = rec if isinstance(rec, Example) else parse_record(rec)
    return [dict(m) for m in ex.messages], ex.completion
