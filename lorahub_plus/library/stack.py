"""Experts stacked per module (for routed forwards) and merged back into one standard PEFT adapter.

Composition, routing and synthesis all read experts this way and write adapters this way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorahub_plus.library.adapters import WEIGHTS_FILE, lora_shapes, rank_and_scale, read_adapter
from lorahub_plus.errors import LibraryError
from lorahub_plus.routed import Merge, lorahub_merge
from lorahub_plus.library.store import Library


@dataclass
class Stack:
    """The candidates' LoRA weights stacked per module: A (K, r, in), B (K, out, r) with scale folded in."""

    names: list[str]
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int

    def select(self, indices: list[int]) -> "Stack":
        """The candidates at `indices`, in that order."""
        return Stack([self.names[i] for i in indices], {m: (A[indices], B[indices]) for m, (A, B) in self.modules.items()},
                     self.rank)


def load_stack(library: Library, names: list[str]) -> Stack:
    """Read candidates of any ranks and modules into one stack: every module any of them adapts, each expert's
    A and B zero-padded to the largest rank (exact: the padding adds nothing) and zeros where an expert does not
    adapt a module; scales (alpha / r, rsLoRA, `rank_pattern` / `alpha_pattern`) are folded into B. A routed
    forward then costs K x max rank per module, whatever the mix of ranks."""
    if not names:
        raise LibraryError(f"{library.path}: no experts to stack (an empty library, or every expert excluded)")
    per_expert = {}
    for name in names:
        path = library.expert_path(name)
        config, weights = read_adapter(path)
        library.check_compatible(lora_shapes(weights, str(path / WEIGHTS_FILE)), str(path))
        tensors = {}
        for key, value in weights.items():
            module, ab = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
            tensors.setdefault(module, {})[ab[0]] = value.float()
        per_expert[name] = {m: (t["A"], t["B"] * rank_and_scale(config, m)[1]) for m, t in tensors.items()}
    return stacked(list(names), list(per_expert.values()), library.base_shapes)


def stacked(names: list[str], experts: list[dict[str, tuple[torch.Tensor, torch.Tensor]]],
            base_shapes: dict[str, list[int]]) -> Stack:
    """A Stack of experts given as {module: (A (r, in), B (out, r))}, padded as `load_stack` says."""
    rank = max(A.shape[0] for e in experts for A, _ in e.values())
    modules = {}
    for module in sorted({m for e in experts for m in e}):
        fan_in, fan_out = base_shapes[module]
        As, Bs = [], []
        for expert in experts:
            A, B = expert.get(module, (torch.zeros(0, fan_in), torch.zeros(fan_out, 0)))
            As.append(torch.cat([A.float(), A.new_zeros(rank - A.shape[0], fan_in).float()]))
            Bs.append(torch.cat([B.float(), B.new_zeros(fan_out, rank - B.shape[1]).float()], 1))
        modules[module] = (torch.stack(As), torch.stack(Bs))
    return Stack(names, modules, rank)


def merged_lora(stack: Stack, w: torch.Tensor, merge: Merge, export_rank: int = 0
                ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int, float]:
    """Per module (A, B) at scale 1, the rank, and the relative SVD truncation error (0 if exact).

    lorahub: A = sum w_k A_k, B = sum w_k B_k (rank r). mixture: A = [w_k A_k], B = [B_k] stacked
    (rank K*r, exact), or its best rank-`export_rank` approximation by SVD.
    """
    out, errors = {}, []
    for i, (module, (A, B)) in enumerate(stack.modules.items()):
        wi = w[i] if w.dim() == 2 else w  # (K,)
        if merge == "lorahub":
            out[module] = lorahub_merge(wi, A, B)
            continue
        A_cat = (wi[:, None, None] * A).flatten(0, 1)  # (K*r, in)
        B_cat = B.permute(1, 0, 2).flatten(1)  # (out, K*r)
        if export_rank and export_rank < A_cat.shape[0]:
            delta = B_cat @ A_cat  # (out, in)
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            A_cat, B_cat = Vh[:export_rank], U[:, :export_rank] * S[:export_rank]
            errors.append(float(S[export_rank:].square().sum().sqrt() / S.square().sum().sqrt().clamp(min=1e-12)))
        out[module] = (A_cat, B_cat)
    rank = next(iter(out.values()))[0].shape[0]
    return out, rank, max(errors, default=0.0)


def save_peft_adapter(lora: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, base_model: str, out: Path) -> None:
    """A standard PEFT LoRA folder (alpha = r, so scale 1) that PeftModel.from_pretrained loads as is."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted({m.rsplit(".", 1)[-1] for m in lora}),
                        lora_dropout=0.0, task_type="CAUSAL_LM", base_model_name_or_path=base_model)
    config.save_pretrained(str(out))
    tensors = {}
    for module, (A, B) in lora.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.contiguous().float()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.contiguous().float()
    save_file(tensors, str(out / WEIGHTS_FILE))
