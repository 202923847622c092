"""Shared fixtures: tiny random Hugging Face checkpoints of three architectures."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def tiny_model(arch: str, seed: int = 0):
    """A tiny random causal LM of a real transformers architecture."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=False)
        return tf.LlamaForCausalLM(cfg).eval()
    if arch == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=False)
        return tf.Qwen2ForCausalLM(cfg).eval()
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
        return tf.GPT2LMHeadModel(cfg).eval()
    raise ValueError(arch)


def perturbed(model, seed: int, scale: float = 0.05):
    """A copy of ``model`` with every float parameter nudged (a stand-in fine-tune)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * p.float().std().clamp_min(1e-3) * torch.randn(p.shape, generator=g).to(p.dtype))
    return m


@pytest.fixture
def family(tmp_path: Path):
    """Factory: save aligned / degraded / task checkpoints and return their directories."""

    def make(arch: str = "llama", dtype: str = "F32", shards: tuple = (None, None, None)) -> dict[str, Path]:
        from tiny_models import save_family

        aligned = tiny_model(arch).to(DTYPES[dtype])
        degraded = perturbed(aligned, 1)
        task = perturbed(degraded, 2)
        names = ("aligned", "degraded", "task")
        return save_family(tmp_path, dict(zip(names, (aligned, degraded, task))), shards=dict(zip(names, shards)),
                           prefix=f"{arch}-{dtype}-")

    return make


def has_cuda_device() -> bool:
    try:
        import safegene

        return safegene.has_cuda() and torch.cuda.is_available()
    except Exception:
        return False


DEVICES = ["cpu"] + (["cuda"] if has_cuda_device() else [])


@pytest.fixture(scope="module")
def gene_family(tmp_path_factory):
    """Per test module: tiny tokenized aligned / degraded / task models and their extracted gene."""
    import safegene
    from safegene.gene import Gene
    from tiny_models import build_family

    root = tmp_path_factory.mktemp("family")
    dirs = build_family(root)
    gene = safegene.extract(dirs["aligned"], dirs["degraded"], root / "gene", progress=False)
    return dirs, Gene.load(gene.path)
