"""The pickles FSDP writes into engine_state/ are read running no code (workbench/safe_unpickle.py).

FSDP's checkpoints (PyTorch distributed checkpoint, as accelerate's save_state writes them under FSDP2) keep
their metadata in a plain pickle, `.metadata`, that torch reads with `pickle.load`. Real ones are written here
with `fully_shard` and `torch.distributed.checkpoint` in one CPU process over gloo (FSDP itself trains only on
GPUs: tests/test_gpu.py); they pass the check, a planted one is refused before accelerate loads anything.
DeepSpeed's files: tests/test_deepspeed.py.
"""
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from planted import RunsCode
from workbench.checkpoint import ENGINE_STATE, CheckpointError
from workbench.distributed import Distributed, Strategy
from workbench.safe_unpickle import check_dcp_metadata, weights_only_load

# FSDP2 over one process: a model and its AdamW state, sharded, saved as accelerate saves them.
WRITE_FSDP_CHECKPOINT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    folder = sys.argv[1]
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=0, world_size=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)).to(torch.bfloat16)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    model_state, opt_state = get_state_dict(model, opt)
    dcp.save({"model": model_state}, checkpoint_id=f"{folder}/engine_state/pytorch_model_fsdp_0")
    dcp.save({"optimizer": opt_state}, checkpoint_id=f"{folder}/engine_state/optimizer_0")
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def fsdp_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    proc = subprocess.run([sys.executable, "-c", WRITE_FSDP_CHECKPOINT, str(folder)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


class FakeAccelerator:
    """Records load_state: whether the check let accelerate load."""

    def __init__(self):
        self.loaded = []

    def load_state(self, folder, **kwargs):
        self.loaded.append(folder)


def fsdp(acc) -> Distributed:
    return Distributed(acc, Strategy("fsdp", 2))


def test_real_fsdp_metadata_passes_and_is_loaded(fsdp_checkpoint):
    files = sorted(fsdp_checkpoint.rglob(".metadata"))
    assert len(files) == 2, files  # the model's and the optimizer's
    for f in files:
        check_dcp_metadata(f)
    acc = FakeAccelerator()
    fsdp(acc).load_engine_state(fsdp_checkpoint)
    assert acc.loaded == [str(fsdp_checkpoint / ENGINE_STATE)]


@pytest.mark.parametrize("planted", ["whole file", "beside the metadata"])
def test_planted_fsdp_metadata_is_refused_before_anything_loads(fsdp_checkpoint, tmp_path, planted):
    marker = tmp_path / "code_ran"
    target = tmp_path / ENGINE_STATE / "optimizer_0" / ".metadata"
    target.parent.mkdir(parents=True)
    real = pickle.loads((fsdp_checkpoint / ENGINE_STATE / "optimizer_0" / ".metadata").read_bytes())
    payload = RunsCode(marker) if planted == "whole file" else {"metadata": real, "extra": RunsCode(marker)}
    target.write_bytes(pickle.dumps(payload))
    acc = FakeAccelerator()
    with pytest.raises(CheckpointError, match=rf"{target}: holds .*open.*does not load it"):
        fsdp(acc).load_engine_state(tmp_path)
    assert not marker.exists(), "nothing in the checkpoint may run"
    assert acc.loaded == [], "refused before accelerate loads"


@pytest.mark.parametrize("damage", [b"", b"not a pickle", b"\x80\x04\x95"])
def test_a_damaged_metadata_file_is_a_clear_error(tmp_path, damage):
    f = tmp_path / ".metadata"
    f.write_bytes(damage)
    with pytest.raises(CheckpointError, match=f"{f}: damaged or not FSDP checkpoint metadata"):
        check_dcp_metadata(f)



def test_weights_only_load_takes_allowed_classes_that_import_and_refuses_the_rest(tmp_path):
    from fractions import Fraction

    f = tmp_path / "state.pt"
    torch.save({"scale": Fraction(1, 3), "w": torch.ones(2)}, f)
    loaded = weights_only_load(f, allowed=("fractions.Fraction", "no_such_module.Thing", "fractions.NoSuchClass"))
    assert loaded["scale"] == Fraction(1, 3) and torch.equal(loaded["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match=rf"{f}: holds fractions.Fraction, so the workbench does not load it"):
        weights_only_load(f, allowed=())


def test_a_damaged_deepspeed_file_is_a_clear_error(tmp_path):

    f = tmp_path / "optim_states.pt"
    torch.save({"w": torch.ones(1000)}, f)
    f.write_bytes(f.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=f"{f}: damaged or not a torch file"):
        weights_only_load(f)
