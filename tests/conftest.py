"""Shared fixtures: a tiny random Llama and tokenizer built in memory, and a small library."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

TEXT = ("Q: What is 12 plus 7?\nA: 19\nThe quick brown fox jumps over the lazy dog. Sort these words: "
        "apple banana cherry. Is the claim true or false? true false yes no positive negative "
        "Translate to French: hello bonjour. choice: 0 1 2 3 4 5 6 7 8 9 ") * 4


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests on the real default model")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--runslow"):
        skip = pytest.mark.skip(reason="needs --runslow (the real default model)")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer trained in memory on a few sentences: no files, no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def make_model(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2, init_std: float = 0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=init_std, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.config._name_or_path = f"tiny-llama-{hidden}x{layers}"
    return model.eval()


@pytest.fixture
def model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture
def saved_base(tokenizer, tmp_path) -> str:
    """The tiny model and tokenizer saved as a model folder, for `--base-model` and `Hub`."""
    make_model(tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


def save_random_lora(model, path: Path, seed: int, rank: int = 4, targets=("q_proj", "v_proj")) -> Path:
    """A PEFT folder with random (non-zero) A and B, as peft's own tests make them."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False))
    peft_model.save_pretrained(path, safe_serialization=True)
    return path


EXPERTS = {
    "arithmetic_addition": ("Add two whole numbers and give the sum.", ["mathematics", "arithmetic"]),
    "sentiment_reviews": ("Classify whether a product review expresses positive or negative sentiment.",
                          ["sentiment", "classification"]),
    "french_translation": ("Translate short English sentences into French.", ["translation", "multilingual"]),
    "word_sorting": ("Sort a list of words into alphabetical order.", ["algorithms", "text transformation"]),
    "fact_checking": ("Decide whether a factual claim is true or false.", ["truthfulness", "fact checking"]),
    "python_code": ("Predict the output of a short Python program.", ["computer code", "programming"]),
}


@pytest.fixture(scope="session")
def embedder():
    from lorahub_plus.models import load_embedder

    return load_embedder()


@pytest.fixture(scope="session")
def library_template(tmp_path_factory, tokenizer, embedder):
    """A library of random LoRAs with real descriptions, built once; tests get a copy."""
    from lorahub_plus.library.store import Library

    root = tmp_path_factory.mktemp("library")
    model = make_model(tokenizer)
    lib = Library.create(root / "lib", model, embedder=embedder)
    for seed, (name, (description, keywords)) in enumerate(EXPERTS.items()):
        folder = save_random_lora(model, root / "src" / name, seed)
        lib.add(folder, name=name, description=description, keywords=keywords,
                examples=[f"{description} example {i}" for i in range(3)])
    return lib.path


@pytest.fixture
def library(tmp_path, library_template, embedder):
    import shutil

    from lorahub_plus.library.store import Library

    shutil.copytree(library_template, tmp_path / "lib")
    return Library(tmp_path / "lib", embedder=embedder)


@pytest.fixture
def task_file(tmp_path) -> Path:
    examples = [{"input": f"What is {a} plus {b}?", "target": str(a + b),
                 "choices": [str(a + b), str(a + b + 1), "banana"]} for a in range(6) for b in range(5)]
    path = tmp_path / "add.json"
    path.write_text(json.dumps({"name": "tiny_add", "description": "Add two numbers.", "keywords": ["math"],
                                "kind": "multiple_choice", "examples": examples}))
    return path


def set_chat_training(library, folder: Path, name: str, chat: str) -> None:
    """Re-add expert `name` with a card that says how it was trained (`train_config.chat`: off, input)."""
    import json
    import shutil

    shutil.copytree(library.expert_path(name), folder / name)
    card = json.loads((folder / name / "card.json").read_text())
    card["metrics"]["train_config"] = {"chat": chat}
    (folder / name / "card.json").write_text(json.dumps(card))
    library.add(folder / name, name=name, replace=True)
