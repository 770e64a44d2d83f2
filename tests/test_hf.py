"""Parity with Hugging Face's OpenAIGPTLMHeadModel: import, export, logits."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from conftest import REPO, SAMPLE_DIR
from safetensors.torch import load_file, save_file

from gpt1_ds.hf import export_hf, export_hf_tokenizer, import_hf, to_hf_state_dict
from gpt1_ds.model import GPT, GPTConfig
from gpt1_ds.tokenizer import MODEL_NAME, load_tokenizer

transformers = pytest.importorskip("transformers")
OpenAIGPTConfig = transformers.OpenAIGPTConfig
OpenAIGPTLMHeadModel = transformers.OpenAIGPTLMHeadModel

SMALL = dict(vocab_size=211, n_positions=48, n_embd=64, n_layer=3, n_head=4)
GPT1 = dict(vocab_size=40478, n_positions=512, n_embd=768, n_layer=12, n_head=12)


def random_hf(seed: int = 0, **sizes) -> OpenAIGPTLMHeadModel:
    """A randomly initialised HF model whose biases and LayerNorms are not trivial either."""
    torch.manual_seed(seed)
    model = OpenAIGPTLMHeadModel(OpenAIGPTConfig(**sizes)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def assert_same_logits(hf: OpenAIGPTLMHeadModel, ours: GPT, T: int, seed: int = 1) -> None:
    torch.manual_seed(seed)
    ids = torch.randint(0, ours.config.vocab_size, (2, T))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours.eval()(ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_import_from_hf_object_gives_same_logits():
    hf = random_hf(**SMALL)
    assert_same_logits(hf, import_hf(hf), T=SMALL["n_positions"])


def test_export_back_is_bitwise_equal():
    hf = random_hf(**SMALL)
    ours = to_hf_state_dict(import_hf(hf))
    theirs = hf.state_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key


def test_hf_loads_our_exported_directory(tmp_path):
    torch.manual_seed(3)
    ours = GPT(GPTConfig(**SMALL, n_inner=4 * SMALL["n_embd"])).eval()
    export_hf(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    hf = OpenAIGPTLMHeadModel.from_pretrained(tmp_path).eval()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.tokens_embed.weight.data_ptr()
    assert_same_logits(hf, ours, T=20)
    # And our importer reads the directory back to the same weights.
    again = import_hf(tmp_path)
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_import_ignores_legacy_mask_buffers(tmp_path):
    hf = random_hf(**SMALL)
    hf.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    n = SMALL["n_positions"]
    for i in range(SMALL["n_layer"]):  # what old checkpoints carry
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    save_file(state, str(tmp_path / "model.safetensors"))
    assert_same_logits(hf, import_hf(tmp_path), T=n)


def test_import_errors_name_the_problem(tmp_path):
    hf = random_hf(**SMALL)
    hf.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["transformer.h.1.mlp.c_fc.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight"):
        import_hf(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "afn": "relu"}))
    with pytest.raises(ValueError, match="afn"):
        import_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        import_hf(tmp_path / "nowhere")


def test_export_refuses_a_shape_openaigpt_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="n_inner"):
        export_hf(GPT(GPTConfig.from_preset("tiny", n_inner=300)), tmp_path)


@pytest.mark.slow
def test_full_gpt1_parity_both_ways(tmp_path):
    """The paper's configuration once: HF → ours → logits; ours → directory → HF → logits."""
    hf = random_hf(**GPT1)
    ours = import_hf(hf)
    assert ours.num_parameters() == 116_534_784
    assert_same_logits(hf, ours, T=128)
    del hf
    export_hf(ours, tmp_path)
    assert_same_logits(OpenAIGPTLMHeadModel.from_pretrained(tmp_path), ours, T=128, seed=2)


# --- The tokenizer: AutoTokenizer over export_hf_tokenizer's files gives our ids ---------------


@pytest.fixture(scope="module")
def hf_tokenizer(prepared, tmp_path_factory):
    """(our tokenizer, AutoTokenizer over the files export_hf_tokenizer writes for it)."""
    out = tmp_path_factory.mktemp("hf_tokenizer")
    tok = load_tokenizer(prepared / MODEL_NAME)
    export_hf_tokenizer(tok, out, n_positions=64)
    return tok, transformers.AutoTokenizer.from_pretrained(out)


def test_autotokenizer_gives_our_ids_on_every_line_of_real_text(hf_tokenizer):
    tok, hf = hf_tokenizer
    poe = SAMPLE_DIR / "pg01062_Edgar-Allan-Poe_First-Gutenberg-Collection-of-Edgar-Allan-Poe.txt.gz"
    book = gzip.decompress(poe.read_bytes()).decode("utf-8")
    sst2 = (REPO / "data" / "glue" / "sst2" / "stsa.binary.dev").read_text(encoding="utf-8")
    edge = ["", "\n", " one space", "  two", "tabs\tand  double  spaces", "a\n\nb\n", "日本 🙂 — naïve…"]
    lines = [*sst2.split("\n"), *book.split("\n"), *edge]
    differ = [line for line in lines if hf(line, add_special_tokens=False)["input_ids"] != tok.encode(line)]
    assert not differ, f"{len(differ)} of {len(lines)} lines differ, e.g. {differ[:3]}"
    ids = tok.encode(book)  # the whole book at once: newlines between the lines
    assert hf(book, add_special_tokens=False)["input_ids"] == ids
    # Decoding keeps the space the first ▁ stands for; every other character comes back.
    assert hf.decode(ids) == " " + tok.decode(ids)
    continuation = tok.encode("It was a dark night.\nThe ship")[2:]  # from "▁a": its space is kept
    assert hf.decode(continuation) == " a dark night.\nThe ship"


def test_autotokenizer_special_tokens_are_ours(hf_tokenizer):
    tok, hf = hf_tokenizer
    ids = tok.special_ids()
    assert (hf.unk_token, hf.pad_token, hf.eos_token, hf.bos_token) == ("<unk>", "<pad>", "<eod>", None)
    assert (hf.unk_token_id, hf.pad_token_id, hf.eos_token_id) == (ids["unk"], ids["pad"], ids["eod"])
    controls = hf.convert_tokens_to_ids(["<start>", "<delim>", "<extract>"])
    assert controls == [ids["start"], ids["delim"], ids["extract"]]
    assert set(hf.all_special_tokens) == {"<unk>", "<pad>", "<eod>", "<start>", "<delim>", "<extract>"}
    assert len(hf) == tok.vocab_size
    # HF matches special tokens in text (ours spells them out); decoding drops them on request.
    assert hf("x <eod>", add_special_tokens=False)["input_ids"][-1] == ids["eod"]
    assert hf.decode([ids["start"], *tok.encode("hi"), ids["eod"]], skip_special_tokens=True) == " hi"


def test_a_lower_cased_corpus_gives_an_autotokenizer_that_lower_cases(tmp_path):
    from conftest import run_prepare

    run_prepare(tmp_path / "lower", extra=["--lowercase"])
    tok = load_tokenizer(tmp_path / "lower" / MODEL_NAME)
    (tmp_path / "hf").mkdir()
    export_hf_tokenizer(tok, tmp_path / "hf", n_positions=64)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "The Ship SAILED at Dawn.\nIt Was Late"
    assert hf(text)["input_ids"] == tok.encode(tok.normalize(text)) == tok.encode(text.lower())


def test_padding_rows_are_never_exported(tmp_path):
    from gpt1_ds.model import with_vocab

    torch.manual_seed(4)
    plain = GPT(GPTConfig(**SMALL, n_inner=4 * SMALL["n_embd"])).eval()
    padded = with_vocab(plain, SMALL["vocab_size"], 64)
    assert padded.tokens_embed.weight.shape[0] == 256
    export_hf(padded, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == SMALL["vocab_size"]
    hf = OpenAIGPTLMHeadModel.from_pretrained(tmp_path).eval()
    assert hf.transformer.tokens_embed.weight.shape[0] == SMALL["vocab_size"]
    assert_same_logits(hf, padded, T=20)
