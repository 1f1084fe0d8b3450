"""Supervised fine-tuning data: JSON Lines records -> packed, masked batches.

A record (one JSON object per line) is either

  {"prompt": "...", "response": "..."}
      rendered as config.data.sft.template.format(prompt=...), then the
      response, then EOS; the loss is on the response and EOS.
  {"messages": [{"role": "user", "content": "..."}, ...]}
      each message as config.data.sft.message_template.format(role=...,
      content=...), then EOS; the loss is on the assistant messages and
      EOS. With config.data.sft.chat_template=tokenizer the tokenizer's own
      chat template renders them (Hugging Face's Jinja format, read from
      tokenizer_config.json or chat_template.jinja beside
      config.data.tokenizer), and an assistant message's trained span is
      what rendering it adds to the conversation before it (with the
      generation prompt), as transformers' assistant masks are.

Each piece is tokenized on its own, so the prompt's tokens are exactly
those a prompt encoded at inference gets. A record longer than the window
(seq_len + 1 tokens) is truncated to it, or dropped
(config.data.sft.too_long); the count is printed, never silent, and a record
left with no trained token is dropped and counted too. A malformed line is
an error naming the file and the line.

`shakespeare_dialogue` is a set built offline from the plays: the prompt is
a speech with its speaker's name and the next speaker's name, the response
that next speech (train: the train split's plays; eval: the validation
split's).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import grain
import jax
import ml_collections
import numpy as np

from lm import checks
from lm.data import packing, pipeline, sources, tokenizer as tokenizer_lib

KEY = "config.data.sft"
BUILT_IN = ("shakespeare_dialogue",)
TOO_LONG = ("truncate", "drop")
CHAT_TEMPLATES = ("config", "tokenizer")


def check(config, model_cfg) -> None:
  """config.data of an SFT run, before anything is read or compiled."""
  data, sft = config.data, config.data.sft
  checks.require(data.packing == "segments",
                 f"config.task=sft packs records into windows with segment "
                 f"ids; set --config.data.packing=segments (it is "
                 f"{data.packing!r}).")
  checks.one_of(sft.too_long, TOO_LONG, f"{KEY}.too_long")
  checks.one_of(sft.chat_template, CHAT_TEMPLATES, f"{KEY}.chat_template")
  pipeline.check_tokens(data, model_cfg, pipeline.seq_len(config))
  for split in ("train", "eval"):
    spec = sft[split]
    checks.require(bool(spec), f"{KEY}.{split} is empty; name a JSON Lines "
                   f"file or one of {BUILT_IN}.")
    if spec not in BUILT_IN:
      path = Path(spec).expanduser()
      checks.require(path.is_file(), f"{KEY}.{split}={spec!r}: no such file;"
                     f" name a JSON Lines file or one of {BUILT_IN}.")
  if sft.chat_template == "tokenizer":
    chat_template(data.tokenizer)
  try:
    sft.template.format(prompt="")
    sft.message_template.format(role="", content="")
  except (KeyError, IndexError, ValueError) as e:
    raise checks.ConfigError(
        f"{KEY}.template / message_template must be Python format strings "
        "with only {prompt} (template) and {role}, {content} "
        f"(message_template): {e!r}") from None


# --- Reading and validating records ---------------------------------------


def read_records(path: Path) -> list[dict]:
  """The records of a JSON Lines file; a bad line is a DataError naming the
  file and the line."""
  records = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = json.loads(line)
      except ValueError as e:
        raise sources.DataError(f"{where}: not valid JSON ({e}); fix or "
                                "remove that line.") from None
      records.append(_validated(record, where))
  if not records:
    raise sources.DataError(f"{path} holds no records.")
  return records


def _validated(record, where: str) -> dict:
  fail = lambda why: sources.DataError(f"{where}: {why}")  # noqa: E731
  if not isinstance(record, dict):
    raise fail("a record must be a JSON object with \"prompt\" and "
               "\"response\", or \"messages\".")
  if "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in messages):
      raise fail("\"messages\" must be a list of {\"role\": str, "
                 "\"content\": str}.")
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
      raise fail("the record has no response: no non-empty assistant "
                 "message.")
    return {"messages": messages}
  if not isinstance(record.get("prompt"), str):
    raise fail("the record has no \"prompt\" string (nor \"messages\").")
  if not isinstance(record.get("response"), str) or not record["response"]:
    raise fail("the record has no response: \"response\" is missing or "
               "empty.")
  return {"prompt": record["prompt"], "response": record["response"]}


# --- Rendering ------------------------------------------------------------


def chat_template(tokenizer_spec: str) -> str:
  """The chat template beside a tokenizer file (chat_template.jinja, or
  tokenizer_config.json's "chat_template"), or a ConfigError."""
  where = f"{KEY}.chat_template=tokenizer"
  checks.require(tokenizer_spec != "byte",
                 f"{where}: the byte tokenizer has no chat template; use "
                 f"{KEY}.chat_template=config.")
  folder = Path(tokenizer_spec).expanduser().parent
  jinja = folder / "chat_template.jinja"
  if jinja.is_file():
    return jinja.read_text(encoding="utf-8")
  config_path = folder / "tokenizer_config.json"
  template = None
  if config_path.is_file():
    template = json.loads(config_path.read_text(encoding="utf-8")).get(
        "chat_template")
  if isinstance(template, list):  # Named templates: the default one.
    template = next((t.get("template") for t in template
                     if t.get("name") == "default"), None)
  checks.require(isinstance(template, str) and template,
                 f"{where}: no chat template beside config.data.tokenizer="
                 f"{tokenizer_spec!r} (neither chat_template.jinja nor a "
                 f"\"chat_template\" in tokenizer_config.json); use "
                 f"{KEY}.chat_template=config.")
  return template


class ChatTemplate:
  """A Hugging Face chat template, rendered as transformers renders it
  (sandboxed Jinja, trim_blocks and lstrip_blocks, raise_exception)."""

  def __init__(self, template: str, tok):
    import jinja2.sandbox  # noqa: PLC0415 (only SFT with it pays)
    from jinja2.ext import loopcontrols  # noqa: PLC0415

    def raise_exception(message):
      raise sources.DataError(f"the chat template refused a record: "
                              f"{message}")
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    self.template = env.from_string(template)
    names = getattr(tok, "tok", None)
    decode = (lambda i: names.id_to_token(i)) if names else (  # noqa: E731
        lambda i: tok.sp.id_to_piece(i))
    self.specials = {"eos_token": decode(tok.eos_id),
                     "bos_token": (decode(tok.bos_id)
                                   if tok.bos_id is not None else "")}

  def __call__(self, messages, add_generation_prompt=False) -> str:
    return self.template.render(messages=messages,
                                add_generation_prompt=add_generation_prompt,
                                **self.specials)


def spans(record: dict, sft_cfg, jinja=None) -> list[tuple[str, bool]]:
  """The record's text as (piece, trained) pairs, in order; EOS follows
  (appended by `tokenize`) unless a chat template renders its own end."""
  if "prompt" in record:
    return [(sft_cfg.template.format(prompt=record["prompt"]), False),
            (record["response"], True)]
  messages = record["messages"]
  if jinja is None:
    return [(sft_cfg.message_template.format(role=m["role"],
                                             content=m["content"]),
             m["role"] == "assistant") for m in messages]
  out, done = [], ""
  for i, m in enumerate(messages):
    if m["role"] == "assistant":
      before = jinja(messages[:i], add_generation_prompt=True)
      if before.startswith(done):
        out.append((before[len(done):], False))
        done = before
    upto = jinja(messages[:i + 1])
    if not upto.startswith(done):
      raise sources.DataError(
          "the tokenizer's chat template does not render a conversation "
          "as the rendering of its beginning plus more, so the assistant "
          f"messages cannot be told apart; use {KEY}.chat_template=config.")
    out.append((upto[len(done):], m["role"] == "assistant"))
    done = upto
  return out


def tokenize(pieces: list[tuple[str, bool]], tok, *, eos: bool
             ) -> tuple[np.ndarray, np.ndarray]:
  """(token ids, trained 0/1 per token) of the pieces, each encoded alone."""
  ids, trained = [], []
  for text, train in pieces:
    piece = tok.encode(text)
    ids.append(piece)
    trained.append(np.full(len(piece), train, np.float32))
  if eos:
    ids.append(np.array([tok.eos_id], np.int32))
    trained.append(np.ones(1, np.float32))
  return (np.concatenate(ids).astype(np.int32),
          np.concatenate(trained))


# --- Examples -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Examples(grain.sources.RandomAccessDataSource):
  """Tokenized records as packing examples: inputs = ids[:-1], targets =
  ids[1:], weights = trained[1:] (a target token is trained if it belongs
  to the response)."""
  ids: list
  trained: list

  def __len__(self) -> int:
    return len(self.ids)

  def __getitem__(self, i: int) -> dict:
    ids, trained = self.ids[int(i)], self.trained[int(i)]
    return {"inputs": ids[:-1], "targets": ids[1:], "weights": trained[1:]}


def examples(records: list[dict], config, tok, what: str
             ) -> tuple[Examples, str]:
  """(the records' examples, a one-line report of what was cut or
  dropped)."""
  sft_cfg = config.data.sft
  window = pipeline.seq_len(config) + 1
  jinja = (ChatTemplate(chat_template(config.data.tokenizer), tok)
           if sft_cfg.chat_template == "tokenizer" else None)
  ids_list, trained_list = [], []
  too_long = dropped = 0
  for record in records:
    ids, trained = tokenize(spans(record, sft_cfg, jinja), tok,
                            eos=jinja is None)
    if len(ids) > window:
      too_long += 1
      if sft_cfg.too_long == "drop":
        continue
      ids, trained = ids[:window], trained[:window]
    if not trained[1:].any():  # Nothing to learn from (a cut response).
      dropped += 1
      continue
    ids_list.append(ids)
    trained_list.append(trained)
  action = "dropped" if sft_cfg.too_long == "drop" else "truncated"
  report = (f"{what}: {len(ids_list):,} of {len(records):,} records used; "
            f"{too_long:,} longer than the {window}-token window were "
            f"{action} ({KEY}.too_long={sft_cfg.too_long})")
  if dropped:
    report += (f"; {dropped:,} dropped with no response token left inside "
               "the window")
  if not ids_list:
    raise sources.DataError(f"{report}: nothing left to train on; raise "
                            "config.data.seq_len (and model.max_len) or "
                            "shorten the records.")
  return Examples(ids_list, trained_list), report


def records_of(config, split: str) -> tuple[list[dict], str]:
  """(records, where they are from) of config.data.sft.<split>."""
  spec = config.data.sft[split]
  if spec in BUILT_IN:
    path = build_dialogue(config.data)[split]
  else:
    path = Path(spec).expanduser()
  return read_records(path), str(path)


def _report(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def make(config, share_index: int = 0, share_count: int = 1,
         report=_report) -> pipeline.Data:
  """The SFT data of `config`: packed train batches (this process's rows)
  and eval batches, with what was truncated or dropped reported."""
  tok = tokenizer_lib.get(config.data.tokenizer)
  length = pipeline.seq_len(config)
  train_records, train_path = records_of(config, "train")
  eval_records, eval_path = records_of(config, "eval")
  train, train_report = examples(train_records, config, tok,
                                 f"{KEY}.train={train_path}")
  evals, eval_report = examples(eval_records, config, tok,
                                f"{KEY}.eval={eval_path}")
  report(train_report)
  report(eval_report)
  batch = config.train.batch_size
  return pipeline.Data(
      train=packing.train_iterator(
          grain.MapDataset.source(train), length=length, batch_size=batch,
          seed=config.seed, share_index=share_index, share_count=share_count),
      eval=packing.eval_batches(
          grain.MapDataset.source(evals), length=length, batch_size=batch,
          max_batches=config.train.eval_batches, share_index=share_index,
          share_count=share_count),
      tokenizer=tok,
      eval_bytes_per_token=float("nan"))


# --- The built-in set -----------------------------------------------------

# A speaker's line in the plays: a name in capitals ending with a period.
_SPEAKER = re.compile(r"^([A-Z][A-Z' ]+[A-Z])\.$")
MAX_SPEECH = 200  # Characters of each speech kept (prompt and response).


def dialogue_records(text: str) -> list[dict]:
  """(speech, next speech) pairs of one play: prompt = "SPEAKER.\\n" + the
  speech + "\\n\\nNEXT.\\n", response = the next speech + "\\n"."""
  speeches, speaker, lines = [], None, []
  for line in text.splitlines() + [""]:
    match = _SPEAKER.match(line.strip())
    if match:
      speaker, lines = match.group(1), []
    elif speaker and line.strip() and not line.lstrip().startswith("["):
      lines.append(line.strip())
    elif speaker and lines:  # A blank line (or stage direction) ends it.
      speeches.append((speaker, "\n".join(lines)))
      speaker, lines = None, []
  records = []
  for (who, said), (next_who, reply) in zip(speeches, speeches[1:]):
    if who != next_who and len(said) <= MAX_SPEECH and len(
        reply) <= MAX_SPEECH:
      records.append({"prompt": f"{who}.\n{said}\n\n{next_who}.\n",
                      "response": f"{reply}\n"})
  return records


def build_dialogue(data_cfg) -> dict[str, Path]:
  """shakespeare_dialogue's train and eval files under the data dir, built
  once (idempotent, safe to call concurrently)."""
  root = pipeline.data_dir(data_cfg) / "sft" / "shakespeare_dialogue"
  paths = {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}
  with pipeline.file_lock(root / ".build.lock"):
    if all(p.exists() for p in paths.values()):
      return paths
    source = pipeline.prepare(ml_collections.ConfigDict(dict(
        corpus="shakespeare", text_dir="", data_dir=data_cfg.data_dir)))
    for split, name in (("train", "train"), ("validation", "eval")):
      docs = source.as_data_source(split=split)
      records = [r for i in range(len(docs))
                 for r in dialogue_records(_str(docs[i]["text"]))]
      tmp = paths[name].with_suffix(".tmp")
      tmp.write_text("".join(json.dumps(r) + "\n" for r in records),
                     encoding="utf-8")
      tmp.replace(paths[name])  # Whole or absent.
  return paths


def _str(text) -> str:
  return text.decode("utf-8") if isinstance(text, bytes) else text
