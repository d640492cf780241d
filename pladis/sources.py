"""Where a model comes from: built-ins, diffusers folders, single-file checkpoints, LoRAs, and the record of it.

One module for the exporter and for the runtime's eager reference, so both build the same model:

- ``resolve(model, config, loras)`` checks a model reference without loading weights (bad paths, folders
  that are not pipelines, checkpoints of no known layout, configs that are missing a file, LoRAs that do
  not fit, scales that are not finite numbers) and returns a ``Source``. Every failure is a ``ValueError``
  that names the file and the fix.
- ``load(source, seed, dtype)`` builds the pipeline offline (``local_files_only=True`` for local paths)
  and fuses the LoRAs into its weights (diffusers' loaders with peft, then ``fuse_lora`` and
  ``unload_lora_weights``), so what is exported is one plain model.
- ``record(source)`` is the manifest's ``model`` entry: absolute paths, sha256 of every weight file, a hash
  of the configs, each LoRA's file name, sha256 and scale.
- ``load_recorded(entry, seed, dtype)`` rebuilds that model for the eager reference after checking that
  nothing moved or changed (``SourceChanged`` otherwise); it never falls back to the model hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pladis import models
from pladis.files import sha256

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")  # what diffusers' from_single_file reads
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".gguf")
LORA_SUFFIXES = (".safetensors", ".bin")
CONFIG_SUFFIXES = (".json", ".txt", ".model", ".yaml", ".yml")  # configs, vocabularies, merges, sentencepiece
_HUB_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+")
_UNET = "model.diffusion_model."


class SourceChanged(ValueError):
    """The model (or a LoRA) an export was made from has moved or changed since."""


@dataclass(frozen=True)
class Layout:
    """A single-file checkpoint layout: keys that identify it and the pipeline it belongs to."""

    name: str
    keys: tuple[str, ...]  # all of these must be present
    pipeline: str | None  # None: a denoiser-only file; the pipeline comes from the config folder
    denoiser: str  # the pipeline component the file's denoiser weights load into
    builtins: tuple[str, ...] = ()  # built-in configs to try when no --config is given
    any_prefix: str = ""  # and one key must start with this

    def matches(self, keys: set[str]) -> bool:
        ok = all(k in keys for k in self.keys)
        return ok and (not self.any_prefix or any(k.startswith(self.any_prefix) for k in keys))


LAYOUTS = (
    Layout("SDXL base (LDM U-Net + conditioner.embedders CLIP-L/OpenCLIP-G)",
           (_UNET + "input_blocks.0.0.weight", "conditioner.embedders.1.model.positional_embedding"),
           "StableDiffusionXLPipeline", "unet", ("tiny-sdxl",)),
    Layout("SD 1.x/2.x (LDM U-Net + cond_stage_model text encoder)", (_UNET + "input_blocks.0.0.weight",),
           "StableDiffusionPipeline", "unet", ("tiny-sd15", "small-sd15"), any_prefix="cond_stage_model."),
    Layout("LDM U-Net only (model.diffusion_model.*)", (_UNET + "input_blocks.0.0.weight",), None, "unet"),
    Layout("SD3 MMDiT (model.diffusion_model.joint_blocks.*)",
           (_UNET + "joint_blocks.0.context_block.adaLN_modulation.1.bias",), None, "transformer"),
    Layout("SD3 MMDiT (joint_blocks.*)", ("joint_blocks.0.context_block.adaLN_modulation.1.bias",), None,
           "transformer"),
    Layout("FLUX.1 (model.diffusion_model.double_blocks.*)",
           (_UNET + "double_blocks.0.img_attn.norm.key_norm.scale",), None, "transformer"),
    Layout("FLUX.1 (double_blocks.*)", ("double_blocks.0.img_attn.norm.key_norm.scale",), None, "transformer"),
)  # fmt: skip
_VAE_PREFIXES = ("first_stage_model.", "vae.")
# diffusers' checkpoint types (single_file_utils.infer_diffusers_model_type) per pipeline; the first is the default
_MODEL_TYPES = {"StableDiffusionXLPipeline": ("xl_base", "xl_inpaint", "playground-v2-5"),
                "StableDiffusionPipeline": ("v1", "v2", "inpainting", "inpainting_v2")}  # fmt: skip


@dataclass(frozen=True)
class Lora:
    path: Path  # absolute
    scale: float


@dataclass(frozen=True)
class Source:
    """A resolved model reference (nothing loaded). ``name``: built-in name, hub id or absolute path."""

    kind: str  # builtin | hub | folder | single_file
    name: str
    pipeline_class: str | None = None
    config: Path | None = None  # single files: the folder with the architecture configs
    config_origin: str = ""  # single files: "folder", "builtin:<name>" or "hf-cache:<repo>"
    layout: Layout | None = None
    loras: tuple[Lora, ...] = ()
    denoiser_only: bool = False  # single files: only the denoiser; every other component from the config folder
    vae_from_config: bool = False  # single files: text encoders and denoiser, no VAE (a "no-VAE" release)


# --------------------------------------------------------------------------------------------------
# Hashes
# --------------------------------------------------------------------------------------------------


def _is_weight(path: Path) -> bool:
    return path.suffix in WEIGHT_SUFFIXES


def _files(folder: Path) -> list[Path]:
    """Every regular file of a model folder, sorted, hidden files and folders (caches) left out."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )  # fmt: skip


def config_sha256(folder: Path) -> str:
    """One sha256 over a folder's config files (model_index.json, configs, tokenizers, scheduler), by path."""
    h = hashlib.sha256()
    for p in _files(folder):
        if p.suffix in CONFIG_SUFFIXES:
            h.update(f"{p.relative_to(folder).as_posix()}\0{sha256(p)}\n".encode())
    return h.hexdigest()


def weight_files(folder: Path) -> list[dict]:
    return [{"file": p.relative_to(folder).as_posix(), "sha256": sha256(p), "bytes": p.stat().st_size}
            for p in _files(folder) if _is_weight(p)]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# resolve: checks before any weights are loaded
# --------------------------------------------------------------------------------------------------


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
            raise ValueError(f"LoRA {spec!r}: scale {tail!r} is not a number; write FILE:SCALE, e.g. "
                             f"{head}:0.8") from None  # fmt: skip
    if not math.isfinite(scale):
        raise ValueError(f"LoRA {spec!r}: scale must be a finite number; got {scale}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"LoRA file {path} does not exist{' (it is a folder)' if p.is_dir() else ''}; "
                         "pass --lora FILE.safetensors[:SCALE]")  # fmt: skip
    if p.suffix not in LORA_SUFFIXES:
        raise ValueError(f"LoRA file {path} is not a {' or '.join(LORA_SUFFIXES)} file")
    return Lora(p.resolve(), scale)


def _looks_like_path(model: str) -> bool:
    """A name that can only mean a local path (a hub id is exactly ``org/name``)."""
    return (model.startswith((".", "/", "~")) or Path(model).suffix in CHECKPOINT_SUFFIXES + LORA_SUFFIXES
            or model.count("/") > 1 or "\\" in model)  # fmt: skip


def resolve(model: str, config: str = "", loras=()) -> Source:
    """Check ``model`` (and ``config``, ``loras``) and say what it is; loads no weights.

    ``model``: a built-in name, a diffusers folder (``model_index.json``), a single ``.safetensors`` /
    ``.ckpt`` checkpoint, or a hub id ``org/name``. ``config``: for a single file, a local diffusers folder
    with the architecture configs (``model_index.json``, each component's config, tokenizers, scheduler;
    weights not needed). ``loras``: ``FILE[:SCALE]`` strings.
    """
    loras = tuple(parse_lora(x) for x in (loras or ()))
    if config and not (model.endswith(CHECKPOINT_SUFFIXES) or Path(model).is_file()):
        raise ValueError(f"--config is for single-file checkpoints (.safetensors, .ckpt); {model!r} brings its own "
                         "architecture config: drop --config")  # fmt: skip
    if model in models.BUILTINS:
        if not loras:
            return Source("builtin", model)
        pipe = models.load(model, device="meta")  # structure only, instant
        src = Source("builtin", model, type(pipe).__name__, loras=loras)
        _check_loras(src, lambda name: getattr(pipe, name, None))
        return src
    p = Path(model).expanduser()
    if p.is_dir():
        index = p / "model_index.json"
        if not index.is_file():
            raise ValueError(
                f"{model} is not a diffusers pipeline folder: {index} is missing. Save one with "
                "pipe.save_pretrained(folder), or pass a single .safetensors checkpoint with --config FOLDER"
            )
        folder = p.resolve()
        src = Source("folder", str(folder), _pipeline_class(folder), loras=loras)
        _check_loras(src, _meta_modules(folder))
        return src
    if p.is_file():
        return _resolve_single_file(p.resolve(), config, loras)
    if _looks_like_path(model):
        raise ValueError(f"model path {model} does not exist (looked in {Path.cwd()}); pass an existing diffusers "
                         "folder or .safetensors / .ckpt file")  # fmt: skip
    if not _HUB_ID.fullmatch(model):
        raise ValueError(
            f"unknown model {model!r}: use a built-in ({', '.join(models.BUILTINS)}), a diffusers folder, "
            "a .safetensors / .ckpt checkpoint, or a hub id of the form org/name"
        )
    if loras and importlib.util.find_spec("peft") is None:
        raise ValueError(_NO_PEFT)
    return Source("hub", model, None, loras=loras)  # LoRAs are checked once the model is loaded


def _pipeline_class(folder: Path) -> str:
    return json.loads((folder / "model_index.json").read_text())["_class_name"]


def checkpoint_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as meta tensors (names and shapes only; nothing is read for safetensors)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a bad header
            raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    try:
        sd = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - pickles fail in many ways; all mean the same to the user
        raise ValueError(f"{path} is not a checkpoint torch.load(weights_only=True) can read ({err}); convert it "
                         "to .safetensors") from None  # fmt: skip
    while isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _resolve_single_file(path: Path, config: str, loras: tuple[Lora, ...]) -> Source:
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"{path} is not a single-file checkpoint: diffusers' from_single_file reads "
                         f"{' and '.join(CHECKPOINT_SUFFIXES)} files")  # fmt: skip
    shapes = checkpoint_shapes(path)
    layout = next((lay for lay in LAYOUTS if lay.matches(set(shapes))), None)
    if layout is None:
        tried = "; ".join(lay.name for lay in LAYOUTS)
        first = ", ".join(list(shapes)[:3]) or "no tensors"
        raise ValueError(f"{path.name}: its keys match no supported single-file layout (tried: {tried}); its first "
                         f"keys are {first}. Convert it to a diffusers folder, or check that it is a model "
                         "checkpoint and not a LoRA or an embedding")  # fmt: skip
    has_vae = any(k.startswith(_VAE_PREFIXES) for k in shapes)
    denoiser_only = layout.pipeline is None and not has_vae  # LDM U-Net / SD3 / FLUX releases of the denoiser
    vae_from_config = layout.pipeline is not None and not has_vae
    if config:
        cfg = Path(config).expanduser()
        if not cfg.is_dir():
            raise ValueError(f"--config {config} does not exist or is not a folder; pass a local diffusers folder "
                             "with model_index.json and the component configs")  # fmt: skip
        cfg = cfg.resolve()
        weights = [n for n in _model_components(cfg) if n != layout.denoiser] if denoiser_only else []
        check_config_folder(cfg, weights, f"{path.name} holds only the {layout.denoiser}")
        origin = "folder"
    else:
        cfg, origin = _builtin_config(path, layout, shapes)
    if vae_from_config:
        check_config_folder(cfg, ["vae"], f"{path.name} has no VAE weights")
    cls = _pipeline_class(cfg)
    if layout.pipeline and cls != layout.pipeline:
        raise ValueError(f"{path.name} has the {layout.name} layout (a {layout.pipeline}) but the config "
                         f"{cfg} is a {cls}; pass the config folder of the checkpoint's base model")  # fmt: skip
    src = Source("single_file", str(path), cls, cfg, origin, layout, loras, denoiser_only, vae_from_config)
    _check_loras(src, _meta_modules(cfg))
    return src


def _component_config_file(class_name: str) -> str:
    if class_name.endswith("Scheduler"):
        return "scheduler_config.json"
    if "Tokenizer" in class_name:
        return "tokenizer_config.json"
    if class_name.endswith(("FeatureExtractor", "ImageProcessor")):
        return "preprocessor_config.json"
    return "config.json"


def _model_components(folder: Path) -> list[str]:
    """The components of a diffusers folder that are models (they have weights)."""
    index = json.loads((folder / "model_index.json").read_text())
    return [
        name for name, spec in index.items()
        if not name.startswith("_") and isinstance(spec, list) and spec[0] in ("diffusers", "transformers")
        and _component_config_file(spec[1]) == "config.json"
    ]  # fmt: skip


def check_config_folder(folder: Path, weights_for=(), why: str = "") -> None:
    """Each file ``from_single_file`` reads from a config folder is there; the error names the first missing one.

    ``weights_for``: components whose weights must come from this folder too (``why``: the reason, for the error).
    """
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(
            f"config folder {folder}: {index} is missing; --config needs a diffusers folder of the "
            "checkpoint's base model (model_index.json, each component's config, tokenizers, scheduler)"
        )
    for name, spec in json.loads(index.read_text()).items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        wanted = folder / name / _component_config_file(spec[1])
        if spec[1] == "CLIPTokenizer" or spec[1].endswith("TokenizerFast"):
            if not ((folder / name / "tokenizer.json").is_file() or (folder / name / "vocab.json").is_file()):
                wanted = folder / name / "tokenizer.json"
        if not wanted.is_file():
            raise ValueError(f"config folder {folder}: {wanted} is missing (component {name}, {spec[1]}); copy it "
                             "from the base model's diffusers folder")  # fmt: skip
        if name in weights_for and not any(map(_is_weight, (folder / name).iterdir())):
            raise ValueError(
                f"the config folder must hold the weights of {', '.join(weights_for)} ({why}), and {folder / name} "
                "has none; pass the base model's full diffusers folder with --config"
            )


def _builtin_config(path: Path, layout: Layout, shapes: dict) -> tuple[Path, str]:
    """A config folder for a checkpoint given without --config: a pladis built-in whose U-Net matches the
    checkpoint's exactly (tiny test models), else diffusers' default config repo if it is already in the
    local Hugging Face cache. Never downloads."""
    if layout.pipeline is None:
        raise ValueError(f"{path.name} holds only a denoiser ({layout.name}); pass --config FOLDER, a local "
                         "diffusers folder of its base model with the other components' weights")  # fmt: skip
    for name in layout.builtins:
        if _unet_matches(name, shapes):
            folder = _builtin_config_folder(name)
            return folder, f"builtin:{name}"
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS, infer_diffusers_model_type

    types = _MODEL_TYPES.get(layout.pipeline, ())
    try:
        model_type = infer_diffusers_model_type(shapes)
    except Exception:  # noqa: BLE001 - diffusers' layout sniffing indexes keys that small models lack
        model_type = None
    model_type = model_type if model_type in types else types[0]  # diffusers' guess only within the layout's family
    repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]
    from huggingface_hub import constants, snapshot_download

    try:
        folder = Path(snapshot_download(repo, local_files_only=True, allow_patterns=["*.json", "*.txt"]))
        check_config_folder(folder)
        return folder, f"hf-cache:{repo}"
    except Exception:  # noqa: BLE001 - not cached, or cached incompletely: both mean "provide --config"
        pass
    raise ValueError(
        f"{path.name} has the {layout.name} layout, but its architecture config is not available offline: it is "
        f"not a pladis built-in ({', '.join(layout.builtins)}) and {repo}/model_index.json is not in the local "
        f"Hugging Face cache ({constants.HF_HUB_CACHE}); pladis does not download it. Pass --config FOLDER, a local "
        f"diffusers folder of the base model (model_index.json, each component's config, tokenizers, scheduler; "
        f"weights not needed), e.g. from `hf download {repo} --include '*.json' '*.txt' --local-dir base`"
    )


def _unet_matches(name: str, shapes: dict) -> bool:
    """Whether the checkpoint's LDM U-Net converts to exactly the built-in ``name``'s U-Net (names and shapes)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = models.load(name, device="meta").unet
    want = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    try:
        got = convert_ldm_unet_checkpoint(shapes, dict(unet.config))
    except Exception:  # noqa: BLE001 - a different layout fails the conversion in many ways
        return False
    return {k: tuple(v.shape) for k, v in got.items() if v is not None} == want


@contextlib.contextmanager
def _quiet():
    """transformers' and diffusers' info and warnings off (loading notes that say nothing to a pladis user:
    "no LoRA keys for the text encoder", "modules kept in float32: []")."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = tlog.get_verbosity(), dlog.get_verbosity()
    tlog.set_verbosity_error()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(levels[0])
        dlog.set_verbosity(levels[1])


_BUILTIN_CONFIGS: dict[str, Path] = {}


def _builtin_config_folder(name: str) -> Path:
    """The built-in ``name``'s configs written as a diffusers folder (no weights), once per process, in a
    temporary folder (a cache on disk could go stale when the built-in changes)."""
    if name in _BUILTIN_CONFIGS:
        return _BUILTIN_CONFIGS[name]
    import atexit
    import shutil

    pipe = models.load(name, device="meta")
    root = Path(tempfile.mkdtemp(prefix=f"pladis-config-{name}-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    pipe.save_config(root)
    for cname, comp in pipe.components.items():
        if comp is None:
            continue
        if isinstance(comp, torch.nn.Module) and hasattr(comp.config, "save_pretrained"):
            comp.config.save_pretrained(root / cname)  # transformers
        elif hasattr(comp, "save_config"):
            comp.save_config(root / cname)  # diffusers models and schedulers
        else:
            comp.save_pretrained(root / cname)  # tokenizers
    _BUILTIN_CONFIGS[name] = root
    return root


def _meta_modules(folder: Path):
    """A getter: component name -> that component built on the meta device from ``folder``'s config."""
    index = json.loads((folder / "model_index.json").read_text())

    def get(name: str):
        spec = index.get(name)
        if not isinstance(spec, list) or spec[0] not in ("diffusers", "transformers"):
            return None
        cls = getattr(importlib.import_module(spec[0]), spec[1], None)
        if cls is None or not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
            return None
        with torch.device("meta"), _quiet():
            if spec[0] == "diffusers":
                return cls.from_config(cls.load_config(folder / name))
            return cls._from_config(cls.config_class.from_pretrained(folder / name))

    return get


# --------------------------------------------------------------------------------------------------
# LoRA checks
# --------------------------------------------------------------------------------------------------


_NO_PEFT = "--lora needs peft (diffusers' LoRA backend): pip install 'pladis[lora]' (or pip install peft)"
_LORA_SUFFIX = re.compile(r"\.(lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)(\.[\w-]+)?\.weight$")


def _check_loras(src: Source, component) -> None:
    """LoRAs need a pipeline with a diffusers LoRA loader, peft, and keys that fit the model's layers.

    ``component(name)`` returns a pipeline component (meta device is enough) or None.
    """
    if not src.loras:
        return
    import diffusers

    cls = getattr(diffusers, src.pipeline_class or "", None)
    if cls is None or not hasattr(cls, "load_lora_weights"):
        known = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline",
                 "SanaPipeline")  # fmt: skip
        with_lora = [n for n in known if hasattr(getattr(diffusers, n, None), "load_lora_weights")]
        raise ValueError(f"{src.name} is a {src.pipeline_class}, which has no LoRA loader in diffusers "
                         f"{diffusers.__version__}; --lora works with {', '.join(with_lora)}")  # fmt: skip
    if importlib.util.find_spec("peft") is None:
        raise ValueError(_NO_PEFT)
    components = list(getattr(cls, "_lora_loadable_modules", []))
    built: dict = {}
    for lora in src.loras:
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
                raise ValueError(f"LoRA {lora.path.name} does not fit {src.name} ({src.pipeline_class}): key {key!r} "
                                 f"{why}; is it a LoRA for another model family or base model?")  # fmt: skip
            checked += 1
        if not checked:
            first = ", ".join(list(state)[:3]) or "none"
            raise ValueError(f"LoRA {lora.path.name}: {cls.__name__}.lora_state_dict finds no LoRA layers in it (first "
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
        raise ValueError(f"LoRA {path} cannot be read by {cls.__name__}.lora_state_dict ({type(err).__name__}: "
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


# --------------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------------


def _dtype_kw() -> str:
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


def load(src: Source, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The pipeline ``src`` describes, offline for local paths, with its LoRAs fused into the weights."""
    if src.kind in ("builtin", "hub"):
        pipe = models.load(src.name, seed=seed, dtype=dtype)
        if src.kind == "hub" and src.loras:
            _check_loras(src if src.pipeline_class else _with_class(src, pipe), lambda n: getattr(pipe, n, None))
    elif src.kind == "folder":
        import diffusers

        with _quiet():
            pipe = diffusers.DiffusionPipeline.from_pretrained(src.name, local_files_only=True, **{_dtype_kw(): dtype})
    elif src.kind == "single_file":
        pipe = _load_single_file(src, dtype)
    else:
        raise ValueError(f"unknown model source kind {src.kind!r}")
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    if src.loras:
        with _quiet():
            fuse_loras(pipe, src.loras)
    return pipe if device == "cpu" else pipe.to(device)


def _with_class(src: Source, pipe) -> Source:
    return Source(src.kind, src.name, type(pipe).__name__, loras=src.loras)


def _load_single_file(src: Source, dtype: torch.dtype):
    import diffusers

    cls = getattr(diffusers, src.pipeline_class)
    kw = {_dtype_kw(): dtype, "local_files_only": True}
    path, config = src.name, str(src.config)
    with _quiet():
        if src.denoiser_only:  # FLUX, SD3 and U-Net-only releases
            denoiser_cls = type(_meta_modules(src.config)(src.layout.denoiser))
            denoiser = denoiser_cls.from_single_file(path, config=config, subfolder=src.layout.denoiser, **kw)
            return cls.from_pretrained(config, **{src.layout.denoiser: denoiser}, **kw)
        extra = {}
        if src.vae_from_config:
            extra["vae"] = diffusers.AutoencoderKL.from_pretrained(config, subfolder="vae", **kw)
        if src.pipeline_class == "StableDiffusionXLPipeline":
            extra["text_encoder_2"] = _sdxl_text_encoder_2(Path(path), src.config, dtype)
        return cls.from_single_file(path, config=config, **extra, **kw)


def _sdxl_text_encoder_2(path: Path, config: Path, dtype: torch.dtype):
    """SDXL's OpenCLIP-G text encoder, read from the ``conditioner.embedders.1.`` keys alone.

    diffusers picks the conversion by a width test that cannot tell the two encoders apart when they are
    equally wide (small models); given only the OpenCLIP keys it cannot pick the CLIP-L one.
    """
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint
    from transformers import CLIPTextModelWithProjection

    prefix = "conditioner.embedders.1."
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            ckpt = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    else:
        ckpt = {k: v for k, v in load_single_file_checkpoint(str(path), local_files_only=True).items()
                if k.startswith(prefix)}  # fmt: skip
    return create_diffusers_clip_model_from_ldm(
        CLIPTextModelWithProjection, ckpt, subfolder="text_encoder_2", config=str(config), torch_dtype=dtype,
        local_files_only=True,
    )  # fmt: skip


def fuse_loras(pipe, loras) -> None:
    """Load each LoRA as a peft adapter, weight them by their scales, fuse them into the weights and drop
    the adapters: the pipeline is a plain one again, with LoRA-modified weights."""
    names = []
    for i, lora in enumerate(loras):
        name = f"pladis_lora_{i}"
        pipe.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name, adapter_name=name,
                               local_files_only=True)  # fmt: skip
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)  # each adapter's scale was set by set_adapters
    pipe.unload_lora_weights()  # removes the peft layers; the fused weights stay


# --------------------------------------------------------------------------------------------------
# The manifest record and the rebuild
# --------------------------------------------------------------------------------------------------


def record(src: Source) -> dict:
    """The manifest's ``model`` entries for ``src``: kind, absolute path, weight hashes, config hash, LoRAs."""
    out: dict = {"source": src.name, "kind": src.kind}
    if src.kind == "folder":
        folder = Path(src.name)
        out |= {"files": weight_files(folder), "config_sha256": config_sha256(folder)}
    elif src.kind == "single_file":
        p = Path(src.name)
        out |= {
            "files": [{"file": p.name, "sha256": sha256(p), "bytes": p.stat().st_size}],
            "layout": src.layout.name,
            "config": {
                "origin": src.config_origin,
                "path": None if src.config_origin.startswith("builtin:") else str(src.config),  # built-in: rebuilt
                "config_sha256": config_sha256(src.config),
            },
        }
        if src.denoiser_only or src.vae_from_config:  # components whose weights come from the config folder
            out["config"] |= {"denoiser_only": src.denoiser_only, "vae_from_config": src.vae_from_config,
                              "files": weight_files(src.config)}  # fmt: skip
    out["loras"] = [{"file": x.path.name, "path": str(x.path), "sha256": sha256(x.path), "scale": x.scale}
                    for x in src.loras]  # fmt: skip
    return out


def _check_files(folder: Path, recorded: list[dict], what: str) -> None:
    for f in recorded:
        p = folder / f["file"] if folder.is_dir() else folder
        if not p.is_file():
            raise SourceChanged(f"{what}: {p} is gone since the export; restore it, or re-export "
                                "(pladis export) from the model as it is now")  # fmt: skip
        digest = sha256(p)
        if digest != f["sha256"]:
            raise SourceChanged(
                f"{what}: {p} changed since the export: its sha256 is {digest[:16]}…, the manifest records "
                f"{f['sha256'][:16]}…; the eager reference would not be the exported model. Restore the file, or "
                "re-export (pladis export) and compare against the new export"
            )


def verify(entry: dict) -> Source:
    """Check that the recorded source is where it was and unchanged; return it as a ``Source``.

    Raises ``SourceChanged`` (a ValueError) naming what moved or changed and what to do.
    """
    kind, name = entry.get("kind"), entry["source"]
    loras = tuple(Lora(Path(x["path"]), float(x["scale"])) for x in entry.get("loras", []))
    for x, rec in zip(loras, entry.get("loras", []), strict=True):
        if not x.path.is_file():
            raise SourceChanged(f"LoRA {rec['file']} of this export is no longer at {x.path}; put it back, or "
                                "re-export with --lora pointing at its new place")  # fmt: skip
        _check_files(x.path, [rec], f"LoRA {rec['file']}")
    if kind is None:  # manifests from before sources were recorded: the model name as typed
        if name in models.BUILTINS or (_HUB_ID.fullmatch(name) and not Path(name).exists()):
            return Source("builtin" if name in models.BUILTINS else "hub", name)
        p = Path(name)
        if not p.is_absolute():
            raise SourceChanged(f"this export records its model as the relative path {name!r} (an export made before "
                                "absolute paths were recorded); re-export it with pladis export")  # fmt: skip
        if not (p / "model_index.json").is_file():  # before single files were supported: it was a folder
            raise SourceChanged(
                f"the model this export was made from is no longer a diffusers folder at {p}; move it back, or "
                "re-export from its new place (pladis export --model NEW_PATH)"
            )
        return Source("folder", name, _pipeline_class(p), loras=loras)  # no hashes recorded: nothing to compare
    if kind in ("builtin", "hub"):
        return Source(kind, name, loras=loras)
    p = Path(name)
    what = f"the model this export was made from ({kind.replace('_', ' ')})"
    if not p.exists():
        raise SourceChanged(
            f"{what} is no longer at {p}: it was moved or deleted. Move it back, or re-export from its new place "
            "(pladis export --model NEW_PATH); the eager reference never falls back to the model hub for a local model"
        )
    if kind == "folder":
        _check_files(p, entry.get("files", []), what)
        if "config_sha256" in entry and config_sha256(p) != entry["config_sha256"]:
            raise SourceChanged(f"{what}: the configs in {p} (model_index.json, */config.json, tokenizers, "
                                "scheduler) changed since the export; restore them or re-export")  # fmt: skip
        return Source("folder", str(p), _pipeline_class(p), loras=loras)
    _check_files(p, entry.get("files", []), what)
    cfg = entry["config"]
    origin = cfg["origin"]
    builtin = origin.removeprefix("builtin:") if origin.startswith("builtin:") else ""
    config = _builtin_config_folder(builtin) if builtin else Path(cfg["path"])
    if not (config / "model_index.json").is_file():
        raise SourceChanged(f"the config folder of this export's checkpoint is no longer at {config}; put it back, or "
                            "re-export with --config pointing at its new place")  # fmt: skip
    if config_sha256(config) != cfg["config_sha256"]:
        where = (f"the built-in {builtin}'s config (pladis or diffusers was changed)" if builtin
                 else f"the config folder {config}")  # fmt: skip
        raise SourceChanged(f"{where} of this export's checkpoint differs from the export's (config hash); restore "
                            "it or re-export")  # fmt: skip
    if cfg.get("files"):
        _check_files(config, cfg["files"], f"the config folder {config}")
    layout = next(lay for lay in LAYOUTS if lay.name == entry["layout"])
    return Source("single_file", str(p), _pipeline_class(config), config, origin, layout, loras,
                  cfg.get("denoiser_only", False), cfg.get("vae_from_config", False))  # fmt: skip


def load_recorded(entry: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Rebuild the pipeline a manifest's ``model`` entry describes (checked first with ``verify``)."""
    return load(verify(entry), seed=seed, dtype=dtype, device=device)
