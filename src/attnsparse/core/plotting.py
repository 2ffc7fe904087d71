"""matplotlib with the file-only Agg backend, so plotting works on machines with no display."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot, switched to Agg first (imported lazily: the CLI starts without matplotlib)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt
