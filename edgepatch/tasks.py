"""Circuit-discovery tasks, generated locally from templates with a seed (no downloads).

Context
-------
Each task is a behaviour a language model shows on a family of prompts, plus a *corruption* that removes
the information the behaviour needs while keeping the prompt's shape. Patching the corrupted run into
the clean run along a set of edges, and watching a metric (``edgepatch.metrics``), tells which edges
carry that information: the circuit.

================  =============================================================  ===========================
task              clean -> answer (wrong)                                        corruption
================  =============================================================  ===========================
``ioi``           "When Mary and John went to the store, John gave a drink to"    the three names -> three
                  -> " Mary" (" John"); indirect object identification,          other names ("ABC"), as in
                  Wang et al. 2022                                               the paper
``greater_than``  "The war lasted from the year 1732 to the year 17" -> "33"      start year -> "01"
                  ("31"); Hanna et al. 2023. Score with ``prob_diff_years``
``induction``     random tokens ``A B C ... A B`` -> ``C``                       second copy -> fresh random
                                                                                 tokens
``sva``           "The key near the cabinets" -> " is" (" are"); subject-verb    subject's number swapped
                  agreement (Linzen et al. 2016)                                 ("keys")
================  =============================================================  ===========================

Every generator takes ``(tokenizer, n=..., seed=0, ...)`` and returns ``edgepatch.data.PromptPairs``.
The tokenizer may also be a model with a ``.tokenizer``. Generation is tokenizer-aware: names, nouns and
years are kept only when every answer / wrong answer is one token and each clean prompt has as many tokens
as its corrupted twin, so the same generator works for GPT-2, Pythia or Llama tokenizers (a task that the
tokenizer cannot express raises ``ValueError``). The same seed gives identical tensors; different seeds
give different prompts. Strings are used as written (no BOS) unless ``prepend_bos=True``.

Example
-------
>>> from edgepatch.tokenizers import gpt2_tokenizer
>>> data = ioi(gpt2_tokenizer(), n=8, seed=0)
>>> data.prompts[1]
'While Emily and Morgan were commuting to the station, Emily gave a necklace to'
>>> data.corrupt_prompts[1]
'While Marco and Carl were commuting to the station, Ian gave a necklace to'
"""

from __future__ import annotations

import difflib
import random
from typing import Any, Callable, Sequence

import torch

from edgepatch.data import PromptPairs, as_tokenizer, encode

__all__ = ["ioi", "greater_than", "induction", "sva", "TASKS", "get_task"]

# --------------------------------------------------------------------------------------------- IOI
# Names, places and objects follow the IOI paper's generator (Wang et al. 2022, github.com/redwoodresearch/
# Easy-Transformer); names are kept only if " Name" is one token for the tokenizer in use.
IOI_NAMES = (
    "Aaron Adam Alan Alex Alice Amy Anderson Andre Andrew Andy Anna Anthony Arthur Austin Blake Brandon Brian "
    "Carl Charles Chris Christian Christopher Daniel David Dean Edward Elizabeth Emily Eric Eva Frank George "
    "Georgia Graham Grant Henry Ian Jack Jacob Jake James Jane Jason Jay Jennifer Jeremy Jessica John Jonathan "
    "Jordan Joseph Joshua Justin Kate Kelly Kevin Kyle Laura Leon Lewis Lisa Louis Luke Madison Marco Marcus "
    "Maria Mark Martin Mary Matthew Max Michael Michelle Morgan Patrick Paul Peter Prince Rachel Richard River "
    "Robert Roman Rose Ruby Russell Ryan Sarah Scott Sean Simon Stephen Steven Sullivan Taylor Thomas Tyler "
    "Victoria Warren William"
).split()
IOI_PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
IOI_OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")

# The token slots of ioi's meta["positions"] (positions="named" in attribute and sweep)
IOI_SLOTS = ("IO", "S1", "S1+1", "S2", "END", "other")

# {N1} and {N2} are the two names introduced first; {S} is the subject who repeats. ABBA: N1 = IO,
# N2 = S ("When Mary and John ..., John gave ... to" -> Mary); BABA: N1 = S, N2 = IO.
IOI_TEMPLATES = (
    "Then, {N1} and {N2} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Then, {N1} and {N2} had a lot of fun at the {PLACE}. {S} gave a {OBJECT} to",
    "Then, {N1} and {N2} were working at the {PLACE}. {S} decided to give a {OBJECT} to",
    "Then, {N1} and {N2} were thinking about going to the {PLACE}. {S} wanted to give a {OBJECT} to",
    "Then, {N1} and {N2} had a long argument, and afterwards {S} said to",
    "After {N1} and {N2} went to the {PLACE}, {S} gave a {OBJECT} to",
    "When {N1} and {N2} got a {OBJECT} at the {PLACE}, {S} decided to give it to",
    "When {N1} and {N2} got a {OBJECT} at the {PLACE}, {S} decided to give the {OBJECT} to",
    "While {N1} and {N2} were working at the {PLACE}, {S} gave a {OBJECT} to",
    "While {N1} and {N2} were commuting to the {PLACE}, {S} gave a {OBJECT} to",
    "After the lunch, {N1} and {N2} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Afterwards, {N1} and {N2} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Then, {N1} and {N2} had a long argument. Afterwards {S} said to",
    "The {PLACE} {N1} and {N2} went to had a {OBJECT}. {S} gave it to",
    "Friends {N1} and {N2} found a {OBJECT} at the {PLACE}. {S} gave it to",
    "When {N1} and {N2} went to the {PLACE}, {S} gave a {OBJECT} to",
)

_IOI_ORDERS = ("mixed", "ABBA", "BABA")


def _check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int (number of prompt pairs), got {n!r}.")


def _single_token_words(tok: Any, words: Sequence[str], prefix: str = " ") -> list[str]:
    """The words whose ``prefix + word`` is exactly one token, in their given order."""
    ids = encode(tok, [prefix + w for w in words])
    return [w for w, i in zip(words, ids) if len(i) == 1]


def _same_length(tok: Any, a: str, b: str) -> bool:
    ia, ib = encode(tok, [a, b])
    return len(ia) == len(ib)


def ioi(
    tokenizer: Any,
    n: int = 64,
    seed: int = 0,
    templates: str = "mixed",
    prepend_bos: bool = False,
) -> PromptPairs:
    """Indirect object identification (Wang et al. 2022) with the "ABC" corruption.

    Clean: "When Mary and John went to the store, John gave a drink to" -> answer " Mary" (the indirect
    object, IO), wrong " John" (the repeated subject, S). Corrupt: the three name slots get three other
    distinct names ("When Alice and Bob went to the store, Carl gave a drink to"), so the prompt no
    longer says who the IO is. ``templates`` picks the name order: ``"ABBA"`` (IO named first),
    ``"BABA"`` (S named first) or ``"mixed"`` (alternating, half each). Per-prompt ``meta``: ``order``,
    ``template`` (index into ``IOI_TEMPLATES``), ``io``, ``s``, and ``positions``: each token's slot
    (``[n, pos]``, indices into ``meta["slot_names"]`` = ``IOI_SLOTS``: the paper's IO, S1, S1+1, S2 and
    END, and "other" for every other real token; -1 on padding), for per-position circuits
    (``ep.attribute(..., positions="named")``).

    >>> from edgepatch.tokenizers import gpt2_tokenizer
    >>> d = ioi(gpt2_tokenizer(), n=4, seed=1, templates="BABA")
    >>> d.meta["order"]
    ['BABA', 'BABA', 'BABA', 'BABA']
    >>> d.prompts[0]
    'Then, Madison and Brandon had a long argument, and afterwards Madison said to'
    >>> [d.meta["slot_names"][i] for i in d.meta["positions"][0].tolist()]  # doctest: +NORMALIZE_WHITESPACE
    ['other', 'other', 'S1', 'S1+1', 'IO', 'other', 'other', 'other', 'other', 'other', 'other', 'other',
     'S2', 'other', 'END']
    """
    _check_n(n)
    if templates not in _IOI_ORDERS:
        close = difflib.get_close_matches(str(templates), _IOI_ORDERS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"templates must be one of {list(_IOI_ORDERS)}, got {templates!r}.{hint}")
    tok = as_tokenizer(tokenizer)
    names = _single_token_words(tok, IOI_NAMES)
    if len(names) < 5:
        raise ValueError(
            f"ioi needs at least 5 names that are one token with a leading space for this tokenizer; only "
            f"{len(names)} of {len(IOI_NAMES)} are ({names}). This tokenizer cannot express the task."
        )
    rng = random.Random(seed)
    clean, corrupt, answers, wrong = [], [], [], []
    meta: dict[str, list] = {"order": [], "template": [], "io": [], "s": []}
    name_ids = {name: encode(tok, [" " + name])[0][0] for name in names}
    where: list[tuple[int, int, int]] = []  # per prompt: the token indices of IO, S1 and S2
    attempts = 0
    while len(clean) < n:
        attempts += 1
        if attempts > 50 * n:
            raise ValueError(
                f"ioi could only build {len(clean)} of {n} prompts whose clean and corrupted versions have the "
                "same token length with this tokenizer."
            )
        i = len(clean)
        order = templates if templates != "mixed" else ("ABBA" if i % 2 == 0 else "BABA")
        t_idx = rng.randrange(len(IOI_TEMPLATES))
        template = IOI_TEMPLATES[t_idx]
        place, obj = rng.choice(IOI_PLACES), rng.choice(IOI_OBJECTS)
        io, s, x, y, z = rng.sample(names, 5)
        n1, n2 = (io, s) if order == "ABBA" else (s, io)
        c = template.format(N1=n1, N2=n2, S=s, PLACE=place, OBJECT=obj)
        k = template.format(N1=x, N2=y, S=z, PLACE=place, OBJECT=obj)
        ic, ik = encode(tok, [c, k])
        at_io = [j for j, t in enumerate(ic) if t == name_ids[io]]
        at_s = [j for j, t in enumerate(ic) if t == name_ids[s]]
        if len(ic) != len(ik) or len(at_io) != 1 or len(at_s) != 2:
            continue  # (a name merged with its neighbour into another token: its position is not known)
        where.append((at_io[0], at_s[0], at_s[1]))
        clean.append(c)
        corrupt.append(k)
        answers.append(" " + io)
        wrong.append(" " + s)
        for key, value in (("order", order), ("template", t_idx), ("io", io), ("s", s)):
            meta[key].append(value)
    data = PromptPairs.from_strings(
        tok, clean, corrupt, answers, wrong, prepend_bos=prepend_bos,
        meta={"task": "ioi", **meta}, per_prompt_keys=tuple(meta),
    )
    # the named positions of Wang et al. 2022: IO, S1, S1+1, S2, END; every other real token is "other"
    slots = torch.where(data.attention_mask, IOI_SLOTS.index("other"), -1)
    shift = int(prepend_bos)
    for i, (at_io, at_s1, at_s2) in enumerate(where):
        for name, j in (("IO", at_io), ("S1", at_s1), ("S1+1", at_s1 + 1), ("S2", at_s2)):
            slots[i, j + shift] = IOI_SLOTS.index(name)
        slots[i, int(data.answer_pos[i])] = IOI_SLOTS.index("END")
    data.meta.update(positions=slots, slot_names=IOI_SLOTS)
    data.per_prompt_keys = (*data.per_prompt_keys, "positions")
    return data


# ------------------------------------------------------------------------------------ greater-than
# Nouns of Hanna et al. 2023 ("How does GPT-2 compute greater-than?"), a subset.
GREATER_THAN_NOUNS = (
    "abduction accord affair agreement appraisal assaults assessment attack attempts campaign captivity case "
    "challenge chaos clash collaboration coma competition confrontation consequence conspiracy construction "
    "consultation contact contract convention cooperation custody deal decline decrease demonstrations "
    "development disagreement disorder dispute domination dynasty effect effort employment endeavor engagement "
    "epidemic evaluation exchange existence expansion expedition experiments fall fame flights friendship growth "
    "hardship hostility illness impact imprisonment improvement incarceration increase insurgency invasion "
    "investigation journey kingdom marriage modernization negotiation notoriety obstruction operation order "
    "outbreak outcome overhaul patrols pilgrimage plague plan practice process program progress project pursuit "
    "quest raids reforms reign relationship retaliation riot rise rivalry romance rule sanctions shift siege "
    "slump stature stint strikes study test testing tests therapy tour tradition treaty trial trip "
    "unemployment voyage war warfare work"
).split()


def greater_than(
    tokenizer: Any,
    n: int = 64,
    seed: int = 0,
    centuries: Sequence[int] = (17,),
    prepend_bos: bool = False,
) -> PromptPairs:
    """Greater-than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17" -> a year > 32.

    The start year ``YY`` is drawn from 02..98 among years where " {century}{YY}" tokenizes as
    " {century}" + "YY" (true for GPT-2). Corrupt: ``YY = 01`` ("... from the year 1701 to the year 17"),
    the paper's baseline. ``answers`` = the token of ``YY + 1`` and ``wrong`` = the token of ``YY - 1`` (so
    ``logit_diff`` works), but the paper's metric is ``metrics.prob_diff_years``: the probability of all
    years > YY minus that of years <= YY. It reads ``meta["year"]`` (``[batch]`` YY ints) and
    ``meta["year_tokens"]`` (``[100]`` ids of "00".."99"). Also per prompt: ``meta["century"]``,
    ``meta["noun"]``.

    >>> from edgepatch.tokenizers import gpt2_tokenizer
    >>> d = greater_than(gpt2_tokenizer(), n=2, seed=0)
    >>> d.prompts[0].startswith("The "), d.meta["year_tokens"].shape
    (True, torch.Size([100]))
    """
    _check_n(n)
    tok = as_tokenizer(tokenizer)
    two_digit = [f"{y:02d}" for y in range(100)]
    year_ids = encode(tok, two_digit)
    not_single = [s for s, ids in zip(two_digit, year_ids) if len(ids) != 1]
    if not_single:
        raise ValueError(
            "greater_than needs a tokenizer where every two-digit number '00'..'99' is one token (like GPT-2); "
            f"this one splits {len(not_single)} of them, e.g. {not_single[:5]}. Use a GPT-2-style tokenizer."
        )
    year_tokens = torch.tensor([ids[0] for ids in year_ids], dtype=torch.long)
    centuries = [int(c) for c in centuries]
    if not centuries:
        raise ValueError("centuries must name at least one century, e.g. (17,).")
    valid: dict[int, list[int]] = {}
    for c in centuries:
        century_ids = encode(tok, [f" {c}"])[0]
        if len(century_ids) != 1:
            raise ValueError(f"greater_than: ' {c}' is {len(century_ids)} tokens for this tokenizer; expected one. "
                             "Choose centuries that are single tokens (GPT-2: 11..19).")
        years = encode(tok, [f" {c}{y:02d}" for y in range(100)])
        split_ok = [ids == century_ids + [int(year_tokens[y])] for y, ids in enumerate(years)]
        if not split_ok[1]:
            raise ValueError(f"greater_than: the corrupted year ' {c}01' does not tokenize as ' {c}' + '01'.")
        valid[c] = [y for y in range(2, 99) if split_ok[y]]
        if not valid[c]:
            raise ValueError(f"greater_than: no year ' {c}YY' tokenizes as ' {c}' + 'YY' for this tokenizer.")
    rng = random.Random(seed)
    clean, corrupt, answers, wrong = [], [], [], []
    meta: dict[str, list] = {"year": [], "century": [], "noun": []}
    for _ in range(n):
        c = rng.choice(centuries)
        yy = rng.choice(valid[c])
        noun = rng.choice(GREATER_THAN_NOUNS)
        clean.append(f"The {noun} lasted from the year {c}{yy:02d} to the year {c}")
        corrupt.append(f"The {noun} lasted from the year {c}01 to the year {c}")
        answers.append(int(year_tokens[yy + 1]))
        wrong.append(int(year_tokens[yy - 1]))
        meta["year"].append(yy)
        meta["century"].append(c)
        meta["noun"].append(noun)
    return PromptPairs.from_strings(
        tok, clean, corrupt, answers, wrong, prepend_bos=prepend_bos,
        meta={"task": "greater_than", "year": torch.tensor(meta["year"], dtype=torch.long),
              "year_tokens": year_tokens, "century": meta["century"], "noun": meta["noun"]},
        per_prompt_keys=("year", "century", "noun"),
    )


# --------------------------------------------------------------------------------------- induction
def induction(
    tokenizer_or_vocab_size: Any,
    n: int = 64,
    seq_len: int = 10,
    seed: int = 0,
    prepend_bos: bool = False,
    bos_token_id: int | None = None,
) -> PromptPairs:
    """Induction: a random token sequence, then its repeat; predict the repeat's next token.

    Clean: ``[BOS] t_1 ... t_L t_1 ... t_{L-1}`` -> answer ``t_L`` (``L = seq_len``, tokens distinct).
    Corrupt: the second half is replaced by ``L - 1`` fresh random tokens that do not occur in the first
    half, so there is nothing to copy. ``wrong`` is another random token that occurs in neither. Pass a
    tokenizer (special tokens are never sampled; ``prepend_bos`` uses its ``bos_token_id``), a model (its
    tokenizer, or without one its ``cfg.d_vocab``) or an int vocabulary size for small models (then
    ``prepend_bos`` needs ``bos_token_id``, which is not sampled).
    Every prompt has ``2 * seq_len - 1`` tokens (+1 with BOS).

    >>> d = induction(101, n=3, seq_len=4, seed=0)
    >>> d.clean.shape, bool((d.clean[:, :3] == d.clean[:, 4:]).all())
    (torch.Size([3, 7]), True)
    >>> bool((d.answers[:, 0] == d.clean[:, 3]).all())
    True
    """
    _check_n(n)
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2 (length of the repeated sequence), got {seq_len!r}.")
    tok = None
    cfg = getattr(tokenizer_or_vocab_size, "cfg", None)
    if (isinstance(tokenizer_or_vocab_size, torch.nn.Module) and getattr(tokenizer_or_vocab_size, "tokenizer", None)
            is None and isinstance(getattr(cfg, "d_vocab", None), int)):
        tokenizer_or_vocab_size = cfg.d_vocab  # a model without a tokenizer (random weights): its vocabulary
    if isinstance(tokenizer_or_vocab_size, int) and not isinstance(tokenizer_or_vocab_size, bool):
        vocab_size = tokenizer_or_vocab_size
        excluded = set() if bos_token_id is None else {int(bos_token_id)}
        if prepend_bos and bos_token_id is None:
            raise ValueError("prepend_bos=True with an int vocabulary size needs bos_token_id=... "
                             "(the id to put first).")
        bos = bos_token_id
    else:
        tok = as_tokenizer(tokenizer_or_vocab_size)
        vocab_size = len(tok) if hasattr(tok, "__len__") else int(tok.vocab_size)
        excluded = {int(i) for i in getattr(tok, "all_special_ids", []) or []}
        bos = bos_token_id if bos_token_id is not None else getattr(tok, "bos_token_id", None)
        if prepend_bos and bos is None:
            raise ValueError("prepend_bos=True but the tokenizer has no bos_token_id; pass bos_token_id=....")
    pool = torch.tensor([i for i in range(vocab_size) if i not in excluded], dtype=torch.long)
    need = 2 * seq_len  # L first-half tokens, L - 1 corrupt tokens, 1 wrong token, all distinct
    if len(pool) < need:
        raise ValueError(
            f"induction with seq_len={seq_len} needs {need} distinct token ids, but the vocabulary has only "
            f"{len(pool)} usable ids. Fix: lower seq_len or use a larger vocabulary."
        )
    gen = torch.Generator().manual_seed(seed)
    draws = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:need]] for _ in range(n)])  # [batch, need]
    first = draws[:, :seq_len]
    fresh = draws[:, seq_len : 2 * seq_len - 1]
    clean = torch.cat([first, first[:, :-1]], dim=1)
    corrupt = torch.cat([first, fresh], dim=1)
    if prepend_bos:
        bos_col = torch.full((n, 1), int(bos), dtype=torch.long)
        clean, corrupt = torch.cat([bos_col, clean], 1), torch.cat([bos_col, corrupt], 1)
    prompts = corrupt_prompts = None
    if tok is not None and hasattr(tok, "decode"):
        prompts = [tok.decode(row.tolist()) for row in clean]
        corrupt_prompts = [tok.decode(row.tolist()) for row in corrupt]
    return PromptPairs.from_tokens(
        clean, corrupt, answers=first[:, -1:], wrong=draws[:, -1:], prompts=prompts,
        corrupt_prompts=corrupt_prompts, meta={"task": "induction", "seq_len": seq_len, "vocab_size": vocab_size},
    )


# --------------------------------------------------------------------------------------------- SVA
SVA_SUBJECTS = (
    ("key", "keys"), ("author", "authors"), ("pilot", "pilots"), ("surgeon", "surgeons"), ("farmer", "farmers"),
    ("manager", "managers"), ("customer", "customers"), ("officer", "officers"), ("teacher", "teachers"),
    ("senator", "senators"), ("dancer", "dancers"), ("doctor", "doctors"), ("lawyer", "lawyers"),
    ("driver", "drivers"), ("student", "students"), ("painting", "paintings"), ("picture", "pictures"),
    ("label", "labels"), ("report", "reports"), ("friend", "friends"), ("player", "players"),
    ("worker", "workers"), ("writer", "writers"), ("guard", "guards"),
)
SVA_ATTRACTORS = (
    ("cabinet", "cabinets"), ("table", "tables"), ("car", "cars"), ("house", "houses"), ("tree", "trees"),
    ("window", "windows"), ("door", "doors"), ("building", "buildings"), ("desk", "desks"), ("wall", "walls"),
    ("box", "boxes"), ("church", "churches"),
)
SVA_PREPOSITIONS = ("near", "behind", "beside", "next to", "in front of", "by")


def sva(
    tokenizer: Any,
    n: int = 64,
    seed: int = 0,
    verbs: tuple[str, str] = (" is", " are"),
    prepend_bos: bool = False,
) -> PromptPairs:
    """Subject-verb agreement across an attractor: "The key near the cabinets" -> " is" (wrong " are").

    Prompts are "The {subject} {preposition} the {attractor}", subjects alternate singular / plural, the
    attractor's number is random (so half the prompts have an attractor of the other number). Corrupt: the
    subject's number is swapped ("The keys near the cabinets"), keeping only noun pairs whose singular and
    plural have the same token length. ``verbs`` = (singular, plural) verb strings, each one token.
    Per-prompt ``meta``: ``plural`` (subject is plural), ``attractor_plural``.

    >>> from edgepatch.tokenizers import gpt2_tokenizer
    >>> d = sva(gpt2_tokenizer(), n=2, seed=0)
    >>> d.prompts[0], d.corrupt_prompts[0]
    ('The lawyer in front of the doors', 'The lawyers in front of the doors')
    """
    _check_n(n)
    if len(verbs) != 2:
        raise ValueError(f"verbs must be (singular, plural), e.g. (' is', ' are'); got {verbs!r}.")
    tok = as_tokenizer(tokenizer)
    subjects = [p for p in SVA_SUBJECTS if _same_length(tok, " " + p[0], " " + p[1])]
    if not subjects:
        raise ValueError("sva: no subject noun has singular and plural of the same token length for this tokenizer.")
    rng = random.Random(seed)
    clean, corrupt, answers, wrong = [], [], [], []
    meta: dict[str, list] = {"plural": [], "attractor_plural": []}
    for i in range(n):
        plural = i % 2 == 1
        subj = rng.choice(subjects)
        attractor = rng.choice(SVA_ATTRACTORS)
        attractor_plural = rng.random() < 0.5
        prep = rng.choice(SVA_PREPOSITIONS)
        a = attractor[int(attractor_plural)]
        clean.append(f"The {subj[int(plural)]} {prep} the {a}")
        corrupt.append(f"The {subj[int(not plural)]} {prep} the {a}")
        answers.append(verbs[int(plural)])
        wrong.append(verbs[int(not plural)])
        meta["plural"].append(plural)
        meta["attractor_plural"].append(attractor_plural)
    return PromptPairs.from_strings(
        tok, clean, corrupt, answers, wrong, prepend_bos=prepend_bos,
        meta={"task": "sva", **meta}, per_prompt_keys=tuple(meta),
    )


# ---------------------------------------------------------------------------------------- registry
TASKS: dict[str, Callable[..., PromptPairs]] = {
    "ioi": ioi,
    "greater_than": greater_than,
    "induction": induction,
    "sva": sva,
}


def get_task(name: str) -> Callable[..., PromptPairs]:
    """The task generator called ``name``; unknown names raise ``ValueError`` with close matches.

    >>> get_task("ioi") is ioi
    True
    """
    if name not in TASKS:
        close = difflib.get_close_matches(str(name), list(TASKS), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"Unknown task {name!r}.{hint} Known tasks: {', '.join(sorted(TASKS))}.")
    return TASKS[name]
