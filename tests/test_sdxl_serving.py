"""SDXL end to end through the gateway, in-process and through a real Triton (issue 35).

One tiny SDXL-architecture folder (bench/model_folders.py) served by each backend: Generate equals
the in-process engine, each personalization method trains as a durable job and its adapter changes
the images, DDS and DreamSteerer edit with it, and an SD 1.x adapter is refused naming the mismatch.
"""

from __future__ import annotations

import io
import subprocess
import sys

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from bench.model_folders import sdxl_folder
from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service.config import Settings
from service.engine.pipeline import Engine, GenerationSpec
from tests.conftest import TOKENS, auth, free_port, start_gateway_in_thread, stop_gateway

METHODS = (pb.DREAMBOOTH_LORA, pb.TEXTUAL_INVERSION, pb.CUSTOM_DIFFUSION, pb.FINESTYLE)


@pytest.fixture(scope="module")
def folder(model_cache):
    return sdxl_folder(model_cache / "sdxl-tiny")


@pytest.fixture(scope="module", params=["inprocess", "triton"])
def stack(request, folder, tmp_path_factory):
    settings = Settings(
        host="127.0.0.1", grpc_port=0, metrics_port=free_port(), api_keys=dict(TOKENS), backend=request.param,
        data_dir=tmp_path_factory.mktemp(f"sdxl-{request.param}"), model_dir=folder, default_steps=3,
        training_workers=1, job_previews=1,
    )
    backend = metrics = triton = None
    if request.param == "triton":
        from service.backends.triton import TritonBackend
        from service.gateway.metrics import GatewayMetrics
        from service.gateway.server import MODEL_REPOSITORY, TRITON_MODELS, triton_model_environment
        from service.triton.launcher import TritonServer

        triton = TritonServer(MODEL_REPOSITORY, models=TRITON_MODELS, env=triton_model_environment(settings, folder),
                              start_timeout_s=400).__enter__()
        metrics = GatewayMetrics()
        backend = TritonBackend(triton.grpc_url, folder, metrics=metrics, server=triton)
    running = start_gateway_in_thread(settings, backend=backend, metrics=metrics)
    yield running
    stop_gateway(running)
    if triton is not None:
        triton.__exit__(None, None, None)


def pixels(image: pb.Image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB"))


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_generate_equals_the_engine(stack, folder):
    stub = stack.stub()
    resp = stub.Generate(pb.GenerateRequest(prompt="a red circle", steps=3, seed=5, num_images=2, width=48,
                                            guidance_scale=5.0), metadata=auth())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each Triton instance (thread count changes float summation order)
    try:
        want = Engine.from_pretrained(folder).generate(
            GenerationSpec(prompt="a red circle", steps=3, seed=5, num_images=2, width=48, height=64, guidance_scale=5.0))
    finally:
        torch.set_num_threads(threads)
    got = [pixels(i) for i in resp.images]
    assert got[0].shape == (64, 48, 3)  # the model's own height by default
    for a, b in zip(got, want.images):
        assert np.abs(a.astype(int) - np.asarray(b).astype(int)).max() <= 2


@pytest.mark.parametrize("method", METHODS, ids=lambda m: pb.PersonalizationMethod.Name(m).lower())
def test_each_method_trains_and_its_adapter_generates_and_edits(stack, method):
    """A durable job per method; DreamBooth-LoRA's adapter (UNet and both text encoders' LoRA) also
    edits with DDS and DreamSteerer."""
    from service.research.world.heldout import CONCEPTS

    stub = stack.stub()
    name = pb.PersonalizationMethod.Name(method).lower()
    photos = [pb.Image(data=png(s.image)) for s in CONCEPTS["yellow-crescent"].references(3, seed=0)]
    extra = dict(class_word="circle")
    if method == pb.FINESTYLE:
        photos = photos[:1]
        extra = dict(concepts=[pb.Concept(phrase="a yellow crescent")], style_phrase="in zwx style")
    job = stub.Personalize(pb.PersonalizeRequest(
        method=method, name=f"sdxl-{name}", images=photos,
        options=pb.TrainingOptions(steps=2, batch_size=2, seed=4, num_class_images=2 if "class_word" in extra else 0),
        **extra), metadata=auth())
    done = list(stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), metadata=auth(), timeout=600))[-1].job
    assert done.state == pb.SUCCEEDED, done.error

    plain = pb.GenerateRequest(prompt=f"a {done.token} circle", steps=3, seed=2)
    tuned = pb.GenerateRequest(prompt=plain.prompt, steps=3, seed=2,
                               adapters=[pb.AdapterRef(adapter_id=done.adapter_id)])
    a = pixels(stub.Generate(plain, metadata=auth()).images[0]).astype(int)
    b = pixels(stub.Generate(tuned, metadata=auth()).images[0]).astype(int)
    assert np.abs(a - b).max() > 0  # 2 steps at the profile's learning rate: a small change, but one

    if method != pb.DREAMBOOTH_LORA:
        return  # editing with each method's adapter on SDXL: tests/test_sdxl_personalize.py, in-process
    source = a.astype(np.uint8)
    options = pb.EditOptions(steer_steps=2, preliminary_iterations=2, guided_samples=1, guided_steps=2)
    for edit_method in (pb.DDS, pb.DREAMSTEERER):
        edited = stub.Edit(pb.EditRequest(
            method=edit_method, source_image=pb.Image(data=png(source)), source_prompt=f"a circle",
            target_prompt=f"a {done.token} circle", adapter_id=done.adapter_id, steps=4, seed=1, options=options),
            metadata=auth(), timeout=600)
        assert pixels(edited.image).shape == source.shape


def test_an_sd1_adapter_is_refused_naming_the_mismatch(stack, tiny_pipe, tmp_path):
    """A LoRA diffusers wrote for an SD 1.x-architecture model (the embedded model's widths) does not fit SDXL."""
    from bench.reference_adapters import write_reference_lora

    path = write_reference_lora(tmp_path, tiny_pipe.unet, text_encoder=tiny_pipe.text_encoder)
    with pytest.raises(grpc.RpcError) as err:
        stack.stub().ImportAdapter(pb.ImportAdapterRequest(name="sd1-on-sdxl", safetensors=path.read_bytes()),
                                   metadata=auth())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Stable Diffusion XL" in err.value.details()


def test_serve_refuses_an_architecture_not_served_in_one_line(tmp_path):
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}')
    out = subprocess.run([sys.executable, "-m", "service", "serve", "--dev", "--model-dir", str(folder)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "FluxTransformer2DModel" in errors[0] and "Stable Diffusion XL" in errors[0]
    assert "Traceback" not in out.stderr


def test_a_kohya_sdxl_lora_with_both_text_encoders_serves(stack, folder):
    """kohya's SDXL layout (SGM block names, lora_te1_/lora_te2_) imports whole and changes the
    images (each layer's equality with diffusers: tests/test_lora_layouts.py)."""
    from tests.kohya_files import kohya_lora_file

    stub = stack.stub()
    data = kohya_lora_file(Engine.from_pretrained(folder, components=()), seed=2, sgm=True)
    adapter = stub.ImportAdapter(pb.ImportAdapterRequest(name="kohya-sdxl", safetensors=data), metadata=auth())
    assert "SGM" in adapter.contents.layout
    assert {p.component for p in adapter.contents.components} == {"unet", "text_encoder", "text_encoder_2"}
    plain = pb.GenerateRequest(prompt="a red circle", steps=2, seed=1)
    tuned = pb.GenerateRequest(prompt="a red circle", steps=2, seed=1, adapters=[pb.AdapterRef(adapter_id=adapter.adapter_id)])
    a = pixels(stub.Generate(plain, metadata=auth()).images[0]).astype(int)
    b = pixels(stub.Generate(tuned, metadata=auth()).images[0]).astype(int)
    assert np.abs(a - b).mean() > 1
