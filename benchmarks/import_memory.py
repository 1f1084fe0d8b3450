r"""Host memory of importing a Hugging Face checkpoint (scripts/import_hf.py).

    python benchmarks/import_memory.py

A random-initialized Llama of about 500 MB in float32 (d 768, 12 layers,
12 query / 4 kv heads, SwiGLU 2048, vocab 32000, untied head) is made with
transformers and saved with save_pretrained; each measurement then runs in
a fresh child process on 8 simulated CPU devices (FSDP over all 8):

  read     lm.interop.hf_weights.read: every tensor read from the
           safetensors file and placed on its sharding.
  import   lm.interop.hf_run.import_run: the same, plus the fresh AdamW
           state and the step-0 checkpoint written.
  load_all safetensors.numpy.load_file of the whole file: what holding the
           checkpoint in host memory costs, for comparison.

Memory is the kernel's peak resident set (VmHWM, reset before the phase)
above the child's baseline after jax and the library are loaded. On a CPU
the devices' memory *is* host memory, so the arrays the import leaves on
the devices (the parameters; for `import` also the optimizer state) are
subtracted to give the transient host memory the import itself needs: what
a host feeding accelerators would see. The bound checked is the one in the
issue: transient < 1.5 x the largest tensor + 200 MB.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks import common

NAME = "import_memory"
MB = 2 ** 20
SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
             num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=4, max_position_embeddings=512,
             tie_word_embeddings=False)


def _status(key: str) -> int:
  for line in open("/proc/self/status"):
    if line.startswith(key + ":"):
      return int(line.split()[1]) * 1024
  raise KeyError(key)


def _reset_peak() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def child(phase: str, hf_dir: str, workdir: str) -> dict:
  """One phase, measured in this (fresh) process."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from lm import config as config_lib  # noqa: PLC0415
  from lm.interop import hf_config, hf_run, hf_weights  # noqa: PLC0415
  from lm.parallel import make_mesh, rules as rules_lib  # noqa: PLC0415
  from lm.train import state as state_lib  # noqa: PLC0415
  from safetensors.numpy import load_file  # noqa: PLC0415

  hf = json.loads((Path(hf_dir) / "config.json").read_text())
  config = config_lib.base("transformer")
  config.model.update(hf_config.model_from_hf(hf, hf_dir))
  config.mesh.update(data=1, fsdp=-1)
  mesh = make_mesh(config.mesh)
  with rules_lib.use(rules_lib.Rules()):
    setup = state_lib.make_setup(config, mesh)
  jax.block_until_ready(jax.device_put(np.zeros(8), jax.devices()[0]))
  baseline = _status("VmRSS")
  _reset_peak()
  resident = 0
  if phase == "read":
    folder = hf_weights.Folder(Path(hf_dir))
    specs = hf_weights.tensors(setup.model_cfg)
    with rules_lib.use(rules_lib.Rules()), jax.set_mesh(mesh):
      params = jax.block_until_ready(
          hf_weights.read(folder, specs, setup.abstract_state.params))
    resident = sum(x.nbytes for x in jax.tree.leaves(params))
  elif phase == "import":
    hf_run.import_run(hf_dir, workdir, tokenizer="byte", warn=lambda _: None)
    resident = sum(x.size * x.dtype.itemsize
                   for x in jax.tree.leaves(setup.abstract_state))
  else:
    resident = 0
    tensors = load_file(str(Path(hf_dir) / "model.safetensors"))
    del tensors
  peak = _status("VmHWM") - baseline
  return {"phase": phase, "peak_above_baseline_mb": peak / MB,
          "left_on_devices_mb": resident / MB,
          "transient_mb": (peak - resident) / MB}


def make_model(path: Path) -> dict:
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(
      transformers.LlamaConfig(**SHAPE))
  model.save_pretrained(path)
  sizes = [p.numel() * 4 for p in model.state_dict().values()]
  return {"model_mb": sum(sizes) / MB, "largest_tensor_mb": max(sizes) / MB,
          "tensors": len(sizes)}


def tables(results: dict) -> dict[str, str]:
  m = results["model"]
  bound = 1.5 * m["largest_tensor_mb"] + 200
  what = {"read": "read + place every tensor (hf_weights.read)",
          "import": "whole import_run (+ AdamW state, checkpoint write)",
          "load_all": "safetensors load_file of the whole checkpoint"}
  rows = [[what[r["phase"]], f"{r['peak_above_baseline_mb']:,.0f}",
           f"{r['left_on_devices_mb']:,.0f}", f"{r['transient_mb']:,.0f}",
           ("yes" if r["transient_mb"] < bound else "no")
           if r["phase"] != "load_all" else "-"]
          for r in results["phases"]]
  note = (f"\n\nModel: {m['model_mb']:,.0f} MB in float32, {m['tensors']} "
          f"tensors, the largest {m['largest_tensor_mb']:,.0f} MB; bound "
          f"1.5 x largest + 200 MB = {bound:,.0f} MB.")
  return {"phases": common.markdown(
      ["phase", "peak RSS above baseline, MB", "left on the (CPU) devices, "
       "MB", "transient host memory, MB", "within the bound"], rows,
      "lrrrl") + note}


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common.add_out_flag(parser, NAME)
  parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args(argv[1:])
  if args.child:
    print(json.dumps(child(*args.child)))
    return
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = Path(tmp) / "hf"
    model = make_model(hf_dir)
    phases = []
    for phase in ("read", "import", "load_all"):
      out = common.run([sys.executable, "-m", "benchmarks.import_memory",
                        "--child", phase, str(hf_dir),
                        str(Path(tmp) / f"run_{phase}")],
                       env=common.simulated_devices(8))
      phases.append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(phases[-1], flush=True)
  data = {"model": model, "phases": phases}
  common.write(NAME, data, args.out, argv)
  print(tables(data)["phases"])


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  main(sys.argv)
