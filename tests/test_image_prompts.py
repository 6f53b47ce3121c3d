"""Image prompts through the public API on the embedded model (its own IP-Adapter, shipped in
service/research/image_prompt/weights): reference photos in Generate, stored image prompts
(CreateImagePrompt, no job) used like adapters beside LoRAs, one UNet call holding different
users' image prompts and LoRAs, and bad input answered by name.
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from tests.adapter_files import lora_file, served_model_dir
from tests.conftest import auth


def png(image: Image.Image) -> pb.Image:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return pb.Image(data=buf.getvalue())


def concept_photos(name: str = "yellow-crescent", n: int = 3) -> list[Image.Image]:
    from service.research.world.heldout import CONCEPTS

    return [Image.fromarray(s.image) for s in CONCEPTS[name].references(n)]


def pixels(response: pb.GenerateResponse) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(i.data))) for i in response.images])


GENERATE = dict(prompt="a circle on a green background", steps=4, guidance_scale=4.0, seed=11, num_images=1)


def test_reference_photos_personalize_one_generate_and_a_stored_prompt_gives_the_same_image(gateway):
    stub = gateway.stub()
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=auth())
    assert info.image_prompts and info.max_image_prompt_images == 5

    photos = concept_photos()
    plain = pixels(stub.Generate(pb.GenerateRequest(**GENERATE), metadata=auth()))
    direct = pixels(stub.Generate(pb.GenerateRequest(**GENERATE, reference_images=[png(p) for p in photos]),
                                  metadata=auth()))
    assert np.abs(direct.astype(int) - plain).mean() > 2  # the photos condition the image

    stored = stub.CreateImagePrompt(pb.CreateImagePromptRequest(name="crescent-photos", images=[png(p) for p in photos]),
                                    metadata=auth())
    assert stored.method == pb.IMAGE_PROMPT and stored.source == "image_prompt" and stored.size_bytes > 0
    # Its weight is the scale (1 = the direct request's default): the same tokens, the same image.
    again = pixels(stub.Generate(pb.GenerateRequest(**GENERATE, adapters=[pb.AdapterRef(adapter_id=stored.adapter_id)]),
                                 metadata=auth()))
    np.testing.assert_array_equal(again, direct)
    weaker = pixels(stub.Generate(pb.GenerateRequest(**GENERATE, adapters=[pb.AdapterRef(adapter_id=stored.adapter_id,
                                                                                          weight=0.3)]),
                                  metadata=auth()))
    assert np.abs(weaker.astype(int) - direct).mean() > 1
    # Another tenant cannot use it; the owner lists it with the other adapters.
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(**GENERATE, adapters=[pb.AdapterRef(adapter_id=stored.adapter_id)]),
                      metadata=auth("token-bob"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    listed = stub.ListAdapters(pb.ListAdaptersRequest(), metadata=auth()).adapters
    assert any(a.adapter_id == stored.adapter_id and a.method == pb.IMAGE_PROMPT for a in listed)


def test_a_dds_edit_takes_reference_photos_or_a_stored_image_prompt(gateway):
    """DDS with the photos' image prompt on its target branch: the edit moves toward them, and a
    stored image prompt edits exactly as the same photos sent with the request."""
    from service.research.world.generator import Scene, WorldObject, render

    stub = gateway.stub()
    source = Image.fromarray(render(Scene("solid", "blue", (WorldObject("circle", "red", "solid", 0.5, 0.5, 0.3),))).image)
    photos = [png(p) for p in concept_photos()]
    request = dict(source_image=png(source), source_prompt="a red circle on a blue background",
                   target_prompt="a circle on a blue background", method=pb.DDS, steps=20, seed=3)

    def edited(**extra):
        return np.asarray(Image.open(io.BytesIO(stub.Edit(pb.EditRequest(**request, **extra), metadata=auth()).image.data)))

    plain, direct = edited(), edited(reference_images=photos)
    assert np.abs(direct.astype(int) - plain).mean() > 1
    stored = stub.CreateImagePrompt(pb.CreateImagePromptRequest(name="edit-photos", images=photos), metadata=auth())
    np.testing.assert_array_equal(edited(adapter_id=stored.adapter_id), direct)
    # Edit has no adapter weight: image_prompt_scale scales a stored image prompt as it scales photos.
    np.testing.assert_array_equal(edited(adapter_id=stored.adapter_id, image_prompt_scale=0.5),
                                  edited(reference_images=photos, image_prompt_scale=0.5))


def test_a_stored_image_prompt_combines_with_a_lora_adapter(gateway):
    stub = gateway.stub()
    lora = stub.ImportAdapter(pb.ImportAdapterRequest(name="ip-lora", safetensors=lora_file(served_model_dir(gateway), scale=2.0)),
                              metadata=auth())
    prompt = stub.CreateImagePrompt(pb.CreateImagePromptRequest(name="ip-with-lora", images=[png(p) for p in concept_photos()]),
                                    metadata=auth())
    refs = {"lora": pb.AdapterRef(adapter_id=lora.adapter_id), "prompt": pb.AdapterRef(adapter_id=prompt.adapter_id)}

    def run(*names):
        return pixels(stub.Generate(pb.GenerateRequest(**GENERATE, adapters=[refs[n] for n in names]), metadata=auth()))

    both, lora_only, prompt_only = run("lora", "prompt"), run("lora"), run("prompt")
    plain = pixels(stub.Generate(pb.GenerateRequest(**GENERATE), metadata=auth()))
    # One small LoRA layer moves few pixels at 4 steps; each part still acts with the other on (the
    # exact per-row algebra is test_rows_of_one_unet_call_carry_different_image_prompts_and_loras).
    assert not np.array_equal(lora_only, plain) and not np.array_equal(both, prompt_only)
    assert np.abs(both.astype(int) - lora_only).mean() > 1


def test_rows_of_one_unet_call_carry_different_image_prompts_and_loras():
    """The engine's batched call: (prompt A + LoRA), (prompt B), (LoRA, no prompt), (nothing) in ONE
    UNet call equal each row run alone."""
    from bench.common import serving_engine
    from service.adapters import parse_adapter
    from service.engine.pipeline import AdapterUse
    from service.image_prompt.served import ServedImagePrompts
    from service.research.basemodel import DEFAULT_MODEL_DIR
    from service.research.image_prompt import SHIPPED_ADAPTER, SHIPPED_ENCODER
    from service.research.world.heldout import CONCEPTS

    lora = parse_adapter(lora_file(DEFAULT_MODEL_DIR, scale=0.5))
    engine = serving_engine(DEFAULT_MODEL_DIR, {"lora": lora}, max_rows=4)
    served = ServedImagePrompts.from_files(engine, SHIPPED_ADAPTER, SHIPPED_ENCODER)
    names = list(CONCEPTS)
    a, b = served.prompt(concept_photos(names[0], 2)), served.prompt(concept_photos(names[1], 1), 0.7)
    rows = [(AdapterUse("lora"),), (), (AdapterUse("lora"),), ()]
    prompts = [a, b, None, None]
    embeds = engine.encode_prompts(["a circle"] * 4, image_prompts=prompts)
    size = engine.limits.default_size // engine.vae_scale_factor
    latents = torch.randn(4, engine.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 500)
    together = engine.predict_noise(latents, t, embeds, rows)
    for i in range(4):
        alone = engine.predict_noise(latents[i : i + 1], t[i : i + 1], embeds[i : i + 1], [rows[i]])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-4, atol=1e-5)
    assert (together[0] - together[2]).abs().max() > 1e-3  # the image prompt changed row 0
    assert (together[2] - together[3]).abs().max() > 1e-3  # the LoRA changed row 2


@pytest.mark.parametrize("case, field, message", [
    ("six photos", "reference_images", "takes 1 to 5 photos (got 6)"),
    ("tiny photo", "reference_images[0]", "each side must be at least 16 px"),
    ("flat photo", "reference_images[1]", "shows no subject"),
    ("not an image", "reference_images[0]", ""),
    ("scale without photos", "image_prompt_scale", "applies to reference_images"),
    ("scale too high", "image_prompt_scale", "between 0 and 2"),
])
def test_bad_reference_images_are_invalid_argument_naming_the_problem(gateway, case, field, message):
    photo = png(concept_photos(n=1)[0])
    images = {"six photos": [photo] * 6, "tiny photo": [png(Image.new("RGB", (8, 8), "red"))],
              "flat photo": [photo, png(Image.new("RGB", (64, 64), (40, 90, 200)))],
              "not an image": [pb.Image(data=b"not a png")], "scale without photos": [],
              "scale too high": [photo]}[case]
    scale = {"scale without photos": 0.5, "scale too high": 3.0}.get(case, 0.0)
    with pytest.raises(grpc.RpcError) as err:
        gateway.stub().Generate(pb.GenerateRequest(**GENERATE, reference_images=images, image_prompt_scale=scale),
                                metadata=auth())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":") and message in err.value.details()


def test_misuse_of_stored_image_prompts_is_refused_by_name(gateway):
    from service.image_prompt import stored
    from service.image_prompt.packing import ImagePrompt

    stub = gateway.stub()
    photos = [png(p) for p in concept_photos()]
    created = stub.CreateImagePrompt(pb.CreateImagePromptRequest(name="misuse", images=photos), metadata=auth())
    ref = pb.AdapterRef(adapter_id=created.adapter_id)

    def code_and_details(call, request):
        with pytest.raises(grpc.RpcError) as err:
            call(request, metadata=auth())
        return err.value.code(), err.value.details()

    code, details = code_and_details(stub.Generate, pb.GenerateRequest(**GENERATE, adapters=[ref], reference_images=photos))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "one image prompt" in details
    code, details = code_and_details(stub.Generate, pb.GenerateRequest(
        **GENERATE, adapters=[pb.AdapterRef(adapter_id=created.adapter_id, weight=-1)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("adapters[0].weight:")
    code, details = code_and_details(stub.CreateImagePrompt, pb.CreateImagePromptRequest(name="none", images=[]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("images:")
    code, details = code_and_details(stub.CreateImagePrompt, pb.CreateImagePromptRequest(name="misuse", images=photos))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, details = code_and_details(stub.Personalize, pb.PersonalizeRequest(method=pb.IMAGE_PROMPT, name="x",
                                                                             images=photos, class_word="circle"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "CreateImagePrompt" in details
    code, details = code_and_details(stub.Edit, pb.EditRequest(
        source_image=photos[0], source_prompt="a circle on a blue background",
        target_prompt="a circle on a blue background", adapter_id=created.adapter_id, method=pb.DREAMSTEERER))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("adapter_id:") and "method DDS" in details

    # Tokens made with another IP-Adapter file or image encoder are refused, naming both.
    store = gateway.gateway.servicer.adapter_store
    foreign = store.create("alice", "foreign", "IMAGE_PROMPT",
                           stored.serialize(ImagePrompt(torch.zeros(4, 48), torch.zeros(4, 48)), "another-model", 1))
    code, details = code_and_details(stub.Generate, pb.GenerateRequest(
        **GENERATE, adapters=[pb.AdapterRef(adapter_id=foreign.adapter_id)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "made for another IP-Adapter or image encoder (another-model)" in details


def test_a_model_without_an_ip_adapter_refuses_image_prompts_as_failed_precondition(tmp_path, tiny_pipe):
    from service.config import Settings
    from tests.conftest import TOKENS, free_port, start_gateway_in_thread, stop_gateway

    # Another model (the shipped IP-Adapter is for the embedded one only), no IP-Adapter configured.
    tiny_pipe.save_pretrained(tmp_path / "model")
    settings = Settings(host="127.0.0.1", grpc_port=0, metrics_port=free_port(), api_keys=dict(TOKENS),
                        data_dir=tmp_path / "data", model_dir=tmp_path / "model", unet_runtime="eager")
    assert settings.image_prompt_files() is None
    # The embedded model serves its own unless image prompts are switched off.
    assert Settings().image_prompt_files() is not None and Settings(image_prompts=False).image_prompt_files() is None
    running = start_gateway_in_thread(settings)
    try:
        stub = running.stub()
        assert not stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=auth()).image_prompts
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(**GENERATE, reference_images=[png(concept_photos(n=1)[0])]), metadata=auth())
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "serves no image prompts" in err.value.details() and "STEERSERVE_IMAGE_PROMPT_ADAPTER" in err.value.details()
    finally:
        stop_gateway(running)


def test_the_python_client_personalizes_in_one_request(gateway):
    from steerserve_client import Client

    with Client(gateway.address, "token-alice", tls=False) as client:
        result = client.generate(GENERATE["prompt"], steps=4, seed=11, guidance_scale=4.0,
                                 reference_images=concept_photos())
        stored = client.adapters.create_image_prompt("client-photos", concept_photos())
        again = client.generate(GENERATE["prompt"], steps=4, seed=11, guidance_scale=4.0, adapters=[stored.adapter_id])
        edited = client.edit(concept_photos("white-star", 1)[0], "a white star on a blue background",
                             "a star on a blue background", method="dds", steps=5, reference_images=concept_photos())
    assert result.images[0].data == again.images[0].data
    assert edited.image.data[:4] == b"\x89PNG"


@pytest.mark.parametrize("runtime", ["onnx", "compile"])
def test_compiled_runtimes_take_the_packed_image_prompts(runtime, tmp_path, one_torch_thread):
    """An engine whose IP-Adapter is installed before its runtime is configured: the runtime's one
    shape is the packed conditioning, and rows with and without image prompts and LoRAs equal eager."""
    import torch._dynamo

    from bench.common import serving_engine
    from service.adapters import parse_adapter
    from service.compiled import RuntimeOptions, configure_unet_runtime
    from service.compiled.torch_compile import CompiledUNet
    from service.engine.pipeline import AdapterUse
    from service.image_prompt.served import ServedImagePrompts
    from service.research.basemodel import DEFAULT_MODEL_DIR
    from service.research.image_prompt import SHIPPED_ADAPTER, SHIPPED_ENCODER

    lora = parse_adapter(lora_file(DEFAULT_MODEL_DIR, scale=0.5))
    eager, compiled = (serving_engine(DEFAULT_MODEL_DIR, {"lora": lora}, max_rows=4) for _ in range(2))
    for engine in (eager, compiled):
        ServedImagePrompts.from_files(engine, SHIPPED_ADAPTER, SHIPPED_ENCODER)
    torch._dynamo.reset()
    size = eager.limits.default_size // eager.vae_scale_factor
    if runtime == "onnx":
        configure_unet_runtime(compiled, RuntimeOptions(kind="onnx", cache_dir=tmp_path, threads=1))
    else:  # as configure_unet_runtime builds it, on aot_eager (inductor's CPU build takes minutes)
        compiled.unet_runtime = CompiledUNet(compiled.unet, buckets=(4,), backend="aot_eager", text_length=compiled.text_length)
        compiled.unet_runtime.warmup([(4, size, size)])
    assert compiled.unet_runtime.name == runtime
    prompt = eager.image_prompts.prompt(concept_photos(n=2))
    embeds = eager.encode_prompts(["a circle"] * 4, image_prompts=[prompt, None, prompt, None])
    assert embeds.shape[1] == eager.text_length == 77 + 5 * 4 + 1
    latents = torch.randn(4, eager.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([900, 900, 400, 400])
    rows = [(AdapterUse("lora"),), (AdapterUse("lora"),), (), ()]
    torch.testing.assert_close(compiled.predict_noise(latents, t, embeds, rows), eager.predict_noise(latents, t, embeds, rows),
                               rtol=0, atol=1e-4)
    torch._dynamo.reset()
