"""End to end: the five scripts in order, with their default paths, on the tiny model and a small
demo world; each stage must find what the previous one wrote."""

import json
import os
import subprocess
import sys

from conftest import ROOT, TINY

import common

STAGES = [
    ["01_catalog.py", "--conversations", "40", "--n-items", "4"],
    ["02_build_sft.py", "--teacher-model", TINY, "--limit", "4", "--val-limit", "2",
     "--n-reflect", "4", "--item-tokens", "4"],
    ["03_sft.py", "--model", TINY, "--steps", "3", "--batch-size", "4", "--eval-every", "3",
     "--eval-gen", "2", "--lr", "1e-3"],
    ["04_rank_grpo.py", "--steps", "2", "--prompts-per-step", "2", "--group-size", "2",
     "--max-new-tokens", "24", "--val-limit", "2", "--val-every", "2", "--lr", "1e-3"],
    ["05_eval.py", "--models", TINY, "runs/sft", "runs/rank_grpo", "--limit", "3",
     "--max-new-tokens", "24"],
]


def test_the_five_stages_in_order(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CONVREC_CACHE=str(tmp_path / "cache"))
    for args in STAGES:
        res = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{args[0]} failed:\n{res.stderr[-3000:]}"
    data, runs = tmp_path / "data", tmp_path / "runs"
    for f in ("catalog.jsonl", "train.jsonl", "val.jsonl", "test.jsonl", "sft_train.jsonl",
              "sft_val.jsonl", "teacher_cache.jsonl", "sft_report.json"):
        assert (data / f).is_file(), f
    for run in ("sft", "rank_grpo"):
        assert (runs / run / "model.safetensors").is_file() and (runs / run / "log.jsonl").is_file()
        assert common.read_json(runs / run / "run_config.json")
    assert common.read_json(runs / "rank_grpo" / "run_config.json")["model"] == "runs/sft"
    metrics = {m: json.loads((runs / "eval" / m / "metrics.json").read_text())
               for m in ("tiny", "sft", "rank_grpo")}
    # the same rows for every model
    assert {m["rows"] for m in metrics.values()} == {metrics["tiny"]["rows"]}
    for f in ("compare.md", "metrics_vs_k.png", "hit_rate_per_rank.png", "training_rank_grpo.png"):
        assert (runs / "eval" / f).is_file(), f


def test_a_stage_run_too_early_says_which_stage_to_run(tmp_path):
    for script, needs in (("02_build_sft.py", "01_catalog.py"), ("03_sft.py", "02_build_sft.py"),
                          ("04_rank_grpo.py", "01_catalog.py"), ("05_eval.py", "01_catalog.py")):
        res = subprocess.run([sys.executable, str(ROOT / script)], cwd=tmp_path,
                             capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert (res.returncode == 2
                and f"run {needs} first" in res.stderr), (script, res.stderr[-500:])
        assert len(res.stderr.strip().split("\n")) == 1, res.stderr
