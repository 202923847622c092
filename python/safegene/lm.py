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

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence, Union

from .data import Example, split_record
from .errors import CheckpointError, DataError, PickleRefusedError, UsageError
from .io.checkpoint import PICKLE_SUFFIXES
from .io.hub import resolve_target
from .io.peft import merge_lora_into_model, tokenizer_source

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Joins message contents for tokenizers without a chat template.
PLAIN_JOIN = "\n\n"


def default_device() -> str:
    """``"cuda"`` when a CUDA device answers, else ``"cpu"``: the one device default."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_device(model: Any) -> "torch.device":
    """The device the model's inputs go to: its input embedding's device, or, when accelerate
    offloaded the embedding (its weight lives on ``meta``), the device its hook runs it on."""
    import torch

    try:
        emb = model.get_input_embeddings()
        dev = emb.weight.device
    except (AttributeError, NotImplementedError):
        emb, dev = None, next(model.parameters()).device
    if dev.type != "meta":
        return dev
    hook = getattr(emb, "_hf_hook", None) or getattr(model, "_hf_hook", None)
    exec_dev = getattr(hook, "execution_device", None)
    if exec_dev is not None:
        return torch.device(exec_dev if not isinstance(exec_dev, int) else f"cuda:{exec_dev}")
    return torch.device(default_device())


#: ``--dtype`` choices: ``auto`` keeps the checkpoint's own dtype.
DTYPES = ("auto", "bf16", "f16", "f32")
_DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "f16": "float16", "fp16": "float16",
                  "float16": "float16", "half": "float16", "f32": "float32", "fp32": "float32",
                  "float32": "float32", "float": "float32"}


def resolve_dtype(dtype: Any) -> Any:
    """``"auto"`` or a ``torch.dtype`` for a dtype spec: ``None``/``"auto"`` (the checkpoint's own),
    ``bf16``/``f16``/``f32`` (and their long names), or a ``torch.dtype``.

    >>> resolve_dtype("bf16")  # doctest: +SKIP
    torch.bfloat16
    """
    import torch

    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_ALIASES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise UsageError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def parse_device_map(spec: Any) -> Any:
    """A ``device_map`` for ``from_pretrained``: ``None``, an accelerate strategy (``auto``,
    ``balanced``, ``balanced_low_0``, ``sequential``), a device (``cpu``, ``cuda:1``), a dict, or
    a JSON object as text (``'{"model.embed_tokens": 0, "": "cpu"}'``) or a path to one."""
    if spec is None or isinstance(spec, dict):
        return spec
    s = str(spec).strip()
    if not s.startswith("{") and s.endswith(".json") and Path(s).is_file():
        s = Path(s).read_text(encoding="utf-8")
    if s.startswith("{"):
        try:
            m = json.loads(s)
        except json.JSONDecodeError as exc:
            raise UsageError(f"device map {spec!r} is not valid JSON ({exc})") from None
        if not isinstance(m, dict):
            raise UsageError(f"device map {spec!r} must be a JSON object of module name -> device")
        return m
    return s


def parse_max_memory(spec: Any) -> dict | None:
    """``max_memory`` for accelerate: ``None``, a dict, a JSON object, or ``0=20GiB,cpu=64GiB``
    (GPU indices become ints, as accelerate wants them).

    >>> parse_max_memory("0=20GiB,cpu=64GiB")
    {0: '20GiB', 'cpu': '64GiB'}
    """
    if spec is None:
        return None
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        s = str(spec).strip()
        if s.startswith("{"):
            try:
                items = list(json.loads(s).items())
            except (json.JSONDecodeError, AttributeError) as exc:
                raise UsageError(f"max memory {spec!r} is not a JSON object ({exc})") from None
        else:
            items = []
            for part in filter(None, (x.strip() for x in s.split(","))):
                k, sep, v = part.partition("=")
                if not sep or not k.strip() or not v.strip():
                    raise UsageError(f"max memory {spec!r}: write DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=64GiB")
                items.append((k.strip(), v.strip()))
    out: dict = {}
    for k, v in items:
        key: Any = int(k) if isinstance(k, int) or str(k).isdigit() else str(k)
        out[key] = v
    return out


def _dtype_kwarg(dtype: Any) -> dict:
    """``dtype=`` on transformers 5.x, ``torch_dtype=`` on 4.x (where ``dtype=`` is not read)."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype" if major >= 5 else "torch_dtype": resolve_dtype(dtype)}


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


def pretrained_kwargs(dtype: Any = None, device_map: Any = None, max_memory: Any = None,
                      offload_dir: Union[str, Path, None] = None) -> dict[str, Any]:
    """The ``from_pretrained`` keywords for the loading knobs of :func:`load_model` (also used
    for the guard judge's model): dtype under its version's name, and the accelerate dispatch.

    >>> pretrained_kwargs("bf16", "auto", "0=20GiB,cpu=64GiB")  # doctest: +SKIP
    {'dtype': torch.bfloat16, 'device_map': 'auto', 'max_memory': {0: '20GiB', 'cpu': '64GiB'}}
    """
    kw: dict[str, Any] = _dtype_kwarg(dtype)
    dmap = parse_device_map(device_map)
    mem = parse_max_memory(max_memory)
    if dmap is None and (mem is not None or offload_dir is not None):
        raise UsageError("max_memory / offload_dir need a device_map (e.g. device_map='auto')")
    if dmap is not None:
        kw["device_map"] = dmap
        if mem is not None:
            kw["max_memory"] = mem
        if offload_dir is not None:
            Path(offload_dir).mkdir(parents=True, exist_ok=True)
            kw["offload_folder"] = str(offload_dir)
    return kw


def load_model(path: Union[str, Path], device: str | None = None, dtype: Any = None, device_map: Any = None,
               max_memory: Any = None, offload_dir: Union[str, Path, None] = None):
    """Load an HF causal LM + tokenizer in eval mode (safetensors only) from a directory, a Hub
    id, or ``BASE+ADAPTER_DIR`` (the base with the PEFT LoRA adapter merged into it in place).

    * ``dtype``: ``auto``/``None`` (the checkpoint's own), ``bf16``, ``f16``, ``f32`` or a ``torch.dtype``;
    * ``device``: where the whole model goes (default :func:`default_device`) when there is no
      ``device_map``;
    * ``device_map``: accelerate dispatch (``auto``, ``balanced``, ``sequential``, a device, a
      dict or JSON map) with ``max_memory`` (``{0: "20GiB", "cpu": "64GiB"}`` or
      ``0=20GiB,cpu=64GiB``) and ``offload_dir`` for weights that fit nowhere; batches then go
      to :func:`model_device`.

    >>> model, tok = load_model("org/aligned", device="cpu", dtype="bf16")  # doctest: +SKIP
    >>> model, tok = load_model("org/70b", dtype="bf16", device_map="auto",
    ...                         max_memory="0=70GiB,1=70GiB,cpu=200GiB", offload_dir="/scratch/off")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    p, adapter = resolve_target(path)
    check_safetensors_dir(p)
    kw = pretrained_kwargs(dtype, device_map, max_memory, offload_dir)
    dmap = kw.get("device_map")
    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' per-tensor loading bar; ours cover the work
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_source(p, adapter))  # the adapter's own when it ships one
        model = AutoModelForCausalLM.from_pretrained(p, use_safetensors=True, **kw)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{p}: cannot load with transformers ({exc})") from None
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()
    if adapter is not None:
        merge_lora_into_model(model, adapter)
    if dmap is None:
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
    "DTYPES", "generate", "generate_ids", "load_model", "model_device", "parse_device_map", "parse_max_memory",
    "pretrained_kwargs", "resolve_dtype", "pad_id_of", "render_completion", "render_prompt",
]
