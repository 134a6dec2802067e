"""Finding pretrained weights without hanging: one clear error instead of minutes of retries."""

from __future__ import annotations

import os
import socket


class MissingWeightsError(RuntimeError):
    """Pretrained weights are neither on disk nor downloadable; the message says how to supply them."""


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether `host:443` accepts a connection within `timeout` seconds (False when offline)."""
    if offline():
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def missing(kind: str, name: str, config_key: str, host: str) -> MissingWeightsError:
    return MissingWeightsError(
        f"{kind} weights {name!r} are not on this machine and {host} cannot be reached"
        f"{' (HF_HUB_OFFLINE=1)' if offline() else ''}. Download them where there is internet and pass "
        f"a local path, e.g. {config_key}=/path/to/{name.replace('/', '-')}, or build a randomly "
        f"initialised model by giving {config_key} a mapping of sizes (see conf/model/)."
    )
