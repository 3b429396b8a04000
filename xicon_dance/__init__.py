"""XiCON Dance SCAIL worker: reference image + driving video -> dance video, on ComfyUI.

Pipeline, one module per stage:
settings -> schema (job input) -> media (inputs) -> workflow (graph patching) -> comfy (client)
-> delivery (bucket or base64) -> job (per-job orchestration) -> handler.py (RunPod entry).
"""

__version__ = "0.1.0"
