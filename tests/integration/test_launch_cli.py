"""The launch commands' command lines: one spelling per flag, every default in --help, and each output
flag of prepare_data honoured or refused (never ignored)."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from launch import cli, memory, memory_check, options, plot, prepare_data
from launch.configs import ConfigError
from launch.slurm import launch as slurm

REPO = Path(__file__).resolve().parents[2]
COMMANDS = {  # each command's way to parse `--help`
    "launch.pretrain": lambda: options.parse_args(["--help"]),
    "launch.prepare_data": lambda: prepare_data.parse_args(["--help"]),
    "launch.memory": lambda: memory.main(["--help"]),
    "launch.memory_check": lambda: memory_check.main(["--help"]),
    "launch.slurm.launch": lambda: slurm.parse_args(["--help"]),
    "launch.plot": lambda: plot.main(["--help"]),
}


def parser_of(command, monkeypatch, capsys) -> argparse.ArgumentParser:
    made = []
    real = cli.parser

    def recording(**kwargs):
        made.append(real(**kwargs))
        return made[-1]

    monkeypatch.setattr(cli, "parser", recording)
    with pytest.raises(SystemExit) as exit_:
        COMMANDS[command]()
    assert exit_.value.code == 0 and len(made) == 1, f"{command} builds its parser with launch.cli.parser"
    capsys.readouterr()
    return made[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_help_entry_shows_its_default(command, monkeypatch, capsys):
    p = parser_of(command, monkeypatch, capsys)
    formatter = p._get_formatter()
    missing = []
    for action in p._actions:
        takes_value = action.nargs != 0 and (action.option_strings or action.nargs in ("?", "*"))
        if action.help == argparse.SUPPRESS or not takes_value:
            continue
        if "default" not in formatter._format_action(action).lower():  # the entry --help prints
            missing.append(action.option_strings or action.dest)
    assert missing == []
    assert not p.allow_abbrev, "a prefix of a flag is no second spelling of it"


def test_one_spelling_per_flag():
    with pytest.raises(
        ConfigError,
        match=r"^error: --zero is spelled --zero-stage now .*; "
        r"use --zero-stage 1$",
    ):
        memory.main(["llama_1b", "--zero", "1"])
    # an abbreviation is an unknown flag, not --zero-stage
    with pytest.raises(
        ConfigError,
        match=r"^error: unrecognized arguments: --zero 1 "
        r"\(see python -m launch.pretrain --help\)$",
    ):
        options.parse_args(["--zero", "1"])
    est = memory.setup_from_launch(
        memory.launch_argv("llama_1b", tp=1, pp=1, dp=8, ep=1, optimizer="teon", zero_stage=2), 8
    )[2]
    assert est.zero_stage == 2


def test_prepare_data_refuses_an_output_flag_its_source_would_ignore(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"--output-prefix is for --input: --embedded writes a directory "
        r".*; use --output-dir X instead",
    ):
        prepare_data.main(["--embedded", "--output-prefix", "X"])
    with pytest.raises(ConfigError, match=r"use --output-dir data/mycorpus instead"):
        prepare_data.main(["--embedded", "--output-prefix", "data/mycorpus/train"])
    with pytest.raises(ConfigError, match=r"--tokenizer-out is for --input"):
        prepare_data.main(["--embedded", "--tokenizer-out", "tok.json"])
    with pytest.raises(
        ConfigError,
        match=r"--output-dir is for --embedded; with --input give "
        r"--output-prefix d/train",
    ):
        prepare_data.main(["--input", "a.txt", "--output-dir", "d"])
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert prepare_data.parse_args(["--embedded"]).output_dir == str(REPO / "data" / "embedded")


def test_memory_help_is_one_screen_of_flags_with_their_defaults():
    out = subprocess.run(
        [sys.executable, "-m", "launch.memory", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "--zero-stage {0,1,2,3}" in out and "--zero " not in out and "(default: 1.0)" in out
