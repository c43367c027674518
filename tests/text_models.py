"""Tiny Hugging Face folders with real tokenizers (built with `tokenizers` from a small
vocabulary, saved with save_pretrained next to random-weight models), for the data tests."""

from __future__ import annotations

from pathlib import Path

WORDS = ("the a cat dog bird sat ran flew on under over mat tree house red blue green big "
         "small fast slow and then it was is").split()
SENTENCES = [
    "the cat sat on the mat",
    "a dog ran under the tree",
    "the bird flew over the house",
    "a big red cat ran fast",
    "the small blue bird sat then flew",
    "it was a green tree and a big house",
    "the dog is slow and the cat is fast",
    "a bird sat on a red mat",
    "the house was big and blue",
    "then the dog ran over the mat",
    "a small cat sat under a green tree",
    "the fast bird flew and the slow dog sat",
]


def word_tokenizer(special: tuple[str, ...], post: str | None = None):
    """A word-level fast tokenizer over WORDS (+ special tokens first)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate([*special, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]" if "[UNK]" in vocab else
                                     special[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if post == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]),
                                                    ("[SEP]", vocab["[SEP]"])])
    return tok, len(vocab)


def bert_folder(path: Path, *, token_type: bool = False, with_tokenizer: bool = True,
                classifier: int = 0) -> Path:
    """A BertModel (hidden states out) or BertForSequenceClassification folder."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        PreTrainedTokenizerFast,
    )

    tok, vocab = word_tokenizer(("[PAD]", "[UNK]", "[CLS]", "[SEP]"), post="bert")
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    if classifier:
        config.num_labels = classifier
        config.id2label = {i: f"class{i}" for i in range(classifier)}
        config.label2id = {f"class{i}": i for i in range(classifier)}
        model = BertForSequenceClassification(config)
    else:
        model = BertModel(config)
    model.save_pretrained(path)
    if with_tokenizer:
        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_type else [])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                       unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                       model_input_names=names)
        fast.save_pretrained(path)
    return path


def llama_folder(path: Path, *, vocab_extra: int = 0) -> Path:
    """A LlamaForCausalLM with a word tokenizer without a pad token (as GPT-2/Llama ship).
    `vocab_extra` > 0 gives logits wider than the tokenizer; < 0 narrower."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok, vocab = word_tokenizer(("<unk>", "<s>", "</s>"))
    config = LlamaConfig(vocab_size=vocab + vocab_extra, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(path)
    return path
