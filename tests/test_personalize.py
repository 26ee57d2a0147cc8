"""Int8 inference, ZO / backprop textual inversion, diffusers loading, exact resume and bad input, on tiny_sd()."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffguide.tasks.personalize import (PersonalizeConfig, TextualInversion, add_placeholder_token, expected_image_format,
                               load_image_folder, load_learned_embedding, save_learned_embedding)
from diffguide.tasks.quantize import is_quantized, quantize_pipeline, weight_report
from tiny_pipes import tiny_sd

pytest.importorskip("optimum.quanto")

UNET_REL_TOL = 0.03      # int8 per-channel weights: relative L2 error of the UNet's eps prediction
IMAGE_ABS_TOL = 0.03     # max |difference| of decoded pipeline images in [0, 1]


TEMPLATES = ("a {}", "the {} a", "{}")         # the tiny tokenizer reads characters: keep prompts short


def config(**kwargs):
    return PersonalizeConfig(**{"templates": TEMPLATES, **kwargs})


def images(n=3, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def generate(pipe, prompt, seed=0):
    return pipe(prompt, num_inference_steps=4, generator=torch.Generator().manual_seed(seed), output_type="pt",
                height=16, width=16, guidance_scale=1.0).images


def test_quantized_inference_matches_float_and_stays_int8():
    from optimum.quanto.nn import QModuleMixin

    ref, pipe = tiny_sd(), tiny_sd()
    float_bytes = {n: weight_report(getattr(ref, n)).bytes for n in ("unet", "vae", "text_encoder")}
    quantize_pipeline(pipe)
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        plain = [n for n, m in module.named_modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not isinstance(m, QModuleMixin)]
        assert not plain, plain
        report = weight_report(module)
        linear_weights = sum(m.weight.numel() for m in getattr(ref, name).modules()
                             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
        assert report.int8_params == linear_weights                  # every Linear/Conv2d weight, nothing else
        assert report.bytes < float_bytes[name] - 2.5 * linear_weights   # 1 byte instead of 4, plus scales
    assert type(pipe.text_encoder.get_input_embeddings()) is torch.nn.Embedding       # TI row stays writable
    gen = torch.Generator().manual_seed(0)
    latents, t = torch.randn(4, 4, 8, 8, generator=gen), torch.tensor([10, 300, 600, 900])
    ids = ref.tokenizer(["a cat"] * 4, padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        states = ref.text_encoder(ids)[0]
        eps_float, eps_int8 = ref.unet(latents, t, states).sample, pipe.unet(latents, t, states).sample
    assert (eps_int8 - eps_float).norm() / eps_float.norm() < UNET_REL_TOL
    assert not torch.equal(eps_int8, eps_float)
    difference = (generate(pipe, "a cat") - generate(ref, "a cat")).abs().max()
    assert 0 < difference < IMAGE_ABS_TOL
    # inference did not leave float weights behind
    assert all(v.dtype == torch.int8 for k, v in pipe.unet.state_dict().items() if k.endswith("weight._data"))
    assert any(k.endswith("weight._data") for k in pipe.unet.state_dict())
    with pytest.raises(ValueError, match="already quantized"):
        quantize_pipeline(pipe)
    with pytest.raises(ValueError, match="components"):
        quantize_pipeline(tiny_sd(), components=("scheduler",))


def test_zo_estimate_on_the_pipeline_agrees_with_autograd():
    """The ZO loss writes the row and reuses one batch: its RGE aligns with the backprop gradient."""
    from diffguide.guidance.zo_personalize import random_gradient_estimate

    trainer = TextualInversion(tiny_sd(), images(), "<s1>", "a", config(method="zo", quantize=False))
    batch = trainer.sample_batch()
    weight = trainer.embedding_weight
    weight.requires_grad_(True)
    exact = torch.autograd.grad(trainer._loss(batch), weight)[0][trainer.token_id]
    weight.requires_grad_(False)

    def loss_at(vector):
        with torch.no_grad():
            weight[trainer.token_id] = vector
            return trainer._loss(batch)

    estimate = random_gradient_estimate(loss_at, trainer.theta, 256, 1e-3, torch.Generator().manual_seed(0), "paper")
    cosine = torch.nn.functional.cosine_similarity(estimate.grad, exact, dim=0)
    assert cosine > 0.7, float(cosine)       # E[cos] ~ sqrt(n / (n + d)) = 0.97 for n = 256, d = 16


def test_batched_directions_give_the_sequential_estimate():
    from diffguide.guidance.zo_personalize import random_gradient_estimate

    trainer = TextualInversion(tiny_sd(), images(), "<s1>", "a",
                               config(method="zo", quantize=False, batch_size=2))
    batch = trainer.sample_batch()
    weight = trainer.embedding_weight

    def loss_at(vector):
        weight[trainer.token_id] = vector
        return trainer._loss(batch)

    with torch.no_grad():
        before = weight.clone()
        batched = random_gradient_estimate(lambda points: trainer._batched_losses(batch, points), trainer.theta, 3,
                                           1e-2, torch.Generator().manual_seed(5), "paper", batched=True)
        assert torch.equal(weight, before)                         # the hook leaves the matrix alone
        sequential = random_gradient_estimate(loss_at, trainer.theta, 3, 1e-2, torch.Generator().manual_seed(5), "paper")
    assert torch.equal(batched.directions, sequential.directions)
    torch.testing.assert_close(batched.perturbed_losses, sequential.perturbed_losses, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(batched.grad, sequential.grad, rtol=1e-2, atol=1e-3 * sequential.grad.abs().max().item())


@pytest.mark.parametrize("method", ["zo", "backprop"])
def test_resume_continues_exactly(method, tmp_path):
    cfg = config(method=method, steps=6, tau=4, save_every=3, learning_rate=1e-2)
    straight = TextualInversion(tiny_sd(), images(), "<s1>", "a", cfg)
    straight.train(tmp_path / "straight", progress=False)

    first = TextualInversion(tiny_sd(), images(), "<s1>", "a", PersonalizeConfig(**{**cfg.__dict__, "steps": 3}))
    first.train(tmp_path / "resumed", progress=False)
    meta = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert meta["step"] == 3
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        TextualInversion(tiny_sd(), images(), "<s1>", "a", cfg).train(tmp_path / "resumed", progress=False)
    with pytest.raises(ValueError, match="learning_rate"):
        TextualInversion(tiny_sd(), images(), "<s1>", "a",
                         PersonalizeConfig(**{**cfg.__dict__, "learning_rate": 1.0})).train(
            tmp_path / "resumed", resume=True, progress=False)
    with pytest.raises(ValueError, match="images_sha256"):                # same count, other images
        TextualInversion(tiny_sd(), images(seed=1), "<s1>", "a", cfg).train(tmp_path / "resumed", resume=True,
                                                                             progress=False)
    with pytest.raises(ValueError, match="model_fingerprint"):            # same architecture, other weights
        TextualInversion(tiny_sd(seed=1), images(), "<s1>", "a", cfg).train(tmp_path / "resumed", resume=True,
                                                                             progress=False)
    second = TextualInversion(tiny_sd(), images(), "<s1>", "a", cfg)
    path = second.train(tmp_path / "resumed", resume=True, progress=False)
    assert second.step_count == 6
    assert torch.equal(second.embedding, straight.embedding)
    assert not torch.equal(straight.embedding, first.embedding)
    if method == "zo":
        assert straight.subspace.basis is not None and torch.equal(second.subspace.basis, straight.subspace.basis)
        assert torch.equal(second.optimizer.state[second.theta]["exp_avg"],
                           straight.optimizer.state[straight.theta]["exp_avg"])
    token, vector = load_learned_embedding(path)
    assert token == "<s1>" and torch.equal(vector, straight.embedding)


def resumable(method, **kwargs):
    """A run whose subspace basis is not empty after each refresh (text width 64, nu 0.3), refreshed every 3
    steps: the basis's product rounds differently if it is read back in another memory layout."""
    cfg = config(method=method, tau=3, nu=0.3, learning_rate=1e-2, save_every=100, **kwargs)
    return lambda steps: TextualInversion(tiny_sd(text_dim=64), images(), "<s1>", "a",
                                          PersonalizeConfig(**{**cfg.__dict__, "steps": steps}))


@pytest.mark.parametrize("method", ["zo", "backprop"])
def test_resume_after_subspace_refreshes_is_bit_identical(method, tmp_path):
    """Stopped at step 4 (after the refresh at 3) and at step 7 (after those at 3 and 6), resumed each time:
    the embedding equals an uninterrupted run's bit for bit at every stop."""
    make = resumable(method)
    straight, path = make(10), {}
    straight.train(tmp_path / "straight", progress=False,
                   callback=lambda step, loss: path.update({step: straight.embedding}))
    if method == "zo":
        assert straight.subspace.num_pushed == 10 and straight.subspace.basis.shape[0] >= 1
    for stop in (4, 7, 10):
        run = make(stop)
        run.train(tmp_path / "resumed", resume=True, progress=False)
        assert run.step_count == stop
        assert torch.equal(run.embedding, path[stop]), (stop, (run.embedding - path[stop]).abs().max())
    if method == "zo":
        assert torch.equal(run.subspace.basis, straight.subspace.basis)
        assert torch.equal(run.optimizer.state[run.theta]["exp_avg_sq"],
                           straight.optimizer.state[straight.theta]["exp_avg_sq"])


def test_damaged_or_mismatched_checkpoints_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    make, run = resumable("zo"), tmp_path / "run"
    make(4).train(run, progress=False)
    folder = run / "checkpoint"
    good, meta = load_file(str(folder / "state.safetensors")), json.loads((folder / "state.json").read_text())
    broken_states = [({k: v for k, v in good.items() if k != "subspace.basis"}, r"basis None after 4 pushes"),
                     ({**good, "subspace.history": good["subspace.history"][:2]}, r"history \(2, 64\) after 4"),
                     ({**good, "subspace.num_pushed": torch.tensor(5)}, "subspace history holds 5 steps"),
                     ({**good, "optimizer.step": torch.tensor(3.0)}, "optimizer state"),
                     ({k: v for k, v in good.items() if k != "optimizer.exp_avg"}, "optimizer state"),
                     ({**good, "embedding": torch.zeros(8)}, r"embedding has shape \(8,\)"),
                     ({**good, "generator": torch.zeros(3, dtype=torch.uint8)}, "RuntimeError")]
    for state, match in broken_states:
        save_file(state, str(folder / "state.safetensors"))
        with pytest.raises(ValueError, match=r"^damaged checkpoint .*state.safetensors.*" + match):
            make(6).train(run, resume=True, progress=False)
    save_file(good, str(folder / "state.safetensors"))
    with pytest.raises(ValueError, match="at step 4, past the 3 steps asked for"):
        make(3).train(run, resume=True, progress=False)
    (folder / "state.json").write_text(json.dumps({**meta, "format": 3}))
    with pytest.raises(ValueError, match="has format 3, newer than this diffguide reads"):
        make(6).train(run, resume=True, progress=False)
    (folder / "state.json").unlink()                                 # never silently restarted
    with pytest.raises(ValueError, match=r"damaged checkpoint .*state.json.*FileNotFoundError"):
        make(6).train(run, resume=True, progress=False)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        make(6).train(run, progress=False)


def test_checkpoint_of_the_earlier_format_resumes(tmp_path):
    """Before format 2 the ZO optimizer state was saved as ``optimizer.step_count`` (an int); it still resumes,
    with a warning that the continuation uses torch.optim.Adam."""
    from safetensors.torch import load_file, save_file

    make = resumable("zo")
    straight = make(6)
    straight.train(tmp_path / "straight", progress=False)
    make(4).train(tmp_path / "old", progress=False)
    folder = tmp_path / "old" / "checkpoint"
    state = load_file(str(folder / "state.safetensors"))
    state["optimizer.step_count"] = state.pop("optimizer.step").long()
    save_file(state, str(folder / "state.safetensors"))
    meta = json.loads((folder / "state.json").read_text())
    del meta["format"]
    (folder / "state.json").write_text(json.dumps(meta))
    resumed = make(6)
    with pytest.warns(UserWarning, match="earlier diffguide"):
        resumed.train(tmp_path / "old", resume=True, progress=False)
    assert torch.equal(resumed.embedding, straight.embedding)       # the saved moments are read as they were


def test_saved_embedding_loads_in_a_fresh_pipeline_and_changes_the_output(tmp_path):
    trainer = TextualInversion(tiny_sd(), images(), "<s1>", "a",
                               config(method="zo", steps=5, learning_rate=0.05, save_every=5))
    initial = trainer.embedding
    path = trainer.train(tmp_path / "run", progress=False)
    learned = trainer.embedding
    assert (learned - initial).abs().max() > 0.05

    fresh = tiny_sd()
    fresh.load_textual_inversion(str(path), token="<s1>")
    token_id = fresh.tokenizer.convert_tokens_to_ids("<s1>")
    assert torch.equal(fresh.text_encoder.get_input_embeddings().weight[token_id], learned)
    with_learned = generate(fresh, "a <s1>")

    baseline = tiny_sd()
    save_learned_embedding(tmp_path / "init.safetensors", "<s1>", initial)
    baseline.load_textual_inversion(str(tmp_path / "init.safetensors"), token="<s1>")
    with_initial = generate(baseline, "a <s1>")
    assert (with_learned - with_initial).abs().max() > 1e-3
    # the same learned token in the (int8) training pipeline gives the same picture up to quantization error
    assert (generate(trainer.pipe, "a <s1>") - with_learned).abs().max() < IMAGE_ABS_TOL


def save_images(folder, arrays, mode):
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(arrays):
        Image.fromarray(array, mode=mode).save(folder / f"{i:02d}.png")


def test_load_image_folder_and_bad_images(tmp_path):
    pipe = tiny_sd()
    size, mode = expected_image_format(pipe)
    assert (size, mode) == (16, "RGB")
    rng = np.random.default_rng(0)
    good = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2)]
    save_images(tmp_path / "good", good, "RGB")
    loaded = load_image_folder(tmp_path / "good", size, mode)
    assert loaded.shape == (2, 3, 16, 16)
    torch.testing.assert_close(loaded[1], torch.from_numpy(good[1]).permute(2, 0, 1).float() / 127.5 - 1)

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "empty", size, mode)
    with pytest.raises(ValueError, match="does not exist"):
        load_image_folder(tmp_path / "missing", size, mode)
    save_images(tmp_path / "big", [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)], "RGB")
    with pytest.raises(ValueError, match=r"16x16 in mode 'RGB'.*20x20 RGB"):
        load_image_folder(tmp_path / "big", size, mode)
    save_images(tmp_path / "gray", [rng.integers(0, 256, (16, 16), dtype=np.uint8)], "L")
    with pytest.raises(ValueError, match="16x16 L"):
        load_image_folder(tmp_path / "gray", size, mode)
    assert load_image_folder(tmp_path / "big", size, mode, resize=True).shape == (1, 3, 16, 16)
    assert load_image_folder(tmp_path / "gray", size, mode, resize=True).shape == (1, 3, 16, 16)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read"):
        load_image_folder(tmp_path / "broken", size, mode)
    with pytest.raises(ValueError, match="shape"):
        TextualInversion(pipe, torch.zeros(2, 1, 16, 16), "<s1>", "a", config())
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        TextualInversion(pipe, torch.full((2, 3, 16, 16), 2.0), "<s1>", "a", config())
    with pytest.raises(ValueError, match="cut off"):
        TextualInversion(pipe, images(), "<s1>", "a", config(templates=("a photo of a very long {}",)))


def test_bad_tokens_and_config():
    pipe = tiny_sd()
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary"):
        add_placeholder_token(pipe.tokenizer, pipe.text_encoder, "a", "b")
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary"):
        add_placeholder_token(pipe.tokenizer, pipe.text_encoder, "<|endoftext|>", "b")
    with pytest.raises(ValueError, match="single token"):
        add_placeholder_token(pipe.tokenizer, pipe.text_encoder, "<s1>", "cat")
    with pytest.raises(ValueError, match="without spaces"):
        add_placeholder_token(pipe.tokenizer, pipe.text_encoder, "<s 1>", "a")
    size = len(pipe.tokenizer)
    token_id = add_placeholder_token(pipe.tokenizer, pipe.text_encoder, "<s1>", "a")
    assert token_id == size and pipe.text_encoder.get_input_embeddings().weight.shape[0] == size + 1
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary"):
        add_placeholder_token(pipe.tokenizer, pipe.text_encoder, "<s1>", "a")
    for bad, match in (({"method": "adam"}, "method"), ({"steps": 0}, "steps"), ({"templates": ("no slot",)}, "templates"),
                       ({"flip_prob": 2.0}, "flip_prob"), ({"timestep_range": (900, 500)}, "low < high")):
        with pytest.raises(ValueError, match=match):
            TextualInversion(tiny_sd(), images(), "<s2>", "a", config(**bad))
    with pytest.raises(TypeError, match="PersonalizeConfig"):
        TextualInversion(tiny_sd(), images(), "<s2>", "a", {"method": "zo"})


@pytest.fixture
def cli_setup(tmp_path):
    model = tmp_path / "model"
    tiny_sd().save_pretrained(model)
    rng = np.random.default_rng(1)
    save_images(tmp_path / "imgs", [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2)], "RGB")
    common = [str(tmp_path / "imgs"), "--model", str(model), "--token", "<s1>", "--initializer-token", "a",
              "--out", str(tmp_path / "out"), "--save-every", "2", "--tau", "2", "--no-progress",
              "--template", "a {}", "--template", "{}"]
    return tmp_path, common


def test_command_line_trains_resumes_and_rejects_bad_input(cli_setup, capsys):
    from diffguide.scripts.personalize import main

    tmp_path, common = cli_setup
    old = os.umask(0o022)
    try:
        main(common + ["--steps", "2", "--resume"])
    finally:
        os.umask(old)
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "starting afresh" in err
    assert (tmp_path / "out" / "learned_embeds.safetensors").stat().st_mode & 0o777 == 0o644
    main(common + ["--steps", "4", "--resume", "--sample", "3", "--prompt", "a <s1>"])
    meta = json.loads((tmp_path / "out" / "checkpoint" / "state.json").read_text())
    assert meta["step"] == 4 and meta["config"]["method"] == "zo"
    err = capsys.readouterr().err
    assert "continuing" in err and "from step 2" in err and "4 steps" in err
    # samples.png: a title line above the 16 px images (magnified to 64 px), the prompt to their left
    grid = np.asarray(Image.open(tmp_path / "out" / "samples.png").convert("L"))
    ink = grid < 128
    first_tile_row = next(y for y in range(grid.shape[0]) if (grid[y] != 255).sum() > 3 * 60)
    assert grid.shape[1] > 3 * 64 and ink[:first_tile_row].any() and ink[first_tile_row:, :40].any()
    with pytest.raises(SystemExit, match="at step 4, past --steps 3; pass --steps 4 or more"):
        main(common + ["--steps", "3", "--resume"])
    with pytest.raises(SystemExit) as exit_info:
        main(common[:4] + ["a"] + common[5:] + ["--steps", "1", "--resume"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--token: token 'a' is already in the tokenizer's vocabulary" in err
    (tmp_path / "none").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "none")] + common[1:])
    assert exit_info.value.code == 2 and "no images" in capsys.readouterr().err


BAD_COMMAND_LINES = [   # extra arguments -> words the one error line must contain
    (["--sample", "-3"], "--sample must be >= 0"),
    (["--batch-size", "100000"], "--batch-size: batch_size 100000 is larger than the 8 distinct"),
    (["--steps", "0"], "--steps must be positive"),
    (["--lr", "nan"], "learning_rate must be a positive finite number, got nan (--lr)"),
    (["--lr", "-1"], "(--lr)"),
    (["--mu", "inf"], "mu must be a positive finite number"),
    (["--nu", "1.5"], "nu must be in (0, 1)"),
    (["--flip-prob", "2"], "flip_prob must be in [0, 1], got 2.0 (--flip-prob)"),
    (["--timesteps", "900:500"], "--timesteps must satisfy 0 <= LOW < HIGH"),
    (["--timesteps", "0:5000"], "--timesteps HIGH must be <= the model's 1000 training timesteps"),
    (["--timesteps", "a:b"], "--timesteps must be LOW:HIGH integers"),
    (["--template", "no slot"], "templates must be"),
    (["--threads", "0"], "--threads must be positive"),
    (["--device", "cuda"], "no CUDA GPU is available"),
    (["--device", "gpu0"], "is not a torch device"),
    (["--prompt", "a <s1>"], "--prompt needs --sample N > 0"),
    (["--model", "nope"], "--model: 'nope' is neither a known model"),
    (["--token", " "], "--token must be one word without spaces"),
    (["--quantized", "{tmp}/q", "--method", "backprop"],
     "--quantized is for int8 weights, and --method backprop trains on float weights: pass the float checkpoint"),
    (["--save-quantized", "{tmp}/q", "--quantize", "none"],
     "--save-quantized is for int8 weights, and --quantize none"),
    (["--quantized", "{tmp}/model"], "--quantized: no diffguide_int8.json in"),
    (["--quantized", "{tmp}/nowhere"], "nowhere' is not a folder"),
    (["--save-quantized", "{tmp}/imgs"], "imgs' exists and is not an empty folder"),
    (["--quantized", "{tmp}/model", "--save-quantized", "{tmp}/q"], "--quantized already is one"),
]


@pytest.mark.parametrize("extra, message", BAD_COMMAND_LINES, ids=[" ".join(a) for a, _ in BAD_COMMAND_LINES])
def test_command_line_usage_errors_exit_2_before_loading(extra, message, cli_setup, capsys, monkeypatch):
    from diffguide.scripts import personalize as cli
    from diffguide.tasks import personalize

    if torch.cuda.is_available() and "cuda" in extra:
        pytest.skip("a GPU is present")
    monkeypatch.setattr(personalize, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    tmp_path, common = cli_setup
    with pytest.raises(SystemExit) as exit_info:
        cli.main(common + ["--steps", "1"] + [arg.format(tmp=tmp_path) for arg in extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("diffguide-personalize: error: ")
    assert message in err.strip().splitlines()[-1], err
    assert not (tmp_path / "out").exists()


def test_command_line_saves_and_trains_from_a_saved_int8_folder(cli_setup, capsys):
    """``--save-quantized`` writes the int8 pipeline; ``--quantized`` resumes the same run from it, and the
    result equals an uninterrupted run from the float checkpoint bit for bit."""
    from diffguide.scripts.personalize import main
    from diffguide.tasks.personalize import load_learned_embedding

    tmp_path, common = cli_setup
    model = common[2]
    from_saved = common[:1] + common[3:]                                      # without --model
    main(common + ["--steps", "2", "--save-quantized", str(tmp_path / "q")])
    assert "wrote the int8 pipeline" in capsys.readouterr().err
    main(from_saved + ["--steps", "4", "--resume", "--quantized", str(tmp_path / "q"), "--model", model])
    assert "from step 2" in capsys.readouterr().err
    straight = [a if a != str(tmp_path / "out") else str(tmp_path / "straight") for a in common]
    main(straight + ["--steps", "4"])
    assert torch.equal(load_learned_embedding(tmp_path / "out" / "learned_embeds.safetensors")[1],
                       load_learned_embedding(tmp_path / "straight" / "learned_embeds.safetensors")[1])
    tiny_sd(seed=1).save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit, match=r"^error: .*diffguide_int8.json.* made from another model$"):
        main(from_saved[:6] + [str(tmp_path / "o2")] + from_saved[7:]                 # a runtime failure: exit 1
             + ["--steps", "1", "--quantized", str(tmp_path / "q"), "--model", str(tmp_path / "other")])


@pytest.mark.parametrize("token, initializer, message", [
    ("a", "a", "--token: token 'a' is already in the tokenizer's vocabulary"),
    ("<|endoftext|>", "a", "--token: token '<|endoftext|>' is already in the tokenizer's vocabulary"),
    ("<s1>", "cat", "--initializer-token: initializer_token 'cat' must be a single token of the vocabulary, "
                    "it encodes to 3 tokens"),
])
def test_command_line_token_problems_exit_2_without_reading_weights(token, initializer, message, cli_setup, capsys):
    """Checked on the tokenizer's files alone: every weight file of the model folder is garbage here, so any
    attempt to read weights would fail with another message."""
    from diffguide.scripts.personalize import main

    tmp_path, common = cli_setup
    weights = list((tmp_path / "model").rglob("*.safetensors"))
    assert len(weights) == 3
    for path in weights:
        path.write_bytes(b"not weights")
    args = common[:4] + [token] + common[5:6] + [initializer] + common[7:]
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--steps", "1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and lines[-1].startswith(f"diffguide-personalize: error: {message}"), lines
    assert not (tmp_path / "out").exists()


def test_help_keeps_the_examples_and_shows_each_default_once(capsys, monkeypatch):
    import argparse

    from diffguide.scripts import personalize as cli

    parsers = []
    parse = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda self, *a, **k: parsers.append(self) or parse(self, *a, **k))
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    examples = [line for line in cli.__doc__.splitlines() if line.strip().startswith("diffguide-personalize ")]
    assert len(examples) == 4 and all(example in lines for example in examples)
    options = [a for a in parsers[0]._actions if a.option_strings and a.dest != "help"]
    starts = {a.dest: next(i for i, line in enumerate(lines) if (line + " ").startswith(f"  {a.option_strings[0]} "))
              for a in options}
    bounds = sorted(starts.values()) + [len(lines)]
    for action in options:
        start = starts[action.dest]
        block = " ".join(lines[start:bounds[bounds.index(start) + 1]])
        shown = block.count("default")
        has_default = action.default not in (None, False)
        assert shown == 1 if has_default else shown <= 1, (action.option_strings[0], block)
        if has_default and "(default: " in block and action.help and "default" not in action.help:
            assert f"(default: {action.default})" in block


def test_command_line_checkpoint_problems_are_named_before_loading(cli_setup, capsys, monkeypatch):
    from diffguide.scripts import personalize as cli
    from diffguide.tasks import personalize

    tmp_path, common = cli_setup
    cli.main(common + ["--steps", "2"])
    monkeypatch.setattr(personalize, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_info:                               # no --resume
        cli.main(common + ["--steps", "4"])
    assert exit_info.value.code == 2 and "pass --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"^error: cannot resume, the run differs from the checkpoint: learning_rate: "
                                         r"checkpoint 0.005 vs now 0.5; tau: checkpoint 2 vs now 3$"):
        cli.main(common + ["--steps", "4", "--resume", "--lr", "0.5", "--tau", "3"])
    (tmp_path / "out2").write_text("a file")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(common[:8] + [str(tmp_path / "out2")] + common[9:] + ["--steps", "4"])
    assert exit_info.value.code == 2 and "is not a folder" in capsys.readouterr().err
    state = tmp_path / "out" / "checkpoint" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:40])                                   # truncated
    with pytest.raises(SystemExit, match=r"error: damaged checkpoint .*state.safetensors.*start afresh"):
        cli.main(common + ["--steps", "4", "--resume"])
    (tmp_path / "out" / "checkpoint" / "state.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"error: damaged checkpoint .*state.json"):
        cli.main(common + ["--steps", "4", "--resume"])


def test_batch_sizes_that_only_repeat_images_are_refused():
    config_ok = config(batch_size=6, flip_prob=0.0)          # 2 images x 3 templates
    TextualInversion(tiny_sd(), images(2), "<s1>", "a", config_ok)
    with pytest.raises(ValueError, match="batch_size 7 is larger than the 6 distinct"):
        TextualInversion(tiny_sd(), images(2), "<s1>", "a", config(batch_size=7, flip_prob=0.0))
    TextualInversion(tiny_sd(), images(2), "<s1>", "a", config(batch_size=12))   # mirrors double it


def test_benchmark_keeps_the_quality_table_when_rewriting_its_section():
    """``bench_personalize --keep-quality`` keeps the quality description and table, and only them, however often
    the section is rewritten (an earlier version dropped the table on the second rewrite)."""
    from bench_personalize import QUALITY_HEADING, kept_quality_section

    table = "| embedding | classifier accuracy | training s |\n|---|---|---|\n| zo (400 steps) | 0.943 | 41 |"
    first = (f"<!-- personalize:start -->\n## P\n\n{QUALITY_HEADING}\n\nDigits [2]: 5 training images.\n\n{table}\n\n"
             "Reading: an old conclusion.\n<!-- personalize:end -->\n<!-- zoo:start -->\n| other | table |")
    kept = kept_quality_section(first)
    assert kept.startswith(QUALITY_HEADING) and kept.endswith(table) and "Digits [2]" in kept
    assert "Reading" not in kept and "other" not in kept and kept.count("Kept from") == 1
    again = f"<!-- personalize:start -->\n## P\n\n{kept}\n\nReading: new.\n<!-- personalize:end -->"
    assert kept_quality_section(again) == kept
    with pytest.raises(SystemExit, match="lacks its description or its table"):
        kept_quality_section(first.replace(table, ""))
