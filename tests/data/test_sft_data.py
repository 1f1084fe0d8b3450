"""Packing documents into windows, and SFT records -> masked examples."""
import json

import grain
import numpy as np
import pytest

from conftest import tiny_config
from lm import checks
from lm.data import packing, pipeline, sft, sources, tokenizer as tok_lib


def test_document_pieces_predict_every_token_once():
  ends = np.array([5, 6, 20, 21, 23])  # Lengths 5, 1, 14, 1, 2.
  spans = packing.document_pieces(ends, length=4)
  assert (spans[:, 1] - spans[:, 0] <= 5).all()
  assert (spans[:, 1] - spans[:, 0] >= 2).all()
  predicted = [t for s, e in spans for t in range(s + 1, e)]
  starts = [0, *ends[:-1]]
  expect = [t for s, e in zip(starts, ends) for t in range(s + 1, e)]
  assert predicted == expect  # Each once, in order, never a first token.


def _examples(lengths, seed=0):
  rng = np.random.default_rng(seed)
  docs = [rng.integers(1, 50, n + 1).astype(np.int32) for n in lengths]
  return docs, grain.MapDataset.source(
      [{"inputs": d[:-1], "targets": d[1:],
        "weights": np.ones(len(d) - 1, np.float32)} for d in docs])


def _check_window(row, docs):
  """Every segment of a packed row is a whole example, positions from 0."""
  for seg in set(row["segment_ids"].tolist()) - {0}:
    at = row["segment_ids"] == seg
    inputs = row["inputs"][at]
    assert (row["positions"][at] == np.arange(at.sum())).all()
    assert any(len(d) - 1 == len(inputs) and (d[:-1] == inputs).all()
               and (d[1:] == row["targets"][at]).all() for d in docs)
  pad = row["segment_ids"] == 0
  assert (row["weights"][pad] == 0).all() and (row["weights"][~pad] == 1).all()


def test_packed_batches_hold_whole_examples_and_shares_split_rows():
  docs, ds = _examples([3, 7, 2, 8, 5, 1, 4, 6, 8, 2] * 3)
  whole = packing.train_iterator(ds, length=8, batch_size=4, seed=1)
  halves = [packing.train_iterator(ds, length=8, batch_size=4, seed=1,
                                   share_index=i, share_count=2)
            for i in range(2)]
  for _ in range(5):
    batch = next(whole)
    assert batch["inputs"].shape == (4, 8)
    for r in range(4):
      _check_window({k: v[r] for k, v in batch.items()}, docs)
    rows = [next(h) for h in halves]
    for k in batch:
      np.testing.assert_array_equal(
          np.concatenate([r[k] for r in rows]), batch[k])


def test_packed_iterator_resumes_exactly():
  _, ds = _examples([3, 7, 2, 8, 5, 1, 4, 6] * 4)
  it = packing.train_iterator(ds, length=8, batch_size=4, seed=3)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expect = [next(it) for _ in range(4)]
  again = packing.train_iterator(ds, length=8, batch_size=4, seed=3)
  again.set_state(state)
  for want in expect:
    got = next(again)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_eval_batches_are_padded_whole_batches():
  docs, ds = _examples([3, 7, 2, 8, 5])
  batches = packing.eval_batches(ds, length=8, batch_size=4, max_batches=3)
  assert len(batches) == 1 and batches[0]["inputs"].shape == (4, 8)
  weights = sum(b["weights"].sum() for b in batches)
  assert weights == sum(len(d) - 1 for d in docs)


def test_packed_corpus_windows_are_document_pieces(data_dir):
  config = tiny_config(data_dir, **{"data.packing": "segments"})
  data = pipeline.make(config)
  tokens = pipeline.load_tokens(pipeline.prepare(config.data), "train",
                                tok_lib.get("byte")).tokens
  text = tokens.tobytes()
  batch = next(data.train)
  for row in range(4):
    for seg in set(batch["segment_ids"][row].tolist()) - {0}:
      at = batch["segment_ids"][row] == seg
      piece = np.concatenate([batch["inputs"][row][at],
                              batch["targets"][row][at][-1:]])
      assert piece.astype(np.uint8).tobytes() in text


# --- SFT records -------------------------------------------------------------


def _sft_config(tmp_path, train, **overrides):
  path = tmp_path / "train.jsonl"
  path.write_text(train)
  return tiny_config("", **{"task": "sft", "data.packing": "segments",
                            "data.sft.train": str(path),
                            "data.sft.eval": str(path), **overrides})


@pytest.mark.parametrize("line, why", [
    ('{"prompt": "a", "response": "b"\n', "not valid JSON"),
    ('["prompt", "response"]\n', "must be a JSON object"),
    ('{"prompt": "a"}\n', "no response"),
    ('{"prompt": "a", "response": ""}\n', "no response"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "no response"),
    ('{"messages": [{"role": "user"}]}\n', "must be a list of"),
])
def test_a_bad_line_names_the_file_and_line(tmp_path, line, why):
  path = tmp_path / "data.jsonl"
  path.write_text('{"prompt": "p", "response": "r"}\n\n' + line)
  with pytest.raises(sources.DataError) as e:
    sft.read_records(path)
  assert f"{path}:3:" in str(e.value) and why in str(e.value)


def test_prompt_tokens_are_not_trained_and_eos_is():
  config = tiny_config("", **{"data.sft.template": "Q: {prompt}\nA: "})
  tok = tok_lib.get("byte")
  records = [{"prompt": "hi", "response": "yo"}]
  ex, report = sft.examples(records, config, tok, "records")
  ids, trained = ex.ids[0], ex.trained[0]
  assert bytes(ids[:-1].astype(np.uint8)) == b"Q: hi\nA: yo"
  assert ids[-1] == tok.eos_id
  assert trained.tolist() == [0] * 9 + [1, 1, 1]
  item = ex[0]  # Targets "y", "o" and EOS are the trained ones.
  assert item["weights"].tolist() == [0] * 8 + [1, 1, 1]
  assert "1 of 1 records used; 0 longer" in report


def test_messages_train_the_assistant_turns():
  config = tiny_config("")
  messages = [{"role": "user", "content": "a"},
              {"role": "assistant", "content": "b"},
              {"role": "user", "content": "c"},
              {"role": "assistant", "content": "d"}]
  pieces = sft.spans({"messages": messages}, config.data.sft)
  assert pieces == [("<|user|>\na\n", False), ("<|assistant|>\nb\n", True),
                    ("<|user|>\nc\n", False), ("<|assistant|>\nd\n", True)]


@pytest.mark.parametrize("too_long, used", [("truncate", 2), ("drop", 1)])
def test_too_long_records_are_counted(too_long, used):
  config = tiny_config("", **{"data.sft.too_long": too_long})  # 33 tokens.
  records = [{"prompt": "p" * 10, "response": "r" * 40},
             {"prompt": "p", "response": "r"},
             {"prompt": "p" * 40, "response": "r"}]  # Cut: no response left.
  ex, report = sft.examples(records, config, tok_lib.get("byte"), "f.jsonl")
  assert len(ex) == used
  assert all(len(ids) <= 33 for ids in ex.ids)
  action = "dropped" if too_long == "drop" else "truncated"
  assert f"{used} of 3 records used; 2 longer than the 33-token window " \
         f"were {action}" in report
  if too_long == "truncate":
    assert "1 dropped with no response token left" in report


def test_sft_config_errors_name_the_key(tmp_path):
  good = '{"prompt": "p", "response": "r"}\n'
  for overrides, key in [
      ({"data.packing": "concat"}, "config.data.packing=segments"),
      ({"data.sft.eval": str(tmp_path / "none.jsonl")},
       "config.data.sft.eval="),
      ({"data.sft.too_long": "cut"}, "config.data.sft.too_long"),
      ({"data.sft.template": "{question}"}, "config.data.sft.template"),
      ({"data.sft.chat_template": "tokenizer"},
       "the byte tokenizer has no chat template")]:
    config = _sft_config(tmp_path, good, **overrides)
    with pytest.raises(checks.ConfigError, match=key.replace(".", r"\.")):
      from lm.run import checks as run_checks  # noqa: PLC0415
      run_checks.validate(config, num_devices=1)


def test_shakespeare_dialogue_pairs_a_speech_with_the_next():
  text = ("ROMEO.\nBut soft!\n\nJULIET.\nAy me.\n\n[Exit.]\n\nROMEO.\n"
          "She speaks.\n")
  records = sft.dialogue_records(text)
  assert records == [
      {"prompt": "ROMEO.\nBut soft!\n\nJULIET.\n", "response": "Ay me.\n"},
      {"prompt": "JULIET.\nAy me.\n\nROMEO.\n", "response": "She speaks.\n"}]
  assert json.loads(json.dumps(records[0])) == records[0]


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
          "{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_tokenizer_chat_template_renders_as_transformers(tmp_path):
  """The tokenizer's own chat template: the text transformers'
  apply_chat_template renders, with the assistant turns (the content and
  its end marker, after the generation prompt) trained."""
  import transformers  # noqa: PLC0415 (a test-only dependency)
  folder = tok_lib.write_hf_files(tok_lib.ByteTokenizer(), tmp_path / "tok")
  config_path = folder / "tokenizer_config.json"
  hf_config = json.loads(config_path.read_text())
  config_path.write_text(json.dumps({**hf_config, "chat_template": CHATML}))
  spec = str(folder / "tokenizer.json")
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Who?"},
              {"role": "assistant", "content": "Romeo."},
              {"role": "user", "content": "Where?"},
              {"role": "assistant", "content": "Verona."}]
  config = tiny_config("", **{"data.tokenizer": spec,
                              "data.sft.chat_template": "tokenizer"})
  tok = tok_lib.get(spec)
  jinja = sft.ChatTemplate(sft.chat_template(spec), tok)
  pieces = sft.spans({"messages": messages}, config.data.sft, jinja)
  reference = transformers.AutoTokenizer.from_pretrained(str(folder))
  assert "".join(p for p, _ in pieces) == reference.apply_chat_template(
      messages, tokenize=False)
  assert [p for p, trained in pieces if trained] == [
      "Romeo.<|im_end|>\n", "Verona.<|im_end|>\n"]
