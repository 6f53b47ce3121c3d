"""The race's baseline: a diffusers pipeline with peft LoRA adapters behind a minimal HTTP server,
written the way diffusers' documentation shows (bench/race.py starts it in its own process).

    python -m bench.race_baseline_server --model-dir DIR --adapter NAME=FILE [...] --port P \
        [--mode single|batched] [--threads 2] [--window-ms 10] [--max-batch 16]

- `StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)`; a DDIM scheduler from
  the folder's config if it ships another (the service samples with DDIM); progress bars off.
- `pipe.load_lora_weights(file, adapter_name=name)` for every adapter at start (peft backend).
- POST /generate {"prompt", "adapter", "seed", "steps", "guidance_scale"} -> image/png (GET /stats:
  pipeline calls and images so far):
  `pipe.set_adapters([adapter])` then `pipe(prompt, num_inference_steps=steps,
  guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed))`, the image PNG-encoded
  (the service answers PNG too).
- mode "single": one request at a time, a lock around the pipeline.
- mode "batched": requests are collected for `--window-ms` after the first one waiting, grouped by
  adapter (and steps/guidance), and each group runs as one pipeline call with a list of prompts and
  one generator per image (at most `--max-batch` images a call).

Threads: torch's intra-op threads set to `--threads` and denormals flushed to zero on every thread
that runs the pipeline, as the service's engine does on its threads (a per-thread CPU flag; without
it this model's small activations drop into denormals and every kernel crawls, which would measure
the CPU, not the serving).
"""

from __future__ import annotations

import argparse
import io
import json
import queue
import sys
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


def load_pipeline(model_dir: str, adapters: dict[str, str]):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for name, path in adapters.items():
        pipe.load_lora_weights(path, adapter_name=name)
    return pipe


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Runner:
    """Runs the pipeline, on whichever thread calls it, with the torch thread settings applied."""

    def __init__(self, pipe, threads: int):
        self.pipe = pipe
        self.threads = threads
        self._ready = threading.local()

    def _thread_setup(self) -> None:
        if not getattr(self._ready, "done", False):
            torch.set_num_threads(self.threads)
            torch.set_flush_denormal(True)
            self._ready.done = True

    def run(self, adapter: str, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float) -> list[bytes]:
        self._thread_setup()
        self.pipe.set_adapters([adapter])
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        out = self.pipe(prompts if len(prompts) > 1 else prompts[0], num_inference_steps=steps,
                        guidance_scale=guidance_scale, generator=generators if len(generators) > 1 else generators[0])
        return [png(image) for image in out.images]


class Single:
    """One request at a time: a lock around the pipeline."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self.lock = threading.Lock()
        self.calls = 0
        self.images = 0

    def submit(self, req: dict) -> bytes:
        with self.lock:
            image = self.runner.run(req["adapter"], [req["prompt"]], [req["seed"]], req["steps"], req["guidance_scale"])[0]
            self.calls += 1
            self.images += 1
            return image


class Batched:
    """A batcher thread: collects waiting requests for a short window, groups them by adapter,
    runs one pipeline call per group."""

    def __init__(self, runner: Runner, window_s: float, max_batch: int):
        self.runner = runner
        self.window_s = window_s
        self.max_batch = max_batch
        self.queue: queue.Queue = queue.Queue()
        self.calls = 0
        self.images = 0
        threading.Thread(target=self._loop, daemon=True, name="batcher").start()

    def submit(self, req: dict) -> bytes:
        done: Future = Future()
        self.queue.put((req, done))
        return done.result()

    def _collect(self) -> list:
        waiting = [self.queue.get()]
        deadline = time.monotonic() + self.window_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                waiting.append(self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait())
            except queue.Empty:
                return waiting

    def _loop(self) -> None:
        while True:
            groups: dict[tuple, list] = {}
            for req, done in self._collect():
                groups.setdefault((req["adapter"], req["steps"], req["guidance_scale"]), []).append((req, done))
            for (adapter, steps, guidance), items in groups.items():
                for i in range(0, len(items), self.max_batch):
                    chunk = items[i:i + self.max_batch]
                    try:
                        images = self.runner.run(adapter, [r["prompt"] for r, _ in chunk], [r["seed"] for r, _ in chunk],
                                                 steps, guidance)
                    except Exception as exc:  # noqa: BLE001 - answered to each waiting request
                        for _, done in chunk:
                            done.set_exception(exc)
                        continue
                    self.calls += 1
                    self.images += len(chunk)
                    for (_, done), image in zip(chunk, images):
                        done.set_result(image)


def make_handler(server_impl, adapters: set[str]):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: one connection per client

        def log_message(self, *args):  # no per-request log lines
            pass

        def _reply(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                self._reply(200, b"ok", "text/plain")
            elif self.path == "/stats":
                stats = dict(pipeline_calls=server_impl.calls, images=server_impl.images)
                self._reply(200, json.dumps(stats).encode(), "application/json")
            else:
                self._reply(404, b"not found", "text/plain")

        def do_POST(self):
            if self.path != "/generate":
                self._reply(404, b"not found", "text/plain")
                return
            try:
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if req["adapter"] not in adapters:
                    raise KeyError(f"unknown adapter {req['adapter']!r}")
                req = dict(prompt=str(req["prompt"]), adapter=req["adapter"], seed=int(req["seed"]),
                           steps=int(req["steps"]), guidance_scale=float(req.get("guidance_scale", 7.5)))
            except (KeyError, ValueError, TypeError) as exc:
                self._reply(400, str(exc).encode(), "text/plain")
                return
            try:
                body = server_impl.submit(req)
            except Exception as exc:  # noqa: BLE001 - a 500 with the reason
                self._reply(500, repr(exc).encode(), "text/plain")
                return
            self._reply(200, body, "image/png")

    return Handler


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--adapter", action="append", default=[], help="NAME=FILE (a diffusers-format LoRA safetensors)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=["single", "batched"], default="single")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--window-ms", type=float, default=10.0)
    ap.add_argument("--max-batch", type=int, default=16)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    adapters = dict(item.split("=", 1) for item in args.adapter)
    pipe = load_pipeline(args.model_dir, adapters)
    runner = Runner(pipe, args.threads)
    impl = Single(runner) if args.mode == "single" else Batched(runner, args.window_ms / 1e3, args.max_batch)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(impl, set(adapters)))
    server.daemon_threads = True
    print(f"baseline ({args.mode}, {args.threads} torch threads, {len(adapters)} adapters, "
          f"scheduler {type(pipe.scheduler).__name__}) listening on 127.0.0.1:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
