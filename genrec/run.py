"""The run directory: the one place every command reads from and writes to.

`runs/<name>/` holds config.yaml (resolved config), catalog.parquet, interactions.parquet,
item_embeddings.npy, item_ids.json (+ codebooks.npz), base/ (tiny base + tokenizer),
checkpoints/, adapter/ (LoRA), merged/ (servable model + tokenizer), merged-sft/ (the SFT model, where the RL
stage's model replaced it in merged/: genrec.rl), retriever/ (the collaborative
retriever, retrieval.source), train_log.jsonl,
run.json (provenance: template hash used in training, timings), eval.json, report.md, plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from genrec.config import RunConfig, load_config
from genrec.data import Catalog, Interactions
from genrec.errors import RunError
from genrec.ids import ItemIds


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename so a crash never leaves a half-written file (see atomic_file)."""
    with atomic_file(path, "w") as f:
        f.write(text)


@contextmanager
def atomic_file(path: Path, mode: str = "w", **open_args: Any) -> Iterator[IO[Any]]:
    """A file that appears at `path` whole or not at all: written to a temp file beside it, flushed to
    disk (fsync), renamed over `path`, and the rename made durable (fsync of the folder), so a commit
    survives a power loss. On any failure (a full disk, an error of the writer's own) the temp file is
    removed and `path` keeps what it had."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make renames and new files in `folder` durable (where the file system allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # not supported here (some platforms and network file systems)
        return
    try:
        with contextlib.suppress(OSError):  # refused by some file systems; the rename itself is done
            os.fsync(fd)
    finally:
        os.close(fd)


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    config_file = property(lambda self: self.path / "config.yaml")
    catalog_file = property(lambda self: self.path / "catalog.parquet")
    interactions_file = property(lambda self: self.path / "interactions.parquet")
    embeddings_file = property(lambda self: self.path / "item_embeddings.npy")
    ids_file = property(lambda self: self.path / "item_ids.json")
    base_dir = property(lambda self: self.path / "base")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    adapter_dir = property(lambda self: self.path / "adapter")
    merged_dir = property(lambda self: self.path / "merged")
    merged_sft_dir = property(lambda self: self.path / "merged-sft")
    """The SFT model, present only while merged/ holds the RL stage's model instead (genrec.rl)."""
    rl_log_file = property(lambda self: self.path / "rl_log.jsonl")
    train_log_file = property(lambda self: self.path / "train_log.jsonl")
    meta_file = property(lambda self: self.path / "run.json")
    retriever_dir = property(lambda self: self.path / "retriever")

    def trained_outputs(self) -> list[Path]:
        """What training wrote (base/, checkpoints/, adapter/, merged/, merged-sft/, retriever/): models made for this
        run's data and IDs."""
        return [
            p
            for p in (
                self.base_dir,
                self.checkpoints_dir,
                self.adapter_dir,
                self.merged_dir,
                self.merged_sft_dir,
                self.retriever_dir,
            )
            if p.exists()
        ]

    def require(self, path: Path, hint: str) -> Path:
        if not path.exists():
            raise RunError(self.path, path.name, hint)
        return path

    def load_config(self) -> RunConfig:
        return load_config(self.require(self.config_file, "run `genrec prepare --run DIR` first"))

    def save_config(self, cfg: RunConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        import yaml

        atomic_write_text(self.config_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def load_data(self) -> Interactions:
        catalog = Catalog.from_parquet(
            self.require(self.catalog_file, "run `genrec prepare --run DIR` first")
        )
        return Interactions.from_parquet(self.interactions_file, catalog)

    def save_data(self, data: Interactions) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        data.catalog.to_parquet(self.catalog_file)
        data.to_parquet(self.interactions_file)

    def load_embeddings(self) -> np.ndarray:
        return np.load(self.require(self.embeddings_file, "run `genrec build-ids --run DIR` first"))

    def load_ids(self) -> ItemIds:
        self.require(self.ids_file, "run `genrec build-ids --run DIR` first")
        return ItemIds.load(self.path)

    def model_dir(self) -> Path:
        return self.require(
            self.merged_dir, "run `genrec train --run DIR` (and `genrec merge` for LoRA) first"
        )

    def cold_items(self, cfg: RunConfig | None = None) -> list[int]:
        """The catalogue rows held out of training (data.cold_items; none by default)."""
        from genrec.data import cold_item_rows

        cfg = cfg or self.load_config()
        if cfg.data.cold_items <= 0:
            return []
        n = len(Catalog.from_parquet(self.require(self.catalog_file, "run `genrec prepare --run DIR` first")))
        return cold_item_rows(n, cfg.data.cold_items, seed=cfg.data.seed)

    def trained_id_softmax(self) -> str:
        """The model.id_softmax the run's model was trained with (run.json; `full` for a model trained before
        the setting existed, or not yet trained): engines must score as training did."""
        return str(self.meta().get("train", {}).get("id_softmax", "full"))

    def meta(self) -> dict[str, Any]:
        return json.loads(self.meta_file.read_text()) if self.meta_file.is_file() else {}

    def update_meta(self, **fields: Any) -> None:
        meta = self.meta()
        meta.update(fields)
        atomic_write_text(self.meta_file, json.dumps(meta, indent=2))

    def drop_meta(self, *keys: str) -> None:
        """Remove records that no longer describe the run (no write when none is there)."""
        meta = self.meta()
        if any(k in meta for k in keys):
            atomic_write_text(
                self.meta_file, json.dumps({k: v for k, v in meta.items() if k not in keys}, indent=2)
            )

    def drop_model_choices(self) -> None:
        """Remove the weights chosen on validation for the run's model (run.json's `retrieval.fusion` and
        `retrieval.text_fusion`) when the model is replaced: `genrec train` chooses them again for the new one."""
        retrieval = self.meta().get("retrieval")
        if retrieval and {"fusion", "text_fusion"} & set(retrieval):
            self.update_meta(
                retrieval={k: v for k, v in retrieval.items() if k not in ("fusion", "text_fusion")}
            )


def with_chosen_candidates(run: RunDir, cfg: RunConfig) -> RunConfig:
    """The config with eval.n_candidates as chosen on validation (retrieval.n_candidates_grid, recorded in
    run.json by `choose_fusion_weight`), so evaluation, `recommend`, batch jobs and the server rank as many
    candidates as the fusion weight was chosen for; unchanged without a grid or a choice."""
    chosen = run.meta().get("retrieval", {}).get("fusion", {}).get("n_candidates")
    if not cfg.retrieval.n_candidates_grid or chosen is None or chosen == cfg.eval.n_candidates:
        return cfg
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, n_candidates=int(chosen)))
