"""DreamSteerer's steps that need the model itself, on a private copy of the base model with the
request's adapter applied: the subject mask (attention maps), the spatial-feature-guided samples
(UNet features of the source injected while sampling) and the steering (gradients to a copy of the
adapter's trainable set). The serving UNet (the adapter bank, batched across requests) is never
touched: a workbench belongs to one worker thread (in-process) or one Triton `edit` instance.

    bench = Workbench(FrozenBase.from_pretrained(model_dir))
    result = bench.execute(call, adapter)      # SubjectMask / GuidedSamples / Steer
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor
from torch import nn

from service.adapters import Adapter, LoraModule
from service.adapters.bank import replace_linears
from service.engine.pipeline import GenerationCancelled, classifier_free_guidance, flush_denormals
from service.personalize.attention_maps import _Recording
from service.personalize.common import FrozenBase, adamw
from service.personalize.lora import LoRALinear
from service.personalize.spec import CUSTOM_DIFFUSION, DREAMBOOTH_LORA, TEXTUAL_INVERSION

from .spec import EditRefused, GuidedSamples, Steer, SubjectMask

# Steering learning rates (Adam), per adapter method: about a third to a tenth of each method's
# training rate (docs/personalize/*.md), since steering nudges a trained adapter for a few steps.
STEER_LR = {DREAMBOOTH_LORA: 1e-3, TEXTUAL_INVERSION: 5e-3, CUSTOM_DIFFUSION: 1e-3}
DEFAULT_STEER_LR = 1e-3
# Subject mask: attention read at these (low) noise levels, as service.personalize.attention_maps.
MASK_TIMESTEPS = (50, 150, 300)
# Plug-and-play feature injection (Tumanyan et al., CVPR 2023), mapped onto a diffusers UNet: the
# decoder's second-level ResNet output for the first 80% of the steps, the self-attention queries
# and keys of the decoder's later attention layers for the first 50%.
PNP_FEATURE_FRACTION = 0.8
PNP_ATTENTION_FRACTION = 0.5


@dataclass
class Applied:
    """The adapter on the workbench's model: LoRA layers (trainable or not) and token vectors."""

    layers: dict[str, LoRALinear]
    modules: dict[str, LoraModule]  # the adapter's own modules (alpha, rslora), by layer name
    tokens: dict[str, nn.Parameter]

    def parameters(self) -> list[torch.Tensor]:
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)] + list(self.tokens.values())

    @contextmanager
    def off(self) -> Iterator[None]:
        """The pre-trained model: every LoRA update scaled to 0 (and no tokens: callers pass {})."""
        scales = {name: layer.scale for name, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.scale = 0.0
        try:
            yield
        finally:
            for name, layer in self.layers.items():
                layer.scale = scales[name]

    def to_adapter(self) -> Adapter:
        """A detached copy in the adapter format (the steered adapter)."""
        lora = {name: LoraModule(down=layer.lora_A.detach().cpu().clone(), up=layer.lora_B.detach().cpu().clone(),
                                 alpha=self.modules[name].alpha, use_rslora=self.modules[name].use_rslora)
                for name, layer in self.layers.items()}
        return Adapter(lora=lora, token_embeddings={t: v.detach().cpu().clone() for t, v in self.tokens.items()})


class Workbench:
    def __init__(self, base: FrozenBase):
        self.base = base

    # -- dispatch ---------------------------------------------------------------------------------

    def execute(self, call, adapter: Adapter, should_stop=lambda: False, progress=None):
        """Runs one call with `adapter` applied; `should_stop` is checked between steps (raises
        GenerationCancelled), `progress(phase, step, total)` hears about each step."""
        flush_denormals()
        report = progress or (lambda phase, step, total: None)
        with self.base.lock, self.applied(adapter, trainable=isinstance(call, Steer)) as applied:
            if isinstance(call, SubjectMask):
                return self.subject_mask(call, applied)
            if isinstance(call, GuidedSamples):
                return self.guided_samples(call, applied, should_stop, report)
            if isinstance(call, Steer):
                return self.steer(call, applied, should_stop, report)
        raise TypeError(f"not a workbench call: {type(call).__name__}")

    # -- the adapter on the private model ---------------------------------------------------------

    @contextmanager
    def applied(self, adapter: Adapter, trainable: bool = False) -> Iterator[Applied]:
        """`adapter`'s LoRA wrapped around the private model's layers (restored on exit) and its
        token vectors, as fp32 parameters (a copy: the adapter itself is never written)."""
        engine = self.base.engine
        layers: dict[str, LoRALinear] = {}
        g = torch.Generator().manual_seed(0)  # unused: A and B are overwritten with the adapter's
        roots = {"unet": engine.unet, "text_encoder": engine.text_encoder}
        try:
            for name, module in adapter.lora.items():
                root_name, path = _local_name(name, roots)
                made = replace_linears(roots[root_name], root_name, (path,),
                                       lambda linear: LoRALinear(linear, module.rank, module.alpha, g))
                if not made:
                    raise EditRefused(f"adapter layer {name!r} is not in the model")
                layer = layers[name] = next(iter(made.values()))  # registered first: restored whatever happens
                with torch.no_grad():
                    layer.lora_A.copy_(module.down.float())
                    layer.lora_B.copy_(module.up.float())
                layer.scale = module.scale
                layer.lora_A.requires_grad_(trainable)
                layer.lora_B.requires_grad_(trainable)
            tokens = {t: nn.Parameter(v.detach().float().clone().to(engine.device), requires_grad=trainable)
                      for t, v in adapter.token_embeddings.items()}
            yield Applied(layers, dict(adapter.lora), tokens)
        finally:
            self._restore(layers, roots)

    @staticmethod
    def _restore(layers: dict[str, LoRALinear], roots) -> None:
        for name in layers:
            root_name, path = _local_name(name, roots)
            parent_name, _, child = path.rpartition(".")
            parent = roots[root_name].get_submodule(parent_name) if parent_name else roots[root_name]
            setattr(parent, child, getattr(parent, child).base)

    def embed(self, prompts: Sequence[str], tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.base.prompt_encoder.embed(list(prompts), [tokens] * len(prompts)).to(self.base.engine.dtype)

    def epsilon(self, prediction: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The noise a prediction implies: itself for epsilon models, from the velocity for
        v-prediction ones (SD 2.x 768): eps = sqrt(abar) v + sqrt(1 - abar) x_t."""
        if self.base.schedule.prediction_type != "v_prediction":
            return prediction
        alpha = self.base.schedule.scheduler.alphas_cumprod[int(t)].to(x_t)
        return alpha.sqrt() * prediction + (1 - alpha).sqrt() * x_t

    def unet(self, latents, t, embeds) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.base.engine.device).reshape(-1).expand(latents.shape[0])
        return self.base.unet(latents.to(self.base.engine.dtype), t, encoder_hidden_states=embeds).sample

    # -- 1. subject mask ----------------------------------------------------------------------------

    @torch.no_grad()
    def subject_mask(self, call: SubjectMask, applied: Applied) -> torch.Tensor:
        """[h, w] binary mask: the concept words' cross-attention on the noised source, averaged
        over heads, layers and a few low timesteps (Prompt-to-Prompt's local blend: layer maps
        normalised, a 3x3 max-pool, scaled to [0, 1], threshold)."""
        latent = call.latent
        h, w = latent.shape[-2:]
        embeds = self.embed([call.prompt], applied.tokens)
        positions = word_positions(self.base.prompt_encoder, call.prompt, call.words, applied.tokens)
        if not positions:
            raise EditRefused(f"none of the concept's words {list(call.words)} occurs in the target prompt {call.prompt!r}")
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0)).to(latent)
        unet = self.base.unet
        saved = unet.attn_processors
        store: list[torch.Tensor] = []
        unet.set_attn_processor({n: _Recording(store) if ".attn2." in n else p for n, p in saved.items()})
        total = torch.zeros(h, w)
        try:
            for t in MASK_TIMESTEPS:
                store.clear()
                tt = torch.tensor([t])
                self.unet(self.base.schedule.scheduler.add_noise(latent.cpu(), noise.cpu(), tt).to(latent), tt, embeds)
                for probs in store:
                    lh, lw = _layer_grid(h, w, probs.shape[1])
                    layer = probs.float().mean(0).reshape(lh, lw, -1)[..., positions].mean(-1).cpu()
                    layer = F.interpolate(layer[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
                    total += layer / layer.max().clamp(min=1e-8)
        finally:
            unet.set_attn_processor(saved)
        total = F.max_pool2d(total[None, None], 3, stride=1, padding=1)[0, 0]
        # Scaled to [0, 1] between its own minimum and maximum: every position attends a little to
        # every word, and on our model that floor was about 0.6 of the maximum (measured).
        total = (total - total.min()) / (total.max() - total.min()).clamp(min=1e-8)
        return (total >= call.threshold).float()

    # -- 2. spatial-feature-guided samples ---------------------------------------------------------

    @torch.no_grad()
    def guided_samples(self, call: GuidedSamples, applied: Applied, should_stop=lambda: False,
                       report=lambda phase, step, total: None) -> torch.Tensor:
        """Invert the source with DDIM (pre-trained model, source prompt), then sample `n` images
        of the prompt with the personalized model from the inverted noise while the source
        trajectory's decoder features are injected (plug-and-play); [n, C, h, w] latents."""
        engine = self.base.engine
        scheduler = engine.facts.new_scheduler(call.steps, engine.device)
        timesteps = scheduler.timesteps  # descending
        alphas = scheduler.alphas_cumprod.to(engine.device)

        # DDIM inversion: x_t from x_{t-1} with the noise predicted at x_{t-1}.
        with applied.off():
            source_embeds = self.embed([call.source_prompt], {})
        trajectory: dict[int, torch.Tensor] = {}
        x = call.latent.to(engine.device, engine.dtype)
        alpha_prev = torch.tensor(1.0, device=engine.device)
        t_prev = int(timesteps[-1])
        with applied.off():
            for t in reversed(timesteps.tolist()):
                eps = self.epsilon(self.unet(x, t_prev, source_embeds), x, t_prev)
                x0 = (x - (1 - alpha_prev).sqrt() * eps) / alpha_prev.sqrt()
                x = alphas[t].sqrt() * x0 + (1 - alphas[t]).sqrt() * eps
                trajectory[t] = x
                alpha_prev, t_prev = alphas[t], t

        # Sampling with injection: row 0 the source trajectory (its features are recorded), then
        # n unconditional and n conditional rows of the samples (features replaced by row 0's). All
        # rows are one UNet call, so row 0 runs through the personalized model too: the injected
        # features are those of the model the samples are drawn with (the inversion above used the
        # pre-trained one, whose score of the source is unbiased).
        n = call.n
        g = torch.Generator().manual_seed(int(call.seed))
        x_T = trajectory[int(timesteps[0])]
        starts = [x_T[0]]
        for _ in range(n - 1):  # further samples: the inverted noise partly renewed
            fresh = torch.randn(x_T.shape[1:], generator=g).to(x_T)
            starts.append(math.sqrt(0.75) * x_T[0] + math.sqrt(0.25) * fresh)
        latents = torch.stack(starts)
        prompt_embeds = self.embed(["", call.prompt], applied.tokens)
        with applied.off():
            source_row = self.embed([call.source_prompt], {})
        embeds = torch.cat([source_row, prompt_embeds[:1].expand(n, -1, -1), prompt_embeds[1:].expand(n, -1, -1)])
        with _FeatureInjection(self.base.unet) as inject:
            for i, t in enumerate(timesteps.tolist()):
                if should_stop():
                    raise GenerationCancelled(f"stopped at guided-sampling step {i + 1} of {len(timesteps)}")
                inject.features = i < PNP_FEATURE_FRACTION * len(timesteps)
                inject.attention = i < PNP_ATTENTION_FRACTION * len(timesteps)
                rows = torch.cat([trajectory[t], latents, latents])
                noise = self.unet(rows, t, embeds)
                guided = classifier_free_guidance(noise[1 : 1 + n], noise[1 + n :], call.guidance_scale)
                latents = scheduler.step(guided, t, latents).prev_sample
                report("guided", i + 1, len(timesteps))
        return latents.float()

    # -- 3. steering: EDSD + mode shifting -----------------------------------------------------------

    def steer(self, call: Steer, applied: Applied, should_stop=lambda: False, report=lambda phase, step, total: None):
        """Tunes the applied copy for `steer_steps` steps; returns (steered Adapter, losses).

        EDSD, per step, with one t and one noise for the source and the slightly edited image x~:
            delta = eps_phi(x~_t, target) - eps_pre(x_src_t, source)        (pre-trained: frozen)
            L_edsd = 1/2 |delta|^2 + eta_eff sqrt(abar_t) <sg(delta), eps_phi(x_src_t, target)>
        The first term pulls the personalized prediction on the edit toward the pre-trained score of
        the source; the second is the path through the edit x~(phi) = x_src - eta DDS(phi) with the
        UNet Jacobian d eps / d x replaced by -I (the sign that adapts to the source's layout;
        +I destroys it). eta_eff = DDS step x preliminary iterations (how far x~ moved).
        Mode shifting: weight * the ordinary denoising loss of the guided samples with the target
        prompt, under the model's own training weights.
        """
        o = call.options
        engine = self.base.engine
        schedule = self.base.schedule
        params = applied.parameters()
        if not params:
            raise EditRefused("the adapter has no LoRA or token tensors to steer")
        lr = o.steer_learning_rate or STEER_LR.get(call.adapter_method, DEFAULT_STEER_LR)
        optimizer = adamw(params, lr)
        g = torch.Generator().manual_seed(int(call.seed) + 17)
        with applied.off():
            source_embeds = self.embed([call.source_prompt], {}).detach()
        eta = o.learning_rate * max(1, o.preliminary_iterations)
        z_src = call.source.to(engine.device)
        losses = []
        for step in range(o.steer_steps):
            if should_stop():
                raise GenerationCancelled(f"stopped before steering step {step + 1} of {o.steer_steps}")
            t = torch.randint(o.t_min, o.t_max, (1,), generator=g)
            eps = torch.randn(z_src.shape, generator=g).to(z_src)
            target_embeds = self.embed([call.target_prompt], applied.tokens)
            loss = torch.zeros((), device=engine.device)
            record: dict[str, float] = {}
            if call.edited is not None:
                noisy_src = schedule.scheduler.add_noise(z_src.cpu(), eps.cpu(), t).to(z_src)
                noisy_edit = schedule.scheduler.add_noise(call.edited.cpu(), eps.cpu(), t).to(z_src)
                with torch.no_grad(), applied.off():
                    eps_pre = self.epsilon(self.unet(noisy_src, t, source_embeds), noisy_src, t)
                rows = torch.cat([noisy_edit, noisy_src])
                pred = self.epsilon(self.unet(rows, t, target_embeds.expand(2, -1, -1)), rows, t)
                delta = pred[:1] - eps_pre
                alpha = schedule.scheduler.alphas_cumprod[t].to(z_src)
                edsd = 0.5 * delta.pow(2).mean() + eta * alpha.sqrt() * (delta.detach() * pred[1:]).mean()
                loss = loss + edsd
                record["edsd"] = float(0.5 * delta.detach().pow(2).mean())
            if call.guided is not None:
                guided = call.guided.to(engine.device)
                noisy, tg, target = schedule.noise(guided, g)
                pred = self.unet(noisy, tg, target_embeds.expand(guided.shape[0], -1, -1))
                shift = (F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                         * schedule.weight(tg)).mean()
                loss = loss + o.mode_shifting_weight * shift
                record["mode_shifting"] = float(shift.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(record)
            report("steer", step + 1, o.steer_steps)
        return applied.to_adapter(), losses


    @torch.no_grad()
    def edsd_objective(self, call: Steer, adapter: Adapter, samples: int = 8) -> float:
        """The EDSD distance 1/2 |eps_phi(x~_t, target) - eps_pre(x_src_t, source)|^2 of `adapter`,
        averaged over a fixed set of (t, noise): what steering lowers (tests, benchmarks)."""
        o = call.options
        g = torch.Generator().manual_seed(1234)
        scheduler = self.base.schedule.scheduler
        with self.base.lock, self.applied(adapter) as applied:
            with applied.off():
                source_embeds = self.embed([call.source_prompt], {})
            target_embeds = self.embed([call.target_prompt], applied.tokens)
            total = 0.0
            for _ in range(samples):
                t = torch.randint(o.t_min, o.t_max, (1,), generator=g)
                eps = torch.randn(call.source.shape, generator=g)
                noisy_src = scheduler.add_noise(call.source.cpu(), eps, t)
                noisy_edit = scheduler.add_noise(call.edited.cpu(), eps, t)
                with applied.off():
                    eps_pre = self.epsilon(self.unet(noisy_src, t, source_embeds), noisy_src, t)
                pred = self.epsilon(self.unet(noisy_edit, t, target_embeds), noisy_edit, t)
                total += float(0.5 * (pred - eps_pre).pow(2).mean())
        return total / samples


# -- helpers ----------------------------------------------------------------------------------------


def _local_name(name: str, roots) -> tuple[str, str]:
    """(component, module path inside it) of an adapter layer name; text-encoder names with or
    without transformers 4's `text_model.` level both resolve (as the adapter bank does)."""
    component, _, path = name.partition(".")
    if component == "text_encoder":
        modules = dict(roots["text_encoder"].named_modules())
        for alias in (path, path.removeprefix("text_model."), "text_model." + path):
            if alias in modules:
                return component, alias
    return component, path


def _layer_grid(h: int, w: int, positions: int) -> tuple[int, int]:
    """(rows, columns) of an attention layer's query grid over an h x w latent: the UNet halves it
    (rounding up) per level, so the grid with `positions` cells is found by halving."""
    while h * w > positions:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != positions:
        raise ValueError(f"an attention layer has {positions} positions, no grid of the {h}x{w} latent")
    return h, w


def word_positions(prompt_encoder, prompt: str, words: Sequence[str], tokens: dict) -> list[int]:
    """Positions (in the encoded prompt, start token included) of `words`: a learned token's
    injected positions, or a plain word's token ids where they occur."""
    ids, mask, _ = prompt_encoder.tokenize([prompt], [tokens])
    ids, mask = ids[0].tolist(), mask[0]
    out: list[int] = []
    for word in words:
        if word in tokens:
            out += torch.nonzero(mask).reshape(-1).tolist()
            continue
        span = prompt_encoder.tokenizer(word, add_special_tokens=False).input_ids
        for k in range(len(ids) - len(span) + 1):
            if ids[k : k + len(span)] == span:
                out += range(k, k + len(span))
                break
    return sorted(set(out))


class _InjectedSelfAttention(AttnProcessor):
    """Self-attention whose queries and keys, for every row but the first, are the first row's
    (the source trajectory's) while `switch.attention` is on: the rows keep their own values, so
    they take the source's layout with their own appearance."""

    def __init__(self, switch: "_FeatureInjection"):
        super().__init__()
        self.switch = switch

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if not self.switch.attention or encoder_hidden_states is not None or hidden_states.ndim != 3:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = query[:1].expand_as(query)
        key = key[:1].expand_as(key)
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), None)
        out = attn.batch_to_head_dim(torch.bmm(probs, attn.head_to_batch_dim(value)))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class _FeatureInjection:
    """Installs plug-and-play injection on a diffusers UNet for the block: the decoder's second
    up block's last ResNet output, and self-attention q/k in the decoder's last two up blocks."""

    def __init__(self, unet):
        self.unet = unet
        self.features = False
        self.attention = False

    def __enter__(self) -> "_FeatureInjection":
        ups = self.unet.up_blocks
        level = min(1, len(ups) - 1)
        resnet = ups[level].resnets[-1]

        def replace_output(module, args, output):
            if not self.features:
                return output
            return torch.cat([output[:1], output[:1].expand(output.shape[0] - 1, *output.shape[1:])])

        self._hook = resnet.register_forward_hook(replace_output)
        self._saved = self.unet.attn_processors
        injected = tuple(f"up_blocks.{i}." for i in range(level, len(ups)))
        self.unet.set_attn_processor({
            name: _InjectedSelfAttention(self) if name.startswith(injected) and ".attn1." in name else proc
            for name, proc in self._saved.items()
        })
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()
        self.unet.set_attn_processor(self._saved)
