"""Prompt sets: the embedded offline sets, local files, hub datasets, and a resumable batch stream.

Sources (`load_prompts(source, split, task, ...)`):

- ``"embedded"``: the prompt sets shipped in this package (``klq_jax/data/*.jsonl``), tasks
  ``dialogue`` and ``summarisation``, splits ``train`` and ``eval``.
- a local ``.jsonl`` / ``.json`` / ``.parquet`` file, or a folder holding such files (a hub
  snapshot layout such as ``data/train-00000-of-00001.parquet`` works; files are picked by split).
- a hub dataset id such as ``Anthropic/hh-rlhf`` or ``trl-lib/tldr``, loaded with
  ``datasets.load_dataset``.

Tasks decide how a record becomes a `PromptExample`:

- ``dialogue``: ``prompt_field`` (default ``prompt``) and optional ``reference_field`` (default
  ``reference``, used when present).
- ``summarisation``: ``prompt_field`` (default ``document``) holds the passage; reference as above.
- ``hh``: Anthropic HH-RLHF records (``chosen``/``rejected`` texts made of
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` turns). Single-turn setting: only records with
  exactly one Human turn followed by one Assistant reply are kept; prompt = the human message,
  reference = the chosen assistant reply.
- ``tldr``: either ``prompt``/``completion`` records (``trl-lib/tldr``) or ``subreddit``/
  ``title``/``post``/``summary`` records (``vwxyzjn/summarize_from_feedback_tldr_3_filtered``),
  formatted as ``"SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:"``;
  reference = the human summary.

Every bad input raises `DataError` (a `ValueError`) with one line naming the bad value and what
is accepted.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

Message = dict  # {"role": str, "content": str}

TASKS = ("dialogue", "summarisation", "hh", "tldr")
_TASK_ALIASES = {"summarization": "summarisation", "anthropic_hh": "hh", "hh-rlhf": "hh"}
EMBEDDED_TASKS = ("dialogue", "summarisation")
EMBEDDED_SPLITS = ("train", "eval")
_EMBEDDED_SPLIT_ALIASES = {"test": "eval", "validation": "eval", "valid": "eval", "dev": "eval"}
FILE_FORMATS = (".jsonl", ".json", ".parquet")
# Suffixes that mark a source as a file path (rather than a hub id) even when it does not exist.
_PATHLIKE_SUFFIXES = FILE_FORMATS + (
    ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip", ".xz", ".bz2", ".zst", ".pkl", ".xlsx",
    ".yaml", ".yml", ".md", ".ndjson", ".jsonl.gz", ".npz", ".npy", ".feather", ".orc",
)
_SPLIT_WORDS = ("train", "test", "eval", "validation", "valid", "dev")

TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
SUMMARY_INSTRUCTION = "Summarise the following passage in one sentence.\n\n{document}"
HH_TEXT_TEMPLATE = "\n\nHuman: {prompt}\n\nAssistant:"

_DEFAULT_FIELDS = {  # task -> (prompt_field, reference_field)
    "dialogue": ("prompt", "reference"),
    "summarisation": ("document", "reference"),
    "hh": ("chosen", None),
    "tldr": (None, None),
}


class DataError(ValueError):
    """A bad data source, file, field or prompt set. The message is one line."""


@dataclasses.dataclass(frozen=True)
class PromptExample:
    """One prompt.

    prompt: the prompt text (for ``summarisation``, the passage; see `to_messages`), or a tuple of
      chat messages ``{"role": ..., "content": ...}`` when the source holds conversations.
    reference: a reference response (the target of a reference-based reward), or None.
    alternative: a second good response, differently worded (eval sets only; measures the reward).
    """

    prompt: str | tuple[Message, ...]
    reference: str | None = None
    alternative: str | None = None

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)


# --------------------------------------------------------------------------------------------
# Task formatting


def canonical_task(task: str) -> str:
    t = _TASK_ALIASES.get(str(task).strip().lower(), str(task).strip().lower())
    if t not in TASKS:
        raise DataError(f"unknown task {task!r}; accepted: {', '.join(repr(x) for x in TASKS)}")
    return t


def to_messages(example: PromptExample, task: str) -> list[Message]:
    """Chat messages for a chat-template model.

    dialogue/hh -> ``[{"role": "user", "content": prompt}]``; summarisation -> one user message
    asking for a one-sentence summary of the passage; tldr -> the formatted TL;DR prompt as the user
    message. Prompts that already are messages are returned as they are.
    """
    task = canonical_task(task)
    if example.is_chat:
        return [dict(m) for m in example.prompt]
    if task == "summarisation":
        content = SUMMARY_INSTRUCTION.format(document=example.prompt)
    else:
        content = example.prompt
    return [{"role": "user", "content": content}]


def to_text(example: PromptExample, task: str) -> str:
    """Raw-text prompt for a model without a chat template (the paper's Pythia SFT models).

    hh -> ``"\\n\\nHuman: {prompt}\\n\\nAssistant:"``; tldr -> the formatted prompt ending in
    ``"TL;DR:"``; summarisation -> the instruction and passage; dialogue -> the prompt.
    """
    task = canonical_task(task)
    if example.is_chat:
        raise DataError(
            f"prompt is a list of chat messages, not text, for task {task!r}; accepted here: text "
            "prompts (use to_messages with a chat template instead)")
    if task == "hh":
        return HH_TEXT_TEMPLATE.format(prompt=example.prompt)
    if task == "summarisation":
        return SUMMARY_INSTRUCTION.format(document=example.prompt)
    return example.prompt


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_hh_turns(text: str) -> list[tuple[str, str]]:
    """Split an HH-RLHF transcript into ``[(speaker, message), ...]`` (speakers Human/Assistant)."""
    parts = _HH_TURN.split(text)
    # parts = [preamble, speaker1, msg1, speaker2, msg2, ...]
    turns = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]
    if parts[0].strip():  # text before the first marker (e.g. a transcript without leading "\n\n")
        head = parts[0].lstrip()
        for speaker in ("Human", "Assistant"):
            if head.startswith(speaker + ":"):
                turns.insert(0, (speaker, head[len(speaker) + 1:].strip()))
                break
        else:
            turns.insert(0, ("", head.strip()))
    return turns


def hh_single_turn(text: str) -> tuple[str, str] | None:
    """(human message, assistant reply) when `text` is exactly one Human turn then one reply."""
    turns = parse_hh_turns(text)
    if len(turns) != 2 or turns[0][0] != "Human" or turns[1][0] != "Assistant":
        return None
    return turns[0][1], turns[1][1]


def format_tldr(subreddit: str, title: str, post: str) -> str:
    return TLDR_TEMPLATE.format(subreddit=subreddit, title=title, post=post)


# --------------------------------------------------------------------------------------------
# Loading


def load_prompts(
    source: str = "embedded",
    split: str = "train",
    task: str = "dialogue",
    *,
    prompt_field: str | None = None,
    reference_field: str | None = None,
    max_examples: int | None = None,
    hub_name: str | None = None,
    hub_revision: str | None = None,
) -> list[PromptExample]:
    """Load a prompt set as a list of `PromptExample`.

    Args:
      source: ``"embedded"``, a local file/folder, or a hub dataset id.
      split: ``train``/``eval`` for embedded sets (``test``/``validation`` mean ``eval``); for files
        in a folder and hub datasets, the split name (``train``, ``test``, ``validation``...). A
        single local file is one split (a ``.json`` object keyed by split names is the exception).
      task: ``dialogue``, ``summarisation``, ``hh`` or ``tldr``.
      prompt_field: record field holding the prompt (task default when None; for ``hh`` the
        transcript field, default ``chosen``; for ``tldr`` the prompt field of prompt/completion
        records, default ``prompt``).
      reference_field: record field holding the reference; when given it is required, when None the
        task default is used if present (``hh`` and ``tldr`` always take theirs from the format).
      max_examples: keep only the first N examples (after filtering).
      hub_name, hub_revision: the config name and revision passed to ``datasets.load_dataset``.
    """
    task = canonical_task(task)
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise DataError(
            f"bad prompt source {source!r}; accepted: 'embedded', a local .jsonl/.json/.parquet "
            "file or folder, or a hub dataset id like 'Anthropic/hh-rlhf'")
    if max_examples is not None and int(max_examples) <= 0:
        raise DataError(f"max_examples={max_examples!r}; accepted: a positive integer or None")
    source = str(source)
    split = str(split)

    if source == "embedded":
        records, where = _load_embedded(task, split), f"embedded {task} set, split {split!r}"
    else:
        path = Path(source).expanduser()
        if path.exists():
            records, where = _load_local(path, split), f"{source} (split {split!r})"
        elif _looks_like_path(source):
            raise DataError(
                f"prompt file not found: {source!r}; accepted: 'embedded', an existing "
                ".jsonl/.json/.parquet file or folder, or a hub dataset id like 'Anthropic/hh-rlhf'")
        else:
            records = _load_hub(source, split, hub_name, hub_revision)
            where = f"hub dataset {source!r} (split {split!r})"

    examples = _to_examples(records, task, where, prompt_field, reference_field)
    if not examples:
        extra = " with exactly one Human turn" if task == "hh" else ""
        raise DataError(
            f"empty prompt set: no usable {task} prompts{extra} in {where}; accepted: a source "
            "with at least one non-empty prompt")
    if max_examples is not None:
        examples = examples[: int(max_examples)]
    return examples


def _looks_like_path(source: str) -> bool:
    s = source.lower()
    if s.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1:
        return True
    return any(s.endswith(suffix) for suffix in _PATHLIKE_SUFFIXES)


def _load_embedded(task: str, split: str) -> list[dict]:
    if task not in EMBEDDED_TASKS:
        raise DataError(
            f"no embedded prompt set for task {task!r}; embedded tasks: "
            f"{', '.join(repr(t) for t in EMBEDDED_TASKS)} (for {task!r} give a local file or a hub "
            f"id such as {'Anthropic/hh-rlhf' if task == 'hh' else 'trl-lib/tldr'!r})")
    s = _EMBEDDED_SPLIT_ALIASES.get(split.lower(), split.lower())
    if s not in EMBEDDED_SPLITS:
        raise DataError(
            f"unknown split {split!r} for the embedded {task} set; accepted: 'train', 'eval' "
            "(or 'test'/'validation' for 'eval')")
    resource = importlib.resources.files("klq_jax.data").joinpath(f"{task}_{s}.jsonl")
    with importlib.resources.as_file(resource) as p:
        return _read_jsonl(Path(p))


def _split_files(folder: Path, split: str) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and _suffix(p) in FILE_FORMATS
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(
            f"no .jsonl/.json/.parquet files in folder {str(folder)!r}; accepted: a folder holding "
            "such files (e.g. train.jsonl, data/train-00000-of-00001.parquet)")

    def split_of(p: Path) -> str | None:
        stem = p.name[: -len(_suffix(p))].lower()
        for word in (stem, p.parent.name.lower()):
            m = re.match(r"^([a-z]+)", word)
            if m and m.group(1) in _SPLIT_WORDS:
                return m.group(1)
        return None

    chosen = [p for p in files if split_of(p) == split.lower()]
    if chosen:
        return chosen
    named = sorted({s for s in map(split_of, files) if s})
    if not named:  # no file is named after a split: the folder is one split
        return files
    raise DataError(
        f"no files for split {split!r} in folder {str(folder)!r}; splits found: "
        f"{', '.join(repr(s) for s in named)}")


def _suffix(p: Path) -> str:
    return p.suffix.lower()


def _load_local(path: Path, split: str) -> list[dict]:
    if path.is_dir():
        files = _split_files(path, split)
    else:
        if _suffix(path) not in FILE_FORMATS:
            raise DataError(
                f"unknown prompt file format {path.suffix or '(no extension)'!r} of {str(path)!r}; "
                f"accepted: {', '.join(FILE_FORMATS)}")
        files = [path]
    records: list[dict] = []
    for f in files:
        suffix = _suffix(f)
        if suffix == ".jsonl":
            records.extend(_read_jsonl(f))
        elif suffix == ".json":
            records.extend(_read_json(f, split))
        else:
            records.extend(_read_parquet(f))
    return records


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"malformed JSON on line {lineno} of {str(path)!r}: {e.msg}; accepted: one JSON "
                    "object per line") from None
            if not isinstance(rec, dict):
                raise DataError(
                    f"line {lineno} of {str(path)!r} is a JSON {type(rec).__name__}, not an object; "
                    "accepted: one JSON object per line")
            records.append(rec)
    return records


def _read_json(path: Path, split: str) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines in a .json file
            return _read_jsonl(path)
        raise DataError(
            f"malformed JSON in {str(path)!r} at line {e.lineno}: {e.msg}; accepted: a list of "
            "objects, an object mapping split names to lists, or JSON lines") from None
    if isinstance(data, dict):
        if split in data and isinstance(data[split], list):
            data = data[split]
        elif "data" in data and isinstance(data["data"], list):
            data = data["data"]
        elif data and all(isinstance(v, list) and v and all(isinstance(x, dict) for x in v)
                          for v in data.values()):
            raise DataError(
                f"no split {split!r} in {str(path)!r}; splits found: "
                f"{', '.join(repr(k) for k in data)}")
        elif data and all(isinstance(v, list) for v in data.values()) and \
                len({len(v) for v in data.values()}) == 1 and \
                not all(isinstance(x, dict) for v in data.values() for x in v):
            keys = list(data)  # columnar: {"field": [values...]}
            data = [dict(zip(keys, row)) for row in zip(*(data[k] for k in keys))]
        else:
            data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(
            f"{str(path)!r} holds no list of JSON objects; accepted: a list of objects, an object "
            f"mapping split names (e.g. {split!r}) to lists, or JSON lines")
    return data


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot read parquet file {str(path)!r}: {first}; accepted: a valid "
                        "parquet file") from None
    return table.to_pylist()


def _load_hub(source: str, split: str, name: str | None, revision: str | None) -> Iterable[dict]:
    try:
        import datasets  # noqa: PLC0415  (heavy import, only for hub sources)
    except ImportError:  # pragma: no cover
        raise DataError(
            f"hub dataset {source!r} needs the 'datasets' package; accepted without it: "
            "'embedded' or a local .jsonl/.json/.parquet file") from None
    try:
        ds = datasets.load_dataset(source, name=name, split=split, revision=revision)
    except Exception as e:  # network, missing dataset/split/config: all become one line
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise DataError(
            f"cannot load hub dataset {source!r} (config {name!r}, split {split!r}): "
            f"{type(e).__name__}: {msg}; accepted: 'embedded', a local .jsonl/.json/.parquet file "
            "or folder, or a reachable hub dataset id with that split") from None
    return ds


def _field_error(field: str, rec: Mapping[str, Any], where: str, index: int, role: str) -> DataError:
    present = ", ".join(repr(k) for k in rec) or "none"
    return DataError(
        f"missing {role} field {field!r} in record {index} of {where}; fields present: {present}")


def _as_text(value: Any, field: str, where: str, index: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, Mapping) and "content" in m
                                                 for m in value):
        return str(value[-1]["content"])  # conversational completion: the (last) reply's text
    raise DataError(
        f"field {field!r} in record {index} of {where} is a {type(value).__name__}; accepted: a "
        "string (or a list of chat messages for conversational data)")


def _as_prompt(value: Any, field: str, where: str, index: int) -> str | tuple[Message, ...]:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and value and all(
            isinstance(m, Mapping) and "role" in m and "content" in m for m in value):
        return tuple({"role": str(m["role"]), "content": str(m["content"])} for m in value)
    raise DataError(
        f"prompt field {field!r} in record {index} of {where} is a {type(value).__name__}; "
        "accepted: a string or a list of {'role', 'content'} chat messages")


def _to_examples(records: Iterable[Mapping[str, Any]], task: str, where: str,
                 prompt_field: str | None, reference_field: str | None) -> list[PromptExample]:
    examples: list[PromptExample] = []
    skipped = 0
    for i, rec in enumerate(records):
        if task == "hh":
            ex = _hh_example(rec, where, i, prompt_field or "chosen")
        elif task == "tldr":
            ex = _tldr_example(rec, where, i, prompt_field, reference_field)
        else:
            ex = _plain_example(rec, task, where, i, prompt_field, reference_field)
        if ex is None or not ex.prompt:
            skipped += 1
            continue
        examples.append(ex)
    if skipped:
        log.info("%s: kept %d prompts, skipped %d (empty or, for hh, not single-turn)",
                 where, len(examples), skipped)
    return examples


def _plain_example(rec, task, where, i, prompt_field, reference_field) -> PromptExample:
    default_prompt, default_ref = _DEFAULT_FIELDS[task]
    pf = prompt_field or default_prompt
    if pf not in rec:
        raise _field_error(pf, rec, where, i, "prompt")
    prompt = _as_prompt(rec[pf], pf, where, i)
    reference = None
    if reference_field:
        if reference_field not in rec:
            raise _field_error(reference_field, rec, where, i, "reference")
        reference = _as_text(rec[reference_field], reference_field, where, i).strip()
    elif default_ref and rec.get(default_ref) is not None:
        reference = _as_text(rec[default_ref], default_ref, where, i).strip()
    alternative = rec.get("alternative")
    alternative = alternative.strip() if isinstance(alternative, str) else None
    return PromptExample(prompt=prompt, reference=reference or None, alternative=alternative)


def _hh_example(rec, where, i, field) -> PromptExample | None:
    if field not in rec:
        raise _field_error(field, rec, where, i, "HH transcript")
    text = _as_text(rec[field], field, where, i)
    pair = hh_single_turn(text)
    if pair is None or not pair[0] or not pair[1]:
        return None
    return PromptExample(prompt=pair[0], reference=pair[1])


def _tldr_example(rec, where, i, prompt_field, reference_field) -> PromptExample:
    pf = prompt_field or "prompt"
    if pf in rec:  # trl-lib/tldr style: prompt is already formatted, completion = " " + summary
        rf = reference_field or "completion"
        if reference_field and rf not in rec:
            raise _field_error(rf, rec, where, i, "reference")
        prompt = _as_prompt(rec[pf], pf, where, i)
        if isinstance(prompt, str):
            prompt = rec[pf].lstrip()  # keep the trailing "TL;DR:" exactly as given
        ref = _as_text(rec[rf], rf, where, i).strip() if rec.get(rf) is not None else None
        return PromptExample(prompt=prompt, reference=ref or None)
    needed = ("subreddit", "title", "post")
    for f in needed:
        if f not in rec:
            if prompt_field:
                raise _field_error(pf, rec, where, i, "prompt")
            present = ", ".join(repr(k) for k in rec) or "none"
            raise DataError(
                f"missing TL;DR field {f!r} in record {i} of {where}; fields present: {present}; "
                "accepted: 'prompt'(+'completion') or 'subreddit', 'title', 'post'(+'summary')")
    prompt = format_tldr(*(str(rec[f] if rec[f] is not None else "").strip() for f in needed))
    rf = reference_field or "summary"
    if reference_field and rf not in rec:
        raise _field_error(rf, rec, where, i, "reference")
    ref = _as_text(rec[rf], rf, where, i).strip() if rec.get(rf) is not None else None
    return PromptExample(prompt=prompt, reference=ref or None)


# --------------------------------------------------------------------------------------------
# Batching


class PromptStream:
    """Deterministic, resumable stream of prompt batches.

    Each epoch visits every example once in an order drawn from ``(seed, epoch)``; batches always
    hold ``batch_size`` examples and run on into the next epoch when an epoch ends mid-batch, so
    shapes stay fixed. ``state()`` is a small dict of ints (JSON/Orbax friendly) and
    ``restore(state)`` puts the stream back at that position: a restored stream yields exactly the
    batches the uninterrupted one would have.

    Multi-host: every process builds the same stream (same examples, seed) and, with
    ``process_count > 1``, gets its own contiguous slice of each global batch.
    """

    def __init__(self, examples: Sequence[Any], batch_size: int, seed: int = 0, *,
                 process_index: int = 0, process_count: int = 1):
        if len(examples) == 0:
            raise DataError("empty prompt set given to PromptStream; accepted: at least one example")
        if int(batch_size) <= 0:
            raise DataError(f"batch_size={batch_size!r}; accepted: a positive integer")
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise DataError(f"process_index={process_index!r} of process_count={process_count!r}; "
                            "accepted: 0 <= process_index < process_count")
        if batch_size % process_count:
            raise DataError(f"batch_size={batch_size} does not split over {process_count} "
                            "processes; accepted: a multiple of the process count")
        self.examples = list(examples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self._epoch = 0
        self._position = 0
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        """Number of examples (not batches: the stream is endless)."""
        return len(self.examples)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        return self._position

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of example indices used in `epoch`."""
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, int(epoch)])
            self._order = rng.permutation(len(self.examples))
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> list[int]:
        """Indices of the next global batch (all processes), advancing the stream."""
        out: list[int] = []
        while len(out) < self.batch_size:
            order = self.order(self._epoch)
            take = min(self.batch_size - len(out), len(order) - self._position)
            out.extend(int(j) for j in order[self._position:self._position + take])
            self._position += take
            if self._position == len(order):
                self._epoch += 1
                self._position = 0
        return out

    def next_batch(self) -> list[Any]:
        """This process's part of the next batch."""
        idx = self.next_indices()
        per = self.batch_size // self.process_count
        idx = idx[self.process_index * per:(self.process_index + 1) * per]
        return [self.examples[j] for j in idx]

    def __iter__(self) -> Iterator[list[Any]]:
        return self

    def __next__(self) -> list[Any]:
        return self.next_batch()

    def state(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed,
                "num_examples": len(self.examples), "batch_size": self.batch_size}

    def restore(self, state: Mapping[str, Any]) -> "PromptStream":
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"bad PromptStream state {dict(state) if isinstance(state, Mapping) else state!r}; "
                            "accepted: a mapping with integer 'epoch' and 'position'") from None
        for key, mine in (("seed", self.seed), ("num_examples", len(self.examples))):
            if key in state and int(state[key]) != mine:
                raise DataError(
                    f"PromptStream state has {key}={int(state[key])} but this stream has {key}={mine}; "
                    "accepted: a state saved from the same prompt set and seed")
        if epoch < 0 or not 0 <= position < len(self.examples):
            raise DataError(f"PromptStream state epoch={epoch}, position={position} out of range; "
                            f"accepted: epoch >= 0 and 0 <= position < {len(self.examples)}")
        self._epoch, self._position = epoch, position
        return self
