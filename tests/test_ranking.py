import pytest
import torch

from drpo.ranking import drop_tied_anchors, ensemble_scores, gather_samples, select_anchors, zscore


def test_zscore_uses_population_std():
    scores = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    z = zscore(scores)
    # row 0: mean 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5
    expected = (scores[0] - 3.0) / (3.5**0.5 + 1e-6)
    torch.testing.assert_close(z[0], expected)
    assert torch.equal(z[1], torch.zeros(4))  # a flat group maps to zeros, not NaN
    torch.testing.assert_close(zscore(scores.T, dim=0), z.T)


def test_select_anchors_picks_top_and_bottom():
    scores = torch.tensor([[0.3, 0.9, -1.0, 0.5, 2.0, 0.0], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    pos, neg = select_anchors(scores, 2, 3)
    assert pos.dtype == torch.int64 and pos.shape == (2, 2) and neg.shape == (2, 3)
    assert pos.tolist() == [[4, 1], [0, 1]]  # best first
    assert neg.tolist() == [[2, 5, 0], [5, 4, 3]]  # worst first


def test_select_anchors_ties_are_deterministic_and_disjoint():
    scores = torch.zeros(1, 6)
    pos, neg = select_anchors(scores, 3, 3)
    assert pos.tolist() == [[0, 1, 2]] and neg.tolist() == [[5, 4, 3]]
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.0, 0.0]])
    pos, neg = select_anchors(scores, 2, 2)
    assert pos.tolist() == [[1, 2]] and neg.tolist() == [[4, 3]]
    assert select_anchors(scores, 2, 2)[0].tolist() == pos.tolist()


def test_select_anchors_allows_no_negatives():
    pos, neg = select_anchors(torch.tensor([[0.1, 0.7, 0.2]]), 3, 0)
    assert pos.tolist() == [[1, 2, 0]] and neg.shape == (1, 0)


@pytest.mark.parametrize("num_pos,num_neg", [(3, 2), (0, 1), (2, -1)])
def test_select_anchors_rejects_bad_counts(num_pos, num_neg):
    with pytest.raises(ValueError, match=rf"num_pos={num_pos}.*num_neg={num_neg}.*K=4"):
        select_anchors(torch.randn(2, 4), num_pos, num_neg)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_select_anchors_rejects_non_finite_rewards(bad):
    scores = torch.randn(2, 4)
    scores[1, 2] = bad
    with pytest.raises(ValueError, match=f"reward returned {bad} for candidate 2 of prompt 1"):
        select_anchors(scores, 1, 1)


@pytest.mark.parametrize(
    "scores, positives, negatives",
    [
        ([0.0] * 8, [], []),  # every candidate alike: no preference at all
        ([1.0] * 8, [], []),
        ([0, 1, 0, 0, 0, 1, 0, 0], [1, 5], [7, 6, 4]),  # 2 pass: the positives are those 2
        ([1, 1, 0, 1, 1, 1, 1, 0], [0, 1, 3], [7, 2]),  # 2 fail: the negatives are those 2
        ([0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.8, 0.4], [1, 6, 4], [2, 5, 0]),  # graded, no ties: unchanged
    ],
)
def test_drop_tied_anchors_keeps_only_anchors_that_carry_a_preference(scores, positives, negatives):
    scores = torch.tensor(scores, dtype=torch.float32)
    pos, neg = select_anchors(scores.view(1, -1), 3, 3)
    kept_pos, kept_neg = drop_tied_anchors(scores, pos[0], neg[0])
    assert kept_pos.tolist() == positives and kept_neg.tolist() == negatives


def test_ensemble_scores_weights_z_scores():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    b = torch.tensor([[10.0, 0.0, 0.0, 10.0]])
    combined = ensemble_scores({"pick": a, "aes": b}, {"pick": 3.0, "aes": 1.0})
    torch.testing.assert_close(combined, 0.75 * zscore(a) + 0.25 * zscore(b))
    # the result is invariant to the reward's own affine scale (z-scoring) and to the weights' total
    rescaled = ensemble_scores({"pick": 100 * a + 7, "aes": b}, {"pick": 0.3, "aes": 0.1})
    torch.testing.assert_close(rescaled, combined)
    assert torch.equal(ensemble_scores({"pick": a}, {"pick": 2.0}).argsort(), a.argsort())


def test_ensemble_scores_rejects_bad_input():
    a = torch.randn(2, 4)
    with pytest.raises(ValueError, match="weights has \\['aes', 'pick'\\]"):
        ensemble_scores({"pick": a}, {"pick": 1.0, "aes": 1.0})
    with pytest.raises(ValueError, match="scores has \\['clip', 'pick'\\]"):
        ensemble_scores({"pick": a, "clip": a}, {"pick": 1.0})
    with pytest.raises(ValueError, match="positive sum"):
        ensemble_scores({"pick": a, "aes": a}, {"pick": 1.0, "aes": -1.0})
    with pytest.raises(ValueError, match="one shape"):
        ensemble_scores({"pick": a, "aes": a[:, :3]}, {"pick": 1.0, "aes": 1.0})
    nan = a.clone()
    nan[0, 3] = float("nan")
    with pytest.raises(ValueError, match="reward 'aes' returned nan for candidate 3 of prompt 0"):
        ensemble_scores({"pick": a, "aes": nan}, {"pick": 1.0, "aes": 1.0})


def test_gather_samples_selects_per_prompt():
    tensor = torch.arange(2 * 4 * 3).reshape(2, 4, 3)
    index = torch.tensor([[3, 0], [1, 1]])
    out = gather_samples(tensor, index)
    assert out.shape == (2, 2, 3)
    assert torch.equal(out[0], tensor[0, [3, 0]]) and torch.equal(out[1], tensor[1, [1, 1]])
    with pytest.raises(ValueError, match="index \\(B, J\\)"):
        gather_samples(tensor, index[:1])
