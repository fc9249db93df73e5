"""Write pickles laid out like official EDM `.pkl` files, from our own networks, for loader tests.

EDM's `torch_utils.persistence` reduces every decorated module to `_reconstruct_persistent_obj(meta)` with
meta = dict(type='class', version=6, module_src=..., class_name=..., state=<the module's __dict__ plus
_init_args/_init_kwargs>). Torch containers (ModuleDict) and tensors pickle the ordinary way, which gives
`torch._utils._rebuild_tensor_v2`/`_rebuild_parameter` over `torch.storage._load_from_bytes` legacy storages.
"""

from __future__ import annotations

import pickle
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

PERSISTENCE = "torch_utils.persistence"

# Stands in for EDM's networks.py source: if a loader ever executed module_src, this file would appear.
HOSTILE_SRC_MARKER = "module_src_was_executed"


def hostile_module_src(marker_dir: Path) -> str:
    return f"open({str(marker_dir / HOSTILE_SRC_MARKER)!r}, 'w').close()\n"


@contextmanager
def fake_persistence() -> Iterator[Any]:
    """Register a stand-in `torch_utils.persistence` so pickle can name its reconstruct function by reference."""
    package, module = types.ModuleType("torch_utils"), types.ModuleType(PERSISTENCE)

    def _reconstruct_persistent_obj(meta: dict) -> Any:
        raise AssertionError("fixture pickles are only ever read by the loader under test")

    _reconstruct_persistent_obj.__module__ = PERSISTENCE
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    saved = {name: sys.modules.get(name) for name in ("torch_utils", PERSISTENCE)}
    sys.modules.update({"torch_utils": package, PERSISTENCE: module})
    try:
        yield _reconstruct_persistent_obj
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


class _EDMPickler(pickle.Pickler):
    def __init__(self, file: Any, reconstruct: Any, top: torch.nn.Module, init_kwargs: dict, module_src: str,
                 extra_state: dict[str, Any]) -> None:
        super().__init__(file, protocol=4)  # EDM's pickle.dump default under Python >= 3.8
        self.reconstruct, self.top, self.init_kwargs = reconstruct, top, init_kwargs
        self.module_src, self.extra_state = module_src, extra_state

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, torch.nn.Module) or type(obj).__module__.startswith("torch."):
            return NotImplemented
        state = dict(obj.__dict__)
        if obj is self.top:
            state.update(_init_args=(), _init_kwargs=self.init_kwargs)
        else:
            # Nested EDM blocks record numpy scalars such as skip_scale=np.sqrt(0.5) among their kwargs.
            kwargs = dict(skip_scale=np.sqrt(0.5), init=dict(init_mode="xavier_uniform"))
            state.update(_init_args=(), _init_kwargs=kwargs, **self.extra_state)
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=type(obj).__name__, state=state)
        return self.reconstruct, (meta,)


def write_edm_pickle(path: Path, net: torch.nn.Module, init_kwargs: dict, *, module_src: str = "",
                     extra: dict[str, Any] | None = None, nested_state: dict[str, Any] | None = None) -> Path:
    """Pickle {'ema': net, **extra} as EDM's training loop does; `nested_state` is added to every nested record."""
    with fake_persistence() as reconstruct, open(path, "wb") as f:
        pickler = _EDMPickler(f, reconstruct, net, init_kwargs, module_src, nested_state or {})
        pickler.dump({"ema": net, **(extra or {})})
    return path
