"""Gradient accumulation of a bf16 engine configured by `student_config` (one CPU rank).

A 1x1 linear layer in bf16, 64 micro-batches: the first's gradient is 1/64, the 63 others' are
2^-9/64 each, which a bf16 running sum (8 significant bits) drops one by one. Prints the
accumulated gradient and the exact sum as JSON. argv[1]: extra `deepspeed:` keys (JSON); argv[2]:
the ZeRO stage (default 3).
"""

import json, sys, warnings
import torch

warnings.filterwarnings("ignore")
from tail_kd.config import Recipe
from tail_kd.distributed import init_distributed

ctx = init_distributed("cpu")
import deepspeed
from deepspeed.utils import safe_get_full_grad
from tail_kd.deepspeed_config import student_config
from tail_kd.placement import Placement

recipe = Recipe.from_dict(
    {
        "teacher": {"path": "t"},
        "data": {"source": "d"},
        "train": {
            "precision": "bfloat16",
            "global_batch_size": 64,
            "micro_batch_size": 1,
            "warmup_steps": 0,
            "grad_clip": 0.0,
        },
        "deepspeed": json.loads(sys.argv[1]) if len(sys.argv) > 1 else {},
    }
)
stage = int(sys.argv[2]) if len(sys.argv) > 2 else 3
config = student_config(recipe, 1, "cpu", Placement(student_zero_stage=stage))
model = torch.nn.Linear(1, 1, bias=False)
torch.nn.init.ones_(model.weight)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
for i in range(64):
    x = torch.full((1, 1), 1.0 if i == 0 else 2.0**-9, dtype=torch.bfloat16)
    engine.backward(engine(x).sum())
    if i < 63:
        engine.step()
grad = safe_get_full_grad(engine.module.weight)
print(json.dumps({"grad": float(grad.float().item()), "exact": (1 + 63 * 2.0**-9) / 64}))
