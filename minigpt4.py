"""The MiniGPT-4 backbone that MiniGPT-5 builds on.

    image ─► EVA ViT (Blip2VisionModel; its post_layernorm is LAVIS's ln_vision)
          ─► Q-Former (Blip2QFormerModel, 32 learned queries) ─► llama_proj ─► LLM space
    text  ─► the LLM family's tokenizer (+ [IMG0]..[IMG7] and <ImageHere> as special tokens)
    wrap_inputs: BOS (if the family has one) + text embeddings with each <ImageHere> replaced by its
                 image's query embeddings (batched: one scatter, no loop over samples)
    voken_features: the 8 last-layer states at each [IMG0] (training and generation alike)
    text rules of the LLM family (`llm_families/`, the config's `llm_family`): tokenizer set-up, BOS,
                 the end of an answer and its decoding (generation.py and fast_inference.py ask here);
                 the voken rows after the tokenizer's own tokens, tied rows kept tied (`add_voken_rows`)

Attribute names follow MiniGPT-4 / MiniGPT-5 (`visual_encoder`, `Qformer`, `query_tokens`,
`llama_proj`, `llama_model`, `llama_tokenizer`) so checkpoint keys match the release.

The release trained the whole input-embedding and lm_head matrices to change 9 rows. Here the
9 new rows are separate parameters (`VokenEmbedding`, `VokenLMHead`): the original rows (32 000) get
no gradient and no optimiser state, while `state_dict()` still shows one full `weight` matrix
under the release's key.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from configuration import ModelConfig, to_dtype
from constants import IMAGE_PLACEHOLDER, VOKEN_COUNT, VOKENS
from llm_families import DEFAULT_FAMILY, get_family
# The image encoder's input transform and normalisation (importable from here too, as before).
from image_transforms import CLIP_MEAN, CLIP_STD, image_processor  # noqa: F401
from placement import LLM_QUANTIZATION, QUANTIZATION_REQUIREMENTS

log = logging.getLogger(__name__)



def llm_quantization_config(name: str | None, compute_dtype: torch.dtype = torch.bfloat16):
    """transformers' `BitsAndBytesConfig` for the LLM: "8bit" (LLM.int8, the release's `low_resource`
    mode) or "4bit" (NF4 with double quantisation, computing in `compute_dtype`); None for none.
    Raises before any weight is read if the name is unknown or bitsandbytes is not installed (an
    optional extra). bitsandbytes runs on CUDA and, from version 0.45, also on the CPU."""
    if name is None:
        return None
    if name not in LLM_QUANTIZATION:
        raise ValueError(f"llm_quantization must be one of {LLM_QUANTIZATION} or None, got {name!r}")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"llm_quantization={name!r} needs the bitsandbytes package, an optional extra: "
                          f"pip install -r {QUANTIZATION_REQUIREMENTS}")
    from transformers import BitsAndBytesConfig

    if name == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def load_tokenizer(llama_path: str, llm_family: str = DEFAULT_FAMILY):
    """The LLM's tokenizer with the vokens and `<ImageHere>` added as special tokens, in the release's
    order, set up the family's way (`llm_families`; vicuna's gives the ids and pieces the release's
    sentencepiece tokenizer gave)."""
    return get_family(llm_family).load_tokenizer(llama_path)


# --------------------------------------------------------------------------------------------
# Embedding and lm_head with frozen old rows and trainable new rows
# --------------------------------------------------------------------------------------------

class _SplitRows(nn.Module):
    """A (V + n, H) matrix stored as frozen rows [0, V) and trainable rows [V, V + n).

    `state_dict()` shows the full matrix as `weight` (the release's layout); loading a `weight`
    splits it again. Both parts are kept in float32, as the release kept these matrices.
    """

    def __init__(self, old_rows: torch.Tensor, new_rows: torch.Tensor):
        super().__init__()
        self.frozen_weight = nn.Parameter(old_rows.detach().float(), requires_grad=False)
        self.new_weight = nn.Parameter(new_rows.detach().float())
        self.register_state_dict_post_hook(_merge_rows_hook)
        self.register_load_state_dict_pre_hook(_split_rows_hook)

    @property
    def num_old(self) -> int:
        return self.frozen_weight.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The full matrix (a copy; for inspection and tying, not for the forward pass)."""
        return torch.cat([self.frozen_weight, self.new_weight], dim=0)

    def freeze_old_rows(self) -> None:
        """Re-apply the split after a wrapper (e.g. PEFT's modules_to_save) set requires_grad."""
        self.frozen_weight.requires_grad_(False)
        self.new_weight.requires_grad_(True)


def _merge_rows_hook(module: _SplitRows, state_dict: dict, prefix: str, local_metadata) -> None:
    old = state_dict.pop(prefix + "frozen_weight")
    new = state_dict.pop(prefix + "new_weight")
    state_dict[prefix + "weight"] = torch.cat([old, new], dim=0)


def _split_rows_hook(module: _SplitRows, state_dict: dict, prefix: str, local_metadata, strict,
                     missing_keys, unexpected_keys, error_msgs) -> None:
    key = prefix + "weight"
    if key not in state_dict:
        return
    full = state_dict.pop(key)
    expected = (module.num_old + module.new_weight.shape[0], module.new_weight.shape[1])
    if tuple(full.shape) != expected:
        error_msgs.append(f"{key}: expected shape {expected}, found {tuple(full.shape)}")
        return
    state_dict[prefix + "frozen_weight"] = full[: module.num_old]
    state_dict[prefix + "new_weight"] = full[module.num_old:]


class VokenEmbedding(_SplitRows):
    """Input embedding: old rows frozen, the 9 new rows (vokens, `<ImageHere>`) trainable."""

    def __init__(self, old_rows: torch.Tensor, new_rows: torch.Tensor, output_dtype: torch.dtype):
        super().__init__(old_rows, new_rows)
        self.output_dtype = output_dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Look every id up in the old rows, then overwrite the (few) new tokens in place: one
        # gather of the output's size instead of two plus a select.
        is_new = input_ids >= self.num_old
        out = F.embedding(input_ids.clamp(max=self.num_old - 1), self.frozen_weight)
        if torch.compiler.is_compiling() or (input_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            # Inside a CUDA graph or compiled code (fast_inference.py's decode step): the boolean index
            # above has a data-dependent size (a host synchronisation); a select gives the same values.
            new = F.embedding((input_ids - self.num_old).clamp(min=0), self.new_weight)
            return torch.where(is_new.unsqueeze(-1), new, out).to(self.output_dtype)
        out[is_new] = F.embedding(input_ids[is_new] - self.num_old, self.new_weight)
        return out.to(self.output_dtype)


class VokenLMHead(_SplitRows):
    """Output projection: logits over old rows (frozen) and new rows (trainable), in float32."""

    @classmethod
    def tied(cls, embedding: VokenEmbedding) -> "VokenLMHead":
        """The output projection of an LLM with tied input and output embeddings (Qwen2.5 at small
        sizes): the embedding's own parameters, so the new rows are one tensor trained once."""
        head = cls(embedding.frozen_weight[:0], embedding.new_weight[:0])
        head.frozen_weight, head.new_weight = embedding.frozen_weight, embedding.new_weight
        return head

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.float()
        return torch.cat([F.linear(hidden_states, self.frozen_weight),
                          F.linear(hidden_states, self.new_weight)], dim=-1)


def split_row_modules(module: nn.Module) -> list[_SplitRows]:
    """Every `VokenEmbedding` / `VokenLMHead` inside `module` (PEFT copies included)."""
    return [m for m in module.modules() if isinstance(m, _SplitRows)]


# --------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------

class MiniGPT4(nn.Module):
    """Frozen image encoder + `llama_proj` + the LLM with voken rows; see the module docstring."""

    def __init__(self, cfg: ModelConfig, visual_encoder: nn.Module, qformer: nn.Module,
                 query_tokens: nn.Parameter, llama_proj: nn.Linear, llama_model: nn.Module,
                 llama_tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = visual_encoder
        self.Qformer = qformer
        self.query_tokens = query_tokens
        self.llama_proj = llama_proj
        self.llama_model = llama_model
        self.llama_tokenizer = llama_tokenizer
        self.family = get_family(cfg.llm_family)
        self.llm_dtype = to_dtype(cfg.dtypes.llm)
        self.vision_dtype = to_dtype(cfg.dtypes.vision)
        rows = split_row_modules(llama_model)
        self.num_old_tokens = rows[0].num_old
        # Tied input / output embeddings share their rows (VokenLMHead.tied): LoRA trains them in place.
        self.tied_rows = len(rows) > 1 and rows[0].new_weight is rows[1].new_weight
        # Ids of the added tokens: [IMG0]..[IMG7] then <ImageHere>, right after the old vocabulary.
        self.voken_ids = list(range(self.num_old_tokens, self.num_old_tokens + VOKEN_COUNT))
        self.image_token_id = self.num_old_tokens + VOKEN_COUNT
        if llama_tokenizer is not None:
            ids = llama_tokenizer.convert_tokens_to_ids(VOKENS + [IMAGE_PLACEHOLDER])
            if ids != self.voken_ids + [self.image_token_id]:
                raise ValueError(f"tokenizer of {cfg.llama_model} gives ids {ids} to the new tokens; expected "
                                 f"{self.voken_ids + [self.image_token_id]} (right after the {self.num_old_tokens} "
                                 "original rows)")
        for module in (self.visual_encoder, self.Qformer, self.llama_proj):
            module.requires_grad_(False)
        self.query_tokens.requires_grad_(False)

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: ModelConfig, device: str | torch.device | None = None,
                    llm_quantization: str | None = None) -> "MiniGPT4":
        """Build and load the backbone from the config's weight files.

        With `device="meta"` nothing is loaded or allocated: the modules are built from the
        sizes in the config and the LLM folder's `config.json` only, in the dtypes a load gives
        (for counting parameters and bytes or planning sharding), and no tokenizer is read.

        Loading is lean: the image side is built on the meta device and takes the (memory-mapped)
        file tensors themselves, the LLM is read by transformers straight into its dtype (a
        safetensors file already in that dtype stays memory-mapped), so no float32 copy of any
        part and no second copy of the files is made. `device` (e.g. "cuda") loads the LLM
        directly onto that device; the other parts are built on the CPU (the caller moves them).
        `llm_quantization` ("8bit" / "4bit", see `llm_quantization_config`) loads the LLM's
        linear layers quantised with bitsandbytes (the release's `low_resource` mode was 8-bit).
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        import lavis
        from weights import load_llama_proj

        meta = str(device) == "meta"
        if meta and llm_quantization:
            raise ValueError("llm_quantization needs real weights; it cannot be combined with device='meta'")
        if not meta:
            cfg.check_paths()
        llm_dtype = to_dtype(cfg.dtypes.llm)
        vision_dtype = to_dtype(cfg.dtypes.vision)
        quantization = llm_quantization_config(llm_quantization, llm_dtype)   # fails before loading anything
        with torch.device("meta"):
            visual_encoder = lavis.build_vision_model(cfg.vision, cfg.image_size)
            qformer, query_tokens = lavis.build_qformer(cfg.qformer, cfg.vision.hidden_size, cfg.num_query_token)
        llm_config = AutoConfig.from_pretrained(cfg.llama_model)
        family = get_family(cfg.llm_family)
        check_llm_family(cfg, family, llm_config)
        hidden = llm_config.hidden_size
        with torch.device("meta" if meta else "cpu"):
            llama_proj = nn.Linear(cfg.qformer.hidden_size, hidden)
        if not meta:                  # a projection for another LLM width stops here, before any big load
            proj = load_llama_proj(cfg.ckpt)
            if tuple(proj["weight"].shape) != tuple(llama_proj.weight.shape):
                raise ValueError(f"{cfg.ckpt}: llama_proj.weight has shape {tuple(proj['weight'].shape)}, "
                                 f"expected {tuple(llama_proj.weight.shape)} (Q-Former {cfg.qformer.hidden_size} "
                                 f"-> LLM {hidden}, the `hidden_size` of {cfg.llama_model}; config keys `ckpt` "
                                 f"and `llama_model`)")
            llama_proj.load_state_dict(proj)
        if meta:
            visual_encoder.to(vision_dtype)            # the dtypes a load gives (the Q-Former stays float32)
            with torch.device("meta"):
                llama_model = AutoModelForCausalLM.from_config(llm_config, dtype=llm_dtype)
            tokenizer = None
        else:
            query_tokens = nn.Parameter(torch.zeros(query_tokens.shape))     # filled from the file
            lavis.load_eva_vit(visual_encoder, cfg.vit_model, cfg.q_former_model, dtype=vision_dtype)
            lavis.load_qformer(qformer, query_tokens, cfg.q_former_model)
            place = {}
            if quantization is not None or (device is not None and torch.device(device).type != "cpu"):
                place["device_map"] = {"": str(device or "cpu")}
            tokenizer = family.load_tokenizer(cfg.llama_model)     # a tokenizer of another family stops here
            llama_model = AutoModelForCausalLM.from_pretrained(cfg.llama_model, dtype=llm_dtype,
                                                               quantization_config=quantization, **place)
        # The new rows start where the tokenizer puts [IMG0]: after its own tokens, which may be fewer
        # than the embedding's rows (a padded vocabulary); without a tokenizer, after every row.
        text_rows = tokenizer.convert_tokens_to_ids(VOKENS[0]) if tokenizer is not None else None
        add_voken_rows(llama_model, llm_dtype, text_rows)
        llama_model.requires_grad_(False)
        for module in split_row_modules(llama_model):
            module.freeze_old_rows()
        return cls(cfg, visual_encoder, qformer, query_tokens, llama_proj, llama_model, tokenizer)

    def add_lora(self) -> None:
        """Stage 2: wrap the LLM with PEFT LoRA (`lora` in the config: r 8, alpha 16, dropout 0.05 on
        q_proj / v_proj at real size, as the release); `lm_head`/`embed_tokens` become
        `modules_to_save` copies that train only their new rows."""
        from peft import LoraConfig, get_peft_model

        lora = self.cfg.lora
        # Untied rows: PEFT's copies (the release's checkpoint keys); tied rows train in place (two
        # copies would untie them).
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM",
                            modules_to_save=None if self.tied_rows else ["lm_head", "embed_tokens"])
        self.llama_model = get_peft_model(self.llama_model, config)
        # PEFT marks the whole copied module trainable and leaves the originals trainable as they were:
        # keep the originals frozen, and only the new rows of the copies trainable.
        for name, module in self.llama_model.named_modules():
            if isinstance(module, _SplitRows):
                if ".original_module" in name:
                    module.requires_grad_(False)
                else:
                    module.freeze_old_rows()

    @property
    def is_lora(self) -> bool:
        """Whether the LLM is wrapped with PEFT (stage 2)."""
        return hasattr(self.llama_model, "peft_config")

    def llm_parts(self) -> tuple[nn.Module, nn.Module]:
        """The decoder stack (embeddings + layers + final norm) and the lm_head, through PEFT."""
        base = self.llama_model.get_base_model() if self.is_lora else self.llama_model
        return base.model, base.lm_head

    def train(self, mode: bool = True) -> "MiniGPT4":
        """The frozen image side stays in eval mode, as in the release."""
        super().train(mode)
        self.visual_encoder.eval()
        self.Qformer.eval()
        return self

    @property
    def device(self) -> torch.device:
        """Where the LLM's input embedding is: where token ids and prompt embeddings go."""
        return next(self.llm_parts()[0].embed_tokens.parameters()).device

    # ---- the LLM family's text rules (`self.family`, from the config's `llm_family`) --------------

    @property
    def bos_token_id(self) -> int | None:
        """The token every sequence starts with (`wrap_inputs` puts it first), or None (Qwen2.5)."""
        return self.family.bos_token_id(self.llama_tokenizer, self.llama_model.config)

    @property
    def end_sym(self) -> str:
        """Where an answer ends (the family's: vicuna's is the config's `end_sym`, the release's "###");
        generation stops there."""
        return self.family.end_sym(self.cfg)

    def decode_answer(self, ids: list[int]) -> tuple[list[int], str, str]:
        """An answer's ids up to the end-of-sequence token, its text with special tokens (the release's
        decoding) and its clean text (no vokens, image slots or end symbol): (ids, text, clean)."""
        tokenizer = self.llama_tokenizer
        if tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(tokenizer.eos_token_id)]
        text = tokenizer.decode(ids, skip_special_tokens=False)
        clean = text
        for token in VOKENS + [self.end_sym, IMAGE_PLACEHOLDER]:
            clean = clean.replace(token, "")
        return ids, text, " ".join(clean.split())

    # ---- images ------------------------------------------------------------------------------

    def encode_img(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) normalised images -> (B, num_query_token, llm_hidden) embeddings in the
        LLM's dtype, and their all-ones attention mask (B, num_query_token). The image side is
        frozen in MiniGPT-5: no gradient."""
        # On a GPU the release ran this under autocast in the ViT's half dtype, whatever the
        # surrounding precision (Lightning's bf16-mixed); the CPU keeps the parts' own dtypes.
        half = images.is_cuda and self.vision_dtype in (torch.float16, torch.bfloat16)
        with torch.no_grad(), torch.autocast("cuda", dtype=self.vision_dtype, enabled=half):
            embeds = self.project_images(images)
        atts = torch.ones(embeds.shape[:-1], dtype=torch.long, device=embeds.device)
        return embeds.to(self.llm_dtype), atts

    def project_images(self, images: torch.Tensor) -> torch.Tensor:
        """ViT -> Q-Former (the learned queries read the image tokens) -> `llama_proj`, with
        gradients (MiniGPT-4's captioning stage trains these; see toyworld/pretrain.py)."""
        image_feats = self.visual_encoder(images.to(self.vision_dtype)).last_hidden_state
        queries = self.query_tokens.expand(images.shape[0], -1, -1)
        query_out = self.Qformer(query_embeds=queries, encoder_hidden_states=image_feats.float()).last_hidden_state
        return self.llama_proj(query_out.to(self.llama_proj.weight.dtype))

    # ---- text + images -----------------------------------------------------------------------

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> input embeddings (through PEFT's modules_to_save copy in stage 2)."""
        decoder, _ = self.llm_parts()
        return decoder.embed_tokens(input_ids)

    def wrap_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor | None, image_embeds: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Batched input wrapping: the images spliced into the text (docs/architecture.md, "How a batch flows").

        `input_ids` (B, T) are right-padded token ids, one `<ImageHere>` per input image;
        `image_embeds` (N, Q, H) are the images' LLM-space embeddings in the order their
        placeholders appear (sample by sample, left to right). Returns `inputs_embeds` (B, L, H)
        = BOS (for a family that has one) + text with each placeholder replaced by its Q embeddings,
        right-padded with zeros; `attention_mask` (B, L); and `labels` (B, L) with -100 on BOS,
        image positions and padding (None when `labels` is None).
        """
        B, T = input_ids.shape
        valid = attention_mask.bool()
        is_image = (input_ids == self.image_token_id) & valid
        n_placeholders = int(is_image.sum())
        n_images = 0 if image_embeds is None else image_embeds.shape[0]
        if n_placeholders != n_images:
            raise ValueError(f"the batch's prompts contain {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
                             f"but {n_images} image(s) were given; give one image per placeholder")
        n_query = image_embeds.shape[1] if image_embeds is not None else 0
        device = input_ids.device
        # Each token occupies 1 slot, an image placeholder n_query slots, padding none.
        span = torch.where(is_image, n_query, 1) * valid
        bos = self.bos_token_id
        lead = 0 if bos is None else 1                              # BOS takes the first slot
        start = lead + span.cumsum(dim=1) - span                    # slot of each token, after BOS
        lengths = lead + span.sum(dim=1)
        L = int(lengths.max())
        # Only the real tokens are embedded (BOS included, in one call), then written in place into
        # a zero (padding) tensor together with the image queries: the (B, L, H) output is written
        # once, with no per-sample loop (benchmarks/RESULTS.md, row 2).
        text_b, text_t = (valid & ~is_image).nonzero(as_tuple=True)
        ids, rows, cols = input_ids[text_b, text_t], text_b, start[text_b, text_t]
        if lead:
            ids = torch.cat([torch.full((B,), bos, dtype=input_ids.dtype, device=device), ids])
            rows = torch.cat([torch.arange(B, device=device), rows])
            cols = torch.cat([torch.zeros(B, dtype=start.dtype, device=device), cols])
        vectors = self.embed_tokens(ids)
        dtype = vectors.dtype
        embeds = torch.zeros(B, L, vectors.shape[-1], device=device, dtype=dtype)
        embeds.index_put_((rows, cols), vectors)
        if n_images:
            img_b, img_t = is_image.nonzero(as_tuple=True)           # row-major = image order
            slots = start[img_b, img_t].unsqueeze(1) + torch.arange(n_query, device=device)
            embeds.index_put_((img_b.unsqueeze(1).expand_as(slots), slots), image_embeds.to(dtype))
        new_mask = (torch.arange(L, device=device).unsqueeze(0) < lengths.unsqueeze(1)).long()
        new_labels = None
        if labels is not None:
            new_labels = torch.full((B, L), -100, dtype=labels.dtype, device=device)
            new_labels[text_b, start[text_b, text_t]] = labels[text_b, text_t]
        return embeds, new_mask, new_labels

    def forward_llm(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Run the LLM on wrapped inputs: (last-layer hidden states (after the final norm, as the
        release's `hidden_states[-1]`), logits, shifted causal-LM loss or None)."""
        decoder, lm_head = self.llm_parts()
        # Positions count only attended tokens, as transformers' generate does for left padding.
        position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        hidden = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         position_ids=position_ids).last_hidden_state
        logits = lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return hidden, logits, loss

    def voken_positions(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where voken features start: the 8 voken features of an `[IMG0]` are the last-layer states
        of the position before it (which predicts `[IMG0]`) and of `[IMG0]`..`[IMG6]`. For every
        `[IMG0]` in `token_ids` (labels or generated ids, aligned with the hidden states): (batch
        index, position - 1)."""
        b, t = (token_ids == self.voken_ids[0]).nonzero(as_tuple=True)
        return b, t - 1

    def voken_features(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The 8 last-layer states per voken occurrence: the state that predicted `[IMG0]` and the
        states of `[IMG0]`..`[IMG6]`. Returns (N, 8, H) features and the (N,) batch indices."""
        b, start = self.voken_positions(token_ids)
        if (start < 0).any() or (start + VOKEN_COUNT > hidden.shape[1]).any():
            raise ValueError("an [IMG0] is too close to the start or the end of its sequence to take 8 voken states")
        index = start.unsqueeze(1) + torch.arange(VOKEN_COUNT, device=hidden.device)
        return hidden[b.unsqueeze(1), index], b


def add_voken_rows(llama_model: nn.Module, llm_dtype: torch.dtype, text_rows: int | None = None) -> None:
    """Grow the LLM's input embedding and lm_head by the 9 new tokens, initialised to the mean of
    the old rows (as the release), as frozen-old/trainable-new modules kept in float32.

    The new rows follow the first `text_rows` rows (the tokenizer's own tokens; default: every row).
    A padded vocabulary (Qwen2.5: more rows than tokens) loses its padding rows, which no token
    reaches, so that the new tokens' ids are their rows. Tied input / output embeddings stay tied:
    the lm_head shares the embedding's parameters (`VokenLMHead.tied`)."""
    n_new = VOKEN_COUNT + 1
    embed = llama_model.get_input_embeddings()
    head = llama_model.get_output_embeddings()
    tied = head.weight is embed.weight
    rows = embed.weight.shape[0]
    text_rows = rows if text_rows is None else text_rows
    if text_rows > rows:
        raise ValueError(f"the tokenizer has {text_rows} tokens but the LLM's embedding only {rows} rows; "
                         "the tokenizer belongs to another LLM (config key `llama_model`)")
    if text_rows < rows:
        log.info("dropping the %d padding rows of the LLM's vocabulary (%d tokens, %d rows)", rows - text_rows,
                 text_rows, rows)
    old_embed = embed.weight[:text_rows]
    new_embed = old_embed.detach().float().mean(0, keepdim=True).expand(n_new, -1).clone()
    embedding = VokenEmbedding(old_embed, new_embed, llm_dtype)
    llama_model.set_input_embeddings(embedding)
    if tied:
        llama_model.set_output_embeddings(VokenLMHead.tied(embedding))
        # The tie is ours now: transformers must not tie `lm_head.weight` again (it is a view here).
        llama_model.config.tie_word_embeddings = False
    else:
        old_head = head.weight[:text_rows]
        new_head = old_head.detach().float().mean(0, keepdim=True).expand(n_new, -1).clone()
        llama_model.set_output_embeddings(VokenLMHead(old_head, new_head))
    llama_model.config.vocab_size = text_rows + n_new


def check_llm_family(cfg: ModelConfig, family, llm_config) -> None:
    """Stop before any weight loads when the LLM folder is not of the config's `llm_family`."""
    if family.model_types and llm_config.model_type not in family.model_types:
        raise ValueError(f"{cfg.source}: `llm_family` is {family.name!r}, which expects an LLM of type "
                         f"{' or '.join(family.model_types)}, but `llama_model` ({cfg.llama_model}) is a "
                         f"{llm_config.model_type!r} model; set `llm_family` to its family")
