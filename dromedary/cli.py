"""The command table: subcommand name -> stage function. Fire turns each signature into flags."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Optional, Sequence

# name: (module, function, one-line summary). Stages are imported only when run, so `--help` and
# a typo stay fast.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "generate": ("dromedary.stages.generate", "generate", "batch completions over a JSONL of prompts"),
    "convert": ("dromedary.stages.convert", "convert", "convert/reshard checkpoints between Meta and HF layouts"),
    "finetune": ("dromedary.stages.finetune", "finetune", "LoRA fine-tuning on curated sft records (principle engraving)"),
    "chat": ("dromedary.stages.chat", "chat", "talk to a model in the terminal (streaming, multi-turn)"),
    "serve": ("dromedary.stages.serve", "serve", "OpenAI-compatible HTTP server (completions, chat, streaming)"),
    "pipeline": ("dromedary.stages.pipeline", "pipeline", "the whole recipe in one command, resumable"),
    "generate-prompts": ("dromedary.stages.generate_prompts", "generate_prompts", "prompts by TGRT, self-instruct, or import of ShareGPT/Dolly/oasst1/OpenOrca"),
    "self-align": ("dromedary.stages.self_align", "self_align", "principle-driven answers with in-context exemplars"),
    "curate": ("dromedary.stages.curate", "curate", "split thoughts from answers, filter, rename: self-align -> sft records"),
    "verbose-clone": ("dromedary.stages.verbose_clone", "verbose_clone", "detailed answers from the engraved model -> sft records"),
    "preferences": ("dromedary.stages.preferences", "preferences", "two answers per prompt, judged on each reward principle in both orders"),
    "reward-model": ("dromedary.stages.reward_model", "reward_model", "instructable reward model: training pairs from preferences, LoRA + scalar head"),
    "reward": ("dromedary.stages.reward", "reward", "score records with a reward model under principles (adds a reward field)"),
    "dpo": ("dromedary.stages.dpo", "dpo", "direct preference optimisation (DPO/IPO) of the engraved model on preference pairs"),
    "rl": ("dromedary.stages.rl", "rl", "PPO of the policy against the instructable reward model (KL to the reference, LoRA)"),
    "evaluate": ("dromedary.stages.evaluate", "evaluate", "TruthfulQA MC1/MC2 and HHH accuracy (lm-eval or the paper's protocol), --compare runs"),
}


def load(name: str) -> Callable:
    module, func, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), func)


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: dromedary COMMAND [--flag value ...]      (torchrun [...] -m dromedary COMMAND ...)",
        "",
        "Principle-driven self-alignment of LLaMA-family base models.",
        "",
        "commands:",
        *(f"  {n.ljust(width)}  {summary}" for n, (_, _, summary) in COMMANDS.items()),
        "",
        "`dromedary COMMAND --help` explains every flag of COMMAND.",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import fire

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name = argv[0].replace("_", "-")
    if name not in COMMANDS:
        print(f"dromedary: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    from .errors import UserError, friendly

    from . import distributed

    try:
        fire.Fire(load(name), command=argv[1:], name=f"dromedary {name}")
    except UserError as err:
        if os.environ.get("DROMEDARY_DEBUG"):
            raise
        print(f"dromedary {name}: error: {friendly(err)}", file=sys.stderr)
        distributed.teardown(clean=False)
        return 2
    except KeyboardInterrupt:
        print(f"\ndromedary {name}: interrupted", file=sys.stderr)
        distributed.teardown(clean=False)
        return 130
    distributed.teardown()
    return 0
