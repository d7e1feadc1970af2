"""The fused loss on the training device: what tools/gpu_check.sh runs first on a GPU.

The device is TAIL_KD_TEST_DEVICE (tools/gpu_check.sh sets it: `cuda`, or `cpu` to try the script
here), else `cuda` when a GPU is visible; without one the module is skipped, as in CI. Each case
compares the fused loss, eager and compiled, in bf16 and float32, with Gemma-2's logit
soft-capping and without, against the dense reference in float64 on the CPU; with two GPUs or
more, the vocab-parallel loss over an NCCL group too.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import loss_and_grads, make_batch
from tail_kd.topology import free_port
from tail_kd.losses import LogitTransform, dense_distillation_loss, fused_distillation_loss

DEVICE = os.environ.get("TAIL_KD_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="no GPU (TAIL_KD_TEST_DEVICE=cpu tries it here)"),
]

SOFTCAP = LogitTransform(softcap=30.0)  # Gemma-2's
LOSS = dict(divergence="tad", k=10, beta=2.0, normalize=True, ce_weight=1.0)


def _inputs(dtype, rows=2048):
    """Logits of about +-20, 4 x 128 tokens, as `make_batch` makes them, on DEVICE."""
    batch = make_batch(batch=4, length=128, hs=64, ht=64, rows=rows, seed=1)
    return tuple(x.to(DEVICE, dtype) if x.is_floating_point() else x.to(DEVICE) for x in batch)


def _relative_error(ours, exact):
    return float((ours.double().cpu() - exact).norm() / exact.norm())


@pytest.mark.parametrize("transform", [None, SOFTCAP], ids=["plain", "softcap"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_loss_on_the_device_against_float64(dtype, compiled, transform):
    transforms = (
        {} if transform is None else dict(student_transform=transform, teacher_transform=transform)
    )
    inputs = _inputs(dtype)
    exact_inputs = tuple(x.double().cpu() if x.is_floating_point() else x.cpu() for x in inputs)
    exact = loss_and_grads(dense_distillation_loss, *exact_inputs, **LOSS, **transforms)
    ours = loss_and_grads(
        fused_distillation_loss, *inputs, chunk_size=96, compile=compiled, **LOSS, **transforms
    )
    assert ours[1].device.type == torch.device(DEVICE).type
    # What autograd on dense logits in the same dtype gets: the bar for bf16.
    dense = loss_and_grads(dense_distillation_loss, *inputs, **LOSS, **transforms)
    for i, name in enumerate(("loss", "grad student_hidden", "grad student_weight")):
        error = _relative_error(ours[i], exact[i])
        bound = 1e-4 if dtype == torch.float32 else 1.5 * _relative_error(dense[i], exact[i]) + 1e-3
        assert error <= bound, (name, error, bound)


def _vocab_parallel_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        s_hidden, s_weight, t_hidden, t_weight, labels = _inputs(torch.bfloat16)
        rows = torch.tensor_split(torch.arange(s_weight.shape[0]), world)[rank]
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        result = loss_and_grads(
            fused_distillation_loss, s_hidden, s_weight[lo:hi], t_hidden, t_weight[lo:hi],
            labels, group=dist.group.WORLD, chunk_size=96, compile=True, **LOSS,
        )  # fmt: skip
        torch.save([x.cpu() for x in result], os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    DEVICE != "cuda" or torch.cuda.device_count() < 2, reason="needs two GPUs for an NCCL group"
)
def test_vocab_parallel_loss_over_nccl_equals_one_gpu(tmp_path):
    world = 2
    mp.spawn(_vocab_parallel_worker, args=(world, free_port(), str(tmp_path)), nprocs=world)
    whole = loss_and_grads(
        fused_distillation_loss, *_inputs(torch.bfloat16), chunk_size=96, compile=True, **LOSS
    )
    bounds = [0] + [int(r[-1]) + 1 for r in torch.tensor_split(torch.arange(2048), world)]
    for rank in range(world):
        loss, grad_h, grad_w = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(loss, whole[0].cpu(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(grad_h, whole[1].cpu(), rtol=5e-2, atol=1e-3)
        expected = whole[2].cpu()[bounds[rank] : bounds[rank + 1]]
        torch.testing.assert_close(grad_w, expected, rtol=5e-2, atol=1e-3)


def test_no_tail_kd_call_in_a_micro_batch_waits_for_the_device(tmp_path):
    """tests/scripts/host_syncs.py on DEVICE: tail-kd's own syncing calls during training's
    micro-batches (tests/test_host_syncs.py) all read host tensors, none a device tensor."""
    from test_host_syncs import HOST_SIDE, count_host_syncs

    found = count_host_syncs(tmp_path, device=DEVICE)
    on_device = {key: n for key, n in found["tail_kd"].items() if not key.endswith(" cpu")}
    assert not on_device, found
    assert {key.rsplit(" ", 1)[0] for key in found["tail_kd"]} == HOST_SIDE
