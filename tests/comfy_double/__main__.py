"""Run the ComfyUI double as a standalone process (see the package docstring)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

from .server import ComfyDouble, Faults, PortInUse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.comfy_double", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--root", type=Path, required=True, help="folder with input/ and output/")
    p.add_argument("--object-info", type=Path, default=None)
    p.add_argument("--pid-file", type=Path, default=None)
    p.add_argument("--drop-socket-at-node", default=None)
    p.add_argument("--silent-socket", action="store_true")
    p.add_argument("--die-at-node", default=None)
    p.add_argument("--error-at-node", default=None)
    p.add_argument("--oom-at-node", default=None)
    p.add_argument("--node-errors-in-200", action="store_true")
    p.add_argument("--node-delay-s", type=float, default=0.0)
    p.add_argument("--step-delay-s", type=float, default=0.0)
    p.add_argument("--refuse-start-s", type=float, default=0.0)
    p.add_argument("--hang-at-node", default=None)
    p.add_argument("--view-stall-s", type=float, default=0.0)
    p.add_argument("--prompt-http-status", type=int, default=0)
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    faults = Faults(
        drop_socket_at_node=args.drop_socket_at_node,
        silent_socket=args.silent_socket,
        die_at_node=args.die_at_node,
        error_at_node=args.error_at_node,
        oom_at_node=args.oom_at_node,
        node_errors_in_200=args.node_errors_in_200,
        node_delay_s=args.node_delay_s,
        step_delay_s=args.step_delay_s,
        refuse_start_s=args.refuse_start_s,
        hang_at_node=args.hang_at_node,
        view_stall_s=args.view_stall_s,
        prompt_http_status=args.prompt_http_status,
    )
    double = ComfyDouble(
        args.root,
        host=args.host,
        port=args.port,
        object_info=args.object_info,
        faults=faults,
        exit_process_on_die=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await double.start()
    try:
        await stop.wait()
    finally:
        await double.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s comfy-double %(message)s")
    # No line per request (ComfyUI logs none either): a terminal shared with the worker stays
    # legible.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if args.pid_file:
        args.pid_file.write_text(str(os.getpid()))
    try:
        asyncio.run(serve(args))
    except PortInUse as exc:
        raise SystemExit(f"comfy-double: {exc.strerror}") from None


if __name__ == "__main__":
    main()
