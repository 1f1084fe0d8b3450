"""scripts/serve.py through the real OpenAI client over loopback:
completions (plain, streamed, echoed with logprobs as lm-evaluation-
harness's local-completions model reads them), chat with the tokenizer's
template, 64 concurrent requests each answered as if alone, bad requests
refused with OpenAI's error body, a client that leaves frees its slot, and
SIGTERM finishes what is in flight and refuses the rest."""
import asyncio
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import httpx2 as httpx  # The HTTP client the openai package uses.
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from flax import nnx

from conftest import BASE_XLA_FLAGS, REPO, assert_reordered, init_run
from lm import sample
from lm.data import tokenizer as tok_lib
from lm.run import restore

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
          "{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MAX_LEN = 128
LIMIT = 48  # --max_tokens_limit
# Slots fewer than the concurrent requests (a queue), chunks shorter than
# most prompts (several prefill steps each).
SERVE_ARGS = ["--port=0", "--slots=4", "--prefill_chunk=8",
              "--prefill_batch=2"]
# The tests that race a request against the client or a signal need one
# that outlasts any stall of a loaded machine: the tiny model decodes 48
# tokens in ~40 ms, but with a 4,096-token cache each token takes ~4.5 ms
# on a 2-core AMD EPYC (CI once lost the 40 ms race).
LONG_LEN = 4096


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A random-initialized LM whose tokenizer (bytes, as a Hugging Face
  tokenizer.json) has a chat template beside it."""
  tmp = tmp_path_factory.mktemp("serve")
  workdir = init_run(tmp, max_len=MAX_LEN)
  folder = tok_lib.write_hf_files(tok_lib.ByteTokenizer(), tmp / "tok")
  hf_config = json.loads((folder / "tokenizer_config.json").read_text())
  (folder / "tokenizer_config.json").write_text(
      json.dumps({**hf_config, "chat_template": CHATML}))
  config = json.loads((workdir / "config.json").read_text())
  config["data"]["tokenizer"] = str(folder / "tokenizer.json")
  (workdir / "config.json").write_text(json.dumps(config))
  return workdir


def _start(workdir, log_path, limit=LIMIT):
  """(process, base url): scripts/serve.py once its startup line is out."""
  log = open(log_path, "w")
  proc = subprocess.Popen(
      [sys.executable, "scripts/serve.py", f"--workdir={workdir}",
       *SERVE_ARGS, f"--max_tokens_limit={limit}"], cwd=REPO,
      stdout=subprocess.PIPE, stderr=log, text=True,
      env=dict(os.environ, XLA_FLAGS=BASE_XLA_FLAGS))
  line = proc.stdout.readline()
  if not line.startswith("serving"):
    proc.kill()
    raise AssertionError(line + open(log_path).read()[-3000:])
  port = re.search(r":(\d+)/v1", line)[1]
  return proc, f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
  """The tiny random LM with a LONG_LEN context: slow to decode to its end."""
  return init_run(tmp_path_factory.mktemp("long"), max_len=LONG_LEN)


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
  proc, url = _start(run, tmp_path_factory.mktemp("log") / "serve.log")
  yield url
  proc.terminate()
  proc.wait(timeout=60)


@pytest.fixture(scope="module")
def reference(run):
  """The model in this process: (tokenizer, greedy generate(ids, n) as
  scripts/generate.py runs it, full-forward logits(ids))."""
  loaded = restore.load(run, "1,1,1")
  tok = tok_lib.get(loaded.config.data.tokenizer)
  with jax.set_mesh(loaded.setup.mesh):
    model = nnx.merge(loaded.setup.graphdef, loaded.params)

  @functools.lru_cache(maxsize=None)
  def compiled(n):
    return jax.jit(functools.partial(
        sample.generate, loaded.setup.graphdef, max_new_tokens=n,
        temperature=0.0))

  def generate(ids, n):
    with jax.set_mesh(loaded.setup.mesh):
      out = compiled(n)(loaded.params, jnp.asarray(ids, jnp.int32)[None],
                        jax.random.key(0))
    out = [int(t) for t in out[0]]
    # The server ends a choice at the end-of-text token, unemitted.
    return out[:out.index(tok.eos_id)] if tok.eos_id in out else out

  def logits(ids):
    with jax.set_mesh(loaded.setup.mesh):
      return np.asarray(model(jnp.asarray(ids, jnp.int32)[None])[0][0])
  return types.SimpleNamespace(tok=tok, generate=generate, logits=logits,
                               d_model=loaded.config.model.d_model)


def _client(url):
  return openai.OpenAI(base_url=url, api_key="unused", max_retries=0)


def test_completions_equal_generate_streamed_or_not(server, reference):
  client = _client(server)
  assert [m.id for m in client.models.list().data] == ["init"]
  for prompt in ("ROMEO.", "To be, or not to be, that is the question"):
    want = reference.tok.decode(reference.generate(
        reference.tok.encode(prompt), 20))
    got = client.completions.create(model="init", prompt=prompt,
                                    max_tokens=20, temperature=0)
    assert got.choices[0].text == want
    assert got.usage.prompt_tokens == len(reference.tok.encode(prompt))
    streamed = client.completions.create(model="init", prompt=prompt,
                                         max_tokens=20, temperature=0,
                                         stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
  # A stop string ends the choice before it.
  text = client.completions.create(model="init", prompt="ROMEO.", max_tokens=20,
                                   temperature=0).choices[0].text
  stop = text[5:7]
  cut = client.completions.create(model="init", prompt="ROMEO.", max_tokens=20,
                                  temperature=0, stop=[stop])
  assert cut.choices[0].text == text[:text.find(stop)]
  assert cut.choices[0].finish_reason == "stop"


def test_echoed_logprobs_read_by_lm_eval_equal_the_model(server, reference):
  """lm-evaluation-harness's local-completions payload and parser: the
  log-likelihood of a continuation and whether it is greedy."""
  from lm_eval.models.openai_completions import (  # noqa: PLC0415
      LocalCompletionsAPI)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 256, n).tolist() for n in (5, 17)]
  ctxlens = [2, 9]
  payload = LocalCompletionsAPI._create_payload(
      types.SimpleNamespace(model="init"), prompts, generate=False)
  response = httpx.post(f"{server}/completions", json=payload, timeout=60)
  assert response.status_code == 200, response.text
  out = response.json()
  parsed = LocalCompletionsAPI.parse_logprobs(out, prompts, ctxlens)
  for prompt, ctxlen, (loglik, greedy), choice in zip(
      prompts, ctxlens, parsed, out["choices"]):
    logits = reference.logits(prompt)
    lp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    want = np.array([lp[i - 1, prompt[i]] for i in range(1, len(prompt))])
    got = np.array(choice["logprobs"]["token_logprobs"][1:len(prompt)],
                   np.float32)
    assert choice["logprobs"]["token_logprobs"][0] is None
    # Another program's float32 sums (over d_model, then the vocabulary).
    assert_reordered(got, want, reduction=reference.d_model)
    assert_reordered(np.float32(loglik), want[ctxlen - 1:].sum(),
                     reduction=reference.d_model * len(prompt))
    argmax = np.argmax(logits[:-1], axis=-1)
    assert greedy == all(argmax[i - 1] == prompt[i]
                         for i in range(ctxlen, len(prompt)))
  assert out["usage"]["completion_tokens"] == 2  # max_tokens=1 each.


def test_64_concurrent_requests_each_answered_as_alone(server):
  """Greedy and seeded sampled requests, all at once through 4 slots: each
  answer equals the same request sent alone, none lost or swapped."""
  client = openai.AsyncOpenAI(base_url=server, api_key="unused",
                              max_retries=0, timeout=120)
  rng = np.random.default_rng(1)
  words = "love death crown night sword tears ghost king".split()
  requests = [dict(model="init", prompt=f"{i}: " + " ".join(rng.choice(words, 1 + i % 6)),
                   max_tokens=4 + i % 9, temperature=0.0 if i % 2 else 0.9,
                   seed=i) for i in range(64)]

  async def ask(r):
    return (await client.completions.create(**r)).choices[0]

  async def main():
    together = await asyncio.gather(*(ask(r) for r in requests))
    alone = [await ask(r) for r in requests]
    await client.close()
    return together, alone
  together, alone = asyncio.run(main())
  assert [c.text for c in together] == [c.text for c in alone]
  assert all(c.finish_reason in ("length", "stop") for c in together)
  # Sampled answers differ from greedy ones somewhere (seeds are used).
  assert len({c.text for c in together}) > 32


def test_chat_renders_the_tokenizers_template(server, reference):
  client = _client(server)
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Who?"}]
  rendered = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
              "Who?<|im_end|>\n<|im_start|>assistant\n")
  got = client.chat.completions.create(model="init", messages=messages, max_tokens=12,
                                       temperature=0, logprobs=True,
                                       top_logprobs=2)
  assert got.usage.prompt_tokens == len(reference.tok.encode(rendered))
  text = reference.tok.decode(reference.generate(
      reference.tok.encode(rendered), 12))
  assert got.choices[0].message.content == text
  assert len(got.choices[0].logprobs.content) == got.usage.completion_tokens
  assert all(len(t.top_logprobs) == 2 for t in got.choices[0].logprobs.content)
  streamed = client.chat.completions.create(model="init", messages=messages, max_tokens=12,
                                            temperature=0, stream=True)
  assert "".join(c.choices[0].delta.content or "" for c in streamed
                 if c.choices) == text


BAD = [
    ("{not json", "", 400),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens", 400),
    ({"prompt": "x", "temperature": [1]}, "temperature", 400),
    ({"prompt": "x" * MAX_LEN}, "prompt", 400),
    ({"prompt": "x" * 100, "max_tokens": 30}, "max_tokens", 400),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", 400),
    ({"prompt": "x", "max_tokens": -3}, "max_tokens", 400),
    ({"prompt": "x", "max_tokens": LIMIT + 1}, "max_tokens", 400),
    ({"prompt": "x", "temperature": -0.5}, "temperature", 400),
    ({"prompt": ""}, "prompt", 400),
    ({"prompt": []}, "prompt", 400),
    ({"prompt": [300]}, "prompt", 400),
    ({"prompt": "x", "max_tokenz": 3}, "max_tokenz", 400),
    ({"prompt": "x", "n": 2}, "n", 400),
    ({"prompt": "x", "logprobs": 9}, "logprobs", 400),
    ({"prompt": "x", "model": "gpt-4"}, "model", 404),
    ({}, "prompt", 400),
]


@pytest.mark.parametrize("body,param,status", BAD)
def test_a_bad_request_gets_an_openai_error(server, body, param, status):
  raw = body if isinstance(body, str) else json.dumps(body)
  response = httpx.post(f"{server}/completions", content=raw, timeout=30)
  assert response.status_code == status, response.text
  error = response.json()["error"]
  assert error["message"] and error["type"]
  assert (error["param"] or "") == param, error


def test_bad_chat_requests_and_the_server_stays_up(server):
  for body in ({"messages": []},
               {"messages": [{"role": "wizard", "content": "hi"}]},
               {"messages": [{"role": "user"}]}):
    response = httpx.post(f"{server}/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith("messages")
  assert httpx.get(f"{server.removesuffix('/v1')}/health").json()[
      "status"] == "ok"
  assert _client(server).completions.create(
      model="init", prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_a_client_that_leaves_frees_its_slot(long_run, tmp_path):
  proc, url = _start(long_run, tmp_path / "serve.log", limit=LONG_LEN)
  try:
    health = f"{url.removesuffix('/v1')}/health"
    with httpx.stream("POST", f"{url}/completions", timeout=60, json=dict(
        prompt="x", max_tokens=LONG_LEN - 8, temperature=0, stream=True)) as r:
      lines = r.iter_lines()
      assert next(lines).startswith("data: ")
    # Gone after one chunk: the request ends as aborted, not at its length,
    # and its slot frees at the next step, long before the ~18 s its
    # 4,088 tokens would take (so a server that forgets to cancel fails).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
      now = httpx.get(health).json()
      if now["busy"] == 0 and now["finished"] == {"abort": 1}:
        break
      time.sleep(0.1)
    assert now["busy"] == 0 and now["finished"] == {"abort": 1}, now
  finally:
    proc.kill()


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(
    long_run, tmp_path):
  proc, url = _start(long_run, tmp_path / "serve.log", limit=LONG_LEN)
  try:
    chunks = []
    # ~2 s of decoding: still in flight when the signal lands.
    with httpx.stream("POST", f"{url}/completions", timeout=60, json=dict(
        prompt="x", max_tokens=400, temperature=0, stream=True)) as r:
      lines = r.iter_lines()
      chunks.append(next(lines))
      proc.send_signal(signal.SIGTERM)
      # The server says what it is finishing: this request, in flight.
      assert re.match(r"SIGTERM: finishing [1-9]\d* requests? in flight",
                      proc.stdout.readline())
      time.sleep(0.5)  # Let the signal land before the next request.
      try:
        late = httpx.post(f"{url}/completions", json=dict(prompt="x"),
                          timeout=10)
        refused = late.status_code == 503
      except httpx.ConnectError:
        refused = True
      assert refused
      chunks += [line for line in lines if line]
    events = [json.loads(c[len("data: "):]) for c in chunks
              if c != "data: [DONE]"]
    assert chunks[-1] == "data: [DONE]"
    assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert proc.wait(timeout=60) == 0
    assert "stopped after" in proc.stdout.read()
  finally:
    if proc.poll() is None:
      proc.kill()


def test_stop_strings_are_cut_whole_across_incomplete_characters():
  """Released text + the rest == the full text cut before its first stop
  string, byte by byte through multi-byte characters (a held-back
  incomplete character must not count as the stop's held prefix)."""
  from lm.serve import api  # noqa: PLC0415
  tok = tok_lib.ByteTokenizer()
  rng = np.random.default_rng(0)
  alphabet = list("ab é€😀\n")
  for _ in range(500):
    text = "".join(rng.choice(alphabet, rng.integers(1, 12)))
    stops = tuple({"".join(rng.choice(alphabet, rng.integers(1, 3)))
                   for _ in range(rng.integers(0, 3))})
    detok = api._Detokenizer(tok, tok.encode("x"), stops)
    out, stopped = "", False
    for t in tok.encode(text):
      piece, stopped = detok.add(int(t))
      out += piece
      if stopped:
        break
    if not stopped:
      out += detok.flush()
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    assert (out, stopped) == ((text[:cut], True) if cut >= 0
                              else (text, False)), (text, stops)


def test_a_top_k_past_int32_leaves_the_engine_running(server):
  """The engine packs each row's top_k into an int32 array: a larger one
  raised OverflowError in its thread, and every later request came back
  empty with finish_reason "abort" while /health said ok."""
  for _ in range(2):
    response = httpx.post(f"{server}/completions", timeout=60, json=dict(
        prompt="x", max_tokens=2, top_k=2**40))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in (
        "length", "stop")
  assert httpx.get(f"{server.removesuffix('/v1')}/health").json()[
      "status"] == "ok"
