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
    # what zero-shot LLMs write: a remark after the year, numbering inside emphasis, nesting
    ("Heat (1995) - a tense heist classic", ("Heat", 1995)),
    ("Heat (1995): great pacing", ("Heat", 1995)),
    ("Heat (1995) is great", ("Heat", 1995)),
    ("**1. Heat** (1995)", ("Heat", 1995)),
    ("**1. Heat (1995)**", ("Heat", 1995)),
    ("1. **Heat** (1995) – Mann at his best", ("Heat", 1995)),
    ("- *Heat* (1995)", ("Heat", 1995)),
    ("> 2) __Alien (1979)__", ("Alien", 1979)),
    ("`Heat (1995)`", ("Heat", 1995)),
    # titles that begin or end with an apostrophe or a quote keep it; a wrapping pair goes
    ("'Salem's Lot (1979)", ("'Salem's Lot", 1979)),
    ("Breakin' (1984)", ("Breakin'", 1984)),
    ("'71 (2014)", ("'71", 2014)),
    ('"Crocodile" Dundee (1986)', ('"Crocodile" Dundee', 1986)),
    ("'Heat' (1995)", ("Heat", 1995)),
    ("Am\u00e9lie (2001)", ("Am\u00e9lie", 2001)),
])
def test_parse_line_accepts(line, expected):
    assert parse_line(line) == expected


@pytest.mark.parametrize("line", [
    "", "   ", "Heat", "Heat 1995", "Heat (95)", "Heat (995)", "Heat (19955)", "(1995)",
    "1. (1995)", "Sure! Here are 20 movies:", "Heat - a 1995 classic", '""(1995)', "**",
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


TRICKY_TITLES = [  # the shapes of real catalog titles (IMDb / MovieLens / Reddit-v2)
    ("'Salem's Lot", 1979), ("Breakin'", 1984), ("'71", 2014), ('"Crocodile" Dundee', 1986),
    ("Schindler's List", 1993), ("Ocean's Eleven", 2001), ("Summer of '42", 1971),
    ("2001: A Space Odyssey", 1968), ("Star Wars: Episode IV - A New Hope", 1977),
    ("Birdman or (The Unexpected Virtue of Ignorance)", 2014), ("(500) Days of Summer", 2009),
    ("1917", 2019), ("300", 2006), ("9", 2009), ("12 Angry Men", 1957), ("M*A*S*H", 1970),
    ("Am\u00e9lie", 2001), ("Y Tu Mam\u00e1 Tambi\u00e9n", 2001),
    ("L\u00e9on: The Professional", 1994),
    ("Crouching Tiger, Hidden Dragon", 2000), ("What's Eating Gilbert Grape", 1993),
    ("Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb", 1964),
    ("Se7en", 1995), ("WALL\u00b7E", 2008), ("Mission: Impossible - Fallout", 2018),
    ("Pok\u00e9mon: The First Movie", 1998), ("Les Mis\u00e9rables", 2012),
    ("\u5343\u3068\u5343\u5c0b\u306e\u795e\u96a0\u3057", 2001),
    ("O Brother, Where Art Thou?", 2000),
    ("Who Framed Roger Rabbit", 1988), ("Monsters, Inc.", 2001), ("I, Robot", 2004),
]


def round_trip_catalog(rows):
    """Every title, written by format_items, parsed back unchanged and matched to itself."""
    cat = Catalog(rows)
    text = common.format_items((r["title"], r["year"]) for r in rows)
    parsed = common.parse_completion(text)
    assert parsed == [(r["title"], int(r["year"])) for r in rows]
    assert [cat.find(*item) is not None for item in parsed] == [True] * len(rows)


def test_every_demo_catalog_title_round_trips():
    stage = __import__("importlib").import_module("01_catalog")
    round_trip_catalog(stage.load_movies())


def test_every_title_of_a_released_format_catalog_round_trips(tmp_path):
    import pickle
    stage = __import__("importlib").import_module("01_catalog")
    path = tmp_path / "catalog.pkl"
    path.write_bytes(pickle.dumps(TRICKY_TITLES))
    round_trip_catalog(stage.load_catalog_pickle(path))


def test_a_title_wrapped_in_quotes_or_emphasis_still_matches_its_catalog_item():
    cat = Catalog([{"title": "*batteries not included", "year": 1987},
                   {"title": '"Heat"', "year": 1995}])
    for line, index in (("*batteries not included (1987)", 0), ('"Heat" (1995)', 1),
                        ("Heat (1995)", 1)):
        assert cat.find(*parse_line(line)) == index, line


def test_task_prompt_asks_for_n_items():
    msgs = common.task_prompt("I love westerns.", 7)
    assert msgs[0]["role"] == "user" and "Recommend 7 movies" in msgs[0]["content"]
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


# --- metrics --------------------------------------------------------------------------------------

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
    mean, se = common.mean_and_se([1.0, 1.0, 0.0, 0.0], ["a", "b", "c", "d"])
    assert se == pytest.approx(math.sqrt(1 / 3) / 2)


# --- files ----------------------------------------------------------------------------------------

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


# --- models ---------------------------------------------------------------------------------------

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


def greedy_by_hand(model, tok, messages, n_tokens, eos):
    """The argmax of the plain forward pass, token by token, until an id in `eos`."""
    ids = common.encode_prompts(tok, [messages], 2048)[0]
    out = []
    with torch.no_grad():
        while len(out) < n_tokens:
            out.append(model(torch.tensor([ids + out])).logits[0, -1].argmax().item())
            if out[-1] in eos:
                return tok.decode(out[:-1])
    return tok.decode(out)


def test_greedy_generation_is_the_argmax_of_the_plain_forward_pass_and_stops_at_eos(tiny):
    model, tok = tiny
    prompts = [common.task_prompt("Heat (1995) and Alien", 3),
               common.task_prompt("a longer thread about Jaws (1975) and other sharks", 3)]
    got = common.generate(model, tok, prompts, 12)  # no repetition penalty, no processors
    assert got == [greedy_by_hand(model, tok, p, 12, []) for p in prompts]
    with torch.no_grad():  # the first token greedy writes after the first prompt
        ids = common.encode_prompts(tok, prompts[:1], 2048)[0]
        first = model(torch.tensor([ids])).logits[0, -1].argmax().item()
    eos = model.generation_config.eos_token_id, tok.eos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id = first  # the first prompt stops at once
    try:
        again = common.generate(model, tok, prompts, 12)
        assert again == [greedy_by_hand(model, tok, p, 12, [first]) for p in prompts]
        assert again[0] == "" and again[1] != got[1]  # the second stops where it writes `first`
    finally:
        model.generation_config.eos_token_id, tok.eos_token_id = eos


def test_rows_sharing_a_prompt_are_generated_once_and_handed_back_in_order(tiny, monkeypatch):
    model, tok = tiny
    a, b = common.task_prompt("short", 3), common.task_prompt("a much longer thread " * 5, 3)
    prefills = []  # the batches of prompts the model is given (later calls: one token a row)
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: prefills.append(kw["input_ids"].shape) if kw["input_ids"].shape[1] > 1
        else None, with_kwargs=True)
    try:
        got = common.generate(model, tok, [b, a, b, a, a], max_new_tokens=6, batch_size=8)
    finally:
        hook.remove()
    assert len(prefills) == 1 and prefills[0][0] == 2  # each distinct prompt once
    alone = [common.generate(model, tok, [p], max_new_tokens=6)[0] for p in (a, b)]
    assert got == [alone[1], alone[0], alone[1], alone[0], alone[0]]


def test_save_model_keeps_other_files_in_the_run_dir(tiny, tmp_path):
    model, tok = tiny
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n')
    common.save_model(model, tok, tmp_path)
    common.save_model(model, tok, tmp_path)
    assert (tmp_path / "log.jsonl").read_text() == '{"step": 1}\n'
    assert (tmp_path / "model.safetensors").exists()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]


def test_render_list_marks_each_line():
    row = {"id": "c#0", "seen_titles": ["Heat"],
           "groundtruth_with_release_year": [["Alien", "1979"]]}
    text = "Alien (1979)\nHeat (1995)\nTitanic (1997)\nAlien (1979)\njunk\nRonin (1998)"
    out = common.render_list(text, row, CAT, 5, rewards=[1, 0, 0, 0, 0]).split("\n")
    assert "ground truth: Alien (1979)" in out[0]
    assert [line.split()[1] for line in out[1:]] == ["+", "s", "?", "d", "x", "over"]
    assert "r=+1.00" in out[1]


def test_step_log_fixed_columns_and_every_number_in_log_jsonl(tmp_path, capsys):
    show = {"loss": "9.4f", "lr": ".2e"}
    for step in (1, 2, 3):
        common.log_step(tmp_path, step, 10, {"loss": 1.0 / step, "lr": 5e-5, "elapsed": 3.0}, show)
    lines = capsys.readouterr().out.strip().split("\n")
    assert lines[0] == "step 01/10 | loss    1.0000 | lr 5.00e-05"  # only the keys of `show`
    assert len({len(line) for line in lines}) == 1  # fixed columns
    assert common.read_jsonl(tmp_path / "log.jsonl")[0]["elapsed"] == 3.0  # every key logged


def test_resume_cuts_the_log_back_to_the_checkpoint_and_a_fresh_start_drops_it(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class C:
        lr: float = 1e-5

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    common.start_run(tmp_path, C(), resume=False, trajectory=("lr",))
    for step in (1, 2, 3):
        common.log_step(tmp_path, step, 10, {"loss": 1.0}, {"loss": ".1f"})
        if step == 2:
            common.save_checkpoint(tmp_path, model, optimizer, schedule, {"step": 2})
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # an append cut off by a kill
    assert common.load_checkpoint(tmp_path, model, optimizer, schedule) == {"step": 2}
    assert [r["step"] for r in common.read_jsonl(tmp_path / "log.jsonl")] == [1, 2]
    common.start_run(tmp_path, C(), resume=False, trajectory=("lr",), overwrite=True)
    assert not (tmp_path / "log.jsonl").exists() and not (tmp_path / "ckpt.pt").exists()


def test_start_run_refuses_a_resume_that_changes_the_trajectory(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class C:
        lr: float = 1e-5
        steps: int = 10

    (tmp_path / "ckpt.pt").write_bytes(b"an earlier run's checkpoint")
    with pytest.raises(common.DataError,
                       match="holds an earlier run .ckpt.pt.; --resume continues it"):
        common.start_run(tmp_path, C(), resume=False, trajectory=("lr",))
    assert (tmp_path / "ckpt.pt").exists()  # refused: nothing removed
    common.start_run(tmp_path, C(), resume=False, trajectory=("lr",), overwrite=True)
    assert not (tmp_path / "ckpt.pt").exists()  # a fresh run drops an earlier run's checkpoint
    common.start_run(tmp_path, C(steps=20), resume=True, trajectory=("lr",))  # steps may change
    with pytest.raises(common.DataError, match="--lr 1e-05 \\(now 0.001\\)"):
        common.start_run(tmp_path, C(lr=1e-3), resume=True, trajectory=("lr",))


def test_models_that_only_run_forward_hold_bf16_weights_on_cuda_only():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert common.inference_dtype(cuda, True) == torch.bfloat16
    assert common.inference_dtype(cuda, False) == torch.float32  # --no-bf16
    assert common.inference_dtype(cpu, True) == torch.float32
