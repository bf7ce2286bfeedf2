"""The server as a Ray Serve application: a local Ray instance, 2 replicas on the tiny model."""
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")


@pytest.mark.slow
def test_two_ray_replicas_share_requests_for_different_experts(library, saved_base):
    pytest.importorskip("ray.serve")
    import ray
    from ray import serve

    from lorahub_plus.serving.ray import serve_on_ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        serve_on_ray(None, library.path, port=port, base_model=saved_base, max_batch=4, replicas=2,
                     cpus_per_replica=0.5, blocking=False)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        names = library.names()
        assert {m.id for m in client.models.list().data} >= set(names)

        def ask(i):
            return client.completions.create(model=names[i % len(names)], prompt=f"Sort: pear {i} apple",
                                             max_tokens=3, temperature=0)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(24)))
        assert {a.model for a in answers} == set(names) and all(a.usage.completion_tokens == 3 for a in answers)
        assert len({a.system_fingerprint for a in answers}) == 2  # both replicas answered
        again = [ask(i).choices[0].text for i in range(3)]  # greedy: the same answer from either replica
        assert again == [a.choices[0].text for a in answers[:3]]
    finally:
        serve.shutdown()
        ray.shutdown()
