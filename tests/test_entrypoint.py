"""entrypoint.sh run for real against stand-ins (a ComfyUI-like main.py, a handler, nvidia-smi and
a fake ``torch`` module), plus shellcheck on every shell script of the repository.

The stand-in main.py logs its argv and environment, then behaves as STANDIN_MODE says: ``ok``
(answers ``/system_stats`` after a short boot), ``die`` (exits 3 during boot), ``sagefail`` (logs
ComfyUI's sage fallback line, then answers), ``hang`` (never answers), ``chatty`` (answers and
prints all the time); ``STANDIN_DIE_FILE`` makes it exit 9 once that file appears. The stand-in
handler records its argv, pid, parent, environment and a received SIGTERM; ``HANDLER_EXIT`` makes
it exit with that code on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil
import pytest

from tests.plugins.comfy import free_port

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "entrypoint.sh"

pytestmark = pytest.mark.slow

MAIN_PY = textwrap.dedent(
    """
    import json, os, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    with open(os.environ["STANDIN_ARGV"], "w") as fh:
        json.dump(sys.argv[1:], fh)
    with open(os.environ["STANDIN_ARGV"] + ".starts", "a") as fh:  # one line per start
        fh.write(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:]}) + "\\n")
    with open(os.environ["STANDIN_ARGV"] + ".env", "w") as fh:
        json.dump(sorted(os.environ), fh)
    mode = os.environ.get("STANDIN_MODE", "ok")
    print("Starting server (stand-in)", flush=True)
    time.sleep(0.5)
    if mode == "die":
        print("Traceback: IMPORT FAILED something fatal", flush=True)
        sys.exit(3)
    if mode == "sagefail":
        print("Error running sage attention: no kernel image, using pytorch attention instead.",
              flush=True)
    if mode == "hang":
        time.sleep(600)
    if mode == "chatty":  # keeps printing like a busy ComfyUI; a failed print is recorded
        import threading
        def chatter():
            n = 0
            while True:
                n += 1
                try:
                    print(f"chatter {n}", flush=True)
                except Exception as exc:
                    with open(os.environ["STANDIN_ARGV"] + ".printerror", "w") as fh:
                        fh.write(repr(exc))
                    return
                time.sleep(0.05)
        threading.Thread(target=chatter, daemon=True).start()
    if os.environ.get("STANDIN_DIE_FILE"):  # dies while serving, once the test says so
        import threading
        def die_later():
            while not os.path.exists(os.environ["STANDIN_DIE_FILE"]):
                time.sleep(0.05)
            print("Killed: out of memory (stand-in)", flush=True)
            os._exit(9)
        threading.Thread(target=die_later, daemon=True).start()
    args = sys.argv[1:]
    host, port = args[args.index("--listen") + 1], int(args[args.index("--port") + 1])

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/system_stats" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")
        def log_message(self, *a):
            pass

    HTTPServer((host, port), H).serve_forever()
    """
)

HANDLER_PY = textwrap.dedent(
    """
    import json, os, signal, sys, time
    out = os.environ["STANDIN_HANDLER"]
    if "--test_input" in sys.argv:  # the warm-up job
        job = json.loads(sys.argv[sys.argv.index("--test_input") + 1])
        with open(out + ".warmup", "w") as fh:
            json.dump({"job": job, "log_level": os.environ.get("RUNPOD_LOG_LEVEL")}, fh)
        if os.environ.get("WARMUP_KILLS_COMFY") == "1":
            with open(os.environ["COMFY_PID_FILE"]) as fh:
                os.kill(int(fh.read()), signal.SIGKILL)
            time.sleep(0.5)
        sys.exit(int(os.environ.get("WARMUP_RC", "0")))
    def on_term(signum, frame):
        with open(out + ".sigterm", "w") as fh:
            fh.write("SIGTERM")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    info = {
        "argv": sys.argv[1:],
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "sage": os.environ.get("SAGEATTENTION_ENABLED"),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("RUNPOD_", "BUCKET_"))},
    }
    with open(out + ".tmp", "w") as fh:
        json.dump(info, fh)
    os.replace(out + ".tmp", out)
    if os.environ.get("HANDLER_EXIT"):
        sys.exit(int(os.environ["HANDLER_EXIT"]))
    while True:
        time.sleep(0.1)
    """
)

NVIDIA_SMI = "#!/bin/sh\necho 'NVIDIA GeForce RTX 3090, 570.86.10, 8.6'\n"

FAKE_TORCH = textwrap.dedent(
    """
    import os
    __version__ = "2.11.0+cu128"
    _cap = tuple(int(x) for x in os.environ.get("FAKE_CAPABILITY", "12.0").split("."))
    class cuda:
        @staticmethod
        def is_available():
            return os.environ.get("FAKE_CUDA", "1") == "1"
        @staticmethod
        def get_device_name(i):
            return "Fake GPU"
        @staticmethod
        def get_device_capability(i):
            return _cap
        @staticmethod
        def get_arch_list():
            return ["sm_80", "sm_86", "sm_89", "sm_90", "sm_120"]
    bfloat16 = "bfloat16"
    class _T:
        def __init__(self, shape=()):
            self.shape = shape
        def __matmul__(self, other):
            return self
        def sum(self):
            return self
        def item(self):
            return 1.0
        def transpose(self, *a):
            return self
        def float(self):
            return self
        def flatten(self):
            return self
    def ones(*a, **k):
        return _T()
    def randn(*a, **k):
        return _T(a[0] if len(a) == 1 else a)
    def manual_seed(seed):
        pass
    class _Cos:
        def item(self):
            return float(os.environ.get("FAKE_SAGE_COS", "0.9999"))
    class nn:
        class functional:
            @staticmethod
            def scaled_dot_product_attention(q, k, v):
                return q
            @staticmethod
            def cosine_similarity(a, b, dim=0):
                return _Cos()
    """
)

# Stand-in SageAttention: FAKE_SAGE=missing -> ImportError, raise -> the kernel raises; the
# agreement with SDPA is FAKE_SAGE_COS (read by the fake torch's cosine_similarity). With
# FAKE_SAGE_AFTER the kernel returns only once that file exists (the stand-in ComfyUI's argv: it
# has started), and raises if it never appears: a self-test run before ComfyUI starts fails.
FAKE_SAGEATTENTION = textwrap.dedent(
    """
    import os, time
    if os.environ.get("FAKE_SAGE") == "missing":
        raise ImportError("No module named 'sageattention._fused'")
    def sageattn(q, k, v, tensor_layout="HND", is_causal=False):
        after = os.environ.get("FAKE_SAGE_AFTER")
        deadline = time.monotonic() + 30
        while after and not os.path.exists(after):
            if time.monotonic() > deadline:
                raise RuntimeError("the self-test ran alone: ComfyUI did not start beside it")
            time.sleep(0.05)
        if os.environ.get("FAKE_SAGE_SHAPE"):
            with open(os.environ["FAKE_SAGE_SHAPE"], "w") as fh:
                fh.write(repr(q.shape))
        if os.environ.get("FAKE_SAGE") == "hang":
            time.sleep(600)
        if os.environ.get("FAKE_SAGE") == "raise":
            raise RuntimeError("CUDA error: no kernel image is available for execution")
        return q
    """
)


@dataclass
class Rig:
    tmp: Path
    env: dict[str, str]

    @property
    def argv_file(self) -> Path:
        return Path(self.env["STANDIN_ARGV"])

    @property
    def handler_file(self) -> Path:
        return Path(self.env["STANDIN_HANDLER"])

    def comfy_argv(self) -> list[str]:
        return json.loads(self.argv_file.read_text())

    def comfy_starts(self) -> list[dict]:
        """Every start of the stand-in ComfyUI: its pid and argv."""
        lines = Path(f"{self.argv_file}.starts").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def start(self, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["bash", str(ENTRYPOINT)],
            env={**self.env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    @contextlib.contextmanager
    def serving(self, **env: str) -> Iterator[subprocess.Popen[str]]:
        """The entrypoint started, once its handler has started; every process of it is
        killed on the way out."""
        proc = self.start(**env)
        try:
            _wait_for(self.handler_file, proc)
            yield proc
        finally:
            _kill_group(proc)

    def serve_until_ready(self, **env: str) -> None:
        """Start the entrypoint, wait until its handler has started, kill it."""
        with self.serving(**env):
            pass

    def run(self, timeout: float = 60, **env: str) -> tuple[int, str]:
        proc = self.start(**env)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            _kill_group(proc)
        assert proc.stdout is not None
        return rc, proc.stdout.read()


def _stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGTERM the entrypoint's process (the handler after exec); return its rc and all output."""
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=15)
    _kill_group(proc)  # the stand-in ComfyUI and the log reader keep stdout open
    assert proc.stdout is not None
    return rc, proc.stdout.read()


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    (tmp_path / "main.py").write_text(MAIN_PY)
    (tmp_path / "handler.py").write_text(HANDLER_PY)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi"
    smi.write_text(NVIDIA_SMI)
    smi.chmod(0o755)
    fake = tmp_path / "fakepkgs"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(FAKE_TORCH)
    (fake / "sageattention").mkdir()
    (fake / "sageattention" / "__init__.py").write_text(FAKE_SAGEATTENTION)
    env = {
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "PYTHON_BIN": sys.executable,
        "COMFY_MAIN": str(tmp_path / "main.py"),
        "HANDLER": str(tmp_path / "handler.py"),
        "WORKER_DIR": str(ROOT),
        "COMFY_DIR": str(tmp_path / "comfy"),
        "COMFY_HOST": f"127.0.0.1:{free_port()}",
        "COMFY_PID_FILE": str(tmp_path / "comfy.pid"),
        "COMFY_LOG_FILE": str(tmp_path / "comfy.log"),
        "COMFY_STARTUP_TIMEOUT_S": "30",
        "VOLUME_MODELS_DIR": str(tmp_path / "no-volume"),
        "HF_CACHE_DIR": str(tmp_path / "no-cache"),
        "GPU_PREFLIGHT": "0",
        "SAGE_SELF_TEST": "0",  # the tests of the self-test turn it on, with the fakes
        "STANDIN_ARGV": str(tmp_path / "argv.json"),
        "STANDIN_HANDLER": str(tmp_path / "handler.json"),
        "PYTHONPATH": str(ROOT),
    }
    return Rig(tmp_path, env)


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"entrypoint exited early: {proc.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} never appeared")
        time.sleep(0.1)


def test_ready_then_handler_gets_sigterm(rig: Rig) -> None:
    """The entrypoint stays PID 1 as a supervisor: the handler is its child, SIGTERM is passed on,
    and once the handler exits ComfyUI is stopped and reaped; the exit status is the handler's."""
    with rig.serving() as proc:
        info = json.loads(rig.handler_file.read_text())
        assert info["ppid"] == proc.pid and info["pid"] != proc.pid
        assert info["argv"] == []
        argv = rig.comfy_argv()
        for flag in ("--disable-auto-launch", "--disable-metadata", "--log-stdout"):
            assert flag in argv
        assert "--use-sage-attention" in argv
        host, port = rig.env["COMFY_HOST"].split(":")
        assert argv[argv.index("--listen") + 1] == host and argv[argv.index("--port") + 1] == port
        comfy_pid = int(Path(rig.env["COMFY_PID_FILE"]).read_text())
        assert _alive(comfy_pid)
        rc, out = _stop(proc)
        assert (rig.tmp / "handler.json.sigterm").read_text() == "SIGTERM"
        assert rc == 0
        assert "ComfyUI ready" in out and "passing it to the handler" in out
        assert "handler exited with code 0; stopping ComfyUI" in out
        assert not _alive(comfy_pid), "ComfyUI must be stopped (and reaped) with the handler"


def test_handler_exit_stops_comfy_and_passes_its_status(rig: Rig) -> None:
    rc, out = rig.run(HANDLER_EXIT="3")
    comfy_pid = int(Path(rig.env["COMFY_PID_FILE"]).read_text())
    assert rc == 3, out
    assert "handler exited with code 3; stopping ComfyUI" in out
    assert not _alive(comfy_pid)


def test_comfy_dying_while_serving_stops_the_handler(rig: Rig) -> None:
    """ComfyUI gone means no job can succeed: the handler is stopped, the worker exits 1 with
    ComfyUI's last lines, and the platform starts a fresh one."""
    die_file = rig.tmp / "die-now"
    with rig.serving(STANDIN_DIE_FILE=str(die_file)) as proc:
        die_file.write_text("x")
        rc = proc.wait(timeout=20)
    assert proc.stdout is not None
    out = proc.stdout.read()
    assert rc == 1, out
    assert "ComfyUI exited with code 9 while serving" in out
    assert "Killed: out of memory (stand-in)" in out  # the log tail
    assert (rig.tmp / "handler.json.sigterm").read_text() == "SIGTERM"


def test_handler_environment_keeps_the_sdk_off_the_gpu(rig: Rig) -> None:
    """The SDK's automatic system checks import torch and allocate on the GPU in the handler
    process (a second CUDA context beside the model); the entrypoint turns them off and sets the
    SDK's log level, unless the operator set them."""
    rig.serve_until_ready()
    env = json.loads(rig.handler_file.read_text())["env"]
    assert env["RUNPOD_SKIP_AUTO_SYSTEM_CHECKS"] == "true"
    assert env["RUNPOD_LOG_LEVEL"] == "INFO"
    rig.handler_file.unlink()
    rig.serve_until_ready(RUNPOD_LOG_LEVEL="DEBUG")
    assert json.loads(rig.handler_file.read_text())["env"]["RUNPOD_LOG_LEVEL"] == "DEBUG"


def test_sageattention_disabled_drops_the_flag(rig: Rig) -> None:
    with rig.serving(SAGEATTENTION_ENABLED="0"):
        assert "--use-sage-attention" not in rig.comfy_argv()
        assert "--disable-metadata" in rig.comfy_argv()


@pytest.mark.parametrize(("port", "expect"), [(None, "8000"), ("8123", "8123")])
def test_serve_api_locally_adds_sdk_flags(rig: Rig, port: str | None, expect: str) -> None:
    with rig.serving(SERVE_API_LOCALLY="true", **({"RP_API_PORT": port} if port else {})):
        argv = json.loads(rig.handler_file.read_text())["argv"]
        assert argv == ["--rp_serve_api", "--rp_api_host", "0.0.0.0", "--rp_api_port", expect]


def test_bad_api_port_is_refused(rig: Rig) -> None:
    rc, out = rig.run(SERVE_API_LOCALLY="true", RP_API_PORT="80a", timeout=20)
    assert rc != 0 and "RP_API_PORT must be a port number (1-65535), got '80a'" in out


def test_comfy_dying_during_boot_fails_loudly(rig: Rig) -> None:
    rc, out = rig.run(STANDIN_MODE="die")
    assert rc != 0
    assert "ComfyUI exited with code 3 during startup" in out
    assert "IMPORT FAILED something fatal" in out  # the log tail is shown
    assert not rig.handler_file.exists()


def test_startup_deadline(rig: Rig) -> None:
    rc, out = rig.run(STANDIN_MODE="hang", COMFY_STARTUP_TIMEOUT_S="2")
    assert rc != 0
    assert "did not answer" in out and "within 2 s" in out
    assert not rig.handler_file.exists()


def test_sage_fallback_warning(rig: Rig) -> None:
    with rig.serving(STANDIN_MODE="sagefail") as proc:
        _, out = _stop(proc)
        assert "WARNING: SAGEATTENTION FALLBACK" in out
        assert "Error running sage attention" in Path(rig.env["COMFY_LOG_FILE"]).read_text()


def test_gpu_preflight_arch_not_in_image(rig: Rig) -> None:
    env = {
        "GPU_PREFLIGHT": "1",
        "IMAGE_CUDA_ARCH_LIST": "12.0",
        "FAKE_CAPABILITY": "8.6",
        "PYTHONPATH": str(rig.tmp / "fakepkgs"),
    }
    rc, out = rig.run(**env)
    assert rc != 0
    assert "RTX 3090" in out  # nvidia-smi's line is logged
    assert "compute capability 8.6" in out and "built for 12.0" in out
    assert "TORCH_CUDA_ARCH_LIST" in out
    assert "GPU preflight failed (exit 3)" in out
    assert not rig.argv_file.exists(), "ComfyUI must not start on an unfit GPU"


def test_gpu_preflight_passes_for_a_listed_arch(rig: Rig) -> None:
    env = {
        "GPU_PREFLIGHT": "1",
        "IMAGE_CUDA_ARCH_LIST": "8.9;9.0;12.0",
        "FAKE_CAPABILITY": "12.0",
    }
    with rig.serving(**env, PYTHONPATH=f"{rig.tmp / 'fakepkgs'}{os.pathsep}{ROOT}") as proc:
        _, out = _stop(proc)
    assert "GPU PREFLIGHT: ok, Fake GPU, capability 12.0" in out
    assert "GPU preflight failed" not in out and rig.argv_file.exists()


@pytest.mark.parametrize(
    ("fake", "expect_sage"),
    [
        ({"FAKE_SAGE_COS": "0.9993"}, True),
        ({"FAKE_SAGE_COS": "-0.00004"}, False),  # tag v2.2.0 on sm90: an uninitialised buffer
        ({"FAKE_SAGE_COS": "nan"}, False),
        ({"FAKE_SAGE": "raise"}, False),
        ({"FAKE_SAGE": "missing"}, False),
        ({"FAKE_SAGE": "hang", "SAGE_SELF_TEST_TIMEOUT_S": "1"}, False),
    ],
    ids=["agrees", "garbage", "nan", "raises", "missing", "overruns"],
)
@pytest.mark.parametrize("preflight", ["1", "0"], ids=["preflight", "no-preflight"])
def test_sage_self_test_falls_back_to_sdpa_when_sage_is_wrong(
    rig: Rig, fake: dict[str, str], expect_sage: bool, preflight: str
) -> None:
    """The self-test runs whether or not GPU_PREFLIGHT is on, at the job's attention shape, beside
    ComfyUI's start (its kernel returns only once ComfyUI has started); when it fails, ComfyUI is
    started again without --use-sage-attention before the handler starts."""
    env = {"GPU_PREFLIGHT": preflight, "IMAGE_CUDA_ARCH_LIST": "9.0;12.0", "FAKE_CAPABILITY": "9.0"}
    shape = rig.tmp / "sage_shape.txt"
    with rig.serving(
        **env,
        **fake,
        SAGE_SELF_TEST="1",
        FAKE_SAGE_SHAPE=str(shape),
        FAKE_SAGE_AFTER=str(rig.argv_file),
        PYTHONPATH=f"{rig.tmp / 'fakepkgs'}{os.pathsep}{ROOT}",
    ) as proc:
        starts = rig.comfy_starts()
        alive = [_alive(start["pid"]) for start in starts]
        _, out = _stop(proc)
    handler = json.loads(rig.handler_file.read_text())
    assert ("--use-sage-attention" in rig.comfy_argv()) is expect_sage
    assert handler["sage"] == (None if expect_sage else "0")
    assert ("SAGEATTENTION SELF-TEST FAILED" in out) is not expect_sage
    assert "SageAttention self-test started beside ComfyUI's start" in out
    assert "--use-sage-attention" in starts[0]["argv"]  # started before the result was known
    if expect_sage:
        assert len(starts) == 1 and alive == [True]
        assert "sageattn agrees with PyTorch attention (cosine 0.99930)" in out
        assert "at 29757 tokens x 40 heads x 128" in out
        assert "restarting ComfyUI" not in out
    else:  # the first ComfyUI stopped, the second serves without sage; one log for both
        assert len(starts) == 2 and alive == [False, True], (starts, alive)
        assert "--use-sage-attention" not in starts[1]["argv"]
        assert "restarting ComfyUI without --use-sage-attention" in out
        log = Path(rig.env["COMFY_LOG_FILE"]).read_text()
        assert log.count("Starting server (stand-in)") == 2
    if fake.get("FAKE_SAGE") != "missing":
        assert shape.read_text() == "(1, 29757, 40, 128)"  # NHD at the job's shape
    if fake.get("FAKE_SAGE") == "hang":
        assert "ran past SAGE_SELF_TEST_TIMEOUT_S (1 s)" in out


def test_sage_self_test_skipped_when_sage_is_off(rig: Rig) -> None:
    env = {"GPU_PREFLIGHT": "1", "FAKE_CAPABILITY": "9.0", "SAGEATTENTION_ENABLED": "0"}
    with rig.serving(
        **env,
        SAGE_SELF_TEST="1",
        FAKE_SAGE="missing",
        PYTHONPATH=f"{rig.tmp / 'fakepkgs'}{os.pathsep}{ROOT}",
    ) as proc:
        _, out = _stop(proc)
    assert "SELF-TEST" not in out and "sageattn" not in out


def test_gpu_preflight_without_cuda(rig: Rig) -> None:
    rc, out = rig.run(GPU_PREFLIGHT="1", FAKE_CUDA="0", PYTHONPATH=str(rig.tmp / "fakepkgs"))
    assert rc != 0 and "torch sees no CUDA device" in out


def test_gpu_preflight_without_driver(rig: Rig) -> None:
    (rig.tmp / "bin" / "nvidia-smi").unlink()
    if shutil.which("nvidia-smi", path=os.environ["PATH"]):
        pytest.skip("this machine has a real nvidia-smi")
    rc, out = rig.run(GPU_PREFLIGHT="1")
    assert rc != 0 and "nvidia-smi not found" in out


def test_shellcheck_clean_on_every_shell_script() -> None:
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    scripts = [
        p
        for p in ROOT.rglob("*.sh")
        if not any(
            part.startswith(".") or part in {"node_modules"} for part in p.parts[len(ROOT.parts) :]
        )
    ]
    assert ENTRYPOINT in scripts
    proc = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_models_linked_from_runpod_cache(rig: Rig) -> None:
    vae = next(
        m for m in json.loads((ROOT / "model_manifest.json").read_text())["models"]
        if m["folder"] == "vae"
    )  # fmt: skip
    src = vae["source"]
    snap = (
        rig.tmp / "hfcache" / ("models--" + src["repo"].replace("/", "--")) / "snapshots"
        / src["revision"] / src["path"]
    )  # fmt: skip
    snap.parent.mkdir(parents=True)
    snap.write_bytes(b"cached weights")
    models = rig.tmp / "models"
    rig.serve_until_ready(HF_CACHE_DIR=str(rig.tmp / "hfcache"), MODELS_DIR=str(models))
    linked = models / "vae" / vae["filename"]
    assert linked.is_symlink() and linked.read_bytes() == b"cached weights"


def test_model_download_at_start_fills_the_volume(rig: Rig, http_server) -> None:
    body = b"tiny model file" * 100
    url = http_server.serve("/nlf.torchscript", body)
    manifest = rig.tmp / "manifest.json"
    entry = {
        "name": "tiny",
        "folder": "nlf",
        "filename": "tiny.torchscript",
        "source": {"type": "url", "url": url},
        "size": len(body),
        "sha256": None,
    }
    manifest.write_text(json.dumps({"models": [entry]}))
    volume = rig.tmp / "volume-models"
    volume.mkdir()
    env = {
        "MODEL_DOWNLOAD_AT_START": "1",
        "MODEL_MANIFEST": str(manifest),
        "VOLUME_MODELS_DIR": str(volume),
    }
    rig.serve_until_ready(**env)
    assert (volume / "nlf" / "tiny.torchscript").read_bytes() == body


def test_failed_model_download_stops_the_start(rig: Rig, tmp_path: Path) -> None:
    manifest = tmp_path / "bad.json"
    manifest.write_text(json.dumps({"models": []}))
    rc, out = rig.run(MODEL_DOWNLOAD_AT_START="1", MODEL_MANIFEST=str(manifest))
    assert rc != 0 and "model download failed" in out
    assert not rig.argv_file.exists()


def test_sigterm_during_start_stops_comfy_at_once(rig: Rig) -> None:
    """Until the handler is exec'd the shell is PID 1: it must act on SIGTERM, not ignore it."""
    proc = rig.start(STANDIN_MODE="hang", COMFY_STARTUP_TIMEOUT_S="60")
    try:
        _wait_for(Path(rig.env["COMFY_PID_FILE"]), proc)
        _wait_for(rig.argv_file, proc)
        comfy_pid = int(Path(rig.env["COMFY_PID_FILE"]).read_text())
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        assert rc == 143 and time.monotonic() - t0 < 5
        deadline = time.monotonic() + 5
        while _alive(comfy_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(comfy_pid), "ComfyUI must be stopped with the entrypoint"
    finally:
        _kill_group(proc)
    assert proc.stdout is not None
    assert "received SIGTERM during start-up" in proc.stdout.read()
    assert not rig.handler_file.exists()


def test_sigterm_during_start_stops_the_self_test_too(rig: Rig) -> None:
    """The self-test runs in the background beside ComfyUI's start (under ``timeout``, in a
    process group of its own): a SIGTERM then stops it with ComfyUI."""
    proc = rig.start(
        STANDIN_MODE="hang",
        COMFY_STARTUP_TIMEOUT_S="60",
        SAGE_SELF_TEST="1",
        FAKE_SAGE="hang",
        PYTHONPATH=f"{rig.tmp / 'fakepkgs'}{os.pathsep}{ROOT}",
    )
    try:
        _wait_for(rig.argv_file, proc)
        deadline = time.monotonic() + 20
        tests: list[psutil.Process] = []
        while not tests and time.monotonic() < deadline:
            tests = [
                p
                for p in psutil.Process(proc.pid).children(recursive=True)
                if "--sage-self-test" in " ".join(p.cmdline())
            ]
            time.sleep(0.1)
        assert tests, "the self-test must be running beside ComfyUI's start"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 143
        _, alive = psutil.wait_procs(tests, timeout=10)
        assert not alive, f"the self-test outlived the entrypoint: {alive}"
    finally:
        _kill_group(proc)
    assert proc.stdout is not None
    assert "received SIGTERM during start-up" in proc.stdout.read()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_bad_startup_timeout_is_refused(rig: Rig) -> None:
    rc, out = rig.run(COMFY_STARTUP_TIMEOUT_S="15m", timeout=20)
    assert rc != 0 and "COMFY_STARTUP_TIMEOUT_S must be a number of seconds, got '15m'" in out
    assert not rig.argv_file.exists()


def test_log_reader_survives_a_lost_log_file(rig: Rig) -> None:
    """A log write error must not kill the reader, or ComfyUI's prints would hit a closed pipe."""
    logdir = rig.tmp / "logs"
    logdir.mkdir()
    printerror = rig.tmp / "argv.json.printerror"
    with rig.serving(STANDIN_MODE="chatty", COMFY_LOG_FILE=str(logdir / "comfy.log")) as proc:
        shown = _LineCollector(proc)
        shutil.rmtree(logdir)  # every later append to the log file fails
        removed_at = len(shown.lines)
        # the reader keeps passing ComfyUI's lines on: 20 more after the removal (a dead reader
        # passes none, and the stand-in's next print fails)
        deadline = time.monotonic() + 30
        while sum("chatter" in line for line in shown.lines[removed_at:]) < 20:
            assert not printerror.exists(), printerror.read_text()
            assert time.monotonic() < deadline, f"the reader stopped: {shown.lines[-5:]}"
            time.sleep(0.05)
        assert not printerror.exists(), printerror.read_text()
        assert not logdir.exists()


class _LineCollector:
    """The lines of ``proc``'s stdout, read in a thread as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stdout is not None
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, stdout: IO[str]) -> None:
        for line in stdout:
            self.lines.append(line)


def _warmup_job(rig: Rig, body: str = "x") -> Path:
    job = rig.tmp / "warmup.json"
    job.write_text(
        json.dumps({"input": {"image_url": "https://example.invalid/a.png", "pad": body}})
    )
    return job


def test_warmup_runs_one_job_then_serves(rig: Rig) -> None:
    job = _warmup_job(rig)
    rig.serve_until_ready(WARMUP="1", WARMUP_INPUT=str(job))
    warm = json.loads(Path(str(rig.handler_file) + ".warmup").read_text())
    assert warm["job"] == json.loads(job.read_text())
    assert warm["log_level"] == "WARN"  # the SDK must not log the whole result (a base64 video)
    assert json.loads(rig.handler_file.read_text())["argv"] == []


def test_failed_warmup_with_live_comfy_still_serves(rig: Rig) -> None:
    with rig.serving(WARMUP="1", WARMUP_INPUT=str(_warmup_job(rig)), WARMUP_RC="1") as proc:
        _, out = _stop(proc)
    assert "warm-up job failed; serving anyway" in out


def test_warmup_that_kills_comfy_stops_the_start(rig: Rig) -> None:
    env = {"WARMUP": "1", "WARMUP_INPUT": str(_warmup_job(rig)), "WARMUP_RC": "1"}
    rc, out = rig.run(WARMUP_KILLS_COMFY="1", **env)
    assert rc != 0 and "ComfyUI exited during the warm-up job" in out
    assert not rig.handler_file.exists()


def test_oversized_warmup_input_is_skipped_with_a_reason(rig: Rig) -> None:
    job = _warmup_job(rig, body="x" * 140_000)
    with rig.serving(WARMUP="1", WARMUP_INPUT=str(job)) as proc:
        _, out = _stop(proc)
    assert "warm-up skipped" in out and "image_url/video_url" in out
    assert not Path(str(rig.handler_file) + ".warmup").exists()


# ------------------------------------------------------------------ ComfyUI's log, address, env


def test_comfy_log_is_rotated_past_its_cap(rig: Rig) -> None:
    log_file = Path(rig.env["COMFY_LOG_FILE"])
    rotated = Path(str(log_file) + ".1")
    with rig.serving(STANDIN_MODE="chatty", COMFY_LOG_MAX_BYTES="400"):
        deadline = time.monotonic() + 20
        while _last_chatter(rotated) <= 20:  # rotated more than once
            assert time.monotonic() < deadline, "the log was never rotated"
            time.sleep(0.05)
        for path in (log_file, rotated):
            size = _size_when_present(path)
            assert size <= 400 + 40, (path, size)


def _size_when_present(path: Path, timeout_s: float = 10.0) -> int:
    """The file's size; between a rotation's rename and the next line the log file is briefly
    absent (the chatty stand-in writes every 50 ms), so absence is waited out, not failed."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            assert time.monotonic() < deadline, f"{path} did not come back after a rotation"
            time.sleep(0.01)


def _last_chatter(path: Path) -> int:
    try:
        lines = path.read_text().split("chatter ")
    except FileNotFoundError:  # not written yet, or renamed by a rotation this instant
        return 0
    return int(lines[-1].split()[0]) if len(lines) > 1 else 0


def test_comfy_listens_on_loopback_only(rig: Rig) -> None:
    """From the entrypoint's real command line: ComfyUI (no authentication) is bound to
    127.0.0.1 and nothing else; it is not reachable on this machine's other addresses."""
    with rig.serving():
        comfy_pid = int(Path(rig.env["COMFY_PID_FILE"]).read_text())
        argv = rig.comfy_argv()
        assert argv.count("--listen") == 1 and argv[argv.index("--listen") + 1] == "127.0.0.1"
        port = int(rig.env["COMFY_HOST"].rsplit(":", 1)[1])
        listening = [
            c.laddr
            for c in psutil.Process(comfy_pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
        for address in _other_local_addresses():
            with socket.socket() as s, pytest.raises(OSError):
                s.settimeout(2)
                s.connect((address, port))


def _other_local_addresses() -> list[str]:
    return [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"COMFY_HOST": "0.0.0.0:8188"}, "COMFY_HOST must be 127.0.0.1:<port> or localhost:<port>"),
        ({"COMFY_EXTRA_ARGS": "--reserve-vram 1 --listen 0.0.0.0"}, "may not set --listen"),
        ({"COMFY_HOST": "127.0.0.1"}, "COMFY_HOST needs a port"),
    ],
    ids=["all-interfaces", "extra-args", "no-port"],
)
def test_comfy_beyond_loopback_is_refused(rig: Rig, env: dict[str, str], reason: str) -> None:
    rc, out = rig.run(timeout=20, **env)
    assert rc != 0 and reason in out
    assert not rig.argv_file.exists(), "ComfyUI must not start"


def test_comfy_does_not_get_the_worker_secrets(rig: Rig) -> None:
    secrets = {
        "BUCKET_ACCESS_KEY_ID": "AKIDSECRET1",
        "BUCKET_SECRET_ACCESS_KEY": "bucket-secret-2",
        "RUNPOD_AI_API_KEY": "rp-secret-3",
    }
    rig.serve_until_ready(**secrets)
    comfy_env = json.loads(Path(str(rig.argv_file) + ".env").read_text())
    assert not set(secrets) & set(comfy_env)
    handler_env = json.loads(rig.handler_file.read_text())["env"]
    assert all(handler_env[name] == value for name, value in secrets.items())


# ------------------------------------------------------------------ the SDK's fitness checks

FITNESS_HANDLER_PY = textwrap.dedent(
    """
    import asyncio, json, os
    from runpod.serverless.modules import rp_fitness
    asyncio.run(rp_fitness.run_fitness_checks())  # what the SDK's run_worker does first
    with open(os.environ["STANDIN_HANDLER"] + ".tmp", "w") as fh:
        json.dump({"ppid": os.getppid()}, fh)
    os.replace(os.environ["STANDIN_HANDLER"] + ".tmp", os.environ["STANDIN_HANDLER"])
    """
)

# nvidia-smi as the SDK probes it: "NVIDIA-SMI" in the banner, one line per GPU for --list-gpus.
SDK_NVIDIA_SMI = (
    "#!/bin/sh\n"
    'if [ "$1" = "--list-gpus" ]; then echo "GPU 0: Fake GPU (UUID: GPU-0)"; exit 0; fi\n'
    'echo "| NVIDIA-SMI 570.86.10    Driver Version: 570.86.10    CUDA Version: 12.8 |"\n'
)

TRACING_TORCH = textwrap.dedent(
    """
    import os
    def _touch(what):
        with open(os.environ["TORCH_TRACE"], "a") as fh:
            fh.write(what + "\\n")
    class _Props:
        total_memory = 32 * 2**30
    class cuda:
        is_available = staticmethod(lambda: True)
        device_count = staticmethod(lambda: 1)
        reset_peak_memory_stats = staticmethod(lambda *a: _touch("reset_peak_memory_stats"))
        synchronize = staticmethod(lambda *a: _touch("synchronize"))
        get_device_properties = staticmethod(lambda i: _Props())
    def zeros(*a, device=None, **k):
        _touch(f"zeros on {device}")
    def randn(*a, device=None, **k):
        _touch(f"randn on {device}")
    def matmul(a, b):
        _touch("matmul")
    """
)


@pytest.fixture
def sdk_rig(rig: Rig) -> Rig:
    (rig.tmp / "handler.py").write_text(FITNESS_HANDLER_PY)
    smi = rig.tmp / "bin" / "nvidia-smi"
    smi.write_text(SDK_NVIDIA_SMI)
    smi.chmod(0o755)
    torch_dir = rig.tmp / "tracing" / "torch"
    torch_dir.mkdir(parents=True)
    (torch_dir / "__init__.py").write_text(TRACING_TORCH)
    rig.env["PYTHONPATH"] = f"{rig.tmp / 'tracing'}{os.pathsep}{ROOT}"
    rig.env["TORCH_TRACE"] = str(rig.tmp / "torch_trace.txt")
    return rig


def test_sdk_fitness_checks_touch_the_gpu_without_the_entrypoint(sdk_rig: Rig) -> None:
    """Control: the SDK's CUDA checks (registered when nvidia-smi answers) import torch and
    allocate on the GPU in the calling process."""
    code = (
        "import asyncio; from runpod.serverless.modules import rp_system_fitness as f; "
        "asyncio.run(f._check_cuda_initialization()); asyncio.run(f._check_gpu_compute_benchmark())"
    )
    env = {**sdk_rig.env, "RUNPOD_LOG_LEVEL": "ERROR"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    trace = Path(sdk_rig.env["TORCH_TRACE"]).read_text()
    assert "zeros on cuda:0" in trace and "randn on cuda" in trace


def test_handler_started_by_the_entrypoint_runs_no_torch_fitness_check(sdk_rig: Rig) -> None:
    """The same SDK start-up, run as the entrypoint's handler: the SDK's own GPU check (its
    gpu_test binary or nvidia-smi, in a separate process) still runs; torch is never touched."""
    proc = sdk_rig.start()
    try:
        _wait_for(sdk_rig.handler_file, proc)
        assert json.loads(sdk_rig.handler_file.read_text())["ppid"] == proc.pid
    finally:
        _kill_group(proc)
    assert not Path(sdk_rig.env["TORCH_TRACE"]).exists()
