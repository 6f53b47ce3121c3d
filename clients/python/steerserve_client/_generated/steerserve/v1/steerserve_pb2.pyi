import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PersonalizationMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PERSONALIZATION_METHOD_UNSPECIFIED: _ClassVar[PersonalizationMethod]
    DREAMBOOTH_LORA: _ClassVar[PersonalizationMethod]
    TEXTUAL_INVERSION: _ClassVar[PersonalizationMethod]
    CUSTOM_DIFFUSION: _ClassVar[PersonalizationMethod]
    FINESTYLE: _ClassVar[PersonalizationMethod]
    IMAGE_PROMPT: _ClassVar[PersonalizationMethod]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    SUCCEEDED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]

class EditMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EDIT_METHOD_UNSPECIFIED: _ClassVar[EditMethod]
    DDS: _ClassVar[EditMethod]
    DREAMSTEERER: _ClassVar[EditMethod]
PERSONALIZATION_METHOD_UNSPECIFIED: PersonalizationMethod
DREAMBOOTH_LORA: PersonalizationMethod
TEXTUAL_INVERSION: PersonalizationMethod
CUSTOM_DIFFUSION: PersonalizationMethod
FINESTYLE: PersonalizationMethod
IMAGE_PROMPT: PersonalizationMethod
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
RUNNING: JobState
SUCCEEDED: JobState
FAILED: JobState
CANCELLED: JobState
EDIT_METHOD_UNSPECIFIED: EditMethod
DDS: EditMethod
DREAMSTEERER: EditMethod

class Image(_message.Message):
    __slots__ = ("data", "width", "height", "mime_type")
    DATA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    width: int
    height: int
    mime_type: str
    def __init__(self, data: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., mime_type: _Optional[str] = ...) -> None: ...

class AdapterRef(_message.Message):
    __slots__ = ("adapter_id", "weight")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    weight: float
    def __init__(self, adapter_id: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_seconds", "text_encode_seconds", "denoise_seconds", "decode_seconds", "total_seconds", "adapter_load_seconds", "mask_seconds", "guided_seconds", "steer_seconds")
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DENOISE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MASK_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GUIDED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    text_encode_seconds: float
    denoise_seconds: float
    decode_seconds: float
    total_seconds: float
    adapter_load_seconds: float
    mask_seconds: float
    guided_seconds: float
    steer_seconds: float
    def __init__(self, queue_seconds: _Optional[float] = ..., text_encode_seconds: _Optional[float] = ..., denoise_seconds: _Optional[float] = ..., decode_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., adapter_load_seconds: _Optional[float] = ..., mask_seconds: _Optional[float] = ..., guided_seconds: _Optional[float] = ..., steer_seconds: _Optional[float] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: int
    y0: int
    x1: int
    y1: int
    def __init__(self, x0: _Optional[int] = ..., y0: _Optional[int] = ..., x1: _Optional[int] = ..., y1: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "adapters", "steps", "guidance_scale", "width", "height", "seed", "num_images", "style_guidance_scale", "sampler", "karras_sigmas", "reference_images", "image_prompt_scale")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    STYLE_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    KARRAS_SIGMAS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PROMPT_SCALE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterRef]
    steps: int
    guidance_scale: float
    width: int
    height: int
    seed: int
    num_images: int
    style_guidance_scale: float
    sampler: str
    karras_sigmas: bool
    reference_images: _containers.RepeatedCompositeFieldContainer[Image]
    image_prompt_scale: float
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., adapters: _Optional[_Iterable[_Union[AdapterRef, _Mapping]]] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., seed: _Optional[int] = ..., num_images: _Optional[int] = ..., style_guidance_scale: _Optional[float] = ..., sampler: _Optional[str] = ..., karras_sigmas: bool = ..., reference_images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., image_prompt_scale: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("images", "seeds", "timings")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    seeds: _containers.RepeatedScalarFieldContainer[int]
    timings: Timings
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., seeds: _Optional[_Iterable[int]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class Concept(_message.Message):
    __slots__ = ("phrase", "box")
    PHRASE_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    phrase: str
    box: Box
    def __init__(self, phrase: _Optional[str] = ..., box: _Optional[_Union[Box, _Mapping]] = ...) -> None: ...

class TrainingOptions(_message.Message):
    __slots__ = ("steps", "rank", "learning_rate", "seed", "batch_size", "prior_loss_weight", "train_text_encoder", "num_class_images")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRIOR_LOSS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_TEXT_ENCODER_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASS_IMAGES_FIELD_NUMBER: _ClassVar[int]
    steps: int
    rank: int
    learning_rate: float
    seed: int
    batch_size: int
    prior_loss_weight: float
    train_text_encoder: bool
    num_class_images: int
    def __init__(self, steps: _Optional[int] = ..., rank: _Optional[int] = ..., learning_rate: _Optional[float] = ..., seed: _Optional[int] = ..., batch_size: _Optional[int] = ..., prior_loss_weight: _Optional[float] = ..., train_text_encoder: bool = ..., num_class_images: _Optional[int] = ...) -> None: ...

class PersonalizeRequest(_message.Message):
    __slots__ = ("method", "name", "images", "class_word", "concepts", "style_phrase", "options", "token", "idempotency_key")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CLASS_WORD_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    STYLE_PHRASE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    method: PersonalizationMethod
    name: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    class_word: str
    concepts: _containers.RepeatedCompositeFieldContainer[Concept]
    style_phrase: str
    options: TrainingOptions
    token: str
    idempotency_key: str
    def __init__(self, method: _Optional[_Union[PersonalizationMethod, str]] = ..., name: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., class_word: _Optional[str] = ..., concepts: _Optional[_Iterable[_Union[Concept, _Mapping]]] = ..., style_phrase: _Optional[str] = ..., options: _Optional[_Union[TrainingOptions, _Mapping]] = ..., token: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "state", "progress", "adapter_id", "error", "method", "name", "step", "total_steps", "created_at", "updated_at", "loss", "eta_seconds", "token", "class_word", "message", "previews")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLASS_WORD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    progress: float
    adapter_id: str
    error: str
    method: PersonalizationMethod
    name: str
    step: int
    total_steps: int
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    loss: float
    eta_seconds: float
    token: str
    class_word: str
    message: str
    previews: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., progress: _Optional[float] = ..., adapter_id: _Optional[str] = ..., error: _Optional[str] = ..., method: _Optional[_Union[PersonalizationMethod, str]] = ..., name: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., loss: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., token: _Optional[str] = ..., class_word: _Optional[str] = ..., message: _Optional[str] = ..., previews: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "state", "step", "total_steps", "loss", "message", "time", "job", "eta_seconds")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    step: int
    total_steps: int
    loss: float
    message: str
    time: _timestamp_pb2.Timestamp
    job: Job
    eta_seconds: float
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., message: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., job: _Optional[_Union[Job, _Mapping]] = ..., eta_seconds: _Optional[float] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class EditOptions(_message.Message):
    __slots__ = ("learning_rate", "steer_steps", "steer_learning_rate", "use_subject_mask", "bias_correction", "mode_shifting", "edsd", "t_min", "t_max", "preliminary_iterations", "guided_samples", "guided_steps", "mode_shifting_weight", "mask_threshold")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    STEER_STEPS_FIELD_NUMBER: _ClassVar[int]
    STEER_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    USE_SUBJECT_MASK_FIELD_NUMBER: _ClassVar[int]
    BIAS_CORRECTION_FIELD_NUMBER: _ClassVar[int]
    MODE_SHIFTING_FIELD_NUMBER: _ClassVar[int]
    EDSD_FIELD_NUMBER: _ClassVar[int]
    T_MIN_FIELD_NUMBER: _ClassVar[int]
    T_MAX_FIELD_NUMBER: _ClassVar[int]
    PRELIMINARY_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    GUIDED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    GUIDED_STEPS_FIELD_NUMBER: _ClassVar[int]
    MODE_SHIFTING_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MASK_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    steer_steps: int
    steer_learning_rate: float
    use_subject_mask: bool
    bias_correction: bool
    mode_shifting: bool
    edsd: bool
    t_min: int
    t_max: int
    preliminary_iterations: int
    guided_samples: int
    guided_steps: int
    mode_shifting_weight: float
    mask_threshold: float
    def __init__(self, learning_rate: _Optional[float] = ..., steer_steps: _Optional[int] = ..., steer_learning_rate: _Optional[float] = ..., use_subject_mask: bool = ..., bias_correction: bool = ..., mode_shifting: bool = ..., edsd: bool = ..., t_min: _Optional[int] = ..., t_max: _Optional[int] = ..., preliminary_iterations: _Optional[int] = ..., guided_samples: _Optional[int] = ..., guided_steps: _Optional[int] = ..., mode_shifting_weight: _Optional[float] = ..., mask_threshold: _Optional[float] = ...) -> None: ...

class EditRequest(_message.Message):
    __slots__ = ("source_image", "source_prompt", "target_prompt", "adapter_id", "method", "steps", "guidance_scale", "seed", "options", "reference_images", "image_prompt_scale")
    SOURCE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TARGET_PROMPT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PROMPT_SCALE_FIELD_NUMBER: _ClassVar[int]
    source_image: Image
    source_prompt: str
    target_prompt: str
    adapter_id: str
    method: EditMethod
    steps: int
    guidance_scale: float
    seed: int
    options: EditOptions
    reference_images: _containers.RepeatedCompositeFieldContainer[Image]
    image_prompt_scale: float
    def __init__(self, source_image: _Optional[_Union[Image, _Mapping]] = ..., source_prompt: _Optional[str] = ..., target_prompt: _Optional[str] = ..., adapter_id: _Optional[str] = ..., method: _Optional[_Union[EditMethod, str]] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., options: _Optional[_Union[EditOptions, _Mapping]] = ..., reference_images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., image_prompt_scale: _Optional[float] = ...) -> None: ...

class EditResponse(_message.Message):
    __slots__ = ("image", "mask", "seed", "timings")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    image: Image
    mask: Image
    seed: int
    timings: Timings
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., mask: _Optional[_Union[Image, _Mapping]] = ..., seed: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class EditEvent(_message.Message):
    __slots__ = ("phase", "step", "total_steps", "progress", "result")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    phase: str
    step: int
    total_steps: int
    progress: float
    result: EditResponse
    def __init__(self, phase: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., progress: _Optional[float] = ..., result: _Optional[_Union[EditResponse, _Mapping]] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("adapter_id", "name", "method", "token", "class_word", "rank", "size_bytes", "num_parameters", "sha256", "created_at", "source", "contents")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLASS_WORD_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CONTENTS_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    name: str
    method: PersonalizationMethod
    token: str
    class_word: str
    rank: int
    size_bytes: int
    num_parameters: int
    sha256: str
    created_at: _timestamp_pb2.Timestamp
    source: str
    contents: AdapterContents
    def __init__(self, adapter_id: _Optional[str] = ..., name: _Optional[str] = ..., method: _Optional[_Union[PersonalizationMethod, str]] = ..., token: _Optional[str] = ..., class_word: _Optional[str] = ..., rank: _Optional[int] = ..., size_bytes: _Optional[int] = ..., num_parameters: _Optional[int] = ..., sha256: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ..., contents: _Optional[_Union[AdapterContents, _Mapping]] = ...) -> None: ...

class AdapterContents(_message.Message):
    __slots__ = ("layout", "components", "tokens")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    layout: str
    components: _containers.RepeatedCompositeFieldContainer[ComponentContents]
    tokens: _containers.RepeatedCompositeFieldContainer[LearnedToken]
    def __init__(self, layout: _Optional[str] = ..., components: _Optional[_Iterable[_Union[ComponentContents, _Mapping]]] = ..., tokens: _Optional[_Iterable[_Union[LearnedToken, _Mapping]]] = ...) -> None: ...

class ComponentContents(_message.Message):
    __slots__ = ("component", "modules", "conv_modules", "ranks", "alphas")
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    CONV_MODULES_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    ALPHAS_FIELD_NUMBER: _ClassVar[int]
    component: str
    modules: int
    conv_modules: int
    ranks: _containers.RepeatedScalarFieldContainer[int]
    alphas: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, component: _Optional[str] = ..., modules: _Optional[int] = ..., conv_modules: _Optional[int] = ..., ranks: _Optional[_Iterable[int]] = ..., alphas: _Optional[_Iterable[float]] = ...) -> None: ...

class LearnedToken(_message.Message):
    __slots__ = ("token", "vectors")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    token: str
    vectors: int
    def __init__(self, token: _Optional[str] = ..., vectors: _Optional[int] = ...) -> None: ...

class ImportAdapterRequest(_message.Message):
    __slots__ = ("name", "safetensors", "token", "alpha", "idempotency_key")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    name: str
    safetensors: bytes
    token: str
    alpha: float
    idempotency_key: str
    def __init__(self, name: _Optional[str] = ..., safetensors: _Optional[bytes] = ..., token: _Optional[str] = ..., alpha: _Optional[float] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class CreateImagePromptRequest(_message.Message):
    __slots__ = ("name", "images")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    name: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, name: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    def __init__(self, adapters: _Optional[_Iterable[_Union[Adapter, _Mapping]]] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class DeleteAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class ExportAdapterResponse(_message.Message):
    __slots__ = ("adapter", "safetensors")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    safetensors: bytes
    def __init__(self, adapter: _Optional[_Union[Adapter, _Mapping]] = ..., safetensors: _Optional[bytes] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "base_model", "default_width", "default_height", "max_width", "max_height", "default_steps", "max_steps", "max_num_images", "backend", "profile", "unet_runtime", "unet_runtime_choice", "image_prompts", "max_image_prompt_images")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MAX_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    UNET_RUNTIME_FIELD_NUMBER: _ClassVar[int]
    UNET_RUNTIME_CHOICE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PROMPT_IMAGES_FIELD_NUMBER: _ClassVar[int]
    version: str
    base_model: str
    default_width: int
    default_height: int
    max_width: int
    max_height: int
    default_steps: int
    max_steps: int
    max_num_images: int
    backend: str
    profile: ModelProfile
    unet_runtime: str
    unet_runtime_choice: str
    image_prompts: bool
    max_image_prompt_images: int
    def __init__(self, version: _Optional[str] = ..., base_model: _Optional[str] = ..., default_width: _Optional[int] = ..., default_height: _Optional[int] = ..., max_width: _Optional[int] = ..., max_height: _Optional[int] = ..., default_steps: _Optional[int] = ..., max_steps: _Optional[int] = ..., max_num_images: _Optional[int] = ..., backend: _Optional[str] = ..., profile: _Optional[_Union[ModelProfile, _Mapping]] = ..., unet_runtime: _Optional[str] = ..., unet_runtime_choice: _Optional[str] = ..., image_prompts: bool = ..., max_image_prompt_images: _Optional[int] = ...) -> None: ...

class ModelProfile(_message.Message):
    __slots__ = ("name", "chosen_by", "description", "training", "edit_guidance_scale", "sampler", "karras_sigmas", "image_prompt_scale")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_BY_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    EDIT_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    KARRAS_SIGMAS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PROMPT_SCALE_FIELD_NUMBER: _ClassVar[int]
    name: str
    chosen_by: str
    description: str
    training: _containers.RepeatedCompositeFieldContainer[MethodDefaults]
    edit_guidance_scale: float
    sampler: str
    karras_sigmas: bool
    image_prompt_scale: float
    def __init__(self, name: _Optional[str] = ..., chosen_by: _Optional[str] = ..., description: _Optional[str] = ..., training: _Optional[_Iterable[_Union[MethodDefaults, _Mapping]]] = ..., edit_guidance_scale: _Optional[float] = ..., sampler: _Optional[str] = ..., karras_sigmas: bool = ..., image_prompt_scale: _Optional[float] = ...) -> None: ...

class MethodDefaults(_message.Message):
    __slots__ = ("method", "steps", "learning_rate", "rank", "batch_size", "prior_loss_weight", "num_class_images", "train_text_encoder", "source")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRIOR_LOSS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASS_IMAGES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_TEXT_ENCODER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    method: PersonalizationMethod
    steps: int
    learning_rate: float
    rank: int
    batch_size: int
    prior_loss_weight: float
    num_class_images: int
    train_text_encoder: bool
    source: str
    def __init__(self, method: _Optional[_Union[PersonalizationMethod, str]] = ..., steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., rank: _Optional[int] = ..., batch_size: _Optional[int] = ..., prior_loss_weight: _Optional[float] = ..., num_class_images: _Optional[int] = ..., train_text_encoder: bool = ..., source: _Optional[str] = ...) -> None: ...
