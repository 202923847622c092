"""``safegene eval``: ASR, task accuracy and over-refusal of a model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..eval.evaluate import evaluate
from .options import Command, ModelOptions, option


@dataclass(kw_only=True)
class EvalOptions(ModelOptions):
    model: str = option(positional=True, help="local Hugging Face causal-LM directory (safetensors), or BASE+LORA_DIR")
    output: str | None = option(None, short="-o", metavar="OUT.json", path="out",
                                help="write the full report (with every response) as JSON")
    harmful: str | None = option(None, metavar="H.jsonl", path="in", help="harmful prompts (JSONL, TRL convention)")
    task: list[str] = option(default_factory=list, metavar="T.jsonl", repeat=True, path="in",
                             help="task file (completion = label); repeatable")
    benign: str | None = option(None, metavar="B.jsonl", path="in", help="benign prompts for over-refusal")
    judge: str = option("keyword", help="keyword (default), keyword:prefix, organism, guard:/path/to/model")
    markdown: str | None = option(None, metavar="OUT.md", path="out", help="write the markdown table")
    batch_size: int = option(32, help="prompts per generation batch (default 32)")
    max_new_tokens: int = option(64, help="greedy tokens per response (default 64)")


def handle_eval(opts: EvalOptions) -> int:
    rep = evaluate(
        opts.model,
        harmful=opts.harmful,
        tasks=opts.task or None,
        benign=opts.benign,
        judge=opts.judge,
        batch_size=opts.batch_size,
        max_new_tokens=opts.max_new_tokens,
        progress=not opts.quiet,
        **opts.load_kwargs(),
    )
    if opts.output:
        rep.to_json(opts.output)
    md = rep.to_markdown()
    if opts.markdown:
        Path(opts.markdown).write_text(md, encoding="utf-8")
    if opts.json:
        print(json.dumps(rep.to_dict(samples=False), ensure_ascii=False))
    else:
        print(md, end="")
    return 0


COMMAND = Command(
    "eval", EvalOptions, handle_eval,
    help="generate greedily and report ASR, task accuracy and over-refusal",
    description="Evaluate a local HF causal-LM directory: ASR on harmful prompts, exact-label accuracy "
    "per task file, over-refusal on benign prompts, each with a 95 %% Wilson interval.",
)
register_cli = COMMAND.register
