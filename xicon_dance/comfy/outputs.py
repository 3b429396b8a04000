"""ComfyUI's outputs: the file items of a history entry (``output_files``) and their download
through ``/view`` (``download``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from ..errors import ComfyError, ComfyUnavailable

if TYPE_CHECKING:
    from .transport import ComfyTransport

OUTPUT_KEYS = ("gifs", "videos", "images")


@dataclass(frozen=True)
class OutputFile:
    filename: str
    subfolder: str = ""
    type: str = "output"
    format: str | None = None
    node: str | None = None

    def as_query(self) -> dict[str, str]:
        return {"filename": self.filename, "subfolder": self.subfolder, "type": self.type}


def output_files(outputs: dict[str, Any]) -> list[OutputFile]:
    """Every file item of history ``outputs`` under ``gifs``, ``videos`` or ``images``."""
    files: list[OutputFile] = []
    for node, ui in outputs.items():
        if not isinstance(ui, dict):
            continue
        for key in OUTPUT_KEYS:
            for item in ui.get(key) or []:
                if isinstance(item, dict) and item.get("filename"):
                    files.append(
                        OutputFile(
                            filename=str(item["filename"]),
                            subfolder=str(item.get("subfolder") or ""),
                            type=str(item.get("type") or "output"),
                            format=item.get("format"),
                            node=str(node),
                        )
                    )
    return files


async def download(comfy: ComfyTransport, item: OutputFile, dest: Path) -> Path:
    """Stream ``/view`` for ``item`` into ``dest`` (a file path, or a folder). A transfer
    that fails (no byte for ``download_read_timeout_s``, a dropped connection) is a
    ``ComfyUnavailable`` only when ComfyUI then does not answer either; otherwise it is a
    ``ComfyError`` for this job alone (code ``comfyui_output_unreadable``)."""
    target = dest / item.filename if dest.is_dir() else dest
    try:
        async with comfy.session.get(
            comfy.base_url + "/view",
            params=item.as_query(),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=comfy.download_read_timeout_s),
        ) as resp:
            if resp.status != 200:
                raise ComfyError(
                    f"ComfyUI has no output file {item.filename!r} (HTTP {resp.status}).",
                    code="comfyui_output_missing",
                )
            with target.open("wb") as fh:
                async for chunk in resp.content.iter_chunked(1024 * 1024):
                    fh.write(chunk)
    except (aiohttp.ClientError, TimeoutError) as exc:
        target.unlink(missing_ok=True)
        what = "timed out" if isinstance(exc, TimeoutError) else "failed"
        if await comfy.answers():
            raise ComfyError(
                f"Downloading {item.filename!r} from ComfyUI {what} "
                f"({type(exc).__name__}); ComfyUI itself still answers.",
                code="comfyui_output_unreadable",
            ) from None
        raise ComfyUnavailable(
            f"Downloading {item.filename!r} from ComfyUI {what} ({type(exc).__name__}) and "
            "ComfyUI no longer answers."
        ) from None
    return target
