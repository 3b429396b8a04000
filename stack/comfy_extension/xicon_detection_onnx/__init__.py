"""xicon_detection_onnx: let ComfyUI list ``.onnx`` files in ``models/detection``.

Why: since ComfyUI registers the ``detection`` model folder itself (with the PyTorch extension list,
v0.33.0 ``folder_paths.py`` line 67), ``.onnx`` files there are filtered out of every file list.
ComfyUI-WanAnimatePreprocess (``OnnxDetectionModelLoader``) keeps its ViTPose and YOLO models in
that folder as ``.onnx`` and relies on ``add_model_folder_path`` creating the folder with an empty
extension set (any file). With the upstream registration its two model lists are empty, and every
prompt using the node fails validation with ``value_not_in_list``.

What: at import (ComfyUI loads custom nodes after ``folder_paths`` and the extra model paths),
replace the ``detection`` entry by the same path list with ``.onnx`` added to a *copy* of its
extension set (the set object is shared by every PyTorch model folder and must not change). A no-op
when the folder accepts any extension (empty set) or already lists ``.onnx``: once upstream fixes
it, this does nothing. Registers no node.
"""

from __future__ import annotations

import logging

import folder_paths

FOLDER = "detection"
EXTENSION = ".onnx"
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}


def allow_onnx(registry: dict) -> bool:
    """Add ``.onnx`` to the detection folder's extensions; True when something changed."""
    entry = registry.get(FOLDER)
    if entry is None:
        return False
    paths, extensions = entry
    if not extensions or EXTENSION in extensions:
        return False
    registry[FOLDER] = (paths, {*extensions, EXTENSION})
    return True


if allow_onnx(folder_paths.folder_names_and_paths):
    folder_paths.filename_list_cache.pop(FOLDER, None)
    logging.info("xicon_detection_onnx: .onnx files in models/%s are listed", FOLDER)
