"""Container health check: ``python -m glm_api.healthcheck`` exits 0 only when ``/ready`` is 200.

The Dockerfile's HEALTHCHECK runs it. The address comes from the same ``GLM_API_*`` settings the
server reads (``Settings``), so ``GLM_API_PORT=9000`` in compose's ``environment:`` moves the
check with the server. It asks ``/ready``, not ``/health``: Docker has one health state, and
``depends_on: service_healthy``, load balancers and orchestrators read it as "can answer", which
only holds once the models are loaded. Settings given as flags in the container's command are
not seen here: set them as ``GLM_API_*`` variables.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

from pydantic import ValidationError

from glm_api.config import Settings

# A server listening on every address is asked on loopback: the check runs beside it.
_LOOPBACK_FOR = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def ready_url(settings: Settings) -> str:
    host = _LOOPBACK_FOR.get(settings.host, settings.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}/ready"


def check(url: str, timeout: float) -> tuple[bool, str]:
    """(ready, one line saying what was seen)."""
    # No proxy: an HTTP(S)_PROXY set for the container must not carry a loopback probe away.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status == 200, f"{url}: {response.status} {response.read(200).decode(errors='replace')}"
    except urllib.error.HTTPError as exc:  # 503 while loading or when an engine died
        return False, f"{url}: {exc.code} {exc.read(200).decode(errors='replace')}"
    except OSError as exc:  # refused, unreachable, timed out
        return False, f"{url}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m glm_api.healthcheck",
        description="Exit 0 when the server configured by the GLM_API_* environment answers /ready with 200, else 1.",
    )
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer (default 4)")
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"invalid GLM_API_* settings: {exc}")
        return 1
    ready, line = check(ready_url(settings), args.timeout)
    print(line)  # Docker keeps it in `docker inspect`'s State.Health.Log
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
