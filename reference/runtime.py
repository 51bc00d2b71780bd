"""Where a run executes and in which precision: device choice, autocast and the GradScaler."""
from contextlib import nullcontext

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
              "float16": torch.float16}


def resolve_device(device="auto") -> torch.device:
    """"auto" picks CUDA, then MPS, then CPU. An explicit device that is missing is an error."""
    if isinstance(device, torch.device):
        device = str(device)
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for, but CUDA is not available on this "
                         "machine; use device='auto' or 'cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} was asked for, but MPS is not available; "
                         "use device='auto' or 'cpu'")
    return dev


def resolve_amp_dtype(device, use_amp=False, amp_dtype=None):
    """The autocast dtype, or None for full fp32.

    use_amp=True means bf16 where the device supports it, else fp16 (CUDA without bf16).
    amp_dtype ("bf16", "fp16" or a torch dtype) chooses explicitly and implies use_amp; "auto"
    is the chapters' default: bf16 on CUDA (fp16 without bf16), fp32 elsewhere, because CPUs
    without bf16 instructions run autocast several times slower than fp32."""
    if amp_dtype == "off":
        return None
    if amp_dtype == "auto":
        if device.type != "cuda":
            return None
        amp_dtype = None
        use_amp = True
    if amp_dtype is None and not use_amp:
        return None
    if amp_dtype is None:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    dtype = AMP_DTYPES.get(amp_dtype, amp_dtype) if isinstance(amp_dtype, str) else amp_dtype
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"amp_dtype must be 'bf16' or 'fp16', got {amp_dtype!r}")
    if not torch.amp.is_autocast_available(device.type):
        raise ValueError(f"autocast is not available on device type {device.type!r}; turn AMP off")
    if dtype == torch.float16 and not _fp16_autocast_works(device):
        raise ValueError(f"fp16 autocast is not supported on {device}; use bf16 or turn AMP off")
    return dtype


def _fp16_autocast_works(device) -> bool:
    try:
        with torch.autocast(device.type, dtype=torch.float16):
            x = torch.ones(2, 2, device=device)
            return (x @ x).dtype == torch.float16
    except (RuntimeError, AssertionError):
        return False


def autocast_context(device, dtype):
    """torch.autocast for `dtype`, or a no-op context for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def make_grad_scaler(device, dtype):
    """A GradScaler, enabled only for fp16: bf16 has fp32's exponent range and needs no scaling."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
