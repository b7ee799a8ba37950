"""Stage 05: evaluate recommenders the way the paper does, and draw what a person wants to see.

Paper: section 3 (metrics) and Table 1 (the evaluation protocol). For every model: greedy decoding,
one generation per unique conversation (its rows share one prompt), every row scored against its own
ground truth; Recall@k and NDCG@k for k in {5, 10, 15, 20} capped at N, each with a standard error;
hit rate at every rank; in-catalog, valid-format and duplicate rates; list length. Then a
comparison of several evaluations: a Markdown table and PNG plots (metrics against k, hit rate per
rank, and the training curves of runs that have a log.jsonl).

  python 05_eval.py                              # popularity + whichever of runs/sft,
                                                 # runs/rank_grpo, runs/grpo exist, on all test
                                                 # conversations; then compare
  python 05_eval.py --models smollm2             # the zero-shot start model (~4 min on a CPU)
  python 05_eval.py --limit 120                  # the first 120 test conversations
  python 05_eval.py --models smollm2 --limit 32  # a quick look at 32 test conversations
  python 05_eval.py --models runs/sft --split val
  python 05_eval.py --compare runs/eval/popularity runs/eval/sft runs/eval/rank_grpo

GPU, the paper's setting (Reddit-v2 imported by 01, N = 20 read from data/catalog_summary.json):

  python 05_eval.py --models Qwen/Qwen2.5-0.5B-Instruct runs/sft runs/grpo runs/rank_grpo \\
      --batch-size 128 --limit 0

Writes runs/eval/<name>/{metrics.json, per_rank.csv, samples.jsonl} per model (<name>: the model
name or the run directory's name) and, when two or more are compared, runs/eval/compare.md (the
table, and every model minus every earlier one, paired on the rows both scored), metrics_vs_k.png,
hit_rate_per_rank.png and training_<name>.png.

Deviations from the paper and the released code:
  1. IDCG@k is the textbook one, over min(k, |GT|) relevant items (docs/method.md, 'Metrics'). The
     released code truncates IDCG to the length of the filtered list, which inflates the NDCG of
     short lists: a model that outputs one correct item and nothing else would score a perfect NDCG
     there.
  2. Two protocols. "filtered" is the paper's and the headline: seen, invalid and out-of-catalog
     items are removed and later items move up. "aligned" is strict: rank k is line k of the text,
     so a malformed line keeps its slot and scores 0. Both come from common.score_completion.
  3. Standard errors, which the paper does not report, are clustered by conversation (the rows of
     one conversation share a generation, so they are not independent draws).
  4. Generation stops at --max-new-tokens, by default 16 tokens per line of the N asked for plus 16
     (a demo title takes 11 SmolLM2 tokens on average; the paper allows 1024). A trained model ends
     its list with EOS long before. Zero-shot SmolLM2 writes prose and runs to the cap on nearly
     every prompt, so its evaluation costs conversations x cap tokens, and a valid item it would
     have written after the cap (which the filtered protocol would move up) is lost: for such a
     model the scores are those at that cap.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import common
from common import arg

# What each known run directory is and which stage makes it (for messages and the default model
# list).
RUNS = {"sft": "run 03_sft.py first", "rank_grpo": "run 04_rank_grpo.py first",
        "grpo": "run 04_rank_grpo.py --algo grpo --out runs/grpo first"}


@dataclass
class Config:
    models: list[str] = arg([], "models: popularity (the floor: no model), smollm2 (zero-shot), "
                                "a run directory (runs/sft), an HF directory or hub id; "
                                "none: popularity and whichever of runs/{sft,rank_grpo,grpo} "
                                "exist")
    data_dir: str = arg("data", "where catalog.jsonl and {val,test}.jsonl are (from 01_catalog.py)")
    split: str = arg("test", "which split to evaluate: val or test", choices=["val", "test"])
    out: str = arg("runs/eval", "evaluations go to <out>/<name>/, comparisons to <out>/")
    runs_dir: str = arg("runs", "with no --models: where to look for sft, rank_grpo and grpo")
    n_items: int = arg(0, "N, the list length scored; 0: what 01_catalog.py wrote the prompts with",
                       within="[0, inf)")
    limit: int = arg(0, "evaluate only the first K conversations of the split (file order); "
                     "0: all", within="[0, inf)")
    batch_size: int = arg(32, "prompts per generation batch", within="[1, inf)")
    max_new_tokens: int = arg(0, "generation cap in tokens; 0: 16 per line of the N asked for, "
                              "plus 16", within="[0, inf)")
    max_prompt_tokens: int = arg(2048, "prompts are cut to their last this many tokens (the "
                                 "paper: 2048)", within="[1, inf)")
    compare: list[str] = arg([], "only compare these evaluation directories (<out>/<name>), "
                                 "evaluate nothing")
    cpu: bool = arg(False, "run on the CPU even when CUDA is available")
    bf16: bool = arg(True, "bf16 weights on CUDA (--no-bf16: fp32); a CPU runs fp32")
    trust_remote_code: bool = arg(False, "allow an HF model's own code to run when it is loaded")


# --- What to evaluate on, and with what -----------------------------------------------------------

def resolve_model(spec: str) -> tuple[str, str]:
    """(evaluation name, what load_model gets) for one --models entry; a bad entry stops here,
    before any model is loaded, so a typo in the last model does not cost the first one's run."""
    if spec in ("smollm2", "popularity"):
        return spec, spec
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise common.DataError(f"{path}: no saved model in it (config.json missing); "
                                   f"{RUNS.get(path.name, 'has its training finished?')}")
        return path.resolve().name, str(path.resolve())
    # Anything that is neither a directory nor an owner/name hub id is a missing directory, and so
    # is a stage's run name (no 50 s of hub retries offline).
    first = spec.split("/")[0]  # 'owner/name' that names no local directory: a hub id
    hub_id = (spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and first != "runs"
              and not Path(first).is_dir())
    if not hub_id or path.name in RUNS:
        raise common.DataError(
            f"{spec}: no such model directory; "
            f"{RUNS.get(path.name, 'give smollm2, a run directory or a hub id')}")
    return spec.split("/")[-1], spec


def default_models(runs_dir: str) -> list[str]:
    """The popularity list and every finished run of 03/04, so a bare `python 05_eval.py` after
    the other stages compares the floor, SFT and RL. Zero-shot SmolLM2 (Recall 0 in the CPU demo:
    its lines are not catalog titles) runs with `--models smollm2`."""
    found = [str(Path(runs_dir) / name) for name in RUNS
             if (Path(runs_dir) / name / "config.json").is_file()]
    return ["popularity", *found]


# --- Scoring given texts (pure: no model, no files) -----------------------------------------------

def score_rows(rows: list[dict], texts: list[str], catalog: common.Catalog, n: int,
               ks: list[int]) -> tuple[list[dict], list[dict]]:
    """Score every row against its own ground truth with its conversation's completion texts[i].

    Returns (scores, samples): scores[i] is common.score_completion's dict for row i plus
    `list_length` (lines that parse as Title (Year)); samples[i] is what samples.jsonl keeps of it.
    """
    scores, samples = [], []
    for row, text in zip(rows, texts):
        key = common.prompt_key(row["prompt"])
        items = common.parse_completion(text)
        s = common.score_completion(text, row, catalog, n, ks)
        s["list_length"] = sum(item is not None for item in items)
        judged = common.judge_lines(items, common.row_groundtruth(row), row["seen_titles"], catalog)
        scores.append(s)
        samples.append({"id": row["id"], "prompt_key": key, "text": text,
                        "items": [list(item) if item else None for item in items], **judged,
                        "hits_filtered": s["hits_filtered"], "hits_aligned": s["hits_aligned"],
                        "groundtruth": row["groundtruth_with_release_year"],
                        "seen_titles": row["seen_titles"]})
    return scores, samples


def per_rank(scores: list[dict], n: int) -> list[dict]:
    """Hit rate at each rank position 1..N under both protocols, over all rows.

    filled_<protocol>: rows that have an item at that rank (aligned: a line of text; filtered: an
    unseen in-catalog item after filtering); hits_<protocol>: rows whose item there is relevant.
    """
    table = []
    for k in range(n):
        rec: dict[str, float] = {"rank": k + 1, "rows": len(scores)}
        for proto in ("filtered", "aligned"):
            hits = [s[f"hits_{proto}"] for s in scores]
            rec[f"filled_{proto}"] = sum(len(h) > k for h in hits)
            rec[f"hits_{proto}"] = sum(h[k] for h in hits if len(h) > k)
            rec[f"hit_rate_{proto}"] = rec[f"hits_{proto}"] / max(1, len(scores))
        table.append(rec)
    return table


def csv_text(records: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


def no_nan(metrics: dict) -> dict:
    """NaN (the SE of a single conversation) as null, so metrics.json is standard JSON."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}


def pm(metrics: dict, key: str) -> str:
    """'mean ± SE' of one metric."""
    se = metrics.get(key + "_se")
    return f"{metrics[key]:.4f} ± {se:.4f}" if se is not None else f"{metrics[key]:.4f} ± n/a"


def results_table(m: dict) -> str:
    """The printed summary of one evaluation."""
    ks = m["ks"]
    lines = [f"{m['model']} | {m['split']} | {m['conversations']} conversations, {m['rows']} rows, "
             f"N={m['n']} | {m['seconds']:.1f} s",
             f"{'':19s}" + "".join(f"{'@' + str(k):>19s}" for k in ks)]
    for proto in ("filtered", "aligned"):
        for metric in ("recall", "ndcg"):
            lines.append(f"{proto:9s} {metric:9s}"
                         + "".join(f"{pm(m, f'{metric}@{k}_{proto}'):>19s}" for k in ks))
    lines.append(f"in-catalog {m['in_catalog_rate']:.3f} | valid format {m['valid_rate']:.3f} | "
                 f"duplicates {m['duplicate_rate']:.3f} | list length {m['list_length']:.2f} | "
                 f"exact-N {m['exact_n']:.3f} | completion tokens {m['completion_tokens']:.1f}")
    return "\n".join(lines)


# --- One evaluation: generate, score, write -------------------------------------------------------

def evaluate(name: str, path: str, rows: list[dict], catalog: common.Catalog, n: int,
             cfg: Config) -> dict:
    """Evaluate one model on `rows`; write <out>/<name>/ and return its metrics."""
    start = time.time()
    _, _, device = common.setup_distributed(cfg.cpu)
    max_new = cfg.max_new_tokens or 16 * n + 16
    if path == "popularity":  # no model: the most frequent training items, minus the seen ones
        print(f"\n=== {name}: the most frequent ground-truth items of train, minus what was seen")
        texts = [common.format_items(items) for items in common.popularity_lists(rows, catalog, n)]
        gen_seconds, tokens = 0.0, [0]
    else:
        dtype = common.inference_dtype(device, cfg.bf16)
        print(f"\n=== {name}: loading {path} on {device} ({dtype})")
        try:
            model, tok = common.load_model(path, dtype, device, cfg.trust_remote_code)
        except OSError as e:
            raise common.DataError(f"{path}: cannot load a model "
                                   f"({str(e).splitlines()[0][:160]})") from None
        # 1. one greedy generation per unique prompt
        gen_start = time.time()
        texts = common.generate(model, tok, [r["prompt"] for r in rows], max_new,
                                batch_size=cfg.batch_size, max_prompt_tokens=cfg.max_prompt_tokens,
                                progress=f"generating ({name})")
        gen_seconds = time.time() - gen_start
        per_prompt = dict(zip((common.prompt_key(r["prompt"]) for r in rows), texts))
        tokens = [len(tok.encode(t, add_special_tokens=False)) for t in per_prompt.values()]

    # 2. every row scored against its own ground truth; means and SEs clustered by conversation
    ks = common.cutoffs(n)
    scores, samples = score_rows(rows, texts, catalog, n, ks)
    metrics = no_nan({"model": name, "path": path, "split": cfg.split,
                      "data_dir": str(Path(cfg.data_dir).resolve()), "n": n, "ks": ks,
                      "generations": len({common.prompt_key(r["prompt"]) for r in rows}),
                      **common.summarize(scores, rows),
                      "completion_tokens": sum(tokens) / len(tokens), "max_new_tokens": max_new,
                      "generation_seconds": gen_seconds, "seconds": time.time() - start,
                      "device": str(device), "config": asdict(cfg)})

    # 3. write; metrics.json last, so its presence means the evaluation is complete
    out = Path(cfg.out) / name
    common.write_jsonl(out / "samples.jsonl", samples)
    common.write_text(out / "per_rank.csv", csv_text(per_rank(scores, n)))
    common.write_json(out / "metrics.json", metrics)
    print(common.render_list(texts[0], rows[0], catalog, n))
    print(results_table(metrics))
    print(f"wrote {out}/metrics.json, {out}/per_rank.csv, {out}/samples.jsonl")
    return metrics


# --- Comparing evaluations: a Markdown table and plots --------------------------------------------

def load_evaluation(eval_dir: str | Path) -> tuple[dict, list[dict], list[dict]]:
    """(metrics, per-rank rows, per-row samples) of one evaluation directory."""
    d = Path(eval_dir)
    hint = "run 05_eval.py --models ... first"
    metrics = common.read_json(common.require(d / "metrics.json", hint))
    with open(common.require(d / "per_rank.csv", hint), newline="", encoding="utf-8") as f:
        ranks = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return metrics, ranks, common.read_jsonl(common.require(d / "samples.jsonl", hint))


def compare_table(evals: list[dict]) -> str:
    """One Markdown table, filtered protocol (the paper's), mean ± SE clustered by conversation."""
    ks = sorted({k for m in evals for k in m["ks"]})
    head = (["model", "split", "rows"] + [f"R@{k}" for k in ks] + [f"N@{k}" for k in ks]
            + ["in-catalog", "valid format"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in evals:
        cells = [m["model"], m["split"], str(m["rows"])]
        for metric in ("recall", "ndcg"):
            cells += [pm(m, f"{metric}@{k}_filtered") if f"{metric}@{k}_filtered" in m else "–"
                      for k in ks]
        cells += [f"{m['in_catalog_rate']:.3f}", f"{m['valid_rate']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("Filtered protocol (the paper's): seen and out-of-catalog items removed before "
            "scoring. Mean ± standard error clustered by conversation; the strict aligned "
            "protocol is in each metrics.json.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def paired_table(evals: list[dict], samples: list[list[dict]]) -> str:
    """Every model minus every earlier one, row by row on the rows both scored (filtered protocol):
    the mean difference and its standard error clustered by conversation. Pairing removes the
    spread between conversations, so it tells apart models that the per-model SEs cannot."""
    ks = sorted({k for m in evals for k in m["ks"]})
    per_row = []  # per model: row id -> {metric@k: value}
    for rows in samples:
        per_row.append({s["id"]: {f"{name}@{k}": fn(s["hits_filtered"], len(s["groundtruth"]), k)
                                  for k in ks for name, fn in (("R", common.recall_at_k),
                                                               ("N", common.ndcg_at_k))}
                        for s in rows if s["groundtruth"]})
    head = ["difference", "rows"] + [f"R@{k}" for k in ks] + [f"N@{k}" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j in range(1, len(evals)):
        for i in range(j):
            ids = [r for r in per_row[j] if r in per_row[i]]
            if not ids:
                continue
            groups = [common.conversation_id({"id": r}) for r in ids]
            cells = [f"{evals[j]['model']} − {evals[i]['model']}", str(len(ids))]
            for key in [f"R@{k}" for k in ks] + [f"N@{k}" for k in ks]:
                mean, se = common.mean_and_se([per_row[j][r][key] - per_row[i][r][key]
                                               for r in ids], groups)
                cells.append(f"{mean:+.4f} ± {se:.4f} ({mean / se:+.1f} SE)" if se > 0
                             else f"{mean:+.4f}")
            lines.append("| " + " | ".join(cells) + " |")
    return ("\n".join(lines) + "\n\nPaired differences on the rows both models scored (filtered "
            "protocol), standard error clustered by conversation.\n")


def save_png(fig, path: Path) -> None:
    with common.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_metrics_vs_k(evals: list[dict], path: Path) -> None:
    """NDCG@k and Recall@k against k, one line per model, error bars = 1 SE."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in zip(axes, ("ndcg", "recall"), ("NDCG@k", "Recall@k")):
        for m in evals:
            keys = [f"{metric}@{k}_filtered" for k in m["ks"]]
            ax.errorbar(m["ks"], [m[key] for key in keys],
                        yerr=[m.get(key + "_se") or 0 for key in keys],
                        marker="o", capsize=3, label=m["model"])
        ax.set(title=f"{label} (filtered protocol)", xlabel="k",
               xticks=sorted({k for m in evals for k in m["ks"]}))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend()
    save_png(fig, path)
    plt.close(fig)


def plot_per_rank(evals: list[dict], ranks: list[list[dict]], path: Path) -> None:
    """Hit rate at each rank position, one colour per model (solid: filtered, dashed: aligned)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    for m, table in zip(evals, ranks):
        x = [int(r["rank"]) for r in table]
        line, = ax.plot(x, [r["hit_rate_filtered"] for r in table], marker="o", label=m["model"])
        ax.plot(x, [r["hit_rate_aligned"] for r in table], ls="--", color=line.get_color(),
                alpha=0.6)
    ax.set(title="hit rate per rank position (solid: filtered, dashed: aligned)", xlabel="rank",
           ylabel="fraction of rows with a hit")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, path)
    plt.close(fig)


# Panels of a training plot: title, and the log keys drawn in it (a regex whose group names the
# line).
PANELS = [
    ("training reward per rank (04)", re.compile(r"^reward@(\w+)$")),
    ("KL to the reference (04)", re.compile(r"^(kl)$")),
    ("items per sampled list (04)", re.compile(r"^(items)$")),
    ("lists of exactly N lines (04: sampled; val: greedy)", re.compile(r"^(exact_n|val_exact_n)$")),
    ("loss (03)", re.compile(r"^(loss|val_loss)$")),
    ("validation NDCG (greedy)", re.compile(r"^val_ndcg@(\w+)$")),
]
STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]  # coinciding curves stay apart


def training_series(log: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """{panel title: {line name: (steps, values)}} from log.jsonl records; records without a step,
    and values that are not finite numbers, are skipped."""
    series: dict[str, dict[str, tuple[list, list]]] = {title: {} for title, _ in PANELS}
    for rec in log:
        if not isinstance(rec.get("step"), (int, float)):
            continue
        for key, value in rec.items():
            for title, pattern in PANELS:
                m = pattern.match(key)
                if m and isinstance(value, (int, float)) and math.isfinite(value):
                    steps, values = series[title].setdefault(m.group(1), ([], []))
                    steps.append(rec["step"])
                    values.append(value)
    return series


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: per-step rewards are noisy, the trend is what the eye looks for."""
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def plot_training(name: str, log: list[dict], path: Path) -> bool:
    """One panel per group of curves the log has (RL: per-rank reward, KL, list length, exact-N;
    SFT: training and validation loss; both: validation NDCG). Noisy per-step curves are drawn
    faint with a moving average over them. False (nothing drawn) when the log has none."""
    import matplotlib.pyplot as plt
    series = training_series(log)
    panels = [title for title, _ in PANELS if series[title]]
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols + 1, 3.8 * rows), squeeze=False)
    for ax, title in zip(axes.flat, panels):
        # numeric line names in numeric order (ranks 1, 5, 10, 20), the others after them
        names = sorted(series[title],
                       key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
        for i, k in enumerate(names):
            steps, values = series[title][k]
            ls, marker = STYLES[i % len(STYLES)]
            label = (f"rank {k}" if k.isdigit() and "reward" in title
                     else f"NDCG@{k}" if k.isdigit() else k)
            if len(values) > 20 and not k.startswith("val"):
                line, = ax.plot(steps, smooth(values, max(2, len(values) // 15)), ls=ls,
                                label=label)
                ax.plot(steps, values, color=line.get_color(), alpha=0.2)
            else:
                ax.plot(steps, values, ls=ls, marker=marker, markersize=4, label=label, alpha=0.85)
        ax.set(title=f"{name}: {title}", xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return True


def compare(eval_dirs: list[str], out: Path) -> None:
    """compare.md and the plots for several evaluation directories."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    loaded = [load_evaluation(d) for d in eval_dirs]
    evals, ranks, samples = map(list, zip(*loaded))
    if len({(m["split"], m["n"], m["rows"], m.get("data_dir")) for m in evals}) > 1:
        print("warning: these evaluations are not on the same rows (split, N, rows or data differ)")
    table = compare_table(evals) + "\n" + paired_table(evals, samples)
    common.write_text(out / "compare.md", table)
    print("\n" + table)
    plot_metrics_vs_k(evals, out / "metrics_vs_k.png")
    plot_per_rank(evals, ranks, out / "hit_rate_per_rank.png")
    written = ["compare.md", "metrics_vs_k.png", "hit_rate_per_rank.png"]
    for m in evals:
        log_path = Path(m["path"]) / "log.jsonl"
        if not log_path.is_file():
            continue
        if plot_training(m["model"], common.read_jsonl(log_path, skip_torn_tail=True),
                         out / f"training_{m['model']}.png"):
            written.append(f"training_{m['model']}.png")
        else:
            print(f"{log_path}: no curves to draw, no training plot")
    print(f"wrote {', '.join(f'{out}/{w}' for w in written)}")


# --- The command line -----------------------------------------------------------------------------

def main(argv=None) -> None:
    cfg = common.parse_config(Config, argv, __doc__.split("\n")[0])
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise common.DataError(f"{out}: exists and is not a directory; choose another --out")
    if cfg.compare:
        compare(cfg.compare, out)
        return

    # 1. which models, checked before anything is loaded
    specs = cfg.models or default_models(cfg.runs_dir)
    models = [resolve_model(s) for s in specs]
    names = [name for name, _ in models]
    if len(set(names)) < len(names):
        raise common.DataError(f"two models would share an output directory: {names}")

    # 2. the rows: the first --limit conversations of the split
    data = Path(cfg.data_dir)
    catalog = common.Catalog.load(data / "catalog.jsonl")
    rows = common.first_conversations(common.read_rows(data / f"{cfg.split}.jsonl",
                                                       "run 01_catalog.py first"), cfg.limit)
    n = common.data_n(cfg.data_dir, cfg.n_items)
    print(f"read {data}/{cfg.split}.jsonl: {len(rows)} rows, "
          f"{len({common.prompt_key(r['prompt']) for r in rows})} unique prompts, "
          f"N={n}; catalog {len(catalog)} items; models: {', '.join(names)}")

    # 3. evaluate each model, then compare them when there are several
    for name, path in models:
        evaluate(name, path, rows, catalog, n, cfg)
    if len(models) > 1:
        compare([str(out / name) for name in names], out)


if __name__ == "__main__":
    common.run(main)
