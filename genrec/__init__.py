"""genrec: generative recommendation as a library.

The public surface, importable from the top (`from genrec import Recommender, RunDir, RunConfig`). Names load
lazily, on first use: `import genrec` itself imports nothing heavy (no torch, numpy or transformers), so the CLI
starts fast and a config can be read without a model stack.

Layout (imports flow down this list, checked by tests/test_layers.py): config, errors -> data, retrieval ->
ids, run -> templates -> decoding -> engines, modeling -> recommender, prep -> training / evaluation / batch /
serve -> cli.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from genrec.config import (
        DataConfig,
        EvalConfig,
        IdsConfig,
        ModelConfig,
        PromptConfig,
        RankingOptions,
        RetrievalConfig,
        RunConfig,
        TrainConfig,
        load_config,
    )
    from genrec.errors import GenrecError
    from genrec.recommender import Recommendation, Recommender
    from genrec.run import RunDir

_EXPORTS = {
    "Recommender": "genrec.recommender",
    "Recommendation": "genrec.recommender",
    "RunDir": "genrec.run",
    "RunConfig": "genrec.config",
    "DataConfig": "genrec.config",
    "IdsConfig": "genrec.config",
    "PromptConfig": "genrec.config",
    "ModelConfig": "genrec.config",
    "TrainConfig": "genrec.config",
    "EvalConfig": "genrec.config",
    "RetrievalConfig": "genrec.config",
    "RankingOptions": "genrec.config",
    "load_config": "genrec.config",
    "GenrecError": "genrec.errors",
}
__all__ = [
    "DataConfig",
    "EvalConfig",
    "GenrecError",
    "IdsConfig",
    "ModelConfig",
    "PromptConfig",
    "RankingOptions",
    "Recommendation",
    "Recommender",
    "RetrievalConfig",
    "RunConfig",
    "RunDir",
    "TrainConfig",
    "load_config",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'genrec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
