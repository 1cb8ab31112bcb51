"""Shared fixtures: small random models of several shapes in both TransformerLens model classes."""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # (before anything imports huggingface_hub)
torch.set_num_threads(min(2, torch.get_num_threads()))

from edgepatch.models import _tl_version, model_classes  # noqa: E402

MODEL_CASES = [
    ("tiny", "hooked"),
    ("tiny", "bridge"),
    ("tiny-parallel", "hooked"),
    ("tiny-parallel", "bridge"),
    ("tiny-gqa", "hooked"),
    ("tiny-gqa", "bridge"),
    ("tiny-attn-only", "hooked"),
]


# The suite runs against whichever TransformerLens is installed: CI's 3.9 has both model classes; under 2.x
# (no TransformerBridge) or 4.x (no HookedTransformer) the tests of the missing class are skipped, and
# scripts/test.sh runs the rest there too (see EDGEPATCH_TL_MATRIX).
HAVE = model_classes()


def class_or_other(model_class: str) -> str:
    """``model_class`` where this TransformerLens has it, else the class it has: for a test first written on
    one class that is not about that class, so that it runs under TransformerLens 2.x and 4.x too."""
    return model_class if model_class in HAVE or not HAVE else HAVE[0]


# The class a test that is not about the model class runs on: HookedTransformer where TransformerLens has
# it (the suite's thresholds were first set on its random models), else the bridge, so that under 4.x those
# tests run too instead of being skipped.
ANY_CLASS = class_or_other("hooked")


def _lacks(model_class: str) -> str:
    """Why a test of ``model_class`` cannot run here."""
    return f"{_tl_version()} has no {'HookedTransformer' if model_class == 'hooked' else 'TransformerBridge'}"


def requires(model_class: str) -> None:
    """Skip the calling test where the installed TransformerLens lacks ``model_class``."""
    if model_class not in HAVE:
        pytest.skip(_lacks(model_class))


def _flat(values) -> list:
    out = []
    for v in values:
        out.extend(_flat(v) if isinstance(v, (tuple, list)) else [v])
    return out


def pytest_collection_modifyitems(config, items):
    """Tests parametrized by a model class this TransformerLens lacks are skipped, with the reason."""
    missing = [c for c in ("hooked", "bridge") if c not in HAVE]
    for item in items:
        spec = getattr(item, "callspec", None)
        values = _flat(spec.params.values()) if spec is not None else []
        for cls in missing:
            if any(isinstance(v, str) and v == cls for v in values):
                item.add_marker(pytest.mark.skip(reason=_lacks(cls)))


@functools.lru_cache(maxsize=None)
def cached_model(preset: str, model_class: str):
    """A shared model for read-only tests (every test that mutates state builds its own)."""
    from edgepatch.models import random_model

    requires(model_class)
    return random_model(preset, model_class=model_class, seed=0)


def model_id(case) -> str:
    return f"{case[0]}-{case[1]}"


@pytest.fixture(params=MODEL_CASES, ids=model_id)
def any_model(request):
    return cached_model(*request.param)


@pytest.fixture(params=["hooked", "bridge"])
def fresh_model(request):
    """A new tiny model per test, for tests that check the model comes out unchanged."""
    from edgepatch.models import random_model

    model = random_model("tiny", model_class=request.param, seed=1)
    # TransformerBridge wires its own capture hooks lazily on its first forward; do that before a
    # test snapshots the model, so the snapshot shows the model as users see it.
    with torch.no_grad():
        model(torch.zeros(1, 2, dtype=torch.long))
    return model


def model_snapshot(model) -> dict:
    """Everything a context manager must restore: hooks, flags, classes, parameter ids/values/flags, modes."""
    import torch.nn.modules.module as mm

    snap = {}
    snap["hooks"] = {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
               len(getattr(m, "fwd_hooks", []) or []), len(getattr(m, "bwd_hooks", []) or []))
        for name, m in model.named_modules()
    }
    snap["global_hooks"] = (len(mm._global_forward_hooks), len(mm._global_forward_pre_hooks))
    snap["cfg"] = {k: v for k, v in vars(model.cfg).items() if isinstance(v, (bool, int, float, str, type(None)))}
    snap["classes"] = {name: type(m) for name, m in model.named_modules()}
    snap["training"] = {name: m.training for name, m in model.named_modules()}
    snap["params"] = {n: (id(p), p.requires_grad, p.dtype, p.device) for n, p in model.named_parameters()}
    snap["values"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return snap


def assert_unchanged(model, before: dict) -> None:
    after = model_snapshot(model)
    for key in ("hooks", "global_hooks", "cfg", "classes", "training", "params"):
        assert after[key] == before[key], f"model {key} changed"
    for n, v in before["values"].items():
        assert torch.equal(after["values"][n], v), f"parameter {n} changed"


def spread_norms(model, seed: int) -> int:
    """Give every normalization of ``model`` random scales and shifts (random models start with 1 and 0,
    which would hide a mistake in recomputing them). Returns how many parameters were changed."""
    gen = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for module in model.modules():
            if "norm" not in type(module).__name__.lower():
                continue
            for p in module.parameters(recurse=False):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
                changed += 1
    return changed

