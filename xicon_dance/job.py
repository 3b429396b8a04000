"""Per-job orchestration.

Contract:
- ``Worker(settings, workflow, comfy)`` built once at start; ``await worker.run(job: dict) -> dict``
  runs one RunPod job: schema -> media -> workflow -> comfy -> delivery, reports progress, always
  cleans the job folder, and returns either the success result
  ``{"video": {url|base64, filename, content_type, bytes, width, height, frames, fps, duration_s,
  has_audio}, "clip": {duration_s, frames}, "rendered": {frames, duration_s, truncated}, "seed",
  "prompt_id", "timings": {download, prepare, queue, inference, upload, total}}``
  or ``WorkerError.to_response()``. It re-raises ``asyncio.CancelledError`` after interrupting
  ComfyUI (the ComfyUI client sends the interrupt).

Details:
- Every ``WorkerError`` becomes its ``to_response()``; ``ComfyUnavailable`` carries
  ``refresh_worker: True`` (the SDK strips the key and replaces the worker). Any other exception
  is logged with its traceback and answered with ``internal_error_response()``.
- ``seed`` in the result is the seed actually used (a random one for ``-1``).
- ``JOB_TIMEOUT_S`` bounds the whole job up to the end of inference: the input downloads run
  under the job's deadline (``JobTimeout`` when they overrun it) and ComfyUI gets what is left.
- The driving clip (``xicon_dance.clip``): the frames to render are planned from the probe (the
  whole clip up to ``MAX_SECONDS``, shortened by ``max_seconds``/``max_frames``), a job over
  ``MAX_CLIP_MEMORY_GB`` is refused, and the clip is transcoded into the job folder at the
  generation size, the job's fps and the rendered length (audio trimmed) before ComfyUI runs;
  node 130 loads that file as it is. ``clip`` in the answer is the whole driving clip (its
  frames at the job's fps), ``rendered`` what was rendered (``truncated``: a cap cut the clip).
  The transcode runs under the job's deadline like the downloads.
- Timings (seconds): ``download`` (inputs fetched and checked), ``prepare`` (the driving clip
  transcoded), ``queue`` and ``inference``
  (ComfyUI's queue wait and execution), ``upload`` (output located, audio added, probed and
  delivered), ``total`` (the whole ``run``).
- The result is node 139's silent video with the transcoded clip's audio (when the job keeps
  audio and the clip has some), both copied by ``remux.finish`` into the job folder; the graph
  has no audio link (``workflow``).
- The result video is probed (``media.probe_video``) for its real width, height, frames, fps,
  duration and audio; an unreadable output is a ``ComfyError`` (``comfyui_output_invalid``).
- Output files: read from ComfyUI's output folder (``<COMFY_DIR>/output``, or ``temp`` for
  ``type: temp``) when that folder is on this machine, else streamed from ``/view`` into the job
  folder. After delivery, succeeded or not, every file carrying this job's unique
  ``filename_prefix`` is deleted from the output folder: the caller has the bucket copy or the
  base64, a failed delivery has already failed the job loudly, and a long-lived worker must not
  fill its disk with results. ComfyUI's interrupt is cooperative, so a job that ended without
  delivering (timeout, cancel, failure) may get its file written after that sweep: the prefixes
  of the last ``UNFINISHED_KEPT`` such jobs are swept again after every later job. The sweep
  walks the output tree in a worker thread, never on the event loop.
- ComfyUI history: after each job, succeeded or not, the job's ``/history`` entry is deleted
  (ComfyUI keeps up to 10,000, each holding the whole graph); the ids of prompts that may store
  their entry after the job ended (failure, timeout, cancel) are deleted again after each of the
  next ``UNFINISHED_KEPT`` jobs.
- Progress: ``downloading`` -> ``queued`` -> ComfyUI stages/sampler steps (and windows, from the
  clip's length and the graph's context options: ``reporter.plan``); the reporter is closed
  (last update awaited, its connection closed) as soon as inference ends, before delivery (see
  ``progress``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import clip, media, remux, transcode
from .comfy import ComfyClient, OutputFile, RunResult, output_files
from .delivery import deliver
from .errors import ComfyError, InputError, JobTimeout, WorkerError, internal_error_response
from .gpu_profile import GpuProfile
from .gpu_profile import choose as choose_gpu_profile
from .jobdir import JobFolder
from .logs import job_context
from .progress import ProgressReporter
from .schema import JobInput, parse_job_input
from .settings import Settings
from .workflow import PatchParams, Workflow, unique_prefix

log = logging.getLogger(__name__)

UNFINISHED_KEPT = 16  # failed/cancelled jobs whose late files and history are removed later
ReporterFactory = Callable[[dict[str, Any], float], ProgressReporter]
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov")


class Worker:
    """One per process; ``run`` handles one job at a time (RunPod's default concurrency)."""

    def __init__(
        self,
        settings: Settings,
        workflow: Workflow,
        comfy: ComfyClient,
        *,
        reporter_factory: ReporterFactory | None = None,
    ) -> None:
        self.settings = settings
        self.workflow = workflow
        self.comfy = comfy
        self._reporter_factory = reporter_factory or ProgressReporter
        # One websocket client id per job (see ``_client_id``).
        self.client_id = uuid.uuid4().hex
        self._jobs = 0
        # GPU-dependent graph settings; start-up replaces this with the profile of the GPU
        # ComfyUI reports (``handler.wait_for_comfy``).
        self.gpu_profile: GpuProfile = choose_gpu_profile(None, settings)
        # Prefixes of jobs that ended without delivering: ComfyUI may still write their files.
        self._unfinished: deque[str] = deque(maxlen=UNFINISHED_KEPT)
        # Prompts of jobs that ended before their prompt did: ComfyUI may store history later.
        self._unfinished_prompts: deque[str] = deque(maxlen=UNFINISHED_KEPT)

    async def run(self, job: dict[str, Any]) -> dict[str, Any]:
        job_id = str(job.get("id") or "unknown") if isinstance(job, dict) else "unknown"
        with job_context(job_id):
            started = time.monotonic()
            try:
                result = await self._run(job_id, job, started)
            except asyncio.CancelledError:
                log.warning("job cancelled after %.2fs", time.monotonic() - started)
                raise
            except WorkerError as exc:
                log.warning("job failed (%s): %s", exc.code, exc.message)
                if exc.details:
                    log.warning("failure details: %s", exc.details)
                return exc.to_response()
            except Exception:
                log.exception("job failed with an unexpected error")
                return internal_error_response()
            log.info("job done in %.2fs: %s", result["timings"]["total"], result["timings"])
            return result

    async def _run(self, job_id: str, job: dict[str, Any], started: float) -> dict[str, Any]:
        params = parse_job_input(job.get("input"), self.settings)
        reporter = self._reporter_factory(job, self.settings.progress_interval_s)
        timings: dict[str, float] = {}
        prefix = unique_prefix(job_id)
        deadline = started + self.settings.job_timeout_s
        delivered = False
        prompt_id: str | None = None
        run: RunResult | None = None
        try:
            async with media.job_folder(self.settings, job_id) as folder:
                reporter.update("downloading")
                t0 = time.monotonic()
                image, video = await self._fetch_inputs(params, folder, deadline)
                timings["download"] = time.monotonic() - t0
                t0 = time.monotonic()
                plan, video = await self._prepare_clip(params, image, video, folder, deadline)
                timings["prepare"] = time.monotonic() - t0
                seed = params.resolve_seed()
                graph = self._graph(params, image, video, seed, prefix, plan.frames)
                reporter.plan(graph, video.frames, video.fps)
                reporter.update("queued")
                prompt_id = str(uuid.uuid4())  # canonical form: ComfyUI refuses any other
                log.info("submitting prompt %s (seed %d)", prompt_id, seed)
                t0 = time.monotonic()
                run = await self.comfy.run(
                    graph,
                    prompt_id=prompt_id,
                    client_id=self._client_id(),
                    timeout_s=max(0.0, deadline - time.monotonic()),
                    on_progress=reporter.on_comfy,
                )
                _comfy_timings(timings, run, time.monotonic() - t0)
                await reporter.close()
                t0 = time.monotonic()
                audio_from = video.path if params.keep_audio and video.has_audio else None
                video_out = await self._deliver(run, folder, job_id, params, audio_from)
                delivered = True
                timings["upload"] = time.monotonic() - t0
        finally:
            await asyncio.shield(reporter.close())  # idempotent: awaits a closing under way
            # a walk of the whole output tree: in a thread, the event loop keeps serving
            await asyncio.shield(asyncio.to_thread(self._remove_outputs, prefix, *self._unfinished))
            if not delivered:
                self._unfinished.append(prefix)
            await asyncio.shield(self._forget_prompt(prompt_id, finished=run is not None))
        timings["total"] = time.monotonic() - started
        return {
            "video": video_out,
            **clip.answer(plan),
            "seed": seed,
            "prompt_id": prompt_id,
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }

    async def _forget_prompt(self, prompt_id: str | None, *, finished: bool) -> None:
        """Delete this job's ComfyUI history entry, and those of earlier jobs that ended before
        their prompt did. The entry of a prompt whose result was read exists now; a prompt
        that failed, timed out or was cancelled may store its entry later (the error frame
        precedes the history; an interrupted prompt stops when it checks), so its id is kept
        and deleted again after each of the next ``UNFINISHED_KEPT`` jobs."""
        ids = [prompt_id] if prompt_id else []
        await self.comfy.delete_history([*ids, *self._unfinished_prompts])
        if prompt_id and not finished:
            self._unfinished_prompts.append(prompt_id)

    def _client_id(self) -> str:
        """A websocket client id of its own for each job. ComfyUI routes a prompt's frames to
        the socket registered under its client id, and a socket that closes unregisters
        whatever socket holds that id at that moment (server.py websocket_handler): with one id
        per job, a socket of an earlier job can never unregister this job's socket, and frames
        of an earlier, aborted prompt never reach it."""
        self._jobs += 1
        return f"{self.client_id}-{self._jobs}"

    async def _fetch_inputs(
        self, params: JobInput, folder: JobFolder, deadline: float
    ) -> tuple[media.ImageInfo, media.VideoInfo]:
        """The inputs, fetched within the job's deadline (a trickling server cannot hold the
        job past JOB_TIMEOUT_S: byte-level read timeouts alone do not bound a download). On
        the deadline the fetches are cancelled and their threads told to stop and joined
        (``JobFolder.run``) before ``JobTimeout`` is raised."""
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                return await _fetch_both(params, folder, self.settings)
        except TimeoutError:
            raise JobTimeout(
                f"The job ran past its limit of {self.settings.job_timeout_s:g} s while "
                "downloading the inputs."
            ) from None

    async def _prepare_clip(
        self,
        params: JobInput,
        image: media.ImageInfo,
        video: media.VideoInfo,
        folder: JobFolder,
        deadline: float,
    ) -> tuple[clip.ClipPlan, media.VideoInfo]:
        """Plan the rendered frames, check their memory, transcode the clip (see module doc)."""
        plan = clip.plan_clip(video, params, self.settings)
        width, height = params.resolve_size(image.width, image.height)
        clip.check_memory(plan, width, height, self.settings)
        log.info(
            "driving clip %.2fs (%d frames at %d fps): rendering %d frames%s",
            plan.clip_duration_s,
            plan.clip_frames,
            plan.fps,
            plan.frames,
            f" (cut by {plan.cap})" if plan.truncated else "",
        )
        dest = folder.path / "driving_job.mp4"
        work = functools.partial(
            transcode.transcode,
            video.path,
            dest,
            plan,
            width,
            height,
            audio=params.keep_audio and video.has_audio,
            field=clip.video_field(params),
            stop=folder.stop,  # set when this job is cancelled or times out: the thread gives up
        )
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                done = await folder.run(work)
        except TimeoutError:
            raise JobTimeout(
                f"The job ran past its limit of {self.settings.job_timeout_s:g} s while "
                "preparing the driving video."
            ) from None
        info = media.VideoInfo(
            dest,
            width,
            height,
            plan.fps,
            done.frames,
            plan.duration_s,
            done.has_audio,
            dest.stat().st_size,
        )
        return plan, info

    def _graph(
        self,
        params: JobInput,
        image: media.ImageInfo,
        video: media.VideoInfo,
        seed: int,
        prefix: str,
        frames: int,
    ) -> dict[str, Any]:
        width, height = params.resolve_size(image.width, image.height)
        return self.workflow.build(
            PatchParams(
                image_name=media.input_name(self.settings, image.path),
                video_name=media.input_name(self.settings, video.path),
                width=width,
                height=height,
                fps=params.fps,
                frame_load_cap=frames,
                steps=params.steps,
                cfg=params.cfg,
                seed=seed,
                prompt=params.prompt,
                negative_prompt=params.negative_prompt,
                filename_prefix=prefix,
                attention_mode=self.settings.attention_mode,
                pose_render_device=self.settings.pose_render_device,
                base_precision=self.gpu_profile.base_precision,
                context_overlap=params.context_overlap,
                torch_compile=self.gpu_profile.torch_compile,
                resident_transformer=self.gpu_profile.keeps_transformer(frames, width, height),
            )
        )

    async def _deliver(
        self,
        run: RunResult,
        folder: JobFolder,
        job_id: str,
        params: JobInput,
        audio_from: Path | None,
    ) -> dict[str, Any]:
        item = pick_video(output_files(run.outputs))
        produced = self._local_output(item) or await self.comfy.download(item, folder.path)
        path = folder.path / "result" / f"{Path(produced.name).stem}.mp4"  # remux writes MP4
        path.parent.mkdir(exist_ok=True)
        await folder.run(remux.finish, produced, audio_from, path)
        info = await folder.run(_probe_output, path)
        delivered = await deliver(path, job_id=job_id, mode=params.output, settings=self.settings)
        return {
            **delivered,
            "width": info.width,
            "height": info.height,
            "frames": info.frames,
            "fps": info.fps,
            "duration_s": round(info.duration_s, 3),
            "has_audio": info.has_audio,
        }

    def _output_root(self, kind: str) -> Path:
        return Path(self.settings.comfy_dir) / ("temp" if kind == "temp" else "output")

    def _local_output(self, item: OutputFile) -> Path | None:
        root = self._output_root(item.type).resolve()
        path = (root / item.subfolder / item.filename).resolve()
        if path.is_relative_to(root) and path.is_file():
            return path
        return None

    def _remove_outputs(self, *prefixes: str) -> None:
        for kind in ("output", "temp"):
            root = self._output_root(kind)
            if not root.is_dir():
                continue
            for path in (p for p in root.rglob("*") if p.name.startswith(prefixes)):
                try:
                    path.unlink()
                    log.debug("removed output file %s", path.name)
                except OSError as exc:
                    log.warning("could not remove output file %s: %s", path.name, exc)


async def _fetch_both(
    params: JobInput, folder: JobFolder, settings: Settings
) -> tuple[media.ImageInfo, media.VideoInfo]:
    """Fetch image and video concurrently; the first failure cancels the other (image first).
    A cancelled fetch ends only when its thread has (``JobFolder.run``), so once this returns
    or raises, nothing of either fetch is still running."""
    image_task = asyncio.create_task(media.fetch_image(params, folder, settings))
    video_task = asyncio.create_task(media.fetch_video(params, folder, settings))
    tasks = (image_task, video_task)
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return image_task.result(), video_task.result()


def pick_video(files: list[OutputFile]) -> OutputFile:
    """The result video: a video file from node 139 if present, else any video output."""
    videos = [f for f in files if Path(f.filename).suffix.lower() in VIDEO_SUFFIXES]
    if not videos:
        raise ComfyError(
            "ComfyUI finished but reported no output video (expected an MP4 from node 139, "
            "VHS_VideoCombine).",
            code="comfyui_output_missing",
        )
    from_combine = [f for f in videos if f.node == "139"]
    return (from_combine or videos)[-1]


def _probe_output(path: Path) -> media.VideoInfo:
    try:
        return media.probe_video(path, field="output")
    except InputError as exc:
        raise ComfyError(
            f"ComfyUI wrote an unreadable output video {path.name}: {exc.message}",
            code="comfyui_output_invalid",
        ) from None


def _comfy_timings(timings: dict[str, float], run: RunResult, wall_s: float) -> None:
    inference = run.execution_s if run.execution_s is not None else wall_s
    queue = run.queue_s if run.queue_s is not None else max(0.0, wall_s - inference)
    timings["queue"] = queue
    timings["inference"] = inference
