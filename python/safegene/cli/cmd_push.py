"""``safegene push``: publish a gene (or a COEFFS.json) as a Hugging Face Hub repository."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..coeffs import Coeffs
from ..gene import Gene
from .options import Command, CommonOptions, option


@dataclass(kw_only=True)
class PushOptions(CommonOptions):
    gene: str = option(positional=True, help="gene directory (or a COEFFS.json, or a directory holding one)")
    repo: str = option(positional=True, help="Hub repository id org/name (created if it does not exist)")
    revision: str | None = option(None, help="branch to push to (created if needed; default main)")
    private: bool = option(False, help="create the repository as private")
    commit_message: str | None = option(None, help="commit message (default: a safegene message)")
    create_pr: bool = option(False, help="open a pull request instead of committing to the branch")


def handle_push(opts: PushOptions) -> int:
    src = Path(opts.gene)
    push = {"revision": opts.revision, "private": opts.private or None, "create_pr": opts.create_pr}
    if opts.commit_message:
        push["commit_message"] = opts.commit_message
    is_coeffs = src.is_file() or (src.is_dir() and (src / "COEFFS.json").is_file() and not (src / "gene.json").is_file())
    if is_coeffs:
        kind, url = "coefficients", Coeffs.from_pretrained(src).push_to_hub(opts.repo, **push)
    else:
        kind, url = "gene", Gene.from_pretrained(src).push_to_hub(opts.repo, **push)
    if opts.json:
        print(json.dumps({"repo": opts.repo, "kind": kind, "commit": url}))
    else:
        print(f"pushed {kind} {src} to {opts.repo}: {url}")
    return 0


COMMAND = Command("push", PushOptions, handle_push,
                  help="publish a gene or COEFFS.json to the Hugging Face Hub (portable provenance + model card)",
                  description="Upload a portable copy of a gene (vectors, gene.json without local paths, a model card) "
                  "or of a COEFFS.json to a Hub repository; log in first with `hf auth login`.")
register_cli = COMMAND.register
