"""Every ``python -m`` command's --help: a ``python -m`` usage line, every flag explained, each default shown once
(in words or as argparse prints it), no reStructuredText markup."""
import argparse
import importlib
import re
import sys

import pytest

COMMANDS = ["engine.train", "engine.eval", "engine.export", "engine.precompute", "engine.teacher", "engine.synthetic",
            "engine.ablate", "engine.store", "bench.report", "bench.profile_chunked", "bench.store_lookup",
            "bench.loader", "bench.accum_memory", "bench.distributed_memory"]


def _help(module: str, argv: list[str], monkeypatch, capsys) -> str:
    main = importlib.import_module(module).main
    monkeypatch.setattr(sys, "argv", [module, *argv])  # bench.distributed_memory reads sys.argv itself
    with pytest.raises(SystemExit) as stopped:
        main(argv) if main.__code__.co_argcount else main()
    assert stopped.value.code == 0
    return capsys.readouterr().out


def _parsers(module: str, monkeypatch) -> list[argparse.ArgumentParser]:
    """The parsers a command builds (its subcommands' included), caught as it parses --help."""
    built = []
    original = argparse.ArgumentParser.parse_args

    def spy(self, *args, **kwargs):
        built.append(self)
        built.extend(p for a in self._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    return built


@pytest.mark.parametrize("module", COMMANDS)
def test_help(module, monkeypatch, capsys):
    parsers = _parsers(module, monkeypatch)
    text = _help(module, ["--help"], monkeypatch, capsys)
    prog = "torchrun" if module == "bench.distributed_memory" else f"python -m {module}"
    assert text.startswith(f"usage: {prog}"), text.splitlines()[0]
    assert "``" not in text and ":func:" not in text
    assert not re.search(r"\(default: [^()]*(\([^()]*\))?[^()]*\)\s*\(default", text), "a default shown twice"
    for parser in parsers:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{module}: {action.dest} has no help"
            shown = formatter._get_help_string(action)
            if action.option_strings and not action.required and not isinstance(action, argparse._StoreFalseAction):
                assert "default" in shown, f"{module}: {action.dest} does not show its default"
    for sub in (p.prog.split()[-1] for p in parsers[1:]):
        assert "``" not in _help(module, [sub, "--help"], monkeypatch, capsys)
