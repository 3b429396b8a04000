"""The ComfyUI double pins the protocol of ../shared/reference/comfyui-protocol.md.

Raw HTTP and websocket calls (no worker code) against the in-process double.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest

from tests.comfy_double import ComfyDouble, topological_order
from tests.comfy_double.graphs import job_graph

PER_PROMPT = {
    "execution_start",
    "execution_cached",
    "executing",
    "progress",
    "executed",
    "execution_success",
    "execution_error",
}


@pytest.fixture
async def http(comfy_double: ComfyDouble):
    async with aiohttp.ClientSession(comfy_double.url) as session:
        yield session


def pid(name: str) -> str:
    """A canonical prompt id (ComfyUI v0.33.0 refuses any other), stable per ``name``."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


async def collect(ws: aiohttp.ClientWebSocketResponse, prompt_id: str, out: list) -> None:
    """Append frames until executing node null (or execution_interrupted) for ``prompt_id``."""
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            continue
        frame = json.loads(msg.data)
        out.append(frame)
        data = frame["data"]
        if frame["type"] == "executing" and data.get("node") is None:
            return
        if frame["type"] == "execution_interrupted" and data.get("prompt_id") == prompt_id:
            return


async def submit(
    http: aiohttp.ClientSession,
    graph: dict,
    prompt_id: str,
    client_id: str = "me",
    extra_data: dict | None = None,
):
    body = {"prompt": graph, "client_id": client_id, "prompt_id": prompt_id}
    if extra_data is not None:
        body["extra_data"] = extra_data
    async with http.post("/prompt", json=body) as resp:
        return resp.status, await resp.json()


async def finished(double: ComfyDouble, prompt_id: str) -> dict:
    for _ in range(200):
        if prompt_id in double.history:
            return double.history[prompt_id]
        await asyncio.sleep(0.05)
    raise AssertionError(f"prompt {prompt_id} never reached history")


async def test_frame_order_and_delivery_rules(http, comfy_double, comfy_media):
    graph = job_graph(comfy_media.image, comfy_media.video, steps=2)
    mine, other = [], []
    async with (
        http.ws_connect("/ws?clientId=me") as ws,
        http.ws_connect("/ws?clientId=someone-else") as ws2,
    ):
        status, body = await submit(http, graph, pid("fixed-1"))
        assert status == 200 and body == {
            "prompt_id": pid("fixed-1"),
            "number": 0,
            "node_errors": {},
        }
        await asyncio.wait_for(collect(ws, pid("fixed-1"), mine), 30)
        await asyncio.sleep(0.1)
        while True:
            try:
                msg = await ws2.receive(timeout=0.2)
            except TimeoutError:
                break
            other.append(json.loads(msg.data))
    types = [f["type"] for f in mine]
    assert mine[0] == {
        "type": "status",
        "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "me"},
    }
    core = [t for t in types if t not in ("status", "progress_state")]
    order = topological_order(graph)
    expected = ["execution_start", "execution_cached"]
    for nid in order:
        expected.append("executing")
        if graph[nid]["class_type"] == "WanVideoSamplerv2":
            expected += ["progress", "progress"]
        if graph[nid]["class_type"] == "VHS_VideoCombine":
            expected.append("executed")
    expected += ["execution_success", "executing"]
    assert core == expected
    executing = [f["data"]["node"] for f in mine if f["type"] == "executing"]
    assert executing == [*order, None]
    assert [f["data"]["value"] for f in mine if f["type"] == "progress"] == [1, 2]
    assert all(f["data"]["prompt_id"] == pid("fixed-1") for f in mine if f["type"] in PER_PROMPT)
    # protocol §3.5: the other socket gets status and progress_state only
    assert {f["type"] for f in other} == {"status", "progress_state"}


async def test_node_null_sent_only_after_history_stored(http, comfy_double, comfy_media):
    seen_history_at_null: list[bool] = []
    original = comfy_double.send

    async def spy(etype: str, data: Any, sid: str | None) -> None:
        if etype == "executing" and data.get("node") is None:
            seen_history_at_null.append(data["prompt_id"] in comfy_double.history)
        await original(etype, data, sid)

    comfy_double.send = spy  # type: ignore[method-assign]
    frames: list = []
    async with http.ws_connect("/ws?clientId=me") as ws:
        await submit(http, job_graph(comfy_media.image, comfy_media.video), pid("h-1"))
        await asyncio.wait_for(collect(ws, pid("h-1"), frames), 30)
        async with http.get(f"/history/{pid('h-1')}") as resp:
            entry = (await resp.json())[pid("h-1")]
    assert seen_history_at_null == [True]
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == [
        "execution_start",
        "execution_cached",
        "execution_success",
    ]
    assert entry["prompt"][1] == pid("h-1") and entry["prompt"][3]["client_id"] == "me"
    assert "create_time" in entry["prompt"][3]
    gif = entry["outputs"]["139"]["gifs"][0]
    assert set(gif) == {
        "filename",
        "subfolder",
        "type",
        "format",
        "frame_rate",
        "workflow",
        "fullpath",
    }
    assert gif["type"] == "output" and gif["format"] == "video/h264-mp4"


async def test_prompt_without_client_id_gets_no_per_prompt_frames(http, comfy_double, comfy_media):
    frames: list = []
    async with http.ws_connect("/ws?clientId=watcher") as ws:
        async with http.post(
            "/prompt",
            json={
                "prompt": job_graph(comfy_media.image, comfy_media.video),
                "prompt_id": pid("anon"),
            },
        ) as resp:
            assert resp.status == 200
        for _ in range(100):
            if pid("anon") in comfy_double.history:
                break
            await asyncio.sleep(0.05)
        while True:
            try:
                frames.append(json.loads((await ws.receive(timeout=0.2)).data))
            except TimeoutError:
                break
    assert {f["type"] for f in frames} <= {"status", "progress_state"}


async def test_mp4_written_as_vhs_does(http, comfy_double, comfy_media):
    graph = job_graph(
        comfy_media.image,
        comfy_media.video,
        width=96,
        height=64,
        fps=12,
        force_rate=8,
        frames=81,
        prefix="jobs/x/out",
    )
    status, _ = await submit(http, graph, pid("mp4"))
    assert status == 200
    for _ in range(200):
        if pid("mp4") in comfy_double.history:
            break
        await asyncio.sleep(0.05)
    gif = comfy_double.history[pid("mp4")]["outputs"]["139"]["gifs"][0]
    assert gif["filename"] == "out_00001-audio.mp4" and gif["subfolder"] == "jobs/x"
    folder = comfy_double.output_dir / "jobs" / "x"
    assert sorted(p.name for p in folder.iterdir()) == [
        "out_00001-audio.mp4",
        "out_00001.mp4",
        "out_00001.png",  # first-frame PNG: no VHS_MetadataImage false in extra_data
    ]
    with av.open(str(folder / "out_00001.mp4")) as c:
        v = c.streams.video[0]
        assert (v.width, v.height, v.codec_context.name, v.format.name) == (
            96,
            64,
            "h264",
            "yuv420p",
        )
        assert float(v.average_rate) == 12
        assert sum(1 for _ in c.decode(v)) == 5  # 24 frames @24 -> 8 @8 -> 4n+1 = 5
        assert not c.streams.audio
    with av.open(str(folder / gif["filename"])) as c:
        assert len(c.streams.audio) == 1 and c.streams.audio[0].codec_context.name == "aac"
    async with http.get(
        "/view", params={"filename": gif["filename"], "subfolder": "jobs/x", "type": "output"}
    ) as resp:
        assert resp.status == 200
        assert await resp.read() == (folder / gif["filename"]).read_bytes()


@pytest.mark.parametrize(("audio_link", "video_attr"), [(False, "video"), (True, "silent_video")])
async def test_no_audio_file_without_link_or_audio(
    http, comfy_double, comfy_media, audio_link, video_attr
):
    graph = job_graph(
        comfy_media.image, getattr(comfy_media, video_attr), audio=audio_link, prefix="na"
    )
    await submit(http, graph, pid("na"))
    for _ in range(200):
        if pid("na") in comfy_double.history:
            break
        await asyncio.sleep(0.05)
    assert (
        comfy_double.history[pid("na")]["outputs"]["139"]["gifs"][0]["filename"] == "na_00001.mp4"
    )
    assert sorted(p.name for p in comfy_double.output_dir.iterdir()) == [
        "na_00001.mp4",
        "na_00001.png",
    ]


@pytest.mark.parametrize(("load_format", "frames"), [("Wan", 5), ("AnimateDiff", 8)])
async def test_frame_count_follows_the_load_format(
    http, comfy_double, comfy_media, load_format, frames
):
    """scail-workflow.md §10 pitfall 10: only a format with a frame rule (Wan: 4n+1) truncates;
    AnimateDiff keeps every frame (24 frames at 24 fps loaded at 8 fps -> 8)."""
    graph = job_graph(comfy_media.image, comfy_media.video, audio=False, force_rate=8, prefix="f")
    graph["130"]["inputs"]["format"] = load_format
    await submit(http, graph, pid(load_format))
    entry = await finished(comfy_double, pid(load_format))
    name = entry["outputs"]["139"]["gifs"][0]["filename"]
    with av.open(str(comfy_double.output_dir / name)) as c:
        assert sum(1 for _ in c.decode(c.streams.video[0])) == frames


async def test_metadata_png_suppressed_by_extra_data(http, comfy_double, comfy_media):
    """scail-workflow.md §10 pitfall 19: only extra_pnginfo.workflow.extra.VHS_MetadataImage
    false stops VHS_VideoCombine from writing <name>.png next to the video."""
    graph = job_graph(comfy_media.image, comfy_media.video, audio=False, prefix="quiet")
    extra = {"extra_pnginfo": {"workflow": {"extra": {"VHS_MetadataImage": False}}}}
    await submit(http, graph, pid("quiet"), extra_data=extra)
    entry = await finished(comfy_double, pid("quiet"))
    assert entry["outputs"]["139"]["gifs"][0]["filename"] == "quiet_00001.mp4"
    assert [p.name for p in comfy_double.output_dir.iterdir()] == ["quiet_00001.mp4"]


async def test_unexpected_node_exception_is_an_execution_error(http, comfy_double, comfy_media):
    """A node that raises (here: a driving 'video' that exists but is no video) fails the prompt
    with execution_error naming that node, history stored, then executing null (§3.3)."""
    fake = comfy_double.input_dir / "not_a_video.mp4"
    fake.write_bytes(b"this is not a video")
    frames: list = []
    async with http.ws_connect("/ws?clientId=me") as ws:
        await submit(http, job_graph(comfy_media.image, fake.name), pid("broken"))
        await asyncio.wait_for(collect(ws, pid("broken"), frames), 30)
    core = [f for f in frames if f["type"] not in ("status", "progress_state")]
    assert [f["type"] for f in core[-2:]] == ["execution_error", "executing"]
    assert core[-2]["data"]["node_id"] == "139"
    entry = comfy_double.history[pid("broken")]
    assert entry["status"]["status_str"] == "error" and entry["outputs"] == {}


async def test_validation_bodies(http, comfy_double, comfy_media):
    status, body = await submit(http, {"1": {"class_type": "NoSuchNode", "inputs": {}}}, pid("v1"))
    assert status == 400 and body["node_errors"] == {}
    assert body["error"]["type"] == "invalid_prompt"
    assert "NoSuchNode" in body["error"]["message"]
    async with http.post("/prompt", json={"client_id": "me"}) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["type"] == "no_prompt"
    graph = job_graph("nope.png", comfy_media.video)
    status, body = await submit(http, graph, pid("v2"))
    assert status == 400
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    err = body["node_errors"]["106"]
    assert err["class_type"] == "LoadImage"
    assert err["errors"][0]["type"] == "custom_validation_failed"
    assert err["errors"][0]["details"] == "image - Invalid image file: nope.png"
    graph = job_graph(comfy_media.image, "../escape.mp4")
    status, body = await submit(http, graph, pid("v3"))
    assert status == 400 and "Invalid video file" in json.dumps(body)
    assert comfy_double.pending == [] and comfy_double.history == {}


@pytest.mark.parametrize(
    "bad",
    [
        uuid.UUID(int=0xABCDEF).hex,  # what the worker sent before: uuid4().hex
        str(uuid.UUID(int=0xABCDEF)).upper(),
        "{" + str(uuid.UUID(int=0xABCDEF)) + "}",
        "urn:uuid:" + str(uuid.UUID(int=0xABCDEF)),
        "fixed-1",
        "",
        12,
    ],
)
async def test_prompt_id_must_be_a_canonical_uuid(http, comfy_double, comfy_media, bad):
    """ComfyUI v0.33.0 (server.py:1090-1104, jobs.py validate_job_id) refuses any client
    prompt_id that is not ``str(uuid.UUID(x))``, before validating the graph, with this body."""
    graph = job_graph(comfy_media.image, comfy_media.video)
    status, body = await submit(http, graph, bad)
    assert status == 400
    assert body == {
        "error": {
            "type": "invalid_prompt_id",
            "message": "prompt_id must be a valid UUID",
            "details": "prompt_id must be a UUID string in canonical lowercase hyphenated "
            "form; omit it to let the server generate one",
            "extra_info": {},
        },
        "node_errors": {},
    }
    assert comfy_double.pending == [] and comfy_double.running is None


async def test_prompt_id_absent_or_null_is_minted(http, comfy_double, comfy_media):
    graph = job_graph(comfy_media.image, comfy_media.video)
    numbers = []
    for extra in ({}, {"prompt_id": None}):
        async with http.post("/prompt", json={"prompt": graph, **extra}) as resp:
            body = await resp.json()
        assert resp.status == 200 and str(uuid.UUID(body["prompt_id"])) == body["prompt_id"]
        numbers.append(body["number"])
    assert numbers == [0, 1]  # server.py:1081-1086: from 0, one per POST


async def test_view_path_rules(http, comfy_double):
    (comfy_double.output_dir / "sub").mkdir()
    (comfy_double.output_dir / "sub" / "a.mp4").write_bytes(b"abc")
    (comfy_double.root / "secret.txt").write_text("x")
    cases = [
        ({"filename": "a.mp4", "subfolder": "sub"}, 200),
        ({"filename": "a.mp4", "subfolder": "sub", "type": "output"}, 200),
        ({"filename": "../secret.txt"}, 400),
        ({"filename": "/etc/passwd"}, 400),
        ({"filename": "secret.txt", "subfolder": "../"}, 403),
        ({"filename": "missing.mp4"}, 404),
        ({"filename": "a.mp4", "subfolder": "sub", "type": "input"}, 404),
    ]
    for params, expected in cases:
        for prefix in ("", "/api"):
            async with http.get(prefix + "/view", params=params) as resp:
                assert resp.status == expected, (prefix, params)
                if expected == 200:
                    assert await resp.read() == b"abc"


async def test_upload_image_dedupe_and_rename(http, comfy_double):
    async def upload(data: bytes, **fields: str) -> dict:
        form = aiohttp.FormData()
        form.add_field("image", data, filename="p.png")
        for k, v in fields.items():
            form.add_field(k, v)
        async with http.post("/upload/image", data=form) as resp:
            assert resp.status == 200
            return await resp.json()

    assert await upload(b"one", subfolder="jobs/a") == {
        "name": "p.png",
        "subfolder": "jobs/a",
        "type": "input",
    }
    assert (await upload(b"one", subfolder="jobs/a"))["name"] == "p.png"
    assert (await upload(b"two", subfolder="jobs/a"))["name"] == "p (1).png"
    assert (await upload(b"three", subfolder="jobs/a", overwrite="true"))["name"] == "p.png"
    assert (comfy_double.input_dir / "jobs/a/p.png").read_bytes() == b"three"


async def test_info_and_control_routes(http, comfy_double):
    async with http.get("/api/system_stats") as resp:
        stats = await resp.json()
    assert stats["system"]["comfyui_version"] == "0.8.0" and isinstance(stats["devices"], list)
    async with http.get("/history/unknown") as resp:
        assert await resp.json() == {}
    async with http.get("/object_info/NoSuchNode") as resp:
        assert resp.status == 200 and await resp.json() == {}
    if comfy_double.object_info:
        async with http.get("/object_info/LoadImage") as resp:
            assert "input" in (await resp.json())["LoadImage"]
    async with http.post("/interrupt", json={"prompt_id": "not-running"}) as resp:
        assert resp.status == 200 and await resp.read() == b""
    async with http.get("/queue") as resp:
        assert await resp.json() == {"queue_running": [], "queue_pending": []}
    async with http.get("/prompt") as resp:
        assert await resp.json() == {"exec_info": {"queue_remaining": 0}}
    async with http.post("/_double/faults", json={"no_such_fault": 1}) as resp:
        assert resp.status == 400


async def test_queue_delete_pending_and_interrupt_broadcast(http, comfy_double, comfy_media):
    comfy_double.faults.step_delay_s = 0.2
    graph = job_graph(comfy_media.image, comfy_media.video, steps=20)
    frames: list = []
    async with http.ws_connect("/ws?clientId=bystander") as ws:
        await submit(http, graph, pid("run-1"))
        await submit(
            http, job_graph(comfy_media.image, comfy_media.video, prefix="q"), pid("wait-1")
        )
        async with http.get("/queue") as resp:
            queue = await resp.json()
        assert [i[1] for i in queue["queue_pending"]] == [pid("wait-1")]
        async with http.post("/queue", json={"delete": [pid("wait-1")]}) as resp:
            assert resp.status == 200
        await asyncio.sleep(0.3)
        async with http.post("/interrupt", json={"prompt_id": pid("run-1")}) as resp:
            assert resp.status == 200
        await asyncio.wait_for(collect(ws, pid("run-1"), frames), 10)
    interrupted = frames[-1]
    assert interrupted["type"] == "execution_interrupted"  # broadcast (§3.3)
    assert interrupted["data"]["node_type"] == "WanVideoSamplerv2"
    assert set(interrupted["data"]) == {
        "prompt_id",
        "node_id",
        "node_type",
        "executed",
        "timestamp",
    }
    await asyncio.sleep(0.1)
    assert pid("wait-1") not in comfy_double.history
    assert comfy_double.history[pid("run-1")]["status"]["status_str"] == "error"


async def test_execution_error_frame_then_node_null(http, comfy_double, comfy_media):
    comfy_double.faults.error_at_node = "348"
    frames: list = []
    async with http.ws_connect("/ws?clientId=me") as ws:
        await submit(http, job_graph(comfy_media.image, comfy_media.video), pid("e-1"))
        await asyncio.wait_for(collect(ws, pid("e-1"), frames), 10)
    core = [f for f in frames if f["type"] not in ("status", "progress_state")]
    assert [f["type"] for f in core[-2:]] == ["execution_error", "executing"]
    err = core[-2]["data"]
    assert {
        "prompt_id",
        "node_id",
        "node_type",
        "executed",
        "exception_message",
        "exception_type",
        "traceback",
        "current_inputs",
        "current_outputs",
        "timestamp",
    } == set(err)
    assert not any(f["type"] == "execution_success" for f in frames)
    entry = comfy_double.history[pid("e-1")]
    assert entry["outputs"] == {} and entry["status"]["status_str"] == "error"


async def test_same_client_id_replaces_old_socket(http, comfy_double):
    async with http.ws_connect("/ws?clientId=dup") as first:
        await first.receive(timeout=2)  # status
        async with http.ws_connect("/ws?clientId=dup") as second:
            await second.receive(timeout=2)
            msg = await first.receive(timeout=2)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert comfy_double.sockets["dup"] is not None


def test_cli_help_lists_every_fault():
    import subprocess
    import sys

    from tests.comfy_double import Faults

    out = subprocess.run(
        [sys.executable, "-m", "tests.comfy_double", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    for name in Faults.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in out


async def test_history_list_and_edit(http, comfy_double, comfy_media):
    for name in ("l-1", "l-2"):
        async with http.post(
            "/prompt",
            json={
                "prompt": job_graph(comfy_media.image, comfy_media.video, prefix=name),
                "prompt_id": pid(name),
                "extra_data": {"api_key_comfy_org": "k"},
            },
        ) as resp:
            assert resp.status == 200
    for _ in range(200):
        if pid("l-2") in comfy_double.history:
            break
        await asyncio.sleep(0.05)
    async with http.get("/history", params={"max_items": "1"}) as resp:
        assert list(await resp.json()) == [pid("l-2")]
    async with http.get("/history") as resp:
        listing = await resp.json()
    assert list(listing) == [pid("l-1"), pid("l-2")]
    assert "api_key_comfy_org" not in listing[pid("l-1")]["prompt"][3]
    async with http.post("/history", json={"delete": [pid("l-1")]}) as resp:
        assert resp.status == 200
    async with http.get("/history/l-1") as resp:
        assert await resp.json() == {}
    async with http.post("/history", json={"clear": True}) as resp:
        assert resp.status == 200
    assert comfy_double.history == {}


async def test_upload_refuses_escape(http, comfy_double):
    form = aiohttp.FormData()
    form.add_field("image", b"x", filename="p.png")
    form.add_field("subfolder", "../../etc")
    async with http.post("/upload/image", data=form) as resp:
        assert resp.status == 400
    assert not (comfy_double.root.parent / "etc").exists()
