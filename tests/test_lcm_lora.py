"""The LCM-LoRA: its distillation (service/research/lcm/distill.py) computes what diffusers' LCM
pieces compute, trains only a LoRA on the layers the bank serves, and the shipped file is served as
an ordinary adapter: imported through the API in diffusers or kohya layout (the same modules), and
combined per row with a user's adapter in a 4-step LCM request."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import save

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service.adapters import parse_adapter
from service.adapters.bank import SERVED_UNET_TARGETS
from service.engine.default_model import default_model_dir
from service.research.lcm import distill
from tests.adapter_files import lora_file, served_model_dir
from tests.conftest import auth
from tests.test_lora_layouts import kohya_key

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def alphas(model_cache):
    return DDPMScheduler.from_config(DDIMScheduler.load_config(default_model_dir(model_cache) / "scheduler")).alphas_cumprod


def test_the_solver_step_is_diffusers_ddim_over_the_skipped_schedule(alphas):
    """DDIMSolver's step from solver timestep n to the one k below equals DDIMScheduler's (eta 0) on
    the trailing 50-step schedule, whose timesteps are the solver's (999, 979, ..., 19)."""
    solver = distill.DDIMSolver(alphas)
    ddim = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False,
                         set_alpha_to_one=False, timestep_spacing="trailing")
    assert torch.equal(ddim.alphas_cumprod, alphas)
    ddim.set_timesteps(50)
    assert sorted(ddim.timesteps.tolist()) == solver.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 8, 16, 16, generator=g), torch.randn(3, 8, 16, 16, generator=g)
    for index in (0, 1, 24, 49):
        t = solver.timesteps[index]
        ours = solver.step(distill.predicted_x0(eps, t.expand(3), x, alphas), eps, torch.tensor([index] * 3))
        theirs = ddim.step(eps, t, x).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_the_boundary_scalings_are_lcm_schedulers():
    scheduler = LCMScheduler()
    for t in (0, 19, 499, 999):
        c_skip, c_out = distill.scalings_for_boundary_conditions(torch.tensor([t]))
        want = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert c_skip.item() == pytest.approx(float(want[0]), rel=1e-5)
        assert c_out.item() == pytest.approx(float(want[1]), rel=1e-5, abs=1e-7)
    c_skip, c_out = distill.scalings_for_boundary_conditions(torch.tensor([0]))
    assert (c_skip.item(), c_out.item()) == (1.0, 0.0)  # f(x, 0) = x


def test_a_short_distillation_trains_a_lora_on_every_served_linear_and_reproduces(model_cache):
    model_dir = default_model_dir(model_cache)
    args = dict(steps=3, batch=2, lr=1e-3, rank=4, w_min=2.0, w_max=4.0, dataset_size=8, seed=1)
    losses = []
    adapter = distill.distill(model_dir, **args, log=losses.append)
    again = distill.distill(model_dir, **args, log=lambda _: None)
    assert losses and np.isfinite([json.loads(line)["loss"] for line in losses]).all()
    served = [n for n, m in UNet2DConditionModel.from_pretrained(model_dir / "unet").named_modules()
              if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) or n == t for t in SERVED_UNET_TARGETS)]
    assert sorted(adapter.lora) == sorted(f"unet.{n}" for n in served)
    assert any(m.up.abs().max() > 0 for m in adapter.lora.values())  # it trained
    for name, module in adapter.lora.items():
        assert module.rank == 4
        assert torch.equal(module.up, again.lora[name].up) and torch.equal(module.down, again.lora[name].down)


@pytest.fixture(scope="module")
def shipped() -> bytes:
    return distill.WEIGHTS.read_bytes()


def test_the_shipped_lcm_lora_is_small_and_fits_the_bank(shipped):
    adapter = parse_adapter(shipped)
    assert len(shipped) < 4_000_000 and adapter.max_rank <= 16
    assert all(name.startswith("unet.") for name in adapter.lora) and not adapter.token_embeddings


def _kohya(adapter) -> bytes:
    tensors = {}
    for name, module in adapter.lora.items():
        key = kohya_key("sd", name)
        tensors[f"{key}.lora_down.weight"] = module.down.contiguous()
        tensors[f"{key}.lora_up.weight"] = module.up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(module.alpha))
    return save(tensors)


def _pixels(resp) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(resp.images[0].data)), dtype=np.int16)


def test_served_through_the_api_in_either_layout_with_a_users_adapter(gateway, shipped):
    stub = gateway.stub()
    lcm = stub.ImportAdapter(pb.ImportAdapterRequest(name="lcm-lora", safetensors=shipped), metadata=auth())
    kohya = stub.ImportAdapter(pb.ImportAdapterRequest(name="lcm-lora-kohya", safetensors=_kohya(parse_adapter(shipped))),
                               metadata=auth())
    user = stub.ImportAdapter(pb.ImportAdapterRequest(
        name="user-lora", safetensors=lora_file(served_model_dir(gateway), seed=3, scale=3)), metadata=auth())

    def generate(*ids):
        return _pixels(stub.Generate(pb.GenerateRequest(
            prompt="a red circle on a blue background", steps=4, guidance_scale=1.0, seed=5, sampler="lcm",
            adapters=[pb.AdapterRef(adapter_id=i) for i in ids]), metadata=auth()))

    plain, with_lcm, with_kohya = generate(), generate(lcm.adapter_id), generate(kohya.adapter_id)
    both = generate(lcm.adapter_id, user.adapter_id)
    assert np.abs(with_lcm - plain).mean() > 1.0  # the LCM-LoRA changes the 4-step image
    assert np.abs(with_kohya - with_lcm).max() <= 1  # the same modules, whichever layout
    assert np.abs(both - with_lcm).max() > 0  # the user's adapter applies on the same rows
