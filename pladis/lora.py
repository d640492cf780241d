"""LoRAs: parse ``FILE[:SCALE]``, check that each fits a pipeline before any weights load, fuse them in.

A unit of its own (the exporter fuses LoRAs before PLADIS is applied; swapping LoRAs on a built engine builds
on the same checks): ``parse_lora`` reads a spec, ``check(loras, model, pipeline_class, component)`` refuses
a LoRA whose keys do not fit the model's layers (meta-device components are enough), ``fuse`` loads them as
peft adapters, weights them by their scales and fuses them into the weights.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from pladis.errors import PladisError

LORA_SUFFIXES = (".safetensors", ".bin")


# the pipelines of the supported families that diffusers may give a LoRA loader (never one PLADIS refuses)
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "PixArtAlphaPipeline", "PixArtSigmaPipeline",
             "StableDiffusion3Pipeline", "FluxPipeline", "Flux2Pipeline", "Flux2KleinPipeline",
             "QwenImagePipeline")  # fmt: skip


class LoraError(PladisError):
    """A LoRA that cannot be read, or does not fit the model it is given with."""


@dataclass(frozen=True)
class Lora:
    path: Path  # absolute
    scale: float


MAX_SCALE = 100.0  # LoRA scales are O(1) (typically 0-2); far past this, fused weights overflow to a black image


def check_scale(what, scale: float) -> None:
    """LoraError unless ``scale`` is a finite number within ±``MAX_SCALE`` (``what``: the LoRA, for the message)."""
    if not math.isfinite(scale):
        raise LoraError(f"LoRA {what!r}: scale must be a finite number; got {scale}")
    if abs(scale) > MAX_SCALE:
        raise LoraError(f"LoRA {what!r}: scale {scale:g} is outside ±{MAX_SCALE:g} (scales are typically 0-2; far "
                        "larger ones overflow the fused weights): use a smaller scale")  # fmt: skip


def parse_lora(spec: str) -> Lora:
    """``FILE`` or ``FILE:SCALE`` (scale 1.0 by default) -> Lora with an absolute path; checks both."""
    spec = str(spec)
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head and not Path(spec).exists() and "/" not in tail and "\\" not in tail:
        path = head
        try:
            scale = float(tail)
        except ValueError:
            raise LoraError(f"LoRA {spec!r}: scale {tail!r} is not a number; write FILE:SCALE, e.g. "
                            f"{head}:0.8") from None  # fmt: skip
    check_scale(spec, scale)
    p = Path(path).expanduser()
    if not p.is_file():
        raise LoraError(f"LoRA file {path} does not exist{' (it is a folder)' if p.is_dir() else ''}; "
                        "pass --lora FILE.safetensors[:SCALE]")  # fmt: skip
    if p.suffix not in LORA_SUFFIXES:
        raise LoraError(f"LoRA file {path} is not a {' or '.join(LORA_SUFFIXES)} file")
    return Lora(p.resolve(), scale)


NO_PEFT = "--lora needs peft (diffusers' LoRA backend): pip install 'pladis[lora]' (or pip install peft)"

_LORA_SUFFIX = re.compile(r"\.(lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)(\.[\w-]+)?\.weight$")


def check(loras, model: str, pipeline_class: str | None, component) -> None:
    """LoRAs need a pipeline with a diffusers LoRA loader, peft, and keys that fit the model's layers.

    ``loras``: ``Lora``s; ``model``: the model's name for the errors; ``pipeline_class``: its diffusers pipeline
    class name; ``component(name)`` returns a pipeline component (meta device is enough) or None.
    """
    if not loras:
        return
    import diffusers

    cls = getattr(diffusers, pipeline_class or "", None)
    if cls is None or not hasattr(cls, "load_lora_weights"):
        with_lora = [n for n in PIPELINES if hasattr(getattr(diffusers, n, None), "load_lora_weights")]
        raise LoraError(f"{model} is a {pipeline_class}, which has no LoRA loader in diffusers "
                        f"{diffusers.__version__}; --lora works with {', '.join(with_lora)}")  # fmt: skip
    if importlib.util.find_spec("peft") is None:
        raise LoraError(NO_PEFT)
    components = list(getattr(cls, "_lora_loadable_modules", []))
    built: dict = {}
    for lora in loras:
        state = _lora_state_dict(cls, lora.path)
        checked = 0
        for key, value in state.items():
            comp_name, _, module_path = key.partition(".")
            if comp_name not in components:  # keys without a component prefix belong to the denoiser
                comp_name, module_path = components[0], key
            module_path = _peft_name(module_path, text=comp_name.startswith("text_encoder"))
            if not isinstance(value, torch.Tensor) or not _LORA_SUFFIX.search(module_path):
                continue  # alphas, DoRA magnitudes, metadata
            if comp_name not in built:
                built[comp_name] = component(comp_name)
            why = _misfit(built[comp_name], _LORA_SUFFIX.sub("", module_path), module_path, value)
            if why:
                raise LoraError(f"LoRA {lora.path.name} does not fit {model} ({pipeline_class}): key {key!r} "
                                f"{why}; is it a LoRA for another model family or base model?")  # fmt: skip
            checked += 1
        if not checked:
            first = ", ".join(list(state)[:3]) or "none"
            raise LoraError(f"LoRA {lora.path.name}: {cls.__name__}.lora_state_dict finds no LoRA layers in it (first "
                            f"keys: {first}); is it a LoRA, and one for this model family?")  # fmt: skip


def _peft_name(key: str, text: bool) -> str:
    """A LoRA key in diffusers' older formats (attention processors, ``lora_linear_layer``, ``lora.down``)
    renamed to peft's ``<layer>.lora_A/lora_B``, with diffusers' own renaming tables."""
    from diffusers.utils import state_dict_utils as sdu

    key = key.replace(".processor.", ".")
    for mapping in (sdu.DIFFUSERS_OLD_TO_PEFT, sdu.DIFFUSERS_TO_PEFT) if text else (sdu.UNET_TO_DIFFUSERS,):
        for old, new in mapping.items():
            if old in key:
                key = key.replace(old, new)
    return key


def _lora_state_dict(cls, path: Path) -> dict:
    try:
        out = cls.lora_state_dict(str(path.parent), weight_name=path.name, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - diffusers' format converters raise anything on foreign files
        raise LoraError(f"LoRA {path} cannot be read by {cls.__name__}.lora_state_dict ({type(err).__name__}: "
                        f"{str(err)[:300]}); is it a LoRA for this model family?") from None  # fmt: skip
    return out[0] if isinstance(out, tuple) else out


def _misfit(module, path: str, key: str, value: torch.Tensor) -> str | None:
    """Why the LoRA tensor ``key`` does not fit ``module``'s layer ``path`` (None: it fits)."""
    if module is None:
        return "names a component this pipeline does not have"
    try:
        layer = module.get_submodule(path)
    except AttributeError:
        try:  # transformers >= 5.6 flattened CLIPTextModel (no .text_model); diffusers maps such keys
            layer = module.get_submodule(path.removeprefix("text_model."))
        except AttributeError:
            return f"names layer {path!r}, which the model does not have"
    down = re.search(r"lora_A|lora\.down|lora_down", key) is not None
    if isinstance(layer, torch.nn.Linear):
        size = layer.in_features if down else layer.out_features
    elif isinstance(layer, torch.nn.Conv2d):
        size = layer.in_channels if down else layer.out_channels
    else:
        return None
    got = value.shape[1] if down else value.shape[0]
    if got != size:
        side = "input" if down else "output"
        return f"has {side} size {got}, but layer {path!r} has {size}"
    return None


@contextlib.contextmanager
def _loading():
    """diffusers' loader without its notes that say nothing to a pladis user: "No LoRA keys associated to
    CLIPTextModel" (a LoRA for the denoiser only), transformers' weight-loading progress bar, and peft's
    "Already found a peft_config" (a second adapter). (model_files.quiet is a floor above this module.)"""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels, bar = (tlog.get_verbosity(), dlog.get_verbosity()), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*Already found a `?peft_config`?")
            yield
    finally:
        tlog.set_verbosity(levels[0])
        dlog.set_verbosity(levels[1])
        if bar:
            tlog.enable_progress_bar()


def fuse(pipe, loras) -> None:
    """Load each LoRA as a peft adapter, weight them by their scales, fuse them into the weights and drop
    the adapters: the pipeline is a plain one again, with LoRA-modified weights."""
    names = []
    for i, lora in enumerate(loras):
        name = f"pladis_lora_{i}"
        with _loading():
            pipe.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name, adapter_name=name,
                                   local_files_only=True)  # fmt: skip
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)  # each adapter's scale was set by set_adapters
    pipe.unload_lora_weights()  # removes the peft layers; the fused weights stay


# --------------------------------------------------------------------------------------------------
# LoRAs on a built engine: the adapters' weight deltas, read with diffusers' loader on a weightless skeleton
# --------------------------------------------------------------------------------------------------


def has_loader(pipeline_class: str | None) -> bool:
    """Whether diffusers gives ``pipeline_class`` (a pipeline class name) a LoRA loader."""
    import diffusers

    return hasattr(getattr(diffusers, pipeline_class or "", None), "load_lora_weights")


def load_adapter(pipe, lora: Lora, name: str) -> dict[tuple[str, str], torch.nn.Module]:
    """Load ``lora`` into the skeleton ``pipe`` as the peft adapter ``name`` with diffusers' own loader (every
    format its ``lora_state_dict`` reads: peft / diffusers, kohya and the other non-diffusers layouts, network
    alphas and saved adapter metadata). Returns {(component, module path): the peft layer holding it}.

    ``pipe``: a pipeline whose LoRA-loadable components have real (uninitialised) storage (``skeleton``): the
    base weights are never read, only the adapters' own ``lora_A`` / ``lora_B`` tensors and scalings.
    """
    from peft.tuners.lora import LoraLayer

    try:
        with _loading():
            pipe.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name, adapter_name=name,
                                   local_files_only=True)  # fmt: skip
    except (ValueError, KeyError, RuntimeError) as err:  # diffusers' and peft's refusals of a foreign file
        raise LoraError(f"LoRA {lora.path.name} cannot be loaded into {type(pipe).__name__} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:300] if str(err) else ''}); is it a LoRA for this model "
                        "family?") from None  # fmt: skip
    layers = {}
    for comp in getattr(pipe, "_lora_loadable_modules", []):
        module = getattr(pipe, comp, None)
        if not isinstance(module, torch.nn.Module):
            continue
        for path, layer in module.named_modules():
            if isinstance(layer, LoraLayer) and name in layer.lora_A:
                if layer.use_dora.get(name):
                    raise LoraError(f"LoRA {lora.path.name}: {comp}.{path} is a DoRA layer (a magnitude vector per "
                                    "output); swapping supports plain LoRA layers: fuse it at export with "
                                    "pladis export --lora")  # fmt: skip
                layers[(comp, path)] = layer
    if not layers:
        raise LoraError(f"LoRA {lora.path.name}: {type(pipe).__name__}'s loader finds no LoRA layers in it; is it a "
                        "LoRA, and one for this model family?")  # fmt: skip
    return layers


def delta(layer, name: str, scale: float) -> torch.Tensor:
    """``scale · B·A · alpha/r`` of adapter ``name`` in the peft layer ``layer``, ``(out, in)``, as peft's own
    merge computes it (``set_scale`` then ``get_delta_weight``, the path diffusers' ``fuse_lora`` takes)."""
    layer.set_scale(name, scale)
    with torch.no_grad():
        return layer.get_delta_weight(name).detach()
