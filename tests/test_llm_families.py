"""LLM families (llm_families/): each family's tokenizer, voken rows, BOS, prompt style and clean text,
on its tiny preset built by the preset machinery (`python weights.py preset tiny_llama3 / tiny_qwen2`)."""
from __future__ import annotations

import pytest
import torch

from constants import ALL_VOKENS_TEXT, IMAGE_PLACEHOLDER, IMAGE_SLOT, VOKENS
from llm_families import FAMILY_NAMES, UnknownFamilyError, get_family
from samples import Dialogue, Message, Segment
from conftest import HANG_GUARD_S

FAMILY_PRESETS = {"llama3": "tiny_llama3", "qwen2": "tiny_qwen2"}


@pytest.fixture(scope="session")
def family_config_paths(tmp_path_factory, tiny_config_path):
    """Config paths of the tiny preset of every family (vicuna: the release's tiny preset)."""
    from presets import build_preset

    paths = {"vicuna": tiny_config_path}
    for family, preset in FAMILY_PRESETS.items():
        paths[family] = build_preset(preset, tmp_path_factory.mktemp(preset) / "weights", seed=0)
    return paths


@pytest.fixture(scope="session")
def family_configs(family_config_paths):
    from configuration import load_config

    return {family: load_config(path) for family, path in family_config_paths.items()}


@pytest.fixture(scope="session")
def family_models(family_configs):
    """A stage-1 model per family, built once (read-only use)."""
    from model import MiniGPT5_Model

    torch.manual_seed(0)
    return {family: MiniGPT5_Model(cfg, stage=1) for family, cfg in family_configs.items()}


def story() -> Dialogue:
    return Dialogue(system="Tell a story.", messages=(
        Message("user", (Segment(text="the dog runs"), Segment(image="a.jpg"), Segment(text="what next?"))),
        Message("assistant", (Segment(text="it jumps"), Segment(image="b.jpg")))))


def test_get_family_names_the_known_ones():
    assert FAMILY_NAMES == ("vicuna", "llama3", "qwen2")
    assert [get_family(n).name for n in FAMILY_NAMES] == list(FAMILY_NAMES)
    with pytest.raises(UnknownFamilyError, match="llm_family.*vicuna, llama3, qwen2"):
        get_family("llama2")


def test_the_config_key_defaults_to_vicuna_and_is_checked(tiny_config, tmp_path):
    from configuration import ConfigError, load_config

    assert tiny_config.llm_family == "vicuna"
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(tiny_config.source).read() + "llm_family: mistral\n")
    with pytest.raises(ConfigError, match="`llm_family` must be one of vicuna, llama3, qwen2, got 'mistral'"):
        load_config(bad, check_paths=False)
    ignored = tmp_path / "end.yaml"
    ignored.write_text(open(tiny_config.source).read() + "llm_family: qwen2\n")
    assert load_config(ignored, check_paths=False).llm_family == "qwen2"          # end_sym "###": the default
    ignored.write_text("".join(line for line in open(tiny_config.source) if not line.startswith("end_sym"))
                       + "end_sym: </s>\nllm_family: qwen2\n")
    with pytest.raises(ConfigError, match="`end_sym` is the vicuna prompt style's; llm_family qwen2"):
        load_config(ignored, check_paths=False)


def test_vicuna_renders_the_release_strings():
    """The release's dialogue layout (MMDialog's reader writes the same strings)."""
    source, target = get_family("vicuna").render(story())
    assert source == f"Tell a story. ###Human: the dog runs {IMAGE_SLOT} what next? ###Assistant:"
    assert target == f"it jumps {ALL_VOKENS_TEXT} ###"
    no_picture = Dialogue(None, (Message("user", (Segment(text="hi"),)), Message("assistant", (Segment(text="hello"),))))
    assert get_family("vicuna").render(no_picture) == ("###Human: hi ###Assistant:", "hello ###")


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_render_is_the_tokenizers_chat_template(family, family_models):
    """The family's prompt style writes what its tokenizer's own chat template writes (without BOS)."""
    tok = family_models[family].model.llama_tokenizer
    fam = get_family(family)
    source, target = fam.render(story())
    messages = [{"role": "system", "content": "Tell a story."},
                {"role": "user", "content": f"the dog runs {IMAGE_SLOT} what next?"}]
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = expected.removeprefix(tok.bos_token or "")
    assert source == expected
    assert target == f"it jumps {ALL_VOKENS_TEXT}{fam.end_of_turn}"
    # The whole answer turn as the template writes it, too.
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": f"it jumps {ALL_VOKENS_TEXT}"}],
                                   tokenize=False).removeprefix(tok.bos_token or "")
    assert full.startswith(source + target)


def test_qwen2_default_system_prompt():
    source, _ = get_family("qwen2").render(Dialogue(None, (Message("user", (Segment(text="hi"),)),
                                                           Message("assistant", (Segment(text="yo"),)))))
    assert source.startswith("<|im_start|>system\nYou are Qwen") and source.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("family", ["vicuna", "llama3", "qwen2"])
def test_tokenizer_round_trip_and_voken_rows(family, family_models):
    """The 9 new tokens get the ids right after the tokenizer's own ones, those ids are the new rows
    of the embedding and the lm_head (tied or not, padded vocabulary or not), and a text with vokens
    and image slots comes back from its ids (byte-level BPE: exactly)."""
    m = family_models[family].model
    tok = m.llama_tokenizer
    ids = tok.convert_tokens_to_ids(VOKENS + [IMAGE_PLACEHOLDER])
    first = m.num_old_tokens
    assert ids == list(range(first, first + 9)) and m.voken_ids == ids[:8] and m.image_token_id == ids[8]
    assert len(tok) == first + 9 == m.llama_model.config.vocab_size
    assert set(VOKENS) <= set(tok.all_special_tokens)
    if family == "qwen2":                     # the tokenizer's own extra special tokens stay special
        assert "<|im_start|>" in tok.all_special_tokens
    embed, head = m.llm_parts()[0].embed_tokens, m.llm_parts()[1]
    assert embed.weight.shape[0] == head.weight.shape[0] == first + 9
    text = f"a dog {IMAGE_SLOT} runs {ALL_VOKENS_TEXT}{m.end_sym}"
    encoded = tok(text, add_special_tokens=False).input_ids
    assert encoded.count(m.image_token_id) == 1 and [i for i in encoded if i in m.voken_ids] == m.voken_ids
    assert tok.convert_tokens_to_ids(m.end_sym) in encoded or family == "vicuna"
    if family != "vicuna":     # sentencepiece's added tokens eat the spaces around them (the release's way)
        assert tok.decode(encoded) == text
    # The new rows are where the ids point: the logits of the ids' rows come from the new weights.
    hidden = torch.randn(1, 1, embed.weight.shape[1])
    logits = head(hidden)
    assert logits.shape[-1] == first + 9
    torch.testing.assert_close(logits[0, 0, first:], hidden[0, 0] @ head.new_weight.T)


def test_qwen2_rows_are_tied_and_its_padding_rows_dropped(family_models, family_configs):
    from transformers import AutoConfig

    m = family_models["qwen2"].model
    padded_rows = AutoConfig.from_pretrained(family_configs["qwen2"].llama_model).vocab_size
    assert padded_rows > m.num_old_tokens                       # the preset's vocabulary is padded
    embed, head = m.llm_parts()[0].embed_tokens, m.llm_parts()[1]
    assert m.tied_rows and head.new_weight is embed.new_weight and head.frozen_weight is embed.frozen_weight
    assert not family_models["llama3"].model.tied_rows and not family_models["vicuna"].model.tied_rows


def test_bos_per_family(family_models):
    """Vicuna and Llama 3 start every sequence with their BOS; Qwen2.5 with nothing."""
    bos = {f: m.model.bos_token_id for f, m in family_models.items()}
    tok = {f: m.model.llama_tokenizer for f, m in family_models.items()}
    assert bos["vicuna"] == tok["vicuna"].convert_tokens_to_ids("<s>") == 1
    assert bos["llama3"] == tok["llama3"].convert_tokens_to_ids("<|begin_of_text|>")
    assert bos["qwen2"] is None
    for family, model in family_models.items():
        m = model.model
        ids = torch.tensor([tok[family]("a dog", add_special_tokens=False).input_ids])
        embeds, mask, _ = m.wrap_inputs(ids, torch.ones_like(ids), None, None)
        lead = 0 if bos[family] is None else 1
        assert embeds.shape[1] == ids.shape[1] + lead
        expected = m.embed_tokens(ids[0] if lead == 0 else torch.cat([torch.tensor([bos[family]]), ids[0]]))
        torch.testing.assert_close(embeds[0], expected)


@pytest.mark.parametrize("family, text, clean", [
    ("vicuna", f"Hello there! {ALL_VOKENS_TEXT} ###", "Hello there!"),
    ("vicuna", "fine thanks ###</s>", "fine thanks"),
    ("llama3", f"Hello there! {ALL_VOKENS_TEXT}<|eot_id|>", "Hello there!"),
    ("llama3", "fine thanks<|eot_id|><|end_of_text|>", "fine thanks"),
    ("qwen2", "fine thanks<|im_end|>", "fine thanks"),
    ("qwen2", "### is kept<|im_end|>", "### is kept"),
    ("qwen2", "! ?<|im_end|>", ""),
])
def test_clean_text(family, text, clean):
    import metric

    assert metric.clean_text(text, family) == clean


def test_a_tokenizer_of_another_family_stops_before_the_llm_loads(family_configs, monkeypatch):
    """llm_family: llama3 over the vicuna preset's LLaMA folder (same model_type): the tokenizer check
    stops it, naming the keys, before transformers reads any weight."""
    from transformers import AutoModelForCausalLM

    from minigpt4 import MiniGPT4

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the LLM's weights were read"))
    cfg = family_configs["vicuna"].replace(llm_family="llama3")
    with pytest.raises(ValueError, match=r"no <\|begin_of_text\|>.*not a 'llama3' tokenizer.*`llm_family`"):
        MiniGPT4.from_config(cfg)
    cfg = family_configs["qwen2"].replace(llm_family="vicuna")
    with pytest.raises(ValueError, match="`llm_family` is 'vicuna'.*'qwen2' model"):
        MiniGPT4.from_config(cfg)


# ----------------------------------------------------------------------------------------------
# The real commands on each family's tiny preset: train_eval.main (stage 1, resume, stage 2,
# prediction) and metric.main, as tests/test_train_eval.py runs them for the release pairing
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def family_runs(request, tmp_path_factory, family_config_paths):
    """For one family: stage 1 on CC3M for 2 steps straight, and for 1 step then `--resume last` to 2;
    stage 2 on VIST for 1 step from it; prediction with both checkpoints; metric.py over the
    predictions. Returns (family, folder, logs)."""
    from test_train_eval import common, make_tiny_release_data, run_main

    family = request.param
    config = family_config_paths[family]
    root = tmp_path_factory.mktemp(f"runs_{family}")
    make_tiny_release_data(root)                      # CC3M 2 rows, VIST 1 story of 2 steps
    weights, data = root / "weights", root / "datasets"
    env = lambda stage, folder: {"IS_STAGE2": str(stage == 2), "DATAFOLDER": data / folder, "WEIGHTFOLDER": weights,
                                 "OUTPUT_FOLDER": root / "out"}
    stage1 = ["--is_training", "--train_data_path", "cc3m_val.tsv", *common(config)]
    logs = {"straight": run_main(stage1 + ["--model_save_name", "straight", "--max_steps", "2"], env(1, "CC3M"))}
    run_main(stage1 + ["--model_save_name", "s1", "--max_steps", "1"], env(1, "CC3M"))
    logs["resumed"] = run_main(stage1 + ["--model_save_name", "s1", "--max_steps", "2", "--resume", "last"],
                               env(1, "CC3M"))
    logs["stage2"] = run_main(["--is_training", "--train_data_path", "val_cleaned.json", "--stage1_weight",
                               "s1-last.ckpt", "--model_save_name", "s2", "--max_steps", "1", *common(config),
                               "--learning_rate", "1e-2", "--warmup_steps", "0"], env(2, "VIST"))
    logs["predict"] = run_main(["--test_data_path", "val_cleaned.json", "--test_weight", "s2-last.ckpt",
                                "--stage1_weight", "s1-last.ckpt", *common(config)], env(2, "VIST"))
    import metric

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OUTPUT_FOLDER", str(root / "out"))
        mp.setenv("DATAFOLDER", str(data / "VIST"))
        logs["metric"] = metric.main(["--test_weight", "s2-last.ckpt", "--tiny_extractors", "--device", "cpu"])
    return family, root, logs


def test_stage1_trains_and_resumes_exactly(family_runs):
    """Two steps straight and one step + `--resume last`: the same losses and the same trained tensors;
    the checkpoint records its LLM family."""
    import csv

    from test_train_eval import assert_same_state, state_of

    family, root, _ = family_runs
    weights = root / "weights"
    straight, resumed = state_of(weights / "straight-last.ckpt"), state_of(weights / "s1-last.ckpt")
    assert_same_state(resumed, straight, f"{family} stage 1 resumed")
    # The runs' losses, one logger version each: straight (steps 0, 1) = first part (0) + resumed part (1).
    runs = [{int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(open(path)) if r.get("train_loss")}
            for path in sorted(weights.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))]
    assert sorted(runs[0]) == [0, 1] and runs[0] == {**runs[1], **runs[2]} and sorted(runs[2]) == [1]
    assert {k for k in straight if "embed_tokens" in k} == {"model.llama_model.model.embed_tokens.weight"}
    checkpoint = torch.load(weights / "s1-last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2 and checkpoint["llm_family"] == family
    assert all(torch.isfinite(torch.tensor(v)) for v in runs[0].values())


def test_stage2_starts_from_stage1_and_trains_the_rows(family_runs, family_models):
    """Stage 2 reads stage 1's voken rows (tied rows: one tensor trained in place, no PEFT copies) and
    trains them and LoRA."""
    from test_train_eval import state_of

    family, root, _ = family_runs
    s1, s2 = state_of(root / "weights" / "s1-last.ckpt"), state_of(root / "weights" / "s2-last.ckpt")
    tied = family_models[family].model.tied_rows
    rows = [k for k in s2 if "embed_tokens" in k or "lm_head" in k]
    if tied:
        assert rows == ["model.llama_model.base_model.model.model.embed_tokens.weight"]
    else:
        assert sorted(rows) == sorted(f"model.llama_model.base_model.model.{n}.modules_to_save.default.weight"
                                      for n in ("model.embed_tokens", "lm_head"))
    before = s1["model.llama_model.model.embed_tokens.weight"]
    after = s2[rows[0]] if tied else s2[[r for r in rows if "embed_tokens" in r][0]]
    assert torch.equal(before[:-9], after[:-9])                  # the old rows are frozen
    assert not torch.equal(before[-9:], after[-9:])              # the new rows trained
    assert any(".lora_" in k for k in s2)


def test_prediction_generates_and_metric_reads_it_with_the_familys_rules(family_runs):
    import json

    family, root, logs = family_runs
    folder = root / "out" / "s2-last"
    manifest = json.loads((folder / "predictions.json").read_text())
    assert manifest["llm_family"] == family and manifest["items"] == 2
    records = torch.load(folder / "predictions-0.pt", weights_only=False)
    fam = get_family(family)
    assert all(isinstance(r[1], str) for r in records)
    # The prompts are the dataset's text in the family's own prompt style (the readers' dialogues rendered).
    assert all("###" not in r[0] and fam.header("user") in r[0]
               and r[0].rstrip().endswith(fam.header("assistant").rstrip()) for r in records), [r[0] for r in records]
    assert all(fam.end_of_turn not in fam.clean_text(r[1]) for r in records)
    assert isinstance(logs["metric"], dict) and logs["metric"]


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_generation_draws_a_picture(family, family_models):
    """One generation with a rendered prompt: the vokens are forced, a picture comes out, and the clean
    text holds neither vokens nor the end of turn."""
    model = family_models[family]
    source, _ = get_family(family).render(Dialogue(None, (Message("user", (Segment(text="draw a dog"),)),
                                                          Message("assistant", (Segment(text="ok"),)))))
    out = model.generate(source, force_generation=True, seed=1, max_new_tokens=12, num_inference_steps=2)[0]
    assert out.image is not None and "[IMG" not in out.clean_text
    assert get_family(family).end_of_turn not in out.clean_text
    ids = out.token_ids
    assert ids[ids.index(model.model.voken_ids[0]):][:8] == model.model.voken_ids
    # fast_inference's static-cache decode loop gives the same tokens.
    static = model.generate(source, force_generation=True, seed=1, max_new_tokens=12, num_inference_steps=2,
                            decode="static")[0]
    assert static.token_ids == ids


def test_a_checkpoint_of_another_family_stops_before_the_model_is_built(family_runs, family_config_paths, no_model,
                                                                        tmp_path):
    """A llama3 / qwen2 checkpoint given to a run of another family: an error naming `llm_family`,
    before any model is built (train_eval's checks, and from_weights)."""
    from test_train_eval import run_main

    import checkpoints
    from model import MiniGPT5_Model

    family, root, _ = family_runs
    other = "qwen2" if family == "llama3" else "llama3"
    env = {"DATAFOLDER": root / "datasets" / "CC3M", "WEIGHTFOLDER": root / "weights", "OUTPUT_FOLDER": tmp_path}
    with pytest.raises(SystemExit, match=rf"trained with llm_family '{family}'.*`llm_family: {other}`"):
        run_main(["--is_training", "--train_data_path", "cc3m_val.tsv", "--stage1_weight", "s1-last.ckpt",
                  "--model_save_name", "x", "--model_config", str(family_config_paths[other])], env)
    with pytest.raises(checkpoints.CheckpointMismatchError, match="llm_family"):
        MiniGPT5_Model.from_weights(family_config_paths["vicuna"], root / "weights" / "s1-last.ckpt", device="cpu")


def test_an_llm_width_the_checkpoint_or_projection_was_not_made_for_stops_early(family_configs, tmp_path,
                                                                              monkeypatch):
    """A stage-1 checkpoint whose `fc` takes another LLM width, and a MiniGPT-4 projection (`ckpt`) for
    another width: errors naming the keys, before the LLM's weights are read."""
    from transformers import AutoModelForCausalLM

    import checkpoints
    from minigpt4 import MiniGPT4
    from presets import write_tiny_minigpt4

    cfg = family_configs["llama3"]
    wide = tmp_path / "wide.ckpt"
    torch.save({"llm_family": "llama3", "state_dict": {"fc.0.weight": torch.zeros(32, 4096)}}, wide)
    with pytest.raises(checkpoints.CheckpointMismatchError, match=r"`fc.0.weight` holds 4096-wide.*`llama_model`.* is 64 wide"):
        checkpoints.check_pairing(cfg, wide, "--stage1_weight")
    rows = "model.llama_model.base_model.model.model.embed_tokens.modules_to_save.default.weight"
    torch.save({"llm_family": "llama3", "state_dict": {rows: torch.zeros(521, 3584)}}, wide)     # a stage-2 file
    with pytest.raises(checkpoints.CheckpointMismatchError, match=r"embed_tokens.*3584-wide"):
        checkpoints.check_pairing(cfg, wide, "--test_weight")
    checkpoints.check_pairing(cfg, _fit(tmp_path, cfg), "--stage1_weight")      # the right one passes
    write_tiny_minigpt4(tmp_path / "proj.pth", cfg.qformer.hidden_size, 3584, seed=0)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the LLM's weights were read"))
    with pytest.raises(ValueError, match=r"llama_proj.weight has shape \(3584, 32\), expected \(64, 32\).*`ckpt`"):
        MiniGPT4.from_config(cfg.replace(ckpt=str(tmp_path / "proj.pth")))


def _fit(tmp_path, cfg):
    """A checkpoint of `cfg`'s family and width (passes the pairing check)."""
    path = tmp_path / "fit.ckpt"
    torch.save({"llm_family": cfg.llm_family, "state_dict": {"fc.0.weight": torch.zeros(32, 64)}}, path)
    return path


def test_full_size_llms_on_the_meta_device_and_their_memory_arithmetic():
    """Llama-3.1-8B and Qwen2.5-7B at their real sizes (config/llama3_8b.yaml, config/qwen2.5_7b.yaml over
    config/arch/), built on the meta device: the voken rows, the grouped-query KV width, and a row
    per family in benchmarks/gpu_memory.py --arithmetic."""
    import sys

    from configuration import REPO
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_memory

    llama, qwen = gpu_memory.part_bytes(None, "Llama-3.1-8B"), gpu_memory.part_bytes(None, "Qwen2.5-7B")
    assert llama["lm_head (fp32 voken rows)"] == (128256 + 9) * 4096 * 4 and llama["_kv_width"] == 8 * 128
    assert qwen["lm_head (fp32 voken rows)"] == (152064 + 9) * 3584 * 4 and qwen["_kv_width"] == 4 * 128
    assert gpu_memory.part_bytes(None)["_kv_width"] == 4096                   # Vicuna: no GQA
    text = gpu_memory.arithmetic(180, 64)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert {"Vicuna-7B v0", "Llama-3.1-8B", "Qwen2.5-7B"} <= set(rows)
    assert "18.16 / **" in rows["Llama-3.1-8B"]              # 13.96 GB bf16 linear layers + 2 x fp32 voken rows


def test_each_familys_tiny_llm_architecture_for_other_pairings():
    """presets.tiny_llm_arch: the `llama` section a pairing preset (another decoder) writes the LLM from."""
    from presets import tiny_llm_arch

    archs = {family: tiny_llm_arch(family) for family in FAMILY_NAMES}
    assert archs["llama3"]["num_key_value_heads"] < archs["llama3"]["num_attention_heads"]
    assert archs["qwen2"]["tie_word_embeddings"] and archs["qwen2"]["pad_vocab_to"]
    assert archs["vicuna"]["num_key_value_heads"] == archs["vicuna"]["num_attention_heads"]
    with pytest.raises(UnknownFamilyError):
        tiny_llm_arch("gpt2")


def test_conversations_are_written_in_the_familys_prompt_style():
    """The web demo's and stories' conversations (conversation.py): the release's format for vicuna (with
    or without the family), the family's chat turns otherwise, the image slots in their places."""
    from PIL import Image

    from conversation import Conversation

    picture = Image.new("RGB", (8, 8))
    chat = Conversation(system="Be brief.").add("Human", "look", [picture]).add("Assistant", "a square", [])
    chat.add("Human", "and now?")
    release, images = chat.prompt()
    assert chat.prompt(get_family("vicuna"))[0] == release and len(images) == 1
    assert release == f"Be brief.###Human: look {IMAGE_SLOT} ###Assistant: a square ###Human: and now? ###Assistant:"
    source, _ = chat.prompt(get_family("qwen2"))
    assert source == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                      f"<|im_start|>user\nlook {IMAGE_SLOT}<|im_end|>\n<|im_start|>assistant\na square<|im_end|>\n"
                      "<|im_start|>user\nand now?<|im_end|>\n<|im_start|>assistant\n")


def test_the_playground_runs_on_a_family_preset(family_config_paths, tmp_path):
    """examples/playground.py with a llama3 preset's config: the story prompt in Llama 3's turns, a
    picture per sample (vokens forced)."""
    import os
    import subprocess
    import sys

    from configuration import REPO

    result = subprocess.run([sys.executable, "examples/playground.py", "--model_config",
                             str(family_config_paths["llama3"]), "--num_samples", "1", "--num_inference_steps", "2",
                             "--max_new_tokens", "10", "--force_generation", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[picture 0]" in result.stdout and (tmp_path / "sample_0.png").is_file()
    page = (tmp_path / "playground.html").read_text()
    assert "sample 0" in page
    sys.path.insert(0, str(REPO / "examples"))
    from playground import story_prompt

    prompt = story_prompt(["a dog runs", "it jumps"], "llama3")
    assert prompt.startswith("<|start_header_id|>system<|end_header_id|>\n\n") and prompt.count(IMAGE_SLOT) == 2
    assert prompt.endswith("Tell me the next scene with image.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_the_web_demo_answers_in_the_familys_style(family_models, tmp_path):
    """examples/web_demo.py's handlers with the qwen2 preset's model: the prompt it generates from is in
    ChatML turns, the answer comes back with a picture (vokens forced) and no end-of-turn marker."""
    import sys

    from configuration import REPO
    sys.path.insert(0, str(REPO / "examples"))
    import web_demo
    from test_web_demo import GenerateSpy, _handler

    model = family_models["qwen2"].eval()
    spy = GenerateSpy(model.generate)
    model.generate = spy
    try:
        demo = web_demo.build_demo(model, files_root=tmp_path)
        session, _, _ = _handler(demo, "accept")({"text": "draw a dog", "files": []}, None)
        session, messages, *_ = _handler(demo, "answer")(session, 7.5, 2, 1, True, 12, "pndm", 50)
    finally:
        del model.generate
    prompt = spy.calls[0]["prompts"][0]
    assert prompt.endswith("<|im_start|>user\ndraw a dog<|im_end|>\n<|im_start|>assistant\n") and "###" not in prompt
    answer = session.conversation.turns[-1]
    assert answer.role == "Assistant" and answer.images and "<|im_end|>" not in answer.text


def test_the_pairing_table_has_every_llm_with_every_decoder():
    """benchmarks/decoder_memory.py: weights of each LLM family with each decoder family; a larger LLM
    side never needs less."""
    import sys

    import decoders
    from configuration import REPO
    sys.path.insert(0, str(REPO / "benchmarks"))
    import decoder_memory
    import gpu_memory

    text = decoder_memory.table({"bf16": (None, False)})
    for llm in gpu_memory.FULL_LLMS:
        assert all(f"| {llm} | `{family}` |" in text for family in decoders.FAMILIES), llm
    assert decoder_memory.pairing_weights("sd3", None, False, "Llama-3.1-8B") > decoder_memory.pairing_weights(
        "sd3", None, False, "Vicuna-7B v0")
