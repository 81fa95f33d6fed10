"""The README stays true: generated config reference, every command documented."""

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from lmstrain.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_config_reference_in_readme_is_up_to_date():
    result = subprocess.run([sys.executable, str(ROOT / "scripts/update_docs.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, "run `python scripts/update_docs.py` to refresh README.md"


def test_every_command_is_in_the_readme_and_has_help():
    readme = (ROOT / "README.md").read_text()

    def walk(group, prefix):
        for name, command in group.commands.items():
            yield f"{prefix} {name}".strip(), command
            if hasattr(command, "commands"):
                yield from walk(command, f"{prefix} {name}")

    for name, command in walk(main, ""):
        assert f"lmstrain {name}" in readme, name
        assert command.help and len(command.help) > 20, name
        assert CliRunner().invoke(main, [*name.split(), "--help"]).exit_code == 0
