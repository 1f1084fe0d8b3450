"""The training loop's behaviour around the steps: signals."""
import threading

from conftest import tiny_config
from lm.run import loop


def test_a_run_off_the_main_thread_says_signals_are_not_handled(
    tmp_path, data_dir, capsys):
  """Python handles signals on the main thread only: a run started from
  another thread trains, and says that SIGTERM will not checkpoint it."""
  errors = []

  def train():
    try:
      loop.train(tiny_config(data_dir, **{"train.steps": 2,
                                          "mesh": dict(data=-1)}), tmp_path)
    except Exception as e:  # noqa: BLE001  (reported below)
      errors.append(e)
  thread = threading.Thread(target=train)
  thread.start()
  thread.join(timeout=300)
  assert not thread.is_alive() and not errors, errors
  out = capsys.readouterr().out
  assert "not on the main thread: SIGTERM is not handled here" in out, out
  assert "step      2/2" in out
