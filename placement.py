"""Where things run: the one home of the device choice, of the training precision's default, and of
CPU offload between uses.

    resolve_device("auto")       the GPU when one is present, else the CPU (model, demos, metric.py,
                                 the feature cache); `accelerator("auto")` is the same rule in
                                 Lightning's words (train_eval.py)
    default_precision(accel)     bf16-mixed on a GPU, 32-true on a CPU (train_eval.py's --precision)
    place(module, device, ...)   every part on the device, or some kept on the CPU taking turns
                                 (`TakeTurns`, accelerate's hooks): `MiniGPT5_Model.place`
    add_placement_arguments      --device, --llm_quantization, --offload (playground, web demo); the LLM
                                 quantised with bitsandbytes is built by `minigpt4.llm_quantization_config`

The dtype of each part is the model config's (`configuration.to_dtype`), not chosen here.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


# The LLM's optional bitsandbytes quantisation (`--llm_quantization`), for smaller GPUs, and the extra it needs.
LLM_QUANTIZATION = ("8bit", "4bit")
QUANTIZATION_REQUIREMENTS = "requirements-quantization.txt"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: as given, or (None / "auto") the GPU when one is present, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but no CUDA GPU is available (use --device cpu)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def accelerator(name: str = "auto") -> str:
    """Lightning's accelerator for `--accelerator`: as given, or ("auto") "gpu" when a GPU is present,
    else "cpu" (the rule of `resolve_device`)."""
    if name == "auto":
        return "gpu" if resolve_device("auto").type == "cuda" else "cpu"
    return name


def gpu_ids(gpus: str | None) -> list[int]:
    """The device ids a `--gpus` value lists ("0,1" -> [0, 1]; not given -> []). On a CPU each id is
    one training process (train_eval.py: `devices_of`)."""
    return [int(x) for x in str(gpus).split(",") if x.strip() != ""] if gpus is not None else []


def default_precision(accelerator_name: str) -> str:
    """Lightning's precision when `--precision` is not given: bf16-mixed on a GPU (the release's
    choice), full float32 on a CPU."""
    return "bf16-mixed" if accelerator_name == "gpu" else "32-true"


def add_placement_arguments(parser) -> None:
    """The command-line flags that say where the model runs (playground, web demo, benchmarks)."""
    parser.add_argument("--device", default="auto",
                        help="where the model runs: auto (the GPU when one is present, else the CPU), cpu, cuda, "
                             "cuda:1, ... (default: %(default)s)")
    parser.add_argument("--llm_quantization", choices=LLM_QUANTIZATION, default=None,
                        help="load the LLM's linear layers in 8-bit (the release's low_resource mode) or 4-bit NF4 "
                             f"with bitsandbytes (pip install -r {QUANTIZATION_REQUIREMENTS}); for 12 GB and 8 GB GPUs")
    parser.add_argument("--offload", action="store_true",
                        help="keep the image encoder and Stable Diffusion on the CPU between uses, moving each "
                             "to the device while it runs (with 4-bit: for 8 GB GPUs)")


def placement_kwargs(args) -> dict:
    """`from_weights` keyword arguments from the flags of `add_placement_arguments`."""
    return {"device": args.device, "llm_quantization": args.llm_quantization, "offload": args.offload}


def place(module: nn.Module, device: torch.device, offloaded: Sequence[nn.Module] = ()) -> "TakeTurns | None":
    """Move every part of `module` to `device` except the `offloaded` parts, which go to the CPU and
    take turns on the device (`TakeTurns`, returned; None without offloaded parts). Parts already
    there are left alone (a quantised LLM was loaded on its device and cannot move)."""
    skip = {id(m) for part in offloaded for m in part.modules()}
    for sub in module.modules():
        if id(sub) in skip:
            continue
        own = [t for t in (*sub._parameters.values(), *sub._buffers.values()) if t is not None]
        if any(t.device != device for t in own):
            sub._apply(lambda t: t.to(device), recurse=False)
    return TakeTurns(device, offloaded) if offloaded else None


class TakeTurns:
    """CPU offload for parts used one after another: each part stays on the CPU until it runs; just
    before it runs, it moves to `device` and the part that ran before it goes back to the CPU.

    Built on accelerate's hook API (a `ModelHook` per part, added with `add_hook_to_module`): the
    hook wraps `forward` (and diffusers' `AutoencoderKL.decode` / `encode`, which call it too), moves
    the inputs along, and tells diffusers pipelines the device to run on (`execution_device`).
    Unlike `accelerate.cpu_offload_with_hook`, whose chain is fixed, any part may follow any other
    (the SD baseline runs the text encoder before the UNet; generation runs the ViT before it)."""

    def __init__(self, device: torch.device, parts: Sequence[nn.Module] = ()):
        self.device = torch.device(device)
        self.parts: list[nn.Module] = []
        self.turns = 0                      # parts run so far (for tests and benchmarks)
        self.moves = 0                      # of which had to be copied to the device first
        for part in parts:
            self.add(part)

    def add(self, part: nn.Module) -> None:
        """Put `part` on the CPU and make it take its turn on the device when it runs."""
        from accelerate.hooks import ModelHook, add_hook_to_module
        from accelerate.utils import send_to_device

        group = self

        class _Turn(ModelHook):
            execution_device = self.device

            def init_hook(self, module):
                return module.to("cpu")

            def pre_forward(self, module, *args, **kwargs):
                group._make_room(module)
                return send_to_device(args, group.device), send_to_device(kwargs, group.device)

        add_hook_to_module(part, _Turn(), append=True)
        self.parts.append(part)

    def _make_room(self, running: nn.Module) -> None:
        self.turns += 1
        for part in self.parts:
            if part is not running and _device_of(part) != torch.device("cpu"):
                part.to("cpu")
        if _device_of(running) != self.device:
            running.to(self.device)
            self.moves += 1

    def offload_all(self) -> None:
        """Send every part back to the CPU."""
        for part in self.parts:
            part.to("cpu")

    def remove(self) -> None:
        """Take the hooks off (the parts stay where they are)."""
        from accelerate.hooks import remove_hook_from_module

        for part in self.parts:
            remove_hook_from_module(part)
        self.parts = []


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
