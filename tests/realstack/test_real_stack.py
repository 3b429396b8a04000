"""The worker against the real ComfyUI v0.33.0 and the pinned packs, on the CPU (see conftest.py).

Order matters inside this module (pytest keeps definition order): ComfyUI caches node outputs
between prompts, so the corrupt-model job runs before any prompt has loaded the VAE, and the
validation probe of the unpatched shipped graph (interrupted after its first node) runs last.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import av
import pytest

from tests.plugins.realstack import (
    GRAPH,
    Server,
    Stack,
    cpu_comfy,
    cpu_job,
    forget_cached_outputs,
    get,
    make_base,
)
from tests.realstack.object_info import FIXTURE, differences, fixture_from_live
from xicon_dance.comfy import ComfyClient, Progress
from xicon_dance.errors import ComfyError

JOB_TIMEOUT_S = 900


def runsync(server: Server, job_input: dict[str, Any]) -> dict[str, Any]:
    body = json.dumps({"input": job_input}).encode()
    req = urllib.request.Request(
        f"{server.api_url}/runsync", body, {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=JOB_TIMEOUT_S) as resp:
        return json.load(resp)


def small_job(media: tuple[Path, Path]) -> dict[str, Any]:
    return cpu_job(media, max_frames=9, steps=2, fps=24, seed=7)


def probe(data: bytes) -> dict[str, Any]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return {
            "frames": frames,
            "fps": float(stream.average_rate),
            "size": (stream.width, stream.height),
            "audio": bool(container.streams.audio),
        }


def test_onnx_detection_models_are_listed(real_worker: Server) -> None:
    info = json.loads(get(f"{real_worker.comfy_url}/object_info/OnnxDetectionModelLoader"))
    required = info["OnnxDetectionModelLoader"]["input"]["required"]
    assert "vitpose-l-wholebody.onnx" in required["vitpose_model"][0]
    assert "yolov10m.onnx" in required["yolo_model"][0]


def test_fixture_is_the_live_object_info(real_worker: Server, stack: Stack) -> None:
    """The committed fixture equals the live ``/object_info`` (whole node definitions, in order).
    ``XICON_WRITE_FIXTURE=1`` rewrites it from the live dump: the test then prints what changed
    against the committed one and checks that the written file reads back as the live dump."""
    live = fixture_from_live(json.loads(get(f"{real_worker.comfy_url}/object_info")), stack.record)
    committed = json.loads(FIXTURE.read_text(encoding="utf-8"))
    diff = differences(committed, live)
    if os.environ.get("XICON_WRITE_FIXTURE") == "1":
        FIXTURE.write_text(json.dumps(live, indent=1, ensure_ascii=False) + "\n", "utf-8")
        print(f"\nfixture rewritten; {len(diff)} difference(s) from the committed one:")
        print("\n".join(diff) or "(none)")
        written = json.loads(FIXTURE.read_text(encoding="utf-8"))
        assert differences(written, live) == [], "the written fixture does not read back as live"
        return
    assert not diff, "fixture differs from the live /object_info:\n" + "\n".join(diff[:40])


def test_corrupt_model_fails_clearly_then_the_next_job_succeeds(
    real_worker: Server, realstack_media: tuple[Path, Path]
) -> None:
    vae = real_worker.base / "models" / "vae" / "Wan2_1_VAE_bf16.safetensors"
    good = vae.read_bytes()
    # an earlier job of the session left node 38's output in ComfyUI's cache (same inputs)
    forget_cached_outputs(real_worker.comfy_url)
    vae.write_bytes(b"\x00garbage, not a safetensors file" * 64)
    try:
        failed = runsync(real_worker, small_job(realstack_media))
    finally:
        vae.write_bytes(good)
    assert failed["status"] == "FAILED", failed
    error = failed["error"] if isinstance(failed["error"], str) else json.dumps(failed["error"])
    assert "node 38 (WanVideoVAELoader)" in error, error

    started = time.monotonic()
    done = runsync(real_worker, small_job(realstack_media))
    elapsed = time.monotonic() - started
    assert done["status"] == "COMPLETED", done
    video = done["output"]["video"]
    facts = probe(base64.b64decode(video["base64"]))
    assert facts["frames"] == 9 and facts["size"] == (256, 256), facts
    assert facts["fps"] == pytest.approx(24.0), facts
    assert facts["audio"] is True, facts
    assert (video["frames"], video["width"], video["height"]) == (9, 256, 256)
    print(f"real CPU job: {facts}, {len(base64.b64decode(video['base64']))} bytes, {elapsed:.1f} s")


async def test_shipped_graph_passes_real_validation(real_worker: Server) -> None:
    """The unpatched shipped graph is accepted by the real /prompt; stopped after its first node."""
    graph = json.loads(GRAPH.read_text(encoding="utf-8"))
    started = asyncio.Event()

    def on_progress(progress: Progress) -> None:
        started.set()

    async with ComfyClient(real_worker.comfy_url) as client:
        task = asyncio.create_task(
            client.run(
                graph,
                prompt_id=str(uuid.uuid4()),
                client_id=uuid.uuid4().hex,
                timeout_s=JOB_TIMEOUT_S,
                on_progress=on_progress,
            )
        )
        waiter = asyncio.create_task(started.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():  # finished or refused before any node ran
            waiter.cancel()
            task.result()  # raises ComfyError(comfyui_validation) when refused
            pytest.fail("the full-size graph cannot finish before its first node starts")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle(client)


async def wait_idle(client: ComfyClient, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _status, queue = await client._json("GET", "/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            return
        await asyncio.sleep(0.5)
    pytest.fail("ComfyUI did not become idle after the interrupt")


async def test_without_the_onnx_fix_the_shipped_graph_is_refused(
    stack: Stack, realstack_base: Path, tmp_path: Path
) -> None:
    """Proof that the project's extension is what makes validation pass: the same stack without it
    refuses node 364. When upstream fixes the folder, this test fails: drop the extension then."""
    packs = {p.name for p in (realstack_base / "custom_nodes").iterdir()}
    base = make_base(stack, tmp_path / "comfy", packs=packs - {"xicon_detection_onnx"})
    (base / "input").rmdir()
    for sub in ("models", "input"):
        (base / sub).symlink_to(realstack_base / sub)
    with cpu_comfy(stack, base, tmp_path / "comfyui.log") as (url, _):
        async with ComfyClient(url) as client:
            with pytest.raises(ComfyError) as refused:
                await client.run(
                    json.loads(GRAPH.read_text(encoding="utf-8")),
                    prompt_id=str(uuid.uuid4()),
                    client_id=uuid.uuid4().hex,
                    timeout_s=120,
                )
    assert refused.value.code == "comfyui_validation"
    assert "364" in refused.value.message and "OnnxDetectionModelLoader" in refused.value.message
