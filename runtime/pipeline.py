"""The runtime pipeline: tokenize → text encoder(s) → diffusers scheduler loop → VAE decode → images.

``Runtime`` binds an engine folder to one backend per component; ``generate`` samples images. The loop is
split into ``prepare`` / ``predict`` / ``step`` / ``decode`` so the parity harness can drive two
runtimes in lockstep through the very same code.

Loading: ``load`` creates every component's session (engine) and ``warm_up`` runs a component once on the
shapes about to be used; ``generate`` does both before it starts its clocks, and reports their time as
``timings["load"]`` (0 once everything is loaded and warm), so step timings never include session creation.

Devices: every tensor the runtime holds (noise, latents, conditioning, predictions, scheduler output) is on
``device``; the scheduler's own tables stay where diffusers keeps them (CPU scalars).
With ``device="cpu"`` nothing leaves the CPU. With a CUDA device the initial noise is drawn from a CPU
generator seeded per image (the same images on any device, as diffusers does) and moved once; the
conditioning is moved once after encoding; in the loop backends take and return device tensors (ONNX Runtime
through I/O binding, TensorRT on CUDA buffers), so nothing round-trips through ``.numpy()`` until decoding
hands the final image to PIL. A backend that runs elsewhere (TensorRT: CUDA only) gets its inputs moved in
and its outputs moved back to ``device``.

CUDA graphs (``cuda_graphs=True``, CUDA devices only): the denoiser, the one component called every step, is
replayed from a graph captured once per input shapes after warm-up (``graphs.GraphCache``; ``warm_loop``
captures before the clocks start). Backends that capture through the runtime (``cuda_graphs = "capture"``:
torch, aoti, trt) get their inputs on their device first, since a graph cannot copy from host memory; ONNX
Runtime replays its own graphs (``cuda_graphs = "session"``: its CUDA-graph provider option with I/O binding).
The text encoders and the VAE run once per image and stay eager (a capture would cost more than it saves and
hold a memory pool per shape). A capture that fails falls back to eager with one warning.

Host work per step: apart from ONNX Runtime's (below), nothing in the loop waits for the device. The denoiser's
timesteps go to ``device`` once per request (a host-to-device copy per step would wait for the GPU); the
scheduler's tables stay on the CPU as diffusers keeps them, so its arithmetic reads host scalars. Ancestral
samplers (euler_a, lcm) draw their step noise from CPU generators and diffusers moves it to the device inside
each step, a copy that waits for the GPU: on CUDA (``draw_ahead``) the same draws are made once before the loop
and handed to the scheduler on the device (``pladis.runtime.noise``), bitwise the same numbers. The CFG batch is
written into one buffer per request, and its denoiser outputs are read in place (the split and the guidance read
them once, before the next call) rather than copied first. ONNX Runtime on CUDA runs on its own stream, so
torch's queued work is waited for before each of its runs (and ONNX Runtime waits for its own at the end of one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pladis import backends as registry
from pladis.errors import SettingError
from pladis.families import Denoising
from pladis.families import get as family_record
from pladis.manifest import Engine, EngineError, open_engine
from pladis.runtime import backends, graphs
from pladis.runtime import noise as step_noise
from pladis.runtime.request import SCHEDULERS, Request, Settings, check

__all__ = ["SCHEDULERS", "Request", "Result", "Runtime", "Settings", "step_generators"]

log = logging.getLogger(__name__)
OnStep = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step index, timestep, latents) after each step


def check_device(device: str) -> str:
    """``device`` when this PyTorch can run the runtime on it (cpu, or cuda with a GPU), else SettingError."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise SettingError("device", f"device {device!r} is not a device name; use cpu or cuda") from None
    if kind not in ("cpu", "cuda"):
        raise SettingError("device", f"device {device!r} is not supported: the runtime runs on cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SettingError("device", f"device {device!r}: this PyTorch ({torch.__version__}) sees no CUDA GPU; use "
                                     "device cpu, or a CUDA build of torch on a machine with a GPU")  # fmt: skip
    return device


@dataclass
class Result:
    images: list  # PIL images
    latents: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        t = self.timings
        return (f"encode {t['encode'] * 1000:.0f} ms | {t['steps']} steps {t['per_step'] * 1000:.0f} ms/step | "
                f"decode {t['decode'] * 1000:.0f} ms | total {t['total']:.2f} s")  # fmt: skip


def step_generators(s: Settings) -> list[torch.Generator]:
    """The scheduler's own noise (ancestral samplers): one generator per image, seeded from its seed."""
    return [torch.Generator().manual_seed(seed + 1) for seed in s.seeds]


class Runtime:
    """An engine folder with a backend per component (``backend`` for all, ``overrides`` per name)."""

    def __init__(self, engine: str | Path | Engine, backend: str | None = None,
                 overrides: dict[str, str] | None = None, device: str = "cpu", verify: bool = True,
                 loras=None, cuda_graphs: bool | graphs.GraphCache = False,
                 graph_cache_size: int = graphs.DEFAULT_SIZE):  # fmt: skip
        """backend None: each component as built (``engine.json``), or ``ort`` for an export folder.
        ``loras``: LoRAs swapped into the built engine (``set_loras``), e.g. ``[("style.safetensors", 0.8)]``;
        None: those ``pladis lora`` attached to the folder (``loras.json``), if any. cuda_graphs: replay the
        denoiser from CUDA graphs (True: CUDA devices only, at most ``graph_cache_size`` graphs held); a
        ``GraphCache`` of your own is used as given, on any device (its capture function decides).
        ``draw_ahead`` (an attribute, True on CUDA devices): ancestral samplers' step noise drawn before the loop
        (``pladis.runtime.noise``); on the CPU there is no copy to save, and the draws are the same either way."""
        check_device(device)  # before any file is read
        self.graphs = _graph_cache(cuda_graphs, graph_cache_size, device)
        self.engine = engine if isinstance(engine, Engine) else open_engine(engine, verify=verify)
        self.engine.check_complete()
        overrides = overrides or {}
        names = self.engine.component_names()
        unknown = set(overrides) - set(names)
        if unknown:
            raise EngineError(f"no component {', '.join(sorted(unknown))} in this engine; it has "
                              f"{', '.join(names)}")  # fmt: skip
        for name in [backend, *overrides.values()]:
            if name is not None:
                registry.get(name)  # EngineError naming the known backends

        def default(name):
            artifact = self.engine.artifact(name)
            return backend or (artifact.kind if artifact else "ort")

        self.backend_names = {n: overrides.get(n, default(n)) for n in names}
        for name, b in self.backend_names.items():  # before any work: aoti/trt need their built artifacts
            backends.check(self.engine, name, b)
        self.device = device
        self.draw_ahead = torch.device(device).type == "cuda"  # ancestral step noise drawn before the loop
        self._backends: dict[str, backends.Backend] = {}
        self._warm: set = set()  # (component, input shapes) already run once
        self._tokenizers: dict = {}
        self.input_names = {i.name for i in self.engine.component(self.engine.denoiser).inputs}
        self.family = family_record(self.engine.family)  # the engine's family record, looked up once
        vae = self.engine.manifest.vae  # what the family's hooks may read of this engine
        self.denoising = Denoising(self.encode_text, frozenset(self.input_names), vae.scale_factor,
                                   vae.latent_channels, vae.scaling_factor, vae.shift_factor,
                                   self.engine.manifest.model.get("pipeline_class", ""), self.chat)  # fmt: skip
        self.scheduler_config = _scheduler_config(self.engine.folder)  # read once: the folder may move later
        self.loras: tuple = ()  # the LoRAs swapped in now (pladis.lora.Lora, in order)
        self._adapters = None  # pladis.runtime.lora.Adapters, made on the first swap
        self._adapters_made = threading.Lock()  # the server checks requests in threads beside its worker
        self._lora_weights: dict[str, dict] = {}  # component -> module path -> fused weight
        self.eager_loras: tuple = ()  # torch backends: LoRAs fused into the eager model by diffusers (parity)
        if loras is None:
            from pladis.runtime.lora import read_attached

            loras = read_attached(self.engine.folder)
        if loras:
            self.set_loras(loras)

    # -- LoRAs -------------------------------------------------------------------------------------

    def set_loras(self, loras) -> None:
        """Swap ``loras`` in (``FILE[:SCALE]`` strings, ``(FILE, SCALE)`` pairs or ``Lora``s; empty: none), in
        place of the ones in now, without a re-export: every check runs before any weight changes
        (``pladis.runtime.lora``), then each component they touch gets ``W0 + Σ scale·B·A`` from its base
        weights, and each component no longer touched gets its base weights back (bitwise)."""
        loras, fused = self.lora_weights(loras)
        self.use_lora_weights(loras, fused)

    def lora_weights(self, loras) -> tuple[tuple, dict]:
        """(the checked LoRAs, their fused weights {component: {module path: tensor}}): every check, nothing
        swapped yet (the server keeps such sets in its cache)."""
        from pladis.runtime import lora

        loras = lora.parse(loras)
        fused = self.adapters().fused(loras) if loras else {}
        for comp in sorted(set(fused) | set(self._lora_weights)):  # before any weight changes
            if comp not in self.backend_names:
                raise EngineError(f"the LoRAs touch {comp}, which this engine does not have")
            backends.check_lora(self.engine, comp, self.backend_names[comp])
        return loras, fused

    def adapters(self):
        """The engine's LoRA adapters (``pladis.runtime.lora.Adapters``), made once, whichever thread asks first."""
        with self._adapters_made:
            if self._adapters is None:
                from pladis.runtime import lora

                self._adapters = lora.Adapters(self.engine)
            return self._adapters

    @property
    def lora_set(self) -> tuple[tuple, dict]:
        """(the LoRAs swapped in now, their fused weights): what ``use_lora_weights`` takes back."""
        return self.loras, self._lora_weights

    def lora_check(self, loras) -> None:
        """Every check of ``lora_weights`` on ``loras``, nothing computed or swapped (the server's 400s)."""
        from pladis.runtime import lora

        loras = lora.parse(loras)
        if loras:
            adapters = self.adapters()
            adapters.check(loras)
            for comp in sorted({c for x in loras for c, _ in adapters.layers(x)}):
                if comp not in self.backend_names:
                    raise EngineError(f"the LoRAs touch {comp}, which this engine does not have")
                backends.check_lora(self.engine, comp, self.backend_names[comp])

    def use_lora_weights(self, loras: tuple, fused: dict) -> None:
        """Swap in the fused weights ``lora_weights`` made for ``loras``; components they leave get their base
        weights back. A component whose weights are the very ones it holds now is left as it is."""
        for comp in sorted(set(fused) | set(self._lora_weights)):
            weights = fused.get(comp)
            if weights is self._lora_weights.get(comp):
                continue
            if comp in self._backends:
                self._backends[comp].set_lora_weights(weights, self._adapters.maps[comp])
                self._warm = {k for k in self._warm if k[0] != comp}  # a new session runs its first call again
                if self.graphs is not None:
                    self.graphs.drop(comp)  # captured graphs replay the old weights' memory
        self._lora_weights = fused
        self.loras = loras

    # -- components ----------------------------------------------------------------------------

    def backend(self, component: str) -> backends.Backend:
        """The loaded backend of ``component`` (created and loaded on first use)."""
        if component not in self._backends:
            b = backends.create(self.engine, component, self.backend_names[component], self.device)
            if self.eager_loras and hasattr(b, "eager_loras"):
                b.eager_loras = self.eager_loras
            if self.graphs is not None and component == self.engine.denoiser:
                _graph_mode(b)  # warns once when this backend cannot replay graphs
                if getattr(b, "cuda_graphs", None) == "session":
                    b.use_cuda_graphs(self.graphs.size)
            if component in self._lora_weights:
                b.set_lora_weights(self._lora_weights[component], self._adapters.maps[component])
            else:
                b.load()
            self._backends[component] = b
        return self._backends[component]

    def load(self) -> None:
        """Create every component's session (engine) and load the tokenizers and the scheduler's library now,
        rather than on the first call (so the first ``generate``'s encode time is the encoding's)."""
        for name in self.backend_names:
            self.backend(name)
        for name in self.engine.component_names():
            if name.startswith("text_encoder"):
                self.tokenizer(name)
        self.scheduler()  # imports diffusers (and its schedulers) once

    def warm_up(self, component: str, inputs: dict[str, torch.Tensor]) -> None:
        """Run ``component`` once on ``inputs`` (output discarded) unless it already ran on these shapes."""
        key = (component, tuple((n, tuple(t.shape)) for n, t in sorted(inputs.items())))
        if key not in self._warm:
            self.backend(component).warm_up(inputs)
            self._warm.add(key)

    def run(self, component: str, inputs: dict[str, torch.Tensor], owned: bool = True) -> dict[str, torch.Tensor]:
        """``component``'s outputs as float32 tensors on the runtime's device, owned by the caller; ``owned``
        False: they may be the backend's or the graph's own buffers (no copy), overwritten by its next call."""
        b = self.backend(component)
        if self.graphs is not None and component == self.engine.denoiser and _graph_mode(b) == "capture":
            inputs = {n: t.to(b.device) for n, t in inputs.items()}  # a graph reads device memory only
            outs = self.graphs.run(component, b.run, inputs)  # the graph's static outputs: copied below if owned
            return {k: v.to(self.device, torch.float32, copy=owned) for k, v in outs.items()}
        copy = owned and b.reuses_outputs
        return {k: v.to(self.device, torch.float32, copy=copy) for k, v in b.run(inputs).items()}

    def tokenizer(self, encoder: str):
        name = encoder.replace("text_encoder", "tokenizer")
        if name not in self._tokenizers:
            from transformers import AutoTokenizer

            folder = self.engine.folder / name
            if not folder.is_dir():
                raise EngineError(f"{self.engine.folder} is missing the folder {name}/ ({encoder}'s tokenizer); "
                                  "re-export into a new folder")  # fmt: skip
            try:  # the folder's own files only: never the model hub
                self._tokenizers[name] = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            except (OSError, ValueError) as err:
                raise EngineError(f"cannot load the tokenizer in {folder} ({err}); re-export into a new folder") \
                    from None  # fmt: skip
        return self._tokenizers[name]

    def chat(self, encoder: str, conversation: list[dict], **template) -> str:
        """``conversation`` rendered by ``encoder``'s tokenizer's own chat template (the family hooks' chat side)."""
        tok = self.tokenizer(encoder)
        if not getattr(tok, "chat_template", None):
            raise EngineError(f"the tokenizer in {self.engine.folder / encoder.replace('text_encoder', 'tokenizer')} "
                              "has no chat template, which this model's prompts need; re-export from a model whose "
                              "tokenizer has one")  # fmt: skip
        return tok.apply_chat_template(conversation, tokenize=False, **template)

    def encode_text(self, encoder: str, prompts: list[str], special_tokens: bool = True) -> dict[str, torch.Tensor]:
        """``encoder``'s outputs for ``prompts`` tokenized to the engine's text length (the text side of the family
        hooks; ``special_tokens`` False: the tokenizer adds none); an encoder that takes an ``attention_mask`` (T5)
        also returns the mask it was given."""
        ports = {i.name: i for i in self.engine.component(encoder).inputs}
        length = self.engine.dim(ports["input_ids"].shape[1])[1]
        tok = self.tokenizer(encoder)
        enc = tok(prompts, padding="max_length", max_length=length, truncation=True,
                  add_special_tokens=special_tokens, return_tensors="pt")  # fmt: skip
        over = tok(prompts, max_length=length + 1, truncation=True, add_special_tokens=special_tokens)["input_ids"]
        for text, ids in zip(prompts, over, strict=True):
            if len(ids) > length:  # said, as the diffusers pipelines do: the encoder reads the first tokens only
                shown = text if len(text) <= 40 else text[:37] + "..."
                log.warning("the prompt %r is longer than the %d tokens %s reads: the rest is dropped (shorten it)",
                            shown, length, encoder)  # fmt: skip
        if "attention_mask" not in ports:
            return self.run(encoder, {"input_ids": enc.input_ids})
        out = self.run(encoder, {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})
        return {**out, "attention_mask": enc.attention_mask}

    def scheduler(self, name: str | None = None):
        """A fresh diffusers scheduler from the engine's saved config (``name`` None: that same class)."""
        import diffusers

        config = self.scheduler_config
        cls = getattr(diffusers, SCHEDULERS[name] if name else config["_class_name"])
        return cls.from_config(config)

    # -- checks ----------------------------------------------------------------------------------

    def settings(self, request: Request | str | list[str] | None = None, /, **fields) -> Settings:
        """``request`` (or a prompt and ``Request`` keywords) checked against the engine, defaults filled in;
        ``SettingError`` naming the field otherwise (the steps too: the scheduler's timesteps are set once, on
        the CPU, to see that they are valid). No component runs."""
        if isinstance(request, Request):
            if fields:
                raise TypeError(f"pass a Request or keyword settings, not both (got {', '.join(fields)})")
        else:
            request = Request(**fields) if request is None else Request(request, **fields)
        s = check(request, self.engine)
        self.timestep_scheduler(s)
        return s

    def timestep_scheduler(self, s: Settings):
        """A fresh scheduler of ``s`` with its timesteps set for ``s``; SettingError naming steps when that step
        count gives no valid timesteps (before any encoding)."""
        sched = self.scheduler(s.scheduler)
        with np.errstate(invalid="ignore", divide="ignore"):  # a 0/0 here is the SettingError below
            self.family.timesteps(self.denoising, sched, s.steps, s.height, s.width)
        if not torch.isfinite(torch.as_tensor(sched.timesteps, dtype=torch.float64)).all():
            terminal = sched.config.get("shift_terminal")
            why = " (its shift_terminal stretch divides by zero at one step)" if terminal else ""
            raise SettingError("steps", f"{s.steps} step(s) give this engine's {type(sched).__name__} no valid "
                                        f"timesteps{why}; use more steps")  # fmt: skip
        return sched

    # -- the loop, in pieces ------------------------------------------------------------------------

    def prepare(self, s: Settings) -> tuple[dict, object, torch.Tensor]:
        """(constant denoiser inputs, scheduler with timesteps set, initial latents (packed for FLUX))."""
        sched = self.timestep_scheduler(s)  # before any encoding
        cond = self.family.encode(self.denoising, s.prompts, s.negatives, s.height, s.width, s.guidance)
        if s.lam is not None:  # both CFG halves of a sample get that sample's lam: [uncond..., cond...]
            name = self.engine.manifest.pladis.lam_input
            cond[name] = torch.tensor(s.lam * (2 if s.negatives is not None else 1), dtype=torch.float32)
        cond = {k: v.to(self.device) for k, v in cond.items()}  # once: constant over the steps
        shape = self.family.latent_shape(self.denoising, 1, s.height, s.width)
        # drawn on the CPU, one generator per image: the same noise on every device
        noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in s.seeds])
        noise = noise.to(self.device)
        return cond, sched, self.family.pack(noise) * getattr(sched, "init_noise_sigma", 1.0)  # flow: none

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: dict, sched, s: Settings,
                t_device: torch.Tensor | None = None, batch: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The guided noise prediction for ``latents`` (B, ...) at timestep ``t`` (the scheduler's, on its CPU
        table); ``t_device``: the same timestep already on the runtime's device (None: moved here); ``batch``:
        with CFG, a (2B, ...) buffer of the latents' dtype the doubled batch is written into (``cfg_batch``; None:
        a new one). The buffer is overwritten by the next call: every backend has read it by then (the work is
        queued in order on one stream, or done when ``run`` returns)."""
        use_cfg = s.negatives is not None
        if not use_cfg:
            x = latents
        elif batch is None:
            x = torch.cat([latents] * 2)
        else:
            x = torch.cat([latents, latents], out=batch)
        if hasattr(sched, "scale_model_input"):  # flow-matching schedulers have no input scaling
            x = sched.scale_model_input(x, t)
        t_device = t.to(self.device) if t_device is None else t_device
        # with CFG the outputs are read once, by the split and the guidance, into a new tensor before the next
        # call: no copy of them first. Without, the prediction goes to the scheduler, which may keep it (a
        # multistep scheduler keeps its model outputs between steps): owned by the caller.
        out = self.run(self.engine.denoiser, self.family.step_inputs(x, t_device, cond), owned=not use_cfg)
        noise = self.family.noise_prediction(self.denoising, next(iter(out.values())))
        if not use_cfg:
            return noise
        uncond, text = noise.chunk(2)
        guided = self.family.guide(uncond, text, s.guidance)
        if s.guidance_rescale > 0:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

            guided = rescale_noise_cfg(guided, text, guidance_rescale=s.guidance_rescale)
        return guided

    def cfg_batch(self, latents: torch.Tensor, s: Settings) -> torch.Tensor | None:
        """With CFG: an empty (2B, ...) buffer for ``predict``'s doubled batch, one per request; else None."""
        if s.negatives is None:
            return None
        return torch.empty((2 * latents.shape[0], *latents.shape[1:]), dtype=latents.dtype, device=latents.device)

    def decode(self, latents: torch.Tensor, s: Settings) -> list:
        from PIL import Image

        x = self.family.decoder_input(self.denoising, latents, s.height, s.width)
        images = self.run("vae_decoder", {"latent_sample": x})["sample"]
        arr = ((images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(a) for a in arr]

    def generate(self, request: Request | str | list[str] | None = None, /, *, on_step: OnStep | None = None,
                 progress: bool | None = None, **fields) -> Result:  # fmt: skip
        """Sample images for ``request`` (a ``Request``, or a prompt and ``Request`` keywords: ``steps=``,
        ``seed=``, ``lam=`` ...). ``on_step(i, t, latents)`` runs after each denoising step ``i`` (timestep
        ``t``; latents in the denoiser's layout); an exception it raises stops the run and propagates.
        ``progress``: a progress bar on stderr (None: when this module's INFO log lines show, as in the CLI)."""
        s = self.settings(request, **fields)
        t_load = time.perf_counter()
        self.load()
        loading = time.perf_counter() - t_load
        t0 = time.perf_counter()
        cond, sched, latents = self.prepare(s)
        t_warm = time.perf_counter()
        self.warm_loop(latents, cond, sched, s)
        loading += time.perf_counter() - t_warm
        t1 = time.perf_counter()
        g = step_generators(s)
        bar = log.isEnabledFor(logging.INFO) if progress is None else progress
        on_device = sched.timesteps.to(self.device)  # once: a copy per step would wait for the GPU
        ahead = step_noise.for_loop(sched, g, latents, self.device) if self.draw_ahead else None
        batch = self.cfg_batch(latents, s)
        for i, t in enumerate(tqdm(sched.timesteps, desc="denoise", unit="step", disable=not bar)):
            noise = self.predict(latents, t, cond, sched, s, on_device[i], batch)
            with ahead.step() if ahead is not None else contextlib.nullcontext():
                latents = sched.step(noise, t, latents, generator=g).prev_sample
            if on_step is not None:
                on_step(i, t, latents)
        t2 = time.perf_counter()
        images = self.decode(latents, s)
        t3 = time.perf_counter()
        n = len(sched.timesteps)
        return Result(images, latents, {"encode": t_warm - t0, "steps": n, "per_step": (t2 - t1) / n,
                                        "decode": t3 - t2, "total": t3 - t1 + t_warm - t0,
                                        "load": loading})  # fmt: skip

    def warm_loop(self, latents: torch.Tensor, cond: dict, sched, s: Settings) -> None:
        """Warm the denoiser and the VAE decoder up on this call's shapes (a no-op for shapes already run)."""
        x = torch.cat([latents] * 2) if s.negatives is not None else latents
        inputs = self.family.step_inputs(x, sched.timesteps[0].to(self.device), cond)
        self.warm_up(self.engine.denoiser, inputs)
        self.warm_graph(inputs)
        decoder_input = self.family.decoder_input(self.denoising, latents, s.height, s.width)
        self.warm_up("vae_decoder", {"latent_sample": decoder_input})

    def warm_graph(self, inputs: dict[str, torch.Tensor]) -> None:
        """With CUDA graphs: run the denoiser on ``inputs`` until its graph for these shapes is captured (or its
        capture failed), so no capture happens inside the timed steps; the backend's own warm-up runs before."""
        if self.graphs is None:
            return
        b = self.backend(self.engine.denoiser)
        mode = _graph_mode(b)
        if mode == "capture":
            for _ in range(self.graphs.warmup + 1):
                on_device = {n: t.to(b.device) for n, t in inputs.items()}
                if self.graphs.settled(self.engine.denoiser, on_device):
                    break
                self.run(self.engine.denoiser, inputs)
        elif mode == "session":
            b.warm_graph(inputs)


_REFUSED: set = set()  # backend classes already warned about (one warning per process)


def _graph_cache(cuda_graphs, size: int, device: str) -> graphs.GraphCache | None:
    """The runtime's graph cache: None (off), the one given, or a new one with the CUDA capture (CUDA only)."""
    if isinstance(cuda_graphs, graphs.GraphCache):
        return cuda_graphs
    if not cuda_graphs:
        return None
    if torch.device(device).type != "cuda":
        raise SettingError("cuda_graphs", f"CUDA graphs need a CUDA device (device is {device!r}): run with "
                                          "--device cuda, or drop --cuda-graphs")  # fmt: skip
    return graphs.GraphCache(graphs.cuda_capture, size)


def _graph_mode(backend) -> str | None:
    """How ``backend`` replays CUDA graphs: "capture" (the runtime captures its ``run``), "session" (it
    replays its own), or None (it cannot: it runs eagerly, with one warning per backend class)."""
    mode = getattr(backend, "cuda_graphs", None)
    if mode not in ("capture", "session") and type(backend) not in _REFUSED:
        _REFUSED.add(type(backend))
        log.warning("the %s backend cannot replay CUDA graphs; its denoiser runs eagerly",
                    getattr(backend, "name", type(backend).__name__))  # fmt: skip
    return mode if mode in ("capture", "session") else None


def _scheduler_config(folder: Path) -> dict:
    path = folder / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(path.read_text())
        _ = config["_class_name"]
        return config
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EngineError(f"cannot read the scheduler config {path} ({type(err).__name__}: {err}); re-export into "
                          "a new folder") from None  # fmt: skip
