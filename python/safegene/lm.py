"""The one model stack: load a causal LM and its tokenizer, render prompts, encode, generate.

Everything that runs a model -- ``select``, ``calibrate``, ``eval``, the guard judge, the demo and
bench/ -- goes through this module, so calibration sees exactly the tokens that evaluation
feeds the model:

* :func:`load_model` reads safetensors only (a directory holding only pickled weights is
  refused with one error, never unpickled), from a directory, a Hub id, or ``BASE+ADAPTER_DIR``;
* :func:`render_prompt` / :func:`encode_prompt` turn messages into the prompt token ids (chat
  template with the generation prompt when the tokenizer has one; otherwise the contents
  joined by a blank line, with the tokenizer's own special tokens);
* :func:`render_completion` tokenizes a completion *separately* from the prompt, because that
  is the token sequence greedy generation produces after the prompt;
* :func:`generate_ids` / :func:`generate` are the one greedy generator.

Records follow the TRL dataset conventions: ``{"prompt": str, "completion": str}``,
conversational ``{"prompt": [messages], "completion": [messages]}``, or
``{"messages": [...]}`` whose last assistant turn is the completion.

>>> model, tok = load_model("task-model/")  # doctest: +SKIP
>>> generate(model, tok, as_examples(["how do i bake bread ?"]), max_new_tokens=8)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence, Union

from .data import Example, split_record
from .errors import CheckpointError, DataError, PickleRefusedError, UsageError
from .io.checkpoint import PICKLE_SUFFIXES
from .io.hub import resolve_target
from .io.peft import merge_lora_into_model

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Joins message contents for tokenizers without a chat template.
PLAIN_JOIN = "\n\n"


def default_device() -> str:
    """``"cuda"`` when a CUDA device answers, else ``"cpu"``: the one device default."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_device(model: Any) -> "torch.device":
    """The device the model's inputs go to (its input embedding's device)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def check_safetensors_dir(path: Path) -> None:
    """Refuse a model directory with no safetensors weights (naming pickled files when present)."""
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a Hugging Face model directory (no config.json)")
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(x.name for x in path.iterdir() if x.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise PickleRefusedError(
            f"{path}: only pickled weights ({', '.join(pickled)}); safegene never unpickles -- "
            "convert them to safetensors first (load and `save_pretrained(..., safe_serialization=True)` in a trusted environment)"
        )
    raise CheckpointError(f"{path}: no *.safetensors weights")


def load_model(path: Union[str, Path], device: str | None = None, dtype: Any = None):
    """Load an HF causal LM + tokenizer in eval mode (safetensors only) from a directory, a Hub
    id, or ``BASE+ADAPTER_DIR`` (the base with the PEFT LoRA adapter merged into it in place).

    ``device`` defaults to :func:`default_device`; ``dtype`` to the checkpoint's own.

    >>> model, tok = load_model("org/aligned", device="cpu")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    p, adapter = resolve_target(path)
    check_safetensors_dir(p)
    kw = {"dtype": dtype} if dtype is not None else {}
    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' per-tensor loading bar; ours cover the work
    try:
        tok = AutoTokenizer.from_pretrained(p)
        model = AutoModelForCausalLM.from_pretrained(p, use_safetensors=True, **kw)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{p}: cannot load with transformers ({exc})") from None
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()
    if adapter is not None:
        merge_lora_into_model(model, adapter)
    model = model.to(device or default_device())  # type: ignore[arg-type]  # transformers' stub types .to() narrowly
    return model.eval(), tok


# ---- prompts and completions -----------------------------------------------------------------
def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, messages: Sequence[dict]) -> str:
    """The prompt text a model is fed for ``messages`` (generation prompt added)."""
    msgs = [dict(m) for m in messages]
    if _has_template(tokenizer):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return PLAIN_JOIN.join(m["content"] for m in msgs)


def _ids(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_prompt(tokenizer: Any, messages: Sequence[dict]) -> list[int]:
    """Prompt token ids: a chat template carries its own special tokens; plain text gets the
    tokenizer's (e.g. BOS)."""
    return _ids(tokenizer, render_prompt(tokenizer, messages), special=not _has_template(tokenizer))


def encode_prompts(tokenizer: Any, records: Iterable[Any]) -> list[list[int]]:
    """Prompt token ids for each record (an :class:`~safegene.data.Example` or a TRL record)."""
    return [encode_prompt(tokenizer, split_record(rec)[0]) for rec in records]


def render_completion(tokenizer: Any, messages: Sequence[dict], completion: str) -> list[int]:
    """Token ids of the completion as the model would emit them after the prompt (EOS included)."""
    if _has_template(tokenizer):
        prompt_str = render_prompt(tokenizer, messages)
        full = tokenizer.apply_chat_template(
            [dict(m) for m in messages] + [{"role": "assistant", "content": completion}], tokenize=False
        )
        if full.startswith(prompt_str):
            ids = _ids(tokenizer, full[len(prompt_str):])
            if ids:
                return ids
    ids = _ids(tokenizer, completion)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def encode_pairs(tokenizer: Any, records: Sequence[Any], what: str, max_len: int = 256,
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
        p = encode_prompt(tokenizer, msgs)
        c = render_completion(tokenizer, msgs, comp)
        if len(p) + len(c) > max_len:
            p = p[-max(1, max_len - len(c)):]
            c = c[: max_len - len(p)]
        pairs.append((p, c))
    return pairs


@dataclass
class Batch:
    """Right-padded batch: ``labels`` is -100 outside the completion tokens."""

    input_ids: Any
    attention_mask: Any
    labels: Any
    last_prompt: Any  # index of the last prompt token per row (the first decision point)


def collate(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, device: Any = "cpu") -> Batch:
    """A right-padded :class:`Batch` of ``(prompt ids, completion ids)`` pairs on ``device``."""
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


def pad_id_of(tokenizer: Any) -> int:
    """The pad id batches use: the tokenizer's pad, else its EOS, else 0."""
    for cand in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0


def decoder_layers(model: Any) -> list:
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


# ---- generation -------------------------------------------------------------------------------
def _eos_of(model: Any, tokenizer: Any) -> Any:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return tokenizer.eos_token_id if eos is None else eos


def generate_ids(model: Any, tokenizer: Any, prompts: Sequence[list[int]], max_new_tokens: int = 16,
                 batch_size: int = 16, progress: bool = False, desc: str = "generating") -> list[list[int]]:
    """Greedy continuations (token ids, up to and including the first EOS) of tokenized prompts.

    Prompts are sorted by length and left-padded into batches for ``model.generate`` with
    sampling off, so the result is the model's deterministic answer.
    """
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1 or max_new_tokens < 1:
        raise UsageError("batch_size and max_new_tokens must be at least 1")
    pad = pad_id_of(tokenizer)
    eos = _eos_of(model, tokenizer)
    stops = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    dev = model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), disable=not progress, desc=desc, unit="prompt") as bar:
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            n = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), n), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), n), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, n - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[r, n - len(prompts[i]):] = 1
            with torch.no_grad():
                gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False, num_beams=1,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
            for r, i in enumerate(idx):
                row = gen[r, n:].tolist()
                cut = next((k for k, t in enumerate(row) if t in stops), None)
                out[i] = row if cut is None else row[: cut + 1]
            bar.update(len(idx))
    return out


def generate(model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int = 32,
             max_new_tokens: int = 64, progress: bool = True, desc: str = "generating") -> list[str]:
    """Greedy responses as text (special tokens dropped), one per example.

    >>> generate(model, tok, load_jsonl("prompts.jsonl"), batch_size=16)  # doctest: +SKIP
    """
    ids = generate_ids(model, tokenizer, encode_prompts(tokenizer, examples), max_new_tokens=max_new_tokens,
                       batch_size=batch_size, progress=progress, desc=desc)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


__all__ = [
    "Batch", "collate", "decoder_layers", "default_device", "encode_pairs", "encode_prompt", "encode_prompts",
    "generate", "generate_ids", "load_model", "model_device", "pad_id_of", "render_completion", "render_prompt",
]
