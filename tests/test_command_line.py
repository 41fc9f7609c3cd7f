"""The command line as people use it: the installed ``lightning-delta`` console script, run in a subprocess.

Help is the live parsers' help, stored for the locked environment and kept per environment elsewhere (its speed is
measured by ``python -m benchmarks.help_speed``, not asserted here); the library's classes are listed and described
by name; errors are one message and a non-zero status; and the README's command-line walk-through runs as written
from an empty directory holding a tiny pre/post pair and the README's three GSM8K lines.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import types
import typing
from pathlib import Path

import pytest

import lightning_delta.cli as cli
import lightning_delta.cli.help as cli_help
from tests.support.locked import requires_lock

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CONSOLE = Path(sys.executable).with_name("lightning-delta")
REGENERATE = 'python -c "import lightning_delta.cli as c; c.write_stored_help()"'


def console(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> tuple[subprocess.CompletedProcess, float]:
    """``lightning-delta *args`` as a user runs it, and its wall-clock seconds."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in (cli.DEBUG_ENV, cli_help.HELP_ENV, "COLUMNS") and not key.startswith("JSONARGPARSE_")
    }
    environment.update(env or {})
    started = time.perf_counter()
    done = subprocess.run(
        [str(CONSOLE), *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )
    return done, time.perf_counter() - started


def stored_help() -> dict[str, str]:
    import lightning_delta.cli._help as stored

    return stored.HELP


@pytest.mark.slow
@requires_lock
def test_the_stored_help_is_current():
    import lightning_delta.cli._help as stored

    stale = [
        command
        for command, made_from in stored.FINGERPRINTS.items()
        if made_from != cli.fingerprint(made_from["files"])
    ]
    assert not stale, (
        f"What the help of {stale} shows changed since lightning_delta/cli/_help.py was written, so their --help falls "
        f"back to the live parsers (seconds): run {REGENERATE}."
    )


@pytest.mark.subprocess
@requires_lock
@pytest.mark.timeout(300)
def test_the_stored_help_is_what_the_live_parsers_print():
    """Each command's stored help equals the live parser's (built in a fresh process, as write_stored_help does), and
    was made from the package's current sources and libraries."""
    import lightning_delta.cli._help as stored

    generated = cli.generated_help()
    stale = [command for command in cli.COMMANDS if generated["help"][command] != stored.HELP.get(command)]
    assert not stale, f"The stored help of {stale} differs from the live parsers': run {REGENERATE}."
    assert generated["fingerprints"] == stored.FINGERPRINTS, f"run {REGENERATE}"


def test_a_change_that_the_help_can_show_makes_it_live(tmp_path):
    """Outside the cli package, function bodies and methods other than __init__ leave the fingerprint as it is;
    a docstring, a signature, module-level code, a class attribute or __init__ change it; so does any change to a
    file of the cli package."""
    source = tmp_path / "module.py"

    def digest(text: str, name: str = "module.py") -> bytes:
        source.write_text(text)
        return cli_help._help_source(source, name)

    base = (
        'X = 1\n\ndef f(a: int = 1):\n    """Doc."""\n    return a\n\n\nclass C:\n    """Class doc."""\n\n'
        "    y: int = 0\n\n    def __init__(self, b: int = 1):\n        self.b = b\n\n    def g(self):\n"
        "        return 1\n"
    )
    for same in (
        base.replace("return a", "return a + 1"),
        base.replace("return 1", "return 2"),
        base + "\n    def h(self):\n        return 3\n",
    ):
        assert digest(same) == digest(base)
    for changed in (
        base.replace("Doc.", "Other."),
        base.replace("a: int = 1", "a: int = 2"),
        base.replace("X = 1", "X = 2"),
        base.replace("Class doc.", "Other."),
        base.replace("y: int = 0", "y: int = 1"),
        base.replace("self.b = b", "self.b = -b"),
        base.replace("b: int = 1", "b: int = 2"),
    ):
        assert digest(changed) != digest(base), changed
    assert digest(base, "cli/parser.py") != digest(base.replace("return a", "return a + 1"), "cli/parser.py")


def check_help(command: str, done: subprocess.CompletedProcess) -> None:
    """``done`` is ``lightning-delta [command] --help`` exiting 0 with the command's usage (the top one: every
    command listed with its summary)."""
    assert done.returncode == 0, done.stderr
    if command:
        # validate's usage is LightningCLI's, which names its options before the command
        usage = f"usage: lightning-delta {command} "
        if command == "validate":
            usage = "usage: lightning-delta [options] validate "
        assert done.stdout.startswith(usage)
    else:
        for name, (_, _, summary) in cli.COMMANDS.items():
            assert re.search(rf"^\s+{name}\s+{re.escape(summary.split()[0])}", done.stdout, re.M), name
        assert "--debug" in done.stdout and cli.DEBUG_ENV in done.stdout


@pytest.mark.subprocess
@requires_lock
@pytest.mark.parametrize("command", ["", *cli.COMMANDS])
def test_help_in_the_locked_environment_is_the_stored_help(command, tmp_path):
    """In the locked environment every command's help is the stored one from the first call: nothing is kept."""
    done, _ = console(*([command] if command else []), "--help", env={"LIGHTNING_DELTA_CACHE": str(tmp_path)})
    check_help(command, done)
    if command:
        assert done.stdout == stored_help()[command]
    assert not (tmp_path / "help").exists()


@pytest.mark.subprocess
@pytest.mark.parametrize("command", ["", *cli.COMMANDS])
def test_help_as_printed(command, tmp_path):
    """Twin of the test above in any environment: the help prints its usage, twice the same."""
    first, _ = console(*([command] if command else []), "--help", env={"LIGHTNING_DELTA_CACHE": str(tmp_path)})
    second, _ = console(*([command] if command else []), "--help", env={"LIGHTNING_DELTA_CACHE": str(tmp_path)})
    check_help(command, first)
    assert second.stdout == first.stdout


@pytest.mark.slow
def test_help_outside_the_locked_environment_is_made_once_and_kept(tmp_path, monkeypatch):
    """Where the stored help does not apply (another release of a library), the first call prints the live parser's
    help and keeps it under the cache directory; the next call prints the kept one without building a parser; a
    change that the help can show (the fingerprint) makes it live again; another environment has its own folder."""
    monkeypatch.setenv("LIGHTNING_DELTA_CACHE", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr(cli_help, "_stored_help", lambda command: None)
    live = cli.live_help
    built = []

    def counted(command: str) -> str:
        built.append(command)
        return live(command)

    monkeypatch.setattr(cli_help, "live_help", counted)
    first = cli.help_text("plot")
    assert built == ["plot"] and (cli.help_cache_dir() / "plot.json").is_file()
    monkeypatch.setenv("COLUMNS", str(cli.HELP_WIDTH))
    assert first == live("plot"), "the kept help is formatted for HELP_WIDTH columns, as the stored one is"
    assert cli.help_text("plot") == first and built == ["plot"]

    real_fingerprint = cli.fingerprint
    monkeypatch.setattr(cli_help, "fingerprint", lambda files: {**real_fingerprint(files), "python": "2.7"})
    assert cli.help_text("plot") == first and built == ["plot", "plot"]

    monkeypatch.setattr(cli_help.sys, "prefix", str(tmp_path / "another-venv"))
    assert cli.help_cache_dir() != tmp_path / "help" and cli.help_cache_dir().parent == tmp_path / "help"


def test_a_narrow_terminal_gets_the_live_help_and_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_DELTA_CACHE", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "60")
    text = cli.help_text("plot")
    assert max(len(line) for line in text.splitlines()) <= 60
    assert not (tmp_path / "help").exists()


@pytest.mark.subprocess
def test_help_imports_neither_torch_nor_lightning(tmp_path):
    """Once the help is stored or kept (the first process may build it where the stored help does not apply), a
    process that prints every command's help imports neither torch, Lightning nor transformers."""
    code = (
        "import sys, contextlib, io, lightning_delta.cli as c\n"
        "for command in c.COMMANDS:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        c.run([command, '--help'])\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "COLUMNS": "80", "LIGHTNING_DELTA_CACHE": str(tmp_path)}
    subprocess.run(
        [sys.executable, "-c", code.replace("assert not heavy", "pass  #")], check=True, timeout=300, env=env
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)


def argument_help(help_text: str, option: str) -> str:
    """The description of ``option`` in a help text, on one line (what follows its name up to the next option)."""
    match = re.search(
        rf"^  {re.escape(option)} [A-Z_]+(?:, {re.escape(option)}\+ [A-Z_]+)?(.*?)(?=^  -|^\S|\Z)",
        help_text,
        re.M | re.S,
    )
    assert match, f"{option} is not in the help"
    return " ".join(match.group(1).split())


@pytest.mark.subprocess
def test_help_names_and_describes_the_library_classes():
    """Item 2: DataModules, losses, evaluators and edits listed by short name with a description; every model
    argument described; no list of torch's classes; one class's help by its short name."""
    from lightning_delta.edits import EDITS
    from lightning_delta.losses import LOSSES

    done, _ = console("validate", "--help")
    out = done.stdout
    for name in [
        "GSM8KDataModule",
        "UltraFeedbackDataModule",
        "VisionDataModule",
        *LOSSES,
        "GSM8KEvaluator",
        *(cls.__name__ for cls in EDITS.values()),
    ]:
        assert re.search(rf"^\s+- {name}: \w", out, re.M), f"{name} is not listed with a description"
    for argument in ("model", "pretrained", "loss", "include", "exclude", "evaluator", "dtype"):
        described = argument_help(out, f"--model.{argument}").split("(type:")[0].split("(required")[0]
        assert len(described.split()) >= 4, f"--model.{argument} has no description: {described!r}"
    assert argument_help(out, "--model.include").startswith("regular expressions on tensor names")
    assert "subclass of Tensor" not in out and "torch.nn.Identity" not in out

    done, _ = console("validate", "--data.help", "GSM8KDataModule")
    assert done.returncode == 0, done.stderr
    assert re.search(r"--data\.tokenizer TOKENIZER\s+the tokenizer that writes prompts", done.stdout)
    assert re.search(r"--data\.data DATA\s+where the examples are: (?:.*\n){0,8}.*question", done.stdout)

    done, _ = console("sweep", "--model.evaluator.help", "GSM8KEvaluator")
    assert done.returncode == 0, done.stderr
    assert re.search(r"--model\.evaluator\.tokenizer TOKENIZER\s+the tokenizer that decodes", done.stdout)


@pytest.mark.subprocess
def test_validate_and_sweep_help_are_their_own():
    """Item 4: sweep's help is sweep's (usage, description); validate's leaves out the sweep section."""
    from lightning_delta.cli.help_format import SWEEP_DESCRIPTION, VALIDATE_DESCRIPTION

    sweep_help, _ = console("sweep", "--help")
    assert sweep_help.stdout.startswith("usage: lightning-delta sweep [-c CONFIG]")
    assert " ".join(SWEEP_DESCRIPTION.split()) in " ".join(sweep_help.stdout.split())
    assert "Lightning Trainer command line tool" not in sweep_help.stdout
    assert "--sweep.grid GRID" in sweep_help.stdout and "--ckpt_path" not in sweep_help.stdout

    validate_help, _ = console("validate", "--help")
    assert " ".join(VALIDATE_DESCRIPTION.split()) in " ".join(validate_help.stdout.split())
    assert "--sweep." not in validate_help.stdout and "--ckpt_path" in validate_help.stdout


@pytest.mark.subprocess
def test_errors_are_their_message_and_a_nonzero_status():
    """Item 7: a library error is one line and status 1; --debug or LIGHTNING_DELTA_DEBUG=1 shows the traceback."""
    args = ("validate", "--edit", "dare", "--edit.p", "0.9")
    done, _ = console(*args)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[0].startswith("lightning-delta: error: Unknown edit 'dare' for --edit. Did you mean DARE?")
    assert lines[1:] == [f"(the traceback: add --debug, or set {cli.DEBUG_ENV}=1)"]
    for debug_args, env in (((*args, "--debug"), None), (args, {cli.DEBUG_ENV: "1"})):
        done, _ = console(*debug_args, env=env)
        assert done.returncode == 1
        assert "Traceback (most recent call last)" in done.stderr and "ValueError: Unknown edit 'dare'" in done.stderr


def test_every_list_argument_takes_a_single_value():
    """Item 5: wherever a list is accepted on the command line, so is one value of it."""
    from jsonargparse._typehints import ActionTypeHint  # the action of every typed argument

    def accepted(hint) -> set:
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            return set().union(*(accepted(arg) for arg in typing.get_args(hint)))
        return {hint}

    lists = []
    for command in ("validate", "sweep", "edit", "plot"):
        parser = cli.command_parser(command)
        for action in parser._actions:
            if not isinstance(action, ActionTypeHint):
                continue
            hints = accepted(action._typehint)
            for hint in hints:
                if typing.get_origin(hint) in (list, typing.List) or hint is list:  # noqa: UP006
                    element = (typing.get_args(hint) or (typing.Any,))[0]
                    lists.append(action.dest)
                    assert accepted(element) <= hints or typing.Any in hints, (
                        f"`{command} --{action.dest}` takes {hint} but not one {element}"
                    )
    assert {"results", "include", "exclude", "model.include", "model.exclude"} <= set(lists)
    assert cli.command_parser("plot").parse_args(["--results", "results/tiny.jsonl"]).results == "results/tiny.jsonl"


# ------------------------------------------------------------------------------------------------ the README
def readme_section() -> str:
    text = README.read_text()
    return text[text.index("## Quick start: command line") : text.index("## Quick start: multi-node DDP")]


def readme_commands() -> list[str]:
    """The commands of the README's command-line walk-through (the bash block that reads gsm8k.jsonl), each with its
    continuation lines joined, comments left out."""
    blocks = [
        block
        for block in re.findall(r"```bash\n(.*?)```", readme_section(), re.S)
        if "--data.data gsm8k.jsonl" in block
    ]
    assert len(blocks) == 1, "the README's command-line section should have one walk-through block"
    joined = blocks[0].replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def readme_examples() -> list[list[str]]:
    """The README's ```text blocks of the command-line section: the data examples, in order."""
    return [
        [line.strip() for line in block.strip().splitlines()]
        for block in re.findall(r"```text\n(.*?)```", readme_section(), re.S)
    ]


def docstring_example(module) -> list[str]:
    """The three example lines of a DataModule module's docstring (its ``::`` block)."""
    block = module.__doc__.split("::\n\n", 1)[1]
    return [line.strip() for line in block.splitlines()[:3]]


def test_the_readme_data_examples_are_the_datamodules_own():
    """Item 3: the README shows each DataModule's accepted files by the examples its docstring gives."""
    from lightning_delta.datamodules import gsm8k, ultrafeedback, vision

    assert readme_examples() == [docstring_example(gsm8k), docstring_example(ultrafeedback), docstring_example(vision)]


@pytest.mark.subprocess
@pytest.mark.timeout(900)
def test_the_readme_walk_through_runs_as_written(tmp_path):
    """Items 5, 6 and 8 as a new user meets them: every command of the README's walk-through, copied as written, in a
    directory holding only pre/, post/ (a tiny Llama pair with its tokenizer) and gsm8k.jsonl (the README's lines)."""
    import torch
    from safetensors.torch import load_file

    from tests.support.tiny_models import make_tiny_pair

    pair = make_tiny_pair(tmp_path / "models", "llama", shard=None, scale=0.05)
    work = tmp_path / "work"
    work.mkdir()
    shutil.move(pair.pre_dir, work / "pre")
    shutil.move(pair.post_dir, work / "post")
    (work / "gsm8k.jsonl").write_text("\n".join(readme_examples()[0]) + "\n")
    env = {**os.environ, "PATH": f"{CONSOLE.parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env = {key: value for key, value in env.items() if key not in (cli.DEBUG_ENV, cli_help.HELP_ENV)}
    outputs = []
    for command in readme_commands():
        assert shlex.split(command)[0] == "lightning-delta"
        done = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        outputs.append((command, done.stdout))
    validate, config, first, second, plot, edit = (out for _, out in outputs)

    # validate: the table, equal to what it wrote
    written = json.loads((work / "lightning_logs" / "version_0" / "riemann.json").read_text())
    assert re.search(
        r"^Riemann analysis of DARE\(p=0\.9, k=0\.0, rescale=True, seed=0\) on GSM8K/test, C = 5,", validate, re.M
    )
    for label, value in (
        ("term (left rule)", written["term"]),
        ("trapezoid", written["trapezoid"]),
        ("exact ΔL", written["exact"]),
    ):
        assert re.search(rf"^  {re.escape(label)}\s+{re.escape(f'{value:+.6g}')}$", validate, re.M), label
    assert f"{written['loss_post']:.6g} -> {written['loss_edit']:.6g}" in validate
    assert re.search(r"^  top 5 of \d+ modules by \|term\|:$", validate, re.M)
    assert validate.rstrip().endswith("written to lightning_logs/version_0/riemann.json")
    assert config == "" and "grid" in (work / "tiny.yaml").read_text()

    # sweep: a line per point, then a table with what is left; the second run does the rest
    rows = [json.loads(line) for line in (work / "results" / "tiny.jsonl").read_text().splitlines()]
    assert [row["edit"]["p"] for row in rows] == [0.1, 0.3, 0.5, 0.7, 0.9]
    for number, row in enumerate(rows[:3], start=1):
        result = row["result"]
        line = f"[{number}/3] p={row['edit']['p']}: term {result['term']:+.4g}, exact ΔL {result['exact']:+.4g}"
        assert re.search(rf"^{re.escape(line)}, accuracy -, \d+\.\d s$", first, re.M), line
    assert re.search(r"^4\s+p=0\.7\s+left$", first, re.M) and re.search(r"^5\s+p=0\.9\s+left$", first, re.M)
    assert "3 points run now, 0 before, 2 left; rows in results/tiny.jsonl. --sweep.max_points 3 stopped" in first
    assert "[1/2] p=0.7" in second and "2 points run now, 3 before, 0 left" in second

    # plot and edit: one value where a list is
    figures = re.findall(r"^figure: (.+)$", plot, re.M)
    assert figures and all((work / figure).is_file() for figure in figures)
    assert "written to edited" in edit
    edited = load_file(work / "edited" / "model.safetensors")
    post = load_file(work / "post" / "model.safetensors")
    torch.testing.assert_close(edited["lm_head.weight"], post["lm_head.weight"], rtol=0, atol=0)
    assert not torch.equal(edited["model.layers.0.mlp.up_proj.weight"], post["model.layers.0.mlp.up_proj.weight"])


def test_each_datamodule_reads_the_example_its_docstring_gives(tmp_path, tiny_tokenizer):
    """Item 3: the three-line examples of the docstrings (and the README) are files the DataModules read."""
    import numpy as np
    from PIL import Image

    from lightning_delta.datamodules import (
        CLASSNAMES,
        GSM8KDataModule,
        UltraFeedbackDataModule,
        VisionDataModule,
        gsm8k,
        ultrafeedback,
        vision,
    )
    from tests.support.tiny_models import make_tiny_image_processor

    (tmp_path / "gsm8k.jsonl").write_text("\n".join(docstring_example(gsm8k)) + "\n")
    data = GSM8KDataModule(tiny_tokenizer, data=str(tmp_path / "gsm8k.jsonl"), batch_size=3)
    batch = next(iter(data.val_dataloader()))
    assert batch["answers"] == ["3 + 4 = 7\n#### 7", "5 * 2 = 10\n#### 10", "6 * 3 = 18\n#### 18"]

    (tmp_path / "ultrafeedback.jsonl").write_text("\n".join(docstring_example(ultrafeedback)) + "\n")
    data = UltraFeedbackDataModule(tiny_tokenizer, data=str(tmp_path / "ultrafeedback.jsonl"), batch_size=3)
    batch = next(iter(data.val_dataloader()))
    assert batch["chosen_input_ids"].shape[0] == 3 and (batch["chosen_labels"] != -100).any(dim=1).all()

    paths = [Path(line) for line in docstring_example(vision)]
    for path in paths:  # data/resisc45/<class>/<image>.jpg, under tmp_path
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8)).save(tmp_path / path)
    data = VisionDataModule(
        "resisc45", str(tmp_path / paths[0].parts[0]), processor=make_tiny_image_processor(), split="all", batch_size=3
    )
    batch = next(iter(data.val_dataloader()))
    assert batch["labels"].tolist() == [CLASSNAMES["resisc45"].index(path.parent.name) for path in paths]


def test_the_readme_names_every_command_and_counts_them():
    readme = README.read_text()
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    match = re.search(r"`lightning-delta` has (\w+) commands: (.*?)\. ", " ".join(readme.split()))
    assert match and match.group(1) == words[len(cli.COMMANDS) - 1], match and match.group(1)
    assert sorted(name for name in re.findall(r"`(\w+)`", match.group(2)) if name in cli.COMMANDS) == sorted(
        cli.COMMANDS
    )
