"""Launcher commands registered through ``register_commands``: a third-party command runs through
``instructrl <name>``, its ``key_value_options`` keep ``KEY=V`` option values out of the recipe
overrides, and a command that takes a built-in sub-command's name is a one-line error."""

from __future__ import annotations

import argparse

import pytest
from instructrl.core import registry as registry_module
from instructrl.core.cli import main
from instructrl.core.hookspecs import hookimpl
from instructrl.core.registry import make_registry


class Hello:
    """Prints a greeting."""

    key_value_options: tuple[str, ...] = ()

    def add_arguments(self, parser):
        parser.add_argument("--name", required=True)

    def run(self, args):
        print(f"hello {args.name} debug={getattr(args, 'debug', False)}")
        return 0


class Settings:
    """Echoes its --set values and its overrides."""

    def __init__(self, key_value_options):
        self.key_value_options = key_value_options

    def add_arguments(self, parser):
        parser.add_argument("overrides", nargs="*")
        parser.add_argument("--set", action="append", default=[])

    def run(self, args):
        print(f"set={args.set} overrides={args.overrides}")
        return 0


class CommandsPlugin:
    """A third-party plugin object registering the given commands."""

    def __init__(self, **commands):
        self.commands = commands

    @hookimpl
    def register_commands(self, register):
        for name, cmd in self.commands.items():
            register(name, cmd, description=f"the {name} test command")


def use_plugin(monkeypatch, **commands):
    """Make the launcher's global registry the built-ins plus a plugin with ``commands``."""
    reg = make_registry([CommandsPlugin(**commands)], autoload=False, strict=False)
    monkeypatch.setattr(registry_module, "_REGISTRY", reg)
    return reg


def test_builtin_sweep_and_report_are_command_plugins(registry):
    assert {"report", "sweep"} <= set(registry.names("command"))
    sweep = registry.get("command", "sweep")
    assert sweep.package == "instructrl" and sweep.plugin == "instructrl.plugins.commands.sweep"
    assert set(sweep.factory.key_value_options) == {"--grid", "--zip", "--baseline"}
    report = registry.get("command", "report")
    assert report.plugin == "instructrl.plugins.commands.report"


def test_a_third_party_command_runs_through_the_launcher(monkeypatch, capsys):
    use_plugin(monkeypatch, example_hello=Hello())
    assert main(["example_hello", "--name", "x"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "hello x debug=False", err
    # the launcher adds --debug to a command that did not define it
    assert main(["example_hello", "--name", "y", "--debug"]) == 0
    assert capsys.readouterr().out.strip() == "hello y debug=True"
    # its arguments are its own: a missing required one is a one-line usage error
    assert main(["example_hello"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--name" in err, err


def test_the_command_is_listed_with_its_description(monkeypatch, capsys):
    use_plugin(monkeypatch, example_hello=Hello())
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "example_hello" in out and "the example_hello test command" in out


def test_key_value_options_are_not_taken_for_overrides(monkeypatch, capsys):
    use_plugin(monkeypatch, example_kv=Settings(("--set",)))
    assert main(["example_kv", "--set", "a=b", "c=d"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "set=['a=b'] overrides=['c=d']", err


def test_without_the_declaration_the_value_is_taken_for_an_override(monkeypatch, capsys):
    use_plugin(monkeypatch, example_plain=Settings(()))
    # `a=b` is pulled out as an override, so --set has no value
    assert main(["example_plain", "--set", "a=b", "c=d"]) == 2
    err = capsys.readouterr().err
    assert "--set" in err and "expected one argument" in err, err


def test_a_command_named_like_a_launcher_command_is_a_broken_plugin(monkeypatch, capsys):
    reg = use_plugin(monkeypatch, run=Hello())
    assert "run" not in reg.names("command")
    assert main(["recipes"]) == 2  # any other invocation names the broken plugin and the switch
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "command 'run'" in err and "clashes with the launcher's own sub-command" in err
    assert "INSTRUCTRL_DISABLE_PLUGINS=" in err
    assert main(["plugins"]) == 0  # still lists everything, and the broken plugin
    assert "broken plugins" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["plugins", "recipes"])
def test_every_launcher_name_is_reserved(monkeypatch, capsys, name):
    use_plugin(monkeypatch, **{name: Hello()})
    assert main(["run", "ppo", "--dry-run"]) == 2
    assert f"command '{name}'" in capsys.readouterr().err


def test_a_command_gets_a_parser_of_its_own(monkeypatch):
    seen = []

    class Probe(Hello):
        def add_arguments(self, parser):
            seen.append(parser)
            super().add_arguments(parser)

    use_plugin(monkeypatch, example_probe=Probe())
    assert main(["example_probe", "--name", "z"]) == 0
    assert len(seen) == 1 and isinstance(seen[0], argparse.ArgumentParser)
    assert seen[0].prog.endswith("example_probe")
