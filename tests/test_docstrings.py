"""Every ``>>>`` example in the library's docstrings runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil
from contextlib import redirect_stdout

import pytest

import edgepatch

MODULES = sorted(m.name for m in pkgutil.iter_modules(edgepatch.__path__, "edgepatch."))


def test_every_module_is_listed():
    assert {"edgepatch.graph", "edgepatch.patching", "edgepatch.sweep", "edgepatch.scores"} <= set(MODULES)


@pytest.mark.parametrize("name", ["edgepatch", *MODULES])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    out = io.StringIO()
    with redirect_stdout(out):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, out.getvalue()
