"""docs/settings.md is generated from ``ENV_DOC`` (scripts/settings_doc.py) and stays so."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from xicon_dance.settings import ENV_DOC, ENV_DOC_SECTIONS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "settings_doc.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("settings_doc", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_settings_doc_is_what_the_script_generates() -> None:
    script = load_script()
    committed = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert script.differences() == "", "docs/settings.md is stale: run " + script.COMMAND
    assert committed == script.render()


def test_every_setting_is_in_one_section_of_the_doc() -> None:
    placed = [name for names in ENV_DOC_SECTIONS.values() for name in names]
    assert len(placed) == len(set(placed)), "a variable is listed in two sections"
    doc = load_script().render()
    for name in ENV_DOC:
        assert doc.count(f"| `{name}` |") == 1, name


def test_a_new_setting_without_a_section_is_still_documented() -> None:
    script = load_script()
    doc = {**ENV_DOC, "NEW_SETTING_S": ("5", "a | b")}
    text = script.render(doc, ENV_DOC_SECTIONS)
    other = text.split("## Other", 1)[1]
    assert "| `NEW_SETTING_S` | `5` | a \\| b |" in other  # a pipe cannot break the table
    with pytest.raises(ValueError, match="NO_SUCH"):
        script.render(ENV_DOC, {**ENV_DOC_SECTIONS, "X": ("NO_SUCH",)})


def test_check_fails_on_a_stale_doc_and_write_repairs_it(tmp_path: Path) -> None:
    stale = tmp_path / "settings.md"
    committed = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    stale.write_text(committed.replace("| `JOB_TIMEOUT_S` | `3600` |", "| `JOB_TIMEOUT_S` | `1` |"))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, str(SCRIPT), *args, "--path", str(stale)]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)

    checked = run("--check")
    assert checked.returncode == 1
    assert "+| `JOB_TIMEOUT_S` | `3600` |" in checked.stderr  # the diff shows what changes
    assert "run `python scripts/settings_doc.py --write`" in checked.stderr
    assert run("--write").returncode == 0
    assert run("--check").returncode == 0 and stale.read_text(encoding="utf-8") == committed
