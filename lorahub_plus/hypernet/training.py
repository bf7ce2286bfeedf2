"""Training the hypernetwork: reconstruct the library's experts, then fine-tune end to end (SFT) through the
frozen base model on many tasks, loss on answer tokens (T2L's two objectives; SFT is what gives zero-shot
adapters). SFT may start from an anchor expert instead (`anchor`: the multitask LoRA), so that the
hypernetwork learns per-task corrections to a LoRA that already helps on unseen tasks. Every step draws its
tasks from (seed, step), so a resumed run repeats exactly what an uninterrupted one does; checkpoints
(safetensors + JSON) land atomically in a work folder.

Training tasks: every task file of the data folder except the held-out tasks, their families (BIG-bench's
parent task; in natural_instructions, the dataset a subtask comes from) and any task whose description
is as close as NEAR_DUPLICATE to theirs; at most `per_family` tasks a family, so that the big generated
families do not drown the rest. Conditioning is augmented: the description, the name, the keywords and
templates of them, and example sets drawn from the training split. `validation` holds whole families out of
that set, so that checkpoints are chosen on families training never saw, as a user's new task is.
"""
from __future__ import annotations

import json
import logging
import random
import re
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lorahub_plus.library.atomic import LEFTOVER, atomic_file
from lorahub_plus.encode import answer_forward, answer_loss, collate, encode_examples
from lorahub_plus.errors import LibraryError, OutputPathError
from lorahub_plus.hypernet.network import HypernetConfig, HyperLoRA, embedding_dim, example_text, save_hypernet
from lorahub_plus.library.readers import check_field, check_number, check_whole, read_json, read_safetensors
from lorahub_plus.models import frozen
from lorahub_plus.routed import RoutedModel
from lorahub_plus.tasks import Task, expert_split, family, load_task
from lorahub_plus.library.train import warmup_schedule
from lorahub_plus.plots import plot_losses

logger = logging.getLogger(__name__)
NEAR_DUPLICATE = 0.9
"""Description cosine at or above which a task counts as a near-duplicate of a held-out task."""
CHECKPOINT, BEST = "checkpoint", "best.safetensors"


@dataclass
class HypernetTrainConfig:
    objective: Literal["reconstruction", "sft", "both"] = field(default="both", metadata={
        "help": "reconstruction: of the library's experts; sft: end to end on tasks; both: the first, then the second"})
    recon_steps: int = field(default=400, metadata={"help": "reconstruction steps"})
    sft_steps: int = field(default=500, metadata={"help": "SFT steps"})
    tasks_per_step: int = field(default=8, metadata={"help": "tasks per step (SFT: one example each, as in T2L)"})
    recon_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of reconstruction"})
    sft_lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate of SFT"})
    reg: float = field(default=1e-3, metadata={"help": "SFT: weight of mean z^2 (keeps adapters near the experts')"})
    max_length: int = field(default=128, metadata={"help": "tokens per SFT sequence"})
    per_family: int = field(default=4, metadata={"help": "training tasks a family, at most"})
    example_sets: int = field(default=4, metadata={"help": "example sets drawn per task for example conditioning"})
    shots: int = field(default=5, metadata={"help": "examples per example set"})
    checkpoint_every: int = field(default=25, metadata={"help": "steps between checkpoints"})
    seed: int = field(default=0, metadata={"help": "seed of the task draw, the steps and the init"})
    anchor: str = field(default="", metadata={
        "help": "library expert that a zero head gives (T2L's bias-HyperInit from a trained LoRA, such as the "
                "multitask one; SFT's z^2 term then keeps adapters near it); empty: the experts' mean"})
    validation: int = field(default=0, metadata={
        "help": "training families held out to validate on: the loss on their held-out examples from the "
                "description alone, at every checkpoint; the checkpoint where it is lowest is the one saved"})

    def __post_init__(self):
        if self.objective not in ("reconstruction", "sft", "both"):
            raise ValueError(f"`objective` must be 'reconstruction', 'sft' or 'both', got {self.objective!r}")
        for name in ("recon_steps", "sft_steps", "tasks_per_step", "max_length", "per_family", "example_sets",
                     "shots", "checkpoint_every"):
            check_whole(name, getattr(self, name))
        check_whole("validation", self.validation, low=0)
        check_number("recon_lr", self.recon_lr)
        check_number("sft_lr", self.sft_lr)
        check_number("reg", self.reg, low_inclusive=True)

    @property
    def phases(self) -> list[str]:
        return {"both": ["reconstruction", "sft"]}.get(self.objective, [self.objective])


# -- tasks and their conditioning --------------------------------------------------------------------
def descriptions(task: Task) -> list[str]:
    """The conditioning texts of a task: its description, name and keywords, alone and in templates."""
    words = re.sub(r"[_:.\-]+", " ", task.name).strip()
    keywords = ", ".join(task.keywords)
    texts = [task.description, words, f"{words}: {task.description}", f"{task.description} Keywords: {keywords}.",
             f"{words}: {task.description} Keywords: {keywords}.", f"A task about {keywords}." if keywords else ""]
    return list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))


def select_tasks(data: Path, held_out: set[str], per_family: int, seed: int, embedder) -> dict[str, Task]:
    """{task-file stem: task} to train on, by stem: none held out, of a held-out family, or a near-duplicate of
    a held-out task; at most `per_family` of a family."""
    files = {p.stem: p for p in sorted(Path(data).glob("*.json"))}
    banned = {family(n) for n in held_out}
    tasks = {n: load_task(p) for n, p in files.items() if n not in held_out and family(n) not in banned}
    pool = [n for n, t in tasks.items() if len(expert_split(t)[0]) >= 10]
    held = [n for n in sorted(held_out) if n in files]
    if held and pool:
        held_desc = embedder.encode([load_task(files[n]).description or n for n in held], normalize_embeddings=True)
        pool_desc = embedder.encode([tasks[n].description or n for n in pool], normalize_embeddings=True)
        close = (pool_desc @ held_desc.T).max(1) >= NEAR_DUPLICATE
        pool = [n for n, c in zip(pool, close) if not c]
    rng, by_family = random.Random(seed), {}
    for n in pool:
        by_family.setdefault(family(n), []).append(n)
    return {n: tasks[n] for n in sorted(n for names in by_family.values()
                                         for n in rng.sample(names, min(per_family, len(names))))}


def split_validation(tasks: dict[str, Task], families: int, seed: int) -> tuple[dict[str, Task], dict[str, Task]]:
    """(train, validation): `families` whole families drawn from `tasks`, so that validation, like a user's new
    task, is of a family training never saw."""
    names = sorted({family(n) for n in tasks})
    if families and families >= len(names):
        raise ValueError(f"`validation` must leave a family to train on: {families} of {len(names)} families")
    held = set(random.Random(f"{seed}:validation").sample(names, families))
    return ({n: t for n, t in tasks.items() if family(n) not in held},
            {n: t for n, t in tasks.items() if family(n) in held})


def training_tasks(data: Path, held_out: set[str], cfg: HypernetTrainConfig, embedder
                   ) -> tuple[dict[str, Task], dict[str, Task]]:
    """(train, validation) tasks of a hypernetwork run (`select_tasks`, then `split_validation`); the multitask
    baseline trains on the same."""
    return split_validation(select_tasks(data, held_out, cfg.per_family, cfg.seed, embedder), cfg.validation,
                            cfg.seed)


def trained_on(library, name: str) -> set[str]:
    """Task-file stems an expert saw: its source task, and a multitask LoRA's recorded training tasks."""
    card = library.card(name)
    tasks = check_field(card.metrics.get("training_tasks", []), list, str(library.expert_path(name) / "card.json"),
                        "metrics.training_tasks", LibraryError, item=str)
    return {t.replace(":", "__") for t in [card.source_task, *tasks] if t}


@dataclass
class TrainingTask:
    name: str
    task: Task
    train: list
    descriptions: torch.Tensor  # (V, emb)
    example_sets: torch.Tensor  # (S, emb)


def prepare(tasks: dict[str, Task], embedder, cfg: HypernetTrainConfig, progress: bool = True
            ) -> list[TrainingTask]:
    """Embed each task's conditioning texts once."""
    out = []
    for name, task in tqdm(tasks.items(), desc="embedding tasks", disable=not progress, leave=False):
        train = expert_split(task)[0]
        rng = random.Random(f"{cfg.seed}:{name}")
        sets = [rng.sample(train, min(cfg.shots, len(train))) for _ in range(cfg.example_sets)]
        texts = descriptions(task)
        vectors = embedder.encode(texts + [example_text(e.input, e.target) for s in sets for e in s],
                                  normalize_embeddings=True, convert_to_tensor=True).float().cpu()
        per_set = vectors[len(texts):].view(len(sets), -1, vectors.shape[-1]).mean(1)
        out.append(TrainingTask(name, task, train, vectors[:len(texts)],
                                per_set / per_set.norm(dim=-1, keepdim=True).clamp(min=1e-12)))
    return out


def conditioning(t: TrainingTask, rng: random.Random) -> torch.Tensor:
    """One task vector: description only (half the time), examples only, or both."""
    draw, zero = rng.random(), torch.zeros(t.descriptions.shape[-1])
    desc = t.descriptions[rng.randrange(len(t.descriptions))] if draw < 0.5 or draw >= 0.75 else zero
    examples = t.example_sets[rng.randrange(len(t.example_sets))] if draw >= 0.5 else zero
    return torch.cat([desc, examples])


# -- the two objectives ------------------------------------------------------------------------------
def expert_statistics(stack) -> tuple[dict, dict]:
    """Offsets (the experts' mean A and B) and scales (their spread, one number per tensor)."""
    if len(stack.names) < 2:
        raise LibraryError("the hypernetwork needs at least 2 experts with source tasks: their mean and spread "
                           "set its output scale")
    offsets, scales = {}, {}
    for module, (A, B) in stack.modules.items():
        offsets[module] = (A.mean(0), B.mean(0))
        scales[module] = (float((A - A.mean(0)).std().clamp(min=1e-8)), float((B - B.mean(0)).std().clamp(min=1e-8)))
    return offsets, scales


def recon_targets(net: HyperLoRA, stack) -> dict[str, torch.Tensor]:
    """Per module type, the experts' z-scores (K, L, 2, r, max(in, out)), zero where a tensor is narrower."""
    out = {}
    for t in net.types:
        names = net.by_type[t]
        n_in, n_out = net.shapes[names[0]]
        scale = getattr(net, f"scale_{t}")
        z = torch.zeros(len(stack.names), len(names), 2, net.cfg.rank, max(n_in, n_out))
        for j, name in enumerate(names):
            A, B = stack.modules[name]  # (K, r, in), (K, out, r)
            z[:, j, 0, :, :n_in] = (A - getattr(net, f"offset_A_{t}")[j]) / scale[j, 0]
            z[:, j, 1, :, :n_out] = ((B - getattr(net, f"offset_B_{t}")[j]) / scale[j, 1]).transpose(-1, -2)
        out[t] = z
    return out


def recon_loss(net: HyperLoRA, z_pred: dict, targets: dict, rows: list[int]) -> torch.Tensor:
    """Mean squared error of the z-scores over every real (not padded) number."""
    total, count = 0.0, 0
    for t, z in z_pred.items():
        names = net.by_type[t]
        n_in, n_out = net.shapes[names[0]]
        target = targets[t][rows]
        total = total + (z[..., 0, :, :n_in] - target[..., 0, :, :n_in]).square().sum() \
            + (z[..., 1, :, :n_out] - target[..., 1, :, :n_out]).square().sum()
        count += z.shape[0] * z.shape[1] * net.cfg.rank * (n_in + n_out)
    return total / count


def recon_error(net: HyperLoRA, stack, vectors: torch.Tensor) -> float:
    """Mean over experts and modules of |B A - B* A*| / |B* A*|, each expert from its own task vector."""
    with torch.no_grad():
        lora = net.eval()(vectors)
        errors = []
        for module, (A_t, B_t) in stack.modules.items():
            A, B = lora[module]
            delta, target = B @ A, B_t @ A_t  # (K, out, in)
            errors.append((delta - target).flatten(1).norm(dim=1) / target.flatten(1).norm(dim=1).clamp(min=1e-12))
    return float(torch.stack(errors).mean())


def routed_loss(net: HyperLoRA, model, tokenizer, vectors: torch.Tensor, encoded: list) -> tuple[torch.Tensor, dict]:
    """(answer-token loss, z-scores) of encoded examples, each row run with the adapter generated from its vector."""
    z = net.z(vectors.to(next(net.parameters()).device))
    routed = RoutedModel(model, net.lora(z), "mixture")  # K = the batch's adapters, one per row
    try:
        batch = collate(encoded, tokenizer.pad_token_id, model.device)
        return answer_loss(*answer_forward(routed, batch, routes=torch.eye(len(encoded)))), z
    finally:
        routed.remove()


def sft_loss(net: HyperLoRA, model, tokenizer, batch_tasks: list[TrainingTask], rng: random.Random,
             cfg: HypernetTrainConfig) -> torch.Tensor:
    """Answer-token loss of one example per task, each row run with the adapter generated for its task."""
    vectors = torch.stack([conditioning(t, rng) for t in batch_tasks])
    examples = [rng.choice(t.train) for t in batch_tasks]
    encoded = encode_examples(tokenizer, [(t.task, ex) for t, ex in zip(batch_tasks, examples)], cfg.max_length)
    loss, z = routed_loss(net, model, tokenizer, vectors, encoded)
    return loss + cfg.reg * sum(v.square().mean() for v in z.values()) / len(z)


VALIDATION_EXAMPLES = 4
"""Held-out examples per validation task."""


def validation_batches(tasks: dict[str, Task], embedder, tokenizer, cfg: HypernetTrainConfig
                       ) -> list[tuple[torch.Tensor, list]]:
    """Fixed (task vectors, encoded examples) batches of `tasks_per_step` rows: each validation task's
    description alone (the zero-shot use) and VALIDATION_EXAMPLES of its held-out split."""
    pairs = [(task, ex) for task in tasks.values()
             for ex in expert_split(task)[1][:VALIDATION_EXAMPLES]]
    vectors = embedder.encode([task.description or task.name for task, _ in pairs], normalize_embeddings=True,
                              convert_to_tensor=True).float().cpu()
    vectors = torch.cat([vectors, torch.zeros_like(vectors)], dim=1)
    encoded, n = encode_examples(tokenizer, pairs, cfg.max_length), cfg.tasks_per_step
    return [(vectors[i:i + n], encoded[i:i + n]) for i in range(0, len(pairs), n)]


def validation_loss(net: HyperLoRA, model, tokenizer, batches: list) -> float:
    """Mean answer-token loss over the validation batches with the adapters `net` generates (dropout off)."""
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            return sum(routed_loss(net, model, tokenizer, *batch)[0].item() for batch in batches) / len(batches)
    finally:
        net.train(was)


def base_validation_loss(model, tokenizer, batches: list) -> float:
    """The same loss with no adapter: the reference a useful hypernetwork must beat."""
    with torch.no_grad():
        return sum(answer_loss(*answer_forward(model, collate(encoded, tokenizer.pad_token_id, model.device))).item()
                   for _, encoded in batches) / len(batches)


# -- the loop, with checkpoints ----------------------------------------------------------------------
def _save_checkpoint(work: Path, net: HyperLoRA, optimizer, state: dict) -> None:
    tensors = {f"net.{k}": v.detach().contiguous() for k, v in net.state_dict().items()}
    for i, s in optimizer.state_dict()["state"].items():
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v).contiguous() for k, v in s.items()})
    with atomic_file(work / f"{CHECKPOINT}.safetensors") as tmp:
        save_file(tensors, str(tmp))
    with atomic_file(work / f"{CHECKPOINT}.json") as tmp:  # written second: it names a complete weights file
        tmp.write_text(json.dumps(state) + "\n")


def _load_checkpoint(work: Path, net: HyperLoRA, state: dict) -> tuple[dict, dict]:
    """(training state, optimizer tensors by parameter index) from `work`, or what was given if none is there."""
    if not (work / f"{CHECKPOINT}.json").is_file():
        return state, {}
    saved = read_json(work / f"{CHECKPOINT}.json")
    if saved.get("key") != state["key"]:
        raise LibraryError(f"{work / CHECKPOINT}.json: a checkpoint of another run (its settings, tasks or experts "
                           "differ); give a new work folder, or delete this one to start over")
    tensors = read_safetensors(work / f"{CHECKPOINT}.safetensors")
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    opt = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            opt.setdefault(int(i), {})[name] = v
    return saved, opt


WORK_FILES = frozenset({f"{CHECKPOINT}.json", f"{CHECKPOINT}.safetensors", BEST, "loss.png"})
"""What a run writes in its work folder."""


def check_work_dir(work: Path) -> None:
    """Refuse, before any work, a work folder holding files a run did not write: checkpoints land there."""
    if work.exists() and not work.is_dir():
        raise OutputPathError(f"{work}: `work` is an existing file; give a folder")
    foreign = sorted(p.name for p in work.iterdir() if p.name not in WORK_FILES and not LEFTOVER.match(p.name)) \
        if work.is_dir() else []
    if foreign:
        raise OutputPathError(f"{work}: `work` holds files a hypernetwork run did not write ({', '.join(foreign[:5])}); "
                              "give a new or empty folder, or the work folder of an earlier run to resume it")


def run_phases(net: HyperLoRA, phases: dict, cfg: HypernetTrainConfig, work: Path, key: str,
               progress: bool = True, validate=None, reference=None) -> dict:
    """Run each phase (name -> (steps, lr, loss of a step given its rng)) in order, resuming from `work`.
    Returns the state: the losses per phase and the seconds spent. With `validate` (a function giving the
    validation loss), it is measured before a phase and at every checkpoint, the lowest one's weights are kept
    in `work` and the net ends with them (state `validation` and `best`); `reference` (the loss to beat) is
    measured once, and a resumed run reads it from the state."""
    work.mkdir(parents=True, exist_ok=True)
    state, opt_state = _load_checkpoint(work, net, {"key": key, "phase": None, "step": 0, "losses": {}, "seconds": 0.0,
                                                    "validation": {}, "best": None, "reference": None})
    if reference and state.get("reference") is None:
        state["reference"] = round(reference(), 5)

    def check(phase: str, step: int) -> None:
        loss = round(validate(), 5)
        state["validation"].setdefault(phase, []).append([step, loss])
        if state["best"] is None or loss < state["best"]["loss"]:
            state["best"] = {"phase": phase, "step": step, "loss": loss}
            with atomic_file(work / BEST) as tmp:  # before the checkpoint that names it
                save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(tmp))
    for name, (steps, lr, step_loss) in phases.items():
        if name in state["losses"] and state["phase"] != name:
            continue  # finished earlier
        start = state["step"] if state["phase"] == name else 0
        state.update(phase=name, step=start)
        losses = state["losses"].setdefault(name, [])
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
        if start and opt_state:
            saved = optimizer.state_dict()
            saved["state"] = opt_state
            optimizer.load_state_dict(saved)
        opt_state = {}
        net.train()
        if validate and not start:
            check(name, 0)
        schedule = warmup_schedule(optimizer, steps, start)
        bar = tqdm(total=steps, initial=start, desc=f"hypernet {name}", disable=not progress, leave=False)
        began = time.perf_counter()
        for step in range(start, steps):
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout, as the step's draw: the same on resume
                loss = step_loss(random.Random(f"{cfg.seed}:{name}:{step}"))
                loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 5))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update()
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
                if validate:
                    check(name, step + 1)
                state.update(step=step + 1, seconds=state["seconds"] + time.perf_counter() - began)
                began = time.perf_counter()
                _save_checkpoint(work, net, optimizer, state)
        bar.close()
        state.update(phase=None, step=0)
    if validate:
        net.load_state_dict(read_safetensors(work / BEST))
    net.eval()
    return state


def build_hypernet(library, model, tokenizer, data: Path, held_out: set[str], work: Path,
                   cfg: HypernetConfig | None = None, train_cfg: HypernetTrainConfig | None = None,
                   progress: bool = True) -> Path:
    """Train the library's hypernetwork (resuming from `work`) and save it there: `hypernet train`."""
    from lorahub_plus.library.stack import load_stack

    cfg, train_cfg = cfg or HypernetConfig(), train_cfg or HypernetTrainConfig()
    check_work_dir(Path(work))
    experts = [c.name for c in library.cards() if c.source_task and c.rank == cfg.rank]
    teachers = experts + ([train_cfg.anchor] if train_cfg.anchor else [])
    leaked = sorted(n for n in teachers if trained_on(library, n) & held_out)
    if leaked:
        raise LibraryError(f"{library.path}: experts {leaked} were trained on held-out tasks; they cannot teach the "
                           "hypernetwork")
    stack = load_stack(library, experts)
    offsets, scales = expert_statistics(stack)
    if train_cfg.anchor:
        anchor = load_stack(library, [train_cfg.anchor])
        if anchor.rank != cfg.rank or set(anchor.modules) != set(stack.modules):
            raise LibraryError(f"{library.expert_path(train_cfg.anchor)}: the anchor (field `anchor`) needs rank "
                               f"{cfg.rank} on the experts' {len(stack.modules)} modules; it has rank {anchor.rank} "
                               f"on {len(anchor.modules)}")
        offsets = {m: (A[0], B[0]) for m, (A, B) in anchor.modules.items()}
    modules = {m: tuple(library.base_shapes[m]) for m in stack.modules}
    embedder = library.embedder
    with torch.random.fork_rng():
        torch.manual_seed(train_cfg.seed)
        net = HyperLoRA(cfg, embedding_dim(embedder), modules, offsets, scales)
    selected, validating = training_tasks(data, held_out, train_cfg, embedder)
    sources = [library.card(n).source_task.replace(":", "__") for n in experts]
    expert_tasks = prepare({n: selected.get(n) or load_task(Path(data) / f"{n}.json") for n in sources}, embedder,
                           train_cfg, progress)
    phases = {}
    if "reconstruction" in train_cfg.phases:
        targets = recon_targets(net, stack)

        def recon_step(rng):
            rows = [rng.randrange(len(experts)) for _ in range(train_cfg.tasks_per_step)]
            vectors = torch.stack([conditioning(expert_tasks[i], rng) for i in rows])
            return recon_loss(net, net.z(vectors), targets, rows)
        phases["reconstruction"] = (train_cfg.recon_steps, train_cfg.recon_lr, recon_step)
    if "sft" in train_cfg.phases:
        sft_tasks = prepare(selected, embedder, train_cfg, progress)

        def sft_step(rng):
            return sft_loss(net, model, tokenizer, rng.sample(sft_tasks, min(train_cfg.tasks_per_step, len(sft_tasks))),
                            rng, train_cfg)
        phases["sft"] = (train_cfg.sft_steps, train_cfg.sft_lr, sft_step)
    key = json.dumps([asdict(cfg), asdict(train_cfg), list(selected), experts, library.fingerprint,
                      [library.card(n).sha256 for n in teachers]])  # a replaced expert or anchor: another run
    with frozen(model):  # only the hypernetwork learns
        validate, reference = None, None
        if validating:
            batches = validation_batches(validating, embedder, tokenizer, train_cfg)
            validate = partial(validation_loss, net, model, tokenizer, batches)
            reference = partial(base_validation_loss, model, tokenizer, batches)
        state = run_phases(net, phases, train_cfg, Path(work), key, progress, validate, reference)
    base_loss = state.get("reference")
    own = torch.stack([torch.cat([t.descriptions[0], torch.zeros_like(t.descriptions[0])]) for t in expert_tasks])
    plot = Path(work) / "loss.png"
    plot_losses({f"hypernet {k}": v for k, v in state["losses"].items()}
                | {f"validation {k} (base model {base_loss})": v for k, v in state["validation"].items()}, plot)
    meta = {"training_tasks": list(selected), "reconstruction_experts": experts, "held_out": sorted(held_out),
            "train_config": asdict(train_cfg), "losses": state["losses"],
            "metrics": {"reconstruction_error": round(recon_error(net, stack, own), 4),
                        "train_seconds": round(state["seconds"], 1), "n_training_tasks": len(selected)},
            "validation": {"families": sorted({family(n) for n in validating}), "tasks": list(validating),
                           "examples_per_task": VALIDATION_EXAMPLES, "base_model_loss": base_loss,
                           "curve": state["validation"], "best": state["best"]} if validating else None}
    return save_hypernet(library, net, meta, {"loss.png": plot})
