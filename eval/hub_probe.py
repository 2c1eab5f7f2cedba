"""One fast answer to "can we reach the Hugging Face Hub?", for model, data and task loading alike.

Without it an offline user waits through transformers'/datasets' retries and then reads a stack trace.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connect within `timeout` seconds.

    False at once when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set. DNS resolution runs in a
    daemon thread so a hanging resolver cannot stall us past the timeout.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)

    result: dict[str, bool] = {}

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError:
            result["ok"] = False

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return result.get("ok", False)
