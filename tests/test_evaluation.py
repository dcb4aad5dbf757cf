import math

import numpy as np
import pytest

from genrec.data import Example
from genrec.evaluation import paired_differences, paired_table, popularity_lists
from genrec.evaluation.metrics import ci_half_width, intra_list_diversity, user_metrics, validity


def test_user_metrics_by_hand():
    m = user_metrics([7, 3, 9], target=9, ks=[1, 3])
    assert m["recall@1"] == 0 and m["recall@3"] == 1
    assert m["ndcg@3"] == pytest.approx(1 / math.log2(4)) and m["mrr"] == pytest.approx(1 / 3)
    assert user_metrics([1, 2], target=5, ks=[2]) == {"recall@2": 0.0, "ndcg@2": 0.0, "mrr": 0.0}


def test_validity_counts_seen_duplicate_and_unknown_items():
    assert validity([1, 2, 3], history=[0], n_items=10) == 1.0
    assert validity([1, 1, 0, 99], history=[0], n_items=10) == 0.25


def test_diversity_of_identical_and_orthogonal_items():
    emb = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    assert intra_list_diversity([[0, 1]], emb) == pytest.approx(0.0)
    assert intra_list_diversity([[0, 2]], emb) == pytest.approx(1.0)


def test_popularity_skips_seen_items():
    counts = np.array([5, 9, 1, 7])
    assert popularity_lists([Example("u", (1,), 0)], counts, 2) == [[3, 0]]


def test_report_says_how_genrec_ranked():
    from genrec.evaluation import ranking_text

    base = {"users": 10, "beam_width": 20}
    assert ranking_text({**base, "ranked_by": {"beam": 10}}) == "ranked by beam search (width 20)"
    assert ranking_text(base) == "ranked by beam search (width 20)"  # reports from before ranked_by existed
    assert ranking_text({**base, "ranked_by": {"exact": 10}}) == "ranked exactly (tree scoring; top 20)"
    mixed = ranking_text({**base, "ranked_by": {"exact": 7, "beam": 3}})
    assert mixed == "ranked exactly for 7 users and by beam search (width 20) for 3"


def test_paired_differences_by_hand_and_in_the_report():
    """genrec minus a baseline per user: mean and mean ± 1.96 standard errors of the differences."""
    ours = [{"ndcg@10": v} for v in (1.0, 0.0, 1.0, 0.5)]
    per_user = {
        "genrec": ours,
        "tied": [{"ndcg@10": v} for v in (0.0, 0.0, 1.0, 0.5)],  # differences 1, 0, 0, 0: sd 0.5
        "worse": [{"ndcg@10": v - 0.25} for v in (1.0, 0.0, 1.0, 0.5)],  # 0.25 below for every user
    }
    vs = paired_differences(per_user, ["ndcg@10"])
    assert set(vs) == {"tied", "worse"}
    tied = vs["tied"]["ndcg@10"]
    assert tied["diff"] == pytest.approx(0.25)
    assert (tied["low"], tied["high"]) == (pytest.approx(0.25 - 0.49), pytest.approx(0.25 + 0.49))
    worse = vs["worse"]["ndcg@10"]  # the same difference for every user: no spread, the interval is a point
    assert worse["diff"] == worse["low"] == worse["high"] == pytest.approx(0.25)
    rows = {line.split(" | ")[0]: line for line in paired_table(vs, 4) if line.startswith("| ")}
    assert rows["| tied"].endswith("[-0.2400, +0.7400] |")  # holds 0: not marked
    assert rows["| worse"].endswith("[+0.2500, +0.2500] * |")


def test_ci_half_width_is_1_96_standard_errors():
    assert ci_half_width([1.0, 0.0, 0.0, 0.0]) == pytest.approx(1.96 * 0.5 / 2)  # sd 0.5, 4 values
    assert ci_half_width([0.3, 0.3]) == 0.0 and math.isnan(ci_half_width([0.3]))
