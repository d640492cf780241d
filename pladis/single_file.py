"""Single-file checkpoints (``.safetensors`` / ``.ckpt``): which layout, which config folder, and loading.

The layouts themselves sit beside their families (``pladis.families``: each family's ``layouts``); this module
reads a checkpoint's keys without loading its weights (``checkpoint_shapes``), picks the layout and the
architecture config (``inspect``: ``--config FOLDER``, a built-in whose U-Net matches, or diffusers' default
config repo if already in the local Hugging Face cache; never downloads) and loads the pipeline (``load``).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pladis import models
from pladis.errors import PladisError
from pladis.families import LAYOUTS, Layout
from pladis.model_files import (
    component_config_file,
    dtype_kw,
    is_weight,
    meta_modules,
    model_components,
    pipeline_class,
    quiet,
)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")  # what diffusers' from_single_file reads

_VAE_PREFIXES = ("first_stage_model.", "vae.")


class CheckpointError(PladisError):
    """A single-file checkpoint (or its config folder) that cannot be used; the message names the fix."""


@dataclass(frozen=True)
class SingleFile:
    """What ``inspect`` found out about a checkpoint (nothing loaded)."""

    pipeline_class: str
    config: Path  # the folder with the architecture configs
    config_origin: str  # "folder", "builtin:<name>" or "hf-cache:<repo>"
    layout: Layout
    denoiser_only: bool  # only the denoiser; every other component from the config folder
    vae_from_config: bool  # text encoders and denoiser, no VAE (a "no-VAE" release)


def checkpoint_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as meta tensors (names and shapes only; nothing is read for safetensors)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a bad header
            raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None
    import zipfile

    # torch.save's zip format memory-maps; the legacy (pre-1.6) format cannot, and is small enough to read
    mmap = zipfile.is_zipfile(path)
    try:
        sd = torch.load(path, map_location="meta", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - pickles fail in many ways; all mean the same to the user
        raise CheckpointError(f"{path} is not a checkpoint torch.load(weights_only=True) can read "
                                   f"({_load_failure(err)}); convert it to .safetensors") from None  # fmt: skip
    while isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _load_failure(err: Exception) -> str:
    """torch.load's reason on one line, without its advice to load with ``weights_only=False`` (which would
    run whatever code the file carries)."""
    lines = [x.strip() for x in str(err).splitlines() if x.strip()]
    kept = [x for x in lines if "weights_only" not in x and "documentation of torch.load" not in x]
    return " ".join(kept) or type(err).__name__


def inspect(path: Path, config: str = "") -> SingleFile:
    """The layout of the checkpoint at ``path`` (absolute) and its config folder (``config``: --config or "")."""
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(f"{path} is not a single-file checkpoint: diffusers' from_single_file reads "
                              f"{' and '.join(CHECKPOINT_SUFFIXES)} files")  # fmt: skip
    shapes = checkpoint_shapes(path)
    layout = next((lay for lay in LAYOUTS if lay.matches(set(shapes))), None)
    if layout is None:
        tried = "; ".join(lay.name for lay in LAYOUTS)
        first = ", ".join(list(shapes)[:3]) or "no tensors"
        raise CheckpointError(
            f"{path.name}: its keys match no supported single-file layout (tried: {tried}); its first keys are "
            f"{first}. Convert it to a diffusers folder, or check that it is a model checkpoint and not a LoRA or an "
            "embedding"
        )
    has_vae = any(k.startswith(_VAE_PREFIXES) for k in shapes)
    denoiser_only = layout.pipeline is None and not has_vae  # LDM U-Net / SD3 / FLUX releases of the denoiser
    vae_from_config = layout.pipeline is not None and not has_vae
    if config:
        cfg = Path(config).expanduser()
        if not cfg.is_dir():
            raise CheckpointError(f"--config {config} does not exist or is not a folder; pass a local diffusers folder "
                                  "with model_index.json and the component configs")  # fmt: skip
        cfg = cfg.resolve()
        weights = [n for n in model_components(cfg) if n != layout.denoiser] if denoiser_only else []
        check_config_folder(cfg, weights, f"{path.name} holds only the {layout.denoiser}")
        origin = "folder"
    else:
        cfg, origin = _builtin_config(path, layout, shapes)
    if vae_from_config:
        check_config_folder(cfg, ["vae"], f"{path.name} has no VAE weights")
    cls = pipeline_class(cfg)
    if layout.pipeline and cls != layout.pipeline:
        raise CheckpointError(f"{path.name} has the {layout.name} layout (a {layout.pipeline}) but the config "
                              f"{cfg} is a {cls}; pass the config folder of the checkpoint's base model")  # fmt: skip
    return SingleFile(cls, cfg, origin, layout, denoiser_only, vae_from_config)


def check_config_folder(folder: Path, weights_for=(), why: str = "") -> None:
    """Each file ``from_single_file`` reads from a config folder is there; the error names the first missing one.

    ``weights_for``: components whose weights must come from this folder too (``why``: the reason, for the error).
    """
    index = folder / "model_index.json"
    if not index.is_file():
        raise CheckpointError(
            f"config folder {folder}: {index} is missing; --config needs a diffusers folder of the "
            "checkpoint's base model (model_index.json, each component's config, tokenizers, scheduler)"
        )
    for name, spec in json.loads(index.read_text()).items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        wanted = folder / name / component_config_file(spec[1])
        if spec[1] == "CLIPTokenizer" or spec[1].endswith("TokenizerFast"):
            if not ((folder / name / "tokenizer.json").is_file() or (folder / name / "vocab.json").is_file()):
                wanted = folder / name / "tokenizer.json"
        if not wanted.is_file():
            raise CheckpointError(f"config folder {folder}: {wanted} is missing (component {name}, {spec[1]}); copy it "
                                  "from the base model's diffusers folder")  # fmt: skip
        if name in weights_for and not any(map(is_weight, (folder / name).iterdir())):
            raise CheckpointError(
                f"the config folder must hold the weights of {', '.join(weights_for)} ({why}), and {folder / name} "
                "has none; pass the base model's full diffusers folder with --config"
            )


def _builtin_config(path: Path, layout: Layout, shapes: dict) -> tuple[Path, str]:
    """A config folder for a checkpoint given without --config: a pladis built-in whose U-Net matches the
    checkpoint's exactly (tiny test models), else diffusers' default config repo if it is already in the
    local Hugging Face cache. Never downloads."""
    if layout.pipeline is None:
        raise CheckpointError(f"{path.name} holds only a denoiser ({layout.name}); pass --config FOLDER, a local "
                              "diffusers folder of its base model with the other components' weights")  # fmt: skip
    for name in layout.builtins:
        if _unet_matches(name, shapes):
            folder = builtin_config_folder(name)
            return folder, f"builtin:{name}"
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS, infer_diffusers_model_type

    types = layout.model_types
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
    raise CheckpointError(
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


_BUILTIN_CONFIGS: dict[str, Path] = {}


def builtin_config_folder(name: str) -> Path:
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


def load(src, dtype: torch.dtype):
    """The pipeline of a resolved single-file ``pladis.sources.Source``, offline."""
    import diffusers

    cls = getattr(diffusers, src.pipeline_class)
    kw = {dtype_kw(): dtype, "local_files_only": True}
    path, config = src.name, str(src.config)
    with quiet():
        if src.denoiser_only:  # FLUX, SD3 and U-Net-only releases
            denoiser_cls = type(meta_modules(src.config)(src.layout.denoiser))
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
