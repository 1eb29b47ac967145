"""The dalle-fast console command dispatches to each command module."""

import importlib

import pytest

from dalle_fast import cli


def test_every_command_module_has_main():
    for name, module in cli.COMMANDS.items():
        assert callable(importlib.import_module(module).main), name


def test_help_unknown_and_dispatch(tmp_path, capsys):
    assert cli.main(["--help"]) == 0
    assert "train-dvae" in capsys.readouterr().out
    assert cli.main([]) == 2
    assert cli.main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err
    out = tmp_path / "row.png"
    assert cli.main(["mask-picture", "--kind", "row", "--text-len", "4", "--grid", "4", "4", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
