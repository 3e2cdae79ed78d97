"""Container health probe: exit 0 when GET http://127.0.0.1:$ALARM_PORT<path> answers 200.

    python healthcheck.py [/readyz|/healthz]

Standard library only (the images carry no curl). Used by the Dockerfiles' HEALTHCHECK and
by docker/compose.yaml; a Kubernetes deployment uses httpGet probes instead.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def probe(path: str = "/readyz", port: int | None = None, timeout_s: float = 4.0) -> int:
    """0 if the endpoint answers 200, 1 otherwise (not ready, refused, timed out)."""
    if port is None:
        port = int(os.environ.get("ALARM_PORT", "8000"))
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as exc:  # 503 while models load
        status = exc.code
    except (OSError, ValueError) as exc:  # refused, reset, timed out
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"{url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(probe(sys.argv[1] if len(sys.argv) > 1 else "/readyz"))
