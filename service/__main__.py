"""The `alarm-serve` command: `serve` starts the service, `openapi` writes its contract."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from service.config import ServiceSettings, load_reward_config
from service.errors import ConfigError


def _openapi_document() -> dict[str, Any]:
    from service.api import create_app

    app = create_app(ServiceSettings(), load_reward_config(None))
    return app.openapi()


def render_openapi() -> str:
    return yaml.safe_dump(_openapi_document(), sort_keys=False, allow_unicode=True)


def _serve(settings: ServiceSettings) -> int:
    import uvicorn

    from service.api import create_app

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = load_reward_config(settings.config)
    failure: list[str] = []
    server: uvicorn.Server | None = None

    def on_fatal(reason: str) -> None:
        failure.append(reason)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, config, on_fatal=on_fatal)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
        )
    )
    server.run()
    if failure:
        print(f"alarm-serve: model loading failed: {failure[0]}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alarm-serve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the reward service")
    serve.add_argument("--config", type=Path, help="YAML reward definition (env ALARM_CONFIG)")
    serve.add_argument("--host", help="bind address (env ALARM_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (env ALARM_PORT, default 8000)")
    serve.add_argument("--log-level", help="debug|info|warning|error (env ALARM_LOG_LEVEL)")
    serve.add_argument("--cache-dir", type=Path, help="prepared-model cache (env ALARM_CACHE_DIR)")
    spec = commands.add_parser("openapi", help="print or check the OpenAPI contract")
    spec.add_argument("--out", type=Path, help="write to this file instead of stdout")
    args = parser.parse_args(argv)

    try:
        if args.command == "openapi":
            text = render_openapi()
            if args.out:
                args.out.write_text(text)
            else:
                sys.stdout.write(text)
            return 0
        overrides = {
            k: v
            for k, v in vars(args).items()
            if k in ServiceSettings.model_fields and v is not None
        }
        settings = ServiceSettings(**overrides)
        return _serve(settings)
    except (ConfigError, ValidationError) as exc:
        print(f"alarm-serve: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
