"""Experts stacked in each adapted linear layer and mixed inside the forward pass, per row or per token.

`RoutedModel` wraps a causal LM. A call may carry `routes`: weights per row (B, K), or per row and
adapted module (B, M, K), one row per input, or `Rows` (those weights, the rows the router decides,
and one more LoRA per row), checked and expanded as peft does for `adapter_names` (`generate` repeats
each input's rows for beams or returned sequences; any other row count is refused). Without routes, the
model's router, if any, computes the weights in every layer from the hidden state that enters it: one
vector for all rows (K,), per row (B, K) or per token, (B, T, K) or sparse (`TopK`, each token's k experts).
So routing is part of the forward pass: nothing is set on the model between calls.

    mixture: delta = sum_k w_k B_k A_k x                 (exact output-space mixture)
    lorahub: delta = (sum_k w_k B_k)(sum_k w_k A_k) x   (LoraHub's merge, cross terms included)
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Literal, NamedTuple

import torch
from torch import nn

Merge = Literal["lorahub", "mixture"]
GATHER_ELEMENTS = 2**19
"""Per-token routing gathers the factors of this many elements (2 MB fp32) at a time: larger temporaries are
allocated afresh and may page-fault on every call (seen in scratch timings, not in a committed benchmark)."""
GROUPED_PAIRS = 48
"""Per-token routing runs expert by expert (each expert's tokens through its own factors) once the (token, expert)
pairs average this many per expert, as in a long prefill: a fixed cost per expert then undercuts gathering every
pair's factors (the crossover comes from scratch timings, not from a committed benchmark)."""
FEW_EXPERTS = 4
"""Per-token routing runs one matmul over every expert any token chose when there are at most this many per
expert a token keeps (a module that few experts of a mixed library adapt): no gathering at all."""


def lorahub_merge(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LoraHub's merged factors (sum_k w_k A_k, sum_k w_k B_k), for w (K,) or one row per input (rows, K)."""
    return torch.einsum("...k,kri->...ri", w, A), torch.einsum("...k,kor->...or", w, B)


class TopK(NamedTuple):
    """Sparse weights, as a per-token router returns them: `weights` (..., k) on the experts `indices` (..., k)
    of `n`, every other expert 0. A routed layer computes only those experts without densifying first."""

    indices: torch.Tensor
    weights: torch.Tensor
    n: int

    def dense(self) -> torch.Tensor:
        return self.weights.new_zeros(*self.weights.shape[:-1], self.n).scatter(-1, self.indices, self.weights)


def top_k(scores: torch.Tensor, k: int, temperature: float) -> TopK:
    """Softmax over the k largest scores of the last dimension; every other weight exactly 0."""
    top, idx = scores.topk(min(k, scores.shape[-1]), dim=-1)
    return TopK(idx, torch.softmax(top / temperature, dim=-1), scores.shape[-1])


def top_k_softmax(scores: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """`top_k` as dense weights."""
    return top_k(scores, k, temperature).dense()


class ConstantRouter(nn.Module):
    """The same weights for every row and token: a fixed composition, (K,) or one vector per module (M, K)."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.register_buffer("weights", weights.detach().float())

    def layer(self, index: int) -> nn.Module:
        return _Constant(self.weights if self.weights.dim() == 1 else self.weights[index])


class _Constant(nn.Module):
    """One routed layer's share of a ConstantRouter (a view of its weights until the layer moves elsewhere)."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.register_buffer("weights", weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights


class RouterSet(nn.Module):
    """Several routers in one model (a server's `route:arrow` and `route:gate` rows in one batch): a call's
    `Rows.auto` names each row's, 1 for the first; without routes, the first decides."""

    def __init__(self, routers: list[nn.Module]):
        super().__init__()
        self.routers = nn.ModuleList(routers)

    def layer(self, index: int) -> nn.Module:
        return _LayerSet([router.layer(index) for router in self.routers])


class _LayerSet(nn.Module):
    def __init__(self, pieces: list[nn.Module]):
        super().__init__()
        self.pieces = nn.ModuleList(pieces)

    def forward(self, x: torch.Tensor):
        return self.pieces[0](x)


@dataclass
class Rows:
    """One call's routing, an entry per input row: expert `weights` (B, K) or (B, M, K); `auto` (B,), the
    rows whose weights the model's router computes instead (bool; or int, which router of a `RouterSet`, 1 for
    the first, 0 for none); `adapters`, one more LoRA per row added to the
    mixture, {module: (A (B, r, in), B (B, out, r))} at scale 1 with zeros for rows without one (a
    synthesized adapter for a request no expert is close to). Indexing selects rows, as evaluate batches."""

    weights: torch.Tensor
    auto: torch.Tensor | None = None
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def __getitem__(self, index) -> "Rows":
        return Rows(self.weights[index], None if self.auto is None else self.auto[index],
                    None if self.adapters is None else {m: (A[index], B[index]) for m, (A, B) in self.adapters.items()})

    def __len__(self) -> int:
        return len(self.weights)


class _Routes:
    """One call's per-row weights, the rows that the router decides instead (`auto`), the per-row adapters by
    layer index (A (B, r, in), B (B, r, out)), and what every layer and decoding step would otherwise redo:
    whether the weights are sparse, and each layer's factors built from them."""

    def __init__(self, weights: torch.Tensor, auto: torch.Tensor | None, adapters: dict | None, routers=()):
        self.weights, self.auto, self.adapters, self.factors = weights, auto, adapters, {}
        self.routers = routers  # the routers `auto` names (1 for the first), found once, not in every layer
        self.sparse = not weights.requires_grad and _sparse(weights)


class RoutedLoRALinear(nn.Module):
    """base(x) + the experts' deltas, mixed by the call's routes or by `router`, this layer's share of the model's
    router (its gate, its Arrow prototypes, its constant weights), kept here so it follows the layer's device.

    The experts' factors are packed: each expert's rows at its own rank here, one after another, none for an
    expert that does not adapt this module, so memory and a dense mixture's cost grow with the sum of the ranks
    that adapt the module, not with experts x the largest rank. `slots` finds an expert's rows (padded with a
    zero row up to the largest rank here) for the paths that gather a few experts."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, merge: Merge, index: int):
        super().__init__()
        self.base, self.merge, self.index = base, merge, index
        self.router: nn.Module | None = None
        nonzero = (A != 0).any(-1)  # (K, r): an expert's rank here, its padding cut (0: it does not adapt this module)
        ranks = torch.where(nonzero.any(-1), A.shape[1] - nonzero.flip(-1).int().argmax(-1), 0)
        keep = torch.arange(A.shape[1], device=A.device) < ranks[:, None]  # (K, r): the rows kept, packed in order
        slots = torch.full(keep.shape, int(keep.sum()), dtype=torch.long, device=A.device)  # default: the zero row
        slots[keep] = torch.arange(int(keep.sum()), device=A.device)
        self.register_buffer("ranks", ranks, persistent=False)  # (K,)
        width = int(ranks.max()) if len(ranks) else 0  # the largest rank here
        self.register_buffer("slots", slots[:, :width].contiguous(), persistent=False)  # (K, r): packed rows
        self.register_buffer("owner", keep.nonzero()[:, 0], persistent=False)  # (R,): each packed row's expert
        self.register_buffer("position", keep.nonzero()[:, 1], persistent=False)  # (R,): its place in that rank
        self.register_buffer("A", torch.cat([A[keep], A.new_zeros(1, A.shape[2])]))  # (R + 1, in), a zero row last
        self.register_buffer("B", torch.cat([B.transpose(1, 2)[keep], B.new_zeros(1, B.shape[1])]))  # (R + 1, out):
        # rows of B_k^T, each expert's scale folded in
        self._merged: tuple | None = None  # (key of the weights, LoraHub factors) for a router's (K,)

    def forward(self, x: torch.Tensor, routes: _Routes | None = None) -> torch.Tensor:
        out = self.base(x)
        router = self.router
        if routes is None and router is None:
            return out
        if routes is not None:
            if routes.factors.get(self.index, ()) is None and routes.adapters is None:
                return out  # none of the rows' experts adapts this module (found at the call's first step)
            w = routes.weights if routes.weights.dim() == 2 else routes.weights[:, self.index]  # (B, K)
            if len(w) != len(x):
                raise ValueError(f"`routes` has {len(w)} rows, the batch {len(x)}: one row per input")
            if routes.auto is not None:  # mixed batch: these rows follow the router (of a RouterSet, the one named)
                if router is None:
                    raise ValueError("`auto` rows need a model with a router")
                pieces = router.pieces if isinstance(router, _LayerSet) else [router]
                for i in routes.routers:
                    w = _take_rows(w, routes.auto == i, _as_dense(pieces[i - 1](x)).to(w.device, w.dtype))
        else:
            w = router(x)  # (K,), (B, K), (B, T, K) or a per-token TopK
        x = x.to(self.A.dtype)
        w = TopK(w.indices, w.weights.to(self.A.dtype), w.n) if isinstance(w, TopK) else w.to(x.device, self.A.dtype)
        delta = self._delta(x, w, routes)  # None: no chosen expert adapts this module
        if routes is not None and routes.adapters is not None:
            extra = _low_rank(x, *routes.adapters[self.index])
            delta = extra if delta is None else delta + extra
        return out if delta is None else out + delta.to(out.dtype)

    def _delta(self, x: torch.Tensor, w: torch.Tensor | TopK, routes: _Routes | None) -> torch.Tensor:
        if isinstance(w, TopK) or w.dim() == 3:  # per token
            if self.merge == "lorahub":
                raise ValueError("per-token weights need merge='mixture'; LoraHub merges once per weight vector")
            return self._token_mixture(x, w)
        if self.merge == "lorahub" and w.dim() == 1:  # merged once per weight vector (a router's (K,))
            key = (w.data_ptr(), w._version, w.dtype, w.device, self.A.data_ptr())
            if self._merged is None or self._merged[0] != key:
                self._merged = key, self.merged(w)
            A, B = self._merged[1]  # (r, in), (out, r)
            return (x @ A.T) @ B.T
        fixed = routes is not None and routes.auto is None  # w is the call's own weights
        if w.dim() == 2 and (self.merge == "lorahub" or (
                routes.sparse if fixed else not w.requires_grad and _sparse(w))):
            factors = self._row_factors(w, routes)
            if factors is None:
                return None
            rows, A, B = factors
            if rows is None:
                return _low_rank(x, A, B)
            return x.new_zeros(*x.shape[:-1], B.shape[-1]).index_add_(0, rows, _low_rank(x[rows], A, B))
        return self._dense(x, w if w.dim() == 1 else w[:, None])

    def _row_factors(self, w: torch.Tensor, routes: _Routes | None) -> tuple | None:
        """Per-row weights (B, K) as one low-rank adapter a row, A (b, r', in) and B (b, r', out), built once per
        call, not at every decoding step: LoraHub's merged factors (r' = r), or the row's chosen experts stacked
        (r' = k r, A scaled by their weights), so only those experts are computed, at the largest rank among
        them (not the library's). Only the rows whose experts adapt this module: (rows or None for all, A, B);
        None for no row. Not cached when a router decides some rows: their weights change with every step."""
        cache = routes.factors if routes is not None and routes.auto is None else {}
        if self.index not in cache:
            idx, ws = _chosen(w)  # (B, k)
            ranks = self.ranks[idx]
            rows = ranks.amax(-1).nonzero().flatten()
            if len(rows) == 0:
                cache[self.index] = None
                return None
            rows, rank = (None if len(rows) == len(idx) else rows), int(ranks.max())
            if rows is not None:
                idx, ws = idx[rows], ws[rows]
            A, B = self._factors(idx, rank)  # (b, k, rank, in), (b, k, rank, out)
            cache[self.index] = rows, *(
                (torch.einsum("bk,bkri->bri", ws, A), torch.einsum("bk,bkro->bro", ws, B)) if self.merge == "lorahub"
                else ((A * ws[..., None, None]).flatten(1, 2), B.flatten(1, 2)))
        return cache[self.index]

    def merged(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LoraHub's merged factors for w (K,) or (rows, K), as peft holds them: sum_k w_k A_k (..., r, in) and
        sum_k w_k B_k (..., out, r)."""
        scale = w[..., self.owner, None]  # (..., R, 1)
        A, Bt = (f.new_zeros(*w.shape[:-1], self.slots.shape[1], f.shape[1]).index_add_(
            w.dim() - 1, self.position, scale * f[:-1]) for f in (self.A, self.B))
        return A, Bt.transpose(-1, -2)

    def _factors(self, idx: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts idx (...) at rank r: A (..., r, in) and B^T (..., r, out), zero rows past an expert's rank."""
        slots = self.slots[idx, :r]
        return self.A[slots], self.B[slots]

    def _dense(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
        """sum_k w_k B_k A_k x over the packed rows: (x A^T) scaled by each row's expert weight, then one matmul."""
        if len(self.owner) == 0:
            return None
        return ((x @ self.A[:-1].T) * w[..., self.owner]) @ self.B[:-1]

    def _token_mixture(self, x: torch.Tensor, w: torch.Tensor | TopK) -> torch.Tensor:
        """Per-token weights (B, T, K) or TopK: dense while gradients flow to the weights (a gate in training) or
        when tokens keep many experts; else only the chosen (token, expert) pairs: each token gathers its experts'
        factors (index_select, a product-sum and one bmm, with no Python loop over experts; the weights scale the
        (N, k, r) product, since repeating them r times costs more than the product itself), in chunks of tokens
        whose gathered factors stay under GATHER_ELEMENTS; for many tokens, expert by expert (GROUPED_PAIRS); when
        few experts are chosen at all, one matmul over them (FEW_EXPERTS)."""
        if isinstance(w, TopK):
            if w.weights.requires_grad:
                return self._dense(x, w.dense())
            idx, ws = w.indices.flatten(0, 1), w.weights.flatten(0, 1)  # (N, k)
        elif w.requires_grad or not _sparse(w):
            return self._dense(x, w)
        else:
            idx, ws = _chosen(w.flatten(0, 1))
        rank = int(self.ranks[idx].max())  # the chosen experts' largest rank here
        if rank == 0:
            return None
        flat_x = x.flatten(0, 1)  # (N, in)
        k, n_experts, d_in = idx.shape[1], len(self.ranks), self.A.shape[1]
        experts = idx[self.ranks[idx] > 0].unique()  # the chosen experts that adapt this module
        if len(experts) <= FEW_EXPERTS * k:
            return self._few(flat_x, idx, ws, experts, rank).view(*x.shape[:-1], -1)
        if idx.numel() >= GROUPED_PAIRS * n_experts:
            return self._grouped(flat_x, idx, ws).view(*x.shape[:-1], -1)
        step = max(1, GATHER_ELEMENTS // (k * rank * max(d_in, self.B.shape[1])))
        out = self._gathered(flat_x, idx, ws, rank) if len(idx) <= step else torch.cat(
            [self._gathered(flat_x[s:s + step], idx[s:s + step], ws[s:s + step], rank)
             for s in range(0, len(idx), step)])
        return out.view(*x.shape[:-1], -1)

    def _few(self, x: torch.Tensor, idx: torch.Tensor, ws: torch.Tensor, experts: torch.Tensor, r: int) -> torch.Tensor:
        """(N, out): tokens x (N, in) through all of `experts` at rank r in two matmuls, each token's weights
        zero for those it did not choose (the ones that adapt nothing here fall in a dropped last column)."""
        column = torch.full((len(self.ranks),), len(experts), dtype=torch.long, device=idx.device)
        column[experts] = torch.arange(len(experts), device=idx.device)
        w = x.new_zeros(len(x), len(experts) + 1).scatter_add_(1, column[idx], ws)[:, :-1]  # (N, U)
        A, B = self._factors(experts, r)
        h = (x @ A.flatten(0, 1).T).view(len(x), len(experts), r) * w[..., None]
        return h.flatten(1) @ B.flatten(0, 1)

    def _grouped(self, x: torch.Tensor, idx: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
        """(N, out): tokens x (N, in) sorted by expert, each expert's tokens through its factors in two small
        matmuls, added back to their rows."""
        pairs = idx.flatten().argsort(stable=True)  # (token, expert) pairs, pair p = token p // k
        tokens, weights = pairs // idx.shape[1], ws.flatten()[pairs]
        out, start, row = x.new_zeros(len(x), self.B.shape[1]), 0, 0
        for count, rank in zip(torch.bincount(idx.flatten(), minlength=len(self.ranks)).tolist(), self.ranks.tolist()):
            if count and rank:  # this expert's packed rows are row .. row + rank
                rows, w = tokens[start:start + count], weights[start:start + count, None]
                out.index_add_(0, rows, ((x[rows] @ self.A[row:row + rank].T) * w) @ self.B[row:row + rank])
            start, row = start + count, row + rank
        return out

    def _gathered(self, x: torch.Tensor, idx: torch.Tensor, ws: torch.Tensor, r: int) -> torch.Tensor:
        """(N, out): tokens x (N, in), each through its experts idx (N, k) weighted by ws (N, k), at rank r."""
        (n, k), d_in, d_out = idx.shape, self.A.shape[1], self.B.shape[1]
        slots = self.slots[:, :r].index_select(0, idx.flatten()).flatten()  # (N k r) packed rows
        A = self.A.index_select(0, slots).view(n, k * r, d_in)
        h = (A * x[:, None, :]).sum(-1).view(n, k, r) * ws[..., None]  # (N, k, r)
        B = self.B.index_select(0, slots).view(n, k * r, d_out)
        return torch.bmm(h.view(n, 1, k * r), B).view(n, d_out)


def _take_rows(w: torch.Tensor, rows: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """w (B, K) or (B, T, K) with `rows` (B,) bool replaced by a router's r: (K,), (B, K) or (B, T, K)."""
    r = r.expand(len(w), -1) if r.dim() == 1 else r
    if r.dim() != w.dim():
        w, r = (w[:, None, :].expand_as(r), r) if r.dim() == 3 else (w, r[:, None, :].expand_as(w))
    return torch.where(rows.view(-1, *[1] * (w.dim() - 1)), r, w)


def _low_rank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """x (B, T, in) through one low-rank adapter per row, A (B, r, in) and B (B, r, out)."""
    return torch.bmm(torch.bmm(x, A.transpose(1, 2)), B)


def _as_dense(w: torch.Tensor | TopK) -> torch.Tensor:
    return w.dense() if isinstance(w, TopK) else w


def _sparse(w: torch.Tensor) -> bool:
    """Few enough nonzero weights per row (or token) that gathering them beats the dense mixture."""
    return int((w != 0).sum(-1).max()) * 2 <= w.shape[-1]


def _chosen(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights) of each row's nonzero experts, as many per row as the fullest row has: (B, k) each."""
    k = max(int((w != 0).sum(-1).max()), 1)
    idx = w.abs().topk(k, dim=-1).indices
    return idx, w.gather(-1, idx)


def _pass_routes(module, args, kwargs, routes):
    kwargs["routes"] = routes
    return args, kwargs


def check_bare(model: nn.Module) -> None:
    """Refuse a model whose layers already carry adapters (a RoutedModel not yet removed, a PeftModel not
    unloaded): stacking on them would wrap a wrapper."""
    busy = next((n for n, m in model.named_modules() if isinstance(m, RoutedLoRALinear) or hasattr(m, "lora_A")), None)
    if busy is not None:
        raise ValueError(f"the model already carries adapters (module `{busy}`): call `.remove()` on the RoutedModel "
                         "(or Router) or `.unload()` on the PeftModel that holds them first")


class RoutedModel(nn.Module):
    """A causal LM whose named linear layers carry stacked experts; `remove()` gives the model back.

    A `router` gives each routed layer its share, `router.layer(index)`, a module that maps the layer's input to
    weights; the layer holds it, on its own device (a model split across devices stays split)."""

    def __init__(self, model: nn.Module, stacks: dict[str, tuple[torch.Tensor, torch.Tensor]], merge: Merge = "mixture",
                 router: nn.Module | None = None):
        super().__init__()
        if merge not in ("lorahub", "mixture"):
            raise ValueError(f"`merge` must be 'lorahub' or 'mixture', got {merge!r}")
        check_bare(model)
        self.model, self.router = model, router
        self.layers: dict[str, RoutedLoRALinear] = {}
        self._originals: dict[str, nn.Linear] = {}
        try:
            for index, (name, (A, B)) in enumerate(stacks.items()):
                parent, child = self._parent(name)
                base = getattr(parent, child)
                device, dtype = base.weight.device, base.weight.dtype
                layer = RoutedLoRALinear(base, A.to(dtype), B.to(dtype), merge, index).to(device)  # packed where A is
                setattr(parent, child, layer)
                self.layers[name], self._originals[name] = layer, base
            self._attach(router)
        except BaseException:
            self.remove()  # never leave a half-routed model behind
            raise

    def _attach(self, router: nn.Module | None) -> None:
        """Each layer takes its share of `router`, moved to the layer's device in place (`Module.to`): a router
        shared by two models on different devices follows the last one attached."""
        for layer in self.layers.values():
            layer.router = None if router is None else router.layer(layer.index).to(layer.A.device)

    def _parent(self, name: str) -> tuple[nn.Module, str]:
        parent_name, _, child = name.rpartition(".")
        return self.model.get_submodule(parent_name), child

    @property
    def n_experts(self) -> int:
        return len(next(iter(self.layers.values())).ranks)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def config(self):
        return self.model.config

    def forward(self, *args, routes: torch.Tensor | Rows | None = None, **kwargs):
        with self._routed(routes, 1):
            return self.model(*args, **kwargs)

    def generate(self, *args, routes: torch.Tensor | Rows | None = None, **kwargs):
        config = kwargs.get("generation_config") or self.model.generation_config
        beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
        returned = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1
        with self._routed(routes, beams if beams > 1 else returned):  # the factor HF repeats each input by
            return self.model.generate(*args, **kwargs)

    @contextmanager
    def _routed(self, routes, repeat: int):
        if routes is None:
            yield
            return
        rows = routes if isinstance(routes, Rows) else Rows(torch.as_tensor(routes))
        routes, auto = torch.as_tensor(rows.weights), rows.auto
        K, M = self.n_experts, len(self.layers)
        if routes.dim() not in (2, 3) or routes.shape[-1] != K or (routes.dim() == 3 and routes.shape[1] != M):
            raise ValueError(f"`routes` must be (rows, {K}) or (rows, {M}, {K}) weights, got {tuple(routes.shape)}")
        if not torch.isfinite(routes).all():
            raise ValueError("`routes` holds NaN or inf")
        first = next(iter(self.layers.values())).A
        if auto is not None:
            auto = torch.as_tensor(auto).long()
            n = len(self.router.routers) if isinstance(self.router, RouterSet) else 1
            if auto.shape != routes.shape[:1] or (len(auto) and (auto.min() < 0 or auto.max() > n)):
                raise ValueError(f"`auto` must be one bool per row of `routes` ({len(routes)}) or the number of a "
                                 f"router of the model's {n}, got {auto.tolist()}")
            present = sorted(set(auto.tolist()) - {0})
            auto = auto.to(first.device).repeat_interleave(repeat, 0) if present else None
        state = _Routes(routes.to(first.device, first.dtype).repeat_interleave(repeat, 0), auto,
                        self._row_adapters(rows.adapters, len(routes), repeat), present if auto is not None else ())
        handles = [layer.register_forward_pre_hook(partial(_pass_routes, routes=state), with_kwargs=True)
                   for layer in self.layers.values()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _row_adapters(self, adapters: dict | None, n: int, repeat: int) -> dict | None:
        """{layer index: (A (rows, r, in), B^T (rows, r, out))} on the layers' device and dtype, rows repeated as
        the routes are."""
        if adapters is None:
            return None
        if set(adapters) != set(self.layers):
            raise ValueError(f"`Rows.adapters` must give every routed module ({len(self.layers)}), got {len(adapters)}")
        out = {}
        for name, layer in self.layers.items():
            A, B = adapters[name]
            d_in, d_out = layer.A.shape[1], layer.B.shape[1]
            if A.dim() != 3 or B.dim() != 3 or len(A) != n or len(B) != n or A.shape[2] != d_in \
                    or B.shape[1] != d_out or A.shape[1] != B.shape[2]:
                raise ValueError(f"`Rows.adapters[{name!r}]` must be A ({n}, r, {d_in}) and B ({n}, {d_out}, r), "
                                 f"got {tuple(A.shape)} and {tuple(B.shape)}")
            out[layer.index] = tuple(t.to(layer.A.device, layer.A.dtype).repeat_interleave(repeat, 0)
                                     for t in (A, B.transpose(1, 2)))
        return out

    @contextmanager
    def routing(self, router: nn.Module):
        """Inside the block the model routes with `router` (a gate being fitted), then with its own again."""
        own = self.router
        self.set_router(router)
        try:
            yield self
        finally:
            self.set_router(own)

    def set_router(self, router: nn.Module | None) -> None:
        """Route with `router` from now on (each layer takes its share); None: only a call's routes."""
        self.router = router
        self._attach(router)

    @torch.no_grad()
    def module_weights(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(M, K) the router's weights in each routed module, averaged over the batch's real tokens."""
        seen, mask = {}, attention_mask.bool()

        def record(layer, args, out):
            w = _as_dense(layer.router(args[0].to(layer.A.dtype)))
            seen[layer.index] = (w if w.dim() != 2 else w[:, None]).expand(*mask.shape, -1)[mask].mean(0)

        hooks = [layer.register_forward_hook(record) for layer in self.layers.values()]
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
        finally:
            for hook in hooks:
                hook.remove()
        return torch.stack([seen[i] for i in range(len(self.layers))])

    def remove(self) -> nn.Module:
        for name, base in self._originals.items():
            self.layers[name].router = None
            setattr(*self._parent(name), base)
        self.layers.clear()
        self._originals.clear()
        return self.model
