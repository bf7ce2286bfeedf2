"""Train one LoRA expert on a task: loss on answer tokens only, a held-out split, a card."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lorahub_plus.encode import answer_forward, answer_loss, collate, encode_examples
from lorahub_plus.library.adapters import WEIGHTS_FILE
from lorahub_plus.library.atomic import atomic_dir, check_output_dir
from lorahub_plus.library.readers import check_number, read_safetensors
from lorahub_plus.library.store import CARD_FILE, EMBEDDINGS_FILE, Card, linear_shapes, save_vectors, shapes_fingerprint
from lorahub_plus.models import base_model_id, embedder_identity, load_base_model, load_embedder
from lorahub_plus.scoring import EvalConfig, score
from lorahub_plus.tasks import Example, Task, expert_split


@dataclass
class TrainConfig:
    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale alpha/r)"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    target_modules: tuple[str, ...] = field(default=("q_proj", "v_proj"), metadata={"help": "modules to adapt"})
    lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate (linear decay, 10% warm-up)"})
    epochs: int = field(default=2, metadata={"help": "passes over the training examples"})
    batch_size: int = field(default=8, metadata={"help": "examples per step"})
    max_train: int = field(default=200, metadata={"help": "training examples used at most"})
    n_test: int = field(default=50, metadata={"help": "held-out test examples (never trained on)"})
    max_length: int = field(default=256, metadata={"help": "tokens per training sequence"})
    seed: int = field(default=0, metadata={"help": "seed of the split, the LoRA init and the shuffling"})
    rslora: bool = field(default=False, metadata={"help": "rank-stabilized LoRA: scale alpha/sqrt(r)"})
    chat: str = field(default="off", metadata={
        "help": "also train on every example asked as a person would, in the base model's chat template: off, "
                "input (the input alone, for answers that stand without the choices) or choices (the choices "
                "listed after it)"})

    def __post_init__(self):
        if isinstance(self.target_modules, str) or not all(isinstance(m, str) for m in self.target_modules):
            raise TypeError(f"`target_modules` must be a list of module names, got {self.target_modules!r}")
        self.target_modules = tuple(self.target_modules)
        for f in fields(self):  # numbers are numbers: a selection file may hold anything
            value, default = getattr(self, f.name), f.default
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise TypeError(f"`{f.name}` must be true or false, got {value!r}")
            elif isinstance(default, (int, float)) and (isinstance(value, bool) or not isinstance(
                    value, int if isinstance(default, int) else (int, float))):
                raise TypeError(f"`{f.name}` must be a {type(default).__name__}, got {value!r}")
        for name in ("rank", "alpha", "epochs", "batch_size", "max_train", "max_length", "n_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        check_number("lr", self.lr)
        check_number("dropout", self.dropout, high=1, low_inclusive=True)
        check_number("seed", self.seed, low_inclusive=True)
        if self.chat not in ("off", "input", "choices"):
            raise ValueError(f"`chat` must be 'off', 'input' or 'choices', got {self.chat!r}")

    def to_dict(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}  # as JSON reads it back


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.rslora,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")


def warmup_schedule(optimizer, steps: int, start: int = 0):
    """transformers' linear schedule: 10% warm-up, then linear decay to 0; `start`: resume at that step."""
    from transformers import get_linear_schedule_with_warmup

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return get_linear_schedule_with_warmup(optimizer, max(1, steps // 10), steps, last_epoch=start - 1)


def fit_answers(model, encoded: list, parameters: list, epochs: int, batch_size: int, lr: float, pad_id: int,
                desc: str, progress: bool = True) -> list[float]:
    """AdamW on `parameters` (10% linear warm-up, then linear decay), loss on answer tokens only; returns the
    loss per step. The caller seeds the order (torch's RNG) and sets train or eval mode (dropout)."""
    steps = epochs * math.ceil(len(encoded) / batch_size)
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    schedule = warmup_schedule(optimizer, steps)
    losses = []
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    for _ in range(epochs):
        for chunk in torch.randperm(len(encoded)).split(batch_size):
            batch = collate([encoded[i] for i in chunk.tolist()], pad_id, model.device)
            loss = answer_loss(*answer_forward(model, batch))
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    bar.close()
    return losses


def train_lora(model, tokenizer, task: Task, train: list[Example], cfg: TrainConfig,
               progress: bool = True) -> tuple[object, list[float]]:
    """Wrap `model` in a fresh LoRA and fit it to `train` (in the task's framing, and asked in the chat template
    too with `cfg.chat`); returns (peft model, loss per step)."""
    from lorahub_plus.prompts import as_chat

    pairs = [(task, ex) for ex in train[: cfg.max_train]]
    chat = as_chat(task, tokenizer, choices=cfg.chat == "choices") if cfg.chat != "off" else None
    pairs += [(chat, ex) for _, ex in pairs] if chat else []
    return fit_lora(model, tokenizer, pairs, cfg, f"training {task.name}", progress)


def fit_lora(model, tokenizer, pairs: list[tuple[Task, Example]], cfg: TrainConfig, desc: str,
             progress: bool = True) -> tuple[object, list[float]]:
    """Wrap `model` in a fresh LoRA and fit it to (task, example) pairs, which may mix tasks."""
    from peft import get_peft_model

    from lorahub_plus.models import quiet_peft

    with torch.random.fork_rng(), quiet_peft():  # seeded LoRA init and order, without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        peft_model = get_peft_model(model, lora_config(cfg))
        encoded = encode_examples(tokenizer, pairs, cfg.max_length)
        peft_model.train()
        losses = fit_answers(peft_model, encoded, [p for p in peft_model.parameters() if p.requires_grad],
                             cfg.epochs, cfg.batch_size, cfg.lr, tokenizer.pad_token_id, desc, progress)
    peft_model.eval()
    return peft_model, losses


def train_expert(task: Task, out_dir, cfg: TrainConfig | None = None, model=None, tokenizer=None,
                 progress: bool = True, overwrite: bool = False) -> Card:
    """Train, measure (expert and base on the same held-out examples) and write a PEFT folder + card.

    The folder appears only when complete; an existing one is refused before training unless it is
    empty or (with overwrite) an earlier expert of ours. `model` is left as it was given.
    """
    cfg = cfg or TrainConfig()
    check_output_dir(Path(out_dir), overwrite)
    if model is None:
        model, tokenizer = load_base_model()
    train, test = expert_split(task, cfg.n_test, cfg.seed)
    n_test = len(test)
    if n_test < 1 or len(train) < 2:
        raise ValueError(f"task `{task.name}` has {len(task.examples)} examples: too few to train and hold out")
    eval_cfg = EvalConfig(n_test=n_test, seed=cfg.seed)
    base_correct = score(model, tokenizer, task, test, cfg=eval_cfg, progress=progress)[0]
    base_fingerprint = shapes_fingerprint(linear_shapes(model))  # before the LoRA layers go in
    start = time.perf_counter()
    peft_model, losses = train_lora(model, tokenizer, task, train, cfg, progress)
    train_seconds = time.perf_counter() - start
    try:
        expert_correct = score(peft_model, tokenizer, task, test, cfg=eval_cfg, progress=progress)[0]
        return save_expert(
            peft_model, Path(out_dir), overwrite, [task.routing_text(ex) for ex in train[: cfg.max_train]],
            description=task.description or task.name, keywords=list(task.keywords), base_model=base_model_id(model),
            base_fingerprint=base_fingerprint, rank=cfg.rank, source_task=task.name, metrics={
                "expert_accuracy": sum(expert_correct) / n_test, "base_accuracy": sum(base_correct) / n_test,
                "n_test": n_test, "n_train": min(len(train), cfg.max_train), "split_seed": cfg.seed,
                "final_loss": sum(losses[-5:]) / len(losses[-5:]), "train_seconds": round(train_seconds, 1),
                "train_config": cfg.to_dict()})
    finally:
        peft_model.unload()


def save_expert(peft_model, out: Path, overwrite: bool, centroid_texts: list[str] | None = None, **card) -> Card:
    """Write `peft_model`'s adapter (fp16), its card (`card`: the fields not read off the weights) and, given
    texts, the centroid of their embeddings to `out`, which appears only when complete."""
    from safetensors.torch import save_file

    with atomic_dir(out, guard=lambda: check_output_dir(out, overwrite)) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        weights = tmp / WEIGHTS_FILE
        save_file({k: v.half().contiguous() for k, v in read_safetensors(weights).items()}, str(weights))
        if centroid_texts:  # the default embedder's, recorded in the file: `Library.add` checks it is the library's
            embedder = load_embedder(None)
            centroid = embedder.encode(centroid_texts, normalize_embeddings=True, convert_to_tensor=True).mean(0)
            save_vectors({"centroid": centroid / centroid.norm()}, tmp / EMBEDDINGS_FILE, embedder_identity(embedder))
        result = Card.of_adapter(tmp, name=out.name, **card)
        (tmp / CARD_FILE).write_text(result.to_json(), encoding="utf-8")
    return result


MULTITASK = "multitask"
"""The library name of the multi-task LoRA."""


def train_multitask(tasks: list[Task], out_dir, cfg: TrainConfig | None = None, per_task: int = 8, model=None,
                    tokenizer=None, progress: bool = True, overwrite: bool = False) -> Card:
    """One LoRA on a mix of `per_task` training examples (each task's training split) of every task: T2L's
    multi-task baseline. Written as a PEFT folder with a card listing its tasks; it has no held-out split
    of its own (its tasks' held-out examples stay untouched)."""
    import random

    cfg = cfg or TrainConfig(epochs=1)
    if per_task < 1 or not tasks:
        raise ValueError(f"`per_task` must be >= 1 and `tasks` not empty, got {per_task} and {len(tasks)} tasks")
    check_output_dir(Path(out_dir), overwrite)
    if model is None:
        model, tokenizer = load_base_model()
    rng = random.Random(cfg.seed)
    pairs = []
    for task in tasks:
        train = expert_split(task, cfg.n_test, cfg.seed)[0]
        pairs += [(task, ex) for ex in rng.sample(train, min(per_task, len(train)))]
    base_fingerprint = shapes_fingerprint(linear_shapes(model))
    start = time.perf_counter()
    peft_model, losses = fit_lora(model, tokenizer, pairs, cfg, f"training multitask ({len(tasks)} tasks)", progress)
    seconds = time.perf_counter() - start
    try:
        return save_expert(
            peft_model, Path(out_dir), overwrite, keywords=["multitask"],
            description=f"A multi-task LoRA trained on a mix of {len(tasks)} BIG-bench tasks: a general adapter "
                        "for tasks no expert covers.",
            base_model=base_model_id(model), base_fingerprint=base_fingerprint, rank=cfg.rank,
            metrics={"training_tasks": [t.name for t in tasks], "n_train": len(pairs), "per_task": per_task,
                     "final_loss": sum(losses[-5:]) / len(losses[-5:]), "train_seconds": round(seconds, 1),
                     "train_config": cfg.to_dict()})
    finally:
        peft_model.unload()


