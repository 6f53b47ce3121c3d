"""Gateway -> real Triton server serving model_repo/.

One Triton for the module, started here with the gateway's own model environment and handed to the
gateway's backend as its child, as `--backend triton` does with the embedded server: the gateway
supervises it. Starting it here rather than inside the gateway gives it a longer start-up allowance:
each of its python-backend stubs imports torch/diffusers, which on a shared 2-core machine took 30 s
to over 2 minutes. The test that kills Triton runs last: the gateway's supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import io
import re
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from prometheus_client import CollectorRegistry
from safetensors.torch import save

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service.adapters import BankedAdapters
from service.config import Settings
from service.engine.default_model import default_model_dir
from service.engine.pipeline import AdapterUse, Engine, GenerationSpec
from service.backends.triton import TritonBackend
from service.gateway.metrics import GatewayMetrics
from service.gateway.server import MODEL_REPOSITORY, TRITON_MODELS, triton_model_environment
from service.triton.client import grpcclient
from service.triton.launcher import TritonServer
from service.adapters.loading import blob_loader
from tests.conftest import TOKENS, auth, free_port, required_tool, start_gateway_in_thread, stop_gateway


@pytest.fixture(scope="module")
def model_dir(model_cache):
    return default_model_dir(model_cache)


@pytest.fixture(scope="module")
def settings(tmp_path_factory, model_dir):
    return Settings(
        host="127.0.0.1", grpc_port=0, metrics_port=free_port(), api_keys=dict(TOKENS), backend="triton",
        data_dir=tmp_path_factory.mktemp("triton-data"), model_dir=model_dir, default_steps=3,
        checkpoint_every=2, job_previews=2, training_workers=2,
    )


@pytest.fixture(scope="module")
def triton(settings, model_dir):
    env = triton_model_environment(settings, model_dir)
    with TritonServer(MODEL_REPOSITORY, models=TRITON_MODELS, env=env, start_timeout_s=400) as server:
        yield server


@pytest.fixture(scope="module")
def stack(settings, triton, model_dir):
    metrics = GatewayMetrics()
    backend = TritonBackend(triton.grpc_url, model_dir, metrics=metrics, server=triton,
                            image_prompt_files=settings.image_prompt_files())
    running = start_gateway_in_thread(settings, backend=backend, metrics=metrics)
    yield running
    stop_gateway(running)


@pytest.fixture(scope="module")
def reference(model_dir):
    """The in-process engine, for the images Triton must reproduce, with one torch thread like each
    Triton instance (thread count changes the float summation order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine.from_pretrained(model_dir)
    torch.set_num_threads(threads)


def lora_file(engine: Engine, seed: int, rank: int = 2) -> bytes:
    """A diffusers-format LoRA on the first cross-attention key projection of whatever UNet is served."""
    name, linear = next((n, m) for n, m in engine.unet.named_modules() if n.endswith("attn2.to_k"))
    g = torch.Generator().manual_seed(seed)
    return save({
        f"unet.{name}.lora_A.weight": torch.randn(rank, linear.in_features, generator=g),
        f"unet.{name}.lora_B.weight": torch.randn(linear.out_features, rank, generator=g),
    }, metadata={"format": "pt"})


def pixels(image: pb.Image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB"))


def nv_metric(triton, name: str, model: str) -> float:
    return triton.metric(name, model)


def test_generate_through_triton_equals_inprocess(stack, reference):
    stub = stack.stub()
    resp = stub.Generate(pb.GenerateRequest(prompt="a red circle", steps=4, seed=5, num_images=2), metadata=auth())
    assert list(resp.seeds) == [5, 6]
    expected = reference.generate(GenerationSpec(prompt="a red circle", steps=4, seed=5, num_images=2))
    for got, want in zip(resp.images, expected.images):
        # Bit-exact on the seeded tiny model; allow one level of PNG rounding for larger models.
        assert np.abs(pixels(got).astype(int) - np.asarray(want).astype(int)).max() <= 1
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=auth())
    assert info.backend == "triton" and info.base_model == reference.name
    # What the unet model's instance runs, read back from the info metric it exports on Triton's /metrics.
    assert info.unet_runtime == "eager" and info.unet_runtime_choice == "eager (set by STEERSERVE_UNET_RUNTIME)"


def test_image_prompts_through_triton_equal_inprocess(stack, model_dir, reference):
    """Photos encoded by the gateway travel as tokens to the `generate` model, whose UNet has the
    embedded model's IP-Adapter installed: the image equals the in-process engine's; a stored image
    prompt at weight 0.8 equals the same photos at image_prompt_scale 0.8."""
    from service.image_prompt.served import ServedImagePrompts
    from service.research.image_prompt import shipped_for
    from tests.test_image_prompts import concept_photos, png

    stub = stack.stub()
    assert stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=auth()).image_prompts
    photos = concept_photos(n=2)
    request = dict(prompt="a circle on a green background", steps=4, seed=5, guidance_scale=4.0)
    direct = stub.Generate(pb.GenerateRequest(**request, reference_images=[png(p) for p in photos], image_prompt_scale=0.8),
                           metadata=auth())
    engine = Engine.from_pretrained(model_dir)
    ServedImagePrompts.from_files(engine, *shipped_for(model_dir))
    expected = engine.generate(GenerationSpec(**request, image_prompt=engine.image_prompts.prompt(photos, 0.8)))
    assert np.abs(pixels(direct.images[0]).astype(int) - np.asarray(expected.images[0]).astype(int)).max() <= 1
    plain = engine.generate(GenerationSpec(**request))
    assert np.abs(pixels(direct.images[0]).astype(int) - np.asarray(plain.images[0]).astype(int)).mean() > 2

    stored = stub.CreateImagePrompt(pb.CreateImagePromptRequest(name="triton-photos", images=[png(p) for p in photos]),
                                    metadata=auth())
    again = stub.Generate(pb.GenerateRequest(**request, adapters=[pb.AdapterRef(adapter_id=stored.adapter_id, weight=0.8)]),
                          metadata=auth())
    np.testing.assert_array_equal(pixels(again.images[0]), pixels(direct.images[0]))


def test_bad_request_and_deadline_statuses(stack):
    stub = stack.stub()
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompt="x", steps=150, seed=1), metadata=auth(), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompt="x", width=63), metadata=auth())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_concurrent_requests_with_different_adapters_are_batched(stack, triton, model_dir, reference):
    stub = stack.stub()
    imported = [
        stub.ImportAdapter(pb.ImportAdapterRequest(name=f"lora-{k}", safetensors=lora_file(reference, seed=k)),
                           metadata=auth())
        for k in range(3)
    ]
    ids = {a.sha256: a.adapter_id for a in imported}  # content key (what banks load by) -> API id
    # In-process references, one request at a time, with the same adapter bank code.
    reference = Engine.from_pretrained(model_dir)
    BankedAdapters.attach(reference, blob_loader(stack.settings.data_dir / "adapters"), num_slots=4, max_rank=4)
    # Each with another sampler: rows carry their own timesteps (float ones for Karras sigmas) and
    # their loop's input scaling, so requests of different samplers share calls too.
    kinds = [("ddim", False), ("dpmpp_2m", True), ("euler_ancestral", False), ("unipc", False)]
    specs = [GenerationSpec(prompt="a dog", steps=6, seed=k, adapters=(AdapterUse(imported[k].sha256),),
                            sampler=kinds[k][0], karras_sigmas=kinds[k][1]) for k in range(3)]
    specs.append(GenerationSpec(prompt="a dog", steps=6, seed=9, sampler=kinds[3][0]))  # and one without adapters
    expected = [np.asarray(reference.generate(s).images[0]) for s in specs]

    unet0, generate0 = nv_metric(triton, "nv_inference_count", "unet"), nv_metric(triton, "nv_inference_count", "generate")
    rows0, steps0 = _metric(stack, "steerserve_triton_step_batch_size_sum"), _metric(stack, "steerserve_triton_step_batch_size_count")

    def call(spec):
        req = pb.GenerateRequest(prompt=spec.prompt, steps=spec.steps, seed=spec.seed, sampler=spec.sampler,
                                 karras_sigmas=spec.karras_sigmas,
                                 adapters=[pb.AdapterRef(adapter_id=ids[a.key], weight=a.weight) for a in spec.adapters])
        return pixels(stack.stub().Generate(req, metadata=auth(), timeout=120).images[0])

    # Admission runs as many at once as the generate instance's measured width pays for (on this CPU
    # 1-2, once a result has reported it: tests/test_triton_batch_width.py); here all 4 (its slots),
    # to see what the batcher does with them.
    admission = stack.gateway.servicer.admission
    width, admission.width = admission.width, None
    assert width is stack.gateway.servicer.backend.batch_width  # the gateway's admission follows Triton's
    try:
        with ThreadPoolExecutor(len(specs)) as pool:
            got = list(pool.map(call, specs))
    finally:
        admission.width = width

    # The loops and the UNet met inside `generate` (its step batcher): no per-step call to `unet`.
    assert nv_metric(triton, "nv_inference_count", "unet") == unet0
    assert nv_metric(triton, "nv_inference_count", "generate") - generate0 == 4
    # Each of the 4 x 6 steps ran in a UNet call of more rows than its own 2 (CFG) on average:
    # steps of different requests, with different adapters, shared calls.
    steps = _metric(stack, "steerserve_triton_step_batch_size_count") - steps0
    rows = _metric(stack, "steerserve_triton_step_batch_size_sum") - rows0
    assert steps == 4 * 6 and rows / steps > 2
    for k, (g, e) in enumerate(zip(got, expected)):
        # Batched and single matmuls round differently; a wrong adapter would change far more.
        assert np.abs(g.astype(int) - e.astype(int)).max() <= 2, f"request {k}"
    assert not np.array_equal(expected[0], expected[1]) and not np.array_equal(expected[0], expected[3])

    text = urllib.request.urlopen(stack.metrics_url, timeout=10).read().decode()
    batch_sum = float(re.search(r"^steerserve_triton_step_batch_size_sum (\S+)$", text, re.M).group(1))
    batch_count = float(re.search(r"^steerserve_triton_step_batch_size_count (\S+)$", text, re.M).group(1))
    assert batch_sum > 2 * batch_count  # some steps ran in a batch of more than one request's two rows
    assert "steerserve_triton_step_queue_seconds_bucket" in text

    # The generate instance's adapter bank, through Triton's own /metrics: the three adapters were
    # loaded (misses), are resident, and no slot stays pinned once the requests are answered.
    assert nv_metric(triton, "steerserve_triton_adapter_cache_misses_total", "generate") >= 3
    assert nv_metric(triton, "steerserve_triton_adapter_resident", "generate") >= 3
    assert nv_metric(triton, "steerserve_triton_adapter_pinned_slots", "generate") == 0


def test_a_kohya_lora_with_conv_and_text_encoder_layers_batches_with_another_users(stack, triton, model_dir):
    """A kohya/A1111 SD 1.x LoRA (attention, feed-forward, 1x1-conv proj_in/proj_out, text-encoder
    attention and MLP) imported and served through Triton beside another user's diffusers LoRA: both
    requests' steps share UNet calls, and each image equals the in-process engine's."""
    from tests.kohya_files import kohya_lora_file

    stub = stack.stub()
    reference = Engine.from_pretrained(model_dir)
    kohya = stub.ImportAdapter(pb.ImportAdapterRequest(name="kohya-conv", safetensors=kohya_lora_file(reference, 1)),
                               metadata=auth())
    parts = {p.component: p for p in kohya.contents.components}
    assert "kohya" in kohya.contents.layout and parts["unet"].conv_modules > 0 and "text_encoder" in parts
    other = stub.ImportAdapter(pb.ImportAdapterRequest(name="other-user", safetensors=lora_file(reference, seed=7)),
                               metadata=auth("token-bob"))
    BankedAdapters.attach(reference, blob_loader(stack.settings.data_dir / "adapters"), num_slots=4, max_rank=4,
                          registry=CollectorRegistry())  # its own metrics: the batching test's bank has the global names
    specs = [(kohya, "token-alice"), (other, "token-bob")]
    expected = [np.asarray(reference.generate(GenerationSpec(prompt="a dog", steps=6, seed=3,
                                                             adapters=(AdapterUse(a.sha256),))).images[0])
                for a, _ in specs]
    rows0, steps0 = _metric(stack, "steerserve_triton_step_batch_size_sum"), _metric(stack, "steerserve_triton_step_batch_size_count")

    def call(spec):
        adapter, token = spec
        req = pb.GenerateRequest(prompt="a dog", steps=6, seed=3, adapters=[pb.AdapterRef(adapter_id=adapter.adapter_id)])
        return pixels(stack.stub().Generate(req, metadata=auth(token), timeout=120).images[0])

    admission = stack.gateway.servicer.admission
    width, admission.width = admission.width, None  # both at once (see the batching test above)
    try:
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(call, specs))
    finally:
        admission.width = width
    steps = _metric(stack, "steerserve_triton_step_batch_size_count") - steps0
    rows = _metric(stack, "steerserve_triton_step_batch_size_sum") - rows0
    assert rows / steps > 2  # some steps of the two users' requests shared a UNet call
    for g, e in zip(got, expected):
        assert np.abs(g.astype(int) - e.astype(int)).max() <= 2
    assert not np.array_equal(expected[0], expected[1])


def test_progress_streams_every_step(stack):
    backend = stack.gateway.servicer.backend
    seen = []
    call = backend.generate(GenerationSpec(prompt="a ring", steps=3, seed=1), None, lambda s, t: seen.append((s, t)))
    result = asyncio.run_coroutine_threadsafe(call, stack.loop).result(60)
    assert seen == [(1, 3), (2, 3), (3, 3)] and len(result.images) == 1


def _crescent_request(name: str, steps: int, method=pb.CUSTOM_DIFFUSION) -> pb.PersonalizeRequest:
    from service.research.world.heldout import CONCEPTS

    photos = []
    for sample in CONCEPTS["yellow-crescent"].references(3, seed=0):
        buf = io.BytesIO()
        Image.fromarray(sample.image).save(buf, format="PNG")
        photos.append(pb.Image(data=buf.getvalue()))
    return pb.PersonalizeRequest(method=method, name=name, class_word="circle", images=photos,
                                 options=pb.TrainingOptions(steps=steps, batch_size=2, seed=4))


def _wait_job(stub, job_id, predicate, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=auth())
        if predicate(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id}: {job}")


@pytest.mark.parametrize("method", [pb.CUSTOM_DIFFUSION, pb.DREAMBOOTH_LORA, pb.TEXTUAL_INVERSION])
def test_personalize_trains_on_tritons_personalize_model(stack, triton, model_dir, method):
    stub = stack.stub()
    count0 = nv_metric(triton, "nv_inference_request_success", "personalize")
    name = f"triton-{pb.PersonalizationMethod.Name(method).lower()}"
    job = stub.Personalize(_crescent_request(name, steps=6, method=method), metadata=auth())
    events = list(stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), metadata=auth(), timeout=300))
    done = events[-1].job
    assert done.state == pb.SUCCEEDED, done.error
    assert any(e.state == pb.RUNNING and 0 < e.step <= 6 for e in events)
    assert nv_metric(triton, "nv_inference_request_success", "personalize") == count0 + 1  # it ran in Triton
    assert len(done.previews) == 2  # made through Triton's generate model with the new adapter

    # The same training as in-process (same spec, same code), to float rounding.
    from service.adapters import parse_adapter
    from service.jobs.requests import training_spec
    from service.personalize import FrozenBase, train

    stored = parse_adapter(stack.gateway.servicer.adapter_store.read_blob(
        stack.gateway.servicer.adapter_store.get("alice", done.adapter_id)))
    request = pb.PersonalizeRequest.FromString(stack.gateway.servicer.job_store.get("alice", job.job_id).request)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = train(FrozenBase.from_pretrained(model_dir), training_spec(request, 2**31, 0))
    finally:
        torch.set_num_threads(threads)
    assert stored.token_embeddings.keys() == local.token_embeddings.keys()
    assert stored.lora.keys() == local.lora.keys() and (len(local.lora) > 0) == (method != pb.TEXTUAL_INVERSION)
    for token, vector in local.token_embeddings.items():
        torch.testing.assert_close(stored.token_embeddings[token], vector, rtol=0, atol=1e-5)
    for module_name, module in local.lora.items():
        torch.testing.assert_close(stored.lora[module_name].up, module.up, rtol=0, atol=1e-5)

    # Generate through Triton with the new adapter.
    plain = pb.GenerateRequest(prompt=f"a {done.token} circle", steps=3, seed=2)
    tuned = pb.GenerateRequest(prompt=plain.prompt, steps=3, seed=2, adapters=[pb.AdapterRef(adapter_id=done.adapter_id)])
    a = pixels(stub.Generate(plain, metadata=auth()).images[0]).astype(int)
    b = pixels(stub.Generate(tuned, metadata=auth()).images[0]).astype(int)
    assert np.abs(a - b).mean() > 0.5


def test_finestyle_trains_on_triton_and_generates_with_both_scales(stack, triton, model_dir):
    """FINESTYLE through Triton: trained on the personalize model; Generate with style guidance runs
    the three predictions of each step as three rows of ONE unet call, and equals in-process."""
    from service.research.world.heldout import STYLES

    stub = stack.stub()
    style = STYLES["pixel-checker"]
    buf = io.BytesIO()
    Image.fromarray(style.reference().image).save(buf, format="PNG")
    job = stub.Personalize(pb.PersonalizeRequest(
        method=pb.FINESTYLE, name="triton-style", images=[pb.Image(data=buf.getvalue())],
        concepts=[pb.Concept(phrase="a red heart")], style_phrase="in zwx style",
        options=pb.TrainingOptions(steps=6, batch_size=2, seed=4)), metadata=auth())
    done = _wait_job(stub, job.job_id, lambda j: j.state not in (pb.QUEUED, pb.RUNNING), timeout=300)
    assert done.state == pb.SUCCEEDED, done.error
    assert done.method == pb.FINESTYLE and len(done.previews) == 2

    def generate(scale):
        req = pb.GenerateRequest(prompt="a blue star in zwx style", steps=4, seed=2, guidance_scale=4.0,
                                 style_guidance_scale=scale, adapters=[pb.AdapterRef(adapter_id=done.adapter_id)])
        return pixels(stub.Generate(req, metadata=auth()).images[0])

    plain = generate(0.0)
    rows0, steps0 = _metric(stack, "steerserve_triton_step_batch_size_sum"), _metric(stack, "steerserve_triton_step_batch_size_count")
    styled = generate(3.0)
    assert _metric(stack, "steerserve_triton_step_batch_size_count") - steps0 == 4  # one call a step ...
    assert _metric(stack, "steerserve_triton_step_batch_size_sum") - rows0 == 4 * 3  # ... of three rows
    assert np.abs(plain.astype(int) - styled.astype(int)).mean() > 0.5

    # The same loop in-process, with the same stored adapter, gives the same image.
    reference = Engine.from_pretrained(model_dir)
    BankedAdapters.attach(reference, blob_loader(stack.settings.data_dir / "adapters"), num_slots=2, max_rank=8,
                          registry=CollectorRegistry())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = reference.generate(GenerationSpec(
            prompt="a blue star in zwx style", steps=4, seed=2, guidance_scale=4.0, style_guidance_scale=3.0,
            adapters=(AdapterUse(stack.gateway.servicer.adapter_store.get("alice", done.adapter_id).key, style=True),),
        )).images[0]
    finally:
        torch.set_num_threads(threads)
    assert np.abs(np.asarray(expected).astype(int) - styled.astype(int)).max() <= 2


def test_edit_on_triton_with_each_subject_method(stack, triton, model_dir):
    """DDS and DreamSteerer through the `edit` model, for each subject method's adapter. DDS's rows
    go through the shared `unet` model and equal the in-process edit; DreamSteerer's rows with its
    steered copy go there too (the copy is a per-request file in the shared adapter folder, gone
    when the edit ends), and the stored adapter is unchanged."""
    from service.edit import DDS as DDS_METHOD, EditOptions, EditSpec
    from service.adapters.loading import REQUEST_ADAPTERS
    from service.edit.runner import run_edit
    from service.personalize import FrozenBase
    from tests.test_edit import SOURCE, SOURCE_PROMPT, edit_request, import_adapters, quick_adapter

    base = FrozenBase.from_pretrained(model_dir)
    adapters = {m: quick_adapter(base, m, steps=6) for m in ("DREAMBOOTH_LORA", "TEXTUAL_INVERSION", "CUSTOM_DIFFUSION")}
    stub = stack.stub()
    stored = import_adapters(stub, adapters, auth(), "triton-edit")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each Triton instance
    try:
        reference = Engine.from_pretrained(model_dir)
        BankedAdapters.attach(reference, blob_loader(stack.settings.data_dir / "adapters"), num_slots=4, max_rank=16,
                              max_rows=16, registry=CollectorRegistry())
        for method, adapter in stored.items():
            exec0 = nv_metric(triton, "nv_inference_exec_count", "unet")
            dds = stub.Edit(edit_request(adapter, pb.DDS), metadata=auth(), timeout=300)
            assert nv_metric(triton, "nv_inference_exec_count", "unet") - exec0 >= 12  # one call per iteration
            want = run_edit(reference, None, EditSpec(
                method=DDS_METHOD, source=SOURCE.image, source_prompt=SOURCE_PROMPT,
                target_prompt=f"a {adapter.token} heart on a blue striped background",
                adapter=AdapterUse(adapter.sha256), seed=4, options=EditOptions(iterations=12))).image
            assert np.abs(pixels(dds.image).astype(int) - want.astype(int)).max() <= 2
            before = stub.ExportAdapter(pb.ExportAdapterRequest(adapter_id=adapter.adapter_id), metadata=auth())
            exec0 = nv_metric(triton, "nv_inference_exec_count", "unet")
            events = list(stub.EditStream(edit_request(adapter), metadata=auth(), timeout=300))
            result = events[-1].result
            # The final DDS iterations (12) ran in the shared unet model; the preliminary edit's 4 ran
            # on the edit's private workbench, side by side with the guided samples (SteeringInputs).
            assert nv_metric(triton, "nv_inference_exec_count", "unet") - exec0 >= 12
            assert result.timings.guided_seconds > 0
            assert not list((stack.settings.data_dir / "adapters" / REQUEST_ADAPTERS).glob("*"))
            assert {"steer", "dds"} <= {e.phase for e in events}
            assert result.timings.steer_seconds > 0 and result.mask.data
            assert np.abs(pixels(result.image).astype(int) - SOURCE.image.astype(int)).mean() > 1
            after = stub.ExportAdapter(pb.ExportAdapterRequest(adapter_id=adapter.adapter_id), metadata=auth())
            assert after.safetensors == before.safetensors
    finally:
        torch.set_num_threads(threads)
    # A deadline stops a Triton edit too.
    with pytest.raises(grpc.RpcError) as err:
        stub.Edit(edit_request(stored["DREAMBOOTH_LORA"], steps=1000), metadata=auth(), timeout=2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_two_jobs_train_at_once_on_tritons_personalize_model(stack):
    """STEERSERVE_TRAINING_WORKERS=2: the personalize instance trains two jobs at once (a thread and
    a base-model copy each, their responses streamed one at a time into the stub: two threads
    sending at once crashed tritonserver), and both finish."""
    stub = stack.stub()
    jobs = [stub.Personalize(_crescent_request(f"triton-pair-{i}", steps=60), metadata=auth()) for i in range(2)]
    overlapped, ended = False, (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        states = [stub.GetJob(pb.GetJobRequest(job_id=j.job_id), metadata=auth()) for j in jobs]
        overlapped |= all(j.state == pb.RUNNING and 0 < j.step < 60 for j in states)
        if all(j.state in ended for j in states):
            break
        time.sleep(0.2)
    assert [j.state for j in states] == [pb.SUCCEEDED, pb.SUCCEEDED], [j.error for j in states]
    assert overlapped


def test_personalize_on_triton_streams_checkpoints_and_cancels(stack):
    stub = stack.stub()
    job = stub.Personalize(_crescent_request("triton-long", steps=3000), metadata=auth())
    checkpoint = stack.settings.data_dir / "checkpoints" / f"{job.job_id}.ckpt"
    _wait_job(stub, job.job_id, lambda j: j.state == pb.RUNNING and checkpoint.exists())
    assert stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), metadata=auth()).state == pb.CANCELLED
    _wait_job(stub, job.job_id, lambda j: not checkpoint.exists(), timeout=60)
    # The personalize model stopped that job and is free for the next one.
    nxt = stub.Personalize(_crescent_request("triton-after", steps=2), metadata=auth())
    assert _wait_job(stub, nxt.job_id, lambda j: j.state not in (pb.QUEUED, pb.RUNNING)).state == pb.SUCCEEDED


def test_unload_and_load_a_model(stack, triton):
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    stub = stack.stub()
    client.unload_model("generate")
    deadline = time.monotonic() + 30
    while client.is_model_ready("generate") and time.monotonic() < deadline:
        time.sleep(0.1)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompt="a star", steps=1, seed=1), metadata=auth())
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "generate" in err.value.details()
    client.load_model("generate")
    assert client.is_model_ready("generate")
    assert len(stub.Generate(pb.GenerateRequest(prompt="a star", steps=1, seed=1), metadata=auth()).images) == 1


def _health(stack, service: str = "steerserve.v1.SteerServe") -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    return health_pb2_grpc.HealthStub(stack.channel()).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _metric(stack, name: str) -> float:
    text = urllib.request.urlopen(stack.metrics_url, timeout=10).read().decode()
    found = re.findall(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found[0]) if found else 0.0


def test_supervisor_restarts_a_killed_triton_and_jobs_resume(stack, triton, model_dir, monkeypatch):
    """kill -9 of the Triton process group: in-flight requests fail UNAVAILABLE, health turns
    NOT_SERVING, the gateway restarts Triton, health is SERVING within 5 s of Triton being ready,
    and the training job that was running resumes from its checkpoint."""
    from grpc_health.v1 import health_pb2

    stub = stack.stub()
    servicer = stack.gateway.servicer
    job = stub.Personalize(_crescent_request("triton-survivor", steps=400), metadata=auth())
    _wait_job(stub, job.job_id, lambda j: j.state == pb.RUNNING and
              servicer.job_store.get("alice", job.job_id).checkpoint_step >= 2)
    box = {}
    # The long call's first denoising step, from the progress Triton streams back: the kill below
    # lands while Triton runs its steps, not before the request got there.
    generate, stepped = servicer.backend.generate, threading.Event()

    async def generate_reporting_steps(spec, deadline, on_step=None):
        def step(done, total):
            if spec.steps == 150:  # the long call's
                stepped.set()
            if on_step is not None:
                on_step(done, total)

        return await generate(spec, deadline, step)

    monkeypatch.setattr(servicer.backend, "generate", generate_reporting_steps)

    def long_call():
        try:
            box["answer"] = stub.Generate(pb.GenerateRequest(prompt="a tree", steps=150, seed=1, width=256, height=256),
                                          metadata=auth(), timeout=120)
        except grpc.RpcError as exc:
            box["error"] = exc

    thread = threading.Thread(target=long_call)
    thread.start()
    # Into its 150 steps at 256x256 (many seconds on a CPU).
    assert stepped.wait(60), "the long Generate ran no step in Triton within 60 s"

    def external_probe() -> bool:  # how an external Triton (STEERSERVE_TRITON_URL) is watched: gRPC readiness
        async def probe():
            backend = TritonBackend(triton.grpc_url, model_dir)
            try:
                return await backend._probe()
            finally:
                await backend.close()
        return asyncio.run(probe())

    assert external_probe() is True
    assert _health(stack) == health_pb2.HealthCheckResponse.SERVING
    triton.kill()  # SIGKILL to the server and its stubs

    thread.join(30)
    assert not thread.is_alive() and "answer" not in box, "the in-flight Generate did not fail"
    assert box["error"].code() == grpc.StatusCode.UNAVAILABLE
    assert "Triton" in box["error"].details() and "unavailable" in box["error"].details()
    assert external_probe() is False
    deadline = time.monotonic() + 5
    while _health(stack) != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "health still SERVING 5 s after Triton died"
        time.sleep(0.1)
    # Not ready, but alive: Kubernetes takes the gateway out of its Service, it does not restart it.
    assert _health(stack, "liveness") == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:  # down: a clear UNAVAILABLE at once, not a hang
        stub.Generate(pb.GenerateRequest(prompt="a tree", steps=1, seed=1), metadata=auth(), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "exited" in err.value.details() and "restart" in err.value.details(), err.value.details()
    assert _metric(stack, "steerserve_triton_up") == 0

    # The supervisor restarts it on the same ports; health follows within 5 s of readiness.
    deadline = time.monotonic() + 400
    while not triton.is_ready():
        assert time.monotonic() < deadline, triton.log_tail()
        time.sleep(0.05)
    ready_at = time.monotonic()
    while _health(stack) != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() - ready_at < 5, "health not SERVING 5 s after Triton was ready again"
        time.sleep(0.05)
    assert _metric(stack, 'steerserve_triton_restarts_total{outcome="succeeded"}') == 1
    assert _metric(stack, "steerserve_triton_up") == 1
    assert len(stub.Generate(pb.GenerateRequest(prompt="a tree", steps=1, seed=1), metadata=auth(),
                             timeout=60).images) == 1

    done = _wait_job(stub, job.job_id, lambda j: j.state not in (pb.QUEUED, pb.RUNNING), timeout=600)
    assert done.state == pb.SUCCEEDED, done.error
    assert "resumed from step" in done.message, done.message
    assert servicer.job_store.get("alice", job.job_id).attempts == 2


def _exported_names(text: str) -> set[str]:
    """Metric names on a /metrics page: every sample's, and every family declared by `# TYPE` (a
    labelled family whose label values have not occurred yet, e.g. rejections by reason, has no
    sample but is exported), with a histogram's/summary's sample suffixes."""
    names = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M))
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.add(name)
        if kind in ("histogram", "summary"):
            names |= {f"{name}_{suffix}" for suffix in ("bucket", "sum", "count")}
    return names


def test_every_metric_the_shipped_rules_read_exists(stack, triton):
    """deploy/observability/prometheus-rules.yaml, the Grafana dashboard (grafana/steerserve.json) and
    the autoscalers (prometheus-adapter rules, KEDA triggers) under deploy/ read only metrics this
    gateway + Triton export (after the module's requests, jobs and the restart above; a family counts
    once declared, see _exported_names). Listed exceptions: GPU-only names (Triton's
    nv_gpu_*, our NVML steerserve_gpu_*) and the gateway's own adapter bank (--backend inprocess);
    tests/test_observability_rules.py checks those against our collectors' output."""
    from tests.test_observability_rules import GPU_ONLY, INPROCESS_ONLY, all_metric_names

    exposed = urllib.request.urlopen(stack.metrics_url, timeout=10).read().decode()
    exposed += urllib.request.urlopen(triton.metrics_url, timeout=10).read().decode()
    present = _exported_names(exposed)
    consumers = all_metric_names()
    assert consumers["rules"] and consumers["dashboard"]
    for consumer, names in consumers.items():
        missing = names - GPU_ONLY - INPROCESS_ONLY - present
        assert not missing, f"{consumer} read metrics nobody exports: {sorted(missing)}"
    # The store-wide job gauges the rules aggregate with max() are there (0: nothing queued now).
    assert {"steerserve_jobs_queued", "steerserve_jobs_oldest_queued_age_seconds"} <= present


def _prometheus_api(base: str, path: str, **params) -> dict:
    import json
    import urllib.parse

    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    body = json.loads(urllib.request.urlopen(url, timeout=10).read().decode())
    assert body["status"] == "success", body
    return body["data"]


def test_a_real_prometheus_scrapes_the_stack_and_evaluates_every_rule(stack, triton, tmp_path):
    """A real Prometheus server (1 s scrapes and evaluations) scrapes this gateway's and Triton's
    metrics ports with the shipped rules (the PrometheusRule's groups as a plain rule file, group
    intervals set to 1 s): both targets are up, every rule evaluates without error, the recording rules
    the dashboard and autoscaling read have series after a few Generate calls, and every dashboard
    query is accepted. Not on a GPU: the GPU rules have no input here."""
    import math
    import urllib.parse

    from tests.test_observability_rules import alerts, autoscaling_promql, dashboard_exprs, recorded, rule_file

    rule_file(tmp_path, interval="1s")
    port = free_port()
    targets = {"steerserve-gateway": urllib.parse.urlsplit(stack.metrics_url).netloc,
               "steerserve-triton": urllib.parse.urlsplit(triton.metrics_url).netloc}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": ["steerserve.rules.yml"],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                           for job, target in targets.items()],
    }))
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen(
        [required_tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)

    def wait(what, check, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                result = check()
            except (OSError, ValueError):  # not listening yet / not ready
                result = None
            if result:
                return result
            assert time.monotonic() < deadline, f"{what}: {last.get(what)}"
            time.sleep(0.5)

    last: dict = {}
    try:
        wait("ready", lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=5).status == 200)

        def targets_up():
            active = _prometheus_api(base, "/api/v1/targets")["activeTargets"]
            last["targets"] = [(t["labels"]["job"], t["health"], t["lastError"]) for t in active]
            return sorted(t["labels"]["job"] for t in active if t["health"] == "up") == sorted(targets)

        # Prometheus starts scraping a few seconds after it is ready (its target updates are batched
        # every 5 s): scraped before the requests, so rates see the counters move.
        wait("targets", targets_up)

        def scraped(count: float):
            def check():  # Prometheus's latest sample of the gateway's images counter has reached `count`
                result = _prometheus_api(base, "/api/v1/query",
                                         query='steerserve_images_generated_total{job="steerserve-gateway"}')["result"]
                last["scrape"] = (count, result)
                return bool(result) and float(result[0]["value"][1]) >= count
            return check

        stub = stack.stub()
        for k in range(3):  # each seen by a scrape of its own before the next
            assert len(stub.Generate(pb.GenerateRequest(prompt="a blue square", steps=2, seed=k), metadata=auth(),
                                     timeout=120).images) == 1
            wait("scrape", scraped(_metric(stack, "steerserve_images_generated_total")))

        def rules_healthy():
            groups = _prometheus_api(base, "/api/v1/rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            last["rules"] = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
            return ({g["name"] for g in groups} == {"steerserve.recording", "steerserve.alerts"}
                    and {r["name"] for r in rules} == recorded() | set(alerts())
                    and all(r["health"] == "ok" and not r.get("lastError") for r in rules))

        wait("rules", rules_healthy)

        def series(query, positive=False):
            def check():
                result = _prometheus_api(base, "/api/v1/query", query=query)["result"]
                last[query] = result
                values = [float(r["value"][1]) for r in result]
                return bool(values) and (not positive or any(v > 0 and math.isfinite(v) for v in values))
            wait(query, check)
            return last[query]

        series("steerserve:images_generated:rate1m", positive=True)
        series('steerserve:rpc_requests:rate1m{method="Generate",code="OK"}', positive=True)
        series('steerserve:rpc_duration_seconds:p95_5m{method="Generate"}', positive=True)
        assert float(series("steerserve:rpc_errors:ratio_rate5m")[0]["value"][1]) == 0  # no error since it started
        series('steerserve:triton_queue_compute:ratio_rate1m{model="unet"}')
        series("steerserve:adapter_cache_hit:ratio_rate5m")
        assert {r["metric"]["model"] for r in series("steerserve:triton_adapter_cache_hit:ratio_rate5m")} >= {"unet"}
        series("steerserve:jobs_queued:max")
        series("steerserve:jobs_oldest_queued_age_seconds:max")
        series('up{job="steerserve-triton"} == 1')
        series('steerserve_triton_up == 1')

        # Every panel query and autoscaler query runs (an empty result is fine: GPU panels, and the
        # autoscalers' namespace/pod matchers, which only Kubernetes service discovery adds).
        for expr in dashboard_exprs() + autoscaling_promql():
            _prometheus_api(base, "/api/v1/query", query=expr)
        # Every alert needs a minute or more (`for:`) to fire: none fires on this healthy stack.
        firing = [a for a in _prometheus_api(base, "/api/v1/alerts")["alerts"] if a["state"] == "firing"]
        assert not firing, firing
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()

