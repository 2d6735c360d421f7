"""The README and docs/ run as written: every Python block on its own (a fresh namespace each, on the CPU, as a
reader would paste it), every ``kve-fast`` command parses with today's options, every relative link has a file."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shlex
import subprocess

import numpy as np
import pytest
from PIL import Image

from kve_fast.testing import inside_share

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
FILES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
# Linked from the README, written in other branches: a missing one is allowed only while it does not exist at all;
# once it exists, its links and blocks are checked like the rest (docs/generate.md is).
PENDING: set[str] = set()
# Pages whose blocks write image files at the model's size, as FID sets need (the digits model's are 8x8).
AT_THE_MODELS_SIZE = {os.path.join("docs", "generate.md")}


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def blocks(path: str, lang: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return re.findall(rf"^```{lang}\n(.*?)^```", f.read(), flags=re.S | re.M)


PYTHON = [(rel(path), k, block) for path in FILES for k, block in enumerate(blocks(path, "python"))]


def test_the_readme_is_short_and_has_examples():
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= 150, "reference material belongs in docs/"
    assert len(blocks(README, "python")) >= 2 and len(blocks(README, "bash")) >= 2
    first_screen = "\n".join(lines[:30])
    assert "| model | diffusers |" in first_screen and "It is for you if you" in first_screen


@pytest.mark.parametrize("path, k, block", PYTHON, ids=[f"{p}:{k + 1}" for p, k, _ in PYTHON])
def test_python_block_runs_on_its_own(path, k, block, tmp_path, monkeypatch):
    """Each block runs; a block that needs a package the docs tell how to install says so in its first line
    (``# needs: k_diffusion``) and is skipped where that package is missing. What a block makes can fail it: the
    images it saves are a size one can look at (mutation: the README's 8x8 digit, or docs/python.md's 8x8
    samples -> fails), and the float images it keeps (NHWC arrays in [0, 1], compared bit for bit) are mostly
    inside (0, 1), where equality says something (mutation: the drop-in example of the README or of
    docs/python.md on a random UNet -> every pixel clamped, fails)."""
    needs = re.match(r"# needs: (\w+)", block)
    if needs and importlib.util.find_spec(needs.group(1)) is None:
        pytest.skip(f"{path} python block {k + 1} needs {needs.group(1)}, which is not installed")
    monkeypatch.chdir(tmp_path)  # examples save files into the current folder
    namespace = {"__name__": "__main__"}
    try:
        exec(compile(block, f"{path} python block {k + 1}", "exec"), namespace)
    except Exception as exc:  # name the block that failed
        pytest.fail(f"{path} python block {k + 1} failed on its own: {type(exc).__name__}: {exc}\n{block}")
    for image in tmp_path.rglob("*.png") if path not in AT_THE_MODELS_SIZE else ():
        with Image.open(image) as opened:
            assert min(opened.size) >= 32, f"{path} python block {k + 1} saves {image.name} at {opened.size}"
    for name, value in namespace.items():
        if (isinstance(value, np.ndarray) and value.ndim == 4 and value.dtype.kind == "f" and value.size
                and value.min() >= 0 and value.max() <= 1):
            assert inside_share(value) > 0.5, f"{path} python block {k + 1}: {name} is mostly clamped at 0 or 1"


def commands() -> list[tuple[str, str]]:
    found = []
    for path in FILES:
        for block in blocks(path, "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip()
                words = shlex.split(line) if line else []
                if words[:1] == ["kve-fast"]:
                    found.append((rel(path), words[1:]))
                elif "kve_fast" in words and words[:1] in (["torchrun"], ["python"]):
                    found.append((rel(path), words[words.index("kve_fast") + 1:]))
    return found


def test_every_command_in_the_docs_parses():
    from kve_fast.cli import build_parser

    found = commands()
    assert any(argv[:1] == ["sample"] for _, argv in found) and any(argv[:1] == ["bench"] for _, argv in found)
    parser = build_parser()
    for path, argv in found:
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"{path}: `kve-fast {' '.join(argv)}` does not parse (exit {exc.code})")


def test_relative_links_point_at_files():
    missing = []
    for path in FILES:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            target = target.split("#", 1)[0]
            if not target or re.match(r"[a-z]+:", target):
                continue
            where = os.path.normpath(os.path.join(os.path.dirname(path), target))
            if not os.path.exists(where) and rel(where) not in PENDING:
                missing.append(f"{rel(path)} -> {target}")
    assert missing == []
    with open(README, encoding="utf-8") as f:
        readme = f.read()
    for path in sorted(PENDING) + [rel(p) for p in FILES[1:]]:  # every docs page is linked from the README
        assert f"]({path})" in readme, path


def written_by_the_readme() -> list[str]:
    """The files the README's commands and Python examples write into the current folder."""
    from kve_fast.cli import DEFAULT_OUT, DEFAULT_OUT_FOLDER, build_parser

    names = {DEFAULT_OUT, f"{DEFAULT_OUT_FOLDER}/sample_0000.png"}
    parser = build_parser()
    for path, argv in commands():
        if path == "README.md" and argv[:1] == ["sample"]:
            args = parser.parse_args(argv)
            names.update(n for n in (args.out, args.trajectory) if n)
    for block in blocks(README, "python"):
        names.update(re.findall(r"\.save\(\"([^\"]+)\"\)", block))
    return sorted(names)


def test_the_readmes_commands_leave_the_checkout_clean():
    """Run in a checkout, the README's commands must not make it dirty (every bench report made afterwards would
    say so): what they write is ignored by git (mutation: .gitignore without it -> kve_fast_samples.png shows)."""
    try:
        top = subprocess.run(["git", "-C", ROOT, "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no git")
    if top.returncode != 0 or os.path.realpath(top.stdout.strip()) != os.path.realpath(ROOT):
        pytest.skip("not a git checkout")
    names = written_by_the_readme()
    assert "kve_fast_samples.png" in names and "digit.png" in names and "faces.png" in names
    ignored = subprocess.run(["git", "-C", ROOT, "check-ignore", *names], capture_output=True, text=True)
    assert sorted(ignored.stdout.split()) == names
