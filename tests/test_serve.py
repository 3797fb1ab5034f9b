"""`tinylm serve` against the official `openai` client and plain HTTP, on a live server on a free loopback port:
completions, streams, n, stop, seeds, log-probabilities, errors, continuous batching, disconnects, fuzzed bodies,
SIGTERM."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from live_server import live_server, scaled_run
from tinylm.cli import main
from tinylm.infer.engine import generate_text
from tinylm.infer.openai_api import Limits
from tinylm.runs.loading import load_model

KEY = "test-key"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {"story": scaled_run(root / "story", scale=5.0),
            "mixer": scaled_run(root / "mixer", "micromixer-100k", ("model.vocab_size=258",), scale=2.0)}


@pytest.fixture(scope="module")
def server(runs):
    with live_server([runs["story"], runs["mixer"]], api_key=KEY) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def alone(run: Path, prompt: str, seed: int | None = None, stop=(), **settings) -> str:
    """What the engine writes for one prompt, without the server."""
    model, recipe, tokenizer = load_model(run)
    from tinylm.data.shards import frame_prefix
    sampling = recipe.sample.settings.with_changes(**settings)
    return generate_text(model, tokenizer, [prompt], sampling, prefix=frame_prefix(tokenizer, recipe.data.framing),
                         stop=stop, seed=seed)[0]


def test_models_completion_stream_and_n(client, runs):
    assert [m.id for m in client.models.list().data] == ["story", "mixer"]
    done = client.completions.create(model="story", prompt=PROMPT, max_tokens=24, temperature=0.8, seed=5)
    assert done.object == "text_completion" and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 24 and done.usage.prompt_tokens == 1 + len(PROMPT)  # BOS + bytes
    assert done.choices[0].text == alone(runs["story"], PROMPT, seed=5, max_new_tokens=24, temperature=0.8)
    chunks = list(client.completions.create(model="story", prompt=PROMPT, max_tokens=24, temperature=0.8, seed=5,
                                            stream=True))
    assert len(chunks) >= 24 and "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    many = client.completions.create(model="mixer", prompt=[PROMPT, "The dog"], max_tokens=10, n=3, temperature=1.0,
                                     seed=11)
    assert [c.index for c in many.choices] == list(range(6))
    assert len({c.text for c in many.choices}) == 6 and many.usage.completion_tokens == 60
    assert many.choices[4].text == alone(runs["mixer"], "The dog", seed=11 + 4, max_new_tokens=10, temperature=1.0)


def test_greedy_through_the_server_equals_tinylm_sample(client, runs, capsys):
    for name in ("story", "mixer"):
        text = client.completions.create(model=name, prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
        assert main(["sample", str(runs[name]), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens",
                     "30"]) == 0
        assert capsys.readouterr().out == PROMPT + text + "\n"
        assert len(set(text)) > 3


def test_stop_and_seed(client, runs):
    def complete(**options):
        return client.completions.create(model="story", prompt=PROMPT, max_tokens=40, **options).choices[0]

    full = complete(temperature=0).text
    stop = full[12:15]
    cut = complete(temperature=0, stop=["zzzz", stop])
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"
    first = complete(temperature=1.0, seed=123)
    assert complete(temperature=1.0, seed=123).text == first.text
    assert complete(temperature=1.0, seed=124).text != first.text
    # tinylm's own settings ride in the body
    own = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3}
    varied = client.completions.create(model="story", prompt=PROMPT, max_tokens=20, seed=3, extra_body=own)
    assert varied.choices[0].text == alone(runs["story"], PROMPT, seed=3, max_new_tokens=20, **own)


def test_logprobs_are_the_models(client, runs):
    done = client.completions.create(model="story", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3)
    logprobs = done.choices[0].logprobs
    assert len(logprobs.tokens) == 12 and "".join(logprobs.tokens) == done.choices[0].text
    model, _, tokenizer = load_model(runs["story"])
    ids = [tokenizer.bos_id] + tokenizer.encode(PROMPT)
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        with torch.no_grad():  # greedy by full forward passes, no cache: the reference
            expected = model(torch.tensor([ids]))[0][0, -1].log_softmax(-1)
        assert len(top) == 3 and max(top.values()) == pytest.approx(chosen, abs=1e-6)  # greedy takes the top one
        assert chosen == pytest.approx(expected.max().item(), abs=1e-4)
        assert sorted(top.values()) == pytest.approx(expected.topk(3).values.tolist()[::-1], abs=1e-4)
        ids.append(int(expected.argmax()))
    echoed = client.completions.create(model="story", prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                       logprobs=1)
    assert echoed.choices[0].text == PROMPT + done.choices[0].text[:3]
    assert echoed.choices[0].logprobs.tokens[:len(PROMPT)] == list(PROMPT)  # byte tokens, BOS left out
    assert echoed.choices[0].logprobs.token_logprobs[:len(PROMPT)] == [None] * len(PROMPT)
    nothing = client.completions.create(model="story", prompt=PROMPT, max_tokens=0)
    assert nothing.choices[0].text == "" and nothing.usage.completion_tokens == 0


def test_errors_in_the_openai_format(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="story", prompt=PROMPT, top_p=7)
    assert bad.value.body["param"] == "top_p" and "top_p" in bad.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="story", prompt=PROMPT, temperature="hot")
    with pytest.raises(openai.BadRequestError, match="context holds 256"):
        client.completions.create(model="story", prompt="x" * 300)
    with pytest.raises(openai.BadRequestError, match="unrecognized request argument supplied: colour"):
        client.completions.create(model="story", prompt=PROMPT, extra_body={"colour": "blue"})
    with pytest.raises(openai.BadRequestError, match="not chat models"):
        client.chat.completions.create(model="story", messages=[{"role": "user", "content": "hi"}])
    wrong = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="story", prompt=PROMPT)
    assert httpx.get(server + "/v1/models").status_code == 401  # no key at all
    assert httpx.get(server + "/health").json()["status"] == "ok"  # the health check and the page need none
    big = httpx.post(server + "/v1/completions", content=b"{" + b" " * (2 << 20) + b"}",
                     headers={"Authorization": f"Bearer {KEY}"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    # max_tokens beyond the context is clipped to it
    clipped = client.completions.create(model="mixer", prompt=PROMPT, max_tokens=10_000, temperature=0)
    assert clipped.usage.completion_tokens + clipped.usage.prompt_tokens <= 256


def test_a_short_request_finishes_while_a_long_one_streams(client):
    events = []

    def long_stream():
        for chunk in client.completions.create(model="story", prompt=PROMPT, max_tokens=200, temperature=0.0,
                                               stream=True):
            events.append(("long", chunk.choices[0].finish_reason))

    thread = threading.Thread(target=long_stream)
    thread.start()
    deadline = time.monotonic() + 30
    while not events and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events, "the long stream never started"
    short = client.completions.create(model="story", prompt="Hi", max_tokens=5, temperature=0)
    events.append(("short", short.choices[0].finish_reason))
    thread.join(60)
    finished = [i for i, (who, reason) in enumerate(events) if reason is not None]
    assert [events[i][0] for i in finished] == ["short", "long"]
    assert sum(who == "long" for who, _ in events[finished[0]:]) > 1  # the long one went on after the short ended


def test_32_concurrent_requests_get_what_they_get_alone(client, runs):
    rng = random.Random(0)
    requests = [dict(model=rng.choice(["story", "mixer"]), prompt=rng.choice([PROMPT, "The dog", "A", "Lily and Ben"]),
                     max_tokens=rng.randint(1, 24), temperature=rng.choice([0.0, 0.5, 1.0, 1.3]), seed=i,
                     top_p=rng.choice([1.0, 0.9]), extra_body={"top_k": rng.choice([0, 20]),
                                                              "repetition_penalty": rng.choice([1.0, 1.2])})
                for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(lambda r: client.completions.create(**r).choices[0].text, requests))
    for request, text in zip(requests, texts, strict=True):
        extra = request["extra_body"]
        assert text == alone(runs[request["model"]], request["prompt"], seed=request["seed"],
                             max_new_tokens=request["max_tokens"], temperature=request["temperature"],
                             top_p=request["top_p"], **extra), request


def _busy(server: str) -> int:
    return httpx.get(server + "/health").json()["busy"]["story"]


def test_a_disconnect_frees_the_row(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "story", "prompt": PROMPT, "max_tokens": 250, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers=headers, timeout=30) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert _busy(server) == 1
    deadline = time.monotonic() + 10
    while _busy(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _busy(server) == 0


def test_fuzzed_bodies_give_no_500(server, client):
    rng = random.Random(1)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    values = [None, True, False, 0, 1, -1, 3, 2**70, -2**70, 0.5, 1e308, -1e-9, "", "a", "x" * 50, [], ["a"],
              [1, 2], ["a", 3], {}, {"include_usage": True}, "story", "mixer", float("nan")]
    keys = ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "logprobs",
            "echo", "top_k", "min_p", "repetition_penalty", "best_of", "suffix", "stream_options", "bogus"]
    statuses = set()
    with httpx.Client(base_url=server, headers=headers, timeout=60) as http:
        for i in range(500):
            if i % 10 == 0:  # raw bytes: broken JSON, wrong types at the top
                content = rng.choice([b"", b"{", b"[1,2]", b"null", b"\xff\xfe", b'{"model": "story"', b"1e999",
                                      b"[" * 5000 + b"]" * 5000])
            else:
                body = {"model": rng.choice(["story", "mixer", "nope"]), "max_tokens": rng.randint(0, 8)}
                for key in rng.sample(keys, rng.randint(1, 6)):
                    body[key] = rng.choice(values)
                if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
                    body["max_tokens"] = min(body["max_tokens"], 8)
                content = json.dumps(body).encode()
            response = http.post("/v1/completions", content=content)
            statuses.add(response.status_code)
            assert response.status_code < 500, (content[:300], response.text[:300])
            if response.status_code != 200:
                assert response.json()["error"]["message"]
    assert {200, 400, 404} <= statuses
    assert httpx.get(server + "/health").json()["busy"] == {"story": 0, "mixer": 0}
    assert client.completions.create(model="story", prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3


def test_a_full_queue_answers_429(runs):
    with live_server([runs["story"]], limits=Limits(max_batch=1, max_queue=1)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        first = client.completions.create(model="story", prompt=PROMPT, max_tokens=250, temperature=0, stream=True)
        next(iter(first))  # it holds the batch's one row
        second = client.completions.create(model="story", prompt=PROMPT, max_tokens=250, temperature=0, stream=True)
        deadline = time.monotonic() + 10
        while not httpx.get(url + "/health").json()["busy"]["story"] and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(openai.RateLimitError) as full:
            client.completions.create(model="story", prompt=PROMPT, max_tokens=5)
        assert full.value.response.headers["retry-after"] == "1"
        first.close()
        second.close()


def test_sigterm_ends_streams_and_exits_0(runs, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    server = subprocess.Popen([sys.executable, "-m", "tinylm.cli", "serve", str(runs["story"]), "--port", "0"],
                              env=env, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in server.stderr:  # uvicorn names the port it bound
            if "Uvicorn running on" in line:
                port = int(line.rsplit(":", 1)[1].split()[0])
                break
        assert port is not None
        body = {"model": "story", "prompt": PROMPT, "max_tokens": 250, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data:")
            server.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # the stream ended cleanly
        assert server.wait(30) == 0
    finally:
        server.kill()
        server.wait()
