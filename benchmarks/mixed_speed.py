"""Routed decoding speed over a mixed library of 206 experts, before the 206 real ones are all built (issue 36).

The library: `library/` (61 r=8 q/v experts), the experts built so far in `library-next/` (other kinds among them:
r=4, r=16 on q/k/v/o, rsLoRA, every linear layer), and renamed copies of `library/` experts up to `--experts`.
Speed depends on the number of experts, their ranks and modules, not on what they learned; the copies keep the
mix of kinds of the final library (its later experts are r=8 q/v). Timing as `route_bench.py --sections speed`
(same prompts, interleaved rounds, ratios to the base model in the same round), for the base, its copy (the
noise floor), retrieval and Arrow top-3. To be replaced by route_bench's speed rows on the real library. Also
the footprint: the routed model's memory once the stack it was built from is freed, and one forward and backward
of a dense mixture over all experts (a batch of 8 x 64 tokens, weights 1/K with a gradient: the gate's training
step), against the base model's forward.

    python benchmarks/mixed_speed.py [--experts 206] [--rounds 3]
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import route_bench  # noqa: E402
from report import RESULTS, median_time, write_results  # noqa: E402
from scale_bench import rss_mb  # noqa: E402

from lorahub_plus.library.stack import load_stack  # noqa: E402
from lorahub_plus.library.store import Library  # noqa: E402
from lorahub_plus.models import load_base_model  # noqa: E402
from lorahub_plus.paths import REPO_ROOT  # noqa: E402
from lorahub_plus.routed import RoutedModel  # noqa: E402
from lorahub_plus.routing.routers import Router, RouterConfig  # noqa: E402


def mixed_library(path: Path, experts: int) -> Library:
    shutil.copytree(REPO_ROOT / "library", path)
    shutil.rmtree(path / "gate", ignore_errors=True)  # trained for the 61
    for folder in sorted((REPO_ROOT / "library-next").iterdir()):
        if (folder / "card.json").is_file():
            shutil.copytree(folder, path / folder.name)
    originals, have = Library(REPO_ROOT / "library").names(), len(Library(path).names())
    for i in range(experts - have):
        name = f"zcopy{i:03d}_{originals[i % len(originals)]}"[:60]
        shutil.copytree(path / originals[i % len(originals)], path / name)
        card = json.loads((path / name / "card.json").read_text())
        (path / name / "card.json").write_text(json.dumps({**card, "name": name}))
    library = Library(path)
    library.repair()
    return library


def kinds(library: Library) -> dict:
    """How many experts of each (rank, modules) kind."""
    out: dict[str, int] = {}
    for name in library.names():
        config = json.loads((library.expert_path(name) / "adapter_config.json").read_text())
        kind = f"r={config['r']} {'+'.join(sorted(set(config['target_modules'])))}" + (
            " rsLoRA" if config.get("use_rslora") else "")
        out[kind] = out.get(kind, 0) + 1
    return out


def footprint(model, library: Library, rounds: int = 3) -> dict:
    """Memory of a RoutedModel over every expert (the stack freed), and the dense mixture's forward + backward."""
    import torch

    model, start = copy.deepcopy(model), rss_mb()
    stack = load_stack(library, library.names())
    routed = RoutedModel(model, stack.modules, "mixture")
    del stack
    memory = rss_mb() - start
    ids = torch.randint(100, 1000, (8, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    seconds = []
    for _ in range(rounds):
        w = torch.full((8, len(library.names())), 1 / len(library.names()), requires_grad=True)
        began = time.perf_counter()
        routed(**batch, routes=w).logits.float().square().mean().backward()
        seconds.append(time.perf_counter() - began)
    model = routed.remove()
    with torch.no_grad():
        base = median_time(lambda: model(**batch), rounds)
    return {"routed model memory (MB, stack freed)": round(memory),
            "dense mixture forward+backward (s, 8 x 64 tokens, median)": round(sorted(seconds)[rounds // 2], 2),
            "base forward (s, same batch)": round(base, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=206)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        library = mixed_library(Path(tmp) / "lib", args.experts)

        def configs(model, tokenizer, library, inputs):
            out = {"base": (copy.deepcopy(model), None, (1, 16)),
                   "base, a second copy (noise floor)": (copy.deepcopy(model), None, (1, 16))}
            for kind in ("retrieval", "arrow"):
                router = Router(library, copy.deepcopy(model), tokenizer, RouterConfig(router=kind, k=3, fallback="never"))
                out[f"{kind} top-3 of {len(library.names())}"] = (
                    router.model, partial(lambda b, r: r.rows(inputs[:b]), r=router), (1, 16))
            return out

        route_bench._speed_configs = configs
        model, tokenizer = load_base_model()
        sizes = footprint(model, library, args.rounds)
        rows = route_bench.speed(model, tokenizer, library, rounds=args.rounds)
        mix = kinds(library)
    write_results("mixed_speed", [{"configuration": n, **v} for n, v in rows.items()],
                  {"experts": args.experts, "kinds": mix, **sizes,
                   "target": "top-3 decoding >= 0.85x the base model's tokens/s"},
                  f"python benchmarks/mixed_speed.py --experts {args.experts} --rounds {args.rounds}",
                  "A ratio is the median over rounds of each round's tokens/s over the base's in that round.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = ["decode b=1 tok/s / base", "decode b=16 tok/s / base", "prefill tok/s / base"]
    fig, ax = plt.subplots(figsize=(7, 3))
    for j, measure in enumerate(measures):
        ax.bar([i + 0.27 * (j - 1) for i in range(len(rows))], [r[measure] for r in rows.values()], 0.27,
               label=measure.removesuffix(" / base"))
    ax.axhline(0.85, color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(rows)), [n.replace(" (noise floor)", "") for n in rows], fontsize=7)
    ax.set(ylabel="tokens/s / base", title=f"routed decoding over {args.experts} mixed experts")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "mixed_speed.png", dpi=110)


if __name__ == "__main__":
    main()
