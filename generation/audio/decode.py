"""MusicGen decoding with a static KV cache and a fixed-shape step, for CUDA graphs: the loop, owned here.

    from conceptcaps_pipeline.audio.decode import StaticMusicgenDecoder
    decoder = StaticMusicgenDecoder(model)                     # once per loaded model
    audio = decoder.generate(input_ids, attention_mask, max_new_tokens=1503, guidance_scale=3.3, top_k=250)

`MusicgenForConditionalGeneration.generate` decodes step by step with a cache that grows by
`torch.cat`, builds the attention masks and position embeddings anew every step (with host
syncs to size them), and checks every step whether to stop. For a fixed clip length none of
that is needed. This module runs the same computation with:

- a static KV cache (transformers' `StaticCache` for self-attention; the cross-attention keys
  and values are computed once), so every step has the same shapes and tensor addresses;
- masks and position embeddings precomputed for every position and picked by a device-side
  position counter, so a step makes no host sync;
- attention over the filled part of the cache only, in buckets of 128 positions (`bucketed_cache`),
  so the KV cache read per step grows with the clip instead of always being the whole clip's;
- exactly `max_new_tokens` steps (a clip's length is fixed), MusicGen's delay pattern,
  classifier-free guidance, temperature and top-k done as transformers does them;
- on CUDA, the step compiled with `torch.compile(mode="reduce-overhead")` (CUDA graphs: one
  launch per step instead of ~1,000 kernels driven by Python; one graph per length bucket).
The layers, embeddings, heads and codec are the model's own modules. tests/test_musicgen_decode.py
checks that the tokens and audio equal `generate`'s for the same seed.
"""

from __future__ import annotations

import torch

BUCKET = 128  # cache positions per attention length bucket: one captured graph per bucket


def bucketed_cache(config, max_cache_len: int):
    """A StaticCache whose layers hand attention only the first `visible` positions (set per bucket).

    Why: a static cache's attention would otherwise read all `max_cache_len` positions every step,
    masked or not: twice the KV traffic of the filled part on average over a clip.
    """
    from transformers.cache_utils import Cache, StaticLayer

    class BucketedLayer(StaticLayer):
        visible = max_cache_len

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            return keys[:, :, : self.visible], values[:, :, : self.visible]

    return Cache(layers=[BucketedLayer(max_cache_len=max_cache_len) for _ in range(config.num_hidden_layers)])


class StaticMusicgenDecoder:
    """The decode loop of one MusicgenForConditionalGeneration (mono or stereo), with a static cache."""

    def __init__(self, model, compile_step: bool | None = None):
        self.model = model
        self.decoder = model.decoder.model.decoder  # MusicgenDecoder: embeddings, layers, norm
        self.heads = model.decoder.lm_heads
        self.config = model.decoder.config
        self.num_codebooks = self.config.num_codebooks
        self.pad = int(model.generation_config.pad_token_id)
        self.start = int(model.generation_config.decoder_start_token_id)
        device = next(model.parameters()).device
        self.compile_step = device.type == "cuda" if compile_step is None else compile_step
        self._step = torch.compile(self._decode_step, mode="reduce-overhead") if self.compile_step else self._decode_step

    # -- setup per batch ---------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, guidance: bool):
        """Text encoder states and mask as the model's forward uses them (null half appended for guidance)."""
        model = self.model
        states = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask
        if guidance:
            states = torch.cat([states, torch.zeros_like(states)], dim=0)
            mask = torch.cat([mask, torch.zeros_like(mask)], dim=0)
        if (model.text_encoder.config.hidden_size != self.config.hidden_size
                and self.config.cross_attention_hidden_size is None):
            states = model.enc_to_dec_proj(states)
        return states * mask[..., None], mask

    def _masks(self, rows: int, length: int, encoder_mask: torch.Tensor, dtype, device):
        """(causal mask per position: (length, rows, 1, 1, length), encoder mask: (rows, 1, 1, S)), additive floats.

        The model's own mask builders are not used per step because they size the masks on the
        host; these are the same masks (0 where a key may be attended, the dtype's minimum where not).
        """
        low = torch.finfo(dtype).min
        positions = torch.arange(length, device=device)
        causal = torch.where(positions[None, :] <= positions[:, None], 0.0, low).to(dtype)  # (query pos, key pos)
        causal = causal[:, None, None, None, :].expand(length, rows, 1, 1, length).contiguous()
        cross = torch.where(encoder_mask[:, None, None, :].bool(), 0.0, low).to(dtype)
        return causal, cross

    # -- one step ----------------------------------------------------------------------------------
    def _decode_step(self, tokens, position, causal, cross, states, cache, positions_table, guidance_scale,
                     temperature, top_k: int, guidance: bool, visible: int):
        """tokens (B*K,) at `position` -> scores (B*K, V) after guidance, temperature and top-k.

        `visible` (a Python int: one compiled graph per value) is how many cache positions attention reads.
        """
        batch = tokens.shape[0] // self.num_codebooks
        codes = tokens.reshape(batch, self.num_codebooks)
        if guidance:
            codes = codes.repeat(2, 1)
        embeds = sum(self.decoder.embed_tokens[k](codes[:, k]) for k in range(self.num_codebooks))
        hidden = (embeds + positions_table.index_select(0, position).to(embeds.dtype))[:, None, :]
        mask = causal.index_select(0, position)[0][..., :visible]
        for layer in self.decoder.layers:
            hidden = layer(hidden, mask, states, encoder_attention_mask=cross, past_key_values=cache, use_cache=True)
        hidden = self.decoder.layer_norm(hidden)
        logits = torch.stack([head(hidden) for head in self.heads], dim=1)  # (rows, K, 1, V)
        logits = logits.reshape(-1, logits.shape[-1]).float()
        if guidance:
            cond, uncond = logits.split(logits.shape[0] // 2, dim=0)
            logits = uncond + (cond - uncond) * guidance_scale
        scores = logits / temperature
        if top_k:
            kth = torch.topk(scores, min(top_k, scores.shape[-1]))[0][..., -1, None]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        return scores

    # -- the loop ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                guidance_scale: float = 3.0) -> dict:
        """Everything the steps of one batch share: encoder states, masks, positions, the delay pattern, the cache."""
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        guidance = guidance_scale is not None and guidance_scale > 1
        device = input_ids.device
        batch = input_ids.shape[0]
        states, encoder_mask = self.encode(input_ids, attention_mask, guidance)
        length = max_new_tokens + 1
        start = torch.full((batch * self.num_codebooks, 1), self.start, dtype=torch.long, device=device)
        _, pattern = self.model.decoder.build_delay_pattern_mask(start, pad_token_id=self.start, max_length=length)
        causal, cross = self._masks(states.shape[0], length, encoder_mask, states.dtype, device)
        # Sinusoidal positions for the whole clip, built by the model's own module.
        positions_table = self.decoder.embed_positions(
            torch.zeros((1, self.num_codebooks, length), dtype=torch.long, device=device)).to(device)
        tokens = torch.full((batch * self.num_codebooks, length), self.pad, dtype=torch.long, device=device)
        tokens[:, 0] = self.start
        return {"states": states, "pattern": pattern, "causal": causal, "cross": cross, "positions": positions_table,
                "cache": EncoderDecoderCache(bucketed_cache(self.config, length), DynamicCache(config=self.config)),
                "length": length,
                "tokens": tokens, "position": torch.zeros(1, dtype=torch.long, device=device), "guidance": guidance,
                "batch": batch}

    @torch.inference_mode()
    def run(self, prepared: dict, *, max_new_tokens: int, guidance_scale: float = 3.0, top_k: int = 250,
            temperature: float = 1.0, do_sample: bool = True) -> torch.Tensor:
        """The decode steps (no host sync inside): fills and returns prepared["tokens"]."""
        p = prepared
        tokens, pattern = p["tokens"], p["pattern"]
        layers = p["cache"].self_attention_cache.layers
        for step in range(max_new_tokens):
            visible = min(p["length"], (step // BUCKET + 1) * BUCKET)
            for layer in layers:
                layer.visible = visible
            current = torch.where(pattern[:, step] == -1, tokens[:, step], pattern[:, step])
            scores = self._step(current, p["position"], p["causal"], p["cross"], p["states"], p["cache"],
                                p["positions"], guidance_scale, temperature, top_k, p["guidance"], visible)
            if do_sample:
                probs = torch.nn.functional.softmax(scores, dim=-1)
                tokens[:, step + 1] = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                tokens[:, step + 1] = torch.argmax(scores, dim=-1)
            p["position"] += 1
        return tokens

    @torch.inference_mode()
    def generate_codes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                       guidance_scale: float = 3.0, top_k: int = 250, temperature: float = 1.0,
                       do_sample: bool = True) -> torch.Tensor:
        """Audio codes (1, B, K, frames) exactly as `generate` makes them before the codec."""
        prepared = self.prepare(input_ids, attention_mask, max_new_tokens=max_new_tokens, guidance_scale=guidance_scale)
        tokens = self.run(prepared, max_new_tokens=max_new_tokens, guidance_scale=guidance_scale, top_k=top_k,
                          temperature=temperature, do_sample=do_sample)
        codes = torch.where(prepared["pattern"] == -1, tokens, prepared["pattern"])
        codes = codes[codes != self.pad].reshape(prepared["batch"], self.num_codebooks, -1)
        return codes[None, ...]

    def decode_audio(self, codes: torch.Tensor) -> torch.Tensor:
        """(1, B, K, frames) codes -> (B, channels, samples) audio through the model's codec, as `generate` does."""
        codec = self.model.audio_encoder
        scales = [None] * codes.shape[1]
        if self.config.audio_channels == 1:
            return codec.decode(codes, audio_scales=scales).audio_values
        left = codec.decode(codes[:, :, ::2, :], audio_scales=scales).audio_values
        right = codec.decode(codes[:, :, 1::2, :], audio_scales=scales).audio_values
        return torch.cat([left, right], dim=1)

    @torch.inference_mode()
    def generate(self, input_ids, attention_mask, **kwargs) -> torch.Tensor:
        return self.decode_audio(self.generate_codes(input_ids, attention_mask, **kwargs))
