"""Dependencies point one way: appliance -> fusefs -> repo. Checked on the source, so it cannot rot."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "repo": {"fusefs", "appliance", "pyfuse3", "click", "trio", "socket", "http", "h11", "ssl"},
    "fusefs": {"appliance", "click"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_rule(package: str) -> None:
    files = list((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    bad = {str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN[package]) for f in files}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"forbidden imports: {bad}"


def test_exit_codes_in_range_and_documented() -> None:
    from repo import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.IhbError)]
    doc = (ROOT / "docs" / "exit-codes.md").read_text()
    for c in classes:
        assert 2 <= c.exit_code <= 99, c
        assert f"| {c.exit_code} |" in doc, f"exit code {c.exit_code} ({c.__name__}) is not in docs/exit-codes.md"


def test_cli_lazy_map_covers_every_command_and_help_works() -> None:
    import click
    from click.testing import CliRunner

    from appliance.cli import _command_modules, cli, load_all_commands

    load_all_commands()
    assert set(cli.commands) == set(_command_modules()), "appliance.cli.COMMANDS must list every command"
    for name, module in _command_modules().items():  # and name the module that defines it
        assert cli.commands[name].callback.__module__ == module, f"ihb {name} is not defined in {module}"
    runner = CliRunner()

    def walk(cmd: click.Command, path: list[str]) -> None:
        res = runner.invoke(cli, [*path, "--help"])
        assert res.exit_code == 0, f"ihb {' '.join(path)} --help failed: {res.output}"
        assert "Usage:" in res.output
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])

    walk(cli, [])
