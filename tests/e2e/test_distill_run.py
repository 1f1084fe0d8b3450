"""Distillation through the launcher, as the docs show it: a teacher run,
then a student run that names it (the FLOPs meter lowers the step that
takes the teacher's parameters)."""
import json
import os

from conftest import train_script


def test_student_trains_from_a_teacher_through_train_py(tmp_path, data_dir,
                                                        reference_run):
  teacher = reference_run  # TRAIN_ARGS' 10 steps, trained once per session.
  student = train_script(
      tmp_path / "student", data_dir, "--config.train.steps=4",
      "--config.train.eval_every=4", "--config.model.d_model=32",
      "--config.model.d_ff=64", f"--config.distill.teacher_workdir={teacher}")
  assert f"distilling from {teacher} (step 10)" in student.stdout
  assert "FLOPs per step" in student.stdout
  with open(os.path.join(tmp_path, "student", "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  train = [x for x in lines if x["split"] == "train"]
  assert len(train) == 4 and all("kd_loss" in x and "hard_loss" in x
                                 for x in train)
  assert any(x["split"] == "eval" for x in lines)
