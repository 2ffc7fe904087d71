"""Shared fixtures: tiny models built in code, WikiText-2 test text (or a stand-in), kernel builds, seeded inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Under pytest-xdist each worker is one process per core: one intra-op thread each, or the workers' OpenMP teams
# oversubscribe the cores and spin against each other. Set before torch is imported, which reads it once.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from hypothesis import settings

# Property tests draw the same examples on every run and machine (a failure in CI is a failure everywhere);
# HYPOTHESIS_PROFILE=explore draws fresh, more numerous examples to look for new failures.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=100, print_blob=True)
settings.register_profile("explore", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Without CUDA the Triton kernels' tests run under Triton's interpreter, which must be chosen before anything imports
# Triton (torch._dynamo does, through transformers).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKITEXT_TEST = SHARED_DATA / "wikitext-2" / "test.txt"


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M from the embedded GGUF (converted once into the cache, then loaded in seconds)."""
    from attnsparse.core.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def wikitext_test(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared WikiText-2 test split when this checkout has it, else a stand-in of the same kind (English
    prose in WikiText's ` = Title = ` layout, from the built-in text): the tests run the same checks everywhere."""
    if WIKITEXT_TEST.is_file():
        return WIKITEXT_TEST
    from attnsparse.core.data import builtin_text

    paragraphs = [p.strip() for p in builtin_text("test").split("\n\n") if len(p.strip()) > 200]
    lines = []
    for index, paragraph in enumerate(paragraphs[:120]):
        if index % 8 == 0:
            lines += ["", f" = Section {index // 8 + 1} = ", ""]
        lines.append(" " + " ".join(paragraph.split()))
    path = tmp_path_factory.mktemp("wikitext-standin") / "test.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved default tiny Llama with the character tokenizer, loadable by path (read-only for tests)."""
    from attnsparse.core.tiny import save_tiny

    return Path(save_tiny(str(tmp_path_factory.mktemp("tiny") / "model")))


def _torch_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core machine a second thread mostly waits."""
    yield from _torch_threads(1)


@pytest.fixture
def two_threads():
    """For tests of the threaded paths of the compiled kernels."""
    yield from _torch_threads(2)


KERNEL_BUILDS = ("native", "portable")  # "off" (no compiled kernels) is asked for explicitly where it adds a path


@pytest.fixture(params=KERNEL_BUILDS)
def kernel_build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Run a test under each build of the compiled kernels: -march=native (AVX2/FMA/F16C where the CPU has them),
    portable (ATTNSPARSE_NATIVE_PORTABLE=1: the architecture's baseline), or "off" (ATTNSPARSE_NATIVE=0)."""
    from attnsparse.core import native

    build = request.param
    monkeypatch.setenv("ATTNSPARSE_NATIVE", "0" if build == "off" else "1")
    if build == "portable":
        monkeypatch.setenv("ATTNSPARSE_NATIVE_PORTABLE", "1")
    else:
        monkeypatch.delenv("ATTNSPARSE_NATIVE_PORTABLE", raising=False)
    native.forget()
    yield build
    native.forget()  # the environment is restored right after; kernels load again lazily under it


def cpu_flags() -> set[str]:
    """This machine's CPU feature flags (empty where /proc/cpuinfo has none)."""
    from pathlib import Path

    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


@pytest.fixture(params=("native", "portable", "avx2"))
def wide_kernel_build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """`kernel_build` for a kernel with AVX-512 tiles beside its AVX2 ones: on an AVX-512 host the native build runs
    the AVX-512 path and the "avx2" build (ATTNSPARSE_NATIVE_PORTABLE=avx2) the AVX2 one; elsewhere "avx2" is what
    native already runs and is skipped. Yields (build, the vector path the kernel must report: 2, 1 or 0)."""
    from attnsparse.core import native

    flags = cpu_flags()
    has_avx2 = {"avx2", "fma", "f16c"} <= flags
    build = request.param
    if build == "avx2" and not (has_avx2 and "avx512f" in flags):
        pytest.skip("the native build already runs the AVX2 paths here (or the CPU has none)")
    monkeypatch.setenv("ATTNSPARSE_NATIVE", "1")
    if build == "native":
        monkeypatch.delenv("ATTNSPARSE_NATIVE_PORTABLE", raising=False)
        expected = 2 if "avx512f" in flags else 1 if has_avx2 else 0
    else:
        monkeypatch.setenv("ATTNSPARSE_NATIVE_PORTABLE", "1" if build == "portable" else "avx2")
        expected = 0 if build == "portable" else 1
    native.forget()
    yield build, expected
    native.forget()


@pytest.fixture
def block_kv():
    """Factory: random decode-step inputs in block layout, seeded: (q, keys, key_blocks, value_blocks).

    q (1, 3, groups, 64); keys/values (1, 3, capacity, 64) with capacity = n rounded up to blocks of 16, plus 32.
    """
    def make(n: int, groups: int, seed: int, size: int = 16):
        gen = torch.Generator().manual_seed(seed)
        capacity = -(-n // size) * size + 32
        keys = torch.randn(1, 3, capacity, 64, generator=gen)
        values = torch.randn(1, 3, capacity, 64, generator=gen)
        q = torch.randn(1, 3, groups, 64, generator=gen)
        return q, keys, keys.view(1, 3, capacity // size, size, 64), values.view(1, 3, capacity // size, size, 64)
    return make


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The hub at a closed local port, online mode: counts HTTP requests and retry sleeps of huggingface_hub.

    Deterministic whatever the machine's network: connecting to a port nobody listens on is refused at once.
    """
    import socket
    import time

    import huggingface_hub
    from huggingface_hub import constants

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    try:
        import datasets.config

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", f"http://127.0.0.1:{port}")
    except ImportError:
        pass
    counts = {"requests": 0, "sleeps": 0}
    client_class = type(huggingface_hub.get_session())  # every client: the libraries may open fresh ones
    send = client_class.send

    def counted_send(self, *args, **kwargs):
        counts["requests"] += 1
        return send(self, *args, **kwargs)

    def counted_sleep(seconds: float) -> None:  # the libraries' retry loops sleep between attempts
        counts["sleeps"] += 1

    monkeypatch.setattr(client_class, "send", counted_send)
    monkeypatch.setattr(time, "sleep", counted_sleep)
    return counts
