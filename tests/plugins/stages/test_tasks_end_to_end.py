"""Real data through the same pipeline: the jsonl task end to end, and a bad row through the CLI."""

from __future__ import annotations

import json

from instructrl.core.cli import main
from instructrl.core.fields import validate
from instructrl.plugins.tasks.world import World, WorldConfig


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def world_as_files(tmp_path):
    w = World(
        validate(
            WorldConfig,
            {
                "n_demos": 120,
                "n_rank_prompts": 40,
                "n_rank_eval_prompts": 10,
                "n_rl_prompts": 80,
                "n_eval_prompts": 20,
                "n_pretrain_docs": 200,
                "n_pretrain_eval_docs": 10,
            },
            "task",
        )
    )
    demos = write_jsonl(
        tmp_path / "sft.jsonl",
        [{"prompt": d.prompt.text, "completion": d.response} for d in w.demonstrations()],
    )
    prefs = write_jsonl(
        tmp_path / "prefs.jsonl",
        [
            {
                "prompt": p.text,
                "chosen": p.fields["answer"],
                "rejected": p.fields["answer"] + "\nhope this helps",
            }
            for p in w.prompts("rl")[:60]
        ],
    )
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": p.text, "answer": p.fields["answer"]} for p in w.prompts("rl")],
    )
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(w.pretraining_text("train")))
    return [
        "task.name=jsonl",
        f"task.demonstrations={demos}",
        f"task.comparisons={prefs}",
        f"task.prompts={prompts}",
        f"task.pretraining={corpus}",
    ]


def test_jsonl_task_runs_the_whole_pipeline(run_smoke, tmp_path):
    summary = run_smoke(
        tmp_path / "run", "instructgpt", [*world_as_files(tmp_path), "rl.iterations=1", "eval.every=0"]
    )
    assert summary["run/status"] == "completed"
    assert summary["eval/judge"] == "reward_model"  # no gold judge in your data
    assert "rm/accuracy_vs_labeler" in summary and "rm/accuracy" not in summary
    assert summary["eval/n_prompts"] > 0


def test_a_bad_row_exits_2_naming_file_and_line(tmp_path, capsys):
    files = world_as_files(tmp_path)
    bad = tmp_path / "sft.jsonl"
    lines = bad.read_text().splitlines()
    lines[6] = '{"prompt": "reverse: abc\\n", "answer": "cba"}'
    bad.write_text("\n".join(lines) + "\n")
    code = main(["run", "sft", "--smoke", "--run-dir", str(tmp_path / "run"), "--no-cache", *files])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and "Traceback" not in err
    assert f"{bad}:7: missing key 'completion'" in err
