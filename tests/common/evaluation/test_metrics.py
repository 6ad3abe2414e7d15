"""The metrics module's own ROC-AUC, ROC curve and PR-AUC against scikit-learn's, ties included."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from common.evaluation.metrics import average_precision, average_ranks, binary_metrics, bootstrap_ci, roc_auc, roc_curve


@pytest.mark.parametrize("decimals", [1, 2, 6])  # 1 decimal: many tied scores
def test_auc_roc_curve_and_average_precision_equal_scikit_learn(decimals):
    rng = np.random.default_rng(decimals)
    for _ in range(200):
        n = int(rng.integers(2, 300))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        p = np.round(rng.random(n) * 0.5 + 0.5 * y * rng.random(n), decimals)
        np.testing.assert_array_equal(average_ranks(p), rankdata(p))
        assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert average_precision(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)
        fpr, tpr = roc_curve(y, p)
        sk_fpr, sk_tpr, _ = sk_roc_curve(y, p)
        np.testing.assert_allclose(fpr, sk_fpr, rtol=0, atol=1e-12)
        np.testing.assert_allclose(tpr, sk_tpr, rtol=0, atol=1e-12)


def test_binary_metrics_give_nan_auc_with_one_class_and_the_bootstrap_skips_it():
    m = binary_metrics(np.zeros(5), np.linspace(-1, 1, 5))
    assert np.isnan(m["roc_auc"]) and np.isnan(m["pr_auc"]) and m["specificity"] == pytest.approx(0.4)
    # two patients, one with only negatives: resamples of that patient alone have no AUC
    y, z, g = np.array([1, 0, 0, 0]), np.array([2.0, -1.0, -2.0, 0.5]), np.array([0, 0, 1, 1])
    lo, hi = bootstrap_ci(y, z, g, n_boot=200)["roc_auc"]
    assert 0.5 <= lo <= hi == 1.0
