"""Ahead-of-time artifacts: :func:`export` a quantized program to one ``.qpt`` file, :func:`load` it back.

    qcompile.export(model, (), "int4-g128", "model.qpt", example_kwargs={"input_ids": ids})
    program = qcompile.load("model.qpt")            # no re-quantization, batch/sequence stay dynamic
    logits = program(input_ids=other_ids).logits

The file holds the lowered graph as JSON, the packed weights as safetensors, the recipe and plan, the
exported input description and (by default) the example inputs with the outputs they gave, which
``qcompile verify`` replays. Loading an untrusted file runs no code from it; see ``docs/qpt-format.md``.
"""

from __future__ import annotations

import os
import platform

import torch
import torch.utils._pytree as pytree

from qcompile.api import QuantizedProgram, compile
from qcompile.passes.capture import _fetch
from qcompile.passes.lower import buffer_prefix
from qcompile.runtime.qpt_format import ArtifactError
from qcompile.runtime.qpt_graph import get_attr_targets, graph_from_json, graph_to_json
from qcompile.runtime.qpt_kernels import adopt_kernels_json, kernels_to_json
from qcompile.runtime.qpt_manifest import (
    check_call, check_graph_sites, check_inputs_json, check_packed_tensors, inputs_to_json, plan_from_json,
    plan_to_json,
)  # fmt: skip
from qcompile.runtime.qpt_reader import read_artifact
from qcompile.runtime.qpt_writer import write_artifact

__all__ = ["ArtifactError", "export", "load"]


def _flat_inputs(gm: torch.fx.GraphModule, args, kwargs) -> list | None:
    """The call's inputs in placeholder order, bound the way the generated ``forward`` binds them."""
    info = gm.graph._codegen.pytree_info
    named = dict(zip(info.orig_args, args))
    named.update(kwargs)
    positional = info.in_spec.child(0).num_children
    keys = info.in_spec.child(1).context
    try:
        return torch.fx._pytree.tree_flatten_spec(
            ([named[n] for n in info.orig_args[:positional]], {k: named[k] for k in keys}), info.in_spec
        )
    except (KeyError, IndexError, RuntimeError, TypeError):
        return None  # let the graph's own binding report it


def _examples(program: QuantizedProgram) -> dict[str, torch.Tensor]:
    args, kwargs = tuple(program.example_args or ()), dict(program.example_kwargs or {})
    if not args and not kwargs:
        return dict(getattr(program, "examples", {}))  # a loaded program keeps the examples it was saved with
    flat = _flat_inputs(program.module, args, kwargs)
    with torch.no_grad():
        outputs = pytree.tree_leaves(program(*args, **kwargs))
    if flat is None or not all(isinstance(t, torch.Tensor) for t in [*flat, *outputs]):
        return {}
    tensors = {f"input.{i}": t.detach().cpu() for i, t in enumerate(flat)}
    tensors.update({f"output.{i}": t.detach().cpu() for i, t in enumerate(outputs)})
    return tensors


def _compile_language_model(model, example_args, recipe, example_kwargs, calibration, progress_bar, verbose):
    """A causal LM as a step program over a KV cache (:mod:`qcompile.lm`): dynamic batch, tokens and past."""
    from qcompile.lm import DecodeStep, info_for, step_dynamic_shapes, step_example

    ids = (example_kwargs or {}).get("input_ids", example_args[0] if example_args else None)
    if not isinstance(ids, torch.Tensor):
        raise ValueError("exporting a causal language model needs example input_ids (example_kwargs={'input_ids': "
                         "ids})")  # fmt: skip
    info = info_for(model)
    program = compile(DecodeStep(model), (), recipe, example_kwargs=step_example(info, ids),
                      dynamic_shapes=step_dynamic_shapes(info), calibration=calibration, progress_bar=progress_bar,
                      verbose=verbose)  # fmt: skip
    program.language_model = info
    return program


def export(model, example_args=(), recipe=None, path: str | os.PathLike | None = None, *, example_kwargs=None,
           dynamic_shapes=None, calibration=None, store_example: bool = True, metadata: dict | None = None,
           progress_bar: bool = True, verbose: bool = False, language_model: bool | None = None
           ) -> QuantizedProgram:  # fmt: skip
    """Compile ``model`` with :func:`qcompile.compile` (or take an already built :class:`QuantizedProgram`) and
    write it to ``path`` atomically. ``export(program, "model.qpt")`` is accepted too. Returns the program.

    A causal language model (transformers ``…ForCausalLM``) is exported as a step over a KV cache
    (:mod:`qcompile.lm`), with dynamic batch (up to 64), tokens and cache length (up to the model's context): the
    loaded program takes ``input_ids`` and ``attention_mask`` and has ``generate``. ``language_model=False``
    exports the plain forward instead (its ``dynamic_shapes`` then apply).

    ``store_example`` keeps the example inputs and the outputs they gave in the file (for ``qcompile verify``);
    ``metadata`` is free-form JSON kept in the manifest (the command line records the model source there).
    """
    from qcompile.lm import is_causal_lm

    if isinstance(model, QuantizedProgram) and path is None and isinstance(example_args, (str, os.PathLike)):
        example_args, path = (), example_args
    if path is None:
        raise TypeError("qcompile.export needs a destination path, e.g. export(model, args, recipe, 'model.qpt')")
    if isinstance(model, QuantizedProgram):
        program = model
    elif language_model is not False and is_causal_lm(model):
        was_training = model.training
        model.eval()
        try:
            program = _compile_language_model(model, tuple(example_args or ()), recipe, example_kwargs, calibration,
                                              progress_bar, verbose)  # fmt: skip
        finally:
            model.train(was_training)
    else:
        program = compile(model, example_args, recipe, example_kwargs=example_kwargs, dynamic_shapes=dynamic_shapes,
                          calibration=calibration, progress_bar=progress_bar, verbose=verbose)  # fmt: skip
    gm = program.module
    weights = {}
    for target in dict.fromkeys(get_attr_targets(gm)):
        tensor = _fetch(gm, target)
        if tensor is None:
            raise ValueError(f"graph attribute {target!r} is not a tensor; a .qpt file holds tensors only")
        weights[target] = tensor.detach().cpu()
    inputs, symbols = getattr(program, "input_spec", None) or inputs_to_json(gm)
    from qcompile import __version__

    manifest = {
        "writer": {"qcompile": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "recipe": program.plan.recipe.to_dict(),
        "plan": plan_to_json(program.plan, buffer_prefix),
        "inputs": inputs,
        "symbols": symbols,
        "kernels": kernels_to_json(program.plan),
        "language_model": None if program.language_model is None else program.language_model.to_json(),
        "metadata": dict(metadata if metadata is not None else getattr(program, "manifest", {}).get("metadata", {})),
    }
    tensor_members = {"weights": weights}
    examples = _examples(program) if store_example else {}
    if examples:
        tensor_members["examples"] = examples
    write_artifact(path, manifest, {"graph": graph_to_json(gm)}, tensor_members)
    return program


def _language_model(data):
    if data is None:
        return None
    from qcompile.lm import LanguageModelInfo

    try:
        return LanguageModelInfo.from_json(data)
    except ValueError as error:
        raise ArtifactError(str(error)) from None


def load(path: str | os.PathLike, device: str | torch.device = "cpu", *, verify: bool = True) -> QuantizedProgram:
    """Load a ``.qpt`` file into a callable :class:`QuantizedProgram` on ``device``; nothing is re-quantized.

    Weights are mapped from the file (copy-on-write) on CPU. ``verify=False`` skips the sha256 checks (the
    bounds and consistency checks always run). Every problem with the file raises :class:`ArtifactError`.
    """
    artifact = read_artifact(path, verify=verify)
    manifest = artifact.manifest
    where = os.fspath(path)
    try:
        plan = plan_from_json(manifest.get("plan"), manifest.get("recipe"))
        check_inputs_json(manifest.get("inputs"), manifest.get("symbols"))
        weights = artifact.tensors["weights"]
        check_packed_tensors(plan, manifest["plan"], weights)
        device = torch.device(device)
        if device.type != "cpu":
            weights = {name: t.to(device) for name, t in weights.items()}
        device_map = {} if device.type == "cpu" else {"cpu": device}
        gm = graph_from_json(artifact.json_members["graph"], weights, device_map)
        check_graph_sites(gm, plan, manifest["plan"])
        adopt_kernels_json(manifest.get("kernels"))
        language_model = _language_model(manifest.get("language_model"))
    except ArtifactError as error:
        raise ArtifactError(f"{where}: {error}") from None
    except RecursionError:
        raise ArtifactError(f"{where}: graph member: arguments nest too deeply") from None
    inputs, symbols = manifest["inputs"], manifest["symbols"]

    def check_inputs(module, args, kwargs):
        flat = _flat_inputs(module, args, kwargs)
        if flat is not None:
            check_call(inputs, flat, symbols)

    gm.register_forward_pre_hook(check_inputs, with_kwargs=True)
    program = QuantizedProgram(gm, plan)
    program.language_model = language_model
    program.input_spec = (inputs, symbols)
    program.manifest = manifest
    program.examples = artifact.tensors.get("examples", {})
    program.source = where
    return program
