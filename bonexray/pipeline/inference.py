"""One onnxruntime session per model: providers, threads, sha256 check, metadata, batched calls."""

from __future__ import annotations

import base64
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bonexray.errors import BonexrayError, one_line
from bonexray.modelmeta import INPUT_NAME, OUTPUT_PROB, ModelInfo, parse_metadata
from bonexray.modelstore import sha256_bytes
from bonexray.settings import Settings

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ModelLoadError(BonexrayError, RuntimeError):
    """The model file cannot be used: missing, tampered with, or not a bonexray model."""


class ModelMismatchError(ModelLoadError):
    """The model file is not the one registered (sha256 mismatch): the model itself is bad,
    on every worker, so its studies fail instead of waiting for a healthy worker."""


class ProviderError(BonexrayError, RuntimeError):
    """The execution provider the settings demand is not active."""


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def intra_op_threads(settings: Settings) -> int:
    """Threads per session: the configured number, else cores shared among worker processes."""
    if settings.intra_op_threads > 0:
        return settings.intra_op_threads
    return max(1, available_cores() // max(1, settings.worker_processes))


def requested_providers(settings: Settings) -> list[str]:
    """Providers to ask onnxruntime for, in order of preference."""
    if settings.providers.strip().lower() != "auto":
        names = [p.strip() for p in settings.providers.split(",") if p.strip()]
        unknown = [p for p in names if p not in ort.get_all_providers()]
        if unknown:
            raise ProviderError(
                f"unknown onnxruntime provider(s) {', '.join(unknown)}; "
                f"known: {', '.join(ort.get_all_providers())}"
            )
        return names
    # onnxruntime-gpu lists CUDA as available even where no GPU or CUDA library exists; we
    # ask for it only where an NVIDIA device is present, and then trust only
    # session.get_providers() (its own log says why CUDA failed to load, if it did).
    if CUDA in ort.get_available_providers() and nvidia_device_present():
        return [CUDA, CPU]
    return [CPU]


def nvidia_device_present() -> bool:
    """True where the NVIDIA driver exposes a device (also inside a GPU container)."""
    return bool(nvidia_device_ids()) or os.path.exists("/proc/driver/nvidia/version")


def _visible_count(value: str) -> int:
    """How many devices CUDA sees under CUDA_VISIBLE_DEVICES=value: the entries before the
    first that is not a device (CUDA ignores the rest; '' or -1 hides every device)."""
    count = 0
    for entry in value.split(","):
        entry = entry.strip()
        if entry.isdigit() or entry.startswith(("GPU-", "MIG-")):
            count += 1
        else:
            break
    return count


def _nvml_count() -> int | None:
    """Devices NVML reports (a container given some GPUs sees only those), or None."""
    import ctypes

    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    count = ctypes.c_uint(0)
    try:
        if nvml.nvmlInit_v2() != 0:
            return None
        ok = nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0
        nvml.nvmlShutdown()
    except AttributeError:
        return None
    return int(count.value) if ok else None


def nvidia_device_ids() -> list[int]:
    """CUDA's indices of the devices this process can use: 0..n-1, as CUDA (and so
    onnxruntime's device_id) counts them, whatever the host calls them.

    n: CUDA_VISIBLE_DEVICES when it is set, else NVML's device count, else the number of
    /dev/nvidiaN files (a container given GPUs 2 and 3 has /dev/nvidia2 and /dev/nvidia3,
    which CUDA calls 0 and 1).
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return list(range(_visible_count(visible)))
    count = _nvml_count()
    if count is None:
        try:
            names = os.listdir("/dev")
        except OSError:
            return []
        count = sum(1 for name in names if name.startswith("nvidia") and name[6:].isdigit())
    return list(range(count))


def parse_gpus(spec: str) -> list[int]:
    """GPU indices from a --gpus / BONEXRAY_GPUS value: "", "all", or "0,2,3"."""
    spec = spec.strip().lower()
    if not spec:
        return []
    if spec == "all":
        ids = nvidia_device_ids()
        if not ids:
            raise ProviderError("--gpus all: no NVIDIA device visible here (CUDA_VISIBLE_DEVICES, "
                                "NVML, /dev/nvidiaN)")
        return ids
    try:
        ids = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ProviderError(f"--gpus {spec!r}: expected all or a list like 0,1,3") from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ProviderError(f"--gpus {spec!r}: indices must be distinct and >= 0")
    return ids


def device_for_process(gpus: Sequence[int], process_index: int) -> int:
    """The GPU a worker's pool process `process_index` is pinned to."""
    return gpus[process_index % len(gpus)]


def cuda_provider_options(settings: Settings) -> dict[str, Any]:
    """The CUDA provider's options: BONEXRAY_CUDA_OPTIONS plus this process's device."""
    options: dict[str, Any] = {}
    for item in settings.cuda_options.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ProviderError(f"BONEXRAY_CUDA_OPTIONS: {item.strip()!r} is not key=value "
                                "(e.g. cudnn_conv_algo_search=HEURISTIC)")
        options[key.strip()] = value.strip()
    if "device_id" in options:
        raise ProviderError("BONEXRAY_CUDA_OPTIONS: set the device with BONEXRAY_CUDA_DEVICE "
                            "or bonexray worker --gpus, not device_id")
    options["device_id"] = settings.cuda_device
    return options


def session_providers(wanted: Sequence[str], settings: Settings) -> list[Any]:
    """Provider list with options: the CUDA provider gets its options and this device."""
    return [(CUDA, cuda_provider_options(settings)) if p == CUDA else p for p in wanted]


def use_io_binding(settings: Settings, provider: str) -> bool:
    mode = settings.io_binding.lower()  # one of auto, on, off: Settings check it when made
    return mode == "on" or (mode == "auto" and provider == CUDA)


# A 69-byte ONNX graph (y = Identity(x)): enough to ask onnxruntime which provider it can
# really start, before any model is known (made with onnx.helper, opset 13, IR 8).
_PROBE_MODEL = base64.b64decode(
    "CAg6OwoQCgF4EgF5IghJZGVudGl0eRIFcHJvYmVaDwoBeBIKCggIARIECgIIAWIPCgF5EgoKCAgBEgQKAggBQgQKABAN"
)


def active_provider(settings: Settings) -> str:
    """The provider a session gets on this machine with these settings (a probe session)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    wanted = requested_providers(settings)
    session = ort.InferenceSession(_PROBE_MODEL, sess_options=options,
                                   providers=session_providers(wanted, settings))
    return str(session.get_providers()[0])


def check_provider_settings(settings: Settings) -> None:
    """Raise ProviderError for a malformed BONEXRAY_CUDA_OPTIONS or BONEXRAY_IO_BINDING."""
    cuda_provider_options(settings)
    use_io_binding(settings, CPU)


def check_required_gpu(settings: Settings) -> None:
    """Check the provider settings; with BONEXRAY_REQUIRE_GPU, refuse to start unless CUDA
    really runs here."""
    check_provider_settings(settings)
    if not settings.require_gpu:
        return
    provider = active_provider(settings)
    if provider != CUDA:
        raise ProviderError(
            f"BONEXRAY_REQUIRE_GPU is set but onnxruntime starts {provider}, not {CUDA} "
            f"(NVIDIA device present: {nvidia_device_present()}); refusing to start"
        )


class Classifier:
    """An onnxruntime session for one bonexray model file, ready for uint8 batches."""

    def __init__(self, path: str | Path, *, settings: Settings,
                 expected_sha256: str | None = None) -> None:
        self.path = str(path)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"cannot read model {path}: {exc.strerror or exc}") from None
        self.sha256 = sha256_bytes(data)
        if expected_sha256 is not None and self.sha256 != expected_sha256:
            raise ModelMismatchError(
                f"model {path}: sha256 mismatch: file has {self.sha256[:16]}…, registry "
                f"expects {expected_sha256[:16]}…; refusing to load a changed model file"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads(settings)
        options.inter_op_num_threads = 1
        check_provider_settings(settings)
        wanted = requested_providers(settings)
        providers = session_providers(wanted, settings)
        try:
            self.session = ort.InferenceSession(data, sess_options=options,
                                                providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelLoadError(f"model {path} is not a loadable ONNX model: "
                                 f"{one_line(exc, limit=300)}") from None
        self.providers = self.session.get_providers()
        self.provider = self.providers[0]
        if CUDA in wanted and self.provider != CUDA and settings.cuda_options.strip():
            # onnxruntime falls back to the CPU when the CUDA provider refuses its options:
            # a GPU node must not quietly run on its CPU because of a mistyped option.
            raise ProviderError(
                f"the CUDA provider did not start with BONEXRAY_CUDA_OPTIONS="
                f"{settings.cuda_options!r} (onnxruntime's message above says why)")
        if CUDA in wanted and self.provider != CUDA:
            log.warning("CUDA provider requested but not active (see onnxruntime's message "
                        "on the CUDA/cuDNN libraries above); running on %s", self.provider)
        elif CUDA not in wanted and settings.providers.strip().lower() == "auto":
            log.info("no NVIDIA GPU found on this machine; running on %s", self.provider)
        if settings.require_gpu and self.provider != CUDA:
            raise ProviderError(
                f"BONEXRAY_REQUIRE_GPU is set but the active provider is {self.provider} "
                f"(asked for {', '.join(wanted)})"
            )
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.info: ModelInfo = parse_metadata(meta, source=f"model {path}")
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if INPUT_NAME not in inputs or inputs[INPUT_NAME].type != "tensor(uint8)":
            raise ModelLoadError(f"model {path}: expected a uint8 input named {INPUT_NAME!r}")
        if OUTPUT_PROB not in outputs:
            raise ModelLoadError(f"model {path}: expected an output named {OUTPUT_PROB!r}")
        if self.info.precision == "fp16" and self.provider != CUDA:
            log.warning("model %s is fp16 but runs on %s, where fp16 is slow: give CPU "
                        "workers the fp32 or int8 export", Path(path).name, self.provider)
        elif self.info.precision == "int8" and self.provider == CUDA:
            log.warning("model %s is int8 (QDQ), made for CPU workers; on CUDA the fp16 "
                        "export is the fast one", Path(path).name)
        self.io_binding = use_io_binding(settings, self.provider)
        self._device = ("cuda", settings.cuda_device) if self.provider == CUDA else ("cpu", 0)
        # Device buffers by batch shape, least recently used first.
        self._inputs: OrderedDict[tuple[int, ...], ort.OrtValue] = OrderedDict()
        self._lock = threading.Lock()
        device = f" device {settings.cuda_device}" if self.provider == CUDA else ""
        log.info("model %s (sha256 %s…, %s %s, %d px) on %s%s with %d intra-op threads%s",
                 Path(path).name, self.sha256[:12], self.info.architecture,
                 self.info.precision, self.info.input_size, self.provider, device,
                 options.intra_op_num_threads, ", IO binding" if self.io_binding else "")

    @property
    def input_size(self) -> int:
        return self.info.input_size

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Abnormality probabilities, float32 [N], for uint8 pixels [N, 1, S, S]."""
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1] != 1:
            raise ValueError(f"expected uint8 [N,1,S,S], got {pixels.dtype} {pixels.shape}")
        if not self.io_binding:
            (probs,) = self.session.run([OUTPUT_PROB], {INPUT_NAME: pixels})
            return np.asarray(probs, dtype=np.float32).reshape(-1)
        with self._lock:  # the input buffers are reused: one call at a time
            return self._predict_bound(np.ascontiguousarray(pixels))

    def _predict_bound(self, pixels: np.ndarray) -> np.ndarray:
        """IO binding: the batch is copied into a buffer on the session's device that is
        kept per batch shape (no allocation per call); the output is bound to host memory."""
        kind, device_id = self._device
        buffer = self._inputs.get(pixels.shape)
        if buffer is not None:
            self._inputs.move_to_end(pixels.shape)
        else:
            if len(self._inputs) >= 8:  # a chunk's odd last batches: keep a few shapes
                self._inputs.popitem(last=False)
            buffer = ort.OrtValue.ortvalue_from_shape_and_type(pixels.shape, np.uint8, kind,
                                                               device_id)
            self._inputs[pixels.shape] = buffer
        buffer.update_inplace(pixels)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(INPUT_NAME, buffer)
        binding.bind_output(OUTPUT_PROB, "cpu")
        self.session.run_with_iobinding(binding)
        (probs,) = binding.copy_outputs_to_cpu()
        return np.asarray(probs, dtype=np.float32).reshape(-1)
