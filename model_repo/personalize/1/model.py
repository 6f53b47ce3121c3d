"""Triton python-backend model `personalize`: one training job per request, streamed progress.

Decoupled: execute() hands each request to one of this instance's training threads
(STEERSERVE_TRAINING_WORKERS of them: jobs trained at once, each thread with its own copy of the
base model) and returns; the thread sends a response per step, per checkpoint, and the adapter at
the end. Serving goes first: each training step waits while the server's `generate`/`unet`
instances hold the compute (service/engine/priority.py, shared through ServingState files). The training itself
is service.triton.parts.Personalize (service.personalize underneath), the same code the
in-process backend runs. Tensors: service/triton/wire.py.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import triton_python_backend_utils as pb_utils

from service.engine.priority import TurnTaking

from service.triton import wire
from service.triton.bls import request_reader, tensors
from service.triton.parts import Personalize, instance_device, instance_settings, instance_share, model_dir

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class _StreamedProgress:
    """personalize.Progress that answers with responses on the request's stream. `stub_lock`: held
    around every call into the stub (send, is_cancelled): with two jobs training at once, two
    threads streaming responses concurrently crashed tritonserver's python backend (SIGSEGV in
    libtriton_python.so, measured with STEERSERVE_TRAINING_WORKERS=2)."""

    def __init__(self, request, sender, stub_lock):
        self.request, self.sender, self.stub_lock = request, sender, stub_lock

    def send(self, message, flags=None):
        with self.stub_lock:
            if flags is None:
                self.sender.send(message)
            else:
                self.sender.send(message, flags=flags)

    def step(self, step, total, loss):
        self.send(pb_utils.InferenceResponse(output_tensors=tensors(wire.training_step(step, loss))))

    def checkpoint(self, step, state):
        self.send(pb_utils.InferenceResponse(output_tensors=tensors(wire.training_checkpoint(step, state))))

    def should_stop(self):
        with self.stub_lock:
            return self.request.is_cancelled()


class TritonPythonModel:
    def initialize(self, args):
        settings = instance_settings()
        self.model_dir, self.device = model_dir(settings), instance_device(args)
        self.share = instance_share(settings, args)
        # Time training steps waited for serving, on Triton's /metrics (the gateway's own counter
        # is the in-process backend's). Kept referenced: Triton drops a collected family.
        self.wait_family = pb_utils.MetricFamily(
            name="steerserve_triton_training_wait_seconds_total",
            description="Time training steps of a Triton personalize instance waited for serving (serving first).",
            kind=pb_utils.MetricFamily.COUNTER)
        self.wait_metric = self.wait_family.Metric(labels={"model": args["model_name"],
                                                           "instance": args["model_instance_name"]})
        self.share.on_wait = self._waited
        self.local = threading.local()  # one Personalize (base model copy) per training thread
        self.stub_lock = threading.Lock()  # one thread at a time talks to the stub (_StreamedProgress)
        self.pool = ThreadPoolExecutor(max_workers=settings.training_workers, thread_name_prefix="personalize",
                                       initializer=torch.set_num_threads, initargs=(settings.torch_threads,))
        # The first thread's base model, loaded behind readiness (an SD-size copy takes tens of
        # seconds on a CPU): a job that comes first queues behind it on this thread, and a model
        # that cannot load fails that job with the reason.
        self.pool.submit(self._personalize)

    def _waited(self, seconds: float) -> None:
        if seconds > 0:
            try:
                with self.stub_lock:  # called from the training threads: one at a time into the stub
                    self.wait_metric.increment(seconds)
            except Exception as exc:  # noqa: BLE001 - a metric must never fail a job
                pb_utils.Logger.log_warn(f"training wait metric not updated: {exc}")

    def _personalize(self) -> Personalize:
        personalize = getattr(self.local, "personalize", None)
        if personalize is None:
            personalize = self.local.personalize = Personalize(self.model_dir, self.device)
        return personalize

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._train, request)
        return None

    def _train(self, request):
        with self.stub_lock:
            sender = request.get_response_sender()
        stream = _StreamedProgress(request, sender, self.stub_lock)
        try:
            with self.stub_lock:
                spec, resume = wire.read_training_request(request_reader(request))
            adapter = self._personalize()(spec, resume, TurnTaking(stream, self.share))
            stream.send(pb_utils.InferenceResponse(output_tensors=tensors(wire.training_result(adapter))), flags=FINAL)
        except Exception as exc:  # noqa: BLE001 - every failure ends this request's stream with its status
            stream.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(wire.status_message(exc))), flags=FINAL)

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
