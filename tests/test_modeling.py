"""ID-token embedding rows that start from the item embeddings (model.id_init=items)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genrec.config import ConfigError, ModelConfig, RunConfig, apply_overrides, validate
from genrec.ids import atomic_ids, semantic_ids
from genrec.modeling import add_id_tokens, build_tiny, id_token_vectors, init_id_embeddings, train_tokenizer

WIDTH = 32


def clustered(n_per: int = 20, dim: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Item vectors in three well-separated clusters, and each item's cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim)) * 5
    label = np.repeat(np.arange(3), n_per)
    return (centres[label] + rng.normal(size=(len(label), dim))).astype(np.float32), label


def tiny_with(ids, *, tied: bool = True):
    tok = train_tokenizer(["recent items", "next item please"] * 10, vocab_size=280)
    add_id_tokens(tok, ids.vocabulary())
    cfg = ModelConfig(hidden_size=WIDTH, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64)
    model = build_tiny(cfg, tok)
    if not tied:  # an untied copy: separate output rows
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return model, tok


def cosine(a: torch.Tensor) -> torch.Tensor:
    a = torch.nn.functional.normalize(a.float(), dim=1)
    return a @ a.T


def test_atomic_rows_keep_the_items_geometry_and_the_requested_spread():
    vectors, label = clustered()
    ids = atomic_ids(len(vectors))
    model, tok = tiny_with(ids)
    before = model.get_input_embeddings().weight.detach().clone()
    n = init_id_embeddings(model, tok, id_token_vectors(ids, vectors, WIDTH), scale=3.0, pretrained=False)
    assert n == len(vectors)
    rows = model.get_input_embeddings().weight.detach()[tok.convert_tokens_to_ids(ids.vocabulary())]
    sim = cosine(rows)
    same = torch.from_numpy(label[:, None] == label[None, :])
    off_diag = ~torch.eye(len(label), dtype=torch.bool)
    assert sim[same & off_diag].mean() > 0.5 > sim[~same].mean()  # neighbours start close
    assert rows.std().item() == pytest.approx(3.0 * model.config.initializer_range, rel=0.05)
    others = [i for i in range(len(tok)) if i not in set(tok.convert_tokens_to_ids(ids.vocabulary()))]
    assert torch.equal(model.get_input_embeddings().weight[others], before[others])  # text rows untouched
    assert torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)  # tied


def test_semantic_tokens_are_centroids_that_sum_to_each_items_quantised_vector():
    vectors, label = clustered(n_per=30)
    ids = semantic_ids(vectors, levels=2, codes=4, collision_headroom=1)
    meaning = id_token_vectors(ids, vectors, WIDTH)
    collision = {ids.token(ids.depth - 1, c) for c in range(ids.level_sizes[-1])}
    assert not collision & set(meaning)  # collision codes mean nothing
    assert len(meaning) == sum(len(b) for b in ids.codebooks)
    summed = np.stack([sum(meaning[ids.token(lv, int(row[lv]))] for lv in range(2)) for row in ids.codes])
    # Linear projection: the sum of an item's code rows is its quantised vector, projected. The projection
    # itself is read off the atomic case (same vectors, same PCA), so the check does not depend on axis signs.
    atomic = id_token_vectors(atomic_ids(len(vectors)), vectors, WIDTH)
    own = np.stack([atomic[f"<item_{i}>"] for i in range(len(vectors))])
    centred = vectors - vectors.mean(0)
    projection = np.linalg.lstsq(centred, own, rcond=None)[0]
    quantised = sum(ids.codebooks[lv][ids.codes[:, lv]] for lv in range(2)) - vectors.mean(0)
    np.testing.assert_allclose(summed, quantised @ projection, atol=1e-3)
    # ...which is close to the item itself: each item's summed rows are nearest an item of its own cluster.
    nearest = np.argmin(((summed[:, None, :] - own[None]) ** 2).sum(-1), axis=1)
    assert np.array_equal(label[nearest], label)


def test_input_tokens_start_at_their_items_vectors_beside_the_code_centroids():
    vectors, label = clustered(n_per=30)
    ids = semantic_ids(vectors, levels=2, codes=4, collision_headroom=1)
    ids.input_items = len(vectors)
    meaning = id_token_vectors(ids, vectors, WIDTH)
    atomic = id_token_vectors(atomic_ids(len(vectors)), vectors, WIDTH)
    for i in range(len(vectors)):  # an input token is its item's vector, as an atomic token is
        np.testing.assert_allclose(meaning[ids.input_token(i)], atomic[f"<item_{i}>"], atol=1e-5)
    assert len(meaning) == sum(len(b) for b in ids.codebooks) + len(vectors)
    model, tok = tiny_with(ids)
    assert init_id_embeddings(model, tok, meaning, scale=3.0, pretrained=False) == len(meaning)
    rows = model.get_input_embeddings().weight.detach()[
        tok.convert_tokens_to_ids(ids.vocabulary()[-len(vectors) :])
    ]
    same = torch.from_numpy(label[:, None] == label[None, :])
    off_diag = ~torch.eye(len(label), dtype=torch.bool)
    assert cosine(rows)[same & off_diag].mean() > 0.5 > cosine(rows)[~same].mean()


def test_pretrained_rows_are_centred_on_the_mean_row_and_untied_heads_follow():
    vectors, _ = clustered()
    ids = atomic_ids(len(vectors))
    model, tok = tiny_with(ids, tied=False)
    emb = model.get_input_embeddings().weight
    new = tok.convert_tokens_to_ids(ids.vocabulary())
    old = [i for i in range(len(tok)) if i not in set(new)]
    with torch.no_grad():  # what a pretrained base's mean resize leaves
        emb[new] = emb[old].mean(0)
    centre, spread = emb[old].mean(0).clone(), emb[old].std().item()
    init_id_embeddings(model, tok, id_token_vectors(ids, vectors, WIDTH), scale=2.0, pretrained=True)
    rows = model.get_input_embeddings().weight.detach()[new]
    torch.testing.assert_close(rows.mean(0), centre, atol=1e-5, rtol=0)
    assert (rows - centre).std().item() == pytest.approx(2.0 * spread, rel=0.05)
    assert torch.equal(model.get_output_embeddings().weight[new], rows)


def test_id_init_scale_must_be_positive():
    with pytest.raises(ConfigError, match="id_init_scale"):
        validate(apply_overrides(RunConfig(), ["model.id_init_scale=0"]))


def test_a_pretrained_base_gets_item_rows_only_for_id_tokens_new_to_it(tmp_path):
    from genrec.training import prepare_model, prompt_builder
    from tests.conftest import make_run

    run, cfg = make_run(tmp_path, "pre", ["model.id_init=items"])
    data, ids = run.load_data(), run.load_ids()
    tok = train_tokenizer(["recent items", "next item please"] * 10, vocab_size=280)
    mcfg = ModelConfig(hidden_size=WIDTH, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64)
    build_tiny(mcfg, tok).save_pretrained(tmp_path / "plain")  # a "pretrained" base without ID tokens
    tok.save_pretrained(tmp_path / "plain")
    level0 = [ids.token(0, c) for c in range(ids.level_sizes[0])]

    def level0_rows(base, *extra):
        c = apply_overrides(cfg, [f"model.base={base}", "model.dtype=float32", *extra])
        model, tokenizer = prepare_model(run, c, prompt_builder(run, c, data, ids), data)
        return (
            model,
            tokenizer,
            model.get_input_embeddings().weight.detach()[tokenizer.convert_tokens_to_ids(level0)],
        )

    _, _, mean_rows = level0_rows(tmp_path / "plain", "model.id_init=default")
    torch.testing.assert_close(
        mean_rows, mean_rows[:1].expand_as(mean_rows)
    )  # the base's own init: the mean row
    model, tokenizer, rows = level0_rows(tmp_path / "plain")
    assert cosine(rows)[~torch.eye(len(level0), dtype=torch.bool)].max() < 0.999  # not all the mean row
    with torch.no_grad():  # an earlier run trained them: mark its rows so re-initialising would show
        model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(level0)] += 0.5
    model.save_pretrained(tmp_path / "trained")  # a base that already has the ID tokens
    tokenizer.save_pretrained(tmp_path / "trained")
    _, _, again = level0_rows(tmp_path / "trained")
    torch.testing.assert_close(again, rows + 0.5)  # its rows are kept, not re-initialised
