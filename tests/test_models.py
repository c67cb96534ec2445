"""Models a user really has: Hub ids from the cache, PEFT adapters, checkpoints without a chat template,
--chat-template files, and the load options checked before anything loads or is written."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hallu import tiny
from hallu.commands import app
from hallu.engine import Decoding, Engine, GenRequest
from hallu.errors import HalluError
from hallu.fileio import sha256_file
from hallu.manifest import dir_fingerprint
from hallu.models import LoadOptions, load_model, read_model_config
from hallu.records import user_messages

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
QUESTION = "Is there a dog in the image?"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The CLI's one error line (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for family in ("llava", "instructblip"):
        tiny.build_tiny_model(family, root / family, seed=1)
    images = root / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(images / "red.png")
    Image.new("RGB", (40, 30), (20, 30, 200)).save(images / "blue.png")
    prompts = images / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "images": [name], "question": QUESTION}) + "\n"
                               for i, name in enumerate(["red.png", "blue.png"])))
    return root


def without_template(src: Path, dst: Path) -> Path:
    """A copy of a model folder as real checkpoints without a template come: no chat_template anywhere."""
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    for name in ("processor_config.json", "tokenizer_config.json", "qformer_tokenizer/tokenizer_config.json"):
        f = dst / name
        if f.is_file():
            cfg = json.loads(f.read_text())
            cfg.pop("chat_template", None)
            f.write_text(json.dumps(cfg))
    return dst


def hub_cache(tmp_path: Path, monkeypatch, folder: Path, repo_id: str, sha: str = "0123456789abcdef" * 2 + "01234567"):
    """A Hugging Face cache as huggingface_hub lays it out, holding ``folder`` as ``repo_id``'s main snapshot."""
    cache = tmp_path / "hub"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    shutil.copytree(folder, repo / "snapshots" / sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo / "snapshots" / sha


def logits(lm, image: Path, prompt: str) -> torch.Tensor:
    enc = lm.processor(images=[Image.open(image).convert("RGB")], text=[prompt], return_tensors="pt")
    with torch.inference_mode():
        return lm.model(**enc).logits.float()


# -- Hub ids ---------------------------------------------------------------------------------------------


def test_hub_id_loads_from_the_cache_offline(models, tmp_path, monkeypatch):
    snapshot = hub_cache(tmp_path, monkeypatch, models / "llava", "tiny-org/tiny-llava")
    assert read_model_config("tiny-org/tiny-llava")["model_type"] == "llava"
    lm = load_model("tiny-org/tiny-llava")
    assert lm.path == snapshot and lm.model_type == "llava"
    # The same files under another name: the same fingerprint and the same outputs.
    assert lm.fingerprint == dir_fingerprint(models / "llava")
    local = load_model(models / "llava")
    prompt = local.processor.apply_chat_template(user_messages(QUESTION, 1), add_generation_prompt=True,
                                                 tokenize=False)
    assert torch.equal(logits(lm, models / "images" / "red.png", prompt),
                       logits(local, models / "images" / "red.png", prompt))


def test_uncached_hub_id_offline_is_one_line_and_writes_nothing(models, tmp_path, monkeypatch):
    hub_cache(tmp_path, monkeypatch, models / "llava", "tiny-org/tiny-llava")
    run = tmp_path / "run"
    line = error_line(cli("rollout", "--run", run, "--model", "org/missing", "--prompts",
                          models / "images" / "prompts.jsonl", "--device", "cpu"))
    assert "org/missing" in line and "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE=1" in line
    assert not (run / "manifest.json").exists()


def test_a_missing_local_path_that_is_no_repo_id_says_no_such_folder(tmp_path):
    with pytest.raises(HalluError, match=r"--model .*/nowhere/at/all: no such folder"):
        read_model_config(tmp_path / "nowhere" / "at" / "all")


# -- PEFT adapters -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(models, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("adapter") / "lora"
    base = load_model(models / "llava")
    torch.manual_seed(0)
    # init_lora_weights=False: random B as well as A, so the adapter changes the outputs.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base.model, config).save_pretrained(out)
    return out


def test_adapter_folder_loads_base_plus_adapter(models, adapter):
    from peft import PeftModel

    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(models / "llava")
    lm = load_model(adapter)
    base = load_model(models / "llava")
    prompt = base.processor.apply_chat_template(user_messages(QUESTION, 1), add_generation_prompt=True,
                                                tokenize=False)
    image = models / "images" / "blue.png"
    base_logits = logits(base, image, prompt)
    reference = PeftModel.from_pretrained(base.model, str(adapter)).eval()  # unmerged: base + B·A per layer
    with torch.inference_mode():
        enc = base.processor(images=[Image.open(image).convert("RGB")], text=[prompt], return_tensors="pt")
        expected = reference(**enc).logits.float()
    got = logits(lm, image, prompt)
    assert (expected - base_logits).abs().max() > 1e-3, "the adapter must change the outputs for this test"
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    # The fingerprint covers both folders: neither alone, and a changed adapter changes it.
    fp_base, fp_adapter = dir_fingerprint(models / "llava"), dir_fingerprint(adapter)
    assert lm.fingerprint.startswith("sha256:") and lm.fingerprint not in (fp_base, fp_adapter)
    assert lm.source.folders() == {"model": adapter, "base_model": models / "llava"}


def test_adapter_fingerprint_changes_with_the_adapter(models, adapter, tmp_path):
    from hallu.hub import resolve_model

    copy = tmp_path / "lora"
    shutil.copytree(adapter, copy)
    before = resolve_model(copy).fingerprint()
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 16
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    assert resolve_model(copy).fingerprint() != before


def test_adapter_whose_base_is_missing_is_one_line(models, adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for base in (str(tmp_path / "gone" / "base"), "org/absent-base"):
        broken = tmp_path / f"lora-{base.count('/')}"
        shutil.copytree(adapter, broken)
        cfg = json.loads((broken / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base
        (broken / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(HalluError) as e:
            read_model_config(broken)
        msg = str(e.value)
        assert str(broken) in msg and repr(base) in msg and "base_model_name_or_path" in msg and "\n" not in msg
        if base.startswith("org/"):
            assert "not in the Hugging Face cache" in msg
        else:
            assert "not a folder on this machine" in msg


# -- chat templates --------------------------------------------------------------------------------------


def test_template_less_llava_uses_the_packaged_llava_1_5_format(models, tmp_path):
    folder = without_template(models / "llava", tmp_path / "llava-nt")
    lm = load_model(folder)
    assert lm.template.source == "packaged:llava-1.5"
    packaged = (ROOT / "data" / "templates" / "llava-1.5.jinja").read_text()
    assert lm.template.sha256 == sha256_file(ROOT / "data" / "templates" / "llava-1.5.jinja")
    assert lm.processor.chat_template == packaged
    engine = Engine(lm.model, lm.processor)
    assert engine.render(GenRequest("q", ["x.png"], QUESTION)) == f"USER: <image>\n{QUESTION} ASSISTANT:"
    # The model's own (tiny) template renders the same LLaVA-1.5 prompt: the fallback is that format.
    own = load_model(models / "llava")
    assert own.template.source == "model"
    assert Engine(own.model, own.processor).render(GenRequest("q", ["x.png"], QUESTION)) == \
        f"USER: <image>\n{QUESTION} ASSISTANT:"


def test_template_less_instructblip_renders_the_bare_instruction_for_lm_and_qformer(models, tmp_path):
    folder = without_template(models / "instructblip", tmp_path / "iblip-nt")
    lm = load_model(folder)
    assert lm.template.source == "packaged:instructblip"
    engine = Engine(lm.model, lm.processor, image_base=models / "images")
    prompt = engine.render(GenRequest("q", ["red.png"], QUESTION))
    assert prompt == QUESTION
    enc = lm.processor(images=[Image.open(models / "images" / "red.png").convert("RGB")], text=[prompt],
                       return_tensors="pt")
    qtok = lm.processor.qformer_tokenizer
    assert qtok.decode(enc["qformer_input_ids"][0], skip_special_tokens=True) == \
        qtok.decode(qtok(QUESTION)["input_ids"], skip_special_tokens=True)
    (gens,) = engine.generate([GenRequest("q", ["red.png"], QUESTION)], Decoding(max_new_tokens=4))
    assert gens[0].tokens >= 1


def test_rollout_on_a_template_less_model_records_the_packaged_template(models, tmp_path):
    folder = without_template(models / "llava", tmp_path / "llava-nt")
    run = tmp_path / "run"
    r = cli("rollout", "--run", run, "--model", folder, "--prompts", models / "images" / "prompts.jsonl",
            "--greedy", "--max-new-tokens", 3, "--device", "cpu")
    assert r.exit_code == 0, r.output
    stage = json.loads((run / "manifest.json").read_text())["stages"]["rollout"]
    sha = sha256_file(ROOT / "data" / "templates" / "llava-1.5.jinja")
    assert stage["chat_template"] == {"source": "packaged:llava-1.5", "sha256": sha}
    responses = (run / "rollout" / "responses.jsonl").read_text().splitlines()
    assert [json.loads(x)["prompt_id"] for x in responses] == ["p0", "p1"]


def test_a_model_type_without_packaged_template_names_the_flag(tmp_path):
    from hallu.processors import choose_chat_template

    class Bare:
        chat_template = None

    with pytest.raises(HalluError, match=r"--model m: the model ships no chat template .*'qwen2_vl'.*--chat-template"):
        choose_chat_template(Bare(), "qwen2_vl", None, "--model m")


def _pope_files(models: Path, tmp_path: Path) -> Path:
    q = tmp_path / "tiny_pope_random.json"
    q.write_text("".join(json.dumps({"question_id": i, "image": img, "text": QUESTION, "label": label}) + "\n"
                         for i, (img, label) in enumerate([("red.png", "yes"), ("blue.png", "no")])))
    return q


def test_chat_template_file_is_used_and_recorded_in_rollout_and_eval(models, tmp_path):
    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>"
                        "{% else %}Q: {{ p['text'] }}{% endif %}{% endfor %}{% endfor %}"
                        "{% if add_generation_prompt %}{{ '\\n' }}A:{% endif %}")
    sha = sha256_file(template)
    lm = load_model(models / "llava", chat_template=str(template))
    assert lm.template.recorded() == {"source": f"file:{template}", "sha256": sha}
    assert Engine(lm.model, lm.processor).render(GenRequest("q", ["x"], QUESTION)) == f"<image>Q: {QUESTION}\nA:"

    run = tmp_path / "run"
    r = cli("rollout", "--run", run, "--model", models / "llava", "--prompts", models / "images" / "prompts.jsonl",
            "--greedy", "--max-new-tokens", 2, "--device", "cpu", "--chat-template", template)
    assert r.exit_code == 0, r.output
    stage = json.loads((run / "manifest.json").read_text())["stages"]["rollout"]
    assert stage["chat_template"] == {"source": f"file:{template}", "sha256": sha}
    assert stage["options"]["chat_template"] == str(template) and stage["options"]["chat_template_sha256"] == sha
    assert stage["options"]["dtype"] == "auto" and stage["options"]["attn"] == "sdpa"  # the keys runs always had

    out = tmp_path / "pope"
    r = cli("eval", "pope", "--model", models / "llava", "--images", models / "images", "--questions",
            _pope_files(models, tmp_path), "--out", out, "--max-new-tokens", 2, "--chat-template", template)
    assert r.exit_code == 0, r.output
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["chat_template"] == {"source": f"file:{template}", "sha256": sha}
    assert settings["prompt_example"] == f"<image>Q: {QUESTION}\nA:"


def test_eval_records_the_models_own_template(models, tmp_path):
    out = tmp_path / "pope"
    r = cli("eval", "pope", "--model", models / "llava", "--images", models / "images", "--questions",
            _pope_files(models, tmp_path), "--out", out, "--max-new-tokens", 2)
    assert r.exit_code == 0, r.output
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["chat_template"] == {"source": "model",
                                         "sha256": sha256_file(models / "llava" / "chat_template.jinja")}


@pytest.mark.parametrize("text, why", [
    ("{% for m in messages %}{{ m['role'] }}", "does not render"),  # unclosed block: a syntax error
    ("{{ messages[0]['content'] | nosuchfilter }}", "does not render"),
    ("Hello.", "without its question"),  # renders, but drops the question
])
def test_a_template_file_that_does_not_render_is_one_line_before_anything_is_written(models, tmp_path, text, why):
    template = tmp_path / "bad.jinja"
    template.write_text(text)
    run = tmp_path / "run"
    line = error_line(cli("rollout", "--run", run, "--model", models / "llava", "--prompts",
                          models / "images" / "prompts.jsonl", "--chat-template", template))
    assert f"--chat-template {template}" in line and why in line
    assert not run.exists()


# -- options checked before anything loads ----------------------------------------------------------------


@pytest.mark.parametrize("flags, expected", [
    (["--dtype", "float33"], "--dtype float33: choose one of"),
    (["--attn", "flash"], "--attn flash: choose one of"),
    (["--device", "gpu"], "--device gpu: not a device"),
    (["--device", "cuda:x"], "--device cuda:x: not a device"),
    (["--chat-template", "missing.jinja"], "--chat-template missing.jinja: no such file"),
])
def test_typos_fail_before_any_model_loads_or_file_is_written(models, tmp_path, flags, expected):
    run, out = tmp_path / "run", tmp_path / "pope"
    line = error_line(cli("rollout", "--run", run, "--model", models / "llava", "--prompts",
                          models / "images" / "prompts.jsonl", *flags))
    assert expected in line and not run.exists()
    line = error_line(cli("eval", "pope", "--model", models / "llava", "--images", models / "images",
                          "--questions", _pope_files(models, tmp_path), "--out", out, *flags))
    assert expected in line and not out.exists()


def test_validate_needs_no_torch_and_read_model_config_stays_light(models):
    code = (
        "import sys\n"
        "from hallu.errors import HalluError\n"
        "from hallu.models import LoadOptions, read_model_config\n"
        "try:\n"
        "    LoadOptions(device='gpu').validate()\n"
        "except HalluError as e:\n"
        "    print(e)\n"
        f"print(read_model_config({str(models / 'llava')!r})['model_type'])\n"
        "print('torch' in sys.modules, 'transformers.modeling_utils' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["--device gpu: not a device; use auto, cpu, cuda, cuda:N (N a number) or mps",
                                     "llava", "False False"]


def test_the_vision_language_types_read_from_source_equal_transformers_mapping():
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from hallu.models import image_text_to_text_types

    assert image_text_to_text_types() == frozenset(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    assert {"llava", "instructblip", "qwen2_vl", "idefics3"} <= image_text_to_text_types()


def test_validate_accepts_real_devices():
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"):
        assert LoadOptions(device=device).validate().device == device


# -- model-load errors -------------------------------------------------------------------------------------


def test_config_that_is_not_a_json_object_is_one_line(models, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(models / "llava", folder)
    (folder / "config.json").write_text("[1, 2, 3]")
    line = error_line(cli("rollout", "--run", tmp_path / "run", "--model", folder, "--prompts",
                          models / "images" / "prompts.jsonl"))
    assert f"{folder / 'config.json'}: expected a JSON object, found list" in line
    assert not (tmp_path / "run").exists()


def test_truncated_weights_are_one_line_with_the_whole_cause_chained(models, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(models / "llava", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(HalluError) as e:
        load_model(folder, device="cpu")
    cause = e.value.__cause__
    assert cause is not None, "the cause is chained, so --debug shows the real traceback"
    first = str(cause).strip().splitlines()[0].strip()
    msg = str(e.value)
    assert msg.startswith(f"--model {folder}: cannot load its weights") and f"({first})" in msg
    r = cli("rollout", "--run", tmp_path / "run", "--model", folder, "--prompts",
            models / "images" / "prompts.jsonl", "--device", "cpu")
    assert "cannot load its weights" in error_line(r)


def test_first_line_of_a_long_cause_is_kept_whole():
    from hallu.hub import first_line

    long = "word " * 80 + "end"
    assert first_line(ValueError(long + "\nsecond line")) == long.strip()
    assert first_line(KeyError()) == "KeyError"


def test_weights_load_in_the_asked_dtype_on_the_asked_device(models):
    lm = load_model(models / "llava", device="cpu", dtype="bfloat16")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in lm.model.parameters()} == {"cpu"}


def test_unavailable_cuda_device_is_one_line(models, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = error_line(cli("rollout", "--run", tmp_path / "run", "--model", models / "llava", "--prompts",
                          models / "images" / "prompts.jsonl", "--device", "cuda:1"))
    assert "--device cuda:1: CUDA is not available on this machine" in line
