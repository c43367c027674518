"""Several threads loading, pruning and saving at once (every Streamlit session is a thread).

torch.export keeps process-global state while it loads, exports and saves; without the
engine's one lock around those calls, concurrent loads fail with
"AssertionError: _CURRENT_DESERIALIZER is already set".
"""

from __future__ import annotations

import threading

import torch

import engine
from engine.demo import DEMO_PATH, builtin_example_inputs
from engine.io.export import save_program

THREADS = 4


def _run_in_threads(work, count: int = THREADS) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def run(index: int) -> None:
        try:
            start.wait()  # all threads enter torch.export together
            work(index)
        except BaseException as exc:  # noqa: BLE001 - collected and reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    return errors


def test_load_prune_and_save_from_several_threads(tmp_path):
    x = builtin_example_inputs("demo")[0]
    results: dict[int, tuple[int, torch.Size]] = {}

    def work(index: int) -> None:
        for _ in range(2):  # the same .pt2 file and the built-in name, each loaded twice
            engine.load_model(DEMO_PATH)
            engine.load_model("demo")
        result = engine.prune(engine.load_model(DEMO_PATH), options=engine.PruningOptions(),
                              ratio=0.1 * (index + 1))
        saved = save_program(result.program, tmp_path / f"pruned-{index}.pt2")
        reloaded = engine.load_model(saved)  # the pruned program read back by this thread
        with torch.no_grad():
            out = reloaded.program.module()(x)
        results[index] = (result.report["after"]["params"], out.shape)

    errors = _run_in_threads(work)
    assert not errors, [f"{type(e).__name__}: {e}" for e in errors]
    assert sorted(results) == list(range(THREADS))
    params = [results[i][0] for i in range(THREADS)]
    assert params == sorted(params, reverse=True) and len(set(params)) == THREADS
    assert all(shape == (x.shape[0], 10) for _, shape in results.values())
