"""Run the service: in one process, or as a split server's supervisor, engine or front-end.

Shared by `alarm-serve serve` and the benchmarks' server with free forwards
(`benchmarks.free_forwards`), so that both run the same way in every layout.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn

from service import front_ends
from service.allocator import loaded_allocator
from service.api import create_app
from service.api.app import ModelLoader
from service.config import ServiceSettings, load_reward_config
from service.engine_process import run_engine_process
from service.models import load_models


def serve(
    settings: ServiceSettings,
    load: ModelLoader = load_models,
    child_command: Sequence[str] | None = None,
) -> int:
    """Serve until stopped; the exit status. As configured (`front_ends`) and by the role the
    environment gives it: one process; a split server's supervisor, which starts
    `child_command` (default: this command line again) as its engine and front-ends; or one
    of those children. `load` builds the models (the benchmarks swap in free ones)."""
    role = os.environ.get(front_ends.ROLE_ENV)
    where = f"[{role} {os.getpid()}] " if role else ""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s",
    )
    if role is None and settings.front_ends > 0:
        return front_ends.supervise(settings, child_command)
    logging.getLogger(__name__).info("malloc: %s", loaded_allocator())
    config = load_reward_config(settings.config)
    if role == front_ends.ENGINE_ROLE:
        link = Path(os.environ[front_ends.LINK_ENV])
        return run_engine_process(settings, config, link, load)
    failure: list[str] = []
    server: uvicorn.Server | None = None

    def on_fatal(reason: str) -> None:
        failure.append(reason)
        if server is not None:
            server.should_exit = True

    sockets: list[socket.socket] | None = None
    split: dict[str, Any] = {}
    if role == front_ends.FRONT_END_ROLE:
        sockets = [socket.socket(fileno=int(os.environ[front_ends.LISTEN_FD_ENV]))]
        split = {
            "engine_link": Path(os.environ[front_ends.LINK_ENV]),
            "metrics_dir": Path(os.environ[front_ends.METRICS_DIR_ENV]),
        }
    app = create_app(settings, config, on_fatal=on_fatal, load=load, **split)
    state = app.state.alarm
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
        )
    )
    code = 0
    try:
        server.run(sockets=sockets)
    except SystemExit as exc:  # uvicorn's failed start (e.g. its port taken; logged): status 3
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has shut down
        code = 130
    if failure:
        what = "stopped" if role == front_ends.FRONT_END_ROLE else "model loading failed"
        print(f"alarm-serve: {what}: {failure[0]}", file=sys.stderr)
        code = 1
    if state.loading:
        # The model-loading thread cannot be stopped, and nothing waits for it; but an
        # interpreter that shuts down beside it (in torch, without the GIL) may abort. Leave
        # without the interpreter's clean-up, the output flushed.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
