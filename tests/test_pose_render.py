"""The import hook and the pieces of the project's extension ``xicon_pose_render``, on a stand-in
SCAIL-Pose laid out and named as ComfyUI loads it (and a stand-in ``taichi``): only that pack's
``NLFPoseExtract.nlf_render`` is touched, only while upstream's source is the pinned one and the
setting is on; the overlay equals upstream's scatter; ``taichi.init`` is skipped only when called
as last time on a live runtime. The frames against the pinned pack and real taichi:
``tests/realstack/test_pose_render.py``."""

from __future__ import annotations

import importlib
import inspect
import sys
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.plugins.modules import forget, load_file, load_pack

ROOT = Path(__file__).resolve().parent.parent
pr = load_file(
    ROOT / "stack" / "comfy_extension" / "xicon_pose_render" / "pose_render.py",
    "xicon_pose_render_under_test",
)

FILES = {
    "__init__.py": "from .nodes import RenderNLFPoses\n",
    "nodes.py": (
        "class RenderNLFPoses:\n"
        "    def predict(self, nlf_poses, width, height):\n"
        "        import taichi as ti\n"
        "        ti.init(arch='gpu')\n"
    ),
    "render_3d/taichi_cylinder.py": (
        "def flatten_specs(specs_list):\n    return specs_list\n\n"
        "def render_whole(specs_list, H=480, W=640, fx=500, fy=500, cx=240, cy=320, radius=21.5):\n"
        "    return 'upstream render'\n"
    ),
    "pose_draw/draw_utils.py": (
        "CALLS = []\n\ndef hsv_to_rgb(hsv):\n"
        "    import numpy as np\n    CALLS.append(list(hsv))\n"
        "    return np.asarray(hsv, dtype=np.float32) * 255\n"
    ),
    "pose_draw/draw_pose_utils.py": (
        "from .draw_utils import hsv_to_rgb\nDRAWN = []\n\n"
        "def draw_pose_to_canvas_np(poses, pool, H, W, reshape_scale, **flags):\n"
        "    import numpy as np\n"
        "    DRAWN.append(dict(flags, pool=pool, reshape_scale=reshape_scale))\n"
        "    return [np.full((H, W, 3), 7, np.uint8) for _ in poses]\n"
    ),
    "NLFPoseExtract/nlf_render.py": (
        "from ..render_3d.taichi_cylinder import render_whole as render_whole_taichi\n"
        "from ..pose_draw.draw_pose_utils import draw_pose_to_canvas_np\n"
        "CALLS = []\n\n"
        "def render_nlf_as_images(smpl_poses, dw_poses, height, width, video_length,"
        " intrinsic_matrix=None, draw_2d=True, draw_face=True, draw_hands=True,"
        " render_backend='taichi'):\n"
        "    import numpy as np\n    CALLS.append(draw_2d)\n"
        "    return [np.zeros((height, width, 4), np.uint8) for _ in range(video_length)]\n\n"
        "def render_multi_nlf_as_images(*args, **kwargs):\n    return []\n"
    ),
}


def stand_in_pack(tmp: Path, folder: str = "ComfyUI-SCAIL-Pose") -> str:
    """The pack's files, imported under the name ComfyUI gives a custom node (its path, dots
    replaced); returns that name."""
    pack = tmp / "custom_nodes" / folder
    for rel, text in FILES.items():
        path = pack / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return load_pack(pack)


def fake_taichi() -> types.ModuleType:
    """``taichi`` as far as the extension uses it: ``init`` and the runtime's ``prog``."""
    ti = types.ModuleType("taichi")
    runtime = types.SimpleNamespace(prog=None)
    ti.inits = []  # type: ignore[attr-defined]

    def init(*args: Any, **kwargs: Any) -> None:
        ti.inits.append((args, kwargs))  # type: ignore[attr-defined]
        runtime.prog = object()

    ti.init = init  # type: ignore[attr-defined]
    ti.gpu = "arch:gpu"  # type: ignore[attr-defined]
    ti.runtime = runtime  # type: ignore[attr-defined]
    ti.lang = types.SimpleNamespace(  # type: ignore[attr-defined]
        impl=types.SimpleNamespace(get_runtime=lambda: runtime)
    )
    return ti


@pytest.fixture
def hooked(monkeypatch: pytest.MonkeyPatch) -> list:
    meta_path = list(sys.meta_path)
    monkeypatch.setattr(sys, "meta_path", meta_path)
    monkeypatch.setitem(sys.modules, "taichi", fake_taichi())
    monkeypatch.delenv(pr.ENV, raising=False)
    assert pr.install(meta_path) is True
    assert pr.install(meta_path) is False  # once
    return meta_path


def digest_of_stand_in(tmp: Path) -> str:
    """The stand-in's digest, from a copy imported under a name the hook does not act on (the
    sources are the same text, so the digest is the one the hooked copy will have)."""
    name = stand_in_pack(tmp, folder="SCAIL-Pose-digest")
    try:
        nlf_render = importlib.import_module(name + ".NLFPoseExtract.nlf_render")
        return pr.upstream_digest(pr.upstream_modules(nlf_render))
    finally:
        forget(name)


def test_the_pinned_source_gets_the_replacements(
    tmp_path: Path, hooked: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pr, "UPSTREAM_SHA256", digest_of_stand_in(tmp_path))
    name = stand_in_pack(tmp_path)
    try:
        nlf_render = importlib.import_module(name + ".NLFPoseExtract.nlf_render")
        draw_utils = sys.modules[name + ".pose_draw.draw_utils"]
        ti = sys.modules["taichi"]
        assert getattr(nlf_render.render_nlf_as_images, pr.REPLACED) is True
        assert isinstance(nlf_render.render_whole_taichi, pr.Renderer)
        assert getattr(draw_utils.hsv_to_rgb, pr.REPLACED) is True
        assert isinstance(ti.init, pr.KeptInit)
        # the node returns the output its render made batch by batch (upstream's as __wrapped__)
        predict = sys.modules[name + ".nodes"].RenderNLFPoses.predict
        assert getattr(predict, pr.REPLACED) is True
        assert "ti.init(arch='gpu')" in inspect.getsource(predict)
        assert pr.patch(nlf_render, env={}) == "already in place"  # not twice
        # the 3D pass is upstream's without its 2D pass; the 2D pass is drawn as upstream draws
        # it (these poses are not one person's: upstream's own pass, pose by pose) and laid over
        # every frame
        frames = nlf_render.render_nlf_as_images(None, [{}, {}], 4, 3, 2)
        assert nlf_render.CALLS == [False]
        drawn = sys.modules[name + ".pose_draw.draw_pose_utils"].DRAWN
        assert drawn == 2 * [
            {
                "pool": None,
                "reshape_scale": 0,
                "show_feet_flag": False,
                "show_body_flag": False,
                "show_cheek_flag": True,
                "dw_hand": True,
                "show_face_flag": True,
                "show_hand_flag": True,
            }
        ]
        assert len(frames) == 2 and all(
            (f[..., :3] == 7).all() and (f[..., 3] == 0).all() for f in frames
        )
        # without a 2D pass nothing is drawn
        nlf_render.render_nlf_as_images(None, [{}], 4, 3, 1, draw_2d=False)
        nlf_render.render_nlf_as_images(None, None, 4, 3, 1)
        assert len(drawn) == 2
    finally:
        forget(name)


def test_a_changed_upstream_is_left_alone(tmp_path: Path, hooked: list) -> None:
    name = stand_in_pack(tmp_path)
    try:
        nlf_render = importlib.import_module(name + ".NLFPoseExtract.nlf_render")
        assert not hasattr(nlf_render.render_nlf_as_images, pr.REPLACED)
        assert nlf_render.render_whole_taichi(None) == "upstream render"
        assert "upstream's pose render changed" in pr.patch(nlf_render, env={})
        assert not isinstance(sys.modules["taichi"].init, pr.KeptInit)
    finally:
        forget(name)


def test_the_setting_turns_it_off(
    tmp_path: Path, hooked: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pr, "UPSTREAM_SHA256", digest_of_stand_in(tmp_path))
    monkeypatch.setenv(pr.ENV, "off")
    name = stand_in_pack(tmp_path)
    try:
        nlf_render = importlib.import_module(name + ".NLFPoseExtract.nlf_render")
        assert not hasattr(nlf_render.render_nlf_as_images, pr.REPLACED)
        assert pr.patch(nlf_render) == "off (XICON_POSE_RENDER)"
    finally:
        forget(name)
    assert pr.enabled({}) and pr.enabled({pr.ENV: "on"})


def test_the_stream_setting_leaves_the_nodes_tail_as_upstreams(
    tmp_path: Path, hooked: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pr, "UPSTREAM_SHA256", digest_of_stand_in(tmp_path))
    monkeypatch.setenv(pr.STREAM_ENV, "off")
    name = stand_in_pack(tmp_path)
    try:
        nlf_render = importlib.import_module(name + ".NLFPoseExtract.nlf_render")
        assert getattr(nlf_render.render_nlf_as_images, pr.REPLACED) is True  # the rest is on
        predict = sys.modules[name + ".nodes"].RenderNLFPoses.predict
        assert not hasattr(predict, pr.REPLACED)
        # without the node's request the render lists its frames, whatever the setting
        assert pr.current_sink() is None
        assert len(nlf_render.render_nlf_as_images(None, [{}, {}], 4, 3, 2)) == 2
    finally:
        forget(name)
    assert not any(pr.enabled({pr.ENV: v}) for v in ("0", "off", "False", " no "))


def test_other_packs_are_not_touched(tmp_path: Path, hooked: list) -> None:
    name = stand_in_pack(tmp_path, folder="SomeOtherPack")
    try:
        nlf_render = importlib.import_module(name + ".NLFPoseExtract.nlf_render")
        assert not hasattr(nlf_render.render_nlf_as_images, pr.REPLACED)
        finder = next(f for f in hooked if isinstance(f, pr.Finder))
        assert finder.find_spec(name + ".NLFPoseExtract.nlf_render", None) is None
    finally:
        forget(name)


def test_the_overlay_is_upstreams_scatter() -> None:
    rng = np.random.default_rng(1)
    cases = []
    for _ in range(20):  # a sparse skeleton in a band of rows, as drawn
        canvas = np.zeros((30, 20, 3), np.uint8)
        top = int(rng.integers(0, 25))
        canvas[top : top + 5] = rng.integers(0, 3, (5, 20, 3)) * 90
        cases.append(canvas)
    for _ in range(20):  # a sparse skeleton in a box of rows and columns
        canvas = np.zeros((30, 20, 3), np.uint8)
        top, left = int(rng.integers(0, 25)), int(rng.integers(0, 16))
        canvas[top : top + 5, left : left + 4] = rng.integers(0, 3, (5, 4, 3)) * 90
        cases.append(canvas)
    cases += [np.zeros((30, 20, 3), np.uint8), np.full((30, 20, 3), 9, np.uint8)]
    for canvas in cases:
        frame = rng.integers(0, 255, (30, 20, 4), dtype=np.uint8)
        expected = frame.copy()
        mask = canvas != 0
        expected[:, :, :3][mask] = canvas[mask]
        pr.lay_over(frame, canvas)
        assert np.array_equal(frame, expected)
    # another dtype goes through upstream's own statement
    frame = np.zeros((2, 2, 4), np.float32)
    pr.lay_over(frame, np.full((2, 2, 3), 3, np.uint8))
    assert (frame[..., :3] == 3).all() and (frame[..., 3] == 0).all()


def test_hsv_is_computed_once_per_input_and_copied() -> None:
    calls: list[Any] = []

    def hsv_to_rgb(hsv: Any) -> np.ndarray:
        calls.append(list(hsv))
        return np.asarray(hsv, dtype=np.float32) * 255

    remembered = pr.remembered(hsv_to_rgb)
    first = remembered([0.05, 1.0, 1.0])
    first[0] = -1  # the caller's copy: the cache keeps its own
    again = remembered([0.05, 1.0, 1.0])
    assert again.tolist() == pytest.approx([12.75, 255.0, 255.0])
    remembered([0.1, 1.0, 1.0])
    assert calls == [[0.05, 1.0, 1.0], [0.1, 1.0, 1.0]]


def test_taichi_init_is_skipped_only_when_nothing_changed() -> None:
    ti = fake_taichi()
    kept = pr.KeptInit(ti.init, ti)
    kept(arch="gpu")
    kept(arch="gpu")  # the same arguments, the runtime up: nothing to do
    assert len(ti.inits) == 1 and kept.initialised == 1
    kept(arch="cpu")  # another device: a new runtime
    assert len(ti.inits) == 2
    ti.runtime.prog = None  # someone reset taichi: initialise again
    kept(arch="cpu")
    assert len(ti.inits) == 3


def test_kernels_are_kept_per_constants_and_dropped_with_their_runtime(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ti = fake_taichi()
    monkeypatch.setitem(sys.modules, "taichi", ti)
    renderer_module = sys.modules[pr.Renderer.__module__]  # renderer.py, loaded by pose_render.py
    monkeypatch.setattr(renderer_module, "build_kernel", lambda *constants: object())
    renderer = pr.Renderer(lambda specs: specs)
    ti.init()
    first = renderer.kernel(4, 3, 1.0, 1.0, 2.0, 1.5, 21.5, 10000)
    assert renderer.kernel(4, 3, 1.0, 1.0, 2.0, 1.5, 21.5, 10000) is first
    other = renderer.kernel(4, 3, 2.0, 1.0, 2.0, 1.5, 21.5, 10000)  # another camera
    assert other is not first and renderer.compiled == 2
    ti.init()  # a new runtime: the old one's kernels are gone
    assert renderer.kernel(4, 3, 1.0, 1.0, 2.0, 1.5, 21.5, 10000) is not first
    assert renderer.compiled == 3 and len(renderer.kernels) == 1


class Executor:
    """ComfyUI's ``PromptExecutor`` as the warm start sees it: built once nodes are loaded."""

    def __init__(self, server: str) -> None:
        self.server = server


def test_taichi_starts_once_the_nodes_are_loaded(
    tmp_path: Path, hooked: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pr, "UPSTREAM_SHA256", digest_of_stand_in(tmp_path))
    executor = type("PromptExecutor", (Executor,), {})
    results: list[tuple[str, str]] = []

    def target() -> None:  # what runs, and on which thread
        results.append((pr.warm(), threading.current_thread().name))

    name = stand_in_pack(tmp_path)  # loaded as ComfyUI loads it; nlf_render not imported yet
    try:
        assert name + ".NLFPoseExtract.nlf_render" not in sys.modules
        line = pr.install_warm(executor, {}, lambda: True, target=target)
        assert line == "taichi starts on the prompt worker once ComfyUI has loaded its nodes"
        assert pr.install_warm(executor, {}, lambda: True) == "taichi's start already arranged"
        assert results == []  # nothing before the prompt worker builds its executor
        built: list[Any] = []
        worker = threading.Thread(
            target=lambda: built.extend([executor("server"), executor("again")]),
            name="prompt-worker",
        )
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive()
        assert built[0].server == "server"  # upstream's __init__ ran
        # once, however many executors, on the thread that built the first: taichi compiles
        # only on the thread that started it
        assert len(results) == 1 and results[0][1] == "prompt-worker"
        assert results[0][0].startswith("taichi started for the first render in ")
        ti = sys.modules["taichi"]
        assert ti.inits == [((), {"arch": "arch:gpu"})]
        # the hook put the replacements in place on the way, and the node's own call (the
        # shipped graph's render_device "gpu") finds the runtime up
        nlf_render = sys.modules[name + ".NLFPoseExtract.nlf_render"]
        assert getattr(nlf_render.render_nlf_as_images, pr.REPLACED) is True
        assert isinstance(ti.init, pr.KeptInit)
        ti.init(arch=ti.gpu)
        assert len(ti.inits) == 1
        ti.init(arch="cpu")  # another device: initialised as upstream does
        assert len(ti.inits) == 2
    finally:
        forget(name)


@pytest.mark.parametrize(
    ("env", "cuda", "line"),
    [
        ({"XICON_POSE_RENDER": "off"}, True, "off (XICON_POSE_RENDER)"),
        (
            {"XICON_POSE_RENDER_WARM": "off"},
            True,
            "taichi starts with the first render (XICON_POSE_RENDER_WARM)",
        ),
        ({}, False, "no CUDA device; taichi starts with the first render"),
    ],
)
def test_no_early_start_when_off_or_without_cuda(env: dict, cuda: bool, line: str) -> None:
    executor = type("PromptExecutor", (Executor,), {})
    original = executor.__init__
    assert pr.install_warm(executor, env, lambda: cuda, target=pytest.fail) == line
    assert executor.__init__ is original
    executor("server")


def test_no_early_start_for_a_changed_upstream_or_a_missing_pack(
    tmp_path: Path, hooked: list
) -> None:
    missing = pr.warm(modules={})
    assert missing == "ComfyUI-SCAIL-Pose not loaded; taichi starts with the first render"
    name = stand_in_pack(tmp_path)  # its digest is not the pinned one: the hook leaves it alone
    try:
        assert pr.warm() == "the render is upstream's; taichi starts with the first render"
        assert sys.modules["taichi"].inits == []
    finally:
        forget(name)


def test_a_failed_early_start_is_logged_and_leaves_the_render_to_start_taichi(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> str:
        raise RuntimeError("no driver")

    monkeypatch.setattr(pr, "warm", broken)
    executor = type("PromptExecutor", (Executor,), {})
    pr.install_warm(executor, {}, lambda: True)
    with caplog.at_level("ERROR", logger="xicon_pose_render"):
        assert executor("server").server == "server"  # the prompt worker still starts
    assert "taichi not started ahead; the first render starts it" in caplog.text
