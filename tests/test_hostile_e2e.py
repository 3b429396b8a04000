"""The hostile-input corpus through the whole worker (Worker.run against the ComfyUI double).

Each case must come back as the one failure shape with the expected field and code, leave no
job files behind, reach ComfyUI never, and a good job must succeed right after it through the
same ComfyUI client and server (with the normal settings: some cases shrink the byte caps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.comfy_double import ComfyDouble
from tests.hostile_cases import CASES, HostileCase, HostileEnv, case_settings, good_job_input
from tests.plugins.http_server import HttpServer
from xicon_dance.comfy import ComfyClient
from xicon_dance.job import Worker
from xicon_dance.progress import ProgressReporter
from xicon_dance.settings import PACKAGE_ROOT, Settings
from xicon_dance.workflow import Workflow

GRAPH = PACKAGE_ROOT / "XiCON_Dance_SCAIL_vFinal.json"


def _quiet(job: dict, interval: float) -> ProgressReporter:
    return ProgressReporter(job, interval, sender=lambda j, p: None)


@pytest.fixture
async def comfy(comfy_double: ComfyDouble) -> AsyncIterator[ComfyClient]:
    client = ComfyClient(comfy_double.url, poll_interval_s=0.2, unreachable_grace_s=0.5)
    yield client
    await client.close()


def test_corpus_is_big_enough() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_hostile_case_then_good_job(
    case: HostileCase,
    comfy_double: ComfyDouble,
    comfy: ComfyClient,
    http_server: HttpServer,
    tmp_path: Path,
) -> None:
    env = HostileEnv(http_server, tmp_path / "hostile")
    base = Settings.from_env(
        {
            "COMFY_DIR": str(comfy_double.root),
            "WORKFLOW_PATH": str(GRAPH),
            "PROGRESS_INTERVAL_S": "0",
            "JOB_TIMEOUT_S": "30",
        }
    )
    on_volume = dataclasses.replace(base, volume_root=env.volume)
    settings = dataclasses.replace(case_settings(case, on_volume), default_video=env.default_video)
    worker = Worker(settings, Workflow.load(GRAPH), comfy, reporter_factory=_quiet)
    submitted_before = len(comfy_double.prompts)

    result = await worker.run({"id": f"hostile-{case.id}", "input": case.make_input(env)})

    assert set(result) >= {"error", "code", "field"}, result
    assert (result["field"], result["code"]) == (case.field, case.code), result["error"]
    assert isinstance(result["error"], str) and result["error"].endswith(".")
    assert case.field in result["error"] or case.field == "input"
    assert "Traceback" not in result["error"] and "refresh_worker" not in result
    assert len(comfy_double.prompts) == submitted_before  # never reached ComfyUI
    assert not any((comfy_double.input_dir / "jobs").glob("*"))

    good = dict(good_job_input(env), width=256, height=256)
    normal = Worker(base, Workflow.load(GRAPH), comfy, reporter_factory=_quiet)
    ok = await normal.run({"id": f"good-after-{case.id}", "input": good})
    assert "error" not in ok, ok
    assert ok["video"]["frames"] == 9 and ok["video"]["bytes"] > 0
