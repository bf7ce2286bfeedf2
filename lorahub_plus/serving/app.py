"""An OpenAI-compatible server over a library (`lorahub-plus serve`): completions and chat completions whose
`model` names the base model, an expert, a router (`auto`, `route:retrieval`, `route:arrow`, `route:gate`) or, with the
`adapters` extension field, a per-request mixture of experts; requests decode together (`engine`)."""
from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import time
import uuid
from pathlib import Path

import torch
from fastapi import Request as HttpRequest

from lorahub_plus.serving.engine import Engine, QueueFull, Request
from lorahub_plus.hub import Hub
from lorahub_plus.version import __version__

FINGERPRINT = f"lorahub-plus-{__version__}-{socket.gethostname()}-{os.getpid()}"
"""The `system_fingerprint` of every answer: which server process (which Ray replica) gave it."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class Server:
    """The library's experts and routers, one engine, and the checks every request passes."""

    def __init__(self, hub: Hub, max_batch: int = 16, max_waiting: int = 64):
        self.hub = hub
        self.base_id = self.hub.library.base_model
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.engine: Engine | None = None
        self._load()

    def _load(self) -> None:
        """The routed model over every expert now in the library, with its per-token routers, decided inside the
        batched forward (`Rows.auto` names each row's): arrow, and the gate when the library has one trained for
        these experts. `auto` and `route:retrieval` pick each input's closest expert before it."""
        from lorahub_plus.errors import LibraryError
        from lorahub_plus.routed import RouterSet
        from lorahub_plus.routing.gate import load_gate
        from lorahub_plus.routing.routers import RetrievalRouter, RouterConfig

        router = self.hub.router("arrow", fallback="never")
        self.names = list(router.names)
        routers, self.no_gate = {"arrow": router.impl}, None
        try:
            gate, trained = load_gate(self.hub.library, [layer.A.shape[1] for layer in router.model.layers.values()])
            if trained != self.names:  # the library changed between the two reads
                raise LibraryError(f"{self.hub.library.path}: the gate was trained for other experts; retrain it")
            routers["gate"] = gate
        except LibraryError as e:  # no gate, or one trained for other experts: `route:gate` says why
            self.no_gate = str(e)
        self._key = self._library_key()
        router.model.set_router(RouterSet(list(routers.values())))
        self.per_token = list(routers)
        self.retrieval = RetrievalRouter(self.hub.library, self.names, None, RouterConfig(k=1))
        if self.engine is None:
            self.engine = Engine(router.model, self.hub.tokenizer, self.max_batch, self.max_waiting)
        else:
            self.engine.model = router.model

    def _library_key(self) -> tuple:
        """What the served model depends on: the library folder (every write adds, removes or renames an entry of
        it, which changes its mtime) and the gate's files (a gate trained while serving); a few stats a request."""
        from lorahub_plus.routing.gate import GATE_CONFIG, GATE_DIR, GATE_WEIGHTS

        path = self.hub.library.path
        return [(p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else None
                for p in (path, *(path / GATE_DIR / f for f in (GATE_CONFIG, GATE_WEIGHTS)))]

    def refresh(self) -> None:
        """Take experts added or removed, or a gate trained, since: rebuilt between steps, when nothing decodes."""
        if self._library_key() != self._key and self.engine.idle():
            with self.engine.lock:
                if self.engine.idle():
                    self.hub.close()
                    self._load()

    def models(self) -> list[str]:
        return [self.base_id, "auto", "route:retrieval", *(f"route:{r}" for r in self.per_token), *self.names,
                *self.hub.library.compositions()]

    # -- a request's route ---------------------------------------------------------------------------
    def route(self, model: str, adapters, routing_text: str, chat: bool = False) -> tuple[torch.Tensor, int, list[dict]]:
        """(expert weights (K,), which per-token router decides (0: none, i: the i-th of `per_token`), the experts
        and weights to report). `chat`: a chat completion, routed as `RetrievalRouter.plain_routes` says."""
        K = len(self.names)
        if adapters is not None:
            return self._mixture(adapters)
        if model in (self.base_id, "none"):
            return torch.zeros(K), 0, []
        if model in ("auto", "route:retrieval"):
            w = (self.retrieval.plain_routes if chat else self.retrieval.routes)([routing_text])[0]
            return w, 0, [{"name": self.names[i], "weight": round(float(w[i]), 4)} for i in w.nonzero().flatten()]
        if model.startswith("route:") and model[6:] in self.per_token:
            return torch.zeros(K), self.per_token.index(model[6:]) + 1, [{"router": model[6:], "per_token": True}]
        if model == "route:gate":
            raise ApiError(404, f"model 'route:gate' is not served: {self.no_gate}", "model", "not_found_error")
        if model in self.names:
            w = torch.zeros(K)
            w[self.names.index(model)] = 1.0
            return w, 0, [{"name": model, "weight": 1.0}]
        composition = self.hub.library.compositions().get(model)
        if composition is not None:
            return self._mixture(composition["weights"])
        raise ApiError(404, f"model {model!r} does not exist; GET /v1/models lists them", "model", "not_found_error")

    def _mixture(self, adapters) -> tuple[torch.Tensor, int, list[dict]]:
        if not isinstance(adapters, dict) or not adapters:
            raise ApiError(400, "`adapters` must be an object of expert names and weights", "adapters")
        w = torch.zeros(len(self.names))
        for name, weight in adapters.items():
            if name not in self.names:
                raise ApiError(400, f"`adapters`: no expert named {name!r} in the library", "adapters")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not _finite(weight):
                raise ApiError(400, f"`adapters`: the weight of {name!r} must be a finite number", "adapters")
            w[self.names.index(name)] = float(weight)
        return w, 0, [{"name": n, "weight": float(v)} for n, v in adapters.items()]

    def request(self, body: dict, prompt_ids: list[int], routing_text: str, emit,
                chat: bool = False) -> tuple[Request, list[dict]]:
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "`model` must be a string", "model")
        merge = body.get("merge", "mixture")
        if merge not in ("mixture", "lorahub"):
            raise ApiError(400, "`merge` must be 'mixture' (sum_k w_k B_k A_k) or 'lorahub' ((sum_k w_k B_k)(sum_k "
                           "w_k A_k))", "merge")
        if merge == "lorahub" and body.get("adapters") is None:
            raise ApiError(400, "`merge`: 'lorahub' merges the experts of an `adapters` mixture; give one", "merge")
        weights, auto, explain = self.route(model, body.get("adapters"), routing_text, chat)
        lora = None
        if merge == "lorahub":  # one merged adapter for this row, its expert weights zero
            lora = {name: layer.merged(weights.to(layer.A)) for name, layer in self.engine.model.layers.items()}
            weights, explain = torch.zeros_like(weights), [{**e, "merge": "lorahub"} for e in explain]
        max_tokens = _number(body, "max_tokens", 16, int, 1)
        if len(prompt_ids) + max_tokens > self.engine.model.config.max_position_embeddings:
            raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) and `max_tokens` ({max_tokens}) exceed the "
                                f"model's context ({self.engine.model.config.max_position_embeddings} tokens)",
                           "max_tokens")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, "`stop` must be a string or a list of non-empty strings", "stop")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ApiError(400, "`seed` must be a whole number in [0, 2**63)", "seed")
        if not isinstance(body.get("ignore_eos", False), bool):
            raise ApiError(400, "`ignore_eos` must be true or false", "ignore_eos")
        req = Request(prompt_ids, weights, auto, max_tokens, emit, _number(body, "temperature", 1.0, float, 0.0, 2.0),
                      _number(body, "top_p", 1.0, float, 0.0, 1.0, low_open=True), tuple(stop), seed,
                      body.get("ignore_eos", False), lora=lora)
        return req, explain


def _finite(x) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _number(body: dict, name: str, default, kind, low, high=None, low_open: bool = False):
    value = body.get(name, default)
    value = default if value is None else value
    try:
        ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int) \
            and math.isfinite(value) and (value > low if low_open else value >= low) and (high is None or value <= high)
    except OverflowError:  # an integer beyond any float
        ok = False
    if not ok:
        raise ApiError(400, f"`{name}` must be a {'number' if kind is float else 'whole number'} "
                            f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
                       + f", got {value!r}", name)
    return kind(value)


def create_app(hub: Hub, api_key: str | None = None, max_batch: int = 16, max_waiting: int = 64):
    """The FastAPI app; `api_key` (else $LORAHUB_PLUS_API_KEY) guards every /v1 endpoint."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    from contextlib import asynccontextmanager

    server = Server(hub, max_batch, max_waiting)
    api_key = api_key or os.environ.get("LORAHUB_PLUS_API_KEY")

    @asynccontextmanager
    async def lifespan(_):
        yield
        server.engine.close()

    app = FastAPI(title="lorahub-plus", version="0.1.0", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.status}},
                            status_code=e.status)

    @app.middleware("http")
    async def auth(request, call_next):
        if api_key and request.url.path.startswith("/v1") and \
                request.headers.get("authorization", "") != f"Bearer {api_key}":
            return await api_error(request, ApiError(401, "a valid API key is needed (Authorization: Bearer ...)",
                                                     kind="authentication_error"))
        return await call_next(request)

    from fastapi.responses import FileResponse, HTMLResponse

    @app.get("/", response_class=HTMLResponse)
    def page():
        """The library page: search, read a card, ask a routed question (static; the API calls need the key)."""
        return (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")

    @app.get("/library/accuracy.png")
    def accuracy_plot():
        path = hub.library.path / "accuracy.png"
        if not path.is_file():
            raise ApiError(404, "this library has no accuracy plot (`lorahub-plus library summary` writes it)",
                           kind="not_found_error")
        return FileResponse(path, media_type="image/png")

    @app.get("/v1/models")
    def models():
        server.refresh()
        now = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "lorahub-plus"}
                                           for m in server.models()]}

    @app.get("/v1/adapters")
    def adapters(q: str, k: int = 5):
        hits = hub.search(q, max(1, min(k, 100)))
        return {"object": "list", "data": [{"name": h.name, "score": round(h.score, 4), "description": h.card.description,
                                            "metrics": h.card.metrics} for h in hits]}

    async def body_of(request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})")
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    async def answer(body: dict, prompt_ids: list[int], routing_text: str, chat: bool):
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        await loop.run_in_executor(None, server.refresh)  # a rebuild after a library change blocks no stream
        emit = lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value))  # noqa: E731
        req, explain = server.request(body, prompt_ids, routing_text, emit, chat)
        try:
            server.engine.submit(req)
        except QueueFull as e:
            raise ApiError(429, f"too many requests: {e}; retry later", kind="rate_limit_error")
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str, reason, delta: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            message = {"role": "assistant", "content": text}
            return {"index": 0, "finish_reason": reason, "delta" if delta else "message": message}

        def usage(done: dict) -> dict:
            return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                    "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}

        if not body.get("stream"):
            text = ""
            while True:
                what, value = await events.get()
                if what == "delta":
                    text += value
                elif what == "error":
                    raise ApiError(500, value, kind="server_error")
                else:
                    return {"id": rid, "object": kind, "created": created, "model": body["model"],
                            "system_fingerprint": FINGERPRINT, "choices": [choice(text, value["finish_reason"])], "usage": usage(value),
                            "explain": explain}

        async def stream():
            try:
                while True:
                    what, value = await events.get()
                    if what == "error":
                        yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                        return
                    done = what == "done"
                    chunk = {"id": rid, "object": f"{kind}.chunk", "created": created, "model": body["model"],
                             "system_fingerprint": FINGERPRINT, "choices": [choice("" if done else value, value["finish_reason"] if done else None, True)],
                             "explain": explain}
                    if done:
                        chunk["usage"] = usage(value)
                    yield f"data: {json.dumps(chunk)}\n\n"
                    if done:
                        yield "data: [DONE]\n\n"
                        return
            finally:
                req.cancelled = True  # a client that left frees its row at the next step

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await body_of(request)
        prompt = body.get("prompt")
        prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "`prompt` must be a non-empty string (one prompt a request)", "prompt")
        ids = hub.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return await answer(body, ids, prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = await body_of(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ApiError(400, "`messages` must be a non-empty list of {role, content} strings", "messages")
        try:
            prompt = hub.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the template's own refusal (roles out of order, ...)
            raise ApiError(400, f"`messages`: the chat template refuses them ({e})", "messages")
        ids = hub.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        users = [m["content"] for m in messages if m["role"] == "user"] or [messages[-1]["content"]]
        return await answer(body, ids, users[-1] or prompt, chat=True)

    jobs: dict[str, dict] = {}

    @app.post("/v1/compose")
    async def compose_job(request: HttpRequest):
        """Few-shot examples in; a job that composes them and saves a named composition (a mixture)."""
        body = await body_of(request)
        name, examples = body.get("name"), body.get("examples")
        from lorahub_plus.library.store import NAME

        if not isinstance(name, str) or not NAME.match(name) or name in server.models():
            raise ApiError(400, "`name` must be a new name (letters, digits, _ . -) for the composition", "name")
        from lorahub_plus.errors import TaskFormatError
        from lorahub_plus.tasks import _parse_example

        if not isinstance(examples, list) or len(examples) < 2:
            raise ApiError(400, "`examples` must be a list of at least 2 {input, target, choices?} objects", "examples")
        try:
            examples = [_parse_example(e, f"examples[{i}]") for i, e in enumerate(examples)]
        except TaskFormatError as e:
            raise ApiError(400, str(e), "examples")
        if not all(e.input.strip() and e.target.strip() for e in examples):
            raise ApiError(400, "`examples`: every example needs a non-empty `input` and `target`", "examples")
        description = body.get("description")
        if description is not None and not isinstance(description, str):
            raise ApiError(400, "`description` must be a string", "description")
        job = {"id": f"compose-{uuid.uuid4().hex[:16]}", "object": "compose.job", "name": name, "status": "queued",
               "progress": 0.0, "result": None, "error": None}
        jobs[job["id"]] = job
        asyncio.get_running_loop().run_in_executor(None, _run_compose, server, job, examples, description)
        return job

    @app.get("/v1/compose/{job_id}")
    def compose_status(job_id: str):
        if job_id not in jobs:
            raise ApiError(404, f"no compose job {job_id!r}", "job_id", "not_found_error")
        return jobs[job_id]

    @app.post("/v1/synthesize")
    async def synthesize_adapter(request: HttpRequest):
        """A description in; an expert synthesized by the library's hypernetwork and added under `name`."""
        body = await body_of(request)
        name, description = body.get("name"), body.get("description")
        if not isinstance(description, str) or not description.strip():
            raise ApiError(400, "`description` must say in a sentence what the task is", "description")
        if not isinstance(name, str) or name in server.models():
            raise ApiError(400, "`name` must be a new expert name", "name")
        try:
            card = await asyncio.get_running_loop().run_in_executor(
                None, lambda: hub.synthesize(description, name=name))
        except (ValueError, OSError) as e:
            raise ApiError(400, str(e), "name")
        return {"object": "expert", "name": card.name, "rank": card.rank, "origin": card.origin}

    return app


def _run_compose(server: Server, job: dict, examples: list, description: str | None) -> None:
    """Compose on a model of the job's own (the server's is routed), then save the mixture; nothing is written
    unless an expert beat the base model."""
    from lorahub_plus.compose.config import ComposeConfig
    from lorahub_plus.compose.composer import compose
    from lorahub_plus.models import load_base_model
    from lorahub_plus.tasks import Task

    job["status"] = "running"
    try:
        model, tokenizer = load_base_model(server.hub._base_model)
        task = Task(job["name"], examples, kind="multiple_choice" if all(e.choices for e in examples) else "generative",
                    plain=True)
        result = compose(model, tokenizer, task, server.hub.library, ComposeConfig(merge="mixture", fallback="never"),
                         description=description,
                         progress=lambda done, total: job.update(progress=round(min(done / total, 0.99), 3)))[0]
        mixture = result.expert_weights()
        summary = {"base_won": result.base_won, "loss": result.loss, "base_loss": result.base_loss,
                   "candidates": result.candidates, "weights": mixture}
        if not result.base_won:
            server.hub.library.save_composition(job["name"], mixture, {"description": description or "",
                                                                      "shots": len(examples)})
        job.update(status="succeeded", progress=1.0, result=summary)
    except Exception as e:  # the job fails with the reason; nothing was written
        job.update(status="failed", error=f"{type(e).__name__}: {e}")


def serve(library=None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          base_model: str | None = None, max_batch: int = 16) -> None:
    import uvicorn

    uvicorn.run(create_app(Hub(library, base_model), api_key, max_batch), host=host, port=port, log_level="info")
