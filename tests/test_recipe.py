"""Recipes: forms, validation messages, ordered overrides, heads and tied weights, the plan table."""

import json

import pytest
from expecttest import assert_expected_inline

import qcompile
from qcompile.eager import linear_sites
from qcompile.models import tiny_llama
from qcompile.plan import make_plan
from qcompile.recipe import RecipeError, load_recipe

RECIPE = {"default": "int4-g128", "ignore": ["model.layers.1.self_attn.o_proj"],
          "overrides": [{"targets": ["re:.*down_proj$"], "scheme": "int8"},
                        {"targets": ["model.layers.0.*"], "scheme": "int4-g32"}]}  # fmt: skip


@pytest.fixture(scope="module")
def sites():
    return [site for site, _ in linear_sites(tiny_llama())]


def test_recipe_forms_agree(tmp_path, sites):
    yaml_path = tmp_path / "recipe.yaml"
    yaml_path.write_text(
        "default: int4-g128\nignore: [model.layers.1.self_attn.o_proj]\noverrides:\n"
        "  - targets: ['re:.*down_proj$']\n    scheme: int8\n  - targets: ['model.layers.0.*']\n    scheme: int4-g32\n"
    )
    json_path = tmp_path / "recipe.json"
    json_path.write_text(json.dumps(RECIPE))
    from_dict = load_recipe(RECIPE)
    assert load_recipe(yaml_path) == from_dict
    assert load_recipe(str(json_path)) == from_dict
    assert load_recipe(from_dict) == from_dict
    assert load_recipe(from_dict.to_dict()) == from_dict
    assert load_recipe("int8").default == "int8"


def test_first_matching_override_wins(sites):
    plan = make_plan(RECIPE, sites)
    assert plan.entry("model.layers.0.mlp.down_proj").scheme == "int8"  # rule 0 before rule 1
    assert plan.entry("model.layers.0.mlp.up_proj").scheme == "int4-g32"
    assert plan.entry("model.layers.1.mlp.up_proj").scheme == "int4-g128"
    assert plan.entry("model.layers.1.self_attn.o_proj").scheme is None


def test_head_and_tied_weights_stay_float_unless_named(sites):
    plan = make_plan({"default": "int8"}, sites)
    head = plan.entry("lm_head")
    assert head.scheme is None and head.reason == "head kept"
    named = make_plan({"default": "int8", "overrides": [{"targets": ["lm_head"], "scheme": "int4-g32"}]}, sites)
    assert named.entry("lm_head").scheme == "int4-g32"
    assert "float copy kept for model.embed_tokens" in named.entry("lm_head").note


@pytest.mark.parametrize(
    "recipe, message",
    [
        ({"defualt": "int8"}, "unknown key 'defualt'. Did you mean 'default'"),
        ({"overrides": [{"target": ["x"], "scheme": "int8"}]},
         r"recipe.overrides\[0\]: unknown key 'target'. Did you mean 'targets'"),
        ({"overrides": [{"targets": ["*.nothing_here"], "scheme": "int8"}]}, "matches no matmul site"),
        ({"ignore": ["re:("]}, "not a valid regular expression"),
        ({"default": "int4-g100"}, "recipe.default"),
        ({"algorithm": "gtpq"}, "Did you mean 'gptq'"),
        ({"overrides": [{"targets": ["lm_head"]}]}, "needs 'targets' and 'scheme'"),
        ({"version": 2}, "version 2 is not supported"),
    ],
)
def test_recipe_errors_are_clear(recipe, message, sites):
    with pytest.raises(RecipeError, match=message):
        make_plan(recipe, sites)


def test_yaml_is_loaded_safely(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"default: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(RecipeError, match="no tags"):
        load_recipe(path)
    assert not marker.exists()


def test_plan_table_snapshot(sites):
    plan = make_plan(RECIPE, sites)
    assert_expected_inline(
        plan.table(),
        """\
site                             N x K   scheme               before       after  note
-------------------------------  ------  ---------------  ----------  ----------  ---------------
model.layers.0.self_attn.q_proj  64x64   int4-g32          16.00 KiB    3.00 KiB  rule 1
model.layers.0.self_attn.k_proj  32x64   int4-g32           8.00 KiB    1.50 KiB  rule 1
model.layers.0.self_attn.v_proj  32x64   int4-g32           8.00 KiB    1.50 KiB  rule 1
model.layers.0.self_attn.o_proj  64x64   int4-g32          16.00 KiB    3.00 KiB  rule 1
model.layers.0.mlp.gate_proj     96x64   int4-g32          24.00 KiB    4.50 KiB  rule 1
model.layers.0.mlp.up_proj       96x64   int4-g32          24.00 KiB    4.50 KiB  rule 1
model.layers.0.mlp.down_proj     64x96   int8              24.00 KiB    6.25 KiB  rule 0
model.layers.1.self_attn.q_proj  64x64   int4-g128         16.00 KiB    4.50 KiB  K 64→128 padded
model.layers.1.self_attn.k_proj  32x64   int4-g128          8.00 KiB    2.25 KiB  K 64→128 padded
model.layers.1.self_attn.v_proj  32x64   int4-g128          8.00 KiB    2.25 KiB  K 64→128 padded
model.layers.1.self_attn.o_proj  64x64   keep (float32)    16.00 KiB   16.00 KiB  ignored
model.layers.1.mlp.gate_proj     96x64   int4-g128         24.00 KiB    6.75 KiB  K 64→128 padded
model.layers.1.mlp.up_proj       96x64   int4-g128         24.00 KiB    6.75 KiB  K 64→128 padded
model.layers.1.mlp.down_proj     64x96   int8              24.00 KiB    6.25 KiB  rule 0
lm_head                          128x64  keep (float32)    32.00 KiB   32.00 KiB  head kept
total                                    13/15 quantized  272.00 KiB  101.00 KiB  2.69x smaller""",
    )


def test_public_names():
    assert qcompile.load_recipe is load_recipe
