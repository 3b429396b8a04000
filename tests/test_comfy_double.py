"""The ComfyUI double pins the protocol of ../shared/reference/comfyui-protocol.md.

Raw HTTP and websocket calls (no worker code) against the in-process double.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    core = [t for t in types if t != "status"]
    order = topological_order(graph)
    # progress frames per node: the sampler's steps, and the packs' own progress bars
    counts = {"WanVideoSamplerv2": 2, "WanVideoModelLoader": 4, "WanVideoDecode": 3}
    counts["PoseDetectionVitPoseToDWPose"] = 18  # two per frame, 9 frames
    expected = ["execution_start", "execution_cached"]
    for nid in order:
        expected += ["progress_state", "executing"]
        expected += ["progress_state", "progress"] * counts.get(graph[nid]["class_type"], 0)
        if graph[nid]["class_type"] == "VHS_VideoCombine":
            expected.append("executed")
        expected.append("progress_state")  # finished
    expected += ["execution_success", "executing"]
    assert core == expected
    executing = [f["data"]["node"] for f in mine if f["type"] == "executing"]
    assert executing == [*order, None]
    sampler = [f["data"] for f in mine if f["type"] == "progress" and f["data"]["node"] == "348"]
    assert [(d["value"], d["max"]) for d in sampler] == [(1, 2), (2, 2)]
    decode = [f["data"] for f in mine if f["type"] == "progress" and f["data"]["node"] == "28"]
    assert [(d["value"], d["max"]) for d in decode] == [(1, 3), (2, 3), (3, 3)]
    assert all(f["data"]["prompt_id"] == pid("fixed-1") for f in mine if f["type"] in PER_PROMPT)
    last_state = [f["data"]["nodes"] for f in mine if f["type"] == "progress_state"][-1]
    assert set(last_state) == set(order)  # every node ran: all reported, none pending
    assert {n["state"] for n in last_state.values()} == {"finished"}
    # ComfyUI v0.33.0: progress_state (progress.py:183-185) and every per-prompt frame go to
    # the prompt's client only; another socket sees the queue status broadcasts
    assert {f["type"] for f in other} == {"status"}


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
    # ComfyUI v0.33.0: without a client the guarded frames are not sent at all
    # (execution.py:494, 577, 683; main.py:383), the unguarded ones go to every socket
    # (send_json with sid None, server.py:1385-1388): progress_state and progress
    types = {f["type"] for f in frames}
    assert types == {"status", "progress_state", "progress"}


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
    assert stats["system"]["comfyui_version"] == "0.33.0" and isinstance(stats["devices"], list)
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
    async with http.ws_connect("/ws?clientId=counted") as ws:
        await ws.receive(timeout=2)  # status: sent once the socket is registered
        async with http.get("/_double/sockets") as resp:
            assert await resp.json() == {"open": 1, "registered": ["counted"]}


async def test_queue_delete_pending_and_interrupt(http, comfy_double, comfy_media):
    comfy_double.faults.step_delay_s = 0.2
    graph = job_graph(comfy_media.image, comfy_media.video, steps=20)
    frames: list = []
    async with http.ws_connect("/ws?clientId=me") as ws:
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
    assert interrupted["type"] == "execution_interrupted"  # to the prompt's client
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


async def wait_for(condition, what: str, timeout_s: float = 10.0) -> None:
    """Wait until ``condition()`` holds (server-side effects of a client action are async)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_same_client_id_replaces_but_never_closes_the_old_socket(
    http, comfy_double, comfy_media
):
    """ComfyUI v0.33.0 server.py:274-281 and 324-325: the second socket takes the entry, the
    first stays open (nothing is sent to it any more); when the first one closes, its handler
    pops the entry of its id unconditionally: the second socket stops getting frames."""
    async with http.ws_connect("/ws?clientId=dup") as first:
        assert json.loads((await first.receive(timeout=2)).data)["type"] == "status"
        second = await http.ws_connect("/ws?clientId=dup")
        assert json.loads((await second.receive(timeout=2)).data)["type"] == "status"
        assert comfy_double.open_websockets == 2 and comfy_double.sockets["dup"] is not None
        with pytest.raises(TimeoutError):
            await first.receive(timeout=0.3)  # not closed by the server
        assert not first.closed
    await wait_for(lambda: comfy_double.open_websockets == 1, "the first socket's handler")
    assert "dup" not in comfy_double.sockets  # the live second socket was unregistered
    await submit(http, job_graph(comfy_media.image, comfy_media.video), pid("orphan"), "dup")
    await finished(comfy_double, pid("orphan"))
    with pytest.raises(TimeoutError):
        while True:  # only frames the table no longer routes: nothing at all arrives
            msg = await second.receive(timeout=0.3)
            assert json.loads(msg.data)["type"] == "status", msg.data
    await second.close()
    await wait_for(lambda: comfy_double.open_websockets == 0, "every handler to finish")


async def test_reconnect_mid_run_gets_executing_without_prompt_id(http, comfy_double, comfy_media):
    """ComfyUI v0.33.0 server.py:287-290: a socket that connects with the running prompt's
    client id gets ``status`` then ``executing`` with the current node and no prompt_id."""
    comfy_double.faults.step_delay_s = 0.2
    graph = job_graph(comfy_media.image, comfy_media.video, steps=20)
    async with http.ws_connect("/ws?clientId=me"):
        await submit(http, graph, pid("re-1"))
        await wait_for(lambda: comfy_double.last_node_id == "348", "the sampler to start")
    async with http.ws_connect("/ws?clientId=me") as again:
        first = json.loads((await again.receive(timeout=2)).data)
        second = json.loads((await again.receive(timeout=2)).data)
    async with http.ws_connect("/ws?clientId=someone-else") as other:
        only = json.loads((await other.receive(timeout=2)).data)
        with pytest.raises(TimeoutError):
            while True:
                frame = json.loads((await other.receive(timeout=0.3)).data)
                assert frame["type"] == "status", frame
    assert first["type"] == "status" and first["data"]["sid"] == "me"
    assert second == {"type": "executing", "data": {"node": "348"}}
    assert only["type"] == "status"
    async with http.post("/interrupt", json={}) as resp:
        assert resp.status == 200
    await finished(comfy_double, pid("re-1"))
    assert comfy_double.last_node_id is None


async def test_interrupt_goes_to_the_prompt_client_only(http, comfy_double, comfy_media):
    """ComfyUI v0.33.0 execution.py:699 with :683-684: execution_interrupted is sent to the
    prompt's client (send_sync with server.client_id), not to every socket."""
    comfy_double.faults.step_delay_s = 0.2
    mine, other = [], []
    async with (
        http.ws_connect("/ws?clientId=me") as ws,
        http.ws_connect("/ws?clientId=bystander") as ws2,
    ):
        await submit(http, job_graph(comfy_media.image, comfy_media.video, steps=20), pid("i-1"))
        await wait_for(lambda: comfy_double.last_node_id == "348", "the sampler to start")
        async with http.post("/interrupt", json={"prompt_id": pid("i-1")}) as resp:
            assert resp.status == 200
        await asyncio.wait_for(collect(ws, pid("i-1"), mine), 10)
        with contextlib.suppress(TimeoutError):
            while True:
                other.append(json.loads((await ws2.receive(timeout=0.3)).data))
    assert mine[-1]["type"] == "execution_interrupted"
    assert {f["type"] for f in other} == {"status"}


async def test_outputs_of_nodes_that_ran_are_kept_on_error(http, comfy_double, comfy_media):
    """ComfyUI v0.33.0 execution.py:775, 828-834: the ui outputs collected before the failing
    node are stored in history (status error); the file they name exists."""
    graph = job_graph(comfy_media.image, comfy_media.video, prefix="kept")
    graph["900"] = {"class_type": "PreviewAny", "inputs": {"source": ["139", 0]}}
    comfy_double.validator = lambda prompt: (None, {})  # PreviewAny: not in the fixture
    comfy_double.faults.error_at_node = "900"
    status, _ = await submit(http, graph, pid("kept"))
    assert status == 200
    entry = await finished(comfy_double, pid("kept"))
    assert entry["status"]["status_str"] == "error"
    gif = entry["outputs"]["139"]["gifs"][0]
    assert (comfy_double.output_dir / gif["filename"]).is_file()
    error = dict(entry["status"]["messages"])["execution_error"]
    assert error["node_id"] == "900" and "139" in error["executed"]
    assert set(error["executed"]) == set(graph) - {"900"}


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
