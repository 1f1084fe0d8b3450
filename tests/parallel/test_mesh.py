"""The mesh: its checks against the devices and processes, multislice
(DCN) layouts, and each process's share of the batch."""
import pytest

from conftest import tiny_config
from lm.parallel import mesh as mesh_lib
from lm.run import checks


def test_mesh_and_batch_errors_name_the_key_and_the_processes():
  c = tiny_config(**{"mesh": dict(data=16), "train.batch_size": 16})
  with pytest.raises(checks.ConfigError,
                     match=r"config.mesh.*2 processes: 8 devices in all, 4 "):
    checks.validate(c, num_devices=8, process_count=2)
  c = tiny_config(**{"mesh": dict(data=8), "train.batch_size": 12})
  with pytest.raises(checks.ConfigError,
                     match=r"config.train.batch_size=12 .* each of the 2 "
                     "processes"):
    checks.validate(c, num_devices=8, process_count=2)


def test_dcn_axes_must_match_the_slices():
  with pytest.raises(ValueError, match=r"config.mesh_dcn=\{'data': 2\} spans 2 "
                     "processes, but the devices are in 1 processes"):
    mesh_lib.make_mesh(dict(data=8), dcn=dict(data=2))
  with pytest.raises(ValueError, match="config.mesh_dcn.dta: not a mesh axis"):
    mesh_lib.make_mesh(dict(data=8), dcn=dict(dta=2))
  # Every axis inside one slice: the plain layout.
  assert mesh_lib.make_mesh(dict(data=8), dcn=dict(data=1)).shape["data"] == 8


def test_batch_shares_follow_the_devices_of_each_process():
  # data=2 across 2 processes: halves. 4 processes, 2 per data index: the
  # two processes of a data index feed the same half.
  assert mesh_lib.share_of({0: {0, 1}, 1: {2, 3}}, 1, 4) == (1, 2)
  assert mesh_lib.share_of({0: {0}, 1: {0}, 2: {1}, 3: {1}}, 3, 2) == (1, 2)
  assert mesh_lib.share_of({0: {0, 1}, 1: {0, 1}}, 1, 2) == (0, 1)
  with pytest.raises(mesh_lib.ShareError, match="config.mesh"):
    mesh_lib.share_of({0: {0, 2}, 1: {1, 3}}, 0, 4)
  with pytest.raises(mesh_lib.ShareError, match="config.mesh"):
    mesh_lib.share_of({0: {0}, 1: {1, 2, 3}}, 0, 4)


def test_a_tpu_slice_takes_any_mesh_of_its_chips(monkeypatch):
  """A mesh axis that is no product of whole torus axes (2 x 64 on a
  4x4x8 v5p slice) splits one: jax.make_mesh refused it, so training on
  such a slice failed before its first step. The slice's chips come from
  libtpu without hardware (as lm/run/aot.py compiles for them)."""
  pytest.importorskip("libtpu", reason="TPU chips without hardware")
  from jax.experimental import topologies  # noqa: PLC0415
  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  devices = topologies.get_topology_desc(
      platform="tpu", topology_name="v5p:4x4x8").devices
  for sizes in (dict(data=2, fsdp=64), dict(data=1, fsdp=128),
                dict(data=4, fsdp=8, tensor=4)):
    mesh = mesh_lib.make_mesh(sizes, devices=devices)
    assert {a: mesh.shape[a] for a in sizes} == sizes
    assert sorted(d.id for d in mesh.devices.flat) == list(range(128))
  # Where whole torus axes fit, they are used as before: tensor=8 is one
  # 8-chip ring.
  mesh = mesh_lib.make_mesh(dict(data=16, tensor=8), devices=devices)
  ring = [d.coords for d in mesh.devices[0, 0, 0, 0, 0, :]]
  assert len({tuple(c[:2]) for c in ring}) == 1
