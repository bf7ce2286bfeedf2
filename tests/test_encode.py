import torch

from lorahub_plus.encode import IGNORE, answer_forward, answer_logprobs, answer_loss, collate, encode_pair


def test_labels_cover_answer_only_and_space_moves_to_answer(tokenizer):
    enc = encode_pair(tokenizer, "Q: 1+1\nA: ", "2", max_length=64)
    n_answer = len(tokenizer(" 2", add_special_tokens=False)["input_ids"])
    assert enc.labels[-n_answer:] == enc.input_ids[-n_answer:]
    assert all(x == IGNORE for x in enc.labels[:-n_answer])
    assert tokenizer.decode(enc.input_ids) == "Q: 1+1\nA: 2"


def test_long_prompt_is_cut_from_the_left(tokenizer):
    enc = encode_pair(tokenizer, "word " * 200 + "A:", " yes", max_length=32)
    assert len(enc.input_ids) == 32 and tokenizer.decode(enc.input_ids).endswith("A: yes")


def test_answer_forward_matches_full_logits(tokenizer, model):
    """Logits kept at answer positions only give the same log-probabilities and loss as a full forward."""
    batch = collate([encode_pair(tokenizer, "Q: hi\nA:", " yes", 64),
                     encode_pair(tokenizer, "Q: a longer prompt here\nA:", " no no", 64)], tokenizer.pad_token_id)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        logits, targets = answer_forward(model, batch)
    assert logits.shape[1] < full.shape[1]
    total, count = answer_logprobs(logits, targets)
    ref_total, ref_count = answer_logprobs(full, batch["labels"][:, 1:])
    assert torch.equal(count, ref_count) and torch.allclose(total, ref_total, atol=1e-4)
    assert torch.allclose(-total.sum() / count.sum(), answer_loss(logits, targets), atol=1e-5)


def test_eos_marks_where_the_answer_stops(tokenizer):
    enc = encode_pair(tokenizer, "Q: hi\nA:", " yes", max_length=64, eos=True)
    assert enc.input_ids[-1] == enc.labels[-1] == tokenizer.eos_token_id


def test_a_token_budget_sends_a_long_input_alone():
    from lorahub_plus.encode import length_batches

    lengths = [30, 11_000, 25, 40, 35]
    batches = length_batches(lengths, 16, max_tokens=4096)
    assert batches == [[2, 0, 4, 3], [1]] and length_batches(lengths, 2) == [[2, 0], [4, 3], [1]]
