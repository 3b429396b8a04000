"""The real ComfyUI stack (``stack/install.py``, ``XICON_STACK_HOME``) for the real-stack tier
(tests/realstack) and the soak benchmark (bench/soak.py).

- ``Stack(home)``: the installed stack (``ComfyUI/``, ``venv/``, the install record).
- ``make_base(stack, base, packs=None)``: a ComfyUI base directory (``--base-directory``) whose
  ``custom_nodes/`` mirrors the stack's packs file by file, with empty input/output/user;
  ``generate_models`` writes the tiny synthetic models and seeds the text-embedding cache;
  ``place_graph_inputs`` puts the shipped graph's two input files in place.
- ``entrypoint_env(stack, base, comfy_port, api_port)``: the environment for the project's
  ``entrypoint.sh`` on the CPU (the CPU profile of the graph, no GPU preflight, local API).
- ``start_worker(stack, base, **env) -> EntrypointWorker`` starts ``entrypoint.sh`` (PID 1 of
  the container) and waits for ComfyUI and the handler's job loop; ``stop_worker`` stops it and
  every process under it. ``fault_base`` is a base of its own on a shared base's models.
- ``wan_vae_loader()``, ``wan_encode(image)``, ``wan_decode(samples)``, ``gradient_clip(frames)``,
  ``h264_combine(images, prefix)``: prompt nodes for the tiny Wan VAE as the graph sets them, a
  gradient image as a clip, and node 139's encode.
- ``vae_round_trip_prompt(frames)``: the gradient image as a clip, encoded and decoded by the tiny
  Wan VAE through WanVideoWrapper's nodes, the frames saved as PNGs and encoded again as a latent.
- ``serve_on_gradient(...)``: one prompt through a CPU ComfyUI over a new base, a gradient image
  as its input, one setting set or unset; what it wrote and logged.
- ``PINNED_VAE_LOADER``: a script fragment for ``stack_json`` that, given ``comfy_dir`` and
  ``vae_file``, imports the pinned Wan VAE module as ``vae_module`` and compiles upstream's own
  ``WanVideoVAELoader`` (its pinned source, readable by ``inspect``) as ``Pinned``.
- ``PINNED_DECODE``: a script fragment that, given ``nodes_py`` and ``torch``, compiles
  upstream's own ``WanVideoDecode`` (its pinned source, readable by ``inspect``) as
  ``PinnedDecode``.
- ``cpu_job(media, **extra)``: the small CPU job (256×256, 5 frames, 1 step) with both inputs
  as base64; ``wait_for(url, proc, log, timeout_s)`` polls a URL while the process lives.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.plugins.comfy import free_port, stop_process
from tests.plugins.media_factory import job_input
from tests.plugins.process_facts import (
    alive,
    children,
    python_threads,
    thread_dump_env,
    wait_until,
)
from tests.plugins.runpod_worker_api import FakePlatform
from tests.realstack.cpu_profile import cpu_graph
from xicon_dance.schema import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT

ROOT = Path(__file__).resolve().parent.parent.parent
GRAPH = ROOT / "XiCON_Dance_SCAIL_vFinal.json"
STARTUP_TIMEOUT_S = 900.0  # a loaded 2-core machine imports torch and the packs slowly
JOB_S = 900.0  # one CPU job on a loaded 2-core machine: well under this
POLL_S = 0.5
# The small CPU job: 256×256 (job_input's), 5 frames, 1 step
CPU_JOB: dict[str, Any] = {"max_frames": 5, "steps": 1, "seed": 11, "output": "base64"}


@dataclass(frozen=True)
class Stack:
    home: Path

    @property
    def comfy_dir(self) -> Path:
        return self.home / "ComfyUI"

    @property
    def python(self) -> Path:
        return self.home / "venv" / "bin" / "python"

    @property
    def record(self) -> dict:
        return json.loads((self.comfy_dir / ".xicon-stack.json").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Server:
    proc: subprocess.Popen[bytes]
    comfy_url: str
    api_url: str
    base: Path
    log: Path

    def log_tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def mirror_pack(src: Path, dest: Path) -> None:
    """A real directory whose entries link to the pack's: the pack imports as usual, and files it
    creates next to its own code land here."""
    dest.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name != "__pycache__":
            (dest / entry.name).symlink_to(entry)


def make_base(stack: Stack, base: Path, *, packs: set[str] | None = None) -> Path:
    """A ComfyUI base directory: mirrored packs (all, or the named ones), empty input/output."""
    for src in sorted((stack.comfy_dir / "custom_nodes").iterdir()):
        if src.is_dir() and src.name != "__pycache__" and (packs is None or src.name in packs):
            mirror_pack(src, base / "custom_nodes" / src.name)
    for sub in ("input", "output", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    return base


def generate_models(stack: Stack, base: Path) -> None:
    """Tiny synthetic model files under the manifest's names, and the seeded text cache."""
    cache = base / "custom_nodes" / "ComfyUI-WanVideoWrapper" / "text_embed_cache"
    shipped = json.loads(GRAPH.read_text(encoding="utf-8"))["368"]["inputs"]
    prompts = {
        DEFAULT_PROMPT,
        DEFAULT_NEGATIVE_PROMPT,
        shipped["positive_prompt"],
        shipped["negative_prompt"],
    }
    cmd = [str(stack.python), str(ROOT / "scripts" / "make_synthetic_models.py")]
    cmd += ["--size", "tiny", "--out", str(base / "models"), "--text-cache", str(cache)]
    for prompt in sorted(prompts):
        cmd += ["--prompt", prompt]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=900)


def place_graph_inputs(base: Path, image: Path, video: Path) -> None:
    """The shipped graph's own input names (LoadImage, VHS_LoadVideo) as real files."""
    graph = json.loads(GRAPH.read_text(encoding="utf-8"))
    shutil.copyfile(image, base / "input" / graph["106"]["inputs"]["image"])
    shutil.copyfile(video, base / "input" / graph["130"]["inputs"]["video"])


def released_nodes(log: str) -> set[str]:
    """Node ids named by ``xicon_release_outputs``'s "released" lines in a ComfyUI log."""
    found = re.findall(r"released the cached results of node\(s\) ([^(]+) \(", log)
    return {node.strip() for names in found for node in names.split(",")}


def get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def post_json(url: str, body: Any, timeout: float = 10.0) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def forget_cached_outputs(comfy_url: str, timeout_s: float = 120.0) -> None:
    """Make ComfyUI run every node of the next prompt again (a test that swaps a model file on
    disk needs its loader to read it). ``POST /free`` with ``free_memory`` sets a flag that the
    prompt worker handles after the prompt it is running or waking up for (main.py
    ``prompt_worker``: ``e.reset()`` drops the output caches); a one-node prompt run to its end
    afterwards guarantees the flag was handled before any later prompt is taken."""
    post_json(f"{comfy_url}/free", {"unload_models": True, "free_memory": True})
    prompt_id = str(uuid.uuid4())
    graph = {
        "1": {"class_type": "PrimitiveInt", "inputs": {"value": uuid.uuid4().int % 1000}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }
    post_json(f"{comfy_url}/prompt", {"prompt": graph, "prompt_id": prompt_id})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        history = json.loads(get(f"{comfy_url}/history/{prompt_id}"))
        if prompt_id in history:
            post_json(f"{comfy_url}/history", {"delete": [prompt_id]})
            return
        time.sleep(POLL_S)
    pytest.fail(f"ComfyUI did not finish a one-node prompt within {timeout_s:.0f} s")


def wait_for(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """Poll ``url`` until it answers; fail at once if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
            pytest.fail(f"process exited with {proc.returncode} before {url} answered:\n{tail}")
        try:
            get(url, timeout=5)
            return
        except (urllib.error.URLError, OSError):
            time.sleep(POLL_S)
    pytest.fail(f"{url} did not answer within {timeout_s:.0f} s")


PACK_PREAMBLE = r"""
import asyncio, importlib.util, json, logging, sys, types
extension, *script_args = sys.argv[1:]
sys.argv = ["main.py", "--cpu"]
sys.path.insert(0, ".")
import comfy.options
comfy.options.enable_args_parsing()
import server
# packs read PromptServer.instance at import (latent previews; VideoHelperSuite's routes and
# prompt queue); no server runs here
from aiohttp import web
server.PromptServer.instance = types.SimpleNamespace(
    send_sync=lambda *a, **k: None, routes=web.RouteTableDef(), prompt_queue=None, number=0
)
import nodes

for pack in PACKS:
    loaded = nodes.load_custom_node(pack)
    if asyncio.iscoroutine(loaded):
        asyncio.run(loaded)
spec = importlib.util.spec_from_file_location("extension_under_test", extension)
ext = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = ext
spec.loader.exec_module(ext)
lines = []
class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
logging.getLogger(LOGGER).addHandler(Keep())
logging.getLogger(LOGGER).setLevel(logging.INFO)
"""


PINNED_VAE_LOADER = r"""
import ast, importlib, importlib.util, linecache, logging, sys, types
sys.path.insert(0, comfy_dir)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
from comfy.utils import load_torch_file

def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

root = f"{comfy_dir}/custom_nodes/ComfyUI-WanVideoWrapper"
spec = importlib.util.spec_from_file_location(
    "wvw", f"{root}/__init__.py", submodule_search_locations=[root])
sys.modules["wvw"] = importlib.util.module_from_spec(spec)
vae_module = importlib.import_module("wvw.wanvideo.wan_video_vae")

# upstream's own loader class, compiled from the pinned file's lines (linecache lets inspect
# read them), with the module globals its loadmodel reads (the tiny VAE's sizes come from its
# weights, as the loader reads them)
source = open(f"{root}/nodes_model_loading.py").read()
lines = source.splitlines(keepends=True)
cls_node = next(n for n in ast.parse(source).body
                if isinstance(n, ast.ClassDef) and n.name == "WanVideoVAELoader")
class_source = "".join(lines[cls_node.lineno - 1:cls_node.end_lineno])
fname = "<pinned WanVideoWrapper nodes_model_loading.py: WanVideoVAELoader>"
linecache.cache[fname] = (len(class_source), None, class_source.splitlines(keepends=True), fname)
folder_paths = types.SimpleNamespace(
    get_filename_list=lambda kind: [], get_full_path_or_raise=lambda kind, name: vae_file)
ns = {"torch": torch, "folder_paths": folder_paths, "load_torch_file": load_torch_file,
      "WanVideoVAE": vae_module.WanVideoVAE, "WanVideoVAE38": None,
      "log": logging.getLogger("wvw"), "offload_device": torch.device("cpu")}
exec(compile(class_source, fname, "exec"), ns)
Pinned = ns["WanVideoVAELoader"]
"""


# upstream's own WanVideoDecode, compiled from the pinned file's lines (linecache lets inspect
# read them), with the module globals its decode reads: given ``nodes_py`` (the pack's nodes.py)
# and ``torch``, it defines ``decode_source`` (the class's source), ``decode_globals`` and
# ``PinnedDecode``
PINNED_DECODE = r"""
import ast, linecache, types
_source = open(nodes_py).read()
_lines = _source.splitlines(keepends=True)
_cls = next(n for n in ast.parse(_source).body
            if isinstance(n, ast.ClassDef) and n.name == "WanVideoDecode")
decode_source = "".join(_lines[_cls.lineno - 1:_cls.end_lineno])
_fname = "<pinned WanVideoWrapper nodes.py: WanVideoDecode>"
linecache.cache[_fname] = (len(decode_source), None, decode_source.splitlines(keepends=True),
                           _fname)
_cpu = torch.device("cpu")
decode_globals = {"torch": torch, "mm": types.SimpleNamespace(soft_empty_cache=lambda: None),
                  "device": _cpu, "offload_device": _cpu}
exec(compile(decode_source, _fname, "exec"), decode_globals)
PinnedDecode = decode_globals["WanVideoDecode"]
"""


def pack_script(packs: list[str], logger: str, body: str) -> str:
    """A script for ``stack_json`` run in ComfyUI's folder (``cwd=stack.comfy_dir``), with the
    extension's file as its first argument: ComfyUI's modules imported for the CPU without a
    server, ``packs`` (``custom_nodes/<pack>``) loaded as ComfyUI loads custom nodes, the
    extension loaded as ``ext``, the rest of the arguments in ``script_args``, ``logger``'s
    messages collected in ``lines``; then ``body``."""
    header = f"PACKS = {packs!r}\nLOGGER = {logger!r}\n"
    return header + PACK_PREAMBLE + body


def stack_json(
    stack: Stack,
    script: str,
    *args: str | Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 600.0,
) -> Any:
    """``script`` run by the stack's Python (``-c``, with ``args``): it must succeed (else its
    stderr's tail fails the test), and the JSON its last line of output prints is returned."""
    done = subprocess.run(
        [str(stack.python), "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=cwd,
        env=None if env is None else dict(env),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_prompt(url: str, graph: dict[str, Any], timeout_s: float = 300.0) -> dict[str, Any]:
    """Queue ``graph`` on the ComfyUI at ``url`` and return its history entry once completed."""
    prompt_id = str(uuid.uuid4())
    post_json(f"{url}/prompt", {"prompt": graph, "prompt_id": prompt_id})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entry = json.loads(get(f"{url}/history/{prompt_id}")).get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            return entry
        time.sleep(0.2)
    raise TimeoutError(f"the prompt did not finish within {timeout_s:.0f} s")


def cpu_comfy_command(stack: Stack, base: Path, port: int) -> list[str]:
    """ComfyUI's command line on the CPU over the base directory ``base``, on loopback ``port``."""
    cmd = [str(stack.python), "-u", str(stack.comfy_dir / "main.py"), "--cpu"]
    return [*cmd, "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base)]


@contextlib.contextmanager
def cpu_comfy(
    stack: Stack, base: Path, log: Path, env: Mapping[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """ComfyUI on the CPU over ``base`` (output to ``log``, environment ``env`` or this
    process's), ready: its URL and process; stopped when the block ends."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cpu_comfy_command(stack, base, port),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/system_stats", proc, log, STARTUP_TIMEOUT_S)
        yield url, proc
    finally:
        stop_process(proc)


VAE_TILES = {"tile_x": 272, "tile_y": 272, "tile_stride_x": 144, "tile_stride_y": 128}


def wan_vae_loader() -> dict[str, Any]:
    """The graph's VAE loader (node 38's inputs), for the tiny VAE under the same file name."""
    inputs = {"precision": "bf16", "use_cpu_cache": False, "verbose": False}
    inputs["model_name"] = "Wan2_1_VAE_bf16.safetensors"
    return {"class_type": "WanVideoVAELoader", "inputs": inputs}


def wan_encode(image: list[Any], vae: str = "vae") -> dict[str, Any]:
    """WanVideoEncode of ``image`` (a link) by the VAE node ``vae``, untiled."""
    inputs = {"vae": [vae, 0], "image": image, "enable_vae_tiling": False, **VAE_TILES}
    return {"class_type": "WanVideoEncode", "inputs": inputs}


def wan_decode(samples: list[Any], vae: str = "vae") -> dict[str, Any]:
    """WanVideoDecode of ``samples`` (a link) by the VAE node ``vae``, as node 28 decodes."""
    inputs = {"vae": [vae, 0], "samples": samples, "enable_vae_tiling": False, **VAE_TILES}
    return {"class_type": "WanVideoDecode", "inputs": {**inputs, "normalization": "default"}}


def h264_combine(images: list[Any], prefix: str, **extra: Any) -> dict[str, Any]:
    """VHS_VideoCombine of ``images`` (a link) as node 139 encodes (H.264, yuv420p, crf 19, 24
    fps), files named ``prefix``; ``extra`` adds or replaces inputs (an ``audio`` link, the
    ``frame_rate``)."""
    inputs = {
        "images": images,
        "frame_rate": 24,
        "loop_count": 0,
        "filename_prefix": prefix,
        "format": "video/h264-mp4",
        "pix_fmt": "yuv420p",
        "crf": 19,
        "save_metadata": False,
        "trim_to_audio": False,
        "pingpong": False,
        "save_output": True,
    }
    return {"class_type": "VHS_VideoCombine", "inputs": {**inputs, **extra}}


def gradient_clip(frames: int) -> dict[str, Any]:
    """``img`` (``input/gradient.png``) and ``clip``, that image repeated ``frames`` times."""
    return {
        "img": {"class_type": "LoadImage", "inputs": {"image": "gradient.png"}},
        "clip": {
            "class_type": "RepeatImageBatch",
            "inputs": {"image": ["img", 0], "amount": frames},
        },
    }


def vae_round_trip_prompt(frames: int) -> dict[str, Any]:
    """A gradient image repeated into a clip, encoded by the tiny VAE and decoded again, saved
    as PNGs and, encoded once more, as a latent file (float, so any change in the decoded frames
    shows)."""
    return {
        "vae": wan_vae_loader(),
        **gradient_clip(frames),
        "enc": wan_encode(["clip", 0]),
        "dec": wan_decode(["enc", 0]),
        "save": {
            "class_type": "SaveImage",
            "inputs": {"images": ["dec", 0], "filename_prefix": "dec"},
        },
        "enc2": wan_encode(["dec", 0]),
        "lat": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["enc2", 0], "filename_prefix": "latents/dec"},
        },
    }


def serve_on_gradient(
    stack: Stack,
    realstack_base: Path,
    folder: Path,
    packs: set[str],
    prompt: dict[str, Any],
    setting: tuple[str, str | None],
) -> dict[str, Any]:
    """One prompt run by a CPU ComfyUI over a new base in ``folder`` (the ``packs`` named, the
    tiny models of ``realstack_base``, a 64x48 gradient as ``input/gradient.png``), with the
    environment variable ``setting[0]`` set to ``setting[1]`` (or unset for ``None``): the
    history entry, ComfyUI's log, and the bytes of every PNG it wrote as ``dec_*.png`` and every
    latent as ``latents/dec_*.latent``."""
    base = make_base(stack, folder / "comfy", packs=packs)
    (base / "models").symlink_to(realstack_base / "models")
    width, height = 64, 48
    Image.frombytes(
        "RGB",
        (width, height),
        bytes((x * 4 + y) % 256 for y in range(height) for x in range(width) for _ in range(3)),
    ).save(base / "input" / "gradient.png")
    log = folder / "comfyui.log"
    name, value = setting
    env = {k: v for k, v in os.environ.items() if k != name}
    if value is not None:
        env[name] = value
    with cpu_comfy(stack, base, log, env) as (url, _):
        entry = run_prompt(url, prompt, timeout_s=600)
    output = base / "output"
    return {
        "entry": entry,
        "log": log.read_text(errors="replace"),
        "pngs": [p.read_bytes() for p in sorted(output.glob("dec_*.png"))],
        "latent": [p.read_bytes() for p in sorted((output / "latents").glob("dec_*.latent"))],
    }


def cpu_job(media: tuple[Path, Path], **extra: Any) -> dict[str, Any]:
    """The small CPU job with both inputs as base64; ``extra`` overrides any field."""
    return job_input(*media, **{**CPU_JOB, **extra})


def entrypoint_env(stack: Stack, base: Path, comfy_port: int, api_port: int) -> dict[str, str]:
    graph = base / "graph_cpu.json"
    graph.write_text(json.dumps(cpu_graph(json.loads(GRAPH.read_text("utf-8")))), "utf-8")
    db = base / "user" / "comfyui.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "BUCKET_"))}
    env.update(
        PYTHON_BIN=str(stack.python),
        COMFY_DIR=str(base),
        COMFY_MAIN=str(stack.comfy_dir / "main.py"),
        COMFY_HOST=f"127.0.0.1:{comfy_port}",
        COMFY_PID_FILE=str(base / "comfyui.pid"),
        COMFY_LOG_FILE=str(base / "comfyui.log"),
        # the database lives in <ComfyUI>/user by default, like the image's; here in the base
        COMFY_EXTRA_ARGS=f"--cpu --base-directory {base} --database-url sqlite:///{db}",
        COMFY_STARTUP_TIMEOUT_S=str(int(STARTUP_TIMEOUT_S)),
        GPU_PREFLIGHT="0",
        SAGEATTENTION_ENABLED="0",
        POSE_RENDER_DEVICE="cpu",
        SERVE_API_LOCALLY="1",
        RP_API_PORT=str(api_port),
        WORKFLOW_PATH=str(graph),
        VOLUME_MODELS_DIR=str(base / "no-volume"),
        HF_CACHE_DIR=str(base / "no-hf-cache"),
        JOB_TIMEOUT_S="900",
        LOCAL_OUTPUT_DIR=str(base / "saved"),
        PYTHONUNBUFFERED="1",
    )
    return env


@dataclass
class EntrypointWorker:
    shell: subprocess.Popen[bytes]  # entrypoint.sh: PID 1 of the container, the supervisor
    base: Path
    comfy_port: int
    api_url: str
    log: Path
    platform: FakePlatform | None = None

    @property
    def comfy_url(self) -> str:
        return f"http://127.0.0.1:{self.comfy_port}"

    @property
    def comfy_pid(self) -> int:
        return int((self.base / "comfyui.pid").read_text().strip())

    @property
    def handler_pid(self) -> int:
        for pid in children(self.shell.pid):
            with contextlib.suppress(OSError):
                if b"handler.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        pytest.fail("no handler process under entrypoint.sh")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def threads(self) -> dict[str, int]:
        return python_threads(self.handler_pid, self.base)

    def queue(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.comfy_url}/queue", timeout=10) as resp:
            return json.load(resp)

    def comfy_busy(self) -> bool:
        queue = self.queue()
        return bool(queue["queue_running"] or queue["queue_pending"])

    def wait_running(self, box: dict[str, Any] | None = None) -> None:
        """Until ComfyUI runs a prompt (the job's graph is in ComfyUI's hands); fails at once
        when the job already ended (``box`` of ``runsync_async``)."""

        def running() -> bool:
            assert not box or "at" not in box, f"the job ended before it ran: {box}"
            return bool(self.queue()["queue_running"])

        wait_until("ComfyUI runs the job's prompt", running, JOB_S)

    def wait_result(self, job_id: str, timeout_s: float = JOB_S) -> dict[str, Any]:
        assert self.platform is not None
        platform = self.platform

        def answered() -> dict[str, Any] | None:
            assert self.shell.poll() is None or job_id in platform.results, self.log_tail()
            return platform.results.get(job_id)

        return wait_until(f"the platform gets the answer of {job_id}", answered, timeout_s)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def fault_base(stack: Stack, realstack_base: Path, folder: Path) -> Path:
    """A base directory of its own (input, output, packs) on the session's models and text
    cache, so that leftovers here are this worker's alone."""
    base = make_base(stack, folder)
    (base / "models").symlink_to(realstack_base / "models")
    cache = "custom_nodes/ComfyUI-WanVideoWrapper/text_embed_cache"
    if not (base / cache).exists():
        (base / cache).symlink_to(realstack_base / cache)
    return base


def start_worker(stack: Stack, base: Path, **env: str) -> EntrypointWorker:
    comfy_port, api_port = free_port(), free_port()
    full = entrypoint_env(stack, base, comfy_port, api_port)
    full.update(PROGRESS_INTERVAL_S="2", **thread_dump_env(base), **env)
    log = base / "worker.log"
    with open(log, "wb") as out:
        shell = subprocess.Popen(
            ["bash", str(ROOT / "entrypoint.sh")], env=full, stdout=out, stderr=subprocess.STDOUT
        )
    worker = EntrypointWorker(shell, base, comfy_port, f"http://127.0.0.1:{api_port}", log)
    try:
        wait_for(f"{worker.comfy_url}/system_stats", shell, log, STARTUP_TIMEOUT_S)
        wait_until("the handler starts its job loop", lambda: "job loop" in worker.log_text(), 300)
        if full.get("SERVE_API_LOCALLY") == "1":
            wait_for(f"{worker.api_url}/docs", shell, log, 120)
    except BaseException:
        stop_worker(worker)
        raise
    return worker


def stop_worker(worker: EntrypointWorker) -> None:
    comfy = worker.comfy_pid if (worker.base / "comfyui.pid").is_file() else 0
    with contextlib.suppress(ProcessLookupError):
        if comfy:
            os.kill(comfy, signal.SIGCONT)  # a frozen ComfyUI cannot take a SIGTERM
    stop_process(worker.shell)
    for pid in (comfy, *(children(worker.shell.pid) if alive(worker.shell.pid) else [])):
        with contextlib.suppress(ProcessLookupError):
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
