"""Every Python example in README.md runs as written, in order, on the CPU (each block in a fresh
process would need the previous ones' names: they share one namespace, as a reader's session would)."""

from __future__ import annotations

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def python_blocks() -> list[str]:
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_the_readme_has_examples():
    assert len(python_blocks()) >= 4


def test_readme_examples_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # examples save files into the current folder
    namespace: dict = {}
    for k, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md python block {k + 1}", "exec"), namespace)
        except Exception as exc:  # name the block that failed
            pytest.fail(f"README python block {k + 1} failed: {type(exc).__name__}: {exc}\n{block}")
    assert (tmp_path / "sample_0.png").exists()
