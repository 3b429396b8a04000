"""Media inputs: the hostile corpus end to end through schema + media, plus the guards one by one
(SSRF policy, redirects, retries, caps, proxies, base64, Pillow and PyAV checks, job folder)."""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.hostile_cases import (
    CASE_IDS,
    CASES,
    HostileCase,
    HostileEnv,
    case_settings,
    good_job_input,
)
from tests.plugins.http_server import HttpServer, Reply
from tests.plugins.media_factory import make_image, make_video
from xicon_dance import download, media, netguard
from xicon_dance.errors import ConfigError, InputError
from xicon_dance.media import (
    ImageInfo,
    VideoInfo,
    fetch_image,
    fetch_video,
    input_name,
    job_folder,
    probe_video,
    safe_job_id,
)
from xicon_dance.netguard import GuardedResolver, address_refusal
from xicon_dance.schema import INPUT_ERROR_CODES, parse_job_input
from xicon_dance.settings import Settings


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "RETRY_BACKOFF_S", 0.01)


@pytest.fixture
def env(http_server: HttpServer, tmp_path: Path) -> HostileEnv:
    return HostileEnv(http_server, tmp_path / "env")


@pytest.fixture
def settings(env: HostileEnv, tmp_path: Path) -> Settings:
    return dataclasses.replace(
        Settings(),
        comfy_input_dir=tmp_path / "input",
        default_video=env.default_video,
        volume_root=env.volume,
        allow_private_urls=True,
        download_retries=3,
        download_connect_timeout_s=2.0,
        download_read_timeout_s=2.0,
    )


async def run_job(raw: object, settings: Settings, job_id: str = "job-1") -> tuple[Any, Any]:
    job = parse_job_input(raw, settings)
    async with job_folder(settings, job_id) as folder:
        image = await fetch_image(job, folder, settings)
        video = await fetch_video(job, folder, settings)
        assert image.path.parent == folder.path and video.path.parent == folder.path
        return image, video


def jobs_dir(settings: Settings) -> Path:
    return Path(settings.comfy_input_dir) / "jobs"


# ------------------------------------------------------------------------ the corpus


def test_corpus_is_large_and_well_formed() -> None:
    assert len(CASES) >= 30
    assert len(set(CASE_IDS)) == len(CASES)
    for case in CASES:
        assert case.code in INPUT_ERROR_CODES, case.id


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
async def test_hostile_case(case: HostileCase, env: HostileEnv, settings: Settings) -> None:
    hostile = case_settings(case, settings)
    with pytest.raises(InputError) as info:
        await run_job(case.make_input(env), hostile, job_id=case.id)
    err = info.value
    assert (err.field, err.code) == (case.field, case.code), err.message
    assert err.message.startswith(f"{case.field}: ") and err.message.endswith(".")
    assert "Traceback" not in err.message and "\n" not in err.message
    assert "secret" not in err.message
    root = jobs_dir(hostile)
    assert not root.exists() or not any(root.iterdir()), "job folder left behind"
    # A good job right after, on the same server and folders.
    image, video = await run_job(good_job_input(env), settings, job_id=case.id + "-good")
    assert (image.width, image.height, video.frames) == (96, 160, 9)


# ------------------------------------------------------------------------ good paths


async def test_url_inputs_through_five_redirects(env: HostileEnv, settings: Settings) -> None:
    server = env.server
    server.serve_file("/files/ref.jpg", make_image(env.file("r.jpg"), 300, 200, "JPEG"))
    server.serve_file("/files/drive.mp4", env.video_mp4)
    raw = {
        "image_url": server.redirect_chain("/img", 5, "/files/ref.jpg"),
        "video_url": server.redirect("/vid", server.url("/files/drive.mp4"), status=307),
    }
    job = parse_job_input(raw, settings)
    async with job_folder(settings, "abc") as folder:
        image = await fetch_image(job, folder, settings)
        video = await fetch_video(job, folder, settings)
        assert image == ImageInfo(folder.path / "reference.jpg", 300, 200, "JPEG", image.bytes)
        assert image.bytes == (env.workdir / "r.jpg").stat().st_size
        assert input_name(settings, image.path) == "jobs/abc/reference.jpg"
        assert input_name(settings, video.path) == "jobs/abc/driving.mp4"
        assert (video.width, video.height, video.frames, video.fps) == (64, 64, 9, 8.0)
        assert video.has_audio and video.duration_s == pytest.approx(1.125, abs=0.05)
        assert video.bytes == env.video_mp4.stat().st_size
        assert sorted(p.name for p in folder.path.iterdir()) == ["driving.mp4", "reference.jpg"]
    assert not folder.path.exists()
    assert server.hits("/img/hop4") == 1 and server.hits("/files/ref.jpg") == 1


async def test_base64_and_data_uri_inputs(env: HostileEnv, settings: Settings) -> None:
    png = env.image_png.read_bytes()
    wrapped = base64.encodebytes(png).decode()  # with newlines every 76 characters
    raw = {
        "image_base64": "data:image/png;base64," + wrapped,
        "video_base64": base64.b64encode(env.video_mp4.read_bytes()).decode(),
    }
    image, video = await run_job(raw, settings)
    assert (image.format, image.width, image.height, image.bytes) == ("PNG", 96, 160, len(png))
    assert image.path.name == "reference.png" and video.path.name == "driving.mp4"


async def test_default_video_is_used_and_linked_into_the_job(
    env: HostileEnv, settings: Settings
) -> None:
    job = parse_job_input({"image_base64": env.good_image_b64()}, settings)
    async with job_folder(settings, "d") as folder:
        video = await fetch_video(job, folder, settings)
        assert video.path.parent == folder.path and video.path.name == "driving.mp4"
        assert (video.frames, video.has_audio) == (9, False)
    assert env.default_video.exists(), "removing the job folder must not touch the default"


async def test_missing_default_video_is_a_config_error(
    env: HostileEnv, settings: Settings, tmp_path: Path
) -> None:
    broken = dataclasses.replace(settings, default_video=tmp_path / "nope.mp4")
    job = parse_job_input({"image_base64": env.good_image_b64()}, broken)
    with pytest.raises(ConfigError) as info:
        async with job_folder(broken, "d") as folder:
            await fetch_video(job, folder, broken)
    assert info.value.code == "default_video_missing" and "nope.mp4" in info.value.message
    not_video = dataclasses.replace(settings, default_video=env.image_png)
    with pytest.raises(ConfigError, match="unusable"):
        media.check_default_video(not_video)


async def test_inputs_from_the_network_volume(env: HostileEnv, settings: Settings) -> None:
    """image_path relative to the volume, video_path absolute under it: copied into the job
    folder under the generated names, checked like any other input; the originals stay."""
    (env.volume / "in").mkdir()
    jpg = make_image(env.volume / "in" / "ref.jpg", 300, 200, "JPEG")
    mkv = make_video(env.volume / "in" / "drive.mp4", 64, 64, 8, 9, container="matroska")
    raw = {"image_path": "in/ref.jpg", "video_path": str(mkv)}
    image, video = await run_job(raw, settings, job_id="vol")
    assert (image.path.name, image.width, image.height, image.format) == (
        "reference.jpg",
        300,
        200,
        "JPEG",
    )
    assert image.bytes == jpg.stat().st_size
    assert (video.path.name, video.frames, video.bytes) == ("driving.mkv", 9, mkv.stat().st_size)
    assert jpg.is_file() and mkv.is_file(), "the volume's files are read, never moved"
    assert not any(jobs_dir(settings).iterdir())


def test_a_stopped_job_abandons_the_probe(tmp_path: Path) -> None:
    """The probe's loops over the file (first frame, packet count) end once the job's stop
    event is set: a hostile video cannot keep a CPU busy after its job ended."""
    path = make_video(tmp_path / "v.mkv", 64, 64, 8, 9, container="matroska")
    stop = threading.Event()
    assert probe_video(path, stop=stop).frames == 9
    stop.set()
    with pytest.raises(media.ProbeStopped):
        probe_video(path, stop=stop)


async def test_exif_orientation_swaps_reported_size(env: HostileEnv, settings: Settings) -> None:
    path = env.file("rot.jpg")
    img = Image.new("RGB", (200, 100), (10, 120, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, format="JPEG", exif=exif)
    raw = {"image_base64": base64.b64encode(path.read_bytes()).decode()}
    image, _ = await run_job(raw, settings)
    assert (image.width, image.height) == (100, 200)


# ------------------------------------------------------------------------ retries and caps


async def test_5xx_is_retried_then_succeeds(env: HostileEnv, settings: Settings) -> None:
    body = env.image_png.read_bytes()
    url = env.server.sequence(
        "/flaky.png", [Reply(status=503), Reply(status=502), Reply(body=body)]
    )
    image, _ = await run_job({"image_url": url}, settings)
    assert image.bytes == len(body)
    assert env.server.hits("/flaky.png") == 3


async def test_retries_are_bounded_and_4xx_is_not_retried(
    env: HostileEnv, settings: Settings
) -> None:
    url = env.server.serve("/down.png", b"", status=500)
    with pytest.raises(InputError, match="after 3 attempt"):
        await run_job({"image_url": url}, settings)
    assert env.server.hits("/down.png") == 3
    url = env.server.serve("/gone.png", b"gone", status=410)
    with pytest.raises(InputError, match="HTTP 410"):
        await run_job({"image_url": url}, settings)
    assert env.server.hits("/gone.png") == 1


async def test_dropped_connection_is_retried(env: HostileEnv, settings: Settings) -> None:
    body = env.image_png.read_bytes()
    url = env.server.sequence("/d.png", [Reply(drop=True), Reply(body=body)])
    image, _ = await run_job({"image_url": url}, settings)
    assert image.bytes == len(body) and env.server.hits("/d.png") == 2


async def test_read_timeout_between_chunks(env: HostileEnv, settings: Settings) -> None:
    quick = dataclasses.replace(settings, download_read_timeout_s=0.2, download_retries=2)
    url = env.server.serve_slow("/s.bin", b"x" * 4096, chunk_delay_s=0.6, chunk_bytes=1024)
    with pytest.raises(InputError, match="timed out") as info:
        await run_job({"image_url": url}, quick)
    assert info.value.code == "download_failed"
    assert env.server.hits("/s.bin") == 2


async def test_streaming_cap_stops_early(env: HostileEnv, settings: Settings) -> None:
    capped = dataclasses.replace(settings, max_image_bytes=64 * 1024)
    url = env.server.serve_unsized("/big", b"\0" * (4 * 1024 * 1024))
    with pytest.raises(InputError) as info:
        await run_job({"image_url": url}, capped)
    assert info.value.code == "too_large" and "65536 bytes" in info.value.message
    assert env.server.hits("/big") == 1, "a size refusal is not retried"


def test_base64_length_is_capped_before_decoding(tmp_path: Path) -> None:
    cap = 3000
    limit = 4 * ((cap + 2) // 3)
    ok = base64.b64encode(b"\1" * cap).decode()
    assert len(ok) == limit
    assert media.decode_base64_to_file(ok, tmp_path / "a", cap, "f") == cap
    with pytest.raises(InputError) as info:
        media.decode_base64_to_file("A" * (limit + 4), tmp_path / "b", cap, "f")
    assert info.value.code == "too_large" and "characters" in info.value.message
    assert not (tmp_path / "b").exists()


def test_proxy_environment_is_ignored(
    env: HostileEnv, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    url = env.server.serve("/p.png", env.image_png.read_bytes())
    import asyncio

    image, _ = asyncio.run(run_job({"image_url": url}, settings))
    assert image.width == 96 and env.server.hits("/p.png") == 1


# ------------------------------------------------------------------------ SSRF


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.5.5.5",
        "0.0.0.0",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.1.1",
        "100.64.0.1",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",
        "::",
        "::1",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::1",
        "2001:db8::1",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert address_refusal(ip, allow_private=False)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address), allow_private=False) == ""


@pytest.mark.parametrize(
    "address", ["169.254.169.254", "fd00:ec2::254", "100.100.100.200", "::ffff:169.254.169.254"]
)
def test_metadata_is_refused_even_when_private_is_allowed(address: str) -> None:
    assert "metadata" in address_refusal(ipaddress.ip_address(address), allow_private=True)


def test_private_allowed_lets_loopback_through() -> None:
    assert address_refusal(ipaddress.ip_address("127.0.0.1"), allow_private=True) == ""


async def test_resolver_refuses_names_that_resolve_privately() -> None:
    strict = GuardedResolver(allow_private=False)
    with pytest.raises(netguard.ForbiddenAddress, match="localhost resolves to a loopback"):
        await strict.resolve("localhost", 80)
    await strict.close()
    lenient = GuardedResolver(allow_private=True)
    assert await lenient.resolve("localhost", 80)
    await lenient.close()


@pytest.mark.parametrize(
    "target",
    ["http://10.0.0.1/x.png", "http://[::1]:{port}/x.png", "http://localhost:{port}/ok.png"],
)
async def test_redirect_to_a_private_address_is_refused(
    target: str, env: HostileEnv, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """127.0.0.1 stands in for a public host; every redirect hop must be checked again."""
    real = netguard.address_refusal

    def policy(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allow_private: bool) -> str:
        if ip == ipaddress.ip_address("127.0.0.1"):
            return ""
        return real(ip, allow_private)

    monkeypatch.setattr(netguard, "address_refusal", policy)
    strict = dataclasses.replace(settings, allow_private_urls=False)
    env.server.serve("/ok.png", env.image_png.read_bytes())
    url = env.server.redirect("/start", target.format(port=env.server.port))
    if "localhost" in target and not _localhost_has_ipv6():
        pytest.skip("localhost has no ::1 entry here, so it resolves to the stand-in only")
    with pytest.raises(InputError) as info:
        await run_job({"image_url": url}, strict)
    assert info.value.code == "url_forbidden", info.value.message
    assert env.server.hits("/start") == 1 and env.server.hits("/ok.png") == 0


def _localhost_has_ipv6() -> bool:
    import socket

    try:
        return any(i[0] == socket.AF_INET6 for i in socket.getaddrinfo("localhost", 80))
    except OSError:
        return False


async def test_redirect_to_ftp_is_refused(env: HostileEnv, settings: Settings) -> None:
    url = env.server.redirect("/f", "ftp://example.com/a.png", status=301)
    with pytest.raises(InputError, match="scheme ftp") as info:
        await run_job({"image_url": url}, settings)
    assert info.value.code == "unsupported_url"


async def test_presigned_urls_are_sent_byte_for_byte(env: HostileEnv, settings: Settings) -> None:
    query = "?X-Amz-Credential=AKIA%2F20260101%2Fus-east-1%2Fs3&X-Amz-Signature=ab%2Bcd&x=1+2"
    env.server.serve("/bucket/a%20b.png", env.image_png.read_bytes())
    hop = env.server.redirect("/r", env.server.url("/bucket/a%20b.png") + query)
    await run_job({"image_url": hop + "?k=%2F"}, settings)
    assert env.server.targets("/r") == ["/r?k=%2F"]
    assert env.server.targets("/bucket/a%20b.png") == ["/bucket/a%20b.png" + query]


async def test_messages_hide_query_strings(env: HostileEnv, settings: Settings) -> None:
    url = env.server.url("/missing.png") + "?X-Amz-Signature=topsecret&X-Amz-Credential=AKIA"
    with pytest.raises(InputError) as info:
        await run_job({"image_url": url}, settings)
    assert "topsecret" not in info.value.message and "AKIA" not in info.value.message
    assert "/missing.png" in info.value.message


# ------------------------------------------------------------------------ videos


def test_probe_counts_frames_when_the_container_does_not_say(tmp_path: Path) -> None:
    path = make_video(tmp_path / "v.mkv", 80, 48, 12, 13, audio=True, container="matroska")
    info = probe_video(path)
    assert info == VideoInfo(path, 80, 48, 12.0, 13, info.duration_s, True, path.stat().st_size)
    assert info.duration_s == pytest.approx(13 / 12, abs=0.1)


def test_probe_refuses_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "e.mp4").write_bytes(b"")
    for path in (tmp_path / "e.mp4", tmp_path / "missing.mp4"):
        with pytest.raises(InputError) as info:
            probe_video(path, field="result")
        assert (info.value.field, info.value.code) == ("result", "invalid_video")


async def test_video_container_extension_follows_content(
    env: HostileEnv, settings: Settings, tmp_path: Path
) -> None:
    mkv = make_video(tmp_path / "x.bin", 64, 64, 8, 9, container="matroska")
    url = env.server.serve_file("/video.mp4", mkv)
    _, video = await run_job({"image_base64": env.good_image_b64(), "video_url": url}, settings)
    assert video.path.name == "driving.mkv" and video.frames == 9


# ------------------------------------------------------------------------ job folder


@pytest.mark.parametrize(
    "job_id", ["../../etc", "a/b", "sync-1234-abcd", "x" * 300, "", "..", "ümlaut id"]
)
async def test_job_folder_is_contained_and_removed(job_id: str, settings: Settings) -> None:
    root = jobs_dir(settings)
    async with job_folder(settings, job_id) as folder:
        path = folder.path
        assert path.parent == root and path.is_dir()
        assert len(path.name) <= 100 and "/" not in path.name and path.name not in ("", "..")
        (path / "f").write_bytes(b"1")
    assert not path.exists()


async def test_job_folder_is_removed_on_failure(settings: Settings) -> None:
    with pytest.raises(RuntimeError):
        async with job_folder(settings, "boom") as folder:
            (folder.path / "sub").mkdir()
            (folder.path / "sub" / "f").write_bytes(b"1")
            raise RuntimeError("job failed")
    assert not folder.path.exists()


def test_safe_job_id_keeps_plain_ids_and_separates_look_alikes() -> None:
    assert safe_job_id("sync-abc_123") == "sync-abc_123"
    assert safe_job_id("a/b") != safe_job_id("a_b")


def _special_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Every special-purpose network Python's ipaddress module knows, for both families."""
    found: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for constants in (ipaddress._IPv4Constants, ipaddress._IPv6Constants):  # type: ignore[attr-defined]
        for name, value in vars(constants).items():
            if name.startswith("__") or name.endswith("_exceptions"):
                continue
            values = value if isinstance(value, list) else [value]
            found += [
                v for v in values if isinstance(v, ipaddress.IPv4Network | ipaddress.IPv6Network)
            ]
    return found


@pytest.mark.parametrize("network", _special_networks(), ids=str)
def test_every_special_purpose_range_is_refused(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> None:
    """Both ends of each range are refused, unless ipaddress itself lists them as exceptions
    (globally reachable hosts inside a special block, e.g. 192.0.0.9 in newer Pythons)."""
    exceptions = [
        *getattr(ipaddress._IPv4Constants, "_private_networks_exceptions", []),  # type: ignore[attr-defined]
        *getattr(ipaddress._IPv6Constants, "_private_networks_exceptions", []),  # type: ignore[attr-defined]
    ]
    for ip in (network.network_address, network.broadcast_address):
        if any(ip in exc for exc in exceptions if exc.version == ip.version):
            continue
        assert address_refusal(ip, allow_private=False), f"{ip} (in {network}) passed the guard"


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("fec0::1", "site-local"),  # deprecated site-local: is_global is True in Python 3.11
        ("feff:ffff::1", "site-local"),
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "metadata"),  # NAT64 of 169.254.169.254
        ("64:ff9b:1::1", "reserved"),  # NAT64 local use
    ],
)
def test_site_local_and_nat64_are_refused(address: str, reason: str) -> None:
    assert reason in address_refusal(ipaddress.ip_address(address), allow_private=False)


def test_nat64_of_a_public_address_passes() -> None:
    assert address_refusal(ipaddress.ip_address("64:ff9b::808:808"), allow_private=False) == ""
