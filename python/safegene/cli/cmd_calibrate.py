"""``safegene calibrate``: few-shot per-layer coefficients for one task model."""

from __future__ import annotations

import json

from ..method.calibrate import calibrate


def _cli(args) -> int:
    c = calibrate(
        args.gene, args.target, args.safety, args.utility,
        layers=args.layers, steps=args.steps, lr=args.lr, beta=args.beta, l2=args.l2,
        lambda_max=args.lambda_max, init=_parse_init(args.init), per_module=args.per_module,
        utility_loss=args.utility_loss, safety_first_k=args.safety_first_k,
        max_examples=args.max_examples, refusal=args.refusal, device=args.device, out=args.output,
    )
    print(json.dumps(c.coeffs, indent=2))
    return 0



def _parse_init(s: str):
    try:
        return float(s)
    except ValueError:
        return s



def register_cli(subparsers) -> None:
    """Add ``safegene calibrate GENE TARGET --safety S --utility U -o COEFFS.json``."""
    p = subparsers.add_parser(
        "calibrate", help="learn per-layer coefficients λ for one task model from a few examples",
        description="Few-shot layer-wise recalibration: θ = θ_T + Σ λ_l τ_l, only λ is trained.",
    )
    p.add_argument("gene", help="gene directory (from `safegene extract`, with a selection from `safegene select`)")
    p.add_argument("target", help="task model directory (Hugging Face format)")
    p.add_argument("--safety", required=True, help="JSONL of harmful prompts with refusal completions")
    p.add_argument("--utility", nargs="+", default=None,
                   help="JSONL(s) of task examples with answers and/or benign prompts without completion")
    p.add_argument("-o", "--output", required=True, help="where to write COEFFS.json")
    p.add_argument("--layers", default=None, help="comma-separated layer keys, or 'all' (default: the gene's selection)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--beta", type=float, default=3.0, help="weight of the utility term (default 3)")
    p.add_argument("--l2", type=float, default=1e-3)
    p.add_argument("--lambda-max", type=float, default=4.0)
    p.add_argument("--init", default="grid", help="'grid' (default), 'ones', 'zeros' or a number")
    p.add_argument("--per-module", action="store_true", help="one λ per module type (attn/mlp/norm) per layer")
    p.add_argument("--utility-loss", choices=["auto", "ce", "kl"], default="kl",
                   help="kl: KL to the task model on its own greedy responses (default); ce: CE of the records' "
                        "completions; auto: CE where a record has a completion, KL at the first response token otherwise")
    p.add_argument("--safety-first-k", type=int, default=2,
                   help="only the first K refusal tokens count (default 2; 0 = the whole refusal)")
    p.add_argument("--max-examples", type=int, default=16)
    p.add_argument("--refusal", default=None, help="refusal text for safety records without a completion")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cli)
