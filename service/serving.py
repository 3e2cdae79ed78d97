"""Run the service: in one process, or as a split server's supervisor, engine or front-end.

Shared by `alarm-serve serve` and the benchmarks' server with free forwards
(`benchmarks.free_forwards`), so that both run the same way in every layout. The models'
and the app's modules are imported only by the roles that use them: a supervisor stays
small.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service import supervisor
from service.allocator import loaded_allocator
from service.config import RewardConfig, ServiceSettings, load_reward_config

if TYPE_CHECKING:
    from service.api.app import ModelLoader


def serve(
    settings: ServiceSettings,
    load: ModelLoader | None = None,
    child_command: Sequence[str] | None = None,
) -> int:
    """Serve until stopped; the exit status. As configured (`front_ends`) and by the role the
    environment gives it: one process; a split server's supervisor, which starts
    `child_command` (default: this command line again) as its engine and front-ends; or one
    of those children. `load` builds the models (default: `load_models`; the benchmarks
    swap in free ones)."""
    role = os.environ.get(supervisor.ROLE_ENV)
    where = f"[{role} {os.getpid()}] " if role else ""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s",
    )
    if role is None and settings.front_ends > 0:
        return supervisor.supervise(settings, child_command)
    if role is not None:
        supervisor.stop_with_supervisor()
    if load is None:
        from service.models import load_models

        load = load_models
    logging.getLogger(__name__).info("malloc: %s", loaded_allocator())
    config = load_reward_config(settings.config)
    if role == supervisor.ENGINE_ROLE:
        from service.engine_process import run_engine_process

        return run_engine_process(settings, config, Path(os.environ[supervisor.LINK_ENV]), load)
    return _serve_http(settings, config, load, role == supervisor.FRONT_END_ROLE)


def _serve_http(
    settings: ServiceSettings, config: RewardConfig, load: ModelLoader, front_end: bool
) -> int:
    """The HTTP app with its own engine, or as a front-end of a split server's engine."""
    import uvicorn

    from service.api import create_app

    failure: list[str] = []
    server: uvicorn.Server | None = None

    def on_fatal(reason: str) -> None:
        failure.append(reason)
        if server is not None:
            server.should_exit = True

    sockets: list[socket.socket] | None = None
    split: dict[str, Any] = {}
    if front_end:
        sockets = supervisor.inherited_listening_sockets()
        split = {
            "engine_link": Path(os.environ[supervisor.LINK_ENV]),
            "metrics_dir": Path(os.environ[supervisor.METRICS_DIR_ENV]),
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
        what = "stopped" if front_end else "model loading failed"
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
