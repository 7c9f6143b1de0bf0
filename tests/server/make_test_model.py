"""Makes a servable test model from a golden fixture: the fixture's checkpoint (linked,
not copied) plus, unless the fixture has its own, a small byte-level BPE tokenizer whose
300 ids fit the random fixtures' vocabulary (256 bytes, 42 merges, BOS 298 and EOS 299 as
in their config.json) and a DeepSeek-V2-Chat-style chat template. Standard library only.

    python make_test_model.py FIXTURE_DIR OUT_DIR
"""

import json
import os
import sys

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
MERGES = (
    "Ġ t|h e|i n|e r|a n|o n|r e|Ġ a|e n|a t|o r|e s|Ġ s|t i|Ġ w|i s|Ġ c|Ġ o|a r|e d|i t"
    "|Ġ f|Ġ b|Ġ p|a l|Ġ m|o u|l e|Ġ d|s t|Ġ h|i c|n d|Ġ i|r o|Ġ l|n t|a s|e l|o m|Ġ n|l o"
).split("|")


def bytes_to_unicode():
    """GPT-2's printable stand-ins for the 256 byte values."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tokenizer_json():
    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    for merge in MERGES:
        a, b = merge.split(" ")
        vocab[a + b] = len(vocab)
    assert len(vocab) == 298, len(vocab)
    special = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in ((298, BOS), (299, EOS))
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": MERGES},
    }


def main(fixture, out):
    """Links the fixture's files into `out`; a fixture without its own tokenizer gets the
    small one (written as new files: never through a link into the fixture)."""
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(fixture):
        if name.endswith(".safetensors") or name.endswith(".json"):
            if name == "reference.safetensors":
                continue
            dst = os.path.join(out, name)
            if os.path.lexists(dst):
                os.remove(dst)  # a link or a tokenizer file of an earlier run
            os.symlink(os.path.abspath(os.path.join(fixture, name)), dst)
    if os.path.isfile(os.path.join(fixture, "tokenizer.json")):
        return  # a trained fixture (austen) has its own tokenizer: linked above
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": BOS,
              "eos_token": EOS, "tokenizer_class": "LlamaTokenizerFast",
              "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    for name, content in [("tokenizer.json", tokenizer_json()), ("tokenizer_config.json", config)]:
        path = os.path.join(out, name)
        if os.path.lexists(path):
            os.remove(path)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(content, f, ensure_ascii=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
