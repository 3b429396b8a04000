"""Worker configuration, read once from the environment.

Contract:
- ``Settings.from_env(env)`` parses a mapping (default ``os.environ``) into a frozen ``Settings``;
  a malformed value raises ``ConfigError`` naming the variable. Nothing else in the package reads
  ``os.environ`` for configuration.
- ``get_settings()`` returns the process-wide instance (parsed on first use).
- Every variable, its default and meaning is listed in ``ENV_DOC``; the settings reference
  ``docs/settings.md`` is generated from it (``python scripts/settings_doc.py --write``) and a
  test fails when the committed file differs from what the script makes. Meanings are markdown
  (``code`` in backticks); ``ENV_DOC_SECTIONS`` groups the variables under headings there (a
  variable in no group is listed under "Other").
- Secrets are ``SecretStr`` and never appear in ``repr``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path

from pydantic import SecretStr

from .errors import ConfigError

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024
STARTUP_TIMEOUT_S = 900.0  # RunPod worker: ComfyUI may load for minutes on a cold start
LOCAL_STARTUP_TIMEOUT_S = 30.0  # local run: ComfyUI is already up, or the user waits in vain
OFF = frozenset({"off", "none", "no", "false", "0"})


def _s(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name)
    return default if value is None or value.strip() == "" else value.strip()


def _number(
    env: Mapping[str, str], name: str, default: float, lo: float, kind: type[int] | type[float]
) -> float:
    """``name`` parsed by ``kind`` (int or float), at least ``lo``; ConfigError naming it."""
    raw = _s(env, name, str(default))
    try:
        value = kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"{name} must be {what}, got {raw!r}.", field=name) from None
    if value < lo:
        raise ConfigError(f"{name} must be at least {lo}, got {value}.", field=name)
    return value


def _int(env: Mapping[str, str], name: str, default: int, lo: int = 0) -> int:
    return int(_number(env, name, default, lo, int))


def _float(env: Mapping[str, str], name: str, default: float, lo: float = 0.0) -> float:
    return _number(env, name, default, lo, float)


def _optional_float(env: Mapping[str, str], name: str, lo: float) -> float | None:
    return None if _s(env, name, "") == "" else _float(env, name, 0.0, lo)


def _optional_int(env: Mapping[str, str], name: str, lo: int) -> int | None:
    return None if _s(env, name, "") == "" else _int(env, name, 0, lo)


def _optional_path(
    resolve: Callable[[str, Path], Path], env: Mapping[str, str], name: str, default: str
) -> Path | None:
    return None if _s(env, name, default).lower() in OFF else resolve(name, Path(default))


TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _s(env, name, "1" if default else "0").lower()
    if raw in TRUE_WORDS:
        return True
    if raw in FALSE_WORDS:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}.", field=name)


# name -> (default shown to users, meaning as markdown). Keep in step with Settings.from_env;
# after a change run `python scripts/settings_doc.py --write` (docs/settings.md).
ENV_DOC: dict[str, tuple[str, str]] = {
    "COMFY_HOST": ("127.0.0.1:8188", "host:port of the local ComfyUI server"),
    "COMFY_DIR": (
        "/comfyui",
        "ComfyUI installation folder; the worker writes job inputs into its `input/` folder "
        "(checked at start: it must be the folder ComfyUI reads)",
    ),
    "COMFY_INPUT_DIR": (
        "$COMFY_DIR/input",
        "ComfyUI input folder; each job gets a sub-folder, removed afterwards",
    ),
    "COMFY_PID_FILE": ("/tmp/comfyui.pid", "PID file written by entrypoint.sh"),
    "COMFY_STARTUP_TIMEOUT_S": (
        "900",
        "how long the worker waits for ComfyUI to answer at start; unset in a local run: "
        f"{LOCAL_STARTUP_TIMEOUT_S:g}",
    ),
    "JOB_TIMEOUT_S": (
        "3600",
        "per-job limit; on overrun ComfyUI is interrupted (a 60-s dance takes about 10 min on an "
        "H200 and an estimated 21–23 min on an RTX 5090)",
    ),
    "COMFY_INTERRUPT_GRACE_S": (
        "60",
        "after a timeout's interrupt, how long the prompt may take to stop before the worker "
        "asks to be replaced (refresh_worker)",
    ),
    "MAX_SECONDS": (
        "60",
        "longest part of the driving clip a job renders, in seconds (frames at the job's fps, "
        "rounded down to 4n+1); a longer clip renders its first part",
    ),
    "MAX_FRAMES": ("", "optional extra cap on rendered frames (rounded down to 4n+1); unset: none"),
    "MAX_CLIP_MEMORY_GB": (
        "48",
        "host memory ComfyUI may spend on frames: frames x width x height x 12 bytes (float32 "
        "RGB) x 4 copies (measured: 1.5 on a GPU host); a job over it is refused before "
        "ComfyUI runs. The default takes 60 s at 416x672 (19 GB) and at 576x1024 (41 GB); "
        "lower it on hosts with less RAM (the worker warns at "
        "start when ComfyUI has less RAM than this: the container's memory limit, or the "
        "host's RAM)",
    ),
    "MAX_IMAGE_BYTES": ("52428800", "largest accepted reference image (URL or base64)"),
    "MAX_VIDEO_BYTES": ("524288000", "largest accepted driving video (URL or base64)"),
    "VOLUME_ROOT": (
        "/runpod-volume",
        "network volume mount; the job fields image_path/video_path read only under it; "
        "off: path inputs refused",
    ),
    "DOWNLOAD_CONNECT_TIMEOUT_S": ("10", "connect timeout for input downloads"),
    "DOWNLOAD_READ_TIMEOUT_S": ("60", "read timeout (between bytes) for input downloads"),
    "DOWNLOAD_RETRIES": ("3", "attempts for connection errors and 5xx answers"),
    "ALLOW_PRIVATE_URLS": (
        "false",
        "allow input URLs on private/loopback addresses (tests only; cloud-metadata addresses "
        "stay refused)",
    ),
    "BUCKET_ENDPOINT_URL": ("", "S3-compatible endpoint; with the two keys it enables URL output"),
    "BUCKET_ACCESS_KEY_ID": ("", "bucket access key id (secret)"),
    "BUCKET_SECRET_ACCESS_KEY": ("", "bucket secret key (secret)"),
    "BUCKET_NAME": ("xicon-dance", "bucket that receives results"),
    "BUCKET_REGION": ("us-east-1", "region used for request signing"),
    "BUCKET_PREFIX": ("results", "key prefix: `<prefix>/<job_id>/<file>.mp4`"),
    "PRESIGN_EXPIRY_S": ("604800", "lifetime of the returned presigned URL"),
    "UPLOAD_TIMEOUT_S": (
        "600",
        "limit for the whole result upload (after `JOB_TIMEOUT_S`); a cancelled job stops its "
        "upload at once",
    ),
    "MAX_BASE64_OUTPUT_BYTES": (
        "7340032",
        "largest inline base64 video (10 MB /run cap)",
    ),
    "DEFAULT_VIDEO": ("assets/default_video.mp4", "driving video used when the job gives none"),
    "WORKFLOW_PATH": ("XiCON_Dance_SCAIL_vFinal.json", "API-format graph template"),
    "SAGEATTENTION_ENABLED": (
        "1",
        "1: attention_mode `sageattn` and ComfyUI's `--use-sage-attention`; 0: `sdpa`",
    ),
    "POSE_RENDER_DEVICE": ("gpu", "taichi device for RenderNLFPoses (gpu, cuda, cpu, vulkan)"),
    "BASE_PRECISION": (
        "auto",
        "WanVideoModelLoader base_precision: `auto` picks from the GPU at start (`fp16_fast` on "
        "GeForce cards, `bf16` elsewhere); or `bf16`, `fp16`, `fp16_fast`, `fp32`",
    ),
    "TORCH_COMPILE": (
        "0",
        "1: the transformer's blocks compiled by `torch.compile` (inductor) on CUDA GPUs; 0: "
        "off. Measured on an H200: 6.9 % less time per window-step (19 s less for 60 s of dance "
        "at overlap 16), but the first job of each ComfyUI process pays the compile, 19-21 s, or "
        "7-9 s when `TORCHINDUCTOR_CACHE_DIR` (torch's own variable) holds the kernels of an "
        "earlier start: point it at the network volume; with `WARMUP=1` the warm-up job pays it "
        "before the worker takes jobs",
    ),
    "RESIDENT_TRANSFORMER": (
        "auto",
        "keep the 16-GB transformer and the 1.2-GB CLIP vision model on the GPU between jobs "
        "(`force_offload` off on the sampler and the CLIP vision encode), so a warm job does not "
        "load them again (H200: 26.6 -> 22.6 s for the default job with the transformer kept; "
        "H100: a further 1 s with CLIP vision kept): "
        "`auto` keeps it on CUDA GPUs of at least 30 GiB (the RTX 5090 and larger), `1` always, "
        "`0` never. A job larger than 60 s at 416x672 (frames x pixels) lets it go after "
        "sampling, so its decode has the memory. It relies on the image's ComfyUI extension "
        "`xicon_resident_weights`; without it the second job would build a second copy of the "
        "weights on the GPU",
    ),
    "PROGRESS_INTERVAL_S": ("1.0", "minimum seconds between progress updates"),
    "LOG_LEVEL": ("INFO", "worker log level"),
    "LOCAL_OUTPUT_DIR": (
        "output",
        "local runs only: folder that receives each result video (relative to the worker "
        "folder, `/worker/output` in the image); `off`: do not save",
    ),
}

# Headings of docs/settings.md and the variables under each, in this order.
ENV_DOC_SECTIONS: dict[str, tuple[str, ...]] = {
    "ComfyUI": (
        "COMFY_HOST",
        "COMFY_DIR",
        "COMFY_INPUT_DIR",
        "COMFY_PID_FILE",
        "COMFY_STARTUP_TIMEOUT_S",
    ),
    "Jobs and limits": (
        "JOB_TIMEOUT_S",
        "COMFY_INTERRUPT_GRACE_S",
        "MAX_SECONDS",
        "MAX_FRAMES",
        "MAX_CLIP_MEMORY_GB",
        "MAX_IMAGE_BYTES",
        "MAX_VIDEO_BYTES",
    ),
    "Input downloads": (
        "DOWNLOAD_CONNECT_TIMEOUT_S",
        "DOWNLOAD_READ_TIMEOUT_S",
        "DOWNLOAD_RETRIES",
        "ALLOW_PRIVATE_URLS",
    ),
    "Result delivery": (
        "BUCKET_ENDPOINT_URL",
        "BUCKET_ACCESS_KEY_ID",
        "BUCKET_SECRET_ACCESS_KEY",
        "BUCKET_NAME",
        "BUCKET_REGION",
        "BUCKET_PREFIX",
        "PRESIGN_EXPIRY_S",
        "UPLOAD_TIMEOUT_S",
        "MAX_BASE64_OUTPUT_BYTES",
    ),
    "Graph and GPU": (
        "DEFAULT_VIDEO",
        "WORKFLOW_PATH",
        "SAGEATTENTION_ENABLED",
        "POSE_RENDER_DEVICE",
        "BASE_PRECISION",
        "TORCH_COMPILE",
        "RESIDENT_TRANSFORMER",
    ),
    "Logs and local runs": ("PROGRESS_INTERVAL_S", "LOG_LEVEL", "LOCAL_OUTPUT_DIR"),
}


@dataclass(frozen=True)
class Settings:
    comfy_host: str = "127.0.0.1:8188"
    comfy_dir: Path = Path("/comfyui")
    comfy_input_dir: Path = Path("/comfyui/input")
    comfy_pid_file: Path = Path("/tmp/comfyui.pid")
    comfy_startup_timeout_s: float | None = None  # None: by mode, see startup_timeout_s()
    job_timeout_s: float = 3600.0
    comfy_interrupt_grace_s: float = 60.0
    max_seconds: float = 60.0
    max_frames: int | None = None
    max_clip_memory_gb: float = 48.0
    max_image_bytes: int = 50 * MB
    max_video_bytes: int = 500 * MB
    volume_root: Path | None = Path("/runpod-volume")
    download_connect_timeout_s: float = 10.0
    download_read_timeout_s: float = 60.0
    download_retries: int = 3
    allow_private_urls: bool = False
    bucket_endpoint_url: str = ""
    bucket_access_key_id: SecretStr = field(default_factory=lambda: SecretStr(""))
    bucket_secret_access_key: SecretStr = field(default_factory=lambda: SecretStr(""))
    bucket_name: str = "xicon-dance"
    bucket_region: str = "us-east-1"
    bucket_prefix: str = "results"
    presign_expiry_s: int = 604800
    upload_timeout_s: float = 600.0
    max_base64_output_bytes: int = 7 * MB
    default_video: Path = PACKAGE_ROOT / "assets" / "default_video.mp4"
    workflow_path: Path = PACKAGE_ROOT / "XiCON_Dance_SCAIL_vFinal.json"
    sageattention_enabled: bool = True
    pose_render_device: str = "gpu"
    base_precision: str = "auto"
    torch_compile: bool = False
    resident_transformer: str = "auto"  # auto, on or off
    progress_interval_s: float = 1.0
    log_level: str = "INFO"
    local_output_dir: Path | None = PACKAGE_ROOT / "output"

    @property
    def comfy_url(self) -> str:
        return f"http://{self.comfy_host}"

    @property
    def bucket_configured(self) -> bool:
        return bool(
            self.bucket_endpoint_url
            and self.bucket_access_key_id.get_secret_value()
            and self.bucket_secret_access_key.get_secret_value()
        )

    def startup_timeout_s(self, local: bool) -> float:
        """COMFY_STARTUP_TIMEOUT_S when set, else 900 s on RunPod and 30 s in a local run."""
        if self.comfy_startup_timeout_s is not None:
            return self.comfy_startup_timeout_s
        return LOCAL_STARTUP_TIMEOUT_S if local else STARTUP_TIMEOUT_S

    @property
    def attention_mode(self) -> str:
        return "sageattn" if self.sageattention_enabled else "sdpa"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        comfy_dir = Path(_s(env, "COMFY_DIR", "/comfyui"))

        def path(name: str, default: Path) -> Path:
            p = Path(_s(env, name, str(default)))
            return p if p.is_absolute() else PACKAGE_ROOT / p

        render_device = _s(env, "POSE_RENDER_DEVICE", "gpu")
        if render_device not in {"gpu", "cuda", "cpu", "vulkan", "opengl", "metal"}:
            raise ConfigError(f"POSE_RENDER_DEVICE {render_device!r} is not a taichi arch.")
        base_precision = _s(env, "BASE_PRECISION", "auto").lower()
        if base_precision not in {"auto", "bf16", "fp16", "fp16_fast", "fp32"}:
            raise ConfigError(
                "BASE_PRECISION must be auto, bf16, fp16, fp16_fast or fp32, "
                f"got {base_precision!r}.",
                field="BASE_PRECISION",
            )
        resident = _s(env, "RESIDENT_TRANSFORMER", "auto").lower()
        if resident in TRUE_WORDS | FALSE_WORDS:
            resident = "on" if resident in TRUE_WORDS else "off"
        elif resident != "auto":
            raise ConfigError(
                f"RESIDENT_TRANSFORMER must be auto, 1 or 0, got {resident!r}.",
                field="RESIDENT_TRANSFORMER",
            )
        return cls(
            comfy_host=_s(env, "COMFY_HOST", "127.0.0.1:8188"),
            comfy_dir=comfy_dir,
            comfy_input_dir=Path(_s(env, "COMFY_INPUT_DIR", str(comfy_dir / "input"))),
            comfy_pid_file=Path(_s(env, "COMFY_PID_FILE", "/tmp/comfyui.pid")),
            comfy_startup_timeout_s=_optional_float(env, "COMFY_STARTUP_TIMEOUT_S", 1.0),
            job_timeout_s=_float(env, "JOB_TIMEOUT_S", 3600.0, 1.0),
            comfy_interrupt_grace_s=_float(env, "COMFY_INTERRUPT_GRACE_S", 60.0, 1.0),
            max_seconds=_float(env, "MAX_SECONDS", 60.0, 0.1),
            max_frames=_optional_int(env, "MAX_FRAMES", 5),
            max_clip_memory_gb=_float(env, "MAX_CLIP_MEMORY_GB", 48.0, 0.1),
            max_image_bytes=_int(env, "MAX_IMAGE_BYTES", 50 * MB, 1),
            max_video_bytes=_int(env, "MAX_VIDEO_BYTES", 500 * MB, 1),
            volume_root=_optional_path(path, env, "VOLUME_ROOT", "/runpod-volume"),
            download_connect_timeout_s=_float(env, "DOWNLOAD_CONNECT_TIMEOUT_S", 10.0, 0.1),
            download_read_timeout_s=_float(env, "DOWNLOAD_READ_TIMEOUT_S", 60.0, 0.1),
            download_retries=_int(env, "DOWNLOAD_RETRIES", 3, 1),
            allow_private_urls=_bool(env, "ALLOW_PRIVATE_URLS", False),
            bucket_endpoint_url=_s(env, "BUCKET_ENDPOINT_URL", ""),
            bucket_access_key_id=SecretStr(_s(env, "BUCKET_ACCESS_KEY_ID", "")),
            bucket_secret_access_key=SecretStr(_s(env, "BUCKET_SECRET_ACCESS_KEY", "")),
            bucket_name=_s(env, "BUCKET_NAME", "xicon-dance"),
            bucket_region=_s(env, "BUCKET_REGION", "us-east-1"),
            bucket_prefix=_s(env, "BUCKET_PREFIX", "results").strip("/"),
            presign_expiry_s=_int(env, "PRESIGN_EXPIRY_S", 604800, 1),
            upload_timeout_s=_float(env, "UPLOAD_TIMEOUT_S", 600.0, 1.0),
            max_base64_output_bytes=_int(env, "MAX_BASE64_OUTPUT_BYTES", 7 * MB, 1),
            default_video=path("DEFAULT_VIDEO", Path("assets/default_video.mp4")),
            workflow_path=path("WORKFLOW_PATH", Path("XiCON_Dance_SCAIL_vFinal.json")),
            sageattention_enabled=_bool(env, "SAGEATTENTION_ENABLED", True),
            pose_render_device=render_device,
            base_precision=base_precision,
            torch_compile=_bool(env, "TORCH_COMPILE", False),
            resident_transformer=resident,
            progress_interval_s=_float(env, "PROGRESS_INTERVAL_S", 1.0, 0.0),
            log_level=_s(env, "LOG_LEVEL", "INFO").upper(),
            local_output_dir=_optional_path(path, env, "LOCAL_OUTPUT_DIR", "output"),
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()


def field_names() -> list[str]:
    return [f.name for f in fields(Settings)]
