"""Few-shot example handling shared by ``select`` and ``calibrate``: records in, token ids out.

Records follow the TRL dataset conventions: ``{"prompt": str, "completion": str}``,
conversational ``{"prompt": [messages], "completion": [messages]}``, or
``{"messages": [...]}`` whose last assistant turn is the completion. Prompts are rendered
with the tokenizer's chat template (``add_generation_prompt=True``) exactly as generation
sees them, and the completion is tokenized *separately* from the prompt, because that is the
token sequence greedy generation produces after the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from .errors import DataError, UsageError


def load_records(src, what: str, limit: int | None = None) -> list:
    """Load examples (:class:`safegene.data.Example`) from a JSONL path or a list, in order.

    >>> load_records("harmful_calib.jsonl", "safety", limit=16)  # doctest: +SKIP
    """
    from .data import as_examples

    try:
        exs = as_examples(src)
    except DataError as exc:
        raise DataError(f"{what}: {exc}") from None
    return exs[:limit] if limit else exs


def split_record(rec) -> tuple[list[dict], str | None]:
    """Return ``(prompt messages, completion text or None)`` for an Example or TRL-style record."""
    from .data import Example, parse_record

    ex = rec if isinstance(rec, Example) else parse_record(rec)
    return [dict(m) for m in ex.messages], ex.completion


def render_prompt(tokenizer, messages: list[dict]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_completion(tokenizer, messages: list[dict], completion: str) -> list[int]:
    """Token ids of the completion as the model would emit them after the prompt (EOS included)."""
    prompt_str = render_prompt(tokenizer, messages)
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": completion}], tokenize=False
        )
        if full.startswith(prompt_str):
            ids = _ids(tokenizer, full[len(prompt_str):])
            if ids:
                return ids
    ids = _ids(tokenizer, completion)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids


@dataclass
class Batch:
    """Right-padded batch: ``labels`` is -100 outside the completion tokens."""

    input_ids: Any
    attention_mask: Any
    labels: Any
    last_prompt: Any  # index of the last prompt token per row (the first decision point)


def encode_prompts(tokenizer, records: Iterable[dict]) -> list[list[int]]:
    """Prompt token ids (chat template, generation prompt added) for each record."""
    out = []
    for rec in records:
        msgs, _ = split_record(rec)
        out.append(_ids(tokenizer, render_prompt(tokenizer, msgs)))
    return out


def encode_pairs(tokenizer, records: Sequence[dict], what: str, max_len: int = 256,
                 default_completion: str | None = None) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, completion ids)`` per record; records without a completion need a default."""
    pairs = []
    for i, rec in enumerate(records):
        msgs, comp = split_record(rec)
        if comp is None:
            if default_completion is None:
                raise DataError(
                    f"{what}: record {i} has no completion; add a 'completion' field "
                    "(TRL prompt-completion format) or pass a default response"
                )
            comp = default_completion
        p = _ids(tokenizer, render_prompt(tokenizer, msgs))
        c = render_completion(tokenizer, msgs, comp)
        if len(p) + len(c) > max_len:
            p = p[-max(1, max_len - len(c)):]
            c = c[: max_len - len(p)]
        pairs.append((p, c))
    return pairs


def collate(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, device="cpu") -> Batch:
    import torch

    if not pairs:
        raise UsageError("empty batch")
    n = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), n), dtype=torch.long)
    labels = torch.full((len(pairs), n), -100, dtype=torch.long)
    last = torch.zeros(len(pairs), dtype=torch.long)
    for i, (p, c) in enumerate(pairs):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        if c:
            labels[i, len(p): len(seq)] = torch.tensor(c)
        last[i] = len(p) - 1
    return Batch(ids.to(device), mask.to(device), labels.to(device), last.to(device))


def pad_id_of(tokenizer) -> int:
    for cand in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0


def load_model(path: Union[str, Path], device="cpu", dtype=None):
    """Load an HF causal LM + tokenizer in eval mode from a directory, a Hub id, or
    ``BASE+ADAPTER_DIR`` (the base with the PEFT LoRA adapter merged into it in place)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hub import resolve_target

    path, adapter = resolve_target(path)
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} is not a Hugging Face model directory (no config.json)")
    kw = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(path, **kw).to(device).eval()
    if adapter is not None:
        from .lora import merge_lora_into_model

        merge_lora_into_model(model, adapter)
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def decoder_layers(model):
    """The list of decoder blocks (``model.model.layers`` for Llama/Qwen/Mistral-style models)."""
    for attr in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise UsageError(f"cannot find the decoder blocks of {type(model).__name__}; expected model.model.layers")


def greedy(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int = 16,
           batch_size: int = 16) -> list[list[int]]:
    """Greedy continuations (token ids, up to and including EOS) of tokenized prompts.

    Left-padded batches through ``model.generate`` with sampling off, so the result is the
    model's deterministic answer.
    """
    import torch

    pad = pad_id_of(tokenizer)
    eos = tokenizer.eos_token_id
    dev = next(model.parameters()).device
    out: list[list[int]] = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s: s + batch_size]
        n = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), n), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, n - len(p):] = torch.tensor(p)
            mask[i, n - len(p):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                                 num_beams=1)
        for row in gen[:, n:].tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos) + 1]
            out.append(row)
    return out
