"""Task generators: determinism, single-token answers, equal clean/corrupt lengths, task structure."""

import pytest
import torch

from conftest import HAVE
from edgepatch import tasks
from edgepatch.data import PromptPairs
from edgepatch.metrics import logit_diff, prob_diff_years
from edgepatch.tokenizers import gpt2_tokenizer


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def make(name, tok, seed, n=16):
    if name == "induction":
        return tasks.induction(tok, n=n, seq_len=6, seed=seed)
    return tasks.get_task(name)(tok, n=n, seed=seed)


TENSORS = ("clean", "corrupt", "answers", "wrong", "attention_mask", "answer_pos")


@pytest.mark.parametrize("name", ["ioi", "greater_than", "induction", "sva"])
def test_deterministic_per_seed(tok, name):
    a, b, c = make(name, tok, 0), make(name, tok, 0), make(name, tok, 1)
    assert isinstance(a, PromptPairs) and len(a) == 16
    for field in TENSORS:
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.prompts == b.prompts
    assert not torch.equal(a.clean, c.clean) if a.clean.shape == c.clean.shape else True
    assert a.prompts != c.prompts


@pytest.mark.parametrize("name", ["ioi", "greater_than", "induction", "sva"])
def test_single_token_answers_and_equal_lengths(tok, name):
    d = make(name, tok, 3, n=32)
    assert d.clean.shape == d.corrupt.shape
    d.validate(len(tok))
    for ids in (d.answers, d.wrong):
        for i in ids.flatten().tolist():
            # the answer's text re-tokenizes to exactly that one token
            assert tok(tok.decode([i])).input_ids == [i]
    assert (d.answers != d.wrong).all()
    # clean and corrupt have the same real length: re-tokenizing the strings gives the stored rows
    if name != "induction":
        for i, (c, k) in enumerate(zip(d.prompts, d.corrupt_prompts)):
            n = int(d.attention_mask[i].sum())
            assert d.clean[i, :n].tolist() == tok(c).input_ids
            assert d.corrupt[i, :n].tolist() == tok(k).input_ids


def test_ioi_structure(tok):
    assert len(tasks.IOI_TEMPLATES) >= 8
    d = tasks.ioi(tok, n=20, seed=0)
    assert d.meta["order"] == ["ABBA", "BABA"] * 10
    names = set(tasks.IOI_NAMES)
    for i in range(len(d)):
        io, s = d.meta["io"][i], d.meta["s"][i]
        clean, corrupt = d.prompts[i], d.corrupt_prompts[i]
        assert tok.decode(d.answers[i]) == " " + io and tok.decode(d.wrong[i]) == " " + s
        assert clean.count(io) == 1 and clean.count(s) == 2
        first = clean.index(io) < clean.index(s)
        assert first == (d.meta["order"][i] == "ABBA")
        # ABC corruption: the three name slots hold three other, distinct names; nothing else changes
        clean_words, corrupt_words = clean.replace(",", " ,").split(), corrupt.replace(",", " ,").split()
        diff = [(a, b) for a, b in zip(clean_words, corrupt_words) if a != b]
        new_names = [b.rstrip(".") for _, b in diff]
        assert len(diff) == 3 and len(set(new_names)) == 3
        assert set(new_names) <= names and not set(new_names) & {io, s}
        assert (d.clean[i] != d.corrupt[i]).sum() == 3


@pytest.mark.parametrize("prepend_bos", [False, True])
def test_ioi_named_positions(tok, prepend_bos):
    """meta["positions"] puts IO, S1, S1+1, S2 and END where the prompt's tokens say (found here from the
    decoded tokens, not from the generator's indices): IO and the two S tokens decode to the names,
    S1+1 follows S1, END is the scored position; every other real token is "other", padding -1. Slicing
    the data slices the positions."""
    d = tasks.ioi(tok, n=12, seed=4, prepend_bos=prepend_bos)
    names, table = d.meta["slot_names"], d.meta["positions"]
    assert tuple(names) == ("IO", "S1", "S1+1", "S2", "END", "other") and table.shape == d.clean.shape
    assert bool(((table == -1) == ~d.attention_mask).all()) and bool((d.attention_mask[:, 0]).all())
    for i in range(len(d)):
        real = int(d.attention_mask[i].sum())
        words = [tok.decode([t]) for t in d.clean[i, :real].tolist()]
        io_at = [j for j, w in enumerate(words) if w == " " + d.meta["io"][i]]
        s_at = [j for j, w in enumerate(words) if w == " " + d.meta["s"][i]]
        want = {io_at[0]: "IO", s_at[0]: "S1", s_at[0] + 1: "S1+1", s_at[1]: "S2", real - 1: "END"}
        got = [names[k] for k in table[i, :real].tolist()]
        assert got == [want.get(j, "other") for j in range(real)], (d.prompts[i], got)
        assert (io_at[0] < s_at[0]) == (d.meta["order"][i] == "ABBA")
    assert torch.equal(d[3:5].meta["positions"], table[3:5])


@pytest.mark.parametrize("order", ["ABBA", "BABA"])
def test_ioi_single_order(tok, order):
    d = tasks.ioi(tok, n=6, seed=2, templates=order)
    assert set(d.meta["order"]) == {order}


def test_ioi_bad_order(tok):
    with pytest.raises(ValueError, match=r"templates must be one of \['mixed', 'ABBA', 'BABA'\], got 'ABAB'\. "
                                         r"Did you mean"):
        tasks.ioi(tok, n=2, templates="ABAB")


def test_greater_than_structure(tok):
    d = tasks.greater_than(tok, n=24, seed=0)
    year_tokens = d.meta["year_tokens"]
    assert year_tokens.tolist() == [tok(f"{y:02d}").input_ids[0] for y in range(100)]
    c17 = tok(" 17").input_ids[0]
    for i in range(len(d)):
        yy = int(d.meta["year"][i])
        assert 2 <= yy <= 98
        assert d.prompts[i].endswith(f"from the year 17{yy:02d} to the year 17")
        assert d.corrupt_prompts[i].endswith("from the year 1701 to the year 17")
        row = d.clean[i, : d.answer_pos[i] + 1].tolist()
        k = row.index(c17)  # " 17" then "YY": the year is two tokens
        assert row[k + 1] == year_tokens[yy] and d.corrupt[i, k + 1] == year_tokens[1]
        assert row[-1] == c17
        assert d.answers[i, 0] == year_tokens[yy + 1] and d.wrong[i, 0] == year_tokens[yy - 1]
    sub = d[3:5]
    assert sub.meta["year"].tolist() == d.meta["year"][3:5].tolist()
    assert prob_diff_years(torch.randn(2, sub.pos, len(tok)), sub).shape == (2,)


def test_induction_int_vocab():
    d = tasks.induction(101, n=8, seq_len=5, seed=0)
    L = 5
    assert d.clean.shape == (8, 2 * L - 1) and d.corrupt.shape == d.clean.shape
    assert torch.equal(d.clean[:, L:], d.clean[:, : L - 1])  # second copy repeats the first
    assert torch.equal(d.answers[:, 0], d.clean[:, L - 1])  # next token of the repeat
    assert torch.equal(d.corrupt[:, :L], d.clean[:, :L])
    for i in range(8):
        first, fresh = set(d.clean[i, :L].tolist()), set(d.corrupt[i, L:].tolist())
        assert len(first) == L and len(fresh) == L - 1 and not first & fresh
        assert d.wrong[i, 0].item() not in first | fresh
    assert int(d.clean.max()) < 101 and d.answer_pos.tolist() == [2 * L - 2] * 8
    assert d.prompts is None


def test_induction_bos_and_errors(tok):
    d = tasks.induction(101, n=2, seq_len=3, prepend_bos=True, bos_token_id=0)
    assert d.clean[:, 0].tolist() == [0, 0] and (d.clean[:, 1:] != 0).all()
    with pytest.raises(ValueError, match="needs bos_token_id"):
        tasks.induction(101, n=2, prepend_bos=True)
    with pytest.raises(ValueError, match=r"induction with seq_len=60 needs 120 distinct token ids, but the vocabulary "
                                         r"has only 101 usable ids\. Fix: lower seq_len"):
        tasks.induction(101, n=2, seq_len=60)
    g = tasks.induction(tok, n=2, seq_len=4, prepend_bos=True)
    assert g.clean[:, 0].eq(tok.bos_token_id).all() and not g.clean[:, 1:].eq(tok.bos_token_id).any()


def test_induction_runs_on_a_small_vocab_model():
    from edgepatch.models import random_model

    model = random_model("tiny", seed=0)
    d = tasks.induction(model.cfg.d_vocab, n=4, seq_len=6, seed=0).validate(model)
    with torch.no_grad():
        out = logit_diff(model(d.clean), d)
    assert out.shape == (4,) and torch.isfinite(out).all()
    for cls in HAVE:  # the model itself: it has no tokenizer, so its vocabulary size
        m = random_model("tiny", model_class=cls, seed=0)
        assert torch.equal(tasks.induction(m, n=4, seq_len=6, seed=0).clean, d.clean)


def test_sva_structure(tok):
    d = tasks.sva(tok, n=12, seed=0)
    is_, are = tok(" is").input_ids[0], tok(" are").input_ids[0]
    for i in range(len(d)):
        plural = d.meta["plural"][i]
        assert d.answers[i, 0] == (are if plural else is_) and d.wrong[i, 0] == (is_ if plural else are)
        clean_subj, corrupt_subj = d.prompts[i].split()[1], d.corrupt_prompts[i].split()[1]
        sing, plur = (corrupt_subj, clean_subj) if plural else (clean_subj, corrupt_subj)
        assert (sing, plur) in tasks.SVA_SUBJECTS
        assert d.prompts[i].split()[2:] == d.corrupt_prompts[i].split()[2:]
    assert d.meta["plural"] == [False, True] * 6


@pytest.mark.parametrize("model_class", ["hooked", "bridge"])
def test_random_models_with_gpt2_vocabulary_carry_its_tokenizer(tok, model_class):
    """A random model with GPT-2's vocabulary takes the string tasks straight from itself (its tokenizer is
    GPT-2's, offline); one with a smaller vocabulary has no tokenizer, in either class, rather than one
    whose ids it cannot embed."""
    from edgepatch.models import random_model

    model = random_model("tiny", model_class=model_class, d_vocab=50257)
    d = tasks.ioi(model, n=2, seed=0).validate(model)
    assert torch.equal(d.clean, tasks.ioi(tok, n=2, seed=0).clean)
    assert getattr(random_model("tiny", model_class=model_class), "tokenizer", None) is None


def test_tokenizer_can_be_a_model_like_object(tok):
    class FakeModel(torch.nn.Module):
        tokenizer = tok

    d = tasks.sva(FakeModel(), n=2)
    assert torch.equal(d.clean, tasks.sva(tok, n=2).clean)


def test_get_task_and_bad_n(tok):
    assert tasks.get_task("ioi") is tasks.ioi
    with pytest.raises(ValueError, match=r"Unknown task 'ioj'\. Did you mean 'ioi'\? Known tasks: greater_than, "
                                         r"induction, ioi, sva\."):
        tasks.get_task("ioj")
    with pytest.raises(ValueError, match="n must be a positive int"):
        tasks.ioi(tok, n=0)
