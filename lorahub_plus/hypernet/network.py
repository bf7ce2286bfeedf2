"""Text-to-LoRA (Charakorn et al. 2025): a hypernetwork that maps a task embedding to a whole LoRA in one pass.

One row per adapted module: [encoded task, embedding of its layer, embedding of its module type], through a
small MLP trunk, then T2L's M head: one linear head per module type, shared by A and B (told apart by a
learned embedding), giving r vectors of max(in, out) numbers; rank i's row of A and column of B come from
the same vector. The head gives z-scores: a tensor is `offset + scale * z`, where offset is the mean of the
library's experts (or one anchor expert, such as the multitask LoRA) and scale one number per tensor (their
spread), so an untrained head gives the average expert (or the anchor) and reconstruction targets are well
scaled. The head starts at zero (T2L's bias-HyperInit).

The task embedding is the library embedder's: of a description, of a few examples (each "input => target",
averaged), or of both, side by side with zeros for what is missing.

Saved in the library as `hypernet/hypernet.safetensors` + `hypernet/hypernet.json` (config, the module
shapes, the base model's fingerprint, the embedder, training tasks and metrics); loading checks them.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from lorahub_plus.version import __version__
from lorahub_plus.errors import LibraryError
from lorahub_plus.library.readers import check_field, check_whole, read_json, read_safetensors

HYPERNET_DIR, HYPERNET_WEIGHTS, HYPERNET_CONFIG = "hypernet", "hypernet.safetensors", "hypernet.json"
LAYER = re.compile(r"\.(\d+)\.")


@dataclass
class HypernetConfig:
    rank: int = field(default=8, metadata={"help": "rank r of the adapters it writes"})
    latent: int = field(default=128, metadata={"help": "width of the trunk (task 1/2, layer 1/4, module type 1/4)"})
    head_in: int = field(default=256, metadata={"help": "width that enters the output heads"})
    dropout: float = field(default=0.05, metadata={"help": "dropout in the trunk while training"})

    def __post_init__(self):
        for name in ("rank", "latent", "head_in"):
            check_whole(name, getattr(self, name))
        if self.latent % 4:
            raise ValueError(f"`latent` must be a multiple of 4, got {self.latent}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}")


def _block(width: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.SiLU(), nn.Dropout(dropout),
                         nn.Linear(4 * width, width), nn.SiLU())


class HyperLoRA(nn.Module):
    """Task embeddings (N, 2 * emb) -> {module: (A (N, r, in), B (N, out, r))} at LoRA scale 1.

    `modules` maps each adapted module's full name to its (in, out); `offsets` each module to the
    (A, B) a zero head gives, and `scales` each module to the (A, B) spread that z-scores are in.
    """

    def __init__(self, cfg: HypernetConfig, emb_dim: int, modules: dict[str, tuple[int, int]],
                 offsets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 scales: dict[str, tuple[float, float]] | None = None):
        super().__init__()
        self.cfg, self.emb_dim, self.shapes = cfg, emb_dim, dict(modules)
        self.types = sorted({name.rsplit(".", 1)[-1] for name in modules})
        depth = [int(m.group(1)) if (m := LAYER.search(name)) else 0 for name in modules]
        self.by_type = {t: [n for n in modules if n.rsplit(".", 1)[-1] == t] for t in self.types}
        d, r = cfg.latent, cfg.rank
        self.task_encoder = nn.Sequential(nn.Linear(2 * emb_dim, d // 2), nn.LayerNorm(d // 2))
        self.layer_emb = nn.Sequential(nn.Embedding(max(depth) + 1, d // 4), nn.LayerNorm(d // 4))
        self.type_emb = nn.Sequential(nn.Embedding(len(self.types), d // 4), nn.LayerNorm(d // 4))
        self.mixer = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d), nn.SiLU())
        self.blocks = nn.ModuleList(_block(d, cfg.dropout) for _ in range(2))
        self.ab_emb = nn.Parameter(torch.randn(2, d))  # M head: A and B share the head, told apart here
        self.to_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, cfg.head_in), nn.SiLU())
        self.heads = nn.ModuleDict({t: nn.Linear(cfg.head_in, r * max(modules[self.by_type[t][0]])) for t in self.types})
        for head in self.heads.values():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        depth_of = dict(zip(modules, depth))
        for t in self.types:
            names = self.by_type[t]
            n_in, n_out = modules[names[0]]
            if any(modules[n] != (n_in, n_out) for n in names):
                raise ValueError(f"modules of type `{t}` differ in shape; one head per type needs one shape")
            self.register_buffer(f"depth_{t}", torch.tensor([depth_of[n] for n in names]), persistent=False)
            A0 = torch.stack([offsets[n][0] for n in names]) if offsets else torch.zeros(len(names), r, n_in)
            B0 = torch.stack([offsets[n][1] for n in names]) if offsets else torch.zeros(len(names), n_out, r)
            self.register_buffer(f"offset_A_{t}", A0)  # (L, r, in)
            self.register_buffer(f"offset_B_{t}", B0)  # (L, out, r)
            self.register_buffer(f"scale_{t}", torch.tensor([list(scales[n]) for n in names]) if scales
                                 else torch.ones(len(names), 2))  # (L, 2)

    def z(self, task: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per module type, the head's z-scores (N, L, 2, r, max(in, out)): index 0 for A, 1 for B."""
        enc = self.task_encoder(task)  # (N, d/2)
        out = {}
        for i, t in enumerate(self.types):
            depth = getattr(self, f"depth_{t}")
            L, N = len(depth), len(task)
            rows = torch.cat([enc[:, None].expand(N, L, -1), self.layer_emb(depth)[None].expand(N, L, -1),
                              self.type_emb(depth.new_tensor([i]))[None].expand(N, L, -1)], dim=-1)  # (N, L, d)
            h = self.mixer(rows)
            for block in self.blocks:
                h = h + block(h)
            h = self.to_head(h[:, :, None] + self.ab_emb)  # (N, L, 2, head_in)
            out[t] = self.heads[t](h).unflatten(-1, (self.cfg.rank, -1))  # (N, L, 2, r, max)
        return out

    def lora(self, z: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """z-scores -> {module: (A (N, r, in), B (N, out, r))}."""
        out = {}
        for t, zt in z.items():
            names = self.by_type[t]
            n_in, n_out = self.shapes[names[0]]
            scale = getattr(self, f"scale_{t}")  # (L, 2)
            A = getattr(self, f"offset_A_{t}") + scale[:, 0, None, None] * zt[:, :, 0, :, :n_in]  # (N, L, r, in)
            B = getattr(self, f"offset_B_{t}") + scale[:, 1, None, None] * zt[:, :, 1, :, :n_out].transpose(-1, -2)
            for j, name in enumerate(names):
                out[name] = (A[:, j], B[:, j])
        return out

    def forward(self, task: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self.lora(self.z(task))


def task_vector(embedder, description: str | None = None, examples: list[tuple[str, str]] | None = None
                ) -> torch.Tensor:
    """The hypernetwork's input (2 * emb,) for one task: see `task_vectors`."""
    return task_vectors(embedder, [(description, examples)])[0]


def task_vectors(embedder, requests: list[tuple[str | None, list[tuple[str, str]] | None]]) -> torch.Tensor:
    """(n, 2 * emb) hypernetwork inputs, one per (description, examples) request, from one embedding call:
    the description's embedding, then the examples' unit mean embedding (each "input => target"), zeros for
    what a request does not give. A routed input is a request of one example with no target."""
    texts, spans = [], []
    for description, examples in requests:
        if not description and not examples:
            raise ValueError("give a `description`, `examples` (input, target pairs), or both")
        spans.append((len(texts), bool(description)))
        texts += ([description] if description else []) + [example_text(i, t) for i, t in examples or []]
    vectors = torch.as_tensor(np.asarray(embedder.encode(texts, normalize_embeddings=True))).float()
    dim, out = vectors.shape[1], torch.zeros(len(requests), 2 * vectors.shape[1])
    for row, ((start, described), end) in enumerate(zip(spans, [s for s, _ in spans[1:]] + [len(texts)])):
        if described:
            out[row, :dim] = vectors[start]
        if end > start + described:
            mean = vectors[start + described:end].mean(0)
            out[row, dim:] = mean / mean.norm().clamp(min=1e-12)
    return out


def embedding_dim(embedder) -> int:
    """The embedder's output width (sentence-transformers renamed the method)."""
    get = getattr(embedder, "get_embedding_dimension", None) or embedder.get_sentence_embedding_dimension
    return get()


def example_text(inp: str, target: str) -> str:
    return f"{inp.strip()} => {target.strip()}"


# -- saving and loading -------------------------------------------------------------------------------
def save_hypernet(library, net: HyperLoRA, meta: dict, extra: dict[str, Path] | None = None) -> Path:
    """library/hypernet/, replaced whole under the library's lock; `extra` files (a loss plot) go beside."""
    import shutil

    meta = {**meta, "config": asdict(net.cfg), "emb_dim": net.emb_dim, "modules": net.shapes,
            "base_model": library.base_model, "fingerprint": library.fingerprint,
            "embedder": library.meta.get("embedder"), "lorahub_plus_version": __version__}
    state = {k: v.detach().half().contiguous() for k, v in net.state_dict().items()}
    with library.artefact(HYPERNET_DIR) as tmp:
        save_file(state, str(tmp / HYPERNET_WEIGHTS))
        (tmp / HYPERNET_CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
        for name, path in (extra or {}).items():
            shutil.copy2(path, tmp / name)
    return library.path / HYPERNET_DIR


def read_hypernet_meta(library, folder: Path | None = None) -> dict:
    """The hypernetwork's `hypernet.json`, refused if it was trained for another base model or embedder (the
    weights are not read: callers that only need its settings, such as the fallback threshold, stay cheap)."""
    folder = Path(folder) if folder else library.path / HYPERNET_DIR
    where = str(folder / HYPERNET_CONFIG)
    if not (folder / HYPERNET_CONFIG).is_file():
        raise LibraryError(f"{folder}: no trained hypernetwork; build one with `lorahub-plus hypernet train`")
    meta = read_json(folder / HYPERNET_CONFIG)
    if meta.get("fingerprint") != library.fingerprint:
        raise LibraryError(f"{where}: trained for another base model (field `fingerprint`); retrain it")
    if meta.get("embedder") != library.meta.get("embedder"):
        raise LibraryError(f"{where}: trained with another embedder (field `embedder`: {meta.get('embedder')!r}, the "
                           f"library uses {library.meta.get('embedder')!r}); retrain it")
    return meta


def load_hypernet(library, folder: Path | None = None) -> tuple[HyperLoRA, dict]:
    """The library's hypernetwork (or the one in `folder`) and its metadata; refused if it was trained for
    another base model or embedder."""
    folder = Path(folder) if folder else library.path / HYPERNET_DIR
    where, meta = str(folder / HYPERNET_CONFIG), read_hypernet_meta(library, folder)
    modules = check_field(meta.get("modules"), dict, where, "modules", LibraryError)
    for name, shape in modules.items():
        check_field(shape, list, where, f"modules.{name}", LibraryError, item=int)
        if library.base_shapes.get(name) != shape:
            raise LibraryError(f"{where}: module `{name}` is {shape}, the base model's is "
                               f"{library.base_shapes.get(name)} (field `modules`)")
    emb_dim = check_field(meta.get("emb_dim"), int, where, "emb_dim", LibraryError)
    if emb_dim != embedding_dim(library.embedder):
        raise LibraryError(f"{where}: field `emb_dim` is {emb_dim}, the library's embedder gives "
                           f"{embedding_dim(library.embedder)}; train a hypernetwork for this library")
    try:
        cfg = HypernetConfig(**check_field(meta.get("config"), dict, where, "config", LibraryError))
        net = HyperLoRA(cfg, emb_dim, {n: tuple(s) for n, s in modules.items()})
    except (TypeError, ValueError) as e:
        raise LibraryError(f"{where}: field `config` or `modules` does not describe a hypernetwork ({e})") from e
    state = read_safetensors(folder / HYPERNET_WEIGHTS)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if {k: tuple(v.shape) for k, v in state.items()} != expected:
        raise LibraryError(f"{folder / HYPERNET_WEIGHTS}: tensors do not match {HYPERNET_CONFIG} (expected "
                           f"{len(expected)} tensors of the shapes its config gives)")
    if not all(torch.isfinite(v).all() for v in state.values()):
        raise LibraryError(f"{folder / HYPERNET_WEIGHTS}: holds NaN or inf")
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net.eval(), meta
