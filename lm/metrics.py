"""Host-side evaluation metrics: the trainer gathers eval predictions to the
host and calls these on numpy arrays. Everything is computed in float64 so the
numbers match reference implementations (scikit-learn, pytorch-fid) closely.

Letters: N, M examples, C classes, D feature dim, H x W image, K channels.
"""
from __future__ import annotations

import numpy as np
from etils import epath

# scipy is imported where it is used: scipy.stats alone adds ~60 MB to the
# resident memory of every process that imports lm.tasks, and language-model
# runs never call it.


def confusion_matrix(labels_N: np.ndarray, preds_N: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """C x C int64 counts; rows are the true class, columns the predicted."""
  labels_N = np.asarray(labels_N, np.int64).ravel()
  preds_N = np.asarray(preds_N, np.int64).ravel()
  both = np.concatenate([labels_N, preds_N])
  if ((both < 0) | (both >= num_classes)).any():
    raise ValueError(f"labels and preds must lie in [0, {num_classes})")
  return np.bincount(labels_N * num_classes + preds_N,
                     minlength=num_classes ** 2).reshape(
                         num_classes, num_classes).astype(np.int64)


def _binary_auc(is_pos_N: np.ndarray, score_N: np.ndarray) -> float:
  # Mann-Whitney U with average ranks == trapezoidal ROC area, no curve.
  import scipy.stats  # noqa: PLC0415 (see the imports)
  n_pos = is_pos_N.sum()
  rank_sum = scipy.stats.rankdata(score_N)[is_pos_N].sum()
  return float((rank_sum - n_pos * (n_pos + 1) / 2)
               / (n_pos * (is_pos_N.size - n_pos)))


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  return np.where(den > 0, num / np.maximum(den, 1), 0.0)


def classification(labels_N: np.ndarray,
                   probs_NxC: np.ndarray) -> dict[str, float]:
  """Accuracy plus macro precision / recall / F1 / one-vs-rest ROC AUC.

  Predictions are argmax(probs) (ties go to the lowest index). Macro averages
  run over all C classes; a class with an empty denominator scores 0 (as
  scikit-learn's zero_division=0). For roc_auc, a class with no positive or
  no negative example among the labels has no defined AUC and is skipped (the
  mean runs over the rest); nan if every class is skipped.
  """
  labels_N = np.asarray(labels_N, np.int64).ravel()
  probs_NxC = np.asarray(probs_NxC, np.float64)
  num_classes = probs_NxC.shape[1]
  cm_CxC = confusion_matrix(labels_N, probs_NxC.argmax(axis=1), num_classes)
  tp_C, pred_C, true_C = (x.astype(np.float64) for x in (
      np.diag(cm_CxC), cm_CxC.sum(axis=0), cm_CxC.sum(axis=1)))
  aucs = [_binary_auc(labels_N == c, probs_NxC[:, c])
          for c in range(num_classes) if 0 < true_C[c] < labels_N.size]
  return dict(
      accuracy=float(tp_C.sum() / labels_N.size),
      precision=float(_safe_div(tp_C, pred_C).mean()),
      recall=float(_safe_div(tp_C, true_C).mean()),
      # 2tp / (2tp + fp + fn): the harmonic mean without dividing by p + r.
      f1=float(_safe_div(2 * tp_C, pred_C + true_C).mean()),
      roc_auc=float(np.mean(aucs)) if aucs else float("nan"))


def save_confusion_png(cm_CxC: np.ndarray, class_names: list[str], path: str,
                       title: str = "") -> None:
  """Heatmap of counts (true rows, predicted columns) with the counts written
  in the cells."""
  # Figure + Agg canvas, not pyplot: no global backend or figure registry.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415
  cm_CxC = np.asarray(cm_CxC)
  size = max(4.0, 0.6 * len(cm_CxC) + 2.0)
  fig = Figure(figsize=(size, size), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  ax.imshow(cm_CxC, cmap="Blues", vmin=0)
  names, ticks = [str(n) for n in class_names], np.arange(len(cm_CxC))
  ax.set_xticks(ticks, names, rotation=45, ha="right")
  ax.set_yticks(ticks, names)
  ax.set(xlabel="predicted", ylabel="true", title=title)
  for i, j in np.ndindex(cm_CxC.shape):  # white text on the dark cells.
    ax.text(j, i, str(cm_CxC[i, j]), ha="center", va="center", fontsize=8,
            color="white" if cm_CxC[i, j] > cm_CxC.max() / 2 else "black")
  fig.tight_layout()
  with epath.Path(path).open("wb") as f:  # Local or gs://.
    fig.savefig(f, format="png")


def frechet_distance(feats_a_NxD: np.ndarray, feats_b_MxD: np.ndarray,
                     eps: float = 1e-6) -> float:
  """||mu_a - mu_b||^2 + Tr(Ca + Cb - 2 sqrtm(Ca Cb)) of the two sets' sample
  means and (ddof=1) covariances; FID when the features are Inception's."""
  import scipy.linalg  # noqa: PLC0415 (see the imports)
  a_NxD, b_MxD = (np.asarray(f, np.float64) for f in (feats_a_NxD, feats_b_MxD))
  diff_D = a_NxD.mean(axis=0) - b_MxD.mean(axis=0)
  cov_a_DxD, cov_b_DxD = (np.atleast_2d(np.cov(f, rowvar=False))
                          for f in (a_NxD, b_MxD))
  covmean_DxD = scipy.linalg.sqrtm(cov_a_DxD @ cov_b_DxD)
  if not np.isfinite(covmean_DxD).all():
    # Singular product (e.g. fewer samples than dims): as pytorch-fid, retry
    # with a small ridge on both covariances.
    offset_DxD = eps * np.eye(diff_D.size)
    covmean_DxD = scipy.linalg.sqrtm(
        (cov_a_DxD + offset_DxD) @ (cov_b_DxD + offset_DxD))
  # sqrtm of a product of PSD matrices is real up to round-off.
  dist = (diff_D @ diff_D + np.trace(cov_a_DxD) + np.trace(cov_b_DxD)
          - 2 * np.trace(covmean_DxD).real)
  return float(max(dist, 0.0))  # round-off can go slightly negative.


def classifier_score(probs_NxC: np.ndarray, eps: float = 1e-12) -> float:
  """Inception-score analogue exp(mean_i KL(p(y|x_i) || p(y))), p(y) the mean
  prediction: 1 if every prediction is the same, C if they are confident and
  spread evenly over the C classes."""
  probs_NxC = np.asarray(probs_NxC, np.float64)
  marginal_C = probs_NxC.mean(axis=0)
  kl_N = (probs_NxC * (np.log(probs_NxC + eps)
                       - np.log(marginal_C + eps))).sum(axis=1)
  return float(np.exp(kl_N.mean()))


def save_image_grid_png(images_NxHxWxK: np.ndarray, path: str, ncols: int = 10,
                        min_tile: int = 32, gap: int = 2) -> None:
  """Tiles images in [-1, 1] into a grid (row-major, ncols wide, gray gaps of
  `gap` px around every tile). Each image is upscaled nearest-neighbour by the
  smallest integer factor that makes its shorter side >= min_tile px, so
  8 x 8 digits stay visible. K is 1 (grayscale) or 3 (RGB)."""
  from PIL import Image  # noqa: PLC0415
  images = np.clip(np.asarray(images_NxHxWxK, np.float64), -1.0, 1.0)
  n, h, w, k = images.shape
  if k not in (1, 3):
    raise ValueError(f"need 1 or 3 channels, got {k}")
  pixels = np.round((images + 1.0) * 127.5).astype(np.uint8)
  scale = max(1, -(-min_tile // min(h, w)))
  pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
  th, tw, cols = h * scale, w * scale, min(ncols, n)
  rows = -(-n // cols)
  # Mid gray separates tiles whether digits are light on dark or the reverse.
  grid = np.full((rows * (th + gap) + gap, cols * (tw + gap) + gap, k), 128,
                 np.uint8)
  for i in range(n):
    r, c = divmod(i, cols)
    y, x = gap + r * (th + gap), gap + c * (tw + gap)
    grid[y:y + th, x:x + tw] = pixels[i]
  with epath.Path(path).open("wb") as f:  # Local or gs://.
    Image.fromarray(grid[..., 0] if k == 1 else grid).save(f, format="png")
