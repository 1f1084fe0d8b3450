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
