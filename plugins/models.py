"""Models without a hub: tokenizers trained locally, tiny causal LMs built from a config, and the
loading/saving of ordinary HF directories (the same code path a user's real checkpoint takes).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from instructrl.core.errors import ConfigError
from instructrl.core.io import require_model_dir
from instructrl.core.types import TokenBatch, last_token_index
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
REWARD_STATS_FILE = "reward_stats.json"


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def train_tokenizer(
    texts: Iterable[str], kind: str = "char", vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Train a tokenizer on ``texts`` with 🤗 ``tokenizers`` and wrap it as an HF fast tokenizer.

    Args:
        texts: the training text (the task's pretraining corpus, prompts and demonstrations).
        kind: ``"char"`` (one token per character: WordLevel over single characters) or ``"bpe"``
            (byte-level BPE with ``vocab_size`` entries).
        vocab_size: BPE vocabulary size (ignored for ``"char"``).

    The tokenizer adds ``<s>`` in front of every encoded text; ``<pad>``, ``</s>`` and ``<unk>``
    are distinct special tokens (pad ≠ eos, so an EOS is never mistaken for padding). Padding is on
    the left (prompts are left-padded for generation).
    """
    if kind == "char":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        raise ConfigError(f"base.tokenizer: must be char or bpe (got {kind!r})")
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    hf.padding_side = "left"
    return hf


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Make a loaded tokenizer usable for RLHF: left padding and a pad token distinct from EOS.

    A tokenizer without a pad token gets a new ``<pad>`` token (callers must resize embeddings);
    re-using EOS as padding would make every EOS look like padding to the reward model.
    """
    tokenizer.padding_side = "left"
    if tokenizer.eos_token_id is None:
        raise ConfigError("tokenizer: has no eos_token; set one in the model dir's tokenizer_config.json")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD})
    return tokenizer


# --------------------------------------------------------------------------------------------
# Tiny models from a config
# --------------------------------------------------------------------------------------------


def build_causal_lm(base: Any, tokenizer: Any) -> PreTrainedModel:
    """A randomly initialised tiny causal LM described by the ``base`` recipe section.

    ``base.arch`` is ``llama`` (RMSNorm, RoPE, SwiGLU) or ``gpt2`` (LayerNorm, learned positions,
    GELU); embeddings are tied; dropout is 0.
    """
    vocab = len(tokenizer)
    common = {
        "vocab_size": vocab,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": True,
    }
    if base.arch == "llama":
        inter = base.intermediate_size or int(8 * base.hidden_size / 3 / 16 + 0.999) * 16
        config = LlamaConfig(
            hidden_size=base.hidden_size,
            intermediate_size=inter,
            num_hidden_layers=base.layers,
            num_attention_heads=base.heads,
            num_key_value_heads=base.heads,
            max_position_embeddings=base.max_positions,
            **common,
        )
        return LlamaForCausalLM(config)
    inter = base.intermediate_size or 4 * base.hidden_size
    config = GPT2Config(
        n_embd=base.hidden_size,
        n_layer=base.layers,
        n_head=base.heads,
        n_inner=inter,
        n_positions=base.max_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **common,
    )
    return GPT2LMHeadModel(config)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------------------------
# HF directories
# --------------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike[str], key: str = "model", trust_remote_code: bool = False) -> Any:
    """Load and :func:`prepare_tokenizer` the tokenizer of an HF model dir."""
    p = require_model_dir(path, key)
    try:
        tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types here
        raise ConfigError(f"{key}: cannot load a tokenizer from {p}: {str(exc).splitlines()[0]}") from None
    return prepare_tokenizer(tok)


def load_causal_lm(
    path: str | os.PathLike[str],
    key: str = "model",
    *,
    tokenizer: Any = None,
    trust_remote_code: bool = False,
    dropout: float | None = 0.0,
) -> PreTrainedModel:
    """Load ``AutoModelForCausalLM`` from an HF dir, fp32, with dropout set to ``dropout``."""
    p = require_model_dir(path, key)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(p), trust_remote_code=trust_remote_code, dtype=torch.float32
        )
    except Exception as exc:
        raise ConfigError(f"{key}: cannot load a causal LM from {p}: {str(exc).splitlines()[0]}") from None
    _fit_vocab(model, tokenizer)
    if dropout is not None:
        set_dropout(model, dropout)
    return model


def load_scalar_head_model(
    path: str | os.PathLike[str],
    key: str = "model",
    *,
    tokenizer: Any = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load ``AutoModelForSequenceClassification`` with one output (a reward or value model).

    From a causal-LM dir (SFT) the backbone is loaded and a new scalar head ``score`` is
    initialised; from a reward-model dir the trained head is loaded. Dropout is off.
    """
    p = require_model_dir(path, key)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(p), num_labels=1, trust_remote_code=trust_remote_code, dtype=torch.float32
        )
    except Exception as exc:
        raise ConfigError(
            f"{key}: cannot load a scalar-head model from {p}: {str(exc).splitlines()[0]}"
        ) from None
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    _fit_vocab(model, tokenizer)
    set_dropout(model, 0.0)
    return model


def _fit_vocab(model: PreTrainedModel, tokenizer: Any) -> None:
    if tokenizer is not None and model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Set every ``nn.Dropout`` and the config's dropout probabilities to ``p``."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    config = getattr(model, "config", None)
    if config is not None:
        for name in (
            "attention_dropout",
            "resid_pdrop",
            "embd_pdrop",
            "attn_pdrop",
            "hidden_dropout",
            "dropout",
        ):
            if hasattr(config, name) and isinstance(getattr(config, name), float):
                setattr(config, name, p)


def save_model_dir(
    model: PreTrainedModel, tokenizer: Any, path: str | os.PathLike[str], extra: dict[str, Any] | None = None
) -> Path:
    """Save model + tokenizer as an ordinary HF dir; ``extra`` is written to ``instructrl.json``."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(p))
    tokenizer.save_pretrained(str(p))
    if extra:
        (p / "instructrl.json").write_text(json.dumps(extra, indent=2, sort_keys=True))
    return p


def backbone_and_head(model: PreTrainedModel) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body and the scalar head of a sequence-classification model."""
    body = getattr(model, model.base_model_prefix, None)
    head = getattr(model, "score", None)
    if body is None or head is None:
        raise ConfigError(
            f"model: {type(model).__name__} has no '{model.base_model_prefix}' body or 'score' head; "
            "reward and value models need an AutoModelForSequenceClassification with a 'score' head"
        )
    return body, head


def read_reward_stats(path: str | os.PathLike[str]) -> dict[str, float]:
    """The statistics the RM stage records next to the model (``demo_mean`` …); ``{}`` if none."""
    f = Path(path) / REWARD_STATS_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def score_last_token(model: PreTrainedModel, batch: TokenBatch) -> torch.Tensor:
    """``(B,)`` scalar head at each row's last real token of a TokenBatch, fp32.

    This is the one read-out used by the RM stage (training, held-out accuracy) and by the learned
    reward model in RL, so the score the RM learned is the score PPO optimises.
    """
    body, head = backbone_and_head(model)
    hidden = body(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    last = batch.prompt_len + last_token_index(batch.response_mask)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return head(hidden[rows, last]).squeeze(-1).float()
