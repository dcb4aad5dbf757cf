"""model.id_softmax ids / level: log-probs normalised over a group of ID tokens, against brute force on full logits."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec.id_softmax import IdSoftmax, softmax_groups

VOCAB, HIDDEN = 40, 8
LEVELS = [[10, 11, 12, 13], [20, 22, 24], list(range(30, 40))]  # contiguous, strided, wide
"""Softmax groups (each ID level on its own, as model.id_softmax=level makes them)."""


def brute_force(states, head, edge_state, edge_token):
    """log-softmax over the edge token's level's columns of the full logits, edge by edge."""
    logits = head(states).float()
    out = []
    for s, t in zip(edge_state, edge_token, strict=True):
        level = next(lv for lv in LEVELS if t in lv)
        logp = torch.log_softmax(logits[s, level], -1)
        out.append(logp[level.index(t)])
    return torch.stack(out) if out else torch.zeros(0)


def random_edges(data, n_states):
    """Edges (state, token): every state writes one level, some states several tokens of it, some none."""
    edge_state, edge_token = [], []
    for s in range(n_states):
        level = LEVELS[data.draw(st.integers(0, len(LEVELS) - 1))]
        toks = data.draw(st.lists(st.sampled_from(level), max_size=4, unique=True))
        edge_state += [s] * len(toks)
        edge_token += toks
    return np.array(edge_state, dtype=np.int64), np.array(edge_token, dtype=np.int64)


@settings(max_examples=30, deadline=None)
@given(st.data(), st.integers(1, 12), st.booleans())
def test_edge_log_probs_equal_the_level_columns_of_the_full_softmax(data, n_states, bias):
    torch.manual_seed(n_states)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=bias)
    states = torch.randn(n_states, HIDDEN) * 3
    edge_state, edge_token = random_edges(data, n_states)
    soft = IdSoftmax(LEVELS, vocab_size=VOCAB)
    got = soft.edge_log_probs(states, head, soft.by_group(edge_state, edge_token), len(edge_token))
    torch.testing.assert_close(got, brute_force(states, head, edge_state, edge_token), atol=1e-5, rtol=1e-5)


def test_a_levels_probabilities_sum_to_one_and_exceed_the_full_softmaxes():
    """Not vacuous: normalising over a level is a different quantity from the vocabulary softmax."""
    torch.manual_seed(0)
    head, states = torch.nn.Linear(HIDDEN, VOCAB, bias=False), torch.randn(3, HIDDEN)
    soft = IdSoftmax(LEVELS, vocab_size=VOCAB)
    for lv in LEVELS:
        edge_state, edge_token = np.repeat(np.arange(3), len(lv)), np.tile(lv, 3)
        logp = soft.edge_log_probs(states, head, soft.by_group(edge_state, edge_token), len(edge_token))
        torch.testing.assert_close(logp.exp().view(3, -1).sum(1), torch.ones(3))
        full = torch.log_softmax(head(states), -1)[torch.from_numpy(edge_state), torch.from_numpy(edge_token)]
        assert (logp > full).all()


def test_label_fields_and_their_gradients_equal_brute_force():
    torch.manual_seed(1)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    states = torch.randn(7, HIDDEN, requires_grad=True)
    labels = torch.tensor([10, 22, 35, 13, 39, 20, 11])
    soft = IdSoftmax(LEVELS, vocab_size=VOCAB)
    logp, entropy, top1 = soft.label_fields(states, head, labels)
    ref = brute_force(states, head, range(7), labels.tolist())
    torch.testing.assert_close(logp, ref)
    for i, t in enumerate(labels.tolist()):
        level = next(lv for lv in LEVELS if t in lv)
        p = torch.softmax(head(states[i]).detach()[level], -1)
        assert float(entropy[i]) == pytest.approx(float(-(p * p.log()).sum()), abs=1e-5)
        assert bool(top1[i]) == (level[int(p.argmax())] == t)
    (ours,) = torch.autograd.grad(-logp.sum(), states, retain_graph=True)
    (want,) = torch.autograd.grad(-ref.sum(), states)
    torch.testing.assert_close(ours, want)
    # no label at all: an empty result, still on the graph
    empty, _, _ = soft.label_fields(states, head, labels[:0])
    assert empty.shape == (0,) and empty.requires_grad


def test_refuses_tokens_outside_the_levels_and_levels_that_overlap():
    soft = IdSoftmax(LEVELS, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="token 5 is not an item-ID token"):
        soft.by_group(np.array([0, 0]), np.array([10, 5]))
    with pytest.raises(ValueError, match="not an item-ID token"):
        soft.group_of_token(25)
    with pytest.raises(ValueError, match="repeat across groups"):
        IdSoftmax([[1, 2], [2, 3]], vocab_size=VOCAB)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        IdSoftmax([[1, VOCAB]], vocab_size=VOCAB)
    with pytest.raises(ValueError, match="at least one token"):
        IdSoftmax([[1], []], vocab_size=VOCAB)


def test_from_tokens_refuses_a_tokenizer_without_the_ids(tiny_lm):
    _, tok, _ = tiny_lm
    soft = IdSoftmax.from_tokens([[f"<{lv}_{c}>" for c in range(4)] for lv in "abcd"], tok)
    assert soft.group_tokens(1) == tok.convert_tokens_to_ids([f"<b_{c}>" for c in range(4)])
    with pytest.raises(ValueError, match="lacks some item-ID tokens"):
        IdSoftmax.from_tokens([["<a_0>", "<z_9>"]], tok)


def test_vllm_refuses_levels_wider_than_its_v2_runner_masks_on_a_gpu(monkeypatch):
    """vLLM 0.26's V2 model runner (a GPU's default) takes at most 1024 allowed ids per request."""
    from genrec.engines.vllm import V2_MAX_ALLOWED_IDS, check_group_widths

    wide = IdSoftmax([list(range(V2_MAX_ALLOWED_IDS + 1))], vocab_size=V2_MAX_ALLOWED_IDS + 10)
    narrow = IdSoftmax([list(range(V2_MAX_ALLOWED_IDS))], vocab_size=V2_MAX_ALLOWED_IDS + 10)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    check_group_widths(wide, cuda=False)  # the CPU's V1 runner: no cap
    check_group_widths(narrow, cuda=True)
    with pytest.raises(ValueError, match="set VLLM_USE_V2_MODEL_RUNNER=0"):
        check_group_widths(wide, cuda=True)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    check_group_widths(wide, cuda=True)


def test_softmax_groups_of_each_mode():
    levels = [["<a_0>", "<a_1>"], ["<b_0>", "<b_1>", "<b_2>"], ["<c_0>"]]
    assert softmax_groups(levels, "full") is None
    assert softmax_groups(levels, "ids") == [["<a_0>", "<a_1>", "<b_0>", "<b_1>", "<b_2>", "<c_0>"]]
    assert softmax_groups(levels, "level") == levels
    with pytest.raises(ValueError, match="model.id_softmax must be one of"):
        softmax_groups(levels, "codes")
