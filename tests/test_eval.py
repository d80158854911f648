"""``orz_fast.eval``: the named eval sets, avg@k / pass@k / truncation arithmetic, the results files,
:func:`evaluate` against a scripted engine, and the CLI end to end on a tiny random-weight model and on
the real SmolLM2 GGUF (CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import smollm2_gguf

from orz_fast import eval as ev
from orz_fast.data import Problem
from orz_fast.data.char_tokenizer import CharTokenizer
from orz_fast.reward import RewardScorer
from orz_fast.rollout import Completion

REPO = Path(__file__).resolve().parent.parent
TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 320,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "initializer_range": 0.2,
    "tie_word_embeddings": True,
}


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("name,count", [("math500", 500), ("aime2024", 30), ("gpqa_diamond", 198)])
def test_named_eval_sets_load_with_their_sizes(name, count):
    got_name, problems = ev.load_eval_set(name)
    assert got_name == name and len(problems) == count
    assert [p.index for p in problems] == list(range(count))
    assert all(p.prompt.strip() and p.answer.strip() for p in problems)
    if name == "gpqa_diamond":
        assert {p.answer for p in problems} == set("ABCD")
    limited = ev.load_eval_set(name, limit=3)[1]
    assert limited == problems[:3]


def test_eval_data_dir_from_env_missing_paths_and_files(tmp_path, monkeypatch):
    monkeypatch.setenv(ev.EVAL_DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "aime2024.json")):
        ev.load_eval_set("aime2024")
    (tmp_path / "aime2024.json").write_text(
        json.dumps([{"prompt": [{"from": "user", "value": "1+1?"}], "final_answer": "2"}])
    )
    assert ev.load_eval_set("aime2024") == ("aime2024", [Problem("1+1?", "2", str(tmp_path / "aime2024.json"), 0)])
    with pytest.raises(ValueError, match="math500, aime2024, gpqa_diamond"):
        ev.load_eval_set("math501")
    custom = tmp_path / "mine.jsonl"
    custom.write_text('{"problem": "2+2?", "answer": "4"}\n')
    assert ev.load_eval_set(str(custom))[0] == "mine"
    with pytest.raises(ValueError, match="limit"):
        ev.load_eval_set(str(custom), limit=0)


# ----------------------------------------------------------------------------------------- report


def _record(index, scores, tokens, reasons):
    return ev.ProblemResult(index, f"q{index}", "1", [f"r{j}" for j in range(len(scores))], scores, tokens, reasons)


def test_report_arithmetic_and_files(tmp_path):
    stop, length = "stop", "length"
    records = [
        _record(0, [1.0, 0.0, 0.0, 1.0], [10, 20, 30, 40], [stop, stop, length, stop]),
        _record(1, [0.0, 0.0, 0.0, 0.0], [5, 5, 5, 5], [length] * 4),
        _record(2, [1.0, 1.0, 1.0, 1.0], [1, 2, 3, 4], [stop] * 4),
    ]
    report = ev.EvalReport("toy", records, 4, {"max_tokens": 40}, wall_time_s=2.0)
    assert report.accuracy == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert report.pass_at_k == pytest.approx(2 / 3)
    assert report.mean_response_tokens == pytest.approx(130 / 12)
    assert report.truncated == 5 and report.truncation_rate == pytest.approx(5 / 12)
    assert report.metrics() == {
        "eval/toy/accuracy": report.accuracy,
        "eval/toy/pass@4": report.pass_at_k,
        "eval/toy/response_tokens": report.mean_response_tokens,
        "eval/toy/truncated": report.truncation_rate,
    }
    records_path, summary_path = report.write(tmp_path / "out")
    assert records_path == tmp_path / "out" / "toy.jsonl"
    lines = [json.loads(line) for line in records_path.read_text().splitlines()]
    assert [r["index"] for r in lines] == [0, 1, 2]
    assert lines[0]["scores"] == [1.0, 0.0, 0.0, 1.0] and lines[0]["accuracy"] == 0.5
    assert lines[1]["finish_reasons"] == [length] * 4 and lines[2]["response_tokens"] == [1, 2, 3, 4]
    summary = json.loads(summary_path.read_text())
    assert summary["avg@4"] == summary["accuracy"] == report.accuracy
    assert summary["pass@4"] == report.pass_at_k and summary["truncated"] == 5
    assert summary["generated_tokens_per_s"] == pytest.approx(130 / 2.0) and summary["max_tokens"] == 40


def test_best_constant_and_answer_distribution():
    def record(index, answer, responses):
        return ev.ProblemResult(index, f"q{index}", answer, responses, [0.0] * len(responses), [1] * 2, ["stop"] * 2)

    records = [
        record(0, "7", ["<answer>7</answer>", "<answer>\\boxed{9}</answer>"]),
        record(1, " 9", ["<think>x</think> <answer> 7 </answer>", "no tags"]),
        record(2, "9", ["<answer>7</answer>", "<answer></answer>"]),
        record(3, "12", ["<answer>7</answer>", "<answer>12"]),
    ]
    report = ev.EvalReport("toy", records, 2, {})
    # "9" (written " 9" once) is the ground truth of 2 of 4 problems: a model always answering 9 scores 0.5.
    assert report.best_constant() == ("9", 0.5)
    assert report.answer_distribution() == {"7": 4, "9": 1, ev.NO_ANSWER: 3}
    text = report.format_constant(top=2)
    assert "best constant answer '9': 0.5000" in text and "margin -0.5000" in text
    assert "3 distinct" in text and "'7' 50.0%" in text and "'(no answer)' 37.5%" in text and "1 more" in text
    summary = report.summary()
    assert summary["best_constant_answer"] == "9" and summary["best_constant_accuracy"] == 0.5
    assert summary["answer_distribution"] == {"7": 4, ev.NO_ANSWER: 3, "9": 1}


# -------------------------------------------------------------------------------------- evaluate()


class ScriptedEngine:
    """Returns fixed responses (text, finish reason) per prompt, in call order; records its calls."""

    def __init__(self, scripts, *, max_model_len=4096, max_num_seqs=4):
        self.scripts = list(scripts)
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.calls = []

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        out = []
        for p in params:
            script = self.scripts.pop(0)
            assert len(script) == p.n
            out.append([Completion([1] * (len(t) // 4 + 1), [0.0], reason, t) for t, reason in script])
        return out


def test_evaluate_scores_counts_and_seeds(tmp_path):
    problems = [
        Problem("What is 2+3?", "5", index=7),
        Problem("Pick one.", "D", index=8),
        Problem("1/2?", "0.5", index=9),
    ]
    boxed = lambda a: f"<think>ok</think> <answer>\\boxed{{{a}}}</answer>"
    engine = ScriptedEngine(
        [
            [(boxed(5), "stop"), (boxed(6), "stop")],
            [(boxed("D"), "stop"), ("<answer>(D)</answer>", "stop")],
            [(boxed("\\frac{1}{2}"), "length"), ("no answer", "length")],
        ],
        max_num_seqs=2,  # one problem (2 samples) per generate call: chunking must keep the order
    )
    tok = CharTokenizer()
    with RewardScorer(workers=1) as scorer:
        report = ev.evaluate(
            engine, tok, problems, samples=2, max_tokens=64, scorer=scorer, dataset="mix", out_dir=tmp_path, seed=3
        )
    assert len(engine.calls) == 3
    assert [r.scores for r in report.records] == [[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]  # truncated scores 0
    assert [r.index for r in report.records] == [7, 8, 9]
    assert report.accuracy == pytest.approx(0.5) and report.pass_at_k == pytest.approx(2 / 3)
    assert report.truncated == 2
    params = [p for _, ps in engine.calls for p in ps]
    assert [p.seed for p in params] == [(3 << 32) + 7 * 2, (3 << 32) + 8 * 2, (3 << 32) + 9 * 2]
    assert all(p.stop == ev.ORZ_EVAL_STOP and p.stop_token_ids == [tok.eos_token_id] for p in params)
    assert all(p.temperature == 1.0 and p.top_p == 1.0 and p.max_tokens == 64 for p in params)
    prompt = engine.calls[0][0][0]
    assert tok.decode(prompt).endswith("What is 2+3?\nAssistant: <think>")  # ORZ's template
    assert len((tmp_path / "mix.jsonl").read_text().splitlines()) == 3


def test_evaluate_engine_without_limits_gets_one_call():
    engine = ScriptedEngine([[("<answer>4</answer>", "stop")]] * 3, max_model_len=None, max_num_seqs=None)
    problems = [Problem("2+2?", "4", index=i) for i in range(3)]
    report = ev.evaluate(engine, CharTokenizer(), problems, samples=1, max_tokens=8)
    assert len(engine.calls) == 1 and len(engine.calls[0][0]) == 3
    assert report.accuracy == 1.0 and report.settings["reward_mode"] == "default"


def test_evaluate_rejects_bad_inputs():
    tok = CharTokenizer()
    long_problem = [Problem("x" * 100, "1", index=4)]
    with pytest.raises(ValueError, match="problem 4: its prompt has .* tokens but the model's context is 50"):
        ev.evaluate(ScriptedEngine([], max_model_len=50), tok, long_problem, samples=1, max_tokens=4)
    with pytest.raises(ValueError, match="samples must be an int >= 1"):
        ev.evaluate(ScriptedEngine([]), tok, long_problem, samples=0, max_tokens=4)
    with pytest.raises(ValueError, match="no problems"):
        ev.evaluate(ScriptedEngine([]), tok, [], samples=1, max_tokens=4)


# -------------------------------------------------------------------------------------------- CLI


def _byte_level_tokenizer():
    """A Hugging Face byte-level tokenizer (256 bytes + EOS), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random-weight Llama saved as a Hugging Face directory, without a tokenizer."""
    from orz_fast import parallel
    from orz_fast.models import build_model, save_pretrained

    parallel.initialize(1, 1)
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_pretrained(build_model(TINY_LLAMA, seed=0, device="cpu"), path)
    return path


def test_cli_end_to_end_tiny_random_model(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        (model / f.name).symlink_to(f)
    _byte_level_tokenizer().save_pretrained(model)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "orz_fast.eval", "--model", str(model), "--data", "math500", "--limit", "3"]
    cmd += ["--samples", "2", "--max-tokens", "8", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "math500: avg@2 " in proc.stdout
    lines = [json.loads(line) for line in (out / "math500.jsonl").read_text().splitlines()]
    assert [r["index"] for r in lines] == [0, 1, 2]
    _, problems = ev.load_eval_set("math500", limit=3)
    assert [r["answer"] for r in lines] == [p.answer for p in problems]
    for r in lines:
        assert len(r["responses"]) == len(r["scores"]) == 2
        assert all(1 <= n <= 8 for n in r["response_tokens"])
        assert all(f in ("stop", "length") for f in r["finish_reasons"])
    summary = json.loads((out / "math500_summary.json").read_text())
    assert summary["num_problems"] == 3 and summary["samples"] == 2 and summary["template"] == "orz"
    assert 0.0 <= summary["accuracy"] <= 1.0
    truncated = sum(f == "length" for r in lines for f in r["finish_reasons"])
    assert summary["truncation_rate"] == pytest.approx(truncated / 6)
    assert summary["mean_response_tokens"] == pytest.approx(sum(sum(r["response_tokens"]) for r in lines) / 6)


def test_cli_errors_name_the_bad_input(tiny_model_dir, tmp_path, capsys):
    math = ["--data", "math500", "--limit", "1", "--max-tokens", "2", "--out", str(tmp_path)]
    cases = [
        (["--model", str(tiny_model_dir), "--data", "math5000"], "'math5000' is neither a named eval set"),
        (["--model", str(tmp_path / "nope"), *math], f"{tmp_path / 'nope'} not found"),
        (["--model", str(tiny_model_dir), *math, "--samples", "0"], "--samples must be >= 1, got 0"),
        (["--model", str(tiny_model_dir), *math], "no tokenizer in this directory"),
    ]
    for argv, message in cases:
        assert ev.main(argv) == 2
        assert message in capsys.readouterr().err
    # The character tokenizer of random-weight runs, with the plain template.
    argv = ["--model", str(tiny_model_dir), *math, "--tokenizer", "char", "--template", "plain", "--no-progress"]
    assert ev.main(argv) == 0
    out = capsys.readouterr().out
    assert "math500: avg@16 " in out and "best constant answer" not in out
    summary = json.loads((tmp_path / "math500_summary.json").read_text())
    assert summary["num_problems"] == 1 and summary["best_constant_accuracy"] == 1.0
    assert sum(summary["answer_distribution"].values()) == 16
    assert ev.main([*argv, "--report-constant"]) == 0
    out = capsys.readouterr().out
    assert f"best constant answer {summary['best_constant_answer']!r}: 1.0000" in out
    assert "math500: final answers (" in out


def test_cli_smollm2_gguf_reports_a_number(tmp_path, capsys):
    gguf = smollm2_gguf()
    argv = ["--model", str(gguf), "--data", "math500", "--limit", "2", "--samples", "1", "--max-tokens", "8"]
    assert ev.main([*argv, "--out", str(tmp_path), "--no-progress"]) == 0
    assert "math500: avg@1 " in capsys.readouterr().out
    summary = json.loads((tmp_path / "math500_summary.json").read_text())
    assert summary["num_problems"] == 2 and 0.0 <= summary["accuracy"] <= 1.0
    assert 1 <= summary["mean_response_tokens"] <= 8
    lines = (tmp_path / "math500.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["responses"][0] for line in lines)
