"""02_build_sft.py: the teacher (HTTP, retries, the key, the cache), Remap, Reflect, Adjust, and
smoke runs."""

import json
import math
import shutil
import threading
import time

import numpy as np
import pytest
import torch

import common
from conftest import stage, TINY
from openai_stub_server import StubServer, model_reply

sft = stage("02_build_sft")
SENTINEL = "sk-test-SENTINEL-0c5e7a91"
HEAT = [{"role": "user", "content": "Recommend three movies like Heat."}]


@pytest.fixture(scope="session")
def convrec_cache(tmp_path_factory):
    """One embedding cache for the session: the demo catalog is embedded once, not once per test."""
    return tmp_path_factory.mktemp("convrec_cache")


@pytest.fixture
def data(demo_data, tmp_path, convrec_cache, monkeypatch):
    """A private copy of 01's outputs (60 demo conversations, N = 5)."""
    monkeypatch.setenv("CONVREC_CACHE", str(convrec_cache))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "data"
    out.mkdir()
    for name in ("catalog.jsonl", "catalog_summary.json", "train.jsonl", "val.jsonl"):
        shutil.copy(demo_data / name, out / name)
    return out


def run_args(data, *extra):
    return ["--data-dir", str(data), "--teacher-model", TINY, "--limit", "2", "--val-limit", "2",
            "--n-reflect", "6", "--item-tokens", "4", "--extra-demos", "0", *extra]


# --- the teacher over HTTP ------------------------------------------------------------------------

def test_chat_through_an_openai_compatible_server_equals_the_local_teacher(tiny, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SENTINEL)
    prompts = [HEAT, [{"role": "user", "content": "Something scary from the 80s?"}]]
    with StubServer(model_reply(*tiny)) as server:
        cfg = sft.Config(teacher=server.url, teacher_model="tiny", workers=2)
        with sft.Teacher("tiny", sft.remote_answers(cfg), tmp_path / "remote.jsonl") as remote:
            got = remote.chat_many(prompts, max_tokens=12)
            assert remote.chat(HEAT, max_tokens=12) == got[0]  # the single form, from the cache
    local = sft.local_answers(TINY, torch.device("cpu"), batch_size=1)
    with sft.Teacher("tiny", local, tmp_path / "local.jsonl") as teacher:
        assert got == teacher.chat_many(prompts, max_tokens=12)
    assert len(server.requests) == 2
    in_order = sorted(server.requests, key=lambda r: r["body"]["messages"] != HEAT)
    for req, messages in zip(in_order, prompts):
        assert req["path"] == "/v1/chat/completions"
        assert req["body"] == {"model": "tiny", "messages": messages, "max_tokens": 12,
                               "temperature": 0.0, "top_p": 1.0}
        assert req["headers"]["Authorization"] == f"Bearer {SENTINEL}"


def test_retries_honour_retry_after_then_back_off_exponentially():
    script = [(429, {"Retry-After": "7"}), (500, {}), "drop"]
    sleeps = []
    with StubServer(lambda body: "Heat (1995)", script) as server:
        reply = sft.post_chat(server.url, "m", HEAT, {"max_tokens": 5}, timeout=10, retries=3,
                              backoff=0.01, sleep=sleeps.append)
    assert reply == "Heat (1995)"
    assert len(server.requests) == 4  # 429, 500, dropped connection, success
    assert sleeps[0] == 7.0  # the server's Retry-After, as given
    # base * 2^attempt, jitter up to +50%
    assert 0.02 <= sleeps[1] <= 0.03 and 0.04 <= sleeps[2] <= 0.06


def test_gives_up_after_the_retries_and_never_retries_a_client_error(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SENTINEL)
    with StubServer(lambda body: "x", [(503, {})] * 3) as server:
        with pytest.raises(sft.TeacherError, match="gave up after 3 attempts"):
            sft.post_chat(server.url, "m", HEAT, {}, retries=2, backoff=0.001, sleep=lambda s: None)
    assert len(server.requests) == 3
    echo = (401, {}, f"Incorrect API key provided: {SENTINEL}")  # some servers echo the key back
    with StubServer(lambda body: "x", [echo]) as server:
        with pytest.raises(sft.TeacherError) as err:
            sft.post_chat(server.url, "m", HEAT, {}, retries=5, sleep=lambda s: None)
    assert len(server.requests) == 1
    message = str(err.value)
    assert "401" in message and "[redacted]" in message and SENTINEL not in message


def test_when_one_request_fails_the_replies_that_arrive_are_still_cached(tmp_path):
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    with StubServer(lambda body: "ok " + body["messages"][0]["content"], [(400, {})]) as server:
        cfg = sft.Config(teacher=server.url, teacher_model="m", workers=2, retries=0)
        with sft.Teacher("m", sft.remote_answers(cfg), tmp_path / "cache.jsonl") as teacher:
            with pytest.raises(sft.TeacherError, match="HTTP 400"):
                teacher.chat_many(prompts, max_tokens=4)
    answered = {r["body"]["messages"][0]["content"] for r in server.requests[1:]}
    # when the 400 returns before the other worker starts, nothing else is sent (and no cache made)
    cache = tmp_path / "cache.jsonl"
    cached = {r["reply"] for r in common.read_jsonl(cache)} if cache.exists() else set()
    assert cached == {"ok " + q for q in answered}


def test_urls_and_retry_after_forms():
    assert sft.chat_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert sft.chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert sft.chat_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"
    assert sft.retry_after_seconds("3") == 3.0 and sft.retry_after_seconds(None) is None
    assert sft.retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    assert sft.retry_after_seconds("soon") is None


NULL_REPLY = b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": null}}]}'
NOT_A_REPLY = [b"<html>502 Bad Gateway</html>", b'{"error": {"message": "busy"}}',
               b'{"choices": []}', b'{"choices": [{"index": 0}]}', NULL_REPLY]


@pytest.mark.parametrize("body", NOT_A_REPLY)
def test_a_200_without_a_reply_is_retried_like_a_5xx(body):
    sleeps = []
    with StubServer(lambda _: "Heat (1995)", [body, body]) as server:
        reply = sft.post_chat(server.url, "m", HEAT, {}, retries=2, backoff=0.01,
                              sleep=sleeps.append)
    assert reply == "Heat (1995)" and len(server.requests) == 3
    assert 0.01 <= sleeps[0] <= 0.015 and 0.02 <= sleeps[1] <= 0.03  # the backoff of a 5xx


def test_a_200_without_a_reply_gives_up_after_the_retries_in_one_line(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SENTINEL)
    page = f"<html>\n<p>upstream error for Bearer {SENTINEL}</p>\n</html>".encode()
    with StubServer(lambda _: "x", [page] * 3) as server:
        with pytest.raises(sft.TeacherError) as err:
            sft.post_chat(server.url, "m", HEAT, {}, retries=2, sleep=lambda s: None)
    message = str(err.value)
    assert len(server.requests) == 3 and "\n" not in message
    assert message.startswith(f"{server.url}/v1/chat/completions: gave up after 3 attempts (last: ")
    assert "HTTP 200 but not a chat completion" in message
    assert "[redacted]" in message and SENTINEL not in message


def test_a_null_reply_is_retried_and_never_cached(tmp_path):
    cache = tmp_path / "teacher_cache.jsonl"
    with StubServer(lambda _: "Heat (1995)", [NULL_REPLY] * 2) as server:
        cfg = sft.Config(teacher=server.url, teacher_model="m", workers=1, retries=1, backoff=0.001)
        with sft.Teacher("m", sft.remote_answers(cfg), cache) as teacher:
            with pytest.raises(sft.TeacherError, match=r"\(last: HTTP 200 with content null"):
                teacher.chat(HEAT, max_tokens=4)
        assert not cache.exists() or cache.read_text() == ""
        with sft.Teacher("m", sft.remote_answers(cfg), cache) as teacher:  # the next run asks again
            assert teacher.chat(HEAT, max_tokens=4) == "Heat (1995)"
    assert len(server.requests) == 3
    assert [r["reply"] for r in common.read_jsonl(cache)] == ["Heat (1995)"]


def test_a_read_timeout_is_not_sent_again(data):
    with StubServer(lambda _: "Heat (1995)", [("sleep", 1.5)]) as server:  # busy, but working on it
        with pytest.raises(sft.TeacherError) as err:
            sft.main(run_args(data, "--teacher", server.url, "--timeout", "0.3", "--workers", "1",
                              "--backoff", "0.01"))
        assert len(server.requests) == 1
    message = str(err.value)
    assert "\n" not in message and "no reply within --timeout 0.3 s; not sent again" in message
    assert "still be working on it" in message and "fewer --workers" in message
    assert "transformers serve --continuous-batching" in message
    with StubServer(lambda _: "Heat (1995)", ["drop", (503, {})]) as server:  # these are retried
        sft.post_chat(server.url, "m", HEAT, {}, timeout=5, retries=2, sleep=lambda s: None)
    assert len(server.requests) == 3


def test_safe_url_hides_user_info_and_query_values():
    assert (sft.safe_url("https://user:pw@api.example.com/v1?api_key=K&api-version=2")
            == "https://[redacted]@api.example.com/v1?api_key=[redacted]&api-version=[redacted]")
    assert sft.safe_url("https://sk-KEY@h:1/v1?sk-KEY2#x") == "https://[redacted]@h:1/v1?[redacted]"
    assert sft.safe_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert sft.safe_url("user:KEY@localhost:8000") == "[not an http(s) URL]"
    assert sft.safe_url("") == ""
    assert sft.chat_url("https://u:p@h/v1?key=K") == "https://u:p@h/v1/chat/completions?key=K"
    with pytest.raises(sft.TeacherError) as err:
        sft.chat_url("user:KEY@localhost:8000")
    assert "KEY" not in str(err.value)
    secret = "long-secret-value"
    redacted = sft.redact(f"bad key {secret}, n=1", f"http://h/?key={secret}&n=1")
    assert redacted == "bad key [redacted], n=1"  # short values are no keys: left alone


def test_credentials_in_the_url_never_reach_output_or_files(tiny, data, convrec_cache, capfd):
    password, key = "pw-SENTINEL-4f1d2c", "qk-SENTINEL-9b3e07"

    def with_credentials(url):
        return url.replace("http://", f"http://user:{password}@") + f"/v1?api_key={key}"
    with StubServer(model_reply(*tiny)) as server:
        url = with_credentials(server.url)
        report = sft.main(run_args(data, "--teacher", url, "--workers", "2"))
    paths = {r["path"] for r in server.requests}
    assert paths == {f"/v1/chat/completions?api_key={key}"}  # the query string still reaches it
    assert report["config"]["teacher"] == server.url.replace("//", "//[redacted]@") + "/v1"
    echo = (401, {}, f"invalid key {key} for user:{password}")  # a server that echoes both back
    errors = []
    with StubServer(lambda _: "x", [echo, (503, {})]) as server:
        for _ in range(2):
            with pytest.raises(sft.TeacherError) as err:
                sft.post_chat(with_credentials(server.url), "m", HEAT, {}, retries=0)
            errors.append(str(err.value))
    assert "HTTP 401" in errors[0] and "gave up after 1 attempts" in errors[1]
    captured = capfd.readouterr()
    assert "api_key=[redacted]" in captured.out
    written = [f for root in (data, convrec_cache) for f in root.rglob("*") if f.is_file()]
    texts = [captured.out, captured.err, *errors, *(f.read_text(errors="replace") for f in written)]
    assert not [t for t in texts if password in t or key in t]


def test_the_key_never_reaches_disk_or_output(tiny, data, convrec_cache, capfd, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SENTINEL)
    with StubServer(model_reply(*tiny)) as server:
        sft.main(run_args(data, "--teacher", server.url, "--workers", "2"))
    assert server.requests
    assert all(r["headers"]["Authorization"] == f"Bearer {SENTINEL}" for r in server.requests)
    captured = capfd.readouterr()
    assert SENTINEL not in captured.out + captured.err
    written = [f for root in (data, convrec_cache) for f in root.rglob("*") if f.is_file()]
    assert any(f.name == "teacher_cache.jsonl" for f in written)
    for f in written:
        assert SENTINEL.encode() not in f.read_bytes(), f


# --- the reply cache ------------------------------------------------------------------------------

def test_a_second_run_makes_no_request_and_writes_the_same_files(tiny, data):
    with StubServer(model_reply(*tiny)) as server:
        first = sft.main(run_args(data, "--teacher", server.url))
        sft_train = (data / "sft_train.jsonl").read_bytes()
        asked = len(server.requests)
        second = sft.main(run_args(data, "--teacher", server.url))
    # 2 + 2 conversations, a list and a rating each
    assert asked == first["teacher_replies_requested"] == 8
    assert len(server.requests) == asked and second["teacher_replies_requested"] == 0
    assert (data / "sft_train.jsonl").read_bytes() == sft_train
    assert second["steps"] == first["steps"]


def test_two_runs_on_one_cache_take_turns_and_the_second_asks_nothing_twice(tmp_path, capsys):
    cache = tmp_path / "teacher_cache.jsonl"
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    second = {}
    with StubServer(lambda body: "ok " + body["messages"][0]["content"]) as server:
        cfg = sft.Config(teacher=server.url, teacher_model="m", workers=2)

        def second_run():  # another run on the same cache, started while the first holds it
            with sft.Teacher("m", sft.remote_answers(cfg), cache) as teacher:
                second["replies"] = teacher.chat_many(prompts + [HEAT], max_tokens=4)
                second["asked"] = teacher.asked

        with sft.Teacher("m", sft.remote_answers(cfg), cache) as first:
            thread = threading.Thread(target=second_run, daemon=True)
            thread.start()
            out, deadline = "", time.time() + 10
            while "waiting for it to finish" not in out and time.time() < deadline:
                time.sleep(0.01)
                out += capsys.readouterr().out
            assert f"is using {cache}; waiting for it to finish" in out
            first.chat_many(prompts, max_tokens=4)
            assert "replies" not in second  # it waits until the first run is done
        thread.join(timeout=30)
    assert second["replies"] == ["ok q0", "ok q1", "ok q2", "ok q3", "ok " + HEAT[0]["content"]]
    assert second["asked"] == 1  # only what the first run did not ask
    asked = sorted(r["body"]["messages"][0]["content"] for r in server.requests)
    assert asked == sorted(["q0", "q1", "q2", "q3", HEAT[0]["content"]])


def scripted_backend(asked, fail_after=None):
    """A backend that records what it is asked and dies (like a killed run) after `fail_after`
    replies."""
    def answer(prompts, sampling):
        for i, m in enumerate(prompts):
            if fail_after is not None and len(asked) == fail_after:
                raise KeyboardInterrupt("killed")
            asked.append(m[0]["content"])
            yield i, "reply to " + m[0]["content"]
    return answer


def test_a_killed_run_resumes_and_asks_only_for_the_missing_replies(tmp_path):
    cache = tmp_path / "teacher_cache.jsonl"
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    asked = []
    killed = sft.Teacher("m", scripted_backend(asked, fail_after=2), cache)
    with pytest.raises(KeyboardInterrupt), killed:
        killed.chat_many(prompts, max_tokens=8)
    assert asked == ["q0", "q1"] and len(common.read_jsonl(cache)) == 2  # on disk before the crash
    asked.clear()
    with sft.Teacher("m", scripted_backend(asked), cache) as resumed:
        assert resumed.chat_many(prompts, max_tokens=8) == [f"reply to q{i}" for i in range(5)]
        assert asked == ["q2", "q3", "q4"]
        resumed.chat_many(prompts[:1], max_tokens=9)  # other sampling parameters: another request
    with sft.Teacher("other-model", scripted_backend(asked), cache) as other:  # another model
        other.chat(prompts[0], max_tokens=8)
    assert asked == ["q2", "q3", "q4", "q0", "q0"]


def test_a_torn_last_line_is_skipped_with_a_warning_and_the_cache_stays_valid(tmp_path, capsys):
    cache = tmp_path / "teacher_cache.jsonl"
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
    asked = []
    with sft.Teacher("m", scripted_backend(asked), cache) as teacher:
        teacher.chat_many(prompts[:2], max_tokens=8)
    with open(cache, "a") as f:
        f.write('{"key": "abc", "reply": "half a rep')  # a crash in the middle of a write
    with sft.Teacher("m", scripted_backend(asked), cache) as teacher:
        assert "incomplete last line" in capsys.readouterr().err and len(teacher.cache) == 2
        teacher.chat_many(prompts, max_tokens=8)
    assert asked == ["q0", "q1", "q2"]
    replies = [r["reply"] for r in common.read_jsonl(cache)]
    assert replies == ["reply to q0", "reply to q1", "reply to q2"]
    with open(cache, "a") as f:
        f.write('{"key": "k", "reply": "whole"}')  # whole JSON, only the newline lost: kept
    with sft.Teacher("m", scripted_backend(asked), cache) as teacher:
        teacher.chat(prompts[0], max_tokens=99)
    assert [r["reply"] for r in common.read_jsonl(cache)][-2:] == ["whole", "reply to q0"]


# --- Remap (Eq. 10) -------------------------------------------------------------------------------

def test_remap_on_a_hand_built_three_item_catalog():
    catalog = common.Catalog([{"title": "A", "year": 2000}, {"title": "B", "year": 2001},
                              {"title": "C", "year": 2002}])
    e_cat = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # X is not in the catalog; 'b (2002)' is B within 2 years
    teacher_list = [("X", 1990), ("b", 2002)]
    idx = [catalog.find(*it) for it in teacher_list]
    assert idx == [None, 1]
    e_items = np.array([[0.8, 0.6], e_cat[1]])
    s_ctx = e_cat @ np.array([1.0, 0.0])  # the conversation's embedding is [1, 0]
    p, sim, links = sft.rank_weights(2), e_items @ e_cat.T, sft.identity_links(idx, 3)
    s = sft.remap_scores(p, sim, links, s_ctx, lam=1.0)
    # by hand: p = [1, 1/sqrt 2]; S = [[.8, .6, .96], [0, 1, .8]]; I = [[0, 0, 0], [0, 1, 0]];
    # s_ctx = [1, 0, .6]
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(s, [0.8 + 1.0, 0.6 + 2 * r + 0.0, 0.96 + 0.8 * r + 0.6])
    assert sft.top_n(s, 3, np.zeros(3, bool)) == [2, 1, 0]
    # a seen item is never recommended
    assert sft.top_n(s, 2, np.array([False, False, True])) == [1, 0]
    s_no_ctx = sft.remap_scores(p, sim, links, s_ctx, lam=0)
    np.testing.assert_allclose(s - s_no_ctx, s_ctx)


def test_no_remap_keeps_the_in_catalog_teacher_items_in_order_then_pads_by_context():
    s = sft.raw_list_scores([2, None, 0, 2], np.array([0.1, 0.9, 0.3, 0.5]))
    assert sft.top_n(s, 4, np.zeros(4, bool)) == [2, 0, 1, 3]


def test_distinct_items_keeps_the_first_of_repeats_and_skips_junk():
    reply = "Sure, here you go:\n1. Heat (1995)\nAlien (1979)\nheat (1995)\n\nAlien (1986)"
    assert sft.distinct_items(reply) == [("Heat", 1995), ("Alien", 1979), ("Alien", 1986)]


def test_conversation_text_strips_our_instruction_only():
    ours = common.task_prompt("OP: any heist movies?", 7)
    assert sft.conversation_text(ours, 7) == "OP: any heist movies?"
    foreign = [{"role": "user", "content": "Pretend you are a recommender. OP: heist movies?"}]
    assert sft.conversation_text(foreign, 7) == foreign[0]["content"]


def test_embedder_mean_pools_without_padding():
    emb = sft.Embedder("", torch.device("cpu"))
    alone = emb.encode(["Heat (1995). Genres: crime, thriller."])
    padded = emb.encode(["Heat (1995). Genres: crime, thriller.", "A much longer text " * 20])
    np.testing.assert_allclose(alone[0], padded[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(padded, axis=1), 1.0, atol=1e-5)
    assert emb.encode([]).shape == (0, padded.shape[1])


# --- Reflect (Eq. 11) -----------------------------------------------------------------------------

CANDIDATES = [("Heat", 1995), ("Alien", 1979),
              ("Birdman or (The Unexpected Virtue of Ignorance)", 2014), ("Up", 2009),
              ("Jaws", 1975)]


def test_reflect_parses_a_messy_reply():
    reply = ("Sure! Here are my ratings:\n"
             "1. Heat (1995): 2\n"
             "- **Alien (1979)** \u2014 -1\n"
             "Birdman or (The Unexpected Virtue of Ignorance) (2014) => great\n"
             "The Matrix (1999): 2\n"  # not a candidate: ignored
             "UP (2010) - bad\n"  # case and a year off by one still find the candidate
             "Heat (1995): -2\n"  # a second rating of Heat: the first counts
             "Jaws (1975)")  # no rating: 0
    np.testing.assert_array_equal(sft.parse_ratings(reply, CANDIDATES), [2, -1, 2, -2, 0])
    np.testing.assert_array_equal(sft.parse_ratings("I cannot rate movies.", CANDIDATES), [0] * 5)


@pytest.mark.parametrize("rest, rating", [
    (": 2", 2), (" - 2", 2), (" -2", -2), (" \u2014 -1", -1), (" => 1", 1), (": +1", 1),
    ("=-2", -2), (" | 0", 0), (": 2 (great)", 2), (" (good)", 1), (": not good", -1),
    (": Great!", 2), (": normal", 0), (" bad", -2), (": 5", None), (": 1.5", None), ("", None),
    (": hmm", None),
])
def test_parse_rating(rest, rating):
    assert sft.parse_rating(rest) == rating


def test_reflect_adds_gamma_times_the_rating_to_the_candidates_only():
    s = sft.reflect_scores(np.array([1.0, 2.0, 3.0, 4.0]), [3, 1], np.array([2.0, -1.0]), gamma=0.5)
    np.testing.assert_allclose(s, [1.0, 1.5, 3.0, 5.0])


# --- Adjust (Eq. 12-13) ---------------------------------------------------------------------------

def test_adjust_loss_by_hand():
    s = torch.tensor([[0.0, math.log(2), 0.0]], dtype=torch.float64)
    y = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    ones, zeros = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    # softmax = 1/4 1/2 1/4
    assert sft.adjust_loss(ones, zeros, s, y, 0.01).item() == pytest.approx(math.log(2))
    # w = 2: softmax of [0, 2 ln 2, 0] = [1, 4, 1] / 6; the penalty is 0.01 * 3 * (2 - 1)^2
    expected = -math.log(4 / 6) + 0.03
    assert sft.adjust_loss(2 * ones, zeros, s, y, 0.01).item() == pytest.approx(expected)


def popularity_world(seed=0, rows=40, items=8):
    """Scores that know nothing, and ground truth that is mostly item 0 (a popular item)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, items, generator=g, dtype=torch.float64)
    y = torch.zeros(rows, items, dtype=torch.float64)
    for i in range(rows):
        y[i, 0 if i % 4 else 1 + i % (items - 1)] = 1
    return s, y


def test_adjust_lowers_the_loss_and_learns_popularity():
    s, y = popularity_world()
    ones, zeros = torch.ones(s.shape[1], dtype=s.dtype), torch.zeros(s.shape[1], dtype=s.dtype)
    w, b = sft.fit_adjust(s, y, reg=0.01)
    assert sft.adjust_loss(w, b, s, y, 0.01) < 0.8 * sft.adjust_loss(ones, zeros, s, y, 0.01)
    assert b[0] == b.max() and b[0] > 1  # the popular item is lifted
    assert ((w * s + b).argmax(1) == 0).float().mean() > (s.argmax(1) == 0).float().mean()


def test_adjust_with_strong_regularisation_keeps_w_near_one_and_b_near_zero():
    s, y = popularity_world()
    w, b = sft.fit_adjust(s, y, reg=1e4)
    assert (w - 1).abs().max() < 1e-2 and b.abs().max() < 1e-2
    w_weak, _ = sft.fit_adjust(s, y, reg=0.01)
    assert (w_weak - 1).abs().max() > 10 * (w - 1).abs().max()


# --- the whole script -----------------------------------------------------------------------------

def check_demonstrations(data, split, n):
    cat = common.Catalog.load(data / "catalog.jsonl")
    rows = common.read_rows(data / f"sft_{split}.jsonl", "", stage("03_sft").check_demonstration)
    source = {r["id"]: r for r in common.read_rows(data / f"{split}.jsonl", "")}
    for r in rows:
        assert {k: v for k, v in r.items() if k != "completion"} == source[r["id"]]
        lines = r["completion"][0]["content"].split("\n")
        items = [common.parse_line(line) for line in lines]
        assert len(lines) == n and None not in items
        assert all(cat.find(*it) is not None for it in items)
        assert len({cat.find(*it) for it in items}) == n
        seen = {common.norm_title(t) for t in r["seen_titles"]}
        assert not seen & {common.norm_title(t) for t, _ in items}
    return rows


def test_smoke_run_with_the_tiny_model_as_local_teacher(data):
    report = sft.main(run_args(data, "--limit", "3", "--val-limit", "3", "--reg", "0.01"))
    n = common.data_n(data)
    for split in ("train", "val"):
        rows = check_demonstrations(data, split, n)
        assert len({common.conversation_id(r) for r in rows}) == 3
        assert list(report["steps"][split]) == ["raw", "remap", "reflect", "adjust"]
    assert report["teacher_replies_requested"] == 12  # 6 lists, 6 ratings
    assert report["adjust"]["loss_after"] < report["adjust"]["loss_before"]
    assert json.loads((data / "sft_report.json").read_text())["steps"] == report["steps"]
    ablated = sft.main(run_args(data, "--limit", "3", "--val-limit", "3", "--no-remap",
                                "--no-reflect", "--no-adjust"))
    assert ablated["teacher_replies_requested"] == 0  # the lists come from the cache
    assert list(ablated["steps"]["val"]) == ["raw", "raw+pad"]
    check_demonstrations(data, "val", n)


def test_extra_demonstrations_come_from_train_conversations_the_teacher_never_saw(data):
    report = sft.main(run_args(data, "--limit", "2", "--val-limit", "2", "--reg", "0.01",
                               "--extra-demos", "3"))
    assert report["teacher_replies_requested"] == 8  # 4 lists, 4 ratings: the extras ask nothing
    train = check_demonstrations(data, "train", common.data_n(data))
    assert len({common.conversation_id(r) for r in train}) == 2 + 3
    val = check_demonstrations(data, "val", common.data_n(data))
    assert len({common.conversation_id(r) for r in val}) == 2
    total = len({common.conversation_id(r) for r in common.read_jsonl(data / "train.jsonl")})
    sft.main(run_args(data, "--limit", "2", "--val-limit", "2", "--reg", "0.01",
                      "--extra-demos", "-1"))
    train = check_demonstrations(data, "train", common.data_n(data))
    assert len({common.conversation_id(r) for r in train}) == total


def test_metadata_is_written_by_the_teacher_for_every_item_and_embedded(data, monkeypatch):
    embedded, encode = [], sft.Embedder.encode
    monkeypatch.setattr(sft.Embedder, "encode",
                        lambda self, texts, **kw: embedded.extend(texts) or encode(self, texts, **kw))

    def reply(body):
        if body["messages"][0]["content"].startswith("Describe the movie"):
            return "Keywords: heist, crew\nPlot: A crew plans one last job."
        return "Heat (1995)\nNot A Real Movie (2001)"  # one catalog item, one outside it
    with StubServer(reply) as server:
        report = sft.main(run_args(data, "--teacher", server.url, "--metadata", "--no-reflect"))
    described = [r["body"]["messages"][0]["content"] for r in server.requests
                 if r["body"]["messages"][0]["content"].startswith("Describe the movie")]
    n_catalog = len(common.Catalog.load(data / "catalog.jsonl"))
    assert len(described) == n_catalog + 1
    assert any("Not A Real Movie (2001)" in d for d in described)
    # 4 lists, then the descriptions
    assert report["teacher_replies_requested"] == 4 + n_catalog + 1
    # the item texts embedded are the teacher's descriptions
    assert "Heat (1995). Keywords: heist, crew\nPlot: A crew plans one last job." in embedded
    check_demonstrations(data, "val", common.data_n(data))


def test_adjust_needs_the_train_split(data):
    with pytest.raises(common.DataError, match="train"):
        sft.main(run_args(data, "--split", "val"))
