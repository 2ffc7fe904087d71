"""The measure report opens in a real browser: headless Chromium renders it to a non-blank PNG."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from attnsparse.core.models import LoadedModel
from attnsparse.core.tiny import tiny_llama, tiny_tokenizer
from attnsparse.measure.run import measure

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_report.sh"


@pytest.mark.skipif(BROWSER is None, reason="chromium is not installed (Debian package: chromium)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    loaded = LoadedModel(tiny_llama(layers=2, heads=4, kv_heads=2), tiny_tokenizer(), "tiny", "directory", 0.0)
    ids = torch.randint(0, 97, (400,), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "run"
    measure(loaded, ids, ctx=64, windows=2, out=out, progress=False, echo=None)
    png = tmp_path / "report.png"
    subprocess.run([str(SCRIPT), str(out / "report.html"), str(png), "1200,2400"], check=True, timeout=120)
    from matplotlib.image import imread

    image = imread(png)
    assert image.shape[0] >= 2000 and image.shape[1] >= 1100
    # not blank: the embedded plots put many distinct colours on the page
    assert len({tuple(px) for px in image[::20, ::20, :3].reshape(-1, 3).round(2).tolist()}) > 20
