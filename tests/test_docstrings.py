"""Every ``>>>`` example in the library's docstrings runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil
from contextlib import redirect_stdout

import pytest

import edgepatch
from conftest import HAVE, requires

MODULES = sorted(m.name for m in pkgutil.iter_modules(edgepatch.__path__, "edgepatch."))


def test_every_module_is_listed():
    assert {"edgepatch.graph", "edgepatch.patching", "edgepatch.sweep", "edgepatch.scores"} <= set(MODULES)


@pytest.mark.parametrize("name", ["edgepatch", *MODULES])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    examples = "\n".join(ex.source for t in doctest.DocTestFinder().find(module) for ex in t.examples)
    for cls in ("hooked", "bridge"):
        if cls not in HAVE and (f'model_class="{cls}"' in examples or (cls == "hooked" and "planted_model(" in examples)):
            requires(cls)  # (skips: an example needs a model class this TransformerLens lacks)
    out = io.StringIO()
    with redirect_stdout(out):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, out.getvalue()
