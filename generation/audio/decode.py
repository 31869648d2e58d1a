"""MusicGen decoding with a static KV cache and a fixed-shape step, for CUDA graphs: the loop, owned here.

    from conceptcaps_pipeline.audio.decode import StaticMusicgenDecoder
    decoder = StaticMusicgenDecoder(model)                     # once per loaded model
    decoder.warm_up(batch_size=8, max_new_tokens=1503)         # optional: compile every graph before timing
    audio = decoder.generate(input_ids, attention_mask, max_new_tokens=1503, guidance_scale=3.3, top_k=250)

`MusicgenForConditionalGeneration.generate` decodes step by step with a cache that grows by
`torch.cat`, builds the attention masks and position embeddings anew every step (with host
syncs to size them), and checks every step whether to stop. For a fixed clip length none of
that is needed. This module runs the same computation with:

- one set of device buffers per batch shape (a `DecodeSlot`), allocated outside the compiled
  step, marked static (`torch._dynamo.mark_static_address`) and reused by every batch of that
  shape: the self-attention KV cache (a transformers `StaticCache`-style layer per decoder
  layer), the cross-attention keys and values (computed once per batch, before the first step),
  the token and delay-pattern tables, the position counter. A batch copies its prompt's data in
  once; a step copies nothing from the host;
- the causal mask and the sinusoidal positions of every position built once per slot and picked
  by the device-side position counter (no host sync in a step);
- attention over the filled part of the cache only, in buckets of 128 positions
  (`BucketedStaticLayer`), so the KV cache read per step grows with the clip instead of always
  being the whole clip's;
- exactly `max_new_tokens` steps (a clip's length is fixed), MusicGen's delay pattern,
  classifier-free guidance, temperature and top-k done as transformers does them;
- on CUDA, the step compiled with `torch.compile(mode="reduce-overhead", dynamic=False)` (CUDA
  graphs: one launch per step instead of ~1,000 kernels driven by Python).

Compiled graphs: one per attention bucket of the longest clip decoded so far, and no more. Why
nothing else recompiles: the cache classes live at module level (a class made per batch fails
dynamo's type guard), every tensor the step reads belongs to the reused slot (same shapes, same
addresses), the text side is padded to a fixed `text_tokens` (longer prompts grow it by 128), and
on the compiled path a short batch (the last one) is padded to the slot's batch with copies of
its last prompt, whose clips are dropped. A slot is sized for the longest clip asked so far; a
longer clip replaces it (and compiles again). tests/test_musicgen_decode.py checks that the
tokens and audio equal `generate`'s for the same seed and counts the compiled graphs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, EncoderDecoderCache, StaticLayer

logger = logging.getLogger(__name__)

BUCKET = 128  # cache positions per attention length bucket: one compiled graph per bucket
MAX_GRAPHS = 64  # compiled versions of the step dynamo may keep: the buckets of a clip of up to 8,192 steps (160 s)
TEXT_TOKENS = 128  # text positions the compiled step's cross-attention holds; longer prompts grow it by 128


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class BucketedStaticLayer(StaticLayer):
    """A static self-attention cache layer that hands attention only its first `visible` positions.

    Why: a static cache's attention would otherwise read all `max_cache_len` positions every step,
    masked or not: twice the KV traffic of the filled part on average over a clip. `visible` is a
    Python int set by the loop before each step, so the compiled step has one graph per value.
    Why at module level: dynamo guards on the class; a class defined per call fails that guard on
    every batch and recompiles.
    """

    def __init__(self, max_cache_len: int):
        super().__init__(max_cache_len=max_cache_len)
        self.visible = max_cache_len

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        return keys[:, :, : self.visible], values[:, :, : self.visible]


def _static(tensor: torch.Tensor) -> torch.Tensor:
    """Mark a buffer the step reads as a fixed address: CUDA graphs then read it in place, no copy per replay."""
    torch._dynamo.mark_static_address(tensor)
    return tensor


@dataclass
class DecodeSlot:
    """The device buffers of one batch shape, reused by every batch of that shape (see the module docstring)."""

    rows: int  # decoder rows: batch, or 2 x batch with guidance (conditional and null halves)
    batch: int  # clips in the slot (a padded batch's real clips are its first ones)
    capacity: int  # cache positions: the longest clip's steps + 1, rounded up to BUCKET
    text_tokens: int  # text positions of the cross-attention
    guidance: bool
    cache: EncoderDecoderCache
    self_layers: list
    cross_layers: list
    tokens: torch.Tensor  # (batch*K, capacity) long: the decoded codes, column 0 the start token
    pattern: torch.Tensor  # (batch*K, capacity) long: the delay pattern (-1 where the model decides)
    position: torch.Tensor  # (1,) long: the step being decoded
    causal: torch.Tensor  # (capacity, 1, 1, 1, capacity): additive causal mask of each query position
    cross: torch.Tensor  # (rows, 1, 1, text_tokens): additive mask over the text positions
    states: torch.Tensor  # (rows, text_tokens, hidden): encoder states (the layers only test they are given)
    positions: torch.Tensor  # (capacity, hidden): sinusoidal position embedding of each position
    length: int = 0  # steps + 1 of the batch in the slot
    real: int = 0  # real clips of the batch in the slot


class StaticMusicgenDecoder:
    """The decode loop of one MusicgenForConditionalGeneration (mono or stereo), with a static cache.

    compile_step: None compiles on CUDA only. compile_backend / compile_mode: passed to torch.compile
    (tests count graphs on a CPU with a counting backend; the default on CUDA is inductor with CUDA graphs).
    """

    def __init__(self, model, compile_step: bool | None = None, compile_backend="inductor",
                 compile_mode: str | None = None, text_tokens: int = TEXT_TOKENS, bucket: int = BUCKET):
        self.model = model
        self.decoder = model.decoder.model.decoder  # MusicgenDecoder: embeddings, layers, norm
        self.heads = model.decoder.lm_heads
        self.config = model.decoder.config
        self.num_codebooks = self.config.num_codebooks
        self.pad = int(model.generation_config.pad_token_id)
        self.start = int(model.generation_config.decoder_start_token_id)
        self.device = next(model.parameters()).device
        self.compile_step = self.device.type == "cuda" if compile_step is None else compile_step
        self.text_tokens = text_tokens
        self.bucket = bucket  # positions per attention bucket (tests use fewer to reach many buckets quickly)
        self.slot: DecodeSlot | None = None
        self.slots_made = 0  # how many times buffers were allocated (each new shape compiles again)
        if self.compile_step:
            import torch._dynamo

            # Why: one graph per attention bucket (12 for a 30 s clip, more for longer ones) exceeds dynamo's default
            # of 8 compiled versions per function; past it the step would silently run uncompiled.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, MAX_GRAPHS)
            if compile_mode is None and compile_backend == "inductor" and self.device.type == "cuda":
                compile_mode = "reduce-overhead"  # CUDA graphs
            self._step = torch.compile(self._decode_step, backend=compile_backend, mode=compile_mode, dynamic=False)
        else:
            self._step = self._decode_step

    # -- buffers -----------------------------------------------------------------------------------
    def _slot_for(self, batch: int, length: int, text: int, guidance: bool, dtype) -> DecodeSlot:
        """The slot that holds this batch: the current one if it is large enough, else a new one (old one freed)."""
        slot = self.slot
        if self.compile_step:  # fixed shapes: pad the batch and the text up to the slot's
            text = max(round_up(text, TEXT_TOKENS), self.text_tokens)
            if slot is not None and slot.guidance == guidance and batch <= slot.batch and length <= slot.capacity \
                    and text <= slot.text_tokens:
                return slot
            batch = max(batch, slot.batch if slot is not None else 0)
            capacity = round_up(max(length, slot.capacity if slot is not None else 0), self.bucket)
            text = max(text, slot.text_tokens if slot is not None else 0)
        else:  # exact shapes: the eager loop has no graph to keep
            capacity = round_up(length, self.bucket)
            if slot is not None and (slot.guidance, slot.batch, slot.text_tokens) == (guidance, batch, text) \
                    and slot.capacity == capacity:
                return slot
        self.slot = None  # free the old buffers before allocating (a memory-sized batch fills the device)
        self.slot = self._allocate(batch, capacity, text, guidance, dtype)
        self.slots_made += 1
        if self.compile_step and self.slots_made > 1:
            logger.info("static decoder: new buffers for batch %d, %d positions, %d text tokens: the step compiles "
                        "again", batch, capacity, text)
        return self.slot

    def _allocate(self, batch: int, capacity: int, text: int, guidance: bool, dtype) -> DecodeSlot:
        device, config = self.device, self.config
        rows = batch * (2 if guidance else 1)
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        kv = torch.empty((rows, heads, 1, head_dim), dtype=dtype, device=device)
        self_layers = [BucketedStaticLayer(capacity) for _ in range(config.num_hidden_layers)]
        cross_layers = [StaticLayer(max_cache_len=text) for _ in range(config.num_hidden_layers)]
        for layer in self_layers + cross_layers:
            layer.lazy_initialization(kv, kv)  # allocated here, outside the compiled step; marks them static
        cache = EncoderDecoderCache(Cache(layers=self_layers), Cache(layers=cross_layers))
        low = torch.finfo(dtype).min
        index = torch.arange(capacity, device=device)
        causal = torch.where(index[None, :] <= index[:, None], 0.0, low).to(dtype)[:, None, None, None, :]
        # Sinusoidal positions for the whole slot, built by the model's own module.
        positions = self.decoder.embed_positions(
            torch.zeros((1, self.num_codebooks, capacity), dtype=torch.long, device=device)).to(device)
        codes = batch * self.num_codebooks
        return DecodeSlot(
            rows=rows, batch=batch, capacity=capacity, text_tokens=text, guidance=guidance, cache=cache,
            self_layers=self_layers, cross_layers=cross_layers,
            tokens=_static(torch.full((codes, capacity), self.pad, dtype=torch.long, device=device)),
            pattern=_static(torch.full((codes, capacity), -1, dtype=torch.long, device=device)),
            position=_static(torch.zeros(1, dtype=torch.long, device=device)),
            causal=_static(causal.contiguous()),
            cross=_static(torch.zeros((rows, 1, 1, text), dtype=dtype, device=device)),
            states=_static(torch.zeros((rows, text, config.hidden_size), dtype=dtype, device=device)),
            positions=_static(positions.contiguous()))

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

    @torch.inference_mode()
    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                guidance_scale: float = 3.0) -> DecodeSlot:
        """Copy one batch into its slot: encoder states, cross-attention keys/values, masks, the delay pattern."""
        guidance = guidance_scale is not None and guidance_scale > 1
        batch, text = input_ids.shape
        length = max_new_tokens + 1
        dtype = self.decoder.embed_tokens[0].weight.dtype
        slot = self._slot_for(batch, length, text, guidance, dtype)
        if batch < slot.batch:  # compiled path only: fill the slot with copies of the last prompt
            extra = slot.batch - batch
            input_ids = torch.cat([input_ids, input_ids[-1:].expand(extra, -1)])
            attention_mask = torch.cat([attention_mask, attention_mask[-1:].expand(extra, -1)])
        if text < slot.text_tokens:  # compiled path only: masked padding positions (zero states, no attention)
            input_ids = torch.nn.functional.pad(input_ids, (0, slot.text_tokens - text))
            attention_mask = torch.nn.functional.pad(attention_mask, (0, slot.text_tokens - text))
        states, encoder_mask = self.encode(input_ids, attention_mask, guidance)
        states = states.to(dtype)
        slot.states.copy_(states)
        slot.cross.copy_(torch.where(encoder_mask[:, None, None, :].bool(), 0.0, torch.finfo(dtype).min).to(dtype))
        # Cross-attention keys and values, once per batch, as MusicgenAttention computes them at step 0.
        for layer, cached in zip(self.decoder.layers, slot.cross_layers):
            attention = layer.encoder_attn
            shape = (*states.shape[:-1], -1, attention.head_dim)
            cached.keys.copy_(attention.k_proj(states).view(shape).transpose(1, 2))
            cached.values.copy_(attention.v_proj(states).view(shape).transpose(1, 2))
            cached.cumulative_length.fill_(slot.text_tokens)
        slot.cache.is_updated = dict.fromkeys(range(len(slot.cross_layers)), True)
        for cached in slot.self_layers:
            cached.cumulative_length.zero_()
            cached.keys.zero_()  # why: a stale key or value from the last batch must not meet a zero weight as NaN
            cached.values.zero_()
        start = torch.full((slot.batch * self.num_codebooks, 1), self.start, dtype=torch.long, device=self.device)
        _, pattern = self.model.decoder.build_delay_pattern_mask(start, pad_token_id=self.start, max_length=length)
        slot.pattern.fill_(-1)
        slot.pattern[:, :length].copy_(pattern)
        slot.tokens.fill_(self.pad)
        slot.tokens[:, 0] = self.start
        slot.position.zero_()
        slot.length, slot.real = length, batch
        return slot

    # -- one step ----------------------------------------------------------------------------------
    def _decode_step(self, tokens, pattern, position, causal, cross, states, cache, positions_table, guidance_scale,
                     temperature, top_k: int, guidance: bool):
        """The codes at `position` -> scores (B*K, V) for the next one, after guidance, temperature and top-k.

        Every tensor argument belongs to the slot (fixed address); `position` is read on the device.
        """
        column = tokens.index_select(1, position)[:, 0]
        delayed = pattern.index_select(1, position)[:, 0]
        current = torch.where(delayed == -1, column, delayed)
        batch = current.shape[0] // self.num_codebooks
        codes = current.reshape(batch, self.num_codebooks)
        if guidance:
            codes = codes.repeat(2, 1)
        embeds = sum(self.decoder.embed_tokens[k](codes[:, k]) for k in range(self.num_codebooks))
        hidden = (embeds + positions_table.index_select(0, position).to(embeds.dtype))[:, None, :]
        visible = cache.self_attention_cache.layers[0].visible
        mask = causal.index_select(0, position)[0][..., :visible]
        for layer in self.decoder.layers:
            hidden = layer(hidden, mask, states, encoder_attention_mask=cross, cache=cache, use_cache=True)
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
    def step_scores(self, slot: DecodeSlot, step: int, guidance_scale: float, temperature: float = 1.0,
                    top_k: int = 250) -> torch.Tensor:
        """Scores of step `step` (the slot's position must be `step`); sets the attention bucket first."""
        visible = min(slot.capacity, (step // self.bucket + 1) * self.bucket)
        for layer in slot.self_layers:
            layer.visible = visible
        if self.compile_step:
            # Why: CUDA-graph trees must know a new step begins while the last step's scores may still be referenced;
            # otherwise they treat the call as part of the same step and record a new graph instead of replaying.
            torch.compiler.cudagraph_mark_step_begin()
        return self._step(slot.tokens, slot.pattern, slot.position, slot.causal, slot.cross, slot.states, slot.cache,
                          slot.positions, guidance_scale, temperature, top_k, slot.guidance)

    @torch.inference_mode()
    def run(self, slot: DecodeSlot, *, max_new_tokens: int, guidance_scale: float = 3.0, top_k: int = 250,
            temperature: float = 1.0, do_sample: bool = True) -> torch.Tensor:
        """The decode steps (no host sync inside): fills and returns the slot's tokens."""
        tokens = slot.tokens
        for step in range(max_new_tokens):
            scores = self.step_scores(slot, step, guidance_scale, temperature, top_k)
            if do_sample:
                probs = torch.nn.functional.softmax(scores, dim=-1)
                tokens[:, step + 1] = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                tokens[:, step + 1] = torch.argmax(scores, dim=-1)
            slot.position += 1
        return tokens

    def graphs_for(self, max_new_tokens: int) -> int:
        """Compiled graphs a clip of `max_new_tokens` steps needs: its attention buckets."""
        return -(-max_new_tokens // self.bucket)

    @torch.inference_mode()
    def warm_up(self, batch_size: int, max_new_tokens: int, guidance_scale: float = 3.0, top_k: int = 250,
                temperature: float = 1.0, prompt_tokens: int = 8) -> None:
        """Decode one throw-away batch of the run's shape, so every graph is compiled before work is timed."""
        ids = torch.ones((batch_size, prompt_tokens), dtype=torch.long, device=self.device)
        state = torch.random.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        self.generate_codes(ids, torch.ones_like(ids), max_new_tokens=max_new_tokens, guidance_scale=guidance_scale,
                            top_k=top_k, temperature=temperature)
        torch.random.set_rng_state(state[0])  # why: warming up must not move the seeds of the real batches
        if state[1] is not None:
            torch.cuda.set_rng_state_all(state[1])

    @torch.inference_mode()
    def generate_codes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                       guidance_scale: float = 3.0, top_k: int = 250, temperature: float = 1.0,
                       do_sample: bool = True) -> torch.Tensor:
        """Audio codes (1, B, K, frames) exactly as `generate` makes them before the codec."""
        slot = self.prepare(input_ids, attention_mask, max_new_tokens=max_new_tokens, guidance_scale=guidance_scale)
        tokens = self.run(slot, max_new_tokens=max_new_tokens, guidance_scale=guidance_scale, top_k=top_k,
                          temperature=temperature, do_sample=do_sample)[:, :slot.length]
        pattern = slot.pattern[:, :slot.length]
        codes = torch.where(pattern == -1, tokens, pattern)
        codes = codes[codes != self.pad].reshape(slot.batch, self.num_codebooks, -1)
        return codes[None, : slot.real]  # a padded batch's copies of its last prompt are dropped

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
