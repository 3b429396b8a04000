"""The README and docs/ against the code: links that resolve inside the repository, the module
layout, every input field and every error code the worker can return."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from xicon_dance.errors import ComfyError
from xicon_dance.job import _probe_output
from xicon_dance.schema import INPUT_ERROR_CODES, JobInput

ROOT = Path(__file__).resolve().parent.parent
API_DOC = ROOT / "docs" / "api.md"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
# Codes that never reach a job's answer: a ConfigError stops the worker at start (exit 2), and
# every DeliveryError is raised with a code of its own.
NOT_RETURNED = {"config_error", "delivery_failed"}
CODE = re.compile(r"""\bcode\s*=\s*"([a-z0-9_]+)"|"code":\s*"([a-z0-9_]+)\"""")


def _section(title: str) -> str:
    text = API_DOC.read_text(encoding="utf-8")
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def documented_codes() -> set[str]:
    return set(re.findall(r"^\| `([a-z0-9_]+)` \|", _section("Errors"), re.MULTILINE))


def source_codes() -> set[str]:
    """Codes the worker's modules raise (``code="…"``, ``"code": "…"``, class defaults)."""
    found: set[str] = set(INPUT_ERROR_CODES)
    package = ROOT / "xicon_dance"
    for path in package.rglob("*.py"):
        if path.relative_to(package).parts[0] in {"client", "__main__.py"}:  # the caller's side
            continue
        for match in CODE.finditer(path.read_text(encoding="utf-8")):
            found.add(match.group(1) or match.group(2))
    return found - NOT_RETURNED


def test_error_table_lists_exactly_the_codes_the_worker_returns() -> None:
    documented, returned = documented_codes(), source_codes()
    assert documented - returned == set(), "documented but never raised"
    assert returned - documented == set(), "raised but not in docs/api.md"


def test_input_table_names_every_job_field() -> None:
    table = _section("Input")
    for name in JobInput.model_fields:
        assert f"`{name}`" in table, name


def test_unreadable_comfyui_output_is_comfyui_output_invalid(tmp_path: Path) -> None:
    broken = tmp_path / "xicon_dance_00001.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 100)
    with pytest.raises(ComfyError) as err:
        _probe_output(broken)
    assert err.value.code == "comfyui_output_invalid"
    assert broken.name in err.value.message


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_resolve_inside_the_repository(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    # no folder of a development machine (spelled in two parts so this file holds none either)
    machine_folder = "/".join(("", "work", ""))
    assert "../shared" not in text and machine_folder not in text
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        name, _, anchor = target.partition("#")
        path = (doc.parent / name).resolve() if name else doc
        assert path.is_relative_to(ROOT), f"{doc.name}: {target} points outside the repository"
        assert path.exists(), f"{doc.name}: {target} does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{doc.name}: no heading for #{anchor} in {path.name}"


def test_readme_stays_short() -> None:
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


def test_development_doc_lists_every_module() -> None:
    layout = (ROOT / "docs" / "development.md").read_text(encoding="utf-8")
    layout = layout.split("## Layout", 1)[1].split("\n## ", 1)[0]
    for module in sorted((ROOT / "xicon_dance").glob("*.py")):
        if module.stem != "__init__":
            assert f"`{module.stem}`" in layout, f"{module.name} is missing from the layout"
    for package in sorted((ROOT / "xicon_dance").glob("*/__init__.py")):
        name = package.parent.name
        assert f"`{name}/`" in layout, f"the package {name}/ is missing from the layout"
