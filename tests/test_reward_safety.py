"""Safety and liveness: pathological answers score 0 within the timeout, nothing is executed, hung or
dead workers are replaced, and worker processes are cleaned up."""

import os
import signal
import time
from pathlib import Path

import pytest

import orz_fast.reward as reward
from orz_fast.reward import RewardScorer, VerifierPool

TIMEOUT = 0.5
SLACK = 4.0  # scheduling and worker-respawn noise on loaded shared CPUs (2.0 s seen at load 21); a hang takes minutes


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture(scope="module", params=["default", "orz"])
def scorer(request):
    with RewardScorer(request.param, timeout=TIMEOUT, workers=1) as s:
        s.pool.start()
        yield s


PATHOLOGICAL = {
    "100 KB answer": "<answer>\\boxed{" + "1" * 100_000 + "}</answer>",
    "100 KB expression": "<answer>\\boxed{" + "x+" * 50_000 + "1}</answer>",
    "10,000 nested braces": "<answer>\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}</answer>",
    "400 nested braces (under the length guard)": "<answer>\\boxed{" + "{" * 400 + "1" + "}" * 400 + "}</answer>",
    "nested fractions": "<answer>\\boxed{" + "\\frac{1}{" * 150 + "2" + "}" * 150 + "}</answer>",
    "power tower": "<answer>\\boxed{9^{9^{9^9}}}</answer>",
    "huge power": "<answer>\\boxed{10^{10^{10^{10}}}+1}</answer>",
    "huge factorial": "<answer>\\boxed{(10^{10})!}</answer>",
    "division by zero": "<answer>\\boxed{\\frac{1}{0}}</answer>",
    "invalid UTF-8": b"<answer>\\boxed{\xff\xfe\xfd}</answer>",
    "lone surrogates": "<answer>\\boxed{\udcff\udcfe}</answer>",
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_input_scores_zero_within_timeout(scorer, name):
    start = time.monotonic()
    assert scorer.score(PATHOLOGICAL[name], "5") == 0.0
    assert time.monotonic() - start < TIMEOUT + SLACK


def test_pathological_batch_scores_zero_and_scorer_still_works(scorer):
    responses = list(PATHOLOGICAL.values())
    start = time.monotonic()
    assert scorer.score_batch(responses, ["5"] * len(responses)) == [0.0] * len(responses)
    # each symbolic check is bounded by the timeout
    assert time.monotonic() - start < len(responses) * TIMEOUT + 2 * SLACK
    assert scorer.score("<answer>\\boxed{2\\sqrt{5}}</answer>", "\\sqrt{20}") == 1.0


PAYLOADS = [
    "__import__('os').system('touch {path}')",
    "__import__('pathlib').Path('{path}').touch()",
    "open('{path}', 'w').write('x')",
    "exec(\"open('{path}', 'w')\")",
    "eval(\"__import__('os').system('touch {path}')\")",
    "Symbol('x') + __import__('os').system('touch {path}')",
    "\\text{{{{}}}}.__class__; open('{path}','w')",
    "lambda: open('{path}', 'w')",
]


@pytest.mark.parametrize("template", PAYLOADS)
def test_code_in_answers_is_never_executed(scorer, tmp_path, template):
    target = tmp_path / "pwned"
    payload = template.format(path=target)
    responses = [
        f"<answer>\\boxed{{{payload}}}</answer>",
        f"<answer>{payload}</answer>",
        f"<answer>\\boxed{{{payload}}}</answer>",
    ]
    truths = ["5", "5", payload.replace("'", '"')]
    scores = scorer.score_batch(responses, truths)
    assert scores[:2] == [0.0, 0.0]
    assert scorer.is_equivalent(payload, "0") is False
    # straight to the symbolic checks too, past every fast-path rule
    verdicts = scorer.pool.run([("math", payload, "5"), ("orz", payload, "5")])
    assert len(verdicts) == 2 and not any(verdicts)
    assert not target.exists()


def test_hung_worker_is_killed_and_replaced():
    with VerifierPool(workers=1, timeout=0.5) as pool:
        pool.start()
        (pid,) = pool.alive_pids()
        os.kill(pid, signal.SIGSTOP)  # a worker stuck where SIGALRM cannot reach it
        start = time.monotonic()
        assert pool.run([("math", "1", "1")]) == [None]
        assert time.monotonic() - start < 0.5 + SLACK
        assert pool.restarts == 1 and pool.timeouts == 1
        assert _gone(pid)
        assert pool.run([("math", "\\sqrt{20}", "2\\sqrt{5}"), ("math", "1", "2")]) == [True, False]


def test_dead_worker_is_replaced_and_its_work_rerun():
    with VerifierPool(workers=1, timeout=2.0) as pool:
        pool.start()
        (pid,) = pool.alive_pids()
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
        tasks = [("math", f"{i}", f"{i}") for i in range(6)]
        assert pool.run(tasks) == [True] * 6
        assert pool.restarts == 1
        assert pid not in pool.alive_pids()


def test_workers_exit_on_close():
    pool = VerifierPool(workers=1, timeout=1.0)
    pool.start()
    pids = pool.alive_pids()
    assert len(pids) == 1
    pool.close()
    assert all(_gone(pid) for pid in pids)
    assert pool.run([("math", "2", "2")]) == [True]  # a closed pool restarts on use
    pids = pool.alive_pids()
    pool.close()
    assert all(_gone(pid) for pid in pids)


def test_module_level_api_and_shutdown():
    assert reward.score("<answer>\\boxed{\\frac{1}{2}}</answer>", "0.5") == 1.0
    assert reward.is_equivalent("\\sqrt{8}", "2\\sqrt{2}") is True
    assert reward.score_batch(["<answer>1</answer>", "<answer>2</answer>"], ["1", "1"]) == [1.0, 0.0]
    assert reward.score("<answer>\\boxed{4}</answer>", "4", finish_reason="length") == 0.0
    pids = [pid for s in reward.scorer._shared.values() for pid in s.pool.alive_pids()]
    assert pids
    reward.shutdown()
    assert all(_gone(pid) for pid in pids)
