"""Settings, from environment variables (prefix STEERSERVE_), an optional config file, or flags.

    STEERSERVE_API_KEYS="token1:tenant-a,token2:tenant-b"
    STEERSERVE_CONFIG_FILE=/etc/steerserve/config.json   # same keys, lower case, JSON
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class _JsonFileSource(PydanticBaseSettingsSource):
    """Reads STEERSERVE_CONFIG_FILE (JSON) if set; environment variables override it."""

    def get_field_value(self, field, field_name):  # pragma: no cover - required by the ABC
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("STEERSERVE_CONFIG_FILE")
        if not path:
            return {}
        return json.loads(Path(path).read_text())



def _auto_candidates() -> tuple[str, ...]:
    from service.compiled.runtime import AUTO_CANDIDATES

    return AUTO_CANDIDATES

class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEERSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    grpc_port: int = 50051
    metrics_port: int = 9464  # 0 disables the Prometheus endpoint
    # On SIGTERM: not ready at once, then in-flight RPCs get this long to finish (keep it below the
    # pod's terminationGracePeriodSeconds); running jobs go back to the queue for another replica.
    shutdown_grace_s: float = Field(30.0, ge=0)

    # token -> tenant. Parsed from "token:tenant,..." in the environment or a JSON object in the file.
    # A key may be a digest instead of the token: "sha256:<64 hex>" (steerserve hash-token).
    api_keys: dict[str, str] = Field(default_factory=dict)

    # TLS on the gRPC port (PEM files): cert + key serve TLS; a client CA as well requires and
    # verifies client certificates (mutual TLS). Unset: plaintext (loopback / behind a mesh).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # Development mode: when no api_keys are configured, create a token for tenant "dev" and print it.
    dev_token: bool = False

    # Logs on stderr: "text" lines or "json" objects (time, level, logger, message, request_id, and
    # trace_id/span_id while an OpenTelemetry span is current). access_log: a line per RPC
    # (logger steerserve.access: rpc, code, duration_s, tenant). Tracing itself: OTEL_* (docs/observability.md).
    log_format: Literal["text", "json"] = "text"
    access_log: bool = False
    data_dir: Path = Path("var")  # SQLite database + adapter blobs + checkpoints + model cache
    # postgresql://user:password@host:5432/db: adapters and jobs in PostgreSQL, shared by every gateway
    # replica (data_dir then is one ReadWriteMany volume they all mount). Unset: SQLite in data_dir.
    database_url: str | None = None
    model_dir: Path | None = None  # a diffusers SD 1.x/2.x/XL folder; None = the embedded default
    # model_dir may also name a single-file checkpoint (.safetensors): converted once into
    # <data_dir>/models/checkpoints (service/engine/checkpoints.py). Its prediction type is not in
    # the weights: this setting ("epsilon" or "v_prediction") overrides the sidecar/default rules.
    checkpoint_prediction_type: Literal["epsilon", "v_prediction"] | None = None
    # The training and editing defaults' profile (service/profiles.py): unset, the model folder's
    # steerserve_profile.json, or detected from the model's family (SD 1.x / 2.x / XL).
    model_profile: str | None = None
    # Image prompts (service/image_prompt, Generate's reference_images, CreateImagePrompt): an
    # IP-Adapter file in the published layout and the CLIP vision encoder folder it takes, both local.
    # Unset: the embedded model's own (service/research/image_prompt/weights) when the served UNet is
    # the one it was trained on; with another model, no image prompts (FAILED_PRECONDITION names why).
    image_prompt_adapter: Path | None = None
    image_encoder_dir: Path | None = None
    # Off: no image prompts even where an IP-Adapter is at hand. Every UNet call of a model that serves
    # them attends to the packed image tokens, used or not (bench/results/image_prompts.md measures it).
    image_prompts: bool = True
    device: str = "cpu"
    backend: str = "inprocess"  # "inprocess" or "triton"
    # Backend "triton": how long the embedded server may take to load its models (each python-backend
    # stub imports torch; 30 s to 2 min on 2 shared cores), at start and at each supervised restart.
    triton_start_timeout_s: float = Field(300.0, gt=0)
    triton_restart_backoff_max_s: float = Field(30.0, gt=0)  # restarts back off 1, 2, 4 ... up to this
    # An external Triton serving model_repo/: host:port, several comma-separated, or a name with one
    # address per replica (a headless Service). Unset: backend "triton" starts the embedded one.
    triton_url: str | None = None
    # The embedded Triton's own OpenTelemetry traces: its OTLP/HTTP endpoint (Triton speaks no
    # OTLP/gRPC), e.g. http://collector:4318/v1/traces. Its spans join the gateway's traces (the
    # gateway sends `traceparent` with each request when OTEL_* tracing is on). Unset: Triton does
    # not trace. An external Triton takes the same flags (service.triton.launcher.trace_args).
    triton_trace_url: str | None = None
    # Where the adapter bank reads adapter files (content-addressed blobs) and where exported UNet
    # graphs are cached; unset = <data_dir>/adapters and <data_dir>/compiled. Triton's model
    # instances read the same names (the gateway passes them to the embedded server; deploy/'s
    # ConfigMap sets them): there an unset adapter_dir means no adapter bank.
    adapter_dir: Path | None = None
    compiled_dir: Path | None = None
    # Per-request adapters every model process of one server loads (a DreamSteerer edit's steered
    # copy on Triton, service.adapters.loading.request_adapter): a WRITABLE folder local to the
    # server; unset = <adapter dir>/request. deploy/ points it at the Triton pod's /tmp (its data
    # volume is read-only there).
    request_adapter_dir: Path | None = None
    # torch intra-op threads of each Triton model instance (each its own process) and of the
    # in-process backend's model thread: on a busy 2-core machine torch's 2 spinning OpenMP threads
    # made a 20-step generation 12x slower than one.
    torch_threads: int = Field(1, ge=1)

    # Request limits.
    default_steps: int = 20
    max_steps: int = 150
    max_guidance_scale: float = 30.0
    min_size: int = 32
    # None: follow the model (validation.Limits): a side up to twice its own size, at least 512;
    # pixels up to its own size squared, at least 512 x 512 (SDXL: 2048 and 1024 x 1024).
    max_size: int | None = None
    max_pixels: int | None = None
    max_num_images: int = 4
    max_prompt_tokens: int = 75  # CLIP's 77 minus the start/end markers
    max_request_bytes: int = 32 * 1024 * 1024
    max_input_image_pixels: int = 2048 * 2048
    max_adapters_per_request: int = 4
    max_adapter_bytes: int = 64 * 1024 * 1024
    max_edit_iterations: int = 1000  # DDS iterations of one edit (EditRequest.steps)
    max_steer_steps: int = 500  # DreamSteerer steering iterations (EditOptions.steer_steps)

    # In-process concurrency: edits run in this many worker threads (Generate requests run as
    # coroutines, their steps batched into shared UNet calls on one model thread).
    engine_workers: int = 1

    # Admission of Generate and Edit (service/admission): per-tenant queues in fair order, and
    # RESOURCE_EXHAUSTED at once when the queue is full, a tenant is over a limit, or the estimated
    # wait (from measured service times) would miss the request's deadline.
    admission_slots: int = 0  # requests run at once; 0 = 8 (their steps share UNet calls, both backends)
    admission_max_queue: int = 64  # requests waiting, all tenants
    tenant_max_queued: int = 16  # requests one tenant may have waiting
    tenant_max_running: int = 0  # slots one tenant may hold at once (0 = all of them)
    tenant_rate_per_s: float = Field(0.0, ge=0)  # requests a second one tenant may send (0 = no limit)
    tenant_burst: int = Field(10, ge=1)  # requests one tenant may send at once under the rate limit

    # Personalization jobs.
    training_workers: int = Field(1, ge=1)  # jobs trained at once per replica (each on its own copy of the base model)
    # Training beside serving (service/engine/priority.py): serving goes first; a training step starts
    # only when the compute serving holds while it has work leaves room for it. False: both run as
    # the OS schedules them. compute_units: cores (CPU) or 1 (GPU) to share; 0 = this machine's.
    serving_first: bool = True
    compute_units: int = Field(0, ge=0)
    # Triton: where the server's model processes share serving's busy units; unset = a folder in
    # /dev/shm named after the tritonserver process (its stubs' parent).
    serving_state_dir: Path | None = None
    max_queued_jobs: int = 16  # QUEUED jobs of all tenants; beyond: RESOURCE_EXHAUSTED
    max_jobs_per_tenant: int = 2  # QUEUED + RUNNING jobs of one tenant; beyond: RESOURCE_EXHAUSTED
    # Per-tenant adapter quota (imports and finished jobs; RESOURCE_EXHAUSTED beyond it). A job
    # counts against the count from the moment it is queued. A tenant is a calling service whose
    # own users each have adapters: thousands per tenant is the normal case (bench/scale.py).
    tenant_max_adapters: int = Field(10_000, ge=1)
    tenant_max_adapter_bytes: int = Field(64 * 1024**3, ge=1)
    checkpoint_every: int = 50  # training steps between checkpoints (a restart resumes from the last)
    job_previews: int = 4  # preview images of a finished job ("a <token> <class_word>", seeds 0..n-1)
    job_max_attempts: int = 3  # starts of one job (restarts, model server outages) before it FAILS
    # A running job's lease: renewed every third of it; a runner that stops renewing (its gateway
    # died) loses the job to another replica once it expires. Shorter: faster takeover, more writes.
    job_lease_s: float = Field(30.0, gt=0)
    job_poll_interval_s: float = Field(1.0, gt=0)  # idle runners look for claimable jobs this often

    # Adapter bank (same variable names configure the Triton model instances).
    adapter_slots: int = 16  # slots including slot 0 (the base model)
    adapter_max_rank: int = 16
    # The UNet convolutions the bank serves LoRA on (service/adapters/bank.py CONV_LAYERS): "proj",
    # kohya's 1x1 proj_in/proj_out (SD 1.x); "locon", also LyCORIS LoCon's resnet and sampler convs
    # (slot memory, and compute on every call whether or not a row uses them: docs/adapter_bank.md);
    # "none". The gateway checks imports against the same layers.
    adapter_conv_layers: Literal["none", "proj", "locon"] = "proj"
    # Parsed adapters kept in host memory (also after eviction from their slot), so a slot miss copies
    # instead of reading the store: bounded by bytes (adapters differ ~10x in size with rank and
    # layers) and by entries. Per model process (each Triton generate/unet instance has its own).
    adapter_host_cache: int = Field(10_000, ge=0)  # entries (0: no host cache)
    adapter_host_cache_bytes: int = Field(1024**3, ge=0)  # bytes (0: no host cache)

    # How the UNet runs (service/compiled; the same variables configure the Triton `unet` model):
    # "auto" (the fastest of the candidates on this model and device: eager serves at once while the
    # choice is read from the cached measurement or measured in the background, then the winner
    # takes over), or forced: "eager", "compile" (torch.compile, CUDA graphs on a GPU) or "onnx"
    # (onnxruntime, the bank as graph inputs), built before serving. Adapter swaps never recompile
    # any of them.
    unet_runtime: str = "auto"
    # auto: "background" (start-up never waits) or "blocking" (measure before serving).
    unet_runtime_measure: Literal["background", "blocking"] = "background"
    # A file the background measurement waits for (at most unet_runtime_ready_timeout_s): the
    # embedded Triton's launcher writes it once every model has loaded.
    unet_runtime_ready_file: Path | None = None
    unet_runtime_ready_timeout_s: float = Field(600.0, ge=0)
    unet_runtime_candidates: list[str] = Field(default_factory=lambda: list(_auto_candidates()))  # what auto measures
    unet_batch_buckets: list[int] = Field(default_factory=list)  # "1,2,4,8"; empty = powers of two
    unet_compile_mode: str = "auto"  # torch.compile mode; auto = reduce-overhead on CUDA
    unet_warmup: bool = True  # compile / export every bucket at start, before serving

    @model_validator(mode="after")
    def _check_tls(self) -> "Settings":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("STEERSERVE_TLS_CERT_FILE and STEERSERVE_TLS_KEY_FILE go together: set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("STEERSERVE_TLS_CLIENT_CA_FILE (mutual TLS) needs STEERSERVE_TLS_CERT_FILE and _KEY_FILE")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"STEERSERVE_{name.upper()}: {path} is not a readable file")
        return self

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        from service.stores.db import is_database_url

        if not is_database_url(value):
            raise ValueError("STEERSERVE_DATABASE_URL must be a postgresql:// URL (unset: SQLite in the data folder)")
        return value

    @field_validator("unet_batch_buckets", mode="before")
    @classmethod
    def _parse_buckets(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return [int(part) for part in value.replace(" ", "").split(",") if part]
            except ValueError:
                raise ValueError(f"STEERSERVE_UNET_BATCH_BUCKETS {value!r} is not a comma-separated list of integers")
        return value

    @field_validator("unet_runtime_candidates", mode="before")
    @classmethod
    def _parse_candidates(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in value.replace(" ", "").split(",") if part]
        if isinstance(value, list):
            for kind in value:
                if kind not in _auto_candidates():
                    raise ValueError(f"STEERSERVE_UNET_RUNTIME_CANDIDATES: {kind!r} is not one of "
                                     f"{', '.join(_auto_candidates())}")
            if not value:
                raise ValueError("STEERSERVE_UNET_RUNTIME_CANDIDATES needs at least one runtime")
        return value

    @field_validator("model_profile")
    @classmethod
    def _check_profile(cls, value: str | None) -> str | None:
        from service.profiles import PROFILES

        if value and value not in PROFILES:
            raise ValueError(f"model_profile {value!r} is not one of {', '.join(PROFILES)}")
        return value or None

    def resolved_model_dir(self) -> Path:
        """The diffusers folder served: model_dir, the folder a single-file checkpoint model_dir names
        converts into (once, under data_dir), else the embedded default (unpacked under data_dir)."""
        if self.model_dir is not None:
            if Path(self.model_dir).is_file():
                from service.engine.checkpoints import served_folder

                return served_folder(self.model_dir, Path(self.data_dir) / "models" / "checkpoints",
                                     prediction_type=self.checkpoint_prediction_type)
            return Path(self.model_dir)
        from service.engine.default_model import default_model_dir

        return default_model_dir(Path(self.data_dir) / "models")

    def adapters_path(self) -> Path:
        return Path(self.adapter_dir) if self.adapter_dir is not None else Path(self.data_dir) / "adapters"

    def request_adapters_path(self) -> Path:
        return Path(self.request_adapter_dir) if self.request_adapter_dir is not None else self.adapters_path() / "request"

    def compiled_path(self) -> Path:
        return Path(self.compiled_dir) if self.compiled_dir is not None else Path(self.data_dir) / "compiled"

    def image_prompt_files(self, model_dir: str | Path | None = None) -> tuple[Path, Path] | None:
        """(IP-Adapter file, image encoder folder) the served model (`model_dir`, default: the
        resolved one) takes image prompts with, or None. The TensorRT plan (unet_runtime
        triton_engine) is built without an IP-Adapter: the embedded model's own is then left out,
        and a configured one is refused here."""
        if not self.image_prompts:
            return None
        if (self.image_prompt_adapter is None) != (self.image_encoder_dir is None):
            raise ValueError("image_prompt_adapter and image_encoder_dir go together (the IP-Adapter file and "
                             "the CLIP vision folder it takes)")
        if self.image_prompt_adapter is not None:
            if self.unet_runtime == "triton_engine":
                raise ValueError("image_prompt_adapter: the TensorRT plan (unet_runtime triton_engine) is built "
                                 "without an IP-Adapter; serve image prompts with unet_runtime auto, onnx or eager")
            return Path(self.image_prompt_adapter), Path(self.image_encoder_dir)
        if self.unet_runtime == "triton_engine":
            return None
        from service.research.image_prompt import shipped_for

        return shipped_for(model_dir if model_dir is not None else self.resolved_model_dir())

    def profile(self):
        """The served model's profile and why it was chosen (service/profiles.ChosenProfile)."""
        from service.profiles import choose

        return choose(str(self.resolved_model_dir()) if self.model_dir else None, self.model_profile)

    @field_validator("unet_runtime")
    @classmethod
    def _check_runtime(cls, value: str) -> str:
        from service.compiled import RUNTIMES

        if value not in RUNTIMES:
            raise ValueError(f"unet_runtime {value!r} is not one of {', '.join(RUNTIMES)}")
        return value

    def admission_limits(self, backend: str):
        from service.admission import AdmissionLimits

        # Both backends overlap the requests they hold (a step batcher puts their steps in one UNet
        # call: service/engine/batching.py in-process, the generate model on Triton), so several
        # are kept in flight. In-process edits still take one of `engine_workers` threads each.
        slots = self.admission_slots or 8
        return AdmissionLimits(slots=slots, max_queue=self.admission_max_queue,
                               tenant_max_queued=self.tenant_max_queued, tenant_max_running=self.tenant_max_running,
                               tenant_rate=self.tenant_rate_per_s, tenant_burst=self.tenant_burst)

    def unet_runtime_options(self):
        from service.compiled import RuntimeOptions

        return RuntimeOptions(kind=self.unet_runtime, candidates=tuple(self.unet_runtime_candidates),
                              buckets=tuple(self.unet_batch_buckets),
                              compile_mode=self.unet_compile_mode, warmup=self.unet_warmup,
                              cache_dir=self.compiled_path(), measure=self.unet_runtime_measure,
                              threads=self.torch_threads, ready_file=self.unet_runtime_ready_file,
                              ready_timeout_s=self.unet_runtime_ready_timeout_s)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            keys: dict[str, str] = {}
            for item in filter(None, (part.strip() for part in value.split(","))):
                if item.startswith("sha256:"):  # a digest holds one ":" of its own
                    token, sep, tenant = item[:71], item[71:72], item[72:]
                else:
                    token, sep, tenant = item.partition(":")
                if not sep or not token or not tenant:
                    raise ValueError(f"STEERSERVE_API_KEYS entry {item!r} is not 'token:tenant'")
                keys[token] = tenant
            return keys
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, keys: dict[str, str]) -> dict[str, str]:
        """Digests well-formed, and no token configured twice (as itself and as its digest)."""
        from service.keys import key_digest

        seen: dict[bytes, str] = {}
        for key in keys:
            digest = key_digest(key)  # ValueError for a malformed sha256: key
            if digest in seen:
                raise ValueError(f"STEERSERVE_API_KEYS configures one token twice ({seen[digest][:12]}... and "
                                 f"{key[:12]}...)")
            seen[digest] = key
        return keys

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return (init_settings, _EnvWithPlainKeys(settings_cls), _JsonFileSource(settings_cls))


class _EnvWithPlainKeys(PydanticBaseSettingsSource):
    """Environment source that leaves STEERSERVE_API_KEYS as a plain string (not JSON-decoded)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - required by the ABC
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.settings_cls.model_fields:
            value = os.environ.get(f"STEERSERVE_{name.upper()}")
            if value is not None:
                out[name] = value
        return out
