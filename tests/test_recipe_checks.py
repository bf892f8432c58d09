"""The position checks of harness.recipe_checks: training sequences within the target, and a factor
that stretches (>= 1) and covers the target, at load where the original window is known there, and
by harness.model.load_base where it only becomes known with the model's config."""
from __future__ import annotations

import dataclasses

import pytest

from harness.recipe import RecipeError
from tests.conftest import tiny_recipe

pytestmark = pytest.mark.usefixtures("session_cache")


@pytest.mark.parametrize("overrides, message", [
    (["data.max_seq_length=1024"],
     "data.max_seq_length = 1024 is longer than position.target_length = 512: training would run past the rope the "
     "adapter is saved with. Raise position.target_length to 1024, or lower data.max_seq_length to at most 512"),
    (["position.factor=0.5"], "position.factor = 0.5 is below 1: it would shrink the rope, not stretch it. Use a "
                              "factor >= 1, or 0 to derive it from position.target_length"),
    (["position.factor=1.2"], "position.factor = 1.2 stretches the original context of 256 tokens to 307.2, short of "
                              "position.target_length = 512: use a factor of at least 2, or 0 to derive it "
                              "(ceil(512 / 256) = 2)"),
    (["position.name=\"yarn\"", "position.factor=1.5"], "position.factor = 1.5 stretches the original context"),
])
def test_a_rope_that_does_not_cover_training_is_refused_at_load(overrides, message):
    with pytest.raises(RecipeError, match=r"recipes/tiny_cpu\.toml: ") as error:
        tiny_recipe(*overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("overrides", [[], ["position.factor=2"], ["position.factor=3"], ["position.factor=1",
                                       "position.target_length=256", "data.max_seq_length=256"],
                                       ["data.max_seq_length=256"], ["position.name=\"none\"", "position.factor=0.5"]])
def test_ropes_that_cover_training_load(overrides):
    recipe = tiny_recipe(*overrides)
    covered = recipe.resolved.rope_factor * recipe.resolved.original_context  # positions the stretched rope spans
    assert recipe.position.name == "none" or covered >= recipe.resolved.seq_len


def test_a_factor_short_of_the_target_is_refused_once_the_window_is_known(tmp_path):
    """A base whose window no local config gives at load (a hub id, a .gguf file): load_base asks again."""
    from harness.model import load_base

    recipe = tiny_recipe()
    short = dataclasses.replace(recipe, position=dataclasses.replace(recipe.position, factor=1.5),
                                resolved=dataclasses.replace(recipe.resolved, original_context=0))
    with pytest.raises(RecipeError, match=r"position\.factor = 1\.5 stretches the original context of 256 tokens"):
        load_base(short)
    load_base(recipe)
