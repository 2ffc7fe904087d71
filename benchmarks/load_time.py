"""First load (GGUF conversion into the cache) against cached load of the embedded SmolLM2-135M.

Each load runs in a fresh Python process with an empty (then warm) cache directory, so import time is excluded
from the load figure but everything a user waits for after `import attnsparse` is included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result

PROBE = (
    "import json, time; from attnsparse.core.models import load_model; t = time.perf_counter(); "
    "m = load_model('smollm2-135m'); print(json.dumps({'source': m.source, 'seconds': time.perf_counter() - t}))"
)


def timed_load(cache: str) -> dict[str, object]:
    env = dict(os.environ, ATTNSPARSE_CACHE=cache)
    output = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True, capture_output=True, text=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        first = timed_load(cache)
        cached = [timed_load(cache) for _ in range(3)]
    best_cached = min(float(c["seconds"]) for c in cached)  # type: ignore[arg-type]
    result = {
        "first_load": first,
        "cached_loads": cached,
        "first_over_cached": float(first["seconds"]) / best_cached,  # type: ignore[arg-type]
        "note": "load_model() time including the backend probe forward; excludes Python and torch import",
    }
    print(json.dumps(result, indent=2))
    write_result("load_time_smollm2", result)


if __name__ == "__main__":
    main()
