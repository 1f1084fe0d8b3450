"""lm.metrics against scikit-learn / scipy references and closed forms."""
import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats
from PIL import Image
from sklearn import metrics as skm

from lm import metrics

N = 500


def _probs(rng: np.random.Generator, labels_N: np.ndarray, num_classes: int,
           signal: float) -> np.ndarray:
  # Informative (not chance-level) predictions so AUCs and F1s are spread out.
  logits_NxC = rng.normal(size=(len(labels_N), num_classes))
  logits_NxC[np.arange(len(labels_N)), labels_N] += signal
  return scipy.special.softmax(logits_NxC, axis=1)


def _sklearn_reference(labels_N, probs_NxC, num_classes):
  preds_N = np.argmax(probs_NxC, axis=1)
  kw = dict(average="macro", labels=range(num_classes), zero_division=0)
  present = [c for c in range(num_classes)
             if 0 < (labels_N == c).sum() < len(labels_N)]
  if len(present) == num_classes:
    auc = skm.roc_auc_score(labels_N, probs_NxC, multi_class="ovr",
                            average="macro")
  else:
    auc = np.mean([skm.roc_auc_score(labels_N == c, probs_NxC[:, c])
                   for c in present])
  return dict(accuracy=skm.accuracy_score(labels_N, preds_N),
              precision=skm.precision_score(labels_N, preds_N, **kw),
              recall=skm.recall_score(labels_N, preds_N, **kw),
              f1=skm.f1_score(labels_N, preds_N, **kw),
              roc_auc=auc)


def _assert_matches_sklearn(labels_N, probs_NxC):
  num_classes = probs_NxC.shape[1]
  got = metrics.classification(labels_N, probs_NxC)
  want = _sklearn_reference(labels_N, probs_NxC, num_classes)
  assert set(got) == set(want)
  for key in want:
    assert isinstance(got[key], float)
    np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-12,
                               err_msg=key)
  np.testing.assert_array_equal(
      metrics.confusion_matrix(labels_N, probs_NxC.argmax(1), num_classes),
      skm.confusion_matrix(labels_N, probs_NxC.argmax(1),
                           labels=range(num_classes)))


@pytest.mark.parametrize("num_classes", [10, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_matches_sklearn(seed, num_classes):
  rng = np.random.default_rng(seed)
  labels_N = rng.integers(0, num_classes, N)
  _assert_matches_sklearn(labels_N,
                          _probs(rng, labels_N, num_classes, signal=seed))


@pytest.mark.parametrize("seed", [0, 1])
def test_class_never_predicted(seed):
  rng = np.random.default_rng(seed)
  labels_N = rng.integers(0, 10, N)
  probs_NxC = _probs(rng, labels_N, 10, signal=1.0)
  probs_NxC[:, 3] *= 1e-3  # still ranks for AUC, never the argmax.
  probs_NxC /= probs_NxC.sum(axis=1, keepdims=True)
  assert 3 not in probs_NxC.argmax(1) and 3 in labels_N
  _assert_matches_sklearn(labels_N, probs_NxC)


@pytest.mark.parametrize("num_classes", [10, 4])
def test_class_absent_from_labels_is_skipped_in_auc(num_classes):
  rng = np.random.default_rng(7)
  labels_N = rng.integers(0, num_classes - 1, N)
  labels_N[labels_N == 1] = num_classes - 1  # class 1 absent, last present.
  probs_NxC = _probs(rng, labels_N, num_classes, signal=1.0)
  assert 1 not in labels_N and 1 in probs_NxC.argmax(1)
  _assert_matches_sklearn(labels_N, probs_NxC)


def test_ties_in_scores_and_argmax():
  rng = np.random.default_rng(3)
  labels_N = rng.integers(0, 4, N)
  # Coarse scores: many tied AUC ranks and tied argmaxes (lowest index wins).
  probs_NxC = rng.integers(1, 4, (N, 4)).astype(np.float64)
  probs_NxC /= probs_NxC.sum(axis=1, keepdims=True)
  assert (np.sort(probs_NxC, axis=1)[:, -1] == np.sort(probs_NxC, 1)[:, -2]
          ).any()
  _assert_matches_sklearn(labels_N, probs_NxC)


def test_single_class_labels_give_nan_auc():
  probs_NxC = np.random.default_rng(0).dirichlet(np.ones(3), 20)
  result = metrics.classification(np.zeros(20, int), probs_NxC)
  assert np.isnan(result["roc_auc"]) and 0 <= result["accuracy"] <= 1


def test_confusion_matrix_matches_sklearn():
  rng = np.random.default_rng(0)
  labels_N, preds_N = rng.integers(0, 6, N), rng.integers(0, 5, N)
  cm_CxC = metrics.confusion_matrix(labels_N, preds_N, 6)
  assert cm_CxC.dtype == np.int64 and cm_CxC.sum() == N
  np.testing.assert_array_equal(
      cm_CxC, skm.confusion_matrix(labels_N, preds_N, labels=range(6)))
  with pytest.raises(ValueError):
    metrics.confusion_matrix(labels_N, preds_N, 5)


def _exact_gaussian_sample(rng, mean_D, var_D, n):
  """n points whose sample mean is exactly mean_D and whose (ddof=1) sample
  covariance is exactly diag(var_D): whitened noise, rescaled."""
  z_NxD = rng.normal(size=(n, len(mean_D)))
  q_NxD, _ = np.linalg.qr(z_NxD - z_NxD.mean(axis=0))
  return q_NxD * np.sqrt((n - 1) * var_D) + mean_D


def _diag_gaussian_fd(mean_a, var_a, mean_b, var_b):
  # Diagonal covariances commute: Tr(sqrtm(Ca Cb)) = sum(sqrt(va * vb)).
  return (np.sum((mean_a - mean_b) ** 2)
          + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2))


def test_frechet_distance_closed_form():
  rng = np.random.default_rng(0)
  d = 12
  mean_a, mean_b = rng.normal(size=d), rng.normal(size=d)
  var_a, var_b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
  a_NxD = _exact_gaussian_sample(rng, mean_a, var_a, 3000)
  b_MxD = _exact_gaussian_sample(rng, mean_b, var_b, 2000)
  want = _diag_gaussian_fd(mean_a, var_a, mean_b, var_b)
  np.testing.assert_allclose(metrics.frechet_distance(a_NxD, b_MxD), want,
                             rtol=1e-9)
  # A shared rotation makes the covariances full but keeps the distance.
  rot_DxD, _ = np.linalg.qr(rng.normal(size=(d, d)))
  np.testing.assert_allclose(
      metrics.frechet_distance(a_NxD @ rot_DxD, b_MxD @ rot_DxD), want,
      rtol=1e-9)
  # Plain (not whitened) large samples approach the population value.
  a_NxD = mean_a + np.sqrt(var_a) * rng.normal(size=(200_000, d))
  b_MxD = mean_b + np.sqrt(var_b) * rng.normal(size=(200_000, d))
  np.testing.assert_allclose(metrics.frechet_distance(a_NxD, b_MxD), want,
                             rtol=0.02)


def test_frechet_distance_self_symmetric_and_far():
  rng = np.random.default_rng(1)
  a_NxD = rng.normal(size=(1000, 16)) @ rng.normal(size=(16, 16))
  b_MxD = rng.normal(size=(700, 16)) * 2 + 0.5
  scale = np.trace(np.cov(a_NxD, rowvar=False))
  self_fd = metrics.frechet_distance(a_NxD, a_NxD)
  assert 0 <= self_fd < 1e-6 * scale
  np.testing.assert_allclose(metrics.frechet_distance(a_NxD, b_MxD),
                             metrics.frechet_distance(b_MxD, a_NxD),
                             rtol=1e-9)
  far_MxD = rng.normal(size=(1000, 16)) + 10.0  # mean shift of 10 per dim.
  near = metrics.frechet_distance(rng.normal(size=(1000, 16)),
                                  rng.normal(size=(1000, 16)))
  far = metrics.frechet_distance(rng.normal(size=(1000, 16)), far_MxD)
  assert near < 1.0 and far == pytest.approx(16 * 100, rel=0.05)


def test_frechet_distance_singular_covariances():
  rng = np.random.default_rng(2)
  # Fewer samples than dims: rank-deficient covariances.
  a_NxD, b_MxD = rng.normal(size=(5, 20)), rng.normal(size=(6, 20)) + 1
  for x, y in ((a_NxD, b_MxD), (a_NxD, a_NxD)):
    fd = metrics.frechet_distance(x, y)
    assert np.isfinite(fd) and fd >= 0
  assert metrics.frechet_distance(a_NxD, a_NxD) < 1e-3


def test_frechet_distance_retries_non_finite_sqrtm(monkeypatch):
  # scipy rarely returns a non-finite sqrtm; force one to reach the eps retry.
  rng = np.random.default_rng(3)
  a_NxD, b_MxD = rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) + 1
  want = metrics.frechet_distance(a_NxD, b_MxD)
  calls = []
  real_sqrtm = scipy.linalg.sqrtm

  def flaky_sqrtm(m):
    calls.append(m)
    return real_sqrtm(m) * (np.nan if len(calls) == 1 else 1.0)

  monkeypatch.setattr(scipy.linalg, "sqrtm", flaky_sqrtm)
  np.testing.assert_allclose(metrics.frechet_distance(a_NxD, b_MxD), want,
                             rtol=1e-4)
  assert len(calls) == 2


@pytest.mark.parametrize("num_classes", [10, 4])
def test_classifier_score(num_classes):
  one_hot_NxC = np.eye(num_classes)[np.arange(50 * num_classes) % num_classes]
  np.testing.assert_allclose(metrics.classifier_score(one_hot_NxC),
                             num_classes, rtol=1e-9)
  rng = np.random.default_rng(0)
  same_NxC = np.tile(rng.dirichlet(np.ones(num_classes)), (100, 1))
  np.testing.assert_allclose(metrics.classifier_score(same_NxC), 1.0,
                             atol=1e-12)
  probs_NxC = rng.dirichlet(np.full(num_classes, 0.3), 400)
  marginal_C = probs_NxC.mean(axis=0)
  want = np.exp(np.mean([scipy.stats.entropy(p, marginal_C)
                         for p in probs_NxC]))
  got = metrics.classifier_score(probs_NxC)
  np.testing.assert_allclose(got, want, rtol=1e-9)
  assert 1 < got < num_classes


def test_save_confusion_png(tmp_path):
  cm_CxC = np.random.default_rng(0).integers(0, 50, (10, 10))
  path = tmp_path / "cm.png"
  metrics.save_confusion_png(cm_CxC, [f"c{i}" for i in range(10)], str(path),
                             title="eval")
  with Image.open(path) as image:
    assert image.format == "PNG"
    width, height = image.size
    assert width == height >= 400
    assert len(np.unique(np.asarray(image.convert("L")))) > 10


@pytest.mark.parametrize("shape,ncols,scale,mode", [
    ((23, 8, 8, 1), 10, 4, "L"),     # 8x8 digits -> 32 px tiles, 3 rows.
    ((3, 16, 16, 3), 10, 2, "RGB"),  # fewer images than ncols: one short row.
])
def test_save_image_grid_png(tmp_path, shape, ncols, scale, mode):
  n, h, w, k = shape
  images = np.random.default_rng(0).uniform(-1.5, 1.5, shape)  # some clipped.
  path = tmp_path / "grid.png"
  metrics.save_image_grid_png(images, str(path), ncols=ncols)
  cols, gap = min(ncols, n), 2
  rows, th, tw = -(-n // cols), h * scale, w * scale
  with Image.open(path) as image:
    assert image.mode == mode
    assert image.size == (cols * (tw + gap) + gap, rows * (th + gap) + gap)
    grid = np.asarray(image).reshape(image.size[1], image.size[0], k)
  want = np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)
  for i in range(n):
    r, c = divmod(i, cols)
    y, x = gap + r * (th + gap), gap + c * (tw + gap)
    np.testing.assert_array_equal(
        grid[y:y + th, x:x + tw],
        want[i].repeat(scale, axis=0).repeat(scale, axis=1))
