import json

import torch

from lorahub_plus.library.adapters import attach_adapter
from lorahub_plus.library.store import Card
from lorahub_plus.tasks import load_task
from lorahub_plus.library.train import TrainConfig, train_expert, train_lora


def test_training_lowers_answer_loss(tokenizer, task_file):
    from conftest import make_model

    task = load_task(task_file)
    model = make_model(tokenizer, init_std=0.3)  # the default 0.02 init leaves logits too flat to move
    _, losses = train_lora(model, tokenizer, task, task.examples, TrainConfig(epochs=5, lr=1e-2, rank=4, dropout=0.0), progress=False)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_train_expert_writes_a_plain_peft_adapter(model, tokenizer, task_file, tmp_path):
    from peft import PeftModel

    from conftest import make_model

    task = load_task(task_file)
    card = train_expert(task, tmp_path / "expert", TrainConfig(epochs=1, n_test=8, rank=4), model, tokenizer,
                        progress=False)
    folder = tmp_path / "expert"
    assert {p.name for p in folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "card.json"}
    assert not list(tmp_path.glob(".tmp-*"))
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    assert Card.read(folder / "card.json") == card and card.metrics["n_test"] == 8
    assert set(card.metrics) >= {"expert_accuracy", "base_accuracy", "n_train"}
    assert not any("lora" in n for n, _ in model.named_modules())  # the caller's model is left clean

    ids = tokenizer("Q: What is 2 plus 2?\nA:", return_tensors="pt")["input_ids"]
    plain = PeftModel.from_pretrained(make_model(tokenizer), str(folder)).eval()
    ours = attach_adapter(make_model(tokenizer), folder).eval()
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, ours(ids).logits)
        assert not torch.allclose(plain(ids).logits, make_model(tokenizer)(ids).logits)
