"""Start-up steps of handler.py that need no running ComfyUI: model aliases adopted from the
lists ComfyUI reports (a volume laid out with the original Wan2.1_VAE.pth still works)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from xicon_dance.settings import Settings
from xicon_dance.workflow import Workflow

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = json.loads((ROOT / "tests" / "fixtures" / "object_info.json").read_text())


def load_handler() -> Any:
    spec = importlib.util.spec_from_file_location("handler_under_test", ROOT / "handler.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["handler_under_test"] = module
    spec.loader.exec_module(module)
    return module


class ListingComfy:
    """Answers ``object_info(class)`` from the live fixture, with the VAE folder listing ``vae``."""

    def __init__(self, vae: list[str]) -> None:
        self.vae = vae

    async def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        info = json.loads(json.dumps({node_class: FIXTURE[node_class]}))
        if node_class == "WanVideoVAELoader":
            info[node_class]["input"]["required"]["model_name"][0] = self.vae
        return info


class FakeWorker:
    def __init__(self, vae: list[str]) -> None:
        self.settings = Settings.from_env({})
        self.workflow = Workflow.load(ROOT / "XiCON_Dance_SCAIL_vFinal.json")
        self.comfy = ListingComfy(vae)


@pytest.mark.parametrize(
    ("listed", "expected"),
    [
        (["Wan2_1_VAE_bf16.safetensors"], "Wan2_1_VAE_bf16.safetensors"),
        (["Wan2.1_VAE.pth", "Wan2_1_VAE_bf16.safetensors"], "Wan2_1_VAE_bf16.safetensors"),
        (["Wan2.1_VAE.pth"], "Wan2.1_VAE.pth"),
        ([], "Wan2_1_VAE_bf16.safetensors"),  # neither: validation will name the missing file
    ],
)
async def test_seed_vae_name_is_adopted_only_when_needed(listed: list[str], expected: str) -> None:
    handler = load_handler()
    worker = FakeWorker(listed)
    await handler.adopt_model_aliases(worker)
    assert worker.workflow.template["38"]["inputs"]["model_name"] == expected


def test_interrupt_grace_reaches_the_client() -> None:
    handler = load_handler()
    settings = Settings.from_env(
        {
            "COMFY_INTERRUPT_GRACE_S": "7",
            "WORKFLOW_PATH": str(ROOT / "XiCON_Dance_SCAIL_vFinal.json"),
        }
    )
    assert handler.build_worker(settings).comfy.interrupt_grace_s == 7.0
