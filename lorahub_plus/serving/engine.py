"""Continuous batching for the server: requests for different experts, mixtures and routers decode together,
one batched forward per step, each row routed its own way (`Rows`). A request joins the batch at the next step
(its prompt prefilled, its KV cache merged in, left-padded), and leaves it when it stops; tokens go to its
channel as they are decoded."""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from lorahub_plus.models import cache_kwarg
from lorahub_plus.routed import Rows


class QueueFull(Exception):
    """More requests than the batch and the waiting queue hold."""


@dataclass
class Request:
    prompt_ids: list[int]
    weights: torch.Tensor  # (K,) expert weights; ignored where `auto`
    auto: int  # 0: `weights`; i: the model's i-th per-token router decides (1: arrow, 2: the gate)
    max_tokens: int
    emit: Callable[[str, object], None]  # ("delta", text) ... then ("done", {finish_reason, usage})
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # decode `max_tokens` whatever comes (benchmarks, as vLLM's `ignore_eos`)
    lora: dict | None = None  # {module: (A (r, in), B (out, r))}: one more adapter for this row (a LoraHub merge)
    generated: list[int] = field(default_factory=list)
    sent: str = ""
    cancelled: bool = False
    generator: torch.Generator | None = None


class Engine:
    """One thread that owns the routed model. `submit` queues a request; `close` stops the thread."""

    def __init__(self, model, tokenizer, max_batch: int = 16, max_waiting: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_waiting = max_batch, max_waiting
        ends = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos = {tokenizer.eos_token_id, *(ends if isinstance(ends, list) else [ends] if ends is not None else [])}
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.active: list[Request] = []
        self.cache = self.mask = None
        self.steps = self.batched_rows = 0  # decoding steps and rows over them: the mean batch size
        self._stop, self._wake = threading.Event(), threading.Event()
        self._cache_kw = cache_kwarg(model)
        self._rows_before: list[Request] = []  # the rows the cache holds, in its order
        self._joining: list[Request] = []  # taken off the queue this step, not yet in the cache
        self.lock = threading.RLock()  # held while a step runs: a caller holding it may swap the model
        self.thread = threading.Thread(target=self._run, name="lorahub-plus-engine", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> None:
        if self.waiting.qsize() + len(self.active) + len(self._joining) >= self.max_batch + self.max_waiting:
            raise QueueFull(f"{self.max_batch} requests decode and {self.max_waiting} wait already")
        if request.seed is not None:
            request.generator = torch.Generator().manual_seed(request.seed)
        self.waiting.put(request)
        self._wake.set()

    def idle(self) -> bool:
        """Nothing decoding or waiting; a step under way (its requests off the queue, not yet active) is busy."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            return not self.active and self.waiting.empty()
        finally:
            self.lock.release()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)

    # -- the loop ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.active and self.waiting.empty():
                self._wake.wait(0.05)  # set by `submit`
                self._wake.clear()
                continue
            with self.lock, torch.no_grad():
                try:
                    self._step()
                except Exception as e:  # a bad batch fails its own requests, never the server nor the queue
                    for r in self.active + self._joining:
                        r.emit("error", f"{type(e).__name__}: {e}")
                    self.active, self._joining, self._rows_before, self.cache, self.mask = [], [], [], None, None

    def _drain(self, n: int | None = None) -> list[Request]:
        out = []
        while (n is None or len(out) < n) and not self.waiting.empty():
            try:
                out.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        return out

    def _step(self) -> None:
        alive = [i for i, r in enumerate(self._rows_before) if not r.cancelled]  # read once: clients leave any time
        self.active = [self._rows_before[i] for i in alive]
        if not self.active:
            self.cache = self.mask = None
        elif len(self.active) < len(self.mask):
            self._keep(alive)
        joining = self._joining = [r for r in self._drain(self.max_batch - len(self.active)) if not r.cancelled]
        logits = None
        if joining:
            logits_new, cache, mask = self._prefill(joining)
            if self.active:
                logits = self._decode_active()  # the rows already running take their step first
                self._merge(cache, mask)
                logits = torch.cat([logits, logits_new])
            else:
                self.cache, self.mask, logits = cache, mask, logits_new
            self.active = self.active + joining
        elif self.active:
            logits = self._decode_active()
        self._rows_before, self._joining = list(self.active), []
        if logits is not None:
            self._sample(logits)

    def _routes(self, requests: list[Request]) -> Rows:
        weights = torch.stack([r.weights for r in requests])
        auto = torch.tensor([r.auto for r in requests])
        own = next((r.lora for r in requests if r.lora is not None), None)
        adapters = None if own is None else {  # zeros for the rows without an adapter of their own
            m: tuple(torch.stack([r.lora[m][i] if r.lora is not None else torch.zeros_like(own[m][i])
                                  for r in requests]) for i in (0, 1)) for m in own}
        return Rows(weights, auto if auto.any() else None, adapters)

    def _prefill(self, requests: list[Request]):
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, r in enumerate(requests):  # left padding: every prompt ends at the last column
            ids[row, width - len(r.prompt_ids):], mask[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids), 1
        from transformers import DynamicCache

        cache = DynamicCache()
        device = self.model.device
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                         position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=True,
                         logits_to_keep=1, routes=self._routes(requests), **{self._cache_kw: cache})
        return out.logits[:, -1].float().cpu(), cache, mask

    def _decode_active(self) -> torch.Tensor:
        last = torch.tensor([[r.generated[-1]] for r in self.active])
        self.mask = torch.cat([self.mask, torch.ones(len(self.active), 1, dtype=torch.long)], dim=1)
        device = self.model.device
        out = self.model(input_ids=last.to(device), attention_mask=self.mask.to(device),
                         position_ids=(self.mask.sum(-1, keepdim=True) - 1).to(device), use_cache=True,
                         logits_to_keep=1, routes=self._routes(self.active), **{self._cache_kw: self.cache})
        self.steps += 1
        self.batched_rows += len(self.active)
        return out.logits[:, -1].float().cpu()

    def _merge(self, cache, mask) -> None:
        """The joining rows' cache under the running rows', both left-padded to one width."""
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(mask, width)])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_kv(mine.keys, width), _pad_kv(theirs.keys, width)])
            mine.values = torch.cat([_pad_kv(mine.values, width), _pad_kv(theirs.values, width)])

    def _keep(self, rows: list[int]) -> None:
        """Only these rows stay; columns that none of them uses any more go."""
        index = torch.tensor(rows, dtype=torch.long)
        self.mask = self.mask[index]
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if len(used) else self.mask.shape[1]
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, start:]
            layer.values = layer.values[index.to(layer.values.device), :, start:]

    def _sample(self, logits: torch.Tensor) -> None:
        for r, row in zip(self.active, logits):
            token = _pick(row, r.temperature, r.top_p, r.generator)
            r.generated.append(token)
            text = self.tokenizer.decode([t for t in r.generated if t not in self.eos], skip_special_tokens=True)
            reason = "stop" if token in self.eos and not r.ignore_eos else None
            cut = min((text.find(s) for s in r.stop if s in text), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
            elif reason is None and len(r.generated) >= r.max_tokens:
                reason = "length"
            ready = text if reason else text[: len(text) - _held(text, r.stop)]
            if not ready.endswith("\ufffd") or reason:  # half a character waits for its other bytes
                if ready[len(r.sent):]:
                    r.emit("delta", ready[len(r.sent):])
                r.sent = ready
            if reason:
                r.emit("done", {"finish_reason": reason, "prompt_tokens": len(r.prompt_ids),
                                "completion_tokens": len(r.generated)})
                r.cancelled = True  # leaves the batch at the next step


def _held(text: str, stops: tuple[str, ...]) -> int:
    """How many last characters of `text` could begin a stop string: not sent until the next tokens decide."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    if temperature < 1e-5:  # greedy (a tinier temperature overflows the softmax)
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros(len(mask), width - mask.shape[1]), mask], dim=1)


def _pad_kv(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([x.new_zeros(*x.shape[:2], width - x.shape[2], x.shape[3]), x], dim=2)


def wait_idle(engine: Engine, timeout: float = 30.0) -> bool:
    """Whether the engine ran dry within `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if engine.idle():
            return True
        time.sleep(0.01)
    return False
