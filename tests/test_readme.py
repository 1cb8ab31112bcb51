"""The README's quickstart runs as printed (on the real SmolLM2-135M, offline; slow)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quickstart_runs_as_printed(monkeypatch):
    import plotly.graph_objects as go

    text = README.read_text()
    block = re.search(r"## Quickstart\s+```python\n(.*?)```", text, re.S)
    assert block, "the README has no python block under '## Quickstart'"
    code = block.group(1)
    monkeypatch.setattr(go.Figure, "show", lambda self, *a, **k: None)  # (no browser here)
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)
    printed = re.search(r"build_graph\(model\)\s+#\s*(Graph\(.*?\))", code)
    assert printed and repr(ns["graph"]) == printed.group(1)  # the comment shows what it prints
    data, logits = ns["data"], ns["logits"]
    assert logits.shape[:2] == data.clean.shape and ns["result"].counts_spec == "mib"
