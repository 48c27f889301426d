"""What the documentation shows a user: its Python blocks and the commands it names, with their file and line.

tests/test_docs.py runs the blocks and checks the commands' flags; this module only reads the markdown.

A block can carry one directive, an HTML comment on the nearest non-blank line above its fence (invisible in the
rendered page):

    <!-- docs-test: skip (needs a GPU) -->      not run; the reason is required and listed by the test
    <!-- docs-test: setup NAME -->              run after the setup code NAME of tests/test_docs.py (the names the
                                                block leaves to the reader: "x, cores, bias: yours")
    <!-- docs-test: continue -->                run in the namespace of the file's previous block (a page that
                                                builds on its previous example)
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = ("README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))

_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*docs-test:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    path: str  # relative to the repository root
    line: int  # 1-based line of the block's first code line
    lang: str
    code: str  # dedented by the fence's indentation
    directive: str = ""

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        m = re.fullmatch(r"skip\s*\((.+)\)", self.directive)
        return m.group(1) if m else None

    @property
    def setup(self) -> str | None:
        m = re.fullmatch(r"setup\s+(\w+)", self.directive)
        return m.group(1) if m else None

    @property
    def continues(self) -> bool:
        return self.directive == "continue"


def blocks(path: str) -> list[Block]:
    """Every fenced block of `path`, with the directive above it ("" when none)."""
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = len(m.group(1)), m.group(2)
        j = i + 1
        while j < len(lines) and not _FENCE.match(lines[j]):
            j += 1
        body = [ln[indent:] if ln[:indent].strip() == "" else ln for ln in lines[i + 1 : j]]
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        d = _DIRECTIVE.match(lines[k]) if k >= 0 else None
        out.append(Block(path, i + 2, lang, "\n".join(body) + "\n", d.group(1) if d else ""))
        i = j + 1
    return out


def directives_without_block(path: str) -> list[str]:
    """Directives that no fenced block follows (a typo or a block moved away would make them silent)."""
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    bad = []
    for n, ln in enumerate(lines):
        if _DIRECTIVE.match(ln):
            k = n + 1
            while k < len(lines) and not lines[k].strip():
                k += 1
            if k >= len(lines) or not _FENCE.match(lines[k]):
                bad.append(f"{path}:{n + 1}")
    return bad


def python_blocks() -> list[Block]:
    return [b for p in DOC_FILES for b in blocks(p) if b.lang == "python"]


# ---- commands ---------------------------------------------------------------------------------------------------


@dataclass
class Command:
    path: str
    line: int
    text: str  # as written, one logical line
    program: str  # "tnk", "python -m bench.run_grid", "python bench/gpu_bench.py", "pytest", ...
    argv: list[str] = field(default_factory=list)  # the words after the program (sub-command first for tnk)
    whole: bool = False  # a complete command line of a shell block, to be parsed as a whole (not a synopsis)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    notes: str = ""  # a synopsis's text after the command: its `[--flag X]` and descriptions

    @property
    def flags(self) -> list[str]:
        """Every `--flag` named for the program: in its words, and in a synopsis's `[--flag X]` or note."""
        return sorted(set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", " ".join(self.argv) + " " + self.notes)))


_ENV_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")


def _command_from_words(words: list[str]) -> tuple[str, list[str]] | None:
    """(program, argv) when `words` run tnk, a python module or script of this repository, or pytest."""
    while words and (_ENV_ASSIGN.match(words[0]) or words[0] in ("/usr/bin/time", "-v", "time")):
        words = words[1:]
    if not words:
        return None
    head, rest = words[0], words[1:]
    if head == "tnk":  # a sub-command or a flag follows (not "tnk / (roofline + floor)", a column name)
        return ("tnk", rest) if not rest or re.match(r"^(-|[a-z][a-z-]*$)", rest[0]) else None
    if head == "torchrun":  # torchrun [its flags] -m MODULE ... | SCRIPT ...
        for n, w in enumerate(rest):
            if w == "-m" and n + 1 < len(rest):
                return _module_program(rest[n + 1], rest[n + 2 :])
            if w.endswith(".py"):
                return f"python {w}", rest[n + 1 :]
        return None
    if head in ("python", "python3"):
        if rest[:1] == ["-m"] and len(rest) > 1:
            return _module_program(rest[1], rest[2:])
        if rest and rest[0].endswith(".py"):
            return f"python {rest[0]}", rest[1:]
        return None
    if head == "pytest":
        return "pytest", rest
    return None


def _module_program(module: str, rest: list[str]) -> tuple[str, list[str]] | None:
    if module in ("tnkernels", "tnkernels.cli"):
        return "tnk", rest
    if module == "pytest":
        return "pytest", rest
    if re.fullmatch(r"(bench|distill)(\.\w+)+", module):
        return f"python -m {module}", rest
    return None  # pip, venv, ...


def _split_logical(text: str) -> list[str]:
    """Shell text to commands: backslash continuations joined, comments cut, `&&` and `;` chains split."""
    text = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in text.splitlines():
        try:
            lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lex.whitespace_split = True
            lex.commenters = "#"
            words = list(lex)
        except ValueError:
            continue
        cur: list[str] = []
        for w in words + [";"]:
            if set(w) <= set(";&|"):
                if cur:
                    out.append(cur)
                cur = []
            else:
                cur.append(w)
    return [" ".join(shlex.quote(w) for w in ws) for ws in out]


def _words(cmd: str) -> list[str]:
    return [w.strip("[]") for w in shlex.split(cmd) if w.strip("[]")]  # a synopsis's [--flag X]


def commands(path: str) -> list[Command]:
    """Commands of this repository named in `path`: in ```bash blocks, and in inline code spans of the prose."""
    out: list[Command] = []
    for b in blocks(path):
        if b.lang == "":
            out.extend(_synopsis_commands(b))
        if b.lang not in ("bash", "sh", "shell"):
            continue
        # a logical line starts on the line of its first word: count continuation lines as we go
        line = b.line
        physical = b.code.splitlines()
        n = 0
        while n < len(physical):
            start = n
            while physical[n].rstrip().endswith("\\") and n + 1 < len(physical):
                n += 1
            for cmd in _split_logical("\n".join(physical[start : n + 1])):
                parsed = _command_from_words(_words(cmd))
                if parsed:
                    out.append(Command(path, line + start, cmd, *parsed, whole=True))
            n += 1
    out.extend(_inline_commands(path))
    return out


def _synopsis_commands(b: Block) -> list[Command]:
    """A plain ``` block of usage lines: `tnk inspect --model gpt2    what it does` (a description after two
    spaces), or a synopsis whose indented `[--flag X]` lines continue the command above."""
    out: list[Command] = []
    for n, ln in enumerate(b.code.splitlines()):
        stripped = ln.strip()
        if out and ln[:1].isspace() and stripped.startswith(("[", "--")):
            out[-1].text += " " + stripped
            out[-1].notes += " " + stripped
            continue
        if not stripped.startswith(("tnk ", "python ")) and stripped != "tnk":
            continue
        runnable = re.split(r"\s{2,}", stripped)[0]
        try:
            parsed = _command_from_words(_words(runnable))
        except ValueError:
            parsed = None
        if parsed:
            out.append(Command(b.path, b.line + n, stripped, *parsed, notes=stripped[len(runnable) :]))
    return out


def _inline_commands(path: str) -> list[Command]:
    """`tnk ...`, `python -m ...`, `python bench/...`, `pytest ...` in inline code spans, which may wrap lines."""
    text = (ROOT / path).read_text(encoding="utf-8")
    # blank out fenced blocks (keeping the line count) so their backticks do not pair with the prose's
    masked = []
    fenced = False
    for ln in text.splitlines():
        if _FENCE.match(ln):
            fenced = not fenced
            masked.append("")
        else:
            masked.append("" if fenced else ln)
    prose = "\n".join(masked)
    out = []
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
        span = " ".join(m.group(1).split())
        line = prose.count("\n", 0, m.start()) + 1
        for cmd in _split_logical(span):
            try:
                words = _words(cmd)
            except ValueError:
                continue
            parsed = _command_from_words(words)
            if parsed:
                out.append(Command(path, line, span, *parsed))
    return out


def all_commands() -> list[Command]:
    return [c for p in DOC_FILES for c in commands(p)]


# ---- the parsers of the named commands --------------------------------------------------------------------------


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def capture_parser(main, *args):
    """The ArgumentParser `main` builds: its parse_args is stopped before it reads anything."""
    import argparse
    from unittest import mock

    def stop(self, *a, **k):
        raise _Captured(self)

    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", stop),
        mock.patch.object(argparse.ArgumentParser, "parse_known_args", stop),
    ):
        try:
            main(*args)
        except _Captured as c:
            return c.parser
    raise AssertionError(f"{main} returned without parsing its arguments")


def parser_for(program: str, argv: list[str]):
    """(parser, name, how many words of `argv` name its sub-command) for `program`, or None when its flags are not
    ours to check (setup.py, a throwaway script under bench/results/)."""
    import importlib

    if program == "tnk":
        from tnkernels.cli import build_parser

        parser = build_parser()
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        if argv and argv[0] in sub.choices:
            return sub.choices[argv[0]], f"tnk {argv[0]}", 1
        return parser, "tnk", 0
    if program.startswith("python -m "):
        module = program.split()[-1]
    else:
        script = program.split(" ", 1)[1]
        if not re.fullmatch(r"bench/\w+\.py", script):
            return None
        module = script[:-3].replace("/", ".")
    return capture_parser(importlib.import_module(module).main), program, 0
