"""Job input schema: defaults, limits, one field-named error per problem, size and seed helpers."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from pydantic import SecretStr, ValidationError

from xicon_dance.errors import InputError
from xicon_dance.schema import (
    DEFAULT_NEGATIVE_PROMPT,
    INPUT_ERROR_CODES,
    MAX_SIDE,
    MIN_SIDE,
    RANDOM_SEED_MAX,
    JobInput,
    parse_job_input,
)
from xicon_dance.settings import Settings

IMG = {"image_url": "https://example.com/ref.png"}
SETTINGS = Settings()


def parse(**fields: object) -> JobInput:
    return parse_job_input({**IMG, **fields}, SETTINGS)


def error_of(raw: object, settings: Settings = SETTINGS) -> InputError:
    with pytest.raises(InputError) as info:
        parse_job_input(raw, settings)
    return info.value


def test_defaults_match_the_contract() -> None:
    job = parse()
    assert job.prompt == "the person starts to dance"
    assert job.negative_prompt == DEFAULT_NEGATIVE_PROMPT
    assert "色调艳丽" in job.negative_prompt and "倒着走" in job.negative_prompt
    assert (job.width, job.height, job.auto_size) == (416, 672, False)
    assert (job.steps, job.cfg, job.seed, job.fps, job.max_frames) == (6, 1.0, 0, 24, None)
    assert job.max_seconds is None
    assert (job.keep_audio, job.output) == (True, "auto")
    assert job.video_url is None and job.video_base64 is None and job.uses_default_video


def test_a_full_json_request_parses() -> None:
    raw = json.loads(
        '{"image_base64": "aGVsbG8=", "video_url": "http://cdn.example.com/v.mp4?sig=1",'
        ' "prompt": "a dancer", "negative_prompt": "", "width": 512, "height": 896,'
        ' "steps": 8, "cfg": 2, "seed": 18446744073709551615, "fps": 30, "max_frames": 49,'
        ' "keep_audio": false, "output": "base64"}'
    )
    job = parse_job_input(raw, SETTINGS)
    assert job.cfg == 2.0 and isinstance(job.cfg, float)
    assert job.seed == 2**64 - 1 and job.resolve_seed() == 2**64 - 1
    assert job.negative_prompt == "" and job.keep_audio is False
    assert not job.uses_default_video


def test_job_is_immutable() -> None:
    job = parse()
    with pytest.raises(ValidationError):
        job.width = 512  # type: ignore[misc]


@pytest.mark.parametrize("raw", [None, [], "image_url", 3, 2.5, True])
def test_non_object_input_is_refused(raw: object) -> None:
    err = error_of(raw)
    assert (err.field, err.code) == ("input", "invalid_input")
    assert err.message.startswith("input: must be a JSON object")


def test_unknown_key_is_named() -> None:
    err = error_of({**IMG, "widht": 512, "zzz": 1})
    assert (err.field, err.code) == ("widht", "unknown_field")
    assert "unknown field 'widht'" in err.message and "width" in err.message


def test_unknown_key_wins_over_value_errors() -> None:
    err = error_of({**IMG, "width": 500, "colour": "red"})
    assert err.field == "colour"


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"width": 500}, "width", "must be a multiple of 32 (got 500)"),
        ({"height": 1312}, "height", "between 256 and 1280 (got 1312)"),
        ({"width": 224}, "width", "between 256 and 1280"),
        ({"width": "512"}, "width", "must be an integer, not a string"),
        ({"width": True}, "width", "must be an integer, not a boolean"),
        ({"steps": 0}, "steps", "between 1 and 50"),
        ({"steps": 51}, "steps", "between 1 and 50"),
        ({"cfg": -0.5}, "cfg", "between 0.0 and 20.0"),
        ({"cfg": "1.5"}, "cfg", "must be a number, not a string"),
        ({"cfg": float("inf")}, "cfg", "finite"),
        ({"seed": -2}, "seed", "or -1 for a random seed"),
        ({"seed": 2**64}, "seed", "2**64-1"),
        ({"seed": 1.5}, "seed", "must be an integer"),
        ({"fps": 61}, "fps", "between 1 and 60"),
        ({"max_frames": 4}, "max_frames", "at least 5"),
        ({"auto_size": "true"}, "auto_size", "true or false"),
        ({"keep_audio": 0}, "keep_audio", "true or false"),
        ({"output": "s3"}, "output", "one of 'auto', 'url' or 'base64'"),
        ({"prompt": "x" * 2001}, "prompt", "at most 2000 characters (got 2001)"),
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": None}, "prompt", "must be a string, not null"),
        ({"negative_prompt": "a\x07b"}, "negative_prompt", "control characters"),
        ({"video_url": "ftp://example.com/v.mp4"}, "video_url", "http or https URL (got ftp)"),
        ({"video_url": "example.com/v.mp4"}, "video_url", "http or https URL"),
        ({"video_url": "http://exa mple.com/v.mp4"}, "video_url", "spaces"),
        ({"video_url": "http://example.com:99999/v"}, "video_url", "not a valid URL"),
        ({"video_url": "https://" + "a" * 5000}, "video_url", "longer than"),
        ({"video_url": 42}, "video_url", "must be a string"),
    ],
)
def test_each_bad_value_names_field_and_reason(
    fields: dict[str, object], field: str, fragment: str
) -> None:
    err = error_of({**IMG, **fields})
    assert err.field == field
    assert err.code in INPUT_ERROR_CODES
    assert err.message.startswith(f"{field}: ")
    assert fragment in err.message, err.message
    assert err.message.endswith(".") and "\n" not in err.message
    response = err.to_response()
    assert isinstance(response["error"], str) and response["field"] == field


def test_url_codes() -> None:
    assert error_of({"image_url": "file:///etc/passwd"}).code == "unsupported_url"
    assert error_of({"image_url": "http://u:p@example.com/"}).code == "unsupported_url"


@pytest.mark.parametrize(
    ("raw", "field", "code"),
    [
        ({}, "image_url", "missing_image"),
        ({"image_url": None, "image_base64": None}, "image_url", "missing_image"),
        ({**IMG, "image_base64": "aGk="}, "image_url", "conflicting_inputs"),
        (
            {**IMG, "video_url": "http://a/v", "video_base64": "aGk="},
            "video_url",
            "conflicting_inputs",
        ),
        ({"image_base64": ""}, "image_base64", "invalid_input"),
        ({**IMG, "video_base64": " "}, "video_base64", "invalid_input"),
        ({"image_base64": 12}, "image_base64", "invalid_input"),
        ({"image_path": "a.png", "image_base64": "aGk="}, "image_base64", "conflicting_inputs"),
        ({"image_path": "a.png", **IMG}, "image_url", "conflicting_inputs"),
        (
            {**IMG, "video_path": "v.mp4", "video_base64": "aGk="},
            "video_base64",
            "conflicting_inputs",
        ),
        (
            {**IMG, "video_path": "v.mp4", "video_url": "http://a/v"},
            "video_url",
            "conflicting_inputs",
        ),
        ({"image_path": ""}, "image_path", "invalid_input"),
        ({"image_path": 7}, "image_path", "invalid_input"),
        ({**IMG, "video_path": "  "}, "video_path", "invalid_input"),
        ({"image_path": "a/../../etc/passwd"}, "image_path", "path_forbidden"),
        ({"image_path": ".."}, "image_path", "path_forbidden"),
        ({"image_path": "a\nb.png"}, "image_path", "invalid_input"),
        ({"image_path": "a" * 5000}, "image_path", "invalid_input"),
    ],
)
def test_image_and_video_pairs(raw: dict[str, object], field: str, code: str) -> None:
    err = error_of(raw)
    assert (err.field, err.code) == (field, code)


def test_path_inputs_parse_and_can_be_turned_off() -> None:
    job = parse_job_input(
        {"image_path": "in/ref.png", "video_path": "/runpod-volume/d.mp4"}, SETTINGS
    )
    assert (job.image_path, job.video_path) == ("in/ref.png", "/runpod-volume/d.mp4")
    assert job.image_url is None and not job.uses_default_video
    assert parse_job_input({"image_path": "in/ref.png"}, SETTINGS).uses_default_video
    off = dataclasses.replace(SETTINGS, volume_root=None)
    err = error_of({"image_path": "in/ref.png"}, off)
    assert (err.field, err.code) == ("image_path", "path_forbidden")
    assert "VOLUME_ROOT=off" in err.message
    missing = error_of({"prompt": "dance"})
    assert "image_url, image_base64 or image_path" in missing.message
    for code in ("path_forbidden", "path_not_found", "path_not_file"):
        assert code in INPUT_ERROR_CODES


def test_output_url_needs_a_bucket() -> None:
    err = error_of({**IMG, "output": "url"})
    assert (err.field, err.code) == ("output", "bucket_not_configured")
    with_bucket = dataclasses.replace(
        SETTINGS,
        bucket_endpoint_url="http://s3.local",
        bucket_access_key_id=SecretStr("k"),
        bucket_secret_access_key=SecretStr("s"),
    )
    assert parse_job_input({**IMG, "output": "url"}, with_bucket).output == "url"


@pytest.mark.parametrize(
    ("asked", "cap", "expected"),
    [(81, 241, 81), (5, 241, 5), (8, 241, 5), (100, 241, 97), (1000, 241, 241), (1000, 100, 97)],
)
def test_max_frames_is_capped_and_4n_plus_1(asked: int, cap: int, expected: int) -> None:
    settings = dataclasses.replace(SETTINGS, max_frames=cap)
    assert parse_job_input({**IMG, "max_frames": asked}, settings).max_frames == expected


def test_max_frames_is_unset_by_default_and_uncapped_without_max_frames_setting() -> None:
    settings = dataclasses.replace(SETTINGS, max_frames=None)
    assert parse_job_input(IMG, settings).max_frames is None
    assert parse_job_input({**IMG, "max_frames": 2000}, settings).max_frames == 1997


@pytest.mark.parametrize(
    ("value", "reason"),
    [(0, "between 0.1 and 3600"), (4000, "between 0.1 and 3600"), ("5", "must be a number")],
)
def test_max_seconds_is_checked(value: object, reason: str) -> None:
    with pytest.raises(InputError) as err:
        parse_job_input({**IMG, "max_seconds": value}, SETTINGS)
    assert err.value.field == "max_seconds" and reason in err.value.message
    assert parse_job_input({**IMG, "max_seconds": 12}, SETTINGS).max_seconds == 12


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (0, "must be between 4 and 64 (got 0)"),
        (68, "must be between 4 and 64 (got 68)"),
        (18, "must be a multiple of 4 (got 18)"),
        ("16", "must be an integer, not a string"),
        (16.0, "must be an integer, not a number"),
    ],
)
def test_context_overlap_is_checked(value: object, reason: str) -> None:
    with pytest.raises(InputError) as err:
        parse_job_input({**IMG, "context_overlap": value}, SETTINGS)
    assert err.value.field == "context_overlap" and reason in err.value.message
    assert parse_job_input(IMG, SETTINGS).context_overlap is None
    assert parse_job_input({**IMG, "context_overlap": 16}, SETTINGS).context_overlap == 16


def test_resolve_size_without_auto_size_keeps_the_fields() -> None:
    assert parse(width=512, height=896).resolve_size(2000, 1000) == (512, 896)
    assert parse().resolve_size(2000, 1000) == (416, 672)


@pytest.mark.parametrize(
    ("fields", "image", "expected"),
    [
        ({"width": 512}, (1080, 1920), (512, 896)),
        ({"height": 512}, (1920, 1080), (896, 512)),
        ({"width": 640, "height": 640}, (1080, 1920), (640, 640)),
        ({}, (1000, 1000), (544, 544)),
        ({}, (1080, 1920), (384, 704)),
        ({}, (1920, 1080), (704, 384)),
        ({"width": 1280}, (4000, 100), (1280, MIN_SIDE)),
        ({"height": 1280}, (4000, 100), (MAX_SIDE, 1280)),
    ],
)
def test_resolve_size_with_auto_size(
    fields: dict[str, int], image: tuple[int, int], expected: tuple[int, int]
) -> None:
    width, height = parse(auto_size=True, **fields).resolve_size(*image)
    assert (width, height) == expected
    assert width % 32 == 0 and height % 32 == 0
    assert MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE


def test_auto_size_follows_the_aspect_ratio() -> None:
    for iw, ih in [(720, 1280), (1280, 720), (900, 1200), (3000, 2000)]:
        w, h = parse(auto_size=True).resolve_size(iw, ih)
        assert abs(w / h - iw / ih) / (iw / ih) < 0.12, (iw, ih, w, h)


def test_resolve_seed() -> None:
    assert parse(seed=0).resolve_seed() == 0
    assert parse(seed=1234).resolve_seed() == 1234
    job = parse(seed=-1)
    seeds = {job.resolve_seed() for _ in range(20)}
    assert len(seeds) > 1
    assert all(0 <= s <= RANDOM_SEED_MAX for s in seeds)


def test_error_codes_are_documented_in_the_module() -> None:
    import xicon_dance.schema as schema

    doc = schema.__doc__ or ""
    for code in INPUT_ERROR_CODES:
        assert re.search(rf"``{code}``", doc), code
