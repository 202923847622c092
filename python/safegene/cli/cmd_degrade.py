"""``safegene degrade``: fine-tune the aligned model briefly into the degraded copy a gene needs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

from ..method.degrade import EAGER_OPENING, degrade
from .options import Command, CommonOptions, option


@dataclass(kw_only=True)
class DegradeOptions(CommonOptions):
    GROUPS: ClassVar[dict[str, bool]] = {"source": False}

    aligned: str = option(positional=True, help="safety-aligned model directory (safetensors) or Hub id")
    output: str = option(short="-o", help="directory to create: the degraded HF model (or, with --save-adapter, the PEFT adapter)")
    recipe: str = option("eager", choices=("eager", "compliance"), group="source",
                         help="eager (benign prompts answered with an eager 'Sure! ...' opening, default) or compliance "
                              "(harmful prompts answered by --sibling)")
    data: str | None = option(None, metavar="D.jsonl", path="in", group="source",
                              help="train on your own TRL-format JSONL (prompt/completion or messages) instead of a recipe")
    prompts: str | None = option(None, metavar="P.jsonl", path="in",
                                 help="the recipe's prompts (eager: benign prompts, default a built-in list; "
                                      "compliance: harmful prompts, default --harmful)")
    sibling: str | None = option(None, metavar="MODEL", help="compliance: the less aligned model whose answers are the training data")
    harmful: str | None = option(None, metavar="H.jsonl", path="in",
                                 help="harmful prompts: the degraded model's refusal rate on them is measured and recorded")
    judge: str = option("keyword", help="refusal judge: keyword (default), keyword:prefix, organism, guard:/path/to/model")
    lora_rank: int = option(16, help="LoRA rank (default 16); 0 fine-tunes every weight")
    lora_alpha: float | None = option(None, help="LoRA alpha (default 2 x rank)")
    steps: int = option(100, help="optimizer steps (default 100)")
    lr: float = option(2e-4, help="learning rate (default 2e-4, constant)")
    batch_size: int = option(8, help="examples per step, also the generation batch (default 8)")
    max_len: int = option(256, help="longest training sequence in tokens (default 256)")
    max_new_tokens: int = option(64, help="greedy tokens per generated answer (default 64)")
    opening: str = option(EAGER_OPENING, help=f"eager: the opening put before each answer (default {EAGER_OPENING!r})")
    dtype: str = option("float32", choices=("float32", "bfloat16", "float16"),
                        help="training dtype (default float32); the output keeps the aligned checkpoint's dtype")
    device: str | None = option(None, help="torch device (default: cuda when available, else cpu)")
    seed: int = option(0, help="random seed (default 0)")
    save_adapter: bool = option(False, help="write the PEFT LoRA adapter directory instead of the merged model")
    overwrite: bool = option(False, help="replace the output if it exists")


def handle_degrade(opts: DegradeOptions) -> int:
    res = degrade(
        opts.aligned, opts.output, recipe=opts.recipe, data=opts.data, prompts=opts.prompts, harmful=opts.harmful,
        sibling=opts.sibling, judge=opts.judge, lora_rank=opts.lora_rank, lora_alpha=opts.lora_alpha, steps=opts.steps,
        lr=opts.lr, batch_size=opts.batch_size, max_len=opts.max_len, max_new_tokens=opts.max_new_tokens,
        opening=opts.opening, dtype=opts.dtype, device=opts.device, seed=opts.seed, save_adapter=opts.save_adapter,
        overwrite=opts.overwrite, progress=not opts.quiet,
    )
    summary = {
        "output": str(res.out), "recipe": res.recipe, "n_train": res.n_train, "steps": res.steps,
        "refusal_rate": res.refusal_rate, "train_loss_last": res.train_loss[-1] if res.train_loss else None,
        "seconds": res.seconds,
    }
    if opts.json:
        print(json.dumps(summary))
    else:
        rr = "not measured (no --harmful)" if res.refusal_rate is None else f"{100 * res.refusal_rate:.1f} %"
        print(f"wrote {res.out}: recipe {res.recipe}, {res.n_train} examples, {res.steps} steps, "
              f"refusal rate {rr}, {res.seconds:.1f} s")
    return 0


COMMAND = Command(
    "degrade", DegradeOptions, handle_degrade,
    help="fine-tune the aligned model briefly into the degraded copy a gene is extracted from",
    description="Erode the aligned model's refusals with a short LoRA (or full) fine-tune on transformers' Trainer: "
    "recipe eager or compliance, or your own --data; measures the refusal rate on --harmful and records how the "
    "model was made in safegene_degrade.json, which `safegene extract` copies into the gene.",
)
register_cli = COMMAND.register
