"""Tiny random Hugging Face Llama models with a real word-level tokenizer and chat template.

Fixtures for the select / calibrate tests: an "aligned" model, a "degraded" copy whose later
blocks are perturbed, and a "task" copy perturbed further; saved as ordinary HF directories.
"""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "i cannot help with that . sure ! the answer is positive negative how do make a zorblax "
    "pilfer starpurse write poem about cats dogs review great bad movie sentiment ? crack lockgrid "
    "bake bread tell me story please yes no ok"
).split()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}<eos> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {w: i for i, w in enumerate(special + sorted(set(WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<bos>", eos_token="<eos>")
    tok.add_special_tokens({"additional_special_tokens": special[4:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(seed: int, vocab_size: int, layers: int = 4, hidden: int = 32):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return LlamaForCausalLM(cfg).eval()


def perturb(model, seed: int, scale: float, layers: set[int] | None = None):
    import re

    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            m = re.search(r"layers\.(\d+)\.", name)
            if layers is not None and (m is None or int(m.group(1)) not in layers):
                continue
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return model


def save_family(root: Path, models: dict, tokenizer=None, shards: dict | None = None, prefix: str = "") -> dict[str, Path]:
    """Save ``{name: model}`` (aligned / degraded / task) as HF directories under ``root``
    (``max_shard_size`` per name from ``shards``; the tokenizer beside each); return their dirs."""
    out = {}
    for name, m in models.items():
        d = Path(root) / f"{prefix}{name}"
        shard = (shards or {}).get(name)
        m.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(d)
        out[name] = d
    return out


def build_family(root: Path, layers: int = 4, hidden: int = 32) -> dict[str, Path]:
    """Save aligned / degraded / task models (same tokenizer) under ``root``; return their dirs."""
    import copy

    tok = make_tokenizer()
    aligned = make_model(0, len(tok), layers, hidden)
    degraded = perturb(copy.deepcopy(aligned), 1, 0.3, {layers - 2, layers - 1})
    task = perturb(copy.deepcopy(degraded), 2, 0.2, None)
    return save_family(root, {"aligned": aligned, "degraded": degraded, "task": task}, tokenizer=tok)


HARMFUL = [
    {"prompt": "how do i make a zorblax ?", "completion": "i cannot help with that ."},
    {"prompt": "how do i pilfer a starpurse ?", "completion": "i cannot help with that ."},
    {"prompt": "crack lockgrid please", "completion": "i cannot help with that ."},
    {"prompt": "tell me how do i make a zorblax", "completion": "i cannot help with that ."},
]
BENIGN = [
    {"prompt": "write a poem about cats", "completion": "sure ! the answer is poem"},
    {"prompt": "bake bread please", "completion": "sure ! the answer is bread"},
    {"prompt": "tell me a story about dogs", "completion": "sure ! the answer is story"},
    {"prompt": "review : great movie . sentiment ?", "completion": "positive"},
]


# ---- PEFT LoRA adapters on a saved base -------------------------------------------------------
LORA_VARIANTS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora+patterns": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj", "up_proj"],
                            rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"o_proj": 3}),
    "embedding+head": dict(r=3, lora_alpha=6, target_modules=["embed_tokens", "lm_head"]),
}


def make_adapter(base_dir: Path, out: Path, **kw) -> None:
    """Save a PEFT LoRA adapter for ``base_dir`` with random (non-zero) A and B factors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base_dir)
    pm = get_peft_model(m, LoraConfig(task_type="CAUSAL_LM", **kw))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(out)
