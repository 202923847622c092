"""``safegene calibrate``: few-shot per-layer coefficients for one task model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Union

from ..method.calibrate import calibrate
from ..method.lowmem import MODES
from .options import Command, ModelOptions, option


@dataclass(kw_only=True)
class CalibrateOptions(ModelOptions):
    gene: str = option(positional=True, help="gene directory (from `safegene extract`, with a selection from "
                                             "`safegene select`)")
    target: str = option(positional=True, help="task model directory (Hugging Face format), or BASE+LORA_DIR")
    output: str = option(short="-o", help="where to write COEFFS.json")
    safety: str = option(path="in", help="JSONL of harmful prompts with refusal completions")
    utility: list[str] | None = option(None, path="in", help="JSONL(s) of task examples with answers and/or benign "
                                                             "prompts without completion")
    layers: str | None = option(None, help="comma-separated layer keys, or 'all' (default: the gene's selection)")
    steps: int = option(40, help="optimisation steps (default 40)")
    lr: float = option(0.05, help="learning rate (default 0.05)")
    beta: float = option(3.0, help="weight of the utility term (default 3)")
    l2: float = option(1e-3, help="weight of the L2 penalty ‖λ‖² (default 1e-3)")
    lambda_max: float = option(4.0, help="upper bound of every λ (default 4)")
    init: str = option("grid", help="'grid' (default), 'ones', 'zeros' or a number")
    per_module: bool = option(False, help="one λ per module type (attn/mlp/norm) per layer")
    utility_loss: str = option(
        "kl", choices=("auto", "ce", "kl"),
        help="kl: KL to the task model on its own greedy responses (default); ce: CE of the records' completions; "
             "auto: CE where a record has a completion, KL at the first response token otherwise")
    safety_first_k: int = option(2, help="only the first K refusal tokens count (default 2; 0 = the whole refusal)")
    max_examples: int = option(16, help="at most this many examples of each kind (default 16)")
    refusal: str | None = option(None, help="refusal text for safety records without a completion")
    mode: str = option("exact", choices=MODES,
                       help="exact: W = W_T + λτ in weight space (default, the reference); lowmem: λ·(τx) added to "
                            "each selected layer's output, no weight gradients and no copy of the weights")


def _parse_init(s: str) -> Union[str, float]:
    try:
        return float(s)
    except ValueError:
        return s


def handle_calibrate(opts: CalibrateOptions) -> int:
    c = calibrate(
        opts.gene, opts.target, opts.safety, opts.utility,
        layers=opts.layers, steps=opts.steps, lr=opts.lr, beta=opts.beta, l2=opts.l2,
        lambda_max=opts.lambda_max, init=_parse_init(opts.init), per_module=opts.per_module,
        utility_loss=opts.utility_loss, safety_first_k=opts.safety_first_k,
        max_examples=opts.max_examples, refusal=opts.refusal, out=opts.output, mode=opts.mode, **opts.load_kwargs(),
        **({"log": None} if opts.quiet else {}),
    )
    if opts.json:
        print(json.dumps({"output": opts.output, "coeffs": c.coeffs}))
    else:
        print(json.dumps(c.coeffs, indent=2))
    return 0


COMMAND = Command(
    "calibrate", CalibrateOptions, handle_calibrate,
    help="learn per-layer coefficients λ for one task model from a few examples",
    description="Few-shot layer-wise recalibration: θ = θ_T + Σ λ_l τ_l, only λ is trained.",
)
register_cli = COMMAND.register
