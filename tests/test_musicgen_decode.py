"""The static-cache MusicGen decode loop gives the clips of transformers' generate, for the same seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conceptcaps_pipeline.audio.decode import StaticMusicgenDecoder
from conceptcaps_pipeline.audio.generate import (
    AudioArguments,
    batch_size_from_memory,
    codec_timing,
    decoding_steps,
    generate_audio,
    kv_bytes_per_clip,
    load_musicgen,
    synthesize,
)
from conceptcaps_pipeline.audio.shards import read_shards

PROMPTS = ["A calm jazz piano with soft brushes and a walking double bass",
           "Loud rock guitar riff", "a slow ambient pad with strings, reverb and a distant choir humming"]


@pytest.fixture(scope="module")
def tiny(tiny_musicgen):
    torch.set_num_threads(1)
    return load_musicgen(str(tiny_musicgen), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def stereo(tiny):
    from conceptcaps_pipeline.testing.tiny_musicgen import (
        make_audible,
        musicgen_generation_config,
        tiny_musicgen_config,
    )
    from transformers import MusicgenForConditionalGeneration

    _, processor = tiny
    torch.manual_seed(1)
    config = tiny_musicgen_config(len(processor.tokenizer), stereo=True)
    stereo = MusicgenForConditionalGeneration(config).eval()
    make_audible(stereo)
    stereo.generation_config = musicgen_generation_config(config.decoder.vocab_size)
    return stereo, processor


@pytest.mark.parametrize("prompts, guidance, top_k, seconds", [
    (PROMPTS, 3.3, 250, 0.6),     # the paper's settings, prompts of three lengths (padding)
    (PROMPTS[:1], 3.0, 250, 0.3),  # one clip
    (PROMPTS, 1.0, 0, 0.4),        # no guidance, no top-k
    (PROMPTS[1:], 5.0, 8, 0.5),    # a strong guidance and a small top-k
    (PROMPTS[:2], 3.3, 250, 3.0),  # 153 steps: attention over two length buckets of the cache
])
def test_static_decoding_equals_generate(tiny, prompts, guidance, top_k, seconds):
    model, processor = tiny
    steps = decoding_steps(seconds, codec_timing(model.config))[1]
    settings = {"seed": 11, "max_new_tokens": steps, "guidance_scale": guidance, "top_k": top_k}
    reference = synthesize(model, processor, prompts, **settings)
    static = synthesize(model, processor, prompts, **settings, decoder=StaticMusicgenDecoder(model))
    assert static.shape == reference.shape and np.array_equal(static, reference)
    # The codec in sub-batches: the same codes, and audio equal to float rounding (batched convolutions sum
    # in another order).
    parts = synthesize(model, processor, prompts, **settings, decoder=StaticMusicgenDecoder(model), codec_batch_size=1)
    np.testing.assert_allclose(parts, reference, rtol=0, atol=1e-5)


def test_static_decoding_equals_generate_in_stereo(stereo):
    model, processor = stereo
    steps = decoding_steps(0.4, codec_timing(model.config))[1]
    settings = {"seed": 3, "max_new_tokens": steps, "guidance_scale": 3.3, "top_k": 250}
    reference = synthesize(model, processor, PROMPTS[:2], **settings)
    static = synthesize(model, processor, PROMPTS[:2], **settings, decoder=StaticMusicgenDecoder(model))
    assert reference.shape[1] == 2 and np.array_equal(static, reference)


def test_the_stage_makes_the_same_shards_with_either_decoder(audio_captions_run, tmp_path, tiny_musicgen,
                                                            single_process_state):
    import shutil

    runs = {}
    for decoder in ("generate", "static"):
        run = shutil.copytree(audio_captions_run, tmp_path / decoder)
        generate_audio(AudioArguments(run=str(run), model=str(tiny_musicgen), duration=0.5, batch_size=3,
                                      decoder=decoder))
        runs[decoder] = {r["id"]: r["audio"] for r in read_shards(run / "audio").to_pylist()}
    assert runs["static"] == runs["generate"] and len(runs["static"]) == 10


def test_batch_size_from_memory():
    from transformers import MusicgenDecoderConfig

    large = MusicgenDecoderConfig(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32)
    per_clip = kv_bytes_per_clip(large, 1503, guidance=True, dtype_bytes=2)
    assert 1.1e9 < per_clip < 1.3e9  # about 1.2 GB of KV cache per 30-second clip with guidance
    assert batch_size_from_memory(72 * 2**30, large, 1503, True, 2) == 51
    assert batch_size_from_memory(130 * 2**30, large, 1503, True, 2) == 92  # H200
    assert batch_size_from_memory(2**30, large, 1503, True, 2) == 1  # never below one
    assert batch_size_from_memory(72 * 2**30, large, 1503, False, 2) == 102  # no guidance: half the cache


def test_the_compiled_step_gives_the_same_clips(tiny):
    """The step torch.compile captures (CUDA graphs on a GPU) compiles on a CPU too (inductor): same audio, no graph break."""
    model, processor = tiny
    steps = decoding_steps(0.3, codec_timing(model.config))[1]
    settings = {"seed": 5, "max_new_tokens": steps, "guidance_scale": 3.3, "top_k": 250}
    reference = synthesize(model, processor, PROMPTS[:2], **settings)
    compiled = StaticMusicgenDecoder(model, compile_step=True)
    first = synthesize(model, processor, PROMPTS[:2], **settings, decoder=compiled)
    again = synthesize(model, processor, PROMPTS[:2], **settings, decoder=compiled)  # the compiled graph, reused
    assert np.array_equal(first, reference) and np.array_equal(again, reference)


@pytest.fixture(scope="module")
def wide_text(tiny):
    """A tiny MusicGen whose text encoder (48 wide) is wider than its decoder (32): the enc_to_dec_proj branch."""
    from conceptcaps_pipeline.testing.tiny_musicgen import (
        make_audible,
        musicgen_generation_config,
        tiny_musicgen_config,
    )
    from transformers import MusicgenForConditionalGeneration

    _, processor = tiny
    torch.manual_seed(2)
    config = tiny_musicgen_config(len(processor.tokenizer), text_hidden_size=48)
    model = MusicgenForConditionalGeneration(config).eval()
    make_audible(model)
    model.generation_config = musicgen_generation_config(config.decoder.vocab_size)
    return model, processor


def test_static_decoding_projects_wider_text_states(wide_text):
    model, processor = wide_text
    assert model.enc_to_dec_proj is not None  # the branch under test exists
    steps = decoding_steps(0.4, codec_timing(model.config))[1]
    settings = {"seed": 4, "max_new_tokens": steps, "guidance_scale": 3.3, "top_k": 250}
    reference = synthesize(model, processor, PROMPTS, **settings)
    static = synthesize(model, processor, PROMPTS, **settings, decoder=StaticMusicgenDecoder(model))
    assert np.array_equal(static, reference)


def test_the_step_compiles_once_per_length_bucket(tiny):
    """Dynamo's own counters over 7 batches of other prompts, batch sizes and clip lengths (CPU, counting backend).

    Expected graphs: the attention buckets of the longest clip (2 for 200 steps at 128 positions a bucket), all
    made while warming up; then no recompile and no graph break, whatever the prompt, its length or the batch.
    """
    import torch._dynamo
    from conceptcaps_pipeline.audio.decode import BUCKET
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    model, processor = tiny
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounter()
    decoder = StaticMusicgenDecoder(model, compile_step=True, compile_backend=backend)
    longest = 200
    decoder.warm_up(batch_size=3, max_new_tokens=longest, guidance_scale=3.3)
    buckets = -(-longest // BUCKET)
    assert backend.frame_count == buckets == decoder.graphs_for(longest) == 2
    words = " ".join(PROMPTS).split()
    batches = [(PROMPTS, 200), (PROMPTS[:1], 40), (PROMPTS[1:], 130), ([" ".join(words)] * 3, 90),
               (["drums"], 160), ([PROMPTS[2], "a", PROMPTS[0]], 60), (PROMPTS[::-1], 129)]
    lengths = set()
    for n, (prompts, steps) in enumerate(batches):
        inputs = processor(text=prompts, padding=True, return_tensors="pt")
        lengths.add(inputs["input_ids"].shape[1])
        torch.manual_seed(n)
        codes = decoder.generate_codes(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=steps,
                                       guidance_scale=3.3, top_k=250)
        assert codes.shape[1] == len(prompts)
    assert len(lengths) >= 4  # the prompts did differ in length (2 to 54 tokens)
    assert backend.frame_count == buckets  # no recompile after warm-up
    assert decoder.slots_made == 1  # one set of buffers served every batch
    assert not counters["graph_break"], dict(counters["graph_break"])
    # The compiled (counting-backend) step still gives generate's clips for a full batch.
    steps = decoding_steps(0.6, codec_timing(model.config))[1]
    settings = {"seed": 9, "max_new_tokens": steps, "guidance_scale": 3.3, "top_k": 250}
    reference = synthesize(model, processor, PROMPTS, **settings)
    padded = processor(text=PROMPTS, padding="max_length", max_length=BUCKET, return_tensors="pt")
    torch.manual_seed(9)
    codes = decoder.generate_codes(padded["input_ids"], padded["attention_mask"], max_new_tokens=steps,
                                   guidance_scale=3.3, top_k=250)
    assert backend.frame_count == buckets
    torch.manual_seed(9)
    eager = StaticMusicgenDecoder(model).generate_codes(padded["input_ids"], padded["attention_mask"],
                                                        max_new_tokens=steps, guidance_scale=3.3, top_k=250)
    assert torch.equal(codes, eager)
    assert reference.shape[0] == codes.shape[1]


BF16_STEPS = 24  # steps compared in bf16
BF16_TOLERANCE = 0.1  # max |static - generate| of the guided logits over their std (measured here: 0.028; see gpu_check.py)


def test_bf16_static_logits_match_generate(tiny_musicgen):
    """In bf16 (the GPU dtype; run here on a CPU) the two loops round differently, so tokens may part ways;
    the guided logits of the first BF16_STEPS steps, fed generate's greedy tokens, agree within BF16_TOLERANCE."""
    model, processor = load_musicgen(str(tiny_musicgen), torch.device("cpu"), torch.bfloat16)
    inputs = processor(text=PROMPTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, guidance_scale=3.3, max_new_tokens=BF16_STEPS,
                             return_dict_in_generate=True, output_scores=True)
        decoder = StaticMusicgenDecoder(model)
        slot = decoder.prepare(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=BF16_STEPS,
                               guidance_scale=3.3)
        worst = 0.0
        for step, reference in enumerate(out.scores):
            scores = decoder.step_scores(slot, step, 3.3, top_k=0)
            reference = reference.float()
            worst = max(worst, float((scores - reference).abs().max() / reference.std()))
            slot.tokens[:, step + 1] = reference.argmax(-1)  # teacher-forced: generate's own next codes
            slot.position += 1
    assert len(out.scores) == BF16_STEPS
    print(f"bf16: max |static - generate| / std over {BF16_STEPS} steps: {worst:.4f}")
    assert worst < BF16_TOLERANCE, worst


def test_more_buckets_than_dynamos_default_limit_stay_compiled(tiny):
    """A clip of 9 buckets (dynamo keeps 8 compiled versions of a function by default; a 30 s clip has 12 buckets of
    128): every bucket compiles, and the next clip adds no graph. Buckets of 8 positions keep it quick."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    model, processor = tiny
    torch._dynamo.reset()
    backend = CompileCounter()
    decoder = StaticMusicgenDecoder(model, compile_step=True, compile_backend=backend, bucket=8)
    steps = 8 * 8 + 3
    decoder.warm_up(batch_size=1, max_new_tokens=steps, guidance_scale=1.0, top_k=0)
    assert backend.frame_count == decoder.graphs_for(steps) == 9
    inputs = processor(text=PROMPTS[:1], return_tensors="pt")
    torch.manual_seed(0)
    codes = decoder.generate_codes(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=steps,
                                   guidance_scale=1.0, top_k=0)
    assert backend.frame_count == 9
    padded = processor(text=PROMPTS[:1], padding="max_length", max_length=128, return_tensors="pt")
    torch.manual_seed(0)
    eager = StaticMusicgenDecoder(model, bucket=8).generate_codes(padded["input_ids"], padded["attention_mask"],
                                                                  max_new_tokens=steps, guidance_scale=1.0, top_k=0)
    assert torch.equal(codes, eager)
