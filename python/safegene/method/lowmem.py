"""The low-memory calibration mode: θ_T + Σ λ τ in activation space, never in weight space.

The exact mode (:class:`~safegene.method.merge.MergePlan` + ``gene_merge``) writes
``W = W⁰ + λ τ`` into the model and turns the weight gradients ``∂L/∂W`` into ``∂L/∂λ``: it holds
a copy W⁰ of every selected tensor and a full weight gradient for each. Here the model keeps
θ_T untouched and each selected module adds the gene's contribution to its own output:

* ``nn.Linear`` (weight τ_W, bias τ_b):   ``y = W_T x + b_T + λ (τ_W x + τ_b)``
* ``nn.Embedding`` (weight τ):             ``y = E_T[ids] + λ τ[ids]``

so ``∂L/∂λ = Σ ⟨∂L/∂y, τ_W x + τ_b⟩`` needs only the activations autograd keeps anyway; no
weight gradient exists and no W⁰ copy is made. τ stays in the gene's storage dtype (cast to the
activation dtype one module at a time). Selected tensors of any other module (norm weights,
small) fall back to the weight-space form ``W⁰ + λ τ`` through ``functional_call``. A head tied
to a selected embedding gets the embedding's τ and λ, as ``safegene apply`` does.

:class:`LowMemPlan` has :class:`MergePlan`'s interface (``names``, ``weights``, ``keys``,
``key_of``, ``set``, ``restore``, ``bind``), so calibration switches mode by choosing the plan.

>>> plan = LowMemPlan(model, gene, ["layer.2", "layer.3"])    # doctest: +SKIP
>>> ws = plan.bind(lam)                                         # doctest: +SKIP
>>> logits = torch.func.functional_call(model, dict(zip(plan.names, ws)), (ids,)).logits  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import GeneError, SafeGeneError, UsageError
from .merge import coeff_key, tied_aliases


def _module_and_attr(model: Any, name: str) -> tuple[Any, str]:
    mod_name, _, attr = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


def _exec_device(module: Any, w: Any) -> Any:
    """Where a module computes: its weight's device, or accelerate's execution device when the
    weight is offloaded (on ``meta``)."""
    import torch

    if w.device.type != "meta":
        return w.device
    dev = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if dev is None:
        raise SafeGeneError("an offloaded weight without an accelerate hook; load the model with a device_map")
    return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)


class LowMemPlan:
    """The selected tensors of a loaded model applied as ``λ τ`` in each module's output.

    A low-rank gene's factored τ = B·A of a hooked module stays factored: the hook adds
    ``λ B(A x)`` (an embedding ``λ B[ids] A``), so no out × in τ is ever formed and the plan holds
    r·(out + in) numbers for it; only a factored tensor patched in weight space is densified.

    ``bind(lam)`` makes ``lam`` (a tensor that may require grad) the live coefficients and
    returns the values :func:`torch.func.functional_call` should see for ``names``;
    ``set(lam)`` does the same without autograd; ``restore()`` removes the hooks and puts back the
    few tensors written in weight space: the model is bit-identical to before.
    """

    def __init__(self, model: Any, gene: Any, layers: Sequence[str], per_module: bool = False) -> None:
        import torch

        params = dict(model.named_parameters(remove_duplicate=False))
        aliases = tied_aliases(model)
        want = set(layers)
        names = [n for n in gene.tensor_names if gene.layer_key(n) in want and n not in aliases]
        if not names:
            raise GeneError(f"gene {gene.path}: no tensors in layers {sorted(want)}; known layers: {gene.layer_keys()}")
        missing = [n for n in names if n not in params]
        if missing:
            raise GeneError(f"gene {gene.path}: tensor {missing[0]!r} is not a parameter of the target model; "
                            "the gene and the target must be the same architecture")
        self.names = names
        self.weights = [params[n].data for n in names]
        self.keys: list[str] = []
        self.key_of: list[int] = []
        for n in names:
            k = coeff_key(gene, n, per_module)
            if k not in self.keys:
                self.keys.append(k)
            self.key_of.append(self.keys.index(k))

        # (module -> [(attr, τ, key index)]) for the hooked modules; weight-space entries otherwise
        self._hooked: dict[Any, list[tuple[str, Any, int]]] = {}
        self._space: list[int] = []  # indices into names of the weight-space tensors
        self.taus: list[Any] = [None] * len(names)
        for i, n in enumerate(names):
            mod, attr = _module_and_attr(model, n)
            kind = type(mod)
            hookable = (isinstance(mod, torch.nn.Linear) and attr in ("weight", "bias")) or (
                isinstance(mod, torch.nn.Embedding) and attr == "weight")
            dev = _exec_device(mod, self.weights[i]) if hookable else self.weights[i].device
            if not hookable and dev.type == "meta":
                raise SafeGeneError(f"{n!r} ({kind.__name__}) is offloaded; the low-memory mode patches it in "
                                    "weight space, which needs it on a device")
            factored = hookable and attr == "weight" and gene.is_factored(n)
            tau: Any
            if factored:  # τ = B·A kept as its factors: the hook computes B(Ax), no dense τ is formed
                a, b = gene.load_factors([n])[n]
                tau = (a.to(dev), b.to(dev))
                shape = (int(b.shape[0]), int(a.shape[1]))
            else:
                tau = gene.load_vectors([n], device=str(dev))[n]
                shape = tuple(tau.shape)
            if shape != tuple(self.weights[i].shape):
                raise GeneError(f"gene {gene.path}: tensor {n!r} has shape {shape}, target has "
                                f"{tuple(self.weights[i].shape)}")
            self.taus[i] = tau
            if hookable:
                self._hooked.setdefault(mod, []).append((attr, tau, self.key_of[i]))
            else:
                self._space.append(i)
        # a head tied to a selected embedding computes with the embedding's (patched) matrix
        for alias, canon in aliases.items():
            if canon in names:
                i = names.index(canon)
                mod, attr = _module_and_attr(model, alias)
                if isinstance(mod, torch.nn.Linear) and attr == "weight":
                    self._hooked.setdefault(mod, []).append(("weight", self.taus[i], self.key_of[i]))
        self._base = {i: self.weights[i].detach().clone() for i in self._space}
        self._handles: list[Any] = []
        self._lam: Any = None
        self.current: list[float] | None = None
        self._torch = torch

    @property
    def num_keys(self) -> int:
        return len(self.keys)

    # ---- hooks ----------------------------------------------------------------------------
    def _hook(self, entries: list[tuple[str, Any, int]]):
        import torch.nn.functional as F

        def hook(mod, args, out):
            lam = self._lam
            if lam is None:
                return out
            x = args[0]
            delta = None
            for attr, tau, k in entries:
                if isinstance(tau, tuple):  # factored τ = B·A (r × in, out × r)
                    a, b = tau
                    dev = a.device
                    if isinstance(mod, self._torch.nn.Embedding):  # τ[ids] = B[ids]·A
                        d = F.embedding(x.to(dev), b).to(out.dtype) @ a.to(out.dtype)
                    else:  # τx = B(Ax): r-wide intermediate, never the out × in product
                        d = F.linear(F.linear(x.to(dev).to(out.dtype), a.to(out.dtype)), b.to(out.dtype))
                    d = lam[k].to(device=dev, dtype=out.dtype) * d
                    delta = d if delta is None else delta + d
                    continue
                dev = tau.device
                if isinstance(mod, self._torch.nn.Embedding):
                    d = F.embedding(x.to(dev), tau)
                elif attr == "weight":
                    d = F.linear(x.to(dev).to(out.dtype), tau.to(out.dtype))
                else:  # bias
                    d = tau.to(out.dtype).expand_as(out).to(dev)
                d = lam[k].to(device=dev, dtype=out.dtype) * d.to(out.dtype)
                delta = d if delta is None else delta + d
            return out + delta.to(out.device)

        return hook

    def _attach(self) -> None:
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook(e)) for m, e in self._hooked.items()]

    def _space_value(self, i: int, lam: Any) -> Any:
        torch = self._torch
        b = self._base[i]
        t = torch.promote_types(b.dtype, torch.float32)
        return (b.to(t) + lam[self.key_of[i]].to(device=b.device, dtype=t) * self.taus[i].to(t)).to(b.dtype)

    # ---- MergePlan's interface -----------------------------------------------------------
    def bind(self, lam: Any) -> tuple:
        """Make ``lam`` live (autograd flows into it) and return the tensors for ``names``."""
        if lam.numel() != self.num_keys:
            raise UsageError(f"{lam.numel()} coefficients for {self.num_keys} keys {self.keys}")
        self._attach()
        self._lam = lam
        self.current = [float(v) for v in lam.detach().cpu().tolist()]
        space = {i: self._space_value(i, lam) for i in self._space}
        return tuple(space.get(i, w) for i, w in enumerate(self.weights))

    def set(self, lam: Any) -> None:
        """Constant coefficients (no autograd): hooks use them, weight-space tensors are written."""
        torch = self._torch
        vals = [float(v) for v in (lam.detach().cpu().tolist() if hasattr(lam, "detach") else lam)]
        if len(vals) != self.num_keys:
            raise UsageError(f"{len(vals)} coefficients for {self.num_keys} keys {self.keys}")
        dev = self.weights[0].device if self.weights[0].device.type != "meta" else "cpu"
        t = torch.tensor(vals, dtype=torch.float64 if self.weights[0].dtype == torch.float64 else torch.float32,
                         device=dev)
        self._attach()
        self._lam = t
        with torch.no_grad():
            for i in self._space:
                self.weights[i].copy_(self._space_value(i, t))
        self.current = vals

    def restore(self) -> None:
        """Remove the hooks and copy the weight-space tensors back: the model is as it came."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._lam = None
        with self._torch.no_grad():
            for i in self._space:
                self.weights[i].copy_(self._base[i])
        self.current = None

    def nbytes(self) -> dict[str, int]:
        """What the plan holds: τ (storage dtype) and the weight-space copies."""
        return {"tau": sum(sum(f.numel() * f.element_size() for f in t) if isinstance(t, tuple)
                           else t.numel() * t.element_size() for t in self.taus),
                "base_copies": sum(b.numel() * b.element_size() for b in self._base.values())}


MODES = ("exact", "lowmem")


def make_plan(mode: str, model: Any, gene: Any, layers: Sequence[str], per_module: bool = False) -> Any:
    """The plan calibration trains λ through: ``exact`` (weight space, the reference) or ``lowmem``."""
    from .merge import MergePlan

    if mode == "exact":
        return MergePlan(model, gene, layers, per_module=per_module)
    if mode == "lowmem":
        return LowMemPlan(model, gene, layers, per_module=per_module)
    raise UsageError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")


__all__ = ["LowMemPlan", "MODES", "make_plan"]
