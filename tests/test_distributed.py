"""Multi-process pruning: two CPU processes (gloo) under torchrun, DDP, FSDP2, accelerate.

One ``torchrun --nproc_per_node 2`` job runs every scenario of
``tests/distributed_worker.py`` (phase ``main``; it ends by checkpointing half-finished
DDP and FSDP2 runs and exiting), a second job resumes them (phase ``resume``). The
tests compare what the ranks wrote with each other and with single-process runs on
the same data. The sharded radix select is also checked in-process with two threads
standing in for two ranks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from artemis import create_pruning_manager
from artemis.core.distributed import all_reduce_sum_, check_no_fsdp1, inspect_sharding, local_tensor, shard_like
from artemis.core.masks import count_to_prune, global_masks
from artemis.metrics import METRICS
from tests import distributed_worker as W

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


# ------------------------------------------------------------ in-process (threads as ranks)
class ThreadCollective:
    """A ShardCollective for ranks that are threads of one process (tests only)."""

    def __init__(self, rank: int, shared: dict, barrier: threading.Barrier) -> None:
        self.rank, self.shared, self.barrier = rank, shared, barrier

    def _exchange(self, t):
        self.barrier.wait()
        self.shared[self.rank] = t.clone()
        self.barrier.wait()
        out = [self.shared[r] for r in range(WORLD)]
        self.barrier.wait()
        return out

    def all_reduce_sum(self, t):
        return torch.stack(self._exchange(t)).sum(0)

    def all_gather(self, t):
        return self._exchange(t)


def _run_ranks(fn):
    barrier, shared, results, errors = threading.Barrier(WORLD), {}, [None] * WORLD, []

    def body(r):
        try:
            results[r] = fn(ThreadCollective(r, shared, barrier))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(WORLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


def _chunks(full: torch.Tensor) -> list[torch.Tensor]:
    """FSDP2's Shard(0) split: ceil-sized chunks of dim 0 in rank order (some may be empty)."""
    size = -(-full.shape[0] // WORLD)
    return [full[r * size : (r + 1) * size] for r in range(WORLD)]


@pytest.mark.parametrize("seed", range(6))
def test_sharded_global_masks_equal_single_process_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (1, 4), (5, 3), (3, 3), (9, 2)]
    levels = 3 if seed % 2 else 50  # heavy ties (and many zeros) or a few
    full = [torch.randint(0, levels, s, generator=g).float() / 7 for s in shapes]
    replicated = [False, False, True, False, seed % 3 == 0]
    numels = [f.numel() for f in full]
    for sparsity in (0.0, 0.13, 0.5, 0.77, 1.0):
        ref = global_masks([(lambda t=t: t) for t in full], numels, sparsity)

        def rank_fn(coll):
            local = [f if rep else _chunks(f)[coll.rank] for f, rep in zip(full, replicated)]
            return global_masks(
                [(lambda t=t: t) for t in local], numels, sparsity, collective=coll, replicated=replicated
            )

        per_rank = _run_ranks(rank_fn)
        pruned = 0
        for i, rep in enumerate(replicated):
            got = per_rank[0][i] if rep else torch.cat([per_rank[r][i] for r in range(WORLD)])
            if rep:
                assert torch.equal(per_rank[0][i], per_rank[1][i])
            assert torch.equal(got, ref[i]), (sparsity, i)
            pruned += int((~got).sum())
        assert pruned == count_to_prune(sum(numels), sparsity)


def test_single_process_helpers_are_no_ops():
    t = torch.arange(4.0)
    all_reduce_sum_([t])
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert local_tensor(t) is t and shard_like(t, t) is t
    net = nn.Sequential(nn.Linear(4, 4))
    assert inspect_sharding(dict(net.named_parameters())) is None
    check_no_fsdp1(net)
    METRICS.get("magnitude")().all_reduce_(None)  # default: nothing to sum, no collective


# ----------------------------------------------------------------------- torchrun jobs
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(phase: str, outdir: Path) -> list[dict]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(ROOT / "tests" / "distributed_worker.py"), phase, str(outdir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    files = [outdir / f"{phase}_rank{r}.pt" for r in range(WORLD)]
    if proc.returncode != 0 or not all(f.exists() for f in files):
        pytest.fail(f"torchrun phase {phase} failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return [torch.load(f, weights_only=False) for f in files]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dist")
    main = _torchrun("main", outdir)
    resumed = _torchrun("resume", outdir)
    return [{**m, **r} for m, r in zip(main, resumed)]


@pytest.fixture(scope="module")
def reference():
    """The same training in one process, seeing every rank's batch at every step."""
    torch.manual_seed(0)
    model = W.make_model()
    manager = create_pruning_manager(W.CONFIG, model, total_steps=W.TOTAL_STEPS)
    W.train(model, manager, W.make_optimizer(model), lambda t: W.full_batch(t, WORLD))
    return manager


@pytest.fixture(scope="module")
def metric_references():
    out = {}
    for metric in ("activation", "gradient_sensitivity"):
        model = W.make_model()
        manager = create_pruning_manager(W.metric_config(metric), model, total_steps=W.TOTAL_STEPS)
        W.train(model, manager, W.make_optimizer(model), lambda t: W.full_batch(t, WORLD))
        out[metric] = manager
    return out


@pytest.mark.slow  # the `runs` fixture: two torchrun jobs, about 20 s
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
@pytest.mark.parametrize("metric", ["activation", "gradient_sensitivity"])
def test_data_dependent_metrics_give_single_process_masks(runs, metric_references, kind, metric):
    """activation: per-rank statistics summed over the ranks (all_reduce_); gradient
    sensitivity: the synchronised (averaged) gradients, local shards under FSDP2."""
    ref = metric_references[metric]
    assert ref.pruning_metrics["pruning_events"] == 4
    for r in range(WORLD):
        got = runs[r][f"{kind}_{metric}"]
        assert list(got["masks"]) == list(ref.masks)
        for key, m in ref.masks.items():
            assert torch.equal(got["masks"][key], m), (kind, metric, r, key)
        assert got["metrics"]["parameters_pruned"] == ref.pruning_metrics["parameters_pruned"]


@pytest.mark.slow  # the `runs` fixture: two torchrun jobs, about 20 s
def test_fsdp2_activation_on_transposed_conv1d_weights(runs):
    model = W.make_gpt2()
    ref = create_pruning_manager(W.GPT2_CONFIG, model, total_steps=W.TOTAL_STEPS)
    W.train(model, ref, W.make_optimizer(model), lambda t: W.full_batch(t, WORLD))
    assert any(t.transposed for t in ref.method.targets)
    for r in range(WORLD):
        got = runs[r]["fsdp2_gpt2_activation"]
        for key, m in ref.masks.items():
            assert torch.equal(got["masks"][key], m), (r, key)


@pytest.mark.slow  # the `runs` fixture: two torchrun jobs, about 20 s
def test_sharded_select_under_torchrun_equals_single_process(runs):
    sel = runs[0]["select"]
    numels = [f.numel() for f in sel["full"]]
    for sparsity, masks0 in sel["masks"].items():
        ref = global_masks([(lambda t=t: t) for t in sel["full"]], numels, sparsity)
        masks1 = runs[1]["select"]["masks"][sparsity]
        for i, rep in enumerate(sel["replicated"]):
            got = masks0[i] if rep else torch.cat([masks0[i], masks1[i]])
            assert torch.equal(got, ref[i]), (sparsity, i)
        assert sum(int((~m).sum()) for m in ref) == count_to_prune(sum(numels), sparsity)


@pytest.mark.slow  # the `runs` fixture: two torchrun jobs, about 20 s
@pytest.mark.parametrize("kind", ["ddp", "fsdp2", "accelerate"])
def test_masks_identical_on_ranks_and_equal_single_process(runs, reference, kind):
    ref = reference.masks
    assert reference.pruning_metrics["pruning_events"] == 4  # steps 0, 2, 4, 6
    for r in range(WORLD):
        got = runs[r][kind]["masks"]
        assert list(got) == list(ref)
        for key in ref:
            assert torch.equal(got[key], ref[key].cpu()), (kind, r, key)
        for key, w in runs[r][kind]["weights"].items():  # pruned weights are exactly zero
            assert not bool(w[~got[key]].any())


@pytest.mark.slow  # the `runs` fixture: two torchrun jobs, about 20 s
def test_fsdp2_masks_are_stored_sharded(runs):
    for key, full in runs[0]["fsdp2"]["masks"].items():
        shards = [runs[r]["fsdp2"]["local_masks"][key] for r in range(WORLD)]
        assert [tuple(s.shape) for s in shards] == [tuple(c.shape) for c in _chunks(full)]
        assert torch.equal(torch.cat(shards), full)
    # under DDP each rank holds whole masks
    for key, full in runs[1]["ddp"]["masks"].items():
        assert torch.equal(runs[1]["ddp"]["local_masks"][key], full)


@pytest.mark.slow  # the `runs` fixture: two torchrun jobs, about 20 s
@pytest.mark.parametrize("kind", ["ddp", "fsdp2", "accelerate"])
def test_final_sparsity_is_exact(runs, reference, kind):
    # two sparsity groups: model.layers.1.mlp.* at 0.7, the rest at 0.5
    sizes = {0.5: 0, 0.7: 0}
    for t in reference.method.targets:
        sizes[0.7 if t.name.startswith("model.layers.1.mlp.") else 0.5] += t.numel
    expected = sum(count_to_prune(n, s) for s, n in sizes.items())
    for r in range(WORLD):
        metrics = runs[r][kind]["metrics"]
        pruned = sum(int((~m).sum()) for m in runs[r][kind]["masks"].values())
        assert pruned == expected == metrics["parameters_pruned"]
        assert metrics["parameters_prunable"] == sum(sizes.values())
        for field in ("baseline_model_size_mb", "compressed_model_size_mb", "model_size_reduction"):
            assert metrics[field] == pytest.approx(reference.pruning_metrics[field], rel=1e-12), field
        layers = {row["name"]: row["zeros"] for row in runs[r][kind]["summary_layers"]}
        assert layers == {row["name"]: row["zeros"] for row in reference.get_pruning_summary()["layers"]}


@pytest.mark.slow  # the `runs` fixture: two torchrun jobs, about 20 s
@pytest.mark.parametrize("kind", ["ddp", "fsdp2", "accelerate"])
def test_killed_and_resumed_run_ends_with_the_same_masks(runs, kind):
    for r in range(WORLD):
        partial, resumed, full = runs[r][f"{kind}_partial"], runs[r][f"{kind}_resumed"], runs[r][kind]
        assert partial["metrics"]["pruning_events"] == 2  # killed after the event at step 2
        assert resumed["resumed_at"] == W.STOP_AFTER + 1 and resumed["step"] == W.TOTAL_STEPS
        assert resumed["metrics"]["pruning_events"] == full["metrics"]["pruning_events"] == 4
        for key, m in full["masks"].items():
            assert torch.equal(resumed["masks"][key], m), (kind, r, key)
            assert torch.equal(resumed["weights"][key], full["weights"][key]), (kind, r, key)


@pytest.mark.slow  # the `runs` fixture: two torchrun jobs, about 20 s
def test_whole_masks_load_into_fsdp2_shards(runs):
    for r in range(WORLD):
        rec = runs[r]["whole_into_fsdp2"]
        assert rec["metrics"]["parameters_pruned"] == sum(int((~m).sum()) for m in rec["source_masks"].values())
        for key, m in rec["source_masks"].items():
            assert torch.equal(rec["local_masks"][key], _chunks(m)[r]), key
            assert torch.equal(rec["masks"][key], m)


@pytest.mark.slow  # the `runs` fixture: two torchrun jobs, about 20 s
@pytest.mark.parametrize("scope", ["layer", "row"])
def test_fsdp2_one_shot_scopes_equal_single_process(runs, scope):
    model = W.make_model()
    manager = create_pruning_manager({"pruning": {"scope": scope, "final_sparsity": 0.5}}, model)
    manager.apply_magnitude_pruning(0.4)
    for r in range(WORLD):
        got = runs[r][f"fsdp2_{scope}"]
        assert list(got["masks"]) == list(manager.masks)
        for key, m in manager.masks.items():
            assert torch.equal(got["masks"][key], m), (scope, key)
        assert got["metrics"]["parameters_pruned"] == manager.pruning_metrics["parameters_pruned"]


@pytest.mark.slow  # the `runs` fixture: two torchrun jobs, about 20 s
def test_fsdp1_is_refused_at_creation(runs):
    for r in range(WORLD):
        msg = runs[r]["fsdp1_error"]
        assert msg.startswith("ModelError: FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel at the root)")
        assert "use_orig_params=True" in msg and "fully_shard" in msg and "fsdp_version: 2" in msg


@pytest.mark.slow  # the `runs` fixture: two torchrun jobs, about 20 s
def test_misuse_raises_instead_of_silently_not_pruning(runs):
    for r in range(WORLD):
        errors = runs[r]["errors"]
        assert errors["stale"].startswith("PruningStateError: the weight model.layers.0.self_attn.q_proj.weight")
        assert "create the manager after fully_shard()/Accelerator.prepare()" in errors["stale"]
        assert errors["diverge"].startswith("PruningStateError: the masks differ between ranks")
        assert errors["diverge_untouched"]
