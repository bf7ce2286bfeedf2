"""Arrow alone on the in-domain stream, per task: run from two commits' checkouts to compare their routing.

    python benchmarks/arrow_stream_check.py > arrow.log      (results/reproduce_stream.md)
"""
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from route_bench import _acc, stream_tasks  # noqa: E402

from lorahub_plus.library.store import Library  # noqa: E402
from lorahub_plus.models import load_base_model  # noqa: E402
from lorahub_plus.routing.routers import Router, RouterConfig  # noqa: E402
from lorahub_plus.scoring import EvalConfig, score  # noqa: E402


def main() -> None:
    library = Library(Path(__file__).resolve().parents[1] / "library")
    model, tokenizer = load_base_model()
    router = Router(library, model, tokenizer, RouterConfig(router="arrow"))
    accuracy = {}
    with torch.no_grad():
        for name, (task, test) in stream_tasks(library, 10).items():
            rows = router.rows([task.routing_text(ex) for ex in test])
            accuracy[name] = _acc(score(router.model, tokenizer, task, test, cfg=EvalConfig(n_test=10, batch_size=16),
                                        routes=rows))
            print("arrow", name, accuracy[name], flush=True)
    print("MEAN", statistics.mean(accuracy.values()))


if __name__ == "__main__":
    main()
