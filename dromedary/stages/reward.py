"""dromedary reward: score records with a trained reward model (`dromedary reward-model`'s output).

Each record is scored under its own `principles` (a list of definition texts) when it has them,
else under the definitions of --principles (default: every principle of the reward-model's
principles file, or of prompts/salmon/reward_principles.json). A record with `output` gets
`reward`; a pair record (output_1, output_2) gets `reward_1` and `reward_2`. Resumable and data
/ model parallel under torchrun like the other record stages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .. import records
from ..engine.reward import META_FILE, RewardModel
from ..jobs import RecordJob, already_done
from ..recipe import preferences as salmon


def reward(
    rm: str,
    input: str,
    output: str,
    principles: Optional[str] = None,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    model_parallel_size: Optional[int] = None,
    batch_size: int = 8,
    dtype: Optional[str] = None,
    overwrite: bool = False,
) -> None:
    """Add a `reward` field (or reward_1 and reward_2 for a pair) to every record of INPUT; append them to OUTPUT.

    Args:
      rm: the reward model directory (from `dromedary reward-model`).
      input: JSONL records with id, instruction, input and output (or output_1 and output_2); an optional `principles` list of definition texts overrides --principles for that record.
      output: JSONL file to append the scored records to.
      principles: a reward-principles JSON file whose positive definitions the reward model is shown. Default: the principles file RM was trained with.
      ckpt_dir: the base checkpoint. Default: the one RM was trained on.
      tokenizer_path: tokenizer file. Default: the one RM was trained with.
      model_parallel_size: processes sharing one model copy. Default: the whole world.
      batch_size: reward prompts per forward pass.
      dtype: fp32, bf16 or fp16. Default: bf16 on GPUs that support it, fp32 on CPU.
      overwrite: start OUTPUT afresh (the old one is moved to OUTPUT.bak-TIME).
    """
    options = dict(locals())
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
    meta_path = Path(rm) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"--rm {rm}: not a reward model directory ({META_FILE} missing; "
                                "make one with `dromedary reward-model`)")
    meta = json.loads(meta_path.read_text())
    shown = salmon.default_reward_principles(salmon.load_reward_principles(principles or meta.get("principles")))
    inputs = records.read_records(input, ("id", "instruction"), field_types={"instruction": str, "input": str,
                                                                             "output": str, "principles": list})
    for r in inputs:
        if "output" not in r and not ("output_1" in r and "output_2" in r):
            raise ValueError(f"{input}: record {r['id']!r} has neither 'output' nor 'output_1' and 'output_2'")
    fingerprint = {"rm": records.path_identity(rm), "principles": shown}
    if already_done(output, inputs, overwrite, {**options, "ckpt_dir": ckpt_dir or meta.get("ckpt_dir")}, fingerprint):
        return
    model = RewardModel.load(rm, ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path,
                             model_parallel_size=model_parallel_size, dtype=dtype)
    with RecordJob(output, inputs, model.loaded.world, overwrite=overwrite,
                   options={**options, "ckpt_dir": ckpt_dir or meta.get("ckpt_dir")}, model=model.loaded.name,
                   desc="reward", fingerprint=fingerprint) as job:
        for batch in job.batches(64):
            texts, where = [], []
            for r in batch:
                ps = r.get("principles") or shown
                fields = ["output"] if "output" in r else ["output_1", "output_2"]
                for f in fields:
                    texts.append(salmon.reward_prompt(r["instruction"], r.get("input", ""), r[f], ps))
                    where.append((r["id"], "reward" + f[len("output"):]))
            scores = model.score(texts, batch_size=batch_size)
            got: dict[str, dict] = {}
            for (rid, field), s in zip(where, scores):
                got.setdefault(rid, {})[field] = s
            for r in batch:
                job.write({**r, **got[r["id"]]})
            job.advance(len(batch))
