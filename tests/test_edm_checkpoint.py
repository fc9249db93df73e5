import hashlib
import json
import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
from edm_pickle_fixture import HOSTILE_SRC_MARKER, hostile_module_src, write_edm_pickle

from kdm_pipe.networks import build_network
from kdm_pipe.teachers.edm_checkpoint import (
    CheckpointError,
    load_edm_pickle,
    load_state_dict_checkpoint,
    save_state_dict_checkpoint,
)

TINY = dict(img_resolution=8, img_channels=3, model_type="SongUNet", model_channels=16, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[4], dropout=0.0)
# As EDM records them: some constructor args arrive as numpy scalars.
TINY_PICKLED = dict(TINY, img_resolution=np.int64(8), channel_mult=(1, np.int64(2)), beta_d=np.float64(19.9))


class EDMLoss(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.P_mean, self.P_std, self.sigma_data = -1.2, 1.2, 0.5


class _Call:
    """Pickles as a call of `fn(*args)`: what a hostile file would contain."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.fixture(scope="module")
def source_net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_network("VPPrecond", **TINY).eval()
    with torch.no_grad():  # EDM zero-inits some convs; random weights make the output comparison sharp
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def _outputs(net: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = 5 * torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        return net(x, torch.tensor([0.5, 20.0]))


def test_official_layout_loads_without_running_module_src(tmp_path, source_net):
    extra = dict(loss_fn=EDMLoss(), augment_pipe=None, dataset_kwargs=dict(path="cifar10.zip", use_labels=False))
    path = write_edm_pickle(tmp_path / "edm.pkl", source_net, TINY_PICKLED, module_src=hostile_module_src(tmp_path),
                            extra=extra)
    raw = path.read_bytes()
    for name in (b"torch_utils.persistence", b"_reconstruct_persistent_obj", b"torch.storage", b"_load_from_bytes",
                 b"_rebuild_parameter", b"multiarray", b"ModuleDict"):
        assert name in raw  # the fixture really has EDM's layout

    ckpt = load_edm_pickle(path)

    assert not (tmp_path / HOSTILE_SRC_MARKER).exists()
    assert ckpt.keys == ("ema", "loss_fn", "augment_pipe", "dataset_kwargs")
    assert ckpt.class_name == "VPPrecond"
    assert ckpt.init_kwargs == dict(TINY, beta_d=19.9)
    assert type(ckpt.init_kwargs["img_resolution"]) is int and type(ckpt.init_kwargs["channel_mult"][1]) is int
    assert ckpt.sha256 == hashlib.sha256(raw).hexdigest()
    assert not ckpt.net.training
    want = source_net.state_dict()
    got = ckpt.net.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(_outputs(ckpt.net), _outputs(source_net))


def test_weights_must_fit_the_recorded_architecture(tmp_path, source_net):
    path = write_edm_pickle(tmp_path / "edm.pkl", source_net, dict(TINY, model_channels=32))
    with pytest.raises(CheckpointError, match="do not fit VPPrecond"):
        load_edm_pickle(path)


def test_unknown_network_class_is_refused(tmp_path):
    path = write_edm_pickle(tmp_path / "loss.pkl", EDMLoss(), {})
    with pytest.raises(CheckpointError, match="unknown network class 'EDMLoss'"):
        load_edm_pickle(path)


@pytest.mark.parametrize("refused", ["posix.system", "builtins.eval", "torch.serialization.load",
                                     "torch.nn.modules.module.register_module_forward_hook"])
def test_hostile_globals_are_refused(tmp_path, refused):
    marker = tmp_path / "MARKER"
    payload = {
        "posix.system": _Call(os.system, f"touch {marker}"),
        "builtins.eval": _Call(eval, f"open({str(marker)!r}, 'w')"),
        "torch.serialization.load": _Call(torch.load, str(marker)),
        "torch.nn.modules.module.register_module_forward_hook":
            _Call(torch.nn.modules.module.register_module_forward_hook, None),
    }[refused]
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": payload}, protocol=4))
    with pytest.raises(CheckpointError, match=f"refusing global {refused} in evil.pkl"):
        load_edm_pickle(path)
    assert not marker.exists()


def test_exec_inside_a_nested_record_is_refused(tmp_path, source_net):
    marker = tmp_path / "MARKER"
    path = write_edm_pickle(tmp_path / "edm.pkl", source_net, TINY,
                            nested_state={"_hook": _Call(exec, f"open({str(marker)!r}, 'w')")})
    with pytest.raises(CheckpointError, match="refusing global builtins.exec"):
        load_edm_pickle(path)
    assert not marker.exists()


def test_tensor_reaching_past_its_storage_is_refused(tmp_path):
    storage = torch.zeros(4)._typed_storage()
    path = tmp_path / "oob.pkl"
    path.write_bytes(pickle.dumps(
        {"ema": _Call(torch._utils._rebuild_tensor_v2, storage, 0, (1000,), (1,), False, OrderedDict())}, protocol=4))
    with pytest.raises(CheckpointError, match="past its storage"):
        load_edm_pickle(path)


def test_state_dict_checkpoint_round_trip(tmp_path, source_net):
    path = tmp_path / "teacher.pt"
    spec_path = save_state_dict_checkpoint(source_net, "VPPrecond", TINY_PICKLED, path)
    spec = json.loads(spec_path.read_text())
    assert spec_path == tmp_path / "teacher.json" and spec["init_kwargs"] == TINY | {"beta_d": 19.9}

    for ckpt in (load_state_dict_checkpoint(path), load_state_dict_checkpoint(path, spec)):
        assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == spec["sha256"]
        assert ckpt.class_name == "VPPrecond" and not ckpt.net.training
        assert torch.equal(_outputs(ckpt.net), _outputs(source_net))

    torch.save({k: v + 1 for k, v in source_net.state_dict().items()}, path)
    with pytest.raises(CheckpointError, match="sha256"):
        load_state_dict_checkpoint(path)


def test_state_dict_checkpoint_refuses_pickled_code(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save({"w": _Call(os.system, f"touch {marker}")}, path)
    with pytest.raises(CheckpointError, match="cannot read evil.pt"):
        load_state_dict_checkpoint(path, {"class_name": "VPPrecond", "init_kwargs": TINY})
    assert not marker.exists()
