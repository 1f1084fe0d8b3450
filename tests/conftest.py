"""Every test runs on 8 simulated CPU devices (set before jax is imported)."""
import os
import re
import sys

# The caller's XLA flags (e.g. --xla_cpu_max_isa=AVX2, to run the suite as
# on a CPU without AVX-512) apply to the tests and to every script they start.
# Not the device count: xdist's workers inherit the environment this module
# sets below in the controller, and a script a test runs on one device must
# get one there too.
BASE_XLA_FLAGS = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                        os.environ.get("XLA_FLAGS", "")).strip()
# The suite's time is mostly XLA compiling distinct small programs (a census
# of its compiles: 947 s of compile in under half of the tests), and most of
# a compile is LLVM optimizing each kernel, for programs that then run a few
# times. At LLVM level 0 the suite took 19 minutes instead of 27 on 2 cores
# (tests/parallel: 159 s instead of 214; level 1 saved 5%), and it is faster
# with --xla_cpu_max_isa=AVX2 too (the bfloat16-heavy tests: 79 s instead of
# 126; tests/parallel: 180 instead of 229): the tests' arrays are small, so
# slower kernels cost less than their compile. The programs compute the
# same math, rounded as a valid compile may round; tests whose tolerance
# assumed one compile's rounding were fixed to the math's. To run the suite
# at XLA's default, pass --xla_backend_optimization_level=3.
if "--xla_backend_optimization_level" not in BASE_XLA_FLAGS:
  BASE_XLA_FLAGS = f"{BASE_XLA_FLAGS} --xla_backend_optimization_level=0".strip()


def xla_flags(devices: int = 8) -> str:
  """XLA_FLAGS for a process that simulates `devices` CPU devices."""
  return (f"{BASE_XLA_FLAGS} "
          f"--xla_force_host_platform_device_count={devices}").strip()


os.environ["XLA_FLAGS"] = xla_flags()
# The tests and every script they start run on the CPU. With libtpu installed
# (requirements-test.txt: the TPU compiler of lm/run/aot.py), jax would
# otherwise try a TPU first in every process, taking ~0.2 s and logging five
# lines on stderr that it found none; the AOT tests still get TPU chips to
# compile for (jax.experimental.topologies loads libtpu itself).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the test processes and every
# script they start (JAX reads these variables): a program that many tests
# compile (the tiny LM's step, in a dozen subprocess runs) compiles once.
# Executables are keyed by their HLO, compile options and jax version, so a
# stale entry is never used; the oldest are evicted past 2 GiB.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    ".test_data", "jax_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))
# Training runs in tests report MFU against this instead of measuring the
# CPU's matmul peak under the suite's load (and caching that for later runs).
os.environ.setdefault("LM_PEAK_TFLOPS", "1")

# Each script the tests start would re-run itself once to malloc with huge
# pages (lm/cpu.py); the environment it would ask for is set here instead,
# for those scripts and for xdist's workers.
from lm import cpu  # noqa: E402

os.environ.update(cpu.huge_page_environ() or {})

import jax  # noqa: E402
import ml_collections  # noqa: E402
import pytest  # noqa: E402

# The scripts the tests start (a hundred-odd processes) cache even their small
# programs (jax caches only compiles over 1 s by default): a tiny train.py
# run's init, eval and checkpoint programs compile once per suite, not once
# per process (measured: 6.5 -> 4.7 s CPU for a run after the first). Set
# after jax is imported, so only the child processes see it: in the test
# processes, eager ops compile hundreds of tiny programs that would cost
# more to write than they save (measured on tests/models: more CPU).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "scripts", "train.py")
# scripts/train.py flags for subprocess runs: the tiny LM, 10 steps with an
# eval at 5 and 10, on a data x fsdp x tensor mesh of 8 devices.
TRAIN_ARGS = ["--config=configs/lm.py:tiny", "--config.model.d_model=64",
              "--config.model.n_layers=2", "--config.model.d_ff=128",
              "--config.model.max_len=32", "--config.train.batch_size=16",
              "--config.train.steps=10", "--config.train.log_every=1",
              "--config.train.eval_every=5", "--config.train.eval_batches=2",
              "--config.train.checkpoint_every=0",
              "--config.optimizer.warmup_steps=2", "--config.mesh.data=2",
              "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]


@pytest.fixture(scope="session")
def data_dir():
  """One prepared Shakespeare corpus for the whole session (and all xdist
  workers: preparation is locked, and reused once done)."""
  path = os.environ.get("LM_TEST_DATA_DIR") or os.path.join(
      REPO, ".test_data")
  from lm.data import pipeline  # noqa: PLC0415
  pipeline.prepare(ml_collections.ConfigDict(
      dict(corpus="shakespeare", text_dir="", data_dir=path)))
  return path


def tiny_config(data_dir: str = "", **overrides) -> ml_collections.ConfigDict:
  """A very small LM config that compiles and steps in a second or two."""
  from configs import lm  # noqa: PLC0415
  c = lm.get_config("tiny")
  c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=128,
                 max_len=32)
  c.train.update(steps=3, batch_size=16, log_every=1, eval_every=0,
                 eval_batches=2, checkpoint_every=0)
  c.optimizer.update(warmup_steps=1, learning_rate=1e-2)
  c.mesh = dict(data=1, fsdp=1, tensor=1)
  c.data.data_dir = data_dir
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory):
  """A folder every xdist worker of this session shares (the parent of the
  workers' own base folders), for what `made_once` makes."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def made_once(folder, make):
  """`folder`, made by `make(folder)` once per session: the first test (in
  any xdist worker) to ask makes it under a file lock, the others wait and
  read it. A `make` that fails leaves nothing behind, so the next test to
  ask tries again (and fails with its own message)."""
  import pathlib  # noqa: PLC0415
  import shutil  # noqa: PLC0415

  import filelock  # noqa: PLC0415
  folder = pathlib.Path(folder)
  folder.parent.mkdir(parents=True, exist_ok=True)
  with filelock.FileLock(f"{folder}.lock"):
    done = folder.parent / f"{folder.name}.done"
    if not done.exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      try:
        make(folder)
      except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
      done.touch()
  return folder


@pytest.fixture(scope="session")
def reference_run(shared_tmp, data_dir) -> str:
  """The run directory of scripts/train.py with TRAIN_ARGS alone (10 steps,
  evals at 5 and 10, one process on data=2 x fsdp=2 x tensor=2), trained
  once per session for every test that compares with it or starts from it.
  Tests read it and never write into it (copy it first)."""
  return str(made_once(shared_tmp / "reference_run",
                       lambda folder: train_script(folder / "run", data_dir))
             / "run")


def train_script(workdir, data_dir, *extra, check=True, **popen):
  """scripts/train.py with TRAIN_ARGS (+ `extra`) in a subprocess on 8
  simulated devices; with `popen` kwargs, the started Popen instead."""
  import subprocess  # noqa: PLC0415
  env = dict(os.environ, LM_DATA_DIR=data_dir,
             XLA_FLAGS=xla_flags())
  cmd = [sys.executable, TRAIN, f"--workdir={workdir}", *TRAIN_ARGS, *extra]
  if popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env, **popen)
  result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
  if check:
    assert result.returncode == 0, (result.stdout[-3000:]
                                    + result.stderr[-3000:])
  return result


assert jax.device_count() == 8, "tests expect 8 simulated devices"


def pytest_collection_modifyitems(items):
  """Everything under tests/e2e (subprocess runs of the scripts) is slow;
  `pytest -m "not slow"` is the quick loop, `make test` runs all."""
  for item in items:
    if "e2e" in item.path.parts:
      item.add_marker(pytest.mark.slow)


# `make test` (pytest -n 2): xdist's default distribution sends each worker
# long runs of consecutive tests, so the subprocess tests (tests/e2e, a
# third of the suite's CPU) went to one worker in one batch, however long
# they took. Instead each worker takes one unit of work at a time, the
# longest first (as ranked below), so the two finish together: a unit is a
# module (its module-scoped fixtures are made once), or one test of the
# modules in SPLIT_MODULES, which share nothing but session fixtures.
SPLIT_MODULES = ("tests/e2e/test_docs_commands.py", "tests/e2e/test_multihost.py",
                 "tests/e2e/test_resume.py")
# The slowest units, slowest first (seconds on a loaded 2-core machine with a
# cold compilation cache, 2026-11-30: 616 ... 30). A unit not named here
# runs after these, in collection order; a stale entry costs only balance.
_DOCS = "tests/e2e/test_docs_commands.py::test_every_command_runs"
_MULTIHOST = "tests/e2e/test_multihost.py::test_"
LONGEST_FIRST = (
    "tests/parallel/test_strategies.py", "tests/quant/test_quant.py",
    "tests/parallel/test_inspect.py", "tests/models/test_families.py",
    "tests/models/test_perf_options.py", "tests/interop/test_hf.py",
    f"{_DOCS}[docs/interop.md]", f"{_DOCS}[docs/compression.md]",
    "tests/e2e/test_faults.py", "tests/tasks/test_tasks.py",
    "tests/train/test_lora.py", "tests/run/test_tracking.py",
    "tests/interop/test_export.py", "tests/run/test_aot.py",
    "tests/models/test_model.py", "tests/train/test_prune.py",
    f"{_DOCS}[docs/parallelism.md]", "tests/parallel/test_pipeline.py",
    "tests/serve/test_engine.py", f"{_DOCS}[README.md]",
    "tests/train/test_precision.py", "tests/models/test_segments.py",
    "tests/models/test_moe.py", "tests/tasks/test_sft.py",
    "tests/parallel/test_parallel.py", "tests/parallel/test_context.py",
    "tests/serve/test_server.py",
    f"{_MULTIHOST}two_processes_equal_one_process_across_a_resume",
    f"{_DOCS}[docs/finetuning.md]",
    f"{_MULTIHOST}a_killed_process_ends_the_job_and_nothing_is_lost",
    "tests/run/test_cli.py", "tests/interop/test_harness.py",
    "tests/train/test_distill.py", "tests/train/test_privacy.py",
    "tests/explain/test_integrated_gradients.py", "tests/train/test_optim.py",
    f"{_DOCS}[docs/multihost.md]", "tests/models/test_sample.py",
    f"{_DOCS}[docs/evaluation.md]",
    f"{_MULTIHOST}sigterm_on_one_process_saves_one_checkpoint_on_all",
    "tests/e2e/test_distill_run.py",
    f"{_MULTIHOST}a_two_process_import_reads_half_each_and_equals_one_process",
    "tests/e2e/test_resume.py::test_resume_in_a_fresh_process_is_exact",
    "tests/parallel/test_reduce.py", f"{_DOCS}[docs/planning.md]")


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
  """xdist's default distribution (`-n N` alone) in units, longest first."""
  if config.getvalue("dist") != "load":
    return None  # Asked for another one (--dist ...): that one.
  from xdist.scheduler import LoadScopeScheduling  # noqa: PLC0415

  class LongestFirst(LoadScopeScheduling):
    """xdist's loadscope (a worker gets the next unit when it has at most
    two tests left), with our units and order."""

    def _split_scope(self, nodeid: str) -> str:
      module = nodeid.split("::")[0]
      return nodeid if module in SPLIT_MODULES else module

    def _assign_work_unit(self, node) -> None:
      rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
      first = min(self.workqueue, key=lambda u: rank.get(u, len(rank)))
      self.workqueue.move_to_end(first, last=False)
      super()._assign_work_unit(node)
  return LongestFirst(config, log)


def run_steps(config: ml_collections.ConfigDict, mesh_shape: dict, batches,
              *, restore_from=None, save_to=None):
  """Train steps through `batches` on `mesh_shape` (a prefix of the 8
  devices), from a fresh init or the checkpoint in `restore_from`, saving the
  final state to `save_to` if given. Returns (metrics per step, the state on
  the host, the setup)."""
  import math  # noqa: PLC0415

  from lm import config as config_lib, tasks  # noqa: PLC0415
  from lm.parallel import make_mesh  # noqa: PLC0415
  from lm.train import checkpoint as ckpt_lib  # noqa: PLC0415
  from lm.train import state as state_lib, step as step_lib  # noqa: PLC0415
  config.mesh = mesh_shape
  config = config_lib.resolve(config)
  mesh = make_mesh(mesh_shape, jax.devices()[:math.prod(mesh_shape.values())])
  with jax.set_mesh(mesh):
    setup = state_lib.make_setup(config, mesh)
    if restore_from:
      ckpt = ckpt_lib.Checkpointer(restore_from, async_save=False)
      state = ckpt.restore(setup.abstract_state)
      ckpt.close()
    else:
      state = setup.init_fn(jax.random.key(config.seed))
    fn = step_lib.jit_train_step(setup, tasks.get(config),
                                 config.train.grad_accum_steps)
    history = []
    for b in batches:
      b = {k: jax.device_put(v, setup.batch_sharding(v.ndim))
           for k, v in b.items()}
      state, m = fn(state, b)
      history.append(jax.device_get(m))
    if save_to:
      ckpt = ckpt_lib.Checkpointer(save_to, async_save=False)
      ckpt.save(int(state.step), state)
      ckpt.close()
  return history, jax.device_get(state), setup


def assert_reordered(actual, desired, *, reduction: int, dtype="float32",
                     k: float = 2.0) -> None:
  """Two evaluations of the same float math whose sums run in another order
  (another sharding, fusion or implementation) agree within the rounding of
  those sums: per tensor (every leaf of a tree),

    |actual - desired| <= k * eps(dtype) * sqrt(reduction) * max|desired|.

  A reordered sum of n terms moves by about eps * sqrt(n) times the size of
  its terms (rounding errors of random sign); max|desired| bounds that size.
  `reduction` is the longest sum behind the compared values (the tokens of a
  batch for a weight gradient, the keys of attention, the hidden width);
  `dtype` the precision the values were rounded to. A tolerance derived this
  way holds on any CPU; one tuned on a single machine did not."""
  import numpy as np  # noqa: PLC0415
  eps = float(np.finfo(np.dtype(dtype)).eps) if dtype != "bfloat16" else 2.0 ** -7
  def check(a, d):
    a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
    atol = k * eps * np.sqrt(reduction) * float(np.max(np.abs(d), initial=0.0))
    np.testing.assert_allclose(a, d, rtol=0, atol=atol)
  jax.tree.map(check, actual, desired)


def assert_same_run(history, state, ref_history, ref_state,
                    atol: float = 1e-5) -> None:
  """Every logged metric (rtol 1e-5) and parameter (rtol 1e-5, `atol`: Adam
  moves ~0-gradient weights by ~lr, see tests/parallel/test_parallel.py) equal."""
  import numpy as np  # noqa: PLC0415
  for key in ref_history[0]:
    np.testing.assert_allclose([h[key] for h in history],
                               [h[key] for h in ref_history], rtol=1e-5,
                               err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=atol),
               state.params, ref_state.params)


# The other model families, small: each a config of configs/*.py.
def _mlp():
  from configs import mlp_digits  # noqa: PLC0415
  c = mlp_digits.get_config()
  c.model.update(width=32)
  return c


def _text():
  from configs import classify_text  # noqa: PLC0415
  c = classify_text.get_config()
  c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                 max_len=16)
  c.data.seq_len = 16
  return c


def _gan_mlp():
  from configs import gan_digits  # noqa: PLC0415
  c = gan_digits.get_config()
  c.model.update(width=32, latent_dim=8)
  return c


def _gan_conv():
  from configs import gan_mnist  # noqa: PLC0415
  c = gan_mnist.get_config()
  c.model.update(width=4, latent_dim=8)
  c.gan.r1_gamma = 1.0
  return c


FAMILIES = {"mlp": _mlp, "transformer_classifier": _text, "gan_mlp": _gan_mlp,
            "gan_dcgan": _gan_conv}


def family_batches(config, steps: int, batch: int = 16) -> list[dict]:
  """Random inputs and labels of the family's shapes."""
  import numpy as np  # noqa: PLC0415
  rng = np.random.default_rng(0)
  out = []
  for _ in range(steps):
    if config.data.dataset == "shakespeare_genres":
      b = {"tokens": rng.integers(0, 256, (batch, config.data.seq_len))}
    else:
      shape = tuple(config.model.image_shape)
      b = {"image": rng.uniform(-1, 1, (batch, *shape)).astype(np.float32)}
    # The GAN's digits carry their 10 labels too (unused by its step).
    classes = config.model.num_classes if config.task == "classify" else 10
    b["label"] = rng.integers(0, classes, batch)
    out.append({k: v.astype(np.int32) if v.dtype == np.int64 else v
                for k, v in b.items()})
  return out


def train_family(config: ml_collections.ConfigDict, mesh_shape: dict,
                 steps: int = 3, batches=None):
  """Steps on `mesh_shape` (a prefix of the 8 devices); (losses, state,
  setup)."""
  config.train.update(steps=steps, batch_size=16)
  return run_steps(config, mesh_shape,
                   batches or family_batches(config, steps))


def init_run(tmp_path, **model):
  """A run directory (tmp_path / "init") holding a randomly initialized
  transformer (tiny_config with `model` overrides; no training), with
  non-zero biases."""
  import jax.numpy as jnp  # noqa: PLC0415
  from lm.parallel import make_mesh, rules as rules_lib  # noqa: PLC0415
  from lm.run import checks, loop  # noqa: PLC0415
  from lm.train import checkpoint, state  # noqa: PLC0415
  config = tiny_config(**{f"model.{k}": v for k, v in model.items()})
  config.mesh = dict(data=1, fsdp=2, tensor=2, stage=1, expert=1,
                     sequence=1)
  config, _ = checks.validate(config, num_devices=4)
  workdir = tmp_path / "init"
  mesh = make_mesh(config.mesh, jax.devices()[:4])
  with rules_lib.use(rules_lib.Rules()), jax.set_mesh(mesh):
    setup = state.make_setup(config, mesh)
    init = setup.init_fn(jax.random.key(3))
    # Non-zero biases, so a misplaced one shows.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 * jnp.arange(x.size, dtype=x.dtype).reshape(
            x.shape) / x.size if "bias" in jax.tree_util.keystr(p) else x,
        init.params)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", async_save=False)
    ckpt.save(0, init.replace(params=params), force=True)
    ckpt.close()
  loop.write_config(config, workdir)
  return workdir
