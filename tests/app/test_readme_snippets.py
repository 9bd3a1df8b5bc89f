"""Every ```python block of README.md runs as written, each on its own (a fresh namespace, a temp working
directory and store, offline); every `lenslab ...` line of its ```bash blocks parses (the command path
exists and its options and arguments are accepted, nothing runs).

A block may carry one marker on the line before its fence:

- ``<!-- snippet: excerpt PATH -->``: an excerpt of PATH, shortened for reading. It must compile, and
  each function or class it defines must be defined in PATH; a block that defines none must have
  each of its lines in PATH.
- ``<!-- snippet: skip REASON -->``: not run here; only for what cannot run in this environment (say why).

The README's placeholder paths (``runs/ckpt-*``) are created in the working directory as tiny checkpoints.
"""

from __future__ import annotations

import ast
import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>\w*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(?P<kind>skip|excerpt)\s+(?P<arg>.+?)\s*-->\s*$")
SHELL_STOPS = {">", ">>", "|", "&&", ";", "2>", "<"}


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    code: str
    marker: tuple[str, str] | None

    @property
    def id(self) -> str:
        return f"README.md:{self.line}"


def blocks(text: str) -> list[Block]:
    """Every fenced block: its language, the line of its fence, its code (dedented), its marker."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = m["indent"], i
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        assert j < len(lines), f"README.md:{start + 1}: code block never closed"
        prev = lines[start - 1] if start else ""
        mk = MARKER.match(prev)
        code = textwrap.dedent("\n".join(ln[len(indent):] if ln.startswith(indent) else ln
                                         for ln in lines[start + 1:j]))
        out.append(Block(m["lang"], start + 1, code, (mk["kind"], mk["arg"]) if mk else None))
        i = j + 1
    return out


ALL = blocks(README.read_text(encoding="utf-8"))
PYTHON = [b for b in ALL if b.lang == "python"]
def shell_lines(code: str) -> list[str]:
    """The block's command lines, a line ending in a backslash joined with the next (as bash reads it)."""
    return [ln.strip() for ln in re.sub(r"\\\n", " ", code).splitlines()]


COMMANDS = [(b, ln) for b in ALL if b.lang == "bash" for ln in shell_lines(b.code) if ln.startswith("lenslab ")]


def test_the_readme_has_blocks_and_markers_are_rare():
    assert len(PYTHON) >= 8 and len(COMMANDS) >= 30  # the parser finds them
    skips = [b for b in PYTHON if b.marker and b.marker[0] == "skip"]
    assert len(skips) <= 2, [b.id for b in skips]
    stray = [i + 1 for i, ln in enumerate(README.read_text(encoding="utf-8").splitlines())
             if "snippet:" in ln and MARKER.match(ln) and not any(b.line == i + 2 for b in ALL)]
    assert not stray, f"snippet markers not right above a code fence: lines {stray}"


@pytest.fixture
def readme_cwd(tmp_path, monkeypatch):
    """A fresh working directory holding the README's placeholder checkpoints; the store is a temp one
    (conftest), HF_HUB_OFFLINE is set."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LENSLAB_ACTIVATIONS", str(tmp_path / "activations"))
    g = torch.Generator().manual_seed(0)
    for step in (100, 200, 300):
        d = tmp_path / "runs" / f"ckpt-{step}"
        d.mkdir(parents=True)
        save_file({"layer.0.weight": torch.randn(16, 8, generator=g), "layer.0.bias": torch.zeros(16)},
                  str(d / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("block", [b for b in PYTHON if b.marker is None], ids=lambda b: b.id)
def test_python_block_runs_as_written(block, readme_cwd):
    exec(compile(block.code, block.id, "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("block", [b for b in PYTHON if b.marker and b.marker[0] == "excerpt"], ids=lambda b: b.id)
def test_excerpt_matches_its_source(block):
    tree = ast.parse(block.code, block.id)  # compiles
    source = (ROOT / block.marker[1]).read_text(encoding="utf-8")
    defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    real = {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert defined <= real, f"{block.id}: {sorted(defined - real)} are not defined in {block.marker[1]}"
    if not defined:
        missing = [ln.strip() for ln in block.code.splitlines() if ln.strip() and ln.strip() not in source]
        assert not missing, f"{block.id}: lines not in {block.marker[1]}: {missing}"


def _argv(line: str) -> list[str]:
    """The words of one shell line up to a redirection or pipe, without comments."""
    words = []
    for w in shlex.split(line, comments=True):
        if w in SHELL_STOPS:
            break
        words.append(w)
    return words


@pytest.mark.parametrize(("block", "line"), COMMANDS, ids=[f"{b.id} {ln.split('#')[0].strip()[:60]}"
                                                           for b, ln in COMMANDS])
def test_bash_lenslab_line_parses(block, line):
    """The command path exists and click accepts its options and arguments (no command is invoked)."""
    import typer

    from app.cli import app

    args = _argv(line)[1:]
    cmd = typer.main.get_command(app)  # typer's own click: no isinstance checks against the click package
    ctx = cmd.make_context("lenslab", list(args), resilient_parsing=False)
    while hasattr(cmd, "commands"):  # a group: resolve the subcommand from the words it left
        rest = [*(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", None) or []), *ctx.args]
        assert rest, f"{block.id}: `{line.strip()}` names a group, not a command"
        name, cmd, sub_args = cmd.resolve_command(ctx, rest)
        assert cmd is not None, f"{block.id}: no command {name!r} in `{line.strip()}`"
        ctx = cmd.make_context(name, list(sub_args), parent=ctx, resilient_parsing=False)
    ctx.close()
