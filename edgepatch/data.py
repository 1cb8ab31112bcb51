"""Prompt pairs: the data every patching experiment runs on.

Context
-------
Activation and edge patching compare two forwards of the same model: a *clean* prompt, on which the
model does the task ("When Mary and John went to the store, John gave a drink to" -> " Mary"), and a
*corrupted* prompt that differs only in what the task depends on ("When Alice and Bob went to the store,
Carl gave a drink to"). Activations of the corrupted run replace clean ones along the ablated edges, and
a metric (``edgepatch.metrics``) scores the next-token prediction at one position per prompt, usually
the correct answer's logit minus a wrong answer's logit.

Because patching mixes the two runs position by position, a clean prompt and its corrupted twin must have
the **same number of tokens**; they then share one attention mask and one scored position.

``PromptPairs`` holds a batch of such pairs as tensors:

=====================  ==========================  ===================================================
field                  shape                       meaning
=====================  ==========================  ===================================================
``clean``              ``[batch, pos]`` long       clean token ids, padded on the right
``corrupt``            ``[batch, pos]`` long       corrupted token ids, same lengths as ``clean``
``answers``            ``[batch, n_answers]`` long correct next-token ids (usually ``n_answers = 1``)
``wrong``              ``[batch, n_wrong]`` long   wrong next-token ids (usually ``n_wrong = 1``)
``attention_mask``     ``[batch, pos]`` bool       True on real tokens, False on right padding
``answer_pos``         ``[batch]`` long            position whose next-token prediction is scored:
                                                   the last real token
``prompts``            list of ``batch`` str       clean prompts, for display (optional)
``corrupt_prompts``    list of ``batch`` str       corrupted prompts, for display (optional)
``meta``               dict                        anything else; keys named in ``per_prompt_keys``
                                                   hold one value per prompt and are indexed with the
                                                   batch (``data[:8]`` keeps the matching 8 values)
=====================  ==========================  ===================================================

Padding is on the right so that, under a causal mask, padding never changes what real tokens see and
position indices of real tokens are the same as in an unpadded forward.

Example
-------
>>> from edgepatch.tokenizers import gpt2_tokenizer
>>> data = PromptPairs.from_strings(
...     gpt2_tokenizer(),
...     clean=["When Mary and John went to the store, John gave a drink to"],
...     corrupt=["When Alice and Bob went to the store, Carl gave a drink to"],
...     answers=[" Mary"], wrong=[" John"])
>>> data
PromptPairs(1 prompts, pos 14, n_answers 1, n_wrong 1)
>>> data.answer_pos.tolist()
[13]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

__all__ = ["PromptPairs", "as_tokenizer", "encode"]


def as_tokenizer(tokenizer: Any) -> Any:
    """Return a HuggingFace-style tokenizer: ``tokenizer`` itself, or a model's ``.tokenizer``.

    Accepting a model lets users write ``ep.tasks.ioi(model)`` as well as ``ep.tasks.ioi(model.tokenizer)``.
    """
    if isinstance(tokenizer, torch.nn.Module):
        tok = getattr(tokenizer, "tokenizer", None)
        if tok is None:
            raise ValueError(
                f"Got a {type(tokenizer).__name__} with no tokenizer attached; expected a tokenizer. "
                "Fix: pass a HuggingFace tokenizer (e.g. edgepatch.tokenizers.gpt2_tokenizer())."
            )
        return tok
    if not callable(tokenizer) and not hasattr(tokenizer, "encode"):
        raise TypeError(
            f"Expected a HuggingFace-style tokenizer (callable, or with .encode), got {type(tokenizer).__name__}."
        )
    return tokenizer


def encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Tokenize each string exactly as given: no special tokens added, no spaces added or stripped.

    >>> from edgepatch.tokenizers import gpt2_tokenizer
    >>> encode(gpt2_tokenizer(), [" Mary", "Mary"])
    [[5335], [24119]]
    """
    tok = as_tokenizer(tokenizer)
    texts = list(texts)
    if not texts:
        return []
    if callable(tok):
        try:
            out = tok(texts, add_special_tokens=False)
            ids = out["input_ids"] if not hasattr(out, "input_ids") else out.input_ids
            return [list(map(int, row)) for row in ids]
        except TypeError:
            pass
    return [list(map(int, tok.encode(t, add_special_tokens=False))) for t in texts]


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _token_strs(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token decoded on its own (readable: ' a' rather than byte-level 'Ġa')."""
    try:
        return [tokenizer.decode([i]) for i in ids]
    except Exception:  # pragma: no cover - exotic tokenizers
        return [str(i) for i in ids]


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _int_tensor(name: str, value: Any, ndim: tuple[int, ...], hint: str) -> Tensor:
    """Convert to a long tensor with one of the allowed ndims, or raise naming what was given."""
    if not isinstance(value, Tensor):
        try:
            value = torch.as_tensor(value)
        except Exception as err:
            raise TypeError(
                f"{name} must be a tensor (or rectangular nested list) of token ids, got {type(value).__name__} "
                f"that torch cannot convert ({err}). {hint} Pad rows to one length (and pass attention_mask)."
            ) from err
    if value.numel() == 0 and name in ("clean", "corrupt"):  # (the others' sizes are checked against them)
        raise ValueError(f"{name} is empty (shape {list(value.shape)}); a PromptPairs needs at least one prompt. {hint}")
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise TypeError(
            f"{name} must hold integer token ids (torch.long), got dtype {value.dtype}. "
            f"Fix: pass integer ids (e.g. `.long()` on a tensor of ids). {hint}"
        )
    if value.ndim not in ndim:
        expected = " or ".join(f"{d}-D" for d in ndim)
        raise ValueError(f"{name} must be {expected}, got shape {tuple(value.shape)}. {hint}")
    return value.long()


@dataclass(eq=False, repr=False)
class PromptPairs:
    """A batch of clean/corrupted prompt pairs with answer and wrong-answer token ids.

    See the module docstring for the fields. Build one with ``PromptPairs.from_strings`` (tokenizes),
    ``PromptPairs.from_tokens`` (ids you already have) or a generator in ``edgepatch.tasks``.

    >>> d = PromptPairs.from_tokens(clean=[[1, 2, 3]], corrupt=[[1, 4, 3]], answers=[5], wrong=[6])
    >>> d.answers.shape, d.answer_pos.tolist()
    (torch.Size([1, 1]), [2])
    >>> len(d[0:1]), d.to("cpu").clean.device.type
    (1, 'cpu')
    """

    clean: Int[Tensor, "batch pos"]
    corrupt: Int[Tensor, "batch pos"]
    answers: Int[Tensor, "batch n_answers"]
    wrong: Int[Tensor, "batch n_wrong"]
    attention_mask: Bool[Tensor, "batch pos"]
    answer_pos: Int[Tensor, "batch"]
    prompts: list[str] | None = None
    corrupt_prompts: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    per_prompt_keys: tuple[str, ...] = ()

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        fix_tokens = "Build it with PromptPairs.from_strings or PromptPairs.from_tokens."
        self.clean = _int_tensor("clean", self.clean, (2,), "Expected [batch, pos] token ids. " + fix_tokens)
        self.corrupt = _int_tensor("corrupt", self.corrupt, (2,), "Expected [batch, pos] token ids. " + fix_tokens)
        self.answers = _int_tensor("answers", self.answers, (1, 2), "Expected [batch] or [batch, n_answers] ids.")
        self.wrong = _int_tensor("wrong", self.wrong, (1, 2), "Expected [batch] or [batch, n_wrong] ids.")
        self.answer_pos = _int_tensor("answer_pos", self.answer_pos, (1,), "Expected [batch] positions.")
        if self.answers.ndim == 1:
            self.answers = self.answers[:, None]
        if self.wrong.ndim == 1:
            self.wrong = self.wrong[:, None]

        if self.clean.shape != self.corrupt.shape:
            raise ValueError(
                f"clean and corrupt must have the same shape [batch, pos], got clean {tuple(self.clean.shape)} "
                f"and corrupt {tuple(self.corrupt.shape)}. Each corrupted prompt must have as many tokens as "
                "its clean prompt (they share one attention mask); pad both on the right to the same length."
            )
        batch, pos = self.clean.shape
        if batch == 0 or pos == 0:
            raise ValueError(f"PromptPairs needs at least one prompt and one position, got shape {(batch, pos)}.")

        mask = self.attention_mask
        if not isinstance(mask, Tensor):
            mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
                raise TypeError(
                    f"attention_mask must be a bool tensor (True = real token), got dtype {mask.dtype}"
                    f"{'' if mask.is_floating_point() else ' with values other than 0/1'}. "
                    "Fix: pass `mask.bool()` or a 0/1 integer mask."
                )
            mask = mask.bool()
        if tuple(mask.shape) != (batch, pos):
            raise ValueError(
                f"attention_mask must have the shape of clean {(batch, pos)}, got {tuple(mask.shape)}."
            )
        self.attention_mask = mask

        for name in ("answers", "wrong"):
            t = getattr(self, name)
            if t.shape[0] != batch:
                raise ValueError(
                    f"{name} has {t.shape[0]} rows but clean has {batch} prompts; expected {name} of shape "
                    f"[{batch}, n] (one row per prompt)."
                )
            if t.shape[1] == 0:
                raise ValueError(f"{name} must hold at least one token id per prompt, got shape {tuple(t.shape)}.")
        if self.answer_pos.shape[0] != batch:
            raise ValueError(
                f"answer_pos must have shape [{batch}] (one position per prompt), got {tuple(self.answer_pos.shape)}."
            )

        devices = {t.device for t in (self.clean, self.corrupt, self.answers, self.wrong, mask, self.answer_pos)}
        if len(devices) > 1:
            raise ValueError(
                f"All tensors of PromptPairs must be on one device, got {sorted(map(str, devices))}. "
                "Fix: build on one device, then call .to(device)."
            )

        for name in ("clean", "corrupt", "answers", "wrong"):
            t = getattr(self, name)
            if bool((t < 0).any()):
                raise ValueError(f"{name} contains negative token ids (min {int(t.min())}); token ids must be >= 0.")

        if not bool(mask[:, 0].all()):
            row = int((~mask[:, 0]).nonzero()[0])
            raise ValueError(
                f"attention_mask row {row} does not start with a real token; padding must be on the RIGHT and "
                "every prompt needs at least one token. Fix: right-pad (tokenizer.padding_side = 'right')."
            )
        if pos > 1:
            bad = mask[:, 1:] & ~mask[:, :-1]
            if bool(bad.any()):
                row = int(bad.any(dim=1).nonzero()[0])
                raise ValueError(
                    f"attention_mask row {row} has a real token after padding ({mask[row].int().tolist()}); "
                    "padding must be on the RIGHT. Fix: right-pad (tokenizer.padding_side = 'right')."
                )

        ap = self.answer_pos
        if bool(((ap < 0) | (ap >= pos)).any()):
            row = int(((ap < 0) | (ap >= pos)).nonzero()[0])
            raise ValueError(f"answer_pos[{row}] = {int(ap[row])} is outside [0, {pos}).")
        real = mask.gather(1, ap[:, None]).squeeze(1)
        if not bool(real.all()):
            row = int((~real).nonzero()[0])
            raise ValueError(
                f"answer_pos[{row}] = {int(ap[row])} points at padding (prompt {row} has {int(mask[row].sum())} "
                "real tokens). Expected the last real token: attention_mask.sum(1) - 1."
            )

        for name in ("prompts", "corrupt_prompts"):
            value = getattr(self, name)
            if value is not None:
                value = list(value)
                if len(value) != batch:
                    raise ValueError(f"{name} has {len(value)} strings but there are {batch} prompts.")
                setattr(self, name, value)

        if self.meta is None:
            self.meta = {}
        self.meta = dict(self.meta)
        self.per_prompt_keys = tuple(self.per_prompt_keys)
        for key in self.per_prompt_keys:
            if key not in self.meta:
                raise ValueError(
                    f"per_prompt_keys names {key!r} but meta has no such key (meta keys: {sorted(self.meta)})."
                )
            try:
                n = len(self.meta[key])
            except TypeError:
                raise ValueError(
                    f"meta[{key!r}] is per-prompt (per_prompt_keys), so it needs {batch} values, one per prompt; got "
                    f"{type(self.meta[key]).__name__} {self.meta[key]!r}. Give a list or tensor, or leave it out of "
                    f"per_prompt_keys."
                ) from None
            if n != batch:
                raise ValueError(f"meta[{key!r}] is per-prompt, so it needs {batch} values, got {n}.")

    def validate(self, d_vocab: int | Any) -> "PromptPairs":
        """Check every token id is below ``d_vocab`` (an int, or a model with ``cfg.d_vocab``); return self.

        >>> PromptPairs.from_tokens([[1, 2]], [[1, 3]], [4], [5]).validate(10).answers.tolist()
        [[4]]
        """
        if not isinstance(d_vocab, int):
            cfg = getattr(d_vocab, "cfg", None)
            if cfg is None or getattr(cfg, "d_vocab", None) is None:
                raise TypeError(f"validate expects an int vocabulary size or a model with cfg.d_vocab, got "
                                f"{type(d_vocab).__name__}.")
            d_vocab = int(cfg.d_vocab)
        for name in ("clean", "corrupt", "answers", "wrong"):
            t = getattr(self, name)
            top = int(t.max())
            if top >= d_vocab:
                row = int((t >= d_vocab).any(dim=1).nonzero()[0])
                raise ValueError(
                    f"{name} holds token id {top} (first in prompt {row}) but the model's vocabulary has "
                    f"d_vocab = {d_vocab} ids (0..{d_vocab - 1}). Fix: build the data with the model's own "
                    "tokenizer (or vocabulary size)."
                )
        return self

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_tokens(
        cls,
        clean: Any,
        corrupt: Any,
        answers: Any,
        wrong: Any,
        attention_mask: Any = None,
        *,
        answer_pos: Any = None,
        prompts: list[str] | None = None,
        corrupt_prompts: list[str] | None = None,
        meta: dict[str, Any] | None = None,
        per_prompt_keys: Sequence[str] = (),
    ) -> "PromptPairs":
        """Build from token ids (tensors or nested lists) that you already have.

        ``attention_mask`` defaults to all True (no padding); ``answer_pos`` to the last real token.
        ``answers``/``wrong`` may be ``[batch]`` or ``[batch, n]``.

        >>> d = PromptPairs.from_tokens([[7, 8, 9], [7, 8, 0]], [[6, 8, 9], [6, 8, 0]], [1, 2], [3, 4],
        ...                             attention_mask=[[1, 1, 1], [1, 1, 0]])
        >>> d.answer_pos.tolist()
        [2, 1]
        """
        clean_t = _int_tensor("clean", clean, (2,), "Expected [batch, pos] token ids.")
        if attention_mask is None:
            attention_mask = torch.ones(clean_t.shape, dtype=torch.bool, device=clean_t.device)
        mask = attention_mask if isinstance(attention_mask, Tensor) else torch.as_tensor(attention_mask)
        mask = mask.to(clean_t.device)
        # everything follows clean's device
        corrupt = _int_tensor("corrupt", corrupt, (2,), "Expected [batch, pos] token ids.").to(clean_t.device)
        answers = _int_tensor("answers", answers, (1, 2), "Expected [batch] or [batch, n_answers] ids.")
        wrong = _int_tensor("wrong", wrong, (1, 2), "Expected [batch] or [batch, n_wrong] ids.")
        answers, wrong = answers.to(clean_t.device), wrong.to(clean_t.device)
        if answer_pos is None:
            answer_pos = mask.long().sum(dim=-1) - 1 if mask.ndim == 2 else torch.zeros(0, dtype=torch.long)
        return cls(
            clean=clean_t, corrupt=corrupt, answers=answers, wrong=wrong, attention_mask=mask,
            answer_pos=answer_pos, prompts=prompts, corrupt_prompts=corrupt_prompts,
            meta=dict(meta or {}), per_prompt_keys=tuple(per_prompt_keys),
        )

    @classmethod
    def from_strings(
        cls,
        tokenizer: Any,
        clean: Sequence[str],
        corrupt: Sequence[str],
        answers: Sequence[Any],
        wrong: Sequence[Any],
        prepend_bos: bool = False,
        device: str | torch.device | None = None,
        *,
        meta: dict[str, Any] | None = None,
        per_prompt_keys: Sequence[str] = (),
    ) -> "PromptPairs":
        """Tokenize prompt pairs with a HuggingFace-style tokenizer (or a model's ``.tokenizer``).

        Rules:

        - Strings are tokenized **as given**, with no special tokens; ``prepend_bos=True`` puts the
          tokenizer's ``bos_token_id`` in front of every clean and corrupted prompt.
        - ``clean[i]`` and ``corrupt[i]`` must have the same number of tokens.
        - ``answers[i]`` / ``wrong[i]`` is a string, a token id, or a list of them (the same count for every
          prompt). Each string must be exactly ONE token when tokenized as given, so write the form the
          model predicts after the prompt, usually with its leading space: ``" Mary"``, not ``"Mary"``.
        - Prompts are right-padded with the tokenizer's pad (else eos) id; ``answer_pos`` is the last real
          token.

        >>> from edgepatch.tokenizers import gpt2_tokenizer
        >>> d = PromptPairs.from_strings(gpt2_tokenizer(), ["The cat"], ["The dog"], [" sat"], [[" ran", 3]])
        >>> d.clean.tolist(), d.wrong.shape
        ([[464, 3797]], torch.Size([1, 2]))
        """
        tok = as_tokenizer(tokenizer)
        for name, value in (("clean", clean), ("corrupt", corrupt), ("answers", answers), ("wrong", wrong)):
            if isinstance(value, (str, bytes)):
                raise TypeError(
                    f"{name} is a single string {value!r}; pass a list with one entry per prompt, e.g. [{value!r}]."
                )
        clean, corrupt = list(clean), list(corrupt)
        answers, wrong = list(answers), list(wrong)
        n = len(clean)
        if n == 0:
            raise ValueError("from_strings needs at least one prompt, got an empty list.")
        for name, value in (("corrupt", corrupt), ("answers", answers), ("wrong", wrong)):
            if len(value) != n:
                raise ValueError(
                    f"Got {n} clean prompts but {len(value)} {name}; expected one {name} entry per clean prompt."
                )
        for name, texts in (("clean", clean), ("corrupt", corrupt)):
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    raise TypeError(f"{name}[{i}] must be a string, got {type(t).__name__}.")

        clean_ids, corrupt_ids = encode(tok, clean), encode(tok, corrupt)
        if prepend_bos:
            bos = getattr(tok, "bos_token_id", None)
            if bos is None:
                raise ValueError(
                    "prepend_bos=True but the tokenizer has no bos_token_id. Fix: pass prepend_bos=False, or "
                    "set tokenizer.bos_token."
                )
            clean_ids = [[int(bos)] + ids for ids in clean_ids]
            corrupt_ids = [[int(bos)] + ids for ids in corrupt_ids]
        for i, (a, b) in enumerate(zip(clean_ids, corrupt_ids)):
            if len(a) == 0:
                raise ValueError(f"clean[{i}] = {_short(clean[i])} tokenizes to no tokens; prompts must be non-empty.")
            if len(a) != len(b):
                raise ValueError(
                    f"Prompt {i}: clean and corrupt tokenize to different lengths: clean {_short(clean[i])} -> "
                    f"{len(a)} tokens, corrupt {_short(corrupt[i])} -> {len(b)} tokens. Clean and corrupted "
                    "prompts share one attention mask and answer position, so each pair needs the same number "
                    "of tokens. Fix: choose corrupted words with the same token count (e.g. single-token "
                    "names), or build tensors yourself and use PromptPairs.from_tokens."
                )

        answer_ids = _answer_ids(tok, "answers", answers)
        wrong_ids = _answer_ids(tok, "wrong", wrong)

        pos = max(len(ids) for ids in clean_ids)
        pad = _pad_id(tok)
        clean_t = torch.full((n, pos), pad, dtype=torch.long)
        corrupt_t = torch.full((n, pos), pad, dtype=torch.long)
        mask = torch.zeros((n, pos), dtype=torch.bool)
        for i, (a, b) in enumerate(zip(clean_ids, corrupt_ids)):
            clean_t[i, : len(a)] = torch.tensor(a, dtype=torch.long)
            corrupt_t[i, : len(b)] = torch.tensor(b, dtype=torch.long)
            mask[i, : len(a)] = True
        data = cls(
            clean=clean_t, corrupt=corrupt_t, answers=torch.tensor(answer_ids, dtype=torch.long),
            wrong=torch.tensor(wrong_ids, dtype=torch.long), attention_mask=mask,
            answer_pos=mask.sum(dim=1) - 1, prompts=clean, corrupt_prompts=corrupt,
            meta=dict(meta or {}), per_prompt_keys=tuple(per_prompt_keys),
        )
        return data.to(device) if device is not None else data

    # ------------------------------------------------------------------ container protocol
    @property
    def batch(self) -> int:
        """Number of prompt pairs."""
        return int(self.clean.shape[0])

    @property
    def pos(self) -> int:
        """Padded sequence length."""
        return int(self.clean.shape[1])

    @property
    def n_answers(self) -> int:
        return int(self.answers.shape[1])

    @property
    def n_wrong(self) -> int:
        return int(self.wrong.shape[1])

    @property
    def device(self) -> torch.device:
        return self.clean.device

    def __len__(self) -> int:
        return self.batch

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor) -> "PromptPairs":
        """Select prompts; always returns a ``PromptPairs`` (an int gives a batch of one).

        Accepts an int, a slice, a list of ints, or a long / bool index tensor.
        """
        n = self.batch
        if isinstance(index, bool):
            raise TypeError("PromptPairs index must be an int, slice, list of ints or index tensor, not bool.")
        if not isinstance(index, (int, Tensor)) and hasattr(index, "__index__") and getattr(index, "ndim", 0) == 0:
            index = index.__index__()  # a numpy integer
        if isinstance(index, int) or (isinstance(index, Tensor) and index.ndim == 0 and not index.is_floating_point()):
            i = int(index)
            if not -n <= i < n:
                raise IndexError(f"prompt index {i} is out of range for {n} prompts.")
            idx = torch.tensor([i % n], dtype=torch.long)
        elif isinstance(index, slice):
            idx = torch.arange(n)[index]
        else:
            idx = index if isinstance(index, Tensor) else torch.as_tensor(list(index))
            if idx.dtype == torch.bool:
                if idx.shape != (n,):
                    raise IndexError(f"boolean index must have shape ({n},), got {tuple(idx.shape)}.")
                idx = idx.nonzero().squeeze(1)
            elif idx.numel() == 0:
                idx = idx.long()
            elif idx.is_floating_point() or idx.ndim != 1:
                raise IndexError(f"index tensor must be 1-D integer or bool, got dtype {idx.dtype}, shape "
                                 f"{tuple(idx.shape)}.")
            idx = idx.long().cpu()
            if idx.numel() and (int(idx.max()) >= n or int(idx.min()) < -n):
                raise IndexError(f"prompt index out of range for {n} prompts: {idx.tolist()}.")
            idx = idx % n
        if idx.numel() == 0:
            raise IndexError("PromptPairs index selects no prompts; a PromptPairs needs at least one.")
        dev_idx = idx.to(self.device)
        rows = idx.tolist()
        meta = dict(self.meta)
        for key in self.per_prompt_keys:
            meta[key] = _take(self.meta[key], idx, rows)
        return PromptPairs(
            clean=self.clean[dev_idx], corrupt=self.corrupt[dev_idx], answers=self.answers[dev_idx],
            wrong=self.wrong[dev_idx], attention_mask=self.attention_mask[dev_idx],
            answer_pos=self.answer_pos[dev_idx],
            prompts=None if self.prompts is None else [self.prompts[r] for r in rows],
            corrupt_prompts=None if self.corrupt_prompts is None else [self.corrupt_prompts[r] for r in rows],
            meta=meta, per_prompt_keys=self.per_prompt_keys,
        )

    def to(self, device: str | torch.device) -> "PromptPairs":
        """A copy on ``device`` (tensor values in ``meta`` move too)."""
        meta = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.meta.items()}
        return PromptPairs(
            clean=self.clean.to(device), corrupt=self.corrupt.to(device), answers=self.answers.to(device),
            wrong=self.wrong.to(device), attention_mask=self.attention_mask.to(device),
            answer_pos=self.answer_pos.to(device), prompts=self.prompts, corrupt_prompts=self.corrupt_prompts,
            meta=meta, per_prompt_keys=self.per_prompt_keys,
        )

    def batches(self, batch_size: int) -> Iterator["PromptPairs"]:
        """Consecutive batches of at most ``batch_size`` prompts (the last may be smaller).

        >>> d = PromptPairs.from_tokens([[1]] * 5, [[2]] * 5, [3] * 5, [4] * 5)
        >>> [len(b) for b in d.batches(2)]
        [2, 2, 1]
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        for start in range(0, self.batch, batch_size):
            yield self[start : start + batch_size]

    def __repr__(self) -> str:
        task = self.meta.get("task")
        extra = f", task={task!r}" if task is not None else ""
        dev = f", device={self.device}" if self.device.type != "cpu" else ""
        return (f"PromptPairs({self.batch} prompts, pos {self.pos}, n_answers {self.n_answers}, "
                f"n_wrong {self.n_wrong}{extra}{dev})")


def _take(value: Any, idx: Tensor, rows: list[int]) -> Any:
    if isinstance(value, Tensor):
        return value[idx.to(value.device)]
    if isinstance(value, tuple):
        return tuple(value[r] for r in rows)
    return [value[r] for r in rows]


def _answer_ids(tokenizer: Any, name: str, entries: list[Any]) -> list[list[int]]:
    """Turn per-prompt answer entries (str | int | list of them) into a rectangular list of ids."""
    if isinstance(entries, Tensor):  # pragma: no cover - handled by list() in the caller
        entries = entries.tolist()
    out: list[list[int]] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, Tensor):
            entry = entry.tolist()
        items = list(entry) if isinstance(entry, (list, tuple)) else [entry]
        if not items:
            raise ValueError(f"{name}[{i}] is empty; each prompt needs at least one {name} token.")
        ids: list[int] = []
        for j, item in enumerate(items):
            label = f"{name}[{i}]" if len(items) == 1 and not isinstance(entry, (list, tuple)) else f"{name}[{i}][{j}]"
            if isinstance(item, bool):
                raise TypeError(f"{label} must be a string or an int token id, got bool.")
            if not isinstance(item, (int, str, Tensor)) and hasattr(item, "__index__") and getattr(item, "ndim", 0) == 0:
                item = item.__index__()  # a numpy integer
            elif isinstance(item, Tensor) and item.numel() == 1 and not item.is_floating_point():
                item = int(item)
            if isinstance(item, int):
                if item < 0:
                    raise ValueError(f"{label} = {item} is a negative token id.")
                ids.append(int(item))
            elif isinstance(item, str):
                toks = encode(tokenizer, [item])[0]
                if len(toks) != 1:
                    raise ValueError(
                        f"{label} = {item!r} must be exactly one token but tokenizes to {len(toks)}: "
                        f"{_token_strs(tokenizer, toks)} (ids {toks}). Answer strings are tokenized as given: "
                        "write the form the model predicts after the prompt, usually with a leading space "
                        "(' Mary', not 'Mary'), choose a word that is a single token, or pass the token id."
                    )
                ids.append(toks[0])
            else:
                raise TypeError(
                    f"{label} must be a string, an int token id, or a list of them; got {type(item).__name__}."
                )
        out.append(ids)
    counts = {len(ids) for ids in out}
    if len(counts) > 1:
        first = next(i for i, ids in enumerate(out) if len(ids) != len(out[0]))
        raise ValueError(
            f"{name} must give the same number of tokens for every prompt, but {name}[0] has {len(out[0])} and "
            f"{name}[{first}] has {len(out[first])}. Fix: use one {name} per prompt, or pad lists to one length "
            "by repeating an entry."
        )
    return out
