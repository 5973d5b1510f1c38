"""Trace a module's input and output by name (the ROME code's `nethook` idea, reduced).

    with Trace(model, ["transformer.h.3.mlp.c_proj"], stop=True) as tr:
        model(**batch)
    k = tr.inputs["transformer.h.3.mlp.c_proj"]

`edit_output(name, output) -> output` may rewrite a module's output (used to inject the value
delta while optimizing v*). With `stop=True` the forward pass is aborted right after the last
traced module, so nothing above it (and never the LM head) is computed.
"""

from __future__ import annotations

from typing import Callable

import torch

from .registry import get_module


class StopForward(Exception):
    pass


class Trace:
    def __init__(
        self,
        model: torch.nn.Module,
        names: list[str],
        stop: bool = False,
        edit_output: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        keep_inputs: bool = True,
        keep_outputs: bool = True,
    ):
        self.model = model
        self.names = list(names)
        self.stop = stop
        self.edit_output = edit_output
        self.keep_inputs = keep_inputs
        self.keep_outputs = keep_outputs
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        self._seen: set[str] = set()

    def _hook(self, name: str):
        def hook(module, args, output):
            if self.keep_inputs and args:
                self.inputs[name] = args[0]
            out = output[0] if isinstance(output, tuple) else output
            if self.edit_output is not None:
                new = self.edit_output(name, out)
                if new is not out:
                    output = (new, *output[1:]) if isinstance(output, tuple) else new
                    out = new
            if self.keep_outputs:
                self.outputs[name] = out
            self._seen.add(name)
            if self.stop and len(self._seen) == len(self.names):
                raise StopForward
            return output

        return hook

    def __enter__(self) -> "Trace":
        for name in self.names:
            self._handles.append(get_module(self.model, name).register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return exc_type is StopForward
