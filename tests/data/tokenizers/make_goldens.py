#!/usr/bin/env python3
"""Golden files for tests/test_tokenizer.c, computed with Hugging Face `tokenizers` (the reference).

    pip install tokenizers==0.23.3 unicodedata2==15.0.0
    python3 tests/data/tokenizers/make_goldens.py [SHARED]        (SHARED defaults to ../shared)

Writes, next to this script:
  tiny-bytelevel.json  a small byte-level BPE (2000 ids) trained here on ../shared texts, so that most
                       variants load fast; the others derive from ../shared tokenizers (phi-2, Llama 2,
                       kjv-llama), which are not copied: the goldens hold only the sections that change.
  cases.json           texts, and per tokenizer variant (base + patch): for every text the ids
                       (add_special_tokens False), the decoded text (skip_special_tokens False), the
                       normalized text (null: unchanged) and the pre-tokens of the normalized text (null:
                       no pre-tokenizer); ids with add_special_tokens True for text 0.
  unicode.json         every code point (planes 0-3 and 14) through each normalizer and each character
                       class pre-tokenizer, as FNV-1a-64 hashes per block of 4096 code points of the
                       expected strings. Expected = the library's result, except where the library's
                       frozen Unicode tables (unicode-normalization-alignments: Unicode 11-12;
                       unicode_categories: Unicode 8-9; Rust std) disagree with Unicode 15.0 (utf8proc
                       2.8, mixbit's source): there the Unicode 15.0 answer from unicodedata2 is expected,
                       and the code points are listed ("exceptions") with both answers.
"""
import json
import os
import sys
import unicodedata

import tokenizers
import unicodedata2
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "..", "..", "shared")
assert unicodedata2.unidata_version == "15.0.0", unicodedata2.unidata_version

GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# DeepSeek LLM / Coder style: newlines, letters, ASCII punctuation runs, trailing spaces, CJK runs
DEEPSEEK_SPLITS = [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"\s+$", r"[一-龥ࠀ-一가-퟿]+"]

TEXTS = [
    "Hello world",
    " leading space and trailing  ",
    "Numbers: 1234567890 and 3.14159, 1,000,000; 2024-01-15 v2.0.1",
    "Unicode digits: ٣٤٥ ५६ ²³ ½ Ⅻ ①② ９８",
    "Punctuation!? (parens) [brackets] {braces} \"quotes\" 'single' -- dash... ellipsis… «guillemets» ¿qué? ¡sí! 「括弧」",
    "Symbols: $100 + 5% = <tag> a|b ^caret `tick` ~tilde @at #hash &amp *star _under_ €5 ±2 ©",
    "Composed café naïve résumé; decomposed cafe\u0301 nai\u0308ve re\u0301sume\u0301 A\u030a",
    "Fullwidth ＡＢＣ ａｂｃ １２３ ！？ halfwidth ｶﾀｶﾅ",
    "Ligatures ﬁ ﬂ ﬀ ﬃ and Å Ω K ſt ㎏ ℡ ™",
    "CJK 中文字符 日本語のテキスト 한국어 텍스트 㐀",
    "Emoji 😀👍🏽 👨‍👩‍👧 🇫🇷 ❤️ 🤖",
    "Whitespace   runs\t\ttabs\nnew\n\nlines\r\nCRLF \u00a0nbsp\u3000ideo \u2028ls \u000bvt \u000cff",
    "MiXeD CaSe ÄÖÜ ÉCOLE İstanbul ΣΑΣ ẞ ǅ Ⅻ",
    "Accents: Ångström Çà Ḝ ö̲ ệ ǖ",
    "code: def f(x):\n    return x**2  # comment\n\tif a != b && c >= d: pass\n",
    "Mixed 123abc456 x1y2z3 a.b.c 3rd 21st 0x1F 1e-5",
    "Contractions: don't I'm we've they're it's y'all DON'T I'M",
    "URL https://example.com/path?q=1&r=2 email a.b@c.de",
    "   ",
    "\n",
    "a",
    "Zero\u200bwidth\u200djoiner soft\u00adhyphen BOM\ufeffhere",
    "Control \u0001\u0007 chars \u007f and replacement \ufffd end",
    "Hangul jamo \u1100\u1161\u11a8 composed 각",
    "Arabic مرحبا بالعالم Hebrew שלום Thai สวัสดี Devanagari नमस्ते",
    "Greek ΑΒΓ αβγ ς Cyrillic Привет МИР",
    "Roman Ⅻ circled ⓐⓑ Ⓐ squared 🄰 math 𝐀𝐁𝐂 𝟏𝟐",
    "Line one.\nLine two!\nLine 3?\n\n  Indented line  \nlast",
    "Special <|endoftext|> inside and <s> tags </s> here",
    "trailing spaces   \nnext line  \n  \nend  ",
    "hyphen-ated multi-word-phrase and under_scored snake_case",
    " = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese : 戦場のヴァルキュリア3 , lit . Valkyria of the Battlefield 3 ) , commonly referred to as Valkyria Chronicles III outside Japan , is a tactical role @-@ playing video game developed by Sega and Media.Vision for the PlayStation Portable . Released in January 2011 in Japan , it is the third game in the Valkyria series . \n",
]

# extra added tokens exercising lstrip / rstrip / single_word / normalized matching (ids past the vocab)
def extra_added(first_id):
    return [
        {"id": first_id, "content": "<tag>", "single_word": False, "lstrip": True, "rstrip": True, "normalized": False, "special": True},
        {"id": first_id + 1, "content": "Line", "single_word": True, "lstrip": False, "rstrip": False, "normalized": True, "special": False},
        {"id": first_id + 2, "content": "ABC", "single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False},
        {"id": first_id + 3, "content": "world", "single_word": False, "lstrip": True, "rstrip": False, "normalized": False, "special": False},
    ]


def bl(add_prefix_space=False, use_regex=True):
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": True, "use_regex": use_regex}


def split(pattern, behavior="Isolated", invert=False, regex=True):
    return {"type": "Split", "pattern": {"Regex" if regex else "String": pattern}, "behavior": behavior, "invert": invert}


def seq_pre(*p):
    return {"type": "Sequence", "pretokenizers": list(p)}


def seq_norm(*n):
    return {"type": "Sequence", "normalizers": list(n)}


def seq_dec(*d):
    return {"type": "Sequence", "decoders": list(d)}


def template(bos=None, eos=None):
    single, special = [], {}
    for tok, where in ((bos, "pre"), (eos, "post")):
        if tok is None:
            continue
        special[tok[0]] = {"id": tok[0], "ids": [tok[1]], "tokens": [tok[0]]}
    if bos:
        single.append({"SpecialToken": {"id": bos[0], "type_id": 0}})
    single.append({"Sequence": {"id": "A", "type_id": 0}})
    if eos:
        single.append({"SpecialToken": {"id": eos[0], "type_id": 0}})
    return {"type": "TemplateProcessing", "single": single, "pair": single + [{"Sequence": {"id": "B", "type_id": 1}}], "special_tokens": special}


BL_DEC = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
SP_DEC = seq_dec({"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
                 {"type": "Strip", "content": " ", "start": 1, "stop": 0})
EOT = ("<|endoftext|>", None)  # id filled per base


def variants(eot_tiny, eot_phi2):
    T, P, L, K = "tiny-bytelevel", "phi2", "llama2", "kjv-llama"
    v = []

    def add(name, base, **patch):
        v.append({"name": name, "base": base, "patch": patch})

    # real families
    add("llama3-style", P, normalizer=None, pre_tokenizer=seq_pre(split(LLAMA3_RE), bl(use_regex=False)), decoder=BL_DEC,
        post_processor={"type": "Sequence", "processors": [{"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
                                                           template(bos=("<|endoftext|>", eot_phi2))]},
        model={"ignore_merges": True})
    add("qwen2-style", P, normalizer={"type": "NFC"}, pre_tokenizer=seq_pre(split(QWEN2_RE), bl(use_regex=False)), decoder=BL_DEC)
    add("smollm-digits", P, pre_tokenizer=seq_pre({"type": "Digits", "individual_digits": True}, bl()))
    add("smollm-split", P, pre_tokenizer=seq_pre(split(r"\p{N}"), bl()))
    add("neox-style", P, normalizer={"type": "NFC"}, pre_tokenizer=bl(), decoder=BL_DEC)
    add("deepseek-style", P, normalizer=seq_norm(), decoder=BL_DEC,
        pre_tokenizer=seq_pre(*[split(r) for r in DEEPSEEK_SPLITS], {"type": "Digits", "individual_digits": True}, bl(use_regex=False)),
        post_processor=template(bos=("<|endoftext|>", eot_phi2)))
    add("falcon-style", P, pre_tokenizer=seq_pre({"type": "Punctuation", "behavior": "Contiguous"}, bl(), {"type": "Digits", "individual_digits": False},
                                                 split("[0-9][0-9][0-9]")))
    add("mistral-metaspace", L, normalizer=None, decoder=SP_DEC,
        pre_tokenizer={"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False})
    add("gemma-style", L, normalizer={"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}, pre_tokenizer=None,
        decoder=seq_dec({"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}))
    add("phi3-nfkc-lower", L, normalizer=seq_norm({"type": "NFKC"}, {"type": "Lowercase"}, {"type": "Prepend", "prepend": "\u2581"},
                                                   {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}))
    add("kjv-metaspace-always", K, normalizer=None, pre_tokenizer={"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True},
        decoder={"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True})
    add("kjv-metaspace-never", K, normalizer=None, pre_tokenizer={"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never", "split": True},
        decoder={"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never", "split": True})
    add("kjv-metaspace-first-split", K, normalizer=seq_norm({"type": "NFD"}, {"type": "StripAccents"}),
        pre_tokenizer={"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": True},
        decoder={"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": True})
    add("kjv-strip-metaspace", K, normalizer={"type": "Strip", "strip_left": True, "strip_right": True},
        pre_tokenizer=seq_pre({"type": "WhitespaceSplit"}, {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}))
    # normalizers on the tiny byte-level model
    for nf in ("NFC", "NFD", "NFKC", "NFKD"):
        add("tiny-" + nf.lower(), T, normalizer={"type": nf})
    add("tiny-lowercase", T, normalizer={"type": "Lowercase"})
    add("tiny-nfkc-lower", T, normalizer=seq_norm({"type": "NFKC"}, {"type": "Lowercase"}))
    add("tiny-nfd-stripaccents", T, normalizer=seq_norm({"type": "NFD"}, {"type": "StripAccents"}, {"type": "Lowercase"}))
    add("tiny-strip", T, normalizer=seq_norm({"type": "Strip", "strip_left": True, "strip_right": False}, {"type": "Strip", "strip_left": False, "strip_right": True}))
    add("tiny-replace-prepend", T, normalizer=seq_norm({"type": "Replace", "pattern": {"Regex": r"\s{2,}"}, "content": " "},
                                                        {"type": "Replace", "pattern": {"String": "e"}, "content": "E"},
                                                        {"type": "Replace", "pattern": {"Regex": "^L|s$"}, "content": "^"},
                                                        {"type": "Replace", "pattern": {"Regex": "(?<=\n)"}, "content": "~"},
                                                        {"type": "Prepend", "prepend": "#"}))
    add("tiny-nmt", T, normalizer={"type": "Nmt"})
    add("tiny-bert-normalizer", T, normalizer={"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True, "strip_accents": None, "lowercase": True})
    add("tiny-bert-keepcase", T, normalizer={"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": False, "strip_accents": True, "lowercase": False},
        pre_tokenizer=seq_pre({"type": "BertPreTokenizer"}, bl(use_regex=False)))
    add("tiny-bytelevel-normalizer", T, normalizer={"type": "ByteLevel"}, pre_tokenizer=split("\u0120", "MergedWithNext", regex=False))
    # pre-tokenizers
    add("tiny-digits-contiguous", T, pre_tokenizer=seq_pre({"type": "Digits", "individual_digits": False}, bl()))
    for beh in ("Isolated", "Contiguous", "MergedWithPrevious", "MergedWithNext", "Removed"):
        add("tiny-punct-" + beh.lower(), T, pre_tokenizer=seq_pre({"type": "Punctuation", "behavior": beh}, bl(use_regex=False)))
    add("tiny-whitespace", T, pre_tokenizer=seq_pre({"type": "Whitespace"}, bl(use_regex=False)))
    add("tiny-whitespacesplit", T, pre_tokenizer=seq_pre({"type": "WhitespaceSplit"}, bl(use_regex=False)))
    add("tiny-chardelim", T, pre_tokenizer=seq_pre({"type": "CharDelimiterSplit", "delimiter": "-"}, bl(use_regex=False)))
    add("tiny-fixedlength", T, pre_tokenizer=seq_pre({"type": "FixedLength", "length": 3}, bl(use_regex=False)))
    add("tiny-bytelevel-prefix", T, pre_tokenizer=bl(add_prefix_space=True))
    add("tiny-bytelevel-noregex-prefix", T, pre_tokenizer=seq_pre(split(r"\s+", "MergedWithNext"), bl(add_prefix_space=True, use_regex=False)))
    for beh in ("Isolated", "Contiguous", "MergedWithPrevious", "MergedWithNext", "Removed"):
        for inv in (False, True):
            add("tiny-split-%s%s" % (beh.lower(), "-invert" if inv else ""), T, pre_tokenizer=seq_pre(split(r"[a-z]+|\s", beh, inv), bl(use_regex=False)))
    add("tiny-split-string", T, pre_tokenizer=seq_pre(split(", ", "MergedWithPrevious", regex=False), split(" ", "Removed", regex=False), bl(use_regex=False)))
    add("tiny-split-anchors", T, pre_tokenizer=seq_pre(split(r"\s+$"), split(r"^\s+"), bl(use_regex=False)))
    add("tiny-split-empty-matches", T, pre_tokenizer=seq_pre(split(r"x*"), bl(use_regex=False)))
    add("tiny-split-lookaround", T, pre_tokenizer=seq_pre(split(r"(?<=[a-z])(?=[A-Z])|\d+(?=\s)", "MergedWithNext"), bl(use_regex=False)))
    add("tiny-bert-pretokenizer", T, pre_tokenizer=seq_pre({"type": "BertPreTokenizer"}, bl(use_regex=False)))
    add("tiny-digits-after-bytelevel", T, pre_tokenizer=seq_pre(bl(), {"type": "Digits", "individual_digits": True}, {"type": "Punctuation"}))
    # added tokens, decoders, post-processors
    add("tiny-added-tokens", T, normalizer={"type": "Lowercase"}, added_tokens_extra=extra_added(2000),
        post_processor=template(bos=("<|endoftext|>", eot_tiny), eos=("<tag>", 2000)))
    add("tiny-dec-wordpiece", T, decoder={"type": "WordPiece", "prefix": "Ġ", "cleanup": True})
    add("tiny-dec-bpe", T, decoder={"type": "BPEDecoder", "suffix": "Ġ"})
    add("tiny-dec-ctc", T, decoder={"type": "CTC", "pad_token": "<|endoftext|>", "word_delimiter_token": "Ġ", "cleanup": True})
    add("tiny-dec-chain", T, decoder=seq_dec({"type": "Replace", "pattern": {"Regex": "[ĠĊ]+"}, "content": "_"},
                                             {"type": "Strip", "content": "e", "start": 0, "stop": 1},
                                             {"type": "Strip", "content": "_", "start": 2, "stop": 0}, BL_DEC))
    add("tiny-dec-none", T, decoder=None)
    add("tiny-roberta", T, pre_tokenizer=bl(add_prefix_space=True),
        post_processor={"type": "RobertaProcessing", "sep": ["<|endoftext|>", eot_tiny], "cls": ["<|endoftext|>", eot_tiny], "trim_offsets": True, "add_prefix_space": True})
    return v


def train_tiny(shared):
    text = open(os.path.join(shared, "text", "wikitext-2-raw-test.txt"), encoding="utf-8").read()[:300000]
    text += open(os.path.join(shared, "text", "kjv-eval.txt"), encoding="utf-8").read()[:100000]
    tok = Tokenizer(models.BPE())
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                             show_progress=False)
    tok.train_from_iterator(text.split("\n"), trainer=tr)
    return json.loads(tok.to_str())


def load_base(name, shared, tiny):
    if name == "tiny-bytelevel":
        return json.loads(json.dumps(tiny))
    path = {"phi2": "tokenizers/phi2-bytelevel/tokenizer.json", "llama2": "tokenizers/llama2/tokenizer.json", "kjv-llama": "models/kjv-llama/tokenizer.json"}[name]
    return json.load(open(os.path.join(shared, path), encoding="utf-8"))


def apply_patch(j, patch):
    for k, val in patch.items():
        if k == "model":
            j["model"].update(val)
        elif k == "added_tokens_extra":
            j["added_tokens"] = j["added_tokens"] + val
        else:
            j[k] = val
    return j


def main():
    tiny = train_tiny(SHARED)
    with open(os.path.join(HERE, "tiny-bytelevel.json"), "w", encoding="utf-8") as f:
        json.dump(tiny, f, ensure_ascii=False, separators=(",", ":"))
    tiny_eot = tiny["model"]["vocab"]["<|endoftext|>"]
    out = {"tokenizers_version": tokenizers.__version__, "texts": TEXTS, "variants": []}
    bases = {}
    for var in variants(tiny_eot, 50256):
        if var["base"] not in bases:
            bases[var["base"]] = load_base(var["base"], SHARED, tiny)
        j = apply_patch(json.loads(json.dumps(bases[var["base"]])), var["patch"])
        tok = Tokenizer.from_str(json.dumps(j))
        rec = {"name": var["name"], "base": var["base"], "patch": var["patch"], "ids": [], "decoded": [], "normalized": [], "pretokens": []}
        for t in TEXTS:
            ids = tok.encode(t, add_special_tokens=False).ids
            rec["ids"].append(ids)
            dec = tok.decode(ids, skip_special_tokens=False)
            rec["decoded"].append(None if dec == t else dec)  # null: the text itself
            norm = tok.normalizer.normalize_str(t) if tok.normalizer else t
            rec["normalized"].append(None if norm == t else norm)
            rec["pretokens"].append([p for p, _ in tok.pre_tokenizer.pre_tokenize_str(norm)] if tok.pre_tokenizer else None)  # null: no pre-tokenizer
        rec["ids_special"] = tok.encode(TEXTS[0], add_special_tokens=True).ids
        out["variants"].append(rec)
        print(var["name"], sum(len(x) for x in rec["ids"]), "ids", file=sys.stderr)
    with open(os.path.join(HERE, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
    unicode_goldens()


# ---- every code point -------------------------------------------------------------------------------------------

PLANES = [(0, 0x40000), (0xE0000, 0xE1000)]  # planes 4-13 are unassigned, 15-16 private use
BLOCK = 4096


def fnv1a(data, h=0xCBF29CE484222325):
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def u15_cat(c):
    return unicodedata2.category(chr(c))


def u15_lower(c):
    # char::to_lowercase: the full mapping of U+0130, simple mappings elsewhere; unassigned: unchanged
    if c == 0x130:
        return "i\u0307"
    if u15_cat(c) == "Cn":
        return chr(c)
    s = chr(c).lower()  # Python's own tables (Unicode 14); a character new in 15.0 has no case mapping
    return s if len(s) == 1 or c == 0x130 else chr(c)


def pieces(pt, s):
    return "|".join(p for p, _ in pt.pre_tokenize_str(s))


def unicode_goldens():
    ws = lambda c: c in (9, 10, 11, 12, 13, 0x85) or u15_cat(c) in ("Zs", "Zl", "Zp")
    word = lambda c: u15_cat(c)[0] in "LM" or u15_cat(c) in ("Nd", "Nl", "Pc") or c in (0x200C, 0x200D) or \
        0x24B6 <= c <= 0x24E9 or 0x1F130 <= c <= 0x1F149 or 0x1F150 <= c <= 0x1F169 or 0x1F170 <= c <= 0x1F189
    punct = lambda c: (c < 0x80 and chr(c) in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") or u15_cat(c)[0] == "P"
    numeric = lambda c: u15_cat(c) in ("Nd", "Nl", "No")

    def u15_split(c, pred, removed=False):
        s = chr(c)
        if not pred(c):
            return "a" + s + "a"
        return "a|a" if removed else "a|" + s + "|a"

    def u15_whitespace(c):
        if ws(c):
            return "a|a"
        return "a" + chr(c) + "a" if word(c) else "a|" + chr(c) + "|a"

    def bert(c):
        s = chr(c)
        cat = u15_cat(c)
        if c == 0 or c == 0xFFFD or (cat in ("Cc", "Cf", "Co", "Cs") and s not in "\t\n\r"):
            return ""
        if s in "\t\n\r" or ws(c):
            return " "
        if 0x4E00 <= c <= 0x9FFF or 0x3400 <= c <= 0x4DBF or 0x20000 <= c <= 0x2A6DF or 0x2A700 <= c <= 0x2B73F or \
           0x2B740 <= c <= 0x2B81F or 0x2B920 <= c <= 0x2CEAF or 0xF900 <= c <= 0xFAFF or 0x2F800 <= c <= 0x2FA1F:
            s = " " + s + " "
        d = "".join(x for x in unicodedata2.normalize("NFD", s) if unicodedata2.category(x) != "Mn")
        return "".join(u15_lower(ord(x)) for x in d)

    checks = {
        "NFC": (normalizers.NFC(), lambda c: unicodedata2.normalize("NFC", chr(c))),
        "NFD": (normalizers.NFD(), lambda c: unicodedata2.normalize("NFD", chr(c))),
        "NFKC": (normalizers.NFKC(), lambda c: unicodedata2.normalize("NFKC", chr(c))),
        "NFKD": (normalizers.NFKD(), lambda c: unicodedata2.normalize("NFKD", chr(c))),
        "Lowercase": (normalizers.Lowercase(), u15_lower),
        "StripAccents": (normalizers.StripAccents(), lambda c: "" if u15_cat(c)[0] == "M" else chr(c)),
        "BertNormalizer": (normalizers.BertNormalizer(), bert),
        "Digits": (pre_tokenizers.Digits(individual_digits=True), lambda c: u15_split(c, numeric)),
        "Punctuation": (pre_tokenizers.Punctuation(), lambda c: u15_split(c, punct)),
        "WhitespaceSplit": (pre_tokenizers.WhitespaceSplit(), lambda c: u15_split(c, ws, removed=True)),
        "Whitespace": (pre_tokenizers.Whitespace(), u15_whitespace),
    }
    out = {"planes": PLANES, "block": BLOCK, "checks": {}}
    for name, (obj, ref) in checks.items():
        is_norm = name not in ("Digits", "Punctuation", "WhitespaceSplit", "Whitespace")
        hashes, exceptions = {}, []
        for lo, hi in PLANES:
            for b0 in range(lo, hi, BLOCK):
                h = 0xCBF29CE484222325
                for c in range(b0, b0 + BLOCK):
                    if 0xD800 <= c <= 0xDFFF:
                        continue
                    hf = obj.normalize_str(chr(c)) if is_norm else pieces(obj, "a" + chr(c) + "a")
                    want = ref(c)
                    if want != hf:
                        exceptions.append([c, hf, want])
                    h = fnv1a(want.encode("utf-8") + b"\x01", h)
                hashes["%x" % b0] = "%016x" % h
        out["checks"][name] = {"hashes": hashes, "exceptions": exceptions}
        print(name, len(exceptions), "exceptions", file=sys.stderr)
    with open(os.path.join(HERE, "unicode.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))


if __name__ == "__main__":
    main()
