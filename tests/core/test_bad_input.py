"""Every kind of bad input either runs or exits 2 with one line naming the key / file:line and what
would be valid — before any stage trains, ``--dry-run`` included, and never with a traceback.

Each category holds several cases; every case runs the launcher in-process as
``instructrl run RECIPE --smoke --dry-run ...`` (a few without ``--dry-run``, to show that nothing is
written either)."""

from __future__ import annotations

import json
import shutil

import pytest
from instructrl.core.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code, err, fragments):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err  # one line, no traceback
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# --------------------------------------------------------------------------------------------
# fixtures: files (recipes, datasets) and model dirs, built once
# --------------------------------------------------------------------------------------------


def rows(path, items):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in items))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_input")
    f = {"dir": str(d)}

    def raw(name, data):
        (d / name).write_bytes(data)
        f[name] = str(d / name)

    raw("empty.yaml", b"")
    raw("comments.yaml", b"# only a comment\n")
    raw("binary.yaml", bytes(range(256)))
    raw("latin1.yaml", b"extends: ppo\ndescription: caf\xe9\n")
    raw("list.yaml", b"- extends\n- ppo\n")
    raw("scalar.yaml", b"just a string\n")
    raw("malformed.yaml", b"extends: ppo\nkl: {coef: 0.1\n")
    raw("tab.yaml", b"extends: ppo\nkl:\n\tcoef: 0.1\n")
    raw("ext_missing.yaml", b"extends: instructgtp\n")
    raw("ext_int.yaml", b"extends: 3\n")
    raw("ext_cycle_a.yaml", b"extends: ext_cycle_b.yaml\n")
    raw("ext_cycle_b.yaml", b"extends: ext_cycle_a.yaml\n")
    raw("stages_map.yaml", b"extends: ppo\nstages: {rl: 1}\n")
    raw("date.yaml", b"extends: ppo\ndescription: 2024-01-01\n")
    raw("every_default.yaml", b"{}\n")
    raw("a_file", b"not a dir\n")

    f["demos"] = rows(d / "demos.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)])
    f["one_demo"] = rows(d / "one_demo.jsonl", [{"prompt": "q", "completion": "a"}])
    f["comps"] = rows(
        d / "comps.jsonl", [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(20)]
    )
    f["prompts"] = rows(d / "prompts.jsonl", [{"prompt": f"p{i}"} for i in range(20)])
    f["few_prompts"] = rows(d / "few_prompts.jsonl", [{"prompt": f"p{i}"} for i in range(4)])
    (d / "corpus.txt").write_text("one document\n\nanother document\n\na third\n")
    f["corpus"] = str(d / "corpus.txt")
    f["bad_demo"] = rows(d / "bad_demo.jsonl", [{"prompt": "q", "completion": "a"}, {"prompt": "q2"}])
    f["bad_json"] = rows(d / "bad_json.jsonl", [{"prompt": "q", "completion": "a"}, "{not json"])
    f["same"] = rows(d / "same.jsonl", [{"prompt": "q", "chosen": "x", "rejected": "x"}])
    f["one_response"] = rows(d / "one_response.jsonl", [{"prompt": "q", "responses": ["only"]}])
    f["ties"] = rows(d / "ties.jsonl", [{"prompt": "q", "responses": ["a", "b"], "ranks": [1, 1]}])
    f["empty_prompt"] = rows(d / "empty_prompt.jsonl", [{"prompt": "p"}, {"prompt": "  "}])
    f["no_text"] = rows(d / "no_text.jsonl", [{"text": "doc"}, {"body": "doc"}])
    raw("empty.jsonl", b"")
    raw("latin1.jsonl", b'{"prompt": "q", "completion": "a"}\n{"prompt": "caf\xe9", "completion": "a"}\n')
    raw("latin1.txt", b"doc one\n\ndoc caf\xe9\n")
    raw(
        "bom.jsonl", '\ufeff{"prompt": "q", "completion": "a"}\n{"prompt": "r", "completion": "b"}\n'.encode()
    )

    from instructrl.plugins.models import train_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(["the quick brown fox"])
    gpt2 = GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=8, n_layer=1, n_head=1, vocab_size=len(tok)))
    llama = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            max_position_embeddings=64,
            vocab_size=len(tok),
        )
    )
    for name, model in (("gpt2_64", gpt2), ("llama_64", llama)):
        model.save_pretrained(str(d / name))
        tok.save_pretrained(str(d / name))
        f[name] = str(d / name)
    shutil.copytree(d / "llama_64", d / "no_tokenizer")
    for p in (d / "no_tokenizer").iterdir():
        if p.name.startswith("tokenizer") or p.name.startswith("special"):
            p.unlink()
    f["no_tokenizer"] = str(d / "no_tokenizer")
    shutil.copytree(d / "gpt2_64", d / "bad_config")
    (d / "bad_config" / "config.json").write_text('{"model_type": "gpt2",\n  "n_positions": }\n')
    f["bad_config"] = str(d / "bad_config")
    (d / "no_config").mkdir()
    f["no_config"] = str(d / "no_config")
    (d / "full_run_dir").mkdir()
    (d / "full_run_dir" / "config.yaml").write_text("seed: 0\n")
    f["full_run_dir"] = str(d / "full_run_dir")
    return f


def jsonl_task(files, **keys):
    """Overrides selecting the jsonl task with complete data, then ``keys`` (name → fixture or value)."""
    given = {
        "demonstrations": files["demos"],
        "comparisons": files["comps"],
        "prompts": files["prompts"],
        "pretraining": files["corpus"],
    }
    given.update({k: files.get(v, v) for k, v in keys.items()})
    return ["task.name=jsonl", *(f"task.{k}={v}" for k, v in given.items() if v is not None)]


def dry(*args):
    return ["run", "ppo", "--smoke", "--dry-run", *args]


# --------------------------------------------------------------------------------------------
# categories: (argv builder, fragments the one line must contain)
# --------------------------------------------------------------------------------------------

RECIPE_FILES = {
    "empty": (lambda f: ["run", f["empty.yaml"], "--dry-run"], ["empty.yaml", "recipe is empty"]),
    "only comments": (
        lambda f: ["run", f["comments.yaml"], "--dry-run"],
        ["comments.yaml", "recipe is empty"],
    ),
    "binary": (
        lambda f: ["run", f["binary.yaml"], "--dry-run"],
        ["binary.yaml:2: not UTF-8 text (byte 0x80)"],
    ),
    "latin-1": (
        lambda f: ["run", f["latin1.yaml"], "--dry-run"],
        ["latin1.yaml:2: not UTF-8 text (byte 0xe9)"],
    ),
    "a YAML list": (
        lambda f: ["run", f["list.yaml"], "--dry-run"],
        ["list.yaml", "must be a mapping", "got list"],
    ),
    "a YAML scalar": (lambda f: ["run", f["scalar.yaml"], "--dry-run"], ["scalar.yaml", "must be a mapping"]),
    "malformed YAML": (
        lambda f: ["run", f["malformed.yaml"], "--dry-run"],
        ["malformed.yaml:", "malformed YAML"],
    ),
    "a tab": (lambda f: ["run", f["tab.yaml"], "--dry-run"], ["tab.yaml:3: malformed YAML"]),
    "extends a missing recipe": (
        lambda f: ["run", f["ext_missing.yaml"], "--dry-run"],
        ["ext_missing.yaml: extends: recipe 'instructgtp' not found", "did you mean 'instructgpt'"],
    ),
    "extends a number": (
        lambda f: ["run", f["ext_int.yaml"], "--dry-run"],
        ["ext_int.yaml: extends: expected a recipe"],
    ),
    "extends cycle": (lambda f: ["run", f["ext_cycle_a.yaml"], "--dry-run"], ["'extends' forms a cycle"]),
    "mapping for a list": (
        lambda f: ["run", f["stages_map.yaml"], "--dry-run"],
        ["stages: is a list", "stages_map.yaml gives a mapping"],
    ),
    "a date value": (lambda f: ["run", f["date.yaml"], "--dry-run"], ["date.yaml", "description"]),
    "a directory": (
        lambda f: ["run", f["dir"], "--dry-run"],
        ["not found: not a file and not a bundled recipe"],
    ),
}

OVERRIDES = {
    "sub-key of an int": (lambda f: dry("seed.x=1"), ["seed: must be an integer"]),
    "sub-key of a section int": (
        lambda f: dry("rl.epochs.x=2"),
        ["rl.epochs: expected an integer, got a mapping"],
    ),
    "sub-key of a float": (lambda f: dry("kl.coef.x=1"), ["kl.coef: expected a number, got a mapping"]),
    "sub-key of a list": (lambda f: dry("stages.x=1"), ["stages: is a list", "override 'stages.x=1'"]),
    "list index": (lambda f: dry("stages.0=sft"), ["stages: is a list", "stages=[...]"]),
    "list for a block": (lambda f: dry("kl=[1]"), ["kl: is a mapping", "override 'kl=[1]'"]),
    "clash between overrides": (lambda f: dry("stages=[rl]", "stages.x=1"), ["override 'stages.x=1'"]),
    "malformed value": (lambda f: dry("kl.coef=[1"), ["override 'kl.coef=[1': malformed value"]),
    "not key=value": (lambda f: dry("kl.coef"), ["unrecognized arguments: kl.coef"]),
    "extends": (lambda f: dry("extends=sft"), ["override 'extends=sft'", "read before overrides"]),
    "smoke block not a mapping": (lambda f: dry("smoke=3"), ["smoke: expected a mapping"]),
    "missing interpolation": (lambda f: dry("rl.epochs=${nope}"), ["rl.epochs", "nope"]),
    "missing value marker": (
        lambda f: dry("reward.name=callable", "reward.fn=???"),
        ["reward.fn: no value ('???'"],
    ),
}

TYPES = {
    "float for int": (lambda f: dry("rl.epochs=2.5"), ["rl.epochs", "converted to Integer"]),
    "word for float": (lambda f: dry("rl.lr=fast"), ["rl.lr", "converted to Float"]),
    "word for bool": (lambda f: dry("eval.greedy=maybe"), ["eval.greedy", "not a valid bool"]),
    "word for a list": (lambda f: dry("task.kinds=reverse"), ["task.kinds: expected a list of strings"]),
    "mapping for a name": (lambda f: dry("policy.name.x=1"), ["policy.name: expected a string"]),
    "null for a float": (lambda f: dry("kl.coef=null"), ["kl.coef", "None"]),
    "list for description": (lambda f: dry("description=[1]"), ["description: expected a string or null"]),
    "number for cache_dir": (lambda f: dry("cache_dir=3"), ["cache_dir: expected a string"]),
    "number for a section": (lambda f: dry("rollout=3"), ["rollout: expected a mapping"]),
    "number for trainer": (lambda f: dry("trainer=3"), ["trainer: expected a mapping"]),
    "null trainer": (lambda f: dry("trainer=null"), ["trainer: expected a mapping"]),
    "trainer mapping value": (
        lambda f: dry("trainer.devices.x=1"),
        ["trainer.devices: expected a list of integers"],
    ),
    "trainer number for a name": (
        lambda f: dry("trainer.accelerator=3"),
        ["trainer.accelerator: expected a string"],
    ),
    "trainer word for an int": (
        lambda f: dry("trainer.num_nodes=two"),
        ["trainer.num_nodes: expected an integer"],
    ),
    "trainer word for a number": (
        lambda f: dry("trainer.gradient_clip_val=x"),
        ["trainer.gradient_clip_val: expected an integer, a number or null"],
    ),
}

RANGES = {
    "zero new tokens": (lambda f: dry("rollout.max_new_tokens=0"), ["rollout.max_new_tokens must be > 0"]),
    "zero eval prompts": (lambda f: dry("eval.n_prompts=0"), ["eval.n_prompts must be > 0"]),
    "ptx seq_len 1": (lambda f: dry("ptx.seq_len=1"), ["ptx.seq_len must be >= 2"]),
    "negative seed": (lambda f: dry("seed=-1"), ["seed: a seed must be in [0, 4294967295]"]),
    "huge stage seed": (lambda f: dry("sft.seed=99999999999"), ["sft.seed: a seed must be in"]),
    "negative task seed": (lambda f: dry("task.seed=-3"), ["task.seed: a seed must be in"]),
    "nan": (lambda f: dry("rl.lr=nan"), ["rl.lr: must be a finite number"]),
    "inf": (lambda f: dry("rollout.temperature=inf"), ["rollout.temperature: must be a finite number"]),
    "devices word": (lambda f: dry("trainer.devices=abc"), ["trainer.devices: expected a count"]),
    "indivisible minibatches": (lambda f: dry("rl.minibatches=3"), ["rl.minibatches: must divide"]),
}

UNKNOWN_NAMES = {
    "key typo": (lambda f: dry("kl.coeff=0.1"), ["kl.coeff", "did you mean 'coef'"]),
    "component": (
        lambda f: dry("objective.name=ppo_clipped"),
        ["objective.name: unknown objective 'ppo_clipped'"],
    ),
    "stage": (lambda f: dry("stages=[rlhf]"), ["stages: unknown stage 'rlhf'"]),
    "logger": (lambda f: dry("loggers=[{name: nope}]"), ["loggers[0].name: unknown logger 'nope'"]),
    "list-item key": (
        lambda f: dry("reward_transforms=[{name: demo_bias, x: 1}]"),
        ["reward_transforms[0].x: unknown key"],
    ),
    "trainer argument": (lambda f: dry("trainer.devises=2"), ["trainer.devises", "did you mean 'devices'"]),
    "stage reference": (
        lambda f: dry("eval.against=@nonstage"),
        ["eval.against: '@nonstage' is not a stage"],
    ),
    "callable reward": (
        lambda f: dry("reward.name=callable", "reward.fn=os:nope"),
        ["reward.fn: module 'os' has no attribute 'nope'"],
    ),
}

PATHS = {
    "missing model dir": (
        lambda f: dry("policy.model=/nonexistent/sft"),
        ["policy.model: model dir not found"],
    ),
    "a file as model dir": (
        lambda f: dry(f"policy.model={f['a_file']}"),
        ["policy.model: not a model dir (a file)"],
    ),
    "no config.json": (
        lambda f: dry(f"reward.model={f['no_config']}"),
        ["reward.model: not an HF model dir (no config.json)"],
    ),
    "broken config.json": (
        lambda f: dry(f"policy.model={f['bad_config']}"),
        ["policy.model:", "config.json:2: unreadable config.json"],
    ),
    "no tokenizer": (
        lambda f: dry(f"policy.model={f['no_tokenizer']}"),
        ["policy.model: no tokenizer in", "tokenizer.json"],
    ),
    "reference without tokenizer": (
        lambda f: dry(f"policy.ref_model={f['no_tokenizer']}"),
        ["policy.ref_model: no tokenizer in"],
    ),
    "cache dir is a file": (
        lambda f: dry(f"cache_dir={f['a_file']}"),
        ["cache_dir: the stage cache must be a directory"],
    ),
    "run dir is a file": (
        lambda f: dry("--run-dir", f["a_file"]),
        ["--run-dir:", "exists and is not a directory"],
    ),
    "run dir not empty": (
        lambda f: dry("--run-dir", f["full_run_dir"]),
        ["--run-dir:", "not empty", "--resume", "--overwrite"],
    ),
    "dataset is a directory": (
        lambda f: dry(*jsonl_task(f, demonstrations="dir")),
        ["task.demonstrations: is a directory, not a file"],
    ),
    "dataset missing": (
        lambda f: dry(*jsonl_task(f, comparisons="/nonexistent/c.jsonl")),
        ["task.comparisons: file not found: /nonexistent/c.jsonl"],
    ),
}

POSITIONS = {
    "gpt2 policy dir": (
        lambda f: dry(f"policy.model={f['gpt2_64']}"),
        [
            "rollout.max_prompt_tokens + rollout.max_new_tokens = 128 + 12",
            "64 positions of policy.model",
            "n_positions",
        ],
    ),
    "gpt2 reference dir": (
        lambda f: dry(f"policy.ref_model={f['gpt2_64']}", "rollout.max_new_tokens=30"),
        ["rollout.max_new_tokens = 128 + 30", "policy.ref_model", "lower rollout.max_prompt_tokens to 33"],
    ),
    "gpt2 base model built": (
        lambda f: dry("base.arch=gpt2"),
        ["rollout.max_prompt_tokens + rollout.max_new_tokens", "128 positions of base.max_positions"],
    ),
    "pretrain sequences": (
        lambda f: dry("base.arch=gpt2", "rollout.max_prompt_tokens=64", "pretrain.seq_len=200"),
        [
            "pretrain.seq_len = 200 does not fit the 128 positions of base.max_positions",
            "lower pretrain.seq_len",
        ],
    ),
    "ptx sequences": (
        lambda f: [
            *("run", "ppo_ptx", "--smoke", "--dry-run"),
            *(f"policy.model={f['gpt2_64']}", "rollout.max_prompt_tokens=40", "ptx.seq_len=65"),
        ],
        ["ptx.seq_len = 65 does not fit the 64 positions of policy.model"],
    ),
    "rm budget": (
        lambda f: dry("base.arch=gpt2", "rollout.max_prompt_tokens=64", "rm.max_new_tokens=70"),
        ["rollout.max_prompt_tokens + rm.max_new_tokens = 64 + 70", "base.max_positions"],
    ),
}

DATASET_ROWS = {
    "missing key": (
        lambda f: dry(*jsonl_task(f, demonstrations="bad_demo")),
        ["task.demonstrations:", "bad_demo.jsonl:2: missing key 'completion'"],
    ),
    "malformed JSON": (
        lambda f: dry(*jsonl_task(f, demonstrations="bad_json")),
        ["bad_json.jsonl:2: malformed JSON"],
    ),
    "chosen equals rejected": (
        lambda f: dry(*jsonl_task(f, comparisons="same")),
        ["task.comparisons:", "same.jsonl:1: 'chosen' and 'rejected' are the same text"],
    ),
    "one ranked response": (
        lambda f: dry(*jsonl_task(f, comparisons="one_response")),
        ["one_response.jsonl:1: 'responses' must be a list of at least 2"],
    ),
    "every response ties": (
        lambda f: dry(*jsonl_task(f, comparisons="ties")),
        ["ties.jsonl:1: every response ties"],
    ),
    "empty prompt": (
        lambda f: dry(*jsonl_task(f, prompts="empty_prompt")),
        ["empty_prompt.jsonl:2: 'prompt' is empty"],
    ),
    "pretraining row without text": (
        lambda f: dry(*jsonl_task(f, pretraining="no_text")),
        ["task.pretraining:", "no_text.jsonl:2: missing key 'text'"],
    ),
    "empty file": (
        lambda f: dry(*jsonl_task(f, demonstrations="empty.jsonl")),
        ["empty.jsonl: no rows; expected one JSON object per line with 'prompt' and 'completion'"],
    ),
    "non-UTF-8 JSONL": (
        lambda f: dry(*jsonl_task(f, demonstrations="latin1.jsonl")),
        ["latin1.jsonl:2: not UTF-8 text (byte 0xe9)"],
    ),
    "non-UTF-8 text": (
        lambda f: dry(*jsonl_task(f, pretraining="latin1.txt")),
        ["latin1.txt:3: not UTF-8 text"],
    ),
}

STAGE_NEEDS = {
    "ptx without pretraining text": (
        # base.model given: no pretrain stage, so ptx is what needs the text
        lambda f: dry(*jsonl_task(f, pretraining=None), f"base.model={f['llama_64']}", "ptx.coef=1"),
        ["task.pretraining: ptx needs pretraining text", "ptx.coef=0"],
    ),
    "pretrain without text": (
        lambda f: dry(*jsonl_task(f, pretraining=None)),
        ["task.pretraining: the pretrain stage needs plain text", "base.model"],
    ),
    "sft without demonstrations": (
        lambda f: dry(*jsonl_task(f, demonstrations=None), f"base.model={f['llama_64']}"),
        ["task.demonstrations: the sft stage needs demonstrations"],
    ),
    "sft with one demonstration": (
        lambda f: dry(*jsonl_task(f, demonstrations="one_demo")),
        ["task.demonstrations: the sft stage needs at least 2 rows"],
    ),
    "rm without comparisons": (
        lambda f: dry(*jsonl_task(f, comparisons=None)),
        ["task.comparisons: the rm stage needs rankings"],
    ),
    "rl without prompts": (
        lambda f: dry(
            *jsonl_task(f, prompts=None, demonstrations=None),
            f"policy.model={f['llama_64']}",
            f"eval.against={f['llama_64']}",
            f"reward.model={f['llama_64']}",
            f"value.model={f['llama_64']}",
        ),
        ["task.prompts: the rl and eval stages need prompts"],
    ),
    "no held-out prompts": (
        lambda f: dry(*jsonl_task(f, prompts="few_prompts")),
        ["task.eval_prompts: no held-out evaluation prompts", "eval_fraction"],
    ),
}

CLI_FLAGS = {
    "resume and overwrite": (
        lambda f: ["run", "ppo", "--resume", "--overwrite", "--run-dir", "x"],
        ["--resume and --overwrite cannot be combined"],
    ),
    "resume without run dir": (lambda f: ["run", "ppo", "--resume"], ["--resume needs --run-dir"]),
    "unknown flag": (lambda f: ["run", "ppo", "--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
    "unknown command": (lambda f: ["runn", "ppo"], ["invalid choice: 'runn'"]),
    "overrides for plugins": (lambda f: ["plugins", "kl.coef=1"], ["unexpected key=value"]),
    "missing recipe": (lambda f: ["run"], ["the following arguments are required: recipe"]),
}

CATEGORIES = {
    "recipe file": RECIPE_FILES,
    "override": OVERRIDES,
    "type": TYPES,
    "range": RANGES,
    "unknown name": UNKNOWN_NAMES,
    "path": PATHS,
    "model positions": POSITIONS,
    "dataset row": DATASET_ROWS,
    "stage needs data": STAGE_NEEDS,
    "cli flag": CLI_FLAGS,
}
CASES = [
    pytest.param(build, fragments, id=f"{category}: {name}")
    for category, cases in CATEGORIES.items()
    for name, (build, fragments) in cases.items()
]


def test_every_category_has_at_least_two_cases():
    assert all(len(cases) >= 2 for cases in CATEGORIES.values())


@pytest.mark.parametrize(("build", "fragments"), CASES)
def test_bad_input_exits_2_with_one_line_naming_it(capsys, files, build, fragments):
    code, out, err = run_cli(capsys, *build(files))
    assert_one_line(code, err, fragments)
    assert "valid; nothing was written" not in out


# --------------------------------------------------------------------------------------------
# what still runs, and what is caught without --dry-run
# --------------------------------------------------------------------------------------------

GOOD = {
    "every default ({})": lambda f: ["run", f["every_default.yaml"], "--smoke", "--dry-run"],
    "complete jsonl data": lambda f: dry(*jsonl_task(f)),
    "BOM in a JSONL file": lambda f: dry(*jsonl_task(f, demonstrations="bom.jsonl")),
    "gpt2 dir with room": lambda f: dry(f"policy.model={f['gpt2_64']}", "rollout.max_prompt_tokens=51"),
    "rotary model dir is not checked": lambda f: dry(f"policy.model={f['llama_64']}"),
    "gpt2 base with room": lambda f: dry("base.arch=gpt2", "rollout.max_prompt_tokens=115"),
    "ptx off without text": lambda f: dry(
        *jsonl_task(f, pretraining=None), f"base.model={f['llama_64']}", "ptx.coef=0"
    ),
    "resume a full run dir": lambda f: dry("--run-dir", f["full_run_dir"], "--resume"),
}


@pytest.mark.parametrize("build", list(GOOD.values()), ids=list(GOOD))
def test_valid_input_still_runs(capsys, files, build):
    code, out, err = run_cli(capsys, *build(files))
    assert code == 0, err
    assert "valid; nothing was written" in out


def test_the_boundary_of_the_position_rule(capsys, files):
    """prompt + response + end token == positions fits; one more token does not."""
    ok = run_cli(capsys, *dry(f"policy.model={files['gpt2_64']}", "rollout.max_prompt_tokens=51"))
    bad = run_cli(capsys, *dry(f"policy.model={files['gpt2_64']}", "rollout.max_prompt_tokens=52"))
    assert ok[0] == 0, ok[2]
    assert_one_line(bad[0], bad[2], ["52 + 12 (+1 end token)", "lower rollout.max_prompt_tokens to 51"])


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["task.demonstrations={bad_demo}"], "bad_demo.jsonl:2: missing key 'completion'"),
        (["task.pretraining=null", "base.model={llama_64}", "ptx.coef=1"], "task.pretraining: ptx needs"),
        (["policy.model={gpt2_64}"], "64 positions of policy.model"),
        (["policy.model={no_tokenizer}"], "policy.model: no tokenizer"),
    ],
)
def test_without_dry_run_nothing_is_written_and_nothing_trains(capsys, files, tmp_path, extra, fragment):
    from instructrl.core.registry import get_registry

    run_dir = tmp_path / "run"
    before = get_registry().builds
    argv = ["run", "ppo", "--smoke", "--run-dir", str(run_dir), *jsonl_task(files)]
    code, _, err = run_cli(capsys, *argv, *(e.format(**files) for e in extra))
    assert_one_line(code, err, [fragment])
    assert not run_dir.exists()
    assert get_registry().builds == before  # no component was built to find out


def test_dry_run_reads_every_row_without_building_anything(capsys, files):
    from instructrl.core.registry import get_registry

    before = get_registry().builds
    code, _, err = run_cli(capsys, *dry(*jsonl_task(files)))
    assert code == 0, err
    assert get_registry().builds == before


@pytest.mark.parametrize(
    ("disabled", "argv", "fragments"),
    [
        (
            "instructrl.plugins.objectives",
            dry(),
            ["objective.name: unknown objective 'ppo_clip'", "none registered"],
        ),
        ("instructrl.plugins.kl", dry(), ["kl.estimator: unknown kl_estimator 'k1'"]),
        (
            "",
            dry("reward.name=callable", "reward.fn=no_such_module_xyz:score"),
            ["reward.fn: cannot import module"],
        ),
    ],
)
def test_a_missing_plugin_or_user_code_is_one_line(capsys, disabled, argv, fragments):
    import os

    from instructrl.core.registry import get_registry

    old = os.environ.get("INSTRUCTRL_DISABLE_PLUGINS")
    os.environ["INSTRUCTRL_DISABLE_PLUGINS"] = disabled
    try:
        get_registry(refresh=True, strict=False)
        code, _, err = run_cli(capsys, *argv)
    finally:
        if old is None:
            os.environ.pop("INSTRUCTRL_DISABLE_PLUGINS")
        else:
            os.environ["INSTRUCTRL_DISABLE_PLUGINS"] = old
        get_registry(refresh=True, strict=False)
    assert_one_line(code, err, fragments)


def test_debug_shows_the_traceback_of_bad_input(capsys, files):
    code, _, err = run_cli(capsys, "run", files["empty.yaml"], "--dry-run", "--debug")
    assert code == 2 and "Traceback" in err and "recipe is empty" in err
