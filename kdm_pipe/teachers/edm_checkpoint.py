"""Teacher weights without running pickled code: official EDM `.pkl` files and the project's state-dict checkpoints
(`.pt` or `.safetensors`, each with a `.json` spec beside it; `kdm-pipe teacher convert` turns a `.pkl` into one).

EDM pickles every network class as `torch_utils.persistence._reconstruct_persistent_obj(meta)`, where
`meta['module_src']` is Python source that EDM's own loader executes. Here an allow-listing unpickler turns each
such call into an inert `PickledModule` record (class name + the module's `__dict__`), tensors are rebuilt only
from storages loaded with `torch.load(weights_only=True)`, and the network is rebuilt from our own
`kdm_pipe.networks` classes by `class_name` and the recorded constructor kwargs.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import pickle
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kdm_pipe import networks, storage


class CheckpointError(ValueError):
    """A checkpoint file is refused or does not match the network it claims to hold."""


@dataclass
class EDMCheckpoint:
    """A ready network (eval mode) with its constructor spec, the file's sha256 and the file's top-level keys."""

    net: torch.nn.Module
    class_name: str
    init_kwargs: dict[str, Any]
    sha256: str
    keys: tuple[str, ...]


class PickledModule:
    """Inert stand-in for a pickled module: its class name and its `__dict__` (`state`), nothing callable."""

    class_name = "?"

    def __init__(self, class_name: str, state: dict) -> None:
        self.class_name = class_name
        self.state = state

    def __setstate__(self, state: dict) -> None:
        # torch.nn containers arrive as NEWOBJ + BUILD: the stub class is instantiated bare, then given its __dict__.
        self.state = state


def _reconstruct_persistent_obj(meta: dict) -> PickledModule:
    # meta = dict(type, version, module_src, class_name, state); module_src is deliberately never looked at.
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise CheckpointError("persistent object is not a pickled class instance")
    if not isinstance(meta.get("class_name"), str) or not isinstance(meta.get("state"), dict):
        raise CheckpointError("persistent object lacks class_name/state")
    return PickledModule(meta["class_name"], meta["state"])


def _load_storage(data: bytes) -> torch.storage.TypedStorage:
    # Each storage is a legacy-format torch.save of that storage alone; weights_only reads it without pickle globals.
    storage = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    if not isinstance(storage, torch.storage.TypedStorage):
        raise CheckpointError(f"expected a tensor storage, got {type(storage).__name__}")
    return storage


def _rebuild_tensor(
    storage: Any, offset: int, size: tuple, stride: tuple, requires_grad: bool, hooks: Any, metadata: Any = None
) -> torch.Tensor:
    # torch's own _rebuild_tensor_v2 does not bounds-check size/stride against the storage: a crafted pickle
    # could read past it. Hooks and metadata are dropped: only values matter here.
    if not isinstance(storage, torch.storage.TypedStorage):
        raise CheckpointError("tensor is not backed by a storage")
    if not (isinstance(offset, int) and offset >= 0 and len(size) == len(stride)):
        raise CheckpointError("malformed tensor layout")
    if any(not isinstance(v, int) or v < 0 for v in (*size, *stride)):
        raise CheckpointError("malformed tensor layout")
    numel = storage._untyped_storage.nbytes() // storage.element_size()
    if all(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= numel:
        raise CheckpointError("tensor extends past its storage")
    return torch.empty(0, dtype=storage.dtype).set_(storage._untyped_storage, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: bool, hooks: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise CheckpointError("parameter does not hold a tensor")
    return data


def _numpy_scalar(dtype: np.dtype, data: bytes) -> int | float | bool | complex:
    # numpy scalars in constructor args become plain Python numbers; object dtypes would unpickle arbitrary objects.
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, bytes):
        raise CheckpointError(f"refusing numpy scalar of dtype {dtype!r}")
    return np.frombuffer(data, dtype=dtype, count=1)[0].item()


_ALLOWED: dict[tuple[str, str], Callable] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): np.dtype,
}


class _EDMUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, source: str) -> None:
        super().__init__(file)
        self.source = source
        self.stubs: dict[str, type[PickledModule]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module.startswith("torch.nn.modules.") and self._is_torch_module(module, name):
            qualname = f"{module}.{name}"
            return self.stubs.setdefault(qualname, type(name, (PickledModule,), {"class_name": qualname}))
        raise CheckpointError(f"refusing global {module}.{name} in {self.source}: not an EDM network pickle")

    @staticmethod
    def _is_torch_module(module: str, name: str) -> bool:
        # Look the name up among torch's already-imported modules; never import what a pickle names.
        cls = getattr(torch.nn, name, None)
        return isinstance(cls, type) and issubclass(cls, torch.nn.Module) and cls.__module__ == module


def _state_dict(record: PickledModule, prefix: str = "") -> dict[str, torch.Tensor]:
    state = getattr(record, "state", None)
    if not isinstance(state, dict):
        raise CheckpointError(f"module {prefix or '<root>'} ({record.class_name}) has no state")
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    out: dict[str, torch.Tensor] = {}
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{prefix}{name} is not a tensor")
            out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, PickledModule):
            raise CheckpointError(f"{prefix}{name} is not a module")
        out.update(_state_dict(child, f"{prefix}{name}."))
    return out


def _plain(value: Any, where: str) -> Any:
    """Constructor args as JSON-able Python values (tuples become lists), refusing anything else."""
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise CheckpointError(f"constructor argument {where} has unsupported type {type(value).__name__}")


def _init_kwargs(record: PickledModule, cls: type) -> dict[str, Any]:
    args = record.state.get("_init_args") or ()
    kwargs = record.state.get("_init_kwargs") or {}
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise CheckpointError(f"{record.class_name} has malformed _init_args/_init_kwargs")
    # EDM builds networks with keywords only, but the record allows positionals: name them by our signature.
    params = list(inspect.signature(cls).parameters.values())[: len(args)]
    if len(params) < len(args) or any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in params):
        raise CheckpointError(f"cannot map positional args of {record.class_name} onto {cls.__name__}")
    named = {p.name: a for p, a in zip(params, args)} | kwargs
    return {k: _plain(v, k) for k, v in named.items()}


def _network_class(class_name: str, path: Path) -> type:
    if class_name not in networks.NETWORKS:
        raise CheckpointError(f"{path.name}: unknown network class {class_name!r} (known: {sorted(networks.NETWORKS)})")
    return networks.NETWORKS[class_name]


def _build(
    class_name: str, init_kwargs: dict[str, Any], state: dict[str, torch.Tensor], sha256: str,
    keys: tuple[str, ...], device: torch.device | str,
) -> EDMCheckpoint:
    try:
        net = networks.build_network(class_name, **init_kwargs)
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError, KeyError, AssertionError) as e:
        raise CheckpointError(f"weights do not fit {class_name}({init_kwargs}): {e}") from e
    return EDMCheckpoint(net.to(device).eval(), class_name, init_kwargs, sha256, keys)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_edm_pickle(path: str | Path, key: str = "ema", device: torch.device | str = "cpu") -> EDMCheckpoint:
    """Load the network `key` of an official EDM `.pkl` without executing anything the file contains."""
    path = Path(path)
    data = path.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            top = _EDMUnpickler(io.BytesIO(data), path.name).load()
    except CheckpointError:
        raise
    except Exception as e:  # a damaged or hostile file can fail anywhere inside pickle; report it as one kind
        raise CheckpointError(f"cannot read {path.name}: {type(e).__name__}: {e}") from e
    if not isinstance(top, dict) or not isinstance(top.get(key), PickledModule):
        raise CheckpointError(f"{path.name} holds no network under {key!r}")
    record = top[key]
    init_kwargs = _init_kwargs(record, _network_class(record.class_name, path))
    return _build(record.class_name, init_kwargs, _state_dict(record), _sha256(data), tuple(top), device)


def _spec_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_state_dict_checkpoint(
    net: torch.nn.Module, class_name: str, init_kwargs: dict[str, Any], path: str | Path
) -> Path:
    """Write `path` (the state dict: a plain `torch.save` for `.pt`, safetensors for `.safetensors`) and
    `path.with_suffix('.json')` beside it.

    The JSON holds {"class_name", "init_kwargs", "sha256"} (sha256 of the weights file), so both files load with
    `weights_only=True` (or safetensors) and `json` alone. Each file is written to a temporary name and renamed into
    place (fsync'd). Returns the JSON path.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    if path.suffix == ".safetensors":
        payload = _safetensors().save(state, metadata={"format": "pt"})
    else:
        buf = io.BytesIO()
        torch.save(state, buf)
        payload = buf.getvalue()
    spec = dict(class_name=class_name, init_kwargs=_plain(init_kwargs, "init_kwargs"), sha256=_sha256(payload))
    spec_path = _spec_path(path)
    storage.write_bytes(path, payload)
    storage.write_bytes(spec_path, json.dumps(spec, indent=2).encode())
    return spec_path


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise CheckpointError("safetensors weights need the safetensors package: pip install 'kdm-pipe[diffusers]'")
    return safetensors.torch


def load_state_dict_checkpoint(
    path: str | Path, spec: dict[str, Any] | None = None, device: torch.device | str = "cpu"
) -> EDMCheckpoint:
    """Load a state-dict `.pt` or `.safetensors` into
    `networks.build_network(spec['class_name'], **spec['init_kwargs'])`.

    Without `spec`, the JSON written beside it by `save_state_dict_checkpoint` is used and its sha256 checked.
    `keys` of the result are the state-dict names (the file's top-level dict).
    """
    path = Path(path)
    if spec is None:
        spec = json.loads(_spec_path(path).read_text())
    data = path.read_bytes()
    sha256 = _sha256(data)
    if spec.get("sha256") not in (None, sha256):
        raise CheckpointError(f"{path.name} does not match the sha256 in its spec (file changed after saving?)")
    try:
        state = (_safetensors().load(data) if path.suffix == ".safetensors"
                 else torch.load(io.BytesIO(data), weights_only=True, map_location="cpu"))
    except CheckpointError:
        raise
    except Exception as e:  # weights_only refusals and corrupt archives alike
        raise CheckpointError(f"cannot read {path.name}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path.name} is not a state dict of tensors")
    class_name = spec["class_name"]
    _network_class(class_name, path)
    return _build(class_name, _plain(spec.get("init_kwargs", {}), "init_kwargs"), state, sha256, tuple(state), device)
