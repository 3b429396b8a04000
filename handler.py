"""RunPod serverless entry point: a thin async handler around ``xicon_dance.job.Worker``.

Start-up, in order, before ``runpod.serverless.start`` takes jobs:
1. the command line is read first with the SDK's own options (its parser is the parent of
   ``arguments``), so ``--help`` answers at once with the worker's modes, the settings that
   matter locally and the exit codes above the SDK's options, and a ``--test_input`` that is
   not JSON is refused (exit 2) before anything waits;
2. settings from the environment (``ConfigError`` -> clear message, exit code 2);
3. logging with the job id on every line and the bucket keys registered for redaction;
   then the job the SDK will run in a one-job local mode (``--test_input``, else
   ``./test_input.json``) is validated (``parse_job_input``): an invalid input ends the run
   with the field and the reason (exit 1, as a failed job) before anything waits for ComfyUI;
4. the workflow template is loaded and its role table checked (a mismatch names the node; exit 2);
   ComfyUI's folder must exist here (``COMFY_DIR`` or ``COMFY_INPUT_DIR``; exit 2, nothing is
   created);
5. ComfyUI must answer within the start-up timeout (``COMFY_STARTUP_TIMEOUT_S``; unset: 900 s on
   RunPod, 30 s in a local run), its PID checked for liveness (exit 3);
6. the input folder the worker writes to must be the one ComfyUI reads (a probe file read back
   through ComfyUI's ``/view``; a mismatch names both folders; exit 2);
7. a model file that ComfyUI lists only under an alias of ``model_manifest.json`` (e.g. the
   original ``Wan2.1_VAE.pth``) is used under that name (``Workflow.adopt_model_aliases``).
Then the SDK runs jobs through ``handler`` (an async function, so that a cancelled or timed-out
job cancels its task and the ComfyUI client interrupts the prompt).

Local runs (see ``xicon_dance.local_run``): ``python handler.py`` (reads ``test_input.json``),
``python handler.py --test_input '{"input": …}'`` (one job, then exit: 0 done, 1 failed), and
``python handler.py --rp_serve_api`` (the SDK's local ``POST /runsync`` server). In a local run
every finished video is also saved to ``LOCAL_OUTPUT_DIR`` (default ``output/`` in the worker
folder, ``/worker/output`` in the image) with a one-line summary in the log, and progress
updates are logged at DEBUG instead of being sent to RunPod; the SDK logs at INFO unless
``RUNPOD_LOG_LEVEL`` says otherwise (its DEBUG default prints the whole result).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xicon_dance import media
from xicon_dance.clip import host_ram_warning
from xicon_dance.comfy import ComfyClient
from xicon_dance.errors import ConfigError, InputError, WorkerError
from xicon_dance.gpu_profile import GpuInfo
from xicon_dance.gpu_profile import choose as choose_gpu_profile
from xicon_dance.input_probe import check_input_folder
from xicon_dance.job import Worker
from xicon_dance.local_run import is_local_run, save_result
from xicon_dance.logs import job_context, setup_logging
from xicon_dance.model_download import load_manifest
from xicon_dance.schema import parse_job_input
from xicon_dance.settings import ENV_DOC, PACKAGE_ROOT, Settings, get_settings
from xicon_dance.workflow import Workflow

log = logging.getLogger("xicon_dance.handler")

_worker: Worker | None = None
_save_dir: Path | None = None  # local runs: where finished videos are written
MANIFEST = PACKAGE_ROOT / "model_manifest.json"
# /history is polled next to the websocket; 0.5 s keeps a lost completion notice under 1 s.
HISTORY_POLL_S = 0.5


def build_worker(settings: Settings) -> Worker:
    """Load and check the workflow; build the worker (no network yet)."""
    workflow = Workflow.load(settings.workflow_path, settings)
    comfy = ComfyClient(
        settings.comfy_url,
        pid_file=settings.comfy_pid_file,
        poll_interval_s=HISTORY_POLL_S,
        interrupt_grace_s=settings.comfy_interrupt_grace_s,
    )
    return Worker(settings, workflow, comfy)


async def wait_for_comfy(worker: Worker, timeout_s: float) -> None:
    """Block until ComfyUI answers, then adopt model aliases; the start-up session is closed
    again (jobs run in the SDK's own event loop and open their own)."""
    try:
        await worker.comfy.wait_ready(timeout_s)
        await adopt_model_aliases(worker)
        stats = await worker.comfy.system_stats()
        worker.gpu_profile = choose_gpu_profile(GpuInfo.from_system_stats(stats), worker.settings)
        log.info("%s", worker.gpu_profile.summary())
        if (warning := host_ram_warning(stats, worker.settings)) is not None:
            log.warning("%s", warning)
    finally:
        await worker.comfy.close()


async def adopt_model_aliases(worker: Worker) -> None:
    """Point the graph at an alias file where ComfyUI lists the alias but not the canonical name."""
    aliases = {e.filename: e.aliases for e in load_manifest(MANIFEST) if e.aliases}
    listed: dict[tuple[str, str], list[str]] = {}
    for _node, class_type, name in worker.workflow.model_inputs():
        spec = (await worker.comfy.object_info(class_type)).get(class_type, {}).get("input", {})
        options = {**spec.get("required", {}), **spec.get("optional", {})}.get(name)
        if options and isinstance(options[0], list):
            listed[(class_type, name)] = options[0]
    for where, alias in worker.workflow.adopt_model_aliases(listed, aliases).items():
        log.warning("model file for %s not found under its usual name; using %s", where, alias)


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    """RunPod handler: one job in, the result or the failure response out."""
    if _worker is None:  # imported without start-up (e.g. by a test): fail clearly
        raise RuntimeError("handler called before start-up; run this file as a script")
    job_id = str(job.get("id") or "local")
    try:
        result = await _worker.run(job)
        if _save_dir is not None:
            with job_context(job_id):
                await save_result(result, _save_dir, job_id)
        return result
    finally:
        if job_id == "local_test":  # --test_input: the SDK exits right after this job
            await _worker.comfy.close()


HELP = """\
The XiCON Dance worker: a reference image (a character) and a driving dance video in, an MP4 of
that character dancing out. It drives a ComfyUI server at COMFY_HOST (the image starts one;
without a GPU the ComfyUI double of the tests stands in: README, "Try it without a GPU").

modes:
  python handler.py                     one job from ./test_input.json, then exit
  python handler.py --test_input JSON   one job given here ('{"input": {...}}'), then exit
  python handler.py --rp_serve_api      the SDK's local HTTP API (POST /run, /runsync) until ^C
  (on RunPod)                           the platform's job queue (RUNPOD_WEBHOOK_GET_JOB set)
A local run saves each result video to LOCAL_OUTPUT_DIR and logs its path; the job input is
checked before the worker waits for ComfyUI. The options below are the RunPod SDK's."""

# The settings a local run most often needs (all of them: docs/settings.md).
HELP_SETTINGS = (
    "COMFY_HOST",
    "COMFY_DIR",
    "COMFY_STARTUP_TIMEOUT_S",
    "LOCAL_OUTPUT_DIR",
    "JOB_TIMEOUT_S",
    "BUCKET_ENDPOINT_URL",
    "LOG_LEVEL",
)
EXIT_CODES = (
    ("0", "the job finished (one-job modes)"),
    ("1", "the job failed, or its input is invalid (the field and the reason are logged)"),
    ("2", "bad arguments, a configuration error, or ComfyUI reads another input folder"),
    ("3", "ComfyUI did not answer within the start-up timeout"),
)


def help_epilog() -> str:
    """Settings and exit codes for ``--help``; defaults and meanings come from ``ENV_DOC``."""
    lines = ["settings (environment; every one: docs/settings.md):"]
    for name in HELP_SETTINGS:
        default, meaning = ENV_DOC[name]
        head = f"  {name}={default}" if default else f"  {name} (unset)"
        text = f"{head}  {meaning.replace('`', '')}"  # ENV_DOC meanings are markdown
        lines += textwrap.wrap(text, 96, subsequent_indent="      ", break_on_hyphens=False)
    lines.append(
        "  RUNPOD_LOG_LEVEL=INFO  the SDK's log level in a local run (DEBUG prints results)"
    )
    lines += ["", "exit codes:"] + [f"  {code}  {meaning}" for code, meaning in EXIT_CODES]
    return "\n".join(lines)


def arguments() -> argparse.ArgumentParser:
    """The worker's command line: the SDK's parser as parent (its options, parsed its way)."""
    from runpod.serverless import parser as sdk_parser

    return argparse.ArgumentParser(
        prog="python handler.py",
        description=HELP,
        epilog=help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[sdk_parser],  # brings the SDK's options and its -h/--help
        add_help=False,
    )


def sdk_arguments(argv: Sequence[str]) -> dict[str, Any]:
    """The RunPod SDK's arguments (``--help`` prints ours and the SDK's options, then exits)."""
    args, _unknown = arguments().parse_known_args(list(argv))
    if args.test_input:
        try:
            json.loads(args.test_input)
        except json.JSONDecodeError as exc:
            logging.basicConfig()
            log.critical("--test_input is not valid JSON: %s", exc)
            sys.exit(2)
    return vars(args)


def local_job(args: Mapping[str, Any], env: Mapping[str, str]) -> Any:
    """The job the SDK will run in a one-job mode (``rp_local.run_local``: ``--test_input``,
    else ``./test_input.json``), or ``None`` when it serves jobs instead. Exits 1 when there is
    no job to read, as the SDK would after the start-up wait."""
    if args.get("rp_serve_api") or env.get("RUNPOD_REALTIME_PORT"):
        return None
    if args.get("test_input"):
        return json.loads(args["test_input"])
    if env.get("RUNPOD_WEBHOOK_GET_JOB"):
        return None  # the platform's job queue
    path = Path("test_input.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        reason = "is missing; run from the worker folder or give --test_input '{\"input\": {...}}'"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = f"cannot be read as JSON: {exc}"
    logging.basicConfig()
    log.critical("%s %s", path.resolve(), reason)
    sys.exit(1)


def check_local_job(job: Any, settings: Settings) -> None:
    """Validate a one-job run's input before anything waits (exit 1, as a failed job)."""
    if not isinstance(job, dict) or job.get("input") is None:
        log.critical('the job has no "input": give {"input": {"image_url": ...}}; nothing was run')
        sys.exit(1)
    try:
        parse_job_input(job["input"], settings)
    except InputError as exc:
        log.critical("the job input is invalid, nothing was run: %s (%s)", exc.message, exc.code)
        sys.exit(1)


def missing_comfy_folder(settings: Settings) -> str:
    """Why ComfyUI's folder cannot be on this machine ('' when it can): neither ``COMFY_DIR``
    nor the input folder exists. ComfyUI creates its input folder when it starts, so the
    worker's settings are wrong; said before the wait, and nothing is created (the input-folder
    check would otherwise make ``/comfyui/input`` on a machine without ComfyUI there)."""
    comfy_dir, input_dir = Path(settings.comfy_dir), Path(settings.comfy_input_dir)
    if input_dir.is_dir() or comfy_dir.is_dir():
        return ""
    return (
        f"ComfyUI's folder {comfy_dir} (COMFY_DIR) does not exist on this machine, nor does the "
        f"input folder {input_dir} (COMFY_INPUT_DIR). Set COMFY_DIR to the folder ComfyUI runs "
        "from (for the ComfyUI double of the tests: its --root)."
    )


def startup(local: bool, job: Any = None) -> Worker:
    """Everything that must succeed before the job loop starts; exits with a message if not.
    ``job``: the one job a local mode will run (checked first), ``None`` when serving."""
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
    if job is not None:
        check_local_job(job, settings)
    try:
        worker = build_worker(settings)
    except ConfigError as exc:
        log.critical("configuration error, the worker stops: %s", exc.message)
        sys.exit(2)
    try:
        media.check_default_video(settings)
    except ConfigError as exc:
        log.warning("%s", exc.message)
    missing = missing_comfy_folder(settings)
    if missing:
        log.critical("configuration error, the worker stops: %s", missing)
        sys.exit(2)
    timeout_s = settings.startup_timeout_s(local)
    log.info("waiting up to %.0fs for ComfyUI at %s", timeout_s, settings.comfy_url)
    try:
        asyncio.run(wait_for_comfy(worker, timeout_s))
    except WorkerError as exc:
        log.critical("ComfyUI is not available, the worker stops: %s", exc.message)
        if local:
            log.critical(
                "Start ComfyUI first (COMFY_HOST=%s), or wait longer with "
                "COMFY_STARTUP_TIMEOUT_S (a local run waits %.0f s by default).",
                settings.comfy_host,
                timeout_s,
            )
        sys.exit(3)
    try:
        asyncio.run(check_input_folder(settings))
    except ConfigError as exc:
        log.critical("configuration error, the worker stops: %s", exc.message)
        sys.exit(2)
    log.info("ComfyUI is ready; starting the RunPod job loop")
    return worker


def main(argv: Sequence[str] | None = None) -> None:
    global _worker, _save_dir
    argv = sys.argv[1:] if argv is None else list(argv)
    # Our log handler first: importing the SDK runs logging.basicConfig (runpod's rp_upload),
    # which would otherwise add a second root handler and print every line twice.
    setup_logging()
    if is_local_run("--rp_serve_api" in argv, os.environ):
        # The SDK's own default is DEBUG, which prints the whole result (the video as base64).
        os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
    args = sdk_arguments(argv)
    local = is_local_run(bool(args.get("rp_serve_api")), os.environ)
    _worker = startup(local, local_job(args, os.environ))
    if local and _worker.settings.local_output_dir is not None:
        _save_dir = _worker.settings.local_output_dir
        log.info("local run: result videos are saved to %s (LOCAL_OUTPUT_DIR)", _save_dir)
    from xicon_dance import sdk

    sdk.start(handler)  # refresh_worker ends the job loop; SDK prints are redacted


if __name__ == "__main__":
    main()
