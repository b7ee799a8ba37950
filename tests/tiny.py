"""The tiny test model: a randomly initialised 2-layer Llama (hidden 64) with a 384-token byte-level
tokenizer trained in memory, in SmolLM2's chat format (EOS = pad = <|im_end|>). Saved once per test
process as an HF directory, so every stage loads it like any other model: seconds on a CPU."""

import tempfile
from pathlib import Path

import torch

# SmolLM2's chat template, shape for shape.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = (
    "Below is a conversation from a movie discussion forum. Someone is asking for movie "
    "recommendations. Recommend exactly 20 movies this person would enjoy, best first.\n\n"
    "I loved Heat and The Matrix, any thriller or sci-fi movies like those?\n"
    "Heat (1995)\nAlien (1979)\nThe Matrix (1999)\nToy Story (1995)\nThe Godfather (1972)\n"
    "Jaws (1975)\nPulp Fiction (1994)\nSpirited Away (2001)\nThe Shining (1980)\n"
    "Casablanca (1942)\n"
    "Titanic (1997)\nGravity (2013)\nInception (2010)\nRocky (1976)\nVertigo (1958)\n \n\n\n"
)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([CORPUS] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def save_tiny(path) -> Path:
    """The tiny model and tokenizer written to `path` with save_pretrained."""
    tok = build_tokenizer()
    build_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


_DIR: list[Path] = []


def tiny_dir() -> str:
    """This process's saved tiny model (a directory named 'tiny', so 05 names its evaluation so)."""
    if not _DIR:
        _DIR.append(save_tiny(Path(tempfile.mkdtemp(prefix="convrec-test-")) / "tiny"))
    return str(_DIR[0])
