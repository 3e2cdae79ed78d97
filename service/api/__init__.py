"""HTTP layer: thin routes over the engine."""

from service.api.app import create_app

__all__ = ["create_app"]
