"""dromedary convert: rewrite a checkpoint in the Meta or HF layout with any shard count."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional

from .. import records
from ..llama import checkpoint


def convert(
    ckpt_dir: str,
    output_dir: str,
    layout: Literal["meta", "hf"] = "meta",
    num_shards: int = 1,
    tokenizer_path: Optional[str] = None,
    adapter: Optional[str] = None,
    max_file_gb: float = 5.0,
    overwrite: bool = False,
) -> None:
    """Convert CKPT_DIR (Meta or HF layout, or a .gguf file; detected from its files) into OUTPUT_DIR.

    Tensors are streamed one at a time, so converting needs about one tensor's memory beyond
    what the operating system caches. HF -> Meta -> HF reproduces every tensor exactly.

    Args:
      ckpt_dir: source checkpoint directory (params.json + consolidated.NN.pth, or config.json + model*.safetensors / pytorch_model*.bin), or a .gguf file (dequantized; its tokenizer is written as tokenizer.json + tokenizer_config.json).
      output_dir: destination directory; must be empty or missing unless --overwrite.
      layout: "meta" (params.json + consolidated.NN.pth) or "hf" (config.json + model*.safetensors).
      num_shards: Meta layout: number of consolidated.NN.pth shards (any count; one per model-parallel rank is conventional).
      tokenizer_path: tokenizer file (tokenizer.json or tokenizer.model) to copy along, with the tokenizer_config.json beside it. Default: CKPT_DIR's tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json, special_tokens_map.json).
      adapter: a LoRA adapter directory (from `dromedary finetune`) to merge into the weights.
      max_file_gb: HF layout: largest safetensors file before splitting into several with an index.
      overwrite: allow writing into a non-empty OUTPUT_DIR.
    """
    if layout not in ("meta", "hf"):
        raise ValueError(f"--layout {layout!r}: choose meta or hf")
    if num_shards < 1:
        raise ValueError(f"--num_shards must be at least 1, got {num_shards}")
    if layout == "hf" and num_shards != 1:
        raise ValueError("--num_shards applies to the Meta layout; the HF layout splits files by --max_file_gb")
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: output directory is not empty (pass --overwrite to write into it)")
    if Path(ckpt_dir).resolve() == out.resolve():
        raise ValueError("--output_dir must differ from --ckpt_dir")
    reader = checkpoint.open_checkpoint(ckpt_dir)
    adjust = None
    if adapter:
        from ..llama.lora import merge_function

        adjust = merge_function(adapter, reader.args)
    from_gguf = reader.layout == "gguf" and not tokenizer_path  # the tokenizer is in the file's metadata
    tokenizer = Path(tokenizer_path) if tokenizer_path else None if from_gguf else Path(ckpt_dir)
    checkpoint.save_checkpoint(reader, out, layout=layout, num_shards=num_shards, adjust=adjust,
                               max_file_bytes=int(max_file_gb * 2**30), tokenizer=tokenizer)
    if from_gguf:
        from ..llama.gguf import write_tokenizer

        write_tokenizer(reader, out, layout=layout)
    records.write_provenance(out / "convert", command=sys.argv, options=dict(ckpt_dir=ckpt_dir, layout=layout,
                             num_shards=num_shards, adapter=adapter), model=str(ckpt_dir))
    print(f"wrote {layout} checkpoint ({reader.args.n_layers} layers, dim {reader.args.dim}) to {out}", file=sys.stderr)
