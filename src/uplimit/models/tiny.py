"""A tiny strong/weak model pair for tests, built in-process: no download, ~0.3 s.

The pair imitates the real one (Qwen2.5-Coder, FACTS.md) in every way the code depends on,
at toy size:
- a byte-level BPE tokenizer with Qwen2's normalizer and pre-tokenizer, 256 byte tokens, a few
  hundred merges learned from `_CORPUS`, and the ChatML control tokens appended after them;
- a 2-layer Qwen2 with grouped-query attention (4 query heads share 2 KV heads), q/k/v biases,
  untied embeddings, and a logits width rounded up past the tokenizer (ids with no token);
- a "weak" model that is the strong one with every weight perturbed by seeded noise, so the
  two agree on most but not all greedy tokens.

Random initialisation at the default scale gives near-uniform next-token distributions,
which would make compression tests meaningless. So weights start wider (`_INIT_STD`) and the
output head is scaled up (`_HEAD_SCALE`) until the top-1 probability is usually above one half.
Measured with seed 0 (10 dev prompts x 100 greedy tokens of the strong model): weak and strong
pick the same top-1 token at 79 % of positions; the strong top-1 probability averages 0.72 and
exceeds 0.5 at 78 % of positions.
Biases and norm weights are random too, so that weight-transform tests cannot pass by accident
on zeros and ones.

`export_gguf` writes either model as an F32 GGUF file, so that the llama.cpp backend can be
tested on the same tiny models (and both backends on one file).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import gguf
import torch
from safetensors.numpy import load_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from uplimit.models.chat import CHATML
from uplimit.models.gguf_names import gguf_name

# Bump when the recipe changes, so directories built by an older recipe are not reused.
RECIPE_VERSION = 1

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_N_MERGES = 400
_VOCAB_MULTIPLE = 64  # logits width = tokenizer size rounded up, as in Qwen (151,665 -> 151,936)
_INIT_STD = 0.2
_HEAD_SCALE = 5.0
_NORM_JITTER = 0.1
_WEAK_NOISE = 0.015  # weak = strong + N(0, (_WEAK_NOISE * std(param))^2), per parameter

# Qwen2's pre-tokenizer split (from its tokenizer.json).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Fixed training text for the merges; editing it changes the tokenizer (bump RECIPE_VERSION).
_CORPUS = '''\
def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    numbers = [0, 1]
    while len(numbers) < n:
        numbers.append(numbers[-1] + numbers[-2])
    return numbers[:n]


class Counter:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, word: str) -> None:
        self.counts[word] = self.counts.get(word, 0) + 1

    def most_common(self, k: int = 10) -> list[tuple[str, int]]:
        return sorted(self.counts.items(), key=lambda item: -item[1])[:k]


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as file:
        return [line.rstrip("\\n") for line in file if line.strip()]


import numpy as np

def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max()
    e = np.exp(z)
    return e / e.sum()


for i in range(10):
    if i % 2 == 0:
        print(f"{i} is even")
    else:
        print(f"{i} is odd")

The model reads the prompt and writes an answer one token at a time. Each token is a
piece of a word, a whole word, or a few bytes of a character. A good answer is short,
correct and easy to read. The user asks a question; the assistant answers it.

Write a function that returns the sum of a list of numbers. Explain what the function
does, then show an example of how to call it and what it returns.

Sure! Here is a simple function:

    def total(values):
        return sum(values)

Calling total([1, 2, 3]) returns 6. The function works for any list of numbers,
including an empty list, for which it returns 0.

The weights of a large model are worth protecting. If every byte that leaves the data
center is counted, and the total is small, the weights cannot be copied out in time.
Naïve café owners in Zürich serve crème brûlée — 日本語 と 中文 и русский текст, ✓ 🙂.
'''


def build_tiny_pair(directory: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Build (or reuse) the tiny pair under `directory`; return (strong_dir, weak_dir).

    Each result is a Hugging Face model directory (safetensors weights, tokenizer with the
    ChatML template) that `HFModel` loads. The same `seed` gives byte-identical files on the
    same torch version. Directories appear atomically, so an existing one is complete.
    """
    directory = Path(directory)
    strong_dir = directory / f"tiny-v{RECIPE_VERSION}-seed{seed}-strong"
    weak_dir = directory / f"tiny-v{RECIPE_VERSION}-seed{seed}-weak"
    if strong_dir.is_dir() and weak_dir.is_dir():
        return strong_dir, weak_dir

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    strong = _build_strong(
        len(tokenizer), tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)), seed
    )
    weak = _perturbed(strong, seed)
    for model, final in ((strong, strong_dir), (weak, weak_dir)):
        if final.is_dir():
            continue
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory))
        staging.chmod(0o755)  # mkdtemp's 0700 would keep a shared cache private
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, final)
        except OSError:  # another process finished first; its files are the same
            shutil.rmtree(staging)
    return strong_dir, weak_dir


def export_gguf(model_dir: str | Path) -> Path:
    """Write a tiny model directory as an F32 GGUF file beside it; return its path (reused).

    The layout is what llama.cpp's convert_hf_to_gguf.py writes for Qwen2 (padding ids UNUSED),
    so the llama.cpp backend and `HFModel` can load the same file. F32 keeps the weights
    exact: `HFModel` gives bit-identical logits from the directory and from the GGUF.
    """
    model_dir = Path(model_dir)
    path = model_dir.with_name(model_dir.name + ".gguf")
    if path.is_file():
        return path
    config = Qwen2Config.from_pretrained(model_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    weights = load_file(model_dir / "model.safetensors")

    staging = path.with_name(f".staging-{os.getpid()}-{path.name}")
    writer = gguf.GGUFWriter(staging, arch="qwen2")
    writer.add_name(model_dir.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)

    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.added_tokens_decoder)
    types = [
        gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
        for i in range(len(tokens))
    ]
    for i in range(len(tokens), config.vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    vocab = tokenizer.get_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    for name, tensor in sorted(weights.items()):
        writer.add_tensor(gguf_name(name), tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(staging, path)
    return path


def _build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()  # as Qwen2's; transformers re-applies it on load
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + _N_MERGES,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS], trainer)
    # Added after training so that, as in Qwen, control tokens follow the merged vocabulary.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )


def _build_strong(n_tokens: int, special_ids: list[int], seed: int) -> Qwen2ForCausalLM:
    endoftext, _, im_end = special_ids
    n_vocab = -(-n_tokens // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
    config = Qwen2Config(
        vocab_size=n_vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        initializer_range=_INIT_STD,
        eos_token_id=im_end,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0.0, _INIT_STD)
                elif "norm" in name:
                    param.normal_(1.0, _NORM_JITTER)
            model.lm_head.weight.mul_(_HEAD_SCALE)
            # Untrained rows, like Qwen's padding ids: logit 0, rarely chosen.
            model.lm_head.weight[n_tokens:] = 0.0
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, endoftext], pad_token_id=endoftext
    )
    return model.eval()


def _perturbed(strong: Qwen2ForCausalLM, seed: int) -> Qwen2ForCausalLM:
    weak = copy.deepcopy(strong)
    noise = torch.Generator().manual_seed(1_000_003 + seed)
    with torch.no_grad():
        for param in weak.parameters():
            param.add_(torch.randn(param.shape, generator=noise) * (_WEAK_NOISE * param.std()))
    return weak.eval()
