r"""The classifiers and GANs at their default configs, and the scale of cFID.

    python benchmarks/families.py [--workdir_root=runs/families]

Each config below trains with
`XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/train.py
--config=CONFIG --workdir=DIR` (mesh data=8 on 8 simulated CPU devices), one
at a time, each in a fresh directory under --workdir_root. Recorded: the
final eval line of DIR/metrics.jsonl (the whole test split) and the wall
time of the process: compiles, evals and, for a GAN whose dataset has no
feature classifier stored yet, its one-off training (recorded as
`trained_feature_classifier`). Data is expected to be prepared already
(otherwise the first run of a dataset also includes preparing it).

The scale of cFID, for each dataset a GAN trains on, with the fixed feature
classifier the GAN eval uses (lm/tasks/feature_classifier.py): cFID of real
held-out images (as many train images, drawn with a fixed seed, against the
test images) and of uniform noise in [-1, 1] (as many images, against the
test images), the classifier score of the real test images and of the
noise, and the feature classifier's own test accuracy (its info.json).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from benchmarks import common

NAME = "families"
CONFIGS = ["configs/mlp_digits.py", "configs/mlp_mnist.py",
           "configs/gan_digits.py", "configs/gan_mnist.py",
           "configs/classify_text.py"]
SEED = 0  # The held-out train images and the noise images.


def train(config: str, workdir: Path, steps: int) -> dict:
  """One default-config run in a fresh `workdir`: its final eval line and
  wall time."""
  if workdir.exists():
    shutil.rmtree(workdir)
  args = [f"--config={config}"]
  if steps:  # Validation of this script only.
    args += common.few_steps(steps)
  env = common.simulated_devices()
  start = time.perf_counter()
  out = common.run([sys.executable, "scripts/train.py",
                    f"--workdir={workdir}", *args], env=env)
  wall = time.perf_counter() - start
  total = json.loads((workdir / "config.json").read_text())["train"]["steps"]
  lines = [json.loads(s) for s in
           (workdir / "metrics.jsonl").read_text().splitlines() if s]
  final = [x for x in lines if x["split"] == "eval" and x["step"] == total]
  if not final:
    raise RuntimeError(f"{config}: no eval line at step {total} in "
                       f"{workdir}/metrics.jsonl")
  return dict(config=config, args=args, wall_s=wall,
              eval={k: v for k, v in final[-1].items()
                    if k not in ("step", "split")},
              trained_feature_classifier="feature classifier for" in
              out.stdout)


def cfid_scale(config: str) -> dict:
  """The reference points of cFID and the classifier score for the dataset
  of a GAN config, with the feature classifier its eval uses."""
  import importlib  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from lm import metrics  # noqa: PLC0415
  from lm.data import images  # noqa: PLC0415
  from lm.tasks import feature_classifier  # noqa: PLC0415

  module = importlib.import_module(config.removesuffix(".py")
                                   .replace("/", "."))
  data_cfg = module.get_config().data
  dataset = data_cfg.dataset
  classifier = feature_classifier.load_or_train(data_cfg)
  apply = jax.jit(classifier.apply)
  train_u8, _ = images.load_split(data_cfg, "train")
  test_u8, _ = images.load_split(data_cfg, "test")
  n = len(test_u8)
  rng = np.random.default_rng(SEED)
  held_out = images.normalize(
      train_u8[rng.choice(len(train_u8), n, replace=False)], dataset)
  noise = rng.uniform(-1.0, 1.0, test_u8.shape).astype(np.float32)
  (test_f, test_p), (held_f, _), (noise_f, noise_p) = (
      jax.device_get(apply(classifier.params, x))
      for x in (images.normalize(test_u8, dataset), held_out, noise))
  return dict(dataset=dataset, images=n,
              classifier_test_accuracy=classifier.test_accuracy,
              cfid_held_out=metrics.frechet_distance(held_f, test_f),
              cfid_noise=metrics.frechet_distance(noise_f, test_f),
              score_test=metrics.classifier_score(test_p),
              score_noise=metrics.classifier_score(noise_p))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir_root", default="runs/families",
                      help="Scratch directory of the runs.")
  parser.add_argument("--only", default=",".join(CONFIGS),
                      help="Validation only: comma-separated configs to run "
                      "(the cFID scale covers their GANs' datasets).")
  common.add_steps_flag(parser)
  common.add_out_flag(parser, NAME)
  args = parser.parse_args()
  only = args.only.split(",")
  if set(only) - set(CONFIGS):
    parser.error(f"--only={args.only}: the configs are {CONFIGS}.")
  root = Path(args.workdir_root).absolute()
  runs = []
  for config in (c for c in CONFIGS if c in only):
    print(f"== {config}", flush=True)
    runs.append(train(config, root / Path(config).stem, args.steps))
    print(f"{runs[-1]['wall_s']:.0f} s: {runs[-1]['eval']}", flush=True)
  scale = [cfid_scale(c) for c in CONFIGS if c in only and "gan_" in c]
  path = common.write(NAME, dict(runs=runs, cfid_scale=scale), args.out)
  print(f"wrote {path}")


def tables(results: dict) -> dict[str, str]:
  rows, gans = [], {}
  for r in results["runs"]:
    e, wall = r["eval"], f"{r['wall_s']:.0f} s"
    if r["trained_feature_classifier"]:
      wall += " (incl. the feature classifier)"
    if "cfid" in e:
      gans[Path(r["config"]).stem.removeprefix("gan_")] = e
      rows.append([f"`{r['config']}`", "cFID / classifier score",
                   f"{e['cfid']:.2f} / {e['classifier_score']:.2f}", wall])
    elif "majority_f1" in e:
      rows.append([f"`{r['config']}`", "macro F1 / accuracy",
                   f"{e['f1']:.4f} / {e['accuracy']:.4f}", wall])
      rows.append(["majority-class baseline (genres)", "macro F1 / accuracy",
                   f"{e['majority_f1']:.4f} / {e['majority_accuracy']:.4f}",
                   "—"])
    else:
      rows.append([f"`{r['config']}`", "accuracy / macro F1",
                   f"{e['accuracy']:.4f} / {e['f1']:.4f}", wall])
  table = common.markdown(["config", "metric (test)", "value", "wall time"],
                          rows, "llrr")

  scale = []
  for s in results["cfid_scale"]:
    gan = gans[s["dataset"]]
    scale.append([
        s["dataset"], f"{100 * s['classifier_test_accuracy']:.1f}%",
        f"{s['cfid_held_out']:.2f}", f"{s['cfid_noise']:.1f}",
        f"{gan['cfid']:.2f} ({gan['cfid'] / s['cfid_held_out']:.1f}x held-out"
        f", {100 * gan['cfid'] / s['cfid_noise']:.0f}% of noise)",
        f"{s['score_test']:.2f}", f"{s['score_noise']:.2f}",
        f"{gan['classifier_score']:.2f}"])
  cfid = common.markdown(
      ["dataset", "feature classifier test accuracy", "cFID held-out real",
       "cFID uniform noise", "cFID GAN (default config)",
       "score real test", "score noise", "score GAN"], scale, "lrrrrrrr")
  return {"table": table, "cfid_scale": cfid}


if __name__ == "__main__":
  main()
