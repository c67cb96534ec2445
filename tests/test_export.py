"""`hallu prepare export`: a TRL datasets folder stock DPOTrainer trains on, and a LLaMA-Factory data set."""

import json
import math
import shutil

import pytest
from typer.testing import CliRunner

from hallu.commands import app
from hallu.records import PreferencePair, Prompt, Response, pair_from_external, read_records

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def revised(tmp_path_factory):
    """A shapes world whose responses were revised into dpo pairs (two samples per prompt, one wrong)."""
    run = tmp_path_factory.mktemp("export") / "run"
    assert cli("prepare", "shapes", "--out", run, "--images", 6, "--seed", 4).exit_code == 0
    prompts = read_records(run / "data" / "prompts.jsonl", Prompt)
    rows = []
    for p in prompts:
        rows.append(Response(id=f"{p.id}#0", prompt_id=p.id, sample=0, text=p.reference, model="m"))
        wrong = "zebra" if "zebra" not in p.objects else "giraffe"
        rows.append(Response(id=f"{p.id}#1", prompt_id=p.id, sample=1, text=f"{p.reference} A {wrong} too.",
                             model="m"))
    resp = run.parent / "responses.jsonl"
    resp.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in rows))
    r = cli("revise", "--run", run, "--responses", resp)
    assert r.exit_code == 0, r.output
    return run


def test_trl_folder_reloads_with_image_features(revised, tmp_path):
    from datasets import Image, load_from_disk

    out = tmp_path / "trl"
    r = cli("prepare", "export", "--run", revised, "--format", "trl", "--out", out)
    assert r.exit_code == 0, r.output
    pairs = read_records(revised / "revise" / "pairs.jsonl", PreferencePair)
    ds = load_from_disk(str(out))
    assert len(ds) == len(pairs) == 6
    assert isinstance(ds.features["images"].feature, Image)
    # the pixels live in the folder: the run's images can go away
    shutil.move(revised / "data" / "images", tmp_path / "moved")
    try:
        row = ds[0]
        assert row["images"][0].size == (64, 64)
    finally:
        shutil.move(tmp_path / "moved", revised / "data" / "images")
    assert row["id"] == pairs[0].id
    assert row["prompt"][0]["role"] == "user"
    assert [p["type"] for p in row["prompt"][0]["content"]] == ["image", "text"]
    assert row["prompt"][0]["content"][1]["text"] == pairs[0].prompt
    assert row["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": pairs[0].chosen}]}]
    assert row["rejected"][0]["content"][0]["text"] == pairs[0].rejected


def test_stock_trl_dpo_trainer_takes_one_step_on_the_export(revised, tmp_path):
    import torch
    from datasets import load_from_disk
    from trl import DPOConfig, DPOTrainer

    from hallu import tiny
    from hallu.data.shapes import tokenizer_corpus
    from hallu.train.common import load_for_training

    out = tmp_path / "trl"
    assert cli("prepare", "export", "--run", revised, "--out", out).exit_code == 0
    tiny.build_tiny_model("llava", tmp_path / "model", corpus=tokenizer_corpus(), seed=0)
    model, processor = load_for_training(tmp_path / "model")
    ref, _ = load_for_training(tmp_path / "model")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = DPOConfig(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=2, max_steps=1,
                     learning_rate=1e-3, beta=0.1, logging_steps=1, save_strategy="no", report_to="none",
                     remove_unused_columns=False, seed=0, disable_tqdm=True, max_length=512,
                     dataloader_num_workers=0, bf16=False, fp16=False)
    trainer = DPOTrainer(model=model, ref_model=ref.eval(), args=args, train_dataset=load_from_disk(str(out)),
                         processing_class=processor)
    trainer.train()
    assert trainer.state.global_step == 1
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    # identical policy and reference at step 0: every margin is 0, so the loss is log 2
    assert logged["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert math.isfinite(logged["logps/chosen"]) and logged["logps/chosen"] < 0
    changed = sum(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    assert changed > 0, "one optimizer step moved the weights"


def test_llama_factory_export_reimports_as_the_same_pairs(revised, tmp_path):
    out = tmp_path / "lf"
    r = cli("prepare", "export", "--run", revised, "--format", "llama-factory", "--out", out)
    assert r.exit_code == 0, r.output
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["hallu_pairs"]["ranking"] is True and info["hallu_pairs"]["file_name"] == "pairs.json"
    rows = json.loads((out / "pairs.json").read_text())
    pairs = read_records(revised / "revise" / "pairs.jsonl", PreferencePair)
    assert len(rows) == len(pairs)
    for i, (row, pair) in enumerate(zip(rows, pairs, strict=True)):
        assert row["conversations"][0]["value"].startswith("<image>")
        assert all((out / img).is_file() for img in row["images"])
        back = pair_from_external(row, f"row {i}", i)  # hallu's own LLaMA-Factory importer reads it back
        assert (back.id, back.prompt, back.chosen, back.rejected) == (pair.id, pair.prompt, pair.chosen,
                                                                      pair.rejected)
        assert (out / back.images[0]).read_bytes() == open(pair.images[0], "rb").read()


def test_bad_export_inputs_are_one_line_and_leave_nothing(revised, tmp_path):
    out = tmp_path / "x"
    r = cli("prepare", "export", "--run", revised, "--format", "parquet", "--out", out)
    assert r.exit_code == 2 and "--format parquet" in r.output and not out.exists()
    r = cli("prepare", "export", "--out", out)
    assert r.exit_code == 2 and "exactly one of --run" in r.output
    bad = tmp_path / "pairs.jsonl"
    pair = read_records(revised / "revise" / "pairs.jsonl", PreferencePair)[0]
    bad.write_text(json.dumps({**pair.to_dict(), "images": [str(tmp_path / "gone.png")]}) + "\n")
    r = cli("prepare", "export", "--pairs", bad, "--out", out)
    assert r.exit_code == 2 and f"{bad}:1" in r.output and "gone.png" in r.output and "not found" in r.output
    assert not out.exists() and "Traceback" not in r.output
