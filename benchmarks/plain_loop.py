"""The floor the flow is compared with: the same stage functions of the same graph, called in a plain loop.

Like the flow, it resolves each row, derives every key from the graph and runs each distinct key once; it has no
Prefect, no task runs, no cache records and no retries.
"""

from __future__ import annotations

import time
from collections import Counter

from common import storage


def run_plain(manifest: str, output: str, cfg) -> tuple[float, Counter]:
    """Render ``manifest`` into ``output`` stage by stage in this process: wall seconds and seconds per stage."""
    from flows.dag import item_of, row_config
    from manifests import load_manifest
    from tasks.checks import prepare_run
    from tasks.graph import GRAPHS, StageCall
    from tasks.models import process_models
    from tasks.stages.delivery import resolve

    started = time.perf_counter()
    cfg = prepare_run(cfg)
    graph, cache = GRAPHS[cfg.backend], cfg.cache_uri or storage.join(output, ".cache")
    done: dict[str, object] = {}
    digests = storage.InputDigests()
    seconds: Counter = Counter()
    for row in load_manifest(manifest):
        item, row_cfg = item_of(row), row_config(cfg, row)
        resolved = resolve(item, row_cfg, graph, output, digests)
        refs: dict[str, object] = {}
        for stage in graph:
            key = resolved.stage_keys[stage.name]
            if not (stage.cached and key in done):
                call = StageCall(stage=stage.name, key=key, item=item, cfg=row_cfg, resolved=resolved,
                                 inputs={name: refs[name] for name in stage.inputs}, cache_uri=cache,
                                 output_uri=output, models=process_models() if stage.models else None)
                stage_started = time.perf_counter()
                done[key] = stage.run(call)
                seconds[stage.name] += time.perf_counter() - stage_started
            refs[stage.name] = done[key]
    return time.perf_counter() - started, seconds
