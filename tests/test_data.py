"""PromptPairs: construction, indexing, and validation errors (message text pinned)."""

import numpy as np
import pytest
import torch

from edgepatch.data import PromptPairs, encode
from edgepatch.tokenizers import gpt2_tokenizer


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def small():
    """3 prompts of lengths 3, 2, 3 (right-padded), with per-prompt and dataset-wide meta."""
    return PromptPairs.from_tokens(
        clean=[[1, 2, 3], [4, 5, 0], [6, 7, 8]],
        corrupt=[[1, 9, 3], [4, 9, 0], [6, 9, 8]],
        answers=[10, 11, 12],
        wrong=[20, 21, 22],
        attention_mask=[[1, 1, 1], [1, 1, 0], [1, 1, 1]],
        prompts=["a", "b", "c"],
        corrupt_prompts=["A", "B", "C"],
        meta={"label": ["x", "y", "z"], "score": torch.tensor([0.0, 1.0, 2.0]), "table": torch.arange(3)},
        per_prompt_keys=("label", "score"),
    )


# ------------------------------------------------------------------ from_tokens and the container protocol
def test_from_tokens_defaults():
    d = PromptPairs.from_tokens([[1, 2, 3]], [[1, 4, 3]], [5], [6])
    assert d.clean.dtype == torch.long and d.attention_mask.dtype == torch.bool
    assert d.attention_mask.all()
    assert d.answers.shape == (1, 1) and d.wrong.shape == (1, 1)
    assert d.answer_pos.tolist() == [2]
    assert (len(d), d.batch, d.pos, d.n_answers, d.n_wrong) == (1, 1, 3, 1, 1)
    assert repr(d) == "PromptPairs(1 prompts, pos 3, n_answers 1, n_wrong 1)"


def test_answer_pos_is_last_real_token():
    d = small()
    assert d.answer_pos.tolist() == [2, 1, 2]


@pytest.mark.parametrize("index, rows", [
    (1, [1]),
    (-1, [2]),
    (slice(0, 2), [0, 1]),
    ([2, 0], [2, 0]),
    (torch.tensor([2, 1]), [2, 1]),
    (torch.tensor([True, False, True]), [0, 2]),
    (np.int64(1), [1]),  # (numpy integers once raised "'numpy.int64' object is not iterable")
    (np.array([2, 0]), [2, 0]),
])
def test_getitem(index, rows):
    d = small()
    sub = d[index]
    assert isinstance(sub, PromptPairs)
    assert sub.clean.tolist() == [d.clean[r].tolist() for r in rows]
    assert sub.corrupt.tolist() == [d.corrupt[r].tolist() for r in rows]
    assert sub.answers[:, 0].tolist() == [10 + r for r in rows]
    assert sub.wrong[:, 0].tolist() == [20 + r for r in rows]
    assert sub.answer_pos.tolist() == [d.answer_pos[r].item() for r in rows]
    assert sub.prompts == [["a", "b", "c"][r] for r in rows]
    assert sub.corrupt_prompts == [["A", "B", "C"][r] for r in rows]
    assert sub.meta["label"] == [["x", "y", "z"][r] for r in rows]  # per-prompt: indexed
    assert sub.meta["score"].tolist() == [float(r) for r in rows]
    assert sub.meta["table"].tolist() == [0, 1, 2]  # dataset-wide: kept whole


def test_getitem_errors():
    d = small()
    with pytest.raises(IndexError, match="prompt index 3 is out of range for 3 prompts"):
        d[3]
    with pytest.raises(IndexError, match="selects no prompts"):
        d[5:]
    with pytest.raises(IndexError, match=r"boolean index must have shape \(3,\)"):
        d[torch.tensor([True, False])]


def test_batches_and_to():
    d = small()
    parts = list(d.batches(2))
    assert [len(p) for p in parts] == [2, 1]
    assert torch.equal(torch.cat([p.clean for p in parts]), d.clean)
    assert parts[1].meta["label"] == ["z"]
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        next(d.batches(0))
    moved = d.to("cpu")
    assert moved is not d and torch.equal(moved.clean, d.clean) and moved.meta["table"].device.type == "cpu"


def test_integer_mask_and_int32_ids_are_converted():
    d = PromptPairs.from_tokens(torch.tensor([[1, 2]], dtype=torch.int32), [[1, 3]], [4], [5],
                                attention_mask=torch.tensor([[1, 1]]))
    assert d.clean.dtype == torch.long and d.attention_mask.dtype == torch.bool


# ------------------------------------------------------------------ validation messages
def test_error_clean_corrupt_shapes():
    with pytest.raises(ValueError, match=r"clean and corrupt must have the same shape \[batch, pos\], got clean "
                                         r"\(1, 3\) and corrupt \(1, 2\)\..*pad both on the right"):
        PromptPairs.from_tokens([[1, 2, 3]], [[1, 2]], [4], [5])


def test_error_float_ids():
    with pytest.raises(TypeError, match=r"clean must hold integer token ids \(torch.long\), got dtype torch.float32"):
        PromptPairs.from_tokens(torch.tensor([[1.0, 2.0]]), [[1, 2]], [4], [5])


def test_error_answers_rows():
    with pytest.raises(ValueError, match=r"answers has 2 rows but clean has 1 prompts; expected answers of shape "
                                         r"\[1, n\]"):
        PromptPairs.from_tokens([[1, 2]], [[1, 3]], [4, 5], [6])


def test_error_left_padding():
    with pytest.raises(ValueError, match=r"attention_mask row 1 does not start with a real token; padding must be "
                                         r"on the RIGHT"):
        PromptPairs.from_tokens([[1, 2], [0, 3]], [[1, 2], [0, 3]], [4, 4], [5, 5],
                                attention_mask=[[1, 1], [0, 1]])
    with pytest.raises(ValueError, match=r"attention_mask row 0 has a real token after padding \(\[1, 0, 1\]\)"):
        PromptPairs.from_tokens([[1, 0, 2]], [[1, 0, 2]], [4], [5], attention_mask=[[1, 0, 1]])


def test_error_float_mask():
    with pytest.raises(TypeError, match="attention_mask must be a bool tensor .* got dtype torch.float32"):
        PromptPairs.from_tokens([[1, 2]], [[1, 3]], [4], [5], attention_mask=torch.ones(1, 2))


def test_error_answer_pos_on_padding():
    d = small()
    with pytest.raises(ValueError, match=r"answer_pos\[1\] = 2 points at padding \(prompt 1 has 2 real tokens\)\. "
                                         r"Expected the last real token"):
        PromptPairs(d.clean, d.corrupt, d.answers, d.wrong, d.attention_mask, torch.tensor([2, 2, 2]))


def test_error_per_prompt_meta_length():
    with pytest.raises(ValueError, match=r"meta\['label'\] is per-prompt, so it needs 1 values, got 2"):
        PromptPairs.from_tokens([[1]], [[2]], [3], [4], meta={"label": ["a", "b"]}, per_prompt_keys=["label"])
    with pytest.raises(ValueError, match=r"per_prompt_keys names 'nope' but meta has no such key"):
        PromptPairs.from_tokens([[1]], [[2]], [3], [4], per_prompt_keys=["nope"])
    with pytest.raises(ValueError, match=r"meta\['x'\] is per-prompt .* needs 1 values, one per prompt; got int 5"):
        PromptPairs.from_tokens([[1]], [[2]], [3], [4], meta={"x": 5}, per_prompt_keys=["x"])


@pytest.mark.parametrize("clean", [[], [[]], torch.zeros(0, 3, dtype=torch.long)])
def test_error_no_prompts(clean):
    """(Once: "clean must hold integer token ids ..., got dtype torch.float32" for an empty list.)"""
    with pytest.raises(ValueError, match=r"clean is empty \(shape \[.*\]\); a PromptPairs needs at least one prompt"):
        PromptPairs.from_tokens(clean, clean, [], [])


def test_validate_vocab():
    d = PromptPairs.from_tokens([[1, 2]], [[1, 3]], [150], [5])
    assert d.validate(151) is d
    with pytest.raises(ValueError, match=r"answers holds token id 150 \(first in prompt 0\) but the model's "
                                         r"vocabulary has d_vocab = 101 ids \(0\.\.100\)\. Fix: build the data "
                                         r"with the model's own tokenizer"):
        d.validate(101)

    class Cfg:
        d_vocab = 101

    class Model:
        cfg = Cfg()

    with pytest.raises(ValueError, match="d_vocab = 101"):
        d.validate(Model())


# ------------------------------------------------------------------ from_strings with GPT-2's tokenizer
def test_from_strings_gpt2(tok):
    clean = ["When Mary and John went to the store, John gave a drink to", "The cat sat"]
    corrupt = ["When Alice and Bob went to the store, Carl gave a drink to", "The dog sat"]
    d = PromptPairs.from_strings(tok, clean, corrupt, answers=[" Mary", " on"], wrong=[" John", 11])
    n0 = len(tok(clean[0]).input_ids)
    assert n0 == 14 and d.clean.shape == (2, 14)
    assert d.clean[0].tolist() == tok(clean[0]).input_ids
    assert d.clean[1, :3].tolist() == tok("The cat sat").input_ids
    assert d.clean[1, 3:].eq(tok.eos_token_id).all()  # right padding with the pad (= eos) id
    assert d.attention_mask.sum(1).tolist() == [14, 3]
    assert d.answer_pos.tolist() == [13, 2]
    assert d.answers[:, 0].tolist() == [tok(" Mary").input_ids[0], tok(" on").input_ids[0]]
    assert d.wrong[:, 0].tolist() == [tok(" John").input_ids[0], 11]
    assert d.prompts == clean and d.corrupt_prompts == corrupt


def test_from_strings_prepend_bos_and_lists(tok):
    d = PromptPairs.from_strings(tok, ["The cat"], ["The dog"], [[" sat", " ran"]], [" is"], prepend_bos=True)
    assert d.clean[0].tolist() == [tok.bos_token_id] + tok("The cat").input_ids
    assert d.corrupt[0, 0].item() == tok.bos_token_id
    assert d.answers.shape == (1, 2)


def test_from_strings_multi_token_answer_error(tok):
    with pytest.raises(ValueError, match=r"answers\[1\] = ' aardvark' must be exactly one token but tokenizes to "
                                         r"4: \[' a', 'ard', 'v', 'ark'\] \(ids \[.*\]\)\. Answer strings are "
                                         r"tokenized as given.*or pass the token id"):
        PromptPairs.from_strings(tok, ["a", "b"], ["c", "d"], [" Mary", " aardvark"], [" x", " y"])
    with pytest.raises(ValueError, match=r"wrong\[0\]\[1\] = ' Mary ' must be exactly one token but tokenizes to 2: "
                                         r"\[' Mary', ' '\]"):
        PromptPairs.from_strings(tok, ["a"], ["c"], [" x"], [[" John", " Mary "]])


def test_from_strings_length_mismatch_error(tok):
    with pytest.raises(ValueError, match=r"Prompt 0: clean and corrupt tokenize to different lengths: clean "
                                         r"'The cat sat' -> 3 tokens, corrupt 'The aardvark sat' -> 6 tokens\..*"
                                         r"Fix: choose corrupted words with the same token count"):
        PromptPairs.from_strings(tok, ["The cat sat"], ["The aardvark sat"], [" on"], [" in"])


def test_from_strings_ragged_and_count_errors(tok):
    with pytest.raises(ValueError, match=r"answers must give the same number of tokens for every prompt, but "
                                         r"answers\[0\] has 1 and answers\[1\] has 2"):
        PromptPairs.from_strings(tok, ["a", "b"], ["c", "d"], [" x", [" y", " z"]], [" x", " y"])
    with pytest.raises(ValueError, match="Got 2 clean prompts but 1 corrupt; expected one corrupt entry per"):
        PromptPairs.from_strings(tok, ["a", "b"], ["c"], [" x", " y"], [" x", " y"])
    # one string instead of a list (once read as one prompt per character)
    with pytest.raises(TypeError, match=r"clean is a single string 'ab'; pass a list with one entry per prompt"):
        PromptPairs.from_strings(tok, "ab", "cd", " x", " y")
    d = PromptPairs.from_strings(tok, ["a"], ["c"], [np.int64(87)], [torch.tensor(88)])  # numpy / tensor ids
    assert d.answers.tolist() == [[87]] and d.wrong.tolist() == [[88]]


def test_encode_is_as_given(tok):
    assert encode(tok, [" Mary", "Mary"]) == [tok(" Mary").input_ids, tok("Mary").input_ids]
    assert len(encode(tok, [" Mary"])[0]) == 1


def test_error_ragged_lists():
    with pytest.raises(TypeError, match=r"corrupt must be a tensor \(or rectangular nested list\) of token ids.*"
                                        r"Pad rows to one length"):
        PromptPairs.from_tokens([[1, 2], [3, 4]], [[1, 2], [3]], [5, 5], [6, 6])
