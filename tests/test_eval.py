"""05_eval.py: metrics of given texts, one generation per prompt, outputs, plots, --compare."""

import csv
import json
import math
import shutil

import pytest

import common
from conftest import stage, TINY

ev = stage("05_eval")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- scoring given texts, by hand ----------------------------------------------------------------

CATALOG = common.Catalog([{"title": t, "year": y} for t, y in [
    ("Alpha", 2000), ("Bravo", 2001), ("Charlie", 2002), ("Delta", 2003), ("Echo", 2004),
    ("Foxtrot", 2005), ("Golf", 2006)]])


def make_row(row_id, conversation, gt, seen=()):
    return {"id": row_id, "prompt": common.task_prompt(conversation, 5), "seen_titles": list(seen),
            "groundtruth_with_release_year": [[t, str(y)] for t, y in gt]}


# Conversation c1 has two rows (two repliers, one prompt); c2 has one.
ROWS = [make_row("c1#0", "conversation one", [("Bravo", 2001), ("Delta", 2003)], seen=["Alpha"]),
        make_row("c1#1", "conversation one", [("Echo", 2004)], seen=["Alpha"]),
        make_row("c2#0", "conversation two", [("Charlie", 2002)])]
KEY1, KEY2 = common.prompt_key(ROWS[0]["prompt"]), common.prompt_key(ROWS[2]["prompt"])
TEXTS = {
    # seen, hit, not an item, out of catalog, miss, hit at line 6 (aligned protocol: past N = 5)
    KEY1: "Alpha (2000)\nBravo (2001)\nnot a movie\nZulu (1999)\nGolf (2006)\nDelta (2003)",
    # hit, a repeat of it, miss
    KEY2: "Charlie (2002)\nCharlie (2002)\nFoxtrot (2005)",
}
ROW_TEXTS = [TEXTS[common.prompt_key(r["prompt"])] for r in ROWS]
IDCG2 = 1 + 1 / math.log2(3)  # two ground-truth items


def test_cutoffs_are_the_papers_ks_capped_at_n():
    assert common.cutoffs(20) == [5, 10, 15, 20]
    assert common.cutoffs(10) == [5, 10]
    assert common.cutoffs(12) == [5, 10, 12]
    assert common.cutoffs(3) == [3]


def test_per_row_metrics_both_protocols_by_hand():
    scores, samples = ev.score_rows(ROWS, ROW_TEXTS, CATALOG, n=5, ks=[5])
    r1, r2, r3 = scores
    # row 1, filtered: Alpha (seen), the invalid line and Zulu are removed -> Bravo, Golf, Delta
    assert r1["hits_filtered"] == [1, 0, 1]
    assert r1["recall@5_filtered"] == pytest.approx(1.0)
    assert r1["ndcg@5_filtered"] == pytest.approx((1 + 1 / 2) / IDCG2)
    # row 1, aligned: Bravo at line 2 counts; Delta at line 6 is past N
    assert r1["hits_aligned"] == [0, 1, 0, 0, 0]
    assert r1["recall@5_aligned"] == pytest.approx(0.5)
    assert r1["ndcg@5_aligned"] == pytest.approx((1 / math.log2(3)) / IDCG2)
    # row 2 shares row 1's text but not its ground truth
    assert (r2["hits_filtered"] == [0, 0, 0] and r2["recall@5_filtered"] == 0
            and r2["ndcg@5_aligned"] == 0)
    # row 3: the repeat scores 0 in both protocols
    assert r3["hits_filtered"] == [1, 0, 0] and r3["hits_aligned"] == [1, 0, 0]
    assert r3["ndcg@5_filtered"] == pytest.approx(1.0)
    assert [s["list_length"] for s in scores] == [5, 5, 3]
    # samples keep the per-line judgement of every line, including the one past N
    assert samples[0]["rel"] == [0, 1, 0, 0, 0, 1]
    assert samples[0]["valid"] == [1, 1, 0, 1, 1, 1]
    assert samples[0]["seen"] == [1, 0, 0, 0, 0, 0]
    assert samples[0]["in_catalog"] == [1, 1, 0, 0, 1, 1]
    assert samples[2]["duplicate"] == [0, 1, 0]
    assert samples[0]["items"][2] is None and samples[0]["items"][1] == ["Bravo", 2001]
    assert samples[1]["text"] == TEXTS[KEY1] and samples[1]["prompt_key"] == KEY1


def test_means_and_clustered_ses_by_hand():
    scores, _ = ev.score_rows(ROWS, ROW_TEXTS, CATALOG, n=5, ks=[5])
    m = common.summarize(scores, ROWS)
    assert m["rows"] == 3 and m["conversations"] == 2
    assert m["recall@5_filtered"] == pytest.approx(2 / 3)
    assert m["recall@5_aligned"] == pytest.approx(0.5)
    assert m["ndcg@5_filtered"] == pytest.approx((1.5 / IDCG2 + 0 + 1) / 3)
    assert m["ndcg@5_aligned"] == pytest.approx(((1 / math.log2(3)) / IDCG2 + 0 + 1) / 3)
    # SE over the per-conversation means: filtered recall [0.5, 1], aligned recall [0.25, 1]
    assert m["recall@5_filtered_se"] == pytest.approx(0.25)
    assert m["recall@5_aligned_se"] == pytest.approx(0.375)
    assert m["in_catalog_rate"] == pytest.approx(7 / 9)
    assert m["valid_rate"] == pytest.approx(8 / 9)
    assert m["duplicate_rate"] == pytest.approx(1 / 9)
    assert m["list_length"] == pytest.approx(13 / 3)
    assert m["exact_n"] == 0


def test_hit_rate_per_rank_by_hand():
    scores, _ = ev.score_rows(ROWS, ROW_TEXTS, CATALOG, n=5, ks=[5])
    table = ev.per_rank(scores, 5)
    assert [r["rank"] for r in table] == [1, 2, 3, 4, 5] and all(r["rows"] == 3 for r in table)
    assert [r["hits_filtered"] for r in table] == [2, 0, 1, 0, 0]
    assert [r["filled_filtered"] for r in table] == [3, 3, 3, 0, 0]
    assert [r["hits_aligned"] for r in table] == [1, 1, 0, 0, 0]
    assert [r["filled_aligned"] for r in table] == [3, 3, 3, 2, 2]
    assert table[0]["hit_rate_filtered"] == pytest.approx(2 / 3)


def test_compare_table_shows_mean_and_se():
    scores, _ = ev.score_rows(ROWS, ROW_TEXTS, CATALOG, n=5, ks=[5])
    m = {"model": "hand", "split": "test", "ks": [5], **common.summarize(scores, ROWS)}
    table = ev.compare_table([m])
    assert "| model | split | rows | R@5 | N@5 | in-catalog | valid format |" in table
    assert "| hand | test | 3 | 0.6667 ± 0.2500 |" in table
    assert "| 0.778 | 0.889 |" in table


def test_paired_differences_by_hand():
    def sample(rid, hits, n_gt=1):
        return {"id": rid, "hits_filtered": hits, "groundtruth": [["x", "2000"]] * n_gt}
    a = [sample("c1#0", [0, 0]), sample("c1#1", [0, 0]), sample("c2#0", [0, 0]),
         sample("c3#0", [1, 0])]
    b = [sample("c1#0", [1, 0]), sample("c1#1", [0, 1]), sample("c2#0", [0, 0]),
         sample("c3#0", [1, 0]), sample("c9#0", [1, 1])]  # c9 only in b: not paired
    evals = [{"model": "a", "ks": [2]}, {"model": "b", "ks": [2]}]
    table = ev.paired_table(evals, [a, b])
    # R@2 differences per row: 1, 1, 0, 0 -> per conversation c1: 1, c2: 0, c3: 0; mean over rows
    # 0.5, SE from the conversation means (1, 0, 0): std 0.5774 / sqrt(3) = 0.3333
    assert "| b − a | 4 | +0.5000 ± 0.3333 (+1.5 SE) |" in table
    # N@2: rank 1 hit = 1, rank 2 hit = 1/log2(3) = 0.6309 -> rows 1, 0.6309, 0, 0; mean 0.4077;
    # conversation means (0.8155, 0, 0): std 0.4708 / sqrt(3) = 0.2718
    assert "+0.4077 ± 0.2718 (+1.5 SE) |" in table


def test_first_conversations_keeps_whole_conversations_in_file_order():
    rows = ROWS + [make_row("c3#0", "three", [("Golf", 2006)])]
    assert [r["id"] for r in common.first_conversations(rows, 1)] == ["c1#0", "c1#1"]
    assert [r["id"] for r in common.first_conversations(rows, 2)] == ["c1#0", "c1#1", "c2#0"]
    assert common.first_conversations(rows, 0) == rows


# --- models: names, run directories, errors -------------------------------------------------------

def test_default_models_are_popularity_and_the_finished_runs(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "config.json").write_text("{}")
    (tmp_path / "grpo").mkdir()  # a run without a saved model yet
    assert ev.default_models(str(tmp_path)) == ["popularity", str(tmp_path / "sft")]


def test_resolve_model_names():
    assert ev.resolve_model("smollm2") == ("smollm2", "smollm2")
    assert ev.resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen2.5-0.5B-Instruct",
                                                             "Qwen/Qwen2.5-0.5B-Instruct")


@pytest.mark.parametrize("make_dir", [False, True])
def test_missing_model_dir_is_one_line_and_exit_2(tmp_path, demo_data, capsys, make_dir):
    run_dir = tmp_path / "runs" / "sft"
    if make_dir:  # a run directory that holds logs but no saved model
        run_dir.mkdir(parents=True)
        (run_dir / "log.jsonl").write_text('{"step": 1}\n')
    argv = ["--models", TINY, str(run_dir), "--data-dir", str(demo_data),
            "--out", str(tmp_path / "eval")]
    with pytest.raises(SystemExit) as e:
        common.run(lambda: ev.main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "run 03_sft.py first" in err
    assert not (tmp_path / "eval").exists()  # checked before the first model ran


# --- training curves ------------------------------------------------------------------------------

def test_training_series_picks_the_keys_and_skips_the_rest():
    log = [{"step": 1, "reward@1": 0.1, "reward@10": 0.0, "loss": 3.0},
           {"step": 2, "reward@1": 0.3, "reward@10": float("nan"), "val_ndcg@5": 0.2},
           {"time": 5.0, "reward@1": 9.9}]  # no step: not a step record
    s = ev.training_series(log)
    assert s["training reward per rank (04)"] == {"1": ([1, 2], [0.1, 0.3]), "10": ([1], [0.0])}
    assert s["validation NDCG (greedy)"] == {"5": ([2], [0.2])}
    assert s["loss (03)"] == {"loss": ([1], [3.0])}
    assert ev.smooth([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]


def test_plot_training_skips_a_log_without_curves(tmp_path):
    assert ev.plot_training("x", [{"step": 1, "lr": 2.0, "grad_norm": 1.0}],
                            tmp_path / "t.png") is False
    assert not (tmp_path / "t.png").exists()


# --- smoke: main() on the tiny model and a small demo world ---------------------------------------

def assert_png(path):
    import matplotlib.image
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000
    pixels = matplotlib.image.imread(str(path))
    # not a blank image
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and pixels.std() > 0.01


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, demo_data):
    """tiny (a name) and runs/sft (a saved tiny with a training log) evaluated on 3 test
    conversations, counting the prompts that reach common.generate."""
    tmp = tmp_path_factory.mktemp("eval05")
    model, tok = common.load_model(TINY)
    run = tmp / "runs" / "sft"
    common.save_model(model, tok, run)
    common.write_jsonl(run / "log.jsonl", [
        {"step": s, "loss": 1.0 / s, "reward@1": 0.1 * s, "reward@5": 0.05 * s,
         "reward@10": 0.02 * s, **({"val_ndcg@5": 0.01 * s} if s % 3 == 0 else {})}
        for s in range(1, 13)])
    out = tmp / "eval"
    generated = []
    real = common.generate
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "generate",
                   lambda m, t, prompts, *a, **kw: generated.append(
                       len({common.prompt_key(p) for p in prompts})) or real(m, t, prompts, *a, **kw))
        ev.main(["--models", TINY, str(run), "--data-dir", str(demo_data), "--out", str(out),
                 "--limit", "3", "--max-new-tokens", "4"])
    return tmp, out, generated


EXPECTED_KEYS = {"model", "path", "split", "data_dir", "n", "ks", "rows", "conversations",
                 "generations", "in_catalog_rate", "valid_rate", "duplicate_rate", "list_length",
                 "exact_n", "n_lines", "completion_tokens", "max_new_tokens", "seconds",
                 "generation_seconds", "device", "config"}


def test_smoke_outputs_are_complete(evaluated, demo_data):
    _, out, generated = evaluated
    rows = common.first_conversations(common.read_rows(demo_data / "test.jsonl", ""), 3)
    n_prompts = len({common.prompt_key(r["prompt"]) for r in rows})
    assert n_prompts == 3 and len(rows) > n_prompts  # the demo has several rows per conversation
    assert generated == [n_prompts, n_prompts]  # one call per model, one generation per prompt
    for name in ("tiny", "sft"):
        m = json.loads((out / name / "metrics.json").read_text())
        missing = EXPECTED_KEYS - set(m)
        for k in m["ks"]:
            for metric in ("recall", "ndcg"):
                for proto in ("filtered", "aligned"):
                    missing |= {f"{metric}@{k}_{proto}", f"{metric}@{k}_{proto}_se"} - set(m)
        assert not missing, missing
        assert m["model"] == name and m["n"] == 5 and m["ks"] == [5] and m["split"] == "test"
        assert m["rows"] == len(rows) and m["conversations"] == 3 and m["generations"] == 3
        assert m["config"]["limit"] == 3 and m["max_new_tokens"] == 4
        with open(out / name / "per_rank.csv", newline="") as f:
            table = list(csv.DictReader(f))
        assert [int(r["rank"]) for r in table] == [1, 2, 3, 4, 5]
        assert ({"hit_rate_filtered", "hit_rate_aligned", "hits_filtered", "hits_aligned"}
                <= set(table[0]))
        samples = common.read_jsonl(out / name / "samples.jsonl")
        assert [s["id"] for s in samples] == [r["id"] for r in rows]
        by_key = {}
        for s in samples:  # rows of one conversation carry the same generation
            assert by_key.setdefault(s["prompt_key"], s["text"]) == s["text"]
            assert len(s["rel"]) == len(s["items"]) == len(common.split_lines(s["text"]))
    assert (json.loads((out / "sft" / "metrics.json").read_text())["path"]
            == str(evaluated[0] / "runs" / "sft"))


def test_smoke_compares_two_models_with_plots(evaluated):
    _, out, _ = evaluated
    table = (out / "compare.md").read_text()
    assert "| tiny | test |" in table and "| sft | test |" in table
    assert "| sft − tiny |" in table  # the paired differences
    for png in ("metrics_vs_k.png", "hit_rate_per_rank.png", "training_sft.png"):
        assert_png(out / png)
    assert not (out / "training_tiny.png").exists()  # 'tiny' is a name, not a run with a log


def test_compare_dirs_and_a_log_without_curves(evaluated, capsys):
    tmp, out, _ = evaluated
    # a third evaluation whose run's log has none of the plotted keys
    other_run = tmp / "runs" / "other"
    other_run.mkdir()
    (other_run / "log.jsonl").write_text('{"step": 1, "lr": 2.0}\n')
    shutil.copytree(out / "tiny", tmp / "other")
    m = json.loads((tmp / "other" / "metrics.json").read_text())
    (tmp / "other" / "metrics.json").write_text(json.dumps({**m, "model": "other",
                                                            "path": str(other_run)}))
    cmp_out = tmp / "cmp"
    ev.main(["--compare", str(out / "tiny"), str(out / "sft"), str(tmp / "other"),
             "--out", str(cmp_out)])
    table = (cmp_out / "compare.md").read_text()
    assert table.count("| test |") == 3 and "| other | test |" in table
    printed = capsys.readouterr().out
    assert "| other | test |" in printed and "no curves to draw" in printed
    for png in ("metrics_vs_k.png", "hit_rate_per_rank.png", "training_sft.png"):
        assert_png(cmp_out / png)
    assert not (cmp_out / "training_other.png").exists()


def test_compare_a_dir_without_metrics_is_a_data_error(tmp_path):
    with pytest.raises(common.DataError, match="metrics.json not found"):
        ev.main(["--compare", str(tmp_path), "--out", str(tmp_path / "cmp")])
