"""Metrics against sklearn, scipy and seqeval; SQuAD scoring on hand-computed cases."""
import numpy as np
import pytest
import scipy.stats
import seqeval.metrics
import sklearn.metrics

from mtl_jax.errors import UserError
from mtl_jax.evaluation import metrics, namespaced
from mtl_jax.evaluation.squad import normalize_answer, squad_scores

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_classification_metrics_match_sklearn(num_classes):
    for trial in range(5):
        references = RNG.integers(0, num_classes, size=200)
        predictions = np.where(RNG.random(200) < 0.6, references,
                               RNG.integers(0, num_classes, size=200))
        got = metrics.compute_metrics(("accuracy", "f1_macro", "matthews_corrcoef"), predictions,
                                      references)
        assert got["accuracy"] == pytest.approx(
            sklearn.metrics.accuracy_score(references, predictions))
        assert got["f1_macro"] == pytest.approx(
            sklearn.metrics.f1_score(references, predictions, average="macro"))
        assert got["matthews_corrcoef"] == pytest.approx(
            sklearn.metrics.matthews_corrcoef(references, predictions))
        if num_classes == 2:
            assert metrics.METRICS.get("f1")(predictions, references)["f1"] == pytest.approx(
                sklearn.metrics.f1_score(references, predictions))


def test_degenerate_classification_cases_match_sklearn():
    constant = np.zeros(10, int)
    references = np.array([0, 1] * 5)
    assert metrics.matthews_corrcoef(constant, references)["matthews_corrcoef"] == 0.0
    assert metrics.f1_binary(constant, references)["f1"] == sklearn.metrics.f1_score(
        references, constant, zero_division=0) == 0.0
    # A label present only in the predictions counts in the macro average (as sklearn).
    assert metrics.f1_macro(np.array([0, 2, 1]), np.array([0, 1, 1]))["f1_macro"] == pytest.approx(
        sklearn.metrics.f1_score([0, 1, 1], [0, 2, 1], average="macro", zero_division=0))


@pytest.mark.parametrize("num_classes", [2, 3, 6])
def test_f1_micro_and_macro_match_sklearn(num_classes):
    for trial in range(5):
        references = RNG.integers(0, num_classes, size=200)
        noise = RNG.integers(0, num_classes, size=200)
        predictions = np.where(RNG.random(200) < 0.5, references, noise)
        got = metrics.compute_metrics(("f1_micro", "f1_macro"), predictions, references)
        for average in ("micro", "macro"):
            assert got[f"f1_{average}"] == pytest.approx(
                sklearn.metrics.f1_score(references, predictions, average=average))
        if num_classes == 2:
            assert metrics.f1_binary(predictions, references)["f1"] == pytest.approx(
                sklearn.metrics.f1_score(references, predictions, average="binary"))


def test_f1_variants_hand_computed_on_three_classes():
    references, predictions = np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])
    # Label 1 alone: tp 1, fp 1, fn 0 -> 2/3. Micro: 3 right of 4 -> 3/4.
    # Macro: class 0 -> 1, class 1 -> 2/3, class 2 (tp 1, fn 1) -> 2/3; mean 7/9.
    assert metrics.f1_binary(predictions, references)["f1"] == pytest.approx(2 / 3)
    assert metrics.f1_micro(predictions, references)["f1_micro"] == pytest.approx(3 / 4)
    assert metrics.f1_macro(predictions, references)["f1_macro"] == pytest.approx(7 / 9)
    # A label only in the predictions and an empty input, as sklearn.
    assert metrics.f1_micro(np.array([0, 2, 1]), np.array([0, 1, 1]))["f1_micro"] == pytest.approx(
        sklearn.metrics.f1_score([0, 1, 1], [0, 2, 1], average="micro"))
    assert metrics.f1_micro(np.array([], int), np.array([], int))["f1_micro"] == 0.0


def test_binary_f1_on_more_than_two_classes_is_a_user_error():
    with pytest.raises(UserError) as e:
        metrics.check_metric_for_labels("trec", "f1", 6)
    assert str(e.value) == ("tasks.trec.metrics: 'f1' is binary F1 (of label 1) but the task has 6 "
                            "classes; use 'f1_macro' or 'f1_micro'")
    with pytest.raises(UserError, match="has 3 classes"):
        metrics.check_metric_for_labels("mnli", "f1", 3)
    for metric, num_labels in (("f1", 2), ("f1_macro", 6), ("f1_micro", 6), ("accuracy", 6)):
        metrics.check_metric_for_labels("trec", metric, num_labels)  # no error
    assert set(metrics.CLASS_LIMITS) <= set(metrics.METRICS.names())


def test_correlations_match_scipy():
    x = RNG.normal(size=300)
    y = 0.5 * x + RNG.normal(size=300)
    ties_x, ties_y = np.round(x), np.round(y * 2) / 2  # many ties: average ranks
    assert metrics.pearson(x, y)["pearson"] == pytest.approx(scipy.stats.pearsonr(x, y)[0])
    assert metrics.spearman(x, y)["spearman"] == pytest.approx(scipy.stats.spearmanr(x, y)[0])
    assert metrics.spearman(ties_x, ties_y)["spearman"] == pytest.approx(
        scipy.stats.spearmanr(ties_x, ties_y)[0])
    np.testing.assert_allclose(metrics.average_ranks(ties_x), scipy.stats.rankdata(ties_x))


def random_tags(n, scheme_tags):
    return [list(RNG.choice(scheme_tags, size=RNG.integers(1, 15))) for _ in range(n)]


@pytest.mark.parametrize("tags", [
    ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC"],  # IOB2 (and invalid I- starts)
    ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "E-LOC", "S-LOC"],  # IOBES
])
def test_seqeval_matches_library(tags):
    references = random_tags(300, tags)
    predictions = [[t if RNG.random() < 0.7 else RNG.choice(tags) for t in seq]
                   for seq in references]
    got = metrics.seqeval_scores(predictions, references)
    assert got["precision"] == pytest.approx(
        seqeval.metrics.precision_score(references, predictions))
    assert got["recall"] == pytest.approx(seqeval.metrics.recall_score(references, predictions))
    assert got["f1"] == pytest.approx(seqeval.metrics.f1_score(references, predictions))
    assert got["accuracy"] == pytest.approx(seqeval.metrics.accuracy_score(references, predictions))
    for seq in references[:50]:
        assert metrics.entities(seq) == set(seqeval.metrics.sequence_labeling.get_entities(seq))


def test_seqeval_hand_computed():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    # 2 of 3 predicted entities right, 2 of 3 gold.
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    got = metrics.seqeval_scores(pred, gold)
    assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert got["accuracy"] == pytest.approx(5 / 6)


def test_squad_normalization_and_scores_hand_computed():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    predictions = ["Denver Broncos", "the Carolina Panthers team", "1990", ""]
    references = [["The Denver Broncos", "Broncos"], ["Carolina Panthers"], ["in 1990", "1991"],
                  ["x"]]
    got = squad_scores(predictions, references)
    # EM: 1, 0, 0, 0. F1: 1; P=2/3 R=1 -> 0.8; vs "in 1990": P=1 R=1/2 -> 2/3; 0.
    assert got["exact_match"] == pytest.approx(1 / 4)
    assert got["f1"] == pytest.approx((1 + 0.8 + 2 / 3 + 0) / 4)


def test_metric_registry_and_namespacing():
    assert {"accuracy", "f1", "f1_macro", "f1_micro", "matthews_corrcoef", "pearson", "spearman",
            "seqeval", "squad"} <= set(metrics.METRICS.names())
    assert namespaced({"accuracy": 0.5}, "rte") == {"eval/rte/accuracy": 0.5}
