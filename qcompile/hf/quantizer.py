"""``QCompileHfQuantizer``: what transformers calls while it loads a model with ``quant_method="qcompile"``.

Three ways through ``from_pretrained``:

* **quantize while loading** (a float checkpoint, ``QCompileConfig(recipe)``): before loading, the recipe is
  planned against the model's linear layers (built on meta) and each planned layer becomes a meta
  ``QuantizedLinear`` with a placeholder float weight; each checkpoint weight is then quantized as it is read
  (:mod:`qcompile.hf.loading`), so peak memory is the quantized model plus one float weight;
* **calibrated** (``QCompileConfig(recipe, calibration=...)``, for ``gptq`` / ``awq`` / ``smoothquant``): the model
  loads in float and :func:`qcompile.quantize` runs afterwards. Peak memory is the float model's; for models that do
  not fit, the streaming ``qcompile quantize`` command line is the answer;
* **a saved qcompile checkpoint**: the saved plan says which ``QuantizedLinear`` each site is; they are built on
  meta, the checkpoint's tensors are checked against the schemes' declarations (:mod:`qcompile.hf.headers`), then
  loaded by name, bit for bit.

Afterwards the model's ``quantization_config.plan`` records every quantized site, and ``model.qcompile_plan`` is
the :class:`qcompile.Plan`.
"""

from __future__ import annotations

from transformers.quantizers.base import HfQuantizer

from qcompile.hf.config import METHOD, QCompileConfig
from qcompile.hf.modules import dequantize_modules, plan_data, put_meta_modules, saved_plan, site_list, tied_weights
from qcompile.plan import make_plan


def _recipe_algorithms(recipe) -> set[str]:
    """The algorithms a recipe can run (its default's, and each quantizing rule's)."""
    used = {recipe.algorithm} if recipe.default is not None else set()
    used.update(rule.algorithm or recipe.algorithm for rule in recipe.overrides if rule.scheme is not None)
    return used


class QCompileHfQuantizer(HfQuantizer):
    """The transformers quantizer for ``QCompileConfig`` (see the module docstring)."""

    requires_calibration = False
    quantization_config: QCompileConfig

    def __init__(self, quantization_config: QCompileConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        #: checkpoint weight name → plan entry, for the weights still to be quantized as they load
        self.pending: dict = {}
        self.plan = None

    # -- checks before anything is built -----------------------------------------------------------------------
    def validate_environment(self, device_map=None, **kwargs):
        config = self.quantization_config
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("qcompile: device_map offloads to 'disk'; quantized modules cannot be offloaded to "
                             "disk. Use a device_map of devices only")  # fmt: skip
        if self.pre_quantized:
            if config.plan is None:
                raise ValueError("qcompile: this checkpoint's quantization_config has no plan (which scheme each "
                                 "layer has), so its packed tensors cannot be placed")  # fmt: skip
            return
        if config.plan is not None:
            raise ValueError("qcompile: QCompileConfig.plan is written by qcompile when it quantizes; to quantize a "
                             "float checkpoint pass a recipe (a saved plan loads with its checkpoint)")  # fmt: skip
        from qcompile.algorithms import get_algorithm

        algorithms = _recipe_algorithms(config.get_recipe())
        calibrated = sorted(a for a in algorithms if get_algorithm(a).needs_calibration)
        if calibrated and config.calibration is None:
            raise ValueError(f"qcompile: the recipe uses {', '.join(calibrated)}, which needs calibration data: "
                             "QCompileConfig(recipe, calibration=...) (the model then loads in float and is "
                             "quantized after loading)")  # fmt: skip
        recipe = config.get_recipe()
        options = [dict(recipe.options), *(dict(rule.options) for rule in recipe.overrides)]
        if any(o.get("explicit_scales") for o in options):
            raise ValueError("qcompile: explicit_scales keeps input scales in qcompile's own modules, which the "
                             "checkpoint has no place for; drop the option (or call qcompile.quantize)")  # fmt: skip
        if not calibrated and config.calibration is not None:
            raise ValueError(f"qcompile: calibration= is only read by gptq, awq and smoothquant; this recipe runs "
                             f"{', '.join(sorted(algorithms)) or 'no algorithm'}. Drop calibration= to quantize "
                             "each weight while it loads")  # fmt: skip

    # -- before the weights load: the model is on meta ---------------------------------------------------------
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        config = self.quantization_config
        if self.pre_quantized:
            from qcompile.hf.headers import check_checkpoint

            self.plan, modules = saved_plan(model, config.plan, config.get_recipe())
            if checkpoint_files:
                check_checkpoint(self.plan, list(checkpoint_files))
            put_meta_modules(model, self.plan, modules, placeholder=False)
            return model
        sites, modules = site_list(model)
        self.plan = make_plan(config.get_recipe(), sites)  # a recipe that names no layer fails before loading
        if config.calibration is not None:
            return model  # loads in float; quantized after loading
        tied = tied_weights(model)
        for entry in self.plan.quantized():
            if entry.site.weight_name in tied or entry.site.tied_to:
                raise ValueError(f"qcompile: the recipe quantizes {entry.site.name}, whose weight is tied to "
                                 "another (the input embedding); weights tied this way cannot be quantized while "
                                 "loading. Keep it float, or load the model and call qcompile.quantize")  # fmt: skip
        put_meta_modules(model, self.plan, modules, placeholder=True)
        self.pending = {entry.site.weight_name: entry for entry in self.plan.quantized()}
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return param_name in self.pending

    def get_quantize_ops(self):
        from qcompile.hf.loading import QuantizeOnLoad

        return QuantizeOnLoad(self)

    # -- after the weights loaded ------------------------------------------------------------------------------
    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        if self.pending:
            names = ", ".join(sorted(self.pending))
            raise ValueError(f"qcompile: the checkpoint has no tensor for {names}; those layers were planned "
                             "for quantization but never read")  # fmt: skip
        if not self.pre_quantized and config.calibration is not None:
            import qcompile

            qcompile.quantize(model, config.get_recipe(), calibration=config.calibration, progress_bar=False)
            self.plan = model.qcompile_plan
        if self.pre_quantized:
            self._check_loaded(model)
        config.plan = plan_data(self.plan)
        model.qcompile_plan = self.plan
        return model

    def _check_loaded(self, model) -> None:
        """Every saved site holds tensors of its scheme's declared shapes and dtypes."""
        for entry in self.plan.quantized():
            module = model.get_submodule(entry.site.name)
            entry.parsed.check_packed(module.packed(), entry.site.out_features, entry.site.in_features,
                                      where=entry.site.name)  # fmt: skip

    def _dequantize(self, model, dtype=None):
        import torch

        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        dequantize_modules(model, dtype)
        if hasattr(model, "qcompile_plan"):
            del model.qcompile_plan
        return model

    def is_serializable(self, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def register_quantizer() -> None:
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    from transformers.quantizers.auto import register_quantizer as register

    existing = AUTO_QUANTIZER_MAPPING.get(METHOD)
    if existing is QCompileHfQuantizer:
        return
    if existing is not None and existing.__module__ == __name__:
        del AUTO_QUANTIZER_MAPPING[METHOD]  # this module, reloaded: replace its earlier class
    register(METHOD)(QCompileHfQuantizer)
