"""Prompt files: JSONL in the TRL convention.

Every line is one JSON object in one of two shapes:

* ``{"prompt": "...", "completion": "..."}`` -- ``completion`` is the expected label (task
  files) or a reference answer (harmful / benign files); it may be omitted where no reference
  exists. ``prompt`` may also be a list of chat messages.
* ``{"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", ...}]}`` --
  a trailing assistant message is the completion, everything before it is the prompt.

Other keys (for example ``"category"``) are kept in :attr:`Example.meta`. Blank lines are
skipped. Every error names the file and the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import DataError

_ROLES = {"system", "user", "assistant"}


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


def as_examples(data: str | Path | Sequence[Example | Mapping[str, Any] | str]) -> list[Example]:
    """Accept a path, a list of :class:`Example`, of TRL dicts, or of plain prompt strings."""
    if isinstance(data, (str, Path)):
        return load_jsonl(data)
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
    """Load examples (:class:`safegene.data.Example`) from a JSONL path or a list, in order.

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
