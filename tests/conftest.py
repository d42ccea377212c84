"""Tiny models and tokenizers built in-process: no downloads, seconds per test."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def word_tokenizer(words, bos="<s>", eos="</s>"):
    """A word-level fast tokenizer over `words`, BART-style specials and pair template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words) - set(specials)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>")


def tiny_bart(vocab_size, d=32, layers=1, seed=0):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    cfg = BartConfig(vocab_size=vocab_size, d_model=d, encoder_layers=layers, decoder_layers=layers,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * d,
                     decoder_ffn_dim=2 * d, max_position_embeddings=128, pad_token_id=1, bos_token_id=0,
                     eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None, dropout=0.0,
                     attention_dropout=0.0, activation_dropout=0.0)
    return BartForConditionalGeneration(cfg).eval()


def tiny_bert(vocab_size, d=32, layers=1, seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=d, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * d, max_position_embeddings=128, pad_token_id=1,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(cfg, add_pooling_layer=False).eval()


@pytest.fixture
def tiny_world():
    """12 passages 'key_i val_j filler', questions 'what is key_i ?' -> val_j."""
    import random

    rng = random.Random(0)
    keys = [f"key{i}" for i in range(12)]
    vals = [f"val{i}" for i in range(6)]
    fill = [f"w{i}" for i in range(10)]
    answers = [rng.choice(vals) for _ in keys]
    passages = [{"id": f"p{i}", "title": keys[i], "text": f"{keys[i]} is {answers[i]} " + " ".join(rng.sample(fill, 4))}
                for i in range(len(keys))]
    questions = [{"question": f"what is {keys[i]} ?", "answers": [answers[i]], "gold": i} for i in range(len(keys))]
    words = keys + vals + fill + ["is", "what", "?", "/"]
    return passages, questions, word_tokenizer(words)
