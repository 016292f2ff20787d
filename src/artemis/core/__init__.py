"""The core of Artemis: the typed config, the stateful lifecycle and the pure pieces it uses.

* :mod:`~artemis.core.config` — ``PruningConfig``, validated at the boundary;
* :mod:`~artemis.core.manager` — ``PruningManager``: prepare → step → finalize;
* :mod:`~artemis.core.schedule` — sparsity at a step (pure);
* :mod:`~artemis.core.masks` — masks from scores (global, per layer, per row, N:M) and
  ``MaskStore`` (pure tensor math, plus bool or bit-packed storage);
* :mod:`~artemis.core.targets` — which modules are prunable;
* :mod:`~artemis.core.registry` — the registry behind methods and metrics;
* :mod:`~artemis.core.sizing` — the size accounting shared by the summary and the export;
* :mod:`~artemis.core.distributed` — DDP/FSDP2 helpers;
* :mod:`~artemis.core.errors` — the exception types.

Nothing is re-exported here, so importing one core module never loads the others.

Example:
    >>> from artemis.core.schedule import sparsity_at
    >>> sparsity_at(50, t_s=0, t_e=100, initial=0.0, final=0.6, schedule="cubic")
    0.075
"""

__all__: list[str] = []
