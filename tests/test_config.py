from pathlib import Path

import pytest

from genrec.config import RunConfig, apply_overrides, config_from_dict, load_config, validate
from genrec.errors import ConfigError


def test_defaults_roundtrip(tmp_path):
    cfg = RunConfig()
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_unknown_key_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*train.*unknown key\(s\) \['epoch'\]"):
        load_config(tmp_path / "c.yaml")


def test_bad_type_names_field():
    with pytest.raises(ConfigError, match="train.batch_size"):
        config_from_dict({"train": {"batch_size": "many"}})


def test_literal_choices_listed():
    with pytest.raises(ConfigError, match=r"ids.scheme.*'semantic', 'atomic'"):
        config_from_dict({"ids": {"scheme": "fancy"}})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.batch_size=0", "eval.batch_size must be >= 1"),
        ("eval.n_candidates=0", "eval.n_candidates must be >= 1"),
        ("eval.max_users=-1", "eval.max_users must be >= 1"),
        ("eval.sasrec_epochs=0", "eval.sasrec_epochs must be >= 1"),
        ("train.learning_rate=-0.001", "train.learning_rate must be positive"),
    ],
)
def test_out_of_range_numbers_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(RunConfig(), [override])


def test_overrides_coerce_and_validate():
    cfg = apply_overrides(
        RunConfig(), ["train.epochs=2", "eval.ks=5,10", "train.bf16=false", "data.path=none"]
    )
    assert (
        cfg.train.epochs == 2.0
        and cfg.eval.ks == [5, 10]
        and cfg.train.bf16 is False
        and cfg.data.path is None
    )
    with pytest.raises(ConfigError, match="unknown field 'nope'"):
        apply_overrides(RunConfig(), ["train.nope=1"])
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_overrides(RunConfig(), ["train.epochs"])
    with pytest.raises(ConfigError, match="eval.ks max 50 exceeds eval.beam_width"):
        apply_overrides(RunConfig(), ["eval.ks=[5,50]"])
    with pytest.raises(ConfigError, match="train.max_minutes must be positive"):
        apply_overrides(RunConfig(), ["train.max_minutes=-1"])
    assert apply_overrides(RunConfig(), ["train.max_minutes=2.5"]).train.max_minutes == 2.5
    with pytest.raises(ConfigError, match="eval.max_tree_tokens must be >= 1"):
        apply_overrides(RunConfig(), ["eval.max_tree_tokens=0"])
    with pytest.raises(ConfigError, match="eval.search"):
        apply_overrides(RunConfig(), ["eval.search=greedy"])
    patient = "train.early_stopping_patience=2"
    for metric in ("loss", "mrr", "ndcg@10", "recall@20"):
        assert (
            apply_overrides(RunConfig(), [patient, f"train.select_metric={metric}"]).train.select_metric
            == metric
        )
    for bad in ("ndcg", "ndcg@0", "hit@10", "Loss"):
        with pytest.raises(ConfigError, match="train.select_metric: .* use loss, mrr, ndcg@K or recall@K"):
            apply_overrides(RunConfig(), [patient, f"train.select_metric={bad}"])
    with pytest.raises(ConfigError, match="set train.early_stopping_patience too"):
        apply_overrides(RunConfig(), ["train.select_metric=ndcg@10"])


def test_path_required_for_file_sources():
    with pytest.raises(ConfigError, match="data.path is required"):
        config_from_dict({"data": {"source": "movielens"}})


def test_builtin_defaults_are_the_embedded_tiny_recipe():
    """An installed package (without genrec/recipes/) must run the same quickstart as the recipe."""
    from pathlib import Path

    recipe = load_config(
        Path(__file__).resolve().parent.parent / "genrec" / "recipes" / "tiny.yaml"
    ).to_dict()
    defaults = RunConfig().to_dict()
    recipe["ids"]["embedding"], recipe["train"]["method"] = (
        "auto",
        "auto",
    )  # what auto resolves to for tiny + text
    for section, fields in defaults.items():
        if isinstance(fields, dict):
            assert fields == recipe[section], section


@pytest.mark.parametrize(
    "recipe",
    sorted((Path(__file__).resolve().parent.parent / "genrec" / "recipes").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_every_shipped_recipe_loads_and_validates(recipe, tmp_path):
    """A recipe with a renamed or mistyped field would otherwise fail only on a user's machine."""
    cfg = load_config(recipe)  # unknown keys, bad types and invalid values raise, naming the file
    validate(cfg, source=str(recipe))
    cfg.save(tmp_path / "saved.yaml")  # what a run's config.yaml would hold reads back the same
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_a_shipped_recipe_resolves_by_name_from_any_directory(tmp_path, monkeypatch):
    """`-c tiny.yaml` (or `-c tiny`) works outside a checkout: the recipes are package data."""
    from genrec.config import RECIPES_DIR, recipe_path, shipped_recipes

    monkeypatch.chdir(tmp_path)
    assert "tiny.yaml" in shipped_recipes()
    assert recipe_path("tiny.yaml") == recipe_path("tiny") == RECIPES_DIR / "tiny.yaml"
    assert load_config("tiny.yaml") == load_config(RECIPES_DIR / "tiny.yaml")
    (tmp_path / "tiny.yaml").write_text(
        "train:\n  max_steps: 3\n"
    )  # a file of that name wins over the recipe
    assert load_config("tiny.yaml").train.max_steps == 3
    with pytest.raises(ConfigError, match=r"no shipped recipe has that name: \[.*'tiny.yaml'"):
        load_config("no-such-recipe.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "sub" / "tiny.yaml")  # a path with a folder is never a recipe name


def test_shipped_templates_are_package_data():
    from genrec.templates.prompts import PROMPTS_DIR, template_path

    assert PROMPTS_DIR.parent == Path(__file__).resolve().parent.parent / "genrec" / "templates"
    assert template_path("default") == PROMPTS_DIR / "default.jinja"
