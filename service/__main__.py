"""The `alarm-serve` command: `serve` starts the service (`ray`: on Ray Serve), `openapi`
writes its contract."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

# What the `service` extra installs, by import name: a missing one of these means the extra
# was left out; any other missing module (a plugged-in checker's, a tokenizer's) is reported
# as itself.
_SERVICE_EXTRA_MODULES = frozenset(
    [
        "accelerate",
        "fastapi",
        "gguf",
        "matplotlib",
        "numpy",
        "prometheus_client",
        "proselint",
        "py3langid",
        "pydantic_settings",
        "pyphen",
        "safetensors",
        "starlette",
        "torch",
        "transformers",
        "uvicorn",
        "yaml",
    ]
)


def _missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The one-line hint for a module that an extra installs; None for any other."""
    top = (exc.name or "").partition(".")[0]
    if top == "ray":
        return f"alarm-serve: no module {exc.name!r}: pip install 'alarm-serve[ray]'"
    if top in _SERVICE_EXTRA_MODULES:
        return f"alarm-serve: no module {exc.name!r}: pip install 'alarm-serve[service]'"
    return None


try:
    import yaml
    from pydantic import ValidationError

    from service.allocator import AllocatorError, run_again_with_tcmalloc
    from service.config import ServiceSettings, load_reward_config
    from service.errors import ConfigError
    from service.memory import share_one_heap
except ModuleNotFoundError as exc:  # installed without the extra: one line, not a traceback
    if (hint := _missing_extra(exc)) is None:
        raise
    sys.exit(hint)


def _openapi_document() -> dict[str, Any]:
    from service.api import create_app

    app = create_app(ServiceSettings(), load_reward_config(None))
    return app.openapi()


def render_openapi() -> str:
    return yaml.safe_dump(_openapi_document(), sort_keys=False, allow_unicode=True)


def _serve(settings: ServiceSettings) -> int:
    from service.serving import serve

    return serve(settings)


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


def _select_aspects(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from prometheus_client import CollectorRegistry

    from service.aspect_selection import ResponsePair, measure_consistency
    from service.engine import RewardEngine
    from service.metrics import ServiceMetrics
    from service.models import load_models
    from service.selection import select
    from service.selection_report import write_report

    config = load_reward_config(args.config)
    settings = ServiceSettings(**({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    try:
        rows = [json.loads(line) for line in args.pairs.read_text().splitlines() if line.strip()]
        pairs = [ResponsePair(r["prompt"], r["response_1"], r["response_2"]) for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{args.pairs}: expected JSON lines with prompt, response_1, response_2 ({exc})"
        ) from exc

    async def measure() -> Any:
        models = load_models(config, settings.cache_dir)
        engine = RewardEngine(models, config, ServiceMetrics(CollectorRegistry()))
        await engine.start()
        try:
            return await measure_consistency(engine, config, pairs)
        finally:
            await engine.stop()

    report = asyncio.run(measure())
    selected = select(report, args.top_k, args.max_inconsistency)
    paths = write_report(report, selected, config, args.out)
    print(f"{report.pairs} pairs, holistic ties {report.holistic_ties}")
    print(f"{'aspect':20s} {'inconsistency':>13s} {'win rate 1>2':>12s} {'pairs':>6s}  verdict")
    for a in sorted(report.aspects, key=lambda a: (a.inconsistency is None, a.inconsistency)):
        incons = "n/a" if a.inconsistency is None else f"{100 * a.inconsistency:.1f}%"
        win = "n/a" if a.win_rate is None else f"{100 * a.win_rate:.1f}%"
        verdict = "kept" if a.name in selected else "dropped"
        print(f"{a.name:20s} {incons:>13s} {win:>12s} {a.pairs_counted:6d}  {verdict}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _add_ray_command(commands: Any, server: argparse.ArgumentParser) -> None:
    scale = commands.add_parser(
        "ray",
        parents=[server],
        help="serve on Ray Serve: the same API, one replica per GPU (needs the `ray` extra)",
    )
    scale.add_argument("--address", help="Ray cluster to join (env RAY_ADDRESS; default: local)")
    scale.add_argument("--replicas", type=int, help="fixed count, or initial when autoscaling")
    scale.add_argument("--min-replicas", type=int, help="autoscaling floor (default 1)")
    scale.add_argument("--max-replicas", type=int, help="autoscale on queue depth up to this")
    scale.add_argument("--target-ongoing-requests", type=float, help="per replica (default 16)")
    scale.add_argument("--max-ongoing-requests", type=int, help="per replica (default 64)")
    scale.add_argument("--gpus-per-replica", type=float, help="default: 1 if Ray has GPUs, else 0")
    scale.add_argument("--cpus-per-replica", type=float, help="default 1")


def _ray(settings: ServiceSettings, args: argparse.Namespace) -> int:
    from dataclasses import fields

    from service.ray_app import ReplicaScale, serve_on_ray

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    given = {f.name: getattr(args, f.name) for f in fields(ReplicaScale)}
    scale = ReplicaScale(**{name: value for name, value in given.items() if value is not None})
    return serve_on_ray(settings, load_reward_config(settings.config), scale, args.address)


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["serve"]:  # the command line, not a caller's list
        try:
            run_again_with_tcmalloc()  # before any thread starts (service.allocator)
        except AllocatorError as exc:
            print(f"alarm-serve: configuration error: {exc}", file=sys.stderr)
            return 2
    share_one_heap()  # before any other thread allocates (service.memory)
    parser = argparse.ArgumentParser(prog="alarm-serve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    server = argparse.ArgumentParser(add_help=False)  # shared by `serve` and `ray`
    server.add_argument("--config", type=Path, help="YAML reward definition (env ALARM_CONFIG)")
    server.add_argument("--host", help="bind address (env ALARM_HOST, default 127.0.0.1)")
    server.add_argument("--port", type=int, help="port (env ALARM_PORT, default 8000)")
    server.add_argument("--log-level", help="debug|info|warning|error (env ALARM_LOG_LEVEL)")
    server.add_argument("--cache-dir", type=Path, help="prepared-model cache (env ALARM_CACHE_DIR)")
    serve = commands.add_parser("serve", parents=[server], help="start the reward service")
    serve.add_argument(
        "--front-ends",
        type=int,
        help="HTTP front-end processes over one engine process (env ALARM_FRONT_ENDS, "
        "default 0: HTTP in the engine's process)",
    )
    _add_ray_command(commands, server)
    spec = commands.add_parser("openapi", help="print or write the OpenAPI contract")
    spec.add_argument("--out", type=Path, help="write to this file instead of stdout")
    choose = commands.add_parser(
        "select-aspects", help="keep the aspects most consistent with the holistic reward"
    )
    choose.add_argument("--pairs", type=Path, required=True, help="JSONL: prompt, response_1/2")
    choose.add_argument("--config", type=Path, help="YAML reward definition (default: embedded)")
    choose.add_argument("--out", type=Path, default=Path("aspect-selection"))
    choose.add_argument("--cache-dir", type=Path, help="prepared-model cache")
    group = choose.add_mutually_exclusive_group()
    group.add_argument("--top-k", type=int, help="keep the k most consistent aspects")
    group.add_argument("--max-inconsistency", type=float, help="keep all at or under this")
    args = parser.parse_args(argv)

    try:
        if args.command == "select-aspects":
            return _select_aspects(args)
        if args.command == "openapi":
            text = render_openapi()
            if args.out:
                try:
                    args.out.write_text(text)
                except OSError as exc:
                    reason = exc.strerror or exc
                    print(f"alarm-serve: cannot write {args.out}: {reason}", file=sys.stderr)
                    return 1
            else:
                sys.stdout.write(text)
            return 0
        overrides = {
            k: v
            for k, v in vars(args).items()
            if k in ServiceSettings.model_fields and v is not None
        }
        settings = ServiceSettings(**overrides)
        if args.command == "ray":
            return _ray(settings, args)
        return _serve(settings)
    except (AllocatorError, ConfigError) as exc:
        print(f"alarm-serve: configuration error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"alarm-serve: configuration error: {_validation_message(exc)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        hint = _missing_extra(exc)
        if hint is None:
            raise
        print(hint, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
