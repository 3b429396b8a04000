"""A corpus of hostile job inputs, as data, for the schema/media tests and the whole-worker tests.

Each ``HostileCase`` is ``(id, make_input, field, code, settings)``:
- ``make_input(env: HostileEnv) -> object`` builds the job input; it may script routes on
  ``env.server`` (the ``http_server`` fixture) and write files under ``env.workdir``. Every case
  has exactly one problem; the other media (when needed) are good.
- ``field`` / ``code``: the expected ``InputError`` field and code.
- ``settings``: overrides for ``Settings`` fields, applied over ``BASE_SETTINGS`` with
  ``case_settings(case, settings)``. URL cases that reach the local server run with
  ``allow_private_urls=True``; the SSRF cases set it to False.
Use attribute access (``case.id`` ...): the tuple has five members.
``good_job_input(env)`` is a valid job (base64 image and video) to run right after a hostile one.
``HostileEnv`` also sets a small default video; point ``settings.default_video`` at
``env.default_video`` when a case leaves the video out.
``env.volume`` stands in for the endpoint's network volume: set ``settings.volume_root`` to it
BEFORE ``case_settings`` (a case may turn path inputs off with ``volume_root=None``). The path
cases place files, links, FIFOs and sockets there and beside it (``env.outside``).
"""

from __future__ import annotations

import base64
import dataclasses
import os
import socket
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from tests.plugins.http_server import HttpServer
from tests.plugins.media_factory import (
    make_audio_only,
    make_image,
    make_png_bomb,
    make_text,
    make_truncated,
    make_video,
)
from xicon_dance.settings import Settings

BASE_SETTINGS: dict[str, Any] = {
    "allow_private_urls": True,
    "download_retries": 2,
    "download_connect_timeout_s": 2.0,
    "download_read_timeout_s": 2.0,
    "bucket_endpoint_url": "",
}
NO_PRIVATE = {"allow_private_urls": False}


@dataclasses.dataclass
class HostileEnv:
    """What the factories need: the scripted HTTP server and a scratch folder."""

    server: HttpServer
    workdir: Path

    def file(self, name: str) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self.workdir / name

    @cached_property
    def image_png(self) -> Path:
        return make_image(self.file("good.png"), 96, 160, "PNG")

    @cached_property
    def video_mp4(self) -> Path:
        return make_video(self.file("good.mp4"), 64, 64, 8, 9, audio=True)

    @cached_property
    def default_video(self) -> Path:
        return make_video(self.file("default.mp4"), 64, 64, 8, 9, audio=False)

    @cached_property
    def volume(self) -> Path:
        """The stand-in network volume (``settings.volume_root``)."""
        path = self.file("volume")
        path.mkdir(exist_ok=True)
        return path

    @cached_property
    def outside(self) -> Path:
        """A folder beside the volume holding a good image (what an escape would reach)."""
        path = self.file("outside")
        path.mkdir(exist_ok=True)
        make_image(path / "private.png", 96, 160, "PNG")
        return path

    def on_volume(self, name: str, data: bytes) -> str:
        """Write ``data`` to ``<volume>/<name>``; returns ``name`` (the relative job value)."""
        target = self.volume / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return name

    def good_image_b64(self) -> str:
        return b64(self.image_png.read_bytes())

    def good_video_b64(self) -> str:
        return b64(self.video_mp4.read_bytes())


class HostileCase(NamedTuple):
    id: str
    make_input: Callable[[HostileEnv], object]
    field: str
    code: str
    settings: dict[str, Any] = {}  # noqa: RUF012 - read-only by convention


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def case_settings(case: HostileCase, settings: Settings) -> Settings:
    """``settings`` with ``BASE_SETTINGS`` and the case's overrides applied."""
    return dataclasses.replace(settings, **{**BASE_SETTINGS, **case.settings})


def good_job_input(env: HostileEnv) -> dict[str, Any]:
    return {
        "image_base64": env.good_image_b64(),
        "video_base64": env.good_video_b64(),
        "max_frames": 9,
        "steps": 2,
    }


# ---------------------------------------------------------------- helpers for the factories


def _img(env: HostileEnv, **extra: Any) -> dict[str, Any]:
    """A job with a good base64 image plus ``extra``."""
    return {"image_base64": env.good_image_b64(), **extra}


def _img_url(env: HostileEnv, url: str, **extra: Any) -> dict[str, Any]:
    return {"image_url": url, **extra}


def _video_b64(env: HostileEnv, data: bytes) -> dict[str, Any]:
    return _img(env, video_base64=b64(data))


def _served_image(env: HostileEnv, path: str, body: bytes) -> dict[str, Any]:
    return _img_url(env, env.server.serve(path, body))


def _tiny_image(env: HostileEnv) -> bytes:
    return make_image(env.file("tiny.png"), 4, 4, "PNG").read_bytes()


def _ico_image(env: HostileEnv) -> bytes:
    path = env.file("icon.ico")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path, format="ICO")
    return path.read_bytes()


def _animated_gif(env: HostileEnv) -> bytes:
    path = env.file("anim.gif")
    frames = [Image.new("RGB", (64, 64), (i * 60, 0, 0)) for i in range(3)]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return path.read_bytes()


def _truncated_png(env: HostileEnv) -> bytes:
    src = make_image(env.file("big.png"), 256, 256, "PNG")
    return make_truncated(src, env.file("cut.png"), 0.5).read_bytes()


def _truncated_mp4(env: HostileEnv) -> bytes:
    return make_truncated(env.video_mp4, env.file("cut.mp4"), 0.3).read_bytes()


def _port(env: HostileEnv) -> int:
    return env.server.port


def _path_img(env: HostileEnv, value: str, **extra: Any) -> dict[str, Any]:
    return {"image_path": value, **extra}


def _link_out(env: HostileEnv) -> str:
    """``<volume>/ref.png`` -> a good image outside the volume."""
    (env.volume / "ref.png").symlink_to(env.outside / "private.png")
    return "ref.png"


def _dir_link_out(env: HostileEnv) -> str:
    """``<volume>/shared`` -> a folder outside; the job names a file under the link."""
    (env.volume / "shared").symlink_to(env.outside, target_is_directory=True)
    return "shared/private.png"


def _fifo(env: HostileEnv) -> str:
    os.mkfifo(env.volume / "pipe.png")
    return "pipe.png"


def _socket_file(env: HostileEnv) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(env.volume / "s.png"))  # the socket file stays after close
    return "s.png"


def _folder(env: HostileEnv) -> str:
    (env.volume / "inputs" / "ref.png").mkdir(parents=True)
    return "inputs/ref.png"


def _absolute_on_volume(env: HostileEnv, name: str, data: bytes) -> str:
    return str(env.volume / env.on_volume(name, data))


# ---------------------------------------------------------------- the corpus

CASES: list[HostileCase] = [
    # --- shape of the input (item 2)
    HostileCase("not_an_object", lambda env: ["image_url", "x"], "input", "invalid_input"),
    HostileCase("input_is_string", lambda env: "dance please", "input", "invalid_input"),
    HostileCase("unknown_key", lambda env: _img(env, widht=512), "widht", "unknown_field"),
    HostileCase(
        "both_image_fields",
        lambda env: _img(env, image_url="https://example.com/a.png"),
        "image_url",
        "conflicting_inputs",
    ),
    HostileCase("no_image", lambda env: {"prompt": "dance"}, "image_url", "missing_image"),
    HostileCase("image_null_only", lambda env: {"image_url": None}, "image_url", "missing_image"),
    HostileCase(
        "empty_image_base64", lambda env: {"image_base64": "  "}, "image_base64", "invalid_input"
    ),
    HostileCase(
        "both_video_fields",
        lambda env: _img(env, video_url="https://example.com/v.mp4", video_base64="AAAA"),
        "video_url",
        "conflicting_inputs",
    ),
    # --- numbers and choices
    HostileCase("width_not_32", lambda env: _img(env, width=500), "width", "invalid_input"),
    HostileCase("huge_width", lambda env: _img(env, width=100_000), "width", "invalid_input"),
    HostileCase("zero_height", lambda env: _img(env, height=0), "height", "invalid_input"),
    HostileCase("width_as_float", lambda env: _img(env, width=512.5), "width", "invalid_input"),
    HostileCase("negative_steps", lambda env: _img(env, steps=-3), "steps", "invalid_input"),
    HostileCase("too_many_steps", lambda env: _img(env, steps=500), "steps", "invalid_input"),
    HostileCase("cfg_as_string", lambda env: _img(env, cfg="7"), "cfg", "invalid_input"),
    HostileCase("cfg_too_high", lambda env: _img(env, cfg=99.0), "cfg", "invalid_input"),
    HostileCase("seed_too_big", lambda env: _img(env, seed=2**64), "seed", "invalid_input"),
    HostileCase("seed_negative", lambda env: _img(env, seed=-7), "seed", "invalid_input"),
    HostileCase("fps_zero", lambda env: _img(env, fps=0), "fps", "invalid_input"),
    HostileCase(
        "max_frames_too_small", lambda env: _img(env, max_frames=2), "max_frames", "invalid_input"
    ),
    HostileCase(
        "context_overlap_boolean",
        lambda env: _img(env, context_overlap=True),
        "context_overlap",
        "invalid_input",
    ),
    HostileCase(
        "keep_audio_string", lambda env: _img(env, keep_audio="yes"), "keep_audio", "invalid_input"
    ),
    HostileCase("output_ftp", lambda env: _img(env, output="ftp"), "output", "invalid_input"),
    HostileCase(
        "output_url_without_bucket",
        lambda env: _img(env, output="url"),
        "output",
        "bucket_not_configured",
    ),
    HostileCase(
        "prompt_too_long", lambda env: _img(env, prompt="dance " * 400), "prompt", "invalid_input"
    ),
    HostileCase(
        "prompt_with_nul", lambda env: _img(env, prompt="dance\x00now"), "prompt", "invalid_input"
    ),
    HostileCase("prompt_blank", lambda env: _img(env, prompt="   "), "prompt", "invalid_input"),
    HostileCase(
        "negative_prompt_not_string",
        lambda env: _img(env, negative_prompt=["blurry"]),
        "negative_prompt",
        "invalid_input",
    ),
    # --- URL syntax (item 3)
    HostileCase(
        "ftp_url",
        lambda env: _img_url(env, "ftp://example.com/a.png"),
        "image_url",
        "unsupported_url",
    ),
    HostileCase(
        "file_url", lambda env: _img_url(env, "file:///etc/passwd"), "image_url", "unsupported_url"
    ),
    HostileCase(
        "url_with_password",
        lambda env: _img_url(env, "https://user:secret@example.com/a.png"),
        "image_url",
        "unsupported_url",
    ),
    HostileCase(
        "url_without_host",
        lambda env: _img_url(env, "http:///a.png"),
        "image_url",
        "unsupported_url",
    ),
    # --- SSRF (allow_private_urls off)
    HostileCase(
        "url_loopback_ip",
        lambda env: _img_url(env, env.server.serve("/ok.png", env.image_png.read_bytes())),
        "image_url",
        "url_forbidden",
        NO_PRIVATE,
    ),
    HostileCase(
        "url_private_10",
        lambda env: _img_url(env, "http://10.1.2.3/a.png"),
        "image_url",
        "url_forbidden",
        NO_PRIVATE,
    ),
    HostileCase(
        "url_metadata",
        lambda env: _img_url(env, "http://169.254.169.254/latest/meta-data/"),
        "image_url",
        "url_forbidden",
        NO_PRIVATE,
    ),
    HostileCase(
        "url_ipv6_loopback",
        lambda env: _img_url(env, f"http://[::1]:{_port(env)}/a.png"),
        "image_url",
        "url_forbidden",
        NO_PRIVATE,
    ),
    HostileCase(
        "url_ipv4_mapped_ipv6",
        lambda env: _img_url(env, f"http://[::ffff:127.0.0.1]:{_port(env)}/a.png"),
        "image_url",
        "url_forbidden",
        NO_PRIVATE,
    ),
    HostileCase(
        "url_decimal_loopback",
        lambda env: _img_url(env, f"http://2130706433:{_port(env)}/a.png"),
        "image_url",
        "url_forbidden",
        NO_PRIVATE,
    ),
    HostileCase(
        "url_hostname_resolving_to_loopback",
        lambda env: _img_url(env, env.server.url_localhost("/a.png")),
        "image_url",
        "url_forbidden",
        NO_PRIVATE,
    ),
    HostileCase(
        "video_url_private_172",
        lambda env: _img(env, video_url="http://172.16.0.5/v.mp4"),
        "video_url",
        "url_forbidden",
        NO_PRIVATE,
    ),
    HostileCase(
        "metadata_even_when_private_allowed",
        lambda env: _img_url(env, "http://169.254.169.254/latest/meta-data/"),
        "image_url",
        "url_forbidden",
    ),
    HostileCase(
        "redirect_to_metadata",
        lambda env: _img_url(
            env, env.server.redirect("/r-meta", "http://169.254.169.254/latest/meta-data/")
        ),
        "image_url",
        "url_forbidden",
    ),
    HostileCase(
        "redirect_to_file_scheme",
        lambda env: _img_url(env, env.server.redirect("/r-file", "file:///etc/passwd")),
        "image_url",
        "unsupported_url",
    ),
    # --- download behaviour (local server, private allowed)
    HostileCase(
        "too_many_redirects",
        lambda env: _img_url(env, env.server.redirect_chain("/loop", 6, "/never.png")),
        "image_url",
        "download_failed",
    ),
    HostileCase(
        "http_404",
        lambda env: _img_url(env, env.server.url("/missing.png")),
        "image_url",
        "download_failed",
    ),
    HostileCase(
        "http_503_forever",
        lambda env: _img_url(env, env.server.serve("/busy.png", b"busy", status=503)),
        "image_url",
        "download_failed",
    ),
    HostileCase(
        "connection_dropped",
        lambda env: _img_url(env, env.server.serve_drop("/drop.png")),
        "image_url",
        "download_failed",
    ),
    HostileCase(
        "slow_server",
        lambda env: _img_url(
            env, env.server.serve_slow("/slow.png", b"x" * 100, first_byte_delay_s=1.5)
        ),
        "image_url",
        "download_failed",
        {"download_read_timeout_s": 0.3, "download_retries": 1},
    ),
    HostileCase(
        "content_length_lies_long",
        lambda env: _img_url(
            env, env.server.serve_wrong_length("/short.png", env.image_png.read_bytes(), 10**6)
        ),
        "image_url",
        "download_failed",
    ),
    HostileCase(
        "empty_body",
        lambda env: _served_image(env, "/empty.png", b""),
        "image_url",
        "download_failed",
    ),
    HostileCase(
        "body_over_cap_unsized",
        lambda env: _img_url(env, env.server.serve_unsized("/big.bin", b"\x89PNG" * 5000)),
        "image_url",
        "too_large",
        {"max_image_bytes": 10_000},
    ),
    HostileCase(
        "content_length_over_cap",
        lambda env: _img_url(env, env.server.serve_wrong_length("/huge.png", b"abc", 10**9)),
        "image_url",
        "too_large",
    ),
    HostileCase(
        "video_url_over_cap",
        lambda env: _img(env, video_url=env.server.serve_file("/v.mp4", env.video_mp4)),
        "video_url",
        "too_large",
        {"max_video_bytes": 2_000},
    ),
    # --- base64
    HostileCase(
        "bad_base64",
        lambda env: {"image_base64": "!!!not base64???"},
        "image_base64",
        "invalid_base64",
    ),
    HostileCase(
        "bad_base64_padding",
        lambda env: {"image_base64": "QUJDRA"},
        "image_base64",
        "invalid_base64",
    ),
    HostileCase(
        "data_uri_garbage",
        lambda env: {"image_base64": "data:image/png;base64,@@@@####"},
        "image_base64",
        "invalid_base64",
    ),
    HostileCase(
        "data_uri_not_base64",
        lambda env: {"image_base64": "data:image/png,hello"},
        "image_base64",
        "invalid_base64",
    ),
    HostileCase(
        "base64_over_cap",
        lambda env: {"image_base64": env.good_image_b64()},
        "image_base64",
        "too_large",
        {"max_image_bytes": 100},
    ),
    HostileCase(
        "video_base64_over_cap",
        lambda env: _img(env, video_base64=env.good_video_b64()),
        "video_base64",
        "too_large",
        {"max_video_bytes": 1_000},
    ),
    # --- image content
    HostileCase(
        "non_image_bytes",
        lambda env: {"image_base64": b64(b"hello, I am plain text, not a picture")},
        "image_base64",
        "invalid_image",
    ),
    HostileCase(
        "decompression_bomb",
        lambda env: {"image_base64": b64(make_png_bomb(env.file("bomb.png")).read_bytes())},
        "image_base64",
        "too_many_pixels",
    ),
    HostileCase(
        "truncated_image",
        lambda env: {"image_base64": b64(_truncated_png(env))},
        "image_base64",
        "invalid_image",
    ),
    HostileCase(
        "tiny_image",
        lambda env: {"image_base64": b64(_tiny_image(env))},
        "image_base64",
        "invalid_image",
    ),
    HostileCase(
        "unsupported_image_format",
        lambda env: _served_image(env, "/icon.png", _ico_image(env)),
        "image_url",
        "invalid_image",
    ),
    HostileCase(
        "animated_gif",
        lambda env: {"image_base64": b64(_animated_gif(env))},
        "image_base64",
        "invalid_image",
    ),
    HostileCase(
        "video_as_image",
        lambda env: {"image_base64": env.good_video_b64()},
        "image_base64",
        "invalid_image",
    ),
    # --- video content
    HostileCase(
        "text_as_video",
        lambda env: _video_b64(env, make_text(env.file("v.txt")).read_bytes()),
        "video_base64",
        "invalid_video",
    ),
    HostileCase(
        "audio_only_video",
        lambda env: _video_b64(env, make_audio_only(env.file("a.mp4")).read_bytes()),
        "video_base64",
        "invalid_video",
    ),
    HostileCase(
        "image_as_video",
        lambda env: _video_b64(env, env.image_png.read_bytes()),
        "video_base64",
        "invalid_video",
    ),
    HostileCase(
        "truncated_video",
        lambda env: _video_b64(env, _truncated_mp4(env)),
        "video_base64",
        "invalid_video",
    ),
    HostileCase(
        "video_too_tall",
        lambda env: _video_b64(env, make_video(env.file("tall.mp4"), 32, 8224, 8, 2).read_bytes()),
        "video_base64",
        "too_many_pixels",
    ),
    HostileCase(
        "video_by_url_is_html",
        lambda env: _img(
            env,
            video_url=env.server.serve(
                "/page.mp4", b"<html><body>Sign in</body></html>", content_type="text/html"
            ),
        ),
        "video_url",
        "invalid_video",
    ),
    HostileCase(
        "text_video_by_url",
        lambda env: _img(env, video_url=env.server.serve("/v.mp4", b"not a video at all")),
        "video_url",
        "invalid_video",
    ),
    # --- paths on the network volume
    HostileCase(
        "image_path_dotdot",
        lambda env: _path_img(env, "../outside/private.png"),
        "image_path",
        "path_forbidden",
    ),
    HostileCase(
        "image_path_dotdot_inside",
        lambda env: _path_img(env, "a/../" + env.on_volume("ok.png", env.image_png.read_bytes())),
        "image_path",
        "path_forbidden",
    ),
    HostileCase(
        "image_path_absolute_outside",
        lambda env: _path_img(env, str(env.outside / "private.png")),
        "image_path",
        "path_forbidden",
    ),
    HostileCase(
        "image_path_etc_passwd",
        lambda env: _path_img(env, "/etc/passwd"),
        "image_path",
        "path_forbidden",
    ),
    HostileCase(
        "image_path_symlink_out",
        lambda env: _path_img(env, _link_out(env)),
        "image_path",
        "path_forbidden",
    ),
    HostileCase(
        "image_path_dir_symlink_out",
        lambda env: _path_img(env, _dir_link_out(env)),
        "image_path",
        "path_forbidden",
    ),
    HostileCase(
        "image_path_missing",
        lambda env: _path_img(env, "nope/ref.png"),
        "image_path",
        "path_not_found",
    ),
    HostileCase(
        "image_path_directory",
        lambda env: _path_img(env, _folder(env)),
        "image_path",
        "path_not_file",
    ),
    HostileCase(
        "image_path_fifo", lambda env: _path_img(env, _fifo(env)), "image_path", "path_not_file"
    ),
    HostileCase(
        "image_path_socket",
        lambda env: _path_img(env, _socket_file(env)),
        "image_path",
        "path_not_file",
    ),
    HostileCase(
        "image_path_nul",
        lambda env: _path_img(env, "ref\x00.png"),
        "image_path",
        "invalid_input",
    ),
    HostileCase(
        "image_path_when_paths_are_off",
        lambda env: _path_img(env, env.on_volume("ok.png", env.image_png.read_bytes())),
        "image_path",
        "path_forbidden",
        {"volume_root": None},
    ),
    HostileCase(
        "image_path_over_cap",
        lambda env: _path_img(env, env.on_volume("big.png", env.image_png.read_bytes())),
        "image_path",
        "too_large",
        {"max_image_bytes": 100},
    ),
    HostileCase(
        "image_path_not_an_image",
        lambda env: _path_img(env, env.on_volume("t.png", b"plain text, not a picture")),
        "image_path",
        "invalid_image",
    ),
    HostileCase(
        "image_path_and_base64",
        lambda env: _img(env, image_path=env.on_volume("ok.png", env.image_png.read_bytes())),
        "image_base64",
        "conflicting_inputs",
    ),
    HostileCase(
        "video_path_and_url",
        lambda env: _img(env, video_url="https://example.com/v.mp4", video_path="v.mp4"),
        "video_url",
        "conflicting_inputs",
    ),
    HostileCase(
        "video_path_text",
        lambda env: _img(env, video_path=env.on_volume("v/d.mp4", b"not a video at all")),
        "video_path",
        "invalid_video",
    ),
    HostileCase(
        "video_path_over_cap",
        lambda env: _img(
            env, video_path=_absolute_on_volume(env, "d.mp4", env.video_mp4.read_bytes())
        ),
        "video_path",
        "too_large",
        {"max_video_bytes": 2_000},
    ),
    HostileCase(
        "video_path_symlink_to_proc",
        lambda env: _img(env, video_path=_link(env, "v.mp4", "/proc/self/environ")),
        "video_path",
        "path_forbidden",
    ),
]


def _link(env: HostileEnv, name: str, target: str) -> str:
    (env.volume / name).symlink_to(target)
    return name


CASE_IDS = [case.id for case in CASES]
