"""Workflow template and patching.

Contract:
- ``Workflow.load(path, settings) -> Workflow`` reads the API-format graph once and checks the role
  table against it; a mismatch raises ``ConfigError`` naming the node id, expected class and input.
- ``ROLES``: one declarative table, role -> (node id, expected class_type, input name).
- ``Workflow.build(params: PatchParams) -> dict``: a patched deep copy; the template is never
  mutated.
- ``PatchParams``: image_name, video_name (paths relative to ComfyUI's input folder), width, height,
  fps, frame_load_cap, steps, cfg, seed, prompt, negative_prompt, filename_prefix,
  attention_mode, pose_render_device, base_precision, torch_compile and resident_transformer
  (``gpu_profile``; the last is node 348's ``force_offload`` and node 327's (CLIP vision),
  inverted),
  context_overlap (the job's, or None: the template's, node 355). Derived values (pose size =
  half the generation size) are written here, nowhere else.
- ``torch_compile``: ``build`` adds ``COMPILE_NODE`` (``WanVideoTorchCompileSettings``: inductor,
  default mode, static shapes, the transformer's blocks only, ``allow_unmerged_lora_compile`` on
  because the scaled-fp8 checkpoint keeps its LoRA unmerged and every LoRA'd linear would
  otherwise break the graph) and links it to the model loader's ``compile_args`` (node 22); the
  sampler compiles the blocks when it runs. Off: the graph has no such node.
- The driving video reaches node 130 already transcoded (``xicon_dance.clip``) to the generation
  size, the job's fps and exactly ``frame_load_cap`` frames: node 130 loads it as it is
  (``force_rate`` 0, ``custom_width``/``custom_height`` 0), so no frame exists in ComfyUI at the
  source's size or rate. Node 334 (``NLFPredict``) runs in batches of ``POSE_BATCH`` frames (-1
  would put the whole clip through the pose model at once).
- ``BYPASSED``: nodes the built graph leaves out because the worker already did their work. Node
  131 (``ImageResizeKJv2``, driving frames -> generation size) is an exact identity on the
  transcoded clip (equal size: the crop keeps the whole frame, a same-size interpolation returns
  its input), yet it writes a new float32 copy of every frame, which ComfyUI keeps for the whole
  job (4.8 GB for 60 s at 416x672), and on the GPU it moves every frame there and back (4.9 s for
  60 s on an H200). ``build`` removes it and links its consumers to node 130's frames. The
  template keeps it, for a run of the template without the worker; ``check_roles`` requires it,
  when present, to be that resize of ``["130", 0]`` and to be read at its output 0 only.

Details:
- Audio: ``build`` removes node 139's ``audio`` input (the template links it to ``["130", 2]``),
  so VHS_VideoCombine writes a silent video and the worker adds the driving clip's audio itself
  (``xicon_dance.remux``: copied, not re-encoded). With the link, node 130's whole output, every
  frame of the clip, would stay alive until node 139, the last node, has run.
- ``unique_prefix(job_id)`` gives a per-job ``filename_prefix`` (no path separators), so two
  jobs never read each other's output and the output file can be found and removed.
- ``Workflow.adopt_model_aliases(listed, aliases)``: for each model-file input of the template
  (``graph_check.MODEL_FILE_INPUTS``) whose file ComfyUI does not list but one of its aliases
  (``model_manifest.json``) it does, the template uses the alias from then on; returns
  ``{"<node>.<input>": alias}``. Called once at start-up with ComfyUI's live lists.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .graph_check import MODEL_FILE_INPUTS
from .settings import Settings

log = logging.getLogger(__name__)

# node id -> (class_type, the link its output 0 is replaced by); see the module doc.
BYPASSED: dict[str, tuple[str, list[Any]]] = {"131": ("ImageResizeKJv2", ["130", 0])}


@dataclass(frozen=True)
class Role:
    node: str
    class_type: str
    input: str
    optional: bool = False


ROLES: dict[str, Role] = {
    "image": Role("106", "LoadImage", "image"),
    "video": Role("130", "VHS_LoadVideo", "video"),
    "load_fps": Role("130", "VHS_LoadVideo", "force_rate"),
    "load_width": Role("130", "VHS_LoadVideo", "custom_width"),
    "load_height": Role("130", "VHS_LoadVideo", "custom_height"),
    "frame_load_cap": Role("130", "VHS_LoadVideo", "frame_load_cap"),
    "width": Role("203", "INTConstant", "value"),
    "height": Role("204", "INTConstant", "value"),
    "pose_width": Role("205", "INTConstant", "value"),
    "pose_height": Role("206", "INTConstant", "value"),
    "cfg": Role("238", "FloatConstant", "value"),
    "seed": Role("348", "WanVideoSamplerv2", "seed"),
    "steps": Role("349", "WanVideoSchedulerv2", "steps"),
    "prompt": Role("368", "WanVideoTextEncodeCached", "positive_prompt"),
    "negative_prompt": Role("368", "WanVideoTextEncodeCached", "negative_prompt"),
    "output_fps": Role("139", "VHS_VideoCombine", "frame_rate"),
    "filename_prefix": Role("139", "VHS_VideoCombine", "filename_prefix"),
    "audio": Role("139", "VHS_VideoCombine", "audio", optional=True),
    "attention_mode": Role("22", "WanVideoModelLoader", "attention_mode"),
    "base_precision": Role("22", "WanVideoModelLoader", "base_precision"),
    "pose_render_device": Role("362", "RenderNLFPoses", "render_device"),
    "pose_batch": Role("334", "NLFPredict", "per_batch"),
    "context_overlap": Role("355", "WanVideoContextOptions", "context_overlap"),
    "force_offload": Role("348", "WanVideoSamplerv2", "force_offload"),
    "clip_force_offload": Role("327", "WanVideoClipVisionEncode", "force_offload"),
}
# NLFPredict frames per pass: bounded GPU memory for any clip length, still a full GPU batch.
POSE_BATCH = 32


# The node ``build`` adds for ``torch_compile`` (an id the template does not use) and its inputs:
# WanVideoWrapper's WanVideoTorchCompileSettings (nodes_model_loading.py, the pinned commit).
COMPILE_NODE = "900"
COMPILE_SETTINGS: dict[str, Any] = {
    "backend": "inductor",
    "fullgraph": False,
    "mode": "default",
    "dynamic": False,
    "dynamo_cache_size_limit": 64,
    "compile_transformer_blocks_only": True,
    "dynamo_recompile_limit": 128,
    "force_parameter_static_shapes": False,
    "allow_unmerged_lora_compile": True,
}


@dataclass(frozen=True)
class PatchParams:
    image_name: str
    video_name: str
    width: int
    height: int
    fps: int
    frame_load_cap: int
    steps: int
    cfg: float
    seed: int
    prompt: str
    negative_prompt: str
    filename_prefix: str
    attention_mode: str
    pose_render_device: str
    base_precision: str = "bf16"
    context_overlap: int | None = None  # None: the template's
    torch_compile: bool = False
    resident_transformer: bool = False  # the transformer and CLIP vision stay on the GPU

    def values(self) -> dict[str, Any]:
        """Role -> value, derived values included (pose size is half the generation size)."""
        overlap = {} if self.context_overlap is None else {"context_overlap": self.context_overlap}
        return overlap | {
            "image": self.image_name,
            "video": self.video_name,
            "load_fps": 0,  # the file is at the job's fps already: every frame, as it is
            "load_width": 0,
            "load_height": 0,
            "frame_load_cap": self.frame_load_cap,
            "width": self.width,
            "height": self.height,
            "pose_width": self.width // 2,
            "pose_height": self.height // 2,
            "cfg": float(self.cfg),
            "seed": self.seed,
            "steps": self.steps,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "output_fps": self.fps,
            "filename_prefix": self.filename_prefix,
            "attention_mode": self.attention_mode,
            "base_precision": self.base_precision,
            "pose_render_device": self.pose_render_device,
            "pose_batch": POSE_BATCH,
            "force_offload": not self.resident_transformer,
            "clip_force_offload": not self.resident_transformer,
        }


def unique_prefix(job_id: str, base: str = "xicon_dance") -> str:
    """A filename_prefix unique to this job: safe characters only, plus a random suffix."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", job_id)[:48] or "job"
    return f"{base}_{safe}_{uuid.uuid4().hex[:8]}"


class Workflow:
    """The loaded, checked template. ``build`` returns patched copies."""

    def __init__(self, template: dict[str, Any], source: str = "<memory>") -> None:
        check_roles(template, source)
        self._template = template
        self.source = source

    @classmethod
    def load(cls, path: Path, settings: Settings | None = None) -> Workflow:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"Workflow template {path} cannot be read ({exc.strerror or exc}); "
                "check WORKFLOW_PATH.",
                field="WORKFLOW_PATH",
            ) from None
        try:
            graph = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"Workflow template {path} is not valid JSON (line {exc.lineno}: {exc.msg}).",
                field="WORKFLOW_PATH",
            ) from None
        workflow = cls(graph, str(path))
        log.info("workflow template %s loaded: %d nodes, roles checked", path, len(graph))
        return workflow

    @property
    def template(self) -> dict[str, Any]:
        """A deep copy of the template (the original is never handed out)."""
        return copy.deepcopy(self._template)

    def model_inputs(self) -> list[tuple[str, str, str]]:
        """(node id, class_type, input) of every model-file input of the template."""
        return [
            (node_id, node["class_type"], name)
            for node_id, node in self._template.items()
            for name in node.get("inputs", {})
            if (node.get("class_type"), name) in MODEL_FILE_INPUTS
        ]

    def adopt_model_aliases(
        self, listed: dict[tuple[str, str], list[str]], aliases: dict[str, tuple[str, ...]]
    ) -> dict[str, str]:
        """Point model inputs whose file is not listed at a listed alias (see module doc)."""
        adopted = {}
        for node_id, class_type, name in self.model_inputs():
            inputs = self._template[node_id]["inputs"]
            available = listed.get((class_type, name))
            if available is None or inputs[name] in available:
                continue
            alias = next((a for a in aliases.get(inputs[name], ()) if a in available), None)
            if alias is not None:
                log.info(
                    "node %s (%s): %s is absent, using %s", node_id, class_type, inputs[name], alias
                )
                inputs[name] = alias
                adopted[f"{node_id}.{name}"] = alias
        return adopted

    def build(self, params: PatchParams) -> dict[str, Any]:
        graph = copy.deepcopy(self._template)
        for role, value in params.values().items():
            spec = ROLES[role]
            graph[spec.node]["inputs"][spec.input] = value
        for node_id, (_class_type, source) in BYPASSED.items():
            if graph.pop(node_id, None) is not None:
                for _link_node, inputs, name in _links_to(graph, node_id):
                    inputs[name] = list(source)
        audio = ROLES["audio"]
        graph[audio.node]["inputs"].pop(audio.input, None)
        if params.torch_compile:
            graph[COMPILE_NODE] = {
                "class_type": "WanVideoTorchCompileSettings",
                "inputs": dict(COMPILE_SETTINGS),
                "_meta": {"title": "torch.compile (TORCH_COMPILE)"},
            }
            loader = ROLES["base_precision"].node
            graph[loader]["inputs"]["compile_args"] = [COMPILE_NODE, 0]
        return graph


def check_roles(graph: Any, source: str = "<memory>") -> None:
    """Raise ``ConfigError`` naming the first node whose id, class or input does not match."""
    if not isinstance(graph, dict) or not graph:
        raise ConfigError(
            f"Workflow template {source} must be a non-empty API-format JSON object "
            "(node id -> {class_type, inputs}); was it saved with 'Export (API)'?",
            field="WORKFLOW_PATH",
        )
    for role, spec in ROLES.items():
        node = graph.get(spec.node)
        where = f"Workflow template {source}: node {spec.node} ({spec.class_type}, role {role})"
        if not isinstance(node, dict) or not isinstance(node.get("inputs"), dict):
            raise ConfigError(f"{where} is missing or has no inputs.", field="WORKFLOW_PATH")
        if node.get("class_type") != spec.class_type:
            raise ConfigError(
                f"{where} has class_type {node.get('class_type')!r}, expected {spec.class_type!r}.",
                field="WORKFLOW_PATH",
            )
        if not spec.optional and spec.input not in node["inputs"]:
            raise ConfigError(f"{where} has no input {spec.input!r}.", field="WORKFLOW_PATH")
    for node_id, (class_type, link) in BYPASSED.items():
        _check_bypassed(graph, node_id, class_type, link, f"Workflow template {source}")


def _is_link(value: Any) -> bool:
    """An API-format link: ``[node id, output index]``."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    )


def _links_to(graph: dict[str, Any], node_id: str) -> list[tuple[str, dict[str, Any], str]]:
    """(node id, its inputs, input name) of every input linked to an output of ``node_id``."""
    return [
        (other, node["inputs"], name)
        for other, node in graph.items()
        if isinstance(node, dict) and isinstance(node.get("inputs"), dict)
        for name, value in node["inputs"].items()
        if _is_link(value) and value[0] == node_id
    ]


def _check_bypassed(
    graph: dict[str, Any], node_id: str, class_type: str, source: list[Any], template: str
) -> None:
    """A node ``build`` leaves out must be what it is taken for, or absent (see module doc)."""
    node = graph.get(node_id)
    if node is None:
        return
    where = f"{template}: node {node_id}"
    inputs = node.get("inputs") if isinstance(node, dict) else None
    if not isinstance(inputs, dict) or node.get("class_type") != class_type:
        raise ConfigError(
            f"{where} must be of class {class_type} (the driving frames' resize, which the worker "
            f"leaves out), found {node.get('class_type') if isinstance(node, dict) else node!r}.",
            field="WORKFLOW_PATH",
        )
    if inputs.get("image") != source:
        raise ConfigError(
            f"{where} ({class_type}) must resize {source!r} (the driving frames), "
            f"found {inputs.get('image')!r}.",
            field="WORKFLOW_PATH",
        )
    for other, inputs_of, name in _links_to(graph, node_id):
        if inputs_of[name][1] != 0:
            raise ConfigError(
                f"{where} ({class_type}) is read at output {inputs_of[name][1]} by node "
                f"{other} input {name!r}; only its frames (output 0) can be replaced by "
                f"{source!r}.",
                field="WORKFLOW_PATH",
            )
