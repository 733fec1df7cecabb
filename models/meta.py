"""Building a model without its parameters' memory: parameters on the meta device, buffers real.

A sharded engine builds the model inside `parameters_on_meta()`, applies activation
checkpointing, compile and sharding to the meta model, then allocates only its own shards and
fills them unit by unit (`SplitVLM.unit_initial_values`). Buffers (a few position ids and noise
schedules) are computed on the CPU as usual, so nothing has to know how to recompute them.
"""

from __future__ import annotations

import contextlib
import threading

from torch import nn

_state = threading.local()


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter registered inside goes to the meta device (its constructor's init runs on
    meta tensors, for free); pretrained weights are not loaded (`building_on_meta()`)."""
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_parameter
    _state.on_meta = True
    try:
        yield
    finally:
        nn.Module.register_parameter = original
        _state.on_meta = False


@contextlib.contextmanager
def weights_filled_later():
    """Construction for an engine that fills every parameter itself afterwards (DeepSpeed
    ZeRO-3's partitioned construction): pretrained weights are not loaded here either."""
    _state.filled_later = True
    try:
        yield
    finally:
        _state.filled_later = False


def building_on_meta() -> bool:
    """Whether the model being built gets its weights from the engine (on meta, or partitioned
    as it is constructed) rather than from its constructor."""
    return getattr(_state, "on_meta", False) or getattr(_state, "filled_later", False)
