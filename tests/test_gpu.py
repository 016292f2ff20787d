"""CUDA paths. Skipped, with the reason shown, on machines without a GPU (like CI)."""

import pytest
import torch

from artemis import create_pruning_manager
from tests.fixtures import lm_batch, tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is present"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_seed_loop_on_cuda(dtype):
    model = tiny_llama().to("cuda", dtype).train()
    batch = {k: v.cuda() for k, v in lm_batch().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    mgr = create_pruning_manager({"pruning": {"final_sparsity": 0.6, "pruning_interval": 5}}, model, total_steps=30)
    for _ in range(30):
        model(**batch).loss.float().backward()
        mgr.step()
        mgr.apply_mask_to_gradients()
        opt.step()
        opt.zero_grad()
    assert all(m.device.type == "cuda" for m in mgr.masks.values())
    assert abs(mgr.get_pruning_summary()["measured_sparsity"] - 0.6) < 0.001
