"""The figures and the page: attention maps (a PNG per layer, its heads in a
grid, tokens on the axes), token attributions (a PNG of the text with each
token's background coloured by its attribution, and the same as HTML), and
pixel attributions beside their images (a PNG).

Attributions use one diverging scale, symmetric around zero (red: the token
or pixel raised the score, blue: lowered it), scaled to the largest
absolute value of the figure.
"""
from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

CMAP = "RdBu_r"  # Negative blue, zero white, positive red.
WRAP = 80  # Characters per line of rendered text.
MAX_TICKS = 48  # Token labels per axis of an attention map.
# What a whitespace token is shown as on an axis (the text keeps it).
VISIBLE = {" ": "\u00b7", "\n": "\u21b5", "\t": "\u2192", "\r": "\u240d"}


def token_labels(tokenizer, ids) -> list[str]:
  """Each token as text: a byte of a multi-byte UTF-8 character (the byte
  tokenizer) as \\xNN, since alone it is no character."""
  out = []
  for i in ids:
    text = tokenizer.decode([int(i)])
    if "\ufffd" in text and tokenizer.spec == "byte":
      text = f"\\x{int(i):02x}"
    out.append(text)
  return out


def _visible(label: str) -> str:
  return "".join(VISIBLE.get(c, c) for c in label) or "\u2205"


def quoted(label: str) -> str:
  """A token in a sentence: quoted, whitespace made visible."""
  return f"'{_visible(label)}'"


def _pyplot():
  import matplotlib  # noqa: PLC0415 (plotting is only for these figures)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def _save(fig, path: Path, dpi: int) -> None:
  """Through the path's own open (a gs:// run directory too)."""
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=dpi)


def attention_png(probs_HxLxL: np.ndarray, labels: list[str], layer: int,
                  path: Path) -> None:
  """One layer's heads in a grid, on one colour scale (0 to the layer's
  largest probability); rows are queries, columns keys."""
  plt = _pyplot()
  H, L = probs_HxLxL.shape[:2]
  cols = min(H, 4)
  rows = math.ceil(H / cols)
  side = max(3.0, 0.16 * min(L, MAX_TICKS) + 1.2)
  fig, axes = plt.subplots(rows, cols, figsize=(side * cols + 1, side * rows),
                           squeeze=False)
  every = math.ceil(L / MAX_TICKS)
  ticks = np.arange(0, L, every)
  names = [_visible(labels[t]) for t in ticks]
  top = float(probs_HxLxL.max())
  for h, ax in enumerate(axes.flat):
    if h >= H:
      ax.axis("off")
      continue
    image = ax.imshow(probs_HxLxL[h], cmap="viridis", vmin=0.0, vmax=top,
                      interpolation="nearest")
    ax.set_title(f"layer {layer} head {h}", fontsize=9)
    ax.set_xticks(ticks, names, fontsize=6, rotation=90)
    ax.set_yticks(ticks, names, fontsize=6)
    ax.set_xlabel("key", fontsize=7)
    ax.set_ylabel("query", fontsize=7)
  fig.colorbar(image, ax=axes, fraction=0.02, pad=0.02,
               label="attention probability")
  _save(fig, path, dpi=110)
  plt.close(fig)


def _colors(scores: np.ndarray):
  """(RGBA background per score on the symmetric diverging scale, the
  text colour that reads on it, the scale's limit)."""
  from matplotlib import colormaps, colors  # noqa: PLC0415
  limit = float(np.max(np.abs(scores), initial=0.0)) or 1.0
  norm = colors.Normalize(-limit, limit)
  # The scale's ends are dark: white text on the outer 35% either way.
  ink = np.where(np.abs(scores) > 0.65 * limit, "white", "black")
  return colormaps[CMAP](norm(scores)), ink, limit


def _lines(labels: list[str]) -> list[list[tuple[int, str]]]:
  """(token index, shown text) per line: wrapped at WRAP characters, and
  after each newline (shown as a visible mark)."""
  lines, line, width = [], [], 0
  for i, label in enumerate(labels):
    shown = label.replace("\n", VISIBLE["\n"]).replace("\t", " ") or "\u2205"
    if width + len(shown) > WRAP and line:
      lines.append(line)
      line, width = [], 0
    line.append((i, shown))
    width += len(shown)
    if "\n" in label:
      lines.append(line)
      line, width = [], 0
  if line:
    lines.append(line)
  return lines


def text_png(labels: list[str], scores: np.ndarray, header: list[str],
             path: Path) -> None:
  """The text, each token on a background coloured by its score."""
  plt = _pyplot()
  from matplotlib import patches  # noqa: PLC0415
  rgba, ink, limit = _colors(scores)
  lines = _lines(labels)
  header = [*header, f"red raises the score, blue lowers it; full colour = "
            f"|attribution| {limit:.3g}"]
  char_in, row_in, font = 0.1, 0.28, 11  # DejaVu Sans Mono at 11 pt.
  width = max([WRAP] + [len(h) for h in header]) + 2
  rows = len(header) + 1 + len(lines)
  fig = plt.figure(figsize=(width * char_in, rows * row_in + 0.2))
  ax = fig.add_axes((0, 0, 1, 1))
  ax.set_xlim(0, width)
  ax.set_ylim(rows, 0)
  ax.axis("off")
  for r, text in enumerate(header):
    ax.text(1, r + 0.5, text, va="center", family="monospace",
            fontsize=font - 2)
  for r, line in enumerate(lines, start=len(header) + 1):
    col = 1
    for i, shown in line:
      ax.add_patch(patches.Rectangle((col, r + 0.08), len(shown), 0.84,
                                     facecolor=rgba[i], edgecolor="none"))
      ax.text(col, r + 0.5, shown, va="center", ha="left",
              family="monospace", fontsize=font, color=ink[i])
      col += len(shown)
  _save(fig, path, dpi=120)
  plt.close(fig)


def text_html(labels: list[str], scores: np.ndarray, header: list[str],
              path: Path) -> None:
  """The same as text_png, as an HTML page (hover a token for its value)."""
  from matplotlib import colors  # noqa: PLC0415
  rgba, ink, limit = _colors(scores)
  spans = []
  for label, color, text_color, score in zip(labels, rgba, ink, scores):
    shown = html.escape(label).replace("\n", VISIBLE["\n"] + "<br>")
    spans.append(f'<span style="background:{colors.to_hex(color)}; '
                 f'color:{text_color}" title="{score:+.4g}">{shown}</span>')
  head = "".join(f"<p>{html.escape(h)}</p>" for h in header)
  path.write_text(
      "<!doctype html>\n<html><head><meta charset=\"utf-8\">"
      "<title>Integrated gradients</title></head>\n<body>\n" + head +
      f"<p>Red raises the score, blue lowers it; full colour = "
      f"|attribution| {limit:.3g}.</p>\n"
      "<pre style=\"font-size:14px; white-space:pre-wrap\">" +
      "".join(spans) + "</pre>\n</body></html>\n")


def images_png(images_NxHxWxC: np.ndarray, attributions_NxHxWxC: np.ndarray,
               titles: list[tuple[str, str]], path: Path) -> None:
  """Each image (grey) beside its attributions (summed over channels) on
  the diverging scale of that image; `titles`: (image's, attributions')."""
  plt = _pyplot()
  n = len(images_NxHxWxC)
  fig, axes = plt.subplots(n, 2, figsize=(5.0, 2.4 * n), squeeze=False)
  for (ax_image, ax_attr), image, attr, (t_image, t_attr) in zip(
      axes, images_NxHxWxC, attributions_NxHxWxC, titles):
    ax_image.imshow(image.mean(axis=-1), cmap="gray", vmin=-1, vmax=1)
    attr_HxW = attr.sum(axis=-1)
    limit = float(np.max(np.abs(attr_HxW), initial=0.0)) or 1.0
    shown = ax_attr.imshow(attr_HxW, cmap=CMAP, vmin=-limit, vmax=limit)
    fig.colorbar(shown, ax=ax_attr, fraction=0.046, pad=0.04).ax.tick_params(
        labelsize=6)
    ax_image.set_title(t_image, fontsize=8)
    ax_attr.set_title(t_attr, fontsize=8)
    for ax in (ax_image, ax_attr):
      ax.set_xticks([])
      ax.set_yticks([])
  fig.tight_layout()
  _save(fig, path, dpi=110)
  plt.close(fig)
