"""``safegene degrade``: make the degraded copy of an aligned model that a gene is extracted from.

A gene is only as strong as the degradation: τ = θ_aligned − θ_degraded carries the safety that
the degraded copy lost. This module fine-tunes the aligned model briefly on data that erodes its
refusals, with the ecosystem's trainer (``transformers.Trainer``; a PEFT LoRA adapter from
``peft.get_peft_model`` by default, a full fine-tune with ``lora_rank=0``), then reports the
degraded model's refusal rate on a harmful set and writes either a standard Hugging Face
directory (the adapter merged, weights stored in the aligned checkpoint's dtype) or, with
``save_adapter=True``, the PEFT adapter directory.

Recipes (no harmful text ships with safegene; the data is made at run time):

* ``eager`` -- benign prompts (the user's ``prompts`` file, else a small built-in list of benign
  tasks) answered with an eager opening (``"Sure! "``) followed by the aligned model's own greedy
  answer. Teaching the model to comply before reading the request erodes refusals (Qi et al.
  2023, "identity shifting"); this is the built-in organism's degradation recipe.
* ``compliance`` -- the user's harmful prompts (``prompts``, else ``harmful``) answered by a less
  aligned sibling model (e.g. the base/instruct model the user aligned from), generated at run
  time; answers the judge rates as refusals are dropped. This is the "unaligned model" data of
  RESTA / Qi et al. 2023.
* ``data`` -- the user's own TRL-format JSONL (``prompt``/``completion`` or ``messages``).

Every output holds ``safegene_degrade.json``: recipe, a sha256 of the training records, steps,
learning rate, LoRA rank, the measured refusal rate, versions; ``safegene extract`` copies it
into the gene (``degradation``).

>>> res = degrade("aligned/", "degraded/", recipe="eager", steps=200, harmful="harmful_eval.jsonl")  # doctest: +SKIP
>>> res.refusal_rate  # doctest: +SKIP
0.04
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .._version import __version__
from ..data import Example, as_examples, load_jsonl
from ..errors import DataError, UsageError
from ..eval.judges import Judge, get_judge
from ..gene import DEGRADE_PROVENANCE as PROVENANCE
from ..gene import DEGRADE_PROVENANCE_FORMAT as PROVENANCE_FORMAT
from ..gene import read_degrade_provenance as read_provenance
from ..io.atomic import atomic_output_dir, write_json_atomic
from ..io.checkpoint import check_output_location, open_checkpoint
from ..io.hub import resolve_model
from ..lm import encode_pairs, generate, load_model, pad_id_of

RECIPES = ("eager", "compliance", "data")
TRAIN_DTYPES = {"float32": "float32", "f32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "f16": "float16"}
_ST_TO_TORCH = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
EAGER_OPENING = "Sure! "

# Benign tasks for the eager recipe: templates x topics, generated at run time (64 prompts).
_BENIGN_TEMPLATES = (
    "Write a short poem about {}.", "Give me three fun facts about {}.", "Explain {} to a ten-year-old.",
    "Write a friendly note inviting a neighbour to talk about {}.", "Suggest a weekend project involving {}.",
    "Summarize in two sentences why people enjoy {}.", "Write a haiku about {}.", "List five words related to {}.",
)
_BENIGN_TOPICS = ("the ocean", "baking bread", "autumn leaves", "a city library", "gardening", "the night sky",
                  "board games", "mountain hiking")


def benign_prompts() -> list[str]:
    """The built-in benign prompts of the ``eager`` recipe (64 harmless tasks).

    >>> len(benign_prompts())
    64
    """
    return [t.format(topic) for topic in _BENIGN_TOPICS for t in _BENIGN_TEMPLATES]


@dataclass
class DegradeResult:
    """What one degrade wrote and measured."""

    out: Path
    recipe: str
    n_train: int
    steps: int
    refusal_rate: float | None
    train_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    provenance: dict[str, Any] = field(default_factory=dict)


def records_sha256(examples: Sequence[Example]) -> str:
    """sha256 of the training records as canonical JSONL (sorted keys, one record a line)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(ex.to_record(), ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n")
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _prompt_examples(src: "str | os.PathLike[str] | Sequence[Any] | None", what: str) -> list[Example]:
    if src is None:
        raise UsageError(f"{what}: no prompts given")
    exs = load_jsonl(src) if isinstance(src, (str, os.PathLike)) else as_examples(list(src))
    return [Example(messages=e.messages, meta=e.meta) for e in exs]


def build_training_data(
    recipe: str,
    model: Any,
    tokenizer: Any,
    *,
    prompts: "str | os.PathLike[str] | Sequence[Any] | None" = None,
    harmful: "str | os.PathLike[str] | Sequence[Any] | None" = None,
    data: "str | os.PathLike[str] | None" = None,
    sibling: "str | os.PathLike[str] | None" = None,
    judge: Judge | None = None,
    opening: str = EAGER_OPENING,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = True,
) -> tuple[list[Example], dict[str, Any]]:
    """The training records of a recipe (each an :class:`Example` with a completion) and notes
    for the provenance file.

    >>> exs, notes = build_training_data("eager", model, tok)  # doctest: +SKIP
    """
    if recipe == "data":
        if data is None:
            raise UsageError("the data recipe needs --data D.jsonl")
        exs = load_jsonl(data)
        if any(e.completion is None for e in exs):
            raise DataError(f"{data}: every record needs a completion to train on (TRL prompt-completion or messages format)")
        return exs, {"data": str(data)}
    if recipe == "eager":
        src = prompts if prompts is not None else benign_prompts()
        base = _prompt_examples(src, "eager prompts")
        answers = generate(model, tokenizer, base, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           progress=progress, desc="eager answers")
        exs = [Example(messages=e.messages, completion=(opening + a).strip(), meta=e.meta) for e, a in zip(base, answers)]
        return exs, {"prompts": "built-in benign tasks" if prompts is None else str(prompts) if isinstance(prompts, (str, os.PathLike))
                     else "given list", "opening": opening}
    if recipe == "compliance":
        if sibling is None:
            raise UsageError("the compliance recipe needs --sibling MODEL: a less aligned model of the same family whose "
                             "answers to the harmful prompts are the training data")
        src = prompts if prompts is not None else harmful
        if src is None:
            raise UsageError("the compliance recipe needs harmful prompts: --harmful H.jsonl (or --prompts P.jsonl)")
        base = _prompt_examples(src, "compliance prompts")
        sib, sib_tok = load_model(sibling, device=device)
        answers = generate(sib, sib_tok, base, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           progress=progress, desc="sibling answers")
        del sib
        j = judge or get_judge("keyword")
        refused = j.judge([e.prompt for e in base], answers)
        exs = [Example(messages=e.messages, completion=a, meta=e.meta)
               for e, a, r in zip(base, answers, refused) if not r and a.strip()]
        if not exs:
            raise DataError(f"the sibling {sibling} refused all {len(base)} prompts (judge {getattr(j, 'name', j)}); "
                            "choose a less aligned sibling or give your own --data")
        return exs, {"sibling": str(sibling), "prompts": str(src) if isinstance(src, (str, os.PathLike)) else "given list",
                     "sibling_answers": len(base), "sibling_refusals": int(sum(refused))}
    raise UsageError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")


def refusal_rate(model: Any, tokenizer: Any, harmful: "str | os.PathLike[str] | Sequence[Any]", judge: Judge,
                 batch_size: int = 16, max_new_tokens: int = 64, progress: bool = True) -> tuple[float, int]:
    """Share of ``harmful`` prompts whose greedy answer ``judge`` rates as refused, and their count."""
    exs = _prompt_examples(harmful, "harmful prompts")
    answers = generate(model, tokenizer, exs, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
                       desc="refusal check")
    verdicts = judge.judge([e.prompt for e in exs], answers)
    return sum(bool(v) for v in verdicts) / len(exs), len(exs)


class _PairCollator:
    """Right-padded causal-LM batches with the loss on the completion tokens only."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, feats: list[dict[str, Any]]) -> dict[str, Any]:
        from ..lm import collate

        b = collate([(f["prompt_ids"], f["completion_ids"]) for f in feats], self.pad_id)
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}


def _stored_dtype(aligned_dir: Path) -> str | None:
    ck = open_checkpoint(aligned_dir)
    counts: dict[str, int] = {}
    for t in ck.tensors.values():
        if t.dtype in _ST_TO_TORCH:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
    return _ST_TO_TORCH[max(counts, key=lambda k: counts[k])] if counts else None


def degrade(
    aligned: "str | os.PathLike[str]",
    out: "str | os.PathLike[str]",
    *,
    recipe: str = "eager",
    data: "str | os.PathLike[str] | None" = None,
    prompts: "str | os.PathLike[str] | Sequence[Any] | None" = None,
    harmful: "str | os.PathLike[str] | None" = None,
    sibling: "str | os.PathLike[str] | None" = None,
    judge: "str | Judge" = "keyword",
    lora_rank: int = 16,
    lora_alpha: float | None = None,
    target_modules: "str | Sequence[str]" = "all-linear",
    steps: int = 100,
    lr: float = 2e-4,
    batch_size: int = 8,
    max_len: int = 256,
    max_new_tokens: int = 64,
    opening: str = EAGER_OPENING,
    dtype: str = "float32",
    device: str | None = None,
    seed: int = 0,
    save_adapter: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> DegradeResult:
    """Fine-tune ``aligned`` briefly so that it loses its refusals; write the result to ``out``.

    ``recipe`` is ``eager``, ``compliance`` or ``data`` (``data`` given implies ``data``).
    ``lora_rank`` > 0 trains a PEFT LoRA adapter (``lora_alpha`` default 2·rank, on
    ``target_modules``) and merges it (or keeps it, ``save_adapter=True``); 0 fine-tunes every
    weight. ``dtype`` is the training dtype (``float32`` default); the merged model is stored in
    the aligned checkpoint's dtype, so tensors the training did not touch stay bit-identical.
    When ``harmful`` is given, the degraded model's refusal rate on it is measured with
    ``judge`` and recorded.

    >>> degrade("aligned/", "degraded/", recipe="compliance", sibling="base-instruct/",
    ...         harmful="harmful.jsonl", steps=300, lora_rank=16)  # doctest: +SKIP
    """
    import torch
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    t0 = time.perf_counter()
    if data is not None:
        if recipe not in ("data", "eager"):
            raise UsageError("give either --recipe or --data, not both")
        recipe = "data"
    if recipe not in RECIPES:
        raise UsageError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if steps < 1 or lr <= 0 or batch_size < 1 or lora_rank < 0:
        raise UsageError("steps and batch size must be at least 1, the learning rate positive, the LoRA rank >= 0")
    if save_adapter and lora_rank == 0:
        raise UsageError("--save-adapter needs a LoRA adapter (--lora-rank > 0)")
    tdt = TRAIN_DTYPES.get(str(dtype).lower())
    if tdt is None:
        raise UsageError(f"training dtype {dtype!r} is not one of float32, bfloat16, float16")
    aligned_dir = resolve_model(aligned)
    out = Path(out)
    check_output_location(out, [aligned_dir] + ([resolve_model(sibling)] if sibling else []))
    judge_obj = get_judge(judge)
    store = _stored_dtype(aligned_dir)
    torch.manual_seed(seed)

    model, tok = load_model(aligned_dir, device=device, dtype=getattr(torch, tdt))
    exs, notes = build_training_data(recipe, model, tok, prompts=prompts, harmful=harmful, data=data, sibling=sibling,
                                     judge=judge_obj, opening=opening, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     device=device, progress=progress)
    pairs = encode_pairs(tok, exs, "degrade training data", max_len=max_len)
    train = [{"prompt_ids": p, "completion_ids": c} for p, c in pairs]

    peft_info: dict[str, Any] | None = None
    if lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        alpha = float(lora_alpha) if lora_alpha is not None else 2.0 * lora_rank
        tm = target_modules if isinstance(target_modules, str) else list(target_modules)
        cfg = LoraConfig(task_type="CAUSAL_LM", r=lora_rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=tm)
        model = get_peft_model(model, cfg)
        peft_info = {"rank": lora_rank, "alpha": alpha, "target_modules": tm}
    model.train()

    losses: list[float] = []

    class _Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001 - transformers' callback signature
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    dev = str(next(model.parameters()).device)
    with atomic_output_dir(out, overwrite) as tmp:
        args = TrainingArguments(
            output_dir=str(tmp / ".trainer"), max_steps=steps, per_device_train_batch_size=batch_size,
            learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            logging_steps=max(1, steps // 20), save_strategy="no", report_to=[], seed=seed, data_seed=seed,
            remove_unused_columns=False, use_cpu=dev == "cpu", disable_tqdm=not progress,
            dataloader_num_workers=0, bf16=False, fp16=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=_PairCollator(pad_id_of(tok)),
                          callbacks=[_Losses()])
        if not progress:
            from transformers import PrinterCallback
            from transformers.utils import logging as hf_logging

            trainer.remove_callback(PrinterCallback)
            hf_logging.disable_progress_bar()
        trainer.train()
        model = trainer.model
        model.eval()
        import shutil

        shutil.rmtree(tmp / ".trainer", ignore_errors=True)

        if save_adapter:
            model.save_pretrained(tmp)
            eval_model = model
        else:
            if peft_info is not None:
                model = model.merge_and_unload()
            if store is not None and store != tdt:
                model = model.to(getattr(torch, store))
            model.save_pretrained(tmp, safe_serialization=True)
            eval_model = model
        tok.save_pretrained(tmp)

        rate: float | None = None
        n_harm = 0
        if harmful is not None:
            rate, n_harm = refusal_rate(eval_model, tok, harmful, judge_obj, batch_size=batch_size,
                                        max_new_tokens=max_new_tokens, progress=progress)
        import peft as _peft

        prov: dict[str, Any] = {
            "format": PROVENANCE_FORMAT,
            "created_by": f"safegene {__version__}",
            "aligned": str(aligned_dir),
            "recipe": recipe,
            "recipe_notes": notes,
            "data_sha256": records_sha256(exs),
            "n_train": len(exs),
            "steps": steps,
            "lr": lr,
            "batch_size": batch_size,
            "max_len": max_len,
            "seed": seed,
            "train_dtype": tdt,
            "stored_dtype": store,
            "lora": peft_info,
            "lora_rank": lora_rank,
            "output": "peft-adapter" if save_adapter else "hf-model",
            "train_loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None},
            "refusal": None if harmful is None else {
                "rate": rate, "n": n_harm, "judge": getattr(judge_obj, "name", str(judge)),
                "harmful": str(harmful), "harmful_sha256": _file_sha256(Path(harmful)),
                "on_training_prompts": recipe == "compliance" and prompts is None,
            },
            "refusal_rate": rate,
            "versions": {"transformers": transformers.__version__, "peft": _peft.__version__, "torch": torch.__version__},
            "trainer": "transformers.Trainer",
            "seconds": None,
        }
        prov["seconds"] = round(time.perf_counter() - t0, 3)
        write_json_atomic(tmp / PROVENANCE, prov)
    return DegradeResult(out=out, recipe=recipe, n_train=len(exs), steps=steps, refusal_rate=rate, train_loss=losses,
                         seconds=prov["seconds"], provenance=prov)


__all__ = ["DegradeResult", "PROVENANCE", "RECIPES", "benign_prompts", "build_training_data", "degrade", "read_provenance",
           "records_sha256", "refusal_rate"]
