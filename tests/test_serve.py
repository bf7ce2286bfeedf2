"""The OpenAI-compatible server on a tiny model: the official `openai` client for completions, chat, streaming,
a per-request mixture and `auto`; plain HTTP for the errors. The server runs on a free loopback port."""
import contextlib
import copy
import json
import socket
import threading
import time

import httpx
import pytest
import torch

from conftest import make_model, set_chat_training
from lorahub_plus import Hub
from lorahub_plus.serving.engine import Engine, Request, wait_idle

openai = pytest.importorskip("openai")
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<eos>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture
def server(library, tokenizer, tmp_path):
    with serving(library, tokenizer, tmp_path) as running:
        yield running


@contextlib.contextmanager
def serving(library, tokenizer, tmp_path):
    import uvicorn

    from lorahub_plus.serving.app import create_app

    tokenizer = copy.deepcopy(tokenizer)  # the session's tokenizer stays without a template
    tokenizer.chat_template = TEMPLATE
    make_model(tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hub = Hub(library.path, str(tmp_path / "base"))
    app = create_app(hub, max_batch=4, max_waiting=2)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app.state.server
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused")


def test_models_list_the_base_model_experts_and_routers(client, library):
    ids = [m.id for m in client.models.list().data]
    assert ids[:4] == ["tiny-llama-32x2", "auto", "route:retrieval", "route:arrow"] and set(library.names()) <= set(ids)


def test_completion_of_an_expert_is_what_the_expert_generates(client, server):
    done = client.completions.create(model="word_sorting", prompt="Sort: banana apple", max_tokens=5, temperature=0)
    again = client.completions.create(model="word_sorting", prompt="Sort: banana apple", max_tokens=5, temperature=0)
    base = client.completions.create(model="tiny-llama-32x2", prompt="Sort: banana apple", max_tokens=5, temperature=0)
    assert done.choices[0].text == again.choices[0].text and done.usage.completion_tokens == 5
    assert done.choices[0].text != base.choices[0].text  # the expert changed the answer
    assert done.model_extra["explain"] == [{"name": "word_sorting", "weight": 1.0}]


def test_chat_stream_and_a_per_request_mixture(client):
    mix = {"word_sorting": 0.7, "french_translation": 0.3}
    chunks = list(client.chat.completions.create(
        model="tiny-llama-32x2", messages=[{"role": "user", "content": "Translate: hello"}], max_tokens=6,
        temperature=0, stream=True, extra_body={"adapters": mix}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    whole = client.chat.completions.create(model="tiny-llama-32x2", messages=[{"role": "user", "content": "Translate: hello"}],
                                           max_tokens=6, temperature=0, extra_body={"adapters": mix})
    assert text == whole.choices[0].message.content and len(chunks) >= 2
    assert whole.model_extra["explain"] == [{"name": n, "weight": w} for n, w in mix.items()]


def test_a_lorahub_merge_per_request_decodes_as_the_merged_adapter_does(client, server, library, tokenizer):
    from lorahub_plus.library.stack import load_stack
    from lorahub_plus.routed import RoutedModel

    mix, prompt = {"word_sorting": 0.9, "french_translation": -0.6}, "Sort: pear fig apple"
    ask = lambda merge: client.completions.create(  # noqa: E731
        model="tiny-llama-32x2", prompt=prompt, max_tokens=6, temperature=0, extra_body={"adapters": mix, "merge": merge})
    lorahub = ask("lorahub")
    assert lorahub.model_extra["explain"] == [{"name": n, "weight": w, "merge": "lorahub"} for n, w in mix.items()]
    names = server[1].names
    w = torch.zeros(1, len(names))
    for n, v in mix.items():
        w[0, names.index(n)] = v
    routed = RoutedModel(make_model(tokenizer), load_stack(library, names).modules, "lorahub")
    ids = torch.tensor([server[1].hub.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = routed.generate(input_ids=ids, attention_mask=torch.ones_like(ids), routes=w, max_new_tokens=6,
                          do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    expected = server[1].hub.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert lorahub.choices[0].text == expected[:len(lorahub.choices[0].text)] and lorahub.choices[0].text
    assert ask("mixture").choices[0].text != lorahub.choices[0].text  # the two merges differ
    for body in ({"merge": "lorahub"}, {"merge": "ties", "adapters": mix}):
        r = httpx.post(server[0] + "/v1/completions", json={"model": "tiny-llama-32x2", "prompt": "x", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == "merge"


def test_auto_routes_each_request_to_its_closest_expert(client):
    out = client.completions.create(model="auto", prompt="Translate short English sentences into French.",
                                    max_tokens=2, temperature=0)
    assert out.model_extra["explain"][0]["name"] == "french_translation"


def test_auto_routes_a_chat_message_only_to_an_expert_that_learned_the_chat_framing(library, tokenizer, tmp_path):
    set_chat_training(library, tmp_path, "french_translation", "off")
    library.set_calibration("close", 0.6, {"rule": "a test's"})
    text = "Translate short English sentences into French."
    with serving(library, tokenizer, tmp_path) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        chat = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": text}],
                                              max_tokens=2, temperature=0)
        plain = client.completions.create(model="auto", prompt=text, max_tokens=2, temperature=0)
    assert chat.model_extra["explain"] == []  # the base model: no close expert learned the chat framing
    assert plain.model_extra["explain"][0]["name"] == "french_translation"  # a completion routes as before


def test_concurrent_requests_decode_together_and_match_one_at_a_time(client, server):
    prompts = ["Sort: pear fig", "Translate: cat", "Is the claim true?", "Sort: b a"]
    models = ["word_sorting", "french_translation", "fact_checking", "tiny-llama-32x2"]
    alone = [client.completions.create(model=m, prompt=p, max_tokens=6, temperature=0).choices[0].text
             for m, p in zip(models, prompts)]
    engine = server[1].engine
    steps_before = engine.steps
    results = [None] * 4

    def ask(i):
        results[i] = client.completions.create(model=models[i], prompt=prompts[i], max_tokens=6 + i,
                                               temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r[: len(a)] for r, a in zip(results, alone)] == alone  # batched rows decode as they do alone
    assert engine.steps - steps_before < 4 * 6  # shared steps: fewer than one request after another


def test_a_gate_trained_while_serving_serves_route_gate_rows_next_to_arrow_rows(library, tokenizer, tmp_path):
    from lorahub_plus.library.stack import load_stack
    from lorahub_plus.routing.gate import GateConfig, GateRouter, save_gate

    names = library.names()
    gate = GateRouter([A.shape[2] for A, _ in load_stack(library, names).modules.values()], len(names), k=2, seed=1)
    for g in gate.gates:  # an untrained gate with logits large enough to pick its own experts
        torch.nn.init.normal_(g.weight, std=1.0)
    with serving(library, tokenizer, tmp_path) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        with pytest.raises(openai.NotFoundError, match="gate train"):
            client.completions.create(model="route:gate", prompt="x", max_tokens=1)
        save_gate(library, gate, names, GateConfig(k=2), [1.0], 1.0)  # trained while the server runs
        assert {"route:arrow", "route:gate"} <= {m.id for m in client.models.list().data}
        models = ["route:gate", "route:arrow", "route:gate", "tiny-llama-32x2"]
        prompts = ["Sort: pear fig", "Sort: pear fig", "Translate: cat", "Sort: pear fig"]
        alone = [client.completions.create(model=m, prompt=p, max_tokens=6, temperature=0) for m, p in zip(models, prompts)]
        results = [None] * 4

        def ask(i):
            results[i] = client.completions.create(model=models[i], prompt=prompts[i], max_tokens=6, temperature=0)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [r.choices[0].text for r in results] == [a.choices[0].text for a in alone]
    assert alone[0].model_extra["explain"] == [{"router": "gate", "per_token": True}]
    assert len({a.choices[0].text for a in alone[:2] + alone[3:]}) == 3  # the gate is neither arrow nor the base


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "model"),
    (json.dumps({"model": "auto", "prompt": "x", "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"model": "auto", "prompt": "x", "max_tokens": 10**6}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "auto", "prompt": "x", "adapters": {"ghost": 1}}).encode(), 400, "adapters"),
    (b'{"model": "auto", "prompt": "x", "adapters": {"word_sorting": NaN}}', 400, "adapters"),
    (json.dumps({"model": "auto", "prompt": ""}).encode(), 400, "prompt"),
    (json.dumps({"model": "route:gate", "prompt": "x"}).encode(), 404, "model"),  # no gate trained
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, body, status, param):
    r = httpx.post(server[0] + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and r.json()["error"]["param"] == param
    assert client.completions.create(model="auto", prompt="x", max_tokens=1).choices[0].text is not None


def test_an_api_key_guards_the_api(library, saved_base):
    from fastapi.testclient import TestClient

    from lorahub_plus.serving.app import create_app

    app = create_app(Hub(library.path, saved_base), api_key="s3cret")
    with TestClient(app) as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    app.state.server.engine.close()


def test_an_expert_added_while_serving_is_served(server, client, library, tokenizer, tmp_path):
    from conftest import save_random_lora

    src = save_random_lora(make_model(tokenizer), tmp_path / "late", seed=31)
    library.add(src, name="late_expert", description="An expert added while the server runs.")
    assert "late_expert" in [m.id for m in client.models.list().data]
    assert client.completions.create(model="late_expert", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_the_engine_frees_a_cancelled_row_and_refuses_past_its_queue(tokenizer):
    from lorahub_plus.serving.engine import QueueFull

    engine = Engine(make_model(tokenizer), tokenizer, max_batch=1, max_waiting=1)
    events = []
    emit = lambda kind, value: events.append(kind)  # noqa: E731
    first = Request([5, 6, 7], torch.zeros(0), False, 10_000, emit)
    engine.model = _Plain(engine.model)
    engine.submit(first)
    engine.submit(Request([5], torch.zeros(0), False, 2, emit))
    with pytest.raises(QueueFull):
        engine.submit(Request([5], torch.zeros(0), False, 2, emit))
    first.cancelled = True  # the client left
    assert wait_idle(engine) and events.count("done") == 1
    engine.close()


class _Plain(torch.nn.Module):
    """A plain model that takes (and ignores) `routes`, as the engine passes them."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    @property
    def device(self):
        return self.inner.device

    @property
    def config(self):
        return self.inner.config

    def forward(self, routes=None, **kwargs):
        return self.inner(**kwargs)


def test_a_compose_job_saves_a_named_composition_that_is_then_served(server, client):
    examples = [{"input": f"Sort a list of words into alphabetical order. example {i}", "target": "a b"} for i in range(4)]
    job = httpx.post(server[0] + "/v1/compose", json={"name": "my_sorter", "examples": examples,
                                                      "description": "sort words"}).json()
    for _ in range(300):
        job = httpx.get(f"{server[0]}/v1/compose/{job['id']}").json()
        if job["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.1)
    assert job["status"] == "succeeded" and job["progress"] == 1.0, job
    served = "my_sorter" in [m.id for m in client.models.list().data]
    assert served != job["result"]["base_won"]  # saved unless the base model won
    if served:
        out = client.completions.create(model="my_sorter", prompt="x", max_tokens=1)
        assert out.model_extra["explain"] == [{"name": n, "weight": w} for n, w in job["result"]["weights"].items()]


def test_a_compose_job_with_bad_examples_is_refused_and_writes_nothing(server, library):
    r = httpx.post(server[0] + "/v1/compose", json={"name": "bad", "examples": [{"input": "only one"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "examples"
    assert not (library.path / "compositions").exists()


def test_a_saved_composition_is_listed_and_served_as_its_mixture(server, client, library):
    from lorahub_plus.errors import LibraryError

    library.save_composition("sort_and_check", {"word_sorting": 0.5, "fact_checking": 0.5})
    assert "sort_and_check" in [m.id for m in client.models.list().data]
    out = client.completions.create(model="sort_and_check", prompt="x", max_tokens=1)
    assert out.model_extra["explain"] == [{"name": "word_sorting", "weight": 0.5}, {"name": "fact_checking", "weight": 0.5}]
    with pytest.raises(LibraryError, match="unknown"):
        library.save_composition("ghost_mix", {"ghost": 1.0})
    assert library.names() and "compositions" not in library.names()


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not __import__("os").path.exists(CHROMIUM), reason="needs Debian's chromium (.ci/run installs it)")
def test_the_library_page_in_a_real_browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.goto(server[0] + "/")
        page.fill("#query", "translate a sentence to French")
        page.press("#query", "Enter")
        page.wait_for_selector(".hit")
        assert page.locator(".hit").first.get_attribute("data-name") == "french_translation"
        page.locator(".hit").first.click()
        assert "Translate short English sentences into French." in page.inner_text("#card")
        page.fill("#prompt", "Translate short English sentences into French.")
        page.click("#ask")
        page.wait_for_function("document.getElementById('used').textContent.includes('answered by')")
        assert "french_translation" in page.inner_text("#used") and page.inner_text("#answer") != "..."
        browser.close()


def _run_engine(engine, plan: dict[int, list]) -> None:
    """Step the engine by hand; `plan` submits requests before given steps."""
    for step in range(40):
        for request in plan.get(step, []):
            engine.submit(request)
        engine._step()
        if engine.idle() and step > max(plan):
            return


def test_a_request_joining_mid_decode_decodes_as_it_does_alone(tokenizer):
    """The KV cache merge: B joins after A has decoded 3 tokens, with prompts of other lengths (left padding on
    both sides of the merge); each row's tokens are what it decodes alone. Greedy, plain model."""
    model = _Plain(make_model(tokenizer))
    engine = Engine(model, tokenizer)
    engine.close()  # stepped by hand below
    emit = lambda kind, value: None  # noqa: E731

    def request(ids, n):
        return Request(ids, torch.zeros(0), False, n, emit, ignore_eos=True)

    alone = []
    for ids, n in (([5, 6, 7, 8, 9, 10], 8), ([11, 12], 6)):
        r = request(ids, n)
        _run_engine(engine, {0: [r]})
        alone.append(r.generated)
    a, b = request([5, 6, 7, 8, 9, 10], 8), request([11, 12], 6)
    _run_engine(engine, {0: [a], 3: [b]})
    assert [a.generated, b.generated] == alone and len(alone[0]) == 8


def test_stop_strings_are_never_sent_in_part():
    from lorahub_plus.serving.engine import _held

    assert _held("Answer: 85\nUs", ("\nUser:",)) == 3 and _held("Answer: 85", ("\nUser:",)) == 0


def test_more_requests_than_the_queue_holds_get_429_and_the_rest_are_served(server):
    """The fixture's engine decodes 4 and queues 2: of 12 long requests sent at once, some are refused with an
    OpenAI rate-limit error, and every accepted one finishes."""
    body = {"model": "auto", "prompt": "x", "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    codes = []

    def send():
        codes.append(httpx.post(server[0] + "/v1/completions", json=body, timeout=120).status_code)

    threads = [threading.Thread(target=send) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(codes) == {200, 429} and codes.count(200) >= 4
