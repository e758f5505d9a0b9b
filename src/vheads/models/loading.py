"""`load()`: a vision-language model, its processor and its family adapter, from a hub id or a folder."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from vheads.models.families import Adapter, ModelError, adapter_for
from vheads.models.processors import load_processor, needs_torchvision_free_route

log = logging.getLogger("vheads.models")

DEMO_DIR = Path(__file__).parents[1] / "demo" / "weights"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Loaded:
    """A loaded model with what vheads needs around it."""

    model: torch.nn.Module
    processor: object
    adapter: Adapter
    name: str

    @property
    def family(self) -> str:
        """The adapter family (llava, llava_next, vipllava, generic)."""
        return self.adapter.family

    @property
    def device(self) -> torch.device:
        """Where the inputs go (the device of the input embeddings)."""
        return self.model.get_input_embeddings().weight.device

    def on_device(self, inputs: Any) -> Any:
        """Encoded inputs (`adapter.encode`) moved to the model's device, float pixel values in the model's dtype
        (a bf16 model would otherwise get fp32 images)."""
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs


def demo_path() -> Path:
    """The folder of the embedded demo model shipped in the package."""
    return DEMO_DIR


def resolve(model: str | Path | None) -> tuple[str, bool]:
    """The model reference to load and whether it is a local folder; None means the embedded demo model."""
    if model is None or str(model) in ("", "demo"):
        if not (DEMO_DIR / "config.json").exists():
            raise ModelError(f"the embedded demo model is missing from {DEMO_DIR}; reinstall vheads or pass --model")
        return str(DEMO_DIR), True
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model path {path} is a file; pass the folder written by save_pretrained")
        if not (path / "config.json").exists():
            raise ModelError(f"model folder {path} has no config.json")
        _check_safetensors(path)
        return str(path), True
    if _looks_local(text):
        raise ModelError(f"model path {text} does not exist (no model folder there; a hub id is OWNER/NAME)")
    if _offline() and not _cached(text):
        raise ModelError(f"no model folder {text}, and it is not in the Hugging Face cache (offline: HF_HUB_OFFLINE "
                         "or TRANSFORMERS_OFFLINE is set)")
    return text, False


def _looks_local(text: str) -> bool:
    """A reference that can only be meant as a folder: ./x, /x, ~/x, x/, a\\b, a/b/c, or a/b whose `a` exists here."""
    if text.startswith((".", "/", "~")) or text.endswith("/") or "\\" in text or text.count("/") > 1:
        return True
    return "/" in text and Path(text.split("/")[0]).expanduser().is_dir()


def _offline() -> bool:
    """Whether the Hugging Face hub may not be contacted."""
    return any(os.environ.get(key, "").strip().lower() in ("1", "true", "yes", "on")
               for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _cached(repo_id: str) -> bool:
    """Whether the hub model `repo_id` has a config in the local cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an id the cache cannot even parse is not cached
        return False


def _check_safetensors(path: Path) -> None:
    """A folder with only pickle weights (`*.bin`) is refused with the command that converts it."""
    if any(path.glob("*.safetensors")) or not any(path.glob("*.bin")):
        return
    pickles = ", ".join(sorted(p.name for p in path.glob("*.bin"))[:2])
    raise ModelError(
        f"model folder {path} holds only pickle weights ({pickles}); vheads loads safetensors only, since a .bin file "
        "can run code when loaded. If you trust it, convert it once: python -c \"from transformers import "
        f"AutoModelForImageTextToText as M; M.from_pretrained('{path}', use_safetensors=False)"
        f".save_pretrained('{path}-safetensors')\" (then copy the processor files, or use save_pretrained of "
        "AutoProcessor too)")


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device(device: str) -> str:
    """`device` if this machine has it: auto, cpu, mps, cuda or cuda:N; a one-line ModelError otherwise."""
    if not DEVICE.fullmatch(device):
        raise ModelError(f"unknown --device {device!r}; expected auto, cpu, cuda, cuda:N or mps")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"--device {device}: no CUDA GPU is available on this machine; use --device cpu or auto")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ModelError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelError("--device mps: MPS is not available on this machine; use --device cpu or auto")
    return device


def _dtype(dtype: str | torch.dtype, device: str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device != "cpu" and torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"unknown --dtype {dtype!r}; expected auto, {', '.join(sorted(set(DTYPES)))}")
    return DTYPES[dtype]


def load(model: str | Path | None = None, dtype: str | torch.dtype = "auto", device: str = "auto",
         attn: str = "sdpa", trust_remote_code: bool = False) -> Loaded:
    """Load a model for vheads: safetensors only, remote code off unless asked, processor with left padding.

    `device`: "auto" (all GPUs through accelerate's device_map="auto" when there are GPUs, else the CPU),
    "cpu", "cuda", "cuda:N". `attn`: the kernel the language model runs (sdpa, eager, flash_attention_2, ...);
    vheads wraps it, never replaces it.
    """
    check_device(device)
    ref, local = resolve(model)
    if device == "auto":
        device_map: str | None = "auto" if torch.cuda.is_available() else None
        target = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device_map, target = None, device
    torch_dtype = _dtype(dtype, target)
    processor = load_any_processor(ref, trust_remote_code)
    if getattr(processor, "image_processor", None) is None and not hasattr(processor, "image_token"):
        raise ModelError(f"{ref} has no image processor: vheads needs an image-text-to-text model")
    try:
        net = AutoModelForImageTextToText.from_pretrained(
            ref, dtype=torch_dtype, attn_implementation=attn, use_safetensors=True,
            trust_remote_code=trust_remote_code, device_map=device_map,
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot load model {ref}: {_first_line(exc)}") from exc
    if device_map is None:
        net = net.to(target)
    net.eval()
    return Loaded(net, processor, adapter_for(net, processor), ref if not local else str(Path(ref).resolve()))


def load_any_processor(ref: str, trust_remote_code: bool = False) -> object:
    """The model's processor: `AutoProcessor` where torchvision is installed (or remote code is asked for); where
    it is missing, or `AutoProcessor` fails, the family's processor class over its image processor and tokenizer,
    without the video part."""
    try:
        family = str(getattr(AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code), "model_type", ""))
    except Exception as exc:  # noqa: BLE001 - every loader failure becomes one clear line
        raise ModelError(f"cannot read the config of {ref}: {_first_line(exc)}") from exc
    first: BaseException | None = None
    if trust_remote_code or not needs_torchvision_free_route():
        try:
            return AutoProcessor.from_pretrained(ref, trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - e.g. a torchvision that is installed but does not load
            first = exc
    try:
        return load_processor(ref, family or "unknown family")
    except Exception as exc:  # noqa: BLE001
        detail = _first_line(exc) if first is None else f"{_first_line(first)}; without torchvision: {_first_line(exc)}"
        raise ModelError(f"cannot load a processor for {ref} ({family}): {detail}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
