"""Models: the offline `tiny` Qwen2 built here, or any Hugging Face causal LM, with ID tokens added.

Owns tokenizer construction (a BPE trained on catalogue text + templates for `tiny`), adding the
item-ID tokens (ordinary added tokens, not special, so they survive decoding), resizing
embeddings, and loading a trained model back from a run. Knows nothing of training loops.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genrec.config import ModelConfig
from genrec.ids import ItemIds

logger = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts: Iterable[str], *, vocab_size: int) -> Any:
    """Byte-level BPE trained on `texts`, wrapped as a fast tokenizer with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def add_id_tokens(tokenizer: Any, tokens: list[str]) -> int:
    """Add item-ID tokens as ordinary tokens; returns how many were new."""
    added = int(tokenizer.add_tokens(tokens, special_tokens=False))
    logger.info("tokenizer: added %d ID tokens (vocabulary now %d)", added, len(tokenizer))
    return added


def id_token_vectors(ids: ItemIds, item_vectors: np.ndarray, width: int) -> dict[str, np.ndarray]:
    """What each ID token stands for in item-embedding space, projected to `width` dimensions.

    The projection is the PCA of the item vectors (zero-padded when `width` exceeds their rank).
    Atomic IDs: a token is its item's vector. Semantic IDs: a token is the residual k-means centroid
    of its code (level 0 centred on the mean item), so an item's tokens sum to about its vector;
    collision tokens carry no meaning and are left out; an input token (ids.input_tokens) is its
    item's vector.
    """
    x = np.asarray(item_vectors, dtype=np.float64)
    mean = x.mean(0)
    # Principal axes from the d x d covariance (memory O(d^2), not O(n d) as an SVD of the items would take).
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False) if len(x) > 1 else np.eye(x.shape[1]))
    axes = vectors[:, np.argsort(values)[::-1]]
    basis = np.zeros((x.shape[1], width))
    k = min(width, axes.shape[1])
    basis[:, :k] = axes[:, :k]

    def project(v: np.ndarray) -> np.ndarray:
        return np.asarray(v @ basis, dtype=np.float32)

    if ids.scheme == "atomic":
        rows = project(x - mean)
        return {ids.token(0, int(c)): rows[i] for i, c in enumerate(ids.codes[:, 0])}
    out: dict[str, np.ndarray] = {}
    for level, book in enumerate(ids.codebooks):
        centred = np.asarray(book, dtype=np.float64) - (mean if level == 0 else 0.0)
        for code, row in enumerate(project(centred)):
            out[ids.token(level, code)] = row
    if ids.input_items:  # an input token is its item's vector, as an atomic token is
        rows = project(x[: ids.input_items] - mean)
        out.update({ids.input_token(i): rows[i] for i in range(ids.input_items)})
    return out


def init_id_embeddings(
    model: Any, tokenizer: Any, vectors: dict[str, np.ndarray], *, scale: float, pretrained: bool
) -> int:
    """Set ID-token embedding rows from `vectors` (see id_token_vectors); returns how many were set.

    The vectors are rescaled together to `scale` times the base's spread (tiny: initializer_range;
    pretrained: the std of its own rows) and centred on zero (tiny) or on the mean row a pretrained
    base's resize gave them. Untied output embeddings get the same rows.
    """
    names = sorted(vectors)
    token_ids = tokenizer.convert_tokens_to_ids(names)
    mat = torch.from_numpy(np.stack([vectors[n] for n in names]))
    mat = mat / mat.std().clamp(min=1e-12)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        new = torch.zeros(emb.shape[0], dtype=torch.bool)
        new[token_ids] = True
        if pretrained:
            spread, centre = emb[~new].float().std(), emb[new].float().mean(0)
        else:
            spread, centre = torch.tensor(float(model.config.initializer_range)), torch.zeros(emb.shape[1])
        rows = (centre + mat * spread * scale).to(emb.dtype)
        emb[token_ids] = rows
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():
            out.weight[token_ids] = rows.to(out.weight.dtype)
    return len(names)


def build_tiny(cfg: ModelConfig, tokenizer: Any) -> Any:
    """A randomly initialised Qwen2 sized by `cfg`, with tied input/output embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    logger.info("tiny Qwen2: %.2fM parameters, vocabulary %d", n / 1e6, len(tokenizer))
    return model


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return (
            torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        )
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_pretrained(cfg: ModelConfig, id_tokens: list[str]) -> tuple[Any, Any, list[str]]:
    """A Hugging Face causal LM (local path or hub name) with the ID tokens added and rows resized,
    and the ID tokens that were new to it (a base trained by genrec already has its own).

    New rows start at the mean of the existing embeddings (transformers' default on resize).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        logger.info("%s has no chat template; using ChatML", cfg.base)
        tokenizer.chat_template = CHATML_TEMPLATE
    known = set(tokenizer.get_vocab())
    add_id_tokens(tokenizer, id_tokens)
    model = AutoModelForCausalLM.from_pretrained(cfg.base, dtype=resolve_dtype(cfg.dtype))
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return model, tokenizer, [t for t in id_tokens if t not in known]


def load_trained(folder: str | Path, *, device: str | None = None, dtype: str = "auto") -> tuple[Any, Any]:
    """Model + tokenizer saved by training or `genrec merge` (runs/<name>/merged)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    return model, tokenizer
