"""Hugging Face Llama/Qwen2 tensors <-> our parameter tree, streamed.

Hugging Face stores a projection as torch's Linear weight, out x in
(q_proj: H*K x D); we keep head axes (q: D x H x K, o: H x K x D) and the
input axis first. Each conversion is a transpose and a reshape: exact, so
import -> export gives back the same bits.

Import reads one tensor at a time from memory-mapped safetensors files and
places it straight onto its target sharding with
`jax.make_array_from_callback`: each process reads only what its devices
hold, and host memory stays near one tensor (plus what the devices hold,
which on a CPU is host memory too). Export gathers one tensor at a time and
writes shards of at most `max_shard_bytes`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lm.checks import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFWeightsError(UserError):
  """Missing, unexpected or misshapen tensors in a Hugging Face folder."""


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One Hugging Face tensor: where it lives in our tree and how it maps.
  `path` is the leaf's key path; `layer` indexes the leading axis of a
  scanned (stacked) leaf, None otherwise. `to_ours(hf)` gives the leaf (or
  its layer slice); `to_hf(ours)` the inverse."""
  name: str
  path: tuple
  layer: int | None
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  # (our index, our shape) -> (the Hugging Face block that holds exactly
  # that part of our array, block -> our part), or None where a part is not
  # one block; the import then reads only what each device holds.
  part: Callable | None = None


def _span(s: slice, dim: int) -> tuple[int, int]:
  start, stop, step = s.indices(dim)
  assert step == 1, "shards are contiguous"
  return start, stop


def _whole(index, shape) -> bool:
  return all(_span(s, d) == (0, d) for s, d in zip(index, shape))


def _same_part(index, shape):
  del shape
  return tuple(index), lambda block: block


def _proj_part(index, shape):
  """Ours d_in x O1 x O2...; theirs (O1*O2...) x d_in: a run of O1 is a
  run of their rows when O2... are whole."""
  if not _whole(index[2:], shape[2:]):
    return None
  rest = int(np.prod(shape[2:]))
  (i0, i1), (o0, o1) = _span(index[0], shape[0]), _span(index[1], shape[1])
  return ((slice(o0 * rest, o1 * rest), slice(i0, i1)),
          lambda block: np.ascontiguousarray(block.T).reshape(
              i1 - i0, o1 - o0, *shape[2:]))


def _o_part(index, shape):
  """Ours H x K x D; theirs D x (H*K)."""
  if not _whole(index[1:2], shape[1:2]):
    return None
  K = shape[1]
  (h0, h1), (d0, d1) = _span(index[0], shape[0]), _span(index[2], shape[2])
  return ((slice(d0, d1), slice(h0 * K, h1 * K)),
          lambda block: np.ascontiguousarray(block.T).reshape(
              h1 - h0, K, d1 - d0))


def _bias_part(index, shape):
  """Ours H x K (or D); theirs H*K."""
  if not _whole(index[1:], shape[1:]):
    return None
  rest = int(np.prod(shape[1:]))
  h0, h1 = _span(index[0], shape[0])
  return ((slice(h0 * rest, h1 * rest),),
          lambda block: block.reshape(h1 - h0, *shape[1:]))


def tensors(cfg) -> list[Tensor]:
  """Every Hugging Face tensor of transformer Config `cfg`, in the order
  transformers' state dict has them."""
  D, F, H, N, K, V = (cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads,
                      cfg.k, cfg.vocab_size)
  G = H // N
  same = (lambda w: w, lambda w: w, _same_part)

  def proj(d_in: int, out_shape: tuple):
    """Ours: d_in x out_shape; Hugging Face: prod(out_shape) x d_in."""
    out = int(np.prod(out_shape))
    return (lambda w: np.ascontiguousarray(w.T).reshape(d_in, *out_shape),
            lambda w: np.ascontiguousarray(w.reshape(d_in, out).T),
            _proj_part)

  def o_proj():
    """Ours: H x K x D; Hugging Face: D x H*K."""
    return (lambda w: np.ascontiguousarray(w.T).reshape(H, K, D),
            lambda w: np.ascontiguousarray(w.reshape(H * K, D).T), _o_part)

  def bias(shape: tuple):
    return (lambda b: b.reshape(shape), lambda b: b.reshape(-1), _bias_part)

  out = [Tensor("model.embed_tokens.weight", ("transformer", "embedding"),
                None, *same)]
  for i in range(cfg.n_layers):
    hf = f"model.layers.{i}."
    if cfg.scan_layers:
      block, layer = ("transformer", "blocks"), i
    else:
      block, layer = ("transformer", "blocks", i), None

    def add(name, path, maps, hf=hf, block=block, layer=layer):
      out.append(Tensor(hf + name, block + path, layer, *maps))

    attn = []
    if cfg.fused_qkv:
      # Our fused D x N x (G+2) x K: per kv head, its G query heads, k, v.
      fused = ("attn", "qkv", "kernel")
      fused_b = ("attn", "qkv", "bias")
      q_to_hf = proj(D, (H, K))[1]
      kv_to_hf = proj(D, (N, K))[1]
      attn += [
          ("self_attn.q_proj.weight", fused,
           (None, lambda w: q_to_hf(w[:, :, :G].reshape(D, H, K)))),
          ("self_attn.k_proj.weight", fused,
           (None, lambda w: kv_to_hf(w[:, :, G]))),
          ("self_attn.v_proj.weight", fused,
           (None, lambda w: kv_to_hf(w[:, :, G + 1])))]
      if cfg.qkv_bias:
        attn += [
            ("self_attn.q_proj.bias", fused_b,
             (None, lambda b: b[:, :G].reshape(-1))),
            ("self_attn.k_proj.bias", fused_b,
             (None, lambda b: b[:, G].reshape(-1))),
            ("self_attn.v_proj.bias", fused_b,
             (None, lambda b: b[:, G + 1].reshape(-1)))]
    else:
      for p, heads in (("q", H), ("k", N), ("v", N)):
        attn.append((f"self_attn.{p}_proj.weight", ("attn", p, "kernel"),
                     proj(D, (heads, K))))
        if cfg.qkv_bias:
          attn.append((f"self_attn.{p}_proj.bias", ("attn", p, "bias"),
                       bias((heads, K))))
    attn.append(("self_attn.o_proj.weight", ("attn", "o", "kernel"),
                 o_proj()))
    if cfg.out_bias:
      attn.append(("self_attn.o_proj.bias", ("attn", "o", "bias"), same))
    for name, path, maps in attn:
      add(name, path, maps)
    add("mlp.gate_proj.weight", ("mlp", "gate", "kernel"), proj(D, (F,)))
    add("mlp.up_proj.weight", ("mlp", "up", "kernel"), proj(D, (F,)))
    add("mlp.down_proj.weight", ("mlp", "down", "kernel"), proj(F, (D,)))
    add("input_layernorm.weight", ("attn_norm", "scale"), same)
    add("post_attention_layernorm.weight", ("mlp_norm", "scale"), same)
  out.append(Tensor("model.norm.weight", ("transformer", "final_norm",
                                          "scale"), None, *same))
  if not cfg.tie_embeddings:
    out.append(Tensor("lm_head.weight", ("head", "kernel"), None,
                      *proj(D, (V,))))
  return out


class Folder:
  """The safetensors files of a Hugging Face model folder: one file, or
  shards named by model.safetensors.index.json. Each read opens its file
  and closes it again: the memory map (whose touched pages count as the
  process's memory while mapped) lives for one tensor."""

  def __init__(self, hf_dir: Path):
    self.dir = Path(hf_dir)
    index = self.dir / INDEX
    if index.exists():
      try:
        self.file_of = json.loads(index.read_text())["weight_map"]
      except (ValueError, KeyError) as e:
        raise HFWeightsError(f"{index} is not a safetensors index "
                             f"(JSON with a weight_map): {e}.") from None
    elif (self.dir / SINGLE).exists():
      with self._open(SINGLE) as f:
        self.file_of = {name: SINGLE for name in f.keys()}
    else:
      raise HFWeightsError(
          f"{self.dir} holds neither {SINGLE} nor {INDEX}: only safetensors "
          "checkpoints are read (convert a pytorch_model.bin with "
          "transformers' save_pretrained(..., safe_serialization=True)).")

  def _open(self, file: str):
    path = self.dir / file
    if not path.exists():
      raise HFWeightsError(f"{path} is named by {INDEX} but does not exist.")
    try:
      return safe_open(str(path), framework="numpy")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own kinds.
      raise HFWeightsError(f"{path} is not a readable safetensors file: "
                           f"{e}.") from None

  def shape(self, name: str) -> tuple:
    with self._open(self.file_of[name]) as f:
      return tuple(f.get_slice(name).get_shape())

  def read(self, name: str, index: tuple | None = None) -> np.ndarray:
    """The tensor, or only its block `index` (a tuple of slices): then only
    those bytes of the file are read."""
    with self._open(self.file_of[name]) as f:
      if index is None:
        return f.get_tensor(name)
      return f.get_slice(name)[index]


# Buffers some checkpoints carry that are recomputed, not weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def check_folder(folder: Folder, cfg, specs: list[Tensor],
                 abstract_params) -> None:
  """Every tensor present with the shape the config implies, nothing
  unexpected; reads only the files' headers."""
  wanted = {t.name for t in specs}
  have = set(folder.file_of)
  missing = sorted(wanted - have)
  if missing:
    raise HFWeightsError(
        f"{folder.dir}: {len(missing)} tensor(s) the config.json implies are "
        f"missing, e.g. {missing[:3]}.")
  extra = sorted(n for n in have - wanted
                 if not n.endswith(_IGNORED_SUFFIXES)
                 and not (n == "lm_head.weight" and cfg.tie_embeddings))
  if extra:
    raise HFWeightsError(
        f"{folder.dir}: {len(extra)} tensor(s) this architecture does not "
        f"have, e.g. {extra[:3]}: the config.json does not describe these "
        "weights.")
  for t in specs:
    leaf = _at(abstract_params, t.path)
    ours = leaf.shape[1:] if t.layer is not None else leaf.shape
    expected = t.to_hf(np.empty(ours, np.uint8)).shape
    if folder.shape(t.name) != expected:
      raise HFWeightsError(
          f"{folder.dir}: {t.name} has shape {folder.shape(t.name)}; the "
          f"config.json implies {expected}.")


def _at(tree, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def read(folder: Folder, specs: list[Tensor], abstract_params,
         stats: dict | None = None) -> dict:
  """The parameter tree, each leaf placed on its abstract leaf's sharding
  and dtype. Each device's part is read as one block of its Hugging Face
  tensor where it is one (every layout here, unless head_dim is sharded),
  else from the whole tensor, converted once and held until the next; a
  part several devices hold (replicas) is read once. At most one leaf's
  parts are held at a time. `stats["bytes_read"]` counts what this process
  read."""
  by_path: dict[tuple, list[Tensor]] = {}
  for t in specs:
    by_path.setdefault(t.path, []).append(t)
  params = jax.tree.map(lambda x: x, abstract_params)  # Same structure.
  stats = {} if stats is None else stats
  stats.setdefault("bytes_read", 0)
  cache: dict[str, np.ndarray] = {}

  parts: dict[tuple, np.ndarray] = {}  # One leaf's, for its replicas.

  def part(t: Tensor, index: tuple, shape: tuple, dtype) -> np.ndarray:
    how = t.part(index, shape) if t.part else None
    if how is not None:
      key = (t.name, tuple(_span(s, d) for s, d in zip(index, shape)))
      if key not in parts:
        block = folder.read(t.name, how[0])
        stats["bytes_read"] += block.nbytes
        parts[key] = how[1](block).astype(dtype)
      return parts[key]
    if t.name not in cache:
      cache.clear()
      whole = folder.read(t.name)
      stats["bytes_read"] += whole.nbytes
      cache[t.name] = t.to_ours(whole).astype(dtype)
    return cache[t.name][index]

  for path, group in by_path.items():
    leaf = _at(abstract_params, path)
    layers = {t.layer: t for t in group}

    def shard(index, leaf=leaf, layers=layers):
      index = tuple(index)
      if None in layers:
        return part(layers[None], index, leaf.shape, leaf.dtype)
      rows = range(*index[0].indices(leaf.shape[0]))
      return np.stack([part(layers[i], index[1:], leaf.shape[1:], leaf.dtype)
                       for i in rows])

    _set(params, path, jax.make_array_from_callback(
        leaf.shape, leaf.sharding, shard, dtype=leaf.dtype))
    cache.clear()
    parts.clear()
  return params


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int
                ) -> list[list[str]]:
  """Tensor names in order, cut into files of at most max_shard_bytes (a
  larger tensor gets a file of its own)."""
  files, current, size = [], [], 0
  for name, n in sizes:
    if current and size + n > max_shard_bytes:
      files.append(current)
      current, size = [], 0
    current.append(name)
    size += n
  return files + ([current] if current else [])


def write(params, specs: list[Tensor], out_dir: Path, dtype,
          max_shard_bytes: int) -> list[str]:
  """Writes the tensors as safetensors (one file, or shards and an index
  above max_shard_bytes), gathering one tensor at a time. Returns the files
  written."""
  dtype = np.dtype(dtype)
  by_name = {t.name: t for t in specs}

  def value(t: Tensor) -> np.ndarray:
    leaf = _at(params, t.path)
    if t.layer is not None:
      leaf = leaf[t.layer]
    return np.asarray(t.to_hf(np.asarray(jax.device_get(leaf)))).astype(dtype)

  def nbytes(t: Tensor) -> int:
    leaf = _at(params, t.path)
    shape = leaf.shape[1:] if t.layer is not None else leaf.shape
    return int(np.prod(shape)) * dtype.itemsize

  groups = plan_shards([(t.name, nbytes(t)) for t in specs], max_shard_bytes)
  names = ([SINGLE] if len(groups) == 1 else
           [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            for i in range(len(groups))])
  weight_map = {}
  for file, group in zip(names, groups):
    tensors_ = {n: value(by_name[n]) for n in group}
    save_file(tensors_, str(out_dir / file), metadata={"format": "pt"})
    weight_map.update({n: file for n in group})
    del tensors_
  if len(names) > 1:
    total = sum(nbytes(t) for t in specs)
    (out_dir / INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map},
        indent=2) + "\n")
  return names
