"""Language-model artifacts: a causal LM exported as a step over a KV cache; generation from the loaded file."""

from __future__ import annotations

import warnings

import pytest
import torch

import qcompile
from qcompile.models import tiny_llama
from qcompile.runtime.qpt_format import ArtifactError

RECIPE = {"default": "int4-g32", "overrides": [{"targets": ["model.layers.0.mlp.down_proj"], "scheme": "int8"}]}


def _ids(batch=1, length=10, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm") / "lm.qpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qcompile.export(tiny_llama(), (), RECIPE, path, example_kwargs={"input_ids": _ids()}, progress_bar=False)
    eager = qcompile.quantize(tiny_llama(), RECIPE, progress_bar=False)
    eager.config.use_cache = True
    eager.generation_config.eos_token_id = None
    eager.generation_config.pad_token_id = 0
    return path, qcompile.load(path), eager


def test_loaded_program_gives_the_eager_logits(exported):
    _, loaded, eager = exported
    assert loaded.language_model is not None and loaded.language_model.layers == 2
    ids = _ids(batch=3, length=17, seed=1)  # other batch and length than the export's example
    torch.testing.assert_close(loaded(input_ids=ids).logits, eager(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_greedy_generation_is_the_eager_models_with_its_cache(exported):
    _, loaded, eager = exported
    ids = _ids(length=7, seed=2)
    ours = loaded.generate(ids, max_new_tokens=12, eos_token_id=-1)
    theirs = eager.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, theirs)


def test_left_padded_batch_generates_each_row_as_alone(exported):
    _, loaded, _ = exported
    short, long = _ids(length=4, seed=3), _ids(length=9, seed=4)
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 5), torch.ones(1, 4)], 1), torch.ones(1, 9)]).long()
    together = loaded.generate(batch, mask, max_new_tokens=6, eos_token_id=-1)
    alone = [loaded.generate(ids, max_new_tokens=6, eos_token_id=-1) for ids in (short, long)]
    assert torch.equal(together[0, 5:], alone[0][0]) and torch.equal(together[1], alone[1][0])


def test_sampling_is_seeded_and_top_k_1_is_greedy(exported):
    _, loaded, _ = exported
    ids = _ids(length=5, seed=5)
    options = dict(max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9, eos_token_id=-1)
    first = loaded.generate(ids, generator=torch.Generator().manual_seed(7), **options)
    second = loaded.generate(ids, generator=torch.Generator().manual_seed(7), **options)
    assert torch.equal(first, second)
    greedy = loaded.generate(ids, max_new_tokens=8, eos_token_id=-1)
    assert torch.equal(loaded.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, eos_token_id=-1), greedy)


def test_generation_stops_at_eos(exported):
    _, loaded, _ = exported
    ids = _ids(length=5, seed=6)
    greedy = loaded.generate(ids, max_new_tokens=8, eos_token_id=-1)
    eos = int(greedy[0, 6])  # the second generated token
    out = loaded.generate(ids, max_new_tokens=8, eos_token_id=eos)
    assert out.shape[1] <= 7 and int(out[0, -1]) == eos


def test_requests_beyond_the_limits_name_the_input_and_the_limit(exported):
    _, loaded, _ = exported
    info = loaded.language_model
    with pytest.raises(ValueError, match=f"exceed the program's context of {info.max_length} tokens"):
        loaded.generate(_ids(length=8), max_new_tokens=info.max_length)
    with pytest.raises(ValueError, match=f"batch {info.max_batch + 1} is larger than the {info.max_batch}"):
        loaded.generate(_ids(batch=info.max_batch + 1, length=2), max_new_tokens=1)
    with pytest.raises(TypeError, match="input_ids and attention_mask"):
        loaded(input_ids=_ids(), token_type_ids=_ids())
    with pytest.raises(ValueError, match="input_ids: expected integer token ids"):
        loaded(input_ids=_ids().float())
    with pytest.raises(ValueError, match="top_p"):
        loaded.generate(_ids(), do_sample=True, top_p=1.5)


def test_a_forged_language_model_entry_is_refused(exported, tmp_path):
    import importlib.util
    from pathlib import Path

    source = Path(__file__).parent / "runtime" / "test_qpt_adversarial.py"  # its take-apart / put-together helpers
    spec = importlib.util.spec_from_file_location("qpt_adversarial", source)
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    split, assemble = helpers.split, helpers.assemble
    path, _, _ = exported
    manifest, blobs = split(path.read_bytes())
    manifest["language_model"]["layers"] = 10**9
    bad = tmp_path / "bad.qpt"
    bad.write_bytes(assemble(manifest, blobs))
    with pytest.raises(ArtifactError, match="language_model: layers"):
        qcompile.load(bad)


def test_plain_export_when_asked(tmp_path):
    path = tmp_path / "plain.qpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = qcompile.export(tiny_llama(), (), "int8", path, example_kwargs={"input_ids": _ids()},
                                  language_model=False, progress_bar=False)  # fmt: skip
    assert program.language_model is None and qcompile.load(path).language_model is None
