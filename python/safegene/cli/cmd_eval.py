"""``safegene eval``: ASR, task accuracy and over-refusal of a model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..eval.evaluate import evaluate


def _handler(args: argparse.Namespace) -> int:
    rep = evaluate(
        args.model,
        harmful=args.harmful,
        tasks=args.task or None,
        benign=args.benign,
        judge=args.judge,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress,
        device=args.device,
    )
    if args.json:
        rep.to_json(args.json)
    md = rep.to_markdown()
    if args.markdown:
        Path(args.markdown).write_text(md, encoding="utf-8")
    print(md, end="")
    return 0



def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``safegene eval MODEL --harmful H.jsonl [--task T.jsonl ...] [--benign B.jsonl] [--judge J]``."""
    p = subparsers.add_parser(
        "eval",
        help="generate greedily and report ASR, task accuracy and over-refusal",
        description="Evaluate a local HF causal-LM directory: ASR on harmful prompts, exact-label accuracy "
        "per task file, over-refusal on benign prompts, each with a 95 %% Wilson interval.",
    )
    p.add_argument("model", help="local Hugging Face causal-LM directory (safetensors)")
    p.add_argument("--harmful", metavar="H.jsonl", help="harmful prompts (JSONL, TRL convention)")
    p.add_argument("--task", metavar="T.jsonl", action="append", default=[], help="task file (completion = label); repeatable")
    p.add_argument("--benign", metavar="B.jsonl", help="benign prompts for over-refusal")
    p.add_argument("--judge", default="keyword", help="keyword (default), keyword:prefix, organism, guard:/path/to/model")
    p.add_argument("--json", metavar="OUT.json", help="write the full report (with every response) as JSON")
    p.add_argument("--markdown", metavar="OUT.md", help="write the markdown table")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_handler)
    return p
