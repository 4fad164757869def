"""The command line, through typer's CliRunner: user errors are one line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgetl.cli.main import app

runner = CliRunner()


def test_help_does_not_import_the_heavy_stack() -> None:
    """`edgetl --help` must answer at once: no torch, onnx or openvino at import time."""
    code = (
        "import sys; from edgetl.cli.main import app; heavy = {'torch', 'onnx', 'openvino', 'timm', 'onnxruntime'} "
        "& set(sys.modules); print(sorted(heavy)); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "train" in result.output and "backbones" in result.output


@pytest.mark.parametrize("command,options", [("train", "edgetl.config:TrainConfig"), ("adapt", "edgetl.adapt:AdaptOptions")])
def test_command_defaults_are_the_library_defaults(command: str, options: str) -> None:
    """The CLI spells its defaults out (importing the modules behind them would make `edgetl --help` load
    torch); a default changed on one side only would make the command and the library behave differently
    (the shift gate's 3.0, the fine-tune's epochs...)."""
    import dataclasses
    import importlib
    import inspect

    from edgetl.cli import main

    module, name = options.split(":")
    library = {f.name: f.default for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
    parameters = inspect.signature(getattr(main, command)).parameters.items()
    spelled = {name: p.default for name, p in parameters if p.default is not inspect.Parameter.empty}
    shared = sorted(set(library) & set(spelled))
    assert len(shared) >= 10, shared  # the comparison would be empty if either side were renamed
    assert {name: spelled[name] for name in shared} == {name: library[name] for name in shared}


# rich sizes help to COLUMNS, not to click's terminal_width: at its default 80 columns a long option
# column squeezes the help text and cuts the very strings these tests look for.
WIDE = {"COLUMNS": "200"}


def test_every_command_help_renders() -> None:
    """Help texts are rich markup: a literal `[/X]` in one crashed `edgetl train --help` with a traceback."""
    import typer.main

    names = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert {"train", "export", "bench", "adapt", "tune"} <= set(names)
    for name in names:
        result = runner.invoke(app, [name, "--help"], env=WIDE)
        assert result.exit_code == 0, (name, result.output, result.exception)
        assert "Usage" in result.output and "Traceback" not in result.output
    train_help = runner.invoke(app, ["train", "--help"], env=WIDE).output
    assert "UNFREEZE@LR[/DECAY]" in train_help


def test_the_command_list_prints_each_summary_unbroken() -> None:
    """`edgetl --help` printed summaries wrapped in the source as broken lines ("a `cls` index per" / "sample,
    classes.txt"): at a width where nothing needs wrapping, each summary is one line of the command list."""
    import inspect

    import typer.main

    # As a user's terminal prints it: the test runner's captured output truncates long rows with "...".
    env = {**os.environ, "COLUMNS": "1000"}
    output = subprocess.run([sys.executable, "-m", "edgetl", "--help"], capture_output=True, text=True, env=env, check=True).stdout
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    multi_line = [name for name, c in commands.items() if "\n" in inspect.cleandoc(c.callback.__doc__ or "").split("\n\n")[0]]
    assert multi_line, "no command has a wrapped summary: this test would not test anything"
    for name in commands:
        summary = " ".join(inspect.cleandoc(commands[name].callback.__doc__ or "").split("\n\n")[0].split())
        row = next(line for line in output.splitlines() if line.lstrip("│ ").startswith(f"{name} "))
        assert summary[-40:] in row, (name, row)


def _assert_user_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["train", "/definitely/not/here"], "does not exist"),
        (["train"], "missing DATA"),
        (["train", ".", "--backbone", "resnet9000"], "unknown backbone"),
        (["train", ".", "--augment", "wild"], "--augment"),
        (["train", ".", "--hold-out-fold", "2/2"], "--hold-out-fold takes K/N"),
        # --teacher given twice reaches the config as two (cross-fitted) teachers
        (["train", ".", "--teacher", "a", "--teacher", "b", "--distill-mode", "consistent"], "several --teacher"),
        (["eval", "/no/run", "."], "run folder not found"),
        (["train", "--resume", "/no/run"], "run folder not found"),
    ],
)
def test_user_errors(args: list[str], fragment: str) -> None:
    _assert_user_error(runner.invoke(app, args), fragment)


def test_single_class_folder(tmp_path: Path) -> None:
    from conftest import make_folder

    make_folder(tmp_path, classes={"cat": (1, 2, 3)})
    _assert_user_error(runner.invoke(app, ["train", str(tmp_path), "--backbone", "tiny", "--no-pretrained"]), "only one class")


def test_checkpoint_that_is_not_one(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    _assert_user_error(runner.invoke(app, ["eval", str(tmp_path), str(tmp_path)]), "not a readable edgetl checkpoint")


def test_train_and_eval_through_the_cli(image_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = runner.invoke(app, [
        "train", str(image_folder), "--backbone", "tiny", "--no-pretrained", "--out", str(run),
        "--epochs-head", "2", "--epochs-finetune", "1", "--lr-head", "0.01",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "top-1" in result.output and (run / "checkpoint.pt").exists()
    result = runner.invoke(app, ["eval", str(run), str(image_folder), "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m.json").read_text())["n"] == 24  # every image of a plain folder
    result = runner.invoke(app, ["eval", str(run), str(image_folder), "--json", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.output and "Traceback" not in result.output


def test_output_to_a_pipe_is_not_cut_to_80_columns() -> None:
    """Off a terminal rich assumes 80 columns: table cells end in '…' and log lines wrap."""
    code = ("from edgetl.progress import make_console; c = make_console(); c.print('x' * 150); "
            "from rich.table import Table; t = Table(); [t.add_column(f'a_long_column_header_{i}') for i in range(6)]; "
            "t.add_row(*[f'value_{i}_' * 3 for i in range(6)]); c.print(t)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "COLUMNS": ""}).stdout
    assert "x" * 150 in out and "…" not in out and "a_long_column_header_5" in out


def test_a_progress_bar_leaves_nothing_in_a_log_and_still_shows_on_a_terminal() -> None:
    """Off a terminal, or on a dumb one, a bar cannot be redrawn; rich's Live ended each one with an empty line,
    one after every fine-tune epoch of a training log. On a terminal (FORCE_COLOR makes rich treat the pipe as
    one) the bar is drawn and then erased."""
    code = ("from edgetl.progress import Reporter; r = Reporter(); r.log('before')\n"
            "with r.task('decoding 10 images', 10) as advance:\n    [advance(1) for _ in range(10)]\n"
            "r.log('after')")  # fmt: skip
    env = {**{k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}, "TERM": "xterm"}
    for where in ({}, {"FORCE_COLOR": "1", "TERM": "dumb"}):  # a log file; a terminal without cursor movement
        in_a_log = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, **where})
        assert in_a_log.returncode == 0 and in_a_log.stderr == "before\nafter\n", (where, in_a_log.stderr)
    on_a_terminal = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "FORCE_COLOR": "1"})
    assert on_a_terminal.returncode == 0 and "decoding 10 images" in on_a_terminal.stderr and "10/10" in on_a_terminal.stderr


def test_backbones_lists_every_entry() -> None:
    result = runner.invoke(app, ["backbones"], env=WIDE)
    assert result.exit_code == 0
    for name in ("efficientnet_lite0", "mobilenetv3_small_100", "tiny"):
        assert name in result.output
    assert "yes (package)" in result.output


def test_paths_and_names_that_look_like_markup_are_printed_as_written(tmp_path: Path) -> None:
    # Folders `a[` and `b]` make the path `.../a[/b]/...`, which rich would read as a closing tag and raise on
    # (a traceback instead of the command's output); a file `[red]x.png` would lose its name to a colour.
    from conftest import make_folder

    base = tmp_path / "a[" / "b]"
    data = make_folder(base / "data", per_class=6)
    (data / "red" / "[red]unreadable.png").write_bytes(b"not an image")
    run = base / "run"
    steps = [  # (arguments, exit code): predict exits 1 for the unreadable image
        (["train", str(data), "--backbone", "tiny", "--no-pretrained", "--epochs-head", "1", "--epochs-finetune", "0",
          "--out", str(run)], 0),
        (["eval", str(run), str(data)], 0),
        (["export", str(run), "--format", "onnx"], 0),
        (["predict", str(run / "model.onnx"), str(data / "red")], 1),
    ]
    outputs = []
    for args, code in steps:
        result = runner.invoke(app, args, env={"COLUMNS": "400"})
        assert result.exit_code == code and "Traceback" not in result.output, (args[0], result.output, result.exception)
        outputs.append(" ".join(result.output.split()))
    assert "skipped 1 unreadable image(s): red/[red]unreadable.png" in outputs[0]
    assert f"{data} (" in outputs[1]  # the title, path and all
    assert f"export of {run}" in outputs[2]
    assert f"{data / 'red' / '[red]unreadable.png'} │ unreadable" in outputs[3]


def test_a_bad_train_option_is_refused_before_torch_is_imported(tmp_path: Path) -> None:
    # Importing the training stack takes seconds on 2 cores; a typo in an option should not wait for it.
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from edgetl.cli.main import app\n"
        f"result = CliRunner().invoke(app, ['train', {str(tmp_path)!r}, '--lr-head', '-1'])\n"
        "assert result.exit_code == 2 and '--lr-head' in result.output, result.output\n"
        "sys.exit(1 if 'torch' in sys.modules else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr or "torch was imported before the options were checked"
