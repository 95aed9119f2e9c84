"""How a patch is recorded and undone: :class:`PatchHandle`, :func:`set_instance_forward`, :func:`unwrap_model`.

Every patch in ``qlora_med.patches`` changes one model *instance* (``module.__dict__["forward"]``, a config
attribute), never a class or a module, and returns a :class:`PatchHandle`; ``handle.undo()`` (or leaving
``with handle:``) puts back exactly what was there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

logger = logging.getLogger(__name__)
_MISSING = object()


@dataclass
class PatchHandle:
    """What a patch changed; :meth:`undo` restores it (idempotent). Usable as a context manager."""

    description: str
    targets: list[str] = field(default_factory=list)
    _restores: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def undo(self) -> None:
        while self._restores:
            self._restores.pop()()
        if self.targets:
            logger.info("undid %s on %d modules", self.description, len(self.targets))
        self.targets = []

    def __len__(self) -> int:
        return len(self.targets)

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()


def set_instance_forward(handle: PatchHandle, name: str, module: nn.Module, forward: Callable) -> None:
    """Shadow ``module.forward`` with ``forward`` and record how to put the old one back."""
    previous = module.__dict__.get("forward", _MISSING)

    def restore() -> None:
        if previous is _MISSING:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = previous

    module.__dict__["forward"] = forward
    handle.targets.append(name)
    handle._restores.append(restore)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT / DDP / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        elif hasattr(model, "_orig_mod"):
            inner = model._orig_mod
        else:
            return model
        if inner is model:
            return model
        model = inner
