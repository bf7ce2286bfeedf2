"""The learned single-pass gate: training moves only the gate, it round-trips through the library, and a gate
for another library, base model or with damaged weights is refused with the field named."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_model
from lorahub_plus.errors import LibraryError
from lorahub_plus.encode import encode_examples
from lorahub_plus.routing.gate import GateConfig, GateRouter, load_gate, save_gate, train_gate
from lorahub_plus.routed import RoutedModel
from lorahub_plus.routing.routers import Router, RouterConfig
from lorahub_plus.library.stack import load_stack
from lorahub_plus.tasks import load_task


@pytest.fixture
def trained(library, tokenizer, task_file):
    names = library.names()
    stack = load_stack(library, names)
    model = make_model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gate = GateRouter([A.shape[2] for A, _ in stack.modules.values()], len(names), k=2)
    gate.initial = [g.weight.detach().clone() for g in gate.gates]  # to see that training moved it
    routed = RoutedModel(model, stack.modules, "mixture", router=gate)
    task = load_task(task_file)
    cfg = GateConfig(k=2, batch_size=4, lr=5e-2)
    losses = train_gate(routed, tokenizer, encode_examples(tokenizer, [(task, ex) for ex in task.examples[:12]], cfg.max_length),
                        cfg, progress=False)
    model = routed.remove()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # base model untouched
    return gate, names, cfg, losses


def test_training_moves_the_gate_only_and_it_round_trips(library, tokenizer, trained):
    gate, names, cfg, losses = trained
    assert len(losses) == 3 and all(not torch.equal(g.weight, w) for g, w in zip(gate.gates, gate.initial))
    folder = save_gate(library, gate, names, cfg, losses, 1.0)
    loaded, loaded_names = load_gate(library)
    assert loaded_names == names and all(torch.equal(a, b) for a, b in zip(gate.state_dict().values(),
                                                                           loaded.state_dict().values()))
    assert json.loads((folder / "gate.json").read_text())["fingerprint"] == library.fingerprint
    assert (folder / "loss.png").stat().st_size > 0  # the training curve beside the weights
    router = Router(library, make_model(tokenizer), tokenizer, RouterConfig(router="gate"))
    explained = router.explain(["What is 2 plus 3?"])[0]
    assert len(explained) >= 2 and abs(sum(w for _, w in explained) - 1) < 1e-4
    assert library.verify() == [] and "gate" not in library.names()


def test_a_gate_for_another_library_or_with_nan_is_refused(library, trained):
    gate, names, cfg, losses = trained
    folder = save_gate(library, gate, names, cfg, losses, 1.0)
    library.remove("python_code")
    with pytest.raises(LibraryError, match="`experts`.*python_code"):
        load_gate(library)
    meta = json.loads((folder / "gate.json").read_text())
    (folder / "gate.json").write_text(json.dumps({**meta, "experts": library.names(), "fingerprint": "other"}))
    with pytest.raises(LibraryError, match="`fingerprint`"):
        load_gate(library)
    (folder / "gate.json").write_text(json.dumps({**meta, "experts": library.names(),
                                                  "fingerprint": library.fingerprint}))
    with pytest.raises(LibraryError, match="gate.safetensors: tensors do not match"):
        load_gate(library)
    weights = load_file(str(folder / "gate.safetensors"))
    weights[next(iter(weights))].view(-1)[0] = float("nan")
    save_file(weights, str(folder / "gate.safetensors"))
    with pytest.raises(LibraryError, match="NaN"):
        load_gate(library)


def test_no_gate_yet_is_a_clear_error(library, tokenizer):
    with pytest.raises(LibraryError, match="gate train"):
        Router(library, make_model(tokenizer), tokenizer, RouterConfig(router="gate"))


def test_a_gate_for_other_modules_is_refused(library, trained):
    gate, names, cfg, losses = trained
    save_gate(library, gate, names, cfg, losses, 1.0)
    in_features = [g.in_features for g in gate.gates]
    assert load_gate(library, in_features)[1] == names
    with pytest.raises(LibraryError, match="`in_features` \\(.* gates\\) does not match"):
        load_gate(library, in_features[:-1])
