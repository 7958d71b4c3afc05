"""Task sources (unirl_fast.tasks) and config files: every source loads a small file or dataset written here (images
made in code), a bad row is an error naming the file and the line, and the split is as given or derived (stable,
seeded, a prompt never on both sides)."""
import csv
import dataclasses
import json
import re

import pytest
import torch

from unirl_fast import world as W
from unirl_fast.cli import main
from unirl_fast.tasks import Task, load_image, load_tasks
from unirl_fast.train import PRESETS, TrainConfig
from unirl_fast.train.config import with_image_schedule, with_pipeline
from unirl_fast.train.scenarios import get_scenario

GEN, EDIT, UND = get_scenario("generate"), get_scenario("edit"), get_scenario("understand")


def _png(path, color="red", size=32):
    from unirl_fast.rewards import to_pil

    img = W.render_scene(W.Scene((W.Obj(color, "square", "left"),)), size)
    to_pil(img).save(path)
    return img


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_world_source_is_the_world_and_offers_the_task_attributes():
    ts = load_tasks("world", EDIT)
    assert ts.train == W.edit_tasks("train") and ts.eval == W.edit_tasks("eval")
    t = ts.train[0]
    assert t.inverse and t.meta["spec"] == t.spec and t.origin
    assert torch.equal(t.source_image(32), W.render_scene(t.source, 32))
    und = load_tasks("world", UND).train[0]
    assert und.context == und.canonical and und.answer
    assert load_tasks("world", GEN).train[0].source_image(32) is None


def test_jsonl_rows_images_relative_to_the_file_and_meta(tmp_path):
    (tmp_path / "img").mkdir()
    ref = _png(tmp_path / "img" / "a.png")
    rows = [{"prompt": "make it blue", "image": "img/a.png", "inverse": "make it red", "split": "train",
             "tag": "recolor", "want": {"color": "blue"}},
            {"prompt": "make it green", "image": str(tmp_path / "img" / "a.png"), "split": "eval"}]
    ts = load_tasks(str(_jsonl(tmp_path / "p.jsonl", rows)), EDIT)
    (t,), (e,) = ts.train, ts.eval
    assert t.prompt == "make it blue" and t.inverse == "make it red" and e.inverse == ""
    assert t.meta == {"tag": "recolor", "want": {"color": "blue"}}
    assert t.origin.endswith("p.jsonl:1") and e.origin.endswith("p.jsonl:2")
    assert torch.allclose(t.source_image(32), ref, atol=1 / 127.5)  # an 8-bit PNG of the rendered scene
    assert t.source_image(16).shape == (3, 16, 16)
    # a .json list reads the same
    (tmp_path / "p.json").write_text(json.dumps(rows))
    assert [x.prompt for x in load_tasks(str(tmp_path / "p.json"), EDIT).train] == ["make it blue"]


@pytest.mark.parametrize("line, match", [
    ('{"prompt": "ok"}\n{"prompt": ""}', r"p\.jsonl:2: 'prompt' must be a non-empty string"),
    ('{"prompt": "ok"}\n\n{"prompt": "x", ', r"p\.jsonl:3: not a JSON object"),
    ('["prompt"]', r"p\.jsonl:1: a task must be a JSON object"),
    ('{"prompt": "ok", "image": "missing.png"}', r"p\.jsonl:1: image 'missing.png' does not exist"),
    ('{"prompt": "ok", "answer": [1]}', r"p\.jsonl:1: 'answer' must be a string"),
    ('{"prompt": "a", "split": "train"}\n{"prompt": "b"}', r"p\.jsonl:2: no 'split' although other rows give one"),
    ('{"prompt": "a", "split": "dev"}', r"p\.jsonl:1: split 'dev' is neither"),
])
def test_a_bad_jsonl_row_names_the_file_and_line(tmp_path, line, match):
    (tmp_path / "p.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=match):
        load_tasks(str(tmp_path / "p.jsonl"), GEN)


def test_scenario_needs_are_checked_at_load(tmp_path):
    p = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a red square"}, {"prompt": "two circles"}])
    with pytest.raises(ValueError, match=r"p\.jsonl:1: scenario 'edit' edits a source image"):
        load_tasks(str(p), EDIT)
    with pytest.raises(ValueError, match=r"p\.jsonl:1: scenario 'understand' needs a 'context'"):
        load_tasks(str(p), UND)
    assert len(load_tasks(str(p), GEN).train) + len(load_tasks(str(p), GEN).eval) == 2


def test_csv_source(tmp_path):
    _png(tmp_path / "s.png")
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "image", "answer", "context", "split", "difficulty"])
        w.writerow(["what colour is the square?", "s.png", "red", "one red square on the left", "train", "easy"])
        w.writerow(["where is the square?", "", "left", "one red square on the left", "eval", ""])
    ts = load_tasks(str(tmp_path / "t.csv"), UND)
    (t,), (e,) = ts.train, ts.eval
    assert (t.answer, t.context, t.meta) == ("red", "one red square on the left", {"difficulty": "easy"})
    assert t.image.endswith("s.png") and e.image is None and e.meta == {}
    assert e.origin.endswith("t.csv:3")
    (tmp_path / "bad.csv").write_text("text,answer\nhi,1\n")
    with pytest.raises(ValueError, match=r"bad\.csv:1: the header has no 'prompt' column"):
        load_tasks(str(tmp_path / "bad.csv"), GEN)
    (tmp_path / "bad2.csv").write_text("prompt,answer\nhi,1\nho,2,3\n")
    with pytest.raises(ValueError, match=r"bad2\.csv:3: more fields than the header's 2"):
        load_tasks(str(tmp_path / "bad2.csv"), GEN)


def test_huggingface_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    from unirl_fast.rewards import to_pil

    imgs = [to_pil(W.render_scene(W.Scene((W.Obj(c, "circle", "right"),)), 32)) for c in ("red", "blue", "green")]
    feats = datasets.Features({"prompt": datasets.Value("string"), "image": datasets.Image(),
                               "inverse": datasets.Value("string"), "source_id": datasets.Value("int64")})
    rows = lambda ids: {"prompt": [f"make the circle yellow {i}" for i in ids], "image": [imgs[i] for i in ids],  # noqa: E731
                        "inverse": ["make the circle red"] * len(ids), "source_id": list(ids)}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows([0, 1]), features=feats),
                               "test": datasets.Dataset.from_dict(rows([2]), features=feats)})
    dd.save_to_disk(str(tmp_path / "ds"))
    ts = load_tasks(str(tmp_path / "ds"), EDIT)
    assert [t.meta["source_id"] for t in ts.train] == [0, 1] and [t.meta["source_id"] for t in ts.eval] == [2]
    src = ts.eval[0].source_image(32)
    assert torch.allclose(src, load_image(imgs[2], 32))
    assert src[1].max() > 0.5 and src[0].max() < 0  # the third row's image: the green circle
    # one Dataset (no splits): the split is derived
    datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(20)]}).save_to_disk(str(tmp_path / "one"))
    one = load_tasks(str(tmp_path / "one"), GEN)
    assert len(one.train) + len(one.eval) == 20 and one.eval
    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(str(tmp_path / "noprompt"))
    with pytest.raises(ValueError, match=r"no 'prompt' column \(columns: \['text'\]\)"):
        load_tasks(str(tmp_path / "noprompt"), GEN)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a Hugging Face datasets directory"):
        load_tasks(str(tmp_path / "plain"), GEN)


GENEVAL = [  # lines in the format of GenEval's evaluation_metadata.jsonl
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
     "prompt": "a photo of two clocks"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
    {"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1,
                                                                   "position": ["left of", 0]}],
     "prompt": "a photo of a dog left of a cat"},
]


def test_geneval_metadata_reads_as_is(tmp_path):
    ts = load_tasks(str(_jsonl(tmp_path / "evaluation_metadata.jsonl", GENEVAL)), GEN, eval_fraction=0.25)
    tasks = ts.train + ts.eval
    assert sorted(t.prompt for t in tasks) == sorted(r["prompt"] for r in GENEVAL)
    by = {t.prompt: t for t in tasks}
    assert by["a photo of two clocks"].meta == {k: v for k, v in GENEVAL[1].items() if k != "prompt"}
    bad = dict(GENEVAL[3], include=[{"class": "cat", "count": "one"}])
    with pytest.raises(ValueError, match=r"meta\.jsonl:2: GenEval include\[0\] 'count' must be an integer"):
        load_tasks(str(_jsonl(tmp_path / "meta.jsonl", [GENEVAL[0], bad])), GEN)
    bad = dict(GENEVAL[3], include=[{"class": "dog", "position": "left"}])
    with pytest.raises(ValueError, match=r"meta\.jsonl:1: GenEval include\[0\] 'position' must be"):
        load_tasks(str(_jsonl(tmp_path / "meta.jsonl", [bad])), GEN)


def test_derived_split_is_stable_seeded_and_keeps_a_prompt_on_one_side(tmp_path):
    prompts = [f"prompt number {i}" for i in range(200)]
    p = _jsonl(tmp_path / "p.jsonl", [{"prompt": q, "k": i} for i, q in enumerate(prompts + prompts[:50])])
    a, b = load_tasks(str(p), GEN), load_tasks(str(p), GEN)
    assert [t.prompt for t in a.eval] == [t.prompt for t in b.eval]  # stable
    assert 20 <= len({t.prompt for t in a.eval}) <= 60  # ~20% of 200
    assert not {t.prompt for t in a.eval} & {t.prompt for t in a.train}  # repeats land on one side
    c = load_tasks(str(p), GEN, split_seed=1)
    assert {t.prompt for t in c.eval} != {t.prompt for t in a.eval}
    d = load_tasks(str(p), GEN, eval_fraction=0.5)
    assert len({t.prompt for t in d.eval}) > len({t.prompt for t in a.eval})
    tiny = load_tasks(str(_jsonl(tmp_path / "two.jsonl", [{"prompt": "x"}, {"prompt": "y"}])), GEN)
    assert len(tiny.train) == len(tiny.eval) == 1  # a small file still holds one prompt out
    with pytest.raises(ValueError, match="has no held-out tasks"):
        load_tasks(str(_jsonl(tmp_path / "one.jsonl", [{"prompt": "x"}])), GEN)


def test_unknown_source_kinds_are_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file or directory"):
        load_tasks(str(tmp_path / "nope.jsonl"), GEN)
    (tmp_path / "t.txt").write_text("a\n")
    with pytest.raises(ValueError, match=r"unknown file type '\.txt'"):
        load_tasks(str(tmp_path / "t.txt"), GEN)
    bad = Task("p", image=str(tmp_path / "t.txt"), origin="x.jsonl:4")
    with pytest.raises(ValueError, match=r"x\.jsonl:4: image .* cannot be read as an image"):
        bad.source_image(32)


# config files -----------------------------------------------------------------------------------------------------
def _resolved(argv, capsys):
    assert main(["train", *argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def test_config_file_every_flag_a_key_and_flags_win(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("config: smoke\nscenario: generate\nprompts-per-step: 4\nlr_dit: 1e-4\n"
                                       "reward: [world, 'format=0.5']\nfp8: false\nmodel_path: null\n")
    got = _resolved(["--config-file", str(tmp_path / "run.yaml")], capsys)
    smoke = dataclasses.asdict(with_pipeline(with_image_schedule(dataclasses.replace(  # as config.json holds it
        PRESETS["smoke"], scenario="generate", prompts_per_step=4, lr_dit=1e-4, reward=("world", "format=0.5")))))
    assert got == json.loads(json.dumps(smoke))
    got = _resolved(["--config-file", str(tmp_path / "run.yaml"), "--prompts-per-step", "6", "--reward", "world"],
                    capsys)
    assert got["prompts_per_step"] == 6 and got["reward"] == ["world"] and got["lr_dit"] == 1e-4
    # the printed config is itself a config file that resolves to the same run
    (tmp_path / "printed.json").write_text(json.dumps(got))
    assert _resolved(["--config-file", str(tmp_path / "printed.json")], capsys) == got
    assert TrainConfig(**got).reward == ("world",)  # read back from JSON: a tuple again


@pytest.mark.parametrize("text, match", [
    ("prompts_per_stp: 3\n", r"unknown setting 'prompts_per_stp' \(did you mean 'prompts_per_step'\?\)"),
    ("prompts_per_step: 3.5\n", r"'prompts_per_step' must be an integer, got 3\.5"),
    ("fp8: 'yes'\n", r"'fp8' must be true or false"),
    ("reward: [1]\n", r"'reward' must be a string or a list of strings"),
    ("config: huge\n", r"config 'huge' is not a trainer preset"),
    ("- a\n", r"must hold a mapping of settings, got list"),
    ("a: [\n", r"is not valid YAML"),
])
def test_bad_config_files_name_the_file_and_key(tmp_path, capsys, text, match):
    (tmp_path / "run.yaml").write_text(text)
    assert main(["train", "--config-file", str(tmp_path / "run.yaml"), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "run.yaml" in err and len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err
    assert not (tmp_path / "r").exists()


def test_a_resume_refuses_a_changed_task_file(tmp_path, capsys):
    p = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"{c} square on the left", "split": s}
                                      for c, s in (("red", "train"), ("blue", "train"), ("green", "eval"))])
    argv = lambda steps: ["train", "--config", "smoke", "--scenario", "generate", "--steps", steps,  # noqa: E731
                          "--run-dir", str(tmp_path / "r"), "--tasks", str(p), "--reward", "format:^.*$"]
    assert main(argv("1")) == 0
    fp = json.loads((tmp_path / "r" / "tasks.json").read_text())
    assert (fp["tasks"], fp["train"], fp["eval"]) == (str(p), 2, 1)
    capsys.readouterr()
    p.write_text(p.read_text().replace("blue", "cyan"))
    assert main(argv("2")) == 2
    err = capsys.readouterr().err
    assert "was created with other tasks" in err and "the file changed since" in err
    p.write_text(p.read_text().replace("cyan", "blue"))
    assert main(argv("2")) == 0  # restored: resumes
