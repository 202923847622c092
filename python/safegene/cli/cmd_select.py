"""``safegene select``: data-aware choice of the gene's keys."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..errors import UsageError
from ..gene import Gene, key_sort
from ..io.hub import parse_hub_id
from ..method.selection import (DEFAULT_RULE, DEFAULT_SCORE, DEFAULT_THRESHOLD, NOISE_Z, RULES, SCORES, SEARCHES, VALIDATE_Z,
                                select_layers)
from ..ops.extract import prune_gene
from .options import Command, ModelOptions, option


@dataclass(kw_only=True)
class SelectOptions(ModelOptions):
    GROUPS: ClassVar[dict[str, bool]] = {"rule": False}

    gene: str = option(positional=True, help="gene directory (the selection is written into its gene.json), or a Hub "
                                             "id org/name[@rev] with -o")
    output: str | None = option(None, short="-o", metavar="DIR",
                                help="write a copy of the gene with the selection here instead of updating GENE in place "
                                     "(needed for a Hub gene: the Hub cache is read-only)")
    aligned: str = option(help="aligned model directory")
    degraded: str = option(help="degraded model directory")
    harmful: str = option(path="in", help="JSONL of harmful prompts")
    benign: str = option(path="in", help="JSONL of benign / task prompts")
    top_k: int | None = option(None, group="rule", help="keep the K best-scoring keys")
    threshold: float | None = option(None, group="rule",
                                     help=f"keep keys scoring at least this fraction of the best (default {DEFAULT_THRESHOLD})")
    score: str = option(DEFAULT_SCORE, choices=SCORES, help=f"selection score (default {DEFAULT_SCORE})")
    batch_size: int = option(16, help="prompts per forward batch (default 16)")
    max_prompts: int = option(64, help="at most this many prompts of each file (default 64)")
    prune: bool = option(False, help="then keep only the selected keys' vectors (and factors) in the gene: the others "
                                     "are dropped, the kept ones rewritten byte for byte into shards")
    max_shard_mb: float = option(5000.0, help="with --prune: largest vector (or factor) file in MB (default 5000)")
    plot: str | None = option(None, path="out", help="PNG path (default GENE/layer_scores.png)")
    refusal: str | None = option(None, help="refusal text for harmful prompts without a completion "
                                            "(the 'restore' score needs refusals)")
    rule: str | None = option(
        None, choices=RULES,
        help=f"how many keys to keep: validate (chosen on development prompts) or threshold (--top-k / "
             f"--threshold); default {DEFAULT_RULE}, or threshold when --top-k or --threshold is given")
    dev_harmful: str | None = option(None, path="in", help="JSONL of development harmful prompts for --rule validate "
                                                           "(default: every second harmful prompt)")
    dev_benign: str | None = option(None, path="in", help="JSONL of development benign prompts for --rule validate "
                                                          "(default: every second benign prompt)")
    validate_z: float = option(VALIDATE_Z, help="--rule validate keeps the fewest keys within this many standard "
                                                "errors of the best loss (default "
                                                f"{VALIDATE_Z:g}: the k of lowest development loss)")
    validate_search: str = option("prefix", choices=SEARCHES,
                                  help="--rule validate: compare prefixes of the score ranking (prefix, default) or "
                                       "build the key sets by forward selection on the development loss (forward)")
    noise_z: float = option(NOISE_Z, help=f"scores within this many standard errors of each other are flat and keep "
                                          f"every key (default {NOISE_Z:g})")


def _gene_to_update(opts: SelectOptions) -> str:
    """The local gene directory the selection is written into: GENE itself, or its copy in -o."""
    if opts.output is None:
        if not Path(opts.gene).expanduser().exists() and parse_hub_id(opts.gene) is not None:
            raise UsageError(f"{opts.gene}: a Hub gene is read-only; give -o DIR to write a local copy with the selection")
        return opts.gene
    Gene.from_pretrained(opts.gene).save_pretrained(opts.output)
    return opts.output


def handle_select(opts: SelectOptions) -> int:
    gene = _gene_to_update(opts)
    res = select_layers(gene, opts.aligned, opts.degraded, opts.harmful, opts.benign,
                        top_k=opts.top_k, threshold=opts.threshold, score=opts.score,
                        batch_size=opts.batch_size, max_prompts=opts.max_prompts,
                        plot=opts.plot or (Path(gene) / "layer_scores.png"), refusal=opts.refusal,
                        rule=opts.rule, dev_harmful=opts.dev_harmful, dev_benign=opts.dev_benign,
                        validate_z=opts.validate_z, noise_z=opts.noise_z, validate_search=opts.validate_search, progress=not opts.quiet,
                        **opts.load_kwargs())
    if opts.prune:
        pruned = prune_gene(gene, res["selected"], max_shard_mb=opts.max_shard_mb)
        res["pruned"] = {"tensors": len(pruned.tensor_names), "files": [f.name for f in pruned.vector_files + pruned.factor_files]}
    if opts.json:
        print(json.dumps(res, default=str))
        return 0
    names = list(res["all_scores"])
    keys = sorted({k for s in res["all_scores"].values() for k in s}, key=key_sort)
    print("| key | " + " | ".join(names) + " | selected |")
    print("|---|" + "---|" * len(names) + "---|")
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{res['all_scores'][n][k]:.4g}" if k in res["all_scores"][n] else "—"
                                       for n in names)
              + f" | {'yes' if k in res['selected'] else ''} |")
    print(f"selected ({res['method']}): {', '.join(res['selected'])}; plot: {res['plot']}")
    if opts.prune:
        print(f"pruned the gene to the selected keys: {res['pruned']['tensors']} tensors in {len(res['pruned']['files'])} files")
    return 0


COMMAND = Command(
    "select", SelectOptions, handle_select,
    help="score decoder layers by harm-specific aligned–degraded contrast; write the selection to gene.json",
    description="Data-aware layer selection (one model in memory at a time).",
)
register_cli = COMMAND.register
