"""The README's Commands section documents the CLI as it is: every command, every option, the exit codes."""

import re

import click

from conftest import ROOT
from retrain.cli import main


def _commands(group: click.Group, prefix: str = "retrain"):
    for name, command in sorted(group.commands.items()):
        path = f"{prefix} {name}"
        if isinstance(command, click.Group):
            yield from _commands(command, path)
        else:
            yield path, command


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_every_command_and_option_is_in_the_commands_section():
    section = _section("Commands")
    missing = []
    for path, command in _commands(main):
        usage = path.replace("retrain cache info", "retrain cache info|clear").replace("retrain cache clear", "retrain cache info|clear")
        if usage not in section:
            missing.append(path)
        for parameter in command.params:
            if isinstance(parameter, click.Option):
                names = [n for n in parameter.opts if n.startswith("--") and n not in ("--help",)]
                if names and not any(re.search(rf"{re.escape(n)}\b", section) for n in names):
                    missing.append(f"{path} {names[0]}")
    assert missing == [], f"not in the README's Commands section: {missing}"


def test_the_exit_codes_listed_are_the_ones_the_cli_uses():
    section = _section("Commands")
    listed = sorted(int(code) for code in re.findall(r"(\d+) (?:success|a problem|a usage error|interrupted)", section))
    cli_source = (ROOT / "retrain" / "cli.py").read_text()
    used = {0, 1, 2}  # success, ClickException (RetrainError), click's usage errors
    used |= {int(code) for code in re.findall(r"ctx\.exit\((\d+)\)", cli_source)}
    assert listed == sorted(used)


def test_the_format_table_drives_the_choices_and_the_docs():
    from retrain.cli import EXPORT_FORMATS, QUANTIZE_CHOICES
    from retrain.serving.tflite import TFLITE_FORMATS

    section = _section("Commands")
    assert set(EXPORT_FORMATS.values()) == set(TFLITE_FORMATS)
    assert set(QUANTIZE_CHOICES) == (set(TFLITE_FORMATS) - {"float32"}) | {"none"}
    export_line = next(line for line in section.splitlines() if line.startswith("retrain export"))
    assert set(export_line.split("--format ", 1)[1].split()[0].rstrip(".").split("|")) == set(EXPORT_FORMATS)
    quantize = section.split("--quantize ", 1)[1].split("]")[0]
    assert set(quantize.split("|")) == set(QUANTIZE_CHOICES)
