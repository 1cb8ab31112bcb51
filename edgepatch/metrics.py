"""Metrics: how well a (patched) model does the task, one number per prompt.

Context
-------
Circuit discovery scores edges by how much patching them changes a *metric* of the model's output, and
judges a circuit by how much of the clean behaviour it keeps. A metric here is any callable

    metric(logits: [batch, pos, d_vocab], data: PromptPairs) -> [batch]

that reads the next-token prediction at ``data.answer_pos`` (the last real token) and returns one value
per prompt. It must be differentiable in ``logits``: attribution patching (EAP) and integrated gradients
take its gradient. edgepatch reduces over the prompts itself: :func:`get_metric` wraps a metric you
write in a :class:`CheckedMetric`, which stops with a clear error when it returns anything but one value
per prompt. Where you call a metric in your own code, reduce over the batch yourself (usually ``.mean()``).

Built-in metrics (``get_metric(name)``):

=====================  ===================================================================  ========
name                   value per prompt                                                     better
=====================  ===================================================================  ========
``logit_diff``         mean answer logit - mean wrong logit (Wang et al. 2022)              higher
``answer_prob``        total probability of the answers, sum_a p(a)                         higher
``answer_logprob``     log of that total, log sum_a p(a)                                    higher
``prob_diff``          sum_a p(a) - sum_w p(w)                                              higher
``kl_div``             KL(clean || patched) of the next-token distributions (needs clean)   lower
``accuracy``           1.0 if the best answer logit beats every wrong logit, else 0.0       higher
``prob_diff_years``    sum p(year > YY) - sum p(year <= YY) (Hanna et al. 2023, greater-than) higher
=====================  ===================================================================  ========

Every metric carries two attributes used by the engine: ``higher_is_better`` (direction of "good") and
``needs_clean`` (True when the metric compares with the clean run, like KL; such a metric is a
``KLDivergence``-like object with ``.prepare(clean_logits)`` returning a ready-to-call copy).
``accuracy`` is a step function: its gradient is zero, so do not use it for attribution.

Faithfulness of a circuit is usually reported normalized between the full model and the fully ablated
model: ``normalized_faithfulness(value, clean, ablated) = (value - ablated) / (clean - ablated)``, 1 for
a circuit as good as the model, 0 for one no better than ablating everything.

Example
-------
>>> import torch
>>> from edgepatch.data import PromptPairs
>>> data = PromptPairs.from_tokens([[0, 1]], [[0, 2]], answers=[1], wrong=[2])
>>> logits = torch.tensor([[[0., 0., 0.], [0., 3., 1.]]])
>>> logit_diff(logits, data)
tensor([2.])
>>> get_metric("logit_diff") is logit_diff
True
"""

from __future__ import annotations

import contextlib
import difflib
import math
import warnings
from typing import Any, Callable, Iterator, Union

import torch
from jaxtyping import Float
from torch import Tensor

from edgepatch.data import PromptPairs
from edgepatch.errors import EdgepatchError

__all__ = [
    "Metric",
    "KLDivergence",
    "logit_diff",
    "answer_prob",
    "answer_logprob",
    "prob_diff",
    "kl_div",
    "accuracy",
    "prob_diff_years",
    "METRICS",
    "get_metric",
    "CheckedMetric",
    "register_metric",
    "normalized_faithfulness",
]

Metric = Callable[[Tensor, PromptPairs], Tensor]
"""A metric: ``(logits [batch, pos, d_vocab], data) -> [batch]``, with ``higher_is_better``/``needs_clean``."""

METRICS: dict[str, Any] = {}
"""Registry of named metrics. ``kl_div`` maps to the ``KLDivergence`` class (a fresh one per lookup)."""


def register_metric(name: str, *, higher_is_better: bool, needs_clean: bool = False):
    """Decorator: set the metric attributes on ``fn`` and register it under ``name``.

    >>> @register_metric("answer_logit", higher_is_better=True)
    ... def answer_logit(logits, data):
    ...     return logits_at_answer(logits, data).gather(-1, data.answers).mean(-1)
    >>> get_metric("answer_logit").higher_is_better
    True
    >>> _ = METRICS.pop("answer_logit")
    """

    def wrap(fn):
        fn.higher_is_better = higher_is_better
        fn.needs_clean = needs_clean
        if not hasattr(fn, "metric_name"):
            fn.metric_name = name
        METRICS[name] = fn
        return fn

    return wrap


def logits_at_answer(logits: Float[Tensor, "batch pos d_vocab"], data: PromptPairs) -> Float[Tensor, "batch d_vocab"]:
    """The logits at each prompt's ``answer_pos``: ``logits[i, data.answer_pos[i]]``, with shape checks."""
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"A metric expects logits of shape [batch, pos, d_vocab], got {shape}. "
            "Fix: pass the model's full output logits (model(tokens)), not one position."
        )
    batch, pos, d_vocab = logits.shape
    if batch != data.batch:
        raise ValueError(
            f"logits have batch {batch} but the data has {data.batch} prompts; run the model on the same "
            "prompts you score (e.g. model(data.clean))."
        )
    top = int(data.answer_pos.max())
    if top >= pos:
        raise ValueError(f"data.answer_pos reaches position {top} but logits have only {pos} positions.")
    ids_max = max(int(data.answers.max()), int(data.wrong.max()))
    if ids_max >= d_vocab:
        raise ValueError(
            f"answer/wrong token id {ids_max} is outside the logits' vocabulary of {d_vocab}. "
            "Fix: build the data with the model's tokenizer (data.validate(model) checks this)."
        )
    ap = data.answer_pos.to(logits.device)
    return logits[torch.arange(batch, device=logits.device), ap]


def _log_probs(logits: Tensor, data: PromptPairs) -> Tensor:
    at = logits_at_answer(logits, data)
    return torch.log_softmax(at.float() if at.dtype in (torch.float16, torch.bfloat16) else at, dim=-1)


def _ids(data: PromptPairs, name: str, device: torch.device) -> Tensor:
    return getattr(data, name).to(device)


@register_metric("logit_diff", higher_is_better=True)
def logit_diff(logits: Float[Tensor, "batch pos d_vocab"], data: PromptPairs) -> Float[Tensor, "batch"]:
    """Answer logit minus wrong logit at ``answer_pos`` (means over several answers / wrong answers).

    >>> from edgepatch.data import PromptPairs
    >>> d = PromptPairs.from_tokens([[0]], [[0]], [[0, 1]], [2])
    >>> logit_diff(torch.tensor([[[4., 2., 1.]]]), d)
    tensor([2.])
    """
    at = logits_at_answer(logits, data)
    good = at.gather(-1, _ids(data, "answers", at.device)).mean(-1)
    bad = at.gather(-1, _ids(data, "wrong", at.device)).mean(-1)
    return good - bad


@register_metric("answer_prob", higher_is_better=True)
def answer_prob(logits: Float[Tensor, "batch pos d_vocab"], data: PromptPairs) -> Float[Tensor, "batch"]:
    """Total next-token probability of the answers, ``sum_a p(a)``.

    >>> from edgepatch.data import PromptPairs
    >>> answer_prob(torch.zeros(1, 1, 4), PromptPairs.from_tokens([[0]], [[0]], [[0, 1]], [2]))
    tensor([0.5000])
    """
    lp = _log_probs(logits, data)
    return lp.gather(-1, _ids(data, "answers", lp.device)).exp().sum(-1)


@register_metric("answer_logprob", higher_is_better=True)
def answer_logprob(logits: Float[Tensor, "batch pos d_vocab"], data: PromptPairs) -> Float[Tensor, "batch"]:
    """Log of the answers' total probability, ``log sum_a p(a)`` (the log-prob of the answer if one).

    >>> from edgepatch.data import PromptPairs
    >>> answer_logprob(torch.zeros(1, 1, 4), PromptPairs.from_tokens([[0]], [[0]], [3], [2]))
    tensor([-1.3863])
    """
    lp = _log_probs(logits, data)
    return lp.gather(-1, _ids(data, "answers", lp.device)).logsumexp(-1)


@register_metric("prob_diff", higher_is_better=True)
def prob_diff(logits: Float[Tensor, "batch pos d_vocab"], data: PromptPairs) -> Float[Tensor, "batch"]:
    """``sum_a p(a) - sum_w p(w)``: probability of the answers minus probability of the wrong answers.

    >>> from edgepatch.data import PromptPairs
    >>> prob_diff(torch.tensor([[[0., 0., 0., 0.]]]), PromptPairs.from_tokens([[0]], [[0]], [[0, 1]], [2]))
    tensor([0.2500])
    """
    lp = _log_probs(logits, data)
    good = lp.gather(-1, _ids(data, "answers", lp.device)).exp().sum(-1)
    bad = lp.gather(-1, _ids(data, "wrong", lp.device)).exp().sum(-1)
    return good - bad


@register_metric("accuracy", higher_is_better=True)
def accuracy(logits: Float[Tensor, "batch pos d_vocab"], data: PromptPairs) -> Float[Tensor, "batch"]:
    """1.0 where the best answer logit is strictly above every wrong logit, else 0.0 (not differentiable).

    >>> from edgepatch.data import PromptPairs
    >>> accuracy(torch.tensor([[[3., 1., 2.]]]), PromptPairs.from_tokens([[0]], [[0]], [0], [[1, 2]]))
    tensor([1.])
    """
    at = logits_at_answer(logits, data)
    good = at.gather(-1, _ids(data, "answers", at.device)).max(-1).values
    bad = at.gather(-1, _ids(data, "wrong", at.device)).max(-1).values
    return (good > bad).to(at.dtype)


@register_metric("prob_diff_years", higher_is_better=True)
def prob_diff_years(logits: Float[Tensor, "batch pos d_vocab"], data: PromptPairs) -> Float[Tensor, "batch"]:
    """Greater-than probability difference: ``sum_{y > YY} p(y) - sum_{y <= YY} p(y)`` over years 00..99.

    Reads ``data.meta["year"]`` (``[batch]`` start years YY) and ``data.meta["year_tokens"]`` (``[100]``
    ids of the two-digit tokens "00".."99"), as made by ``edgepatch.tasks.greater_than``. Years whose token
    id is negative (not a single token) are skipped.

    >>> from edgepatch.data import PromptPairs
    >>> d = PromptPairs.from_tokens([[0]], [[0]], [0], [1], meta={"year": [50], "year_tokens": torch.arange(100)},
    ...                             per_prompt_keys=["year"])
    >>> prob_diff_years(torch.zeros(1, 1, 100), d)  # uniform: 49 years above, 51 at or below
    tensor([-0.0200])
    """
    if "year" not in data.meta or "year_tokens" not in data.meta:
        raise ValueError(
            "prob_diff_years needs data.meta['year'] (the start year YY of each prompt) and "
            f"data.meta['year_tokens'] (ids of '00'..'99'); this data's meta has keys {sorted(data.meta)}. "
            "Fix: build the data with edgepatch.tasks.greater_than."
        )
    lp = _log_probs(logits, data)
    year_tokens = torch.as_tensor(data.meta["year_tokens"], device=lp.device).long()
    if year_tokens.shape != (100,):
        raise ValueError(f"data.meta['year_tokens'] must have 100 ids ('00'..'99'), got shape "
                         f"{tuple(year_tokens.shape)}.")
    year = torch.as_tensor(data.meta["year"], device=lp.device).long()
    valid = year_tokens >= 0
    probs = lp[:, year_tokens.clamp(min=0)].exp() * valid  # [batch, 100]
    later = torch.arange(100, device=lp.device)[None, :] > year[:, None]  # [batch, 100]
    return (probs * later).sum(-1) - (probs * ~later).sum(-1)


class KLDivergence:
    """KL(clean || patched) of the next-token distributions at ``answer_pos``; lower is better.

    ``KL = sum_v p_clean(v) * (log p_clean(v) - log p_patched(v))`` per prompt. The clean distribution is
    a fixed target, so the metric must be *prepared* with the clean run's logits for the same prompts
    before it is called: ``KLDivergence(clean_logits)`` or ``KLDivergence().prepare(clean_logits)``
    (``prepare`` returns a new, prepared metric and leaves the original unchanged). ``clean_logits`` may
    be the full ``[batch, pos, d_vocab]`` output (read at ``data.answer_pos`` at call time) or already
    ``[batch, d_vocab]``; they are detached. Engines see ``needs_clean = True`` and call ``prepare``.

    >>> from edgepatch.data import PromptPairs
    >>> d = PromptPairs.from_tokens([[0]], [[0]], [0], [1])
    >>> clean = torch.tensor([[[1., 2., 3.]]])
    >>> KLDivergence(clean)(clean, d)
    tensor([0.])
    """

    higher_is_better = False
    needs_clean = True
    metric_name = "kl_div"

    def __init__(self, clean_logits: Tensor | None = None):
        if clean_logits is not None:
            if not isinstance(clean_logits, Tensor) or clean_logits.ndim not in (2, 3):
                shape = tuple(clean_logits.shape) if isinstance(clean_logits, Tensor) else type(clean_logits).__name__
                raise ValueError(
                    f"clean_logits must be [batch, pos, d_vocab] or [batch, d_vocab], got {shape}."
                )
            clean_logits = clean_logits.detach()
        self.clean_logits = clean_logits

    @property
    def prepared(self) -> bool:
        return self.clean_logits is not None

    def prepare(self, clean_logits: Tensor) -> "KLDivergence":
        """A new ``KLDivergence`` comparing against ``clean_logits`` (the clean run on the same prompts)."""
        return type(self)(clean_logits)

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"], data: PromptPairs) -> Float[Tensor, "batch"]:
        if self.clean_logits is None:
            raise RuntimeError(
                "kl_div compares with the clean run but was not prepared with its logits. "
                "Fix: metric = KLDivergence(clean_logits) or get_metric('kl_div').prepare(clean_logits), "
                "where clean_logits = model(data.clean)."
            )
        lp = _log_probs(logits, data)
        clean = self.clean_logits.to(lp.device)
        if clean.shape[0] != lp.shape[0] or clean.shape[-1] != lp.shape[-1]:
            raise ValueError(
                f"clean_logits {tuple(clean.shape)} do not match the logits being scored "
                f"{tuple(logits.shape)} (batch and d_vocab must agree). Prepare the metric with the clean "
                "logits of the same batch of prompts."
            )
        clean_lp = _log_probs(clean, data) if clean.ndim == 3 else torch.log_softmax(clean.to(lp.dtype), dim=-1)
        return (clean_lp.exp() * (clean_lp - lp)).sum(-1)

    def __repr__(self) -> str:
        state = "prepared" if self.prepared else "unprepared: call .prepare(clean_logits)"
        return f"KLDivergence({state})"


METRICS["kl_div"] = KLDivergence
kl_div = KLDivergence
"""``kl_div`` is the ``KLDivergence`` class: ``kl_div(clean_logits)(logits, data)``."""


ALIASES = {"kl": "kl_div", "logit_difference": "logit_diff", "logprob": "answer_logprob", "prob": "answer_prob"}


def get_metric(name_or_callable: Union[str, Callable]) -> Callable:
    """Resolve a metric name (see the module table) or return a callable unchanged.

    ``"kl_div"`` returns a fresh, unprepared ``KLDivergence``. Unknown names raise ``ValueError`` listing
    close matches and all known names.

    >>> get_metric("kl_div")
    KLDivergence(unprepared: call .prepare(clean_logits))
    >>> get_metric("logit_dif")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Unknown metric 'logit_dif'. Did you mean 'logit_diff' or ...? Known metrics: accuracy, ...
    """
    if isinstance(name_or_callable, str):
        entry = METRICS.get(ALIASES.get(name_or_callable, name_or_callable))
        if entry is None:
            close = difflib.get_close_matches(name_or_callable, list(METRICS), n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"Unknown metric {name_or_callable!r}.{hint} Known metrics: {', '.join(sorted(METRICS))}."
            )
        return entry() if isinstance(entry, type) else entry
    if isinstance(name_or_callable, type):
        return _checked(name_or_callable())
    if callable(name_or_callable):
        return _checked(name_or_callable)
    raise TypeError(
        f"metric must be a name or a callable (logits, data) -> [batch], got {type(name_or_callable).__name__}."
    )


def _checked(metric: Callable) -> Callable:
    """``metric`` as is when built in (or a ``KLDivergence``), else a :class:`CheckedMetric` around it."""
    if isinstance(metric, (CheckedMetric, KLDivergence)) or _registered(metric):
        return metric
    return CheckedMetric(metric)


def _registered(metric: Callable) -> bool:
    """Whether ``metric`` is one of :data:`METRICS` (the built-in metrics and those registered)."""
    return any(metric is m for m in METRICS.values())


class CheckedMetric:
    """A metric you wrote, as :func:`get_metric` returns it: calls go to it and its output is checked, one
    value per prompt (a metric that reduces over the batch itself would give every prompt the batch's value
    in a sweep, silently). Attributes (``higher_is_better``, ``needs_clean``, names) are the metric's own;
    ``prepare`` returns a checked metric too.

    >>> m = get_metric(lambda logits, data: logits[:, -1, 0].mean())
    >>> m(torch.zeros(2, 3, 5), None)
    Traceback (most recent call last):
    ...
    ValueError: The metric <lambda> returned a tensor of shape []; expected one value per prompt, shape [2] ...
    """

    def __init__(self, metric: Callable) -> None:
        self.metric = metric
        self.__name__ = getattr(metric, "__name__", type(metric).__name__)  # a callable object: its class

    def __getattr__(self, name: str) -> Any:
        if name == "metric":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        attr = getattr(self.metric, name)
        if name == "prepare" and callable(attr):
            return lambda *args, **kwargs: _checked(attr(*args, **kwargs))
        return attr

    def __call__(self, logits: Tensor, data: Any) -> Tensor:
        out = self.metric(logits, data)
        rows = logits.shape[0] if isinstance(logits, Tensor) and logits.ndim >= 1 else None
        if not isinstance(out, Tensor) or (rows is not None and tuple(out.shape) != (rows,)):
            got = f"a tensor of shape {list(out.shape)}" if isinstance(out, Tensor) else f"a {type(out).__name__}"
            given = f"logits of shape {list(logits.shape)}" if rows is not None else f"logits {type(logits).__name__}"
            raise ValueError(
                f"The metric {self.__name__} returned {got}; expected one value per prompt, shape [{rows}] for "
                f"{given}. A metric is (logits [batch, pos, d_vocab], data) -> [batch]: leave the reduction over "
                f"prompts to edgepatch (drop a final .mean() or .sum())."
            )
        return out

    def __repr__(self) -> str:
        return f"CheckedMetric({self.metric!r})"


def normalized_faithfulness(value: Any, clean: Any, ablated: Any) -> Any:
    """``(value - ablated) / (clean - ablated)``, elementwise, for floats or tensors (broadcasting).

    Where ``clean == ablated`` the ratio is undefined: the result there is ``nan`` and one
    ``RuntimeWarning`` is issued per call (Python's warning filter then shows it once per call site).
    Floats in give a float out; any tensor in gives a tensor out.

    >>> normalized_faithfulness(1.5, clean=2.0, ablated=0.5)
    0.6666666666666666
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     normalized_faithfulness(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 3.0]), torch.tensor([0.0, 3.0]))
    tensor([0.5000,    nan])
    >>> print(caught[0].message)  # doctest: +NORMALIZE_WHITESPACE
    normalized_faithfulness: clean == ablated at 1 of 2 entries, so the ratio is undefined there;
    returning nan at those entries.
    """
    if not any(isinstance(x, Tensor) for x in (value, clean, ablated)):
        denom = float(clean) - float(ablated)
        if denom == 0:
            warnings.warn(
                f"normalized_faithfulness: clean == ablated ({float(clean)!r}), so the ratio is undefined; "
                "returning nan. The task metric does not separate the clean and ablated model.",
                RuntimeWarning, stacklevel=2,
            )
            return math.nan
        return (float(value) - float(ablated)) / denom
    tensors = [x for x in (value, clean, ablated) if isinstance(x, Tensor)]
    dtype = torch.promote_types(tensors[0].dtype, torch.get_default_dtype())
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    device = tensors[0].device
    v, c, a = (torch.as_tensor(x, dtype=dtype, device=device) for x in (value, clean, ablated))
    denom = c - a
    zero = denom == 0
    if bool(zero.any()):
        warnings.warn(
            f"normalized_faithfulness: clean == ablated at {int(zero.sum())} of {zero.numel()} entries, so the "
            "ratio is undefined there; returning nan at those entries.",
            RuntimeWarning, stacklevel=2,
        )
    return torch.where(zero, torch.full_like(denom, math.nan), (v - a) / torch.where(zero, torch.ones_like(denom), denom))


# ------------------------------------------------------------------------------------------------------
# Unembedding only what a metric reads (internal forwards of sweeps and attribution)
# ------------------------------------------------------------------------------------------------------
def metric_label(metric: Any) -> str:
    """A metric's name for records and messages: a name as given; for a callable its ``metric_name``, its
    ``__name__`` or its class's name."""
    if isinstance(metric, str):
        return metric
    return str(getattr(metric, "metric_name", None) or getattr(metric, "__name__", None) or type(metric).__name__)


def with_gradient(value: Tensor, metric: Any, method: str) -> Tensor:
    """``value``, the metric of logits that carry a gradient, for ``method`` to differentiate; an error that
    says why and what to use instead when it carries none (once torch's "element 0 of tensors does not
    require grad")."""
    if value.requires_grad or not torch.is_grad_enabled():
        return value
    name = metric_label(metric)
    why = ("it is a step function of the logits, whose gradient is zero everywhere" if name == "accuracy" else
           "its value does not depend on the logits through autograd (.detach(), .item(), argmax, an integer "
           "result or a newly built tensor break the chain)")
    raise EdgepatchError(
        f"{method} needs the gradient of the metric, but {name!r} has none: {why}. Use a differentiable metric "
        f"such as 'logit_diff', 'logprob' or 'prob_diff' (a callable: torch operations on the logits), or a "
        f"method that only evaluates the metric (exact patching, ACDC, sweeps)."
    )


def reads_answer_only(metric: Callable) -> bool:
    """Whether ``metric`` (resolved) is a built-in one, which reads the logits at ``answer_pos`` only."""
    if isinstance(metric, KLDivergence):
        return type(metric) is KLDivergence
    return _registered(metric)


def answer_view(data: PromptPairs) -> PromptPairs:
    """``data`` as a metric sees it when only the answer positions were unembedded (logits ``[b, 1, V]``)."""
    b = len(data)
    one = torch.zeros(b, 1, dtype=torch.long, device=data.device)
    return PromptPairs(
        clean=one, corrupt=one, answers=data.answers, wrong=data.wrong,
        attention_mask=torch.ones(b, 1, dtype=torch.bool, device=data.device),
        answer_pos=torch.zeros(b, dtype=torch.long, device=data.device), meta=data.meta,
        per_prompt_keys=data.per_prompt_keys,
    )


@contextlib.contextmanager
def answer_logits(model: Any, answer_pos: Tensor | None) -> Iterator[None]:
    """While open, ``model(tokens)`` returns logits ``[rows, 1, d_vocab]`` at ``answer_pos`` (``[n]``) only:
    a pre-hook gathers the unembedding's input (``rows`` a multiple of ``n``: circuits folded into the batch
    repeat the prompts), so the other positions are never unembedded. ``answer_pos=None`` or a model
    without ``unembed``: no change."""
    unembed = getattr(model, "unembed", None)
    if answer_pos is None or not isinstance(unembed, torch.nn.Module):
        yield
        return
    n = answer_pos.shape[0]

    def pre(module: Any, args: tuple) -> tuple | None:
        if not args or not isinstance(args[0], Tensor) or args[0].ndim != 3 or args[0].shape[0] % n:
            return None
        x = args[0]
        if x.shape[1] == 1:  # one position: already gathered (an enclosing answer_logits), or the prompt's only
            return None
        return (_gather_answer(x, answer_pos), *args[1:])

    with _unembed_pre_hook(unembed, pre):
        yield


@contextlib.contextmanager
def _unembed_pre_hook(unembed: torch.nn.Module, pre: Callable) -> Iterator[None]:
    handle = unembed.register_forward_pre_hook(pre)
    try:
        yield
    finally:
        handle.remove()


def _no_positions(module: Any, args: tuple) -> tuple | None:
    """A pre-hook that passes the unembedding its input with no positions (it then does no work)."""
    if not args or not isinstance(args[0], Tensor) or args[0].ndim != 3:
        return None
    return (args[0][:, :0], *args[1:])


def _gather_answer(x: Tensor, answer_pos: Tensor) -> Tensor:
    rows = x.shape[0]
    ap = answer_pos.to(x.device).repeat(rows // answer_pos.shape[0])
    return x[torch.arange(rows, device=x.device), ap][:, None]


def _lean_unembed(model: Any) -> bool:
    unembed = getattr(model, "unembed", None)
    cfg = getattr(model, "cfg", None)
    return (type(unembed).__name__ == "Unembed" and isinstance(getattr(unembed, "W_U", None), Tensor)
            and type(model).__name__ == "HookedTransformer" and not getattr(cfg, "output_logits_soft_cap", 0) > 0)


def run_without_logits(model: Any, tokens: Tensor, **kwargs: Any) -> None:
    """Run ``model(tokens)`` for its hooks only, without unembedding (about a third of a GPT-2 forward at
    16 tokens on CPU): a HookedTransformer stops before it (``return_type=None``); other models (a
    TransformerBridge) pass their unembedding an input with no positions, so it returns empty logits."""
    if _lean_unembed(model):
        model(tokens, return_type=None, **kwargs)
        return
    unembed = getattr(model, "unembed", None)
    if not isinstance(unembed, torch.nn.Module):
        model(tokens, **kwargs)
        return
    with _unembed_pre_hook(unembed, _no_positions):
        model(tokens, **kwargs)


def final_logits(model: Any, tokens: Tensor, answer_pos: Tensor | None = None, **kwargs: Any) -> Tensor:
    """``model(tokens, **kwargs)``'s logits, ``[rows, 1, d_vocab]`` at ``answer_pos`` when given.

    For a HookedTransformer this runs the model with ``return_type=None`` and unembeds the final residual
    itself: TransformerLens's ``Unembed`` copies ``W_U`` into a new transposed tensor on every forward
    (154 MB for GPT-2, ~0.15 s on CPU, and with gradients autograd keeps it until the backward); the
    product with ``W_U`` as it is gives the same logits. The final norm's module hook reads the residual
    and is removed before returning. Other models (a TransformerBridge) run as they are, with their
    unembedding given the final residual at ``answer_pos`` only (:func:`answer_logits`): the other
    positions are never unembedded, nor, with gradients, differentiated."""
    unembed = getattr(model, "unembed", None)
    cfg = getattr(model, "cfg", None)
    if not _lean_unembed(model):
        with answer_logits(model, answer_pos):
            logits = model(tokens, **kwargs)
        if answer_pos is not None and logits.shape[1] != 1:
            logits = _gather_answer(logits, answer_pos)
        return logits
    norm = getattr(model, "ln_final", None) if getattr(cfg, "normalization_type", None) is not None else None
    target = norm if isinstance(norm, torch.nn.Module) else model.blocks[-1]
    captured: list[Tensor] = []
    handle = target.register_forward_hook(lambda module, inp, out: captured.append(out))
    try:
        model(tokens, return_type=None, **kwargs)
    finally:
        handle.remove()
    x = captured[-1]
    if answer_pos is not None:
        x = _gather_answer(x, answer_pos)
    return torch.nn.functional.linear(x, unembed.W_U.T, unembed.b_U)
