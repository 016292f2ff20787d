"""Worker run by ``tests/test_distributed.py`` under ``torchrun --nproc_per_node 2`` (gloo, CPU).

``python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py PHASE OUTDIR``

* phase ``main``: the sharded radix select on tie-heavy scores; training runs under DDP,
  FSDP2 and ``accelerate`` (uninterrupted); one-shot ``layer``/``row`` scopes under
  FSDP2; the FSDP1 refusal; then the first half of a DDP and an FSDP2 run, which save
  a distributed checkpoint after a pruning event and exit without finishing.
* phase ``resume``: a new job builds fresh models (a different initialisation), loads
  those checkpoints and finishes the runs.

Each rank writes ``OUTDIR/<phase>_rank<r>.pt`` with what the test compares. The
training loop itself (:func:`train`) is shared with the single-process reference run
in the test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT / "src"), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

TOTAL_STEPS = 8
STOP_AFTER = 3  # the interrupted runs stop after step 3 (events at steps 0 and 2 done)
BATCH, SEQ = 2, 16

CONFIG = {
    "pruning": {
        "final_sparsity": 0.5,
        "initial_sparsity": 0.1,
        "pruning_start": 0.0,
        "pruning_end": 0.75,
        "pruning_interval": 2,
        "scope": "global",
        "layer_sparsity": {"model.layers.1.mlp.*": 0.7},
    }
}


def make_model(seed: int = 0):
    from tests.fixtures import tiny_llama

    # float64 so that DDP's gradient averaging and a single process's larger batch agree
    # to ~1e-16: far below the gaps between neighbouring weight magnitudes.
    return tiny_llama(layers=2, seed=seed).double().train()


def rank_batch(step: int, rank: int) -> dict:
    from tests.fixtures import lm_batch

    return lm_batch(batch=BATCH, seq=SEQ, seed=1000 * step + rank)


def full_batch(step: int, world: int) -> dict:
    """What a single process sees at ``step``: the batches of every rank, concatenated."""
    parts = [rank_batch(step, r) for r in range(world)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def train(
    model,
    manager,
    optimizer,
    batch_fn: Callable[[int], dict],
    start: int = 0,
    stop: int = TOTAL_STEPS,
    backward: Optional[Callable[[Any], None]] = None,
) -> None:
    """The training loop: forward, backward, ``manager.step()``, ``optimizer.step()``."""
    for t in range(start, stop):
        loss = model(**batch_fn(t)).loss
        (backward or (lambda loss: loss.backward()))(loss)
        manager.step()
        optimizer.step()
        optimizer.zero_grad()


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)


# ----------------------------------------------------------------------------- helpers
def _full(t):
    from artemis.core.distributed import is_dtensor

    return t.full_tensor() if is_dtensor(t) else t


def _full_masks(manager) -> dict:
    """Whole masks (gathered for the test only; the manager never does this)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for key, m in manager.masks.items():
        p = manager._params[key]
        if hasattr(p, "device_mesh"):
            m = DTensor.from_local(m, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
        out[key] = m.cpu().clone()
    return out


def _record(manager) -> dict:
    return {
        "masks": _full_masks(manager),
        "local_masks": {k: m.cpu().clone() for k, m in manager.masks.items()},
        "metrics": dict(manager.pruning_metrics),
        "summary_layers": manager.get_pruning_summary()["layers"],
        "step": manager.current_step,
        "weights": {k: _full(p.detach()).cpu().clone() for k, p in manager._params.items()},
    }


def make_gpt2(seed: int = 0):
    from tests.fixtures import tiny_gpt2

    model = tiny_gpt2(layers=2, seed=seed).double().train()
    for m in model.modules():  # no dropout: the runs must be deterministic to compare masks
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


GPT2_CONFIG = {"pruning": dict(CONFIG["pruning"], importance_metric="activation", layer_sparsity={})}


def _fsdp2(model):
    from torch.distributed.fsdp import fully_shard

    layers = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model)


# ---------------------------------------------------------------------------- scenarios
def select_scenario(rank: int) -> dict:
    """Sharded global_masks on tie-heavy integer scores, sharded like FSDP2 (uneven)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from artemis.core.distributed import ProcessGroupCollective
    from artemis.core.masks import global_masks

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    g = torch.Generator().manual_seed(7)
    full = [torch.randint(0, 4, s, generator=g).float() for s in [(7, 5), (5, 3), (1, 4), (3, 3), (6, 2)]]
    replicated = [False, False, False, True, False]
    local = [
        f if rep else distribute_tensor(f, mesh, [Shard(0)], src_data_rank=None).to_local()
        for f, rep in zip(full, replicated)
    ]
    coll = ProcessGroupCollective(mesh.get_group())
    out = {}
    for s in (0.0, 0.1, 0.37, 0.5, 0.61, 0.9, 1.0):
        fns = [(lambda t=t: t) for t in local]
        out[s] = global_masks(fns, [f.numel() for f in full], s, collective=coll, replicated=replicated)
    return {"full": full, "replicated": replicated, "masks": out}


def metric_config(metric: str) -> dict:
    """CONFIG with another importance metric (activation: its default scope, row)."""
    cfg = {"pruning": dict(CONFIG["pruning"], importance_metric=metric)}
    if metric == "activation":
        del cfg["pruning"]["scope"]
    return cfg


def run_metric(kind: str, metric: str) -> dict:
    """A full training run under DDP or FSDP2 with the activation/gradient metrics."""
    import torch.distributed as dist

    from artemis import create_pruning_manager

    rank = dist.get_rank()
    model = _ddp(make_model()) if kind == "ddp" else _fsdp2(make_model())
    manager = create_pruning_manager(metric_config(metric), model, total_steps=TOTAL_STEPS)
    opt = make_optimizer(model)
    train(model, manager, opt, lambda t: rank_batch(t, rank))
    return _record(manager)


def run_gpt2_activation() -> dict:
    """GPT-2's Conv1D weights are (in, out): FSDP2 shards their input features, so each
    rank scores its rows with its slice of the activation norms."""
    import torch.distributed as dist

    from artemis import create_pruning_manager

    rank = dist.get_rank()
    model = _fsdp2(make_gpt2())
    manager = create_pruning_manager(GPT2_CONFIG, model, total_steps=TOTAL_STEPS)
    opt = make_optimizer(model)
    train(model, manager, opt, lambda t: rank_batch(t, rank))
    return _record(manager)


def run_ddp(stop: int = TOTAL_STEPS, checkpoint: Optional[str] = None) -> dict:
    import torch.distributed as dist

    from artemis import create_pruning_manager

    rank = dist.get_rank()
    model = make_model()
    ddp = _ddp(model)
    manager = create_pruning_manager(CONFIG, ddp, total_steps=TOTAL_STEPS)  # the wrapped model
    opt = make_optimizer(ddp)
    train(ddp, manager, opt, lambda t: rank_batch(t, rank), stop=stop)
    if checkpoint:
        _save(checkpoint, ddp, opt, manager)
    return _record(manager)


def run_fsdp2(stop: int = TOTAL_STEPS, checkpoint: Optional[str] = None) -> dict:
    import torch.distributed as dist

    from artemis import create_pruning_manager

    rank = dist.get_rank()
    model = _fsdp2(make_model())
    manager = create_pruning_manager(CONFIG, model, total_steps=TOTAL_STEPS)
    opt = make_optimizer(model)
    train(model, manager, opt, lambda t: rank_batch(t, rank), stop=stop)
    if checkpoint:
        _save(checkpoint, model, opt, manager)
    return _record(manager)


def run_accelerate(stop: int = TOTAL_STEPS, checkpoint: Optional[str] = None, seed: int = 0) -> dict:
    from accelerate import Accelerator

    from artemis import create_pruning_manager

    accelerator = Accelerator(cpu=True)
    model = make_model(seed=seed)
    opt = make_optimizer(model)
    model, opt = accelerator.prepare(model, opt)  # 1. prepare, 2. create the manager
    manager = create_pruning_manager(CONFIG, model, total_steps=TOTAL_STEPS)
    accelerator.register_for_checkpointing(manager)
    start = 0
    if checkpoint and stop == TOTAL_STEPS:  # resume
        accelerator.load_state(checkpoint)
        start = manager.current_step
    rank = accelerator.process_index
    train(model, manager, opt, lambda t: rank_batch(t, rank), start=start, stop=stop, backward=accelerator.backward)
    if checkpoint and stop < TOTAL_STEPS:
        accelerator.save_state(checkpoint)
    rec = _record(manager)
    rec["resumed_at"] = start
    return rec


def whole_masks_into_fsdp2() -> dict:
    """A single-process-style state (whole masks) loaded into an FSDP2 manager."""
    from artemis import create_pruning_manager

    plain = make_model()
    source = create_pruning_manager(CONFIG, plain, total_steps=TOTAL_STEPS)
    source.apply_magnitude_pruning(0.4)
    state = source.state_dict()
    model = _fsdp2(make_model(seed=5))
    manager = create_pruning_manager(CONFIG, model, total_steps=TOTAL_STEPS)
    manager.load_state_dict(state)
    rec = _record(manager)
    rec["source_masks"] = {k: m.clone() for k, m in source.masks.items()}
    return rec


def _save(path: str, model, opt, manager) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "pruning": manager}, checkpoint_id=path)


def resume(kind: str, path: str) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from artemis import create_pruning_manager

    rank = dist.get_rank()
    model = make_model(seed=123)  # a different initialisation: everything comes from the checkpoint
    model = _ddp(model) if kind == "ddp" else _fsdp2(model)
    manager = create_pruning_manager(CONFIG, model, total_steps=TOTAL_STEPS)
    opt = make_optimizer(model)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "pruning": manager}
    dcp.load(state, checkpoint_id=path)  # calls manager.load_state_dict (Stateful)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    resumed_at = manager.current_step
    train(model, manager, opt, lambda t: rank_batch(t, rank), start=resumed_at)
    rec = _record(manager)
    rec["resumed_at"] = resumed_at
    return rec


def oneshot_fsdp2(scope: str) -> dict:
    from artemis import create_pruning_manager

    model = _fsdp2(make_model())
    cfg = {"pruning": {"scope": scope, "final_sparsity": 0.5}}
    manager = create_pruning_manager(cfg, model)
    manager.apply_magnitude_pruning(0.4)
    return _record(manager)


def fsdp1_error() -> str:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from artemis import create_pruning_manager

    model = FSDP(make_model(), device_id=torch.device("cpu"), use_orig_params=True)
    try:
        create_pruning_manager(CONFIG, model, total_steps=TOTAL_STEPS)
    except Exception as e:  # the test pins type and message
        return f"{type(e).__name__}: {e}"
    return "no error"


def error_scenarios() -> dict:
    """Misuse that must raise, not silently do nothing."""
    import torch.distributed as dist

    from artemis import create_pruning_manager

    out = {}
    # 1. the manager created before fully_shard replaced the parameters
    model = make_model()
    manager = create_pruning_manager({"pruning": {}}, model)
    _fsdp2(model)
    try:
        manager.apply_magnitude_pruning(0.3)
        out["stale"] = "no error"
    except Exception as e:
        out["stale"] = f"{type(e).__name__}: {e}"
    # 2. weights that differ between ranks (no DDP broadcast): masks would diverge
    model = make_model(seed=dist.get_rank())
    manager = create_pruning_manager({"pruning": {}}, model)
    try:
        manager.apply_magnitude_pruning(0.3)
        out["diverge"] = "no error"
    except Exception as e:
        out["diverge"] = f"{type(e).__name__}: {e}"
    out["diverge_untouched"] = not manager.masks
    return out


def main() -> None:
    import torch.distributed as dist

    phase, outdir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results: dict[str, Any] = {}
    if phase == "main":
        results["select"] = select_scenario(rank)
        results["ddp"] = run_ddp()
        results["fsdp2"] = run_fsdp2()
        results["accelerate"] = run_accelerate()
        results["fsdp2_layer"] = oneshot_fsdp2("layer")
        results["fsdp2_row"] = oneshot_fsdp2("row")
        for kind in ("ddp", "fsdp2"):
            for metric in ("activation", "gradient_sensitivity"):
                results[f"{kind}_{metric}"] = run_metric(kind, metric)
        results["fsdp2_gpt2_activation"] = run_gpt2_activation()
        results["fsdp1_error"] = fsdp1_error()
        results["errors"] = error_scenarios()
        results["ddp_partial"] = run_ddp(stop=STOP_AFTER + 1, checkpoint=str(outdir / "ckpt_ddp"))
        results["fsdp2_partial"] = run_fsdp2(stop=STOP_AFTER + 1, checkpoint=str(outdir / "ckpt_fsdp2"))
        results["accelerate_partial"] = run_accelerate(stop=STOP_AFTER + 1, checkpoint=str(outdir / "ckpt_acc"))
    elif phase == "resume":
        results["ddp_resumed"] = resume("ddp", str(outdir / "ckpt_ddp"))
        results["fsdp2_resumed"] = resume("fsdp2", str(outdir / "ckpt_fsdp2"))
        results["accelerate_resumed"] = run_accelerate(checkpoint=str(outdir / "ckpt_acc"), seed=123)
        results["whole_into_fsdp2"] = whole_masks_into_fsdp2()
    else:
        raise SystemExit(f"unknown phase {phase!r}; valid: main, resume")
    torch.save(results, outdir / f"{phase}_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    if phase == "main":
        # "killed" after the checkpoint: exit without any cleanup of the partial runs.
        os._exit(0)


if __name__ == "__main__":
    main()
