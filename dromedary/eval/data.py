"""Benchmark readers: TruthfulQA multiple choice and BIG-bench HHH alignment, in every layout they ship in.

Each reader turns a source (a file, a folder, or a hub name read through `datasets`) into plain
`Item` dicts that the protocols turn into prompts. Nothing about prompts lives here. Layouts:

- TruthfulQA, Hugging Face `truthfulqa/truthful_qa` (config `multiple_choice`, split
  `validation`): rows {question, mc1_targets: {choices, labels}, mc2_targets: {...}} as parquet,
  a JSON array, or JSON Lines (`.json` or `.jsonl`); a folder holding such files (the hub's own
  `multiple_choice/validation-*.parquet`).
- TruthfulQA, BIG-bench `truthful_qa/task_mc.json`: {examples: [{input, target_scores}]}; an
  example's `mc2_targets` (choice -> 0|1), where present, gives the MC2 candidates.
- HHH, Hugging Face `HuggingFaceH4/hhh_alignment` (configs harmless, helpful, honest, other;
  split `test`): rows {input, targets: {choices, labels}}; a folder with one subfolder per subset.
- HHH, BIG-bench `hhh_alignment/<subset>/task.json`: {examples: [{input, target_scores}]} with the
  file's `task_prefix`, `example_input_prefix`, `example_output_prefix` (BIG-bench's defaults
  when absent: "", "\\nQ: ", "\\nA: ").
- HHH, lm-evaluation-harness's own source `hails/bigbench` (`hhh_alignment_zero_shot`): rows
  {inputs, multiple_choice_targets, multiple_choice_scores}, where `inputs` is already the prompt.

A malformed source stops the run before any model work with `FILE:LINE: reason` (JSON Lines, or a
JSON file that does not parse) or `FILE: row N: reason` (parquet rows, JSON arrays, BIG-bench
examples; N counts from 1).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

TRUTHFULQA_HUB = "truthfulqa/truthful_qa"
HHH_HUB = "HuggingFaceH4/hhh_alignment"
HHH_SUBSETS = ("harmless", "helpful", "honest", "other")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")

# BIG-bench's JSON-task defaults (bigbench/api/json_task.py), applied when a task file leaves the
# field out.
BIGBENCH_INPUT_PREFIX = "\nQ: "
BIGBENCH_OUTPUT_PREFIX = "\nA: "
BIGBENCH_CHOICE_PREFIX = "\n  choice: "

# One benchmark item. `context` is the prompt lm-evaluation-harness gives the model before each
# choice (HHH; TruthfulQA's is built by the protocol from `question`); `input` is the raw question or
# conversation, which the `dromedary` protocol wraps in its own prompt.
Item = dict[str, Any]  # {source, subset, input, context?, choices, labels, where}


class DataError(ValueError):
    """A malformed benchmark source: the message starts with FILE:LINE or FILE: row N."""


# ------------------------------------------------------------------------------------ file rows


def read_rows(path: Path) -> list[tuple[str, Any]]:
    """(where, row) for every row of a data file, `where` being FILE:LINE or FILE: row N."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        except Exception as err:  # noqa: BLE001 - pyarrow raises many kinds; all mean a bad file
            raise DataError(f"{path}: not a readable parquet file ({err})") from None
        return [(f"{path}: row {i}", row) for i, row in enumerate(rows, 1)]
    try:
        text = path.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # more than one value: JSON Lines in a .json file
                raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
        else:
            if isinstance(data, list):
                return [(f"{path}: row {i}", row) for i, row in enumerate(data, 1)]
            if isinstance(data, dict) and "examples" not in data:
                return [(f"{path}: row 1", data)]
            return [(str(path), data)]  # a BIG-bench task file
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
    return rows


def _field(where: str, row: Any, name: str, kind: type) -> Any:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if name not in row:
        raise DataError(f"{where}: missing field {name!r}")
    value = row[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(f"{where}: field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _text(where: str, row: Any, name: str) -> str:
    value = _field(where, row, name, str)
    if not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def _targets(where: str, row: dict, name: str) -> tuple[list[str], list[int]]:
    """{choices: [str], labels: [0|1]} -> (choices, labels), checked."""
    targets = _field(where, row, name, dict)
    choices, labels = targets.get("choices"), targets.get("labels")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: {name}.choices must be a list of strings")
    if not isinstance(labels, list) or not all(type(x) is int and x in (0, 1) for x in labels):
        raise DataError(f"{where}: {name}.labels must be a list of 0s and 1s")
    return _checked_choices(where, name, choices, labels)


def _target_scores(where: str, example: Any, name: str = "target_scores") -> tuple[list[str], list[int]]:
    """BIG-bench {choice: score} -> (choices, labels), in the file's order."""
    scores = _field(where, example, name, dict)
    labels = []
    for choice, score in scores.items():
        if isinstance(score, bool) or not isinstance(score, (int, float)) or score not in (0, 1):
            raise DataError(f"{where}: {name}[{choice!r}] must be 0 or 1, got {score!r}")
        labels.append(int(score))
    return _checked_choices(where, name, list(scores), labels)


def _checked_choices(where: str, name: str, choices: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
    if len(choices) != len(labels):
        raise DataError(f"{where}: {name} has {len(choices)} choices but {len(labels)} labels")
    if len(choices) < 2:
        raise DataError(f"{where}: {name} needs at least two choices, got {len(choices)}")
    if 1 not in labels:
        raise DataError(f"{where}: {name} marks no choice correct")
    if any(not c.strip() for c in choices):
        raise DataError(f"{where}: {name} has an empty choice")
    if len(set(choices)) != len(choices):
        raise DataError(f"{where}: {name} lists a choice twice")
    return choices, labels


def _one_correct(where: str, name: str, labels: list[int]) -> None:
    if labels.count(1) != 1:
        raise DataError(f"{where}: {name} must mark exactly one choice correct (MC1), got {labels.count(1)}")


# ------------------------------------------------------------------------------------ TruthfulQA


def truthfulqa_items(source: str) -> list[Item]:
    """Every TruthfulQA question of SOURCE, with its MC1 and MC2 candidates."""
    path = Path(source).expanduser()
    if not path.exists():
        if _looks_like_path(source):
            raise DataError(f"{source}: no such file or folder (TruthfulQA data)")
        return _truthfulqa_rows(_hub_rows(source, "multiple_choice", "validation"), source)
    files = _data_files(path, prefer="validation", task_file="task_mc.json")
    items: list[Item] = []
    for file in files:
        rows = read_rows(file)
        if len(rows) == 1 and isinstance(rows[0][1], dict) and "examples" in rows[0][1]:
            items += _truthfulqa_bigbench(file, rows[0][1])
        else:
            items += _truthfulqa_rows(rows, str(file))
    return items


def _truthfulqa_rows(rows: Iterable[tuple[str, Any]], source: str) -> list[Item]:
    items = []
    for where, row in rows:
        question = _text(where, row, "question")
        mc1 = _targets(where, row, "mc1_targets")
        _one_correct(where, "mc1_targets", mc1[1])
        mc2 = _targets(where, row, "mc2_targets")
        items.append({"source": source, "subset": "all", "input": question, "where": where,
                      "mc1": mc1, "mc2": mc2})
    return items


def _truthfulqa_bigbench(path: Path, task: Any) -> list[Item]:
    examples = _examples(path, task)
    items = []
    for i, example in enumerate(examples, 1):
        where = f"{path}: row {i}"
        question = _text(where, example, "input")
        mc1 = _target_scores(where, example)
        _one_correct(where, "target_scores", mc1[1])
        mc2 = _target_scores(where, example, "mc2_targets") if "mc2_targets" in example else mc1
        items.append({"source": str(path), "subset": "all", "input": question, "where": where, "mc1": mc1, "mc2": mc2})
    return items


# ------------------------------------------------------------------------------------ HHH


def hhh_items(source: str) -> list[Item]:
    """Every HHH item of SOURCE, in subset order (harmless, helpful, honest, other)."""
    path = Path(source).expanduser()
    if not path.exists():
        if _looks_like_path(source):
            raise DataError(f"{source}: no such file or folder (HHH data)")
        items: list[Item] = []
        for subset in HHH_SUBSETS:
            items += _hhh_rows(_hub_rows(source, subset, "test"), f"{source}/{subset}", subset)
        return items
    if path.is_dir():
        subdirs = [(s, d) for s in HHH_SUBSETS for d in [_find_dir(path, s)] if d is not None]
        if subdirs:
            return [item for subset, d in subdirs for item in _hhh_files(_data_files(d, prefer="test", task_file="task.json"), subset)]
    return _hhh_files(_data_files(path, prefer="test", task_file="task.json"), None)


def _hhh_files(files: list[Path], subset: Optional[str]) -> list[Item]:
    items: list[Item] = []
    for file in files:
        name = subset or _subset_from_path(file)
        rows = read_rows(file)
        if len(rows) == 1 and isinstance(rows[0][1], dict) and "examples" in rows[0][1]:
            items += _hhh_bigbench(file, rows[0][1], name)
        else:
            items += _hhh_rows(rows, str(file), name)
    return items


def _hhh_rows(rows: Iterable[tuple[str, Any]], source: str, subset: str) -> list[Item]:
    items = []
    for where, row in rows:
        if isinstance(row, dict) and "inputs" in row and "multiple_choice_targets" in row:
            items.append(_hails_row(where, row, source, subset))
            continue
        text = _text(where, row, "input")
        choices, labels = _targets(where, row, "targets")
        choices = [c.strip() for c in choices]  # as BIG-bench's loader gives them to lm-eval
        row_subset = row.get("subset", subset) if isinstance(row.get("subset"), str) else subset
        # The hub rows are BIG-bench's examples; lm-eval's source formats them with BIG-bench's
        # default prefixes, and its loader strips the result.
        context = (BIGBENCH_INPUT_PREFIX + text + BIGBENCH_OUTPUT_PREFIX).strip()
        items.append({"source": source, "subset": row_subset, "input": text, "context": context, "where": where,
                      "choices": choices, "labels": labels})
    return items


def _hails_row(where: str, row: dict, source: str, subset: str) -> Item:
    context = _text(where, row, "inputs")
    choices = _field(where, row, "multiple_choice_targets", list)
    scores = _field(where, row, "multiple_choice_scores", list)
    if not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: multiple_choice_targets must be a list of strings")
    if not all(type(s) is int and s in (0, 1) for s in scores):
        raise DataError(f"{where}: multiple_choice_scores must be a list of 0s and 1s")
    choices, labels = _checked_choices(where, "multiple_choice_targets", choices, scores)
    subset = row["subset"] if isinstance(row.get("subset"), str) else subset
    return {"source": source, "subset": subset, "input": context, "context": context, "where": where,
            "choices": choices, "labels": labels}


def _hhh_bigbench(path: Path, task: dict, subset: str) -> list[Item]:
    examples = _examples(path, task)
    prefixes = {}
    for key, default in (("task_prefix", ""), ("example_input_prefix", BIGBENCH_INPUT_PREFIX),
                         ("example_output_prefix", BIGBENCH_OUTPUT_PREFIX), ("choice_prefix", BIGBENCH_CHOICE_PREFIX)):
        value = task.get(key, default)
        if not isinstance(value, str):
            raise DataError(f"{path}: field {key!r} must be a string, got {type(value).__name__}")
        prefixes[key] = value
    append = task.get("append_choices_to_input", True)
    if not isinstance(append, bool):
        raise DataError(f"{path}: field 'append_choices_to_input' must be true or false")
    items = []
    for i, example in enumerate(examples, 1):
        where = f"{path}: row {i}"
        text = _text(where, example, "input")
        choices, labels = _target_scores(where, example)
        body = prefixes["example_input_prefix"] + text
        if append:
            # BIG-bench lists the choices in a seeded random order here; the file's order is used.
            body += prefixes["choice_prefix"] + prefixes["choice_prefix"].join(choices)
        context = (prefixes["task_prefix"] + body + prefixes["example_output_prefix"]).strip()
        items.append({"source": str(path), "subset": subset, "input": text, "context": context, "where": where,
                      "choices": [c.strip() for c in choices], "labels": labels})
    return items


# ------------------------------------------------------------------------------------ helpers


def _examples(path: Path, task: Any) -> list:
    examples = task.get("examples")
    if not isinstance(examples, list) or not examples:
        raise DataError(f"{path}: field 'examples' must be a non-empty list")
    return examples


def _looks_like_path(source: str) -> bool:
    """A hub name is ORG/NAME; anything else that does not exist is a mistyped path."""
    parts = source.split("/")
    return (len(parts) != 2 or source.startswith((".", "~")) or source.endswith(DATA_SUFFIXES)
            or os.sep != "/" and os.sep in source)


def _find_dir(root: Path, name: str) -> Optional[Path]:
    if root.name == name:
        return root
    found = sorted(p for p in root.rglob(name) if p.is_dir())
    return found[0] if found else None


def _data_files(path: Path, *, prefer: str, task_file: str) -> list[Path]:
    if path.is_file():
        return [path]
    task = sorted(path.rglob(task_file))
    if task:
        return task[:1]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES
                   and not p.name.startswith("."))
    preferred = [p for p in files if p.name.startswith(prefer)]
    if preferred:
        return preferred
    if len(files) == 1:
        return files
    if not files:
        raise DataError(f"{path}: no {task_file} and no data files ({', '.join(DATA_SUFFIXES)}) in this folder")
    raise DataError(f"{path}: several data files and none named {prefer}*: "
                    f"{', '.join(str(p.relative_to(path)) for p in files[:5])}; pass one file")


def _subset_from_path(path: Path) -> str:
    for part in (path.stem, path.parent.name):
        if part in HHH_SUBSETS:
            return part
    return "all"


def _hub_rows(name: str, config: str, split: str) -> list[tuple[str, Any]]:
    """Rows of a hub dataset through `datasets` (needs the network or its cache)."""
    try:
        import datasets

        rows = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # noqa: BLE001 - offline, unknown name, ...: the user passes a path instead
        raise DataError(f"{name} ({config}, {split}): could not load it through `datasets` ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); download it and pass the local "
                        "file or folder instead") from None
    return [(f"{name}/{config}/{split}: row {i}", dict(row)) for i, row in enumerate(rows, 1)]
