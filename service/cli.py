"""`steerserve`: run the service, or call it.

    steerserve serve [--host H] [--grpc-port P] [--metrics-port M]
    steerserve generate "a red circle" -o out.png [--adapter ID[:WEIGHT]] [--seed 1] ...
    steerserve personalize --method dreambooth-lora --name my-dog --class-word dog a.png b.png c.png
    steerserve edit source.png --source-prompt ... --target-prompt ... --adapter ID -o edited.png
    steerserve adapters list|get|import|export|delete ...
    steerserve jobs list|get|watch|cancel ...

Client commands read the address from --address / STEERSERVE_ADDRESS and the token from --token /
STEERSERVE_TOKEN.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
from pathlib import Path

import grpc

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service._generated.steerserve.v1 import steerserve_pb2_grpc as pb_grpc


# -- serve ---------------------------------------------------------------------------------------


def cmd_serve(args) -> int:
    from service.config import Settings
    from service.gateway.server import ensure_dev_token, serve

    overrides = {k: v for k, v in dict(host=args.host, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                                       data_dir=args.data_dir, model_dir=args.model_dir,
                                       backend=args.backend).items() if v is not None}
    if args.dev:
        overrides["dev_token"] = True
    settings = Settings(**overrides)
    token = ensure_dev_token(settings)
    if not settings.api_keys:
        print("error: no API keys configured; set STEERSERVE_API_KEYS='token:tenant,...' or pass --dev", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def on_ready(gateway) -> None:
        address = f"{settings.host}:{gateway.port}"
        shown = token or "<your token>"
        print(f"SteerServe {pb.DESCRIPTOR.package} listening on {address} (model: {gateway.servicer.backend.model_name})")
        if gateway.metrics_port:
            print(f"Prometheus metrics: http://{settings.host}:{gateway.metrics_port}/metrics")
        triton = gateway.servicer.backend.server
        if triton is not None:
            print(f"Triton {triton.grpc_url} (gRPC), metrics {triton.metrics_url}, log {triton.log_path}")
        if token:
            print(f"Development token (tenant 'dev'): {token}")
        print("Try it from another shell:")
        print(f"  export STEERSERVE_ADDRESS={address} STEERSERVE_TOKEN={shown}")
        print('  .venv/bin/steerserve generate "a red dotted star on a blue striped background" -o star.png')
        print("Press Ctrl-C to stop.", flush=True)
        if args.demo and token:
            threading.Thread(target=_demo_call, args=(address, token, settings.data_dir), daemon=True).start()

    asyncio.run(serve(settings, on_ready=on_ready))
    return 0


def _demo_call(address: str, token: str, data_dir) -> None:
    """Shows the service working: one Generate through the public gRPC API, like any client."""
    prompt = "a red dotted star on a blue striped background"
    stub = pb_grpc.SteerServeStub(_channel(address))
    try:
        resp = stub.Generate(pb.GenerateRequest(prompt=prompt, seed=0), metadata=[("authorization", f"Bearer {token}")],
                             timeout=300)
    except grpc.RpcError as err:
        print(f"demo call failed: {err.code().name}: {err.details()}", flush=True)
        return
    out = Path(data_dir) / "demo.png"
    out.write_bytes(resp.images[0].data)
    print(f"Demo: Generate({prompt!r}) over gRPC -> {out} ({resp.images[0].width}x{resp.images[0].height}, "
          f"{resp.timings.total_seconds:.2f} s)", flush=True)


# -- client plumbing -----------------------------------------------------------------------------


def _channel(address: str, options=()) -> grpc.Channel:
    """TLS when STEERSERVE_CLIENT_TLS=1 or any STEERSERVE_CLIENT_* file is set (the CA that signed the
    server's certificate, else the system's roots; a client certificate and key for mutual TLS);
    plaintext otherwise."""
    env = os.environ
    ca, cert, key = (env.get(f"STEERSERVE_CLIENT_{n}_FILE") for n in ("CA", "CERT", "KEY"))
    if bool(cert) != bool(key):
        raise SystemExit("error: STEERSERVE_CLIENT_CERT_FILE and STEERSERVE_CLIENT_KEY_FILE go together")
    if not (ca or cert or env.get("STEERSERVE_CLIENT_TLS", "") in ("1", "true", "yes")):
        return grpc.insecure_channel(address, options=list(options))
    credentials = grpc.ssl_channel_credentials(
        Path(ca).read_bytes() if ca else None, private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None)
    return grpc.secure_channel(address, credentials, options=list(options))


def _stub(args) -> tuple[pb_grpc.SteerServeStub, list[tuple[str, str]]]:
    token = args.token or os.environ.get("STEERSERVE_TOKEN")
    if not token:
        raise SystemExit("error: no token; pass --token or set STEERSERVE_TOKEN")
    limit = 64 * 1024 * 1024
    channel = _channel(args.address,
                       options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)])
    return pb_grpc.SteerServeStub(channel), [("authorization", f"Bearer {token}")]


def _with_spinner(label: str, call):
    """Runs a blocking unary call while a progress bar shows elapsed time."""
    from tqdm import tqdm

    done = threading.Event()
    result: dict = {}

    def run():
        try:
            result["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    with tqdm(desc=label, bar_format="{desc}: {elapsed}", file=sys.stderr) as bar:
        while not done.wait(0.2):
            bar.refresh()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _read_image(path: str) -> pb.Image:
    return pb.Image(data=Path(path).read_bytes())


def _adapter_refs(values: list[str]) -> list[pb.AdapterRef]:
    refs = []
    for value in values or []:
        adapter_id, _, weight = value.partition(":")
        refs.append(pb.AdapterRef(adapter_id=adapter_id, weight=float(weight) if weight else 1.0))
    return refs


def _write_images(images, output: str) -> None:
    out = Path(output)
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}")
        path.write_bytes(image.data)
        print(f"wrote {path} ({image.width}x{image.height})")


# -- client commands -----------------------------------------------------------------------------


def cmd_generate(args) -> int:
    stub, md = _stub(args)
    req = pb.GenerateRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, adapters=_adapter_refs(args.adapter),
        steps=args.steps, guidance_scale=args.guidance_scale, width=args.width, height=args.height,
        num_images=args.num_images, style_guidance_scale=args.style_guidance_scale,
    )
    if args.seed is not None:
        req.seed = args.seed
    resp = _with_spinner("generating", lambda: stub.Generate(req, metadata=md, timeout=args.timeout))
    _write_images(resp.images, args.output)
    print(f"seeds {list(resp.seeds)}; server time {resp.timings.total_seconds:.2f} s")
    return 0


def _concept(text: str) -> pb.Concept:
    """'a yellow star' or 'a yellow star@x0,y0,x1,y1' (its box in the image's pixels)."""
    phrase, _, box = text.partition("@")
    concept = pb.Concept(phrase=phrase.strip())
    if box:
        try:
            x0, y0, x1, y1 = (int(v) for v in box.split(","))
        except ValueError:
            raise SystemExit(f"--concept {text!r}: the box must be four integers, 'PHRASE@x0,y0,x1,y1'") from None
        concept.box.CopyFrom(pb.Box(x0=x0, y0=y0, x1=x1, y1=y1))
    return concept


def cmd_personalize(args) -> int:
    stub, md = _stub(args)
    method = args.method.upper().replace("-", "_")
    options = pb.TrainingOptions(steps=args.steps, rank=args.rank, learning_rate=args.learning_rate,
                                 batch_size=args.batch_size)
    if args.prior_loss_weight is not None:  # unset: the model profile's
        options.prior_loss_weight = args.prior_loss_weight
    if args.train_text_encoder is not None:
        options.train_text_encoder = args.train_text_encoder
    if args.seed is not None:
        options.seed = args.seed
    req = pb.PersonalizeRequest(
        method=pb.PersonalizationMethod.Value(method), name=args.name, class_word=args.class_word,
        images=[_read_image(p) for p in args.images], style_phrase=args.style_phrase,
        concepts=[_concept(c) for c in args.concept or []], token=args.concept_token or "", options=options,
    )
    job = stub.Personalize(req, metadata=md, timeout=args.timeout)
    if req.method == pb.FINESTYLE:
        print(f"job {job.job_id} {pb.JobState.Name(job.state)}: style phrase {job.token!r}, "
              f"prompt '<anything> {job.token}' with --style-guidance-scale 2", flush=True)
    else:
        print(f"job {job.job_id} {pb.JobState.Name(job.state)}: token {job.token!r}, "
              f"prompt 'a {job.token} {job.class_word}'", flush=True)
    if args.no_wait:
        return 0
    return _watch(stub, md, job.job_id, args.previews)


def _watch(stub, md, job_id: str, previews: str | None = None) -> int:
    """Follows WatchJob with a progress bar (step, loss, ETA) until the job ends."""
    from tqdm import tqdm

    bar = None
    job = None
    for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=md):
        job = event.job
        if bar is None and event.total_steps:
            bar = tqdm(total=event.total_steps, desc="training", file=sys.stderr,
                       bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}{postfix}]")
        if bar is not None:
            bar.n = event.step
            postfix = {"loss": f"{event.loss:.4f}", "state": pb.JobState.Name(event.state)}
            if event.eta_seconds:
                postfix["eta"] = f"{event.eta_seconds:.0f}s"
            if event.message and event.state != pb.RUNNING or "resumed" in event.message:
                postfix["note"] = event.message
            bar.set_postfix(postfix)
            bar.refresh()
    if bar is not None:
        bar.close()
    if job is None:
        return 1
    print(f"job {job.job_id} {pb.JobState.Name(job.state)}" + (f": adapter {job.adapter_id}" if job.adapter_id else "")
          + (f": {job.error}" if job.error else ""))
    if previews and job.previews:
        out = Path(previews)
        out.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(job.previews):
            (out / f"{job.job_id}-{i}.png").write_bytes(image.data)
        print(f"wrote {len(job.previews)} previews to {out}/")
    if job.state == pb.SUCCEEDED and job.method == pb.FINESTYLE:
        print(f"use it: steerserve generate \"a blue square {job.token}\" --adapter {job.adapter_id} "
              "--style-guidance-scale 2")
    elif job.state == pb.SUCCEEDED:
        print(f"use it: steerserve generate \"a {job.token} {job.class_word} on a ...\" --adapter {job.adapter_id}")
    return 0 if job.state == pb.SUCCEEDED else 1


_EDIT_SWITCHES = ("edsd", "mode_shifting", "bias_correction", "use_subject_mask")


def cmd_edit(args) -> int:
    """Streams the edit (EditStream) with a progress bar over its phases; writes the image and,
    with DreamSteerer's subject mask, `<output>-mask.png` beside it."""
    from tqdm import tqdm

    stub, md = _stub(args)
    options = pb.EditOptions(learning_rate=args.learning_rate, steer_steps=args.steer_steps)
    for name in args.disable or []:
        setattr(options, name, False)
    req = pb.EditRequest(
        source_image=_read_image(args.source), source_prompt=args.source_prompt, target_prompt=args.target_prompt,
        adapter_id=args.adapter or "", method=pb.EditMethod.Value(args.method.upper()), steps=args.steps,
        guidance_scale=args.guidance_scale, options=options,
    )
    if args.seed is not None:
        req.seed = args.seed
    result = None
    with tqdm(total=100, desc="editing", file=sys.stderr,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}{postfix}]") as bar:
        for event in stub.EditStream(req, metadata=md, timeout=args.timeout):
            bar.n = round(100 * event.progress)
            bar.set_postfix({"phase": event.phase, "step": f"{event.step}/{event.total_steps}"})
            bar.refresh()
            if event.HasField("result"):
                result = event.result
    if result is None:
        print("error: the stream ended without a result", file=sys.stderr)
        return 1
    _write_images([result.image], args.output)
    if result.mask.data:
        mask_path = Path(args.output).with_name(Path(args.output).stem + "-mask.png")
        mask_path.write_bytes(result.mask.data)
        print(f"wrote the subject mask to {mask_path}")
    t = result.timings
    print(f"seed {result.seed}; server time {t.total_seconds:.1f} s (mask {t.mask_seconds:.1f}, guided samples "
          f"{t.guided_seconds:.1f}, steering {t.steer_seconds:.1f}, DDS {t.denoise_seconds:.1f})")
    return 0


def _print_adapter(a: pb.Adapter) -> None:
    print(f"{a.adapter_id}  {a.name:<24} {pb.PersonalizationMethod.Name(a.method):<18} token={a.token or '-'} "
          f"rank={a.rank} {a.size_bytes} B")


def cmd_adapters(args) -> int:
    stub, md = _stub(args)
    if args.action == "list":
        for a in stub.ListAdapters(pb.ListAdaptersRequest(), metadata=md).adapters:
            _print_adapter(a)
    elif args.action == "get":
        _print_adapter(stub.GetAdapter(pb.GetAdapterRequest(adapter_id=args.id), metadata=md))
    elif args.action == "import":
        a = stub.ImportAdapter(
            pb.ImportAdapterRequest(name=args.name, safetensors=Path(args.file).read_bytes(), token=args.token or ""),
            metadata=md,
        )
        _print_adapter(a)
    elif args.action == "export":
        resp = stub.ExportAdapter(pb.ExportAdapterRequest(adapter_id=args.id), metadata=md)
        Path(args.output).write_bytes(resp.safetensors)
        print(f"wrote {args.output} ({len(resp.safetensors)} bytes)")
    elif args.action == "delete":
        stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id=args.id), metadata=md)
        print(f"deleted {args.id}")
    return 0


def cmd_jobs(args) -> int:
    stub, md = _stub(args)
    if args.action == "list":
        for j in stub.ListJobs(pb.ListJobsRequest(), metadata=md).jobs:
            _print_job(j)
        return 0
    if args.action == "watch":
        return _watch(stub, md, args.id)
    call = stub.GetJob if args.action == "get" else stub.CancelJob
    request = pb.GetJobRequest(job_id=args.id) if args.action == "get" else pb.CancelJobRequest(job_id=args.id)
    _print_job(call(request, metadata=md))
    return 0


def _print_job(j: pb.Job) -> None:
    eta = f" eta {j.eta_seconds:.0f}s" if j.eta_seconds else ""
    print(f"{j.job_id}  {j.name:<20} {pb.PersonalizationMethod.Name(j.method):<18} {pb.JobState.Name(j.state):<10} "
          f"{j.step}/{j.total_steps} ({j.progress:.0%}){eta}  token={j.token or '-'}"
          + (f"  adapter={j.adapter_id}" if j.adapter_id else "") + (f"  {j.error or j.message}" if j.error or j.message else ""))


def cmd_info(args) -> int:
    stub, md = _stub(args)
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=md, timeout=args.timeout)
    print(f"steerserve {info.version}, backend {info.backend}, base model {info.base_model}")
    print(f"images: default {info.default_width}x{info.default_height}, at most {info.max_width}x{info.max_height}, "
          f"{info.default_steps} steps by default (at most {info.max_steps}), at most {info.max_num_images} per request")
    p = info.profile
    print(f"model profile: {p.name} (chosen by {p.chosen_by}): {p.description}")
    print(f"  edit: guidance {p.edit_guidance_scale:g}")
    for d in p.training:
        extra = (f", prior {d.prior_loss_weight:g} x {d.num_class_images} class images" if d.prior_loss_weight else "") + \
                (", + text encoder" if d.train_text_encoder else "")
        rank = f", rank {d.rank}" if d.rank else ""
        print(f"  {pb.PersonalizationMethod.Name(d.method):<18} {d.steps} steps, lr {d.learning_rate:g}, "
              f"batch {d.batch_size}{rank}{extra}  [{d.source}]")
    return 0


# -- argument parsing ----------------------------------------------------------------------------


def cmd_hash_token(args) -> int:
    from service.keys import DIGEST_PREFIX, token_digest

    token = sys.stdin.readline().strip()
    if not token:
        print("error: give the token on standard input", file=sys.stderr)
        return 2
    print(DIGEST_PREFIX + token_digest(token).hex())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steerserve", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gRPC gateway (in-process engine or Triton) and metrics endpoint")
    s.add_argument("--host", help="bind address (env STEERSERVE_HOST, default 127.0.0.1)")
    s.add_argument("--grpc-port", type=int, help="gRPC port (env STEERSERVE_GRPC_PORT, default 50051)")
    s.add_argument("--metrics-port", type=int, help="Prometheus port, 0 = off (env STEERSERVE_METRICS_PORT, default 9464)")
    s.add_argument("--data-dir", help="database, adapters and model cache (env STEERSERVE_DATA_DIR, default ./var)")
    s.add_argument("--model-dir", help="diffusers SD 1.x/2.x folder (env STEERSERVE_MODEL_DIR; default: embedded model)")
    s.add_argument("--backend", choices=["inprocess", "triton"],
                   help="inprocess (default) or triton: start the embedded Triton server on loopback ports "
                        "(or use STEERSERVE_TRITON_URL) (env STEERSERVE_BACKEND)")
    s.add_argument("--dev", action="store_true", help="create and print a development token if no keys are set")
    s.add_argument("--demo", action="store_true", help="with --dev: make one Generate call once ready, save var/demo.png")
    s.set_defaults(func=cmd_serve)

    h = sub.add_parser("hash-token", help="print the sha256 digest of an API token (read from stdin) for "
                                          "STEERSERVE_API_KEYS, so configs need not hold the token itself")
    h.set_defaults(func=cmd_hash_token)

    def client(name, help_text):
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--address", default=os.environ.get("STEERSERVE_ADDRESS", "127.0.0.1:50051"))
        c.add_argument("--token", help="API token (env STEERSERVE_TOKEN)")
        c.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds")
        return c

    g = client("generate", "text to image")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", default="out.png")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--adapter", action="append", help="ADAPTER_ID[:WEIGHT], repeatable")
    g.add_argument("--steps", type=int, default=0)
    g.add_argument("--guidance-scale", type=float, default=0.0)
    g.add_argument("--width", type=int, default=0)
    g.add_argument("--height", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("-n", "--num-images", type=int, default=1)
    g.add_argument("--style-guidance-scale", type=float, default=0.0,
                   help="FineStyle adapters: > 0 separates the style's guidance from the prompt's (e.g. 2)")
    g.set_defaults(func=cmd_generate)

    t = client("personalize", "train an adapter from photos (subject) or one image (style)")
    t.add_argument("images", nargs="+")
    t.add_argument("--method", default="dreambooth-lora",
                   choices=["dreambooth-lora", "textual-inversion", "custom-diffusion", "finestyle"])
    t.add_argument("--name", required=True)
    t.add_argument("--class-word", default="")
    t.add_argument("--style-phrase", default="")
    t.add_argument("--concept", action="append",
                   help="FineStyle: a phrase naming an object of the style image, optionally with its box "
                        "('a yellow star@4,6,30,32'); repeatable")
    t.add_argument("--concept-token", help="the word that will invoke the concept (default: a free rare word)")
    t.add_argument("--steps", type=int, default=0, help="0: the method's default")
    t.add_argument("--rank", type=int, default=0)
    t.add_argument("--learning-rate", type=float, default=0.0)
    t.add_argument("--batch-size", type=int, default=0)
    t.add_argument("--seed", type=int)
    t.add_argument("--prior-loss-weight", type=float, default=None,
                   help="prior preservation with the base model's own class images (0: off; unset: the model profile's)")
    t.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="dreambooth-lora: LoRA on the text encoder too (unset: the model profile's)")
    t.add_argument("--previews", metavar="DIR", help="save the finished job's preview images here")
    t.add_argument("--no-wait", action="store_true", help="print the job id and return (watch with 'jobs watch')")
    t.set_defaults(func=cmd_personalize)

    e = client("edit", "edit a source image toward an adapter's concept (progress bar)")
    e.add_argument("source")
    e.add_argument("--source-prompt", required=True, help="what the source shows")
    e.add_argument("--target-prompt", required=True, help="what it should show, naming the adapter's token")
    e.add_argument("--adapter", help="the subject adapter's id (required by dreamsteerer)")
    e.add_argument("--method", default="dreamsteerer", choices=["dds", "dreamsteerer"])
    e.add_argument("--steps", type=int, default=0, help="DDS iterations (0: 200)")
    e.add_argument("--guidance-scale", type=float, default=0.0)
    e.add_argument("--learning-rate", type=float, default=0.0, help="DDS step on the latent (0: 0.05)")
    e.add_argument("--steer-steps", type=int, default=0, help="dreamsteerer: steering iterations (0: 30)")
    e.add_argument("--disable", nargs="+", choices=_EDIT_SWITCHES, help="dreamsteerer: turn parts off (ablations)")
    e.add_argument("--seed", type=int)
    e.add_argument("-o", "--output", default="edited.png")
    e.set_defaults(func=cmd_edit)

    a = client("adapters", "list, inspect, import, export or delete adapters")
    a_sub = a.add_subparsers(dest="action", required=True)
    a_sub.add_parser("list")
    for action in ("get", "delete"):
        a_sub.add_parser(action).add_argument("id")
    ex = a_sub.add_parser("export")
    ex.add_argument("id")
    ex.add_argument("-o", "--output", required=True)
    im = a_sub.add_parser("import")
    im.add_argument("file")
    im.add_argument("--name", required=True)
    im.add_argument("--token")
    a.set_defaults(func=cmd_adapters)

    i = client("info", "the server's version, limits and model profile (its training and editing defaults)")
    i.set_defaults(func=cmd_info)

    j = client("jobs", "list, inspect, watch or cancel personalization jobs")
    j_sub = j.add_subparsers(dest="action", required=True)
    j_sub.add_parser("list")
    for action in ("get", "watch", "cancel"):
        j_sub.add_parser(action).add_argument("id")
    j.set_defaults(func=cmd_jobs)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
