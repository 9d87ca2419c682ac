"""--seed, --device, --precision and --compile: declared once, the same option in every command."""
import importlib
import subprocess
import sys

import pytest

# command -> (takes --seed, --precision default or None, takes --compile)
COMMANDS = {
    "train": (True, "auto", True), "finetune": (True, "auto", True), "generate": (True, "auto", True),
    "visualize": (True, "auto", True), "inpaint": (True, "auto", False), "detect": (True, "fp32", False),
    "segment": (True, "fp32", False), "evaluate": (False, None, False),
}


def actions(command):
    if command in ("detect", "segment"):
        pytest.importorskip("pycocotools")
    parser = importlib.import_module(f"addp.{command}").get_args_parser()
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings}


def test_each_command_has_the_same_run_options():
    seen = {}
    for command, (seed, precision, compiles) in COMMANDS.items():
        try:
            found = actions(command)
        except pytest.skip.Exception:
            continue
        assert ("--seed" in found) == seed, command
        assert "--device" in found, command
        assert (found["--precision"].default if "--precision" in found else None) == precision, command
        assert ("--compile" in found) == compiles, command
        for flag in ("--seed", "--device", "--precision"):
            if flag in found:
                a = found[flag]
                seen.setdefault(flag, (a.help, a.type, a.choices))
                assert (a.help, a.type, a.choices) == seen[flag], (command, flag)
    assert set(seen) == {"--seed", "--device", "--precision"}


@pytest.mark.parametrize("command", ["train", "generate", "inpaint", "evaluate"])
def test_help_lists_the_run_options(command):
    out = subprocess.run([sys.executable, "-m", f"addp.{command}", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    seed, precision, compiles = COMMANDS[command]
    wanted = {"--seed": seed, "--device": True, "--precision": precision is not None, "--compile": compiles}
    for flag, listed in wanted.items():
        assert (f"{flag} " in out.stdout) == listed, (command, flag)


@pytest.mark.parametrize("bad", [["--seed", "-1"], ["--precision", "fp8"], ["--device", "tpu"]])
def test_bad_run_option_is_one_line_error(bad, capsys):
    from addp.train import cli
    assert cli(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
