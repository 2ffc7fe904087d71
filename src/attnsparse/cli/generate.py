"""`attnsparse generate MODEL --prompt-file F --policy PLAN`: greedy generation with a sparse KV cache.

The lead registers `generate_command` in cli.py (`app.command("generate")(generate_command)`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from attnsparse.cli._common import device_option, dtype_option
from attnsparse.errors import AttnsparseError

if TYPE_CHECKING:
    from attnsparse.core.models import ModelShape
    from attnsparse.decode.plan import DecodePlan
    from attnsparse.measure.profile import ProfileView


def generate_command(
    model: str = typer.Argument("smollm2-135m", help="Embedded name, hub id, local HF directory or .gguf file."),
    prompt_file: str = typer.Option(..., "--prompt-file", help="UTF-8 text file holding the prompt."),
    policy: str = typer.Option(
        "dense", "--policy",
        help="Plan JSON file, or one policy for every head: dense, topk:K, block:B:BUDGET[:mean|bound|channelsR|gate] "
             "(BUDGET in tokens, or a density such as 0.0625), streaming:S:W (alias sink+window:S:W).",
    ),
    profile: str | None = typer.Option(
        None, "--profile",
        help="A measure profile.json: its streaming heads use --streaming, the others --policy.",
    ),
    streaming: str = typer.Option("streaming:4:1024", "--streaming", help="Policy for streaming heads with --profile."),
    protect_retrieval: str | None = typer.Option(
        None, "--protect-retrieval",
        help="With --profile: give the N kv heads with the best retrieval scores (an int), or every kv head scoring at "
             "least T (with a decimal point, e.g. 0.1), the --protected policy.",
    ),
    protected: str = typer.Option("dense", "--protected", help="Policy for the heads --protect-retrieval picks."),
    average_density: float | None = typer.Option(
        None, "--average-density",
        help="With --profile: choose the block budget of the other heads (--policy, a block policy) so the plan reads "
             "at most this share of the dense KV bytes per step at --density-context tokens.",
    ),
    density_context: int | None = typer.Option(
        None, "--density-context", help="Context for --average-density (default: the prompt's tokens)."
    ),
    gate: str | None = typer.Option(
        None, "--gate", help="Gate directory (attnsparse gate) for the heads whose block score is gate.",
    ),
    save_plan: str | None = typer.Option(None, "--save-plan", help="Write the plan used as JSON."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Tokens to generate."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON record instead of text and a summary."),
    device: str | None = device_option(),
    dtype: str = dtype_option(),
) -> None:
    """Generate a continuation of a prompt with sparse decoding; prints the text and a speed/memory summary."""
    from attnsparse.cli._common import run_or_exit

    options = ProfileOptions(protect_retrieval, protected, average_density, density_context)
    record = run_or_exit(lambda: _generate(
        model, Path(prompt_file), policy, Path(profile) if profile else None, streaming,
        Path(save_plan) if save_plan else None, max_new_tokens, options, device, dtype, gate,
    ))
    if as_json:
        typer.echo(json.dumps(record, indent=2))
        return
    typer.echo(record["text"])
    typer.echo(
        f"--- {record['new_tokens']} tokens after a {record['prompt_tokens']}-token prompt | plan {record['plan']} | "
        f"prefill {record['prefill_seconds']:.2f} s | decode {record['decode_tokens_per_second']:.2f} tokens/s | "
        f"KV held {record['kv_mb_held']:.1f} MB | attention reads {record['attention_mb_per_step']:.2f} MB/step",
        err=True,
    )


@dataclass(frozen=True)
class ProfileOptions:
    """How `--profile` builds its plan beyond streaming heads: retrieval protection and a target average density."""

    protect_retrieval: str | None = None
    protected: str = "dense"
    average_density: float | None = None
    density_context: int | None = None

    def protect(self) -> int | float | None:
        """--protect-retrieval as a head count (no decimal point) or a score threshold; one-line error otherwise."""
        text = self.protect_retrieval
        if text is None:
            return None
        try:
            return float(text) if "." in text else int(text)
        except ValueError:
            raise AttnsparseError(f"--protect-retrieval {text!r} must be a kv head count such as 4 or a retrieval "
                                  "score threshold such as 0.1") from None

    def check(self, profile: ProfileView | None) -> None:
        """Refuse options that need a profile (or its retrieval scores) before the model is loaded."""
        from attnsparse.decode.plan import kv_retrieval_scores, parse_head_policy

        used = [name for name, value in (("--protect-retrieval", self.protect_retrieval),
                                         ("--average-density", self.average_density),
                                         ("--density-context", self.density_context)) if value is not None]
        if used and profile is None:
            raise AttnsparseError(f"{used[0]} builds a plan from a measure profile; give --profile PROFILE.json")
        protect = self.protect()
        parse_head_policy(self.protected)
        if self.average_density is not None and not 0.0 < self.average_density <= 1.0:
            raise AttnsparseError(f"--average-density {self.average_density} must be in (0, 1]")
        if self.density_context is not None and self.density_context < 1:
            raise AttnsparseError(f"--density-context {self.density_context} must be >= 1 token")
        if protect is not None and profile is not None and kv_retrieval_scores(profile) is None:
            raise AttnsparseError("--protect-retrieval needs retrieval scores, and the profile has none; measure "
                                  "them with `attnsparse measure ... --retrieval`")


def _generate(model_spec: str, prompt_file: Path, policy: str, profile: Path | None, streaming: str,
              save_plan: Path | None, max_new_tokens: int,
              options: ProfileOptions = ProfileOptions(), device: str | None = None,
              dtype: str | None = None, gate: str | None = None) -> dict[str, object]:
    import torch

    from attnsparse.core.data import load_text, tokenize
    from attnsparse.core.devices import model_device, model_dtype, placement, resolve_device, resolve_dtype
    from attnsparse.core.models import ModelShape, load_model
    from attnsparse.decode.generate import generate
    from attnsparse.decode.plan import plan_from_profile, resolve_plan
    from attnsparse.measure.profile import ProfileView

    target, precision = resolve_device(device), resolve_dtype(dtype)  # a device this machine lacks fails first
    if save_plan is not None:
        _check_plan_path(save_plan)
    measured = ProfileView.read_json(profile) if profile is not None else None  # a bad profile fails before loading
    options.check(measured)
    if gate is not None:
        from attnsparse.gate.model import BlockGate

        BlockGate.load(gate)  # a missing or foreign gate directory fails before the model loads
    text = load_text(str(prompt_file))
    loaded = load_model(model_spec, precision, device=target)
    ids = tokenize(loaded.tokenizer, text)
    if ids.numel() == 0:
        raise AttnsparseError(f"prompt file {prompt_file} gives no tokens")
    _check_length(int(ids.numel()), max_new_tokens, loaded.max_context)
    shape = ModelShape.of(loaded.model)
    layers, kv_heads = shape.need("layers"), shape.need("kv_heads")
    if measured is not None:
        head_dim = shape.need("head_dim")
        itemsize = next(loaded.model.parameters()).element_size()
        plan: DecodePlan = plan_from_profile(
            measured, policy, streaming, protect=options.protect(), protected=options.protected,
            average_density=options.average_density, context=options.density_context or int(ids.numel()),
            head_dim=head_dim, itemsize=itemsize, groups=shape.need("heads") // kv_heads)
        plan.check_model(layers, kv_heads)
    else:
        plan = resolve_plan(policy, layers, kv_heads, model_spec)
    plan = _gated(plan, gate, shape)
    if save_plan is not None:
        plan.save(save_plan)
    result = generate(loaded.model, ids[None], plan, max_new_tokens=max_new_tokens,
                      eos_token_id=loaded.tokenizer.eos_token_id)
    new_ids = result.sequences[0, result.prompt_tokens:]
    counts = plan.counts()
    return {
        "model": model_spec,
        "plan": ", ".join(f"{n} x {spec}" for spec, n in counts.items()),
        "plan_counts": counts,
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": result.new_tokens,
        "text": loaded.tokenizer.decode(new_ids, skip_special_tokens=True),
        "prefill_seconds": round(result.prefill_seconds, 3),
        "decode_tokens_per_second": round(result.decode_tokens_per_second, 3),
        "kv_mb_held": result.kv_bytes_held / 1e6,
        "attention_mb_per_step": result.attention_bytes_per_step / 1e6,
        "threads": torch.get_num_threads(),
        **placement(model_device(loaded.model), model_dtype(loaded.model)),
    }


def _gated(plan: DecodePlan, gate: str | None, shape: ModelShape) -> DecodePlan:
    """The plan with `--gate` filled in where a head's block score is gate; its gates checked against the model."""
    from attnsparse.decode.policies import BlockPolicy
    from attnsparse.decode.scorers.gate import GateScore

    if gate is not None:
        if not plan.uses_gate():
            raise AttnsparseError(f"--gate {gate} is given but no head's block score is gate; use a policy such as "
                                  "block:16:0.0625:gate")
        plan = plan.with_gate(gate)
    for row in plan.heads:
        for head in row:
            if isinstance(head, BlockPolicy) and isinstance(head.score, GateScore):
                config = head.score.load().config
                config.check_model(shape.need("layers"), shape.need("heads"), shape.need("kv_heads"),
                                   shape.need("head_dim"), f"the gate {head.score.gate}")
                config.check_block(head.block_size, head.spec)
    return plan


def _check_plan_path(path: Path) -> None:
    """--save-plan must name a file in an existing directory; checked before the model is loaded."""
    if path.is_dir():
        raise AttnsparseError(f"--save-plan {path} is a directory; give a file path such as {path / 'plan.json'}")
    if not path.parent.is_dir():
        raise AttnsparseError(f"--save-plan {path}: directory {path.parent} does not exist; create it first")


def _check_length(prompt_tokens: int, max_new_tokens: int, max_context: int) -> None:
    """Prompt plus generated tokens must fit the model's context; the advice names generate's own options."""
    if prompt_tokens + max_new_tokens <= max_context:
        return
    if prompt_tokens >= max_context:
        raise AttnsparseError(f"the prompt has {prompt_tokens} tokens and the model's maximum is {max_context}; "
                              f"shorten the prompt file to fewer than {max_context} tokens")
    raise AttnsparseError(
        f"a {prompt_tokens}-token prompt plus --max-new-tokens {max_new_tokens} exceeds the model's maximum of "
        f"{max_context} tokens; lower --max-new-tokens to {max_context - prompt_tokens} or shorten the prompt file"
    )
