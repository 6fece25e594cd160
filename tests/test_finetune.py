"""dromedary finetune and dromedary.llama.lora: data, training, parallelism, resume, PEFT/HF interop, merge.

A tiny GQA LLaMA (dim 64, 2 layers, 4 heads / 2 kv heads, FFN 170, vocab 512) and a tokenizer
trained on the engraving prompts and the test words; every run has fixed seeds and one thread.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dromedary import distributed
from dromedary.engine import builder
from dromedary.llama import checkpoint, lora
from dromedary.llama.model import ModelArgs
from dromedary.recipe import sft, templates
from dromedary.stages import finetune as ft

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=2, max_seq_len=256)
WORDS = ("camel desert water river city people good helpful honest answer question model language "
         "principle because when where small large quickly slowly night morning light read write learn "
         "teach story world time year day hello friend coffee tea bread market one two three four five").split()
# One small run, trained single-process, under DP=2 and MP=2 torchrun, killed-and-resumed.
RUN = ["--max_steps", "6", "--batch_size", "4", "--micro_batch_size", "2", "--save_steps", "2",
       "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.1", "--learning_rate", "5e-3",
       "--warmup_ratio", "0.2", "--eval_fraction", "0.25", "--eval_steps", "3",
       "--source_max_len", "64", "--target_max_len", "24", "--seed", "3"]


# ---------------------------------------------------------------------------------------------
# Fixtures: a tokenizer, a checkpoint and sft records, built once per session.


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def sft_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"rec-{i}", "instruction": _sentence(rng, 6).capitalize() + "?",
             "input": "" if i % 3 else _sentence(rng, 4), "output": _sentence(rng, 10) + ".",
             "thoughts": "", "source": "test"} for i in range(n)]


def write_jsonl(path: Path, recs) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("finetune")
    rng = random.Random(1)
    corpus = templates.engraving_system_prompts() + [_sentence(rng, 12) for _ in range(2000)]
    corpus += ["### User:", "### Dromedary:"]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(root / "tokenizer"), vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
        character_coverage=1.0)
    state = checkpoint.init_state(ARGS, seed=5, std=0.1)
    checkpoint.save_checkpoint(checkpoint.StateReader(ARGS, state), root / "ckpt", layout="meta",
                               tokenizer=root / "tokenizer.model")
    checkpoint.save_checkpoint(checkpoint.StateReader(ARGS, state), root / "ckpt_hf", layout="hf",
                               tokenizer=root / "tokenizer.model")
    return {"root": root, "ckpt": root / "ckpt", "ckpt_hf": root / "ckpt_hf",
            "sft": write_jsonl(root / "sft.jsonl", sft_records(16))}


@pytest.fixture(scope="module")
def tok(files):
    from dromedary.llama.tokenizer import Tokenizer

    return Tokenizer(files["ckpt"] / "tokenizer.model")


@pytest.fixture(autouse=True)
def one_process_world():
    torch.set_num_threads(1)
    if distributed._WORLD is not None and distributed._WORLD.mp_size != 1:
        distributed.teardown(clean=False)
    yield


def env() -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out.update(PYTHONPATH=str(REPO) + os.pathsep + out.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return out


def cli(*args, nproc: int = 1, extra_env=None, check: bool = True) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "dromedary", *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(port), "-m", "dromedary", *args]
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env={**env(), **(extra_env or {})}, capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_finetune(files, out: Path, *extra) -> Path:
    """finetune in this process, parsed by Fire exactly as the CLI does."""
    import fire

    fire.Fire(ft.finetune, command=[str(a) for a in ["--input", files["sft"], "--output_dir", out, "--ckpt_dir",
                                                     files["ckpt"], *RUN, *extra]])
    return out


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def adapter_of(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / lora.WEIGHTS_FILE))


@pytest.fixture(scope="module")
def reference(files):
    """The single-process run every parallel and resumed run must reproduce."""
    return run_finetune(files, files["root"] / "single")


# ---------------------------------------------------------------------------------------------
# Records -> tokens.


def test_loss_mask_covers_exactly_the_answer(files, tok):
    rec = sft_records(1)[0]
    source, target = sft.conversation(rec, "x", assistant_name="Dromedary", knowledge_cutoff="2021")
    ids, n_src = sft.encode(tok, source, target, source_max_len=500, target_max_len=500, add_eos=True)
    tokens, labels = sft.collate([(ids, n_src), (ids[:n_src + 3], n_src)], "cpu")
    assert (labels[0, :n_src] == sft.IGNORE).all() and (labels[0, n_src:] == tokens[0, n_src:]).all()
    assert labels[0, -1] == tok.eos_id and tok.decode(labels[0, n_src:].tolist()) == rec["output"]
    assert (labels[1, n_src + 3:] == sft.IGNORE).all()  # padding
    no_eos, _ = sft.encode(tok, source, target, source_max_len=500, target_max_len=500, add_eos=False)
    assert no_eos == ids[:-1]
    # loss_sum computes logits only on the answer, and equals the masked full-logit loss.
    loaded = builder.build(str(files["ckpt"]), model_parallel_size=1, dtype="fp32")
    full = loaded.model(tokens[:, :-1])
    want = torch.nn.functional.cross_entropy(full.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=sft.IGNORE,
                                             reduction="sum")
    torch.testing.assert_close(sft.loss_sum(loaded.model, tokens, labels), want, rtol=1e-5, atol=1e-5)


def test_source_truncated_from_the_left_and_target_from_the_right(tok):
    rec = {**sft_records(1)[0], "instruction": " ".join(WORDS * 3)}
    source, target = sft.conversation(rec, "x", assistant_name="Dromedary", knowledge_cutoff="2021")
    whole = tok.encode(source, bos=True)
    ids, n_src = sft.encode(tok, source, target, source_max_len=40, target_max_len=5, add_eos=True)
    assert n_src == 40 and ids[0] == tok.bos_id and ids[1:n_src] == whole[-39:]
    assert ids[n_src:] == tok.encode(target, bos=False)[:5]  # cut at the end: no EOS on a cut answer


def test_system_prompt_is_chosen_by_id_and_matches_the_chat_format():
    recs = sft_records(40)
    kw = dict(assistant_name="Dromedary", knowledge_cutoff="2021")
    prompts = templates.engraving_system_prompts("Dromedary", "2021")
    chosen = []
    for rec in recs:
        source, target = sft.conversation(rec, "x", **kw)
        again, _ = sft.conversation({**rec, "output": "something else"}, "x", **kw)
        system = templates.engraving_system_prompt(rec["id"], "Dromedary", "2021")
        user = templates.user_message(rec["instruction"], rec["input"])
        assert source == again == templates.format_conversation(system, [{"role": "user", "content": user}], "Dromedary")
        chosen.append(prompts.index(system))
    assert len(set(chosen)) > 1  # varied across records


def test_bad_flags_fail_before_any_model_work(files, tmp_path):
    base = ["--input", files["sft"], "--output_dir", tmp_path / "o"]
    import fire

    for extra, message in ((["--max_steps", "3", "--num_epochs", "1"], "either --max_steps"),
                           (["--batch_size", "3", "--micro_batch_size", "2"], "multiple of"),
                           (["--lora_target_modules", "wq,foo"], "unknown module"),
                           (["--eval_input", files["sft"], "--eval_fraction", "0.1"], "either --eval_input"),
                           (["--dtype", "fp16"], "loss scaling")):
        with pytest.raises(ValueError, match=message):
            fire.Fire(ft.finetune, command=[str(a) for a in base + extra])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        fire.Fire(ft.finetune, command=["--input", str(files["sft"]), "--output_dir", str(tmp_path / "full")])


# ---------------------------------------------------------------------------------------------
# Training.


def test_loss_decreases_on_a_tiny_overfit_run(files, tmp_path):
    write_jsonl(tmp_path / "four.jsonl", sft_records(4))
    ft.finetune(str(tmp_path / "four.jsonl"), str(tmp_path / "o"), ckpt_dir=str(files["ckpt"]), max_steps=30,
                batch_size=4, micro_batch_size=4, lora_r=8, learning_rate=2e-2, lora_dropout=0.0, save_steps=0)
    losses = [e["loss"] for e in log_of(tmp_path / "o")]
    assert losses[-1] < 0.3 * losses[0], losses


def test_data_and_model_parallel_runs_match_one_process(files, reference):
    ref = log_of(reference)
    for name, mp in (("dp2", "1"), ("mp2", "2")):
        out = files["root"] / name
        cli("finetune", "--input", files["sft"], "--output_dir", out, "--ckpt_dir", files["ckpt"], *RUN,
            "--model_parallel_size", mp, nproc=2)
        got = log_of(out)
        assert [e["step"] for e in got] == [e["step"] for e in ref]
        for a, b in zip(got, ref):
            # Same batches, same dropout masks: only float summation order differs (MP splits matmuls).
            assert a["loss"] == pytest.approx(b["loss"], abs=2e-5), (name, a, b)
            assert a.get("eval_loss", 0) == pytest.approx(b.get("eval_loss", 0), abs=2e-5), (name, a, b)
        want = adapter_of(reference)
        for key, t in adapter_of(out).items():
            torch.testing.assert_close(t, want[key], rtol=1e-4, atol=1e-6, msg=f"{name} {key}")


def test_killed_run_resumes_to_the_same_adapter(files, reference, tmp_path):
    out = tmp_path / "killed"
    args = ["finetune", "--input", files["sft"], "--output_dir", out, "--ckpt_dir", files["ckpt"], *RUN]
    proc = cli(*args, extra_env={"DROMEDARY_KILL_AFTER_STEP": "5"}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000004"]
    assert not (out / lora.WEIGHTS_FILE).exists() and len(log_of(out)) == 5
    run_finetune(files, out, "--resume")
    assert log_of(out) == [{**e, "tokens_per_s": g["tokens_per_s"]} for e, g in zip(log_of(reference), log_of(out))]
    want = adapter_of(reference)
    got = adapter_of(out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------------
# Adapters: PEFT format, HF interop, other stages, merge.


def _batch(n: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(0))


def test_adapter_is_peft_format_and_hf_gives_the_same_logits(files, reference):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    tokens = _batch()
    with torch.no_grad():
        base = builder.build(str(files["ckpt"]), model_parallel_size=1, dtype="fp32").model(tokens)
        ours = builder.build(str(files["ckpt"]), adapter=str(reference), model_parallel_size=1, dtype="fp32").model(tokens)
        hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(files["ckpt_hf"]), dtype=torch.float32),
                                       str(reference)).eval()
        theirs = hf(tokens).logits
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapter_of(reference)
    assert (ours - base).abs().max() > 1e-3  # the adapter matters...
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)  # ...and both libraries apply it alike


def test_adapter_trained_by_hf_peft_loads_onto_our_model(files, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    hf = get_peft_model(LlamaForCausalLM.from_pretrained(str(files["ckpt_hf"]), dtype=torch.float32),
                        LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
                                   layers_to_transform=[1], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    hf.save_pretrained(str(tmp_path / "hf_adapter"))
    tokens = _batch()
    with torch.no_grad():
        theirs = hf.eval()(tokens).logits
        ours = builder.build(str(files["ckpt_hf"]), adapter=str(tmp_path / "hf_adapter"), model_parallel_size=1,
                             dtype="fp32").model(tokens)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_convert_merges_the_adapter(files, reference, tmp_path, layout):
    from dromedary.stages.convert import convert

    convert(str(files["ckpt"]), str(tmp_path / "merged"), layout=layout, adapter=str(reference))
    tokens = _batch()
    with torch.no_grad():
        merged = builder.build(str(tmp_path / "merged"), model_parallel_size=1, dtype="fp32").model(tokens)
        adapted = builder.build(str(files["ckpt"]), adapter=str(reference), model_parallel_size=1, dtype="fp32").model(tokens)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_generate_with_adapter_at_model_parallel_2_matches_one_process(files, reference, tmp_path):
    import fire

    from dromedary.stages.generate import generate

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": _sentence(random.Random(i), 5)}
                                                       for i in range(3)])
    args = ["--input", prompts, "--ckpt_dir", files["ckpt"], "--adapter", reference, "--max_new_tokens", "8",
            "--dtype", "fp32"]
    fire.Fire(generate, command=[str(a) for a in args + ["--output", tmp_path / "one.jsonl"]])
    cli("generate", *args, "--output", tmp_path / "two.jsonl", nproc=2)
    one, two = ([json.loads(line)["completion"] for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
                for n in ("one", "two"))
    assert one == two and any(one)


def test_cli_end_to_end_on_the_embedded_default_model(files, tmp_path):
    from dromedary.default_model import ensure_default_model

    ensure_default_model()  # built once per cache, in this process: the CLI below only loads it
    out = tmp_path / "adapter"
    args = ["--input", files["sft"], "--output_dir", out, "--max_steps", "2", "--batch_size", "2",
            "--source_max_len", "48", "--target_max_len", "16", "--eval_fraction", "0.2"]
    proc = cli("finetune", *args)
    assert "wrote adapter" in proc.stderr
    assert {lora.CONFIG_FILE, lora.WEIGHTS_FILE, "train_log.jsonl", "finetune.provenance.json", "checkpoints"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / lora.CONFIG_FILE).read_text())["peft_type"] == "LORA"
    assert "eval_loss" in log_of(out)[-1]
    import fire

    with pytest.raises(FileExistsError, match="--overwrite"):  # a finished run is never clobbered...
        fire.Fire(ft.finetune, command=[str(a) for a in args])
    fire.Fire(ft.finetune, command=[str(a) for a in args + ["--resume"]])  # ...and resuming it does nothing
    assert len(log_of(out)) == 2
    shorter = [str(a) for a in args]
    shorter[shorter.index("--max_steps") + 1] = "1"
    fire.Fire(ft.finetune, command=shorter + ["--overwrite"])  # starts afresh
    assert len(log_of(out)) == 1 and [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000001"]


def test_gradient_checkpointing_gives_the_same_gradients(files, tok):
    recs = sft_records(4)
    batch = [sft.encode(tok, *sft.conversation(r, "x", assistant_name="Dromedary", knowledge_cutoff="2021"),
                        source_max_len=64, target_max_len=24, add_eos=True) for r in recs]
    grads = []
    for flag in (False, True):
        loaded = builder.build(str(files["ckpt"]), model_parallel_size=1, dtype="fp32", train=True)
        lora.add_lora(loaded.model, r=4, alpha=8, dropout=0.1, targets=list(lora.MODULES))
        lora.init_lora(loaded.model, 0, loaded.world)
        with torch.no_grad():  # B = 0 would leave A without gradient
            for _, p, _ in lora.trainable(loaded.model):
                p.normal_(0, 0.1)
        loaded.model.gradient_checkpointing = flag
        sft.backward_batch(loaded.model, batch, 2, loaded.world, seed=0)
        grads.append([p.grad.clone() for _, p, _ in lora.trainable(loaded.model)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Epochs, the data-parallel split, and what a resume or an overwrite keeps.


def test_num_epochs_counts_epochs_exactly():
    order = sft.DataOrder(3, seed=0)
    assert len(order.batch(0, 16, end=3)) == 3 and sorted(order.batch(0, 16, end=3)) == [0, 1, 2]
    taken = [i for s in range(3) for i in order.batch(s, 2, end=6)]  # 2 epochs in batches of 2
    assert len(taken) == 6 and sorted(taken[:3]) == sorted(taken[3:]) == [0, 1, 2]


def test_one_epoch_of_three_records_in_a_batch_of_sixteen_is_one_epoch(files, tmp_path):
    small = write_jsonl(tmp_path / "three.jsonl", sft_records(3))
    ft.finetune(str(small), str(tmp_path / "o"), ckpt_dir=str(files["ckpt"]), num_epochs=1, batch_size=16,
                micro_batch_size=4, lora_r=2, source_max_len=48, target_max_len=16, save_steps=0)
    assert [(e["step"], e["epoch"]) for e in log_of(tmp_path / "o")] == [(1, 1.0)]
    ft.finetune(str(small), str(tmp_path / "o2"), ckpt_dir=str(files["ckpt"]), num_epochs=2, batch_size=4,
                micro_batch_size=2, lora_r=2, source_max_len=48, target_max_len=16, save_steps=0)
    assert [e["epoch"] for e in log_of(tmp_path / "o2")] == [1.3333, 2.0]


def _world(dp_rank: int, dp_size: int) -> distributed.World:
    return distributed.World(rank=dp_rank, world_size=dp_size, local_rank=0, mp_size=1, mp_rank=0,
                             dp_size=dp_size, dp_rank=dp_rank, device=torch.device("cpu"))


def test_data_parallel_groups_share_the_long_examples():
    costs = list(range(1, 9))  # padded tokens of the sorted micro-batches: the last is the longest
    owners = sft.deal_micro_batches(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert sorted(owners) == [0, 0, 0, 0, 1, 1, 1, 1] and loads == [18, 18]
    owners = sft.deal_micro_batches([1, 1, 1, 1, 1, 1, 2, 50], 4)
    assert owners[7] != owners[6] and [owners.count(r) for r in range(4)] == [2, 2, 2, 2]
    assert sft.deal_micro_batches([5, 9, 7], 4) == [2, 0, 1]  # a short batch: a group may get none


@pytest.mark.parametrize("n", [8, 5])  # a full batch; a short last batch of an exact epoch count
def test_any_data_parallel_split_sums_to_the_same_gradient(files, tok, n):
    rng = random.Random(4)
    recs = [{**r, "output": _sentence(rng, rng.choice([3, 20]))} for r in sft_records(n)]
    batch = [sft.encode(tok, *sft.conversation(r, "x", assistant_name="Dromedary", knowledge_cutoff="2021"),
                        source_max_len=64, target_max_len=24, add_eos=True) for r in recs]
    loaded = builder.build(str(files["ckpt"]), model_parallel_size=1, dtype="fp32", train=True)
    lora.add_lora(loaded.model, r=4, alpha=8, dropout=0.1, targets=list(lora.MODULES))
    lora.init_lora(loaded.model, 0, loaded.world)
    params = [p for _, p, _ in lora.trainable(loaded.model)]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)

    def grads(world) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        sft.backward_batch(loaded.model, batch, 1, world, seed=0)
        return [p.grad.clone() for p in params]

    want = grads(_world(0, 1))
    got = [sum(g) for g in zip(*(grads(_world(r, 4)) for r in range(4)))]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_resume_refuses_another_training_file_or_base_model(files, tmp_path):
    args = dict(ckpt_dir=str(files["ckpt"]), max_steps=2, batch_size=2, micro_batch_size=2, lora_r=2,
                source_max_len=48, target_max_len=16, save_steps=1)
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(4))
    out = tmp_path / "adapter"
    ft.finetune(str(data), str(out), **args)
    adapter = (out / lora.WEIGHTS_FILE).read_bytes()
    # A re-curated training file: the old adapter must not pass for one trained on it.
    write_jsonl(data, sft_records(4, seed=9))
    with pytest.raises(ValueError, match=r"cannot resume: it was trained with other training records.*--overwrite"):
        ft.finetune(str(data), str(out), resume=True, **args)
    write_jsonl(data, sft_records(4))
    with pytest.raises(ValueError, match=r"other --ckpt_dir \(its content\)"):
        ft.finetune(str(data), str(out), resume=True, **{**args, "ckpt_dir": str(files["ckpt_hf"])})
    ft.finetune(str(data), str(out), resume=True, **args)  # the same: already trained, nothing to do
    assert (out / lora.WEIGHTS_FILE).read_bytes() == adapter


def test_overwrite_moves_the_adapter_and_its_checkpoints_to_a_backup(files, tmp_path, capsys):
    args = dict(ckpt_dir=str(files["ckpt"]), max_steps=2, batch_size=2, micro_batch_size=2, lora_r=2,
                source_max_len=48, target_max_len=16, save_steps=1)
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records(4))
    out = tmp_path / "adapter"
    ft.finetune(str(data), str(out), **args)
    (out / "notes.txt").write_text("mine")
    adapter = (out / lora.WEIGHTS_FILE).read_bytes()
    for _ in range(2):
        ft.finetune(str(data), str(out), overwrite=True, **{**args, "max_steps": 1})
    backups = sorted(tmp_path.glob("adapter.bak-*"))
    assert len(backups) == 2 and "moved the old checkpoints" in capsys.readouterr().err
    assert (backups[0] / lora.WEIGHTS_FILE).read_bytes() == adapter  # the first run's adapter...
    assert [p.name for p in (backups[0] / "checkpoints").iterdir()] == ["step-0000002"]  # ...and checkpoint
    assert len(log_of(backups[0])) == 2 and len(log_of(backups[1])) == 1
    assert (out / "notes.txt").read_text() == "mine" and len(log_of(out)) == 1
