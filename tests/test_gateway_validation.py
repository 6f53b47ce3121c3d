"""Every validation error answers INVALID_ARGUMENT / NOT_FOUND naming the field; the server keeps serving."""

from __future__ import annotations

import io

import grpc
import pytest
from PIL import Image

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from tests.conftest import auth


def _png(w: int = 64, h: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def G(**kw) -> pb.GenerateRequest:
    kw.setdefault("prompt", "a red circle")
    return pb.GenerateRequest(**kw)


GENERATE_CASES = [
    (G(prompt=""), "prompt"),
    (G(prompt="   "), "prompt"),
    (G(prompt="red " * 100), "prompt"),
    (G(negative_prompt="blue " * 100), "negative_prompt"),
    (G(width=63), "width"),
    (G(height=20), "height"),
    (G(width=4096), "width"),
    (G(height=-8), "height"),
    (G(steps=-1), "steps"),
    (G(steps=10_000), "steps"),
    (G(guidance_scale=0.5), "guidance_scale"),
    (G(guidance_scale=float("nan")), "guidance_scale"),
    (G(guidance_scale=1000), "guidance_scale"),
    (G(num_images=99), "num_images"),
    (G(num_images=-1), "num_images"),
    (G(seed=-5), "seed"),
    (G(adapters=[pb.AdapterRef(adapter_id="")]), "adapters[0].adapter_id"),
    (G(adapters=[pb.AdapterRef(adapter_id="a"), pb.AdapterRef(adapter_id="a")]), "adapters[1].adapter_id"),
    (G(adapters=[pb.AdapterRef(adapter_id="a", weight=float("inf"))]), "adapters[0].weight"),
    (G(adapters=[pb.AdapterRef(adapter_id=f"a{i}") for i in range(9)]), "adapters"),
    (G(style_guidance_scale=-1), "style_guidance_scale"),
    (G(style_guidance_scale=float("nan")), "style_guidance_scale"),
    # Style guidance without a style adapter has nothing to guide with.
    (G(style_guidance_scale=2.0), "style_guidance_scale"),
    (G(sampler="heun"), "sampler"),
    (G(sampler="lcm", steps=60), "steps"),  # LCM's timesteps come from a 50-step schedule
    (G(sampler="euler_ancestral", karras_sigmas=True), "karras_sigmas"),
]


@pytest.mark.parametrize("request_, field", GENERATE_CASES, ids=[f for _, f in GENERATE_CASES])
def test_generate_invalid_argument_names_field(gateway, request_, field):
    with pytest.raises(grpc.RpcError) as err:
        gateway.stub().Generate(request_, metadata=auth())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(field + ":"), err.value.details()


def test_an_unknown_sampler_is_refused_naming_the_allowed_ones(gateway):
    with pytest.raises(grpc.RpcError) as err:
        gateway.stub().Generate(G(sampler="k_lms"), metadata=auth())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert all(name in err.value.details() for name in
               ("ddim", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lcm")), err.value.details()


def test_unknown_adapter_is_not_found(gateway):
    with pytest.raises(grpc.RpcError) as err:
        gateway.stub().Generate(G(adapters=[pb.AdapterRef(adapter_id="ad-doesnotexist")]), metadata=auth())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "adapters[0].adapter_id" in err.value.details()


def P(**kw) -> pb.PersonalizeRequest:
    kw.setdefault("method", pb.DREAMBOOTH_LORA)
    kw.setdefault("name", "my-dog")
    kw.setdefault("class_word", "dog")
    kw.setdefault("images", [pb.Image(data=_png()) for _ in range(3)])
    return pb.PersonalizeRequest(**kw)


def S(**kw) -> pb.PersonalizeRequest:
    """A FINESTYLE request: one style image, its concepts, the style phrase."""
    kw.setdefault("method", pb.FINESTYLE)
    kw.setdefault("name", "my-style")
    kw.setdefault("images", [pb.Image(data=_png())])
    kw.setdefault("concepts", [pb.Concept(phrase="a yellow star")])
    kw.setdefault("style_phrase", "in zwx style")
    return pb.PersonalizeRequest(**kw)


PERSONALIZE_CASES = [
    (P(method=pb.PERSONALIZATION_METHOD_UNSPECIFIED), "method"),
    (P(name=""), "name"),
    (P(name="x" * 500), "name"),
    (P(images=[pb.Image(data=_png())] * 2), "images"),
    (P(images=[pb.Image(data=_png())] * 6), "images"),
    (P(method=pb.FINESTYLE, images=[pb.Image(data=_png())] * 2), "images"),
    (S(images=[pb.Image(data=_png())] * 3), "images"),
    (S(concepts=[]), "concepts"),  # no concepts and no caption
    (S(style_phrase=""), "style_phrase"),
    (S(concepts=[pb.Concept(phrase="")]), "concepts[0].phrase"),
    (S(concepts=[pb.Concept(phrase="a star"), pb.Concept(phrase="a star")]), "concepts"),
    (S(concepts=[pb.Concept(phrase="a star", box=pb.Box(x0=10, y0=10, x1=80, y1=30))]), "concepts[0].box"),
    (S(concepts=[pb.Concept(phrase="a star"), pb.Concept(phrase="a ring", box=pb.Box(x0=30, y0=10, x1=20, y1=30))]),
     "concepts[1].box"),
    (S(concepts=[pb.Concept(phrase="a star", box=pb.Box(x0=-1, y0=0, x1=20, y1=30))]), "concepts[0].box"),
    (S(options=pb.TrainingOptions(prior_loss_weight=1.0)), "options.prior_loss_weight"),
    (S(token="sks"), "token"),
    (S(class_word="dog"), "class_word"),
    (S(style_phrase="in <zwx> style!"), "style_phrase"),
    (S(images=[pb.Image(data=_png(128, 64))],  # the centre square is x 32..96
       concepts=[pb.Concept(phrase="a star", box=pb.Box(x0=0, y0=0, x1=30, y1=20))]), "concepts[0].box"),
    (P(class_word=""), "class_word"),
    (P(images=[pb.Image(data=_png()), pb.Image(data=b"not an image"), pb.Image(data=_png())]), "images[1]"),
    (P(images=[pb.Image(data=_png()), pb.Image(data=b""), pb.Image(data=_png())]), "images[1]"),
    (P(images=[pb.Image(data=_png()), pb.Image(data=_png()), pb.Image(data=_png(4000, 4000))]), "images[2]"),
    (P(options=pb.TrainingOptions(steps=-3)), "options.steps"),
    (P(options=pb.TrainingOptions(rank=1000)), "options.rank"),
    (P(options=pb.TrainingOptions(learning_rate=5)), "options.learning_rate"),
]


@pytest.mark.parametrize("request_, field", PERSONALIZE_CASES, ids=[f for _, f in PERSONALIZE_CASES])
def test_personalize_invalid_argument_names_field(gateway, request_, field):
    with pytest.raises(grpc.RpcError) as err:
        gateway.stub().Personalize(request_, metadata=auth())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(field + ":"), err.value.details()


def E(**kw) -> pb.EditRequest:
    kw.setdefault("source_image", pb.Image(data=_png()))
    kw.setdefault("source_prompt", "a red circle")
    kw.setdefault("target_prompt", "a red square")
    kw.setdefault("method", pb.DDS)
    return pb.EditRequest(**kw)


EDIT_CASES = [
    (E(source_image=pb.Image(data=b"GIF89a....")), "source_image"),
    (E(source_prompt=""), "source_prompt"),
    (E(target_prompt=""), "target_prompt"),
    (E(method=pb.EDIT_METHOD_UNSPECIFIED), "method"),
    (E(method=pb.DREAMSTEERER, adapter_id=""), "adapter_id"),
    (E(steps=100000), "steps"),
]


@pytest.mark.parametrize("request_, field", EDIT_CASES, ids=[f for _, f in EDIT_CASES])
def test_edit_invalid_argument_names_field(gateway, request_, field):
    with pytest.raises(grpc.RpcError) as err:
        gateway.stub().Edit(request_, metadata=auth())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(field + ":"), err.value.details()


@pytest.mark.parametrize(
    "request_, field",
    [
        (pb.ImportAdapterRequest(name="", safetensors=b"x"), "name"),
        (pb.ImportAdapterRequest(name="a", safetensors=b""), "safetensors"),
        (pb.ImportAdapterRequest(name="a", safetensors=b"garbage bytes"), "safetensors"),
    ],
)
def test_import_adapter_invalid(gateway, request_, field):
    with pytest.raises(grpc.RpcError) as err:
        gateway.stub().ImportAdapter(request_, metadata=auth())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":")


@pytest.mark.parametrize("rpc, req", [
    ("GetAdapter", pb.GetAdapterRequest(adapter_id="")),
    ("GetJob", pb.GetJobRequest(job_id="")),
])
def test_empty_ids_are_invalid(gateway, rpc, req):
    with pytest.raises(grpc.RpcError) as err:
        getattr(gateway.stub(), rpc)(req, metadata=auth())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_ids_are_not_found(gateway):
    stub = gateway.stub()
    for call in (
        lambda: stub.GetAdapter(pb.GetAdapterRequest(adapter_id="ad-nope"), metadata=auth()),
        lambda: stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id="ad-nope"), metadata=auth()),
        lambda: stub.GetJob(pb.GetJobRequest(job_id="job-nope"), metadata=auth()),
        lambda: list(stub.WatchJob(pb.WatchJobRequest(job_id="job-nope"), metadata=auth())),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_oversized_message_is_refused_and_server_keeps_serving(gateway):
    stub = gateway.stub()
    big = b"\0" * (gateway.settings.max_request_bytes + 1024)
    with pytest.raises(grpc.RpcError) as err:
        stub.ImportAdapter(pb.ImportAdapterRequest(name="big", safetensors=big), metadata=auth())
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(stub.Generate(G(steps=1, seed=1), metadata=auth()).images) == 1
