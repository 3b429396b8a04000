"""RunPod serverless entry point: a thin async handler around ``xicon_dance.job.Worker``.

Start-up, in order, before ``runpod.serverless.start`` takes jobs:
1. settings from the environment (``ConfigError`` -> clear message, exit code 2);
2. logging with the job id on every line and the bucket keys registered for redaction;
3. the workflow template is loaded and its role table checked (a mismatch names the node; exit 2);
4. ComfyUI must answer within COMFY_STARTUP_TIMEOUT_S, its PID checked for liveness (exit 3).
Then the SDK runs jobs through ``handler`` (an async function, so that a cancelled or timed-out
job cancels its task and the ComfyUI client interrupts the prompt).

Local modes (../shared/reference/runpod.md §3): ``python handler.py --test_input '{"input": …}'``
runs one job; ``python handler.py --rp_serve_api`` serves ``POST /runsync`` locally.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from xicon_dance import media
from xicon_dance.comfy import ComfyClient
from xicon_dance.errors import ConfigError, WorkerError
from xicon_dance.job import Worker
from xicon_dance.logs import setup_logging
from xicon_dance.settings import Settings, get_settings
from xicon_dance.workflow import Workflow

log = logging.getLogger("xicon_dance.handler")

_worker: Worker | None = None
# /history is polled next to the websocket; 0.5 s keeps a lost completion notice under 1 s.
HISTORY_POLL_S = 0.5


def build_worker(settings: Settings) -> Worker:
    """Load and check the workflow; build the worker (no network yet)."""
    workflow = Workflow.load(settings.workflow_path, settings)
    comfy = ComfyClient(
        settings.comfy_url, pid_file=settings.comfy_pid_file, poll_interval_s=HISTORY_POLL_S
    )
    return Worker(settings, workflow, comfy)


async def wait_for_comfy(worker: Worker, timeout_s: float) -> None:
    """Block until ComfyUI answers; the start-up session is closed again (jobs run in the SDK's
    own event loop and open their own)."""
    try:
        await worker.comfy.wait_ready(timeout_s)
    finally:
        await worker.comfy.close()


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    """RunPod handler: one job in, the result or the failure response out."""
    if _worker is None:  # imported without start-up (e.g. by a test): fail clearly
        raise RuntimeError("handler called before start-up; run this file as a script")
    try:
        return await _worker.run(job)
    finally:
        if job.get("id") == "local_test":  # --test_input: the SDK exits right after this job
            await _worker.comfy.close()


def startup() -> Worker:
    """Everything that must succeed before the job loop starts; exits with a message if not."""
    try:
        settings = get_settings()
    except ConfigError as exc:
        logging.basicConfig()
        log.critical("configuration error: %s", exc.message)
        sys.exit(2)
    setup_logging(
        settings.log_level,
        secrets=(settings.bucket_access_key_id, settings.bucket_secret_access_key),
    )
    try:
        worker = build_worker(settings)
    except ConfigError as exc:
        log.critical("configuration error, the worker stops: %s", exc.message)
        sys.exit(2)
    try:
        media.check_default_video(settings)
    except ConfigError as exc:
        log.warning("%s", exc.message)
    log.info(
        "waiting up to %.0fs for ComfyUI at %s",
        settings.comfy_startup_timeout_s,
        settings.comfy_url,
    )
    try:
        asyncio.run(wait_for_comfy(worker, settings.comfy_startup_timeout_s))
    except WorkerError as exc:
        log.critical("ComfyUI is not available, the worker stops: %s", exc.message)
        sys.exit(3)
    log.info("ComfyUI is ready; starting the RunPod job loop")
    return worker


def main() -> None:
    global _worker
    _worker = startup()
    from xicon_dance import sdk

    sdk.start(handler)  # refresh_worker ends the job loop; SDK prints are redacted


if __name__ == "__main__":
    main()
