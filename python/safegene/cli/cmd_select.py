"""``safegene select``: data-aware choice of the gene's keys."""

from __future__ import annotations

from pathlib import Path

from ..gene import key_sort
from ..method.selection import DEFAULT_SCORE, DEFAULT_THRESHOLD, SCORES, select_layers


def _cli(args) -> int:
    res = select_layers(args.gene, args.aligned, args.degraded, args.harmful, args.benign,
                        top_k=args.top_k, threshold=args.threshold, score=args.score,
                        batch_size=args.batch_size, max_prompts=args.max_prompts,
                        plot=args.plot or (Path(args.gene) / "layer_scores.png"), device=args.device,
                        refusal=args.refusal)
    names = list(res["all_scores"])
    keys = sorted({k for s in res["all_scores"].values() for k in s}, key=key_sort)
    print("| key | " + " | ".join(names) + " | selected |")
    print("|---|" + "---|" * len(names) + "---|")
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{res['all_scores'][n][k]:.4g}" if k in res["all_scores"][n] else "—"
                                       for n in names)
              + f" | {'yes' if k in res['selected'] else ''} |")
    print(f"selected ({res['method']}): {', '.join(res['selected'])}; plot: {res['plot']}")
    return 0



def register_cli(subparsers) -> None:
    """Add ``safegene select GENE --aligned A --degraded D --harmful H --benign B [--top-k K | --threshold X]``."""
    p = subparsers.add_parser(
        "select", help="score decoder layers by harm-specific aligned–degraded contrast; write the selection to gene.json",
        description="Data-aware layer selection (one model in memory at a time).",
    )
    p.add_argument("gene", help="gene directory")
    p.add_argument("--aligned", required=True, help="aligned model directory")
    p.add_argument("--degraded", required=True, help="degraded model directory")
    p.add_argument("--harmful", required=True, help="JSONL of harmful prompts")
    p.add_argument("--benign", required=True, help="JSONL of benign / task prompts")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--threshold", type=float, default=None, help=f"fraction of the best score (default {DEFAULT_THRESHOLD})")
    p.add_argument("--score", choices=SCORES, default=DEFAULT_SCORE)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-prompts", type=int, default=64)
    p.add_argument("--plot", default=None, help="PNG path (default GENE/layer_scores.png)")
    p.add_argument("--refusal", default=None,
                   help="refusal text for harmful prompts without a completion (the 'restore' score needs refusals)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cli)
