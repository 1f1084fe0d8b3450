"""The doors to the ecosystem: Hugging Face checkpoints in and out.

hf_config.py maps a Hugging Face `config.json` to `config.model` and back;
hf_weights.py maps tensors (names, layouts) and streams them between
safetensors files and sharded arrays; hf_run.py turns a Hugging Face model
folder into a run directory and a run back into a folder.
"""
