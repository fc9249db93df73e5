"""Loading torch.save'd files: tensors and plain containers only (`weights_only=True`), never arbitrary pickles.

torch's own refusal message invites the reader to load the file with `weights_only=False`, which runs whatever code
the file holds: every load of a checkpoint, state dict or tensor file goes through `load`, whose error says what is
wrong without that advice.
"""

from __future__ import annotations

import pickle
import warnings
from typing import Any

import torch

from kdm_pipe.errors import one_line


class UnloadableError(ValueError):
    """A file `load` refused or could not read; `.why` says which, in one line."""

    def __init__(self, why: str):
        self.why = why
        super().__init__(why)


def load(source: Any, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """torch.load(source, weights_only=True); UnloadableError (never torch's advice) when it fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # e.g. "pickle protocol 4": the refusal below says what matters
            return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001  (torch raises many kinds on a damaged or hostile file)
        raise UnloadableError(reason(e)) from None


def reason(e: BaseException) -> str:
    if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
        return ("it holds Python objects other than tensors, which kdm-pipe never unpickles (loading them could run "
                "code)")
    text = "; ".join(p for p in one_line(str(e)).split("; ") if "weights_only" not in p)
    return f"{type(e).__name__}: {text[:160]}".rstrip(": ")
