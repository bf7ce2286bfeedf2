"""Every candidate LoRA stacked in one module, so a new weight vector costs no merge or copy.

Weights may be one vector for the batch (K,), one per adapted module (M, K), or one per batch row
(B, K): the last serves batched composition (a row per candidate) and per-input routing alike.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Merge = Literal["lorahub", "mixture"]


def lorahub_merge(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LoraHub's merged factors (sum_k w_k A_k, sum_k w_k B_k), for w (K,) or one row per input (rows, K)."""
    return torch.einsum("...k,kri->...ri", w, A), torch.einsum("...k,kor->...or", w, B)


class StackedLoRALinear(nn.Module):
    """base(x) + delta(x) with K stacked experts.

    lorahub: delta = (sum_k w_k B_k)(sum_k w_k A_k) x   (LoraHub's merge, cross terms included)
    mixture: delta = sum_k w_k B_k A_k x                 (exact output-space mixture)
    """

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, merge: Merge):
        super().__init__()
        self.base, self.merge = base, merge
        self.register_buffer("A", A)  # (K, r, in)
        self.register_buffer("B", B)  # (K, out, r), each expert's LoRA scale folded in
        self.weights: torch.Tensor | None = None  # (K,) or (rows, K); set by FusedLoRAModel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        w = self.weights
        if w is None:
            return out
        w = w.to(x.device, x.dtype)
        if w.dim() == 1:
            if self.merge == "lorahub":
                A, B = lorahub_merge(w, self.A, self.B)  # (r, in), (out, r)
                return out + (x @ A.T) @ B.T
            h = torch.einsum("...i,kri->...kr", x, self.A)  # (..., K, r)
            return out + torch.einsum("...kr,kor,k->...o", h, self.B, w)
        if self.merge == "lorahub":  # w: (rows, K), x: (rows, T, in)
            A, B = lorahub_merge(w, self.A, self.B)  # (rows, r, in), (rows, out, r)
            return out + torch.einsum("btr,bor->bto", torch.einsum("bti,bri->btr", x, A), B)
        h = torch.einsum("bti,kri->btkr", x, self.A)  # (rows, T, K, r)
        return out + torch.einsum("btkr,kor,bk->bto", h, self.B, w)


class FusedLoRAModel:
    """Injects StackedLoRALinear into `model` for the given experts; `remove()` restores it."""

    def __init__(self, model: nn.Module, stacks: dict[str, tuple[torch.Tensor, torch.Tensor]], merge: Merge):
        self.model, self.merge = model, merge
        self.modules: dict[str, StackedLoRALinear] = {}
        self._originals: dict[str, nn.Linear] = {}
        for name, (A, B) in stacks.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child)
            device, dtype = base.weight.device, base.weight.dtype
            stacked = StackedLoRALinear(base, A.to(device, dtype), B.to(device, dtype), merge)
            setattr(parent, child, stacked)
            self.modules[name], self._originals[name] = stacked, base

    @property
    def n_experts(self) -> int:
        return next(iter(self.modules.values())).A.shape[0]

    def set_weights(self, w: torch.Tensor | None) -> None:
        """w: (K,) for every row, or (rows, K) one vector per batch row; None switches experts off."""
        for module in self.modules.values():
            module.weights = w

    def set_module_weights(self, w: torch.Tensor) -> None:
        """w: (M, K), one weight vector per adapted module, in `self.modules` order."""
        for module, row in zip(self.modules.values(), w):
            module.weights = row

    def remove(self) -> nn.Module:
        for name, base in self._originals.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, base)
        self.modules.clear()
        return self.model
