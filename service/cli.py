"""`steerserve`: run the service, or call it.

    steerserve serve [--host H] [--grpc-port P] [--metrics-port M]
    steerserve prepare-runtime [--model-dir D]     # measure the UNet runtime choice ahead of serving
    steerserve convert-checkpoint FILE DIR         # a single-file checkpoint -> a diffusers folder, once
    steerserve generate "a red circle" -o out.png [--adapter ID[:WEIGHT]] [--reference photo.png] [--seed 1] ...
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
import os
import sys
import threading
from pathlib import Path

from steerserve_client import Client, ConfigError, JobFailed, SteerServeError, Timeouts
from steerserve_client import pb


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
    from service.tracing import setup_logging

    setup_logging(settings.log_format, access_log=settings.access_log)  # text or JSON lines, request/trace ids

    def on_ready(gateway) -> None:
        address = f"{settings.host}:{gateway.port}"
        shown = token or "<your token>"
        print(f"SteerServe {pb.DESCRIPTOR.package} listening on {address} (model: {gateway.servicer.backend.model_name})")
        engine = getattr(gateway.servicer.backend, "engine", None)
        if engine is not None and engine.unet_runtime_choice is not None:
            from service.compiled.configure import runtime_status

            print(runtime_status(engine))
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

    from service.engine.families import UnsupportedModel

    try:
        asyncio.run(serve(settings, on_ready=on_ready))
    except (UnsupportedModel, FileNotFoundError) as err:  # the model folder: one line, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _demo_call(address: str, token: str, data_dir) -> None:
    """Shows the service working: one Generate through the public gRPC API, like any client."""
    prompt = "a red dotted star on a blue striped background"
    try:
        with Client(address, token, tls=False) as client:
            result = client.generate(prompt, seed=0)
    except SteerServeError as err:
        print(f"demo call failed: {err}", flush=True)
        return
    image = result.images[0]
    out = image.save(Path(data_dir) / "demo.png")
    print(f"Demo: Generate({prompt!r}) over gRPC -> {out} ({image.width}x{image.height}, "
          f"{result.timings.total_seconds:.2f} s)", flush=True)


# -- client commands: through the Python client (clients/python), like any caller ------------------


def _client(args) -> Client:
    """Address and token from the flags, else STEERSERVE_ADDRESS / STEERSERVE_TOKEN; TLS from the
    STEERSERVE_CLIENT_* settings (steerserve_client._connection)."""
    try:
        return Client(args.address, args.token, timeouts=Timeouts(*(args.timeout,) * 4))
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


def _with_spinner(label: str, call):
    """Runs a blocking call while a progress bar shows elapsed time."""
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


def _adapter_refs(values: list[str]) -> list[tuple[str, float]]:
    refs = []
    for value in values or []:
        adapter_id, _, weight = value.partition(":")
        refs.append((adapter_id, float(weight) if weight else 0.0))  # 0: the server's default
    return refs


def _write_images(images, output: str) -> None:
    out = Path(output)
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}")
        image.save(path)
        print(f"wrote {path} ({image.width}x{image.height})")


def cmd_generate(args) -> int:
    with _client(args) as client:
        result = _with_spinner("generating", lambda: client.generate(
            args.prompt, adapters=_adapter_refs(args.adapter), negative_prompt=args.negative_prompt, steps=args.steps,
            guidance_scale=args.guidance_scale, width=args.width, height=args.height, seed=args.seed,
            num_images=args.num_images, style_guidance_scale=args.style_guidance_scale, sampler=args.sampler,
            karras_sigmas=args.karras_sigmas, reference_images=[Path(f) for f in args.reference or []],
            image_prompt_scale=args.image_prompt_scale))
    _write_images(result.images, args.output)
    print(f"seeds {result.seeds}; server time {result.timings.total_seconds:.2f} s")
    return 0


def _concept(text: str):
    """'a yellow star' or 'a yellow star@x0,y0,x1,y1' (its box in the image's pixels)."""
    phrase, _, box = text.partition("@")
    if not box:
        return phrase.strip()
    try:
        x0, y0, x1, y1 = (int(v) for v in box.split(","))
    except ValueError:
        raise SystemExit(f"--concept {text!r}: the box must be four integers, 'PHRASE@x0,y0,x1,y1'") from None
    return phrase.strip(), (x0, y0, x1, y1)


def cmd_personalize(args) -> int:
    with _client(args) as client:
        handle = client.personalize(
            args.method, args.name, [Path(p) for p in args.images], class_word=args.class_word,
            style_phrase=args.style_phrase, concepts=[_concept(c) for c in args.concept or []],
            token=args.concept_token or "", steps=args.steps, rank=args.rank, learning_rate=args.learning_rate,
            batch_size=args.batch_size, seed=args.seed, prior_loss_weight=args.prior_loss_weight,
            train_text_encoder=args.train_text_encoder, idempotency_key=args.idempotency_key)
        job = handle.job
        if job.method == "FINESTYLE":
            print(f"job {job.job_id} {job.state}: style phrase {job.token!r}, "
                  f"prompt '<anything> {job.token}' with --style-guidance-scale 2", flush=True)
        else:
            print(f"job {job.job_id} {job.state}: token {job.token!r}, prompt 'a {job.token} {job.class_word}'",
                  flush=True)
        if args.no_wait:
            return 0
        return _watch(handle, args.previews)


def _watch(handle, previews: str | None = None) -> int:
    """Follows the job (WatchJob) with a progress bar (step, loss, ETA) until it ends."""
    from tqdm import tqdm

    bar = None

    def progress(event) -> None:
        nonlocal bar
        if bar is None and event.total_steps:
            bar = tqdm(total=event.total_steps, desc="training", file=sys.stderr,
                       bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}{postfix}]")
        if bar is not None:
            bar.n = event.step
            postfix = {"loss": f"{event.loss:.4f}", "state": event.state}
            if event.eta_seconds:
                postfix["eta"] = f"{event.eta_seconds:.0f}s"
            if event.message and event.state != "RUNNING" or "resumed" in event.message:
                postfix["note"] = event.message
            bar.set_postfix(postfix)
            bar.refresh()

    try:
        job = handle.wait(progress=progress)
    except JobFailed as failed:
        job = failed.job
    finally:
        if bar is not None:
            bar.close()
    print(f"job {job.job_id} {job.state}" + (f": adapter {job.adapter_id}" if job.adapter_id else "")
          + (f": {job.error}" if job.error else ""))
    if previews and job.previews:
        out = Path(previews)
        out.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(job.previews):
            image.save(out / f"{job.job_id}-{i}.png")
        print(f"wrote {len(job.previews)} previews to {out}/")
    if job.state == "SUCCEEDED" and job.method == "FINESTYLE":
        print(f"use it: steerserve generate \"a blue square {job.token}\" --adapter {job.adapter_id} "
              "--style-guidance-scale 2")
    elif job.state == "SUCCEEDED":
        print(f"use it: steerserve generate \"a {job.token} {job.class_word} on a ...\" --adapter {job.adapter_id}")
    return 0 if job.state == "SUCCEEDED" else 1


_EDIT_SWITCHES = ("edsd", "mode_shifting", "bias_correction", "use_subject_mask")


def cmd_edit(args) -> int:
    """Streams the edit (EditStream) with a progress bar over its phases; writes the image and,
    with DreamSteerer's subject mask, `<output>-mask.png` beside it."""
    from tqdm import tqdm

    options = {"learning_rate": args.learning_rate, "steer_steps": args.steer_steps}
    options.update({name: False for name in args.disable or []})
    with _client(args) as client, tqdm(total=100, desc="editing", file=sys.stderr,
                                       bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}{postfix}]") as bar:
        def progress(event) -> None:
            bar.n = round(100 * event.progress)
            bar.set_postfix({"phase": event.phase, "step": f"{event.step}/{event.total_steps}"})
            bar.refresh()

        result = client.edit(Path(args.source), args.source_prompt, args.target_prompt, adapter_id=args.adapter or "",
                             method=args.method, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                             options=options, progress=progress, reference_images=[Path(f) for f in args.reference or []],
                             image_prompt_scale=args.image_prompt_scale)
    _write_images([result.image], args.output)
    if result.mask is not None:
        mask_path = result.mask.save(Path(args.output).with_name(Path(args.output).stem + "-mask.png"))
        print(f"wrote the subject mask to {mask_path}")
    t = result.timings
    print(f"seed {result.seed}; server time {t.total_seconds:.1f} s (mask {t.mask_seconds:.1f}, guided samples "
          f"and preliminary edit {t.guided_seconds:.1f}, steering {t.steer_seconds:.1f}, DDS {t.denoise_seconds:.1f})")
    return 0


def _print_adapter(a) -> None:
    print(f"{a.adapter_id}  {a.name:<24} {a.method:<18} token={a.token or '-'} rank={a.rank} {a.size_bytes} B")
    if a.contents is not None:  # an import: what the server read from the file
        c = a.contents
        print(f"  layout: {c.layout or '-'}")
        for part in c.components:
            convs = f" ({part.conv_modules} conv)" if part.conv_modules else ""
            print(f"  {part.component:<15} {part.modules} modules{convs}, rank {'/'.join(map(str, part.ranks))}, "
                  f"alpha {'/'.join(f'{x:g}' for x in part.alphas)}")
        for token, vectors in c.tokens.items():
            print(f"  token {token}: {vectors} vector{'s' if vectors != 1 else ''}")


def cmd_adapters(args) -> int:
    with _client(args) as client:
        if args.action == "list":
            for a in client.adapters.list():
                _print_adapter(a)
        elif args.action == "get":
            _print_adapter(client.adapters.get(args.id))
        elif args.action == "import":
            _print_adapter(client.adapters.import_(args.name, Path(args.file), token=args.word or "",
                                                   idempotency_key=args.idempotency_key))
        elif args.action == "create-image-prompt":
            _print_adapter(client.adapters.create_image_prompt(args.name, [Path(f) for f in args.photos]))
        elif args.action == "export":
            _, data = client.adapters.export(args.id)
            Path(args.output).write_bytes(data)
            print(f"wrote {args.output} ({len(data)} bytes)")
        elif args.action == "delete":
            client.adapters.delete(args.id)
            print(f"deleted {args.id}")
    return 0


def cmd_jobs(args) -> int:
    with _client(args) as client:
        if args.action == "list":
            for j in client.jobs.list():
                _print_job(j)
            return 0
        if args.action == "watch":
            return _watch(client.jobs.handle(args.id))
        _print_job(client.jobs.get(args.id) if args.action == "get" else client.jobs.cancel(args.id))
    return 0


def _print_job(j) -> None:
    eta = f" eta {j.eta_seconds:.0f}s" if j.eta_seconds else ""
    print(f"{j.job_id}  {j.name:<20} {j.method:<18} {j.state:<10} {j.step}/{j.total_steps} ({j.progress:.0%}){eta}  "
          f"token={j.token or '-'}" + (f"  adapter={j.adapter_id}" if j.adapter_id else "")
          + (f"  {j.error or j.message}" if j.error or j.message else ""))


def cmd_info(args) -> int:
    with _client(args) as client:
        info = client.info()
    print(f"steerserve {info.version}, backend {info.backend}, base model {info.base_model}")
    print(f"images: default {info.default_width}x{info.default_height}, at most {info.max_width}x{info.max_height}, "
          f"{info.default_steps} steps by default (at most {info.max_steps}), at most {info.max_num_images} per request")
    p = info.profile
    if info.unet_runtime:
        print(f"UNet runtime: {info.unet_runtime_choice or info.unet_runtime}")
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


def cmd_prepare_runtime(args) -> int:
    """Measures the `auto` UNet runtime choice now and builds its artefacts into the compiled folder
    (at image build, by a Kubernetes Job, or on a shared volume), so that servers starting on this
    hardware find them: they serve eager at once and switch to the cached winner in seconds."""
    from service.config import Settings
    from service.serving import build_engine

    overrides = {k: v for k, v in dict(data_dir=args.data_dir, model_dir=args.model_dir).items() if v is not None}
    settings = Settings(**overrides, unet_runtime="auto", unet_runtime_measure="blocking")
    import torch

    torch.set_num_threads(settings.torch_threads)
    # The row tables the servers use: the in-process engine's (4 rows per image) and Triton's
    # generate/unet models' (model_repo: 64).
    from prometheus_client import CollectorRegistry

    # With an IP-Adapter the in-process engine and `generate` run the UNet with it (packed
    # conditioning), Triton's `unet` model without: each is its own measurement.
    variants = (True, False) if settings.image_prompt_files() is not None else (False,)
    for rows in args.rows or sorted({4 * settings.max_num_images, 64}):
        for image_prompts in variants:
            engine = build_engine(settings, rows, registry=CollectorRegistry(),  # (each engine's bank series apart)
                                  image_prompts=image_prompts)
            print(f"{rows} rows{' (image prompts)' if image_prompts else ''}: {engine.unet_runtime_choice.describe()}",
                  flush=True)
    return 0


def cmd_hash_token(args) -> int:
    from service.keys import DIGEST_PREFIX, token_digest

    token = sys.stdin.readline().strip()
    if not token:
        print("error: give the token on standard input", file=sys.stderr)
        return 2
    print(DIGEST_PREFIX + token_digest(token).hex())
    return 0


def cmd_convert_checkpoint(args) -> int:
    """Writes the diffusers folder of a single-file checkpoint (service/engine/checkpoints.py), so
    that servers start from the folder; STEERSERVE_MODEL_DIR may also name the file itself."""
    from service.engine.checkpoints import CheckpointError, convert_checkpoint

    try:
        converted = convert_checkpoint(args.file, args.dir, prediction_type=args.prediction_type)
    except (CheckpointError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {converted.folder}: {converted.describe()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steerserve", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gRPC gateway (in-process engine or Triton) and metrics endpoint")
    s.add_argument("--host", help="bind address (env STEERSERVE_HOST, default 127.0.0.1)")
    s.add_argument("--grpc-port", type=int, help="gRPC port (env STEERSERVE_GRPC_PORT, default 50051)")
    s.add_argument("--metrics-port", type=int, help="Prometheus port, 0 = off (env STEERSERVE_METRICS_PORT, default 9464)")
    s.add_argument("--data-dir", help="database, adapters and model cache (env STEERSERVE_DATA_DIR, default ./var)")
    s.add_argument("--model-dir", help="diffusers SD 1.x/2.x/XL folder or single-file .safetensors checkpoint (env STEERSERVE_MODEL_DIR; default: embedded model)")
    s.add_argument("--backend", choices=["inprocess", "triton"],
                   help="inprocess (default) or triton: start the embedded Triton server on loopback ports "
                        "(or use STEERSERVE_TRITON_URL) (env STEERSERVE_BACKEND)")
    s.add_argument("--dev", action="store_true", help="create and print a development token if no keys are set")
    s.add_argument("--demo", action="store_true", help="with --dev: make one Generate call once ready, save var/demo.png")
    s.set_defaults(func=cmd_serve)

    r = sub.add_parser("prepare-runtime", help="measure the auto UNet runtime choice and build its artefacts into "
                                               "the compiled folder now (image build, a Job, a shared volume)")
    r.add_argument("--data-dir", help="where the compiled folder is (env STEERSERVE_DATA_DIR, default ./var)")
    r.add_argument("--model-dir", help="diffusers folder or single-file checkpoint (env STEERSERVE_MODEL_DIR; default: embedded model)")
    r.add_argument("--rows", type=int, action="append", help="bank rows to prepare for (default: in-process and Triton's)")
    r.set_defaults(func=cmd_prepare_runtime)

    h = sub.add_parser("hash-token", help="print the sha256 digest of an API token (read from stdin) for "
                                          "STEERSERVE_API_KEYS, so configs need not hold the token itself")
    h.set_defaults(func=cmd_hash_token)

    cc = sub.add_parser("convert-checkpoint", help="write the diffusers folder of a single-file SD 1.x/2.x/XL "
                                                   "checkpoint (.safetensors), offline, for faster starts")
    cc.add_argument("file", help="the checkpoint (.safetensors; pickle .ckpt files are refused, never unpickled)")
    cc.add_argument("dir", help="the folder to write (new or empty); serve it with --model-dir")
    cc.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                    help="not in the weights: default from a sidecar, else SD 2.x v_prediction, others epsilon")
    cc.set_defaults(func=cmd_convert_checkpoint)

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
    g.add_argument("--sampler", default="", help="ddim, euler, euler_ancestral, dpmpp_2m, dpmpp_2m_sde, unipc or lcm "
                                                 "(default: the model profile's)")
    g.add_argument("--karras-sigmas", action=argparse.BooleanOptionalAction, default=None,
                   help="Karras sigmas (euler, dpmpp_2m, dpmpp_2m_sde, unipc)")
    g.add_argument("--reference", action="append", metavar="PHOTO",
                   help="a photo of the subject (1-5, repeatable): an image prompt, personalized in this request")
    g.add_argument("--image-prompt-scale", type=float, default=0.0, help="the image prompt's strength (default 1)")
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
    t.add_argument("--idempotency-key", help="retrying with the same key returns the same job (default: a fresh key)")
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
    e.add_argument("--reference", action="append", metavar="PHOTO",
                   help="dds: a photo of the subject (1-5, repeatable): an image prompt, no adapter needed")
    e.add_argument("--image-prompt-scale", type=float, default=0.0, help="the image prompt's strength (default 1)")
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
    ip = a_sub.add_parser("create-image-prompt", help="store an image prompt of 1-5 photos at once (no job)")
    ip.add_argument("photos", nargs="+")
    ip.add_argument("--name", required=True)
    im = a_sub.add_parser("import")
    im.add_argument("file")
    im.add_argument("--name", required=True)
    # Its own dest: the API token's --token (before `import`) shares the name, and a subparser's
    # value of the same dest would replace it (the learned word was sent as the API token).
    im.add_argument("--token", dest="word", help="the prompt word of an embedding (SDXL clip_l/clip_g needs one)")
    im.add_argument("--idempotency-key", help="retrying with the same key returns the same adapter")
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
    except SteerServeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
