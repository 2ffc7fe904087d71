"""Is the Hugging Face hub reachable? One short request, so an offline machine gets an answer in seconds.

transformers and datasets retry a failed hub request with exponential backoff (about a minute in all) before they
give up; one HEAD request to the endpoint with a short timeout tells the same thing at once. Any HTTP answer, even
an error status, means the hub is reachable; only a failed connection (refused, no DNS, timeout) does not.
"""

from __future__ import annotations

PROBE_TIMEOUT_S = 3.0
OFFLINE_HINT = "set HF_HUB_OFFLINE=1 to use only the local cache without trying the network"


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks the libraries to use only the local cache."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the hub answers one HEAD request within `timeout` seconds, else why it did not (one line)."""
    from huggingface_hub import get_session

    try:
        get_session().head(hub_endpoint(), timeout=timeout, follow_redirects=False)
    except Exception as error:  # noqa: BLE001 - any transport failure means "unreachable"
        text = str(error).strip().splitlines()
        return text[0][:200] if text else type(error).__name__
    return None
