"""The user docs' commands still work: every `--config` they name exists and composes, every flag they show is one
its command accepts.

README.md and docs/*.md are where users copy commands from; a renamed flag or a moved config breaks them while every
other test passes. This test reads the commands in their shell blocks and inline code: `letstalk COMMAND ARGS` (also
behind env assignments, `srun` or `--wrap "..."`) and `sbatch ... slurm/X.sbatch ARGS`, whose ARGS go to the
`letstalk` command that script runs. Comments, `...` placeholders and the brackets of `[--optional flags]` are
dropped; `$VAR` of a `for VAR in GLOB` loop takes each file the glob matches. Then:
- every `--config PATH` in the docs, prose included, exists (from the repository root);
- each distinct `letstalk fit|validate` command parses with `--print_config`, in process: LightningCLI composes its
  configs and flags without reading any data, so /data/shards need not exist;
- every `--flag` of another command is an option of its sub-parser (`pipeline.cli._parser`), spelled in full;
  `letstalk sweep ... -- ARGS` passes ARGS to `letstalk fit`.
All problems are reported together, each with its file, line and command. The docs' Python examples are checked
too: their imports run and every call of an imported function or class binds to its signature.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import shlex
from pathlib import Path

import pytest

from pipeline.cli import LIGHTNING_COMMANDS, _parser, main

ROOT = Path(__file__).resolve().parents[1]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
CONFIG = re.compile(r"--config[= ]+([\w./-]*\w)")
LOOP = re.compile(r"\bfor (\w+) in ([^;]+); do\b")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def snippets(text: str) -> list[tuple[int, str]]:
    """(line number, shell text) of each logical line of a shell code block (backslash continuations joined) and of
    each inline code span that runs a command."""
    found, prose, fence, start, pending = [], [], None, 0, ""
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip().startswith("```"):
            fence = line.strip()[3:].strip() if fence is None else None
            prose.append("")
        elif fence is None:
            prose.append(line)
        else:
            prose.append("")
            if fence in SHELL_FENCES:
                start, pending = start if pending else number, pending + line
                if pending.endswith("\\"):
                    pending = pending[:-1]
                else:
                    found.append((start, pending))
                    pending = ""
    prose_text = "\n".join(prose)
    for span in re.finditer(r"`([^`]+)`", prose_text):
        if re.match(r"(letstalk|sbatch|srun)\s", span[1]) and "\n\n" not in span[1]:
            found.append((prose_text.count("\n", 0, span.start()) + 1, span[1].replace("\n", " ")))
    return found


def script_command(path: str) -> str | None:
    """The `letstalk` command an sbatch script passes its arguments ("$@") to."""
    script = ROOT / path
    run = re.search(r'letstalk ([a-z][a-z-]*) .*"\$@"', script.read_text()) if script.is_file() else None
    return run[1] if run else None


def arguments(tokens: list[str]) -> list[str]:
    """The arguments up to the end of the command (`;`, `&&`, `|`, `)`, ..., or the next `letstalk`)."""
    args = []
    for token in tokens:
        if token == "letstalk" or re.fullmatch(r"[();<>|&]+", token):
            break
        if token not in ("...", "…"):
            args.append(token.strip("[]"))
    return args


def words(snippet: str) -> list[str]:
    """Shell words, with `;`, `&&`, `|`, `(`, `)` apart, a quoted `"letstalk ..."` split too (plain whitespace split
    where a quote is left open)."""
    lexer = shlex.shlex(snippet, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:
        tokens = snippet.split()
    return [part for token in tokens for part in (token.split() if token.startswith("letstalk ") else [token])]


def sweep_split(command: str, args: list[str]) -> list[tuple[str, list[str]]]:
    """`letstalk sweep SWEEP_ARGS -- FIT_ARGS` is a sweep and a `letstalk fit FIT_ARGS`."""
    if command != "sweep" or "--" not in args:
        return [(command, args)]
    cut = args.index("--")
    return [("sweep", args[:cut]), ("fit", args[cut + 1:])]


def invocations(snippet: str) -> list[tuple[str, list[str]]]:
    """(command, args) of each `letstalk` command in a line of shell; an sbatch script that runs none is its own
    command."""
    tokens = words(snippet)
    found = []
    for i, token in enumerate(tokens):
        if token == "letstalk" and re.fullmatch(r"[a-z][a-z-]*", tokens[i + 1] if i + 1 < len(tokens) else ""):
            found.append((tokens[i + 1], arguments(tokens[i + 2:])))
        elif re.fullmatch(r"slurm/[\w.-]+\.sbatch", token):
            found.append((script_command(token) or token, arguments(tokens[i + 1:])))
    return [(name, args) for command, args in found for name, args in sweep_split(command, args) if args]


def doc_commands(path: Path) -> list[tuple[str, str, list[str]]]:
    """(where, command, args) of every command in a doc; a loop variable's commands once per value."""
    loops: dict[str, list[str]] = {}
    commands = []
    for line, snippet in snippets(path.read_text()):
        where = f"{path.relative_to(ROOT)}:{line}"
        if loop := LOOP.search(snippet):  # an empty glob stays itself, and fails as a file that does not exist
            loops[loop[1]] = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(loop[2].strip())) or [loop[2]]
        for command, args in invocations(snippet):
            variable = next((v for v in loops if f"${v}" in args), None)
            for value in loops[variable] if variable else [None]:
                commands.append((where, command, [value if a == f"${variable}" else a for a in args]))
    return commands


def subcommand_options() -> dict[str, set[str]]:
    subparsers = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: set(parser._option_string_actions) for name, parser in subparsers.choices.items()}


def lightning_problem(command: str, args: list[str], capsys) -> str | None:
    """Why `letstalk COMMAND ARGS --print_config` does not compose (its error message), or None."""
    with pytest.raises(SystemExit) as exited:
        main([command, *args, *(["--print_config"] if "--print_config" not in args else [])])
    err = capsys.readouterr().err.splitlines()
    first = next((i for i, line in enumerate(err) if "error:" in line), 0)  # not the usage text before it
    return None if exited.value.code == 0 else " | ".join(line.strip() for line in err[first:])


def test_every_command_in_the_docs_has_real_configs_and_flags(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the docs' relative paths are from the repository root
    options = subcommand_options()
    problems, lightning, configs, commands = [], {}, 0, 0
    for path in doc_files():
        for line, text in enumerate(path.read_text().split("\n"), 1):
            configs += len(CONFIG.findall(text))
            problems += [f"{path.relative_to(ROOT)}:{line}: --config {config}: no such file"
                         for config in CONFIG.findall(text) if not (ROOT / config).is_file()]
        for where, command, args in doc_commands(path):
            commands += 1
            shown = f"letstalk {command} {shlex.join(args)}"
            if command in LIGHTNING_COMMANDS:
                lightning.setdefault((command, *args), (where, shown))
            elif command not in options:
                problems.append(f"{where}: {shown}: no such command (nor an sbatch script that runs one)")
            else:
                problems += [f"{where}: {shown}: letstalk {command} has no option {flag}"
                             for flag in (a.split("=", 1)[0] for a in args if a.startswith("--"))
                             if flag not in options[command]]
    for (command, *args), (where, shown) in lightning.items():
        if problem := lightning_problem(command, args, capsys):
            problems.append(f"{where}: {shown}: {problem}")
    print(f"checked {commands} commands ({len(lightning)} distinct fit/validate ones composed) and {configs} --config "
          f"mentions in {len(doc_files())} files")
    assert not problems, f"{len(problems)} problems in the docs:\n" + "\n".join(problems)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line, code) of each ```python block."""
    return [(text.count("\n", 0, m.start()) + 2, m[1]) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def call_problems(code: str) -> list[str]:
    """Run the block's imports, then check that every call of an imported name binds to its real signature (a
    renamed keyword or a dropped parameter fails); nothing else runs."""
    tree = ast.parse(code)
    names: dict = {}
    exec(compile(ast.Module([n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], []), "doc", "exec"),
         names)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and callable(names.get(node.func.id)):
            try:
                inspect.signature(names[node.func.id]).bind(*node.args, **{k.arg: None for k in node.keywords})
            except TypeError as err:
                problems.append(f"line {node.lineno}: {node.func.id}(...): {err}")
    return problems


def test_every_python_example_in_the_docs_imports_and_calls_real_signatures():
    blocks = [(path, line, code) for path in doc_files() for line, code in python_blocks(path.read_text())]
    assert len(blocks) >= 2  # docs/data.md and docs/generation.md
    problems = [f"{path.relative_to(ROOT)}:{line}: {problem}" for path, line, code in blocks
                for problem in call_problems(code)]
    assert not problems, "\n".join(problems)
