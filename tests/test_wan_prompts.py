"""Prompts and clips for Wan2.1 (issue 30, point 4): a tiny ``WanPipeline`` folder with a tiny random
``UMT5EncoderModel`` and a T5-shaped tokenizer (tests/diffusers_pipelines.py's "wan-text") builds with its encoder and
tokenizer as components (``--max-sequence-length 24``); ``run --prompt ... --negative-prompt ...`` equals diffusers'
own ``WanPipeline`` on the same prompts and latents (its ``prompt_clean``, UMT5 fed the mask, the rows past each
prompt zeroed), ``--out clip.mp4`` writes H.264 as ``export_to_video`` does, ``L2CPipeline(...).frames`` are the
pipeline's, the served model takes the prompt as text, and the C++ ``l2c-run`` cleans and encodes prompts as ``run``
does."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from l2c_export.core.text_stack import wan_prompt_clean
from l2c_export.runtime.pipeline import L2CPipeline

from .conftest import run_cli
from .diffusers_pipelines import load_pipeline
from .test_cpp import cpp_build  # noqa: F401 (a fixture)

STEPS = 6
CFG_SCALE = 4.0
MAX_SEQUENCE_LENGTH = 24
NUM_FRAMES, HEIGHT, WIDTH = 5, 16, 32  # 2 latent frames of 4 x 8 at the tiny VAE's factor 4
LATENTS = (4, 2, 4, 8)
# what prompt_clean rewrites: doubled whitespace, tabs and line breaks, an HTML entity without its semicolon; capitals,
# punctuation and digits the tiny vocabulary spells letter by letter
PROMPTS = ["A handwritten  Seven!\n", "the digit &amp 7\t drawn,\r\n  blurry "]
NEGATIVE = " a blurry picture"


def _ftfy_installed() -> bool:
    try:
        import ftfy  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def wan_text_build(tiny_diffusers, tmp_path_factory):
    """``build --diffusers DIR --steps 6 --num-frames 5 --image-size 16x32 --max-sequence-length 24`` of the tiny
    Wan2.1 with its UMT5 and tokenizer (CLI, a real subprocess; full compute), the noise of 2 clips beside it as
    z.npy; tests read it, never change it."""
    root = tmp_path_factory.mktemp("wan-text")
    folder = tiny_diffusers("wan-text", "flow")
    noise = torch.randn(2, *LATENTS, generator=torch.Generator().manual_seed(0)).numpy()
    np.save(root / "z.npy", noise)
    run_cli("build", "--diffusers", str(folder), "--steps", str(STEPS), "--num-frames", str(NUM_FRAMES),
            "--image-size", f"{HEIGHT}x{WIDTH}", "--max-sequence-length", str(MAX_SEQUENCE_LENGTH), "--out",
            str(root / "E"))
    return root, folder, noise


def _pipeline(folder, noise, output_type, negative_prompt=NEGATIVE):
    with torch.no_grad():
        return load_pipeline(folder)(prompt=PROMPTS, negative_prompt=negative_prompt, latents=torch.from_numpy(noise),
                                     num_inference_steps=STEPS, guidance_scale=CFG_SCALE, num_frames=NUM_FRAMES,
                                     height=HEIGHT, width=WIDTH, max_sequence_length=MAX_SEQUENCE_LENGTH,
                                     output_type=output_type).frames


def test_prompt_clean_is_the_pipelines():
    """wan_prompt_clean equals WanPipeline's prompt_clean on whitespace runs, HTML entities without semicolons, text
    to strip (with ftfy, on what ftfy rewrites and whitespace of every kind: the regex module's \\s leaves U+001C..
    U+001F alone); without ftfy, a prompt ftfy could change (a character past printable ASCII but tabs and line
    breaks, an HTML entity: ftfy unescapes once more) is refused naming it."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    texts = [*PROMPTS, NEGATIVE, "", "  \r\n a\tb \r", "salt &amp pepper &lt 3", "x" * 40]
    if _ftfy_installed():
        texts += ["caf\u00e9 \u201cquoted\u201d", "tab&amp;amp;", "a\x0cb\x1cc \x1f\u3000d"]
    assert [wan_prompt_clean(text) for text in texts] == [prompt_clean(text) for text in texts]
    if not _ftfy_installed():
        for text, named in (("caf\u00e9", "'\u00e9' (U+00E9) at character 4"), ("a &amp; b", "'&amp;'"),
                            ("a\x1bb", "(U+001B) at character 2")):
            with pytest.raises(ValueError, match="ftfy") as refused:
                wan_prompt_clean(text, "--prompt 1")
            assert str(refused.value).startswith("--prompt 1: ") and named in str(refused.value)


@pytest.mark.slow
def test_run_with_prompts_equals_the_pipeline(wan_text_build, tmp_path):
    """The build carries UMT5 (input_ids and attention_mask in, last_hidden_state (n, L, 12) out, L dynamic), its
    tokenizer and the stack's record; ``run --prompt P1 --prompt P2 --negative-prompt N --noise z.npy --cfg-scale 4
    --save-latents`` equals WanPipeline's latents (output_type="latent") to 1e-4 of the range; the prompt encoder's
    arrays equal the pipeline's encode_prompt, its default negative prompt "" included."""
    root, folder, noise = wan_text_build
    components = json.loads((root / "E" / "manifest.json").read_text())["components"]
    assert components["prompt_encoding"] == {
        "max_sequence_length": MAX_SEQUENCE_LENGTH, "preprocessing": "wan_prompt_clean",
        "encoders": [{"encoder": "text_encoder", "tokenizer": "tokenizer", "masked": True,
                      "max_length": MAX_SEQUENCE_LENGTH, "selection": "zeroed_past_prompt", "selection_count": 0}],
        "arrays": {"prompt_embeds": [["text_encoder/last_hidden_state"]]}}
    assert [t["name"] for t in components["text_encoder"]["inputs"]] == ["input_ids", "attention_mask"]
    assert components["text_encoder"]["outputs"][0]["shape"] == ["batch", "prompt_tokens", 12]
    arguments = [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
    run_cli("run", str(root / "E"), *arguments, "--negative-prompt", NEGATIVE, "--noise", str(root / "z.npy"),
            "--cfg-scale", str(CFG_SCALE), "--save-latents", str(tmp_path / "out.npy"))
    want = _pipeline(folder, noise, "latent").numpy()
    got = np.load(tmp_path / "out.npy")
    assert got.shape == want.shape == (2, *LATENTS)
    assert np.abs(got - want).max() <= 1e-4 * np.ptp(want), np.abs(got - want).max()
    encoder = L2CPipeline.from_pretrained(root / "E").prompt_encoder
    with torch.no_grad():
        embeds, negative = load_pipeline(folder).encode_prompt(PROMPTS, None, max_sequence_length=MAX_SEQUENCE_LENGTH)
    arrays = encoder(PROMPTS)
    assert np.array_equal(arrays["prompt_embeds"] == 0, embeds.numpy() == 0)  # the same rows zeroed
    for name, value in (("prompt_embeds", embeds), ("negative_prompt_embeds", negative)):
        assert arrays[name].shape == (2, MAX_SEQUENCE_LENGTH, 12)
        assert np.abs(arrays[name] - value.numpy()).max() <= 1e-5 * np.ptp(value.numpy()), name


@pytest.mark.slow
def test_frames_and_the_mp4_are_the_pipelines(wan_text_build, tmp_path):
    """L2CPipeline.from_pretrained(E)(prompt=[...], ...).frames is WanPipeline's of the same output_type: "np" (n, F,
    H, W, 3) in [0, 1] to 1e-3 of the range, "pil" n lists of F PIL images within 1 level; run --prompt ... --out
    clip.mp4 writes H.264 that plays back as F frames of the two clips side by side, at Wan's 16 frames a second;
    verify's component checks pass (UMT5 on example prompts, the VAE decoder)."""
    import imageio

    from l2c_export.tools.verify import verify_components

    root, folder, noise = wan_text_build
    pipe = L2CPipeline.from_pretrained(root / "E")
    request = dict(prompt=PROMPTS, negative_prompt=NEGATIVE, latents=noise, guidance_scale=CFG_SCALE)
    got = pipe(**request, output_type="np").frames
    want = _pipeline(folder, noise, "np")
    assert isinstance(got, np.ndarray) and got.shape == want.shape == (2, NUM_FRAMES, HEIGHT, WIDTH, 3)
    assert np.abs(got - want).max() <= 1e-3 * np.ptp(want) and np.ptp(want) > 0.01
    pictures, want_pictures = pipe(**request, output_type="pil").frames, _pipeline(folder, noise, "pil")
    assert [len(clip) for clip in pictures] == [len(clip) for clip in want_pictures] == [NUM_FRAMES] * 2
    assert max(np.abs(np.asarray(a).astype(int) - np.asarray(b)).max()
               for clip, want_clip in zip(pictures, want_pictures) for a, b in zip(clip, want_clip)) <= 1
    arguments = [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
    run_cli("run", str(root / "E"), *arguments, "--negative-prompt", NEGATIVE, "--noise", str(root / "z.npy"),
            "--cfg-scale", str(CFG_SCALE), "--out", str(tmp_path / "clip.mp4"))
    with imageio.get_reader(tmp_path / "clip.mp4") as reader:
        meta = reader.get_meta_data()
        played = np.stack([frame for frame in reader.iter_data()])  # list(reader) sizes itself by nframes: inf
    assert meta["codec"] == "h264" and meta["fps"] == 16 and meta["size"] == (2 * WIDTH, HEIGHT)
    assert played.shape == (NUM_FRAMES, HEIGHT, 2 * WIDTH, 3)
    sent = (np.concatenate(list(want), axis=2) * 255).astype(np.uint8)  # the clips side by side
    assert np.abs(played.astype(int) - sent).mean() < 20  # H.264 is lossy; another clip differs by ~85
    checks = verify_components(root / "E", folder)  # the UMT5 and VAE decoder graphs against the folder's modules
    assert [check.name for check in checks] == ["text_encoder", "vae_decoder"] and all(c.passed for c in checks)


@pytest.mark.slow
def test_macs_take_the_cross_attention_at_the_builds_prompt_length(wan_text_build):
    """Wan pads every prompt to max_sequence_length and its cross-attention reads every row, so a build's MACs count
    the prompt at the build's --max-sequence-length (24), not Wan's default 512: per token fewer, each block's
    ``attn2`` a row of to_k and to_v (D x D each) and 2 T D of scores and values, and the text embedder's two layers
    (text_dim x D, D x D); the manifest records the length."""
    from l2c_export.models.zoo import from_diffusers

    root, folder, _ = wan_text_build
    macs = json.loads((root / "E" / "manifest.json").read_text())["macs"]
    default = from_diffusers(folder, (HEIGHT, WIDTH), None, NUM_FRAMES)  # the pipeline's own length, 512
    config, family = default.config, default.family
    inner, tokens = family.inner_dim(config), family.num_tokens(config)
    at_512 = family.count_macs(config)
    assert macs["prompt_tokens"] == MAX_SEQUENCE_LENGTH and family.macs_prompt_length(config) == 512
    per_token = config["num_layers"] * (2 * inner * inner + 2 * tokens * inner) + (config["text_dim"] + inner) * inner
    assert at_512.full - macs["full"] == (512 - MAX_SEQUENCE_LENGTH) * per_token


def test_served_requests_take_the_prompt_as_text(wan_text_build, tmp_path):
    """The Triton model (in process: the functions its execute runs) takes ``prompt`` and ``negative_prompt`` as
    UTF-8 bytes (n, 1), encodes them as run --prompt does and answers the pipeline's latents; the repository
    declares them and ``frames`` UINT8 (F, H, W, 3)."""
    from l2c_export.serving.sampling import decode_request, sample_requests

    root, folder, noise = wan_text_build
    run_cli("triton", str(root / "E"), "--repo", str(tmp_path / "repo"), "--name", "wan")
    config = " ".join((tmp_path / "repo" / "wan" / "config.pbtxt").read_text().split())
    assert 'name: "prompt" data_type: TYPE_STRING dims: 1' in config, config
    assert f'name: "frames" data_type: TYPE_UINT8 dims: {NUM_FRAMES} dims: {HEIGHT} dims: {WIDTH} dims: 3' in config
    pipe = L2CPipeline.from_engine_dir(root / "E")
    texts = np.array([[text.encode()] for text in PROMPTS], dtype=object)
    request = decode_request(pipe, prompt=texts, negative_prompt=np.array([[NEGATIVE.encode()]] * 2, dtype=object),
                             noise=noise, cfg_scale=np.full((2, 1), CFG_SCALE, np.float32))
    (samples,), _ = sample_requests(pipe, [request])
    want = _pipeline(folder, noise, "latent").numpy()
    assert np.abs(samples - want).max() <= 1e-4 * np.ptp(want)


@pytest.mark.slow
def test_a_prompt_ftfy_would_change_is_refused_in_one_line(wan_text_build, tmp_path):
    """Without ftfy, a prompt WanPipeline's ftfy.fix_text could rewrite is refused naming it: one line, exit 2,
    nothing written; a negative prompt too (from Python, naming the argument), before anything runs."""
    if _ftfy_installed():
        pytest.skip("ftfy is installed: prompts are cleaned with it")
    root = wan_text_build[0]
    refused = run_cli("run", str(root / "E"), "--prompt", "a", "--prompt", "caf\u00e9", "--save-latents",
                      str(tmp_path / "o.npy"), check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "--prompt/--prompts 2: '\u00e9' (U+00E9) at character 4" in refused.stderr, refused.stderr
    assert "ftfy" in refused.stderr and not (tmp_path / "o.npy").exists()
    with pytest.raises(ValueError, match="^negative_prompt: the HTML entity '&amp;'; WanPipeline cleans prompts"):
        L2CPipeline.from_pretrained(root / "E")(prompt=["a"], negative_prompt="x &amp; y")


# ---------------------------------------------------------------------------------------------------------------------
# The C++ runtime: l2c-run cleans prompts as wan_prompt_clean does without ftfy (cpp/src/preprocessing.cpp).

# HTML references html.unescape reads without a semicolon (numeric, the legacy names, a legacy name's prefix of a longer
# word), ones the first unescaping makes ("&amp#233;"), whitespace of every kind they may stand for, and plain text
HTML_PIECES = ["&amp", "&AMP", "&lt", "&gt", "&quot", "&nbsp", "&copy", "&eacute", "&ampx", "&amplt", "&not", "&notin",
               "&frac12", "&sup23", "&#", "&#x", "&#X", "&#65", "&#x41", "&#0", "&#13", "&#9", "&#10", "&#12", "&#11",
               "&#1", "&#127", "&#128", "&#129", "&#150", "&#159", "&#160", "&#173", "&#8195", "&#12288", "&#55296",
               "&#1114112", "&#99999999999999", "&#xfffe", "&#64976", "&#x1F431", "&#38", "&#x26", "&#35", "&a.b;",
               "&amp.x;", "#233", "#x41", "eacute", "amp", ";", "&", "#", " ", "  ", "\t", "\n", "\r", "\r\n", "a",
               "B", "7", "_", ".", "<", "x", "f"]


def test_cpp_prompt_cleaning_is_pythons(cpp_build):
    """l2c-preprocess-test (the runtime's preprocessing) against core/text_stack.py on two thousand ASCII texts of
    HTML references, whitespace and text: wan_prompt_clean's text (ftfy absent) for every text Python keeps, but for
    the few whose first unescaping makes a named entity with its semicolon, which C++ refuses (it carries HTML's
    legacy names only; "&amphearts&#59" is "&hearts;", then a heart); Python's refusals refused too (an entity with
    its semicolon, a character past printable ASCII, named as Python names it); lower_strip and none as Python's."""
    from l2c_export.core.text_stack import preprocess

    if _ftfy_installed():
        pytest.skip("ftfy is installed: Python cleans prompts with it, C++ as without it")
    rng = np.random.default_rng(0)
    texts = [*PROMPTS, NEGATIVE, "", " \t\r\n ", "&amp#233;", "&ampamp", "&ampamp&#59", "&#38#65", "&amp&#35;65;",
             "&nbsp a &#8195; b &nbsp", "&#12&#9x&#13", "&#" + "9" * 4300, "&#x" + "0" * 5000 + "41"]
    texts += ["".join(rng.choice(HTML_PIECES, rng.integers(1, 12))) for _ in range(2000)]
    refused = {"caf\u00e9": "'\u00e9' (U+00E9) at character 4", "a\x1bb": "'\\x1b' (U+001B) at character 2",
               "x &amp; y": "the HTML entity '&amp;'", "&#" + "9" * 4301: "a character reference of 4301 digits",
               "&amphearts&#59": "unescaped once, the HTML reads '&hearts;'"}
    kept = compared = 0
    for kind, cases in (("wan_prompt_clean", texts + list(refused)), ("lower_strip", texts), ("none", texts)):
        result = subprocess.run([str(cpp_build / "l2c-preprocess-test"), kind], capture_output=True, text=True,
                                input="".join(json.dumps(text) + "\n" for text in cases), timeout=60)
        lines = result.stdout.splitlines()
        assert result.returncode == 0 and len(lines) == len(cases), result.stderr
        for text, line in zip(cases, lines):
            try:
                want = preprocess(text, kind)
            except ValueError:
                want = None
            if text in refused:
                assert line.startswith("refused: prompt: " + refused[text]), (text, line)
            elif line.startswith("refused: "):
                assert kind == "wan_prompt_clean" and (want is None or "unescaped once" in line), (text, line)
                kept += want is not None
            else:
                assert json.loads(line) == want, (kind, text, line)
                compared += 1
    assert compared > 5000 and kept < 20  # most texts are cleaned alike; refusing one Python keeps is rare


@pytest.mark.slow
def test_l2c_run_encodes_wan_prompts_as_run_does(cpp_build, wan_text_build, tmp_path):
    """l2c-run --prompt P1 --prompt P2 --negative-prompt N --seed S (the prompts with doubled whitespace, tabs, line
    breaks and an HTML entity without its semicolon: prompt_clean's work; the tiny UMT5, its Unigram tokenizer, the
    rows past each prompt zeroed) equals l2c-export run on the same request to 1e-5 of the range, guided and not; a
    non-ASCII prompt is refused in one line, exit 2, nothing written."""
    from .test_cpp import l2c_run

    engines = wan_text_build[0] / "E"
    arguments = [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
    for request in ([*arguments, "--negative-prompt", NEGATIVE, "--cfg-scale", str(CFG_SCALE)],
                    [*arguments, "--cfg-scale", "1"]):
        ran = l2c_run(engines, *request, "--seed", "3", "--out", tmp_path / "cpp.npy")
        assert ran.returncode == 0, ran.stderr
        run_cli("run", str(engines), *request, "--seed", "3", "--save-latents", str(tmp_path / "py.npy"))
        cpp, python = np.load(tmp_path / "cpp.npy"), np.load(tmp_path / "py.npy")
        assert cpp.shape == python.shape == (2, *LATENTS)
        assert np.abs(cpp - python).max() <= 1e-5 * np.ptp(python), np.abs(cpp - python).max()
    refused = l2c_run(engines, "--prompt", "a", "--prompt", "caf\u00e9", "--seed", "3", "--out", tmp_path / "x.npy")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert "--prompt 2: '\u00e9' (U+00E9) at character 4; WanPipeline cleans prompts with ftfy.fix_text" in lines[0]
    assert not (tmp_path / "x.npy").exists()
