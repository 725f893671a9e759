"""The docs stay true: commands parse, links resolve, the README stays a front page.

Checks README.md, ARCHITECTURE.md and docs/**/*.md (no network, no data):

- every ``trainformer ...`` command parses with the real argparse parser: the
  lines of ```bash blocks, ``$ ...`` lines shown in output blocks, and inline
  ``trainformer VERB ARG ...`` spans. Pipes, ``&&``, redirections and comments
  are handled; ``torchrun ... -m trainformer`` and ``python -m trainformer``
  count too. Upper-case words (RUN_DIR, MODEL_DIR, KEY=VALUE) are the docs'
  placeholders: they parse as they stand;
- every relative link points to an existing file, and a ``#anchor`` to a heading;
- the README is at most 250 lines, keeps the two set-up markers (.ci/run reads
  the test command from it), and shows every verb of the CLI;
- docs/config.md is what `trainformer.configdoc` renders, and every config
  field is documented.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import shlex
from pathlib import Path

import pytest

from trainformer import configdoc
from trainformer.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted([README, ROOT / "ARCHITECTURE.md", *(ROOT / "docs").rglob("*.md")])
MAX_README_LINES = 250

_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
_SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")"}
_REDIRECTS = {"<", ">", ">>", "<<", "<<<", ">&", "<&", "&>"}


@functools.cache
def _verbs() -> tuple[str, ...]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return tuple(sub.choices)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _closes(fence: str, line: str) -> bool:
    """Whether `line` closes a code block opened by `fence` (``` or ~~~, maybe longer)."""
    stripped = line.strip()
    return stripped.startswith(fence[:3]) and not stripped.strip(fence[0])


def _blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of each fenced code block."""
    out, lang, start, body, fence = [], None, 0, [], ""
    for i, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if lang is None and m:
            lang, start, body, fence = m.group(3).lower(), i + 1, [], m.group(2)
        elif lang is not None and _closes(fence, line):
            out.append((lang, start, body))
            lang = None
        elif lang is not None:
            body.append(line)
    return out


def _strip_code(text: str, keep_inline: bool = False) -> str:
    """`text` with fenced blocks blanked (line numbers kept) and, unless `keep_inline`, inline code."""
    lines, inside, fence = [], False, ""
    for line in text.splitlines():
        m = _FENCE.match(line)
        if not inside and m:
            inside, fence = True, m.group(2)[:3]
            lines.append("")
        elif inside:
            if _closes(fence, line):
                inside = False
            lines.append("")
        else:
            lines.append(line if keep_inline else re.sub(r"`[^`]*`", "", line))
    return "\n".join(lines)


def _command_lines(path: Path) -> list[tuple[str, str]]:
    """(where, shell line) for every command line shown in `path`."""
    out = []
    for lang, start, body in _blocks(path.read_text(encoding="utf-8")):
        joined, first = "", start
        for k, line in enumerate(body):
            if not joined:
                first = start + k
            if line.startswith("$ "):
                text = line[2:]
            elif lang in ("bash", "sh", "shell") or joined:
                text = line
            else:
                continue
            if text.rstrip().endswith("\\"):
                joined += text.rstrip()[:-1] + " "
                continue
            joined += text
            if joined.strip() and not joined.lstrip().startswith("#"):
                out.append((f"{_rel(path)}:{first}", joined.strip()))
            joined = ""
    return out


def _simple_commands(line: str) -> list[list[str]]:
    """The words of each simple command of a shell line, redirections and comments removed."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words, skip = [], [], False
    for tok in lexer:
        if skip:
            skip = False
        elif tok in _SEPARATORS:
            commands.append(words)
            words = []
        elif tok in _REDIRECTS:
            skip = True
        else:
            words.append(tok)
    commands.append(words)
    return [c for c in commands if c]


def _trainformer_args(words: list[str]) -> list[str] | None:
    """The arguments after `trainformer` (or `-m trainformer`), None if `words` runs something else."""
    if Path(words[0]).name == "trainformer":
        return words[1:]
    if "-m" in words:
        i = words.index("-m")
        if i + 1 < len(words) and words[i + 1] == "trainformer":
            return words[i + 2 :]
    return None


def _inline_commands(path: Path) -> list[tuple[str, str]]:
    """(where, text) of inline code spans that run a verb with arguments: `trainformer VERB ARG...`.

    A bare verb (`trainformer ensemble`) names the command rather than running it;
    spans with ``...`` elide arguments. Neither is checked.
    """
    verbs = set(_verbs())
    out = []
    text = _strip_code(path.read_text(encoding="utf-8"), keep_inline=True)
    for i, line in enumerate(text.splitlines(), 1):
        for m in re.finditer(r"`(trainformer\s[^`]+)`", line):
            words = m.group(1).split()
            if len(words) >= 3 and words[1] in verbs and "..." not in m.group(1):
                out.append((f"{_rel(path)}:{i}", m.group(1)))
    return out


def _trainformer_commands() -> list[tuple[str, str, list[str]]]:
    out = []
    for path in DOCS:
        for where, line in _command_lines(path) + _inline_commands(path):
            for words in _simple_commands(line):
                args = _trainformer_args(words)
                if args is not None:
                    out.append((where, line, args))
    return out


COMMANDS = _trainformer_commands()


def test_docs_show_commands():
    assert len(COMMANDS) >= 20, "expected the README and docs to show trainformer commands"


@pytest.mark.parametrize("where,line,args", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_command_parses(where, line, args):
    parser = build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parsed = parser.parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{where}: `{line}` does not parse (exit {e.code}): {err.getvalue().strip()}")
    assert getattr(parsed, "command", None), f"{where}: `{line}` names no command"


def test_readme_shows_every_verb():
    shown = {args[0] for where, _, args in COMMANDS if where.startswith("README.md") and args}
    verbs = set(_verbs())
    assert verbs <= shown, f"README shows no command for: {sorted(verbs - shown)}"


# ----------------------------------------------------------------------------
# Links
# ----------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _strip_code(path.read_text(encoding="utf-8"), keep_inline=True)
    seen: dict[str, int] = {}
    out = set()
    for line in text.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links() -> list[tuple[str, Path, str]]:
    out = []
    for path in DOCS:
        text = _strip_code(path.read_text(encoding="utf-8"))
        for i, line in enumerate(text.splitlines(), 1):
            for m in _LINK.finditer(line):
                target = m.group(1) or m.group(2)
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                out.append((f"{_rel(path)}:{i}", path, target))
    return out


LINKS = _links()


@pytest.mark.parametrize("where,path,target", LINKS, ids=[f"{w} {t}" for w, _, t in LINKS])
def test_link_resolves(where, path, target):
    file_part, _, anchor = target.partition("#")
    dest = (path.parent / file_part).resolve() if file_part else path
    assert dest.exists(), f"{where}: link to {target} points to no file"
    assert ROOT in dest.parents or dest == ROOT, f"{where}: link to {target} leaves the repository"
    if anchor and dest.suffix == ".md":
        assert anchor in _anchors(dest), f"{where}: {_rel(dest)} has no heading for #{anchor}"


# ----------------------------------------------------------------------------
# The README as a front page
# ----------------------------------------------------------------------------


def test_readme_length():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; keep it at most {MAX_README_LINES}"


@pytest.mark.parametrize("marker", ["<!-- main-command -->", "<!-- test-command -->"])
def test_setup_markers(marker):
    lines = README.read_text(encoding="utf-8").splitlines()
    at = [i for i, line in enumerate(lines) if line.strip() == marker]
    assert len(at) == 1, f"README.md: expected the marker {marker} once, found it {len(at)} times"
    i = at[0]
    assert lines[i + 1].strip() == "```bash", f"README.md:{i + 2}: expected ```bash after {marker}"
    command = lines[i + 2].strip()
    assert command and not command.startswith("```"), f"README.md:{i + 3}: expected a command"
    assert lines[i + 3].strip() == "```", f"README.md:{i + 4}: the command after {marker} must be one line"


def test_test_command_installs_every_extra():
    """CI runs the README's test command: it must install what every test needs (all extras)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    lines = README.read_text(encoding="utf-8").splitlines()
    i = next(i for i, line in enumerate(lines) if line.strip() == "<!-- test-command -->")
    extras = set(re.search(r'pip install -e "\.\[([^\]]*)\]"', lines[i + 2]).group(1).split(","))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert extras == set(project["optional-dependencies"])
    assert lines[i + 2].rstrip().endswith("python -m pytest")


def test_readme_speaks_to_users():
    text = README.read_text(encoding="utf-8")
    for pattern in (r"\bduplicates\b", r"/work/", r"\.library", r"\bissues?\b", r"\bbrief\b",
                    r"\bsessions?\b", r"\btargets?\b"):
        m = re.search(pattern, text, re.IGNORECASE)
        assert m is None, f"README.md mentions {m.group(0)!r}" if m else ""


def test_readme_run_paths_are_made_by_its_commands():
    """A `runs/...` path in the README is a run the README's own commands create."""
    text = README.read_text(encoding="utf-8")
    made = set(re.findall(r"--out\s+(runs/[\w.-]+)", text))
    default = re.compile(r"^runs/[\w-]+-\d{8}-\d{6}/?$")  # runs/<recipe>-<YYYYmmdd-HHMMSS>
    for path in re.findall(r"(?<![\w/.])runs/[\w./*-]*", text):
        path = path.rstrip(".")
        ok = default.match(path) or any(path == m or path.startswith(m + "/") for m in made)
        assert ok, f"README.md names {path}, which no command in it creates"


def test_docs_hold_no_machine_paths():
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        m = re.search(r"(?<![\w.])(/work/|/home/|/Users/|/root/|/opt/|/tmp/|[A-Z]:\\)", text)
        assert m is None, f"{_rel(path)} holds a machine-local path ({m.group(0)})" if m else ""


def test_results_pages_name_date_and_machine():
    for path in sorted((ROOT / "docs" / "results").glob("*.md")):
        if path.name == "README.md":
            continue
        text = path.read_text(encoding="utf-8")
        assert re.search(r"\b20\d\d-\d\d-\d\d\b", text), f"{_rel(path)}: no dates"
        assert re.search(r"\b(AVX2|AVX-512|H200)\b", text), f"{_rel(path)}: no machine"


# ----------------------------------------------------------------------------
# The config reference
# ----------------------------------------------------------------------------


def test_every_config_field_is_documented():
    missing = configdoc.undocumented()
    assert not missing, (
        f"config fields without a comment in config.py or an entry in configdoc.FIELD_DOCS: {missing}"
    )
    assert not configdoc.stale_docs(), f"configdoc.FIELD_DOCS keys to drop: {configdoc.stale_docs()}"


def test_config_reference_is_current():
    path = ROOT / "docs" / "config.md"
    assert path.is_file(), "docs/config.md is missing: python -m trainformer.configdoc > docs/config.md"
    assert path.read_text(encoding="utf-8") == configdoc.render(), (
        "docs/config.md is stale: python -m trainformer.configdoc > docs/config.md"
    )
