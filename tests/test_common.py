"""common.py: parser, matcher, relevance, metrics, files, models."""

import json
import math

import pytest
import torch

import common
from common import Catalog, parse_line


# --- parser ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, expected", [
    ("Heat (1995)", ("Heat", 1995)),
    ("1. Heat (1995)", ("Heat", 1995)),
    ("12) Heat (1995)", ("Heat", 1995)),
    ("- Heat (1995)", ("Heat", 1995)),
    ("* Heat (1995)", ("Heat", 1995)),
    ("\u2022 Heat (1995)", ("Heat", 1995)),
    ("### Heat (1995)", ("Heat", 1995)),
    ("**Heat** (1995)", ("Heat", 1995)),
    ("*Heat (1995)*", ("Heat", 1995)),
    ("__Heat__ (1995)", ("Heat", 1995)),
    ('"Heat" (1995)', ("Heat", 1995)),
    ("\u201cHeat\u201d (1995)", ("Heat", 1995)),
    ("Heat (1995)   ", ("Heat", 1995)),
    ("Heat (1995)\r", ("Heat", 1995)),
    ("Heat(1995)", ("Heat", 1995)),
    ("The  Big   Lebowski (1998)", ("The Big Lebowski", 1998)),
    ("Birdman or (The Unexpected Virtue of Ignorance) (2014)",
     ("Birdman or (The Unexpected Virtue of Ignorance)", 2014)),
    ("(500) Days of Summer (2009)", ("(500) Days of Summer", 2009)),
    ("12 Angry Men (1957)", ("12 Angry Men", 1957)),
    ("1917 (2019)", ("1917", 2019)),
    ("2001: A Space Odyssey (1968)", ("2001: A Space Odyssey", 1968)),
    ("10. 10 Things I Hate About You (1999)", ("10 Things I Hate About You", 1999)),
    ("M*A*S*H (1970)", ("M*A*S*H", 1970)),
])
def test_parse_line_accepts(line, expected):
    assert parse_line(line) == expected


@pytest.mark.parametrize("line", [
    "", "   ", "Heat", "Heat 1995", "Heat (95)", "Heat (995)", "Heat (19955)", "(1995)", "1. (1995)",
    "Heat (1995) is great", "Sure! Here are 20 movies:",
])
def test_parse_line_rejects(line):
    assert parse_line(line) is None


def test_parse_completion_one_entry_per_line_crlf_and_empty_lines():
    text = "Heat (1995)\r\n\nAlien (1979)\nnot a movie\n"
    assert common.parse_completion(text) == [("Heat", 1995), None, ("Alien", 1979), None, None]


def test_format_items_round_trips_and_has_no_trailing_newline():
    items = [("Heat", 1995), ("Birdman or (The Unexpected Virtue of Ignorance)", 2014)]
    text = common.format_items(items)
    assert not text.endswith("\n")
    assert common.parse_completion(text) == items


def test_task_prompt_asks_for_n_items():
    msgs = common.task_prompt("I love westerns.", 7)
    assert msgs[0]["role"] == "user" and "exactly 7 movies" in msgs[0]["content"]
    assert "I love westerns." in msgs[0]["content"]


# --- catalog and relevance ------------------------------------------------------------------------

CAT = Catalog([{"title": "Heat", "year": 1995}, {"title": "Alien", "year": 1979},
               {"title": "Dune", "year": 1984}, {"title": "Dune", "year": 2021},
               {"title": "Birdman or (The Unexpected Virtue of Ignorance)", "year": 2014},
               {"title": "Ronin", "year": 1998}, {"title": "Schindler's List", "year": 1993}])


def test_catalog_find_case_whitespace_year_tolerance():
    assert CAT.find("heat", 1995) == 0
    assert CAT.find("  HEAT ", 1997) == 0
    assert CAT.find("Heat", 1998) is None
    assert CAT.find("Dune", 1985) == 2 and CAT.find("Dune", 2020) == 3
    assert CAT.find("Birdman or", 2014) == 4
    assert CAT.find("Schindler\u2019s List", 1993) == 6
    assert CAT.find("Heat 2", 1995) is None


def judge(text, gt, seen=()):
    return common.judge_lines(common.parse_completion(text), gt, seen, CAT)


def test_relevance_hand_computed():
    text = "Heat (1995)\nAlien (1980)\nTitanic (1997)\nnonsense\nRonin (1998)"
    j = judge(text, [("Alien", 1979), ("Ronin", 1998), ("Titanic", 1997)])
    # Titanic is ground truth but not in the catalog: 0. Alien's year is off by one: still a hit.
    assert j["rel"] == [0, 1, 0, 0, 1]
    assert j["valid"] == [1, 1, 1, 0, 1]
    assert j["in_catalog"] == [1, 1, 0, 0, 1]


def test_relevance_year_tolerance_is_two():
    assert judge("Alien (1981)", [("Alien", "1979")])["rel"] == [1]
    assert judge("Alien (1982)", [("Alien", "1979")])["rel"] == [0]


def test_relevance_case_and_whitespace():
    assert judge("  ALIEN   (1979)", [("alien", 1979)])["rel"] == [1]


def test_relevance_duplicate_gets_zero_and_ground_truth_consumed_once():
    j = judge("Alien (1979)\nAlien (1979)\nalien (1980)", [("Alien", 1979), ("Alien", 1979)])
    assert j["rel"] == [1, 0, 0]
    assert j["duplicate"] == [0, 1, 1]


def test_relevance_seen_title_gets_zero():
    j = judge("Heat (1995)\nAlien (1979)", [("Heat", 1995), ("Alien", 1979)], seen=["heat"])
    assert j["rel"] == [0, 1] and j["seen"] == [1, 0]


def test_relevance_parenthesised_title_matches():
    j = judge("Birdman or (The Unexpected Virtue of Ignorance) (2014)", [("Birdman", 2014)])
    assert j["rel"] == [0]  # 'birdman' != 'birdman or'
    j = judge("Birdman or (The Unexpected Virtue of Ignorance) (2014)", [("Birdman or", 2014)])
    assert j["rel"] == [1]


# --- metrics ---------------------------------------------------------------------------------------

def test_recall_and_ndcg_hand_computed():
    hits = [0, 1, 0, 1, 0]
    assert common.recall_at_k(hits, 3, 5) == pytest.approx(2 / 3)
    assert common.recall_at_k(hits, 3, 2) == pytest.approx(1 / 3)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert common.ndcg_at_k(hits, 3, 5) == pytest.approx(dcg / idcg)
    # IDCG is over min(k, |GT|) items: with one ground-truth item it is 1.
    assert common.ndcg_at_k([1, 0], 1, 2) == pytest.approx(1.0)
    assert common.ndcg_at_k([0, 1], 1, 2) == pytest.approx(1 / math.log2(3))


def test_score_completion_both_protocols_hand_computed():
    row = {"id": "c#0", "seen_titles": ["Heat"],
           "groundtruth_with_release_year": [["Alien", "1979"], ["Ronin", "1998"]]}
    # line 1 seen, line 2 out of catalog, line 3 invalid, line 4 hit, line 5 hit
    text = "Heat (1995)\nTitanic (1997)\nblah\nAlien (1979)\nRonin (1998)"
    s = common.score_completion(text, row, CAT, n=5, ks=(2, 5))
    assert s["hits_aligned"] == [0, 0, 0, 1, 1]
    assert s["hits_filtered"] == [1, 1]
    idcg2 = 1 + 1 / math.log2(3)
    assert s["ndcg@2_filtered"] == pytest.approx(1.0)
    assert s["recall@2_filtered"] == pytest.approx(1.0)
    assert s["recall@2_aligned"] == 0.0
    assert s["ndcg@5_aligned"] == pytest.approx((1 / math.log2(5) + 1 / math.log2(6)) / idcg2)
    assert s["valid_rate"] == pytest.approx(4 / 5)
    assert s["in_catalog_rate"] == pytest.approx(3 / 5)
    assert s["exact_n"] == 0


def test_filtered_protocol_cuts_at_n_after_filtering():
    row = {"id": "c#0", "seen_titles": [], "groundtruth_with_release_year": [["Ronin", 1998]]}
    s = common.score_completion("x\ny\nHeat (1995)\nRonin (1998)", row, CAT, n=2, ks=(2,))
    assert s["hits_filtered"] == [0, 1] and s["hits_aligned"] == [0, 0]


def test_mean_and_se_clusters_by_conversation():
    mean, se = common.mean_and_se([1.0, 1.0, 0.0, 0.0], ["a", "a", "b", "b"])
    assert mean == 0.5 and se == pytest.approx(0.5)  # two clusters with means 1 and 0
    mean, se = common.mean_and_se([1.0, 1.0, 0.0, 0.0])
    assert se == pytest.approx(math.sqrt(1 / 3) / 2)


# --- files ------------------------------------------------------------------------------------------

def test_read_jsonl_error_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(common.DataError, match=r"x\.jsonl:2: not valid JSON"):
        common.read_jsonl(p)


def test_read_jsonl_skips_torn_last_line_only_when_asked(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"a": 2, "b"')
    with pytest.raises(common.DataError):
        common.read_jsonl(p)
    assert common.read_jsonl(p, skip_torn_tail=True) == [{"a": 1}]


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "out.jsonl"
    common.write_jsonl(p, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        common.write_jsonl(p, rows())
    assert common.read_jsonl(p) == [{"a": 1}]
    assert [f.name for f in tmp_path.iterdir()] == ["out.jsonl"]


def test_read_rows_validates_with_file_and_line(tmp_path):
    p = tmp_path / "train.jsonl"
    good = {"id": "a#0", "prompt": [{"role": "user", "content": "x"}], "seen_titles": [],
            "groundtruth_with_release_year": [["Heat", "1995"]]}
    bad = dict(good, groundtruth_with_release_year=[["Heat"]])
    p.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(common.DataError, match=r"train\.jsonl:2: 'groundtruth_with_release_year'"):
        common.read_rows(p, "run 01 first")
    with pytest.raises(common.DataError, match="run 01 first"):
        common.read_rows(tmp_path / "missing.jsonl", "run 01 first")


def test_parse_config_flags_from_dataclass():
    from dataclasses import dataclass

    @dataclass
    class C:
        data_dir: str = common.arg("data", "where")
        lr: float = common.arg(1e-3, "step size")
        cpu: bool = common.arg(False, "force CPU")
        ks: list = common.arg([5, 10], "cut-offs")

    c = common.parse_config(C, ["--data-dir", "d", "--lr", "0.5", "--cpu", "--ks", "1", "2"])
    assert (c.data_dir, c.lr, c.cpu, c.ks) == ("d", 0.5, True, [1, 2])
    assert common.parse_config(C, []).ks == [5, 10]


# --- models -----------------------------------------------------------------------------------------

def test_tiny_tokenizer_has_smollm2_shape(tiny):
    model, tok = tiny
    assert tok.eos_token == "<|im_end|>" == tok.pad_token and tok.padding_side == "left"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    multi = [v for v in range(len(tok)) if tok.decode([v]).count("\n") > 0]
    assert len(multi) >= 2  # a bare newline and at least one token with a newline plus more


def test_tiny_model_round_trips_save_and_load(tiny, tmp_path):
    model, tok = tiny
    common.save_model(model, tok, tmp_path / "m")
    model2, tok2 = common.load_model(str(tmp_path / "m"))
    ids = torch.tensor([tok.encode("Heat (1995)\nAlien (1979)")])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, model2(ids).logits)
    assert tok2.encode("Heat (1995)") == tok.encode("Heat (1995)")
    assert tok2.pad_token == tok.pad_token and tok2.padding_side == "left"


def test_completion_mask_from_first_eos_not_pad_id():
    eos = 2  # pad is also 2: a mask built from "id != pad" would drop the EOS and keep nothing after
    ids = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 2], [5, 6, 7, 8, 9]])
    mask, has_eos = common.completion_mask(ids, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert has_eos.tolist() == [True, True, False]


def test_generate_batched_matches_one_by_one(tiny):
    model, tok = tiny
    prompts = [common.task_prompt("short", 3), common.task_prompt("a much longer conversation " * 5, 3)]
    together = common.generate(model, tok, prompts, max_new_tokens=8, batch_size=2)
    alone = [common.generate(model, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert together == alone


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logprobs_equal_full_softmax_and_ignore_left_padding(tiny, temperature):
    model, tok = tiny
    prompts = [tok.encode("Heat (1995) is"), tok.encode("a much longer prompt about Alien (1979) and")]
    comps = [tok.encode(" Ronin (1998)\nJaws"), tok.encode(" Heat (1995)\nX")]
    T = max(len(c) for c in comps)
    comps = [c + [tok.pad_token_id] * (T - len(c)) for c in comps]
    ids, attn = common.left_pad(prompts, tok.pad_token_id)
    ids = torch.cat([ids, torch.tensor(comps)], 1)
    attn = torch.cat([attn, torch.ones(2, T, dtype=torch.long)], 1)
    with torch.no_grad():
        lp = common.completion_logprobs(model, ids, attn, T, chunk=3, temperature=temperature)
        for i in range(2):  # the same sequence alone, no padding, through the plain forward pass
            alone = torch.tensor([prompts[i] + comps[i]])
            full = torch.log_softmax(model(alone).logits.float() / temperature, -1)[0, len(prompts[i]) - 1:-1]
            ref = full.gather(-1, torch.tensor(comps[i])[:, None]).squeeze(-1)
            assert torch.allclose(lp[i], ref, atol=1e-5)


def test_completion_logprobs_gradient_matches_plain_forward(tiny):
    model, tok = tiny
    ids = torch.tensor([tok.encode("Heat (1995)\nAlien (1979)\nJaws (1975)")])
    attn = torch.ones_like(ids)
    model.zero_grad()
    common.completion_logprobs(model, ids, attn, 6, chunk=4).sum().backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(ids).logits.float()
    torch.log_softmax(logits, -1)[0, -7:-1].gather(-1, ids[0, -6:, None]).sum().backward()
    g2 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5)


def test_save_model_keeps_other_files_in_the_run_dir(tiny, tmp_path):
    model, tok = tiny
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n')
    common.save_model(model, tok, tmp_path)
    common.save_model(model, tok, tmp_path)
    assert (tmp_path / "log.jsonl").read_text() == '{"step": 1}\n'
    assert (tmp_path / "model.safetensors").exists()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]


def test_render_list_marks_each_line():
    row = {"id": "c#0", "seen_titles": ["Heat"], "groundtruth_with_release_year": [["Alien", "1979"]]}
    text = "Alien (1979)\nHeat (1995)\nTitanic (1997)\nAlien (1979)\njunk\nRonin (1998)"
    out = common.render_list(text, row, CAT, 5, rewards=[1, 0, 0, 0, 0]).split("\n")
    assert "ground truth: Alien (1979)" in out[0]
    assert [line.split()[1] for line in out[1:]] == ["+", "s", "?", "d", "x", "over"]
    assert "r=+1.00" in out[1]


def test_step_log_fixed_columns_and_resume_trims(tmp_path, capsys):
    log = common.StepLog(tmp_path / "log.jsonl", 10)
    for step in (1, 2, 3):
        log.log(step, {"loss": 1.0 / step, "lr": 5e-5})
    lines = capsys.readouterr().out.strip().split("\n")
    assert lines[0].startswith("step 01/10 | loss    1.0000 | lr  5.00e-05")
    assert len({len(line) for line in lines}) == 1  # fixed columns
    common.StepLog(tmp_path / "log.jsonl", 10, resume_step=2)
    assert [r["step"] for r in common.read_jsonl(tmp_path / "log.jsonl")] == [1, 2]
    common.StepLog(tmp_path / "log.jsonl", 10)
    assert not (tmp_path / "log.jsonl").exists()


def test_start_run_refuses_a_resume_that_changes_the_trajectory(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class C:
        lr: float = 1e-5
        steps: int = 10

    (tmp_path / "checkpoint").mkdir()
    common.start_run(tmp_path, C(), resume=False, trajectory=("lr",))
    assert not (tmp_path / "checkpoint").exists()  # a fresh run drops an earlier run's checkpoint
    common.start_run(tmp_path, C(steps=20), resume=True, trajectory=("lr",))  # steps may change
    with pytest.raises(common.DataError, match="--lr 1e-05 \\(now 0.001\\)"):
        common.start_run(tmp_path, C(lr=1e-3), resume=True, trajectory=("lr",))
