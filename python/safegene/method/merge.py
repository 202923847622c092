"""θ_T + Σ λ τ on a model in memory: the one-shot patch and the differentiable merge.

:func:`apply_to_model` patches a loaded model in place through one batched kernel call;
:class:`MergePlan` and :func:`gene_merge` (a ``torch.autograd.Function``) are what calibration
trains λ through: the forward writes ``W_t = RNE(W_t⁰ + λ_{l(t)} τ_t)`` into the model's own
parameter storage with one batched :func:`safegene.engine.native.scale_add_` call, the backward
turns weight gradients into ``∂L/∂λ_l = Σ_{t∈l} ⟨∂L/∂W_t, τ_t⟩`` with one batched
:func:`safegene.engine.native.dot` call.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

from ..coeffs import CoeffsLike, resolve_coeffs
from ..engine import native
from ..errors import GeneError, SafeGeneError, UsageError
from ..gene import Gene, load_gene

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _load_per_device(gene: Gene, names: Sequence[str], tensors: Sequence["torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """τ for ``names``, each on its own target tensor's device (a dispatched model spans several)."""
    by_dev: dict[str, list[str]] = {}
    for n, t in zip(names, tensors):
        if t.device.type == "meta":
            raise SafeGeneError(
                f"parameter {n!r} is offloaded (on the meta device); patch the checkpoint with `safegene apply` "
                "instead, or give the device map room for the patched layers"
            )
        by_dev.setdefault(str(t.device), []).append(n)
    vecs: dict[str, "torch.Tensor"] = {}
    for dev, group in by_dev.items():
        vecs.update(gene.load_vectors(group, device=dev))
    return vecs


def tied_aliases(model: "torch.nn.Module") -> dict[str, str]:
    """``{alias: canonical}`` for parameters that share storage with an earlier one (a tied
    lm_head and its embedding). The canonical name is the one ``named_parameters()`` keeps (the
    embedding), so the alias follows the embedding's λ and τ, as ``safegene apply`` does for a
    tied checkpoint that stores both."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if p.device.type == "meta":
            continue
        key = p.data_ptr()
        if key in first:
            out[n] = first[key]
        else:
            first[key] = n
    return out


def apply_to_model(
    model: "torch.nn.Module",
    gene: "str | os.PathLike[str] | Gene",
    coeffs: CoeffsLike | None = None,
    *,
    scale: float | None = None,
) -> dict[str, float]:
    """Patch a loaded model in place: ``W += λ τ`` through one batched kernel call.

    Works on CPU and (when built with CUDA and a device exists) CUDA parameters. Parameters
    that share storage (tied embeddings) are patched once. Returns the λ used per tensor.

    >>> model = AutoModelForCausalLM.from_pretrained("task-model/")  # doctest: +SKIP
    >>> apply_to_model(model, "gene/", "COEFFS.json")  # doctest: +SKIP
    """
    import torch

    g = load_gene(gene)
    lam = resolve_coeffs(g, scale, coeffs)
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update({k: v for k, v in model.named_buffers(remove_duplicate=False) if k not in state})
    missing = [n for n in g.tensor_names if lam[n] != 0.0 and n not in state]
    if missing:
        raise GeneError(f"the model has no parameter {missing[0]!r} that gene {g.path} patches; it is a different architecture")
    aliases = tied_aliases(model)
    todo: list[str] = []
    for n in g.tensor_names:
        if lam[n] == 0.0 or n in aliases:  # a tied alias is patched through its canonical tensor
            continue
        p = state[n]
        if tuple(p.shape) != tuple(g.fingerprint["tensors"][n]["shape"]):
            raise GeneError(f"parameter {n!r} has shape {list(p.shape)} but the gene's vector is {g.fingerprint['tensors'][n]['shape']}")
        todo.append(n)
    if not todo:
        return {}
    vecs = _load_per_device(g, todo, [state[n] for n in todo])
    with torch.no_grad():
        dsts = [state[n].data for n in todo]
        srcs = [vecs[n].contiguous() for n in todo]
        native.scale_add_(dsts, srcs, [lam[n] for n in todo])
    return {n: lam[n] for n in todo}


def module_group(name: str) -> str:
    """Module type of a tensor inside a decoder block, for ``per_module`` coefficients."""
    n = name.lower()
    module = n.split(".")[-2] if "." in n else n
    if "norm" in module or module.startswith("ln"):  # before attn: post_attention_layernorm is a norm
        return "norm"
    if "attn" in n or "attention" in n:
        return "attn"
    if "mlp" in n or "ffn" in n or "feed_forward" in n:
        return "mlp"
    return "other"


def coeff_key(gene, name: str, per_module: bool) -> str:
    key = gene.layer_key(name)
    return f"{key}.{module_group(name)}" if per_module else key


class MergePlan:
    """The selected tensors of a loaded model, their τ, an untouched copy W⁰, and λ's layout.

    ``set(lam)`` writes ``W = RNE(W⁰ + λ τ)`` in place; ``restore()`` copies W⁰ back exactly.

    >>> plan = MergePlan(model, gene, ["layer.2", "layer.3"])  # doctest: +SKIP
    >>> plan.set(torch.tensor([1.0, 0.5])); plan.restore()      # doctest: +SKIP
    """

    def __init__(self, model, gene, layers: Sequence[str], per_module: bool = False, device=None):
        import torch

        params = dict(model.named_parameters(remove_duplicate=False))
        params.update(dict(model.named_buffers()))
        want = set(layers)
        aliases = tied_aliases(model)
        # a tied head stored in the checkpoint (so in the gene) shares the embedding's storage:
        # it follows the embedding, as in `safegene apply`, and is never written twice
        names = [n for n in gene.tensor_names if gene.layer_key(n) in want and n not in aliases]
        if not names:
            tied = [n for n in aliases if n in gene.tensor_names and gene.layer_key(n) in want]
            why = f" ({tied[0]!r} is tied to {aliases[tied[0]]!r} in this model; select that layer)" if tied else ""
            raise GeneError(f"gene {gene.path}: no tensors in layers {sorted(want)}{why}; known layers: {gene.layer_keys()}")
        missing = [n for n in names if n not in params]
        if missing:
            raise GeneError(
                f"gene {gene.path}: tensor {missing[0]!r} (and {len(missing) - 1} more) is not a parameter of the "
                "target model; the gene and the target must be the same architecture"
            )
        self.names = names
        self.weights = [params[n].data for n in names]
        # each τ (and W⁰ below) on its own weight's device: a dispatched model spans several
        vecs = (gene.load_vectors(names=names, device=str(device)) if device is not None
                else _load_per_device(gene, names, self.weights))
        self.taus = []
        for n, w in zip(names, self.weights):
            t = vecs[n].contiguous()
            if t.numel() != w.numel():
                raise GeneError(f"gene {gene.path}: tensor {n!r} has shape {tuple(t.shape)}, target has {tuple(w.shape)}")
            if not w.is_contiguous():
                raise SafeGeneError(f"target tensor {n!r} is not contiguous; cannot patch it in place")
            self.taus.append(t)
        self.keys = []
        key_of = []
        for n in names:
            k = coeff_key(gene, n, per_module)
            if k not in self.keys:
                self.keys.append(k)
            key_of.append(self.keys.index(k))
        self.key_of = key_of
        self.base = [w.detach().clone() for w in self.weights]
        self.current: list[float] | None = None
        self._torch = torch

    @property
    def num_keys(self) -> int:
        return len(self.keys)

    def set(self, lam) -> None:
        """Write ``W = RNE(W⁰ + λ τ)`` into the model's tensors (no autograd)."""
        vals = [float(v) for v in (lam.detach().cpu().tolist() if hasattr(lam, "detach") else lam)]
        if len(vals) != self.num_keys:
            raise UsageError(f"{len(vals)} coefficients for {self.num_keys} keys {self.keys}")
        with self._torch.no_grad():
            for w, b in zip(self.weights, self.base):
                w.copy_(b)
            native.scale_add_(self.weights, self.taus, [vals[i] for i in self.key_of])
        self.current = vals

    def restore(self) -> None:
        """Copy the untouched weights back: the model is bit-identical to before."""
        with self._torch.no_grad():
            for w, b in zip(self.weights, self.base):
                w.copy_(b)
        self.current = None

    def grad_lambda(self, grads) -> list[float]:
        """``∂L/∂λ_k = Σ_{t: key(t)=k} ⟨∂L/∂W_t, τ_t⟩`` in one batched dot call."""
        idx = [i for i, g in enumerate(grads) if g is not None]
        out = [0.0] * self.num_keys
        if not idx:
            return out
        dots = native.dot([grads[i].contiguous() for i in idx], [self.taus[i] for i in idx])
        for i, d in zip(idx, dots):
            out[self.key_of[i]] += float(d)
        return out


def _merge_function():
    import torch

    class GeneMerge(torch.autograd.Function):
        """forward: W = W⁰ + λ τ via the batched C++ scale-and-add, returns the merged weights;
        backward: ∂L/∂λ_l = Σ_t ⟨∂L/∂W_t, τ_t⟩ via the batched C++ dot."""

        @staticmethod
        def forward(ctx, lam, plan):  # type: ignore[override]
            plan.set(lam)
            ctx.plan = plan
            ctx.lam_meta = (lam.dtype, lam.device)
            return tuple(w.detach() for w in plan.weights)

        @staticmethod
        def backward(ctx, *grads):  # type: ignore[override]
            dtype, device = ctx.lam_meta
            g = ctx.plan.grad_lambda(grads)
            return torch.tensor(g, dtype=dtype, device=device), None

    return GeneMerge


_GENE_MERGE = None


def gene_merge(lam, plan: "MergePlan"):
    """Differentiable ``λ ↦ (W_t(λ))_t`` for the plan's tensors (aliases of the model's storage).

    >>> ws = gene_merge(lam, plan)  # doctest: +SKIP
    >>> logits = torch.func.functional_call(model, dict(zip(plan.names, ws)), (ids,))  # doctest: +SKIP
    """
    global _GENE_MERGE
    if hasattr(plan, "bind"):  # the low-memory plan (method/lowmem.py): λ τ in activation space
        return plan.bind(lam)
    if _GENE_MERGE is None:
        _GENE_MERGE = _merge_function()
    return _GENE_MERGE.apply(lam, plan)
